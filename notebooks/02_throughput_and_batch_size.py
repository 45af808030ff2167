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
# # 02 · Throughput and batch size: the largest batch is not the best one
#
# Offline inference wants **throughput** (samples per second), and a bigger batch usually gives
# more of it, up to a point. This notebook
#
# 1. finds the exact **largest batch that fits** in memory: grow 1, 2, 4, ... until out of
#    memory, then bisect to the boundary (no fixed cap, no shrink-by-10% loop). On a CPU each
#    trial runs in a child process under a memory limit, because a process that runs out of
#    memory there is killed by the OS instead of raising;
# 2. measures the **throughput curve** up to it, timing batches back to back;
# 3. picks the **optimal batch**: the smallest within 3% of the best throughput. Past the point
#    where the device is saturated, larger batches only add memory traffic and latency.
#
# On a CPU-only machine this runs live on a tiny model with a small memory limit and then shows
# the curve recorded on the GPU; on a GPU the same cells measure live.

# %%
# %matplotlib inline
from IPython.display import display

from toolkit import notebook, widgets
from toolkit.experiments import batch_experiment
from toolkit.recorded import recorded_throughput_curves, recording

nb = notebook.setup()
S = nb.settings
print(f"{nb}, model: {S.batch_model}, search bound: {S.batch_max}")

# %% [markdown]
# ## The largest batch that fits, and the throughput curve up to it
#
# `batch_experiment` is the report's batch-size experiment, with the same settings: the search,
# then the curve, then the optimal batch. Every probe of the search is recorded: its batch size,
# whether it fit, its peak memory, and whether memory went back to the baseline afterwards
# (recovery happens *after* the `except` block: inside it, the traceback still holds the batch's
# tensors). The curve runs batch sizes 1, 4, 16, ... up to the largest that fits; each point
# times back-to-back batches (no synchronisation inside the timed region, as in a real pipeline)
# after warm-up batches.

# %%
batch = batch_experiment(S, nb.device, progress=True)
search, curve, optimal = batch.values["search"], batch.values["curve"], batch.values["optimal"]
print(search)
search.to_dataframe()[["batch_size", "fits", "phase", "peak_bytes", "memory_at_baseline"]]

# %%
print(optimal)
curve[["batch_size", "samples_per_s", "ci95_low", "ci95_high", "batch_ms_median"]]

# %%
batch.figure("throughput_vs_batch")

# %% [markdown]
# Slide through the measured batch sizes: throughput, its share of the best, and the time one
# batch takes (the latency a request waits when batched).

# %%
widgets.batch_size_explorer(curve, largest=search.max_batch_size, optimal=optimal.optimal_batch_size)

# %% [markdown]
# ## Recorded on the GPU
#
# `benchmarks/batch_search.py` ran the search and the curve on the GPU machine for efficientnet-b0
# and resnet-50 in float32 and bfloat16, where the memory limit is the GPU's own.

# %%
notebook.show(notebook.recorded_figures("batch_search"))

# %% [markdown]
# Explore every recorded configuration:

# %%
for label, gpu_curve, gpu_largest, gpu_optimal in recorded_throughput_curves(recording("batch_search").doc):
    display(notebook.Note(f"**{label}**"))
    display(widgets.batch_size_explorer(gpu_curve, largest=gpu_largest, optimal=gpu_optimal))
