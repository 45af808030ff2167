"""What the machine was doing while a measurement ran: GPU clocks and throttling, other work on the GPU and the CPU.

A median with a tight confidence interval describes the samples, not the state
of the machine they were taken in. Two runs of the same code disagree when the
state differs: a GPU whose clocks are still ramping up or are held down by its
power or thermal limits, another process launching kernels on the same GPU,
other work competing for a 2-core CPU. This module reads that state cheaply so
the timer can flag or exclude samples and attach warnings to its result:

- **GPU** (NVML, package ``nvidia-ml-py``, module ``pynvml``): SM and memory
  clocks, temperature, power and the current clock-event ("throttle") reasons,
  read before and after sampling and polled during it (an NVML query costs
  microseconds; ``POLL_INTERVAL_S`` apart it costs well under 1% of the run).
  Like nvbench, a GPU whose SM clock is below ``THROTTLE_THRESHOLD`` of its
  maximum, or that reports a thermal or hardware slowdown, counts as
  throttled. Other processes holding a compute context on the GPU are listed.
- **CPU**: the busy time of the CPUs this process may run on (``/proc/stat``
  through psutil) minus this process's own CPU time gives how many cores
  *other* work used during the measurement. That cannot see other work that
  wanted a core but did not get one because we held them all, so the time our
  threads spent runnable but waiting for a core (``/proc/self/task/*/schedstat``)
  is read too: it is the direct measure of competition. The timing thread's CPU
  time against the wall time says whether it was descheduled. The load average
  is reported beside them (it counts this process too, so it is not the test).

Every reader is injectable: ``GpuMonitor`` takes any object with ``read()`` and
``other_processes()`` (tests pass fakes), and ``cpu_snapshot`` is passed in as a
callable. Without NVML or without a GPU the GPU fields are None and nothing
fails.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache

THROTTLE_THRESHOLD = 0.75  # SM clock below this fraction of its maximum = throttled (nvbench's default)
CLOCK_MOVE_WARN = 0.05  # SM clock range during sampling above this fraction of its maximum -> warning
POLL_INTERVAL_S = 0.01  # GPU state polled at most this often during sampling
OTHERS_TOLERANCE_CORES = 0.5  # other work may use this much of the cores we need before we warn
THREAD_SHARE_WARN = 0.8  # a CPU timing thread that ran less than this share of the wall time was descheduled
WAIT_WARN = 0.05  # our threads runnable but waiting for a core more than this share of their time -> contention
MIN_CPU_WINDOW_S = 0.25  # /proc/stat counts in 10 ms ticks: shorter windows are too coarse to judge

# NVML clock-event reason bits (nvmlClocksEventReason*; stable across NVML versions)
CLOCK_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
SLOWDOWN_REASONS = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})


# ---------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class GpuReading:
    """One reading of a GPU's state; a field is None where NVML does not report it."""

    sm_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    reasons: tuple[str, ...] = ()  # active clock-event reasons, names from CLOCK_REASONS

    def throttled(self, threshold: float = THROTTLE_THRESHOLD) -> bool:
        """SM clock below ``threshold`` of its maximum, or a thermal / hardware slowdown is active."""
        if SLOWDOWN_REASONS.intersection(self.reasons):
            return True
        if self.sm_clock_mhz is None or not self.max_sm_clock_mhz:
            return False
        return self.sm_clock_mhz < threshold * self.max_sm_clock_mhz

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def decode_reasons(mask: int) -> tuple[str, ...]:
    """NVML clock-event reason bit mask -> names."""
    return tuple(name for bit, name in CLOCK_REASONS.items() if mask & bit)


