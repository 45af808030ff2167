"""Latency of one call, measured so that the number can go in a paper.

``measure_latency(fn, *args)`` calls ``fn(*args)`` repeatedly and returns a
``LatencyResult``: the raw samples plus their statistics, the warm-up record and
the environment. The design, and why:

- **Asynchrony.** CUDA kernels run after the Python call returns, so a host clock
  read without synchronizing measures the launch, not the work. On a GPU each
  sample is bracketed by a pair of CUDA events recorded on the stream and read
  after the end event completes; on a CPU by ``time.perf_counter_ns``. With an
  injected clock, the injected synchronizer is called before each clock read.
- **Warm-up until steady, not a fixed count.** The first calls pay for lazy module
  loading, cuDNN/cuBLAS autotuning (``cudnn.benchmark``), allocator growth and
  clock ramp-up. We keep calling until the median of the last ``warmup_window``
  samples differs from the median of the window before it by less than
  ``warmup_rtol`` (at least ``min_warmup`` calls, at most ``max_warmup`` calls or
  ``max_time_s``). The first call's time is kept: it *is* the cold-start cost.
- **Median, with a confidence interval, sampled adaptively.** Latency
  distributions are skewed (a few slow outliers from interrupts, other
  processes), so the median is the robust summary. Its 95% confidence interval
  comes from order statistics (the number of samples below the true median is
  Binomial(n, 1/2)), which assumes nothing about the distribution. We sample
  until that interval's half-width is within ``target_rel_ci`` of the median, or
  ``max_time_s`` passes, and never take fewer than ``min_samples``.
- **One sample per call.** Each sample is one call, so the distribution is the
  distribution of single-call latency (unlike averaging blocks of calls, which
  hides the spread). Per-call event overhead is a few microseconds.
- **Fixed threads, no autograd.** Everything runs under ``torch.inference_mode()``
  with ``torch.set_num_threads`` fixed (and restored afterwards): the CPU thread
  count changes CPU latency several-fold, so it is part of the result.
- **Optional: cold L2** (``l2_flush``): zero a buffer twice the GPU's L2 size before
  each sample, outside the event pair (like ``triton.testing.do_bench``), so
  every call reads its weights from HBM. **CUDA graphs** (``cuda_graph``): capture
  ``fn`` once and time replays, which removes the CPU launch overhead.
- **Hidden transfers.** A host<->device copy or a synchronization (``.item()``,
  ``.cpu()``, boolean indexing) inside ``fn`` serializes the pipeline and usually
  is a bug in what is being timed. On a GPU one extra, untimed call runs under
  ``torch.cuda.set_sync_debug_mode("warn")`` and an op-level scan, and we warn
  naming the operation.
- **Spread warning.** Like ``torch.utils.benchmark.Measurement`` we warn when
  IQR/median > 10%: the machine is noisy and the median is less trustworthy.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import linecache
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ToolkitError

SPREAD_WARN = 0.10  # IQR / median above this -> warning (as torch.utils.benchmark)
_EXACT_CI_MAX_N = 1000  # exact binomial ranks up to here, normal approximation above


class LatencyWarning(UserWarning):
    """A measurement is valid but suspicious (high spread, hidden transfer, no steady state)."""


# ---------------------------------------------------------------------------- statistics


@lru_cache(maxsize=4096)
def _median_ci_ranks(n: int, confidence: float) -> tuple[int, int]:
    """0-based ranks (lo, hi) of the order statistics bounding the median's CI.

    The count B of samples below the true median is Binomial(n, 1/2), and
    [x_(k), x_(n-1-k)] (0-based) misses the median with probability 2 P(B <= k):
    take the largest k with P(B <= k) <= alpha/2. Too few samples (n < 6 at 95%)
    -> (0, n-1), whose coverage is below the target.
    """
    alpha2 = (1.0 - confidence) / 2.0
    if n <= _EXACT_CI_MAX_N:
        # exact, in integers: find the first k with P(B <= k) = sum C(n, i) / 2^n > alpha/2
        limit, cdf, c, k = alpha2 * 2**n, 0, 1, 0
        while k < n and cdf + c <= limit:
            cdf += c
            k += 1
            c = c * (n - k + 1) // k  # C(n, k) from C(n, k-1)
        lo = max(k - 1, 0)  # the largest k with P(B <= k) <= alpha/2 (0 when even that fails: tiny n)
    else:  # normal approximation with continuity correction; off by at most one rank here
        z = statistics.NormalDist().inv_cdf(1.0 - alpha2)
        lo = max(0, int(math.floor(n / 2.0 - 0.5 - z * math.sqrt(n) / 2.0)))
    lo = min(lo, (n - 1) // 2)
    return lo, n - 1 - lo


def median_ci(samples, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return (math.nan, math.nan)
    lo, hi = _median_ci_ranks(len(xs), float(confidence))
    return (xs[lo], xs[hi])


def _sorted_ci(sorted_xs: list[float], confidence: float = 0.95) -> tuple[float, float]:
    lo, hi = _median_ci_ranks(len(sorted_xs), confidence)
    return sorted_xs[lo], sorted_xs[hi]


def _median_sorted(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---------------------------------------------------------------------------- the result value


@dataclass(frozen=True)
class LatencyResult:
    """Latency samples of one call, their statistics, the warm-up record and the environment."""

    samples_ms: tuple[float, ...]
    warmup_count: int = 0
    first_call_ms: float = math.nan
    warmup_ms: tuple[float, ...] = ()
    env: dict = field(default_factory=dict, compare=False)
    label: str | None = None
    device: str = "cpu"
    options: dict = field(default_factory=dict, compare=False)  # method, threads, l2_flush, cuda_graph, ...
    notes: tuple[str, ...] = ()  # what the measurement found: transfers, no steady state, CI target missed
    stop_reason: str = ""  # "ci" (target reached), "time", "max_samples"

    def __post_init__(self):
        object.__setattr__(self, "samples_ms", tuple(float(x) for x in self.samples_ms))
        object.__setattr__(self, "warmup_ms", tuple(float(x) for x in self.warmup_ms))
        object.__setattr__(self, "notes", tuple(self.notes))

    # statistics, computed on demand from the raw samples
    @property
    def n_samples(self) -> int:
        return len(self.samples_ms)

    def _arr(self) -> np.ndarray:
        return np.asarray(self.samples_ms, dtype=np.float64)

    def _pct(self, q: float) -> float:
        return float(np.percentile(self._arr(), q)) if self.samples_ms else math.nan

    @property
    def mean_ms(self) -> float:
        return float(self._arr().mean()) if self.samples_ms else math.nan

    @property
    def std_ms(self) -> float:
        return float(self._arr().std(ddof=1)) if self.n_samples > 1 else 0.0

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms) if self.samples_ms else math.nan

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms) if self.samples_ms else math.nan

    @property
    def median_ms(self) -> float:
        return self._pct(50)

    @property
    def p90_ms(self) -> float:
        return self._pct(90)

    @property
    def p95_ms(self) -> float:
        return self._pct(95)

    @property
    def p99_ms(self) -> float:
        return self._pct(99)

    @property
    def iqr_ms(self) -> float:
        return self._pct(75) - self._pct(25)

    @property
    def ci95_ms(self) -> tuple[float, float]:
        return median_ci(self.samples_ms, 0.95)

    @property
    def rel_ci_halfwidth(self) -> float:
        lo, hi = self.ci95_ms
        return (hi - lo) / (2 * self.median_ms) if self.median_ms > 0 else math.nan

    @property
    def warnings(self) -> list[str]:
        """Reasons to distrust this number (empty when it looks sound)."""
        out = list(self.notes)
        med = self.median_ms
        if med > 0 and self.iqr_ms / med > SPREAD_WARN:
            out.append(f"high spread: IQR is {100 * self.iqr_ms / med:.0f}% of the median (> {100 * SPREAD_WARN:.0f}%)")
        return out

    # conversions
    def to_dict(self) -> dict:
        lo, hi = self.ci95_ms
        return {
            "label": self.label,
            "device": self.device,
            "median_ms": self.median_ms,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "min_ms": self.min_ms,
            "p90_ms": self.p90_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "iqr_ms": self.iqr_ms,
            "ci95_ms": [lo, hi],
            "rel_ci_halfwidth": self.rel_ci_halfwidth,
            "n_samples": self.n_samples,
            "stop_reason": self.stop_reason,
            "warmup": {"count": self.warmup_count, "first_call_ms": self.first_call_ms,
                       "samples_ms": list(self.warmup_ms)},
            "warnings": self.warnings,
            "notes": list(self.notes),
            "options": dict(self.options),
            "samples_ms": list(self.samples_ms),
            "env": dict(self.env),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyResult:
        """Inverse of ``to_dict`` (statistics are recomputed from the samples)."""
        w = d.get("warmup") or {}
        first = w.get("first_call_ms")
        return cls(
            samples_ms=tuple(d["samples_ms"]),
            warmup_count=int(w.get("count", 0)),
            first_call_ms=math.nan if first is None else float(first),
            warmup_ms=tuple(w.get("samples_ms", ())),
            env=dict(d.get("env") or {}),
            label=d.get("label"),
            device=d.get("device", "cpu"),
            options=dict(d.get("options") or {}),
            notes=tuple(d.get("notes") or ()),
            stop_reason=d.get("stop_reason", ""),
        )

    def to_json(self) -> str:
        from .results import to_jsonable

        return json.dumps(to_jsonable(self.to_dict()), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyResult:
        return cls.from_dict(json.loads(text))

    def to_dataframe(self, samples: bool = False):
        """One summary row; or with ``samples=True`` one row per call (phase 'warmup' or 'sample')."""
        import pandas as pd

        if samples:
            rows = [("warmup", i, x) for i, x in enumerate(self.warmup_ms)]
            rows += [("sample", i, x) for i, x in enumerate(self.samples_ms)]
            df = pd.DataFrame(rows, columns=["phase", "index", "latency_ms"])
            df.insert(0, "label", self.label)
            return df
        d = self.to_dict()
        lo, hi = d.pop("ci95_ms")
        row = {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
        row.update(ci95_low_ms=lo, ci95_high_ms=hi, warmup_count=self.warmup_count,
                   first_call_ms=self.first_call_ms, threads=self.options.get("threads"),
                   gpu=self.env.get("gpu"), n_warnings=len(self.warnings))
        return pd.DataFrame([row])

    def __repr__(self) -> str:
        lo, hi = self.ci95_ms
        head = f"LatencyResult({self.label or 'fn'} on {self.device}"
        threads = self.options.get("threads")
        if threads:
            head += f", {threads} thread{'s' if threads != 1 else ''}"
        lines = [
            head + ")",
            f"  median {self.median_ms:.4g} ms, 95% CI [{lo:.4g}, {hi:.4g}] ms, n={self.n_samples} ({self.stop_reason or '?'})",
            f"  mean {self.mean_ms:.4g} ms, std {self.std_ms:.3g}, min {self.min_ms:.4g}, p90 {self.p90_ms:.4g},"
            f" p99 {self.p99_ms:.4g}, IQR {self.iqr_ms:.3g} ms",
            f"  warm-up: {self.warmup_count} calls, first call {self.first_call_ms:.4g} ms",
        ]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.__repr__()

    def with_label(self, label: str) -> LatencyResult:
        return replace(self, label=label)


# ---------------------------------------------------------------------------- transfer and sync detection

_SYNC_OPS = {"aten::_local_scalar_dense": ".item() / bool() / float() reads a device scalar on the host",
             "aten::nonzero": "nonzero (e.g. boolean-mask indexing) waits for the device to know the output size"}
_COPY_OPS = {"aten::_to_copy", "aten::copy_"}


def find_transfers(fn: Callable, *args, **kwargs) -> list[str]:
    """Run ``fn`` once and name every cross-device copy and host-device synchronization it performs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: dict[str, int] = {}

    def dev(x) -> torch.device | None:
        return x.device if isinstance(x, torch.Tensor) else None

    class _Scan(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = "aten::" + func.__name__.split(".")[0]
            desc = None
            if name in _COPY_OPS:
                src = dev(args[1]) if name == "aten::copy_" else dev(args[0])
                dst = dev(args[0]) if name == "aten::copy_" else dev(out)
                if src is not None and dst is not None and src.type != dst.type:
                    shape = tuple(args[1 if name == "aten::copy_" else 0].shape)
                    desc = f"{name} {src.type}->{dst.type} {list(shape)}"
            elif name in _SYNC_OPS:
                d = dev(args[0]) if args else None
                if d is not None and d.type != "cpu":
                    desc = f"{name} on {d.type}: {_SYNC_OPS[name]}"
            if desc:
                found[desc] = found.get(desc, 0) + 1
            return out

    with _Scan():
        fn(*args, **kwargs)
    return [f"{d} (x{n})" if n > 1 else d for d, n in found.items()]


def scan_transfers(call: Callable) -> list[str]:
    """``find_transfers`` that also works when called under ``torch.inference_mode``.

    Dispatch modes see no operators inside inference mode, so the scan leaves it (no_grad keeps autograd off).
    """
    with torch.inference_mode(False), torch.no_grad():
        return find_transfers(call)


def _detect_transfers_cuda(call: Callable) -> list[str]:
    """Transfers/syncs inside one call: op scan plus torch's own sync debug mode."""
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ops = scan_transfers(call)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()
    syncs = []
    for w in caught:
        text = str(w.message)
        # the mode announces itself once ("... is a prototype feature ..."): not a detection
        if "synchroniz" not in text.lower() or "prototype feature" in text:
            continue
        # a warning raised from C++ carries the Python line that triggered it: name that line
        line = linecache.getline(w.filename, w.lineno).strip()
        syncs.append(f"a synchronizing CUDA operation at {Path(w.filename).name}:{w.lineno}: {line}")
    if syncs and not ops:
        ops = list(dict.fromkeys(syncs))
    return ops


# ---------------------------------------------------------------------------- the timer


def _infer_device(fn, args) -> str:
    """CUDA if an argument or the module's parameters live there; for an opaque callable, CUDA once it is in use.

    Timing GPU work as CPU work (host clock, no sync) is the classic mistake, while
    timing CPU work with CUDA events still measures its duration (the events are
    stamped as soon as they are enqueued on an idle stream): when in doubt, use CUDA.
    """
    for a in args:
        if isinstance(a, torch.Tensor):
            return str(a.device) if a.device.type == "cuda" else "cpu"
    module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "module", None)
    if isinstance(module, torch.nn.Module):
        p = next(module.parameters(), None)
        if p is not None:
            return str(p.device) if p.device.type == "cuda" else "cpu"
    dev = getattr(fn, "device", None)
    if dev is not None:
        return str(dev) if str(dev).startswith("cuda") else "cpu"
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"


