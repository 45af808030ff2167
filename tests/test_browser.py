"""The notebooks as a user sees them: JupyterLab in headless Chromium (issue 9).

A notebook that runs under nbmake can still show broken widgets (no widget
manager, a slider that does nothing, a plot that never redraws); only a
browser shows that. One JupyterLab server (127.0.0.1, free port, random token)
serves a temporary root holding output-free copies of the notebooks and a
stand-in notebook; kernels get TOOLKIT_SMOKE=1. Each test opens a notebook in
its own workspace, runs Run > Run All Cells, saves, and checks the outputs;
on failure a screenshot lands in the test's tmp_path (named in the message).

Needs Debian's chromium and Playwright (`.ci/install-browser.sh`); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import lab as labmod
from browser import notebook as ui
from browser.standin import write_standin

REPO = Path(__file__).resolve().parents[1]
NB01, NB03 = "notebooks/01_timing_pitfalls.ipynb", "notebooks/03_moe_offload.ipynb"
SLIDER, HIT_RATE = ".toolkit-gpu-experts", ".toolkit-hit-rate"  # docs/INTERFACES.md, 'Notebooks <-> browser test'

_missing = labmod.missing_reason()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing is not None, reason=f"browser test: {_missing}")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-root")
    (root / "notebooks").mkdir()
    for rel in (NB01, NB03):
        if (REPO / rel).exists():
            ui.clean_copy(REPO / rel, root / rel)
    if (REPO / "data").is_dir():  # notebooks read recorded results from ../data
        (root / "data").symlink_to(REPO / "data", target_is_directory=True)
    write_standin(root / "standin.ipynb")
    write_standin(root / "standin_broken.ipynb", broken=True)
    with labmod.JupyterLab(root, tmp_path_factory.mktemp("lab-state"), env={"TOOLKIT_SMOKE": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def chromium(lab, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = labmod.launch_chromium(p, tmp_path_factory.mktemp("chromium-profile"))
        yield context
        context.close()


@pytest.fixture
def page(chromium, lab):
    page = chromium.new_page()
    page.set_default_timeout(30_000)
    yield page
    page.close()
    lab.shutdown_kernels()  # the next notebook gets the CPU


def open_and_run(page, lab, path: str, workspace: str) -> dict:
    """Open, Run All Cells, save; assert no error output and every widget rendered."""
    assert (Path(lab.root) / path).exists(), f"{path} is missing from the repository"
    ui.open_notebook(page, lab, path, workspace)
    ui.run_all_cells(page)
    return ui.check_ran_cleanly(page, lab, path)


def test_standin_slider_redraws_hit_rate_and_figure(page, lab, tmp_path):
    with ui.screenshot_on_failure(page, tmp_path, "standin", lab):
        open_and_run(page, lab, "standin.ipynb", "standin")
        assert ui.rendered_images(page)[1] >= 2, "stand-in: expected the widget figure and the inline plot"
        moved = ui.check_slider_drives_output(page, SLIDER, HIT_RATE, timeout_s=30)
    assert "0.250" in moved["before"] and moved["after"] != moved["before"]


def test_standin_broken_callback_is_caught(page, lab):
    """The check must fail when the slider's callback is broken (here it raises)."""
    open_and_run(page, lab, "standin_broken.ipynb", "standin-broken")
    with pytest.raises(AssertionError, match="hit-rate text did not change|the slider callback raised"):
        ui.check_slider_drives_output(page, SLIDER, HIT_RATE, timeout_s=5)


def test_01_timing_pitfalls_renders_plots(page, lab, tmp_path):
    with ui.screenshot_on_failure(page, tmp_path, "01_timing_pitfalls", lab):
        nb = open_and_run(page, lab, NB01, "nb01")
        n_png = sum("image/png" in out.get("data", {}) for c in nb["cells"] for out in c.get("outputs", []))
        n_img, n_ok = ui.rendered_images(page)
        assert n_png > 0, f"{NB01}: no cell produced a plot (image/png output)"
        assert n_ok == n_img >= n_png, f"{NB01}: {n_png} plots saved, {n_img} img elements, {n_ok} rendered"


def test_03_moe_offload_slider_changes_hit_rate(page, lab, tmp_path):
    with ui.screenshot_on_failure(page, tmp_path, "03_moe_offload", lab):
        open_and_run(page, lab, NB03, "nb03")
        ui.check_slider_drives_output(page, SLIDER, HIT_RATE, timeout_s=60)
