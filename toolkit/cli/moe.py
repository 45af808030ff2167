"""`python -m toolkit moe`: generate with an offloaded MoE model and report latency and expert hit rates."""

from __future__ import annotations

import math
import sys

from .common import add_device_argument, nonnegative_int, positive_int, print_json


def gpu_experts_arg(text: str):
    """An expert count, 'all', or 'auto' (as many as the memory planner says fit)."""
    if str(text).lower() in ("all", "auto"):
        return str(text).lower()
    return nonnegative_int(text)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "moe", help="generate with an offloaded MoE model (random weights) and report latency and hit rates",
        description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-mixtral", help="model preset (tiny-mixtral, mixtral-8x7b, ...)")
    p.add_argument("--layers", type=positive_int, default=None, help="override the preset's number of layers")
    p.add_argument("--gpu-experts", type=gpu_experts_arg, default="auto",
                   help="experts resident on the GPU across all layers: a number, 'all', or 'auto' "
                        "(default: as many as fit on a GPU, all on the CPU)")
    p.add_argument("--prompt-tokens", type=positive_int, default=16)
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--beams", type=positive_int, default=1, help="beam search with this many beams")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam argmax")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=nonnegative_int, default=None)
    p.add_argument("--stream", action="store_true",
                   help="print text as it becomes final (also for beam search); to stderr with --json")
    p.add_argument("--allow-eos", action="store_true",
                   help="stop at EOS (default: generate exactly --new-tokens, as benchmarks need)")
    p.add_argument("--policy", default=None, help="static-popularity, static-uniform, lru, lfu, belady")
    p.add_argument("--placement", default=None, help="placement JSON file (which experts are on the GPU)")
    p.add_argument("--trace", default=None, help="replay routing from a trace (name or .npz file)")
    p.add_argument("--calibration", default=None, help="cost model calibration JSON (default: measure once, cached)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for CPU experts")
    p.add_argument("--warmup", type=nonnegative_int, default=2,
                   help="tokens of an untimed warm-up generation first (0: none)")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also save the JSON result (with provenance) to this file")
    p.set_defaults(func=run)


def _requested(args, preset):
    """--gpu-experts as a number, or 'auto'; more than the model has is an error (checked before building)."""
    from ..errors import ToolkitError

    total = preset.layers * preset.experts
    if args.gpu_experts == "all":
        return total
    if args.gpu_experts != "auto" and args.gpu_experts > total:
        raise ToolkitError(f"--gpu-experts {args.gpu_experts} is more than the model has: {preset.layers} layers x "
                           f"{preset.experts} experts = {total}")
    return args.gpu_experts


def _plan(args, model, device, requested):
    """On a GPU: the memory plan (raises if ``requested`` does not fit) and the resolved expert count."""
    from ..moe.memory import plan_memory

    plan = plan_memory(model, args.prompt_tokens, args.new_tokens, batch=args.batch_size, beams=args.beams,
                       device=device, gpu_experts=None if requested == "auto" else requested)
    return plan, (plan.max_gpu_experts if requested == "auto" else requested)


def _load_inputs(args, preset):
    """Everything read from files, checked before the (possibly large) model is built."""
    import numpy as np

    from ..errors import ToolkitError

    cost_model = trace = placement = None
    if args.calibration:
        from ..moe.costs import load_cost_model

        cost_model = load_cost_model(args.calibration)
    if args.trace:
        from ..moe.traces import load_trace

        trace = load_trace(args.trace)
        if trace.n_experts != preset.experts or trace.n_layers < preset.layers:
            raise ToolkitError(f"trace {args.trace!r} routes {trace.n_layers} layers x {trace.n_experts} experts; "
                               f"the model has {preset.layers} x {preset.experts}")
    if args.placement:
        from ..moe.policies import load_placement

        placement = np.asarray(load_placement(args.placement), dtype=bool)
        if placement.shape != (preset.layers, preset.experts):
            raise ToolkitError(f"placement {args.placement} is [{placement.shape[0]}, {placement.shape[1]}] "
                               f"but the model is [{preset.layers}, {preset.experts}] (layers, experts)")
    return cost_model, trace, placement


