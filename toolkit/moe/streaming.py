"""Token streaming that also works for beam search: tokens are handed on once no outcome can change them.

Streaming never runs inside a timed step: the taps only copy token ids to the host and
enqueue them; a background thread works out which tokens are final, detokenizes and hands the
text on. ``generate`` (``toolkit.moe.generation``) wires the taps into transformers.

Beam search streaming (transformers refuses a streamer when ``num_beams > 1``).
A generated token is *final* once no possible outcome of the search can change
it. The outcome is either a finished hypothesis (ended by EOS) or a
continuation of a beam that is still running. Running beams only ever extend
running beams of the step before, so the longest common prefix (LCP) of

    every running beam  +  every hypothesis that has finished so far

is a prefix of the final answer, and it never shrinks. ``BeamPrefix`` tracks
exactly that: the logits-processor tap sees the running beams at every step and
the stopping-criteria tap sees the step's candidates, of which those ending in
EOS may join the finished set (all of them are kept, a safe superset of the
ones transformers keeps). When generation ends, the best beam's remainder is
streamed. Greedy and sampling are the one-beam case: every token is final at
once.

Shapes: B batch, N beams, C candidates kept per step (2N), P prompt tokens,
S sequence length so far.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import torch


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token lists."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class BeamPrefix:
    """The generated tokens of one sequence that no outcome of the search can change (see the module docstring)."""

    def __init__(self, eos_token_ids: Sequence[int] = ()):
        self.eos = set(int(t) for t in eos_token_ids)
        self.finished: list[list[int]] = []  # hypotheses ended by EOS that may still win
        self.emitted: list[int] = []         # tokens already declared final
        self.consistent = True               # False would mean the invariant broke (a bug)

    def _advance(self, seqs: list[list[int]], source: list[int]) -> list[int]:
        n = common_prefix_len(seqs + self.finished)
        k = len(self.emitted)
        if n < k or source[:k] != self.emitted:
            self.consistent = False
            return []
        new = source[k:n]
        self.emitted.extend(new)
        return new

    def running(self, beams: list[list[int]]) -> list[int]:
        """Update with the live beams' generated tokens; returns the newly final tokens."""
        return self._advance(beams, beams[0])

    def candidates(self, cands: list[list[int]]) -> None:
        """Remember this step's candidates that ended with EOS: they may become the answer."""
        self.finished.extend(c for c in cands if c and c[-1] in self.eos)

    def final(self, best: list[int]) -> list[int]:
        """The search is over and ``best`` won: returns its tokens not yet streamed."""
        k = len(self.emitted)
        if best[:k] != self.emitted:
            self.consistent = False
            return []
        new = best[k:]
        self.emitted.extend(new)
        return new


class TextPrinter:
    """A token sink: detokenizes incrementally and passes each new piece of text to ``write``.

    Runs in the stream thread, so detokenizing and printing never enter a timed
    step. ``chunks`` keeps every piece written (the final one is ``chunks[-1]``
    when the search ends with a remainder).
    """

    def __init__(self, tokenizer, write: Callable[[str], object] | None = None, skip_special_tokens: bool = True):
        self.tokenizer, self.write, self.skip = tokenizer, write, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.chunks: list[str] = []

    def put(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        piece = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        if piece:
            self.chunks.append(piece)
            if self.write is not None:
                self.write(piece)

    def end(self) -> None:
        pass


class TokenStream:
    """Feeds a sink (``put(ids)``, ``end()``) from a background thread, for batch size 1.

    ``running_tap`` (a logits processor) and ``candidates_tap`` (a stopping
    criterion) are given to ``generate``; they copy ids to the host and enqueue.
    ``history`` records (generated length when decided, tokens) for every put.
    """

    def __init__(self, sink, prompt_len: int, num_beams: int, eos_token_ids: Sequence[int] = ()):
        self.sink, self.P, self.N = sink, prompt_len, num_beams
        self.prefix = BeamPrefix(eos_token_ids)
        self.history: list[tuple[int, list[int]]] = []
        self.error: BaseException | None = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="toolkit-stream", daemon=True)
        self._thread.start()

    # called by transformers inside the generation loop: copy and enqueue only
    def running_tap(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Logits processor: input_ids [N, S] are the live beams."""
        self._q.put(("running", input_ids[:, self.P:].cpu()))
        return scores

    def candidates_tap(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        """Stopping criterion: input_ids [C, S+1] are beam candidates (greedy: [1, S+1], the sequence)."""
        ids = input_ids[:, self.P:].cpu()
        self._q.put(("running" if self.N == 1 else "candidates", ids))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def finish(self, best: torch.Tensor | None) -> None:
        """Stream the winner's remainder (``best``: generated ids [S'], or None after an error) and stop."""
        if best is not None:
            self._q.put(("final", best.cpu()))
        self._q.put(("end", None))
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _emit(self, ids: list[int], at: int) -> None:
        if ids:
            self.history.append((at, ids))
            self.sink.put(ids)

    def _work(self) -> None:
        try:
            while True:
                kind, ids = self._q.get()
                if kind == "end":
                    break
                rows = ids.tolist()
                if kind == "running":
                    self._emit(self.prefix.running(rows), len(rows[0]))
                elif kind == "candidates":
                    self.prefix.candidates(rows)
                else:  # final
                    self._emit(self.prefix.final(ids.tolist()), -1)
        except BaseException as e:  # surface sink errors in the caller's thread
            self.error = e
            while True:  # drain so finish() never blocks
                if self._q.get()[0] == "end":
                    break
        finally:
            end = getattr(self.sink, "end", None)
            if end is not None:
                try:
                    end()
                except BaseException as e:
                    self.error = self.error or e


def as_logits_processor(fn):
    """Wrap ``fn(input_ids, scores) -> scores`` as a transformers ``LogitsProcessor``."""
    from transformers import LogitsProcessor

    class _P(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return fn(input_ids, scores)

    return _P()


def as_stopping_criterion(fn):
    """Wrap ``fn(input_ids, scores, **kwargs) -> bool [B]`` as a transformers ``StoppingCriteria``."""
    from transformers import StoppingCriteria

    class _S(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return fn(input_ids, scores, **kwargs)

    return _S()
