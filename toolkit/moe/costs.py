"""The measured cost model of the offload engine, and its calibration.

Fiddler hard-codes a CPU expert at 7 and a weight copy at 70 (arbitrary units)
and 16 CPU threads. Here every number is measured on the machine that runs:

- CPU time of one expert vs its token count n, in bf16 and float32 (the faster
  dtype is used for CPU experts); fitted as a + b*n for reporting, evaluated
  by piecewise-linear interpolation of the measured points because the real
  curve is flat (memory bound) up to ~32 tokens and then linear. In bf16, at
  every count the toolkit's kernel (``toolkit.moe.cpu_gemv``) is offered
  (up to ``cpu_gemv.MAX_TOKENS`` tokens, all of them where its AMX path
  runs), torch's matmul and the kernel are timed in turn; CPU experts use the
  kernel up to the largest count where it won, or on to where the two
  times cross when it lost at the next count (``cpu_kernel_tokens``; passes
  of any size where it won at every count and has no token limit), and the
  model takes the faster time there;
- GPU time of one expert vs n (same treatment);
- the host-to-device copy of one expert's weights from pinned memory;
- host memory read bandwidth, which CPU experts and pinned copies share;
- optionally CPU thread scaling (one expert, one token);
- with several devices of one host (``calibrate(..., devices=[...])``), the
  peer hop: n token rows [n, D] and their routing weights [n] from devices[0]
  to each other device, and the results [n, D] back (what a resident expert on
  another device costs besides its compute; activations move, weights stay).

The decision for a layer (``CostModel.decide``) minimises the layer's
makespan, the slowest of GPU, CPU, copy engine and host memory, not the sum of
costs: missed experts are taken largest first and each goes to whichever path
grows the makespan least (greedy LPT scheduling), O(E) after an argsort.
``CostModel.plan`` then may split one expert between both paths, because with
one or two misses whole experts cannot balance a copy (6.4 ms on the lent
machine) against a CPU expert (7.2 ms): the GPU copies the expert's down
projection and the first k of its I gate/up rows, the CPU computes the other
I - k gate/up rows and sends those activations over (a few KB), and the GPU
finishes the down projection. The GPU's share of the bytes is (1 + 2k/I) / 3.

With resident experts over several devices, ``CostModel.resident_ms`` is the
time the first device is busy with them before it computes a copied expert:
the other devices compute their rows concurrently, each after its peer hop,
and the first device adds their results in before it turns to the copies; the
engine hands it to ``plan`` as ``gpu_busy_ms``. Without a peer calibration the
devices are not modelled: every resident expert counts on the first device.

Calibrations persist as JSON, one file per machine holding one entry per key
(host, GPU, dims, dtype, threads, and the devices when there are several), under ``$TOOLKIT_CACHE_DIR`` or
``~/.cache/toolkit``; an entry present is reused. Where that folder cannot be
written (a read-only home) the cache moves to the temporary folder, with a
warning: a calibration that cannot be kept must not stop the run that needs
it. A file whose entries are not valid measurements (negative or NaN times,
token counts out of order) is rejected when read, never used.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..env import cache_bytes, physical_cores
from ..errors import ToolkitError
from ..results import load_json, save_json
from . import host_memory

CACHE_VERSION = 1
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SPLIT_STEPS = 32  # a split expert's gate/up rows go to the GPU in steps of I / 32
SPLIT_OVERHEAD_MS = 0.05  # a split adds one small host-to-device transfer and a few kernel launches
SPLIT_MIN_GAIN = (0.25, 0.03)  # the cost model is approximate: split only to save >= 0.25 ms and >= 3%
LUT_TOKENS = 4096  # per-expert times are tabulated up to this many tokens
IMPROVE_ROUNDS, IMPROVE_MOVES = 4, 3  # after the greedy: rounds of single moves, of each path's smallest experts
COLD_SPAN, COLD_COPIES_MAX, COLD_COPIES_UNKNOWN = 4, 16, 4  # a cold timing's distinct weights (``cold_copies``)
BOTH_PATHS_MS = 50  # copies queued per link (in ms of copying) while the calibration runs both paths at once


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def choose_threads(override: int | None = None) -> int:
    """CPU threads for CPU experts: physical cores minus one, left for the thread that drives GPU copies."""
    if override is not None:
        if int(override) < 1:
            raise ToolkitError(f"cpu threads must be >= 1, got {override}")
        return int(override)
    return max(1, physical_cores() - 1)


def cache_path() -> Path:
    """The per-machine calibration file; in the temporary folder, with a warning, where its folder is not writable."""
    from ..results import check_writable
    from ..settings import cache_dir

    root = cache_dir()
    try:
        check_writable(root, "calibration cache", folder=True)
    except ToolkitError as e:
        import tempfile
        import warnings

        fallback = Path(tempfile.gettempdir()) / f"toolkit-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
        warnings.warn(f"{e}; keeping calibrations in {fallback} instead (set TOOLKIT_CACHE_DIR to choose)",
                      stacklevel=2)
        root = fallback
    return root / "costs.json"


def _interp(n: np.ndarray, xs: tuple, ys: tuple) -> np.ndarray:
    """Piecewise-linear in the measured points; beyond the last point, extrapolate with the last slope."""
    n = np.asarray(n, dtype=np.float64)
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    out = np.interp(n, xs, ys)
    if len(xs) > 1:
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        out = np.where(n > xs[-1], ys[-1] + slope * (n - xs[-1]), out)
    return out


def fit_linear(xs, ys) -> tuple[float, float]:
    """Least-squares a + b*n over measured points (a, b in ms and ms/token)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) < 2:
        return float(ys[0]), 0.0
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's M missed experts are served (``CostModel.plan``).

    ``copy`` [M]: copy the whole expert (else: compute it on the CPU); ``split``:
    index of the expert split between the paths (-1: none; its ``copy`` entry is
    ignored), ``fraction``: the share of its I gate/up rows the GPU computes.
    ``link`` [M]: the device a copied expert goes to (an index into the
    engine's devices; 0 where not copied); None: every copy to the first.
    """

    copy: np.ndarray
    split: int = -1
    fraction: float = 0.0
    makespan_ms: float = float("nan")
    link: np.ndarray | None = None


def overlap_ends(cpu_ms: float, cpu_during_ms: float, copy_ms: float, copy_during_ms: float) -> tuple[float, float]:
    """(CPU end, copy end) of CPU work and copies that start together and slow each other while both run.

    ``cpu_ms`` / ``copy_ms``: each alone; ``cpu_during_ms``: the same CPU work
    if all of it ran while copies stream in, ``copy_during_ms``: the copies if
    all of them ran while the CPU computes. Each progresses at its contended
    rate until the first finishes, then at its own: e.g. a CPU expert of 7.2 ms
    alone and 9.0 ms during copies, against one 6.4 ms copy that the CPU does
    not slow, ends at 6.4 + (1 - 6.4 / 9.0) x 7.2 = 8.5 ms.
    """
    if cpu_ms <= 0 or copy_ms <= 0 or (cpu_during_ms == cpu_ms and copy_during_ms == copy_ms):
        return cpu_ms, copy_ms
    if cpu_during_ms <= copy_during_ms:  # the CPU work ends first, under contention the whole time
        return cpu_during_ms, cpu_during_ms + (1 - cpu_during_ms / copy_during_ms) * copy_ms
    return copy_during_ms + (1 - copy_during_ms / cpu_during_ms) * cpu_ms, copy_during_ms


@dataclass
class _Paths:
    """Busy ms of a layer's resources as experts are assigned: per link its device's GPU and its copy engine,
    the CPU, host memory (shared by CPU experts and every link's copies).

    ``cpu`` and ``copy`` are each path's work alone; ``cpu_during`` is the CPU
    work as it runs while copies stream in and ``copy_slowdown`` the copies'
    factor while the CPU computes (measured contention, ``CostModel.cpu_contention``;
    equal to ``cpu`` and 1 when not calibrated). ``ends()`` gives the ends with
    the two overlapped; ``span`` the layer's makespan.
    """

    gpu: list
    cpu: float
    copy: list
    host: float
    cpu_during: float = 0.0
    copy_slowdown: float = 1.0

    @classmethod
    def start(cls, links: int, gpu_busy_ms: float, copy_busy_ms: float, host_busy_ms: float,
              copy_slowdown: float = 1.0) -> _Paths:
        """Work already in the layer: resident experts on the first GPU, copies the policy asked for on its link."""
        return cls([float(gpu_busy_ms)] + [0.0] * (links - 1), 0.0, [float(copy_busy_ms)] + [0.0] * (links - 1),
                   float(host_busy_ms), 0.0, float(copy_slowdown))

    def ends(self) -> tuple[float, list, list]:
        """(CPU end, copy end per link, GPU end per link) with CPU work and copies overlapped.

        The CPU computes during the longest link's copies; a link whose copies
        end later than alone delays its GPU by as much (its copied experts wait
        for their weights), which overstates the delay when resident work kept
        that GPU busy past the copies anyway.
        """
        if self.cpu_during == self.cpu and self.copy_slowdown == 1.0:
            return self.cpu, self.copy, self.gpu
        k = self.copy_slowdown
        cpu_end = overlap_ends(self.cpu, self.cpu_during, max(self.copy), k * max(self.copy))[0]
        copy = [overlap_ends(self.cpu, self.cpu_during, c, k * c)[1] for c in self.copy]
        gpu = [g + (c1 - c0) for g, c0, c1 in zip(self.gpu, self.copy, copy)]
        return cpu_end, copy, gpu

    @property
    def span(self) -> float:
        cpu, copy, gpu = self.ends()
        return max(*gpu, cpu, *copy, self.host)

    def copy_ends(self, d: int, copy_ms: float, gpu_ms: float, hop_ms: float) -> tuple[float, float]:
        """(copy end, GPU end) of one more expert copied over link d: the GPU computes it once its weights landed,
        and its rows hop to device d and back (``hop_ms``). Alone, without the CPU's contention."""
        c = self.copy[d] + copy_ms
        return c, max(self.gpu[d], c) + gpu_ms + hop_ms

    def add(self, d: int, cpu_ms: float, copy_ms: float, gpu_ms: float, hop_ms: float, host_ms: float,
            cpu_during_ms: float | None = None) -> None:
        """One expert on the CPU (d < 0; ``cpu_during_ms``: its time while copies run) or copied over link d."""
        if d < 0:
            self.cpu += cpu_ms
            self.cpu_during += cpu_ms if cpu_during_ms is None else cpu_during_ms
        else:
            self.copy[d], self.gpu[d] = self.copy_ends(d, copy_ms, gpu_ms, hop_ms)
        self.host += host_ms

    def clone(self) -> _Paths:
        """A copy whose per-link lists can grow apart from these."""
        return _Paths(list(self.gpu), self.cpu, list(self.copy), self.host, self.cpu_during, self.copy_slowdown)

    def with_expert(self, d: int, cpu_ms: float, copy_ms: float, gpu_ms: float, hop_ms: float, host_ms: float,
                    cpu_during_ms: float | None = None) -> _Paths:
        """A copy of these paths with one more expert (``add``): a candidate the greedy decision weighs."""
        out = self.clone()
        out.add(d, cpu_ms, copy_ms, gpu_ms, hop_ms, host_ms, cpu_during_ms)
        return out


@dataclass
class CostModel:
    """Measured per-expert costs on one machine, and the per-layer decision.

    Times in milliseconds. ``cpu_points``/``gpu_points`` are (tokens, ms)
    measurements; ``copy_ms`` is one expert's pinned host-to-device copy.
    ``peer_ms`` [devices - 1][len(peer_tokens)]: the round trip of n token rows
    from the first device to device d (``peer_devices[d - 1]``) and back; None:
    no peer cost (one device, or not calibrated).
    """

    cpu_tokens: tuple[int, ...]
    cpu_ms: tuple[float, ...]
    gpu_tokens: tuple[int, ...]
    gpu_ms: tuple[float, ...]
    copy_ms: float
    cpu_dtype: str = "float32"
    dtype: str = "float32"
    hidden: int = 0
    intermediate: int = 0
    expert_bytes: int = 0  # one expert's weights in the model dtype
    device: str = "cpu"
    cpu_threads: int = 1
    host_bandwidth_gbs: float | None = None  # shared by CPU experts and pinned copies; None: not modelled
    cpu_ms_by_dtype: dict = field(default_factory=dict)  # dtype -> ms at cpu_tokens (reporting)
    thread_scaling: dict = field(default_factory=dict)  # threads -> ms, one expert at one token
    peer_tokens: tuple[int, ...] | None = None  # token rows of the measured peer hops
    peer_ms: tuple[tuple[float, ...], ...] | None = None  # [devices - 1][tokens] round trip first device -> d -> first
    peer_devices: tuple[str, ...] = ()  # the device of each peer_ms row (devices[1:] at calibration)
    # contention of the two paths for host memory (None: not measured, each path as fast as alone):
    cpu_contention: tuple[float, ...] | None = None  # CPU expert while every link copies / alone, at cpu_tokens
    copy_contention: float | None = None  # a copy on every link while a CPU expert runs / alone
    contention_links: int = 0  # links that copied during the measurement
    host_paths_gbs: float | None = None  # GB/s CPU experts and copies over those links read together (None: not measured)
    # CPU experts' linear layers: passes of up to this many tokens take toolkit.moe.cpu_gemv (0: torch's matmul)
    cpu_kernel_tokens: int = 0
    cpu_ms_torch: tuple[float, ...] | None = None  # torch's CPU expert ms at cpu_tokens, where the kernel was timed too
    cpu_ms_kernel: tuple[float | None, ...] | None = None  # the kernel's at cpu_tokens (None: not offered that many)
    key: str = ""
    meta: dict = field(default_factory=dict)

    # -- evaluation (vectorised over experts) ---------------------------------------------------
    def cpu_time(self, n) -> np.ndarray:
        return _interp(n, self.cpu_tokens, self.cpu_ms)

    def cpu_time_during_copies(self, n) -> np.ndarray:
        """CPU ms of one expert at ``n`` tokens while copies stream in (``cpu_time`` when contention is not measured)."""
        if not self.cpu_contention:
            return self.cpu_time(n)
        return self.cpu_time(n) * _interp(n, self.cpu_tokens, self.cpu_contention)

    @property
    def copy_slowdown(self) -> float:
        """How much longer a copy takes while a CPU expert runs (1: not measured)."""
        return float(self.copy_contention) if self.copy_contention else 1.0

    def balanced_share(self) -> float:
        """The GPU's share f of a one-token missed expert at which its copy and the CPU's rest end together:
        f x copy = (1 - f) x CPU expert, each at its rate beside the other (the measured contention), so
        f = CPU / (CPU + copy), rounded to 3 digits (``toolkit.moe.graph_pass`` splits each missed expert there)."""
        cpu = float(self.cpu_time_during_copies(np.array([1]))[0])
        copy = self.copy_ms * self.copy_slowdown
        return round(cpu / (cpu + copy), 3) if cpu + copy > 0 else 0.0

    def without_contention(self) -> CostModel:
        """This model planning as if CPU experts and copies did not slow each other (an ablation, and decode
        passes); one instance per model, so its plans are cached across the layers that ask for it."""
        if self.cpu_contention is None and self.copy_contention is None and not self.contention_links:
            return self
        if "_without_contention" not in self.__dict__:
            self.__dict__["_without_contention"] = replace(self, cpu_contention=None, copy_contention=None,
                                                           contention_links=0)
        return self.__dict__["_without_contention"]

    def gpu_time(self, n) -> np.ndarray:
        return _interp(n, self.gpu_tokens, self.gpu_ms)

    @property
    def cpu_linear(self):
        """The linear layer CPU experts use: ``cpu_gemv``'s kernel for passes of up to ``cpu_kernel_tokens``."""
        from . import cpu_gemv

        return cpu_gemv.linear_up_to(self.cpu_kernel_tokens if self.cpu_dtype == "bfloat16" else 0)

    def without_cpu_kernel(self) -> CostModel:
        """This model with CPU experts on torch's matmul at its measured times (the ablation of the kernel)."""
        if not self.cpu_kernel_tokens:
            return self
        ms = self.cpu_ms_torch if self.cpu_dtype == "bfloat16" else self.cpu_ms
        by_dtype = {**self.cpu_ms_by_dtype, "bfloat16": list(self.cpu_ms_torch)}
        return replace(self, cpu_kernel_tokens=0, cpu_ms=tuple(ms), cpu_ms_by_dtype=by_dtype)

    def peer_time(self, n, d: int) -> float:
        """ms for ``n`` token rows to go from the first device to device ``d`` (an index into the devices) and back.

        0 for d = 0 or without a peer calibration; a device beyond the
        calibrated ones is taken to be as slow as the slowest measured one.
        """
        if d == 0 or not self.peer_ms or not n:
            return 0.0
        rows = [d - 1] if d <= len(self.peer_ms) else range(len(self.peer_ms))
        if n > LUT_TOKENS:
            return max(float(_interp([n], self.peer_tokens, self.peer_ms[r])[0]) for r in rows)
        return max(self._peer_lut[r][int(n)] for r in rows)

    @cached_property
    def _peer_lut(self) -> list[list[float]]:
        """Peer-hop ms for 0..LUT_TOKENS rows per device, as Python floats (looked up once per layer and pass)."""
        n = np.arange(LUT_TOKENS + 1)
        return [_interp(n, self.peer_tokens, row).tolist() for row in self.peer_ms or ()]

    def resident_ms(self, tokens, tiers=None) -> float:
        """ms the first device is busy with a layer's resident experts before it can compute a copied one.

        ``tokens`` [R]: token count of each resident expert used; ``tiers`` [R]:
        the device index of each (None: all on the first). One device, or no
        peer calibration: the sum of their GPU times. Several devices with a
        peer calibration: each other device d computes its experts after its
        rows arrive and before they return, concurrently with the first, and
        the first adds their results in before the copied experts (stream
        order in the engine), so max(first's sum, max_d(peer hop_d + d's sum)).
        """
        tokens = [int(n) for n in tokens]
        gpu = self.times(tokens)[1]
        if tiers is None or not self.peer_ms:
            return float(sum(gpu))
        busy: dict[int, float] = {}
        rows: dict[int, int] = {}
        for n, t, d in zip(tokens, gpu, tiers):
            busy[int(d)] = busy.get(int(d), 0.0) + t
            rows[int(d)] = rows.get(int(d), 0) + n
        return max((busy[d] + self.peer_time(rows[d], d) for d in busy), default=0.0)

    @property
    def cpu_fit(self) -> tuple[float, float]:
        return fit_linear(self.cpu_tokens, self.cpu_ms)

    @property
    def gpu_fit(self) -> tuple[float, float]:
        return fit_linear(self.gpu_tokens, self.gpu_ms)

    @property
    def breakeven_tokens(self) -> float:
        """Tokens above which a copy (plus GPU compute) beats CPU compute, ignoring overlap."""
        n = np.arange(1, 4097)
        better = np.flatnonzero(self.copy_ms + self.gpu_time(n) < self.cpu_time(n))
        return float(n[better[0]]) if len(better) else float("inf")

    @property
    def host_read_gbs(self) -> float | None:
        """How fast host memory serves missed experts: the faster of a plain read by the CPU threads
        (``host_bandwidth_gbs``) and both paths at once (``host_paths_gbs``); None where neither was measured."""
        rates = [r for r in (self.host_bandwidth_gbs, self.host_paths_gbs) if r]
        return max(rates) if rates else None

    def _host_ms(self, nbytes: float) -> float:
        rate = self.host_read_gbs
        if not rate:
            return 0.0
        return nbytes / (rate * 1e9) * 1e3

    @cached_property
    def _lut(self) -> tuple[list[float], list[float], list[float]]:
        """CPU, GPU and contended CPU ms for 0..LUT_TOKENS tokens as Python floats: a layer's decision is a few
        list lookups."""
        n = np.arange(LUT_TOKENS + 1)
        return self.cpu_time(n).tolist(), self.gpu_time(n).tolist(), self.cpu_time_during_copies(n).tolist()

    def times(self, tokens: list[int]) -> tuple[list[float], list[float]]:
        """(CPU ms, GPU ms) of one expert at each token count in ``tokens``, as lists of Python floats.

        The engine asks this once per layer and pass (decode: a handful of small
        counts), so counts up to ``LUT_TOKENS`` are list lookups, not numpy calls.
        """
        if tokens and max(tokens) > LUT_TOKENS:
            return self.cpu_time(tokens).tolist(), self.gpu_time(tokens).tolist()
        cpu, gpu, _ = self._lut
        return [cpu[n] for n in tokens], [gpu[n] for n in tokens]

    def _during(self, tokens: list[int]) -> list[float]:
        """Contended CPU ms of one expert at each count in ``tokens`` (``times``' CPU ms where not measured)."""
        if tokens and max(tokens) > LUT_TOKENS:
            return self.cpu_time_during_copies(tokens).tolist()
        during = self._lut[2]
        return [during[n] for n in tokens]

    def _host_per_expert(self) -> tuple[float, float]:
        """Host-memory ms of one CPU expert (its bytes in the CPU dtype) and of one copy."""
        cpu_bytes = self.expert_bytes * (DTYPES[self.cpu_dtype].itemsize / DTYPES[self.dtype].itemsize)
        return self._host_ms(cpu_bytes), self._host_ms(self.expert_bytes)

    def decide(self, tokens, gpu_busy_ms: float = 0.0, copy_busy_ms: float = 0.0) -> np.ndarray:
        """Which missed experts to copy (True) rather than compute on the CPU (False).

        ``tokens`` [M]: token count of each missed expert; ``gpu_busy_ms`` and
        ``copy_busy_ms``: work already in the layer (resident experts, copies
        the policy asked for). Greedy: largest
        batch first, each to the path that grows the layer's makespan
        max(GPU, CPU, copy engine, host memory) least; ties go to less work.
        """
        tokens = [int(n) for n in np.asarray(tokens, dtype=np.int64).reshape(-1)]  # [M]
        route = self._decide(tokens, *self.times(tokens), gpu_busy_ms, copy_busy_ms)
        return np.array([r >= 0 for r in route], dtype=bool)

    def _start(self, links: int, gpu_busy_ms: float, copy_busy_ms: float) -> _Paths:
        host_copy = self._host_per_expert()[1]
        return _Paths.start(links, gpu_busy_ms, copy_busy_ms,
                            copy_busy_ms / self.copy_ms * host_copy if self.copy_ms else 0.0, self.copy_slowdown)

    def _decide(self, tokens, cpu, gpu, gpu_busy_ms, copy_busy_ms, links: int = 1) -> list[int]:
        """The path of each missed expert: -1 the CPU, d >= 0 a copy over link d (to device d)."""
        # plain Python over M <= E floats: numpy's per-call overhead would dominate for Mixtral's 8 experts
        route = [-1] * len(tokens)
        host_cpu, host_copy = self._host_per_expert()
        during = self._during(tokens)
        t = self._start(links, gpu_busy_ms, copy_busy_ms)
        for i in sorted(range(len(tokens)), key=lambda i: -tokens[i]):  # stable: largest batch first
            span_cpu = t.with_expert(-1, cpu[i], self.copy_ms, gpu[i], 0.0, host_cpu, during[i]).span
            span_copy, best = float("inf"), 0
            for d in range(links):
                span = t.with_expert(d, cpu[i], self.copy_ms, gpu[i], self.peer_time(tokens[i], d), host_copy).span
                if span < span_copy:
                    span_copy, best = span, d
            if span_copy < span_cpu or (span_copy == span_cpu and self.copy_ms + gpu[i] < cpu[i]):
                route[i] = best
            d = route[i]  # a CPU expert (-1) has no hop: the first link's (none) stands in, unused
            t.add(d, cpu[i], self.copy_ms, gpu[i], self.peer_time(tokens[i], max(d, 0)),
                  host_copy if d >= 0 else host_cpu, during[i])
        return route

    def _improve(self, tokens, cpu, gpu, route, gpu_busy_ms, copy_busy_ms, links: int = 1) -> list[int]:
        """``route`` after moving single experts to another path while that shortens the layer.

        With contention the paths' ends depend on each other (a CPU expert
        runs slower while copies stream), so the greedy's choice for one
        expert can look worse than it turns out once later experts are placed:
        e.g. eight equal experts split 5 copies / 3 CPU where 6 / 2 ends
        sooner. A few rounds of moving one of each path's smallest experts
        (the moves that fine-tune the balance) fix that at a bounded cost.
        """
        if not self.cpu_contention or len(tokens) < 2:
            return route  # without contention the paths are independent: the greedy's balance stands
        span = self._paths(tokens, cpu, gpu, route, gpu_busy_ms, copy_busy_ms, links).span
        for _ in range(IMPROVE_ROUNDS):
            best = None
            for path in range(-1, links):
                mine = sorted((i for i in range(len(tokens)) if route[i] == path), key=lambda i: tokens[i])
                for i in list({tokens[i]: i for i in reversed(mine)}.values())[:IMPROVE_MOVES]:
                    for d in range(-1, links):
                        if d == path:
                            continue
                        moved = [*route[:i], d, *route[i + 1:]]
                        t = self._paths(tokens, cpu, gpu, moved, gpu_busy_ms, copy_busy_ms, links).span
                        if t < span - 1e-9 and (best is None or t < best[0]):
                            best = (t, moved)
            if best is None:
                break
            span, route = best
        return route

    def _paths(self, tokens, cpu, gpu, route, gpu_busy_ms=0.0, copy_busy_ms=0.0, links: int = 1) -> _Paths:
        """Busy ms of each resource under whole-expert assignments ``route`` (as ``_decide``), in its accounting."""
        host_cpu, host_copy = self._host_per_expert()
        during = self._during(tokens)
        t = self._start(links, gpu_busy_ms, copy_busy_ms)
        for i in sorted(range(len(tokens)), key=lambda i: -tokens[i]):
            d = route[i]
            t.add(d, cpu[i], self.copy_ms, gpu[i], self.peer_time(tokens[i], max(d, 0)),
                  host_copy if d >= 0 else host_cpu, during[i])
        return t

    def plan(self, tokens, gpu_busy_ms: float = 0.0, copy_busy_ms: float = 0.0, split: bool = True,
             links: int = 1) -> LayerPlan:
        """``decide``, then (if ``split``) the one expert split between copy and CPU that lowers the makespan most.

        The split expert s with GPU fraction f = j / SPLIT_STEPS of its gate/up
        rows is copied last (a share (1 + 2f) / 3 of its bytes); the CPU computes
        the rest of its gate/up rows, (2/3)(1 - f) of its CPU time; the GPU
        computes its own rows once they land and the down projection once the
        CPU's activations are back. Two candidates are tried: the slowest CPU
        expert and the smallest copied one; f is scanned on the grid.

        ``links``: devices a missed expert may be copied to, each over its own
        host-to-device link (``link`` of the plan; the first is the one holding
        the dense part, where ``gpu_busy_ms`` and ``copy_busy_ms`` fall and a
        split expert goes). A copy to device d > 0 adds the peer hop of its
        rows (``peer_time``); all links draw on the one host memory.
        """
        tokens = [int(n) for n in np.asarray(tokens, dtype=np.int64).reshape(-1)]  # [M]
        key = (tuple(tokens), float(gpu_busy_ms), float(copy_busy_ms), bool(split), int(links))
        cache = self.__dict__.setdefault("_plans", {})  # decode repeats a handful of layer shapes: plan each once
        if key not in cache:
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = self._plan(tokens, gpu_busy_ms, copy_busy_ms, split, max(1, int(links)))
        return cache[key]

    def _plan(self, tokens, gpu_busy_ms, copy_busy_ms, split, links=1) -> LayerPlan:
        cpu, gpu = self.times(tokens)
        route = self._decide(tokens, cpu, gpu, gpu_busy_ms, copy_busy_ms, links)
        route = self._improve(tokens, cpu, gpu, route, gpu_busy_ms, copy_busy_ms, links)
        state = self._paths(tokens, cpu, gpu, route, gpu_busy_ms, copy_busy_ms, links)
        whole = state.span
        best = (float("inf"), 0.0, -1, 0.0)  # (makespan, balance, split expert, fraction)
        if split and tokens and self.copy_ms:
            host_cpu, host_copy = self._host_per_expert()
            during = self._during(tokens)
            cands = [i for i in range(len(tokens)) if route[i] < 0]
            cands = [max(cands, key=lambda i: cpu[i])] if cands else []
            copied = [i for i in range(len(tokens)) if route[i] >= 0]
            cands += [min(copied, key=lambda i: tokens[i])] if copied else []
            for s in cands:
                rest = [i for i in range(len(tokens)) if i != s]
                st = self._paths([tokens[i] for i in rest], [cpu[i] for i in rest], [gpu[i] for i in rest],
                                 [route[i] for i in rest], gpu_busy_ms, copy_busy_ms, links)
                for j in range(SPLIT_STEPS):  # f = 1 would be a whole copy
                    f = j / SPLIT_STEPS
                    share = (1 + 2 * f) / 3  # GPU share of the expert's bytes
                    cpu_share = (2 / 3) * (1 - f)  # the CPU's share of its time: the other gate/up rows
                    sp = st.clone()
                    sp.cpu = st.cpu + cpu_share * cpu[s] + SPLIT_OVERHEAD_MS
                    sp.cpu_during = st.cpu_during + cpu_share * during[s] + SPLIT_OVERHEAD_MS
                    sp.host = st.host + share * host_copy + (1 - share) * host_cpu
                    sp.copy[0] += share * self.copy_ms  # the split goes to the first device, copied last
                    c_cpu, c_copy, c_gpus = sp.ends()
                    c_gpu = max(c_gpus[0], c_copy[0]) + (2 * f / 3) * gpu[s]  # its GPU gate/up rows done
                    c_end = max(c_gpu, c_cpu) + gpu[s] / 3  # the down projection on the GPU
                    others = max([*c_gpus[1:], *c_copy[1:]], default=0.0)
                    # among equal makespans (host-bound) prefer the balanced split: least exposed to contention
                    best = min(best, (max(c_end, c_copy[0], sp.host, others), max(c_cpu, c_copy[0]), s, f))
        copy = np.array([r >= 0 for r in route], dtype=bool)
        link = np.array([max(r, 0) for r in route], dtype=np.int64)
        copy.flags.writeable = link.flags.writeable = False  # plans are cached and shared
        link = link if links > 1 else None
        if whole - best[0] >= max(SPLIT_MIN_GAIN[0], SPLIT_MIN_GAIN[1] * whole):
            return LayerPlan(copy, best[2], best[3], best[0], link)
        return LayerPlan(copy, -1, 0.0, whole, link)

    def layer_makespan(self, tokens, copy_mask, gpu_busy_ms: float = 0.0, copy_busy_ms: float = 0.0) -> float:
        """Predicted makespan (ms) of one layer's missed experts under a given split (same accounting as decide)."""
        tokens = [int(n) for n in np.asarray(tokens, dtype=np.int64).reshape(-1)]
        cpu, gpu = self.times(tokens)
        route = [0 if c else -1 for c in np.asarray(copy_mask, dtype=bool).reshape(-1)]
        return self._paths(tokens, cpu, gpu, route, gpu_busy_ms, copy_busy_ms).span

    # -- construction and persistence -----------------------------------------------------------
    @classmethod
    def fixed(cls, cpu: tuple[float, float] = (1.0, 0.0), gpu: tuple[float, float] = (0.01, 0.0),
              copy_ms: float = 1.0, **kw) -> CostModel:
        """A synthetic model from a + b*n lines (tests, what-if studies)."""
        xs = (1, 1024)
        return cls(cpu_tokens=xs, cpu_ms=tuple(cpu[0] + cpu[1] * x for x in xs), gpu_tokens=xs,
                   gpu_ms=tuple(gpu[0] + gpu[1] * x for x in xs), copy_ms=float(copy_ms), **kw)

    @property
    def peer_fit(self) -> list[tuple[float, float]]:
        """a + b*n ms of each calibrated peer hop (reporting); empty without a peer calibration."""
        return [fit_linear(self.peer_tokens, row) for row in self.peer_ms or ()]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_fit_ms"] = dict(zip(("a", "b"), self.cpu_fit))
        d["gpu_fit_ms"] = dict(zip(("a", "b"), self.gpu_fit))
        if self.peer_ms:
            d["peer_fit_ms"] = [dict(zip(("a", "b"), fit)) for fit in self.peer_fit]
        d["breakeven_tokens"] = self.breakeven_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        if not isinstance(d, dict):
            raise ToolkitError(f"calibration entry must be an object of measured costs, got {type(d).__name__}; "
                               "delete it and recalibrate")
        try:
            names = {f for f in cls.__dataclass_fields__}
            kw = {k: v for k, v in d.items() if k in names}
            for k in ("cpu_tokens", "cpu_ms", "gpu_tokens", "gpu_ms"):
                if not isinstance(kw[k], list | tuple):
                    raise ValueError(f"{k} must be a list of measured points, got {kw[k]!r}")
                kw[k] = tuple(kw[k])
            kw["thread_scaling"] = {int(k): float(v) for k, v in kw.get("thread_scaling", {}).items()}
            for k in ("cpu_contention", "cpu_ms_torch", "cpu_ms_kernel"):
                if isinstance(kw.get(k), list):
                    kw[k] = tuple(kw[k])
            kw.update(_peer_fields(kw))
            model = cls(**kw)
            if not (len(model.cpu_tokens) == len(model.cpu_ms) >= 1 and len(model.gpu_tokens) == len(model.gpu_ms) >= 1):
                raise ValueError("token and time lists differ in length")
            if model.cpu_dtype not in DTYPES or model.dtype not in DTYPES:
                raise ValueError(f"unknown dtype {model.cpu_dtype!r}/{model.dtype!r}")
            for name in ("cpu", "gpu"):
                _check_points(name, getattr(model, f"{name}_tokens"), getattr(model, f"{name}_ms"))
            _check_ms("copy_ms", model.copy_ms)
            for row in model.peer_ms or ():
                _check_points("peer", model.peer_tokens, row)
            _check_contention(model)
            _check_kernel(model)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ToolkitError(f"calibration entry is malformed ({type(e).__name__}: {e}); delete it and recalibrate") from None
        return model

    def summary(self) -> str:
        a, b = self.cpu_fit
        ga, gb = self.gpu_fit
        peers = "".join(f" | rows to {name or f'device {d + 1}'} and back: {pa:.3f} + {pb:.5f}*n ms"
                        for d, ((pa, pb), name) in enumerate(zip(self.peer_fit, self.peer_devices or
                                                                 [""] * len(self.peer_fit))))
        return (f"CPU expert ({self.cpu_dtype}, {self.cpu_threads} threads{self.kernel_note()}): {a:.3f} + {b:.4f}*n ms | "
                f"GPU expert: {ga:.3f} + {gb:.5f}*n ms | copy: {self.copy_ms:.3f} ms/expert | "
                f"copy pays from n >= {self.breakeven_tokens:g}{peers}{self.contention_line()}")

    @property
    def kernel_gain(self) -> float | None:
        """torch's time over the CPU kernel's for a bf16 expert at the first calibrated token count (None: not
        compared)."""
        if not self.cpu_ms_torch or self.cpu_dtype != "bfloat16":
            return None
        kernel = self.cpu_ms[0] if self.cpu_kernel_tokens else (self.cpu_ms_kernel or (None,))[0]
        return None if kernel is None else self.cpu_ms_torch[0] / kernel

    def kernel_note(self) -> str:
        """', toolkit kernel for passes of up to 8 tokens (x1.42 torch's at n=1)' where CPU experts use it, else ''."""
        gain = self.kernel_gain
        if not self.cpu_kernel_tokens or gain is None:
            return ""
        return f", toolkit kernel for {kernel_passes(self.cpu_kernel_tokens)} (x{gain:.2f} torch's at n={self.cpu_tokens[0]})"

    def kernel_line(self) -> str:
        """What CPU experts multiply with, for the ``moe`` command: the kernel and its measured gain, or torch's."""
        gain, n = self.kernel_gain, self.cpu_tokens[0]
        if self.cpu_kernel_tokens and gain is not None:
            return f"toolkit kernel for {kernel_passes(self.cpu_kernel_tokens)} (x{gain:.2f} torch's matmul at n={n})"
        if gain is not None:
            return f"torch's matmul (the toolkit kernel, x{gain:.2f} torch's at n={n}, is " \
                   f"{'switched off' if gain > 1 else 'slower here'})"
        if self.cpu_ms_torch is not None and self.cpu_dtype == "bfloat16":
            return "torch's matmul (the toolkit kernel was measured too, and is not used)"
        return f"torch's matmul ({self.cpu_dtype})"

    def contention_line(self) -> str:
        """' | while copying over 1 link: CPU expert x1.25 (n=1) .. x1.10 (n=128), copy x1.02 beside a CPU expert',
        or '' where not measured."""
        if not self.cpu_contention:
            return ""
        links = f"{self.contention_links} link{'s' if self.contention_links != 1 else ''}"
        first, last = (self.cpu_tokens[0], self.cpu_contention[0]), (self.cpu_tokens[-1], self.cpu_contention[-1])
        cpu = f"x{first[1]:.2f} (n={first[0]})" + (f" .. x{last[1]:.2f} (n={last[0]})" if len(self.cpu_tokens) > 1
                                                   else "")
        both = f", both read {self.host_paths_gbs:.1f} GB/s together" if self.host_paths_gbs else ""
        return f" | while copying over {links}: CPU expert {cpu}, copy x{self.copy_slowdown:.2f} beside a CPU expert" \
               f"{both}"


def _peer_fields(kw: dict) -> dict:
    """The peer-hop entries of a calibration as tuples; ValueError when only some are there or their sizes differ."""
    tokens, ms, names = kw.get("peer_tokens"), kw.get("peer_ms"), kw.get("peer_devices") or ()
    if tokens is None and ms is None:
        if names:
            raise ValueError(f"peer_devices {list(names)} given without peer_tokens and peer_ms")
        return {"peer_tokens": None, "peer_ms": None, "peer_devices": ()}
    if not isinstance(tokens, list | tuple) or not isinstance(ms, list | tuple) or not ms \
            or not all(isinstance(row, list | tuple) for row in ms):
        raise ValueError(f"peer_tokens must be a list of token counts and peer_ms a non-empty list of lists, one per "
                         f"device, got {tokens!r} and {ms!r}")
    if not tokens or any(len(row) != len(tokens) for row in ms):
        raise ValueError(f"peer_ms rows must each have one time per peer token count ({len(tokens)}), "
                         f"got {[len(row) for row in ms]}")
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names) \
            or len(names) not in (0, len(ms)):
        raise ValueError(f"peer_devices must name the {len(ms)} device(s) of peer_ms, got {names!r}")
    return {"peer_tokens": tuple(tokens), "peer_ms": tuple(tuple(row) for row in ms), "peer_devices": tuple(names)}


def _check_ms(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite time >= 0 ms, got {v!r}")


def _check_points(name: str, tokens, ms) -> None:
    """Measured (tokens, ms) points: whole token counts >= 1 in increasing order, finite times >= 0."""
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"{name}_tokens must be whole numbers >= 1, got {t!r}")
    if any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError(f"{name}_tokens must increase, got {list(tokens)}")
    for v in ms:
        _check_ms(f"{name}_ms", v)


def _check_rate(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0)):
        raise ValueError(f"{name} must be a rate > 0 GB/s, got {v!r}")


