"""Cost model: makespan decisions, interpolation, calibration persistence, the calibrate CLI."""

import json

import numpy as np
import pytest
import torch

from toolkit.__main__ import main
from toolkit.errors import ToolkitError
from toolkit.moe import costs
from toolkit.moe.costs import CostModel, calibrate, choose_threads, fit_linear, load_cost_model

# one Mixtral expert on the lent H200 machine (../shared/data/device-ceilings): CPU bf16 flat to ~32 tokens
DEVICE = dict(cpu_tokens=(1, 8, 32, 128), cpu_ms=(7.2, 7.5, 8.1, 18.7), gpu_tokens=(1, 8, 32, 128),
              gpu_ms=(0.115, 0.114, 0.117, 0.130), copy_ms=6.4, cpu_dtype="bfloat16", dtype="bfloat16",
              expert_bytes=3 * 4096 * 14336 * 2)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_makespan_not_sum_splits_two_single_token_misses():
    cm = CostModel(**DEVICE)
    # minimising the sum would copy both (6.5 < 7.2 each); the makespan puts one on each path
    assert sorted(cm.decide([1, 1]).tolist()) == [False, True]
    assert cm.layer_makespan([1, 1], [True, False]) == pytest.approx(7.2)
    assert cm.layer_makespan([1, 1], [True, True]) == pytest.approx(2 * 6.4 + 0.115)


def test_large_batches_are_copied_small_ones_computed_on_cpu():
    cm = CostModel(**DEVICE)
    assert cm.decide([1, 128]).tolist() == [False, True]  # largest first: 128 tokens copy, 1 token in parallel on CPU
    assert cm.decide(np.array([], dtype=int)).shape == (0,)
    assert cm.breakeven_tokens == 1  # here a copy + GPU compute (6.5 ms) already beats one CPU expert (7.2 ms)


def test_busy_gpu_or_copy_engine_pushes_work_to_the_cpu():
    cm = CostModel(**DEVICE)
    assert cm.decide([1], gpu_busy_ms=100.0).tolist() == [False]
    assert cm.decide([1], copy_busy_ms=50.0).tolist() == [False]
    assert cm.decide([1]).tolist() == [True]


def test_shared_host_bandwidth_counts_the_cpu_dtype_bytes():
    base = {**DEVICE, "copy_ms": 8.0, "cpu_dtype": "float32"}  # CPU (7.2) beats copy (8.1) on time alone...
    assert CostModel(**base).decide([1]).tolist() == [False]
    slow_host = CostModel(**base, host_bandwidth_gbs=10.0)  # ...but reads twice the bytes in float32
    assert slow_host.decide([1]).tolist() == [True]


def test_host_memory_serves_at_the_faster_of_a_plain_read_and_both_paths_at_once():
    base = {**DEVICE, "copy_ms": 8.0, "cpu_dtype": "float32", "host_bandwidth_gbs": 10.0}
    assert CostModel(**base).host_read_gbs == 10.0
    both = CostModel(**base, **CONTENDED, host_paths_gbs=400.0)  # the two paths together read faster
    assert both.host_read_gbs == 400.0 and both._host_ms(4e8) == pytest.approx(1.0)
    assert both.decide([1]).tolist() == [False]  # no longer bound by the plain read: the CPU's 7.2 ms wins
    assert both.without_contention().host_read_gbs == 400.0  # a rate, not a slowdown: decode plans keep it
    assert CostModel(**base, **CONTENDED, host_paths_gbs=4.0).host_read_gbs == 10.0
    assert CostModel(**DEVICE).host_read_gbs is None and CostModel(**DEVICE)._host_ms(1e9) == 0.0
    assert "both read 400.0 GB/s together" in both.summary()
    d = json.loads(json.dumps(both.to_dict()))
    assert CostModel.from_dict(d) == both
    from toolkit.moe.roofline import Ceilings

    assert Ceilings.from_cost_model(both, gpu_gbs=4000.0).host_gbs == 400.0


