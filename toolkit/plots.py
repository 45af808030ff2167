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

SPAN_LABELS = {  # the profiler labels in plain words, for legends
    "attention": "attention",
    "moe.route": "routing",
    "moe.gpu_experts": "experts on the GPU",
    "moe.cpu_experts": "experts on the CPU",
    "moe.copy_experts": "expert weights copied to the GPU",
    "other": "other",
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


def set_title(fig: Figure, title: str | None, ax=None) -> None:
    """Title ``ax`` (or the whole figure when None), each line wrapped to the figure's width.

    Paper figures name what is measured, the model, dtype and device in their
    title, which makes long lines; unwrapped, a title wider than its figure
    would widen the saved PNG and PDF instead. A long line breaks at its " · "
    (what · where) before anywhere else.
    """
    import textwrap

    if not title:
        return
    chars = max(30, int(fig.get_figwidth() * 19))  # ~19 characters per inch at the 'small' title size
    lines = []
    for line in str(title).splitlines():
        parts = line.split(" · ") if len(line) > chars else [line]
        lines += [wrapped for part in parts for wrapped in textwrap.wrap(part, chars) or [""]]
    text = "\n".join(lines)
    if ax is None:
        fig.suptitle(text, fontsize="small")
    else:
        ax.set_title(text, fontsize="small")


def save(fig: Figure, path: str | os.PathLike, formats: Sequence[str] = ("pdf", "png"), dpi: int = DPI) -> list[Path]:
    """Write ``fig`` as ``path.pdf`` and ``path.png`` (suffix of ``path`` ignored); return the paths.

    Each file is written atomically (``results.atomic_write``): an interrupted
    run leaves the previous figure or the new one, never a truncated file.
    """
    from .results import atomic_write

    path = Path(path)
    if path.suffix.lower() in (".pdf", ".png", ".svg"):
        path = path.with_suffix("")
    metadata = {
        "pdf": {"CreationDate": None, "ModDate": None, "Creator": _META, "Producer": _META},
        "png": {"Software": _META},
        "svg": {"Date": None, "Creator": _META},
    }
    out = []
    with paper_style():
        for fmt in formats:
            p = path.with_name(path.name + "." + fmt)
            with atomic_write(p, "wb") as f:
                fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata.get(fmt))
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


def latency_quantiles(results) -> pd.DataFrame:
    """Median and p99 (ms) per label, in the labels' order: what the latency figures mark and widgets read out.

    ``results``: anything ``latency_frame`` accepts.
    """
    df = latency_frame(results)
    g = df.groupby("label", sort=False)["latency_ms"]
    return pd.DataFrame({"median": g.median(), "p99": g.quantile(0.99)})


# ---------------------------------------------------------------- figures


def _warnings_of(results) -> list[str]:
    """The warnings of the results a figure draws (LatencyResult / to_dict() dicts / {label: result}), labelled."""
    from .timing import warning_lines

    if hasattr(results, "samples_ms") or (isinstance(results, Mapping) and "samples_ms" in results):
        return warning_lines(results)
    if isinstance(results, pd.DataFrame):
        return warning_lines(results) if "warnings" in results.attrs else []
    items = list(results.items()) if isinstance(results, Mapping) else [
        (getattr(r, "label", None) or (r.get("label") if isinstance(r, Mapping) else None) or f"#{i}", r)
        for i, r in enumerate(results)]
    return [f"{label}: {w}" for label, r in items for w in warning_lines(r if not isinstance(r, (list, tuple)) else None)]


