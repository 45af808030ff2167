"""Routing traces: format validation, save/load, calibration to real Mixtral statistics, replay, recording."""

import json

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import replay, synthetic, trace_catalog, traces
from toolkit.moe.replay import TraceRecorder, TraceRouter
from toolkit.moe.traces import Trace


def small_trace(n_layers=2, seq=True):
    # sequence 0: 3 prompt tokens (pass 0), 2 decode tokens (passes 1, 2); sequence 1: 2 prompt tokens (pass 3)
    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[2, 3], [0, 1]], [[3, 0], [1, 2]],
                        [[0, 2], [1, 3]], [[1, 3], [2, 0]], [[2, 0], [3, 1]]])[:, :n_layers]
    weights = np.tile(np.array([0.7, 0.3], dtype=np.float32), (7, n_layers, 1))
    step = [0, 0, 0, 1, 2, 3, 3]
    phase = [0, 0, 0, 1, 1, 0, 0]
    return Trace(experts, weights, step, phase, {"n_experts": 4, "source": "test"},
                 [0, 0, 0, 0, 0, 1, 1] if seq else None)


# ---- the format ----

def test_trace_properties():
    t = small_trace()
    assert (t.n_tokens, t.n_layers, t.top_k, t.n_experts, t.n_steps) == (7, 2, 2, 4, 4)
    assert t.step_starts().tolist() == [0, 3, 4, 5, 7]
    assert t.experts.dtype == np.int16
    pop = t.popularity()
    assert pop.shape == (2, 4) and pop.sum() == 7 * 2 * 2
    assert pop[0].tolist() == [4, 3, 4, 3]
    assert t.popularity("decode")[0].tolist() == [2, 0, 1, 1]
    assert t.bytes_per_expert is None
    t.meta.update(hidden_size=4, intermediate_size=8, dtype_bytes=2)
    assert t.bytes_per_expert == 3 * 4 * 8 * 2
    assert "7 tokens" in repr(t)


@pytest.mark.parametrize("change, message", [
    (dict(experts=np.zeros((3, 2))), "tokens, layers, top_k"),
    (dict(experts=np.full((7, 2, 2), 4)), "lie in"),
    (dict(experts=np.zeros((7, 2, 2), dtype=int)), "same expert twice"),
    (dict(step=[0, 0, 0, 1, 2, 1, 1]), "non-decreasing"),
    (dict(phase=[0, 0, 1, 1, 1, 0, 0]), "single phase"),
    (dict(phase=[0, 0, 0, 1, 2, 0, 0]), "phase must be 0"),
    (dict(weights=np.zeros((7, 2, 3))), "weights"),
    (dict(step=[0, 0]), "rows"),
])
def test_trace_validation(change, message):
    t = small_trace()
    fields = dict(experts=t.experts, weights=t.weights, step=t.step, phase=t.phase, meta={"n_experts": 4})
    fields.update(change)
    with pytest.raises(ToolkitError, match=message):
        Trace(**fields)


def test_save_load_roundtrip(tmp_path):
    t = small_trace()
    t.meta["popularity"] = np.ones((2, 4))
    path = traces.save_trace(t, tmp_path / "t")  # suffix added
    assert path.name == "t.npz"
    u = trace_catalog.load_trace(path)
    for name in ("experts", "weights", "step", "phase", "seq"):
        np.testing.assert_array_equal(getattr(u, name), getattr(t, name))
    assert u.meta["source"] == "test" and u.n_experts == 4
    assert np.asarray(u.meta["popularity"]).shape == (2, 4)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def _rewrite(path, **arrays):
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    data.update(arrays)
    np.savez(path, **data)


def _header(**fields):
    h = {"format": "toolkit-trace", "version": 1, "n_tokens": 7, "n_layers": 2, "top_k": 2, "n_experts": 4}
    h.update(fields)
    return np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a zip file at all"), "not a valid trace file"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a valid trace file"),
    (lambda p: _rewrite(p, header=np.frombuffer(b"{bad json", dtype=np.uint8)), "not a valid trace file"),
    (lambda p: _rewrite(p, header=_header(format="something-else")), "not a toolkit trace"),
    (lambda p: _rewrite(p, header=_header(version=99)), "version 99"),
    (lambda p: _rewrite(p, header=_header(n_tokens=8)), "does not match the header"),
    (lambda p: _rewrite(p, header=_header(n_experts=3)), "lie in"),
    (lambda p: _rewrite(p, step=np.zeros(5, dtype=np.int32)), "rows"),
])
def test_corrupt_or_mismatched_file(tmp_path, damage, message):
    path = traces.save_trace(small_trace(), tmp_path / "t.npz")
    damage(path)
    with pytest.raises(ToolkitError, match=message):
        trace_catalog.load_trace(path)