class Nvml:
    """The few NVML queries the timer needs, for one GPU. Each query returns None where it is unsupported."""

    def __init__(self, nvml, handle):
        self.nvml = nvml
        self.handle = handle
        self.max_sm = self._query(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM)

    @classmethod
    def open(cls, device_index: int | None = None) -> Nvml | None:
        """NVML for the CUDA device ``device_index`` (current device by default); None without NVML or a GPU."""
        try:
            import pynvml
            import torch

            if not torch.cuda.is_available():
                return None
            pynvml.nvmlInit()
            index = torch.cuda.current_device() if device_index is None else int(device_index)
            return cls(pynvml, _nvml_handle(pynvml, index))
        except Exception:  # no pynvml, no driver, no permission: measure without it
            return None

    def _query(self, fn, *args):
        try:
            return fn(*args)
        except Exception:
            return None

    def read(self) -> GpuReading:
        nv, h = self.nvml, self.handle
        power = self._query(nv.nvmlDeviceGetPowerUsage, h)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        mask = self._query(reasons_fn, h) if reasons_fn else None
        return GpuReading(
            sm_clock_mhz=self._query(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
            max_sm_clock_mhz=self.max_sm,
            mem_clock_mhz=self._query(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM),
            temperature_c=self._query(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
            power_w=None if power is None else power / 1000.0,
            reasons=decode_reasons(int(mask)) if mask is not None else (),
        )

    def other_processes(self) -> list[dict] | None:
        """Processes other than this one holding a compute context on the GPU: [{pid, used_bytes}]; None if unknown.

        In a container NVML reports host PIDs, so this process may not be listed under its own PID: then one
        entry is taken to be this process.
        """
        procs = self._query(self.nvml.nvmlDeviceGetComputeRunningProcesses, self.handle)
        if procs is None:
            return None
        rows = [{"pid": int(p.pid), "used_bytes": getattr(p, "usedGpuMemory", None)} for p in procs]
        others = [r for r in rows if r["pid"] != os.getpid()]
        if len(others) == len(rows) and others:  # our own PID is not visible here: one of them is us
            others = others[1:]
        return others


@lru_cache(maxsize=16)
def open_nvml(device_index: int = -1) -> Nvml | None:
    """``Nvml.open`` once per CUDA device index (-1: the current device); NVML's start-up is slow."""
    return Nvml.open(None if device_index < 0 else device_index)


def _nvml_handle(pynvml, index: int):
    """The NVML handle of CUDA device ``index``, found by UUID or PCI bus id (CUDA and NVML orders may differ)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        for cand in (text, "GPU-" + text):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(cand)
            except Exception:
                pass
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(pci)
        except Exception:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class GpuMonitor:
    """Polls a GPU during sampling and says which samples were taken while it was throttled.

    ``poll(now_ns, n_samples)`` is called after each sample with the timer's clock; at most every
    ``interval_s`` it reads the GPU; the samples between two readings are marked throttled when
    either reading was throttled (the GPU may have been slow for all of them, and it takes a moment
    to recover), as nvbench discards a throttled trial and pauses.
    """

    def __init__(self, nvml, interval_s: float = POLL_INTERVAL_S, threshold: float = THROTTLE_THRESHOLD):
        self.nvml = nvml
        self.interval_ns = int(interval_s * 1e9)
        self.threshold = threshold
        self.readings: list[GpuReading] = []
        self.throttled_polls = 0
        self.last_ns: int | None = None
        self.classified = 0  # samples classified so far
        self.flags: list[bool] = []  # per sample: taken while throttled
        self.was_hot = False  # the previous reading was throttled
        self.before: GpuReading | None = None
        self.after: GpuReading | None = None
        self.others: list[dict] | None = None

    @classmethod
    def for_device(cls, device: str, nvml=None) -> GpuMonitor | None:
        """A monitor for ``device``: ``nvml`` None opens NVML on a CUDA device, False disables it, an object is used."""
        if nvml is False or (nvml is None and not str(device).startswith("cuda")):
            return None
        if nvml is None:
            import torch

            index = torch.device(device).index
            nvml = open_nvml(-1 if index is None else index)
        return cls(nvml) if nvml is not None else None

    def start(self, now_ns: int) -> None:
        self.others = self.nvml.other_processes()
        self.before = self.nvml.read()
        self.last_ns = now_ns

    def throttled_now(self) -> bool:
        """Read the GPU once: is it throttled now? (warm-up waits for the clocks to come up)"""
        return self.nvml.read().throttled(self.threshold)

    def poll(self, now_ns: int, n_samples: int, force: bool = False) -> None:
        if not force and self.last_ns is not None and now_ns - self.last_ns < self.interval_ns:
            return
        reading = self.nvml.read()
        self.readings.append(reading)
        self.last_ns = now_ns
        hot = reading.throttled(self.threshold)
        self.throttled_polls += hot
        # a throttled reading on either side of a stretch of samples flags it: the GPU may have been slow
        # for all of it, and it needs time to recover (nvbench pauses after a throttled trial)
        self.flags.extend([hot or self.was_hot] * (n_samples - self.classified))
        self.classified = n_samples
        self.was_hot = hot

    def stop(self, now_ns: int, n_samples: int) -> None:
        self.poll(now_ns, n_samples, force=True)
        self.after = self.readings[-1]

    def state(self) -> dict:
        """JSON-ready record: before, after, clock range while sampling, polls, other processes."""
        clocks = [r.sm_clock_mhz for r in [self.before, *self.readings] if r is not None and r.sm_clock_mhz]
        return {
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "sm_clock_min_mhz": min(clocks) if clocks else None,
            "sm_clock_max_mhz": max(clocks) if clocks else None,
            "max_sm_clock_mhz": self.before.max_sm_clock_mhz if self.before else None,
            "polls": len(self.readings),
            "throttled_polls": self.throttled_polls,
            "throttle_threshold": self.threshold,
            "other_processes": self.others,
        }


def gpu_clock_warnings(state: dict | None, n_throttled: int = 0, n_total: int = 0) -> list[str]:
    """Warnings about the GPU's clocks in a ``GpuMonitor.state()`` record: the SM clock moved, samples throttled."""
    if not state:
        return []
    out = []
    lo, hi, top = state.get("sm_clock_min_mhz"), state.get("sm_clock_max_mhz"), state.get("max_sm_clock_mhz")
    if lo and hi and (hi - lo) > CLOCK_MOVE_WARN * (top or hi):
        out.append(f"the GPU's SM clock moved between {lo} and {hi} MHz during the measurement (max {top or '?'} MHz):"
                   " power or thermal management changed its speed; lock the clocks (nvidia-smi -lgc) or"
                   " re-run once the GPU is settled")
    if n_throttled:
        out.append(f"{n_throttled} of {n_total} samples were taken while the GPU was throttled (SM clock below "
                   f"{100 * state.get('throttle_threshold', THROTTLE_THRESHOLD):.0f}% of max, or a thermal/hardware "
                   "slowdown) and were left out of the statistics")
    return out


def gpu_contention_warnings(state: dict | None) -> list[str]:
    """A warning when other processes held a compute context on the GPU during the measurement."""
    others = (state or {}).get("other_processes")
    if not others:
        return []
    pids = ", ".join(str(p["pid"]) for p in others[:5])
    return [f"other work is using the GPU: {len(others)} other process{'es' if len(others) > 1 else ''}"
            f" (pid {pids}); re-run on an idle GPU"]


# ---------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU counters at one instant (differences of two snapshots are what mean something)."""

    wall_s: float
    process_s: float  # CPU time of this process (all its threads)
    thread_s: float  # CPU time of the calling thread
    busy_s: float | None = None  # busy time of the CPUs this process may use, all processes together
    cpus: int = 1  # CPUs this process may use
    load_1m: float | None = None
    wait_s: float | None = None  # time this process's threads were runnable but waiting for a core (Linux)


def runqueue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (None where Linux does not say)."""
    total, found = 0, False
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
                found = True
        except (OSError, ValueError, IndexError):  # a thread that just exited, or no schedstats
            continue
    return total / 1e9 if found else None


def usable_cpus() -> list[int]:
    """The CPU numbers this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_snapshot() -> CpuSnapshot:
    """Read the CPU counters now (psutil for the per-CPU busy time; None where it is unavailable)."""
    cpus = usable_cpus()
    busy = None
    try:
        import psutil

        per_cpu = psutil.cpu_times(percpu=True)
        mine = [per_cpu[i] for i in cpus if i < len(per_cpu)] or per_cpu
        busy = sum(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0)
                   - getattr(t, "guest_nice", 0.0) for t in mine)
    except Exception:  # psutil missing or unsupported: no busy time, the other checks still work
        pass
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return CpuSnapshot(wall_s=time.perf_counter(), process_s=time.process_time(), thread_s=time.thread_time(),
                       busy_s=busy, cpus=len(cpus), load_1m=load, wait_s=runqueue_wait_s())


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict:
    """What happened on the CPU between two snapshots: cores used by other work, by us, the thread's share."""
    wall = after.wall_s - before.wall_s
    out = {"wall_s": wall, "cpus": after.cpus, "load_1m": after.load_1m, "others_busy_cores": None,
           "process_cores": None, "thread_share": None, "waiting_cores": None}
    if wall <= 0:
        return out
    proc = (after.process_s - before.process_s) / wall
    out["process_cores"] = proc
    out["thread_share"] = min(1.0, (after.thread_s - before.thread_s) / wall)
    if after.wait_s is not None and before.wait_s is not None:  # a thread that exited takes its count along
        out["waiting_cores"] = max(0.0, (after.wait_s - before.wait_s) / wall)
    if after.busy_s is not None and before.busy_s is not None and wall >= MIN_CPU_WINDOW_S:
        out["others_busy_cores"] = max(0.0, (after.busy_s - before.busy_s) / wall - proc)
    return out


def cpu_warnings(state: dict | None, threads: int, cpu_device: bool) -> list[str]:
    """Warnings about a CPU usage record from ``cpu_usage`` (plus ``threads``): other work, a descheduled thread."""
    if not state:
        return []
    out = []
    cpus = state.get("cpus") or 1
    need = threads if cpu_device else 1  # a GPU timing needs one core to launch and wait
    others = state.get("others_busy_cores")
    waiting = state.get("waiting_cores")
    load = state.get("load_1m")
    crowded = others is not None and need > cpus - others + OTHERS_TOLERANCE_CORES
    queued = waiting is not None and waiting > WAIT_WARN * need
    if crowded or queued:
        seen = []
        if queued:
            seen.append(f"our threads waited for a core {100 * waiting / need:.0f}% of the time")
        if others is not None:
            seen.append(f"{others:.1f} of {cpus} cores busy with other processes")
        if load is not None:
            seen.append(f"load {load:.1f} on {cpus} core{'s' if cpus > 1 else ''}")
        remedy = ("re-run with --threads 1 (threads=1) or on an idle machine" if need > 1
                  else "re-run on an idle machine")
        out.append(f"other work is using the CPU: {', '.join(seen)}, while {need} thread{'s' if need > 1 else ''}"
                   f" timed; {remedy}")
    share = state.get("thread_share")
    if cpu_device and share is not None and state.get("wall_s", 0) >= MIN_CPU_WINDOW_S and share < THREAD_SHARE_WARN:
        out.append(f"the timing thread ran only {100 * share:.0f}% of the wall time it was timing: other work took "
                   "its CPU (or the timed function sleeps or waits); re-run with fewer threads or on an idle machine")
    return out


def others_busy_cores(interval_s: float = 0.1, snapshot: Callable[[], CpuSnapshot] = cpu_snapshot) -> float | None:
    """Cores used by other processes right now: sleep ``interval_s`` and count the busy time of our CPUs."""
    a = snapshot()
    time.sleep(interval_s)
    b = snapshot()
    if a.busy_s is None or b.busy_s is None:
        return None
    wall = b.wall_s - a.wall_s
    return max(0.0, (b.busy_s - a.busy_s - (b.process_s - a.process_s)) / wall) if wall > 0 else None


def auto_threads(physical: int | None = None, cpus: int | None = None, others: float | None = None) -> int:
    """Intra-op threads for CPU timing on a possibly shared machine.

    All physical cores when the machine is idle, one fewer for each core (or part of one above a quarter) that
    other work keeps busy, at least one. OpenMP-style threads wait for each other at every operator: one thread
    that loses its core to another process stalls all of them, which is why a 2-core machine with other work
    running gave 98-862 ms for a model that takes 25 ms on one undisturbed thread.
    """
    if physical is None:
        from .env import physical_cores

        physical = physical_cores()
    cpus = cpus if cpus is not None else len(usable_cpus())
    if others is None:
        others = others_busy_cores() or 0.0
    free = math.floor(cpus - others + 0.25)  # a core counts as taken once others use more than a quarter of it
    return max(1, min(physical, free))


@dataclass
class CpuMonitor:
    """Snapshots of the CPU counters around sampling (``snapshot`` is injectable)."""

    snapshot: Callable[[], CpuSnapshot] = cpu_snapshot
    before: CpuSnapshot | None = field(default=None)

    def start(self) -> None:
        self.before = self.snapshot()

    def stop(self) -> dict | None:
        return cpu_usage(self.before, self.snapshot()) if self.before is not None else None
