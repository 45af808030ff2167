"""Recorded GPU results: the files in ``data/gpu/`` read back as frames, with where and when they were measured.

``benchmarks/run_gpu.sh`` writes one JSON file per benchmark on the GPU
machine; the notebooks, the report's summary and the paper figures read them
here, so a laptop can show what the GPU measured.

One rule for what is missing: every reader takes the parsed file (or None,
when there is no file) and returns an *empty* value of its type (a frame with
no rows, ``{}``, ``[]``) when the file holds no data for it, never None; a
single value that was not recorded is None in the frame ("n/a" once
formatted, ``toolkit.formatting``). A run the benchmark skipped or that failed
is left out.

Shapes of the returned frames are given in each reader's docstring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import ToolkitError
from .results import load_json
from .settings import data_dir


@dataclass(frozen=True)
class Recording:
    """One recorded result file: its parsed content, or why there is none.

    ``source`` is the path under ``data/`` ("gpu/timer_agreement.json");
    ``problem`` says why ``doc`` is None (absent or unreadable file).
    """

    source: str
    doc: dict | None
    problem: str | None = None

    @property
    def name(self) -> str:
        return Path(self.source).name.split(".")[0]

    @property
    def label(self) -> str | None:
        """'recorded on <GPU>, <date>', or None without a file."""
        return None if self.doc is None else recorded_label(self.doc)


def recording(source: str, data: str | os.PathLike | None = None) -> Recording:
    """Read ``data/<source>`` (``data`` defaults to ``data_dir()``); a bare name means ``gpu/<name>.json``."""
    if "/" not in source and not source.endswith(".json"):
        source = f"gpu/{source}.json"
    path = Path(data if data is not None else data_dir()) / source
    if not path.exists():
        return Recording(source, None, f"data/{source} is not present")
    try:
        doc = load_json(path)
    except ToolkitError as e:
        return Recording(source, None, str(e))
    if not isinstance(doc, dict):
        return Recording(source, None, f"data/{source} does not hold a JSON object")
    return Recording(source, doc)


def recorded_results(folder: str | os.PathLike | None = None) -> dict[str, dict]:
    """The recorded results in ``data/gpu/*.json`` (name -> parsed JSON), skipping unreadable files."""
    folder = Path(folder) if folder is not None else data_dir() / "gpu"
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = load_json(path)
        except ToolkitError:
            continue
        if isinstance(doc, dict):
            out[path.stem] = doc
    return out


# ---------------------------------------------------------------- provenance


def recorded_env(doc: dict | None) -> dict:
    """The environment a result was recorded in (its ``provenance``; ``{}`` if it has none)."""
    env = (doc or {}).get("provenance")
    return env if isinstance(env, dict) else {}


def recorded_device(doc: dict | None) -> str | None:
    """The GPU a result was recorded on (the CPU model for a CPU run), or None."""
    env = recorded_env(doc)
    return env.get("gpu") or env.get("cpu_model")


def recorded_date(doc: dict | None) -> str | None:
    """The date (YYYY-MM-DD) a result was recorded on, or None."""
    stamp = recorded_env(doc).get("timestamp")
    return str(stamp)[:10] if stamp else None


def recorded_complete(doc: dict | None) -> bool:
    """False while the benchmark was still running when the file was written (``complete`` or ``status``)."""
    doc = doc or {}
    return not (doc.get("complete") is False or doc.get("status") == "running")


def recorded_label(doc: dict | None) -> str:
    """'recorded on <GPU or CPU>, <date>' for a recorded result."""
    return f"recorded on {recorded_device(doc) or 'unknown device'}, {recorded_date(doc) or 'unknown date'}"


# ---------------------------------------------------------------- timer_agreement.json


PITFALL_COLUMNS = ["pitfall", "naive_ms", "correct_ms", "relative_error", "note"]


def recorded_pitfalls(doc: dict | None) -> pd.DataFrame:
    """The pitfall audit as ``pitfalls.audit`` returns it: one row per mistake, the correct timer in attrs."""
    from .timing import LatencyResult

    a = (doc or {}).get("pitfall_audit") or {}
    frame = pd.DataFrame(a.get("rows") or [], columns=None if a.get("rows") else PITFALL_COLUMNS)
    frame.attrs["correct"] = LatencyResult.from_dict(a["correct"]) if a.get("correct") else None
    frame.attrs["model"] = a.get("model")
    return frame


def recorded_latency(doc: dict | None) -> dict[str, list[float]]:
    """The correct timer's samples and its warm-up calls (label -> ms), the series that have any."""
    correct = recorded_pitfalls(doc).attrs["correct"]
    if correct is None:
        return {}
    out = {"steady state (measured)": list(correct.samples_ms), "warm-up calls": list(correct.warmup_ms)}
    return {k: v for k, v in out.items() if v}


TIMER_LABELS = {"measure_latency": "measure_latency", "torch_timer": "torch Timer",
                "measure_latency_l2_flush": "measure_latency, cold L2", "do_bench": "triton do_bench (cold L2)",
                "measure_latency_cuda_graph": "measure_latency, CUDA graph"}


def recorded_timer_agreement(doc: dict | None) -> pd.DataFrame:
    """(workload, timer, median_ms): one row per workload and timer that has a median."""
    rows = []
    for workload, rec in ((doc or {}).get("workloads") or {}).items():
        for key, name in TIMER_LABELS.items():
            med = (rec.get(key) or {}).get("median_ms")
            if med is not None:
                rows.append({"workload": workload, "timer": name, "median_ms": med})
    return pd.DataFrame(rows, columns=["workload", "timer", "median_ms"])


# ---------------------------------------------------------------- batch_search.json


def recorded_throughput_curves(doc: dict | None) -> list[tuple[str, pd.DataFrame, int | None, int | None]]:
    """[(label, curve, largest, optimal)] for every configuration that has a curve (failed ones left out)."""
    out = []
    for rec in (doc or {}).get("configs") or []:
        if rec.get("curve"):
            label = " ".join(str(x) for x in (rec.get("model"), rec.get("dtype")) if x) or "model"
            out.append((label, pd.DataFrame(rec["curve"]), rec.get("max_batch_size"),
                        (rec.get("optimal") or {}).get("optimal_batch_size")))
    return out


# ---------------------------------------------------------------- moe_engine.json

SWEEP_COLUMNS = ["gpu_experts", "decode_tokens_per_s", "prefill_ms", "decode_ms", "hit_rate"]


def recorded_moe_sweep(doc: dict | None, mode: str = "greedy") -> pd.DataFrame:
    """One row per GPU-expert budget (``SWEEP_COLUMNS``); ``attrs["total_experts"]``."""
    rows = []
    for r in (doc or {}).get("runs") or []:
        g = r.get(mode)
        if g:
            rows.append({"gpu_experts": r["gpu_experts"], "decode_tokens_per_s": g.get("decode_tokens_per_s"),
                         "prefill_ms": g.get("prefill_ms"), "decode_ms": (g.get("decode_ms") or {}).get("median"),
                         "hit_rate": (g.get("hit_rate") or {}).get("decode")})
    frame = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    frame.attrs["total_experts"] = ((doc or {}).get("settings") or {}).get("total_experts")
    return frame


def recorded_decode_samples(doc: dict | None, n: int = 3, mode: str = "greedy") -> dict[str, list[float]]:
    """Per-token decode latencies of up to ``n`` budgets (fewest, middle, most GPU experts)."""
    runs = sorted((r for r in (doc or {}).get("runs") or [] if r.get(mode)), key=lambda r: r["gpu_experts"])
    if not runs:
        return {}
    pick = sorted({0, len(runs) // 2, len(runs) - 1})[:n]
    total = ((doc or {}).get("settings") or {}).get("total_experts")
    return {f"{runs[i]['gpu_experts']}{'/' + str(total) if total else ''} GPU experts":
            runs[i][mode]["decode_ms"]["samples"] for i in pick}


# ---------------------------------------------------------------- profile_cases.json


def recorded_timeline(doc: dict | None, case: str = "moe_decode") -> pd.DataFrame:
    """The Gantt rows of a profiled case (``profiling.timeline``'s columns); the MoE decode step by default."""
    from .profiling import TIMELINE_COLUMNS, Event, timeline

    rec = ((doc or {}).get("cases") or {}).get(case) or {}
    if not rec.get("events"):
        return pd.DataFrame(columns=TIMELINE_COLUMNS)
    return timeline([Event(*e) for e in rec["events"]])


# ---------------------------------------------------------------- moe_decode.json


def recorded_moe_schemes(doc: dict | None, kind: str = "compare") -> pd.DataFrame:
    """Decode tokens/s of every offload scheme at the comparison budget, with its roofline bound."""
    rows = []
    for r in (doc or {}).get("runs") or []:
        d = r.get("decode")
        if r.get("kind") != kind or not d:
            continue
        bound_ms = (d.get("bound") or {}).get("ms")
        rows.append({"routing": r.get("routing"), "scheme": r.get("scheme"), "budget": r.get("budget"),
                     "tokens_per_s": d.get("tokens_per_s"), "hit_rate": d.get("hit_rate"),
                     "bound_tokens_per_s": 1e3 / bound_ms if bound_ms else None})
    return pd.DataFrame(rows, columns=["routing", "scheme", "budget", "tokens_per_s", "hit_rate",
                                       "bound_tokens_per_s"])


def recorded_moe_decode_sweep(doc: dict | None, routing: str = "trace") -> pd.DataFrame:
    """Our engine's budget sweep (one routing) in ``SWEEP_COLUMNS``, sorted by budget; ``attrs["total_experts"]``."""
    rows = []
    for r in (doc or {}).get("runs") or []:
        d = r.get("decode")
        if r.get("kind") == "sweep" and r.get("routing") == routing and d:
            rows.append({"gpu_experts": r["budget"], "decode_tokens_per_s": d.get("tokens_per_s"),
                         "prefill_ms": (r.get("prefill") or {}).get("ms"), "decode_ms": d.get("median_ms"),
                         "hit_rate": d.get("hit_rate")})
    frame = pd.DataFrame(rows, columns=SWEEP_COLUMNS).sort_values("gpu_experts").reset_index(drop=True)
    frame.attrs["total_experts"] = ((doc or {}).get("settings") or {}).get("total_experts")
    return frame


__all__ = ["Recording", "recording", "recorded_results", "recorded_env", "recorded_device", "recorded_date",
           "recorded_complete", "recorded_label", "recorded_pitfalls", "recorded_latency", "TIMER_LABELS",
           "recorded_timer_agreement", "recorded_throughput_curves", "recorded_moe_sweep",
           "recorded_decode_samples", "recorded_timeline", "recorded_moe_schemes", "recorded_moe_decode_sweep",
           "SWEEP_COLUMNS", "PITFALL_COLUMNS"]
