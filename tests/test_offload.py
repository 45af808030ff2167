"""The offload engine on the CPU: logits equal the unmodified model's, decisions follow the cost model, exact counts."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe.costs import CostModel
from toolkit.moe.offload import OffloadedExperts, from_popularity, offload, spread_evenly
from toolkit.moe.presets import build_moe, moe_blocks
from toolkit.moe.run import cache_keyword, output_cache

CPU_ALWAYS = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0)  # copies never pay
COPY_ALWAYS = CostModel.fixed(cpu=(100.0, 0.0), gpu=(0.01, 0.0), copy_ms=1.0)  # CPU never pays


@pytest.fixture(scope="module")
def mixtral():
    return build_moe("tiny-mixtral", seed=0)


def padded_batch(vocab=256, lengths=(9, 5, 2), seed=0):
    """Left-padded prompts of different lengths, as generate expects: ids [B, S], mask [B, S]."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, S - n:] = 1
    return ids, mask


@torch.no_grad()
def prefill_and_decode(model, ids, mask, steps=3, like=None):
    """Logits of a prefill and ``steps`` greedy decode steps with the KV cache: list of [B, S or 1, V].

    ``like``: another run's logits whose greedy tokens are fed instead (teacher forcing, so a bf16
    rounding that flips an argmax cannot make the two runs diverge).
    """
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, past = [out.logits], output_cache(out)
    for i in range(steps):
        tok = (like or logits)[i][:, -1].argmax(-1, keepdim=True)  # [B, 1]
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_keyword(model): past})
        logits.append(out.logits)
        past = output_cache(out)
    return logits


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("gpu_experts,cost,overlap", [
    (0, CPU_ALWAYS, False), (0, COPY_ALWAYS, False), (5, CPU_ALWAYS, True), (5, COPY_ALWAYS, True), (16, CPU_ALWAYS, False),
])
def test_logits_equal_unmodified_model_prefill_and_decode(mixtral, gpu_experts, cost, overlap):
    ids, mask = padded_batch()
    ref = prefill_and_decode(mixtral, ids, mask)
    off = offload(mixtral, gpu_experts, device="cpu", cost_model=cost, overlap=overlap)
    try:
        got = prefill_and_decode(mixtral, ids, mask)
        assert max_diff(ref, got) < 1e-4
        s = off.stats
        assert s.activations["prefill"].sum() == ids.numel() * 2 * 2  # every token (pads too), 2 layers, top-2
        assert s.activations["decode"].sum() == 3 * ids.shape[0] * 2 * 2  # 3 steps x B tokens x 2 layers x top-2
    finally:
        off.restore()
    assert max_diff(ref, prefill_and_decode(mixtral, ids, mask)) == 0  # restored exactly


LENT = CostModel.fixed(cpu=(7.2, 0.0), gpu=(0.115, 0.0), copy_ms=6.4)  # the lent H200's: a lone miss is split


@pytest.mark.parametrize("gpu_experts,cost,overlap", [
    (0, CPU_ALWAYS, True), (0, COPY_ALWAYS, False), (5, CPU_ALWAYS, False), (5, COPY_ALWAYS, True),
    (5, LENT, True), (5, LENT, False), (16, CPU_ALWAYS, True),
])
def test_one_token_passes_gather_nothing_and_equal_the_unmodified_model(mixtral, gpu_experts, cost, overlap):
    """Batch-1 decode passes one token: each expert's rows are that token's, taken as views (resident, copied,
    split and CPU experts alike); the logits stay the unmodified model's."""
    ids, mask = padded_batch(lengths=(7,))
    ref = prefill_and_decode(mixtral, ids, mask, steps=6)
    off = offload(mixtral, gpu_experts, device="cpu", cost_model=cost, overlap=overlap)
    try:
        got = prefill_and_decode(mixtral, ids, mask, steps=6)
        assert max_diff(ref, got) < 1e-4
        if cost is LENT:
            assert off.stats.split_expert_calls > 0  # the split path ran on one-token passes
    finally:
        off.restore()


