"""`python -m toolkit sweep`: a grid of one measurement, one job per point (this host or Slurm), one file per point.

Example: python -m toolkit sweep moe --set preset=tiny-mixtral --set layers=2 --grid gpu_experts=0,8,16
--grid policy=lru,static-popularity --out sweeps/budgets. Running the same command again skips the
finished points and retries the failed ones.
"""

from __future__ import annotations

import argparse
import sys

from .common import HelpFormatter, positive_int, print_json


def _key_value(text: str) -> tuple[str, object]:
    """'account=abc' -> ('account', 'abc'); 'exclusive=true' -> True and digits -> int, as sbatch flags need."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value = value.strip()
    literal = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return key.strip().replace("-", "_"), literal


def register(subparsers) -> None:
    from ..sweep import EXECUTORS, KINDS

    p = subparsers.add_parser("sweep", help="a grid of latency/throughput/moe/simulate runs, one job per point",
                              description=__doc__.split(": ", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("kind", nargs="?", choices=KINDS, help="the measurement each point runs")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="an axis: the measurement's argument NAME takes each value (repeat for more axes)")
    p.add_argument("--set", action="append", default=[], dest="fixed", metavar="NAME=VALUE",
                   help="an argument held fixed over the grid (its defaults are the command's own)")
    p.add_argument("--spec", default=None, metavar="FILE",
                   help="run the grid of a sweep.json (as written into an --out directory) instead of KIND/--grid/--set")
    p.add_argument("--out", default=None, metavar="DIR", help="the sweep directory (one JSON file per point)")
    p.add_argument("--params", action="store_true", help="list KIND's arguments and defaults, then exit")
    p.add_argument("--dry-run", action="store_true", help="check the grid and list its points, then exit")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: one process per point on this host (default); slurm: one job array; inline: here")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="local, no GPU: points run at once (default 1: CPU timings run alone)")
    p.add_argument("--gpus", default=None, metavar="0,1,...",
                   help="local: the GPUs to use, one point per GPU at a time (default: every visible GPU)")
    p.add_argument("--no-pin", action="store_true", help="local: do not give concurrent points disjoint CPU cores")
    p.add_argument("--slurm-partition", default=None, help="Slurm partition to submit to (default: the cluster's)")
    p.add_argument("--slurm-time", type=positive_int, default=60, metavar="MIN", help="Slurm: time limit of one point in minutes")
    p.add_argument("--gpus-per-job", type=int, default=None,
                   help="GPUs per Slurm job (default 1 when the points use a GPU, else 0)")
    p.add_argument("--cpus-per-job", type=positive_int, default=None, help="CPUs per Slurm job (default: Slurm's)")
    p.add_argument("--array-parallelism", type=positive_int, default=None,
                   help="Slurm: at most this many points running at once")
    p.add_argument("--slurm-param", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="any other sbatch setting submitit knows (account=abc, qos=high, constraint=h100, ...)")
    p.add_argument("--slurm-setup", action="append", default=[], metavar="COMMAND",
                   help="a shell line each job runs first (module load ..., source .venv/bin/activate)")
    p.add_argument("--json", action="store_true", help="print the sweep's rows as JSON")
    p.set_defaults(func=run)


def build_spec(args):
    from ..errors import ToolkitError
    from ..results import load_json
    from ..sweep import SweepSpec

    if args.spec:
        if args.kind or args.grid or args.fixed:
            raise ToolkitError("--spec replaces KIND, --grid and --set: give one or the other")
        return SweepSpec.from_dict(load_json(args.spec))
    if not args.kind:
        raise ToolkitError("name the measurement (latency, throughput, moe, simulate) or give --spec")
    return SweepSpec.from_strings(args.kind, args.fixed, args.grid)


def run(args) -> int:
    from ..errors import ToolkitError
    from ..sweep import SweepInterrupted, get_kind, load_sweep, point_status, run_sweep

    if args.params:
        if not args.kind:
            raise ToolkitError("--params needs KIND")
        for p in get_kind(args.kind).params:
            print(f"{p.name:<16} {p.annotation:<14} default {p.default!r}")
        return 0
    spec = build_spec(args)
    points = spec.check()
    if args.dry_run:
        for p in points:
            state = f"  [{point_status(args.out, p.id) or 'to run'}]" if args.out else ""
            print(f"{p.id}  {p.label}{state}")
        print(spec.command_line())
        return 0
    if not args.out:
        raise ToolkitError("--out DIR is required: the sweep's files go there")
    gpus = None if args.gpus is None else [g.strip() for g in args.gpus.split(",") if g.strip()]
    try:
        result = run_sweep(spec, args.out, args.executor, gpus=gpus, parallel=args.parallel, pin_cpus=not args.no_pin,
                           slurm_partition=args.slurm_partition, slurm_time_min=args.slurm_time,
                           gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                           array_parallelism=args.array_parallelism,
                           slurm_options={**dict(args.slurm_param), **({"setup": args.slurm_setup}
                                                                       if args.slurm_setup else {})},
                           progress=True)
    except SweepInterrupted as e:
        sys.stderr.write(f"interrupted: {e.finished} of {e.total} points finished, kept in {e.out_dir}/points; "
                         f"run the same command again to measure the rest\n")
        return 130
    frame = load_sweep(args.out)
    for _, row in frame[frame["status"] == "error"].iterrows():
        sys.stderr.write(f"failed: {row['id']}: {str(row['error']).splitlines()[0]}\n")
    if args.json:
        print_json({"out": str(result.out_dir), "kind": spec.kind, "points": len(result.statuses),
                    "ran": result.count("ok"), "skipped": result.count("skipped"), "failed": result.count("error"),
                    "rows": frame.to_dict("records")})
    else:
        print(_table(frame))
        print(f"{len(result.statuses)} points: {result.count('ok')} ran, {result.count('skipped')} finished before, "
              f"{result.count('error')} failed -> {result.out_dir}")
    return 1 if result.failed else 0


def _table(frame) -> str:
    import pandas as pd

    shown = frame.drop(columns=[c for c in ("id", "error", "host") if c in frame.columns])
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        return shown.to_string(index=False)
