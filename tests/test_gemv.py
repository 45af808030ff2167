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


@pytest.fixture
def cuda_generator():
    """A seeded generator on the GPU, for the kernels themselves (Triton on a CUDA device)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    return torch.Generator(device="cuda").manual_seed(0)


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
    gemv.has_triton.cache_clear()  # asked once per process: ask again under the patched import
    try:
        assert not gemv.usable(torch.device("cuda"), 2)
    finally:
        gemv.has_triton.cache_clear()
    assert gemv.launch_config(4096) == (128, 4) and gemv.launch_config(14336) == (256, 8)


@pytest.mark.parametrize("fused", [True, False])
def test_the_engine_takes_the_gemv_for_decode_rows_and_agrees_with_grouped_mm(interpreted, monkeypatch, fused):
    model = build_moe("tiny-mixtral", seed=0)
    off = offload(model, "all", device="cpu", cost_model=CM, fused=fused)
    try:
        mod = off.experts[0]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, model.config.hidden_size, generator=g)
        index = torch.tensor([[3, 1], [1, 6]])
        weights = torch.softmax(torch.randn(2, 2, generator=g), -1)
        grouped = mod._on_device(hidden, index, weights, "decode")  # on a CPU: grouped_mm
        calls = []
        monkeypatch.setattr(gemv, "usable", lambda device, rows: rows <= gemv.MAX_ROWS)
        for name in ("expert_gemv", "expert_gate_up_act", "expert_down", "count_rows"):
            real = getattr(gemv, name)
            at = 0 if name == "count_rows" else 1  # where the rows' experts are passed
            monkeypatch.setattr(gemv, name, lambda *a, _real=real, _name=name, _at=at, **kw:
                                calls.append((_name, a[_at])) or _real(*a, **kw))
        got = mod._on_device(hidden, index, weights, "decode")
        names = [c[0] for c in calls]
        # fused: gate/up with the activation, down with the weighted sum, then the counts; else two GEMVs
        assert names == (["expert_gate_up_act", "expert_down", "count_rows"] if fused
                         else ["expert_gemv", "expert_gemv"])
        assert all(torch.equal(c[1], index.reshape(-1)) for c in calls)
        torch.testing.assert_close(got, grouped, atol=1e-5, rtol=1e-5)
        per_expert = sum(mod._expert(hidden, *mod.gpu[int(e)], (index == e).float().mul(weights).sum(-1),
                                     hidden.dtype) for e in np.unique(index.numpy()))
        torch.testing.assert_close(got, per_expert, atol=1e-5, rtol=1e-5)
        stats = off.stats
        assert stats.activations["decode"][0].sum() == 2 * 4  # both calls counted, on the device
        assert stats.passes_used["decode"][0].sum() == 2 * 3 and stats.forwards["decode"] == 2  # experts 1, 3, 6
    finally:
        off.restore()


def reference_act(x, index, weight, per_x):
    """torch's ops as the engine's unfused path runs them: each row's GEMV, then silu(gate) * up."""
    gate, up = torch.stack([torch.nn.functional.linear(x[r // per_x], weight[int(e)])
                            for r, e in enumerate(index)]).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def reference_down(a, index, weight, route_weights):
    """torch's ops as the engine's unfused path runs them: down, weighted, summed over slots."""
    y = torch.stack([torch.nn.functional.linear(row, weight[int(e)]) for row, e in zip(a, index)])
    T, S = route_weights.shape
    return (y * route_weights.reshape(-1, 1)).to(a.dtype).view(T, S, -1).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_x,rows", [(2, 2), (3, 6), (1, 4)])
def test_the_gate_up_kernel_gives_each_rows_activation(interpreted, dtype, per_x, rows):
    g = torch.Generator().manual_seed(per_x * 10 + rows)
    E, D, inter = 5, 300, 40  # D over several chunks, ragged unit blocks
    weight = (torch.randn(E, 2 * inter, D, generator=g) * 0.1).to(dtype)
    x = torch.randn(rows // per_x, D, generator=g).to(dtype)
    index = torch.randint(0, E, (rows,), generator=g)
    got = gemv.expert_gate_up_act(x, index, weight, per_x=per_x)
    assert got.shape == (rows, inter) and got.dtype == dtype
    # the interpreter rounds to bfloat16 by truncation (the GPU to nearest): bf16 agrees within a few units
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), reference_act(x, index, weight, per_x).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots,tokens", [(2, 1), (3, 2), (1, 4)])
def test_the_down_kernel_weights_and_sums_each_tokens_slots(interpreted, dtype, slots, tokens):
    g = torch.Generator().manual_seed(slots * 10 + tokens)
    E, D, inter = 5, 40, 300  # ragged output blocks, I over several chunks
    weight = (torch.randn(E, D, inter, generator=g) * 0.1).to(dtype)
    a = torch.randn(tokens * slots, inter, generator=g).to(dtype)
    index = torch.randint(0, E, (tokens * slots,), generator=g)
    route = torch.softmax(torch.randn(tokens, slots, generator=g), -1)
    got = gemv.expert_down(a, index, weight, route)
    assert got.shape == (tokens, D) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), reference_down(a, index, weight, route).float(), atol=tol, rtol=tol)


