"""Where an offloaded decode step's host time goes, layer by layer, for each CPU-expert schedule.

The engine built as ``python -m toolkit moe`` builds it (``MoESession``, its
calibration and placement), one decode step at a time after the prompt
(``MoESession.decode_step``: the dense part replayed from CUDA graphs), with
``Offloaded.timeline`` marking each layer (``toolkit.moe.timeline``): the
dense part and router as launched, the routing sync, the plan and hand-over,
the CPU experts, and the results going back. Each schedule a run would measure
(``toolkit.moe.schedule.schedule_candidates``, or those named) is measured in
alternating rounds on the same engine (``Offloaded.set_schedule``), a few untimed steps first each
time. Per routing and schedule: the median step, each segment per step
(mean) and per layer (median), the whole and split CPU experts per step, the
CPU time per expert where no expert was split, and the calibrated time of a
one-token CPU expert to set against it.

Saved to OUT/decode_timeline.json with provenance after every round.

  PYTHONPATH=. python benchmarks/decode_timeline.py --out data/gpu       # the H200 host, ~1.5 min
  PYTHONPATH=. python benchmarks/decode_timeline.py --quick --out /tmp/x # tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from toolkit.env import resolve_device
from toolkit.errors import ToolkitError
from toolkit.moe.run import BENCHMARK_ROUTINGS as ROUTINGS  # record label -> MoESettings.routing
from toolkit.moe.run import MoESession, MoESettings, round_spread
from toolkit.moe.schedule import SCHEDULES, schedule_candidates
from toolkit.moe.timeline import SEGMENTS, HostTimeline, summary
from toolkit.results import RunRecord, provenance


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU, few steps: a smoke test")
    ap.add_argument("--preset", default=None, help="default mixtral-8x7b (tiny-mixtral with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (2 with --quick)")
    ap.add_argument("--gpu-experts", type=int, default=None, help="default 14 (4 with --quick)")
    ap.add_argument("--routings", default="uniform,trace")
    ap.add_argument("--schedules", default=None,
                    help="comma-separated toolkit.moe.schedule.SCHEDULES names (default: the candidates a run measures)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 30, 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    bad = [r for r in args.routings.split(",") if r not in ROUTINGS] + \
        [s for s in (args.schedules or "").split(",") if s and s not in SCHEDULES]
    if bad:
        ap.error(f"unknown routing or schedule: {', '.join(bad)} (routings: {', '.join(ROUTINGS)}; schedules: "
                 f"{', '.join(SCHEDULES)})")
    quick = args.quick
    args.preset = args.preset or ("tiny-mixtral" if quick else "mixtral-8x7b")
    args.layers = args.layers or (2 if quick else 8)
    args.gpu_experts = args.gpu_experts if args.gpu_experts is not None else (4 if quick else 14)
    args.steps = args.steps or (4 if quick else 30)
    if quick and args.device == "auto":
        args.device = "cpu"
    return args


def timed_steps(engine, step, step_args, steps: int, device, warm: int = 3) -> tuple[dict, tuple[int, int]]:
    """``warm`` untimed steps, then ``steps`` marked ones -> (``timeline.summary``, (whole CPU experts, experts
    split between the CPU and a copy) computed in them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warm):
            step(*step_args)
        sync()
        timeline = HostTimeline()
        stats = engine.stats
        before = stats.cpu_expert_calls, stats.split_expert_calls
        engine.timeline = timeline
        try:
            for _ in range(steps):
                timeline.mark("step_start")
                step(*step_args)
                sync()
                timeline.mark("step_end")
        finally:
            engine.timeline = None
    stats = engine.stats
    return summary(timeline.events), (stats.cpu_expert_calls - before[0], stats.split_expert_calls - before[1])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(resolve_device(args.device))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "decode_timeline", "status": "running", "provenance": provenance(str(device)),
              "settings": {"preset": args.preset, "layers": args.layers, "gpu_experts": args.gpu_experts,
                           "steps": args.steps, "rounds": args.rounds, "segments": list(SEGMENTS)},
              "results": {}}
    run = RunRecord("decode_timeline", out_dir / "decode_timeline.json", record)
    named = args.schedules.split(",") if args.schedules else None
    settings = MoESettings(preset=args.preset, layers=args.layers, gpu_experts=args.gpu_experts, scheme="ours",
                           routing=ROUTINGS[args.routings.split(",")[0]], device=str(device))
    try:
        session = MoESession(settings)
        cm = session.cost_model
        record["cost_model_summary"] = cm.summary()
        record["calibrated_cpu_expert_ms_1_token"] = float(cm.cpu_time(1))
        run.log(cm.summary())
        for label in args.routings.split(","):
            s = session if session.settings.routing == ROUTINGS[label] else session.with_settings(
                routing=ROUTINGS[label])
            engine = s.offload(scheme="ours", gpu_experts=args.gpu_experts, schedule=named[0] if named else "auto")
            try:
                schedules = named or list(schedule_candidates("ours", engine.options, "cuda", False)[0])
                step, step_args, _ = s.decode_step(engine)
                rounds: dict[str, list] = {k: [] for k in schedules}
                for r in range(args.rounds):
                    for name in schedules:
                        engine.set_schedule(*SCHEDULES[name])
                        summ, (whole, split) = timed_steps(engine, step, step_args, args.steps, device)
                        n = max(1, summ["steps"])
                        summ["cpu_experts_per_step"], summ["split_experts_per_step"] = whole / n, split / n
                        # per expert only where every CPU job was whole experts: a split one is part of an expert
                        summ["cpu_ms_per_expert"] = summ["per_step_ms"]["cpu"] / (whole / n) \
                            if whole and not split else None
                        rounds[name].append(summ)
                        record["results"].setdefault(label, {})[name] = _combine(rounds[name])
                        run.log(f"{label} {name} round {r + 1}: step {summ['step_ms']:.2f} ms, "
                                + ", ".join(f"{k} {v:.2f}" for k, v in summ["per_step_ms"].items()))
                        run.save()
            finally:
                engine.restore()
        run.save("complete")
    except (KeyboardInterrupt, ToolkitError) as e:  # Ctrl-C, or a preset, budget or device this machine cannot run: one line, not a traceback
        return run.stopped(e)
    print_table(record)
    return 0


