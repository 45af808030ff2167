"""The offloaded experts module and ``offload()``: experts split between the GPU and the CPU.

Shapes: T tokens (batch x sequence, flattened), E experts per layer, L MoE
layers, D hidden, I expert intermediate size, K experts per token (top-k),
R rows (token, expert) sent to the CPU, M missed experts in a layer, n rows
of one expert.

``offload(model, gpu_experts)`` replaces each MoE block's fused experts module
with an ``OffloadedExperts``. The router is untouched (transformers' float32
softmax routing) unless a ``routing`` object replays a trace. Per forward pass
and layer:

1. one device-to-host transfer (the layer's only sync) of the routing, and for
   small passes (decode, beams) of the activations too, so CPU experts start
   right after it; grouping by expert happens on the host (a few numbers);
2. ``policy.step`` says which used experts are GPU-resident (hits) and which
   residency changes follow the pass;
3. the missed experts are served by CPU compute or weight copies; the default
   ``decision="makespan"`` asks the cost model for the split that minimises the
   layer's makespan (max of GPU, CPU, copy engine, host memory), not the sum,
   and may split one expert between both paths (``CostModel.plan``): the GPU
   copies its down projection and first k gate/up rows, the CPU computes the
   other gate/up rows and sends back those activations (a few KB);
4. CPU experts run in a worker thread (torch releases the GIL) concurrently
   with the GPU's work, or inline once the GPU's work is queued
   (``Offloaded.set_schedule``; which is faster depends on the host, so a run
   measures it: ``toolkit.moe.schedule``); their activations go through reused
   pinned buffers;
   copied experts stream from pinned host memory into a small ring of reused
   GPU staging buffers on a side stream, pipelined with their compute;
5. experts with no tokens cost nothing.

A layer whose experts are all resident for good (a static placement, one
device) skips all of that (``OffloadedExperts._on_device``): each row's
expert is chosen on the device (the expert GEMV of ``toolkit.moe.gemv`` for
decode rows, ``grouped_mm`` otherwise), its counts stay on the device until
the statistics are read, and nothing syncs, so its experts replay from a
CUDA graph (``DecodeGraphs.experts``). In a prefill (``lookahead``, on by
default) a layer starts copying the next layer's missed experts into the
staging slots it has freed (``Offloaded.look_ahead``): on an H200 a 512-token
prefill at 14 of 64 experts took 274 ms with it and 332 ms without (medians of
3 alternating rounds at one schedule).

The peer schemes are switches of the same engine (``toolkit.moe.baselines``):
``decision`` "cpu" / "copy" / "fiddler" (Fiddler's rule: copy when tokens x 7 >=
70), ``serial=True`` (Fiddler's schedule: GPU experts first, then each CPU
expert on its own with a device-to-host transfer and sync, no overlap) and
``pageable_copies=True`` (copies from ordinary host memory, blocking, as
``module.to(device)`` and accelerate do).

With ``device="cpu"`` both tiers are CPU tensors and the same routing,
decision and counting code runs, so CI can test it without a GPU.

Several GPUs of one host (``offload(..., devices=[...])``): the resident
experts spread over the devices (``assign_devices``: each layer's popular
experts round-robin), the dense part and the copy slots stay on the first;
a resident expert's rows travel to its device and back, and the makespan
decision starts from the first device's wait for them
(``CostModel.resident_ms``, with the peer hops that ``calibrate(...,
devices=...)`` measures). ``devices=["cpu", "cpu"]`` runs the same
bookkeeping and row routing on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..errors import ToolkitError
from . import gemv, graph_pass, host_memory
from .costs import CostModel, choose_threads, dtype_name, expert_forward, torch_threads
from .graphs import CudaCapture, DecodeGraphs, EagerCapture, decoder_layers
from .norm import fuse_norms
from .phases import PHASES
from .presets import is_experts_module, moe_blocks

DECISIONS = ("makespan", "cpu", "copy", "fiddler")
# Fiddler's hard-coded costs (efeslab/fiddler, mixtral.py): 7 per token on the CPU, 70 per copied expert
FIDDLER_CPU_COST, FIDDLER_COPY_COST = 7, 70


def _label(name: str):
    """A profiler label, free when no profiler is running (a few record_functions per layer add up per token)."""
    # the per-thread flag is False in the CPU-expert worker, and on the main thread
    # when the profiler records all threads; the module-level flag is global
    on = getattr(torch.autograd.profiler, "_is_profiler_enabled", False) or torch._C._autograd._profiler_enabled()
    return record_function(name) if on else contextlib.nullcontext()


def persistent():
    """Allocate engine state that outlives one forward pass as normal tensors, even under ``inference_mode``.

    A tensor made inside ``torch.inference_mode()`` is an inference tensor: it
    can never again be written in place outside it, nor take part in autograd.
    The engine reuses buffers and weights across passes, and a user may time
    one pass under ``inference_mode`` and then generate under ``no_grad``.
    """
    return torch.inference_mode(False)


_PRECISION = {torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}


# -- statistics ------------------------------------------------------------------------------------

@dataclass
class ExpertStats:
    """Activations and hits per phase as int arrays [L, E], plus copy / CPU counters.

    An activation is one (token, layer, expert) routing; a hit is an
    activation whose expert was GPU-resident at the start of that forward pass.
    """

    n_layers: int
    n_experts: int
    activations: dict = field(default_factory=dict)  # phase -> int64 [L, E]
    hits: dict = field(default_factory=dict)  # phase -> int64 [L, E]
    bytes_copied: int = 0
    cpu_expert_calls: int = 0
    copy_expert_calls: int = 0
    gpu_expert_calls: int = 0
    cpu_tokens: int = 0  # (token, expert) rows computed on the CPU (split experts included)
    split_expert_calls: int = 0  # experts computed half on the CPU, half on the GPU
    prefetch_calls: int = 0  # experts a policy loaded before any token needed them (their bytes are in bytes_copied)
    lookahead_copies: int = 0  # experts copied before their layer's routing was known (bytes in bytes_copied)
    forwards: dict = field(default_factory=dict)  # phase -> MoE layer forwards
    # per (layer, expert): forward passes in which it had >= 1 token, and those in which it was resident.
    # A used expert's weights are read once per pass however many tokens it has: the roofline counts these.
    passes_used: dict = field(default_factory=dict)  # phase -> int64 [L, E]
    passes_hit: dict = field(default_factory=dict)  # phase -> int64 [L, E]

    def __post_init__(self):
        for p in PHASES:
            for table in (self.activations, self.hits, self.passes_used, self.passes_hit):
                table.setdefault(p, np.zeros((self.n_layers, self.n_experts), dtype=np.int64))
            self.forwards.setdefault(p, 0)

    def record(self, phase: str, layer: int, counts: np.ndarray, resident_used: np.ndarray) -> None:
        self.activations[phase][layer] += counts
        self.passes_used[phase][layer] += counts > 0
        if len(resident_used):
            self.hits[phase][layer, resident_used] += counts[resident_used]
            self.passes_hit[phase][layer, resident_used] += 1
        self.forwards[phase] += 1

    def _sum(self, table: dict, phase: str | None) -> np.ndarray:
        if phase is None:
            return sum(table[p] for p in PHASES)
        if phase not in PHASES:
            raise ToolkitError(f"unknown phase {phase!r}; use one of {PHASES}")
        return table[phase]

    def hit_rate(self, phase: str | None = None) -> float:
        """Hits / activations (NaN when nothing was routed)."""
        act = int(self._sum(self.activations, phase).sum())
        return float(self._sum(self.hits, phase).sum()) / act if act else float("nan")

    def per_layer(self, phase: str | None = None) -> np.ndarray:
        """Hit rate per layer [L] (NaN for a layer without activations)."""
        act = self._sum(self.activations, phase).sum(axis=1).astype(np.float64)
        hits = self._sum(self.hits, phase).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(act > 0, hits / act, np.nan)

    def per_expert(self, phase: str | None = None) -> np.ndarray:
        """Hit rate per expert [L, E] (NaN where never routed)."""
        act = self._sum(self.activations, phase).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(act > 0, self._sum(self.hits, phase) / act, np.nan)

    def reset(self) -> None:
        for p in PHASES:
            for table in (self.activations, self.hits, self.passes_used, self.passes_hit):
                table[p][:] = 0
            self.forwards[p] = 0
        self.bytes_copied = self.cpu_expert_calls = self.copy_expert_calls = self.gpu_expert_calls = 0
        self.cpu_tokens = self.split_expert_calls = self.prefetch_calls = self.lookahead_copies = 0

    def to_dict(self) -> dict:
        return {
            "hit_rate": {"prefill": self.hit_rate("prefill"), "decode": self.hit_rate("decode"), "all": self.hit_rate()},
            "per_layer": {p: self.per_layer(p).tolist() for p in PHASES},
            "activations": {p: self.activations[p].tolist() for p in PHASES},
            "hits": {p: self.hits[p].tolist() for p in PHASES},
            "bytes_copied": self.bytes_copied,
            "cpu_expert_calls": self.cpu_expert_calls,
            "copy_expert_calls": self.copy_expert_calls,
            "gpu_expert_calls": self.gpu_expert_calls,
            "cpu_tokens": self.cpu_tokens,
            "split_expert_calls": self.split_expert_calls,
            "prefetch_calls": self.prefetch_calls,
            "lookahead_copies": self.lookahead_copies,
            "forwards": dict(self.forwards),
            "passes_used": {p: self.passes_used[p].tolist() for p in PHASES},
            "passes_hit": {p: self.passes_hit[p].tolist() for p in PHASES},
        }


# -- placement -------------------------------------------------------------------------------------

def spread_evenly(budget: int, n_layers: int, n_experts: int) -> np.ndarray:
    """Residency [L, E] with ``budget`` experts spread over layers as evenly as possible.

    Layer l gets budget // L experts (+1 for the first budget % L layers);
    the chosen expert ids rotate from layer to layer so no id is favoured.
    """
    res = np.zeros((n_layers, n_experts), dtype=bool)
    per, extra = divmod(int(budget), n_layers)
    start = 0
    for layer in range(n_layers):
        n = per + (layer < extra)
        res[layer, (start + np.arange(n)) % n_experts] = True
        start += n
    return res


def from_popularity(popularity: np.ndarray, budget: int) -> np.ndarray:
    """Residency [L, E]: the ``budget`` most-activated (layer, expert) pairs of a profile."""
    pop = np.asarray(popularity, dtype=np.float64)
    res = np.zeros(pop.shape, dtype=bool)
    if budget:
        top = np.argsort(-pop, axis=None, kind="stable")[:budget]
        res.flat[top] = True
    return res


def assign_devices(resident: np.ndarray, shares, ranking=None) -> np.ndarray:
    """Which device holds each resident expert: int [L, E], an index into the devices (-1: not resident).

    Why round-robin by popularity rank: a layer's busiest experts on different
    devices share out its rows, so no device computes most of a layer while
    the others wait. Per layer the resident experts go in order of ``ranking``
    [L, E] (descending; default expert id order) to the devices in turn; the
    turn carries over from layer to layer so the counts come out even; a
    device that holds its share (``shares``, experts per device) is skipped.
    """
    resident = np.asarray(resident, dtype=bool)
    shares = [int(n) for n in shares]
    if int(resident.sum()) > sum(shares):
        raise ToolkitError(f"{int(resident.sum())} resident experts but the device shares {shares} hold {sum(shares)}")
    rank = np.zeros(resident.shape) if ranking is None else np.asarray(ranking, dtype=np.float64)
    tiers = np.full(resident.shape, -1, dtype=np.int64)  # [L, E]
    held = [0] * len(shares)
    turn = 0
    for layer in range(resident.shape[0]):
        experts = np.flatnonzero(resident[layer])
        for e in experts[np.argsort(-rank[layer, experts], kind="stable")]:
            while held[turn] >= shares[turn]:
                turn = (turn + 1) % len(shares)
            tiers[layer, e] = turn
            held[turn] += 1
            turn = (turn + 1) % len(shares)
    return tiers


class StaticPlacement:
    """Fixed residency (the default policy); same interface as ``toolkit.moe.policies.Policy``."""

    name = "static"
    static = True  # residency never changes

    def __init__(self, resident: np.ndarray):
        self._resident = np.asarray(resident, dtype=bool).copy()

    def reset(self, budget, n_layers, n_experts, popularity=None) -> np.ndarray:
        return self._resident.copy()

    def step(self, layer: int, used: np.ndarray):
        return self._resident[layer, used], [], []

    def resident(self, layer: int) -> np.ndarray:
        return self._resident[layer]


def _check_spare(spare_cores, cpu_threads: int) -> int:
    """``spare_cores`` as an int the worker can leave (it keeps at least one thread); else one ToolkitError."""
    try:
        n = int(spare_cores)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or n != spare_cores or (n and n >= cpu_threads):
        raise ToolkitError(f"spare_cores must be a whole number from 0 to {cpu_threads - 1} (the CPU experts keep "
                           f"at least one of their {cpu_threads} threads), got {spare_cores!r}")
    return n


def _budget(gpu_experts, n_layers: int, n_experts: int) -> int | None:
    """``gpu_experts`` as a whole count ("all": every expert; None stays None), or a ToolkitError naming it.

    2.9 must not become 2 resident experts reported as 2.9.
    """
    total = n_layers * n_experts
    if gpu_experts is None:
        return None
    if isinstance(gpu_experts, str):
        if gpu_experts.lower() == "all":
            return total
        raise ToolkitError(f"gpu_experts must be a whole number or 'all', got {gpu_experts!r}")
    if isinstance(gpu_experts, bool) or not isinstance(gpu_experts, int | float | np.integer | np.floating) \
            or not math.isfinite(gpu_experts) or not float(gpu_experts).is_integer():
        raise ToolkitError(f"gpu_experts must be a whole number or 'all', got {gpu_experts!r}")
    return int(gpu_experts)


def _initial_residency(placement, policy, gpu_experts, n_layers, n_experts):
    """-> (policy, resident [L, E]) from the user's placement / policy / budget."""
    total = n_layers * n_experts
    popularity = None
    if isinstance(placement, (str, os.PathLike, Path)):
        from .policies import load_placement

        placement = load_placement(placement)
    if placement is not None:
        placement = np.asarray(placement)
        if placement.shape != (n_layers, n_experts):
            raise ToolkitError(f"placement has shape {placement.shape}, the model has [L, E] = [{n_layers}, {n_experts}]")
        if placement.dtype != bool:  # a popularity profile: counts per (layer, expert)
            from .policies import check_popularity

            popularity = check_popularity(placement, n_layers, n_experts, name="placement")
    if gpu_experts is None:
        if placement is None or popularity is not None:
            raise ToolkitError("gpu_experts is required unless a boolean placement is given")
        gpu_experts = int(placement.sum())
    gpu_experts = int(gpu_experts)
    if not 0 <= gpu_experts <= total:
        raise ToolkitError(f"gpu_experts must be between 0 and {total} (= {n_layers} layers x {n_experts} experts), "
                           f"got {gpu_experts}")
    if isinstance(policy, str):
        from .policies import get_policy

        policy = get_policy(policy)
    if policy is None:
        if placement is None:
            resident = spread_evenly(gpu_experts, n_layers, n_experts)
        elif popularity is not None:
            resident = from_popularity(popularity, gpu_experts)
        else:
            resident = placement.astype(bool)
            if int(resident.sum()) != gpu_experts:
                raise ToolkitError(f"placement holds {int(resident.sum())} experts but gpu_experts={gpu_experts}")
        policy = StaticPlacement(resident)
        return policy, policy.reset(gpu_experts, n_layers, n_experts)
    if popularity is None and placement is not None:
        popularity = placement.astype(np.float64)
    resident = np.asarray(policy.reset(gpu_experts, n_layers, n_experts, popularity), dtype=bool)
    if resident.shape != (n_layers, n_experts) or int(resident.sum()) > gpu_experts:
        raise ToolkitError(f"policy {type(policy).__name__} returned a residency of shape {resident.shape} "
                           f"holding {int(resident.sum())} > {gpu_experts} experts")
    return policy, resident


