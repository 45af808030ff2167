"""`python -m toolkit pitfalls`: how wrong each classic timing mistake is, on this machine."""

from __future__ import annotations

import sys
import warnings

from .common import HelpFormatter, print_json, text_table
from .latency import add_model_arguments, build


def register(subparsers) -> None:
    p = subparsers.add_parser("pitfalls", help="naive timers vs the correct one (audit table)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(p, max_time_help="sampling time cap of the correct timer in seconds (default 5 on a GPU, 2 "
                                         "on a CPU); the naive timers add a few calls each")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pitfalls import audit
    from ..timing import LatencyWarning, warning_lines

    model, inputs, device = build(args)
    from .common import status

    status(f"auditing the timing mistakes on {args.model} ({device}): the correct timer, then each naive one "
           f"(about half a minute on a CPU, less on a GPU)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)  # reported below, next to the numbers
        frame = audit(model, inputs, device, max_time_s=args.max_time_s, threads=args.threads)
    correct = frame.attrs["correct"]
    lines = warning_lines(frame)
    if args.json:
        for w in lines:  # in the JSON too; stderr so that a terminal shows them
            sys.stderr.write(f"warning: {w}\n")
        print_json({"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype, "device": device,
                    "threads": frame.attrs.get("threads"), "reliable": not correct.unreliable, "warnings": lines,
                    "pitfalls": frame.to_dict("records"), "correct": correct.to_dict()})
        return 0
    threads = frame.attrs.get("threads")
    flag = "  <- UNRELIABLE: the errors below are not trustworthy" if correct.unreliable else ""
    print(f"{args.model}, batch {args.batch_size}, {args.dtype} on {device}"
          f"{f', {threads} thread' + ('s' if threads != 1 else '') if threads else ''}:"
          f" correct median {correct.median_ms:.4g} ms (n={correct.n_samples}){flag}")
    for w in lines:
        print(f"WARNING: {w}")
    print(format_audit(frame))
    return 0


def format_audit(frame) -> str:
    """The audit as a table to read: plain names, times in ms, errors in percent, "not applicable" said in words."""
    from ..formatting import fmt, is_missing
    from ..pitfalls import CPU_NA
    from ..plots import PITFALL_LABELS

    rows = []
    for r in frame.to_dict("records"):
        if r["note"] == CPU_NA:
            rows.append([PITFALL_LABELS.get(r["pitfall"], r["pitfall"]), "-", "-", CPU_NA, ""])
            continue
        error = "n/a" if is_missing(r["relative_error"]) else f"{100 * r['relative_error']:+.1f}%"
        rows.append([PITFALL_LABELS.get(r["pitfall"], r["pitfall"]), f"{fmt(r['naive_ms'], '.4g')} ms",
                     f"{fmt(r['correct_ms'], '.4g')} ms", error + ("" if r["reliable"] else " (unreliable)"),
                     r["note"] or ""])
    return text_table(["mistake", "naive reading", "correct", "error", "how the naive reading was taken"], rows,
                      right={1, 2})
