"""A stream that waits for the host: GPU work queued now, run once a host thread says its inputs are ready.

An offloaded decode layer ends with its CPU experts. Waiting for them on the
host, and only then queueing their results' copy, the sum and the next
layer's dense part, puts all of that host work on the critical path of the
step, at the cold cost host work has right after a CPU expert. With a gate
the host queues that work at once, behind a wait on a counter in pinned
host memory (``cuStreamWaitValue32``: the GPU's front end polls it); the
worker thread raises the counter when the results are in their pinned
buffer, and the GPU goes on without the host.

``StreamGate(device)`` on a CUDA device whose driver has the stream-memory
operations (``cuStreamWaitValue32``, the V2 functions, on by default since
CUDA 11.7), checked once by a live test: a queued wait must hold an event
back until the counter is raised. ``HostGate`` does the same for CPU tensors, whose ops run at once:
its wait blocks the calling thread until the counter is raised, so a CPU
engine runs the same code (which tests use). ``gate_for(device)`` -> a gate,
or None with the reason (``unavailable_reason``).

Ordering: the worker writes its results, then the counter, so a host whose
stores become visible in program order (x86-64) is needed: elsewhere no gate.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
import time

import torch

_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: wait until (int32) *addr >= value


class HostGate:
    """A counter raised by one host thread and waited for by another (CPU tensors: their ops run at once)."""

    def __init__(self):
        self._value = 0
        self._issued = 0
        self._cond = threading.Condition()

    def ticket(self) -> int:
        """The value the next job raises the counter to (tickets are raised in the order they are taken)."""
        self._issued += 1
        return self._issued

    def wait(self, value: int) -> None:
        """Whatever follows runs once the counter reaches ``value`` (here: the caller blocks until then)."""
        with self._cond:
            self._cond.wait_for(lambda: self._value >= value)

    def open(self, value: int) -> None:
        """Raise the counter to ``value`` (from the thread whose results the waiters need)."""
        with self._cond:
            self._value = max(self._value, value)
            self._cond.notify_all()

    def open_all(self) -> None:
        """Raise the counter past every ticket taken: nothing queued behind this gate can stay blocked."""
        self.open(self._issued)


class _Driver:
    """The two CUDA driver functions a gate needs, from libcuda (None where they cannot be loaded)."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        self.wait_value = lib.cuStreamWaitValue32_v2
        self.wait_value.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self.wait_value.restype = ctypes.c_int
        self.device_pointer = lib.cuMemHostGetDevicePointer_v2
        self.device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        self.device_pointer.restype = ctypes.c_int


class StreamGate(HostGate):
    """A counter in pinned host memory that a CUDA stream waits on (``cuStreamWaitValue32``): the host thread that
    waits queues, it does not block."""

    def __init__(self, device: torch.device, driver: _Driver):
        super().__init__()
        self.device = device
        self._driver = driver
        with torch.cuda.device(device):
            self._counter = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            ptr = ctypes.c_uint64()
            rc = driver.device_pointer(ctypes.byref(ptr), ctypes.c_void_p(self._counter.data_ptr()), 0)
        if rc != 0:
            raise RuntimeError(f"cuMemHostGetDevicePointer failed ({rc})")
        self._address = ptr.value
        self._host = self._counter.numpy()  # the worker writes here

    def wait(self, value: int, stream: torch.cuda.Stream | None = None) -> None:
        """Work queued on ``stream`` (default: the current one) after this runs once the counter reaches ``value``;
        the caller goes on at once."""
        stream = torch.cuda.current_stream(self.device) if stream is None else stream
        with contextlib.ExitStack() as ctx:
            if torch.cuda.current_device() != self.device.index:
                ctx.enter_context(torch.cuda.device(self.device))
            rc = self._driver.wait_value(ctypes.c_void_p(stream.cuda_stream), self._address, value, _GEQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed ({rc})")

    def open(self, value: int) -> None:
        if value > int(self._host[0]):
            self._host[0] = value  # after the results' stores: x86-64 keeps stores in order


def _check(gate: StreamGate, hold_s: float = 0.002) -> str | None:
    """A live test on a side stream: a wait must hold back an event queued behind it until the counter is raised.
    -> None when it does, else why not."""
    stream = torch.cuda.Stream(gate.device)
    done = torch.cuda.Event()
    value = gate.ticket()
    try:
        gate.wait(value, stream)
        done.record(stream)
        time.sleep(hold_s)
        held = not done.query()
    finally:
        gate.open(value)
    done.synchronize()
    return None if held else "a queued wait did not hold the stream back"


_unavailable: dict[str, str] = {}


def gate_for(device: torch.device) -> HostGate | None:
    """A gate for work on ``device``: ``HostGate`` on the CPU, ``StreamGate`` on CUDA where the driver and host
    allow it, else None (``unavailable_reason(device)`` says why)."""
    if device.type == "cpu":
        return HostGate()
    key = str(device)
    if device.type != "cuda" or key in _unavailable:
        _unavailable.setdefault(key, f"no gate for {device.type} devices")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _unavailable[key] = f"the host ({platform.machine()}) may reorder the results' stores after the counter's"
        return None
    try:
        gate = StreamGate(device, _Driver())
        reason = _check(gate)
    except Exception as e:  # no libcuda or no such function, no CUDA in this torch: no gate
        reason = f"{type(e).__name__}: {e}"
    if reason is not None:
        _unavailable[key] = reason
        return None
    return gate


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``gate_for(device)`` returned None (None when it did not)."""
    return _unavailable.get(str(device))
