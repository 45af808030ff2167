"""generate(): exact timings with a fake clock, phase switching, metrics, and offload equivalence."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import generation as G
from toolkit.moe.presets import build_moe
from toolkit.moe.prompts import random_prompts, synthetic_tokenizer
from toolkit.moe.streaming import TextPrinter


@pytest.fixture(scope="module")
def model():
    return build_moe("tiny-mixtral", seed=0)


class FakeClock:
    """Returns the given instants in order; counts synchronizations."""

    def __init__(self, instants):
        self.instants, self.syncs = list(instants), 0

    def __call__(self):
        return self.instants.pop(0)

    def sync(self):
        self.syncs += 1


# ---------------------------------------------------------------- helpers


def test_random_prompts_left_padded():
    ids, mask = random_prompts(100, [3, 5], seed=4, pad_token_id=0)
    assert ids.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert ids[0, :2].tolist() == [0, 0] and ids[mask.bool()].min() >= 3 and ids.max() < 100
    again, _ = random_prompts(100, [3, 5], seed=4)
    assert torch.equal(ids, again)
    with pytest.raises(ToolkitError):
        random_prompts(100, 0)


def test_synthetic_tokenizer_is_readable_and_round_trips():
    tok = synthetic_tokenizer(5000)
    assert len(tok) == 5000 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    words = tok.convert_ids_to_tokens(list(range(3, 13)))
    assert all(w.isalpha() and w.islower() for w in words) and len(set(words)) == 10
    ids = [5, 900, 4999]
    assert tok(tok.decode(ids)).input_ids == ids


# ---------------------------------------------------------------- timing with a fake clock


def test_fake_clock_gives_exact_timings(model):
    ids, mask = random_prompts(model.config.vocab_size, 6, batch_size=2)
    # start, 4 step callbacks (prefill end + 3 decode steps), end
    clock = FakeClock([10.0, 10.100, 10.102, 10.105, 10.109, 10.200])
    res = G.generate(model, ids, mask, max_new_tokens=4, ignore_eos=True, clock=clock, synchronize=clock.sync)
    assert res.prefill_ms == pytest.approx(100.0)
    assert res.decode_samples_ms == pytest.approx((2.0, 3.0, 4.0))
    assert res.end_to_end_ms == pytest.approx(200.0)
    assert res.decode_ms["median"] == pytest.approx(3.0) and res.decode_ms["mean"] == pytest.approx(3.0)
    assert res.decode_ms["p90"] == pytest.approx(3.8)
    assert res.decode_tokens_per_s == pytest.approx(3 * 2 / 0.009)  # steps x batch / decode seconds
    assert clock.syncs == 6  # before start, every step, at the end
    assert res.new_tokens == 4 and res.batch_size == 2 and res.prompt_tokens == 6
    assert res.experts is None and res.hit_rate is None and res.gpu_experts is None


class FakeEvent:
    def __init__(self, t: float):
        self.t = t

    def elapsed_time(self, end: "FakeEvent") -> float:  # as torch.cuda.Event: milliseconds to a later event
        return (end.t - self.t) * 1e3


def test_events_time_the_steps_without_a_sync_at_each(model):
    """With events (a GPU), steps are marked where transformers calls the timer and read after the run: the
    host syncs only before the start and at the end, so its work between steps overlaps with the GPU's."""
    ids, mask = random_prompts(model.config.vocab_size, 6, batch_size=2)
    clock = FakeClock([10.0, 10.2])  # start and end: the only clock reads
    marks = iter([3.0, 3.100, 3.102, 3.105, 3.109])  # the start event, then prefill and 3 decode steps
    res = G.generate(model, ids, mask, max_new_tokens=4, ignore_eos=True, clock=clock, synchronize=clock.sync,
                     mark=lambda: FakeEvent(next(marks)))
    assert res.prefill_ms == pytest.approx(100.0)
    assert res.decode_samples_ms == pytest.approx((2.0, 3.0, 4.0))
    assert res.end_to_end_ms == pytest.approx(200.0)
    assert clock.syncs == 2


