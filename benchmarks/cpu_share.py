"""How fast the CPU's share of a missed expert streams, where a captured decode step runs it.

A captured decode pass (``toolkit.moe.graph_pass``) splits each missed expert:
units [0, k) copied to the GPU, units [k, I) computed on the CPU by a host
function in stream order. The split is balanced on the rates of the two
paths. This script times the CPU's share (``host_share.c`` through the
toolkit's CPU kernel, 2 missed experts a layer at Mixtral's sizes) several
ways, to say which rate the split must be balanced on:

- called directly from the main thread, at several thread counts;
- as a host node launched eagerly on a CUDA stream;
- as a graph of 8 host nodes (a step's layers back to back);
- the last two beside copies of another expert streaming to the GPU, as in a
  captured step;
- a whole expert (k = 0) called directly, for the calibration's reference.

Per way: ms a layer and the rate the share's bytes were read at (medians of
12 calls, the first 2 dropped). Then both paths alone and at once
(``paths``: the share on 4 experts and the GPU's units of 4 others copied,
in turn), on torch's pinned memory and on huge pages (``toolkit.moe.host_memory``),
and torch's pinned memory again. Saved to OUT/cpu_share.json with provenance.

  PYTHONPATH=. python benchmarks/cpu_share.py --out data/gpu     # CUDA GPU, ~35 s, 9 GB of pinned memory
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import conditional, graph_pass, host_memory
from toolkit.results import provenance, save_json

D, INTER, E, K = 4096, 14336, 8, 2  # Mixtral-8x7B: one layer's experts, top-2
SHARE_UNITS = 6000  # the GPU's units of a missed expert (the calibration's split on an H200 host, 0.42)


def job(gate_up, down, threads: int, k: int) -> graph_pass.HostShare:
    """A host function's job over the layer's experts (every one missed), with its pinned buffers: weights 0.5,
    a random token."""
    share = graph_pass.HostShare(gate_up, down, np.zeros(E, dtype=bool), K, k, threads, pin=True)
    share.w.fill_(0.5)
    share.x.copy_(torch.randn(D).to(torch.bfloat16))
    return share


def timed(fn, jobs, reps: int = 12) -> dict:
    """ms a layer and GB/s of the shares' bytes: each call picks 2 other experts per layer."""
    ts = []
    for r in range(reps):
        for share in jobs:
            share.sel[:] = torch.tensor([(2 * r) % E, (2 * r + 1) % E])
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ms = float(np.median(ts[2:])) * 1e3 / len(jobs)
    k = jobs[0].job.k
    return {"ms_per_layer": ms, "gbs": K * 3 * (INTER - k) * D * 2 / ms / 1e6}


