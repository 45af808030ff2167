"""`python -m toolkit throughput`: the largest batch that fits, the throughput curve, and the optimal batch."""

from __future__ import annotations

import sys

from .common import HelpFormatter, add_device_argument, parse_bytes, plural, positive_int, print_json

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    from ..models import MODEL_NAMES

    p = subparsers.add_parser("throughput", help="largest batch that fits, samples/s vs batch size, optimal batch",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="resnet-50", help=f"benchmark model: {', '.join(MODEL_NAMES)}")
    add_device_argument(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and inputs")
    p.add_argument("--max-memory", type=parse_bytes, default=None,
                   help="memory limit for the search, e.g. 4GiB (CPU default: the memory available now, for the "
                        "whole trial process; GPU default: the whole GPU)")
    p.add_argument("--min-batch", type=positive_int, default=1, help="first batch size tried")
    p.add_argument("--max-batch", type=positive_int, default=None, help="optional upper bound of the search (default: none)")
    p.add_argument("--n-batches", type=positive_int, default=100, help="timed batches per curve point, at most")
    p.add_argument("--max-time", type=float, default=None, dest="max_time_s",
                   help="cap on each curve point's timed region, seconds (default 5 on a GPU, 0.5 on a CPU)")
    p.add_argument("--curve-step", type=int, default=None,
                   help="curve at min, min*step, min*step^2, ..., max (default 2 on a GPU, 4 on a CPU)")
    p.add_argument("--tolerance", type=float, default=0.03, help="optimal = smallest batch within this of the best")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="re-run the largest batch N times and try largest+1 once (default: 0, no check)")
    p.add_argument("--time-budget", type=float, default=None, dest="time_budget_s", metavar="SECONDS",
                   help="time budget of the whole command: the batch search starts no trial that would leave "
                        "the throughput curve too little of it, and reports the bounds found so far, marked as not "
                        "exact (default: no budget, the exact answer)")
    p.add_argument("--fresh-process", action="store_true", help="run every search trial in a new process")
    p.add_argument("--out", default=None, help="also save the JSON result (with provenance) to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def _check(args) -> None:
    from ..errors import ToolkitError
    from ..models import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        raise ToolkitError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if args.max_batch is not None and args.min_batch > args.max_batch:
        raise ToolkitError(f"batch bounds reversed: --min-batch {args.min_batch} > --max-batch {args.max_batch}")
    if args.max_time_s is not None and not args.max_time_s > 0:  # NaN too
        raise ToolkitError(f"--max-time must be positive, got {args.max_time_s}")
    if args.curve_step is not None and args.curve_step < 2:
        raise ToolkitError(f"--curve-step must be >= 2, got {args.curve_step}")
    if not 0 <= args.tolerance < 1:
        raise ToolkitError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    if args.verify < 0:
        raise ToolkitError(f"--verify must be >= 0, got {args.verify}")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        raise ToolkitError(f"--time-budget must be positive, got {args.time_budget_s}")
    if args.out:
        from ..results import check_writable

        check_writable(args.out, "--out")  # before the search, not after it


def run(args) -> int:
    from ..results import provenance, save_json
    from ..throughput import measure_model_throughput

    _check(args)

    def save(measured) -> None:  # partial results as they come (a Ctrl-C keeps them), then the final one
        if args.out:
            save_json({**measured.to_dict(), "provenance": provenance(measured.device)}, args.out)

    measured = measure_model_throughput(
        args.model, device=args.device, dtype=args.dtype, max_memory=args.max_memory, min_batch=args.min_batch,
        max_batch=args.max_batch, n_batches=args.n_batches, max_time_s=args.max_time_s, curve_step=args.curve_step,
        tolerance=args.tolerance, verify=args.verify, fresh_process=args.fresh_process,
        time_budget_s=args.time_budget_s, progress=True, on_update=save)
    result = measured.to_dict()
    try:  # printed first, then saved: a failed save loses nothing on screen; saved even if Ctrl-C hits the printing
        if args.json:
            print_json(result)
        else:
            _print_tables(result, measured.search, measured.optimal)
    finally:
        save(measured)
    return 0


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _print_tables(result: dict, search, opt) -> None:
    from ..formatting import fmt, is_missing

    limit = f", limit {_mib(search.max_memory)}" if search.max_memory else ""
    print(f"{result['model']} ({result['dtype']}) on {result['device']}{limit}, trials: {search.isolation}")
    if not result["device"].startswith("cuda"):
        print("(CPU: peak = resident memory of the trial process; the limit counts its data segment, which is larger)")
    print(f"{'phase':<7} {'batch':>8} {'fits':>5} {'peak':>12} {'time':>8}  note")
    for p in search.probes:
        note = p.error or ("" if p.memory_at_baseline in (True, None) else "memory not back at baseline")
        print(f"{p.phase:<7} {p.batch_size:>8} {'yes' if p.fits else 'no':>5} {_mib(p.peak_bytes):>12} "
              f"{p.seconds or 0:>7.2f}s  {note[:60]}")
    bound = " (the --max-batch bound; the limit may be higher)" if search.bounded else ""
    if not search.exact:
        above = (f", {search.upper_bound} does not" if search.upper_bound else
                 ", no batch failed yet (the limit may be much higher)")
        bound = (f" -- NOT EXACT: the time budget of {search.time_budget_s:g} s allowed "
                 f"{plural(len(search.probes), 'probe')}; {search.max_batch_size} fits{above}")
    at_baseline = {True: "yes", False: "no", None: "not measured on CPU" if not result["device"].startswith("cuda")
                   else "not measured"}[search.memory_at_baseline]
    print(f"max_batch_size: {search.max_batch_size}{bound}")
    print(f"memory back at baseline after every trial: {at_baseline}")
    if search.verified is not None:
        print(f"verified (largest fits again, largest+1 does not): {'yes' if search.verified else 'no'}")
    low, high = search.boundary
    if search.verified is None and not result["device"].startswith("cuda"):
        print("(on a CPU the boundary can move by a fraction of a percent between runs: --verify N re-runs it and "
              "reports the range)")
    if high > low:
        print(f"the boundary moved between trials: {low} fitted every time it ran, batches up to {high} fitted "
              f"in some trials (the probes above are the evidence)")
    print()
    print(f"{'batch':>8} {'samples/s':>12} {'95% CI':>25} {'batches':>8}")
    for r in result["throughput"]:
        lo, hi = r["ci95"]
        ci = "-" if is_missing(lo) else f"{lo:,.1f} .. {'unbounded' if is_missing(hi) else f'{hi:,.1f}'}"
        print(f"{r['batch_size']:>8} {fmt(r['samples_per_s'], ',.1f'):>12} {ci:>25} "
              f"{r['n_batches']:>8}" + (f"  {r['error'][:40]}" if r["error"] else ""))
    print()
    print(f"optimal_batch_size: {opt.optimal_batch_size} ({opt.optimal_samples_per_s:,.1f} samples/s, within "
          f"{100 * opt.tolerance:g}% of the best: {opt.best_samples_per_s:,.1f} at {opt.best_batch_size})")
    largest = "largest batch" if search.exact else "largest batch seen to fit"
    print(f"{largest} {opt.largest_batch_size}: {opt.largest_samples_per_s:,.1f} samples/s "
          f"({100 * (opt.largest_vs_best - 1):+.1f}% vs the best)")
    sys.stdout.flush()
