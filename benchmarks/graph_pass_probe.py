"""Where a captured offloaded decode step spends its time: its copies, the CPU's share, a profile.

A probe of ``toolkit.moe.graph_pass`` on one GPU, in two parts:

1. the copies of a missed expert's GPU units (k = 6000 of Mixtral's 14336)
   as a captured graph replays them: one contiguous copy of the same bytes,
   the gate/up rows as one 2-D copy, the down projection's columns as one
   2-D copy, both as a captured pass queues them, and both inside a
   conditional node (ms and GB/s, medians of 8 replays);
2. the engine's decode step (``MoESession.decode_step``, 8 layers, 14 of 64
   experts, uniform routing), captured (graph_misses on), per-layer, and
   captured again: 20 steps each after 5 unmeasured, the CPU's share busy
   time a step (the host function's own clock) and missed experts a step;
   and a torch.profiler table of two captured steps.

Saved to OUT/graph_pass_probe.json (a step's record is keyed by the switch, so
the second captured engine's overwrites the first's).

  PYTHONPATH=. python benchmarks/graph_pass_probe.py --out data/gpu    # one H200, ~1 min, 45 GB of pinned memory
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from host_functions import replay_ms, synced_steps_ms

from toolkit.moe import conditional
from toolkit.moe.run import MoESession, MoESettings
from toolkit.results import provenance, save_json

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default="data/gpu")
OUT_DIR = ap.parse_args().out
if not torch.cuda.is_available():
    raise SystemExit("graph_pass_probe: needs a CUDA GPU")

D, INTER, K_UNITS = 4096, 14336, 6000  # Mixtral-8x7B; the GPU's units of a missed expert


def copies_probe() -> dict:
    """The GPU units of one missed expert copied by a replayed graph, five ways: ms and GB/s of each."""
    k = K_UNITS
    gu = torch.empty(2 * INTER, D, dtype=torch.bfloat16, pin_memory=True).uniform_(-0.01, 0.01)
    dn = torch.empty(D, INTER, dtype=torch.bfloat16, pin_memory=True).uniform_(-0.01, 0.01)
    flat = torch.empty(3 * k * D, dtype=torch.bfloat16, pin_memory=True)
    sgu = torch.empty(2 * INTER, D, dtype=torch.bfloat16, device="cuda")
    sdn = torch.empty(D, INTER, dtype=torch.bfloat16, device="cuda")
    sflat = torch.empty(3 * k * D, dtype=torch.bfloat16, device="cuda")
    conditional.prepare()

    def g_gu():
        conditional.copy_2d(sgu.view(2, INTER, -1)[:, :k].reshape(2, -1), gu.view(2, INTER, -1)[:, :k].reshape(2, -1))

    def g_dn():
        conditional.copy_2d(sdn[:, :k], dn[:, :k])

    def g_flat():
        sflat.copy_(flat, non_blocking=True)

    yes = torch.ones(1, dtype=torch.bool, device="cuda")
    out = {}
    for name, fn, nbytes in (("contiguous 3kD", g_flat, 3 * k * D * 2), ("gate/up 2-D (2 rows)", g_gu, 2 * k * D * 2),
                             ("down 2-D (D rows of k)", g_dn, k * D * 2),
                             ("both as _copy_share", lambda: (g_gu(), g_dn()), 3 * k * D * 2),
                             ("both in a conditional node",
                              lambda: conditional.conditional(yes)(0, lambda: (g_gu(), g_dn())), 3 * k * D * 2)):
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # the warm-up
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            fn()
        ms = replay_ms(graph, 8)
        out[name] = {"ms": ms, "gbs": nbytes / ms / 1e6}
        print(f"{name:30s} {ms:7.3f} ms {nbytes / ms / 1e6:6.1f} GB/s", flush=True)
    return out


def steps_probe(out: dict) -> None:
    """The engine's decode step captured, per-layer and captured again; a profile of the first captured one."""
    s = MoESettings(preset="mixtral-8x7b", layers=8, gpu_experts=14, routing="uniform", new_tokens=32, device="cuda")
    with MoESession(s) as session:
        for gm in (True, False, True):
            session.settings = session.settings.replace(graph_misses=gm)
            with session.offload(14, schedule="inline") as eng:
                fn, args, _ = session.decode_step(eng)
                gps = [m.graph_pass for m in eng.experts if m.graph_pass is not None]
                ts = synced_steps_ms(fn, args, 20, after_warm=lambda gps=gps: [g.take_counts() for g in gps])
                busy = sum(g.job.busy_s for g in gps)
                served = [g.take_counts()[0] for g in gps]
                med = float(np.median(ts))
                print(f"graph_misses={gm}: step median {med:.2f} ms (min {min(ts):.2f}), CPU share busy "
                      f"{busy / 20 * 1e3:.2f} ms/step, missed experts/step {sum(served) / 20:.2f}", flush=True)
                out[f"step_{gm}"] = {"ms": ts, "cpu_busy_ms_per_step": busy / 20 * 1e3,
                                     "missed_per_step": sum(served) / 20}
                if gm and "profile" not in out:
                    from torch.profiler import ProfilerActivity, profile

                    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        for _ in range(2):
                            fn(*args)
                        torch.cuda.synchronize()
                    out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
                    print(out["profile"], flush=True)


out = copies_probe()
steps_probe(out)
out["provenance"] = provenance("cuda")
print("saved", save_json(out, Path(OUT_DIR) / "graph_pass_probe.json"))
