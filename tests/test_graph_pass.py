"""Captured decode passes with missed experts (``toolkit.moe.graph_pass``): results, counts, when they are taken.

On CPU the pass runs eagerly (the host function called in place, conditions read on the host, torch's ops for the
GPU's rows) inside the whole-step graph's stand-in (``EagerCapture``), so the engine's bookkeeping and the
arithmetic of the split are checked here; the GPU tests at the end check the captured graph itself.
"""

import functools
import os

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import conditional, gemv, graph_pass
from toolkit.moe import generation as G
from toolkit.moe.costs import CostModel
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe
from toolkit.moe.prompts import random_prompts

CM = CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0)  # one-token CPU expert 1 ms, copy 3: share 0.25

needs_kernel = pytest.mark.skipif(isinstance(graph_pass._library(), str),
                                  reason="the CPU kernel or the host function cannot be built here")


@pytest.fixture(scope="module")
def model():
    return build_moe("tiny-mixtral", seed=0, dtype=torch.bfloat16)


def test_the_share_is_where_copy_and_cpu_end_together_in_whole_blocks():
    assert CM.balanced_share() == 0.25  # 1 / (1 + 3)
    assert graph_pass.share_units(0.25, 128) == 32
    assert graph_pass.share_units(0.406, 14336) == 5824  # 364 blocks of 16
    assert graph_pass.share_units(0.0, 128) == 0 and graph_pass.share_units(1.0, 100) == 100
    with pytest.raises(ToolkitError, match=r"\[0, 1\]"):
        graph_pass.share_units(1.5, 128)


def test_a_strided_copy_on_the_cpu_copies_the_view_and_refuses_other_shapes():
    src = torch.arange(6 * 10, dtype=torch.bfloat16).view(6, 10)
    dst = torch.zeros(6, 10, dtype=torch.bfloat16)
    conditional.copy_2d(dst[:, :4], src[:, :4])
    assert torch.equal(dst[:, :4], src[:, :4]) and not dst[:, 4:].any()
    with pytest.raises(ValueError, match="2-D views"):
        conditional.copy_2d(dst[:, :4], src[:, :3])
    with pytest.raises(ValueError, match="2-D views"):
        conditional.copy_2d(dst.t()[:4], src.t()[:4])  # not unit stride in the last dimension


@needs_kernel
def test_generate_gives_the_per_layer_engines_tokens_hits_and_one_graph_a_step(model):
    ids, mask = random_prompts(model.config.vocab_size, [6], seed=1)
    got = {}
    for captured in (True, False):
        off = offload(model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True, graph_misses=captured)
        try:
            run = G.generate(off, ids, mask, max_new_tokens=8, ignore_eos=True)
            got[captured] = dict(ids=run.sequences, stats=off.stats.to_dict(), info=off.to_dict())
        finally:
            off.restore()
    on, per_layer = got[True], got[False]
    assert on["info"]["graph_misses"] == {"layers": 2, "units": 32, "share": 0.25, "reason": None, "balanced": None}
    assert per_layer["info"]["graph_misses"]["reason"] == "switched off"
    assert on["ids"] == per_layer["ids"]
    for key in ("hit_rate", "activations", "hits", "passes_used", "passes_hit"):
        assert on["stats"][key] == per_layer["stats"][key], key
    # the 7 decode steps after the first: every layer's missed experts split once per pass, in the step's graph
    assert on["info"]["graphs"]["model_captures"] == 1 and on["info"]["graphs"]["model_replays"] == 5
    decode_missed = sum(a - h for a, h in zip(np.ravel(on["stats"]["activations"]["decode"]),
                                              np.ravel(on["stats"]["hits"]["decode"])))
    assert on["stats"]["split_expert_calls"] >= decode_missed > 0
    assert on["stats"]["bytes_copied"] >= decode_missed * 3 * 32 * model.config.hidden_size * 2  # GPU shares copied


