"""The schedule of our engine's CPU experts, chosen by measurement: the choice with injected timings, the
engine switching schedule in place (same outputs), the run's record, the CLI's line, and host memory
checked before a model is built."""

from __future__ import annotations

import dataclasses
import json
from collections import namedtuple

import numpy as np
import pytest
import torch

from toolkit.__main__ import main
from toolkit.errors import ToolkitError
from toolkit.moe import generation
from toolkit.moe import schedule as S
from toolkit.moe.baselines import get_baseline
from toolkit.moe.costs import CostModel, save_cost_model
from toolkit.moe.offload import EngineOptions, Offloaded
from toolkit.moe.presets import build_moe
from toolkit.moe.run import WARMUP_ROUNDS, WARMUP_STEADY, MoESession, MoESettings

# the lent machine's Mixtral expert: a pinned copy (6.4 ms) costs about a CPU expert (7.2 ms), so ours splits
LENT = CostModel.fixed(cpu=(7.2, 0.0), gpu=(0.115, 0.0), copy_ms=6.4, key="test")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


def scripted(timings: dict):
    """A fake ``measure``: each call of a schedule returns its next scripted ms per step; calls are logged."""
    left = {k: list(v) for k, v in timings.items()}
    calls = []

    def measure(name):
        calls.append(name)
        return left[name].pop(0)

    return measure, calls


def choose(candidates, timings):
    measure, calls = scripted(timings)
    return S.choose_schedule(candidates, measure, rounds=WARMUP_ROUNDS, steady_within=WARMUP_STEADY), calls


# -- the choice, with injected timings ----------------------------------------------------------------------

def test_the_faster_candidate_wins_and_candidates_alternate():
    # the H200 case: the worker thread costs more than its overlap buys
    got, calls = choose(("overlap", "inline"), {"overlap": [90.0, 70.4, 70.0], "inline": [80.0, 61.2, 61.0]})
    assert calls == ["overlap", "inline", "overlap", "inline", "overlap", "inline"]  # round by round
    assert got.picked == "inline" and got.default == "overlap" and got.measured
    # each figure is the median of the rounds after the first (cold) one
    assert got.candidates == {"overlap": pytest.approx(70.2), "inline": pytest.approx(61.1)}
    assert got.rounds == {"overlap": [90.0, 70.4, 70.0], "inline": [80.0, 61.2, 61.0]}
    assert got.to_dict()["candidates"] == got.candidates and got.to_dict()["picked"] == "inline"


def test_a_tie_within_three_percent_keeps_the_default():
    got, _ = choose(("overlap", "inline"), {"overlap": [70.0, 70.0], "inline": [68.5, 68.5]})  # 2.2% faster
    assert got.picked == "overlap"
    got, _ = choose(("overlap", "inline"), {"overlap": [70.0, 70.0], "inline": [67.0, 67.0]})  # 4.5% faster
    assert got.picked == "inline"
    assert S.pick_fastest({"a": 100.0, "b": float("nan")}, "b") == "a"  # a failed figure never wins
    assert S.pick_fastest({}, "b") == "b"


def test_rounds_stop_when_every_candidate_is_steady_or_run_out():
    got, calls = choose(("overlap", "inline", "overlap-nosplit", "inline-nosplit"),
                        {n: [10.0, 10.1] for n in ("overlap", "inline", "overlap-nosplit", "inline-nosplit")})
    assert len(calls) == 8 and got.picked == "overlap"  # 2 rounds of 4: all steady
    never = {"overlap": [10.0, 16.0, 15.0, 16.0, 15.0], "inline": [15.5] * 5}  # overlap alternates by 6%
    got, calls = choose(("overlap", "inline"), never)
    assert len(calls) == 2 * WARMUP_ROUNDS and got.picked == "overlap"  # unsteady: capped at WARMUP_ROUNDS each
    assert got.dropped == {}  # within 10% of each other: both stay in the race
    with pytest.raises(ToolkitError, match="unknown schedules"):
        S.choose_schedule(("fast",), lambda n: 1.0, rounds=2, steady_within=0.05)


