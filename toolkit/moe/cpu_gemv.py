"""CPU experts' linear layers: a bf16 kernel that streams weights at the host's read rate for a few tokens.

Why: a decode step gives a CPU expert one token (a few with beams), so its
work is reading the expert's weights once. torch's bf16 matmul with one row
does not keep up with memory: on the one-H200 host (16-core Xeon, 15 threads
read 90.8 GB/s) it streamed a Mixtral expert at 50 GB/s, while the same
expert with float32 weights, twice the bytes, ran at 107 GB/s. This kernel
reached 100 GB/s there (x2.0 at one token, x1.7 at four, slower than torch
from 16; ``data/gpu/cpu_gemv_h200.json``) and 161 GB/s on the two-H200 host
(31 threads, x2.0; ``cpu_gemv_h200x2.json``). With AVX512-BF16 one
instruction multiplies 32 bf16 pairs into float32 lanes, four weight rows
sharing each load of the activations; without it bf16 widens to float32 (a
16-bit shift) and feeds fused multiply-adds. Each weight row is read once for
up to four tokens, rows are split over torch's OpenMP threads, and results
round to bf16 as torch rounds.

Passes of many tokens (a prefill's CPU experts get ~128 each) are
compute-bound on that path (9.8 ms at 16 tokens, 75 at 128 on the one-H200
host), and torch's matmul reads 26-60 GB/s there. Where the CPU has AMX
(Xeon since Sapphire Rapids) and Linux grants the tile state, passes of
``AMX_FROM_TOKENS`` or more take tile multiplies, one instruction doing
16 x 16 x 32 products: on that host they read an expert near the read rate
up to 16 tokens and beat torch up to 64 (x1.3-1.6), and tie it at 128
(``data/gpu/cpu_gemv_h200_amx.json``). The weights are used as they lie in
memory (no repacked copy of an expert); only the activations are repacked.
Where AMX runs the kernel takes passes of any size (``max_tokens``),
elsewhere up to ``MAX_TOKENS``.

It is C (``cpu_gemv.c``), compiled on first use with the machine's compiler
(``$CC`` or ``cc``, ``-O3 -march=native -fopenmp``) into the toolkit cache
and called through ctypes, which releases the GIL as torch's ops do. Where
there is no compiler or the build fails, ``usable()`` is False, ``why_not()``
says why, and callers keep ``torch.nn.functional.linear``. Whether the engine
uses it is the calibration's decision (``CostModel.cpu_kernel_tokens``): it
times both on the machine at each calibrated token count.

``linear(x [n, K], w [N, K]) -> [n, N]``: bf16 on the CPU, unit stride in K.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ToolkitError

MAX_TOKENS = 16  # rows of x up to which the vector path is offered: each pass over a weight row takes 4 of them
AMX_FROM_TOKENS = 5  # passes of this many rows or more take AMX where it runs (the C source's AMX_FROM_TOKENS)
PATHS = {"auto": 0, "vector": 1, "amx": 2}  # the C entry point's path argument
ANY_TOKENS = 2 ** 31 - 1  # a kernel token limit that is no limit: passes of any size take the kernel
SOURCE = Path(__file__).with_name("cpu_gemv.c")

# why the kernel is off in this process (no compiler, a failed build, or disable()), or None
broken: str | None = None


def disable(reason: str) -> None:
    """Turn the kernel off for this process; ``reason`` is what ``why_not()`` reports."""
    global broken
    broken = reason


def _cpu_flags() -> str:
    """The CPU's feature flags (x86 "flags", Arm "Features"): a build for one CPU is not reused on another."""
    from ..env import cpuinfo

    return cpuinfo("flags", "features") or platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _build_dir() -> Path:
    """``cpu_gemv`` in the toolkit's cache folder, or in the temporary folder where that is not writable."""
    from ..settings import cache_dir

    folder = cache_dir() / "cpu_gemv"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / f"toolkit-cpu-gemv-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build(march: str = "native", defines: tuple[str, ...] = (), source: Path | None = None,
           depends: tuple[Path, ...] = ()) -> Path | str:
    """The kernel compiled for ``-march=<march>`` (once per source, compiler, flags and CPU): its path, or why not.

    The engine builds for the machine it runs on ("native"); the tests also build the AVX2 and plain-C paths,
    and the AMX blocking over plain-C tiles (``defines=("TOOLKIT_AMX_EMULATE",)``). ``source``: another C
    file built the same way (default: the kernel's), e.g. the benchmarks' host functions that call the kernel;
    ``depends``: files it includes, whose text keys the build too.
    """
    source = SOURCE if source is None else Path(source)
    cc = _compiler()
    if cc is None:
        return f"no C compiler ({os.environ.get('CC') or 'cc'} or gcc) on PATH"
    text = b"\0".join([source.read_bytes(), *(Path(d).read_bytes() for d in depends)])
    flags = ["-O3", f"-march={march}", *(f"-D{d}" for d in defines), "-fopenmp", "-shared", "-fPIC"]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc} does not run: {e}"
    key = hashlib.sha256(b"\0".join([text, version.encode(), _cpu_flags().encode(), " ".join(flags).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = _build_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode:
            return f"{cc} could not build {source.name}: {done.stderr.strip()[-400:]}"
        os.replace(tmp, target)  # atomic: a process building the same key at once reads a whole file
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc} could not build {source.name}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path):
    """The kernel's entry point in a built library (its path argument last), argument types declared; its
    ``amx`` attribute says whether that library's AMX path runs in this process."""
    torch.get_num_threads()  # torch's OpenMP runtime is loaded first, so the kernel's threads are torch's
    lib = ctypes.CDLL(str(path))
    fn = lib.toolkit_linear_bf16_path
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.toolkit_amx.restype = ctypes.c_int
    fn.amx = bool(lib.toolkit_amx())
    return fn


@functools.cache
def _library():
    """The kernel built for this machine, or the reason there is none."""
    built = _build()
    return built if isinstance(built, str) else _load(built)


def entry_point() -> int:
    """The address of the kernel's C entry point (``toolkit_linear_bf16_path``), for C code that calls the kernel
    itself (``toolkit.moe.graph_pass``'s host function); a ToolkitError where the kernel cannot run here."""
    reason = why_not()
    if reason:
        raise ToolkitError(f"the CPU kernel cannot run here: {reason}")
    return ctypes.cast(_library(), ctypes.c_void_p).value


def build_source(source: Path, depends: tuple[Path, ...] = ()) -> Path | str:
    """Another C file that calls the kernel built as the kernel is (the machine's compiler, ``-O3
    -march=native -fopenmp``, once per source, the files it includes (``depends``), compiler and CPU, into the
    toolkit cache): its path, or why not."""
    return _build(source=source, depends=tuple(depends))


def why_not() -> str | None:
    """Why the kernel cannot run here (building it if needed), or None when it can."""
    if broken is not None:
        return broken
    lib = _library()
    return lib if isinstance(lib, str) else None


def usable() -> bool:
    """Whether ``linear`` runs here: a C compiler with OpenMP built the kernel (vectorised on x86 with AVX2 or
    AVX-512, plain C elsewhere)."""
    return why_not() is None


def amx() -> bool:
    """Whether the kernel's AMX path runs here (an AMX CPU, a compiler that builds it, tile state granted)."""
    return usable() and _library().amx


def max_tokens() -> int | None:
    """The most rows of x a pass may have for the kernel to be offered it: None (any) where AMX runs."""
    return None if amx() else MAX_TOKENS


def offered(n: int) -> bool:
    """Whether a pass of ``n`` rows is one the kernel is offered for (the calibration times it there)."""
    limit = max_tokens()
    return usable() and (limit is None or n <= limit)


def linear(x: torch.Tensor, w: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """x [n, K] @ w[N, K].T -> [n, N], bf16 CPU tensors with unit stride in K; float32 accumulation.

    ``path``: "auto" (AMX from ``AMX_FROM_TOKENS`` rows where it runs), "vector" or "amx" (the vector path where
    AMX does not run), for benchmarks that compare them.
    """
    if path not in PATHS:
        raise ValueError(f"cpu_gemv.linear: path is one of {', '.join(PATHS)}, got {path!r}")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"cpu_gemv.linear takes bf16 CPU tensors, got x {x.dtype} on {x.device}, "
                         f"w {w.dtype} on {w.device}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cpu_gemv.linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit [n, K], [N, K]")
    if w.stride(1) != 1:
        w = w.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    reason = why_not()
    if reason is not None:
        raise RuntimeError(f"cpu_gemv.linear cannot run here: {reason}")
    n, k = x.shape
    out = torch.empty(n, w.shape[0], dtype=torch.bfloat16)
    if n and w.shape[0]:
        rc = _call(_library(), x, w, out, PATHS[path])
        if rc:
            raise MemoryError(f"cpu_gemv.linear: no memory for a working copy of x {tuple(x.shape)}")
    return out


def _call(fn, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, path: int = 0) -> int:
    """out [n, N] = x [n, K] @ w [N, K].T through an entry point of ``_load``, on torch's thread count."""
    return fn(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), w.data_ptr(), w.shape[0], w.stride(0),
              out.data_ptr(), out.stride(0), torch.get_num_threads(), path)


def linear_up_to(tokens: int):
    """A linear layer that takes the kernel for bf16 passes of at most ``tokens`` rows, torch's otherwise.

    ``tokens`` 0 (the calibration found torch faster, or the kernel cannot run) is ``F.linear`` itself.
    """
    if tokens <= 0 or not usable():
        return F.linear

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= tokens and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu":
            return linear(x, w)
        return F.linear(x, w)

    fn.tokens = tokens
    return fn
