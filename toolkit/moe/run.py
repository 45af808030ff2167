"""One offloaded MoE run, measured: the single path behind the CLI, the report, the widgets and the benchmarks.

The recipe is always the same: check the inputs (files, budgets) before the
model is built -> build the preset with random weights (experts in pinned host
memory on a GPU) -> calibrate or load the cost model -> offload with a scheme
-> warm up until decode steps are steady -> replay the same routing from its
start -> generate with per-step timing -> restore the model. ``MoESettings``
holds every default of that recipe, once.

Two ways in:

- ``run_moe(settings)`` (or ``run_moe(preset=..., gpu_experts=...)``): one
  run, start to finish; what ``python -m toolkit moe`` calls.
- ``MoESession(settings)``: the built model with its routing, cost model and
  prompt, reused for many runs (budgets, schemes, policies);
  ``session.run(gpu_experts=..., scheme=...)`` is the same single run, and
  ``with session.offload(...) as engine:`` hands out the engine itself (for
  profiling one decode step, say) and restores the model on exit.

Shapes: B batch, P prompt tokens, L MoE layers, E experts per layer, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ToolkitError

ROUTINGS = ("auto", "model", "uniform")  # besides a trace name or .npz path
WARMUP_ROUNDS = 5  # at most this many warm-up generations ...
WARMUP_STEADY = 0.05  # ... stopping once two successive median decode steps agree within 5%


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
    warmup_tokens: tokens of each warm-up generation (0: no warm-up); warm-up
    repeats until two successive median decode steps agree within 5% (at most
    5 rounds): a cold process, a GPU whose clocks have not ramped, or a CPU
    thread pool not yet spun up is slower for a while.
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
    prompt_tokens: int = 16
    new_tokens: int = 32
    batch_size: int = 1
    beams: int = 1
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    allow_eos: bool = False  # False: generate exactly new_tokens (what timing needs)
    warmup_tokens: int = 8
    repeats: int = 1  # measured generations per run (their samples pooled; each run's prefill kept)
    seed: int = 0
    device: str = "auto"

    def replace(self, **changes) -> MoESettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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

    def to_dict(self) -> dict:
        """Flat record: the run's context, then ``GenerationResult.to_dict()`` keys (the CLI's JSON)."""
        return {"preset": self.preset, "layers": self.layers, "experts_per_layer": self.experts_per_layer,
                "total_experts": self.total_experts, "device": self.device, "scheme": self.scheme,
                "policy": self.policy, "routing": self.routing, "trace": self.routing if _is_trace(self.routing)
                else None, "cpu_threads": self.cpu_threads, **self.generation.to_dict(),
                "prefill_ms": self.prefill_ms, "prefill_samples_ms": list(self.prefill_samples_ms),
                "engine": self.engine,
                "memory_plan": None if self.memory_plan is None else self.memory_plan.to_dict(), "warmup": self.warmup,
                "settings": self.settings.to_dict()}

    def __repr__(self) -> str:
        return (f"MoERunResult({self.preset} x{self.layers}, {self.generation.gpu_experts}/{self.total_experts} "
                f"GPU experts, {self.scheme}, {self.routing} routing: {self.generation!r})")


def _is_trace(routing: str) -> bool:
    return routing not in ROUTINGS


# -- checks that need no model ---------------------------------------------------------------------------

def resolve_settings(settings: MoESettings | None = None, **overrides) -> MoESettings:
    """Settings with overrides applied and checked (one clear ToolkitError naming the setting)."""
    s = (settings or MoESettings()).replace(**overrides) if overrides else (settings or MoESettings())
    for name in ("prompt_tokens", "new_tokens", "batch_size", "beams", "repeats"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ToolkitError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(s.warmup_tokens, bool) or not isinstance(s.warmup_tokens, int | np.integer) or s.warmup_tokens < 0:
        raise ToolkitError(f"warmup_tokens must be an integer >= 0, got {s.warmup_tokens!r}")
    if s.temperature is not None and not (math.isfinite(s.temperature) and s.temperature > 0):
        raise ToolkitError(f"temperature must be a finite number > 0, got {s.temperature}")
    if s.top_k is not None and (isinstance(s.top_k, bool) or int(s.top_k) < 0):
        raise ToolkitError(f"top_k must be >= 0, got {s.top_k}")
    if s.threads is not None and (isinstance(s.threads, bool) or int(s.threads) < 1):
        raise ToolkitError(f"threads must be >= 1, got {s.threads}")
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

    get_baseline(s.scheme)
    if s.policy is not None:
        from .policies import POLICY_NAMES

        if s.policy not in POLICY_NAMES:
            raise ToolkitError(f"unknown policy {s.policy!r}; choose one of: {', '.join(POLICY_NAMES)}")
    return s


# -- the session --------------------------------------------------------------------------------------------

class MoESession:
    """A built MoE model with its routing, popularity profile, cost model, tokenizer and prompt.

    Built once from ``MoESettings``; ``run()`` measures one configuration
    (GPU experts, scheme, policy) and leaves the model as it found it. Files
    (calibration, trace, placement) are read and checked before the model is
    built. Use as a context manager, or call ``close()``, to free the model.
    """

    def __init__(self, settings: MoESettings | None = None, *, model=None, **overrides):
        from ..env import resolve_device
        from .presets import from_name

        self.settings = s = resolve_settings(settings, **overrides)
        self.preset = p = from_name(s.preset, s.layers)
        self.device = resolve_device(s.device)
        self.total_experts = p.layers * p.experts
        if isinstance(s.gpu_experts, int) and s.gpu_experts > self.total_experts:
            raise ToolkitError(f"gpu_experts {s.gpu_experts} is more than the model has: {p.layers} layers x "
                               f"{p.experts} experts = {self.total_experts}")
        self.trace, self.popularity, self.routing_name = self._load_routing(s.routing)
        self.placement = self._load_placement(s.placement)
        self.cost_model = None
        if s.calibration:
            from .costs import load_cost_model

            self.cost_model = load_cost_model(s.calibration)
        self.router = self._router(s.batch_size * s.beams)
        from .generation import random_prompts, synthetic_tokenizer

        self.tokenizer = synthetic_tokenizer(p.vocab)
        self.ids, self.mask = random_prompts(p.vocab, s.prompt_tokens, s.batch_size, seed=s.seed,
                                             pad_token_id=self.tokenizer.pad_token_id)  # [B, P]
        self.model = model if model is not None else self._build()
        if self.cost_model is None:
            from .costs import calibrate

            self.cost_model = calibrate(p.hidden, p.intermediate, p.dtype, self.device, threads=s.threads)
        self.cpu_threads = self.cost_model.cpu_threads if s.threads is None else int(s.threads)

    # building blocks, each checked before the model exists
    def _load_routing(self, routing: str):
        p = self.preset
        mixtral_shaped = (p.experts, p.top_k) == (8, 2) and p.layers <= 32
        if routing == "auto":
            routing = "synthetic-mixtral" if mixtral_shaped else "model"
        if routing == "model":
            return None, None, "model"
        if routing == "uniform":
            from .traces import uniform_trace

            tr = uniform_trace(self._trace_tokens(), p.layers, p.experts, p.top_k, seed=self.settings.seed)
            return tr, None, "uniform"  # no profile: placement spreads evenly over the layers
        from .traces import load_trace, synthetic_mixtral

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
        per_run = s.prompt_tokens + s.new_tokens + max(s.warmup_tokens, 1)
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
        from .traces import TraceRouter

        return TraceRouter(self.trace, batch_size=rows_per_pass)

    def _build(self):
        from .presets import build_moe

        cuda = self.device.startswith("cuda")
        # on a GPU the experts go straight to pinned host memory; offload() moves the resident ones over
        return build_moe(self.preset, device=self.device, expert_device="cpu" if cuda else None,
                         seed=self.settings.seed)

    # -- what one run needs ---------------------------------------------------------------------------------
    def resolve_gpu_experts(self, gpu_experts=None, beams: int | None = None, new_tokens: int | None = None):
        """(count, memory plan or None) for a requested budget ("auto", "all" or a count)."""
        s = self.settings
        req = s.gpu_experts if gpu_experts is None else gpu_experts
        if self.placement is not None and req in ("auto", "all"):
            req = int(self.placement.sum())
        if req == "all":
            req = self.total_experts
        if isinstance(req, int | np.integer) and not 0 <= req <= self.total_experts:
            raise ToolkitError(f"gpu_experts must be between 0 and {self.total_experts}, got {req}")
        if not self.device.startswith("cuda"):
            return (self.total_experts if req == "auto" else int(req)), None
        from .memory import plan_memory

        plan = plan_memory(self.model, s.prompt_tokens, new_tokens or s.new_tokens, batch=s.batch_size,
                           beams=beams or s.beams, device=self.device,
                           gpu_experts=None if req == "auto" else int(req))
        return (plan.max_gpu_experts if req == "auto" else int(req)), plan

    def offload(self, gpu_experts=None, *, scheme: str | None = None, policy: str | None = None):
        """The offloaded engine (an ``Offloaded``, a context manager that restores the model on exit)."""
        from .baselines import get_baseline

        k, _ = self.resolve_gpu_experts(gpu_experts)
        base = get_baseline(scheme or self.settings.scheme)
        kw = dict(cost_model=self.cost_model, routing=self.router, cpu_threads=self.cpu_threads)
        policy = policy or self.settings.policy
        if policy is not None:
            from .policies import get_policy

            kw["policy"] = get_policy(policy, popularity=self.popularity, trace=self.trace)
            kw["placement"] = self.placement
        elif self.placement is not None:
            kw["placement"] = self.placement
        return base.offload(self.model, k, device=self.device, popularity=self.popularity, **kw)

    def reset_routing(self) -> None:
        """Replay the routing from its start (every configuration sees the same tokens' routing)."""
        if self.router is not None:
            self.router.reset()

    def _generate_kwargs(self, beams: int) -> dict:
        s = self.settings
        kw = dict(num_beams=beams, do_sample=s.sample, ignore_eos=not s.allow_eos, seed=s.seed)
        if s.sample:
            kw.update({k: v for k, v in (("temperature", s.temperature), ("top_k", s.top_k)) if v is not None})
        return kw

    def warm_up(self, engine, beams: int | None = None) -> dict:
        """Warm-up generations until the median decode step is steady (see ``MoESettings``)."""
        from .generation import generate

        s = self.settings
        if not s.warmup_tokens:
            return {"rounds": 0, "median_decode_ms": [], "steady": None}
        kw = self._generate_kwargs(beams or s.beams)
        medians = []
        for _ in range(WARMUP_ROUNDS):
            self.reset_routing()
            r = generate(engine, self.ids, self.mask, max_new_tokens=max(2, s.warmup_tokens), **kw)
            medians.append(r.decode_ms["median"])
            if len(medians) >= 2 and abs(medians[-1] - medians[-2]) <= WARMUP_STEADY * medians[-2]:
                break
        steady = len(medians) >= 2 and abs(medians[-1] - medians[-2]) <= WARMUP_STEADY * medians[-2]
        return {"rounds": len(medians), "median_decode_ms": medians, "steady": bool(steady)}

    def run(self, gpu_experts=None, *, scheme: str | None = None, policy: str | None = None,
            new_tokens: int | None = None, beams: int | None = None, streamer=None,
            warmup: bool = True) -> MoERunResult:
        """One measured configuration: offload, warm up, replay the routing from its start, generate, restore."""
        from .generation import generate
        from .generation import GenerationResult

        s = self.settings
        beams = int(beams or s.beams)
        new_tokens = int(new_tokens or s.new_tokens)
        if streamer is not None and s.batch_size != 1:
            raise ToolkitError("streaming prints one sequence: use batch_size 1")
        k, plan = self.resolve_gpu_experts(gpu_experts, beams=beams, new_tokens=new_tokens)
        if beams != s.beams:  # beams multiply the rows routed per pass
            self.router = self._router(s.batch_size * beams)
        with self.offload(k, scheme=scheme, policy=policy) as engine:
            warm = self.warm_up(engine, beams) if warmup else {"rounds": 0, "median_decode_ms": [], "steady": None}
            kw = self._generate_kwargs(beams)
            results = []
            for i in range(s.repeats):
                self.reset_routing()
                results.append(generate(engine, self.ids, self.mask, max_new_tokens=new_tokens,
                                        streamer=streamer if i == s.repeats - 1 else None,
                                        tokenizer=self.tokenizer, **kw))
            info = {k2: v for k2, v in engine.to_dict().items() if k2 not in ("cost_model", "stats", "placement")}
            policy_name = getattr(engine.policy, "name", type(engine.policy).__name__)
        if beams != s.beams:
            self.router = self._router(s.batch_size * s.beams)
        last = results[-1]
        if len(results) > 1:  # pool the decode samples of every repeat into one distribution
            pooled = tuple(x for r in results for x in r.decode_samples_ms)
            last = dataclasses.replace(last, decode_samples_ms=pooled)
        assert isinstance(last, GenerationResult)
        return MoERunResult(
            generation=last, settings=s, preset=self.preset.name, layers=self.preset.layers,
            experts_per_layer=self.preset.experts, device=self.device, scheme=scheme or s.scheme,
            policy=policy_name, routing=self.routing_name, cpu_threads=self.cpu_threads, engine=info,
            memory_plan=plan,
            prefill_samples_ms=tuple(r.prefill_ms for r in results), warmup=warm)

    def decode_step(self, engine, batch_size: int | None = None):
        """fn, args and label for one decode step of ``engine`` after this session's prompt (for profiling).

        The KV cache is cropped back to the prompt before each step, so every step decodes the same position.
        """
        import inspect

        import torch
        from transformers import DynamicCache

        p, s = self.preset, self.settings
        B = batch_size or s.batch_size
        g = torch.Generator().manual_seed(s.seed)
        ids = torch.randint(3, p.vocab, (B, s.prompt_tokens + 1), generator=g).to(self.device)  # [B, P+1]
        # the cache argument is `past_key_values` up to transformers ~5.20, `cache` after
        cache_kw = "cache" if "cache" in inspect.signature(engine.model.forward).parameters else "past_key_values"
        cache = DynamicCache(config=engine.model.config)
        with torch.no_grad():
            engine.set_phase("prefill")
            engine.model(input_ids=ids[:, :s.prompt_tokens], use_cache=True, **{cache_kw: cache})
        engine.set_phase("decode")
        engine.reset_stats()
        P = s.prompt_tokens

        def step(tok):
            extra = cache.get_seq_length() - P
            if extra > 0:
                cache.crop(-extra)  # a negative count removes tokens in every transformers 5.x
            return engine.model(input_ids=tok, use_cache=True, **{cache_kw: cache}).logits  # [B, 1, V]

        label = f"{p.name} x{p.layers} layers, {engine.gpu_experts} GPU experts, decode step, batch {B}"
        return step, (ids[:, P:],), label

    def close(self) -> None:
        self.model = None
        self.router = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_moe(settings: MoESettings | None = None, *, streamer=None, on_built=None, **overrides) -> MoERunResult:
    """One offloaded run with ``settings`` (or keyword overrides of the defaults): the ``moe`` command's call.

    ``on_built(session)`` is called once the model is built (the CLI prints the memory plan there).
    """
    with MoESession(settings, **overrides) as session:
        if on_built is not None:
            on_built(session)
        return session.run(streamer=streamer)


def sweep_frame(results) -> "object":
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
