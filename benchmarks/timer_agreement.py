"""Does measure_latency agree with triton.testing.do_bench and torch.utils.benchmark, run after run? Plus the pitfall audit.

Run on the GPU machine (about 2-3 minutes on an H200: ~13 s a workload, the audit first):

    PYTHONPATH=. python benchmarks/timer_agreement.py --out data/gpu

Smoke test on a CPU (tiny workloads, no triton, short budgets): ``--quick --device cpu --threads 1``.

Like is compared with like, in two pairs per workload, each measured in 3
alternating rounds (ours, theirs / theirs, ours / ours, theirs) so that a drift of
the GPU's state hits both sides; the medians of the rounds are compared.

- **Cold L2, GPU time:** ``measure_latency(l2_flush=True, hide_launch=True)``
  against ``do_bench``. ``do_bench`` zeroes a 256 MB buffer before every call and
  queues flush and call back to back without waiting, so where the host runs
  ahead of the GPU its events time the GPU's work at the clocks of back-to-back
  work; ``hide_launch`` times bursts of back-to-back calls behind a spin kernel,
  the same regime. Where the host cannot run ahead (a launch-bound model or
  kernel) ``do_bench`` times the host's launches instead, and its own rounds
  disagree with each other.
- **CUDA graph, warm L2:** ``measure_latency(cuda_graph=True)`` against
  ``do_bench_cudagraph``: both replay graphs of many calls, which takes the
  launches out whatever the host's speed.

The verdict judges each workload on the pair that measures the same thing
there: the cold-L2 pair when ``do_bench``'s rounds agree within 2% (the host ran
ahead), else the graph pair, and records why. It reports whether every workload
is within 2% of its reference and whether measure_latency's rounds (both pairs)
agree within 1% (the repeatability its minimum sampling time is there for).
``Timer.blocked_autorange`` runs back-to-back calls with a warm cache and the
launches included; it is shown beside ``measure_latency()`` (launch included),
as is the SM clock each measurement saw.

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


def triton_graph_bench(fn, rep_ms: int) -> dict:
    """triton.testing.do_bench_cudagraph: a graph of ~rep_ms of calls, 10 replays, each replay's time per call."""
    from triton.testing import do_bench_cudagraph

    with torch.cuda.stream(torch.cuda.Stream()):  # some triton versions refuse to capture on the default stream
        try:
            return {"median_ms": float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")),
                    "return_mode": "median"}
        except TypeError:  # a triton without return_mode: its mean
            return {"median_ms": float(do_bench_cudagraph(fn, rep=rep_ms)), "return_mode": "mean"}


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


def alternate(rounds: int, ours, theirs=None) -> tuple[list, list]:
    """Call ``ours()`` and ``theirs()`` in alternating order (ours, theirs / theirs, ours / ...); their results."""
    mine, other = [], []
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                mine.append(ours())
            elif theirs is not None:
                other.append(theirs())
    return mine, other


def pair_records(ours: list, theirs: list, skip: str | None) -> tuple[dict, dict]:
    """(our record, their record): the last round's summary plus the medians of all rounds, or why not measured."""
    mine = dict(summary(ours[-1]), **rounds_record([x.median_ms for x in ours]))
    other = {"skipped": skip} if skip else dict(theirs[-1], **rounds_record([d["median_ms"] for d in theirs]))
    return mine, other


def measure_workload(name: str, desc: str, fn, device: str, settings: dict, triton_skip: str | None) -> dict:
    """Every timer on one workload; each like-for-like pair (on a CPU, measure_latency alone) in alternating rounds."""
    cuda = device.startswith("cuda")
    max_time, rounds = settings["measure_latency_max_time_s"], settings["rounds"]
    rec = {"description": desc}
    with torch.inference_mode():
        ml = measure_latency(fn, device=device, max_time_s=max_time, label=name)
        rec["measure_latency"] = summary(ml)
        rec["torch_timer"] = torch_timer(fn, settings["torch_timer_min_run_time_s"])
        # the cold-L2 pair: GPU time of back-to-back calls on both sides
        cold, db_rounds = alternate(
            rounds, lambda: measure_latency(fn, device=device, max_time_s=max_time, l2_flush=cuda, hide_launch=cuda,
                                            label=name),
            None if triton_skip else lambda: triton_bench(fn, settings["do_bench_rep_ms"]))
        graph: list = []
        if cuda:
            rec["measure_latency_l2_flush"], rec["do_bench"] = pair_records(cold, db_rounds, triton_skip)
            # the graph pair: warm L2, the launches taken out by graph replay on both sides
            try:
                graph, dbg_rounds = alternate(
                    rounds, lambda: measure_latency(fn, device=device, max_time_s=max_time, cuda_graph=True,
                                                    label=name),
                    None if triton_skip else lambda: triton_graph_bench(fn, settings["do_bench_cudagraph_rep_ms"]))
                rec["measure_latency_cuda_graph"], rec["do_bench_cudagraph"] = pair_records(graph, dbg_rounds,
                                                                                             triton_skip)
            except Exception as e:  # a workload that cannot be captured is a finding, not a crash
                graph = []
                error = {"error": f"{type(e).__name__}: {e}"}
                rec["measure_latency_cuda_graph"], rec["do_bench_cudagraph"] = error, dict(error)
        else:
            rec["measure_latency_rounds"] = rounds_record([x.median_ms for x in cold])  # warm cache: no flush here
            rec["measure_latency_l2_flush"] = {"skipped": "L2 flush is GPU-only"}
            rec["do_bench"] = {"skipped": triton_skip}
            rec["measure_latency_cuda_graph"] = {"skipped": "CUDA graphs are GPU-only"}
            rec["do_bench_cudagraph"] = {"skipped": triton_skip}
    rec["agreement"] = agreement(rec, ml)
    rec["warnings"] = list(dict.fromkeys(w for x in [ml, *cold, *graph] for w in x.warnings))
    return rec


