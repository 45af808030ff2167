"""MoE model presets with random weights, built from transformers configs (never downloaded).

A preset is a gpt-fast style dataclass; ``build_moe`` turns it into a
transformers model fast: the model is constructed on the ``meta`` device (no
memory, no HF init pass), then each parameter is allocated where it will live
and filled with a small normal init. Expert weights can be placed straight into
pinned host memory (``expert_device="cpu"`` with a CUDA ``device``), generated
one expert at a time on the GPU and copied over, so a few layers of
Mixtral-8x7B build in seconds and never need to fit on the GPU.

Init: std 0.02 for embeddings and the LM head, 1/sqrt(fan_in) for inner
projections, output projections (o_proj, down_proj) further scaled by
1/sqrt(2 layers) (GPT-2 style) so the residual stream stays O(1) in bf16 over
many layers, and a router std of 1/sqrt(D) so router logits have unit spread
(varied routing) at any width.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch

from ..errors import ToolkitError
from . import host_memory


@dataclass(frozen=True)
class MoEPreset:
    """A named MoE architecture; ``family`` picks the transformers model class."""

    name: str
    family: str  # "mixtral" | "olmoe" | "qwen3_moe"
    hidden: int
    intermediate: int  # per-expert intermediate size
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    vocab: int
    max_positions: int = 4096
    dtype: torch.dtype = torch.bfloat16
    extra: dict = field(default_factory=dict)  # family-specific config kwargs

    @property
    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert (gate, up, down)."""
        return 3 * self.hidden * self.intermediate

    def expert_bytes(self, dtype: torch.dtype | None = None) -> int:
        dtype = dtype or self.dtype
        return self.expert_params * torch.empty((), dtype=dtype).element_size()


PRESETS: dict[str, MoEPreset] = {
    p.name: p
    for p in [
        MoEPreset("tiny-mixtral", "mixtral", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                  experts=8, top_k=2, vocab=256, max_positions=512, dtype=torch.float32),
        MoEPreset("mixtral-8x7b", "mixtral", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                  experts=8, top_k=2, vocab=32000, max_positions=32768, extra={"rope_theta": 1e6}),
        MoEPreset("tiny-olmoe", "olmoe", hidden=64, intermediate=32, layers=2, heads=4, kv_heads=4,
                  experts=16, top_k=4, vocab=256, max_positions=512, dtype=torch.float32),
        MoEPreset("olmoe-1b-7b", "olmoe", hidden=2048, intermediate=1024, layers=16, heads=16, kv_heads=16,
                  experts=64, top_k=8, vocab=50304),
        MoEPreset("tiny-qwen3-moe", "qwen3_moe", hidden=64, intermediate=32, layers=2, heads=4, kv_heads=2,
                  experts=16, top_k=4, vocab=256, max_positions=512, dtype=torch.float32),
        MoEPreset("qwen3-30b-a3b", "qwen3_moe", hidden=2048, intermediate=768, layers=48, heads=32, kv_heads=4,
                  experts=128, top_k=8, vocab=151936, max_positions=40960,
                  extra={"rope_theta": 1e6, "head_dim": 128, "norm_topk_prob": True}),
    ]
}


def from_name(name: str, layers: int | None = None) -> MoEPreset:
    """Look up a preset, optionally with fewer (or more) layers; unknown name -> ToolkitError."""
    if isinstance(name, MoEPreset):
        preset = name
    elif name in PRESETS:
        preset = PRESETS[name]
    else:
        raise ToolkitError(f"unknown MoE preset {name!r}; choose one of: {', '.join(PRESETS)}")
    if layers is not None:
        if int(layers) < 1:
            raise ToolkitError(f"layers must be >= 1, got {layers}")
        preset = replace(preset, layers=int(layers))
    return preset


