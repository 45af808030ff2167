"""The main job: orchestration (failures, interrupts, incremental saves), the summary, recorded results, the CLI."""

import json

import pytest

from toolkit import plots, report
from toolkit.__main__ import main


def _fake_experiments(monkeypatch, fail=None, interrupt=None):
    calls = []

    def make(name):
        def experiment(run):
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke\nsecond line")
            if name == interrupt:
                run.save(name, {"experiment": name, "complete": False})
                raise KeyboardInterrupt
            run.save(name, {"experiment": name, "complete": True})
            run.figure(name, plots.throughput_curve({1: 1.0, 2: 3.0}), f"{name}_fig", f"{name} caption")

        return experiment

    monkeypatch.setattr(report, "EXPERIMENTS", {n: make(n) for n in ("timing", "batch", "moe", "simulation")})
    return calls


def test_a_failing_experiment_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    calls = _fake_experiments(monkeypatch, fail="batch")
    run = report.run_report(tmp_path, device="cpu", progress=False, recorded=tmp_path / "none")
    assert calls == ["timing", "batch", "moe", "simulation"]
    assert run.errors == {"batch": "RuntimeError: batch broke"}
    assert "Traceback" in (tmp_path / "batch.error.txt").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "**Failed:** `RuntimeError: batch broke`" in summary
    assert summary.count("![") == 3 and "![moe_fig](figures/moe_fig.png)" in summary
    assert "No recorded GPU results" in summary
    for name in ("timing", "moe", "simulation"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["complete"] is True
        assert (tmp_path / "figures" / f"{name}_fig.pdf").exists() and (tmp_path / "figures" / f"{name}_fig.png").exists()


def test_an_interrupt_still_writes_the_summary_of_what_was_measured(tmp_path, monkeypatch):
    calls = _fake_experiments(monkeypatch, interrupt="moe")
    with pytest.raises(KeyboardInterrupt):
        report.run_report(tmp_path, device="cpu", progress=False, recorded=tmp_path / "none")
    assert calls == ["timing", "batch", "moe"]
    summary = (tmp_path / "summary.md").read_text()
    assert "**Incomplete** (interrupted)" in summary and "Not run: simulation." in summary
    assert json.loads((tmp_path / "moe.json").read_text())["complete"] is False


def test_unknown_experiment_is_a_user_error(tmp_path, capsys):
    assert main(["report", "--device", "cpu", "--out", str(tmp_path), "--only", "timing,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown experiment(s) nope" in err


def test_cli_prints_a_table_and_the_summary_path(tmp_path, monkeypatch, capsys):
    _fake_experiments(monkeypatch)
    code = main(["report", "--device", "cpu", "--out", str(tmp_path), "--only", "timing,simulation", "--no-progress",
                 "--recorded", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert code == 0
    assert "timing" in out and "simulation" in out and "batch" not in out
    assert f"summary: {tmp_path / 'summary.md'}" in out and "2 figures" in out


def test_recorded_results_are_listed_with_device_and_date(tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "timer_agreement.json").write_text(json.dumps(
        {"provenance": {"gpu": "NVIDIA H100 80GB HBM3", "timestamp": "2026-11-27T10:00:00+00:00"}, "complete": True}))
    (gpu / "broken.json").write_text("{not json")
    rec = report.recorded_results(gpu)
    assert list(rec) == ["timer_agreement"]
    assert report.recorded_label(rec["timer_agreement"]) == "recorded on NVIDIA H100 80GB HBM3, 2026-11-27"
    assert report.recorded_label({}) == "recorded on unknown device, unknown date"
    assert report.recorded_results(tmp_path / "missing") == {}
    run = report.Run(tmp_path / "out", "cpu", report.settings_for("cpu"))
    run.out.mkdir()
    text = report.write_summary(run, rec).read_text()
    assert "| `data/gpu/timer_agreement.json` | NVIDIA H100 80GB HBM3 | 2026-11-27 | yes |" in text


def test_settings_and_smoke_mode(monkeypatch):
    assert report.settings_for("cuda:0").latency_model == "resnet-50"
    assert report.settings_for("cpu", quick=True).batch_max == 64
    monkeypatch.setenv("TOOLKIT_SMOKE", "1")
    assert report.smoke_mode()
    monkeypatch.setenv("TOOLKIT_SMOKE", "0")
    assert not report.smoke_mode()


@pytest.mark.filterwarnings("ignore::UserWarning")  # LatencyWarning: a busy machine is noisy
def test_the_real_experiments_end_to_end_on_tiny_settings(tmp_path):
    """Every experiment, for real, on the smallest settings: JSON, >= 5 figures (PNG + PDF), the summary."""
    tiny = report.Settings(audit_time_s=0.2, batch_max_memory=None, batch_max=4, curve_step=4, curve_batches=2,
                           curve_time_s=0.05, moe_layers=1, moe_fractions=(0.0, 1.0), prompt_tokens=4, new_tokens=3,
                           sim_policies=("static-popularity", "lru"), sim_budgets=(0, 64, 256), sim_heatmap_budget=64)
    run = report.run_report(tmp_path, device="cpu", settings=tiny, progress=False, recorded=tmp_path / "none")
    assert run.errors == {}
    for name in ("timing", "batch", "moe", "simulation"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["complete"] is True
    stems = [stem for _, stem, _ in run.figures]
    assert len(stems) >= 5
    for stem in stems:
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 0
        assert (tmp_path / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    summary = (tmp_path / "summary.md").read_text()
    assert "median" in summary and "largest batch that fits **4** (search bound)" in summary
    assert "| 0 / 8 |" in summary and "| 8 / 8 |" in summary  # the MoE sweep table, 1 layer x 8 experts
    moe = json.loads((tmp_path / "moe.json").read_text())
    assert [r["gpu_experts"] for r in moe["runs"]] == [0, 8]
    assert moe["runs"][0]["hit_rate"]["decode"] == 0.0 and moe["runs"][1]["hit_rate"]["decode"] == 1.0


# ---- recorded GPU results: small files in the benchmarks' formats (also used by tests/test_notebooks.py)

GPU_ENV = {"gpu": "NVIDIA H100 80GB HBM3", "timestamp": "2026-11-27T10:00:00+00:00", "device": "cuda"}


def write_fake_recordings(gpu_dir):
    """data/gpu/*.json as the benchmarks write them, with a few numbers each."""
    gpu_dir.mkdir(parents=True, exist_ok=True)
    from toolkit.profiling import Event
    from toolkit.results import save_json
    from toolkit.timing import LatencyResult

    correct = LatencyResult(samples_ms=(2.0, 2.1, 2.0, 2.2, 1.9), warmup_count=2, first_call_ms=40.0,
                            warmup_ms=(40.0, 3.0), label="correct", device="cuda").to_dict()
    rows = [{"pitfall": "copy_in_timed_region", "naive_ms": 3.0, "correct_ms": 2.0, "relative_error": 0.5, "note": ""},
            {"pitfall": "no_warmup", "naive_ms": 20.0, "correct_ms": 2.0, "relative_error": 9.0, "note": ""},
            {"pitfall": "host_clock_no_sync", "naive_ms": 0.2, "correct_ms": 2.0, "relative_error": -0.9, "note": ""},
            {"pitfall": "single_sample", "naive_ms": 2.2, "correct_ms": 2.0, "relative_error": 0.1, "note": ""},
            {"pitfall": "cudnn_benchmark", "naive_ms": 200.0, "correct_ms": 1.8, "relative_error": 110.0, "note": ""}]
    save_json({"provenance": GPU_ENV, "pitfall_audit": {"model": "efficientnet-b0", "rows": rows, "correct": correct},
               "workloads": {"matmul": {"measure_latency": {"median_ms": 1.0}, "torch_timer": {"median_ms": 1.01},
                                        "measure_latency_l2_flush": {"median_ms": 1.2},
                                        "do_bench": {"median_ms": 1.21}}}}, gpu_dir / "timer_agreement.json")

    def gen(k, hit):
        return {"decode_tokens_per_s": 5.0 + k, "prefill_ms": 300.0 - 10 * k, "hit_rate": {"decode": hit},
                "decode_ms": {"median": 100.0 - k, "samples": [100.0 - k, 99.0 - k, 101.0 - k]}}

    save_json({"provenance": GPU_ENV, "status": "complete", "settings": {"total_experts": 16},
               "runs": [{"gpu_experts": k, "greedy": gen(k, k / 16)} for k in (0, 8, 16)]
               + [{"gpu_experts": 4, "skipped": "time budget"}]}, gpu_dir / "moe_engine.json")
    events = [Event("label", 0.0, 1.0, "attention[L0]"), Event("label", 1.0, 1.2, "moe.route[L0]"),
              Event("kernel", 1.2, 1.8, "gemm", "moe.gpu_experts[L0]"),
              Event("label", 1.2, 2.5, "moe.cpu_experts[L0]", None, 1), Event("step", 0.0, 2.6, "step")]
    save_json({"provenance": GPU_ENV, "cases": {"moe_decode": {
        "events": [[e.kind, e.start, e.end, e.name, e.label, e.lane] for e in events]}}}, gpu_dir / "profile_cases.json")
    save_json({"provenance": GPU_ENV, "configs": [
        {"model": "resnet-50", "dtype": "float32", "status": "error", "error": "boom"},
        {"model": "resnet-50", "dtype": "bfloat16", "max_batch_size": 64, "search": {"max_batch_size": 64},
         "optimal": {"optimal_batch_size": 16},
         "curve": [{"batch_size": b, "samples_per_s": t} for b, t in ((1, 10.0), (4, 35.0), (16, 80.0), (64, 82.0))]}]},
        gpu_dir / "batch_search.json")

    def dec(tps, bound_ms, hit):
        return {"tokens_per_s": tps, "median_ms": 1e3 / tps, "hit_rate": hit, "bound": {"ms": bound_ms},
                "samples_ms": [1e3 / tps] * 3}

    runs = [{"kind": "compare", "scheme": s, "routing": r, "budget": 14, "decode": dec(t, 20.0, 0.3)}
            for r in ("uniform", "trace") for s, t in (("ours", 30.0), ("fiddler-serial", 12.0), ("all-gpu", 60.0))]
    runs += [{"kind": "sweep", "scheme": "ours", "routing": "trace", "budget": k, "decode": dec(10.0 + k, 15.0, k / 64),
              "prefill": {"ms": 500.0 - k}} for k in (0, 32, 64)]
    runs += [{"kind": "compare", "scheme": "copy-on-demand", "routing": "trace", "budget": 14, "skipped": "time"}]
    save_json({"provenance": GPU_ENV, "settings": {"total_experts": 64}, "runs": runs}, gpu_dir / "moe_decode.json")
    return gpu_dir


def test_recorded_readers_rebuild_frames_from_the_benchmark_files(tmp_path):
    rec = report.recorded_results(write_fake_recordings(tmp_path))
    assert sorted(rec) == ["batch_search", "moe_decode", "moe_engine", "profile_cases", "timer_agreement"]
    audit = report.recorded_pitfalls(rec["timer_agreement"])
    assert audit.attrs["correct"].median_ms == 2.0 and list(audit["pitfall"])[0] == "copy_in_timed_region"
    assert plots.pitfall_frame(audit)["ratio"].tolist() == pytest.approx([1.5, 10.0, 0.1, 1.1, 200.0 / 1.8])
    assert report.recorded_latency(rec["timer_agreement"]) == {"steady state (measured)": [2.0, 2.1, 2.0, 2.2, 1.9],
                                                                "warm-up calls": [40.0, 3.0]}
    agree = report.recorded_timer_agreement(rec["timer_agreement"])
    assert agree["timer"].tolist() == ["measure_latency", "torch Timer", "measure_latency, cold L2",
                                       "triton do_bench (cold L2)"]
    sweep = report.recorded_moe_sweep(rec["moe_engine"])
    assert sweep["gpu_experts"].tolist() == [0, 8, 16] and sweep.attrs["total_experts"] == 16  # skipped run left out
    assert list(report.recorded_decode_samples(rec["moe_engine"])) == ["0/16 GPU experts", "8/16 GPU experts",
                                                                      "16/16 GPU experts"]
    tl = report.recorded_timeline(rec["profile_cases"])
    assert set(tl["name"]) == {"attention", "moe.route", "moe.gpu_experts", "moe.cpu_experts"}
    assert set(zip(tl["row"], tl["lane"])) == {("CPU", 0), ("CPU", 1), ("GPU", 0)}
    curve, largest, optimal = report.recorded_throughput(rec["batch_search"])  # the failed config is skipped
    assert (largest, optimal, len(curve)) == (64, 16, 4)
    assert [c[0] for c in report.recorded_throughput_curves(rec["batch_search"])] == ["resnet-50 bfloat16"]
    schemes = report.recorded_moe_schemes(rec["moe_decode"])
    assert len(schemes) == 6 and schemes["bound_tokens_per_s"].tolist() == [50.0] * 6
    assert plots.scheme_comparison(schemes).axes[1].get_title() == "trace routing"
    dsweep = report.recorded_moe_decode_sweep(rec["moe_decode"])
    assert dsweep["gpu_experts"].tolist() == [0, 32, 64] and dsweep["prefill_ms"].tolist() == [500.0, 468.0, 436.0]


def test_paper_figures_redraws_every_figure_and_names_what_is_missing(tmp_path):
    data = tmp_path / "data"
    write_fake_recordings(data / "gpu")
    (data / "gpu" / "moe_engine.json").unlink()
    rows = {r["stem"]: r for r in report.paper_figures(tmp_path / "figs", data=data)}
    assert list(rows) == [f.stem for f in report.PAPER_FIGURES]
    assert rows["gpu_moe_offload_sweep"]["missing"] == "no recording: data/gpu/moe_engine.json is not present"
    drawn = [s for s, r in rows.items() if r["paths"]]
    assert len(drawn) == len(rows) - 2  # both moe_engine figures are missing
    for stem in drawn:
        assert (tmp_path / "figs" / f"{stem}.pdf").exists() and (tmp_path / "figs" / f"{stem}.png").exists()
    assert rows["gpu_pitfall_errors"]["label"] == "recorded on NVIDIA H100 80GB HBM3, 2026-11-27"
    assert rows["hit_rate_vs_gpu_experts"]["label"] is None  # drawn from data/routing
