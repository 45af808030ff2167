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

# %% [markdown]
# ## A figure from a sweep
#
# A paper figure is often a grid: GPU expert budgets x policies, models x batch sizes. `toolkit.sweep`
# runs one measurement per point of a grid (here the offloaded MoE engine, through the same
# `toolkit.moe.run` path as `python -m toolkit moe`), one result file per point, and reads the points
# back as one frame. The small example grid below (tiny-mixtral, 2 layers) runs in this process in
# seconds; `python -m toolkit sweep moe ... --executor local` runs each point in its own process (one
# GPU each on a multi-GPU host) and `--executor slurm` as a Slurm job array. The hit rate is drawn:
# it depends only on routing and placement, so it reads the same on any machine, while tokens/s on a
# shared laptop CPU would mostly show the machine's load.

# %%
import tempfile

from toolkit import plots
from toolkit.sweep import example_spec, load_sweep, run_sweep

sweep_dir = tempfile.mkdtemp(prefix="toolkit-sweep-")
run_sweep(example_spec(smoke=True), sweep_dir, executor="inline")
frame = load_sweep(sweep_dir)
notebook.show(frame[["gpu_experts", "policy", "status", "hit_rate_decode", "decode_tokens_per_s"]],
              plots.sweep_lines(frame, "gpu_experts", "hit_rate_decode", hue="policy", ylabel="decode hit rate",
                                title="Decode hit rate over a sweep of GPU expert budgets\n"
                                      "tiny-mixtral, 2 layers, random weights, synthetic Mixtral routing"))
