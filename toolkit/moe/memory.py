"""The GPU memory planner: how many experts fit, from measured free memory, not a magic factor.

Fiddler budgets ``total memory x 0.95`` for experts. Here the budget is what
is free now (``torch.cuda.mem_get_info``; on the CPU, psutil's available
memory so the logic is testable) minus what the chosen generation needs:

- the KV cache: 2 (K, V) x layers x KV heads x head dim x bytes for
  (prompt + new tokens) x batch x beams sequences;
- the activation and logits peak of the dense part, measured by a dry run of
  a prefill with the experts stubbed out (on the CPU: an estimate), plus the
  MoE layer's own working set for the prompt's tokens;
- the copy engine's staging buffers (``copy_slots`` experts);
- a stated safety margin (default 1 GiB + 2% of device memory: allocator
  fragmentation, CUDA libraries' workspaces).

Plan before ``offload()``, with the dense part already on the device and the
experts in host memory, so "free" is what the experts can have.

Several GPUs of one host: ``plan_devices`` gives one plan per device (the
dense part, KV cache and staging only on the first) and ``split_budget``
splits an expert count over them, evenly, each share capped by its plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ToolkitError
from .presets import is_experts_module, moe_blocks

GiB = 2**30


def default_safety_bytes(total_bytes: int) -> int:
    """1 GiB + 2% of the device's memory."""
    return int(GiB + 0.02 * total_bytes)


