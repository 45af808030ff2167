"""Toy decoder layers for the decode-graph tests: attention is x * scale + bias, the norms and the MoE block are
identities, so a layer's output is (x + x * scale + bias) * 2, and a stand-in static cache."""

from types import SimpleNamespace

from torch import nn


class Attn(nn.Module):
    def forward(self, hidden_states, bias, scale, cache=None, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return hidden_states * scale + bias, None


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm, self.mlp = nn.Identity(), nn.Identity(), nn.Identity()
        self.self_attn = Attn()


def static_cache():
    """What the graphs read of a static KV cache: compileable, no sliding-window layer."""
    return SimpleNamespace(is_compileable=True, layers=[SimpleNamespace(is_sliding=False)])
