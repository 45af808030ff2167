"""Where a captured offloaded decode step spends its time, layer by layer, on the GPU's clock.

The engine as ``python -m toolkit moe`` builds and warms it (``MoESession``:
calibration, placement, warm-up generations, so the split of missed experts
is balanced), then its decode step (``MoESession.decode_step``: the whole
forward replayed as one CUDA graph) under ``toolkit.profiling.profile``, with
each layer's host function stamping its own start and end
(``HostShare.keep_stamps``). Each layer of a step is cut at its copies of the
token to pinned memory (device -> host) and of the CPU's sum back (host ->
device):

- ``pre``: from the previous layer's sum back to the token out: the add, the
  layer's attention, router and conditions (neither stream of weights runs);
- ``window``: from the token out to the CPU's sum back, which waits for the
  host function; within it ``fn_start`` (the host node's start latency),
  ``fn_busy`` (the function's own time) and ``fn_end`` (from its return to
  the copy back), ``copies`` (the union of the missed experts' copies) and
  ``gpu_after_copies`` (the GPU's rows after the last copy);
- ``wait_gpu``: how long the GPU side ran past the sum's copy back.

Then the same engine's ``generate`` (the session's decode settings) against
the bare step, timed with syncs, each with its missed experts a pass: the two
read different rows of the routing, and a step's time follows its misses.

  PYTHONPATH=. python benchmarks/captured_step.py --out data/gpu   # one H200, ~1 min, 23 GB of pinned memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COPY_NAMES = ("memcpy",)  # the missed experts' copies as the driver's copy kernels ("memcpyDtoD2D...")
LONG_MS = 0.5  # a host -> device copy this long is a missed expert's units on the copy engines, not a sum back
SEGMENTS = ("pre", "window", "fn_start", "fn_busy", "fn_end", "copies", "gpu_after_copies", "wait_gpu")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpu-experts", type=int, default=14)
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--steps", type=int, default=4, help="profiled steps")
    ap.add_argument("--timed", type=int, default=30, help="steps timed with syncs, without the profiler")
    ap.add_argument("--name", default="captured_step.json")
    return ap.parse_args(argv)


def _union_ms(intervals) -> float:
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def layer_segments(events, stamps_ms=None) -> list[dict]:
    """One profiled captured step's GPU events (``toolkit.profiling.Event`` in ms) -> a dict of ``SEGMENTS`` (ms)
    per offloaded layer, in order. ``stamps_ms``: the host functions' (start, end) in the events' clock, one per
    layer in order, or None.

    A layer is found by its copies: device -> host (the token, its experts and weights), then one host -> device
    (the CPU's sum). Events of other kinds between two layers belong to the later one's ``pre``.
    """
    gpu = sorted((e for e in events if e.kind in ("kernel", "d2h", "h2d", "d2d", "memset")), key=lambda e: e.start)
    if not gpu:
        return []
    ups = [e for e in gpu if e.kind == "h2d" and e.ms < LONG_MS]

    def is_copy(e) -> bool:  # on the copy engines (h2d) or the SMs (kernels named memcpy...)
        return (e.kind == "h2d" and e.ms >= LONG_MS) or (e.kind == "kernel" and e.name.startswith(COPY_NAMES))

    out, boundary = [], gpu[0].start
    for up in ups:
        outs = [e for e in gpu if e.kind == "d2h" and boundary <= e.start < up.start]
        if not outs:
            boundary = up.end
            continue
        token_out = max(e.end for e in outs)
        nxt = [e.start for e in gpu if e.kind == "d2h" and e.start > up.end]  # the next layer's token out
        inside = [e for e in gpu if token_out <= e.start < (nxt[0] if nxt else np.inf) and e is not up]
        copies = [e for e in inside if is_copy(e)]
        side = [e for e in inside if e.kind == "kernel" and ("expert_down" in e.name or "expert_gate_up" in e.name)]
        side_end = max((e.end for e in side), default=token_out)
        last_copy = max((e.end for e in copies), default=token_out)
        seg = {"pre": token_out - boundary, "window": up.start - token_out,
               "copies": _union_ms((e.start, e.end) for e in copies),
               "gpu_after_copies": max(0.0, side_end - last_copy) if copies else 0.0,
               "wait_gpu": max(0.0, side_end - up.end), "fn_start": np.nan, "fn_busy": np.nan, "fn_end": np.nan}
        if stamps_ms is not None and len(out) < len(stamps_ms):
            a, b = stamps_ms[len(out)]
            seg.update(fn_start=a - token_out, fn_busy=b - a, fn_end=up.start - b)
        out.append(seg)
        boundary = up.end
    return out


def step_summary(layers: list[dict], step_ms: float) -> dict:
    """Sums over a step's layers, and the rest of the step (embedding, final norm, LM head, launch)."""
    s = {k: float(np.nansum([lay[k] for lay in layers])) for k in SEGMENTS}
    s["step"] = float(step_ms)
    s["layers"] = len(layers)
    s["outside_layers"] = float(step_ms - s["pre"] - s["window"] - s["wait_gpu"])
    return s


def main(argv=None) -> int:
    from toolkit.errors import ToolkitError

    args = parse_args(argv)
    try:
        return measure(args)
    except ToolkitError as e:  # bad settings (an unknown preset, more GPU experts than the model has): one line
        print(f"captured_step: {e}", file=sys.stderr)
        return 2


def measure(args) -> int:
    import torch
    from host_functions import synced_steps_ms

    from toolkit.moe.generation import generate
    from toolkit.moe.roofline import reads_from_stats
    from toolkit.moe.run import MoESession, MoESettings
    from toolkit.profiling import load_trace, profile
    from toolkit.results import provenance, save_json

    if not torch.cuda.is_available():
        raise SystemExit("captured_step: needs a CUDA GPU")
    out_path = Path(args.out) / args.name
    s = MoESettings(preset=args.preset, layers=args.layers, gpu_experts=args.gpu_experts, routing=args.routing,
                    new_tokens=32, device="cuda")
    record: dict = {"benchmark": "captured_step", "settings": vars(args)}
    with MoESession(s) as session:
        with session.offload(args.gpu_experts) as eng:
            t0 = time.perf_counter()
            record["warmup"] = session.warm_up(eng)
            record["warmup_s"] = time.perf_counter() - t0
            record["graph_misses"] = eng.graph_misses_dict()
            print("graph_misses:", json.dumps(record["graph_misses"]), flush=True)
            passes = [m.graph_pass for m in eng.experts if getattr(m, "graph_pass", None) is not None]
            if not passes:
                raise SystemExit(f"captured_step: decode passes are not captured here: "
                                 f"{record['graph_misses']['reason']}")
            fn, fn_args, label = session.decode_step(eng)
            # the step timed bare; the host functions' counters from the first timed step on
            ts = synced_steps_ms(fn, fn_args, args.timed, after_warm=lambda: [g.take_counts() for g in passes])
            served = [g.take_counts() for g in passes]
            record["bare_step_ms"] = ts
            record["cpu_busy_ms_per_step"] = sum(b for _, b in served) / args.timed * 1e3
            record["missed_per_step"] = sum(n for n, _ in served) / args.timed
            print(f"bare step: median {statistics.median(ts):.2f} ms; CPU share busy "
                  f"{record['cpu_busy_ms_per_step']:.2f} ms a step, {record['missed_per_step']:.2f} missed a step",
                  flush=True)

            for g in passes:
                g.share.keep_stamps(64)
            calls0 = [int(g.job.calls) for g in passes]
            with tempfile.TemporaryDirectory() as tmp:
                trace = Path(tmp) / "trace.json"
                res = profile(fn, *fn_args, device="cuda", wait=0, warmup=2, active=args.steps, baseline=False,
                              trace_path=trace)
                raw = load_trace(trace)
            # the events' ms are from the first profiled step's start (its ts, in the trace's µs)
            xs = [e for e in raw["traceEvents"] if e.get("ph") == "X" and str(e.get("name", "")).startswith(
                "ProfilerStep#")]
            t0_us = min(float(e["ts"]) for e in xs)
            base_us = float(raw.get("baseTimeNanoseconds", 0)) / 1e3 if t0_us < 1e14 else 0.0
            stamps = []
            for g, c0 in zip(passes, calls0):
                got = g.share.stamps(c0)[-args.steps:]  # the active steps are the last calls
                stamps.append([((a * 1e6 - base_us - t0_us) / 1e3, (b * 1e6 - base_us - t0_us) / 1e3)
                               for a, b in got])
            steps = sorted((e for e in res.events if e.kind == "step"), key=lambda e: e.start)
            per_step = []
            for j, st in enumerate(steps):
                evs = [e for e in res.events if st.start <= e.start < st.end]
                lay_stamps = [stamps[i][j] for i in range(len(passes)) if j < len(stamps[i])]
                layers = layer_segments(evs, lay_stamps if len(lay_stamps) == len(passes) else None)
                per_step.append({"layers": layers, "summary": step_summary(layers, st.ms)})
            record["profiled_steps"] = per_step
            record["events_first_step"] = [
                [e.kind, round(e.start, 4), round(e.end, 4), e.name[:60], e.lane]
                for e in res.events if steps and steps[0].start <= e.start < steps[0].end and e.kind != "cpu_op"]
            print(f"{'segment':>18} " + " ".join(f"step{j}" for j in range(len(per_step))), flush=True)
            for k in (*SEGMENTS, "outside_layers", "step"):
                print(f"{k:>18} " + " ".join(f"{p['summary'][k]:6.2f}" for p in per_step), flush=True)

            # generate on the same engine: what it adds a token beyond the bare step
            kw = s.generate_kwargs(1)
            gen, missed = [], []
            for _ in range(3):
                session.reset_routing()
                r = generate(eng, session.ids, session.mask, max_new_tokens=32, **kw)
                gen.append(r.decode_ms["median"])
                missed.append(reads_from_stats(eng.stats, "decode").missed_per_pass)
            record["generate_decode_median_ms"] = gen
            record["generate_missed_per_pass"] = missed
            print(f"generate: decode median {statistics.median(gen):.2f} ms a token at "
                  f"{statistics.median(missed):.2f} missed a pass, against the bare step's {statistics.median(ts):.2f} "
                  f"ms at {record['missed_per_step']:.2f} (the routing's rows differ)", flush=True)
    record["provenance"] = provenance("cuda")
    print("saved", save_json(record, out_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
