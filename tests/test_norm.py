"""RMSNorm as one kernel (toolkit.moe.norm): transformers' arithmetic, swapped in only where a norm's own forward agrees.

On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py), which rounds to bfloat16 by
truncation where the GPU rounds to nearest: bfloat16 results are compared with a tolerance here and
exactly in the ``gpu`` test.
"""

import os

import pytest
import torch
from torch import nn

from toolkit.moe import norm
from toolkit.moe.costs import CostModel
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe

CM = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0)


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel in Triton's CPU interpreter, taken as usable on the CPU."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is for machines without a GPU (the gpu tests run the kernel itself)")
    monkeypatch.setattr(norm, "usable", lambda device: norm.broken is None)
    monkeypatch.setattr(norm, "broken", None)


def mixtral_norm(d, dtype=torch.float32, seed=0):
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    m = MixtralRMSNorm(d, eps=1e-5)
    m.weight.data = torch.randn(d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return m


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 100), (1, 1, 4096)])  # rows of a pass; D not a power of 2
def test_the_kernel_is_transformers_rmsnorm(interpreted, shape):
    m = mixtral_norm(shape[-1])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    got = norm.rms_norm(x, m.weight, m.variance_epsilon)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, m(x), atol=1e-5, rtol=1e-5)


def test_bfloat16_rows_and_a_float32_weight_promote_as_torch_does(interpreted):
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    m = mixtral_norm(96, torch.bfloat16)
    torch.testing.assert_close(norm.rms_norm(x, m.weight, 1e-5).float(), m(x).float(), atol=0.05, rtol=0.02)
    m32 = mixtral_norm(96, torch.float32)  # weight float32, rows bfloat16: the product is float32
    got = norm.rms_norm(x, m32.weight, 1e-5)
    assert got.dtype == m32(x).dtype == torch.float32
    torch.testing.assert_close(got, m32(x), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="does not fit"):
        norm.rms_norm(x, m.weight[:10], 1e-5)
    empty = norm.rms_norm(x[:0], m.weight, 1e-5)  # a pass of no rows launches nothing
    assert empty.shape == (0, 96) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("preset,per_layer", [("tiny-mixtral", 2), ("tiny-olmoe", 4), ("tiny-qwen3-moe", 4)])
def test_each_norm_of_a_model_is_fused_after_its_check_and_put_back(interpreted, preset, per_layer):
    model = build_moe(preset, seed=0)
    ids = torch.tensor([[5, 17, 3, 99]])
    with torch.no_grad():
        before = model(ids).logits
    found = norm.candidates(model)
    fused = norm.fuse_norms(model)
    # two per layer and the final norm; OLMoE and Qwen3-MoE also normalise queries and keys
    assert len(found) == len(fused) == per_layer * model.config.num_hidden_layers + 1 and not fused.kept
    assert all("forward" in m.__dict__ for m in found)
    calls = []
    real = norm.rms_norm
    norm.rms_norm = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        with torch.no_grad():
            after = model(ids).logits
    finally:
        norm.rms_norm = real
    assert len(calls) == len(found)  # every norm of the forward went through the kernel
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert len(norm.fuse_norms(model)) == 0  # already fused: not wrapped twice
    fused.restore()
    assert not any("forward" in m.__dict__ for m in found) and len(fused) == 0


