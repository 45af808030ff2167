"""Generation with metrics: transformers' own ``generate``, timed per step, with the experts' hit rates.

``generate`` runs transformers' own ``generate`` (greedy, sampling or beam
search; never a hand-written loop) and measures it from the inside:

- ``StepTimer`` is a logits processor, so transformers calls it once per step,
  right after the step's forward pass. On a GPU it records a CUDA event there
  (read once the run is over); elsewhere it reads the clock. Its first call
  marks the end of prefill (time to first token) and switches an offloaded
  model's statistics from the prefill to the decode phase; each later call
  closes one decode step. So a decode sample is the full time of one step
  (forward pass, logits, token choice, beam bookkeeping, and the host's work
  between steps while the GPU waits for it). It never waits for the GPU
  itself: a sync there would make the host's work after the forward
  (token choice, bookkeeping) wait for the forward instead of overlapping
  with it, and the timer would slow the step it times.
- Streaming (``toolkit.moe.streaming``, beam search included) never runs inside
  a timed step: its taps only copy token ids to the host and enqueue them.
- transformers' loop asks the GPU after every step whether to stop (a sync),
  so the host's work between steps (inputs, masks, the next launch: ~1.4 ms a
  step offloaded and ~0.6 ms with every expert resident, on the lent H200
  host) runs while the GPU waits. Where no step can stop
  early (``ignore_eos``, one beam, no other stopping rule, no streaming) on a
  GPU, ``generate`` lets transformers read that answer one step late
  (``DeferredStopCheck``, which transformers itself takes on Apple GPUs only):
  the host queues the next step while the GPU runs this one, and the output
  is the same, since the loop ends at ``max_new_tokens`` on the host's count.

The run's numbers come back as a ``GenerationResult`` value; inputs for offline
runs (a synthetic tokenizer, random prompts) are in ``toolkit.moe.prompts``.

Shapes: B batch, P prompt tokens, S sequence length so far.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ToolkitError
from .graphs import cache_keyword
from .phases import PHASES
from .streaming import TokenStream, as_logits_processor, as_stopping_criterion

# --------------------------------------------------------------------------- the stop check

@contextlib.contextmanager
def deferred_stop_check(owned_cache=None):
    """Within: transformers' ``generate`` on a CUDA device reads whether to stop one step late, as it does on
    Apple GPUs (``DeferredStopCheck``), for a cache it may roll back or does not hand back, or ``owned_cache``
    (the decode graphs' static cache: its ``crop`` keeps every position, ``graphs.keep_in_place``). Yields a
    dict whose ``"deferred"`` says what transformers chose (None: it did not ask; False where this transformers
    has no deferred check)."""
    from transformers.generation import utils as gen_utils

    state = {"deferred": None}
    cls = getattr(gen_utils, "DeferredStopCheck", None)
    if cls is None or not isinstance(cls.__dict__.get("is_supported"), staticmethod):
        state["deferred"] = False
        yield state
        return
    original = cls.__dict__["is_supported"]

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if torch.device(device).type != "cuda" or is_assistant:
            ok = original.__func__(device, cache, cache_is_returned, is_assistant)
        else:
            ok = cache is None or cache is owned_cache or not cache_is_returned or bool(cache.is_croppable)
        state["deferred"] = bool(ok)
        return ok

    cls.is_supported = staticmethod(is_supported)
    try:
        yield state
    finally:
        cls.is_supported = original


def fixed_length(ignore_eos: bool, num_beams: int, stream, criteria, kwargs: dict) -> bool:
    """Whether ``generate``'s loop can end only at ``max_new_tokens`` (counted on the host): EOS suppressed, one
    beam (beam search keeps its own loop), no streaming taps, stopping criteria or stop strings. A stop check read
    one step late then changes nothing but the waiting."""
    return bool(ignore_eos) and int(num_beams) == 1 and stream is None and not len(criteria or ()) \
        and not kwargs.get("stop_strings")


# --------------------------------------------------------------------------- timing

def cuda_synchronizer(device) -> Callable[[], None]:
    """A function that waits for the GPU (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class StepTimer:
    """Logits processor that marks the end of each generation step: a CUDA event, or the clock.

    ``mark`` (optional): records and returns an event on the device's stream
    (``cuda_event``); the marks are read after the run (``elapsed_ms``), so no
    step waits for them. Without it the timer syncs (``synchronize``) and reads
    ``clock`` at each call, into ``times``. ``on_first`` runs at the first call
    (switch the experts' phase to decode).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None,
                 on_first: Callable[[], None] | None = None, mark: Callable[[], object] | None = None):
        self.clock, self.synchronize, self.on_first, self.mark = clock, synchronize, on_first, mark
        self.times: list[float] = []
        self.marks: list = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.mark is not None:
            self.marks.append(self.mark())
        else:
            self.synchronize()
            self.times.append(self.clock())
        if len(self.times) + len(self.marks) == 1 and self.on_first is not None:
            self.on_first()
        return scores

    def elapsed_ms(self, start) -> list[float]:
        """Milliseconds from ``start`` (an event recorded before the run) to each step's mark; after a sync."""
        return [float(start.elapsed_time(m)) for m in self.marks]


def cuda_event(device) -> Callable[[], object]:
    """A function that records a timing CUDA event on ``device``'s current stream and returns it."""
    def mark():
        e = torch.cuda.Event(enable_timing=True)
        e.record(torch.cuda.current_stream(device))
        return e

    return mark


# --------------------------------------------------------------------------- result

def _quantile(samples: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(samples, dtype=float), q)) if len(samples) else math.nan


@dataclass(frozen=True)
class GenerationResult:
    """One generation run: timings, expert statistics and the generated ids.

    ``decode_tokens_per_s`` counts tokens of the returned sequences: decode
    steps per second x batch size. Beams do not multiply it (a beam-search step
    yields one token per sequence); for beams it is steps/s x batch.
    """

    prefill_ms: float
    decode_samples_ms: tuple[float, ...]
    end_to_end_ms: float
    batch_size: int
    num_beams: int
    do_sample: bool
    prompt_tokens: int          # padded prompt length P
    new_tokens: int             # generated tokens in the output (beyond P)
    sequences: tuple[tuple[int, ...], ...]  # generated ids per returned sequence
    text: tuple[str, ...] | None = None
    experts: dict | None = None  # from ExpertStats: hit_rate, bytes_copied, ... (None: not offloaded)
    gpu_experts: int | None = None
    cost_model: dict | None = None
    env: dict = field(default_factory=dict)
    stop_check_deferred: bool = False  # transformers read whether to stop one step late (``deferred_stop_check``)

    @property
    def mode(self) -> str:
        if self.num_beams > 1:
            return "beam_sample" if self.do_sample else "beam"
        return "sample" if self.do_sample else "greedy"

    @property
    def decode_ms(self) -> dict:
        s = self.decode_samples_ms
        return {"median": _quantile(s, 0.5), "p90": _quantile(s, 0.9),
                "mean": float(np.mean(s)) if s else math.nan, "samples": list(s)}

    @property
    def decode_tokens_per_s(self) -> float:
        total_s = sum(self.decode_samples_ms) / 1e3
        return len(self.decode_samples_ms) * self.batch_size / total_s if total_s > 0 else math.nan

    @property
    def hit_rate(self) -> dict | None:
        return None if self.experts is None else self.experts.get("hit_rate")

    def to_dict(self) -> dict:
        exp = self.experts or {}
        return {
            "mode": self.mode, "batch_size": self.batch_size, "num_beams": self.num_beams,
            "do_sample": self.do_sample, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms,
            "decode_tokens_per_s": self.decode_tokens_per_s, "end_to_end_ms": self.end_to_end_ms,
            "hit_rate": exp.get("hit_rate"), "bytes_copied": exp.get("bytes_copied"),
            "cpu_expert_calls": exp.get("cpu_expert_calls"), "copy_expert_calls": exp.get("copy_expert_calls"),
            "activations": exp.get("activations"),
            "gpu_experts": self.gpu_experts, "cost_model": self.cost_model,
            "sequences": [list(s) for s in self.sequences], "text": None if self.text is None else list(self.text),
            "env": self.env, "stop_check_deferred": self.stop_check_deferred,
        }

    @classmethod
    def from_dict(cls, d: dict) -> GenerationResult:
        keys = ("hit_rate", "bytes_copied", "cpu_expert_calls", "copy_expert_calls", "activations")
        experts = {k: d.get(k) for k in keys} if d.get("hit_rate") is not None else None
        return cls(prefill_ms=d["prefill_ms"], decode_samples_ms=tuple(d["decode_ms"]["samples"]),
                   end_to_end_ms=d["end_to_end_ms"], batch_size=d["batch_size"], num_beams=d["num_beams"],
                   do_sample=d["do_sample"], prompt_tokens=d["prompt_tokens"], new_tokens=d["new_tokens"],
                   sequences=tuple(tuple(s) for s in d["sequences"]),
                   text=None if d.get("text") is None else tuple(d["text"]), experts=experts,
                   gpu_experts=d.get("gpu_experts"), cost_model=d.get("cost_model"), env=d.get("env") or {},
                   stop_check_deferred=bool(d.get("stop_check_deferred", False)))

    def to_dataframe(self):
        """Per-step latencies: step 0 is prefill, steps 1.. are decode steps."""
        import pandas as pd

        rows = [{"step": 0, "phase": "prefill", "ms": self.prefill_ms}]
        rows += [{"step": i + 1, "phase": "decode", "ms": ms} for i, ms in enumerate(self.decode_samples_ms)]
        df = pd.DataFrame(rows)
        df["mode"], df["batch_size"], df["num_beams"], df["gpu_experts"] = (
            self.mode, self.batch_size, self.num_beams, self.gpu_experts)
        return df

    def __repr__(self) -> str:
        d = self.decode_ms
        s = (f"GenerationResult({self.mode}, batch {self.batch_size}, beams {self.num_beams}, "
             f"{self.new_tokens} new tokens: prefill {self.prefill_ms:.2f} ms, decode median {d['median']:.2f} ms "
             f"p90 {d['p90']:.2f} ms, {self.decode_tokens_per_s:.1f} tok/s")
        hr = self.hit_rate
        if hr:
            s += f", hit rate prefill {_fmt(hr.get('prefill'))} decode {_fmt(hr.get('decode'))}"
        return s + ")"


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


# --------------------------------------------------------------------------- expert statistics

def _nan_to_none(x):
    x = float(x)
    return None if math.isnan(x) else x


def expert_metrics(stats) -> dict:
    """Hit rates split by phase, per layer and per expert, plus copy/CPU counters, from an ``ExpertStats``.

    hit rate = activations served by GPU-resident experts / all activations
    (None where a phase had no activations).
    """
    acts = {p: np.asarray(_phase_array(stats, "activations", p), dtype=np.int64) for p in PHASES}
    hits = {p: np.asarray(_phase_array(stats, "hits", p), dtype=np.int64) for p in PHASES}

    def rate(h, a):
        return np.where(a > 0, h / np.maximum(a, 1), np.nan)

    total_a = sum(int(a.sum()) for a in acts.values())
    total_h = sum(int(h.sum()) for h in hits.values())
    hit_rate = {
        "overall": total_h / total_a if total_a else None,
        **{p: (int(hits[p].sum()) / int(acts[p].sum()) if acts[p].sum() else None) for p in PHASES},
        "per_layer": {p: [_nan_to_none(x) for x in rate(hits[p].sum(1), acts[p].sum(1))] for p in PHASES},
        "per_expert": {p: [[_nan_to_none(x) for x in row] for row in rate(hits[p], acts[p])] for p in PHASES},
    }
    return {
        "hit_rate": hit_rate,
        "activations": {p: acts[p].tolist() for p in PHASES},
        "bytes_copied": int(getattr(stats, "bytes_copied", 0)),
        "cpu_expert_calls": int(getattr(stats, "cpu_expert_calls", 0)),
        "copy_expert_calls": int(getattr(stats, "copy_expert_calls", 0)),
    }


def _phase_array(stats, name: str, phase: str):
    """``stats.<name>[phase]`` (dict per phase) or ``stats.<phase>.<name>`` (object per phase)."""
    v = getattr(stats, name, None)
    if isinstance(v, dict):
        return v[phase]
    return getattr(getattr(stats, phase), name)


# --------------------------------------------------------------------------- generate

def _is_offloaded(obj) -> bool:
    return hasattr(obj, "set_phase") and hasattr(obj, "stats") and hasattr(obj, "model")


def _eos_ids(hf_model) -> list[int]:
    eos = getattr(hf_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(hf_model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(hf_model, eos: list[int]) -> int:
    for src in (hf_model.generation_config, hf_model.config):
        pad = getattr(src, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return eos[0] if eos else 0


def _release_phase(offloaded) -> None:
    """Give phase detection back to the engine ('auto' where supported)."""
    try:
        offloaded.set_phase("auto")
    except ToolkitError:
        offloaded.set_phase("prefill")


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, num_beams: int = 1, do_sample: bool = False, ignore_eos: bool = False,
             seed: int = 0, streamer=None, tokenizer=None, clock: Callable[[], float] = time.perf_counter,
             synchronize: Callable[[], None] | None = None, mark: Callable[[], object] | None = None,
             defer_stop: bool = True, **generate_kwargs) -> GenerationResult:
    """Generate with transformers ``generate`` and measure prefill, every decode step and the experts' hit rates.

    ``model``: a transformers causal LM or an ``Offloaded`` (then its stats are
    reset, split by phase and reported). ``input_ids``/``attention_mask``:
    [B, P], left-padded. ``streamer``: a sink with ``put(ids)`` / ``end()``
    (e.g. ``TextPrinter``) fed from a background thread with tokens that are
    final, batch size 1 only; works for greedy, sampling and beam search.
    ``ignore_eos`` generates exactly ``max_new_tokens`` (EOS is suppressed),
    which benchmarks want. ``tokenizer`` (optional) decodes the output into
    ``text`` after timing. Steps are timed with CUDA events on a GPU
    (``StepTimer``); ``clock``/``synchronize`` (a synced clock at every step
    instead) and ``mark`` (events from elsewhere) are injectable for tests.
    ``defer_stop``: on a GPU, where no step can stop early, transformers reads
    whether to stop one step late (see the module's docstring); False keeps
    its sync after every step. Extra keyword arguments go to transformers
    (``temperature``, ``top_k``, ``length_penalty``, ...).
    """
    offloaded = model if _is_offloaded(model) else None
    hf = offloaded.model if offloaded is not None else model
    if int(num_beams) < 1:
        raise ToolkitError(f"num_beams must be >= 1, got {num_beams}")
    if int(max_new_tokens) < 1:
        raise ToolkitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ToolkitError(f"input_ids must be [batch, prompt_tokens], got shape {tuple(input_ids.shape)}")
    B, P = input_ids.shape
    if streamer is not None and B != 1:
        raise ToolkitError(f"streaming supports batch size 1, got {B}")

    device = hf.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    sync = synchronize or cuda_synchronizer(device)
    eos = _eos_ids(hf)

    def to_decode():
        if offloaded is not None:
            offloaded.set_phase("decode")

    from transformers import LogitsProcessorList, StoppingCriteriaList

    if mark is None and synchronize is None and device.type == "cuda":
        mark = cuda_event(device)
    timer = StepTimer(clock, sync, on_first=to_decode, mark=mark)
    user_processors = generate_kwargs.pop("logits_processor", None) or []
    processors = LogitsProcessorList([as_logits_processor(timer), *user_processors])
    criteria = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    stream = None
    if streamer is not None:
        if num_beams > 1 and (len(criteria) or generate_kwargs.get("stop_strings")):
            # a hypothesis ended by a criterion we cannot see could win: the streamed prefix would not be final
            raise ToolkitError("streaming beam search supports EOS and max_new_tokens as stopping rules only")
        stream = TokenStream(streamer, P, int(num_beams), [] if ignore_eos else eos)
        if num_beams > 1:
            processors.append(as_logits_processor(stream.running_tap))
        criteria.append(as_stopping_criterion(stream.candidates_tap))

    kwargs = dict(max_new_tokens=int(max_new_tokens), num_beams=int(num_beams), do_sample=bool(do_sample),
                  pad_token_id=_pad_id(hf, eos))
    if ignore_eos:
        kwargs["min_new_tokens"] = int(max_new_tokens)
    kwargs.update(generate_kwargs)
    graphs = getattr(offloaded, "graphs", None)
    owned_cache = None
    if graphs is not None and not any(k in kwargs for k in ("cache", "past_key_values", "cache_implementation")):
        # a static KV cache kept across calls: the decode graphs write it in place at fixed addresses (beam
        # search reorders it in place); transformers would compile the forward for a static cache unless told not to
        owned_cache = graphs.static_cache(hf.config, B * int(num_beams), P + int(max_new_tokens))
        kwargs[cache_keyword(hf)] = owned_cache
        kwargs["disable_compile"] = True
    defer = bool(defer_stop) and device.type == "cuda" and fixed_length(ignore_eos, num_beams, stream, criteria, kwargs)
    stop_check = deferred_stop_check(owned_cache) if defer else contextlib.nullcontext({"deferred": False})

    if offloaded is not None:
        offloaded.reset_stats()
        offloaded.set_phase("prefill")
    torch.manual_seed(seed)
    out, done = None, False
    try:
        sync()
        t0 = clock()
        start = mark() if mark is not None else None
        # no_grad, not inference_mode: buffers the engine creates here must stay writable afterwards
        with torch.no_grad(), stop_check as checked:
            out = hf.generate(input_ids, attention_mask=attention_mask, logits_processor=processors,
                              stopping_criteria=criteria, **kwargs)
        sync()
        t_end = clock()
        out = out if torch.is_tensor(out) else out.sequences  # return_dict_in_generate=True
        done = True
    finally:
        if offloaded is not None:
            _release_phase(offloaded)
        if stream is not None:
            try:
                stream.finish(out[0, P:] if done else None)
            except Exception:
                if done:  # a failing sink is the error to report, unless generation itself failed
                    raise
    if stream is not None and not stream.prefix.consistent:
        raise RuntimeError("beam streaming emitted a token the search later changed (bug)")

    # seconds since the start, at the end of prefill and of each decode step
    times = [t0 + ms / 1e3 for ms in timer.elapsed_ms(start)] if mark is not None else timer.times
    generated = out[:, P:].cpu()
    text = None
    if tokenizer is not None:
        text = tuple(tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True))
    experts = gpu_experts = cost_model = None
    threads = None
    if offloaded is not None:
        experts = expert_metrics(offloaded.stats)
        budget = getattr(offloaded, "gpu_experts", None)  # caching policies may hold fewer at times
        gpu_experts = int(budget if budget is not None else np.asarray(offloaded.placement).sum())
        cm = getattr(offloaded, "cost_model", None)
        cost_model = cm.to_dict() if hasattr(cm, "to_dict") else cm
        threads = getattr(offloaded, "cpu_threads", None)
    from ..env import environment

    return GenerationResult(
        prefill_ms=(times[0] - t0) * 1e3 if times else math.nan,
        decode_samples_ms=tuple((b - a) * 1e3 for a, b in zip(times, times[1:])),
        end_to_end_ms=(t_end - t0) * 1e3,
        batch_size=B, num_beams=int(num_beams), do_sample=bool(do_sample), prompt_tokens=P,
        new_tokens=int(generated.shape[1]), sequences=tuple(tuple(r) for r in generated.tolist()), text=text,
        experts=experts, gpu_experts=gpu_experts, cost_model=cost_model,
        env=environment(str(device), threads=threads), stop_check_deferred=bool(checked["deferred"]),
    )
