"""How fast this host's memory serves missed experts: a plain read by size, one expert warm and cold, both paths.

Three measurements, each in alternating rounds (median of each round's
median; the spread over rounds is reported):

1. **A plain read** (``sum`` of float32 with the CPU experts' threads) over
   buffers from below to well beyond the last-level cache: the host read rate
   the roofline bound takes (``measure_ceilings``, the calibration) should not
   depend on the buffer's size once it is beyond the cache.
2. **One Mixtral expert, warm and cold**: the same copy of its weights again
   and again (warm: on a host with a 300 MiB cache, part of a 352 MB expert is
   still cached) against cycling through ``costs.cold_copies`` distinct copies
   (cold: what a decode step's CPU experts and copies read). CPU expert with
   torch's matmul and with the toolkit's kernel at one token, and the pinned
   copy to the GPU.
3. **Both paths at once** (with a GPU): copies of cold experts stream to the
   GPU while the CPU threads compute cold experts with the kernel, until the
   copies land: the bytes both paths read together per second, against each
   alone. This is what a layer with a copy and a CPU expert can reach.

Saved to OUT/host_read.json with provenance.

  PYTHONPATH=. python benchmarks/host_read.py --out data/gpu        # the H200 host, ~1 min
  PYTHONPATH=. python benchmarks/host_read.py --quick --out /tmp/x  # small buffers and expert, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.env import cache_bytes
from toolkit.moe import cpu_gemv
from toolkit.moe.costs import (
    _cold_set,
    _cycle,
    _expert_weights,
    _rounds_ms,
    choose_threads,
    expert_forward,
    torch_threads,
)
from toolkit.moe.run import round_spread
from toolkit.results import provenance, save_json


def _summary(per_round: list[float], nbytes: int) -> dict:
    s = round_spread(per_round)
    return {"ms": s["median"], "gbs": nbytes / s["median"] * 1e-6, "spread": s["spread"], "rounds_ms": per_round,
            "anomalous": s["anomalous"]}


def both_paths(copy, cpu, sync, copies: int) -> tuple[int, float]:
    """Queue ``copies`` calls of ``copy()`` on a side stream and run ``cpu()`` until they land -> (CPU calls, s)."""
    stream = torch.cuda.Stream()
    sync()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(copies):
            copy()
        done = torch.cuda.Event()
        done.record(stream)
    n = 0
    while not done.query():
        cpu()
        n += 1
    sync()
    return n, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--sizes-mib", default="128,256,512,1024,2048,4096", help="plain-read buffer sizes")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--threads", type=int, default=None, help="default: the engine's (physical cores - 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=7, help="calls per round and side")
    p.add_argument("--quick", action="store_true", help="small buffers and expert, 2 rounds")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes_mib, a.hidden, a.intermediate, a.rounds, a.reps = "4,16", 256, 512, 2, 3
    try:
        sizes = [int(s) for s in a.sizes_mib.split(",")]
    except ValueError:
        p.error(f"--sizes-mib takes comma-separated sizes in MiB, got {a.sizes_mib!r}")
    if not sizes or min(sizes) <= 0:
        p.error("--sizes-mib needs positive sizes")
    threads = choose_threads(a.threads)
    cuda = torch.cuda.is_available()
    cache = cache_bytes()
    result = {"benchmark": "host_read",
              "provenance": provenance("cuda" if cuda else "cpu",
                                       " ".join(["host_read.py", *(argv if argv is not None else sys.argv[1:])])),
              "settings": {"threads": threads, "rounds": a.rounds, "reps": a.reps, "cache_bytes": cache,
                           "hidden": a.hidden, "intermediate": a.intermediate},
              "plain_read": {}, "expert": {}}
    out = Path(a.out) / "host_read.json"
    with torch_threads(threads), torch.inference_mode():
        bufs = {mib: torch.ones(mib << 20 >> 2) for mib in sizes}
        rounds = _rounds_ms({mib: b.sum for mib, b in bufs.items()}, a.rounds, a.reps)
        for mib in sizes:
            result["plain_read"][f"{mib}"] = r = _summary(rounds[mib], mib << 20)
            print(f"plain read {mib:5d} MiB: {r['gbs']:6.1f} GB/s (spread {r['spread']:.0%})", flush=True)
        del bufs
        save_json(result, out)

        gu, dn = _expert_weights(a.hidden, a.intermediate, torch.bfloat16)
        nbytes = (gu.numel() + dn.numel()) * 2
        cold = _cold_set(gu, dn, torch.bfloat16, cache)
        result["settings"].update(expert_bytes=nbytes, cold_copies=len(cold))
        x = torch.full((1, a.hidden), 0.1, dtype=torch.bfloat16)
        linears = {"torch": F.linear}
        if cpu_gemv.usable():
            linears["kernel"] = cpu_gemv.linear
        sides = {}
        for name, linear in linears.items():
            take = _cycle(cold)
            sides[f"cpu_{name}_warm"] = lambda linear=linear: expert_forward(x, *cold[0], linear=linear)
            sides[f"cpu_{name}_cold"] = lambda linear=linear, take=take: expert_forward(x, *take(), linear=linear)
        rounds = _rounds_ms(sides, a.rounds, a.reps)
        sync = None
        if cuda:
            sync = torch.cuda.synchronize
            pinned = [(w1.pin_memory(), w2.pin_memory()) for w1, w2 in cold]
            g1, g2 = torch.empty_like(gu, device="cuda"), torch.empty_like(dn, device="cuda")

            def copy(src):
                g1.copy_(src[0], non_blocking=True)
                g2.copy_(src[1], non_blocking=True)

            take_pinned = _cycle(pinned)
            rounds.update(_rounds_ms({"copy_warm": lambda: copy(pinned[0]), "copy_cold": lambda: copy(take_pinned())},
                                  a.rounds, a.reps, sync=sync))
        for k, v in rounds.items():
            result["expert"][k] = r = _summary(v, nbytes)
            print(f"{k:17s} {r['ms']:7.2f} ms  {r['gbs']:6.1f} GB/s (spread {r['spread']:.0%})", flush=True)
        save_json(result, out)

        if cuda:
            cpu_linear = linears.get("kernel", F.linear)
            take_cpu = _cycle(cold)
            per_round = []
            for _ in range(a.rounds):
                n, s = both_paths(lambda: copy(take_pinned()), lambda: expert_forward(x, *take_cpu(), linear=cpu_linear),
                                  sync, 4 * len(pinned))
                per_round.append({"copies": 4 * len(pinned), "cpu_experts": n, "s": s,
                                  "gbs": (4 * len(pinned) + n) * nbytes / s * 1e-9})
            gbs = [r["gbs"] for r in per_round]
            s = round_spread(gbs)
            alone = max(result["expert"][f"cpu_{'kernel' if 'kernel' in linears else 'torch'}_cold"]["gbs"],
                        result["expert"]["copy_cold"]["gbs"])
            result["both_paths"] = {"gbs": s["median"], "spread": s["spread"], "rounds": per_round,
                                    "faster_path_alone_gbs": alone, "cpu_linear": "kernel" if "kernel" in linears
                                    else "torch"}
            print(f"both paths at once: {s['median']:.1f} GB/s (spread {s['spread']:.0%}); the faster alone "
                  f"{alone:.1f} GB/s", flush=True)
        largest = result["plain_read"][str(max(sizes))]["gbs"]
        # cpu_warm_over_cold: the warm read rate over the cold one (cold ms / warm ms), per matmul
        result["summary"] = {"plain_read_largest_gbs": largest,
                             "plain_read_median_gbs": statistics.median(r["gbs"] for r in result["plain_read"].values()),
                             "cpu_warm_over_cold": {k: result["expert"][f"cpu_{k}_cold"]["ms"]
                                                    / result["expert"][f"cpu_{k}_warm"]["ms"] for k in linears}}
        save_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
