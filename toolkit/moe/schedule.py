"""How our engine schedules its CPU experts, chosen by measuring the candidates on the machine.

A schedule is the switches of ``Offloaded.set_schedule``: ``overlap`` (CPU
experts in a worker thread, concurrently with the GPU's work and the copy
engine, or inline on the calling thread after the GPU's work is queued),
``split`` (whether the makespan decision may split one expert per layer
between a pinned copy and the CPU) and, with the worker thread, ``spare``
cores (its CPU experts run on one thread fewer than calibrated, leaving a
core to the host thread, whose work between layers runs beside them).

Why measure instead of model: on an H200 host (16-core Xeon) CPU experts alone
read ~60 GB/s and pinned copies alone ~55 GB/s, but together they share ~94
GB/s of host memory bandwidth, so overlapping them bought less than the worker
thread cost and decode ran 15% slower with the thread than inline. Which
schedule wins depends on the host's memory system, core count and the budget,
so ``MoESession.run`` measures the candidates on the real model during its
warm-up, the same way the cost model measures CPU against copy time:

- each candidate gets warm-up generations of the measured length, the
  candidates alternating round by round (a slow spell of the machine hits all
  alike), until every candidate's median decode step is steady (as
  ``MoESession.warm_up`` decides) or the rounds run out;
- a candidate's figure is the median of its rounds after the first (the first
  is cold: new KV-cache lengths, thread pools);
- a candidate more than ``SCHEDULE_DROP`` (10%) slower than the fastest, once
  each has two rounds after the cold one, stops being measured: the noise of
  one generation on a busy host is a few percent, so it cannot win, and its
  generations are a fifth of a user's wait before the measured run;
- the fastest wins; one within ``SCHEDULE_TIE`` (3%) of the default keeps the
  default (a difference that small is noise, and the default is the one the
  docs describe).

The spared core (``overlap-spare``, ``overlap-nosplit-spare``) can be set
and timed (``moe --schedule overlap-spare``, ``benchmarks/decode_timeline.py``)
but is not a candidate of "auto": on three H200 hosts it beat the best other
schedule once, by 2% (``data/gpu/cpu_threads_probe_h200.json``), and lost to
it on the other two (inline 4-6% faster under the uniform routing, level under
the trace; ``decode_timeline_h200_spare.json``,
``decode_timeline_h200x2_spare.json``), so racing it would lengthen every
run's warm-up for a schedule that rarely wins.

Only scheme "ours" takes part: the peer baselines reproduce other systems, whose
schedule is part of what they are. On a CPU device there is no copy engine to
overlap with and both tiers are host memory: "auto" keeps the engine's CPU
default (inline) without measuring, and says so in the record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ToolkitError

# name -> (overlap, split, spare cores), the arguments of ``Offloaded.set_schedule``
SCHEDULES = {"overlap": (True, True, 0), "inline": (False, True, 0),
             "overlap-nosplit": (True, False, 0), "inline-nosplit": (False, False, 0),
             "overlap-spare": (True, True, 1), "overlap-nosplit-spare": (True, False, 1)}
AUTO_CANDIDATES = ("overlap", "inline", "overlap-nosplit", "inline-nosplit")  # what "auto" measures
SCHEDULE_CHOICES = ("auto", *SCHEDULES)  # what ``MoESettings.schedule`` accepts
SCHEDULED_SCHEMES = ("ours",)  # schemes whose schedule is ours to choose
SCHEDULE_TIE = 0.03  # a candidate must beat the default by more than this fraction to replace it
SCHEDULE_DROP = 0.10  # a candidate this much slower than the fastest (two warm rounds each) stops being measured


def schedule_name(options) -> str:
    """The schedule an engine runs (``Offloaded.options``, an ``EngineOptions``): a ``SCHEDULES`` name, or "serial"."""
    if options.serial:
        return "serial"
    spare = "-spare" if options.overlaps and options.spare_cores else ""
    return ("overlap" if options.overlaps else "inline") + ("" if options.splits else "-nosplit") + spare


def check_schedule(schedule: str, scheme: str | None = None) -> str:
    """``schedule`` if it is "auto" or a ``SCHEDULES`` name that ``scheme`` lets us set; else one ToolkitError."""
    if schedule not in SCHEDULE_CHOICES:
        raise ToolkitError(f"schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {schedule!r}")
    if schedule != "auto" and scheme is not None and scheme not in SCHEDULED_SCHEMES:
        raise ToolkitError(f"schedule {schedule!r} applies to scheme {' or '.join(SCHEDULED_SCHEMES)}; scheme "
                           f"{scheme!r} keeps its own schedule (use schedule 'auto')")
    return schedule


def schedule_candidates(scheme: str, options, device_type: str, all_resident: bool) -> tuple[tuple[str, ...], str | None]:
    """(candidates to measure, default first; or (), and why nothing is measured) for one engine.

    ``options``: the engine's ``EngineOptions`` as offloaded (its schedule is the default).
    ``all_resident``: every expert is on the GPU, so nothing ever runs on the CPU.
    """
    if scheme not in SCHEDULED_SCHEMES:
        return (), f"fixed by scheme {scheme}"
    if device_type != "cuda":
        return (), f"not measured: a {device_type} device has no copy engine to overlap with; the engine's default"
    if all_resident:
        return (), "not measured: every expert is resident, nothing runs on the CPU"
    default = schedule_name(options)
    splits = [True, False] if options.decision == "makespan" and options.split else [options.split]
    names = [n for n in AUTO_CANDIDATES if SCHEDULES[n][1] in splits]
    return (default, *[n for n in names if n != default]), None


def pick_fastest(figures: dict[str, float], default: str, tie: float = SCHEDULE_TIE) -> str:
    """The candidate with the least ms per step; the default unless another is more than ``tie`` faster."""
    finite = {k: v for k, v in figures.items() if v is not None and math.isfinite(v)}
    if not finite:
        return default
    best = min(finite, key=finite.get)
    if default in finite and finite[default] <= (1 + tie) * finite[best]:
        return default
    return best


def candidate_figure(medians: Sequence[float]) -> float:
    """A candidate's ms per decode step from its rounds: the median of those after the first (cold) one."""
    kept = list(medians[1:]) or list(medians)
    return float(np.median(kept)) if kept else math.nan


