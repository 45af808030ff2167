"""CUDA-graph decode: the dense part of each decoder layer replayed as one captured graph.

Why: in a decode step at batch 1 the dense part of a layer (two RMSNorms,
attention with its rotary embedding and KV-cache write, the residual add) is
about 25 small kernels launched one by one from Python. On the H200 host that
costs ~1.3-1.6 ms per layer while its bytes need ~0.05 ms, and it sits on the
critical path of every offloaded step too (a layer cannot start before the
previous layer's experts are done). Captured once, a replay is one launch.

What is captured, per decoder layer: ``input_layernorm`` -> ``self_attn``
(with the static KV cache's in-place write) -> residual add ->
``post_attention_layernorm``. The MoE block (router and experts) stays eager:
its routing sync, CPU experts and copies are host work, so the graphs are the
pieces between them. Where a layer's experts never leave the device (every
one resident: ``OffloadedExperts.sync_free``), its experts are a second graph
(``DecodeGraphs.experts``).

The whole step as one graph: when every layer's MoE block stays on the device
(the owner's ``whole_step_ready()``: every expert resident, a router or a trace
replay that routes on the device) and a decode step was seen to call the layers
in turn, each with the previous layer's output and the same arguments, the next
steps capture and replay all layers at once from the first layer's call; the
other layers' calls hand out the outputs that replay wrote. Between steps the
owner's ``begin_step`` / ``end_step`` set up what a replay reads (the trace's
rows of this step). Where the decoder (the model that holds the layers, ``base``)
is called with a static-shaped decode input (``input_ids`` [B, 1], a 4-D
attention mask as transformers' ``generate`` passes with a static cache), its
whole forward is the graph instead: embedding, positions, rotary, every layer
and the final norm, so the host does not even run the model's Python before
the layers.

When: decode passes (one new token per sequence, beams included) with a
static KV cache (transformers' ``StaticCache``: fixed addresses, written in
place; ``static_cache`` makes beam search reorder it in place too, where
transformers would reallocate it) and a capture function (CUDA devices).
Prefill, dynamic caches, sliding-window caches (host-side state) and grad
mode run the same function eagerly, so results are the same either way.

How: a layer's first eligible call runs eagerly on a side stream from the
static input tensors (the warm-up, and also this step's real work: it writes
the KV cache once), then the same call is captured on that stream (capture
runs no kernels, so the cache is not written twice). Later calls copy their
inputs into the static tensors (one shared by all layers, such as the rotary
cos/sin, the mask or the positions, is copied once per step) and replay. New
shapes, dtypes or a new cache object recapture; a layer whose inputs change on
every call (nothing to reuse) falls back to eager, and ``reasons`` says why.

Shapes: B batch, D hidden, L cache length.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ToolkitError

# cache lengths are rounded up to a multiple of this, so calls with nearby prompt and output lengths share one
# cache (and its graphs); attending over a few hundred masked slots costs microseconds
CACHE_BLOCK = 256
# a layer that captures this many times in a row without one replay stops trying (its inputs change every call)
MAX_RECAPTURES = 3
# what a call (or the model's config) may ask the layers for: collected by hooks as the layers run, so a step
# that asks for any of them runs its layers one by one
OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")


def cache_keyword(model) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` in recent transformers 5.x, ``past_key_values`` before.

    Passing the old name to a release that has the new one warns on every call (FutureWarning), and the
    old name is removed in transformers 5.40, so it is picked by signature, never hard-coded.
    """
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def dense_part(layer, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer up to its MoE block -> (residual [B, S, D], normed input of the MoE block [B, S, D]).

    The same steps as transformers' decoder layers of the MoE families
    (Mixtral, OLMoE, Qwen3-MoE): ``kwargs`` are what the model passes to the
    layer, and they go on to ``self_attn`` unchanged.
    """
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    residual = hidden_states + attn
    return residual, layer.post_attention_layernorm(residual)


def has_dense_part(layer) -> bool:
    """Whether ``layer`` has the parts ``dense_part`` calls and an ``mlp`` (the MoE block)."""
    return all(hasattr(layer, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))


def decoder_layers(model, blocks) -> list:
    """The decoder layers that hold ``blocks`` (the MoE blocks, in order), or [] if any lacks the usual parts."""
    by_block = {id(m.mlp): m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)}
    layers = [by_block.get(id(b)) for b in blocks]
    return layers if all(layer is not None and has_dense_part(layer) for layer in layers) else []


# --------------------------------------------------------------------------- capture backends

class CapturedGraph:
    """A captured CUDA graph and the output tensors its replays write."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs):
        self.graph, self.outputs = graph, outputs

    def replay(self):
        self.graph.replay()
        return self.outputs


class CudaCapture:
    """Capture on one CUDA device: a side stream for warm-up and capture, one memory pool for all layers."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable, args, kwargs):
        """Run ``fn`` eagerly on the side stream (the capture's warm-up) and return its outputs."""
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = fn(*args, **kwargs)
        main.wait_stream(self.stream)
        for t in out:
            t.record_stream(main)  # made on the side stream, used (and freed) on the main one
        return out

    def capture(self, fn: Callable, args, kwargs) -> CapturedGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn(*args, **kwargs)
        return CapturedGraph(graph, out)


class EagerCapture:
    """A stand-in for ``CudaCapture`` that records the call and re-runs it on replay (CPU tests).

    It follows the same contract (a replay reads only the static inputs and
    writes the same output tensors), so a test on CPU catches an input that
    was not copied before a replay.
    """

    def __init__(self):
        self.captured = 0

    def warm_up(self, fn, args, kwargs):
        return fn(*args, **kwargs)

    def capture(self, fn, args, kwargs):
        self.captured += 1
        return _Rerun(fn, args, kwargs)


class _Rerun:
    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs, self.outputs = fn, args, kwargs, None

    def replay(self):
        out = self.fn(*self.args, **self.kwargs)
        if self.outputs is None:
            self.outputs = out
        else:
            for static, new in zip(self.outputs, out):
                static.copy_(new)
        return self.outputs


# --------------------------------------------------------------------------- inputs

def _flatten(obj, name: str, tensors: list, key: list) -> None:
    """Tensors of a call's inputs (by name) into ``tensors``; everything that must match for a replay into ``key``."""
    if isinstance(obj, torch.Tensor):
        tensors.append((name, obj))
        key.append((name, tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device))
    elif isinstance(obj, (tuple, list)):
        key.append((name, type(obj), len(obj)))
        for i, o in enumerate(obj):
            _flatten(o, f"{name}.{i}", tensors, key)
    elif isinstance(obj, dict):
        key.append((name, dict, tuple(obj)))
        for k, o in obj.items():
            _flatten(o, f"{name}.{k}", tensors, key)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        key.append((name, obj))
    else:  # an object such as the cache: the graph holds its tensors' addresses
        key.append((name, id(obj)))


def _rebuild(obj, name: str, static: dict):
    """``obj`` with each tensor replaced by the static tensor of the same name."""
    if isinstance(obj, torch.Tensor):
        return static[name]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rebuild(o, f"{name}.{i}", static) for i, o in enumerate(obj))
    if isinstance(obj, dict):
        return {k: _rebuild(o, f"{name}.{k}", static) for k, o in obj.items()}
    return obj


def _version(t: torch.Tensor):
    """The tensor's version counter, or None for an inference tensor (it keeps none: always copy it).

    Asked first rather than caught: reading ``_version`` of an inference tensor raises, and the
    exception cost ~27 us a call on a CPU, ~60 calls a decode step at 8 layers (1.7 ms a token
    under ``torch.inference_mode``, as ``profile --moe`` runs).
    """
    return None if t.is_inference() else t._version


@dataclass
class _Entry:
    key: tuple
    graph: object
    static: dict  # name -> the static tensor this graph reads
    holds: tuple  # objects named in the key by identity, kept alive so their ids stay theirs


class DecodeGraphs:
    """Per-layer CUDA graphs of the dense part of decode steps, installed on a model's decoder layers.

    ``layers``: the decoder layers (``decoder_layers``). ``capture``: a
    ``CudaCapture`` (or ``EagerCapture`` in tests). Use as a context manager or
    call ``install()`` / ``restore()``. ``static_cache(...)`` gives the KV
    cache that ``generate`` should use so that graphs stay valid across calls.
    Counters ``captures``, ``replays`` and ``eager_calls`` say what ran.

    The experts of a layer that never leave the device (``experts`` below: every
    expert resident, no routing sync) are captured too, as a second graph per
    layer (``experts_captures``, ``experts_replays``). ``owner`` (optional: the
    engine) says when a decode step may be one graph of all layers
    (``whole_step_ready()``) and sets up each such step (``begin_step(ids or hidden states)``,
    ``end_step()``); ``step_captures`` and ``step_replays`` count those steps,
    ``step_reason`` says why steps are never whole. ``base`` (optional: the
    decoder model whose ``layers`` these are) lets such a step's whole forward
    be the graph (``model_captures``, ``model_replays``, ``model_reason``).
    """

    def __init__(self, layers, capture, owner=None, base=None):
        self.layers = list(layers)
        self.capturer = capture
        n = len(self.layers)
        self._entries: dict[tuple[str, int], _Entry] = {}  # (part, layer) -> its graph
        self._in_a_row: dict[tuple[str, int], int] = {}
        self._static: dict[str, torch.Tensor] = {}
        self._last: dict[str, tuple] = {}  # name -> (source tensor, its version) last copied into the static one
        self._stepping = [False] * n  # layer i's dense part was graphed in this call: its experts may be too
        self._in_step = False  # a whole step's layers are running inside its graph's warm-up or capture
        self.reasons: dict[int, str] = {}  # layer -> why it runs eagerly for good
        self.experts_reasons: dict[int, str] = {}  # layer -> why its experts run eagerly for good
        self.captures = self.replays = self.eager_calls = 0
        self.experts_captures = self.experts_replays = 0
        self.owner, self.base = owner, base
        self.step_captures = self.step_replays = 0
        self.model_captures = self.model_replays = 0
        self.model_reason: str | None = None  # why the decoder's forward is never one graph
        self._in_model = False  # the decoder's forward is being warmed up or captured: no graph inside it
        self._model_out = None  # an output of the decoder's forward: replays return a copy holding their tensor
        self.step_reason: str | None = None  # why decode steps are never one graph (seen once, for good)
        self._chain: dict | None = None  # the step being watched: layer 0's arguments, the last layer seen and its output
        self._chained = False  # a whole step was seen to call every layer in turn with the same arguments
        self._handing: tuple | None = None  # outputs of the whole-step graph, handed out layer by layer
        self._cache, self._cache_shape = None, None
        self.installed = False

    # -- install ------------------------------------------------------------------------------
    def install(self) -> DecodeGraphs:
        for i, layer in enumerate(self.layers):
            layer.forward = functools.partial(self._forward, i)
        if self.base is not None:
            import inspect

            wrapper = functools.partial(self._model_forward)
            wrapper.__signature__ = inspect.signature(self.base.forward)  # what transformers inspects stays true
            self.base.forward = wrapper
        self.installed = True
        return self

    def restore(self) -> None:
        """Give the layers their own ``forward`` back and free the graphs and the cache."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        if self.base is not None:
            self.base.__dict__.pop("forward", None)
        self._entries.clear()
        self._static.clear()
        self._last.clear()
        self._cache = self._cache_shape = None
        self._chain = self._handing = self._model_out = None
        self.installed = False

    def drop_captures(self) -> None:
        """Free every captured graph (the static inputs and the cache stay): the next eligible calls capture
        again, with what their parts queue then (a captured pass whose copies changed size, say)."""
        self._entries.clear()
        self._in_a_row.clear()
        self._handing = None

    def __enter__(self) -> DecodeGraphs:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def to_dict(self) -> dict:
        return {"layers": len(self.layers), "captures": self.captures, "replays": self.replays,
                "eager_calls": self.eager_calls, "eager_layers": {str(k): v for k, v in self.reasons.items()},
                "experts_captures": self.experts_captures, "experts_replays": self.experts_replays,
                "eager_experts": {str(k): v for k, v in self.experts_reasons.items()},
                "step_captures": self.step_captures, "step_replays": self.step_replays,
                "step_reason": self.step_reason, "model_captures": self.model_captures,
                "model_replays": self.model_replays, "model_reason": self.model_reason}

    # -- the KV cache -------------------------------------------------------------------------
    def static_cache(self, config, batch: int, tokens: int):
        """An empty static KV cache for ``batch`` sequences of up to ``tokens`` positions.

        The same cache object (reset, so its tensors keep their addresses) comes
        back while ``batch`` and the rounded length stay the same, so the graphs
        captured in one ``generate`` call replay in the next; a cache filled
        under ``torch.inference_mode`` is replaced when a call comes outside it.
        """
        from transformers import StaticCache

        length = -(-int(tokens) // CACHE_BLOCK) * CACHE_BLOCK
        if self._cache is None or self._cache_shape != (int(batch), length) or self._inference_only():
            self._cache = StaticCache(config=config.get_text_config(decoder=True), max_cache_len=length)
            for layer in self._cache.layers:
                layer.reorder_cache = functools.partial(reorder_in_place, layer)
                layer.crop = keep_in_place
            self._cache_shape = (int(batch), length)
        else:
            self._cache.reset()
        return self._cache

    def _inference_only(self) -> bool:
        """Whether the kept cache was filled under ``torch.inference_mode`` and this call is outside it: its
        tensors are then inference tensors, which cannot be written (nor reset) here, so a new cache is made
        (and the graphs recapture on its addresses)."""
        if torch.is_inference_mode_enabled():
            return False
        return any(t is not None and t.is_inference()
                   for layer in self._cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)))

    # -- the layer's forward ------------------------------------------------------------------
    def _forward(self, i: int, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layers[i]
        if args:  # not how transformers calls its layers: leave such calls to the layer's own forward
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        if i == 0:
            self._handing = None  # a new forward pass (even after one that was interrupted)
        elif self._handing is not None:
            return self._hand_out(i, hidden_states)
        if self._eligible(i, hidden_states, kwargs):
            if i == 0 and self._whole_step_ready(hidden_states.shape[0] * hidden_states.shape[1]):
                return self._whole_step(hidden_states, kwargs)
            residual, normed = self._dense_graphed(i, hidden_states, kwargs)
            self._stepping[i] = True
            try:
                out = residual + layer.mlp(normed)
            finally:
                self._stepping[i] = False
            self._watch(i, hidden_states, kwargs, out)
            return out
        self._chain = None
        self.eager_calls += 1
        residual, normed = dense_part(layer, hidden_states, **kwargs)
        return residual + layer.mlp(normed)

    def graphed(self, i: int) -> bool:
        """Whether layer i's call now is part of a graph (its dense part graphed in this call, or a whole step's
        warm-up or capture): its experts may queue work that needs no host, nothing else."""
        return self._stepping[i] or self._in_step

    def experts(self, i: int, fn: Callable, *inputs) -> torch.Tensor:
        """``fn(*inputs) -> tensor``, layer i's experts (inputs: tensors, and plain values that key the graph).

        Replayed from a graph when layer i's dense part was graphed in this
        call (a decode step); called as it is otherwise (prefill, eager
        layers). ``fn`` must not leave the device: a capture runs no kernels
        and a replay runs no Python.
        """
        if not self._stepping[i] or i in self.experts_reasons:
            return fn(*inputs)
        named = {f"experts.{j}": obj for j, obj in enumerate(inputs)}
        return self._graphed("experts", i, lambda *a: (fn(*a),), named)[0]

    # -- the whole step -----------------------------------------------------------------------
    def _watch(self, i: int, hidden_states: torch.Tensor, kwargs: dict, out: torch.Tensor) -> None:
        """Follow a graphed decode step layer by layer: did layer i get layer i-1's output and layer 0's arguments?"""
        if self.owner is None or self.step_reason is not None or self._chained:
            return
        tensors, key = [], []
        _flatten(kwargs, "kwargs", tensors, key)
        layer = self.layers[i]
        if _hooks_act([layer]):  # such a step is not a whole step's pattern
            self._chain = None
            return
        if i == 0:
            self._chain = {"key": key, "tensors": [t for _, t in tensors], "layer": 0, "out": out}
            return
        c = self._chain
        if c is None or c["layer"] != i - 1:
            self._chain = None
            return
        if hidden_states is not c["out"] or key != c["key"] or any(a is not b for (_, a), b in zip(tensors, c["tensors"])):
            self._chain = None
            self.step_reason = (f"layer {i} is not called with layer {i - 1}'s output and layer 0's arguments, "
                                "so a step cannot be replayed as one graph")
            return
        c["layer"], c["out"] = i, out
        if i == len(self.layers) - 1:
            self._chained, self._chain = True, None

    def _whole_step_ready(self, rows: int) -> bool:
        """Whether a step of ``rows`` tokens (batch x 1) may be one graph: seen chained, the owner ready for it."""
        return (self._chained and self.step_reason is None and not self.reasons and not self.experts_reasons
                and not _hooks_act(self.layers) and bool(self.owner.whole_step_ready(rows)))

    def _whole_step(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Every layer of this decode step from one graph (captured at the first such step) -> layer 0's output."""
        layers = self.layers

        def step(h, kw):  # the layers' own parts, no graph inside (``experts`` calls straight through)
            outs = []
            self._in_step = True
            try:
                for layer in layers:
                    residual, normed = dense_part(layer, h, **kw)
                    h = residual + layer.mlp(normed)
                    outs.append(h)
            finally:
                self._in_step = False
            return tuple(outs)

        if self._in_model:  # inside the decoder's forward being captured: its graph holds the layers
            outs = step(hidden_states, kwargs)
        else:
            outs = self._owned_step("step", hidden_states, step, {"hidden_states": hidden_states, "kwargs": kwargs})
        if len(layers) > 1:
            self._handing = outs
        return outs[0]

    def _owned_step(self, part: str, rows: torch.Tensor, fn: Callable, inputs: dict):
        """Part ``part`` (a whole step) replayed or captured, between the owner's set-up for a pass of
        ``rows`` [B, S] and its end."""
        self.owner.begin_step(rows)
        try:
            return self._graphed(part, 0, fn, inputs)
        finally:
            self.owner.end_step()

    # -- the decoder's whole forward ----------------------------------------------------------
    def _model_forward(self, *args, **kwargs):
        """The decoder's forward: one graph for a whole decode step where it can be, else its own forward."""
        base = self.base
        if args or not self._model_eligible(kwargs):
            return type(base).forward(base, *args, **kwargs)
        made = []

        def forward(kw):
            self._in_model = True
            try:
                out = type(base).forward(base, **kw)
            finally:
                self._in_model = False
            made.append(out)
            return (out[0],)  # the last hidden state: the graph's output

        hidden = self._owned_step("model", kwargs["input_ids"], forward, {"model": kwargs})[0]
        if made:  # captured now (the first call is the warm-up: this step's work) or run eagerly for good
            self._model_out = made[0]
            return made[0]
        out = copy.copy(self._model_out)  # replayed: the same kind of output, holding what the replay wrote
        out[next(iter(out.keys()))] = hidden
        return out

    def _model_eligible(self, kwargs: dict) -> bool:
        """A decode step whose inputs keep their shapes: token ids [B, 1] and a 4-D mask (or none), nothing asked of
        the layers' outputs, every layer ready to be part of one graph."""
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        config = getattr(self.base, "config", None)
        asked = any(kwargs.get(k, getattr(config, k, False)) for k in OUTPUTS)  # a call's word, else the config's
        if (self.model_reason is not None or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1
                or kwargs.get("inputs_embeds") is not None
                or not (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4))
                or asked or any(k.startswith("output_") and v for k, v in kwargs.items())):
            return False
        return not torch.is_grad_enabled() and _static_cache(kwargs) and self._whole_step_ready(ids.numel())

    def _hand_out(self, i: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Layer i's output of the whole-step graph (layer i-1's was handed out just before)."""
        outs = self._handing
        if hidden_states is not outs[i - 1]:
            self._handing = None
            raise ToolkitError(f"decoder layer {i} was called with other hidden states than layer {i - 1}'s output, "
                               "but this step ran every layer as one graph; run the model with graphs=False")
        if i == len(outs) - 1:
            self._handing = None
        return outs[i]

    def _eligible(self, i: int, hidden_states: torch.Tensor, kwargs: dict) -> bool:
        if i in self.reasons or torch.is_grad_enabled() or hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            return False
        return _static_cache(kwargs)

    def _dense_graphed(self, i: int, hidden_states: torch.Tensor, kwargs: dict):
        layer = self.layers[i]
        return self._graphed("dense", i, lambda h, kw: dense_part(layer, h, **kw),
                             {"hidden_states": hidden_states, "kwargs": kwargs})

    def _graphed(self, part: str, i: int, fn: Callable, inputs: dict):
        """``fn(*inputs.values())`` replayed from part ``part`` of layer i's graphs (captured first if need be)."""
        tensors, key = [], []
        for name, obj in inputs.items():
            _flatten(obj, name, tensors, key)
        key = tuple(key)
        static = self._static_inputs(tensors)
        entry = self._entries.get((part, i))
        if entry is not None and entry.key == key and all(static[n] is t for n, t in entry.static.items()):
            self._copy_inputs(tensors)
            self._in_a_row[(part, i)] = 0
            self._count(part, "replays")
            return entry.graph.replay()
        return self._capture(part, i, fn, key, static, tensors, inputs)

    def _capture(self, part: str, i: int, fn: Callable, key: tuple, static: dict, tensors: list, inputs: dict):
        slot = (part, i)
        self._in_a_row[slot] = self._in_a_row.get(slot, 0) + 1
        if self._in_a_row[slot] > MAX_RECAPTURES:
            reason = f"inputs changed on each of {MAX_RECAPTURES} calls in a row: nothing to replay"
            if part in ("step", "model"):
                setattr(self, f"{part}_reason", reason)
            else:
                (self.reasons if part == "dense" else self.experts_reasons)[i] = reason
            self._entries.pop(slot, None)
            if part == "dense":
                self.eager_calls += 1
            return fn(*inputs.values())
        self._copy_inputs(tensors)
        args = tuple(_rebuild(obj, name, static) for name, obj in inputs.items())
        self._entries.pop(slot, None)  # free the old graph before capturing the new one
        out = self.capturer.warm_up(fn, args, {})  # this step's real work
        graph = self.capturer.capture(fn, args, {})
        holds = tuple(v for obj in inputs.values() if isinstance(obj, dict) for v in obj.values()
                      if not isinstance(v, (torch.Tensor, tuple, list, dict, bool, int, float, str, type(None))))
        self._entries[slot] = _Entry(key, graph, {n: static[n] for n, _ in tensors}, holds)
        self._count(part, "captures")
        return out

    def _count(self, part: str, what: str) -> None:
        name = what if part == "dense" else f"{part}_{what}"
        setattr(self, name, getattr(self, name) + 1)

    def _static_inputs(self, tensors: list) -> dict:
        """The static tensor for each input name, (re)allocated where the shape, stride or dtype changed."""
        for name, t in tensors:
            s = self._static.get(name)
            if s is None or s.shape != t.shape or s.stride() != t.stride() or s.dtype != t.dtype or s.device != t.device:
                with torch.inference_mode(False):
                    self._static[name] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                self._last.pop(name, None)
        return self._static

    def _copy_inputs(self, tensors: list) -> None:
        """Copy each input into its static tensor, once per new tensor (layers of a step share cos/sin, mask...)."""
        for name, t in tensors:
            last, v = self._last.get(name, (None, None)), _version(t)
            if last[0] is t and v is not None and last[1] == v:
                continue
            self._static[name].copy_(t)
            self._last[name] = (t, v)


