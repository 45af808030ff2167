"""A sweep on two GPUs keeps both busy at once: points run side by side, one per GPU, utilization sampled.

``toolkit.sweep.run_sweep`` with the local executor (what ``python -m toolkit sweep`` runs) starts one
process per point, each seeing one GPU, one point per GPU at a time. This run checks that the two GPUs
of a host really work at the same time rather than in turn:

1. a small grid: 4 points of ``latency`` (resnet-50, float16, batch 32/64/96/128, sampling for
   ``--point-s`` seconds each: a GPU-bound call, so a running point keeps its GPU busy) through
   ``run_sweep(..., executor="local", gpus=["0", "1"])``, in a fresh sweep folder (temporary unless
   ``--sweep-dir``);
2. meanwhile a background thread samples each GPU's utilization every 0.2 s through NVML (``pynvml``;
   ``nvidia-smi --query-gpu=index,utilization.gpu`` where NVML is missing). ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
   makes the points' CUDA indices NVML's;
3. each point's start, end and GPU come from its result file (``started``, ``finished``,
   ``job.cuda_visible_devices``).

OUT/sweep_two_gpus.json (saved after the sweep and on interruption) holds the samples, the points, the
seconds both GPUs were more than 50% busy at the same time (``both_busy_s``), the seconds points on
different GPUs ran at the same time (``overlap_s``), and a verdict: "both GPUs busy at once" when both
reach ``--min-both-s`` (default 5 s). One GPU visible: status "skipped" with the reason. The whole
run stops at ``--budget-s`` (default 90 s; the running points are cancelled, the record kept).

``--quick --device cpu``: 2 points of tiny-resnet on the CPU through the same local executor (two CPU
slots on disjoint cores), utilization sampled per slot's cores with psutil instead of NVML.

  PYTHONPATH=. python benchmarks/sweep_two_gpus.py --out data/gpu                    # 2 GPUs, ~60 s
  PYTHONPATH=. python benchmarks/sweep_two_gpus.py --quick --device cpu --out /tmp/x  # CPU smoke test, ~15 s
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from toolkit.results import RunRecord, load_json, provenance
from toolkit.sweep import SweepSpec, cpu_groups, point_path, run_sweep

BUSY = 50.0  # percent: a GPU (or a slot's cores) above this counts as busy
PERIOD_S = 0.2
BUDGET_S = 90.0
MIN_BOTH_S = 5.0


# -- utilization samplers: each is a callable -> {device label: percent busy} -----------------------------

class NvmlSampler:
    """GPU utilization from NVML: the percent of the last sample period in which a kernel ran."""

    source = "nvml"

    def __init__(self, indices):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.indices = pynvml, [int(i) for i in indices]
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]

    def info(self) -> list[dict]:
        nv = self.nvml
        out = []
        for i, h in zip(self.indices, self.handles):
            name = nv.nvmlDeviceGetName(h)
            out.append({"label": str(i), "name": _text(name),
                        "pci_bus_id": _text(nv.nvmlDeviceGetPciInfo(h).busId)})
        return out

    def __call__(self) -> dict:
        return {str(i): float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu) for i, h in zip(self.indices, self.handles)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


def slot_label(cpus) -> str:
    """A CPU slot's name, as its points' files give it (``job.cpus``)."""
    return f"cpus {cpus[0]}-{cpus[-1]}"


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class SmiSampler:
    """GPU utilization from ``nvidia-smi`` (one process per sample: coarser, but needs no Python bindings)."""

    source = "nvidia-smi"

    def __init__(self, indices):
        self.indices = [str(i) for i in indices]

    def info(self) -> list[dict]:
        return [{"label": i} for i in self.indices]

    def __call__(self) -> dict:
        text = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=5, check=True).stdout
        out = {}
        for line in text.strip().splitlines():
            idx, util = (x.strip() for x in line.split(","))
            if idx in self.indices:
                out[idx] = float(util)
        return out

    def close(self) -> None:
        pass


class CpuSampler:
    """CPU slots' utilization from psutil: the mean percent busy of each slot's cores (the CPU smoke test)."""

    source = "psutil"

    def __init__(self, groups):
        import psutil

        self.psutil, self.groups = psutil, [tuple(g) for g in groups]
        psutil.cpu_percent(percpu=True)  # the first call starts the interval

    def info(self) -> list[dict]:
        return [{"label": slot_label(g), "cpus": list(g)} for g in self.groups]

    def __call__(self) -> dict:
        per = self.psutil.cpu_percent(percpu=True)
        return {slot_label(g): sum(per[c] for c in g) / len(g) for g in self.groups}

    def close(self) -> None:
        pass


def gpu_indices() -> tuple[list[str], str | None]:
    """The GPUs NVML (or nvidia-smi) sees, without starting CUDA in this process; and why none, if none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return [str(i) for i in range(n)], None
    except Exception as e:  # no bindings or no driver: ask the command-line tool
        why = f"NVML: {type(e).__name__}: {e}"
    if shutil.which("nvidia-smi") is None:
        return [], f"{why}; no nvidia-smi"
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return [], f"{why}; nvidia-smi: {e}"
    return [x.strip() for x in text.split() if x.strip()], None


