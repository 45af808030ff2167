"""Conditional nodes, host functions and 2-D copies in a CUDA graph captured by torch, through the CUDA driver.

A decode pass whose missed experts are served inside a captured graph
(``toolkit.moe.graph_pass``) needs three things torch 2.11 does not offer:
copies that run on a replay only for the experts the routing picked in that
replay (conditional nodes), a CPU function run in stream order (a host
function, ``launch_host_func``) and a strided copy from host memory by the
copy engines (``copy_2d``). ``benchmarks/graph_step.py`` measured the design in
miniature with the same calls.

A captured graph replays the same work each time; a conditional node is the
exception: its body runs on a replay only if a value the GPU set earlier in
that replay is non-zero. ``IfNodes`` adds such nodes while torch captures a
stream: ``IfNodes(conditions)`` launches one small kernel that sets each
node's value from the bool tensor ``conditions`` (computed on the GPU), and
``run(i, body)`` captures whatever ``body()`` queues (copies, kernels) as the
body of node i. Newer torch has this as ``CUDAGraph.begin_capture_to_if_node``;
the device image's torch 2.11 does not, so the driver is called here.

Driver calls (``libcuda``): ``cuStreamGetCaptureInfo_v2`` (the graph being
captured and the stream's current dependencies), ``cuGraphConditionalHandleCreate``,
``cuGraphAddNode`` with ``CU_GRAPH_NODE_TYPE_CONDITIONAL``,
``cuStreamUpdateCaptureDependencies`` (the stream continues after the node),
``cuStreamBeginCaptureToGraph`` / ``cuStreamEndCapture`` (the body captured
into the node's graph). The kernel that sets the values calls the device
runtime's ``cudaGraphSetConditional``; NVRTC compiles it once per process.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch

from ..errors import ToolkitError

MAX_NODES = 32  # conditions one kernel sets (its handles travel by value in one struct)

_SET_SOURCE = r"""
typedef __device_builtin__ unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(cudaGraphConditionalHandle, unsigned int);
struct handles { unsigned long long h[MAX_NODES]; };
extern "C" __global__ void set_conditions(const bool *conditions, int n, handles hs) {
    int i = threadIdx.x;
    if (i < n) cudaGraphSetConditional(hs.h[i], conditions[i] ? 1u : 0u);
}
""".replace("MAX_NODES", str(MAX_NODES))

CU_GRAPH_NODE_TYPE_CONDITIONAL = 13
CU_GRAPH_COND_TYPE_IF = 0
CU_STREAM_SET_CAPTURE_DEPENDENCIES = 1
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
CU_STREAM_CAPTURE_STATUS_ACTIVE = 1


_modules: list = []  # the loaded modules of the conditions' kernel, kept for the process


class _Handles(ctypes.Structure):
    _fields_ = [("h", ctypes.c_uint64 * MAX_NODES)]


class _ConditionalParams(ctypes.Structure):  # CUDA_CONDITIONAL_NODE_PARAMS
    _fields_ = [("handle", ctypes.c_uint64), ("type", ctypes.c_int), ("size", ctypes.c_uint),
                ("phGraph_out", ctypes.POINTER(ctypes.c_void_p)), ("ctx", ctypes.c_void_p)]


class _NodeParamsUnion(ctypes.Union):
    _fields_ = [("reserved1", ctypes.c_longlong * 29), ("conditional", _ConditionalParams)]


class _NodeParams(ctypes.Structure):  # CUgraphNodeParams: 256 bytes
    _fields_ = [("type", ctypes.c_int), ("reserved0", ctypes.c_int * 3), ("u", _NodeParamsUnion),
                ("reserved2", ctypes.c_longlong)]


def _check(rc: int, what: str) -> None:
    if rc:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(rc, ctypes.byref(name))
        raise ToolkitError(f"{what} failed: CUDA error {rc} ({(name.value or b'?').decode()})")


@functools.cache
def _driver() -> ctypes.CDLL:
    d = ctypes.CDLL("libcuda.so.1")
    p, sz = ctypes.c_void_p, ctypes.c_size_t
    sigs = {
        "cuGetErrorName": [ctypes.c_int, p],
        "cuCtxGetCurrent": [p],
        "cuStreamCreate": [p, ctypes.c_uint],
        "cuStreamGetCaptureInfo_v2": [p, p, p, p, p, p],
        "cuGraphConditionalHandleCreate": [p, p, p, ctypes.c_uint, ctypes.c_uint],
        "cuGraphAddNode": [p, p, p, sz, p],
        "cuStreamUpdateCaptureDependencies": [p, p, sz, ctypes.c_uint],
        "cuStreamBeginCaptureToGraph": [p, p, p, p, sz, ctypes.c_int],
        "cuStreamEndCapture": [p, p],
        "cuModuleLoadData": [p, p],
        "cuLaunchHostFunc": [p, p, p],
        "cuMemcpy2DAsync_v2": [p, p],
        "cuModuleGetFunction": [p, p, ctypes.c_char_p],
        "cuLaunchKernel": [p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_uint, ctypes.c_uint, p, p, p],
    }
    for name, args in sigs.items():
        fn = getattr(d, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return d


def _nvrtc() -> ctypes.CDLL:
    names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    names += sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ToolkitError("NVRTC (libnvrtc) is not on this machine: the conditions' kernel cannot be compiled")


@functools.cache
def _set_kernel() -> int:
    """``set_conditions`` compiled to PTX by NVRTC for this GPU and loaded: its ``CUfunction``."""
    torch.cuda.synchronize()  # makes torch's CUDA context current on this thread (the module is loaded into it)
    nv = _nvrtc()
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), _SET_SOURCE.encode(), b"set_conditions.cu", 0, None, None):
        raise ToolkitError("nvrtcCreateProgram failed")
    major, minor = torch.cuda.get_device_capability()
    opts = [f"--gpu-architecture=compute_{major}{minor}".encode()]
    rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    if rc:
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log)
        raise ToolkitError(f"NVRTC could not compile the conditions' kernel: {log.value.decode(errors='replace')}")
    size = ctypes.c_size_t()
    nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetPTX(prog, ptx)
    d = _driver()
    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    _check(d.cuModuleLoadData(ctypes.byref(module), ptx), "cuModuleLoadData")
    _check(d.cuModuleGetFunction(ctypes.byref(fn), module, b"set_conditions"), "cuModuleGetFunction")
    _modules.append(module)  # kept loaded for the process
    return fn.value


@functools.cache
def _body_stream() -> torch.cuda.ExternalStream:
    """The stream each body is captured on, one at a time: a stream of its own (``cuStreamCreate``), never one of
    torch's pooled streams, which may be a stream already taking part in the capture."""
    s = ctypes.c_void_p()
    _check(_driver().cuStreamCreate(ctypes.byref(s), 1), "cuStreamCreate")  # CU_STREAM_NON_BLOCKING
    return torch.cuda.ExternalStream(s.value)


