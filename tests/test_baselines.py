"""Peer schemes as engine configurations: their behaviour, equal outputs, and the split plan of ours."""

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import roofline as R
from toolkit.moe.baselines import BASELINES, get_baseline
from toolkit.moe.costs import CostModel
from toolkit.moe.offload import OffloadedExperts, offload
from toolkit.moe.presets import build_moe, moe_blocks
from toolkit.moe.run import cache_keyword, output_cache

# the lent machine's Mixtral expert: a pinned copy (6.4 ms) costs about a CPU expert (7.2 ms): ours splits
LENT = CostModel.fixed(cpu=(7.2, 0.0), gpu=(0.115, 0.0), copy_ms=6.4)
NAMES = tuple(BASELINES)


@pytest.fixture(scope="module")
def mixtral():
    return build_moe("tiny-mixtral", seed=0)


@torch.no_grad()
def prefill_and_decode(model, ids, steps=3, like=None):
    """Logits of a prefill [1, S, V] and ``steps`` batch-1 greedy decode passes [1, 1, V] with the KV cache."""
    out = model(input_ids=ids, use_cache=True)
    logits, past = [out.logits], output_cache(out)
    for i in range(steps):
        tok = (like or logits)[i][:, -1].argmax(-1, keepdim=True)  # [1, 1]
        out = model(input_ids=tok, use_cache=True, **{cache_keyword(model): past})
        logits.append(out.logits)
        past = output_cache(out)
    return logits


def prompt(batch, tokens, seed=0):
    """Seeded random prompt ids [batch, tokens] (no special tokens)."""
    return torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- the configurations ---------------------------------------------------------------------------------

def test_each_baseline_states_its_engine_settings():
    pop = np.arange(16, dtype=float).reshape(2, 8)  # expert 7 of layer 1 is the most popular
    f = get_baseline("fiddler-serial").offload_kwargs(3, 2, 8, pop)
    assert (f["decision"], f["serial"], f["pageable_copies"], f["split"]) == ("fiddler", True, True, False)
    assert np.flatnonzero(f["placement"]).tolist() == [13, 14, 15] and f["gpu_experts"] == 3  # global top 3
    o = get_baseline("ours").offload_kwargs(3, 2, 8, pop)
    assert (o["decision"], o["serial"], o["pageable_copies"], o["split"]) == ("makespan", False, False, True)
    assert np.array_equal(o["placement"], f["placement"])  # same placement as Fiddler: only the engine differs
    c = get_baseline("copy-on-demand").offload_kwargs(10, 2, 8, pop)
    assert (c["decision"], c["serial"], c["pageable_copies"]) == ("copy", True, True)
    assert np.flatnonzero(c["placement"]).tolist() == list(range(10))  # accelerate's device map: in module order
    lru = get_baseline("lru-copy").offload_kwargs(4, 2, 8, pop)
    assert lru["policy"].name == "lru" and lru["decision"] == "copy" and not lru["pageable_copies"]
    assert lru["policy"] is not get_baseline("lru-copy").offload_kwargs(4, 2, 8)["policy"]  # fresh cache state
    a = get_baseline("all-gpu").offload_kwargs(0, 2, 8)
    assert a["gpu_experts"] == 16 and a["placement"].all()
    assert get_baseline("ours").placement_for(5, 2, 8).sum(axis=1).tolist() == [3, 2]  # no profile: spread evenly
    assert get_baseline("copy-on-demand").token_cap == 16 and get_baseline("ours").to_dict()["name"] == "ours"
    with pytest.raises(ToolkitError, match="unknown baseline"):
        get_baseline("deepspeed")
    with pytest.raises(ToolkitError, match="between 0 and 16"):
        get_baseline("ours").placement_for(17, 2, 8)


@pytest.mark.parametrize("name", NAMES)
def test_every_baseline_gives_the_reference_outputs(mixtral, name):
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = prefill_and_decode(mixtral, ids)
    off = get_baseline(name).offload(mixtral, 4, device="cpu", cost_model=LENT)
    try:
        assert max_diff(ref, prefill_and_decode(mixtral, ids, like=ref)) < 1e-4
    finally:
        off.restore()
    assert not any(isinstance(b.experts, OffloadedExperts) for b in moe_blocks(mixtral))


class FixedRouting:
    """The same hand-made routing [T, K] in every layer; ``decode`` for one-token passes."""

    def __init__(self, index, weights, decode=((3, 4),)):
        self.index, self.weights = torch.tensor(index), torch.tensor(weights)
        self.decode = torch.tensor(decode)

    def route(self, layer, hidden, phase):
        if hidden.shape[0] == 1:
            return self.decode, torch.tensor([[0.7, 0.3]])
        return self.index, self.weights


