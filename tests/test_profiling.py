"""Profiling: the verdict on synthetic event lists, trace parsing, the timeline, profile() on a tiny model, the CLI."""

import gzip
import json

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.profiling import (
    Event,
    ProfileResult,
    cpu_gpu_overlap,
    diagnose,
    events_from_trace,
    profile,
    time_split,
    timeline,
)

# ----------------------------------------------------------------------------- verdicts on synthetic events
# One 10 ms step unless said otherwise; times in ms.


def test_gpu_idle_list_is_host_bound():
    evs = [("step", 0, 10), ("kernel", 1, 2), ("kernel", 4, 5), ("kernel", 7, 8)]
    d = diagnose(evs)
    assert d.verdict == "host-bound"
    s = d.split
    assert s.window_ms == 10 and s.gpu_kernel_ms == 3 and s.gpu_idle_ms == 7
    assert s.gpu_busy_fraction == pytest.approx(0.3)
    assert "70%" in d.reason and any("CUDA graph" in r for r in d.remedies)


def test_busy_gpu_is_gpu_bound():
    d = diagnose([("step", 0, 10), ("kernel", 0.5, 5), ("kernel", 5, 9.5)])
    assert d.verdict == "gpu-bound"
    assert d.split.gpu_busy_fraction == pytest.approx(0.9)


def test_copies_dominating_is_copy_bound():
    evs = [("step", 0, 10), ("h2d", 0, 4), ("kernel", 4, 9), ("d2h", 9, 9.5)]
    d = diagnose(evs)
    assert d.verdict == "copy-bound"
    assert (d.split.h2d_ms, d.split.d2h_ms, d.split.copy_ms) == (4, 0.5, 4.5)
    assert any("pin" in r for r in d.remedies)


def test_idle_after_host_waits_is_sync_bound():
    # the host waits for each kernel (an .item()), then works while the GPU idles
    evs = [("step", 0, 10),
           ("kernel", 0, 2), ("sync", 0.5, 2.01, "cudaStreamSynchronize"),
           ("kernel", 6, 7), ("sync", 6.2, 7.0, "cudaStreamSynchronize")]
    s = time_split(evs)
    assert (s.sync_count, s.sync_ms) == (2, pytest.approx(1.51 + 0.8))
    assert s.gpu_idle_ms == pytest.approx(7) and s.sync_idle_ms == pytest.approx(7)
    d = diagnose(s)
    assert d.verdict == "sync-bound" and any(".item()" in r for r in d.remedies)


def test_a_sync_issued_after_the_gpu_ran_dry_does_not_make_it_sync_bound():
    # the GPU finished at 1 ms; the host only asked at 8 ms: the idle time is the host's own work
    evs = [("step", 0, 10), ("kernel", 0, 1), ("sync", 8, 8.01, "cudaDeviceSynchronize")]
    s = time_split(evs)
    assert s.sync_idle_ms == 0 and s.sync_count == 1
    assert diagnose(s).verdict == "host-bound"


def test_no_gpu_events_is_the_cpu_verdict():
    d = diagnose([Event("step", 0, 5, "ProfilerStep#3"), Event("cpu_op", 0.1, 4, "aten::conv2d")])
    assert d.verdict == "cpu" and not d.split.has_gpu
    assert d.split.gpu_busy_fraction == 0 and "no GPU" in d.reason


def test_concurrent_streams_count_once_as_busy_and_trailing_gpu_work_extends_the_window():
    s = time_split([("step", 0, 4), ("kernel", 1, 3), ("kernel", 2, 5)])  # 2 streams overlap; GPU ends after the step
    assert s.window_ms == 5 and s.gpu_busy_ms == 4 and s.gpu_kernel_ms == 5  # kernel time sums, busy is the union
    assert s.gpu_busy_fraction == pytest.approx(0.8)


def test_several_steps_sum():
    evs = [("step", 0, 2), ("kernel", 0, 1.5), ("step", 2, 4), ("kernel", 2, 3.5)]
    s = time_split(evs)
    assert (s.steps, s.window_ms, s.gpu_kernel_ms) == (2, 4, 3)
    assert diagnose(s).verdict == "gpu-bound"


