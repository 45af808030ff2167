"""benchmarks/moe_one_path.py: the CLI and the benchmark alternate in fresh processes, with the same settings."""

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


def fake_processes(module, monkeypatch, seconds: float, tok_s: dict):
    """Replace the subprocess call: each 'process' writes the record its side writes, and 'took' ``seconds``."""
    calls = []

    def run(cmd, timeout):
        out = Path(cmd[cmd.index("--out") + 1])
        side = "cli" if "toolkit" in cmd else "benchmark"
        calls.append((side, cmd))
        if side == "cli":
            out.write_text(json.dumps({"decode_tokens_per_s": tok_s["cli"]}))
        else:
            rounds = [tok_s["benchmark"]] * 2
            out.mkdir(parents=True, exist_ok=True)
            (out / "moe_decode.json").write_text(json.dumps({"runs": [
                {"scheme": "ours", "routing": "uniform",
                 "decode": {"rounds": {"median": rounds[0], "values": rounds, "spread": 0.0}}}]}))
        return 0, seconds, ""

    monkeypatch.setattr(module, "run", run)
    return calls


def test_sides_alternate_with_the_same_setting_and_the_ratio_is_judged(tmp_path, monkeypatch):
    m = load_benchmark("moe_one_path")
    calls = fake_processes(m, monkeypatch, 1.0, {"cli": 15.0, "benchmark": 14.0})
    assert m.main(["--out", str(tmp_path), "--pairs", "2", "--bench-rounds", "3"]) == 0
    assert [side for side, _ in calls] == ["cli", "benchmark", "cli", "benchmark"]
    cli, bench = calls[0][1], calls[1][1]
    # one setting on both sides: the preset, layers, budget, tokens and routing a user would give the CLI
    assert cli[cli.index("--gpu-experts") + 1] == "14" and bench[bench.index("--budget") + 1] == "14/64"
    for flag in ("--preset", "--layers", "--new-tokens", "--device"):
        assert cli[cli.index(flag) + 1] == bench[bench.index(flag) + 1]
    assert bench[bench.index("--rounds") + 1] == "3" and bench[bench.index("--schemes") + 1] == "ours"
    rec = json.loads((tmp_path / "moe_one_path.json").read_text())
    assert len(rec["runs"]["cli"]) == len(rec["runs"]["benchmark"]) == 2
    assert abs(rec["cli_over_benchmark"] - 15 / 14) < 1e-9
    assert rec["within_target"] is False  # 7% apart
    assert rec["provenance"]["command"]


def test_a_process_that_would_overrun_the_budget_is_not_started(tmp_path, monkeypatch):
    m = load_benchmark("moe_one_path")
    calls = fake_processes(m, monkeypatch, 300.0, {"cli": 15.0, "benchmark": 15.3})
    assert m.main(["--out", str(tmp_path), "--pairs", "2", "--budget-s", "250"]) == 0
    assert [side for side, _ in calls] == ["cli", "benchmark"]  # each side's first took 300 s > what is left
    rec = json.loads((tmp_path / "moe_one_path.json").read_text())
    assert len(rec["not_started"]) == 2 and all("300 s needed" in x for x in rec["not_started"])
    assert rec["within_target"] is True


def test_bad_counts_exit_with_a_usage_error(tmp_path):
    m = load_benchmark("moe_one_path")
    try:
        m.main(["--out", str(tmp_path), "--pairs", "0"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--pairs 0 was accepted")


@pytest.mark.parametrize("option, value", [("--ablations", "ours-fast"), ("--schemes", "ours,fidler-serial"),
                                           ("--routings", "zipf"), ("--groups", "compare,sweeps")])
def test_moe_decode_names_a_misspelt_choice_in_one_line(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        load_benchmark("moe_decode").parse_args([option, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"{option}: unknown" in err and "choose from" in err
