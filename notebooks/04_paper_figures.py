# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Paper figures: every README figure, redrawn from the files in `data/`
#
# Figures are drawn from saved results, never by measuring, so any of them can be redrawn on a
# laptop. Each comes in the paper style (seaborn's `paper` context, TrueType fonts) as PDF and
# PNG; the PDF has no creation date, so the same data gives the same bytes and a figure only
# changes in git when its data does.
#
# Sources: `data/gpu/*.json`, recorded on the GPU machine by `bash benchmarks/run_gpu.sh` (each
# labelled below with its device and date), and `data/routing/`, the Mixtral-8x7B routing
# statistics the synthetic trace of the hit-rate figures is fitted to. A figure whose recording
# is missing is listed as such. Figures go to `data/figures/` (to a temporary folder in smoke
# mode, so CI does not touch the repository).

# %%
# %matplotlib inline
from toolkit import notebook
from toolkit.paper import paper_figures

out = notebook.figures_folder()
figures = paper_figures(out)
print(f"{sum(bool(f['paths']) for f in figures)} of {len(figures)} figures written to {out}")

# %%
notebook.show(notebook.paper_figure_items(figures))