def test_a_second_link_takes_copies_until_host_memory_binds():
    """Two devices copy over their own links at once; the shared host memory still caps them both."""
    cm = CostModel(**DEVICE, host_bandwidth_gbs=147.0)  # two H200s of one host: 2 x 55 GB/s of copies fit
    one, two = cm.plan([1, 1, 1], split=False), cm.plan([1, 1, 1], split=False, links=2)
    assert one.link is None and two.link is not None and two.link.shape == (3,)
    assert sorted(two.link[two.copy].tolist()) == [0, 1]  # one copy on each link, the third expert on the CPU
    assert two.copy.sum() == 2 and two.makespan_ms < one.makespan_ms
    assert two.makespan_ms == pytest.approx(7.2)  # the CPU expert is the long pole now, not a second copy
    narrow = CostModel(**DEVICE, host_bandwidth_gbs=60.0)  # host memory already saturated by one copy and the CPU
    assert narrow.plan([1, 1, 1], split=False, links=2).makespan_ms == pytest.approx(
        narrow.plan([1, 1, 1], split=False).makespan_ms)
    hop = CostModel(**DEVICE, peer_tokens=(1, 1024), peer_ms=((50.0, 50.0),))  # rows that cannot travel: no copy there
    assert not hop.plan([1, 1, 1], split=False, links=2).link.any()
    assert cm.plan([1], links=2) is cm.plan([1], links=2) and cm.plan([1], links=2) is not cm.plan([1])


def test_decide_is_vectorised_over_many_experts():
    cm = CostModel(**DEVICE)
    tokens = np.random.default_rng(0).integers(1, 200, size=64)
    copy = cm.decide(tokens)
    assert copy.shape == (64,) and copy.dtype == bool
    assert cm.layer_makespan(tokens, copy) <= min(cm.layer_makespan(tokens, np.zeros(64, bool)),
                                                  cm.layer_makespan(tokens, np.ones(64, bool)))


def test_interpolation_fit_and_extrapolation():
    cm = CostModel(**DEVICE)
    assert cm.cpu_time([1, 8, 32, 128]).tolist() == pytest.approx([7.2, 7.5, 8.1, 18.7])
    assert cm.cpu_time([20]).item() == pytest.approx(7.5 + 12 * (0.6 / 24))
    slope = (18.7 - 8.1) / 96
    assert cm.cpu_time([256]).item() == pytest.approx(18.7 + 128 * slope)
    a, b = fit_linear([1, 2, 3], [3.0, 5.0, 7.0])
    assert (a, b) == pytest.approx((1.0, 2.0))
    fixed = CostModel.fixed(cpu=(2.0, 0.5), copy_ms=3.0)
    assert fixed.cpu_fit == pytest.approx((2.0, 0.5)) and fixed.cpu_time([10]).item() == pytest.approx(7.0)


def test_round_trip_and_malformed_entries():
    cm = CostModel(**DEVICE, thread_scaling={1: 65.0, 16: 7.3}, key="k")
    back = CostModel.from_dict(json.loads(json.dumps(cm.to_dict())))
    assert back == cm
    with pytest.raises(ToolkitError, match="malformed"):
        CostModel.from_dict({"cpu_tokens": [1]})
    with pytest.raises(ToolkitError, match="malformed"):
        CostModel.from_dict({**cm.to_dict(), "cpu_dtype": "int4"})


def test_choose_threads_leaves_a_core_for_the_copy_thread(monkeypatch):
    monkeypatch.setattr(costs, "physical_cores", lambda: 16)
    assert choose_threads() == 15
    monkeypatch.setattr(costs, "physical_cores", lambda: 1)
    assert choose_threads() == 1
    assert choose_threads(4) == 4
    with pytest.raises(ToolkitError, match="threads"):
        choose_threads(0)