def annotate_warnings(fig: Figure, lines: Sequence[str], max_lines: int = 4) -> None:
    """Print ``lines`` (a result's warnings) in red under the figure, so they travel with the numbers drawn.

    Placed below the axes, outside the layout; figures are saved with a tight bounding box, which includes it.
    """
    import textwrap

    lines = list(dict.fromkeys(lines))
    if not lines:
        return
    width = max(40, int(fig.get_figwidth() * 19))
    shown = ["warning: " + w for w in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append(f"(+{len(lines) - max_lines} more warnings)")
    text = "\n".join(textwrap.fill(w, width, subsequent_indent="  ") for w in shown)
    fig.text(0.0, 0.0, text, ha="left", va="top", fontsize="x-small", color="#C44E52")


def latency_distribution(results, kind: str = "violin", log: bool | None = None, title: str | None = None,
                         first_call_ms: float | None = None) -> Figure:
    """Latency distribution per label as a violin or ECDF, median and p99 marked.

    ``first_call_ms``: the very first call of a freshly built model (lazy
    initialisation, often 10-100x the rest). The violin gives it a row of its
    own, past a break of the latency axis when it is far out, and the ECDF
    names it in a corner: shown, without squashing every distribution.
    """
    df = latency_frame(results)
    q = latency_quantiles(df)
    labels = list(q.index)
    if log is None:  # a wide range (pitfalls span orders of magnitude) reads better on a log axis
        lo, hi = df["latency_ms"].min(), df["latency_ms"].max()
        log = bool(lo > 0 and hi / lo > 30)
    first = first_call_ms is not None and bool(np.isfinite(first_call_ms))
    n_rows = len(labels) + (kind == "violin" and first)
    broken = first and kind == "violin" and first_call_ms > 1.5 * float(df["latency_ms"].max())
    with paper_style():
        import seaborn as sns

        height = max(FIG_SIZE[1], 0.45 * n_rows + 0.9) if kind == "violin" else FIG_SIZE[1]
        if broken:  # a narrow second axis past a break holds the far-out first call
            fig = Figure(figsize=(COLUMN_WIDTH, height), layout="constrained")
            ax, bax = fig.subplots(1, 2, sharey=True, width_ratios=[5, 1])
        else:
            fig, ax = _figure((COLUMN_WIDTH, height))
        if kind == "violin":
            sns.violinplot(data=df, x="latency_ms", y="label", hue="label", order=labels, cut=0, inner=None,
                           density_norm="width", linewidth=0.6, ax=ax, log_scale=log, legend=False)
            y = np.arange(len(labels))
            ax.scatter(q["median"], y, marker="|", s=120, color="black", zorder=3, label="median")
            ax.scatter(q["p99"], y, marker="v", s=22, color="#C44E52", zorder=3, label="p99")
            ax.set_ylabel("")
            if first:
                where = bax if broken else ax
                where.scatter([first_call_ms], [len(labels)], marker="D", s=16, color="#C44E52", zorder=3)
                where.annotate(f"{first_call_ms:.3g} ms", (first_call_ms, len(labels)), xytext=(0, 5),
                               textcoords="offset points", ha="center", va="bottom", fontsize="x-small")
                ax.set_yticks(range(n_rows), [*labels, "first call,\nfresh model"])
            ax.set_ylim(n_rows - 0.5, -1.15)  # headroom above the first row: the legend goes there
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
        if kind == "ecdf" and first:
            off = first_call_ms > ax.get_xlim()[1]
            if not off:
                ax.axvline(first_call_ms, color="#C44E52", lw=0.8, ls="--")
            ax.text(0.98, 0.04, f"first call of the fresh model: {first_call_ms:.3g} ms{' (off scale)' if off else ''}",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small", color="#C44E52")
        if broken:
            bax.set_xlim(first_call_ms / 1.3, first_call_ms * 1.3)
            bax.set_xticks([first_call_ms], [f"{first_call_ms:.3g}"])
            bax.spines["left"].set_visible(False)
            bax.tick_params(axis="y", left=False)
            bax.grid(False, axis="y")
            for a, x in ((ax, 1.0), (bax, 0.0)):  # the break: two slashes on the latency axis
                a.plot([x], [0.0], transform=a.transAxes, marker=[(-1, -1.6), (1, 1.6)], markersize=7,
                       linestyle="none", color="black", mec="black", mew=0.8, clip_on=False)
        if kind == "violin":  # in the headroom above the first row, where it covers no data
            ax.legend(loc="upper right", ncols=2, fontsize="x-small", handletextpad=0.3, columnspacing=1.0)
        set_title(fig, title, None if broken else ax)
    annotate_warnings(fig, _warnings_of(results))
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
    10x too high are equally wrong. A mistake that does not apply (a GPU-only
    one on a CPU) keeps its row, which says why it is empty: its note ("not
    applicable on CPU"), or "n/a".
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
        for yi, good, e, r, r_lo, r_hi, note in zip(y, ok, df["error_pct"], df["ratio"], lo, hi, df["note"]):
            if not good:  # the audit's note says why a row is empty
                why = note if isinstance(note, str) and 0 < len(note) <= 40 else "n/a"
                ax.annotate(why, (1.0, yi), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize="x-small", color="gray", style="italic")
                continue
            text = f"{e:+.0f}%" if abs(e) >= 10 else f"{e:+.1f}%"
            low = r < 1 and e <= -5  # label outside the bar, on the side it points to
            ax.annotate(text, (min(r, r_lo) if low else max(r, r_hi), yi), xytext=(-4 if low else 4, 0),
                        textcoords="offset points", va="center", ha="right" if low else "left", fontsize="x-small")
        lo_all = float(min(lo[ok].min(), 1.0)) if ok.any() else 1.0
        hi_all = float(max(hi[ok].max(), 1.0)) if ok.any() else 1.0
        ax.set_xlim(lo_all / (2.5 if lo_all < 0.95 else 1.3), hi_all * 2.0)  # room for the labels
        _plain_log_ticks(ax.xaxis, *ax.get_xlim())
        set_title(fig, title, ax)
    annotate_warnings(fig, _audit_warnings(audit))
    return fig


def _audit_warnings(audit) -> list[str]:
    """An audit's warnings: its own (``attrs["warnings"]``), else those of its correct timer's result."""
    from .timing import warning_lines

    attrs = getattr(audit, "attrs", {})
    if "warnings" in attrs:
        return warning_lines(audit)
    if attrs.get("correct") is None:
        return []
    from .pitfalls import audit_warnings

    return audit_warnings(attrs["correct"])


def comparison(cmp, title: str | None = None, log: bool | None = None) -> Figure:
    """An A/B comparison (``timing.compare``): both latency distributions (ECDF), and the ratio B/A with its CI.

    The lower panel shades the equivalence band (+-margin) around 1; the verdict is
    the title of that panel. ``cmp``: a ``Comparison`` or its ``to_dict()``.
    """
    import seaborn as sns

    from .timing import Comparison

    if isinstance(cmp, Mapping):
        cmp = Comparison.from_dict(cmp)
    labels = [f"A: {cmp.label_a}", f"B: {cmp.label_b}"]
    df = latency_frame({labels[0]: cmp.a.samples_ms, labels[1]: cmp.b.samples_ms})
    if log is None:
        lo, hi = df["latency_ms"].min(), df["latency_ms"].max()
        log = bool(lo > 0 and hi / lo > 30)
    ratio, (r_lo, r_hi) = cmp.ratio, cmp.ci
    band_lo, band_hi = cmp.band
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH, 3.3), layout="constrained")
        ax, rax = fig.subplots(2, 1, height_ratios=[2.3, 1])
        colors = sns.color_palette("colorblind", 2)
        sns.ecdfplot(data=df, x="latency_ms", hue="label", hue_order=labels, palette=colors, ax=ax, log_scale=log)
        for res, color in zip((cmp.a, cmp.b), colors):
            ax.plot([res.median_ms], [0.5], "o", ms=3.5, color=color)
        ax.axhline(0.5, lw=0.5, ls=":", color="gray")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of samples")
        if log:
            _plain_log_ticks(ax.xaxis, float(df["latency_ms"].min()), float(df["latency_ms"].max()))
        legend = ax.get_legend()
        if legend is not None:
            legend.set_title(None)
        if title:
            ax.set_title(title)
        color = {"faster": "#55A868", "slower": "#C44E52", "same": "#4C72B0"}.get(cmp.verdict, "gray")
        rax.axvspan(band_lo, band_hi, color="#4C72B0", alpha=0.12, lw=0, label=f"+-{100 * cmp.margin:g}%")
        rax.axvline(1.0, color="black", lw=0.8)
        if np.isfinite(ratio):
            rax.errorbar([ratio], [0], xerr=[[max(ratio - r_lo, 0)], [max(r_hi - ratio, 0)]], fmt="o", ms=4,
                         color=color, ecolor=color, elinewidth=1.5, capsize=3)
            rax.annotate(f"{ratio:.3f} [{r_lo:.3f}, {r_hi:.3f}]", (ratio, 0), xytext=(0, 6),
                         textcoords="offset points", ha="center", fontsize="x-small")
        finite = [v for v in (r_lo, r_hi, band_lo, band_hi) if np.isfinite(v)]
        span = max(finite) - min(finite)
        rax.set_xlim(min(finite) - 0.25 * span, max(finite) + 0.25 * span)
        rax.set_ylim(-1, 1.2)
        rax.set_yticks([])
        rax.grid(False, axis="y")
        rax.set_xlabel(f"B / A latency ({100 * cmp.confidence:g}% CI)")
        verdict = {"faster": f"{cmp.label_b} is faster than {cmp.label_a}",
                   "slower": f"{cmp.label_b} is slower than {cmp.label_a}",
                   "same": f"same within +-{100 * cmp.margin:g}%"}.get(cmp.verdict, "inconclusive: measure more")
        rax.set_title(f"verdict: {verdict}", fontsize="small", color=color)
        rax.legend(loc="lower left", fontsize="x-small")
    annotate_warnings(fig, cmp.warnings)
    return fig


def timer_agreement(frame, band: float = 0.03, timer: str = "measure_latency", reference: str = "do_bench",
                    title: str | None = None) -> Figure:
    """Does a timer agree with a reference timer? The relative difference of their medians per workload (dots).

    ``frame``: columns ``label`` (or ``workload``) and ``difference``
    ((timer - reference) / reference), optional ``low``/``high``: the range
    over repeated rounds, drawn as a bar. The band +-``band`` is shaded; a dot
    inside it agrees. Differences, not absolute times: workloads of 0.05 ms
    and of 8 ms are compared on one linear axis.
    """
    df = pd.DataFrame(frame).dropna(subset=["difference"]).reset_index(drop=True)
    labels = df["label"] if "label" in df.columns else df["workload"]
    d = 100.0 * df["difference"].astype(float)
    lo = 100.0 * (df["low"] if "low" in df.columns else df["difference"]).astype(float)
    hi = 100.0 * (df["high"] if "high" in df.columns else df["difference"]).astype(float)
    y = np.arange(len(df))
    with paper_style():
        fig, ax = _figure((COLUMN_WIDTH, max(FIG_SIZE[1], 0.3 * len(df) + 1.4)))
        ax.axvspan(-100 * band, 100 * band, color="#55A868", alpha=0.15, lw=0, label=f"within +-{100 * band:g}%")
        ax.axvline(0.0, color="black", lw=0.8)
        if (hi - lo).abs().max() > 0:
            ax.hlines(y, lo, hi, color="gray", lw=2.0, alpha=0.6, label="range over the rounds")
        inside = d.abs() <= 100 * band
        ax.scatter(d, y, s=22, zorder=3, color=np.where(inside, "#4C72B0", "#C44E52"), label="median of the rounds")
        for yi, v, h in zip(y, d, hi):
            ax.annotate(f"{v:+.1f}%", (max(v, h), yi), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize="x-small")
        ax.set_yticks(y, labels)
        ax.set_ylim(len(df) - 0.5, -0.5)
        span = float(max(lo.abs().max(), hi.abs().max(), 100 * band)) if len(df) else 100 * band
        ax.set_xlim(-1.3 * span, 1.6 * span)  # room on the right for the labels
        ax.set_xlabel(f"{timer} vs {reference}:\ndifference of the medians (%)")
        ax.grid(False, axis="y")
        fig.legend(loc="outside lower center", ncols=3, fontsize="x-small", handlelength=1.2, columnspacing=1.0)
        set_title(fig, title, ax)
    return fig


def throughput_curve(curve, largest: int | None = None, optimal: int | None = None, selected: int | None = None,
                     title: str | None = None) -> Figure:
    """Throughput (samples/s) vs batch size; the largest batch that fits and the optimal one marked.

    ``curve``: frame with ``batch_size`` and ``throughput`` (samples/s; also
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
        if len(df):
            _plain_base2_ticks(ax.xaxis, float(df["batch_size"].min()), float(df["batch_size"].max()))
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (samples/s)")
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
        set_title(fig, title, ax)
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


def _plain_base2_ticks(axis, lo: float | None = None, hi: float | None = None) -> None:
    """A log2 batch-size axis labelled in plain numbers (1, 4, 16, ... not 2^k), at most about six labels."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if lo is None or hi is None:
        lo, hi = axis.get_view_interval()
    octaves = math.log2(max(hi, 2.0) / max(lo, 1.0)) if hi > 0 else 1.0
    step = max(2, math.ceil(octaves / 6))  # octaves between labels
    axis.set_major_locator(LogLocator(base=2.0 ** step, numticks=20))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def throughput_curves(frame, title: str | None = None) -> Figure:
    """Throughput (samples/s) vs batch size for several cases: one panel per model, one line per dtype.

    ``frame``: long, one row per measured point: ``model``, ``dtype``,
    ``batch_size``, ``throughput`` (samples/s), optional ``ci95_low``/``ci95_high``,
    ``largest`` (the largest batch that fits) and ``optimal`` (the optimal
    batch), e.g. ``toolkit.recorded.recorded_throughput_cases``. The optimal
    batch is a star, the largest that fits an open square, on each line.
    """
    from matplotlib.lines import Line2D

    df = pd.DataFrame(frame).dropna(subset=["throughput"])
    models = list(dict.fromkeys(df["model"]))
    dtypes = list(dict.fromkeys(df["dtype"]))
    with paper_style():
        import seaborn as sns

        colors = dict(zip(dtypes, sns.color_palette("colorblind", len(dtypes))))
        styles = dict(zip(dtypes, [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")] * 3))
        width = COLUMN_WIDTH if len(models) == 1 else min(7.0, COLUMN_WIDTH * len(models))
        fig, axes = _figure((width, FIG_SIZE[1] + 0.3), ncols=max(len(models), 1))
        axes = np.atleast_1d(axes)
        for ax, model in zip(axes, models):
            for dtype in dtypes:
                g = df[(df["model"] == model) & (df["dtype"] == dtype)].sort_values("batch_size")
                if not len(g):
                    continue
                c, (marker, ls) = colors[dtype], styles[dtype]
                ax.plot(g["batch_size"], g["throughput"], marker=marker, ls=ls, ms=2.5, lw=1.0, color=c,
                        label=str(dtype))
                if {"ci95_low", "ci95_high"} <= set(g.columns) and g["ci95_low"].notna().any():
                    err = [(g["throughput"] - g["ci95_low"]).clip(lower=0).fillna(0),
                           (g["ci95_high"] - g["throughput"]).clip(lower=0).fillna(0).replace(np.inf, 0)]
                    ax.errorbar(g["batch_size"], g["throughput"], yerr=err, fmt="none", ecolor=c, elinewidth=0.6,
                                capsize=1.5)
                tp = dict(zip(g["batch_size"], g["throughput"]))
                for col, mark in (("largest", dict(marker="s", ms=6, mfc="none", mec=c, mew=1.1)),
                                  ("optimal", dict(marker="*", ms=9, color=c, mec="black", mew=0.4))):
                    b = g[col].dropna().iloc[0] if col in g.columns and g[col].notna().any() else None
                    if b is not None and b in tp:
                        ax.plot([b], [tp[b]], ls="none", zorder=4, **mark)
            ax.set_xscale("log", base=2)
            _plain_base2_ticks(ax.xaxis, float(df["batch_size"].min()), float(df["batch_size"].max()))
            ax.set_ylim(bottom=0)
            ax.set_xlabel("batch size")
            ax.set_title(str(model), fontsize="small")
        axes[0].set_ylabel("throughput (samples/s)")
        handles = [Line2D([], [], color=colors[d], marker=styles[d][0], ls=styles[d][1], ms=3, label=str(d))
                   for d in dtypes]
        handles += [Line2D([], [], ls="none", marker="*", ms=8, color="gray", mec="black", mew=0.4,
                           label="optimal batch"),
                    Line2D([], [], ls="none", marker="s", ms=5, mfc="none", mec="gray", label="largest that fits")]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="x-small",
                   handlelength=1.8, columnspacing=1.2)
        set_title(fig, title)
    return fig


def cpu_kernel_rates(frame, title: str | None = None) -> Figure:
    """One CPU expert's weight read rate (GB/s) against its token count, one line per matmul.

    ``frame``: ``toolkit.recorded.recorded_cpu_gemv`` (``tokens``, ``side``, ``gbs``, optional
    ``gbs_low``/``gbs_high``: the rounds' range, drawn as error bars). Its ``attrs`` give the
    references, drawn as horizontal lines: ``host_read_gbs`` (the CPU threads summing a large
    buffer) and ``float32_gbs`` (the expert with float32 weights, twice the bytes, torch's matmul).
    """
    df = pd.DataFrame(frame).dropna(subset=["gbs"])
    sides = list(dict.fromkeys(df["side"]))
    with paper_style():
        import seaborn as sns

        colors = dict(zip(sides, sns.color_palette("colorblind", len(sides))))
        fig, ax = _figure()
        for side, marker in zip(sides, ("o", "s", "^", "D")):
            g = df[df["side"] == side].sort_values("tokens")
            ax.plot(g["tokens"], g["gbs"], marker=marker, ms=3, lw=1.0, color=colors[side], label=side)
            if {"gbs_low", "gbs_high"} <= set(g.columns) and g["gbs_low"].notna().any():
                err = [(g["gbs"] - g["gbs_low"]).clip(lower=0).fillna(0),
                       (g["gbs_high"] - g["gbs"]).clip(lower=0).fillna(0)]
                ax.errorbar(g["tokens"], g["gbs"], yerr=err, fmt="none", ecolor=colors[side], elinewidth=0.6,
                            capsize=1.5)
        refs = frame.attrs if hasattr(frame, "attrs") else {}
        for key, label, ls in (("host_read_gbs", "host read, same threads", "--"),
                               ("float32_gbs", "float32 weights (torch, 1 token)", ":")):
            if refs.get(key):
                ax.axhline(refs[key], color="0.4", ls=ls, lw=0.8, label=f"{label}: {refs[key]:.0f}")
        ax.set_xscale("log", base=2)
        _plain_base2_ticks(ax.xaxis, float(df["tokens"].min()), float(df["tokens"].max()))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("tokens in the pass (rows of x)")
        ax.set_ylabel("expert weights read (GB/s)")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="x-small",
                   handlelength=1.8, columnspacing=1.2)
        set_title(fig, title)
    return fig


def host_segments(frame, title: str | None = None, xlabel: str = "ms per step (mean, median round)") -> Figure:
    """Where each configuration's step went: one horizontal bar per (routing, schedule), stacked by segment.

    ``frame``: ``toolkit.recorded.recorded_decode_timeline`` (``routing``, ``schedule``, ``segment``, ``ms``;
    segments in step order).
    """
    df = pd.DataFrame(frame)
    segments = list(dict.fromkeys(df["segment"]))
    configs = list(dict.fromkeys(zip(df["routing"], df["schedule"])))
    with paper_style():
        import seaborn as sns

        colors = dict(zip(segments, sns.color_palette("colorblind", len(segments))))
        fig, ax = _figure(figsize=(1.6 * FIG_SIZE[0], max(2.2, 0.3 * len(configs) + 1.8)))
        for y, (routing, schedule) in enumerate(configs):
            g = df[(df["routing"] == routing) & (df["schedule"] == schedule)]
            left = 0.0
            for seg in segments:
                ms = float(g.loc[g["segment"] == seg, "ms"].sum())
                ax.barh(y, ms, left=left, color=colors[seg], edgecolor="white", lw=0.4, label=seg if y == 0 else None)
                left += ms
        ax.set_yticks(range(len(configs)), [f"{r}, {s}" for r, s in configs], fontsize="x-small")
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize="small")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize="x-small", handlelength=1.2)
        set_title(fig, title)
    return fig


