"""The notebooks' shared helpers (toolkit.notebook): settings, recorded figures or why there are none, display."""

import subprocess
import sys

import pytest
from matplotlib.figure import Figure
from test_report import write_fake_recordings

from toolkit import notebook, plots
from toolkit.experiments import ExperimentFigure, ExperimentResult
from toolkit.paper import PAPER_FIGURES, draw_paper_figure
from toolkit.settings import settings_for


def test_setup_uses_the_quick_report_settings_in_smoke_mode(monkeypatch):
    monkeypatch.setenv("TOOLKIT_SMOKE", "1")
    nb = notebook.setup("cpu")
    assert nb.device == "cpu" and nb.smoke and nb.settings == settings_for("cpu", quick=True)
    assert str(nb) == "device: cpu, smoke mode: True"
    monkeypatch.delenv("TOOLKIT_SMOKE")
    nb = notebook.setup("cpu")
    assert not nb.smoke and nb.settings == settings_for("cpu") and str(nb).endswith("smoke mode: False")


def test_figures_folder_is_data_figures_or_a_temporary_folder_in_smoke_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TOOLKIT_SMOKE", raising=False)
    assert notebook.figures_folder() == tmp_path / "figures"
    monkeypatch.setenv("TOOLKIT_SMOKE", "1")
    folder = notebook.figures_folder()
    assert folder.is_dir() and folder.parent != tmp_path and folder.name.startswith("figures-")


def test_recorded_figures_start_with_device_and_date_then_every_figure_of_the_file(tmp_path):
    write_fake_recordings(tmp_path / "gpu")
    items = notebook.recorded_figures("timer_agreement", tmp_path)
    assert items[0] == "recorded on NVIDIA H100 80GB HBM3, 2026-11-27" and isinstance(items[0], notebook.Note)
    stems = [f.stem for f in PAPER_FIGURES if f.source == "gpu/timer_agreement.json"]
    assert len(stems) == 3 and len(items) == 4 and all(isinstance(x, Figure) for x in items[1:])
    assert [type(x) for x in notebook.recorded_figures("moe_engine", tmp_path)[1:]] == [Figure, Figure]


def test_a_missing_recording_is_one_line_naming_the_file_and_its_benchmark(tmp_path):
    items = notebook.recorded_figures("moe_engine", tmp_path)
    assert len(items) == 1 and items[0].startswith("No GPU recording is present: data/gpu/moe_engine.json is not")
    assert "`PYTHONPATH=. python benchmarks/moe_engine.py`" in items[0]
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "batch_search.json").write_text("{not json")
    broken = notebook.recorded_figures("batch_search", tmp_path)
    assert len(broken) == 1 and "No GPU recording is present" in broken[0] and "batch_search.json" in broken[0]
    # a recording named after its host or variant names the benchmark that wrote it
    assert "`PYTHONPATH=. python benchmarks/moe_decode.py`" in notebook.recorded_figures("moe_decode_h200_captured",
                                                                                       tmp_path)[0]
    assert notebook.benchmark_for("decode_timeline_h200") == "decode_timeline"
    assert notebook.benchmark_for("no_such_thing") == "no_such_thing"


def test_a_recording_without_data_for_a_figure_says_so(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "profile_cases.json").write_text('{"provenance": {"gpu": "NVIDIA H200"}, "cases": {}}')
    items = notebook.recorded_figures("profile_cases", tmp_path)
    assert items == ["recorded on NVIDIA H200, unknown date",
                     "gpu_moe_timeline not drawn: data/gpu/profile_cases.json holds no data for this figure"]


def test_paper_figure_items_give_a_caption_then_the_figure_or_why_not(tmp_path):
    write_fake_recordings(tmp_path / "gpu")
    by_stem = {f.stem: f for f in PAPER_FIGURES}
    rows = [draw_paper_figure(by_stem["gpu_pitfall_errors"], tmp_path),
            draw_paper_figure(by_stem["gpu_moe_timeline"], tmp_path / "nowhere")]
    rows[0]["paths"] = ["a.pdf", "a.png"]
    items = notebook.paper_figure_items(rows)
    caption, saved = items[0].split("\n\n")
    assert caption.startswith("**gpu_pitfall_errors**: ") and caption.endswith(
        "(recorded on NVIDIA H100 80GB HBM3, 2026-11-27)")
    assert saved == "saved as `a.pdf`, `a.png`" and isinstance(items[1], Figure)
    caption, why = items[2].split("\n\n")
    assert caption.startswith("**gpu_moe_timeline**") and caption.endswith("(data/gpu/profile_cases.json)")
    assert why == "not drawn: no recording: data/gpu/profile_cases.json is not present"
    assert len(items) == 3  # two outputs a drawn figure, one for a figure not drawn: a cell shows 50 outputs


def test_show_flattens_items_and_shows_experiment_figures_with_their_captions():
    shown = []
    fig = plots.throughput_curve({1: 1.0, 2: 3.0})
    result = ExperimentResult("batch", {"complete": True}, (ExperimentFigure("curve", "The curve.", fig),))
    notebook.show("plain text", [notebook.Note("a note"), (result,)], 42, display=shown.append)
    assert shown[:2] == ["plain text", "a note"] and all(isinstance(x, notebook.Note) for x in shown[:2])
    assert shown[2] is fig and shown[3] == "*The curve.*" and shown[4] == 42 and len(shown) == 5
    assert notebook.Note("**x**")._repr_markdown_() == "**x**" and repr(notebook.Note("y")) == "y"


def test_experiment_result_figure_lookup():
    fig = plots.throughput_curve({1: 1.0, 2: 3.0})
    result = ExperimentResult("batch", {"complete": True}, (ExperimentFigure("curve", "c", fig),))
    assert result.figure("curve") is fig and result.to_dict() == {"complete": True}
    with pytest.raises(KeyError, match="batch has no figure 'nope'; it has curve"):
        result.figure("nope")


def test_the_helpers_import_without_ipywidgets():
    code = ("import sys; sys.modules['ipywidgets'] = None\n"
            "import toolkit.notebook, toolkit.report, toolkit.experiments, toolkit.paper\n"
            "assert 'ipywidgets' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
