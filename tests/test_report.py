"""The main job: orchestration (failures, interrupts, incremental saves), the summary, recorded results, the CLI."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from toolkit import experiments, paper, plots, recorded, report, settings
from toolkit.__main__ import main
from toolkit.formatting import fmt, is_missing, pct


def _fake_experiments(monkeypatch, fail=None, interrupt=None):
    calls = []

    def make(name):
        def experiment(settings, device, *, on_update=None, **kw):
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke\nsecond line")
            if name == interrupt:
                on_update({"experiment": name, "complete": False})
                raise KeyboardInterrupt
            fig = experiments.ExperimentFigure(f"{name}_fig", f"{name} caption",
                                               plots.throughput_curve({1: 1.0, 2: 3.0}))
            return experiments.ExperimentResult(name, {"experiment": name, "complete": True}, (fig,))

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
    # a calibration cache is not a result: no device or date of its own (its models carry theirs)
    (gpu / "moe_engine_costs.json").write_text(json.dumps({"version": 1, "models": {"vm|H200": {"copy_ms": 6.6}}}))
    (gpu / "moe_decode.json").write_text(json.dumps({"provenance": {"gpu": "NVIDIA H200"}, "status": "running"}))
    rec = recorded.recorded_results(gpu)
    assert list(rec) == ["moe_decode", "timer_agreement"]
    assert recorded.is_calibration_cache({"version": 1, "models": {}}) and not recorded.is_calibration_cache(
        {"provenance": {}, "models": {}})
    assert recorded.recorded_label(rec["timer_agreement"]) == "recorded on NVIDIA H100 80GB HBM3, 2026-11-27"
    assert recorded.recorded_label({}) == "recorded on unknown device, unknown date"
    assert recorded.recorded_results(tmp_path / "missing") == {}
    run = report.Run(tmp_path / "out", "cpu", settings.settings_for("cpu"))
    run.out.mkdir()
    text = report.write_summary(run, rec).read_text()
    assert "| `data/gpu/timer_agreement.json` | NVIDIA H100 80GB HBM3 | 2026-11-27 | yes |" in text
    assert "| `data/gpu/moe_decode.json` | NVIDIA H200 | n/a | no |" in text  # still running when written
    assert "moe_engine_costs" not in text and "| ? |" not in text
    empty = report.Run(tmp_path / "out2", "cpu", settings.settings_for("cpu"))
    empty.out.mkdir()
    text = report.write_summary(empty, {}).read_text()
    assert "No recorded GPU results were found in `data/gpu/`" in text and "lead" not in text


def test_settings_smoke_mode_and_the_data_folder(monkeypatch, tmp_path):
    assert settings.settings_for("cuda:0").latency_model == "resnet-50"
    assert settings.settings_for("cpu", quick=True).batch_max == 64
    monkeypatch.setenv("TOOLKIT_SMOKE", "1")
    assert settings.smoke_mode()
    monkeypatch.setenv("TOOLKIT_SMOKE", "0")
    assert not settings.smoke_mode()
    monkeypatch.delenv("TOOLKIT_DATA_DIR", raising=False)
    assert (settings.data_dir() / "routing").is_dir()  # the repository's data/
    monkeypatch.setenv("TOOLKIT_DATA_DIR", str(tmp_path))
    assert settings.data_dir() == tmp_path  # read at each call, not at import


def test_one_formatter_for_missing_values():
    assert [fmt(x) for x in (None, float("nan"), math.inf, np.float64("nan"))] == ["n/a"] * 4
    assert fmt(1234.5678) == "1.23e+03" and fmt(0.12345, ".3f") == "0.123" and fmt(np.float32(2.0), ".1f") == "2.0"
    assert fmt("H100", "s") == "H100" and fmt(None, "s") == "n/a"
    assert pct(0.254) == "+25%" and pct(-0.9) == "-90%" and pct(None) == "n/a" and pct(float("nan")) == "n/a"
    assert is_missing(None) and not is_missing(0) and not is_missing(False)


def test_moe_settings_map_the_report_settings_onto_the_moe_run_path():
    s = settings.settings_for("cpu", quick=True)
    m = experiments.moe_settings(s, "cpu")
    assert (m.preset, m.layers, m.policy, m.prompt_tokens, m.new_tokens, m.device) == (
        s.moe_preset, s.moe_layers, s.moe_policy, s.prompt_tokens, s.new_tokens, "cpu")
    assert experiments.moe_budgets(s, 16) == [0, 8, 16]
    assert experiments.moe_budgets(settings.Settings(moe_fractions=(0.0, 0.3, 0.3, 1.0)), 8) == [0, 2, 8]


@pytest.mark.filterwarnings("ignore::UserWarning")  # LatencyWarning: a busy machine is noisy
def test_the_real_experiments_end_to_end_on_tiny_settings(tmp_path):
    """Every experiment, for real, on the smallest settings: JSON, >= 5 figures (PNG + PDF), the summary."""
    tiny = settings.Settings(audit_time_s=0.2, batch_max_memory=None, batch_max=4, curve_step=4, curve_batches=2,
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
    assert moe["routing"] == "synthetic-mixtral" and moe["runs"][0]["policy"] == "static-popularity"
    assert moe["profile"]["gpu_experts"] == 8 and moe["profile"]["timeline"]  # one profiled decode step


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
    runs += [{"kind": "ablation", "scheme": s, "routing": "uniform", "budget": 14, "decode": dec(t, 35.0, 0.23)}
             for s, t in (("ours-default", 22.9), ("ours-per-layer", 19.3))]
    for name in ("moe_decode.json", "moe_decode_h200.json", "moe_decode_h200_full_copy_kernel.json",
                 "moe_decode_h200_fused_second_host.json", "moe_decode_h200_captured.json"):
        save_json({"provenance": GPU_ENV, "settings": {"total_experts": 64}, "runs": runs}, gpu_dir / name)

    def measure(key, value, bound_ms, spread):
        return {key: value, "hit_rate": 0.3, "bound": {"ms": bound_ms},
                "rounds": {"median": value, "spread": spread, "anomalous": spread > 0.1,
                           "reason": "rounds differ by 20% of their median (more than 10%)" if spread > 0.1 else None}}

    save_json({"provenance": GPU_ENV, "settings": {"new_tokens": 64, "prompt_tokens": 16, "prefill_tokens": 512},
               "runs": [{"gpus": g, "per_gpu_experts": 14, "routing": r, "decode": measure("tokens_per_s", 15.0 + g, 30.0, 0.02),
                         "prefill": measure("ms", 250.0 / g, 100.0, 0.2 if g == 2 else 0.05)}
                        for r in ("uniform", "trace") for g in (1, 2)]}, gpu_dir / "moe_multi_gpu.json")
    save_json({"provenance": GPU_ENV, "settings": {"expert_bytes": 352e6, "threads": 15}, "host_read_gbs": 90.0,
               "float32_weights": {"gbs": 107.0},
               "cases": {str(n): {"tokens": n, "torch_ms": 7.0, "kernel_ms": 3.5 * n ** 0.5,
                                  "rounds_ms": {"torch": [6.8, 7.0, 7.5], "kernel": [3.4 * n ** 0.5, 3.6 * n ** 0.5]}}
                         for n in (1, 4, 16)}}, gpu_dir / "cpu_gemv_h200_amx.json")

    def segments(cpu, spread):
        per = {"dense": 3.0, "routing": 2.0, "before_cpu": 4.0, "cpu": cpu, "after_cpu": 1.5, "tail": 0.5}
        return {"step_ms": sum(per.values()), "step_spread": spread, "anomalous": spread > 0.1, "per_step_ms": per}

    save_json({"provenance": GPU_ENV, "settings": {"preset": "mixtral-8x7b", "layers": 8, "gpu_experts": 14},
               "results": {"uniform": {"overlap": segments(40.0, 0.2), "inline-nosplit": segments(44.0, 0.05)},
                           "trace": {"overlap-nosplit": segments(36.0, 0.03)}}},
              gpu_dir / "decode_timeline_h200.json")
    stamped = {"pre": 2.0, "window": 37.0, "fn_start": 0.6, "fn_busy": 36.3, "fn_end": 0.1, "copies": 35.0,
               "gpu_after_copies": 1.2, "wait_gpu": 0.5, "step": 39.45, "layers": 8, "outside_layers": -0.05}
    unstamped = {**stamped, "fn_start": float("nan"), "fn_busy": float("nan"), "fn_end": float("nan"),
                 "outside_layers": 0.4, "step": 39.9}
    save_json({"provenance": GPU_ENV, "benchmark": "captured_step",
               "settings": {"layers": 8, "gpu_experts": 14, "routing": "uniform"}, "graph_misses": {"units": 5776},
               "profiled_steps": [{"layers": [], "summary": stamped}, {"layers": [], "summary": unstamped}]},
              gpu_dir / "captured_step_h200.json")

    def ways(every, late, spread):
        return {"every step": {"tokens_per_s": every, "rounds": [every] * 3, "spread": spread,
                               "anomalous": spread > 0.1, "deferred": False},
                "late": {"tokens_per_s": late, "rounds": [late, late * 1.01, late * 0.99], "spread": 0.02,
                         "anomalous": False, "deferred": True}, "late_over_every_step": late / every}

    save_json({"provenance": GPU_ENV, "benchmark": "stop_check",
               "settings": {"layers": 8, "gpu_experts": 14, "routing": "uniform", "preset": "mixtral-8x7b"},
               "summary": {"ours": ways(23.7, 24.2, 0.04), "all-gpu": ways(310.0, 387.0, 0.06),
                           "hf-eager": ways(68.0, 73.0, 0.5)}}, gpu_dir / "stop_check_h200.json")
    return gpu_dir


def test_the_stop_check_recording_gives_each_targets_two_ways_and_the_noisy_one_is_left_out(tmp_path):
    import json

    doc = json.loads((write_fake_recordings(tmp_path / "gpu") / "stop_check_h200.json").read_text())
    frame = recorded.recorded_stop_check(doc)
    assert list(zip(frame["target"], frame["way"])) == [(t, w) for t in ("ours", "all-gpu", "hf-eager")
                                                         for w in ("every step", "late")]
    assert frame["tokens_per_s"].tolist() == [23.7, 24.2, 310.0, 387.0, 68.0, 73.0]
    assert frame["anomalous"].tolist() == [False, False, False, False, True, False]
    assert frame["anomaly_reason"][4] == "rounds differ by 50% of their median"
    assert frame["deferred"].tolist() == [False, True] * 3 and frame["rounds"][3] == pytest.approx([387.0, 390.87, 383.13])
    figure = next(f for f in paper.PAPER_FIGURES if f.stem == "gpu_stop_check")
    text = _figure_text(paper.draw_paper_figure(figure, tmp_path)["figure"])
    assert "x1.25" in text and "x1.02" in text and "excluded hf-eager, stop check every step" in text
    assert "x1.07" not in text  # no ratio against an excluded way


def test_paired_ways_draws_a_panel_per_target_with_its_own_axis():
    frame = pd.DataFrame({"target": ["a", "a", "b", "b"], "way": ["x", "y", "x", "y"],
                          "tokens_per_s": [10.0, 20.0, 300.0, 330.0], "rounds": [[10.0], [19.0, 21.0], [300.0], [330.0]]})
    fig = plots.paired_ways(frame, title="t\nsetup")
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["a", "b"]
    assert fig.axes[0].get_xlim()[1] < 40 < fig.axes[1].get_xlim()[1]
    text = _figure_text(fig)
    assert "x2.00" in text and "x1.10" in text


def test_cpu_kernel_recording_gives_each_sides_read_rate_and_the_references(tmp_path):
    import json

    doc = json.loads((write_fake_recordings(tmp_path / "gpu") / "cpu_gemv_h200_amx.json").read_text())
    frame = recorded.recorded_cpu_gemv(doc)
    assert len(frame) == 6 and set(frame["side"]) == {"torch's matmul", "toolkit kernel"}
    one = frame[(frame["tokens"] == 1) & (frame["side"] == "toolkit kernel")].iloc[0]
    assert one["gbs"] == pytest.approx(352e6 / 3.5 * 1e-6) and one["gbs_low"] < one["gbs"] < one["gbs_high"]
    assert frame.attrs["host_read_gbs"] == 90.0 and frame.attrs["float32_gbs"] == 107.0
    assert frame.attrs["threads"] == 15 and frame.attrs["expert_mb"] == pytest.approx(352.0)
    assert not len(recorded.recorded_cpu_gemv({"provenance": {}, "cases": {}}))
    # a run that also forced each of the kernel's paths draws them as sides of their own
    doc["cases"]["16"].update(vector_ms=9.8, amx_ms=4.4, rounds_ms={**doc["cases"]["16"]["rounds_ms"], "amx": [4.3, 4.6]})
    paths = recorded.recorded_cpu_gemv(doc)
    assert set(paths["side"]) == {"torch's matmul", "toolkit kernel", "kernel, vector path only",
                                  "kernel, AMX tiles only"}
    amx = paths[paths["side"] == "kernel, AMX tiles only"].iloc[0]
    assert amx["tokens"] == 16 and amx["gbs"] == pytest.approx(352e6 / 4.4 * 1e-6) and amx["gbs_low"] < amx["gbs"]


def test_decode_timeline_recording_keeps_the_configurations_whose_rounds_agree(tmp_path):
    import json

    doc = json.loads((write_fake_recordings(tmp_path / "gpu") / "decode_timeline_h200.json").read_text())
    frame = recorded.recorded_decode_timeline(doc)
    assert list(dict.fromkeys(zip(frame["routing"], frame["schedule"]))) == [("uniform", "inline-nosplit"),
                                                                          ("trace", "overlap-nosplit")]
    assert list(frame["segment"][:6]) == list(recorded.HOST_SEGMENT_LABELS.values())  # in step order
    one = frame[frame["schedule"] == "inline-nosplit"]
    assert one["ms"].sum() == pytest.approx(one["step_ms"].iloc[0]) == pytest.approx(55.0)
    assert one.loc[one["segment"] == "CPU experts", "ms"].item() == 44.0
    assert frame.attrs["excluded"] == ["uniform overlap (rounds spread 20%)"]
    figure = next(f for f in paper.PAPER_FIGURES if f.stem == "gpu_decode_timeline")
    fig = paper.draw_paper_figure(figure, tmp_path)["figure"]
    assert "excluded uniform overlap (rounds spread 20%)" in _figure_text(fig)


def test_a_captured_step_recording_is_cut_into_its_segments_in_step_order(tmp_path):
    import json

    doc = json.loads((write_fake_recordings(tmp_path / "gpu") / "captured_step_h200.json").read_text())
    frame = recorded.recorded_captured_step(doc)
    first = frame[frame["schedule"] == "profiled step 1"]
    assert list(first["segment"]) == list(recorded.CAPTURED_SEGMENT_LABELS.values())
    assert first["ms"].sum() == pytest.approx(39.5) and first["ms"].iloc[-1] == 0.0  # -0.05 ms outside reads 0
    second = frame[frame["schedule"] == "profiled step 2"]  # no stamps: the host function's window is one segment
    assert list(second["segment"]) == ["dense part, router, token out", "host function's window",
                                       "waiting for the GPU's rows", "outside the layers"]
    assert second["ms"].sum() == pytest.approx(39.9)
    figure = next(f for f in paper.PAPER_FIGURES if f.stem == "gpu_moe_captured_step")
    text = _figure_text(paper.draw_paper_figure(figure, tmp_path)["figure"])
    assert "split at unit 5776" in text and "host node start" in text


def test_multi_gpu_recording_judges_decode_and_prefill_apart(tmp_path):
    import json

    doc = json.loads((write_fake_recordings(tmp_path / "gpu") / "moe_multi_gpu.json").read_text())
    decode, prefill = recorded.recorded_multi_gpu(doc), recorded.recorded_multi_gpu(doc, "prefill")
    assert list(decode["scheme"].unique()) == ["1 GPU, 14 experts", "2 GPUs, 14 experts each"]
    assert decode["bound_tokens_per_s"].tolist() == pytest.approx([1e3 / 30.0] * 4)
    assert not decode["anomalous"].any()  # steady decode rounds stay in although the prefill's wobble
    assert prefill["anomalous"].tolist() == [False, True, False, True]
    assert prefill["ms"].tolist() == [250.0, 125.0, 250.0, 125.0]
    with pytest.raises(ValueError, match="measure"):
        recorded.recorded_multi_gpu(doc, "beam")


def test_recorded_readers_rebuild_frames_from_the_benchmark_files(tmp_path):
    rec = recorded.recorded_results(write_fake_recordings(tmp_path))
    assert sorted(rec) == ["batch_search", "captured_step_h200", "cpu_gemv_h200_amx", "decode_timeline_h200",
                           "moe_decode", "moe_decode_h200",
                           "moe_decode_h200_captured", "moe_decode_h200_full_copy_kernel", "moe_decode_h200_fused_second_host",
                           "moe_engine", "moe_multi_gpu",
                           "profile_cases", "stop_check_h200", "timer_agreement"]
    audit = recorded.recorded_pitfalls(rec["timer_agreement"])
    assert audit.attrs["correct"].median_ms == 2.0 and list(audit["pitfall"])[0] == "copy_in_timed_region"
    assert plots.pitfall_frame(audit)["ratio"].tolist() == pytest.approx([1.5, 10.0, 0.1, 1.1, 200.0 / 1.8])
    assert recorded.recorded_latency(rec["timer_agreement"]) == {
        "steady state (measured)": [2.0, 2.1, 2.0, 2.2, 1.9], "warm-up calls": [40.0, 3.0]}
    agree = recorded.recorded_timer_agreement(rec["timer_agreement"])
    assert agree["timer"].tolist() == ["measure_latency", "torch Timer", "measure_latency, cold L2",
                                       "triton do_bench (cold L2)"]
    sweep = recorded.recorded_moe_sweep(rec["moe_engine"])
    assert sweep["gpu_experts"].tolist() == [0, 8, 16] and sweep.attrs["total_experts"] == 16  # skipped run left out
    assert list(recorded.recorded_decode_samples(rec["moe_engine"])) == ["0/16 GPU experts", "8/16 GPU experts",
                                                                        "16/16 GPU experts"]
    tl = recorded.recorded_timeline(rec["profile_cases"])
    assert set(tl["name"]) == {"attention", "moe.route", "moe.gpu_experts", "moe.cpu_experts"}
    assert set(zip(tl["row"], tl["lane"])) == {("CPU", 0), ("CPU", 1), ("GPU", 0)}
    curves = recorded.recorded_throughput_curves(rec["batch_search"])  # the failed config is left out
    assert [(c[0], c[2], c[3], len(c[1])) for c in curves] == [("resnet-50 bfloat16", 64, 16, 4)]
    schemes = recorded.recorded_moe_schemes(rec["moe_decode"])
    assert len(schemes) == 6 and schemes["bound_tokens_per_s"].tolist() == [50.0] * 6
    assert plots.scheme_comparison(schemes).axes[1].get_title() == "trace routing"
    dsweep = recorded.recorded_moe_decode_sweep(rec["moe_decode"])
    assert dsweep["gpu_experts"].tolist() == [0, 32, 64] and dsweep["prefill_ms"].tolist() == [500.0, 468.0, 436.0]
    assert dsweep.attrs["total_experts"] == 64 and dsweep.attrs["excluded"] == []
    diffs = recorded.recorded_timer_differences(rec["timer_agreement"])
    assert diffs["label"].tolist() == ["matmul"] and diffs["difference"].tolist() == pytest.approx([1.2 / 1.21 - 1])
    cases = recorded.recorded_throughput_cases(rec["batch_search"])
    assert cases["throughput"].tolist() == [10.0, 35.0, 80.0, 82.0] and set(cases["optimal"]) == {16}


def test_recorded_anomalous_runs_are_flagged_and_never_drawn(tmp_path):
    """The benchmark's own flag (rounds disagree) or, in older files, a run far below a run with fewer GPU experts."""
    gpu = write_fake_recordings(tmp_path / "gpu")
    doc = json.loads((gpu / "moe_decode.json").read_text())
    for r in doc["runs"]:
        if r.get("kind") == "sweep" and r["budget"] == 32:
            r.update(anomalous=True, anomaly_reason="decode tokens_per_s: rounds spread 40% > 10%")
        if r.get("kind") == "compare" and r["scheme"] == "all-gpu" and r["routing"] == "uniform":
            r["decode"]["tokens_per_s"] = 10.0  # the other routing ran 60: under a third
    ours = next(r for r in doc["runs"] if r.get("kind") == "compare" and r["scheme"] == "ours")
    ours.update(anomalous=True, anomaly_reason="prefill ms: rounds differ by 45% of their median")
    ours["decode"]["rounds"] = {"anomalous": False, "reason": None}  # a noisy prefill, a steady decode
    schemes = recorded.recorded_moe_schemes(doc)
    odd = schemes[schemes["anomalous"]]
    assert odd[["scheme", "routing"]].values.tolist() == [["all-gpu", "uniform"]]
    assert odd["anomaly_reason"].iloc[0] == ("10 tokens/s, under 1/3 of the same scheme with trace routing and "
                                             "14 GPU experts (60)")
    fig = plots.scheme_comparison(schemes)
    assert fig.axes[0].patches[2].get_width() == 0.0  # all-gpu, uniform: no bar
    sweep = recorded.recorded_moe_decode_sweep(doc)
    assert sweep["gpu_experts"].tolist() == [0, 64]
    assert sweep.attrs["excluded"] == ["ours, trace routing, 32 GPU experts: its rounds disagree (decode tokens_per_s:"
                                       " rounds spread 40% > 10%)"]
    engine = json.loads((gpu / "moe_engine.json").read_text())
    engine["runs"][1]["anomalous"] = True  # 8 GPU experts
    assert recorded.recorded_moe_sweep(engine)["gpu_experts"].tolist() == [0, 16]
    assert list(recorded.recorded_decode_samples(engine)) == ["0/16 GPU experts", "16/16 GPU experts"]
    (gpu / "moe_decode.json").write_text(json.dumps(doc))
    row = paper.draw_paper_figure(next(f for f in paper.PAPER_FIGURES if f.stem == "gpu_moe_decode_sweep"), tmp_path)
    assert any("excluded ours, trace routing, 32 GPU experts" in t.get_text() for t in row["figure"].texts)


