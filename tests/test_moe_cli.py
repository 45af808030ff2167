"""`python -m toolkit moe`: JSON keys, hit-rate extremes, beam streaming, and one-line errors (exit 2)."""

import json

import numpy as np
import pytest

from toolkit.__main__ import main
from toolkit.moe import streaming
from toolkit.moe.policies import save_placement

BASE = ["moe", "--preset", "tiny-mixtral", "--device", "cpu", "--prompt-tokens", "8", "--warmup", "0"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


def run_json(capsys, *args):
    assert main([*BASE, *args, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_json_has_the_documented_keys(capsys, calibration):
    r, _ = run_json(capsys, "--gpu-experts", "3", "--new-tokens", "8", "--calibration", calibration)
    for key in ("prefill_ms", "decode_tokens_per_s", "end_to_end_ms", "gpu_experts", "cost_model", "env"):
        assert key in r
    assert {"median", "p90", "mean", "samples"} <= set(r["decode_ms"])
    assert {"prefill", "decode", "per_layer", "per_expert"} <= set(r["hit_rate"])
    assert r["gpu_experts"] == 3 and r["new_tokens"] == 8 and len(r["decode_ms"]["samples"]) == 7
    assert 0.0 <= r["hit_rate"]["decode"] <= 1.0 and len(r["hit_rate"]["per_layer"]["decode"]) == 2
    assert r["cost_model"]["copy_ms"] == 3.0 and r["env"]["device"] == "cpu"
    assert r["cpu_expert_calls"] + r["copy_expert_calls"] > 0


@pytest.mark.parametrize("n, rate", [("all", 1.0), ("16", 1.0), ("0", 0.0)])
def test_hit_rate_extremes(capsys, calibration, n, rate):
    r, _ = run_json(capsys, "--gpu-experts", n, "--new-tokens", "4", "--calibration", calibration)
    assert r["hit_rate"]["prefill"] == rate and r["hit_rate"]["decode"] == rate
    assert r["gpu_experts"] == (0 if rate == 0 else 16)
    if rate == 1.0:
        assert r["cpu_expert_calls"] == 0 and r["bytes_copied"] == 0


def test_beam_stream_prints_progressively_and_matches(capsys, calibration, monkeypatch):
    printers = []
    real = streaming.TextPrinter

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            printers.append(self)

    monkeypatch.setattr(streaming, "TextPrinter", Spy)
    args = ["--gpu-experts", "5", "--new-tokens", "16", "--beams", "4", "--calibration", calibration]
    streamed, err = run_json(capsys, *args, "--stream")
    plain, _ = run_json(capsys, *args)
    assert err.strip() == streamed["text"][0] == plain["text"][0]
    assert streamed["sequences"] == plain["sequences"]
    assert len(printers[0].chunks) >= 2  # text arrived in pieces, not once at the end


def test_table_output_and_out_file(capsys, calibration, tmp_path):
    out = tmp_path / "r.json"
    assert main([*BASE, "--gpu-experts", "8", "--new-tokens", "3", "--calibration", calibration,
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hit rate" in text and "prefill (time to first token)" in text and "8/16 experts" in text
    saved = json.loads(out.read_text())
    assert saved["gpu_experts"] == 8 and "command" in saved["provenance"]


def test_policy_trace_placement(capsys, calibration, tmp_path):
    placement = np.zeros((2, 8), dtype=bool)
    placement[:, :2] = True
    path = tmp_path / "placement.json"
    save_placement(path, placement)
    r, _ = run_json(capsys, "--placement", str(path), "--new-tokens", "3", "--calibration", calibration)
    assert r["gpu_experts"] == 4
    r, _ = run_json(capsys, "--gpu-experts", "4", "--policy", "lru", "--trace", "synthetic-mixtral",
                    "--batch-size", "2", "--new-tokens", "3", "--calibration", calibration)
    assert r["policy"] == "lru" and r["batch_size"] == 2 and r["hit_rate"]["decode"] is not None


@pytest.mark.parametrize("beams", ["1", "3"])
def test_sampling(capsys, calibration, beams):
    args = ["--gpu-experts", "6", "--new-tokens", "5", "--sample", "--temperature", "0.7", "--top-k", "20",
            "--beams", beams, "--seed", "3", "--calibration", calibration]
    a, _ = run_json(capsys, *args)
    b, _ = run_json(capsys, *args)
    assert a["do_sample"] and a["mode"] == ("sample" if beams == "1" else "beam_sample")
    assert a["sequences"] == b["sequences"] and a["new_tokens"] == 5  # seeded: reproducible


@pytest.mark.parametrize("args, message", [
    (["--preset", "no-such-model"], "unknown MoE preset"),
    (["--gpu-experts", "17"], "more than the model has"),
    (["--beams", "0"], "--beams"),
    (["--gpu-experts", "many"], "--gpu-experts"),
    (["--stream", "--batch-size", "2"], "--batch-size 1"),
    (["--calibration", "CORRUPT"], "not valid JSON"),
    (["--calibration", "MALFORMED"], "malformed"),
    (["--placement", "WRONG_SHAPE"], "placement"),
    (["--trace", "no-such-trace"], "not found"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({"version": 1, "models": {"k": {"cpu_tokens": [1]}}}))
    wrong = tmp_path / "wrong.json"
    save_placement(wrong, np.ones((3, 8), dtype=bool))
    args = [{"CORRUPT": str(corrupt), "MALFORMED": str(malformed), "WRONG_SHAPE": str(wrong)}.get(a, a) for a in args]
    try:
        code = main([*BASE, *args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_memory_plan_resolves_auto_and_rejects_too_many(calibration, monkeypatch):
    """The GPU path's planning step (``MoESession.memory_plan``), run on the CPU with a fake amount of free memory."""
    from toolkit.errors import ToolkitError
    from toolkit.moe import memory
    from toolkit.moe.run import MoESession

    session = MoESession(device="cpu", prompt_tokens=8, new_tokens=8, beams=2, calibration=calibration)
    one = 3 * 64 * 128 * 4  # bytes of one tiny expert
    base = memory.plan_memory(session.model, 8, 8, beams=2, device="cpu", mem_info=lambda: (0, 1 << 40),
                              safety_bytes=0)
    overhead = base.kv_cache_bytes + base.activation_bytes + base.staging_bytes
    monkeypatch.setattr(memory, "default_safety_bytes", lambda total: 0)

    def free():
        return overhead + 5 * one + one // 2, 1 << 40

    n, plan = session.memory_plan("auto", mem_info=free)
    assert n == plan.max_gpu_experts == 5
    assert session.memory_plan(4, mem_info=free)[0] == 4
    with pytest.raises(ToolkitError, match="at most 5 fit"):
        session.memory_plan(6, mem_info=free)
    assert session.resolve_gpu_experts("auto") == (16, None)  # on a CPU both tiers are host memory: all "fit"


@pytest.mark.parametrize("scheme", ["fiddler-serial", "lru-copy"])
def test_scheme_routing_and_repeats(capsys, calibration, scheme):
    r, _ = run_json(capsys, "--gpu-experts", "4", "--new-tokens", "4", "--scheme", scheme, "--routing", "uniform",
                    "--repeats", "2", "--calibration", calibration)
    assert r["scheme"] == scheme and r["routing"] == "uniform" and r["trace"] is None
    assert r["engine"]["decision"] == {"fiddler-serial": "fiddler", "lru-copy": "copy"}[scheme]
    assert len(r["decode_ms"]["samples"]) == 2 * 3 and len(r["prefill_samples_ms"]) == 2  # repeats pooled
    assert r["settings"]["repeats"] == 2


def test_default_routing_is_the_synthetic_mixtral_trace(capsys, calibration):
    r, _ = run_json(capsys, "--gpu-experts", "4", "--new-tokens", "2", "--calibration", calibration)
    assert r["routing"] == r["trace"] == "synthetic-mixtral"
    r, _ = run_json(capsys, "--gpu-experts", "4", "--new-tokens", "2", "--routing", "model",
                    "--calibration", calibration)
    assert r["routing"] == "model" and r["trace"] is None
