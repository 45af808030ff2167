"""The GPU's share of a token's missed experts, pulled from pinned host memory into staging slots by one kernel.

Why: a captured decode pass (``toolkit.moe.graph_pass``) must copy, on every
replay, units [0, k) of whichever experts the routing just picked and the
GPU does not hold. With conditional nodes that is one node per pair of
staging slot and expert that may miss: 2 x 7 for Mixtral's layers at 14 of 64,
but 8 x 48 for OLMoE's (top-8 of 64), and every node costs the replay some
microseconds whether it runs or not. Here the expert is read on the device
instead: each of the token's K slots looks its expert up in the layer's
residency (``pos`` < 0: missed) and, where it missed, the kernel's programs
read that expert's rows from pinned host memory (mapped into the GPU's
address space, as the driver's own copies read it) and write them into the
slot. Two launches a pass whatever the routing, so the graph is the same for
every model.

What is copied into slot s for a missed expert e (as ``GraphPass`` lays a
slot out): gate rows [0, k) and up rows [I, I + k) of ``gate_up[e]`` [2I, D]
(two contiguous runs of k D elements), and columns [0, k) of each of the D
rows of ``down[e]`` [D, I].

On a CPU device (the tests) ``copy_shares`` does the same with torch's copies,
reading the residency on the host.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 4096  # elements a program moves per step of the gate/up runs (8 KB of bf16)
BLOCK_ROWS, BLOCK_COLS = 8, 512  # a tile of the down projection's rows and columns per step


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_kernel(sel_ptr, pos_ptr, src_addr, dst_ptr, first_slot, run, up_at, expert_size,
                       BLOCK: tl.constexpr):
        s = tl.program_id(0)
        part, parts = tl.program_id(1), tl.num_programs(1)
        e = tl.load(sel_ptr + s).to(tl.int64)
        missed = tl.load(pos_ptr + e) < 0
        length = tl.where(missed, run, 0)  # a resident expert's slot copies nothing
        src = src_addr.to(tl.pointer_type(tl.bfloat16)) + e * expert_size
        dst = dst_ptr + (first_slot + s).to(tl.int64) * expert_size
        for start in range(part * BLOCK, length, parts * BLOCK):
            i = start + tl.arange(0, BLOCK)
            m = i < length
            tl.store(dst + i, tl.load(src + i, mask=m), mask=m)  # gate rows [0, k)
            tl.store(dst + up_at + i, tl.load(src + up_at + i, mask=m), mask=m)  # up rows [I, I + k)

    @triton.jit
    def down_kernel(sel_ptr, pos_ptr, src_addr, dst_ptr, first_slot, D, INTER, k,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        s = tl.program_id(0)
        part, parts = tl.program_id(1), tl.num_programs(1)
        e = tl.load(sel_ptr + s).to(tl.int64)
        missed = tl.load(pos_ptr + e) < 0
        rows = tl.where(missed, D, 0)
        size = D.to(tl.int64) * INTER
        src = src_addr.to(tl.pointer_type(tl.bfloat16)) + e * size
        dst = dst_ptr + (first_slot + s).to(tl.int64) * size
        for r0 in range(part * BLOCK_ROWS, rows, parts * BLOCK_ROWS):
            r = (r0 + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
            for c0 in range(0, k, BLOCK_COLS):
                c = c0 + tl.arange(0, BLOCK_COLS)[None, :]
                m = (r < D) & (c < k)
                at = r * INTER + c
                tl.store(dst + at, tl.load(src + at, mask=m), mask=m)

    return gate_up_kernel, down_kernel


@functools.cache
def _programs(device: torch.device, slots: int) -> int:
    """Programs per slot: about four per SM over all slots, so the reads of host memory keep many requests in
    flight whichever slots missed."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, 4 * sms // max(1, slots))


def copy_shares(sel: torch.Tensor, pos: torch.Tensor, host_gate_up: torch.Tensor, host_down: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, first_slot: int, k: int) -> None:
    """Copy units [0, k) of each missed expert of a token into its slot, on the current stream.

    sel [K] int64: the token's experts, slot s holding ``sel[s]``; pos [E] int64: each expert's row in the
    pool, < 0 where it is not resident (its slot gets the copy); host_gate_up [E, 2I, D], host_down [E, D, I]:
    the layer's experts, contiguous bf16, pinned (on a CUDA device); gate_up [P, 2I, D], down [P, D, I]: the
    pool, slot s at row ``first_slot + s``.
    """
    _, two_i, D = host_gate_up.shape
    inter, slots = two_i // 2, sel.numel()
    if not 0 <= k <= inter:
        raise ValueError(f"copy_shares: k must be in [0, {inter}], not {k}")
    if k == 0 or slots == 0:
        return
    if not sel.is_cuda:  # the same copies by torch, the residency read on the host
        for s, e in enumerate(sel.tolist()):
            if int(pos[e]) < 0:
                row = first_slot + s
                gate_up[row, :k].copy_(host_gate_up[e, :k])
                gate_up[row, inter:inter + k].copy_(host_gate_up[e, inter:inter + k])
                down[row, :, :k].copy_(host_down[e, :, :k])
        return
    launch(sel, pos, host_gate_up, host_down, gate_up, down, first_slot, k, _programs(sel.device, slots))


def launch(sel, pos, host_gate_up, host_down, gate_up, down, first_slot: int, k: int, programs: int,
           block: int = BLOCK, block_rows: int = BLOCK_ROWS, block_cols: int = BLOCK_COLS) -> None:
    """The two kernels of ``copy_shares`` with ``programs`` programs a slot (the host tensors' addresses are
    the GPU's too: pinned memory is mapped; in Triton's CPU interpreter they are the CPU's)."""
    _, two_i, D = host_gate_up.shape
    inter = two_i // 2
    gate_up_kernel, down_kernel = _kernels()
    grid = (sel.numel(), int(programs))
    gate_up_kernel[grid](sel, pos, host_gate_up.data_ptr(), gate_up, int(first_slot), k * D, inter * D, two_i * D,
                         BLOCK=block)
    down_kernel[grid](sel, pos, host_down.data_ptr(), down, int(first_slot), D, inter, k,
                      BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
