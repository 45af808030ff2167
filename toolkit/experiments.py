"""The four default experiments, each a plain function: settings and a device in, record and figures out.

- ``timing_experiment``: ``measure_latency`` of a benchmark model and
  ``pitfalls.audit`` (each classic timing mistake against the correct timer);
- ``batch_experiment``: the exact largest batch that fits, the throughput
  curve up to it, and the optimal batch (often smaller than the largest);
- ``moe_experiment``: a MoE model offloaded with a sweep of GPU-resident
  experts (tokens/s, prefill time, decode latency, hit rates) and a profile of
  one decode step (the CPU/GPU timeline), through ``toolkit.moe.run``;
- ``simulation_experiment``: the hit-rate simulator on the synthetic Mixtral
  trace, every policy over GPU expert budgets.

The report (``toolkit.report.run_report``) saves what they return; the
notebooks call the same functions with the same settings and show it. Each
takes ``on_update(record)``, called with the partial record (``"complete":
False``) as measurements come in, so a caller can save what an interrupted
run measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from . import plots
from .results import provenance
from .settings import Settings

OnUpdate = Callable[[dict], None] | None


@dataclass(frozen=True)
class ExperimentFigure:
    """One figure of an experiment: the file stem it is saved under, its caption, the matplotlib Figure."""

    stem: str
    caption: str
    figure: object


@dataclass(frozen=True)
class ExperimentResult:
    """What one experiment measured.

    ``record``: JSON-ready, what the report saves as ``<name>.json``.
    ``figures``: in the order the summary shows them. ``values``: the result
    objects behind the record (frames, ``LatencyResult``, ``MoERunResult``, ...)
    for a notebook to explore; see each experiment's docstring for the keys.
    """

    name: str
    record: dict
    figures: tuple[ExperimentFigure, ...] = ()
    values: dict = field(default_factory=dict)

    def figure(self, stem: str):
        """The Figure saved under ``stem``."""
        for f in self.figures:
            if f.stem == stem:
                return f.figure
        raise KeyError(f"{self.name} has no figure {stem!r}; it has {', '.join(f.stem for f in self.figures)}")

    def to_dict(self) -> dict:
        return self.record


def new_record(name: str, settings: Settings, device: str, command: str | None = None, **fields) -> dict:
    """The start of an experiment's record: name, ``complete: False``, provenance and settings."""
    return {"experiment": name, "complete": False, "provenance": provenance(device, command),
            "settings": asdict(settings), **fields}


def _update(on_update: OnUpdate, record: dict) -> None:
    if on_update is not None:
        on_update(record)


def device_name(record: dict, device: str) -> str:
    """'<GPU or CPU model> (<device>)' from a record's provenance: what a figure's title names as its device."""
    env = record.get("provenance") or {}
    name = env.get("gpu") if str(device).startswith("cuda") else env.get("cpu_model")
    return f"{name} ({device})" if name else str(device)


def _bar(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, leave=False, **kw)


# ---------------------------------------------------------------- timing


def timing_experiment(settings: Settings, device: str = "auto", *, progress: bool = False,
                      on_update: OnUpdate = None, command: str | None = None) -> ExperimentResult:
    """Latency of ``settings.latency_model`` with the correct timer, and each classic mistake's error against it.

    values: ``audit`` (``pitfalls.audit``'s frame), ``latency`` (the correct
    timer's LatencyResult), ``distributions`` ({label: samples in ms}).
    """
    from . import pitfalls
    from .env import resolve_device
    from .models import build_model

    s, device = settings, resolve_device(device)
    model = build_model(s.latency_model, device=device)
    x = model.make_input(1)
    frame = pitfalls.audit(model, x, device, max_time_s=s.audit_time_s)  # first: the model is still cold
    correct = frame.attrs["correct"]
    steady = "steady state (UNRELIABLE)" if correct.unreliable else "steady state (measured)"
    dists = {steady: list(correct.samples_ms), "warm-up calls": list(correct.warmup_ms)}
    if device.startswith("cuda"):  # the GPU-only mistakes, as distributions
        host = tuple(t.cpu() for t in x)
        dists["copy in timed region"] = pitfalls.time_copy_in_timed_region(model, host, device)
        dists["host clock, no sync"] = pitfalls.time_host_clock_no_sync(model, x, device)
    dists = {k: list(v) for k, v in dists.items() if len(v)}
    from .timing import warning_lines

    record = new_record("timing", s, device, command, model=s.latency_model, latency=correct.to_dict(),
                        audit=frame.to_dict("records"), audit_warnings=warning_lines(frame),
                        distributions=dists, complete=True)
    _update(on_update, record)
    from .recorded import audit_first_call_ms

    setup = f"{s.latency_model}, batch 1, {str(model.dtype).removeprefix('torch.')} · {device_name(record, device)}"
    figures = (
        ExperimentFigure("latency_distribution",
                         f"Latency of {s.latency_model} (batch 1, {device}): the measured steady state against the "
                         "warm-up calls a naive timer includes, and the very first call of the freshly built model; "
                         "median (bar) and p99 (triangle) marked.",
                         plots.latency_distribution({**dists, steady: correct}, kind="violin", first_call_ms=audit_first_call_ms(
                             frame.to_dict("records")), title=f"Latency per call (ms)\n{setup}")),
        ExperimentFigure("pitfall_errors",
                         f"Each timing mistake's reading relative to the correct timer ({s.latency_model}, "
                         f"{device}); GPU-only mistakes are marked as not applicable on a CPU.",
                         plots.pitfall_errors(frame, title=f"Each timing mistake against the correct timer\n{setup}")),
    )
    return ExperimentResult("timing", record, figures, {"audit": frame, "latency": correct, "distributions": dists})


