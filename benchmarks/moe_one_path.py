"""Does the command a user runs measure what the benchmark publishes? ``python -m toolkit moe`` against ``moe_decode.py``.

Each side runs as a user would run it, in a fresh process, alternating (CLI, benchmark, CLI, ...)
so that a slow spell of the machine hits both:

- the CLI: ``python -m toolkit moe --preset P --layers L --gpu-experts K --new-tokens N --routing R
  --json --out ...`` with every other setting at its default (warm-up included);
- the benchmark: ``benchmarks/moe_decode.py --schemes ours --routings R --groups compare --no-prefill
  --no-beam --rounds B`` (``--bench-rounds``, default 2): scheme ``ours``, B rounds in one process, its
  median round.

Both go through ``toolkit.moe.run.MoESession`` and plan from the same cost model: the per-machine
calibration cache is shared (the first process measures it, the others read it; two calibrations
of the same machine differ by a few percent, enough to move a batch-1 miss between the CPU and a
copy). The ratio CLI / benchmark of the medians over processes is the check (target: within 5%).
Each process's duration is logged; one that would not finish within ``--budget-s`` is not started.
Saved to OUT/moe_one_path.json after every process, with provenance and the commands.

  PYTHONPATH=. python benchmarks/moe_one_path.py --out data/gpu                 # GPU, ~8 minutes
  PYTHONPATH=. python benchmarks/moe_one_path.py --quick --device cpu --out /tmp/x  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toolkit.results import provenance, save_json  # noqa: E402

TARGET = 0.05  # CLI within 5% of the benchmark


def cli_command(a, out: Path) -> list[str]:
    return [sys.executable, "-m", "toolkit", "moe", "--preset", a.preset, "--layers", str(a.layers),
            "--gpu-experts", str(a.gpu_experts), "--new-tokens", str(a.new_tokens), "--routing", a.routing,
            "--device", a.device, "--json", "--out", str(out)]


def bench_command(a, out: Path) -> list[str]:
    total = a.layers * a.experts_per_layer
    cmd = [sys.executable, str(REPO / "benchmarks" / "moe_decode.py"), "--preset", a.preset, "--layers",
           str(a.layers), "--budget", f"{a.gpu_experts}/{total}", "--new-tokens", str(a.new_tokens),
           "--schemes", "ours", "--routings", a.routing, "--groups", "compare", "--no-prefill", "--no-beam",
           "--rounds", str(a.bench_rounds), "--device", a.device, "--out", str(out)]
    return cmd + (["--quick"] if a.quick else [])


def run(cmd: list[str], timeout: float) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = 124, f"timed out after {timeout:.0f} s: {str(e.stdout or '')[-1000:]}"
    return rc, time.perf_counter() - t0, tail


def cli_record(path: Path) -> dict:
    d = json.loads(path.read_text())
    return {"decode_tokens_per_s": d["decode_tokens_per_s"], "decode_ms": d.get("decode_ms"),
            "prefill_ms": d.get("prefill_ms"), "hit_rate": d.get("hit_rate"), "schedule": d.get("schedule"),
            "warmup": d.get("warmup"), "warnings": d.get("warnings"), "gpu_experts": d.get("gpu_experts"),
            "cpu_threads": d.get("cpu_threads"), "settings": d.get("settings")}


def bench_record(path: Path, routing: str) -> dict:
    d = json.loads(path.read_text())
    runs = [r for r in d["runs"] if r.get("scheme") == "ours" and r.get("routing") == routing]
    if not runs:
        raise ValueError(f"no 'ours' run under routing {routing!r} in {path}")
    dec = runs[0]["decode"]
    return {"decode_tokens_per_s": dec["rounds"]["median"], "rounds_tokens_per_s": dec["rounds"]["values"],
            "spread": dec["rounds"]["spread"], "anomalous": runs[0].get("anomalous"),
            "schedule": runs[0].get("schedule"), "warmup": dec.get("warmup"), "bound": dec.get("bound")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/gpu")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny-mixtral on few tokens: a smoke test")
    p.add_argument("--routing", default="uniform", help="uniform or a trace name (default uniform)")
    p.add_argument("--pairs", type=int, default=2, help="CLI/benchmark pairs, alternating (default 2)")
    p.add_argument("--bench-rounds", type=int, default=2, help="rounds of the benchmark process (default 2)")
    p.add_argument("--timeout-s", type=float, default=240.0, help="per process")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="whole run: a process expected to end after this is not started (default 570)")
    a = p.parse_args(argv)
    if a.pairs < 1 or a.bench_rounds < 1:
        p.error("--pairs and --bench-rounds must be >= 1")
    t_start = time.perf_counter()
    if a.quick:
        a.preset, a.layers, a.experts_per_layer, a.gpu_experts, a.new_tokens = "tiny-mixtral", 2, 8, 4, 8
    else:
        a.preset, a.layers, a.experts_per_layer, a.gpu_experts, a.new_tokens = "mixtral-8x7b", 8, 8, 14, 64
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": "moe_one_path",
           "what": (f"python -m toolkit moe (a fresh process, defaults) against moe_decode.py scheme 'ours' "
                    f"(3 rounds in one process, median), {a.preset} dims, {a.layers} layers, {a.gpu_experts} of "
                    f"{a.layers * a.experts_per_layer} experts on the GPU, batch 1, {a.new_tokens} tokens after 16, "
                    f"{a.routing} routing; alternating processes"),
           "target": f"CLI median within {TARGET:.0%} of the benchmark median",
           "runs": {"cli": [], "benchmark": []}, "provenance": provenance(device=a.device, command=" ".join(sys.argv))}
    target = out / "moe_one_path.json"
    took: dict[str, float] = {}  # side -> seconds of its last process (the first CLI one calibrates: longer)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            for side in ("cli", "benchmark"):
                left = a.budget_s - (time.perf_counter() - t_start)
                if side in took and took[side] > left:
                    rec.setdefault("not_started", []).append(f"{side} {i}: ~{took[side]:.0f} s needed, {left:.0f} s left")
                    print(f"{side:9s} {i}: not started, ~{took[side]:.0f} s needed, {left:.0f} s left", flush=True)
                    continue
                where = Path(tmp) / f"{side}{i}"
                where.mkdir()
                cmd = cli_command(a, where / "cli.json") if side == "cli" else bench_command(a, where)
                rc, secs, tail = run(cmd, a.timeout_s)
                took[side] = secs
                entry = {"command": " ".join(cmd[1:]), "rc": rc, "seconds": round(secs, 1)}
                try:
                    entry.update(cli_record(where / "cli.json") if side == "cli"
                                 else bench_record(where / "moe_decode.json", a.routing))
                except (OSError, ValueError, KeyError) as err:
                    entry["error"] = f"{type(err).__name__}: {err}; output: {tail}"
                rec["runs"][side].append(entry)
                print(f"{side:9s} {i}: rc {rc}, {secs:5.1f} s, "
                      f"{entry.get('decode_tokens_per_s', float('nan')):7.2f} tok/s", flush=True)
                save_json(rec, target)
    cli = [e["decode_tokens_per_s"] for e in rec["runs"]["cli"] if "decode_tokens_per_s" in e]
    bench = [e["decode_tokens_per_s"] for e in rec["runs"]["benchmark"] if "decode_tokens_per_s" in e]
    if cli and bench:
        ratio = statistics.median(cli) / statistics.median(bench)
        rec["cli_median_tokens_per_s"] = statistics.median(cli)
        rec["benchmark_median_tokens_per_s"] = statistics.median(bench)
        rec["cli_over_benchmark"] = ratio
        rec["within_target"] = abs(ratio - 1) <= TARGET
        print(f"CLI {statistics.median(cli):.2f} tok/s (processes: {', '.join(f'{x:.2f}' for x in cli)}) | "
              f"benchmark {statistics.median(bench):.2f} tok/s (processes: {', '.join(f'{x:.2f}' for x in bench)}) | "
              f"CLI / benchmark {ratio:.3f}: {'within' if rec['within_target'] else 'NOT within'} {TARGET:.0%}")
    else:
        rec["within_target"] = None
        print("no comparison: a side produced no result (see the JSON)")
    save_json(rec, target)
    print(f"wrote {target}")
    return 0 if cli and bench else 1


if __name__ == "__main__":
    sys.exit(main())
