"""The experts of a decode pass without a host sync: the expert GEMV against grouped_mm and cuBLAS per expert.

A layer whose experts are all resident runs them sync-free
(``OffloadedExperts._on_device``): the expert of each (token, slot) row is read
from device memory. Two kernels can do that: ``torch.nn.functional.grouped_mm``
(CUTLASS) and ``toolkit.moe.gemv.expert_gemv`` (Triton). ``F.linear`` on one
expert's weights (cuBLAS) is the reference rate, but it needs the expert id on
the host. Per projection (Mixtral's gate/up [2I, D] and down [D, I]) and row
count (2: batch 1 at top-2; 4; 8 rows over 4 experts: beams sharing experts),
each kernel's time (CUDA events over back-to-back calls, median of rounds) and
the rate it reads the used experts' weights at; also a grid of GEMV launch
configurations (the engine's is ``gemv.launch_config``), and the largest
difference from ``F.linear``. Then a whole decode pass of one token at top-2
as the engine runs it (``pass``): torch's small ops around two GEMVs
(unfused: the token's row per slot, SiLU, product, routing weight, sum over
slots, counts) against the three fused kernels (``gemv.expert_gate_up_act``,
``gemv.expert_down``, ``gemv.count_rows``), with a grid of launch
configurations of the first two (the engine's are ``gemv.ACT_CONFIG`` and
``gemv.DOWN_CONFIG``).
Saved to OUT/expert_gemv.json.

  PYTHONPATH=. python benchmarks/expert_gemv.py --out data/gpu     # GPU with Triton, ~30 s
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.moe import gemv
from toolkit.results import provenance, save_json

ROWS = {"2": [0, 3], "4": [0, 3, 5, 6], "8 over 4 experts": [0, 3, 5, 6, 0, 3, 5, 6]}
GRID = [(bn, bk, w) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8)]


def time_ms(fn, calls: int = 50, rounds: int = 3) -> float:
    """Median over rounds of the mean time per call of ``calls`` back-to-back calls (CUDA events)."""
    out = []
    for _ in range(rounds):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(5e7))  # the queue fills while the GPU spins: launch time stays out
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / calls)
    return statistics.median(out)


def gemv_with(x, index, weight, bn: int, bk: int, warps: int):
    R, K = x.shape
    N = weight.shape[1]
    out = torch.empty(R, N, device=x.device, dtype=x.dtype)
    gemv._kernel()[(-(-N // bn), R)](x, index, weight, out, N, K, weight.stride(0), weight.stride(1),
                                     BLOCK_N=bn, BLOCK_K=bk, X_DIV=1, num_warps=warps)
    return out


def measure_pass(gate_up: torch.Tensor, down: torch.Tensor, ids: list[int]) -> dict:
    """One token's pass over its experts ``ids`` (its top-k): unfused torch ops against the fused kernels."""
    E, D = gate_up.shape[0], gate_up.shape[2]
    K = len(ids)
    hidden = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    flat = torch.tensor(ids, device="cuda")
    route = torch.softmax(torch.randn(1, K, device="cuda"), -1)  # float32, as transformers' router gives them
    counters = torch.zeros(3, 1, E, dtype=torch.int64, device="cuda")

    def unfused():  # OffloadedExperts._on_device with fused=False
        counts = torch.zeros(E, dtype=torch.int64, device="cuda").index_add_(0, flat, torch.ones_like(flat))
        counters[0, 0] += counts
        counters[1, 0] += counts > 0
        counters[2, 0, 0] += 1
        x = hidden[:, None].expand(1, K, D).reshape(K, -1)
        gate, up = gemv.expert_gemv(x, flat, gate_up).chunk(2, dim=-1)
        y = gemv.expert_gemv(F.silu(gate) * up, flat, down)
        return (y * route.reshape(-1, 1)).to(hidden.dtype).view(1, K, -1).sum(dim=1)

    def fused():
        a = gemv.expert_gate_up_act(hidden, flat, gate_up, per_x=K)
        out = gemv.expert_down(a, flat, down, route)
        gemv.count_rows(flat, counters, 0)
        return out

    a, b = unfused(), fused()
    act = gemv.expert_gate_up_act(hidden, flat, gate_up, per_x=K)
    case = {"experts": ids, "unfused_ms": time_ms(unfused), "fused_ms": time_ms(fused),
            "max_abs_diff": float((a.float() - b.float()).abs().max()),
            "differing_share": float((a != b).float().mean()),
            "act_config": list(gemv.ACT_CONFIG), "down_config": list(gemv.DOWN_CONFIG),
            "gate_up_ms": time_ms(lambda: gemv.expert_gemv(hidden, flat, gate_up, per_x=K)),
            "act_grid_ms": {f"{bn}/{bk}/{w}": time_ms(functools.partial(
                gemv.expert_gate_up_act, hidden, flat, gate_up, K, (bn, bk, w)), rounds=1)
                for bn in (8, 16, 32) for bk in (64, 128, 256) for w in (4, 8)},
            "down_grid_ms": {f"{bn}/{bk}/{w}": time_ms(functools.partial(
                gemv.expert_down, act, flat, down, route, (bn, bk, w)), rounds=1)
                for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)}}
    used_mb = len(set(ids)) * (gate_up[0].numel() + down[0].numel()) * 2 / 1e6
    for k in ("unfused", "fused"):
        case[f"{k}_tbs"] = used_mb / case[f"{k}_ms"] / 1e6 * 1e3
    return case


