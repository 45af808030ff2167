"""Recorded GPU results: the files in ``data/gpu/`` read back as frames, with where and when they were measured.

``benchmarks/run_gpu.sh`` writes one JSON file per benchmark on the GPU
machine; the notebooks, the report's summary and the paper figures read them
here, so a laptop can show what the GPU measured.

One rule for what is missing: every reader takes the parsed file (or None,
when there is no file) and returns an *empty* value of its type (a frame with
no rows, ``{}``, ``[]``) when the file holds no data for it, never None; a
single value that was not recorded is None in the frame ("n/a" once
formatted, ``toolkit.formatting``). A run the benchmark skipped or that failed
is left out, and so is an anomalous one (``flag_anomalies``): figures never
draw it, they say it was excluded and why.

``recorded_results`` lists result files only: the cost-model calibration
caches the MoE benchmarks keep next to them (``*_costs.json``) are skipped.

Shapes of the returned frames are given in each reader's docstring.
"""

from __future__ import annotations

import math
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


def is_calibration_cache(doc) -> bool:
    """True for a cost-model calibration cache (``toolkit.moe.costs``: ``{"version", "models"}``), not a result.

    A benchmark keeps its calibration there so a rerun on the same machine skips
    it; the measurements it used are already in the benchmark's own result
    (``cost_model``, with their environment), and one cache may hold several
    machines' models, so it has no single device or date to list.
    """
    return isinstance(doc, dict) and isinstance(doc.get("models"), dict) and set(doc) <= {"version", "models"}


def recorded_results(folder: str | os.PathLike | None = None) -> dict[str, dict]:
    """The recorded results in ``data/gpu/*.json`` (name -> parsed JSON), skipping unreadable files and caches."""
    folder = Path(folder) if folder is not None else data_dir() / "gpu"
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = load_json(path)
        except ToolkitError:
            continue
        if isinstance(doc, dict) and not is_calibration_cache(doc):
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
    return f"recorded on {recorded_where(doc)}"


def recorded_where(doc: dict | None) -> str:
    """'<GPU or CPU>, <date>': what a recorded figure's title names as its device."""
    return f"{recorded_device(doc) or 'unknown device'}, {recorded_date(doc) or 'unknown date'}"


# ---------------------------------------------------------------- anomalous runs

ANOMALY_RATIO = 1 / 3  # a run below this share of a run with fewer or as many GPU experts is not believable


def flag_anomalies(frame: pd.DataFrame, value: str, ratio: float = ANOMALY_RATIO, unit: str = "") -> pd.DataFrame:
    """``frame`` with ``anomalous`` (bool) and ``anomaly_reason`` filled in: the runs a figure must not draw.

    ``frame``: one row per run, columns ``scheme``, ``routing``, ``budget`` (GPU
    experts), ``value``, optional ``anomalous``/``anomaly_reason`` as the
    benchmark wrote them (its rounds disagreed). A file older than that flag
    is checked here: more GPU experts never make a scheme slower, so a run
    below ``ratio`` of the same scheme with fewer or as many GPU experts (any
    routing: with every expert resident the routing no longer matters much)
    is anomalous too. ``unit`` names the value's unit in the reason.
    """
    from fractions import Fraction

    share = str(Fraction(ratio).limit_denominator(10))
    df = frame.copy().reset_index(drop=True)
    flagged = df["anomalous"].fillna(False).astype(bool) if "anomalous" in df.columns else pd.Series(False, df.index)
    reasons = (df["anomaly_reason"] if "anomaly_reason" in df.columns else pd.Series(None, df.index, dtype=object))
    reasons = reasons.astype(object).where(flagged, None)
    reasons = [f"its rounds disagree ({r})" if f and r else "its rounds disagree" if f else None
               for f, r in zip(flagged, reasons)]
    vals = pd.to_numeric(df[value], errors="coerce")
    for i in df.index:
        if flagged[i] or not vals[i] > 0:
            continue
        peers = df[(df["scheme"] == df.at[i, "scheme"]) & (df["budget"] <= df.at[i, "budget"]) & (df.index != i)
                   & ~flagged]
        if not len(peers):
            continue
        j = vals[peers.index].idxmax()
        if vals[i] < ratio * vals[j]:
            flagged[i] = True
            where = f"{df.at[j, 'routing']} routing and " if df.at[j, "routing"] else ""
            reasons[i] = (f"{vals[i]:.3g}{' ' + unit if unit else ''}, under {share} of the same scheme with "
                          f"{where}{df.at[j, 'budget']} GPU experts ({vals[j]:.3g})")
    df["anomalous"], df["anomaly_reason"] = flagged.astype(bool), reasons
    return df


