"""One trial of the batch search: run a batch, recognise out-of-memory, recover, and isolate trials in processes.

- Out-of-memory is recognised by type (``torch.OutOfMemoryError``) and by the
  few allocation-failure messages cuBLAS, cuDNN and the CPU allocator raise as
  plain ``RuntimeError``. A batch too large for a kernel's 32-bit indexing
  also "does not fit" (its probe says so); any other error propagates.
- Recovery happens *after* the ``except`` block: inside it the traceback still
  references the frames that hold the batch's tensors, so ``empty_cache`` there
  frees nothing. Afterwards we verify that allocated GPU memory is back at its
  baseline, exactly, and record the answer with every probe.
- On CPU a process that runs out of memory is killed by the OS, not raised. So
  CPU trials run in a child process under ``RLIMIT_DATA`` (which makes the
  allocator fail with a clean exception); a child killed anyway counts as "does
  not fit". The child builds the model once and forks a fresh copy of itself
  per trial: a failed allocation leaves oneDNN and glibc state behind, and
  without the fork the boundary would depend on the probes before it.
- Ctrl-C: trial processes run in their own process group and ignore SIGINT,
  so the terminal's interrupt reaches only the parent, which kills them at
  once (a trial can take seconds; waiting for it would delay the exit) and
  reports the interrupt once, with no traceback from a child.

``toolkit.throughput`` drives these trials in its search with the public
pieces: ``run_trial`` (one trial here), ``warm_up``, ``trial_limit``,
``preflight`` and ``memory_limit`` (the set-up around in-process trials),
``TrialProcess`` (trials in a child process) and ``release_memory``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .env import is_cuda
from .errors import ToolkitError

# RuntimeError messages that mean "an allocation failed" although the type is not OutOfMemoryError.
_OOM_MESSAGES = (
    "out of memory",  # "CUDA error: out of memory" from a kernel launch, cuDNN's "... out of memory"
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "DefaultCPUAllocator: can't allocate memory",
    "std::bad_alloc",
)
# Under a data-segment limit oneDNN reports a failed scratchpad allocation only as this; it counts as
# out-of-memory in CPU trial processes (where the limit is the only likely cause), nowhere else.
_CPU_LIMIT_MESSAGES = ("could not create a primitive",)
_OOM_TYPES = (torch.cuda.OutOfMemoryError, MemoryError)  # torch.OutOfMemoryError is the same class (torch >= 2.5)
# A batch too large for a kernel's 32-bit index math does not fit either, for another reason than memory (e.g.
# the native depthwise convolution behind efficientnet's fp32 blocks, past ~2^31 elements per activation).
_SIZE_LIMIT_MESSAGES = ("canUse32BitIndexMath", "integer out of range", "32-bit index")
SIZE_LIMIT = "kernel size limit (not memory): "


def does_not_fit(exc: BaseException, extra_messages: tuple[str, ...] = ()) -> str | None:
    """Why ``exc`` means "this batch does not fit" (its one-line message), or None for any other error."""
    line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if is_oom(exc, extra_messages):
        return line
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _SIZE_LIMIT_MESSAGES):
        return SIZE_LIMIT + line
    return None


def is_oom(exc: BaseException, extra_messages: tuple[str, ...] = ()) -> bool:
    """True when ``exc`` is an out-of-memory error (torch's type, or a cuBLAS/cuDNN/CPU allocation failure)."""
    if isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES + extra_messages)


# ---------------------------------------------------------------------------------------------------------------
# The record of one trial


@dataclass(frozen=True)
class Probe:
    """One trial of the batch search: did ``batch_size`` fit, its peak memory and its time."""

    batch_size: int
    fits: bool
    peak_bytes: int | None = None  # CUDA: max allocated; CPU: peak resident set of the trial's process
    seconds: float | None = None  # wall time of the whole trial (input, forward passes, recovery)
    phase: str = ""  # "grow", "bisect" or "check"
    error: str | None = None  # why it did not fit: the OOM message, or how the worker died
    memory_after_bytes: int | None = None  # CUDA: allocated; CPU: data segment, after recovery
    memory_at_baseline: bool | None = None  # memory_after_bytes back at the search's baseline
    passes: int = 0  # forward passes completed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# One trial in this process: forward passes until peak memory is steady, recovery outside the except block.


def _allocated(device) -> int | None:
    """Bytes held by tensors now: CUDA caching allocator's count; CPU: this process's data segment."""
    if is_cuda(device):
        return torch.cuda.memory_allocated(device)
    try:
        import psutil

        return int(psutil.Process().memory_info().data)
    except Exception:  # non-Linux: psutil has no 'data' field
        return None


