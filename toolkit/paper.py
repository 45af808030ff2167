"""The README's figures, redrawn from the files in ``data/`` (never by measuring).

Each ``PaperFigure`` names its source (a recorded result under ``data/gpu/``,
or the shipped routing statistics under ``data/routing/``), how it is drawn
and its caption. ``paper_figures()`` redraws them all into ``data/figures/``
as PDF and PNG; the notebooks show the recorded ones next to their live
measurements with ``draw_paper_figure``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import plots
from .recorded import (
    recorded_captured_step,
    recorded_cpu_gemv,
    recorded_decode_samples,
    recorded_decode_timeline,
    recorded_first_call_ms,
    recorded_latency,
    recorded_moe_decode_sweep,
    recorded_moe_schemes,
    recorded_moe_sweep,
    recorded_multi_gpu,
    recorded_pitfalls,
    recorded_stop_check,
    recorded_throughput_cases,
    recorded_timeline,
    recorded_timer_differences,
    recorded_where,
    recording,
)
from .settings import data_dir

ROUTING = "routing"  # the source of figures drawn from the shipped routing statistics (no recording needed)
SIMULATED = "simulated from routing alone (no device, no timing): synthetic Mixtral-8x7B trace"


@dataclass(frozen=True)
class PaperFigure:
    """A README figure: its file stem, the data it is drawn from, how, and its caption.

    ``draw(doc)``: the parsed source (None for ROUTING) -> a Figure whose title
    names what is measured, the model, dtype and device; None when the file
    holds no data for it.
    """

    stem: str
    source: str  # a file under data/ ("gpu/timer_agreement.json"), or ROUTING
    draw: Callable
    caption: str


@functools.lru_cache(maxsize=1)  # both hit-rate figures draw from one sweep
def simulated_sweep(budgets: tuple[int, ...] = (0, 32, 64, 96, 128, 160, 192, 224, 256),
                    policies: tuple[str, ...] = ("static-uniform", "static-popularity", "lru", "lfu", "belady"),
                    heatmap_budget: int = 64) -> tuple[pd.DataFrame, dict, int]:
    """(policy, gpu_experts, hit_rate) frame, per-layer decode hit rates at ``heatmap_budget``, expert count.

    The synthetic Mixtral-8x7B trace, fitted to ``data/routing``: no GPU needed.
    ``frame.attrs``: ``tokens`` of the trace and the ``heatmap_budget``.
    """
    from .moe.simulate import simulate
    from .moe.trace_catalog import named_trace

    trace = named_trace("synthetic-mixtral")
    results = [simulate(trace, p, b) for p in policies for b in budgets]
    frame = pd.DataFrame([{"policy": r.policy, "gpu_experts": r.gpu_experts, "hit_rate": r.hit_rate("decode")}
                          for r in results])
    frame.attrs.update(tokens=trace.n_tokens, layers=trace.n_layers, experts=trace.n_experts,
                       heatmap_budget=heatmap_budget)
    per_layer = {r.policy: r.per_layer("decode") for r in results if r.gpu_experts == heatmap_budget}
    return frame, per_layer, trace.n_layers * trace.n_experts


# ---------------------------------------------------------------- what each title names


def _audit_setup(doc) -> str:
    a = (doc or {}).get("pitfall_audit") or {}
    return f"{a.get('model') or 'model'}, batch {a.get('batch_size') or 1}, float32 · {recorded_where(doc)}"


def _moe_setup(doc, layers=None, extra: str = "") -> str:
    s = (doc or {}).get("settings") or {}
    return (f"{s.get('preset', 'MoE')} dims, {layers or s.get('layers', '?')} layers, {s.get('dtype', 'bfloat16')}, "
            f"batch 1{extra} · {recorded_where(doc)}")


def _excluded(fig, frame):
    """Say under ``fig`` which anomalous runs ``frame`` left out (``attrs["excluded"]``)."""
    plots.annotate_warnings(fig, [f"excluded {x}" for x in frame.attrs.get("excluded") or []])
    return fig


# ---------------------------------------------------------------- the figures


def _pitfalls(doc):
    audit = recorded_pitfalls(doc)
    if not len(audit):
        return None
    return plots.pitfall_errors(audit, title=f"Each timing mistake against the correct timer (median, 95% CI)\n"
                                             f"{_audit_setup(doc)}")


def _latency(doc):
    series = recorded_latency(doc)
    if not series:
        return None
    return plots.latency_distribution(series, first_call_ms=recorded_first_call_ms(doc),
                                      title=f"Latency per call: steady state, warm-up, first call\n"
                                            f"{_audit_setup(doc)}")


def _timer_agreement(doc):
    frame = recorded_timer_differences(doc)
    if not len(frame):
        return None
    rounds = int(frame["rounds"].max()) if frame["rounds"].max() > 0 else 1
    return plots.timer_agreement(frame, band=AGREEMENT_BAND, timer="measure_latency", reference="do_bench",
                                 title=f"measure_latency vs triton do_bench, both with a cold L2\n"
                                       f"medians of {rounds} alternating rounds · {recorded_where(doc)}")


def _throughput(doc):
    frame = recorded_throughput_cases(doc)
    if not len(frame):
        return None
    return plots.throughput_curves(frame, title="Throughput vs batch size, up to the largest batch that fits\n"
                                                f"CUDA events, after warm-up · {recorded_where(doc)}")


def _schemes(doc):
    frame = recorded_moe_schemes(doc, ("compare", "ablation"))
    if not len(frame):
        return None
    s = (doc or {}).get("settings") or {}
    return plots.scheme_comparison(frame, title=f"Decode speed per offload scheme, {s.get('budget', '?')} of "
                                                f"{s.get('total_experts', '?')} experts on the GPU (all-gpu: every "
                                                f"expert)\n{_moe_setup(doc)}")


def _all_resident(doc):
    frame = recorded_moe_schemes(doc, ("compare", "ablation"))
    if not len(frame):
        return None
    return plots.scheme_comparison(frame, title=f"Every expert resident: decode tokens/s with fused kernels (all-gpu), "
                                                f"with torch's ops\n(all-gpu-unfused) and transformers' eager "
                                                f"generate (hf-eager)\n{_moe_setup(doc)}")


def _captured(doc):
    frame = recorded_moe_schemes(doc, "ablation")
    if not len(frame):
        return None
    s = (doc or {}).get("settings") or {}
    return plots.scheme_comparison(frame, title=f"{s.get('budget', '?')} of {s.get('total_experts', '?')} experts "
                                                f"on the GPU, decode steps\ncaptured whole (ours-default) "
                                                f"or layer by layer (ours-per-layer)\n{_moe_setup(doc)}")


def _multi_gpu(doc, measure: str = "decode"):
    frame = recorded_multi_gpu(doc, measure)
    if not len(frame):
        return None
    s = (doc or {}).get("settings") or {}
    value = "tokens_per_s" if measure == "decode" else "ms"
    what = (f"decode tokens/s ({s.get('new_tokens', '?')} tokens after {s.get('prompt_tokens', '?')})"
            if measure == "decode" else f"{s.get('prefill_tokens', '?')}-token prefill ms")
    return plots.scheme_comparison(frame, value=value, label=what,
                                   title=f"Resident experts on one GPU or spread over two: {what}\n{_moe_setup(doc)}")


def _cpu_kernel(doc):
    frame = recorded_cpu_gemv(doc)
    if not len(frame):
        return None
    a = frame.attrs
    return plots.cpu_kernel_rates(frame, title=f"One CPU expert ({a['expert_mb']:.0f} MB, bf16), {a['threads']} threads\n"
                                               f"median of alternating rounds (bars: their range)\n"
                                               f"{recorded_where(doc)}")


def _host_segments(doc):
    frame = recorded_decode_timeline(doc)
    if not len(frame):
        return None
    s = (doc or {}).get("settings") or {}
    fig = plots.host_segments(frame, title=f"Where an offloaded decode step goes, {s.get('gpu_experts', '?')} experts "
                                           f"on the GPU, by CPU-expert schedule\n{_moe_setup(doc)}")
    return _excluded(fig, frame)


def _captured_step(doc):
    frame = recorded_captured_step(doc)
    if not len(frame):
        return None
    s, split = (doc or {}).get("settings") or {}, (doc or {}).get("graph_misses") or {}
    layers, experts = s.get("layers", "?"), s.get("gpu_experts", "?")
    return plots.host_segments(
        frame, xlabel="ms per profiled step (summed over its layers)",
        title=f"Where a decode step captured whole goes, summed over its layers\n{layers} Mixtral-8x7B layers "
              f"(bf16), {experts} experts resident, {s.get('routing', '?')} routing\nmissed experts split at unit "
              f"{split.get('units', '?')}; {recorded_where(doc)}")


def _stop_check(doc):
    frame = recorded_stop_check(doc)
    if not len(frame):
        return None
    s = (doc or {}).get("settings") or {}
    frame = frame.assign(way=frame["way"].map({"every step": "stop check every step", "late": "stop check one step "
                                                                                              "late"}))
    return plots.paired_ways(
        frame, title=f"Decode tokens/s of generate, transformers' stop check read after every step or one step "
                     f"late (the ratio to every step)\n{s.get('layers', '?')} Mixtral-8x7B layers (bf16), batch 1, "
                     f"{s.get('routing', '?')} routing; ours: {s.get('gpu_experts', '?')} experts on the GPU, "
                     f"all-gpu: every expert, hf-eager: the unmodified model · {recorded_where(doc)}")


def _decode_sweep(doc, routing: str = "trace"):
    frame = recorded_moe_decode_sweep(doc, routing)
    if not len(frame):
        return None
    fig = plots.offload_sweep(frame, total_experts=frame.attrs["total_experts"],
                              title=f"Our engine vs GPU expert budget ({routing} routing, greedy decode)\n"
                                    f"{_moe_setup(doc)}")
    return _excluded(fig, frame)


def _engine_sweep(doc):
    frame = recorded_moe_sweep(doc)
    if not len(frame):
        return None
    fig = plots.offload_sweep(frame, total_experts=frame.attrs["total_experts"],
                              title=f"Offloaded generation vs GPU expert budget (greedy decode)\n{_moe_setup(doc)}")
    return _excluded(fig, frame)


def _decode_latency(doc):
    series = recorded_decode_samples(doc)
    if not series:
        return None
    return plots.decode_latency_over_tokens(series, title=f"Per-token decode latency\n{_moe_setup(doc)}")


def _timeline(doc):
    frame = recorded_timeline(doc)
    if not len(frame):
        return None
    case = ((doc or {}).get("cases") or {}).get("moe_decode") or {}
    preset = case.get("preset") or "MoE"
    dtype = _preset_dtype(preset)
    setup = (f"{preset} dims, {case.get('layers', '?')} layers, {case.get('gpu_experts', '?')} GPU experts, "
             f"{dtype}, batch 1 · {recorded_where(doc)}")
    return plots.timeline_gantt(frame, title=f"One profiled decode step: what runs where, and when\n{setup}")


def _preset_dtype(preset: str) -> str:
    """The dtype a MoE preset is built in ('bfloat16'), or '?' for an unknown preset."""
    from .moe.presets import from_name

    try:
        return str(from_name(preset).dtype).removeprefix("torch.")
    except Exception:  # an unknown preset name: the title says so rather than failing the figure
        return "?"


def _simulated_curve(_):
    frame, _, total = simulated_sweep()
    return plots.hit_rate_vs_gpu_experts(
        frame, phase="decode", total_experts=total,
        title=f"Decode hit rate per policy vs GPU-resident experts\n{SIMULATED} ({frame.attrs['tokens']:,} tokens)")


def _simulated_layers(_):
    frame, per_layer, total = simulated_sweep()
    return plots.hit_rate_heatmap(per_layer, xlabel="policy",
                                  title=f"Decode hit rate per layer and policy, {frame.attrs['heatmap_budget']} of "
                                        f"{total} experts on the GPU\n{SIMULATED}")


AGREEMENT_BAND = 0.03  # benchmarks/timer_agreement.py's criterion: within 3% of do_bench

PAPER_FIGURES = [
    PaperFigure("gpu_pitfall_errors", "gpu/timer_agreement.json", _pitfalls,
                "Each classic timing mistake's reading relative to the correct timer (efficientnet-b0, batch 1)."),
    PaperFigure("gpu_latency_distribution", "gpu/timer_agreement.json", _latency,
                "Latency distribution of the correct timer against the warm-up calls a naive timer includes, and "
                "the very first call of the freshly built model past the axis break."),
    PaperFigure("gpu_timer_agreement", "gpu/timer_agreement.json", _timer_agreement,
                "measure_latency with an L2 flush against triton's do_bench (also cold L2), like for like: the "
                "difference of their medians per workload, the range over alternating rounds, a +-3% band."),
    PaperFigure("gpu_throughput_vs_batch", "gpu/batch_search.json", _throughput,
                "Throughput vs batch size for every recorded model and dtype, up to the largest batch that fits; "
                "the optimal batch (the smallest within 3% of the best) starred."),
    PaperFigure("gpu_moe_schemes", "gpu/moe_decode_h200.json", _schemes,
                "Decode tokens/s of the offload schemes at the same GPU expert budget (Mixtral-8x7B layers, batch 1),"
                " with each run's roofline bound; '-eager' runs the dense part of decode steps without CUDA graphs; "
                "a run whose decode rounds disagree is excluded and named under the figure."),
    PaperFigure("gpu_moe_full_model", "gpu/moe_decode_h200_full_copy_kernel.json", _schemes,
                "Decode tokens/s of the whole Mixtral-8x7B (32 layers, batch 1): every expert resident (our engine's "
                "sync-free layers, and transformers' eager generate) and 56 of 256 experts on the GPU, with each "
                "run's roofline bound; a run whose decode rounds disagree is excluded and named."),
    PaperFigure("gpu_moe_all_resident", "gpu/moe_decode_h200_fused_second_host.json", _all_resident,
                "Every expert of 8 Mixtral-8x7B layers resident (batch 1): decode tokens/s of the engine with its "
                "fused Triton kernels and with torch's ops, and of transformers' eager generate on the unmodified "
                "model, each with its HBM roofline bound; a run whose decode rounds disagree is excluded and named."),
    PaperFigure("gpu_moe_captured", "gpu/moe_decode_h200_captured.json", _captured,
                "14 of 64 experts of 8 Mixtral-8x7B layers on the GPU (batch 1, uniform routing): decode tokens/s "
                "with each decode step captured whole (missed experts split between conditional copies and a CPU "
                "host function) and with the per-layer path, 3 alternating rounds, each with its roofline bound."),
    PaperFigure("gpu_moe_captured_step", "gpu/captured_step_h200.json", _captured_step,
                "A decode step captured whole (Mixtral-8x7B layers, 14 of 64 experts on the GPU, batch 1) under "
                "torch's profiler, cut at each layer's copies and the host function's own stamps: the CPU's share "
                "streams, with the copies beside it, for most of the step; the layers' dense part and the host "
                "node's latencies are the rest."),
    PaperFigure("gpu_stop_check", "gpu/stop_check_h200.json", _stop_check,
                "generate with transformers' stop check read after every decode step (a sync) or one step late "
                "(the default on a GPU where no step can end early): the median of 3 rounds, order alternating; a "
                "way whose rounds disagree is excluded and named under the figure."),
    PaperFigure("gpu_moe_multi_gpu_decode", "gpu/moe_multi_gpu.json", _multi_gpu,
                "Decode tokens/s with the resident experts on one GPU or spread over two at the same per-GPU budget, "
                "with each run's roofline bound; a run whose decode rounds disagree is excluded and named."),
    PaperFigure("gpu_moe_multi_gpu_prefill", "gpu/moe_multi_gpu.json", functools.partial(_multi_gpu, measure="prefill"),
                "512-token prefill time on one GPU or two at the same per-GPU budget (lower is better), with each "
                "run's roofline bound; a run whose prefill rounds disagree is excluded and named."),
    PaperFigure("gpu_cpu_kernel", "gpu/cpu_gemv_h200_amx.json", _cpu_kernel,
                "The rate one CPU expert reads its bf16 weights at, by tokens in the pass: torch's matmul and the "
                "toolkit's kernel (which the calibration picks where it is faster), also with its vector and AMX "
                "paths each forced, against the host's read rate and the same expert with float32 weights."),
    PaperFigure("gpu_decode_timeline", "gpu/decode_timeline_h200.json", _host_segments,
                "An offloaded decode step (Mixtral-8x7B layers, 14 of 64 experts on the GPU) split by the engine's "
                "marks into host segments per layer, summed per step, for each CPU-expert schedule and routing; "
                "configurations whose rounds disagree are excluded and named under the figure."),
    PaperFigure("gpu_moe_decode_sweep", "gpu/moe_decode.json", _decode_sweep,
                "Our engine over GPU expert budgets (Mixtral-8x7B layers, replayed Mixtral routing): decode tokens/s,"
                " prefill time and decode hit rate."),
    PaperFigure("gpu_moe_offload_sweep", "gpu/moe_engine.json", _engine_sweep,
                "Offloaded Mixtral-8x7B layers: decode tokens/s, prefill time and hit rate vs GPU-resident experts."),
    PaperFigure("gpu_moe_decode_latency", "gpu/moe_engine.json", _decode_latency,
                "Per-token decode latency of offloaded Mixtral-8x7B layers for a few GPU expert budgets."),
    PaperFigure("gpu_moe_timeline", "gpu/profile_cases.json", _timeline,
                "One profiled decode step of the offload engine: CPU experts overlapping GPU work."),
    PaperFigure("hit_rate_vs_gpu_experts", ROUTING, _simulated_curve,
                "Simulated decode hit rate vs GPU-resident experts per policy (synthetic Mixtral-8x7B trace "
                "fitted to data/routing), and each policy's difference to static-popularity."),
    PaperFigure("hit_rate_per_layer", ROUTING, _simulated_layers,
                "Simulated decode hit rate per layer and policy with 64 of 256 experts on the GPU."),
]


def draw_paper_figure(figure: PaperFigure, data: str | os.PathLike | None = None) -> dict:
    """Draw one figure from ``data`` (default ``data_dir()``), without saving it.

    Returns stem, caption, source, label ('recorded on <GPU>, <date>' for a
    recorded result, None for ROUTING), ``figure`` (a matplotlib Figure) or
    ``missing`` (why it could not be drawn), and ``paths`` (empty until saved).
    """
    row = {"stem": figure.stem, "caption": figure.caption, "source": figure.source, "label": None, "paths": [],
           "missing": None, "figure": None}
    doc = None
    if figure.source != ROUTING:
        rec = recording(figure.source, data)
        if rec.doc is None:
            row["missing"] = f"no recording: {rec.problem}"
            return row
        doc, row["label"] = rec.doc, rec.label
    fig = figure.draw(doc)
    if fig is None:
        row["missing"] = f"data/{figure.source} holds no data for this figure"
    row["figure"] = fig
    return row


def paper_figures(out: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                  only: list[str] | None = None) -> list[dict]:
    """Redraw every README figure from the files in ``data/`` into ``out`` (default data/figures).

    Returns one row per figure as ``draw_paper_figure`` does, with ``paths``
    (PNG, PDF) filled in for each figure drawn.
    """
    data = Path(data) if data is not None else data_dir()
    out = Path(out) if out is not None else data / "figures"
    rows = []
    for f in PAPER_FIGURES:
        if only and f.stem not in only:
            continue
        row = draw_paper_figure(f, data)
        if row["figure"] is not None:
            row["paths"] = plots.save(row["figure"], out / f.stem)
        rows.append(row)
    return rows


__all__ = ["PaperFigure", "PAPER_FIGURES", "ROUTING", "SIMULATED", "AGREEMENT_BAND", "draw_paper_figure",
           "paper_figures", "simulated_sweep"]
