"""Placement and caching policies, stepped by hand with exact expected hits, loads and evictions."""

import json

import numpy as np
import pytest

from toolkit.errors import ToolkitError
from toolkit.moe import policies
from toolkit.moe.policies import LFU, LRU, Belady, StaticPopularity, StaticUniform
from toolkit.moe.traces import Trace


def test_split_budget():
    assert policies.split_budget(10, 4, 8).tolist() == [3, 3, 2, 2]
    assert policies.split_budget(0, 3, 8).tolist() == [0, 0, 0]
    assert policies.split_budget(24, 3, 8).tolist() == [8, 8, 8]
    for bad in (-1, 25):
        with pytest.raises(ToolkitError, match="between 0 and 24"):
            policies.split_budget(bad, 3, 8)


def test_uniform_placement_spreads_layers_and_indices():
    r = policies.uniform_placement(6, 3, 4)
    assert r.sum(1).tolist() == [2, 2, 2]
    assert [np.flatnonzero(row).tolist() for row in r] == [[0, 1], [2, 3], [0, 1]]
    assert StaticUniform().reset(6, 3, 4).tolist() == r.tolist()


def test_static_popularity_takes_the_global_top():
    pop = np.array([[5, 1, 0], [9, 2, 5], [0, 0, 7]])
    p = StaticPopularity()
    r = p.reset(3, 3, 3, pop)
    # ties (5 and 5) go to the lower layer: flat order 3 (9), 8 (7), 0 (5, layer 0) before 5 (5, layer 1)
    assert np.flatnonzero(r.ravel()).tolist() == [0, 3, 8]
    hits, load, evict = p.step(1, np.array([0, 2]))
    assert hits.tolist() == [True, False] and load == [] and evict == []
    assert p.resident(2).tolist() == [False, False, True]
    with pytest.raises(ToolkitError, match="popularity profile"):
        StaticPopularity().reset(3, 3, 3)
    with pytest.raises(ToolkitError, match="shape"):
        StaticPopularity().reset(3, 2, 3, pop)


def test_lru_hand_written_sequence():
    p = LRU()
    assert p.reset(2, 1, 4).tolist() == [[True, True, False, False]]  # uniform start: experts 0, 1
    steps = [[2], [0], [1], [2, 3], [3, 0], [0, 1, 2]]
    expected = [
        ([False], [2], [1]),  # cold miss: of the untouched 0, 1 the higher index goes
        ([True], [], []),
        ([False], [1], [2]),  # 2 (used at pass 0) is older than 0 (pass 1)
        ([False, False], [2, 3], [0, 1]),
        ([True, False], [0], [2]),
        ([True, False, False], [1], [3]),  # 3 used > slots: 0 is a hit and stays, only 1 fits
    ]
    for used, want in zip(steps, expected):
        hits, load, evict = p.step(0, np.array(used))
        assert (hits.tolist(), load, evict) == want
    assert p.resident(0).tolist() == [True, True, False, False]


def test_lfu_hand_written_sequence_differs_from_lru():
    steps = [[2], [0], [0], [1], [2], [1]]
    lfu, lru = LFU(), LRU()
    lfu.reset(2, 1, 3)
    lru.reset(2, 1, 3)
    got = [tuple(x.tolist() if isinstance(x, np.ndarray) else x for x in lfu.step(0, np.array(u))) for u in steps]
    assert got == [([False], [2], [1]), ([True], [], []), ([True], [], []),
                   ([False], [1], [2]),  # 2 was used once, 0 twice
                   ([False], [2], [1]),  # LFU drops 1 (1 use); LRU would drop 0
                   ([False], [1], [0])]  # 0 and 2 both used twice: the older one (0) goes
    lru_loads = [lru.step(0, np.array(u))[2] for u in steps]
    assert lru_loads[4] == [0]


def test_belady_hand_written_sequence():
    seq = [0, 1, 2, 0, 1]  # one decode token per pass, one layer, top-1
    trace = Trace(np.array(seq).reshape(5, 1, 1), np.ones((5, 1, 1)), np.arange(5), np.ones(5), {"n_experts": 3})
    b = Belady(trace)
    assert b.reset(1, 1, 3).tolist() == [[True, False, False]]  # the expert used first
    hits = []
    for e in seq:
        h, load, evict = b.step(0, np.array([e]))
        hits.append(bool(h[0]))
        assert load == [] and evict == []  # 1 and 2 are needed later than 0 or never: not worth a copy
    assert hits == [True, False, False, True, False]
    lru = LRU()
    lru.reset(1, 1, 3, popularity=np.array([[1.0, 0, 0]]))
    assert sum(bool(lru.step(0, np.array([e]))[0][0]) for e in seq) == 1


def test_belady_checks_the_replay():
    trace = Trace(np.array([0, 1]).reshape(2, 1, 1), np.ones((2, 1, 1)), [0, 1], [1, 1], {"n_experts": 2})
    b = Belady(trace)
    b.reset(1, 1, 2)
    with pytest.raises(ToolkitError, match="replay the trace"):
        b.step(0, np.array([1]))
    with pytest.raises(ToolkitError, match="layers x"):
        b.reset(1, 2, 2)


def test_step_validates_used():
    p = LRU()
    p.reset(2, 1, 4)
    with pytest.raises(ToolkitError, match="distinct"):
        p.step(0, np.array([1, 1]))
    with pytest.raises(ToolkitError, match="distinct"):
        p.step(0, np.array([4]))


def test_caches_start_from_popularity():
    pop = np.array([[1, 9, 5, 0], [3, 0, 0, 8]])
    for cls in (LRU, LFU):
        r = cls().reset(3, 2, 4, pop)
        assert [np.flatnonzero(row).tolist() for row in r] == [[1, 2], [3]]


def test_get_policy():
    assert isinstance(policies.get_policy("LRU"), LRU)
    assert isinstance(policies.get_policy("fiddler"), StaticPopularity)
    assert isinstance(policies.get_policy("uniform"), StaticUniform)
    assert set(policies.POLICY_NAMES) == {"static-popularity", "static-uniform", "lru", "lfu", "belady"}
    with pytest.raises(ToolkitError, match="choose one of"):
        policies.get_policy("random")
    with pytest.raises(ToolkitError, match="needs the routing trace"):
        policies.get_policy("belady")


def test_placement_file_roundtrip(tmp_path):
    r = policies.uniform_placement(5, 2, 4)
    path = policies.save_placement(tmp_path / "p.json", r, {"policy": "static-uniform"})
    doc = json.loads(path.read_text())
    assert doc["format"] == "toolkit-placement" and doc["budget"] == 5 and doc["resident"] == [[0, 1, 2], [0, 3]]
    np.testing.assert_array_equal(policies.load_placement(path), r)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a valid placement"),
    ('{"format": "toolkit-placement", "version": 1, "n_layers": 2, "n_experts": 4, "resident": [[0]]}', "1 layers"),
    ('{"format": "toolkit-placement", "version": 1, "n_layers": 1, "n_experts": 4, "resident": [[7]]}', "outside"),
])
def test_bad_placement_file(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ToolkitError, match=message):
        policies.load_placement(path)