def hit_rate_vs_gpu_experts(frame, phase: str | None = None, total_experts: int | None = None,
                            title: str | None = None, reference: str | None = None, bound: str = "belady") -> Figure:
    """Hit rate vs number of GPU-resident experts, one line per policy; below, each policy minus ``reference``.

    ``frame``: columns ``policy``, ``gpu_experts``, ``hit_rate`` (optional
    ``phase``: filtered to ``phase`` when given), or ``toolkit.moe.simulate.Sweep``'s
    frame, whose ``hit_rate_<phase>`` column is used for ``phase``.
    Realistic policies lie within a few points of each other, on top of each
    other at this scale: the lower panel shows their difference to
    ``reference`` (default: static-popularity when present, else the first
    policy) in percentage points. ``bound`` (Belady's, which knows the future)
    is far above them and only drawn in the upper panel.
    """
    df = pd.DataFrame(frame.to_dataframe() if hasattr(frame, "to_dataframe") else frame)
    if phase is not None and "phase" in df.columns:
        df = df[df["phase"] == phase]
    elif phase is not None and f"hit_rate_{phase}" in df.columns:
        df = df.assign(hit_rate=df[f"hit_rate_{phase}"])
    policies = list(dict.fromkeys(df["policy"]))
    if reference is None:
        reference = "static-popularity" if "static-popularity" in policies else (policies[0] if policies else None)
    compared = [p for p in policies if p not in (reference, bound)]
    table = df.pivot_table(index="gpu_experts", columns="policy", values="hit_rate", sort=True)
    xlabel = "GPU-resident experts" + (f" (of {total_experts})" if total_experts else "")
    with paper_style():
        import seaborn as sns

        colors = dict(zip(policies, sns.color_palette("colorblind", len(policies))))
        markers = dict(zip(policies, ("o", "s", "^", "D", "v", "P", "X", "<", ">") * 2))
        dashes = dict(zip(policies, ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))) * 3))
        two = reference in table.columns and bool(compared)
        if two:
            fig = Figure(figsize=(COLUMN_WIDTH, 3.7), layout="constrained")
            ax, dax = fig.subplots(2, 1, sharex=True, height_ratios=[2.0, 1.1])
        else:
            fig, ax = _figure()
            dax = None
        for p in policies:
            ax.plot(table.index, table[p], marker=markers[p], ls=dashes[p], color=colors[p], ms=3.5, lw=1.1, label=p)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"{phase} hit rate" if phase else "hit rate")
        ax.legend(fontsize="x-small", title=None, loc="lower right", handlelength=2.6)
        if dax is None:
            ax.set_xlabel(xlabel)
        else:
            dax.axhline(0.0, color=colors[reference], lw=1.0, ls=dashes[reference])
            for p in compared:
                dax.plot(table.index, 100 * (table[p] - table[reference]), marker=markers[p], ls=dashes[p],
                         color=colors[p], ms=3.5, lw=1.1)
            dax.set_ylabel(f"vs {reference}\n(percentage points)", fontsize="x-small")
            dax.set_xlabel(xlabel)
            if bound in table.columns:
                lo_, hi_ = dax.get_ylim()
                dax.set_ylim(lo_, hi_ + 0.35 * (hi_ - lo_))  # headroom for the note
                dax.text(0.99, 0.97, f"{bound} (the bound): far above, not drawn here", transform=dax.transAxes,
                         fontsize="x-small", color="gray", ha="right", va="top")
        set_title(fig, title, ax)
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
        set_title(fig, title)
    return fig


