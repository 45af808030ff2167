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
# # 03 · Mixture-of-Experts offloading: experts split between the GPU and the CPU
#
# Mixtral-8x7B has 32 layers of 8 experts (~350 MB each in bf16): 90 GB of experts, more than a
# GPU holds. Fiddler-style offloading keeps some experts on the GPU and the rest in host memory.
# For every token and layer the router picks 2 experts; a **hit** is an expert already on the
# GPU. For a miss the engine either runs the expert **on the CPU** (moving a few activations)
# or **copies its weights** to the GPU (moving hundreds of MB), whichever finishes the layer
# sooner according to a cost model **measured on this machine**.
#
# This notebook: the cost model and the memory plan of this machine; a live sweep over the
# number of GPU-resident experts (tokens/s, prefill time, decode latency, hit rates); hit rates
# at full Mixtral scale from the simulator; a slider to explore it; and the GPU recordings.
# On a CPU-only machine "GPU" experts are just the ones on the fast path of the same CPU, so
# the timings teach the mechanics, not the speed-ups; the recorded GPU results show those.

# %%
# %matplotlib inline
from IPython.display import display

from toolkit import plots, report, widgets
from toolkit.env import resolve_device
from toolkit.moe.memory import plan_memory
from toolkit.moe.policies import POLICY_NAMES
from toolkit.moe.simulate import sweep

device = resolve_device("auto")
S = report.settings_for(device, quick=report.smoke_mode())
print(f"device: {device}, preset: {S.moe_preset} with {S.moe_layers} layers, smoke mode: {report.smoke_mode()}")

# %% [markdown]
# ## The model and this machine's cost model
#
# `moe_bench` builds the preset with random weights (no download; on a GPU the experts go to
# pinned host memory) and calibrates the cost model once per machine and expert shape: the CPU
# time of one expert against its token count, the GPU time, and the host-to-device copy of one
# expert's weights. A missed expert with few tokens (decode: one token) is cheaper on the CPU;
# with many tokens (prefill) copying its weights pays off beyond the break-even token count.
# A tiny Mixtral-shaped model replays the routing of a synthetic Mixtral-8x7B trace, so it sees
# Mixtral's expert popularity and locality.

# %%
bench = report.moe_bench(S.moe_preset, S.moe_layers, device, S.prompt_tokens)
p = bench.preset
print(f"{p.name}: {p.layers} layers x {p.experts} experts = {bench.total_experts} experts of "
      f"{p.expert_bytes() / 2**20:.2f} MiB ({p.dtype}); routing: {'synthetic Mixtral trace' if bench.router else 'model'}")
print(bench.cost_model.summary())

# %% [markdown]
# ## The memory plan
#
# How many experts can live on the device is measured, not guessed: free memory now, minus the
# KV cache for this generation, the activation peak (a dry run of the prefill on a GPU, an
# estimate on a CPU), the copy engine's staging buffers and a stated safety margin. On a CPU the
# "device" is host memory, so nearly everything fits.

# %%
plan = plan_memory(bench.model, S.prompt_tokens, S.new_tokens, device=device)
print(plan)

# %% [markdown]
# ## A live sweep over GPU-resident experts
#
# The same prompt, greedy decoding, `static-popularity` placement (Fiddler: the most popular
# experts stay on the GPU), one warm-up generation per budget. Decode steps are one token each,
# so their misses go to the CPU; the prefill's many tokens may copy experts instead.

# %%
budgets = sorted({round(f * bench.total_experts) for f in S.moe_fractions})
results = {k: report.offload_run(bench, k, S.moe_policy, S.new_tokens) for k in budgets}
sweep_table = report.sweep_frame(results)
display(sweep_table)

# %%
plots.offload_sweep(sweep_table, total_experts=bench.total_experts, title=f"{p.name} on {device} (live)")

# %%
plots.decode_latency_over_tokens({f"{k} GPU experts": r.decode_samples_ms for k, r in results.items()})

# %%
plots.latency_distribution({f"{k} GPU experts": r.decode_samples_ms for k, r in results.items()}, kind="ecdf")

