"""The hit-rate simulator: exact hand-checked hits, bounds, agreement with the Policy objects, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from toolkit.__main__ import main
from toolkit.errors import ToolkitError
from toolkit.moe import policies, synthetic, traces
from toolkit.moe.simulate import SimResult, simulate, sweep
from toolkit.moe.traces import Trace

POLICIES = ("static-popularity", "static-uniform", "lru", "lfu", "belady")


def random_trace(seed, n_layers=3, n_experts=6, top_k=2, n_seq=4, max_prompt=8, max_decode=12, skew=1.0):
    """Sequences of one prefill pass (several tokens) followed by single-token decode passes."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(n_experts, skew), size=n_layers)
    rows, step, phase, g = [], [], [], 0
    for _ in range(n_seq):
        n_prompt, n_decode = int(rng.integers(1, max_prompt + 1)), int(rng.integers(0, max_decode + 1))
        for t in range(n_prompt + n_decode):
            rows.append([rng.choice(n_experts, top_k, replace=False, p=pop[layer]) for layer in range(n_layers)])
            phase.append(0 if t < n_prompt else 1)
            step.append(g if t < n_prompt else g + t - n_prompt + 1)
        g += n_decode + 1
    experts = np.array(rows)
    return Trace(experts, np.full(experts.shape, 1 / top_k), step, phase, {"n_experts": n_experts})


def hand_trace():
    # one layer, top-1; pass 0 is a prompt of 3 tokens (2, 2, 3); passes 1-3 decode 0, 2, 1
    return Trace(np.array([2, 2, 3, 0, 2, 1]).reshape(6, 1, 1), np.ones((6, 1, 1)), [0, 0, 0, 1, 2, 3],
                 [0, 0, 0, 1, 1, 1], {"n_experts": 4, "bytes_per_expert": 100})


def test_lru_exact_hits_on_a_hand_written_trace():
    r = simulate(hand_trace(), "lru", 2, popularity=np.array([[1, 1, 0, 0]]))
    # residency {0, 1} (the given popularity); pass 0 misses 2 (x2) and 3, copies both -> {2, 3};
    # pass 1 misses 0 -> {0, 2}; pass 2 hits 2; pass 3 misses 1 -> {1, 2}
    assert r.hits.tolist() == [[0], [1]]
    assert r.activations.tolist() == [[3], [3]]
    assert r.loads.tolist() == [[2], [2]]
    assert r.hit_rate("prefill") == 0.0 and r.hit_rate("decode") == pytest.approx(1 / 3)
    assert r.hit_rate() == pytest.approx(1 / 6)
    assert r.bytes_copied == 400
    assert r.per_layer().tolist() == [pytest.approx(1 / 6)]


def test_static_hits_are_weighted_by_tokens():
    t = hand_trace()
    r = simulate(t, "static-popularity", 1, popularity=np.array([[0, 0, 1, 0]]))
    assert r.hits.tolist() == [[2], [1]] and r.n_loads == 0 and r.bytes_copied == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_all_experts_hit_everything_and_none_nothing(policy):
    for seed in range(3):
        t = random_trace(seed)
        full = simulate(t, policy, t.n_layers * t.n_experts)
        assert full.hit_rate() == 1.0 and full.n_loads == 0
        assert full.per_layer().tolist() == [1.0] * t.n_layers
        empty = simulate(t, policy, 0)
        assert empty.hit_rate() == 0.0 and empty.n_loads == 0
    syn = synthetic.synthetic_mixtral(n_sequences=2, prompt_len=16, decode_len=32)
    assert simulate(syn, policy, 256).hit_rate() == 1.0
    assert simulate(syn, policy, 0).hit_rate() == 0.0


def _belady_bound(t):
    for budget in range(t.n_layers * t.n_experts + 1):
        best = simulate(t, "belady", budget)
        for other in ("lru", "lfu"):
            r = simulate(t, other, budget)
            assert best.hits.sum() >= r.hits.sum(), (other, budget)


