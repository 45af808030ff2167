"""measure_latency with a scripted clock: exact statistics, warm-up, the stopping rule, the machine's state."""

import math
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from benchmark_scripts import load_benchmark

from toolkit.errors import ToolkitError
from toolkit.machine_state import (
    CpuSnapshot,
    GpuMonitor,
    GpuReading,
    Nvml,
    auto_threads,
    cpu_usage,
    cpu_warnings,
    decode_reasons,
)
from toolkit.timing import (
    MIN_TIME_S,
    LatencyResult,
    LatencyWarning,
    _median_ci_ranks,
    find_transfers,
    measure_latency,
    median_ci,
    rel_ci_halfwidth,
    warning_lines,
)


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


class FakeCpu:
    """CPU counters that advance with a clock: other processes keep ``others`` cores busy, we use ``process``."""

    def __init__(self, now_s, others=0.0, process=1.0, thread_share=1.0, cpus=2, load=0.5, waiting=0.0):
        self.now_s, self.others, self.process, self.share, self.cpus, self.load, self.waiting = (
            now_s, others, process, thread_share, cpus, load, waiting)

    def __call__(self) -> CpuSnapshot:
        t = self.now_s()
        return CpuSnapshot(wall_s=t, process_s=t * self.process, thread_s=t * self.share,
                           busy_s=t * (self.others + self.process), cpus=self.cpus, load_1m=self.load,
                           wait_s=t * self.waiting)


class FakeNvml:
    """NVML answers scripted as a function of the timer's clock (ns): ``schedule(t) -> GpuReading``."""

    def __init__(self, clock, schedule, others=()):
        self.clock, self.schedule, self.others, self.reads = clock, schedule, list(others), 0

    def read(self) -> GpuReading:
        self.reads += 1
        return self.schedule(self.clock())

    def other_processes(self):
        return self.others


def gpu(sm=1980, top=1980, reasons=()):
    return GpuReading(sm_clock_mhz=sm, max_sm_clock_mhz=top, mem_clock_mhz=3201, temperature_c=40, power_w=300.0,
                      reasons=tuple(reasons))


def run(durations, **kw):
    s = Scripted(durations)
    opts = dict(device="cpu", clock=s.clock, synchronizer=lambda: None, detect_sync=False, min_time_s=0.0,
                threads=1, cpu_snapshot=FakeCpu(lambda: s.now / 1e9))
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        return measure_latency(s.fn, **opts), s


def gpu_run(durations, schedule, others=(), **kw):
    """measure_latency as on a GPU (CUDA device faked: scripted clock, fake NVML)."""
    s = Scripted(durations)
    nvml = FakeNvml(s.clock, schedule, others)
    kw.setdefault("min_time_s", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        r = measure_latency(s.fn, device="cpu", clock=s.clock, synchronizer=lambda: None, detect_sync=False,
                            threads=1, cpu_snapshot=FakeCpu(lambda: s.now / 1e9), nvml=nvml, **kw)
    return r, s, nvml


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
    from scipy import stats  # a dependency (pyproject.toml): this test must run, never skip
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
                    detect_sync=False, min_samples=10, min_time_s=0.0, threads=1)
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
                            max_samples=20, min_time_s=0.0, threads=1)
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


# --- on the GPU (run by the preroll on the device machine)


@pytest.mark.gpu
def test_gpu_events_flush_and_graph():
    a = torch.randn(1024, 1024, device="cuda")
    with warnings.catch_warnings():
        # a plain matmul has no transfer or sync (its spread may still draw a warning on a busy host)
        warnings.filterwarnings("error", message=".*(transfer|sync)", category=LatencyWarning)
        r = measure_latency(torch.mm, a, a, max_time_s=1.0)
    assert r.options["method"] == "cuda_event" and r.device.startswith("cuda") and r.env["gpu"]
    assert r.n_samples >= 10 and r.ci95_ms[0] <= r.median_ms <= r.ci95_ms[1]
    flushed = measure_latency(torch.mm, a, a, max_time_s=1.0, l2_flush=True)
    graph = measure_latency(torch.mm, a, a, max_time_s=1.0, cuda_graph=True)
    assert flushed.options["l2_flush"] and graph.options["cuda_graph"]
    assert 0.5 < graph.median_ms / r.median_ms < 2.0


@pytest.mark.gpu
def test_gpu_state_is_read_through_nvml():
    pytest.importorskip("pynvml")
    a = torch.randn(2048, 2048, device="cuda")
    r = measure_latency(torch.mm, a, a, max_time_s=1.0)
    g = r.gpu_state
    assert g is not None and g["polls"] >= 10  # 0.5 s of sampling, polled every 10 ms
    assert g["before"]["sm_clock_mhz"] > 0 and g["after"]["temperature_c"] > 0 and g["max_sm_clock_mhz"] > 0
    assert r.options["min_time_s"] == MIN_TIME_S and r.n_samples + r.n_throttled >= 10
    assert isinstance(g["other_processes"], list)


