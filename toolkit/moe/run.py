"""One offloaded MoE run, measured: the single path behind the CLI, the report, the widgets and the benchmarks.

The recipe is always the same: check the inputs (files, budgets) before the
model is built -> build the preset with random weights (experts in pinned host
memory on a GPU) -> calibrate or load the cost model -> offload with a scheme
-> choose the schedule of the CPU experts by measuring the candidates
(``toolkit.moe.schedule``) -> warm up until decode steps are steady -> replay
the same routing from its start -> generate with per-step timing -> restore
the model. ``MoESettings`` holds every default of that recipe, once.

Two ways in:

- ``run_moe(settings)`` (or ``run_moe(preset=..., gpu_experts=...)``): one
  run, start to finish; what ``python -m toolkit moe`` calls.
- ``MoESession(settings)``: the built model with its routing, cost model and
  prompt, reused for many runs (budgets, schemes, policies);
  ``session.run(gpu_experts=..., scheme=...)`` is the same single run, and
  ``with session.offload(...) as engine:`` hands out the engine itself and
  restores the model on exit. Inside it, ``session.decode_step(engine)`` gives
  one decode step to profile, ``session.measure_prefill(engine, tokens)`` times
  a long prompt and ``session.probe_logits(engine)`` gives logits to compare
  with another configuration (``logits_error``; ``session.probe_exact()``: the
  same in float32, what both are measured against). ``with session.unmodified()
  as model:`` and ``session.run_unmodified()`` are the reference: the model as
  transformers computes it, every expert on the device. ``session.with_settings
  (routing=...)`` is another session on the same built model.

Benchmarks measure each configuration in several rounds, alternating between
configurations so that a slow spell of the machine hits all of them alike;
``round_spread`` summarises one configuration's rounds and flags it anomalous
when they disagree by more than ``ANOMALY_SPREAD`` of their median.

Shapes: B batch, P prompt tokens, L MoE layers, E experts per layer, V vocabulary, N real prompt tokens.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ToolkitError
from .graphs import cache_keyword

ROUTINGS = ("auto", "model", "uniform")  # besides a trace name or .npz path
# the benchmarks' record labels -> MoESettings.routing: uniform random, and the synthetic Mixtral trace
BENCHMARK_ROUTINGS = {"uniform": "uniform", "trace": "synthetic-mixtral"}
DTYPES = ("float32", "float16", "bfloat16")
WARMUP_ROUNDS = 5  # at most this many warm-up generations ...
WARMUP_STEADY = 0.05  # ... stopping once two successive median decode steps agree within 5%
EXACT_FACTOR = 1.5  # a run is as close to float32 as its reference when its error is at most this times the reference's
ANOMALY_SPREAD = 0.10  # rounds of one configuration whose (max - min) / median exceeds this are anomalous
RUN_SPREAD = 0.20  # one run's decode steps: IQR / median above this, or tokens/s off the median's by this, warns
NO_WARMUP = {"rounds": 0, "median_decode_ms": [], "steady": None}


@dataclass(frozen=True)
class MoESettings:
    """Everything one offloaded run needs; each default lives here and nowhere else.

    gpu_experts: an expert count over all layers, "all", or "auto" (as many as
    the memory plan fits on a GPU; every expert on a CPU, where both tiers are
    host memory). scheme: a name from ``toolkit.moe.baselines`` ("ours" is this
    engine). routing: "auto" (the synthetic Mixtral trace for Mixtral-shaped
    presets, 8 experts top-2, else the model's router), "model", "uniform"
    (each token picks top-k distinct experts at random, seeded), or a trace
    name / .npz path; a trace also gives the popularity profile for placement.
    policy: a placement or caching policy name overriding the scheme's.
    schedule: how scheme "ours" runs its CPU experts: "auto" (measure the
    candidates of ``toolkit.moe.schedule`` during warm-up, keep the fastest;
    on a CPU device the engine's default, unmeasured), or a name of
    ``toolkit.moe.schedule.SCHEDULES`` ("overlap", "inline", "overlap-spare",
    ...); the peer schemes keep their own.
    graphs: replay the dense part of each decode step's layers from CUDA
    graphs (``toolkit.moe.graphs``, on a GPU; False: eager, as transformers
    runs it, which shows what the graphs save).
    fused: the model's RMSNorms and each sync-free decode pass's experts as
    single Triton kernels (on a GPU with Triton; False: torch's ops, which
    shows what the fusing saves).
    graph_misses: with a static placement on one GPU, each one-token decode
    pass of a layer with missed experts needs nothing from the host
    (``toolkit.moe.graph_pass``: missed experts split at the calibration's
    balanced share, the GPU's units copied by one kernel, the CPU's
    computed by a host function), so the whole decode step is one CUDA graph;
    False keeps the per-layer path, which shows what capturing saves.
    huge_pages: the experts' page-locked host memory, and the calibration's,
    on transparent huge pages where the OS grants them
    (``toolkit.moe.host_memory``: both paths of a missed expert read it
    faster); False keeps torch's pinned memory on 4 KiB pages.
    dtype: the model's dtype (None: the preset's).
    gpus: GPUs of this host holding resident experts (None: one GPU, the
    one-device engine); the dense part stays on the first, ``gpu_experts``
    counts over all of them, each GPU's share capped by its memory plan.
    warmup_tokens: tokens of each warm-up generation (0: no warm-up; None, the
    default: as many as the measured generation); warm-up repeats until two
    successive median decode steps agree within 5% (at most 5 rounds). A
    warm-up shorter than the measured generation is not enough: on an H200,
    after 8-token warm-ups the 8th and later steps of the first 64-token
    generation took ~110 ms against ~65 ms for the same steps one generation
    later (first use of each new KV-cache length), so a fresh process
    measured half the tokens/s of a warm one.
    """

    preset: str = "tiny-mixtral"
    layers: int | None = None
    gpu_experts: int | str = "auto"
    scheme: str = "ours"
    routing: str = "auto"
    policy: str | None = None
    placement: str | None = None  # placement JSON file (which experts are on the GPU)
    calibration: str | None = None  # cost model file; None: measure once, cached per machine
    threads: int | None = None  # CPU threads for CPU experts; None: chosen for this machine
    schedule: str = "auto"  # worker thread or inline, split or not: measured per run (toolkit.moe.schedule)
    graphs: bool = True  # decode steps' dense part from CUDA graphs (GPU only)
    fused: bool = True  # norms and sync-free decode passes as fused Triton kernels (GPU with Triton only)
    graph_misses: bool = True  # one-token decode passes with missed experts captured whole (GPU, static placement)
    huge_pages: bool = True  # the experts' pinned host memory on 2 MiB pages where the OS grants them (GPU only)
    dtype: str | None = None
    prompt_tokens: int = 16
    new_tokens: int = 32
    batch_size: int = 1
    beams: int = 1
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    allow_eos: bool = False  # False: generate exactly new_tokens (what timing needs)
    warmup_tokens: int | None = None  # None: as many as the measured generation
    repeats: int = 1  # measured generations per run (their samples pooled; each run's prefill kept)
    seed: int = 0
    device: str = "auto"
    gpus: int | None = None  # None: one GPU; N > 1: resident experts spread over N GPUs of this host

    def warmup_length(self, new_tokens: int | None = None) -> int:
        """Tokens of each warm-up generation: ``warmup_tokens``, or as many as the measured generation."""
        if self.warmup_tokens is not None:
            return int(self.warmup_tokens)
        return int(new_tokens or self.new_tokens)

    def replace(self, **changes) -> MoESettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def generate_kwargs(self, beams: int | None = None) -> dict:
        """The keyword arguments of ``generate()`` every measured and warm-up generation of a run uses."""
        kw = dict(num_beams=int(beams or self.beams), do_sample=self.sample, ignore_eos=not self.allow_eos,
                  seed=self.seed)
        if self.sample:
            kw.update({k: v for k, v in (("temperature", self.temperature), ("top_k", self.top_k)) if v is not None})
        return kw


@dataclass(frozen=True)
class MoERunResult:
    """One measured run: the generation's timings and hit rates plus what ran (model, scheme, engine, plan)."""

    generation: object  # toolkit.moe.generation.GenerationResult (the last repeat, all decode samples pooled)
    settings: MoESettings
    preset: str
    layers: int
    experts_per_layer: int
    device: str
    scheme: str
    policy: str
    routing: str
    cpu_threads: int
    engine: dict  # Offloaded.to_dict() without stats and cost model
    memory_plan: object | None = None  # toolkit.moe.memory.MemoryPlan on a GPU
    prefill_samples_ms: tuple[float, ...] = ()
    warmup: dict = field(default_factory=dict)  # rounds, median decode ms per round, steady
    schedule: dict = field(default_factory=dict)  # ScheduleChoice.to_dict(): picked, candidates {name: ms/step}, ...
    stats: object | None = None  # toolkit.moe.offload.ExpertStats of the last repeat (None: unmodified model)

    @property
    def total_experts(self) -> int:
        return self.layers * self.experts_per_layer

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generation.decode_tokens_per_s

    @property
    def prefill_ms(self) -> float:
        """The median prefill of the measured repeats."""
        s = self.prefill_samples_ms or (self.generation.prefill_ms,)
        return float(np.median(s))

    @property
    def hit_rate(self) -> dict | None:
        return self.generation.hit_rate

    @property
    def warnings(self) -> list[str]:
        """What makes this run's numbers doubtful, each with its remedy (empty when nothing does).

        Decode tokens/s is steps over total time, so a few slow steps (another
        process, a page fault, a first-time shape) pull it below what the median
        step says; a wide spread of steps, or a warm-up that never settled, means
        the machine was not in one state while it measured.
        """
        out = []
        s = np.asarray(self.generation.decode_samples_ms, dtype=float)
        if len(s) >= 4:
            med = float(np.median(s))
            q1, q3 = np.percentile(s, [25, 75])
            if med > 0 and (q3 - q1) / med > RUN_SPREAD:
                out.append(f"decode steps spread widely: IQR is {100 * (q3 - q1) / med:.0f}% of the median step; "
                           "other work on the machine? repeat with --repeats 3, or on an idle machine")
            tps = self.decode_tokens_per_s
            if med > 0 and math.isfinite(tps):
                by_median = 1e3 * self.generation.batch_size / med
                if abs(tps - by_median) > RUN_SPREAD * by_median:
                    out.append(f"tokens/s from the total time ({tps:.3g}) and from the median step ({by_median:.3g}) "
                               f"differ by more than {100 * RUN_SPREAD:.0f}%: a few slow steps dominate the total")
        from .presets import PRESETS

        limit = getattr(PRESETS.get(self.preset), "max_positions", None)
        tokens = self.generation.prompt_tokens + self.generation.new_tokens
        if limit is not None and tokens > limit:
            out.append(f"the prompt and new tokens ({tokens}) run past {self.preset}'s {limit} positions: the "
                       "model was not made for positions beyond them (the timing is still that of this length)")
        if self.warmup.get("steady") is False:
            raced = int(self.warmup.get("after_schedule_rounds") or 0)  # the picked schedule's race generations
            n = int(self.warmup.get("rounds") or 0) + raced
            which = f" ({raced} of them in the schedule race)" if raced else ""
            out.append(f"warm-up did not settle in {n} generation{'s' if n != 1 else ''}{which} (the last two "
                       f"median decode steps still differed by more than {100 * WARMUP_STEADY:.0f}%): the measured "
                       "generation may not be steady either")
        return out

    def to_dict(self) -> dict:
        """Flat record: the run's context, then ``GenerationResult.to_dict()`` keys (the CLI's JSON)."""
        return {"preset": self.preset, "layers": self.layers, "experts_per_layer": self.experts_per_layer,
                "total_experts": self.total_experts, "device": self.device, "scheme": self.scheme,
                "policy": self.policy, "routing": self.routing, "trace": self.routing if _is_trace(self.routing)
                else None, "cpu_threads": self.cpu_threads, **self.generation.to_dict(),
                "prefill_ms": self.prefill_ms, "prefill_samples_ms": list(self.prefill_samples_ms),
                "engine": self.engine,
                "memory_plan": None if self.memory_plan is None else self.memory_plan.to_dict(), "warmup": self.warmup,
                "schedule": self.schedule, "warnings": self.warnings, "settings": self.settings.to_dict()}

    def __repr__(self) -> str:
        return (f"MoERunResult({self.preset} x{self.layers}, {self.generation.gpu_experts}/{self.total_experts} "
                f"GPU experts, {self.scheme}, {self.routing} routing: {self.generation!r})")


@dataclass(frozen=True)
class PrefillResult:
    """A long prompt through the model without a KV cache (``MoESession.measure_prefill``), timed ``repeats`` times."""

    tokens: int
    samples_ms: tuple[float, ...]
    stats: object | None = None  # ExpertStats of the last sample (None: unmodified model)

    @property
    def ms(self) -> float:
        """The median sample: a prefill is long enough that one slow sample should not move the figure."""
        return float(np.median(self.samples_ms))

    @property
    def hit_rate(self) -> float | None:
        return None if self.stats is None else self.stats.hit_rate("prefill")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "ms": self.ms, "samples_ms": list(self.samples_ms), "hit_rate": self.hit_rate}