# %% [markdown]
# Where do the hits come from? Decode hit rate per layer and expert for the middle budget (grey:
# the expert was never routed to). With a static placement an expert either always hits or never.

# %%
k_mid = budgets[len(budgets) // 2]
plots.hit_rate_heatmap(report.per_expert_hit_rate(results[k_mid]), title=f"{k_mid} of {bench.total_experts} experts on the GPU")

# %% [markdown]
# ## Hit rates at full Mixtral-8x7B scale: the simulator
#
# The simulator replays a routing trace (here 12,288 tokens of the synthetic Mixtral-8x7B trace,
# fitted to real routing counts and published locality) against a placement or caching policy,
# with the engine's own rules, in a fraction of a second. `belady` evicts the expert used
# farthest in the future: it knows the future, so in batch-1 decode no real policy beats it
# (in prefill, where one pass serves many tokens, it is a strong reference rather than an exact bound).

# %%
sim = sweep("synthetic-mixtral", list(POLICY_NAMES), S.sim_budgets)
plots.hit_rate_vs_gpu_experts(sim, phase="decode", total_experts=256)

# %% [markdown]
# ## Explore: GPU experts and policy
#
# The slider sets the number of GPU-resident experts (of 256) and the dropdown the policy; the
# hit rates and the per-layer heat map come from the simulator, instantly. The button runs the
# real engine on the small model with the same share of experts on the GPU and shows tokens/s,
# prefill time and the decode latency distribution.

# %%
explorer = widgets.moe_offload_widget(preset=S.moe_preset, layers=S.moe_layers, device=device,
                                      prompt_tokens=S.prompt_tokens, new_tokens=S.new_tokens)
display(explorer)

# %% [markdown]
# ## Recorded on the GPU
#
# `benchmarks/moe_decode.py` compared the offload schemes on Mixtral-8x7B dimensions (8 layers, bf16)
# at the same GPU expert budget, next to each run's roofline bound, and swept our engine over
# budgets; `benchmarks/moe_engine.py` checked the engine's logits and timed generation from all
# experts on the GPU down to none; `benchmarks/profile_cases.py` profiled one decode step, whose
# timeline shows the CPU experts running while the GPU works.

# %%
recorded = report.recorded_results()
decode_rec = recorded.get("moe_decode")
schemes = report.recorded_moe_schemes(decode_rec) if decode_rec else None
if schemes is None or not len(schemes):
    print("No GPU comparison of the offload schemes is present (data/gpu/moe_decode.json; run "
          "`PYTHONPATH=. python benchmarks/moe_decode.py` on a GPU machine).")
else:
    label = report.recorded_label(decode_rec)
    print(label)
    display(schemes)
    display(plots.scheme_comparison(schemes, title=label))
    decode_sweep = report.recorded_moe_decode_sweep(decode_rec)
    if len(decode_sweep):
        display(plots.offload_sweep(decode_sweep, total_experts=decode_sweep.attrs["total_experts"], title=label))

# %%
engine_rec, profile_rec = recorded.get("moe_engine"), recorded.get("profile_cases")
if engine_rec is None or not len(report.recorded_moe_sweep(engine_rec)):
    print("No GPU recording of the engine is present (data/gpu/moe_engine.json; run "
          "`PYTHONPATH=. python benchmarks/moe_engine.py` on a GPU machine).")
else:
    label = report.recorded_label(engine_rec)
    print(label)
    if engine_rec.get("cost_model_summary"):
        print(engine_rec["cost_model_summary"])
    gpu_sweep = report.recorded_moe_sweep(engine_rec)
    display(gpu_sweep)
    display(plots.offload_sweep(gpu_sweep, total_experts=gpu_sweep.attrs["total_experts"], title=label))
    display(plots.decode_latency_over_tokens(report.recorded_decode_samples(engine_rec)))
timeline = report.recorded_timeline(profile_rec) if profile_rec else None
if timeline is None:
    print("No GPU profile of a decode step is present (data/gpu/profile_cases.json).")
else:
    display(plots.timeline_gantt(timeline, title=report.recorded_label(profile_rec)))