def test_a_clearly_slower_candidate_leaves_the_race_after_two_warm_rounds():
    # the 16-core H200 host: the no-split schedules ran 15-20% slower than the split ones
    timings = {"overlap": [115.0, 69.4, 64.8, 65.3, 68.3], "inline": [71.1, 68.7, 63.4, 67.3, 67.6],
               "overlap-nosplit": [80.2, 84.0, 76.4, 72.7, 79.1], "inline-nosplit": [71.9, 84.7, 67.6, 92.5, 76.5]}
    got, calls = choose(tuple(timings), timings)
    assert got.dropped == {"overlap-nosplit": 3, "inline-nosplit": 3}  # medians of rounds 2-3: 80.2, 76.2 vs 66.1
    assert calls[:12] == list(timings) * 3 and set(calls[12:]) == {"overlap", "inline"}
    assert len(calls) == 12 + 2 * 2  # 16 generations instead of 20
    assert got.picked == "overlap"  # inline 67.3 vs overlap 66.8: a tie keeps the default
    assert got.rounds["overlap-nosplit"] == [80.2, 84.0, 76.4]  # what was measured stays in the record
    assert got.to_dict()["dropped"] == got.dropped
    # nothing is dropped before two warm rounds, nor the last one racing, nor on failed figures alone
    got, calls = choose(("overlap", "inline"), {"overlap": [10.0, 10.0], "inline": [30.0, 30.0]})
    assert len(calls) == 4 and got.dropped == {} and got.picked == "overlap"


def test_candidates_only_for_ours_on_a_gpu_with_experts_off_it():
    ours = EngineOptions(cpu_threads=1, cpu_dtype=torch.float32, split=True, overlap=True)
    cands, why = S.schedule_candidates("ours", ours, "cuda", all_resident=False)
    assert cands == ("overlap", "inline", "overlap-nosplit", "inline-nosplit") and why is None  # default first
    nosplit = dataclasses.replace(ours, split=False)
    assert S.schedule_candidates("ours", nosplit, "cuda", False)[0] == ("overlap-nosplit", "inline-nosplit")
    # the worker leaving a core is settable but not raced by "auto" (it rarely won where measured) ...
    many = dataclasses.replace(ours, cpu_threads=15)
    assert S.schedule_candidates("ours", many, "cuda", False)[0] == cands
    # ... unless an engine offloaded with it makes it the default, which is then raced against the rest
    spared = dataclasses.replace(many, spare_cores=1)
    assert S.schedule_candidates("ours", spared, "cuda", False)[0] == ("overlap-spare", *cands)
    for scheme in ("fiddler-serial", "lru-copy", "copy-on-demand", "all-gpu", "ours-inline"):
        assert S.schedule_candidates(scheme, ours, "cuda", False) == ((), f"fixed by scheme {scheme}")
    assert S.schedule_candidates("ours", ours, "cpu", False)[1].startswith("not measured: a cpu device")
    assert "every expert is resident" in S.schedule_candidates("ours", ours, "cuda", True)[1]
    serial = EngineOptions(cpu_threads=1, cpu_dtype=torch.float32, serial=True, overlap=True)
    assert S.schedule_name(serial) == "serial" and S.schedule_name(nosplit) == "overlap-nosplit"
    assert S.schedule_name(spared) == "overlap-spare" and spared.worker_threads == 14
    assert S.schedule_name(dataclasses.replace(spared, split=False)) == "overlap-nosplit-spare" in S.SCHEDULES
    # inline the calling thread computes the CPU experts on every calibrated thread: nothing is spared
    assert S.schedule_name(dataclasses.replace(spared, overlap=False)) == "inline"
    assert dataclasses.replace(spared, overlap=False).worker_threads == 15


def test_bad_schedules_are_one_clear_error():
    with pytest.raises(ToolkitError, match="schedule must be one of auto, overlap, inline"):
        MoESession(device="cpu", schedule="fast")
    with pytest.raises(ToolkitError, match="scheme 'fiddler-serial' keeps its own schedule"):
        MoESession(device="cpu", schedule="inline", scheme="fiddler-serial")
    assert MoESettings().schedule == "auto"


# -- the engine switches in place --------------------------------------------------------------------------

