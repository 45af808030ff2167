"""compare(a, b): interleaved rounds, the Hodges-Lehmann ratio and its CI, the verdict; checked by simulation.

The simulations run the real ``compare`` loop on a fake clock: each call advances the
clock by a latency drawn from a noise model (log-normal noise, a slow drift of the
machine shared by both sides, rare 1.5-3x outliers), seeded, so every run is identical.
"""

import math
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from toolkit.errors import ToolkitError
from toolkit.machine_state import CpuSnapshot
from toolkit.timing import (
    EQUIVALENCE_MARGIN,
    Comparison,
    LatencyResult,
    LatencyWarning,
    compare,
    measure_latency,
    shift_estimate,
    warning_lines,
)


class NoisyPair:
    """Two callables on one fake clock: latency = base x ratio x drift(t) x lognormal(sigma), rare outliers."""

    def __init__(self, seed, ratio=1.0, base_ms=10.0, sigma=0.05, drift=0.03, period_s=1.0, outliers=0.02,
                 trend=0.0):
        self.rng = np.random.default_rng(seed)
        self.now = 0
        self.ratio, self.base, self.sigma, self.drift, self.period, self.outliers, self.trend = (
            ratio, base_ms, sigma, drift, period_s, outliers, trend)
        self.phase = self.rng.uniform(0, 2 * math.pi)
        self.log = []

    def clock(self) -> int:
        return self.now

    def _call(self, scale: float) -> None:
        t = self.now / 1e9
        drift = (1 + self.drift * math.sin(2 * math.pi * t / self.period + self.phase)) * (1 + self.trend * t)
        ms = self.base * scale * drift * math.exp(self.rng.normal(0, self.sigma))
        if self.rng.random() < self.outliers:
            ms *= self.rng.uniform(1.5, 3.0)
        self.now += int(ms * 1e6)

    def a(self) -> None:
        self.log.append("a")
        self._call(1.0)

    def b(self) -> None:
        self.log.append("b")
        self._call(self.ratio)


def idle_cpu(clock):
    def snap():
        t = clock() / 1e9
        return CpuSnapshot(wall_s=t, process_s=t, thread_s=t, busy_s=t, cpus=2, load_1m=0.2)

    return snap


def run_compare(pair: NoisyPair, **kw) -> Comparison:
    opts = dict(device="cpu", clock=pair.clock, synchronizer=lambda: None, threads=1, nvml=False,
                cpu_snapshot=idle_cpu(pair.clock))
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        return compare(pair.a, pair.b, **opts)


def verdicts(ratio: float, seeds, **model) -> Counter:
    return Counter(run_compare(NoisyPair(seed, ratio=ratio, **model)).verdict for seed in seeds)


# --- error rates at the default budget, by simulation


def test_a_against_a_rarely_gives_a_wrong_verdict():
    """A=A: a "faster" or "slower" verdict is a false alarm; at most 5% of comparisons (400 simulated)."""
    counts = verdicts(1.0, range(400))
    wrong = counts["faster"] + counts["slower"]
    assert wrong / 400 <= 0.05, counts
    # with this much noise (5% per call) a 10-round budget often cannot prove equality ("inconclusive");
    # with 2% noise it says "same"
    quiet = verdicts(1.0, range(100), sigma=0.02)
    assert quiet["same"] >= 95 and quiet["faster"] + quiet["slower"] <= 5, quiet


@pytest.mark.parametrize("ratio, expected", [(1.03, "slower"), (1 / 1.03, "faster")])
def test_a_true_three_percent_difference_is_found(ratio, expected):
    """B 3% slower (or faster) than A: found in at least 95% of comparisons at the default budget."""
    counts = verdicts(ratio, range(1000, 1200))
    assert counts[expected] / 200 >= 0.95, counts
    assert counts["same"] == 0 and counts["faster" if expected == "slower" else "slower"] == 0


def test_the_default_budget_is_what_the_simulation_used():
    r = run_compare(NoisyPair(0))
    assert len(r.round_sizes) == 10 and all(a >= 10 and b >= 10 for a, b in r.round_sizes)
    assert 100 <= r.a.n_samples <= 120 and r.a.options["rounds"] == 10  # 10 ms calls: 10-11 a round