def is_steady(medians: Sequence[float], within: float) -> bool:
    """The last two median decode steps agree within ``within`` of the earlier one."""
    return len(medians) >= 2 and abs(medians[-1] - medians[-2]) <= within * medians[-2]


@dataclass(frozen=True)
class ScheduleChoice:
    """What schedule a run used and why: picked, the default, and each measured candidate's ms per step.

    candidates: name -> median decode step (ms) compared (empty when nothing was
    measured); rounds: name -> median decode step of each of its warm-up
    generations, in order; dropped: name -> the round after which it stopped
    being measured (``SCHEDULE_DROP`` slower than the fastest); reason: why
    nothing was measured, or how it was set.
    """

    picked: str
    default: str
    candidates: dict = field(default_factory=dict)
    rounds: dict = field(default_factory=dict)
    measured: bool = False
    reason: str | None = None
    tie: float = SCHEDULE_TIE
    dropped: dict = field(default_factory=dict)

    @classmethod
    def fixed(cls, name: str, reason: str) -> ScheduleChoice:
        """A schedule that was not measured (set, a peer scheme's own, or nothing to choose)."""
        return cls(picked=name, default=name, reason=reason)

    def to_dict(self) -> dict:
        return {"picked": self.picked, "default": self.default, "candidates": dict(self.candidates),
                "rounds": {k: list(v) for k, v in self.rounds.items()}, "measured": self.measured,
                "reason": self.reason, "tie": self.tie, "dropped": dict(self.dropped)}


def choose_schedule(candidates: Sequence[str], measure: Callable[[str], float], *, rounds: int,
                    steady_within: float, tie: float = SCHEDULE_TIE, drop: float = SCHEDULE_DROP) -> ScheduleChoice:
    """Measure the candidates alternately until each is steady (at most ``rounds`` each); keep the fastest.

    ``candidates``: schedule names, the default first. ``measure(name)``: switch
    to that schedule, run one warm-up generation, return its median decode step
    in ms (``MoESession.choose_schedule`` gives the real one; tests a fake).
    Every round measures every candidate still in the race, so none is compared
    on a different spell of the machine than the others; from the third round
    on, one more than ``drop`` slower than the fastest leaves the race (its
    rounds and figure stay in the record).
    """
    if not candidates:
        raise ToolkitError("choose_schedule needs at least one candidate schedule")
    unknown = [c for c in candidates if c not in SCHEDULES]
    if unknown:
        raise ToolkitError(f"unknown schedules {unknown}; choose among {', '.join(SCHEDULES)}")
    medians: dict[str, list[float]] = {c: [] for c in candidates}
    racing, dropped = list(candidates), {}
    for r in range(max(1, int(rounds))):
        for c in racing:
            medians[c].append(float(measure(c)))
        if r >= 2 and len(racing) > 1:  # two warm rounds each: a clearly slower one cannot catch up
            figs = {c: candidate_figure(medians[c]) for c in racing}
            best = min((v for v in figs.values() if math.isfinite(v)), default=math.nan)
            for c in [c for c in racing if math.isfinite(best) and not figs[c] <= (1 + drop) * best]:
                racing.remove(c)
                dropped[c] = r + 1
        if all(is_steady(medians[c], steady_within) for c in racing):
            break
    figures = {c: candidate_figure(m) for c, m in medians.items()}
    default = candidates[0]
    return ScheduleChoice(picked=pick_fastest(figures, default, tie), default=default, candidates=figures,
                          rounds=medians, measured=True, tie=tie, dropped=dropped)


def schedule_line(schedule: dict | None) -> str | None:
    """'inline (measured: inline 61.2 ms/step, overlap 70.4 ms/step)' from a run record's ``schedule``."""
    if not schedule:
        return None
    cands = schedule.get("candidates") or {}
    if schedule.get("measured") and cands:
        ms = {k: v if v is not None and math.isfinite(v) else math.inf for k, v in cands.items()}
        parts = ", ".join(f"{k} {ms[k]:.1f} ms/step" for k in sorted(ms, key=ms.get))
        return f"{schedule['picked']} (measured: {parts})"
    return f"{schedule['picked']} ({schedule.get('reason') or 'not measured'})"
