"""`python -m toolkit moe`: generate with an offloaded MoE model and report latency and expert hit rates."""

from __future__ import annotations

import math
import sys

from .common import HelpFormatter, add_device_argument, nonnegative_int, plural, positive_int, print_json


def gpu_experts_arg(text: str):
    """An expert count, 'all', or 'auto' (as many as the memory planner says fit)."""
    if str(text).lower() in ("all", "auto"):
        return str(text).lower()
    return nonnegative_int(text)


def register(subparsers) -> None:
    from ..moe.presets import PRESETS
    from ..moe.run import MoESettings
    from ..moe.schedule import SCHEDULE_CHOICES

    p = subparsers.add_parser(
        "moe", help="generate with an offloaded MoE model (random weights) and report latency and hit rates",
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--preset", default=MoESettings.preset, help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="use this many layers instead of the preset's (default: the preset's)")
    p.add_argument("--gpu-experts", type=gpu_experts_arg, default=MoESettings.gpu_experts,
                   help="experts resident on the GPU across all layers: a number, 'all', or 'auto' (default: auto, "
                        "as many as the memory plan fits on the GPU; on a CPU both tiers are host memory: auto keeps "
                        "every expert resident, give a number to exercise the offload path)")
    p.add_argument("--prompt-tokens", type=positive_int, default=MoESettings.prompt_tokens,
                   help="tokens in each (random) prompt")
    p.add_argument("--new-tokens", type=positive_int, default=MoESettings.new_tokens,
                   help="tokens generated after the prompt")
    p.add_argument("--batch-size", type=positive_int, default=MoESettings.batch_size,
                   help="prompts generated together")
    p.add_argument("--beams", type=positive_int, default=MoESettings.beams, help="beam search with this many beams")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam argmax")
    p.add_argument("--temperature", type=float, default=None,
                   help="with --sample: sampling temperature (default: transformers' 1.0)")
    p.add_argument("--top-k", type=nonnegative_int, default=None,
                   help="with --sample: sample among the k most likely tokens (default: transformers' 50)")
    p.add_argument("--stream", action="store_true",
                   help="print text as it becomes final (also for beam search); to stderr with --json")
    p.add_argument("--allow-eos", action="store_true",
                   help="stop at EOS (default: generate exactly --new-tokens, as benchmarks need)")
    p.add_argument("--scheme", default=MoESettings.scheme,
                   help="how missed experts are served (default: ours): ours, fiddler-serial, lru-copy, copy-on-demand, "
                        "all-gpu (toolkit.moe.baselines)")
    p.add_argument("--routing", default=MoESettings.routing,
                   help="auto (default: the synthetic Mixtral trace for Mixtral-shaped presets, else the model's "
                        "router), model, uniform, or a trace name / .npz file")
    p.add_argument("--repeats", type=positive_int, default=MoESettings.repeats,
                   help="measured generations (decode samples pooled, prefill median)")
    p.add_argument("--policy", default=None, help="placement or caching policy: static-popularity, static-uniform, "
                   "lru, lfu, belady (default: the scheme's)")
    p.add_argument("--placement", default=None,
                   help="placement JSON file: which experts are on the GPU (default: the policy places them)")
    p.add_argument("--trace", default=None, help="replay routing from a trace (name or .npz file; same as --routing; "
                                                 "default: as --routing says)")
    p.add_argument("--calibration", default=None, help="cost model calibration JSON (default: measure once, cached)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for CPU experts (default: chosen for this machine by the calibration)")
    p.add_argument("--schedule", default=MoESettings.schedule, choices=SCHEDULE_CHOICES,
                   help="how scheme ours runs its CPU experts: auto (default: the candidates measured during "
                        "warm-up, the fastest kept), or one of them set: overlap (a worker thread) or inline, each "
                        "with or without splitting an expert between the CPU and a copy")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="run the dense part of decode steps eagerly, as transformers does (default on a GPU: "
                        "replayed from one CUDA graph per layer)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="run the model's RMSNorms and the decode experts' small ops as torch's separate kernels "
                        "(default on a GPU with Triton: one fused kernel per norm, three per decode pass)")
    p.add_argument("--no-graph-misses", dest="graph_misses", action="store_false",
                   help="serve missed experts of decode steps from Python layer by layer (default on a GPU with a "
                        "static placement: the whole decode step one CUDA graph, each missed expert split between "
                        "a copy kernel and a CPU host function)")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="keep the experts' pinned host memory on 4 KiB pages (default: on 2 MiB transparent huge "
                        "pages where the OS grants them, which both paths of a missed expert read faster)")
    p.add_argument("--warmup", type=nonnegative_int, default=MoESettings.warmup_tokens,
                   help="tokens of each untimed warm-up generation, repeated until decode steps are steady "
                        "(0: none; default: as many as --new-tokens)")
    p.add_argument("--seed", type=int, default=MoESettings.seed, help="seed of the random weights, prompts, routing and sampling")
    add_device_argument(p)
    p.add_argument("--gpus", type=positive_int, default=MoESettings.gpus,
                   help="GPUs of this host holding resident experts, the dense part on the first (default: one); "
                        "--gpu-experts counts over all of them")
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
        repeats=args.repeats, seed=args.seed, device=args.device, gpus=args.gpus, schedule=args.schedule,
        graphs=args.graphs, fused=args.fused, graph_misses=args.graph_misses, huge_pages=args.huge_pages)