def test_interleaving_cancels_a_drift_that_fools_back_to_back_timing():
    # the machine slows down by 30% a second (a GPU heating up, a neighbour starting work)
    c = run_compare(NoisyPair(7, trend=0.3, sigma=0.02, drift=0.0, outliers=0.0))
    assert c.verdict in ("same", "inconclusive") and abs(c.ratio - 1) < 0.02
    pair = NoisyPair(7, trend=0.3, sigma=0.02, drift=0.0, outliers=0.0)  # the naive way: all of A, then all of B
    kw = dict(device="cpu", clock=pair.clock, synchronizer=lambda: None, threads=1, min_time_s=1.0,
              target_rel_ci=0.0, max_samples=100, cpu_snapshot=idle_cpu(pair.clock))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatencyWarning)
        a, b = measure_latency(pair.a, **kw), measure_latency(pair.b, **kw)
    assert b.median_ms / a.median_ms > 1.2  # a 20%+ "slow-down" that is only the drift


def test_rounds_alternate_the_order():
    pair = NoisyPair(3, sigma=0.0, drift=0.0, outliers=0.0)
    c = run_compare(pair, rounds=4, round_time_s=0.0, min_round_calls=2, min_warmup=10, max_warmup=10)
    timed = "".join(pair.log[20:])  # after 10 warm-up calls of each side
    assert timed == "aabb" + "bbaa" + "aabb" + "bbaa"
    assert c.round_sizes == ((2, 2),) * 4 and c.rounds_of("a") == [0, 0, 1, 1, 2, 2, 3, 3]


# --- the statistics


def test_shift_estimate_matches_brute_force_and_scipy():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 1.0, size=23)
    y = rng.normal(0.4, 1.0, size=31)
    d = np.sort(np.subtract.outer(y, x).ravel())
    est, lo, hi = shift_estimate(x, y, 0.95)
    assert est == pytest.approx(np.median(d), abs=1e-9)
    n = len(d)
    k = int(math.floor(n / 2 - 1.959964 * math.sqrt(23 * 31 * (23 + 31 + 1) / 12)))
    assert lo == pytest.approx(d[k - 1], abs=1e-9) and hi == pytest.approx(d[n - k], abs=1e-9)
    # the interval inverts the rank test: 0 is outside the 95% CI exactly when p < 0.05 (up to the approximation)
    p = mannwhitneyu(y, x, alternative="two-sided").pvalue
    assert (lo > 0 or hi < 0) == (p < 0.05)


def test_ratio_of_scaled_copies_is_exact():
    base = list(np.random.default_rng(2).lognormal(0, 0.05, size=200) * 10)
    c = Comparison.from_samples(base, [1.05 * x for x in base])
    assert c.ratio == pytest.approx(1.05, rel=1e-9) and c.ratio_of_medians == pytest.approx(1.05)
    lo, hi = c.ci
    assert lo < 1.05 < hi and c.verdict == "slower" and c.p_value < 0.05


@pytest.mark.parametrize("scale, expected", [(1.0, "same"), (1.005, "same"), (0.9, "faster"), (1.1, "slower")])
def test_verdict_rules_with_many_samples(scale, expected):
    base = np.random.default_rng(4).lognormal(0, 0.02, size=2000) * 10
    other = np.random.default_rng(8).lognormal(0, 0.02, size=2000) * 10 * scale
    assert Comparison.from_samples(base, other).verdict == expected


def test_too_few_samples_are_inconclusive():
    c = Comparison.from_samples([10.0, 11.0, 9.0, 12.0], [10.5, 9.5, 11.5, 10.0])
    assert c.verdict == "inconclusive" and "measure more rounds" in c.summary
    assert Comparison.from_samples([], [1.0]).verdict == "inconclusive"


def test_margin_sets_the_equivalence_band():
    assert EQUIVALENCE_MARGIN == 0.02
    base = np.random.default_rng(4).lognormal(0, 0.02, size=2000) * 10
    c = Comparison.from_samples(base, base * 1.01)
    assert c.verdict == "same" and c.band == pytest.approx((1 / 1.02, 1.02))
    tight = Comparison.from_samples(base, base * 1.01, margin=0.002)
    assert tight.verdict == "slower"


# --- the value


def test_comparison_is_a_value():
    c = run_compare(NoisyPair(11, ratio=1.1), label_a="fp32", label_b="bf16")
    assert c.verdict == "slower" and c.label_a == "fp32" and c.label_b == "bf16"
    back = Comparison.from_json(c.to_json())
    assert back == c and back.ratio == c.ratio and back.ci == c.ci and back.verdict == c.verdict
    d = c.to_dict()
    for key in ["verdict", "ratio", "ci", "p_value", "margin", "round_sizes", "warnings", "a", "b", "summary"]:
        assert key in d
    row = c.to_dataframe()
    assert len(row) == 1 and row.loc[0, "verdict"] == "slower" and row.loc[0, "ratio"] == c.ratio
    long = c.to_dataframe(samples=True)
    assert list(long.columns) == ["side", "label", "round", "index", "latency_ms"]
    assert (long.side == "A").sum() == c.a.n_samples and long["round"].max() == 9
    text = repr(c)
    assert "verdict: SLOWER" in text and "bf16 is slower than fp32" in text and "Mann-Whitney" in text