def _l2_buffer(device: str) -> torch.Tensor:
    """A buffer twice the GPU's L2 cache: zeroing it evicts everything the previous call left there."""
    props = torch.cuda.get_device_properties(torch.device(device))
    l2 = getattr(props, "L2_cache_size", 0) or 128 * 2**20  # fall back to 2 x 128 MiB
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)


class _Sampler:
    """Times one call, either with a CUDA event pair or with a (possibly injected) host clock."""

    def __init__(self, device: str, clock, synchronizer, flush: torch.Tensor | None):
        self.flush = flush
        self.clock = clock or time.perf_counter_ns
        self.events = device.startswith("cuda") and clock is None and synchronizer is None
        if synchronizer is None:
            synchronizer = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.sync = synchronizer
        if self.events:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
        self.method = "cuda_event" if self.events else "host_clock"

    def __call__(self, call: Callable) -> tuple[float, int]:
        """(sample ms, clock reading after the sample) for one call."""
        if self.flush is not None:
            self.flush.zero_()  # queued before the start event, so outside the timed pair
        if self.events:
            self.start.record()
            call()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end), self.clock()
        self.sync()
        t0 = self.clock()
        call()
        self.sync()
        t1 = self.clock()
        return (t1 - t0) / 1e6, t1


def _steady(xs: list[float], window: int, rtol: float) -> bool:
    """The median of the last `window` samples is within rtol of the median of the window before."""
    if len(xs) < 2 * window:
        return False
    now = statistics.median(xs[-window:])
    before = statistics.median(xs[-2 * window:-window])
    return abs(now - before) <= rtol * abs(now)


