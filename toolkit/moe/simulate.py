"""Hit-rate simulator: replay a routing trace against a placement or caching policy, no GPU needed.

Shapes: N tokens (trace rows), G forward passes, L layers, E experts per layer, K top-k.

For each forward pass (trace step) and layer the experts used by >= 1 token are looked up in
the policy's residency at the start of the pass (hit = activation whose expert was resident),
then a caching policy applies its changes; the rules are those of ``toolkit.moe.policies``,
whose ``cache_step`` the compiled kernel calls, so ``simulate`` and an engine run with the
same policy object agree exactly. Static policies need no loop: a lookup per activation.

Speed: the kernels are compiled with numba (``cache=True``: the first call of a fresh install
compiles for a few seconds); a routing decision is one (token, layer) pair. Compiled code does
not see Ctrl-C until it returns, and then reports it as a ``SystemError``: ``simulate`` raises
it as the ``KeyboardInterrupt`` it is.
``fast=False`` drives the Policy objects pass by pass exactly as the engine does (slow; the
reference the tests compare against).

Several GPUs (``devices_budget``, at most this many experts per device): the resident experts
go to the devices by the engine's own rule (``device_tiers``: ``toolkit.moe.memory.split_budget``
then ``toolkit.moe.offload.assign_devices``), and the result also counts each device's hit rows,
the (token, expert) rows an engine run with the same devices computes there. Like the engine,
this needs a static placement: a cache would move experts between devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ToolkitError
from ..interrupts import surface_interrupt
from .phases import PHASES
from .policies import (
    BELADY_KIND,
    LFU,
    LFU_KIND,
    LRU,
    LRU_KIND,
    Belady,
    Policy,
    cache_step,
    get_policy,
    jit,
    next_uses,
)
from .trace_catalog import load_trace
from .traces import Trace


@dataclass(frozen=True)
class SimResult:
    """Hits and activations per phase and layer, expert copies, for one policy and budget."""

    policy: str
    gpu_experts: int
    hits: np.ndarray = field(repr=False)  # int64 [2, L]: prefill, decode
    activations: np.ndarray = field(repr=False)  # int64 [2, L]
    loads: np.ndarray = field(repr=False)  # int64 [2, L]: experts copied to the GPU
    bytes_per_expert: int | None = None
    trace: str | None = None
    device_hits: np.ndarray | None = field(default=None, repr=False)  # int64 [devices, 2, L]; None: one device
    device_experts: tuple[int, ...] | None = None  # resident experts per device
    devices_budget: tuple[int, ...] | None = None  # at most this many experts per device

    def hit_rate(self, phase: str | None = None) -> float:
        """Hits / activations over all layers (NaN when the phase has no activations)."""
        h, a = self._rows(phase)
        return float(h.sum() / a.sum()) if a.sum() else float("nan")

    def per_layer(self, phase: str | None = None) -> np.ndarray:
        """Hit rate per layer, float [L]."""
        h, a = self._rows(phase)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(a > 0, h / np.maximum(a, 1), np.nan)

    def _rows(self, phase):
        if phase is None:
            return self.hits.sum(0), self.activations.sum(0)
        if phase not in PHASES:
            raise ToolkitError(f"phase must be one of {PHASES}, got {phase!r}")
        i = PHASES.index(phase)
        return self.hits[i], self.activations[i]

    def device_rows(self, phase: str | None = None) -> np.ndarray | None:
        """Hit rows per device, int64 [devices] (what ``Offloaded.devices_dict()`` counts); None for one device."""
        if self.device_hits is None:
            return None
        if phase is None:
            return self.device_hits.sum((1, 2))
        if phase not in PHASES:
            raise ToolkitError(f"phase must be one of {PHASES}, got {phase!r}")
        return self.device_hits[:, PHASES.index(phase)].sum(1)

    def device_share(self, phase: str | None = None) -> np.ndarray | None:
        """Each device's share of the hit rows, float [devices] (NaN without hits); None for one device."""
        rows = self.device_rows(phase)
        if rows is None:
            return None
        return rows / rows.sum() if rows.sum() else np.full(len(rows), np.nan)

    @property
    def n_loads(self) -> int:
        return int(self.loads.sum())

    @property
    def bytes_copied(self) -> int | None:
        return None if self.bytes_per_expert is None else self.n_loads * int(self.bytes_per_expert)

    def devices_dict(self) -> list[dict] | None:
        """Per device: its budget, resident experts, hit rows (all, prefill, decode) and share; None for one device."""
        if self.device_hits is None:
            return None
        rows, pre, dec, share = (self.device_rows(), self.device_rows("prefill"), self.device_rows("decode"),
                                 self.device_share())
        return [{"device": d, "budget": self.devices_budget[d], "experts": self.device_experts[d],
                 "rows": int(rows[d]), "rows_prefill": int(pre[d]), "rows_decode": int(dec[d]),
                 "share": float(share[d])} for d in range(len(rows))]

    def to_dict(self) -> dict:
        d = {
            "policy": self.policy, "gpu_experts": self.gpu_experts, "trace": self.trace,
            "hit_rate": {"prefill": self.hit_rate("prefill"), "decode": self.hit_rate("decode"),
                         "total": self.hit_rate(), "per_layer": self.per_layer().tolist(),
                         "per_layer_decode": self.per_layer("decode").tolist()},
            "bytes_copied": self.bytes_copied, "expert_loads": self.n_loads,
            "bytes_per_expert": self.bytes_per_expert,
            "activations": {p: int(self.activations[i].sum()) for i, p in enumerate(PHASES)},
        }
        if self.device_hits is not None:
            d["devices_budget"] = list(self.devices_budget)
            d["devices"] = self.devices_dict()
        return d

    def __repr__(self) -> str:
        gb = "?" if self.bytes_copied is None else f"{self.bytes_copied / 1e9:.1f} GB"
        devices = "" if self.device_hits is None else f"; hit rows by device {self.device_rows().tolist()}"
        return (f"SimResult({self.policy}, gpu_experts={self.gpu_experts}: hit rate prefill "
                f"{self.hit_rate('prefill'):.3f}, decode {self.hit_rate('decode'):.3f}; "
                f"{self.n_loads} copies ({gb}){devices})")