@needs_kernel
@pytest.mark.parametrize("resident", [[], [0, 3], list(range(8))])
def test_a_pass_equals_the_whole_experts_within_bf16_rounding(model, resident):
    """One layer's pass against torch's whole experts: resident rows whole on the "GPU", missed rows split at k
    between a staging slot and the host function; with none or all of the layer's experts resident."""
    E, D = model.config.num_local_experts, model.config.hidden_size
    exp = build_moe("tiny-mixtral", seed=0, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, D, generator=g).to(torch.bfloat16)
    index, weights = torch.tensor([[2, 3]]), torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        want = exp.model.layers[0].mlp.experts(hidden, index, weights)
    placement = np.zeros((2, E), dtype=bool)
    placement[0, resident] = True
    placement[1, 0] = True  # the other layer is not all-resident either
    off = offload(exp, gpu_experts=int(placement.sum()), placement=placement, device="cpu", cost_model=CM, graphs=True)
    try:
        mod = off.experts[0]
        if len(resident) == E:
            assert mod.graph_pass is None and mod.stacked is not None  # a sync-free layer, not a captured one
            return
        with torch.no_grad():
            got = mod.graph_pass(hidden, index, weights, functools.partial(mod._count, phase="decode"))
        counts = off.device_counts.t["decode"][0, 0]
        assert counts[2] == 1 and counts[3] == 1 and int(counts.sum()) == 2
        assert mod.graph_pass.take_counts()[0] == sum(e not in resident for e in (2, 3))
    finally:
        off.restore()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_a_pass_refuses_more_than_one_token(model):
    off = offload(model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True)
    try:
        gp = off.experts[0].graph_pass
        with pytest.raises(ToolkitError, match="one token"):
            gp(torch.zeros(2, model.config.hidden_size, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.long),
               torch.zeros(2, 2), functools.partial(off.experts[0]._count, phase="decode"))
    finally:
        off.restore()


@needs_kernel
@pytest.mark.parametrize("kwargs,reason", [
    (dict(graph_misses=False), "switched off"),
    (dict(graphs=False), "graphs off"),
    (dict(policy="lru"), "moves experts"),
    (dict(decision="fiddler", serial=True), "served whole (decision fiddler, serial)"),
    (dict(decision="cpu"), "served whole (decision cpu)"),
    (dict(cpu_kernel=False), "CPU kernel is off"),
    (dict(gpu_experts="all"), "every expert resident"),
])
def test_when_passes_are_not_captured_the_engine_says_why(model, kwargs, reason):
    kw = {**dict(gpu_experts=5, device="cpu", cost_model=CM, graphs=True), **kwargs}
    off = offload(model, **kw)
    try:
        d = off.graph_misses_dict()
        assert d["layers"] == 0 and reason in d["reason"]
        assert all(m.graph_pass is None for m in off.experts)
    finally:
        off.restore()


def test_the_schedule_of_the_per_layer_path_does_not_switch_captured_passes_off(model):
    """Split and overlap are switches of the per-layer path (prefill, beams): a schedule race that picks a
    schedule without splits keeps decode passes captured."""
    off = offload(model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True, split=False, overlap=False)
    try:
        assert off.graph_misses_dict()["layers"] == 2
    finally:
        off.restore()


def test_a_float32_model_keeps_the_per_layer_path():
    model = build_moe("tiny-mixtral", seed=0)  # float32
    off = offload(model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True)
    try:
        assert "bf16 only" in off.graph_misses_dict()["reason"]
    finally:
        off.restore()


def test_the_cli_says_how_decode_passes_ran():
    from toolkit.cli.moe import _graph_misses_line

    on = _graph_misses_line({"layers": 8, "units": 5824, "share": 0.406, "reason": None}, 8)
    assert on.startswith("8 of 8 layers: each missed expert's units [0, 5824) (41%) copied")
    assert "off (policy lru moves experts)" in _graph_misses_line(
        {"layers": 0, "units": 0, "share": 0.0, "reason": "policy lru moves experts"}, 8)
    assert _graph_misses_line({"layers": 0, "reason": "every expert resident"}, 8) == ""
    assert _graph_misses_line(None, 8) == ""


def test_the_moe_command_has_the_switch_and_the_session_passes_it_on():
    from moe_records import moe_settings

    from toolkit.moe.run import MoESession

    assert moe_settings().graph_misses is True
    off = moe_settings("--no-graph-misses", "--preset", "tiny-mixtral", "--device", "cpu", "--gpu-experts", "4",
                       "--routing", "model")
    assert off.graph_misses is False
    with MoESession(off) as session:
        with session.offload() as engine:
            assert engine.options.graph_misses is False and engine.graph_misses_dict()["reason"] == "switched off"


# ------------------------------------------------------------------ the kernels' units