def run_name(scheme: str | None, routing: str | None, budget) -> str:
    """'<scheme>, <routing> routing, <budget> GPU experts': how an excluded run is named in a figure's note."""
    return ", ".join(x for x in (scheme, f"{routing} routing" if routing else None,
                                 f"{budget} GPU experts" if budget is not None else None) if x)


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


def workload_label(key: str, description: str | None = None) -> str:
    """'efficientnet-b0, batch 1, fp32' from a workload key ('efficientnet-b0@1') and its description's dtype."""
    import re

    label = key.replace("@", ", batch ")
    dtype = re.search(r"\b(fp32|fp16|bf16|float32|float16|bfloat16)\b", description or "")
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    if dtype:
        d = short.get(dtype.group(1), dtype.group(1))
        if d not in key:
            label += f", {d}"
    return label


def recorded_timer_differences(doc: dict | None) -> pd.DataFrame:
    """(workload, label, difference, low, high, rounds): measure_latency with an L2 flush against triton's do_bench.

    ``difference`` = measure_latency / do_bench - 1 on the medians of their
    alternating rounds (both flush the L2: like for like); ``low``/``high``:
    the smallest and largest difference of one round against the same round.
    """
    rows = []
    for workload, rec in ((doc or {}).get("workloads") or {}).items():
        ml, db = rec.get("measure_latency_l2_flush") or {}, rec.get("do_bench") or {}
        a = ml.get("median_of_rounds_ms") or ml.get("median_ms")
        b = db.get("median_of_rounds_ms") or db.get("median_ms")
        if not (a and b):
            continue
        diff = (rec.get("agreement") or {}).get("l2_flush_vs_do_bench")
        diff = a / b - 1 if diff is None else diff
        per_round = [x / y - 1 for x, y in zip(ml.get("round_medians_ms") or [], db.get("round_medians_ms") or [])
                     if x and y]
        rows.append({"workload": workload, "label": workload_label(workload, rec.get("description")),
                     "difference": diff, "low": min([diff, *per_round]), "high": max([diff, *per_round]),
                     "rounds": len(per_round)})
    return pd.DataFrame(rows, columns=["workload", "label", "difference", "low", "high", "rounds"])


def audit_first_call_ms(rows) -> float | None:
    """The very first call of the freshly built model in a pitfall audit (ms), or None.

    ``rows``: the audit's rows (``pitfalls.audit(...).to_dict("records")``). Its
    ``no_warmup`` row holds it (``first_call_ms``, or its note: "... the first
    alone took 511 ms").
    """
    import math
    import re

    for row in rows or []:
        if row.get("pitfall") != "no_warmup":
            continue
        first = row.get("first_call_ms")
        if first is not None and not (isinstance(first, float) and math.isnan(first)):
            return float(first)
        m = re.search(r"first alone took ([0-9.eE+-]+) ms", str(row.get("note") or ""))
        return float(m.group(1)) if m else None
    return None


def recorded_first_call_ms(doc: dict | None) -> float | None:
    """The first call of the freshly built model in the recorded pitfall audit (ms), or None."""
    return audit_first_call_ms(((doc or {}).get("pitfall_audit") or {}).get("rows"))


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


THROUGHPUT_COLUMNS = ["model", "dtype", "batch_size", "throughput", "ci95_low", "ci95_high", "largest", "optimal"]


def recorded_throughput_cases(doc: dict | None) -> pd.DataFrame:
    """Every configuration's curve as one long frame (``THROUGHPUT_COLUMNS``; throughput in samples/s)."""
    frames = []
    for rec in (doc or {}).get("configs") or []:
        if not rec.get("curve"):
            continue
        c = pd.DataFrame(rec["curve"])
        tp = c["samples_per_s"] if "samples_per_s" in c.columns else c.get("throughput")
        frames.append(pd.DataFrame({
            "model": rec.get("model"), "dtype": rec.get("dtype"), "batch_size": c["batch_size"], "throughput": tp,
            "ci95_low": c.get("ci95_low"), "ci95_high": c.get("ci95_high"), "largest": rec.get("max_batch_size"),
            "optimal": (rec.get("optimal") or {}).get("optimal_batch_size")}))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=THROUGHPUT_COLUMNS)
    return frame[THROUGHPUT_COLUMNS]