def _check_contention(model: CostModel) -> None:
    """The measured contention: a slowdown > 0 per CPU token count and one for copies, or none of them."""
    cpu, copy = model.cpu_contention, model.copy_contention
    _check_rate("host_paths_gbs", model.host_paths_gbs)
    if cpu is None and copy is None:
        return
    if cpu is None or copy is None:
        raise ValueError("cpu_contention and copy_contention are measured together; one is missing")
    if len(cpu) != len(model.cpu_tokens):
        raise ValueError(f"cpu_contention needs one slowdown per CPU token count ({len(model.cpu_tokens)}), "
                         f"got {len(cpu)}")
    for v in (*cpu, copy):
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"contention slowdowns must be finite ratios > 0, got {v!r}")
    if isinstance(model.contention_links, bool) or not isinstance(model.contention_links, int) \
            or model.contention_links < 1:
        raise ValueError(f"contention_links must be the number of links that copied (>= 1), "
                         f"got {model.contention_links!r}")


def _check_kernel(model: CostModel) -> None:
    """The CPU kernel's choice: a token count >= 0, and torch's times (one per CPU token count) wherever it is used."""
    n = model.cpu_kernel_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"cpu_kernel_tokens must be a token count >= 0, got {n!r}")
    if model.cpu_ms_torch is None:
        if n:
            raise ValueError("cpu_kernel_tokens needs cpu_ms_torch, torch's times it was compared with")
        return
    if model.cpu_ms_kernel is not None:
        if len(model.cpu_ms_kernel) != len(model.cpu_tokens):
            raise ValueError(f"cpu_ms_kernel needs one entry per CPU token count ({len(model.cpu_tokens)}), "
                             f"got {len(model.cpu_ms_kernel)}")
        for v in model.cpu_ms_kernel:
            if v is not None:
                _check_ms("cpu_ms_kernel", v)
    if len(model.cpu_ms_torch) != len(model.cpu_tokens):
        raise ValueError(f"cpu_ms_torch needs one time per CPU token count ({len(model.cpu_tokens)}), "
                         f"got {len(model.cpu_ms_torch)}")
    for v in model.cpu_ms_torch:
        _check_ms("cpu_ms_torch", v)


