"""QRS and IMH: sample frequencies against the exact posterior (chi-square at p = 1e-3)."""

import contextlib
import math

import pyro
import pytest
import torch
from checks import exact_chi2_pvalue

import pyro_lm
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import IMH, QRS, AutoLMGuide, pick_log_bound
from pyro_lm.lm import toy_lm

T = 3
P_VALUE = 1e-3


def make_problem(device, prompts=None, scale=0.5):
    """Prior toy LM (vocab 4, T 3), factor = scale * number of token-1's."""
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5, device=device)

    def model(prompts):
        batched = prompts.dim() == 2
        with pyro.plate("prompts", prompts.shape[0]) if batched else contextlib.nullcontext():
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, T))
            pyro.factor("reward", scale * (x == 1).sum(-1).float())

    prompts = torch.tensor([0], device=device) if prompts is None else prompts.to(device)
    return prior, model, prompts


def test_chi2_has_power_against_prior_samples():
    """The goodness-of-fit check below can tell the prior from the posterior."""
    prior, model, prompt = make_problem("cpu")
    exact = enumerate_model(model, prompt)
    samples = pyro_lm.LMDistribution(prior, prompt, T).sample((1000,))
    assert exact_chi2_pvalue(exact, samples) < P_VALUE


def test_qrs_is_exact_with_a_bound_above_every_ratio(device):
    prior, model, prompt = make_problem(device)
    exact = enumerate_model(model, prompt)
    log_bound = (exact.log_joint - exact.log_prior).max().item()  # max p~/p0
    post = QRS(model, log_bound=log_bound, num_samples=1000, batch_size=2000).run(prompt)
    assert post.samples["x"].shape == (1000, T)
    assert (post.log_weights == 0).all()
    assert exact_chi2_pvalue(exact, post.samples["x"]) > P_VALUE
    extras = post.extras
    assert 0 < extras["acceptance_rate"] <= 1
    assert extras["frac_above_bound"] == 0 and extras["tv_estimate"] == 0
    # The acceptance rate estimates Z / bound; 4 binomial standard errors.
    n = extras["num_proposals"]
    rate = (exact.log_Z - log_bound).exp().item()
    assert abs(extras["acceptance_rate"].item() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)


def test_qrs_low_bound_trades_exactness_for_acceptance():
    prior, model, prompt = make_problem("cpu", scale=1.0)
    exact = enumerate_model(model, prompt)
    log_ratio = exact.log_joint - exact.log_prior
    high = QRS(model, log_bound=log_ratio.max().item(), num_samples=50).run(prompt)
    low = QRS(model, log_bound=log_ratio.max().item() - 2, num_samples=50).run(prompt)
    assert low.extras["acceptance_rate"] > high.extras["acceptance_rate"]
    assert low.extras["frac_above_bound"] > 0
    assert low.extras["tv_estimate"] > 0 and high.extras["tv_estimate"] == 0


def test_qrs_batched_prompts_and_guide_proposal():
    prior, model, prompts = make_problem("cpu", prompts=torch.tensor([[0], [2]]))
    guide = AutoLMGuide(model, prior.trainable_copy())
    post = QRS(model, proposal=guide, num_samples=20, quantile=0.9).run(prompts)
    assert post.samples["x"].shape == (20, 2, T)
    assert post.log_weights.shape == (20, 2)
    assert post.extras["acceptance_rate"].shape == (2,)
    assert post.log_normalizer().shape == (2,)


def test_pick_log_bound():
    log_w = torch.tensor([[0.0, -math.inf], [2.0, 1.0], [1.0, -math.inf]])
    assert torch.equal(pick_log_bound(log_w), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="quantile"):
        pick_log_bound(log_w, 0.0)
    with pytest.raises(ValueError, match="log_weights.*-inf"):
        pick_log_bound(torch.full((3, 1), -math.inf))


def test_qrs_errors():
    prior, model, prompt = make_problem("cpu")
    with pytest.raises(ValueError, match="num_samples"):
        QRS(model, num_samples=0)
    with pytest.raises(ValueError, match="log_bound"):
        QRS(model, log_bound=float("nan"))
    with pytest.raises(RuntimeError, match="max_proposals"):
        QRS(model, log_bound=50.0, num_samples=10, batch_size=10, max_proposals=20).run(prompt)


def test_imh_converges_to_the_exact_posterior(device):
    """1000 independent chains; each chain's last state after 24 steps is (nearly) exact:
    the IMH distance to p* after n steps is at most (1 - Z / max w)^n < 1e-3 here."""
    prior, model, prompt = make_problem(device)
    exact = enumerate_model(model, prompt)
    rate = 1 - (exact.log_Z - (exact.log_joint - exact.log_prior).max()).exp().item()
    assert rate**24 < 1e-3
    post = IMH(model, num_steps=24, num_chains=1000, burn_in=23).run(prompt)
    assert post.samples["x"].shape == (1000, T)
    assert exact_chi2_pvalue(exact, post.samples["x"]) > P_VALUE
    assert 0 < post.extras["acceptance_rate"] <= 1
    assert post.history["accepted"].shape == (24, 1000)
    assert post.history["accepted"].dtype == torch.bool


def test_imh_chains_layout_and_guide_proposal():
    prior, model, prompts = make_problem("cpu", prompts=torch.tensor([[0], [2]]))
    guide = AutoLMGuide(model, prior.trainable_copy())
    post = IMH(model, proposal=guide, num_steps=10, num_chains=3, burn_in=4,
               batch_size=7).run(prompts)
    assert post.samples["x"].shape == (3 * 6, 2, T)
    assert post.history["accepted"].shape == (10, 3, 2)
    assert post.history["log_weight"].shape == (10, 3, 2)
    assert post.extras["num_chains"] == 3 and post.extras["num_draws"] == 6
    # Chain-major: draw d of chain c is row c * D + d, the state after step burn_in + d + 1.
    chains = post.samples["x"].reshape(3, 6, 2, T)
    accepted = post.history["accepted"][5:]  # steps 6..10
    unchanged = (chains[:, 1:] == chains[:, :-1]).all(-1)  # (3, 5, 2)
    assert not (~unchanged & ~accepted.transpose(0, 1)).any()  # moves only when accepted
    rate = post.extras["acceptance_rate"]
    assert rate.shape == (2,) and ((rate > 0) & (rate <= 1)).all()


def test_imh_errors():
    prior, model, prompt = make_problem("cpu")
    with pytest.raises(ValueError, match="burn_in"):
        IMH(model, num_steps=5, burn_in=5)
    with pytest.raises(ValueError, match="num_chains"):
        IMH(model, num_chains=0)

    def dead(prompts):
        x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, T))
        pyro.factor("never", torch.full(x.shape[:-1], -math.inf))

    with pytest.raises(ValueError, match="log_weights.*-inf"):
        IMH(dead, num_steps=3, num_chains=2).run(prompt)
