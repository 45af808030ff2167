"""The host-node benchmark's CPU side: its host function computes the layer's experts as torch does, and a
machine without a GPU gets one line and exit code 2."""

import ctypes
import json

import pytest
import torch
from benchmark_scripts import load_benchmark, run_benchmark

from toolkit.moe import cpu_gemv

hn = load_benchmark("host_nodes")


@pytest.mark.skipif(not cpu_gemv.usable(), reason=f"no CPU kernel here: {cpu_gemv.why_not()}")
@pytest.mark.parametrize("experts", [[1], [3, 2]])
def test_host_function_matches_torch(experts):
    torch.manual_seed(0)
    lib = hn.library()
    layers = hn.Layers(experts, threads=2, hidden=64, inter=96, pin=False)
    for L, job in enumerate(layers.jobs):
        layers.x_host[L].copy_(torch.randn(64, dtype=torch.bfloat16))
        lib.host_nodes_layer(ctypes.byref(job))
        want = hn.reference_layer(layers.x_host[L], layers.weights[L])
        got = layers.y_host[L]
        assert got.abs().max() > 0
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-2)
        assert job.calls == 1 and job.busy_s > 0


def test_bad_expert_counts_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        hn.parse_args(["--experts", "2,x"])
    assert e.value.code == 2
    assert "whole numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hn.parse_args(["--experts", "0,1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    proc = run_benchmark("host_nodes", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: host_nodes needs a CUDA GPU (host functions in a CUDA graph)"
    assert json.loads((tmp_path / "host_nodes.json").read_text())["status"].startswith("error: host_nodes needs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_captured_step_equals_the_python_chain(tmp_path):
    """Two layers of Mixtral-sized CPU experts as host nodes in a CUDA graph: the same result as per-layer
    Python, and every mode timed."""
    proc = run_benchmark("host_nodes", tmp_path, "--experts", "1,1", "--rounds", "1", "--steps", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "host_nodes.json").read_text())
    assert rec["status"] == "complete"
    assert rec["graph_vs_python_max_abs_diff"] == 0.0
    assert rec["cpu_layer_vs_torch_max_abs_diff"] < 0.05
    for mode in ("cpu-only", "python", "graph"):
        assert rec["modes"][mode]["median_ms"] > 0
        assert rec["modes"][mode]["cpu_experts_ms"] > 0