def kernel_tokens(tokens, torch_ms, kernel_ms: dict, any_size: bool = False) -> int:
    """Up to how many tokens the CPU kernel beats torch: the largest calibrated count n such that at n and at
    every calibrated count below it the kernel was measured faster (0: never, or not at the first count).
    Where it was timed at the next count too and lost there, up to where the two times cross between the
    two counts, each taken linear in between as the cost model takes them (a kernel that won by 2.2 ms at 32
    tokens and lost by 0.15 at 128 takes passes of up to 121).

    ``any_size``: the kernel takes passes of any size (its AMX path); where it won at every calibrated count,
    beyond the last too (``cpu_gemv.ANY_TOKENS``): both grow linearly there, and the cost model extrapolates
    the kernel's times, so the passes it plans at the kernel's times are the ones that take it."""
    from .cpu_gemv import ANY_TOKENS

    best, lead = 0, 0.0  # the last count the kernel won and by how many ms
    for n, t in zip(tokens, torch_ms):
        if n not in kernel_ms or kernel_ms[n] is None:
            return best
        if not kernel_ms[n] < t:
            if not best:
                return 0
            behind = kernel_ms[n] - t  # >= 0 here, lead > 0: the lines cross in [best, n)
            return best + int((n - best) * lead / (lead + behind)) if lead + behind > 0 else best
        best, lead = n, t - kernel_ms[n]
    return ANY_TOKENS if any_size and best else best