def _combine(rounds: list[dict]) -> dict:
    """A schedule's rounds -> the median round's step and segments, the rounds' step spread, every round."""
    steps = [r["step_ms"] for r in rounds]
    spread = round_spread(steps)
    mid = rounds[spread["median_round"]]
    return {"step_ms": spread["median"], "step_spread": spread["spread"], "anomalous": spread["anomalous"],
            "per_step_ms": mid["per_step_ms"], "per_layer_median_ms": mid["per_layer_median_ms"],
            "cpu_experts_per_step": mid["cpu_experts_per_step"], "split_experts_per_step": mid["split_experts_per_step"],
            "cpu_ms_per_expert": mid["cpu_ms_per_expert"],
            "rounds": rounds}


def print_table(record: dict) -> None:
    cols = [*SEGMENTS, "tail"]
    print(f"{'routing':8} {'schedule':16} {'step ms':>8} " + " ".join(f"{c:>10}" for c in cols)
          + f" {'CPU/expert':>10}")
    for label, by in record["results"].items():
        for name, r in by.items():
            per = r["per_step_ms"]
            cpu = r["cpu_ms_per_expert"]
            flag = " (rounds spread {:.0%})".format(r["step_spread"]) if r["anomalous"] else ""
            print(f"{label:8} {name:16} {r['step_ms']:8.2f} " + " ".join(f"{per[c]:10.2f}" for c in cols)
                  + f" {cpu if cpu is None else round(cpu, 2)!s:>10}{flag}")
    cal = record.get("calibrated_cpu_expert_ms_1_token")
    if cal:
        print(f"calibrated CPU expert at 1 token: {cal:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