def scheme_comparison(frame, value: str = "tokens_per_s", label: str = "decode tokens/s",
                      title: str | None = None) -> Figure:
    """Offload schemes side by side (bars on a linear axis, one panel per routing), each run's roofline bound (|).

    ``frame``: columns ``scheme``, ``routing``, ``value`` (default ``tokens_per_s``), optional
    ``bound_<value>``: the best the hardware allows for what that run read; optional ``anomalous`` /
    ``anomaly_reason`` (``toolkit.recorded.flag_anomalies``). An anomalous run is never drawn: "excluded"
    stands in its place and a note under the figure says why. A bound far past every measurement (every
    expert on the GPU: no host traffic) is written after its run's value instead of stretching the axis.
    """
    df = pd.DataFrame(frame).reset_index(drop=True)
    odd = df["anomalous"].fillna(False).astype(bool) if "anomalous" in df.columns else pd.Series(False, df.index)
    bcol = f"bound_{value}"
    routings = list(dict.fromkeys(df["routing"])) or [""]
    schemes = list(dict.fromkeys(df["scheme"]))
    shown = df.loc[~odd, value].astype(float)
    top = float(shown.max()) if len(shown) and shown.notna().any() else 1.0
    bounds = df.loc[~odd, bcol].astype(float) if bcol in df.columns else pd.Series(dtype=float)
    near = bounds[bounds <= 2.0 * top]  # bounds close to the measurements set the axis; the rest are written
    far = bool((bounds > 2.0 * top).any())  # room after the value for "(bound N)"
    xmax = (2.3 if far else 1.18) * max(top, float(near.max()) if len(near) else 0.0)  # far: room for "(bound N)"
    notes = [f"excluded {s}, {r} routing: {why}" if r else f"excluded {s}: {why}"
             for s, r, why in zip(df["scheme"][odd], df["routing"][odd],
                                  df["anomaly_reason"][odd] if "anomaly_reason" in df.columns else [""] * odd.sum())]
    with paper_style():
        fig, axes = _figure((COLUMN_WIDTH * (1 if len(routings) == 1 else 2),
                             max(FIG_SIZE[1], 0.3 * len(schemes) + 1.3)), ncols=len(routings), sharey=True,
                            sharex=True)
        axes = np.atleast_1d(axes)
        for ax, routing in zip(axes, routings):
            sub = df[df["routing"] == routing].copy()
            sub["_odd"] = odd[sub.index]
            sub = sub.set_index("scheme").reindex(schemes)
            y = np.arange(len(schemes))
            vals = sub[value].astype(float).where(~sub["_odd"].fillna(False).astype(bool))
            ax.barh(y, vals.fillna(0.0), color="#4C72B0", alpha=0.85, label="measured")
            b = (sub[bcol].astype(float).where(~sub["_odd"].fillna(False).astype(bool)) if bcol in sub.columns
                 else pd.Series(np.nan, sub.index))
            inside = b <= xmax
            for yi, v, excluded, bv, ins in zip(y, vals, sub["_odd"].fillna(False).astype(bool), b, inside):
                if excluded:
                    ax.text(0.01 * xmax, yi, "excluded: anomalous run", va="center", fontsize="x-small",
                            color="#C44E52", style="italic")
                elif np.isfinite(v):  # the value right of its bar and of its bound tick, whichever ends later;
                    far_bound = np.isfinite(bv) and not ins  # a bound off the axis is written after the value
                    ax.annotate(f"{v:.3g}" + (f" (bound {bv:.0f})" if far_bound else ""),
                                (max(v, bv) if ins else v, yi), xytext=(4, 0), textcoords="offset points",
                                va="center", fontsize="x-small")
            if bcol in sub.columns:
                ax.scatter(b[inside], y[inside.to_numpy()], marker="|", s=160, color="#C44E52", zorder=3,
                           label="roofline bound")
            ax.set_yticks(y, schemes)
            ax.set_ylim(len(schemes) - 0.5, -0.5)
            ax.set_xlim(0, xmax)
            if len(axes) == 1:
                ax.set_xlabel(label)
            ax.grid(False, axis="y")
            ax.set_title(f"{routing} routing" if routing else None, fontsize="small")
        if len(axes) > 1:  # one label for the shared axis: a long one per panel would run into the next
            fig.supxlabel(label, fontsize="medium")
        # right of the panels, clear of bars, bound ticks and "excluded" notes; warnings go under the figure
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="x-small", frameon=False)
        set_title(fig, title)
    annotate_warnings(fig, notes)
    return fig


