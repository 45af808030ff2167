"""Latency of one call, measured so that the number can go in a paper; and whether one call is faster than another.

``measure_latency(fn, *args)`` calls ``fn(*args)`` repeatedly and returns a
``LatencyResult``: the raw samples plus their statistics, the warm-up record,
the state of the machine and the environment. ``compare(a, b)`` times two
callables in interleaved rounds and returns a ``Comparison`` with a verdict.
The design, and why:

- **Asynchrony.** CUDA kernels run after the Python call returns, so a host clock
  read without synchronizing measures the launch, not the work. On a GPU each
  sample is bracketed by a pair of CUDA events recorded on the stream and read
  after the end event completes; on a CPU by ``time.perf_counter_ns``. With an
  injected clock, the injected synchronizer is called before each clock read.
- **Warm-up until steady, not a fixed count.** The first calls pay for lazy module
  loading, cuDNN/cuBLAS autotuning (``cudnn.benchmark``), allocator growth and
  clock ramp-up. We keep calling until the median of the last ``warmup_window``
  samples differs from the median of the window before it by less than
  ``warmup_rtol`` and, where NVML can tell, the GPU's clock is up (at least
  ``min_warmup`` calls, at most ``max_warmup`` calls or ``max_time_s``). The
  first call's time is kept: it *is* the cold-start cost.
- **Median, with a confidence interval.** Latency distributions are skewed (a
  few slow outliers from interrupts, other processes), so the median is the
  robust summary. Its 95% confidence interval comes from order statistics (the
  number of samples below the true median is Binomial(n, 1/2)), which assumes
  nothing about the distribution.
- **The stopping rule: a minimum time, then a tight interval.** Sampling stops
  once there are at least ``min_samples`` samples, at least ``min_time_s``
  (default ``MIN_TIME_S`` = 0.5 s) of wall time has been spent sampling, and the
  CI's half-width is within ``target_rel_ci`` of the median; ``max_samples`` and
  ``max_time_s`` cap it. Why a minimum time: a CI covers the noise *inside* one
  burst of samples, not the state the machine was in during it. Ten samples of a
  0.26 ms attention kernel take 3 ms, a single state of the GPU's boost and
  power management, which re-decides clocks every few tens of milliseconds; three
  such bursts read 0.263, 0.293 and 0.294 ms, each with a "1%" CI. Half a second
  spans many of those decisions, so repeated calls agree. It is the sizing of
  the tools we compare with: nvbench's ``--min-time`` is 0.5 s, triton's
  ``do_bench`` times 100 ms after a 25 ms warm-up. We count wall time rather than
  summed sample time because the GPU's state evolves with wall time, and it
  keeps the cost of a measurement predictable for launch-bound kernels.
- **Throttled samples are left out** (GPU, where NVML is available). The GPU is
  polled every ``machine_state.POLL_INTERVAL_S`` between samples; samples taken
  while its SM clock was below 75% of its maximum or a thermal/hardware slowdown
  was active are kept in ``throttled_ms`` and left out of the statistics, with
  a count, as nvbench discards throttled trials. A warning says when the SM
  clock moved by more than 5% during sampling.
- **Contention is measured, and reported with the number.** Other processes
  holding the GPU, other work keeping the CPU's cores busy (busy time of our
  CPUs minus our own CPU time) and a timing thread that got less than 80% of
  the wall time all become warnings in ``LatencyResult.warnings``, saved with
  the result; ``LatencyResult.unreliable`` lists those that make the median
  itself untrustworthy (contention, a huge spread, a wide interval).
- **Threads chosen for a shared machine.** On a CPU, ``threads=None`` picks the
  intra-op thread count from the physical cores and the work other processes
  are doing right now (``machine_state.auto_threads``): OpenMP threads wait for
  each other at every operator, so one thread that loses its core stalls all of
  them. On a busy 2-core machine two threads read 98, 324 and 862 ms for a model
  that one thread times at 25 ms +-1%. The count is set for the measurement
  (and restored afterwards) and recorded with the result.
- **One sample per call, under ``torch.inference_mode()``.** Each sample is one
  call, so the distribution is the distribution of single-call latency (unlike
  averaging blocks of calls, which hides the spread); ``cuda_graph`` is the
  exception, below.
- **Optional: cold L2** (``l2_flush``): zero a buffer twice the GPU's L2 size before
  each call, outside the event pair (like ``triton.testing.do_bench``), so
  every call reads its weights from HBM.
- **Optional: GPU time only** (``hide_launch``): time the GPU's work without the
  host's launch overhead (by default it is timed, since a caller waits for it),
  in the regime a model runs its calls and ``do_bench`` times them: back to back.
  Calls run in bursts: one spin kernel (nvbench's blocking kernel) holds the GPU
  while the host launches the burst, then k times (flush, start event, call, end
  event), one synchronization, k samples. Why bursts: one call at a time with the
  GPU idle in between read compute-bound kernels (matmul, attention, convolution)
  4-6% faster than ``do_bench`` on an H200, as an idle GPU keeps its top clock
  while back-to-back calls run at its power limit. A burst holds about
  ``BURST_GPU_S`` (10 ms) of GPU work and ``BURST_HOST_S`` (10 ms) of launching, at
  most ``MAX_BURST`` (64) calls; a call's first burst is one call and each burst
  at most 4x the one before, so a cold first call cannot start a long burst. The
  spin covers twice the host's recent launch time of one call, and for a
  launch-bound call twice its launch time of the whole burst less the GPU work
  queued before the last call (plus 20 us, at most ``MAX_SPIN_NS`` = 0.2 s), all
  estimated from the call's previous burst. The stopping rule, the GPU monitor and
  the warm-up see each sample as before; the clock they read moves when a burst
  completes. Once a call is known to be GPU-bound (it launches faster than it
  runs), its next burst is launched before the current one is waited for, with no
  spin and no preroll: the bursts queue back to back and the GPU never idles
  while sampling lasts, as under ``do_bench`` (continuous bursts; the result's
  ``bursts_continued`` counts them). ``BURST_PREROLL_S`` (5 ms) opens each burst
  that follows a spin with untimed calls of about that much GPU work, so the
  timed ones follow calls rather than the light spin and run at the clock
  back-to-back work settles at;
  ``benchmarks/timer_clocks.py`` measures burst length and preroll against
  ``do_bench`` on compute-bound kernels.
- **Optional: CUDA graphs** (``cuda_graph``): capture ``fn`` and time replays, which
  removes the launch of each kernel. A replay still has a launch of its own,
  several us, most of a sample for a kernel of a few us: the graph holds as many
  calls as fill about ``GRAPH_REPLAY_S`` (5 ms) of GPU work (at most
  ``MAX_GRAPH_CALLS``, 1000), sized from a one-call replay, and a sample is the
  replay's time over its calls, as in triton's ``do_bench_cudagraph`` (which fills
  20 ms). Such a sample is a mean of calls, with less spread than single calls.
  With ``l2_flush`` the graph holds one call, so that every call finds a cold L2.
- **Hidden transfers.** A host<->device copy or a synchronization (``.item()``,
  ``.cpu()``, boolean indexing) inside ``fn`` serializes the pipeline and usually
  is a bug in what is being timed. On a GPU one extra, untimed call runs under
  ``torch.cuda.set_sync_debug_mode("warn")`` and an op-level scan, and we warn
  naming the operation.
- **Spread warning.** Like ``torch.utils.benchmark.Measurement`` we warn when
  IQR/median > 10%: the machine is noisy and the median is less trustworthy.

``compare(a, b)`` answers "is my speed-up real?":

- **Interleaved rounds.** A and B are timed in alternating bursts (ABBA order:
  A-B, then B-A, ...), so a drift of the machine's state (clocks, temperature,
  other work) hits both sides alike instead of posing as a difference.
- **A fixed budget, one look.** ``rounds`` rounds of at least ``round_time_s``
  and ``min_round_calls`` calls per side, and the verdict is computed once at
  the end: stopping as soon as the data look decisive would raise the rate of
  false "faster"/"slower" verdicts above the nominal 5%.
- **The ratio B/A, Hodges-Lehmann style.** On log latencies a speed-up is a
  shift; its Hodges-Lehmann estimate is the median of all pairwise differences
  log b_j - log a_i, and the distribution-free confidence interval (Moses) is
  read off the same differences at the ranks of the Mann-Whitney U critical
  value. We chose it over a bootstrap of the ratio of medians because it is
  deterministic (the same samples always give the same verdict), it is the
  interval that inverts the rank test we report (scipy's ``mannwhitneyu``), so
  interval and p-value never disagree, and it stays valid for skewed,
  outlier-prone latency distributions. For a multiplicative change it
  estimates the ratio of medians.
- **A verdict with an equivalence margin** (default ``EQUIVALENCE_MARGIN`` = 2%):
  "same" when the whole interval lies within +-2%, "faster"/"slower" when it
  lies entirely below/above 1, else "inconclusive" (more rounds needed). 2% is
  about the run-to-run reproducibility of a GPU median across processes (clocks,
  memory placement), the agreement we demand between our timer and
  ``do_bench``: a smaller difference, even if statistically real, would not
  reproduce on another day. Simulations in ``tests/test_compare.py`` check that
  A against A gives a wrong "faster"/"slower" at most 5% of the time and a true
  3% difference is found at least 95% of the time at the default budget.
"""