def test_beam_tokens_per_second_counts_steps_times_batch(model):
    ids, mask = random_prompts(model.config.vocab_size, 5)
    clock = FakeClock([0.0, 0.5, 0.51, 0.52, 1.0])
    res = G.generate(model, ids, mask, max_new_tokens=3, num_beams=4, ignore_eos=True, clock=clock,
                     synchronize=clock.sync)
    assert res.mode == "beam" and len(res.decode_samples_ms) == 2
    assert res.decode_tokens_per_s == pytest.approx(2 * 1 / 0.02)  # beams do not multiply it


def test_result_round_trip_and_dataframe(model):
    ids, mask = random_prompts(model.config.vocab_size, 4)
    clock = FakeClock([0.0, 0.01, 0.012, 0.015, 0.02])
    res = G.generate(model, ids, mask, max_new_tokens=3, ignore_eos=True, clock=clock, synchronize=clock.sync,
                     tokenizer=synthetic_tokenizer(model.config.vocab_size))
    d = res.to_dict()
    for key in ("prefill_ms", "decode_tokens_per_s", "decode_ms", "hit_rate", "gpu_experts", "cost_model", "env",
                "end_to_end_ms", "bytes_copied", "cpu_expert_calls"):
        assert key in d
    back = G.GenerationResult.from_dict(d)
    assert back.decode_samples_ms == res.decode_samples_ms and back.sequences == res.sequences
    assert back.text == res.text and len(res.text[0].split()) == 3
    late = G.GenerationResult.from_dict({**d, "stop_check_deferred": True})
    assert late.stop_check_deferred and not back.stop_check_deferred
    df = res.to_dataframe()
    assert df["phase"].tolist() == ["prefill", "decode", "decode"]
    assert df["ms"].tolist() == pytest.approx([10.0, 2.0, 3.0])
    assert "greedy" in repr(res)


def test_bad_arguments(model):
    ids, mask = random_prompts(model.config.vocab_size, 4)
    with pytest.raises(ToolkitError, match="num_beams"):
        G.generate(model, ids, mask, num_beams=0)
    with pytest.raises(ToolkitError, match="max_new_tokens"):
        G.generate(model, ids, mask, max_new_tokens=0)


def test_user_processors_and_criteria_are_kept(model):
    from transformers import LogitsProcessor, StoppingCriteria

    class Force7(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:] = -1e9
            scores[:, 7] = 0.0
            return scores

    class StopAt3(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5 + 3, dtype=torch.bool)

    ids, mask = random_prompts(model.config.vocab_size, 5)
    res = G.generate(model, ids, mask, max_new_tokens=10, ignore_eos=True, logits_processor=[Force7()],
                     stopping_criteria=[StopAt3()])
    assert res.sequences == ((7, 7, 7),) and len(res.decode_samples_ms) == 2
    with pytest.raises(ToolkitError, match="stopping rules"):
        G.generate(model, ids, mask, num_beams=2, streamer=TextPrinter(None), stopping_criteria=[StopAt3()])


# ---------------------------------------------------------------- phases and expert statistics


class PhaseSpy:
    """A stand-in for Offloaded: records the phase at every forward pass of the model."""

    def __init__(self, model):
        self.model, self.phase, self.seen, self.resets = model, None, [], 0
        self.placement = np.ones((2, 8), dtype=bool)
        self.stats = SimpleNamespace(
            activations={"prefill": np.full((2, 8), 2), "decode": np.full((2, 8), 4)},
            hits={"prefill": np.full((2, 8), 1), "decode": np.full((2, 8), 4)},
            bytes_copied=123, cpu_expert_calls=7, copy_expert_calls=1)
        self._hook = model.register_forward_pre_hook(lambda *a: self.seen.append(self.phase))

    def set_phase(self, phase):
        self.phase = phase

    def reset_stats(self):
        self.resets += 1


