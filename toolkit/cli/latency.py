"""`python -m toolkit latency`: the latency of one benchmark model, measured correctly."""

from __future__ import annotations

import argparse
import sys
import warnings

from .common import HelpFormatter, add_device_argument, positive_int, print_json

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser,
                        max_time_help: str = "sampling time cap in seconds (default 10 on a GPU, 3 on a CPU)") -> None:
    """--model, --batch-size, --device, --dtype, --threads, --max-time (shared with `pitfalls`)."""
    from ..models import MODEL_NAMES

    parser.add_argument("--model", default="efficientnet-b0", help=f"benchmark model: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="samples per call")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and inputs")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default on a CPU: chosen from the physical cores and the current load)")
    parser.add_argument("--max-time", type=float, default=None, dest="max_time_s", help=max_time_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def check_args(args) -> None:
    """ToolkitError naming the flag for a bad --model or --max-time (before anything is built)."""
    from ..errors import ToolkitError
    from ..models import MODEL_NAMES

    if args.model not in MODEL_NAMES:  # before resolving the device: the cheaper, likelier mistake first
        raise ToolkitError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if args.max_time_s is not None and args.max_time_s <= 0:
        raise ToolkitError(f"--max-time must be positive, got {args.max_time_s}")


def build(args):
    """Resolve the device and build (model, inputs) from the parsed arguments; ToolkitError on bad input."""
    import torch

    from ..env import resolve_device
    from ..models import build_model

    check_args(args)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, device=device, dtype=dtype)
    return model, model.make_input(args.batch_size), device


def register(subparsers) -> None:
    p = subparsers.add_parser("latency", help="latency of one model call (median with a 95%% CI)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target-ci", type=float, default=0.01, help="stop sampling once the median's 95%% CI is within this fraction of it")
    p.add_argument("--l2-flush", action="store_true", help="flush the GPU L2 cache before each call")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..timing import LatencyWarning, measure_model_latency

    check_args(args)
    from ..env import resolve_device
    from .common import status

    resolve_device(args.device)  # a bad --device is one error line, before the status line

    cap = "10 s on a GPU, 3 s on a CPU" if args.max_time_s is None else f"{args.max_time_s:g} s"
    status(f"measuring {args.model}, batch {args.batch_size}: build, then warm-up and sampling "
           f"(at least 0.5 s of samples; each phase at most {cap})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)  # reported below, one line each
        result = measure_model_latency(args.model, args.batch_size, device=args.device, dtype=args.dtype,
                                       threads=args.threads, max_time_s=args.max_time_s,
                                       target_rel_ci=args.target_ci, l2_flush=args.l2_flush,
                                       cuda_graph=args.cuda_graph)
    device = result.device
    if args.json:
        for w in result.warnings:  # the table shows them; JSON keeps stdout clean
            sys.stderr.write(f"warning: {w}\n")
        print_json({"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype, **result.to_dict()})
        return 0
    env = result.env
    where = env.get("gpu") or env.get("cpu_model")
    print(f"{args.model}, batch {args.batch_size}, {args.dtype} on {device} ({where})")
    print(result)
    return 0