def test_contention_reaches_the_comparison_once():
    pair = NoisyPair(1)

    def busy():
        t = pair.clock() / 1e9
        return CpuSnapshot(wall_s=t, process_s=t, thread_s=t, busy_s=t * 2.5, cpus=2, load_1m=3.4)

    with pytest.warns(LatencyWarning, match="other work is using the CPU"):
        c = compare(pair.a, pair.b, device="cpu", clock=pair.clock, synchronizer=lambda: None, threads=2,
                    cpu_snapshot=busy)
    cpu = [w for w in c.warnings if "other work is using the CPU" in w]
    assert len(cpu) == 1 and "load 3.4" in cpu[0] and "--threads 1" in cpu[0]
    assert c.unreliable and warning_lines(c) == c.warnings and warning_lines(c.to_dict()) == c.warnings
    assert not c.to_dataframe().loc[0, "reliable"]


def test_budget_cap_stops_rounds_with_a_note():
    c = run_compare(NoisyPair(2), max_time_s=0.5)
    assert len(c.round_sizes) < 10 and any("budget ran out" in n for n in c.notes)


def test_bad_arguments():
    with pytest.raises(ToolkitError, match="two callables"):
        compare(lambda: None, 3)
    with pytest.raises(ToolkitError, match="rounds"):
        compare(lambda: None, lambda: None, rounds=0)
    with pytest.raises(ToolkitError, match="margin"):
        compare(lambda: None, lambda: None, margin=0.0)
    with pytest.raises(ToolkitError, match="confidence"):
        compare(lambda: None, lambda: None, confidence=1.0)


def test_latency_result_samples_feed_a_comparison():
    a = LatencyResult(samples_ms=(10.0, 10.1, 9.9) * 20, label="old")
    b = LatencyResult(samples_ms=(12.0, 12.1, 11.9) * 20, label="new")
    c = Comparison(a, b)
    assert c.verdict == "slower" and c.ratio == pytest.approx(1.2, rel=0.01)
    assert isinstance(c.to_dataframe(), pd.DataFrame)


@pytest.mark.gpu
def test_compare_on_the_gpu():
    import torch

    a = torch.randn(2048, 2048, device="cuda")
    big = torch.randn(2896, 2896, device="cuda")  # ~2.8x the work
    same = compare(torch.mm, torch.mm, args_a=(a, a), args_b=(a, a), rounds=6)
    assert same.verdict in ("same", "inconclusive") and same.a.options["method"] == "cuda_event"
    slower = compare(torch.mm, torch.mm, args_a=(a, a), args_b=(big, big), rounds=6)
    assert slower.verdict == "slower" and 2.0 < slower.ratio < 4.0


# --- the command line


def test_cli_compare_json(capsys):
    import json

    from toolkit.__main__ import main

    rc = main(["compare", "--model", "tiny-resnet", "--a", "batch-size=1", "--b", "batch-size=2", "--device", "cpu",
               "--threads", "1", "--rounds", "2", "--round-time", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["config_a"] == {"model": "tiny-resnet", "batch_size": 1, "dtype": "float32"}
    assert out["config_b"]["batch_size"] == 2 and out["verdict"] in ("faster", "slower", "same", "inconclusive")
    assert Comparison.from_dict(out).round_sizes == tuple(tuple(r) for r in out["round_sizes"])
    assert len(out["round_sizes"]) == 2 and "warnings" in out and out["label_b"] == "tiny-resnet batch 2 float32"


@pytest.mark.parametrize("argv, message", [
    (["--a", "batch=2"], "--a: cannot read 'batch=2'"),
    (["--b", "dtype=int8"], "--b: dtype must be one of"),
    (["--model-a", "nope"], "--model-a: unknown model 'nope'"),
    (["--a", "batch-size=0"], "--a: batch-size must be an integer >= 1"),
    (["--margin", "2"], "--margin must be in (0, 1)"),
])
def test_cli_compare_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    from toolkit.__main__ import main

    assert main(["compare", "--model", "tiny-resnet", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
