"""Routing traces: the format, recording from the engine, replay, and a synthetic Mixtral generator.

Shapes: N tokens (trace rows), L layers, E experts per layer, K experts per token (top-k).

A trace row is one token: ``experts[N, L, K]`` (int16, first = largest routing weight),
``weights[N, L, K]`` (float16/32), ``step[N]`` (int32, the forward-pass index: all prompt tokens
of a sequence share their prefill step; non-decreasing), ``phase[N]`` (uint8, 0 prefill,
1 decode; one phase per step) and optionally ``seq[N]`` (int32 sequence id, for locality
statistics between consecutive tokens).

File format (``save_trace`` / ``load_trace``), version 1: an ``.npz`` archive (compressed, no
pickles) with arrays ``experts``, ``weights``, ``step``, ``phase``, optional ``seq``, and
``header``: UTF-8 JSON bytes (uint8 array) holding::

    {"format": "toolkit-trace", "version": 1, "n_tokens": N, "n_layers": L, "n_experts": E,
     "top_k": K, "hidden_size": D, "intermediate_size": I, "bytes_per_expert": ...,
     "source": "...", ...free-form meta}

A file that is not such an archive, or whose arrays disagree with its header, raises
``ToolkitError``.

Synthetic traces (``synthetic_mixtral``) are calibrated to real Mixtral-8x7B statistics shipped in
``data/routing/`` (see its README): per layer, the pair (first, second expert) of a token is drawn
from a Plackett-Luce model whose selection frequencies equal the measured expert popularity, and
consecutive tokens of a sequence are linked by a Markov chain that keeps that distribution
exactly. Each token either keeps the previous first expert and redraws the second from its
conditional (probability x), keeps the second and redraws the first (y), jumps to a pair disjoint
from the previous one (v, Metropolis-corrected), or draws afresh. The rates are linear in
(x, y, v), so per layer they are solved so the expected same-first-expert and shared-expert rates
equal the midpoints of the ranges published for layers 0, 15 and 31 (Jiang et al. 2024),
linearly interpolated in between (layer 31 needs the disjoint move: its first expert repeats
often, yet its top-2 sets overlap barely more than at random). Routing weights are placeholders
(w1 ~ U(0.5, 0.95), w2 = 1 - w1): they do not affect hit rates.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ToolkitError

FORMAT, VERSION = "toolkit-trace", 1
PREFILL, DECODE = 0, 1
PHASES = ("prefill", "decode")

DATA_DIR = Path(os.environ.get("TOOLKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))
ROUTING_DIR = DATA_DIR / "routing"
TRACES_DIR = DATA_DIR / "traces"

# Mixtral-8x7B: hidden 4096, intermediate 14336, bf16; an expert is w1, w3 [I, D] and w2 [D, I]
MIXTRAL_DIMS = {"hidden_size": 4096, "intermediate_size": 14336, "dtype_bytes": 2}
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2

# Jiang et al., "Mixtral of Experts", arXiv 2401.04088, routing analysis on The Pile (ranges over
# its subsets): layer -> ((same first-choice expert low, high), (>= 1 shared top-2 expert low, high))
PUBLISHED_LOCALITY = {
    0: ((0.136, 0.149), (0.449, 0.499)),
    15: ((0.236, 0.284), (0.616, 0.670)),
    31: ((0.197, 0.263), (0.445, 0.536)),
}

TRACE_NAMES = ("synthetic-mixtral", "synthetic-mixtral-instruct")
_HEADER_SHAPE_KEYS = ("format", "version", "n_tokens", "n_layers", "top_k")


@dataclass
class Trace:
    """Per token and MoE layer: the chosen experts, their weights, the forward pass and the phase."""

    experts: np.ndarray  # int16 [N, L, K]
    weights: np.ndarray  # float16/32 [N, L, K]
    step: np.ndarray  # int32 [N]
    phase: np.ndarray  # uint8 [N]
    meta: dict = field(default_factory=dict)
    seq: np.ndarray | None = None  # int32 [N]

    def __post_init__(self):
        ex = np.asarray(self.experts)
        if ex.ndim != 3 or ex.shape[0] == 0:
            raise ToolkitError(f"trace experts must be a non-empty [tokens, layers, top_k] array, got {ex.shape}")
        n, n_layers, k = ex.shape
        if not np.issubdtype(ex.dtype, np.integer):
            raise ToolkitError(f"trace experts must be integers, got {ex.dtype}")
        n_experts = int(self.meta.get("n_experts", int(ex.max()) + 1))
        if ex.min() < 0 or ex.max() >= n_experts:
            raise ToolkitError(f"trace experts must lie in [0, {n_experts}), found [{ex.min()}, {ex.max()}]")
        if k > 1 and np.any(np.diff(np.sort(ex, axis=-1), axis=-1) == 0):
            raise ToolkitError("a token lists the same expert twice in one layer")
        self.experts = ex.astype(np.int16)
        w = np.asarray(self.weights)
        if w.shape != ex.shape:
            raise ToolkitError(f"trace weights {w.shape} do not match experts {ex.shape}")
        self.weights = w if w.dtype in (np.float16, np.float32) else w.astype(np.float32)
        self.step = np.asarray(self.step).astype(np.int32).reshape(-1)
        self.phase = np.asarray(self.phase).astype(np.uint8).reshape(-1)
        if self.step.shape != (n,) or self.phase.shape != (n,):
            raise ToolkitError(f"trace step {self.step.shape} and phase {self.phase.shape} must have {n} rows")
        if np.any(np.diff(self.step) < 0):
            raise ToolkitError("trace steps must be non-decreasing (rows in forward-pass order)")
        if self.phase.max() > DECODE:
            raise ToolkitError("trace phase must be 0 (prefill) or 1 (decode)")
        starts = self.step_starts()
        if np.any(np.maximum.reduceat(self.phase, starts[:-1]) != np.minimum.reduceat(self.phase, starts[:-1])):
            raise ToolkitError("every forward pass (step) of a trace must have a single phase")
        if self.seq is not None:
            self.seq = np.asarray(self.seq).astype(np.int32).reshape(-1)
            if self.seq.shape != (n,):
                raise ToolkitError(f"trace seq {self.seq.shape} must have {n} rows")
        self.meta = dict(self.meta)
        self.meta["n_experts"] = n_experts

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def n_experts(self) -> int:
        return int(self.meta["n_experts"])

    @property
    def n_steps(self) -> int:
        return len(self.step_starts()) - 1

    @property
    def bytes_per_expert(self) -> int | None:
        """Bytes of one expert's weights, from the meta (explicit, or from hidden/intermediate sizes)."""
        if self.meta.get("bytes_per_expert") is not None:
            return int(self.meta["bytes_per_expert"])
        m = self.meta
        if m.get("hidden_size") and m.get("intermediate_size"):
            return 3 * int(m["hidden_size"]) * int(m["intermediate_size"]) * int(m.get("dtype_bytes", 2))
        return None

    def step_starts(self) -> np.ndarray:
        """Row offsets of the forward passes: pass g is rows [starts[g], starts[g + 1]) (int64 [G + 1])."""
        cached = self.__dict__.get("_starts")
        if cached is None or cached[-1] != len(self.step):
            change = np.flatnonzero(np.diff(self.step)) + 1
            cached = np.concatenate([[0], change, [len(self.step)]]).astype(np.int64)
            self.__dict__["_starts"] = cached
        return cached

    def popularity(self, phase: str | None = None) -> np.ndarray:
        """Activations per layer and expert, int64 [L, E] (all phases, or one)."""
        ex = self.experts if phase is None else self.experts[self.phase == _phase_code(phase)]
        n_layers, n_experts = self.n_layers, self.n_experts
        flat = (np.arange(n_layers)[None, :, None] * n_experts + ex.astype(np.int64)).ravel()
        return np.bincount(flat, minlength=n_layers * n_experts).reshape(n_layers, n_experts)

    def locality(self) -> dict:
        """Per layer, over consecutive tokens of a sequence: same first expert, >= 1 shared expert."""
        return locality(self.experts, self.seq)

    def __repr__(self) -> str:
        n_pre = int(np.sum(self.phase == PREFILL))
        return (f"Trace({self.n_tokens} tokens ({n_pre} prefill), {self.n_steps} passes, "
                f"L={self.n_layers}, E={self.n_experts}, K={self.top_k}, source={self.meta.get('source')!r})")


