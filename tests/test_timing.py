"""measure_latency with a scripted clock: exact statistics, warm-up detection, the stopping rule."""

import math
import warnings

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.timing import LatencyResult, LatencyWarning, _median_ci_ranks, find_transfers, measure_latency, median_ci


class Scripted:
    """A clock that only moves when the timed function runs: each call takes the next scripted duration."""

    def __init__(self, durations_ms, log=None):
        self.now = 0
        self.durations = list(durations_ms)
        self.calls = 0
        self.log = log

    def clock(self) -> int:
        if self.log is not None:
            self.log.append("clock")
        return self.now

    def fn(self) -> None:
        if self.log is not None:
            self.log.append("fn")
        self.now += round(self.durations[self.calls] * 1e6)  # ms -> ns
        self.calls += 1


def run(durations, **kw):
    s = Scripted(durations)
    opts = dict(device="cpu", clock=s.clock, synchronizer=lambda: None, detect_sync=False)
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        return measure_latency(s.fn, **opts), s


# --- statistics


def test_exact_statistics_with_a_fake_clock():
    warm = [50.0] + [10.0] * 9  # steady after 10 calls: median(last 5) == median(5 before) == 10
    samples = [10.0 + i for i in range(20)]  # 10..29 ms
    r, s = run(warm + samples, target_rel_ci=0.0, max_samples=20, max_time_s=1e9)
    assert r.warmup_count == 10 and r.first_call_ms == 50.0 and r.warmup_ms == tuple(warm)
    assert r.samples_ms == tuple(samples) and r.n_samples == 20 and s.calls == 30
    assert r.stop_reason == "max_samples"
    assert r.median_ms == 19.5
    assert r.mean_ms == 19.5
    assert r.min_ms == 10.0
    assert r.std_ms == pytest.approx(np.std(samples, ddof=1))
    assert r.p90_ms == pytest.approx(np.percentile(samples, 90))
    assert r.p99_ms == pytest.approx(28.81)
    assert r.iqr_ms == pytest.approx(9.5)
    # n = 20: the 95% CI of the median spans the 6th..15th order statistics (1-based)
    assert r.ci95_ms == (15.0, 24.0)
    assert r.options["method"] == "host_clock"


def test_median_ci_ranks_match_textbook_values():
    assert _median_ci_ranks(20, 0.95) == (5, 14)
    assert _median_ci_ranks(100, 0.95) == (39, 60)  # ranks 40 and 61, 1-based
    assert _median_ci_ranks(5, 0.95) == (0, 4)  # too few samples for 95%: min..max
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert all(math.isnan(v) for v in median_ci([]))


def test_median_ci_is_exact_binomial():
    stats = pytest.importorskip("scipy.stats")
    # [x_(lo), x_(n-1-lo)] (0-based) misses the median with probability 2 * P(B <= lo), B ~ Bin(n, 1/2)
    for n in [6, 7, 10, 31, 64, 257, 1000]:
        lo, hi = _median_ci_ranks(n, 0.95)
        assert hi == n - 1 - lo
        assert 1 - 2 * stats.binom.cdf(lo, n, 0.5) >= 0.95  # covers >= 95%
        assert 1 - 2 * stats.binom.cdf(lo + 1, n, 0.5) < 0.95  # and is the tightest such interval
    for n in [1001, 5000, 10_000]:  # normal approximation: still >= 95%, at most one rank wider
        lo, _ = _median_ci_ranks(n, 0.95)
        assert 1 - 2 * stats.binom.cdf(lo, n, 0.5) >= 0.95
        assert 1 - 2 * stats.binom.cdf(lo + 2, n, 0.5) < 0.95


# --- warm-up


def test_warmup_runs_until_steady():
    ramp = [100.0, 80.0, 60.0, 40.0, 20.0] + [10.0] * 8
    r, _ = run(ramp + [10.0] * 10)
    # steady once the 5 samples before the last 5 have median 10: the 13th call
    assert r.warmup_count == 13 and r.warmup_ms == tuple(ramp)
    assert r.first_call_ms == 100.0
    assert not any("steady" in n for n in r.notes)


