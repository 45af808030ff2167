"""What a user does with a notebook in JupyterLab, as Playwright steps; failures raise AssertionError."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat

# The kernel is usable once the status bar names it and says Idle ("No Kernel | ..." before that).
_KERNEL_IDLE_JS = """() => {
  const bar = document.querySelector('#jp-main-statusbar');
  const text = bar ? bar.textContent : '';
  return /\\|\\s*Idle/.test(text) && !/No Kernel/.test(text);
}"""

# Run All is over when no cell is queued or running ([*]) and either every code cell
# has an execution count or the kernel stopped after an error (the rest stay [ ]).
_RUN_DONE_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]
    .map(e => e.textContent.trim());
  if (prompts.length === 0 || prompts.some(p => p.includes('*'))) return false;
  const ran = prompts.filter(p => /\\[\\d+\\]/.test(p)).length;
  const bar = document.querySelector('#jp-main-statusbar');
  return ran === prompts.length || (ran > 0 && /\\|\\s*Idle/.test(bar ? bar.textContent : ''));
}"""

# What the outputs show: every image (src) and inline SVG, to see a figure redraw.
_FIGURES_JS = """() => [...document.querySelectorAll('.jp-OutputArea-output img, .jp-OutputArea-output svg')]
  .map(e => e.tagName === 'IMG' ? e.src : e.outerHTML)"""

_ERROR_RE = re.compile(r"Traceback|\b\w*(Error|Exception)\b")

# A cell draws a figure when its code calls one of these: a toolkit plot, an experiment's figure, the
# notebooks' show helper, a toolkit widget (each holds a figure) or pyplot's show. Read from the source,
# so a cell added later is checked too, with no cell index written down anywhere.
FIGURE_CALL = re.compile(r"(\bplots\.\w+|\.figure|\bnotebook\.show|\bwidgets\.\w+|\bplt\.show)\s*\(")

# What the inline backend prints instead of the picture when it cannot draw one.
FIGURE_TEXT = re.compile(r"<(matplotlib\.figure\.)?Figure size \d+x\d+ with \d+ Axes>")

# Per cell of the open notebook, in order: (img elements in its outputs, widget outputs included; decoded ones).
_CELL_IMAGES_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')]
  .map(c => { const imgs = [...c.querySelectorAll('.jp-OutputArea-output img')];
              return [imgs.length, imgs.filter(e => e.complete && e.naturalWidth > 0).length]; })"""

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# A tqdm progress bar's text ("[00:03<00:10, ...]"): tqdm.auto's notebook bars with leave=False close their
# widget when done, so the saved view points at a closed model and nothing is rendered, as a user sees it.
_PROGRESS_RE = re.compile(r"\[\d+:\d\d(<|,)")

# Text a broken widget front end shows instead of the widget.
WIDGET_FAILURES = ("Error displaying widget", "Error rendering", "Failed to load model class", "Loading widget...")


def clean_copy(src: Path, dst: Path) -> Path:
    """Copy a notebook without outputs or counts, so stale outputs cannot pass the test."""
    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, dst)
    return dst


def open_notebook(page, lab, path: str, workspace: str, timeout_s: float = 90) -> None:
    """Open `path` (relative to the server root) in a fresh workspace and wait for an idle kernel."""
    page.goto(lab.url(f"lab/workspaces/{workspace}/tree/{path}"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout_s * 1000)
    page.wait_for_function(_KERNEL_IDLE_JS, timeout=timeout_s * 1000, polling=200)


def run_all_cells(page, timeout_s: float = 150) -> float:
    """Run > Run All Cells from the menu bar; wait until it is over; returns seconds taken."""
    t0 = time.monotonic()
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    try:  # "Select Kernel" appears if the kernel went away; a user clicks Select
        dialog.wait_for(timeout=1000)
        dialog.click()
    except Exception:
        pass
    page.wait_for_function(_RUN_DONE_JS, timeout=timeout_s * 1000, polling=250)
    page.wait_for_function(_KERNEL_IDLE_JS, timeout=timeout_s * 1000, polling=200)
    return time.monotonic() - t0


def save_notebook(page, timeout_s: float = 30) -> None:
    """File > Save Notebook, then wait until the tab is no longer marked dirty."""
    page.click(".lm-MenuBar-itemLabel:text-is('File')")
    page.click(".lm-Menu-itemLabel:text-is('Save Notebook')")
    page.wait_for_function(
        "() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
        timeout=timeout_s * 1000, polling=200,
    )


def error_outputs(nb: dict) -> list[str]:
    """'cell N: Ename: value' for every error output of a saved notebook (nbformat JSON)."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if out["output_type"] == "error":
                found.append(f"cell {i}: {out['ename']}: {out['evalue']}")
    return found