def test_the_shipped_moe_decode_recording_excludes_its_anomalous_all_gpu_run():
    schemes = recorded.recorded_moe_schemes(recorded.recording("moe_decode").doc)
    assert schemes[schemes["anomalous"]][["scheme", "routing"]].values.tolist() == [["all-gpu", "uniform"]]


def _figure_text(fig) -> str:
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_visible())]
    return "\n".join(t for t in texts if t)


def test_every_paper_figure_names_what_is_measured_the_model_dtype_and_device():
    """Drawn from the shipped files: a figure read alone says what, on which model, dtype and device."""
    dtypes = ("float32", "bfloat16", "fp32", "bf16", "no dtype", "no timing")
    for f in paper.PAPER_FIGURES:
        row = paper.draw_paper_figure(f)
        assert row["figure"] is not None, f.stem
        text = _figure_text(row["figure"])
        title = (row["figure"]._suptitle.get_text() if row["figure"]._suptitle else "") + "".join(
            ax.get_title() for ax in row["figure"].axes)
        assert len(title.splitlines()) >= 2, f"{f.stem}: a title says what is measured, then the setup"
        if f.source == paper.ROUTING:
            assert "no device" in text and "Mixtral-8x7B" in text, f.stem
        else:
            doc = recorded.recording(f.source).doc
            assert recorded.recorded_device(doc) in text and recorded.recorded_date(doc) in text, f.stem
        assert any(d in text for d in dtypes), f"{f.stem}: no dtype named"
        assert any(m in text.lower() for m in ("efficientnet", "resnet", "mixtral", "matmul")), f"{f.stem}: no model"


