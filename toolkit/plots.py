"""Every figure of the toolkit, in one paper style.

Figures are built from result values or plain pandas frames / numpy arrays
(never by measuring), so any figure can be redrawn on a laptop from the files
in ``data/``. Each function returns a ``matplotlib.figure.Figure`` made without
pyplot (no global state: nothing leaks in loops, nothing is shown twice in a
notebook); ``save(fig, path)`` writes PDF and PNG, and the same data gives the
same PDF bytes (no creation date, fixed creator, TrueType fonts).

Shapes: L layers, E experts per layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

# one column of a two-column paper is ~3.3 in wide
COLUMN_WIDTH = 3.4
FIG_SIZE = (COLUMN_WIDTH, 2.4)
DPI = 200
_META = "toolkit"  # fixed Creator/Producer/Software: same data -> same bytes

# Gantt colours by profiler label (INTERFACES.md: moe.route, moe.gpu_experts, ...)
_SPAN_COLORS = {
    "attention": "#4C72B0",
    "moe.route": "#8172B3",
    "moe.gpu_experts": "#55A868",
    "moe.cpu_experts": "#DD8452",
    "moe.copy_experts": "#C44E52",
    "other": "#A0A0A0",
}


def paper_rc() -> dict:
    """rcParams of the paper style: seaborn 'paper' context, ticks, colour-blind palette, TrueType fonts."""
    import seaborn as sns
    from cycler import cycler

    rc = {}
    rc.update(sns.axes_style("ticks"))
    rc.update(sns.plotting_context("paper"))
    rc.update({
        "axes.prop_cycle": cycler(color=sns.color_palette("colorblind")),
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        # Type 42 (TrueType) instead of Type 3: editable text, accepted by paper submission systems
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "svg.hashsalt": _META,
        "figure.dpi": 100,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "legend.frameon": False,
        "image.cmap": "viridis",
    })
    return rc


@contextlib.contextmanager
def paper_style():
    """Context in which figures are built and saved in the paper style."""
    with matplotlib.rc_context(paper_rc()):
        yield


def _plain_log_ticks(axis, lo: float | None = None, hi: float | None = None) -> None:
    """Log axis labelled 1, 2, 5, 10, ... in plain numbers (no 2x10^0 clutter); decades only when wide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if lo is None or hi is None:
        lo, hi = axis.get_view_interval()
    wide = lo > 0 and hi / lo > 100
    axis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0), numticks=30))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _figure(figsize=FIG_SIZE, ncols: int = 1, **kw) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols, **kw)
    return fig, axes