@pytest.fixture
def interpreted():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is for machines without a GPU (the gpu tests run the kernel itself)")


def test_the_pass_kernels_stop_at_each_rows_units(interpreted):
    g = torch.Generator().manual_seed(4)
    E, D, inter = 4, 64, 40
    gu = torch.randn(E, 2 * inter, D, generator=g) * 0.1
    dn = torch.randn(E, D, inter, generator=g) * 0.1
    x = torch.randn(1, D, generator=g)
    index = torch.tensor([1, 3])
    units = torch.tensor([inter, 16], dtype=torch.int32)
    route = torch.tensor([[0.6, 0.4]])
    a = gemv.expert_gate_up_act(x, index, gu, per_x=2, units=units)
    full = gemv.expert_gate_up_act(x, index, gu, per_x=2)
    torch.testing.assert_close(a[0], full[0])
    torch.testing.assert_close(a[1, :16], full[1, :16])
    assert not a[1, 16:].any()  # zeros past the row's units
    got = gemv.expert_down(a, index, dn, route, units=units)
    want = route[0, 0] * (dn[1] @ full[0]) + route[0, 1] * (dn[3][:, :16] @ full[1, :16])
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="units"):
        gemv.expert_down(a, index, dn, route, units=torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------ on the GPU

@pytest.mark.gpu
def test_gpu_captured_steps_give_the_per_layer_engines_tokens_and_counts():
    """On CUDA in bf16 with 5 of 16 experts resident: decode steps captured whole (the copy kernel, host
    functions) give the per-layer engine's first tokens, logits within bf16 rounding, and the same hits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = graph_pass.why_not(torch.device("cuda"), torch.bfloat16, torch.nn.functional.silu)
    if why:
        pytest.skip(why)
    model = build_moe("tiny-mixtral", device="cuda", dtype=torch.bfloat16, seed=0, expert_device="cpu")
    ids, mask = random_prompts(model.config.vocab_size, [7], seed=2)
    got = {}
    for captured in (True, False):
        off = offload(model, gpu_experts=5, device="cuda", cost_model=CM, graph_misses=captured)
        try:
            runs = [G.generate(off, ids, mask, max_new_tokens=12, ignore_eos=True) for _ in range(2)]
            off.reset_stats()
            run = G.generate(off, ids, mask, max_new_tokens=12, ignore_eos=True)
            got[captured] = dict(ids=[r.sequences for r in runs] + [run.sequences], stats=off.stats.to_dict(),
                                 info=off.to_dict())
        finally:
            off.restore()
    on, per_layer = got[True], got[False]
    assert on["info"]["graph_misses"]["layers"] == 2
    assert on["info"]["graphs"]["model_replays"] > 0 and on["info"]["graphs"]["model_reason"] is None
    assert on["ids"][0] == on["ids"][1] == on["ids"][2]  # every replay the same tokens as the first run
    first = [s[:len(s) - 11] for s in on["ids"][0]]
    assert first == [s[:len(s) - 11] for s in per_layer["ids"][0]]
    if on["ids"][0] == per_layer["ids"][0]:
        for key in ("activations", "hits"):
            assert on["stats"][key] == per_layer["stats"][key], key
    assert on["stats"]["split_expert_calls"] > 0


@pytest.mark.gpu
def test_gpu_a_strided_copy_lands_in_place_inside_and_outside_a_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    src = torch.arange(64 * 100, dtype=torch.bfloat16).view(64, 100).pin_memory()
    dst = torch.zeros(64, 100, dtype=torch.bfloat16, device="cuda")
    conditional.copy_2d(dst[:, :30], src[:, :30])
    torch.cuda.synchronize()
    assert torch.equal(dst[:, :30].cpu(), src[:, :30]) and not dst[:, 30:].any()
    dst.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        conditional.copy_2d(dst[:, 10:50], src[:, 10:50])
    src[:, 10:50] += 1  # a replay reads the host memory as it is then
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst[:, 10:50].cpu(), src[:, 10:50]) and not dst[:, :10].any()


@needs_kernel
def test_the_split_moves_once_to_the_rates_the_host_function_measured(model):
    """The host function times itself; balancing reads that, moves every layer's split to CPU / (CPU + copy) at
    those rates, drops the captured graphs, and the next steps capture again and give the same tokens."""
    ids, mask = random_prompts(model.config.vocab_size, [6], seed=1)
    off = offload(model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True)
    try:
        assert off.balance_graph_misses() is None  # nothing served yet
        first = G.generate(off, ids, mask, max_new_tokens=8, ignore_eos=True).sequences
        passes = [m.graph_pass for m in off.experts]
        served = sum(g.served()[0] for g in passes)
        for g in passes:  # as if each missed expert's CPU share (3/4 of it) took 3 ms: a whole one 4 ms
            g.job.busy_s = 3e-3 * g.served()[0]
        b = off.balance_graph_misses(min_experts=1)
        assert b["experts_measured"] == served and b["first_units"] == 32
        assert b["cpu_ms_per_expert"] == pytest.approx(4.0) and b["copy_ms_per_expert"] == pytest.approx(3.0)
        assert b["share"] == pytest.approx(4 / 7, abs=1e-3) and b["units"] == 80  # 0.571 x 128 in blocks of 16
        assert all(g.k == 80 and g.job.k == 80 and int(g.units_missed[0]) == 80 for g in passes)
        assert off.graph_misses_dict()["units"] == 80 and off.graph_misses_dict()["balanced"] == b
        assert off.balance_graph_misses(min_experts=1) is None  # once
        captures = off.graphs.model_captures
        again = G.generate(off, ids, mask, max_new_tokens=8, ignore_eos=True).sequences
        assert off.graphs.model_captures == captures + 1 and again == first
    finally:
        off.restore()


def test_the_cli_line_says_when_the_split_was_balanced():
    from toolkit.cli.moe import _graph_misses_line

    line = _graph_misses_line({"layers": 8, "units": 6848, "share": 0.478, "reason": None,
                               "balanced": {"first_units": 6000, "cpu_ms_per_expert": 6.6, "copy_ms_per_expert": 6.55,
                                            "experts_measured": 200, "share": 0.502, "units": 6848}}, 8)
    assert "split balanced on the rates measured in this run (a whole expert 6.60 ms on the CPU" in line
    assert "the calibration's split was [0, 6000))" in line


@needs_kernel
def test_a_session_does_not_race_schedules_that_captured_decode_steps_do_not_take():
    from toolkit.moe.run import MoESession, MoESettings

    s = MoESettings(preset="tiny-mixtral", dtype="bfloat16", gpu_experts=5, device="cpu", routing="model",
                    new_tokens=4, warmup_tokens=2)
    with MoESession(s) as session:  # on a CPU the session keeps graphs off: an engine with them, on its model
        engine = offload(session.model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True)
        assert engine.graph_misses_dict()["layers"] == 2
        choice = session.choose_schedule(engine)
        assert not choice.measured and "captured whole at batch 1" in choice.reason
        assert not session.choose_schedule(engine, beams=2).reason.startswith("not measured: decode steps")
        engine.restore()


def test_pass_kernels_that_do_not_run_here_are_found_when_the_engine_is_built(interpreted, monkeypatch):
    device = torch.device("cpu")  # the interpreter runs the kernels on CPU tensors
    graph_pass.kernels_fail.cache_clear()
    try:
        assert graph_pass.kernels_fail(device) is None
        graph_pass.kernels_fail.cache_clear()

        def fails(*a, **kw):
            raise RuntimeError("no compiler for this GPU")

        monkeypatch.setattr(gemv, "expert_down", fails)
        assert graph_pass.kernels_fail(device) == "the pass kernels do not run here: RuntimeError: no compiler for " \
                                                  "this GPU"
    finally:
        graph_pass.kernels_fail.cache_clear()


@needs_kernel
def test_the_host_function_stamps_each_call_in_a_ring(model):
    """``keep_stamps`` makes the job record every call's start and end (Unix seconds) in a ring of the last calls,
    for a profile to set beside the GPU's activities; before it, reading stamps is one clear error."""
    import time

    off = offload(model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True)
    try:
        share = off.experts[0].graph_pass.share
        with pytest.raises(ToolkitError, match="keep_stamps"):
            share.stamps(0)
        with pytest.raises(ToolkitError, match="at least one"):
            share.keep_stamps(0)
        share.keep_stamps(2)
        lib, job = graph_pass._library(), share.job
        first, t0 = int(job.calls), time.time()
        for _ in range(3):
            lib.toolkit_host_share(graph_pass.ctypes.byref(job))
        got = share.stamps(first)
        assert len(got) == 2 and int(job.calls) == first + 3  # the ring holds the last two calls
        assert all(t0 - 1 <= a <= b <= time.time() + 1 for a, b in got) and got[0][1] <= got[1][0]
        assert share.stamps(first + 2) == got[1:]
    finally:
        off.restore()


@needs_kernel
@pytest.mark.parametrize("top_k,k,threads", [(2, 16, 2), (4, 0, 3), (3, 48, 1), (2, 64, 2)])
def test_the_host_function_sums_the_missed_shares_as_torch_does(top_k, k, threads):
    """The host function shares the rows of every missed expert among its threads in one parallel region; its sum
    equals torch's ops on units [k, I) of each (SiLU and each projection rounded to bf16, the sum in float32), and
    does not depend on the thread count. Odd sizes: runs of rows that cross the gate/up and expert boundaries,
    rows beyond the last whole block, a thread with no down rows."""
    E, D, inter = 6, 40, 72  # D not a multiple of 16 rows a thread, inter - k not either
    g = torch.Generator().manual_seed(top_k * 100 + k)
    gate_up = (torch.randn(E, 2 * inter, D, generator=g) * 0.2).to(torch.bfloat16)
    down = (torch.randn(E, D, inter, generator=g) * 0.2).to(torch.bfloat16)
    resident = np.zeros(E, dtype=bool)
    resident[1] = True
    sel = [0, 1, 2, 4, 5][:top_k]  # expert 1 resident: the function skips it
    w = torch.rand(top_k, generator=g)
    x = torch.randn(D, generator=g).to(torch.bfloat16)
    lib = graph_pass._library()
    out = {}
    for n in (threads, 1):
        share = graph_pass.HostShare(gate_up, down, resident, top_k, k, n, pin=False)
        share.sel[:], share.w[:], share.x[:] = torch.tensor(sel), w, x
        lib.toolkit_host_share(graph_pass.ctypes.byref(share.job))
        out[n] = share.y.clone()
        assert int(share.job.experts) == sum(e != 1 for e in sel)
    assert torch.equal(out[threads], out[1])
    want = torch.zeros(D)
    for s, e in enumerate(sel):
        if e == 1:
            continue
        gate = F_linear(x, gate_up[e, k:inter])
        up = F_linear(x, gate_up[e, inter + k:])
        act = (torch.nn.functional.silu(gate.float()).to(torch.bfloat16).float() * up.float()).to(torch.bfloat16)
        want += w[s] * F_linear(act, down[e, :, k:]).float()
    torch.testing.assert_close(out[threads].float(), want, atol=1e-2, rtol=1e-2)


def F_linear(x, w):
    """x [K] @ w [N, K].T in float32, rounded to bf16 as the CPU kernel rounds."""
    return (w.float() @ x.float()).to(torch.bfloat16)


def test_the_host_function_takes_at_most_its_top_k_experts():
    gu, dn = torch.zeros(2, 32, 16, dtype=torch.bfloat16), torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(ToolkitError, match="1 to 64 experts a token, not 65"):
        graph_pass.HostShare(gu, dn, np.zeros(2, dtype=bool), graph_pass.MAX_TOP_K + 1, 0, 1, pin=False)


@needs_kernel
@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen3-moe"])
def test_a_replayed_routing_keeps_the_routers_top_k_for_the_captured_passes(preset):
    """OLMoE's and Qwen3's blocks keep top-k on their router only; once a replayed routing takes the routers'
    place the captured passes still take one staging slot per expert of a token."""
    from toolkit.moe.offload import router_top_k
    from toolkit.moe.run import MoESession

    with MoESession(preset=preset, dtype="bfloat16", device="cpu", routing="uniform", prompt_tokens=6,
                    new_tokens=4) as session:
        k = session.preset.top_k
        off = offload(session.model, gpu_experts=5, device="cpu", cost_model=CM, graphs=True,
                      routing=session.router)
        try:
            assert router_top_k(off._blocks) == k == off.router_top_k  # the replay says its router's top-k
            assert off.graph_misses_dict()["layers"] == session.preset.layers
            assert all(m.graph_pass.top_k == k for m in off.experts)
            ids, mask = random_prompts(session.preset.vocab, [6], seed=2)
            run = G.generate(off, ids, mask, max_new_tokens=4, ignore_eos=True)
            assert len(run.sequences[0]) == 4  # the new tokens
        finally:
            off.restore()