READERS = [recorded.recorded_pitfalls, recorded.recorded_latency, recorded.recorded_timer_agreement,
           recorded.recorded_timer_differences, recorded.recorded_throughput_curves,
           recorded.recorded_throughput_cases, recorded.recorded_moe_sweep, recorded.recorded_decode_samples,
           recorded.recorded_timeline, recorded.recorded_moe_schemes, recorded.recorded_moe_decode_sweep,
           recorded.recorded_cpu_gemv, recorded.recorded_decode_timeline, recorded.recorded_captured_step,
           recorded.recorded_stop_check]


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
def test_a_reader_without_data_returns_an_empty_value(reader):
    for doc in (None, {}, {"provenance": {"gpu": "H100"}, "runs": [{"kind": "sweep", "skipped": "time"}]}):
        value = reader(doc)
        assert value is not None and len(value) == 0


def test_readers_parse_the_shipped_recordings():
    """Every reader finds data in the real data/gpu files: no key the benchmarks write was missed."""
    rec = recorded.recorded_results()
    assert {"timer_agreement", "batch_search", "moe_decode", "moe_engine", "profile_cases"} <= set(rec)
    sources = {recorded.recorded_pitfalls: "timer_agreement", recorded.recorded_latency: "timer_agreement",
               recorded.recorded_timer_agreement: "timer_agreement", recorded.recorded_throughput_curves:
               "batch_search", recorded.recorded_timer_differences: "timer_agreement",
               recorded.recorded_throughput_cases: "batch_search",
               recorded.recorded_moe_sweep: "moe_engine", recorded.recorded_decode_samples:
               "moe_engine", recorded.recorded_timeline: "profile_cases", recorded.recorded_moe_schemes: "moe_decode",
               recorded.recorded_moe_decode_sweep: "moe_decode", recorded.recorded_cpu_gemv: "cpu_gemv_h200_amx",
               recorded.recorded_decode_timeline: "decode_timeline_h200",
               recorded.recorded_captured_step: "captured_step_h200", recorded.recorded_stop_check: "stop_check_h200"}
    assert set(sources) == set(READERS)
    for reader, name in sources.items():
        assert len(reader(rec[name])) > 0, reader.__name__
    for name in sources.values():
        assert recorded.recorded_device(rec[name]).startswith("NVIDIA") and recorded.recorded_complete(rec[name])


