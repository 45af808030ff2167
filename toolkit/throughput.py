"""Throughput: the largest batch that fits, samples per second, and where throughput peaks.

The recipe: (1) find the largest batch that fits in memory by growing 1, 2, 4, ...
until out-of-memory, then bisecting to the exact boundary; (2) time many batches
back to back and report batches x batch size / seconds; (3) check that the
largest batch is really the fastest (often it is not: past some size the GPU is
saturated and bigger batches only add memory traffic).

Design decisions, and the mistakes of other batch finders they avoid:

- No built-in upper cap (Lightning stops at 8192; an H200 fits far more), no
  shrink-by-10% loop (accelerate): growth then bisection gives the exact answer
  in at most ceil(log2(max)) probes beyond the growth phase.
- What one trial does (recognise out-of-memory by type, recover after the
  ``except`` block, check memory is back at its baseline, run CPU trials in a
  memory-limited child process) is ``toolkit.trials``'s docstring.
- On GPU the caching allocator's history shifts the boundary a little;
  ``isolation="fresh"`` runs every trial in a new process. On CPU it can move
  by a fraction of a percent between trials too; ``verify`` re-runs the
  answer, steps down by bisection to a batch that fits every time, and
  reports the boundary as the range it moved in, with the probes as evidence.

Throughput is timed with CUDA events recorded between back-to-back batches
(no synchronisation inside the timed region, so launches overlap as in a real
pipeline) after warm-up batches; on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .env import infer_device, is_cuda
from .errors import ToolkitError
from .trials import (  # noqa: F401  (Probe, SIZE_LIMIT, is_oom, does_not_fit, make_batch, run_trial: public here too)
    SIZE_LIMIT,
    Probe,
    TrialProcess,
    does_not_fit,
    is_oom,
    make_batch,
    memory_limit,
    preflight,
    release_memory,
    run_trial,
    trial_limit,
    warm_up,
)

# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class BatchSearchResult:
    """The largest batch that fits and every probe tried to find it."""

    max_batch_size: int
    probes: tuple[Probe, ...]
    bounded: bool = False  # stopped at the user's max_batch: the true limit may be higher
    verified: bool | None = None  # the "check" probes agreed (max fits every time, max + 1 does not); see boundary
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_memory: int | None = None  # the memory limit trials ran under (bytes), None = the device's own
    headroom: int | None = None  # or: the limit was the trial process's own use before the batch + this
    isolation: str = "none"
    baseline_bytes: int | None = None
    env: dict = field(default_factory=dict, compare=False)
    upper_bound: int | None = None  # the smallest batch seen not to fit (None: every probe fitted)
    budget_spent: bool = False  # the time budget ran out: the answer is a bound, not the exact largest batch
    time_budget_s: float | None = None

    @property
    def exact(self) -> bool:
        """The search finished: ``max_batch_size`` is the exact largest batch (or the user's bound)."""
        return not self.budget_spent

    @property
    def highest_fit(self) -> int:
        """The largest batch that fitted in any probe: above ``max_batch_size`` when the boundary moved between trials."""
        return max((p.batch_size for p in self.probes if p.fits), default=self.max_batch_size)

    @property
    def boundary(self) -> tuple[int, int]:
        """(``max_batch_size``, ``highest_fit``): one number when every trial agreed, else the range it moved in."""
        return self.max_batch_size, max(self.highest_fit, self.max_batch_size)

    @property
    def memory_at_baseline(self) -> bool | None:
        """Every probe left memory at the baseline (None where it could not be measured)."""
        flags = [p.memory_at_baseline for p in self.probes if p.memory_at_baseline is not None]
        return all(flags) if flags else None

    def count(self, phase: str) -> int:
        return sum(p.phase == phase for p in self.probes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["probes"] = [p.to_dict() for p in self.probes]
        d["memory_at_baseline"] = self.memory_at_baseline
        d["exact"] = self.exact
        d["highest_fit"] = self.highest_fit
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BatchSearchResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["probes"] = tuple(Probe(**p) for p in d["probes"])
        return cls(**kw)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([p.to_dict() for p in self.probes])

    def __repr__(self) -> str:
        fits = "".join("+" if p.fits else "x" for p in self.probes)
        bound = " (user bound)" if self.bounded else ""
        if self.budget_spent:
            bound = (" (time budget spent: a lower bound, " + (f"{self.upper_bound} does not fit)"
                                                                if self.upper_bound else "no batch failed yet)"))
        return (f"BatchSearchResult({self.model or 'model'} on {self.device}: max_batch_size={self.max_batch_size}"
                f"{bound}, {len(self.probes)} probes [{fits}], memory_at_baseline={self.memory_at_baseline})")


# ---------------------------------------------------------------------------------------------------------------
# The search itself: pure logic over a trial function, so tests can assert the exact probe sequence.


def search_batch_size(trial: Callable[[int], Probe], min_batch: int = 1, max_batch: int | None = None,
                      verify: int = 0, on_probe: Callable[[Probe], None] | None = None,
                      stop: Callable[[int], bool] | None = None) -> BatchSearchResult:
    """Grow min_batch, 2x, 4x, ... until a trial does not fit, then bisect to the exact largest batch.

    ``trial(batch_size) -> Probe`` runs one attempt. Beyond the growth phase
    the bisection needs at most ceil(log2(answer)) probes. ``max_batch`` is an
    optional user bound (there is no built-in one). ``verify`` > 0 re-runs the
    answer that many times and tries answer + 1 once ("check" probes); if a
    re-run of the answer fails (the boundary is not reproducible), the answer
    steps down, 1, 2, 4, ... below it and then by bisection, to the largest
    batch whose re-runs all fit (each re-run series stops at its first
    failure). The boundary is then a range, ``boundary``: ``max_batch_size``
    (fits every time) to ``highest_fit`` (fitted at least once), and the
    probes are its evidence. ``verified``: the boundary reproduced (the first
    answer fitted in all its re-runs and the batch above it did not fit);
    False after a step-down.

    ``stop(batch_size) -> True`` (asked before every probe after the first,
    with the batch it would try; a time budget, say) ends the search early: the result then has
    ``budget_spent=True``, ``max_batch_size`` the largest batch seen to fit and
    ``upper_bound`` the smallest seen not to fit (None if none failed yet), and
    the check probes are skipped. A probe already running is never cut short.
    """
    if min_batch < 1:
        raise ToolkitError(f"the smallest batch must be >= 1, got {min_batch}")
    if max_batch is not None and max_batch < min_batch:
        raise ToolkitError(f"batch bounds reversed: min batch {min_batch} > max batch {max_batch}")
    probes: list[Probe] = []

    def run(batch_size: int, phase: str) -> bool:
        p = dataclasses.replace(trial(batch_size), batch_size=batch_size, phase=phase)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return p.fits

    if not run(min_batch, "grow"):
        why = f" ({probes[0].error})" if probes[0].error else ""
        raise ToolkitError(f"a batch of {min_batch} does not fit{why}")
    lo, hi = min_batch, None  # lo fits; hi (once known) does not
    spent = False

    def out_of_time(batch_size: int) -> bool:
        nonlocal spent
        spent = spent or (stop is not None and bool(stop(batch_size)))
        return spent

    while hi is None and lo != max_batch:
        nxt = 2 * lo if max_batch is None else min(2 * lo, max_batch)
        if out_of_time(nxt):
            break
        if run(nxt, "grow"):
            lo = nxt
        else:
            hi = nxt
    bounded = hi is None and not spent
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        if out_of_time(mid):
            break
        if run(mid, "bisect"):
            lo = mid
        else:
            hi = mid
    verified = None
    if verify > 0 and not spent:

        def reliable(b: int) -> bool:  # fits in every one of ``verify`` re-runs (stops at the first failure)
            return all(run(b, "check") for _ in range(verify))

        verified = reliable(lo)
        if not verified:
            # Near the limit, allocator and library workspaces vary from run to run: a batch that fits only
            # sometimes is not one a user can rely on. Step down 1, 2, 4, ... until a batch fits every time,
            # then bisect between it and the last one that did not: O(log gap) steps, not the gap itself.
            bad, step, good = lo, 1, None
            while good is None and bad > min_batch:
                b = max(min_batch, bad - step)
                if reliable(b):
                    good = b
                else:
                    bad, step = b, 2 * step
            while good is not None and bad - good > 1:
                mid = (good + bad) // 2
                if reliable(mid):
                    good = mid
                else:
                    bad = mid
            lo = min_batch if good is None else good
        elif not bounded:
            verified = not run(lo + 1, "check")
    return BatchSearchResult(max_batch_size=lo, probes=tuple(probes), bounded=bounded, verified=verified,
                             upper_bound=hi, budget_spent=spent)


def expected_probes(probes: Iterable[Probe], max_memory: int | None = None, max_batch: int | None = None,
                    verify: int = 0) -> int | None:
    """An estimate of how many probes the whole search will take, from the probes so far (a progress bar's total).

    Once a batch has failed, the bisection's remaining steps are exact. Before
    that, the memory per sample (the peak's growth between the two largest
    batches that fitted) and ``max_memory`` predict where the limit lies,
    hence how many more doublings and bisection steps it takes (the
    bisection's count is its upper bound, so the estimate can be one high).
    None while nothing predicts it (one probe so far, no limit, no growth in
    the peak).
    """
    probes = list(probes)
    if not probes:
        return None
    n = sum(p.phase != "check" for p in probes) if any(p.phase for p in probes) else len(probes)
    total = _expected_probes(probes, n, max_memory, max_batch, verify)
    return None if total is None else max(total, len(probes))


def _expected_probes(probes, n, max_memory, max_batch, verify):
    fitting = sorted((p.batch_size, p.peak_bytes) for p in probes if p.fits)
    failing = sorted(p.batch_size for p in probes if not p.fits)
    checks = verify + (1 if verify else 0)  # the re-runs of the answer, then answer + 1
    if not fitting:
        return n
    lo = fitting[-1][0]
    hi = next((b for b in failing if b > lo), None)
    if hi is None and max_batch is not None and lo >= max_batch:
        return n + verify  # at the user's bound: no answer + 1 check
    grow = 0
    if hi is None:
        known = [(b, m) for b, m in fitting if m is not None]
        if max_memory is None or len(known) < 2 or known[-1][1] <= known[-2][1]:
            return None
        (b1, m1), (b2, m2) = known[-2], known[-1]
        limit = b2 + max(0.0, (max_memory - m2) / ((m2 - m1) / (b2 - b1)))  # peak memory linear in the batch
        if max_batch is not None and limit >= max_batch:
            return n + math.ceil(math.log2(max_batch / lo)) + verify
        while lo * 2 ** grow <= limit:  # doublings until one does not fit
            grow += 1
        lo, hi = lo * 2 ** (grow - 1), lo * 2 ** grow
        if max_batch is not None:
            hi = min(hi, max_batch)
    return n + grow + max(0, math.ceil(math.log2(hi - lo))) + checks


# ---------------------------------------------------------------------------------------------------------------
# find_max_batch_size: the search wired to real trials.


def _resolve(model, make_input, device, dtype):
    """(callable, make_input, device, name, dtype name) for a BenchModel, a registered name or any callable."""
    name = None
    if isinstance(model, str):
        from .models import build_model

        name = model
        model = build_model(model, device=device or "cpu", dtype=dtype or torch.float32)
    if make_input is None:
        make_input = getattr(model, "make_input", None)
        if make_input is None:
            raise ToolkitError("pass make_input(batch_size) -> inputs for a model that has no make_input method")
    device = infer_device(model, (), device or None)
    dtype = getattr(model, "dtype", dtype) or torch.float32
    return model, make_input, str(device), getattr(model, "name", name), str(dtype).replace("torch.", "")


def find_max_batch_size(model, make_input: Callable | None = None, device: str | None = None, *,
                        dtype: torch.dtype | None = None, max_memory: int | None = None,
                        headroom: int | None = None, min_batch: int = 1,
                        max_batch: int | None = None, isolation: str = "auto", passes: int | None = None,
                        verify: int = 0, threads: int | None = None, progress: bool = False,
                        time_budget_s: float | None = None, on_probe: Callable[[Probe], None] | None = None,
                        reserve: float = 0.0, clock: Callable[[], float] = time.monotonic) -> BatchSearchResult:
    """The exact largest batch whose forward pass fits in memory, and the probes tried.

    ``model``: a registered model name, a ``BenchModel``, or any callable with
    ``make_input(batch_size)``. ``max_memory`` (bytes): on CPU the data segment
    limit of the trial process (model and runtime included), default: the
    memory available now; on GPU a cap via ``set_per_process_memory_fraction``
    (default: the whole GPU). ``headroom`` (bytes), instead: the limit is what
    the trial process holds before the batch (model, runtime) plus this.
    ``isolation``: "process" (a child process that builds the model; on CPU it
    forks a fresh copy of itself per trial; default on CPU), "fresh" (a new
    child process per trial) or "none" (this process; default on GPU; on CPU
    the limit then applies to this process, by default the memory available
    now on top of what it holds). Child processes need a registered model
    (they rebuild it by name).
    ``passes``: forward passes per trial (default 2 on GPU: the first also picks
    kernels and workspaces; 1 on CPU, which has no caching allocator); more run
    while the peak still grows. ``threads``: CPU threads in CPU trial processes
    (default 1; per-thread buffers are small next to a batch's activations,
    and with more threads the boundary moves further between runs).
    Reproducibility on CPU: the trials of one search are forks of one process,
    so they start from the same state, yet the boundary can still move by a
    fraction of a percent between trials and between runs (the heap and the
    kernel's memory accounting are not exactly repeatable). ``verify`` > 0
    measures that: the answer is then the largest batch that fitted in every
    re-run, and ``BatchSearchResult.boundary`` the range the limit moved in.
    ``time_budget_s``: no probe starts that would end more than this many
    seconds after the call (a probe's time is predicted from the largest
    batch that fitted so far, linear in the batch size; ``reserve`` x that
    time is kept free for work after the search, such as the throughput
    curve); the result then holds bounds, not the exact answer
    (``BatchSearchResult.exact`` is False). ``progress``
    shows a bar on stderr whose total (hence its ETA) is ``expected_probes``;
    ``on_probe(probe)`` is called after every probe. ``clock`` is injectable.
    """
    from .env import environment

    start = clock()
    if time_budget_s is not None and not time_budget_s > 0:
        raise ToolkitError(f"time_budget_s must be positive, got {time_budget_s!r}")

    if isinstance(model, str):  # a child process builds it by name; build here only for in-process trials
        name, device = model, str(device or "cpu")
        dtype_name = str(dtype or torch.float32).replace("torch.", "")
    else:
        model, make_input, device, name, dtype_name = _resolve(model, make_input, device, dtype)
    cuda = is_cuda(device)
    isolation = ("none" if cuda else "process") if isolation == "auto" else isolation
    if isolation not in ("none", "process", "fresh"):
        raise ToolkitError(f"unknown isolation {isolation!r}: use auto, none, process or fresh")
    if isolation == "none" and isinstance(model, str):
        model, make_input, device, name, dtype_name = _resolve(model, make_input, device, dtype)
    if isolation != "none" and name is None:
        raise ToolkitError("process isolation rebuilds the model by name: pass a registered model name "
                           "or a BenchModel, or isolation='none'")
    passes = passes or (2 if cuda else 1)
    if max_memory is not None and headroom is not None:
        raise ToolkitError("give max_memory or headroom, not both")
    if max_memory is None and headroom is None and not cuda:  # what is free now: a child's total, or our growth
        import psutil

        available = int(psutil.virtual_memory().available)
        max_memory, headroom = (None, available) if isolation == "none" else (available, None)
    for limit_name, v in (("max_memory", max_memory), ("headroom", headroom)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 2**60):
            raise ToolkitError(f"{limit_name} must be a positive number of bytes below 2**60, got {v!r}")
    max_memory = None if max_memory is None else int(max_memory)
    headroom = None if headroom is None else int(headroom)
    if cuda and max_memory is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        if max_memory > total:
            raise ToolkitError(f"max_memory {max_memory / 2**30:.1f} GiB exceeds the GPU's {total / 2**30:.1f} GiB")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"batch search {name or ''}".strip(), unit="trial", file=sys.stderr, leave=False)
    limit = max_memory
    if limit is None and cuda:
        limit = torch.cuda.get_device_properties(device).total_memory
    seen: list[Probe] = []

    def stop(batch_size: int) -> bool:
        """Would a probe of ``batch_size``, and the reserve after it, end past the budget?"""
        if time_budget_s is None:
            return False
        largest = max((p for p in seen if p.fits and p.seconds), key=lambda p: p.batch_size, default=None)
        predicted = largest.seconds * batch_size / largest.batch_size if largest else 0.0
        return clock() - start + (1 + reserve) * predicted > time_budget_s

    def probed(p: Probe) -> None:
        seen.append(p)
        if on_probe is not None:
            on_probe(p)
        if bar is not None:  # between trials, never inside one
            total = expected_probes(seen, limit if headroom is None else None, max_batch, verify)
            bar.total = max(total, len(seen)) if total is not None else None
            budget = f", {clock() - start:.0f}/{time_budget_s:g} s of the budget" if time_budget_s else ""
            bar.set_postfix_str(f"{p.phase} {p.batch_size}: {'fits' if p.fits else 'no'}{budget}", refresh=False)
            bar.update(1)

    try:
        if isolation == "none":
            res, baseline = _search_here(model, make_input, device, max_memory, headroom, min_batch, max_batch,
                                         passes, verify, probed, stop, clock)
        else:
            ref = dict(model=name, device=device, dtype=dtype_name, passes=passes, max_memory=max_memory,
                       headroom=headroom,
                       threads=threads or (torch.get_num_threads() if cuda else 1))
            res, baseline = _search_in_child(ref, isolation == "fresh", min_batch, max_batch, verify, probed, stop)
    finally:
        if bar is not None:
            bar.close()
    return dataclasses.replace(res, model=name, device=device, dtype=dtype_name, max_memory=max_memory,
                               headroom=headroom, isolation=isolation, baseline_bytes=baseline,
                               env=environment(device), time_budget_s=time_budget_s)


def _search_here(model, make_input, device, max_memory, headroom, min_batch, max_batch, passes, verify, on_probe,
                 stop, clock):
    baseline, warm = warm_up(model, make_input, device)
    max_memory = trial_limit(max_memory, headroom, baseline)
    failed = preflight(warm, baseline, max_memory)
    if failed is not None:
        raise ToolkitError(f"a batch of 1 does not fit ({failed.error})")
    exact = baseline if is_cuda(device) else None  # CPU: oneDNN and glibc keep caches, no exact baseline
    with memory_limit(device, max_memory):
        res = search_batch_size(lambda b: run_trial(model, make_input, b, device, passes=passes, baseline=exact,
                                                    clock=clock), min_batch, max_batch, verify, on_probe, stop)
    return res, baseline


def _search_in_child(ref, fresh, min_batch, max_batch, verify, on_probe, stop):
    state: dict[str, Any] = {"worker": None, "baseline": None}

    def trial(batch_size: int) -> Probe:
        w = state["worker"]
        if w is None or not w.alive:
            w = state["worker"] = TrialProcess(ref)
        probe = w.trial(batch_size)
        if state["baseline"] is None:
            state["baseline"] = w.baseline
        if fresh:
            w.close()
        return probe

    try:
        res = search_batch_size(trial, min_batch, max_batch, verify, on_probe, stop)
    except ToolkitError as e:
        limit = ref.get("max_memory")
        if limit and state["baseline"] and "does not fit" in str(e) and "before any batch" not in str(e):
            raise ToolkitError(f"{e}; the limit is {limit / 2**20:,.0f} MiB and the model's process alone uses "
                               f"{state['baseline'] / 2**20:,.0f} MiB") from None
        raise
    except BaseException:  # Ctrl-C: stop the running trial now rather than wait for it to end
        if state["worker"] is not None:
            state["worker"].kill()
        raise
    finally:
        if state["worker"] is not None:
            state["worker"].close()
    return res, state["baseline"]


# ---------------------------------------------------------------------------------------------------------------
# Throughput


def _t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95% interval with ``df`` degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class ThroughputResult:
    """Samples per second at one batch size, from back-to-back timed batches."""

    batch_size: int
    batch_s: tuple[float, ...]  # seconds per timed batch (consecutive, they sum to the total)
    warmup_s: tuple[float, ...] = ()
    device: str | None = None
    label: str | None = None
    env: dict = field(default_factory=dict, compare=False)

    @property
    def n_batches(self) -> int:
        return len(self.batch_s)

    @property
    def total_s(self) -> float:
        return float(sum(self.batch_s))

    @property
    def samples_per_s(self) -> float:
        """batches x batch size / total seconds."""
        return self.n_batches * self.batch_size / self.total_s

    @property
    def ci95(self) -> tuple[float, float]:
        """95% confidence interval of samples/s, from the t-interval of the mean batch time."""
        n = self.n_batches
        mean = self.total_s / n
        if n < 2:
            return (math.nan, math.nan)
        sd = math.sqrt(sum((t - mean) ** 2 for t in self.batch_s) / (n - 1))
        half = _t_quantile_975(n - 1) * sd / math.sqrt(n)
        hi = self.batch_size / (mean - half) if mean > half else math.inf
        return (self.batch_size / (mean + half), hi)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(n_batches=self.n_batches, samples_per_s=self.samples_per_s, ci95=list(self.ci95))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ThroughputResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["batch_s"] = tuple(kw["batch_s"])
        kw["warmup_s"] = tuple(kw.get("warmup_s", ()))
        return cls(**kw)

    def __repr__(self) -> str:
        lo, hi = self.ci95
        return (f"ThroughputResult(batch {self.batch_size}: {self.samples_per_s:,.1f} samples/s "
                f"[95% CI {lo:,.1f} .. {hi:,.1f}], {self.n_batches} batches in {self.total_s:.3f} s)")


class Stamps:
    """Timestamps between back-to-back batches: CUDA events (no sync until read) or perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = is_cuda(device)
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(self.device))
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        """Seconds between consecutive marks (waits for the GPU once)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def measure_throughput(model, batch_size: int, n_batches: int = 100, *, make_input: Callable | None = None,
                       device: str | None = None, warmup: int = 3, max_time_s: float | None = None,
                       min_batches: int = 3, label: str | None = None, with_env: bool = True,
                       stamps: Callable[[str], Stamps] = Stamps) -> ThroughputResult:
    """Samples/s at ``batch_size``: ``warmup`` batches, then ``n_batches`` timed back to back.

    Unlike ``timing.measure_latency`` (one synchronised call per sample, right
    for latency), the batches are queued without a sync between them, as a
    serving loop would, with a CUDA event after each: samples/s = batches x
    batch size / (last event - first), and the per-batch times give the CI.
    The same input batch is reused (this measures the model, not data loading).
    ``max_time_s`` lowers the batch count (to no fewer than ``min_batches``)
    using the warm-up's per-batch time, so the timed region itself is never
    interrupted. ``stamps`` is injectable (tests use a fake clock).
    """
    from .env import environment

    if batch_size < 1 or n_batches < 1:
        raise ToolkitError(f"batch size and batch count must be >= 1, got {batch_size} and {n_batches}")
    model, make_input, device, name, _ = _resolve(model, make_input, device, None)
    x = make_batch(make_input, batch_size)
    warm: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):  # each warm-up batch timed alone: it also estimates the time per batch
            s = stamps(device)
            s.mark()
            out = model(*x)
            s.mark()
            warm += s.intervals_s()
        if max_time_s is not None and warm:
            n_batches = max(min(min_batches, n_batches), min(n_batches, int(max_time_s / max(warm[-1], 1e-9))))
        s = stamps(device)
        s.mark()
        for _ in range(n_batches):
            out = model(*x)  # noqa: F841 - keep one output alive, as a consumer would
            s.mark()
        batch_s = s.intervals_s()
    del out, x
    return ThroughputResult(batch_size=batch_size, batch_s=tuple(batch_s), warmup_s=tuple(warm), device=device,
                            label=label or name, env=environment(device) if with_env else {})


