"""The notebooks as a user sees them: JupyterLab in headless Chromium.

A notebook that runs under nbmake can still show broken widgets (no widget
manager, a slider that does nothing, a plot that never redraws, a figure
printed as text); only a browser shows that. One JupyterLab server
(127.0.0.1, free port, random token) serves a temporary root holding
output-free copies of every numbered notebook and stand-in notebooks; kernels
get TOOLKIT_SMOKE=1. Each test opens a notebook in its own workspace, runs
Run > Run All Cells, saves, and checks the outputs: every cell whose code
draws (``browser.notebook.figure_cells``, read from the source, so cells added
later are checked too) must show a decoded image. On failure a screenshot
lands in the test's tmp_path (named in the message).

Needs Debian's chromium and Playwright (`.ci/install-browser.sh`); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("nbformat", reason="notebook tooling (absent on the GPU machine)")

from browser import lab as labmod  # noqa: E402
from browser import notebook as ui  # noqa: E402
from browser.standin import write_standin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(str(p.relative_to(REPO)) for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NB03 = "notebooks/03_moe_offload.ipynb"
SLIDER, HIT_RATE = ".toolkit-gpu-experts", ".toolkit-hit-rate"  # docs/INTERFACES.md, 'Notebooks <-> browser test'

_missing = labmod.missing_reason()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing is not None, reason=f"browser test: {_missing}")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-root")
    (root / "notebooks").mkdir()
    for rel in NOTEBOOKS:
        ui.clean_copy(REPO / rel, root / rel)
    if (REPO / "data").is_dir():  # notebooks read recorded results from ../data
        (root / "data").symlink_to(REPO / "data", target_is_directory=True)
    write_standin(root / "standin.ipynb")
    write_standin(root / "standin_broken.ipynb", broken=True)
    write_standin(root / "standin_figureless.ipynb", figureless=True)
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


def open_and_run(page, lab, path: str, workspace: str, timeout_s: float = 300) -> dict:
    """Open, Run All Cells, save; assert no error output and every widget rendered."""
    assert (Path(lab.root) / path).exists(), f"{path} is missing from the repository"
    ui.open_notebook(page, lab, path, workspace)
    ui.run_all_cells(page, timeout_s=timeout_s)
    return ui.check_ran_cleanly(page, lab, path)


def test_standin_slider_redraws_hit_rate_and_figure(page, lab, tmp_path):
    with ui.screenshot_on_failure(page, tmp_path, "standin", lab):
        nb = open_and_run(page, lab, "standin.ipynb", "standin")
        assert ui.figure_cells(nb) == [1, 2]  # the widget's figure and the inline plot
        ui.check_figure_cells(page, nb, "standin.ipynb")
        moved = ui.check_slider_drives_output(page, SLIDER, HIT_RATE, timeout_s=30)
    assert "0.250" in moved["before"] and moved["after"] != moved["before"]


def test_standin_broken_callback_is_caught(page, lab):
    """The check must fail when the slider's callback is broken (here it raises)."""
    open_and_run(page, lab, "standin_broken.ipynb", "standin-broken")
    with pytest.raises(AssertionError, match="hit-rate text did not change|the slider callback raised"):
        ui.check_slider_drives_output(page, SLIDER, HIT_RATE, timeout_s=5)


def test_standin_figure_cell_without_a_figure_is_caught(page, lab):
    """The figure check must fail when a cell that draws shows nothing (here its figure is closed first)."""
    nb = open_and_run(page, lab, "standin_figureless.ipynb", "standin-figureless")
    with pytest.raises(AssertionError, match=r"no figure was shown by cell\(s\) 2 \('fig, ax = plt.subplots"):
        ui.check_figure_cells(page, nb, "standin_figureless.ipynb", timeout_s=3)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: Path(p).stem)
def test_notebook_shows_every_figure(page, lab, tmp_path, path):
    """Run All in the browser: no error, every widget rendered, and each cell that draws shows its figure.

    Notebook 03 also has its slider moved: the hit-rate text and a figure must follow.
    """
    assert len(NOTEBOOKS) >= 4, f"notebooks found: {NOTEBOOKS}"
    name = Path(path).stem
    with ui.screenshot_on_failure(page, tmp_path, name, lab):
        nb = open_and_run(page, lab, path, name.split("_")[0])
        ui.check_figure_cells(page, nb, path)
        n_png = sum("image/png" in out.get("data", {}) for c in nb["cells"] for out in c.get("outputs", []))
        n_img, n_ok = ui.rendered_images(page)
        assert n_ok == n_img >= n_png, f"{path}: {n_png} plots saved, {n_img} img elements, {n_ok} rendered"
        if path == NB03:
            ui.check_slider_drives_output(page, SLIDER, HIT_RATE, timeout_s=60)