@pytest.mark.parametrize("seed", range(12))
def test_belady_bounds_lru_and_lfu_on_decode_traces(seed):
    # one token per pass: Belady's farthest-next-use rule is optimal, so the bound is exact
    rng = np.random.default_rng(seed)
    t = random_trace(seed, n_layers=int(rng.integers(1, 4)), n_experts=int(rng.integers(2, 7)),
                     top_k=int(rng.integers(1, 3)), max_prompt=1, skew=float(rng.choice([0.3, 1.0, 5.0])))
    _belady_bound(t)


@pytest.mark.parametrize("kw", [{"seed": 0}, {"seed": 1, "subject": "international_law"}, {"model": "instruct"}])
def test_belady_bounds_lru_and_lfu_on_synthetic_traces(kw):
    t = synthetic.synthetic_mixtral(n_sequences=3, prompt_len=24, decode_len=48, n_layers=4, **kw)
    _belady_bound(t)


@pytest.mark.parametrize("seed", range(6))
def test_belady_bounds_lru_and_lfu_on_prefill_traces(seed):
    _belady_bound(random_trace(100 + seed, n_layers=2, n_experts=5))


@pytest.mark.parametrize("seed", range(6))
def test_fast_path_equals_policy_objects(seed):
    """The compiled kernel and the Policy classes stepped like the engine give identical numbers."""
    rng = np.random.default_rng(seed)
    t = random_trace(seed, n_layers=int(rng.integers(1, 4)), n_experts=int(rng.integers(2, 8)),
                     top_k=int(rng.integers(1, 3)))
    for policy in POLICIES:
        for budget in range(0, t.n_layers * t.n_experts + 1):
            fast = simulate(t, policy, budget)
            ref = simulate(t, policies.get_policy(policy, trace=t), budget, fast=False)
            for field in ("hits", "activations", "loads"):
                np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field), err_msg=f"{policy} {budget}")


_PURE_PYTHON = """
import json, sys
sys.path.insert(0, {tests!r})
from test_simulate import random_trace
from toolkit.moe.simulate import simulate
out = {{}}
for seed in (0, 1):
    t = random_trace(seed)
    for p in ("lru", "lfu", "belady"):
        for b in (2, 7, 11):
            r = simulate(t, p, b)
            out[f"{{seed}}/{{p}}/{{b}}"] = [r.hits.tolist(), r.loads.tolist()]
print(json.dumps(out))
"""


def test_pure_python_path_is_identical():
    """Without numba (NUMBA_DISABLE_JIT=1 runs the same functions as plain Python) nothing changes."""
    code = _PURE_PYTHON.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pure = json.loads(done.stdout)
    for key, value in pure.items():
        seed, p, b = key.split("/")
        r = simulate(random_trace(int(seed)), p, int(b))
        assert [r.hits.tolist(), r.loads.tolist()] == value, key


def test_custom_policy_is_driven_like_the_engine():
    class EverythingOnGpu(policies.Policy):
        name = "all"

        def reset(self, budget, n_layers, n_experts, popularity=None):
            self._resident = np.ones((n_layers, n_experts), dtype=bool)
            return self._resident.copy()

    r = simulate(hand_trace(), EverythingOnGpu(), 0)
    assert r.hit_rate() == 1.0 and r.policy == "all"


def test_errors():
    t = hand_trace()
    with pytest.raises(ToolkitError, match="between 0 and 4"):
        simulate(t, "lru", 5)
    with pytest.raises(ToolkitError, match="unknown policy"):
        simulate(t, "mru", 1)
    with pytest.raises(ToolkitError, match="policy must be"):
        simulate(t, 3, 1)
    with pytest.raises(ToolkitError, match="built from"):
        simulate(t, policies.Belady(random_trace(0)), 1)


