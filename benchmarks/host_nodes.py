"""What Python between layers costs a decode step with CPU experts, against the step run from one CUDA graph.

In an offloaded decode step each layer's CPU experts need the token's
activations on the host, so the host waits for the GPU once a layer and
launches the next layer's work only after its CPU experts return. CUDA can
run a host function in stream order (``cuLaunchHostFunc``), and stream
capture records it as a node of a graph: a whole step, CPU experts
included, then replays with no Python between its layers. This benchmark
measures both on the machine, for one token at Mixtral-8x7B dimensions.

Per layer: a GPU op standing in for the dense part (a 4096 x 6144 linear and
an RMSNorm), the token copied to pinned memory, the layer's CPU experts
(``host_nodes_layer`` of ``host_functions.c``: gate/up, SiLU, down through the
toolkit's CPU kernel ``toolkit.moe.cpu_gemv``), their result copied back and
added in. Each layer's experts are distinct, so every step reads them from
host memory. Modes, timed in alternating rounds (median of the rounds):

- ``cpu-only``: the layers' CPU experts called back to back from Python
  (the floor: no GPU, no sync);
- ``python``: per layer from Python with a sync before the CPU experts (the
  outline of the engine's inline schedule without its plan, copies or
  bookkeeping);
- ``graph``: the same step captured once as a CUDA graph, the CPU experts a
  host node, replayed;
- ``graph+zero-copy``: the graph while a GEMV on another stream, on a few
  programs (SMs), reads another expert's gate/up straight from pinned host
  memory: what a GPU share of a missed expert could do inside a graph
  without a copy into a staging slot, and how it and the CPU experts slow
  each other.

Also the zero-copy GEMV alone at a few program counts, and a pinned copy of
the same bytes. Results of the graph are checked equal to the Python chain.
Per mode: the median step, the CPU experts' time inside it, and the step's
excess over ``cpu-only`` per layer. Saved to OUT/host_nodes.json with
provenance after every round.

  PYTHONPATH=. python benchmarks/host_nodes.py --out data/gpu    # one H200 host, ~1.5 min
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from host_functions import MAX_EXPERTS, HostPointer, LayerJob, kernel_entry, launch, library

from toolkit.errors import ToolkitError
from toolkit.results import RunRecord, provenance

HIDDEN, INTER = 4096, 14336  # Mixtral-8x7B hidden and intermediate sizes
DENSE_OUT = 6144  # the stand-in dense op's output features (q, k, v of Mixtral's attention)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--experts", default="2,1,2,1,2,1,2,1",
                    help="CPU experts of each layer, comma-separated (one entry per layer; default 8 layers)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: one fewer than the cores)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per mode and round")
    args = ap.parse_args(argv)
    try:
        args.experts = [int(x) for x in args.experts.split(",")]
    except ValueError:
        ap.error(f"--experts takes whole numbers separated by commas, not {args.experts!r}")
    if not args.experts or any(not 1 <= n <= MAX_EXPERTS for n in args.experts):
        ap.error(f"--experts: each layer computes 1 to {MAX_EXPERTS} experts")
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    return args


class Layers:
    """Each layer's job, its experts' weights, and its pinned activation and result buffers."""

    def __init__(self, experts: list[int], threads: int, hidden: int = HIDDEN, inter: int = INTER, pin: bool = True):
        self.entry = kernel_entry()
        self.jobs, self.keep, self.x_host, self.y_host = [], [], [], []
        self.weights = []  # (gate_up [2I, D], down [D, I]) of each layer's experts

        def buf(n, dtype=torch.bfloat16):
            t = torch.zeros(n, dtype=dtype)
            return t.pin_memory() if pin else t

        for n in experts:
            job = LayerJob()
            ws = [(torch.empty(2 * inter, hidden, dtype=torch.bfloat16).uniform_(-0.02, 0.02),
                   torch.empty(hidden, inter, dtype=torch.bfloat16).uniform_(-0.02, 0.02)) for _ in range(n)]
            x, y = buf(hidden), buf(hidden)
            m = max(1, n)  # every expert's rows at once (the toolkit's one parallel region)
            scratch = [torch.empty(m * 2 * inter, dtype=torch.bfloat16), torch.empty(m * inter, dtype=torch.bfloat16),
                       torch.empty(m * hidden, dtype=torch.bfloat16), torch.empty(hidden, dtype=torch.float32)]
            job.lin, job.x, job.n, job.y = self.entry, x.data_ptr(), n, y.data_ptr()
            for e, (gu, dn) in enumerate(ws):
                job.gate_up[e], job.down[e] = gu.data_ptr(), dn.data_ptr()
            job.h, job.act, job.yk, job.acc = (t.data_ptr() for t in scratch)
            job.D, job.I, job.threads = hidden, inter, threads
            self.jobs.append(job)
            self.weights.append(ws)
            self.x_host.append(x)
            self.y_host.append(y)
            self.keep += scratch

    def busy_s(self) -> float:
        return sum(j.busy_s for j in self.jobs)


def reference_layer(x: torch.Tensor, weights) -> torch.Tensor:
    """What ``host_nodes_layer`` computes, in torch: x [D] bf16 -> [D] bf16."""
    inter = weights[0][1].shape[1]
    acc = torch.zeros(x.shape[0])
    for gu, dn in weights:
        h = (gu.float() @ x.float()).to(torch.bfloat16).float()
        act = (torch.nn.functional.silu(h[:inter]) * h[inter:]).to(torch.bfloat16).float()
        acc += 0.5 * (dn.float() @ act).to(torch.bfloat16).float()
    return acc.to(torch.bfloat16)


def zero_copy_gemv():
    """A Triton GEMV y [N] = w [N, K] @ x [K] that reads w where it lies, here pinned host memory (UVA), on a
    given number of programs -> fn(w_host, x, y, programs), or the reason there is none."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        return f"no Triton ({e})"

    @triton.jit
    def gemv(w_ptr, x_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr):
        pid = tl.program_id(0)
        for start in range(pid * BN, N, PROGRAMS * BN):
            rows = start + tl.arange(0, BN)
            acc = tl.zeros((BN,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                cols = k0 + tl.arange(0, BK)
                w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=rows[:, None] < N, other=0.0)
                acc += tl.sum(w.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :], axis=1)
            tl.store(y_ptr + rows, acc.to(tl.bfloat16), mask=rows < N)

    def run(w_host, x, y, programs: int):
        n, k = w_host.shape
        gemv[(programs,)](HostPointer(w_host), x, y, n, k, BN=16, BK=512, PROGRAMS=programs)

    return run