def _phase_code(phase: str) -> int:
    if phase not in PHASES:
        raise ToolkitError(f"phase must be one of {PHASES}, got {phase!r}")
    return PHASES.index(phase)


def locality(experts: np.ndarray, seq: np.ndarray | None = None) -> dict:
    """Same-first-expert and shared-expert rates per layer for consecutive rows (of one sequence)."""
    a, b = experts[:-1], experts[1:]  # [N-1, L, K]
    if seq is not None:
        keep = seq[:-1] == seq[1:]
        a, b = a[keep], b[keep]
    same_first = (a[..., 0] == b[..., 0]).mean(0)
    shared = (a[..., :, None] == b[..., None, :]).any(axis=(-1, -2)).mean(0)
    return {"same_first": same_first, "shared": shared}


# ---- save / load ----

def save_trace(trace: Trace, path) -> Path:
    """Write a trace as a compressed .npz with a JSON header (atomic: temp file + rename)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    header = {"format": FORMAT, "version": VERSION, "n_tokens": trace.n_tokens, "n_layers": trace.n_layers,
              "top_k": trace.top_k, **_jsonable_meta(trace.meta)}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
              "experts": trace.experts, "weights": trace.weights, "step": trace.step, "phase": trace.phase}
    if trace.seq is not None:
        arrays["seq"] = trace.seq
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable_meta(meta: dict) -> dict:
    from ..results import to_jsonable

    return to_jsonable(meta)


def load_trace(source) -> Trace:
    """A trace by name (``synthetic-mixtral``, ``synthetic-mixtral-instruct``, a file in data/traces/) or path."""
    if isinstance(source, Trace):
        return source
    name = str(source)
    if name in TRACE_NAMES:
        return named_trace(name)
    path = Path(name)
    if not path.exists() and (TRACES_DIR / f"{name}.npz").exists():
        path = TRACES_DIR / f"{name}.npz"
    if not path.exists():
        raise ToolkitError(f"trace {name!r} not found: give a .npz path or one of {', '.join(TRACE_NAMES)}")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"].astype(np.uint8)).decode())
            arrays = {k: z[k] for k in ("experts", "weights", "step", "phase")}
            seq = z["seq"] if "seq" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ToolkitError(f"{path} is not a valid trace file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ToolkitError(f"{path} is not a toolkit trace (header format {header.get('format')!r})"
                           if isinstance(header, dict) else f"{path} has a malformed header")
    if header.get("version") != VERSION:
        raise ToolkitError(f"{path} is trace format version {header.get('version')}, this toolkit reads {VERSION}")
    want = (header.get("n_tokens"), header.get("n_layers"), header.get("top_k"))
    if arrays["experts"].shape != want:
        raise ToolkitError(f"{path}: experts array {arrays['experts'].shape} does not match the header "
                           f"(tokens, layers, top_k) = {want}")
    meta = {k: v for k, v in header.items() if k not in _HEADER_SHAPE_KEYS}
    return Trace(**arrays, meta=meta, seq=seq)


@lru_cache(maxsize=4)
def named_trace(name: str) -> Trace:
    """The named default traces, generated deterministically (seed 0) and cached; read-only arrays."""
    if name == "synthetic-mixtral":
        trace = synthetic_mixtral()
    elif name == "synthetic-mixtral-instruct":
        trace = synthetic_mixtral(model="instruct")
    else:
        raise ToolkitError(f"unknown trace name {name!r}; choose one of {', '.join(TRACE_NAMES)}")
    trace.meta["name"] = name
    for a in (trace.experts, trace.weights, trace.step, trace.phase, trace.seq):
        a.setflags(write=False)
    return trace


# ---- real Mixtral routing statistics (data/routing) ----

ROUTING_MODELS = {"original": "mixtral_8x7b_original", "instruct": "mixtral_8x7b_instruct"}


def routing_subjects(model: str = "original") -> list[str]:
    """The MMLU subjects with measured popularity counts."""
    folder = _routing_folder(model)
    return sorted(p.stem.removeprefix("expert_popularity_") for p in folder.glob("expert_popularity_*.json"))


def real_popularity(model: str = "original", subject: str | None = None) -> np.ndarray:
    """Measured top-2 selection counts of Mixtral-8x7B, int64 [32, 8], pooled over subjects or one."""
    from ..results import load_json

    folder = _routing_folder(model)
    subjects = routing_subjects(model) if subject is None else [subject]
    total = np.zeros((32, 8), dtype=np.int64)
    for s in subjects:
        path = folder / f"expert_popularity_{s}.json"
        if not path.exists():
            raise ToolkitError(f"no routing counts for subject {s!r}; choose one of {', '.join(routing_subjects(model))}")
        counts = np.asarray(load_json(path)["expert_popularity"], dtype=np.int64)
        if counts.shape != (32, 8):
            raise ToolkitError(f"{path}: expected 32 x 8 counts, got {counts.shape}")
        total += counts
    return total


def _routing_folder(model: str) -> Path:
    if model not in ROUTING_MODELS:
        raise ToolkitError(f"unknown routing model {model!r}; choose one of {', '.join(ROUTING_MODELS)}")
    folder = ROUTING_DIR / ROUTING_MODELS[model]
    if not folder.is_dir():
        raise ToolkitError(f"routing statistics not found at {folder} (set TOOLKIT_DATA_DIR to the repo's data/)")
    return folder


def locality_targets(n_layers: int = 32) -> dict:
    """Midpoints of the published locality ranges, interpolated over layers: same_first [L], shared [L]."""
    anchors = sorted(PUBLISHED_LOCALITY)
    pos = np.arange(n_layers) * (31 / max(n_layers - 1, 1))  # map onto Mixtral's 32 layers
    mid = {k: [np.mean(PUBLISHED_LOCALITY[a][i]) for a in anchors] for i, k in enumerate(("same_first", "shared"))}
    return {k: np.interp(pos, anchors, v) for k, v in mid.items()}


# ---- the calibrated generator (top-2 only) ----

def _pair_probs(w: np.ndarray) -> np.ndarray:
    """Plackett-Luce top-2 without replacement: Q[f, g] = w_f / W * w_g / (W - w_f), [E, E]."""
    w = w / w.sum()
    q = w[:, None] * w[None, :] / (1.0 - w[:, None])
    np.fill_diagonal(q, 0.0)
    return q / q.sum()


def fit_pair_model(counts: np.ndarray, iters: int = 2000) -> np.ndarray:
    """Pair distribution Q [E, E] whose selection frequency matches ``counts`` [E] (fixed point)."""
    target = 2.0 * np.asarray(counts, dtype=np.float64) / np.sum(counts)  # P(expert in top-2), sums to 2
    if target.max() >= 1.0:
        raise ToolkitError("an expert selected by more than every token cannot be fitted")
    target = np.maximum(target, 1e-9)
    w = target.copy()
    for _ in range(iters):
        q = _pair_probs(w)
        incl = q.sum(0) + q.sum(1)
        if np.max(np.abs(incl - target)) < 1e-12:
            break
        w = w * target / incl
    return _pair_probs(w)


def move_kernels(q: np.ndarray) -> np.ndarray:
    """Transition matrices [4, S, S] over ordered pairs (state f * E + g), each leaving Q invariant.

    0 keep the first expert, redraw the second from Q(g | f); 1 keep the second, redraw the first
    from Q(f | g); 2 move to a pair disjoint from the current one (Metropolis-corrected, so Q
    stays stationary); 3 draw afresh from Q.
    """
    n_experts = q.shape[0]
    qv = q.ravel()
    f, g = np.divmod(np.arange(n_experts * n_experts), n_experts)
    fresh = np.broadcast_to(qv, (qv.size, qv.size))
    keep_first = (f[:, None] == f[None, :]) * q[f[:, None], g[None, :]]
    keep_first = keep_first / np.maximum(keep_first.sum(1, keepdims=True), 1e-300)
    keep_second = (g[:, None] == g[None, :]) * q[f[None, :], g[:, None]]
    keep_second = keep_second / np.maximum(keep_second.sum(1, keepdims=True), 1e-300)
    disjoint = ~_overlap(f, g)
    z = (disjoint * qv[None, :]).sum(1)  # Z(A): mass of pairs disjoint from A
    prop = disjoint * qv[None, :] / np.maximum(z[:, None], 1e-300)
    move = prop * np.minimum(1.0, z[:, None] / np.maximum(z[None, :], 1e-300))
    move[np.diag_indices_from(move)] += 1.0 - move.sum(1)  # rejected: stay
    kernels = np.stack([keep_first, keep_second, move, fresh])
    kernels[:, qv == 0] = qv  # unreachable states (f == g): any valid row
    return kernels


def _overlap(f: np.ndarray, g: np.ndarray) -> np.ndarray:
    """[S, S] bool: the pairs (f, g) and (f', g') share an expert."""
    return ((f[:, None] == f[None, :]) | (f[:, None] == g[None, :])
            | (g[:, None] == f[None, :]) | (g[:, None] == g[None, :]))


def kernel_rates(q: np.ndarray, kernel: np.ndarray) -> tuple[float, float]:
    """Stationary (same_first, shared) rates of consecutive tokens under a transition matrix."""
    n_experts = q.shape[0]
    f, g = np.divmod(np.arange(n_experts * n_experts), n_experts)
    joint = q.ravel()[:, None] * kernel  # P(A, B)
    return float(joint[f[:, None] == f[None, :]].sum()), float(joint[_overlap(f, g)].sum())


def fit_moves(q: np.ndarray, same_first: float, shared: float) -> np.ndarray:
    """Move probabilities (keep-first, keep-second, disjoint) giving both rates; the rest is fresh.

    The rates are linear in the probabilities: try two moves at a time (keep-first with
    keep-second first, the natural stickiness) and take the first exact non-negative solution,
    else the clipped one with the smallest error.
    """
    kernels = move_kernels(q)
    rates = np.array([kernel_rates(q, k) for k in kernels])  # [4, 2]
    target = np.array([same_first, shared]) - rates[3]
    best, best_err = np.zeros(3), np.inf
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a = np.stack([rates[i] - rates[3], rates[j] - rates[3]], axis=1)  # [2 rates, 2 moves]
        try:
            sol = np.linalg.solve(a, target)
        except np.linalg.LinAlgError:
            continue
        p = np.zeros(3)
        p[[i, j]] = sol
        exact = np.all(p >= 0) and p.sum() <= 0.95
        p = np.clip(p, 0.0, None)
        p *= min(1.0, 0.95 / max(p.sum(), 1e-12))
        err = np.abs(rates[3] + p @ (rates[:3] - rates[3]) - (target + rates[3])).sum()
        if exact:
            return p
        if err < best_err:
            best, best_err = p, err
    return best


def mixed_kernel(q: np.ndarray, moves: np.ndarray) -> np.ndarray:
    """The chain's transition matrix [S, S] for move probabilities (keep-first, keep-second, disjoint)."""
    kernels = move_kernels(q)
    weights = np.append(moves, 1.0 - np.sum(moves))
    return np.tensordot(weights, kernels, axes=1)