@dataclass(frozen=True)
class Sweep:
    """Simulation results over budgets (and policies)."""

    results: tuple

    def to_dataframe(self):
        """One row per (policy, budget): hit rates, copies, bytes."""
        import pandas as pd

        rows = [{"policy": r.policy, "gpu_experts": r.gpu_experts, "hit_rate": r.hit_rate(),
                 "hit_rate_prefill": r.hit_rate("prefill"), "hit_rate_decode": r.hit_rate("decode"),
                 "expert_loads": r.n_loads, "bytes_copied": r.bytes_copied} for r in self.results]
        for row, r in zip(rows, self.results):
            if r.device_hits is not None:
                row["device_rows"] = r.device_rows().tolist()
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results]}

    def __iter__(self):
        return iter(self.results)

    def __len__(self):
        return len(self.results)


# ---- kernels (numba when available; identical plain Python otherwise) ----

@jit
def cache_kernel(kind, experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap):
    """Replay every pass and layer through ``cache_step``; returns hits, activations, loads [2, L]."""
    n, n_layers, k = experts.shape
    n_experts = resident.shape[1]
    last = np.full((n_layers, n_experts), -1, dtype=np.int64)
    freq = np.zeros((n_layers, n_experts), dtype=np.int64)
    hits = np.zeros((2, n_layers), dtype=np.int64)
    acts = np.zeros((2, n_layers), dtype=np.int64)
    loads = np.zeros((2, n_layers), dtype=np.int64)
    cnt = np.zeros(n_experts, dtype=np.int64)
    used = np.zeros(n_experts, dtype=np.int64)
    used_nxt = np.zeros(n_experts, dtype=np.int64)
    used_ncnt = np.zeros(n_experts, dtype=np.int64)
    hit = np.zeros(n_experts, dtype=np.bool_)
    load = np.zeros(n_experts, dtype=np.int64)
    evict = np.zeros(n_experts, dtype=np.int64)
    buf = np.zeros(n_experts, dtype=np.int64)
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        ph = phase[a]
        for layer in range(n_layers):
            n_used = 0
            for r in range(a, b):
                for j in range(k):
                    e = experts[r, layer, j]
                    if cnt[e] == 0:
                        used[n_used] = e
                        if kind == BELADY_KIND:  # only Belady has look-ahead tables
                            used_nxt[n_used] = nxt_tab[r, layer, j]
                            used_ncnt[n_used] = cnt_tab[r, layer, j]
                        n_used += 1
                    cnt[e] += 1
            n_load, n_evict = cache_step(kind, g, layer, used, used_nxt, used_ncnt, n_used, resident, last, freq,
                                         nxt, ncnt, cap[layer], hit, load, evict, buf)
            for i in range(n_used):
                e = used[i]
                acts[ph, layer] += cnt[e]
                if hit[i]:
                    hits[ph, layer] += cnt[e]
                cnt[e] = 0
            loads[ph, layer] += n_load
    return hits, acts, loads


# one compiled kernel per policy: with ``kind`` a constant the compiler drops the other policies'
# branches (about 1.7x faster than one kernel taking ``kind`` as an argument)
@jit
def lru_kernel(experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap):
    return cache_kernel(LRU_KIND, experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap)