def kernel_passes(n: int) -> str:
    """'passes of up to 8 tokens', or 'passes of any size' (``cpu_gemv.ANY_TOKENS``)."""
    from .cpu_gemv import ANY_TOKENS

    return "passes of any size" if n >= ANY_TOKENS else f"passes of up to {n} token{'s' if n != 1 else ''}"


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {"version": CACHE_VERSION, "models": {}}
    data = load_json(path)  # corrupt JSON -> ToolkitError
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ToolkitError(f"{path} is not a toolkit calibration file (expected {{'version', 'models'}}); delete it")
    return data


def _cached(file: Path, key: str) -> CostModel | None:
    """The calibration cached under ``key`` in ``file``, or None (no file, no such entry, or an entry that lacks a
    measurement this version makes: a GPU entry without the contention of its two paths, a bf16 entry from
    before the CPU kernel was compared with torch where the kernel runs, or whose kernel was not timed at a
    count it is offered now (a machine whose AMX path takes passes of any size), or an entry whose CPU experts
    were timed on one copy of the weights, partly from cache (no ``cold_copies`` in its meta), or one that
    read a path as faster beside the other (a contention below 1: sample noise, read as 1 since); those are
    measured again)."""
    if not file.exists():
        return None
    models = _read_cache(file)["models"]
    if key not in models:
        return None
    model = CostModel.from_dict(models[key])
    if "cold_copies" not in model.meta:
        return None
    if model.cpu_contention is None and model.device.startswith("cuda"):
        return None
    if model.cpu_contention is not None and min(*model.cpu_contention, model.copy_contention) < 1:
        return None
    if "bfloat16" in model.cpu_ms_by_dtype:
        from . import cpu_gemv

        if model.cpu_ms_torch is None and cpu_gemv.usable():
            return None
        untimed = [n for n, v in zip(model.cpu_tokens, model.cpu_ms_kernel or ()) if v is None]
        if untimed and any(cpu_gemv.offered(n) for n in untimed):
            return None
    return model