def paths_together(gate_up, down, lib, threads: int, k: int = SHARE_UNITS, seconds: float = 1.0) -> dict:
    """GB/s of the two paths of missed experts, each alone and both at once for ``seconds``: the CPU's share of two
    experts a call (experts 0-3 in turn) and the GPU's units [0, k) of one expert a copy (gate/up and down
    columns, 2-D copies as a captured pass queues them; experts 4-7 in turn), so neither reads what the other just
    read and no share is read twice in a row from the CPU's cache."""
    sgu = torch.empty(2 * INTER, D, dtype=torch.bfloat16, device="cuda")
    sdn = torch.empty(D, INTER, dtype=torch.bfloat16, device="cuda")
    copy_bytes, cpu_bytes = 3 * k * D * 2, K * 3 * (INTER - k) * D * 2
    stream = torch.cuda.Stream()

    def copy(e):
        conditional.copy_2d(sgu.view(2, INTER, -1)[:, :k].reshape(2, -1),
                            gate_up[e].view(2, INTER, -1)[:, :k].reshape(2, -1))
        conditional.copy_2d(sdn[:, :k], down[e][:, :k])

    cpu = job(gate_up, down, threads, k)
    stop = threading.Event()
    count = {"calls": 0, "s": 0.0}

    def stream_cpu():
        i = 0
        while not stop.is_set():
            cpu.sel[:] = torch.tensor([i % 4, (i + 1) % 4])
            t0 = time.perf_counter()
            lib.toolkit_host_share(ctypes.byref(cpu.job))
            count["s"] += time.perf_counter() - t0
            count["calls"] += 1
            i += 2

    def copies_for(secs):
        n, t0 = 0, time.perf_counter()
        with torch.cuda.stream(stream):
            while time.perf_counter() - t0 < secs:
                copy(4 + n % 4)
                n += 1
                if n % 4 == 0:
                    stream.synchronize()
            stream.synchronize()
        return n * copy_bytes / (time.perf_counter() - t0) / 1e9

    out = {"copies alone": copies_for(seconds / 2)}
    t = threading.Thread(target=stream_cpu)
    t.start()
    time.sleep(seconds / 2)
    stop.set()
    t.join()
    out["CPU share alone"] = count["calls"] * cpu_bytes / count["s"] / 1e9
    stop.clear()
    count.update(calls=0, s=0.0)
    t = threading.Thread(target=stream_cpu)
    t.start()
    try:
        time.sleep(0.05)
        c0, s0 = count["calls"], count["s"]
        out["copies beside the CPU"] = copies_for(seconds)
        out["CPU share beside copies"] = (count["calls"] - c0) * cpu_bytes / (count["s"] - s0) / 1e9
    finally:
        stop.set()
        t.join()
    out["both paths"] = out["copies beside the CPU"] + out["CPU share beside copies"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    args = ap.parse_args(argv)
    try:
        if not torch.cuda.is_available():
            raise ToolkitError("cpu_share needs a CUDA GPU (host nodes on a CUDA stream)")
        lib = graph_pass._library()
        if isinstance(lib, str):
            raise ToolkitError(f"the host function cannot run here: {lib}")
    except ToolkitError as e:
        print(f"cpu_share: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)

    def fresh():
        return (torch.empty(E, 2 * INTER, D, dtype=torch.bfloat16, pin_memory=True).uniform_(-0.01, 0.01),
                torch.empty(E, D, INTER, dtype=torch.bfloat16, pin_memory=True).uniform_(-0.01, 0.01))

    gate_up, down = fresh()
    cores = torch.get_num_threads()
    threads = max(1, cores - 1)
    rec = {"benchmark": "cpu_share", "provenance": provenance("cuda"),
           "settings": {"hidden": D, "intermediate": INTER, "experts_a_layer": K, "gpu_units": SHARE_UNITS,
                        "threads": threads, "cores": cores}, "ways": {}}
    ways = rec["ways"]

    def say(name, r):
        ways[name] = r
        print(f"{name:48s} {r['ms_per_layer']:7.2f} ms a layer  {r['gbs']:6.1f} GB/s", flush=True)

    for th in sorted({threads, cores, max(1, cores // 2)}):
        j = job(gate_up, down, th, SHARE_UNITS)
        say(f"direct, {th} threads", timed(lambda j=j: lib.toolkit_host_share(ctypes.byref(j.job)), [j]))
    j = job(gate_up, down, threads, SHARE_UNITS)

    def node():
        conditional.launch_host_func(lib.toolkit_host_share, j.job)
        torch.cuda.synchronize()

    say("host node, eager", timed(node, [j]))
    jobs = [job(gate_up, down, threads, SHARE_UNITS) for _ in range(8)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for jj in jobs:
            conditional.launch_host_func(lib.toolkit_host_share, jj.job)
    step = lambda: (graph.replay(), torch.cuda.synchronize())  # noqa: E731
    say("graph of 8 host nodes", timed(step, jobs))
    whole = job(gate_up, down, threads, 0)
    say("direct, whole experts (k = 0)", timed(lambda: lib.toolkit_host_share(ctypes.byref(whole.job)), [whole]))
    dst = torch.empty(2 * INTER, D, dtype=torch.bfloat16, device="cuda")
    stream, stop = torch.cuda.Stream(), threading.Event()

    def copies():  # another expert's gate/up rows streaming to the GPU, as a captured step's copies do
        with torch.cuda.stream(stream):
            while not stop.is_set():
                dst.copy_(gate_up[E - 1], non_blocking=True)
                stream.synchronize()

    t = threading.Thread(target=copies)
    t.start()
    try:
        say("host node, eager, beside copies", timed(node, [j]))
        say("graph of 8 host nodes, beside copies", timed(step, jobs))
    finally:
        stop.set()
        t.join()
    rec["paths"] = {"pinned (cudaHostAlloc)": paths_together(gate_up, down, lib, threads)}
    host_memory.set_enabled(True)
    hgu = host_memory.empty((E, 2 * INTER, D), torch.bfloat16).uniform_(-0.01, 0.01)
    hdn = host_memory.empty((E, D, INTER), torch.bfloat16).uniform_(-0.01, 0.01)
    rec["huge_pages_gb"] = sum((host_memory.huge_fraction(t) or 0.0) * t.numel() * 2 for t in (hgu, hdn)) / 1e9
    rec["huge_pages_reason"] = host_memory.why_not()
    rec["paths"]["huge pages, registered"] = paths_together(hgu, hdn, lib, threads)
    rec["paths"]["pinned (cudaHostAlloc), again"] = paths_together(*fresh(), lib, threads)
    for mem, r in rec["paths"].items():
        print(f"{mem:36s} " + ", ".join(f"{k} {v:5.1f}" for k, v in r.items()) + " GB/s", flush=True)
    print(f"huge pages granted: {rec['huge_pages_gb']:.2f} GB"
          + (f" ({rec['huge_pages_reason']})" if rec["huge_pages_reason"] else ""), flush=True)
    path = save_json(rec, Path(args.out) / "cpu_share.json")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