def save(fig: Figure, path: str | os.PathLike, formats: Sequence[str] = ("pdf", "png"), dpi: int = DPI) -> list[Path]:
    """Write ``fig`` as ``path.pdf`` and ``path.png`` (suffix of ``path`` ignored); return the paths."""
    path = Path(path)
    if path.suffix.lower() in (".pdf", ".png", ".svg"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "pdf": {"CreationDate": None, "ModDate": None, "Creator": _META, "Producer": _META},
        "png": {"Software": _META},
        "svg": {"Date": None, "Creator": _META},
    }
    out = []
    with paper_style():
        for fmt in formats:
            p = path.with_name(path.name + "." + fmt)
            fig.savefig(p, format=fmt, dpi=dpi, metadata=metadata.get(fmt))
            out.append(p)
    return out


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for widgets and HTML pages)."""
    import io

    buf = io.BytesIO()
    with paper_style():
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": _META})
    return buf.getvalue()


# ---------------------------------------------------------------- coercion


def _samples(obj) -> np.ndarray:
    """Latency samples (ms) of a LatencyResult, a dict from its to_dict(), or a plain sequence."""
    if hasattr(obj, "samples_ms"):
        return np.asarray(obj.samples_ms, dtype=float)
    if isinstance(obj, Mapping) and "samples_ms" in obj:
        return np.asarray(obj["samples_ms"], dtype=float)
    return np.asarray(obj, dtype=float).ravel()


def latency_frame(results) -> pd.DataFrame:
    """Long frame (label, latency_ms) from result(s), {label: result-or-samples} or a frame."""
    if isinstance(results, pd.DataFrame):
        if "latency_ms" not in results.columns:
            raise ValueError("latency frame needs a 'latency_ms' column")
        df = results.copy()
        if "label" not in df.columns:
            df["label"] = "latency"
        return df[["label", "latency_ms"]]
    if hasattr(results, "samples_ms") or (isinstance(results, Mapping) and "samples_ms" in results):
        results = [results]
    if isinstance(results, Mapping):
        items = list(results.items())
    else:
        items = []
        for i, r in enumerate(results):
            label = getattr(r, "label", None) or (r.get("label") if isinstance(r, Mapping) else None)
            items.append((label or f"#{i}", r))
    frames = [pd.DataFrame({"label": str(k), "latency_ms": _samples(v)}) for k, v in items]
    frames = [f for f in frames if len(f)]  # an empty series (no warm-up calls) has nothing to draw
    if not frames:
        raise ValueError("no latency samples to draw")
    return pd.concat(frames, ignore_index=True)


def _quantiles(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("label", sort=False)["latency_ms"]
    return pd.DataFrame({"median": g.median(), "p99": g.quantile(0.99)})


# ---------------------------------------------------------------- figures


def latency_distribution(results, kind: str = "violin", log: bool | None = None, title: str | None = None) -> Figure:
    """Latency distribution per label as a violin or ECDF, median and p99 marked."""
    df = latency_frame(results)
    q = _quantiles(df)
    labels = list(q.index)
    if log is None:  # a wide range (pitfalls span orders of magnitude) reads better on a log axis
        lo, hi = df["latency_ms"].min(), df["latency_ms"].max()
        log = bool(lo > 0 and hi / lo > 30)
    with paper_style():
        import seaborn as sns

        height = max(FIG_SIZE[1], 0.45 * len(labels) + 0.9) if kind == "violin" else FIG_SIZE[1]
        fig, ax = _figure((COLUMN_WIDTH, height))
        if kind == "violin":
            sns.violinplot(data=df, x="latency_ms", y="label", hue="label", order=labels, cut=0, inner=None,
                           density_norm="width", linewidth=0.6, ax=ax, log_scale=log, legend=False)
            y = np.arange(len(labels))
            ax.scatter(q["median"], y, marker="|", s=120, color="black", zorder=3, label="median")
            ax.scatter(q["p99"], y, marker="v", s=22, color="#C44E52", zorder=3, label="p99")
            ax.set_ylabel("")
        elif kind == "ecdf":
            sns.ecdfplot(data=df, x="latency_ms", hue="label", hue_order=labels, ax=ax, log_scale=log)
            colors = dict(zip(labels, sns.color_palette("colorblind", len(labels))))
            for label, row in q.iterrows():
                ax.plot([row["median"]], [0.5], "o", ms=3.5, color=colors[label])
                ax.plot([row["p99"]], [0.99], "v", ms=3.5, color=colors[label])
            ax.axhline(0.5, lw=0.5, ls=":", color="gray")
            ax.axhline(0.99, lw=0.5, ls=":", color="gray")
            ax.set_ylabel("fraction of samples")
            ax.text(1.0, 0.5, " median", transform=ax.get_yaxis_transform(), va="center", fontsize="x-small")
            ax.text(1.0, 0.99, " p99", transform=ax.get_yaxis_transform(), va="center", fontsize="x-small")
        else:
            raise ValueError(f"kind must be 'violin' or 'ecdf', got {kind!r}")
        ax.set_xlabel("latency (ms)")
        if log:
            _plain_log_ticks(ax.xaxis, float(df["latency_ms"].min()), float(df["latency_ms"].max()))
        if kind == "violin":
            ax.legend(loc="best", fontsize="x-small")
        if title:
            ax.set_title(title)
    return fig


PITFALL_LABELS = {
    "copy_in_timed_region": "copy in timed region",
    "no_warmup": "no warm-up",
    "host_clock_no_sync": "host clock, no sync",
    "single_sample": "single sample",
    "cudnn_benchmark": "cudnn.benchmark 1st call",
}


def pitfall_frame(audit) -> pd.DataFrame:
    """Frame (method, median_ms, low_ms, high_ms, ref_ms, ref_low_ms, ref_high_ms, ratio, error_pct, note).

    ``audit``: the frame of ``toolkit.pitfalls.audit`` (pitfall, naive_ms,
    correct_ms, note; the correct LatencyResult in ``attrs["correct"]`` gives
    the reference's 95% CI); or a frame with ``method``, ``median_ms``
    (optional ``low_ms``/``high_ms``, and ``ref_ms`` or a boolean
    ``reference`` column, else the first row is the reference); or a mapping
    {method: LatencyResult-or-samples} whose first entry is the correct timer.
    ``ratio`` is measured / correct; NaN where a mistake does not apply.
    """
    ref_ci = None
    if isinstance(audit, Mapping):
        rows = []
        for i, (name, r) in enumerate(audit.items()):
            s = _samples(r)
            ci = getattr(r, "ci95_ms", None)
            lo, hi = ci if ci is not None else np.percentile(s, [2.5, 97.5])
            rows.append({"method": str(name), "median_ms": float(np.median(s)), "low_ms": lo, "high_ms": hi,
                         "reference": i == 0})
        audit = pd.DataFrame(rows)
    df = audit.copy().reset_index(drop=True)
    if "pitfall" in df.columns and "naive_ms" in df.columns:  # toolkit.pitfalls.audit
        correct = audit.attrs.get("correct")
        ref_ci = getattr(correct, "ci95_ms", None)
        ref_med = getattr(correct, "median_ms", None)
        df = pd.DataFrame({"method": [PITFALL_LABELS.get(p, p) for p in df["pitfall"]],
                           "median_ms": df["naive_ms"], "ref_ms": df["correct_ms"],
                           "note": df["note"] if "note" in df.columns else ""})
        if ref_ci is not None:  # the correct timer's CI applies to the rows measured against it
            same = np.isclose(df["ref_ms"], ref_med)
            df["ref_low_ms"] = np.where(same, ref_ci[0], df["ref_ms"])
            df["ref_high_ms"] = np.where(same, ref_ci[1], df["ref_ms"])
    if "ref_ms" not in df.columns:
        ref_rows = df[df["reference"].astype(bool)] if "reference" in df.columns else df.iloc[:0]
        ref_row = (ref_rows if len(ref_rows) else df).iloc[0]
        df["ref_ms"] = float(ref_row["median_ms"])
        df["ref_low_ms"] = float(ref_row.get("low_ms", ref_row["median_ms"]))
        df["ref_high_ms"] = float(ref_row.get("high_ms", ref_row["median_ms"]))
    for c, base in (("low_ms", "median_ms"), ("high_ms", "median_ms"), ("ref_low_ms", "ref_ms"),
                    ("ref_high_ms", "ref_ms")):
        if c not in df.columns:
            df[c] = df[base]
        df[c] = df[c].fillna(df[base])
    if "note" not in df.columns:
        df["note"] = ""
    df["ratio"] = df["median_ms"] / df["ref_ms"]
    df["error_pct"] = 100.0 * (df["ratio"] - 1.0)
    return df


def pitfall_errors(audit, title: str | None = None) -> Figure:
    """Each timing mistake's reading relative to the correct timer, 95% CI as error bars.

    The axis is a log ratio: a timer that reads 10x too low and one that reads
    10x too high are equally wrong. Mistakes that do not apply (GPU-only ones
    on a CPU) are listed as "n/a".
    """
    df = pitfall_frame(audit)
    lo = df["low_ms"] / df["ref_high_ms"]  # widest ratio interval from both CIs
    hi = df["high_ms"] / df["ref_low_ms"]
    ok = df["ratio"].notna() & np.isfinite(df["ratio"])
    with paper_style():
        fig, ax = _figure((COLUMN_WIDTH, max(FIG_SIZE[1], 0.32 * len(df) + 0.9)))
        y = np.arange(len(df))
        colors = np.array(["#55A868" if abs(e) < 5 else "#C44E52" for e in df["error_pct"].fillna(0)])
        ax.scatter(df["ratio"][ok], y[ok], color=colors[ok], s=18, zorder=3)
        ax.hlines(y[ok], 1.0, df["ratio"][ok], colors=colors[ok], lw=2.5, alpha=0.6)
        ax.errorbar(df["ratio"][ok], y[ok], xerr=[(df["ratio"] - lo)[ok].clip(lower=0),
                                                  (hi - df["ratio"])[ok].clip(lower=0)],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2, zorder=4)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(y, df["method"])
        ax.set_ylim(len(df) - 0.5, -0.5)
        ax.set_xlabel("measured / correct latency")
        for yi, good, e, r, r_lo, r_hi in zip(y, ok, df["error_pct"], df["ratio"], lo, hi):
            if not good:
                ax.annotate("n/a", (1.0, yi), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize="x-small", color="gray")
                continue
            text = f"{e:+.0f}%" if abs(e) >= 10 else f"{e:+.1f}%"
            low = r < 1 and e <= -5  # label outside the bar, on the side it points to
            ax.annotate(text, (min(r, r_lo) if low else max(r, r_hi), yi), xytext=(-4 if low else 4, 0),
                        textcoords="offset points", va="center", ha="right" if low else "left", fontsize="x-small")
        lo_all = float(min(lo[ok].min(), 1.0)) if ok.any() else 1.0
        hi_all = float(max(hi[ok].max(), 1.0)) if ok.any() else 1.0
        ax.set_xlim(lo_all / (2.5 if lo_all < 0.95 else 1.3), hi_all * 2.0)  # room for the labels
        _plain_log_ticks(ax.xaxis, *ax.get_xlim())
        if title:
            ax.set_title(title)
    return fig


def timer_comparison(frame, title: str | None = None) -> Figure:
    """Median latency of each workload under several timers (grouped bars, log axis): do they agree?

    ``frame``: columns ``workload``, ``timer``, ``median_ms``.
    """
    df = pd.DataFrame(frame).dropna(subset=["median_ms"])
    workloads = list(dict.fromkeys(df["workload"]))
    timers = list(dict.fromkeys(df["timer"]))
    with paper_style():
        import seaborn as sns

        fig, ax = _figure((COLUMN_WIDTH, max(FIG_SIZE[1], 0.5 * len(workloads) + 1.0)))
        colors = sns.color_palette("colorblind", len(timers))
        height = 0.8 / max(len(timers), 1)
        for j, timer in enumerate(timers):
            sub = df[df["timer"] == timer].set_index("workload")
            y = [i - 0.4 + height * (j + 0.5) for i, w in enumerate(workloads) if w in sub.index]
            ax.barh(y, [sub.loc[w, "median_ms"] for w in workloads if w in sub.index], height=height,
                    color=colors[j], label=timer)
        ax.set_xscale("log")
        ax.set_yticks(range(len(workloads)), workloads)
        ax.set_ylim(len(workloads) - 0.5, -0.5)
        ax.set_xlabel("median latency (ms)")
        lo, hi = float(df["median_ms"].min()), float(df["median_ms"].max())
        _plain_log_ticks(ax.xaxis, lo, hi)
        ax.legend(fontsize="x-small", loc="best")
        if title:
            ax.set_title(title)
    return fig


def throughput_curve(curve, largest: int | None = None, optimal: int | None = None, selected: int | None = None,
                     title: str | None = None) -> Figure:
    """Throughput (items/s) vs batch size; the largest batch that fits and the optimal one marked.

    ``curve``: frame with ``batch_size`` and ``throughput`` (items/s; also
    accepted: ``samples_per_s`` as from ``toolkit.throughput.throughput_curve``,
    ``items_per_s``), optional ``latency_ms`` / ``batch_ms_median``, optional
    ``ci95_low``/``ci95_high`` (drawn as error bars);
    or {batch_size: throughput}. ``selected`` draws a guide at that batch size (the widget's slider).
    """
    df = throughput_frame(curve)
    with paper_style():
        fig, ax = _figure()
        ax.plot(df["batch_size"], df["throughput"], "o-", ms=3, color="#4C72B0", label="measured")
        if {"ci95_low", "ci95_high"} <= set(df.columns):
            lo = (df["throughput"] - df["ci95_low"]).clip(lower=0).fillna(0)
            hi = (df["ci95_high"] - df["throughput"]).clip(lower=0).fillna(0).replace(np.inf, 0)
            ax.errorbar(df["batch_size"], df["throughput"], yerr=[lo, hi], fmt="none", ecolor="#4C72B0",
                        elinewidth=0.8, capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (items/s)")
        ax.set_ylim(bottom=0)
        tp = dict(zip(df["batch_size"], df["throughput"]))
        if optimal is None and len(df):
            optimal = int(df.loc[df["throughput"].idxmax(), "batch_size"])
        if largest is None and len(df):
            largest = int(df["batch_size"].max())
        if largest in tp:
            ax.plot([largest], [tp[largest]], "s", ms=6, mfc="none", mec="#C44E52", mew=1.2,
                    label=f"largest fits ({largest})")
        if optimal in tp:
            ax.plot([optimal], [tp[optimal]], "*", ms=9, color="#DD8452", label=f"optimal ({optimal})")
        if selected is not None:
            ax.axvline(selected, color="gray", lw=0.8, ls="--")
        ax.legend(loc="lower right", fontsize="x-small")
        if title:
            ax.set_title(title)
    return fig


def throughput_frame(curve) -> pd.DataFrame:
    """Normalise a throughput curve to columns batch_size, throughput (+ latency_ms if present)."""
    if isinstance(curve, Mapping) and not isinstance(curve, pd.DataFrame):
        curve = pd.DataFrame({"batch_size": list(curve.keys()), "throughput": list(curve.values())})
    elif hasattr(curve, "to_dataframe") and not isinstance(curve, pd.DataFrame):
        curve = curve.to_dataframe()
    elif not isinstance(curve, pd.DataFrame):
        curve = pd.DataFrame(list(curve))
    df = curve.copy()
    if "throughput" not in df.columns:
        for alt in ("items_per_s", "samples_per_s", "throughput_per_s", "throughput_items_s"):
            if alt in df.columns:
                df["throughput"] = df[alt]
                break
        else:
            raise ValueError(f"throughput curve needs a 'throughput' column, has {list(df.columns)}")
    if "latency_ms" not in df.columns and "batch_ms_median" in df.columns:  # toolkit.throughput.throughput_curve
        df["latency_ms"] = df["batch_ms_median"]
    df = df.dropna(subset=["throughput"]).sort_values("batch_size").reset_index(drop=True)
    df["batch_size"] = df["batch_size"].astype(int)
    return df


def hit_rate_vs_gpu_experts(frame, phase: str | None = None, total_experts: int | None = None,
                            title: str | None = None) -> Figure:
    """Hit rate vs number of GPU-resident experts, one line per policy.

    ``frame``: columns ``policy``, ``gpu_experts``, ``hit_rate`` (optional
    ``phase``: filtered to ``phase`` when given), or ``toolkit.moe.simulate.Sweep``'s
    frame, whose ``hit_rate_<phase>`` column is used for ``phase``.
    """
    df = pd.DataFrame(frame.to_dataframe() if hasattr(frame, "to_dataframe") else frame)
    if phase is not None and "phase" in df.columns:
        df = df[df["phase"] == phase]
    elif phase is not None and f"hit_rate_{phase}" in df.columns:
        df = df.assign(hit_rate=df[f"hit_rate_{phase}"])
    with paper_style():
        import seaborn as sns

        fig, ax = _figure()
        sns.lineplot(data=df, x="gpu_experts", y="hit_rate", hue="policy", style="policy", markers=True,
                     dashes=False, ms=4, ax=ax)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("GPU-resident experts" + (f" (of {total_experts})" if total_experts else ""))
        ax.set_ylabel(f"{phase} hit rate" if phase else "hit rate")
        ax.legend(fontsize="x-small", title=None)
        if title:
            ax.set_title(title)
    return fig


def offload_sweep(frame, total_experts: int | None = None, title: str | None = None) -> Figure:
    """Offloaded generation vs GPU-resident experts: decode tokens/s, prefill time and decode hit rate.

    ``frame``: columns ``gpu_experts``, ``decode_tokens_per_s``, ``prefill_ms``, ``hit_rate`` (decode).
    """
    df = pd.DataFrame(frame).sort_values("gpu_experts")
    panels = [("decode_tokens_per_s", "decode tokens/s"), ("prefill_ms", "prefill (ms)"),
              ("hit_rate", "decode hit rate")]
    with paper_style():
        fig, axes = _figure((2 * COLUMN_WIDTH, FIG_SIZE[1]), ncols=3)
        for ax, (col, label) in zip(axes, panels):
            ax.plot(df["gpu_experts"], df[col].astype(float), "o-", ms=3)
            ax.set_ylabel(label)
            ax.set_xlabel("GPU experts" + (f" (of {total_experts})" if total_experts else ""))
            ax.set_ylim(0, 1.02 if col == "hit_rate" else None)
            if col != "hit_rate":
                ax.set_ylim(bottom=0)
        if title:
            fig.suptitle(title)
    return fig


def scheme_comparison(frame, value: str = "tokens_per_s", label: str = "decode tokens/s",
                      title: str | None = None) -> Figure:
    """Offload schemes side by side (bars, one panel per routing), with their roofline bound marked (|).

    ``frame``: columns ``scheme``, ``routing``, ``value`` (default ``tokens_per_s``), optional
    ``bound_<value>``: the best the hardware allows for what that run read.
    """
    df = pd.DataFrame(frame)
    routings = list(dict.fromkeys(df["routing"])) or [""]
    schemes = list(dict.fromkeys(df["scheme"]))
    with paper_style():
        fig, axes = _figure((COLUMN_WIDTH * (1 if len(routings) == 1 else 2),
                             max(FIG_SIZE[1], 0.3 * len(schemes) + 1.0)), ncols=len(routings), sharey=True)
        axes = np.atleast_1d(axes)
        for ax, routing in zip(axes, routings):
            sub = df[df["routing"] == routing].set_index("scheme").reindex(schemes)
            y = np.arange(len(schemes))
            ax.barh(y, sub[value], color="#4C72B0", alpha=0.85, label="measured")
            if f"bound_{value}" in sub.columns:
                ax.scatter(sub[f"bound_{value}"], y, marker="|", s=160, color="#C44E52", zorder=3,
                           label="roofline bound")
            ax.set_yticks(y, schemes)
            ax.set_ylim(len(schemes) - 0.5, -0.5)
            ax.set_xlabel(label)
            ax.set_title(f"{routing} routing" if routing else None, fontsize="small")
            vals = pd.concat([df[c] for c in (value, f"bound_{value}") if c in df.columns]).astype(float)
            vals = vals[vals > 0]
            if len(vals) and vals.max() / vals.min() > 20:  # a bound far above the measurement: log axis
                ax.set_xscale("log")
                _plain_log_ticks(ax.xaxis, float(vals.min()), float(vals.max()))
        axes[0].legend(fontsize="x-small", loc="lower right")
        if title:
            fig.suptitle(title)
    return fig


def hit_rate_matrix(hits, activations=None) -> np.ndarray:
    """Hit rate [L, E] from hits/activations (NaN where an expert was never used), or pass-through."""
    hits = np.asarray(hits, dtype=float)
    if activations is None:
        return hits
    act = np.asarray(activations, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(act > 0, hits / np.maximum(act, 1), np.nan)


def hit_rate_heatmap(rates, activations=None, xlabel: str = "expert", title: str | None = None,
                     annotate: bool | None = None, layers_on_x: bool | None = None) -> Figure:
    """Heat map of hit rate per layer and expert (or phase, or policy); grey = never used.

    ``rates``: [L, E] array of hit rates, or hits [L, E] with ``activations``
    [L, E], or [L] (one column), or a frame / {column: [L]} (e.g. per phase).
    Layers are rows, unless there are many layers and few columns
    (``layers_on_x`` None = decide): then layers run along x, which fits a page.
    """
    columns = None
    if isinstance(rates, pd.DataFrame):
        columns, rates = [str(c) for c in rates.columns], rates.to_numpy(dtype=float)
    elif isinstance(rates, Mapping):
        columns = [str(c) for c in rates]
        rates = np.stack([np.asarray(v, dtype=float) for v in rates.values()], axis=1)  # [L, C]
    m = hit_rate_matrix(rates, activations)
    if m.ndim == 1:
        m = m[:, None]
    n_layers, n_cols = m.shape
    if layers_on_x is None:
        layers_on_x = n_layers > 16 and n_cols <= 8
    if annotate is None:
        annotate = n_layers * n_cols <= 64
    shown = m.T if layers_on_x else m  # [rows, cols] as drawn
    n_rows, n_x = shown.shape
    with paper_style():
        w = min(7.0, max(COLUMN_WIDTH, 0.2 * n_x + 1.6))
        h = min(6.0, max(1.5, 0.16 * n_rows + 1.0)) if n_rows > 4 else 0.3 * n_rows + 1.2
        fig, ax = _figure((w, h))
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#D9D9D9")
        im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                       interpolation="nearest")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="hit rate", fraction=0.05, pad=0.02)
        layer_axis, other_axis = (ax.xaxis, ax.yaxis) if layers_on_x else (ax.yaxis, ax.xaxis)
        layer_axis.set_label_text("layer")
        other_axis.set_label_text(xlabel)
        n_other = n_cols
        if columns is not None:
            other_axis.set_ticks(range(n_other), columns)
            if not layers_on_x and max(len(c) for c in columns) * n_other > 40:
                ax.tick_params(axis="x", labelrotation=30)
        elif n_other <= 16:
            other_axis.set_ticks(range(n_other))
        if n_layers <= 16:
            layer_axis.set_ticks(range(n_layers))
        if annotate:
            for (i, j), v in np.ndenumerate(shown):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if v < 0.6 else "black")
        if title:
            ax.set_title(title)
    return fig


def decode_latency_over_tokens(latencies, prefill_ms: float | None = None, title: str | None = None) -> Figure:
    """Per-token decode latency (ms) over the generated tokens; one line per label if a mapping."""
    series = dict(latencies) if isinstance(latencies, Mapping) else {"decode": latencies}
    with paper_style():
        fig, ax = _figure()
        for label, v in series.items():
            v = np.asarray(v, dtype=float)
            (line,) = ax.plot(np.arange(1, len(v) + 1), v, lw=0.9, label=f"{label}: median {np.median(v):.3g} ms")
            ax.axhline(np.median(v), color=line.get_color(), lw=0.6, ls="--")
        if prefill_ms is not None:
            ax.text(0.99, 0.97, f"prefill {prefill_ms:.1f} ms", transform=ax.transAxes, ha="right", va="top",
                    fontsize="x-small")
        ax.set_xlabel("generated token")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("decode latency (ms)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="x-small", loc="best")
        if title:
            ax.set_title(title)
    return fig


def _span_kind(name: str) -> str:
    base = str(name).split("[", 1)[0]
    return base if base in _SPAN_COLORS else "other"


def _lane_name(row: str, lane: int, n: int) -> str:
    if n == 1:
        return row
    if row == "CPU":  # lane 0 runs the steps; others are worker threads (the engine's CPU experts)
        return "CPU main" if lane == 0 else f"CPU worker {lane}" if n > 2 else "CPU worker"
    return f"{row} stream {lane}"


def timeline_gantt(timeline: pd.DataFrame, step: int | None = 0, title: str | None = None,
                   max_ms: float | None = None) -> Figure:
    """CPU/GPU Gantt chart of one MoE decode step from ``ProfileResult.timeline()``.

    ``timeline``: columns row ('CPU'|'GPU'), name, start_ms, end_ms, layer
    (optional ``lane``: host thread or GPU stream, one bar row each; optional
    ``step``: only that profiled step is drawn, None = all). Times are
    shifted to start at 0. Spans are coloured by profiler label (attention,
    moe.route, moe.gpu_experts, moe.cpu_experts, moe.copy_experts); overlap of
    the CPU and GPU rows is the point of Fiddler-style offloading.
    """
    df = timeline.copy()
    if step is not None and "step" in df.columns and (df["step"] == step).any():
        df = df[df["step"] == step]
    if len(df):
        t0 = float(df["start_ms"].min())
        df["start_ms"], df["end_ms"] = df["start_ms"] - t0, df["end_ms"] - t0
    if max_ms is not None:
        df = df[df["start_ms"] < max_ms]
    df["_span"] = df["name"].map(_span_kind)
    if "lane" not in df.columns:
        df["lane"] = 0
    df["lane"] = df["lane"].fillna(0).astype(int)
    order = {"GPU": 0, "CPU": 1}
    lanes = sorted({(r, int(lane)) for r, lane in zip(df["row"], df["lane"])}, key=lambda x: (order.get(x[0], 2), x))
    n_lanes = {r: sum(1 for x in lanes if x[0] == r) for r, _ in lanes}
    rows = [_lane_name(r, lane, n_lanes[r]) for r, lane in lanes]
    with paper_style():
        fig, ax = _figure((min(7.0, 2 * COLUMN_WIDTH), 0.45 * max(len(rows), 1) + 1.1))
        for i, (row, lane) in enumerate(lanes):
            sub = df[(df["row"] == row) & (df["lane"] == lane)]
            for span, g in sub.groupby("_span", sort=True):
                spans = list(zip(g["start_ms"], (g["end_ms"] - g["start_ms"]).clip(lower=1e-4)))
                ax.broken_barh(spans, (i - 0.38, 0.76), facecolors=_SPAN_COLORS[span], edgecolor="white",
                               linewidth=0.2)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel("time (ms)")
        ax.grid(axis="y", visible=False)
        present = [k for k in _SPAN_COLORS if k in set(df["_span"])]
        handles = [Patch(color=_SPAN_COLORS[k], label=k.removeprefix("moe.")) for k in present]
        if handles:
            fig.legend(handles=handles, fontsize="x-small", ncols=min(len(handles), 6), loc="outside lower center")
        if title:
            ax.set_title(title)
    return fig
