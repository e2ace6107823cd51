"""Vectorised importance sampling against exact enumeration (vocab 4, T 3)."""

import math

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import AutoLMGuide, Importance
from pyro_lm.rewards import Lexicon

pytestmark = pytest.mark.filterwarnings("ignore:.*not registered in the param store")

T = 3
BETA = 1.0


def make_models(lm):
    reward = Lexicon(lm.tokenizer, {"t1": 1.0, "t3": -1.0})

    def single(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompt, T))
        pyro.factor("reward", reward(x) / BETA)
        return x

    def batched(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.factor("reward", reward(x) / BETA)
        return x

    return single, batched


def assert_log_z_close(post, exact_log_z):
    estimate, stderr = post.log_normalizer(), post.log_normalizer_stderr()
    assert torch.isfinite(stderr).all() and (stderr > 0).all()
    assert ((estimate - exact_log_z.to(estimate.device)).abs() < 4 * stderr).all(), \
        (estimate, exact_log_z, stderr)


def test_prior_proposal_single_prompt(prior):
    single, _ = make_models(prior)
    exact = enumerate_model(single, "t1")
    post = Importance(single, num_samples=4000).run("t1")
    assert post.log_weights.shape == (4000,)
    assert post.samples["x"].shape == (4000, T)
    assert post.samples["x"].device == prior.device
    assert_log_z_close(post, exact.log_Z)
    # prior proposal: the weights are the factors themselves
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})
    torch.testing.assert_close(post.log_weights, reward(post.samples["x"]) / BETA)


def test_prior_proposal_prompts_of_different_lengths(prior):
    _, batched = make_models(prior)
    prompts = ["t1", "t2 t3", "t3 t3 t1"]
    exact = enumerate_model(batched, prompts)
    post = Importance(batched, num_samples=3000, batch_size=1024).run(prompts)
    assert post.log_weights.shape == (3000, 3)
    assert post.samples["x"].shape == (3000, 3, T)
    assert_log_z_close(post, exact.log_Z)
    texts = post.text()
    assert len(texts) == 3000 and all(isinstance(t, str) for t in texts[0])


def test_guide_proposal(prior, guide_lm):
    single, batched = make_models(prior)
    guide = AutoLMGuide(batched, guide_lm)
    prompts = ["t1", "t2 t3"]
    exact = enumerate_model(batched, prompts)
    post = Importance(batched, guide, num_samples=3000).run(prompts)
    assert_log_z_close(post, exact.log_Z)
    # the weight is log p0 + factor - log q, exactly, for every sample
    x = post.samples["x"]
    dist = pyro_lm.LMDistribution(prior, prompts, T)
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})
    expected = dist.log_prob(x) + reward(x) / BETA - dist.with_lm(guide_lm).log_prob(x)
    torch.testing.assert_close(post.log_weights, expected, atol=1e-4, rtol=1e-4)


def test_guide_proposal_single_prompt_no_plate(prior, guide_lm):
    single, _ = make_models(prior)
    exact = enumerate_model(single, "t2")
    post = Importance(single, AutoLMGuide(single, guide_lm), num_samples=3000).run("t2")
    assert post.log_weights.shape == (3000,)
    assert_log_z_close(post, exact.log_Z)


def test_resample_draws_posterior_support(prior):
    _, batched = make_models(prior)
    post = Importance(batched, num_samples=200).run(["t1", "t2"])
    draws = post.resample(50)
    assert draws["x"].shape == (50, 2, T)
    assert post.ess().shape == (2,)
    assert ((post.ess() >= 1) & (post.ess() <= 200)).all()


def test_stock_pyro_importance_agrees(tiny_lm):
    """Stock (sequential) pyro.infer.Importance on the same program: log Z agrees.
    A mild reward (beta = 4) keeps 30 sequential samples informative."""
    reward = Lexicon(tiny_lm.tokenizer, {"t1": 1.0, "t3": -1.0})

    def single(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompt, T))
        pyro.factor("reward", reward(x) / 4.0)

    exact = enumerate_model(single, "t2").log_Z
    ours = Importance(single, num_samples=2000).run("t2")
    stock = pyro.infer.Importance(single, num_samples=30).run("t2")
    log_w = torch.stack([torch.as_tensor(w) for w in stock.log_weights])
    w = (log_w - log_w.max()).exp()
    stock_se = w.std() / (math.sqrt(len(w)) * w.mean())
    stock_log_z = stock.get_log_normalizer()
    assert abs(stock_log_z - exact) < 4 * stock_se, (stock_log_z, exact, stock_se)
    se = torch.sqrt(stock_se**2 + ours.log_normalizer_stderr()**2)
    assert abs(stock_log_z - ours.log_normalizer()) < 4 * se


def test_all_minus_inf_weights_raise(tiny_lm):
    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompt, T))
        pyro.factor("impossible", torch.full(x.shape[:-1], -math.inf, device=x.device))

    with pytest.raises(ValueError, match="weight zero"):
        Importance(model, num_samples=32).run("t1")


def test_per_token_factor_is_named(tiny_lm):
    """A factor of shape (N, T) clashes with the particle plate inside Pyro; the error names
    the site and the fix, not the internal plate."""
    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompt, T))
        pyro.factor("r", (x == 2).float())

    with pytest.raises(ValueError, match=r"site 'r': .*summed over its last dim"):
        Importance(model, num_samples=T + 1).run("t1")


def test_plus_inf_factor_raises(tiny_lm):
    """A +inf factor would make log Z +inf and the ESS NaN: refused, naming the algorithm."""
    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompt, T))
        pyro.factor("r", torch.where((x == 2).any(-1), math.inf, 0.0))

    with pytest.raises(ValueError, match=r"Importance: \+inf log-weights: a factor"):
        Importance(model, num_samples=64).run("t1")


@pytest.mark.parametrize("kwargs, name", [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 2.5}, "num_samples"),
    ({"num_samples": 8, "batch_size": 0}, "batch_size"),
])
def test_bad_arguments(tiny_lm, kwargs, name):
    single, _ = make_models(tiny_lm)
    with pytest.raises(ValueError, match=name):
        Importance(single, **kwargs)


def test_empty_prompts_and_a_program_without_latents(tiny_lm):
    _, batched = make_models(tiny_lm)
    with pytest.raises(ValueError, match="prompts"):
        Importance(batched, num_samples=4).run([])

    def evidence_only():  # nothing to infer: every weight is the evidence, log Z its value
        pyro.factor("f", torch.tensor(0.5))

    post = Importance(evidence_only, num_samples=4).run()
    assert post.samples == {} and post.log_weights.shape == (4,)
    assert torch.allclose(post.log_normalizer(), torch.tensor(0.5))
