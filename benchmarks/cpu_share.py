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
12 calls, the first 2 dropped). Saved to OUT/cpu_share.json with provenance.

  PYTHONPATH=. python benchmarks/cpu_share.py --out data/gpu     # CUDA GPU, ~15 s, 22 GB of pinned memory
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
from toolkit.moe import conditional, graph_pass
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
    gate_up = torch.empty(E, 2 * INTER, D, dtype=torch.bfloat16, pin_memory=True).uniform_(-0.01, 0.01)
    down = torch.empty(E, D, INTER, dtype=torch.bfloat16, pin_memory=True).uniform_(-0.01, 0.01)
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
    path = save_json(rec, Path(args.out) / "cpu_share.json")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
