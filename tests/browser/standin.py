"""A stand-in for notebooks/03: the browser DOM contract of docs/INTERFACES.md, nothing else.

An IntSlider (class toolkit-gpu-experts) drives an HTML (class toolkit-hit-rate)
and a matplotlib figure, plus one plain inline plot as in notebook 01. It lets
the browser machinery be proven without torch: with `broken=True` its
callback raises, and with `figureless=True` its plot cell calls `plt.show()`
with nothing to show; the test must notice both.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

SETUP = """\
%matplotlib inline
import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display"""

WIDGET = """\
slider = widgets.IntSlider(value=2, min=0, max=8, description="GPU experts", continuous_update=False)
slider.add_class("toolkit-gpu-experts")
html = widgets.HTML()
html.add_class("toolkit-hit-rate")
out = widgets.Output()

def update(n):
    html.value = f"<b>decode hit rate: {n / 8:.3f}</b>"
    with out:
        out.clear_output(wait=True)
        fig, ax = plt.subplots(figsize=(4, 2.5))
        ax.bar(["hit", "miss"], [n / 8, 1 - n / 8])
        ax.set_title(f"{n} GPU experts")
        plt.show()

def on_change(change):
    {BODY}

update(slider.value)
slider.observe(on_change, names="value")
display(widgets.VBox([slider, html, out]))"""

PLOT = """\
fig, ax = plt.subplots(figsize=(4, 2.5))
ax.plot([1, 2, 3], [3, 1, 2])
plt.show()"""

NO_PLOT = """\
fig, ax = plt.subplots(figsize=(4, 2.5))
plt.close(fig)  # a figure cell whose figure never reaches the page
plt.show()"""


def write_standin(path: Path, broken: bool = False, figureless: bool = False) -> Path:
    """Write the stand-in notebook; `broken` makes the slider callback raise, `figureless` its plot cell empty."""
    body = 'raise RuntimeError("slider callback broken on purpose")' if broken else 'update(change["new"])'
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (SETUP, WIDGET.replace("{BODY}", body),
                                                           NO_PLOT if figureless else PLOT)]
    path = Path(path)
    nbformat.write(nb, path)
    return path
