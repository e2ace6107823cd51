import math

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm import LMDistribution
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import Lexicon


def test_exact_log_z_by_brute_force(tiny_lm):
    reward = Lexicon(tiny_lm.tokenizer, {"t1": 1.0, "t3": -2.0})
    beta = 0.7
    post = pyro_lm.exact.posterior(tiny_lm, reward, beta, "", 2)
    d = LMDistribution(tiny_lm, "", 2)
    total = 0.0
    for x in d.enumerate_support():
        total += math.exp(float(d.log_prob(x)) + float(reward(x)) / beta)
    assert math.isclose(float(post.log_Z), math.log(total), rel_tol=1e-5)
    assert math.isclose(float(post.probs.sum()), 1.0, rel_tol=1e-5)


def test_enumerate_model_agrees_with_functional_form(tiny_lm):
    reward = Lexicon(tiny_lm.tokenizer, {"t2": 1.0})
    prompts = ["", "t1 t1"]

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", LMDistribution(tiny_lm, prompts, 3))
            pyro.factor("reward", reward(x) / 0.5)

    a = pyro_lm.exact.enumerate_model(model, prompts)
    b = pyro_lm.exact.posterior(tiny_lm, reward, 0.5, prompts, 3)
    assert a.log_Z.shape == (2,)
    assert torch.allclose(a.log_Z, b.log_Z, atol=1e-5)
    assert torch.allclose(a.log_posterior, b.log_posterior, atol=1e-5)


def test_kl_identities(tiny_lm):
    reward = Lexicon(tiny_lm.tokenizer, {"t2": 1.0})
    post = pyro_lm.exact.posterior(tiny_lm, reward, 0.5, "", 3)
    guide = toy_lm(vocab_size=4, seed=7, init_std=0.5)
    # ELBO = log Z - KL(q || p*) and KL(p* || p*) = 0
    assert torch.allclose(post.elbo(guide), post.log_Z - post.kl_q_p(guide), atol=1e-4)
    assert float(post.kl_q_p(post.log_posterior)) == pytest.approx(0.0, abs=1e-6)
    assert float(post.kl_p_q(guide)) > 0 and float(post.kl_q_p(guide)) > 0
    assert 0 < float(post.tv(guide)) < 1
    # KL(q || p0) = E_q[log q - log p0]; for q = p0 it is 0 and ELBO = E_p0[r]/beta
    assert float(post.kl_q_prior(tiny_lm)) == pytest.approx(0.0, abs=1e-6)


def test_exact_gradient_flows_to_the_guide(tiny_lm):
    reward = Lexicon(tiny_lm.tokenizer, {"t2": 1.0})
    post = pyro_lm.exact.posterior(tiny_lm, reward, 0.5, "", 2)
    guide = tiny_lm.trainable_copy()
    post.kl_q_p(guide).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())


def test_hard_constraints_that_exclude_everything_raise(tiny_lm):
    impossible = pyro_lm.rewards.Callable(lambda x: torch.full(x.shape[:-1], -math.inf))
    with pytest.raises(ValueError, match="hard constraints cannot be met"):
        pyro_lm.exact.posterior(tiny_lm, impossible, 1.0, "", 2)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_beta_must_be_positive(tiny_lm, beta):
    reward = Lexicon(tiny_lm.tokenizer, {"t2": 1.0})
    with pytest.raises(ValueError, match="beta: must be > 0"):
        pyro_lm.exact.posterior(tiny_lm, reward, beta, "", 2)


def test_enumerate_model_enumerates_sites_jointly(tiny_lm):
    def model():
        a = pyro.sample("a", LMDistribution(tiny_lm, "", 2))
        pyro.sample("b", LMDistribution(tiny_lm, "", 2))
        pyro.factor("f", (a == 1).sum(-1).float())

    exact = pyro_lm.exact.enumerate_model(model)
    single = LMDistribution(tiny_lm, "", 2)
    n = single.support_size()
    assert exact.log_joint.shape == (n * n,)
    # b is untouched by the factor: its marginal is the prior; a's is the tilted prior
    values, probs = exact.marginal("b")
    assert torch.allclose(probs, single.log_prob(values).exp(), atol=1e-6)
    values, probs = exact.marginal("a")
    tilted = single.log_prob(values) + (values == 1).sum(-1).float()
    assert torch.allclose(probs, torch.softmax(tilted, 0), atol=1e-6)
    assert torch.allclose(exact.log_Z, tilted.logsumexp(0), atol=1e-5)


def test_enumerate_model_refuses_what_it_cannot_enumerate(tiny_lm):
    def continuous():
        pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
        pyro.sample("x", LMDistribution(tiny_lm, "", 2))

    with pytest.raises(ValueError, match="'mu'.*no finite support"):
        pyro_lm.exact.enumerate_model(continuous)

    def hidden():
        x = pyro.sample("x", LMDistribution(tiny_lm, "", 2))
        with pyro.poutine.block():
            y = pyro.sample("y", LMDistribution(tiny_lm, "", 2))
        pyro.factor("f", (x[..., 0] + y[..., 0]).float())

    with pytest.raises(ValueError, match="randomness that the enumeration does not see"):
        pyro_lm.exact.enumerate_model(hidden)

    with pytest.raises(ValueError, match="max_joint"):
        pyro_lm.exact.enumerate_model(lambda: pyro.sample(
            "x", LMDistribution(tiny_lm, "", 6)), max_joint=100)