def paired_ways(frame, value: str = "tokens_per_s", label: str = "decode tokens/s",
                title: str | None = None) -> Figure:
    """Two or more ways of running each target side by side, one panel (with its own axis) per target: a bar
    at the rounds' median, a dot per round, and the ratio of each way to the panel's first way.

    ``frame``: columns ``target``, ``way``, ``value``, ``rounds`` (a list per row), optional ``anomalous`` /
    ``anomaly_reason``: an anomalous way is never drawn; "excluded" stands in its place and a note under the
    figure says why (its ratio is not given either).
    """
    df = pd.DataFrame(frame).reset_index(drop=True)
    odd = df["anomalous"].fillna(False).astype(bool) if "anomalous" in df.columns else pd.Series(False, df.index)
    targets = list(dict.fromkeys(df["target"]))
    ways = list(dict.fromkeys(df["way"]))
    notes = [f"excluded {t}, {w}: {why}" for t, w, why in
             zip(df["target"][odd], df["way"][odd], df["anomaly_reason"][odd] if "anomaly_reason" in df.columns
                 else [""] * int(odd.sum()))]
    with paper_style():
        fig, axes = _figure((COLUMN_WIDTH * 2, 0.35 * len(ways) * len(targets) + 1.6), ncols=1)
        fig.clear()
        axes = fig.subplots(len(targets), 1, sharex=False, squeeze=False)[:, 0]
        for ax, target in zip(axes, targets):
            sub = df.assign(_odd=odd)[df["target"] == target].set_index("way").reindex(ways)
            sub_odd = sub["_odd"].fillna(False).astype(bool).to_numpy()
            shown = sub[value].astype(float).where(~pd.Series(sub_odd, sub.index))
            top = float(np.nanmax([*shown.to_numpy(), *(x for r in sub["rounds"].dropna() for x in r)] or [1.0]))
            y = np.arange(len(ways))
            ax.barh(y, shown.fillna(0.0), color="#4C72B0", alpha=0.85, height=0.6)
            first = shown.iloc[0]
            for yi, (_, row), bad in zip(y, sub.iterrows(), sub_odd):
                if bad:
                    ax.text(0.01 * top, yi, "excluded: its rounds disagree", va="center", fontsize="x-small",
                            color="#C44E52", style="italic")
                    continue
                rounds = row["rounds"] if isinstance(row["rounds"], list | tuple) else []
                ax.scatter(rounds, [yi] * len(rounds), s=10, color="black", zorder=3)
                text = f"{row[value]:.3g}"
                if yi and np.isfinite(first) and first > 0:
                    text += f"  (x{row[value] / first:.2f})"
                ax.annotate(text, (max([row[value], *rounds]), yi), xytext=(4, 0), textcoords="offset points",
                            va="center", fontsize="x-small")
            ax.set_yticks(y, ways)
            ax.set_ylim(len(ways) - 0.5, -0.5)
            ax.set_xlim(0, 1.35 * top)
            ax.set_title(target, fontsize="small", loc="left")
            ax.grid(False, axis="y")
        axes[-1].set_xlabel(label)
        set_title(fig, title)
    annotate_warnings(fig, notes)
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
        set_title(fig, title, ax)
    return fig