# ---------------------------------------------------------------- moe_engine.json

SWEEP_COLUMNS = ["gpu_experts", "decode_tokens_per_s", "prefill_ms", "decode_ms", "hit_rate"]


def _engine_runs(doc: dict | None, mode: str) -> tuple[list[dict], list[str]]:
    """moe_engine.json's runs of ``mode`` that may be drawn, and a note for each anomalous one left out."""
    runs = [r for r in (doc or {}).get("runs") or [] if r.get(mode)]
    if not runs:
        return [], []
    flags = flag_anomalies(pd.DataFrame(
        {"scheme": "ours", "routing": None, "budget": [r["gpu_experts"] for r in runs],
         "tokens_per_s": [r[mode].get("decode_tokens_per_s") for r in runs],
         "anomalous": [bool(r.get("anomalous")) for r in runs],
         "anomaly_reason": [r.get("anomaly_reason") for r in runs]}), "tokens_per_s", unit="tokens/s")
    kept = [r for r, odd in zip(runs, flags["anomalous"]) if not odd]
    excluded = [f"{run_name(None, None, r['gpu_experts'])}: {why}"
                for r, odd, why in zip(runs, flags["anomalous"], flags["anomaly_reason"]) if odd]
    return kept, excluded


def recorded_moe_sweep(doc: dict | None, mode: str = "greedy") -> pd.DataFrame:
    """One row per GPU-expert budget (``SWEEP_COLUMNS``); ``attrs["total_experts"]``, ``attrs["excluded"]``.

    ``excluded``: one line per anomalous run left out (``flag_anomalies``).
    """
    runs, excluded = _engine_runs(doc, mode)
    rows = [{"gpu_experts": r["gpu_experts"], "decode_tokens_per_s": r[mode].get("decode_tokens_per_s"),
             "prefill_ms": r[mode].get("prefill_ms"), "decode_ms": (r[mode].get("decode_ms") or {}).get("median"),
             "hit_rate": (r[mode].get("hit_rate") or {}).get("decode")} for r in runs]
    frame = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    frame.attrs["total_experts"] = ((doc or {}).get("settings") or {}).get("total_experts")
    frame.attrs["excluded"] = excluded
    return frame


def recorded_decode_samples(doc: dict | None, n: int = 3, mode: str = "greedy") -> dict[str, list[float]]:
    """Per-token decode latencies of up to ``n`` budgets (fewest, middle, most GPU experts); anomalous runs left out."""
    runs = sorted(_engine_runs(doc, mode)[0], key=lambda r: r["gpu_experts"])
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


SCHEME_COLUMNS = ["routing", "scheme", "budget", "tokens_per_s", "hit_rate", "bound_tokens_per_s", "anomalous",
                  "anomaly_reason"]


def _decode_runs(doc: dict | None) -> pd.DataFrame:
    """Every measured run of moe_decode.json (compare, sweep, ablation), anomalies flagged (``flag_anomalies``).

    A run is anomalous here when its *decode* rounds disagree (the benchmark's
    per-measure verdict, where recorded): a noisy prefill or beam measurement
    of the same configuration does not hide a steady decode. Records without
    per-measure verdicts fall back to the run's own flag.
    """
    rows = []
    for r in (doc or {}).get("runs") or []:
        d = r.get("decode")
        if not d:
            continue
        rounds = d.get("rounds") if isinstance(d.get("rounds"), dict) else {}
        odd, why = bool(r.get("anomalous")), r.get("anomaly_reason")
        if "anomalous" in rounds:
            odd = bool(rounds["anomalous"])
            why = f"decode tokens_per_s: {rounds.get('reason')}" if odd else None
        bound_ms = (d.get("bound") or {}).get("ms")
        rows.append({"kind": r.get("kind"), "routing": r.get("routing"), "scheme": r.get("scheme"),
                     "budget": r.get("budget"), "tokens_per_s": d.get("tokens_per_s"), "hit_rate": d.get("hit_rate"),
                     "bound_tokens_per_s": 1e3 / bound_ms if bound_ms else None,
                     "prefill_ms": (r.get("prefill") or {}).get("ms"), "decode_ms": d.get("median_ms"),
                     "anomalous": odd, "anomaly_reason": why})
    if not rows:
        return pd.DataFrame(columns=["kind", *SCHEME_COLUMNS, "prefill_ms", "decode_ms"])
    return flag_anomalies(pd.DataFrame(rows), "tokens_per_s", unit="tokens/s")