def test_one_token_host_rows_are_views_of_the_token():
    """The CPU experts' rows of a one-token pass: the token's activations expanded, the weights sliced where
    their slots are in order, gathered otherwise."""
    from toolkit.moe.offload import _Pass

    mod = SimpleNamespace(n_experts=4, engine=None)
    x = torch.arange(6.0).view(1, 6)
    idx, w = torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])
    p = _Pass(mod, x, idx, w)  # a CPU pass: its activations are the host's
    for experts, weights in (([3], [0.7]), ([1], [0.3]), ([1, 3], [0.3, 0.7]), ([3, 1], [0.7, 0.3])):
        rows, ws = p.host_rows(experts)
        assert rows.shape == (len(experts), 6) and rows.data_ptr() == x.data_ptr()  # a view: nothing copied
        assert all(torch.equal(r, x[0]) for r in rows)
        assert ws.tolist() == pytest.approx(weights), experts


@pytest.mark.parametrize("name", ["tiny-olmoe", "tiny-qwen3-moe"])
def test_logits_equal_for_other_families(name):
    model = build_moe(name)
    ids, mask = padded_batch(lengths=(6, 3))
    ref = prefill_and_decode(model, ids, mask, steps=2)
    off = offload(model, 7, device="cpu", cost_model=COPY_ALWAYS)
    assert max_diff(ref, prefill_and_decode(model, ids, mask, steps=2)) < 1e-4
    assert off.stats.copy_expert_calls > 0 and off.stats.cpu_expert_calls == 0
    off.restore()


def test_offloaded_prefill_stays_causal(mixtral):
    """Changing a later token must not change earlier logits (Fiddler's prefill had no causal mask)."""
    off = offload(mixtral, 3, device="cpu", cost_model=CPU_ALWAYS)
    try:
        ids = torch.randint(3, 256, (1, 8))
        other = ids.clone()
        other[0, -1] = (ids[0, -1] + 1) % 256
        a, b = mixtral(ids).logits, mixtral(other).logits
        assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
        assert not torch.allclose(a[:, -1], b[:, -1])
    finally:
        off.restore()


@pytest.mark.parametrize("gpu_experts,expected", [(16, 1.0), (0, 0.0)])
def test_hit_rate_all_and_none(mixtral, gpu_experts, expected):
    ids, mask = padded_batch()
    off = offload(mixtral, gpu_experts, device="cpu", cost_model=CPU_ALWAYS)
    try:
        prefill_and_decode(mixtral, ids, mask, steps=2)
        assert off.stats.hit_rate("prefill") == expected
        assert off.stats.hit_rate("decode") == expected
        assert off.stats.hit_rate() == expected
        assert np.all(off.stats.per_layer("decode") == expected)
        if gpu_experts == 16:
            assert off.stats.cpu_expert_calls == off.stats.copy_expert_calls == off.stats.bytes_copied == 0
    finally:
        off.restore()


def test_all_resident_layers_run_sync_free_with_the_same_logits_and_stats(mixtral, monkeypatch):
    import toolkit.moe.offload as engine

    ids, mask = padded_batch()
    ref = prefill_and_decode(mixtral, ids, mask)
    runs = {}
    for sync_free in (False, True):
        off = offload(mixtral, "all", device="cpu", cost_model=CPU_ALWAYS, sync_free=sync_free)
        try:
            assert off.sync_free_layers == (2 if sync_free else 0)
            assert off.to_dict()["sync_free_layers"] == off.sync_free_layers
            with monkeypatch.context() as m:
                if sync_free:  # the per-expert path (and its routing sync) must not run at all
                    m.setattr(engine, "_Pass", lambda *a: pytest.fail("a sync-free layer grouped its routing on the host"))
                got = prefill_and_decode(mixtral, ids, mask)
            assert max_diff(ref, got) < 1e-4
            runs[sync_free] = off.stats.to_dict()
            off.reset_stats()
            assert off.stats.hit_rate() != off.stats.hit_rate()  # NaN: the device counts were reset too
        finally:
            off.restore()
    assert runs[True] == runs[False]  # activations, hits, passes, forwards and calls counted alike
    assert runs[True]["gpu_expert_calls"] > 0 and runs[True]["hit_rate"]["all"] == 1.0


