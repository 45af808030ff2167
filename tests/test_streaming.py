"""Streaming: final-prefix logic, and streamed beam/greedy output == the non-streamed result."""

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import generation as G
from toolkit.moe import streaming
from toolkit.moe.presets import build_moe
from toolkit.moe.prompts import random_prompts, synthetic_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def model():
    return build_moe("tiny-mixtral", seed=0)


@pytest.fixture(scope="module")
def tok(model):
    return synthetic_tokenizer(model.config.vocab_size)


class Recorder:
    """A sink that records each put and whether end() was called."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, ids):
        assert not self.ended
        self.puts.append(list(ids))

    def end(self):
        self.ended = True

    @property
    def ids(self):
        return [t for p in self.puts for t in p]


def test_common_prefix_len():
    assert streaming.common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert streaming.common_prefix_len([[1, 2, 3]]) == 3
    assert streaming.common_prefix_len([[5], [6]]) == 0
    assert streaming.common_prefix_len([]) == 0


def test_beam_prefix_waits_for_finished_hypotheses():
    bp = streaming.BeamPrefix(eos_token_ids=[EOS])
    assert bp.running([[7], [8]]) == []               # beams disagree on the first token
    assert bp.running([[7, 1], [7, 3]]) == [7]         # now all live beams start with 7
    bp.candidates([[7, 1, 4], [7, 3, EOS], [7, 1, 9]])  # [7, 3, EOS] finished and may win
    assert bp.running([[7, 1, 4], [7, 1, 9]]) == []    # live beams share 7 1, the finished one only 7
    assert bp.running([[7, 1, 4, 5], [7, 1, 4, 6]]) == []
    assert bp.final([7, 3, EOS]) == [3, EOS]           # the finished hypothesis won: still consistent
    assert bp.emitted == [7, 3, EOS] and bp.consistent


def test_beam_prefix_streams_when_finished_agree_and_flags_inconsistency():
    bp = streaming.BeamPrefix(eos_token_ids=[EOS])
    bp.candidates([[4, EOS]])
    assert bp.running([[4, 5, 6], [4, 5, 7]]) == [4]
    assert bp.final([4, 5, 7, 1]) == [5, 7, 1]
    bad = streaming.BeamPrefix()
    assert bad.running([[1, 2], [1, 2]]) == [1, 2]
    assert bad.final([1, 3]) == [] and not bad.consistent


def test_text_printer_writes_incremental_pieces(tok):
    written = []
    p = streaming.TextPrinter(tok, write=written.append)
    p.put([5])
    p.put([6, EOS, 7])
    assert "".join(written) == tok.decode([5, 6, EOS, 7], skip_special_tokens=True)
    assert len(written) == 2 and written[1].startswith(" ")


def _prompt(model, n=8, seed=1):
    return random_prompts(model.config.vocab_size, n, seed=seed)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_streamed_equals_non_streamed(model, tok, num_beams):
    ids, mask = _prompt(model)
    plain = G.generate(model, ids, mask, max_new_tokens=16, num_beams=num_beams, ignore_eos=True, tokenizer=tok)
    rec = Recorder()
    streamed = G.generate(model, ids, mask, max_new_tokens=16, num_beams=num_beams, ignore_eos=True,
                          tokenizer=tok, streamer=rec)
    assert rec.ended
    assert rec.ids == list(plain.sequences[0]) == list(streamed.sequences[0])
    if num_beams == 1:  # greedy: one token per step, each as soon as it is chosen
        assert rec.puts == [[t] for t in plain.sequences[0]]
    else:  # beams converge: several chunks are final before the search ends
        assert len(rec.puts) >= 3
        assert rec.puts[-1] != rec.ids  # not everything arrived at the end


def test_beam_stream_is_progressive_and_text_matches(model, tok, monkeypatch):
    streams = []
    real = G.TokenStream

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            streams.append(self)

    monkeypatch.setattr(G, "TokenStream", Spy)
    ids, mask = _prompt(model)
    written = []
    printer = streaming.TextPrinter(tok, write=written.append)
    res = G.generate(model, ids, mask, max_new_tokens=24, num_beams=4, ignore_eos=True, tokenizer=tok,
                     streamer=printer)
    (stream,) = streams
    decided_at = [at for at, _ in stream.history]
    early = [at for at in decided_at if 0 <= at < res.new_tokens]
    assert len(early) >= 2, stream.history  # more than one chunk decided while beams were still running
    assert "".join(written) == res.text[0]
    plain = G.generate(model, ids, mask, max_new_tokens=24, num_beams=4, ignore_eos=True, tokenizer=tok)
    assert res.text == plain.text


def test_beam_stream_with_eos_hypotheses(model, tok, monkeypatch):
    """Make a token that beams emit mid-way the EOS: finished hypotheses appear and streaming stays exact."""
    ids, mask = _prompt(model, seed=3)
    base = G.generate(model, ids, mask, max_new_tokens=16, num_beams=4, ignore_eos=True)
    eos = base.sequences[0][4]
    prefixes = []
    real = streaming.BeamPrefix

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            prefixes.append(self)

    monkeypatch.setattr(streaming, "BeamPrefix", Spy)  # TokenStream builds it
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(eos)
    try:
        plain = G.generate(model, ids, mask, max_new_tokens=16, num_beams=4)
        rec = Recorder()
        streamed = G.generate(model, ids, mask, max_new_tokens=16, num_beams=4, streamer=rec)
    finally:
        model.generation_config.eos_token_id = saved
    assert prefixes[-1].finished, "the test case should produce finished hypotheses"
    assert rec.ids == list(plain.sequences[0]) == list(streamed.sequences[0])
    assert prefixes[-1].consistent


def test_beam_sampling_stream_matches(model):
    ids, mask = _prompt(model)
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=True, ignore_eos=True, seed=7)
    plain = G.generate(model, ids, mask, **kw)
    rec = Recorder()
    G.generate(model, ids, mask, streamer=rec, **kw)
    assert rec.ids == list(plain.sequences[0])


def test_stream_needs_batch_one(model):
    ids, mask = random_prompts(model.config.vocab_size, [4, 6])
    with pytest.raises(ToolkitError, match="batch size 1"):
        G.generate(model, ids, mask, max_new_tokens=2, streamer=Recorder())


def test_sink_error_surfaces(model):
    class Broken(Recorder):
        def put(self, ids):
            raise ValueError("sink broke")

    ids, mask = _prompt(model)
    with pytest.raises(ValueError, match="sink broke"):
        G.generate(model, ids, mask, max_new_tokens=4, ignore_eos=True, streamer=Broken())


def test_stream_tokens_equal_output_ids_dtype(model):
    ids, mask = _prompt(model)
    rec = Recorder()
    res = G.generate(model, ids, mask, max_new_tokens=3, ignore_eos=True, streamer=rec)
    assert all(isinstance(t, int) for t in rec.ids) and len(rec.ids) == res.new_tokens == 3
    assert torch.is_tensor(ids)