def test_sweep_and_result_values():
    t = synthetic.synthetic_mixtral(n_sequences=2, prompt_len=16, decode_len=32, n_layers=4)
    s = sweep(t, ["static-popularity", "lru"])
    assert [r.gpu_experts for r in s][:9] == list(range(0, 33, 4))
    df = s.to_dataframe()
    assert len(df) == 18 and {"policy", "gpu_experts", "hit_rate_decode", "bytes_copied"} <= set(df.columns)
    static = df[df.policy == "static-popularity"].hit_rate.tolist()
    assert static == sorted(static)  # more GPU experts never hurt a static placement
    d = s.results[3].to_dict()
    assert {"prefill", "decode", "per_layer"} <= set(d["hit_rate"]) and len(d["hit_rate"]["per_layer"]) == 4
    assert d["bytes_copied"] == d["expert_loads"] * 3 * 4096 * 14336 * 2
    assert isinstance(s.results[3], SimResult) and "hit rate" in repr(s.results[3])
    decode_only = Trace(np.array([[[0]]]), np.ones((1, 1, 1)), [0], [1], {"n_experts": 2})
    d = simulate(decode_only, "lru", 1).to_dict()
    assert np.isnan(d["hit_rate"]["prefill"]) and d["bytes_copied"] is None


def test_cli_json(capsys):
    assert main(["simulate", "--trace", "synthetic-mixtral", "--policy", "belady", "--gpu-experts", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"hit_rate", "bytes_copied", "policy", "gpu_experts"} <= set(out)
    assert {"prefill", "decode", "per_layer"} <= set(out["hit_rate"])
    assert out["policy"] == "belady" and out["gpu_experts"] == 64 and len(out["hit_rate"]["per_layer"]) == 32
    assert 0 < out["hit_rate"]["decode"] < 1 and out["bytes_copied"] > 0


def test_cli_sweep_table_and_errors(capsys, tmp_path):
    path = traces.save_trace(hand_trace(), tmp_path / "h.npz")
    assert main(["simulate", "--trace", str(path), "--policy", "all", "--budgets", "0,2,4"]) == 0
    out = capsys.readouterr().out
    assert "lfu" in out and out.count("\n") == 2 + 15
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "--sweep", "--json"]) == 0
    assert [r["gpu_experts"] for r in json.loads(capsys.readouterr().out)["results"]] == [0, 1, 2, 3, 4]
    assert main(["simulate", "--trace", str(path), "--gpu-experts", "9"]) == 2
    assert "between 0 and 4" in capsys.readouterr().err
    path.write_bytes(b"garbage")
    assert main(["simulate", "--trace", str(path)]) == 2
    assert "not a valid trace file" in capsys.readouterr().err


# -- several GPUs: per-device budgets --------------------------------------------------------------

@pytest.mark.parametrize("policy", ["static-popularity", "static-uniform"])
@pytest.mark.parametrize("caps,budget", [([4, 4], 8), ([2, 9], 7), ([5, 5, 5], 12), ([3, 4], None)])
def test_device_split_follows_the_engines_rule(policy, caps, budget):
    from toolkit.moe.memory import split_budget
    from toolkit.moe.offload import assign_devices
    from toolkit.moe.simulate import default_popularity

    t = random_trace(7, n_layers=3, n_experts=6)
    r = simulate(t, policy, budget, devices_budget=caps)
    one = simulate(t, policy, sum(caps) if budget is None else budget)
    assert r.gpu_experts == one.gpu_experts and r.hits.tolist() == one.hits.tolist()  # the split changes no hit
    resident = policies.get_policy(policy).reset(r.gpu_experts, 3, 6, default_popularity(t))
    tiers = assign_devices(resident, split_budget(int(resident.sum()), caps), default_popularity(t))
    assert list(r.device_experts) == np.bincount(tiers[tiers >= 0], minlength=len(caps)).tolist()
    assert all(n <= c for n, c in zip(r.device_experts, caps))
    expected = [int(sum(((t.experts[:, layer] == e).sum()) for layer in range(3) for e in range(6)
                        if tiers[layer, e] == d)) for d in range(len(caps))]
    assert r.device_rows().tolist() == expected and sum(expected) == r.hits.sum()
    assert r.device_rows("prefill").sum() == r.hits[0].sum() and r.device_rows("decode").sum() == r.hits[1].sum()
    assert r.device_share().sum() == pytest.approx(1.0)
    d = r.to_dict()
    assert d["devices_budget"] == caps and [x["rows"] for x in d["devices"]] == expected
    assert "devices" not in one.to_dict() and one.device_rows() is None and "by device" not in repr(one)
    assert "by device" in repr(r)