def measure_latency(
    fn: Callable,
    *args: Any,
    device: str | None = None,
    min_warmup: int = 3,
    max_warmup: int = 200,
    warmup_window: int = 5,
    warmup_rtol: float = 0.05,
    min_samples: int = 10,
    max_samples: int = 10_000,
    target_rel_ci: float = 0.01,
    max_time_s: float = 10.0,
    l2_flush: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
    detect_sync: bool = True,
    label: str | None = None,
    clock: Callable[[], int] | None = None,
    synchronizer: Callable[[], None] | None = None,
) -> LatencyResult:
    """Latency of ``fn(*args)``: warm up until steady, then sample until the median's 95% CI is tight.

    ``clock() -> ns`` and ``synchronizer()`` are injectable (tests use a scripted
    clock); on a GPU the default is a CUDA event pair per sample. See the module
    docstring for the reasoning behind each step.
    """
    if min_samples < 1 or max_samples < min_samples:
        raise ToolkitError(f"need 1 <= min_samples <= max_samples, got {min_samples} and {max_samples}")
    if min_warmup < 1 or max_warmup < min_warmup or warmup_window < 1:
        raise ToolkitError(f"need 1 <= min_warmup <= max_warmup and warmup_window >= 1, got "
                           f"{min_warmup}, {max_warmup}, {warmup_window}")
    device = str(device) if device is not None else _infer_device(fn, args)
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise ToolkitError(f"device {device!r} requested but no CUDA GPU is available")
    if cuda_graph and not on_cuda:
        raise ToolkitError("cuda_graph=True needs a CUDA device")

    prev_threads = torch.get_num_threads()
    n_threads = int(threads) if threads else prev_threads
    if n_threads < 1:
        raise ToolkitError(f"threads must be >= 1, got {threads}")
    notes: list[str] = []
    if l2_flush and not on_cuda:
        notes.append("l2_flush has no effect on CPU")
    if on_cuda and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # events and the flush buffer go to this GPU
    flush = _l2_buffer(device) if (l2_flush and on_cuda) else None
    sample = _Sampler(device, clock, synchronizer, flush)

    def eager():
        fn(*args)

    torch.set_num_threads(n_threads)
    try:
        with torch.inference_mode():
            call = eager
            side = None
            if cuda_graph:  # eager calls before capture go on a side stream, as torch.cuda.graphs requires
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                first_ms, t_start = sample(eager)
            if detect_sync and on_cuda:
                found = _detect_transfers_cuda(eager)
                if found:
                    msg = "host<->device transfer or sync inside the timed function: " + "; ".join(found)
                    notes.append(msg)
                    warnings.warn(msg, LatencyWarning, stacklevel=2)
            if cuda_graph:
                with torch.cuda.stream(side):
                    for _ in range(2):
                        eager()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn(*args)
                torch.cuda.synchronize()
                call = graph.replay

            # warm-up until steady (the first call counts when it was the same kind of call)
            warm = [first_ms] if not cuda_graph else []
            now = t_start
            while True:
                steady = _steady(warm, warmup_window, warmup_rtol)
                if len(warm) >= min_warmup and (steady or len(warm) >= max_warmup
                                                or (now - t_start) / 1e9 >= max_time_s):
                    break
                ms, now = sample(call)
                warm.append(ms)
            if not steady:
                notes.append(f"warm-up stopped after {len(warm)} calls without reaching a steady state "
                             f"(median of the last {warmup_window} within {warmup_rtol:.0%} of the {warmup_window} before)")

            # adaptive sampling
            samples: list[float] = []
            ordered: list[float] = []
            t0 = None
            stop = ""
            while True:
                ms, now = sample(call)
                if t0 is None:
                    t0 = now - ms * 1e6  # the clock reading when sampling started
                samples.append(ms)
                bisect.insort(ordered, ms)
                n = len(samples)
                if n < min_samples:
                    continue
                lo, hi = _sorted_ci(ordered)
                med = _median_sorted(ordered)
                if med > 0 and (hi - lo) / (2 * med) <= target_rel_ci:
                    stop = "ci"
                elif n >= max_samples:
                    stop = "max_samples"
                elif (now - t0) / 1e9 >= max_time_s:
                    stop = "time"
                if stop:
                    break
    finally:
        torch.set_num_threads(prev_threads)

    if stop != "ci":
        notes.append(f"95% CI of the median is +-{100 * (hi - lo) / (2 * med):.1f}%, above the "
                     f"{100 * target_rel_ci:.1f}% target (stopped by {stop})")
    from .env import environment

    result = LatencyResult(
        samples_ms=tuple(samples),
        warmup_count=len(warm),
        first_call_ms=first_ms,
        warmup_ms=tuple(warm),
        env=environment(device, n_threads),
        label=label,
        device=device,
        options=dict(method=sample.method, threads=n_threads, l2_flush=bool(l2_flush), cuda_graph=bool(cuda_graph),
                     target_rel_ci=target_rel_ci, max_time_s=max_time_s, min_samples=min_samples,
                     warmup_window=warmup_window, warmup_rtol=warmup_rtol),
        notes=tuple(notes),
        stop_reason=stop,
    )
    spread = [w for w in result.warnings if w.startswith("high spread")]
    if spread:
        warnings.warn(f"{label or 'measurement'}: {spread[0]}", LatencyWarning, stacklevel=2)
    return result
