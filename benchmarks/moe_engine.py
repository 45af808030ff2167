"""GPU evidence for the MoE offload engine: Mixtral-8x7B dimensions with a few layers.

One call, in this order, saving OUT/moe_engine.json after every measurement so an interruption keeps
what was measured:

1. the measured cost model (``toolkit.moe.costs.calibrate``, saved next to the results), and the model
   built once through ``toolkit.moe.run.MoESession`` (the path ``python -m toolkit moe`` takes, with
   its defaults), routing with its own router (``routing="model"``), as the unmodified model does;
2. the unmodified model, every expert on the GPU (``session.unmodified()``): the logits of a
   left-padded batch (prefill, then one cached decode step; ``session.probe_logits``), also recomputed
   in float32 to measure the dtype's own error;
3. for each ``gpu_experts`` from all down to 0, once: the offloaded model's logits against the
   unmodified ones (pass: within 2x the model's own bf16-vs-float32 error; float32: 1e-4);
4. greedy and beam-4 generation (``session.run_unmodified`` / ``session.run``: warm-up until decode
   steps are steady, routing replayed, the CLI's generate settings) of the unmodified model and of
   every budget, ``--rounds`` times (default 3), round-robin (round 1 of every configuration, then
   round 2, ...), so a slow spell of the machine hits all alike. A configuration's record holds its
   median round (greedy tokens/s decides which) with the rounds' median, min, max and spread per mode;
   ``"anomalous": true`` (with ``anomaly_reason``) when the rounds disagree by more than 10% of their
   median. Rounds that would start after the time budget are recorded as skipped.

  PYTHONPATH=. python benchmarks/moe_engine.py --out data/gpu                    # GPU
  PYTHONPATH=. python benchmarks/moe_engine.py --quick --device cpu --out /tmp/x  # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.env import resolve_device
from toolkit.moe.costs import calibrate
from toolkit.moe.presets import from_name
from toolkit.moe.run import ANOMALY_SPREAD, MoESession, MoESettings, logits_error, round_spread
from toolkit.results import RunRecord, provenance

BUDGET_S = 200.0  # whole script on the GPU (run_gpu.sh gives it 240 s)
REFERENCE = "unmodified"  # the configuration of the unmodified model
MODES = ("greedy", "beam")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    ap.add_argument("--preset", default=None, help="default mixtral-8x7b (tiny-mixtral with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="default 4 (the preset's with --quick)")
    ap.add_argument("--prompt-tokens", type=int, default=MoESettings.prompt_tokens)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (4 with --quick)")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each configuration, round-robin")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    return args


def sweep_of(preset, quick: bool) -> list[int]:
    """GPU expert budgets, extremes first: they bound the curve if time runs out."""
    total = preset.layers * preset.experts
    if quick:
        per_layer = [preset.experts, preset.experts // 2, 0]
    else:
        per_layer = [8, 6, 4, 2, 0] if preset.experts == 8 else [preset.experts, preset.experts // 2, 0]
    sweep = sorted({min(total, k * preset.layers) for k in per_layer}, reverse=True)
    return [sweep[0], sweep[-1], *sweep[1:-1]]


def reference_logits(session, record: dict):
    """The unmodified model's probe logits and the tolerance an offloaded configuration must meet."""
    dtype = session.preset.dtype
    with session.unmodified() as model:
        ref = session.probe_logits(model)
        if dtype == torch.float32:  # fused experts have no float64 kernels: a fixed bound
            return ref, 1e-4, "float32 model: fixed tolerance 1e-4"
        # the model's own bf16 error, measured against float32: offloading may add at most as much again
        model.to(torch.float32)  # lossless round trip: every bf16 weight is exact in float32
        try:
            dtype_err = logits_error(ref, session.probe_logits(model))
        finally:
            model.to(dtype)
    record["reference"]["logits_dtype_error"] = {"against": "float32", **dtype_err}
    tol = 2 * max(dtype_err["prefill_max_abs_diff"], dtype_err["decode_max_abs_diff"])
    return ref, tol, f"{dtype} vs float32 logit error {tol / 2:.3g}"


def measure_round(session, k, beams: int) -> dict:
    """One round of a configuration: greedy and beam generation (``k`` GPU experts, or the unmodified model)."""
    out = {}
    for mode, b in (("greedy", 1), ("beam", beams)):
        r = session.run_unmodified(beams=b) if k == REFERENCE else session.run(k, beams=b)
        out[mode] = r.generation.to_dict()
        out[mode + "_warmup"] = r.warmup
        if k != REFERENCE:
            out["engine"] = r.engine
    return out


