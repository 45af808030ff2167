"""The two-GPU benchmarks on a CPU: their smoke modes write complete records, and a host without two GPUs is skipped."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark, run_benchmark


def run_script(name: str, out: Path, *args: str) -> dict:
    """The script in a fresh process, as on the GPU machine; -> its JSON record."""
    proc = run_benchmark(name, out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def moe_record(tmp_path_factory):
    return run_script("moe_multi_gpu", tmp_path_factory.mktemp("moe"), "--quick", "--device", "cpu", "--rounds", "2")


@pytest.fixture(scope="module")
def sweep_record(tmp_path_factory):
    return run_script("sweep_two_gpus", tmp_path_factory.mktemp("sweep"), "--quick", "--device", "cpu")


def test_moe_quick_measures_both_configurations_under_both_routings(moe_record):
    r = moe_record
    assert r["status"] == "complete" and r["provenance"]["torch"]
    s = r["settings"]
    assert s["per_gpu_experts"] == 4 and s["total_experts"] == 16 and s["rounds"] == 2
    assert {(e["config"], e["routing"]) for e in r["runs"]} == {
        (c, g) for c in ("1-gpu", "2-gpu") for g in ("uniform", "trace")}
    for e in r["runs"]:
        assert e["rounds"] == 2 and e["budget"] == e["gpus"] * 4 and "error" not in e
        d, p = e["decode"], e["prefill"]
        for value in (d["tokens_per_s"], d["median_ms"], d["bound"]["ms"], d["fraction_of_bound"], p["ms"],
                      p["bound"]["ms"], p["fraction_of_bound"]):
            assert positive(value), e
        assert len(d["rounds"]["values"]) == 2 and len(p["rounds"]["values"]) == 2
        # one warm round by default: recorded with its figures, left out of the medians
        assert s["warm_rounds"] == 1 and len(e["warm_rounds"]) == 1
        assert positive(e["warm_rounds"][0]["decode_tokens_per_s"]) and positive(e["warm_rounds"][0]["prefill_ms"])
        assert e["schedule"]["picked"] and isinstance(e["anomalous"], bool)
        assert e["card_24gb"]["fits"] and len(e["card_24gb"]["bytes_per_gpu"]) == e["gpus"]
        # per device: the experts it holds and the rows it computed; where each resident expert lives
        assert [x["experts"] for x in e["devices"]] == [4] * e["gpus"]
        assert all(x["rows"] > 0 for x in e["devices"]) and all(x["rows"] > 0 for x in e["prefill_devices"])
        tiers = np.array(e["expert_devices"])
        assert tiers.shape == (2, 8)
        assert np.bincount(tiers[tiers >= 0], minlength=e["gpus"]).tolist() == [4] * e["gpus"]


def test_moe_quick_checks_two_devices_against_one(moe_record):
    for e in moe_record["runs"]:
        if e["config"] == "2-gpu":
            assert e["check"]["pass"] and e["check"]["against"] == "1-gpu"
        else:
            assert "check" not in e
    for c in moe_record["comparison"].values():
        assert positive(c["decode_speedup"]) and positive(c["prefill_speedup"]) and c["check_pass"]
    assert len(moe_record["targets"]) == 8
    assert all(t["goal"] == 0.85 and isinstance(t["met"], bool) for t in moe_record["targets"].values())


def test_moe_without_two_gpus_is_skipped_before_building(tmp_path, capsys):
    bench = load_benchmark("moe_multi_gpu")
    assert bench.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "moe_multi_gpu.json").read_text())
    assert r["status"] == "skipped" and "two CUDA GPUs" in r["skipped"] and r["runs"] == []
    assert r["cost_model"] is None and "host_memory" not in r["settings"]  # nothing was built
    assert "skipped" in capsys.readouterr().out
    assert "1 visible" in bench.why_not_two_gpus("cuda", 1, quick=False)
    assert bench.why_not_two_gpus("cuda", 2, quick=False) is None
    assert bench.why_not_two_gpus("cpu", 0, quick=True) is None


def test_moe_full_model_defaults():
    a = load_benchmark("moe_multi_gpu").parse_args(["--full-model"])
    assert (a.layers, a.per_gpu, a.new_tokens, a.routings, a.prefill_repeats) == (32, 56, 32, "trace", 1)
    a = load_benchmark("moe_multi_gpu").parse_args([])
    assert (a.layers, a.per_gpu, a.new_tokens, a.prefill_tokens, a.routings, a.schedule) == (
        8, 14, 64, 512, "uniform,trace", "inline")


def test_sweep_quick_runs_both_slots_and_reads_the_point_files(sweep_record):
    r = sweep_record
    assert r["status"] == "complete" and r["sampler"]["source"] == "psutil"
    pts = r["points"]
    assert len(pts) == 2 and all(p["status"] == "ok" for p in pts)
    assert len({p["device"] for p in pts}) == 2  # one point per slot
    for p in pts:
        assert p["end_s"] > p["start_s"] >= 0 and positive(p["seconds"]) and positive(p["metrics"]["median_ms"])
    s = r["summary"]
    assert s["points_ok"] == 2 and s["n_samples"] >= 2 and len(r["samples"]) == s["n_samples"]
    assert set(s["busy_s"]) == set(s["devices"]) == {p["device"] for p in pts}
    assert s["both_busy_s"] >= 0 and s["overlap_s"] >= 0 and isinstance(s["verdict"], str)


def test_sweep_with_one_gpu_is_skipped(tmp_path):
    bench = load_benchmark("sweep_two_gpus")
    assert bench.main(["--out", str(tmp_path)], gpus=["0"]) == 0
    r = json.loads((tmp_path / "sweep_two_gpus.json").read_text())
    assert r["status"] == "skipped" and "1 visible" in r["skipped"] and "points" not in r


def test_overlap_and_busy_arithmetic():
    bench = load_benchmark("sweep_two_gpus")
    points = [{"status": "ok", "device": "0", "start_s": 0.0, "end_s": 10.0},
              {"status": "ok", "device": "1", "start_s": 4.0, "end_s": 12.0},
              {"status": "ok", "device": "0", "start_s": 10.0, "end_s": 15.0},
              {"status": "error"}]
    assert bench.overlap_s(points) == pytest.approx(8.0)  # 4-12 s: device 1 beside device 0's two points
    samples = [(0.0, {"0": 90, "1": 10}), (1.0, {"0": 90, "1": 80}), (3.0, {"0": 40, "1": 80}), (3.5, {"0": 99})]
    # a sample stands for the gap before it: only 0-1 s had both above 50%; a missing device counts as idle
    assert bench.both_busy_s(samples, ["0", "1"]) == pytest.approx(1.0)
    assert bench.busy_s(samples, "1") == pytest.approx(3.0)
    assert bench.verdict(6.0, 8.0, 5.0).startswith("both GPUs busy")
    assert "not both busy" in bench.verdict(1.0, 8.0, 5.0)


def test_a_misspelt_routing_is_one_line_before_anything_is_built(capsys):
    with pytest.raises(SystemExit) as e:
        load_benchmark("moe_multi_gpu").parse_args(["--routings", "uniform,zipf"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--routings: unknown 'zipf'; choose from uniform, trace" in err


def test_moe_one_link_configuration_copies_to_the_first_gpu_only(tmp_path):
    r = run_script("moe_multi_gpu", tmp_path, "--quick", "--device", "cpu", "--configs", "2-gpu,2-gpu-one-link",
                   "--routings", "uniform", "--rounds", "1", "--warm-rounds", "0")
    assert r["status"] == "complete" and r["settings"]["configs"] == ["2-gpu", "2-gpu-one-link"]
    runs = {e["config"]: e for e in r["runs"]}
    assert set(runs) == {"2-gpu", "2-gpu-one-link"} and all("error" not in e for e in runs.values())
    link = runs["2-gpu-one-link"]
    assert link["gpus"] == 2 and [d["copies"] for d in link["devices"]][1] == 0  # no copy went to the second
    assert all("copies" in d for d in runs["2-gpu"]["devices"])
    slot_bytes = 2 * r["settings"]["expert_bytes"]  # the second GPU holds staging slots only when it takes copies
    assert runs["2-gpu"]["card_24gb"]["bytes_per_gpu"][1] - link["card_24gb"]["bytes_per_gpu"][1] == slot_bytes
    cmp = r["comparison"].get("uniform") or {}
    assert "decode_speedup" not in cmp  # no 1-gpu run to compare with


def test_moe_nocontention_configuration_plans_without_the_contention(tmp_path):
    bench = load_benchmark("moe_multi_gpu")
    cfg = bench.Config(2, 4, "uniform", 1.0, "inline", ablation="nocontention")
    assert cfg.name == "2-gpu-nocontention" and cfg.scheme.contention is False and cfg.scheme.spread_copies
    assert bench.Config(1, 4, "uniform", 1.0, "inline").scheme.contention is True


def test_moe_a_misspelt_config_is_one_line(capsys):
    bench = load_benchmark("moe_multi_gpu")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--configs", "3-gpu"])
    assert exc.value.code == 2 and "--configs: unknown '3-gpu'" in capsys.readouterr().err


def test_comparison_and_targets_take_each_measures_median_of_rounds():
    bench = load_benchmark("moe_multi_gpu")

    def run(config, tok_s, prefill_picked, prefill_median):
        return {"config": config, "routing": "uniform", "decode": {
                    "tokens_per_s": tok_s, "hit_rate": 0.5, "fraction_of_bound": 0.5,
                    "rounds": {"median": tok_s}},
                "prefill": {"ms": prefill_picked, "bound": {"ms": 80.0}, "fraction_of_bound": 80.0 / prefill_picked,
                            "rounds": {"median": prefill_median}}}

    # the entry's prefill is the median *decode* round's; the comparison uses the prefill rounds' own median
    record = {"routings": {"uniform": "u"},
              "runs": [run("1-gpu", 18.0, 254.0, 248.0), run("2-gpu", 23.0, 153.0, 160.0),
                       run("2-gpu-one-link", 23.0, 206.0, 200.0), run("2-gpu-nocontention", 20.0, 190.0, 192.0)]}
    cmp = bench.comparison(record)["uniform"]
    assert cmp["prefill_speedup"] == pytest.approx(248.0 / 160.0)
    assert cmp["both_links_prefill_speedup"] == pytest.approx(200.0 / 160.0)
    assert cmp["contention_2gpu_prefill_speedup"] == pytest.approx(192.0 / 160.0)
    assert cmp["contention_2gpu_decode_speedup"] == pytest.approx(23.0 / 20.0)
    assert "contention_1gpu_decode_speedup" not in cmp  # no 1-gpu-nocontention run
    assert bench.targets(record)["2-gpu uniform prefill"]["value"] == pytest.approx(80.0 / 160.0)
