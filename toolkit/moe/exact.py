"""The exact reference: a low-precision model's forward computed in float32, one module's weights at a time.

Why: two bf16 runs of one model differ by their roundings alone (another
kernel, another order of sums), and over tens of layers of a model with
random weights those differences grow to a few percent of the largest logit.
A difference between two bf16 runs cannot say which is further from the
model's true output. The same weights computed in float32 can: the error of
each bf16 run is its distance to that, and an offloaded run is as right as
the unmodified model when its error is no larger than the unmodified model's
own (``toolkit.moe.run.logits_check``).

``in_float32(model)``: inside the block every module that holds low-precision
floating weights upcasts its own ones (not its children's) to float32 when it
is called and puts the originals back when it returns, so at most one
module's weights exist twice (a layer's experts: ~5.6 GB in float32 for
Mixtral-8x7B) and a model that fills the GPU in bf16 can still be computed.
The embedding's output is then float32 and so is everything after it.
transformers' fused experts run their eager loop meanwhile (its grouped GEMMs
take bf16 only on some GPUs), which computes the same sums in any dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LOW = (torch.bfloat16, torch.float16)


def _own_low(module: nn.Module) -> list[tuple[dict, str]]:
    """(the dict, the name) of each parameter and buffer ``module`` itself holds in bf16 or fp16."""
    found = []
    for table in (module._parameters, module._buffers):
        found += [(table, name) for name, t in table.items() if t is not None and t.dtype in LOW]
    return found


@contextlib.contextmanager
def in_float32(model: nn.Module):
    """Compute ``model``'s forward in float32 inside the block; its weights are as before on exit (see the module)."""
    hooks, configs = [], {}

    def upcast(module, args, kwargs=None):
        saved = []
        for table, name in _own_low(module):
            t = table[name]
            saved.append((table, name, t))
            up = t.detach().float()
            table[name] = nn.Parameter(up, requires_grad=False) if isinstance(t, nn.Parameter) else up
        module._toolkit_float32_saved = saved

    def restore(module, args, output):
        for table, name, t in getattr(module, "_toolkit_float32_saved", ()):
            table[name] = t
        module._toolkit_float32_saved = []
        return output

    try:
        for m in model.modules():
            config = getattr(m, "config", None)
            if config is not None and getattr(config, "_experts_implementation", None) not in (None, "eager"):
                configs.setdefault(id(config), (config, config._experts_implementation))
            if _own_low(m):
                hooks += [m.register_forward_pre_hook(upcast), m.register_forward_hook(restore)]
        for config, _ in configs.values():
            config._experts_implementation = "eager"
        yield model
    finally:
        for h in hooks:
            h.remove()
        for config, impl in configs.values():
            config._experts_implementation = impl
        for m in model.modules():  # a forward that raised left its module upcast
            for table, name, t in getattr(m, "_toolkit_float32_saved", ()):
                table[name] = t
            if hasattr(m, "_toolkit_float32_saved"):
                del m._toolkit_float32_saved