def cuda_ms(fn, stream=None) -> float:
    """fn() timed with CUDA events on ``stream`` (default: the current one), ms."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(stream)
    fn()
    b.record(stream)
    b.synchronize()
    return a.elapsed_time(b)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "host_nodes", "status": "running", "provenance": provenance("cuda"),
              "settings": {"experts_per_layer": args.experts, "layers": len(args.experts), "hidden": HIDDEN,
                           "intermediate": INTER, "expert_bytes": 3 * HIDDEN * INTER * 2, "rounds": args.rounds,
                           "steps": args.steps, "dense_stand_in": f"linear {HIDDEN}->{DENSE_OUT} + rms_norm"},
              "zero_copy": {}, "modes": {}}
    run = RunRecord("host_nodes", out_dir / "host_nodes.json", record)
    try:
        if not torch.cuda.is_available():
            raise ToolkitError("host_nodes needs a CUDA GPU (host functions in a CUDA graph)")
        threads = args.threads or max(1, (torch.get_num_threads() or 2) - 1)
        torch.set_num_threads(threads)
        record["settings"]["threads"] = threads
        lib = library()
        run.log(f"building {sum(args.experts)} experts ({sum(args.experts) * 3 * HIDDEN * INTER * 2 / 1e9:.1f} GB)")
        layers = Layers(args.experts, threads)
        dev = torch.device("cuda")
        n_layers = len(args.experts)
        dense_w = torch.randn(DENSE_OUT, HIDDEN, dtype=torch.bfloat16, device=dev) * 0.01
        y_dev = [torch.empty(HIDDEN, dtype=torch.bfloat16, device=dev) for _ in range(n_layers)]
        x0 = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device=dev)

        def dense(x):
            h = torch.nn.functional.linear(x, dense_w)  # [1, DENSE_OUT]
            return torch.nn.functional.rms_norm(x + 0.001 * h[:, :HIDDEN], (HIDDEN,))

        def step_python(x):
            for L in range(n_layers):
                x = dense(x)
                layers.x_host[L].copy_(x[0], non_blocking=True)
                torch.cuda.current_stream().synchronize()
                lib.host_nodes_layer(ctypes.byref(layers.jobs[L]))
                y_dev[L].copy_(layers.y_host[L], non_blocking=True)
                x = x + y_dev[L][None]
            return x

        def step_host_nodes(x):
            stream = torch.cuda.current_stream()
            for L in range(n_layers):
                x = dense(x)
                layers.x_host[L].copy_(x[0], non_blocking=True)
                launch(stream, lib.host_nodes_layer, layers.jobs[L])
                y_dev[L].copy_(layers.y_host[L], non_blocking=True)
                x = x + y_dev[L][None]
            return x

        with torch.no_grad():
            ref = step_python(x0.clone())
            torch.cuda.synchronize()
            layer0 = reference_layer(layers.x_host[0].clone(), layers.weights[0])
            record["cpu_layer_vs_torch_max_abs_diff"] = float((layers.y_host[0].float() - layer0.float()).abs().max())
            x_static = x0.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step_host_nodes(x_static)  # the capture's warm-up
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_static = step_host_nodes(x_static)
            x_static.copy_(x0)
            graph.replay()
            torch.cuda.synchronize()
            record["graph_vs_python_max_abs_diff"] = float((out_static.float() - ref.float()).abs().max())
        run.log(f"graph equals the Python chain within {record['graph_vs_python_max_abs_diff']}")

        # the zero-copy GEMV alone, at a few program counts, against a pinned copy of the same bytes
        gemv = zero_copy_gemv()
        zc = record["zero_copy"]
        programs = None
        if isinstance(gemv, str):
            zc["skipped"] = gemv
        else:
            w_host = torch.empty(2 * INTER, HIDDEN, dtype=torch.bfloat16).uniform_(-0.02, 0.02).pin_memory()
            zx = torch.randn(HIDDEN, dtype=torch.bfloat16, device=dev)
            zy = torch.empty(2 * INTER, dtype=torch.bfloat16, device=dev)
            gemv(w_host, zx, zy, 132)
            torch.cuda.synchronize()
            want = (w_host.to(dev).float() @ zx.float()).to(torch.bfloat16)
            zc["max_abs_diff"] = float((zy.float() - want.float()).abs().max())
            nbytes = w_host.numel() * 2
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            for p in (8, 16, 32, 64, sms):
                gemv(w_host, zx, zy, p)
                ms = float(np.median([cuda_ms(lambda p=p: gemv(w_host, zx, zy, p)) for _ in range(5)]))
                zc[f"gemv_{p}_programs"] = {"ms": ms, "gbs": nbytes / ms / 1e6}
            dst = torch.empty_like(w_host, device=dev)
            ms = float(np.median([cuda_ms(lambda: dst.copy_(w_host, non_blocking=True)) for _ in range(5)]))
            zc["pinned_copy"] = {"ms": ms, "gbs": nbytes / ms / 1e6}
            del dst
            best = max(v["gbs"] for k, v in zc.items() if k.startswith("gemv_"))
            # the fewest programs within 10% of the best rate: the rest of the SMs stay free for the dense part
            programs = min(int(k.split("_")[1]) for k, v in zc.items()
                           if k.startswith("gemv_") and v["gbs"] >= 0.9 * best)
            zc["programs_beside_the_step"] = programs
            run.log("zero-copy GEMV " + ", ".join(f"{k} {v['gbs']:.1f} GB/s" for k, v in zc.items()
                                                  if isinstance(v, dict)))
        run.save()

        side2 = torch.cuda.Stream()
        zero_copy_seen = []

        def graph_with_zero_copy():
            launches = max(1, math.ceil(record["modes"].get("graph", {}).get("median_ms", 50.0)
                                        / zc[f"gemv_{programs}_programs"]["ms"]))
            side2.wait_stream(torch.cuda.current_stream())
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(side2)
            with torch.cuda.stream(side2):
                for _ in range(launches):
                    gemv(w_host, zx, zy, programs)
            b.record(side2)
            graph.replay()
            torch.cuda.synchronize()
            zero_copy_seen.append(launches * w_host.numel() * 2 / a.elapsed_time(b) / 1e6)

        modes = {"cpu-only": lambda: [lib.host_nodes_layer(ctypes.byref(j)) for j in layers.jobs],
                 "python": lambda: step_python(x0.clone()),
                 "graph": graph.replay}
        if programs is not None:
            modes["graph+zero-copy"] = graph_with_zero_copy
        rounds = {m: [] for m in modes}
        cpu = {m: [] for m in modes}
        with torch.no_grad():
            for f in modes.values():  # every mode warmed before the first timed round
                f()
                torch.cuda.synchronize()
            for r in range(args.rounds):
                for m, f in modes.items():
                    torch.cuda.synchronize()
                    b0 = layers.busy_s()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        f()
                        torch.cuda.synchronize()
                    rounds[m].append((time.perf_counter() - t0) / args.steps * 1e3)
                    cpu[m].append((layers.busy_s() - b0) / args.steps * 1e3)
                    floor = float(np.median(rounds["cpu-only"]))
                    record["modes"][m] = {"median_ms": float(np.median(rounds[m])), "rounds_ms": rounds[m],
                                          "cpu_experts_ms": float(np.median(cpu[m])), "rounds_cpu_ms": cpu[m],
                                          "over_cpu_only_ms_per_layer": (float(np.median(rounds[m])) - floor)
                                          / n_layers}
                if zero_copy_seen:
                    record["modes"]["graph+zero-copy"]["zero_copy_gbs_beside"] = float(np.median(zero_copy_seen))
                run.log(f"round {r + 1}: " + ", ".join(f"{m} {rounds[m][-1]:.2f} ms (CPU experts {cpu[m][-1]:.2f})"
                                                      for m in modes))
                run.save()
        run.save("complete")
    except (KeyboardInterrupt, ToolkitError) as e:
        return run.stopped(e)
    print_table(record)
    return 0


def print_table(record: dict) -> None:
    n = record["settings"]["layers"]
    print(f"{n} layers, {sum(record['settings']['experts_per_layer'])} CPU experts a step, "
          f"{record['settings'].get('threads')} threads")
    print(f"{'mode':18} {'step ms':>8} {'CPU experts ms':>15} {'excess ms/layer':>16}")
    for m, r in record["modes"].items():
        print(f"{m:18} {r['median_ms']:8.2f} {r['cpu_experts_ms']:15.2f} {r['over_cpu_only_ms_per_layer']:16.3f}")
    zc = record.get("zero_copy", {})
    for k, v in zc.items():
        if isinstance(v, dict):
            print(f"{k:24} {v['ms']:.2f} ms, {v['gbs']:.1f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
