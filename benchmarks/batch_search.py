"""Largest batch that fits, throughput curve and optimal batch: efficientnet-b0 and resnet-50, float32 and bfloat16.

Run on the GPU machine (about 3-4 minutes):

    PYTHONPATH=. python benchmarks/batch_search.py --out data/gpu

Smoke test on a CPU: ``--quick --device cpu`` (resnet-50 with 40 MiB of room
for activations: a batch of 2 or so, and ~10 MB per sample, so that the few KB
by which CPU allocations vary between runs cannot move the boundary).

For each model and dtype: the exact largest batch (growth 1, 2, 4, ... then
bisection; every probe with its peak memory and time), a check that the
largest batch fits 3 more times and the next one does not, whether allocated
GPU memory came back to its baseline after every probe (out-of-memory ones
included), the throughput curve at powers of two up to the largest batch, and
the optimal batch (the smallest within 3% of the best). Results are saved after
every probe phase and curve point, so an interruption loses nothing.

A time budget (``--budget-s``) is shared among the configurations: each curve
uses every power of two when the time left allows, else every other one.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

from toolkit.env import resolve_device
from toolkit.models import build_model
from toolkit.results import provenance, save_json
from toolkit.throughput import (
    SIZE_LIMIT,
    curve_batch_sizes,
    find_max_batch_size,
    find_optimal_batch_size,
    throughput_curve,
)

NAME = "batch_search"


def _limited_by(probe) -> str | None:
    """What stopped largest + 1: GPU memory, or a kernel's 32-bit indexing (see toolkit.throughput.SIZE_LIMIT)."""
    if probe is None or probe.fits:
        return None
    return "kernel size limit" if (probe.error or "").startswith(SIZE_LIMIT) else "memory"


def plan_curve(max_batch: int, per_sample_s: float, budget_s: float, max_time_s: float, batches: int) -> list[int]:
    """Powers of two up to max_batch (then of 4, then just 1 and the max) that fit the time budget."""
    for step in (2, 4, 16):
        sizes = curve_batch_sizes(max_batch, 1, step)
        cost = sum(max(max_time_s, batches * b * per_sample_s) for b in sizes)
        if cost <= budget_s:
            return sizes
    return sorted({1, max_batch})