class FakeClock:
    """Each call advances 1 ms: every timed call measures exactly 1 ms."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.001
        return self.t


def test_calibrate_on_cpu_measures_saves_and_reuses(cache_dir, monkeypatch):
    cm = calibrate(32, 64, torch.float32, device="cpu", threads=1, tokens=(4, 1), repeats=3, clock=FakeClock(),
                   thread_counts=(1, 2))
    assert cm.cpu_tokens == (1, 4) and cm.cpu_ms == pytest.approx((1.0, 1.0))
    assert cm.copy_ms == pytest.approx(1.0) and cm.cpu_threads == 1
    assert set(cm.cpu_ms_by_dtype) == {"float32", "bfloat16"} and cm.cpu_dtype in cm.cpu_ms_by_dtype
    assert cm.thread_scaling == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert cm.expert_bytes == 3 * 32 * 64 * 4 and "D32|I64|float32|t1" in cm.key
    saved = json.loads((cache_dir / "costs.json").read_text())
    assert list(saved["models"]) == [cm.key]

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(costs, "_measure", boom)
    assert calibrate(32, 64, torch.float32, device="cpu", threads=1) == cm  # reused
    assert load_cost_model(cache_dir / "costs.json") == cm
    with pytest.raises(AssertionError, match="measured again"):
        calibrate(32, 64, torch.float32, device="cpu", threads=1, reuse=False)
    with pytest.raises(AssertionError, match="measured again"):
        calibrate(32, 64, torch.float32, device="cpu", threads=2)  # another key: measured


@pytest.mark.parametrize("nbytes,cache,copies", [
    (352 << 20, 300 << 20, 4),  # a Mixtral expert under a 300 MiB cache: 4 x 352 MiB >= 4 caches
    (704 << 20, 300 << 20, 2),  # the same in float32
    (1 << 30, 32 << 20, 2),  # larger than the cache: still two, so no call follows itself
    (1 << 10, 32 << 20, costs.COLD_COPIES_MAX),  # tiny weights: capped
    (352 << 20, None, costs.COLD_COPIES_UNKNOWN),  # the OS does not say
])
def test_cold_copies_span_several_caches(nbytes, cache, copies):
    assert costs.cold_copies(nbytes, cache) == copies


def test_calibration_cycles_cpu_experts_through_distinct_copies(cache_dir, monkeypatch):
    monkeypatch.setattr(costs, "cache_bytes", lambda: 3 * 32 * 64 * 4)  # one float32 expert fills the cache
    seen = []
    real = costs.expert_forward

    def spy(x, gate_up, down, **kw):
        seen.append((gate_up.dtype, gate_up.data_ptr(), down.data_ptr()))
        return real(x, gate_up, down, **kw)

    monkeypatch.setattr(costs, "expert_forward", spy)
    cm = calibrate(32, 64, torch.float32, device="cpu", threads=1, tokens=(1, 4), repeats=3, clock=FakeClock())
    assert cm.meta["cold_copies"] == {"float32": 4, "bfloat16": 8}  # 4 caches' worth of each
    f32 = [s for s in seen if s[0] == torch.float32]
    assert len({p for _, p, _ in f32}) == 4 == len({p for _, _, p in f32})
    for i in range(len(f32) - 4):  # in turn: each copy is read again only after the other three
        assert f32[i][1] != f32[i + 1][1] and f32[i][1:] == f32[i + 4][1:]

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(costs, "_measure", boom)
    assert calibrate(32, 64, torch.float32, device="cpu", threads=1) == cm  # reused
    stale = cm.to_dict()  # an entry timed on one copy of the weights, partly from cache: measured again
    stale["meta"] = {k: v for k, v in stale["meta"].items() if k != "cold_copies"}
    costs.save_cost_model(CostModel.from_dict(stale))
    with pytest.raises(AssertionError, match="measured again"):
        calibrate(32, 64, torch.float32, device="cpu", threads=1)


def test_calibrate_real_timings_are_positive(tmp_path):
    cm = calibrate(preset="tiny-mixtral", device="cpu", threads=1, tokens=(1, 16), repeats=2, path=tmp_path / "c.json")
    assert all(t > 0 for t in cm.cpu_ms + cm.gpu_ms) and cm.copy_ms > 0
    assert cm.hidden == 64 and cm.intermediate == 128


def test_corrupt_or_foreign_calibration_files_raise(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ToolkitError, match="not valid JSON"):
        calibrate(32, 64, torch.float32, device="cpu", threads=1, path=bad)
    bad.write_text('{"hello": 1}')
    with pytest.raises(ToolkitError, match="not a toolkit calibration file"):
        load_cost_model(bad)
    with pytest.raises(ToolkitError, match="not found"):
        load_cost_model(tmp_path / "missing.json")
    bad.write_text('{"version": 1, "models": {}}')
    with pytest.raises(ToolkitError, match="no calibration for 'x'"):
        load_cost_model(bad, key="x")


def test_calibrate_cli_json(tmp_path, capsys):
    out = tmp_path / "cal.json"
    rc = main(["calibrate", "--preset", "tiny-mixtral", "--device", "cpu", "--threads", "1", "--tokens", "1,4",
               "--repeats", "2", "--no-scaling", "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["preset"] == "tiny-mixtral" and doc["file"] == str(out) and out.exists()
    assert doc["cost_model"]["cpu_tokens"] == [1, 4] and doc["cost_model"]["cpu_threads"] == 1
    assert {"a", "b"} <= set(doc["cost_model"]["cpu_fit_ms"]) and "env" in doc
    assert doc["decode_all_missed"]["token_ms"] > 0


@pytest.mark.parametrize("argv,match", [
    (["--tokens", "1,x"], "--tokens"),
    (["--preset", "nope"], "unknown MoE preset"),
])
def test_calibrate_cli_bad_input_exits_2(argv, match, capsys):
    assert main(["calibrate", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and err.count("\n") == 1


def test_calibrate_cli_corrupt_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[[[")
    assert main(["calibrate", "--preset", "tiny-mixtral", "--device", "cpu", "--out", str(bad), "--reuse"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.gpu
def test_calibrate_on_cuda_measures_copies_and_host_bandwidth(tmp_path):
    cm = calibrate(preset="mixtral-8x7b", device="cuda", tokens=(1, 32), repeats=3, path=tmp_path / "c.json")
    assert 0.5 < cm.copy_ms < 100 and cm.gpu_ms[0] < cm.cpu_ms[0]
    assert cm.host_bandwidth_gbs and cm.host_bandwidth_gbs > 1
    # both paths read host memory: a CPU expert is not faster beside copies (a median below 1 is sample noise,
    # read as 1: on the 32-core two-H200 host one link's copies leave most of its ~150 GB/s free, so the ratio
    # is ~1, and medians of three samples there read 0.33-0.81), nor 10x slower
    assert cm.contention_links == 1 and len(cm.cpu_contention) == 2
    assert all(1.0 <= r < 10 for r in cm.cpu_contention) and 1.0 <= cm.copy_contention < 10, \
        (cm.cpu_contention, cm.copy_contention)
    assert "while copying over 1 link" in cm.summary()
    # both paths at once read at least what the faster one alone does (a copy: ~55 GB/s on a PCIe 5 link)
    assert cm.host_paths_gbs > 0.8 * cm.expert_bytes / cm.copy_ms * 1e-6 and cm.host_read_gbs >= cm.host_paths_gbs
    assert cm.meta["cold_copies"]["bfloat16"] >= 2
    stale = {k: v for k, v in cm.to_dict().items() if "contention" not in k}  # an entry without the contention
    costs.save_cost_model(CostModel.from_dict(stale), tmp_path / "c.json")
    again = calibrate(preset="mixtral-8x7b", device="cuda", tokens=(1, 32), repeats=3, path=tmp_path / "c.json")
    assert again.cpu_contention is not None  # measured again rather than reused without it


# -- contention: CPU experts and copies share host memory ------------------------------------------

def test_overlapped_paths_run_at_their_contended_rates_until_one_ends():
    # a 7.2 ms CPU expert that takes 9.0 ms during copies, beside one 6.4 ms copy the CPU does not slow:
    # 6.4 ms under contention does 6.4 / 9.0 of its work, the rest runs alone
    cpu, copy = costs.overlap_ends(7.2, 9.0, 6.4, 6.4)
    assert copy == 6.4 and cpu == pytest.approx(6.4 + (1 - 6.4 / 9.0) * 7.2)
    cpu, copy = costs.overlap_ends(3.0, 4.0, 12.8, 14.0)  # the CPU ends first; the copies then speed up
    assert cpu == 4.0 and copy == pytest.approx(4.0 + (1 - 4.0 / 14.0) * 12.8)
    assert costs.overlap_ends(7.2, 7.2, 6.4, 6.4) == (7.2, 6.4)  # no contention: each as alone
    assert costs.overlap_ends(7.2, 9.0, 0.0, 0.0) == (7.2, 0.0)  # nothing to contend with
    assert costs.overlap_ends(0.0, 0.0, 6.4, 7.0) == (0.0, 6.4)


CONTENDED = dict(cpu_contention=(1.25, 1.25, 1.2, 1.5), copy_contention=1.0, contention_links=1)


def test_a_model_without_contention_plans_exactly_as_before():
    plain, measured = CostModel(**DEVICE), CostModel(**DEVICE, **CONTENDED)
    assert measured.without_contention() == plain
    assert plain.cpu_time_during_copies([1, 8]).tolist() == plain.cpu_time([1, 8]).tolist()
    assert measured.cpu_time_during_copies([1]) == pytest.approx(7.2 * 1.25)
    assert measured.copy_slowdown == 1.0 and CostModel(**DEVICE, **{**CONTENDED, "copy_contention": 1.1}).copy_slowdown \
        == 1.1
    # a CPU expert alone in its layer (no copies) runs at its own speed
    assert measured.layer_makespan([1], [False]) == plain.layer_makespan([1], [False]) == pytest.approx(7.2)


def test_contention_slows_a_cpu_expert_beside_a_copy():
    plain, measured = CostModel(**DEVICE), CostModel(**DEVICE, **CONTENDED)
    # one copied, one on the CPU: 7.2 ms alone, 9.0 ms under a copy of 6.4 ms
    assert plain.layer_makespan([1, 1], [True, False]) == pytest.approx(7.2)
    assert measured.layer_makespan([1, 1], [True, False]) == pytest.approx(6.4 + (1 - 6.4 / 9.0) * 7.2)
    # the split expert weighs the slower CPU: the GPU takes a larger share of it
    a, b = plain.plan([1]), measured.plan([1])
    assert a.split == b.split == 0 and b.fraction > a.fraction


@pytest.mark.parametrize("links", [1, 2])
def test_planning_with_the_contention_is_never_worse_under_it(links):
    """Judged under the contention the machine really has, the plan that knows it beats (or ties) the one that
    does not: prefill layers of 128-token experts on two H200s of one host, where a CPU expert ran 2x slower
    while both links copied."""
    x2 = dict(DEVICE, cpu_ms=(3.8, 4.5, 6.0, 10.0), host_bandwidth_gbs=158.7)
    truth = CostModel(**x2, cpu_contention=(2.0, 1.8, 1.6, 1.4), copy_contention=1.05, contention_links=links)
    naive = CostModel(**x2)

    def judge(tokens, plan) -> float:  # the layer's makespan under the real contention
        route = [int(d) if c else -1 for c, d in zip(plan.copy, plan.link if plan.link is not None else
                                                    [0] * len(tokens))]
        return truth._paths(tokens, *truth.times(tokens), route, links=links).span

    for tokens in ([128] * 8, [128] * 5, [60, 40, 20, 9], [1, 1]):
        planned, blind = truth.plan(tokens, split=False, links=links), naive.plan(tokens, split=False, links=links)
        assert judge(tokens, planned) <= judge(tokens, blind) + 1e-9
        assert planned.copy.sum() >= blind.copy.sum()  # the slower CPU gives experts to the links
    if links == 2:  # two single-token misses: the CPU expert would finish after a copy once slowed, so both copy
        assert truth.plan([1, 1], split=False, links=2).copy.sum() == 2
        assert naive.plan([1, 1], split=False, links=2).copy.sum() == 1


def test_contention_round_trips_and_is_reported():
    cm = CostModel(**DEVICE, **CONTENDED, key="k")
    d = json.loads(json.dumps(cm.to_dict()))
    assert d["cpu_contention"] == [1.25, 1.25, 1.2, 1.5] and CostModel.from_dict(d) == cm
    assert "while copying over 1 link: CPU expert x1.25 (n=1) .. x1.50 (n=128), copy x1.00" in cm.summary()
    assert "while copying" not in CostModel(**DEVICE).summary()


@pytest.mark.parametrize("change,match", [
    (dict(cpu_contention=[1.2, 1.2]), "one slowdown per CPU token count"),
    (dict(copy_contention=None), "measured together"),
    (dict(cpu_contention=[1.2, -1.0, 1.2, 1.2]), "finite ratios > 0"),
    (dict(copy_contention=float("inf")), "finite ratios > 0"),
    (dict(contention_links=0), "contention_links must be"),
    (dict(host_paths_gbs=0.0), "host_paths_gbs must be a rate > 0"),
    (dict(host_paths_gbs="fast"), "host_paths_gbs must be a rate > 0"),
])
def test_malformed_contention_is_rejected(change, match):
    d = {**json.loads(json.dumps(CostModel(**DEVICE, **CONTENDED).to_dict())), **change}
    with pytest.raises(ToolkitError, match="malformed") as err:
        CostModel.from_dict(d)
    assert match in str(err.value)


# -- the peer hop of resident experts on several devices ---------------------------------------------

PEER = dict(peer_tokens=(1, 9), peer_ms=((0.5, 2.5), (1.0, 5.0)), peer_devices=("cuda:1", "cuda:2"))


def test_calibrate_with_devices_measures_the_peer_hop_under_its_own_key(cache_dir):
    one = calibrate(32, 64, torch.float32, device="cpu", threads=1, tokens=(4, 1), repeats=3, clock=FakeClock())
    two = calibrate(32, 64, torch.float32, device="cpu", threads=1, tokens=(4, 1), repeats=3, clock=FakeClock(),
                    devices=["cpu", "cpu"])
    assert one.peer_tokens is None and one.peer_ms is None and one.peer_devices == ()
    assert two.peer_tokens == (1, 4) and two.peer_devices == ("cpu",)
    assert len(two.peer_ms) == 1 and two.peer_ms[0] == pytest.approx((1.0, 1.0))  # the fake clock: 1 ms per call
    assert two.key == one.key + "|devices=cpu,cpu"
    saved = json.loads((cache_dir / "costs.json").read_text())["models"]
    assert list(saved) == [one.key, two.key]  # single- and multi-device calibrations side by side
    assert calibrate(32, 64, torch.float32, device="cpu", threads=1, devices=["cpu", "cpu"]) == two  # reused
    assert calibrate(32, 64, torch.float32, device="cpu", threads=1, devices=["cpu"]) == one  # one device: no hop


def test_peer_hop_uses_the_median_of_synchronized_repeats(monkeypatch):
    calls = []

    def fake_median(fn, repeats, warmup, sync=None, clock=None):
        fn()  # the hop itself runs (on the CPU ``.to`` is free)
        calls.append((repeats, warmup, sync))
        return 0.25 * len(calls)

    monkeypatch.setattr(costs, "_median_ms", fake_median)
    ms = costs._measure_peer(8, torch.float32, ["cpu", "cpu", "cpu"], (1, 4), 5, 3, FakeClock())
    assert ms == [[0.25, 0.5], [0.75, 1.0]]  # [devices - 1][tokens]
    assert calls == [(5, 3, None)] * 4  # no CUDA device to synchronize here


@pytest.mark.parametrize("devices,match", [
    ("cpu", "non-empty list"), ([], "non-empty list"), (["cpu", "mps"], "devices: unknown device"),
])
def test_calibrate_rejects_bad_devices(devices, match):
    with pytest.raises(ToolkitError, match=match):
        calibrate(32, 64, torch.float32, device="cpu", threads=1, devices=devices)


def test_peer_fields_round_trip_and_report():
    cm = CostModel(**DEVICE, **PEER, key="k")
    d = json.loads(json.dumps(cm.to_dict()))
    assert d["peer_ms"] == [[0.5, 2.5], [1.0, 5.0]] and len(d["peer_fit_ms"]) == 2
    assert CostModel.from_dict(d) == cm
    assert "rows to cuda:1 and back: 0.250 + 0.25000*n ms" in cm.summary()
    old = {k: v for k, v in CostModel(**DEVICE).to_dict().items() if not k.startswith("peer")}
    back = CostModel.from_dict(old)  # an entry without peer hops (one device) loads
    assert back.peer_ms is None and back == CostModel(**DEVICE) and "rows to" not in back.summary()


@pytest.mark.parametrize("change,match", [
    (dict(peer_ms=[[-0.5, 2.5], [1.0, 5.0]]), "peer_ms must be a finite time"),
    (dict(peer_ms=[[0.5, float("nan")], [1.0, 5.0]]), "peer_ms must be a finite time"),
    (dict(peer_tokens=[9, 1]), "peer_tokens must increase"),
    (dict(peer_tokens=[0, 9]), "peer_tokens must be whole numbers >= 1"),
    (dict(peer_ms=[[0.5], [1.0, 5.0]]), "one time per peer token count"),
    (dict(peer_ms=None), "peer_tokens must be a list"),
    (dict(peer_ms=[]), "non-empty list of lists"),
    (dict(peer_devices=["cuda:1"]), "peer_devices must name the 2"),
])
def test_malformed_peer_entries_are_rejected(change, match):
    d = {**json.loads(json.dumps(CostModel(**DEVICE, **PEER).to_dict())), **change}
    with pytest.raises(ToolkitError, match="malformed") as err:
        CostModel.from_dict(d)
    assert match in str(err.value)


def test_resident_time_adds_each_devices_hop():
    cm = CostModel.fixed(gpu=(1.0, 0.0), **PEER)  # every resident expert 1 ms on its device
    assert cm.peer_time(5, 0) == 0.0 and cm.peer_time(0, 1) == 0.0
    assert cm.peer_time(5, 1) == pytest.approx(1.5) and cm.peer_time(5, 2) == pytest.approx(3.0)
    assert cm.peer_time(5, 3) == pytest.approx(3.0)  # beyond the calibrated devices: the slowest measured
    assert cm.peer_time(5000, 1) == pytest.approx(0.5 + 0.25 * 4999)  # past the table: extrapolated
    # device 1 gets 3 + 2 rows (2 ms of experts + a 1.5 ms hop) while device 0 computes 4 rows (1 ms)
    assert cm.resident_ms([3, 2, 4], [1, 1, 0]) == pytest.approx(3.5)
    assert cm.resident_ms([3, 2, 4, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]) == pytest.approx(5.0)  # first is slower
    assert cm.resident_ms([3, 2, 4]) == pytest.approx(3.0)  # one device: the sum
    assert cm.resident_ms([], []) == 0.0


def test_a_model_without_peer_cost_decides_exactly_as_one_device():
    plain, spread = CostModel(**DEVICE), CostModel(**DEVICE, **PEER)
    tokens, tiers = [1, 3, 8], [0, 1, 1]
    assert plain.resident_ms(tokens, tiers) == plain.resident_ms(tokens) == float(sum(plain.times(tokens)[1]))
    for miss in ([1], [1, 1], [1, 128], [5, 40, 2]):
        busy = plain.resident_ms(tokens, tiers)
        a, b = plain.plan(miss, busy), spread.plan(miss, busy)
        assert a.copy.tolist() == b.copy.tolist() and (a.split, a.fraction, a.makespan_ms) == (b.split, b.fraction,
                                                                                              b.makespan_ms)


def test_a_slow_peer_hop_moves_a_miss_to_the_cpu():
    """The first device waits for a spread expert's rows, so copying a miss there costs the hop too."""
    slow = CostModel(**DEVICE, peer_tokens=(1, 128), peer_ms=((20.0, 20.0),))
    assert slow.plan([1], slow.resident_ms([1], [0])).copy.tolist() == [True]  # first device free: copy it
    assert slow.plan([1], slow.resident_ms([1], [1])).copy.tolist() == [False]  # waits 20 ms: the CPU does it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_calibrate_on_two_gpus_measures_the_peer_hop(tmp_path):
    cm = calibrate(preset="mixtral-8x7b", device="cuda:0", tokens=(1, 128), repeats=3, path=tmp_path / "c.json",
                   devices=["cuda:0", "cuda:1"])
    assert cm.peer_devices == ("cuda:1",) and cm.key.endswith("|devices=cuda:0,cuda:1")
    assert all(0 < ms < 10 for ms in cm.peer_ms[0])  # 128 rows x 4096 x bf16 = 1 MiB each way: well under 10 ms
    assert cm.contention_links == 2 and all(0.9 < r < 10 for r in cm.cpu_contention)  # both links copying


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_session_that_gains_a_gpu_measures_the_peer_hop(tmp_path, monkeypatch):
    from toolkit.moe.run import MoESession

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    with MoESession(preset="tiny-mixtral", layers=2, device="cuda:0", new_tokens=4, prompt_tokens=4) as one:
        assert not one.cost_model.peer_ms
        two = one.with_settings(gpus=2)
        assert two.devices == ["cuda:0", "cuda:1"] and two.model is one.model
        assert two.cost_model.peer_devices == ("cuda:1",) and all(ms > 0 for ms in two.cost_model.peer_ms[0])
        assert one.cost_model.contention_links == 1 and two.cost_model.contention_links == 2


