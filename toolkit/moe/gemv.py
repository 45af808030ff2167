"""Expert GEMV for decode: each (token, slot) row times its expert's weights, the expert chosen on the device.

Why: a decode pass has a handful of (token, slot) rows (T tokens x top-K), and
each row reads its expert's whole weight matrix once: the work is streaming
weights from GPU memory. ``torch.nn.functional.grouped_mm`` does the same
without a host sync, but its CUTLASS tiles are built for many rows per group:
on an H200 at one row per expert it reads the weights at about half the rate
cuBLAS reaches per expert (``data/gpu/expert_gemv_h200.json``: 2.0 against 4.1 TB/s). This kernel
reads the expert index from device memory, so nothing reaches the host and a
CUDA graph can replay it, and streams the weight rows with one program per
(block of output units, row).

``expert_gemv(x [R, K], index [R], weight [E, N, K]) -> [R, N]``: row r is
``x[r] @ weight[index[r]].T``, accumulated in float32, in ``x``'s dtype.
It needs Triton and a CUDA device (``usable``); rows that share an expert read
its weights once each, so it takes at most ``MAX_ROWS`` rows (more, as in beam
search or prefill, take grouped_mm).
"""

from __future__ import annotations

import functools

import torch

# (token, slot) rows up to which the GEMV is used. Measured on an H200 at Mixtral's sizes: 2 rows (batch 1,
# top-2) 0.114 + 0.070 ms per layer against grouped_mm's 0.230 + 0.106; 8 rows over 4 experts (beams share
# experts, and the GEMV reads a shared expert once per row) 0.42 + 0.15 against 0.35 + 0.17.
MAX_ROWS = 4
BLOCK_N = 16  # output units per program: many programs, so every SM streams weights (down projections too)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def expert_gemv_kernel(x_ptr, idx_ptr, w_ptr, out_ptr, N, K, stride_we, stride_wn,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        r = tl.program_id(1)
        e = tl.load(idx_ptr + r).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output units
        n_ok = n < N
        rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xv = tl.load(x_ptr + r * K + k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        tl.store(out_ptr + r * N + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)

    return expert_gemv_kernel


# why the GEMV is off in this process (a Triton that failed here), or None
broken: str | None = None


def disable(reason: str) -> None:
    """Turn the GEMV off for this process (callers fall back to grouped_mm); ``reason`` is kept in ``broken``."""
    global broken
    broken = reason


def usable(device: torch.device, rows: int) -> bool:
    """Whether ``expert_gemv`` runs here for this many rows: a CUDA device, Triton installed, few rows."""
    return broken is None and torch.device(device).type == "cuda" and rows <= MAX_ROWS and _has_triton()


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def launch_config(k: int) -> tuple[int, int]:
    """(BLOCK_K, warps): long rows (a down projection's intermediate units) take bigger chunks and more warps.

    The fastest of a grid (BLOCK_N 16-128, BLOCK_K 128-512, 4 or 8 warps) on an H200: 16/128/4 for
    gate/up (K = 4096), 16/256/8 for down (K = 14336).
    """
    return (128, 4) if k <= 4096 else (256, 8)


def expert_gemv(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K], index [R] (int), weight [E, N, K] (unit stride in K) -> [R, N] in x's dtype."""
    R, K = x.shape
    E, N, K2 = weight.shape
    if K2 != K or index.shape != (R,) or weight.stride(2) != 1:
        raise ValueError(f"expert_gemv: x {tuple(x.shape)}, index {tuple(index.shape)}, weight {tuple(weight.shape)} "
                         f"(stride {weight.stride()}) do not fit [R, K], [R], [E, N, K] with unit stride in K")
    x = x.contiguous()
    out = torch.empty(R, N, device=x.device, dtype=x.dtype)
    block_k, warps = launch_config(K)
    _kernel()[(-(-N // BLOCK_N), R)](x, index.contiguous(), weight, out, N, K, weight.stride(0), weight.stride(1),
                                     BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=warps)
    return out