def building_line(session) -> str:
    """What is about to be built and how much memory it takes, said before it starts (big presets take minutes)."""
    import psutil

    from ..moe.memory import host_memory_needed

    preset, s = session.preset, session.settings
    need = host_memory_needed(preset, session.device)["host"]
    where = "host memory" + (" (pinned for the experts)" if session.device.startswith("cuda") else "")
    size = f"{need / 1e9:.1f} GB" if need >= 1e8 else f"{need / 1e6:.1f} MB"
    free = f" ({psutil.virtual_memory().available / 1e9:.1f} GB available)" if need >= 1e8 else ""
    return (f"building {preset.name} ({plural(preset.layers, 'layer')}, random weights): {size} of {where}{free}; "
            f"then {'warm-up and ' if s.warmup_length() else ''}{plural(s.repeats, 'measured generation')}")


class GenerationBar:
    """A progress bar over the run's generated tokens, advanced between generations (``MoESession.run``'s hook).

    Warm-up repeats until decode steps are steady (2 to ``WARMUP_ROUNDS`` rounds): the total assumes the
    fewest rounds still possible and grows when another is needed, so the ETA is a lower bound.
    """

    def __init__(self, settings):
        from .common import progress_bar

        self.warm = max(2, settings.warmup_length()) if settings.warmup_length() else 0
        self.new_tokens = settings.new_tokens
        self.measured = settings.new_tokens * settings.repeats
        self.bar = progress_bar(total=(2 * self.warm) + self.measured, desc="moe generate", unit="token")

    def __call__(self, phase: str, count: int, steady) -> None:
        from ..moe.run import WARMUP_ROUNDS

        if phase == "warm-up":
            rounds_left = 0 if steady or count >= WARMUP_ROUNDS else max(1, 2 - count)
            self.bar.total = self.bar.n + self.warm * (1 + rounds_left) + self.measured
            self.bar.set_postfix_str(f"warm-up round {count}", refresh=False)
            self.bar.update(self.warm)
        else:
            self.bar.set_postfix_str(f"measured generation {count}", refresh=False)
            self.bar.update(self.new_tokens)

    def close(self) -> None:
        self.bar.close()


