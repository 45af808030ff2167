"""One path for "run an offloaded MoE model and measure it": the CLI, ``run_moe``, the benchmarks and the
report all hand ``MoESettings`` to ``MoESession`` and generate with the same settings.

Spies record what reaches ``MoESession`` (its resolved settings), ``MoESession.run`` (the per-run
overrides) and ``generate`` (the keyword arguments of every warm-up and measured generation), so the
tests compare what each entry point really does, not what it says it does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from toolkit.__main__ import main
from toolkit.errors import ToolkitError
from toolkit.moe import generation
from toolkit.moe.costs import CostModel, save_cost_model
from toolkit.moe.presets import moe_blocks
from toolkit.moe.run import MoESession, MoESettings, run_moe

ROOT = Path(__file__).resolve().parents[1]
# the settings a benchmark may choose itself (model, budget, routing, tokens, machine); the rest are the defaults
BENCHMARK_CHOICES = {"preset", "layers", "gpu_experts", "routing", "threads", "prompt_tokens", "new_tokens", "device"}
GENERATION_FIELDS = ("beams", "batch_size", "sample", "temperature", "top_k", "allow_eos", "warmup_tokens",
                     "repeats", "seed", "scheme", "policy")


class Stop(Exception):
    """Raised by the settings spy to stop an entry point once it has handed over its settings."""


class Spy:
    """Records sessions built, runs asked for and generations made; ``stop`` ends the entry point at the build."""

    def __init__(self, monkeypatch, stop: bool = False):
        self.sessions: list[MoESettings] = []
        self.runs: list[dict] = []  # the keyword arguments of each MoESession.run (scheme as its name)
        self.generations: list[dict] = []  # generate() kwargs, with the scheme of the run they belong to
        self._scheme = None
        real_init, real_run, real_generate = MoESession.__init__, MoESession.run, generation.generate
        spy = self

        def init(session, settings=None, **kw):
            if stop:
                from toolkit.moe.run import resolve_settings

                spy.sessions.append(resolve_settings(settings, **{k: v for k, v in kw.items()
                                                                  if k not in ("model", "cost_model", "on_build")}))
                raise Stop
            real_init(session, settings, **kw)
            spy.sessions.append(session.settings)

        def run(session, gpu_experts=None, **kw):
            scheme = kw.get("scheme")
            spy._scheme = getattr(scheme, "name", scheme) or session.settings.scheme
            spy.runs.append({"gpu_experts": gpu_experts, **kw, "scheme": spy._scheme})
            try:
                return real_run(session, gpu_experts, **kw)
            finally:
                spy._scheme = None

        def generate(model, input_ids, attention_mask=None, **kw):
            spy.generations.append({"scheme": spy._scheme, **{k: v for k, v in kw.items()
                                                               if k not in ("streamer", "tokenizer")}})
            return real_generate(model, input_ids, attention_mask, **kw)

        monkeypatch.setattr(MoESession, "__init__", init)
        monkeypatch.setattr(MoESession, "run", run)
        monkeypatch.setattr(generation, "generate", generate)

    def generate_settings(self, scheme: str | None = "ours", beams: int = 1) -> set:
        """The distinct generate() settings of one scheme's runs, the token count left out (it is per run)."""
        return {tuple(sorted((k, v) for k, v in g.items() if k not in ("max_new_tokens", "scheme")))
                for g in self.generations if g["scheme"] == scheme and g["num_beams"] == beams}

    def warmup_tokens(self, scheme: str | None = "ours", beams: int = 1) -> set:
        """The token counts of one scheme's generations (warm-up and measured) at one beam width."""
        return {g["max_new_tokens"] for g in self.generations if g["scheme"] == scheme and g["num_beams"] == beams}


def changed(settings: MoESettings) -> set[str]:
    """The fields of ``settings`` that differ from ``MoESettings()``."""
    default = MoESettings().to_dict()
    return {k for k, v in settings.to_dict().items() if v != default[k]}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))


# -- the CLI ---------------------------------------------------------------------------------------------

def test_cli_with_no_options_hands_over_exactly_the_defaults(monkeypatch):
    spy = Spy(monkeypatch, stop=True)
    with pytest.raises(Stop):
        main(["moe"])
    assert spy.sessions == [MoESettings()]