@jit
def lfu_kernel(experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap):
    return cache_kernel(LFU_KIND, experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap)


@jit
def belady_kernel(experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap):
    return cache_kernel(BELADY_KIND, experts, phase, starts, nxt_tab, cnt_tab, resident, nxt, ncnt, cap)


KERNELS = {LRU_KIND: lru_kernel, LFU_KIND: lfu_kernel, BELADY_KIND: belady_kernel}


def _phase_rows(trace: Trace, mask: np.ndarray) -> np.ndarray:
    """Count activations per phase and layer where ``mask`` [N, L, K] holds: int64 [2, L]."""
    per_row = mask.sum(-1)  # [N, L]
    out = np.zeros((2, trace.n_layers), dtype=np.int64)
    for p in (0, 1):
        out[p] = per_row[trace.phase == p].sum(0)
    return out


def default_popularity(trace: Trace) -> np.ndarray:
    """The profile static placements use: the trace's calibration popularity if it has one, else its own counts."""
    pop = trace.meta.get("popularity")
    if pop is not None and np.shape(pop) == (trace.n_layers, trace.n_experts):
        return np.asarray(pop, dtype=np.float64)
    return trace.popularity().astype(np.float64)


def check_devices_budget(devices_budget) -> list[int]:
    """``devices_budget`` as whole counts >= 0, one per device, or a ToolkitError naming it."""
    if isinstance(devices_budget, str | bytes) or not hasattr(devices_budget, "__len__") or not len(devices_budget):
        raise ToolkitError(f"devices_budget must give one count >= 0 per device (at most this many experts on it), "
                           f"got {devices_budget!r}")
    caps = list(devices_budget)
    for n in caps:
        if isinstance(n, bool) or not isinstance(n, int | float | np.integer | np.floating) \
                or not float(n).is_integer() or n < 0:
            raise ToolkitError(f"devices_budget must give one whole count >= 0 per device (at most this many "
                               f"experts on it), got {caps}")
    return [int(n) for n in caps]


def device_tiers(resident: np.ndarray, devices_budget, ranking=None) -> np.ndarray:
    """Which device holds each resident expert, int [L, E] (-1: not resident), by the engine's rule.

    The resident experts split evenly over the devices, each share capped by
    ``devices_budget`` (``toolkit.moe.memory.split_budget``), and each layer's
    experts go round-robin in ``ranking`` order (``toolkit.moe.offload.assign_devices``),
    as ``offload(..., devices=..., devices_budget=..., ranking=...)`` places them.
    """
    from .memory import split_budget
    from .offload import assign_devices

    caps = check_devices_budget(devices_budget)
    resident = np.asarray(resident, dtype=bool)
    try:
        shares = split_budget(int(resident.sum()), caps)
    except ToolkitError as err:
        raise ToolkitError(f"devices_budget: {err}") from None
    tiers = assign_devices(resident, shares, ranking)
    held = np.bincount(tiers[tiers >= 0], minlength=len(caps))
    if any(h > c for h, c in zip(held, caps)):  # the rule caps every share; a placement may never exceed it
        raise ToolkitError(f"devices_budget: the placement puts {held.tolist()} experts on devices capped at {caps}")
    return tiers