def test_both_paths_need_a_cuda_device_to_copy_to():
    gu, dn = torch.zeros(64, 32, dtype=torch.bfloat16), torch.zeros(32, 32, dtype=torch.bfloat16)
    with pytest.raises(ToolkitError, match=r"both paths need CUDA devices to copy to, not \['cpu'\]"):
        costs.HostPaths(gu, dn, torch.bfloat16, 1, ["cpu"])


@pytest.mark.gpu
def test_host_paths_measure_the_ceiling_again_as_the_calibration_did(tmp_path):
    cm = calibrate(preset="mixtral-8x7b", device="cuda", tokens=(1, 32), repeats=3, path=tmp_path / "c.json")
    paths = costs.HostPaths.for_model(cm)
    assert paths.devs == [torch.device("cuda")] and len(paths.sources) == len(paths.cold) >= 2
    first, again = paths.measure(repeats=3), paths.measure(repeats=3)
    for m in (first, again):
        assert m["host_gbs"] == max(m["both_paths_gbs"], m["read_gbs"]) and m["read_gbs"] > 1
        # both paths read at least most of what the copies alone do, and within 2x of the calibration's figure
        assert m["both_paths_gbs"] > 0.8 * cm.expert_bytes / cm.copy_ms * 1e-6
        assert 0.5 < m["both_paths_gbs"] / cm.host_paths_gbs < 2


