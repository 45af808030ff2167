"""An offloaded decode step with no Python between layers and no plan per layer, measured against its bound.

The offload engine drives each layer from Python: a routing sync, a plan, the
CPU experts, copies into staging slots, results back. This benchmark builds
the alternative in miniature, to see how far it gets. Per layer, for one token
at Mixtral-8x7B dimensions (8 experts, top-2, ``--resident`` of the step's 64
experts on the GPU): a stand-in dense op and a router on the GPU; then each of
the token's two experts

- resident: all of it on the GPU (Triton GEMVs, weights in GPU memory);
- missed: intermediate units [0, k) on the GPU, the same GEMVs reading the
  expert's weights in place from pinned host memory (no copy into a slot),
  and units [k, I) on the CPU at the same time, in a host node
  (``toolkit_host_share``, the engine's host function of ``toolkit/moe/host_share.c``, through the toolkit's
  CPU kernel),
  which reads the routing from pinned memory;

and the two sums added. The whole step is captured as one CUDA graph and
replayed with new inputs: the host does nothing per layer. The result is
checked against torch (every expert whole) and each replay against the eager
step. Timed at several GPU shares f = k / I in alternating rounds.

The GPU's share of a missed expert arrives one of two ways (``--modes``):

- ``read``: the Triton GEMVs above read it in place from pinned memory;
- ``copy``: the copy engines bring it into a staging slot first, then torch's
  GEMVs compute it there. Which expert a slot holds depends on the routing,
  which the graph does not know when it is captured, so each (slot, expert
  that may miss) pair is a conditional node of the graph whose body is the
  copies (``toolkit.moe.conditional``); the predicate, the slot's expert id being
  that expert, is computed on the GPU. The down projection's
  units are columns of ``down`` [D, I], so this mode keeps the experts' down
  projections transposed too ([I, D], its units rows), for the copies.

``copy_probe`` in the record times the same copies plain and inside a
conditional node, to say whether the conditional ones still run at the
copy engines' rate.

Per share: the median step, the CPU's time in it, the missed experts' bytes a
step, the rate both paths read them at together, and the step against the
host-read bound: the missed bytes at the host's read ceiling from the
calibration (``toolkit.moe.costs``: both paths reading at once), the bound
``moe_decode.py`` counts for them.

Saved to OUT/graph_step.json with provenance after every round.

  PYTHONPATH=. python benchmarks/graph_step.py --out data/gpu     # one H200 host, ~2 min (30 GB of host memory)
  PYTHONPATH=. python benchmarks/graph_step.py --modes copy --fractions auto --out data/gpu   # the calibration's share

The copy mode holds a transposed copy of every down projection in pinned
memory besides the experts (22.5 GB of experts, 7.5 GB more).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from host_functions import HostPointer, kernel_entry, launch, library, replay_ms

from toolkit.errors import ToolkitError
from toolkit.moe import conditional as conditional_nodes
from toolkit.moe.graph_pass import HostShare
from toolkit.results import RunRecord, provenance

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2  # Mixtral-8x7B
DENSE_OUT = 6144  # the stand-in dense op's output features
# the Triton kernels' tiles: BK and BD must divide the hidden size (their loads are not masked), BN divides k
BLOCKS = {"BN": 16, "BK": 512, "BD": 32, "BJ": 256}
MODES = ("read", "copy")  # how the GPU's share of a missed expert arrives


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--resident", type=int, default=14, help="experts on the GPU across all layers (default 14)")
    ap.add_argument("--fractions", default="0,0.35,0.4,0.45",
                    help="GPU shares f = k / I of a missed expert to time, comma-separated, each in [0, 1), or auto: "
                         "the share the calibration balances (balanced_share)")
    ap.add_argument("--modes", default="read,copy",
                    help="how the GPU's share arrives, comma-separated: read (in place from pinned memory), copy "
                         "(copied into a staging slot by conditional copies); default %(default)s")
    ap.add_argument("--down-tiles", default=str(BLOCKS["BJ"]),
                    help="units of the down projection each GPU program reads per load (its row pieces from host "
                         "memory are this many bf16 long), comma-separated to time several (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: one fewer than the cores)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps per share and round")
    args = ap.parse_args(argv)
    try:
        args.fractions = [f.strip() if f.strip() == "auto" else float(f) for f in args.fractions.split(",")]
    except ValueError:
        ap.error(f"--fractions takes numbers or auto separated by commas, not {args.fractions!r}")
    if not args.fractions or any(f != "auto" and not 0 <= f < 1 for f in args.fractions):
        ap.error("--fractions: each share is at least 0 and below 1")
    try:
        args.down_tiles = [int(t) for t in args.down_tiles.split(",")]
    except ValueError:
        ap.error(f"--down-tiles takes whole numbers separated by commas, not {args.down_tiles!r}")
    if any(t < 16 or t & (t - 1) for t in args.down_tiles):
        ap.error("--down-tiles: each a power of two, at least 16")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        ap.error(f"--modes: one or more of {', '.join(MODES)}, comma-separated, not {','.join(args.modes)!r}")
    if args.layers < 1 or args.rounds < 1 or args.steps < 4:
        ap.error("--layers and --rounds must be at least 1, --steps at least 4")
    if not 0 <= args.resident <= args.layers * EXPERTS:
        ap.error(f"--resident: 0 to {args.layers * EXPERTS} experts")
    return args


def balanced_share(cm) -> float:
    """The GPU share f of a one-token missed expert at which its copy and the CPU's rest end together, by the
    calibration (``CostModel.balanced_share``, the engine's split of a missed expert in a captured pass)."""
    return cm.balanced_share()


def units(fraction: float, inter: int = INTER, block: int = 16) -> int:
    """The GPU's units k of a missed expert for share ``fraction``: a whole number of the kernels' row blocks."""
    return int(round(fraction * inter / block)) * block


try:  # the GPU's share; ``kernels()`` says when it is missing
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _gate_up_rows(w_ptr, x_ptr, rows, mask, D, N_INTER, BN: tl.constexpr, BK: tl.constexpr):
        g = tl.zeros((BN,), dtype=tl.float32)
        u = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + cols).to(tl.float32)[None, :]
            wg = tl.load(w_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=mask[:, None], other=0.0)
            up_rows = (rows[:, None] + N_INTER).to(tl.int64)  # up's rows follow gate's
            wu = tl.load(w_ptr + up_rows * D + cols[None, :], mask=mask[:, None], other=0.0)
            g += tl.sum(wg.to(tl.float32) * xv, axis=1)
            u += tl.sum(wu.to(tl.float32) * xv, axis=1)
        return g, u

    @triton.jit
    def gate_up_share(x_ptr, sel_ptr, slot_ptr, dev_ptr, host_ptr, act_ptr, D, N_INTER, k,
                      BN: tl.constexpr, BK: tl.constexpr):
        s = tl.program_id(0)
        jb = tl.program_id(1)
        e = tl.load(sel_ptr + s)
        slot = tl.load(slot_ptr + e)
        n = tl.where(slot >= 0, N_INTER, k)
        if jb * BN < n:
            rows = jb * BN + tl.arange(0, BN)
            mask = rows < n
            if slot >= 0:
                w_ptr = dev_ptr + slot.to(tl.int64) * 2 * N_INTER * D
                g, u = _gate_up_rows(w_ptr, x_ptr, rows, mask, D, N_INTER, BN, BK)
            else:
                g, u = _gate_up_rows(host_ptr + e.to(tl.int64) * 2 * N_INTER * D, x_ptr, rows, mask, D, N_INTER, BN, BK)
            g = g.to(tl.bfloat16).to(tl.float32)
            u = u.to(tl.bfloat16).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u
            tl.store(act_ptr + s * N_INTER + rows, a.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _down_cols(w_ptr, a_ptr, d, n, N_INTER, BD: tl.constexpr, BJ: tl.constexpr):
        acc = tl.zeros((BD,), dtype=tl.float32)
        for j0 in range(0, n, BJ):
            j = j0 + tl.arange(0, BJ)
            jm = j < n
            a = tl.load(a_ptr + j, mask=jm, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + d[:, None].to(tl.int64) * N_INTER + j[None, :], mask=jm[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
        return acc

    @triton.jit
    def down_share(act_ptr, sel_ptr, slot_ptr, dev_ptr, host_ptr, y_ptr, D, N_INTER, k,
                   BD: tl.constexpr, BJ: tl.constexpr):
        s = tl.program_id(0)
        db = tl.program_id(1)
        e = tl.load(sel_ptr + s)
        slot = tl.load(slot_ptr + e)
        n = tl.where(slot >= 0, N_INTER, k)
        d = db * BD + tl.arange(0, BD)
        if slot >= 0:
            acc = _down_cols(dev_ptr + slot.to(tl.int64) * D * N_INTER, act_ptr + s * N_INTER, d, n, N_INTER, BD, BJ)
        else:
            acc = _down_cols(host_ptr + e.to(tl.int64) * D * N_INTER, act_ptr + s * N_INTER, d, n, N_INTER, BD, BJ)
        tl.store(y_ptr + s * D + d, acc)


def kernels():
    """The GPU's share as two Triton kernels -> (gate_up_share, down_share); ``TRITON_INTERPRET=1`` runs them on
    the CPU (the tests).

    ``gate_up_share[(K, cdiv(I, BN))](x [D], sel [K], slot [E], dev_gu [R, 2I, D], host_gu [E, 2I, D], act [K, I],
    D, I, k)``: for the token's s-th expert e, rows [0, n) with n = I where e is resident (slot[e] >= 0, its
    weights at dev_gu[slot[e]]) and n = k where it is not (host_gu[e], read in place): act = SiLU(gate) * up,
    rounded to bf16 at each step as torch does. ``down_share[(K, cdiv(D, BD))](act, sel, slot, dev_dn [R, D, I],
    host_dn [E, D, I], ys [K, D] float32, D, I, k)``: ys[s] = down[:, :n] @ act[s, :n].
    """
    if triton is None:
        raise ToolkitError("graph_step needs Triton for the GPU's share")
    return gate_up_share, down_share


class Layer:
    """One layer's experts (all in host memory, the resident ones also on the GPU), router, stand-in dense weights,
    and the pinned buffers and job of its host node."""

    def __init__(self, resident: np.ndarray, device: torch.device, threads: int, hidden: int = HIDDEN,
                 inter: int = INTER, top_k: int = TOP_K, pin: bool = True, transposed_down: bool = False):
        E = len(resident)
        self.gate_up = torch.empty(E, 2 * inter, hidden, dtype=torch.bfloat16, pin_memory=pin).uniform_(-0.02, 0.02)
        self.down = torch.empty(E, hidden, inter, dtype=torch.bfloat16, pin_memory=pin).uniform_(-0.02, 0.02)
        # the copy mode's source of the down projection's units [0, k): rows of down^T [E, I, D], contiguous
        self.down_t = None
        if transposed_down:
            self.down_t = torch.empty(E, inter, hidden, dtype=torch.bfloat16, pin_memory=pin)
            self.down_t.copy_(self.down.transpose(1, 2))
        self.missed_ids = [int(e) for e in np.flatnonzero(~resident)]  # the experts that may miss
        self.missed_dev = torch.as_tensor(self.missed_ids, dtype=torch.int64).to(device)
        ids = torch.as_tensor(np.flatnonzero(resident), dtype=torch.long)
        slot = torch.full((E,), -1, dtype=torch.int64)
        slot[ids] = torch.arange(len(ids))
        self.slot = slot.to(device)
        keep = ids if len(ids) else torch.zeros(1, dtype=torch.long)  # a kernel argument even with none resident
        self.dev_gate_up, self.dev_down = self.gate_up[keep].to(device), self.down[keep].to(device)
        self.router = torch.randn(E, hidden, dtype=torch.bfloat16, device=device) * 0.05
        self.dense = torch.randn(DENSE_OUT, hidden, dtype=torch.bfloat16, device=device) * 0.01
        self.act = torch.empty(top_k, inter, dtype=torch.bfloat16, device=device)
        self.ys = torch.empty(top_k, hidden, dtype=torch.float32, device=device)
        self.y_cpu = torch.empty(hidden, dtype=torch.bfloat16, device=device)
        # the host node's job and buffers, as the engine's captured passes have them (routing weights in float32)
        share = HostShare(self.gate_up, self.down, resident, top_k, 0, threads, pin)
        self.job, self.sel_h, self.w_h, self.x_h, self.y_h = share.job, share.sel, share.w, share.x, share.y
        self.share = share

    def route(self, x: torch.Tensor):
        """x [1, D] -> (x after the stand-in dense op [1, D], the token's experts [K], their weights [K] bf16)."""
        x = F.rms_norm(x + 0.001 * F.linear(x, self.dense)[:, :x.shape[1]], (x.shape[1],))
        w, sel = torch.topk(torch.softmax(F.linear(x, self.router).float(), -1), self.act.shape[0], dim=-1)
        return x, sel[0], (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)[0]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer in torch, every expert whole: x [1, D] -> [1, D]."""
        x, sel, w = self.route(x)
        inter = self.down.shape[2]
        y = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        for s in range(len(sel)):
            e = int(sel[s])
            h = F.linear(x[0], self.gate_up[e].to(x.device))
            y += float(w[s]) * F.linear(F.silu(h[:inter]) * h[inter:], self.down[e].to(x.device)).float()
        return x + y.to(x.dtype)[None]


conditional = conditional_nodes.conditional  # run(i, body) where conditions[i] holds, set on the GPU in a graph


def copy_units(lay: Layer, e: int, s: int, k: int, stage_gu: torch.Tensor, stage_dt: torch.Tensor) -> None:
    """Queue the copies of expert e's units [0, k) into slot s: gate rows [0, k) and up rows [I, I + k) of
    ``gate_up[e]`` to ``stage_gu[s, :2k]``, rows [0, k) of ``down_t[e]`` to ``stage_dt[s, :k]``."""
    inter = lay.down.shape[2]
    stage_gu[s, :k].copy_(lay.gate_up[e, :k], non_blocking=True)
    stage_gu[s, k:2 * k].copy_(lay.gate_up[e, inter:inter + k], non_blocking=True)
    stage_dt[s, :k].copy_(lay.down_t[e, :k], non_blocking=True)


def stage_missed(lay: Layer, sel: torch.Tensor, k: int, stage_gu: torch.Tensor, stage_dt: torch.Tensor,
                 when=conditional) -> torch.Tensor:
    """Copy the GPU's units [0, k) of each of the token's missed experts into its slot -> missed [K] bool.

    Slot s (the token's s-th expert e) gets ``copy_units(lay, e, s, ...)``; a resident expert's slot is left as
    it was. One conditional copy per (slot, expert that may miss), its predicate computed on the device: nothing
    here reads the routing on the host (``when``: ``conditional``, or a stand-in in tests).
    """
    if not lay.missed_ids:
        return torch.zeros_like(sel, dtype=torch.bool)
    m = len(lay.missed_ids)
    hits = sel[:, None] == lay.missed_dev[None, :]  # [K, M]: slot s holds the j-th expert that may miss
    run = when(hits)
    for s in range(sel.shape[0]):
        for j, e in enumerate(lay.missed_ids):
            run(s * m + j, lambda s=s, e=e: copy_units(lay, e, s, k, stage_gu, stage_dt))
    return hits.any(1)


def staged_share(x: torch.Tensor, stage_gu: torch.Tensor, stage_dt: torch.Tensor, missed: torch.Tensor,
                 k: int) -> torch.Tensor:
    """The GPU's units [0, k) of each missed expert from its slot: x [D] -> ys [K, D] float32, 0 in the slots of
    the experts that did not miss (their slots hold stale weights). bf16 as torch rounds it: gate and up, SiLU,
    the product and the down projection's sum."""
    h = torch.matmul(stage_gu[:, :2 * k], x)  # [K, 2k]
    act = F.silu(h[:, :k]) * h[:, k:]
    y = torch.matmul(act[:, None, :], stage_dt[:, :k]).squeeze(1)  # [K, D]
    return y.float() * missed[:, None]


def copy_probe(lay: Layer, k: int, stage_gu: torch.Tensor, stage_dt: torch.Tensor, replays: int = 10) -> dict:
    """The GPU share of one missed expert (units [0, k), 3 k D bf16) copied into its slot by a graph, plainly and
    inside a conditional node whose predicate holds: ms and GB/s of each (medians of ``replays``). Says whether
    a copy in a conditional body still runs at the copy engines' rate."""
    nbytes = 3 * k * lay.gate_up.shape[2] * 2
    yes = torch.ones(1, dtype=torch.bool, device=stage_gu.device)

    def copies():
        copy_units(lay, lay.missed_ids[0], 0, k, stage_gu, stage_dt)

    out = {"bytes": nbytes}
    for name, fn in (("plain", copies), ("conditional", lambda: conditional(yes)(0, copies))):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = replay_ms(graph, replays)
        out[name] = {"ms": ms, "gbs": nbytes / ms / 1e6}
        del graph
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "graph_step", "status": "running", "provenance": provenance("cuda"),
              "settings": {"layers": args.layers, "experts": EXPERTS, "top_k": TOP_K, "resident": args.resident,
                           "hidden": HIDDEN, "intermediate": INTER, "expert_bytes": 3 * HIDDEN * INTER * 2,
                           "fractions": args.fractions, "modes": args.modes, "rounds": args.rounds,
                           "steps": args.steps,
                           "blocks": BLOCKS, "down_tiles": args.down_tiles,
                           "dense_stand_in": f"linear {HIDDEN}->{DENSE_OUT} + rms_norm"},
              "checks": {}, "shares": {}}
    run = RunRecord("graph_step", out_dir / "graph_step.json", record)
    try:
        if not torch.cuda.is_available():
            raise ToolkitError("graph_step needs a CUDA GPU (host nodes and Triton kernels in a CUDA graph)")
        gate_up_share, down_share = kernels()
        from toolkit.moe.costs import calibrate

        kernel_entry()  # the CPU kernel runs here, or one line says why before anything is built
        threads = args.threads or max(1, (torch.get_num_threads() or 2) - 1)
        torch.set_num_threads(threads)
        record["settings"]["threads"] = threads
        dev = torch.device("cuda")
        cm = calibrate(preset="mixtral-8x7b", device="cuda", threads=threads)
        record["cost_model_summary"] = cm.summary()
        record["host_read_gbs"] = cm.host_read_gbs
        run.log(cm.summary())
        record["balanced_share"] = balanced_share(cm)
        run.log(f"the calibration balances a missed expert's copy and CPU share at f = {record['balanced_share']}")
        if "auto" in args.fractions:  # the calibration's share, once
            args.fractions = list(dict.fromkeys(record["balanced_share"] if f == "auto" else f for f in args.fractions))
            record["settings"]["fractions"] = args.fractions
        lib = library()
        resident = np.zeros((args.layers, EXPERTS), dtype=bool)
        resident.reshape(-1)[np.random.default_rng(0).choice(resident.size, args.resident, replace=False)] = True
        record["settings"]["resident_per_layer"] = resident.sum(1).tolist()
        torch.manual_seed(0)
        gb = args.layers * EXPERTS * 3 * HIDDEN * INTER * 2 / 1e9
        run.log(f"building {args.layers} layers of experts ({gb:.1f} GB)")
        copying = "copy" in args.modes
        layers = [Layer(resident[L], dev, threads, transposed_down=copying) for L in range(args.layers)]
        side, copy_stream = torch.cuda.Stream(), torch.cuda.Stream()
        # the copy mode's staging slots, one per routed expert, shared by the layers (they run one after another)
        k_max = max([units(f) for f in args.fractions] + [16]) if copying else 16
        stage_gu = torch.zeros(TOP_K, 2 * k_max, HIDDEN, dtype=torch.bfloat16, device=dev)
        stage_dt = torch.zeros(TOP_K, k_max, HIDDEN, dtype=torch.bfloat16, device=dev)
        if copying:
            conditional_nodes.prepare()
        if copying and any(lay.missed_ids for lay in layers):
            probe_layer = next(lay for lay in layers if lay.missed_ids)
            record["copy_probe"] = copy_probe(probe_layer, k_max, stage_gu, stage_dt)
            run.log("copy probe: " + ", ".join(f"{n} {record['copy_probe'][n]['gbs']:.1f} GB/s"
                                               for n in ("plain", "conditional")))

        def set_units(k: int) -> None:  # read by the host nodes when they run: set before each replay
            for lay in layers:
                lay.job.k = k

        def layer_step(lay: Layer, x, k: int, bj: int, mode: str):
            x, sel, w = lay.route(x)
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            k_read = k if mode == "read" else 0  # in the copy mode the Triton kernels compute resident experts only
            with torch.cuda.stream(side):  # the GPU's share, at the same time as the CPU's
                gate_up_share[(TOP_K, triton.cdiv(INTER, BLOCKS["BN"]))](
                    x[0], sel, lay.slot, lay.dev_gate_up, HostPointer(lay.gate_up), lay.act, HIDDEN, INTER, k_read,
                    BN=BLOCKS["BN"], BK=BLOCKS["BK"])
                down_share[(TOP_K, triton.cdiv(HIDDEN, BLOCKS["BD"]))](
                    lay.act, sel, lay.slot, lay.dev_down, HostPointer(lay.down), lay.ys, HIDDEN, INTER, k_read,
                    BD=BLOCKS["BD"], BJ=bj)
                ys = lay.ys.to(torch.bfloat16).float()
            if mode == "copy" and k:
                copy_stream.wait_stream(main)
                with torch.cuda.stream(copy_stream):  # the missed experts' GPU units: copied in, then computed
                    missed = stage_missed(lay, sel, k, stage_gu, stage_dt)
                    staged = staged_share(x[0], stage_gu, stage_dt, missed, k)
                side.wait_stream(copy_stream)
            with torch.cuda.stream(side):
                if mode == "copy" and k:
                    ys = ys + staged
                y_gpu = (ys * w.float()[:, None]).sum(0)
            lay.sel_h.copy_(sel, non_blocking=True)
            lay.w_h.copy_(w, non_blocking=True)
            lay.x_h.copy_(x[0], non_blocking=True)
            launch(main, lib.toolkit_host_share, lay.job)
            lay.y_cpu.copy_(lay.y_h, non_blocking=True)
            main.wait_stream(side)
            return x + (y_gpu + lay.y_cpu.float()).to(torch.bfloat16)[None]

        def step(x, k: int, bj: int, mode: str):
            set_units(k)
            for lay in layers:
                x = layer_step(lay, x, k, bj, mode)
            return x

        # (mode, GPU share, down tile) -> its record key; a share of 0 is the same step in both modes: timed once
        configs = {("read", f, bj): str(f) if len(args.down_tiles) == 1 else f"{f}/BJ{bj}"
                   for bj in args.down_tiles for f in args.fractions if "read" in args.modes or f == 0}
        configs.update({("copy", f, BLOCKS["BJ"]): f"copy {f}" for f in args.fractions if "copy" in args.modes and f})

        gen = torch.Generator().manual_seed(1)
        inputs = [torch.randn(1, HIDDEN, dtype=torch.bfloat16, generator=gen).to(dev) for _ in range(args.steps)]
        graphs = {}
        with torch.no_grad():
            ref = inputs[0].clone()
            for lay in layers:
                ref = lay.reference(ref)
            for (mode, f, bj), key in configs.items():
                k = units(f)
                got = step(inputs[0].clone(), k, bj, mode)
                torch.cuda.synchronize()
                x_static = inputs[0].clone()
                warm = torch.cuda.Stream()
                warm.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(warm):
                    step(x_static, k, bj, mode)  # the capture's warm-up
                torch.cuda.current_stream().wait_stream(warm)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step(x_static, k, bj, mode)
                graphs[key] = (graph, x_static, out, k)
                set_units(k)
                x_static.copy_(inputs[3])
                graph.replay()
                want = step(inputs[3].clone(), k, bj, mode)
                torch.cuda.synchronize()
                record["checks"][key] = {
                    "mode": mode, "k": k,
                    "rel_err_vs_torch": float((got.float() - ref.float()).norm() / ref.float().norm()),
                    "replay_vs_eager_max_abs": float((out.float() - want.float()).abs().max())}
            run.log("checks: " + ", ".join(f"f={f} rel err {c['rel_err_vs_torch']:.4f}, replay "
                                           f"{c['replay_vs_eager_max_abs']}"
                                           for f, c in record["checks"].items()))
            run.save()
            steps = {key: [] for key in configs.values()}
            cpu = {key: [] for key in configs.values()}
            missed = {key: [] for key in configs.values()}
            eb = 3 * HIDDEN * INTER * 2
            for r in range(args.rounds):
                for f in configs.values():
                    graph, x_static, _, k = graphs[f]
                    set_units(k)
                    b0, m0 = sum(lay.job.busy_s for lay in layers), sum(lay.job.experts for lay in layers)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for x in inputs:
                        x_static.copy_(x)
                        graph.replay()
                        torch.cuda.synchronize()
                    steps[f].append((time.perf_counter() - t0) / len(inputs) * 1e3)
                    cpu[f].append((sum(lay.job.busy_s for lay in layers) - b0) / len(inputs) * 1e3)
                    missed[f].append((sum(lay.job.experts for lay in layers) - m0) / len(inputs))
                    ms, n = float(np.median(steps[f])), float(np.median(missed[f]))
                    bound = n * eb / (cm.host_read_gbs * 1e9) * 1e3 if cm.host_read_gbs else None
                    record["shares"][f] = {
                        "mode": record["checks"][f]["mode"], "k": k, "step_ms": ms, "rounds_ms": steps[f],
                        "spread": (max(steps[f]) - min(steps[f])) / ms,
                        "cpu_ms": float(np.median(cpu[f])), "missed_per_step": n,
                        "missed_gbs": n * eb / ms / 1e6, "host_bound_ms": bound,
                        "share_of_bound": bound / ms if bound else None}
                run.log(f"round {r + 1}: " + ", ".join(f"f={f} {steps[f][-1]:.2f} ms" for f in configs.values()))
                run.save()
        run.save("complete")
    except (KeyboardInterrupt, ToolkitError) as e:
        return run.stopped(e)
    print_table(record)
    return 0


def print_table(record: dict) -> None:
    s = record["settings"]
    print(f"{s['layers']} layers, {s['resident']} of {s['layers'] * s['experts']} experts resident, {s['threads']} "
          f"threads; host read ceiling {record.get('host_read_gbs') or float('nan'):.1f} GB/s")
    if record.get("balanced_share") is not None:
        print(f"the calibration balances a missed expert's copy and CPU share at f = {record['balanced_share']}")
    probe = record.get("copy_probe")
    if probe:
        print(f"one missed expert's GPU units ({probe['bytes'] / 1e6:.0f} MB) copied by a graph: "
              f"{probe['plain']['gbs']:.1f} GB/s plainly, {probe['conditional']['gbs']:.1f} GB/s in a conditional node")
    print(f"{'GPU share':>9} {'step ms':>8} {'spread':>7} {'CPU ms':>7} {'missed':>7} {'GB/s':>6} {'bound ms':>9} "
          f"{'of bound':>9}")
    for f, r in record["shares"].items():
        share = r["share_of_bound"]
        print(f"{f:>9} {r['step_ms']:8.2f} {r['spread']:7.0%} {r['cpu_ms']:7.2f} {r['missed_per_step']:7.1f} "
              f"{r['missed_gbs']:6.1f} {r['host_bound_ms'] or float('nan'):9.2f} "
              f"{'-' if share is None else f'{share:.0%}':>9}")


if __name__ == "__main__":
    sys.exit(main())
