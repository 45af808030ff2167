"""The expert GEMV (toolkit.moe.gemv): each row times the weights of the expert its index names.

On CPU the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1), so the same kernel code is
checked here as on the GPU; the CUDA run is a ``gpu`` test.
"""

import builtins
import os

import numpy as np
import pytest
import torch

from toolkit.moe import gemv
from toolkit.moe.costs import CostModel
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe

CM = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0)


@pytest.fixture
def interpreted():
    """Triton in its CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is for machines without a GPU (the gpu tests run the kernel itself)")


def reference(x, index, weight):
    return torch.stack([weight[int(e)].float() @ x[r].float() for r, e in enumerate(index)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(40, 300), (16, 128), (5, 4100)])  # ragged blocks, exact blocks, long rows
def test_each_row_uses_the_expert_its_index_names(interpreted, dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    weight = torch.randn(4, n, k, generator=g).to(dtype)
    x = torch.randn(3, k, generator=g).to(dtype)
    index = torch.tensor([2, 0, 2])  # a shared expert is fine
    y = gemv.expert_gemv(x, index, weight)
    assert y.shape == (3, n) and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), reference(x, index, weight), atol=tol * k ** 0.5, rtol=tol)


def test_a_strided_stack_is_read_in_place(interpreted):
    big = torch.randn(3, 24, 64)
    weight = big[:, 4:20]  # [3, 16, 64] with the stack's strides: gate/up rows of a fused tensor
    x, index = torch.randn(2, 64), torch.tensor([1, 2])
    torch.testing.assert_close(gemv.expert_gemv(x, index, weight), reference(x, index, weight), atol=1e-4, rtol=1e-4)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        gemv.expert_gemv(torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="do not fit"):
        gemv.expert_gemv(torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(2, 8, 4).transpose(1, 2))


def test_used_only_on_cuda_with_triton_and_few_rows(monkeypatch):
    assert not gemv.usable(torch.device("cpu"), 2)
    assert not gemv.usable(torch.device("cuda"), gemv.MAX_ROWS + 1)
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    gemv._has_triton.cache_clear()  # asked once per process: ask again under the patched import
    try:
        assert not gemv.usable(torch.device("cuda"), 2)
    finally:
        gemv._has_triton.cache_clear()
    assert gemv.launch_config(4096) == (128, 4) and gemv.launch_config(14336) == (256, 8)


def test_the_engine_takes_the_gemv_for_decode_rows_and_agrees_with_grouped_mm(interpreted, monkeypatch):
    model = build_moe("tiny-mixtral", seed=0)
    off = offload(model, "all", device="cpu", cost_model=CM)
    try:
        mod = off.experts[0]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, model.config.hidden_size, generator=g)
        index = torch.tensor([[3, 1], [1, 6]])
        weights = torch.softmax(torch.randn(2, 2, generator=g), -1)
        grouped = mod._on_device(hidden, index, weights, "decode")  # on a CPU: grouped_mm
        calls = []
        real = gemv.expert_gemv
        monkeypatch.setattr(gemv, "usable", lambda device, rows: rows <= gemv.MAX_ROWS)
        monkeypatch.setattr(gemv, "expert_gemv", lambda *a: calls.append(a[1]) or real(*a))
        got = mod._on_device(hidden, index, weights, "decode")
        assert len(calls) == 2 and torch.equal(calls[0], index.reshape(-1))  # gate/up, then down
        torch.testing.assert_close(got, grouped, atol=1e-5, rtol=1e-5)
        per_expert = sum(mod._expert(hidden, *mod.gpu[int(e)], (index == e).float().mul(weights).sum(-1),
                                     hidden.dtype) for e in np.unique(index.numpy()))
        torch.testing.assert_close(got, per_expert, atol=1e-5, rtol=1e-5)
        assert off.stats.activations["decode"][0].sum() == 2 * 4  # both calls counted, on the device
    finally:
        off.restore()


@pytest.mark.gpu
def test_gpu_gemv_equals_linear_per_row_in_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((28672 // 8, 4096), (4096, 14336 // 8)):
        weight = torch.randn(8, n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        x = torch.randn(2, k, device="cuda", generator=g, dtype=torch.bfloat16)
        index = torch.tensor([5, 2], device="cuda")
        y = gemv.expert_gemv(x, index, weight)
        ref = torch.stack([torch.nn.functional.linear(x[r], weight[int(e)]) for r, e in enumerate(index)])
        torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_the_benchmark_refuses_a_machine_without_a_gpu(tmp_path, capsys):
    from benchmark_scripts import load_benchmark

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        load_benchmark("expert_gemv").main(["--out", str(tmp_path)])
    assert e.value.code == 2 and "needs a CUDA GPU and Triton" in capsys.readouterr().err


def test_a_gemv_that_fails_here_falls_back_to_grouped_mm_with_a_warning(monkeypatch):
    model = build_moe("tiny-mixtral", seed=0)
    off = offload(model, "all", device="cpu", cost_model=CM)
    try:
        mod = off.experts[0]
        hidden = torch.randn(1, model.config.hidden_size)
        index, weights = torch.tensor([[3, 1]]), torch.tensor([[0.6, 0.4]])
        grouped = mod._on_device(hidden, index, weights, "decode")
        monkeypatch.setattr(gemv, "broken", None)
        monkeypatch.setattr(gemv, "usable", lambda device, rows: gemv.broken is None)

        def fails(*a):
            raise RuntimeError("no compiler for this GPU")

        monkeypatch.setattr(gemv, "expert_gemv", fails)
        with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
            got = mod._on_device(hidden, index, weights, "decode")
        torch.testing.assert_close(got, grouped)
        assert gemv.broken == "RuntimeError: no compiler for this GPU" and not gemv.usable(hidden.device, 2)
    finally:
        off.restore()