def test_cpu_slowdown_samples_alternately_and_queues_more_copies_until_they_outlast_the_expert():
    """Fakes: the CPU expert takes 4 ms alone and 5 ms beside copies, 9 ms when its threads wake from a sync (the
    untimed call takes that); a copy takes 1 ms, so 2 copies end first."""
    state = {"copying": False, "queued": [], "asleep": True}

    def cpu_ms():
        woke, state["asleep"] = state["asleep"], False
        return 9.0 if woke else 5.0 if state["copying"] else 4.0

    def queue(k):
        state["copying"] = True
        state["queued"].append(k)
        return k

    def sync():
        state["copying"] = False
        state["asleep"] = True

    slowdown = costs.cpu_slowdown(cpu_ms, queue, lambda k: k * 1.0 < 5.0, sync, warm=1, repeats=3)
    assert slowdown == pytest.approx(5.0 / 4.0)
    assert state["queued"] == [2, 4, 8, 8, 8, 8]  # doubled until 8 copies (8 ms) outlast a 5 ms expert
    # copies that always land before the expert ends (a tiny expert): nothing to measure, no slowdown
    state["queued"].clear()
    assert costs.cpu_slowdown(cpu_ms, queue, lambda k: True, sync, warm=1, repeats=3) == 1.0
    assert state["queued"][-1] == costs.CONTENTION_MAX_QUEUE


