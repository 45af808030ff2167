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

from toolkit import plots, report, widgets
from toolkit.env import resolve_device
from toolkit.models import build_model
from toolkit.throughput import curve_batch_sizes, find_max_batch_size, find_optimal_batch_size, throughput_curve

device = resolve_device("auto")
S = report.settings_for(device, quick=report.smoke_mode())
limit = f"{S.batch_max_memory / 2**20:.0f} MiB" if S.batch_max_memory else "the device's memory"
print(f"device: {device}, model: {S.batch_model}, memory limit: {limit}, search bound: {S.batch_max}, "
      f"smoke mode: {report.smoke_mode()}")

# %% [markdown]
# ## The largest batch that fits
#
# Every probe is recorded: its batch size, whether it fit, its peak memory, and whether memory
# went back to the baseline afterwards (recovery happens *after* the `except` block: inside it,
# the traceback still holds the batch's tensors).

# %%
search = find_max_batch_size(S.batch_model, device=device, max_memory=S.batch_max_memory, max_batch=S.batch_max,
                             progress=True)
print(search)
search.to_dataframe()[["batch_size", "fits", "phase", "peak_bytes", "memory_at_baseline"]]

# %% [markdown]
# ## The throughput curve
#
# Batch sizes 1, 4, 16, ... up to the largest that fits; each point times back-to-back batches
# (no synchronisation inside the timed region, as in a real pipeline) after warm-up batches.

# %%
model = build_model(S.batch_model, device=device)
sizes = curve_batch_sizes(search.max_batch_size, step=S.curve_step)
curve = throughput_curve(model, sizes, S.curve_batches, device=device, max_time_s=S.curve_time_s, progress=True)
optimal = find_optimal_batch_size(curve)
print(optimal)
curve[["batch_size", "samples_per_s", "ci95_low", "ci95_high", "batch_ms_median"]]

# %%
plots.throughput_curve(curve, largest=search.max_batch_size, optimal=optimal.optimal_batch_size,
                       title=f"{S.batch_model} on {device} (live)")

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
recorded = report.recorded_results().get("batch_search")
curves = report.recorded_throughput_curves(recorded) if recorded else []
if not curves:
    print("No GPU recording is present: data/gpu/batch_search.json is missing or holds no curve "
          "(run `PYTHONPATH=. python benchmarks/batch_search.py` on a GPU machine).")
else:
    label = report.recorded_label(recorded)
    print(label)
    for name, gpu_curve, gpu_largest, gpu_optimal in curves:
        display(plots.throughput_curve(gpu_curve, largest=gpu_largest, optimal=gpu_optimal, title=f"{name}, {label}"))
    name, gpu_curve, gpu_largest, gpu_optimal = curves[0]
    print(f"explore {name}:")
    display(widgets.batch_size_explorer(gpu_curve, largest=gpu_largest, optimal=gpu_optimal))
