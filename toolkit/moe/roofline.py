"""The roofline of offloaded MoE inference: the least time a forward pass can take, given where the experts are.

A forward pass must read, at least once, the weights of every expert that got
a token, and the dense part:

- a resident (hit) expert from GPU memory, at ``gpu_gbs``;
- a missed expert from host memory, whichever path serves it: a CPU expert
  streams its weights through the CPU, a copy streams them through the copy
  engine, and both draw on the same DRAM. So together they cannot beat the
  host's read bandwidth (``host_gbs``: from a calibration, the faster of a
  plain read by the chosen CPU threads over a buffer beyond the cache and
  both paths reading at once, ``CostModel.host_read_gbs``); a pinned copy
  alone may read faster than the CPU threads do, so the host ceiling is
  max(host_gbs, h2d_gbs);
- the dense part (attention, norms, routers, LM head) from GPU memory.

    bound(pass) = missed bytes / host ceiling + resident bytes / GPU + dense bytes / GPU

The GPU terms are summed, not overlapped with the host term (a slightly
looser bound, kept simple); they are ~1% of it for Mixtral. With resident
experts on several GPUs the resident term stays a sum over all of them, and
the peer hop of their token rows (~0.1 ms per layer between two H200s) is no
term at all: it overlaps the host reads, so a bound that added it would no
longer be a least time. Batch-1 decode: one pass
per token. Prefill: one pass reads every missed expert once, however many
tokens it has (512 tokens touch nearly every expert: about 50 x 352 MB / 90
GB/s = 0.2 s at 8 layers on the lent machine). ``measured / bound`` >= 1; the
target is <= 1 / 0.7.

Everything here is arithmetic on counts (pure functions); ``measure_ceilings``
is the one measurement. Shapes: L layers, E experts per layer, K top-k, N
trace rows.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import ToolkitError
from .phases import PHASES

TARGET = 0.7  # bound / measured: a run at 70% of its roofline or better meets the target


@dataclass(frozen=True)
class Ceilings:
    """Measured bandwidths in GB/s (1e9 bytes/s)."""

    gpu_gbs: float  # GPU memory read (weights read by GPU kernels)
    host_gbs: float  # host memory read with the CPU experts' threads (shared by CPU experts and copies)
    h2d_gbs: float  # pinned host-to-device copies
    cpu_threads: int | None = None
    source: str = ""

    def __post_init__(self):
        for name in ("gpu_gbs", "host_gbs", "h2d_gbs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ToolkitError(f"ceiling {name} must be a positive number of GB/s, got {v!r}")

    @property
    def miss_gbs(self) -> float:
        """How fast missed experts' weights can leave host memory, by both paths together."""
        return max(self.host_gbs, self.h2d_gbs)

    @classmethod
    def from_cost_model(cls, cm, gpu_gbs: float | None = None) -> Ceilings:
        """From a calibration: host bandwidth as measured, H2D from the copy time, GPU from one expert at 1 token."""
        if not cm.host_read_gbs:
            raise ToolkitError("this cost model has no host bandwidth (calibrated without a GPU); pass Ceilings")
        if gpu_gbs is None:  # a 1-token expert is a weight-streaming GEMV: the GPU's practical read rate
            gpu_gbs = cm.expert_bytes / (float(cm.gpu_time([1])[0]) * 1e-3) / 1e9
        return cls(gpu_gbs=float(gpu_gbs), host_gbs=float(cm.host_read_gbs),
                   h2d_gbs=cm.expert_bytes / (cm.copy_ms * 1e-3) / 1e9, cpu_threads=cm.cpu_threads,
                   source=f"cost model {cm.key}".strip())

    @classmethod
    def from_device_ceilings(cls, doc: dict) -> Ceilings:
        """From a ``../shared/data/device-ceilings/*.json`` record (hbm_copy, pcie, cpu_dram)."""
        try:
            return cls(gpu_gbs=float(doc["hbm_copy"]["GBps_rw"]), host_gbs=float(doc["cpu_dram"]["read_GBps"]),
                       h2d_gbs=float(doc["pcie"]["h2d_pinned"]["GBps"]),
                       cpu_threads=int(doc["cpu_dram"].get("threads") or 0) or None,
                       source=f"device ceilings {doc.get('hw', {}).get('gpu', '?')}")
        except (KeyError, TypeError, ValueError) as e:
            raise ToolkitError(f"not a device-ceilings record ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict:
        return {**asdict(self), "miss_gbs": self.miss_gbs}

    @classmethod
    def from_dict(cls, d: dict) -> Ceilings:
        return cls(**{k: d[k] for k in ("gpu_gbs", "host_gbs", "h2d_gbs", "cpu_threads", "source") if k in d})


# -- what a run reads ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertReads:
    """Expert weight reads of ``passes`` forward passes: (layer, expert, pass) triples with >= 1 token."""

    passes: int
    missed: float  # ... whose expert was not resident: read from host memory (expected values may be fractional)
    resident: float  # ... whose expert was resident: read from GPU memory

    @property
    def missed_per_pass(self) -> float:
        return self.missed / self.passes if self.passes else math.nan

    @property
    def resident_per_pass(self) -> float:
        return self.resident / self.passes if self.passes else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "missed_per_pass": self.missed_per_pass, "resident_per_pass": self.resident_per_pass}


