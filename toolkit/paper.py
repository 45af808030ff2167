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
    recorded_decode_samples,
    recorded_latency,
    recorded_moe_decode_sweep,
    recorded_moe_schemes,
    recorded_moe_sweep,
    recorded_pitfalls,
    recorded_throughput_curves,
    recorded_timeline,
    recorded_timer_agreement,
    recording,
)
from .settings import data_dir

ROUTING = "routing"  # the source of figures drawn from the shipped routing statistics (no recording needed)


@dataclass(frozen=True)
class PaperFigure:
    """A README figure: its file stem, the data it is drawn from, how, and its caption."""

    stem: str
    source: str  # a file under data/ ("gpu/timer_agreement.json"), or ROUTING
    draw: Callable  # (parsed source, or None for ROUTING) -> Figure, or None when the file holds no data for it
    caption: str


def _from(reader: Callable, figure: Callable) -> Callable:
    """A ``draw``: read the data with ``reader``, draw it with ``figure``, None when there is nothing to draw."""

    def draw(doc):
        data = reader(doc)
        return figure(data) if len(data) else None  # readers return an empty value when there is no data

    return draw


@functools.lru_cache(maxsize=1)  # both hit-rate figures draw from one sweep
def simulated_sweep(budgets: tuple[int, ...] = (0, 32, 64, 96, 128, 160, 192, 224, 256),
                    policies: tuple[str, ...] = ("static-uniform", "static-popularity", "lru", "lfu", "belady"),
                    heatmap_budget: int = 64) -> tuple[pd.DataFrame, dict, int]:
    """(policy, gpu_experts, hit_rate) frame, per-layer decode hit rates at ``heatmap_budget``, expert count.

    The synthetic Mixtral-8x7B trace, fitted to ``data/routing``: no GPU needed.
    """
    from .moe.simulate import simulate
    from .moe.trace_catalog import named_trace

    trace = named_trace("synthetic-mixtral")
    results = [simulate(trace, p, b) for p in policies for b in budgets]
    frame = pd.DataFrame([{"policy": r.policy, "gpu_experts": r.gpu_experts, "hit_rate": r.hit_rate("decode")}
                          for r in results])
    per_layer = {r.policy: r.per_layer("decode") for r in results if r.gpu_experts == heatmap_budget}
    return frame, per_layer, trace.n_layers * trace.n_experts


def _simulated_curve(_):
    frame, _, total = simulated_sweep()
    return plots.hit_rate_vs_gpu_experts(frame, total_experts=total)


def _simulated_layers(_):
    return plots.hit_rate_heatmap(simulated_sweep()[1], xlabel="policy")


def _first_curve(curves):
    _, curve, largest, optimal = curves[0]
    return plots.throughput_curve(curve, largest=largest, optimal=optimal)


def _sweep(frame):
    return plots.offload_sweep(frame, total_experts=frame.attrs["total_experts"])


PAPER_FIGURES = [
    PaperFigure("gpu_pitfall_errors", "gpu/timer_agreement.json", _from(recorded_pitfalls, plots.pitfall_errors),
                "Each classic timing mistake's reading relative to the correct timer (efficientnet-b0, batch 1)."),
    PaperFigure("gpu_latency_distribution", "gpu/timer_agreement.json",
                _from(recorded_latency, plots.latency_distribution),
                "Latency distribution of the correct timer against the warm-up calls a naive timer includes."),
    PaperFigure("gpu_timer_agreement", "gpu/timer_agreement.json",
                _from(recorded_timer_agreement, plots.timer_comparison),
                "measure_latency against torch.utils.benchmark and triton's do_bench, like for like."),
    PaperFigure("gpu_throughput_vs_batch", "gpu/batch_search.json", _from(recorded_throughput_curves, _first_curve),
                "Throughput vs batch size up to the largest batch that fits; the optimal batch marked."),
    PaperFigure("gpu_moe_schemes", "gpu/moe_decode.json", _from(recorded_moe_schemes, plots.scheme_comparison),
                "Decode tokens/s of the offload schemes at the same GPU expert budget (Mixtral-8x7B layers, batch 1),"
                " with each run's roofline bound."),
    PaperFigure("gpu_moe_decode_sweep", "gpu/moe_decode.json", _from(recorded_moe_decode_sweep, _sweep),
                "Our engine over GPU expert budgets (Mixtral-8x7B layers, replayed Mixtral routing): decode tokens/s,"
                " prefill time and decode hit rate."),
    PaperFigure("gpu_moe_offload_sweep", "gpu/moe_engine.json", _from(recorded_moe_sweep, _sweep),
                "Offloaded Mixtral-8x7B layers: decode tokens/s, prefill time and hit rate vs GPU-resident experts."),
    PaperFigure("gpu_moe_decode_latency", "gpu/moe_engine.json",
                _from(recorded_decode_samples, plots.decode_latency_over_tokens),
                "Per-token decode latency of offloaded Mixtral-8x7B layers for a few GPU expert budgets."),
    PaperFigure("gpu_moe_timeline", "gpu/profile_cases.json", _from(recorded_timeline, plots.timeline_gantt),
                "One profiled decode step of the offload engine: CPU experts overlapping GPU work."),
    PaperFigure("hit_rate_vs_gpu_experts", ROUTING, _simulated_curve,
                "Simulated decode hit rate vs GPU-resident experts per policy (synthetic Mixtral-8x7B trace "
                "fitted to data/routing)."),
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


__all__ = ["PaperFigure", "PAPER_FIGURES", "ROUTING", "draw_paper_figure", "paper_figures", "simulated_sweep"]
