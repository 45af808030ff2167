"""Benchmark models built from transformers configs with random weights (never downloaded).

Latency does not depend on the weights' values, only on shapes, dtype and
(on CPU) on not hitting denormals, so a model built from its config is as good
as the pretrained one for timing. ``build_model(name)`` returns a ``BenchModel``:
the module in eval mode plus an input factory for a batch size.

Names: ``efficientnet-b0`` (the seed's example, 224x224), ``resnet-50``,
``gpt2`` (124M, 128 tokens per sequence) and ``tiny-*`` variants whose CPU
forward takes a few milliseconds, for tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ToolkitError


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model: a transformers class, its config and its input."""

    kind: str  # transformers family: "efficientnet", "resnet" (pixel_values [B, C, H, W]) or "gpt2" (input_ids [B, S])
    config: dict
    image_size: int = 224
    seq_len: int = 128


# b0: width 1.0, depth 1.0, 224x224, head 1280 (the google/efficientnet-b0 config)
_EFFNET_B0 = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280,
                  dropout_rate=0.2, num_labels=1000)

SPECS: dict[str, ModelSpec] = {
    "efficientnet-b0": ModelSpec("efficientnet", _EFFNET_B0, image_size=224),
    "resnet-50": ModelSpec("resnet", dict(num_labels=1000), image_size=224),  # ResNetConfig defaults = resnet-50
    "gpt2": ModelSpec("gpt2", dict(), seq_len=128),  # GPT2Config defaults = gpt2 (124M)
    "tiny-efficientnet": ModelSpec(
        "efficientnet",
        # hidden_dim must equal round_filters(1280 * width) = 320
        dict(width_coefficient=0.25, depth_coefficient=0.25, image_size=32, hidden_dim=320, num_labels=10,
             in_channels=(32, 16, 24), out_channels=(16, 24, 40), kernel_sizes=(3, 3, 5), strides=(1, 2, 2),
             num_block_repeats=(1, 1, 1), expand_ratios=(1, 6, 6)),
        image_size=32,
    ),
    "tiny-resnet": ModelSpec(
        "resnet", dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                       num_labels=10),
        image_size=32,
    ),
    "tiny-gpt2": ModelSpec("gpt2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                                       bos_token_id=0, eos_token_id=0), seq_len=16),
}

MODEL_NAMES: tuple[str, ...] = tuple(SPECS)


@dataclass
class BenchModel:
    """A model ready to time: ``module`` in eval mode on ``device``/``dtype``, plus its input factory."""

    name: str
    module: torch.nn.Module
    device: str
    dtype: torch.dtype
    spec: ModelSpec = field(repr=False)

    def make_input(self, batch_size: int, device: str | torch.device | None = None, seed: int = 0) -> tuple:
        """Random inputs for ``batch_size`` (on the model's device unless ``device`` is given)."""
        if int(batch_size) < 1:
            raise ToolkitError(f"batch size must be >= 1, got {batch_size}")
        device = self.device if device is None else device
        g = torch.Generator().manual_seed(seed)  # CPU generator: same input on every device
        if self.spec.kind == "gpt2":
            vocab = self.module.config.vocab_size
            ids = torch.randint(0, vocab, (batch_size, self.spec.seq_len), generator=g)  # [B, S]
            return (ids.to(device),)
        s = self.spec.image_size
        x = torch.randn(batch_size, 3, s, s, generator=g)  # [B, C, H, W]
        return (x.to(device=device, dtype=self.dtype),)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The forward pass; returns the logits."""
        if self.spec.kind == "gpt2":
            return self.module(input_ids=inputs[0], use_cache=False).logits  # [B, S, V]
        return self.module(pixel_values=inputs[0]).logits  # [B, classes]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def _no_init_weights():
    """transformers' context that skips its (slow, pointless here) default init pass."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _model_class_and_config(spec: ModelSpec) -> tuple[Callable, object]:
    import transformers as tf

    if spec.kind == "efficientnet":
        return tf.EfficientNetForImageClassification, tf.EfficientNetConfig(**spec.config)
    if spec.kind == "resnet":
        return tf.ResNetForImageClassification, tf.ResNetConfig(**spec.config)
    if spec.kind == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(**spec.config)
    raise AssertionError(spec.kind)


@torch.no_grad()
def _calibrate_batchnorm(bench: BenchModel) -> None:
    """Set BatchNorm running stats from one random batch, so eval-mode activations stay O(1).

    With random convolutions and the default stats (mean 0, var 1) activations in
    EfficientNet shrink ~4x per block (swish, squeeze-excite gates) and reach CPU
    denormals, which are 10-100x slower: the timing would measure the init, not the model.
    """
    bns = [m for m in bench.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the stats exactly
    bench.module.train()
    bench(*bench.make_input(2, device="cpu", seed=12345))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    bench.module.eval()


@torch.no_grad()
def _init_random(module: torch.nn.Module, seed: int) -> None:
    """Normal weights with std 1/sqrt(fan_in) (activations stay O(1): no denormals on CPU); norms at 1/0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    seen: set[int] = set()  # tied parameters (GPT-2's embedding = LM head) are initialized once
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() >= 2:
                # Linear/Conv [out, in(/groups), ...], Embedding [V, D]; transformers' Conv1D (GPT-2) is [in, out]
                fan_in = p.shape[0] if type(mod).__name__ == "Conv1D" else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            elif name == "weight":
                p.fill_(1.0)  # norm scales
            else:
                p.zero_()  # biases, norm shifts


def build_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> BenchModel:
    """Build a registered benchmark model with random weights, in eval mode, on ``device`` in ``dtype``."""
    spec = SPECS.get(name)
    if spec is None:
        raise ToolkitError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    cls, config = _model_class_and_config(spec)
    with _no_init_weights():
        module = cls(config)
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # GPT-2 shares the embedding with the LM head
    _init_random(module, seed)
    bench = BenchModel(name=name, module=module.float(), device="cpu", dtype=torch.float32, spec=spec)
    _calibrate_batchnorm(bench)  # on CPU in float32, before the move: same weights on every device
    bench.module = module.to(device=device, dtype=dtype).eval()
    bench.device, bench.dtype = str(device), dtype
    return bench


def forward_step(name: str, batch_size: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 host_input: bool = False) -> tuple[Callable, tuple, str]:
    """(fn, args, label) for one forward pass of a benchmark model at ``batch_size``: what a profiler or timer calls.

    ``fn(*args)`` runs the model (float32 unless ``dtype``). With ``host_input``
    the input stays in host memory and every call copies it to ``device``
    first, as a data loader without pinned, prefetched batches does: the copy
    is then part of the step, which a profile should show.
    """
    bench = build_model(name, device=device, dtype=dtype or torch.float32)
    inputs = bench.make_input(batch_size, device="cpu" if host_input else None)
    label = f"{name} batch {batch_size}" + (" (host input)" if host_input else "")
    if not host_input:
        return bench, inputs, label

    def step(*xs):
        return bench(*(x.to(device) for x in xs))

    return step, inputs, label
