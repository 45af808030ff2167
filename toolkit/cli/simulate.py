"""`python -m toolkit simulate`: hit rate and bytes copied for a routing trace, a policy and a GPU expert budget."""

from __future__ import annotations

import argparse
import sys

from .common import HelpFormatter, nonnegative_int, plural, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="hit rate of a placement/caching policy on a routing trace (no GPU)",
                              description=__doc__.split(": ", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--trace", default="synthetic-mixtral",
                   help="trace name (synthetic-mixtral, synthetic-mixtral-instruct) or .npz path")
    p.add_argument("--policy", default="lru",
                   help="static-popularity, static-uniform, lru, lfu, belady; comma-separated or 'all' with --sweep")
    p.add_argument("--gpu-experts", type=nonnegative_int, default=64, action=_Given,
                   help="GPU expert budget over all layers (ignored with --sweep; left out with "
                        "--devices-budget: the sum of those)")
    p.add_argument("--devices-budget", type=_count_list, default=None, metavar="N,N,...",
                   help="several GPUs: at most this many experts per GPU, e.g. 14,14; also splits the hits over "
                        "the GPUs as the engine places experts (static policies only)")
    p.add_argument("--sweep", action="store_true", help="every budget from 0 to layers x experts in steps of layers (or those of --budgets)")
    p.add_argument("--budgets", type=_int_list, help="explicit budgets for --sweep, e.g. 0,32,64,128")
    p.add_argument("--per-layer", action="store_true", help="also print per-layer hit rates")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run, gpu_experts_given=False)


class _Given(argparse.Action):
    """Store the value and note that the user gave it: only a default budget yields to --devices-budget."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.gpu_experts_given = True


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"budgets must be non-negative integers, got {text!r}")
    return values


def _count_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts, one per GPU, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected counts >= 0, one per GPU, got {text!r}")
    return values


def run(args) -> int:
    from ..errors import ToolkitError
    from ..moe.policies import POLICY_NAMES
    from ..moe.simulate import simulate, sweep
    from ..moe.trace_catalog import load_trace

    trace = load_trace(args.trace)
    policies = list(POLICY_NAMES) if args.policy == "all" else [p.strip() for p in args.policy.split(",") if p.strip()]
    if not policies:
        raise ToolkitError("--policy is empty")
    devices = {} if args.devices_budget is None else {"devices_budget": args.devices_budget}
    if args.sweep or args.budgets:
        results = sweep(trace, policies, args.budgets, **devices).results
    else:
        gpu_experts = None if devices and not args.gpu_experts_given else args.gpu_experts
        results = tuple(simulate(trace, p, gpu_experts, **devices) for p in policies)

    if args.json:
        if len(results) == 1:
            print_json(results[0].to_dict())
        else:
            print_json({"trace": args.trace, "results": [r.to_dict() for r in results]})
        return 0
    out = sys.stdout
    n_pre = int((trace.phase == 0).sum())
    out.write(f"trace {args.trace}: {plural(trace.n_tokens, 'token')} ({n_pre} prefill) in "
              f"{plural(trace.n_steps, 'forward pass', 'forward passes')}, {plural(trace.n_layers, 'layer')} x "
              f"{plural(trace.n_experts, 'expert')}, top-{trace.top_k}\n")
    out.write(f"{'policy':<18} {'gpu_experts':>11} {'prefill':>8} {'decode':>8} {'total':>8} "
              f"{'copies':>9} {'GB copied':>10}\n")
    for r in results:
        gb = "-" if r.bytes_copied is None else f"{r.bytes_copied / 1e9:.1f}"
        out.write(f"{r.policy:<18} {r.gpu_experts:>11} {_fmt(r.hit_rate('prefill'))} {_fmt(r.hit_rate('decode'))} "
                  f"{_fmt(r.hit_rate())} {r.n_loads:>9} {gb:>10}\n")
        if args.per_layer:
            out.write("  per layer: " + " ".join(f"{v:.2f}" for v in r.per_layer()) + "\n")
        if r.device_hits is not None:
            out.write("  by GPU: " + " | ".join(
                f"{d['device']}: {d['experts']}/{d['budget']} experts, {d['rows']} hit rows"
                + (f" ({d['share']:.1%})" if d["share"] == d["share"] else "") for d in r.devices_dict()) + "\n")
    return 0


def _fmt(v: float) -> str:
    return f"{v:>8.3f}" if v == v else f"{'-':>8}"
