import time

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe.presets import PRESETS, build_moe, from_name, is_experts_module, make_config, moe_blocks

TINY = ["tiny-mixtral", "tiny-olmoe", "tiny-qwen3-moe"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_build_and_run(name):
    p = PRESETS[name]
    model = build_moe(name)
    blocks = moe_blocks(model)
    assert len(blocks) == p.layers
    exp = blocks[0].experts
    assert is_experts_module(exp)
    assert tuple(exp.gate_up_proj.shape) == (p.experts, 2 * p.intermediate, p.hidden)
    assert tuple(exp.down_proj.shape) == (p.experts, p.hidden, p.intermediate)
    logits = model(torch.randint(3, p.vocab, (2, 7))).logits
    assert logits.shape == (2, 7, p.vocab)
    assert torch.isfinite(logits).all()
    assert not model.training and not any(q.requires_grad for q in model.parameters())


def test_mixtral_8x7b_has_the_real_dimensions():
    p = from_name("mixtral-8x7b")
    cfg = make_config(p)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (4096, 14336, 32, 8)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size, cfg.num_hidden_layers) == (8, 2, 32000, 32)
    assert p.dtype == torch.bfloat16
    assert p.expert_bytes() == 3 * 4096 * 14336 * 2  # ~352 MB, as in the device ceilings
    assert from_name("mixtral-8x7b", layers=4).layers == 4
    assert make_config(from_name("mixtral-8x7b", layers=4)).num_hidden_layers == 4


def test_unknown_preset_and_bad_layers_raise():
    with pytest.raises(ToolkitError, match="unknown MoE preset 'nope'.*tiny-mixtral"):
        from_name("nope")
    with pytest.raises(ToolkitError, match="layers must be >= 1"):
        build_moe("tiny-mixtral", layers=0)


def test_seed_makes_weights_reproducible():
    a, b, c = build_moe("tiny-mixtral", seed=1), build_moe("tiny-mixtral", seed=1), build_moe("tiny-mixtral", seed=2)
    ea, eb, ec = (moe_blocks(m)[0].experts.gate_up_proj for m in (a, b, c))
    assert torch.equal(ea, eb) and not torch.equal(ea, ec)


def test_rotary_buffers_are_real_and_norms_are_one():
    model = build_moe("tiny-mixtral")
    assert not any(b.is_meta for b in model.buffers())
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_activations_stay_finite_in_bf16_over_many_layers():
    model = build_moe("tiny-mixtral", layers=12, dtype=torch.bfloat16)
    out = model(torch.randint(3, 256, (1, 16)), output_hidden_states=True)
    last = out.hidden_states[-1].float()
    assert torch.isfinite(out.logits).all()
    assert last.abs().max() < 100  # the scaled init keeps the residual stream O(1)


def test_structural_detection_of_fused_experts():
    class Fake(torch.nn.Module):
        def __init__(self, transposed=False):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 6, 8))
            self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 3))
            self.is_transposed = transposed

    assert is_experts_module(Fake())
    assert not is_experts_module(Fake(transposed=True))
    assert not is_experts_module(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_experts_built_into_pinned_memory_fast():
    t0 = time.perf_counter()
    model = build_moe("mixtral-8x7b", layers=8, device="cuda", expert_device="cpu")
    took = time.perf_counter() - t0
    exp = moe_blocks(model)[0].experts
    assert exp.gate_up_proj.device.type == "cpu" and exp.gate_up_proj.is_pinned()
    assert model.model.embed_tokens.weight.is_cuda
    assert took < 60, f"building 8 layers took {took:.1f} s"


def test_qwen3_30b_a3b_has_the_real_dimensions():
    from toolkit.moe.presets import parameter_counts

    p = from_name("qwen3-30b-a3b")
    cfg = make_config(p)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.head_dim, cfg.num_attention_heads) == (2048, 768, 128, 32)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers, cfg.vocab_size) == (128, 8, 48, 151936)
    assert cfg.norm_topk_prob and cfg.num_key_value_heads == 4
    dense, experts = parameter_counts(p)
    assert round((dense + experts) / 1e9, 1) == 30.5  # the model card's 30.5B
    assert p.expert_bytes() == 3 * 2048 * 768 * 2