# ---------------------------------------------------------------- batch size


def batch_experiment(settings: Settings, device: str = "auto", *, progress: bool = False,
                     on_update: OnUpdate = None, command: str | None = None) -> ExperimentResult:
    """The largest batch of ``settings.batch_model`` that fits, the throughput curve up to it, the optimal batch.

    values: ``search`` (BatchSearchResult), ``curve`` (``throughput_curve``'s
    frame), ``optimal`` (OptimalBatch).
    """
    from .env import resolve_device
    from .models import build_model
    from .throughput import curve_batch_sizes, find_max_batch_size, find_optimal_batch_size, throughput_curve

    s, device = settings, resolve_device(device)
    cuda = device.startswith("cuda")
    record = new_record("batch", s, device, command, model=s.batch_model)
    search = find_max_batch_size(s.batch_model, device=device, max_memory=s.batch_max_memory,
                                 headroom=None if cuda else s.batch_headroom, max_batch=s.batch_max,
                                 progress=progress)
    record["search"] = search.to_dict()
    _update(on_update, record)
    model = build_model(s.batch_model, device=device)
    points: list = []

    def on_point(result, row):
        points.append(row)
        record["curve"] = points
        _update(on_update, record)

    curve = throughput_curve(model, curve_batch_sizes(search.max_batch_size, step=s.curve_step), s.curve_batches,
                             device=device, progress=progress, on_point=on_point, max_time_s=s.curve_time_s)
    opt = find_optimal_batch_size(curve)
    record.update(curve=curve.to_dict("records"), optimal=opt.to_dict(), complete=True)
    _update(on_update, record)
    limit = "the memory limit" if not search.bounded else f"the search bound {s.batch_max}"
    fig = ExperimentFigure(
        "throughput_vs_batch",
        f"Throughput of {s.batch_model} on {device} vs batch size, up to the largest batch that fits "
        f"({search.max_batch_size}, {limit}); the optimal batch is the smallest within "
        f"{100 * opt.tolerance:.0f}% of the best.",
        plots.throughput_curve(curve, largest=search.max_batch_size, optimal=opt.optimal_batch_size,
                               title=f"Throughput vs batch size (samples/s)\n{s.batch_model}, "
                                     f"{str(model.dtype).removeprefix('torch.')} · {device_name(record, device)}"))
    return ExperimentResult("batch", record, (fig,), {"search": search, "curve": curve, "optimal": opt})


# ---------------------------------------------------------------- MoE offloading


def moe_settings(settings: Settings, device: str = "auto"):
    """The ``MoESettings`` of the MoE experiment (preset, layers, prompt, tokens, placement policy, device)."""
    from .moe.run import MoESettings

    return MoESettings(preset=settings.moe_preset, layers=settings.moe_layers, policy=settings.moe_policy,
                       prompt_tokens=settings.prompt_tokens, new_tokens=settings.new_tokens, device=device)


def moe_budgets(settings: Settings, total_experts: int) -> list[int]:
    """The GPU expert counts of the sweep: ``settings.moe_fractions`` of all experts, sorted, distinct."""
    return sorted({int(round(f * total_experts)) for f in settings.moe_fractions})


