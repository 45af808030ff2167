"""The classic GPU timing mistakes as runnable naive timers, and ``audit()`` comparing each to the correct timer.

GPU work is asynchronous: a Python call only *queues* kernels. Each naive timer
below makes exactly one mistake (and is otherwise careful), so its error is that
mistake's error on your hardware:

- ``copy_in_timed_region``: the input lives on the host and ``.to(device)`` runs inside the timed region.
- ``no_warmup``: the first few calls are timed (lazy loading, allocator growth, autotuning).
- ``host_clock_no_sync``: ``perf_counter`` around the call without ``torch.cuda.synchronize()``,
  which measures the kernel *launches*, not the work.
- ``single_sample``: one call timed once; how far a single shot can be from the median.
- ``cudnn_benchmark``: with ``torch.backends.cudnn.benchmark = True`` the first call autotunes
  the convolutions; timing it reports the autotuning.

On a CPU, the GPU-only mistakes are reported as NaN with "not applicable on CPU":
there is nothing to copy, nothing asynchronous and no cuDNN.

Every error is relative to the correct timer's median, so it is only as good as
that median. When the correct measurement is unreliable (other work on the CPU
or GPU, a huge spread: ``LatencyResult.unreliable``), the audit says so in its
``reliable`` column and in ``frame.attrs["warnings"]``, instead of presenting a
negative or absurd error as a finding.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from .machine_state import auto_threads
from .timing import LatencyResult, measure_latency

CPU_NA = "not applicable on CPU"
PITFALLS = ("copy_in_timed_region", "no_warmup", "host_clock_no_sync", "single_sample", "cudnn_benchmark")
GPU_ONLY = ("copy_in_timed_region", "host_clock_no_sync", "cudnn_benchmark")


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# ---------------------------------------------------------------------------- the naive timers


@torch.inference_mode()
def time_no_warmup(model: Callable, inputs: tuple, device: str, n: int = 5) -> list[float]:
    """Mistake: time the first ``n`` calls (synchronized, so only the warm-up is missing)."""
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        model(*inputs)
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.inference_mode()
def time_copy_in_timed_region(model: Callable, host_inputs: tuple, device: str, n: int = 20) -> list[float]:
    """Mistake: the host->device copy of the input is inside the timed region."""
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        model(*(x.to(device) for x in host_inputs))  # the copy is timed too
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.inference_mode()
def time_host_clock_no_sync(model: Callable, inputs: tuple, device: str, n: int = 20) -> list[float]:
    """Mistake: host clock around the call with no synchronize; measures launching, not running."""
    _sync(device)  # start from an idle GPU: only the missing sync inside the loop is wrong
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(*inputs)
        out.append((time.perf_counter() - t0) * 1e3)  # kernels may still be running
    _sync(device)  # drain the queue, outside any timing
    return out


def single_sample_error(result: LatencyResult) -> tuple[float, float]:
    """Mistake: one timed call. Returns (the single-shot value farthest from the median, that median)."""
    med = result.median_ms
    worst = max(result.samples_ms, key=lambda s: abs(s - med))
    return worst, med


@torch.inference_mode()
def time_cudnn_benchmark_first_call(model: Callable, inputs: tuple, device: str) -> float:
    """Mistake: time the first call after turning on cudnn.benchmark (it autotunes every conv shape)."""
    _sync(device)
    t0 = time.perf_counter()
    model(*inputs)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------- the audit


def _row(pitfall, naive, correct, note, reliable=True):
    rel = (naive - correct) / correct if (correct and not math.isnan(naive) and not math.isnan(correct)) else math.nan
    return dict(pitfall=pitfall, naive_ms=naive, correct_ms=correct, relative_error=rel, note=note,
                reliable=bool(reliable))


def audit_warnings(correct: LatencyResult, tuned: LatencyResult | None = None) -> list[str]:
    """The audit-level warnings: whether its errors can be trusted, then the correct timer's own warnings."""
    out = []
    for name, res in (("correct", correct), ("cudnn.benchmark steady-state", tuned)):
        if res is not None and res.unreliable:
            out.append(f"the {name} measurement is unreliable ({'; '.join(res.unreliable)}): the relative errors "
                       "measured against it are not trustworthy")
    return out + [f"correct timer: {w}" for w in correct.warnings]


