"""`python -m toolkit profile`: where the time goes, and whether the GPU, the host, copies or syncs hold it back.

  python -m toolkit profile --model efficientnet-b0 --batch-size 64 [--device cuda] [--trace trace.json] [--json]
  python -m toolkit profile --moe --preset mixtral-8x7b --layers 4 --gpu-experts 8 [--trace moe.json.gz]
"""

from __future__ import annotations

import argparse

from ..errors import ToolkitError
from .common import add_device_argument, nonnegative_int, positive_int, print_json

_DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="torch.profiler view and verdict: GPU-, host-, copy- or sync-bound",
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="benchmark model, e.g. efficientnet-b0, resnet-50, gpt2, tiny-resnet")
    what.add_argument("--moe", action="store_true", help="one decode step of the offloaded MoE engine")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size (sequences for --moe); default 1")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="default float32 for --model, the preset's dtype for --moe")
    p.add_argument("--host-input", action="store_true",
                   help="--model: keep the input on the host and copy it to the device in every call")
    p.add_argument("--preset", default="tiny-mixtral", help="--moe: MoE preset (default tiny-mixtral)")
    p.add_argument("--gpu-experts", type=nonnegative_int, default=None,
                   help="--moe: experts resident on the GPU, over all layers (required with --moe)")
    p.add_argument("--layers", type=positive_int, default=None, help="--moe: use only the first N layers")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="--moe: tokens in the KV cache (default 16)")
    add_device_argument(p)
    p.add_argument("--wait", type=nonnegative_int, default=1, help="steps skipped before profiling (default 1)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="profiled steps thrown away (default 2)")
    p.add_argument("--active", type=positive_int, default=3, help="profiled steps kept (default 3)")
    p.add_argument("--record-shapes", action="store_true", help="group the operator table by input shapes")
    p.add_argument("--memory", action="store_true", help="record memory allocations per operator")
    p.add_argument("--stack", action="store_true", help="record Python stacks (bigger traces)")
    p.add_argument("--trace", metavar="PATH", help="write the Chrome trace here (.json or .json.gz; open in Perfetto)")
    p.add_argument("--tensorboard", metavar="DIR", help="also write a TensorBoard profiler trace into DIR")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the measure_latency run that gives the profiler's overhead")
    p.add_argument("--top", type=positive_int, default=10, help="operators to show (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=run)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def model_step(name: str, batch_size: int, device: str, dtype=None, host_input: bool = False):
    """fn, args and label for one forward pass of a benchmark model (input copied in each call if host_input)."""
    import torch

    from ..models import build_model

    bench = build_model(name, device=device, dtype=dtype or torch.float32)
    inputs = bench.make_input(batch_size, device="cpu" if host_input else None)
    label = f"{name} batch {batch_size}" + (" (host input)" if host_input else "")
    if not host_input:
        return bench, inputs, label

    def step(*xs):
        return bench(*(x.to(device) for x in xs))

    return step, inputs, label


def moe_step(preset: str, gpu_experts: int, device: str, layers: int | None = None, batch_size: int = 1,
             prompt_len: int = 16, dtype=None, seed: int = 0):
    """fn, args, label and the Offloaded engine for one decode step after a prompt of ``prompt_len`` tokens.

    The KV cache is cropped back to the prompt before each step, so every step decodes the same position.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    from ..moe.offload import offload
    from ..moe.presets import build_moe, from_name

    p = from_name(preset, layers)
    cuda = device.startswith("cuda")
    model = build_moe(p, device=device, dtype=dtype, seed=seed, expert_device="cpu" if cuda else None)
    engine = offload(model, gpu_experts=gpu_experts, device=device)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, p.vocab, (batch_size, prompt_len + 1), generator=g).to(device)  # [B, P+1]
    # the cache argument is `past_key_values` up to transformers ~5.20, `cache` after
    cache_kw = "cache" if "cache" in inspect.signature(engine.model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=engine.model.config)
    with torch.inference_mode():
        engine.set_phase("prefill")
        engine.model(input_ids=ids[:, :prompt_len], use_cache=True, **{cache_kw: cache})
    engine.set_phase("decode")
    engine.reset_stats()
    token = ids[:, prompt_len:]  # [B, 1]

    def step(tok):
        extra = cache.get_seq_length() - prompt_len
        if extra > 0:
            cache.crop(-extra)  # a negative count removes tokens in every transformers 5.x
        return engine.model(input_ids=tok, use_cache=True, **{cache_kw: cache}).logits  # [B, 1, V]

    label = f"{p.name} x{p.layers} layers, {gpu_experts} GPU experts, decode step, batch {batch_size}"
    return step, (token,), label, engine


def run(args) -> int:
    from ..env import resolve_device
    from ..profiling import profile

    if args.moe and args.gpu_experts is None:
        raise ToolkitError("--moe needs --gpu-experts N (experts resident on the GPU, over all layers)")
    if not args.moe and (args.gpu_experts is not None or args.layers is not None):
        raise ToolkitError("--gpu-experts and --layers apply only with --moe")
    device = resolve_device(args.device)
    engine = None
    if args.moe:
        fn, fargs, label, engine = moe_step(args.preset, args.gpu_experts, device, layers=args.layers,
                                            batch_size=args.batch_size, prompt_len=args.prompt_len,
                                            dtype=_dtype(args.dtype))
    else:
        fn, fargs, label = model_step(args.model, args.batch_size, device, _dtype(args.dtype), args.host_input)
    result = profile(fn, *fargs, device=device, wait=args.wait, warmup=args.warmup, active=args.active,
                     record_shapes=args.record_shapes, profile_memory=args.memory, with_stack=args.stack,
                     trace_path=args.trace, tensorboard_dir=args.tensorboard, baseline=not args.no_baseline,
                     label=label)
    overlap = result.overlap() if engine is not None else None
    if args.json:
        d = result.to_dict(top=args.top)
        if overlap is not None:
            d["overlap"] = overlap.to_dict("records")
        print_json(d)
        return 0
    print(f"{label} on {device}")
    print(result.summary(top=args.top))
    if overlap is not None and len(overlap):
        print("\nCPU experts vs GPU activity per layer (totals over the active steps):")
        print(overlap.to_string(index=False, float_format="%.3f"))
    return 0
