"""`python -m toolkit pitfalls`: how wrong each classic timing mistake is, on this machine."""

from __future__ import annotations

import sys
import warnings

from .common import print_json
from .latency import add_model_arguments, build


def register(subparsers) -> None:
    p = subparsers.add_parser("pitfalls", help="naive timers vs the correct one (audit table)",
                              description=__doc__)
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import pandas as pd

    from ..pitfalls import audit
    from ..timing import LatencyWarning

    model, inputs, device = build(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)  # reported below, one line each
        frame = audit(model, inputs, device, max_time_s=args.max_time_s, threads=args.threads)
    correct = frame.attrs["correct"]
    for w in correct.warnings:
        sys.stderr.write(f"warning: correct timer: {w}\n")
    if args.json:
        print_json({"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype, "device": device,
                    "pitfalls": frame.to_dict("records"), "correct": correct.to_dict()})
        return 0
    print(f"{args.model}, batch {args.batch_size}, {args.dtype} on {device}:"
          f" correct median {correct.median_ms:.4g} ms (n={correct.n_samples})")
    with pd.option_context("display.max_colwidth", 90, "display.width", 200, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False))
    return 0
