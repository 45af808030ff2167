"""`python -m toolkit calibrate`: measure the MoE offload cost model on this machine and save it."""

from __future__ import annotations

import sys

from .common import HelpFormatter, add_device_argument, plural, positive_int, print_json


def register(subparsers) -> None:
    from ..moe.presets import PRESETS

    p = subparsers.add_parser("calibrate", help="measure CPU / GPU / copy costs of one expert (MoE offloading)",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b",
                   help=f"MoE preset whose expert dims to measure: {', '.join(PRESETS)}")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="layers for the per-token estimate (default: the preset's)")
    add_device_argument(p)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for CPU experts "
                   "(default: physical cores - 1)")
    p.add_argument("--tokens", default="1,8,32,128", help="comma-separated token counts to time")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per point (their median is kept)")
    p.add_argument("--no-scaling", action="store_true", help="skip the CPU thread-scaling sweep")
    p.add_argument("--out", default=None, help="calibration file (default: the per-machine cache)")
    p.add_argument("--reuse", action="store_true", help="reuse a saved calibration instead of measuring again")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=run)


def _thread_counts(cores: int) -> tuple[int, ...]:
    counts = {1, 2, 4, 8, 12, 16, 24, 32, 48, 64, cores - 1, cores}
    return tuple(sorted(c for c in counts if 1 <= c <= cores))


def run(args) -> int:
    import numpy as np

    from ..env import environment, physical_cores, resolve_device
    from ..errors import ToolkitError
    from ..moe.costs import cache_path, calibrate
    from ..moe.presets import from_name

    preset = from_name(args.preset, args.layers)
    try:
        tokens = tuple(sorted({int(t) for t in args.tokens.split(",") if t.strip()}))
    except ValueError:
        raise ToolkitError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    if not tokens or min(tokens) < 1:
        raise ToolkitError(f"--tokens must be positive integers, got {args.tokens!r}")
    if args.out:
        from ..results import check_writable

        check_writable(args.out, "--out")  # before the measurement, not after it
    device = resolve_device(args.device)
    sys.stderr.write(f"calibrating one {preset.name} expert (D={preset.hidden}, I={preset.intermediate}, "
                     f"{str(preset.dtype).removeprefix('torch.')}) on {device}...\n")
    model = calibrate(preset.hidden, preset.intermediate, preset.dtype, device, args.threads, tokens=tokens,
                      repeats=args.repeats, thread_counts=None if args.no_scaling else _thread_counts(physical_cores()),
                      path=args.out, reuse=args.reuse)
    # per-token estimate for batch-1 decode when every active expert misses (top-k per layer, 1 token each)
    miss = np.ones(preset.top_k, dtype=np.int64)
    split = model.decide(miss)
    per_layer = model.layer_makespan(miss, split)
    out = {
        "preset": preset.name, "layers": preset.layers, "device": device, "file": str(args.out or cache_path()),
        "cost_model": model.to_dict(),
        "decode_all_missed": {"experts_copied_per_layer": int(split.sum()), "layer_ms": per_layer,
                              "token_ms": per_layer * preset.layers},
        "env": environment(device, model.cpu_threads),
    }
    if args.json:
        print_json(out)
        return 0
    cuda = device.startswith("cuda")
    if cuda:
        print(model.summary())
    else:  # no GPU: the GPU and copy costs would be host-memory copies and CPU compute under other names
        a, b = model.cpu_fit
        print(f"CPU expert ({model.cpu_dtype}, {plural(model.cpu_threads, 'thread')}): {a:.3f} + {b:.4f}*n ms "
              "for n tokens (no GPU here, so no GPU or copy costs)")
    print(f"CPU dtype chosen: {model.cpu_dtype}  (ms at n={list(model.cpu_tokens)}: "
          + ", ".join(f"{k}: {[round(v, 3) for v in vals]}" for k, vals in model.cpu_ms_by_dtype.items()) + ")")
    if model.host_bandwidth_gbs:
        both = (f"; CPU experts and copies at once: {model.host_paths_gbs:.1f} GB/s" if model.host_paths_gbs
                else "")
        print(f"host memory read bandwidth: {model.host_bandwidth_gbs:.1f} GB/s ({model.cpu_threads} threads){both}")
    if model.thread_scaling:
        print("CPU threads -> ms (one expert, one token): "
              + ", ".join(f"{t}: {ms:.2f}" for t, ms in sorted(model.thread_scaling.items())))
    copied = f"{split.sum()} of {preset.top_k} copied per layer, " if cuda else ""
    print(f"batch-1 decode, every expert missed: {copied}{per_layer:.3g} ms/layer, "
          f"{per_layer * preset.layers:.3g} ms/token over {plural(preset.layers, 'layer')}")
    print(f"saved to {out['file']}")
    return 0