def load_cost_model(path: str | os.PathLike, key: str | None = None) -> CostModel:
    """A cost model from a calibration file (the entry ``key``, or the only/latest one)."""
    path = Path(path)
    if not path.exists():
        raise ToolkitError(f"calibration file not found: {path}")
    models = _read_cache(path)["models"]
    if key is not None:
        if key not in models:
            raise ToolkitError(f"{path} has no calibration for {key!r} (has: {', '.join(models) or 'none'})")
        return CostModel.from_dict(models[key])
    if not models:
        raise ToolkitError(f"{path} holds no calibration")
    return CostModel.from_dict(list(models.values())[-1])


def save_cost_model(model: CostModel, path: str | os.PathLike | None = None) -> Path:
    path = Path(path) if path is not None else cache_path()
    data = _read_cache(path)
    data["models"][model.key] = model.to_dict()
    return save_json(data, path)


def calibration_key(hidden: int, intermediate: int, dtype, device: str, threads: int, devices=None) -> str:
    """The cache entry of one calibration; ``devices`` (several, the peer hops measured) adds them to the key."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "cpu"
    key = f"{socket.gethostname()}|{gpu}|D{hidden}|I{intermediate}|{dtype_name(dtype)}|t{threads}"
    if gpu != "cpu" and host_memory.enabled():  # the experts' host memory on huge pages: measured on those
        key += "|huge"
    return key + f"|devices={','.join(devices)}" if devices else key


def calibration_devices(device: str, devices) -> list[str] | None:
    """``devices`` as device names with ``device`` first (CUDA ones with their index), or None for one device."""
    from ..env import resolve_device

    def name(d) -> str:
        d = torch.device(resolve_device(str(d)))
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        return str(d)

    if devices is None:
        return None
    if isinstance(devices, str | torch.device) or not len(devices):
        raise ToolkitError(f"devices must be a non-empty list of devices, got {devices!r}")
    try:
        out = [name(d) for d in devices]
    except ToolkitError as err:
        raise ToolkitError(f"devices: {err}") from None
    if out[0] != name(device):
        raise ToolkitError(f"devices must start with device {name(device)} (the dense part's), got {out}")
    if len({torch.device(d).type for d in out}) > 1:
        raise ToolkitError(f"devices must all be of one kind, got {out}")
    return out if len(out) > 1 else None


# -- measurement ----------------------------------------------------------------------------------

def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act=F.silu,
                   linear=F.linear) -> torch.Tensor:
    """One SwiGLU expert as transformers computes it: x [n, D], gate_up [2I, D], down [D, I] -> [n, D].

    ``linear``: the matmul (``F.linear``, or ``CostModel.cpu_linear`` for CPU experts)."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return linear(act(gate) * up, down)  # [n, D]


