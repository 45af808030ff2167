"""benchmarks/stop_check.py: both ways of reading transformers' stop check, per target, alternating."""

import json

import pytest
from benchmark_scripts import load_benchmark

sc = load_benchmark("stop_check")


def test_the_summary_gives_each_ways_median_spread_and_the_ratio():
    rows = [{"target": "all-gpu", "defer_stop": d, "deferred": d, "tokens_per_s": t}
            for d, t in ((True, 385.0), (False, 309.0), (False, 270.0), (True, 386.0), (True, 384.0), (False, 286.0))]
    rows += [{"target": "hf-eager", "defer_stop": d, "deferred": d, "tokens_per_s": t}
             for d, t in ((True, 86.0), (False, 100.0), (False, 79.0), (True, 88.0))]
    s = sc.summarize(rows, 0.1)
    late, every = s["all-gpu"]["late"], s["all-gpu"]["every step"]
    assert late["tokens_per_s"] == 385.0 and late["rounds"] == [385.0, 386.0, 384.0] and late["deferred"]
    assert every["tokens_per_s"] == 286.0 and every["spread"] == pytest.approx(39.0 / 286.0)
    assert every["anomalous"] and not late["anomalous"] and not every["deferred"]
    assert s["all-gpu"]["late_over_every_step"] == pytest.approx(385.0 / 286.0)
    assert s["hf-eager"]["every step"]["tokens_per_s"] == 89.5  # the median of two


def test_on_cpu_both_ways_run_on_every_target_and_give_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert sc.main(["--device", "cpu", "--preset", "tiny-mixtral", "--layers", "2", "--gpu-experts", "4",
                    "--new-tokens", "4", "--rounds", "2", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "stop_check.json").read_text())
    assert [(r["round"], r["target"], r["defer_stop"]) for r in rec["rounds"]] == [
        (i, t, d) for i in range(2) for t in sc.TARGETS for d in ((True, False) if i == 0 else (False, True))]
    assert not any(r["deferred"] for r in rec["rounds"])  # a CPU has no events: transformers reads every step
    assert set(rec["summary"]) == set(sc.TARGETS) and rec["provenance"]["device"] == "cpu"
    assert all(r["tokens_per_s"] > 0 for r in rec["rounds"])


def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys):
    assert sc.main(["--device", "cpu", "--preset", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stop_check: ") and len(err.strip().splitlines()) == 1