def test_empty_event_list():
    s = time_split([])
    assert s.window_ms == 0 and s.gpu_busy_fraction == 0 and diagnose(s).verdict == "cpu"


# ----------------------------------------------------------------------------- chrome trace -> events

_TRACE = {"traceEvents": [
    {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "python"}},
    {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#3", "pid": 1, "tid": 7, "ts": 1000, "dur": 1000},
    {"ph": "X", "cat": "user_annotation", "name": "moe.gpu_experts[L1]", "pid": 1, "tid": 7, "ts": 1010, "dur": 100},
    {"ph": "X", "cat": "user_annotation", "name": "moe.cpu_experts[L1]", "pid": 1, "tid": 7, "ts": 1200, "dur": 400},
    {"ph": "X", "cat": "user_annotation", "name": "moe.cpu_experts[L1]", "pid": 1, "tid": 8, "ts": 1250, "dur": 300},
    {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 7, "ts": 1020, "dur": 50},
    {"ph": "X", "cat": "cpu_op", "name": "aten::t", "pid": 1, "tid": 7, "ts": 1025, "dur": 5},  # nested: dropped
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 7, "ts": 1030, "dur": 5,
     "args": {"correlation": 11}},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "pid": 1, "tid": 7, "ts": 1150, "dur": 5,
     "args": {"correlation": 12}},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "pid": 1, "tid": 7, "ts": 1160, "dur": 30,
     "args": {"correlation": 13}},
    {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7, "ts": 1040, "dur": 100,
     "args": {"correlation": 11}},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "pid": 0, "tid": 7, "ts": 1160,
     "dur": 20, "args": {"correlation": 12}},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "pid": 0, "tid": 7, "ts": 1650,
     "dur": 10, "args": {"correlation": 99}},
    {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "pid": 0, "tid": 7, "ts": 1700, "dur": 1},
    {"ph": "X", "cat": "gpu_user_annotation", "name": "moe.gpu_experts[L1]", "pid": 0, "tid": 7, "ts": 1040,
     "dur": 100},
    # our own end-of-step sync: left out
    {"ph": "X", "cat": "user_annotation", "name": "toolkit.profile.sync", "pid": 1, "tid": 7, "ts": 1900, "dur": 90},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "pid": 1, "tid": 7, "ts": 1905, "dur": 80},
]}


def test_events_from_trace_kinds_times_and_labels():
    evs = events_from_trace(_TRACE)
    by_kind = {}
    for e in evs:
        by_kind.setdefault(e.kind, []).append(e)
    assert [e.name for e in by_kind["step"]] == ["ProfilerStep#3"]
    assert by_kind["step"][0].start == 0 and by_kind["step"][0].end == 1.0  # ms from the first step
    (k,) = by_kind["kernel"]
    assert (k.name, k.start, k.end, k.label) == ("gemm", 0.04, 0.14, "moe.gpu_experts[L1]")
    assert by_kind["d2h"][0].label is None and by_kind["d2h"][0].ms == pytest.approx(0.02)
    assert by_kind["h2d"][0].label is None  # no launch recorded for it
    assert len(by_kind["memset"]) == 1
    (sync,) = by_kind["sync"]  # cudaDeviceSynchronize inside toolkit.profile.sync is ours
    assert sync.name == "cudaStreamSynchronize"
    assert [e.name for e in by_kind["cpu_op"]] == ["aten::mm"]  # top-level only
    labels = sorted((e.name, e.lane) for e in by_kind["label"])
    assert labels == [("moe.cpu_experts[L1]", 0), ("moe.cpu_experts[L1]", 1), ("moe.gpu_experts[L1]", 0)]
    assert {e.lane for e in evs if e.kind in ("kernel", "d2h", "h2d", "memset")} == {0}  # one stream
    s = time_split(evs)
    assert s.sync_count == 1 and s.gpu_kernel_ms == pytest.approx(0.1)