from __future__ import annotations

import contextlib
import json
import linecache
import math
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .env import infer_device
from .errors import ToolkitError
from .machine_state import (
    CpuMonitor,
    GpuMonitor,
    auto_threads,
    cpu_snapshot,
    cpu_warnings,
    gpu_clock_warnings,
    gpu_contention_warnings,
    others_busy_cores,
)

SPREAD_WARN = 0.10  # IQR / median above this -> warning (as torch.utils.benchmark)
HUGE_SPREAD = 0.25  # IQR / median above this -> the median itself is unreliable
WIDE_CI = 0.05  # relative CI half-width above this -> the median is unreliable
MIN_TIME_S = 0.5  # minimum wall time of sampling (nvbench's --min-time); see the module docstring
EQUIVALENCE_MARGIN = 0.02  # compare(): |B/A - 1| within this -> "same"
VERDICTS = ("faster", "slower", "same", "inconclusive")
_EXACT_CI_MAX_N = 1000  # exact binomial ranks up to here, normal approximation above
# hide_launch: calls timed back to back in bursts (see _Sampler, _burst_size, _spin_ns)
BURST_GPU_S = 0.01  # a burst holds about this much GPU work ...
BURST_HOST_S = 0.01  # ... and takes the host at most about this long to launch (a launch-bound call: short bursts)
MAX_BURST = 64  # calls in one burst at most
BURST_GROWTH = 4  # a burst has at most 4x the calls of the one before
SPIN_PAD_NS = 20_000  # added to every spin
MAX_SPIN_NS = 200_000_000  # no spin lasts longer than 0.2 s, whatever the estimate
# GPU time of untimed calls between the spin and a burst's timed ones (see _preroll_calls): on an H200 5 ms brought
# matmul, attention and convolution from 9.8/3.5/3.0% under do_bench to 5.5/1.3/1.2% and their rounds' spread from
# 4.6/5.6/1.9% to 0.7/1.6/0.2% (data/gpu/timer_clocks.json); a 50 ms burst did not help
BURST_PREROLL_S = 0.005
# cuda_graph: a replay holds enough calls that its launch is a small part of it (see _graph_calls)
GRAPH_REPLAY_S = 0.005  # GPU time of one replay
MAX_GRAPH_CALLS = 1000  # calls in one graph at most


class LatencyWarning(UserWarning):
    """A measurement is valid but suspicious (high spread, hidden transfer, contention, throttling)."""


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


def rel_ci_halfwidth(samples, confidence: float = 0.95) -> float:
    """Half-width of the median's CI relative to the median (numpy selection, no full sort)."""
    a = np.asarray(samples, dtype=np.float64)
    n = len(a)
    if n == 0:
        return math.inf
    lo, hi = _median_ci_ranks(n, confidence)
    mid = n // 2
    part = np.partition(a, sorted({lo, hi, mid, max(mid - 1, 0)}))
    med = part[mid] if n % 2 else 0.5 * (part[mid - 1] + part[mid])
    return float((part[hi] - part[lo]) / (2 * med)) if med > 0 else math.inf


def _kth_pairwise_difference(x_sorted: np.ndarray, y: np.ndarray, k: int) -> float:
    """The k-th smallest (1-based) of the len(x) * len(y) differences y_j - x_i, by bisection on its value.

    #{(i, j): y_j - x_i <= t} = sum_j #{i: x_i >= y_j - t} is one vectorized searchsorted per step,
    so this needs O((n_x + n_y) log n_x) memory-light work per step instead of all n_x * n_y differences.
    """
    nx = len(x_sorted)

    def count(t: float) -> int:
        return int(nx * len(y) - np.searchsorted(x_sorted, y - t, side="left").sum())

    lo = float(y.min() - x_sorted[-1])
    hi = float(y.max() - x_sorted[0])
    if count(lo) >= k:
        return lo
    scale = max(abs(lo), abs(hi), 1e-300)
    for _ in range(200):  # count(lo) < k <= count(hi)
        mid = 0.5 * (lo + hi)
        if count(mid) >= k:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-13 * scale:
            break
    return hi