def agreement(rec: dict, ml) -> dict:
    """Both pairs' differences and round spreads, and the verdict on the pair that measures the same thing."""
    cold, db = rec["measure_latency_l2_flush"], rec["do_bench"]
    graph, dbg = rec["measure_latency_cuda_graph"], rec["do_bench_cudagraph"]
    rounds = rec.get("measure_latency_rounds") or cold  # on a CPU: the warm rounds
    out = {
        "l2_flush_vs_do_bench": rel(cold.get("median_of_rounds_ms"), db.get("median_of_rounds_ms")),
        "cuda_graph_vs_do_bench_cudagraph": rel(graph.get("median_of_rounds_ms"), dbg.get("median_of_rounds_ms")),
        "no_flush_vs_torch_timer": rel(ml.median_ms, rec["torch_timer"]["median_ms"]),
        "measure_latency_round_spread": rounds.get("round_spread"),
        "measure_latency_cuda_graph_round_spread": graph.get("round_spread"),
        "do_bench_round_spread": db.get("round_spread"),
        "do_bench_cudagraph_round_spread": dbg.get("round_spread"),
    }
    d = out["l2_flush_vs_do_bench"]
    out["within_2pct_of_do_bench"] = None if d is None else abs(d) <= AGREE
    pair, diff, reason = judged_pair(out["l2_flush_vs_do_bench"], out["do_bench_round_spread"],
                                     out["cuda_graph_vs_do_bench_cudagraph"],
                                     graph.get("error") or graph.get("skipped") or dbg.get("skipped"))
    out.update(judged_pair=pair, judged_difference=diff, judged_reason=reason,
               within_2pct=None if diff is None else abs(diff) <= AGREE)
    spreads = [s for s in (out["measure_latency_round_spread"], out["measure_latency_cuda_graph_round_spread"])
               if s is not None]
    out["rounds_within_1pct"] = all(s <= REPEAT for s in spreads) if spreads else None
    return out


def judged_pair(cold_diff: float | None, db_spread: float | None, graph_diff: float | None,
                graph_missing: str | None = None) -> tuple[str | None, float | None, str]:
    """(pair, difference, reason): the pair that measures the same thing on both sides for this workload.

    The cold-L2 pair where do_bench's rounds agree within ``AGREE`` (the host ran ahead of the GPU,
    so do_bench timed GPU work); else the graph pair, which takes the launches out on both sides.
    """
    if cold_diff is not None and db_spread is not None and db_spread <= AGREE:
        return ("cold_l2", cold_diff, f"do_bench's rounds agree within {100 * db_spread:.1f}%: the host ran ahead "
                                      "of the GPU; judged against do_bench (cold L2)")
    if cold_diff is None:
        why = "do_bench did not run"
    elif db_spread is None:
        why = "one round of do_bench: its repeatability is unknown"
    else:
        why = f"do_bench's rounds spread {100 * db_spread:.0f}%: it times the host's launches here"
    if graph_diff is not None:
        return "cuda_graph", graph_diff, f"{why}; judged against do_bench_cudagraph"
    return None, None, f"{why}, and the graph pair has no result ({graph_missing or 'not measured'})"