def test_set_schedule_switches_in_place_with_identical_outputs():
    model = build_moe("tiny-mixtral", seed=0)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    pop = np.zeros((2, 8))
    pop[:, :2] = 1.0
    off = get_baseline("ours").offload(model, 4, device="cpu", popularity=pop, cost_model=LENT, cpu_threads=2)
    try:
        assert off.schedule == {"overlap": False, "split": True, "spare_cores": 0}  # the CPU default: inline
        out = {}
        for name, (overlap, split, spare) in S.SCHEDULES.items():
            off.set_schedule(overlap, split, spare)
            assert (off.executor is not None) == overlap
            assert off.schedule == {"overlap": overlap, "split": split, "spare_cores": spare}
            assert S.schedule_name(off.options) == name and off.to_dict()["overlap"] == overlap
            r = generation.generate(off, ids, max_new_tokens=5, ignore_eos=True)
            out[name] = (r.sequences, off.stats.split_expert_calls, off.to_dict()["worker_threads"])
        ref = out["inline"][0]
        assert all(seq == ref for seq, _, _ in out.values())  # same tokens whatever the schedule
        assert out["inline"][1] > 0 and out["overlap"][1] > 0  # the split path really ran ...
        assert out["inline-nosplit"][1] == out["overlap-nosplit"][1] == 0  # ... and not without split
        threads = off.cpu_threads
        assert out["overlap-spare"][2] == threads - 1 and out["overlap"][2] == out["inline"][2] == threads
        off.set_schedule(False, True)
        assert off.executor is None  # the worker stopped
    finally:
        off.restore()
    with pytest.raises(ToolkitError, match="restored"):
        off.set_schedule(True, True)


def test_the_spared_worker_runs_its_experts_on_one_thread_fewer():
    """The worker's own intra-op thread count follows the spared cores, and a bad count is one clear error."""
    model = build_moe("tiny-mixtral", seed=0)
    off = get_baseline("ours").offload(model, 4, device="cpu", cost_model=LENT, cpu_threads=3, overlap=True)
    try:
        def worker_threads():
            return off.executor.submit(torch.get_num_threads).result()

        assert worker_threads() == 3
        first = off.executor
        off.set_schedule(True, True, 1)
        assert off.executor is not first and worker_threads() == 2  # a new worker on the new count
        kept = off.executor
        off.set_schedule(True, False, 1)
        assert off.executor is kept  # same thread count: the worker stays
        for bad in (3, -1, 1.5, "1"):
            with pytest.raises(ToolkitError, match="spare_cores must be a whole number from 0 to 2"):
                off.set_schedule(True, True, bad)
        assert off.options.spare_cores == 1  # a refused switch changes nothing
    finally:
        off.restore()
    with pytest.raises(ToolkitError, match="spare_cores must be"):
        get_baseline("ours").offload(build_moe("tiny-mixtral", seed=0), 4, device="cpu", cost_model=LENT,
                                     cpu_threads=1, spare_cores=1)


# -- the run: measured during warm-up, recorded -------------------------------------------------------------

@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "costs.json"
    save_cost_model(LENT, path)
    return str(path)


class FakeClock:
    """Wraps ``generate``: real tokens, but each decode step takes the ms its schedule is given here."""

    def __init__(self, monkeypatch, ms: dict):
        self.ms, self.schedules = ms, []
        real = generation.generate

        def fake(model, input_ids, attention_mask=None, **kw):
            r = real(model, input_ids, attention_mask, **kw)
            name = S.schedule_name(model.options) if isinstance(model, Offloaded) else "unmodified"
            self.schedules.append(name)
            return dataclasses.replace(r, decode_samples_ms=(self.ms.get(name, 50.0),) * len(r.decode_samples_ms))

        monkeypatch.setattr(generation, "generate", fake)


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """Candidates as a GPU would have them (the CPU's are none): the choice path runs on the CPU."""
    real = S.schedule_candidates
    monkeypatch.setattr(S, "schedule_candidates", lambda scheme, options, device_type, all_resident:
                        real(scheme, options, "cuda", all_resident))


def test_run_measures_the_candidates_and_keeps_the_fastest(monkeypatch, calibration, as_on_a_gpu):
    clock = FakeClock(monkeypatch, {"inline": 61.2, "overlap": 70.4, "inline-nosplit": 64.0,
                                    "overlap-nosplit": 75.0})
    switches = []
    real_set = Offloaded.set_schedule
    monkeypatch.setattr(Offloaded, "set_schedule",
                        lambda self, o, s, c=0: (switches.append((o, s, c)), real_set(self, o, s, c)))
    with MoESession(device="cpu", calibration=calibration, new_tokens=4, routing="uniform") as session:
        r = session.run(4)
    sched = r.schedule
    assert sched["measured"] and sched["picked"] == "inline" and sched["default"] == "inline"  # the CPU engine's
    assert sched["candidates"] == {"inline": 61.2, "overlap": 70.4, "inline-nosplit": 64.0, "overlap-nosplit": 75.0}
    # two rounds of every candidate, alternating, then the winner's warm-up and the measured generation
    assert clock.schedules[:8] == ["inline", "overlap", "overlap-nosplit", "inline-nosplit"] * 2
    assert clock.schedules[8:] == ["inline", "inline"] and switches[-1] == (False, True, 0)
    assert r.warmup["rounds"] == 1 and r.warmup["after_schedule_rounds"] == 2 and r.warmup["steady"]
    assert r.engine["overlap"] is False and r.engine["split"] is True
    assert r.to_dict()["schedule"] == sched
    # the measured generation decodes with the winner
    assert r.generation.decode_ms["median"] == 61.2


