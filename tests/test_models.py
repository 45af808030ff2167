"""Benchmark models: built offline from configs, deterministic, with input factories."""

import socket

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models import MODEL_NAMES, SPECS, _model_class_and_config, build_model

TINY = [n for n in MODEL_NAMES if n.startswith("tiny-")]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model construction tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_registered_names():
    assert MODEL_NAMES == ("efficientnet-b0", "resnet-50", "gpt2", "tiny-efficientnet", "tiny-resnet", "tiny-gpt2")


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_build_offline_and_run(name, no_network):
    m = build_model(name)
    assert not m.module.training and m.device == "cpu" and m.dtype == torch.float32
    (x,) = m.make_input(3)
    with torch.inference_mode():
        y = m(x)
    assert y.shape[0] == 3 and torch.isfinite(y).all()
    assert y.float().std() > 1e-3  # activations did not collapse (BatchNorm calibration, no denormals)
    assert m.n_params < 200_000


@pytest.mark.parametrize("name", ["efficientnet-b0", "resnet-50", "gpt2"])
def test_full_size_configs_match_the_published_models(name):
    # parameter counts of google/efficientnet-b0, microsoft/resnet-50 (= torchvision) and gpt2; built on meta: no memory
    expected = {"efficientnet-b0": 5_288_548, "resnet-50": 25_557_032, "gpt2": 124_439_808}[name]
    cls, config = _model_class_and_config(SPECS[name])
    with torch.device("meta"):
        module = cls(config)
    assert sum(p.numel() for p in module.parameters()) == expected
    assert SPECS[name].image_size == 224 or SPECS[name].kind == "gpt2"


def test_same_seed_same_weights_and_inputs():
    a, b, c = build_model("tiny-gpt2", seed=0), build_model("tiny-gpt2", seed=0), build_model("tiny-gpt2", seed=1)
    wa, wb, wc = (m.module.transformer.h[0].mlp.c_fc.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.module.lm_head.weight is a.module.transformer.wte.weight  # tied, as in GPT-2
    assert torch.equal(a.make_input(2)[0], b.make_input(2)[0])
    ids = a.make_input(2)[0]
    assert ids.shape == (2, SPECS["tiny-gpt2"].seq_len) and ids.dtype == torch.long


def test_dtype_and_host_inputs():
    m = build_model("tiny-resnet", dtype=torch.bfloat16)
    (x,) = m.make_input(2, device="cpu")
    assert x.dtype == torch.bfloat16 and x.shape == (2, 3, 32, 32)
    assert all(p.dtype == torch.bfloat16 for p in m.module.parameters())


def test_bad_requests_raise_toolkit_error():
    with pytest.raises(ToolkitError, match="unknown model 'nope'; choose one of: efficientnet-b0"):
        build_model("nope")
    with pytest.raises(ToolkitError, match="batch size"):
        build_model("tiny-gpt2").make_input(0)


@pytest.mark.gpu
def test_on_gpu():
    m = build_model("tiny-efficientnet", device="cuda", dtype=torch.float16)
    (x,) = m.make_input(2)
    assert x.is_cuda and x.dtype == torch.float16
    with torch.inference_mode():
        assert m(x).is_cuda