AGREE = 0.02  # measure_latency(l2_flush) within 2% of do_bench
REPEAT = 0.01  # three rounds of measure_latency within 1% of each other


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/gpu", help="output folder (default data/gpu)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="tiny workloads, short budgets (smoke test)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each pair (default 3)")
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
    # do_bench 500 ms a round, do_bench_cudagraph 10 replays of 50 ms a round: ~13 s a workload on a GPU (7 timed
    # calls of measure_latency, 6 of triton, one Timer), 2-3 minutes for all
    settings = {"quick": quick, "device": device, "threads": torch.get_num_threads(),
                "measure_latency_max_time_s": 0.3 if quick else 2.0,
                "torch_timer_min_run_time_s": 0.1 if quick else 1.0,
                "do_bench_rep_ms": 100 if quick else 500,
                "do_bench_cudagraph_rep_ms": 10 if quick else 50,
                "rounds": max(1, args.rounds),
                "triton": triton_version, "triton_status": f"skipped: {triton_skip}" if triton_skip else "ok",
                "agree_within": AGREE, "repeat_within": REPEAT,
                "compare": "measure_latency(l2_flush=True, hide_launch=True) vs do_bench (both cold L2, GPU time of"
                           " back-to-back calls) and measure_latency(cuda_graph=True) vs do_bench_cudagraph (both warm"
                           " L2, launches removed by graph replay), medians of alternating rounds; each workload"
                           " judged on the cold-L2 pair where do_bench's rounds agree within 2%, else on the graph"
                           " pair; measure_latency() vs Timer.blocked_autorange (both warm L2, launches timed)"}
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
    """Is every workload within 2% of its like-for-like reference, and do measure_latency's rounds agree within 1%?

    None: not measured. ``judged`` says, per workload, which pair decided and why.
    """
    def check(key):
        values = {name: r["agreement"].get(key) for name, r in records.items()}
        measured = {k: v for k, v in values.items() if v is not None}
        return (all(measured.values()) if measured else None), sorted(k for k, v in measured.items() if not v)

    agree, disagree = check("within_2pct")
    repeat, unrepeated = check("rounds_within_1pct")
    judged = {name: {"pair": r["agreement"].get("judged_pair"), "difference": r["agreement"].get("judged_difference"),
                     "reason": r["agreement"].get("judged_reason")} for name, r in records.items()}
    return {"all_within_2pct": agree, "not_within_2pct": disagree, "judged": judged,
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

    judged_tag = {"cold_l2": "cold", "cuda_graph": "graph", None: "-"}
    head = ["workload", "ML cold", "DB", "diff", "ML spr", "DB spr", "SM MHz", "ML graph", "DB graph", "diff",
            "ML spr", "DBg spr", "judged", "ML", "Timer", "diff", "thr"]
    rows = []
    for name, r in payload["workloads"].items():
        cold, db, a = r["measure_latency_l2_flush"], r["do_bench"], r["agreement"]
        graph, dbg = r["measure_latency_cuda_graph"], r.get("do_bench_cudagraph") or {}
        thr = sum((r.get(k) or {}).get("n_throttled") or 0
                  for k in ("measure_latency", "measure_latency_l2_flush", "measure_latency_cuda_graph"))
        rows.append([name, fmt(cold.get("median_of_rounds_ms")), fmt(db.get("median_of_rounds_ms")),
                     fmt(a["l2_flush_vs_do_bench"], True), spread_text(a["measure_latency_round_spread"]),
                     spread_text(a["do_bench_round_spread"]), clocks(cold),
                     fmt(graph.get("median_of_rounds_ms")), fmt(dbg.get("median_of_rounds_ms")),
                     fmt(a.get("cuda_graph_vs_do_bench_cudagraph"), True),
                     spread_text(a.get("measure_latency_cuda_graph_round_spread")),
                     spread_text(a.get("do_bench_cudagraph_round_spread")), judged_tag.get(a.get("judged_pair"), "-"),
                     fmt(r["measure_latency"]["median_ms"]), fmt(r["torch_timer"]["median_ms"]),
                     fmt(a["no_flush_vs_torch_timer"], True), str(thr)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("medians in ms (ML = measure_latency, DB = do_bench, DBg = do_bench_cudagraph; ML cold = l2_flush and"
          " hide_launch; ML graph = cuda_graph; medians of the rounds; spr = (max - min) / median of the rounds;"
          " SM MHz = the GPU's SM clock range while ML cold sampled; judged = the pair the verdict used;"
          " ML / Timer = launches included, warm L2; thr = throttled samples left out)")
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
    print(f"\nevery workload within {100 * AGREE:g}% of its like-for-like reference: {yes(v['all_within_2pct'])}"
          + (f" (not: {', '.join(v['not_within_2pct'])})" if v["not_within_2pct"] else ""))
    for name, j in v["judged"].items():
        print(f"  {name}: {fmt(j['difference'], True)}; {j['reason']}")
    print(f"measure_latency's {rounds} rounds within {100 * REPEAT:g}% of each other (both pairs): "
          f"{yes(v['all_rounds_within_1pct'])}"
          + (f" (not: {', '.join(v['rounds_not_within_1pct'])})" if v["rounds_not_within_1pct"] else ""))


if __name__ == "__main__":
    sys.exit(main())
