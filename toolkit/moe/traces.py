"""Routing traces: the ``Trace`` value, its statistics, and its file format.

Shapes: N tokens (trace rows), L layers, E experts per layer, K experts per token (top-k).

A trace row is one token: ``experts[N, L, K]`` (int16, first = largest routing weight),
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
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ToolkitError
from .phases import DECODE, PREFILL, phase_code

FORMAT, VERSION = "toolkit-trace", 1

# the repository's data folder: measured routing statistics (routing/) and trace files (traces/)
DATA_DIR = Path(os.environ.get("TOOLKIT_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))

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