def test_warmup_floor_and_cap():
    r, _ = run([10.0] * 40, min_warmup=25)
    assert r.warmup_count == 25
    zigzag = [10.0 * (1 + i) for i in range(60)]  # never steady
    r, _ = run(zigzag, max_warmup=30, min_samples=10, max_samples=10)
    assert r.warmup_count == 30 and r.samples_ms == tuple(zigzag[30:40])
    assert any("without reaching a steady state" in n for n in r.notes)


def test_warmup_stops_at_the_time_cap():
    zigzag = [100.0 * (1 + i) for i in range(40)]
    r, _ = run(zigzag, max_time_s=1.0, min_samples=3, max_samples=3)
    # t_start is the end of the first call; 200+300+400+500 ms >= 1 s after 5 calls
    assert r.warmup_count == 5


# --- the stopping rule


def test_stops_when_ci_is_tight_but_not_before_min_samples():
    r, _ = run([10.0] * 40, min_samples=12)
    assert r.n_samples == 12 and r.stop_reason == "ci"
    assert r.ci95_ms == (10.0, 10.0)


def test_stops_at_the_time_cap():
    alternating = [10.0, 20.0] * 50
    r, _ = run([10.0] * 10 + alternating, target_rel_ci=0.0, min_samples=3, max_time_s=0.1)
    assert r.samples_ms == (10.0, 20.0, 10.0, 20.0, 10.0, 20.0, 10.0)  # 100 ms elapsed after 7 samples
    assert r.stop_reason == "time"
    assert any("above the 0.0% target (stopped by time)" in n for n in r.notes)
    r, _ = run([10.0] * 10 + alternating, target_rel_ci=0.0, min_samples=20, max_time_s=0.1)
    assert r.n_samples == 20  # never fewer than min_samples


def test_ci_target_is_reached_with_noise():
    rng = np.random.default_rng(0)
    noisy = list(10.0 + rng.normal(0, 0.1, size=2000))
    r, _ = run([10.0] * 10 + noisy, target_rel_ci=0.002, max_time_s=1e9)
    assert r.stop_reason == "ci"
    lo, hi = r.ci95_ms
    assert (hi - lo) / 2 / r.median_ms <= 0.002
    lo2, hi2 = median_ci(r.samples_ms[:-1])  # one sample earlier the rule had not fired
    assert (hi2 - lo2) / 2 / float(np.median(r.samples_ms[:-1])) > 0.002


def test_synchronizer_runs_before_each_clock_read():
    log = []
    s = Scripted([1.0] * 30, log=log)
    measure_latency(s.fn, device="cpu", clock=s.clock, synchronizer=lambda: log.append("sync"),
                    detect_sync=False, min_samples=10)
    assert log[:5] == ["sync", "clock", "fn", "sync", "clock"]
    for i, entry in enumerate(log):
        if entry == "clock":
            assert log[i - 1] == "sync"


@pytest.mark.filterwarnings("ignore::toolkit.timing.LatencyWarning")
def test_threads_fixed_inference_mode_and_restored():
    seen = []

    def fn(x):
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return x + 1

    before = torch.get_num_threads()
    r = measure_latency(fn, torch.ones(4), threads=1, max_time_s=0.05, min_samples=10)
    assert set(seen) == {(1, True)}
    assert torch.get_num_threads() == before
    assert r.options["threads"] == 1 and r.env["cpu_threads"] == 1
    assert r.n_samples >= 10 and r.ci95_ms[0] <= r.median_ms <= r.ci95_ms[1]


# --- the result value