def test_load_trace_reads_gz_and_rejects_broken_files(tmp_path):
    from toolkit.profiling import load_trace

    with gzip.open(tmp_path / "t.json.gz", "wt") as f:
        json.dump(_TRACE, f)
    assert len(events_from_trace(load_trace(tmp_path / "t.json.gz"))) == len(events_from_trace(_TRACE))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ToolkitError, match="not a valid Chrome trace"):
        load_trace(tmp_path / "bad.json")
    with pytest.raises(ToolkitError, match="not found"):
        load_trace(tmp_path / "missing.json")


def test_timeline_rows_for_the_gantt_plot():
    tl = timeline(events_from_trace(_TRACE))
    assert list(tl.columns) == ["row", "name", "start_ms", "end_ms", "layer", "kind", "step", "lane"]
    assert set(tl["row"]) == {"CPU", "GPU"}
    gpu = tl[tl.row == "GPU"]
    gemm = gpu[gpu.kind == "kernel"].iloc[0]
    assert (gemm["name"], gemm["layer"]) == ("moe.gpu_experts", 1)  # named after the range that launched it
    cpu = tl[tl.row == "CPU"]
    assert {"moe.cpu_experts", "moe.gpu_experts", "cudaStreamSynchronize"} <= set(cpu["name"])
    assert "aten::mm" not in set(cpu["name"])  # with labels, the CPU row shows the labels, not every op
    assert (tl["end_ms"] >= tl["start_ms"]).all() and (tl["step"] == 0).all()


def test_timeline_without_labels_shows_top_level_ops():
    tl = timeline([("step", 0, 2), ("cpu_op", 0.1, 1, "aten::conv2d"), ("kernel", 0.5, 1.5, "conv_kernel")])
    assert list(tl["row"]) == ["CPU", "GPU"] and list(tl["name"]) == ["aten::conv2d", "conv_kernel"]


def test_cpu_experts_overlap_per_layer():
    evs = [("step", 0, 10),
           ("label", 1, 5, "moe.cpu_experts[L0]"), ("kernel", 0, 3, "gemm", "moe.gpu_experts[L0]"),
           ("label", 6, 8, "moe.cpu_experts[L1]")]  # layer 1: the GPU had nothing to do
    ov = cpu_gpu_overlap(evs)
    assert list(ov["layer"]) == [0, 1]
    assert list(ov["moe.cpu_experts_ms"]) == [4, 2]
    assert list(ov["gpu_busy_during_ms"]) == [2, 0]
    assert list(ov["overlap_fraction"]) == [0.5, 0]


# ----------------------------------------------------------------------------- profile() on a tiny model (CPU)


@pytest.fixture(scope="module")
def tiny():
    from toolkit.models import build_model

    bench = build_model("tiny-resnet")
    return bench, bench.make_input(2)


def test_profile_tiny_model_table_split_and_trace(tiny, tmp_path):
    bench, x = tiny
    path = tmp_path / "sub" / "trace.json"
    r = profile(bench, *x, wait=1, warmup=1, active=2, record_shapes=True, trace_path=path, baseline=0.5,
                label="tiny")
    assert r.device == "cpu" and r.verdict == "cpu" and r.split.steps == 2 and len(r.step_ms) == 2
    assert {"name", "calls", "self_cpu_ms", "cpu_total_ms", "self_cuda_ms", "cuda_total_ms", "shapes"} <= set(r.ops)
    conv = r.ops[r.ops.name == "aten::conv2d"]
    assert len(conv) and conv["calls"].sum() > 0 and (conv["self_cpu_ms"] >= 0).all()
    assert not r.ops.name.str.startswith("ProfilerStep").any()
    assert r.top_ops(3)["self_cpu_ms"].is_monotonic_decreasing
    trace = json.loads(path.read_text())  # valid JSON, Perfetto-readable structure
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"])
    assert r.trace_path == str(path)
    assert r.overhead == pytest.approx(r.profiled_step_ms / 0.5 - 1)
    assert any("not latencies" in w for w in r.warnings) and any("slower" in w for w in r.warnings)
    d = r.to_dict(events=True)
    for key in ("verdict", "gpu_busy_fraction", "top_ops", "copy_ms", "sync_count", "reason", "remedies"):
        assert key in d
    json.dumps(d)  # JSON-ready
    back = ProfileResult.from_dict(json.loads(json.dumps(d)))
    assert back.verdict == r.verdict and back.split == r.split and len(back.timeline()) == len(r.timeline())
    assert "cpu" in repr(r) and "top operators" in r.summary()