def reads_from_stats(stats, phase: str) -> ExpertReads:
    """The reads an engine run made (``Offloaded.stats``: passes_used / passes_hit per [L, E], forwards)."""
    if phase not in PHASES:
        raise ToolkitError(f"phase must be one of {PHASES}, got {phase!r}")
    used = int(np.asarray(stats.passes_used[phase]).sum())
    hit = int(np.asarray(stats.passes_hit[phase]).sum())
    return ExpertReads(passes=int(stats.forwards[phase]) // max(1, int(stats.n_layers)), missed=used - hit, resident=hit)


def reads_from_trace(trace, resident: np.ndarray | None = None, policy=None, budget: int | None = None,
                     phase: str | None = None, popularity: np.ndarray | None = None) -> ExpertReads:
    """The reads of a routing trace under a static residency (bool [L, E]) or a policy driven pass by pass."""
    starts = trace.step_starts()
    if policy is not None:
        if budget is None:
            raise ToolkitError("a policy needs the GPU expert budget")
        policy.reset(int(budget), trace.n_layers, trace.n_experts, popularity)
    elif resident is None:
        raise ToolkitError("give a residency [L, E] or a policy")
    else:
        resident = np.asarray(resident, dtype=bool)
        if resident.shape != (trace.n_layers, trace.n_experts):
            raise ToolkitError(f"residency {resident.shape} does not match the trace's "
                               f"[L, E] = [{trace.n_layers}, {trace.n_experts}]")
    code = None if phase is None else PHASES.index(phase)
    passes = missed = hit = 0
    for g in range(len(starts) - 1):
        a, b = starts[g], starts[g + 1]
        counted = code is None or int(trace.phase[a]) == code
        passes += counted
        for layer in range(trace.n_layers):
            used = np.unique(trace.experts[a:b, layer])  # [U] experts with >= 1 token in this pass
            if policy is not None:  # the policy must see every pass, counted or not, to keep its state
                h = np.asarray(policy.step(layer, used)[0], dtype=bool)
            else:
                h = resident[layer, used]
            if counted:
                hit += int(h.sum())
                missed += int((~h).sum())
    return ExpertReads(passes=passes, missed=missed, resident=hit)


def uniform_reads(resident_per_layer, n_experts: int, top_k: int, tokens: int = 1, passes: int = 1) -> ExpertReads:
    """Expected reads when each token picks ``top_k`` distinct experts uniformly at random.

    An expert gets >= 1 of ``tokens`` tokens with probability 1 - (1 - K/E)^tokens;
    ``resident_per_layer`` [L] counts the resident experts of each layer.
    """
    res = np.asarray(resident_per_layer, dtype=np.float64).reshape(-1)  # [L]
    if np.any(res < 0) or np.any(res > n_experts) or not 0 < top_k <= n_experts:
        raise ToolkitError(f"need 0 <= resident <= {n_experts} per layer and 0 < top_k <= {n_experts}")
    p_used = 1.0 - (1.0 - top_k / n_experts) ** int(tokens)
    return ExpertReads(passes=int(passes), missed=float((n_experts - res).sum() * p_used * passes),
                       resident=float(res.sum() * p_used * passes))


# -- the bound -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bound:
    """Lowest time of one forward pass (ms) and its terms."""

    ms: float
    host_ms: float  # missed experts from host memory
    gpu_experts_ms: float  # resident experts from GPU memory
    dense_ms: float  # the dense part from GPU memory
    missed_bytes: float
    resident_bytes: float
    dense_bytes: float

    def ratio(self, measured_ms: float) -> float:
        """measured / bound (>= 1 unless a ceiling was underestimated)."""
        return measured_ms / self.ms if self.ms > 0 else math.nan

    def meets(self, measured_ms: float, target: float = TARGET) -> bool:
        """Is the measured time within 1 / target of the bound?"""
        return bool(self.ratio(measured_ms) <= 1.0 / target)

    def to_dict(self) -> dict:
        return asdict(self)


def pass_bound(missed_bytes: float, resident_bytes: float, dense_bytes: float, ceilings: Ceilings) -> Bound:
    """The roofline of one pass from the bytes it must read (see the module docstring)."""
    if min(missed_bytes, resident_bytes, dense_bytes) < 0:
        raise ToolkitError("byte counts must be >= 0")
    host = missed_bytes / (ceilings.miss_gbs * 1e9) * 1e3
    gpu = resident_bytes / (ceilings.gpu_gbs * 1e9) * 1e3
    dense = dense_bytes / (ceilings.gpu_gbs * 1e9) * 1e3
    return Bound(host + gpu + dense, host, gpu, dense, float(missed_bytes), float(resident_bytes), float(dense_bytes))


def decode_bound(reads: ExpertReads, expert_bytes: int, ceilings: Ceilings, dense_bytes: float = 0.0) -> Bound:
    """Lowest time per decode pass (per token at batch 1; per step with beams) for these reads."""
    if not reads.passes:
        raise ToolkitError("no forward passes to bound")
    return pass_bound(reads.missed_per_pass * expert_bytes, reads.resident_per_pass * expert_bytes, dense_bytes,
                      ceilings)


def prefill_bound(reads: ExpertReads, expert_bytes: int, ceilings: Ceilings, dense_bytes: float = 0.0) -> Bound:
    """Lowest time of a prefill pass: each missed expert read from host memory once (same arithmetic per pass)."""
    return decode_bound(reads, expert_bytes, ceilings, dense_bytes)


def dense_bytes(config, dtype_bytes: int = 2, kv_tokens: int = 0, sequences: int = 1) -> int:
    """Bytes of the non-expert weights one pass reads (attention, router, norms, LM head) plus its KV cache reads.

    ``config``: a transformers config or a ``MoEPreset``. The embedding table
    is not counted (a pass reads only its tokens' rows).
    """
    def get(*names):  # transformers config names, then MoEPreset names
        return next(getattr(config, n) for n in names if hasattr(config, n))

    d = int(get("hidden_size", "hidden"))
    layers = int(get("num_hidden_layers", "layers"))
    heads, kv = int(get("num_attention_heads", "heads")), int(get("num_key_value_heads", "kv_heads"))
    experts = int(get("num_local_experts", "num_experts", "experts"))
    vocab = int(get("vocab_size", "vocab"))
    hd = int(getattr(config, "head_dim", None) or d // heads)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q, k, v, o
    per_layer = attn + d * experts + 2 * d  # + router + two norms
    kv_cache = 2 * kv * hd * int(kv_tokens) * int(sequences)  # keys and values of one layer
    return int((layers * (per_layer + kv_cache) + vocab * d + d) * dtype_bytes)


@dataclass(frozen=True)
class ModelBytes:
    """The bytes a model's bounds count: one expert's weights, and the dense part of a pass (``dense``)."""

    config: object  # a transformers config or a MoEPreset
    expert_bytes: int
    dtype_bytes: int

    @classmethod
    def of(cls, session) -> ModelBytes:
        """From a ``MoESession`` (its preset and built model)."""
        import torch

        p = session.preset
        return cls(session.model.config, int(p.expert_bytes()), torch.empty((), dtype=p.dtype).element_size())

    def dense(self, kv_tokens: int = 0, sequences: int = 1) -> int:
        """``dense_bytes`` of this model at ``kv_tokens`` cached positions for ``sequences`` sequences."""
        return dense_bytes(self.config, self.dtype_bytes, kv_tokens, sequences)


# -- measuring the ceilings ------------------------------------------------------------------------

def calibrated_ceilings(cm, device: str = "cuda", nbytes: int = 1 << 30) -> tuple[Ceilings, Ceilings | None]:
    """The ceilings an offloaded run is judged against -> (ceilings, the direct measurement or None).

    Host and H2D bandwidth as the engine's calibration ``cm`` saw them (the
    bandwidth its plans were made with), the GPU read measured here with
    ``measure_ceilings`` (the calibration's GPU figure is one small expert,
    not a bandwidth). A calibration without host bandwidth (made without a
    GPU) gets all three measured here, and None for the direct measurement.
    """
    try:
        ceilings = Ceilings.from_cost_model(cm)
    except ToolkitError:
        return measure_ceilings(device, cm.cpu_threads, nbytes=nbytes), None
    measured = measure_ceilings(device, cm.cpu_threads, nbytes=nbytes)
    return replace(ceilings, gpu_gbs=measured.gpu_gbs, source="calibration + measured GPU"), measured


def _median_s(fn, repeats: int, sync, clock) -> float:
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync()
        out.append(clock() - t0)
    return statistics.median(out)


def measure_ceilings(device: str = "cuda", threads: int | None = None, nbytes: int = 1 << 30, repeats: int = 5,
                     clock=time.perf_counter) -> Ceilings:
    """Measure the three ceilings here: GPU read (a sum over ``nbytes``), pinned H2D, host read with ``threads``.

    On a CPU-only machine the "GPU" is host memory read by one thread and H2D a memcpy (for smoke tests).
    """
    import torch

    from ..env import resolve_device
    from .costs import choose_threads, torch_threads

    dev = torch.device(resolve_device(device))
    threads = choose_threads(threads)
    from . import host_memory

    n = max(1, int(nbytes) // 4)
    host = host_memory.empty((n,), torch.float32, pin=False).fill_(1.0)  # [n], the memory the experts lie in
    with torch_threads(threads):
        host_s = _median_s(lambda: host.sum(), repeats, lambda: None, clock)
    if dev.type == "cuda":
        sync = torch.cuda.synchronize
        gpu = torch.ones(n, dtype=torch.float32, device=dev)
        gpu_s = _median_s(lambda: gpu.sum(), repeats, sync, clock)
        pinned = host_memory.empty((n,), torch.float32).fill_(1.0)
        h2d_s = _median_s(lambda: gpu.copy_(pinned, non_blocking=True), repeats, sync, clock)
        del gpu, pinned
    else:
        with torch_threads(1):
            gpu_s = _median_s(lambda: host.sum(), repeats, lambda: None, clock)
        dst = torch.empty_like(host)
        h2d_s = _median_s(lambda: dst.copy_(host), repeats, lambda: None, clock)
    nb = n * 4
    return Ceilings(gpu_gbs=nb / gpu_s / 1e9, host_gbs=nb / host_s / 1e9, h2d_gbs=nb / h2d_s / 1e9,
                    cpu_threads=threads, source=f"measure_ceilings on {dev}")