def run(args) -> int:
    from ..errors import ToolkitError
    from ..moe.run import MoESession
    from ..moe.streaming import TextPrinter

    settings = settings_from_args(args)
    if args.stream and args.batch_size != 1:
        raise ToolkitError("--stream prints one sequence: use --batch-size 1")
    if args.out:
        from ..results import check_writable

        check_writable(args.out, "--out")  # before the model is built and run, not after
    out = sys.stderr if args.json else sys.stdout
    announce = None if args.stream and args.json else (lambda session: sys.stderr.write(building_line(session) + "\n"))
    with MoESession(settings, on_build=announce) as session:
        streamer = None
        if args.stream:
            streamer = TextPrinter(session.tokenizer, write=lambda s: (out.write(s), out.flush()))
        bar = None if args.stream else GenerationBar(settings)  # a stream shows its own progress
        try:
            result = session.run(streamer=streamer, on_generation=bar)
        finally:
            if bar is not None:
                bar.close()
    if args.stream:
        out.write("\n")
        out.flush()
    record = result.to_dict()
    if result.stats is not None:  # what the bytes copied count besides whole-expert copies
        record.update(prefetch_calls=result.stats.prefetch_calls, split_expert_calls=result.stats.split_expert_calls)
    try:  # printed first, then saved (atomically): also when Ctrl-C hits the printing
        if args.json:
            print_json(record)
        else:
            if not args.stream:
                for i, text in enumerate(record.get("text") or ()):
                    print(f"[{i}] {text}" if len(record["text"]) > 1 else text)
            if result.memory_plan is not None:
                print(result.memory_plan)
            print(format_table(record))
    finally:
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
    cuda = str(r["device"]).startswith("cuda")
    auto_on_cpu = not cuda and (r.get("settings") or {}).get("gpu_experts") == "auto"
    where = "on the GPU" if cuda else "resident" + ("" if auto_on_cpu else " (no GPU: both tiers are host memory)")
    lines = [
        f"{r['preset']} ({plural(r['layers'], 'layer')}) on {r['device']}: {r['gpu_experts']}/{r['total_experts']} "
        f"experts {where}, scheme {r['scheme']}, policy {r['policy']}, {r['routing']} routing, "
        f"{plural(r['cpu_threads'], 'CPU thread')}",
        f"{mode}, batch {r['batch_size']}, prompt {plural(r['prompt_tokens'], 'token')}, "
        f"{plural(r['new_tokens'], 'new token')}",
        f"  prefill (time to first token)  {_f(r['prefill_ms'], '.2f')} ms",
        f"  decode step                    median {_f(d['median'], '.2f')} ms, p90 {_f(d['p90'], '.2f')} ms",
        f"  decode throughput              {_f(r['decode_tokens_per_s'], '.1f')} tokens/s",
        f"  end to end                     {_f(r['end_to_end_ms'], '.1f')} ms",
        f"  hit rate                       prefill {_f(hr.get('prefill'))}, decode {_f(hr.get('decode'))}",
        f"  decode hit rate per layer      {' '.join(_f(x, '.2f') for x in per_layer)}",
        f"  copied / CPU experts           {_copied(r)}, {plural(r['cpu_expert_calls'] or 0, 'CPU expert call')}",
    ]
    from ..moe.graphs import graphs_line
    from ..moe.schedule import schedule_line

    sched = schedule_line(r.get("schedule"))
    engine = r.get("engine") or {}
    if sched:
        if engine.get("spare_cores") and engine.get("overlap"):
            sched += f"; the worker's CPU experts on {plural(engine['worker_threads'], 'thread')}"
        lines.append(f"  schedule                       {sched}")
    graphs = engine.get("graphs")
    if graphs:
        lines.append(f"  decode graphs                  {graphs_line(graphs)}")
    devices = engine.get("devices")
    if devices:
        lines.append("  per device                     " + "; ".join(
            f"{d['device']}: {plural(d['experts'], 'expert')}, {plural(d['rows'], 'resident row')}, "
            f"{plural(d.get('copies', 0), 'copy', 'copies')} in" for d in devices))
    fused = _fused_line(engine.get("fused"))
    if fused:
        lines.append(f"  fused kernels                  {fused}")
    captured = _graph_misses_line(engine.get("graph_misses"), r["layers"])
    if captured:
        lines.append(f"  captured decode passes         {captured}")
    host = _host_memory_line(engine.get("host_memory"))
    if host:
        lines.append(f"  experts' host memory           {host}")
    if cuda and "stop_check_deferred" in r:
        lines.append("  stop check                     " + (
            "read one step late: the host queues each decode step while the GPU runs the last"
            if r["stop_check_deferred"] else
            "after every decode step (a sync): the run may end before its last token, searches beams or streams"))
    sync_free = engine.get("sync_free_layers")
    if sync_free:
        lines.append(f"  sync-free layers               {sync_free} of {r['layers']} (every expert resident: "
                     "the routing stays on the device)")
    if auto_on_cpu:
        lines.insert(2, "  (on a CPU both tiers are host memory: --gpu-experts auto keeps every expert resident; "
                        "give a number to exercise the offload path)")
    cm = r.get("cost_model") or {}
    if cm:
        a, b = cm.get("cpu_fit_ms", {}).get("a"), cm.get("cpu_fit_ms", {}).get("b")
        n = cm.get("breakeven_tokens")
        pays = (f"a copy pays from n >= {n:g} tokens" if n is not None and math.isfinite(n) else
                "a copy never beats the CPU for one expert on this machine's cost model (copies happen only to run "
                "an expert alongside the CPU's)")
        lines.append(f"  cost model                     CPU expert {_f(a)} + {_f(b, '.4f')}*n ms, "
                     f"copy {_f(cm.get('copy_ms'))} ms; {pays}")
        from ..moe.costs import CostModel

        model = CostModel.from_dict(cm)
        lines.append(f"  CPU experts multiply with      {model.kernel_line()}")
        if str(cm.get("device", "")).startswith("cuda"):
            line = model.contention_line().removeprefix(" | ")
            lines.append("  contention                     " + (
                f"{line} (prefill plans count it)" if line else
                "not counted: the plan takes CPU experts and copies at their speeds alone"))
    lines += [f"  WARNING: {w}" for w in r.get("warnings") or ()]
    return "\n".join(lines)