def test_phase_switches_at_first_token(model):
    spy = PhaseSpy(model)
    try:
        ids, mask = random_prompts(model.config.vocab_size, 5)
        res = G.generate(spy, ids, mask, max_new_tokens=4, ignore_eos=True)
    finally:
        spy._hook.remove()
    assert spy.seen == ["prefill", "decode", "decode", "decode"]  # one prefill pass, 3 decode passes
    assert spy.resets == 1
    hr = res.hit_rate
    assert hr["prefill"] == 0.5 and hr["decode"] == 1.0 and hr["overall"] == pytest.approx(80 / 96)
    assert hr["per_layer"]["prefill"] == [0.5, 0.5] and hr["per_expert"]["decode"][1] == [1.0] * 8
    assert res.gpu_experts == 16 and res.to_dict()["bytes_copied"] == 123


def test_expert_metrics_handles_unused_phase():
    stats = SimpleNamespace(
        activations={"prefill": np.array([[3, 0]]), "decode": np.zeros((1, 2), int)},
        hits={"prefill": np.array([[3, 0]]), "decode": np.zeros((1, 2), int)})
    m = G.expert_metrics(stats)
    assert m["hit_rate"]["prefill"] == 1.0 and m["hit_rate"]["decode"] is None
    assert m["hit_rate"]["per_expert"]["prefill"] == [[1.0, None]]
    assert m["bytes_copied"] == 0 and not math.isnan(m["hit_rate"]["overall"])


# ---------------------------------------------------------------- offloaded == unmodified (float32, CPU)


def _greedy_margin(model, ids, mask, generated):
    """Smallest top-1 minus top-2 logit gap over the greedy choices (how far from a tie each choice was)."""
    full = torch.cat([ids, torch.tensor(generated)], dim=1)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], len(generated[0]), dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1]  # [B, new, V]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


@pytest.mark.parametrize("gpu_experts", [0, 5, 16])
def test_offloaded_generation_equals_unmodified(model, gpu_experts):
    """Greedy and beam search through offload() give the unmodified model's ids for a left-padded batch.

    Offloading reorders float32 sums (per-expert gathers, CPU vs "GPU" path), ~1e-6 on logits; the
    greedy choices below are >= 1e-3 from a tie, so equal ids are a robust check, not luck.
    """
    from toolkit.moe.costs import CostModel
    from toolkit.moe.offload import offload

    ids, mask = random_prompts(model.config.vocab_size, [5, 9, 7], seed=2)  # left padding
    kw = dict(max_new_tokens=10, ignore_eos=True)
    ref_greedy = G.generate(model, ids, mask, **kw)
    ref_beam = G.generate(model, ids, mask, num_beams=3, **kw)
    assert _greedy_margin(model, ids, mask, ref_greedy.sequences) > 1e-3

    # CPU experts cost n ms, a copy 3 ms: prefill copies its busy experts, decode computes misses on the CPU
    cm = CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0)
    off = offload(model, gpu_experts=gpu_experts, device="cpu", cost_model=cm)
    try:
        greedy = G.generate(off, ids, mask, **kw)
        beam = G.generate(off, ids, mask, num_beams=3, **kw)
    finally:
        off.restore()
    assert greedy.sequences == ref_greedy.sequences
    assert beam.sequences == ref_beam.sequences
    expected = {0: 0.0, 16: 1.0}.get(gpu_experts)
    for res in (greedy, beam):
        assert res.gpu_experts == gpu_experts
        if expected is not None:
            assert res.hit_rate["prefill"] == res.hit_rate["decode"] == expected
        else:
            assert 0.0 < res.hit_rate["decode"] < 1.0
    if gpu_experts < 16:
        assert greedy.to_dict()["cpu_expert_calls"] > 0 and greedy.to_dict()["copy_expert_calls"] > 0
    # decode activations: 3 sequences x 9 decode steps x 2 layers x top-2 (beams: x3 sequences)
    assert np.sum(greedy.experts["activations"]["decode"]) == 3 * 9 * 2 * 2
    assert np.sum(beam.experts["activations"]["decode"]) == 3 * 3 * 9 * 2 * 2


