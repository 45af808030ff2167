"""`python -m toolkit report`: run the default experiments on this machine and write results, figures and a summary."""

from __future__ import annotations

import sys

from .common import HelpFormatter, add_device_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="the main job: default experiments -> JSON, figures, summary.md",
                              description=__doc__.split(": ", 1)[1], formatter_class=HelpFormatter)
    add_device_argument(p)
    p.add_argument("--out", default="report", help="output folder")
    p.add_argument("--quick", action="store_true", help="smallest settings (CI): about a minute on a CPU")
    p.add_argument("--only", default=None,
                   help="comma-separated experiments to run (timing, batch, moe, simulation; default all)")
    p.add_argument("--recorded", default=None, help="folder of recorded GPU results (default: data/gpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ToolkitError
    from ..report import run_report
    from ..results import check_writable

    only = None if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    if only == []:
        raise ToolkitError(f"--only names no experiment ({args.only!r}); give e.g. --only timing,simulation")
    check_writable(args.out, "--out", folder=True)
    command = " ".join(["python -m toolkit", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith(
        ("__main__.py", "toolkit")) else None
    result = run_report(args.out, device=args.device, quick=args.quick, experiments=only,
                        progress=not args.no_progress, recorded=args.recorded, command=command)
    out = sys.stdout
    out.write(f"{'experiment':<12} {'status':<10} {'seconds':>8}\n")
    for name, seconds in result.seconds.items():
        status = "failed" if name in result.errors else "ok"
        out.write(f"{name:<12} {status:<10} {seconds:8.1f}\n")
    for name, err in result.errors.items():
        out.write(f"  {name}: {err}\n")
    n_fig = len(result.figures)
    out.write(f"{n_fig} figures (PNG + PDF) in {result.out / 'figures'}\n")
    out.write(f"summary: {result.out / 'summary.md'}\n")
    return 1 if result.errors else 0