def recorded_moe_schemes(doc: dict | None, kind: str | tuple = "compare") -> pd.DataFrame:
    """Decode tokens/s of every offload scheme at the comparison budget, with its roofline bound (``SCHEME_COLUMNS``).

    ``kind``: the benchmark's group(s), e.g. ("compare", "ablation"). Anomalous
    runs stay in the frame with ``anomalous`` True and the reason, so the
    figure can say what it left out.
    """
    runs = _decode_runs(doc)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    return runs[runs["kind"].isin(kinds)][SCHEME_COLUMNS].reset_index(drop=True)


def recorded_moe_decode_sweep(doc: dict | None, routing: str = "trace") -> pd.DataFrame:
    """Our engine's budget sweep (one routing) in ``SWEEP_COLUMNS``, sorted by budget, anomalous runs left out.

    ``attrs["total_experts"]``; ``attrs["excluded"]``: one line per run left out.
    """
    runs = _decode_runs(doc)
    runs = runs[(runs["kind"] == "sweep") & (runs["routing"] == routing)]
    odd = runs["anomalous"].astype(bool)
    frame = pd.DataFrame({"gpu_experts": runs["budget"], "decode_tokens_per_s": runs["tokens_per_s"],
                          "prefill_ms": runs["prefill_ms"], "decode_ms": runs["decode_ms"],
                          "hit_rate": runs["hit_rate"]})[~odd]
    frame = frame[SWEEP_COLUMNS].sort_values("gpu_experts").reset_index(drop=True)
    frame.attrs["total_experts"] = ((doc or {}).get("settings") or {}).get("total_experts")
    frame.attrs["excluded"] = [f"{run_name(s, r, b)}: {why}" for s, r, b, why in
                               zip(runs["scheme"][odd], runs["routing"][odd], runs["budget"][odd],
                                   runs["anomaly_reason"][odd])]
    return frame


# benchmarks/cpu_gemv.py's sides: torch, the kernel as the engine calls it, and each of its paths forced
CPU_KERNEL_SIDES = {"torch": "torch's matmul", "kernel": "toolkit kernel", "vector": "kernel, vector path only",
                    "amx": "kernel, AMX tiles only"}


def recorded_cpu_gemv(doc: dict | None) -> pd.DataFrame:
    """One CPU expert's weight read rate against its token count, torch's matmul and the toolkit's kernel
    (``benchmarks/cpu_gemv.py``; where it timed them, also the kernel's vector and AMX paths each forced): one
    row per (tokens, side).

    Columns ``tokens``, ``side`` (the labels of ``CPU_KERNEL_SIDES``), ``gbs`` (the expert's bytes over the
    median ms), ``gbs_low``/``gbs_high`` (over the slowest and fastest round) and ``ms``. ``attrs``:
    ``host_read_gbs`` and ``float32_gbs`` (the same expert with float32 weights, torch's, one token), the
    ``threads`` and the expert's MB.
    """
    doc = doc or {}
    settings = doc.get("settings") or {}
    nbytes = settings.get("expert_bytes")
    rows = []
    for case in (doc.get("cases") or {}).values():
        for side, label in CPU_KERNEL_SIDES.items():
            ms, rounds = case.get(f"{side}_ms"), (case.get("rounds_ms") or {}).get(side) or []
            if not ms or not nbytes:
                continue
            rows.append({"tokens": int(case["tokens"]), "side": label, "gbs": nbytes / ms * 1e-6, "ms": ms,
                         "gbs_low": nbytes / max(rounds) * 1e-6 if rounds else None,
                         "gbs_high": nbytes / min(rounds) * 1e-6 if rounds else None})
    frame = pd.DataFrame(rows, columns=["tokens", "side", "gbs", "gbs_low", "gbs_high", "ms"])
    frame.attrs.update(host_read_gbs=doc.get("host_read_gbs"),
                       float32_gbs=(doc.get("float32_weights") or {}).get("gbs"),
                       threads=settings.get("threads"), expert_mb=nbytes / 1e6 if nbytes else None)
    return frame.sort_values(["side", "tokens"]).reset_index(drop=True)