# -- the engine ------------------------------------------------------------------------------------

def grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs for these weights: any dtype on the CPU, bf16 on a CUDA GPU
    of compute capability 8.0 or newer (its CUTLASS kernels)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)


class _DeviceCounts:
    """The statistics of sync-free passes, counted on the device and read back when someone reads the stats.

    A sync-free pass never brings its routing to the host, so its counts stay
    where they are computed: per phase an int64 tensor [3, L, E] of
    activations, passes used and (in column 0) forward passes. The tensors
    are zeroed in place, never replaced, so a captured graph keeps adding to them.
    """

    def __init__(self, n_layers: int, n_experts: int, device: torch.device):
        with persistent():
            self.t = {p: torch.zeros(3, n_layers, n_experts, dtype=torch.int64, device=device) for p in PHASES}
        self.used = False

    def record(self, phase: str, layer: int, counts: torch.Tensor) -> None:
        """counts: int64 [E] tokens per expert of one pass of ``layer``."""
        t = self.t[phase]
        t[0, layer] += counts
        t[1, layer] += counts > 0
        t[2, layer, 0] += 1
        self.used = True

    def record_rows(self, phase: str, layer: int, index: torch.Tensor) -> None:
        """The same from index [R] (each row's expert), in one kernel (``gemv.count_rows``)."""
        gemv.count_rows(index, self.t[phase], layer)
        self.used = True

    def fold(self, stats: ExpertStats, resident: np.ndarray) -> None:
        """Add the counts to ``stats``; ``resident`` bool [L, E], the static placement these passes ran under
        (an activation of a resident expert is a hit)."""
        if not self.used:
            return
        held = np.asarray(resident, dtype=np.int64)
        for p, t in self.t.items():
            act, passes, fwd = t.cpu().numpy()  # the one sync, when the stats are read
            stats.activations[p] += act
            stats.hits[p] += act * held
            stats.passes_used[p] += passes
            stats.passes_hit[p] += passes * held
            stats.forwards[p] += int(fwd[:, 0].sum())
            stats.gpu_expert_calls += int((passes * held).sum())
            t.zero_()

    def reset(self) -> None:
        for t in self.t.values():
            t.zero_()


