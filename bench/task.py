"""The peers' shared task (/work/shared/PEERS.md), in one place for every benchmark.

A random tiny GPT-2 (2 layers, 64 wide, vocab 64, BOS/EOS id 0), one BOS prompt, 20 new
tokens, reward = count of token 7, beta = 0.1.
"""

from __future__ import annotations

import torch

from pyro_lm.lm import toy_lm
from pyro_lm.programs import reward_model
from pyro_lm.rewards import Lexicon

TOKEN = 7  # the reward counts this token
BETA = 0.1
MAX_NEW_TOKENS = 20


def make_lm(device=None):
    """The peers' random tiny GPT-2, as a frozen prior."""
    return toy_lm(vocab_size=64, n_layer=2, n_embd=64, n_head=2, init_std=0.02, device=device)


def count_reward(x: torch.Tensor) -> torch.Tensor:
    """Count of :data:`TOKEN` (positions after EOS hold EOS, id 0, never the token)."""
    return (x == TOKEN).sum(-1).float()


def bos_prompt(device=None) -> torch.Tensor:
    """The one BOS prompt, ``(1, 1)``."""
    return torch.zeros(1, 1, dtype=torch.long, device=device)


def make_model(prior, beta: float = BETA, max_new_tokens: int = MAX_NEW_TOKENS):
    """The posterior program ``model(prompts)``: the count of :data:`TOKEN` (a prefix-aware
    Lexicon, so SMC sees it token by token) over ``beta`` as a factor."""
    return reward_model(prior, Lexicon(prior.tokenizer, {f"t{TOKEN}": 1.0}), beta=beta,
                        max_new_tokens=max_new_tokens)


def floor_step(k: int, max_new_tokens: int, beta: float, lr: float, device=None):
    """One hand-written PyTorch RLOO step on this task (:class:`floors.RLOOFloor`), a closure."""
    import copy

    from floors import RLOOFloor

    prior = make_lm(device)
    policy = copy.deepcopy(prior.model).requires_grad_(True)
    floor = RLOOFloor(policy, prior.model, count_reward, bos_prompt(device), k, max_new_tokens,
                      beta, eos=prior.eos_token_id, lr=lr)
    return floor.step
