"""`python -m toolkit latency|pitfalls`: JSON contract and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from toolkit.__main__ import main
from toolkit.cli.common import int_at_least

pytestmark = pytest.mark.filterwarnings("ignore::toolkit.timing.LatencyWarning")


def cli(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_latency_json(capsys):
    rc, out, _ = cli(capsys, "latency", "--model", "tiny-gpt2", "--device", "cpu", "--json", "--max-time", "0.3",
                     "--threads", "1")  # one thread: the shared test machine is oversubscribed
    assert rc == 0
    d = json.loads(out)
    for key in ["median_ms", "mean_ms", "p99_ms", "ci95_ms", "n_samples", "warmup", "env", "samples_ms"]:
        assert key in d
    lo, hi = d["ci95_ms"]
    assert d["n_samples"] >= 10 and lo <= d["median_ms"] <= hi
    assert set(d["warmup"]) >= {"count", "first_call_ms"} and d["warmup"]["count"] >= 3
    assert d["model"] == "tiny-gpt2" and d["batch_size"] == 1 and d["env"]["torch"] == torch.__version__


def test_latency_table(capsys):
    rc, out, _ = cli(capsys, "latency", "--model", "tiny-resnet", "--device", "cpu", "--batch-size", "2",
                     "--dtype", "bfloat16", "--threads", "1", "--max-time", "0.2")
    assert rc == 0
    assert "tiny-resnet, batch 2, bfloat16 on cpu" in out and "median" in out and "95% CI" in out


def test_pitfalls_json_and_table(capsys):
    rc, out, _ = cli(capsys, "pitfalls", "--model", "tiny-gpt2", "--device", "cpu", "--json", "--max-time", "0.2",
                     "--threads", "1")
    assert rc == 0
    d = json.loads(out)
    assert [row["pitfall"] for row in d["pitfalls"]][:2] == ["copy_in_timed_region", "no_warmup"]
    assert d["pitfalls"][0]["naive_ms"] is None  # NaN -> null: not applicable on CPU
    assert d["correct"]["n_samples"] >= 10
    rc, out, _ = cli(capsys, "pitfalls", "--model", "tiny-gpt2", "--device", "cpu", "--max-time", "0.2", "--threads", "1")
    assert rc == 0 and "not applicable on CPU" in out and "error" in out and "relative_error" not in out


@pytest.mark.parametrize("argv, message", [
    (["latency", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["pitfalls", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["latency", "--model", "tiny-gpt2", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["latency", "--model", "tiny-gpt2", "--batch-size", "x"], "--batch-size: expected an integer"),
    (["latency", "--model", "tiny-gpt2", "--device", "tpu"], "unknown device 'tpu'"),
    (["latency", "--model", "tiny-gpt2", "--dtype", "int8"], "invalid choice"),
    (["latency", "--model", "tiny-gpt2", "--max-time", "-1"], "--max-time must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_int_at_least_names_its_bound():
    import argparse

    at_least_2 = int_at_least(2)
    assert at_least_2("2") == 2 and at_least_2(" 7 ") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 2, got 1"):
        at_least_2("1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got '2.5'"):
        at_least_2("2.5")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_line(capsys):
    rc, _, err = cli(capsys, "latency", "--model", "tiny-gpt2", "--device", "cuda")
    assert rc == 2 and err == "error: device 'cuda' requested but no CUDA GPU is available (use --device cpu)\n"


def test_real_process_exit_code():
    p = subprocess.run([sys.executable, "-m", "toolkit", "latency", "--model", "no-such-model"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: unknown model 'no-such-model'") and p.stderr.count("\n") == 1
