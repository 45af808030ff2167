"""A one-token decode pass of an offloaded layer that needs nothing from the host: it can be captured.

Why: the engine's per-layer path brings each layer's routing to the host
(a sync), plans, hands CPU experts to a thread and copies missed experts in,
and that host work costs 1.4-2.2 ms a layer on the H200 hosts, each operation
at several times its warm price after a CPU expert (``benchmarks/PERF_NOTES.md``).
A decode step at batch 1 with a static placement can do without any of it:

- the resident experts of every such layer live in one device pool (the
  engine's ``pool``), and each (token, slot) row reads its expert there
  through the pass kernels of ``toolkit.moe.gemv``, the expert chosen on the
  device;
- each missed expert is split at a fixed unit ``k``: intermediate units
  [0, k) go to the GPU, read from pinned host memory into the row's staging
  slot of the pool by one kernel that looks each slot's expert up on the GPU
  (``toolkit.moe.share_copy``: two launches a pass whatever the routing; a
  conditional node for each pair of slot and expert that may miss cost
  OLMoE's 16 layers x 8 x 48 nodes, 2.5x its decode time on an H200); units
  [k, I) are computed at the same time on
  the CPU by a host function in stream order (``host_share.c``), which reads
  the routing and the token from pinned memory that copies earlier in the
  stream wrote;
- the GPU's rows run in the same two kernels whatever the routing (a missed
  row over units [0, k) of its slot, a resident one over all of them), and the
  CPU's sum is added.

So the whole decode step, every layer, is one CUDA graph
(``toolkit.moe.graphs``) and the host does nothing per layer. ``k`` is where the
copy of a one-token expert's GPU share and the CPU's rest end together by
the calibration (``CostModel.balanced_share``): measured in miniature,
that was within 2% of the best share swept (``benchmarks/graph_step.py``).

On a CPU device (the tests) the same pass runs eagerly: the host function is
called in place, the conditions are read on the host and torch's ops stand
in for the Triton kernels, with the same roundings.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ToolkitError
from . import conditional, cpu_gemv, gemv, share_copy

SOURCE = Path(__file__).with_name("host_share.c")
UNIT_BLOCK = 16  # the GPU's share is a whole number of these units (copies of whole 16-row blocks)
MAX_TOP_K = 64  # experts a token may pick for the host function (host_share.c's TOOLKIT_MAX_TOP_K)


class ShareJob(ctypes.Structure):
    """``host_share.c``'s ``share_job``: one layer's buffers, read by its host function when it runs."""

    _fields_ = [("lin", ctypes.c_void_p), ("sel", ctypes.c_void_p), ("wts", ctypes.c_void_p), ("x", ctypes.c_void_p),
                ("resident", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("K", ctypes.c_int64), ("E", ctypes.c_int64), ("D", ctypes.c_int64), ("I", ctypes.c_int64),
                ("k", ctypes.c_int64), ("h", ctypes.c_void_p), ("act", ctypes.c_void_p), ("yk", ctypes.c_void_p),
                ("acc", ctypes.c_void_p), ("y", ctypes.c_void_p), ("threads", ctypes.c_int),
                ("busy_s", ctypes.c_double), ("calls", ctypes.c_int64), ("experts", ctypes.c_int64),
                ("stamps", ctypes.c_void_p), ("stamp_cap", ctypes.c_int64)]


@functools.cache
def _library():
    """``host_share.c`` built for this machine (as ``toolkit.moe.cpu_gemv`` builds its kernel) and loaded, or why
    not (a string)."""
    if cpu_gemv.why_not():
        return f"the CPU kernel cannot run here: {cpu_gemv.why_not()}"
    built = cpu_gemv.build_source(SOURCE)
    if isinstance(built, str):
        return built
    lib = ctypes.CDLL(str(built))
    lib.toolkit_host_share.argtypes, lib.toolkit_host_share.restype = [ctypes.c_void_p], None
    return lib


def why_not(device: torch.device, dtype: torch.dtype, act_fn) -> str | None:
    """Why a layer's decode passes cannot run as a captured pass here, or None when they can. The CPU's share
    reads the experts' bf16 host tier through the toolkit's kernel, whatever dtype the per-layer path's CPU
    experts were given."""
    device = torch.device(device)
    if dtype != torch.bfloat16:
        return f"the CPU's share runs in bf16 only (experts {dtype})"
    if not gemv.is_silu(act_fn):
        return "the experts' activation is not SiLU (the pass kernels fold SiLU in)"
    if device.type == "cuda":
        if not gemv.usable(device, 1):
            return f"the expert GEMV does not run here ({gemv.broken or 'no Triton'})"
        failed = kernels_fail(device)
        if failed:
            return failed
    elif device.type != "cpu":
        return f"a {device.type} device"
    lib = _library()
    return lib if isinstance(lib, str) else None


@functools.cache
def kernels_fail(device: torch.device) -> str | None:
    """Why the pass kernels with per-row units do not run on ``device``, or None: both run once on tiny bf16
    tensors, so a Triton that cannot compile them for this GPU is found when an engine is built, not inside the
    first capture of a decode step."""
    try:
        x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
        index = torch.zeros(2, dtype=torch.int64, device=device)
        units = torch.full((2,), 16, dtype=torch.int32, device=device)
        a = gemv.expert_gate_up_act(x, index, torch.ones(1, 64, 64, dtype=torch.bfloat16, device=device), per_x=2,
                                    units=units)
        gemv.expert_down(a, index, torch.ones(1, 64, 32, dtype=torch.bfloat16, device=device),
                         torch.ones(1, 2, device=device), units=units)
        pin = device.type == "cuda"
        host = (torch.ones(2, 64, 64, dtype=torch.bfloat16, pin_memory=pin),
                torch.ones(2, 64, 32, dtype=torch.bfloat16, pin_memory=pin))
        pool = (torch.zeros(3, 64, 64, dtype=torch.bfloat16, device=device),
                torch.zeros(3, 64, 32, dtype=torch.bfloat16, device=device))
        share_copy.copy_shares(index[:1], torch.tensor([-1, 0], device=device), *host, *pool, 1, 16)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # a compiler error of any kind: the per-layer path serves these passes
        return f"the pass kernels do not run here: {type(e).__name__}: {e}"
    return None


class HostShare:
    """One layer's host function job (``ShareJob``) with the buffers it reads and writes.

    ``gate_up`` [E, 2I, D] and ``down`` [E, D, I]: the layer's experts in host memory, contiguous bf16;
    ``resident``: bool [E], the experts the GPU computes whole; ``k``: the GPU's units of a missed expert (the
    job's ``k`` may be moved later: the scratch holds every unit). In, written before the function runs:
    ``sel`` [K] int64, the token's experts; ``w`` [K] float32, their weights; ``x`` [D] bf16, the token.
    Out: ``y`` [D] bf16. Pinned where ``pin`` (copies of a CUDA stream write and read them).
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, resident, top_k: int, k: int, threads: int,
                 pin: bool):
        E, two_i, D = gate_up.shape
        inter = two_i // 2
        if gate_up.dtype != torch.bfloat16 or not (gate_up.is_contiguous() and down.is_contiguous()):
            raise ToolkitError("the CPU's share reads the layer's host experts as contiguous bf16")
        if not 0 < top_k <= MAX_TOP_K:
            raise ToolkitError(f"the CPU's share takes 1 to {MAX_TOP_K} experts a token, not {top_k}")

        def host(n, dtype):
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        self.sel, self.w = host(top_k, torch.int64), host(top_k, torch.float32)
        self.x, self.y = host(D, torch.bfloat16), host(D, torch.bfloat16)
        self.resident = torch.as_tensor(np.asarray(resident, dtype=np.uint8))
        self.scratch = [torch.empty(top_k * 2 * inter, dtype=torch.bfloat16),  # h, act, yk: every missed expert's
                        torch.empty(top_k * inter, dtype=torch.bfloat16),
                        torch.empty(top_k * D, dtype=torch.bfloat16), torch.empty(D, dtype=torch.float32)]
        self.experts = (gate_up, down)  # kept alive with the job, which holds their addresses
        j = self.job = ShareJob()
        j.lin = cpu_gemv.entry_point()
        j.sel, j.wts, j.x, j.y = (t.data_ptr() for t in (self.sel, self.w, self.x, self.y))
        j.resident, j.gate_up, j.down = self.resident.data_ptr(), gate_up.data_ptr(), down.data_ptr()
        j.K, j.E, j.D, j.I, j.k = top_k, E, D, inter, int(k)
        j.h, j.act, j.yk, j.acc = (t.data_ptr() for t in self.scratch)
        j.threads = int(threads)
        self._stamps = None

    def keep_stamps(self, cap: int) -> None:
        """From now on the job records each call's start and end (Unix seconds, the clock of a profiler's trace) in
        a ring of the last ``cap`` calls: ``stamps`` reads them."""
        if cap < 1:
            raise ToolkitError(f"keep the stamps of at least one call, not {cap}")
        self._stamps = torch.zeros(2 * int(cap), dtype=torch.float64)
        self.job.stamps, self.job.stamp_cap = self._stamps.data_ptr(), int(cap)

    def stamps(self, since: int) -> list[tuple[float, float]]:
        """(start, end) in Unix seconds of calls ``since``, ``since + 1``, ... so far (those the ring still holds)."""
        if self._stamps is None:
            raise ToolkitError("no stamps kept: call keep_stamps first")
        cap, calls = int(self.job.stamp_cap), int(self.job.calls)
        ring = self._stamps.view(cap, 2).tolist()
        return [tuple(ring[c % cap]) for c in range(max(int(since), calls - cap), calls)]


