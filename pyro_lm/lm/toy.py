"""Small random causal LMs for tests, benchmarks and exact checks.

Nothing is downloaded: the tokenizer is a word-level ``tokenizers`` model
built in memory, the network a randomly initialised GPT-2.
"""

from __future__ import annotations

import torch

from pyro_lm.lm.causal_lm import CausalLM

__all__ = ["toy_tokenizer", "toy_lm"]


def toy_tokenizer(vocab_size: int, eos_token_id: int = 0, pad_token_id: int | None = None,
                  adds_bos: bool = True):
    """A word-level tokenizer over tokens ``"<eos>"`` and ``"t1" ... "t{V-1}"``.

    Like a Llama tokenizer, it writes its BOS (``<eos>``, id ``eos_token_id``) before
    every text itself: ``tokenizer("t1 t2")["input_ids"] == [0, 1, 2]``, and the empty
    text is the BOS alone.

    :param int vocab_size: number of tokens, EOS included.
    :param int eos_token_id: id of ``<eos>`` (also BOS); tokens are named by id.
    :param int pad_token_id: a distinct pad id, or ``None`` to pad with EOS.
    :param bool adds_bos: the tokenizer's post-processor prepends the BOS (``False``: a
        tokenizer that adds nothing, as GPT-2's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 2:
        raise ValueError(f"vocab_size: need at least 2 tokens (EOS and one word), got {vocab_size}")
    names = {i: f"t{i}" for i in range(vocab_size)}
    names[eos_token_id] = "<eos>"
    if pad_token_id is not None and pad_token_id != eos_token_id:
        names[pad_token_id] = "<pad>"
    vocab = {name: i for i, name in names.items()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<eos> $A", pair="<eos> $A <eos> $B",
            special_tokens=[("<eos>", eos_token_id)])
    pad = names[pad_token_id] if pad_token_id is not None else "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<eos>", eos_token="<eos>",
                                   pad_token=pad, unk_token="<eos>")


def toy_lm(vocab_size: int = 4, n_layer: int = 1, n_embd: int = 16, n_head: int = 2,
           n_positions: int = 64, eos_token_id: int = 0, pad_token_id: int | None = None,
           seed: int = 0, init_std: float = 0.5, device=None, dtype=None) -> CausalLM:
    """A random GPT-2 wrapped as a :class:`~pyro_lm.CausalLM` (frozen, as a prior).

    :param float init_std: weight init scale; larger gives peakier, more varied
        next-token distributions (useful for exact tests).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=eos_token_id,
                        eos_token_id=eos_token_id,
                        pad_token_id=eos_token_id if pad_token_id is None else pad_token_id,
                        initializer_range=init_std, resid_pdrop=0.1, embd_pdrop=0.1,
                        attn_pdrop=0.1)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(state)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return CausalLM(model, toy_tokenizer(vocab_size, eos_token_id, pad_token_id))
