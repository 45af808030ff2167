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
# # 01 · Timing pitfalls: how to measure inference latency, and how not to
#
# A GPU runs kernels **asynchronously**: a Python call only *queues* work and returns. A timer
# that ignores this measures something else than the model. This notebook times one model with
# the correct timer (`toolkit.measure_latency`) and with each classic mistake, and shows how far
# off each one is *on this machine*:
#
# 1. **host <-> device copy inside the timed region**: the input's `.to("cuda")` is timed too;
# 2. **no warm-up**: the first calls pay for lazy initialisation, allocator growth and autotuning;
# 3. **host clock without synchronisation**: `perf_counter()` around the call measures the kernel
#    *launches*, not the work;
# 4. **a single sample**: one timed call is one draw from a skewed distribution;
# 5. and `torch.backends.cudnn.benchmark = True`, whose first call autotunes every convolution.
#
# On a machine without a GPU the notebook runs live on a tiny CPU model (the GPU-only mistakes
# have nothing to show there) and then shows the numbers recorded on the GPU machine. On a GPU
# the same cells measure live. `TOOLKIT_SMOKE=1` (CI) picks the smallest settings.

# %%
# %matplotlib inline
from IPython.display import display

from toolkit import pitfalls, plots, report, widgets
from toolkit.env import resolve_device
from toolkit.models import build_model

device = resolve_device("auto")
S = report.settings_for(device, quick=report.smoke_mode())
print(f"device: {device}, model: {S.latency_model}, smoke mode: {report.smoke_mode()}")

# %% [markdown]
# ## Every mistake against the correct timer
#
# `pitfalls.audit` runs the no-warm-up timer first, while the freshly built model is still cold,
# then `measure_latency`: it warms up until the last few calls are steady, synchronises the device
# around every sample (CUDA events on a GPU) and samples until the 95% confidence interval of the
# median is tight (or its time budget runs out). Each naive timer makes exactly one mistake, so
# its error is that mistake's error.

# %%
model = build_model(S.latency_model, device=device)
x = model.make_input(1)
audit = pitfalls.audit(model, x, device, max_time_s=S.audit_time_s)
correct = audit.attrs["correct"]
audit[["pitfall", "naive_ms", "correct_ms", "relative_error", "note"]]

# %% [markdown]
# The correct timer's result is a value: samples, statistics, the warm-up record and the
# environment it was measured in. It warns when the spread is large (a busy machine).

# %%
print(correct)

# %%
plots.pitfall_errors(audit, title=f"{S.latency_model}, batch 1, {device} (live)")

# %% [markdown]
# ## Latency is a distribution
#
# Report the **median** with its confidence interval, and a tail percentile such as **p99**, not a
# mean: a few slow calls (interrupts, other processes, a cold cache) drag the mean and are exactly
# what a single sample may catch. The warm-up calls are a different distribution altogether.

# %%
dists = {"steady state (measured)": correct.samples_ms, "warm-up calls": correct.warmup_ms}
if device.startswith("cuda"):  # the GPU-only mistakes, as distributions of their own
    dists["copy in timed region"] = pitfalls.time_copy_in_timed_region(model, tuple(t.cpu() for t in x), device)
    dists["host clock, no sync"] = pitfalls.time_host_clock_no_sync(model, x, device)
plots.latency_distribution(dists, kind="violin")

# %%
plots.latency_distribution(dists, kind="ecdf")

# %% [markdown]
# Pick timers and switch between the violin and the ECDF view:

# %%
widgets.latency_explorer(dists)

# %% [markdown]
# ## Recorded on the GPU
#
# `benchmarks/timer_agreement.py` ran the same audit on the GPU machine (efficientnet-b0, batch 1,
# a freshly built model) and compared `measure_latency` with `torch.utils.benchmark.Timer` and
# triton's `do_bench`, like for like (cold L2 against cold L2). Its file carries the device and
# the date it was recorded on.

# %%
recorded = report.recorded_results().get("timer_agreement")
if recorded is None:
    print("No GPU recording is present: data/gpu/timer_agreement.json is missing "
          "(run `PYTHONPATH=. python benchmarks/timer_agreement.py` on a GPU machine).")
else:
    label = report.recorded_label(recorded)
    print(label)
    gpu_audit = report.recorded_pitfalls(recorded)
    if gpu_audit is not None:
        display(gpu_audit[["pitfall", "naive_ms", "correct_ms", "relative_error", "note"]])
        display(plots.pitfall_errors(gpu_audit, title=label))
    if report.recorded_latency(recorded):
        display(plots.latency_distribution(report.recorded_latency(recorded), title=label))
    agreement = report.recorded_timer_agreement(recorded)
    if len(agreement):
        display(plots.timer_comparison(agreement, title=label))