def _static_cache(kwargs: dict) -> bool:
    """Whether a call's KV cache (under either keyword) is static with no sliding layer: fixed addresses a graph
    can write through."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    layers = getattr(cache, "layers", None)
    return (bool(getattr(cache, "is_compileable", False)) and layers is not None
            and not any(getattr(c, "is_sliding", False) for c in layers))


def _hooks_act(layers) -> bool:
    """Whether a hook on the layers would act on this call: it would keep or see layer outputs that a whole
    step hands out from the graph's own tensors (overwritten by the next replay), so such calls go layer by layer.

    transformers installs its output-capturing hooks (``output_hidden_states``) for good at their first use;
    they act only while a call asks for outputs (an active collector), so they alone do not count otherwise.
    """
    hooks = [h for layer in layers for h in (*layer._forward_hooks.values(), *layer._forward_pre_hooks.values())]
    if not hooks:
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a release without it: any hook counts
        return True
    return bool(_active_collector.get()) or any(  # the collector: a dict of the outputs asked for, maybe empty
        getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks)


def rewind(cache, length: int) -> bool:
    """Set a static cache back to ``length`` positions in place (the next write goes to position ``length``).

    The stale entries past it are masked and then overwritten, and the tensors
    keep their addresses, so graphs stay valid. False (nothing changed) when a
    layer keeps its length any other way than a tensor ``cumulative_length``.
    """
    layers = getattr(cache, "layers", None) or []
    if not layers or not all(isinstance(getattr(c, "cumulative_length", None), torch.Tensor) for c in layers):
        return False
    for c in layers:
        c.cumulative_length.fill_(int(length))
    return True


def reorder_in_place(layer, beam_idx: torch.Tensor) -> None:
    """Beam search's reorder of one cache layer, written into its own tensors [B*beams, H, L, d].

    transformers' ``reorder_cache`` replaces the layer's tensors with reordered
    copies (``index_select``); the graphs hold the old tensors' addresses, so
    here the reordered rows are copied back into them instead.
    """
    if getattr(layer, "is_initialized", False):
        idx = beam_idx.to(layer.keys.device)
        layer.keys.copy_(layer.keys.index_select(0, idx))
        layer.values.copy_(layer.values.index_select(0, idx))


def keep_in_place(tokens_to_remove: int) -> None:
    """A cache layer's ``crop`` for the graphs' static cache: nothing moves.

    transformers' deferred stop check (``toolkit.moe.generation``) calls
    ``crop(0)`` after every step, and ``crop(-n)`` after steps it undoes;
    those steps' keys and values lie past the end of the returned sequence,
    where nothing reads them, and the cache is reset before its next call.
    """
    if int(tokens_to_remove) > 0:  # the legacy meaning, a length to keep: never asked by the deferred check
        raise ToolkitError(f"the decode graphs' static cache cannot be cut to {tokens_to_remove} positions")


def graphs_line(d: dict) -> str:
    """One line on what the decode graphs did in a run (``DecodeGraphs.to_dict()``), eager layers named."""
    line = (f"{d['captures']} captured for {d['layers']} layers, {d['replays']} replays, "
            f"{d['eager_calls']} eager layer calls (prefill)")
    if d.get("experts_captures"):
        line += (f"; sync-free experts: {d['experts_captures']} captured, {d.get('experts_replays', 0)} replays")
    if d.get("step_captures"):
        line += f"; whole steps (every layer one graph): {d['step_captures']} captured, {d.get('step_replays', 0)} replays"
    if d.get("model_captures"):
        line += (f"; whole decoder forwards (embedding to final norm one graph): {d['model_captures']} captured, "
                 f"{d.get('model_replays', 0)} replays")
    if d.get("step_reason"):
        line += f"; never whole steps: {d['step_reason']}"
    eager = d.get("eager_layers") or {}
    if eager:
        line += "; eager for good: " + "; ".join(f"layer {k}: {v}" for k, v in eager.items())
    eager = d.get("eager_experts") or {}
    if eager:
        line += "; experts eager for good: " + "; ".join(f"layer {k}: {v}" for k, v in eager.items())
    return line