def test_sync_free_only_for_layers_resident_for_good(mixtral):
    from toolkit.moe.policies import LRU

    placement = np.zeros((2, 8), dtype=bool)
    placement[0] = True  # layer 0 whole, layer 1 half
    placement[1, :4] = True
    ids, mask = padded_batch()
    ref = prefill_and_decode(mixtral, ids, mask, steps=2)
    off = offload(mixtral, None, device="cpu", placement=placement, cost_model=CPU_ALWAYS)
    try:
        assert [mod.sync_free for mod in off.experts] == [True, False]
        assert max_diff(ref, prefill_and_decode(mixtral, ids, mask, steps=2)) < 1e-4
        s = off.stats
        assert s.per_layer("decode")[0] == 1.0 and s.per_layer("decode")[1] < 1.0
        assert s.forwards["decode"] == 2 * 2  # two decode passes, each through both layers
        assert s.activations["decode"].sum() == 2 * ids.shape[0] * 2 * 2  # steps x B x layers x top-2
    finally:
        off.restore()
    off = offload(mixtral, "all", device="cpu", policy=LRU(), cost_model=CPU_ALWAYS)  # a cache may evict: never
    try:
        assert off.sync_free_layers == 0
    finally:
        off.restore()


@pytest.mark.parametrize("lookahead", [False, True])
def test_lookahead_starts_the_next_layers_copies_during_prefill_only(mixtral, monkeypatch, lookahead):
    ids, mask = padded_batch()  # 27 prefill tokens: a long pass; decode passes have 3
    ref = prefill_and_decode(mixtral, ids, mask)
    off = offload(mixtral, 0, device="cpu", cost_model=COPY_ALWAYS, lookahead=lookahead)
    events = []
    real_copy, real_forward = off.copy_in, OffloadedExperts.forward
    monkeypatch.setattr(off, "copy_in", lambda mod, e, *a, **k: events.append(("copy", mod.layer, e, off.phase))
                        or real_copy(mod, e, *a, **k))

    def forward(mod, *args):
        events.append(("forward", mod.layer, None, off.phase))
        return real_forward(mod, *args)

    monkeypatch.setattr(OffloadedExperts, "forward", forward)
    try:
        got = prefill_and_decode(mixtral, ids, mask)
        s = off.stats
    finally:
        off.restore()
    assert max_diff(ref, got) < 1e-4
    prefill = [ev for ev in events if ev[3] == "prefill"]
    early = [ev for ev in prefill[:prefill.index(("forward", 1, None, "prefill"))] if ev[:2] == ("copy", 1)]
    assert len(early) == (2 if lookahead else 0)  # as many as the two staging slots hold
    assert s.lookahead_copies == len(early)
    layer1 = [ev[2] for ev in prefill if ev[:2] == ("copy", 1)]
    assert len(layer1) == len(set(layer1))  # an expert copied ahead is not copied again
    used = set(np.flatnonzero(s.activations["prefill"][1]).tolist())
    assert used <= set(layer1)  # every used expert copied (none runs on the CPU at these costs)
    assert s.split_expert_calls == 0
    assert s.bytes_copied == sum(ev[0] == "copy" for ev in events) * off.bytes_per_expert  # each copy counted once
    decode = [ev for ev in events if ev[3] == "decode"]
    for i, ev in enumerate(decode):  # decode passes copy only after their own routing
        if ev[0] == "copy":
            assert ("forward", ev[1], None, "decode") in decode[:i]


def test_lookahead_copies_nobody_uses_give_their_slots_back(mixtral):
    off = offload(mixtral, 0, device="cpu", cost_model=COPY_ALWAYS, lookahead=True, copy_slots=3)
    try:
        off.look_ahead(1, rows=64)
        assert sorted(e for _, e in off._ahead) == [0, 1, 2] and not off.slot_available()
        taken = off.take_lookahead(1, missed=np.array([2, 5]))
        assert list(taken) == [2] and off._ahead == {}
        assert sum(not s.busy for s in off._slots) == 2  # experts 0 and 1 were released
        off.look_ahead(len(off.experts), rows=64)  # past the last layer: nothing
        assert off._ahead == {}
    finally:
        off.restore()