def run_config(rec: dict, save, name: str, dtype: str, device: str, args, budget_s: float) -> None:
    """Search, verify and measure one (model, dtype); fills ``rec`` and saves after each step."""
    t0 = time.perf_counter()
    model = build_model(name, device=device, dtype=getattr(torch, dtype))
    cuda = device.startswith("cuda")
    isolation = ("fresh" if args.fresh_process else "none") if cuda else "process"
    search = find_max_batch_size(model, device=device, max_memory=args.max_memory, headroom=args.headroom,
                                 verify=3, isolation=isolation, progress=True)
    checks = [p for p in search.probes if p.phase == "check"]
    rec.update(
        search=search.to_dict(), max_batch_size=search.max_batch_size,
        largest_reruns_fit=[p.fits for p in checks[:3]],
        largest_plus_one_fits=checks[3].fits if len(checks) > 3 else None,
        largest_fits_and_next_fails=search.verified, memory_at_baseline=search.memory_at_baseline,
        limited_by=_limited_by(checks[3] if len(checks) > 3 else None),
        n_probes={ph: search.count(ph) for ph in ("grow", "bisect", "check")},
        search_s=time.perf_counter() - t0,
    )
    save()
    at_max = [p for p in search.probes if p.fits and p.batch_size == search.max_batch_size]
    per_sample = max((p.seconds or 0) / max(p.passes, 1) for p in at_max) / search.max_batch_size
    batches = args.warmup + args.min_batches
    sizes = plan_curve(search.max_batch_size, per_sample, max(5.0, budget_s - rec["search_s"]), args.max_time,
                       batches)
    rec["curve_sizes"], rec["curve"] = sizes, []

    def on_point(result, row):
        rec["curve"].append(row)
        save()

    curve = throughput_curve(model, sizes, args.n_batches, device=device, progress=True, on_point=on_point,
                             warmup=args.warmup, min_batches=args.min_batches, max_time_s=args.max_time)
    opt = find_optimal_batch_size(curve, args.tolerance)
    rec.update(curve=curve.to_dict("records"), optimal=opt.to_dict(), optimal_batch_size=opt.optimal_batch_size,
               total_s=time.perf_counter() - t0, status="done")
    save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/gpu", help="output folder (writes batch_search.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="one model, a small memory limit: a CPU smoke test")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (--quick: float32)")
    p.add_argument("--max-memory", type=float, default=None, help="memory limit, bytes (default: the whole GPU)")
    p.add_argument("--headroom", type=float, default=None,
                   help="or: bytes allowed above the model's own use (--quick on CPU: 40 MiB)")
    p.add_argument("--n-batches", type=int, default=100)
    p.add_argument("--max-time", type=float, default=None, help="timed seconds per curve point (default 1, quick 0.1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches per curve point (default 2, quick 1)")
    p.add_argument("--min-batches", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--budget-s", type=float, default=200.0, help="time budget shared by all configurations")
    p.add_argument("--fresh-process", action="store_true", help="GPU: every search trial in a new process")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    models = args.models or (["resnet-50"] if args.quick else ["efficientnet-b0", "resnet-50"])
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.quick and not cuda and not args.max_memory:
        args.headroom = args.headroom or 40 * 2**20
    args.max_memory = int(args.max_memory) if args.max_memory else None
    args.headroom = int(args.headroom) if args.headroom else None
    args.max_time = args.max_time if args.max_time is not None else (0.1 if args.quick else 1.0)

    out = Path(args.out) / f"{NAME}.json"
    result = {"benchmark": NAME, "provenance": provenance(device), "device": device,
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "gpu_total_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
              "configs": [], "complete": False}

    def save():
        save_json(result, out)

    configs = [(m, d) for m in models for d in args.dtypes]
    deadline = time.perf_counter() + args.budget_s
    try:
        for i, (name, dtype) in enumerate(configs):
            rec = {"model": name, "dtype": dtype, "status": "running"}
            result["configs"].append(rec)
            share = (deadline - time.perf_counter()) / (len(configs) - i)
            try:
                run_config(rec, save, name, dtype, device, args, share)
            except Exception as e:  # keep the other configurations; the record says what went wrong
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
                print(f"{name} {dtype}: {rec['error']}", file=sys.stderr)
            save()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        result["complete"] = True
    except KeyboardInterrupt:
        result["interrupted"] = True
        save()
        print(f"interrupted; partial results in {out}", file=sys.stderr)
        summary(result)
        return 130
    save()
    summary(result)
    print(f"saved {out}")
    return 0


def summary(result: dict) -> None:
    print(f"\n{'model':<18} {'dtype':<9} {'max batch':>9} {'probes':>14} {'3x ok':>6} {'+1 fails':>8} "
          f"{'baseline':>8} {'optimal':>8} {'best/s':>10} {'largest/s':>10}  limited by")
    for r in result["configs"]:
        if "max_batch_size" not in r:
            print(f"{r['model']:<18} {r['dtype']:<9} {r['status']}: {r.get('error', '')[:60]}")
            continue
        n = r["n_probes"]
        probes = f"{n['grow']}+{n['bisect']}+{n['check']}"
        o = r.get("optimal") or {}
        plus1 = r["largest_plus_one_fits"]
        print(f"{r['model']:<18} {r['dtype']:<9} {r['max_batch_size']:>9} "
              f"{probes:>14} {str(all(r['largest_reruns_fit'])):>6} "
              f"{str(None if plus1 is None else not plus1):>8} {str(r['memory_at_baseline']):>8} "
              f"{o.get('optimal_batch_size', '-'):>8} {_num(o.get('best_samples_per_s')):>10} "
              f"{_num(o.get('largest_samples_per_s')):>10}  {r.get('limited_by') or '-'}")


def _num(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
