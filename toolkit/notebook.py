"""What the notebooks share: their settings, and showing recorded GPU figures (or saying there are none).

The notebooks are thin: every experiment they run is a call of
``toolkit.experiments`` with the report's settings, and every recorded GPU
result they show is a paper figure of ``toolkit.paper``. This module holds
the little glue around that, so it can be tested: the settings a notebook
runs with (the quick preset in smoke mode), the display items for a recorded
file (its device and date, then its figures, or one line saying it is
missing and which benchmark records it), and ``show`` to display them.

It needs IPython only inside ``show`` (never ipywidgets), so it imports on the
GPU machine too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .experiments import ExperimentFigure, ExperimentResult
from .paper import PAPER_FIGURES, ROUTING, draw_paper_figure
from .recorded import recording
from .settings import Settings, data_dir, settings_for, smoke_mode


@dataclass(frozen=True)
class NotebookSetup:
    """The device a notebook runs on and the experiment settings it uses (quick in smoke mode)."""

    device: str
    settings: Settings
    smoke: bool

    def __str__(self) -> str:
        return f"device: {self.device}, smoke mode: {self.smoke}"


def setup(device: str = "auto") -> NotebookSetup:
    """Resolve the device and pick the report's settings for it: the quick preset when TOOLKIT_SMOKE=1."""
    from .env import resolve_device

    device = resolve_device(device)
    smoke = smoke_mode()
    return NotebookSetup(device, settings_for(device, quick=smoke), smoke)


def figures_folder() -> Path:
    """Where notebook 04 writes the paper figures: ``data/figures``, or a fresh temporary folder in smoke mode."""
    return Path(tempfile.mkdtemp(prefix="figures-")) if smoke_mode() else data_dir() / "figures"


class Note(str):
    """A line of text shown as Markdown in a notebook and as itself in plain text."""

    def _repr_markdown_(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return str(self)


def benchmark_for(name: str, benchmarks: Path | None = None) -> str:
    """The benchmark script that records ``data/gpu/<name>.json``: the longest leading part of the name, cut at
    an underscore, that names a script in ``benchmarks`` (default: the repository's), e.g. moe_decode for
    moe_decode_h200_captured; the name itself where none does."""
    folder = benchmarks if benchmarks is not None else Path(__file__).resolve().parent.parent / "benchmarks"
    parts = name.split("_")
    for n in range(len(parts), 0, -1):
        if (folder / f"{'_'.join(parts[:n])}.py").is_file():
            return "_".join(parts[:n])
    return name


def missing_recording(name: str, problem: str | None = None) -> Note:
    """'No GPU recording is present: ...' naming the file and the benchmark that records it."""
    why = problem or f"data/gpu/{name}.json is not present"
    return Note(f"No GPU recording is present: {why}. `PYTHONPATH=. python benchmarks/{benchmark_for(name)}.py` on "
                "a GPU machine records it (`bash benchmarks/run_gpu.sh` records them all).")


def paper_figure_items(rows: Iterable[dict]) -> list:
    """Display items for ``draw_paper_figure`` / ``paper_figures`` rows: per figure one note (its caption, then
    where it was saved or why it was not drawn), then the figure.

    Two outputs a figure at most: JupyterLab shows the first 50 outputs of a cell and folds the rest away.
    """
    items = []
    for r in rows:
        source = ("drawn from data/routing (no GPU needed)" if r["source"] == ROUTING
                  else r["label"] or f"data/{r['source']}")
        caption = f"**{r['stem']}**: {r['caption']} ({source})"
        if r["figure"] is None:
            items.append(Note(f"{caption}\n\nnot drawn: {r['missing']}"))
            continue
        saved = ("\n\nsaved as " + ", ".join(f"`{p}`" for p in r["paths"])) if r["paths"] else ""
        items += [Note(caption + saved), r["figure"]]
    return items


def recorded_figures(name: str, data: str | Path | None = None) -> list:
    """Display items for ``data/gpu/<name>.json``: its device and date, then each paper figure drawn from it.

    Without the file (or with an unreadable one): one ``missing_recording`` line.
    """
    rec = recording(name, data)
    if rec.doc is None:
        return [missing_recording(rec.name, rec.problem)]
    rows = [draw_paper_figure(f, data) for f in PAPER_FIGURES if f.source == rec.source]
    items: list = [Note(rec.label)]
    for r in rows:
        items += [r["figure"]] if r["figure"] is not None else [Note(f"{r['stem']} not drawn: {r['missing']}")]
    return items


def show(*items, display: Callable | None = None) -> None:
    """Display items in a notebook: figures, frames, ``Note`` lines, ``ExperimentFigure`` (figure and caption),
    ``ExperimentResult`` (its figures); lists and tuples are flattened.

    ``display`` stands in for ``IPython.display.display`` (tests).
    """
    if display is None:
        from IPython.display import display
    for item in items:
        if isinstance(item, list | tuple):
            show(*item, display=display)
        elif isinstance(item, ExperimentResult):
            show(*item.figures, display=display)
        elif isinstance(item, ExperimentFigure):
            display(item.figure)
            display(Note(f"*{item.caption}*"))
        elif isinstance(item, str) and not isinstance(item, Note):
            display(Note(item))
        else:
            display(item)


__all__ = ["NotebookSetup", "setup", "figures_folder", "Note", "benchmark_for", "missing_recording", "paper_figure_items",
           "recorded_figures", "show"]
