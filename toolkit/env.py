"""Where a measurement runs: the environment record attached to every result (what ran, where, when), and the
rules that choose a device (``resolve_device`` for a user's choice, ``infer_device`` for a callable's)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import socket
import subprocess
import sys
from functools import lru_cache


def cpuinfo(*fields: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of ``fields`` (case-insensitive), or None
    (no such line, or not Linux)."""
    names = tuple(f.lower() for f in fields)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(names):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of the CPU's last-level cache in bytes, as Linux's sysfs reports it for CPU 0; None where it does not.

    Timings that read the same weights again and again use it to read enough
    distinct copies that each call comes from memory, as in a real run.
    """
    best = None
    try:
        for entry in sorted(os.listdir(root)):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(root, entry, "level")) as f:
                level = int(f.read().strip())
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip().upper()
            m = re.fullmatch(r"(\d+)([KMG]?)B?", text)
            if m is None:
                continue
            size = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]
            if best is None or level > best[0] or (level == best[0] and size > best[1]):
                best = (level, size)
    except (OSError, ValueError):
        return None
    return best[1] if best else None


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo (Linux) or platform."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores (not hyper-threads) available to this process."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            logical_here = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
            return max(1, min(n, logical_here))
    except Exception:  # psutil missing or unsupported platform
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _nvml_state(index: int) -> dict:
    """SM clock (MHz), temperature (C) and driver via NVML, where available."""
    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        out = {
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
        }
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in out.items()}
    except Exception:
        pass
    try:  # nvidia-smi is always there when a driver is
        q = "clocks.sm,temperature.gpu,driver_version"
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits", f"--id={index}"],
            capture_output=True, text=True, timeout=10,
        )
        sm, temp, driver = [s.strip() for s in r.stdout.strip().split(",")]
        return {"sm_clock_mhz": int(sm), "temperature_c": int(temp), "driver": driver}
    except Exception:
        return {}


def environment(device: str | None = None, threads: int | None = None) -> dict:
    """A JSON-ready record of the software, hardware and time of a measurement."""
    import torch

    rec: dict = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "numpy": _package_version("numpy"),
        "cpu_model": cpu_model(),
        "cpu_physical_cores": physical_cores(),
        "cpu_cache_bytes": cache_bytes(),
        "cpu_threads": threads if threads is not None else torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        idx = torch.device(device).index if device and str(device).startswith("cuda") else None
        idx = torch.cuda.current_device() if idx is None else idx
        props = torch.cuda.get_device_properties(idx)
        rec["gpu"] = props.name
        rec["gpu_memory_bytes"] = props.total_memory
        rec["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
        rec["gpu_sm_count"] = props.multi_processor_count
        rec.update(_nvml_state(idx))
    return rec


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when a GPU is present else 'cpu'; check that 'cuda' exists."""
    import torch

    from .errors import ToolkitError

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ToolkitError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
        return device
    if device == "cpu":
        return device
    raise ToolkitError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")


def is_cuda(device) -> bool:
    """True for a CUDA device ("cuda", "cuda:1", a ``torch.device``)."""
    import torch

    return torch.device(device).type == "cuda"


def infer_device(fn, args: tuple = (), device=None) -> str:
    """The device ``fn(*args)`` runs on: "cuda[:N]" or "cpu". The one rule every measurement uses.

    The evidence, strongest first:

    1. ``device``, when the caller gives one (returned as given).
    2. What the callable says about itself, since it decides where its work
       runs even when its inputs live elsewhere (a model on the GPU fed CPU
       token ids moves them): a ``device`` attribute (``BenchModel``,
       Hugging Face models, the offload engine), else the first parameter of
       the ``nn.Module`` it is; the same for what it wraps (``.module``) or
       is a bound method of.
    3. Its tensor arguments: CUDA if any of them is on a GPU, else CPU.
    4. Nothing to go on (a closure): CUDA if this process has already used
       the GPU, else CPU.

    Where in doubt the rule leans to CUDA: timing GPU work with the host clock
    and no synchronisation measures only the kernel launches (the classic
    benchmarking mistake), while CUDA events around CPU work still measure its
    duration. The toolkit measures on two kinds of device, so anything not
    CUDA ("meta", "mps") counts as the CPU.
    """
    import torch

    if device is not None:
        return str(device)

    def kind(dev) -> str:
        return str(dev) if str(dev).startswith("cuda") else "cpu"

    for owner in (fn, getattr(fn, "module", None), getattr(fn, "__self__", None)):
        own = getattr(owner, "device", None)
        if isinstance(own, (str, torch.device)):
            return kind(own)
        if isinstance(owner, torch.nn.Module):
            p = next(owner.parameters(), None)
            if p is not None:
                return kind(p.device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors:
        return next((kind(t.device) for t in tensors if t.device.type == "cuda"), "cpu")
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