def test_run_switches_to_a_faster_schedule_and_a_set_one_is_kept(monkeypatch, calibration, as_on_a_gpu):
    FakeClock(monkeypatch, {"inline": 70.0, "overlap": 60.0, "inline-nosplit": 71.0, "overlap-nosplit": 62.0})
    with MoESession(device="cpu", calibration=calibration, new_tokens=3, routing="uniform") as session:
        r = session.run(4)
        assert r.schedule["picked"] == "overlap" and r.engine["overlap"] is True
        fixed = session.run(4, schedule="inline-nosplit")
        assert fixed.schedule == {**fixed.schedule, "picked": "inline-nosplit", "measured": False,
                                  "reason": "set by schedule='inline-nosplit'"}
        assert (fixed.engine["overlap"], fixed.engine["split"]) == (False, False)


def test_peer_schemes_keep_their_schedule(monkeypatch, calibration, as_on_a_gpu):
    clock = FakeClock(monkeypatch, {})
    monkeypatch.setattr(Offloaded, "set_schedule", lambda *a: pytest.fail("a peer scheme's schedule was changed"))
    with MoESession(device="cpu", calibration=calibration, new_tokens=3, routing="uniform") as session:
        for scheme, name in (("fiddler-serial", "serial"), ("lru-copy", "inline-nosplit")):
            clock.schedules.clear()
            r = session.run(4, scheme=scheme)
            assert r.schedule == {**r.schedule, "picked": name, "measured": False, "candidates": {},
                                  "reason": f"fixed by scheme {scheme}"}
            assert set(clock.schedules) == {name}
        with pytest.raises(ToolkitError, match="keeps its own schedule"):
            session.run(4, scheme="lru-copy", schedule="overlap")
        everything = session.run("all")  # nothing runs on the CPU: nothing to measure
        assert not everything.schedule["measured"] and "resident" in everything.schedule["reason"]


def test_on_a_cpu_auto_keeps_the_engine_default_unmeasured(calibration):
    with MoESession(device="cpu", calibration=calibration, new_tokens=3, warmup_tokens=2) as session:
        r = session.run(4)
    assert r.schedule["picked"] == "inline" and not r.schedule["measured"] and r.schedule["candidates"] == {}
    assert "cpu device" in r.schedule["reason"] and r.warmup["rounds"] >= 2


# -- the CLI --------------------------------------------------------------------------------------------------

