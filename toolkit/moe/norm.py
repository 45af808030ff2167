"""RMSNorm as one Triton kernel, swapped into an offloaded model's norms after a check against their own forward.

Why: transformers writes RMSNorm as torch ops (to float32, square, mean, add
epsilon, rsqrt, multiply, back to the model's dtype, times the weight), each
its own kernel. A decode step of one token runs two norms a layer, and each
of those kernels streams a few kilobytes in a couple of microseconds plus
its launch: at Mixtral's sizes the step's GPU time was 2.67 ms against 1.68
ms for its bytes (``data/gpu/profile_moe_h200_whole_forward.json``), most of
the difference in such small kernels. One program per row does the whole
norm in one kernel.

``rms_norm(x [..., D], weight [D], eps)``: transformers' arithmetic with its
roundings (statistics in float32, the normalised row rounded to x's dtype
before the weight multiplies it, the product in the promoted dtype).

``fuse_norms(model) -> FusedNorms``: for each module whose class is named
``*RMSNorm`` and holds a 1-D ``weight`` and an epsilon, on a device where the
kernel runs (``usable``), the kernel's output on a probe is compared with the
module's own forward; only the norms that agree get the kernel as their
forward (a norm written another way, Gemma's ``(1 + weight)`` say, keeps
its own). ``FusedNorms.restore()`` puts every forward back.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from . import gemv

# why the kernel is off in this process (a Triton that failed here), or None
broken: str | None = None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        x = tl.load(x_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / D
        y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype first
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + d, (w * y).to(out_ptr.dtype.element_ty), mask=ok)

    return rms_norm_kernel


def usable(device: torch.device) -> bool:
    """Whether ``rms_norm`` runs here: a CUDA device with Triton, and no failure of the kernel in this process."""
    return broken is None and torch.device(device).type == "cuda" and gemv.has_triton()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in the dtype of ``weight * x`` (transformers' RMSNorm)."""
    import triton

    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} ([D] for [..., D])")
    rows = x.reshape(-1, D).contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if not rows.shape[0]:  # no rows: nothing to launch
        return out.view(x.shape)
    block = triton.next_power_of_2(D)
    _kernel()[(rows.shape[0],)](rows, weight.contiguous(), out, D, float(eps), BLOCK_D=block,
                                num_warps=min(8, max(1, block // 512)))
    return out.view(x.shape)


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def candidates(model: nn.Module) -> list[nn.Module]:
    """The modules that look like an RMSNorm: a class named ``*RMSNorm``, a 1-D ``weight`` and a float epsilon."""
    return [m for m in model.modules()
            if type(m).__name__.lower().endswith("rmsnorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and _epsilon(m) is not None]


def agrees(module: nn.Module) -> bool:
    """Whether the kernel reproduces ``module``'s own forward (its class's) on a probe of 3 rows.

    Within about one unit in the last place of the output dtype: the kernel
    sums the squares in another order than torch does.
    """
    w = module.weight
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(3, w.shape[0], generator=g, device=w.device).to(w.dtype)
    own = type(module).forward.__get__(module)
    with torch.no_grad():
        try:
            ref = own(x)
        except Exception:  # a forward that wants more than the hidden states: not ours to replace
            return False
        got = rms_norm(x, w.detach(), _epsilon(module))
    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape or ref.dtype != got.dtype:
        return False
    ulp = torch.finfo(got.dtype).eps
    return torch.allclose(got.float(), ref.float(), rtol=2 * ulp, atol=1e-3 * ulp * float(ref.float().abs().max()))


class FusedNorms:
    """The norms given the kernel as their forward (``fuse_norms``); ``restore()`` gives them theirs back."""

    def __init__(self, fused: list[nn.Module], kept: list[nn.Module]):
        self.fused = fused  # forward replaced by the kernel
        self.kept = kept  # RMSNorm-like modules whose own forward the kernel did not reproduce

    def __len__(self) -> int:
        return len(self.fused)

    def restore(self) -> None:
        for m in self.fused:
            m.__dict__.pop("forward", None)
        self.fused = []


def _forward(module: nn.Module):
    eps = _epsilon(module)
    own = type(module).forward.__get__(module)

    def forward(hidden_states, *args, **kwargs):
        global broken
        if args or kwargs:  # called some other way than with the hidden states alone: the norm's own forward
            return own(hidden_states, *args, **kwargs)
        if broken is None:
            try:
                return rms_norm(hidden_states, module.weight, eps)
            except Exception as e:  # a Triton that cannot compile for this GPU: torch's ops from now on
                broken = f"{type(e).__name__}: {e}"
                warnings.warn(f"the RMSNorm kernel failed here ({broken}); norms use torch's ops from now on",
                              RuntimeWarning, stacklevel=2)
        return own(hidden_states)

    return forward


def fuse_norms(model: nn.Module) -> FusedNorms:
    """Give each RMSNorm of ``model`` that the kernel reproduces (``agrees``) the kernel as its forward."""
    global broken
    fused, kept = [], []
    for m in candidates(model):
        if "forward" in m.__dict__ or not usable(m.weight.device):
            continue
        try:
            ok = agrees(m)
        except Exception as e:  # the kernel does not compile or run here: every norm keeps torch's ops
            broken = f"{type(e).__name__}: {e}"
            warnings.warn(f"the RMSNorm kernel failed here ({broken}); norms use torch's ops", RuntimeWarning,
                          stacklevel=2)
            break
        if ok:
            m.forward = _forward(m)
            fused.append(m)
        else:
            kept.append(m)
    return FusedNorms(fused, kept)
