"""`python -m toolkit latency`: the latency of one benchmark model, measured correctly."""

from __future__ import annotations

import argparse
import sys
import warnings

from .common import add_device_argument, positive_int, print_json

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --batch-size, --device, --dtype, --threads, --max-time (shared with `pitfalls`)."""
    parser.add_argument("--model", default="efficientnet-b0", help="benchmark model (see toolkit.models.MODEL_NAMES)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's current)")
    parser.add_argument("--max-time", type=float, default=None, dest="max_time_s",
                        help="sampling time cap in seconds (default 10 on a GPU, 3 on a CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build(args):
    """Resolve the device and build (model, inputs) from the parsed arguments; ToolkitError on bad input."""
    import torch

    from ..env import resolve_device
    from ..errors import ToolkitError
    from ..models import MODEL_NAMES, build_model

    if args.model not in MODEL_NAMES:  # before resolving the device: the cheaper, likelier mistake first
        raise ToolkitError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if args.max_time_s is not None and args.max_time_s <= 0:
        raise ToolkitError(f"--max-time must be positive, got {args.max_time_s}")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, device=device, dtype=dtype)
    return model, model.make_input(args.batch_size), device


def register(subparsers) -> None:
    p = subparsers.add_parser("latency", help="latency of one model call (median with a 95%% CI)",
                              description=__doc__)
    add_model_arguments(p)
    p.add_argument("--target-ci", type=float, default=0.01, help="relative half-width of the median's 95%% CI")
    p.add_argument("--l2-flush", action="store_true", help="flush the GPU L2 cache before each call")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..timing import LatencyWarning, measure_latency

    model, inputs, device = build(args)
    max_time = args.max_time_s if args.max_time_s is not None else (10.0 if device.startswith("cuda") else 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)  # reported below, one line each
        result = measure_latency(model, *inputs, device=device, max_time_s=max_time, target_rel_ci=args.target_ci,
                                 l2_flush=args.l2_flush, cuda_graph=args.cuda_graph, threads=args.threads,
                                 label=args.model)
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