def test_device_split_with_an_explicit_ranking_and_the_slow_path():
    t = random_trace(3, n_layers=2, n_experts=5)
    ranking = np.tile(np.arange(5, dtype=float), (2, 1))  # the highest expert id first
    r = simulate(t, "static-uniform", 6, devices_budget=[3, 3], ranking=ranking, fast=False)
    assert r.device_hits.shape == (2, 2, 2) and sum(r.device_experts) == 6
    assert r.device_rows().sum() == r.hits.sum()


@pytest.mark.parametrize("kw,match", [
    (dict(gpu_experts=9, devices_budget=[4, 4]), "devices_budget: 9 GPU experts do not fit on 2 devices"),
    (dict(gpu_experts=4, devices_budget=[2, -1]), "devices_budget must give one whole count >= 0"),
    (dict(gpu_experts=4, devices_budget=[2.5, 3]), "devices_budget must give one whole count"),
    (dict(gpu_experts=4, devices_budget=[]), "devices_budget must give one count"),
    (dict(gpu_experts=4, devices_budget="2,2"), "devices_budget must give one count"),
    (dict(gpu_experts=4, devices_budget=[2, 2], policy="lru"), "devices_budget: several devices need a static"),
    (dict(gpu_experts=None), "gpu_experts is required unless devices_budget"),
])
def test_device_budget_errors(kw, match):
    kw = {"policy": "static-popularity", **kw}
    with pytest.raises(ToolkitError, match=match):
        simulate(random_trace(0), kw.pop("policy"), **kw)


def test_devices_budget_beyond_every_expert_holds_them_all():
    t = hand_trace()  # 1 layer x 4 experts
    r = simulate(t, "static-popularity", None, devices_budget=[14, 14])
    assert r.gpu_experts == 4 and r.hit_rate() == 1.0 and sum(r.device_experts) == 4


def test_sweep_with_devices_budget():
    t = random_trace(1, n_layers=2, n_experts=4)
    s = sweep(t, "static-popularity", devices_budget=[2, 3])
    assert [r.gpu_experts for r in s] == [0, 2, 4]  # up to the devices' sum
    df = s.to_dataframe()
    assert df.device_rows.map(sum).tolist() == [int(r.hits.sum()) for r in s]


def test_cli_devices_budget(capsys, tmp_path):
    path = traces.save_trace(random_trace(2, n_layers=2, n_experts=4), tmp_path / "t.npz")
    assert main(["simulate", "--trace", str(path), "--policy", "static-popularity", "--devices-budget", "2,3"]) == 0
    out = capsys.readouterr().out
    assert " 5 " in out and "by GPU: 0: 2/2 experts" in out and "1: 3/3 experts" in out
    assert main(["simulate", "--trace", str(path), "--policy", "static-popularity", "--devices-budget", "2,3",
                 "--gpu-experts", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpu_experts"] == 4 and [d["experts"] for d in doc["devices"]] == [2, 2]
    for argv, message in [(["--devices-budget", "2,3", "--gpu-experts", "6"], "do not fit"),
                          (["--devices-budget", "2,3", "--policy", "lru"], "static placement"),
                          (["--devices-budget", "2,x"], "--devices-budget"),
                          (["--devices-budget", "2,-1"], "--devices-budget")]:
        try:
            code = main(["simulate", "--trace", str(path), "--policy", "static-popularity", *argv])
        except SystemExit as e:  # argparse usage errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