def test_fiddler_serial_computes_misses_one_by_one_on_the_cpu_and_copies_only_big_ones(mixtral, monkeypatch):
    # prefill: 12 tokens; expert 3 gets all 12 (>= 10: Fiddler copies it), expert 4 one, expert 5 eleven
    index = [[3, 5]] * 11 + [[3, 4]]
    routing = FixedRouting(index, [[0.5, 0.5]] * 12)
    pop = np.zeros((2, 8))
    pop[:, 0] = 1.0  # expert 0 of each layer resident
    off = get_baseline("fiddler-serial").offload(mixtral, 2, device="cpu", popularity=pop, cost_model=LENT,
                                                  routing=routing)

    def never(*a, **k):
        raise AssertionError("fiddler-serial must not use the overlapped path or the worker")

    monkeypatch.setattr(OffloadedExperts, "_overlapped", never)
    monkeypatch.setattr(OffloadedExperts, "_cpu_job", never)
    try:
        assert off.executor is None and off.serial and off.pageable_copies
        prefill_and_decode(mixtral, prompt(1, 12), steps=4)
        s = off.stats
        assert s.copy_expert_calls == 2 * 2  # experts 3 and 5 in both layers, prefill only
        assert s.cpu_expert_calls == 2 * 1 + 4 * 2 * 2  # prefill: expert 4; decode: experts 3 and 4, 4 passes
        assert s.split_expert_calls == 0 and s.bytes_copied == 4 * off.bytes_per_expert
        assert s.forwards["decode"] == 4 * 2
    finally:
        off.restore()


def test_copy_on_demand_copies_every_miss_at_every_use_and_never_computes_on_the_cpu(mixtral):
    off = get_baseline("copy-on-demand").offload(mixtral, 5, device="cpu", cost_model=LENT)
    try:
        start = off.placement.copy()
        assert start[0, :5].all() and start.sum() == 5  # the first experts, in module order
        prefill_and_decode(mixtral, prompt(1, 6), steps=3)
        s = off.stats
        assert s.cpu_expert_calls == s.cpu_tokens == 0
        missed = sum(R.reads_from_stats(s, p).missed for p in ("prefill", "decode"))
        assert s.copy_expert_calls == missed > 0 and s.bytes_copied == missed * off.bytes_per_expert
        assert np.array_equal(off.placement, start)  # nothing is cached
    finally:
        off.restore()


def test_lru_copy_keeps_what_it_copies_and_never_computes_on_the_cpu(mixtral):
    off = get_baseline("lru-copy").offload(mixtral, 4, device="cpu", cost_model=LENT)
    try:
        start = off.placement.copy()
        prefill_and_decode(mixtral, prompt(1, 6), steps=4)
        s = off.stats
        assert s.cpu_expert_calls == 0 and s.copy_expert_calls > 0
        assert s.copy_expert_calls == sum(R.reads_from_stats(s, p).missed for p in ("prefill", "decode"))
        assert not np.array_equal(off.placement, start) and off.placement.sum() == 4
        for layer, mod in enumerate(off.experts):
            assert sorted(mod.gpu) == np.flatnonzero(off.placement[layer]).tolist()
    finally:
        off.restore()


def test_ours_splits_single_misses_between_copy_and_cpu(mixtral):
    routing = FixedRouting([[0, 1]], [[0.5, 0.5]], decode=((3, 0),))  # decode: expert 0 resident, 3 missed
    pop = np.zeros((2, 8))
    pop[:, 0] = 1.0
    ids = prompt(1, 1)
    for overlap in (False, True):
        off = get_baseline("ours").offload(mixtral, 2, device="cpu", popularity=pop, cost_model=LENT,
                                           routing=routing, overlap=overlap)
        try:
            off.set_phase("decode")
            with torch.no_grad():
                got = mixtral(input_ids=ids).logits
            s = off.stats
            assert (s.split_expert_calls, s.cpu_expert_calls, s.copy_expert_calls) == (2, 0, 0)
            k = round(LENT.plan([1], LENT.gpu_time([1])[0]).fraction * 128)
            assert s.bytes_copied == 2 * (2 * k * 64 + 64 * 128) * 4  # gate/up rows [0, k) and down, 2 layers
            assert (off.executor is not None) == overlap
        finally:
            off.restore()
        off = offload(mixtral, 2, device="cpu", placement=pop, cost_model=LENT, routing=routing, split=False)
        off.set_phase("decode")
        with torch.no_grad():
            whole = mixtral(input_ids=ids).logits
        assert off.stats.split_expert_calls == 0 and off.stats.copy_expert_calls == 2  # whole copies instead
        off.restore()
        assert (got - whole).abs().max() < 1e-5