def test_json_round_trip_and_frame():
    r, _ = run([20.0] + [10.0] * 9 + [10.0, 11.0, 12.0, 13.0, 30.0] * 4, target_rel_ci=0.0, max_samples=20,
               label="demo")
    back = LatencyResult.from_json(r.to_json())
    assert back == r and back.median_ms == r.median_ms and back.ci95_ms == r.ci95_ms
    assert back.env == r.env and back.options == r.options and back.notes == r.notes
    d = r.to_dict()
    for key in ["median_ms", "mean_ms", "p99_ms", "ci95_ms", "n_samples", "warmup", "env", "samples_ms"]:
        assert key in d
    assert d["warmup"]["count"] == 10 and d["warmup"]["first_call_ms"] == 20.0
    row = r.to_dataframe()
    assert len(row) == 1 and row.loc[0, "median_ms"] == r.median_ms and row.loc[0, "ci95_low_ms"] == r.ci95_ms[0]
    per_call = r.to_dataframe(samples=True)
    assert list(per_call.columns) == ["label", "phase", "index", "latency_ms"]
    assert (per_call.phase == "sample").sum() == 20 and (per_call.phase == "warmup").sum() == 10
    text = repr(r)
    assert "demo" in text and "median 12 ms" in text and "warm-up: 10 calls" in text


def test_high_spread_warns():
    spread = [10.0, 20.0] * 10
    s = Scripted([10.0] * 10 + spread)
    with pytest.warns(LatencyWarning, match="high spread"):
        r = measure_latency(s.fn, device="cpu", clock=s.clock, synchronizer=lambda: None, target_rel_ci=0.0,
                            max_samples=20)
    assert any("high spread" in w for w in r.warnings) and "WARNING: high spread" in repr(r)
    quiet, _ = run([10.0] * 30)
    assert not any("high spread" in w for w in quiet.warnings)


# --- transfers and bad options


def test_find_transfers_names_cross_device_copies():
    x = torch.ones(3, 4)
    found = find_transfers(lambda t: (t + 1).to("meta"), x)  # 'meta' stands in for the GPU here
    assert found == ["aten::_to_copy cpu->meta [3, 4]"]
    assert find_transfers(lambda t: (t * 2).sum().item(), x) == []  # a CPU scalar read is no sync


def test_bad_options_raise_toolkit_error():
    with pytest.raises(ToolkitError, match="cuda_graph"):
        measure_latency(lambda: None, device="cpu", cuda_graph=True)
    with pytest.raises(ToolkitError, match="min_samples"):
        measure_latency(lambda: None, device="cpu", min_samples=0)
    if not torch.cuda.is_available():
        with pytest.raises(ToolkitError, match="no CUDA GPU"):
            measure_latency(lambda: None, device="cuda")


# --- on the GPU (run by the lead on the device machine)


@pytest.mark.gpu
def test_gpu_events_flush_and_graph():
    a = torch.randn(1024, 1024, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyWarning)  # a plain matmul has no transfer or sync
        r = measure_latency(torch.mm, a, a, max_time_s=1.0)
    assert r.options["method"] == "cuda_event" and r.device.startswith("cuda") and r.env["gpu"]
    assert r.n_samples >= 10 and r.ci95_ms[0] <= r.median_ms <= r.ci95_ms[1]
    flushed = measure_latency(torch.mm, a, a, max_time_s=1.0, l2_flush=True)
    graph = measure_latency(torch.mm, a, a, max_time_s=1.0, cuda_graph=True)
    assert flushed.options["l2_flush"] and graph.options["cuda_graph"]
    assert 0.5 < graph.median_ms / r.median_ms < 2.0


@pytest.mark.gpu
def test_gpu_detects_item_and_host_copy():
    a = torch.randn(256, device="cuda")
    with pytest.warns(LatencyWarning, match=r"_local_scalar_dense|\.item\(\)"):
        measure_latency(lambda: a.sum().item(), max_time_s=0.2, device="cuda")
    host = torch.randn(256)
    with pytest.warns(LatencyWarning, match="cpu->cuda"):
        measure_latency(lambda: host.to("cuda") * 2, max_time_s=0.2, device="cuda")


def test_transfer_scan_works_inside_inference_mode():
    """The timer runs under inference_mode, where dispatch modes see nothing; its scan must still see copies."""
    from toolkit.timing import scan_transfers

    host = torch.randn(4)
    with torch.inference_mode():
        found = scan_transfers(lambda: host.to("meta") * 2)
    assert found == ["aten::_to_copy cpu->meta [4]"]
