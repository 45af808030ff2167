"""CPU experts at a few tokens: the toolkit's bf16 kernel against torch's matmul, as the engine runs them.

One Mixtral-sized SwiGLU expert (``toolkit.moe.costs.expert_forward``: gate/up
[2I, D], act, down [D, I]) in bf16 on the CPU threads the engine uses
(``choose_threads``), at 1 to 128 tokens, with ``F.linear`` (torch)
and with ``toolkit.moe.cpu_gemv.linear`` (the kernel, as the engine calls
it); where the CPU has AMX also with each of the kernel's paths forced
(``vector``: AVX-512 dot products, ``amx``: tile multiplies), which shows
where its switch between them (``AMX_FROM_TOKENS``) should sit. Rounds
alternate the sides, so a slow spell of the host hits all; per token count the median over
rounds of each round's median, the rate the weights are read at, the ratio
(torch / kernel) and each side's spread over rounds. Each call reads its
weights from memory, as a decode step's CPU experts do: the calls cycle
through distinct copies of the expert (``costs.cold_copies``, as the
calibration does), not one copy that stays partly in the cache. For scale: the host's
read rate with the same threads (a sum over 4 GiB) and the same expert with
float32 weights (twice the bytes, torch's matmul), and the largest difference
between the two results. Saved to OUT/cpu_gemv.json; a ratio below 1 at one
token says the kernel does not pay on this machine (the calibration then
keeps torch's matmul).

  PYTHONPATH=. python benchmarks/cpu_gemv.py --out data/gpu              # the H200 host, ~1 min
  PYTHONPATH=. python benchmarks/cpu_gemv.py --quick --out /tmp/x        # small expert, a few seconds
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

from toolkit.env import cache_bytes
from toolkit.moe import cpu_gemv
from toolkit.moe.costs import (
    _cold_set,
    _cycle,
    _expert_weights,
    _median_ms,
    _rounds_ms,
    choose_threads,
    expert_forward,
    torch_threads,
)
from toolkit.moe.run import round_spread
from toolkit.results import provenance, save_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    p.add_argument("--paths", default=None,
                   help="the kernel's paths timed beside torch, from auto,vector,amx (default: all three where AMX "
                        "runs, else auto)")
    p.add_argument("--threads", type=int, default=None, help="default: the engine's (physical cores - 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=10, help="calls per round and side")
    p.add_argument("--quick", action="store_true", help="a small expert, 2 rounds")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.intermediate, a.rounds, a.reps = 512, 1792, 2, 3
    reason = cpu_gemv.why_not()
    if reason is not None:
        print(f"error: the CPU kernel cannot run here: {reason}", file=sys.stderr)
        return 2
    try:
        tokens = [int(t) for t in a.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens takes comma-separated token counts, got {a.tokens!r}")
    paths = (a.paths or ("auto,vector,amx" if cpu_gemv.amx() else "auto")).split(",")
    if any(q not in cpu_gemv.PATHS for q in paths):
        p.error(f"--paths takes comma-separated paths from {', '.join(cpu_gemv.PATHS)}, got {a.paths!r}")
    # "kernel" is the engine's call (auto); a forced path is named after itself
    linears = {"kernel" if q == "auto" else q: functools.partial(cpu_gemv.linear, path=q) for q in paths}
    threads = choose_threads(a.threads)
    gu, dn = _expert_weights(a.hidden, a.intermediate, torch.bfloat16)
    nbytes = (gu.numel() + dn.numel()) * 2
    cold = _cold_set(gu, dn, torch.bfloat16, cache_bytes())
    result = {"benchmark": "cpu_gemv",
              "provenance": provenance("cpu", " ".join(["cpu_gemv.py", *(argv if argv is not None else sys.argv[1:])])),
              "settings": {"hidden": a.hidden, "intermediate": a.intermediate, "dtype": "bfloat16",
                           "threads": threads, "rounds": a.rounds, "reps": a.reps, "expert_bytes": nbytes,
                           "cold_copies": len(cold), "amx": cpu_gemv.amx(), "amx_from_tokens": cpu_gemv.AMX_FROM_TOKENS,
                           "paths": paths},
              "cases": {}}
    out = Path(a.out) / "cpu_gemv.json"
    with torch_threads(threads), torch.inference_mode():
        buf = torch.ones(4 << 30 >> 2, dtype=torch.float32) if not a.quick else torch.ones(1 << 24)
        result["host_read_gbs"] = buf.numel() * 4 / _median_ms(buf.sum, 5, 1) * 1e-6
        del buf
        take32 = _cycle(_cold_set(gu, dn, torch.float32, cache_bytes()))  # cold too, like both sides
        x1 = torch.full((1, a.hidden), 0.1)
        ms32 = _median_ms(lambda take32=take32: expert_forward(x1, *take32()), a.reps, 1)
        result["float32_weights"] = {"ms": ms32, "gbs": 2 * nbytes / ms32 * 1e-6}
        del take32
        print(f"host read {result['host_read_gbs']:.1f} GB/s with {threads} threads; float32 weights at 1 token "
              f"{ms32:.2f} ms ({2 * nbytes / ms32 * 1e-6:.1f} GB/s)", flush=True)
        for n in tokens:
            x = torch.randn(n, a.hidden, generator=torch.Generator().manual_seed(n)).bfloat16()
            take = _cycle(cold)
            sides = {"torch": lambda x=x, take=take: expert_forward(x, *take())}
            for side, linear in linears.items():
                sides[side] = lambda x=x, take=take, linear=linear: expert_forward(x, *take(), linear=linear)
            rounds = _rounds_ms(sides, a.rounds, a.reps)
            ms = {k: statistics.median(v) for k, v in rounds.items()}
            ref = expert_forward(x, gu, dn).float()
            case = {"tokens": n, "rounds_ms": rounds}
            for side in sides:
                case[f"{side}_ms"] = ms[side]
                case[f"{side}_gbs"] = nbytes / ms[side] * 1e-6
                case[f"{side}_spread"] = round_spread(rounds[side])["spread"]
            for side in sides:
                if side != "torch":
                    case["speedup" if side == "kernel" else f"{side}_speedup"] = ms["torch"] / ms[side]
            for side, linear in linears.items():
                got = expert_forward(x, gu, dn, linear=linear).float()
                case["max_abs_diff" if side == "kernel" else f"{side}_max_abs_diff"] = (got - ref).abs().max().item()
            result["cases"][str(n)] = case
            print(f"{n:3d} tokens: " + "  ".join(
                f"{side} {ms[side]:6.2f} ms ({case[side + '_gbs']:5.1f} GB/s, spread {case[side + '_spread']:.0%})"
                for side in sides) + "  " + "  ".join(
                f"{k} x{v:.2f}" for k, v in case.items() if k.endswith("speedup")) +
                f"  max diff {max(v for k, v in case.items() if k.endswith('max_abs_diff')):.3g}", flush=True)
            save_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
