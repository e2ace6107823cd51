"""Moment constraints (GDC): the fitted lambda meets E[phi] = mu under EXACT enumeration."""

import math

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm.exact import ExactPosterior, enumerate_model
from pyro_lm.infer import IMH, MomentConstraint, fit_moments
from pyro_lm.lm import toy_lm

T = 3


def has_token_1(x):
    return (x == 1).any(-1)


def exact_tilted(dist, constraint, base_log_joint=None):
    """The exact p0 exp(lambda . phi) (or base x exp(lambda . phi)) over the support."""
    support = dist.enumerate_support()
    with torch.no_grad():
        log_prior = dist.log_prob(support)
    base = log_prior if base_log_joint is None else base_log_joint
    return ExactPosterior(support, log_prior, base + constraint(support).to(base.dtype), dist)


def has_token_2(x):
    return (x == 2).any(-1)


def test_fit_moments_meets_the_exact_target(device):
    """Token 2 appears in 11% of the prior's completions; ask for half of them."""
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5, device=device)
    dist = pyro_lm.LMDistribution(prior, torch.tensor([0], device=device), T)
    fit = fit_moments(dist, has_token_2, 0.5, num_samples=16384, min_ess=10_000, max_rounds=3)
    assert fit.converged
    assert abs(fit.moments.item() - 0.5) < 1e-5  # solved on the samples
    assert fit.num_samples > 16384  # the ESS of one round was too low: it drew more
    exact = exact_tilted(dist, fit.constraint)
    phi = has_token_2(exact.support).double()
    achieved = exact.expectation(phi).item()
    # The sampling error of the fit is ~ sd(phi) / sqrt(ESS) <= 0.5 / sqrt(ESS); with the ESS
    # reached, 4 standard errors are below the required 0.02.
    assert 4 * 0.5 / math.sqrt(fit.ess.min()) < 0.02
    assert abs(achieved - 0.5) < 0.02, achieved
    start = (exact.log_prior.exp() * phi).sum().item()
    assert abs(start - 0.5) > 0.3  # the constraint really moves the distribution


def test_fit_on_a_model_with_two_features_and_batched_prompts():
    """The base includes the model's factor; one lambda shared by two prompts."""
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", 2):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, T))
            pyro.factor("short", -0.5 * (x != 0).sum(-1).float())

    def features(x):
        return torch.stack([(x == 1).any(-1), (x == 3).any(-1)], -1).float()

    mu = torch.tensor([0.4, 0.3])
    num = 16384
    fit = fit_moments(model, features, mu, prompts, num_samples=num, min_ess=0.5 * num)
    constraint = fit.constraint

    def tilted(prompts):
        with pyro.plate("prompts", 2):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, T))
            pyro.factor("short", -0.5 * (x != 0).sum(-1).float())
            pyro.factor("moments", constraint(x))

    exact = enumerate_model(tilted, prompts)
    phi = features(exact.support)  # (n, 2 prompts, 2 features)
    achieved = torch.stack([exact.expectation(phi[..., j]).mean() for j in range(2)])
    sd_bound = 4 * 0.5 / math.sqrt(fit.ess.min())
    assert sd_bound < 0.03
    assert (achieved - mu).abs().max() < sd_bound, achieved
    assert fit.ess.shape == (2,) and fit.log_Z.shape == (2,)


def test_constraint_is_a_factor_for_any_sampler():
    """Using the fitted constraint as a factor, IMH samples p0 exp(lambda . phi)."""
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    constraint = MomentConstraint(has_token_1, 0.5, coefficients=[1.0])

    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompt, T))
        pyro.factor("moments", constraint(x))

    prompt = torch.tensor([0])
    exact = enumerate_model(model, prompt)
    target = exact.expectation(has_token_1(exact.support).double()).item()
    post = IMH(model, num_steps=20, num_chains=2000, burn_in=19).run(prompt)
    freq = has_token_1(post.samples["x"]).double().mean().item()
    assert abs(freq - target) < 4 * math.sqrt(target * (1 - target) / 2000) + 1e-3
    assert torch.equal(constraint.log_factor(exact.support),
                       has_token_1(exact.support).float())


def test_method_fit_updates_the_constraint_in_place():
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    dist = pyro_lm.LMDistribution(prior, torch.tensor([0]), T)
    constraint = MomentConstraint(has_token_1, [0.5])
    result = constraint.fit(dist, num_samples=2048, min_ess=100)
    assert torch.equal(constraint.coefficients, result.coefficients.cpu())
    assert constraint.coefficients.abs().item() > 0


@pytest.mark.parametrize("mu", [1.5, 1.0, -0.1])
def test_unreachable_target_names_target_moments(mu):
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    dist = pyro_lm.LMDistribution(prior, torch.tensor([0]), T)
    with pytest.raises(ValueError, match=r"target_moments\[0\]"):
        fit_moments(dist, has_token_1, mu, num_samples=256)


def test_bad_features_and_inputs():
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    dist = pyro_lm.LMDistribution(prior, torch.tensor([0]), T)
    with pytest.raises(ValueError, match="features.*NaN"):
        fit_moments(dist, lambda x: torch.full(x.shape[:-1], math.nan), 0.5, num_samples=16)
    with pytest.raises(ValueError, match="features.*shape"):
        fit_moments(dist, lambda x: torch.zeros(x.shape[:-1] + (3,)), 0.5, num_samples=16)
    with pytest.raises(ValueError, match="target_moments"):
        MomentConstraint(has_token_1, [math.nan])
    with pytest.raises(TypeError, match="features"):
        MomentConstraint("not callable", 0.5)
    with pytest.raises(ValueError, match="num_samples"):
        fit_moments(dist, has_token_1, 0.5, num_samples=0)
    with pytest.raises(TypeError, match="prior_or_model"):
        fit_moments(42, has_token_1, 0.5)
    with pytest.raises(TypeError, match="tol: expected a number"):
        fit_moments(dist, has_token_1, 0.5, tol="a")
    with pytest.raises(ValueError, match="tol: expected a number > 0"):
        fit_moments(dist, has_token_1, 0.5, tol=0.0)
    with pytest.raises(ValueError, match="min_ess: expected a number >= 0"):
        fit_moments(dist, has_token_1, 0.5, min_ess=math.nan)
    with pytest.raises(TypeError, match="min_ess: expected a number"):
        fit_moments(dist, has_token_1, 0.5, min_ess="a")


def test_all_zero_base_weights_are_a_clear_error():
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)

    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompt, T))
        pyro.factor("never", torch.full(x.shape[:-1], -math.inf))

    with pytest.raises(ValueError, match="log_weights.*-inf"):
        fit_moments(model, has_token_1, 0.5, torch.tensor([0]), num_samples=64)