@pytest.mark.gpu
def test_gpu_hide_launch_times_the_gpu_work_alone():
    x = torch.zeros(1, device="cuda")

    def many_tiny():  # 50 launches of a one-element kernel: launch-bound
        for _ in range(50):
            x.add_(1)

    plain = measure_latency(many_tiny, max_time_s=1.0)
    hidden = measure_latency(many_tiny, max_time_s=1.0, hide_launch=True)
    assert hidden.options["hide_launch"] and not plain.options["hide_launch"]
    assert hidden.median_ms < 0.7 * plain.median_ms  # the host's ~5 us a launch is no longer timed


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


# --- the minimum-time rule


def test_min_time_keeps_sampling_after_the_ci_is_tight():
    r, _ = run([10.0] * 80, min_time_s=0.2)
    # 10 ms a call: the CI is exact from the 10th sample, but sampling lasts 200 ms
    assert r.n_samples == 20 and r.stop_reason == "ci" and r.options["min_time_s"] == 0.2


def test_min_time_defaults_to_half_a_second_and_is_capped_by_max_time():
    assert MIN_TIME_S == 0.5
    r, _ = run([10.0] * 100, min_time_s=None)
    assert r.n_samples == 50 and r.options["min_time_s"] == 0.5
    r, _ = run([10.0] * 100, min_time_s=None, max_time_s=0.1)
    assert r.n_samples == 10 and r.options["min_time_s"] == 0.1


def test_rel_ci_halfwidth_matches_median_ci():
    rng = np.random.default_rng(1)
    for n in [7, 20, 101, 1500]:
        xs = rng.lognormal(0, 0.1, size=n)
        lo, hi = median_ci(xs)
        assert rel_ci_halfwidth(xs) == pytest.approx((hi - lo) / 2 / np.median(xs))


# --- the GPU's state (NVML faked)


def test_throttled_samples_are_flagged_and_left_out():
    # 1 ms calls; sampling starts at 10 ms and the GPU is polled every 10 ms; it is throttled
    # (SM clock 1200 of 1980 MHz) from 105 to 135 ms
    def schedule(t):
        return gpu(sm=1200) if 105e6 <= t < 135e6 else gpu()

    r, _, nvml = gpu_run([1.0] * 210, schedule, min_samples=200, max_samples=200)
    # the polls at 110, 120 and 130 ms saw a throttled GPU: the 40 samples between the polls at 100 and
    # 140 ms are left out (the poll at 140 is fine, but the GPU was throttled 10 ms before)
    assert r.n_throttled == 40 and r.n_samples == 160
    assert r.gpu_state["throttled_polls"] == 3 and r.gpu_state["sm_clock_min_mhz"] == 1200
    assert any("40 of 200 samples were taken while the GPU was throttled" in w for w in r.warnings)
    d = r.to_dict()
    assert d["n_throttled"] == 40 and len(d["throttled_ms"]) == 40
    back = LatencyResult.from_json(r.to_json())
    assert back.throttled_ms == r.throttled_ms and back.gpu_state == r.gpu_state and back.warnings == r.warnings
    assert "+40 throttled, left out" in repr(r)
    assert (r.to_dataframe(samples=True).phase == "throttled").sum() == 40


def test_throttled_samples_do_not_move_the_median():
    # the throttled stretch is slow (3 ms a call); left out, the median is the unthrottled 1 ms
    durations = [1.0] * 100 + [3.0] * 10 + [1.0] * 100
    def schedule(t):
        return gpu(sm=1000) if 95e6 < t < 125e6 else gpu()

    r, _, _ = gpu_run(durations, schedule, min_samples=200, max_samples=200)
    assert set(r.throttled_ms) >= {3.0} and 3.0 not in r.samples_ms and r.median_ms == 1.0


def test_throttled_throughout_keeps_the_samples_with_a_note():
    r, _, _ = gpu_run([1.0] * 60, lambda t: gpu(sm=900), max_warmup=5, min_samples=40, max_samples=40)
    assert r.n_throttled == 0 and r.n_samples == 40
    assert any("throttled for 40 of 40 samples" in n for n in r.notes)


def test_thermal_slowdown_counts_as_throttled():
    assert gpu(reasons=("hw_thermal_slowdown",)).throttled()
    assert not gpu(reasons=("sw_power_cap",)).throttled()  # a steady state under load, not a slowdown
    assert gpu(sm=1400).throttled() and not gpu(sm=1500).throttled()  # 75% of 1980 is 1485
    assert decode_reasons(0x1 | 0x40) == ("gpu_idle", "hw_thermal_slowdown")


def test_clock_moved_warning():
    r, _, _ = gpu_run([1.0] * 300, lambda t: gpu(sm=1980 if t < 150e6 else 1755), min_samples=200,
                      max_samples=200)
    assert r.n_throttled == 0  # 1755 MHz is above the throttle threshold: kept
    assert any("SM clock moved between 1755 and 1980 MHz" in w for w in r.warnings)
    steady, _, _ = gpu_run([1.0] * 300, lambda t: gpu(sm=1980 if t < 150e6 else 1965), min_samples=200,
                           max_samples=200)
    assert not any("clock moved" in w for w in steady.warnings)


def test_warm_up_waits_for_the_clocks():
    # steady latencies from the start, but the clock is low for the first 40 ms
    r, _, _ = gpu_run([1.0] * 200, lambda t: gpu(sm=600 if t < 40e6 else 1980), max_samples=20)
    assert r.warmup_count == 40 and r.n_throttled == 0