def _median_ms(fn, repeats: int, warmup: int, sync=None, clock=time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        if sync:
            sync()
        out.append((clock() - t0) * 1e3)
    return statistics.median(out)


def _rounds_ms(fns: dict, rounds: int, reps: int, sync=None) -> dict:
    """Each of ``fns`` (name -> callable) timed in turn per round, the median of ``reps`` calls, after two
    untimed calls of each (page in, build, wake threads) -> name -> per-round ms (the benchmarks' rounds)."""
    for fn in fns.values():
        fn(), fn()
    if sync:
        sync()
    out: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(_median_ms(fn, reps, 0, sync=sync))
    return out


def _alternating_ms(fns: dict, repeats: int, warmup: int, clock=time.perf_counter) -> dict:
    """Median ms of each of ``fns`` (name -> callable), timed in turn within every repeat, so that a slow spell of
    the machine hits all of them alike (the comparison is what decides)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            out[k].append((clock() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with torch's intra-op thread count at ``n``, restoring the previous count on exit.

    Like ``torch.utils.benchmark``'s ``set_torch_threads``: calibration, the
    ceilings and the engine's inline and serial CPU experts all run with the
    CPU-expert thread count and must leave the caller's setting as it was. The
    count is per OS thread; when it already is ``n`` nothing changes, because
    resizing the OpenMP team is not free and the engine enters this once per layer.
    """
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _warmups(hidden: int, intermediate: int) -> int:
    return 1 if hidden * intermediate > 1e7 else 3  # a Mixtral-sized expert is steady after one call


def cold_copies(nbytes: int, cache: int | None) -> int:
    """How many distinct copies of ``nbytes`` of weights a timing cycles through, so that each call reads its
    weights from memory, as a run's experts are, and not from the last-level cache (``cache`` bytes, None where
    the OS does not say): enough to span ``COLD_SPAN`` caches, at least 2 and at most ``COLD_COPIES_MAX``.

    Timing one Mixtral expert (352 MB) again and again on hosts with a 300 MiB cache read it partly from cache:
    the CPU kernel took 3.18 ms a token against 3.36 ms cycling through 4 copies on a one-H200 host, 2.10 against
    2.82 ms on a two-H200 host (``data/gpu/host_read_h200.json``, ``host_read_h200x2.json``).
    """
    if cache is None:
        return COLD_COPIES_UNKNOWN
    return max(2, min(COLD_COPIES_MAX, math.ceil(COLD_SPAN * cache / max(1, nbytes))))


def _cold_set(gu: torch.Tensor, dn: torch.Tensor, dtype, cache: int | None,
              pin: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Distinct copies of an expert (gate/up, down) in ``dtype``, as many as ``cold_copies`` asks: CPU timings
    and copies cycle through them. On a GPU machine they lie in memory as the engine's host tier does
    (``host_memory``: huge pages where granted, page-locked with ``pin``)."""
    w1, w2 = gu.to(dtype), dn.to(dtype)
    k = cold_copies((w1.numel() + w2.numel()) * w1.element_size(), cache)
    if not torch.cuda.is_available():
        return [(w1, w2)] + [(w1.clone(), w2.clone()) for _ in range(k - 1)]
    return [(host_memory.copy_of(w1, pin=pin), host_memory.copy_of(w2, pin=pin)) for _ in range(k)]


def _cycle(items: list):
    """A callable returning ``items`` in turn, forever (the least recently used first)."""
    state = {"i": -1}

    def take():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return take


def _expert_weights(hidden: int, intermediate: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's random weights, seeded: gate_up [2I, D], down [D, I]."""
    gen = torch.Generator().manual_seed(0)
    std = hidden ** -0.5
    gu = (torch.randn(2 * intermediate, hidden, generator=gen) * std).to(dtype)  # [2I, D]
    dn = (torch.randn(hidden, intermediate, generator=gen) * std).to(dtype)  # [D, I]
    return gu, dn


@torch.no_grad()
def _measure(hidden, intermediate, dtype, device, threads, tokens, repeats, thread_counts, clock, devices=None):
    from . import cpu_gemv

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    gu, dn = _expert_weights(hidden, intermediate, dtype)
    warm = _warmups(hidden, intermediate)
    cache = cache_bytes()

    def cold(dt) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _cold_set(gu, dn, dt, cache)

    cpu_by_dtype: dict[str, list[float]] = {}  # torch's matmul
    kernel_ms: dict[int, float] = {}  # tokens -> ms with the CPU kernel (bf16, few tokens)
    kernel = cpu_gemv.usable()
    copies = {}
    with torch_threads(threads):
        for dt in dict.fromkeys([dtype, torch.float32, torch.bfloat16]):
            weights = cold(dt)
            copies[dtype_name(dt)] = len(weights)
            take = _cycle(weights)
            row = []
            for n in tokens:
                x = torch.full((n, hidden), 0.1, dtype=dt)  # [n, D]
                fns = {"torch": lambda x=x, take=take: expert_forward(x, *take())}
                if dt == torch.bfloat16 and kernel and cpu_gemv.offered(n):  # both, in turn
                    fns["kernel"] = lambda x=x, take=take: expert_forward(x, *take(), linear=cpu_gemv.linear)
                # two more repeats where two are compared: the kernel's use rides on their ratio
                ms = _alternating_ms(fns, repeats + 2 * (len(fns) - 1), warm, clock)
                row.append(ms["torch"])
                if "kernel" in ms:
                    kernel_ms[n] = ms["kernel"]
            cpu_by_dtype[dtype_name(dt)] = row
            del weights, take
    torch_bf16 = cpu_by_dtype.get("bfloat16")
    n_kernel = kernel_tokens(tokens, torch_bf16, kernel_ms, any_size=cpu_gemv.max_tokens() is None)
    cpu_ms_torch = tuple(torch_bf16) if kernel_ms else None
    on_cpu = list(cpu_by_dtype[dtype_name(dtype)])  # the "GPU" tier of a CPU-only engine: torch in the model dtype
    if n_kernel:
        cpu_by_dtype["bfloat16"] = [kernel_ms[n] if n <= n_kernel else t for n, t in zip(tokens, torch_bf16)]
    cpu_dtype = min(cpu_by_dtype, key=lambda k: sum(cpu_by_dtype[k]))
    linear = cpu_gemv.linear_up_to(n_kernel if cpu_dtype == "bfloat16" else 0)

    scaling = {}
    if thread_counts:
        take = _cycle(cold(DTYPES[cpu_dtype]))
        x1 = torch.ones(1, hidden, dtype=DTYPES[cpu_dtype])
        for t in thread_counts:
            with torch_threads(t):
                scaling[int(t)] = _median_ms(lambda: expert_forward(x1, *take(), linear=linear), repeats, warm,
                                             clock=clock)
        del take

    if cuda:
        sync = torch.cuda.synchronize
        g1, g2 = gu.to(dev), dn.to(dev)
        xs = {n: torch.full((n, hidden), 0.1, dtype=dtype, device=dev) for n in tokens}  # [n, D]
        gpu_ms = [_median_ms(lambda x=xs[n]: expert_forward(x, g1, g2), repeats, warm, sync=sync, clock=clock)
                  for n in tokens]
        h1, h2 = host_memory.copy_of(gu), host_memory.copy_of(dn)  # as the engine's host tier is allocated

        def copy():
            g1.copy_(h1, non_blocking=True)
            g2.copy_(h2, non_blocking=True)

        copy_ms = _median_ms(copy, repeats, warm, sync=sync, clock=clock)
        del g1, g2
        contention = _measure_contention(h1, h2, DTYPES[cpu_dtype], threads, tokens, devices or [device], repeats,
                                         warm, clock, linear, cache=cache)
        del h1, h2
    else:  # both tiers on the CPU: the "GPU" is the CPU in the model dtype, a "copy" is a memcpy
        contention = {}  # no copy engine: nothing runs beside the CPU experts
        with torch_threads(threads):
            gpu_ms = on_cpu
            s1, s2 = torch.empty_like(gu), torch.empty_like(dn)
            copy_ms = _median_ms(lambda: (s1.copy_(gu), s2.copy_(dn)), repeats, warm, clock=clock)

    host_bw = None
    if cuda:  # host memory read bandwidth with the CPU threads, shared by both paths; a buffer beyond the cache
        host_bw = _read_gbs(_read_buffer(gu.numel() * gu.element_size(), cache), threads, repeats, clock)
    return dict(cpu_by_dtype=cpu_by_dtype, cpu_dtype=cpu_dtype, gpu_ms=gpu_ms, copy_ms=copy_ms, cpu_kernel_tokens=n_kernel,
                cpu_ms_torch=cpu_ms_torch, cpu_ms_kernel=tuple(kernel_ms.get(n) for n in tokens) if kernel_ms else None,
                scaling=scaling, host_bw=host_bw, expert_bytes=(gu.numel() + dn.numel()) * gu.element_size(),
                contention=contention, cold_copies=copies)


CONTENTION_MAX_QUEUE = 64  # copies queued per link at most while one CPU expert is timed


def cpu_slowdown(cpu_ms, queue, landed, sync, warm: int, repeats: int) -> float:
    """A CPU expert's time while copies stream over its time alone: the median of each, sampled alternately.

    ``cpu_ms()``: one CPU expert, its ms; ``queue(k)``: k copies queued on
    every link -> a handle; ``landed(handle)``: whether they have all landed;
    ``sync()``: wait for every link. A contended sample counts only if the
    copies outlasted the CPU expert; otherwise it is taken again with twice
    as many queued. A small expert whose copies land as fast as they are
    queued (``CONTENTION_MAX_QUEUE`` of them) cannot be slowed by them: 1.
    Each alone sample follows an untimed ``cpu_ms()``, as each contended one
    follows the alone one: after ``sync()`` the CPU threads have slept, and
    waking them is not the contention. Copies never make a CPU expert faster:
    a ratio below 1 is the noise of a few samples (on the lent H200 hosts a
    single sample now and then takes 2-6x its neighbours,
    ``data/gpu/calibration_contention_probe_h200x2.json``; medians of three
    have read 0.33, 0.64 and 0.81), so it is read as 1, no contention, rather
    than cached as copies speeding the CPU up.
    """
    alone, during, k = [], [], 2
    while len(during) < warm + repeats:
        cpu_ms()  # untimed: wakes the CPU threads, idle while the last copies landed
        alone.append(cpu_ms())
        handle = queue(k)
        ms = cpu_ms()
        outlasted = not landed(handle)  # the copies were still streaming when it finished
        sync()
        if outlasted:
            during.append(ms)
        elif k >= CONTENTION_MAX_QUEUE:
            return 1.0
        else:
            k *= 2
    return max(1.0, statistics.median(during[warm:]) / statistics.median(alone[warm:]))


class HostPaths:
    """Both paths of missed experts reading host memory, measured on demand: CPU experts and pinned copies.

    Holds what the calibration's contention timings cycle through: distinct
    copies of an expert (``cold_copies`` of a ``cache``-byte last-level cache)
    for the CPU experts and, pinned, as the copies' sources, so every call
    reads host memory, as in a run; one destination and stream per device in
    ``devices`` (CUDA); and a buffer for a plain read by the CPU threads.
    ``both_gbs()`` is the bytes both paths read per second while
    ``BOTH_PATHS_MS`` of copies are queued on every link and one-token CPU
    experts run until they land (the calibration's ``host_paths_gbs``);
    ``read_gbs()`` a plain read (``host_bandwidth_gbs``). Taken again between
    a benchmark's rounds they show how far the host's ceiling moved since
    the calibration: on the lent H200 hosts two calibrations minutes apart read
    139.3 and 125.7 GB/s.
    """

    def __init__(self, gu: torch.Tensor, dn: torch.Tensor, cpu_dtype, threads: int, devices, linear=F.linear,
                 cache: int | None = None, clock=time.perf_counter):
        self.devs = [torch.device(d) for d in devices]
        if not self.devs or any(d.type != "cuda" for d in self.devs):
            raise ToolkitError(f"both paths need CUDA devices to copy to, not {[str(d) for d in devices]}")
        self.threads, self.linear, self.clock = int(threads), linear, clock
        self.sources = _cold_set(gu, dn, gu.dtype, cache, pin=True)  # the copies' sources, pinned
        self.dst = [(torch.empty_like(gu, device=d), torch.empty_like(dn, device=d)) for d in self.devs]
        self.streams = [torch.cuda.Stream(d) for d in self.devs]
        self.cold = _cold_set(gu, dn, cpu_dtype, cache)  # the CPU experts' weights
        self.take, self.source = _cycle(self.cold), _cycle(self.sources)
        self.copy_bytes = (gu.numel() + dn.numel()) * gu.element_size()
        self.cpu_bytes = (gu.numel() + dn.numel()) * self.cold[0][0].element_size()
        self.x1 = torch.full((1, gu.shape[1]), 0.1, dtype=cpu_dtype)  # [1, D]: the most memory-bound CPU expert
        self._read = None
        self._queued = None  # copies a link queues for ``both_gbs``, from the first ``measure``

    @classmethod
    def for_model(cls, model: CostModel, devices=None) -> HostPaths:
        """For ``model``'s expert sizes, dtypes, CPU threads and CPU matmul, over ``devices`` (default: the
        model's device and its peers)."""
        devices = devices or [model.device, *(model.peer_devices or ())]
        gu, dn = _expert_weights(model.hidden, model.intermediate, DTYPES[model.dtype])
        return cls(gu, dn, DTYPES[model.cpu_dtype], model.cpu_threads, devices, model.cpu_linear, cache=cache_bytes())

    def sync(self) -> None:
        for d in self.devs:
            torch.cuda.synchronize(d)

    def queue(self, k: int) -> list:
        """k copies of the expert on every link; -> an event after each link's last."""
        ends = []
        for (g1, g2), stream in zip(self.dst, self.streams):
            with torch.cuda.stream(stream):
                for _ in range(k):
                    h1, h2 = self.source()
                    g1.copy_(h1, non_blocking=True)
                    g2.copy_(h2, non_blocking=True)
                ends.append(torch.cuda.Event())
                ends[-1].record(stream)
        return ends

    @staticmethod
    def landed(ends) -> bool:
        return all(e.query() for e in ends)

    def cpu_expert(self, x=None) -> None:
        """One CPU expert on the next cold copy, ``x`` [n, D] (default one token)."""
        expert_forward(self.x1 if x is None else x, *self.take(), linear=self.linear)

    def copy_ms(self, busy=None) -> float:
        """ms of one copy on every link at once (the slowest link), with ``busy()`` run until they all land."""
        marks = []
        for (g1, g2), stream in zip(self.dst, self.streams):
            with torch.cuda.stream(stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                h1, h2 = self.source()
                start.record(stream)
                g1.copy_(h1, non_blocking=True)
                g2.copy_(h2, non_blocking=True)
                end.record(stream)
                marks.append((start, end))
        while busy is not None and not all(end.query() for _, end in marks):
            busy()
        self.sync()
        return max(start.elapsed_time(end) for start, end in marks)

    def both_gbs(self, k: int) -> float:
        """GB/s read by k copies on every link and the one-token CPU experts run until they land."""
        self.sync()
        t0 = self.clock()
        ends, n = self.queue(k), 0
        while not self.landed(ends):
            self.cpu_expert()
            n += 1
        self.sync()
        return (k * len(self.devs) * self.copy_bytes + n * self.cpu_bytes) / (self.clock() - t0) / 1e9

    def copies_for_both(self, copy_ms: float) -> int:
        """Copies a link queues so that both paths run together for ``BOTH_PATHS_MS``."""
        return max(2, math.ceil(BOTH_PATHS_MS / max(1e-3, copy_ms)))

    def read_gbs(self, repeats: int = 5) -> float:
        """GB/s of a plain read by the CPU threads over a buffer beyond the cache, in the memory the experts
        lie in."""
        if self._read is None:
            self._read = _read_buffer(self.cold[0][0].numel() * self.cold[0][0].element_size(), cache_bytes())
        return _read_gbs(self._read, self.threads, repeats, self.clock)

    @torch.no_grad()
    def measure(self, repeats: int = 5, warm: int = 1) -> dict:
        """The host's ceilings now: {"both_paths_gbs": median of ``repeats`` ``both_gbs`` samples after ``warm``,
        "read_gbs": a plain read, "host_gbs": the faster (what ``CostModel.host_read_gbs`` takes)}."""
        with torch_threads(self.threads):
            if self._queued is None:
                self.copy_ms()
                self._queued = self.copies_for_both(self.copy_ms())
            both = statistics.median([self.both_gbs(self._queued) for _ in range(warm + repeats)][warm:])
        read = self.read_gbs(repeats)
        return {"both_paths_gbs": both, "read_gbs": read, "host_gbs": max(both, read)}


def _read_buffer(expert_bytes: int, cache: int | None) -> torch.Tensor:
    """float32 ones over at least 64 MiB, twice ``expert_bytes`` and ``COLD_SPAN`` caches, where the experts lie (huge pages
    where granted): a plain read of it reads host memory, not the cache."""
    n = max(64 << 20, 2 * int(expert_bytes), COLD_SPAN * (cache or 0)) // 4
    return host_memory.empty((n,), torch.float32, pin=False).fill_(1.0)


def _read_gbs(buf: torch.Tensor, threads: int, repeats: int, clock) -> float:
    """GB/s of a plain read of the float32 ``buf`` by ``threads`` CPU threads (the median of ``repeats`` sums
    after one)."""
    with torch_threads(threads):
        ms = _median_ms(lambda: buf.sum(), repeats, 1, clock=clock)
    return buf.numel() * 4 / (ms * 1e-3) / 1e9


@torch.no_grad()
def _measure_contention(gu, dn, cpu_dtype, threads, tokens, devices, repeats, warm, clock, linear=F.linear,
                        cache: int | None = None) -> dict:
    """How CPU experts and pinned copies slow each other, as the engine overlaps them, and what they read together.

    Host memory feeds both the CPU experts and every link's copies, so each
    runs slower beside the other than alone (on the lent H200 host a CPU
    expert went from 7.3 to 9.0 ms during a copy; on two H200s of one host
    from 3.8 to 7.4 ms while both links copied). Per token count the CPU
    expert is timed alone and then while every device in ``devices`` has
    copies of the expert queued that outlast it (a sample whose copies ran
    out first is taken again with twice as many), alternately, so a slow
    spell of the machine hits both (a small expert whose copies land as fast
    as they are queued cannot be slowed by them: 1); and one copy on every
    link is timed with CUDA events alone and while CPU experts run until it
    lands. Last, both paths at once (``HostPaths.both_gbs``); the bytes both
    read per second (``host_paths_gbs``) can exceed a plain read by the CPU
    threads alone (126 against 95 GB/s on a lent H200 host,
    ``host_read_h200.json``).
    -> {"cpu_contention": ratios at ``tokens``, "copy_contention": ratio, "contention_links": len(devices),
        "host_paths_gbs": GB/s}
    """
    paths = HostPaths(gu, dn, cpu_dtype, threads, devices, linear, cache, clock)

    def cpu_ms(x) -> float:
        t0 = clock()
        paths.cpu_expert(x)
        return (clock() - t0) * 1e3

    ratios = []
    with torch_threads(threads):
        for n in tokens:
            x = torch.full((n, gu.shape[1]), 0.1, dtype=cpu_dtype)  # [n, D]
            ratios.append(cpu_slowdown(lambda x=x: cpu_ms(x), paths.queue, paths.landed, paths.sync, warm,
                                       repeats))
        copies_alone, copies_during = [], []
        for _ in range(warm + repeats):
            copies_alone.append(paths.copy_ms())
            copies_during.append(paths.copy_ms(paths.cpu_expert))
        k = paths.copies_for_both(statistics.median(copies_alone))
        both = [paths.both_gbs(k) for _ in range(warm + repeats)][warm:]
    return {"cpu_contention": tuple(ratios),
            "copy_contention": max(1.0, statistics.median(copies_during[warm:])  # never faster beside CPU experts
                                   / statistics.median(copies_alone[warm:])),
            "contention_links": len(paths.devs), "host_paths_gbs": statistics.median(both)}


def with_peer_hops(model: CostModel, devices, *, repeats: int = 5, path: str | os.PathLike | None = None,
                   reuse: bool = True, save: bool = True, clock=time.perf_counter) -> CostModel:
    """``model`` with the peer hop to ``devices`` measured: a session that gains GPUs keeps its calibration.

    ``calibrate(..., devices=...)`` measures everything; a cost model measured
    for one device (``MoESession.with_settings(gpus=2)`` reuses its session's)
    lacks the hop of a spread expert's token rows, so the engine would plan a
    layer as if the second GPU's experts were free to reach. This measures only
    the hop and, on GPUs, how CPU experts contend with copies over every link
    (the cache entry of the full calibration with these devices is used where
    it exists) and returns the model under that entry's key.
    ``devices``: as ``calibrate`` takes them, the model's device first.
    """
    devices = calibration_devices(model.device, devices)
    if not devices or tuple(model.peer_devices or ()) == tuple(devices[1:]):
        return model
    dtype = DTYPES[model.dtype]
    key = calibration_key(model.hidden, model.intermediate, dtype, model.device, model.cpu_threads, devices)
    file = Path(path) if path is not None else cache_path()
    cached = _cached(file, key) if reuse else None
    if cached is not None:
        return cached
    tokens = tuple(sorted(model.gpu_tokens))
    warm = _warmups(model.hidden, model.intermediate)
    ms = _measure_peer(model.hidden, dtype, devices, tokens, repeats, warm, clock)
    contention = {}
    if str(devices[0]).startswith("cuda"):  # the CPU experts now compete with every device's link
        gu, dn = _expert_weights(model.hidden, model.intermediate, dtype)
        cpu_dtype = DTYPES[model.cpu_dtype]
        contention = _measure_contention(gu, dn, cpu_dtype, model.cpu_threads, model.cpu_tokens, devices, repeats,
                                         warm, clock, model.cpu_linear, cache=cache_bytes())
    out = replace(model, peer_tokens=tokens, peer_devices=tuple(devices[1:]),
                  peer_ms=tuple(tuple(row) for row in ms), key=key, **contention)
    if save:
        save_cost_model(out, file)
    return out


@torch.no_grad()
def _measure_peer(hidden, dtype, devices, tokens, repeats, warm, clock) -> list[list[float]]:
    """Round-trip ms [devices - 1][tokens] of a spread expert's hop, as the engine makes it.

    n rows x [n, D] and their routing weights w [n] go from the first device
    to device d and the results [n, D] come back, without waiting in between;
    the clock stops once both devices are idle. Two CPU tiers: ``.to`` is free.
    """
    first = torch.device(devices[0])
    out = []
    for name in devices[1:]:
        dev = torch.device(name)
        sync = _sync_both(first, dev) if dev.type == "cuda" else None
        row = []
        for n in tokens:
            x = torch.full((n, hidden), 0.1, dtype=dtype, device=first)  # [n, D]
            w = torch.full((n,), 0.5, dtype=dtype, device=first)  # [n]

            def hop(x=x, w=w, dev=dev):
                w.to(dev, non_blocking=True)
                return x.to(dev, non_blocking=True).to(first, non_blocking=True)  # [n, D] there and back

            row.append(_median_ms(hop, repeats, warm, sync=sync, clock=clock))
        out.append(row)
    return out


def _sync_both(a: torch.device, b: torch.device):
    """A synchronizer for a peer hop: a copy between two GPUs is done when both are idle."""
    def sync():
        torch.cuda.synchronize(a)
        torch.cuda.synchronize(b)
    return sync


def calibrate(hidden: int = 4096, intermediate: int = 14336, dtype: torch.dtype | str = torch.bfloat16,
              device: str = "cuda", threads: int | None = None, tokens: tuple[int, ...] = (1, 8, 32, 128),
              repeats: int = 5, thread_counts: tuple[int, ...] | None = None, path: str | os.PathLike | None = None,
              reuse: bool = True, save: bool = True, clock=time.perf_counter, preset: str | None = None,
              devices=None) -> CostModel:
    """Measure (or reuse) the cost model of one expert of these dimensions on this machine.

    ``preset`` (a name from ``toolkit.moe.presets``) overrides hidden,
    intermediate and dtype. The result is saved to ``path`` (default: the
    per-machine cache) and reused next time unless ``reuse=False``.
    ``thread_counts`` also measures CPU thread scaling. ``devices`` (several
    devices of this host, ``device`` first, as ``offload(..., devices=...)``
    takes them): also the peer hop of ``tokens`` rows to each other device and
    back (``CostModel.peer_ms``), kept under its own cache key.
    """
    if preset is not None:
        from .presets import from_name

        p = from_name(preset)
        hidden, intermediate, dtype = p.hidden, p.intermediate, p.dtype
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype_name(dtype) not in DTYPES:
        raise ToolkitError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
    from ..env import resolve_device

    device = resolve_device(device)
    devices = calibration_devices(device, devices)
    threads = choose_threads(threads)
    key = calibration_key(hidden, intermediate, dtype, device, threads, devices)
    file = Path(path) if path is not None else cache_path()
    cached = _cached(file, key) if reuse else None
    if cached is not None:
        return cached

    m = _measure(hidden, intermediate, dtype, device, threads, tuple(sorted(tokens)), repeats, thread_counts, clock,
                 devices)
    peer = {}
    if devices:
        peer = dict(peer_tokens=tuple(sorted(tokens)), peer_devices=tuple(devices[1:]), peer_ms=tuple(
            tuple(row) for row in _measure_peer(hidden, dtype, devices, tuple(sorted(tokens)), repeats,
                                                _warmups(hidden, intermediate), clock)))
    from ..env import environment

    model = CostModel(
        cpu_tokens=tuple(sorted(tokens)), cpu_ms=tuple(m["cpu_by_dtype"][m["cpu_dtype"]]),
        gpu_tokens=tuple(sorted(tokens)), gpu_ms=tuple(m["gpu_ms"]), copy_ms=float(m["copy_ms"]),
        cpu_dtype=m["cpu_dtype"], dtype=dtype_name(dtype), hidden=hidden, intermediate=intermediate,
        expert_bytes=int(m["expert_bytes"]), device=device, cpu_threads=threads, host_bandwidth_gbs=m["host_bw"],
        cpu_ms_by_dtype=m["cpu_by_dtype"], thread_scaling=m["scaling"], key=key, **peer, **m["contention"],
        cpu_kernel_tokens=m["cpu_kernel_tokens"], cpu_ms_kernel=m["cpu_ms_kernel"],
        cpu_ms_torch=m["cpu_ms_torch"],
        meta={"repeats": repeats, "env": environment(device, threads), "cold_copies": m["cold_copies"]},
    )
    if save:
        save_cost_model(model, file)
    return model