def simulate(trace, policy, gpu_experts: int | None, popularity: np.ndarray | None = None,
             bytes_per_expert: int | None = None, fast: bool = True, devices_budget=None,
             ranking: np.ndarray | None = None) -> SimResult:
    """Hit rate (prefill / decode / per layer) and bytes copied for a trace, a policy and a GPU expert budget.

    ``trace``: a Trace, a name (``synthetic-mixtral``) or a path. ``policy``: a name or a Policy.
    ``popularity`` [L, E]: the profile for static-popularity placement and caches' initial
    residency (default ``default_popularity(trace)``). ``bytes_per_expert``: default from the trace.
    ``devices_budget`` (several GPUs, e.g. [14, 14]): at most this many experts per device;
    ``gpu_experts`` None means their sum (at most every expert); the result splits the hits over
    the devices (``device_tiers``, spreading each layer's experts in ``ranking`` [L, E] order,
    default the popularity profile, as ``toolkit.moe.run`` hands it to the engine). Needs a
    static policy, as the engine does.
    """
    trace = load_trace(trace)
    pol = get_policy(policy, trace=trace) if isinstance(policy, str) else policy
    if not isinstance(pol, Policy):
        raise ToolkitError(f"policy must be a name or a toolkit.moe.policies.Policy, got {type(policy).__name__}")
    if isinstance(pol, Belady) and pol.trace is not trace:
        raise ToolkitError("a Belady policy simulates only the trace it was built from")
    pop = default_popularity(trace) if popularity is None else popularity
    n_layers, n_experts = trace.n_layers, trace.n_experts
    caps = None
    if devices_budget is not None:
        caps = check_devices_budget(devices_budget)
        if not pol.static:
            raise ToolkitError(f"devices_budget: several devices need a static placement, got policy {pol.name!r} "
                               "(a cache would move experts between devices)")
        if gpu_experts is None:
            gpu_experts = min(sum(caps), n_layers * n_experts)
    elif gpu_experts is None:
        raise ToolkitError("gpu_experts is required unless devices_budget is given")
    resident = pol.reset(int(gpu_experts), n_layers, n_experts, pop)
    tiers = None if caps is None else device_tiers(resident, caps, pop if ranking is None else ranking)
    bpe = bytes_per_expert if bytes_per_expert is not None else trace.bytes_per_expert
    name = trace.meta.get("name") or trace.meta.get("source")

    if not fast:
        hits, acts, loads = _drive(trace, pol)
    elif pol.static:  # residency never changes: one lookup per activation
        hit = resident[np.arange(n_layers)[None, :, None], trace.experts]  # [N, L, K]
        hits, acts = _phase_rows(trace, hit), _phase_rows(trace, np.ones_like(hit))
        loads = np.zeros((2, n_layers), dtype=np.int64)
    elif type(pol) in (LRU, LFU, Belady):
        kind = {LRU: LRU_KIND, LFU: LFU_KIND, Belady: BELADY_KIND}[type(pol)]
        if kind == BELADY_KIND:  # reset() placed the experts used first
            nxt_tab, cnt_tab, first, first_cnt = next_uses(trace)
            nxt, ncnt = first.copy(), first_cnt.copy()
        else:
            nxt_tab = cnt_tab = np.zeros((1, 1, 1), dtype=np.int32)  # unused: LRU/LFU ignore next uses
            nxt = ncnt = np.zeros((n_layers, n_experts), dtype=np.int64)
        with surface_interrupt():  # Ctrl-C inside the compiled kernel comes back as a SystemError
            hits, acts, loads = KERNELS[kind](trace.experts, trace.phase, trace.step_starts(), nxt_tab, cnt_tab,
                                              resident.copy(), nxt, ncnt, pol.cap)
    else:  # a user's own Policy subclass: drive it like the engine does
        hits, acts, loads = _drive(trace, pol)
    if tiers is None:
        return SimResult(pol.name, int(gpu_experts), hits, acts, loads, bpe, name)
    where = tiers[np.arange(n_layers)[None, :, None], trace.experts]  # [N, L, K] device of each activation, -1: miss
    by_device = np.stack([_phase_rows(trace, where == d) for d in range(len(caps))])  # [devices, 2, L]
    held = np.bincount(tiers[tiers >= 0], minlength=len(caps))
    return SimResult(pol.name, int(gpu_experts), hits, acts, loads, bpe, name, by_device,
                     tuple(int(n) for n in held), tuple(caps))


def _drive(trace: Trace, pol: Policy):
    """Reference path: call ``pol.step`` per pass and layer, as the engine does (after ``reset``)."""
    n_layers = trace.n_layers
    hits = np.zeros((2, n_layers), dtype=np.int64)
    acts = np.zeros((2, n_layers), dtype=np.int64)
    loads = np.zeros((2, n_layers), dtype=np.int64)
    starts = trace.step_starts()
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        ph = int(trace.phase[a])
        for layer in range(n_layers):
            used, counts = np.unique(trace.experts[a:b, layer], return_counts=True)
            hit, load, evict = pol.step(layer, used)
            hits[ph, layer] += int(counts[hit].sum())
            acts[ph, layer] += int(counts.sum())
            loads[ph, layer] += len(load)
    return hits, acts, loads


def sweep(trace, policy, budgets=None, **kw) -> Sweep:
    """``simulate`` over budgets (default every multiple of L up to L x E, or up to the sum of a
    ``devices_budget`` in ``kw``) and one or more policies."""
    trace = load_trace(trace)
    if budgets is None:
        top = trace.n_layers * trace.n_experts
        if kw.get("devices_budget") is not None:
            top = min(top, sum(check_devices_budget(kw["devices_budget"])))
        budgets = range(0, top + 1, trace.n_layers)
    policies = [policy] if isinstance(policy, (str, Policy)) else list(policy)
    return Sweep(tuple(simulate(trace, p, int(b), **kw) for p in policies for b in budgets))


def decisions(trace) -> int:
    """Routing decisions in a trace: (token, layer) pairs."""
    trace = load_trace(trace)
    return trace.n_tokens * trace.n_layers


__all__ = ["SimResult", "Sweep", "simulate", "sweep", "default_popularity", "decisions", "device_tiers",
           "check_devices_budget"]
