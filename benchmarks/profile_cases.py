"""GPU evidence for the profiler's verdicts: where the time goes in a few typical cases.

- efficientnet-b0 at batch 1, 64 and a large batch (``--batch``, default 256, e.g. the optimal batch
  from batch_search): small batches leave the GPU idle while Python launches kernels (host-bound);
  the large one keeps it busy (gpu-bound);
- copy-bound: a half-precision efficientnet-b0 fed fp32 images from pageable host memory in every
  call, and the remedy (pinned memory, non_blocking copy) next to it;
- one decode step of the offloaded MoE engine on Mixtral-8x7B dimensions (4 layers), built and
  offloaded by ``toolkit.moe.run.MoESession`` with the defaults of every MoE run (our scheme, the
  synthetic Mixtral routing): per layer, how long the CPU experts ran and whether the GPU was busy
  meanwhile; its timeline events are kept
  (for the Gantt plot) and its Chrome trace saved gzipped when under 5 MB.

  PYTHONPATH=. python benchmarks/profile_cases.py --out data/gpu            # GPU, ~2 min
  PYTHONPATH=. python benchmarks/profile_cases.py --quick --device cpu --out /tmp/x   # CPU smoke test

Writes OUT/profile_cases.json (provenance, one record per case, skipped cases with the reason) after
every case, so an interruption keeps what was measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from toolkit.env import resolve_device
from toolkit.errors import ToolkitError
from toolkit.profiling import profile
from toolkit.results import provenance, save_json

BUDGET_S = 170.0  # whole script on the GPU; cases that would start later are skipped with the reason
TRACE_LIMIT_BYTES = 5_000_000


def _steps(quick: bool) -> dict:
    """Profiler schedule and plain-timer budget: the defaults on the GPU, the least that works for a smoke test."""
    return dict(wait=0, warmup=1, active=1, baseline_s=0.5) if quick else dict(wait=1, warmup=2, active=3, baseline_s=3.0)


def model_case(name, batch, device, quick, expect):
    from toolkit.models import forward_step

    fn, args, label = forward_step(name, batch, device)
    r = profile(fn, *args, device=device, **_steps(quick), label=label)
    return r, {"model": name, "batch_size": batch, "expect": expect}


def copy_case(name, batch, device, quick, pinned):
    """fp32 images on the host, model in half precision on the device: the copy is half the bytes moved."""
    from toolkit.models import build_model

    half = torch.float16 if device.startswith("cuda") else torch.float32  # CPU smoke test: no fp16 convs
    bench = build_model(name, device=device, dtype=half)
    s = bench.spec.image_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))  # [B, C, H, W] fp32, host
    if pinned and device.startswith("cuda"):
        x = x.pin_memory()

    def step(x):
        return bench(x.to(device, non_blocking=pinned).to(half))

    kind = "pinned, non_blocking" if pinned else "pageable"
    label = f"{name} batch {batch}, fp32 host input ({kind}), {str(half).split('.')[-1]} model"
    r = profile(step, x, device=device, **_steps(quick), label=label)
    return r, {"model": name, "batch_size": batch, "input": f"host fp32 {kind}", "input_bytes": x.nbytes,
               "expect": None if pinned else "copy-bound"}


def moe_case(preset, layers, gpu_experts, device, quick, out_dir):
    """One decode step of the engine, built and offloaded as every MoE run is (``toolkit.moe.run.MoESession``)."""
    from toolkit.moe.run import MoESession

    trace = out_dir / "profile_moe_trace.json.gz"
    with MoESession(preset=preset, layers=layers, gpu_experts=gpu_experts, device=device) as session, \
            session.offload() as engine:
        fn, args, label = session.decode_step(engine)
        r = profile(fn, *args, device=device, **_steps(quick), trace_path=trace, label=label)
        stats = engine.stats.to_dict()
    extra = {"preset": preset, "layers": layers, "gpu_experts": gpu_experts, "routing": session.routing_name,
             "scheme": session.settings.scheme, "overlap": r.overlap().to_dict("records"), "expert_stats": stats,
             "events_kept": True}
    size = trace.stat().st_size
    if size > TRACE_LIMIT_BYTES:
        trace.unlink()
        extra["trace_dropped"] = f"{size} bytes > {TRACE_LIMIT_BYTES}"
    else:
        extra["trace_file"] = trace.name
        extra["trace_bytes"] = size
    return r, extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu", help="output folder (default data/gpu)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for the smoke test")
    ap.add_argument("--quick", action="store_true", help="tiny models, fewer steps: a smoke test")
    ap.add_argument("--batch", type=int, default=256,
                    help="the large batch of efficientnet-b0, e.g. its optimal batch from batch_search (default 256)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    out_dir = Path(args.out)
    out = out_dir / "profile_cases.json"
    t0 = time.monotonic()
    doc = {"provenance": provenance(device, "PYTHONPATH=. python " + " ".join(sys.argv)),
           "quick": args.quick, "budget_s": BUDGET_S, "cases": {}, "skipped": {}, "complete": False}

    q = args.quick
    eff = "tiny-efficientnet" if q else "efficientnet-b0"
    mid, big = (4, 8) if q else (64, args.batch)
    cases = [
        ("effnet_b1", lambda: model_case(eff, 1, device, q, "host-bound")),
        (f"effnet_b{mid}", lambda: model_case(eff, mid, device, q, None)),
        (f"effnet_b{big}", lambda: model_case(eff, big, device, q, "gpu-bound")),
        ("copy_pageable", lambda: copy_case(eff, big, device, q, pinned=False)),
        ("copy_pinned", lambda: copy_case(eff, big, device, q, pinned=True)),
        ("moe_decode", lambda: moe_case("tiny-mixtral" if q else "mixtral-8x7b", 2 if q else 4, 4 if q else 8,
                                        device, q, out_dir)),
    ]
    try:
        for name, run in cases:
            if time.monotonic() - t0 > BUDGET_S:
                doc["skipped"][name] = f"time budget of {BUDGET_S:.0f} s used up"
                continue
            print(f"[profile_cases] {name} ...", file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                r, extra = run()
            except (ImportError, ToolkitError) as e:  # e.g. the MoE engine not importable
                doc["skipped"][name] = f"{type(e).__name__}: {e}"
                save_json(doc, out)
                continue
            rec = r.to_dict(events=(name == "moe_decode"))
            rec.update(extra, seconds=time.monotonic() - start)
            if extra.get("expect"):
                rec["as_expected"] = r.verdict == extra["expect"]
            doc["cases"][name] = rec
            save_json(doc, out)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        doc["complete"] = True
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("[profile_cases] interrupted: saving what was measured", file=sys.stderr)
    doc["seconds"] = time.monotonic() - t0
    save_json(doc, out)

    print(f"\n{'case':<16} {'verdict':<11} {'busy':>6} {'copy ms':>9} {'syncs':>6} {'step ms':>9} "
          f"{'latency':>9} {'overhead':>9}")
    for name, c in doc["cases"].items():
        lat = f"{c['latency_ms']:.3f}" if c.get("latency_ms") else "-"
        ovh = f"{100 * c['overhead']:+.0f}%" if c.get("overhead") is not None else "-"
        print(f"{name:<16} {c['verdict']:<11} {100 * c['gpu_busy_fraction']:5.0f}% {c['copy_ms']:9.3f} "
              f"{c['sync_count']:6d} {c['profiled_step_ms']:9.3f} {lat:>9} {ovh:>9}")
    for name, why in doc["skipped"].items():
        print(f"{name:<16} skipped: {why}")
    moe = doc["cases"].get("moe_decode")
    if moe and moe["overlap"]:
        print("\nMoE decode step: CPU experts vs GPU busy, per layer (totals over the active steps)")
        for row in moe["overlap"]:
            print(f"  L{row['layer']}: cpu_experts {row['moe.cpu_experts_ms']:.3f} ms, GPU busy meanwhile "
                  f"{row['gpu_busy_during_ms']:.3f} ms ({100 * row['overlap_fraction']:.0f}%)")
    print(f"\nwrote {out} ({os.path.getsize(out)} bytes) in {doc['seconds']:.0f} s")
    return 130 if doc.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
