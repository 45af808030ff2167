"""Where the time goes: torch.profiler with a schedule, a CPU/GPU time split and a plain verdict.

``profile(fn, *args)`` runs ``wait + warmup + active`` steps under
``torch.profiler`` with a schedule, so start-up cost (cuDNN autotuning, lazy
init, the profiler's own start) lands in steps that are thrown away. Each step
ends with a device synchronisation (labelled and left out of the sync counts),
so a step is one call, start to finish, as in ``measure_latency``.

The Chrome trace (openable in https://ui.perfetto.dev or chrome://tracing) is
parsed into simple event records ``Event(kind, start, end, ...)`` (ms), and
two pure functions work on those records, so tests feed them synthetic lists:

- ``time_split(events)``: GPU kernel time, host-to-device and device-to-host
  copies, synchronisations (count and host time blocked), GPU idle time and
  the GPU busy fraction over the active window's wall time;
- ``diagnose(events)``: the verdict, from that split: ``gpu-bound``,
  ``host-bound`` (the GPU idles while Python launches kernels), ``sync-bound``
  (the GPU idles after the host waited for it), ``copy-bound``, or ``cpu``
  (no GPU timeline to judge), with the numbers and the usual remedies.

Profiled times are not latencies: the profiler adds host work to every
operator, which inflates host-bound runs most. ``profile`` therefore also times
the same ``fn`` with ``measure_latency`` and reports the overhead.

Event kinds: ``kernel``, ``h2d``, ``d2h``, ``d2d``, ``memset`` (GPU timeline),
``sync`` (host blocked in a CUDA synchronisation), ``step`` (one profiled
step), ``label`` (a ``record_function`` range on the host, e.g. the MoE
engine's ``moe.cpu_experts[L3]``), ``cpu_op`` (a top-level host operator).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import ToolkitError

GPU_KINDS = ("kernel", "h2d", "d2h", "d2d", "memset")
TIMELINE_COLUMNS = ["row", "name", "start_ms", "end_ms", "layer", "kind", "step", "lane"]

# Verdict thresholds, as shares of the active window's wall time.
IDLE_BOUND = 0.5  # GPU idle at least half the window: the host is the bottleneck
COPY_BOUND = 0.3  # host<->device copies at least 30% of the window: pinned memory / overlap pays
SYNC_SHARE = 0.5  # at least half the idle time follows a host wait: sync-bound rather than launch-bound
SYNC_TOLERANCE_MS = 0.05  # CPU and GPU clocks in a trace agree to a few microseconds

# Host calls that block until the GPU (or a copy) finishes.
SYNC_CALLS = frozenset({
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy",
    "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpy",
    "hipDeviceSynchronize", "hipStreamSynchronize", "hipEventSynchronize", "hipMemcpy",
})

_SYNC_LABEL = "toolkit.profile.sync"  # our own end-of-step sync: not the user's
_LAYER = re.compile(r"^(.*)\[L(\d+)\]$")

REMEDIES: dict[str, tuple[str, ...]] = {
    "host-bound": (
        "raise the batch size: the same launches then carry more work",
        "capture the step in a CUDA graph (torch.cuda.CUDAGraph, or measure_latency(cuda_graph=True) to see the gain)",
        "torch.compile(model, mode='reduce-overhead'): fewer, fused kernels launched from a CUDA graph",
        "move host work (pre-processing, Python loops over layers) out of the step",
    ),
    "sync-bound": (
        "remove .item(), .cpu(), .tolist(), print(tensor) and `if tensor:` from the step",
        "copy results with non_blocking=True into pinned memory and synchronise once per step",
        "queue GPU work before the host blocks, so the GPU has something to do while the host waits or computes",
    ),
    "copy-bound": (
        "keep the data on the GPU across calls, or prefetch the next batch on a side stream",
        "pin host memory (tensor.pin_memory()) and copy with .to(device, non_blocking=True)",
        "move fewer bytes: lower precision (fp16/bf16, uint8 images normalised on the GPU)",
    ),
    "gpu-bound": (
        "the GPU is the bottleneck (good): make the kernels faster: bf16/fp16, or TF32 for fp32 matmuls",
        "torch.compile to fuse element-wise kernels; channels_last memory format for convolutions",
        "look at the top operators by self CUDA time",
    ),
    "cpu": (
        "profile on a CUDA device for the GPU verdicts (GPU idle, copies, syncs)",
        "on CPU, look at the top operators by self CPU time and at torch.get_num_threads()",
    ),
}


# ----------------------------------------------------------------------------- event records


@dataclass(frozen=True)
class Event:
    """One interval of the profile, in ms; ``label`` is the host range (record_function) that issued it."""

    kind: str
    start: float
    end: float
    name: str = ""
    label: str | None = None
    lane: int = 0  # host thread (0 = the one running the steps) or GPU stream, numbered from 0

    @property
    def ms(self) -> float:
        return self.end - self.start


def _as_event(e: Any) -> Event:
    """Accept ``Event`` or plain tuples ``(kind, start, end[, name[, label[, lane]]])``."""
    if isinstance(e, Event):
        return e
    kind, start, end, *rest = e
    return Event(str(kind), float(start), float(end), *rest)


def split_label(name: str | None) -> tuple[str | None, int | None]:
    """'moe.cpu_experts[L3]' -> ('moe.cpu_experts', 3); 'foo' -> ('foo', None)."""
    if name is None:
        return None, None
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping intervals (streams run concurrently; busy time is their union)."""
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _length(intervals: Iterable[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# ----------------------------------------------------------------------------- the split and the verdict


@dataclass(frozen=True)
class TimeSplit:
    """Where the active window's wall time went (all ms, summed over ``steps`` steps)."""

    window_ms: float
    steps: int
    gpu_kernel_ms: float
    h2d_ms: float
    d2h_ms: float
    d2d_ms: float
    memset_ms: float
    sync_count: int
    sync_ms: float  # host time blocked in synchronisations
    gpu_busy_ms: float  # union of all GPU activity
    gpu_idle_ms: float
    sync_idle_ms: float  # GPU idle time that began while the host was waiting for it
    has_gpu: bool

    @property
    def copy_ms(self) -> float:
        return self.h2d_ms + self.d2h_ms

    @property
    def gpu_busy_fraction(self) -> float:
        return self.gpu_busy_ms / self.window_ms if self.window_ms > 0 else 0.0

    def share(self, ms: float) -> float:
        return ms / self.window_ms if self.window_ms > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(copy_ms=self.copy_ms, gpu_busy_fraction=self.gpu_busy_fraction)
        return d


def time_split(events: Iterable[Any]) -> TimeSplit:
    """Split the active window (first step start to last step or GPU end) into GPU work, copies, syncs, idle."""
    evs = [_as_event(e) for e in events]
    steps = sorted((e for e in evs if e.kind == "step"), key=lambda e: e.start)
    gpu = [e for e in evs if e.kind in GPU_KINDS]
    syncs = [e for e in evs if e.kind == "sync"]
    if steps:
        lo = steps[0].start
        hi = max([steps[-1].end] + [e.end for e in gpu])  # trailing GPU work belongs to the last step
    elif evs:
        lo, hi = min(e.start for e in evs), max(e.end for e in evs)
    else:
        lo = hi = 0.0

    def clipped(kinds) -> list[tuple[float, float]]:
        return [(max(e.start, lo), min(e.end, hi)) for e in gpu if e.kind in kinds and e.end > lo and e.start < hi]

    def total(kind) -> float:
        return float(sum((e - s for s, e in clipped((kind,))), 0.0))

    busy = _union(clipped(GPU_KINDS))
    window = max(hi - lo, 0.0)
    gaps = [(a, b) for a, b in zip([lo] + [e for _, e in busy], [s for s, _ in busy] + [hi]) if b > a]
    sync_idle = 0.0
    if gpu:  # a gap is the sync's fault if the host was already waiting when the GPU ran dry
        tol = SYNC_TOLERANCE_MS
        for a, b in gaps:
            if any(s.start <= a + tol and a - tol <= s.end <= b + tol for s in syncs):
                sync_idle += b - a
    return TimeSplit(
        window_ms=window, steps=max(len(steps), 1),
        gpu_kernel_ms=total("kernel"), h2d_ms=total("h2d"), d2h_ms=total("d2h"), d2d_ms=total("d2d"),
        memset_ms=total("memset"),
        sync_count=len(syncs), sync_ms=float(sum((s.ms for s in syncs), 0.0)),
        gpu_busy_ms=float(_length(busy)), gpu_idle_ms=window - _length(busy) if gpu else 0.0,
        sync_idle_ms=sync_idle, has_gpu=bool(gpu),
    )


@dataclass(frozen=True)
class Diagnosis:
    """The verdict, the sentence with the numbers behind it, and what usually helps."""

    verdict: str  # gpu-bound | host-bound | sync-bound | copy-bound | cpu
    reason: str
    remedies: tuple[str, ...]
    split: TimeSplit

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "remedies": list(self.remedies),
                "split": self.split.to_dict()}

    def __str__(self) -> str:
        return "\n".join([f"{self.verdict}: {self.reason}"] + [f"  - {r}" for r in self.remedies])


def diagnose(events: Iterable[Any] | TimeSplit) -> Diagnosis:
    """Verdict from event records (or a ready ``TimeSplit``): idle first, then copies, else GPU-bound."""
    s = events if isinstance(events, TimeSplit) else time_split(events)
    pct = lambda ms: f"{100 * s.share(ms):.0f}%"  # noqa: E731
    numbers = (f"window {s.window_ms:.3f} ms over {s.steps} step(s): kernels {s.gpu_kernel_ms:.3f} ms, "
               f"copies {s.copy_ms:.3f} ms (H2D {s.h2d_ms:.3f}, D2H {s.d2h_ms:.3f}), GPU idle {s.gpu_idle_ms:.3f} ms, "
               f"{s.sync_count} sync(s) blocking the host {s.sync_ms:.3f} ms")
    if not s.has_gpu:
        verdict = "cpu"
        reason = (f"no GPU activity in the profile, so no GPU timeline to judge; host window {s.window_ms:.3f} ms "
                  f"over {s.steps} step(s)")
    elif s.share(s.gpu_idle_ms) >= IDLE_BOUND:
        if s.gpu_idle_ms > 0 and s.sync_idle_ms >= SYNC_SHARE * s.gpu_idle_ms:
            verdict = "sync-bound"
            reason = (f"the GPU idled {pct(s.gpu_idle_ms)} of the window, {pct(s.sync_idle_ms)} right after the host "
                      f"waited for it ({s.sync_count} syncs); {numbers}")
        else:
            verdict = "host-bound"
            reason = (f"the GPU idled {pct(s.gpu_idle_ms)} of the window waiting for the host to launch work "
                      f"(busy {100 * s.gpu_busy_fraction:.0f}%); {numbers}")
    elif s.share(s.copy_ms) >= COPY_BOUND:
        verdict = "copy-bound"
        reason = f"host<->device copies took {pct(s.copy_ms)} of the window; {numbers}"
    else:
        verdict = "gpu-bound"
        reason = f"the GPU was busy {100 * s.gpu_busy_fraction:.0f}% of the window; {numbers}"
    return Diagnosis(verdict, reason, REMEDIES[verdict], s)


def cpu_gpu_overlap(events: Iterable[Any], label: str = "moe.cpu_experts") -> pd.DataFrame:
    """Per layer: host time in ``label`` ranges and how much of it the GPU was busy (totals over the steps)."""
    evs = [_as_event(e) for e in events]
    busy = _union((e.start, e.end) for e in evs if e.kind in GPU_KINDS)
    rows = []
    by_layer: dict[int | None, list[Event]] = {}
    for e in evs:
        base, layer = split_label(e.name)
        if e.kind == "label" and base == label:
            by_layer.setdefault(layer, []).append(e)
    for layer in sorted(by_layer, key=lambda x: -1 if x is None else x):
        spans = _union((e.start, e.end) for e in by_layer[layer])
        host_ms = _length(spans)
        during = _intersect(spans, busy)
        rows.append({"layer": layer, f"{label}_ms": host_ms, "gpu_busy_during_ms": during,
                     "overlap_fraction": during / host_ms if host_ms > 0 else 0.0})
    return pd.DataFrame(rows, columns=["layer", f"{label}_ms", "gpu_busy_during_ms", "overlap_fraction"])


def timeline(events: Iterable[Any]) -> pd.DataFrame:
    """Rows for a Gantt plot: host ranges and syncs on 'CPU', kernels and copies on 'GPU', times in ms.

    Columns: row ('CPU'|'GPU'), name (label without the layer suffix, else the op/kernel name),
    start_ms, end_ms, layer (int or None), kind, step (0-based index of the profiled step), lane
    (host thread or GPU stream within the row: the MoE engine's CPU experts run on host lane 1).
    """
    evs = sorted((_as_event(e) for e in events), key=lambda e: e.start)
    step_starts = [e.start for e in evs if e.kind == "step"]
    has_labels = any(e.kind == "label" for e in evs)
    rows = []
    for e in evs:
        if e.kind in GPU_KINDS:  # named after the host range that launched it, so colours match the CPU row
            row, (name, layer) = "GPU", (split_label(e.label) if e.label else (e.name or e.kind, None))
        elif e.kind == "label":
            row, (name, layer) = "CPU", split_label(e.name)
        elif e.kind == "sync" or (e.kind == "cpu_op" and not has_labels):
            row, name, layer = "CPU", e.name or e.kind, split_label(e.label)[1]
        else:
            continue
        step = sum(1 for s in step_starts if s <= e.start + 1e-9) - 1
        rows.append({"row": row, "name": name, "start_ms": e.start, "end_ms": e.end, "layer": layer,
                     "kind": e.kind, "step": max(step, 0), "lane": e.lane})
    return pd.DataFrame(rows, columns=TIMELINE_COLUMNS)


# ----------------------------------------------------------------------------- Chrome trace -> events


class _Labels:
    """The host's record_function ranges per thread, to find the innermost one around an instant."""

    def __init__(self, ranges: list[tuple[Any, float, float, str]]):
        self._by_tid: dict[Any, list[tuple[float, float, str]]] = {}
        for tid, s, e, name in sorted(ranges, key=lambda r: r[1]):
            self._by_tid.setdefault(tid, []).append((s, e, name))

    def at(self, tid: Any, t: float) -> str | None:
        spans = self._by_tid.get(tid, ())
        for s, e, name in reversed(spans):  # latest start first: the innermost of nested ranges
            if s <= t <= e:
                return name
        return None


def _copy_kind(name: str) -> str:
    return "h2d" if "HtoD" in name else "d2h" if "DtoH" in name else "d2d"


def events_from_trace(trace: dict | list) -> list[Event]:
    """Chrome-trace events (as written by ``export_chrome_trace``) -> ``Event`` records in ms from the first step.

    Host events get lane 0 for the thread that ran the steps and 1, 2, ... for other threads (the MoE
    engine's CPU-expert worker); GPU events get one lane per stream, in order of appearance.
    """
    raw = trace["traceEvents"] if isinstance(trace, dict) else trace
    xs = sorted((e for e in raw if e.get("ph") == "X" and "ts" in e and "dur" in e), key=lambda e: float(e["ts"]))
    host_cats = ("user_annotation", "cpu_op")
    steps = [e for e in xs if e.get("cat") in host_cats and str(e.get("name", "")).startswith("ProfilerStep#")]
    t0 = float(steps[0]["ts"]) if steps else float(xs[0]["ts"]) if xs else 0.0

    def ms(us) -> float:
        return (float(us) - t0) / 1000.0

    lanes: dict[tuple[str, Any], int] = {}

    def lane(side: str, key: Any) -> int:
        n = sum(1 for s, _ in lanes if s == side)
        return lanes.setdefault((side, key), n)

    if steps:
        lane("host", steps[0].get("tid"))  # the stepping thread is lane 0
    labels, ours = [], []
    for e in xs:
        if e.get("cat") == "user_annotation" and not e["name"].startswith("ProfilerStep#"):
            rng = (e.get("tid"), float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"])
            (ours if e["name"] == _SYNC_LABEL else labels).append(rng)
    label_at, ours_at = _Labels(labels).at, _Labels(ours).at

    out = [Event("step", ms(e["ts"]), ms(e["ts"] + e["dur"]), e["name"]) for e in steps]
    out += [Event("label", ms(s), ms(t), name, None, lane("host", tid)) for tid, s, t, name in labels]
    launches: dict[Any, tuple[Any, float]] = {}  # correlation id -> (host thread, launch time)
    for e in xs:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        tid, ts = e.get("tid"), float(e["ts"])
        corr = (e.get("args") or {}).get("correlation")
        if corr is not None:
            launches[corr] = (tid, ts)
        # syncs outside the profiled steps (the profiler's own flush when it stops) are not the user's
        in_steps = not steps or any(float(t["ts"]) <= ts <= float(t["ts"]) + float(t["dur"]) for t in steps)
        if e["name"] in SYNC_CALLS and in_steps and ours_at(tid, ts) is None:
            out.append(Event("sync", ms(ts), ms(ts + e["dur"]), e["name"], label_at(tid, ts), lane("host", tid)))
    top_end: dict[Any, float] = {}  # per thread, end of the current top-level operator
    for e in xs:
        cat, tid, ts = e.get("cat"), e.get("tid"), float(e["ts"])
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kind = "kernel" if cat == "kernel" else "memset" if cat == "gpu_memset" else _copy_kind(e["name"])
            launch = launches.get((e.get("args") or {}).get("correlation"))
            label = label_at(*launch) if launch else None
            out.append(Event(kind, ms(ts), ms(ts + e["dur"]), e["name"], label, lane("gpu", (e.get("pid"), tid))))
        elif cat == "cpu_op" and ts >= top_end.get(tid, -math.inf):
            top_end[tid] = ts + float(e["dur"])
            out.append(Event("cpu_op", ms(ts), ms(ts + e["dur"]), e["name"], label_at(tid, ts), lane("host", tid)))
    return sorted(out, key=lambda e: (e.start, e.kind))


def load_trace(path: str | os.PathLike) -> dict:
    """Read a Chrome trace (.json or .json.gz); a missing or broken file is a ToolkitError."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ToolkitError(f"trace file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ToolkitError(f"{path} is not a valid Chrome trace ({e})") from None


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True, eq=False)
class ProfileResult:
    """A profile: the operator table, the event records, the verdict and the profiler's overhead.

    ``ops`` times are totals over the ``active`` steps, like torch's own table;
    ``step_ms`` are the profiled steps' wall times (host side, sync included).
    """

    ops: pd.DataFrame
    events: tuple[Event, ...]
    diagnosis: Diagnosis
    step_ms: tuple[float, ...]
    latency_ms: float | None  # measure_latency median of the same fn, without the profiler
    device: str
    trace_path: str | None = None
    warnings: tuple[str, ...] = ()
    env: dict = field(default_factory=dict, repr=False)
    label: str | None = None

    @property
    def verdict(self) -> str:
        return self.diagnosis.verdict

    @property
    def split(self) -> TimeSplit:
        return self.diagnosis.split

    @property
    def gpu_busy_fraction(self) -> float:
        return self.split.gpu_busy_fraction

    @property
    def copy_ms(self) -> float:
        return self.split.copy_ms

    @property
    def sync_count(self) -> int:
        return self.split.sync_count

    @property
    def profiled_step_ms(self) -> float | None:
        """Median wall time of a profiled step."""
        return float(pd.Series(self.step_ms).median()) if self.step_ms else None

    @property
    def overhead(self) -> float | None:
        """Profiled step time / plain latency - 1 (0.3 = the profiler made each step 30% slower)."""
        if not self.latency_ms or self.profiled_step_ms is None:
            return None
        return self.profiled_step_ms / self.latency_ms - 1.0

    def top_ops(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` operators with the most self time on the device that matters (CUDA if any, else CPU)."""
        key = "self_cuda_ms" if self.split.has_gpu and self.ops["self_cuda_ms"].sum() > 0 else "self_cpu_ms"
        return self.ops.sort_values(key, ascending=False).head(n).reset_index(drop=True)

    def timeline(self) -> pd.DataFrame:
        """Gantt rows (row 'CPU'|'GPU', name, start_ms, end_ms, layer, kind, step, lane); see ``timeline()``."""
        return timeline(self.events)

    def overlap(self, label: str = "moe.cpu_experts") -> pd.DataFrame:
        """Per layer, how much of the host's ``label`` time the GPU was busy (did the CPU experts overlap?)."""
        return cpu_gpu_overlap(self.events, label)

    def to_dict(self, events: bool = False, top: int = 10) -> dict:
        s = self.split
        d = {
            "label": self.label, "device": self.device, "verdict": self.verdict, "reason": self.diagnosis.reason,
            "remedies": list(self.diagnosis.remedies),
            "gpu_busy_fraction": s.gpu_busy_fraction, "copy_ms": s.copy_ms, "sync_count": s.sync_count,
            "sync_ms": s.sync_ms, "gpu_kernel_ms": s.gpu_kernel_ms, "h2d_ms": s.h2d_ms, "d2h_ms": s.d2h_ms,
            "gpu_idle_ms": s.gpu_idle_ms, "window_ms": s.window_ms, "steps": s.steps,
            "split": s.to_dict(),
            "step_ms": list(self.step_ms), "profiled_step_ms": self.profiled_step_ms, "latency_ms": self.latency_ms,
            "overhead": self.overhead,
            "top_ops": self.top_ops(top).to_dict("records"),
            "trace": self.trace_path, "warnings": list(self.warnings), "env": self.env,
        }
        if events:
            d["events"] = [[e.kind, round(e.start, 6), round(e.end, 6), e.name, e.label, e.lane] for e in self.events]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ProfileResult:
        """Rebuild from ``to_dict`` (the ops table keeps only the saved top ops; events only if saved)."""
        split = TimeSplit(**{k: d["split"][k] for k in TimeSplit.__dataclass_fields__})
        diag = Diagnosis(d["verdict"], d["reason"], tuple(d["remedies"]), split)
        evs = tuple(Event(*e) for e in d.get("events") or ())
        return cls(ops=pd.DataFrame(d.get("top_ops") or [], columns=_OPS_COLUMNS), events=evs, diagnosis=diag,
                   step_ms=tuple(d.get("step_ms") or ()), latency_ms=d.get("latency_ms"), device=d["device"],
                   trace_path=d.get("trace"), warnings=tuple(d.get("warnings") or ()), env=d.get("env") or {},
                   label=d.get("label"))

    def summary(self, top: int = 10) -> str:
        """A readable report (the CLI prints it)."""
        s = self.split
        lines = [f"verdict: {self.diagnosis}", ""]
        if s.has_gpu:
            lines.append(f"time split over {s.steps} active step(s), window {s.window_ms:.3f} ms:")
            for name, v in [("GPU kernels", s.gpu_kernel_ms), ("host->device copies", s.h2d_ms),
                            ("device->host copies", s.d2h_ms), ("GPU idle", s.gpu_idle_ms),
                            (f"host blocked in {s.sync_count} sync(s)", s.sync_ms)]:
                lines.append(f"  {name:<28} {v:10.3f} ms  {100 * s.share(v):5.1f}%")
        if self.profiled_step_ms is not None:
            lat = ""
            if self.overhead is not None:
                over = f"{100 * self.overhead:+.0f}%" if self.overhead > 0 else "within noise"
                lat = f", measure_latency median {self.latency_ms:.3f} ms (profiler overhead {over})"
            lines.append(f"profiled step (median) {self.profiled_step_ms:.3f} ms{lat}")
        ops = self.top_ops(top)
        if "shapes" in ops and not ops["shapes"].astype(bool).any():
            ops = ops.drop(columns=["shapes"])
        if not s.has_gpu:  # no GPU in the profile: its columns would be zeros
            ops = ops.drop(columns=[c for c in ("self_cuda_ms", "cuda_total_ms") if c in ops])
        lines += ["", "top operators (totals over the active steps):", ops.to_string(index=False, float_format="%.3f")]
        lines += [""] + [f"warning: {w}" for w in self.warnings]
        if self.trace_path:
            lines.append(f"trace: {self.trace_path} (open in https://ui.perfetto.dev or chrome://tracing)")
        return "\n".join(lines).rstrip()

    def __repr__(self) -> str:
        step = f"{self.profiled_step_ms:.3f} ms" if self.profiled_step_ms is not None else "n/a"
        return (f"ProfileResult({self.label or 'fn'} on {self.device}: {self.verdict}, "
                f"GPU busy {100 * self.gpu_busy_fraction:.0f}%, copies {self.copy_ms:.3f} ms, "
                f"{self.sync_count} syncs, profiled step {step})")


# ----------------------------------------------------------------------------- profile()

_OPS_COLUMNS = ["name", "calls", "self_cpu_ms", "cpu_total_ms", "self_cuda_ms", "cuda_total_ms", "shapes"]


def _device_time(avg: Any, self_: bool) -> float:
    """Device time of a key_averages row in us (renamed from *cuda* to *device* in torch 2.4)."""
    for attr in (("self_device_time_total", "self_cuda_time_total") if self_ else
                 ("device_time_total", "cuda_time_total")):
        v = getattr(avg, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _ops_frame(prof: Any, shapes: bool, memory: bool) -> pd.DataFrame:
    """torch's key_averages as a frame, without the step markers and our own end-of-step sync."""
    avgs = list(prof.key_averages(group_by_input_shape=shapes))
    ours = [a for a in avgs if a.key == _SYNC_LABEL]
    ours_calls = sum(a.count for a in ours)
    ours_us = sum(a.cpu_time_total for a in ours)
    rows = []
    for a in avgs:
        if a.key.startswith("ProfilerStep") or a.key == _SYNC_LABEL:
            continue
        calls, self_cpu, total_cpu = a.count, float(a.self_cpu_time_total), float(a.cpu_time_total)
        if a.key == "cudaDeviceSynchronize" and ours_calls:  # remove our end-of-step syncs from the row
            calls -= ours_calls
            self_cpu, total_cpu = max(self_cpu - ours_us, 0.0), max(total_cpu - ours_us, 0.0)
            if calls <= 0:
                continue
        row = {"name": a.key, "calls": calls, "self_cpu_ms": self_cpu / 1e3, "cpu_total_ms": total_cpu / 1e3,
               "self_cuda_ms": _device_time(a, True) / 1e3, "cuda_total_ms": _device_time(a, False) / 1e3,
               "shapes": str(a.input_shapes) if shapes else ""}
        if memory:
            row["self_cpu_memory_bytes"] = getattr(a, "self_cpu_memory_usage", 0)
            row["self_cuda_memory_bytes"] = getattr(a, "self_device_memory_usage", getattr(a, "self_cuda_memory_usage", 0))
        rows.append(row)
    cols = _OPS_COLUMNS + (["self_cpu_memory_bytes", "self_cuda_memory_bytes"] if memory else [])
    return pd.DataFrame(rows, columns=cols).sort_values("self_cpu_ms", ascending=False, ignore_index=True)


def _baseline_ms(fn: Callable, args: tuple, device: str, seconds: float) -> float:
    """measure_latency's median for the same fn, without the profiler."""
    from .timing import measure_latency

    # max_time_s bounds warm-up and sampling separately
    r = measure_latency(fn, *args, device=device, max_time_s=seconds / 2, detect_sync=False)
    return float(r.median_ms)


def _all_threads_config():
    """Record every host thread (the MoE engine runs CPU experts in a worker); None where torch can't."""
    try:
        return torch.profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):  # older torch: the calling thread only
        return None


def _copy_trace(src: Path, dst: Path) -> None:
    """Copy a trace file, compressing or decompressing to match the destination's .gz suffix."""
    read = gzip.open if src.suffix == ".gz" else open
    write = gzip.open if dst.suffix == ".gz" else open
    with read(src, "rb") as fin, write(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def profile(fn: Callable, *args: Any, device: str | None = None, wait: int = 1, warmup: int = 2, active: int = 3,
            record_shapes: bool = False, profile_memory: bool = False, with_stack: bool = False,
            trace_path: str | os.PathLike | None = None, tensorboard_dir: str | os.PathLike | None = None,
            baseline: bool | float = True, baseline_s: float = 3.0, label: str | None = None,
            on_progress: Callable[[str, int, int], None] | None = None) -> ProfileResult:
    """Profile ``fn(*args)`` for ``active`` steps after ``wait`` skipped and ``warmup`` discarded ones.

    Each call runs under ``torch.inference_mode()`` (as in ``measure_latency``) and, on CUDA, is
    followed by a synchronisation, so a profiled step is one whole call.

    - CPU activity always, CUDA activity when ``device`` is CUDA (None: ``env.infer_device``'s rule).
    - ``trace_path``: keep the Chrome trace there (``.json`` or ``.json.gz``); else a temp file is parsed and removed.
    - ``tensorboard_dir``: also write the trace with ``torch.profiler.tensorboard_trace_handler``.
    - ``baseline``: True times fn with ``measure_latency`` (up to ``baseline_s`` s) to report the profiler's
      overhead; a float is a known latency in ms; False skips it.
    - ``on_progress(stage, done, total)`` (a progress bar's hook): "baseline" before the baseline timing,
      "step" before each skipped or warm-up step, "done" at the end; ``done`` counts the baseline and the
      steps finished. Never called inside the active (recorded) steps.
    """
    from .env import environment, infer_device, resolve_device

    if not callable(fn):
        raise ToolkitError(f"profile() needs a callable, got {type(fn).__name__}")
    for name, v, lo in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ToolkitError(f"{name} must be an integer >= {lo}, got {v!r}")
    if trace_path is not None and Path(trace_path).is_dir():
        raise ToolkitError(f"trace_path {str(trace_path)!r} is a directory; give a file name such as trace.json")
    device = resolve_device(infer_device(fn, args, device))
    cuda = device.startswith("cuda")
    warnings = ["profiled times are not latencies: the profiler adds work to every operator; "
                "use measure_latency for latency numbers"]
    if warmup == 0:
        warnings.append("warmup=0: the first profiled step carries start-up and profiler start cost")

    total = (1 if baseline is True else 0) + wait + warmup + active

    def tell(stage: str, done: int) -> None:
        if on_progress is not None:
            on_progress(stage, done, total)

    latency_ms = None
    if baseline is True:
        tell("baseline", 0)
        latency_ms = _baseline_ms(fn, args, device, baseline_s)
    elif baseline is not False and baseline is not None:
        latency_ms = float(baseline)

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    # all threads, except with memory profiling, which then records no allocations (torch 2.13)
    all_threads = None if profile_memory else _all_threads_config()
    if all_threads is None:
        why = "with profile_memory" if profile_memory else f"torch {torch.__version__}"
        warnings.append(f"{why} the profiler records only the calling thread: work in worker threads "
                        "(the MoE engine's CPU experts) is missing from the host timeline")
    # torch's profiler (kineto) prints "USDT: ... profiler_start/stop" on stderr at every start and stop, between
    # a notebook's or a command's own output; level 6 silences it (read when the profiler first starts; a
    # user's own setting wins)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    handler, tb_before = None, set()
    if tensorboard_dir is not None:
        handler = torch.profiler.tensorboard_trace_handler(str(tensorboard_dir))
        tb_before = set(Path(tensorboard_dir).glob("*.pt.trace.json*"))
    with tempfile.TemporaryDirectory(prefix="toolkit-profile-") as tmp:
        path = Path(trace_path) if trace_path is not None else Path(tmp) / "trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=handler, record_shapes=record_shapes, profile_memory=profile_memory,
            with_stack=with_stack, experimental_config=all_threads,
        ) as prof:
            for i in range(wait + warmup + active):
                if i < wait + warmup:  # the active steps are recorded: no callbacks among them
                    tell("step", total - (wait + warmup + active) + i)
                with torch.inference_mode():  # as in measure_latency, so the overhead compares like with like
                    fn(*args)
                if cuda:  # the step ends when the GPU is done, as in measure_latency
                    with torch.profiler.record_function(_SYNC_LABEL):
                        torch.cuda.synchronize(device)
                prof.step()
        if handler is None:
            prof.export_chrome_trace(str(path))
        else:  # the handler already saved the trace, and a trace can be saved only once: read (and copy) its file
            (written,) = set(Path(tensorboard_dir).glob("*.pt.trace.json*")) - tb_before
            if trace_path is not None:
                _copy_trace(written, path)
            path = written
        events = tuple(events_from_trace(load_trace(path)))
        kept = str(trace_path) if trace_path is not None else str(path) if handler is not None else None
    ops = _ops_frame(prof, record_shapes, profile_memory)
    tell("done", total)

    diag = diagnose(events)
    if cuda and not diag.split.has_gpu:
        warnings.append("no GPU activity was recorded: does fn run on the GPU?")
    step_ms = tuple(e.ms for e in events if e.kind == "step")
    result = ProfileResult(ops=ops, events=events, diagnosis=diag, step_ms=step_ms, latency_ms=latency_ms,
                           device=device, trace_path=kept,
                           warnings=tuple(warnings), env=environment(device), label=label)
    if result.overhead is not None and result.overhead > 0:  # a negative "overhead" is noise, no finding
        result = replace(result, warnings=result.warnings + (
            f"the profiler made each step {100 * result.overhead:+.0f}% slower "
            f"({result.profiled_step_ms:.3f} ms profiled vs {latency_ms:.3f} ms measure_latency median)",))
    return result
