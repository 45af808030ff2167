"""An offloaded model keeps working in and out of inference_mode and no_grad, in any order."""

import itertools

import pytest
import torch

from toolkit.moe.generation import generate
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe
from toolkit.moe.prompts import random_prompts

MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "grad": torch.enable_grad,
}


def _forward(model, ids, mode):
    with MODES[mode]():
        return model(input_ids=ids).logits.detach().float()


def _check_every_order(device: str):
    model = build_moe("tiny-mixtral", layers=2, device=device, dtype=torch.float32)  # unmodified: all on `device`
    ids, mask = random_prompts(model.config.vocab_size, 6, seed=1)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()  # the unmodified model
    for first, second in itertools.permutations(MODES, 2):
        # a fresh engine each time: its reused buffers are made by the first pass, in the first mode
        with offload(model, 2, device=device, cpu_threads=1) as engine:  # 2 of 16 resident: the CPU path runs
            a, b = _forward(model, ids, first), _forward(model, ids, second)
            assert torch.allclose(a, ref, atol=1e-4) and torch.allclose(b, ref, atol=1e-4), (first, second)
            assert engine.stats.cpu_expert_calls > 0
    with offload(model, 2, device=device, cpu_threads=1) as engine:
        with torch.inference_mode():
            generate(engine, ids, mask, max_new_tokens=3, ignore_eos=True)
        assert generate(engine, ids, mask, max_new_tokens=3, ignore_eos=True).new_tokens == 3

def test_offloaded_model_survives_inference_mode_on_cpu():
    _check_every_order("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_offloaded_model_survives_inference_mode_on_gpu():
    _check_every_order("cuda")