def test_a_token_row_serves_all_its_slots(interpreted):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 24, 64, generator=g)
    x = torch.randn(2, 64, generator=g)
    index = torch.tensor([3, 0, 0, 2])  # token 0: experts 3, 0; token 1: 0, 2
    expanded = x[:, None].expand(2, 2, 64).reshape(4, 64)
    assert torch.equal(gemv.expert_gemv(x, index, weight, per_x=2), gemv.expert_gemv(expanded, index, weight))


def test_rows_are_counted_per_expert_and_pass_in_one_kernel(interpreted):
    counters = torch.zeros(3, 2, 6, dtype=torch.int64)
    gemv.count_rows(torch.tensor([4, 1, 1, 5]), counters, 1)
    gemv.count_rows(torch.tensor([1, 0]), counters, 1)
    assert counters[0, 1].tolist() == [1, 3, 0, 0, 1, 1]  # rows per expert
    assert counters[1, 1].tolist() == [1, 2, 0, 0, 1, 1]  # passes that used each expert
    assert counters[2, 1].tolist() == [2, 0, 0, 0, 0, 0]  # passes, in column 0
    assert not counters[:, 0].any()  # the other layer untouched


def test_kernels_refuse_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        gemv.expert_gemv(torch.randn(2, 8), torch.tensor([0, 1, 1]), torch.randn(2, 4, 8), per_x=2)
    with pytest.raises(ValueError, match="do not fit"):
        gemv.expert_gate_up_act(torch.randn(1, 8), torch.tensor([0, 1]), torch.randn(2, 7, 8), per_x=2)
    with pytest.raises(ValueError, match="do not fit"):
        gemv.expert_down(torch.randn(2, 5), torch.tensor([0, 1]), torch.randn(2, 4, 6), torch.ones(1, 2))
    with pytest.raises(ValueError, match="do not fit"):
        gemv.expert_down(torch.randn(2, 6), torch.tensor([0, 1]), torch.randn(2, 4, 6), torch.ones(1, 3))
    with pytest.raises(ValueError, match="contiguous int64"):
        gemv.count_rows(torch.tensor([0]), torch.zeros(3, 2, 4), 0)
    with pytest.raises(ValueError, match="layer 2"):
        gemv.count_rows(torch.tensor([0]), torch.zeros(3, 2, 4, dtype=torch.int64), 2)


def test_only_silu_is_folded_into_the_down_kernel():
    assert gemv.is_silu(torch.nn.SiLU()) and gemv.is_silu(torch.nn.functional.silu)
    assert not gemv.is_silu(torch.nn.GELU()) and not gemv.is_silu(torch.nn.ReLU())
    assert not gemv.is_silu(lambda x, y: x)  # wants more than a tensor
    model = build_moe("tiny-mixtral", seed=0)
    model.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()
    off = offload(model, "all", device="cpu", cost_model=CM)
    try:
        assert [m.fused for m in off.experts] == [False] + [True] * (len(off.experts) - 1)
    finally:
        off.restore()


