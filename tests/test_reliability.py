"""Reliability as a new user and an adversarial tester see it: bad inputs, failed writes, Ctrl-C.

Every bad input is one line on stderr and exit code 2 (CLI) or a ToolkitError naming the argument
(API), raised before any long work; a finished measurement is printed, then saved atomically, and
kept on Ctrl-C; Ctrl-C anywhere exits 130 with one line.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import weakref

import numpy as np
import pytest
import torch

from toolkit.__main__ import main
from toolkit.errors import ToolkitError

UNWRITABLE = "/sys/toolkit-no-such-folder"  # not writable, not even by root (as tests run here)


def cli(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err: str, *words: str) -> None:
    """``err`` ends with exactly one error line naming ``words`` (progress notes may come before it)."""
    lines = err.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith(("error:", "python -m toolkit"))]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, err)


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a-file.txt"
    f.write_text("not a folder")
    return f


# ---------------------------------------------------------------- failed writes, checked before the run

CPU_MOE = ("moe", "--device", "cpu", "--new-tokens", "2", "--prompt-tokens", "4", "--warmup", "0")
OUT_CASES = [
    ("moe json, unwritable folder", (*CPU_MOE, "--json", "--out", f"{UNWRITABLE}/r.json"), "--out"),
    ("moe, under a file", (*CPU_MOE, "--out", "{file}/r.json"), "is a file"),
    ("moe, a folder", (*CPU_MOE, "--out", "{tmp}"), "is a folder"),
    ("throughput", ("throughput", "--model", "tiny-resnet", "--device", "cpu", "--out", f"{UNWRITABLE}/t.json"),
     "--out"),
    ("throughput, under a file", ("throughput", "--model", "tiny-resnet", "--device", "cpu", "--out",
                                  "{file}/t.json"), "is a file"),
    ("profile trace", ("profile", "--model", "tiny-resnet", "--device", "cpu", "--trace", f"{UNWRITABLE}/p.json"),
     "--trace"),
    ("profile tensorboard", ("profile", "--model", "tiny-resnet", "--device", "cpu", "--tensorboard", "{file}"),
     "--tensorboard"),
    ("report, a file", ("report", "--quick", "--out", "{file}"), "is a file"),
    ("report, unwritable", ("report", "--quick", "--out", UNWRITABLE), "--out"),
    ("calibrate", ("calibrate", "--preset", "tiny-mixtral", "--device", "cpu", "--out", f"{UNWRITABLE}/c.json"),
     "--out"),
]


@pytest.mark.parametrize("argv, word", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_unwritable_output_is_refused_before_the_run(capsys, tmp_path, a_file, argv, word):
    argv = [a.format(file=a_file, tmp=tmp_path) for a in argv]
    t0 = time.perf_counter()
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and out == ""
    one_error_line(err, word)
    assert time.perf_counter() - t0 < 10  # refused up front: nothing was built or measured


def test_calibration_cache_under_a_read_only_home_falls_back_with_a_warning(monkeypatch):
    from toolkit.moe.costs import cache_path

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", UNWRITABLE)
    with pytest.warns(UserWarning, match="calibration cache"):
        path = cache_path()
    assert not str(path).startswith(UNWRITABLE) and os.access(path.parent.parent, os.W_OK)


def test_default_moe_run_under_a_read_only_cache_still_runs(capsys, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", UNWRITABLE)
    rc, out, err = cli(capsys, *CPU_MOE, "--json")
    assert rc == 0, err
    assert json.loads(out)["new_tokens"] == 2
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings and "calibration" in warnings[0] and "Traceback" not in err


def test_atomic_write_keeps_the_old_file_on_interrupt_and_failure(tmp_path):
    from toolkit.results import atomic_write, check_writable, save_json

    path = tmp_path / "r.json"
    save_json({"a": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write('{"a": 2, "half')
            raise KeyboardInterrupt
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left behind
    with pytest.raises(ToolkitError, match="cannot write"):
        save_json({"a": 3}, tmp_path)  # a folder
    with pytest.raises(ToolkitError, match="output"):
        check_writable(f"{UNWRITABLE}/x.json")
    assert check_writable(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"


def test_figures_and_summary_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from toolkit import plots

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    paths = plots.save(fig, tmp_path / "fig")
    assert [p.name for p in paths] == ["fig.pdf", "fig.png"] and all(p.stat().st_size > 0 for p in paths)
    before = (tmp_path / "fig.png").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plots.save(fig, tmp_path / "fig")
    assert (tmp_path / "fig.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]
    plt.close(fig)


# ---------------------------------------------------------------- bad inputs: one line, exit 2, before long work

BAD_CLI = [
    ("max-memory infinite", ("throughput", "--max-memory", "1e999"), "--max-memory"),
    ("max-time nan, throughput", ("throughput", "--model", "tiny-resnet", "--max-time", "nan"), "max-time"),
    ("latency batch too large", ("latency", "--model", "tiny-resnet", "--device", "cpu", "--batch-size",
                                 "100000000000"), "batch_size"),
    ("latency max-time nan", ("latency", "--model", "tiny-resnet", "--max-time", "nan"), "max"),
    ("latency target-ci -1", ("latency", "--model", "tiny-resnet", "--target-ci", "-1"), "target"),
    ("latency target-ci nan", ("latency", "--model", "tiny-resnet", "--target-ci", "nan"), "target"),
    ("moe temperature nan", (*CPU_MOE, "--sample", "--temperature", "nan"), "temperature"),
    ("moe temperature inf", (*CPU_MOE, "--sample", "--temperature", "inf"), "temperature"),
    ("moe seed beyond 64 bits", (*CPU_MOE, "--seed", str(2**70)), "seed"),
    ("moe layers beyond memory", ("moe", "--device", "cpu", "--layers", "1000000000"), "host memory"),
    ("report only comma", ("report", "--only", ","), "--only"),
    ("simulate budget beyond the trace", ("simulate", "--gpu-experts", "100000"), "GPU expert budget"),
]


@pytest.mark.parametrize("argv, word", [c[1:] for c in BAD_CLI], ids=[c[0] for c in BAD_CLI])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, word):
    t0 = time.perf_counter()
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and out == ""
    one_error_line(err, word)
    assert time.perf_counter() - t0 < 20


def _write_cost_file(path, entry):
    path.write_text(json.dumps({"version": 1, "models": {"k": entry}}))
    return path


def _good_entry():
    from toolkit.moe.costs import CostModel

    return CostModel.fixed(hidden=64, intermediate=128).to_dict()


CALIBRATION_CASES = [
    ("list entry", lambda e: [1, 2, 3], "calibration entry"),
    ("string token counts", lambda e: {**e, "cpu_tokens": "1,8"}, "cpu_tokens"),
    ("negative cost", lambda e: {**e, "copy_ms": -3.0}, "copy_ms"),
    ("nan cost", lambda e: {**e, "cpu_ms": [float("nan"), 1.0]}, "cpu_ms"),
    ("unsorted tokens", lambda e: {**e, "gpu_tokens": [1024, 1]}, "gpu_tokens"),
]


@pytest.mark.parametrize("change, word", [c[1:] for c in CALIBRATION_CASES], ids=[c[0] for c in CALIBRATION_CASES])
def test_bad_calibration_file_is_rejected(tmp_path, capsys, change, word):
    from toolkit.moe.costs import load_cost_model

    path = _write_cost_file(tmp_path / "costs.json", change(_good_entry()))
    with pytest.raises(ToolkitError, match=word):
        load_cost_model(path)
    rc, out, err = cli(capsys, *CPU_MOE, "--calibration", path)
    assert rc == 2
    one_error_line(err, word)


def test_calibration_folder_is_rejected(tmp_path, capsys):
    from toolkit.moe.costs import load_cost_model

    with pytest.raises(ToolkitError, match="folder"):
        load_cost_model(tmp_path)
    rc, _, err = cli(capsys, *CPU_MOE, "--calibration", tmp_path)
    assert rc == 2
    one_error_line(err, "folder")


def _trace_fields(**change):
    n, layers, k = 4, 2, 2
    experts = np.tile(np.array([0, 1]), (n, layers, 1))
    fields = dict(experts=experts, weights=np.full((n, layers, k), 0.5), step=np.arange(n), phase=np.ones(n),
                  meta={"n_experts": 4})
    fields.update(change)
    return fields


TRACE_CASES = [
    ("expert id beyond int16", dict(experts=np.tile(np.array([0, 40000]), (4, 2, 1)), meta={"n_experts": 40001}),
     "int16"),
    ("top_k 0", dict(experts=np.zeros((4, 2, 0), dtype=int), weights=np.zeros((4, 2, 0))), "top_k"),
    ("n_experts a string", dict(meta={"n_experts": "eight"}), "n_experts"),
    ("weights strings", dict(weights=np.full((4, 2, 2), "heavy")), "weights"),
    ("phase strings", dict(phase=np.array(["decode"] * 4)), "phase"),
    ("negative phase", dict(phase=-np.ones(4)), "phase"),
]


@pytest.mark.parametrize("change, word", [c[1:] for c in TRACE_CASES], ids=[c[0] for c in TRACE_CASES])
def test_bad_trace_is_rejected(tmp_path, capsys, change, word):
    from toolkit.moe.traces import FORMAT, VERSION, Trace

    fields = _trace_fields(**change)
    with pytest.raises(ToolkitError, match=word):
        Trace(**fields)
    # the same content in a trace file: the CLI says it in one line
    ex = np.asarray(fields["experts"])
    header = {"format": FORMAT, "version": VERSION, "n_tokens": ex.shape[0], "n_layers": ex.shape[1],
              "top_k": ex.shape[2], **fields["meta"]}
    path = tmp_path / "bad.npz"
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), experts=ex,
             weights=fields["weights"], step=fields["step"], phase=fields["phase"])
    rc, _, err = cli(capsys, "simulate", "--trace", path)
    assert rc == 2
    one_error_line(err, word)


def test_host_memory_is_planned_before_building():
    from toolkit.moe.memory import check_host_memory, host_memory_needed
    from toolkit.moe.presets import build_moe, from_name

    model = build_moe("tiny-olmoe", layers=3)
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    assert host_memory_needed(from_name("tiny-olmoe", 3))["host"] == built  # counted exactly, without building
    cuda = host_memory_needed("mixtral-8x7b", device="cuda")
    assert cuda["host"] == cuda["experts"] == 32 * 8 * 3 * 4096 * 14336 * 2 and cuda["gpu"] == cuda["dense"]
    with pytest.raises(ToolkitError, match=r"needs 22\.1 GiB of host memory .* but 20\.0 GiB is available"):
        check_host_memory(from_name("mixtral-8x7b", 8), available=20 * 2**30)
    t0 = time.perf_counter()
    with pytest.raises(ToolkitError, match="layers"):
        check_host_memory(from_name("tiny-mixtral", 10**9))
    assert time.perf_counter() - t0 < 2


def _tiny_moe():
    from toolkit.moe.presets import build_moe

    return build_moe("tiny-mixtral")


@pytest.fixture(scope="module")
def fixed_costs():
    from toolkit.moe.costs import CostModel

    return CostModel.fixed(hidden=64, intermediate=128)


API_CASES = [
    ("fractional gpu_experts", dict(gpu_experts=2.9), "gpu_experts"),
    ("gpu_experts word", dict(gpu_experts="most"), "gpu_experts"),
    ("nan popularity", dict(gpu_experts=4, placement=np.full((2, 8), np.nan)), "placement"),
]


@pytest.mark.parametrize("kw, word", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_offload_rejects_bad_arguments(fixed_costs, kw, word):
    from toolkit.moe.offload import offload

    with pytest.raises(ToolkitError, match=word):
        offload(_tiny_moe(), device="cpu", cost_model=fixed_costs, **kw)


def test_offload_accepts_all_and_a_restored_engine_does_not_generate(fixed_costs):
    from toolkit.moe.generation import generate
    from toolkit.moe.offload import offload

    model = _tiny_moe()
    engine = offload(model, "all", device="cpu", cost_model=fixed_costs)
    assert engine.gpu_experts == 16 and int(engine.placement.sum()) == 16
    engine.restore()
    with pytest.raises(ToolkitError, match="restored"):
        generate(engine, torch.ones(1, 3, dtype=torch.long), max_new_tokens=1)
    assert offload(model, 2.0, device="cpu", cost_model=fixed_costs).gpu_experts == 2  # a whole float is fine


def test_measure_latency_of_a_non_callable_names_it():
    from toolkit.timing import measure_latency

    with pytest.raises(ToolkitError, match="fn must be a callable"):
        measure_latency(42)


# ---------------------------------------------------------------- the batch boundary: a range, found by bisection


def test_unreliable_boundary_steps_down_by_bisection_and_reports_a_range():
    from toolkit.throughput import search_batch_size
    from toolkit.trials import Probe

    tries: dict[int, int] = {}

    def trial(b):  # 9558 always fits; up to 9580 fits the first time only (allocator state varies)
        tries[b] = tries.get(b, 0) + 1
        return Probe(batch_size=b, fits=b <= 9558 or (b <= 9580 and tries[b] == 1))

    r = search_batch_size(trial, min_batch=9000, verify=2)
    assert r.max_batch_size == 9558 and r.boundary == (9558, 9580) and r.verified is False
    assert r.count("check") <= 20


# ---------------------------------------------------------------- Ctrl-C


def test_interrupt_in_a_command_is_one_line_and_130(capsys, monkeypatch):
    import toolkit.moe.simulate as sim

    def numba_interrupted(*a, **k):  # what a compiled kernel returns when Ctrl-C arrives inside it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("CPUDispatcher(<function lru_kernel>) returned a result with an exception set") from e

    monkeypatch.setitem(sim.KERNELS, sim.LRU_KIND, numba_interrupted)
    rc, out, err = cli(capsys, "simulate", "--policy", "lru")
    assert rc == 130 and err == "interrupted\n"


def test_interrupt_swallowed_by_a_weakref_callback_still_stops_the_command(capsys, monkeypatch):
    import toolkit.cli.simulate as cmd

    class Thing:
        pass

    def run(args):
        thing = Thing()
        weakref.finalize(thing, lambda: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C inside the callback
        del thing  # "Exception ignored in: <finalize ...>", the interrupt lost
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            pass
        return 0

    monkeypatch.setattr(cmd, "run", run)
    t0 = time.monotonic()
    rc, _, err = cli(capsys, "simulate")
    assert rc == 130 and err.endswith("interrupted\n") and time.monotonic() - t0 < 1.5


def test_report_stops_on_an_interrupt_inside_an_experiment(tmp_path, monkeypatch):
    import toolkit.report as report

    def experiment(settings, device, **kw):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("returned a result with an exception set") from e

    monkeypatch.setitem(report.EXPERIMENTS, "simulation", experiment)
    with pytest.raises(KeyboardInterrupt):
        report.run_report(tmp_path, device="cpu", experiments=["simulation"], progress=False)
    assert (tmp_path / "summary.md").exists() and not (tmp_path / "simulation.error.txt").exists()


def test_throughput_keeps_what_it_measured_on_interrupt(tmp_path, capsys, monkeypatch):
    import pandas as pd

    import toolkit.throughput as tp
    from toolkit.trials import Probe

    search = tp.BatchSearchResult(max_batch_size=64, probes=(Probe(64, True),), model="tiny-resnet", device="cpu")

    def measured_then_interrupted(model, on_update=None, **kw):
        on_update(tp.ModelThroughput(model, "cpu", "float32", search, pd.DataFrame(columns=tp.CURVE_COLUMNS), None,
                                     complete=False))
        raise KeyboardInterrupt  # during the curve, after the search

    monkeypatch.setattr(tp, "measure_model_throughput", measured_then_interrupted)
    out = tmp_path / "t.json"
    rc, _, err = cli(capsys, "throughput", "--model", "tiny-resnet", "--device", "cpu", "--out", out)
    assert rc == 130 and err == "interrupted\n"
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and saved["max_batch_size"] == 64 and saved["provenance"]


def _interrupt(argv, after_s, env=None):
    """Start ``python -m toolkit argv`` as a terminal would, send Ctrl-C to its process group after ``after_s``."""
    p = subprocess.Popen([sys.executable, "-m", "toolkit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, **(env or {})}, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    sent = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, time.monotonic() - sent, out, err


def test_ctrl_c_in_the_simulator_kernel_exits_130_quickly():
    budgets = ",".join(str(b) for b in range(0, 257))  # long enough to be inside a kernel when Ctrl-C comes
    rc, waited, _, err = _interrupt(["simulate", "--sweep", "--policy", "all", "--budgets", budgets], 3.0)
    assert rc == 130 and err == "interrupted\n" and waited < 2


def test_ctrl_c_in_the_batch_search_stops_parent_and_trial_children():
    import psutil

    mark = uuid.uuid4().hex
    rc, waited, out, err = _interrupt(["throughput", "--model", "tiny-resnet", "--device", "cpu", "--json"], 4.0,
                                      env={"TOOLKIT_TEST_MARK": mark})
    assert rc == 130 and waited < 2 and out == ""
    assert err.rstrip("\n").splitlines()[-1].endswith("interrupted") and "Traceback" not in err
    time.sleep(0.2)
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("TOOLKIT_TEST_MARK") == mark:
                left.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    assert not left  # no trial process (or forked trial copy) outlives the interrupt
