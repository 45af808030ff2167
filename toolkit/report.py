"""The main job: run the default experiments on this machine, save results and figures, write a summary.

``run_report(out, device)`` runs, in order:

1. ``timing``: ``measure_latency`` of a benchmark model and ``pitfalls.audit``
   (each classic timing mistake against the correct timer);
2. ``batch``: the exact largest batch that fits, the throughput curve up to it,
   and the optimal batch (often smaller than the largest);
3. ``moe``: a MoE model offloaded with a sweep of GPU-resident experts
   (tokens/s, prefill time, decode latency, hit rates) and a profile of one
   decode step (the CPU/GPU timeline);
4. ``simulation``: the hit-rate simulator on the synthetic Mixtral trace, every
   policy over GPU expert budgets.

Each experiment saves ``OUT/<name>.json`` as it goes (partial results while it
runs, with ``"complete": false``) so an interrupted run keeps what it measured;
its figures go to ``OUT/figures/*.{png,pdf}`` right after it. ``summary.md``
embeds the figures and the headline numbers, and lists the recorded GPU
results found in ``data/gpu/`` (labelled with their device and date). A
failing experiment is recorded in the summary and the others still run.

Settings per device and mode are the ``SETTINGS`` presets below: the CPU
default finishes in a few minutes on a 2-core machine, ``quick`` in about one.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .errors import ToolkitError
from .results import load_json, provenance, save_json

MiB = 2**20


def data_dir() -> Path:
    """The repository's data/ folder ($TOOLKIT_DATA_DIR overrides)."""
    return Path(os.environ.get("TOOLKIT_DATA_DIR", Path(__file__).resolve().parents[1] / "data"))


