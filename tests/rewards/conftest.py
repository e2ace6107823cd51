"""Fixtures of the reward tests: a tiny LM on a real subword vocabulary."""

import pytest
import torch

import pyro_lm

#: A byte-level vocabulary in which " they" is " the" + "y" (EOS first).
SUBWORD_VOCAB = ["<|endoftext|>", "Ġthe", "y", "Ġcat", ".", "s"]


def make_subword_lm(seed: int = 4, init_std: float = 0.5) -> pyro_lm.CausalLM:
    """A random one-layer GPT-2 on a byte-level tokenizer of :data:`SUBWORD_VOCAB`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SUBWORD_VOCAB)},
                                         unk_token=SUBWORD_VOCAB[0]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SUBWORD_VOCAB[0],
                                  pad_token=SUBWORD_VOCAB[0])
    config = GPT2Config(vocab_size=len(SUBWORD_VOCAB), n_positions=16, n_embd=16, n_layer=1,
                        n_head=2, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        initializer_range=init_std)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(config).eval()
    finally:
        torch.random.set_rng_state(state)
    return pyro_lm.CausalLM(model, tok)


@pytest.fixture(scope="session")
def subword_lm():
    """:func:`make_subword_lm` with its default seed (P*(" they" ...) is large there)."""
    return make_subword_lm()
