"""The float32 reference (``toolkit.moe.exact``) and the logits check measured against it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from toolkit.moe.exact import in_float32
from toolkit.moe.presets import build_moe
from toolkit.moe.run import MoESession, check_word, logits_check


@pytest.fixture(scope="module")
def bf16_model():
    return build_moe("tiny-mixtral", dtype=torch.bfloat16, seed=3)


def ids():
    return torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def test_in_float32_computes_what_a_float32_copy_computes(bf16_model):
    m = bf16_model
    upcast = copy.deepcopy(m).float()
    upcast.config._experts_implementation = "eager"
    with torch.no_grad():
        low = m(ids()).logits
        with in_float32(m) as same:
            assert same is m
            got = m(ids()).logits
        want = upcast(ids()).logits
    assert low.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - low.float()).abs().max() > 0  # the bf16 forward's roundings are gone


def test_in_float32_leaves_the_model_as_it_was(bf16_model):
    m = bf16_model
    before = {n: p for n, p in m.named_parameters()}
    impl = m.config._experts_implementation
    with torch.no_grad(), in_float32(m):
        m(ids())
    assert {n: p for n, p in m.named_parameters()} == before  # the very same tensors, bf16
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.config._experts_implementation == impl
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert not any(hasattr(mod, "_toolkit_float32_saved") for mod in m.modules())


def test_in_float32_restores_the_weights_when_a_forward_raises(bf16_model):
    m = bf16_model
    o_proj = m.model.layers[0].self_attn.o_proj
    before = dict(o_proj._parameters)

    def boom(module, args):
        assert module.weight.dtype == torch.float32  # upcast by the hook registered before this one
        raise RuntimeError("stop inside the layer")

    with pytest.raises(RuntimeError, match="stop inside"), torch.no_grad(), in_float32(m):
        handle = o_proj.register_forward_pre_hook(boom)
        try:
            m(ids())
        finally:
            handle.remove()
    assert o_proj._parameters == before
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_logits_check_against_float32_says_whether_a_run_is_as_close_as_its_reference():
    exact = (torch.tensor([[4.0, -2.0]]), torch.tensor([[1.0, 3.0]]))
    ref = (exact[0] + torch.tensor([[0.04, 0.0]]), exact[1])  # 0.01 of the largest logit from float32
    near = (exact[0] - torch.tensor([[0.05, 0.0]]), exact[1])  # 0.09 from ref, 0.05 from float32
    far = (exact[0] - torch.tensor([[0.08, 0.0]]), exact[1])

    plain = logits_check(near, ref, 0.02)
    assert "exact" not in plain and not plain["pass"] and check_word(plain) == "FAIL"
    c = logits_check(near, ref, 0.02, exact=exact)
    x = c["exact"]
    assert not c["pass"]  # the check against the reference is unchanged
    assert x["max_abs_diff"] == pytest.approx(0.05) and x["reference_max_abs_diff"] == pytest.approx(0.04)
    assert x["rel"] == pytest.approx(0.0125) and x["reference_rel"] == pytest.approx(0.01)
    assert x["ratio"] == pytest.approx(1.25) and x["factor"] == 1.5 and x["pass"]
    assert check_word(c) == "ok32"
    worse = logits_check(far, ref, 0.02, exact=exact)
    assert worse["exact"]["ratio"] == pytest.approx(2.0) and not worse["exact"]["pass"]
    assert check_word(worse) == "FAIL"
    assert check_word(logits_check(ref, ref, 0.02, exact=exact)) == "ok" and check_word(None) == "-"
    same = logits_check(exact, exact, 0.02, exact=exact)["exact"]  # a float32 model: nothing to compare
    assert same["ratio"] == 1.0 and same["pass"]
    assert math.isinf(logits_check(ref, exact, 0.02, exact=exact)["exact"]["ratio"])


def test_session_probe_exact_is_the_unmodified_model_in_float32():
    with MoESession(device="cpu", routing="model", dtype="bfloat16", prompt_tokens=8, new_tokens=2) as session:
        with session.unmodified() as model:
            low = session.probe_logits(model)
            upcast = copy.deepcopy(model).float()
        upcast.config._experts_implementation = "eager"
        exact = session.probe_exact()
        want = session.probe_logits(upcast)
        assert all(p.dtype == torch.bfloat16 for p in session.model.parameters())
    for got, w, lo in zip(exact, want, low):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-5)
        assert (got - lo).abs().max() > 0
    check = logits_check(low, low, 0.02, exact=exact)
    assert check["exact"]["ratio"] == 1.0 and check["exact"]["reference_rel"] > 0


@pytest.mark.gpu
def test_gpu_in_float32_computes_what_a_float32_copy_computes():
    m = build_moe("tiny-mixtral", device="cuda", dtype=torch.bfloat16, seed=3)
    upcast = copy.deepcopy(m).float()
    upcast.config._experts_implementation = "eager"
    x = ids().cuda()
    with torch.no_grad():
        with in_float32(m):
            got = m(x).logits
        want = upcast(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # TF32 off by default: the same float32 sums
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in m.parameters())