def per_expert_hit_rate(result, phase: str = "decode") -> np.ndarray | None:
    """Hit rate per layer and expert [L, E] of a MoERunResult or GenerationResult (NaN where never routed)."""
    rows = ((result.hit_rate or {}).get("per_expert") or {}).get(phase)
    if rows is None:
        return None
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def per_expert_activations(result, phase: str = "decode") -> np.ndarray | None:
    """Tokens routed to each layer's experts [L, E] of a MoERunResult or GenerationResult, or None."""
    generation = getattr(result, "generation", result)
    rows = ((getattr(generation, "experts", None) or {}).get("activations") or {}).get(phase)
    return None if rows is None else np.asarray(rows, dtype=float)


def moe_experiment(settings: Settings, device: str = "auto", *, session=None, progress: bool = False,
                   on_update: OnUpdate = None, command: str | None = None) -> ExperimentResult:
    """Offloaded MoE generation over a sweep of GPU experts, and a profile of one decode step.

    ``session``: a ``toolkit.moe.run.MoESession`` built from
    ``moe_settings(settings, device)`` to reuse (a notebook shows its cost
    model first); by default one is built here and freed at the end.
    values: ``results`` ({gpu_experts: MoERunResult}), ``sweep``
    (``sweep_frame``), ``profile`` (ProfileResult of one decode step),
    ``budgets``, ``total_experts``.
    """
    from .moe.run import MoESession, sweep_frame
    from .profiling import profile

    s = settings
    context = contextlib.nullcontext(session) if session is not None else MoESession(moe_settings(s, device))
    with context as session:
        device, p, n_total = session.device, session.preset, session.total_experts
        budgets = moe_budgets(s, n_total)
        record = new_record("moe", s, device, command, preset=p.name, layers=p.layers, experts_per_layer=p.experts,
                            total_experts=n_total, routing=session.routing_name,
                            cost_model=session.cost_model.to_dict(), runs=[])
        _update(on_update, record)
        results = {}
        for k in _bar(progress, iterable=budgets, desc="MoE offload sweep", unit="budget"):
            results[k] = r = session.run(gpu_experts=k, policy=s.moe_policy)
            record["runs"].append(r.to_dict() | {"gpu_experts": k, "sequences": None, "text": None})
            _update(on_update, record)

        # one decode step, profiled: the CPU/GPU timeline of the offload engine
        k_mid = budgets[len(budgets) // 2]
        session.reset_routing()
        with session.offload(k_mid, policy=s.moe_policy) as engine:
            placement = engine.placement  # [L, E] bool; a static policy keeps it for the whole run
            static = bool(getattr(engine.policy, "static", False))
            step, args, label = session.decode_step(engine)
            prof = profile(step, *args, device=device, wait=1, warmup=1, active=1, baseline=False, label=label)
    timeline = prof.timeline()
    record.update(profile={"gpu_experts": k_mid, "label": label, "verdict": prof.verdict,
                           "step_ms": list(prof.step_ms), "timeline": timeline.to_dict("records")}, complete=True)
    _update(on_update, record)

    where = f"{p.name}, {p.layers} layers x {p.experts} experts, {device}"
    setup = (f"{p.name}, {p.layers} layers x {p.experts} experts, {str(p.dtype).removeprefix('torch.')}, "
             f"batch 1 · {device_name(record, device)}")
    sweep = sweep_frame(results)
    sweep_fig = plots.offload_sweep(sweep, total_experts=n_total,
                                    title=f"Offloaded generation vs GPU expert budget ({s.moe_policy})\n{setup}")
    plots.annotate_warnings(sweep_fig, [f"{k} GPU experts: {w}" for k, r in results.items() for w in r.warnings])
    figures = [
        ExperimentFigure("moe_offload_sweep",
                         f"Offloaded generation ({where}, {s.moe_policy} placement): decode tokens/s, prefill time "
                         "and decode hit rate vs GPU-resident experts.", sweep_fig),
        ExperimentFigure("moe_decode_latency", f"Per-token decode latency over the generated tokens ({where}).",
                         plots.decode_latency_over_tokens(
                             {f"{k} GPU experts": results[k].generation.decode_samples_ms
                              for k in sorted({budgets[0], k_mid, budgets[-1]})},
                             title=f"Per-token decode latency\n{setup}")),
    ]
    acts, per_expert = per_expert_activations(results[k_mid]), per_expert_hit_rate(results[k_mid])
    if static and acts is not None and acts.shape == placement.shape:
        # a static placement: the per-expert hit rate would be 0 or 1 (the placement); show where tokens go
        figures.append(ExperimentFigure(
            "moe_hit_rate_heatmap",
            f"Where the decode tokens went with {int(placement.sum())} GPU experts ({where}, {s.moe_policy} "
            "placement): each expert's share of its layer's routed tokens, GPU-resident experts outlined; "
            "grey: never routed.",
            plots.expert_heatmap(acts, placement, setup=setup)))
    elif per_expert is not None:
        figures.append(ExperimentFigure(
            "moe_hit_rate_heatmap",
            f"Decode hit rate per layer and expert with {k_mid} GPU experts ({where}, {s.moe_policy}); grey: never "
            "routed.",
            plots.hit_rate_heatmap(per_expert, title=f"Decode hit rate per expert, {s.moe_policy} with {k_mid} of "
                                                     f"{n_total} experts on the GPU\n{setup}")))
    if len(timeline):
        figures.append(ExperimentFigure(
            "moe_timeline", f"One profiled decode step ({where}, {k_mid} GPU experts): what runs where and when.",
            plots.timeline_gantt(timeline, title=f"One profiled decode step, {k_mid} GPU experts: what runs where"
                                                 f"\n{setup}")))
    return ExperimentResult("moe", record, tuple(figures),
                            {"results": results, "sweep": sweep, "profile": prof, "budgets": budgets,
                             "total_experts": n_total})


# ---------------------------------------------------------------- hit-rate simulation


def simulation_experiment(settings: Settings, device: str = "cpu", *, progress: bool = False,
                          on_update: OnUpdate = None, command: str | None = None) -> ExperimentResult:
    """Hit rate vs GPU experts for every policy on the synthetic Mixtral trace (no GPU needed).

    values: ``frame`` (policy, gpu_experts, hit_rate: decode), ``per_layer``
    ({policy: decode hit rate per layer} at ``settings.sim_heatmap_budget``).
    """
    from .moe.simulate import simulate
    from .moe.trace_catalog import named_trace

    s = settings
    trace = named_trace("synthetic-mixtral")  # read-only arrays: the simulator's compiled kernels are shared
    total = trace.n_layers * trace.n_experts
    budgets = [b for b in s.sim_budgets if b <= total]
    record = new_record("simulation", s, device, command, results=[],
                        trace={"tokens": trace.n_tokens, "layers": trace.n_layers, "experts": trace.n_experts,
                               "source": trace.meta.get("source")})
    per_layer = {}
    cases = [(p, b) for p in s.sim_policies for b in budgets]
    for policy, budget in _bar(progress, iterable=cases, desc="hit-rate simulation", unit="case"):
        r = simulate(trace, policy, budget)
        record["results"].append(r.to_dict())
        if budget == s.sim_heatmap_budget:
            per_layer[policy] = r.per_layer("decode")
        _update(on_update, record)
    record["complete"] = True
    _update(on_update, record)
    frame = pd.DataFrame([{"policy": r["policy"], "gpu_experts": r["gpu_experts"],
                           "hit_rate": r["hit_rate"]["decode"]} for r in record["results"]])
    simulated = (f"simulated, Mixtral-8x7B routing (synthetic trace, {trace.n_tokens:,} tokens) · no device, "
                 "no dtype")
    figures = [ExperimentFigure(
        "hit_rate_vs_gpu_experts",
        f"Simulated decode hit rate vs GPU-resident experts per policy (synthetic Mixtral-8x7B trace, "
        f"{trace.n_tokens} tokens; belady knows the future: the bound for batch-1 decode).",
        plots.hit_rate_vs_gpu_experts(frame, phase="decode", total_experts=total,
                                      title=f"Decode hit rate per policy vs GPU-resident experts\n{simulated}"))]
    if per_layer:
        figures.append(ExperimentFigure(
            "hit_rate_per_layer",
            f"Simulated decode hit rate per layer and policy with {s.sim_heatmap_budget} of {total} experts on "
            "the GPU.", plots.hit_rate_heatmap(per_layer, xlabel="policy",
                                               title=f"Decode hit rate per layer, {s.sim_heatmap_budget} of {total} "
                                                     f"experts on the GPU\n{simulated}")))
    return ExperimentResult("simulation", record, tuple(figures), {"frame": frame, "per_layer": per_layer})


EXPERIMENTS: dict[str, Callable[..., ExperimentResult]] = {
    "timing": timing_experiment,
    "batch": batch_experiment,
    "moe": moe_experiment,
    "simulation": simulation_experiment,
}

__all__ = ["ExperimentFigure", "ExperimentResult", "EXPERIMENTS", "new_record", "device_name", "timing_experiment",
           "batch_experiment", "moe_settings", "moe_budgets", "per_expert_hit_rate", "per_expert_activations",
           "moe_experiment", "simulation_experiment"]