def test_a_cached_contention_below_one_is_measured_again(tmp_path):
    """An entry cached before such noise was read as 1 is not reused: its plans would have sent work to the CPU."""
    path = tmp_path / "costs.json"
    kw = dict(copy_contention=1.05, contention_links=1, meta={"cold_copies": 4}, key="k")
    costs.save_cost_model(CostModel.fixed(cpu_contention=(0.33, 1.1), **kw), path)
    assert costs._cached(path, "k") is None
    costs.save_cost_model(CostModel.fixed(cpu_contention=(1.1, 1.1), **{**kw, "copy_contention": 0.9}), path)
    assert costs._cached(path, "k") is None
    kept = CostModel.fixed(cpu_contention=(1.0, 1.1), **kw)
    costs.save_cost_model(kept, path)
    assert costs._cached(path, "k") == kept


def test_cpu_slowdown_reads_noise_below_one_as_no_contention():
    """The two-H200 host's samples (calibration_contention_probe_h200x2.json): the alone samples of one calibration
    caught a spike, so the medians of three said copies made the CPU expert faster (0.81); that is read as 1."""
    samples = iter([3.983, 3.875, 4.776, 3.778, 6.315, 3.655, 3.354, 4.028, 4.803, 3.475, 4.501, 3.592])
    got = costs.cpu_slowdown(lambda: next(samples), lambda k: k, lambda k: False, lambda: None, warm=1, repeats=3)
    assert got == 1.0
    # a real slowdown is kept as measured: 4.0 ms alone, 5.0 beside the copies
    samples = iter([4.0, 4.0, 5.0] * 4)
    assert costs.cpu_slowdown(lambda: next(samples), lambda k: k, lambda k: False, lambda: None, warm=1,
                              repeats=3) == pytest.approx(1.25)
