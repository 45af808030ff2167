"""Offline inputs for generation: a synthetic word-level tokenizer and seeded random prompts.

Random-weight models need no real tokenizer, but streamed text should still be readable and a
benchmark should never download one: ``synthetic_tokenizer`` maps every id to a made-up
pronounceable word. ``random_prompts`` builds left-padded batches, as ``generate`` expects.

Shapes: B batch, P prompt tokens (the longest prompt; shorter ones are left-padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ..errors import ToolkitError

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70 readable syllables


def _word(i: int) -> str:
    """The i-th pronounceable word: 'ba', 'be', ..., 'zu', 'baba', ... (bijective base-70)."""
    out = ""
    while True:
        out += _SYLLABLES[i % len(_SYLLABLES)]
        i //= len(_SYLLABLES)
        if i == 0:
            return out
        i -= 1


@lru_cache(maxsize=8)
def synthetic_tokenizer(vocab_size: int, bos_token_id: int = 1, eos_token_id: int = 2, unk_token_id: int = 0):
    """An offline word-level tokenizer with ``vocab_size`` readable made-up words (no download).

    Ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` (the Llama/Mixtral convention);
    every other id is a word, so random-weight models stream readable text.
    ``<unk>`` doubles as the padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {unk_token_id: "<unk>", bos_token_id: "<s>", eos_token_id: "</s>"}
    if vocab_size <= max(specials):
        raise ToolkitError(f"vocab_size must be > {max(specials)}, got {vocab_size}")
    words = (_word(i) for i in range(vocab_size))
    vocab = {specials[i] if i in specials else next(words): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", padding_side="left")


def random_prompts(vocab_size: int, prompt_tokens: int | Sequence[int], batch_size: int = 1, seed: int = 0,
                   pad_token_id: int = 0, first_id: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random prompts, left-padded as ``generate`` expects: (input_ids [B, P], attention_mask [B, P]).

    ``prompt_tokens`` is one length for all prompts or one length per prompt.
    Ids are drawn from ``[first_id, vocab_size)``, so no prompt contains a special token.
    """
    lengths = [int(prompt_tokens)] * batch_size if isinstance(prompt_tokens, int) else [int(n) for n in prompt_tokens]
    if not lengths or min(lengths) < 1:
        raise ToolkitError(f"prompt lengths must be >= 1, got {lengths}")
    gen = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), P), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(first_id, vocab_size, (n,), generator=gen)
        mask[b, P - n:] = 1
    return ids, mask