class _Slot:
    """One reused GPU staging buffer for a copied expert; ``free``: the event after its last compute."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, link: int = 0):
        self.gate_up, self.down = gate_up, down  # [2I, D], [D, I]
        self.link = link  # the copy device it lives on (an index into ``Offloaded.copy_devices``)
        self.free: torch.cuda.Event | None = None
        self.busy = False  # handed out, its compute not yet enqueued


class _HostBuffers:
    """Reused host staging buffers (pinned with CUDA), grown on demand: no allocation per layer.

    Reuse is safe without events: a layer waits for its CPU job before it
    returns, and the next job writes a buffer only after an event recorded
    behind every earlier copy out of it on the same stream.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self._bufs: dict = {}

    def get(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            with persistent():
                buf = torch.empty(max(n, 2 * (0 if buf is None else buf.numel())), dtype=dtype, pin_memory=self.pin)
            self._bufs[(name, dtype)] = buf
        return buf[:n].view(*shape)


SMALL_PASS = 16  # tokens: up to this many (decode, beams) the activations reach the host with the routing


class _Pass:
    """One forward pass of a layer, grouped by expert: counts and order on the host, device views on demand.

    Positions p in [0, T*K) are the (token, slot) pairs; ``order`` [T*K] lists them
    grouped by expert (stable), so expert e owns order[rows[e]], tokens order[rows[e]] // K.
    One device-to-host transfer (and sync) brings the expert ids and weights, and for
    small passes the activations too: the CPU experts can start at once. A pass of
    one token (batch-1 decode) gathers nothing: each expert has that token's row or
    none, so its rows are the hidden state itself and its weight a view.
    """

    def __init__(self, mod: OffloadedExperts, hidden, top_k_index, top_k_weights):
        T, K = top_k_index.shape
        small = T <= SMALL_PASS
        if hidden.is_cuda:
            bufs = mod.engine.host_buffers
            idx = bufs.get("route", (T, K), top_k_index.dtype).copy_(top_k_index, non_blocking=True)
            w = bufs.get("route_w", (T, K), top_k_weights.dtype).copy_(top_k_weights, non_blocking=True)
            x = bufs.get("route_x", hidden.shape, hidden.dtype).copy_(hidden, non_blocking=True) if small else None
            torch.cuda.current_stream().synchronize()  # the layer's one sync
        else:
            idx, w, x = top_k_index, top_k_weights, (hidden if small else None)
        flat = idx.reshape(-1).numpy()  # [T*K] expert of each (token, slot)
        self.mod, self.hidden, self.top_k_weights, self.T, self.K = mod, hidden, top_k_weights, T, K
        self.order = np.argsort(flat, kind="stable")  # [T*K]
        self.counts = np.bincount(flat, minlength=mod.n_experts)  # [E] tokens per expert
        offs = [0, *np.cumsum(self.counts).tolist()]
        self.rows = [slice(offs[e], offs[e + 1]) for e in range(mod.n_experts)]
        self.x_host = x  # [T, D] host activations (small passes), else None
        self.w_host = w.reshape(-1)  # [T*K] host routing weights
        self._device = None

    def device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [T*K], weight [T*K]) of each grouped position, on the device."""
        if self._device is None:
            order = torch.from_numpy(self.order)
            if self.hidden.is_cuda:  # through a pinned buffer: a pageable copy would sync the stream
                order = self.mod.engine.host_buffers.get("order", order.shape, order.dtype).copy_(order)
                order = order.to(self.hidden.device, non_blocking=True)
            self._device = (order // self.K, self.top_k_weights.reshape(-1)[order])
        return self._device

    def expert_rows(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's token rows [n, D], their routing weights [n] and where they go in the layer's output [n],
        on the device."""
        r = self.rows[e]
        if self.T == 1:
            p = int(self.order[r.start])  # its (token 0, slot) position
            return self.hidden, self.top_k_weights.reshape(-1)[p:p + 1], self.mod.engine.zero_rows(1, self.hidden.device)
        tok, wts = self.device()
        return self.hidden[tok[r]], wts[r], tok[r]

    def output_rows(self, experts) -> torch.Tensor:
        """Where these experts' rows go in the layer's output [R], on the device, in the order of ``experts``."""
        if self.T == 1:
            return self.mod.engine.zero_rows(int(self.counts[experts].sum()), self.hidden.device)
        tok, _ = self.device()
        return torch.cat([tok[self.rows[int(e)]] for e in experts])

    def host_rows(self, experts) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations [R, D] and weights [R] of these experts' rows, on the host (small passes only)."""
        pos = self.order[self.rows[experts[0]]] if len(experts) == 1 else \
            np.concatenate([self.order[self.rows[e]] for e in experts])
        if self.T == 1:  # every row is the token's: a view of it, and the weights a slice where their slots run on
            x = self.x_host.expand(len(pos), -1)
            if (np.diff(pos) == 1).all():  # one position, or consecutive ones
                return x, self.w_host[int(pos[0]):int(pos[-1]) + 1]
            return x, self.w_host[torch.from_numpy(pos)]
        pos = torch.from_numpy(pos)  # [R] grouped positions of these experts
        return self.x_host[pos // self.K], self.w_host[pos]


class OffloadedExperts(nn.Module):
    """Drop-in for a fused experts module: forward(hidden [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]."""

    def __init__(self, engine: Offloaded, layer: int, original: nn.Module, host_gate_up: torch.Tensor,
                 host_down: torch.Tensor, cpu_dtype: torch.dtype, resident: np.ndarray, tiers=None):
        super().__init__()
        self.layer = layer
        self.n_experts = host_gate_up.shape[0]
        self.intermediate = host_down.shape[2]
        self.act_fn = original.act_fn
        # weights are plain attributes, not parameters: model.to() / state_dict must not move them
        self.__dict__["engine"] = engine
        self.host_gate_up, self.host_down = host_gate_up, host_down  # [E, 2I, D], [E, D, I] (pinned with CUDA)
        if cpu_dtype == host_gate_up.dtype:
            self.cpu_gate_up, self.cpu_down = host_gate_up, host_down
        else:  # CPU experts run faster in another dtype on this CPU: keep a host copy in it
            self.cpu_gate_up, self.cpu_down = host_gate_up.to(cpu_dtype), host_down.to(cpu_dtype)
        self._pageable = None  # (gate_up, down) pageable clones, made at this layer's first copy
        self.expert_bytes = (host_gate_up[0].numel() + host_down[0].numel()) * host_gate_up.element_size()
        self.gpu: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # resident expert -> (gate_up [2I, D], down [D, I])
        # resident expert -> index into engine.devices (several devices only; else every one is on engine.device)
        self.tier: dict[int, int] = {}
        # every expert resident for good on the engine's device: stacked [E, 2I, D], [E, D, I], and the passes
        # run sync-free (``_on_device``); self.gpu then holds views of the stacks
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        # a sync-free decode pass in three kernels (``gemv.expert_gate_up_act`` folds SiLU in: SiLU only)
        self.fused = engine.options.fused and gemv.is_silu(self.act_fn)
        # one-token decode passes with nothing on the host (``toolkit.moe.graph_pass``), set up by the engine
        self.graph_pass: graph_pass.GraphPass | None = None
        dev = engine.device
        if engine._stacked_layer(resident, host_gate_up.dtype):
            if dev.type == "cpu":
                self.stacked = (host_gate_up, host_down)
            else:
                with persistent():
                    self.stacked = (host_gate_up.to(dev), host_down.to(dev))
            for e in range(self.n_experts):
                self.gpu[e] = (self.stacked[0][e], self.stacked[1][e])
            return
        for e in np.flatnonzero(resident):
            if tiers is not None:
                self.tier[int(e)] = int(tiers[e])
            self.gpu[int(e)] = self._to_device(int(e))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.n_experts}, gpu_resident={sorted(self.gpu)}"

    def sources(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where copies read from: the pinned tier, or with ``pageable_copies`` a pageable clone of it.

        The clone is made at this layer's first copy (a warm-up pays for it), so a
        scheme that never copies (Fiddler's decode) never holds one.
        """
        eng = self.engine
        if not (eng.pageable_copies and eng.device.type == "cuda"):
            return self.host_gate_up, self.host_down
        if self._pageable is None:
            with persistent():
                self._pageable = (
                    torch.empty(self.host_gate_up.shape, dtype=self.host_gate_up.dtype).copy_(self.host_gate_up),
                    torch.empty(self.host_down.shape, dtype=self.host_down.dtype).copy_(self.host_down))
        return self._pageable

    def _to_device(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.engine.pool_rows.get((self.layer, e))
        if row is not None:  # the engine's pool of resident experts (captured decode passes): copied into its row
            gu, dn = self.engine.pool
            gu[row].copy_(self.host_gate_up[e])
            dn[row].copy_(self.host_down[e])
            return gu[row], dn[row]
        dev = self.engine.devices[self.tier[e]] if e in self.tier else self.engine.device
        if dev.type == "cpu":  # both tiers on the CPU: the "GPU" copy is the host tensor itself
            return self.host_gate_up[e], self.host_down[e]
        with persistent():
            return self.host_gate_up[e].to(dev), self.host_down[e].to(dev)

    # the per-expert compute: x [n, D] rows of this expert, w [n] their routing weights -> [n, D] in out dtype
    # (``linear``: the matmul, ``Offloaded.cpu_linear`` for CPU experts)
    def _expert(self, x, gate_up, down, w, out_dtype, linear=F.linear):
        return (expert_forward(x, gate_up, down, self.act_fn, linear) * w[:, None]).to(out_dtype)

    def _gate_up(self, x, gate_up, lo: int, hi: int, linear=F.linear):
        """Activations of intermediate units [lo, hi): x [n, D], gate_up [2I, D] -> act(gate) * up [n, hi - lo]."""
        up = self.intermediate  # up rows start here
        return self.act_fn(linear(x, gate_up[lo:hi])) * linear(x, gate_up[up + lo:up + hi])

    def _cpu_job_in_modes(self, modes, *job):
        inference, grad = modes
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return self._cpu_job(*job)

    def _cpu_job(self, ready, x_host, w_host, segments, split, y, h):
        """Worker thread: this layer's CPU work. x_host [R, D], w_host [R] -> y [R', D] (whole experts), h [n, I-k].

        ``segments``: (expert, first row, rows) of the whole CPU experts, rows [0, R');
        ``split``: (expert, first row, rows, k) whose gate/up rows [k, I) the CPU computes into h.
        """
        if ready is not None:
            ready.synchronize()  # the activations have landed in pinned memory
        timeline = self.engine.timeline
        if timeline is not None:
            timeline.mark("cpu_start", self.layer)
        with _label(f"moe.cpu_experts[L{self.layer}]"):
            x = x_host.to(self.cpu_gate_up.dtype)  # [R, D]
            linear = self.engine.cpu_linear
            for e, s, n in segments:
                y[s:s + n] = self._expert(x[s:s + n], self.cpu_gate_up[e], self.cpu_down[e], w_host[s:s + n], y.dtype,
                                          linear)
            if split is not None:
                e, s, n, k = split
                h.copy_(self._gate_up(x[s:s + n], self.cpu_gate_up[e], k, self.intermediate, linear))
        if timeline is not None:
            timeline.mark("cpu_end", self.layer)
        return y, h

    @property
    def sync_free(self) -> bool:
        """Whether a pass of this layer runs without the host (every expert resident): it can be captured."""
        return self.stacked is not None

    def _count(self, flat: torch.Tensor, phase: str) -> torch.Tensor:
        """Rows per expert of a sync-free pass, int64 [E] on the device, added to the engine's device counts."""
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat))  # [E] (bincount would sync for its length)
        self.engine.device_counts.record(phase, self.layer, counts)
        return counts

    def _on_device(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   phase: str) -> torch.Tensor:
        """Every expert resident: the experts chosen on the device, so nothing comes back to the host.

        No routing sync, counts kept on the device: the host runs ahead and the
        pass can be replayed from a CUDA graph. A few (token, slot) rows (decode)
        go through the expert GEMV (``toolkit.moe.gemv``); more rows, or no
        Triton, through one grouped GEMM per projection over the rows sorted by
        expert. The same arithmetic as ``_expert``: act(gate) * up, down, times
        the routing weight, summed over the token's experts.
        """
        eng, (T, K) = self.engine, top_k_index.shape
        flat = top_k_index.reshape(-1)  # [T*K] expert of each (token, slot)
        if eng.recorder is not None:
            eng.recorder.observe(self.layer, phase, top_k_index, top_k_weights)
        gate_up, down = self.stacked  # [E, 2I, D], [E, D, I]
        if gemv.usable(hidden.device, T * K):
            try:
                # counted after the kernels: a pass whose kernels fail is counted once, by the fallback below
                if self.fused:  # three kernels
                    a = gemv.expert_gate_up_act(hidden, flat, gate_up, per_x=K)  # [T*K, I] silu(gate) * up
                    out = gemv.expert_down(a, flat, down, top_k_weights)  # [T, D] weighted, summed over slots
                    eng.device_counts.record_rows(phase, self.layer, flat)
                    return out
                gate, up = gemv.expert_gemv(hidden, flat, gate_up, per_x=K).chunk(2, dim=-1)  # [T*K, I] each
                y = gemv.expert_gemv(self.act_fn(gate) * up, flat, down)  # [T*K, D]
                out = (y * top_k_weights.reshape(-1, 1)).to(hidden.dtype).view(T, K, -1).sum(dim=1)  # [T, D]
                self._count(flat, phase)
                return out
            except Exception as e:  # e.g. a Triton that cannot compile for this GPU: grouped_mm, which also works
                gemv.disable(f"{type(e).__name__}: {e}")
                warnings.warn(f"the expert GEMV failed here ({gemv.broken}); sync-free layers use grouped_mm "
                              "from now on", RuntimeWarning, stacklevel=2)
        counts = self._count(flat, phase)
        order = torch.sort(flat, stable=True).indices  # [T*K] positions grouped by expert
        offs = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's rows
        tok = order // K  # [T*K]
        h = F.grouped_mm(hidden[tok], gate_up.transpose(1, 2), offs=offs)  # [T*K, 2I]
        gate, up = h.chunk(2, dim=-1)  # [T*K, I] each
        y = F.grouped_mm(self.act_fn(gate) * up, down.transpose(1, 2), offs=offs)  # [T*K, D]
        y = (y * top_k_weights.reshape(-1)[order][:, None]).to(hidden.dtype)
        return torch.zeros_like(hidden).index_add_(0, tok, y)  # [T, D]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        timeline = self.engine.timeline
        if timeline is not None:
            timeline.mark("enter", self.layer)
        out = self._forward(hidden, top_k_index, top_k_weights)
        if timeline is not None:
            timeline.mark("exit", self.layer)
        return out

    def _forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None:
            eng = self.engine
            with _label(f"moe.gpu_experts[L{self.layer}]"):
                if eng.graphs is not None and eng.recorder is None:  # a recorder must see every pass: no replays
                    return eng.graphs.experts(self.layer, self._on_device, hidden, top_k_index, top_k_weights,
                                              eng.phase)
                return self._on_device(hidden, top_k_index, top_k_weights, eng.phase)
        eng, layer = self.engine, self.layer
        phase = eng.phase
        if self._captured_pass(hidden):
            with _label(f"moe.captured_pass[L{layer}]"):
                return eng.graphs.experts(layer, self._captured, hidden, top_k_index, top_k_weights, phase)

        with _label(f"moe.route[L{layer}]"):
            p = _Pass(self, hidden, top_k_index, top_k_weights)
        if eng.timeline is not None:
            eng.timeline.mark("routed", layer)
        if eng.recorder is not None:
            eng.recorder.observe(layer, phase, top_k_index, top_k_weights)

        counts = p.counts
        used = np.flatnonzero(counts)  # experts with >= 1 token
        hit, load, evict = eng.policy.step(layer, used)
        hit = np.asarray(hit, dtype=bool)
        resident_used, missed = used[hit], used[~hit]
        if any(int(e) not in self.gpu for e in resident_used):
            raise ToolkitError(f"policy {type(eng.policy).__name__} reports layer {layer} experts "
                               f"{[int(e) for e in resident_used if int(e) not in self.gpu]} as resident but they "
                               "were never loaded (its load/evict lists and hits disagree)")
        keep = {int(e) for e in load}
        ahead = eng.take_lookahead(layer, missed)  # expert -> its copy, started while the previous layer computed
        cpu_experts, copy_experts, split, link = self._assign(counts, resident_used, missed, keep, ahead,
                                                              small=p.x_host is not None)
        copy_experts = sorted(copy_experts, key=lambda e: int(e) not in ahead)  # the copies already landing first
        jobs = [(int(e), int(e) in keep) for e in copy_experts]
        if link:  # copies to several devices: in the order they land, each device's k-th copy with the others'
            rank: dict[int, int] = {}
            order = []
            for e, _ in jobs:
                d = link.get(e, 0)
                rank[d] = rank.get(d, -1) + 1
                order.append((rank[d], d))
            jobs = [job for _, job in sorted(zip(order, jobs), key=lambda t: t[0])]
        jobs += [(int(e), True) for e in load if counts[int(e)] == 0 and int(e) not in self.gpu]  # prefetch

        if eng.serial:
            job = None
            eng._stats.record(phase, layer, counts, resident_used)
        else:
            job = self._start_cpu(p, cpu_experts, split)  # first: the CPU's work is the long pole
            eng._stats.record(phase, layer, counts, resident_used)  # bookkeeping while it runs
        fresh = {e: eng.new_weights(self, e) for e, kept in jobs if kept}  # allocated before the side stream waits
        args = (p, resident_used, cpu_experts, jobs, fresh, split)
        out = self._serial(*args) if eng.serial else self._overlapped(*args, job, ahead, link)

        eng._stats.gpu_expert_calls += len(resident_used)
        eng._stats.cpu_expert_calls += len(cpu_experts)
        eng._stats.cpu_tokens += int(counts[cpu_experts].sum()) + (int(counts[split[0]]) if split else 0)
        eng._stats.copy_expert_calls += len(copy_experts)
        eng._stats.prefetch_calls += len(jobs) - len(copy_experts)
        eng._stats.bytes_copied += (len(jobs) - len(ahead)) * self.expert_bytes  # lookahead copies counted when issued
        if split:
            eng._stats.split_expert_calls += 1
            eng._stats.bytes_copied += self._split_bytes(split[1])
        for e in evict:
            self.gpu.pop(int(e), None)
        for e in fresh:
            self.gpu[e] = fresh[e]
        return out

    def _captured_pass(self, hidden: torch.Tensor) -> bool:
        """Whether this pass runs as ``graph_pass``: one token, inside a graphed decode step (captured or
        replayed), with no recorder or host timeline asking to see the layer's routing."""
        eng = self.engine
        return (self.graph_pass is not None and hidden.shape[0] == 1 and eng.recorder is None
                and eng.timeline is None and eng.graphs is not None and eng.graphs.graphed(self.layer))

    def _captured(self, hidden, top_k_index, top_k_weights, phase: str) -> torch.Tensor:
        if hidden.is_cuda:  # one kernel
            count = functools.partial(self.engine.device_counts.record_rows, phase, self.layer)
        else:  # torch's ops (the kernel is Triton's)
            count = functools.partial(self._count, phase=phase)
        return self.graph_pass(hidden, top_k_index, top_k_weights, count)

    def _split_bytes(self, k: int) -> int:
        """Bytes a split expert copies: gate/up rows [0, k) and the down projection."""
        hidden, inter = self.host_down.shape[1], self.intermediate
        return (2 * k * hidden + hidden * inter) * self.host_gate_up.element_size()

    def _assign(self, counts, resident_used, missed, keep, ahead=(), small: bool = False):
        """-> (CPU experts, copied experts, (split expert, k) or None, {copied expert: its copy device > 0}).

        ``keep``: experts the policy keeps (copied); ``ahead``: experts whose copy
        is already under way (lookahead): copied, and their copy time is spent.
        Kept experts go to the first device, lookahead copies stay where they
        landed; with several copy devices the makespan decision sends the
        others' copies where the layer ends soonest.
        ``small``: a decode-sized pass, planned without the contention (``Offloaded.plan_model``).
        """
        eng = self.engine
        kept = np.array([int(e) in keep for e in missed], dtype=bool)  # [M] the policy keeps it: copy it
        forced = kept | np.array([int(e) in ahead for e in missed], dtype=bool)  # [M]
        to_copy = forced.copy()  # [M]
        split = None
        link = {e: copy[3].link for e, copy in ahead.items() if copy[3] is not None and copy[3].link}
        free = missed[~forced]  # experts the decision may place
        if len(free):
            n = counts[free]
            if eng.decision == "makespan":
                cm = eng.plan_model(small)
                tiers = [self.tier.get(int(e), 0) for e in resident_used] if eng.spread else None
                gpu_busy = cm.resident_ms(counts[resident_used].tolist(), tiers)  # with the peer hops of spread rows
                plan = cm.plan(n, gpu_busy, float(kept.sum()) * cm.copy_ms, split=eng.split,
                               links=len(eng.copy_devices))
                choice = plan.copy.copy()
                if plan.split >= 0:
                    choice[plan.split] = False
                    split = (int(free[plan.split]), int(round(plan.fraction * self.intermediate)))
                if plan.link is not None:
                    link.update({int(e): int(d) for e, d, c in zip(free, plan.link, choice) if c and d > 0})
            elif eng.decision == "copy":
                choice = np.ones(len(free), dtype=bool)
            elif eng.decision == "cpu":
                choice = np.zeros(len(free), dtype=bool)
            else:  # Fiddler: minimise the sum of fixed costs per expert, i.e. copy from 10 tokens on
                choice = n * FIDDLER_CPU_COST >= FIDDLER_COPY_COST
            to_copy[~forced] = choice
        cpu = missed[~to_copy]
        if split is not None:
            cpu = cpu[cpu != split[0]]
        return cpu, missed[to_copy], split, link

    def _start_cpu(self, p: _Pass, cpu_experts, split):
        """Hand this layer's CPU work to the worker (or keep it for later inline) -> job, or None."""
        eng, layer = self.engine, self.layer
        cpu_list = [int(e) for e in cpu_experts] + ([split[0]] if split else [])
        if not cpu_list:
            return None
        with _label(f"moe.cpu_experts[L{layer}]"):
            segments, s = [], 0
            for e in cpu_experts:
                segments.append((int(e), s, int(p.counts[e])))
                s += int(p.counts[e])
            split_job = (split[0], s, int(p.counts[split[0]]), split[1]) if split else None
            bufs, ready = eng.host_buffers, None
            if p.x_host is not None:  # small pass: the activations came with the routing
                x_host, w_host = p.host_rows(cpu_list)  # [R, D], [R]
            else:  # gather the rows on the device and bring them over
                _, wts = p.device()
                idx = p.output_rows(cpu_list)  # [R]
                x, w = p.hidden[idx], torch.cat([wts[p.rows[e]] for e in cpu_list])  # [R, D], [R]
                if x.is_cuda:
                    x_host = bufs.get("x", x.shape, x.dtype).copy_(x, non_blocking=True)
                    w_host = bufs.get("w", w.shape, w.dtype).copy_(w, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                else:
                    x_host, w_host = x, w
            D = p.hidden.shape[1]
            y = bufs.get("y", (s, D), p.hidden.dtype)  # [R', D]
            h = bufs.get("h", (split_job[2], self.intermediate - split[1]) if split else (0, 0), p.hidden.dtype)
            job = (ready, x_host, w_host, segments, split_job, y, h)
            if eng.executor is None:
                return job
            # grad and inference modes are thread-local: the worker runs in the caller's, or it could not write
            # into buffers the caller made under inference_mode (and would record autograd history otherwise)
            modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
            return eng.executor.submit(self._cpu_job_in_modes, modes, *job)

    def _overlapped(self, p: _Pass, resident_used, cpu_experts, jobs, fresh, split, job, ahead=None, link=None):
        """Copies on the side stream and GPU experts while the CPU job runs; one wait at the end.

        ``ahead``: expert -> (gate_up, down, ready, slot) of copies the previous
        layer started (lookahead); this layer's own copies follow them.
        ``link``: copied expert -> its copy device (> 0; the rest go to the
        first): its token rows go there and its results come back.
        """
        ahead, link = ahead or {}, link or {}
        eng, layer, hidden = self.engine, self.layer, p.hidden
        cuda = hidden.is_cuda
        out = torch.zeros_like(hidden)  # [T, D]

        # copies: weights stream in on a side stream while the GPU computes resident experts
        if (jobs or split) and cuda:
            eng.copy_stream.wait_stream(torch.cuda.current_stream())
        landed = {}  # job index -> (gate_up, down, ready, slot) of the copies issued so far
        queues = [[j for j, (e, _) in enumerate(jobs) if link.get(e, 0) == d] for d in range(len(eng.copy_devices))]

        def issue_more():  # as many copies ahead as there are free staging slots: the copy engines never idle
            for d, queue in enumerate(queues):
                while queue:
                    e, kept = jobs[queue[0]]
                    if e in ahead:
                        landed[queue.pop(0)] = ahead[e]
                        continue
                    if not kept and not eng.slot_available(d):
                        break
                    landed[queue.pop(0)] = eng.copy_in(self, e, fresh.get(e), link=d)

        if jobs:
            with _label(f"moe.copy_experts[L{layer}]"):
                issue_more()

        if len(resident_used) and eng.spread:
            with _label(f"moe.gpu_experts[L{layer}]"):
                self._spread_experts(p, resident_used, out)
        elif len(resident_used):
            with _label(f"moe.gpu_experts[L{layer}]"):
                for e in resident_used:
                    x, w, rows = p.expert_rows(int(e))  # [n, D], [n], [n]
                    out.index_add_(0, rows, self._expert(x, *self.gpu[int(e)], w, out.dtype))

        with _label(f"moe.copy_experts[L{layer}]") if jobs else contextlib.nullcontext():
            for j, (e, _) in enumerate(jobs):
                issue_more()
                gate_up, down, ready, slot = landed.pop(j)
                if p.counts[e]:  # on its copy device (another GPU: its rows go there, its results come back)
                    x, w, rows = p.expert_rows(e)  # [n, D], [n], [n]
                    y_e = self._expert_on(eng.copy_devices[link.get(e, 0)], x, gate_up, down, w, out.dtype,
                                          ready)  # [n, D]
                    out.index_add_(0, rows, y_e)
                elif ready is not None:  # a prefetch: later passes read it once it has landed
                    torch.cuda.current_stream().wait_event(ready)
                if slot is not None:
                    eng.release(slot)  # its next copy waits for this compute

        # the split expert: its down projection and gate/up rows [0, k) land in a slot, copied last
        if split:
            e, k = split
            x_s, w_s, rows_s = p.expert_rows(e)  # [n, D], [n], [n]
            with _label(f"moe.copy_experts[L{layer}]"):
                gate_up, down, ready, slot = eng.copy_in(self, e, part=k)  # [2I, D] (rows [0, k), [I, I+k)), [D, I]
                if ready is not None:
                    torch.cuda.current_stream().wait_event(ready)
                h_gpu = self._gate_up(x_s, gate_up, 0, k) if k else None  # [n, k]
        if p.x_host is None:  # a long pass (prefill): the next layer's copies start while the CPU works
            eng.look_ahead(self.layer + 1, p.counts.sum())
        cpu_idx = p.output_rows(cpu_experts) if len(cpu_experts) else None  # [R']

        # the CPU's results back and added in
        if job is not None:
            if eng.executor is not None:
                y, h = job.result()
            else:  # inline: the GPU's work is already queued, so it still overlaps with this
                with torch_threads(eng.cpu_threads):
                    y, h = self._cpu_job(*job)
            if cpu_idx is not None:
                out.index_add_(0, cpu_idx, y.to(hidden.device, non_blocking=True))
            if split:
                h = h.to(hidden.device, non_blocking=True)  # [n, I-k]
                h = torch.cat([h_gpu, h], dim=-1) if k else h  # [n, I] every intermediate unit
                y_s = (F.linear(h, down) * w_s[:, None]).to(out.dtype)  # [n, D]
                out.index_add_(0, rows_s, y_s)
                eng.release(slot)
                if p.x_host is None:
                    eng.look_ahead(self.layer + 1, p.counts.sum())  # the split's slot is free again
        return out

    def _spread_experts(self, p: _Pass, resident_used, out) -> None:
        """Resident experts over several devices: each device's rows go there, are computed, and come back.

        Activations move, weights stay: a device's experts' rows [R_d, D] and
        weights [R_d] cross once each way per layer. The other devices' work is
        queued first, so it runs while the first device computes its own.
        """
        eng, hidden = self.engine, p.hidden
        tok, wts = p.device()
        by_tier: dict[int, list[int]] = {}
        for e in resident_used:
            by_tier.setdefault(self.tier[int(e)], []).append(int(e))
        back = []  # (token index [R_d], results [R_d, D] on their device)
        for d, experts in sorted(by_tier.items()):
            if d == 0:
                continue
            dev = eng.devices[d]
            idx = torch.cat([tok[p.rows[e]] for e in experts])  # [R_d]
            x = hidden[idx].to(dev, non_blocking=True)  # [R_d, D]
            w = torch.cat([wts[p.rows[e]] for e in experts]).to(dev, non_blocking=True)  # [R_d]
            ys, s = [], 0
            for e in experts:
                n = int(p.counts[e])
                ys.append(self._expert(x[s:s + n], *self.gpu[e], w[s:s + n], out.dtype))  # [n, D]
                s += n
            back.append((idx, torch.cat(ys)))
            eng.device_rows[d] += s
        for e in by_tier.get(0, ()):
            r = p.rows[e]
            out.index_add_(0, tok[r], self._expert(hidden[tok[r]], *self.gpu[e], wts[r], out.dtype))  # [n, D]
            eng.device_rows[0] += int(p.counts[e])
        for idx, y in back:
            out.index_add_(0, idx, y.to(hidden.device, non_blocking=True))

    def _resident_expert(self, e: int, x, w, out_dtype):
        """A resident expert's rows x [n, D], weights w [n] computed on its device -> [n, D] on x's device."""
        eng = self.engine
        d = self.tier.get(e, 0)
        eng.device_rows[d] += x.shape[0]
        return self._expert_on(eng.devices[d], x, *self.gpu[e], w, out_dtype)

    def _expert_on(self, dev: torch.device, x, gate_up, down, w, out_dtype, ready=None):
        """Rows x [n, D] with routing weights w [n] through an expert whose weights are on ``dev`` -> [n, D] on x's
        device: the activations move, the weights stay. ``ready``: the event of the weights' copy, waited for by
        ``dev``'s stream once the rows are on their way (moving them first keeps x's stream from waiting for it).
        """
        x_d, w_d = x.to(dev, non_blocking=True), w.to(dev, non_blocking=True)
        if ready is not None:
            torch.cuda.current_stream(dev).wait_event(ready)
        return self._expert(x_d, gate_up, down, w_d, out_dtype).to(x.device, non_blocking=True)

    def _serial(self, p: _Pass, resident_used, cpu_experts, jobs, fresh, split):
        """Fiddler's schedule: GPU experts (resident, then blocking copies) in expert order, then each CPU
        expert on its own: device-to-host transfer (a sync), compute, host-to-device; nothing overlaps."""
        eng, layer, hidden = self.engine, self.layer, p.hidden
        out = torch.zeros_like(hidden)  # [T, D]
        tok, wts = p.device()
        gpu_side = sorted([(int(e), None) for e in resident_used] + [(e, kept) for e, kept in jobs])
        with _label(f"moe.gpu_experts[L{layer}]"):
            for e, kept in gpu_side:
                if kept is None and eng.spread:  # resident, on one of several devices
                    r = p.rows[e]
                    out.index_add_(0, tok[r], self._resident_expert(e, hidden[tok[r]], wts[r], out.dtype))
                    continue
                weights = self.gpu[e] if kept is None else eng.copy_blocking(self, e, fresh.get(e))
                if p.counts[e]:
                    r = p.rows[e]
                    y_e = self._expert(hidden[tok[r]], *weights, wts[r], out.dtype)  # [n, D]
                    out.index_add_(0, tok[r], y_e)
        if len(cpu_experts):
            if eng.timeline is not None:
                eng.timeline.mark("cpu_start", layer)
            with torch_threads(eng.cpu_threads):  # the same CPU threads as the worker of the overlapped schedule
                for e in sorted(int(e) for e in cpu_experts):
                    with _label(f"moe.cpu_experts[L{layer}]"):
                        r = p.rows[e]
                        x = hidden[tok[r]].cpu().to(self.cpu_gate_up.dtype)  # [n, D] a sync per expert
                        w = wts[r].cpu()  # [n]
                        y_e = self._expert(x, self.cpu_gate_up[e], self.cpu_down[e], w, out.dtype,
                                           eng.cpu_linear)  # [n, D]
                        out.index_add_(0, tok[r], y_e.to(hidden.device))
            if eng.timeline is not None:
                eng.timeline.mark("cpu_end", layer)
        return out


class RoutedGate(nn.Module):
    """Replaces a router by ``routing.route(layer, hidden [T, D], phase) -> (top_k_index [T, K], top_k_weights [T, K])``.

    ``phase()`` says the phase of the current pass (the engine's; None where
    nobody tracks it, as for the unmodified model of ``MoESession.unmodified``,
    whose trace replay does not need it). Public so that the unmodified model
    can replay exactly the routing an engine replays.
    """

    def __init__(self, gate: nn.Module, layer: int, routing, n_experts: int, phase=lambda: None):
        super().__init__()
        self.original = gate
        self.layer, self.n_experts = layer, n_experts
        self.top_k = getattr(gate, "top_k", None)  # the router's experts a token, as ``router_top_k`` reads it
        self.__dict__["routing"], self.__dict__["phase"] = routing, phase  # plain attributes, never submodules

    def forward(self, hidden_states):
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, D]
        index, weights = self.routing.route(self.layer, hidden, self.phase())
        index = torch.as_tensor(index).to(hidden.device, torch.long)  # [T, K]
        weights = torch.as_tensor(weights).to(hidden.device)  # [T, K]
        logits = torch.zeros(hidden.shape[0], self.n_experts, device=hidden.device, dtype=hidden.dtype)  # aux loss only
        return logits, weights, index