MULTI_GPU_MEASURES = {"decode": ("tokens_per_s", "decode tokens/s"), "prefill": ("ms", "prefill ms")}


# the ablations of ``benchmarks/moe_multi_gpu.py`` (a configuration's name ends with one) -> what the label adds
MULTI_GPU_ABLATIONS = {"one-link": ", copies to the first",  # every miss copied to the first GPU
                       "nocontention": ", planned without contention",  # each path planned at its speed alone
                       "nolookahead": ", no lookahead"}  # no copies before a prefill layer's routing


def recorded_multi_gpu(doc: dict | None, measure: str = "decode") -> pd.DataFrame:
    """One GPU against two at the same per-GPU expert budget (``benchmarks/moe_multi_gpu.py``), one row per run.

    Columns ``scheme`` (the configuration, e.g. "1 GPU, 14 experts"), ``routing``, ``tokens_per_s``
    (decode) or ``ms`` (prefill), ``bound_<that column>`` (the roofline bound of what the run read),
    ``hit_rate``, ``anomalous`` and ``anomaly_reason``: whether *this measure's* rounds disagreed by
    more than the benchmark allows (decode and prefill are judged apart, so a noisy prefill does not
    hide a steady decode).
    """
    if measure not in MULTI_GPU_MEASURES:
        raise ValueError(f"measure must be one of {sorted(MULTI_GPU_MEASURES)}, got {measure!r}")
    key, _ = MULTI_GPU_MEASURES[measure]
    rows = []
    for run in (doc or {}).get("runs") or []:
        m = run.get(measure) or {}
        if m.get(key) is None:
            continue
        rounds = m.get("rounds") or {}
        bound_ms = (m.get("bound") or {}).get("ms")
        bound = (1e3 / bound_ms if measure == "decode" else bound_ms) if bound_ms else None
        gpus, per = run.get("gpus", 1), run.get("per_gpu_experts", run.get("budget"))
        label = f"{gpus} GPU{'s' if gpus != 1 else ''}, {per} experts{' each' if gpus != 1 else ''}"
        label += next((what for suffix, what in MULTI_GPU_ABLATIONS.items()
                       if str(run.get("config", "")).endswith(suffix)), "")
        rows.append({"scheme": label, "routing": run.get("routing"), key: rounds.get("median", m.get(key)),
                     f"bound_{key}": bound, "hit_rate": m.get("hit_rate"),
                     "anomalous": bool(rounds.get("anomalous", False)), "anomaly_reason": rounds.get("reason")})
    return pd.DataFrame(rows, columns=["scheme", "routing", key, f"bound_{key}", "hit_rate", "anomalous",
                                       "anomaly_reason"])


# ---------------------------------------------------------------- decode_timeline*.json

HOST_SEGMENT_LABELS = {"dense": "dense part + router", "routing": "routing sync", "before_cpu": "plan, hand-over",
                       "cpu": "CPU experts", "after_cpu": "results back", "tail": "LM head, step end"}


def recorded_decode_timeline(doc: dict | None) -> pd.DataFrame:
    """Where an offloaded decode step's host time went (``benchmarks/decode_timeline.py``): one row per
    (routing, schedule, segment) of the configurations whose rounds agree, ``ms`` per step (the median round's
    mean), ``step_ms`` the median step.

    Columns ``routing``, ``schedule``, ``segment`` (``HOST_SEGMENT_LABELS``' labels, in step order), ``ms``,
    ``step_ms``. ``attrs["excluded"]``: the flagged configurations left out, with their rounds' spread.
    """
    rows, excluded = [], []
    for routing, by in ((doc or {}).get("results") or {}).items():
        for schedule, r in by.items():
            if r.get("anomalous"):
                excluded.append(f"{routing} {schedule} (rounds spread {r.get('step_spread', 0):.0%})")
                continue
            per = r.get("per_step_ms") or {}
            rows += [{"routing": routing, "schedule": schedule, "segment": label, "ms": per[key],
                      "step_ms": r.get("step_ms")} for key, label in HOST_SEGMENT_LABELS.items() if key in per]
    frame = pd.DataFrame(rows, columns=["routing", "schedule", "segment", "ms", "step_ms"])
    frame.attrs["excluded"] = excluded
    return frame