def smoke_mode() -> bool:
    """True when TOOLKIT_SMOKE=1: notebooks and the report use their smallest settings (CI)."""
    return os.environ.get("TOOLKIT_SMOKE", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Settings:
    """What the report runs; one preset per (device, quick)."""

    latency_model: str = "tiny-resnet"
    audit_time_s: float = 2.0
    batch_model: str = "tiny-resnet"
    batch_max_memory: int | None = None  # the trial process's memory limit (bytes); None = what is available
    # CPU: the limit is the trial process's own footprint plus this much, so a torch build that already holds
    # a few hundred MB (a CUDA build does) cannot make "batch of 1 does not fit" fail the report
    batch_headroom: int | None = 64 * MiB
    batch_max: int | None = None  # upper bound of the search (None: until out of memory)
    curve_step: int = 4  # throughput curve at 1, step, step^2, ..., max
    curve_batches: int = 5
    curve_time_s: float = 0.5  # per point, timed region
    moe_preset: str = "tiny-mixtral"
    moe_layers: int = 4
    moe_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of experts on the GPU
    moe_policy: str = "static-popularity"
    prompt_tokens: int = 32
    new_tokens: int = 16
    sim_policies: tuple[str, ...] = ("static-uniform", "static-popularity", "lru", "lfu", "belady")
    sim_budgets: tuple[int, ...] = (0, 32, 64, 96, 128, 160, 192, 224, 256)
    sim_heatmap_budget: int = 64


SETTINGS = {
    ("cpu", False): Settings(),
    ("cpu", True): Settings(audit_time_s=0.5, batch_max_memory=None, batch_max=64, curve_batches=3,
                            curve_time_s=0.2, moe_layers=2, moe_fractions=(0.0, 0.5, 1.0), prompt_tokens=16,
                            new_tokens=8,
                            sim_policies=("static-popularity", "lru", "lfu", "belady"),
                            sim_budgets=(0, 64, 128, 192, 256)),
    ("cuda", False): Settings(latency_model="resnet-50", audit_time_s=5.0, batch_model="resnet-50",
                              batch_max_memory=None, curve_step=2, curve_batches=20, curve_time_s=2.0,
                              moe_preset="mixtral-8x7b", moe_layers=2, prompt_tokens=128, new_tokens=32),
    ("cuda", True): Settings(latency_model="resnet-50", audit_time_s=1.0, batch_model="resnet-50",
                             batch_max_memory=None, batch_max=256, curve_step=4, curve_batches=5,
                             curve_time_s=0.5, moe_layers=2, moe_fractions=(0.0, 0.5, 1.0), new_tokens=8,
                             sim_policies=("static-popularity", "lru", "belady"),
                             sim_budgets=(0, 64, 128, 192, 256)),
}


def settings_for(device: str, quick: bool = False) -> Settings:
    return SETTINGS[("cuda" if str(device).startswith("cuda") else "cpu", bool(quick))]


# ---------------------------------------------------------------- recorded GPU results


def recorded_results(folder: str | os.PathLike | None = None) -> dict[str, dict]:
    """The recorded results in ``data/gpu/*.json`` (name -> parsed JSON), skipping unreadable files."""
    folder = Path(folder) if folder is not None else data_dir() / "gpu"
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = load_json(path)
        except ToolkitError:
            continue
        if isinstance(doc, dict):
            out[path.stem] = doc
    return out


def recorded_env(doc: dict) -> dict:
    """The environment record of a recorded result (its ``provenance``, or ``env``)."""
    for key in ("provenance", "env", "environment"):
        if isinstance(doc.get(key), dict):
            return doc[key]
    return {}


def recorded_label(doc: dict) -> str:
    """'recorded on <GPU or CPU>, <date>' for a recorded result."""
    env = recorded_env(doc)
    where = env.get("gpu") or env.get("cpu_model") or env.get("device") or "unknown device"
    when = str(env["timestamp"])[:10] if env.get("timestamp") else "unknown date"
    return f"recorded on {where}, {when}"


def recorded_pitfalls(doc: dict) -> pd.DataFrame | None:
    """The pitfall audit of ``timer_agreement.json`` as ``pitfalls.audit`` returns it (correct timer in attrs)."""
    from .timing import LatencyResult

    a = doc.get("pitfall_audit")
    if not a or not a.get("rows"):
        return None
    frame = pd.DataFrame(a["rows"])
    frame.attrs["correct"] = LatencyResult.from_dict(a["correct"]) if a.get("correct") else None
    frame.attrs["model"] = a.get("model")
    return frame


def recorded_latency(doc: dict) -> dict[str, list[float]] | None:
    """The correct timer's samples and warm-up calls from ``timer_agreement.json``."""
    frame = recorded_pitfalls(doc)
    correct = frame.attrs.get("correct") if frame is not None else None
    if correct is None:
        return None
    out = {"steady state (measured)": list(correct.samples_ms), "warm-up calls": list(correct.warmup_ms)}
    return {k: v for k, v in out.items() if v}


_TIMERS = {"measure_latency": "measure_latency", "torch_timer": "torch Timer", "measure_latency_l2_flush":
           "measure_latency, cold L2", "do_bench": "triton do_bench (cold L2)",
           "measure_latency_cuda_graph": "measure_latency, CUDA graph"}


def recorded_timer_agreement(doc: dict) -> pd.DataFrame:
    """(workload, timer, median_ms) for every workload and timer of ``timer_agreement.json``."""
    rows = []
    for workload, rec in (doc.get("workloads") or {}).items():
        for key, name in _TIMERS.items():
            med = (rec.get(key) or {}).get("median_ms")
            if med is not None:
                rows.append({"workload": workload, "timer": name, "median_ms": med})
    return pd.DataFrame(rows, columns=["workload", "timer", "median_ms"])


def recorded_moe_sweep(doc: dict, mode: str = "greedy") -> pd.DataFrame:
    """One row per GPU-expert budget of ``moe_engine.json``: tokens/s, prefill, decode median, hit rate."""
    rows = []
    for r in doc.get("runs") or []:
        g = r.get(mode)
        if not g:
            continue
        rows.append({"gpu_experts": r["gpu_experts"], "decode_tokens_per_s": g.get("decode_tokens_per_s"),
                     "prefill_ms": g.get("prefill_ms"), "decode_ms": (g.get("decode_ms") or {}).get("median"),
                     "hit_rate": (g.get("hit_rate") or {}).get("decode")})
    frame = pd.DataFrame(rows, columns=["gpu_experts", "decode_tokens_per_s", "prefill_ms", "decode_ms", "hit_rate"])
    frame.attrs["total_experts"] = (doc.get("settings") or {}).get("total_experts")
    return frame


def recorded_decode_samples(doc: dict, n: int = 3, mode: str = "greedy") -> dict[str, list[float]]:
    """Per-token decode latencies of up to ``n`` budgets of ``moe_engine.json`` (fewest, middle, most)."""
    runs = sorted((r for r in doc.get("runs") or [] if r.get(mode)), key=lambda r: r["gpu_experts"])
    if not runs:
        return {}
    pick = sorted({0, len(runs) // 2, len(runs) - 1})[:n]
    total = (doc.get("settings") or {}).get("total_experts")
    return {f"{runs[i]['gpu_experts']}{'/' + str(total) if total else ''} GPU experts":
            runs[i][mode]["decode_ms"]["samples"] for i in pick}


def recorded_timeline(doc: dict, case: str = "moe_decode") -> pd.DataFrame | None:
    """The Gantt rows of the profiled MoE decode step in ``profile_cases.json`` (None if absent)."""
    from .profiling import Event, timeline

    rec = (doc.get("cases") or {}).get(case)
    if not rec or not rec.get("events"):
        return None
    return timeline([Event(*e) for e in rec["events"]])


def recorded_throughput_curves(doc: dict) -> list[tuple[str, pd.DataFrame, int | None, int | None]]:
    """[(label, curve, largest, optimal)] for every configuration of ``batch_search.json`` that has a curve."""
    configs = doc.get("configs")
    if configs is None:
        models = doc.get("models")
        configs = list(models.values()) if isinstance(models, dict) else [doc]
    out = []
    for rec in configs:
        if isinstance(rec, dict) and rec.get("curve"):
            search, opt = rec.get("search") or {}, rec.get("optimal") or {}
            label = " ".join(str(x) for x in (rec.get("model"), rec.get("dtype")) if x) or "model"
            out.append((label, pd.DataFrame(rec["curve"]), rec.get("max_batch_size", search.get("max_batch_size")),
                        opt.get("optimal_batch_size")))
    return out


def recorded_throughput(doc: dict) -> tuple[pd.DataFrame, int | None, int | None] | None:
    """(curve, largest, optimal) of the first configuration in ``batch_search.json`` with a curve."""
    curves = recorded_throughput_curves(doc)
    return curves[0][1:] if curves else None


def recorded_moe_schemes(doc: dict, kind: str = "compare") -> pd.DataFrame:
    """Decode tokens/s of every offload scheme in ``moe_decode.json`` at the comparison budget, with its bound."""
    rows = []
    for r in doc.get("runs") or []:
        d = r.get("decode")
        if r.get("kind") != kind or not d:
            continue
        bound_ms = (d.get("bound") or {}).get("ms")
        rows.append({"routing": r.get("routing"), "scheme": r.get("scheme"), "budget": r.get("budget"),
                     "tokens_per_s": d.get("tokens_per_s"), "hit_rate": d.get("hit_rate"),
                     "bound_tokens_per_s": 1e3 / bound_ms if bound_ms else None})
    return pd.DataFrame(rows, columns=["routing", "scheme", "budget", "tokens_per_s", "hit_rate",
                                       "bound_tokens_per_s"])


def recorded_moe_decode_sweep(doc: dict, routing: str = "trace") -> pd.DataFrame:
    """Our engine's budget sweep in ``moe_decode.json`` (one routing) in ``plots.offload_sweep``'s columns."""
    rows = []
    for r in doc.get("runs") or []:
        d = r.get("decode")
        if r.get("kind") != "sweep" or r.get("routing") != routing or not d:
            continue
        rows.append({"gpu_experts": r["budget"], "decode_tokens_per_s": d.get("tokens_per_s"),
                     "prefill_ms": (r.get("prefill") or {}).get("ms", d.get("prefill_ms")),
                     "decode_ms": d.get("median_ms"), "hit_rate": d.get("hit_rate")})
    frame = pd.DataFrame(rows, columns=["gpu_experts", "decode_tokens_per_s", "prefill_ms", "decode_ms", "hit_rate"])
    frame.attrs["total_experts"] = (doc.get("settings") or {}).get("total_experts")
    return frame.sort_values("gpu_experts").reset_index(drop=True)


@functools.lru_cache(maxsize=1)  # both hit-rate figures draw from one sweep
def _simulated_sweep(budgets=(0, 32, 64, 96, 128, 160, 192, 224, 256),
                     policies=("static-uniform", "static-popularity", "lru", "lfu", "belady")):
    from .moe.simulate import simulate
    from .moe.traces import named_trace

    trace = named_trace("synthetic-mixtral")
    results = [simulate(trace, p, b) for p in policies for b in budgets]
    frame = pd.DataFrame([{"policy": r.policy, "gpu_experts": r.gpu_experts, "hit_rate": r.hit_rate("decode")}
                          for r in results])
    per_layer = {r.policy: r.per_layer("decode") for r in results if r.gpu_experts == 64}
    return frame, per_layer, trace.n_layers * trace.n_experts


@dataclass(frozen=True)
class PaperFigure:
    """A README figure: its file stem, the data it is drawn from, how, and its caption."""

    stem: str
    source: str  # a file under data/ ("gpu/timer_agreement.json"), or "routing" for the shipped statistics
    draw: Callable  # (parsed source) -> Figure or None
    caption: str


def _sim(part: str):
    def draw(_):
        frame, per_layer, total = _simulated_sweep()
        if part == "curve":
            return plots.hit_rate_vs_gpu_experts(frame, total_experts=total)
        return plots.hit_rate_heatmap(per_layer, xlabel="policy")
    return draw


def _maybe(builder, figure):
    def draw(doc):
        data = builder(doc)
        if data is None or (hasattr(data, "__len__") and len(data) == 0):
            return None
        return figure(data)
    return draw


PAPER_FIGURES = [
    PaperFigure("gpu_pitfall_errors", "gpu/timer_agreement.json", _maybe(recorded_pitfalls, plots.pitfall_errors),
                "Each classic timing mistake's reading relative to the correct timer (efficientnet-b0, batch 1)."),
    PaperFigure("gpu_latency_distribution", "gpu/timer_agreement.json",
                _maybe(recorded_latency, plots.latency_distribution),
                "Latency distribution of the correct timer against the warm-up calls a naive timer includes."),
    PaperFigure("gpu_timer_agreement", "gpu/timer_agreement.json",
                _maybe(recorded_timer_agreement, plots.timer_comparison),
                "measure_latency against torch.utils.benchmark and triton's do_bench, like for like."),
    PaperFigure("gpu_throughput_vs_batch", "gpu/batch_search.json",
                _maybe(recorded_throughput, lambda t: plots.throughput_curve(t[0], largest=t[1], optimal=t[2])),
                "Throughput vs batch size up to the largest batch that fits; the optimal batch marked."),
    PaperFigure("gpu_moe_schemes", "gpu/moe_decode.json", _maybe(recorded_moe_schemes, plots.scheme_comparison),
                "Decode tokens/s of the offload schemes at the same GPU expert budget (Mixtral-8x7B layers, batch 1),"
                " with each run's roofline bound."),
    PaperFigure("gpu_moe_decode_sweep", "gpu/moe_decode.json",
                _maybe(recorded_moe_decode_sweep,
                       lambda f: plots.offload_sweep(f, total_experts=f.attrs["total_experts"])),
                "Our engine over GPU expert budgets (Mixtral-8x7B layers, replayed Mixtral routing): decode tokens/s,"
                " prefill time and decode hit rate."),
    PaperFigure("gpu_moe_offload_sweep", "gpu/moe_engine.json",
                _maybe(recorded_moe_sweep, lambda f: plots.offload_sweep(f, total_experts=f.attrs["total_experts"])),
                "Offloaded Mixtral-8x7B layers: decode tokens/s, prefill time and hit rate vs GPU-resident experts."),
    PaperFigure("gpu_moe_decode_latency", "gpu/moe_engine.json",
                _maybe(recorded_decode_samples, plots.decode_latency_over_tokens),
                "Per-token decode latency of offloaded Mixtral-8x7B layers for a few GPU expert budgets."),
    PaperFigure("gpu_moe_timeline", "gpu/profile_cases.json", _maybe(recorded_timeline, plots.timeline_gantt),
                "One profiled decode step of the offload engine: CPU experts overlapping GPU work."),
    PaperFigure("hit_rate_vs_gpu_experts", "routing", _sim("curve"),
                "Simulated decode hit rate vs GPU-resident experts per policy (synthetic Mixtral-8x7B trace "
                "fitted to data/routing)."),
    PaperFigure("hit_rate_per_layer", "routing", _sim("layers"),
                "Simulated decode hit rate per layer and policy with 64 of 256 experts on the GPU."),
]


def paper_figures(out: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                  only: list[str] | None = None) -> list[dict]:
    """Redraw every README figure from the files in ``data/`` into ``out`` (default data/figures).

    Returns one dict per figure: stem, caption, source, label ('recorded on <GPU>, <date>' for
    recorded results), paths (PNG, PDF) or ``missing`` (why it could not be drawn), and ``figure``.
    """
    data = Path(data) if data is not None else data_dir()
    out = Path(out) if out is not None else data / "figures"
    rows = []
    for f in PAPER_FIGURES:
        if only and f.stem not in only:
            continue
        row = {"stem": f.stem, "caption": f.caption, "source": f.source, "label": None, "paths": [],
               "missing": None, "figure": None}
        doc = None
        if f.source != "routing":
            path = data / f.source
            if not path.exists():
                row["missing"] = f"no recording: data/{f.source} is not present"
                rows.append(row)
                continue
            try:
                doc = load_json(path)
            except ToolkitError as e:
                row["missing"] = str(e)
                rows.append(row)
                continue
            row["label"] = recorded_label(doc)
        fig = f.draw(doc)
        if fig is None:
            row["missing"] = f"data/{f.source} holds no data for this figure"
        else:
            row["figure"] = fig
            row["paths"] = plots.save(fig, out / f.stem)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """State of one report run: where things go, what was saved, what failed."""

    out: Path
    device: str
    settings: Settings
    progress: bool = True
    command: str | None = None
    results: dict = field(default_factory=dict)  # experiment -> saved record
    figures: list = field(default_factory=list)  # (experiment, stem, caption)
    errors: dict = field(default_factory=dict)  # experiment -> one-line error
    seconds: dict = field(default_factory=dict)

    def save(self, name: str, record: dict) -> None:
        self.results[name] = record
        save_json(record, self.out / f"{name}.json")

    def figure(self, experiment: str, fig, stem: str, caption: str) -> None:
        plots.save(fig, self.out / "figures" / stem)
        self.figures.append((experiment, stem, caption))

    def bar(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.progress, leave=False, **kw)


def _record(run: Run, name: str, **kw) -> dict:
    return {"experiment": name, "complete": False, "provenance": provenance(run.device, run.command),
            "settings": asdict(run.settings), **kw}


def run_timing(run: Run) -> None:
    """Latency of one model with the correct timer, and each classic mistake's error against it."""
    from . import pitfalls
    from .models import build_model

    s = run.settings
    model = build_model(s.latency_model, device=run.device)
    x = model.make_input(1)
    frame = pitfalls.audit(model, x, run.device, max_time_s=s.audit_time_s)  # first: the model is still cold
    correct = frame.attrs["correct"]
    dists = {"steady state (measured)": list(correct.samples_ms), "warm-up calls": list(correct.warmup_ms)}
    if run.device.startswith("cuda"):  # the GPU-only mistakes, as distributions
        host = tuple(t.cpu() for t in x)
        dists["copy in timed region"] = pitfalls.time_copy_in_timed_region(model, host, run.device)
        dists["host clock, no sync"] = pitfalls.time_host_clock_no_sync(model, x, run.device)
    dists = {k: v for k, v in dists.items() if len(v)}
    record = _record(run, "timing", model=s.latency_model, latency=correct.to_dict(),
                     audit=frame.to_dict("records"), distributions=dists, complete=True)
    run.save("timing", record)
    run.figure("timing", plots.latency_distribution(dists, kind="violin"), "latency_distribution",
               f"Latency of {s.latency_model} (batch 1, {run.device}): the measured steady state against the "
               "warm-up calls a naive timer includes; median (bar) and p99 (triangle) marked.")
    run.figure("timing", plots.pitfall_errors(frame), "pitfall_errors",
               f"Each timing mistake's reading relative to the correct timer ({s.latency_model}, {run.device}); "
               "n/a: GPU-only mistakes on a CPU.")


def run_batch(run: Run) -> None:
    """The largest batch that fits, the throughput curve up to it, and the optimal batch."""
    from .models import build_model
    from .throughput import curve_batch_sizes, find_max_batch_size, find_optimal_batch_size, throughput_curve

    s = run.settings
    record = _record(run, "batch", model=s.batch_model)
    search = find_max_batch_size(s.batch_model, device=run.device, max_memory=s.batch_max_memory,
                                 headroom=s.batch_headroom if not str(run.device).startswith("cuda") else None,
                                 max_batch=s.batch_max, progress=run.progress)
    record["search"] = search.to_dict()
    run.save("batch", record)
    model = build_model(s.batch_model, device=run.device)
    sizes = curve_batch_sizes(search.max_batch_size, step=s.curve_step)
    points: list = []

    def on_point(result, row):
        points.append(row)
        record["curve"] = points
        run.save("batch", record)

    curve = throughput_curve(model, sizes, s.curve_batches, device=run.device, progress=run.progress,
                             on_point=on_point, max_time_s=s.curve_time_s)
    opt = find_optimal_batch_size(curve)
    record.update(curve=curve.to_dict("records"), optimal=opt.to_dict(), complete=True)
    run.save("batch", record)
    limit = "the memory limit" if not search.bounded else f"the search bound {s.batch_max}"
    run.figure("batch", plots.throughput_curve(curve, largest=search.max_batch_size,
                                               optimal=opt.optimal_batch_size), "throughput_vs_batch",
               f"Throughput of {s.batch_model} on {run.device} vs batch size, up to the largest batch that fits "
               f"({search.max_batch_size}, {limit}); the optimal batch is the smallest within "
               f"{100 * opt.tolerance:.0f}% of the best.")


@dataclass
class MoEBench:
    """A MoE model ready for offloaded generation: model, routing replay, popularity, cost model, a prompt.

    Shapes: L layers, E experts per layer, P prompt tokens.
    """

    preset: object  # toolkit.moe.presets.MoEPreset
    model: object
    device: str
    router: object | None  # TraceRouter over the synthetic Mixtral trace, or None (the model's own router)
    popularity: np.ndarray  # [L, E] for static-popularity placement
    cost_model: object
    ids: object  # [1, P]
    mask: object  # [1, P]

    @property
    def total_experts(self) -> int:
        return self.preset.layers * self.preset.experts


def moe_bench(preset: str = "tiny-mixtral", layers: int | None = None, device: str = "cpu",
              prompt_tokens: int = 32, trace_tokens: int = 512) -> MoEBench:
    """Build a preset (experts in host memory when on CUDA) with its cost model and a random prompt.

    Mixtral-shaped presets (8 experts, top-2) replay the synthetic Mixtral trace's routing, so a tiny
    model sees Mixtral's expert popularity and locality; others use their own router.
    """
    from .moe.costs import calibrate
    from .moe.generation import random_prompts
    from .moe.presets import build_moe, from_name
    from .moe.traces import TraceRouter, synthetic_mixtral

    p = from_name(preset, layers)
    cuda = str(device).startswith("cuda")
    model = build_moe(p, device=device, expert_device="cpu" if cuda else None)
    router, popularity = None, np.ones((p.layers, p.experts))
    if (p.experts, p.top_k) == (8, 2) and p.layers <= 32:
        trace = synthetic_mixtral(n_tokens=trace_tokens, n_layers=p.layers)
        router, popularity = TraceRouter(trace), trace.popularity()
    cost_model = calibrate(p.hidden, p.intermediate, p.dtype, device)
    ids, mask = random_prompts(p.vocab, prompt_tokens)
    return MoEBench(p, model, str(device), router, popularity, cost_model, ids, mask)


def offload_run(bench: MoEBench, gpu_experts: int, policy: str = "static-popularity", new_tokens: int = 16,
                streamer=None):
    """Offload ``gpu_experts`` experts, warm up, generate ``new_tokens`` greedily, restore -> GenerationResult."""
    from .moe.generation import generate
    from .moe.offload import offload
    from .moe.policies import get_policy

    trace = bench.router.trace if bench.router is not None else None  # Belady needs the future: the replayed trace
    pol = get_policy(policy, popularity=bench.popularity, trace=trace)
    off = offload(bench.model, int(gpu_experts), device=bench.device, policy=pol, routing=bench.router,
                  cost_model=bench.cost_model)
    try:
        generate(off, bench.ids, bench.mask, max_new_tokens=2, ignore_eos=True)  # warm-up: first-call costs
        if bench.router is not None:
            bench.router.reset()  # every budget replays the same routing
        return generate(off, bench.ids, bench.mask, max_new_tokens=new_tokens, ignore_eos=True, streamer=streamer)
    finally:
        off.restore()


def sweep_frame(results: dict) -> pd.DataFrame:
    """{gpu_experts: GenerationResult} -> one row per budget (tokens/s, prefill, decode median, hit rates)."""
    return pd.DataFrame([{"gpu_experts": k, "decode_tokens_per_s": r.decode_tokens_per_s, "prefill_ms": r.prefill_ms,
                          "decode_ms": r.decode_ms["median"], "hit_rate": (r.hit_rate or {}).get("decode"),
                          "hit_rate_prefill": (r.hit_rate or {}).get("prefill")} for k, r in results.items()])


def per_expert_hit_rate(result, phase: str = "decode") -> np.ndarray | None:
    """Hit rate per layer and expert [L, E] of a GenerationResult (NaN where never routed)."""
    rows = ((result.hit_rate or {}).get("per_expert") or {}).get(phase)
    if rows is None:
        return None
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def run_moe(run: Run) -> None:
    """Offloaded MoE generation over a sweep of GPU experts, and a profile of one decode step."""
    from .cli.profile import moe_step
    from .profiling import profile

    s = run.settings
    bench = moe_bench(s.moe_preset, s.moe_layers, run.device, s.prompt_tokens,
                      trace_tokens=max(512, 4 * (s.prompt_tokens + s.new_tokens)))
    preset, n_total = bench.preset, bench.total_experts
    budgets = sorted({int(round(f * n_total)) for f in s.moe_fractions})
    record = _record(run, "moe", preset=preset.name, layers=preset.layers, experts_per_layer=preset.experts,
                     total_experts=n_total, routing="synthetic Mixtral trace" if bench.router else "model router",
                     cost_model=bench.cost_model.to_dict(), runs=[])
    run.save("moe", record)
    results = {}
    for k in run.bar(iterable=budgets, desc="MoE offload sweep", unit="budget"):
        results[k] = r = offload_run(bench, k, s.moe_policy, s.new_tokens)
        record["runs"].append(r.to_dict() | {"gpu_experts": k, "sequences": None})
        run.save("moe", record)

    # one decode step, profiled: the CPU/GPU timeline of the offload engine (a fresh model, its own router)
    del bench
    gc.collect()
    k_mid = budgets[len(budgets) // 2]
    step, step_args, label, engine = moe_step(preset.name, k_mid, run.device, layers=preset.layers,
                                              prompt_len=s.prompt_tokens)
    prof = profile(step, *step_args, device=run.device, wait=1, warmup=1, active=1, baseline=False, label=label)
    engine.restore()
    del engine, step
    timeline = prof.timeline()
    record.update(profile={"gpu_experts": k_mid, "label": label, "verdict": prof.verdict,
                           "step_ms": list(prof.step_ms), "timeline": timeline.to_dict("records")}, complete=True)
    run.save("moe", record)

    where = f"{preset.name}, {preset.layers} layers x {preset.experts} experts, {run.device}"
    run.figure("moe", plots.offload_sweep(sweep_frame(results), total_experts=n_total), "moe_offload_sweep",
               f"Offloaded generation ({where}, {s.moe_policy} placement): decode tokens/s, prefill time and "
               "decode hit rate vs GPU-resident experts.")
    run.figure("moe", plots.decode_latency_over_tokens(
        {f"{k} GPU experts": results[k].decode_samples_ms for k in sorted({budgets[0], k_mid, budgets[-1]})}),
        "moe_decode_latency", f"Per-token decode latency over the generated tokens ({where}).")
    m = per_expert_hit_rate(results[k_mid])
    if m is not None:
        run.figure("moe", plots.hit_rate_heatmap(m, title=f"{k_mid} of {n_total} experts on the GPU"),
                   "moe_hit_rate_heatmap",
                   f"Decode hit rate per layer and expert with {k_mid} GPU experts ({where}); grey: never routed.")
    if len(timeline):
        run.figure("moe", plots.timeline_gantt(timeline), "moe_timeline",
                   f"One profiled decode step ({where}, {k_mid} GPU experts): what runs where and when.")


def run_simulation(run: Run) -> None:
    """Hit rate vs GPU experts for every policy on the synthetic Mixtral trace (no GPU needed)."""
    from .moe.simulate import simulate
    from .moe.traces import named_trace

    s = run.settings
    trace = named_trace("synthetic-mixtral")  # read-only arrays: the simulator's compiled kernels are shared
    total = trace.n_layers * trace.n_experts
    budgets = [b for b in s.sim_budgets if b <= total]
    record = _record(run, "simulation", trace={"tokens": trace.n_tokens, "layers": trace.n_layers,
                                               "experts": trace.n_experts, "source": trace.meta.get("source")},
                     results=[])
    per_layer = {}
    cases = [(p, b) for p in s.sim_policies for b in budgets]
    for policy, budget in run.bar(iterable=cases, desc="hit-rate simulation", unit="case"):
        r = simulate(trace, policy, budget)
        record["results"].append(r.to_dict())
        if budget == s.sim_heatmap_budget:
            per_layer[policy] = r.per_layer("decode")
        run.save("simulation", record)
    record["complete"] = True
    run.save("simulation", record)
    frame = pd.DataFrame([{"policy": r["policy"], "gpu_experts": r["gpu_experts"],
                           "hit_rate": r["hit_rate"]["decode"]} for r in record["results"]])
    run.figure("simulation", plots.hit_rate_vs_gpu_experts(frame, total_experts=total, title=None),
               "hit_rate_vs_gpu_experts",
               f"Simulated decode hit rate vs GPU-resident experts per policy (synthetic Mixtral-8x7B trace, "
               f"{trace.n_tokens} tokens; belady knows the future: the bound for batch-1 decode).")
    if per_layer:
        run.figure("simulation", plots.hit_rate_heatmap(per_layer, xlabel="policy"), "hit_rate_per_layer",
                   f"Simulated decode hit rate per layer and policy with {s.sim_heatmap_budget} of {total} "
                   "experts on the GPU.")


EXPERIMENTS: dict[str, Callable[[Run], None]] = {
    "timing": run_timing,
    "batch": run_batch,
    "moe": run_moe,
    "simulation": run_simulation,
}


def run_report(out: str | os.PathLike = "report", device: str = "auto", quick: bool = False,
               experiments: list[str] | None = None, progress: bool = True, recorded: str | os.PathLike | None = None,
               settings: Settings | None = None, command: str | None = None) -> Run:
    """Run the default experiments, save JSON and figures under ``out``, write ``out/summary.md``.

    An experiment that fails is recorded (``run.errors``) and the others still
    run; Ctrl-C stops the run after writing the summary of what was measured.
    """
    from .env import resolve_device

    device = resolve_device(device)
    names = list(EXPERIMENTS) if not experiments else list(experiments)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ToolkitError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    run = Run(Path(out), device, settings or settings_for(device, quick), progress, command)
    run.out.mkdir(parents=True, exist_ok=True)
    try:
        for name in run.bar(iterable=names, desc="report", unit="experiment"):
            t0 = time.perf_counter()
            try:
                EXPERIMENTS[name](run)
            except Exception as e:  # keep going: one broken experiment should not lose the others
                run.errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                (run.out / f"{name}.error.txt").write_text(traceback.format_exc())
            finally:
                run.seconds[name] = time.perf_counter() - t0
    finally:  # also on Ctrl-C: the summary of what was measured
        write_summary(run, recorded_results(recorded))
    return run


# ---------------------------------------------------------------- the summary


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines + [""]


def headlines(run: Run) -> dict[str, list[str]]:
    """One or two sentences and a small table per experiment, from the saved records (partial ones too)."""
    out: dict[str, list[str]] = {}
    for name, fn in (("timing", _timing_lines), ("batch", _batch_lines), ("moe", _moe_lines),
                     ("simulation", _simulation_lines)):
        rec = run.results.get(name)
        try:
            lines = fn(rec) if rec else []
        except (KeyError, TypeError, ValueError, IndexError):  # a partial or foreign record: no headline
            lines = []
        if lines:
            out[name] = lines
    return out


def _timing_lines(t: dict) -> list[str]:
    lat = t["latency"]
    lo, hi = lat["ci95_ms"]
    lines = [f"**{t['model']}**, batch 1: median **{_fmt(lat['median_ms'])} ms** (95% CI {_fmt(lo)}-{_fmt(hi)}"
             f" ms, {lat['n_samples']} samples, p99 {_fmt(lat['p99_ms'])} ms); warm-up took "
             f"{lat['warmup']['count']} calls, the first {_fmt(lat['warmup']['first_call_ms'])} ms.", ""]
    return lines + _table([{"mistake": plots.PITFALL_LABELS.get(r["pitfall"], r["pitfall"]),
                            "naive (ms)": _fmt(r["naive_ms"]), "correct (ms)": _fmt(r["correct_ms"]),
                            "error": _pct(r["relative_error"])} for r in t["audit"]])


def _pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.0f}%"


def _batch_lines(b: dict) -> list[str]:
    o, srch = b["optimal"], b["search"]
    bound = " (search bound)" if srch.get("bounded") else ""
    return [f"**{b['model']}**: largest batch that fits **{srch['max_batch_size']}**{bound} "
            f"({len(srch['probes'])} probes); optimal batch **{o['optimal_batch_size']}** at "
            f"{_fmt(o['optimal_samples_per_s'], ',.0f')} samples/s; the largest batch reaches "
            f"{100 * o['largest_vs_best']:.0f}% of the best throughput.", ""]


def _moe_lines(m: dict) -> list[str]:
    lines = [f"**{m['preset']}** ({m['layers']} layers x {m['experts_per_layer']} experts, routing: "
             f"{m['routing']}), {m['settings']['moe_policy']} placement:", ""]
    if not str((m.get("provenance") or {}).get("device") or "").startswith("cuda"):
        lines[0] += (" (on a CPU both tiers live in host memory: the sweep shows the engine's mechanics and hit "
                     "rates, not GPU speed-ups)")
    lines += _table([{"GPU experts": f"{r['gpu_experts']} / {m['total_experts']}",
                      "decode tok/s": _fmt(r["decode_tokens_per_s"]),
                      "prefill (ms)": _fmt(r["prefill_ms"]),
                      "decode median (ms)": _fmt(r["decode_ms"]["median"]),
                      "decode hit rate": _fmt((r.get("hit_rate") or {}).get("decode"), ".3f")}
                     for r in m["runs"]])
    if m.get("profile"):
        lines += [f"Profiled decode step ({m['profile']['gpu_experts']} GPU experts): verdict "
                  f"**{m['profile']['verdict']}**.", ""]
    return lines


def _simulation_lines(sim: dict) -> list[str]:
    df = pd.DataFrame([{"policy": r["policy"], "gpu_experts": r["gpu_experts"],
                        "hit": r["hit_rate"]["decode"]} for r in sim["results"]])
    pivot = df.pivot(index="policy", columns="gpu_experts", values="hit")
    rows = [{"policy": p, **{f"{c} GPU": _fmt(v, ".3f") for c, v in row.items()}} for p, row in pivot.iterrows()]
    return [f"Decode hit rate on the synthetic Mixtral-8x7B trace ({sim['trace']['tokens']} tokens):",
            "", *_table(rows)]


TITLES = {"timing": "Timing and the classic mistakes", "batch": "Batch size and throughput",
          "moe": "MoE offloading", "simulation": "Hit-rate simulation"}


def _recorded_lines(recorded: dict[str, dict]) -> list[str]:
    if not recorded:
        return ["No recorded GPU results were found in `data/gpu/` (the lead records them on the GPU machine "
                "with `bash benchmarks/run_gpu.sh`).", ""]
    rows = []
    for name, doc in recorded.items():
        env = recorded_env(doc)
        rows.append({"result": f"`data/gpu/{name}.json`", "device": env.get("gpu") or env.get("device") or "?",
                     "date": str(env.get("timestamp") or "?")[:10],
                     "complete": "no" if doc.get("complete") is False or doc.get("status") == "running" else "yes"})
    return ["Recorded on the GPU machine (notebook `04_paper_figures` draws their figures):", "", *_table(rows)]


def write_summary(run: Run, recorded: dict[str, dict] | None = None) -> Path:
    """Write ``summary.md``: environment, headline numbers, every figure, errors, recorded GPU results."""
    from .env import environment

    env = environment(run.device)
    heads = headlines(run)
    lines = ["# toolkit report", "",
             f"{env['timestamp']} on `{env['host']}`: {env.get('gpu') or env['cpu_model']} "
             f"({run.device}; {env['cpu_physical_cores']} CPU cores, {env['cpu_threads']} threads), "
             f"torch {env['torch']}, transformers {env['transformers']}.", "",
             f"Command: `{run.command or 'python -m toolkit report'}`", ""]
    done = [n for n in EXPERIMENTS if n in run.results or n in run.errors]
    for name in done:
        lines += [f"## {TITLES[name]}", ""]
        if name in run.errors:
            lines += [f"**Failed:** `{run.errors[name]}` (traceback in `{name}.error.txt`).", ""]
        elif not run.results[name].get("complete"):
            lines += ["**Incomplete** (interrupted): partial results below.", ""]
        lines += heads.get(name, [])
        for exp, stem, caption in run.figures:
            if exp == name:
                lines += [f"![{stem}](figures/{stem}.png)", "", f"*{caption}* ([PDF](figures/{stem}.pdf))", ""]
        lines += [f"Data: [`{name}.json`]({name}.json)" + (f", {run.seconds[name]:.0f} s." if name in run.seconds
                                                          else "."), ""]
    missing = [n for n in EXPERIMENTS if n not in done]
    if missing:
        lines += [f"Not run: {', '.join(missing)}.", ""]
    lines += ["## Recorded GPU results", "", *_recorded_lines(recorded or {})]
    path = run.out / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


__all__ = ["Settings", "SETTINGS", "settings_for", "run_report", "write_summary", "EXPERIMENTS", "Run", "smoke_mode",
           "data_dir", "moe_bench", "offload_run", "sweep_frame", "per_expert_hit_rate", "recorded_results",
           "recorded_env", "recorded_label", "recorded_pitfalls", "recorded_latency", "recorded_timer_agreement",
           "recorded_moe_sweep", "recorded_decode_samples", "recorded_timeline", "recorded_throughput",
           "recorded_throughput_curves", "recorded_moe_schemes", "recorded_moe_decode_sweep",
           "PAPER_FIGURES", "paper_figures"]
