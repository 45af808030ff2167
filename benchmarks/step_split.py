"""Where an all-resident decode step's time goes: the GPU's kernels against the host's work around them.

Every expert resident (scheme all-gpu), each decode step one CUDA graph. Per
variant (the engine's fused kernels on or off, ``offload(fused=...)``), in
alternating rounds, each round on a freshly offloaded model:

- ``generate_ms``: the median decode step of ``MoESession.run`` (the path the
  CLI measures: ``generate``, steps timed with CUDA events, warmed up);
- ``gpu_ms``: the bare decode step (``MoESession.decode_step``, the same
  replayed graph) called back to back between two CUDA events. The host
  launches a step faster than the GPU runs it (``launch_ms``), so the queue
  stays full and this is the GPU's time per step;
- ``launch_ms``: the host's time per call of that loop (the decoder's
  Python around the replay, the lm_head, the cache's rewind);
- ``kernels`` / ``kernel_ms``: GPU activities per step and their summed
  time (torch.profiler over ``--profiled`` steps).

``generate_ms - gpu_ms`` is the time a step of ``generate`` adds beyond the
GPU's own: its host work after the stopping check's sync, while the GPU
waits. Saved to OUT/step_split.json after every round (``RunRecord``): an interrupted run keeps
what it measured.

  PYTHONPATH=. python benchmarks/step_split.py --out data/gpu      # one H200, ~2 min at 8 layers
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from toolkit.errors import ToolkitError
from toolkit.moe.baselines import get_baseline
from toolkit.moe.run import MoESession, MoESettings
from toolkit.results import RunRecord, provenance

VARIANTS = {"fused": {}, "unfused": {"fused": False}}


def gpu_and_launch_ms(step, args, calls: int) -> tuple[float, float]:
    """(GPU ms per step over ``calls`` back-to-back calls, host ms per call while launching them)."""
    with torch.no_grad():
        for _ in range(3):
            step(*args)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            step(*args)
        launch = (time.perf_counter() - t0) * 1e3 / calls
        b.record()
        torch.cuda.synchronize()
    return a.elapsed_time(b) / calls, launch


def kernels_per_step(step, args, steps: int) -> tuple[float, float]:
    """(GPU activities per step, their summed ms per step) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step(*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(*args)
            torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(gpu) / steps, sum(e.device_time for e in gpu) / 1e3 / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--routing", default="uniform")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=50, help="back-to-back steps timed for gpu_ms")
    p.add_argument("--profiled", type=int, default=5, help="steps under torch.profiler for the kernel counts")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    settings = MoESettings(preset=a.preset, layers=a.layers, gpu_experts="all", routing=a.routing,
                           new_tokens=a.new_tokens, device="cuda")
    record = {"benchmark": "step_split", "status": "running",
              "provenance": provenance("cuda", " ".join(["step_split.py", *(argv or sys.argv[1:])])),
              "settings": dataclasses.asdict(settings), "rounds": {v: [] for v in VARIANTS}, "medians": {}}
    run = RunRecord("step_split", Path(a.out) / "step_split.json", record)
    base = get_baseline("all-gpu")
    try:
        with MoESession(settings) as session:
            for r in range(a.rounds):
                for name, change in VARIANTS.items():
                    scheme = dataclasses.replace(base, name=f"all-gpu-{name}", **change)
                    measured = session.run(scheme=scheme)
                    with session.offload(scheme=scheme) as engine:
                        step, args, _ = session.decode_step(engine)
                        gpu, launch = gpu_and_launch_ms(step, args, a.calls)
                        n, kms = kernels_per_step(step, args, a.profiled)
                        fused = engine.fused_dict()
                    rec = {"generate_ms": measured.generation.decode_ms["median"],
                           "tokens_per_s": measured.decode_tokens_per_s, "gpu_ms": gpu, "launch_ms": launch,
                           "kernels": n, "kernel_ms": kms, "fused": fused}
                    record["rounds"][name].append(rec)
                    record["medians"] = medians(record["rounds"])
                    run.log(f"round {r + 1} {name:8s} generate {rec['generate_ms']:.3f} ms/step "
                            f"({rec['tokens_per_s']:.1f} tok/s)  GPU back to back {gpu:.3f} ms  host launch "
                            f"{launch:.3f} ms/call  {n:.0f} GPU activities, {kms:.3f} ms of them")
                    run.save()
        run.save("complete")
    except (KeyboardInterrupt, ToolkitError) as e:
        return run.stopped(e)
    for name, m in record["medians"].items():
        print(f"{name:8s} median: generate {m['generate_ms']:.3f} ms, GPU {m['gpu_ms']:.3f} ms, "
              f"generate beyond the GPU {m['generate_ms'] - m['gpu_ms']:.3f} ms, {m['kernels']:.0f} GPU activities")
    return 0


def medians(rounds: dict) -> dict:
    """Per variant with at least one round: the median of each measured quantity over its rounds."""
    return {name: {k: statistics.median(x[k] for x in rs) for k in
                   ("generate_ms", "tokens_per_s", "gpu_ms", "launch_ms", "kernels", "kernel_ms")}
            for name, rs in rounds.items() if rs}

if __name__ == "__main__":
    sys.exit(main())