def make_sampler(quick_cpu: bool, gpus: list[str]):
    if quick_cpu:
        groups = cpu_groups(2) or [tuple(sorted(os.sched_getaffinity(0)))] * 2
        return CpuSampler(groups)
    try:
        return NvmlSampler(gpus)
    except Exception:
        return SmiSampler(gpus)


class Sampling:
    """A background thread calling ``sampler`` every ``period`` seconds: [(wall time, {device: percent})]."""

    def __init__(self, sampler, period: float = PERIOD_S, clock=time.time):
        self.sampler, self.period, self.clock = sampler, period, clock
        self.samples: list[tuple[float, dict]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="utilization", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = self.clock()
            try:
                self.samples.append((t, self.sampler()))
            except Exception:  # one failed query (a busy nvidia-smi) must not end the sampling
                self.errors += 1
            self._stop.wait(max(0.0, self.period - (self.clock() - t)))

    def __enter__(self) -> Sampling:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- what the files and samples say ------------------------------------------------------------------------

def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def read_points(out_dir: Path, points, t0: float) -> list[dict]:
    """Each finished point's interval (seconds after ``t0``), its device and headline numbers, from its file."""
    rows = []
    for p in points:
        path = point_path(out_dir, p.id)
        if not path.exists():
            err = point_path(out_dir, p.id, error=True)
            rows.append({"id": p.id, "axes": p.axes, "status": "error" if err.exists() else "not run",
                         "error": load_json(err).get("error") if err.exists() else None})
            continue
        rec = load_json(path)
        job = rec.get("job") or {}
        cpus = job.get("cpus")
        device = job.get("cuda_visible_devices") or (slot_label(cpus) if cpus else "cpu")
        rows.append({"id": p.id, "axes": p.axes, "status": "ok", "device": str(device),
                     "start_s": _ts(rec["started"]) - t0, "end_s": _ts(rec["finished"]) - t0,
                     "seconds": rec["seconds"], "metrics": rec.get("metrics"), "pid_host": job.get("host")})
    return rows


def overlap_s(points: list[dict]) -> float:
    """Seconds during which points on at least two different devices ran at the same time."""
    events = []
    for p in points:
        if p.get("status") == "ok":
            events += [(p["start_s"], 1, p["device"]), (p["end_s"], -1, p["device"])]
    running: dict[str, int] = {}
    total, last = 0.0, None
    for t, step, device in sorted(events, key=lambda e: (e[0], e[1])):
        if last is not None and sum(1 for n in running.values() if n > 0) >= 2:
            total += t - last
        running[device] = running.get(device, 0) + step
        last = t
    return total


def both_busy_s(samples: list[tuple[float, dict]], devices: list[str], busy: float = BUSY) -> float:
    """Seconds in which every device in ``devices`` was above ``busy`` percent (each sample covers the gap before it)."""
    total = 0.0
    for (t_prev, _), (t, util) in zip(samples, samples[1:]):
        if devices and all(util.get(d, 0.0) > busy for d in devices):
            total += t - t_prev
    return total


def busy_s(samples: list[tuple[float, dict]], device: str, busy: float = BUSY) -> float:
    return sum(t - tp for (tp, _), (t, u) in zip(samples, samples[1:]) if u.get(device, 0.0) > busy)


def verdict(both: float, overlap: float, min_both: float, what: str = "GPUs") -> str:
    if both >= min_both:
        return f"both {what} busy at once"
    if overlap >= min_both:
        return f"points overlapped in time but the {what} were not both busy (launch-bound points, or startup)"
    return "not shown: the points ran one after the other, or too briefly"


def summarize(record: dict, samples, points, t0: float, devices: list[str], min_both: float,
              what: str = "GPUs") -> None:
    record["samples"] = [{"t": t - t0, **{f"util_{d}": u.get(d) for d in devices}} for t, u in samples]
    record["points"] = points
    both, ov = both_busy_s(samples, devices), overlap_s(points)
    span = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0
    record["summary"] = {
        "devices": devices, "busy_threshold_percent": BUSY, "sampled_s": span, "n_samples": len(samples),
        "both_busy_s": both, "busy_s": {d: busy_s(samples, d) for d in devices}, "overlap_s": ov,
        "points_ok": sum(p["status"] == "ok" for p in points), "points": len(points),
        "points_per_device": {d: sum(p.get("device") == d for p in points) for d in {p.get("device") for p in points
                                                                                      if p.get("device")}},
        "min_both_s": min_both, "verdict": verdict(both, ov, min_both, what)}


# -- the run --------------------------------------------------------------------------------------------

def spec_for(quick_cpu: bool, point_s: float) -> SweepSpec:
    if quick_cpu:
        return SweepSpec("latency", fixed={"model": "tiny-resnet", "device": "cpu", "max_time_s": point_s,
                                           "target_rel_ci": 1e-6, "threads": 1},
                         axes={"batch_size": [1, 2]})
    # target_rel_ci far below reach: every point samples for its whole max_time_s
    return SweepSpec("latency", fixed={"model": "resnet-50", "dtype": "float16", "device": "cuda",
                                       "max_time_s": point_s, "target_rel_ci": 1e-6},
                     axes={"batch_size": [32, 64, 96, 128]})


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="with --device cpu: the CPU smoke test")
    ap.add_argument("--point-s", type=float, default=None, help="sampling seconds per point (default 6; 1 quick)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="hard time budget of the whole run")
    ap.add_argument("--min-both-s", type=float, default=None,
                    help=f"seconds both must be busy for the verdict (default {MIN_BOTH_S:.0f}; 0.2 quick)")
    ap.add_argument("--sweep-dir", default=None, help="the sweep folder (default: a fresh temporary one)")
    args = ap.parse_args(argv)
    args.point_s = args.point_s or (1.0 if args.quick else 6.0)
    args.min_both_s = args.min_both_s if args.min_both_s is not None else (0.2 if args.quick else MIN_BOTH_S)
    return args


def main(argv=None, gpus=None) -> int:
    """``gpus`` (tests): the GPU indices this host has, instead of asking NVML."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    quick_cpu = args.quick and args.device == "cpu"
    path = Path(args.out) / "sweep_two_gpus.json"
    record = {"benchmark": "sweep_two_gpus", "status": "running",
              "provenance": provenance("cpu" if quick_cpu or args.device == "cpu" else None),
              "settings": {"quick": args.quick, "device": "cpu" if quick_cpu else "cuda", "point_s": args.point_s,
                           "budget_s": args.budget_s, "period_s": PERIOD_S, "busy_percent": BUSY,
                           "min_both_s": args.min_both_s}}

    run = RunRecord("sweep_two_gpus", path, record, start=t_start)
    save, log = run.save, run.log

    if not quick_cpu:
        found, why = (list(gpus), None) if gpus is not None else gpu_indices()
        record["gpus_visible"] = found
        if len(found) < 2 or args.device == "cpu":
            record["skipped"] = ("needs two GPUs; the device is the CPU (--quick --device cpu runs the CPU smoke "
                                 "test)" if args.device == "cpu" else
                                 f"needs two GPUs; this host has {len(found)} visible" + (f" ({why})" if why else ""))
            log(f"skipped: {record['skipped']}")
            save("skipped")
            print_summary(record)
            return 0
        gpus = found[:2]
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the points' CUDA index = NVML's index
    spec = spec_for(quick_cpu, args.point_s)
    points = spec.points()
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else Path(tempfile.mkdtemp(prefix="sweep_two_gpus-"))
    record["settings"].update(spec=spec.to_dict(), command=spec.command_line(), sweep_dir=str(sweep_dir))
    sampler = make_sampler(quick_cpu, gpus or [])
    devices = list(dict.fromkeys(d["label"] for d in sampler.info()))
    record["sampler"] = {"source": sampler.source, "devices": sampler.info()}
    save()
    log(f"{len(points)} points on {'2 CPU slots' if quick_cpu else 'GPUs ' + ','.join(gpus)}; sampling {sampler.source}")
    timer = threading.Timer(max(1.0, args.budget_s - run.elapsed_s - 5), _thread.interrupt_main)
    t0 = time.time()
    status = "complete"
    try:
        with Sampling(sampler) as sampling:
            timer.start()
            try:
                result = run_sweep(spec, sweep_dir, "local", gpus=[] if quick_cpu else gpus,
                                   parallel=2, time_limit_min=max(1, int(args.budget_s // 60)), poll_s=0.2,
                                   on_point=lambda p, s: log(f"point {p.label}: {s}"))
                record["sweep"] = {"statuses": result.statuses}
            except KeyboardInterrupt:  # the budget's timer or Ctrl-C: running points are cancelled, files kept
                status = "interrupted: time budget"
            finally:
                timer.cancel()
    finally:
        sampler.close()
    summarize(record, sampling.samples, read_points(sweep_dir, points, t0), t0, devices, args.min_both_s,
              "CPU slots" if quick_cpu else "GPUs")
    record["sampler"]["errors"] = sampling.errors
    save(status)
    print_summary(record)
    print(f"wrote {path}")
    return 0


def print_summary(record: dict) -> None:
    print(f"\nsweep on two {'CPU slots' if record['settings']['device'] == 'cpu' else 'GPUs'}: "
          f"status {record['status']}")
    if record.get("skipped"):
        print(f"skipped: {record['skipped']}")
        return
    for p in record.get("points", []):
        if p["status"] != "ok":
            print(f"  {p['axes']}: {p['status']} {p.get('error') or ''}")
            continue
        m = p.get("metrics") or {}
        print(f"  {p['axes']}: device {p['device']}, {p['start_s']:5.1f}-{p['end_s']:5.1f} s, "
              f"median {m.get('median_ms', float('nan')):.2f} ms")
    s = record["summary"]
    busy = ", ".join(f"{d} {v:.1f} s" for d, v in s["busy_s"].items())
    print(f"busy (> {s['busy_threshold_percent']:.0f}%): {busy}; both at once {s['both_busy_s']:.1f} s; "
          f"points on different devices overlapped {s['overlap_s']:.1f} s")
    print(f"verdict: {s['verdict']}")


if __name__ == "__main__":
    sys.exit(main())
