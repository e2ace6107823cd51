"""Tiny byte-level BPE tokenizers and random GPT-2 models, small enough to enumerate."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pyro_lm import CausalLM
from pyro_lm.lm.token_bytes import byte_decoder

#: Text pieces of the "text" vocabulary: "é" is two byte tokens or one merged token.
TEXT_PIECES = ("a", "b", "ab", " ", " a", b"\xc3", b"\xa9", "é")
#: Pieces of the "json" vocabulary.
JSON_PIECES = ('{"n":', "1", "2", "12", "}", " ", ",")


def _spell(piece) -> str:
    """A piece in GPT-2's byte-level alphabet."""
    data = piece if isinstance(piece, bytes) else piece.encode("utf-8")
    table = {b: c for c, b in byte_decoder().items()}
    return "".join(table[b] for b in data)


def byte_bpe(pieces, specials=("<eos>",)) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: the special tokens (ids 0, 1, ...) then ``pieces``."""
    vocab = {s: i for i, s in enumerate(specials)}
    for p in pieces:
        vocab.setdefault(_spell(p), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0],
                                   pad_token=specials[0], bos_token=specials[0])


def tiny_bpe_lm(pieces=TEXT_PIECES, extra_rows: int = 0, eos_ids=None, seed: int = 0,
                specials=("<eos>",), init_std: float = 0.5) -> CausalLM:
    """A random 1-layer GPT-2 over :func:`byte_bpe` (``extra_rows`` embedding rows beyond
    the tokenizer; ``eos_ids`` extra EOS ids through the generation config; ``init_std``
    the weights' standard deviation: small for a broad LM, e.g. a guide that covers a
    peaky prior)."""
    tok = byte_bpe(pieces, specials)
    config = GPT2Config(vocab_size=len(tok) + extra_rows, n_positions=16, n_embd=16, n_layer=1,
                        n_head=2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        initializer_range=init_std)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(state)
    if eos_ids is not None:
        model.generation_config.eos_token_id = list(eos_ids)
    return CausalLM(model, tok)