def test_cli_prints_the_schedule_line(capsys, calibration):
    assert main(["moe", "--device", "cpu", "--calibration", calibration, "--new-tokens", "3", "--gpu-experts", "4",
                 "--warmup", "2", "--prompt-tokens", "6"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("schedule ")]
    assert lines == ["  schedule                       inline (not measured: a cpu device has no copy engine to "
                     "overlap with; the engine's default)"]
    assert main(["moe", "--device", "cpu", "--calibration", calibration, "--new-tokens", "3", "--gpu-experts", "4",
                 "--warmup", "2", "--prompt-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"]["picked"] == "inline"


def test_cli_sets_the_schedule(capsys, calibration):
    base = ["moe", "--device", "cpu", "--calibration", calibration, "--new-tokens", "3", "--gpu-experts", "4",
            "--warmup", "2", "--prompt-tokens", "6", "--json"]
    assert main([*base, "--schedule", "overlap-nosplit"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["schedule"]["picked"] == "overlap-nosplit" and got["schedule"]["reason"] == \
        "set by schedule='overlap-nosplit'"
    assert got["settings"]["schedule"] == "overlap-nosplit"
    # a peer scheme keeps its own schedule: one line, exit 2
    assert main([*base, "--schedule", "inline", "--scheme", "fiddler-serial"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keeps its own schedule" in err[0]
    with pytest.raises(SystemExit) as e:
        main([*base, "--schedule", "fast"])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_schedule_line_of_a_measured_run():
    from toolkit.cli.moe import format_table

    got, _ = choose(("overlap", "inline"), {"overlap": [70.4, 70.4], "inline": [61.2, 61.2]})
    assert S.schedule_line(got.to_dict()) == "inline (measured: inline 61.2 ms/step, overlap 70.4 ms/step)"
    assert S.schedule_line({}) is None
    record = {"preset": "p", "layers": 1, "device": "cuda", "gpu_experts": 1, "total_experts": 8, "scheme": "ours",
              "policy": "static", "routing": "uniform", "cpu_threads": 2, "mode": "greedy", "num_beams": 1,
              "batch_size": 1, "prompt_tokens": 4, "new_tokens": 4, "prefill_ms": 1.0,
              "decode_ms": {"median": 61.2, "p90": 62.0}, "decode_tokens_per_s": 16.3, "end_to_end_ms": 250.0,
              "cpu_expert_calls": 3, "schedule": got.to_dict()}
    assert "  schedule                       inline (measured: inline 61.2 ms/step, overlap 70.4 ms/step)" in format_table(record).splitlines()
    # a spared core says how many threads the worker's CPU experts ran on
    got, _ = choose(("overlap", "overlap-spare"), {"overlap": [60.0, 60.0], "overlap-spare": [55.0, 55.0]})
    record.update(schedule=got.to_dict(), engine={"overlap": True, "spare_cores": 1, "worker_threads": 14})
    assert ("  schedule                       overlap-spare (measured: overlap-spare 55.0 ms/step, overlap 60.0 "
            "ms/step); the worker's CPU experts on 14 threads") in format_table(record).splitlines()


# -- host memory, before building -----------------------------------------------------------------------------

def test_host_memory_is_checked_before_the_model_is_built(monkeypatch):
    import psutil

    Memory = namedtuple("Memory", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(64 * 2**30, 128 * 2**30))
    monkeypatch.setattr(MoESession, "_build", lambda self: pytest.fail("built although it cannot fit"))
    with pytest.raises(ToolkitError, match=r"needs 8\d\.\d GiB of host memory .* but 64\.0 GiB is available"):
        MoESession(preset="mixtral-8x7b", layers=32, device="cpu", routing="model")


# -- on a GPU (run on the device machine) ----------------------------------------------------------------------

@pytest.mark.gpu
def test_set_schedule_on_cuda_keeps_the_tokens():
    """Every schedule on CUDA (worker thread and streams, or inline; split or whole copies) gives the same tokens."""
    model = build_moe("tiny-mixtral", seed=0, device="cuda", expert_device="cpu")
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1)).cuda()
    pop = np.zeros((2, 8))
    pop[:, :2] = 1.0
    off = get_baseline("ours").offload(model, 4, device="cuda", popularity=pop, cost_model=LENT)
    try:
        assert off.schedule == {"overlap": True, "split": True, "spare_cores": 0}  # the CUDA default
        seqs = {}
        for name, (overlap, split, spare) in S.SCHEDULES.items():
            off.set_schedule(overlap, split, spare)
            assert (off.executor is not None) == overlap
            seqs[name] = generation.generate(off, ids, max_new_tokens=5, ignore_eos=True).sequences
        assert len(set(seqs.values())) == 1
    finally:
        off.restore()


@pytest.mark.gpu
def test_auto_measures_the_candidates_on_cuda(calibration):
    """On a GPU "auto" measures every candidate of ours during warm-up and runs the one it picked."""
    with MoESession(device="cuda", calibration=calibration, new_tokens=8, routing="uniform") as session:
        r = session.run(4)
        peer = session.run(4, scheme="fiddler-serial")
    sched = r.schedule
    assert sched["measured"] and sched["default"] == "overlap"
    assert set(sched["candidates"]) == set(S.AUTO_CANDIDATES)
    assert all(len(v) >= 2 for v in sched["rounds"].values())
    overlap, split, spare = S.SCHEDULES[sched["picked"]]
    assert (r.engine["overlap"], r.engine["split"], r.engine["spare_cores"]) == (overlap, split, spare)
    assert S.schedule_line(sched).startswith(f"{sched['picked']} (measured: ")
    assert peer.schedule["picked"] == "serial" and not peer.schedule["measured"]