def test_profile_labels_gz_trace_and_tensorboard(tmp_path):
    lin = torch.nn.Linear(16, 16)

    def fn(x):
        with torch.profiler.record_function("moe.cpu_experts[L2]"):
            return lin(x)

    r = profile(fn, torch.randn(4, 16), device="cpu", warmup=1, active=2, trace_path=tmp_path / "t.json.gz",
                tensorboard_dir=tmp_path / "tb", baseline=False)
    with gzip.open(tmp_path / "t.json.gz", "rt") as f:
        assert "traceEvents" in json.load(f)
    assert any(p.is_file() for p in (tmp_path / "tb").rglob("*"))
    tl = r.timeline()
    labels = tl[(tl.row == "CPU") & (tl.kind == "label")]
    assert list(labels["name"].unique()) == ["moe.cpu_experts"] and set(labels["layer"]) == {2}
    assert sorted(labels["step"]) == [0, 1]
    assert r.latency_ms is None and r.overhead is None
    assert list(r.overlap()["layer"]) == [2]


def test_profile_records_worker_threads():
    # the MoE engine runs CPU experts in a worker thread; the profile must see them
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: None).result()  # the thread exists before profiling starts, as in the engine
    a = torch.randn(32, 32)

    def job():
        with torch.profiler.record_function("moe.cpu_experts[L0]"):
            return a @ a

    def fn():
        with torch.profiler.record_function("moe.route[L0]"):
            future = pool.submit(job)
        return future.result()

    r = profile(fn, device="cpu", warmup=1, active=2, baseline=False)
    pool.shutdown()
    if any("only the calling thread" in w for w in r.warnings):
        pytest.skip("this torch cannot profile other threads")
    tl = r.timeline()
    lanes = dict(zip(tl["name"], tl["lane"]))
    assert lanes == {"moe.route": 0, "moe.cpu_experts": 1}
    assert r.overlap()["moe.cpu_experts_ms"].iloc[0] > 0


def test_profile_memory_and_shapes():
    r = profile(lambda x: torch.relu(x @ x), torch.randn(64, 64), device="cpu", warmup=1, active=1,
                profile_memory=True, record_shapes=True, baseline=False)
    mm = r.ops[r.ops.name == "aten::mm"].iloc[0]
    assert mm["self_cpu_memory_bytes"] >= 64 * 64 * 4 and mm["shapes"] == "[[64, 64], [64, 64]]"
    assert any("only the calling thread" in w for w in r.warnings)


def test_profile_baseline_uses_measure_latency():
    x = torch.ones(8)
    r = profile(lambda t: t + 1, x, device="cpu", warmup=1, active=1, baseline=True, baseline_s=0.5)
    assert r.latency_ms is not None and r.latency_ms > 0 and r.overhead is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(active=0), "active must be an integer >= 1"),
    (dict(wait=-1), "wait must be an integer >= 0"),
    (dict(warmup=1.5), "warmup must be an integer"),
    (dict(device="tpu"), "unknown device"),
])
def test_bad_arguments_give_a_clear_error(kwargs, match):
    with pytest.raises(ToolkitError, match=match):
        profile(lambda: None, baseline=False, **kwargs)


def test_not_callable_and_directory_trace_path(tmp_path):
    with pytest.raises(ToolkitError, match="needs a callable"):
        profile(42, baseline=False)
    with pytest.raises(ToolkitError, match="is a directory"):
        profile(lambda: None, trace_path=tmp_path, baseline=False)