def widget_failures(page) -> list[str]:
    """Output areas whose text says a widget did not render."""
    texts = page.eval_on_selector_all(".jp-OutputArea-output", "els => els.map(e => e.innerText)")
    return [t.strip()[:200] for t in texts if any(f in t for f in WIDGET_FAILURES)]


def figures(page) -> list[str]:
    return page.evaluate(_FIGURES_JS)


def error_texts(page) -> list[str]:
    """Tracebacks shown anywhere in the outputs, widget Output areas included (they are not saved)."""
    texts = page.eval_on_selector_all(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']", "els => els.map(e => e.innerText)")
    return [t.strip() for t in texts if _ERROR_RE.search(t)]


def _last_lines(tracebacks) -> list[str]:
    """The 'Ename: message' line that ends each traceback."""
    return sorted(t.splitlines()[-1][:300] for t in tracebacks)


def check_ran_cleanly(page, lab, path: str) -> dict:
    """Save, then assert every code cell ran without an error output and every widget rendered.

    Returns the saved notebook (nbformat JSON).
    """
    save_notebook(page)
    nb = lab.notebook_file(path)
    errors = error_outputs(nb)
    assert not errors, f"{path}: cells raised errors: {errors}"
    unrun = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and c["source"].strip()
             and c.get("execution_count") is None]
    assert not unrun, f"{path}: code cells never ran: {unrun}"
    # Without a working widget manager JupyterLab falls back to the text repr ("IntSlider(...)").
    n_widgets = sum(out.get("data", {}).get(WIDGET_MIME) is not None
                    and not _PROGRESS_RE.search(str(out["data"].get("text/plain", "")))
                    for c in nb["cells"] if c["cell_type"] == "code" for out in c["outputs"])
    wait_until(lambda: page.locator(".jp-OutputArea-output:has(> .jupyter-widgets)").count() >= n_widgets,
               15, f"{path}: {n_widgets} widget outputs saved but fewer rendered as widgets (widget manager?)")
    wait_until(lambda: not widget_failures(page), 15,
               f"{path}: widgets did not render: {widget_failures(page)}")
    return nb


def figure_cells(nb: dict) -> list[int]:
    """Indices (in ``nb["cells"]``) of the code cells whose source draws a figure (``FIGURE_CALL``, comments ignored)."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("#", "%", "!")))
        if FIGURE_CALL.search(code):
            found.append(i)
    return found


def cell_images(page) -> list[tuple[int, int]]:
    """Per cell of the open notebook: (img elements in its outputs, how many decoded to a real picture)."""
    return [tuple(x) for x in page.evaluate(_CELL_IMAGES_JS)]


def _first_line(nb: dict, i: int) -> str:
    source = nb["cells"][i]["source"]
    source = source if isinstance(source, str) else "".join(source)
    return next((line for line in source.splitlines() if line.strip() and not line.startswith("#")), "")[:80]


def check_figure_cells(page, nb: dict, path: str, timeout_s: float = 30) -> list[int]:
    """Assert that every figure cell (``figure_cells``) shows at least one decoded image, and no figure as text.

    Images are looked up in the page (widget outputs are not saved in the file); the saved notebook must
    hold no "<Figure size ...>" text, which the inline backend prints when it cannot draw. Returns the
    figure cells.
    """
    cells = figure_cells(nb)
    assert cells, f"{path}: no cell draws a figure (looked for {FIGURE_CALL.pattern})"
    as_text = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" for out in c.get("outputs", [])
               if FIGURE_TEXT.search(str(out.get("data", {}).get("text/plain", "")))
               and "image/png" not in out.get("data", {})]
    assert not as_text, f"{path}: figures shown as text, not drawn, in cells {sorted(set(as_text))}"

    def missing():
        shown = cell_images(page)
        assert len(shown) == len(nb["cells"]), f"{path}: {len(shown)} cells on the page, {len(nb['cells'])} saved"
        return [i for i in cells if shown[i][1] == 0]

    deadline = time.monotonic() + timeout_s
    while (absent := missing()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not absent, (f"{path}: no figure was shown by cell(s) "
                        + "; ".join(f"{i} ({_first_line(nb, i)!r})" for i in absent))
    broken = [i for i, (n, ok) in enumerate(cell_images(page)) if ok < n]
    assert not broken, f"{path}: images that did not decode in cells {broken}"
    return cells


def move_slider(page, slider_selector: str) -> tuple[int, int]:
    """Focus the slider handle and press Home or End (to the farther end); returns (old, new) values."""
    handle = page.locator(f"{slider_selector} .noUi-handle").first
    handle.scroll_into_view_if_needed()
    old, lo, hi = (round(float(handle.get_attribute(a))) for a in ("aria-valuenow", "aria-valuemin", "aria-valuemax"))
    assert lo < hi, f"slider {slider_selector} cannot move: min {lo} == max {hi}"
    handle.focus()
    page.keyboard.press("End" if hi - old >= old - lo else "Home")
    new = round(float(handle.get_attribute("aria-valuenow")))
    assert new != old, f"slider {slider_selector} did not move from {old} (keyboard on its handle)"
    return old, new


def wait_until(predicate, timeout_s: float, message: str, poll_s: float = 0.2):
    """Poll `predicate()` until truthy; AssertionError(message) after `timeout_s`; returns its value."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(poll_s)
    assert value, message
    return value


