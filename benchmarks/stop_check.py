"""What reading transformers' stop check one step late buys, per target, on this machine.

transformers' decode loop asks the GPU after every step whether to stop (a
sync), so the host's work before the next step's launch runs while the GPU
waits. Where no step can end early, ``toolkit.moe.generation.generate`` lets
transformers read that answer one step late (``defer_stop=True``, the
default; ``deferred_stop_check``). This script runs ``generate`` both ways on
three targets of one ``MoESession`` (the path ``python -m toolkit moe``
takes): ours at ``--gpu-experts`` of the model's experts, every expert
resident (``all-gpu``) and the unmodified model (``hf-eager``). Each target is
warmed up, then both ways run ``--rounds`` times, their order alternating
from round to round; per way the rounds' median tokens/s, their spread
(flagged above ``ANOMALY_SPREAD``) and whether transformers deferred the
check. The generated tokens must be equal both ways. Saved to
OUT/stop_check.json after every round, with provenance.

  PYTHONPATH=. python benchmarks/stop_check.py --out data/gpu          # one H200: ~1.5 min, 23 GB pinned
  PYTHONPATH=. python benchmarks/stop_check.py --device cpu --preset tiny-mixtral --layers 2 --gpu-experts 4 \\
      --new-tokens 4 --out /tmp/x                                       # CPU smoke test: never deferred there
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TARGETS = ("ours", "all-gpu", "hf-eager")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpu-experts", type=int, default=14, help="ours: experts on the GPU")
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 2:
        ap.error("--rounds must be >= 1 and --new-tokens >= 2 (a decode step needs a token before it)")
    return args


def summarize(rows: list[dict], spread_limit: float) -> dict:
    """Per target and way ("late" / "every step"): the rounds' tokens/s, their median and spread (max - min over
    the median), flagged above ``spread_limit``, and whether every run of that way was deferred."""
    out: dict = {}
    for r in rows:
        way = "late" if r["defer_stop"] else "every step"
        out.setdefault(r["target"], {}).setdefault(way, []).append(r)
    from toolkit.moe.run import round_spread

    summary = {}
    for target, ways in out.items():
        summary[target] = {}
        for way, rs in ways.items():
            tps = [r["tokens_per_s"] for r in rs]
            spread = round_spread(tps, spread_limit)
            summary[target][way] = {"tokens_per_s": spread["median"], "rounds": tps, "spread": spread["spread"],
                                    "anomalous": spread["anomalous"], "deferred": all(r["deferred"] for r in rs)}
        if {"late", "every step"} <= set(summary[target]):
            a, b = summary[target]["late"]["tokens_per_s"], summary[target]["every step"]["tokens_per_s"]
            summary[target]["late_over_every_step"] = a / b if b else None
    return summary


def main(argv=None) -> int:
    from toolkit.errors import ToolkitError

    args = parse_args(argv)
    try:
        return measure(args)
    except ToolkitError as e:  # an unknown preset, more GPU experts than the model has: one line
        print(f"stop_check: {e}", file=sys.stderr)
        return 2


def measure(args) -> int:
    from toolkit.errors import ToolkitError
    from toolkit.moe.generation import generate
    from toolkit.moe.run import ANOMALY_SPREAD, MoESession, MoESettings
    from toolkit.results import provenance, save_json

    s = MoESettings(preset=args.preset, layers=args.layers, gpu_experts=args.gpu_experts, routing=args.routing,
                    new_tokens=args.new_tokens, device=args.device)
    path = Path(args.out) / "stop_check.json"
    record: dict = {"benchmark": "stop_check", "settings": vars(args), "rounds": [], "summary": {}}
    with MoESession(s) as session:
        record["provenance"] = provenance(session.device)
        total = session.total_experts
        kw = s.generate_kwargs(1)
        make = {"ours": lambda: session.offload(args.gpu_experts),
                "all-gpu": lambda: session.offload(total, scheme="all-gpu"),
                "hf-eager": session.unmodified}

        def run(target, defer):
            session.reset_routing()
            return generate(target, session.ids, session.mask, max_new_tokens=args.new_tokens, defer_stop=defer,
                            **kw)

        for i in range(args.rounds):
            for name in TARGETS:
                with make[name]() as target:
                    if name == "hf-eager":  # no engine to warm: two generations, as the warm-up's shortest
                        run(target, True), run(target, True)
                    else:
                        session.warm_up(target)
                    seqs = {}
                    for defer in ((True, False) if i % 2 == 0 else (False, True)):
                        g = run(target, defer)
                        seqs[defer] = g.sequences
                        record["rounds"].append({
                            "round": i, "target": name, "defer_stop": defer, "deferred": g.stop_check_deferred,
                            "tokens_per_s": g.decode_tokens_per_s, "decode_median_ms": g.decode_ms["median"],
                            "prefill_ms": g.prefill_ms})
                        print(f"round {i + 1} {name:8s} stop read {'late' if defer else 'every step':10s} "
                              f"(deferred: {g.stop_check_deferred}): {g.decode_tokens_per_s:8.2f} tok/s", flush=True)
                    if seqs[True] != seqs[False]:
                        raise ToolkitError(f"{name}: the tokens differ with the stop check read late (a bug)")
                record["summary"] = summarize(record["rounds"], ANOMALY_SPREAD)
                save_json(record, path)
    for name, ways in record["summary"].items():
        line = ", ".join(f"{way} {v['tokens_per_s']:.2f} tok/s ({100 * v['spread']:.0f}%"
                         f"{', flagged' if v['anomalous'] else ''})" for way, v in ways.items() if isinstance(v, dict))
        ratio = ways.get("late_over_every_step")
        print(f"{name:8s} {line}" + (f": x{ratio:.2f}" if ratio else ""), flush=True)
    print("saved", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
