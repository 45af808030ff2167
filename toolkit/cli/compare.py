"""`python -m toolkit compare`: is configuration B of a benchmark model faster than A? Interleaved rounds, a verdict.

A and B start from the shared --model/--batch-size/--dtype and override any of them:

    python -m toolkit compare --model efficientnet-b0 --a batch-size=1 --b batch-size=2
    python -m toolkit compare --model-a resnet-50 --model-b efficientnet-b0
    python -m toolkit compare --model tiny-resnet --a dtype=float32 --b dtype=bfloat16 --device cuda

The verdict ("faster", "slower", "same", "inconclusive") is B's, relative to A.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace

from .common import HelpFormatter, positive_int, print_json
from .latency import DTYPES, add_model_arguments, check_args

SETTINGS = ("model", "batch-size", "dtype")


@dataclass(frozen=True)
class Config:
    """One side of the comparison: which model, at which batch size and dtype."""

    model: str
    batch_size: int
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.model} batch {self.batch_size} {self.dtype}"


def parse_spec(text: str, base: Config, flag: str) -> Config:
    """'batch-size=2,dtype=bfloat16' applied to ``base``; ToolkitError naming ``flag`` on a bad setting."""
    from ..errors import ToolkitError
    from ..models import MODEL_NAMES

    cfg = base
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip().replace("_", "-"), value.strip()
        if not sep or key not in SETTINGS:
            keys = ", ".join(name + "=" for name in SETTINGS)
            raise ToolkitError(f"{flag}: cannot read {part!r}; use comma-separated {keys}")
        if key == "model":
            if value not in MODEL_NAMES:
                raise ToolkitError(f"{flag}: unknown model {value!r}; choose one of: {', '.join(MODEL_NAMES)}")
            cfg = replace(cfg, model=value)
        elif key == "batch-size":
            try:
                cfg = replace(cfg, batch_size=positive_int(value))
            except Exception:
                raise ToolkitError(f"{flag}: batch-size must be an integer >= 1, got {value!r}") from None
        else:
            if value not in DTYPES:
                raise ToolkitError(f"{flag}: dtype must be one of {', '.join(DTYPES)}, got {value!r}")
            cfg = replace(cfg, dtype=value)
    return cfg


def configs(args) -> tuple[Config, Config]:
    """A and B from the shared settings, --a/--b and --model-a/--model-b (checked before anything is built)."""
    check_args(args)
    base = Config(args.model, args.batch_size, args.dtype)
    a = parse_spec(args.a, base, "--a")
    b = parse_spec(args.b, base, "--b")
    if args.model_a:
        a = parse_spec(f"model={args.model_a}", a, "--model-a")
    if args.model_b:
        b = parse_spec(f"model={args.model_b}", b, "--model-b")
    return a, b


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="is B faster than A? (interleaved rounds, ratio with CI, verdict)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(p, max_time_help="cap on the whole comparison in seconds: rounds stop early only when it "
                                         "runs out (default 120)")
    p.add_argument("--a", default="", metavar="SPEC", help="A's settings: model=..,batch-size=..,dtype=.. (default: the shared ones)")
    p.add_argument("--b", default="", metavar="SPEC", help="B's settings, same form")
    p.add_argument("--model-a", default=None, help="A's model (short for --a model=...; default: --model)")
    p.add_argument("--model-b", default=None, help="B's model (short for --b model=...; default: --model)")
    p.add_argument("--rounds", type=positive_int, default=10, help="interleaved rounds")
    p.add_argument("--round-time", type=float, default=0.1, dest="round_time_s",
                   help="seconds per side per round, at least")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin: |B/A - 1| within it is 'same' (default 0.02)")
    p.add_argument("--l2-flush", action="store_true", help="flush the GPU L2 cache before each call")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..env import resolve_device
    from ..errors import ToolkitError
    from ..models import build_model
    from ..timing import EQUIVALENCE_MARGIN, LatencyWarning, compare

    a, b = configs(args)
    margin = EQUIVALENCE_MARGIN if args.margin is None else args.margin
    if not 0 < margin < 1:
        raise ToolkitError(f"--margin must be in (0, 1), got {margin}")
    if args.round_time_s < 0:
        raise ToolkitError(f"--round-time must be >= 0, got {args.round_time_s}")
    device = resolve_device(args.device)
    models = {}
    for cfg in (a, b):
        if (cfg.model, cfg.dtype) not in models:
            models[cfg.model, cfg.dtype] = build_model(cfg.model, device=device, dtype=getattr(torch, cfg.dtype))
    model_a, model_b = models[a.model, a.dtype], models[b.model, b.dtype]
    extra = {} if args.max_time_s is None else {"max_time_s": args.max_time_s}
    from .common import status

    status(f"comparing {a.label} with {b.label} on {device}: warm-up, then {args.rounds} interleaved rounds of each "
           f"(at least {args.round_time_s:g} s of calls per side and round, so at least "
           f"{2 * args.rounds * args.round_time_s:.0f} s)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)  # reported below, with the verdict
        result = compare(model_a, model_b, args_a=model_a.make_input(a.batch_size),
                         args_b=model_b.make_input(b.batch_size), device=device, rounds=args.rounds,
                         round_time_s=args.round_time_s, margin=margin, threads=args.threads, l2_flush=args.l2_flush,
                         label_a=a.label, label_b=b.label, **extra)
    if args.json:
        for w in result.warnings:
            sys.stderr.write(f"warning: {w}\n")
        print_json({"config_a": vars(a), "config_b": vars(b), "device": device, **result.to_dict()})
        return 0
    env = result.a.env
    threads = result.a.options.get("threads")
    print(f"A: {a.label}\nB: {b.label}\non {device} ({env.get('gpu') or env.get('cpu_model')}), "
          f"{threads} thread{'s' if threads != 1 else ''}")
    print(result)
    if result.unreliable:
        print("=> the verdict is unreliable: " + "; ".join(result.unreliable))
    return 0