def _reset_peak(device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(device) -> int | None:
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_memory(device, collect: bool = True) -> None:
    """Free what a trial left: break reference cycles, return cached blocks (GPU) or heap (glibc) to the system.

    Call it *after* leaving the ``except`` block that caught the failure (see
    the module docstring). ``collect=False`` skips the garbage collection,
    which only an error makes necessary.
    """
    if collect:  # only needed after an error: without one, reference counting has already freed the batch
        gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:  # cuBLAS keeps a workspace per stream, created lazily: not part of the baseline
            clear()
        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap otherwise
    except Exception:  # not glibc
        pass


def make_batch(make_input: Callable, batch_size: int, block: int = 64) -> tuple:
    """``make_input(batch_size)`` as a tuple, big batches tiled on the device from a block of ``block`` samples.

    Benchmark models draw inputs with a CPU generator (the same values on any
    device): for thousands of 224x224 images that takes seconds and gigabytes
    of host memory per trial. Tiling gives the exact shape at device speed; the
    values only repeat every ``block`` samples, which a forward pass's time and
    memory do not notice.
    """
    if batch_size <= block:
        x = make_input(batch_size)
        return x if isinstance(x, tuple) else (x,)
    x = make_input(block)
    x = x if isinstance(x, tuple) else (x,)
    reps, rest = divmod(batch_size, block)
    return tuple(torch.cat([t] * reps + ([t[:rest]] if rest else [])) for t in x)  # [block, ...] -> [B, ...]


def _forward_passes(fn, make_input, batch_size: int, passes: int, device, max_passes: int) -> int:
    """Run ``passes`` forward passes, more while the peak still grows; return the count.

    A separate function so that its locals (the batch, the outputs) die with its frame.
    """
    x = make_batch(make_input, batch_size)
    peaks: list = []
    with torch.inference_mode():
        while True:
            out = fn(*x)
            del out
            if is_cuda(device):
                torch.cuda.synchronize(device)
            peaks.append(_peak(device))
            n = len(peaks)
            if n >= max_passes or (n >= passes and (n == 1 or peaks[-1] == peaks[-2])):
                return n


def run_trial(fn, make_input, batch_size: int, device, passes: int = 2, max_passes: int | None = None,
              baseline: int | None = None, oom_messages: tuple[str, ...] = (),
              clock: Callable[[], float] = time.perf_counter) -> Probe:
    """Try one batch size in this process; an out-of-memory error becomes ``Probe(fits=False)``.

    ``baseline``: allocated bytes before the trial (CUDA); afterwards allocation must be back there exactly.
    """
    max_passes = passes + 3 if max_passes is None else max_passes
    _reset_peak(device)
    t0 = clock()
    error, n = None, 0
    try:
        n = _forward_passes(fn, make_input, batch_size, passes, device, max_passes)
    except Exception as e:
        error = does_not_fit(e, oom_messages)
        if error is None:
            raise
    # Only now, with the exception and its traceback (which held the batch's frames) gone, can memory be freed.
    peak = _peak(device)
    release_memory(device, collect=error is not None)
    after = _allocated(device)
    return Probe(batch_size=batch_size, fits=error is None, peak_bytes=peak, seconds=clock() - t0, error=error,
                 memory_after_bytes=after, passes=n,
                 memory_at_baseline=None if baseline is None or after is None else after == baseline)


# ---------------------------------------------------------------------------------------------------------------
# Trials in a child process (CPU: one forked process per trial, under a memory limit; GPU: optional).


def _worker_main(conn, ref: dict) -> None:
    """Trial process: build the model once, then run trials on request (on CPU each in a forked copy of itself).

    CPU: a failed allocation leaves state behind (oneDNN scratchpads and
    primitive caches, glibc arenas), so in a long-lived process the boundary
    would depend on the probe history. A forked copy per trial starts every
    trial from the same state: the answer is reproducible, and a trial killed
    by the OS costs one fork, not a restart. GPU: CUDA does not survive fork;
    trials run in this process, which is clean after recovery.
    """
    try:
        device = ref["device"]
        fork = not is_cuda(device) and hasattr(os, "fork")
        # GNU OpenMP's thread pool does not survive fork: none may exist before it (threads start in the copy).
        torch.set_num_threads(1 if fork else ref["threads"])
        from .models import build_model

        model = build_model(ref["model"], device=device, dtype=getattr(torch, ref["dtype"]), seed=ref.get("seed", 0))
        gc.collect()
        gc.freeze()  # the model and libraries never die: later collections skip them (seconds -> milliseconds)
        if fork:
            for _ in range(2):  # settle this process's own heap: every copy then starts from the same state
                _forked_trial(None, model, 1, ref)
            conn.send(("ready", {"pid": os.getpid()}))
            while (batch_size := conn.recv()) is not None:
                _forked_trial(conn, model, batch_size, ref)
            return
        baseline, warm = warm_up(model, model.make_input, device)
        limit = trial_limit(ref.get("max_memory"), ref.get("headroom"), baseline)
        failed = preflight(warm, baseline, limit)
        with memory_limit(device, limit):
            conn.send(("ready", {"pid": os.getpid()}))
            while (batch_size := conn.recv()) is not None:
                probe = failed or run_trial(model, model.make_input, batch_size, device, passes=ref["passes"],
                                            baseline=baseline if is_cuda(device) else None)
                conn.send(("probe", {**probe.to_dict(), "baseline_bytes": baseline}))
                conn.send(("exit", 0))
    except (EOFError, KeyboardInterrupt):
        return
    except BaseException as e:
        try:
            conn.send(_error_message(e))
        except Exception:
            pass


def warm_up(fn, make_input, device) -> tuple[int | None, Probe]:
    """Run batches of 1 and 2 before any limit; return the baseline (bytes allocated after them) and the batch-1 probe.

    Thread pools, oneDNN/cuDNN handles and the like live as long as the
    process (and some kernels switch paths above batch 1): created inside a
    trial they would count against its limit and its baseline.
    """
    warm = run_trial(fn, make_input, 1, device, passes=1)
    if warm.fits:
        run_trial(fn, make_input, 2, device, passes=1)  # may not fit: then the search's own probe says so
    return _allocated(device), warm


def trial_limit(max_memory: int | None, headroom: int | None, baseline: int | None) -> int | None:
    """The memory limit for trials (bytes): ``max_memory``, or ``headroom`` above ``baseline`` when both are known."""
    if headroom is None or baseline is None:
        return max_memory
    return baseline + headroom


def preflight(warm: Probe, baseline: int | None, limit: int | None) -> Probe | None:
    """A "does not fit" probe when batch 1 failed or the process already holds more than the limit, else None.

    (Under a limit below current use only *new* allocations fail, so a batch
    that reuses freed memory would wrongly "fit".)
    """
    if not warm.fits:
        return warm
    if limit and baseline is not None and baseline >= limit:
        return Probe(batch_size=1, fits=False, error=f"the trial process holds {baseline / 2**20:,.0f} MiB before "
                                                     f"any batch, over the {limit / 2**20:,.0f} MiB limit")
    return None


def _error_message(e: BaseException) -> tuple:
    import traceback

    return ("error", (type(e).__name__, str(e), traceback.format_exc()))


def _forked_trial(conn, model, batch_size: int, ref: dict) -> None:
    """Run one CPU trial in a forked copy of this process, under the memory limit.

    The copy sends its probe to the parent itself; this process then sends
    only ("exit", wait status), a message of fixed size, so that its own heap
    (which every later copy inherits) does not change from trial to trial.
    ``conn`` None: a silent trial, to settle that heap.
    """
    device = ref["device"]
    pid = os.fork()
    if pid == 0:  # the copy: warm up, limit, try, report, exit without cleanup
        msg: tuple = ("error", ("RuntimeError", "trial process ended without a result", ""))
        try:
            if batch_size > ref.get("kill_above", math.inf):  # fault injection for tests: the OOM killer
                os.kill(os.getpid(), 9)
            torch.set_num_threads(ref["threads"])
            baseline, warm = warm_up(model, model.make_input, device)
            limit = trial_limit(ref.get("max_memory"), ref.get("headroom"), baseline)
            probe = preflight(warm, baseline, limit)
            if probe is None:
                with memory_limit(device, limit):
                    probe = run_trial(model, model.make_input, batch_size, device, passes=ref["passes"],
                                      oom_messages=_CPU_LIMIT_MESSAGES)
            msg = ("probe", {**probe.to_dict(), "batch_size": batch_size, "baseline_bytes": baseline})
        except BaseException as e:
            msg = _error_message(e)
        finally:
            try:
                if conn is not None:
                    conn.send(msg)
            finally:
                os._exit(0)
    _, status = os.waitpid(pid, 0)
    if conn is not None:
        conn.send(("exit", status))


def _describe_status(status: int) -> str:
    """How a trial process ended, from its wait status."""
    return _describe_exit(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _worker_entry(fd: int, ref_json: str) -> None:
    """``python -c`` entry point of a trial process: wrap the inherited socket and serve trials."""
    import json
    from multiprocessing.connection import Connection

    _worker_main(Connection(fd), json.loads(ref_json))


class TrialProcess:
    """The parent's handle on a trial process; a process that dies mid-trial means "does not fit".

    ``ref`` says what the process builds and how it tries batches (JSON-ready,
    since the process rebuilds the model by name): ``model`` (a registered
    name), ``device``, ``dtype`` (e.g. "float32"), ``passes``, ``threads``,
    ``max_memory`` / ``headroom`` (bytes or None) and optionally ``seed``;
    ``kill_above`` (a batch size) makes larger CPU trials die as the OOM killer
    would, for tests. Use as a context manager, or call ``close()``.

    A plain subprocess (not multiprocessing's spawn, which re-runs the user's
    main script when it lacks an ``if __name__ == "__main__"`` guard), talking
    over a private socket pair.
    """

    def __init__(self, ref: dict):
        import json
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        import toolkit

        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(toolkit.__file__)))  # this very toolkit
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts, so the same heap, in every run
        # SIGINT ignored before anything is imported; its own process group: the terminal's Ctrl-C goes to us only
        code = ("from toolkit.interrupts import ignore_interrupts; ignore_interrupts(); import sys; "
                "from toolkit.trials import _worker_entry; _worker_entry(int(sys.argv[1]), sys.argv[2])")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno()), json.dumps(ref)],
                                     pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                     stdout=2,  # stdout -> our stderr: CLI JSON on stdout stays clean
                                     **({"process_group": 0} if os.name == "posix" else {}))
        theirs.close()  # so that recv() sees EOF when the child dies
        self.conn = Connection(ours.detach())
        try:
            kind, info = self._recv()
        except BaseException:  # Ctrl-C while it starts
            self.kill()
            raise
        if kind != "ready":
            self.close()
            raise ToolkitError(f"the trial process could not start: {info}")
        self.info = info
        self.baseline: int | None = None  # memory allocated after the warm-up, as of the last trial

    def _recv(self):
        try:
            kind, payload = self.conn.recv()
        except (EOFError, ConnectionError, OSError):
            try:
                code = self.proc.wait(timeout=10)
            except Exception:
                code = None
            return "died", _describe_exit(code)
        if kind == "error":
            name, msg, tb = payload
            if name == "ToolkitError":
                raise ToolkitError(msg)
            raise RuntimeError(f"trial process failed: {name}: {msg}\n{tb}")
        return kind, payload

    def trial(self, batch_size: int) -> Probe:
        """The trial's probe, or a "does not fit" probe when the process running it died."""
        t0 = time.perf_counter()
        try:
            self.conn.send(batch_size)
        except OSError:
            pass  # already dead: _recv reports how
        probe = None
        while True:  # ("probe", fields) from whoever ran it, then ("exit", wait status) from the trial process
            kind, payload = self._recv()
            if kind == "probe":
                self.baseline = payload.pop("baseline_bytes", None)
                probe = Probe(**payload)
                continue
            if probe is not None:
                return probe
            error = _describe_status(payload) if kind == "exit" else payload
            return Probe(batch_size=batch_size, fits=False, seconds=time.perf_counter() - t0, error=error)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> TrialProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Ask the process to stop (kill it if it does not within 10 s) and close the socket."""
        if self.alive:
            try:
                self.conn.send(None)
                self.proc.wait(timeout=10)
            except Exception:
                self.kill()
        self.conn.close()

    def kill(self) -> None:
        """Stop the process and the trial copy it forked now (Ctrl-C: no waiting for the trial to end)."""
        import signal

        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its group: the process and its forked trial copies
            except (AttributeError, OSError):
                self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"trial process killed by {signal.Signals(-code).name} (out of memory?)"
        except ValueError:
            return f"trial process killed by signal {-code}"
    return f"trial process exited with code {code} (out of memory?)"


@contextlib.contextmanager
def memory_limit(device, max_memory: int | None):
    """Cap this process's memory while inside: GPU via the caching allocator's fraction, CPU via RLIMIT_DATA.

    On CPU only the soft limit changes (never above the hard one), so leaving
    restores it; ``max_memory`` None leaves everything as it is.
    """
    if max_memory is None:
        yield
        return
    if is_cuda(device):
        index = torch.device(device).index  # the allocator wants an index, not plain "cuda"
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory / total), index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
        return
    try:
        import resource
    except ImportError:  # not POSIX: no limit, trials may be killed by the OS
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = max_memory if hard == resource.RLIM_INFINITY else min(max_memory, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (new, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