def test_decisions_follow_the_cost_model(mixtral):
    ids = torch.randint(3, 256, (2, 6))
    off = offload(mixtral, 4, device="cpu", cost_model=CPU_ALWAYS)
    mixtral(ids)
    cpu_calls = off.stats.cpu_expert_calls
    assert cpu_calls > 0 and off.stats.copy_expert_calls == 0 and off.stats.bytes_copied == 0
    off.restore()

    off = offload(mixtral, 4, device="cpu", cost_model=COPY_ALWAYS)
    mixtral(ids)
    s = off.stats
    assert s.cpu_expert_calls == 0 and s.copy_expert_calls == cpu_calls  # same misses, other path
    expert_bytes = 3 * 64 * 128 * 4
    assert off.bytes_per_expert == expert_bytes
    assert s.bytes_copied == s.copy_expert_calls * expert_bytes
    off.restore()


class FixedRouting:
    """Replays a hand-made routing: the same [T, K] choice for every layer and pass."""

    def __init__(self, index, weights):
        self.index, self.weights = torch.tensor(index), torch.tensor(weights)
        self.calls = []

    def route(self, layer, hidden, phase):
        self.calls.append((layer, tuple(hidden.shape), phase))
        return self.index, self.weights


class Recorder:
    def __init__(self):
        self.seen = []

    def observe(self, layer, phase, top_k_index, top_k_weights):
        self.seen.append((layer, phase, tuple(top_k_index.shape), tuple(top_k_weights.shape)))


def test_stats_are_exact_on_a_hand_made_routing(mixtral):
    # 3 tokens, top-2: expert 0 gets 2, 1 gets 2, 2 gets 1, 3 gets 1; experts 0 and 1 resident in layer 0,
    # expert 2 resident in layer 1
    index = [[0, 1], [0, 2], [3, 1]]
    weights = [[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]]
    placement = np.zeros((2, 8), dtype=bool)
    placement[0, [0, 1]] = True
    placement[1, 2] = True
    routing = FixedRouting(index, weights)
    off = offload(mixtral, 3, device="cpu", placement=placement, cost_model=CPU_ALWAYS, routing=routing)
    rec = Recorder()
    off.recorder = rec
    try:
        mixtral(torch.randint(3, 256, (1, 3)))  # prefill: 3 tokens
        counts = np.array([2, 2, 1, 1, 0, 0, 0, 0])
        s = off.stats
        assert np.array_equal(s.activations["prefill"], np.stack([counts, counts]))
        assert np.array_equal(s.hits["prefill"], np.array([[2, 2, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]]))
        assert s.hit_rate("prefill") == 5 / 12
        assert np.allclose(s.per_layer("prefill"), [4 / 6, 1 / 6])
        assert s.cpu_expert_calls == 2 + 3  # layer 0 misses experts 2, 3; layer 1 misses 0, 1, 3
        assert s.cpu_tokens == 2 + 5
        assert s.activations["decode"].sum() == 0 and np.isnan(s.hit_rate("decode"))
        assert [c[0] for c in routing.calls] == [0, 1] and routing.calls[0][2] == "prefill"
        assert rec.seen == [(0, "prefill", (3, 2), (3, 2)), (1, "prefill", (3, 2), (3, 2))]
        d = s.to_dict()
        assert d["cpu_expert_calls"] == 5 and d["activations"]["prefill"][0][:4] == [2, 2, 1, 1]
        off.reset_stats()
        assert s.activations["prefill"].sum() == 0 and s.cpu_expert_calls == 0
    finally:
        off.restore()