def rendered_images(page) -> tuple[int, int]:
    """(img elements in outputs, how many of them decoded to a real picture)."""
    return page.eval_on_selector_all(
        ".jp-OutputArea-output img", "els => [els.length, els.filter(e => e.complete && e.naturalWidth > 0).length]")


def check_slider_drives_output(page, slider: str, readout: str, timeout_s: float = 60) -> dict:
    """Move `slider` by keyboard; assert that `readout`'s text and a figure change, with no new traceback."""
    read_js = f"() => {{ const e = document.querySelector('{readout}'); return e ? e.innerText : null; }}"
    page.wait_for_selector(f"{slider} .noUi-handle", state="visible")
    before = page.evaluate(read_js)
    assert before and "hit rate" in before, f"{readout} shows {before!r}, expected a 'hit rate' text"
    figs_before, errors_before = set(figures(page)), set(error_texts(page))
    old, new = move_slider(page, slider)

    def no_new_traceback():  # fail at once, with the traceback, rather than at the timeout
        raised = set(error_texts(page)) - errors_before
        assert not raised, f"the slider callback raised after moving it {old} -> {new}: {_last_lines(raised)}"

    def text_changed():
        no_new_traceback()
        text = page.evaluate(read_js)
        return text if text and text != before else None

    def figure_redrawn():
        no_new_traceback()
        return set(figures(page)) - figs_before

    after = wait_until(text_changed, timeout_s, f"hit-rate text did not change within {timeout_s:.0f} s after "
                       f"moving the slider {old} -> {new} (still {before!r})")
    wait_until(figure_redrawn, timeout_s,
               f"no figure was redrawn within {timeout_s:.0f} s after moving the slider {old} -> {new}")
    no_new_traceback()
    return {"slider": (old, new), "before": before, "after": after}


@contextmanager
def screenshot_on_failure(page, out_dir: Path, name: str, lab=None):
    """On any failure: a screenshot (scrolled to the first error, if any) and the paths in the message."""
    try:
        yield
    except Exception as e:
        out_dir.mkdir(parents=True, exist_ok=True)
        shot = out_dir / f"{name}-failure.png"
        try:
            first_error = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                       has_text=_ERROR_RE)
            if first_error.count():
                first_error.first.scroll_into_view_if_needed(timeout=2000)
            page.screenshot(path=str(shot))
        except Exception as shot_error:  # the page may be gone; keep the original failure
            shot = f"(no screenshot: {shot_error})"
        log = f"\nJupyterLab log: {lab.log_path}" if lab is not None else ""
        raise AssertionError(f"{name}: {e}\nscreenshot: {shot}{log}") from e
