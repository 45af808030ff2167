"""Routing traces: the ``Trace`` value, its statistics, and its file format.

Shapes: N tokens (trace rows), L layers, E experts per layer, K experts per token (top-k).

A trace row is one token: ``experts[N, L, K]`` (int16, so at most 32768 experts per layer; first = largest routing weight),
``weights[N, L, K]`` (float16/32), ``step[N]`` (int32, the forward-pass index: all prompt tokens
of a sequence share their prefill step; non-decreasing), ``phase[N]`` (uint8, 0 prefill,
1 decode; one phase per step) and optionally ``seq[N]`` (int32 sequence id, for locality
statistics between consecutive tokens).

File format (``save_trace`` / ``read_trace``), version 1: an ``.npz`` archive (compressed, no
pickles) with arrays ``experts``, ``weights``, ``step``, ``phase``, optional ``seq``, and
``header``: UTF-8 JSON bytes (uint8 array) holding::

    {"format": "toolkit-trace", "version": 1, "n_tokens": N, "n_layers": L, "n_experts": E,
     "top_k": K, "hidden_size": D, "intermediate_size": I, "bytes_per_expert": ...,
     "source": "...", ...free-form meta}

A file that is not such an archive, or whose arrays disagree with its header, raises
``ToolkitError``.

Where traces come from lives next door: ``toolkit.moe.synthetic`` generates them (calibrated to
real Mixtral statistics), ``toolkit.moe.replay`` records them from the engine and replays them
into it, and ``toolkit.moe.trace_catalog.load_trace`` finds one by name or path.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ToolkitError
from ..settings import data_dir
from .phases import DECODE, PREFILL, phase_code

FORMAT, VERSION = "toolkit-trace", 1

# the repository's data folder: measured routing statistics (routing/) and trace files (traces/)
DATA_DIR = data_dir()

_HEADER_SHAPE_KEYS = ("format", "version", "n_tokens", "n_layers", "top_k")
MAX_EXPERTS = int(np.iinfo(np.int16).max) + 1  # expert ids are stored as int16


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
        if n_layers < 1 or k < 1:
            raise ToolkitError(f"a trace needs >= 1 layer and top_k >= 1, got {n_layers} layers and top_k {k}")
        if not np.issubdtype(ex.dtype, np.integer):
            raise ToolkitError(f"trace experts must be integers, got {ex.dtype}")
        n_experts = self.meta.get("n_experts", int(ex.max()) + 1)
        if isinstance(n_experts, bool) or not isinstance(n_experts, int | np.integer) or n_experts < 1:
            raise ToolkitError(f"trace n_experts must be an integer >= 1, got {n_experts!r}")
        n_experts = int(n_experts)
        if n_experts > MAX_EXPERTS:
            raise ToolkitError(f"trace n_experts is {n_experts}; the format stores expert ids as int16, so at most "
                               f"{MAX_EXPERTS} experts per layer")
        if ex.min() < 0 or ex.max() >= n_experts:
            raise ToolkitError(f"trace experts must lie in [0, {n_experts}), found [{ex.min()}, {ex.max()}]")
        if k > 1 and np.any(np.diff(np.sort(ex, axis=-1), axis=-1) == 0):
            raise ToolkitError("a token lists the same expert twice in one layer")
        self.experts = ex.astype(np.int16)
        w = np.asarray(self.weights)
        if w.shape != ex.shape:
            raise ToolkitError(f"trace weights {w.shape} do not match experts {ex.shape}")
        if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
            raise ToolkitError(f"trace weights must be numbers, got {w.dtype}")
        self.weights = w if w.dtype in (np.float16, np.float32) else w.astype(np.float32)
        self.step = _int_rows("step", self.step, n, 0, np.iinfo(np.int32).max).astype(np.int32)
        self.phase = _int_rows("phase", self.phase, n, PREFILL, DECODE, "be 0 (prefill) or 1 (decode)").astype(np.uint8)
        if np.any(np.diff(self.step) < 0):
            raise ToolkitError("trace steps must be non-decreasing (rows in forward-pass order)")
        starts = self.step_starts()
        if np.any(np.maximum.reduceat(self.phase, starts[:-1]) != np.minimum.reduceat(self.phase, starts[:-1])):
            raise ToolkitError("every forward pass (step) of a trace must have a single phase")
        if self.seq is not None:
            info = np.iinfo(np.int32)
            self.seq = _int_rows("seq", self.seq, n, info.min, info.max).astype(np.int32)
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
        ex = self.experts if phase is None else self.experts[self.phase == phase_code(phase)]
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


def _int_rows(name: str, values, n: int, low: int, high: int, allowed: str | None = None) -> np.ndarray:
    """``values`` as an integer array of ``n`` rows within [low, high], or a ToolkitError naming the field."""
    a = np.asarray(values).reshape(-1)
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        a = a.astype(np.int64)  # whole numbers stored as floats (np.ones, say)
    if not np.issubdtype(a.dtype, np.integer):
        raise ToolkitError(f"trace {name} must be whole numbers, got {a.dtype}")
    if a.shape != (n,):
        raise ToolkitError(f"trace {name} {a.shape} must have {n} rows")
    if a.min() < low or a.max() > high:
        raise ToolkitError(f"trace {name} must {allowed or f'lie in [{low}, {high}]'}, found [{a.min()}, {a.max()}]")
    return a


def locality(experts: np.ndarray, seq: np.ndarray | None = None) -> dict:
    """Same-first-expert and shared-expert rates per layer for consecutive rows (of one sequence)."""
    a, b = experts[:-1], experts[1:]  # [N-1, L, K]
    if seq is not None:
        keep = seq[:-1] == seq[1:]
        a, b = a[keep], b[keep]
    same_first = (a[..., 0] == b[..., 0]).mean(0)
    shared = (a[..., :, None] == b[..., None, :]).any(axis=(-1, -2)).mean(0)
    return {"same_first": same_first, "shared": shared}


# ---- save / read ----

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
    from ..results import atomic_write

    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def _jsonable_meta(meta: dict) -> dict:
    from ..results import to_jsonable

    return to_jsonable(meta)


def read_trace(path) -> Trace:
    """Read one trace file; a file that is not a version-1 trace archive raises ``ToolkitError``.

    ``toolkit.moe.trace_catalog.load_trace`` also accepts names; this reads exactly ``path``.
    """
    path = Path(path)
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
