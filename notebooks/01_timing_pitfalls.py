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
from toolkit import notebook, plots, widgets
from toolkit.experiments import timing_experiment
from toolkit.models import build_model
from toolkit.timing import compare

nb = notebook.setup()
S = nb.settings
print(f"{nb}, model: {S.latency_model}")

# %% [markdown]
# ## Every mistake against the correct timer
#
# `timing_experiment` is what `python -m toolkit report` runs first, with the same settings. It
# builds the model and calls `pitfalls.audit`, which runs the no-warm-up timer first, while the
# freshly built model is still cold, then `measure_latency`: it warms up until the last few calls
# are steady, synchronises the device around every sample (CUDA events on a GPU) and samples
# until the 95% confidence interval of the median is tight (or its time budget runs out). Each
# naive timer makes exactly one mistake, so its error is that mistake's error.

# %%
timing = timing_experiment(S, nb.device)
audit, correct = timing.values["audit"], timing.values["latency"]
audit[["pitfall", "naive_ms", "correct_ms", "relative_error", "note"]]

# %% [markdown]
# The correct timer's result is a value: samples, statistics, the warm-up record and the
# environment it was measured in. It warns when the spread is large (a busy machine).

# %%
print(correct)

# %%
timing.figure("pitfall_errors")

# %% [markdown]
# ## Latency is a distribution
#
# Report the **median** with its confidence interval, and a tail percentile such as **p99**, not a
# mean: a few slow calls (interrupts, other processes, a cold cache) drag the mean and are exactly
# what a single sample may catch. The warm-up calls are a different distribution altogether. On a
# GPU the experiment also times the GPU-only mistakes (a copy in the timed region, a host clock
# without synchronisation) as distributions of their own.

# %%
dists = timing.values["distributions"]
timing.figure("latency_distribution")

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
notebook.show(notebook.recorded_figures("timer_agreement"))

# %% [markdown]
# ## Is my speed-up real?
#
# Two timings of the *same* code differ by a few percent from run to run (clocks, temperature,
# other work), so "B is 3% faster" needs evidence. `compare(a, b)` times A and B in interleaved
# rounds (A-B, then B-A, ...) so that a drift of the machine hits both, estimates the ratio B/A
# with a distribution-free confidence interval (Hodges-Lehmann: the interval that goes with the
# Mann-Whitney rank test) and gives a verdict: **faster**, **slower**, **same** (the whole
# interval within ±2%) or **inconclusive** (measure more rounds). Its warnings (other work on the
# machine, a throttled GPU) travel with it and are printed under its figure.
#
# Here B is the same model on a batch of 2 instead of 1: is the second input nearly free?

# %%
model = build_model(S.latency_model, device=nb.device)
budget = dict(rounds=4, round_time_s=0.02) if nb.smoke else {}
batch = compare(model, model, args_a=model.make_input(1), args_b=model.make_input(2),
                label_a="batch 1", label_b="batch 2", **budget)
print(batch)

# %%
plots.comparison(batch, title=f"{S.latency_model} on {nb.device}")

# %% [markdown]
# The same call against itself is the control: a sound comparison says "same" (or, on a noisy
# machine, "inconclusive"), and "faster" or "slower" in at most 5% of such comparisons
# (`tests/test_compare.py` checks this by simulation, and that a true 3% difference is found in
# at least 95% of comparisons).

# %%
control = compare(model, model, args_a=model.make_input(1), args_b=model.make_input(1),
                  label_a="batch 1", label_b="batch 1 again", **budget)
print(control.summary)
plots.comparison(control)