CAPTURED_SEGMENT_LABELS = {"pre": "dense part, router, token out", "fn_start": "host node start",
                           "fn_busy": "CPU share, copies beside it", "fn_end": "host function end to sum back",
                           "wait_gpu": "waiting for the GPU's rows", "outside_layers": "outside the layers"}
_UNSTAMPED_LABELS = {"pre": CAPTURED_SEGMENT_LABELS["pre"], "window": "host function's window",
                     "wait_gpu": CAPTURED_SEGMENT_LABELS["wait_gpu"],
                     "outside_layers": CAPTURED_SEGMENT_LABELS["outside_layers"]}


def recorded_captured_step(doc: dict | None) -> pd.DataFrame:
    """Where a decode step captured whole went (``benchmarks/captured_step.py``): one row per (profiled step,
    segment), ``ms`` summed over the step's layers, in step order.

    Columns ``routing``, ``schedule`` (the profiled step), ``segment`` (``CAPTURED_SEGMENT_LABELS``' labels; a
    step without the host function's stamps has its window as one segment), ``ms``, ``step_ms`` (the profiled
    step's wall time). The few µs a sum of segments overshoots a step by read as 0 outside the layers.
    """
    routing = ((doc or {}).get("settings") or {}).get("routing", "?")
    rows = []
    for j, step in enumerate((doc or {}).get("profiled_steps") or []):
        summary = step.get("summary") or {}
        stamped = all(isinstance(summary.get(k), int | float) and math.isfinite(summary[k])
                      for k in ("fn_start", "fn_busy", "fn_end"))
        for key, label in (CAPTURED_SEGMENT_LABELS if stamped else _UNSTAMPED_LABELS).items():
            if summary.get(key) is not None:
                rows.append({"routing": routing, "schedule": f"profiled step {j + 1}", "segment": label,
                             "ms": max(0.0, float(summary[key])), "step_ms": summary.get("step")})
    return pd.DataFrame(rows, columns=["routing", "schedule", "segment", "ms", "step_ms"])


def recorded_stop_check(doc: dict | None) -> pd.DataFrame:
    """Decode tokens/s with transformers' stop check read every step and one step late, per target
    (``benchmarks/stop_check.py``), for ``plots.paired_ways``: columns ``target``, ``way`` ("every step",
    "late"), ``tokens_per_s`` (the rounds' median), ``rounds``, ``deferred`` (transformers took the late
    check), ``anomalous`` (the benchmark's verdict on the rounds) and ``anomaly_reason``."""
    rows = []
    for target, ways in ((doc or {}).get("summary") or {}).items():
        for way in ("every step", "late"):
            v = ways.get(way) if isinstance(ways, dict) else None
            if not isinstance(v, dict):
                continue
            rows.append({"target": target, "way": way, "tokens_per_s": v.get("tokens_per_s"),
                         "rounds": list(v.get("rounds") or []), "deferred": v.get("deferred"),
                         "anomalous": bool(v.get("anomalous")),
                         "anomaly_reason": (f"rounds differ by {100 * v['spread']:.0f}% of their median"
                                            if v.get("anomalous") else None)})
    return pd.DataFrame(rows, columns=["target", "way", "tokens_per_s", "rounds", "deferred", "anomalous",
                                       "anomaly_reason"])


__all__ = ["Recording", "recording", "is_calibration_cache", "recorded_results", "recorded_env", "recorded_device",
           "recorded_date", "recorded_complete", "recorded_label", "recorded_where", "ANOMALY_RATIO",
           "flag_anomalies", "run_name", "recorded_pitfalls", "recorded_latency", "audit_first_call_ms",
           "recorded_first_call_ms",
           "TIMER_LABELS", "recorded_timer_agreement", "workload_label", "recorded_timer_differences",
           "recorded_throughput_curves", "THROUGHPUT_COLUMNS", "recorded_throughput_cases", "recorded_moe_sweep",
           "recorded_decode_samples", "recorded_timeline", "SCHEME_COLUMNS", "recorded_moe_schemes",
           "recorded_moe_decode_sweep", "SWEEP_COLUMNS", "PITFALL_COLUMNS", "MULTI_GPU_MEASURES", "MULTI_GPU_ABLATIONS", "recorded_multi_gpu",
           "HOST_SEGMENT_LABELS", "recorded_decode_timeline", "CAPTURED_SEGMENT_LABELS", "recorded_captured_step",
           "recorded_stop_check"]