def share_units(share: float, inter: int, block: int = UNIT_BLOCK) -> int:
    """The GPU's units k of a missed expert for a share in [0, 1]: a whole number of ``block`` units, at most I."""
    if not 0 <= share <= 1:
        raise ToolkitError(f"the GPU's share of a missed expert must be in [0, 1], not {share}")
    if share >= 1:
        return inter
    return min(inter, int(round(share * inter / block)) * block)


class GraphPass:
    """One layer's one-token decode passes with nothing on the host (see the module's docstring).

    ``mod``: the layer's ``OffloadedExperts`` (its host weights, pinned); ``pool``: (gate_up [P, 2I, D],
    down [P, D, I]) on the device, the layer's resident expert e at row ``pos[e]`` (-1: not resident) and the
    token's K staging slots at rows ``first_slot .. first_slot + K - 1``; ``resident``: bool [E]; ``k``: the
    GPU's units of a missed expert; ``threads``: the host function's CPU threads. A call takes the function
    that counts the pass (``_DeviceCounts.record_rows`` of its phase and layer).
    """

    def __init__(self, mod, pool: tuple[torch.Tensor, torch.Tensor], pos: np.ndarray, first_slot: int, top_k: int,
                 resident: np.ndarray, k: int, threads: int):
        dev = pool[0].device
        self.mod, self.pool, self.k, self.top_k = mod, pool, int(k), int(top_k)
        self.first_slot = int(first_slot)
        self.inter, self.hidden = mod.intermediate, mod.host_gate_up.shape[2]
        self.missed_ids = [int(e) for e in np.flatnonzero(~resident)]
        self.pos = torch.as_tensor(pos, dtype=torch.int64, device=dev)  # [E] pool row, -1 where missed
        self.slot_rows = torch.arange(first_slot, first_slot + top_k, dtype=torch.int64, device=dev)  # [K]
        self.units_missed = torch.full((top_k,), self.k, dtype=torch.int32, device=dev)
        self.units_all = torch.full((top_k,), self.inter, dtype=torch.int32, device=dev)
        self.share = HostShare(mod.host_gate_up, mod.host_down, resident, top_k, self.k, threads,
                               pin=dev.type == "cuda")
        self.job = self.share.job
        self.y_dev = torch.zeros(1, self.hidden, dtype=torch.bfloat16, device=dev)
        self._taken = (0, 0.0)  # the host function's (experts, seconds) at the last ``take_counts``
        self.side = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    # -- counters of the host function (read when the engine's stats are read) ---------------------
    def served(self) -> tuple[int, float]:
        """(missed experts served, seconds the CPU spent on their shares) since this pass was made."""
        return int(self.job.experts), float(self.job.busy_s)

    def take_counts(self) -> tuple[int, float]:
        """(missed experts served, seconds the CPU spent) since the last call."""
        now = self.served()
        experts, busy = now[0] - self._taken[0], now[1] - self._taken[1]
        self._taken = now
        return experts, busy

    def set_units(self, k: int) -> None:
        """Move the split of a missed expert to units [0, k) on the GPU. The copies of a captured graph keep the
        sizes they were captured with: the owner drops its graphs after this (``Offloaded.balance_graph_misses``)."""
        self.k = self.job.k = int(k)
        self.units_missed.fill_(self.k)

    @property
    def share_bytes(self) -> int:
        """Bytes copied to the GPU per missed expert: its units [0, k) of gate, up and down."""
        return 3 * self.k * self.hidden * self.mod.host_gate_up.element_size()

    # -- the pass -----------------------------------------------------------------------------
    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 count) -> torch.Tensor:
        """hidden [1, D], top_k_index [1, K], top_k_weights [1, K] -> [1, D]; ``count(index [K])`` counts the
        pass. Nothing in it reads a device value on the host while a graph is captured."""
        if hidden.shape[0] != 1 or top_k_index.shape != (1, self.top_k):
            raise ToolkitError(f"a captured pass takes one token and its {self.top_k} experts, not hidden "
                               f"{tuple(hidden.shape)} and experts {tuple(top_k_index.shape)}")
        flat = top_k_index.reshape(-1)
        pos = self.pos[flat]  # [K] pool row of each slot's expert, -1 where it missed
        missed = pos < 0
        rows = torch.where(missed, self.slot_rows, pos)
        units = torch.where(missed, self.units_missed, self.units_all)
        w = top_k_weights.reshape(-1)
        # the CPU's inputs, in pinned memory before its host function runs (in stream order)
        share = self.share
        share.sel.copy_(flat, non_blocking=True)
        share.w.copy_(w, non_blocking=True)
        share.x.copy_(hidden.reshape(-1), non_blocking=True)
        if self.side is None:  # CPU device: in order, in place
            self._gpu_side(hidden, flat, rows, units, top_k_weights, count)
            self._lib().toolkit_host_share(ctypes.byref(self.job))
            self.y_dev.copy_(share.y[None])
            return (self._out + self.y_dev)
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):  # copies of the GPU's shares, then the GPU's rows
            self._gpu_side(hidden, flat, rows, units, top_k_weights, count)
        conditional.launch_host_func(self._lib().toolkit_host_share, self.job)  # the CPU's shares, meanwhile
        self.y_dev.copy_(share.y[None], non_blocking=True)
        main.wait_stream(self.side)
        return self._out + self.y_dev

    @staticmethod
    def _lib():
        lib = _library()
        if isinstance(lib, str):
            raise ToolkitError(f"the CPU's share cannot run here: {lib}")
        return lib

    def _gpu_side(self, hidden, flat, rows, units, top_k_weights, count) -> None:
        """The copies of the missed experts' units [0, k) into the rows' slots, then every row's GPU units ->
        ``self._out`` [1, D]; the pass counted."""
        gu, dn = self.pool
        if self.k and self.missed_ids:
            share_copy.copy_shares(flat, self.pos, self.mod.host_gate_up, self.mod.host_down, gu, dn,
                                   self.first_slot, self.k)
        if self.side is not None:
            a = gemv.expert_gate_up_act(hidden, rows, gu, per_x=self.top_k, units=units)
            self._out = gemv.expert_down(a, rows, dn, top_k_weights, units=units)
        else:
            self._out = _rows_in_torch(hidden, rows, units, gu, dn, top_k_weights, self.mod.act_fn)
        count(flat)


def _rows_in_torch(hidden, rows, units, gu, dn, top_k_weights, act_fn) -> torch.Tensor:
    """``gemv.expert_gate_up_act`` then ``gemv.expert_down`` with units, in torch's ops (CPU device): the same
    roundings, one token."""
    total = torch.zeros(hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    inter = dn.shape[2]
    for s, (r, n) in enumerate(zip(rows.tolist(), units.tolist())):
        n = min(int(n), inter)
        g, u = F.linear(hidden[0], gu[r, :n]), F.linear(hidden[0], gu[r, inter:inter + n])
        y = F.linear(act_fn(g) * u, dn[r, :, :n]) if n else torch.zeros_like(hidden[0])
        total += (y * top_k_weights[0, s].to(y.dtype)).to(hidden.dtype).float()
    return total.to(hidden.dtype)[None]