def test_missing_trace():
    with pytest.raises(ToolkitError, match="not found"):
        trace_catalog.load_trace("/nonexistent/trace.npz")


# ---- real statistics and the calibrated generator ----

def test_real_popularity_counts():
    pooled = synthetic.real_popularity()
    assert pooled.shape == (32, 8)
    subjects = synthetic.routing_subjects()
    assert len(subjects) == 7
    assert sum(synthetic.real_popularity(subject=s) for s in subjects).tolist() == pooled.tolist()
    # each token is counted twice (top-2) in every layer, so all layer sums are equal
    assert len(set(pooled.sum(1).tolist())) == 1
    with pytest.raises(ToolkitError, match="subject"):
        synthetic.real_popularity(subject="astrology")


def test_locality_targets_are_published_midpoints():
    t = synthetic.locality_targets(32)
    for layer, (same, shared) in synthetic.PUBLISHED_LOCALITY.items():
        assert t["same_first"][layer] == pytest.approx(np.mean(same))
        assert t["shared"][layer] == pytest.approx(np.mean(shared))
    assert t["same_first"][7] == pytest.approx(np.interp(7, [0, 15], [0.1425, 0.26]))


def test_pair_model_and_chain_keep_the_popularity():
    counts = synthetic.real_popularity(subject="high_school_mathematics")[11]  # a skewed layer
    q = synthetic.fit_pair_model(counts)
    np.testing.assert_allclose(q.sum(0) + q.sum(1), 2 * counts / counts.sum(), atol=1e-9)
    assert np.all(np.diag(q) == 0)
    moves = synthetic.fit_moves(q, 0.23, 0.49)
    chain = synthetic.mixed_kernel(q, moves)
    np.testing.assert_allclose(chain.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(q.ravel() @ chain, q.ravel(), atol=1e-12)  # Q is stationary
    assert synthetic.kernel_rates(q, chain) == pytest.approx((0.23, 0.49), abs=1e-9)


@pytest.mark.parametrize("kw", [{}, {"model": "instruct"}, {"subject": "high_school_mathematics"}])
def test_synthetic_matches_real_statistics(kw):
    """Stated tolerances: popularity share within 0.015 (absolute) of the measured share in every
    layer and expert; same-first and shared rates within 0.025 of the targets in every layer (the
    expected rates match the targets exactly, and lie inside the published ranges)."""
    t = synthetic.synthetic_mixtral(**kw)
    assert (t.n_layers, t.n_experts, t.top_k) == (32, 8, 2)
    real = synthetic.real_popularity(kw.get("model", "original"), kw.get("subject")).astype(float)
    share = t.popularity() / t.popularity().sum(1, keepdims=True)
    np.testing.assert_allclose(share, real / real.sum(1, keepdims=True), atol=0.015)
    targets = synthetic.locality_targets(32)
    loc = t.locality()
    for key in ("same_first", "shared"):
        np.testing.assert_allclose(t.meta[f"expected_{key}"], targets[key], atol=1e-9)
        np.testing.assert_allclose(loc[key], targets[key], atol=0.025)
    for layer, (same, shared) in synthetic.PUBLISHED_LOCALITY.items():
        assert same[0] <= t.meta["expected_same_first"][layer] <= same[1]
        assert shared[0] <= t.meta["expected_shared"][layer] <= shared[1]


def test_synthetic_structure_and_determinism():
    t = synthetic.synthetic_mixtral(n_sequences=2, prompt_len=5, decode_len=3, seed=7)
    assert t.n_tokens == 16 and t.n_steps == 2 * (1 + 3)
    assert t.step.tolist() == [0] * 5 + [1, 2, 3] + [4] * 5 + [5, 6, 7]
    assert t.phase.tolist() == ([0] * 5 + [1] * 3) * 2
    assert t.bytes_per_expert == 3 * 4096 * 14336 * 2
    np.testing.assert_allclose(t.weights.astype(float).sum(-1), 1.0, atol=1e-3)
    assert np.all(t.weights[..., 0] >= t.weights[..., 1])
    u = synthetic.synthetic_mixtral(n_sequences=2, prompt_len=5, decode_len=3, seed=7)
    np.testing.assert_array_equal(t.experts, u.experts)
    v = synthetic.synthetic_mixtral(n_sequences=2, prompt_len=5, decode_len=3, seed=8)
    assert not np.array_equal(t.experts, v.experts)
    w = synthetic.synthetic_mixtral(n_tokens=10, prompt_len=5, decode_len=3, n_layers=4)
    assert (w.n_tokens, w.n_layers) == (10, 4)


def test_named_trace_is_cached_and_read_only():
    t = trace_catalog.load_trace("synthetic-mixtral")
    assert t is trace_catalog.load_trace("synthetic-mixtral")
    assert t.meta["name"] == "synthetic-mixtral"
    with pytest.raises(ValueError):
        t.experts[0, 0, 0] = 1


# ---- replay and recording ----

def test_router_follows_the_trace_pass_by_pass():
    t = small_trace()
    r = TraceRouter(t)
    h = lambda n: torch.zeros(n, 16, dtype=torch.bfloat16)  # noqa: E731
    for layer in range(2):  # prefill pass: the prompt's 3 rows
        idx, w = r.route(layer, h(3), "prefill")
        assert idx.tolist() == t.experts[0:3, layer].tolist()
        assert idx.dtype == torch.long and w.dtype == torch.bfloat16 and w.shape == (3, 2)
    for row in (3, 4):  # each decode pass: the next row
        for layer in range(2):
            assert r.route(layer, h(1), "decode")[0].tolist() == t.experts[row:row + 1, layer].tolist()
    assert r.passes == 3
    for layer in range(2):  # the end of the trace wraps around to its start
        assert r.route(layer, h(3), "prefill")[0].tolist() == t.experts[[5, 6, 0], layer].tolist()
    with pytest.raises(ToolkitError, match="tokens per sequence"):
        r.route(0, h(1), "decode")
        r.route(1, h(2), "decode")  # same pass, different token count
    with pytest.raises(ToolkitError, match="MoE layers"):
        r.route(5, h(1), "decode")
    r.check(n_layers=1, n_experts=8, top_k=2)  # fewer layers, more experts: fine
    with pytest.raises(ToolkitError, match="cannot drive"):
        r.check(n_layers=2, n_experts=8, top_k=4)
    r.reset()
    assert r.route(0, h(3), "prefill")[0].tolist() == t.experts[0:3, 0].tolist()


def test_router_batch_uses_per_sequence_offsets():
    t = small_trace()
    r = TraceRouter(t, batch_size=2, offsets=[0, 4])
    idx, _ = r.route(0, torch.zeros(4, 8), "prefill")  # 2 sequences x 2 tokens, (batch, seq) flattened
    assert idx.tolist() == t.experts[[0, 1, 4, 5], 0].tolist()
    idx, _ = r.route(0, torch.zeros(2, 8), "decode")
    assert idx.tolist() == t.experts[[2, 6], 0].tolist()
    with pytest.raises(ToolkitError, match="batch_size"):
        r.route(0, torch.zeros(3, 8), "decode")


class FakeOffloaded:
    placement = np.zeros((2, 4), dtype=bool)
    recorder = None
    bytes_per_expert = 96


def test_recorder_rebuilds_the_trace():
    t = small_trace()
    off = FakeOffloaded()
    with replay.record(off) as rec:
        assert off.recorder is rec
        starts = t.step_starts()
        for g in range(t.n_steps):
            a, b = starts[g], starts[g + 1]
            for layer in range(2):
                # weights in ascending order: the recorder sorts each token's experts by weight
                idx = torch.as_tensor(t.experts[a:b, layer, ::-1].astype(np.int64))
                w = torch.as_tensor(t.weights[a:b, layer, ::-1].copy())
                off.recorder.observe(layer, "prefill" if t.phase[a] == 0 else "decode", idx, w)
    assert off.recorder is None
    u = rec.to_trace()
    np.testing.assert_array_equal(u.experts, t.experts)
    np.testing.assert_array_equal(u.phase, t.phase)
    assert u.step_starts().tolist() == t.step_starts().tolist()
    assert u.n_experts == 4 and u.bytes_per_expert == 96


def test_recorder_errors():
    with pytest.raises(ToolkitError, match="nothing recorded"):
        TraceRecorder().to_trace()
    rec = TraceRecorder()
    rec.observe(0, "decode", torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))
    rec.observe(1, "decode", torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))
    rec.observe(0, "decode", torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))  # layer 1 never comes
    with pytest.raises(ToolkitError, match="recorded pass 1"):
        rec.to_trace()