@dataclass(frozen=True)
class EngineOptions:
    """How the engine serves missed experts and schedules its work (the switches ``offload()`` exposes).

    decision: "makespan" (the cost model), "cpu", "copy" or "fiddler".
    serial: Fiddler's schedule (nothing overlaps). pageable_copies: copy from a
    pageable clone, blocking. split: let the makespan decision split one expert
    per layer between copy and CPU (only with decision "makespan", not serial).
    overlap: CPU experts in a worker thread, concurrently with the GPU (never
    with serial). copy_slots: GPU staging buffers for copied experts.
    cpu_threads / cpu_dtype: the CPU experts' intra-op threads and dtype.
    spare_cores: cores the worker thread's CPU experts leave to the host thread
    beyond the calibration's count (they run on ``cpu_threads - spare_cores``
    threads; only with overlap): the host thread's work between layers runs
    beside them; on one host of three measured a free core for it was worth
    more than the thread it takes (the ``-spare`` schedules of
    ``toolkit.moe.schedule``, which "auto" does not race).
    graphs: replay the dense part of decode steps from CUDA graphs
    (``toolkit.moe.graphs``; on a CPU device the same static-input path runs
    eagerly, which tests use). sync_free: a layer whose experts are all
    resident for good (a static placement) chooses each row's expert on the
    device, without bringing its routing to the host (``OffloadedExperts._on_device``).
    whole_step: with graphs, a decode step whose layers are all sync-free (and
    whose routing is the model's router or a trace replay) is one CUDA graph
    (``Offloaded.whole_step_ready``, ``toolkit.moe.graphs``); False keeps a graph
    per part of each layer (an ablation). fused: on a CUDA device with
    Triton, the decode step's small ops run as single kernels: the model's
    RMSNorms (``toolkit.moe.norm``; each checked against its own forward
    first) and a sync-free pass's experts (activation, weighted sum over the
    slots and counts folded into the expert GEMVs, ``toolkit.moe.gemv``);
    False keeps torch's ops (an ablation).
    lookahead (default on): in long passes (prefill), start copying the next layer's
    missed experts into free staging slots while this layer computes
    (``Offloaded.look_ahead``). spread_copies: with several devices, a
    missed expert may be copied to any of them, each over its own host link
    (the makespan decision picks the device), not only to the first.
    contention: the makespan decision counts how CPU experts and copies slow
    each other (as calibrated) in long passes (``Offloaded.plan_model``); the
    cost model the engine holds says whether any was measured. cpu_kernel:
    CPU experts of few tokens take ``toolkit.moe.cpu_gemv`` where the
    calibration found it faster than torch's matmul (off: torch's everywhere).
    graph_misses: with graphs, a static placement and the makespan decision
    (not serial), one-token decode passes of layers with missed experts run
    with nothing on the host (``toolkit.moe.graph_pass``): each missed expert
    split at the calibration's balanced share, its GPU units copied by one
    kernel (``toolkit.moe.share_copy``) and its other units computed by a host function, so
    the whole step is one graph; False keeps the per-layer path (an ablation).
    """

    cpu_threads: int
    cpu_dtype: torch.dtype
    decision: str = "makespan"
    serial: bool = False
    pageable_copies: bool = False
    split: bool = True
    overlap: bool = False
    copy_slots: int = 2
    graphs: bool = False
    sync_free: bool = True
    whole_step: bool = True
    fused: bool = True
    lookahead: bool = True
    spread_copies: bool = True
    contention: bool = True
    cpu_kernel: bool = True
    spare_cores: int = 0
    graph_misses: bool = True

    @property
    def splits(self) -> bool:
        """Whether a layer may really split an expert (the switch, the makespan decision and no serial schedule)."""
        return self.split and self.decision == "makespan" and not self.serial

    @property
    def overlaps(self) -> bool:
        """Whether CPU experts run in a worker thread (the serial schedule never overlaps)."""
        return self.overlap and not self.serial

    @property
    def worker_threads(self) -> int:
        """Intra-op threads of the CPU experts: ``cpu_threads``, less the spared cores when they overlap."""
        return max(1, self.cpu_threads - self.spare_cores) if self.overlaps else self.cpu_threads