class OnePlusWeightRMSNorm(nn.Module):
    """A norm written another way (as Gemma's): x / rms * (1 + weight)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class TwoArgumentRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, x, residual):
        return x + residual


def test_a_norm_the_kernel_does_not_reproduce_keeps_its_own_forward(interpreted):
    model = nn.Sequential(mixtral_norm(32), OnePlusWeightRMSNorm(32), TwoArgumentRMSNorm(32), nn.LayerNorm(32))
    assert len(norm.candidates(model)) == 3  # LayerNorm is no RMSNorm
    fused = norm.fuse_norms(model)
    assert fused.fused == [model[0]] and fused.kept == [model[1], model[2]]
    assert "forward" not in model[1].__dict__ and "forward" not in model[2].__dict__
    fused.restore()


def test_a_kernel_that_fails_here_leaves_every_norm_its_own_forward(interpreted, monkeypatch):
    model = nn.Sequential(mixtral_norm(32), mixtral_norm(32, seed=1))

    def fails(*a):
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(norm, "rms_norm", fails)
    with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
        fused = norm.fuse_norms(model)
    assert len(fused) == 0 and norm.broken == "RuntimeError: no compiler for this GPU"
    assert not any("forward" in m.__dict__ for m in model)


def test_a_kernel_that_fails_later_falls_back_to_the_norms_own_forward(interpreted, monkeypatch):
    m = mixtral_norm(32)
    x = torch.randn(2, 32)
    fused = norm.fuse_norms(nn.Sequential(m))
    assert len(fused) == 1

    def fails(*a):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(norm, "rms_norm", fails)
    with pytest.warns(RuntimeWarning, match="out of resources"):
        got = m(x)
    torch.testing.assert_close(got, type(m).forward(m, x))
    assert norm.broken == "RuntimeError: out of resources"
    fused.restore()


class ScaledRMSNorm(nn.Module):
    """transformers' RMSNorm, with an optional second argument the kernel does not know."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(3)))
        self.variance_epsilon = 1e-6

    def forward(self, x, scale=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight
        return y if scale is None else y * scale


def test_a_norm_called_with_more_than_the_hidden_states_runs_its_own_forward(interpreted, monkeypatch):
    m = ScaledRMSNorm(16)
    fused = norm.fuse_norms(nn.Sequential(m))
    assert fused.fused == [m]
    x = torch.randn(2, 16)
    calls = []
    real = norm.rms_norm
    monkeypatch.setattr(norm, "rms_norm", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(m(x), type(m).forward(m, x), atol=1e-5, rtol=1e-5)
    assert calls == [1]
    torch.testing.assert_close(m(x, scale=2.0), type(m).forward(m, x, 2.0))
    torch.testing.assert_close(m(x, 3.0), type(m).forward(m, x, 3.0))
    assert calls == [1]  # the other calls went to the norm's own forward
    fused.restore()


def test_no_norm_is_touched_where_the_kernel_does_not_run():
    model = nn.Sequential(mixtral_norm(32))
    if norm.usable(torch.device("cpu")):
        pytest.skip("the kernel runs on this CPU")
    assert len(norm.fuse_norms(model)) == 0 and "forward" not in model[0].__dict__


@pytest.mark.parametrize("fused", [True, False])
def test_offload_fuses_the_norms_and_restore_puts_them_back(interpreted, fused):
    model = build_moe("tiny-mixtral", seed=0)
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        before = model(ids).logits
    off = offload(model, "all", device="cpu", cost_model=CM, fused=fused)
    try:
        n = 2 * model.config.num_hidden_layers + 1
        assert off.to_dict()["fused"]["norms"] == (n if fused else 0)
        assert (off.norms is not None) == fused
        assert sum("forward" in m.__dict__ for m in norm.candidates(model)) == (n if fused else 0)
        with torch.no_grad():
            torch.testing.assert_close(off(ids).logits, before, atol=1e-5, rtol=1e-5)
    finally:
        off.restore()
    assert not any("forward" in m.__dict__ for m in norm.candidates(model))


@pytest.mark.gpu
def test_gpu_kernel_matches_the_norm_in_bfloat16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    m = mixtral_norm(4096, torch.bfloat16).cuda()
    x = torch.randn(7, 4096, device="cuda", dtype=torch.bfloat16) * 3
    got, ref = norm.rms_norm(x, m.weight, m.variance_epsilon), m(x)
    assert got.dtype == ref.dtype == torch.bfloat16
    # the same roundings; the sum of squares in another order may move a rounding by one unit, rarely
    assert (got != ref).float().mean() < 0.01
    torch.testing.assert_close(got.float(), ref.float(), atol=0.0, rtol=2 ** -7)
    assert norm.agrees(m)


def test_the_moe_command_prints_what_ran_fused():
    from moe_records import run_record

    from toolkit.cli.moe import format_table

    def line(fused):
        lines = format_table(run_record(engine={"fused": fused})).splitlines()
        return next((x for x in lines if x.startswith("  fused kernels")), None)

    assert line({"norms": 17, "norms_kept": 0, "expert_layers": 8}).endswith(
        "17 RMSNorms as one kernel each; the experts of 8 sync-free layers in 3 kernels a decode pass")
    assert line({"norms": 0, "norms_kept": 5, "expert_layers": 0}).endswith(
        "5 norms kept torch's ops (the kernel did not reproduce them)")
    assert line({"norms": 0, "norms_kept": 0, "expert_layers": 0}) is None and line(None) is None


def test_no_fused_on_the_command_line_reaches_the_engine():
    import argparse

    from toolkit.cli.moe import register, settings_from_args
    from toolkit.moe.run import MoESession

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert settings_from_args(parser.parse_args(["moe"])).fused is True
    off = settings_from_args(parser.parse_args(["moe", "--no-fused", "--preset", "tiny-mixtral", "--device", "cpu",
                                                "--gpu-experts", "4", "--routing", "model"]))
    assert off.fused is False
    with MoESession(off) as session:
        with session.offload() as engine:
            assert engine.options.fused is False and engine.norms is None
