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
#
# On a GPU, a decode step also replays the dense part of each layer (norms, attention, residual)
# from one CUDA graph per layer instead of launching its ~25 kernels from Python: on an H200 that
# made the offloaded decode 1.47x faster at 14 of 64 experts (16.2 against 11.0 tokens/s, 94% of
# the host-memory roofline). The MoE block stays eager: its routing decides, on the host, what the
# CPU computes and what is copied. `MoESettings(graphs=False)` (`moe --no-graphs`) turns it off.
# A layer whose experts are all resident never syncs: its experts are chosen on the device (a
# Triton GEMV for decode rows). With every expert resident a whole decode step is one graph, and
# the model's norms and each pass's experts run as fused Triton kernels (`offload(fused=False)`
# is the ablation): an H200 decoded 312.6-333.2 tokens/s at 8 layers, 53-56% of its HBM roofline
# and 3.0x transformers' eager `generate`, and 96.9 at 32 layers (3.38x).
# With some experts missing, a batch-1 decode step under a static placement is one graph as well
# (`toolkit.moe.graph_pass`): each missed expert is split, part copied to the GPU by one kernel that
# picks the expert on the GPU (`toolkit.moe.share_copy`), the rest computed on the CPU by a host
# function, at the share where both end together on this machine's measured rates. An H200 decoded
# 22.9-24.7 tokens/s at 14 of 64 experts, 80-81% of the host-memory roofline and 1.18x the
# per-layer path (`offload(graph_misses=False)`), and the whole 32-layer model at 5.91 tokens/s,
# 78% of its roofline.

# %%
# %matplotlib inline
from IPython.display import display

from toolkit import notebook, plots, widgets
from toolkit.experiments import moe_experiment, moe_settings, simulation_experiment
from toolkit.moe.run import MoESession

nb = notebook.setup()
S = nb.settings
print(f"{nb}, preset: {S.moe_preset} with {S.moe_layers} layers")

# %% [markdown]
# ## The model and this machine's cost model
#
# `MoESession` is the one path every MoE run takes (the `moe` command, the report, the widget
# below): it builds the preset with random weights (no download; on a GPU the experts go to
# pinned host memory) and calibrates the cost model once per machine and expert shape: the CPU
# time of one expert against its token count, the GPU time, and the host-to-device copy of one
# expert's weights. A missed expert with few tokens (decode: one token) is cheaper on the CPU;
# with many tokens (prefill) copying its weights pays off beyond the break-even token count.
# On a GPU it also times a CPU expert while copies stream in, and a copy beside a CPU expert:
# both read host memory, so each slows the other (the summary's "while copying" part), and a
# prefill layer is planned with those slower speeds. It also runs both at once ("both read ...
# together"): the two paths together can read host memory faster than the CPU threads alone,
# and the faster of the two rates is what the plans share between the paths and what the
# roofline bound counts. Each CPU expert and copy reads a different copy of the weights, so the
# timings come from memory as in a run, not from a CPU cache that holds part of one expert.
# A bf16 CPU expert at a few tokens only streams its weights, and torch's matmul does not keep up
# with memory there; the calibration also times the toolkit's own kernel (`toolkit.moe.cpu_gemv`,
# compiled on first use; AMX tiles for passes of 5 tokens and more on Xeons that have them)
# against torch's, in turn, and CPU experts use it up to the token count where it won, or on
# to where the two times cross (the summary's "toolkit kernel" part: "passes of up to N
# tokens", or "of any size"; absent where torch's was faster).
# A tiny Mixtral-shaped model replays the routing of a synthetic Mixtral-8x7B trace, so it sees
# Mixtral's expert popularity and locality. `moe_settings(S, device)` are the report's settings.

# %%
session = MoESession(moe_settings(S, nb.device))
p = session.preset
print(f"{p.name}: {p.layers} layers x {p.experts} experts = {session.total_experts} experts of "
      f"{p.expert_bytes() / 2**20:.2f} MiB ({p.dtype}); routing: {session.routing_name}")
print(session.cost_model.summary())

# %% [markdown]
# ## The memory plan
#
# How many experts can live on the device is measured, not guessed: free memory now, minus the
# KV cache for this generation, the activation peak (a dry run of the prefill on a GPU, an
# estimate on a CPU), the copy engine's staging buffers and a stated safety margin. On a CPU the
# "device" is host memory, so nearly everything fits.

