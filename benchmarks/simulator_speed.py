"""How fast the hit-rate simulator is: routing decisions per second on one CPU core.

A decision is one (token, layer) routing of the trace. Each case times a whole ``simulate()``
call (placement, kernel, result; Belady's look-ahead tables are rebuilt every repetition) after
one warm-up call that compiles or loads the numba kernels. The process is pinned to one core.
Both the wall clock and the process CPU time are recorded: on a shared machine the CPU time is
the better estimate of what one core does. The target is >= 5 M decisions/s for LRU.

  PYTHONPATH=. python benchmarks/simulator_speed.py                      # CPU, ~1 min -> data/simulator_speed.json
  PYTHONPATH=. python benchmarks/simulator_speed.py --quick --out /tmp/x # smoke test, seconds

``--device`` is accepted for uniformity with the other benchmarks; the simulator always runs on
the CPU. Results are saved after every case, so an interruption keeps what was measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BUDGET_S = 150.0  # whole script; cases that would start later are skipped


def pin_to_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def time_case(trace, policy, budget, repeats):
    from toolkit.moe.simulate import simulate

    simulate(trace, policy, budget)  # warm-up: numba compile / cache load
    wall, cpu = [], []
    for _ in range(repeats):
        trace.__dict__.pop("_next_uses", None)  # Belady pays for its look-ahead every time
        w0, c0 = time.perf_counter(), time.process_time()
        r = simulate(trace, policy, budget)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    n = trace.n_tokens * trace.n_layers
    return {
        "policy": policy, "gpu_experts": budget, "decisions": n, "repeats": repeats,
        "wall_s": wall, "cpu_s": cpu,
        "decisions_per_s_wall": n / statistics.median(wall), "decisions_per_s_cpu": n / statistics.median(cpu),
        "hit_rate": r.hit_rate(), "hit_rate_decode": r.hit_rate("decode"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data", help="folder for simulator_speed.json (default data)")
    ap.add_argument("--quick", action="store_true", help="small trace, few cases: a smoke test")
    ap.add_argument("--device", default="cpu", help="ignored: the simulator runs on the CPU")
    args = ap.parse_args(argv)

    from toolkit.moe.policies import HAVE_NUMBA, POLICY_NAMES
    from toolkit.moe.synthetic import synthetic_mixtral
    from toolkit.results import provenance, save_json

    t_start = time.perf_counter()
    core = pin_to_one_core()
    path = Path(args.out) / "simulator_speed.json"
    # synthetic Mixtral-8x7B routing: 32 layers x 8 experts, top-2; batch 1 (one prefill pass per sequence)
    n_seq = 4 if args.quick else 128
    w0 = time.perf_counter()
    trace = synthetic_mixtral(n_sequences=n_seq, prompt_len=128, decode_len=256)
    gen_s = time.perf_counter() - w0
    w0 = time.perf_counter()
    from toolkit.moe.simulate import simulate

    simulate(trace, "lru", 64)
    simulate(trace, "belady", 64)
    first_s = time.perf_counter() - w0
    record = {
        "provenance": provenance("cpu"), "pinned_core": core, "numba": HAVE_NUMBA,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "trace": {"source": "synthetic_mixtral", "n_sequences": n_seq, "prompt_len": 128, "decode_len": 256,
                  "tokens": trace.n_tokens, "passes": trace.n_steps, "layers": trace.n_layers,
                  "decisions": trace.n_tokens * trace.n_layers, "generate_s": gen_s},
        "first_calls_s": first_s, "cases": [], "skipped": [],
    }
    budgets = [64] if args.quick else [32, 64, 128, 192]
    policies = ("lru", "belady") if args.quick else POLICY_NAMES
    repeats = 2 if args.quick else 5
    for policy in policies:
        for budget in budgets:
            if time.perf_counter() - t_start > BUDGET_S:
                record["skipped"].append({"policy": policy, "gpu_experts": budget, "reason": "time budget"})
                continue
            record["cases"].append(time_case(trace, policy, budget, repeats))
            save_json(record, path)
    record["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    lru = [c["decisions_per_s_cpu"] for c in record["cases"] if c["policy"] == "lru"]
    record["lru_min_decisions_per_s_cpu"] = min(lru) if lru else None
    save_json(record, path)

    print(f"{trace.n_tokens * trace.n_layers / 1e6:.2f} M decisions per run, numba={HAVE_NUMBA}, core {core}, "
          f"first calls {first_s:.1f} s; saved {path}")
    print(f"{'policy':<18} {'gpu_experts':>11} {'M dec/s cpu':>12} {'M dec/s wall':>13} {'hit rate':>9}")
    for c in record["cases"]:
        print(f"{c['policy']:<18} {c['gpu_experts']:>11} {c['decisions_per_s_cpu'] / 1e6:>12.1f} "
              f"{c['decisions_per_s_wall'] / 1e6:>13.1f} {c['hit_rate']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