def test_all_gpu_hits_everything(mixtral):
    off = get_baseline("all-gpu").offload(mixtral, 0, device="cpu", cost_model=LENT)
    try:
        prefill_and_decode(mixtral, prompt(1, 5), steps=2)
        assert off.stats.hit_rate() == 1.0 and off.stats.bytes_copied == off.stats.cpu_expert_calls == 0
    finally:
        off.restore()


def test_engine_rejects_an_unknown_decision(mixtral):
    with pytest.raises(ToolkitError, match="decision"):
        offload(mixtral, 2, device="cpu", cost_model=LENT, decision="random")


# -- the plan of ours: makespan, then at most one split ---------------------------------------------------

def test_plan_splits_a_single_miss_and_balances_the_paths():
    plan = LENT.plan([1])
    assert plan.split == 0 and 0 < plan.fraction < 1
    f = plan.fraction  # the GPU's share of the gate/up rows
    c_copy = (1 + 2 * f) / 3 * 6.4  # copies down and gate/up rows [0, k)
    c_cpu = (2 / 3) * (1 - f) * 7.2 + 0.05  # gate/up rows [k, I), plus the split's overhead
    end = max(c_copy + (2 * f / 3) * 0.115, c_cpu) + 0.115 / 3  # the GPU finishes the down projection
    assert plan.makespan_ms == pytest.approx(end)
    assert plan.makespan_ms < 0.6 * (6.4 + 0.115)  # a whole copy would take 6.5 ms
    assert LENT.plan([1]) is plan  # decode repeats shapes: plans are cached


def test_plan_does_not_split_when_it_cannot_pay():
    host_bound = CostModel.fixed(cpu=(7.2, 0.0), gpu=(0.115, 0.0), copy_ms=6.4, expert_bytes=352_321_536,
                                 host_bandwidth_gbs=88.0)
    two = host_bound.plan([1, 1])  # one copy and one CPU expert already saturate host memory
    assert two.split == -1 and sorted(two.copy.tolist()) == [False, True]
    assert two.makespan_ms == pytest.approx(2 * 352_321_536 / 88e9 * 1e3)
    copy_always = CostModel.fixed(cpu=(100.0, 0.0), gpu=(0.01, 0.0), copy_ms=1.0)
    assert copy_always.plan([1] * 6).split == -1  # a 1% gain is below the 3% threshold: keep whole copies
    assert LENT.plan([1], split=False).split == -1
    assert LENT.plan([]).copy.shape == (0,)


@pytest.mark.parametrize("tokens", [[128] * 6, [128] * 7, [2, 1, 1, 1, 2], [40, 3, 1]])
def test_plan_never_worse_than_whole_experts(tokens):
    whole = LENT.layer_makespan(tokens, LENT.decide(tokens))
    plan = LENT.plan(tokens)
    assert plan.makespan_ms <= whole
    assert np.array_equal(plan.copy, LENT.decide(tokens))


# -- on the GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in NAMES if n != "all-gpu"])
def test_baselines_match_all_gpu_on_cuda(name):
    """One Mixtral layer in bf16 with replayed routing: every scheme within bf16 rounding of all-gpu."""
    from toolkit.moe.replay import TraceRouter
    from toolkit.moe.synthetic import synthetic_mixtral

    model = build_moe("mixtral-8x7b", layers=1, device="cuda", expert_device="cpu")
    router = TraceRouter(synthetic_mixtral(n_layers=1, n_sequences=2))
    ids = torch.randint(3, 32000, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    ref_off = get_baseline("all-gpu").offload(model, 8, cost_model=LENT, routing=router)
    router.reset()
    ref = prefill_and_decode(model, ids)
    ref_off.restore()
    off = get_baseline(name).offload(model, 2, cost_model=LENT, routing=router)
    try:
        router.reset()
        got = prefill_and_decode(model, ids, like=ref)
        scale = max(r.float().abs().max().item() for r in ref)
        assert max_diff([r.float() for r in ref], [g.float() for g in got]) < 0.02 * scale
        if name == "ours":
            assert off.stats.split_expert_calls > 0  # the split path ran on the GPU
    finally:
        off.restore()