def test_replayed_router_equal_to_the_models_own_gives_equal_logits(mixtral):
    gates = [b.gate for b in moe_blocks(mixtral)]

    class Same:
        def route(self, layer, hidden, phase):
            _, w, i = gates[layer](hidden)
            return i, w

    ids = torch.randint(3, 256, (2, 5))
    ref = mixtral(ids).logits
    off = offload(mixtral, 6, device="cpu", cost_model=CPU_ALWAYS, routing=Same())
    assert (mixtral(ids).logits - ref).abs().max() < 1e-5
    off.restore()
    assert all(b.gate is g for b, g in zip(moe_blocks(mixtral), gates))


def test_phase_is_detected_from_input_length_and_can_be_forced(mixtral):
    off = offload(mixtral, 4, device="cpu", cost_model=CPU_ALWAYS)
    try:
        mixtral(torch.randint(3, 256, (2, 4)))
        assert off.phase == "prefill" and off.stats.activations["prefill"].sum() == 2 * 4 * 2 * 2
        mixtral(torch.randint(3, 256, (2, 1)))
        assert off.phase == "decode" and off.stats.activations["decode"].sum() == 2 * 2 * 2
        off.set_phase("prefill")
        mixtral(torch.randint(3, 256, (2, 1)))
        assert off.stats.activations["decode"].sum() == 2 * 2 * 2  # forced: counted as prefill
        with pytest.raises(ToolkitError, match="phase"):
            off.set_phase("warmup")
    finally:
        off.restore()


def test_caching_policy_copies_and_keeps_missed_experts(mixtral):
    from toolkit.moe.policies import LRU

    ids, mask = padded_batch(lengths=(4, 4))
    ref = prefill_and_decode(mixtral, ids, mask, steps=4)
    off = offload(mixtral, 4, device="cpu", policy=LRU(), cost_model=CPU_ALWAYS)
    try:
        start = off.placement.copy()
        got = prefill_and_decode(mixtral, ids, mask, steps=4)
        assert max_diff(ref, got) < 1e-4
        s = off.stats
        # LRU copies in (and keeps) the misses its per-layer capacity allows; the rest follow the cost model
        assert s.copy_expert_calls > 0 and s.cpu_expert_calls > 0
        assert s.bytes_copied == s.copy_expert_calls * off.bytes_per_expert
        assert off.placement.sum() == 4 and not np.array_equal(off.placement, start)
        for layer, mod in enumerate(off.experts):  # the module's GPU tier follows the policy's residency
            assert sorted(mod.gpu) == np.flatnonzero(off.placement[layer]).tolist()
    finally:
        off.restore()


def test_one_staging_slot_many_copies_per_layer(mixtral):
    ids, mask = padded_batch()
    ref = prefill_and_decode(mixtral, ids, mask, steps=2)
    off = offload(mixtral, 0, device="cpu", cost_model=COPY_ALWAYS, copy_slots=1)
    try:
        assert max_diff(ref, prefill_and_decode(mixtral, ids, mask, steps=2)) < 1e-4
        assert off.stats.copy_expert_calls > 2 * 3  # more copies than slots in every pass
    finally:
        off.restore()


class PrefetchOnce:
    """A toy caching policy: nothing resident; the first pass of each layer loads expert 7 (used or not)."""

    name = "prefetch-once"

    def reset(self, budget, n_layers, n_experts, popularity=None):
        self.res = np.zeros((n_layers, n_experts), dtype=bool)
        return self.res.copy()

    def step(self, layer, used):
        hit = self.res[layer, used]
        load = [] if self.res[layer, 7] else [7]
        self.res[layer, 7] = True
        return hit, load, []

    def resident(self, layer):
        return self.res[layer]


