"""Widgets, headless: move a control, check the read-out and the figure change."""

import numpy as np
import pandas as pd
import pytest

ipywidgets = pytest.importorskip("ipywidgets", reason="notebook-only package (absent on the GPU machine)")

from toolkit import widgets  # noqa: E402  (needs ipywidgets)


def _fake_simulate(calls):
    def simulate_fn(policy, gpu_experts):
        calls.append((policy, gpu_experts))
        rate = gpu_experts / 16 * (1.0 if policy == "lru" else 0.5)
        return {"decode": rate, "prefill": rate / 2, "per_layer": {"prefill": [rate / 2] * 3, "decode": [rate] * 3}}

    return simulate_fn


def test_moe_explorer_slider_changes_the_hit_rate_and_figure():
    calls = []
    panel = widgets.moe_offload_explorer(_fake_simulate(calls), n_experts=16, policies=["static", "lru"], value=8)
    slider, html = panel.controls["gpu_experts"], panel.readouts["hit_rate"]
    # the contract with the browser test (docs/INTERFACES.md)
    assert isinstance(slider, ipywidgets.IntSlider) and slider.description == "GPU experts"
    assert slider.continuous_update is False and "toolkit-gpu-experts" in slider._dom_classes
    assert isinstance(html, ipywidgets.HTML) and "toolkit-hit-rate" in html._dom_classes
    assert "decode hit rate: 0.250" in html.value
    first_fig = panel.figure

    slider.value = 12
    assert "decode hit rate: 0.375" in html.value and "prefill hit rate: 0.188" in html.value
    assert panel.figure is not first_fig
    assert panel.figure.axes[0].images[0].get_array()[0, 1] == pytest.approx(0.375)

    panel.controls["policy"].value = "lru"
    assert "decode hit rate: 0.750" in html.value
    slider.value = 8
    panel.controls["policy"].value = "static"
    assert calls == [("static", 8), ("static", 12), ("lru", 12), ("lru", 8)]  # (static, 8) came from the cache


def test_moe_explorer_engine_button_runs_with_a_progress_bar():
    seen = {}

    def run_engine(policy, gpu_experts, progress):
        seen.update(policy=policy, gpu_experts=gpu_experts)
        progress.update(4)
        return {"tokens_per_s": 12.5, "prefill_ms": 80.0, "decode_ms": [10.0, 12.0, 11.0, 30.0], "hit_rate": 0.5}

    panel = widgets.moe_offload_explorer(_fake_simulate([]), 16, ["lru"], value=4, run_engine=run_engine)
    panel.controls["gpu_experts"].value = 6
    panel.controls["run"].click()
    assert seen == {"policy": "lru", "gpu_experts": 6}
    text = panel.readouts["engine"].value
    assert "12.5 tokens/s" in text and "prefill 80 ms" in text and "decode median 11.5 ms/token" in text
    assert "decode hit rate 0.500" in text
    assert set(panel.figures) == {"decode_distribution", "decode_over_tokens"}
    assert panel.controls["run"].disabled is False


def test_moe_explorer_engine_failure_is_shown_in_the_panel():
    def broken(policy, gpu_experts, progress):
        raise RuntimeError("out of <memory>")

    panel = widgets.moe_offload_explorer(_fake_simulate([]), 4, ["lru"], run_engine=broken)
    panel.controls["run"].click()  # ipywidgets logs the callback's exception
    assert "engine run failed" in panel.readouts["engine"].value and "&lt;memory&gt;" in panel.readouts["engine"].value
    assert panel.controls["run"].disabled is False


def test_batch_size_explorer_reads_out_the_selected_batch():
    curve = pd.DataFrame({"batch_size": [1, 2, 4, 8], "throughput": [10.0, 18.0, 40.0, 32.0],
                          "latency_ms": [100.0, 111.0, 100.0, 250.0]})
    panel = widgets.batch_size_explorer(curve, largest=8)
    slider, out = panel.controls["batch_size"], panel.readouts["throughput"]
    assert slider.value == 4 and slider.continuous_update is False  # starts at the optimum
    assert "batch 4: throughput 40 samples/s (100% of best), 100 ms per batch" in out.value
    slider.value = 2
    assert "batch 2: throughput 18 samples/s (45% of best)" in out.value
    assert any(list(line.get_xdata()) == [2, 2] for line in panel.figure.axes[0].lines)


def test_latency_explorer_switches_view_and_timers():
    rng = np.random.default_rng(1)
    results = {"correct": rng.normal(1.0, 0.01, 50), "no sync": rng.normal(0.1, 0.01, 50)}
    panel = widgets.latency_explorer(results)
    assert "correct" in panel.readouts["summary"].value and "no sync" in panel.readouts["summary"].value
    panel.controls["kind"].value = "ecdf"
    assert panel.figure.axes[0].get_ylabel() == "fraction of samples"
    panel.controls["timers"].value = ("no sync",)
    assert "correct" not in panel.readouts["summary"].value


def test_notebook_widget_moves_the_gpu_expert_slider_on_the_real_simulator_and_runs_the_engine():
    panel = widgets.moe_offload_widget(policies=["static-popularity", "lru"], value=32, layers=1, prompt_tokens=4,
                                       new_tokens=3)
    slider, html = panel.controls["gpu_experts"], panel.readouts["hit_rate"]
    assert slider.max == 256  # synthetic Mixtral-8x7B: 32 layers x 8 experts
    before = html.value
    assert "decode hit rate: 0." in before
    slider.value = 192
    assert html.value != before and "decode hit rate: 0." in html.value
    rate = lambda text: float(text.split("decode hit rate: ")[1][:5])  # noqa: E731
    assert rate(html.value) > rate(before)  # more GPU experts, more hits
    panel.controls["run"].click()  # a real (tiny) offloaded model: 1 layer x 8 experts, 6 of them on the "GPU"
    text = panel.readouts["engine"].value
    assert "tokens/s" in text and "engine: 6 of 8 experts on the GPU" in text, text
    assert panel.figures["decode_over_tokens"].axes[0].lines


def test_readouts_show_missing_values_as_n_a():
    panel = widgets.moe_offload_explorer(lambda policy, k: {"decode": None, "prefill": float("nan")}, 4, ["lru"])
    assert "decode hit rate: n/a" in panel.readouts["hit_rate"].value
    assert "prefill hit rate: n/a" in panel.readouts["hit_rate"].value
    curve = pd.DataFrame({"batch_size": [1, 2], "throughput": [1.0, 2.0], "latency_ms": [1.0, float("nan")]})
    out = widgets.batch_size_explorer(curve).readouts["throughput"].value
    assert "batch 2: throughput 2 samples/s (100% of best)" in out and "per batch" not in out


def test_live_engine_runs_through_one_moe_session_and_reuses_its_model():
    from toolkit.moe.run import MoERunResult, MoESettings

    engine = widgets.LiveEngine(MoESettings(layers=1, prompt_tokens=4, new_tokens=3, warmup_tokens=2), total=16)
    assert engine.settings.layers == 1 and engine.total_experts == 8 and engine.gpu_experts_for(8) == 4
    first = engine("lru", 16)
    session = engine.session
    assert isinstance(first["result"], MoERunResult) and first["result"].policy == "lru"
    assert first["engine_gpu_experts"] == 8 and first["hit_rate"] == 1.0
    assert len(first["decode_ms"]) == 2  # 3 new tokens: the first comes from the prefill, then 2 decode steps
    second = engine("static-popularity", 0)
    assert engine.session is session  # built once, reused
    assert second["engine_gpu_experts"] == 0 and second["hit_rate"] == 0.0
    engine.close()
    assert engine.session is None