def _cdf(p: np.ndarray) -> np.ndarray:
    """Row-wise CDF whose tail after the last non-zero entry is exactly 1 (no zero-probability draw)."""
    c = np.cumsum(p, axis=-1)
    c = c / c[..., -1:]
    last = p.shape[-1] - 1 - np.argmax((p > 0)[..., ::-1], axis=-1)
    c[np.arange(p.shape[-1]) >= last[..., None]] = 1.0
    return c


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i with cdf[i-1] < u <= cdf[i], for u in (0, 1]."""
    return (cdf < u[..., None]).sum(-1)


def synthetic_trace(popularity: np.ndarray, same_first, shared, n_sequences: int = 32, prompt_len: int = 128,
                    decode_len: int = 256, seed: int = 0, meta: dict | None = None) -> Trace:
    """A top-2 trace with per-layer popularity [L, E] and locality rates (scalars or [L]); see module doc."""
    pop = np.asarray(popularity, dtype=np.float64)
    n_layers, n_experts = pop.shape
    if n_sequences < 1 or prompt_len < 1 or decode_len < 0:
        raise ToolkitError("need n_sequences >= 1, prompt_len >= 1 and decode_len >= 0")
    same_first = np.broadcast_to(np.asarray(same_first, dtype=np.float64), (n_layers,))
    shared = np.broadcast_to(np.asarray(shared, dtype=np.float64), (n_layers,))
    q = np.stack([fit_pair_model(pop[layer]) for layer in range(n_layers)])  # [L, E, E]
    moves = np.array([fit_moves(q[layer], same_first[layer], shared[layer]) for layer in range(n_layers)])  # [L, 3]
    chain = np.stack([mixed_kernel(q[layer], moves[layer]) for layer in range(n_layers)])  # [L, S, S], S = E * E
    exp_rates = np.array([kernel_rates(q[layer], chain[layer]) for layer in range(n_layers)])  # [L, 2]
    cdf_chain = _cdf(chain)
    cdf_pair = _cdf(q.reshape(n_layers, -1))  # [L, S]

    rng = np.random.default_rng(seed)
    n_pos = prompt_len + decode_len
    s, lidx = n_sequences, np.arange(n_layers)[None, :]
    states = np.empty((s, n_pos, n_layers), dtype=np.int64)  # [S, P, L]: f * E + g
    state = _draw(cdf_pair[lidx], 1.0 - rng.random((s, n_layers)))  # first token: a fresh draw
    for p in range(n_pos):
        if p > 0:
            state = _draw(cdf_chain[lidx, state], 1.0 - rng.random((s, n_layers)))
        states[:, p] = state
    out = np.stack(np.divmod(states, n_experts), axis=-1).astype(np.int16)  # [S, P, L, 2]
    w1 = rng.uniform(0.5, 0.95, size=(s, n_pos, n_layers))
    weights = np.stack([w1, 1.0 - w1], axis=-1).astype(np.float16)

    # rows sequence-major; one prefill pass per sequence, then one pass per decoded token
    pos = np.arange(n_pos)
    step_in_seq = np.where(pos < prompt_len, 0, pos - prompt_len + 1)
    step = (np.arange(s)[:, None] * (decode_len + 1) + step_in_seq[None, :]).ravel()
    phase = np.tile((pos >= prompt_len).astype(np.uint8), s)
    seq = np.repeat(np.arange(s), n_pos)
    meta = {"n_experts": n_experts, "seed": seed, "n_sequences": n_sequences, "prompt_len": prompt_len,
            "decode_len": decode_len, "popularity": pop, "moves": moves,
            "expected_same_first": exp_rates[:, 0], "expected_shared": exp_rates[:, 1], **(meta or {})}
    return Trace(out.reshape(-1, n_layers, 2), weights.reshape(-1, n_layers, 2), step, phase, meta, seq)


def synthetic_mixtral(n_tokens: int | None = None, *, n_sequences: int = 32, prompt_len: int = 128,
                      decode_len: int = 256, seed: int = 0, model: str = "original", subject: str | None = None,
                      n_layers: int = 32) -> Trace:
    """A Mixtral-8x7B-like trace calibrated to the shipped counts and published locality (see module doc).

    ``n_tokens`` (optional) sets the number of sequences needed and truncates to that many rows.
    ``subject`` picks one MMLU subject's counts (more skewed) instead of the pool of all seven.
    ``n_layers`` < 32 keeps the first layers (for small engine models).
    """
    if n_tokens is not None:
        if n_tokens < 1:
            raise ToolkitError(f"n_tokens must be >= 1, got {n_tokens}")
        n_sequences = -(-int(n_tokens) // (prompt_len + decode_len))
    if not 1 <= n_layers <= 32:
        raise ToolkitError(f"Mixtral-8x7B has 32 MoE layers; n_layers must be in [1, 32], got {n_layers}")
    counts = real_popularity(model, subject)[:n_layers]
    targets = locality_targets(32)
    meta = {"source": f"synthetic, fitted to Mixtral-8x7B {model} routing counts "
                      f"({subject or 'pooled over 7 MMLU subjects'}; efeslab/fiddler) and the locality "
                      f"published by Jiang et al. 2024 (arXiv 2401.04088)",
            "model": "mixtral-8x7b", "routing_model": model, "subject": subject,
            **MIXTRAL_DIMS, "bytes_per_expert": MIXTRAL_EXPERT_BYTES}
    trace = synthetic_trace(counts, targets["same_first"][:n_layers], targets["shared"][:n_layers],
                            n_sequences, prompt_len, decode_len, seed, meta)
    if n_tokens is not None and n_tokens < trace.n_tokens:
        trace = Trace(trace.experts[:n_tokens], trace.weights[:n_tokens], trace.step[:n_tokens],
                      trace.phase[:n_tokens], trace.meta, trace.seq[:n_tokens])
    return trace


# ---- replay in the engine, and recording from it ----

def uniform_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, seed: int = 0) -> Trace:
    """A trace in which every token picks ``top_k`` distinct experts uniformly at random (weights sorted, sum 1)."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=-1)[..., :top_k]  # [N, L, K]
    w = np.sort(rng.random((n_tokens, n_layers, top_k)), axis=-1)[..., ::-1]  # [N, L, K] largest first
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    return Trace(experts.astype(np.int16), w, np.arange(n_tokens, dtype=np.int32), np.ones(n_tokens, dtype=np.uint8),
                 {"n_experts": n_experts, "source": f"uniform random, seed {seed}"})


class TraceRouter:
    """Routing that follows a trace: ``route(layer, hidden[T, D], phase) -> (index[T, K], weights[T, K])``.

    Token by token across forward passes: a pass takes the next T / batch_size rows for each
    sequence (a prefill pass the prompt's rows, a decode pass one row); a new pass starts when a
    layer index is not larger than the previous call's. With batch_size > 1 every sequence reads
    the trace from its own offset (default: evenly spaced). Reading wraps around at the end.
    Rows are (batch, seq)-flattened, as HF MoE blocks flatten hidden states.
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
        self._last_layer: int | None = None
        self.passes = 0

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
        if n_tok % self.batch_size:
            raise ToolkitError(f"{n_tok} tokens in a pass cannot be split into batch_size={self.batch_size} sequences")
        per_seq = n_tok // self.batch_size
        if self._last_layer is None or layer <= self._last_layer:  # a new forward pass
            if self._last_layer is not None:
                self.position += self._n
            self._n = per_seq
            self.passes += 1
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
            phase.append(np.full(len(idx), _phase_code(p["phase"])))
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