def test_recording_says_why_a_file_is_missing(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "broken.json").write_text("{not json")
    missing = recorded.recording("timer_agreement", tmp_path)
    assert missing.doc is None and missing.problem == "data/gpu/timer_agreement.json is not present"
    assert missing.name == "timer_agreement" and missing.label is None
    broken = recorded.recording("gpu/broken.json", tmp_path)
    assert broken.doc is None and "broken.json" in broken.problem


def test_paper_figures_redraws_every_figure_and_names_what_is_missing(tmp_path):
    data = tmp_path / "data"
    write_fake_recordings(data / "gpu")
    (data / "gpu" / "moe_engine.json").unlink()
    rows = {r["stem"]: r for r in paper.paper_figures(tmp_path / "figs", data=data)}
    assert list(rows) == [f.stem for f in paper.PAPER_FIGURES]
    assert rows["gpu_moe_offload_sweep"]["missing"] == "no recording: data/gpu/moe_engine.json is not present"
    drawn = [s for s, r in rows.items() if r["paths"]]
    assert len(drawn) == len(rows) - 2  # both moe_engine figures are missing
    for stem in drawn:
        assert (tmp_path / "figs" / f"{stem}.pdf").exists() and (tmp_path / "figs" / f"{stem}.png").exists()
    assert rows["gpu_pitfall_errors"]["label"] == "recorded on NVIDIA H100 80GB HBM3, 2026-11-27"
    assert rows["hit_rate_vs_gpu_experts"]["label"] is None  # drawn from data/routing
    (data / "gpu" / "profile_cases.json").write_text(json.dumps({"provenance": {}, "cases": {}}))
    row = paper.draw_paper_figure(next(f for f in paper.PAPER_FIGURES if f.stem == "gpu_moe_timeline"), data)
    assert row["figure"] is None and row["missing"] == "data/gpu/profile_cases.json holds no data for this figure"
    import toolkit

    assert toolkit.paper_figures is paper.paper_figures and toolkit.run_report is report.run_report