def measure_case(ids: list[int], w: torch.Tensor, n_experts: int) -> dict:
    """One projection's weights w [E, N, K] for rows routed to ``ids``: each kernel's time, rate and error."""
    index = torch.tensor(ids, device="cuda")
    order = torch.sort(index, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device="cuda").index_add_(0, index, torch.ones_like(index))
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(len(ids), w.shape[2], device="cuda", dtype=torch.bfloat16)
    used_mb = len(set(ids)) * w[0].numel() * 2 / 1e6  # each used expert's weights, once
    ref = torch.stack([F.linear(x[r], w[e]) for r, e in enumerate(ids)])
    case = {"used_experts": len(set(ids)), "used_mb": used_mb,
            "linear_per_row_ms": time_ms(lambda: [F.linear(x[r:r + 1], w[e]) for r, e in enumerate(ids)]),
            "grouped_mm_ms": time_ms(lambda: F.grouped_mm(x[order], w.transpose(1, 2), offs=offs)),
            "gemv_ms": time_ms(lambda: gemv.expert_gemv(x, index, w)),
            "gemv_max_abs_diff": float((gemv.expert_gemv(x, index, w).float() - ref.float()).abs().max()),
            "grid_ms": {}}
    for bn, bk, warps in GRID:
        case["grid_ms"][f"{bn}/{bk}/{warps}"] = time_ms(functools.partial(gemv_with, x, index, w, bn, bk, warps),
                                                        rounds=1)
    for k in ("linear_per_row", "grouped_mm", "gemv"):
        case[f"{k}_tbs"] = used_mb / case[f"{k}_ms"] / 1e6 * 1e3
    return case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not gemv.usable(torch.device("cuda"), 1):
        p.error("needs a CUDA GPU and Triton")
    torch.manual_seed(0)
    E, D, inter = a.experts, a.hidden, a.intermediate
    weights = {"gate_up": torch.randn(E, 2 * inter, D, device="cuda", dtype=torch.bfloat16) * 0.02,
               "down": torch.randn(E, D, inter, device="cuda", dtype=torch.bfloat16) * 0.02}
    result = {"benchmark": "expert_gemv",
              "provenance": provenance("cuda", " ".join(["expert_gemv.py", *(argv or sys.argv[1:])])),
              "settings": {"experts": E, "hidden": D, "intermediate": inter, "dtype": "bfloat16",
                           "engine_block_n": gemv.BLOCK_N, "max_rows": gemv.MAX_ROWS}, "cases": {}}
    for rows, ids in ROWS.items():
        for name, w in weights.items():
            case = measure_case(ids, w, E)
            result["cases"][f"{name}, {rows} rows"] = case
            print(f"{name:8s} {rows:17s} linear {case['linear_per_row_ms']:.3f} ms  grouped_mm "
                  f"{case['grouped_mm_ms']:.3f} ms ({case['grouped_mm_tbs']:.2f} TB/s)  gemv {case['gemv_ms']:.3f} ms "
                  f"({case['gemv_tbs']:.2f} TB/s)  best of grid {min(case['grid_ms'].items(), key=lambda kv: kv[1])}",
                  flush=True)
            save_json(result, Path(a.out) / "expert_gemv.json")
    case = measure_pass(weights["gate_up"], weights["down"], [0, 3])
    result["pass"] = case
    print(f"decode pass, 1 token, top-2: unfused {case['unfused_ms']:.3f} ms ({case['unfused_tbs']:.2f} TB/s)  "
          f"fused {case['fused_ms']:.3f} ms ({case['fused_tbs']:.2f} TB/s)  max |diff| {case['max_abs_diff']:.3g}; "
          f"gate/up alone {case['gate_up_ms']:.3f} ms; best gate/up+act "
          f"{sorted(case['act_grid_ms'].items(), key=lambda kv: kv[1])[:3]}; best down "
          f"{sorted(case['down_grid_ms'].items(), key=lambda kv: kv[1])[:3]}", flush=True)
    save_json(result, Path(a.out) / "expert_gemv.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
