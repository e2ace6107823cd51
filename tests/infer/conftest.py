"""Fixtures shared by the inference tests."""

import pytest

from pyro_lm.lm import toy_lm


@pytest.fixture
def prior(device):
    """The enumerable prior (vocab 4, EOS 0) on every device."""
    return toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5, device=device)


@pytest.fixture
def guide_lm(device):
    """A different random LM with the prior's tokenizer, broad enough to cover the prior."""
    return toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=2, init_std=0.1, device=device)