def expert_heatmap(activations, resident=None, setup: str | None = None, annotate: bool | None = None) -> Figure:
    """Where routed tokens go: each expert's share of its layer's activations [L, E], GPU-resident experts outlined.

    ``activations``: [L, E] counts (tokens routed to each expert), ``resident``:
    [L, E] bool, the experts on the GPU. With a static placement a per-expert
    hit rate is 1 on every resident expert and 0 elsewhere: it shows the
    placement, not how much traffic the placement catches. The routed share
    shows both: the hit rate is the share summed over the outlined cells.
    Grey: never routed; outlined grey: on the GPU but never routed. The title
    counts the outlined cells and gives the hit rate they make, from the
    arrays drawn; ``setup`` (model, dtype, device) is a second title line.
    """
    from matplotlib.patches import Rectangle

    act = np.asarray(activations, dtype=float)
    if act.ndim == 1:
        act = act[None, :]
    n_layers, n_experts = act.shape
    res = np.zeros_like(act, dtype=bool) if resident is None else np.asarray(resident, dtype=bool)
    if res.shape != act.shape:
        raise ValueError(f"resident has shape {res.shape}, activations {act.shape}")
    per_layer = act.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(act > 0, act / np.maximum(per_layer, 1), np.nan)  # [L, E]
    if annotate is None:
        annotate = n_layers * n_experts <= 64
    hit = float(act[res].sum() / act.sum()) if act.sum() > 0 else float("nan")
    title = (f"{int(res.sum())} of {res.size} experts on the GPU (outlined): "
             f"{'n/a' if not np.isfinite(hit) else f'{hit:.0%}'} of routed tokens"
             + (f"\n{setup}" if setup else ""))
    edge = "#DD8452"
    with paper_style():
        w = min(7.0, max(COLUMN_WIDTH, 0.3 * n_experts + 1.8))
        h = min(6.0, max(1.6, 0.25 * n_layers + 1.5))
        fig, ax = _figure((w, h))
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#D9D9D9")
        vmax = float(np.nanmax(share)) if np.isfinite(share).any() else 1.0
        im = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="share of the layer's\nrouted tokens", fraction=0.05, pad=0.02)
        for i, j in zip(*np.nonzero(res)):
            ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor=edge, lw=1.6))
        if annotate:
            for (i, j), v in np.ndenumerate(share):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if v > 0.6 * vmax else "black")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        if n_experts <= 16:
            ax.set_xticks(range(n_experts))
        if n_layers <= 16:
            ax.set_yticks(range(n_layers))
        handles = [Patch(facecolor="none", edgecolor=edge, lw=1.6, label="on the GPU"),
                   Patch(facecolor="#D9D9D9", edgecolor="none", label="never routed")]
        idle = int((res & ~(act > 0)).sum())
        if idle:
            handles.append(Patch(facecolor="#D9D9D9", edgecolor=edge, lw=1.6,
                                 label=f"on the GPU, never routed ({idle})"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="x-small")
        set_title(fig, title, ax)
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
        # under the axes: noisy series leave no free corner inside
        fig.legend(fontsize="x-small", loc="outside lower center", ncols=1 if len(series) > 2 else len(series))
        set_title(fig, title, ax)
    return fig


def _span_kind(name: str) -> str:
    base = str(name).split("[", 1)[0]
    return base if base in _SPAN_COLORS else "other"


def _lane_name(row: str, lane: int, n: int, kinds: set | None = None) -> str:
    if n == 1:
        return row
    if row == "CPU":  # lane 0 runs the steps; others are worker threads (the engine's CPU experts)
        return "CPU main thread" if lane == 0 else f"CPU worker thread {lane}" if n > 2 else "CPU worker thread"
    if kinds and kinds <= {"h2d", "d2h", "d2d", "memset"}:
        return "GPU copy stream"
    return "GPU compute stream" if kinds else f"{row} stream {lane}"



def _merged_spans(starts, ends, min_width: float) -> list[tuple[float, float]]:
    """(start, width) bars: spans closer than ``min_width`` merged, each at least ``min_width`` wide.

    A decode step's GPU kernels last microseconds in a window of tens of
    milliseconds: drawn as they are, they would be invisible hairlines.
    """
    bars: list[list[float]] = []
    for s, e in sorted(zip(starts, ends)):
        if bars and s - bars[-1][1] <= min_width:
            bars[-1][1] = max(bars[-1][1], e)
        else:
            bars.append([s, e])
    return [(s, max(e - s, min_width)) for s, e in bars]


def timeline_gantt(timeline: pd.DataFrame, step: int | None = 0, title: str | None = None,
                   max_ms: float | None = None, min_width: float = 0.004) -> Figure:
    """CPU/GPU Gantt chart of one MoE decode step from ``ProfileResult.timeline()``.

    ``timeline``: columns row ('CPU'|'GPU'), name, start_ms, end_ms, layer
    (optional ``lane``: host thread or GPU stream, one bar row each; optional
    ``kind``: a GPU lane of copies only is the copy stream; optional
    ``step``: only that profiled step is drawn, None = all). Times are
    shifted to start at 0. Spans are coloured by profiler label (attention,
    routing, experts on the GPU, on the CPU, weight copies); overlap of the
    CPU and GPU rows is the point of Fiddler-style offloading. Spans shorter
    than ``min_width`` of the window are widened to it (and merged with their
    neighbours), so microsecond kernels stay visible. Each layer's start is
    marked along the top.
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
    kinds = {key: set(g["kind"].dropna()) for key, g in df.groupby(["row", "lane"])} if "kind" in df.columns else {}
    rows = [_lane_name(r, lane, n_lanes[r], kinds.get((r, lane))) for r, lane in lanes]
    width = min_width * (float(df["end_ms"].max()) if len(df) else 1.0)
    with paper_style():
        fig, ax = _figure((min(7.0, 2 * COLUMN_WIDTH), 0.45 * max(len(rows), 1) + 1.3))
        for i, (row, lane) in enumerate(lanes):
            sub = df[(df["row"] == row) & (df["lane"] == lane)]
            for span, g in sub.groupby("_span", sort=True):
                spans = _merged_spans(g["start_ms"], g["end_ms"], width)
                ax.broken_barh(spans, (i - 0.38, 0.76), facecolors=_SPAN_COLORS[span], edgecolor="white",
                               linewidth=0.2)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel("time since the step started (ms)")
        ax.grid(axis="y", visible=False)
        if "layer" in df.columns and df["layer"].notna().any():
            starts = df.dropna(subset=["layer"]).groupby("layer")["start_ms"].min().sort_index()
            for layer, x in starts.items():
                if x > 0:
                    ax.axvline(x, color="gray", lw=0.6, ls=":", zorder=0)
                ax.text(x, 1.0, f" layer {int(layer)}", transform=ax.get_xaxis_transform(), ha="left",
                        va="bottom", fontsize="x-small", color="dimgray")
        present = [k for k in _SPAN_COLORS if k in set(df["_span"])]
        handles = [Patch(color=_SPAN_COLORS[k], label=SPAN_LABELS.get(k, k)) for k in present]
        if handles:
            fig.legend(handles=handles, fontsize="x-small", ncols=min(len(handles), 3), loc="outside lower center")
        set_title(fig, title)
    return fig


# ---------------------------------------------------------------- sweeps


def sweep_lines(frame, x: str, y: str, hue: str | None = None, where: Mapping | None = None, logx: bool = False,
                ylabel: str | None = None, title: str | None = None) -> Figure:
    """A sweep's metric ``y`` against its axis ``x``, one line per value of the axis ``hue``.

    ``frame``: ``toolkit.sweep.load_sweep(out_dir)``; only finished points are
    drawn. Every other axis that varies must be pinned with ``where``
    ({axis: value}), so that each line is one curve and not an average that
    hides an axis. A non-numeric ``x`` (model names, 'auto') is drawn as
    categories in grid order.
    """
    from .errors import ToolkitError

    df = pd.DataFrame(frame)
    for k, v in (where or {}).items():
        if k not in df.columns:
            raise ToolkitError(f"where: {k!r} is not a column of the sweep frame")
        df = df[df[k] == v]
    for col in (x, y, hue):
        if col is not None and col not in df.columns:
            raise ToolkitError(f"{col!r} is not a column of the sweep frame; columns: {', '.join(df.columns)}")
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    axes = list(getattr(frame, "attrs", {}).get("axes") or [])
    free = [a for a in axes if a not in (x, hue, *(where or {})) and a in df.columns and df[a].nunique() > 1]
    if free:
        raise ToolkitError(f"axes {', '.join(free)} also vary: pin them with where={{...}} or use one as hue")
    numeric = pd.api.types.is_numeric_dtype(df[x])
    order = list(dict.fromkeys(df[x]))  # grid order
    groups = list(df.groupby(hue, sort=False)) if hue else [(None, df)]
    with paper_style():
        fig, ax = _figure()
        for value, g in groups:
            g = g.sort_values(x) if numeric else g.assign(_pos=g[x].map(order.index)).sort_values("_pos")
            xs = g[x].astype(float) if numeric else g["_pos"]
            ax.plot(xs, g[y].astype(float), "o-", ms=3, label=None if hue is None else f"{value}")
        if not numeric:
            ax.set_xticks(range(len(order)), [str(v) for v in order])
        if logx and numeric:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(ylabel or y.replace("_", " "))
        if hue:
            ax.legend(fontsize="x-small", title=hue.replace("_", " "), title_fontsize="x-small")
        if title:
            ax.set_title(title)
    return fig