def _is_trace(routing: str) -> bool:
    return routing not in ROUTINGS


def _is_engine(target) -> bool:
    """An offloaded engine (``Offloaded``), as opposed to a transformers model."""
    from .offload import Offloaded

    return isinstance(target, Offloaded)


def output_cache(out):
    """The KV cache a forward returned, under whichever name this transformers uses (the old one logs a warning)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


# -- checks that need no model ---------------------------------------------------------------------------

def _check_count(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
        raise ToolkitError(f"{name} must be an integer >= {low}, got {v!r}")


def resolve_settings(settings: MoESettings | None = None, **overrides) -> MoESettings:
    """Settings with overrides applied and checked (one clear ToolkitError naming the setting)."""
    s = settings or MoESettings()
    s = s.replace(**overrides) if overrides else s
    for name in ("prompt_tokens", "new_tokens", "batch_size", "beams", "repeats"):
        _check_count(name, getattr(s, name), 1)
    if s.warmup_tokens is not None:
        _check_count("warmup_tokens", s.warmup_tokens, 0)
    _check_count("seed", s.seed, 0)
    if s.seed >= 2**63:  # torch generators take 64 bits; the run also seeds with seed + 1 and seed + 2
        raise ToolkitError(f"seed must be below 2**63, got {s.seed}")
    if s.temperature is not None and not (math.isfinite(s.temperature) and s.temperature > 0):
        raise ToolkitError(f"temperature must be a finite number > 0, got {s.temperature}")
    if s.top_k is not None and (isinstance(s.top_k, bool) or int(s.top_k) < 0):
        raise ToolkitError(f"top_k must be >= 0, got {s.top_k}")
    if s.gpus is not None:
        _check_count("gpus", s.gpus, 1)
    if s.threads is not None and (isinstance(s.threads, bool) or int(s.threads) < 1):
        raise ToolkitError(f"threads must be >= 1, got {s.threads}")
    if s.dtype is not None and s.dtype not in DTYPES:
        raise ToolkitError(f"dtype must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    gpu = s.gpu_experts
    if isinstance(gpu, str):
        if gpu.lower() not in ("all", "auto"):
            raise ToolkitError(f"gpu_experts must be a count, 'all' or 'auto', got {gpu!r}")
        s = s.replace(gpu_experts=gpu.lower())
    elif isinstance(gpu, bool) or not float(gpu).is_integer() or gpu < 0:
        raise ToolkitError(f"gpu_experts must be a whole number >= 0, 'all' or 'auto', got {gpu!r}")
    else:
        s = s.replace(gpu_experts=int(gpu))
    from .baselines import get_baseline
    from .schedule import check_schedule

    get_baseline(s.scheme)
    check_schedule(s.schedule, s.scheme)
    if s.policy is not None:
        from .policies import POLICY_NAMES

        if s.policy not in POLICY_NAMES:
            raise ToolkitError(f"unknown policy {s.policy!r}; choose one of: {', '.join(POLICY_NAMES)}")
    return s


# -- comparing logits and rounds -------------------------------------------------------------------------

def logits_error(got, ref) -> dict:
    """How far ``probe_logits`` output ``got`` is from ``ref``: max abs difference per phase, scale, argmax agreement."""
    import torch

    (gp, gd), (rp, rd) = got, ref  # [N, V], [B, V] each
    return {
        "prefill_max_abs_diff": float((gp - rp).abs().max()), "decode_max_abs_diff": float((gd - rd).abs().max()),
        "max_abs_logit": float(max(rp.abs().max(), rd.abs().max())),
        "argmax_agreement": float(torch.cat([gp.argmax(-1) == rp.argmax(-1), gd.argmax(-1) == rd.argmax(-1)])
                                  .float().mean()),
    }


def _largest(err: dict) -> float:
    return max(err["prefill_max_abs_diff"], err["decode_max_abs_diff"])


def logits_check(got, ref, tol_rel: float, exact=None, factor: float = EXACT_FACTOR) -> dict:
    """``logits_error`` of ``got`` against ``ref`` with a pass mark: the largest difference within ``tol_rel`` of the
    largest logit (``rel`` is the difference over that scale).

    ``exact``: the same probe computed in float32 (``MoESession.probe_exact``). Then ``exact`` in the result
    holds how far each of ``got`` and ``ref`` is from it and its own pass mark: ``got`` at most ``factor``
    times as far from float32 as ``ref`` is (two bf16 runs differ by their roundings alone; this says whether
    ``got``'s are worse). ``pass`` stays the check against ``ref``.
    """
    err = logits_error(got, ref)
    diff, scale = _largest(err), err["max_abs_logit"]
    out = {**err, "max_abs_diff": diff, "rel": diff / scale if scale else math.nan, "tolerance_rel": tol_rel,
           "pass": diff <= tol_rel * scale}
    if exact is not None:
        against = logits_error(got, exact)  # its scale is the float32 probe's largest logit
        mine, theirs, scale = _largest(against), _largest(logits_error(ref, exact)), against["max_abs_logit"]
        out["exact"] = {"max_abs_diff": mine, "rel": mine / scale if scale else math.nan,
                        "reference_max_abs_diff": theirs, "reference_rel": theirs / scale if scale else math.nan,
                        "ratio": mine / theirs if theirs else (1.0 if mine == theirs else math.inf),
                        "factor": factor, "pass": mine <= factor * theirs}
    return out


def check_word(check: dict | None) -> str:
    """A logits check in a word: "-" (none), "ok", "FAIL"; "ok32" where it failed against its reference but is
    as close to float32 as the reference (``logits_check``'s ``exact``)."""
    if not check:
        return "-"
    if check["pass"]:
        return "ok"
    return "ok32" if (check.get("exact") or {}).get("pass") else "FAIL"


def round_spread(values, tolerance: float = ANOMALY_SPREAD) -> dict:
    """One configuration's rounds of a measure: values, median, min, max, spread = (max - min) / median, anomalous.

    ``median_round``: the index of the round whose value is the median (the
    lower middle one for an even count), whose full record stands for the
    configuration. Anomalous: the rounds disagree by more than ``tolerance`` of
    their median (torch.utils.benchmark warns at the same 10%, on the IQR): a
    figure should not draw such a configuration without saying so. Missing
    (None, NaN) values are left out.
    """
    kept = [(i, float(x)) for i, x in enumerate(values) if x is not None and math.isfinite(float(x))]
    if not kept:
        return {"values": [], "median": None, "min": None, "max": None, "spread": None, "median_round": None,
                "anomalous": False}
    v = [x for _, x in kept]
    med = float(np.median(v))
    spread = (max(v) - min(v)) / med if med else math.inf
    middle = sorted(kept, key=lambda ix: ix[1])[(len(kept) - 1) // 2][0]
    out = {"values": v, "median": med, "min": min(v), "max": max(v), "spread": spread, "median_round": middle,
           "anomalous": bool(len(v) > 1 and spread > tolerance)}
    if out["anomalous"]:
        out["reason"] = f"rounds differ by {100 * spread:.0f}% of their median (more than {100 * tolerance:.0f}%)"
    return out


def summarize_rounds(entry: dict, rounds: list[dict], measures) -> None:
    """A benchmark entry's figures from its rounds, in place: the median round's records, each measure's spread.

    ``measures``: (record part, key) pairs, e.g. ("decode", "tokens_per_s");
    a part the rounds do not have is left out. The first measure picks the
    median round, whose records stand for the entry; ``anomalous`` (and
    ``anomaly_reason``) when any measure's rounds disagree (``round_spread``).
    """
    spreads = {ph: round_spread([r[ph][key] for r in rounds]) for ph, key in measures if ph in rounds[0]}
    first = measures[0][0]
    pick = spreads[first]["median_round"] if spreads[first]["median_round"] is not None else 0
    for ph in spreads:
        entry[ph] = {**rounds[pick][ph], "rounds": spreads[ph]}
    # a round slow in its mean but not its median had a few slow steps, not a slow machine
    entry[first]["rounds_median_ms"] = [r[first]["median_ms"] for r in rounds]
    entry["rounds"], entry["median_round"] = len(rounds), pick
    odd = [f"{ph} {key}: {s['reason']}" for (ph, key) in measures if (s := spreads.get(ph)) and s["anomalous"]]
    entry["anomalous"] = bool(odd)
    if odd:
        entry["anomaly_reason"] = "; ".join(odd)
    else:
        entry.pop("anomaly_reason", None)


# -- the session --------------------------------------------------------------------------------------------

class MoESession:
    """A built MoE model with its routing, popularity profile, cost model, tokenizer and prompt.

    Built once from ``MoESettings``; ``run()`` measures one configuration
    (GPU experts, scheme, policy) and leaves the model as it found it. Files
    (calibration, trace, placement) are read and checked before the model is
    built. ``model`` / ``cost_model`` reuse ones already built (the model must
    be this preset, built with this seed); ``with_settings`` makes such a
    session. Use as a context manager, or call ``close()``, to free the model.
    ``on_build(session)`` is called once every input is checked, just before
    the model is built (the CLI says there what the build will take).
    """

    def __init__(self, settings: MoESettings | None = None, *, model=None, cost_model=None, on_build=None,
                 devices=None, **overrides):
        from ..env import resolve_device
        from .presets import from_name

        self.settings = s = resolve_settings(settings, **overrides)
        from . import host_memory

        host_memory.set_enabled(s.huge_pages)  # before the model's host tier and the calibration are allocated
        p = from_name(s.preset, s.layers)
        if s.dtype is not None:
            import torch

            p = dataclasses.replace(p, dtype=getattr(torch, s.dtype))
        self.preset = p
        self.device = resolve_device(s.device)
        self.devices = self._devices(devices)
        self.device_caps = None  # with several devices: max experts per device, from the last memory plan
        self.total_experts = p.layers * p.experts
        if model is None:
            from .memory import check_host_memory

            check_host_memory(p, self.device)  # a ToolkitError naming needed and available bytes, before anything
        if isinstance(s.gpu_experts, int) and s.gpu_experts > self.total_experts:
            raise ToolkitError(f"gpu_experts {s.gpu_experts} is more than the model has: {p.layers} layers x "
                               f"{p.experts} experts = {self.total_experts}")
        self.trace, self.popularity, self.routing_name = self._load_routing(s.routing)
        self.placement = self._load_placement(s.placement)
        self.cost_model = cost_model
        if cost_model is None and s.calibration:
            from .costs import load_cost_model

            self.cost_model = load_cost_model(s.calibration)
        if self.cost_model is not None and self.devices and self.device.startswith("cuda"):
            from .costs import with_peer_hops  # a one-GPU calibration, now spread: measure the peer hop

            self.cost_model = with_peer_hops(self.cost_model, self.devices)
        self.router = self._router(s.batch_size * s.beams)
        from .prompts import random_prompts, synthetic_tokenizer

        self.tokenizer = synthetic_tokenizer(p.vocab)
        self.ids, self.mask = random_prompts(p.vocab, s.prompt_tokens, s.batch_size, seed=s.seed,
                                             pad_token_id=self.tokenizer.pad_token_id)  # [B, P]
        if model is None and on_build is not None:
            on_build(self)
        self.model = model if model is not None else self._build()
        self.built_at = time.perf_counter()  # warm-up rounds are timed from here (the record shows when)
        if self.cost_model is None:
            from .costs import calibrate

            self.cost_model = calibrate(p.hidden, p.intermediate, p.dtype, self.device, threads=s.threads,
                                        devices=self.devices)
        self.cpu_threads = self.cost_model.cpu_threads if s.threads is None else int(s.threads)

    _SHARED = ("preset", "layers", "dtype", "seed", "device", "threads", "calibration",
               "huge_pages")  # what the model and costs fix

    def with_settings(self, **changes) -> MoESession:
        """A session on the same built model and cost model with other run settings (routing, tokens, ...).

        ``gpus``: the experts spread over more GPUs; a cost model calibrated for one gains the measured
        peer hop of their token rows (``toolkit.moe.costs.with_peer_hops``, cached per machine).
        """
        fixed = sorted(k for k in changes if k in self._SHARED and changes[k] != getattr(self.settings, k))
        if fixed:
            raise ToolkitError(f"{', '.join(fixed)} fix the built model or its cost model: start a new MoESession")
        if "gpus" in changes and changes["gpus"] != self.settings.gpus:
            return MoESession(self.settings.replace(**changes), model=self.model, cost_model=self.cost_model)
        return MoESession(self.settings.replace(**changes), model=self.model, cost_model=self.cost_model,
                          devices=self.devices)

    def _devices(self, devices) -> list[str] | None:
        """The devices holding resident experts when ``gpus`` > 1 (the session's device first), else None.

        ``devices`` (tests) names them instead, e.g. ["cpu", "cpu"]: two tiers of one kind on a CPU.
        """
        n = self.settings.gpus
        if devices is not None:
            devices = [str(d) for d in devices]
            if n is not None and len(devices) != n:
                raise ToolkitError(f"gpus={n} but {len(devices)} devices given: {devices}")
            return devices if len(devices) > 1 else None
        if n is None or n == 1:
            return None
        import torch

        if not self.device.startswith("cuda"):
            raise ToolkitError(f"gpus={n}: several GPUs need CUDA (device is {self.device})")
        count = torch.cuda.device_count()
        if n > count:
            raise ToolkitError(f"gpus={n} but this host has {count} CUDA devices")
        first = torch.device(self.device).index
        first = torch.cuda.current_device() if first is None else first  # where offload() puts the dense part
        return [f"cuda:{first}"] + [f"cuda:{i}" for i in range(count) if i != first][:n - 1]

    # building blocks, each checked before the model exists
    def _load_routing(self, routing: str):
        p = self.preset
        mixtral_shaped = (p.experts, p.top_k) == (8, 2) and p.layers <= 32
        if routing == "auto":
            routing = "synthetic-mixtral" if mixtral_shaped else "model"
        if routing == "model":
            return None, None, "model"
        if routing == "uniform":
            from .synthetic import uniform_trace

            tr = uniform_trace(self._trace_tokens(), p.layers, p.experts, p.top_k, seed=self.settings.seed)
            return tr, None, "uniform"  # no profile: placement spreads evenly over the layers
        from .synthetic import synthetic_mixtral
        from .trace_catalog import load_trace

        if routing in ("synthetic-mixtral", "synthetic-mixtral-instruct") and mixtral_shaped:
            tr = synthetic_mixtral(n_tokens=self._trace_tokens(), n_layers=p.layers,
                                   model="instruct" if routing.endswith("instruct") else "original")
        else:
            tr = load_trace(routing)
        if tr.n_experts != p.experts or tr.n_layers < p.layers or tr.top_k != p.top_k:
            raise ToolkitError(f"trace {routing!r} routes {tr.n_layers} layers x {tr.n_experts} experts, top-"
                               f"{tr.top_k}; the model has {p.layers} x {p.experts}, top-{p.top_k}")
        return tr, tr.popularity()[: p.layers].astype(np.float64), str(routing)

    def _trace_tokens(self) -> int:
        """Enough routing rows for warm-up and measured generations of every sequence, with room to spare."""
        s = self.settings
        per_run = s.prompt_tokens + s.new_tokens + max(s.warmup_length(), 1)
        return max(512, 4 * per_run * s.batch_size * s.beams)

    def _load_placement(self, path):
        if path is None:
            return None
        from .policies import load_placement

        placement = np.asarray(load_placement(path), dtype=bool)
        p = self.preset
        if placement.shape != (p.layers, p.experts):
            raise ToolkitError(f"placement {path} is [{placement.shape[0]}, {placement.shape[1]}] "
                               f"but the model is [{p.layers}, {p.experts}] (layers, experts)")
        return placement

    def _router(self, rows_per_pass: int):
        if self.trace is None:
            return None
        from .replay import TraceRouter

        return TraceRouter(self.trace, batch_size=rows_per_pass)

    def _build(self):
        from .presets import build_moe

        cuda = self.device.startswith("cuda")
        # on a GPU the experts go straight to pinned host memory; offload() moves the resident ones over
        return build_moe(self.preset, device=self.device, expert_device="cpu" if cuda else None,
                         seed=self.settings.seed)

    # -- what one run needs ---------------------------------------------------------------------------------
    def memory_plan(self, gpu_experts=None, *, beams: int | None = None, new_tokens: int | None = None,
                    mem_info=None):
        """(expert count, ``MemoryPlan``) for a requested budget ("auto", "all" or a count) on this device.

        A count that does not fit raises ToolkitError with the numbers. ``mem_info``
        (a callable -> (free, total) bytes) stands in for the device in tests. With
        several devices (``gpus``) the plan is a list, one per device, and the count
        fits their sum (``mem_info(device)`` then takes the device's name).
        """
        from .memory import plan_memory

        s = self.settings
        req = self._requested(gpu_experts)
        if self.devices is not None:
            return self._devices_plan(req, beams=beams, new_tokens=new_tokens, mem_info=mem_info)
        plan = plan_memory(self.model, s.prompt_tokens, new_tokens or s.new_tokens, batch=s.batch_size,
                           beams=beams or s.beams, device=self.device,
                           gpu_experts=None if req == "auto" else int(req), mem_info=mem_info)
        return (plan.max_gpu_experts if req == "auto" else int(req)), plan

    def _devices_plan(self, req, *, beams=None, new_tokens=None, mem_info=None):
        """(expert count, plans per device) with several devices; ``mem_info(device)`` -> (free, total) in tests."""
        from .memory import plan_devices

        s = self.settings
        plans = plan_devices(self.model, s.prompt_tokens, new_tokens or s.new_tokens, self.devices,
                             batch=s.batch_size, beams=beams or s.beams, mem_info=mem_info)
        fit = sum(p.max_gpu_experts for p in plans)
        k = min(fit, self.total_experts) if req == "auto" else int(req)
        self.device_caps = [p.max_gpu_experts for p in plans]
        if k > fit:
            raise ToolkitError(f"{k} GPU experts do not fit on {', '.join(self.devices)}: at most "
                               f"{self.device_caps} per device ({fit} in all)")
        return k, plans

    def _requested(self, gpu_experts):
        req = self.settings.gpu_experts if gpu_experts is None else gpu_experts
        if self.placement is not None and req in ("auto", "all"):
            req = int(self.placement.sum())
        if req == "all":
            req = self.total_experts
        if isinstance(req, int | np.integer) and not 0 <= req <= self.total_experts:
            raise ToolkitError(f"gpu_experts must be between 0 and {self.total_experts}, got {req}")
        return req

    def resolve_gpu_experts(self, gpu_experts=None, beams: int | None = None, new_tokens: int | None = None):
        """(count, memory plan or None) for a requested budget: planned on a GPU; on a CPU "auto" is every expert."""
        if self.device.startswith("cuda"):
            k, plan = self.memory_plan(gpu_experts, beams=beams, new_tokens=new_tokens)
            return k, (plan[0] if isinstance(plan, list) else plan)
        req = self._requested(gpu_experts)
        return (self.total_experts if req == "auto" else int(req)), None

    def offload(self, gpu_experts=None, *, scheme=None, policy: str | None = None, schedule: str | None = None):
        """The offloaded engine (an ``Offloaded``, a context manager that restores the model on exit).

        ``scheme``: a baseline name or a ``Baseline`` (an ablation of one, say). Only "auto"
        asks the memory plan; a count is checked against free memory by ``offload()`` itself.
        ``schedule`` (default: the settings'): a ``toolkit.moe.schedule.SCHEDULES`` name for
        scheme "ours", or "auto": the engine's default (``run()`` measures the candidates).
        """
        from .baselines import Baseline, get_baseline
        from .schedule import SCHEDULES, check_schedule

        k = self._requested(gpu_experts)
        if k == "auto":
            k, _ = self.resolve_gpu_experts(k)
        base = scheme if isinstance(scheme, Baseline) else get_baseline(scheme or self.settings.scheme)
        kw = dict(cost_model=self.cost_model, routing=self.router, cpu_threads=self.cpu_threads)
        schedule = check_schedule(schedule or self.settings.schedule, base.name)
        if schedule != "auto":
            kw["overlap"], kw["split"], kw["spare_cores"] = SCHEDULES[schedule]
        if not self.settings.graphs:
            kw["graphs"] = False
        if not self.settings.fused:
            kw["fused"] = False
        if not self.settings.graph_misses:
            kw["graph_misses"] = False
        policy = policy or self.settings.policy
        if policy is not None:
            from .policies import get_policy

            kw["policy"] = get_policy(policy, popularity=self.popularity, trace=self.trace)
            kw["placement"] = self.placement  # the policy places from its profile, not the scheme's residency
        elif self.placement is not None:
            kw["placement"] = self.placement
        if self.devices is not None:  # resident experts over several devices, each layer's busiest spread out
            kw.update(devices=self.devices, ranking=self.popularity)
            if self.device_caps is not None and self.device.startswith("cuda"):
                kw["devices_budget"] = self.device_caps
        return base.offload(self.model, k, device=self.device, popularity=self.popularity, **kw)

    def reset_routing(self) -> None:
        """Replay the routing from its start (every configuration sees the same tokens' routing)."""
        if self.router is not None:
            self.router.reset()

    def warm_up(self, target, beams: int | None = None, on_generation=None, new_tokens: int | None = None,
                prior=()) -> dict:
        """Warm-up generations until the median decode step is steady (see ``MoESettings``).

        ``on_generation("warm-up", rounds done, steady)`` is called after each round (a progress bar's hook).
        ``prior``: median decode steps of this target's earlier warm-up generations (the picked
        schedule's rounds, ``choose_schedule``): at least one more is made, steady when it agrees with
        the last of them; the record counts only the generations made here.
        """
        from .generation import generate

        s = self.settings
        n = s.warmup_length(new_tokens)
        if not n:
            return dict(NO_WARMUP)
        kw = s.generate_kwargs(beams)
        prior = [float(x) for x in prior]
        medians, at = [], []
        rounds, moved = max(1, WARMUP_ROUNDS - len(prior)), 0
        while len(medians) < rounds:
            self.reset_routing()
            r = generate(target, self.ids, self.mask, max_new_tokens=max(2, n), **kw)
            if self._balanced(target):  # the split of missed experts moved: steadiness is judged from here on
                prior, medians, at, moved = [], [], [], moved + 1
                rounds = WARMUP_ROUNDS
                continue
            medians.append(r.decode_ms["median"])
            at.append(time.perf_counter() - self.built_at)
            if on_generation is not None:
                on_generation("warm-up", len(medians), _steady(prior + medians))
            if _steady(prior + medians):
                break
        return {"rounds": len(medians) + moved, "median_decode_ms": medians, "seconds_after_build": at,
                "steady": _steady(prior + medians), "after_schedule_rounds": len(prior)}

    @staticmethod
    def _balanced(target) -> bool:
        """Whether ``target`` (an engine) just moved the split of its captured passes' missed experts to the
        rates it measured (``Offloaded.balance_graph_misses``; once per engine)."""
        balance = getattr(target, "balance_graph_misses", None)
        done = balance() if balance is not None else None
        return bool(done) and done["units"] != done["first_units"]

    def choose_schedule(self, engine, scheme: str | None = None, *, schedule: str | None = None,
                        beams: int | None = None, new_tokens: int | None = None, on_generation=None):
        """Measure the schedules ``engine`` may run and leave it on the fastest -> ``ScheduleChoice``.

        ``schedule`` (default: the settings'): "auto" measures the candidates of
        ``toolkit.moe.schedule.schedule_candidates`` (scheme "ours" on a GPU with
        experts off it), each in warm-up generations of the measured length,
        alternating; a set name, a peer scheme, a CPU device or no warm-up keep the
        engine's schedule unmeasured, and the record says why. ``scheme``: the
        engine's scheme name (default: the settings'). ``on_generation("warm-up",
        generations done, False)`` after each measured generation. Batch-1 greedy
        or sampled decoding on an engine whose decode passes are captured whole
        (``Offloaded.graph_misses_dict``) is not measured either: the schedules
        are the per-layer path's, which those steps do not take.
        """
        from .generation import generate
        from .schedule import (
            SCHEDULES,
            ScheduleChoice,
            check_schedule,
            choose_schedule,
            schedule_candidates,
            schedule_name,
        )

        s = self.settings
        scheme = scheme or s.scheme
        requested = check_schedule(schedule or s.schedule, scheme)
        current = schedule_name(engine.options)
        if requested != "auto":
            return ScheduleChoice.fixed(current, f"set by schedule={requested!r}")
        if (getattr(engine, "graph_misses_dict", dict)().get("layers") and s.batch_size == 1
                and (beams or s.beams) == 1):
            return ScheduleChoice.fixed(current, "not measured: decode steps are captured whole at batch 1 "
                                                 "(toolkit.moe.graph_pass), which no schedule changes")
        all_resident = engine.gpu_experts >= engine.n_layers * engine.n_experts
        candidates, reason = schedule_candidates(scheme, engine.options, engine.device.type, all_resident)
        n = s.warmup_length(new_tokens)
        if not candidates or not n:
            return ScheduleChoice.fixed(current, reason or "not measured: no warm-up (warmup_tokens=0)")
        kw, done = s.generate_kwargs(beams), []

        def measure(name: str) -> float:
            engine.set_schedule(*SCHEDULES[name])
            self.reset_routing()
            r = generate(engine, self.ids, self.mask, max_new_tokens=max(2, n), **kw)
            done.append(name)
            if on_generation is not None:
                on_generation("warm-up", len(done), False)
            return r.decode_ms["median"]

        choice = choose_schedule(candidates, measure, rounds=WARMUP_ROUNDS, steady_within=WARMUP_STEADY)
        engine.set_schedule(*SCHEDULES[choice.picked])
        return choice

    def _generate_measured(self, target, beams: int, new_tokens: int, streamer=None, on_generation=None):
        """The measured generations of one run -> (last result with every repeat's decode samples, prefills, stats)."""
        from .generation import generate

        s = self.settings
        kw = s.generate_kwargs(beams)
        results = []
        for i in range(s.repeats):
            self.reset_routing()
            results.append(generate(target, self.ids, self.mask, max_new_tokens=new_tokens,
                                    streamer=streamer if i == s.repeats - 1 else None, tokenizer=self.tokenizer, **kw))
            if on_generation is not None:
                on_generation("measured", i + 1, None)
        last = results[-1]
        if len(results) > 1:  # pool the decode samples of every repeat into one distribution
            last = dataclasses.replace(last, decode_samples_ms=tuple(x for r in results for x in r.decode_samples_ms))
        stats = copy.deepcopy(target.stats) if _is_engine(target) else None
        return last, tuple(r.prefill_ms for r in results), stats

    def _with_rows(self, beams: int):
        """The router for ``beams`` (beams multiply the rows routed per pass); returns the one to put back."""
        previous = self.router
        if beams != self.settings.beams:
            self.router = self._router(self.settings.batch_size * beams)
        return previous

    def run(self, gpu_experts=None, *, scheme=None, policy: str | None = None, new_tokens: int | None = None,
            beams: int | None = None, streamer=None, warmup: bool = True, on_generation=None,
            schedule: str | None = None) -> MoERunResult:
        """One measured configuration: offload, choose the schedule, warm up, replay the routing, generate, restore.

        ``schedule`` (default: the settings'): "auto" measures the candidate schedules during warm-up and
        keeps the fastest (``choose_schedule``; the record's ``schedule`` says what was picked and the
        alternatives' ms per step); a ``toolkit.moe.schedule.SCHEDULES`` name sets it (scheme "ours").
        ``on_generation(phase, count, steady)`` is called after every warm-up ("warm-up") and measured
        ("measured") generation, between generations, never inside a timed one (the CLI's progress bar).
        """
        from .schedule import ScheduleChoice, check_schedule, schedule_name

        s = self.settings
        beams = int(beams or s.beams)
        new_tokens = int(new_tokens or s.new_tokens)
        name = getattr(scheme, "name", None) or scheme or s.scheme
        schedule = check_schedule(schedule or s.schedule, name)
        if streamer is not None and s.batch_size != 1:
            raise ToolkitError("streaming prints one sequence: use batch_size 1")
        k, plan = self.resolve_gpu_experts(gpu_experts, beams=beams, new_tokens=new_tokens)
        previous = self._with_rows(beams)
        try:
            with self.offload(k, scheme=scheme, policy=policy, schedule=schedule) as engine:
                if warmup:
                    choice = self.choose_schedule(engine, name, schedule=schedule, beams=beams, new_tokens=new_tokens,
                                                  on_generation=on_generation)
                    warm = self.warm_up(engine, beams, on_generation, new_tokens,
                                        prior=choice.rounds.get(choice.picked, ()))
                else:
                    choice = ScheduleChoice.fixed(schedule_name(engine.options), "not measured: no warm-up")
                    warm = dict(NO_WARMUP)
                last, prefills, stats = self._generate_measured(engine, beams, new_tokens, streamer, on_generation)
                info = {k2: v for k2, v in engine.to_dict().items() if k2 not in ("cost_model", "stats", "placement")}
                policy_name = getattr(engine.policy, "name", type(engine.policy).__name__)
        finally:
            self.router = previous
        return MoERunResult(
            generation=last, settings=s, preset=self.preset.name, layers=self.preset.layers,
            experts_per_layer=self.preset.experts, device=self.device, scheme=name, policy=policy_name,
            routing=self.routing_name, cpu_threads=self.cpu_threads, engine=info, memory_plan=plan,
            prefill_samples_ms=prefills, warmup=warm, schedule=choice.to_dict(), stats=stats)

    @contextlib.contextmanager
    def unmodified(self):
        """The model as transformers computes it, every expert on the session's device; put back on exit.

        On a GPU the experts live in pinned host memory (the engine's source);
        inside this block they are device copies and the pinned tensors are
        kept, so leaving costs nothing. The unmodified model is the reference a
        configuration's logits and speed are compared with. With routing "model"
        it routes with its own router; with a replayed routing (a trace,
        "uniform") its routers are swapped for the replay the engine uses
        (``RoutedGate``), so both compute the same tokens' routing.
        """
        import torch
        from torch import nn

        from .offload import RoutedGate
        from .presets import moe_blocks

        dev = torch.device(self.device)
        blocks = moe_blocks(self.model)
        moved = [b.experts for b in blocks if any(p.device.type != dev.type for p in b.experts.parameters())]
        need = sum(p.numel() * p.element_size() for e in moved for p in e.parameters())
        if need and dev.type == "cuda" and need > torch.cuda.mem_get_info(dev)[0]:
            raise ToolkitError(f"the unmodified model needs {need / 2**30:.1f} GiB more on {self.device} than is free")
        saved = [dict(e._parameters) for e in moved]
        gates = [b.gate for b in blocks]
        try:
            for e, params in zip(moved, saved):
                for name, p in params.items():
                    e._parameters[name] = nn.Parameter(p.data.to(dev), requires_grad=False)
            if self.router is not None:
                for layer, b in enumerate(blocks):
                    b.gate = RoutedGate(b.gate, layer, self.router, self.preset.experts)
            yield self.model
        finally:
            for b, gate in zip(blocks, gates):
                b.gate = gate
            for e, params in zip(moved, saved):
                e._parameters.update(params)
            if moved and dev.type == "cuda":
                torch.cuda.empty_cache()

    def run_unmodified(self, *, new_tokens: int | None = None, beams: int | None = None,
                       warmup: bool = True) -> MoERunResult:
        """The same measured run on the unmodified model (``unmodified()``, transformers' eager ``generate``
        with every expert on the device, the session's routing replayed): the reference of a sweep."""
        import torch

        from .schedule import ScheduleChoice

        s = self.settings
        beams = int(beams or s.beams)
        new_tokens = int(new_tokens or s.new_tokens)
        previous = self._with_rows(beams)
        try:
            with self.unmodified() as model:
                warm = self.warm_up(model, beams, new_tokens=new_tokens) if warmup else dict(NO_WARMUP)
                last, prefills, _ = self._generate_measured(model, beams, new_tokens)
        finally:
            self.router = previous
        schedule = ScheduleChoice.fixed("unmodified", "transformers' own experts forward, no CPU experts")
        return MoERunResult(
            generation=last, settings=s, preset=self.preset.name, layers=self.preset.layers,
            experts_per_layer=self.preset.experts, device=self.device, scheme="unmodified", policy="none",
            routing=self.routing_name, cpu_threads=torch.get_num_threads(), engine={}, prefill_samples_ms=prefills,
            warmup=warm, schedule=schedule.to_dict())

    # -- measurements inside ``with session.offload(...) as engine`` -------------------------------------------
    def measure_prefill(self, engine, tokens: int, repeats: int = 3, warm_tokens: int | None = None,
                        clock=time.perf_counter) -> PrefillResult:
        """A ``tokens``-long prompt through the model, no KV cache kept, timed ``repeats`` times (routing replayed).

        One untimed pass of ``warm_tokens`` (default ``tokens``) first: kernels for
        the new shapes, and the pageable clones a pageable-copy scheme makes at
        its first copy. Each timed pass starts from the routing's first row.
        """
        import torch

        from .generation import cuda_synchronizer
        from .prompts import random_prompts

        _check_count("tokens", tokens, 1)
        _check_count("repeats", repeats, 1)
        s = self.settings
        ids = random_prompts(self.preset.vocab, int(tokens), seed=s.seed + 1)[0].to(self.device)  # [1, tokens]
        sync = cuda_synchronizer(self.device)
        offloaded = _is_engine(engine)
        model = engine.model if offloaded else engine

        @torch.no_grad()
        def once(x) -> float:
            self.reset_routing()
            if offloaded:
                engine.reset_stats()
            sync()
            t0 = clock()
            model(input_ids=x, use_cache=False, logits_to_keep=1)
            sync()
            return (clock() - t0) * 1e3

        once(ids[:, : warm_tokens or tokens])
        samples = tuple(once(ids) for _ in range(int(repeats)))
        stats = copy.deepcopy(engine.stats) if offloaded else None
        return PrefillResult(tokens=int(tokens), samples_ms=samples, stats=stats)

    def probe_logits(self, target):
        """Logits of a left-padded batch of two prompts, then of one cached decode step, in float32.

        -> (prefill [N, V] at the real prompt positions, decode [2, V]). ``target``:
        an engine or the unmodified model; the routing is replayed from its start,
        so two configurations see the same routing (``logits_error`` compares them).
        """
        import torch

        from .prompts import random_prompts

        s, V = self.settings, self.preset.vocab
        lengths = [s.prompt_tokens, max(1, s.prompt_tokens - 5)]
        ids, mask = random_prompts(V, lengths, seed=s.seed + 1, pad_token_id=self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)  # [2, P]
        next_ids = torch.randint(3, V, (2,), generator=torch.Generator().manual_seed(s.seed + 2)).to(self.device)
        model = target.model if _is_engine(target) else target
        if _is_engine(target):
            target.set_phase("auto")
        self.reset_routing()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            prefill = out.logits[mask.bool()].float()  # [N, V]
            mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [2, P+1]
            step = model(input_ids=next_ids[:, None], attention_mask=mask2, use_cache=True,
                         **{cache_keyword(model): output_cache(out)})
        return prefill, step.logits[:, -1].float()  # [N, V], [2, V]

    def probe_exact(self):
        """``probe_logits`` of the unmodified model computed in float32 from its own weights
        (``toolkit.moe.exact``): what a bf16 run and the unmodified bf16 model are both measured against."""
        from .exact import in_float32

        with self.unmodified() as model, in_float32(model):
            return self.probe_logits(model)

    def decode_step(self, engine):
        """fn, args and label for one decode step of ``engine`` after this session's prompt (for profiling).

        The KV cache is cropped back to the prompt before each step, so every step decodes the same position.
        With decode graphs (``engine.graphs``) the step runs as ``generate`` runs it: on the graphs' static
        cache, rewound in place, so the profile shows the replayed dense part.
        """
        import torch
        from transformers import DynamicCache

        from .graphs import rewind

        p, s = self.preset, self.settings
        B, P = s.batch_size, s.prompt_tokens
        g = torch.Generator().manual_seed(s.seed)
        ids = torch.randint(3, p.vocab, (B, P + 1), generator=g).to(self.device)  # [B, P+1]
        cache_kw = cache_keyword(engine.model)
        graphs = getattr(engine, "graphs", None)
        cache = graphs.static_cache(engine.model.config, B, P + 1) if graphs is not None else None
        if cache is None or not rewind(cache, 0):  # no graphs, or a static cache kept some other way: eager
            graphs, cache = None, DynamicCache(config=engine.model.config)
        self.reset_routing()
        with torch.no_grad():
            engine.set_phase("prefill")
            engine.model(input_ids=ids[:, :P], use_cache=True, **{cache_kw: cache})
        engine.set_phase("decode")
        engine.reset_stats()

        def step(tok):
            if graphs is not None:
                rewind(cache, P)
            else:
                extra = cache.get_seq_length() - P
                if extra > 0:
                    cache.crop(-extra)  # a negative count removes tokens in every transformers 5.x
            return engine.model(input_ids=tok, use_cache=True, **{cache_kw: cache}).logits  # [B, 1, V]

        if graphs is not None:  # capture here, before any profiler runs: the profiled steps are replays
            with torch.no_grad():
                step(ids[:, P:])
            engine.reset_stats()

        layers = f"{p.layers} layer" + ("s" if p.layers != 1 else "")
        label = (f"{p.name}, {layers}, {engine.gpu_experts} of {p.layers * p.experts} experts resident, "
                 f"decode step, batch {B}")
        return step, (ids[:, P:],), label

    def close(self) -> None:
        self.model = None
        self.router = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _steady(medians: list[float]) -> bool:
    from .schedule import is_steady

    return is_steady(medians, WARMUP_STEADY)


def run_moe(settings: MoESettings | None = None, *, streamer=None, on_built=None, **overrides) -> MoERunResult:
    """One offloaded run with ``settings`` (or keyword overrides of the defaults): the ``moe`` command's call.

    ``on_built(session)`` is called once the model is built (the CLI prints the memory plan there).
    """
    with MoESession(settings, **overrides) as session:
        if on_built is not None:
            on_built(session)
        return session.run(streamer=streamer)


def sweep_frame(results):
    """{gpu_experts: MoERunResult | GenerationResult} -> a DataFrame, one row per budget."""
    import pandas as pd

    rows = []
    for k, r in results.items():
        g = getattr(r, "generation", r)
        hr = g.hit_rate or {}
        rows.append({"gpu_experts": k, "decode_tokens_per_s": g.decode_tokens_per_s,
                     "prefill_ms": getattr(r, "prefill_ms", g.prefill_ms), "decode_ms": g.decode_ms["median"],
                     "hit_rate": hr.get("decode"), "hit_rate_prefill": hr.get("prefill")})
    return pd.DataFrame(rows)