class Offloaded:
    """An MoE model whose experts are split between the GPU and the CPU (see ``offload``).

    Built by ``offload()``; a context manager that puts the model back (``restore()``) on exit.
    ``resident`` is the initial GPU residency, bool [L, E]; ``original_devices`` where each
    block's experts lived before (restored there). ``devices`` (several): the devices
    holding resident experts, ``device`` first; ``tiers`` int [L, E] which one holds each
    (``assign_devices``).
    """

    def __init__(self, model, blocks, *, policy, resident: np.ndarray, device: torch.device, cost_model: CostModel,
                 routing, gpu_experts: int, original_devices: list, options: EngineOptions, devices=None,
                 tiers: np.ndarray | None = None):
        cpu_threads, cpu_dtype, copy_slots = options.cpu_threads, options.cpu_dtype, options.copy_slots
        self.options = options
        self.model = model
        self.device = device
        self.devices = list(devices) if devices else [device]  # devices[0] is device: the dense part's
        self.spread = len(self.devices) > 1  # resident experts on several devices
        self.device_rows = [0] * len(self.devices)  # (token, expert) rows computed by each device's resident experts
        self.policy = policy
        self.cost_model = cost_model
        self.routing = routing
        self.recorder = None  # object with observe(layer, phase, top_k_index [T, K], top_k_weights [T, K])
        self.timeline = None  # a toolkit.moe.timeline.HostTimeline: marks of each layer's host work
        self.cpu_threads = cpu_threads
        self.cpu_dtype = cpu_dtype
        self.cpu_linear = cost_model.cpu_linear  # CPU experts' matmul: the calibrated kernel for few tokens, or torch's
        self.gpu_experts = gpu_experts
        self.decision, self.serial, self.pageable_copies = options.decision, options.serial, options.pageable_copies
        self.split = options.splits
        self.host_buffers = _HostBuffers(pin=device.type == "cuda")
        self._zero_rows: dict = {}  # (n, device) -> zeros [n]: a one-token pass's output rows (``zero_rows``)
        self._blocks = blocks
        self._originals = [b.experts for b in blocks]
        self._orig_gates = [b.gate for b in blocks]
        self._phase, self._phase_mode = "prefill", "auto"
        n_experts = self._originals[0].gate_up_proj.shape[0]
        self._stats = ExpertStats(len(blocks), n_experts)
        self.device_counts = _DeviceCounts(len(blocks), n_experts, device)  # the sync-free passes' counts
        self.copy_slots = copy_slots
        # where missed experts may be copied (each device over its own host link), devices[0] first
        self.copy_devices = self.devices if self.spread and options.spread_copies and not options.serial else [device]
        self.device_copies = [0] * len(self.copy_devices)  # whole experts copied to each of them
        self._slots: list[_Slot] = []  # the first device's staging slots (``_slots_on[0]``)
        self._slots_on: list[list[_Slot]] = []  # per copy device
        self._ahead: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> copy started by look_ahead
        self.copy_streams = [torch.cuda.Stream(d) if d.type == "cuda" else None for d in self.copy_devices]
        self.copy_stream = self.copy_streams[0]
        self.executor = self._start_worker() if options.overlaps else None
        self._hooks = []
        self.norms = None  # toolkit.moe.norm.FusedNorms: the model's RMSNorms given the kernel (options.fused)
        self._orig_param_devices = original_devices
        self.experts: list[OffloadedExperts] = []
        # captured decode passes (options.graph_misses): the resident experts of their layers in one device pool,
        # the staging slots after them; (layer, expert) -> its row
        self.pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pool_rows: dict[tuple[int, int], int] = {}
        self.graph_misses_units = 0  # the GPU's units of a missed expert in a captured pass
        self.graph_misses_balanced: dict | None = None  # what ``balance_graph_misses`` measured and chose
        self.router_top_k = router_top_k(blocks)  # before a replayed routing takes the routers' place
        self.graph_misses_reason = self._graph_misses_reason(blocks, resident, routing)
        if self.graph_misses_reason is None:
            self._make_pool(blocks, resident)
        for layer, block in enumerate(blocks):
            orig = block.experts
            mod = OffloadedExperts(self, layer, orig, orig.gate_up_proj.data, orig.down_proj.data, cpu_dtype,
                                   resident[layer], tiers[layer] if self.spread else None)
            self.experts.append(mod)
            block.experts = mod
            if routing is not None:
                block.gate = RoutedGate(block.gate, layer, routing, n_experts, phase=lambda: self.phase)
        # staging slots are allocated once, up front: a buffer the side stream writes must never be memory
        # that the main stream's allocator has just recycled from a kernel still in flight
        first = self.experts[0]
        if self.pool is not None:  # the pool's last rows (the captured passes stage into them too)
            gu, dn = self.pool
            self._slots_on = [[_Slot(gu[r], dn[r]) for r in range(gu.shape[0] - copy_slots, gu.shape[0])]]
            self._set_up_graph_passes(resident)
        else:
            with persistent():
                self._slots_on = [[_Slot(torch.empty_like(first.host_gate_up[0], device=d),
                                         torch.empty_like(first.host_down[0], device=d), link)
                                   for _ in range(copy_slots)] for link, d in enumerate(self.copy_devices)]
        self._slots = self._slots_on[0]
        self._install_hooks()
        self.graphs = None  # DecodeGraphs of the decoder layers' dense part (options.graphs)
        layers = decoder_layers(model, blocks) if options.graphs else []
        if layers:
            capture = CudaCapture(device) if device.type == "cuda" else EagerCapture()
            base = getattr(model, "base_model", None)  # the decoder holding the layers: its forward may be a graph
            if not all(any(layer is x for x in getattr(base, "layers", ())) for layer in layers):
                base = None
            self.graphs = DecodeGraphs(layers, capture, owner=self, base=base).install()

    # -- captured decode passes with missed experts (``toolkit.moe.graph_pass``) ---------------------
    def _stacked_layer(self, resident_row: np.ndarray, dtype: torch.dtype) -> bool:
        """Whether a layer with this residency keeps every expert stacked and runs sync-free (``OffloadedExperts``):
        every expert resident for good (a static placement) on the one device, where grouped_mm runs."""
        return (self.options.sync_free and not self.spread and bool(np.all(resident_row))
                and getattr(self.policy, "static", False) and grouped_mm_usable(self.device, dtype))

    def _graph_misses_reason(self, blocks, resident: np.ndarray, routing) -> str | None:
        """Why decode passes with missed experts are not captured here (``options.graph_misses``), or None."""
        o = self.options
        first = blocks[0].experts
        if not o.graph_misses:
            return "switched off"
        if not o.graphs:
            return "the dense part is not graphed (graphs off)"
        if self.spread:
            return "experts on several devices"
        if not getattr(self.policy, "static", False):
            return f"policy {getattr(self.policy, 'name', type(self.policy).__name__)} moves experts"
        if o.decision != "makespan" or o.serial:
            return f"missed experts are served whole (decision {o.decision}{', serial' if o.serial else ''})"
        if not o.cpu_kernel:
            return "the CPU kernel is off (the captured pass computes the CPU's share with it)"
        if routing is not None and not hasattr(routing, "begin_pass"):
            return "the replayed routing is read on the host"
        if all(self._stacked_layer(row, first.gate_up_proj.dtype) for row in resident):
            return "every expert resident"
        top_k = self.router_top_k
        if top_k is None:
            return "the router does not say its experts per token (top_k)"
        if top_k > self.copy_slots:
            return f"{top_k} experts a token need as many staging slots, not {self.copy_slots}"
        return graph_pass.why_not(self.device, first.gate_up_proj.dtype, first.act_fn)

    def _make_pool(self, blocks, resident: np.ndarray) -> None:
        """One device tensor for the resident experts of the layers with captured passes, then the staging slots."""
        first = blocks[0].experts
        dtype = first.gate_up_proj.dtype
        rows = [(layer, int(e)) for layer, row in enumerate(resident) if not self._stacked_layer(row, dtype)
                for e in np.flatnonzero(row)]
        self.pool_rows = {key: i for i, key in enumerate(rows)}
        n = len(rows) + self.copy_slots
        with persistent():
            self.pool = (torch.empty((n, *first.gate_up_proj.shape[1:]), dtype=dtype, device=self.device),
                         torch.empty((n, *first.down_proj.shape[1:]), dtype=dtype, device=self.device))

    def _set_up_graph_passes(self, resident: np.ndarray) -> None:
        """A ``GraphPass`` for each layer with pooled residents or missed experts, splitting each missed expert at
        the calibration's balanced share (``CostModel.balanced_share``)."""
        inter = self.experts[0].intermediate
        self.graph_misses_units = graph_pass.share_units(self.cost_model.balanced_share(), inter)
        top_k = self.router_top_k
        first_slot = self.pool[0].shape[0] - self.copy_slots
        for layer, mod in enumerate(self.experts):
            if mod.stacked is not None:
                continue
            pos = np.full(mod.n_experts, -1, dtype=np.int64)
            for e in np.flatnonzero(resident[layer]):
                pos[e] = self.pool_rows[(layer, int(e))]
            mod.graph_pass = graph_pass.GraphPass(mod, self.pool, pos, first_slot, top_k, resident[layer],
                                                  self.graph_misses_units, self.cpu_threads)

    def balance_graph_misses(self, min_experts: int = 16) -> dict | None:
        """Move the split of missed experts to where the CPU's share and the copy end together at the rates this
        engine's own captured passes ran: once, after at least ``min_experts`` missed experts were served.

        The calibration times a CPU expert and a copy each beside the other,
        but in a captured step the CPU's share streams beside copies for the
        whole step: on an H200 host a whole expert's worth took 5.1-5.2 ms
        against the calibration's 4.1 (``data/gpu/moe_decode_h200_captured.json``),
        and host nodes beside copies read 60-63 GB/s against 78-104 alone
        (``data/gpu/cpu_share_h200.json``), so the first split left the CPU the
        long pole. The host function times itself: its
        seconds per missed expert give a whole expert's CPU time at the rate it
        really ran, and the copy keeps the calibration's time (the captured
        copies ran at its rate). The new share is
        CPU / (CPU + copy); the graphs are dropped so the next step captures the
        copies at their new size. Returns what was measured and chosen (also in
        ``graph_misses_dict()``), or None when nothing was done.
        """
        passes = [m.graph_pass for m in self.experts if m.graph_pass is not None]
        if not passes or self.graph_misses_balanced is not None:
            return None
        served = sum(g.served()[0] for g in passes)
        busy = sum(g.served()[1] for g in passes)
        inter, old = self.intermediate_size, self.graph_misses_units
        if served < min_experts or old >= inter or busy <= 0:
            return None
        cpu_ms = busy / served * 1e3 * inter / (inter - old)  # a whole expert at the rate the CPU's shares ran
        copy_ms = self.cost_model.copy_ms * self.cost_model.copy_slowdown
        share = cpu_ms / (cpu_ms + copy_ms)
        k = graph_pass.share_units(share, inter)
        self.graph_misses_balanced = {"first_units": old, "experts_measured": served,
                                      "cpu_ms_per_expert": cpu_ms, "copy_ms_per_expert": copy_ms,
                                      "share": round(share, 3), "units": k}
        if k != old:
            for g in passes:
                g.set_units(k)
            self.graph_misses_units = k
            if self.graphs is not None:
                self.graphs.drop_captures()
        return self.graph_misses_balanced

    def graph_misses_dict(self) -> dict:
        """Captured decode passes: layers, the GPU's units of a missed expert and its share, whether the split was
        balanced on measured rates (``balance_graph_misses``), or why there are none."""
        layers = sum(m.graph_pass is not None for m in self.experts)
        inter = self.intermediate_size
        return {"layers": layers, "units": self.graph_misses_units if layers else 0,
                "share": self.graph_misses_units / inter if layers else 0.0, "reason": self.graph_misses_reason,
                "balanced": self.graph_misses_balanced}

    # -- a decode step as one graph (``DecodeGraphs``' owner) ---------------------------------------
    def whole_step_ready(self, rows: int | None = None) -> bool:
        """Whether a decode step of ``rows`` tokens may replay every layer from one graph: nothing in it needs
        the host.

        Every layer sync-free (each expert resident, chosen on the device) or
        with captured passes (``graph_pass``: one token only), the routing the
        model's router or a trace replay that gathers its rows on the device
        (``begin_pass``), and no recorder or host timeline (they see each
        layer's call, which a replay does not make).
        """
        captured = any(m.graph_pass is not None for m in self.experts)
        return (self.options.whole_step and self.recorder is None and self.timeline is None
                and all(m.sync_free or m.graph_pass is not None for m in self.experts)
                and (not captured or rows == 1)
                and (self.routing is None or hasattr(self.routing, "begin_pass")))

    def begin_step(self, inputs: torch.Tensor) -> None:
        """Before a whole step's capture or replay: the replayed routing's rows of this pass, set on the device.

        ``inputs``: the pass's token ids [B, S] or hidden states [B, S, D] (B * S rows)."""
        if self.routing is not None:
            self.routing.begin_pass(inputs.shape[0] * inputs.shape[1], inputs.device)

    def end_step(self) -> None:
        if self.routing is not None:
            self.routing.end_pass()

    def _start_worker(self) -> ThreadPoolExecutor:
        """The worker thread of the overlapped schedule (one: the CPU experts of a layer are one job)."""
        return ThreadPoolExecutor(1, thread_name_prefix="moe-cpu", initializer=self._init_worker,
                                  initargs=(self.options.worker_threads, self.device))

    @staticmethod
    def _init_worker(threads, device):
        torch.set_num_threads(threads)  # intra-op threads are per OS thread: set them in the worker itself
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def _install_hooks(self):
        def pre(module, args, kwargs):
            if self._phase_mode == "auto":
                x = kwargs.get("input_ids", args[0] if args else None)
                x = kwargs.get("inputs_embeds") if x is None else x
                if x is not None and x.dim() >= 2:
                    self._phase = "prefill" if x.shape[1] > 1 else "decode"

        self._hooks.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        attns = [m for name, m in self.model.named_modules() if name.endswith("self_attn")]
        if len(attns) == len(self._blocks):  # label attention per MoE layer for the profiler timeline
            for layer, attn in enumerate(attns):
                stack = []

                def enter(module, args, layer=layer, stack=stack):
                    rf = _label(f"attention[L{layer}]")
                    rf.__enter__()
                    stack.append(rf)

                def leave(module, args, output, stack=stack):
                    if stack:
                        stack.pop().__exit__(None, None, None)

                self._hooks.append(attn.register_forward_pre_hook(enter))
                self._hooks.append(attn.register_forward_hook(leave))

    # -- copies -------------------------------------------------------------------------------
    def new_weights(self, mod: OffloadedExperts, e: int):
        """Fresh device tensors for an expert the policy keeps resident."""
        with persistent():
            return (torch.empty_like(mod.host_gate_up[e], device=self.device),
                    torch.empty_like(mod.host_down[e], device=self.device))

    def slot_available(self, link: int = 0) -> bool:
        """Whether copy device ``link`` (an index into ``copy_devices``) has a free staging slot."""
        return any(not s.busy for s in self._slots_on[link])

    def _slot(self, mod: OffloadedExperts, link: int = 0) -> _Slot:
        slot = next(s for s in self._slots_on[link] if not s.busy)
        slot.busy = True
        return slot

    def zero_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """A kept index [n] of zeros on ``device``: where a one-token pass's rows go in its layer's output."""
        key = (n, device)
        rows = self._zero_rows.get(key)
        if rows is None:
            with persistent():
                rows = self._zero_rows[key] = torch.zeros(n, dtype=torch.long, device=device)
        return rows

    def release(self, slot: _Slot) -> None:
        """The slot's expert has been computed (enqueued): a later copy into it waits for that."""
        dev = slot.gate_up.device
        if dev.type == "cuda":
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(dev))  # the compute that reads it runs on its own device
        slot.busy = False

    @staticmethod
    def _copy_parts(mod: OffloadedExperts, e: int, dest, part: int | None, non_blocking: bool) -> None:
        """Expert e's weights (all, or only gate/up rows [0, part) and [I, I+part) plus down) into dest."""
        src_gate_up, src_down = mod.sources()
        gu, dn = src_gate_up[e], src_down[e]  # [2I, D], [D, I]
        if part is None:
            dest[0].copy_(gu, non_blocking=non_blocking)
        elif part:
            up = mod.intermediate  # up rows start here
            dest[0][:part].copy_(gu[:part], non_blocking=non_blocking)
            dest[0][up:up + part].copy_(gu[up:up + part], non_blocking=non_blocking)
        dest[1].copy_(dn, non_blocking=non_blocking)

    def copy_in(self, mod: OffloadedExperts, e: int, dest=None, part: int | None = None, link: int = 0):
        """Start copying expert ``e``'s weights to a device -> (gate_up, down, ready event | None, slot | None).

        ``part``: copy only the gate/up rows a split expert computes on the GPU (and all of down).
        ``link``: the copy device (an index into ``copy_devices``; ``dest``, if given, is on the first).
        """
        slot = None
        if dest is None:
            slot = self._slot(mod, link)
            dest = (slot.gate_up, slot.down)
        if part is None:
            self.device_copies[link] += 1
        stream = self.copy_streams[link]
        if stream is None:
            self._copy_parts(mod, e, dest, part, non_blocking=False)
            return dest[0], dest[1], None, slot
        with torch.cuda.stream(stream):
            if slot is not None and slot.free is not None:
                stream.wait_event(slot.free)  # the slot's previous expert has been computed
            self._copy_parts(mod, e, dest, part, non_blocking=not self.pageable_copies)
            ready = torch.cuda.Event()
            ready.record(stream)
        return dest[0], dest[1], ready, slot

    def copy_blocking(self, mod: OffloadedExperts, e: int, dest=None):
        """Copy expert ``e`` on the compute stream and wait for it (the serial schedule) -> (gate_up, down).

        One staging slot suffices: stream order puts each copy after the last compute that read the slot.
        """
        if dest is None:
            dest = (self._slots[0].gate_up, self._slots[0].down)
        self._copy_parts(mod, e, dest, None, non_blocking=False)
        self.device_copies[0] += 1
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # pinned copies return early; Fiddler's waited
        return dest

    def plan_model(self, small: bool) -> CostModel:
        """The cost model that plans a pass: with the calibrated contention for long passes (prefill), without for
        small ones (decode, beams).

        Why: the contention is measured with copies streaming through a whole
        CPU expert, which is what a prefill layer does (several experts on
        each path for tens of ms); there it moved experts to the links and a
        two-GPU 512-token prefill on two H200s went from 166 to 136 ms
        (``data/gpu/moe_multi_gpu_contention.json``). A decode layer has one or
        two single-token misses; planned with the contention it split more of
        them between the CPU and a copy, and decode on a one-H200 host ran at
        15.0 tok/s against 17.1 without it (``moe_decode_h200_contention.json``);
        on the two-H200 host decode was even either way.
        """
        return self.cost_model.without_contention() if small else self.cost_model

    # -- lookahead ------------------------------------------------------------------------------
    def look_ahead(self, layer: int, rows: int) -> None:
        """Start copying ``layer``'s missed experts into the free staging slots before its routing is known.

        Why: in a long pass (prefill) every expert of a layer is used, and the
        copy engine would idle from a layer's last copy until the next layer's
        routing reaches the host. The experts the cost model would copy at
        ``rows`` (token, slot) rows spread evenly go first, as many as there
        are free slots; ``take_lookahead`` hands them to that layer's pass.
        With several copy devices each copy goes over the link the plan gives
        it, or another with a free slot (its rows go where it lands). Only with
        ``options.lookahead`` and the makespan or copy decision.
        """
        if (not self.options.lookahead or self.serial or layer >= len(self.experts)
                or self.decision not in ("makespan", "copy")):
            return
        links = range(len(self.copy_devices))
        mod = self.experts[layer]
        todo = [e for e in range(mod.n_experts) if e not in mod.gpu and (layer, e) not in self._ahead]
        if not todo or not any(self.slot_available(d) for d in links):
            return
        where = [0] * len(todo)
        if self.decision == "makespan":  # the copies the plan would make at the expected token counts
            n = max(1, int(round(int(rows) / mod.n_experts)))
            plan = self.cost_model.plan([n] * len(todo), 0.0, 0.0, split=False, links=len(links))
            where = [int(d) for d, c in zip(plan.link if plan.link is not None else where, plan.copy) if c]
            todo = [e for e, c in zip(todo, plan.copy) if c]
        with _label(f"moe.lookahead[L{layer}]"):
            for e, d in zip(todo, where):
                d = next((x for x in (d, *links) if self.slot_available(x)), None)
                if d is None:
                    break
                self._ahead[(layer, e)] = self.copy_in(mod, e, link=d)
                self._stats.lookahead_copies += 1
                self._stats.bytes_copied += mod.expert_bytes

    def take_lookahead(self, layer: int, missed) -> dict:
        """``layer``'s lookahead copies of experts in ``missed`` (expert -> copy); the rest give their slot back."""
        mine = {e: self._ahead.pop((lay, e)) for lay, e in list(self._ahead) if lay == layer}
        wanted = {int(e) for e in missed}
        for e in [e for e in mine if e not in wanted]:
            self.release(mine.pop(e)[3])  # a later copy into the slot queues behind this one on the copy stream
        return mine

    # -- public ---------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    @property
    def schedule(self) -> dict:
        """How CPU experts are scheduled now: ``{"overlap": worker thread, "split": a layer may split an expert,
        "spare_cores": cores the worker leaves to the host thread}``."""
        overlap = self.executor is not None
        return {"overlap": overlap, "split": self.split, "spare_cores": self.options.spare_cores if overlap else 0}

    def set_schedule(self, overlap: bool, split: bool, spare_cores: int = 0) -> None:
        """Switch the schedule without offloading again: CPU experts in a worker thread or inline, split or not.

        Why: which schedule is fastest depends on the machine (on a host whose
        CPU experts and pinned copies share the memory bandwidth, the worker
        thread can cost more than the overlap buys), so a run measures the
        candidates on the offloaded model (``toolkit.moe.schedule``); offloading
        again per candidate would copy every resident expert again. ``overlap``
        starts the worker thread (or stops it, after its last job). ``split``
        takes effect only with the makespan decision; the serial schedule never
        overlaps nor splits. ``spare_cores``: cores the worker's CPU experts
        leave to the host thread (``EngineOptions.spare_cores``; a new worker
        starts when its thread count changes). Call it between forward passes,
        not during one.
        """
        if not self._slots:
            raise ToolkitError("this engine has been restored: offload the model again to change its schedule")
        spare_cores = _check_spare(spare_cores, self.cpu_threads)
        options = dataclasses.replace(self.options, overlap=bool(overlap), split=bool(split), spare_cores=spare_cores)
        if self.executor is not None and (not options.overlaps
                                          or options.worker_threads != self.options.worker_threads):
            self.executor.shutdown(wait=True)
            self.executor = None
        self.options = options
        if options.overlaps and self.executor is None:
            self.executor = self._start_worker()
        self.split = options.splits

    def set_phase(self, phase: str) -> None:
        """'prefill' or 'decode' (fixed), or 'auto' (from the input length of each forward: > 1 token is prefill)."""
        if phase not in (*PHASES, "auto"):
            raise ToolkitError(f"phase must be 'prefill', 'decode' or 'auto', got {phase!r}")
        self._phase_mode = phase
        if phase != "auto":
            self._phase = phase

    @property
    def placement(self) -> np.ndarray:
        """Current GPU residency, bool [L, E]."""
        return np.stack([np.asarray(self.policy.resident(layer), dtype=bool) for layer in range(len(self._blocks))])

    @property
    def expert_devices(self) -> np.ndarray:
        """Which device holds each resident expert now: int [L, E], an index into ``devices`` (-1: host only)."""
        tiers = np.full((self.n_layers, self.n_experts), -1, dtype=np.int64)
        for layer, mod in enumerate(self.experts):
            for e in mod.gpu:
                tiers[layer, e] = mod.tier.get(e, 0)
        return tiers

    def devices_dict(self) -> list[dict]:
        """Per device: its name, resident experts, the rows its resident experts computed and the experts copied to it."""
        tiers = self.expert_devices
        held = np.bincount(tiers[tiers >= 0], minlength=len(self.devices))
        copies = self.device_copies + [0] * (len(self.devices) - len(self.device_copies))
        return [{"device": str(d), "experts": int(held[i]), "rows": int(self.device_rows[i]), "copies": int(copies[i])}
                for i, d in enumerate(self.devices)]

    @property
    def hidden_size(self) -> int:
        return self.experts[0].host_gate_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.experts[0].host_down.shape[2]

    @property
    def bytes_per_expert(self) -> int:
        return self.experts[0].expert_bytes

    @property
    def n_layers(self) -> int:
        return len(self._blocks)

    @property
    def n_experts(self) -> int:
        return self._stats.n_experts

    @property
    def stats(self) -> ExpertStats:
        """Activations, hits and counters so far (``ExpertStats``), the sync-free passes' device counts included."""
        self.device_counts.fold(self._stats, self.placement)
        for mod in self.experts:
            if mod.graph_pass is not None:
                self._fold_graph_pass(mod.graph_pass)
        return self._stats

    def _fold_graph_pass(self, gp: graph_pass.GraphPass) -> None:
        """A layer's captured passes' missed experts into the counters, as the per-layer path counts them."""
        experts, _ = gp.take_counts()
        st = self._stats
        st.cpu_tokens += experts if gp.k < gp.inter else 0
        if gp.k == 0:
            st.cpu_expert_calls += experts
        elif gp.k >= gp.inter:
            st.copy_expert_calls += experts
        else:
            st.split_expert_calls += experts
        st.bytes_copied += experts * gp.share_bytes

    @property
    def sync_free_layers(self) -> int:
        """Layers whose experts are all resident for good: their passes run without a routing sync."""
        return sum(mod.stacked is not None for mod in self.experts)

    def fused_dict(self) -> dict:
        """What runs as fused kernels: norms given the RMSNorm kernel (and kept), sync-free layers' experts."""
        return {"norms": len(self.norms.fused) if self.norms is not None else 0,
                "norms_kept": len(self.norms.kept) if self.norms is not None else 0,
                "expert_layers": sum(m.stacked is not None and m.fused and gemv.usable(self.device, 1)
                                     for m in self.experts)}

    @property
    def active(self) -> bool:
        """True until ``restore()``: the model runs through this engine (afterwards its experts are not here)."""
        return not getattr(self, "_restored", False)

    def _check_active(self) -> None:
        if not self.active:
            raise ToolkitError("this offloaded engine was restored: run the model itself, or offload it again")

    def reset_stats(self) -> None:
        self._check_active()  # generate() starts here: a restored engine would report experts it no longer has
        self.device_counts.reset()
        for mod in self.experts:
            if mod.graph_pass is not None:
                mod.graph_pass.take_counts()
        self._stats.reset()
        self.device_rows = [0] * len(self.devices)
        self.device_copies = [0] * len(self.copy_devices)

    def __call__(self, *args, **kwargs):
        self._check_active()
        return self.model(*args, **kwargs)

    def to_dict(self) -> dict:
        d = self._to_dict()
        if self.spread:  # which expert lives on which device, and the counts per device
            d["devices"] = self.devices_dict()
            d["copy_devices"] = [str(x) for x in self.copy_devices]
            d["expert_devices"] = self.expert_devices.tolist()
        return d

    def _to_dict(self) -> dict:
        return {
            "gpu_experts": self.gpu_experts, "total_experts": self.n_layers * self.n_experts,
            "device": str(self.device), "policy": getattr(self.policy, "name", type(self.policy).__name__),
            "cpu_threads": self.cpu_threads, "worker_threads": self.options.worker_threads,
            "spare_cores": self.options.spare_cores, "cpu_dtype": dtype_name(self.cpu_dtype),
            "copy_slots": self.copy_slots,
            "cpu_kernel_tokens": getattr(self.cpu_linear, "tokens", 0),
            "overlap": self.executor is not None, "decision": self.decision, "serial": self.serial,
            "pageable_copies": self.pageable_copies, "split": self.split, "sync_free_layers": self.sync_free_layers,
            "fused": self.fused_dict(), "graph_misses": self.graph_misses_dict(),
            "host_memory": host_memory.describe(self.experts[0].host_gate_up if self.experts else None),
            "graphs": self.graphs.to_dict() if self.graphs is not None else None,
            "placement": self.placement.astype(int).tolist(),
            "cost_model": self.cost_model.to_dict(), "stats": self.stats.to_dict(),
        }

    def __enter__(self) -> Offloaded:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self):
        """Put the original experts modules and routers back; return the model (a second call does nothing)."""
        self._restored = True
        if self.graphs is not None:  # the graphs hold addresses of memory freed below
            self.graphs.restore()
            self.graphs = None
        for mod in self.experts:  # free the GPU tier first: the experts may be moving back to the GPU
            mod.gpu.clear()
            mod.stacked = None
            mod.graph_pass = None
            mod._pageable = None  # drop pageable clones
        self.pool = None
        self.pool_rows.clear()
        for slots in self._slots_on:  # the first device's list is ``_slots``: emptied too
            slots.clear()
        self._ahead.clear()
        if self.device.type == "cuda":
            for dev in dict.fromkeys(self.devices):
                torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
        for block, orig, gate, dev in zip(self._blocks, self._originals, self._orig_gates, self._orig_param_devices):
            block.experts = orig
            block.gate = gate
            if orig.gate_up_proj.device != dev:
                orig.to(dev)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.norms is not None:
            self.norms.restore()
            self.norms = None
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
        return self.model


