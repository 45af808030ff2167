"""The peer schemes as configurations of our engine, so one benchmark compares them on the same footing.

Every scheme runs on the same model, routing, machine, CPU expert kernel
(same dtype and threads) and GPU kernels; only placement, how missed experts
are served and the schedule differ. Each baseline gives ``offload()`` kwargs;
how a run generates (warm-up, EOS, seed) is the run's, the same for every scheme
(``toolkit.moe.run.MoESettings``):

==============  ==================  =====================  ==================  ==========  ==========
name            stands for          placement              missed experts      schedule    copies
==============  ==================  =====================  ==================  ==========  ==========
all-gpu         upper bound         every expert resident  (none)              -           -
copy-on-demand  accelerate offload  device map, in order   copied at each use  serial      pageable
lru-copy        mixtral-offloading  per-layer LRU cache    copied and kept     side stream pinned
fiddler-serial  Fiddler             global popularity      CPU; copy >= 10 tok serial      pageable
ours            this engine         global popularity      makespan split      overlapped  pinned
==============  ==================  =====================  ==================  ==========  ==========

- copy-on-demand: HF accelerate's ``cpu_offload`` / ``device_map`` offload.
  Its device map fills the GPU with modules in order, so the first experts
  (by layer) stay resident (we place single experts, a finer grain than its
  per-module one). A pre-forward hook moves each offloaded weight with a
  blocking ``.to(device)`` every time the module runs: no cache, no CPU
  compute. Copies are *pageable*: accelerate keeps the offloaded state dict as
  ordinary CPU tensors and never pins them (8 GB/s instead of 55 GB/s on the
  lent machine).
- lru-copy: mixtral-offloading (Eliseev & Mazur 2023) without quantization:
  each layer keeps ``budget // L`` experts in an LRU cache, a miss is copied
  in and kept, evicting the least recently used; never computed on the CPU.
  Its offloaded experts live in *pinned* buffers and load with non-blocking
  copies, pipelined over a few device buffers: our side stream and slots. (It
  also writes the evicted expert back to host memory, which runs in the other
  PCIe direction; we keep the host copy instead.)
- fiddler-serial: Fiddler (Kamahori et al. 2024, efeslab/fiddler): the
  globally most popular experts stay on the GPU; per layer it minimises the
  *sum* of fixed costs (7 per token on the CPU, 70 per copy), so an expert
  with < 10 tokens runs on the CPU and a larger one is copied (prefill), from
  *pageable* memory (``load_state_dict`` from the CPU model). Its schedule is
  serial: the GPU experts first, then each CPU expert on its own with a
  device-to-host copy of its tokens (a sync), compute, and the result back;
  nothing overlaps. Same CPU threads as ours (Fiddler sets 16).
- ours: the same popularity placement as Fiddler, missed experts split
  between CPU compute and pinned copies to minimise each layer's makespan (one
  expert may be split between both), CPU work in a worker thread overlapped
  with the GPU and the copy engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ToolkitError


@dataclass(frozen=True)
class Baseline:
    """One scheme as engine settings (see the module docstring)."""

    name: str
    stands_for: str
    placement: str  # "all" | "popularity" | "sequential"
    decision: str  # offload(decision=...)
    policy: str | None = None  # None: static placement; "lru": a caching policy
    serial: bool = False
    pageable_copies: bool = False
    split: bool = False
    overlap: bool | None = None  # None: the engine's default (on with CUDA)
    token_cap: int | None = None  # measure decode over at most this many tokens (slow schemes)
    graphs: bool | None = None  # decode steps' dense part from CUDA graphs; None: the engine's default (on with CUDA)
    sync_free: bool = True  # layers with every expert resident skip the routing sync (experts chosen on the device)
    whole_step: bool = True  # decode steps whose layers are all sync-free replay as one graph of every layer
    fused: bool = True  # RMSNorms and sync-free decode experts as single Triton kernels (CUDA with Triton)
    lookahead: bool = False  # prefill: the next layer's copies start while this layer computes (ours only)
    spread_copies: bool = True  # several GPUs: a missed expert may be copied to any of them (each its own link)
    contention: bool = True  # the makespan decision plans with the measured contention of CPU experts and copies
    cpu_kernel: bool = True  # CPU experts of few tokens take the calibrated kernel (toolkit.moe.cpu_gemv) where faster
    graph_misses: bool = True  # one-token decode passes with missed experts captured whole (toolkit.moe.graph_pass)

    def placement_for(self, budget: int, n_layers: int, n_experts: int, popularity=None) -> np.ndarray:
        """Initial residency, bool [L, E]."""
        total = n_layers * n_experts
        if self.placement == "all":
            return np.ones((n_layers, n_experts), dtype=bool)
        if not 0 <= int(budget) <= total:
            raise ToolkitError(f"GPU expert budget must be between 0 and {total}, got {budget}")
        if self.placement == "sequential":  # a device map filled in module order
            res = np.zeros(total, dtype=bool)
            res[: int(budget)] = True
            return res.reshape(n_layers, n_experts)
        from .offload import from_popularity, spread_evenly

        if popularity is None:  # no profile: the even spread (what a popularity profile of uniform routing gives)
            return spread_evenly(int(budget), n_layers, n_experts)
        return from_popularity(np.asarray(popularity, dtype=np.float64), int(budget))

    def offload_kwargs(self, budget: int, n_layers: int, n_experts: int, popularity=None) -> dict:
        """Keyword arguments of ``offload()`` for this scheme at a GPU expert budget."""
        kw = dict(decision=self.decision, serial=self.serial, pageable_copies=self.pageable_copies,
                  split=self.split, overlap=self.overlap, graphs=self.graphs, sync_free=self.sync_free,
                  whole_step=self.whole_step, fused=self.fused,
                  lookahead=self.lookahead, spread_copies=self.spread_copies, contention=self.contention,
                  cpu_kernel=self.cpu_kernel, graph_misses=self.graph_misses)
        if self.policy is not None:
            from .policies import get_policy

            kw["policy"] = get_policy(self.policy)  # a fresh instance: caches keep state
            kw["gpu_experts"] = int(budget)
            if popularity is not None:  # the cache starts from each layer's most popular experts
                kw["placement"] = np.asarray(popularity, dtype=np.float64)
            return kw
        resident = self.placement_for(budget, n_layers, n_experts, popularity)
        kw["placement"], kw["gpu_experts"] = resident, int(resident.sum())
        return kw

    def offload(self, model, budget: int, device: str = "cuda", popularity=None, **kw):
        """``offload(model, ...)`` with this scheme's settings; extra kwargs (cost_model, routing, ...) win."""
        from .offload import offload
        from .presets import moe_blocks

        blocks = moe_blocks(model)
        if not blocks:
            raise ToolkitError(f"{type(model).__name__} has no MoE blocks to offload")
        n_experts = blocks[0].experts.gate_up_proj.shape[0]
        return offload(model, device=device, **{**self.offload_kwargs(budget, len(blocks), n_experts, popularity), **kw})

    def to_dict(self) -> dict:
        return asdict(self)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in [
        Baseline("all-gpu", "upper bound: every expert on the GPU (when it fits)", "all", "makespan"),
        Baseline("copy-on-demand", "HF accelerate offload (pageable, blocking copies at every use)", "sequential",
                 "copy", serial=True, pageable_copies=True, token_cap=16),
        Baseline("lru-copy", "mixtral-offloading, unquantized (per-layer LRU, pinned async copies)", "popularity",
                 "copy", policy="lru"),
        Baseline("fiddler-serial", "Fiddler (popularity placement, serial CPU experts, pageable copies)",
                 "popularity", "fiddler", serial=True, pageable_copies=True),
        Baseline("ours", "this engine (makespan split of CPU and pinned copies, overlapped)", "popularity",
                 "makespan", split=True, lookahead=True),
    ]
}


def get_baseline(name: str) -> Baseline:
    """A baseline by name; unknown -> ToolkitError listing the names."""
    if name not in BASELINES:
        raise ToolkitError(f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}")
    return BASELINES[name]
