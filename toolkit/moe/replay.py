"""Traces and the engine: replay a trace as the router (``TraceRouter``), record one from a run (``record``).

Shapes: T tokens in a forward pass, K experts per token, D hidden size; traces as in
``toolkit.moe.traces`` (N rows, L layers).

Replay makes an engine run route exactly as a trace says, so a measured hit rate can be compared
with the simulator's on the same routing; recording captures a real model's routing for the
simulator. Both plug into ``Offloaded`` through its ``routing`` and ``recorder`` slots.
"""

from __future__ import annotations

import numpy as np

from ..errors import ToolkitError
from .phases import phase_code
from .trace_catalog import load_trace
from .traces import Trace


class TraceRouter:
    """Routing that follows a trace: ``route(layer, hidden[T, D], phase) -> (index[T, K], weights[T, K])``.

    Token by token across forward passes: a pass takes the next T / batch_size rows for each
    sequence (a prefill pass the prompt's rows, a decode pass one row); a new pass starts when a
    layer index is not larger than the previous call's. With batch_size > 1 every sequence reads
    the trace from its own offset (default: evenly spaced). Reading wraps around at the end.
    Rows are (batch, seq)-flattened, as HF MoE blocks flatten hidden states.

    A caller that knows where passes start may say so (``begin_pass`` ... ``end_pass``): the
    pass's rows are then picked on the device from a position set before the pass, so
    every layer's routing is a device gather that a CUDA graph of the whole step can replay
    (``toolkit.moe.graphs``); the rows are the same either way.
    """

    def __init__(self, trace: Trace, batch_size: int = 1, offsets=None):
        self.trace = load_trace(trace)
        if batch_size < 1:
            raise ToolkitError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        n = self.trace.n_tokens
        self.offsets = (np.arange(batch_size) * (n // batch_size) if offsets is None
                        else np.asarray(offsets, dtype=np.int64) % n)
        if len(self.offsets) != batch_size:
            raise ToolkitError(f"need {batch_size} offsets, got {len(self.offsets)}")
        self._cache: dict = {}
        self._rows: dict = {}  # (device, tokens) -> (row offsets [T] of each sequence's tokens, this pass's rows [T])
        self.reset()

    def check(self, n_layers: int, n_experts: int, top_k: int) -> None:
        """Raise unless the trace can drive a model of these dimensions (it may have more layers)."""
        t = self.trace
        if n_layers > t.n_layers or n_experts < t.n_experts or top_k != t.top_k:
            raise ToolkitError(f"the trace ({t.n_layers} layers, {t.n_experts} experts, top-{t.top_k}) cannot drive "
                               f"a model with {n_layers} MoE layers, {n_experts} experts, top-{top_k}")

    def reset(self) -> None:
        """Start again from the trace's first row."""
        self.position = 0  # rows consumed per sequence before the current pass
        self._n = 0  # rows per sequence in the current pass
        self._last_layer: int | float | None = None  # inf: a pass ended by ``end_pass``
        self._begun: tuple | None = None  # (device, tokens) of a pass begun by ``begin_pass``, until ``end_pass``
        self.passes = 0

    def _per_seq(self, n_tok: int) -> int:
        if n_tok % self.batch_size:
            raise ToolkitError(f"{n_tok} tokens in a pass cannot be split into batch_size={self.batch_size} sequences")
        return n_tok // self.batch_size

    def _new_pass(self, per_seq: int) -> None:
        if self._last_layer is not None:
            self.position += self._n
        self._n = per_seq
        self.passes += 1

    def begin_pass(self, n_tok: int, device) -> None:
        """A forward pass of ``n_tok`` rows starts: its rows are set on ``device`` now (no host-to-device copy),
        and each layer's ``route`` until ``end_pass`` gathers them there, so the routing of the whole pass can
        be captured in a CUDA graph and replayed after the next ``begin_pass``."""
        import torch

        per_seq = self._per_seq(int(n_tok))
        self._new_pass(per_seq)
        self._last_layer = -1
        key = (str(device), int(n_tok))
        if key not in self._rows:
            base = (self.offsets[:, None] + np.arange(per_seq)[None, :]).reshape(-1)  # [T] before the position
            with torch.inference_mode(False):  # kept across calls in and out of inference mode
                self._rows[key] = (torch.as_tensor(base, dtype=torch.int64, device=device),
                                   torch.zeros(len(base), dtype=torch.int64, device=device))
        base, rows = self._rows[key]
        torch.remainder(base + self.position, self.trace.n_tokens, out=rows)  # written in place: graphs read it
        self._begun = key

    def end_pass(self) -> None:
        """The pass begun by ``begin_pass`` is over (its layers may have been replayed without calling ``route``)."""
        if self._begun is not None:
            self._begun = None
            self._last_layer = float("inf")

    def _tensors(self, device, dtype):
        import torch

        key = (str(device), dtype)
        if key not in self._cache:  # once per device: no host-to-device copy per layer
            self._cache[key] = (torch.as_tensor(self.trace.experts.astype(np.int64), device=device),
                                torch.as_tensor(self.trace.weights.astype(np.float32), device=device).to(dtype))
        return self._cache[key]

    def route(self, layer: int, hidden, phase: str):
        import torch

        if layer >= self.trace.n_layers:
            raise ToolkitError(f"the trace has {self.trace.n_layers} MoE layers; the model asked for layer {layer}")
        n_tok = hidden.shape[0]
        per_seq = self._per_seq(n_tok)
        if self._begun is not None:
            if self._begun != (str(hidden.device), n_tok):
                raise ToolkitError(f"layer {layer} got {n_tok} tokens on {hidden.device}; the pass was begun for "
                                   f"{self._begun[1]} on {self._begun[0]}")
            self._last_layer = layer
            experts, weights = self._tensors(hidden.device, hidden.dtype)
            rows = self._rows[self._begun][1]
            return experts.select(1, layer).index_select(0, rows), weights.select(1, layer).index_select(0, rows)
        if self._last_layer is None or layer <= self._last_layer:  # a new forward pass
            self._new_pass(per_seq)
        elif per_seq != self._n:
            raise ToolkitError(f"layer {layer} got {per_seq} tokens per sequence, earlier layers of this pass {self._n}")
        self._last_layer = layer
        experts, weights = self._tensors(hidden.device, hidden.dtype)
        n = self.trace.n_tokens
        parts_i, parts_w = [], []
        for off in self.offsets:
            start = int(off + self.position) % n
            take = per_seq
            while take:  # contiguous slices, split where the trace wraps
                m = min(take, n - start)
                parts_i.append(experts[start:start + m, layer])
                parts_w.append(weights[start:start + m, layer])
                take -= m
                start = 0
        if len(parts_i) == 1:
            return parts_i[0], parts_w[0]
        return torch.cat(parts_i), torch.cat(parts_w)


class TraceRecorder:
    """Collects ``observe(layer, phase, index[T, K], weights[T, K])`` calls into a ``Trace``.

    The engine calls ``observe`` once per MoE layer per forward pass; a pass ends when a layer
    index is not larger than the previous one. Tensors stay on their device until ``to_trace``,
    so recording adds no synchronisation to a timed run.
    """

    def __init__(self, n_experts: int | None = None, batch_size: int = 1, meta: dict | None = None):
        self.n_experts = n_experts
        self.batch_size = int(batch_size)
        self.meta = dict(meta or {})
        self.passes: list[dict] = []  # {"phase": str, "layers": {layer: (index, weights)}}
        self._last_layer: int | None = None
        self._owner = None

    def observe(self, layer: int, phase: str, top_k_index, top_k_weights) -> None:
        if self._last_layer is None or layer <= self._last_layer:
            self.passes.append({"phase": phase, "layers": {}})
        self._last_layer = layer
        self.passes[-1]["layers"][layer] = (top_k_index.detach(), top_k_weights.detach())

    def to_trace(self) -> Trace:
        """Stack the recorded passes into a Trace (top-k sorted by weight, largest first)."""
        if not self.passes:
            raise ToolkitError("nothing recorded: run the offloaded model while the recorder is attached")
        n_layers = 1 + max(max(p["layers"]) for p in self.passes)
        rows_e, rows_w, step, phase = [], [], [], []
        for g, p in enumerate(self.passes):
            if sorted(p["layers"]) != list(range(n_layers)):
                raise ToolkitError(f"recorded pass {g} saw layers {sorted(p['layers'])}, expected 0..{n_layers - 1}")
            idx = np.stack([p["layers"][layer][0].cpu().numpy() for layer in range(n_layers)], axis=1)  # [T, L, K]
            w = np.stack([p["layers"][layer][1].float().cpu().numpy() for layer in range(n_layers)], axis=1)
            order = np.argsort(-w, axis=-1, kind="stable")
            rows_e.append(np.take_along_axis(idx, order, -1))
            rows_w.append(np.take_along_axis(w, order, -1))
            step.append(np.full(len(idx), g))
            phase.append(np.full(len(idx), phase_code(p["phase"])))
        experts = np.concatenate(rows_e)
        seq = np.concatenate([np.repeat(np.arange(self.batch_size), len(e) // self.batch_size) for e in rows_e]) \
            if all(len(e) % self.batch_size == 0 for e in rows_e) else None
        meta = {"source": "recorded from an engine run", **self.meta}
        if self.n_experts is not None:
            meta["n_experts"] = int(self.n_experts)
        return Trace(experts, np.concatenate(rows_w), np.concatenate(step), np.concatenate(phase), meta, seq)

    def detach(self) -> None:
        """Stop recording (the engine's ``recorder`` slot is cleared)."""
        if self._owner is not None and getattr(self._owner, "recorder", None) is self:
            self._owner.recorder = None
        self._owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def record(offloaded, batch_size: int = 1) -> TraceRecorder:
    """Attach a recorder to an ``Offloaded`` model (``with record(off) as rec: ...; rec.to_trace()``)."""
    placement = getattr(offloaded, "placement", None)
    n_experts = int(np.shape(placement)[1]) if placement is not None and np.ndim(placement) == 2 else None
    meta = {}
    for key in ("hidden_size", "intermediate_size", "bytes_per_expert"):
        value = getattr(offloaded, key, None)
        if value is not None:
            meta[key] = value
    rec = TraceRecorder(n_experts=n_experts, batch_size=batch_size, meta=meta)
    rec._owner = offloaded
    offloaded.recorder = rec
    return rec