# ----------------------------------------------------------------------------- CLI


def test_cli_json_prints_the_keys(capsys):
    from toolkit.__main__ import main

    assert main(["profile", "--model", "tiny-resnet", "--device", "cpu", "--json", "--no-baseline",
                 "--warmup", "1", "--active", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("verdict", "gpu_busy_fraction", "top_ops", "copy_ms", "sync_count"):
        assert key in d
    assert d["verdict"] == "cpu" and d["top_ops"] and d["label"] == "tiny-resnet batch 1"


def test_cli_text_report(capsys, tmp_path):
    from toolkit.__main__ import main

    assert main(["profile", "--model", "tiny-resnet", "--device", "cpu", "--no-baseline", "--host-input",
                 "--warmup", "0", "--active", "1", "--trace", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "verdict: cpu" in out and "top operators" in out and "warmup=0" in out
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


def test_cli_moe_decode_step_on_cpu(capsys):
    from toolkit.__main__ import main

    assert main(["profile", "--moe", "--preset", "tiny-mixtral", "--layers", "1", "--gpu-experts", "2",
                 "--device", "cpu", "--json", "--no-baseline", "--warmup", "1", "--active", "1", "--top", "500"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["verdict"] == "cpu" and "overlap" in d and "decode step" in d["label"]
    names = {op["name"] for op in d["top_ops"]}
    assert {"moe.route[L0]", "attention[L0]"} <= names  # the engine's phase labels are in the profile


@pytest.mark.parametrize("argv, match", [
    (["--model", "no-such-model", "--device", "cpu"], "unknown model"),
    (["--moe", "--device", "cpu"], "--moe needs --gpu-experts"),
    (["--model", "tiny-resnet", "--gpu-experts", "2", "--device", "cpu"], "only with --moe"),
])
def test_cli_user_errors_are_one_line_exit_2(capsys, argv, match):
    from toolkit.__main__ import main

    assert main(["profile", *argv, "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("error:") and err.count("\n") == 1


# ----------------------------------------------------------------------------- GPU (device machine)


@pytest.mark.gpu
def test_gpu_split_sees_kernels_copies_and_syncs():
    w = torch.randn(1024, 1024, device="cuda")
    x_host = torch.randn(256, 1024)

    def fn(x):
        y = x.to("cuda") @ w  # H2D + kernel
        return y.sum().item()  # D2H + a sync

    r = profile(fn, x_host, device="cuda", baseline=False)
    s = r.split
    assert s.has_gpu and s.gpu_kernel_ms > 0 and s.h2d_ms > 0 and s.d2h_ms > 0
    assert s.sync_count >= r.split.steps  # the .item() per step; our own end-of-step sync is not counted
    assert 0 < s.gpu_busy_fraction <= 1 and r.ops["self_cuda_ms"].sum() > 0
    assert set(r.timeline()["row"]) == {"CPU", "GPU"}


@pytest.mark.gpu
def test_gpu_plain_model_has_no_user_syncs():
    m = torch.nn.Linear(512, 512).cuda()
    r = profile(m, torch.randn(64, 512, device="cuda"), baseline=False)
    assert r.device.startswith("cuda") and r.split.sync_count == 0 and r.verdict != "cpu"


def test_profile_progress_hook_stays_out_of_the_recorded_steps():
    calls, seen = [], []
    lin = torch.nn.Linear(8, 8)

    def fn(x):
        calls.append(1)
        return lin(x)

    r = profile(fn, torch.randn(2, 8), device="cpu", wait=1, warmup=2, active=3, baseline=1e9,
                on_progress=lambda stage, done, total: seen.append((stage, done, total, len(calls))))
    # before each skipped or warm-up step, then once after the last recorded step; never among those
    assert seen == [("step", 0, 6, 0), ("step", 1, 6, 1), ("step", 2, 6, 2), ("done", 6, 6, 6)]
    assert r.overhead < 0 and "within noise" in r.summary()  # a profiled step faster than the baseline is noise
    assert not any("slower" in w for w in r.warnings)