def make_config(preset: MoEPreset):
    """The transformers config of a preset (random-weights model, no download)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": preset.extra.get("rope_theta", 10000.0)}
    common = dict(
        vocab_size=preset.vocab, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.max_positions, num_experts_per_tok=preset.top_k,
        rope_parameters=rope, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    common.update({k: v for k, v in preset.extra.items() if k != "rope_theta"})  # family-specific fields
    if preset.family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=preset.intermediate, num_local_experts=preset.experts,
                                         **common)
    elif preset.family == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=preset.intermediate, num_experts=preset.experts, **common)
    elif preset.family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=preset.intermediate, intermediate_size=preset.intermediate,
                                          num_experts=preset.experts, **common)
    else:
        raise ToolkitError(f"unknown MoE family {preset.family!r}")
    return cfg


def _model_class(family: str):
    import transformers

    return {"mixtral": transformers.MixtralForCausalLM, "olmoe": transformers.OlmoeForCausalLM,
            "qwen3_moe": transformers.Qwen3MoeForCausalLM}[family]


def is_experts_module(module: torch.nn.Module) -> bool:
    """Fused experts module (transformers v5): gate_up_proj [E, 2I, D] and down_proj [E, D, I] parameters.

    Detected structurally, not by class name, so any family with this layout works.
    """
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
            and gu.shape[0] == dn.shape[0] and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_bias", False))


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks (modules with a ``.gate`` router and fused ``.experts``), in layer order."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "experts", None), torch.nn.Module) and hasattr(m, "gate")
            and (is_experts_module(m.experts) or hasattr(m.experts, "n_experts"))]


@contextlib.contextmanager
def _no_hf_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: construction on meta is already free
        yield
        return
    with no_init_weights():
        yield


def _std_for(name: str, shape: torch.Size, preset: MoEPreset) -> float:
    if "embed" in name or "lm_head" in name:
        return 0.02
    if name.endswith("gate.weight") and shape[0] == preset.experts:  # router
        return 1.0 / math.sqrt(preset.hidden)
    fan_in = shape[-1]
    std = 1.0 / math.sqrt(fan_in)
    if "o_proj" in name or "down_proj" in name:
        std /= math.sqrt(2 * preset.layers)
    return std


def _fill_(t: torch.Tensor, std: float, gen_device: torch.device, gen: torch.Generator) -> None:
    """Normal(0, std) into ``t`` one leading slice at a time (bounded temporary memory)."""
    if gen_device == t.device:
        t.normal_(0.0, std, generator=gen)
        return
    chunks = t if t.dim() == 3 else [t]  # experts: one expert at a time
    for c in chunks:
        tmp = torch.empty(c.shape, dtype=c.dtype, device=gen_device).normal_(0.0, std, generator=gen)
        c.copy_(tmp)


_PER_LAYER_PARAMS: dict[str, tuple[int, int, int, int]] = {}


def parameter_counts(preset: str | MoEPreset, layers: int | None = None) -> tuple[int, int]:
    """(dense, experts): parameters of a preset's model, counted without building it (any number of layers).

    Models of 1 and 2 layers are constructed on the ``meta`` device (no memory)
    and the count extrapolated linearly: constructing the real layer count
    would itself take the time and memory a too-large request must not.
    """
    preset = from_name(preset, layers)
    key = repr(replace(preset, name="", layers=1))
    if key not in _PER_LAYER_PARAMS:
        counts = []
        for n in (1, 2):
            with _no_hf_init(), torch.device("meta"):
                model = _model_class(preset.family)(make_config(replace(preset, layers=n)))
            experts = sum(p.numel() for b in moe_blocks(model) for p in b.experts.parameters())
            counts += [sum(p.numel() for p in model.parameters()) - experts, experts]
        _PER_LAYER_PARAMS[key] = tuple(counts)
    d1, e1, d2, e2 = _PER_LAYER_PARAMS[key]
    extra = preset.layers - 1
    return d1 + extra * (d2 - d1), e1 + extra * (e2 - e1)


@torch.no_grad()
def build_moe(preset: str | MoEPreset, layers: int | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
              seed: int = 0, expert_device: str | None = None):
    """A transformers MoE model with random weights, in eval mode.

    ``device`` holds the dense part (attention, norms, embeddings, routers);
    ``expert_device`` holds the experts (default: ``device``). With a CUDA
    ``device`` and ``expert_device="cpu"`` the experts go into pinned host
    memory and the model only runs after ``offload()``.
    """
    preset = from_name(preset, layers)
    dtype = dtype or preset.dtype
    device = torch.device(device)
    expert_device = torch.device(expert_device) if expert_device is not None else device
    if device.type == "cuda" or expert_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ToolkitError("a CUDA device was requested but no GPU is available (use device='cpu')")
    pin = expert_device.type == "cpu" and device.type == "cuda"
    # random numbers are made on the GPU when there is one: ~100x faster than CPU randn
    gen_device = device if device.type == "cuda" else expert_device
    gen = torch.Generator(device=gen_device).manual_seed(seed)

    config = make_config(preset)
    with _no_hf_init(), torch.device("meta"):
        model = _model_class(preset.family)(config)
    expert_param_ids = {id(p) for b in moe_blocks(model) for p in b.experts.parameters()}

    for mod_name, module in model.named_modules():
        for p_name, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            is_expert = id(p) in expert_param_ids
            where = expert_device if is_expert else device
            if pin and is_expert:  # the host tier: page-locked, on huge pages where the OS grants them
                t = host_memory.empty(p.shape, dtype, pin=True)
            else:
                t = torch.empty(p.shape, dtype=dtype, device=where)
            if "norm" in full and p.dim() == 1:
                t.fill_(1.0)
            elif p.dim() == 1:  # biases
                t.zero_()
            else:
                _fill_(t, _std_for(full, p.shape, preset), gen_device, gen)
            module._parameters[p_name] = torch.nn.Parameter(t, requires_grad=False)
        # non-persistent buffers (rotary inv_freq) were computed on meta: rebuild the module for real
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if meta_buffers:
            fresh = type(module)(module.config)
            for n in meta_buffers:
                module._buffers[n] = getattr(fresh, n).to(device)
    model.eval()
    model.requires_grad_(False)
    model.preset = preset
    return model
