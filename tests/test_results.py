"""RunRecord: a benchmark run's record, saved whole after every measurement."""

import json

import pytest

from toolkit.errors import ToolkitError
from toolkit.results import RunRecord


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_save_stamps_elapsed_and_keeps_the_status_until_a_new_one(tmp_path):
    clock = FakeClock()
    record = {"benchmark": "b", "status": "running", "runs": []}
    run = RunRecord("b", tmp_path / "out" / "b.json", record, clock=clock)

    clock.now += 2.5
    assert run.save() == tmp_path / "out" / "b.json"  # missing folders are made
    saved = json.loads((tmp_path / "out" / "b.json").read_text())
    assert saved == {"benchmark": "b", "status": "running", "runs": [], "elapsed_s": 2.5}

    record["runs"].append({"x": 1})  # the run fills the same dict in place
    clock.now += 1.0
    run.save("complete")
    saved = json.loads((tmp_path / "out" / "b.json").read_text())
    assert list(saved) == ["benchmark", "status", "runs", "elapsed_s"]
    assert saved["status"] == "complete" and saved["elapsed_s"] == 3.5 and saved["runs"] == [{"x": 1}]

    run.save()  # no status: the last one stays
    assert json.loads((tmp_path / "out" / "b.json").read_text())["status"] == "complete"


def test_start_counts_time_spent_before_the_record_was_built(tmp_path):
    clock = FakeClock(10.0)
    run = RunRecord("b", tmp_path / "b.json", {}, clock=clock, start=4.0)
    assert run.elapsed_s == 6.0
    run.save("interrupted")
    assert json.loads((tmp_path / "b.json").read_text()) == {"status": "interrupted", "elapsed_s": 6.0}


def test_a_stopped_run_keeps_what_it_measured_says_why_in_one_line_and_gives_the_exit_code(tmp_path, capsys):
    run = RunRecord("b", tmp_path / "b.json", {"rows": [1]}, clock=FakeClock(2.0), start=0.0)
    assert run.stopped(KeyboardInterrupt()) == 130
    assert json.loads((tmp_path / "b.json").read_text())["status"] == "interrupted"
    assert capsys.readouterr().err == f"interrupted: what was measured is in {tmp_path / 'b.json'}\n"
    assert run.stopped(ToolkitError("needs a CUDA GPU")) == 2
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["status"] == "error: needs a CUDA GPU" and saved["rows"] == [1]
    assert capsys.readouterr().err == "error: needs a CUDA GPU\n"


def test_log_writes_one_line_with_the_name_and_elapsed_seconds_to_stderr(tmp_path, capsys):
    clock = FakeClock()
    run = RunRecord("moe_decode", tmp_path / "b.json", {}, clock=clock)
    clock.now += 12.34
    run.log("round 1: ok")
    clock.now += 100.0
    run.log("done")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "[moe_decode   12.3s] round 1: ok\n[moe_decode  112.3s] done\n"
    assert not (tmp_path / "b.json").exists()  # logging does not save


def test_a_record_that_cannot_be_written_is_a_toolkit_error_naming_the_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    run = RunRecord("b", tmp_path / "taken" / "b.json", {}, clock=FakeClock())
    with pytest.raises(ToolkitError, match="b.json"):
        run.save()
