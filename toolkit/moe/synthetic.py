"""Synthetic routing traces: Mixtral-8x7B-like routing fitted to real statistics, and uniform routing.

Shapes: N tokens (trace rows), L layers, E experts per layer, S = E * E ordered expert pairs.

``synthetic_mixtral`` is calibrated to real Mixtral-8x7B statistics shipped in ``data/routing/``
(see its README): per layer, the pair (first, second expert) of a token is drawn from a
Plackett-Luce model whose selection frequencies equal the measured expert popularity, and
consecutive tokens of a sequence are linked by a Markov chain that keeps that distribution
exactly. Each token either keeps the previous first expert and redraws the second from its
conditional (probability x), keeps the second and redraws the first (y), jumps to a pair disjoint
from the previous one (v, Metropolis-corrected), or draws afresh. The rates are linear in
(x, y, v), so per layer they are solved so the expected same-first-expert and shared-expert rates
equal the midpoints of the ranges published for layers 0, 15 and 31 (Jiang et al. 2024),
linearly interpolated in between (layer 31 needs the disjoint move: its first expert repeats
often, yet its top-2 sets overlap barely more than at random). Routing weights are placeholders
(w1 ~ U(0.5, 0.95), w2 = 1 - w1): they do not affect hit rates.

``uniform_trace`` is the no-structure baseline: every token picks its experts uniformly at random.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ToolkitError
from .traces import DATA_DIR, Trace

ROUTING_DIR = DATA_DIR / "routing"

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


# ---- no structure: the uniform baseline ----

def uniform_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, seed: int = 0) -> Trace:
    """A trace in which every token picks ``top_k`` distinct experts uniformly at random (weights sorted, sum 1)."""
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=-1)[..., :top_k]  # [N, L, K]
    w = np.sort(rng.random((n_tokens, n_layers, top_k)), axis=-1)[..., ::-1]  # [N, L, K] largest first
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    return Trace(experts.astype(np.int16), w, np.arange(n_tokens, dtype=np.int32), np.ones(n_tokens, dtype=np.uint8),
                 {"n_experts": n_experts, "source": f"uniform random, seed {seed}"})
