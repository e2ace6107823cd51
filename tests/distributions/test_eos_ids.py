"""Every EOS id ends a completion: a model whose generation config lists two EOS ids
(instruct models end a turn with one and a document with another) is scored, sampled,
validated, enumerated, continued, decoded, smoothed by SMC and enumerated exactly with
the value padded after the first of either."""

import math

import pyro
import pytest
import torch
from checks import pooled_chi2_pvalue

import pyro_lm
from pyro_lm import LMDistribution
from pyro_lm.distributions.prefix import counted_mask
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import SMC, Importance
from pyro_lm.lm import decoding, toy_lm
from pyro_lm.rewards import Callable

#: the tokenizer's EOS is 0; the generation config adds 3 (listed first there)
A, B = 0, 3


def two_eos_lm(pad=None, seed=2):
    lm = toy_lm(vocab_size=5, seed=seed, init_std=0.6, pad_token_id=pad)
    lm.model.generation_config.eos_token_id = [B, A]
    return lm


@pytest.fixture(params=[None, 4], ids=["pad=eos", "pad=4"])
def lm(request):
    return two_eos_lm(request.param)


def test_eos_token_ids_put_the_tokenizer_eos_first(lm):
    assert lm.eos_token_ids == (A, B) and lm.eos_token_id == A
    assert lm.pad_token_id == (A if lm.tokenizer.pad_token == "<eos>" else 4)


def test_log_prob_counts_the_second_eos_and_nothing_after(lm):
    prompt = torch.tensor([0, 2])
    pad = lm.pad_token_id
    d = LMDistribution(lm, prompt, 4)
    x = torch.tensor([1, B, pad, pad])
    expected, context = 0.0, prompt.tolist()
    for token in (1, B):
        logits = lm.model(torch.tensor([context])).logits[0, -1].double()
        expected += float(logits.log_softmax(-1)[token])
        context.append(token)
    assert math.isclose(float(d.log_prob(x)), expected, abs_tol=1e-5)
    token_lp = d.token_log_probs(x)
    assert token_lp[2:].abs().max() == 0


@pytest.mark.parametrize("fast", [True, False], ids=["gpt2-decoder", "generic-decoder"])
def test_sampling_stops_at_either_eos(lm, fast, monkeypatch):
    monkeypatch.setattr(decoding, "FAST_DECODING", fast)
    torch.manual_seed(0)
    d = LMDistribution(lm, ["t1", "t2 t4"], 4, validate_args=True)
    x, log_prob = d.sample_with_log_prob((400,))
    ended = (x == A) | (x == B)
    first = torch.where(ended.any(-1), ended.long().argmax(-1), 4)
    after = torch.arange(4) > first[..., None]
    assert (x[after] == lm.pad_token_id).all()  # padded after the first of either
    assert (x == B).any() and (x[~after] == A).any()  # both EOS ids occur as endings
    assert bool(d.support.check(x).all())
    torch.testing.assert_close(log_prob, d.log_prob(x), atol=1e-4, rtol=0)


def test_validation_and_canonicalize_know_every_eos(lm):
    pad = lm.pad_token_id
    d = LMDistribution(lm, "t1", 3, validate_args=True)
    bad = torch.tensor([2, B, 1])
    with pytest.raises(ValueError, match=r"after the first EOS \(\[0, 3\]\) must hold"):
        d.log_prob(bad)
    assert d.canonicalize(bad).tolist() == [2, B, pad]
    assert d.support.check(torch.tensor([[2, B, pad], [2, B, 1]])).tolist() == [True, False]


def test_enumerated_support_sums_to_one(lm):
    d = LMDistribution(lm, ["t1", "t2 t1"], 3)
    support = d.enumerate_support()
    # |E| sum_{k<T} (V-|E|)^k + (V-|E|)^T with V = 5, |E| = 2
    assert support.shape[0] == d.support_size() == 2 * (1 + 3 + 9) + 27
    assert torch.unique(support[:, 0], dim=0).shape[0] == support.shape[0]
    assert bool(d.support.check(support).all())
    torch.testing.assert_close(d.log_prob(support).exp().sum(0), torch.ones(2), atol=1e-5,
                               rtol=0)


def test_sampling_matches_exact_enumeration_chi_square():
    lm = two_eos_lm()
    torch.manual_seed(0)
    d = LMDistribution(lm, "t1", 2)
    support = d.enumerate_support()
    probs = d.log_prob(support).exp().double()
    n = 20000
    x = d.sample((n,))
    counts = (x[:, None, :] == support[None]).all(-1).sum(0).double()
    assert counts.sum() == n  # every draw is in the support, in canonical form
    assert pooled_chi2_pvalue(counts, probs) > 1e-3


def test_prompt_with_drops_or_keeps_either_eos(lm):
    d = LMDistribution(lm, torch.tensor([[0, 2], [0, 2]]), 3)
    pad = lm.pad_token_id
    value = torch.tensor([[1, B, pad], [2, A, pad]])
    ids, mask = d.prompt_with(value)
    assert [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)] == \
        [[0, 2, 1], [0, 2, 2]]
    ids, mask = d.prompt_with(value, keep_eos=True)
    assert [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)] == \
        [[0, 2, 1, B], [0, 2, 2, A]]


def test_decode_stops_at_either_eos(lm):
    assert lm.decode(torch.tensor([[1, B, 2], [2, A, 1], [1, 2, 1]])) == ["t1", "t2", "t1 t2 t1"]


def count_ones(lm):
    """Reward: the number of t1 tokens before the first EOS (either id)."""
    return Callable(lambda x: (counted_mask(x, lm.eos_token_ids) & (x == 1)).sum(-1).float(),
                    name="count_ones")


def program(lm, reward, t=3):
    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", LMDistribution(lm, prompts, t))
            pyro.factor("reward", reward(x))
        return x

    return model


def test_exact_posterior_over_two_eos_ids_matches_log_prob():
    lm = two_eos_lm()
    reward = count_ones(lm)
    exact = enumerate_model(program(lm, reward), ["t1"])
    d = LMDistribution(lm, ["t1"], 3)
    support = d.enumerate_support()
    assert exact.support.shape[0] == support.shape[0]
    torch.testing.assert_close(exact.log_prior.reshape(-1), d.log_prob(support).reshape(-1),
                               atol=1e-5, rtol=0)
    assert math.isclose(float(exact.probs.sum()), 1.0, rel_tol=1e-5)
    post = pyro_lm.exact.posterior(lm, reward, 1.0, ["t1"], 3)
    torch.testing.assert_close(post.log_Z, exact.log_Z, atol=1e-5, rtol=0)


def test_smc_and_importance_end_particles_at_either_eos():
    """log Z of SMC (whose finished particles stop at either EOS) and Importance is unbiased
    against exact enumeration: 64 independent replicates of one prompt."""
    lm = two_eos_lm()
    reward = count_ones(lm)
    model = program(lm, reward)
    exact = enumerate_model(model, ["t1"])
    prompts = ["t1"] * 64
    pyro.set_rng_seed(0)
    for post in (SMC(model, num_particles=16).run(prompts),
                 Importance(model, num_samples=16).run(prompts)):
        x = post.samples["x"]
        assert bool(LMDistribution(lm, prompts, 3).support.check(x).all())
        ratio = (post.log_normalizer() - exact.log_Z).exp().reshape(-1)
        se = ratio.std() / math.sqrt(ratio.numel())
        assert abs(ratio.mean() - 1) < 4 * se, (type(post), ratio.mean(), se)
    assert ((x == B).any(-1)).any()  # completions ended by the second EOS were drawn
