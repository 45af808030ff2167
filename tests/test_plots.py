"""Figures: paper style, reproducible PDF bytes, and what each figure marks."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from toolkit import plots


def _samples():
    rng = np.random.default_rng(0)
    return {"correct": rng.lognormal(0.0, 0.1, 101), "no warm-up": rng.lognormal(0.5, 0.4, 101)}


def test_paper_style_uses_truetype_and_paper_context():
    import matplotlib
    import seaborn as sns

    rc = plots.paper_rc()
    assert rc["pdf.fonttype"] == 42 and rc["ps.fonttype"] == 42
    assert rc["font.size"] == sns.plotting_context("paper")["font.size"]
    with plots.paper_style():
        assert matplotlib.rcParams["pdf.fonttype"] == 42


def test_save_writes_pdf_and_png_with_the_same_bytes_for_the_same_data(tmp_path):
    paths_a = plots.save(plots.latency_distribution(_samples()), tmp_path / "a" / "fig.pdf")
    paths_b = plots.save(plots.latency_distribution(_samples()), tmp_path / "b" / "fig")
    assert [p.name for p in paths_a] == ["fig.pdf", "fig.png"]
    for pa, pb in zip(paths_a, paths_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    pdf = paths_a[0].read_bytes()
    assert b"CreationDate" not in pdf
    assert b"/Creator (toolkit)" in pdf and b"/Producer (toolkit)" in pdf
    assert b"FontFile2" in pdf and b"Type3" not in pdf  # TrueType embedded, no Type 3 bitmaps
    assert paths_a[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pdf_bytes_are_the_same_in_a_fresh_process(tmp_path):
    curve = {1: 10.0, 2: 19.0, 4: 30.0}
    plots.save(plots.throughput_curve(curve), tmp_path / "here" / "t", formats=("pdf",))
    code = (f"from toolkit import plots; plots.save(plots.throughput_curve({curve!r}), "
            f"{str(tmp_path / 'fresh' / 't')!r}, formats=('pdf',))")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MPLBACKEND": "Agg"})
    assert (tmp_path / "here" / "t.pdf").read_bytes() == (tmp_path / "fresh" / "t.pdf").read_bytes()


def test_latency_frame_accepts_results_mappings_and_frames():
    r = SimpleNamespace(samples_ms=(1.0, 2.0, 3.0), label="timer")
    assert plots.latency_frame(r)["label"].tolist() == ["timer"] * 3
    df = plots.latency_frame({"a": [1.0, 2.0], "b": {"samples_ms": [3.0]}})
    assert df.to_dict("list") == {"label": ["a", "a", "b"], "latency_ms": [1.0, 2.0, 3.0]}
    unlabelled = plots.latency_frame([SimpleNamespace(samples_ms=(1.0,), label=None)])
    assert unlabelled["label"].tolist() == ["#0"]
    with pytest.raises(ValueError, match="latency_ms"):
        plots.latency_frame(pd.DataFrame({"x": [1]}))


def test_latency_quantiles_are_per_label_in_order():
    q = plots.latency_quantiles({"slow": np.arange(1.0, 101.0), "fast": [0.5, 0.5, 1.5]})
    assert list(q.index) == ["slow", "fast"] and list(q.columns) == ["median", "p99"]
    assert q.loc["slow", "median"] == pytest.approx(50.5) and q.loc["fast", "median"] == 0.5
    assert q.loc["slow", "p99"] == pytest.approx(np.quantile(np.arange(1.0, 101.0), 0.99))


def test_violin_marks_median_and_p99():
    s = _samples()
    fig = plots.latency_distribution(s, kind="violin")
    ax = fig.axes[0]
    marks = {c.get_label(): c.get_offsets()[:, 0] for c in ax.collections if c.get_label() in ("median", "p99")}
    np.testing.assert_allclose(marks["median"], [np.median(v) for v in s.values()])
    np.testing.assert_allclose(marks["p99"], [np.quantile(v, 0.99) for v in s.values()])
    assert [t.get_text() for t in ax.get_yticklabels()] == list(s)


def test_ecdf_marks_median_at_half_and_p99_at_099():
    s = {"only": np.arange(1.0, 101.0)}
    ax = plots.latency_distribution(s, kind="ecdf", log=False).axes[0]
    points = {(line.get_marker(), float(line.get_ydata()[0])): float(line.get_xdata()[0])
              for line in ax.lines if line.get_marker() in ("o", "v")}
    assert points[("o", 0.5)] == pytest.approx(50.5)
    assert points[("v", 0.99)] == pytest.approx(np.quantile(s["only"], 0.99))
    with pytest.raises(ValueError, match="kind"):
        plots.latency_distribution(s, kind="box")


def test_pitfall_frame_measures_error_against_the_reference_row():
    audit = pd.DataFrame({"method": ["no sync", "correct", "copy in timed region"],
                          "median_ms": [0.5, 2.0, 6.0], "low_ms": [0.4, 1.9, 5.0], "high_ms": [0.6, 2.1, 7.0],
                          "reference": [False, True, False]})
    df = plots.pitfall_frame(audit)
    assert df["error_pct"].tolist() == pytest.approx([-75.0, 0.0, 200.0])
    assert df["ratio"].tolist() == pytest.approx([0.25, 1.0, 3.0])
    ax = plots.pitfall_errors(audit).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == audit["method"].tolist()
    assert {t.get_text() for t in ax.texts} == {"-75%", "+0.0%", "+200%"}


def test_pitfall_frame_from_mapping_uses_first_entry_as_reference():
    df = plots.pitfall_frame({"correct": [1.0, 1.0, 1.0], "one sample": [3.0]})
    assert df["error_pct"].tolist() == pytest.approx([0.0, 200.0])
    assert df["reference"].tolist() == [True, False]


def test_throughput_curve_marks_largest_and_optimal():
    curve = pd.DataFrame({"batch_size": [4, 1, 2, 8], "items_per_s": [30.0, 10.0, 19.0, 25.0]})
    df = plots.throughput_frame(curve)
    assert df["batch_size"].tolist() == [1, 2, 4, 8] and df["throughput"].tolist() == [10.0, 19.0, 30.0, 25.0]
    ax = plots.throughput_curve(curve, selected=2).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["measured", "largest fits (8)", "optimal (4)"]
    assert ax.get_ylabel() == "throughput (samples/s)"
    assert any(list(line.get_xdata()) == [2, 2] for line in ax.lines)  # the selected-batch guide
    with pytest.raises(ValueError, match="throughput"):
        plots.throughput_frame(pd.DataFrame({"batch_size": [1], "latency_ms": [2.0]}))


def test_hit_rate_vs_gpu_experts_one_line_per_policy_and_their_differences_below():
    rows = [{"policy": p, "gpu_experts": b, "hit_rate": b / 8 * f, "phase": "decode"}
            for p, f in (("static", 0.8), ("lru", 1.0), ("belady", 1.2)) for b in (0, 4, 8)]
    fig = plots.hit_rate_vs_gpu_experts(pd.DataFrame(rows), phase="decode", total_experts=8)
    ax, dax = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["static", "lru", "belady"]
    assert dax.get_xlabel() == "GPU-resident experts (of 8)" and ax.get_ylabel() == "decode hit rate"
    assert [list(line.get_ydata()) for line in ax.lines[:2]] == [[0.0, 0.4, 0.8], [0.0, 0.5, 1.0]]
    # distinct markers and line styles: lines that overlap stay apart
    assert len({(line.get_marker(), str(line.get_linestyle())) for line in ax.lines}) == 3
    # below: lru minus the reference (the first policy here) in points; the bound (belady) only above
    diffs = [line for line in dax.lines if len(line.get_xdata()) == 3]
    assert len(diffs) == 1 and list(diffs[0].get_ydata()) == pytest.approx([0.0, 10.0, 20.0])
    assert "static" in dax.get_ylabel() and any("belady" in t.get_text() for t in dax.texts)
    one = plots.hit_rate_vs_gpu_experts(pd.DataFrame(rows[:3]), phase="decode")
    assert len(one.axes) == 1  # one policy: nothing to compare


def test_hit_rate_heatmap_greys_out_unused_experts():
    hits = np.array([[2, 0], [1, 3]])
    act = np.array([[4, 0], [1, 3]])
    m = plots.hit_rate_matrix(hits, act)
    assert m[0, 0] == 0.5 and np.isnan(m[0, 1]) and m[1].tolist() == [1.0, 1.0]
    ax = plots.hit_rate_heatmap(hits, act).axes[0]
    shown = ax.images[0].get_array()
    assert shown.mask.tolist() == [[False, True], [False, False]]
    assert {t.get_text() for t in ax.texts} == {"0.50", "1.00"}
    per_phase = plots.hit_rate_heatmap({"prefill": [0.1, 0.2, 0.3], "decode": [0.4, 0.5, 0.6]}, xlabel="phase")
    assert [t.get_text() for t in per_phase.axes[0].get_xticklabels()] == ["prefill", "decode"]
    assert per_phase.axes[0].images[0].get_array().shape == (3, 2)


def test_decode_latency_over_tokens_draws_each_series():
    ax = plots.decode_latency_over_tokens({"a": [3.0, 1.0, 2.0], "b": [5.0, 5.0]}, prefill_ms=9.0).axes[0]
    series = [line for line in ax.lines if len(line.get_xdata()) > 2 or line.get_xdata()[0] == 1]
    assert list(series[0].get_ydata()) == [3.0, 1.0, 2.0] and list(series[0].get_xdata()) == [1, 2, 3]
    assert [t.get_text() for t in ax.figure.legends[0].get_texts()] == ["a: median 2 ms", "b: median 5 ms"]
    assert any("prefill 9.0 ms" in t.get_text() for t in ax.texts)


def test_timeline_gantt_puts_spans_on_gpu_and_cpu_rows_by_label():
    tl = pd.DataFrame(
        [("GPU", "attention[L0]", 0.0, 1.0, 0), ("GPU", "moe.gpu_experts[L0]", 1.0, 2.0, 0),
         ("CPU", "moe.cpu_experts[L0]", 1.0, 3.0, 0), ("CPU", "moe.cpu_experts[L1]", 4.0, 5.0, 1),
         ("CPU", "aten::mm", 0.0, 0.5, None)],
        columns=["row", "name", "start_ms", "end_ms", "layer"])
    assert plots._span_kind("moe.cpu_experts[L3]") == "moe.cpu_experts" and plots._span_kind("aten::mm") == "other"
    ax = plots.timeline_gantt(tl).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["GPU", "CPU"]
    assert len(ax.collections) == 4  # attention, gpu_experts (GPU); cpu_experts, other (CPU)
    assert sum(len(c.get_paths()) for c in ax.collections) == 5  # one bar per span
    legend = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert legend == ["attention", "experts on the GPU", "experts on the CPU", "other"]  # plain words
    assert [t.get_text() for t in ax.texts] == [" layer 0", " layer 1"]  # each layer's start, along the top


def test_timeline_gantt_draws_one_step_from_zero_with_a_row_per_lane():
    tl = pd.DataFrame(
        [("CPU", "moe.route", 10.0, 11.0, 0, 0, 0), ("CPU", "moe.cpu_experts", 11.0, 14.0, 0, 0, 1),
         ("GPU", "moe.gpu_experts", 11.0, 12.0, 0, 0, 0), ("CPU", "moe.route", 20.0, 21.0, 0, 1, 0)],
        columns=["row", "name", "start_ms", "end_ms", "layer", "step", "lane"])
    ax = plots.timeline_gantt(tl, step=0).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["GPU", "CPU main thread", "CPU worker thread"]
    starts = sorted(float(p.vertices[:, 0].min()) for c in ax.collections for p in c.get_paths())
    assert starts == pytest.approx([0.0, 1.0, 1.0])  # step 1's span left out, times shifted to the step start


def _all_text(fig) -> str:
    """Every piece of text a reader sees in ``fig``: titles, labels, ticks, legends, notes."""
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_visible())]
    return "\n".join(t for t in texts if t)


def test_long_titles_wrap_to_the_figure_and_break_at_the_separator_first():
    fig, ax = plots._figure()
    setup = "a-model-with-a-long-name, batch 1, float32 · NVIDIA H100 80GB HBM3, 2026-11-27"
    assert len(setup) > 19 * fig.get_figwidth()  # wider than the figure
    plots.set_title(fig, f"What is measured\n{setup}", ax)
    lines = ax.get_title().splitlines()
    assert lines == ["What is measured", "a-model-with-a-long-name, batch 1, float32",
                     "NVIDIA H100 80GB HBM3, 2026-11-27"]
    plots.set_title(fig, "short · kept on one line")
    assert fig._suptitle.get_text() == "short · kept on one line"


def test_a_far_first_call_gets_its_own_row_past_an_axis_break():
    s = _samples()
    fig = plots.latency_distribution(s, first_call_ms=511.0)
    ax, bax = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [*s, "first call,\nfresh model"]
    (first,) = [c for c in bax.collections if len(c.get_offsets())]
    assert first.get_offsets().tolist() == [[511.0, 2.0]] and bax.get_xlim()[0] > ax.get_xlim()[1]
    assert ax.get_xlim()[1] < 50  # the distributions keep their scale
    near = plots.latency_distribution(s, first_call_ms=2.0)  # within the data: same axis, no break
    assert len(near.axes) == 1 and "first call,\nfresh model" in [t.get_text() for t in near.axes[0].get_yticklabels()]
    ecdf = plots.latency_distribution(s, kind="ecdf", first_call_ms=511.0)
    assert any("511 ms (off scale)" in t.get_text() for t in ecdf.axes[0].texts)


def test_pitfall_rows_that_do_not_apply_say_why():
    audit = pd.DataFrame({"pitfall": ["copy_in_timed_region", "no_warmup"], "naive_ms": [np.nan, 3.0],
                          "correct_ms": [np.nan, 2.0], "note": ["not applicable on CPU", "mean of the first 5"]})
    ax = plots.pitfall_errors(audit).axes[0]
    assert {t.get_text() for t in ax.texts} == {"not applicable on CPU", "+50%"}


def test_timer_agreement_draws_differences_in_percent_with_a_band():
    frame = pd.DataFrame({"label": ["a", "b"], "difference": [0.02, -0.05], "low": [-0.01, -0.06],
                          "high": [0.03, -0.04]})
    fig = plots.timer_agreement(frame, band=0.03)
    ax = fig.axes[0]
    (dots,) = [c for c in ax.collections if c.get_label() == "median of the rounds"]
    assert dots.get_offsets()[:, 0].tolist() == pytest.approx([2.0, -5.0])
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] < -6.0 < 3.0 < ax.get_xlim()[1]
    band = ax.patches[0]
    assert (band.get_x(), band.get_width()) == pytest.approx((-3.0, 6.0))
    assert {t.get_text() for t in ax.texts} == {"+2.0%", "-5.0%"}
    assert ax.get_legend() is None and fig.legends  # the legend is under the axes, over no dot


def test_throughput_curves_one_panel_per_model_one_line_per_dtype():
    rows = [{"model": m, "dtype": d, "batch_size": b, "throughput": b * f, "largest": 4, "optimal": 2}
            for m in ("resnet-50", "effnet") for d, f in (("float32", 1.0), ("bfloat16", 2.0)) for b in (1, 2, 4)]
    fig = plots.throughput_curves(pd.DataFrame(rows))
    assert [ax.get_title() for ax in fig.axes] == ["resnet-50", "effnet"]
    assert fig.axes[0].get_ylabel() == "throughput (samples/s)"
    labelled = [line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")]
    assert labelled == ["float32", "bfloat16"]
    stars = [line for line in fig.axes[1].lines if line.get_marker() == "*"]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in stars] == [(2, 2.0), (2, 4.0)]
    assert [t.get_text() for t in fig.legends[0].get_texts()][-2:] == ["optimal batch", "largest that fits"]


def test_scheme_comparison_is_linear_and_never_draws_an_anomalous_run():
    frame = pd.DataFrame({"routing": ["uniform"] * 3 + ["trace"] * 3,
                          "scheme": ["all-gpu", "ours", "fiddler"] * 2,
                          "tokens_per_s": [10.0, 9.8, 9.8, 48.0, 10.2, 8.5],
                          "bound_tokens_per_s": [435.0, 11.8, 11.8, 435.0, 12.2, 12.2],
                          "anomalous": [True, False, False, False, False, False],
                          "anomaly_reason": ["10 tokens/s, under 1/3 of the same scheme", None, None, None, None,
                                             None]})
    fig = plots.scheme_comparison(frame)
    uniform, trace = fig.axes
    assert uniform.get_xscale() == "linear" and uniform.get_xlim()[0] == 0
    widths = [p.get_width() for p in uniform.patches]
    assert widths[0] == 0.0 and widths[1:] == pytest.approx([9.8, 9.8])  # the anomalous bar is not drawn
    assert any(t.get_text() == "excluded: anomalous run" for t in uniform.texts)
    assert any("excluded all-gpu, uniform routing: 10 tokens/s" in t.get_text() for t in fig.texts)  # the note
    assert trace.get_xlim()[1] < 150  # the all-GPU bound (435) does not stretch the axis ...
    assert any(t.get_text().endswith(" (bound 435)") for t in trace.texts)  # ... it is written after its value
    assert not any("10" == t.get_text() for t in uniform.texts)


def test_expert_heatmap_shows_routed_share_with_resident_experts_outlined():
    from matplotlib.patches import Rectangle

    act = np.array([[4, 0, 4, 0], [2, 6, 0, 0]])
    resident = np.array([[True, True, False, False], [False, True, False, False]])
    fig = plots.expert_heatmap(act, resident, setup="tiny, float32 · cpu")
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown.mask.tolist() == [[False, True, False, True], [False, False, True, True]]  # grey: never routed
    assert shown[1, 1] == pytest.approx(0.75) and shown[0, 0] == pytest.approx(0.5)  # share of the layer
    outlined = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(outlined) == int(resident.sum()) == 3
    # the title counts what is outlined; hit rate = routed tokens on resident experts / all (4 + 6) / 16
    assert ax.get_title() == "3 of 8 experts on the GPU (outlined): 62% of routed tokens\ntiny, float32 · cpu"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["on the GPU", "never routed", "on the GPU, never routed (1)"]


def test_timeline_hairline_kernels_are_merged_and_widened_to_stay_visible():
    assert plots._merged_spans([0.0, 0.01, 5.0], [0.005, 0.02, 5.001], 0.1) == [(0.0, pytest.approx(0.1)),
                                                                               (5.0, pytest.approx(0.1))]
    tl = pd.DataFrame(
        [("GPU", "attention", 0.0, 0.001, 0, "kernel", 0), ("GPU", "attention", 0.002, 0.003, 0, "kernel", 0),
         ("GPU", "moe.copy_experts", 1.0, 9.0, 0, "h2d", 1), ("CPU", "attention", 0.0, 10.0, 0, "label", 0)],
        columns=["row", "name", "start_ms", "end_ms", "layer", "kind", "lane"])
    ax = plots.timeline_gantt(tl).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["GPU compute stream", "GPU copy stream", "CPU"]
    widths = sorted(float(np.ptp(p.vertices[:, 0])) for c in ax.collections for p in c.get_paths())
    assert len(widths) == 3 and widths[0] == pytest.approx(0.004 * 10.0)  # two hairlines -> one visible bar