def summarize(entry: dict, rounds: list[dict]) -> None:
    """The entry's figures from its rounds: the median round's results, each mode's spread, anomalies."""
    spreads = {m: round_spread([r[m]["decode_tokens_per_s"] for r in rounds]) for m in MODES}
    pick = spreads["greedy"]["median_round"] if spreads["greedy"]["median_round"] is not None else 0
    for m in MODES:
        entry[m] = rounds[pick][m]
        entry[m + "_warmup"] = rounds[pick][m + "_warmup"]
    # a round slow in its mean but not its median had a few slow steps, not a slow machine
    entry["rounds"] = {"done": len(rounds), "median_round": pick, **{m: spreads[m] for m in MODES},
                       "greedy_median_step_ms": [r["greedy"]["decode_ms"]["median"] for r in rounds]}
    odd = [f"{m} tokens/s: {spreads[m]['reason']}" for m in MODES if spreads[m]["anomalous"]]
    entry["anomalous"] = bool(odd)
    if odd:
        entry["anomaly_reason"] = "; ".join(odd)
    else:
        entry.pop("anomaly_reason", None)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    preset = from_name(args.preset or ("tiny-mixtral" if args.quick else "mixtral-8x7b"),
                       args.layers if args.layers is not None else (None if args.quick else 4))
    if args.quick and device == "cpu":  # tiny tensors on a shared CI machine: extra intra-op threads only contend
        torch.set_num_threads(1)
    total = preset.layers * preset.experts
    sweep = sweep_of(preset, args.quick)

    out_dir = Path(args.out)
    path = out_dir / "moe_engine.json"
    record = {
        "benchmark": "moe_engine", "status": "running",
        "provenance": provenance(device),
        "settings": {"preset": preset.name, "layers": preset.layers, "experts_per_layer": preset.experts,
                     "total_experts": total, "dtype": str(preset.dtype).removeprefix("torch."),
                     "expert_bytes": preset.expert_bytes(), "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "beams": args.beams, "sweep": sweep, "rounds": args.rounds,
                     "anomaly_spread": ANOMALY_SPREAD, "quick": args.quick, "budget_s": args.budget_s,
                     "logits_batch": "2 prompts, left-padded (prompt_tokens and prompt_tokens - 5 tokens)"},
        "reference": {}, "cost_model": None, "runs": [],
    }

    run = RunRecord("moe_engine", path, record, start=t_start)
    save, log = run.save, run.log
    save()
    try:
        # 1. the measured cost model and the model
        t = time.perf_counter()
        cm = calibrate(preset.hidden, preset.intermediate, preset.dtype, device, path=out_dir / "moe_engine_costs.json",
                       repeats=3 if args.quick else 5, thread_counts=None if args.quick else (1, 2, 4, 8))
        record["cost_model"], record["cost_model_summary"] = cm.to_dict(), cm.summary()
        record["settings"]["calibration_s"] = time.perf_counter() - t
        log(cm.summary())
        settings = MoESettings(preset=preset.name, layers=preset.layers, routing="model",
                               prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, device=device)
        session = MoESession(settings, cost_model=cm)
        record["settings"]["build_s"] = run.elapsed_s
        record["settings"]["session"] = settings.to_dict()
        log(f"built {preset.name} x{preset.layers} layers on {device}")

        # 2. the unmodified model's logits, and 3. each budget's against them
        ref, tol, dtype_note = reference_logits(session, record)
        record["settings"]["logits_tolerance"] = tol
        save()
        log(f"reference logits; {dtype_note}")
        configs = [REFERENCE, *sweep]
        entries = {REFERENCE: record["reference"]}
        for k in sweep:
            with session.offload(k) as engine:
                err = logits_error(session.probe_logits(engine), ref)
                entries[k] = {"gpu_experts": k, "cpu_threads": engine.cpu_threads,
                              "cpu_dtype": str(engine.cpu_dtype).removeprefix("torch.")}
            err["tolerance"] = tol
            err["pass"] = max(err["prefill_max_abs_diff"], err["decode_max_abs_diff"]) <= tol
            entries[k]["logits"] = err
            record["runs"].append(entries[k])
            log(f"gpu_experts={k}: logits {'ok' if err['pass'] else 'OUT OF TOLERANCE'}")

        # 4. generation, round-robin over the configurations
        rounds, seconds = {k: [] for k in configs}, {}
        for i in range(args.rounds):
            for k in configs:
                entry = entries[k]
                left = args.budget_s - run.elapsed_s
                est = 1.1 * seconds[k] if k in seconds else 15.0
                if left < (1.0 if args.quick else est):
                    entry["rounds_skipped"] = entry.get("rounds_skipped", 0) + 1
                    if not rounds[k]:
                        entry["skipped"] = f"time budget ({left:.0f} s left)"
                    save()
                    log(f"{k} round {i + 1}: skipped, {left:.0f} s left")
                    continue
                t = time.perf_counter()
                r = measure_round(session, k, args.beams)
                if device.startswith("cuda"):
                    gc.collect()  # drop the restored engine's host copies before the next one pins its own
                seconds[k] = time.perf_counter() - t
                if "engine" in r:
                    entry["engine"] = r.pop("engine")
                rounds[k].append(r)
                summarize(entry, rounds[k])
                entry["seconds"] = entry.get("seconds", 0.0) + seconds[k]
                if k != REFERENCE:
                    ref_gen = record["reference"].get("greedy"), record["reference"].get("beam")
                    # bf16 near-ties can flip a choice; equal ids are expected, not required
                    entry["greedy_ids_equal"] = ref_gen[0] is not None and \
                        entry["greedy"]["sequences"] == ref_gen[0]["sequences"]
                    entry["beam_ids_equal"] = ref_gen[1] is not None and \
                        entry["beam"]["sequences"] == ref_gen[1]["sequences"]
                save()
                g, b = entry["greedy"], entry["beam"]
                log(f"round {i + 1}, {k}: hit rate decode {_f((g['hit_rate'] or {}).get('decode'))}, greedy "
                    f"{g['decode_tokens_per_s']:.1f} tok/s (spread {_pct(entry['rounds']['greedy']['spread'])}), "
                    f"beam {b['decode_tokens_per_s']:.1f} tok/s{', ANOMALOUS' if entry['anomalous'] else ''} "
                    f"({seconds[k]:.0f} s)")
        save("complete")
    except KeyboardInterrupt:
        save("interrupted")
        print_summary(record)
        return 130
    except Exception as e:
        save(f"error: {type(e).__name__}: {e}")
        raise
    print_summary(record)
    print(f"wrote {path}")
    return 0