def audit(model: Callable, example_input, device: str, n: int = 20, max_time_s: float | None = None,
          threads: int | None = None):
    """Time ``model(*example_input)`` with each naive timer and with ``measure_latency``; one row per pitfall.

    Columns: pitfall, naive_ms, correct_ms, relative_error ((naive - correct) / correct), note, reliable
    (False when the measurement the row is compared with is unreliable: see the module docstring).
    Call it on a freshly built model: the ``no_warmup`` row times the very first calls.
    The correct ``LatencyResult`` is kept in ``frame.attrs["correct"]`` and the audit's warnings in
    ``frame.attrs["warnings"]``. Every timer runs with the same thread count: ``threads``, or on a CPU
    the one ``machine_state.auto_threads`` picks for the current load.
    """
    import pandas as pd

    device = str(device)
    gpu = device.startswith("cuda")
    if max_time_s is None:
        max_time_s = 5.0 if gpu else 2.0
    host_inputs = tuple(x.cpu() for x in _as_tuple(example_input))  # pageable host memory, as a naive user has
    inputs = tuple(x.to(device) for x in host_inputs)
    old_threads = torch.get_num_threads()
    if not threads:  # one count for every timer, naive or not: like is compared with like
        threads = old_threads if gpu else auto_threads()
    torch.set_num_threads(threads)
    old_cudnn = torch.backends.cudnn.benchmark
    rows = {name: _row(name, math.nan, math.nan, CPU_NA) for name in GPU_ONLY}
    tuned = None
    try:
        torch.backends.cudnn.benchmark = False
        cold = time_no_warmup(model, inputs, device, n=5)  # first: the model must still be cold
        correct = measure_latency(model, *inputs, device=device, max_time_s=max_time_s, threads=threads,
                                  label="correct")
        med = correct.median_ms
        ok = not correct.unreliable

        rows["no_warmup"] = _row("no_warmup", statistics.mean(cold), med,
                                 f"mean of the first {len(cold)} calls; the first alone took {cold[0]:.3g} ms", ok)
        worst, _ = single_sample_error(correct)
        rows["single_sample"] = _row(
            "single_sample", worst, med,
            f"worst of {correct.n_samples} single shots (range {correct.min_ms:.3g}-{correct.max_ms:.3g} ms,"
            f" p5-p95 {np.percentile(correct.samples_ms, 5):.3g}-{correct.p95_ms:.3g} ms)", ok)
        if gpu:
            copy = statistics.median(time_copy_in_timed_region(model, host_inputs, device, n))
            rows["copy_in_timed_region"] = _row("copy_in_timed_region", copy, med,
                                                f"median of {n} calls with the input's .to({device!r}) timed", ok)
            launch = statistics.median(time_host_clock_no_sync(model, inputs, device, n))
            rows["host_clock_no_sync"] = _row("host_clock_no_sync", launch, med,
                                              f"median of {n} calls; times the kernel launches, not the GPU work", ok)
            torch.backends.cudnn.benchmark = True
            first = time_cudnn_benchmark_first_call(model, inputs, device)
            tuned = measure_latency(model, *inputs, device=device, max_time_s=max_time_s / 2, threads=threads,
                                    detect_sync=False, label="cudnn.benchmark steady")
            rows["cudnn_benchmark"] = _row("cudnn_benchmark", first, tuned.median_ms,
                                           "first call with cudnn.benchmark=True (autotuning) vs its steady state",
                                           not tuned.unreliable)
    finally:
        torch.backends.cudnn.benchmark = old_cudnn
        torch.set_num_threads(old_threads)
    columns = ["pitfall", "naive_ms", "correct_ms", "relative_error", "note", "reliable"]
    frame = pd.DataFrame([rows[name] for name in PITFALLS], columns=columns)
    frame.attrs["correct"] = correct
    frame.attrs["device"] = device
    frame.attrs["threads"] = threads
    frame.attrs["warnings"] = audit_warnings(correct, tuned)
    return frame

