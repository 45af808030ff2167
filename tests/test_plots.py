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
    assert any(list(line.get_xdata()) == [2, 2] for line in ax.lines)  # the selected-batch guide
    with pytest.raises(ValueError, match="throughput"):
        plots.throughput_frame(pd.DataFrame({"batch_size": [1], "latency_ms": [2.0]}))


def test_hit_rate_vs_gpu_experts_one_line_per_policy():
    rows = [{"policy": p, "gpu_experts": b, "hit_rate": b / 8 * f, "phase": "decode"}
            for p, f in (("static", 0.8), ("lru", 1.0)) for b in (0, 4, 8)]
    ax = plots.hit_rate_vs_gpu_experts(pd.DataFrame(rows), phase="decode", total_experts=8).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["static", "lru"]
    assert ax.get_xlabel() == "GPU-resident experts (of 8)" and ax.get_ylabel() == "decode hit rate"
    assert [list(line.get_ydata()) for line in ax.lines[:2]] == [[0.0, 0.4, 0.8], [0.0, 0.5, 1.0]]


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
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a: median 2 ms", "b: median 5 ms"]
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
    assert legend == ["attention", "gpu_experts", "cpu_experts", "other"]


def test_timeline_gantt_draws_one_step_from_zero_with_a_row_per_lane():
    tl = pd.DataFrame(
        [("CPU", "moe.route", 10.0, 11.0, 0, 0, 0), ("CPU", "moe.cpu_experts", 11.0, 14.0, 0, 0, 1),
         ("GPU", "moe.gpu_experts", 11.0, 12.0, 0, 0, 0), ("CPU", "moe.route", 20.0, 21.0, 0, 1, 0)],
        columns=["row", "name", "start_ms", "end_ms", "layer", "step", "lane"])
    ax = plots.timeline_gantt(tl, step=0).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["GPU", "CPU main", "CPU worker"]
    starts = sorted(float(p.vertices[:, 0].min()) for c in ax.collections for p in c.get_paths())
    assert starts == pytest.approx([0.0, 1.0, 1.0])  # step 1's span left out, times shifted to the step start