def _f(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def print_summary(record: dict) -> None:
    s = record["settings"]
    print(f"\n{s['preset']} x{s['layers']} layers, {s['total_experts']} experts, {s['dtype']}, prompt "
          f"{s['prompt_tokens']}, {s['new_tokens']} new tokens, beams {s['beams']}, {s['rounds']} rounds each; "
          f"status {record['status']}")
    if record.get("cost_model_summary"):
        print(record["cost_model_summary"])
    head = (f"{'gpu_experts':>11} {'hit prefill':>11} {'hit decode':>10} {'TTFT ms':>9} {'greedy tok/s':>12} "
            f"{'spread':>6} {'step p50 ms':>11} {'step p90 ms':>11} {'beam tok/s':>10} {'GB copied':>9} "
            f"{'cpu calls':>9} {'logits':>7}")
    print(head)
    ref = record.get("reference", {})
    rows = [("unmodified", ref)] if "greedy" in ref else []
    rows += [(str(r["gpu_experts"]), r) for r in record["runs"]]
    for name, r in rows:
        if "skipped" in r or "greedy" not in r:
            print(f"{name:>11}  skipped: {r.get('skipped', 'not measured')}")
            continue
        g, b, lg = r["greedy"], r["beam"], r.get("logits")
        hr = g.get("hit_rate") or {}
        print(f"{name:>11} {_f(hr.get('prefill')):>11} {_f(hr.get('decode')):>10} {g['prefill_ms']:>9.1f} "
              f"{g['decode_tokens_per_s']:>12.1f} {_pct(r['rounds']['greedy']['spread']):>6} "
              f"{g['decode_ms']['median']:>11.2f} {g['decode_ms']['p90']:>11.2f} "
              f"{b['decode_tokens_per_s']:>10.1f} {((g['bytes_copied'] or 0) + (b['bytes_copied'] or 0)) / 1e9:>9.2f} "
              f"{(g['cpu_expert_calls'] or 0) + (b['cpu_expert_calls'] or 0):>9} "
              f"{'' if lg is None else ('ok' if lg['pass'] else 'FAIL'):>7}"
              f"{'  anomalous: ' + r['anomaly_reason'] if r.get('anomalous') else ''}")


if __name__ == "__main__":
    sys.exit(main())
