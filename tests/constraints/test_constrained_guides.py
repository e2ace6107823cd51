"""A masked guide (``AutoLMGuide(constraints=)``) fitted by DPG and TrajectoryBalance: the
objectives score the guide's own (masked) law, against exact enumeration."""

import math

import pyro
import pytest
import torch
from constraint_lms import TEXT_PIECES, tiny_bpe_lm

import pyro_lm
from pyro_lm.constraints import MaskedLMDistribution, Regex
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import DPG, AutoLMGuide, SubTrajectoryBalance, TrajectoryBalance

pytestmark = pytest.mark.filterwarnings("ignore:.*not registered in the param store")
T = 3
RUNS = 400  # independent estimates at once: a plate of identical prompts


@pytest.fixture(scope="module")
def problem():
    lm = tiny_bpe_lm(TEXT_PIECES, extra_rows=1, eos_ids=[0, 1], specials=("<eos>", "<end>"))
    c = Regex(lm, "[ab]*")  # every viable prefix is accepted: no dead end at T

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.factor("valid", c(x))
            pyro.factor("reward", 0.7 * (x == 3).sum(-1).float())

    guide = AutoLMGuide(model, lm, constraints={"x": c})
    prompt = torch.zeros(1, 1, dtype=torch.long)
    exact = enumerate_model(model, prompt)
    with torch.no_grad():  # the masked law on the support
        log_q = MaskedLMDistribution(pyro_lm.LMDistribution(lm, prompt, T), c).log_prob(
            exact.support)
    return model, guide, exact, log_q


def mean_within(estimates, expected, slack=0.0):
    se = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - expected) < 4 * se + slack, (estimates.mean(), expected, se)


@pytest.mark.parametrize("divergence", ["kl", "jeffreys"])
def test_dpg_scores_the_masked_law(problem, divergence):
    """DPG's kl_pq estimate (self-normalised weights p~/q, q the masked law the samples come
    from) against the exact KL(p*||q_masked); scoring q unmasked overstates it."""
    model, guide, exact, log_q = problem
    pyro.set_rng_seed(0)
    loss = DPG(num_particles=64, divergence=divergence)
    prompts = torch.zeros(RUNS, 1, dtype=torch.long)
    loss.loss(model, guide, prompts)
    # kl_pq is summed over the plate; each element is a 64-particle estimate
    kl = loss.metrics["kl_pq"] / RUNS
    expected = float(exact.kl_p_q(log_q))
    assert abs(kl - expected) < 0.05 + 0.1 * expected, (kl, expected)


def test_trajectory_balance_scores_the_masked_law(problem):
    """TB's elbo metric, E_q[log p~ - log q] on the guide's samples, against the exact ELBO
    of the masked law; with the unmasked log q it is higher by E_q[-log R], R the masks'
    allowed mass."""
    model, guide, exact, log_q = problem
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = TrajectoryBalance(num_particles=8)
    loss.loss(model, guide, torch.zeros(RUNS, 1, dtype=torch.long))
    elbo = loss.metrics["elbo"] / RUNS
    expected = float(exact.elbo(log_q))
    assert abs(elbo - expected) < 0.05, (elbo, expected)


def test_subtrajectory_balance_refuses_a_masked_guide(problem):
    model, guide, _, _ = problem
    with pytest.raises(ValueError, match="constraints"):
        SubTrajectoryBalance(num_particles=4).loss(model, guide, torch.zeros(2, 1,
                                                                             dtype=torch.long))