def run(args) -> int:
    from ..env import resolve_device
    from ..errors import ToolkitError
    from ..moe import generation as G
    from ..moe.presets import build_moe, from_name

    preset = from_name(args.preset, args.layers)
    device = resolve_device(args.device)
    if args.stream and args.batch_size != 1:
        raise ToolkitError("--stream prints one sequence: use --batch-size 1")
    if args.temperature is not None and args.temperature <= 0:
        raise ToolkitError(f"--temperature must be > 0, got {args.temperature}")
    cost_model, trace, placement = _load_inputs(args, preset)
    n_gpu = _requested(args, preset)
    if placement is not None and args.gpu_experts in ("auto", "all"):
        n_gpu = int(placement.sum())

    policy = None
    if args.policy:
        from ..moe.policies import get_policy

        policy = get_policy(args.policy, trace=trace, popularity=None if trace is None else trace.popularity())
    routing = None
    if trace is not None:
        from ..moe.traces import TraceRouter

        routing = TraceRouter(trace, batch_size=args.batch_size * args.beams)

    from ..moe.offload import offload

    cuda = device.startswith("cuda")
    # on a GPU the experts go straight to pinned host memory; offload() moves the resident ones over
    model = build_moe(preset, device=device, expert_device="cpu" if cuda else None, seed=args.seed)
    plan = None
    if cuda:
        plan, n_gpu = _plan(args, model, device, n_gpu)
    elif n_gpu == "auto":  # both tiers are host memory: everything "fits"
        n_gpu = preset.layers * preset.experts
    off = offload(model, n_gpu, device=device, placement=placement, policy=policy, cost_model=cost_model,
                  routing=routing, cpu_threads=args.threads)
    try:
        tok = G.synthetic_tokenizer(preset.vocab)
        ids, mask = G.random_prompts(preset.vocab, args.prompt_tokens, args.batch_size, seed=args.seed,
                                     pad_token_id=tok.pad_token_id)
        kw = dict(num_beams=args.beams, do_sample=args.sample, ignore_eos=not args.allow_eos, seed=args.seed)
        if args.sample:
            kw.update({k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k)) if v is not None})
        if args.warmup:
            G.generate(off, ids, mask, max_new_tokens=args.warmup, **kw)
            if routing is not None:
                routing.reset()
        streamer = None
        if args.stream:
            out = sys.stderr if args.json else sys.stdout
            streamer = G.TextPrinter(tok, write=lambda s: (out.write(s), out.flush()))
        res = G.generate(off, ids, mask, max_new_tokens=args.new_tokens, streamer=streamer, tokenizer=tok, **kw)
        if args.stream:
            out.write("\n")
            out.flush()
        record = {"preset": preset.name, "layers": preset.layers, "experts_per_layer": preset.experts,
                  "total_experts": preset.layers * preset.experts, "device": device,
                  "policy": getattr(off.policy, "name", type(off.policy).__name__),
                  "trace": args.trace, "cpu_threads": off.cpu_threads, **res.to_dict(),
                  "memory_plan": None if plan is None else plan.to_dict()}
    finally:
        off.restore()

    if args.out:
        from ..results import provenance, save_json

        save_json({**record, "provenance": provenance(device)}, args.out)
    if args.json:
        print_json(record)
    else:
        if not args.stream:
            for i, text in enumerate(res.text or ()):
                print(f"[{i}] {text}" if len(res.text) > 1 else text)
        if plan is not None:
            print(plan)
        print(format_table(record))
    return 0


def _f(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(r: dict) -> str:
    """A short human-readable summary of one run."""
    mode = r["mode"] + (f" x{r['num_beams']}" if r["num_beams"] > 1 else "")
    d, hr = r["decode_ms"], r.get("hit_rate") or {}
    per_layer = (hr.get("per_layer") or {}).get("decode") or []
    lines = [
        f"{r['preset']} ({r['layers']} layers) on {r['device']}: {r['gpu_experts']}/{r['total_experts']} experts on "
        f"the GPU, policy {r['policy']}, {r['cpu_threads']} CPU threads",
        f"{mode}, batch {r['batch_size']}, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens",
        f"  prefill (time to first token)  {_f(r['prefill_ms'], '.2f')} ms",
        f"  decode step                    median {_f(d['median'], '.2f')} ms, p90 {_f(d['p90'], '.2f')} ms",
        f"  decode throughput              {_f(r['decode_tokens_per_s'], '.1f')} tokens/s",
        f"  end to end                     {_f(r['end_to_end_ms'], '.1f')} ms",
        f"  hit rate                       prefill {_f(hr.get('prefill'))}, decode {_f(hr.get('decode'))}",
        f"  decode hit rate per layer      {' '.join(_f(x, '.2f') for x in per_layer)}",
        f"  copied / CPU experts           {r['copy_expert_calls']} copies ({(r['bytes_copied'] or 0) / 1e6:.1f} MB), "
        f"{r['cpu_expert_calls']} CPU expert calls",
    ]
    cm = r.get("cost_model") or {}
    if cm:
        a, b = cm.get("cpu_fit_ms", {}).get("a"), cm.get("cpu_fit_ms", {}).get("b")
        lines.append(f"  cost model                     CPU expert {_f(a)} + {_f(b, '.4f')}*n ms, "
                     f"copy {_f(cm.get('copy_ms'))} ms, copy pays from n >= {_f(cm.get('breakeven_tokens'), 'g')}")
    return "\n".join(lines)