def test_cli_options_change_only_their_setting(monkeypatch):
    spy = Spy(monkeypatch, stop=True)
    with pytest.raises(Stop):
        main(["moe", "--new-tokens", "5", "--scheme", "lru-copy", "--routing", "uniform", "--repeats", "2",
              "--warmup", "0", "--gpu-experts", "3", "--device", "cpu"])
    assert spy.sessions == [MoESettings(new_tokens=5, scheme="lru-copy", routing="uniform", repeats=2,
                                        warmup_tokens=0, gpu_experts=3, device="cpu")]
    with pytest.raises(Stop):
        main(["moe", "--trace", "synthetic-mixtral", "--gpu-experts", "all"])
    assert spy.sessions[-1] == MoESettings(routing="synthetic-mixtral", gpu_experts="all")


def test_cli_and_run_moe_generate_alike(monkeypatch, capsys, calibration):
    spy = Spy(monkeypatch)
    assert main(["moe", "--device", "cpu", "--calibration", calibration, "--new-tokens", "4", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    cli_generate, cli_tokens = spy.generate_settings(), spy.warmup_tokens()
    # the session's settings decide: the CLI overrides nothing per run (a streamer or progress hook is no setting)
    assert [{k: v for k, v in r.items() if k not in ("streamer", "on_generation")} for r in spy.runs] == [
        {"gpu_experts": None, "scheme": "ours"}]
    spy.generations.clear()
    result = run_moe(device="cpu", calibration=calibration, new_tokens=4)
    assert spy.generate_settings() == cli_generate and spy.warmup_tokens() == cli_tokens == {4}
    assert dict(next(iter(cli_generate))) == {"num_beams": 1, "do_sample": False, "ignore_eos": True, "seed": 0}
    assert cli["settings"] == result.settings.to_dict() and cli["warmup"]["rounds"] >= 2
    assert cli["routing"] == result.routing == "synthetic-mixtral"


# -- the benchmarks --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_decode_run(tmp_path_factory):
    """benchmarks/moe_decode.py --quick --device cpu --rounds 2, with the spies on; (spy, record, seconds)."""
    import time

    mp = pytest.MonkeyPatch()
    mp.setenv("TOOLKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("moe_decode")
    bench = load_benchmark("moe_decode")
    # the host's ceiling between rounds needs a GPU; a stand-in reads 100, 102, 104, ... GB/s, one a measurement
    probes = iter(range(1000))

    class Paths:
        def measure(self):
            gbs = 100.0 + 2 * next(probes)
            return {"both_paths_gbs": gbs, "read_gbs": gbs - 10, "host_gbs": gbs}

    mp.setattr(bench, "host_paths", lambda cm, device: (Paths(), None))
    engine_installed = []  # at each float32 probe: was an engine's experts module in the model?

    def exact(self, session, routing):
        engine_installed.append(any(type(b.experts).__name__ == "OffloadedExperts" for b in moe_blocks(session.model)))

    mp.setattr(bench.Bench, "exact", exact)
    try:
        spy = Spy(mp)
        spy.exact_engine_installed = engine_installed
        t = time.perf_counter()
        assert bench.main(["--quick", "--device", "cpu", "--out", str(out), "--rounds", "2"]) == 0
        seconds = time.perf_counter() - t
    finally:
        mp.undo()
    return spy, json.loads((out / "moe_decode.json").read_text()), seconds


def test_moe_decode_ours_generates_as_the_cli_does(moe_decode_run):
    spy, record, seconds = moe_decode_run
    assert seconds < 45  # quick mode is a smoke test: well under a minute on a CI machine
    assert spy.sessions and all(changed(s) <= BENCHMARK_CHOICES for s in spy.sessions)
    assert {s.routing for s in spy.sessions} == {"uniform", "synthetic-mixtral"}
    for s in spy.sessions:
        assert all(getattr(s, f) == getattr(MoESettings(), f) for f in GENERATION_FIELDS)
    assert dict(next(iter(spy.generate_settings("ours")))) == {"num_beams": 1, "do_sample": False,
                                                                "ignore_eos": True, "seed": 0}
    # warmed up like the CLI: warm-up generations as long as the measured ones
    assert spy.warmup_tokens("ours") == {record["settings"]["new_tokens"]}
    assert spy.warmup_tokens("ours", beams=record["settings"]["beams"]) == {record["settings"]["beam_tokens"]}
    assert all(r.get("warmup", True) for r in spy.runs)
    assert record["status"] == "complete"


def test_moe_decode_alternates_configurations_and_records_rounds(moe_decode_run):
    spy, record, _ = moe_decode_run
    compare = [(r["scheme"], r["gpu_experts"]) for r in spy.runs if r.get("beams") in (None, 1)][:20]
    assert compare[:10] == compare[10:20]  # round 1 of every compare configuration, then round 2
    assert len(set(compare[:10])) == 5  # 5 schemes x 2 routings, the same budget per scheme
    runs = [r for r in record["runs"] if "decode" in r]
    assert {r["kind"] for r in runs} == {"compare", "sweep", "ablation"}
    for r in runs:
        assert r["rounds"] == 2 and isinstance(r["anomalous"], bool) and r["anomalous"] == ("anomaly_reason" in r)
        d = r["decode"]
        assert {"tokens_per_s", "median_ms", "p90_ms", "mean_ms", "samples_ms", "bound", "measured_over_bound",
                "hit_rate"} <= set(d) and "ms" in r["prefill"]
        spread = d["rounds"]
        assert len(spread["values"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
        assert d["tokens_per_s"] == spread["values"][spread["median_round"]]
        assert r["check"]["pass"]
    ours = next(r for r in runs if r["kind"] == "compare" and r["scheme"] == "ours")
    assert ours["beam"]["steps_per_s"] > 0 and ours["beam"]["rounds"]["median"] > 0
    # the schedule of every run: round 1's choice (on a CPU: the engine's default, unmeasured), each round's
    for r in runs:
        assert {"picked", "candidates", "measured", "reason"} <= set(r["schedule"])
        assert r["decode"]["schedule"] == r["schedule"]["picked"]
    assert ours["schedule"]["picked"] == "inline" and "cpu device" in ours["schedule"]["reason"]
    # transformers' eager generate on the unmodified model, under the same replayed routings
    eager = [r for r in runs if r["scheme"] == "hf-eager"]
    assert {r["routing"] for r in eager} == {"uniform", "trace"} and all(r["budget"] == 16 for r in eager)
    assert all(r["schedule"]["picked"] == "unmodified" and r["decode"]["bound"] is None for r in eager)
    assert record["settings"]["total_experts"] == 16 and record["settings"]["rounds"] == 2


def test_moe_engine_quick_on_cpu(monkeypatch, tmp_path):
    spy = Spy(monkeypatch)
    assert load_benchmark("moe_engine").main(["--quick", "--device", "cpu", "--out", str(tmp_path),
                                              "--rounds", "2"]) == 0
    record = json.loads((tmp_path / "moe_engine.json").read_text())
    (session,) = spy.sessions
    assert changed(session) <= BENCHMARK_CHOICES and session.routing == "model"  # the reference's own router
    assert all(getattr(session, f) == getattr(MoESettings(), f) for f in GENERATION_FIELDS)
    assert record["settings"]["total_experts"] == 16 and record["status"] == "complete"
    assert [r["gpu_experts"] for r in record["runs"]] == [16, 0, 8]
    for r in [record["reference"], *record["runs"]]:
        assert {"decode_tokens_per_s", "prefill_ms", "decode_ms", "hit_rate", "sequences"} <= set(r["greedy"])
        assert r["rounds"]["done"] == 2 and len(r["rounds"]["greedy"]["values"]) == 2
    assert all(r["logits"]["pass"] and r["greedy_ids_equal"] for r in record["runs"])  # float32: same ids
    assert dict(next(iter(spy.generate_settings(None)))) == {"num_beams": 1, "do_sample": False,
                                                              "ignore_eos": True, "seed": 0}


# -- the report ----------------------------------------------------------------------------------------

def test_report_moe_experiment_hands_over_the_defaults(monkeypatch):
    """The report's MoE experiment (``toolkit.experiments``) builds its session from ``MoESettings`` too."""
    experiments = pytest.importorskip("toolkit.experiments")
    from toolkit.settings import settings_for

    spy = Spy(monkeypatch, stop=True)
    s = settings_for("cpu", quick=True)
    with pytest.raises(Stop):
        experiments.moe_experiment(s, device="cpu")
    (got,) = spy.sessions
    assert changed(got) <= {"layers", "policy", "prompt_tokens", "new_tokens", "device", "preset"}
    assert (got.preset, got.layers, got.policy, got.new_tokens) == (s.moe_preset, s.moe_layers, s.moe_policy,
                                                                     s.new_tokens)
    assert all(getattr(got, f) == getattr(MoESettings(), f) for f in GENERATION_FIELDS if f != "policy")


# -- the measurements the benchmarks take from the session -----------------------------------------------

def test_round_spread_picks_the_median_round_and_flags_disagreement():
    from toolkit.moe.run import round_spread

    s = round_spread([12.0, 10.0, 11.0])
    assert (s["median"], s["min"], s["max"], s["median_round"]) == (11.0, 10.0, 12.0, 2)
    assert s["spread"] == pytest.approx(2 / 11) and s["anomalous"] and "18%" in s["reason"]
    calm = round_spread([100.0, 104.0, 99.0, 101.0])
    assert not calm["anomalous"] and "reason" not in calm and calm["median_round"] == 0  # lower middle of 99, 100, 101, 104
    assert round_spread([5.0, None, float("nan")])["values"] == [5.0]
    assert not round_spread([5.0])["anomalous"]  # one round cannot disagree with itself
    assert round_spread([])["median"] is None


def test_summarize_rounds_keeps_the_median_round_and_names_the_measure_that_disagrees():
    from toolkit.moe.run import summarize_rounds

    def rnd(tps, prefill_ms):
        return {"decode": {"tokens_per_s": tps, "median_ms": 1e3 / tps}, "prefill": {"ms": prefill_ms}}

    measures = (("decode", "tokens_per_s"), ("prefill", "ms"), ("beam", "steps_per_s"))
    entry = {"anomaly_reason": "stale"}
    summarize_rounds(entry, [rnd(10.0, 100.0), rnd(12.0, 150.0), rnd(11.0, 101.0)], measures)
    assert entry["median_round"] == 2 and entry["rounds"] == 3 and "beam" not in entry  # no round had a beam
    assert entry["decode"]["tokens_per_s"] == 11.0 and entry["prefill"]["ms"] == 101.0  # one round's records
    assert entry["decode"]["rounds_median_ms"] == pytest.approx([100.0, 1e3 / 12, 1e3 / 11])
    assert entry["anomalous"] and entry["anomaly_reason"] == ("decode tokens_per_s: rounds differ by 18% of their "
                                                              "median (more than 10%); prefill ms: rounds differ by "
                                                              "50% of their median (more than 10%)")
    calm = {"anomaly_reason": "stale"}
    summarize_rounds(calm, [rnd(10.0, 100.0), rnd(10.1, 100.0)], measures)
    assert not calm["anomalous"] and "anomaly_reason" not in calm


def test_logits_check_passes_within_the_tolerance_of_the_largest_logit():
    import torch

    from toolkit.moe.run import logits_check

    ref = (torch.tensor([[4.0, -2.0]]), torch.tensor([[1.0, 3.0]]))
    got = (ref[0] + torch.tensor([[0.06, 0.0]]), ref[1])
    ok, tight = logits_check(got, ref, 0.02), logits_check(got, ref, 0.01)
    assert ok["max_abs_diff"] == pytest.approx(0.06) and ok["rel"] == pytest.approx(0.015)
    assert ok["pass"] and not tight["pass"] and tight["tolerance_rel"] == 0.01


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("costs") / "costs.json"
    save_cost_model(CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0, key="test"), path)
    with MoESession(device="cpu", routing="model", calibration=str(path), prompt_tokens=8, new_tokens=3,
                    warmup_tokens=2) as s:
        yield s


def test_measure_prefill_times_with_the_injected_clock(session):
    ticks = iter(range(1000))

    def clock():  # every reading 5 ms after the previous one
        return 0.005 * next(ticks)

    with session.offload("all") as engine:
        full = session.measure_prefill(engine, 12, repeats=3, clock=clock)
    with session.offload(0) as engine:
        none = session.measure_prefill(engine, 12, repeats=2, warm_tokens=4, clock=clock)
    assert full.samples_ms == pytest.approx((5.0, 5.0, 5.0)) and full.ms == pytest.approx(5.0)
    assert full.tokens == 12 and full.hit_rate == 1.0 and none.hit_rate == 0.0
    assert int(none.stats.activations["prefill"].sum()) == session.preset.layers * 12 * 2  # one sample, top-2
    assert full.to_dict()["samples_ms"] == list(full.samples_ms)


def test_probe_logits_of_the_engine_match_the_unmodified_model(session):
    from toolkit.moe.run import logits_error

    with session.unmodified() as model:
        ref = session.probe_logits(model)
    with session.offload(4) as engine:
        got = session.probe_logits(engine)
    assert ref[0].shape == (8 + 3, session.preset.vocab) and ref[1].shape == (2, session.preset.vocab)
    err = logits_error(got, ref)
    assert err["argmax_agreement"] == 1.0 and max(err["prefill_max_abs_diff"], err["decode_max_abs_diff"]) < 1e-4
    assert logits_error(ref, ref)["prefill_max_abs_diff"] == 0.0


def test_unmodified_run_and_shared_sessions(session):
    from toolkit.moe.run import logits_error

    ref = session.run_unmodified(beams=2)
    assert ref.scheme == "unmodified" and ref.engine == {} and ref.generation.num_beams == 2
    assert ref.generation.hit_rate is None and ref.warmup["rounds"] >= 2
    assert ref.schedule["picked"] == "unmodified" and not ref.schedule["measured"]
    traced = session.with_settings(routing="uniform")
    assert traced.model is session.model and traced.cost_model is session.cost_model
    assert traced.routing_name == "uniform" and session.routing_name == "model"
    # the unmodified model replays the same routing as the engine: same logits, same greedy tokens
    gates = [b.gate for b in moe_blocks(traced.model)]
    with traced.unmodified() as model:
        assert all(type(b.gate).__name__ == "RoutedGate" for b in moe_blocks(model))
        want = traced.probe_logits(model)
    assert [b.gate for b in moe_blocks(traced.model)] == gates  # its own routers are back
    with traced.offload(4) as engine:
        err = logits_error(traced.probe_logits(engine), want)
    assert err["argmax_agreement"] == 1.0 and max(err["prefill_max_abs_diff"], err["decode_max_abs_diff"]) < 1e-4
    assert traced.run_unmodified().generation.sequences == traced.run("all").generation.sequences
    with pytest.raises(ToolkitError, match="layers fix the built model"):
        session.with_settings(layers=1)


# -- warnings that travel with a run's numbers -------------------------------------------------------------

def _result_with_steps(steps_ms, steady=True):
    from toolkit.moe.generation import GenerationResult
    from toolkit.moe.run import MoERunResult

    g = GenerationResult(prefill_ms=5.0, decode_samples_ms=tuple(steps_ms), end_to_end_ms=sum(steps_ms) + 5.0,
                         batch_size=1, num_beams=1, do_sample=False, prompt_tokens=4, new_tokens=len(steps_ms) + 1,
                         sequences=((1,) * (len(steps_ms) + 1),))
    return MoERunResult(generation=g, settings=MoESettings(), preset="tiny-mixtral", layers=2, experts_per_layer=8,
                        device="cpu", scheme="ours", policy="static", routing="model", cpu_threads=1, engine={},
                        warmup={"rounds": 2, "steady": steady})


def test_a_steady_run_has_no_warnings():
    r = _result_with_steps([10.0, 10.2, 9.9, 10.1, 10.0, 10.1])
    assert r.warnings == [] and r.to_dict()["warnings"] == []


def test_a_run_past_the_model_s_positions_says_so():
    r = _result_with_steps([10.0, 10.2, 9.9, 10.1])
    r = dataclasses.replace(r, generation=dataclasses.replace(r.generation, prompt_tokens=510))  # 512 positions
    assert r.warnings == ["the prompt and new tokens (515) run past tiny-mixtral's 512 positions: the model was not "
                          "made for positions beyond them (the timing is still that of this length)"]


def test_slow_steps_and_an_unsettled_warm_up_warn_next_to_the_number():
    from toolkit.cli.moe import format_table

    r = _result_with_steps([10.0, 10.1, 9.9, 10.0, 10.2, 10.0, 10.1, 9.9, 10.0, 95.0], steady=False)
    w = r.warnings
    assert len(w) == 2 and "median step" in w[0] and "warm-up did not settle" in w[1]
    assert "did not settle in 2 generations (the last two" in w[1]
    raced = _result_with_steps([10.0, 10.1, 9.9, 10.0], steady=False)
    raced.warmup.update(rounds=1, after_schedule_rounds=4)  # four in the schedule race, one after it (a dict)
    assert "did not settle in 5 generations (4 of them in the schedule race)" in raced.warnings[0]
    spread = _result_with_steps([10.0, 30.0, 10.0, 30.0, 10.0, 30.0])
    assert any("spread widely" in x for x in spread.warnings)
    text = format_table({**r.to_dict(), "cost_model": None})
    assert text.splitlines()[-2:] == [f"  WARNING: {x}" for x in w]


def test_moe_decode_judges_each_round_at_the_host_ceiling_measured_beside_it(moe_decode_run):
    _, record, _ = moe_decode_run
    probes = record["host_ceiling"]["probes"]
    groups = [p for p in probes if p["after"].startswith("the start of")]
    assert [p["after"] for p in groups] == [f"the start of the {g} group" for g in ("compare", "sweep", "ablation")]
    rounds = [p for p in probes if " round " in p["after"]]
    assert len(probes) == len(groups) + len(rounds) and [p["host_gbs"] for p in probes] == \
        [100.0 + 2 * i for i in range(len(probes))]  # in order: one before each group, one after every round
    ceilings = record["ceilings"]
    judged = 0
    for r in (r for r in record["runs"] if "decode" in r and r["decode"]["bound"]):
        for part in ("decode", "prefill"):
            rec = r[part]
            c = rec["host_ceiling_beside"]
            i = next(i for i, p in enumerate(probes) if p["host_gbs"] == c["after"])
            assert c["before"] == probes[i - 1]["host_gbs"] and c["gbs"] == (c["before"] + c["after"]) / 2
            assert probes[i]["after"].endswith(f"round {r['median_round'] + 1}")
            b, old = rec["bound_beside"], rec["bound"]
            host_gbs = max(c["gbs"], ceilings["h2d_gbs"])  # the missed bytes leave at the faster of the two
            assert b["host_ms"] == pytest.approx(old["missed_bytes"] / (host_gbs * 1e9) * 1e3)
            assert b["dense_ms"] == pytest.approx(old["dense_ms"]) and b["missed_bytes"] == old["missed_bytes"]
            assert rec["measured_over_bound_beside"] == pytest.approx(rec["measured_over_bound"] * old["ms"] / b["ms"])
            judged += 1
    assert judged >= 4
    for routing, t in record["targets"].items():  # the targets take the ceiling beside the round
        ours = next(r for r in record["runs"] if r["routing"] == routing and r["kind"] == "compare"
                    and r["scheme"] == "ours")
        assert t["decode measured/bound"]["value"] == ours["decode"]["measured_over_bound_beside"]
        assert t["prefill measured/bound"]["value"] == ours["prefill"]["measured_over_bound_beside"]
    line = load_benchmark("moe_decode").host_ceiling_line(record)
    assert line.startswith(f"host ceiling between rounds ({len(probes)} measurements): 100.0-") and "calibration" in line
    bare = {**record, "host_ceiling": {"probes": [], "why_not": "no GPU: both paths need copies to a device"}}
    assert load_benchmark("moe_decode").host_ceiling_line(bare).endswith("no GPU: both paths need copies to a device")


def test_moe_decode_judges_each_phase_against_its_share_of_the_bound(moe_decode_run):
    _, record, _ = moe_decode_run
    bench = load_benchmark("moe_decode")
    for t in record["targets"].values():
        assert t["decode measured/bound"]["goal"] == pytest.approx(1 / bench.DECODE_OF_BOUND)  # >= 90% of it
        assert t["prefill measured/bound"]["goal"] == pytest.approx(1 / bench.PREFILL_OF_BOUND)  # >= 85%
    full = {**record, "settings": {**record["settings"], "full_model": True}}
    for t in bench.targets(full).values():  # the whole model: 85%
        assert t["decode measured/bound"]["goal"] == pytest.approx(1 / bench.FULL_MODEL_DECODE_OF_BOUND)


def test_moe_decode_compares_schemes_by_each_measures_median_over_its_rounds():
    """An entry stands for its decode's median round; its beam and prefill there need not be their own medians,
    so the ratios take each measure's median over the rounds."""
    bench = load_benchmark("moe_decode")

    def entry(scheme, decode, beam, prefill):
        def part(key, values):  # the record of round 0 (the decode's median round here), and the rounds' median
            return {key: values[0], "rounds": {"values": values, "median": sorted(values)[1]}}

        return {"kind": "compare", "scheme": scheme, "routing": "trace", "budget": 14,
                "decode": {**part("tokens_per_s", decode), "measured_over_bound": 1.2, "mean_ms": 1e3 / decode[0],
                           "bound": {"ms": 1e3 / decode[0] / 1.2}},
                "beam": part("steps_per_s", beam), "prefill": {**part("ms", prefill), "measured_over_bound": 1.5}}

    record = {"settings": {}, "routings": {"trace": "t"},
              "runs": [entry("ours", [24.0, 23.0, 25.0], [7.5, 8.9, 9.0], [250.0, 240.0, 260.0]),
                       entry("fiddler-serial", [16.0, 15.0, 17.0], [6.8, 5.5, 6.7], [2000.0, 1900.0, 2100.0])]}
    t = bench.targets(record)["trace"]
    assert t["beam steps/s vs fiddler-serial"]["value"] == pytest.approx(8.9 / 6.7)  # not 7.5 / 6.8
    assert t["decode tok/s vs fiddler-serial"]["value"] == pytest.approx(24.0 / 16.0)
    assert t["prefill speed-up vs fiddler-serial (pageable)"]["value"] == pytest.approx(2000.0 / 250.0)
    r = bench.ratios(record)["trace/compare/ours/14"]
    assert r["beam_vs_fiddler_serial"] == pytest.approx(8.9 / 6.7)
    assert r["prefill_vs_fiddler_serial"] == pytest.approx(2000.0 / 250.0)


def test_moe_decode_prints_each_run_against_float32(moe_decode_run, capsys):
    import copy
    import types

    import torch

    from toolkit.moe.run import logits_check

    bench = load_benchmark("moe_decode")
    spy, record, _ = moe_decode_run
    # asked in each configuration's first round, before its engine is built (offload installs it at once)
    assert len(spy.exact_engine_installed) >= 4 and not any(spy.exact_engine_installed)
    assert all("exact" not in (r.get("check") or {}) for r in record["runs"])  # a float32 model: no float32 probe
    exact = (torch.tensor([[4.0, -2.0]]), torch.tensor([[1.0, 3.0]]))
    ref = (exact[0] + 0.04, exact[1])
    record = copy.deepcopy(record)
    ours = next(r for r in record["runs"] if r["scheme"] == "ours" and r.get("check"))
    ours["check"] = logits_check((exact[0] - 0.05, exact[1]), ref, 0.02, exact=exact)
    bench.print_summary(record)
    out = capsys.readouterr().out
    assert "logits against the unmodified model computed in float32" in out and "ok32" in out
    assert f"{ours['scheme']:<15} {ours['budget']:>3} 0.0125 (all-gpu 0.0100, x1.25): as close" in out
    ours["check"] = {**logits_check(exact, exact, 0.02), "exact_why_not": "the unmodified model needs 9 GiB more"}
    bench.print_summary(record)
    assert (f"logits against float32 ({ours['routing']} routing): not measured: the unmodified model needs 9 GiB "
            "more") in capsys.readouterr().out

    calls = []

    class Session:
        def probe_exact(self):
            calls.append(1)
            return exact

    fake = types.SimpleNamespace(preset=types.SimpleNamespace(dtype=torch.bfloat16), exact_probes={},
                                 exact_why_not={})
    assert bench.Bench.exact(fake, Session(), "trace") is exact
    assert bench.Bench.exact(fake, Session(), "trace") is exact and len(calls) == 1  # once per routing
    fake.preset.dtype = torch.float32
    assert bench.Bench.exact(fake, Session(), "uniform") is None and len(calls) == 1

    class TooBig:
        def probe_exact(self):
            calls.append(1)
            raise ToolkitError("the unmodified model needs 12.0 GiB more on cuda than is free")

    fake = types.SimpleNamespace(preset=types.SimpleNamespace(dtype=torch.bfloat16), exact_probes={},
                                 exact_why_not={})
    assert bench.Bench.exact(fake, TooBig(), "trace") is None  # the run goes on without the reference
    assert bench.Bench.exact(fake, TooBig(), "trace") is None and len(calls) == 2  # asked once
    assert fake.exact_why_not["trace"].startswith("the unmodified model needs 12.0 GiB more")
