"""CPU experts as CUDA host functions, for the benchmarks that capture a decode step whole (``host_nodes.py``,
``graph_step.py``).

``host_functions.c`` beside this module holds the functions; ``library()`` builds it the way the toolkit builds
its CPU kernel (``toolkit.moe.cpu_gemv``: the machine's compiler, once per source, compiler and CPU, into the
toolkit's cache) and loads it. Each function takes one job, a C struct whose buffers the caller keeps alive:
``LayerJob`` here, and for ``toolkit_host_share`` (the toolkit's, included by the C source)
``toolkit.moe.graph_pass.ShareJob``. ``launch`` queues a function on a CUDA stream
(``cuLaunchHostFunc``); under stream capture it becomes a host node of the graph. ``HostPointer`` hands a
pinned host tensor to a Triton kernel, which then reads it in place. ``replay_ms`` times a captured graph's
replays (``graph_step.py``, ``graph_pass_probe.py``); ``synced_steps_ms`` an engine's decode step, bare
(``captured_step.py``, ``graph_pass_probe.py``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from toolkit.errors import ToolkitError

SOURCE = Path(__file__).with_name("host_functions.c")
MAX_EXPERTS = 8  # the C source's MAX_EXPERTS


class LayerJob(ctypes.Structure):
    """The C source's ``layer_job`` (``host_nodes_layer``)."""

    _fields_ = [("lin", ctypes.c_void_p), ("x", ctypes.c_void_p), ("n", ctypes.c_int),
                ("gate_up", ctypes.c_void_p * MAX_EXPERTS), ("down", ctypes.c_void_p * MAX_EXPERTS),
                ("h", ctypes.c_void_p), ("act", ctypes.c_void_p), ("yk", ctypes.c_void_p), ("acc", ctypes.c_void_p),
                ("y", ctypes.c_void_p), ("D", ctypes.c_int64), ("I", ctypes.c_int64), ("threads", ctypes.c_int),
                ("busy_s", ctypes.c_double), ("calls", ctypes.c_int64)]


@functools.cache
def library() -> ctypes.CDLL:
    """``host_functions.c`` built for this machine and loaded, its functions' argument types declared."""
    from toolkit.moe import graph_pass
    from toolkit.moe.cpu_gemv import build_source

    built = build_source(SOURCE, depends=(graph_pass.SOURCE,))
    if isinstance(built, str):
        raise ToolkitError(f"the host functions cannot be built: {built}")
    lib = ctypes.CDLL(str(built))
    for fn in (lib.host_nodes_layer, lib.toolkit_host_share):
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
    return lib


def kernel_entry() -> int:
    """The address of the toolkit's CPU kernel entry point (``toolkit_linear_bf16_path``): each job's ``lin``."""
    from toolkit.moe import cpu_gemv

    return cpu_gemv.entry_point()


@functools.cache
def _cu_launch_host_func():
    driver = ctypes.CDLL("libcuda.so.1")
    fn = driver.cuLaunchHostFunc
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    return fn


def launch(stream, fn, job: ctypes.Structure) -> None:
    """Queue ``fn(&job)`` (a function of ``library()``) on ``stream`` (a ``torch.cuda.Stream``), in its order."""
    rc = _cu_launch_host_func()(stream.cuda_stream, ctypes.cast(fn, ctypes.c_void_p).value, ctypes.addressof(job))
    if rc:
        raise ToolkitError(f"cuLaunchHostFunc returned CUDA error {rc}")


class HostPointer:
    """A pinned host tensor handed to Triton by its address (Triton takes any object with ``data_ptr()`` and
    ``dtype``): with unified addressing the GPU reads it in place."""

    def __init__(self, t):
        self.t, self.dtype = t, t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


def replay_ms(graph, replays: int) -> float:
    """GPU ms of one replay of a captured ``graph`` (``torch.cuda.CUDAGraph``): the median of ``replays``, each
    timed with CUDA events around it."""
    import statistics

    import torch

    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(statistics.median(times))


def synced_steps_ms(fn, args, steps: int, warm: int = 5, after_warm=None) -> list[float]:
    """ms of each of ``steps`` calls ``fn(*args)`` (a decode step), each timed on the host clock up to a sync, after
    ``warm`` untimed calls and a sync; ``after_warm()`` runs between the two (e.g. to zero a counter)."""
    import time

    import torch

    with torch.no_grad():
        for _ in range(warm):
            fn(*args)
        torch.cuda.synchronize()
        if after_warm is not None:
            after_warm()
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn(*args)
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
    return out