@pytest.mark.gpu
def test_offloaded_generation_on_gpu_equals_unmodified_and_streams():
    """The same equivalence on CUDA (float32: no dtype noise), with real copies and CPU experts, and streaming."""
    from toolkit.moe.costs import CostModel
    from toolkit.moe.offload import offload

    gpu_model = build_moe("tiny-mixtral", device="cuda", seed=0)
    ids, mask = random_prompts(gpu_model.config.vocab_size, [5, 9, 7], seed=2)
    kw = dict(max_new_tokens=10, ignore_eos=True)
    ref = [G.generate(gpu_model, ids, mask, num_beams=n, **kw) for n in (1, 3)]
    cm = CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0)
    off = offload(gpu_model, gpu_experts=5, device="cuda", cost_model=cm)
    try:
        got = [G.generate(off, ids, mask, num_beams=n, **kw) for n in (1, 3)]
        rec = []
        sink = SimpleNamespace(put=rec.extend, end=lambda: None)
        one = G.generate(off, ids[:1], mask[:1], num_beams=3, streamer=sink, **kw)
    finally:
        off.restore()
    assert [r.sequences for r in got] == [r.sequences for r in ref]
    assert rec == list(one.sequences[0])
    assert all(r.prefill_ms > 0 and len(r.decode_samples_ms) == 9 for r in got)
    # the steps are CUDA events read after the run: they fit within the run's synced wall time, and cover most of it
    for r in got + ref:
        marked = r.prefill_ms + sum(r.decode_samples_ms)
        assert min(r.decode_samples_ms) > 0 and 0.5 * r.end_to_end_ms < marked <= r.end_to_end_ms * 1.001 + 0.05
    assert got[0].to_dict()["cpu_expert_calls"] > 0 and got[0].to_dict()["bytes_copied"] > 0


def test_the_kv_cache_goes_under_the_name_this_transformers_has(model):
    """``cache`` where the forward has it: the old ``past_key_values`` warns on every call and goes in 5.40."""
    import inspect
    import logging
    import warnings

    from toolkit.moe.run import cache_keyword, output_cache

    has_cache = "cache" in inspect.signature(model.forward).parameters
    assert cache_keyword(model) == ("cache" if has_cache else "past_key_values")
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    hf_logger = logging.getLogger("transformers")  # it does not propagate: pytest's caplog never sees it
    hf_logger.addHandler(handler)
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()  # logged once per process otherwise
    ids = torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error", FutureWarning)
            out = model(input_ids=ids, use_cache=True)
            step = model(input_ids=ids[:, -1:], use_cache=True, **{cache_keyword(model): output_cache(out)})
    finally:
        hf_logger.removeHandler(handler)
    assert step.logits.shape[:2] == (1, 1)
    assert not [r.getMessage() for r in logged if "past_key_values" in r.getMessage()]


# ---------------------------------------------------------------- the stop check read one step late

def test_only_a_run_that_ends_at_max_new_tokens_may_read_its_stop_check_late():
    assert G.fixed_length(True, 1, None, [], {})
    assert not G.fixed_length(False, 1, None, [], {})  # EOS may end it earlier
    assert not G.fixed_length(True, 4, None, [], {})  # beam search: its own loop
    assert not G.fixed_length(True, 1, object(), [], {})  # streaming taps
    assert not G.fixed_length(True, 1, None, [object()], {})  # a criterion may end it earlier
    assert not G.fixed_length(True, 1, None, [], {"stop_strings": ["."]})


