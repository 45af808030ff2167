"""The host timeline of offloaded steps: spans from marks (injected clock), and the engine's marks on the CPU."""

import itertools
import json

import pytest
import torch
from benchmark_scripts import load_benchmark

from toolkit.moe.costs import CostModel
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe
from toolkit.moe.timeline import SEGMENTS, HostTimeline, segments, summary

CPU_ALWAYS = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0)  # every miss on the CPU


def marks(*spec):
    """A timeline whose clock returns the given seconds in turn, marked with (what, layer) pairs."""
    names, times = zip(*[((w, layer), t) for w, layer, t in spec])
    tl = HostTimeline(clock=iter(times).__next__)
    for what, layer in names:
        tl.mark(what, layer)
    return tl


def test_spans_of_a_step_sum_to_the_step():
    tl = marks(("step_start", -1, 0.000),
               ("enter", 0, 0.001), ("routed", 0, 0.0015), ("cpu_start", 0, 0.002), ("cpu_end", 0, 0.006),
               ("exit", 0, 0.0065),
               ("enter", 1, 0.007), ("routed", 1, 0.0072), ("exit", 1, 0.0080),  # no CPU work
               ("step_end", -1, 0.0090))
    rows, tails, steps = segments(tl.events)
    assert steps == pytest.approx([9.0])
    assert tails == pytest.approx([1.0])
    first, second = rows
    assert (first["step"], first["layer"], second["layer"]) == (0, 0, 1)
    assert [first[s] for s in SEGMENTS] == pytest.approx([1.0, 0.5, 0.5, 4.0, 0.5])
    assert [second[s] for s in SEGMENTS] == pytest.approx([0.5, 0.2, 0.0, 0.0, 0.8])
    assert sum(r[s] for r in rows for s in SEGMENTS) + tails[0] == pytest.approx(steps[0])


def test_marks_outside_whole_steps_are_left_out_and_the_summary_averages_per_step():
    tl = marks(("enter", 0, 0.0), ("exit", 0, 0.5),  # before any step
               ("step_start", -1, 1.0), ("enter", 0, 1.001), ("exit", 0, 1.003), ("step_end", -1, 1.004),
               ("step_start", -1, 2.0), ("enter", 0, 2.003), ("exit", 0, 2.007), ("step_end", -1, 2.008),
               ("step_start", -1, 3.0), ("enter", 0, 3.001))  # a step cut short
    s = summary(tl.events)
    assert s["steps"] == 2 and s["layers_per_step"] == 1
    assert s["step_ms"] == pytest.approx(6.0)
    assert s["per_step_ms"]["dense"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert s["per_step_ms"]["after_cpu"] == pytest.approx(3.0)  # (2 + 4) / 2, no routing marked
    assert s["per_step_ms"]["tail"] == pytest.approx(1.0)
    assert summary([]) == {"steps": 0}


def test_a_workers_marks_out_of_order_are_put_in_time_order():
    clock = itertools.count().__next__  # whole milliseconds, one per mark
    tl = HostTimeline(clock=lambda: clock() * 1e-3)
    tl.mark("step_start"), tl.mark("enter", 0), tl.mark("routed", 0)
    tl.events.append(("cpu_end", 0, 0.0028))  # a worker's marks, appended out of order
    tl.events.append(("cpu_start", 0, 0.0022))
    tl.mark("exit", 0), tl.mark("step_end")
    rows, _, _ = segments(tl.events)
    assert rows[0]["cpu"] == pytest.approx(0.6) and rows[0]["before_cpu"] == pytest.approx(0.2)


@pytest.mark.parametrize("schedule", [(True, False), (False, False)], ids=["worker", "inline"])
def test_the_engine_marks_every_layer_and_its_cpu_experts(schedule):
    model = build_moe("tiny-mixtral", seed=0)
    off = offload(model, 0, device="cpu", cost_model=CPU_ALWAYS)  # nothing resident: every layer has CPU work
    try:
        off.set_schedule(*schedule)
        tl = off.timeline = HostTimeline()
        ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for _ in range(2):
                tl.mark("step_start")
                model(input_ids=ids)
                tl.mark("step_end")
        off.timeline = None
        with torch.no_grad():
            model(input_ids=ids)  # unmarked
        whats = [e[0] for e in tl.events]
        layers = off.n_layers
        for what in ("enter", "routed", "cpu_start", "cpu_end", "exit"):
            assert whats.count(what) == 2 * layers, what
        rows, tails, steps = segments(tl.events)
        assert len(rows) == 2 * layers and len(steps) == 2
        assert all(r["cpu"] > 0 for r in rows)
        for i, step in enumerate(steps):
            total = sum(r[s] for r in rows if r["step"] == i for s in SEGMENTS) + tails[i]
            assert total == pytest.approx(step)
    finally:
        off.restore()


def test_the_benchmark_runs_quick_on_the_cpu(tmp_path, capsys):
    bench = load_benchmark("decode_timeline")
    assert bench.main(["--quick", "--out", str(tmp_path), "--routings", "uniform", "--rounds", "2",
                       "--steps", "2", "--schedules", "inline-nosplit,overlap-nosplit"]) == 0
    record = json.loads((tmp_path / "decode_timeline.json").read_text())
    assert record["status"] == "complete" and record["provenance"]["command"]
    by = record["results"]["uniform"]
    assert set(by) == {"inline-nosplit", "overlap-nosplit"}
    for r in by.values():
        assert len(r["rounds"]) == 2 and r["step_ms"] > 0
        assert set(r["per_step_ms"]) == {*SEGMENTS, "tail"}
    assert "inline-nosplit" in capsys.readouterr().out


def test_the_benchmark_names_a_misspelt_schedule(capsys):
    bench = load_benchmark("decode_timeline")
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--schedules", "inlin"])
    assert e.value.code == 2
    assert "unknown routing or schedule: inlin" in capsys.readouterr().err


def test_the_benchmark_reports_a_preset_it_cannot_build_in_one_line(tmp_path, capsys):
    bench = load_benchmark("decode_timeline")
    assert bench.main(["--quick", "--preset", "no-such-preset", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-preset" in err and "Traceback" not in err
    assert json.loads((tmp_path / "decode_timeline.json").read_text())["status"].startswith("error: ")
