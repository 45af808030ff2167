"""`python -m toolkit profile`: where the time goes, and whether the GPU, the host, copies or syncs hold it back.

  python -m toolkit profile --model efficientnet-b0 --batch-size 64 [--device cuda] [--trace trace.json] [--json]
  python -m toolkit profile --moe --preset mixtral-8x7b --layers 4 --gpu-experts 8 [--trace moe.json.gz]
"""

from __future__ import annotations

from ..errors import ToolkitError
from .common import HelpFormatter, add_device_argument, nonnegative_int, positive_int, print_json

_DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="torch.profiler view and verdict: GPU-, host-, copy- or sync-bound",
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    what = p.add_mutually_exclusive_group(required=True)
    from ..models import MODEL_NAMES
    from ..moe.presets import PRESETS

    what.add_argument("--model", help=f"benchmark model: {', '.join(MODEL_NAMES)}")
    what.add_argument("--moe", action="store_true", help="one decode step of the offloaded MoE engine")
    p.add_argument("--batch-size", type=positive_int, default=1, help="batch size (sequences for --moe)")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="default float32 for --model, the preset's dtype for --moe")
    p.add_argument("--host-input", action="store_true",
                   help="--model: keep the input on the host and copy it to the device in every call")
    p.add_argument("--preset", default="tiny-mixtral", help=f"--moe: MoE preset: {', '.join(PRESETS)}")
    p.add_argument("--gpu-experts", type=nonnegative_int, default=None,
                   help="--moe: experts resident on the GPU, over all layers (required with --moe)")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="--moe: use only the first N layers (default: the preset's)")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="--moe: tokens in the KV cache")
    add_device_argument(p)
    p.add_argument("--wait", type=nonnegative_int, default=1, help="steps skipped before profiling")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="profiled steps thrown away")
    p.add_argument("--active", type=positive_int, default=3, help="profiled steps kept")
    p.add_argument("--record-shapes", action="store_true", help="group the operator table by input shapes")
    p.add_argument("--memory", action="store_true", help="record memory allocations per operator")
    p.add_argument("--stack", action="store_true", help="record Python stacks (bigger traces)")
    p.add_argument("--trace", metavar="PATH", help="write the Chrome trace here (.json or .json.gz; open in Perfetto; default: not kept)")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write a TensorBoard profiler trace into DIR (default: none)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the measure_latency run that gives the profiler's overhead")
    p.add_argument("--top", type=positive_int, default=10, help="operators to show")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..env import resolve_device

    if args.moe and args.gpu_experts is None:
        raise ToolkitError("--moe needs --gpu-experts N (experts resident on the GPU, over all layers)")
    if not args.moe and (args.gpu_experts is not None or args.layers is not None):
        raise ToolkitError("--gpu-experts and --layers apply only with --moe")
    from ..results import check_writable

    if args.trace:  # before the model is built and profiled, not after
        check_writable(args.trace, "--trace")
    if args.tensorboard:
        check_writable(args.tensorboard, "--tensorboard", folder=True)
    device = resolve_device(args.device)
    if args.moe:
        return _report(args, device, *_profile_moe(args, device))
    import torch

    from ..models import forward_step

    fn, fargs, label = forward_step(args.model, args.batch_size, device, args.dtype and getattr(torch, args.dtype),
                                    args.host_input)
    return _report(args, device, _profile(args, device, fn, fargs, label), label, None)


def _profile(args, device, fn, fargs, label):

    from ..profiling import profile
    from .common import progress_bar

    active = f"then {args.active} profiled step" + ("s" if args.active != 1 else "")
    bar = progress_bar(total=(0 if args.no_baseline else 1) + args.wait + args.warmup + args.active,
                       desc="profile", unit="step")

    def on_progress(stage: str, done: int, total: int) -> None:  # between steps, never among the recorded ones
        what = {"baseline": "timing without the profiler (measure_latency)", "done": "reading the trace"}
        bar.set_postfix_str(what.get(stage, f"skipped and warm-up steps, {active}"), refresh=False)
        bar.update(done - bar.n)

    try:
        return profile(fn, *fargs, device=device, wait=args.wait, warmup=args.warmup, active=args.active,
                       record_shapes=args.record_shapes, profile_memory=args.memory, with_stack=args.stack,
                       trace_path=args.trace, tensorboard_dir=args.tensorboard, baseline=not args.no_baseline,
                       label=label, on_progress=on_progress)
    finally:
        bar.close()


def _profile_moe(args, device):
    """One decode step of the offloaded engine, built and offloaded as every MoE run is (``toolkit.moe.run``)."""
    from ..moe.run import MoESession, MoESettings

    settings = MoESettings(preset=args.preset, layers=args.layers, gpu_experts=args.gpu_experts,
                           batch_size=args.batch_size, prompt_tokens=args.prompt_len, dtype=args.dtype, device=device)
    with MoESession(settings) as session, session.offload() as engine:
        fn, fargs, label = session.decode_step(engine)
        result = _profile(args, device, fn, fargs, label)
    return result, label, result.overlap()


def _report(args, device, result, label, overlap) -> int:
    if args.json:
        d = result.to_dict(top=args.top)
        if overlap is not None:
            d["overlap"] = overlap.to_dict("records")
        print_json(d)
        return 0
    print(f"{label} on {device}")
    print(result.summary(top=args.top))
    if overlap is not None and len(overlap) and device.startswith("cuda"):  # no GPU: nothing to overlap with
        print("\nCPU experts vs GPU activity per layer (totals over the active steps):")
        print(overlap.to_string(index=False, float_format="%.3f"))
    return 0
