"""ipywidgets builders for the notebooks: controls that redraw a figure without flicker.

Each builder takes result values, frames or small injectable functions (so it
is testable headless, with fakes) and returns a ``Panel``: an ``ipywidgets.VBox``
that also keeps handles on its controls, read-outs and last figure. Controls
use ``continuous_update=False`` (a drag runs the callback once, on release);
figures are redrawn by ``interactive_output`` inside an ``Output`` with
``clear_output(wait=True)``, so the old figure stays until the new one is
ready. Figures are shown as PNG images, which works under any matplotlib
backend (inline, Agg in CI, a browser test).

This module needs ipywidgets; core modules never import it.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence

import ipywidgets as widgets
import numpy as np
from IPython.display import Image, clear_output, display

from . import plots
from .formatting import fmt, is_missing

GPU_EXPERTS_CLASS = "toolkit-gpu-experts"  # DOM classes the browser test looks for (docs/INTERFACES.md)
HIT_RATE_CLASS = "toolkit-hit-rate"


class Panel(widgets.VBox):
    """A VBox with handles: ``controls`` and ``readouts`` (name -> widget) and the last ``figure`` drawn."""

    def __init__(self, children, controls: dict, readouts: dict, **kw):
        super().__init__(children, **kw)
        self.controls = controls
        self.readouts = readouts
        self.figure = None
        self.figures: dict = {}


def show_figure(fig) -> None:
    """Display a matplotlib Figure as a PNG image (inside the current Output)."""
    display(Image(data=plots.to_png(fig)))


def int_slider(description: str, min: int, max: int, value: int, step: int = 1, dom_class: str | None = None):
    """An IntSlider that fires once on release; optionally tagged with a DOM class."""
    s = widgets.IntSlider(value=value, min=min, max=max, step=step, description=description,
                          continuous_update=False, style={"description_width": "initial"},
                          layout=widgets.Layout(width="420px"))
    if dom_class:
        s.add_class(dom_class)
    return s


# ---------------------------------------------------------------- 01: latency distributions


def latency_explorer(results: Mapping, value: Sequence[str] | None = None) -> Panel:
    """Pick timers and a violin/ECDF view of their latency distributions.

    ``results``: {label: LatencyResult or samples (ms)}.
    """
    labels = list(results)
    pick = widgets.SelectMultiple(options=labels, value=tuple(value or labels), description="timers",
                                  rows=min(len(labels), 6))
    kind = widgets.ToggleButtons(options=["violin", "ecdf"], value="violin", description="view")
    readout = widgets.HTML()
    panel = Panel([], controls={"timers": pick, "kind": kind}, readouts={"summary": readout})

    def draw(timers, kind):
        chosen = {k: results[k] for k in timers} or {labels[0]: results[labels[0]]}
        q = plots.latency_quantiles(chosen)
        readout.value = " · ".join(f"<b>{k}</b>: median {fmt(r['median'])} ms, p99 {fmt(r['p99'])} ms"
                                   for k, r in q.iterrows())
        panel.figure = plots.latency_distribution(chosen, kind=kind)
        show_figure(panel.figure)

    out = widgets.interactive_output(draw, {"timers": pick, "kind": kind})
    panel.children = [widgets.HBox([pick, kind]), readout, out]
    return panel


# ---------------------------------------------------------------- 02: throughput vs batch size


def batch_size_explorer(curve, largest: int | None = None, optimal: int | None = None) -> Panel:
    """A batch-size slider over a measured throughput curve: throughput and latency at that batch.

    ``curve``: anything ``plots.throughput_frame`` accepts (columns batch_size,
    throughput, optional latency_ms).
    """
    df = plots.throughput_frame(curve)
    sizes = [int(b) for b in df["batch_size"]]
    if optimal is None:
        optimal = int(df.loc[df["throughput"].idxmax(), "batch_size"])
    slider = widgets.SelectionSlider(options=sizes, value=optimal if optimal in sizes else sizes[0],
                                     description="batch size", continuous_update=False,
                                     style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
    slider.add_class("toolkit-batch-size")
    readout = widgets.HTML()
    readout.add_class("toolkit-throughput")
    panel = Panel([], controls={"batch_size": slider}, readouts={"throughput": readout})
    best = float(df["throughput"].max())

    def draw(batch_size):
        row = df[df["batch_size"] == batch_size].iloc[0]
        lat = row.get("latency_ms")
        per_batch = "" if is_missing(lat) else f", {fmt(lat)} ms per batch"
        readout.value = (f"batch {batch_size}: throughput {row['throughput']:.4g} samples/s "
                         f"({100 * row['throughput'] / best:.0f}% of best){per_batch}")
        panel.figure = plots.throughput_curve(df, largest=largest, optimal=optimal, selected=batch_size)
        show_figure(panel.figure)

    out = widgets.interactive_output(draw, {"batch_size": slider})
    panel.children = [slider, readout, out]
    return panel


# ---------------------------------------------------------------- 03: MoE offloading


def moe_offload_explorer(
    simulate_fn: Callable[[str, int], Mapping],
    n_experts: int,
    policies: Sequence[str],
    value: int | None = None,
    run_engine: Callable | None = None,
    engine_label: str = "run the engine live",
) -> Panel:
    """GPU-experts slider + policy dropdown -> simulated hit rates (instant); a button runs the engine live.

    ``simulate_fn(policy, gpu_experts)`` returns a mapping with ``decode`` and
    ``prefill`` hit rates and ``per_layer``: {phase: [L]} or an [L, E] array,
    drawn as a heat map. ``n_experts`` is the slider's maximum (all experts of
    all layers, or per layer: whatever ``simulate_fn`` counts).
    ``run_engine(policy, gpu_experts, progress)`` (optional) runs a real model
    and returns a mapping with ``tokens_per_s``, ``prefill_ms`` and
    ``decode_ms`` (per generated token); ``progress`` is a tqdm bar it may
    advance. Results of ``simulate_fn`` are cached per (policy, gpu_experts).
    """
    slider = int_slider("GPU experts", 0, int(n_experts), int(n_experts // 2 if value is None else value),
                        dom_class=GPU_EXPERTS_CLASS)
    policy = widgets.Dropdown(options=list(policies), value=list(policies)[0], description="policy")
    hit_rate = widgets.HTML()
    hit_rate.add_class(HIT_RATE_CLASS)
    controls = {"gpu_experts": slider, "policy": policy}
    readouts = {"hit_rate": hit_rate}
    panel = Panel([], controls=controls, readouts=readouts)
    cache: dict = {}

    def draw(gpu_experts, policy):
        key = (policy, int(gpu_experts))
        if key not in cache:
            cache[key] = dict(simulate_fn(policy, int(gpu_experts)))
        r = cache[key]
        hit_rate.value = (f"decode hit rate: {fmt(r.get('decode'), '.3f')} · "
                          f"prefill hit rate: {fmt(r.get('prefill'), '.3f')} "
                          f"<span style='color:gray'>({policy}, {gpu_experts} of {n_experts} experts on the GPU;"
                          f" simulated)</span>")
        per_layer = r.get("per_layer")
        if per_layer is not None:
            is_phases = isinstance(per_layer, Mapping)
            panel.figure = plots.hit_rate_heatmap(per_layer, xlabel="phase" if is_phases else "expert",
                                                  title=f"{policy}, {gpu_experts} GPU experts")
            show_figure(panel.figure)

    out = widgets.interactive_output(draw, dict(controls))
    rows = [widgets.HBox([slider, policy]), hit_rate, out]

    if run_engine is not None:
        button = widgets.Button(description=engine_label, icon="play", layout=widgets.Layout(width="220px"))
        engine_html = widgets.HTML("<i>press the button to measure tokens/s, prefill time and decode latency"
                                   " with these settings</i>")
        engine_html.add_class("toolkit-engine")
        engine_out = widgets.Output()
        controls["run"] = button
        readouts["engine"] = engine_html

        def on_click(_):
            from tqdm.auto import tqdm

            button.disabled = True
            try:
                with engine_out:
                    clear_output(wait=True)
                    with tqdm(desc="engine", unit="tok") as bar:
                        m = dict(run_engine(policy.value, int(slider.value), bar))
                    clear_output(wait=True)
                    decode = np.asarray(m.get("decode_ms", ()), dtype=float)
                    engine_html.value = (
                        f"<b>live</b> ({policy.value}, {slider.value} GPU experts): "
                        f"{fmt(m.get('tokens_per_s'))} tokens/s · prefill "
                        f"{fmt(m.get('prefill_ms'), '.4g')} ms · decode median "
                        f"{fmt(np.median(decode) if decode.size else None, '.4g')} ms/token"
                        + (f" · decode hit rate {fmt(m['hit_rate'], '.3f')}" if "hit_rate" in m else "")
                        + (f" <span style='color:gray'>(engine: {m['engine_gpu_experts']} of "
                           f"{m['engine_total_experts']} experts on the GPU)</span>"
                           if "engine_gpu_experts" in m else ""))
                    if decode.size:
                        panel.figures["decode_distribution"] = plots.latency_distribution(
                            {"decode step": decode}, kind="violin", log=False)
                        panel.figures["decode_over_tokens"] = plots.decode_latency_over_tokens(
                            decode, prefill_ms=m.get("prefill_ms"))
                        for fig in panel.figures.values():
                            show_figure(fig)
            except Exception as e:  # show the failure in the panel instead of losing it in the log
                engine_html.value = f"<b>engine run failed:</b> {html.escape(str(e))}"
                raise
            finally:
                button.disabled = False

        button.on_click(on_click)
        rows += [widgets.HBox([button, engine_html]), engine_out]

    panel.children = rows
    return panel


def simulated_hit_rates(trace="synthetic-mixtral") -> tuple[Callable[[str, int], dict], int]:
    """A ``simulate_fn`` for ``moe_offload_explorer`` (the simulator on a routing trace) and its expert count."""
    from .moe.simulate import simulate
    from .moe.trace_catalog import load_trace

    tr = load_trace(trace)

    def simulate_fn(policy: str, gpu_experts: int) -> dict:
        r = simulate(tr, policy, gpu_experts)
        return {"decode": r.hit_rate("decode"), "prefill": r.hit_rate("prefill"),
                "per_layer": {"prefill": r.per_layer("prefill"), "decode": r.per_layer("decode")}}

    return simulate_fn, tr.n_layers * tr.n_experts


class LiveEngine:
    """A ``run_engine`` for ``moe_offload_explorer``: a small MoE model, offloaded and generating for real.

    The slider counts experts of the simulated trace (``total`` of them); the
    engine keeps the same share of its own ``layers x experts`` on the GPU. It
    runs through ``toolkit.moe.run.MoESession`` (the path of the CLI and the
    report): a Mixtral-shaped preset replays the synthetic Mixtral trace's
    routing, so its hit rates are comparable with the simulator's. The model is
    built on the first run and reused.

    ``settings``: a ``MoESettings`` (default: its defaults); keyword
    ``overrides`` replace its fields (preset, layers, device, prompt_tokens,
    new_tokens, ...). ``session``: an ``MoESession`` already built (a
    notebook's), used instead of building one from ``settings``.
    """

    def __init__(self, settings=None, total: int = 256, session=None, **overrides):
        from .moe.run import MoESettings, resolve_settings

        if session is not None:
            if settings is not None or overrides:
                from .errors import ToolkitError

                raise ToolkitError("LiveEngine: give a session or settings, not both")
            settings = session.settings
        self.settings = resolve_settings(settings or MoESettings(), **overrides)
        self.total = total
        self.session = session

    @property
    def preset(self) -> str:
        return self.settings.preset

    @property
    def total_experts(self) -> int:
        """Experts of the engine's model, over all layers."""
        from .moe.presets import from_name

        p = from_name(self.settings.preset, self.settings.layers)
        return p.layers * p.experts

    def gpu_experts_for(self, gpu_experts: int) -> int:
        """The engine's expert count for a slider value (the same share of all experts)."""
        return int(round(gpu_experts / max(self.total, 1) * self.total_experts))

    def __call__(self, policy: str, gpu_experts: int, progress=None) -> dict:
        from .moe.run import MoESession

        if self.session is None:
            self.session = MoESession(self.settings)
        k = self.gpu_experts_for(gpu_experts)
        if progress is not None:
            progress.reset(total=self.settings.new_tokens)
        r = self.session.run(gpu_experts=k, policy=policy,
                             streamer=_ProgressSink(progress) if progress is not None else None)
        return {"tokens_per_s": r.decode_tokens_per_s, "prefill_ms": r.prefill_ms,
                "decode_ms": list(r.generation.decode_samples_ms), "hit_rate": (r.hit_rate or {}).get("decode"),
                "engine_gpu_experts": k, "engine_total_experts": self.session.total_experts, "result": r}

    def close(self) -> None:
        """Free the model (the next run builds it again)."""
        if self.session is not None:
            self.session.close()
            self.session = None


class _ProgressSink:
    """A generation streamer that only advances a progress bar (one step per final token)."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, ids) -> None:
        self.bar.update(len(ids))

    def end(self) -> None:
        self.bar.refresh()


def moe_offload_widget(trace="synthetic-mixtral", policies: Sequence[str] | None = None, value: int | None = None,
                       live: bool = True, **engine_kw) -> Panel:
    """The notebook 03 widget: simulated hit rates for the slider, and a live engine run on demand.

    ``engine_kw`` go to ``LiveEngine``: ``session`` (an ``MoESession`` to reuse), or ``settings`` (a
    ``MoESettings``) and/or its fields (preset, layers, device, prompt_tokens, new_tokens, ...).
    """
    from .moe.policies import POLICY_NAMES

    simulate_fn, total = simulated_hit_rates(trace)
    policies = list(policies or POLICY_NAMES)
    engine = LiveEngine(total=total, **engine_kw) if live else None
    label = "run the engine live"
    if engine is not None:
        label = f"run {engine.preset} live"
    return moe_offload_explorer(simulate_fn, total, policies, value=total // 4 if value is None else value,
                                run_engine=engine, engine_label=label)