# %%
_, plan = session.memory_plan()
print(plan)

# %% [markdown]
# ## A live sweep over GPU-resident experts
#
# `moe_experiment` is the report's MoE experiment: the same prompt, greedy decoding,
# `static-popularity` placement (Fiddler: the most popular experts stay on the GPU), warm-up
# generations until decode steps are steady, for each share of experts on the GPU. Decode steps
# are one token each, so their misses go to the CPU; the prefill's many tokens may copy experts
# instead. Then it profiles one decode step of the middle budget.
#
# The figures: tokens/s, prefill time and hit rates against the budget; the per-token decode
# latency; where the decode tokens go for the middle budget (each expert's share of its layer's
# routed tokens, the GPU-resident experts outlined: with a static placement the hit rate is the
# share on the outlined cells; grey where an expert was never routed to); and the profiled step's
# timeline, what runs where and when.

# %%
moe = moe_experiment(S, nb.device, session=session, progress=True)
moe.values["sweep"]

# %%
notebook.show(moe)

# %%
results = moe.values["results"]
plots.latency_distribution({f"{k} GPU experts": r.generation.decode_samples_ms for k, r in results.items()},
                           kind="ecdf")

# %% [markdown]
# ## Hit rates at full Mixtral-8x7B scale: the simulator
#
# The simulator replays a routing trace (here 12,288 tokens of the synthetic Mixtral-8x7B trace,
# fitted to real routing counts and published locality) against a placement or caching policy,
# with the engine's own rules, in a fraction of a second. `belady` evicts the expert used
# farthest in the future: it knows the future, so in batch-1 decode no real policy beats it
# (in prefill, where one pass serves many tokens, it is a strong reference rather than an exact bound).

# %%
notebook.show(simulation_experiment(S))

# %% [markdown]
# ## Explore: GPU experts and policy
#
# The slider sets the number of GPU-resident experts (of 256) and the dropdown the policy; the
# hit rates and the per-layer heat map come from the simulator, instantly. The button runs the
# real engine (the session above) with the same share of experts on the GPU and shows tokens/s,
# prefill time and the decode latency distribution.

# %%
explorer = widgets.moe_offload_widget(session=session)
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
notebook.show(notebook.recorded_figures("moe_decode"))

# %%
notebook.show(notebook.recorded_figures("moe_engine"))

# %%
notebook.show(notebook.recorded_figures("profile_cases"))

# %% [markdown]
# A GPU profile shows kernels and copies, but an offloaded decode step is held on the host: each layer
# waits for its routing, plans, runs its CPU experts and hands their results back before the next layer
# can start. `benchmarks/decode_timeline.py` has the engine mark those moments (`toolkit.moe.timeline`)
# and splits a step into per-layer segments for each CPU-expert schedule: about three quarters of a step is
# the CPU experts, most of the rest is host work around them, which no schedule hides. A decode step
# captured whole has none of it; the engine then takes that path at batch 1 (the figure after the
# timeline compares the two on one host).

# %%
notebook.show(notebook.recorded_figures("decode_timeline_h200"))

# %%
notebook.show(notebook.recorded_figures("moe_decode_h200_captured"))

# %% [markdown]
# Inside a step captured whole there is no host work to split: `benchmarks/captured_step.py` profiles one and
# cuts each layer at its copies, with the host function stamping its own start and end. The CPU's share,
# with the copies beside it, streams for most of the step; what keeps the step from its bound is the rate the
# two paths reach together, not time where neither runs.

# %%
notebook.show(notebook.recorded_figures("captured_step_h200"))

# %% [markdown]
# Between steps, `generate` itself holds the GPU: transformers asks after every step whether to stop, a
# sync, and prepares the next step only then. Where a run cannot end before `max_new_tokens`
# (`ignore_eos`, one beam), `toolkit.moe.generation.generate` lets transformers read that answer one step
# late, so the host queues the next step while the GPU runs this one; the tokens are the same.
# `benchmarks/stop_check.py` measures both ways on each target: with every expert resident the step becomes
# the GPU's own time. The unmodified model's rounds disagreed on that host, so the figure leaves them out
# and says why.

# %%
notebook.show(notebook.recorded_figures("stop_check_h200"))