def test_the_deferred_stop_check_is_allowed_on_cuda_inside_only_and_for_caches_it_may_keep():
    from transformers.generation import utils as gen_utils

    cls = getattr(gen_utils, "DeferredStopCheck", None)
    if cls is None:
        with G.deferred_stop_check() as state:
            assert state["deferred"] is False  # this transformers reads the stop every step
        return
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    kept = SimpleNamespace(is_croppable=False)  # a static cache handed back to the caller: no rollback
    ours = SimpleNamespace(is_croppable=False)
    before = cls.is_supported(cuda, None, False, False)
    with G.deferred_stop_check(owned_cache=ours) as state:
        assert state["deferred"] is None  # not asked yet
        assert cls.is_supported(cuda, None, False, False) and state["deferred"] is True
        assert cls.is_supported(cuda, ours, True, False)  # the graphs' cache: crop keeps every position
        assert not cls.is_supported(cuda, kept, True, False) and state["deferred"] is False
        assert cls.is_supported(cuda, SimpleNamespace(is_croppable=True), True, False)
        assert not cls.is_supported(cuda, None, False, True)  # assisted generation: transformers' own answer
        assert not cls.is_supported(cpu, None, False, False)  # CPU: transformers' own answer (no events)
    assert cls.is_supported(cuda, None, False, False) == before  # put back


def test_the_graphs_static_cache_keeps_every_position_when_transformers_crops_it():
    from toolkit.moe.graphs import keep_in_place

    assert keep_in_place(0) is None and keep_in_place(-1) is None
    with pytest.raises(ToolkitError, match="cannot be cut to 5 positions"):
        keep_in_place(5)


def test_on_cpu_the_stop_check_is_read_every_step(model):
    ids, mask = random_prompts(model.config.vocab_size, [4], seed=0)
    r = G.generate(model, ids, mask, max_new_tokens=3, ignore_eos=True)
    assert r.stop_check_deferred is False and r.to_dict()["stop_check_deferred"] is False


@pytest.mark.gpu
def test_gpu_a_stop_check_read_late_gives_the_same_tokens_and_steps():
    """On CUDA, a fixed-length greedy run reads its stop check one step late: the unmodified model (a dynamic
    cache) and an offloaded one (the graphs' static cache) give the same tokens and as many timed steps as with
    the check read every step; a run that may end at EOS keeps the check every step."""
    from toolkit.moe.costs import CostModel
    from toolkit.moe.offload import offload

    gpu_model = build_moe("tiny-mixtral", device="cuda", seed=0)
    ids, mask = random_prompts(gpu_model.config.vocab_size, [5], seed=2)
    kw = dict(max_new_tokens=10, ignore_eos=True)
    cm = CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0)
    for target in ("unmodified", "offloaded"):
        model = gpu_model if target == "unmodified" else offload(gpu_model, gpu_experts=5, device="cuda",
                                                                 cost_model=cm)
        try:
            late, every = (G.generate(model, ids, mask, defer_stop=d, **kw) for d in (True, False))
            eos = G.generate(model, ids, mask, max_new_tokens=10)
        finally:
            if target == "offloaded":
                model.restore()
        assert late.stop_check_deferred and not every.stop_check_deferred and not eos.stop_check_deferred, target
        assert late.sequences == every.sequences and len(late.decode_samples_ms) == len(every.decode_samples_ms) == 9
        if target == "offloaded":
            for phase in ("prefill", "decode"):  # no extra pass counted
                assert np.array_equal(late.experts["activations"][phase], every.experts["activations"][phase])


def test_the_moe_command_says_how_the_stop_check_was_read():
    from moe_records import run_record

    from toolkit.cli.moe import format_table

    def line(**kw):
        return [x for x in format_table(run_record(**kw)).splitlines() if x.startswith("  stop check")]

    assert line(stop_check_deferred=True) == ["  stop check                     read one step late: the host queues "
                                              "each decode step while the GPU runs the last"]
    assert "after every decode step (a sync)" in line(stop_check_deferred=False)[0]
    assert line(stop_check_deferred=False, device="cpu") == [] and line() == []  # no GPU, or an older record
