"""The captured-step probe's arithmetic: a profiled step's GPU events cut into layers and segments."""

import math

import pytest
from benchmark_scripts import load_benchmark

from toolkit.profiling import Event

cs = load_benchmark("captured_step")


def layer(t, copies=(1.0, 3.0), gpu_end=3.4, fn=(0.3, 3.5), up_at=3.7):
    """One layer's events from t: 0.5 ms of dense kernels, the token out, the copies and rows, the sum back."""
    return [Event("kernel", t, t + 0.5, "attention"), Event("d2h", t + 0.5, t + 0.52, "Memcpy DtoH"),
            Event("d2h", t + 0.52, t + 0.55, "Memcpy DtoH"),
            Event("kernel", t + 0.55 + copies[0], t + 0.55 + copies[1], "memcpyDtoD2D_aligned"),
            Event("kernel", t + 0.55 + gpu_end - 0.2, t + 0.55 + gpu_end, "expert_down_kernel"),
            Event("h2d", t + 0.55 + up_at, t + 0.55 + up_at + 0.01, "Memcpy HtoD")], \
        (t + 0.55 + fn[0], t + 0.55 + fn[1])


def test_a_step_is_cut_at_each_layers_copies_and_the_host_functions_stamps():
    a, sa = layer(0.0)
    b, sb = layer(5.0, gpu_end=4.0)  # the GPU side ends after the sum came back: the layer waits for it
    head = [Event("h2d", -0.2, -0.19, "Memcpy HtoD"), Event("kernel", -0.1, 0.0, "embedding")]  # no token out
    layers = cs.layer_segments(head + a + b, [sa, sb])
    assert len(layers) == 2
    first = layers[0]
    assert first["pre"] == pytest.approx(0.55 + 0.19) and first["window"] == pytest.approx(3.7)
    assert first["copies"] == pytest.approx(2.0) and first["gpu_after_copies"] == pytest.approx(0.4)
    assert (first["fn_start"], first["fn_busy"], first["fn_end"]) == pytest.approx((0.3, 3.2, 0.2))
    assert first["wait_gpu"] == 0
    assert layers[1]["wait_gpu"] == pytest.approx(4.0 - 3.7 - 0.01)
    assert layers[1]["pre"] == pytest.approx(5.55 - (0.55 + 3.71))
    s = cs.step_summary(layers, 11.0)
    assert s["layers"] == 2 and s["window"] == pytest.approx(7.4)
    assert s["outside_layers"] == pytest.approx(11.0 - s["pre"] - s["window"] - s["wait_gpu"])


def test_without_stamps_the_host_functions_segments_are_unknown():
    a, _ = layer(0.0)
    (only,) = cs.layer_segments(a)
    assert math.isnan(only["fn_busy"]) and only["window"] == pytest.approx(3.7)
    assert cs.layer_segments([]) == []



def test_copies_on_the_copy_engines_count_as_copies_and_do_not_cut_layers():
    """Copies on the copy engines show as long host -> device copies: they are the layer's copies, and only the
    short copy of the CPU's sum ends a layer."""
    a, sa = layer(0.0)
    dma = [Event("h2d", e.start, e.end, "Memcpy HtoD (Pinned -> Device)") if e.name.startswith("memcpy") else e
           for e in a]
    (only,) = cs.layer_segments(dma, [sa])
    assert only["copies"] == pytest.approx(2.0) and only["window"] == pytest.approx(3.7)


def test_bad_settings_are_one_line_and_a_nonzero_exit(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check, to the settings
    assert cs.main(["--preset", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captured_step: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
