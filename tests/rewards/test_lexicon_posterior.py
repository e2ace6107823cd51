"""A forbidden word on a subword tokenizer: SMC and Importance against exact enumeration.

The tokenizer is byte-level with six tokens, among them "Ġthe" and "y", so that " they"
is spelled " the" + "y": a ``-inf`` word "the" must not prune the prefix " the". The
prior is a random GPT-2 on it (``subword_lm`` in ``conftest.py``), T = 3 (156
completions, enumerated exactly). ``R`` identical prompts in a plate are ``R``
independent runs (one particle system each), so the estimates' standard errors come
from their spread over the runs: :math:`\\hat Z / Z` has mean 1, and
:math:`\\hat Z\\, \\hat p(A) / Z` mean :math:`p^*(A)` for the event A "a word starts
with 'the' and is longer" (both unbiased).
"""

import math
import re

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import SMC, Importance
from pyro_lm.rewards import Lexicon, check_prefix_contract
from pyro_lm.rewards.base import decode_counted

T = 3
RUNS = 300


def forbidden_model(lm, reward):
    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.factor("no_the", reward(x))

    return model


def longer_than_the(lm, x):
    """Bool per completion: a word of its text starts with "the" and is longer."""
    flat = x.reshape(-1, T)
    texts = decode_counted(lm.tokenizer, flat, lm.eos_token_id)
    hit = [any(w.startswith("the") and w != "the" for w in re.findall(r"\w+", s))
           for s in texts]
    return torch.tensor(hit).reshape(x.shape[:-1])


def assert_mean_within(values, target, what):
    mean, se = values.mean(), values.std() / math.sqrt(values.numel())
    assert abs(mean - target) < 4 * se, (what, float(mean), float(target), float(se))


@pytest.mark.parametrize("mode", ["tokens", "text"])
@pytest.mark.parametrize("algorithm", ["SMC", "Importance"])
def test_forbidden_word_posterior_matches_exact(subword_lm, mode, algorithm):
    reward = Lexicon(subword_lm, {"the": -math.inf, "cat": 1.0}, mode=mode)
    model = forbidden_model(subword_lm, reward)
    prompts = torch.full((RUNS, 1), subword_lm.tokenizer.convert_tokens_to_ids("."))
    exact = enumerate_model(model, prompts[:1])
    p_they = float(exact.expectation(longer_than_the(subword_lm, exact.support).float()))
    assert p_they > 0.05, "the test needs completions such as ' they' to matter"
    check_prefix_contract(reward, exact.support[:, 0], lm=subword_lm)

    if algorithm == "SMC":
        post = SMC(model, num_particles=16, ess_threshold=1.0).run(prompts)
        assert post.history["resampled"].any(), "the test should exercise resampling"
    else:
        post = Importance(model, num_samples=16).run(prompts)
    log_w = post.log_weights  # (16, RUNS)
    z_ratio = (post.log_normalizer() - exact.log_Z).exp()
    assert_mean_within(z_ratio, 1.0, "Z_hat / Z")
    hit = longer_than_the(subword_lm, post.samples["x"]).float()
    p_hat = (log_w.softmax(0) * hit).sum(0)
    assert_mean_within(z_ratio * p_hat, p_they, "Z_hat p_hat(A) / Z")
    assert hit[torch.isfinite(log_w)].any(), "completions such as ' they' must survive"
