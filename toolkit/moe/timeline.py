"""Where an offloaded step's host time goes, layer by layer.

A GPU profile shows kernels and copies; what holds an offloaded decode step
is mostly on the host: each layer waits for its routing (one sync), plans,
runs its CPU experts, and hands the results back before the next layer can
start. The engine marks those moments when ``Offloaded.timeline`` is a
``HostTimeline`` (None, the default, costs one attribute test per mark), and
``segments`` turns the marks into per-layer spans (ms):

- ``dense``: the previous layer's end (or the step's start) -> the layer's
  experts entered: the dense part (attention, norms; replayed from CUDA
  graphs in decode) and the router, as launched from the host;
- ``routing``: -> the routing on the host: the layer's one sync, which waits
  for everything queued before it on the GPU (copies of the layer before
  still landing included);
- ``before_cpu``: -> the CPU experts start: placement, the plan, handing the
  job over (inline: the launches of the GPU's share of the layer too);
- ``cpu``: the CPU experts;
- ``after_cpu``: -> the layer's experts leave: results back and added in
  (layers without CPU work: from the routing, or from entering);
- per step, ``tail``: the last layer's end -> the step's end (final norm,
  LM head, and the caller's sync).

Marks are ``time.perf_counter`` by default (a clock can be injected); the
CPU experts' marks come from the worker thread in the overlapped schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SEGMENTS = ("dense", "routing", "before_cpu", "cpu", "after_cpu")


@dataclass
class HostTimeline:
    """Marks (what, layer, seconds) in the order they happened; ``step_start``/``step_end`` bracket steps."""

    clock: Callable[[], float] = time.perf_counter
    events: list[tuple[str, int, float]] = field(default_factory=list)

    def mark(self, what: str, layer: int = -1) -> None:
        self.events.append((what, layer, self.clock()))


def segments(events) -> tuple[list[dict], list[float], list[float]]:
    """Marks -> (one row per step and layer: step, layer and each of ``SEGMENTS`` in ms; each step's tail ms;
    each step's ms).

    Only whole steps count (a ``step_start`` then a ``step_end``); marks outside them are ignored. A layer's
    spans sum to the time from the previous layer's end to its own, so a step's rows plus its tail sum to the
    step.
    """
    rows, tails, steps = [], [], []
    current: list[dict] | None = None
    start = last = None
    layer: dict | None = None
    for what, lay, t in sorted(events, key=lambda e: e[2]):
        if what == "step_start":
            current, start, last, layer = [], t, t, None
        elif current is None:
            continue
        elif what == "enter":
            layer = {"layer": lay, "enter": t, "dense": (t - last) * 1e3}
        elif layer is None or lay != layer["layer"]:
            if what == "step_end":
                rows.extend({"step": len(steps), **r} for r in current)
                tails.append((t - last) * 1e3)
                steps.append((t - start) * 1e3)
                current = None
            continue
        elif what in ("routed", "cpu_start", "cpu_end"):
            layer[what] = t
        elif what == "exit":
            routed = layer.get("routed", layer["enter"])
            cpu0, cpu1 = layer.get("cpu_start"), layer.get("cpu_end")
            row = {"layer": lay, "dense": layer["dense"], "routing": (routed - layer["enter"]) * 1e3}
            if cpu0 is not None and cpu1 is not None:
                row.update(before_cpu=(cpu0 - routed) * 1e3, cpu=(cpu1 - cpu0) * 1e3, after_cpu=(t - cpu1) * 1e3)
            else:
                row.update(before_cpu=0.0, cpu=0.0, after_cpu=(t - routed) * 1e3)
            current.append(row)
            last, layer = t, None
    return rows, tails, steps


def summary(events) -> dict:
    """Per step: the median step (ms), each segment's mean total per step and median per layer, the tail's
    median, and how many layers and steps were seen."""
    rows, tails, steps = segments(events)
    if not steps:
        return {"steps": 0}
    n = len(steps)
    out = {"steps": n, "layers_per_step": len(rows) / n, "step_ms": float(np.median(steps)),
           "tail_ms": float(np.median(tails)), "per_step_ms": {}, "per_layer_median_ms": {}}
    for s in SEGMENTS:
        values = [r[s] for r in rows]
        out["per_step_ms"][s] = sum(values) / n
        out["per_layer_median_ms"][s] = float(np.median(values)) if values else 0.0
    out["per_step_ms"]["tail"] = sum(tails) / n
    return out
