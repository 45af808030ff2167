"""benchmarks/timer_clocks.py: each burst variant sets the timer's constants for its own calls only."""

import json

import pytest
from benchmark_scripts import load_benchmark

import toolkit.timing as timing


def test_burst_shape_is_put_back_even_after_an_error():
    m = load_benchmark("timer_clocks")
    before = timing.BURST_GPU_S, timing.BURST_PREROLL_S
    with pytest.raises(RuntimeError), m.burst_shape(0.05, 0.005):
        assert (timing.BURST_GPU_S, timing.BURST_PREROLL_S) == (0.05, 0.005)
        raise RuntimeError("a failed measurement")
    assert (timing.BURST_GPU_S, timing.BURST_PREROLL_S) == before
    assert m.VARIANTS["burst10+pre5"] == (timing.BURST_GPU_S, timing.BURST_PREROLL_S)  # the timer's own


def test_cpu_smoke_run_records_every_variant_and_a_verdict(tmp_path):
    m = load_benchmark("timer_clocks")
    assert m.main(["--quick", "--device", "cpu", "--rounds", "2", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "timer_clocks.json").read_text())
    assert set(rec["workloads"]) == set(m.QUICK_WORKLOADS)
    for w in rec["workloads"].values():
        assert w["do_bench"]["skipped"].startswith("triton.testing.do_bench needs a CUDA GPU")
        assert set(w["variants"]) == set(m.VARIANTS)
        for v in w["variants"].values():
            assert len(v["round_medians_ms"]) == 2 and v["median_of_rounds_ms"] > 0 and v["vs_do_bench"] is None
    assert set(rec["verdict"]) == set(m.VARIANTS) and rec["provenance"]["command"].startswith("timer_clocks.py")