def test_gpu_polls_are_rate_limited():
    r, _, nvml = gpu_run([0.1] * 1200, lambda t: gpu(), min_samples=1000, max_samples=1000)
    # 1000 samples of 0.1 ms = 100 ms of sampling: 10 polls (+ start, stop, the warm-up's clock check)
    assert r.gpu_state["polls"] == 11 and nvml.reads <= 14


def test_no_nvml_no_gpu_fields_and_no_crash(monkeypatch):
    r, _ = run([10.0] * 30)
    assert r.gpu_state is None and r.to_dict()["gpu_state"] is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails
    assert Nvml.open(0) is None
    assert GpuMonitor.for_device("cuda", nvml=False) is None and GpuMonitor.for_device("cpu") is None


def test_nvml_wrapper_reads_and_tolerates_unsupported_queries():
    class FakePynvml:
        NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

        def nvmlDeviceGetMaxClockInfo(self, h, kind):
            return 1980

        def nvmlDeviceGetClockInfo(self, h, kind):
            return {1: 1755, 2: 3201}[kind]

        def nvmlDeviceGetTemperature(self, h, kind):
            return 61

        def nvmlDeviceGetPowerUsage(self, h):
            raise RuntimeError("not supported")

        def nvmlDeviceGetCurrentClocksEventReasons(self, h):
            return 0x4

        def nvmlDeviceGetComputeRunningProcesses(self, h):
            class P:
                def __init__(self, pid):
                    self.pid, self.usedGpuMemory = pid, 2**30
            return [P(12345), P(23456)]  # neither is us (a container): one is taken to be this process

    nv = Nvml(FakePynvml(), handle=object())
    reading = nv.read()
    assert reading == GpuReading(1755, 1980, 3201, 61, None, ("sw_power_cap",))
    assert nv.other_processes() == [{"pid": 23456, "used_bytes": 2**30}]


def test_other_gpu_processes_warn():
    r, _, _ = gpu_run([1.0] * 100, lambda t: gpu(), others=[{"pid": 4242, "used_bytes": 1}], max_samples=20)
    w = [w for w in r.warnings if "other work is using the GPU" in w]
    assert w and "pid 4242" in w[0] and "idle GPU" in w[0]
    assert r.unreliable and "other work is using the GPU" in r.unreliable[0]


# --- the CPU's state


def test_cpu_contention_warns_with_the_remedy():
    s = Scripted([10.0] * 200)
    busy = FakeCpu(lambda: s.now / 1e9, others=1.1, process=2.0, load=3.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        r = measure_latency(s.fn, device="cpu", clock=s.clock, synchronizer=lambda: None, threads=2,
                            cpu_snapshot=busy, min_time_s=0.5)
    w = [w for w in r.warnings if w.startswith("other work is using the CPU")]
    assert w == ["other work is using the CPU: 1.1 of 2 cores busy with other processes, load 3.1 on 2 cores, "
                 "while 2 threads timed; re-run with --threads 1 (threads=1) or on an idle machine"]
    assert r.cpu_state["others_busy_cores"] == pytest.approx(1.1) and r.unreliable
    assert warning_lines(r) == r.warnings and warning_lines(r.to_dict()) == r.warnings


def test_one_thread_beside_one_busy_core_is_fine_but_a_descheduled_thread_is_not():
    calm = cpu_usage(CpuSnapshot(0, 0, 0, 0.0, 2, 2.0), CpuSnapshot(1.0, 1.0, 1.0, 2.0, 2, 2.0))
    assert calm["others_busy_cores"] == pytest.approx(1.0) and calm["thread_share"] == 1.0
    assert cpu_warnings(calm, threads=1, cpu_device=True) == []
    assert cpu_warnings(calm, threads=2, cpu_device=True)
    starved = cpu_usage(CpuSnapshot(0, 0, 0, 0.0, 2), CpuSnapshot(1.0, 0.5, 0.5, 2.0, 2))
    assert starved["thread_share"] == 0.5
    assert any("ran only 50% of the wall time" in w for w in cpu_warnings(starved, threads=1, cpu_device=True))
    assert not any("ran only" in w for w in cpu_warnings(starved, threads=1, cpu_device=False))  # GPU: waits
    short = cpu_usage(CpuSnapshot(0, 0, 0, 0.0, 2), CpuSnapshot(0.1, 0.1, 0.1, 0.2, 2))
    assert short["others_busy_cores"] is None  # 10 ms ticks: too short a window to judge


def test_threads_waiting_for_a_core_reveal_a_saturated_cpu():
    # we hold both cores (others' busy time is invisible), but our threads waited 30% of the time for one
    saturated = cpu_usage(CpuSnapshot(0, 0, 0, 0.0, 2, 4.0, wait_s=0.0), CpuSnapshot(1.0, 1.4, 0.7, 2.0, 2, 4.0, 0.6))
    assert saturated["others_busy_cores"] == pytest.approx(0.6) and saturated["waiting_cores"] == pytest.approx(0.6)
    (w,) = [w for w in cpu_warnings(saturated, threads=2, cpu_device=True) if w.startswith("other work")]
    assert "our threads waited for a core 30% of the time" in w and "--threads 1" in w
    calm = cpu_usage(CpuSnapshot(0, 0, 0, 0.0, 2, wait_s=0.0), CpuSnapshot(1.0, 1.0, 1.0, 1.0, 2, wait_s=0.004))
    assert cpu_warnings(calm, threads=1, cpu_device=True) == []


def test_auto_threads_rule():
    assert auto_threads(physical=2, cpus=2, others=0.0) == 2
    assert auto_threads(physical=2, cpus=2, others=0.2) == 2
    assert auto_threads(physical=2, cpus=2, others=0.3) == 1  # more than a quarter core taken: leave it
    assert auto_threads(physical=2, cpus=2, others=1.9) == 1  # never fewer than one
    assert auto_threads(physical=8, cpus=16, others=2.0) == 8  # never more than the physical cores


def test_default_threads_on_cpu_follow_the_load():
    s = Scripted([10.0] * 60)
    busy = FakeCpu(time.perf_counter, others=1.2)  # the pre-measurement look uses real time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        r = measure_latency(s.fn, device="cpu", clock=s.clock, synchronizer=lambda: None, cpu_snapshot=busy,
                            min_time_s=0.0)
    assert r.options["threads"] == 1 and r.options["threads_choice"].startswith("auto")


