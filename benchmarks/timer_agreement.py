"""Does measure_latency agree with triton.testing.do_bench and torch.utils.benchmark, run after run? Plus the pitfall audit.

Run on the GPU machine (about 2-3 minutes on an H200):

    PYTHONPATH=. python benchmarks/timer_agreement.py --out data/gpu

Smoke test on a CPU (tiny workloads, no triton, short budgets): ``--quick --device cpu --threads 1``.

Like is compared with like. ``do_bench`` zeroes a 256 MB buffer before every
call (cold L2) and queues its calls without waiting, so the host runs ahead of
the GPU and the events time the GPU's work; it is compared with
``measure_latency(l2_flush=True, hide_launch=True)``, whose spin kernel holds
the GPU while the host launches (nvbench's blocking kernel). Where the host
cannot run ahead (a launch-bound model at batch 1) ``do_bench`` times the
launches instead and the two differ by design. Compute-bound kernels can also
read a few % faster here than in ``do_bench``: timed one at a time they run at
the top SM clock, while ``do_bench``'s back-to-back calls hold the GPU at its
power limit; the table shows the SM clock each measurement saw. ``Timer.blocked_autorange``
runs back-to-back calls with a warm cache, so it is compared with
``measure_latency()`` (launch included). All take the median. The cold-L2 pair is
measured in 3 alternating rounds (ML, DB / DB, ML / ML, DB), so a drift of the
GPU's state hits both, and the medians of the rounds are compared: the table
ends with whether every workload is within 2% of do_bench and whether each
timer's 3 rounds agree within 1% (the repeatability measure_latency's minimum
sampling time is there for).

Workloads: whole models (EfficientNet-b0, ResNet-50), a bf16 matmul, causal
attention (SDPA, bf16), a LayerNorm, a convolution, a transformer encoder layer
(fp16), a memory-bound elementwise op and a launch-bound tiny kernel. The
pitfall audit runs first, on a freshly built efficientnet-b0, so its
no-warm-up row sees a truly cold model. Results are saved after every workload.
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
    import torch.nn.functional as F

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

    def causal_attention(b, h, t, d, dtype):
        def build():
            q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype) for _ in range(3))  # [B, H, T, D]
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]

        return build

    def layer_norm(rows, d, dtype):
        def build():
            x = torch.randn(rows, d, device=device, dtype=dtype)  # [N, D]
            w = torch.ones(d, device=device, dtype=dtype)
            bias = torch.zeros(d, device=device, dtype=dtype)
            return lambda: F.layer_norm(x, (d,), w, bias)  # [N, D]

        return build

    def conv(b, c, hw, dtype):
        def build():
            x = torch.randn(b, c, hw, hw, device=device, dtype=dtype)  # [B, C, H, W]
            w = torch.randn(c, c, 3, 3, device=device, dtype=dtype) * 0.05  # [C_out, C_in, 3, 3]
            return lambda: F.conv2d(x, w, padding=1)  # [B, C, H, W]

        return build

    def encoder(b, t, d, heads, dtype):
        def build():
            layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, batch_first=True)
            layer = layer.to(device=device, dtype=dtype).eval()
            x = torch.randn(b, t, d, device=device, dtype=dtype)  # [B, T, D]
            return lambda: layer(x)  # [B, T, D]

        return build

    def tiny_kernel():
        def build():
            x = torch.zeros(1, device=device)
            return lambda: x + 1  # one element: nothing but the launch

        return build

    low = torch.float32 if device == "cpu" else torch.bfloat16
    half = torch.float32 if device == "cpu" else torch.float16
    if quick:
        return [
            ("tiny-efficientnet@1", "tiny EfficientNet, batch 1", model("tiny-efficientnet", 1)),
            ("tiny-resnet@4", "tiny ResNet, batch 4", model("tiny-resnet", 4)),
            ("matmul-256-fp32", "256^3 float32 matmul", matmul(256, torch.float32)),
            ("sdpa-causal-tiny", "causal SDPA [1, 4, 128, 32]", causal_attention(1, 4, 128, 32, low)),
            ("layernorm-tiny", "LayerNorm [256, 512]", layer_norm(256, 512, half)),
            ("conv3x3-tiny", "3x3 conv [1, 16, 32, 32]", conv(1, 16, 32, half)),
            ("encoder-tiny", "transformer encoder layer d=64, [2, 32, 64]", encoder(2, 32, 64, 4, half)),
            ("elementwise-64K", "x * 2 over 2^16 float32", elementwise(2**16)),
            ("tiny-kernel", "x + 1 on one element (launch-bound)", tiny_kernel()),
        ]
    return [
        ("efficientnet-b0@1", "EfficientNet-b0 224x224 fp32, batch 1", model("efficientnet-b0", 1)),
        ("efficientnet-b0@64", "EfficientNet-b0 224x224 fp32, batch 64", model("efficientnet-b0", 64)),
        ("resnet-50@32", "ResNet-50 224x224 fp32, batch 32", model("resnet-50", 32)),
        ("matmul-4096-bf16", "4096^3 bfloat16 matmul", matmul(4096, torch.bfloat16)),
        ("sdpa-causal-bf16", "causal SDPA bf16, [B 4, H 32, T 2048, D 128]", causal_attention(4, 32, 2048, 128, low)),
        ("layernorm-fp16", "LayerNorm fp16 over [16384, 4096]", layer_norm(16384, 4096, half)),
        ("conv3x3-fp16", "3x3 conv fp16, 256 -> 256 channels, [32, 256, 56, 56]", conv(32, 256, 56, half)),
        ("encoder-fp16", "transformer encoder layer fp16, d 1024, 16 heads, [8, 512, 1024]",
         encoder(8, 512, 1024, 16, half)),
        # 2^24: ~50 us on an H100, so the ~1 us resolution of CUDA events stays well below the 2% we compare at
        ("elementwise-16M", "x * 2 over 2^24 float32 (64 MB in, 64 MB out)", elementwise(2**24)),
        ("tiny-kernel", "x + 1 on one element (launch-bound)", tiny_kernel()),
    ]


def summary(result, max_samples: int = 2000) -> dict:
    """measure_latency's result without the environment (that is in the provenance), samples rounded.

    A launch-bound kernel gives tens of thousands of samples in half a second: keep at most
    ``max_samples`` of them, evenly spaced in time order (the statistics above are of all of them).
    """
    d = result.to_dict()
    d.pop("env")
    xs = d["samples_ms"]
    if len(xs) > max_samples:
        d["samples_thinned_from"] = len(xs)
        xs = [xs[round(i * (len(xs) - 1) / (max_samples - 1))] for i in range(max_samples)]
    d["samples_ms"] = [float(f"{x:.6g}") for x in xs]
    d["throttled_ms"] = [float(f"{x:.6g}") for x in d["throttled_ms"][:max_samples]]
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


def spread(values) -> float | None:
    """(max - min) / median of the rounds' medians: how far apart repeated measurements land."""
    values = [v for v in values if v is not None]
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else None


