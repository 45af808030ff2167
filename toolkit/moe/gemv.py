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

A decode pass's experts are a handful of such kernels and many small ones
around them (the token's copy per slot, the activation, the routing weight, the
sum over slots, the counts), each a launch and a few microseconds in a step
of a few milliseconds. Three kernels make the whole pass:
``expert_gate_up_act`` (gate and up rows of a unit in one program, the
activation ``silu(gate) * up`` in its epilogue), ``expert_down`` (each
token's slots weighted and summed in its epilogue) and ``count_rows`` (a
pass's rows per expert added to device counters). They keep torch's
roundings: each projection's output, the SiLU and the product rounded to the
model's dtype, each slot's output and its weighted value too, the sum over
slots once.
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
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_DIV: tl.constexpr):
        pid_n = tl.program_id(0)
        r = tl.program_id(1)
        e = tl.load(idx_ptr + r).to(tl.int64)
        xr = r // X_DIV  # the x row of output row r: X_DIV rows (a token's slots) share one
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output units
        n_ok = n < N
        rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xv = tl.load(x_ptr + xr * K + k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
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
    return broken is None and torch.device(device).type == "cuda" and rows <= MAX_ROWS and has_triton()


@functools.cache
def has_triton() -> bool:
    """Whether Triton imports here (asked once per process)."""
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


def _rows(name: str, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, per_x: int, layout: str,
          even: bool = False) -> int:
    """R, the output rows of a GEMV kernel taking x [R / per_x, K], index [R] and weight [E, N, K] (unit stride in
    K; ``even``: N even, gate rows then up rows); else a ValueError naming ``layout`` (``{per_x}`` filled in)."""
    R = index.shape[0] if index.dim() == 1 else -1
    if (weight.dim() != 3 or weight.shape[2] != x.shape[-1] or (even and weight.shape[1] % 2) or index.dim() != 1
            or per_x < 1 or x.dim() != 2 or x.shape[0] * per_x != R or weight.stride(2) != 1):
        raise ValueError(f"{name}: x {tuple(x.shape)}, index {tuple(index.shape)}, weight {tuple(weight.shape)} "
                         f"(stride {weight.stride()}) do not fit {layout.format(per_x=per_x)}")
    return R


def _units(name: str, units: torch.Tensor | None, R: int) -> torch.Tensor | None:
    """``units`` as a contiguous int tensor of R rows, or a ValueError; None stays None (every unit)."""
    if units is None:
        return None
    if units.shape != (R,) or units.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: units {tuple(units.shape)} {units.dtype} must be int32 or int64 [{R}]")
    return units.contiguous()


def expert_gemv(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, per_x: int = 1) -> torch.Tensor:
    """x [R / per_x, K], index [R] (int), weight [E, N, K] (unit stride in K) -> [R, N] in x's dtype.

    per_x: output rows per row of x (a token's top-k slots read the token's
    one row; no copy of it per slot): row r is ``x[r // per_x] @ weight[index[r]].T``.
    """
    R = _rows("expert_gemv", x, index, weight, per_x, "[R / {per_x}, K], [R], [E, N, K] with unit stride in K")
    K, N = x.shape[-1], weight.shape[1]
    x = x.contiguous()
    out = torch.empty(R, N, device=x.device, dtype=x.dtype)
    block_k, warps = launch_config(K)
    _kernel()[(-(-N // BLOCK_N), R)](x, index.contiguous(), weight, out, N, K, weight.stride(0), weight.stride(1),
                                     BLOCK_N=BLOCK_N, BLOCK_K=block_k, X_DIV=per_x, num_warps=warps)
    return out


@functools.cache
def _act_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def expert_gate_up_act_kernel(x_ptr, idx_ptr, w_ptr, out_ptr, units_ptr, INTER, K, stride_we, stride_wn,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_DIV: tl.constexpr,
                                  HAS_UNITS: tl.constexpr):
        pid_n = tl.program_id(0)
        r = tl.program_id(1)
        e = tl.load(idx_ptr + r).to(tl.int64)
        xr = r // X_DIV
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] intermediate units: gate row n, up row INTER + n
        n_out = n < INTER
        if HAS_UNITS:  # the row's units [0, units[r]): the rest are read as zeros and stored as zeros
            n_ok = n_out & (n < tl.load(units_ptr + r))
        else:
            n_ok = n_out
        gate_rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * stride_wn
        up_rows = gate_rows + INTER * stride_wn
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xv = tl.load(x_ptr + xr * K + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            m = n_ok[:, None] & k_ok[None, :]
            acc_g += tl.sum(tl.load(gate_rows + k[None, :], mask=m, other=0.0).to(tl.float32) * xv, axis=1)
            acc_u += tl.sum(tl.load(up_rows + k[None, :], mask=m, other=0.0).to(tl.float32) * xv, axis=1)
        dt = out_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)  # each projection's output in the model dtype, as torch's GEMV gives it
        u = acc_u.to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu, rounded as torch's
        tl.store(out_ptr + r * INTER + n, (a * u).to(dt), mask=n_out)

    return expert_gate_up_act_kernel


@functools.cache
def _down_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def expert_down_kernel(a_ptr, idx_ptr, w_ptr, rw_ptr, out_ptr, units_ptr, N, INTER, stride_we, stride_wn,
                           SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_UNITS: tl.constexpr):
        pid_n = tl.program_id(0)
        t = tl.program_id(1)  # token
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output units
        n_ok = n < N
        dt = out_ptr.dtype.element_ty
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in tl.static_range(SLOTS):
            r = t * SLOTS + s  # (token, slot) row
            e = tl.load(idx_ptr + r).to(tl.int64)
            rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if HAS_UNITS:  # the row's units [0, units[r]): the down projection's other columns are not read
                n_units = tl.minimum(tl.load(units_ptr + r), INTER)
            else:
                n_units = INTER
            for k0 in range(0, n_units, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < n_units
                a = tl.load(a_ptr + r * INTER + k, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
            y = acc.to(dt).to(tl.float32)  # the slot's output in the model dtype
            total += (y * tl.load(rw_ptr + r).to(tl.float32)).to(dt).to(tl.float32)  # weighted, rounded
        tl.store(out_ptr + t * N + n, total.to(dt), mask=n_ok)

    return expert_down_kernel


def is_silu(act_fn) -> bool:
    """Whether ``act_fn`` computes SiLU (what ``expert_down`` folds in), checked on a probe of values."""
    x = torch.linspace(-12.0, 12.0, 97)
    try:
        with torch.no_grad():
            y = act_fn(x)
    except Exception:  # an activation that does not take a plain tensor
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, torch.nn.functional.silu(x),
                                                                                 rtol=1e-6, atol=1e-7)


# (units per program, BLOCK_K, warps) of the two pass kernels. Gate/up: a program reads a unit's gate and up
# rows; down: BLOCK_N rows of each of a token's experts. The fastest of a grid on an H200 at Mixtral's sizes
# (data/gpu/expert_gemv_h200_fused.json): gate/up with SiLU 0.115 ms as the plain gate/up GEMV, down with the
# weighted sum 0.066 against the plain GEMV's 0.071 (8/256/8, fewer bytes in flight: 0.104; gate/up 16/128/4: 0.127).
ACT_CONFIG = (8, 128, 4)
DOWN_CONFIG = (8, 1024, 8)


def expert_gate_up_act(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, per_x: int = 1,
                       config: tuple[int, int, int] | None = None, units: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's expert's ``silu(x @ gate.T) * (x @ up.T)`` in one kernel.

    x [R / per_x, D] (``per_x`` rows per row of x, a token's slots), index [R],
    weight [E, 2I, D] (gate rows, then up rows; unit stride in D) -> [R, I] in
    x's dtype, with torch's roundings: gate and up each rounded to x's dtype,
    the SiLU too, then the product. config: (BLOCK_N, BLOCK_K, warps), default ``ACT_CONFIG``.
    units: int [R] (on the device), row r computes intermediate units [0, units[r]) only and stores zeros
    past them, reading none of those weight rows (a missed expert whose other units another path computes).
    """
    R = _rows("expert_gate_up_act", x, index, weight, per_x, "[R / {per_x}, D], [R], [E, 2I, D] with unit stride in D",
              even=True)
    K, inter = x.shape[-1], weight.shape[1] // 2
    x = x.contiguous()
    out = torch.empty(R, inter, device=x.device, dtype=x.dtype)
    block_n, block_k, warps = config or ACT_CONFIG
    units = _units("expert_gate_up_act", units, R)
    _act_kernel()[(-(-inter // block_n), R)](x, index.contiguous(), weight, out, index if units is None else units,
                                             inter, K, weight.stride(0), weight.stride(1), BLOCK_N=block_n,
                                             BLOCK_K=block_k, X_DIV=per_x, HAS_UNITS=units is not None,
                                             num_warps=warps)
    return out


def expert_down(a: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, route_weights: torch.Tensor,
                config: tuple[int, int, int] | None = None, units: torch.Tensor | None = None) -> torch.Tensor:
    """A token's experts' down projections, weighted and summed, in one kernel.

    a [T*S, I] (each (token, slot) row's activation, ``expert_gate_up_act``),
    index [T*S] each row's expert, weight [E, D, I] (unit stride in I),
    route_weights [T, S] -> [T, D] in a's dtype:
    ``sum_s w[t, s] * down[index[t*S + s]] @ a[t*S + s]``, with the roundings
    of torch's ops in a's dtype (each slot's output, its weighted value, the sum).
    config: (BLOCK_N, BLOCK_K, warps), default ``DOWN_CONFIG``. units: int [R], row r's down projection
    over its units [0, units[r]) only (the columns past them are not read).
    """
    R, inter = a.shape
    E, D, INTER = weight.shape
    if route_weights.dim() != 2 or index.shape != (R,) or inter != INTER or route_weights.numel() != R \
            or weight.stride(2) != 1:
        raise ValueError(f"expert_down: a {tuple(a.shape)}, index {tuple(index.shape)}, weight {tuple(weight.shape)} "
                         f"(stride {weight.stride()}), route_weights {tuple(route_weights.shape)} do not fit "
                         "[T*S, I], [T*S], [E, D, I] with unit stride in I, [T, S]")
    T, S = route_weights.shape
    a = a.contiguous()
    out = torch.empty(T, D, device=a.device, dtype=a.dtype)
    block_n, block_k, warps = config or DOWN_CONFIG
    units = _units("expert_down", units, R)
    _down_kernel()[(-(-D // block_n), T)](a, index.contiguous(), weight, route_weights.contiguous(), out,
                                          index if units is None else units, D, INTER, weight.stride(0),
                                          weight.stride(1), SLOTS=S, BLOCK_N=block_n, BLOCK_K=block_k,
                                          HAS_UNITS=units is not None, num_warps=warps)
    return out


@functools.cache
def _count_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def count_rows_kernel(idx_ptr, t_ptr, R, E, row0, plane, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
        r = tl.arange(0, BLOCK_R)
        e = tl.arange(0, BLOCK_E)
        idx = tl.load(idx_ptr + r, mask=r < R, other=-1)
        n = tl.sum((idx[None, :] == e[:, None]).to(tl.int64), axis=1)  # [BLOCK_E] rows per expert
        ok = e < E
        act = t_ptr + row0 + e
        tl.store(act, tl.load(act, mask=ok, other=0) + n, mask=ok)
        used = t_ptr + plane + row0 + e
        tl.store(used, tl.load(used, mask=ok, other=0) + (n > 0).to(tl.int64), mask=ok)
        fwd = t_ptr + 2 * plane + row0 + e
        tl.store(fwd, tl.load(fwd, mask=e == 0, other=0) + 1, mask=e == 0)

    return count_rows_kernel


def count_rows(index: torch.Tensor, counters: torch.Tensor, layer: int) -> None:
    """Add one pass of ``layer`` to ``counters`` int64 [3, L, E] in one kernel.

    index [R]: each (token, slot) row's expert. Plane 0 gains the rows per
    expert, plane 1 one for each expert used, plane 2 (column 0) one pass.
    """
    import triton

    _, L, E = counters.shape
    if counters.dtype != torch.int64 or not counters.is_contiguous() or index.dim() != 1 or not 0 <= layer < L:
        raise ValueError(f"count_rows: counters {tuple(counters.shape)} {counters.dtype} (contiguous int64 [3, L, E]), "
                         f"index {tuple(index.shape)} ([R]), layer {layer}")
    R = index.shape[0]
    _count_kernel()[(1,)](index.contiguous(), counters, R, E, layer * E, L * E,
                          BLOCK_R=triton.next_power_of_2(max(R, 16)), BLOCK_E=triton.next_power_of_2(max(E, 16)))