def curve_batch_sizes(max_batch: int, min_batch: int = 1, step: int = 2) -> list[int]:
    """min_batch x step^k up to max_batch, plus max_batch itself: 1, 2, 4, ..., max."""
    if step < 2:
        raise ToolkitError(f"curve step must be >= 2, got {step}")
    sizes, b = [], min_batch
    while b < max_batch:
        sizes.append(b)
        b *= step
    return sizes + [max_batch]


CURVE_COLUMNS = ["batch_size", "samples_per_s", "ci95_low", "ci95_high", "n_batches", "batch_ms_median", "error"]


def throughput_curve(model, batch_sizes: Iterable[int], n_batches: int = 100, *, make_input: Callable | None = None,
                     device: str | None = None, progress: bool = False, on_point: Callable | None = None,
                     **kwargs):
    """Throughput at each batch size -> DataFrame (batch_size, samples_per_s, ci95_low, ci95_high, ...).

    A point that runs out of memory (the caching allocator's fragmentation can
    move the boundary) is kept with NaN throughput and its error.
    ``on_point(ThroughputResult | None, row)`` is called after each point
    (benchmarks save partial results there).
    """
    import pandas as pd

    model, make_input, device, _, _ = _resolve(model, make_input, device, None)
    sizes = list(batch_sizes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sizes), desc="throughput", unit="batch size", file=sys.stderr, leave=False)
    rows = []
    try:
        for b in sizes:
            r, error = None, None
            try:
                r = measure_throughput(model, b, n_batches, make_input=make_input, device=device,
                                       **{"with_env": False, **kwargs})
            except Exception as e:
                error = does_not_fit(e)
                if error is None:
                    raise
            # Outside the except block (see the module docstring); an empty cache for every point: the largest
            # batch, measured last, must not fail for blocks the smaller ones left cached.
            release_memory(device, collect=error is not None)
            row = dict(batch_size=b, samples_per_s=math.nan, ci95_low=math.nan, ci95_high=math.nan, n_batches=0,
                       batch_ms_median=math.nan, error=error)
            if r is not None:
                row.update(samples_per_s=r.samples_per_s, ci95_low=r.ci95[0], ci95_high=r.ci95[1],
                           n_batches=r.n_batches, batch_ms_median=statistics.median(r.batch_s) * 1e3)
            rows.append(row)
            if on_point is not None:
                on_point(r, row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{b}: {row['samples_per_s']:,.0f}/s")
    finally:
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


@dataclass(frozen=True)
class OptimalBatch:
    """The smallest batch within ``tolerance`` of the best throughput, next to the best and the largest."""

    optimal_batch_size: int
    optimal_samples_per_s: float
    best_batch_size: int
    best_samples_per_s: float
    largest_batch_size: int
    largest_samples_per_s: float
    tolerance: float

    @property
    def largest_vs_best(self) -> float:
        """Throughput of the largest batch relative to the best (0.95 = 5% slower)."""
        return self.largest_samples_per_s / self.best_samples_per_s

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["largest_vs_best"] = self.largest_vs_best
        return d


def find_optimal_batch_size(curve, tolerance: float = 0.03) -> OptimalBatch:
    """The smallest batch whose samples/s is within ``tolerance`` of the best (0.03 = 3%).

    ``curve``: a ``throughput_curve`` DataFrame, or ThroughputResults. The
    largest batch measured is reported next to it: it is often not the fastest.
    """
    if hasattr(curve, "to_dict") and hasattr(curve, "columns"):
        points = [(int(b), float(s)) for b, s in zip(curve["batch_size"], curve["samples_per_s"])]
    else:
        points = [(r.batch_size, r.samples_per_s) for r in curve]
    points = sorted((b, s) for b, s in points if math.isfinite(s))
    if not points:
        raise ToolkitError("no throughput measurements to choose a batch size from")
    if not 0 <= tolerance < 1:
        raise ToolkitError(f"tolerance must be in [0, 1), got {tolerance}")
    best_b, best_s = max(points, key=lambda p: p[1])
    opt_b, opt_s = next((b, s) for b, s in points if s >= (1 - tolerance) * best_s)
    big_b, big_s = points[-1]
    return OptimalBatch(opt_b, opt_s, best_b, best_s, big_b, big_s, tolerance)


# ---------------------------------------------------------------------------------------------------------------
# A benchmark model by name: search, curve and optimal batch in one call


@dataclass(frozen=True)
class ModelThroughput:
    """A named model's batch search, throughput curve and optimal batch: what ``python -m toolkit throughput`` reports."""

    model: str
    device: str
    dtype: str
    search: BatchSearchResult
    curve: Any = field(compare=False)  # the throughput_curve DataFrame
    optimal: OptimalBatch | None  # None: no curve point measured yet (a partial result)
    complete: bool = True  # False: measured so far, the curve still running

    def to_dict(self) -> dict:
        """The ``throughput`` command's JSON record."""
        s, opt = self.search, self.optimal
        if opt is None:
            return {"model": self.model, "device": self.device, "dtype": self.dtype, "complete": self.complete,
                    "max_memory": s.max_memory, "max_batch_size": s.max_batch_size, "bounded": s.bounded,
                    "verified": s.verified, "exact": s.exact, "highest_fit": s.highest_fit,
                    "upper_bound": s.upper_bound, "probes": [p.to_dict() for p in s.probes],
                    "throughput": self._points(), "optimal": None, "env": s.env}
        return {
            "complete": self.complete,
            "model": self.model, "device": self.device, "dtype": self.dtype, "max_memory": s.max_memory,
            "max_batch_size": s.max_batch_size, "bounded": s.bounded, "verified": s.verified,
            "exact": s.exact, "upper_bound": s.upper_bound, "time_budget_s": s.time_budget_s,
            "optimal_batch_size": opt.optimal_batch_size, "best_batch_size": opt.best_batch_size,
            "memory_at_baseline": s.memory_at_baseline, "baseline_bytes": s.baseline_bytes,
            "isolation": s.isolation,
            "probes": [p.to_dict() for p in s.probes],
            "highest_fit": s.highest_fit,
            "throughput": self._points(),
            "optimal": opt.to_dict(),
            "env": s.env,
        }

    def _points(self) -> list[dict]:
        return [{"batch_size": int(r.batch_size), "samples_per_s": r.samples_per_s, "ci95": [r.ci95_low, r.ci95_high],
                 "n_batches": int(r.n_batches), "error": r.error} for r in self.curve.itertuples()]


def check_model_throughput(model: str, dtype: str, min_batch: int, max_batch: int | None, n_batches: int,
                           max_time_s: float | None, curve_step: int | None, tolerance: float, verify: int,
                           time_budget_s: float | None = None) -> None:
    """A ToolkitError naming the argument ``measure_model_throughput`` would reject; builds nothing.

    Separate so that a sweep can check every point before it submits one.
    """
    from .models import MODEL_NAMES
    from .timing import MODEL_DTYPES

    def count(name, v, least):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ToolkitError(f"{name} must be an integer >= {least}, got {v!r}")

    if model not in MODEL_NAMES:
        raise ToolkitError(f"unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if dtype not in MODEL_DTYPES:
        raise ToolkitError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    count("min_batch", min_batch, 1)
    count("n_batches", n_batches, 1)
    count("verify", verify, 0)
    if max_batch is not None:
        count("max_batch", max_batch, 1)
        if min_batch > max_batch:
            raise ToolkitError(f"batch bounds reversed: min_batch {min_batch} > max_batch {max_batch}")
    if max_time_s is not None and not max_time_s > 0:
        raise ToolkitError(f"max_time_s must be positive, got {max_time_s}")
    if curve_step is not None:
        count("curve_step", curve_step, 2)
    if not 0 <= tolerance < 1:
        raise ToolkitError(f"tolerance must be in [0, 1), got {tolerance}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ToolkitError(f"time_budget_s must be positive, got {time_budget_s!r}")


def measure_model_throughput(model: str = "resnet-50", *, device: str = "auto", dtype: str = "float32",
                             max_memory: int | None = None, min_batch: int = 1, max_batch: int | None = None,
                             n_batches: int = 100, max_time_s: float | None = None, curve_step: int | None = None,
                             tolerance: float = 0.03, verify: int = 0, fresh_process: bool = False,
                             time_budget_s: float | None = None, progress: bool = False,
                             on_update: Callable[[ModelThroughput], None] | None = None) -> ModelThroughput:
    """The largest batch of a named model that fits, its throughput curve and the optimal batch: the CLI's call.

    ``max_memory`` (bytes) None: on a CPU the memory available now, for the whole
    trial process; on a GPU the whole GPU. The curve runs at min_batch x
    curve_step^k up to the largest batch; on a CPU the defaults are chosen so
    the whole call stays around a minute: fewer points (step 4 instead of 2),
    0.5 s timed regions instead of 5 s, one warm-up batch (no autotuning
    there), and no point just below the largest (it costs as much and says
    little). ``time_budget_s`` bounds the whole call: the batch search stops
    before a probe that would not leave the curve its time (see
    ``find_max_batch_size``), and the curve then runs up to the largest batch
    seen to fit. ``on_update(partial)`` is called with what is measured so
    far (``complete=False``: the search, then each curve point), so that a
    caller can save it before a Ctrl-C or a crash loses minutes of trials.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    from .env import resolve_device
    from .models import build_model

    check_model_throughput(model, dtype, min_batch, max_batch, n_batches, max_time_s, curve_step, tolerance, verify,
                           time_budget_s)
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    torch_dtype = getattr(torch, dtype)
    step, warmup = curve_step or (2 if cuda else 4), 3 if cuda else 1
    # the curve costs about (warm-up + 3 timed batches) x one batch at each point, the points shrinking by
    # ``step``: that much of a budget stays free for it
    reserve = (warmup + 3) * step / (step - 1)
    kw = dict(device=device, max_memory=max_memory, min_batch=min_batch, max_batch=max_batch, verify=verify,
              isolation="fresh" if fresh_process else "auto", progress=progress, time_budget_s=time_budget_s,
              reserve=reserve)
    if cuda and not fresh_process:  # trials in this process, on this very model
        bench = build_model(model, device=device, dtype=torch_dtype)
        search = find_max_batch_size(bench, **kw)
    elif cuda:  # trials in child processes on the same GPU: our copy must not take memory from them
        search = find_max_batch_size(model, dtype=torch_dtype, **kw)
        bench = build_model(model, device=device, dtype=torch_dtype)
    else:  # CPU trials in child processes: build our copy (for the curve) while we only wait for them
        pool = ThreadPoolExecutor(1)
        try:
            pending = pool.submit(build_model, model, device=device, dtype=torch_dtype)
            search = find_max_batch_size(model, dtype=torch_dtype, **kw)
            bench = pending.result()
        except BaseException:  # Ctrl-C or a failed search: do not wait for the build
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    sizes = curve_batch_sizes(search.max_batch_size, min_batch, step)
    if not cuda and curve_step is None and len(sizes) > 2 and sizes[-2] * 1.25 > sizes[-1]:
        sizes.pop(-2)
    rows: list[dict] = []

    def partial(row: dict | None = None) -> None:  # what is measured so far, for a caller to save
        if on_update is None:
            return
        if row is not None:
            rows.append(row)
        curve = pd.DataFrame(rows, columns=CURVE_COLUMNS)
        finite = curve["samples_per_s"].notna().any()
        on_update(ModelThroughput(model=model, device=device, dtype=dtype, search=search, curve=curve,
                                  optimal=find_optimal_batch_size(curve, tolerance) if finite else None,
                                  complete=False))

    partial()
    curve = throughput_curve(bench, sizes, n_batches, device=device, progress=progress,
                             max_time_s=max_time_s if max_time_s is not None else (5.0 if cuda else 0.5),
                             warmup=warmup, on_point=lambda r, row: partial(row))
    return ModelThroughput(model=model, device=device, dtype=dtype, search=search, curve=curve,
                           optimal=find_optimal_batch_size(curve, tolerance))