def test_warning_lines_from_every_kind_of_result():
    r = LatencyResult(samples_ms=(10.0, 20.0) * 10)
    assert warning_lines(r) == r.warnings and warning_lines(r)[0].startswith("high spread")
    assert warning_lines(None) == [] and warning_lines({"warnings": ["x"]}) == ["x"]
    frame = pd.DataFrame({"a": [1]})
    frame.attrs["warnings"] = ["y"]
    assert warning_lines(frame) == ["y"]


def test_cli_latency_prints_the_warnings_with_the_number(monkeypatch, capsys):
    import toolkit.timing as timing
    from toolkit.__main__ import main

    state = {"wall_s": 3.0, "cpus": 2, "load_1m": 3.1, "others_busy_cores": 1.6, "process_cores": 1.0,
             "thread_share": 0.5, "waiting_cores": 0.5}
    busy = LatencyResult(samples_ms=(98.0, 324.0, 862.0) * 4, label="efficientnet-b0", options={"threads": 2},
                         cpu_state=state)
    monkeypatch.setattr(timing, "measure_model_latency", lambda *a, **kw: busy)
    assert main(["latency", "--model", "efficientnet-b0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    median_line = next(line for line in out.splitlines() if "median 324 ms" in line)
    assert "UNRELIABLE" in median_line
    assert "WARNING: other work is using the CPU: our threads waited for a core 25% of the time" in out
    assert "--threads 1" in out


# --- hide_launch: back-to-back bursts (the rules on a CPU, the events on the GPU)


def test_burst_size_fills_ten_ms_and_grows_at_most_fourfold():
    from toolkit.timing import BURST_GROWTH, MAX_BURST, _burst_size

    assert BURST_GROWTH == 4 and MAX_BURST == 64
    assert _burst_size(1, gpu_ns=500e6, host_ns=10e3) == 1  # a cold first call of 0.5 s: one call again
    assert _burst_size(1, gpu_ns=200e3, host_ns=20e3) == 4  # the ramp: 1, 4, 16, ...
    assert _burst_size(16, gpu_ns=200e3, host_ns=20e3) == 50  # 10 ms of 0.2 ms calls
    assert _burst_size(64, gpu_ns=3e3, host_ns=10e3) == 64  # a tiny kernel: capped
    assert _burst_size(64, gpu_ns=1e6, host_ns=11e6) == 1  # launch-bound (11 ms to launch): one call
    assert _burst_size(64, gpu_ns=250e3, host_ns=460e3) == 21  # 10 ms of launching
    assert _burst_size(4, gpu_ns=0.0, host_ns=0.0) == 16  # unknown times: the ramp decides


def test_spin_covers_the_launches_that_the_gpu_would_wait_for():
    from toolkit.timing import MAX_SPIN_NS, SPIN_PAD_NS, _spin_ns

    assert _spin_ns(1, host_ns=100e3, gpu_ns=0.0) == 2 * 100e3 + SPIN_PAD_NS  # one call: twice its launch
    # compute-bound (0.2 ms of work, 20 us to launch): after the first call the host gains on the GPU
    assert _spin_ns(47, host_ns=20e3, gpu_ns=210e3) == 2 * 20e3 + SPIN_PAD_NS
    # launch-bound (0.46 ms to launch, 0.25 ms of work): twice the burst's launches less the work queued before
    assert _spin_ns(21, host_ns=460e3, gpu_ns=250e3) == pytest.approx(2 * 21 * 460e3 - 20 * 250e3 + SPIN_PAD_NS)
    # every call i of the burst is launched (at twice the host's time) before the GPU reaches it
    for k, h, g in [(64, 10e3, 3e3), (21, 460e3, 250e3), (50, 20e3, 200e3), (8, 1e6, 1.2e6)]:
        spin = _spin_ns(k, h, g)
        assert all(spin + (i - 1) * g >= 2 * i * h for i in range(1, k + 1))
    assert _spin_ns(64, host_ns=1e9, gpu_ns=0.0) == MAX_SPIN_NS == 200_000_000  # a broken estimate: 0.2 s at most


def test_burst_plan_remembers_slow_launches_and_measures_per_call(monkeypatch):
    import toolkit.timing as timing
    from toolkit.timing import SPIN_PAD_NS, _BurstPlan

    monkeypatch.setattr(timing, "BURST_PREROLL_S", 0.0)  # the plan alone; the preroll has its own test
    plan = _BurstPlan()
    assert plan.k == 1 and plan.spin_ns == 2 * 100e3 + SPIN_PAD_NS  # before any estimate: 100 us to launch
    plan = plan.after(host_ns=50e3, gpu_ns=300e3)  # the first call: launched in 50 us, 0.3 ms of work
    assert (plan.k, plan.host_ns, plan.gpu_ns) == (4, 90e3, 300e3)  # the longest recent launch decays by 10%
    plan = plan.after(host_ns=4 * 200e3, gpu_ns=4 * 250e3)  # a slow launch is remembered at once
    assert (plan.k, plan.host_ns, plan.gpu_ns) == (16, 200e3, 250e3)
    # ... but not the first burst's: a first call that sets a library up (112 ms on an H200, the GPU waiting
    # for it) would otherwise keep the bursts at one call behind a 0.2 s spin for dozens of bursts
    cold = _BurstPlan().after(host_ns=112e6, gpu_ns=112e6)
    assert (cold.k, cold.host_ns) == (1, 90e3)
    warm = cold.after(host_ns=15e3, gpu_ns=178e3)  # the second burst: 0.18 ms of work launched in 15 us
    assert warm.continuous and warm.k == 4 and warm.spin_ns < 0.2e6


def test_a_burst_preroll_of_untimed_calls_is_sized_from_the_call_and_its_launches_covered(monkeypatch):
    import toolkit.timing as timing
    from toolkit.timing import MAX_BURST, SPIN_PAD_NS, _BurstPlan, _preroll_calls

    assert timing.BURST_PREROLL_S == 0.005 and _preroll_calls(200e3) == 25  # 5 ms of 0.2 ms calls by default
    assert _preroll_calls(200e3, preroll_s=0.002) == 10  # 2 ms of 0.2 ms calls
    assert _preroll_calls(0.0, preroll_s=0.002) == 0  # the call's GPU time is unknown: no preroll yet
    assert _preroll_calls(3e3, preroll_s=0.002) == MAX_BURST  # a tiny kernel: capped
    assert _preroll_calls(100e3, host_ns=300e3) == 0  # launch-bound: its GPU idles between kernels anyway
    monkeypatch.setattr(timing, "BURST_PREROLL_S", 0.002)
    plan = _BurstPlan().after(host_ns=50e3, gpu_ns=200e3)  # the first call: 0.2 ms of work
    assert (plan.k, plan.preroll) == (4, 10)
    assert plan.spin_ns == 2 * 100e3 * 0.9 + SPIN_PAD_NS  # host-fast: twice one launch, preroll or not
    slow = _BurstPlan(k=4, host_ns=400e3, gpu_ns=200e3, preroll=10)  # launch-bound: the spin covers all 14 launches
    assert slow.spin_ns == pytest.approx(2 * 14 * 400e3 - 13 * 200e3 + SPIN_PAD_NS)
    # the host time of a burst is spread over its preroll and timed calls; the GPU time over the timed ones
    nxt = plan.after(host_ns=14 * 30e3, gpu_ns=4 * 200e3)
    assert nxt.host_ns == pytest.approx(0.9 * 90e3) and nxt.gpu_ns == 200e3
    fake = FakeBursts(ms=0.2)
    bursts, call = fake.bursts(), (lambda: None)
    for _ in range(1 + 4 + 16):
        bursts(call)
    # the 4-call burst opens with 10 untimed calls; the bursts queued behind it (continuous) need none
    assert fake.leads == [0, 10, 0, 0] and bursts.largest_preroll == 10


class FakeBursts:
    """hide_launch's burst runner on a scripted clock: every call takes ``ms`` on the GPU and ``host_ms`` to launch."""

    def __init__(self, ms=0.2, host_ms=0.02, spread=0.0):
        self.ms, self.host_ms, self.spread, self.now = ms, host_ms, spread, 0
        self.sizes: list[int] = []
        self.spins: list[float] = []
        self.owners: list = []
        self.leads: list[int] = []
        self.collected = 0

    def clock(self) -> int:
        return self.now

    def launch(self, call, k, spin_ns, preroll=0):
        from toolkit.timing import _Flight

        self.sizes.append(k)
        self.spins.append(spin_ns)
        self.owners.append(call)
        self.leads.append(preroll)
        call()
        samples = [self.ms * (1 + self.spread * (i % 2)) for i in range(k)]  # spread: every other call is slower
        return _Flight(k, preroll, (preroll + k) * self.host_ms * 1e6, (spin_ns, samples))

    def collect(self, flight):
        """The burst's time passes on the scripted clock when it is waited for."""
        spin_ns, samples = flight.handle
        self.collected += 1
        self.now += round(spin_ns + (flight.preroll * self.ms + sum(samples)) * 1e6)
        return samples, sum(samples) * 1e6

    def bursts(self):
        from toolkit.timing import _Bursts

        return _Bursts(self.launch, self.collect, self.clock)


def test_bursts_hand_out_k_samples_stamped_when_the_burst_completes():

    fake = FakeBursts()
    bursts = fake.bursts()
    a, b = (lambda: None), (lambda: None)
    got = [bursts(a) for _ in range(1 + 4 + 16)]
    # 0.2 ms of work launched in 0.02 ms: from the second burst on, the next burst is launched before this one
    # is read (the 50-call one is in flight behind the 16 handed out)
    assert fake.sizes == [1, 4, 16, 50] and all(ms == 0.2 for ms, _ in got)
    ends = [fake.now]
    # the clock moves only at a burst's last sample: the stopping rule and the GPU monitor act per burst
    assert [now for _, now in got[1:4]] == [got[0][1]] * 3 and got[4][1] > got[3][1]
    assert got[-1][1] == ends[0] and len({now for _, now in got[5:20]}) == 1
    # another call has its own plan, and a leftover sample of the first is dropped, not handed out later
    bursts(a)
    bursts(b)
    assert fake.sizes == [1, 4, 16, 50, 50, 1] and fake.owners[-1] is b  # a's second 50 is dropped, never read
    bursts(a)
    assert fake.sizes[-2:] == [50, 50] and bursts.largest == 50 and bursts.continued == 2
    assert fake.spins[-2] > 0 and fake.spins[-1] == 0  # after b, a's burst spins again; the one behind it does not
    bursts.finish()
    # every burst was waited for but a's dropped one (stream order keeps it out of b's events); finish() waited
    # for the last one, so the GPU is left idle
    assert fake.collected == len(fake.sizes) - 1 and bursts.ahead is None


def burst_sampler(fake: FakeBursts):
    """A _Sampler stand-in that samples in hide_launch's bursts through ``fake`` (no GPU needed)."""

    class Sampler:
        def __init__(self, device, clock, synchronizer, flush, hide_launch=False):
            self.flush, self.hide, self.method = None, True, "cuda_event"
            self.bursts = fake.bursts()

        def __call__(self, call):
            return self.bursts(call)

        def finish(self):
            self.bursts.finish()

    return Sampler


def burst_run(monkeypatch, fake: FakeBursts, schedule=None, preroll_s=0.0, **kw):
    """``measure_latency`` with ``fake``'s bursts; no preroll unless ``preroll_s`` (the scripted sizes assume none)."""
    import toolkit.timing as timing

    monkeypatch.setattr(timing, "_Sampler", burst_sampler(fake))
    monkeypatch.setattr(timing, "BURST_PREROLL_S", preroll_s)
    nvml = FakeNvml(fake.clock, schedule or (lambda t: gpu()))
    opts = dict(device="cpu", clock=fake.clock, synchronizer=lambda: None, detect_sync=False, threads=1,
                cpu_snapshot=FakeCpu(lambda: fake.now / 1e9), nvml=nvml, min_time_s=0.1, max_time_s=10.0)
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        return measure_latency(lambda: None, **opts)


def test_stopping_rule_with_bursts_stops_at_a_burst_end(monkeypatch):
    fake = FakeBursts(ms=0.2)
    r = burst_run(monkeypatch, fake)
    assert fake.sizes[:4] == [1, 4, 16, 50] and set(fake.sizes[3:]) == {50}
    # warm-up, then sampling until 0.1 s have passed: no sample read is lost, none is timed twice; the burst
    # launched behind the last one read is waited for and dropped when sampling stops
    assert r.warmup_count + r.n_samples == sum(fake.sizes[:-1]) and r.stop_reason == "ci"
    assert fake.collected == len(fake.sizes)
    assert r.n_samples * 0.2 >= 100 and r.options["burst_max_calls"] == 50 and r.options["hide_launch"]
    # the spin stays short for a call whose work outlasts its launch (covering all 50 launches twice: 2 ms);
    # from the third burst on each queues behind the one before, with no spin at all
    assert 0 < max(fake.spins[:2]) <= 0.22e6 and set(fake.spins[2:]) == {0.0}
    assert r.options["bursts_continued"] == len(fake.sizes) - 3


def test_throttled_polls_flag_whole_bursts(monkeypatch):
    # 0.2 ms calls in bursts of 50 (10 ms); the GPU is throttled from 60 to 75 ms of the scripted clock
    fake = FakeBursts(ms=0.2)
    r = burst_run(monkeypatch, fake, schedule=lambda t: gpu(sm=1200) if 60e6 <= t < 75e6 else gpu(),
                  max_samples=2000, min_samples=2000)
    assert r.n_throttled > 0 and r.n_throttled % 50 == 0  # whole bursts, read right after they ran
    assert r.n_samples + r.n_throttled == 2000


def test_max_time_and_max_samples_hold_with_bursts(monkeypatch):
    r = burst_run(monkeypatch, FakeBursts(ms=0.2, spread=0.5), max_samples=30, min_time_s=0.0, max_warmup=5,
                  warmup_window=1)
    assert r.n_samples == 30 and r.stop_reason == "max_samples"  # mid-burst: the rest of the burst is dropped
    fake = FakeBursts(ms=0.2, spread=0.5)
    r = burst_run(monkeypatch, fake, max_time_s=0.05, max_warmup=5, warmup_window=1)
    assert r.stop_reason == "time" and 0.05 <= fake.now / 1e9 < 0.05 + 0.02  # stops at the first burst end past it


def test_compare_with_bursts_keeps_each_side_s_samples_in_its_rounds(monkeypatch):
    import toolkit.timing as timing

    fake = FakeBursts(ms=0.2)
    monkeypatch.setattr(timing, "_Sampler", burst_sampler(fake))
    seen = []
    a, b = (lambda: seen.append("a")), (lambda: seen.append("b"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        c = timing.compare(a, b, device="cpu", clock=fake.clock, synchronizer=lambda: None, threads=1, nvml=False,
                           cpu_snapshot=FakeCpu(lambda: fake.now / 1e9), rounds=4, round_time_s=0.02,
                           min_round_calls=10)
    # each side ramps its own bursts (1, 4, 16, ...): the sides' plans do not mix
    assert len(seen) == len(fake.sizes)  # the fake runs each burst's call once: seen names each burst's side
    for side in "ab":
        assert [k for k, s in zip(fake.sizes, seen) if s == side][:4] == [1, 4, 16, 50]
    assert c.a.n_samples == sum(r[0] for r in c.round_sizes) and c.b.n_samples == sum(r[1] for r in c.round_sizes)
    assert all(x >= 10 for r in c.round_sizes for x in r) and c.a.options["burst_max_calls"] == 50


def test_graph_calls_fill_five_ms():
    from toolkit.timing import MAX_GRAPH_CALLS, _graph_calls

    assert _graph_calls(0.002) == MAX_GRAPH_CALLS == 1000  # a 2 us kernel: capped
    assert _graph_calls(0.18) == 28 and _graph_calls(5.0) == 1 and _graph_calls(20.0) == 1
    assert _graph_calls(0.0) == MAX_GRAPH_CALLS


@pytest.mark.gpu
def test_gpu_bursts_give_one_sample_per_call():
    from toolkit.timing import _Sampler

    a = torch.randn(1024, 1024, device="cuda")
    sampler = _Sampler("cuda", None, None, None, hide_launch=True)
    with torch.inference_mode():
        flight = sampler._launch(lambda: a @ a, 8, 200_000)
        behind = sampler._launch(lambda: a @ a, 8, 0.0)  # queued behind it, with its own event pairs
        samples, gpu_ns = sampler._collect(flight)
        later, _ = sampler._collect(behind)
    assert len(samples) == 8 and all(x > 0 for x in samples) and flight.host_ns > 0
    assert sum(samples) <= gpu_ns / 1e6 * 1.01  # the pairs lie inside the burst
    assert len(later) == 8 and all(x > 0 for x in later)


@pytest.mark.gpu
def test_gpu_compute_bound_bursts_run_back_to_back():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    r = measure_latency(torch.mm, a, a, max_time_s=1.0, hide_launch=True)
    assert r.options["bursts_continued"] > 0  # GPU-bound: bursts queued behind one another
    assert torch.cuda.current_stream().query()  # the burst launched behind the last one read was waited for


@pytest.mark.gpu
def test_gpu_hide_launch_bursts_with_and_without_flush():
    a = torch.randn(2048, 2048, device="cuda")
    for flush in (False, True):
        r = measure_latency(torch.mm, a, a, max_time_s=1.0, hide_launch=True, l2_flush=flush)
        assert r.options["hide_launch"] and r.options["burst_max_calls"] > 1
        assert r.n_samples + r.n_throttled >= 10 and r.min_ms > 0
    plain = measure_latency(torch.mm, a, a, max_time_s=1.0)
    assert 0.5 < r.median_ms / plain.median_ms < 1.5


@pytest.mark.gpu
def test_gpu_a_burst_preroll_runs_untimed_calls_before_the_timed_ones(monkeypatch):
    import toolkit.timing as timing

    a = torch.randn(2048, 2048, device="cuda")
    led = measure_latency(torch.mm, a, a, max_time_s=1.0, hide_launch=True, l2_flush=True)  # the default preroll
    monkeypatch.setattr(timing, "BURST_PREROLL_S", 0.0)
    plain = measure_latency(torch.mm, a, a, max_time_s=1.0, hide_launch=True, l2_flush=True)
    assert plain.options["burst_max_preroll_calls"] == 0 and led.options["burst_max_preroll_calls"] > 1
    assert 0.8 < led.median_ms / plain.median_ms < 1.25  # the same kernel, one sample per timed call


@pytest.mark.gpu
def test_gpu_cuda_graph_of_a_tiny_kernel_leaves_the_launch_out():
    x = torch.zeros(1, device="cuda")
    r = measure_latency(lambda: x + 1, max_time_s=1.0, cuda_graph=True)
    assert r.options["graph_calls"] > 100
    assert 0 < r.median_ms < 0.010  # a few us a call, not the replay's launch
    flushed = measure_latency(lambda: x + 1, max_time_s=1.0, cuda_graph=True, l2_flush=True)
    assert flushed.options["graph_calls"] == 1


# --- benchmarks/timer_agreement.py: which pair judges a workload (fabricated records, no GPU)


def test_agreement_is_judged_on_the_pair_that_measures_the_same_thing():
    ta = load_benchmark("timer_agreement")
    pair, diff, why = ta.judged_pair(cold_diff=-0.01, db_spread=0.006, graph_diff=0.05)
    assert (pair, diff) == ("cold_l2", -0.01) and "judged against do_bench (cold L2)" in why
    pair, diff, why = ta.judged_pair(cold_diff=-0.91, db_spread=0.21, graph_diff=0.004)
    assert (pair, diff) == ("cuda_graph", 0.004)
    assert why == "do_bench's rounds spread 21%: it times the host's launches here; judged against do_bench_cudagraph"
    pair, diff, why = ta.judged_pair(cold_diff=-0.91, db_spread=0.21, graph_diff=None, graph_missing="RuntimeError: x")
    assert pair is None and diff is None and "RuntimeError: x" in why
    assert ta.judged_pair(-0.01, None, 0.003)[0] == "cuda_graph"  # one round: do_bench's repeatability unknown


def fake_workload(ta, monkeypatch, ml_ms, db_ms, graph_ms, dbg_ms):
    """measure_workload on "cuda" with every timer faked: each returns the next of its scripted medians (ms)."""
    scripts = {"plain": [ml_ms[0]], "cold": list(ml_ms[1:]), "graph": list(graph_ms)}
    db, dbg = list(db_ms), list(dbg_ms)

    def measure(fn, **kw):
        kind = "graph" if kw.get("cuda_graph") else "cold" if kw.get("hide_launch") else "plain"
        ms = scripts[kind].pop(0)
        return LatencyResult(samples_ms=(ms,) * 20, label=kw.get("label"), device="cuda",
                             options={"hide_launch": bool(kw.get("hide_launch"))})

    monkeypatch.setattr(ta, "measure_latency", measure)
    monkeypatch.setattr(ta, "torch_timer", lambda fn, t: {"median_ms": ml_ms[0]})
    monkeypatch.setattr(ta, "triton_bench", lambda fn, rep: {"median_ms": db.pop(0)})
    monkeypatch.setattr(ta, "triton_graph_bench", lambda fn, rep: {"median_ms": dbg.pop(0), "return_mode": "median"})
    settings = {"measure_latency_max_time_s": 1.0, "rounds": 3, "torch_timer_min_run_time_s": 0.1,
                "do_bench_rep_ms": 100, "do_bench_cudagraph_rep_ms": 10}
    return ta.measure_workload("w", "a workload", lambda: None, "cuda", settings, None)


def test_both_pairs_are_recorded_and_the_verdict_follows_do_bench_s_repeatability(monkeypatch, capsys):
    ta = load_benchmark("timer_agreement")
    # compute-bound: do_bench repeats (0.5% spread), so the cold-L2 pair judges: -1.0%
    rec = fake_workload(ta, monkeypatch, ml_ms=[0.21, 0.198, 0.199, 0.1985], db_ms=[0.2, 0.201, 0.2],
                        graph_ms=[0.19, 0.19, 0.19], dbg_ms=[0.2, 0.2, 0.2])
    a = rec["agreement"]
    assert rec["measure_latency_l2_flush"]["round_medians_ms"] == [0.198, 0.199, 0.1985]
    assert rec["do_bench_cudagraph"]["median_of_rounds_ms"] == 0.2
    assert a["judged_pair"] == "cold_l2" and a["judged_difference"] == pytest.approx(0.1985 / 0.2 - 1)
    assert a["within_2pct"] and a["cuda_graph_vs_do_bench_cudagraph"] == pytest.approx(-0.05)
    assert a["rounds_within_1pct"]
    # launch-bound: do_bench's rounds spread 21%, so the graph pair judges
    launch = fake_workload(ta, monkeypatch, ml_ms=[10.8, 0.966, 0.965, 0.966], db_ms=[12.35, 10.17, 10.37],
                           graph_ms=[0.80, 0.801, 0.80], dbg_ms=[0.795, 0.797, 0.796])
    b = launch["agreement"]
    assert b["judged_pair"] == "cuda_graph" and b["within_2pct"] and not b["within_2pct_of_do_bench"]
    assert b["judged_reason"].startswith("do_bench's rounds spread 21%: it times the host's launches here")
    v = ta.verdict({"matmul": rec, "efficientnet@1": launch})
    assert v["all_within_2pct"] is True and v["not_within_2pct"] == [] and v["all_rounds_within_1pct"] is True
    assert v["judged"]["efficientnet@1"]["pair"] == "cuda_graph" and v["judged"]["matmul"]["pair"] == "cold_l2"
    # a graph whose rounds disagree by 2% fails the repeatability verdict
    shaky = fake_workload(ta, monkeypatch, ml_ms=[0.21, 0.198, 0.199, 0.1985], db_ms=[0.2, 0.201, 0.2],
                          graph_ms=[0.19, 0.194, 0.19], dbg_ms=[0.2, 0.2, 0.2])
    assert ta.verdict({"shaky": shaky})["rounds_not_within_1pct"] == ["shaky"]
    payload = {"workloads": {"matmul": rec, "efficientnet@1": launch}, "settings": {"rounds": 3},
               "pitfall_audit": {"model": "m", "rows": [], "warnings": []}}
    ta.print_summary(payload)
    out = capsys.readouterr().out
    assert "ML graph" in out and "DB graph" in out and "judged against do_bench_cudagraph" in out
    assert "every workload within 2% of its like-for-like reference: yes" in out
