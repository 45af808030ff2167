"""The pitfall audit: table shape, honest NaNs on CPU, exact relative errors."""

import math

import pytest
import torch

import toolkit.pitfalls as pitfalls_module
from toolkit.models import build_model
from toolkit.pitfalls import (
    CPU_NA,
    GPU_ONLY,
    PITFALLS,
    audit,
    single_sample_error,
    time_copy_in_timed_region,
    time_host_clock_no_sync,
    time_no_warmup,
)
from toolkit.timing import LatencyResult

pytestmark = pytest.mark.filterwarnings("ignore::toolkit.timing.LatencyWarning")


@pytest.fixture(scope="module")
def cpu_audit():
    m = build_model("tiny-gpt2")
    return audit(m, m.make_input(1), "cpu", max_time_s=0.2, n=5, threads=1)


def test_table_columns_and_rows(cpu_audit):
    df = cpu_audit
    assert list(df.columns) == ["pitfall", "naive_ms", "correct_ms", "relative_error", "note", "reliable"]
    assert tuple(df.pitfall) == PITFALLS
    assert {"copy_in_timed_region", "no_warmup", "host_clock_no_sync", "single_sample"} <= set(PITFALLS)
    assert isinstance(df.attrs["correct"], LatencyResult) and df.attrs["device"] == "cpu"


def test_gpu_only_pitfalls_are_not_faked_on_cpu(cpu_audit):
    df = cpu_audit.set_index("pitfall")
    for name in GPU_ONLY:
        assert math.isnan(df.loc[name, "naive_ms"]) and math.isnan(df.loc[name, "correct_ms"])
        assert math.isnan(df.loc[name, "relative_error"]) and df.loc[name, "note"] == CPU_NA


def test_cpu_pitfalls_have_real_values(cpu_audit):
    df = cpu_audit.set_index("pitfall")
    correct = cpu_audit.attrs["correct"]
    for name in ["no_warmup", "single_sample"]:
        naive, right = df.loc[name, "naive_ms"], df.loc[name, "correct_ms"]
        assert naive > 0 and right == correct.median_ms
        assert df.loc[name, "relative_error"] == pytest.approx((naive - right) / right)
    assert df.loc["single_sample", "naive_ms"] in correct.samples_ms
    assert "first 5 calls" in df.loc["no_warmup", "note"]


def test_single_sample_error_picks_the_farthest_shot():
    r = LatencyResult(samples_ms=(10.0, 10.5, 9.0, 10.2, 14.0))
    assert single_sample_error(r) == (14.0, 10.2)
    r = LatencyResult(samples_ms=(10.0, 10.1, 4.0, 10.2, 10.3))
    assert single_sample_error(r) == (4.0, 10.1)


def test_naive_timers_run_on_cpu():
    def model(x):
        return x @ x

    x = torch.randn(16, 16)
    assert len(time_no_warmup(model, (x,), "cpu", n=3)) == 3
    assert len(time_copy_in_timed_region(model, (x,), "cpu", n=4)) == 4
    times = time_host_clock_no_sync(model, (x,), "cpu", n=5)
    assert len(times) == 5 and all(t > 0 for t in times)


def test_audit_restores_global_state():
    before = (torch.backends.cudnn.benchmark, torch.get_num_threads())
    m = build_model("tiny-gpt2")
    audit(m, m.make_input(1)[0], "cpu", max_time_s=0.1, n=3, threads=1)  # a bare tensor input is fine too
    assert (torch.backends.cudnn.benchmark, torch.get_num_threads()) == before


@pytest.mark.gpu
def test_audit_on_gpu():
    m = build_model("tiny-resnet", device="cuda")
    df = audit(m, m.make_input(8), "cuda", max_time_s=1.0).set_index("pitfall")
    assert df.naive_ms.notna().all() and df.correct_ms.notna().all()
    assert df.loc["copy_in_timed_region", "naive_ms"] > 0


def _contended(samples):
    """A LatencyResult measured while other work kept 1.8 of 2 cores busy (as on a shared CI machine)."""
    state = {"wall_s": 2.0, "cpus": 2, "load_1m": 3.6, "others_busy_cores": 1.8, "process_cores": 1.0,
             "thread_share": 0.45}
    return LatencyResult(samples_ms=tuple(samples), options={"threads": 1}, cpu_state=state, label="correct")


def test_an_unreliable_correct_measurement_flags_the_audit(monkeypatch):
    seen = {}

    def fake_measure(model, *inputs, threads=None, **kw):
        seen["threads"] = threads
        return _contended([2422.0, 80.0, 5000.0, 300.0, 2500.0] * 4)

    monkeypatch.setattr(pitfalls_module, "measure_latency", fake_measure)
    monkeypatch.setattr(pitfalls_module, "auto_threads", lambda: 1)
    before = torch.get_num_threads()
    df = audit(lambda x: x + 1, torch.ones(3), "cpu", n=3)
    assert seen["threads"] == 1 and df.attrs["threads"] == 1 and torch.get_num_threads() == before
    assert not df.set_index("pitfall").loc["no_warmup", "reliable"]
    assert df.loc[df.pitfall == "no_warmup", "relative_error"].iloc[0] < 0  # the absurd negative error ...
    head = df.attrs["warnings"][0]  # ... is announced as untrustworthy, not presented as a finding
    assert head.startswith("the correct measurement is unreliable (other work is using the CPU")
    assert "not trustworthy" in head
    assert any(w.startswith("correct timer: the timing thread ran only 45%") for w in df.attrs["warnings"])


def test_reliable_column_follows_the_correct_measurement(cpu_audit):
    correct = cpu_audit.attrs["correct"]
    assert cpu_audit.reliable.all() == (not correct.unreliable)  # this machine may be busy: either is right
    flagged = [w for w in cpu_audit.attrs["warnings"] if "measurement is unreliable" in w]
    assert bool(flagged) == bool(correct.unreliable)


def test_cli_prints_the_warnings_next_to_the_numbers(monkeypatch, capsys):
    import pandas as pd

    from toolkit.__main__ import main

    def fake_audit(model, inputs, device, **kw):
        frame = pd.DataFrame([dict(pitfall="no_warmup", naive_ms=30.0, correct_ms=2422.0, relative_error=-0.99,
                                   note="", reliable=False)])
        correct = _contended([2422.0, 80.0, 5000.0] * 4)
        frame.attrs.update(correct=correct, threads=2, warnings=pitfalls_module.audit_warnings(correct))
        return frame

    monkeypatch.setattr(pitfalls_module, "audit", fake_audit)
    assert main(["pitfalls", "--model", "tiny-resnet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "correct median 2422 ms" in out[0] and "UNRELIABLE" in out[0]
    assert out[1].startswith("WARNING: the correct measurement is unreliable (other work is using the CPU")
    assert any(line.startswith("WARNING: correct timer:") for line in out)
