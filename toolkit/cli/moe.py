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
    from ..moe.run import MoESettings

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
    p.add_argument("--scheme", default=MoESettings.scheme,
                   help="how missed experts are served: ours (default), fiddler-serial, lru-copy, copy-on-demand, "
                        "all-gpu (toolkit.moe.baselines)")
    p.add_argument("--routing", default=MoESettings.routing,
                   help="auto (default: the synthetic Mixtral trace for Mixtral-shaped presets, else the model's "
                        "router), model, uniform, or a trace name / .npz file")
    p.add_argument("--repeats", type=positive_int, default=MoESettings.repeats,
                   help="measured generations (decode samples pooled, prefill median)")
    p.add_argument("--policy", default=None, help="static-popularity, static-uniform, lru, lfu, belady")
    p.add_argument("--placement", default=None, help="placement JSON file (which experts are on the GPU)")
    p.add_argument("--trace", default=None, help="replay routing from a trace (name or .npz file; same as --routing)")
    p.add_argument("--calibration", default=None, help="cost model calibration JSON (default: measure once, cached)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for CPU experts")
    p.add_argument("--warmup", type=nonnegative_int, default=MoESettings.warmup_tokens,
                   help="tokens of each untimed warm-up generation, repeated until decode steps are steady "
                        "(0: none)")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also save the JSON result (with provenance) to this file")
    p.set_defaults(func=run)


def settings_from_args(args):
    """The command line as ``MoESettings`` (the one place the run's defaults live)."""
    from ..moe.run import MoESettings

    return MoESettings(
        preset=args.preset, layers=args.layers, gpu_experts=args.gpu_experts, scheme=args.scheme,
        routing=args.trace or args.routing, policy=args.policy, placement=args.placement,
        calibration=args.calibration, threads=args.threads, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, batch_size=args.batch_size, beams=args.beams, sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, allow_eos=args.allow_eos, warmup_tokens=args.warmup,
        repeats=args.repeats, seed=args.seed, device=args.device)


def run(args) -> int:
    from ..errors import ToolkitError
    from ..moe.generation import TextPrinter
    from ..moe.run import MoESession

    settings = settings_from_args(args)
    if args.stream and args.batch_size != 1:
        raise ToolkitError("--stream prints one sequence: use --batch-size 1")
    out = sys.stderr if args.json else sys.stdout
    with MoESession(settings) as session:
        streamer = None
        if args.stream:
            streamer = TextPrinter(session.tokenizer, write=lambda s: (out.write(s), out.flush()))
        result = session.run(streamer=streamer)
    if args.stream:
        out.write("\n")
        out.flush()
    record = result.to_dict()
    if args.json:
        print_json(record)
    else:
        if not args.stream:
            for i, text in enumerate(record.get("text") or ()):
                print(f"[{i}] {text}" if len(record["text"]) > 1 else text)
        if result.memory_plan is not None:
            print(result.memory_plan)
        print(format_table(record))
    if args.out:
        from ..results import provenance, save_json

        save_json({**record, "provenance": provenance(record["device"])}, args.out)
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
        f"the GPU, scheme {r['scheme']}, policy {r['policy']}, {r['routing']} routing, {r['cpu_threads']} CPU threads",
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

