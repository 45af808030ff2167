"""Host memory for the experts' weights: on 2 MiB pages where the OS grants them, page-locked for the GPU.

A missed expert is read from host memory by two paths at once, the CPU's
share and the copies to the GPU. With the experts on the kernel's 4 KiB
pages, the CPU's share read 77-79 GB/s beside copies on a one-H200 host; on
transparent huge pages it read 96 GB/s, both paths 145 GB/s against 128-132
(``benchmarks/cpu_share.py``). The calibration and the ceilings read the same
kind of memory, so a bound is measured on what the engine reads.

- ``empty(shape, dtype, pin=True)``: anonymous memory advised for transparent
  huge pages (``madvise``), touched, and with ``pin`` registered with CUDA
  (``cudaHostRegister``, portable and mapped): a tensor that copies like one
  of ``torch.empty(..., pin_memory=True)``. It is unregistered and unmapped
  when the last tensor on it is freed. Where huge pages cannot be had (not
  Linux, transparent huge pages "never", a tensor under 2 MiB, the switch
  off, a registration that failed) it is torch's own allocation; ``why_not()``
  says why.
- ``set_enabled(False)`` (or ``TOOLKIT_HUGE_PAGES=0`` in the environment,
  ``python -m toolkit moe --no-huge-pages``) keeps torch's allocation.
- ``huge_fraction(t)``: the share of the mapping under ``t`` that the kernel
  backs with huge pages (``/proc/self/smaps``), for the run record.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20  # bytes
_REGISTER_FLAGS = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every device, mapped
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_state = {"enabled": os.environ.get("TOOLKIT_HUGE_PAGES", "1").strip().lower() not in ("0", "false", "no", "off"),
          "failed": None}


def set_enabled(on: bool) -> None:
    """Switch huge pages for the experts' host memory on or off (for tensors made from now on)."""
    _state["enabled"] = bool(on)


def why_not() -> str | None:
    """Why ``empty`` gives torch's own allocation here, or None when it gives huge pages."""
    if not _state["enabled"]:
        return "switched off"
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return f"transparent huge pages are a Linux feature ({sys.platform})"
    try:
        mode = _THP.read_text()
    except OSError:
        return f"this kernel has no transparent huge pages ({_THP} is missing)"
    if "[never]" in mode:
        return "transparent huge pages are off on this machine ([never])"
    return _state["failed"]


def enabled() -> bool:
    return why_not() is None


class _Mapping(mmap.mmap):
    """Anonymous memory that unregisters itself from CUDA before it is unmapped (when its last tensor is freed)."""

    registered = 0

    def __del__(self):
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.registered)
            self.registered = 0


def empty(shape, dtype: torch.dtype, *, pin: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor, on huge pages where they can be had, pinned for CUDA copies when ``pin`` and a
    GPU is here (see the module's docstring)."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    pin = bool(pin) and torch.cuda.is_available()
    if not enabled() or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    m = _Mapping(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(m, dtype=torch.uint8)  # holds m: unmapped when the last view is freed
    start = (-raw.data_ptr()) % HUGE_PAGE
    t = raw[start:start + nbytes]
    t.zero_()  # the pages fault in now, as huge pages where the kernel has them
    if pin:
        rc = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, _REGISTER_FLAGS))
        if rc != 0:
            _state["failed"] = f"cudaHostRegister failed with CUDA error {rc}; torch's pinned memory is used"
            del t, raw, m
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        m.registered = t.data_ptr()
    return t.view(dtype).view(shape)


def copy_of(t: torch.Tensor, *, pin: bool = True) -> torch.Tensor:
    """A copy of CPU tensor ``t`` in memory from ``empty``."""
    out = empty(t.shape, t.dtype, pin=pin)
    out.copy_(t)
    return out


def huge_fraction(t: torch.Tensor) -> float | None:
    """Share of the mapping that holds ``t``'s first byte backed by huge pages, or None where that cannot be read."""
    ptr = t.data_ptr()
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    span = None
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's header: "lo-hi perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            span = (lo, hi) if lo <= ptr < hi else None
        elif span is not None and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024 / (span[1] - span[0])
    return None


def describe(t: torch.Tensor | None) -> dict:
    """What the run record keeps about the experts' host memory: pinned, on huge pages (and what share)."""
    if t is None or t.device.type != "cpu":
        return {"pinned": False, "huge_pages": None, "reason": "no host tier"}
    if not (torch.cuda.is_available() and t.is_pinned()):
        return {"pinned": False, "huge_pages": None, "reason": "not page-locked: no GPU copies from it"}
    return {"pinned": True, "huge_pages": huge_fraction(t), "reason": why_not()}
