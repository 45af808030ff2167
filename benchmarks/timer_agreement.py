"""Does measure_latency agree with torch.utils.benchmark and triton.testing.do_bench? Plus the pitfall audit.

Run on the GPU machine (about 2 minutes):

    PYTHONPATH=. python benchmarks/timer_agreement.py --out data/gpu

Smoke test on a CPU (tiny workloads, no triton): ``--quick --device cpu --threads 1``.

Like is compared with like. ``do_bench`` zeroes a 256 MB buffer before every
call (cold L2), so it is compared with ``measure_latency(l2_flush=True)``;
``Timer.blocked_autorange`` runs back-to-back calls with a warm cache, so it is
compared with ``measure_latency()``. All three take the median. The pitfall
audit runs first, on a freshly built efficientnet-b0, so its no-warm-up row
sees a truly cold model. Results are saved after every workload.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.benchmark import Timer
from tqdm.auto import tqdm

from toolkit.env import resolve_device
from toolkit.models import build_model
from toolkit.pitfalls import audit
from toolkit.results import provenance, save_json
from toolkit.timing import LatencyWarning, measure_latency


def workloads(device: str, quick: bool):
    """(name, description, build() -> zero-argument callable) for each workload; built lazily, one at a time."""

    def model(name, batch):
        def build():
            m = build_model(name, device=device)
            (x,) = m.make_input(batch)
            return lambda: m(x)

        return build

    def matmul(n, dtype):
        def build():
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            return lambda: a @ b

        return build

    def elementwise(n):
        def build():
            x = torch.randn(n, device=device)
            return lambda: x * 2.0  # [n] -> [n]: one read, one write, memory- or launch-bound

        return build

    if quick:
        return [
            ("tiny-efficientnet@1", "tiny EfficientNet, batch 1", model("tiny-efficientnet", 1)),
            ("tiny-efficientnet@8", "tiny EfficientNet, batch 8", model("tiny-efficientnet", 8)),
            ("tiny-resnet@4", "tiny ResNet, batch 4", model("tiny-resnet", 4)),
            ("matmul-256-fp32", "256^3 float32 matmul", matmul(256, torch.float32)),
            ("elementwise-64K", "x * 2 over 2^16 float32", elementwise(2**16)),
        ]
    return [
        ("efficientnet-b0@1", "EfficientNet-b0 224x224 fp32, batch 1", model("efficientnet-b0", 1)),
        ("efficientnet-b0@64", "EfficientNet-b0 224x224 fp32, batch 64", model("efficientnet-b0", 64)),
        ("resnet-50@32", "ResNet-50 224x224 fp32, batch 32", model("resnet-50", 32)),
        ("matmul-4096-bf16", "4096^3 bfloat16 matmul", matmul(4096, torch.bfloat16)),
        # 2^24: ~50 us on an H100, so the ~1 us resolution of CUDA events stays well below the 3% we compare at
        ("elementwise-16M", "x * 2 over 2^24 float32 (64 MB in, 64 MB out)", elementwise(2**24)),
    ]


def summary(result) -> dict:
    """measure_latency's result without the environment (that is in the provenance), samples rounded."""
    d = result.to_dict()
    d.pop("env")
    d["samples_ms"] = [float(f"{x:.6g}") for x in d["samples_ms"]]
    d["warmup"]["samples_ms"] = [float(f"{x:.6g}") for x in d["warmup"]["samples_ms"]]
    return d


def torch_timer(fn, min_run_time: float) -> dict:
    """torch.utils.benchmark: blocks of back-to-back calls, synchronized per block; median of per-call means."""
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "mean_ms": m.mean * 1e3, "iqr_ms": m.iqr * 1e3,
            "calls_per_block": m.number_per_run, "blocks": len(m.times)}