def shift_estimate(x, y, confidence: float = 0.95) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate of the shift y - x and its distribution-free (Moses) confidence interval.

    The estimate is the median of all pairwise differences y_j - x_i; the interval
    is [d_(k), d_(N+1-k)] (1-based, N = n_x n_y) with k the Mann-Whitney U critical
    value at ``confidence`` (normal approximation, exact enough from ~10 samples a side).
    """
    xs = np.sort(np.asarray(x, dtype=np.float64))
    ys = np.asarray(y, dtype=np.float64)
    nx, ny = len(xs), len(ys)
    if nx == 0 or ny == 0:
        return (math.nan, math.nan, math.nan)
    n = nx * ny
    mid = (_kth_pairwise_difference(xs, ys, (n + 1) // 2) + _kth_pairwise_difference(xs, ys, n // 2 + 1)) / 2
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    k = int(math.floor(n / 2 - z * math.sqrt(nx * ny * (nx + ny + 1) / 12.0)))
    k = max(k, 1)
    return (mid, _kth_pairwise_difference(xs, ys, k), _kth_pairwise_difference(xs, ys, n + 1 - k))


# ---------------------------------------------------------------------------- the result value


@dataclass(frozen=True)
class LatencyResult:
    """Latency samples of one call, their statistics, the warm-up record, the machine's state and the environment."""

    samples_ms: tuple[float, ...]
    warmup_count: int = 0
    first_call_ms: float = math.nan
    warmup_ms: tuple[float, ...] = ()
    env: dict = field(default_factory=dict, compare=False)
    label: str | None = None
    device: str = "cpu"
    options: dict = field(default_factory=dict, compare=False)  # method, threads, l2_flush, cuda_graph, ...
    notes: tuple[str, ...] = ()  # what the measurement found: transfers, no steady state, CI target missed
    stop_reason: str = ""  # "ci" (every criterion met), "time", "max_samples", "rounds" (compare)
    throttled_ms: tuple[float, ...] = ()  # samples taken while the GPU was throttled: not in the statistics
    gpu_state: dict | None = field(default=None, compare=False)  # machine_state.GpuMonitor.state(); None: no NVML
    cpu_state: dict | None = field(default=None, compare=False)  # machine_state.cpu_usage() during sampling

    def __post_init__(self):
        object.__setattr__(self, "samples_ms", tuple(float(x) for x in self.samples_ms))
        object.__setattr__(self, "warmup_ms", tuple(float(x) for x in self.warmup_ms))
        object.__setattr__(self, "throttled_ms", tuple(float(x) for x in self.throttled_ms))
        object.__setattr__(self, "notes", tuple(self.notes))

    # statistics, computed on demand from the raw samples
    @property
    def n_samples(self) -> int:
        return len(self.samples_ms)

    @property
    def n_throttled(self) -> int:
        return len(self.throttled_ms)

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

    def _contention(self) -> list[str]:
        threads = int(self.options.get("threads") or 1)
        return (gpu_contention_warnings(self.gpu_state)
                + cpu_warnings(self.cpu_state, threads, cpu_device=not str(self.device).startswith("cuda")))

    def _spread(self) -> float:
        med = self.median_ms
        return self.iqr_ms / med if med > 0 else math.nan

    @property
    def warnings(self) -> list[str]:
        """Reasons to distrust this number (empty when it looks sound): notes, contention, clocks, spread."""
        out = list(self.notes) + self._contention()
        out += gpu_clock_warnings(self.gpu_state, self.n_throttled, self.n_samples + self.n_throttled)
        spread = self._spread()
        if spread > SPREAD_WARN:
            out.append(f"high spread: IQR is {100 * spread:.0f}% of the median (> {100 * SPREAD_WARN:.0f}%)")
        return out

    @property
    def unreliable(self) -> list[str]:
        """The warnings that make the median itself untrustworthy: contention, a huge spread, a wide CI.

        Empty when the number can be used. Anything derived from an unreliable
        median (a pitfall's relative error, a speed-up) is unreliable too.
        """
        out = self._contention()
        spread = self._spread()
        if spread > HUGE_SPREAD:
            out.append(f"huge spread: IQR is {100 * spread:.0f}% of the median (> {100 * HUGE_SPREAD:.0f}%)")
        if self.rel_ci_halfwidth > WIDE_CI:
            out.append(f"wide interval: the median's 95% CI is +-{100 * self.rel_ci_halfwidth:.0f}% "
                       f"(> {100 * WIDE_CI:.0f}%)")
        if not self.samples_ms:
            out.append("no samples")
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
            "n_throttled": self.n_throttled,
            "stop_reason": self.stop_reason,
            "warmup": {"count": self.warmup_count, "first_call_ms": self.first_call_ms,
                       "samples_ms": list(self.warmup_ms)},
            "warnings": self.warnings,
            "unreliable": self.unreliable,
            "notes": list(self.notes),
            "options": dict(self.options),
            "gpu_state": self.gpu_state,
            "cpu_state": self.cpu_state,
            "samples_ms": list(self.samples_ms),
            "throttled_ms": list(self.throttled_ms),
            "env": dict(self.env),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyResult:
        """Inverse of ``to_dict`` (statistics and warnings are recomputed from the samples and states)."""
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
            throttled_ms=tuple(d.get("throttled_ms") or ()),
            gpu_state=d.get("gpu_state"),
            cpu_state=d.get("cpu_state"),
        )

    def to_json(self) -> str:
        from .results import to_jsonable

        return json.dumps(to_jsonable(self.to_dict()), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyResult:
        return cls.from_dict(json.loads(text))

    def to_dataframe(self, samples: bool = False):
        """One summary row; or with ``samples=True`` one row per call (phase 'warmup', 'sample' or 'throttled')."""
        import pandas as pd

        if samples:
            rows = [("warmup", i, x) for i, x in enumerate(self.warmup_ms)]
            rows += [("sample", i, x) for i, x in enumerate(self.samples_ms)]
            rows += [("throttled", i, x) for i, x in enumerate(self.throttled_ms)]
            df = pd.DataFrame(rows, columns=["phase", "index", "latency_ms"])
            df.insert(0, "label", self.label)
            return df
        d = self.to_dict()
        lo, hi = d.pop("ci95_ms")
        row = {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
        gpu = self.gpu_state or {}
        row.update(ci95_low_ms=lo, ci95_high_ms=hi, warmup_count=self.warmup_count,
                   first_call_ms=self.first_call_ms, threads=self.options.get("threads"),
                   gpu=self.env.get("gpu"), sm_clock_min_mhz=gpu.get("sm_clock_min_mhz"),
                   sm_clock_max_mhz=gpu.get("sm_clock_max_mhz"), n_warnings=len(self.warnings),
                   reliable=not self.unreliable)
        return pd.DataFrame([row])

    def __repr__(self) -> str:
        lo, hi = self.ci95_ms
        head = f"LatencyResult({self.label or 'fn'} on {self.device}"
        threads = self.options.get("threads")
        if threads:
            head += f", {threads} thread{'s' if threads != 1 else ''}"
        n = f"n={self.n_samples}" + (f" (+{self.n_throttled} throttled, left out)" if self.n_throttled else "")
        flag = "  <- UNRELIABLE: see the warnings below" if self.unreliable else ""
        lines = [
            head + ")",
            f"  median {self.median_ms:.4g} ms, 95% CI [{lo:.4g}, {hi:.4g}] ms, {n} ({self.stop_reason or '?'}){flag}",
            f"  mean {self.mean_ms:.4g} ms, std {self.std_ms:.3g}, min {self.min_ms:.4g}, p90 {self.p90_ms:.4g},"
            f" p99 {self.p99_ms:.4g}, IQR {self.iqr_ms:.3g} ms",
            f"  warm-up: {self.warmup_count} calls, first call {self.first_call_ms:.4g} ms",
        ]
        gpu = self.gpu_state or {}
        if gpu.get("sm_clock_max_mhz"):
            after = gpu.get("after") or {}
            lines.append(f"  GPU: SM clock {gpu['sm_clock_min_mhz']}-{gpu['sm_clock_max_mhz']} MHz"
                         f" (max {gpu.get('max_sm_clock_mhz') or '?'}), {after.get('temperature_c', '?')} C")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.__repr__()

    def with_label(self, label: str) -> LatencyResult:
        return replace(self, label=label)


def warning_lines(obj) -> list[str]:
    """The warnings that must travel with a number, from any result the toolkit shows.

    ``obj``: a ``LatencyResult`` or ``Comparison``, the dict of their ``to_dict()``,
    a ``pitfalls.audit`` frame (its ``attrs["warnings"]``), or None. One line per
    warning, without a "warning:" prefix; empty when there is nothing to say.
    """
    if obj is None:
        return []
    attrs = getattr(obj, "attrs", None)
    if isinstance(attrs, Mapping) and "warnings" in attrs:  # a pandas frame (pitfalls.audit)
        return [str(w) for w in attrs["warnings"]]
    if isinstance(obj, Mapping):
        return [str(w) for w in obj.get("warnings") or ()]
    found = getattr(obj, "warnings", None)
    return [str(w) for w in found] if isinstance(found, (list, tuple)) else []


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


def _l2_buffer(device: str) -> torch.Tensor:
    """A buffer twice the GPU's L2 cache: zeroing it evicts everything the previous call left there."""
    props = torch.cuda.get_device_properties(torch.device(device))
    l2 = getattr(props, "L2_cache_size", 0) or 128 * 2**20  # fall back to 2 x 128 MiB
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)


def _cycles_per_ns() -> float:
    """GPU clock cycles per ns at the top clock (``torch.cuda._sleep`` counts cycles): a lower clock only spins longer."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    khz = getattr(props, "clock_rate", 0) or 2_000_000
    return khz / 1e6


def _spin(ns: float) -> None:
    """Queue a kernel that holds the GPU for about ``ns`` (at most ``MAX_SPIN_NS``, whatever the estimate)."""
    torch.cuda._sleep(int(min(ns, MAX_SPIN_NS) * _cycles_per_ns()))


def _burst_size(last_k: int, gpu_ns: float, host_ns: float) -> int:
    """Calls in the next burst of ``hide_launch``: about ``BURST_GPU_S`` of GPU work and ``BURST_HOST_S`` of launching.

    ``gpu_ns``/``host_ns``: one call's GPU time and host launch time in the bursts before (0: unknown).
    At least 1, at most ``MAX_BURST`` calls and ``BURST_GROWTH`` times the last burst, so that a first
    estimate taken from a cold call cannot start a long burst.
    """
    fit = min(BURST_GPU_S * 1e9 / max(gpu_ns, 1.0), BURST_HOST_S * 1e9 / max(host_ns, 1.0))
    return int(max(1, min(MAX_BURST, BURST_GROWTH * last_k, fit + 1e-9)))  # + 1e-9: 49.99999 calls fit 50


def _spin_ns(k: int, host_ns: float, gpu_ns: float) -> float:
    """How long the spin before a burst of ``k`` calls holds the GPU, so that no call waits for its launch.

    The host has launched call i (1-based) by i * host_ns after the spin; the GPU reaches it at
    spin + (i - 1) * gpu_ns. Allowing the host twice its recent launch time, the spin must be at least
    2 i host_ns - (i - 1) gpu_ns for every i: the largest is at i = 1 or i = k. When a call's GPU work
    outlasts its launch, the host gains on the GPU after the first call, and the spin stays short
    (20-30% of a compute-bound burst would otherwise be spent spinning at low power); when the call is
    launch-bound, the spin covers about twice the host's time to launch the whole burst. Plus
    ``SPIN_PAD_NS``, capped at ``MAX_SPIN_NS``.
    """
    need = max(2.0 * host_ns, 2.0 * k * host_ns - (k - 1) * gpu_ns)
    return min(MAX_SPIN_NS, need + SPIN_PAD_NS)


def _preroll_calls(gpu_ns: float, preroll_s: float | None = None, host_ns: float = 0.0) -> int:
    """Untimed calls that open a burst after its spin: about ``BURST_PREROLL_S`` of GPU work, at most ``MAX_BURST``.

    The spin is light work, and a compute-bound kernel's first calls after it
    can run at a higher SM clock than calls that follow other calls at the
    power limit, which is what ``do_bench``'s uninterrupted 100 ms measure.
    Calls of the kernel itself between the spin and the timed ones bring the
    GPU back to that regime. 0 while one call's GPU time is unknown, and for a
    launch-bound call (``host_ns`` to launch it >= its GPU time): its GPU idles
    between kernels, far from the power limit, and a preroll would only add
    launches for the spin to cover (on an H200, 50 one-element kernels a call
    went from 0.09 to 0.32 ms with an IQR of 81%).
    """
    preroll_s = BURST_PREROLL_S if preroll_s is None else preroll_s
    if preroll_s <= 0 or gpu_ns <= 0 or host_ns >= gpu_ns:
        return 0
    return int(min(MAX_BURST, math.ceil(preroll_s * 1e9 / gpu_ns)))


@dataclass(frozen=True)
class _BurstPlan:
    """The next burst of one call: its size, and the estimates the spin is sized from."""

    k: int = 1  # the first burst of a call is one call: its time is unknown
    host_ns: float = 100_000.0  # host time to launch one call (with its flush and events): the longest recent
    gpu_ns: float = 0.0  # GPU time of one call (with its flush) in the last burst; 0: unknown
    preroll: int = 0  # untimed calls after the spin, before the k timed ones (``_preroll_calls``)

    @property
    def spin_ns(self) -> float:
        return _spin_ns(self.preroll + self.k, self.host_ns, self.gpu_ns)  # the preroll's launches are covered too

    @property
    def continuous(self) -> bool:
        """GPU-bound (the host launches a call faster than the GPU runs it): the next burst may queue behind this one."""
        return 0 < self.host_ns < self.gpu_ns

    def after(self, host_ns: float, gpu_ns: float, k: int | None = None, preroll: int | None = None) -> _BurstPlan:
        """The plan after a burst of ``k`` timed calls (default this plan's) opened by ``preroll`` untimed ones:
        ``host_ns`` to launch them all, ``gpu_ns`` for the k timed ones."""
        k = self.k if k is None else k
        preroll = self.preroll if preroll is None else preroll
        if self.gpu_ns == 0:  # the call's first burst: its launch may hold one-time set-up (a cuBLAS handle took
            host = 0.9 * self.host_ns  # 112 ms on an H200), which would hold the spin at its cap for dozens of bursts
        else:
            host = max(0.9 * self.host_ns, host_ns / (preroll + k))  # a slow launch is remembered, forgotten slowly
        gpu = gpu_ns / k
        return _BurstPlan(_burst_size(k, gpu, host), host, gpu, _preroll_calls(gpu, host_ns=host))


@dataclass
class _Flight:
    """A launched burst: ``k`` timed calls after ``preroll`` untimed ones, ``host_ns`` to launch them; ``handle``
    is the launcher's (the event pairs on a GPU)."""

    k: int
    preroll: int
    host_ns: float
    handle: object = None


class _Bursts:
    """``hide_launch``'s samples: a burst of back-to-back calls at a time, handed out one sample at a time.

    ``launch(call, k, spin_ns, preroll) -> _Flight`` starts one burst (a spin, ``preroll`` untimed calls,
    k timed ones) without waiting for it; ``collect(flight) -> (k samples in ms, GPU ns from the first
    start event to the last end event)`` waits for it. Each call has its own plan (``compare`` alternates
    two calls); a sample left over when another call is sampled is dropped, so that no sample crosses
    into a later round. Every sample but a burst's last carries the clock reading taken when the burst
    was launched, the last one the reading after it completed: the stopping rule and the GPU monitor,
    which act when the clock moves, act once a burst has completed, on all of its samples.

    Continuous bursts: once a call is known to be GPU-bound (``_BurstPlan.continuous``), its next
    burst is launched before the current one is waited for, without spin or preroll. It queues behind
    the current one, so the GPU runs the call back to back for as long as sampling lasts, as
    ``do_bench`` does for 100 ms and more, instead of idling at every burst's synchronization (a
    compute-bound kernel reads faster after an idle gap: the GPU's clock recovers in it). A burst
    launched ahead and never read (sampling stopped, or another call came) is waited for by
    ``finish()`` or dropped.
    """

    def __init__(self, launch: Callable, collect: Callable, clock: Callable[[], int]):
        self.launch, self.collect, self.clock = launch, collect, clock
        self.plans: dict[Callable, _BurstPlan] = {}
        self.queue: deque[tuple[float, int]] = deque()
        self.owner: Callable | None = None
        self.ahead: tuple[Callable, _Flight] | None = None  # a burst launched behind the one being read
        self.largest = 0  # the most calls in one burst so far
        self.largest_preroll = 0  # the most untimed calls opening one burst so far
        self.continued = 0  # bursts that queued behind the previous one (no spin, no idle GPU between)

    def __call__(self, call: Callable) -> tuple[float, int]:
        if not self.queue or self.owner != call:
            self.queue = self._burst(call)
            self.owner = call
        return self.queue.popleft()

    def _burst(self, call: Callable) -> deque[tuple[float, int]]:
        plan = self.plans.get(call, _BurstPlan())
        begun = self.clock()
        if self.ahead is not None and self.ahead[0] is call:
            flight = self.ahead[1]
            self.continued += 1
        else:  # another call's burst launched ahead is not read: its samples would cross into this round
            flight = self.launch(call, plan.k, plan.spin_ns, plan.preroll)
        self.ahead = None
        if plan.continuous:  # sized as the plan after this burst will be (this burst's estimates are the plan's)
            self.ahead = (call, self.launch(call, _burst_size(plan.k, plan.gpu_ns, plan.host_ns), 0.0, 0))
        samples, gpu_ns = self.collect(flight)
        now = self.clock()
        self.plans[call] = plan.after(flight.host_ns, gpu_ns, flight.k, flight.preroll)
        self.largest = max(self.largest, flight.k)
        self.largest_preroll = max(self.largest_preroll, flight.preroll)
        return deque([(ms, begun) for ms in samples[:-1]] + [(samples[-1], now)])

    def finish(self) -> None:
        """Wait for a burst launched ahead and drop it (sampling is over: the GPU is left idle)."""
        if self.ahead is not None:
            self.collect(self.ahead[1])
            self.ahead = None
        self.queue.clear()
        self.owner = None


class _Sampler:
    """Times one call, either with a CUDA event pair or with a (possibly injected) host clock.

    ``hide_launch`` (CUDA events only) times the GPU's work alone, in the regime a model runs its
    calls and ``do_bench`` times them: back to back. Calls run in bursts (``_Bursts``): one spin kernel
    (``torch.cuda._sleep``, nvbench's "blocking kernel") holds the GPU while the host launches the whole
    burst, then k times (L2 flush if any, start event, call, end event), one synchronization, k samples;
    a GPU-bound call's next burst is launched before that synchronization (continuous bursts).
    One call at a time with the GPU idle in between reads compute-bound kernels 4-6% faster than
    ``do_bench`` on an H200: an idle GPU keeps its top clock, back-to-back calls run at the power
    limit. ``_burst_size`` and ``_spin_ns`` give the rules; the estimates come from the previous burst.
    """

    def __init__(self, device: str, clock, synchronizer, flush: torch.Tensor | None, hide_launch: bool = False):
        self.flush = flush
        self.clock = clock or time.perf_counter_ns
        self.events = device.startswith("cuda") and clock is None and synchronizer is None
        if synchronizer is None:
            synchronizer = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.sync = synchronizer
        self.hide = bool(hide_launch) and self.events
        if self.events:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
        # hide_launch: one event pair per call of a burst, two sets (a burst being read, one launched behind it)
        self._pair_sets: tuple[list, list] = ([], [])
        self._next_set = 0
        self.bursts = _Bursts(self._launch, self._collect, self.clock) if self.hide else None
        self.method = "cuda_event" if self.events else "host_clock"

    def __call__(self, call: Callable) -> tuple[float, int]:
        """(sample ms, clock reading after the sample) for one call."""
        if self.bursts is not None:
            return self.bursts(call)
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

    def finish(self) -> None:
        """Sampling is over: wait for a burst still in flight (the GPU is left idle)."""
        if self.bursts is not None:
            self.bursts.finish()

    def _launch(self, call: Callable, k: int, spin_ns: float, preroll: int = 0) -> _Flight:
        """Launch one burst of k back-to-back calls behind a spin (if ``spin_ns`` > 0) and ``preroll`` untimed calls."""
        pairs = self._pair_sets[self._next_set]
        self._next_set ^= 1
        while len(pairs) < k:
            pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        pairs = pairs[:k]
        if spin_ns > 0:
            _spin(spin_ns)
        t0 = time.perf_counter_ns()
        for _ in range(preroll):
            if self.flush is not None:
                self.flush.zero_()
            call()
        for start, end in pairs:
            if self.flush is not None:
                self.flush.zero_()  # between the previous end event and this start event: not timed
            start.record()
            call()
            end.record()
        return _Flight(k, preroll, time.perf_counter_ns() - t0, pairs)

    @staticmethod
    def _collect(flight: _Flight) -> tuple[list[float], float]:
        """Wait for a launched burst -> (samples ms, GPU ns from its first start event to its last end event)."""
        pairs = flight.handle
        pairs[-1][1].synchronize()
        samples = [start.elapsed_time(end) for start, end in pairs]
        return samples, pairs[0][0].elapsed_time(pairs[-1][1]) * 1e6


def _graph_calls(replay_ms: float) -> int:
    """Calls to capture in one graph, from the GPU time of a one-call replay: about ``GRAPH_REPLAY_S`` of work.

    A sample times a replay with its launch, several us: for a kernel of a few us that is most of
    the sample. Filled to 5 ms, the launch is a fraction of a percent of it, and a sample is the
    replay's time over its calls (as triton's ``do_bench_cudagraph``, which fills 20 ms).
    """
    return int(max(1, min(MAX_GRAPH_CALLS, math.ceil(GRAPH_REPLAY_S * 1e3 / max(replay_ms, 1e-6)))))


def _capture(fn: Callable, args: tuple, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls of ``fn(*args)``; each call's output is freed, so the next one reuses it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    torch.cuda.synchronize()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, tries: int = 3) -> float:
    """GPU time of one replay (median of ``tries``), its launch hidden behind a 1 ms spin: sizes the graph."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(tries):
        _spin(1_000_000)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _steady(xs: list[float], window: int, rtol: float) -> bool:
    """The median of the last `window` samples is within rtol of the median of the window before."""
    if len(xs) < 2 * window:
        return False
    now = statistics.median(xs[-window:])
    before = statistics.median(xs[-2 * window:-window])
    return abs(now - before) <= rtol * abs(now)


@dataclass(frozen=True)
class _WarmUp:
    """The warm-up rule: until steady (and the GPU's clock is up), within [min_calls, max_calls] and max_time_s."""

    min_calls: int = 3
    max_calls: int = 200
    window: int = 5
    rtol: float = 0.05
    max_time_s: float = 10.0

    def check(self):
        if self.min_calls < 1 or self.max_calls < self.min_calls or self.window < 1:
            raise ToolkitError(f"need 1 <= min_warmup <= max_warmup and warmup_window >= 1, got "
                               f"{self.min_calls}, {self.max_calls}, {self.window}")

    def run(self, sample: Callable[[Callable], tuple[float, int]], call: Callable, warm: list[float], t_start: int,
            gpu: GpuMonitor | None) -> bool:
        """Call until steady; appends to ``warm``; True when a steady state was reached."""
        now = t_start
        while True:
            steady = _steady(warm, self.window, self.rtol)
            if steady and gpu is not None and gpu.throttled_now():
                steady = False  # the samples agree, but the clocks are not up yet
            if len(warm) >= self.min_calls and (steady or len(warm) >= self.max_calls
                                                or (now - t_start) / 1e9 >= self.max_time_s):
                return steady
            ms, now = sample(call)
            warm.append(ms)

    def note(self, n: int) -> str:
        return (f"warm-up stopped after {n} calls without reaching a steady state (median of the last "
                f"{self.window} within {self.rtol:.0%} of the {self.window} before)")


class _Rig:
    """What one measurement needs around the timed calls: sampler, thread count, machine monitors.

    ``active()`` fixes the thread count and inference mode for the measurement and restores them;
    ``watch()`` brackets the sampling phase with the GPU and CPU monitors.
    """

    def __init__(self, device: str, threads: int | None, l2_flush: bool, clock, synchronizer, nvml,
                 cpu_snapshot_fn, hide_launch: bool = False):
        self.device = device
        self.on_cuda = device.startswith("cuda")
        if self.on_cuda and not torch.cuda.is_available():
            raise ToolkitError(f"device {device!r} requested but no CUDA GPU is available")
        if threads is not None and int(threads) < 1:
            raise ToolkitError(f"threads must be >= 1, got {threads}")
        self.snapshot = cpu_snapshot_fn or cpu_snapshot
        self.threads, self.threads_choice = self._choose_threads(threads)
        self.notes: list[str] = []
        if l2_flush and not self.on_cuda:
            self.notes.append("l2_flush has no effect on CPU")
        if hide_launch and not self.on_cuda:
            self.notes.append("hide_launch has no effect on CPU")
        if self.on_cuda and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # events and the flush buffer go to this GPU
        flush = _l2_buffer(device) if (l2_flush and self.on_cuda) else None
        self.sample = _Sampler(device, clock, synchronizer, flush, hide_launch)
        self.gpu = GpuMonitor.for_device(device, nvml)
        self.cpu = CpuMonitor(self.snapshot)
        self.cpu_state: dict | None = None

    def _choose_threads(self, threads: int | None) -> tuple[int, str]:
        if threads is not None:
            return int(threads), "given"
        if self.on_cuda:  # the host only launches: keep what the process uses
            return torch.get_num_threads(), "torch's current"
        others = others_busy_cores(snapshot=self.snapshot)
        n = auto_threads(others=others or 0.0)
        seen = "unknown" if others is None else f"{others:.1f}"
        return n, f"auto (cores busy with other work: {seen})"

    @contextlib.contextmanager
    def active(self):
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                try:
                    yield self
                finally:
                    self.sample.finish()
        finally:
            torch.set_num_threads(prev)

    def start_watch(self, now_ns: int) -> None:
        if self.gpu is not None:
            self.gpu.start(now_ns)
        self.cpu.start()

    def stop_watch(self, now_ns: int, n_samples: int) -> None:
        if self.gpu is not None:
            self.gpu.stop(now_ns, n_samples)
        self.cpu_state = self.cpu.stop()

    def flags(self, n: int) -> list[bool]:
        """Per sample (in the order taken): taken while the GPU was throttled."""
        flags = list(self.gpu.flags[:n]) if self.gpu is not None else []
        return flags + [False] * (n - len(flags))

    def gpu_state(self) -> dict | None:
        return self.gpu.state() if self.gpu is not None else None

    def options(self) -> dict:
        out = dict(method=self.sample.method, threads=self.threads, threads_choice=self.threads_choice,
                   l2_flush=self.sample.flush is not None, hide_launch=self.sample.hide)
        if self.sample.bursts is not None:
            out["burst_max_calls"] = self.sample.bursts.largest
            out["burst_max_preroll_calls"] = self.sample.bursts.largest_preroll
            out["bursts_continued"] = self.sample.bursts.continued
        return out


def _kept(samples: list[float], flags: list[bool], min_keep: int) -> tuple[list[float], list[float], str | None]:
    """(kept, throttled, note): throttled samples are left out unless too few would remain."""
    throttled = [s for s, f in zip(samples, flags) if f]
    if not throttled:
        return list(samples), [], None
    kept = [s for s, f in zip(samples, flags) if not f]
    if len(kept) < max(1, min_keep):
        return list(samples), [], (f"the GPU was throttled for {len(throttled)} of {len(samples)} samples; they are "
                                   "kept because too few unthrottled samples remain: the number describes a "
                                   "throttled GPU")
    return kept, throttled, None


def _due(n: int) -> bool:
    """Check the stopping rule at every sample up to 1000, then every ~1% (the check sorts the samples)."""
    return n <= 1000 or n % max(1, n // 100) == 0


def measure_latency(
    fn: Callable,
    *args: Any,
    device: str | None = None,
    min_warmup: int = 3,
    max_warmup: int = 200,
    warmup_window: int = 5,
    warmup_rtol: float = 0.05,
    min_samples: int = 10,
    max_samples: int = 100_000,
    min_time_s: float | None = None,
    target_rel_ci: float = 0.01,
    max_time_s: float = 10.0,
    l2_flush: bool = False,
    hide_launch: bool = False,
    cuda_graph: bool = False,
    threads: int | None = None,
    detect_sync: bool = True,
    label: str | None = None,
    clock: Callable[[], int] | None = None,
    synchronizer: Callable[[], None] | None = None,
    nvml=None,
    cpu_snapshot: Callable | None = None,
) -> LatencyResult:
    """Latency of ``fn(*args)``: warm up until steady, then sample for at least ``min_time_s`` until the CI is tight.

    ``min_time_s`` defaults to ``MIN_TIME_S`` (capped by ``max_time_s``, which bounds
    warm-up and sampling each). ``threads=None``: on a CPU, chosen from the physical
    cores and the current load; on a GPU, torch's current setting.
    ``clock() -> ns`` and ``synchronizer()`` are injectable (tests use a scripted
    clock); on a GPU the default is a CUDA event pair per sample. ``nvml``: None opens
    NVML for a CUDA device, False turns GPU monitoring off, or an object with
    ``read() -> machine_state.GpuReading`` and ``other_processes()`` (tests).
    ``hide_launch``: time the GPU's work without the host's launch overhead, calls back to
    back in bursts (see ``_Sampler``); the default includes it, as a caller of ``fn`` waits
    for it. ``cuda_graph``: time replays of a graph of enough calls to fill ~5 ms, one sample
    per replay (the replay's time over its calls; see the module docstring).
    ``cpu_snapshot() -> machine_state.CpuSnapshot`` is injectable too. See the module
    docstring for the reasoning behind each step.
    """
    if not callable(fn):
        raise ToolkitError(f"fn must be a callable (a model or function to time), got {type(fn).__name__} {fn!r:.40}")
    if min_samples < 1 or max_samples < min_samples:
        raise ToolkitError(f"need 1 <= min_samples <= max_samples, got {min_samples} and {max_samples}")
    if min_time_s is not None and min_time_s < 0:
        raise ToolkitError(f"min_time_s must be >= 0, got {min_time_s}")
    warm_rule = _WarmUp(min_warmup, max_warmup, warmup_window, warmup_rtol, max_time_s)
    warm_rule.check()
    device = infer_device(fn, args, device)
    if cuda_graph and not device.startswith("cuda"):
        raise ToolkitError("cuda_graph=True needs a CUDA device")
    min_time = min(MIN_TIME_S if min_time_s is None else float(min_time_s), max_time_s)
    rig = _Rig(device, threads, l2_flush, clock, synchronizer, nvml, cpu_snapshot, hide_launch)
    notes = list(rig.notes)
    sample = rig.sample

    def eager():
        fn(*args)

    with rig.active():
        call = eager
        side = None
        if cuda_graph:  # eager calls before capture go on a side stream, as torch.cuda.graphs requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            first_ms, t_start = sample(eager)
        if detect_sync and rig.on_cuda:
            found = _detect_transfers_cuda(eager)
            if found:
                msg = "host<->device transfer or sync inside the timed function: " + "; ".join(found)
                notes.append(msg)
                warnings.warn(msg, LatencyWarning, stacklevel=2)
        graph_calls = 1
        if cuda_graph:
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager()
            torch.cuda.current_stream().wait_stream(side)
            graph = _capture(fn, args, 1)
            if not l2_flush:  # a flushed graph keeps one call, so that every call finds a cold L2
                graph_calls = _graph_calls(_replay_ms(graph))
            if graph_calls > 1:
                del graph
                graph = _capture(fn, args, graph_calls)
            call = graph.replay

        def timed(c: Callable) -> tuple[float, int]:  # one sample: a call, or a replay's time per call
            ms, now = sample(c)
            return ms / graph_calls, now

        # warm-up until steady (the first call counts when it was the same kind of call)
        warm = [first_ms] if not cuda_graph else []
        if not warm_rule.run(timed, call, warm, t_start, rig.gpu):
            notes.append(warm_rule.note(len(warm)))

        # sampling: at least min_samples and min_time, then until the CI is tight (or a cap)
        samples: list[float] = []
        t0 = None
        stop = ""
        while not stop:
            ms, now = timed(call)
            if t0 is None:
                t0 = now - round(ms * 1e6)  # the clock reading when sampling started
                rig.start_watch(t0)
            samples.append(ms)
            n = len(samples)
            if rig.gpu is not None:
                rig.gpu.poll(now, n)
            if n < min_samples:
                continue
            elapsed = (now - t0) / 1e9
            if elapsed >= min_time and _due(n):
                kept, _, _ = _kept(samples, rig.flags(n), min(min_samples, 10))
                if rel_ci_halfwidth(kept) <= target_rel_ci:
                    stop = "ci"
            if not stop and n >= max_samples:
                stop = "max_samples"
            elif not stop and elapsed >= max_time_s:
                stop = "time"
        rig.stop_watch(now, len(samples))

    kept, throttled, note = _kept(samples, rig.flags(len(samples)), min(min_samples, 10))
    if note:
        notes.append(note)
    rel = rel_ci_halfwidth(kept)
    if rel > target_rel_ci:
        notes.append(f"95% CI of the median is +-{100 * rel:.1f}%, above the "
                     f"{100 * target_rel_ci:.1f}% target (stopped by {stop})")
    from .env import environment

    options = dict(rig.options(), cuda_graph=bool(cuda_graph), target_rel_ci=target_rel_ci, max_time_s=max_time_s,
                   min_time_s=min_time, min_samples=min_samples, warmup_window=warmup_window, warmup_rtol=warmup_rtol)
    if cuda_graph:
        options["graph_calls"] = graph_calls
    result = LatencyResult(
        samples_ms=tuple(kept),
        warmup_count=len(warm),
        first_call_ms=first_ms,
        warmup_ms=tuple(warm),
        env=environment(device, rig.threads),
        label=label,
        device=device,
        options=options,
        notes=tuple(notes),
        stop_reason=stop,
        throttled_ms=tuple(throttled),
        gpu_state=rig.gpu_state(),
        cpu_state=rig.cpu_state,
    )
    _warn(result, label)
    return result


def _warn(result: LatencyResult, label: str | None) -> None:
    """Raise a LatencyWarning for a high spread or an unreliable number (the result keeps them all)."""
    doubts = [w for w in result.warnings if w.startswith("high spread")] + result.unreliable
    if doubts:
        warnings.warn(f"{label or 'measurement'}: " + "; ".join(dict.fromkeys(doubts)), LatencyWarning, stacklevel=3)


# ---------------------------------------------------------------------------- A/B comparison


@dataclass(frozen=True)
class Comparison:
    """B against A: both sides' samples from interleaved rounds, the ratio B/A with its CI, and a verdict.

    ``ratio`` is the Hodges-Lehmann estimate of B's latency over A's (below 1: B is
    faster) and ``ci`` its distribution-free confidence interval; ``verdict`` is
    "faster", "slower", "same" or "inconclusive" and describes B relative to A
    (see the module docstring for the rule and the reasons behind it).
    """

    a: LatencyResult
    b: LatencyResult
    margin: float = EQUIVALENCE_MARGIN
    confidence: float = 0.95
    round_sizes: tuple[tuple[int, int], ...] = ()  # calls of (A, B) in each interleaved round, in order
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "round_sizes", tuple((int(x), int(y)) for x, y in self.round_sizes))
        object.__setattr__(self, "notes", tuple(self.notes))

    @classmethod
    def from_samples(cls, a_ms, b_ms, *, label_a: str = "A", label_b: str = "B",
                     margin: float = EQUIVALENCE_MARGIN, confidence: float = 0.95) -> Comparison:
        """A comparison of two plain sample sequences (ms), e.g. read from files."""
        return cls(LatencyResult(samples_ms=tuple(a_ms), label=label_a),
                   LatencyResult(samples_ms=tuple(b_ms), label=label_b), margin=margin, confidence=confidence)

    @property
    def label_a(self) -> str:
        return self.a.label or "A"

    @property
    def label_b(self) -> str:
        return self.b.label or "B"

    @cached_property
    def _shift(self) -> tuple[float, float, float]:
        if not self.a.samples_ms or not self.b.samples_ms:
            return (math.nan, math.nan, math.nan)
        return shift_estimate(np.log(self.a._arr()), np.log(self.b._arr()), self.confidence)

    @property
    def ratio(self) -> float:
        """Hodges-Lehmann estimate of latency(B) / latency(A)."""
        return math.exp(self._shift[0])

    @property
    def ci(self) -> tuple[float, float]:
        """Confidence interval of ``ratio`` at ``confidence``."""
        return (math.exp(self._shift[1]), math.exp(self._shift[2]))

    @property
    def ratio_of_medians(self) -> float:
        return self.b.median_ms / self.a.median_ms if self.a.median_ms > 0 else math.nan

    @cached_property
    def p_value(self) -> float:
        """Two-sided Mann-Whitney U test of "A and B have the same latency distribution"."""
        if self.a.n_samples < 1 or self.b.n_samples < 1:
            return math.nan
        from scipy.stats import mannwhitneyu

        return float(mannwhitneyu(self.b.samples_ms, self.a.samples_ms, alternative="two-sided").pvalue)

    @property
    def band(self) -> tuple[float, float]:
        """The equivalence band of the ratio: [1 / (1 + margin), 1 + margin]."""
        return (1.0 / (1.0 + self.margin), 1.0 + self.margin)

    @property
    def verdict(self) -> str:
        """"same" (CI inside the band), "faster" (CI below 1), "slower" (above 1), else "inconclusive"."""
        lo, hi = self.ci
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return "inconclusive"
        band_lo, band_hi = self.band
        if lo >= band_lo and hi <= band_hi:
            return "same"
        if hi < 1.0:
            return "faster"
        if lo > 1.0:
            return "slower"
        return "inconclusive"

    @property
    def summary(self) -> str:
        """One sentence: the verdict in words."""
        v, a, b = self.verdict, self.label_a, self.label_b
        pct = 100 * abs(self.ratio - 1)
        if v == "faster":
            return f"{b} is faster than {a}: {pct:.1f}% less time (B/A = {self.ratio:.3f})"
        if v == "slower":
            return f"{b} is slower than {a}: {pct:.1f}% more time (B/A = {self.ratio:.3f})"
        if v == "same":
            return f"{b} and {a} take the same time within +-{100 * self.margin:g}% (B/A = {self.ratio:.3f})"
        return (f"inconclusive: B/A = {self.ratio:.3f} but the {100 * self.confidence:g}% CI spans 1 and leaves the "
                f"+-{100 * self.margin:g}% band; measure more rounds")

    def _side_lines(self, attr: str) -> list[str]:
        wa, wb = getattr(self.a, attr), getattr(self.b, attr)
        both = [w for w in wa if w in wb]  # the machine's state is shared: say it once
        out = list(both)
        out += [f"{self.label_a} (A): {w}" for w in wa if w not in both]
        out += [f"{self.label_b} (B): {w}" for w in wb if w not in both]
        return list(dict.fromkeys(out))

    @property
    def warnings(self) -> list[str]:
        return list(self.notes) + self._side_lines("warnings")

    @property
    def unreliable(self) -> list[str]:
        """Reasons the verdict cannot be trusted (contention, huge spread on either side)."""
        return [w for w in self._side_lines("unreliable") if "wide interval" not in w]

    # conversions
    def to_dict(self) -> dict:
        lo, hi = self.ci
        return {
            "label_a": self.label_a, "label_b": self.label_b, "verdict": self.verdict, "summary": self.summary,
            "ratio": self.ratio, "ci": [lo, hi], "ratio_of_medians": self.ratio_of_medians, "p_value": self.p_value,
            "margin": self.margin, "confidence": self.confidence, "round_sizes": [list(r) for r in self.round_sizes],
            "warnings": self.warnings, "unreliable": self.unreliable, "notes": list(self.notes),
            "a": self.a.to_dict(), "b": self.b.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Comparison:
        """Inverse of ``to_dict`` (the statistics are recomputed from the samples)."""
        return cls(a=LatencyResult.from_dict(d["a"]), b=LatencyResult.from_dict(d["b"]),
                   margin=float(d.get("margin", EQUIVALENCE_MARGIN)), confidence=float(d.get("confidence", 0.95)),
                   round_sizes=tuple(tuple(r) for r in d.get("round_sizes") or ()), notes=tuple(d.get("notes") or ()))

    def to_json(self) -> str:
        from .results import to_jsonable

        return json.dumps(to_jsonable(self.to_dict()), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Comparison:
        return cls.from_dict(json.loads(text))

    def rounds_of(self, side: str) -> list[int] | None:
        """The round of each kept sample of ``side`` ("a" or "b"); None when throttled samples were left out."""
        res, col = (self.a, 0) if side == "a" else (self.b, 1)
        sizes = [r[col] for r in self.round_sizes]
        if sum(sizes) != res.n_samples:
            return None
        return [i for i, k in enumerate(sizes) for _ in range(k)]

    def to_dataframe(self, samples: bool = False):
        """One summary row; or with ``samples=True`` one row per sample (side, label, round, index, latency_ms)."""
        import pandas as pd

        if samples:
            frames = []
            for side, res in (("A", self.a), ("B", self.b)):
                rounds = self.rounds_of(side.lower())
                frames.append(pd.DataFrame({"side": side, "label": res.label or side,
                                            "round": rounds if rounds is not None else None,
                                            "index": range(res.n_samples), "latency_ms": res.samples_ms}))
            return pd.concat(frames, ignore_index=True)
        lo, hi = self.ci
        return pd.DataFrame([{
            "label_a": self.label_a, "label_b": self.label_b, "median_a_ms": self.a.median_ms,
            "median_b_ms": self.b.median_ms, "ratio": self.ratio, "ci_low": lo, "ci_high": hi,
            "ratio_of_medians": self.ratio_of_medians, "p_value": self.p_value, "verdict": self.verdict,
            "margin": self.margin, "confidence": self.confidence, "n_a": self.a.n_samples, "n_b": self.b.n_samples,
            "rounds": len(self.round_sizes), "device": self.a.device, "n_warnings": len(self.warnings),
            "reliable": not self.unreliable,
        }])

    def __repr__(self) -> str:
        lo, hi = self.ci
        conf = f"{100 * self.confidence:g}%"
        lines = [f"Comparison(B {self.label_b!r} vs A {self.label_a!r} on {self.a.device}, "
                 f"{len(self.round_sizes) or '?'} interleaved rounds)"]
        for tag, res in (("A", self.a), ("B", self.b)):
            rlo, rhi = res.ci95_ms
            lines.append(f"  {tag} {res.label or tag}: median {res.median_ms:.4g} ms, 95% CI [{rlo:.4g}, {rhi:.4g}],"
                         f" n={res.n_samples}")
        lines.append(f"  B/A = {self.ratio:.4f}, {conf} CI [{lo:.4f}, {hi:.4f}] (Hodges-Lehmann);"
                     f" Mann-Whitney p = {self.p_value:.2g}")
        lines.append(f"  verdict: {self.verdict.upper()}: {self.summary}")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.__repr__()


def compare(
    a: Callable,
    b: Callable,
    *,
    args_a: tuple = (),
    args_b: tuple = (),
    device: str | None = None,
    rounds: int = 10,
    round_time_s: float = 0.1,
    min_round_calls: int = 10,
    max_round_calls: int = 5000,
    max_time_s: float = 120.0,
    margin: float = EQUIVALENCE_MARGIN,
    confidence: float = 0.95,
    threads: int | None = None,
    l2_flush: bool = False,
    hide_launch: bool = False,
    min_warmup: int = 3,
    max_warmup: int = 200,
    warmup_window: int = 5,
    warmup_rtol: float = 0.05,
    label_a: str = "A",
    label_b: str = "B",
    clock: Callable[[], int] | None = None,
    synchronizer: Callable[[], None] | None = None,
    nvml=None,
    cpu_snapshot: Callable | None = None,
) -> Comparison:
    """Is ``b(*args_b)`` faster than ``a(*args_a)``? Interleaved rounds, the ratio B/A with its CI, a verdict.

    Each side is warmed up until steady, then ``rounds`` rounds alternate the order
    (A-B, B-A, ...); in each, a side is called for at least ``round_time_s`` and
    ``min_round_calls`` calls (at most ``max_round_calls``). The default budget is
    about 2 s for calls of 10 ms or less (at least 100 samples a side). Rounds stop
    early only when ``max_time_s`` runs out. Threads, clocks, NVML and the CPU
    snapshot work as in ``measure_latency``.
    """
    if not callable(a) or not callable(b):
        raise ToolkitError("compare needs two callables a and b")
    if rounds < 1 or min_round_calls < 1 or max_round_calls < min_round_calls:
        raise ToolkitError(f"need rounds >= 1 and 1 <= min_round_calls <= max_round_calls, got {rounds}, "
                           f"{min_round_calls}, {max_round_calls}")
    if not 0 < margin < 1:
        raise ToolkitError(f"margin must be in (0, 1), got {margin}")
    if not 0 < confidence < 1:
        raise ToolkitError(f"confidence must be in (0, 1), got {confidence}")
    warm_rule = _WarmUp(min_warmup, max_warmup, warmup_window, warmup_rtol, min(10.0, max_time_s))
    warm_rule.check()
    args_a, args_b = tuple(args_a), tuple(args_b)
    device = infer_device(a, args_a, device)
    rig = _Rig(device, threads, l2_flush, clock, synchronizer, nvml, cpu_snapshot, hide_launch)
    calls = {"a": lambda: a(*args_a), "b": lambda: b(*args_b)}
    notes = list(rig.notes)
    side_notes: dict[str, list[str]] = {"a": [], "b": []}
    warm: dict[str, list[float]] = {}
    values: list[float] = []  # every sample, in the order taken
    sides: list[str] = []  # "a" or "b" for each
    sizes: list[tuple[int, int]] = []
    with rig.active():
        for side in "ab":
            first_ms, t_start = rig.sample(calls[side])
            warm[side] = [first_ms]
            if not warm_rule.run(rig.sample, calls[side], warm[side], t_start, rig.gpu):
                side_notes[side].append(warm_rule.note(len(warm[side])))
        t0 = None
        for r in range(rounds):
            done = {}
            for side in ("ab" if r % 2 == 0 else "ba"):
                burst_start, k = None, 0
                while True:
                    ms, now = rig.sample(calls[side])
                    begun = now - round(ms * 1e6)
                    if t0 is None:
                        t0 = begun
                        rig.start_watch(t0)
                    burst_start = begun if burst_start is None else burst_start
                    values.append(ms)
                    sides.append(side)
                    k += 1
                    if rig.gpu is not None:
                        rig.gpu.poll(now, len(values))
                    if k >= max_round_calls or (k >= min_round_calls and (now - burst_start) / 1e9 >= round_time_s):
                        break
                done[side] = k
            sizes.append((done["a"], done["b"]))
            if (now - t0) / 1e9 >= max_time_s and r + 1 < rounds:
                notes.append(f"stopped after {r + 1} of {rounds} rounds: the {max_time_s:g} s budget ran out")
                break
        rig.stop_watch(now, len(values))

    from .env import environment

    env = environment(device, rig.threads)
    flags = rig.flags(len(values))
    options = dict(rig.options(), rounds=len(sizes), round_time_s=round_time_s, min_round_calls=min_round_calls)
    results = {}
    for side, label in (("a", label_a), ("b", label_b)):
        mine = [(v, f) for v, s, f in zip(values, sides, flags) if s == side]
        kept, throttled, note = _kept([v for v, _ in mine], [f for _, f in mine], min(min_round_calls, 10))
        results[side] = LatencyResult(
            samples_ms=tuple(kept), warmup_count=len(warm[side]), first_call_ms=warm[side][0],
            warmup_ms=tuple(warm[side]), env=env, label=label, device=device, options=options,
            notes=tuple(side_notes[side] + ([note] if note else [])), stop_reason="rounds",
            throttled_ms=tuple(throttled), gpu_state=rig.gpu_state(), cpu_state=rig.cpu_state)
    result = Comparison(results["a"], results["b"], margin=margin, confidence=confidence, round_sizes=tuple(sizes),
                        notes=tuple(notes))
    if result.unreliable:
        warnings.warn(f"compare({label_a}, {label_b}): " + "; ".join(result.unreliable), LatencyWarning, stacklevel=2)
    return result


# ---------------------------------------------------------------------------- a benchmark model by name

MODEL_DTYPES = ("float32", "bfloat16", "float16")


def check_model_latency(model: str, batch_size: int, dtype: str, threads: int | None, max_time_s: float | None,
                        target_rel_ci: float) -> None:
    """A ToolkitError naming the argument ``measure_model_latency`` would reject; builds nothing.

    Separate so that a sweep can check every point before it submits one.
    """
    from .models import MODEL_NAMES

    if model not in MODEL_NAMES:
        raise ToolkitError(f"unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ToolkitError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if dtype not in MODEL_DTYPES:
        raise ToolkitError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ToolkitError(f"threads must be an integer >= 1, got {threads!r}")
    if max_time_s is not None and not max_time_s > 0:
        raise ToolkitError(f"max_time_s must be positive, got {max_time_s}")
    if not 0 < target_rel_ci < 1:
        raise ToolkitError(f"target_rel_ci must be in (0, 1), got {target_rel_ci}")


def measure_model_latency(model: str = "efficientnet-b0", batch_size: int = 1, *, device: str = "auto",
                          dtype: str = "float32", threads: int | None = None, max_time_s: float | None = None,
                          target_rel_ci: float = 0.01, l2_flush: bool = False,
                          cuda_graph: bool = False) -> LatencyResult:
    """Latency of a named benchmark model (``toolkit.models``) at a batch size: the ``latency`` command's call.

    ``max_time_s`` None caps sampling at 10 s on a GPU and 3 s on a CPU: a GPU
    call is short, so 10 s buys thousands of samples and time for the clocks to
    settle, while a CPU call is long and 3 s already gives a tight CI.
    """
    from .env import resolve_device
    from .models import build_model

    check_model_latency(model, batch_size, dtype, threads, max_time_s, target_rel_ci)
    device = resolve_device(device)
    bench = build_model(model, device=device, dtype=getattr(torch, dtype))
    if max_time_s is None:
        max_time_s = 10.0 if device.startswith("cuda") else 3.0
    from .trials import does_not_fit

    try:  # a batch too large for memory is bad input: one line naming it, not an allocator traceback
        inputs = bench.make_input(batch_size)
        return measure_latency(bench, *inputs, device=device, max_time_s=max_time_s, target_rel_ci=target_rel_ci,
                               l2_flush=l2_flush, cuda_graph=cuda_graph, threads=threads, label=model)
    except Exception as e:
        why = does_not_fit(e)
        if why is None:
            raise
    raise ToolkitError(f"batch_size {batch_size} does not fit on {device}: {why}")
