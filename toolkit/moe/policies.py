"""Placement and caching policies for offloaded experts: static (Fiddler popularity, uniform), LRU, LFU, Belady.

One interface serves the engine (``offload(..., policy=...)``) and the simulator::

    resident = policy.reset(budget, n_layers, n_experts, popularity)  # bool [L, E]
    hits, load, evict = policy.step(layer, used)  # once per forward pass and MoE layer

Definitions, shared with ``toolkit.moe.simulate`` (which must give identical numbers):

- ``used``: the experts of one layer that got >= 1 token in this forward pass.
- hit: an activation (token, layer, expert) whose expert was resident at the start of the pass.
- Budget: ``StaticPopularity`` keeps the global top-``budget`` experts by popularity (Fiddler);
  every other policy gives each layer ``budget // L`` slots, the remainder to the first layers.
  Caching policies start from the layer's most popular experts (or the uniform spread).
- LRU / LFU copy each missed expert in after the pass and keep it (as mixtral-offloading does),
  evicting within the layer's slots the least recently used (LRU) or the one used in the fewest
  passes (LFU, ties LRU); an expert used in this pass is never evicted by it. When more experts
  miss than slots can take, the ones with the highest keep-priority are copied.
- Belady (the oracle, needs the trace): after each pass the layer keeps, among its resident and
  just-used experts, those whose next use is soonest (ties: more tokens at that next use, then
  already resident); an expert that is never used again is not copied in. It is optimal when a
  hit counts once per (pass, layer, expert), e.g. batch-1 decoding, so it bounds LRU and LFU
  there; with many tokens per pass (prefill) hits are weighted by tokens and the rule is not
  provably optimal (on small random traces it fell a few activations below LRU or LFU in <1% of cases).
- Every remaining tie keeps the lower expert index, so results are deterministic.

A placement file is JSON: ``{"format": "toolkit-placement", "version": 1, "n_layers": L,
"n_experts": E, "budget": B, "resident": [[expert ids of layer 0], ...], "meta": {...}}``.

The per-pass cache update (``cache_step``) is compiled with numba when it is installed and is
the very function the simulator's kernel calls, so the engine and the simulator agree by
construction; without numba the same code runs as plain Python. Belady's look-ahead tables
(``next_uses``) live here too, beside the policy that reads them; the simulator reuses them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ToolkitError

try:  # numba makes the simulator fast; the plain-Python path gives identical results
    import numba

    HAVE_NUMBA = True

    def jit(fn):
        return numba.njit(cache=True, nogil=True)(fn)

except ImportError:  # pragma: no cover - depends on the environment
    HAVE_NUMBA = False

    def jit(fn):
        fn.py_func = fn
        return fn


LRU_KIND, LFU_KIND, BELADY_KIND = 0, 1, 2
NEVER = np.iinfo(np.int32).max  # "next use" of an expert that is not used again

POLICY_NAMES = ("static-popularity", "static-uniform", "lru", "lfu", "belady")
_ALIASES = {"popularity": "static-popularity", "fiddler": "static-popularity", "static": "static-popularity",
            "uniform": "static-uniform"}


# ---- the per-pass cache update, shared by the Policy classes and the simulator kernel ----

@jit
def _keep_first(kind, layer, a, b, resident, last, freq, nxt, ncnt):
    """True when expert ``a`` of ``layer`` should be kept rather than expert ``b`` ([L, E] state)."""
    if kind == BELADY_KIND:
        if nxt[layer, a] != nxt[layer, b]:
            return nxt[layer, a] < nxt[layer, b]
        if ncnt[layer, a] != ncnt[layer, b]:
            return ncnt[layer, a] > ncnt[layer, b]
    else:
        if kind == LFU_KIND and freq[layer, a] != freq[layer, b]:
            return freq[layer, a] > freq[layer, b]
        if last[layer, a] != last[layer, b]:
            return last[layer, a] > last[layer, b]
    if resident[layer, a] != resident[layer, b]:
        return resident[layer, a]  # already there: keeping it costs no copy
    return a < b


@jit
def cache_step(kind, t, layer, used, used_nxt, used_ncnt, n, resident, last, freq, nxt, ncnt, cap, hit, load, evict, buf):
    """Apply forward pass ``t`` of ``layer`` to the cache state ([L, E] arrays, updated in place).

    The one cache update of LRU, LFU and Belady (``kind``: ``LRU_KIND``, ``LFU_KIND``,
    ``BELADY_KIND``), called by the ``Policy`` classes in the engine and by the simulator's
    compiled kernel (``toolkit.moe.simulate``), which is why both give identical numbers.

    used[:n]: experts with >= 1 token; used_nxt/used_ncnt[:n]: (Belady) their next-use pass and
    token count there. State, [L, E] each: resident (bool), last (last pass used), freq (passes
    used), nxt/ncnt (Belady: next use and its token count); cap: the layer's slots.
    Writes hit[:n], load[:n_load], evict[:n_evict]; returns (n_load, n_evict). buf [E] is scratch.
    Whole arrays and indices are passed, not row views, to keep the compiled loop free of overhead.
    """
    n_experts = resident.shape[1]
    n_res = 0
    for e in range(n_experts):
        if resident[layer, e]:
            n_res += 1
    n_miss = 0
    for i in range(n):
        e = used[i]
        hit[i] = resident[layer, e]
        last[layer, e] = t
        freq[layer, e] += 1
        nxt[layer, e] = used_nxt[i]
        ncnt[layer, e] = used_ncnt[i]
        if not resident[layer, e]:
            # insertion sort of the misses, best to keep first (n <= E is small)
            j = n_miss
            while j > 0 and _keep_first(kind, layer, e, buf[j - 1], resident, last, freq, nxt, ncnt):
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = e
            n_miss += 1
    n_load = 0
    n_evict = 0
    for i in range(n_miss):
        m = buf[i]
        if kind == BELADY_KIND and nxt[layer, m] == NEVER:
            break  # misses are sorted: the rest are never used again either
        if n_res < cap:
            resident[layer, m] = True
            load[n_load] = m
            n_load += 1
            n_res += 1
            continue
        v = -1  # the resident expert least worth keeping
        for e in range(n_experts):
            if not resident[layer, e] or (kind != BELADY_KIND and last[layer, e] == t):
                continue  # LRU/LFU never evict an expert used in this pass
            if v < 0 or _keep_first(kind, layer, v, e, resident, last, freq, nxt, ncnt):
                v = e
        if v < 0 or not _keep_first(kind, layer, m, v, resident, last, freq, nxt, ncnt):
            break  # nothing evictable is worth less than the best remaining miss
        resident[layer, v] = False
        evict[n_evict] = v
        n_evict += 1
        resident[layer, m] = True
        load[n_load] = m
        n_load += 1
    return n_load, n_evict


# ---- budgets and initial placements ----

def split_budget(budget: int, n_layers: int, n_experts: int) -> np.ndarray:
    """Slots per layer: budget // L each, the remainder to the first layers (int64 [L])."""
    budget = int(budget)
    if not 0 <= budget <= n_layers * n_experts:
        raise ToolkitError(f"GPU expert budget must be between 0 and {n_layers * n_experts} "
                           f"({n_layers} layers x {n_experts} experts), got {budget}")
    cap = np.full(n_layers, budget // n_layers, dtype=np.int64)
    cap[: budget % n_layers] += 1
    return cap


def uniform_placement(budget: int, n_layers: int, n_experts: int) -> np.ndarray:
    """Even spread: layer layer holds cap[layer] experts, rotating so every expert index is used equally."""
    cap = split_budget(budget, n_layers, n_experts)
    resident = np.zeros((n_layers, n_experts), dtype=bool)
    start = 0
    for layer, c in enumerate(cap):
        resident[layer, (start + np.arange(c)) % n_experts] = True
        start += int(c)
    return resident


def popularity_placement(budget: int, popularity: np.ndarray) -> np.ndarray:
    """Fiddler: the global top-``budget`` experts by popularity (ties: lower layer, then expert)."""
    pop = check_popularity(popularity, *np.shape(popularity))
    split_budget(budget, *pop.shape)  # range check
    order = np.argsort(-pop.ravel(), kind="stable")[: int(budget)]
    resident = np.zeros(pop.size, dtype=bool)
    resident[order] = True
    return resident.reshape(pop.shape)


def _per_layer_top(cap: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Each layer's cap[layer] most popular experts (ties: lower index)."""
    resident = np.zeros(popularity.shape, dtype=bool)
    for layer, c in enumerate(cap):
        resident[layer, np.argsort(-popularity[layer], kind="stable")[:c]] = True
    return resident


def check_popularity(popularity, n_layers: int, n_experts: int, name: str = "popularity") -> np.ndarray:
    """A popularity profile as float64 [L, E], or a ToolkitError naming ``name``: NaN would rank arbitrarily."""
    try:
        pop = np.asarray(popularity, dtype=np.float64)
    except (TypeError, ValueError):
        raise ToolkitError(f"{name} must be numbers per (layer, expert), got {popularity!r:.60}") from None
    if pop.shape != (n_layers, n_experts):
        raise ToolkitError(f"{name} must have shape [layers, experts] = ({n_layers}, {n_experts}), "
                           f"got {pop.shape}")
    if not np.all(np.isfinite(pop)) or np.any(pop < 0):
        raise ToolkitError(f"{name} must be finite and non-negative (a popularity profile)")
    return pop


# ---- the policies ----

class Policy:
    """Base class: which experts of each layer are on the GPU, and how that changes per pass."""

    name = "policy"
    static = False  # True: residency never changes, so the simulator may skip the pass-by-pass loop

    def reset(self, budget: int, n_layers: int, n_experts: int, popularity: np.ndarray | None = None) -> np.ndarray:
        """Start a run; returns the initial residency, bool [L, E]."""
        raise NotImplementedError

    def step(self, layer: int, used) -> tuple[np.ndarray, list[int], list[int]]:
        """One forward pass of ``layer``: (hit mask over ``used``, experts to copy in, experts to drop)."""
        used = np.asarray(used, dtype=np.int64).reshape(-1)
        return self._resident[layer][used], [], []

    def resident(self, layer: int) -> np.ndarray:
        """Current residency of one layer, bool [E] (a copy)."""
        return self._resident[layer].copy()

    @property
    def placement(self) -> np.ndarray:
        """Current residency of every layer, bool [L, E] (a copy)."""
        return self._resident.copy()

    def __repr__(self) -> str:
        budget = getattr(self, "budget", None)
        return f"{type(self).__name__}(budget={budget})"


class StaticPopularity(Policy):
    """Fiddler: the globally most popular experts stay on the GPU, the rest run on the CPU."""

    name = "static-popularity"
    static = True

    def __init__(self, popularity: np.ndarray | None = None):
        self.popularity = None if popularity is None else np.asarray(popularity, dtype=np.float64)

    def reset(self, budget, n_layers, n_experts, popularity=None):
        pop = popularity if popularity is not None else self.popularity
        if pop is None:
            raise ToolkitError("static-popularity needs a popularity profile [layers, experts] "
                               "(from a trace or toolkit.moe.synthetic.real_popularity())")
        pop = check_popularity(pop, n_layers, n_experts)
        self.budget = int(budget)
        self._resident = popularity_placement(budget, pop)
        return self._resident.copy()


class StaticUniform(Policy):
    """The same number of GPU experts in every layer, spread evenly over expert indices."""

    name = "static-uniform"
    static = True

    def reset(self, budget, n_layers, n_experts, popularity=None):
        self.budget = int(budget)
        self._resident = uniform_placement(budget, n_layers, n_experts)
        return self._resident.copy()


class _Cache(Policy):
    """Shared state of the caching policies: per-layer rows updated by ``cache_step``."""

    kind = LRU_KIND

    def reset(self, budget, n_layers, n_experts, popularity=None):
        self.budget = int(budget)
        self.cap = split_budget(budget, n_layers, n_experts)
        if popularity is not None:
            self._resident = _per_layer_top(self.cap, check_popularity(popularity, n_layers, n_experts))
        else:
            self._resident = uniform_placement(budget, n_layers, n_experts)
        self._last = np.full((n_layers, n_experts), -1, dtype=np.int64)
        self._freq = np.zeros((n_layers, n_experts), dtype=np.int64)
        self._nxt = np.zeros((n_layers, n_experts), dtype=np.int64)
        self._ncnt = np.zeros((n_layers, n_experts), dtype=np.int64)
        self._t = np.zeros(n_layers, dtype=np.int64)  # passes seen per layer
        return self._resident.copy()

    def _next_uses(self, layer: int, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.zeros(len(used), dtype=np.int64)
        return z, z

    def step(self, layer, used):
        used = np.asarray(used, dtype=np.int64).reshape(-1)
        n_experts = self._resident.shape[1]
        if len(np.unique(used)) != len(used) or (len(used) and not 0 <= used.min() <= used.max() < n_experts):
            raise ToolkitError(f"used experts must be distinct indices in [0, {n_experts}), got {used.tolist()}")
        nxt, ncnt = self._next_uses(layer, used)
        hit = np.zeros(len(used), dtype=bool)
        load = np.zeros(n_experts, dtype=np.int64)
        evict = np.zeros(n_experts, dtype=np.int64)
        buf = np.zeros(n_experts, dtype=np.int64)
        n_load, n_evict = cache_step(self.kind, self._t[layer], layer, used, nxt, ncnt, len(used), self._resident,
                                     self._last, self._freq, self._nxt, self._ncnt, self.cap[layer],
                                     hit, load, evict, buf)
        self._t[layer] += 1
        return hit, load[:n_load].tolist(), evict[:n_evict].tolist()


class LRU(_Cache):
    """Copy every missed expert in and keep it; evict the least recently used."""

    name = "lru"
    kind = LRU_KIND


class LFU(_Cache):
    """Copy every missed expert in and keep it; evict the one used in the fewest passes (ties LRU)."""

    name = "lfu"
    kind = LFU_KIND


# ---- Belady's look-ahead: when each expert is used next ----

@jit
def next_uses_kernel(experts, starts, n_experts):
    """Backward pass: for every activation the next pass using the same (layer, expert) and its token
    count there (NEVER, 0 if none), plus each (layer, expert)'s first use: [N, L, K] x2, [L, E] x2."""
    n, n_layers, k = experts.shape
    nxt_tab = np.empty((n, n_layers, k), dtype=np.int32)
    cnt_tab = np.empty((n, n_layers, k), dtype=np.int32)
    cur = np.full((n_layers, n_experts), NEVER, dtype=np.int64)
    cur_cnt = np.zeros((n_layers, n_experts), dtype=np.int64)
    cnt = np.zeros(n_experts, dtype=np.int64)
    for g in range(len(starts) - 2, -1, -1):
        a, b = starts[g], starts[g + 1]
        for layer in range(n_layers):
            for r in range(a, b):
                for j in range(k):
                    cnt[experts[r, layer, j]] += 1
            for r in range(a, b):
                for j in range(k):
                    e = experts[r, layer, j]
                    nxt_tab[r, layer, j] = cur[layer, e]
                    cnt_tab[r, layer, j] = cur_cnt[layer, e]
            for r in range(a, b):
                for j in range(k):
                    e = experts[r, layer, j]
                    if cnt[e] > 0:
                        cur[layer, e] = g
                        cur_cnt[layer, e] = cnt[e]
                        cnt[e] = 0
    return nxt_tab, cnt_tab, cur, cur_cnt


def next_uses(trace):
    """Belady's look-ahead tables for a ``toolkit.moe.traces.Trace`` (cached on it): ``next_uses_kernel``'s four."""
    cached = trace.__dict__.get("_next_uses")
    if cached is None:
        from ..interrupts import surface_interrupt

        with surface_interrupt():  # Ctrl-C inside compiled code comes back as a SystemError
            cached = next_uses_kernel(trace.experts, trace.step_starts(), trace.n_experts)
        trace.__dict__["_next_uses"] = cached
    return cached


class Belady(_Cache):
    """Oracle: knows the trace, keeps the experts whose next use is soonest (an upper bound).

    In the engine it only makes sense while the forward passes replay ``trace`` from its start
    (``TraceRouter`` with batch 1); a pass whose experts differ from the trace raises.
    """

    name = "belady"
    kind = BELADY_KIND

    def __init__(self, trace):
        self.trace = trace
        self._starts = trace.step_starts()
        self._tab_nxt, self._tab_ncnt, self._first, self._first_cnt = next_uses(trace)

    def reset(self, budget, n_layers, n_experts, popularity=None):
        if (n_layers, n_experts) != (self.trace.n_layers, self.trace.n_experts):
            raise ToolkitError(f"Belady was built for a trace of {self.trace.n_layers} layers x "
                               f"{self.trace.n_experts} experts, not {n_layers} x {n_experts}")
        super().reset(budget, n_layers, n_experts)
        self._nxt[:] = self._first
        self._ncnt[:] = self._first_cnt
        self._resident[:] = belady_initial(self.cap, self._first, self._first_cnt)
        return self._resident.copy()

    def _next_uses(self, layer, used):
        g = int(self._t[layer])
        if g >= len(self._starts) - 1:
            raise ToolkitError(f"Belady: layer {layer} ran more forward passes than the trace has ({g})")
        a, b = self._starts[g], self._starts[g + 1]
        ex = self.trace.experts[a:b, layer].reshape(-1)
        if not np.array_equal(np.unique(ex), np.sort(used)):
            raise ToolkitError(f"Belady: forward pass {g} of layer {layer} used experts {sorted(used.tolist())}, "
                               f"the trace says {np.unique(ex).tolist()}; replay the trace from its start")
        idx = np.array([np.flatnonzero(ex == e)[0] for e in used], dtype=np.int64)
        return (self._tab_nxt[a:b, layer].reshape(-1)[idx].astype(np.int64),
                self._tab_ncnt[a:b, layer].reshape(-1)[idx].astype(np.int64))


def belady_initial(cap: np.ndarray, first: np.ndarray, first_cnt: np.ndarray) -> np.ndarray:
    """Belady's start: per layer the cap[layer] experts used soonest (ties: more tokens, lower index)."""
    n_layers, n_experts = first.shape
    resident = np.zeros((n_layers, n_experts), dtype=bool)
    for layer in range(n_layers):
        order = np.lexsort((np.arange(n_experts), -first_cnt[layer], first[layer]))
        resident[layer, order[: cap[layer]]] = True
    return resident


def get_policy(name: str, **kw) -> Policy:
    """A policy by name: static-popularity, static-uniform, lru, lfu, belady (needs trace=...)."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key == "static-popularity":
        return StaticPopularity(kw.get("popularity"))
    if key == "static-uniform":
        return StaticUniform()
    if key == "lru":
        return LRU()
    if key == "lfu":
        return LFU()
    if key == "belady":
        if kw.get("trace") is None:
            raise ToolkitError("the belady policy is an oracle: it needs the routing trace (trace=...)")
        return Belady(kw["trace"])
    raise ToolkitError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


# ---- placement files ----

def save_placement(path, resident: np.ndarray, meta: dict | None = None) -> Path:
    """Write which experts are resident (bool [L, E]) as a placement JSON file."""
    from ..results import save_json

    resident = np.asarray(resident, dtype=bool)
    if resident.ndim != 2:
        raise ToolkitError(f"a placement is a bool array [layers, experts], got shape {resident.shape}")
    return save_json({
        "format": "toolkit-placement", "version": 1,
        "n_layers": resident.shape[0], "n_experts": resident.shape[1], "budget": int(resident.sum()),
        "resident": [np.flatnonzero(row).tolist() for row in resident],
        "meta": meta or {},
    }, path)


def load_placement(path) -> np.ndarray:
    """Read a placement JSON file into a bool array [L, E]; a bad file raises ToolkitError."""
    from ..results import load_json

    doc = load_json(path)
    try:
        if doc.get("format") != "toolkit-placement" or doc.get("version") != 1:
            raise ValueError("not a toolkit-placement version 1 file")
        n_layers, n_experts = int(doc["n_layers"]), int(doc["n_experts"])
        rows = doc["resident"]
        if len(rows) != n_layers:
            raise ValueError(f"{len(rows)} layers listed, header says {n_layers}")
        resident = np.zeros((n_layers, n_experts), dtype=bool)
        for layer, ids in enumerate(rows):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and not (0 <= ids.min() and ids.max() < n_experts):
                raise ValueError(f"layer {layer} lists an expert outside [0, {n_experts})")
            resident[layer, ids] = True
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ToolkitError(f"{path} is not a valid placement file ({e})") from None
    return resident
