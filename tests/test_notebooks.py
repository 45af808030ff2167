"""The notebooks: paired with their py:percent scripts, committed without outputs, and they run (smoke mode).

Each notebook is executed top to bottom in a fresh kernel with TOOLKIT_SMOKE=1 on the CPU, as CI
does; 01 and 03 run a second time against recorded GPU results (small files in the benchmarks'
formats), so the cells that show recordings run too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="notebook tooling (absent on the GPU machine)")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_timing_pitfalls", "02_throughput_and_batch_size", "03_moe_offload", "04_paper_figures"]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_paired_and_in_sync(name):
    ipynb, script = NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS / f"{name}.py"
    assert ipynb.exists() and script.exists(), f"{name}: both .ipynb and .py must be committed"
    nb, py = jupytext.read(ipynb), jupytext.read(script)
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert _cells(nb) == _cells(py), f"{name}: .ipynb and .py differ; run `jupytext --sync notebooks/{name}.py`"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {i} has outputs"
    assert "toolkit" in "".join(c.source for c in nb.cells)
    assert "sys.path" not in "".join(c.source for c in nb.cells)  # toolkit is installed, never path-hacked


def _execute(name: str, env: dict, tmp_path: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")  # for a look after a failure
    return nb


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") if o.output_type == "stream" else str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


SMOKE = {"TOOLKIT_SMOKE": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    nb = _execute(name, SMOKE, tmp_path)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 1, f"{name}: no figure was shown"
    assert "smoke mode: True" in _text(nb) or name == "04_paper_figures"


@pytest.mark.parametrize("name", ["01_timing_pitfalls", "03_moe_offload"])
def test_notebook_shows_recorded_gpu_results_with_device_and_date(name, tmp_path):
    from test_report import write_fake_recordings

    data = tmp_path / "data"
    write_fake_recordings(data / "gpu")
    repo_data = NOTEBOOKS.parent / "data"
    for sub in ("routing", "traces"):  # the synthetic trace is fitted to the shipped routing statistics
        (data / sub).symlink_to(repo_data / sub, target_is_directory=True)
    nb = _execute(name, {**SMOKE, "TOOLKIT_DATA_DIR": str(data)}, tmp_path)
    text = _text(nb)
    assert "recorded on NVIDIA H100 80GB HBM3, 2026-11-27" in text
    assert "No GPU recording" not in text