def kv_cache_bytes(config, tokens: int, sequences: int, dtype: torch.dtype) -> int:
    """KV cache of ``sequences`` sequences of ``tokens`` tokens (all decoder layers)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return int(per_token * tokens * sequences)


def _moe_work_bytes(tokens: int, hidden: int, intermediate: int, top_k: int, elsize: int) -> int:
    """The MoE layer's working set for ``tokens`` tokens: one expert's rows (x, gate_up, act, out) + routing + output."""
    rows = tokens  # an expert may get every token in the worst case
    per_expert = rows * (hidden + 3 * intermediate + hidden) * elsize
    routing = tokens * top_k * 8 * 4  # index, order, weights, tokens (int64 / float32)
    return int(per_expert + routing + 2 * tokens * hidden * elsize)


def _estimate_dense_bytes(config, tokens: int, sequences: int, elsize: int) -> int:
    """CPU stand-in for the dry run: logits (float32) + attention scores + a few hidden-sized buffers."""
    logits = sequences * tokens * config.vocab_size * 4
    scores = sequences * config.num_attention_heads * tokens * tokens * 4
    hidden = 8 * sequences * tokens * config.hidden_size * elsize
    return int(logits + scores + hidden)


class _ZeroExperts(nn.Module):
    """Stand-in for the experts during the dry run (their memory is planned separately)."""

    def forward(self, hidden, top_k_index, top_k_weights):
        return torch.zeros_like(hidden)


@torch.no_grad()
def dry_run_peak_bytes(model, tokens: int, sequences: int, device) -> int:
    """Peak extra GPU memory of one prefill forward (no cache) with the experts stubbed out."""
    blocks = moe_blocks(model)
    saved = [b.experts for b in blocks]
    try:
        for b in blocks:
            b.experts = _ZeroExperts()
        ids = torch.full((sequences, tokens), 3, dtype=torch.long, device=device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = model(input_ids=ids, use_cache=False)
        del out
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    finally:
        for b, e in zip(blocks, saved):
            b.experts = e


@dataclass
class MemoryPlan:
    """Where the device's free memory goes, and the largest expert budget that fits."""

    device: str
    free_bytes: int
    total_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    staging_bytes: int
    safety_bytes: int
    expert_bytes: int  # one expert's weights
    total_experts: int  # layers x experts
    activation_source: str = "dry run"  # or "estimate"
    requested: int | None = None
    workload: dict = field(default_factory=dict)

    @property
    def expert_budget_bytes(self) -> int:
        return self.free_bytes - self.kv_cache_bytes - self.activation_bytes - self.staging_bytes - self.safety_bytes

    @property
    def max_gpu_experts(self) -> int:
        """Largest number of GPU-resident experts that fits (0 .. total_experts)."""
        return int(min(self.total_experts, max(0, self.expert_budget_bytes // max(self.expert_bytes, 1))))

    def fits(self, gpu_experts: int) -> bool:
        return 0 <= gpu_experts <= self.max_gpu_experts

    def check(self, gpu_experts: int) -> None:
        """Raise a ToolkitError with the numbers if ``gpu_experts`` do not fit."""
        if gpu_experts > self.total_experts:
            raise ToolkitError(f"gpu_experts={gpu_experts} but the model has only {self.total_experts} experts")
        if not self.fits(gpu_experts):
            raise ToolkitError(
                f"{gpu_experts} GPU experts need {gpu_experts * self.expert_bytes / GiB:.2f} GiB but only "
                f"{max(self.expert_budget_bytes, 0) / GiB:.2f} GiB are left for experts on {self.device} "
                f"(free {self.free_bytes / GiB:.2f} - KV cache {self.kv_cache_bytes / GiB:.2f} - activations "
                f"{self.activation_bytes / GiB:.2f} - staging {self.staging_bytes / GiB:.2f} - safety "
                f"{self.safety_bytes / GiB:.2f} GiB): at most {self.max_gpu_experts} fit")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(expert_budget_bytes=self.expert_budget_bytes, max_gpu_experts=self.max_gpu_experts)
        return d

    def __str__(self) -> str:
        w = self.workload
        rows = [
            (f"free now on {self.device}", self.free_bytes, f"of {self.total_bytes / GiB:.2f} GiB"),
            ("- KV cache", self.kv_cache_bytes,
             f"{w.get('tokens', '?')} tokens x {w.get('sequences', '?')} sequences" if w else ""),
            (f"- activations ({self.activation_source})", self.activation_bytes, ""),
            ("- copy staging", self.staging_bytes, f"{w.get('copy_slots', '?')} slots" if w else ""),
            ("- safety margin", self.safety_bytes, ""),
            ("= for experts", self.expert_budget_bytes,
             f"{self.max_gpu_experts} of {self.total_experts} experts fit ({self.expert_bytes / 2**20:.1f} MiB each)"),
        ]
        lines = ["memory plan"] + [f"  {name:<28} {b / GiB:9.3f} GiB  {note}".rstrip() for name, b, note in rows]
        if self.requested is not None:
            lines.append(f"  requested {self.requested} GPU experts: {'fits' if self.fits(self.requested) else 'DOES NOT FIT'}")
        return "\n".join(lines)


def host_memory_needed(preset, device: str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Bytes a preset's model takes when built (``build_moe`` as ``MoESession`` calls it), per memory.

    ``{"host": ..., "gpu": ..., "experts": ..., "dense": ...}``: on a CPU the
    whole model is in host memory; with a CUDA device the experts are in
    pinned host memory (which cannot be swapped out) and the dense part on
    the GPU. Counted from the preset, before anything is allocated.
    """
    from .presets import from_name, parameter_counts

    preset = from_name(preset)
    dense, experts = parameter_counts(preset)
    elsize = torch.empty((), dtype=dtype or preset.dtype).element_size()
    dense_b, experts_b = dense * elsize, experts * elsize
    cuda = str(device).startswith("cuda")
    return {"host": experts_b if cuda else experts_b + dense_b, "gpu": dense_b if cuda else 0,
            "experts": experts_b, "dense": dense_b}


def check_host_memory(preset, device: str = "cpu", dtype: torch.dtype | None = None,
                      available: int | None = None) -> dict:
    """A ToolkitError with the numbers when a preset's model would not fit in host memory; else its needs.

    ``available`` (bytes, tests): default psutil's available memory. Checked
    before building, because a model larger than memory does not fail
    cleanly: the process swaps or is killed by the OS, long after it started.
    """
    from .presets import from_name

    preset = from_name(preset)
    need = host_memory_needed(preset, device, dtype)
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    where = "pinned host memory for the experts" if str(device).startswith("cuda") else "host memory"
    if need["host"] > available:
        raise ToolkitError(
            f"{preset.name} with {preset.layers} layers needs {need['host'] / GiB:.1f} GiB of {where} "
            f"(experts {need['experts'] / GiB:.1f} GiB, dense part {need['dense'] / GiB:.1f} GiB) but "
            f"{available / GiB:.1f} GiB is available: use fewer layers (--layers)")
    return need


def _mem_info(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def plan_memory(model, prompt_tokens: int, new_tokens: int, batch: int = 1, beams: int = 1, device: str = "cuda",
                copy_slots: int = 2, safety_bytes: int | None = None, gpu_experts: int | None = None,
                dry_run: bool = True, mem_info=None) -> MemoryPlan:
    """The memory plan for generating ``new_tokens`` after ``prompt_tokens`` with ``batch`` x ``beams`` sequences.

    ``mem_info``: a callable -> (free, total) bytes (tests); default
    ``torch.cuda.mem_get_info`` on CUDA, psutil on the CPU. With
    ``gpu_experts`` the plan is checked: too many -> ToolkitError with the numbers.
    """
    from ..env import resolve_device

    for name, v in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("batch", batch), ("beams", beams)):
        if int(v) < (0 if name == "new_tokens" else 1):
            raise ToolkitError(f"{name} must be >= {0 if name == 'new_tokens' else 1}, got {v}")
    device = torch.device(resolve_device(device))
    blocks = moe_blocks(model)
    if not blocks:
        raise ToolkitError(f"{type(model).__name__} has no MoE blocks")
    exp = blocks[0].experts
    if is_experts_module(exp):
        gu, dn = exp.gate_up_proj, exp.down_proj
    else:  # already offloaded
        gu, dn = exp.host_gate_up, exp.host_down
    n_experts, two_i, hidden = gu.shape
    expert_bytes = (gu[0].numel() + dn[0].numel()) * gu.element_size()
    config = model.config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    elsize = torch.empty((), dtype=dtype).element_size()
    sequences = int(batch) * int(beams)
    tokens = int(prompt_tokens) + int(new_tokens)

    kv = kv_cache_bytes(config, tokens, sequences, dtype)
    work = _moe_work_bytes(sequences * int(prompt_tokens), hidden, two_i // 2, getattr(config, "num_experts_per_tok", 2),
                           elsize)
    if device.type == "cuda" and dry_run:
        act, source = dry_run_peak_bytes(model, int(prompt_tokens), sequences, device) + work, "dry run"
    else:
        act, source = _estimate_dense_bytes(config, int(prompt_tokens), sequences, elsize) + work, "estimate"
    free, total = (mem_info or (lambda: _mem_info(device)))()
    plan = MemoryPlan(
        device=str(device), free_bytes=int(free), total_bytes=int(total), kv_cache_bytes=kv, activation_bytes=int(act),
        staging_bytes=int(copy_slots) * expert_bytes,
        safety_bytes=default_safety_bytes(total) if safety_bytes is None else int(safety_bytes),
        expert_bytes=expert_bytes, total_experts=len(blocks) * n_experts, activation_source=source,
        requested=gpu_experts,
        workload={"prompt_tokens": int(prompt_tokens), "new_tokens": int(new_tokens), "batch": int(batch),
                  "beams": int(beams), "tokens": tokens, "sequences": sequences, "copy_slots": int(copy_slots)},
    )
    if gpu_experts is not None:
        plan.check(int(gpu_experts))
    return plan


# -- several devices ------------------------------------------------------------------------------------

def plan_devices(model, prompt_tokens: int, new_tokens: int, devices, batch: int = 1, beams: int = 1,
                 copy_slots: int = 2, safety_bytes: int | None = None, dry_run: bool = True,
                 mem_info=None) -> list[MemoryPlan]:
    """One ``MemoryPlan`` per device of a multi-device placement, in ``devices`` order.

    The first device holds the dense part, the KV cache and the copy staging
    slots: its plan is ``plan_memory``'s. The others hold resident experts
    only; what they need besides is the MoE working set of the rows sent to
    them (the prompt's tokens in the worst case) and the safety margin.
    ``mem_info(device) -> (free, total)`` bytes stands in for the devices in
    tests. ``[plan.max_gpu_experts for plan in plans]`` caps each device's share.
    """
    from ..env import resolve_device

    devices = [str(d) for d in devices]
    if not devices:
        raise ToolkitError("devices must name at least one device")
    first = plan_memory(model, prompt_tokens, new_tokens, batch=batch, beams=beams, device=devices[0],
                        copy_slots=copy_slots, safety_bytes=safety_bytes, dry_run=dry_run,
                        mem_info=None if mem_info is None else (lambda: mem_info(devices[0])))
    plans = [first]
    blocks = moe_blocks(model)
    exp = blocks[0].experts
    gu = exp.gate_up_proj if is_experts_module(exp) else exp.host_gate_up
    _, two_i, hidden = gu.shape
    work = _moe_work_bytes(int(batch) * int(beams) * int(prompt_tokens), hidden, two_i // 2,
                           getattr(model.config, "num_experts_per_tok", 2), gu.element_size())
    for name in devices[1:]:
        dev = torch.device(resolve_device(name))
        free, total = mem_info(name) if mem_info is not None else _mem_info(dev)
        plans.append(dataclasses.replace(
            first, device=str(dev), free_bytes=int(free), total_bytes=int(total), kv_cache_bytes=0,
            activation_bytes=int(work), activation_source="estimate", staging_bytes=0,
            safety_bytes=default_safety_bytes(total) if safety_bytes is None else int(safety_bytes),
            requested=None, workload={**first.workload, "copy_slots": 0}))
    return plans


def split_budget(gpu_experts: int, caps) -> list[int]:
    """``gpu_experts`` split over devices: evenly, each share capped by ``caps`` (max experts per device).

    The even split gives the remainder to the later devices (the first also
    holds the dense part and the KV cache); what a capped device cannot take
    goes to the devices with room, in order. More than ``sum(caps)`` -> ToolkitError.
    """
    caps = [max(0, int(c)) for c in caps]
    total, n = int(gpu_experts), len(caps)
    if n == 0:
        raise ToolkitError("devices must name at least one device")
    if total < 0:
        raise ToolkitError(f"gpu_experts must be >= 0, got {total}")
    if total > sum(caps):
        raise ToolkitError(f"{total} GPU experts do not fit on {n} devices: at most {caps} per device "
                           f"({sum(caps)} in all)")
    per, extra = divmod(total, n)
    shares = [min(c, per + (i >= n - extra)) for i, c in enumerate(caps)]
    left = total - sum(shares)
    for i, c in enumerate(caps):
        more = min(left, c - shares[i])
        shares[i] += more
        left -= more
    return shares