def _check_fits(n_resident: int, copy_slots: int, expert_bytes: int, device: torch.device, margin: int = 1 << 30,
                leaving: int = 0):
    free, total = torch.cuda.mem_get_info(device)
    free += leaving
    need = (n_resident + copy_slots) * expert_bytes
    if need > free - margin:
        fit = max(0, (free - margin) // expert_bytes - copy_slots)
        raise ToolkitError(
            f"{n_resident} GPU experts + {copy_slots} copy slots need {need / 2**30:.2f} GiB "
            f"({expert_bytes / 2**20:.0f} MiB each) but {free / 2**30:.2f} GiB are free on {device} "
            f"(keeping a {margin / 2**30:.1f} GiB margin): at most {fit} GPU experts fit")


@torch.no_grad()
def offload(model, gpu_experts: int | str | None, device: str = "cuda", placement=None, policy=None,
            cost_model: CostModel | str | os.PathLike | None = None, routing=None, cpu_threads: int | None = None,
            copy_slots: int = 2, overlap: bool | None = None, *, decision: str = "makespan", serial: bool = False,
            pageable_copies: bool = False, split: bool = True, devices=None, devices_budget=None,
            ranking=None, graphs: bool | None = None, sync_free: bool = True, whole_step: bool = True,
            fused: bool = True, lookahead: bool = True,
            spread_copies: bool = True, contention: bool = True, cpu_kernel: bool = True,
            spare_cores: int = 0, graph_misses: bool = True) -> Offloaded:
    """Split the experts of ``model`` between the GPU (``gpu_experts`` of them in total, or "all") and the CPU.

    placement: bool [L, E] (which experts), numeric [L, E] (a popularity
    profile: the top ``gpu_experts``), a placement JSON path, or None (spread
    evenly). policy: a ``toolkit.moe.policies.Policy`` (or its name) deciding
    residency over time; default static. cost_model: a ``CostModel``, a
    calibration file, or None (calibrate once for these dims, cached per
    machine). routing: replay routing (``route(layer, hidden, phase)``).
    copy_slots: GPU staging buffers for copied experts. overlap: run CPU
    experts in a worker thread concurrently with GPU work (default: on CUDA).

    How missed experts are served (the peer schemes of ``toolkit.moe.baselines``):
    decision: "makespan" (cost model, default), "cpu", "copy", or "fiddler"
    (copy when tokens x 7 >= 70). serial: Fiddler's schedule, nothing
    overlaps. pageable_copies: copy from a pageable clone of the experts,
    blocking (as ``module.to(device)``); costs host memory for the clone.
    split: let the makespan decision split one expert per layer between the
    copy path and the CPU. graphs: replay the dense part of each decode step's
    layers from CUDA graphs (``toolkit.moe.graphs``; default: on with CUDA;
    ``generate`` then gives transformers a static KV cache). sync_free: a
    layer whose experts are all resident under a static placement chooses
    each row's expert on the device (the expert GEMV for decode rows, grouped
    GEMMs otherwise) without bringing its routing to the host (no sync; its
    counts stay on the device until the stats are read); False keeps the
    per-expert path with its one sync per layer. whole_step (default on): with
    graphs, a decode step whose layers are all sync-free is captured and
    replayed as one graph, the routing included: the decoder's whole forward
    where its inputs keep their shapes (as ``generate`` calls it), else every
    layer; False keeps a graph per layer part with the router eager between
    them (an ablation). fused (default on): on a CUDA device with Triton,
    the model's RMSNorms run as one kernel each (``toolkit.moe.norm``, each
    norm checked against its own forward before it is swapped) and a
    sync-free decode pass's experts as three (the gate/up GEMV with the
    activation folded in, the down GEMV with the routing weights and the sum
    over slots, and the counts); False keeps torch's ops (an ablation).
    lookahead (default on): in a
    long pass (prefill) start copying the next layer's missed experts into free
    staging slots while this layer computes (the makespan and copy decisions;
    with several devices over every link that takes copies); False waits for
    each layer's routing. contention (default
    on): the makespan decision plans a long pass's (prefill) CPU experts and
    copies at the speeds the calibration measured with both running
    (``CostModel.cpu_contention``; decode passes at their speeds alone,
    ``Offloaded.plan_model`` says why); False plans every pass at the speeds
    alone (an ablation). cpu_kernel (default on): CPU experts of a few tokens
    (decode) use ``toolkit.moe.cpu_gemv`` where the calibration measured it
    faster than torch's matmul (``CostModel.cpu_kernel_tokens``); False keeps
    torch's matmul and its times (an ablation). spare_cores (default 0): with
    overlap, the worker's CPU experts run on ``cpu_threads - spare_cores``
    threads, leaving those cores to the host thread's work between layers
    (``EngineOptions.spare_cores``; the ``-spare`` schedules of ``toolkit.moe.schedule``).
    graph_misses (default on): with graphs, a static placement on one device
    and the makespan decision (not serial), a one-token decode pass of a
    layer with missed experts needs nothing from the host
    (``toolkit.moe.graph_pass``): each missed expert is split at the
    calibration's balanced share, its GPU units read into a staging slot by
    one kernel (``toolkit.moe.share_copy``) and its other units computed by a host
    function at the same time, so the whole decode step is one graph (at
    batch 1). It takes a staging slot per expert of a token (``copy_slots``
    is raised to the router's top-k). ``Offloaded.graph_misses_dict()`` says
    whether it runs and, if not, why; False keeps the per-layer path (an
    ablation).

    Several devices of one host (``devices``, e.g. ["cuda:0", "cuda:1"]; the
    first is ``device``): the dense part stays on ``device``, the resident
    experts (``gpu_experts`` in all) spread over ``devices``: a resident
    expert's rows go to its device and its results come back (activations
    move, weights stay). devices_budget: at most this many experts per device
    (default: what fits in each device's free memory); the resident experts
    split evenly, each share capped by it (``toolkit.moe.memory.split_budget``). ranking: [L, E]
    popularity spreading each layer's busiest experts over the devices
    (``assign_devices``; default: a numeric placement, else expert order).
    Missed experts are served by the CPU or copied to a device: with
    spread_copies (default) to whichever device the makespan decision picks,
    each over its own host-to-device link with its own staging slots (two
    H200s of one host copy at 2 x 55 GB/s together), its rows moved there
    and its results back; without, to ``device`` only. Needs a static
    placement: a caching policy would move experts between devices.
    ``devices=None`` or one device: the one-device engine.
    """
    from ..env import resolve_device

    device = torch.device(resolve_device(device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    blocks = moe_blocks(model)
    if not blocks:
        raise ToolkitError(f"{type(model).__name__} has no MoE blocks with fused experts to offload")
    if any(isinstance(b.experts, OffloadedExperts) for b in blocks):
        raise ToolkitError("this model is already offloaded; call .restore() first")
    for b in blocks:
        if not is_experts_module(b.experts):
            raise ToolkitError(f"unsupported experts module {type(b.experts).__name__} (need fused gate_up_proj/down_proj)")
    first = blocks[0].experts
    n_layers, (n_experts, two_i, hidden) = len(blocks), first.gate_up_proj.shape
    dtype = first.gate_up_proj.dtype
    if copy_slots < 1:
        raise ToolkitError(f"copy_slots must be >= 1, got {copy_slots}")
    if decision not in DECISIONS:
        raise ToolkitError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    devices = _several_devices(devices, device)
    top_k = router_top_k(blocks)
    if graph_misses and devices is None and decision == "makespan" and not serial and (top_k or 0) > copy_slots:
        copy_slots = top_k  # a captured pass stages each of a token's missed experts in a slot of its own
    gpu_experts = _budget(gpu_experts, n_layers, n_experts)
    policy, resident = _initial_residency(placement, policy, gpu_experts, n_layers, n_experts)
    if gpu_experts is None:
        gpu_experts = int(resident.sum())
    if devices is not None and not str(getattr(policy, "name", "")).startswith("static"):
        raise ToolkitError(f"devices: several devices need a static placement, got policy "
                           f"{getattr(policy, 'name', type(policy).__name__)!r} (a cache would move experts)")
    cpu_threads = choose_threads(cpu_threads)
    spare_cores = _check_spare(spare_cores, cpu_threads)
    spread_copies = bool(spread_copies) and devices is not None and not serial  # staging slots on every device

    if cost_model is None:
        from .costs import calibrate

        cost_model = calibrate(hidden, two_i // 2, dtype, str(device), cpu_threads,
                               devices=None if devices is None else [str(d) for d in devices])
    elif not isinstance(cost_model, CostModel):
        from .costs import load_cost_model

        cost_model = load_cost_model(cost_model)
    # CPU experts in the calibrated faster dtype, but never less precise than the model
    cpu_dtype = getattr(torch, cost_model.cpu_dtype)
    if device.type == "cpu" or _PRECISION.get(cpu_dtype, 0) < _PRECISION.get(dtype, 0) or not _host_has_room(
            cpu_dtype, dtype, n_layers * n_experts * first.gate_up_proj[0].numel() * 3 // 2):
        cpu_dtype = dtype
    if dtype_name(cpu_dtype) != cost_model.cpu_dtype and dtype_name(cpu_dtype) in cost_model.cpu_ms_by_dtype:
        # decide with the CPU timings of the dtype the CPU experts will really use
        cost_model = dataclasses.replace(cost_model, cpu_dtype=dtype_name(cpu_dtype),
                                         cpu_ms=tuple(cost_model.cpu_ms_by_dtype[dtype_name(cpu_dtype)]))
    if not contention:
        cost_model = cost_model.without_contention()
    if not cpu_kernel:
        cost_model = cost_model.without_cpu_kernel()

    expert_bytes = 3 * (two_i // 2) * hidden * first.gate_up_proj.element_size()
    orig_devices = [b.experts.gate_up_proj.device for b in blocks]
    tiers = None
    if devices is not None:
        if ranking is None and placement is not None and not isinstance(placement, (str, os.PathLike, Path)) \
                and np.asarray(placement).dtype != bool:
            ranking = placement
        # staging slots per device: on the first, or on every one that takes copies
        slots = [copy_slots if i == 0 or spread_copies else 0 for i in range(len(devices))]
        shares = _device_shares(devices, devices_budget, int(resident.sum()), slots, expert_bytes, n_experts,
                                orig_devices)
        tiers = assign_devices(resident, shares, ranking)
        if device.type == "cuda":
            for i, dev in enumerate(devices):
                _check_fits(int((tiers == i).sum()), slots[i], expert_bytes, dev,
                            leaving=_leaving(dev, orig_devices, n_experts, expert_bytes))
    elif device.type == "cuda":
        _check_fits(int(resident.sum()), copy_slots, expert_bytes, device,
                    leaving=_leaving(device, orig_devices, n_experts, expert_bytes))
    for b in blocks:
        _to_host(b.experts, pinned=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if overlap is None:
        overlap = device.type == "cuda"
    if graphs is None:
        graphs = device.type == "cuda"
    options = EngineOptions(cpu_threads=cpu_threads, cpu_dtype=cpu_dtype, decision=decision, serial=bool(serial),
                            pageable_copies=bool(pageable_copies), split=bool(split), overlap=bool(overlap),
                            copy_slots=int(copy_slots), graphs=bool(graphs), sync_free=bool(sync_free),
                            whole_step=bool(whole_step), fused=bool(fused),
                            lookahead=bool(lookahead), spread_copies=spread_copies, contention=bool(contention),
                            cpu_kernel=bool(cpu_kernel), spare_cores=spare_cores, graph_misses=bool(graph_misses))
    off = Offloaded(model, blocks, policy=policy, resident=resident, device=device, cost_model=cost_model,
                    routing=routing, gpu_experts=gpu_experts, original_devices=orig_devices, options=options,
                    devices=devices, tiers=tiers)
    if any(p.device != device for p in model.parameters()):
        model.to(device)  # the dense part (the experts are no longer parameters of the model)
    if options.fused:
        off.norms = fuse_norms(model)  # on the device now: each norm checked there against its own forward
    return off


def router_top_k(blocks) -> int | None:
    """Experts per token of the MoE blocks' routers (every block the same), or None where they do not say."""
    ks = {getattr(b.gate, "top_k", None) or getattr(b, "top_k", None) for b in blocks}
    k = ks.pop() if len(ks) == 1 else None
    return int(k) if isinstance(k, int) and k > 0 else None


def _several_devices(devices, device: torch.device) -> list[torch.device] | None:
    """``devices`` as torch devices with ``device`` first, or None for one device (the one-device engine)."""
    from ..env import resolve_device

    if devices is None:
        return None
    if isinstance(devices, (str, torch.device)) or not len(devices):
        raise ToolkitError(f"devices must be a non-empty list of devices, got {devices!r}")
    out = []
    for d in devices:
        try:
            d = torch.device(resolve_device(str(d)))
        except ToolkitError as err:
            raise ToolkitError(f"devices: {err}") from None
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        if d.type == "cuda" and d.index >= torch.cuda.device_count():
            raise ToolkitError(f"devices: {d} does not exist ({torch.cuda.device_count()} CUDA devices)")
        out.append(d)
    if out[0] != device:
        raise ToolkitError(f"devices must start with device {device} (the dense part's), got {[str(d) for d in out]}")
    if any(d.type != device.type for d in out):
        raise ToolkitError(f"devices must all be of one kind, got {[str(d) for d in out]}")
    if device.type == "cuda" and len(set(out)) != len(out):
        raise ToolkitError(f"devices lists a GPU twice: {[str(d) for d in out]}")
    return out if len(out) > 1 else None


def _leaving(dev, orig_devices, n_experts: int, expert_bytes: int) -> int:
    """Bytes of the experts now on ``dev`` that offloading moves off it: free memory once they have gone."""
    return sum(n_experts * expert_bytes for d in orig_devices if d == dev)


def _device_shares(devices, devices_budget, n_resident: int, slots: list[int], expert_bytes: int,
                   n_experts: int, orig_devices) -> list[int]:
    """Experts per device: an even split of the resident ones, capped by ``devices_budget`` or what fits
    besides each device's ``slots`` staging slots."""
    from .memory import split_budget

    if devices_budget is not None:
        caps = list(devices_budget)
        if len(caps) != len(devices) or any(isinstance(n, bool) or int(n) != n or n < 0 for n in caps):
            raise ToolkitError(f"devices_budget must give {len(devices)} counts >= 0 (at most this many experts "
                               f"per device), got {caps}")
        try:
            return split_budget(n_resident, caps)
        except ToolkitError as err:
            raise ToolkitError(f"devices_budget: {err}") from None
    if devices[0].type != "cuda":  # both tiers host memory: nothing caps a share
        return split_budget(n_resident, [n_resident] * len(devices))
    caps = []
    for i, dev in enumerate(devices):
        free, _ = torch.cuda.mem_get_info(dev)
        free += _leaving(dev, orig_devices, n_experts, expert_bytes)
        caps.append(max(0, (free - (1 << 30)) // expert_bytes - slots[i]))
    return split_budget(n_resident, caps)


def _to_host(experts: nn.Module, pinned: bool) -> None:
    """Point the experts' weights at host memory (pinned for async copies); a GPU copy is freed."""
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name)
        if p.device.type == "cpu" and (p.is_pinned() or not pinned):
            continue
        host = host_memory.empty(p.shape, p.dtype) if pinned else torch.empty(p.shape, dtype=p.dtype)
        host.copy_(p.data)
        experts._parameters[name] = nn.Parameter(host, requires_grad=False)


def _host_has_room(cpu_dtype, dtype, n_params: int) -> bool:
    """Is there host memory for a second copy of all experts in ``cpu_dtype`` (with 10% headroom)?"""
    if cpu_dtype == dtype:
        return True
    try:
        import psutil

        return psutil.virtual_memory().available > 1.1 * n_params * torch.empty((), dtype=cpu_dtype).element_size()
    except ImportError:
        return False