def prepare() -> None:
    """Compile the conditions' kernel and make the bodies' stream now, before a capture begins."""
    _set_kernel()
    _body_stream()


def _capture_info(stream: int):
    """(graph being captured, its current dependencies as a ctypes array, their count) of ``stream``."""
    d = _driver()
    status, cid, graph = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_void_p()
    deps, n = ctypes.POINTER(ctypes.c_void_p)(), ctypes.c_size_t()
    _check(d.cuStreamGetCaptureInfo_v2(stream, ctypes.byref(status), ctypes.byref(cid), ctypes.byref(graph),
                                       ctypes.byref(deps), ctypes.byref(n)), "cuStreamGetCaptureInfo")
    if status.value != CU_STREAM_CAPTURE_STATUS_ACTIVE:
        raise ToolkitError("conditional nodes need a stream that is being captured")
    return graph, (ctypes.c_void_p * max(1, n.value))(*[deps[i] for i in range(n.value)]), n.value


class IfNodes:
    """Conditional (IF) nodes of the graph being captured on the current stream, one per element of
    ``conditions`` (a bool CUDA tensor, read flat, at most ``MAX_NODES``); a kernel launched here, in stream
    order, sets node i's value from ``conditions[i]`` on each replay. ``run(i, body)`` captures ``body()`` as
    node i's body; the stream's later work waits for the node."""

    def __init__(self, conditions: torch.Tensor):
        if not conditions.is_cuda or conditions.dtype != torch.bool or not conditions.is_contiguous():
            raise ToolkitError("IfNodes needs a contiguous bool tensor on the GPU")
        n = conditions.numel()
        if n > MAX_NODES:
            raise ToolkitError(f"IfNodes sets at most {MAX_NODES} conditions at once, not {n}")
        d = _driver()
        self.conditions = conditions  # read by the kernel on each replay: kept alive with the nodes
        stream = torch.cuda.current_stream().cuda_stream
        graph, _, _ = _capture_info(stream)
        self.ctx = ctypes.c_void_p()
        _check(d.cuCtxGetCurrent(ctypes.byref(self.ctx)), "cuCtxGetCurrent")
        self.handles = _Handles()
        for i in range(n):
            h = ctypes.c_uint64()
            _check(d.cuGraphConditionalHandleCreate(ctypes.byref(h), graph, self.ctx, 0, 0),
                   "cuGraphConditionalHandleCreate")
            self.handles.h[i] = h.value
        ptr, count = ctypes.c_void_p(conditions.data_ptr()), ctypes.c_int(n)
        args = (ctypes.c_void_p * 3)(ctypes.addressof(ptr), ctypes.addressof(count), ctypes.addressof(self.handles))
        _check(d.cuLaunchKernel(_set_kernel(), 1, 1, 1, 32, 1, 1, 0, stream, args, None), "cuLaunchKernel")
        self.body_stream = _body_stream()

    def run(self, i: int, body) -> None:
        d = _driver()
        stream = torch.cuda.current_stream()
        graph, deps, n = _capture_info(stream.cuda_stream)
        params = _NodeParams()
        params.type = CU_GRAPH_NODE_TYPE_CONDITIONAL
        cond = params.u.conditional
        cond.handle, cond.type, cond.size, cond.ctx = self.handles.h[i], CU_GRAPH_COND_TYPE_IF, 1, self.ctx
        node = ctypes.c_void_p()
        _check(d.cuGraphAddNode(ctypes.byref(node), graph, deps if n else None, n, ctypes.byref(params)),
               "cuGraphAddNode (conditional)")
        body_graph = params.u.conditional.phGraph_out[0]
        _check(d.cuStreamUpdateCaptureDependencies(stream.cuda_stream, ctypes.byref(node), 1,
                                                   CU_STREAM_SET_CAPTURE_DEPENDENCIES),
               "cuStreamUpdateCaptureDependencies")
        _check(d.cuStreamBeginCaptureToGraph(self.body_stream.cuda_stream, body_graph, None, None, 0,
                                             CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCaptureToGraph")
        try:
            with torch.cuda.stream(self.body_stream):
                body()
        finally:
            out = ctypes.c_void_p()
            _check(d.cuStreamEndCapture(self.body_stream.cuda_stream, ctypes.byref(out)), "cuStreamEndCapture")


def conditional(conditions: torch.Tensor):
    """``run(i, body)``: ``body()`` where the i-th element of the bool tensor ``conditions`` is true.

    While torch captures a CUDA graph on the current stream, each ``run`` adds a conditional node whose body is
    what ``body()`` queues, and the conditions are set on the GPU on each replay (``IfNodes``); otherwise the
    conditions are read on the host, once (a sync).
    """
    if conditions.is_cuda and torch.cuda.is_current_stream_capturing():
        return IfNodes(conditions.contiguous()).run
    flat = conditions.reshape(-1).tolist()
    return lambda i, body: body() if flat[i] else None


def launch_host_func(fn, arg) -> None:
    """Queue the C function ``fn(arg)`` (a ctypes function pointer and a ctypes object passed by reference) on the
    current CUDA stream, in its order (``cuLaunchHostFunc``): under stream capture it becomes a host node."""
    rc = _driver().cuLaunchHostFunc(torch.cuda.current_stream().cuda_stream, ctypes.cast(fn, ctypes.c_void_p),
                                    ctypes.byref(arg))
    _check(rc, "cuLaunchHostFunc")


class _Memcpy2D(ctypes.Structure):  # CUDA_MEMCPY2D
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


CU_MEMORYTYPE_UNIFIED = 4  # the driver reads where each pointer lives (pinned host memory or the device)


def copy_2d(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for two 2-D views with unit stride in their last dimension, of the same shape and
    dtype, on the current stream, as one strided copy of the copy engines (``cuMemcpy2DAsync``): rows of
    ``src`` at its row stride into rows of ``dst`` at its own, nothing staged on the host (torch would gather a
    strided host tensor into a contiguous one first, which a captured graph would not repeat). On the CPU
    (tests) it is ``copy_``."""
    if dst.shape != src.shape or dst.dim() != 2 or dst.dtype != src.dtype or dst.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError(f"copy_2d: dst {tuple(dst.shape)} (stride {dst.stride()}) and src {tuple(src.shape)} "
                         f"(stride {src.stride()}) must be 2-D views of one shape and dtype, unit stride in the last")
    if not (dst.is_cuda or src.is_cuda):
        dst.copy_(src)
        return
    size = dst.element_size()
    p = _Memcpy2D()
    p.srcMemoryType = p.dstMemoryType = CU_MEMORYTYPE_UNIFIED
    p.srcDevice, p.srcPitch = src.data_ptr(), src.stride(0) * size
    p.dstDevice, p.dstPitch = dst.data_ptr(), dst.stride(0) * size
    p.WidthInBytes, p.Height = dst.shape[1] * size, dst.shape[0]
    if p.WidthInBytes and p.Height:
        _check(_driver().cuMemcpy2DAsync_v2(ctypes.byref(p), torch.cuda.current_stream().cuda_stream),
               "cuMemcpy2DAsync")
