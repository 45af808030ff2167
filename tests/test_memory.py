"""Memory planner: exact arithmetic with injected free memory, clear errors, a printable breakdown."""

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe.costs import CostModel
from toolkit.moe.memory import GiB, MemoryPlan, default_safety_bytes, kv_cache_bytes, plan_memory
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe, from_name, make_config

MiB = 2**20
EXPERT = 3 * 64 * 128 * 4  # one tiny-mixtral expert, float32


@pytest.fixture(scope="module")
def model():
    return build_moe("tiny-mixtral")


def test_kv_cache_bytes_is_exact():
    cfg = make_config(from_name("tiny-mixtral"))  # 2 layers, 2 KV heads, head dim 64 / 4 = 16
    assert kv_cache_bytes(cfg, tokens=20, sequences=6, dtype=torch.float32) == 2 * 2 * 2 * 16 * 4 * 20 * 6
    big = make_config(from_name("mixtral-8x7b", layers=8))  # 8 layers x 8 KV heads x 128 x bf16 x (K, V)
    assert kv_cache_bytes(big, tokens=80, sequences=4, dtype=torch.bfloat16) == 2 * 8 * 8 * 128 * 2 * 80 * 4


def test_budget_is_free_minus_generation_needs(model):
    plan = plan_memory(model, prompt_tokens=16, new_tokens=8, batch=1, beams=4, device="cpu", copy_slots=2,
                       safety_bytes=MiB, mem_info=lambda: (8 * MiB, GiB))
    assert plan.kv_cache_bytes == 2 * 2 * 2 * 16 * 4 * 24 * 4  # beams multiply the sequences
    assert plan.staging_bytes == 2 * EXPERT and plan.expert_bytes == EXPERT
    assert plan.activation_source == "estimate" and plan.activation_bytes > 0
    left = 8 * MiB - plan.kv_cache_bytes - plan.activation_bytes - 2 * EXPERT - MiB
    assert plan.expert_budget_bytes == left
    assert plan.max_gpu_experts == min(16, left // EXPERT)
    assert plan.workload["sequences"] == 4 and plan.workload["tokens"] == 24


def test_more_experts_than_fit_is_a_clear_error(model):
    probe = plan_memory(model, 16, 8, device="cpu", safety_bytes=0, mem_info=lambda: (GiB, GiB))
    free = probe.kv_cache_bytes + probe.activation_bytes + probe.staging_bytes + int(5.5 * EXPERT)
    plan = plan_memory(model, 16, 8, device="cpu", safety_bytes=0, mem_info=lambda: (free, GiB))
    n = plan.max_gpu_experts
    assert n == 5
    plan.check(n)
    with pytest.raises(ToolkitError, match=rf"{n + 1} GPU experts need .* GiB .*at most {n} fit"):
        plan.check(n + 1)
    with pytest.raises(ToolkitError, match="only 16 experts"):
        plan.check(17)
    with pytest.raises(ToolkitError, match="at most"):
        plan_memory(model, 16, 8, device="cpu", safety_bytes=0, mem_info=lambda: (free, GiB), gpu_experts=n + 1)


def test_nothing_fits_when_memory_is_short(model):
    plan = plan_memory(model, 16, 8, device="cpu", mem_info=lambda: (GiB, 4 * GiB))
    assert plan.safety_bytes == default_safety_bytes(4 * GiB) == int(GiB + 0.02 * 4 * GiB)
    assert plan.expert_budget_bytes < 0 and plan.max_gpu_experts == 0
    assert plan.fits(0) and not plan.fits(1)


def test_breakdown_prints_and_serialises(model):
    plan = plan_memory(model, 16, 8, device="cpu", safety_bytes=0, mem_info=lambda: (64 * MiB, GiB), gpu_experts=3)
    text = str(plan)
    for word in ("free now", "KV cache", "activations (estimate)", "copy staging", "safety margin", "for experts",
                 "16 of 16 experts fit", "requested 3 GPU experts: fits"):
        assert word in text
    d = plan.to_dict()
    assert d["max_gpu_experts"] == 16 and d["requested"] == 3 and d["expert_budget_bytes"] == plan.expert_budget_bytes
    assert MemoryPlan(**{k: v for k, v in d.items() if k not in ("max_gpu_experts", "expert_budget_bytes")}) == plan


def test_real_free_memory_on_cpu_and_after_offload(model):
    plan = plan_memory(model, 4, 4, device="cpu")  # psutil's available memory
    assert plan.free_bytes > 0 and plan.total_bytes >= plan.free_bytes
    off = offload(model, 2, device="cpu", cost_model=CostModel.fixed())
    try:
        assert plan_memory(model, 4, 4, device="cpu").expert_bytes == EXPERT
    finally:
        off.restore()


@pytest.mark.parametrize("kw,match", [({"beams": 0}, "beams"), ({"batch": 0}, "batch"), ({"prompt_tokens": 0}, "prompt"),
                                      ({"new_tokens": -1}, "new_tokens")])
def test_bad_workloads_raise(model, kw, match):
    args = {"prompt_tokens": 4, "new_tokens": 4, **kw}
    with pytest.raises(ToolkitError, match=match):
        plan_memory(model, device="cpu", **args)


def test_model_without_moe_raises():
    with pytest.raises(ToolkitError, match="no MoE blocks"):
        plan_memory(torch.nn.Linear(2, 2), 4, 4, device="cpu")


@pytest.mark.gpu
def test_dry_run_on_cuda_measures_the_dense_peak():
    model = build_moe("mixtral-8x7b", layers=2, device="cuda", expert_device="cpu")
    plan = plan_memory(model, prompt_tokens=64, new_tokens=16, beams=4, device="cuda")
    assert plan.activation_source == "dry run"
    assert plan.activation_bytes > 4 * 64 * 32000 * 2  # at least the logits of the prompt
    assert 0 < plan.max_gpu_experts <= 16
    print(plan)