@pytest.mark.gpu
def test_gpu_gemv_equals_linear_per_row_in_bf16(cuda_generator):
    g = cuda_generator
    for n, k in ((28672 // 8, 4096), (4096, 14336 // 8)):
        weight = torch.randn(8, n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
        x = torch.randn(2, k, device="cuda", generator=g, dtype=torch.bfloat16)
        index = torch.tensor([5, 2], device="cuda")
        y = gemv.expert_gemv(x, index, weight)
        ref = torch.stack([torch.nn.functional.linear(x[r], weight[int(e)]) for r, e in enumerate(index)])
        torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_pass_kernels_keep_torchs_roundings_in_bf16(cuda_generator):
    g = cuda_generator
    E, D, inter = 8, 4096, 14336 // 4
    gate_up = torch.randn(E, 2 * inter, D, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    down = torch.randn(E, D, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    index = torch.tensor([5, 2], device="cuda")
    route = torch.softmax(torch.randn(1, 2, device="cuda", generator=g), -1)  # float32, as the router's
    a, a_ref = gemv.expert_gate_up_act(x, index, gate_up, per_x=2), reference_act(x, index, gate_up, 2)
    got, ref = gemv.expert_down(a_ref, index, down, route), reference_down(a_ref, index, down, route)
    # the same roundings; only the order of the GEMVs' sums differs, which moves a rounding by one unit at times
    for mine, theirs in ((a, a_ref), (got, ref)):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=1e-2, rtol=2 ** -6)
        assert (mine != theirs).float().mean() < 0.2


@pytest.mark.gpu
def test_gpu_fused_decode_agrees_with_torchs_ops():
    """On CUDA in bf16 with every expert resident: the fused step (RMSNorm kernel, three expert kernels) is
    captured in the whole-step graph and gives the unfused step's logits, tokens and counts."""
    from toolkit.moe import generation as G
    from toolkit.moe.prompts import random_prompts

    model = build_moe("tiny-mixtral", device="cuda", dtype=torch.bfloat16, seed=0)
    ids, mask = random_prompts(model.config.vocab_size, [5, 9], seed=2)
    got = {}
    for fused in (True, False):
        off = offload(model, gpu_experts="all", device="cuda", cost_model=CM, fused=fused)
        try:
            with torch.no_grad():
                logits = off(ids.cuda(), attention_mask=mask.cuda()).logits.float()
            run = G.generate(off, ids, mask, max_new_tokens=8, ignore_eos=True)
            got[fused] = dict(logits=logits, ids=run.sequences, stats=off.stats.to_dict(), info=off.to_dict())
        finally:
            off.restore()
    on, off_ = got[True], got[False]
    assert on["info"]["fused"] == {"norms": 5, "norms_kept": 0, "expert_layers": 2}
    assert off_["info"]["fused"] == {"norms": 0, "norms_kept": 0, "expert_layers": 0}
    assert on["info"]["graphs"]["model_replays"] > 0  # the fused kernels replayed inside the step's graph
    torch.testing.assert_close(on["logits"], off_["logits"], atol=3e-2, rtol=3e-2)
    assert [s[:len(s) - 7] for s in on["ids"]] == [s[:len(s) - 7] for s in off_["ids"]]  # the first new token
    if on["ids"] == off_["ids"]:  # the same tokens: the same experts, counted on the device alike
        assert on["stats"] == off_["stats"]


@pytest.mark.parametrize("name,says", [("expert_gemv", "needs a CUDA GPU and Triton"),
                                       ("step_split", "needs a CUDA GPU")])
def test_the_benchmarks_refuse_a_machine_without_a_gpu(tmp_path, capsys, name, says):
    from benchmark_scripts import load_benchmark

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        load_benchmark(name).main(["--out", str(tmp_path)])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("fused", [True, False])
def test_a_gemv_that_fails_here_falls_back_to_grouped_mm_with_a_warning(monkeypatch, fused):
    model = build_moe("tiny-mixtral", seed=0)
    off = offload(model, "all", device="cpu", cost_model=CM, fused=fused)
    try:
        mod = off.experts[0]
        hidden = torch.randn(1, model.config.hidden_size)
        index, weights = torch.tensor([[3, 1]]), torch.tensor([[0.6, 0.4]])
        grouped = mod._on_device(hidden, index, weights, "decode")
        monkeypatch.setattr(gemv, "broken", None)
        monkeypatch.setattr(gemv, "usable", lambda device, rows: gemv.broken is None)

        def fails(*a, **kw):
            raise RuntimeError("no compiler for this GPU")

        monkeypatch.setattr(gemv, "expert_gemv", fails)
        monkeypatch.setattr(gemv, "expert_gate_up_act", fails)
        with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
            got = mod._on_device(hidden, index, weights, "decode")
        torch.testing.assert_close(got, grouped)
        assert gemv.broken == "RuntimeError: no compiler for this GPU" and not gemv.usable(hidden.device, 2)
        assert off.stats.activations["decode"][0].sum() == 2 * 2  # the failed pass counted once, by the fallback
    finally:
        off.restore()