def test_policy_loads_are_copied_once_and_then_hit(mixtral):
    ids = torch.randint(3, 256, (3, 4))
    ref = mixtral(ids).logits
    off = offload(mixtral, 2, device="cpu", policy=PrefetchOnce(), cost_model=CPU_ALWAYS)
    try:
        assert (mixtral(ids).logits - ref).abs().max() < 1e-4
        assert off.stats.bytes_copied == 2 * off.bytes_per_expert  # one load per layer, used or not
        assert all(sorted(m.gpu) == [7] for m in off.experts)
        assert off.stats.hits["prefill"].sum() == 0  # loaded after the pass: no hit yet
        assert (mixtral(ids).logits - ref).abs().max() < 1e-4  # second pass: expert 7 is resident
        hits, act = off.stats.hits["prefill"], off.stats.activations["prefill"]
        assert np.array_equal(hits[:, 7], act[:, 7] // 2) and hits.sum() == hits[:, 7].sum()
        assert off.stats.bytes_copied == 2 * off.bytes_per_expert  # not copied again
    finally:
        off.restore()


def test_default_cost_model_is_calibrated_once_and_cached(mixtral, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    off = offload(mixtral, 2, device="cpu")
    off.restore()
    assert (tmp_path / "costs.json").exists() and off.cost_model.hidden == 64
    again = offload(mixtral, 2, device="cpu", cost_model=tmp_path / "costs.json")
    again.restore()
    assert again.cost_model == off.cost_model


def test_cpu_experts_never_lose_precision_and_decide_with_their_timings(mixtral):
    faster_bf16 = CostModel.fixed(cpu=(1.0, 0.0), copy_ms=100.0, cpu_dtype="bfloat16",
                                  cpu_ms_by_dtype={"bfloat16": [1.0, 1.0], "float32": [3.0, 3.0]})
    off = offload(mixtral, 2, device="cpu", cost_model=faster_bf16)
    off.restore()
    assert off.cpu_dtype == torch.float32  # a float32 model keeps float32 CPU experts
    assert off.cost_model.cpu_dtype == "float32" and off.cost_model.cpu_ms == (3.0, 3.0)


def test_placements(mixtral, tmp_path):
    res = spread_evenly(5, 2, 8)
    assert res.sum(axis=1).tolist() == [3, 2] and res.sum() == 5
    assert spread_evenly(16, 2, 8).all() and not spread_evenly(0, 2, 8).any()
    pop = np.arange(16).reshape(2, 8)
    assert np.array_equal(np.flatnonzero(from_popularity(pop, 3)), [13, 14, 15])

    off = offload(mixtral, 3, device="cpu", placement=pop, cost_model=CPU_ALWAYS)  # a popularity profile
    assert np.array_equal(off.placement, from_popularity(pop, 3))
    assert sorted(off.experts[1].gpu) == [5, 6, 7]
    off.restore()

    from toolkit.moe.policies import save_placement

    chosen = np.zeros((2, 8), dtype=bool)
    chosen[0, 7] = chosen[1, 0] = True
    path = save_placement(tmp_path / "p.json", chosen)
    off = offload(mixtral, None, device="cpu", placement=str(path), cost_model=CPU_ALWAYS)
    assert np.array_equal(off.placement, chosen) and off.gpu_experts == 2
    off.restore()


@pytest.mark.parametrize("kwargs,match", [
    ({"gpu_experts": 17}, "between 0 and 16"),
    ({"gpu_experts": -1}, "between 0 and 16"),
    ({"gpu_experts": 2, "placement": np.ones((3, 8), dtype=bool)}, "shape"),
    ({"gpu_experts": 2, "placement": np.ones((2, 8), dtype=bool)}, "holds 16 experts"),
    ({"gpu_experts": 2, "copy_slots": 0}, "copy_slots"),
    ({"gpu_experts": 2, "cpu_threads": 0}, "threads"),
])
def test_bad_requests_raise(mixtral, kwargs, match):
    with pytest.raises(ToolkitError, match=match):
        offload(mixtral, device="cpu", cost_model=CPU_ALWAYS, **kwargs)
    assert not any(isinstance(b.experts, OffloadedExperts) for b in moe_blocks(mixtral))


def test_offloading_twice_raises_and_restore_gives_back_the_modules(mixtral):
    originals = [b.experts for b in moe_blocks(mixtral)]
    off = offload(mixtral, 2, device="cpu", cost_model=CPU_ALWAYS)
    assert all(isinstance(b.experts, OffloadedExperts) for b in moe_blocks(mixtral))
    with pytest.raises(ToolkitError, match="already offloaded"):
        offload(mixtral, 2, device="cpu", cost_model=CPU_ALWAYS)
    assert off.restore() is mixtral
    assert [b.experts for b in moe_blocks(mixtral)] == originals
    d = off.to_dict()
    assert d["gpu_experts"] == 2 and d["total_experts"] == 16 and d["cost_model"]["copy_ms"] == 100.0


def test_profiler_labels_per_layer(mixtral):
    from torch.profiler import profile

    off = offload(mixtral, 3, device="cpu", cost_model=CPU_ALWAYS, overlap=True)
    try:
        with profile() as prof:
            mixtral(torch.randint(3, 256, (1, 6)))
    finally:
        off.restore()
    names = {e.name for e in prof.events()}
    for layer in (0, 1):
        for label in ("moe.route", "moe.cpu_experts", "attention"):
            assert f"{label}[L{layer}]" in names


def test_model_without_moe_blocks_raises():
    with pytest.raises(ToolkitError, match="no MoE blocks"):
        offload(torch.nn.Linear(2, 2), 0, device="cpu", cost_model=CPU_ALWAYS)


@pytest.mark.gpu
@pytest.mark.parametrize("cost", [CPU_ALWAYS, COPY_ALWAYS, None])
def test_bf16_logits_match_on_cuda(cost):
    """All-GPU bf16 model vs the same weights offloaded (CPU experts, copies, or the calibrated mix).

    One layer: the router sees bit-identical inputs, so routing cannot flip and the only difference is
    bf16 rounding in the experts (CPU vs GPU kernels, accumulation order).
    """
    model = build_moe("mixtral-8x7b", layers=1, device="cuda", dtype=torch.bfloat16)
    ids, mask = padded_batch(vocab=32000, lengths=(12, 7, 3))
    ids, mask = ids.cuda(), mask.cuda()
    ref = prefill_and_decode(model, ids, mask, steps=3)
    off = offload(model, 3, device="cuda", cost_model=cost)
    try:
        got = prefill_and_decode(model, ids, mask, steps=3, like=ref)
        scale = max(r.float().abs().max().item() for r in ref)
        assert max_diff([r.float() for r in ref], [g.float() for g in got]) < 0.02 * scale
        assert 0 < off.stats.hit_rate() < 1.0
        if cost is COPY_ALWAYS:
            assert off.stats.bytes_copied > 0 and off.stats.cpu_expert_calls == 0
        if cost is CPU_ALWAYS:
            assert off.stats.cpu_expert_calls > 0 and off.stats.bytes_copied == 0
    finally:
        off.restore()
    assert moe_blocks(model)[0].experts.gate_up_proj.is_cuda  # restored to where it was


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_lookahead_copies_on_cuda_equal_the_unoffloaded_model(overlap):
    """Copies started before their layer's routing (side stream, staging slots reused) give the same logits."""
    model = build_moe("tiny-mixtral", seed=0, device="cuda")  # float32: differences are summation order only
    ids, mask = padded_batch()
    ids, mask = ids.cuda(), mask.cuda()
    ref = prefill_and_decode(model, ids, mask, steps=4)
    off = offload(model, 0, device="cuda", cost_model=COPY_ALWAYS, overlap=overlap)
    try:
        assert off.options.lookahead  # the default
        for _ in range(2):  # the second time, the slots hold the first run's experts
            got = prefill_and_decode(model, ids, mask, steps=4)
            assert max_diff(ref, got) < 1e-4
        assert off.stats.lookahead_copies > 0
    finally:
        off.restore()


@pytest.mark.gpu
def test_bf16_four_layers_on_cuda_within_bf16_noise():
    """Deeper: offloading may change bf16 rounding (CPU kernels, accumulation order), and after
    four layers a near-tie in a router can flip; the offloaded error must stay at the scale of
    bf16's own error, measured against the same weights in float32."""
    model = build_moe("mixtral-8x7b", layers=4, device="cuda", dtype=torch.bfloat16)
    ids, mask = padded_batch(vocab=32000, lengths=(16, 9))
    ids, mask = ids.cuda(), mask.cuda()
    ref = prefill_and_decode(model, ids, mask, steps=4)
    off = offload(model, 10, device="cuda")
    try:
        got = prefill_and_decode(model, ids, mask, steps=4, like=ref)
    finally:
        off.restore()
    exact = prefill_and_decode(model.float(), ids, mask, steps=4, like=ref)

    def mean_abs(a, b):
        return torch.cat([(x.float() - y.float()).abs().flatten() for x, y in zip(a, b)]).mean().item()

    bf16_noise = mean_abs(ref, exact)
    assert 0 < bf16_noise and mean_abs(got, ref) < 2 * bf16_noise


def test_worker_thread_runs_in_the_callers_inference_mode(mixtral):
    """Inference mode is thread-local: the CPU-expert worker must write into buffers made under it (found on GPU)."""
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = mixtral(input_ids=ids, attention_mask=mask).logits
    off = offload(mixtral, 0, device="cpu", cost_model=CPU_ALWAYS, overlap=True)
    try:
        with torch.inference_mode():
            first = mixtral(input_ids=ids, attention_mask=mask).logits  # buffers created as inference tensors
            again = mixtral(input_ids=ids, attention_mask=mask).logits  # ... and reused by the worker
    finally:
        off.restore()
    assert off.stats.cpu_expert_calls > 0
    assert (first - ref).abs().max() < 1e-4 and (again - ref).abs().max() < 1e-4


def test_the_engine_plans_with_the_measured_contention_unless_told_not_to(mixtral):
    measured = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=1.0, cpu_contention=(1.5, 1.5),
                               copy_contention=1.1, contention_links=1)
    for contention in (True, False):
        off = offload(mixtral, 4, device="cpu", cost_model=measured, contention=contention)
        try:
            assert off.options.contention is contention
            assert (off.cost_model.cpu_contention is not None) is contention
            assert off.cost_model.cpu_ms == measured.cpu_ms  # only the contention is left out
            assert off.plan_model(small=False) is off.cost_model  # long passes (prefill) plan with it
            assert off.plan_model(small=True).cpu_contention is None  # decode passes without
            assert off.plan_model(small=True) is off.plan_model(small=True)
        finally:
            off.restore()


def test_the_moe_command_prints_the_contention_its_plan_counted():
    from moe_records import run_record

    from toolkit.cli.moe import format_table

    cm = CostModel(cpu_tokens=(1, 128), cpu_ms=(7.2, 18.7), gpu_tokens=(1, 128), gpu_ms=(0.1, 0.13), copy_ms=6.4,
                   device="cuda:0", cpu_contention=(1.25, 1.1), copy_contention=1.02, contention_links=1)

    def line(model):
        rows = format_table(run_record(cost_model=model.to_dict())).splitlines()
        return next((x for x in rows if x.startswith("  contention")), None)

    assert line(cm).endswith("while copying over 1 link: CPU expert x1.25 (n=1) .. x1.10 (n=128), copy x1.02 beside "
                             "a CPU expert (prefill plans count it)")
    assert line(cm.without_contention()).endswith("not counted: the plan takes CPU experts and copies at their "
                                                  "speeds alone")
    assert line(CostModel.fixed()) is None  # a CPU run: no copy engine to contend with


def test_prefill_passes_plan_with_the_contention_and_decode_passes_without(mixtral, monkeypatch):
    from toolkit.moe.offload import Offloaded

    measured = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=1.0, cpu_contention=(1.5, 1.5),
                               copy_contention=1.1, contention_links=1)
    asked = []
    real = Offloaded.plan_model
    monkeypatch.setattr(Offloaded, "plan_model", lambda self, small: asked.append((self.phase, small))
                        or real(self, small))
    ids, mask = padded_batch()  # 27 prefill rows, 3 a decode step
    with offload(mixtral, 4, device="cpu", cost_model=measured):
        prefill_and_decode(mixtral, ids, mask, steps=2)
    assert {small for phase, small in asked if phase == "prefill"} == {False}
    assert {small for phase, small in asked if phase == "decode"} == {True}