def _fused_line(fused: dict | None) -> str:
    """What ran as fused Triton kernels (``Offloaded.fused_dict``), or "" where nothing did."""
    if not fused or not (fused.get("norms") or fused.get("expert_layers") or fused.get("norms_kept")):
        return ""
    parts = []
    if fused.get("norms"):
        parts.append(f"{plural(fused['norms'], 'RMSNorm')} as one kernel each")
    if fused.get("norms_kept"):
        parts.append(f"{plural(fused['norms_kept'], 'norm')} kept torch's ops (the kernel did not reproduce them)")
    if fused.get("expert_layers"):
        parts.append(f"the experts of {plural(fused['expert_layers'], 'sync-free layer')} in 3 kernels a decode pass")
    return "; ".join(parts)


def _host_memory_line(d: dict | None) -> str:
    """Where the host tier lies (``host_memory.describe``), or "" where nothing is copied from it."""
    if not d or not d.get("pinned"):
        return ""
    frac = d.get("huge_pages")
    if frac is None:
        return "page-locked; huge pages unknown (no /proc/self/smaps)"
    if frac > 0:
        return f"page-locked, {frac:.0%} on 2 MiB pages"
    why = d.get("reason")
    return "page-locked, on 4 KiB pages" + (f" ({why})" if why else " (the kernel granted no huge pages)")


def _graph_misses_line(d: dict | None, layers: int) -> str:
    """How one-token decode passes with missed experts ran (``Offloaded.graph_misses_dict``), or "" where the
    question does not arise (every expert resident, or an older record)."""
    if not d:
        return ""
    if d.get("layers"):
        line = (f"{d['layers']} of {layers} layers: each missed expert's units [0, {d['units']}) "
                f"({d['share']:.0%}) copied by a kernel that picks them on the GPU, the rest on the CPU in a "
                "host function; "
                "the whole step one graph at batch 1")
        b = d.get("balanced")
        if b:
            line += (f"; split balanced on the rates measured in this run (a whole expert {b['cpu_ms_per_expert']:.2f} "
                     f"ms on the CPU beside the copies, {b['copy_ms_per_expert']:.2f} ms copied; the calibration's "
                     f"split was [0, {b['first_units']}))")
        return line
    reason = d.get("reason")
    if not reason or reason == "every expert resident":
        return ""
    return f"off ({reason}): missed experts served layer by layer from Python"


def _copied(r: dict) -> str:
    """'copied 5,571 MB (2 whole-expert copies, 14 prefetches/split parts)': the bytes count all three."""
    whole = r.get("copy_expert_calls") or 0
    parts = (r.get("prefetch_calls") or 0) + (r.get("split_expert_calls") or 0)
    extra = f", {plural(parts, 'prefetch/split part', 'prefetches/split parts')}" if parts else ""
    return (f"copied {(r.get('bytes_copied') or 0) / 1e6:,.1f} MB "
            f"({plural(whole, 'whole-expert copy', 'whole-expert copies')}{extra})")