def triton_bench(fn, rep_ms: int) -> dict:
    """triton.testing.do_bench: flushes L2 (256 MB buffer) before each call; events per call; median."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=max(25, rep_ms // 5), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "l2_flush": True}


def triton_status(device: str) -> str | None:
    """None when do_bench can run here, else why not."""
    if not device.startswith("cuda"):
        return "triton.testing.do_bench needs a CUDA GPU"
    try:
        import triton.testing  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton not available ({type(e).__name__}: {e})"
    return None


def rel(a, b):
    return (a - b) / b if (a is not None and b) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/gpu", help="output folder (default data/gpu)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="tiny workloads, short budgets (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two cold-L2 timers (GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every timer (default: torch's)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", LatencyWarning)  # each result's warnings are saved in the JSON
    quick = args.quick
    max_time = 0.3 if quick else 4.0  # per measure_latency call (warm-up and sampling each)
    timer_time = 0.1 if quick else 1.0  # Timer.blocked_autorange min_run_time
    rep_ms = 100 if quick else 1000  # do_bench repetition time
    rounds = 1 if quick else max(1, args.rounds)
    path = Path(args.out) / "timer_agreement.json"
    triton_skip = triton_status(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None

    payload = {
        "provenance": provenance(device, " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])),
        "settings": {"quick": quick, "device": device, "threads": torch.get_num_threads(),
                     "measure_latency_max_time_s": max_time,
                     "torch_timer_min_run_time_s": timer_time, "do_bench_rep_ms": rep_ms, "rounds": rounds,
                     "triton": triton_version, "triton_status": f"skipped: {triton_skip}" if triton_skip else "ok",
                     "compare": "measure_latency(l2_flush=True) vs do_bench (both cold L2); "
                                "measure_latency() vs Timer.blocked_autorange (both warm L2); medians"},
        "pitfall_audit": None,
        "workloads": {},
    }
    t_all = time.perf_counter()

    # 1. the pitfall audit, first: the model must be cold
    audit_name = "tiny-efficientnet" if quick else "efficientnet-b0"
    m = build_model(audit_name, device=device)
    frame = audit(m, m.make_input(1), device, max_time_s=max_time)
    payload["pitfall_audit"] = {"model": audit_name, "batch_size": 1, "rows": frame.to_dict("records"),
                                "correct": summary(frame.attrs["correct"])}
    save_json(payload, path)
    del m

    # 2. the workloads, three (or two) timers each
    for name, desc, build in tqdm(workloads(device, quick), desc="workloads", file=sys.stderr):
        t0 = time.perf_counter()
        fn = build()
        rec = {"description": desc}
        with torch.inference_mode():
            ml = measure_latency(fn, device=device, max_time_s=max_time, label=name)
            rec["measure_latency"] = summary(ml)
            if device.startswith("cuda"):
                # Host-bound workloads drift by a few % over seconds (CPU clocks, other processes), so the
                # two cold-L2 timers alternate in rounds and the medians of the rounds are compared.
                ml_rounds, db_rounds = [], []
                for _ in range(rounds):
                    flushed = measure_latency(fn, device=device, max_time_s=max_time, l2_flush=True, label=name)
                    ml_rounds.append(flushed.median_ms)
                    if not triton_skip:
                        db_rounds.append(triton_bench(fn, rep_ms))
                rec["measure_latency_l2_flush"] = summary(flushed)  # the last round's full result
                rec["measure_latency_l2_flush"]["round_medians_ms"] = ml_rounds
                rec["measure_latency_l2_flush"]["median_of_rounds_ms"] = statistics.median(ml_rounds)
                try:
                    graph = measure_latency(fn, device=device, max_time_s=max_time, cuda_graph=True, label=name)
                    rec["measure_latency_cuda_graph"] = summary(graph)
                except Exception as e:  # a workload that cannot be captured is a finding, not a crash
                    rec["measure_latency_cuda_graph"] = {"error": f"{type(e).__name__}: {e}"}
            else:
                flushed = None
                rec["measure_latency_l2_flush"] = {"skipped": "L2 flush is GPU-only"}
                rec["measure_latency_cuda_graph"] = {"skipped": "CUDA graphs are GPU-only"}
            rec["torch_timer"] = torch_timer(fn, timer_time)
            if triton_skip:
                rec["do_bench"] = {"skipped": triton_skip}
            elif not device.startswith("cuda"):
                rec["do_bench"] = triton_bench(fn, rep_ms)
            else:
                rec["do_bench"] = dict(db_rounds[-1], round_medians_ms=[d["median_ms"] for d in db_rounds],
                                       median_of_rounds_ms=statistics.median(d["median_ms"] for d in db_rounds))
        db = rec["do_bench"].get("median_of_rounds_ms", rec["do_bench"].get("median_ms"))
        ml_flush = rec["measure_latency_l2_flush"].get("median_of_rounds_ms")
        rec["agreement"] = {
            "l2_flush_vs_do_bench": rel(ml_flush, db) if ml_flush else None,
            "no_flush_vs_torch_timer": rel(ml.median_ms, rec["torch_timer"]["median_ms"]),
        }
        ok = rec["agreement"]["l2_flush_vs_do_bench"]
        rec["agreement"]["within_3pct_of_do_bench"] = None if ok is None else abs(ok) <= 0.03
        rec["elapsed_s"] = time.perf_counter() - t0
        payload["workloads"][name] = rec
        save_json(payload, path)  # partial results survive an interruption
        del fn
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    payload["elapsed_s"] = time.perf_counter() - t_all
    save_json(payload, path)
    print_summary(payload)
    print(f"wrote {path}")
    return 0


def print_summary(payload: dict) -> None:
    def fmt(x, pct=False):
        if x is None:
            return "-"
        return f"{100 * x:+.1f}%" if pct else f"{x:.4g}"

    head = ["workload", "ML flush", "do_bench", "diff", "ML", "Timer", "diff", "ML graph"]
    rows = []
    for name, r in payload["workloads"].items():
        g = r["measure_latency_cuda_graph"].get("median_ms")
        rows.append([name, fmt(r["measure_latency_l2_flush"].get("median_ms")), fmt(r["do_bench"].get("median_ms")),
                     fmt(r["agreement"]["l2_flush_vs_do_bench"], True), fmt(r["measure_latency"]["median_ms"]),
                     fmt(r["torch_timer"]["median_ms"]), fmt(r["agreement"]["no_flush_vs_torch_timer"], True),
                     fmt(g)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("medians in ms (ML = measure_latency)")
    for row in [head, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    a = payload["pitfall_audit"]
    print(f"\npitfall audit, {a['model']} batch 1 (relative error of the naive timer):")
    for row in a["rows"]:
        err = row["relative_error"]
        print(f"  {row['pitfall']:22s} {fmt(err, True) if err == err else 'n/a':>9s}  {row['note']}")


if __name__ == "__main__":
    sys.exit(main())