def rounds_record(medians: list[float]) -> dict:
    return {"round_medians_ms": medians, "median_of_rounds_ms": statistics.median(medians),
            "round_spread": spread(medians)}


def measure_workload(name: str, desc: str, fn, device: str, settings: dict, triton_skip: str | None) -> dict:
    """Every timer on one workload; the cold-L2 pair (or, on a CPU, measure_latency alone) in alternating rounds."""
    cuda = device.startswith("cuda")
    max_time, rounds = settings["measure_latency_max_time_s"], settings["rounds"]
    rec = {"description": desc}
    with torch.inference_mode():
        ml = measure_latency(fn, device=device, max_time_s=max_time, label=name)
        rec["measure_latency"] = summary(ml)
        # the cold-L2 pair alternates (ML, DB / DB, ML / ...) so that a drift of the GPU's state hits both
        ml_rounds, db_rounds = [], []
        for r in range(rounds):
            order = ("ml", "db") if r % 2 == 0 else ("db", "ml")
            for which in order:
                if which == "ml":
                    ml_rounds.append(measure_latency(fn, device=device, max_time_s=max_time, l2_flush=cuda,
                                                     hide_launch=cuda, label=name))
                elif not triton_skip:
                    db_rounds.append(triton_bench(fn, settings["do_bench_rep_ms"]))
        ml_medians = [x.median_ms for x in ml_rounds]
        if cuda:
            rec["measure_latency_l2_flush"] = dict(summary(ml_rounds[-1]), **rounds_record(ml_medians))
            try:
                graph = measure_latency(fn, device=device, max_time_s=max_time, cuda_graph=True, label=name)
                rec["measure_latency_cuda_graph"] = summary(graph)
            except Exception as e:  # a workload that cannot be captured is a finding, not a crash
                rec["measure_latency_cuda_graph"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            rec["measure_latency_rounds"] = rounds_record(ml_medians)  # warm cache: the CPU has no flush
            rec["measure_latency_l2_flush"] = {"skipped": "L2 flush is GPU-only"}
            rec["measure_latency_cuda_graph"] = {"skipped": "CUDA graphs are GPU-only"}
        rec["torch_timer"] = torch_timer(fn, settings["torch_timer_min_run_time_s"])
        if triton_skip:
            rec["do_bench"] = {"skipped": triton_skip}
        else:
            rec["do_bench"] = dict(db_rounds[-1], **rounds_record([d["median_ms"] for d in db_rounds]))
    ml_of_rounds = statistics.median(ml_medians) if ml_medians else None
    db = rec["do_bench"].get("median_of_rounds_ms")
    vs_db = rel(ml_of_rounds, db) if (cuda and db) else None
    rec["agreement"] = {
        "l2_flush_vs_do_bench": vs_db,
        "no_flush_vs_torch_timer": rel(ml.median_ms, rec["torch_timer"]["median_ms"]),
        "within_2pct_of_do_bench": None if vs_db is None else abs(vs_db) <= AGREE,
        "measure_latency_round_spread": spread(ml_medians),
        "do_bench_round_spread": rec["do_bench"].get("round_spread"),
    }
    s = rec["agreement"]["measure_latency_round_spread"]
    rec["agreement"]["rounds_within_1pct"] = None if s is None else s <= REPEAT
    rec["warnings"] = list(dict.fromkeys(w for x in [ml, *ml_rounds] for w in x.warnings))
    return rec


AGREE = 0.02  # measure_latency(l2_flush) within 2% of do_bench
REPEAT = 0.01  # three rounds of measure_latency within 1% of each other


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/gpu", help="output folder (default data/gpu)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="tiny workloads, short budgets (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the cold-L2 timers (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every timer (default: torch's)")
    p.add_argument("--only", default=None, help="comma-separated workload names (default: all)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", LatencyWarning)  # each result's warnings are saved in the JSON
    quick = args.quick
    triton_skip = triton_status(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    # budget: per measure_latency call about 0.5 s of sampling (its minimum) plus warm-up, capped at 2 s each;
    # do_bench 500 ms a round; ~7 s a workload on a GPU, ~2 minutes for all
    settings = {"quick": quick, "device": device, "threads": torch.get_num_threads(),
                "measure_latency_max_time_s": 0.3 if quick else 2.0,
                "torch_timer_min_run_time_s": 0.1 if quick else 1.0,
                "do_bench_rep_ms": 100 if quick else 500,
                "rounds": max(1, args.rounds),
                "triton": triton_version, "triton_status": f"skipped: {triton_skip}" if triton_skip else "ok",
                "agree_within": AGREE, "repeat_within": REPEAT,
                "compare": "measure_latency(l2_flush=True, hide_launch=True) vs do_bench (both cold L2, GPU time,"
                           " medians of alternating rounds); measure_latency() vs Timer.blocked_autorange (both warm"
                           " L2); medians"}
    path = Path(args.out) / "timer_agreement.json"
    payload = {
        "provenance": provenance(device, " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])),
        "settings": settings,
        "pitfall_audit": None,
        "workloads": {},
    }
    t_all = time.perf_counter()

    # 1. the pitfall audit, first: the model must be cold
    audit_name = "tiny-efficientnet" if quick else "efficientnet-b0"
    m = build_model(audit_name, device=device)
    frame = audit(m, m.make_input(1), device, max_time_s=settings["measure_latency_max_time_s"], threads=args.threads)
    payload["pitfall_audit"] = {"model": audit_name, "batch_size": 1, "rows": frame.to_dict("records"),
                                "correct": summary(frame.attrs["correct"], max_samples=5000),
                                "warnings": frame.attrs["warnings"]}
    save_json(payload, path)
    del m

    # 2. the workloads
    chosen = workloads(device, quick)
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        chosen = [w for w in chosen if w[0] in names]
    for name, desc, build in tqdm(chosen, desc="workloads", file=sys.stderr):
        t0 = time.perf_counter()
        fn = build()
        rec = measure_workload(name, desc, fn, device, settings, triton_skip)
        rec["elapsed_s"] = time.perf_counter() - t0
        payload["workloads"][name] = rec
        save_json(payload, path)  # partial results survive an interruption
        del fn
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    payload["verdict"] = verdict(payload["workloads"])
    payload["elapsed_s"] = time.perf_counter() - t_all
    save_json(payload, path)
    print_summary(payload)
    print(f"wrote {path} ({payload['elapsed_s']:.0f} s)")
    return 0


def verdict(records: dict) -> dict:
    """Do all workloads agree with do_bench within 2%, and do the 3 rounds agree within 1%? (None: not measured)"""
    def check(key):
        values = {name: r["agreement"].get(key) for name, r in records.items()}
        measured = {k: v for k, v in values.items() if v is not None}
        return (all(measured.values()) if measured else None), sorted(k for k, v in measured.items() if not v)

    agree, disagree = check("within_2pct_of_do_bench")
    repeat, unrepeated = check("rounds_within_1pct")
    return {"all_within_2pct_of_do_bench": agree, "not_within_2pct": disagree,
            "all_rounds_within_1pct": repeat, "rounds_not_within_1pct": unrepeated}


def print_summary(payload: dict) -> None:
    def fmt(x, pct=False):
        if x is None:
            return "-"
        return f"{100 * x:+.1f}%" if pct else f"{x:.4g}"

    def spread_text(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def clocks(rec):
        g = (rec or {}).get("gpu_state") or {}
        lo, hi = g.get("sm_clock_min_mhz"), g.get("sm_clock_max_mhz")
        return "-" if lo is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")

    head = ["workload", "ML flush", "do_bench", "diff", "ML spread", "DB spread", "SM MHz", "ML", "Timer", "diff",
            "SM MHz", "ML graph", "throttled"]
    rows = []
    for name, r in payload["workloads"].items():
        flush, db, a = r["measure_latency_l2_flush"], r["do_bench"], r["agreement"]
        g = r["measure_latency_cuda_graph"].get("median_ms")
        thr = sum((r.get(k) or {}).get("n_throttled") or 0 for k in ("measure_latency", "measure_latency_l2_flush"))
        rows.append([name, fmt(flush.get("median_of_rounds_ms")), fmt(db.get("median_of_rounds_ms")),
                     fmt(a["l2_flush_vs_do_bench"], True), spread_text(a["measure_latency_round_spread"]),
                     spread_text(a["do_bench_round_spread"]), clocks(flush), fmt(r["measure_latency"]["median_ms"]),
                     fmt(r["torch_timer"]["median_ms"]), fmt(a["no_flush_vs_torch_timer"], True),
                     clocks(r["measure_latency"]), fmt(g), str(thr)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("medians in ms (ML = measure_latency, DB = do_bench; ML flush = cold L2 and launch hidden, median of"
          " the rounds; spread = (max - min) / median of the rounds; SM MHz = the GPU's SM clock range while ML"
          " sampled)")
    for row in [head, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    a = payload["pitfall_audit"]
    print(f"\npitfall audit, {a['model']} batch 1 (relative error of the naive timer):")
    for row in a["rows"]:
        err = row["relative_error"]
        print(f"  {row['pitfall']:22s} {fmt(err, True) if err == err else 'n/a':>9s}  {row['note']}")
    for w in a.get("warnings") or []:
        print(f"  warning: {w}")
    v = payload.get("verdict") or verdict(payload["workloads"])

    def yes(x):
        return "n/a (not measured here)" if x is None else ("yes" if x else "NO")

    rounds = payload["settings"]["rounds"]
    print(f"\nevery workload within {100 * AGREE:g}% of do_bench: {yes(v['all_within_2pct_of_do_bench'])}"
          + (f" (not: {', '.join(v['not_within_2pct'])})" if v["not_within_2pct"] else ""))
    print(f"measure_latency's {rounds} rounds within {100 * REPEAT:g}% of each other: "
          f"{yes(v['all_rounds_within_1pct'])}"
          + (f" (not: {', '.join(v['rounds_not_within_1pct'])})" if v["rounds_not_within_1pct"] else ""))


if __name__ == "__main__":
    sys.exit(main())
