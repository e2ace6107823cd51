"""AutoLMGuide: the model's LM sites, with their prompts and plates, drawn from the guide LM."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_lm import LMDistribution
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import AutoLMGuide, SequenceELBO
from pyro_lm.infer.program import lm_site_names
from pyro_lm.lm import toy_lm
from pyro_lm.poutine import skip_lm
from pyro_lm.rewards import Lexicon

T = 3
BETA = 0.5


def two_site_model(prior, reward):
    """A question and an answer, each a completion of its own prompt, both in one plate,
    and a title outside any plate."""

    def model(questions, answers):
        title = pyro.sample("title", LMDistribution(prior, "t1", T))
        pyro.factor("title_reward", reward(title) / BETA)
        with pyro.plate("pairs", questions.shape[0]):
            q = pyro.sample("q", LMDistribution(prior, questions, T))
            a = pyro.sample("a", LMDistribution(prior, answers, T))
            pyro.factor("reward", (reward(q) + reward(a)) / BETA)

    return model


def one_site_model(prior, reward, prompts):
    def model():
        if isinstance(prompts, str):
            x = pyro.sample("x", LMDistribution(prior, prompts, T))
            pyro.factor("reward", reward(x) / BETA)
            return
        with pyro.plate("pairs", prompts.shape[0]):
            x = pyro.sample("x", LMDistribution(prior, prompts, T))
            pyro.factor("reward", reward(x) / BETA)

    return model


@pytest.fixture
def setting(tiny_lm):
    policy = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=3, init_std=0.5).trainable_copy()
    reward = Lexicon(tiny_lm.tokenizer, {"t1": 1.0, "t3": -1.0})
    questions = torch.tensor([[0], [2]])
    answers = torch.tensor([[1, 2], [3, 3]])
    return tiny_lm, policy, reward, questions, answers


def test_guide_has_every_lm_site_with_its_plates_once(setting):
    prior, policy, reward, questions, answers = setting
    model = two_site_model(prior, reward)
    guide = AutoLMGuide(model, policy)
    trace = pyro.poutine.trace(skip_lm(model)).get_trace(questions, answers)
    assert lm_site_names(trace) == ["title", "q", "a"]
    trace = poutine.trace(guide).get_trace(questions, answers)
    sites = {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}
    # the plate's subsample site is recorded once, though two LM sites sit inside it
    assert sorted(sites) == ["a", "pairs", "q", "title"]
    assert [f.name for f in sites["q"]["cond_indep_stack"]] == ["pairs"]
    assert sites["title"]["cond_indep_stack"] == ()
    for name, prompts in (("title", "t1"), ("q", questions), ("a", answers)):
        fn = sites[name]["fn"]
        assert fn.lm is policy and fn.max_new_tokens == T
        expected = LMDistribution(policy, prompts, T).log_prob(sites[name]["value"])
        torch.testing.assert_close(fn.log_prob(sites[name]["value"]), expected)
    assert sites["q"]["value"].shape == (2, T) and sites["title"]["value"].shape == (T,)
    assert "reward" not in trace.nodes  # factors are left out
    assert any(k.startswith("guide_lm$$$") for k in pyro.get_param_store().keys())


def test_two_sites_in_one_plate_elbo_is_unbiased(setting):
    """The sites are independent a posteriori, so the exact ELBO is the sum of the three
    single-site ELBOs (each by enumeration); the mean SequenceELBO loss matches it."""
    prior, policy, reward, questions, answers = setting
    model = two_site_model(prior, reward)
    guide = AutoLMGuide(model, policy)
    exact = sum(enumerate_model(one_site_model(prior, reward, p)).elbo(policy).sum()
                for p in ("t1", questions, answers)).item()
    elbo = SequenceELBO(num_particles=16)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        losses = torch.tensor([elbo.loss(model, guide, questions, answers) for _ in range(60)])
    se = losses.std() / math.sqrt(losses.numel())
    assert abs(losses.mean() + exact) < 4 * se, (losses.mean(), -exact, se)
    # and a training step runs through both sites and the title
    for p in policy.parameters():
        p.grad = None
    elbo.loss_and_grads(model, guide, questions, answers)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in policy.parameters() if p.requires_grad)


def test_guide_lm_with_another_tokenizer_is_a_clear_error(setting):
    prior, _, reward, questions, answers = setting
    other = toy_lm(vocab_size=5, n_layer=1, n_embd=16, seed=3)
    guide = AutoLMGuide(two_site_model(prior, reward), other.trainable_copy())
    with pytest.raises(ValueError, match="lm: tokenizer mismatch"):
        guide(questions, answers)
    with pytest.raises(TypeError, match="lm: expected a pyro_lm.CausalLM"):
        AutoLMGuide(two_site_model(prior, reward), other.model)


# ------------------------------------------------------------ composing with other guides
def topic_model(prior, reward):
    """A latent topic z picks the prompt; the completion is rewarded."""
    prompts = torch.tensor([[1], [2], [3]])

    def model():
        z = pyro.sample("z", pyro.distributions.Categorical(logits=torch.tensor([0.0, 1, -1])))
        x = pyro.sample("x", LMDistribution(prior, prompts[z], T))
        pyro.factor("reward", reward(x) / BETA)

    return model


def topic_guide():
    probs = pyro.param("z_probs", torch.ones(3) / 3,
                       constraint=pyro.distributions.constraints.simplex)
    pyro.sample("z", pyro.distributions.Categorical(probs))


def test_latent_guide_draws_the_other_latents_and_the_lm_site_follows_them(setting):
    prior, policy, reward, _, _ = setting
    model = topic_model(prior, reward)
    guide = AutoLMGuide(model, policy, latent_guide=topic_guide)
    pyro.param("z_probs", torch.tensor([0.0, 0.0, 1.0]),
               constraint=pyro.distributions.constraints.simplex)
    trace = poutine.trace(guide).get_trace()
    assert trace.nodes["z"]["value"].item() == 2  # drawn by the latent guide, once
    assert trace.nodes["x"]["fn"].prompt_ids.tolist() == [[3]]  # the prompt z chose
    exact = enumerate_model(model)
    # the exact KL of this guide program (z from the latent guide, x from the guide LM)
    del pyro.get_param_store()["z_probs"]  # start again from uniform
    start = exact.kl_q_p(guide).item()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}),
                         loss=SequenceELBO(num_particles=16))
    for _ in range(150):
        svi.step()
    with torch.no_grad():
        end = exact.kl_q_p(guide).item()
    assert end < 0.5 * start, (start, end)
    # the trained q(z) moved towards the exact posterior marginal of z
    values, probs = exact.marginal("z")
    q = pyro.param("z_probs").detach()
    assert (q - probs).abs().sum() < (torch.ones(3) / 3 - probs).abs().sum()


def test_latent_guide_can_be_a_pyro_autoguide(setting):
    """A continuous latent drawn by AutoNormal: importance sampling with the composed guide
    and with the prior estimate the same Z."""
    prior, policy, reward, _, _ = setting

    def model():
        mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
        x = pyro.sample("x", LMDistribution(prior, "t1", T))
        pyro.factor("reward", reward(x) * mu - mu**2)

    latent = pyro.infer.autoguide.AutoNormal(poutine.block(skip_lm(model), expose=["mu"]),
                                             init_scale=0.5)
    # the LM part is the prior's own copy: the weights differ only through mu
    guide = AutoLMGuide(model, prior.trainable_copy(), latent_guide=latent)
    a = pyro_lm_importance(model, None)
    b = pyro_lm_importance(model, guide)
    se = (a.log_normalizer_stderr() ** 2 + b.log_normalizer_stderr() ** 2).sqrt()
    assert (a.log_normalizer() - b.log_normalizer()).abs() < 4 * se + 1e-3
    assert "mu" in b.samples and b.samples["mu"].shape == (4000,)


def pyro_lm_importance(model, guide):
    from pyro_lm.infer import Importance

    with torch.no_grad():
        return Importance(model, guide=guide, num_samples=4000).run()


def test_inside_an_autoguidelist_it_says_to_use_latent_guide(setting):
    prior, policy, reward, _, _ = setting
    model = topic_model(prior, reward)
    guides = pyro.infer.autoguide.AutoGuideList(model)
    guides.append(topic_guide)
    guides.append(AutoLMGuide(model, policy))
    with pytest.raises(RuntimeError, match="latent_guide"):
        poutine.trace(guides).get_trace()


def test_a_second_guide_of_the_same_name_is_refused():
    """Two guides named alike in one param store: pyro.module would give the optimiser the
    first guide's tensors, so the second LM would never change; refused, naming ``name``."""
    pyro.clear_param_store()
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1)

    def model(prompt):
        x = pyro.sample("x", LMDistribution(prior, prompt, 2))
        pyro.factor("r", (x == 1).sum(-1).float())

    first = AutoLMGuide(model, prior.trainable_copy())
    first("t1")
    AutoLMGuide(model, first.lm)("t1")  # the same LM again: its own tensors, fine
    with pytest.raises(ValueError, match="name: the param store already holds 'guide_lm"):
        AutoLMGuide(model, prior.trainable_copy())("t1")
    AutoLMGuide(model, prior.trainable_copy(), name="other")("t1")
    pyro.clear_param_store()


@pytest.mark.parametrize("loss", ["SequenceELBO", "TrajectoryBalance", "DPG"])
def test_the_trainable_prior_as_its_own_guide_is_refused_in_training(loss):
    """A guide whose LM is the model's own trainable LM: each step moves the prior with the
    guide (SequenceELBO's KL is 0, TB's log q - log p0 is 0). Refused in every loss that
    trains the guide, naming ``lm``; a sampler may still propose from the prior itself."""
    from pyro_lm.infer import DPG, SMC, TrajectoryBalance

    pyro.clear_param_store()
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1).trainable_copy()

    def model(prompt):
        x = pyro.sample("x", LMDistribution(prior, prompt, 2))
        pyro.factor("r", (x == 1).sum(-1).float())

    objective = {"SequenceELBO": SequenceELBO, "TrajectoryBalance": TrajectoryBalance,
                 "DPG": DPG}[loss](num_particles=4)
    before = [p.detach().clone() for p in prior.parameters()]
    svi = pyro.infer.SVI(model, AutoLMGuide(model, prior), pyro.optim.Adam({"lr": 0.1}),
                         objective)
    with pytest.raises(ValueError, match="lm: the guide's LM is the model's own LM at site 'x'"):
        svi.step("t1")
    assert all(torch.equal(a, b) for a, b in zip(before, prior.parameters(), strict=True))
    pyro.clear_param_store()
    # as a proposal it is the prior: log Z of SMC is exact against enumeration
    pyro.set_rng_seed(0)
    post = SMC(model, num_particles=2000, guide=AutoLMGuide(model, prior)).run("t1")
    with torch.no_grad():
        exact = enumerate_model(model, "t1").log_Z
    se = float(post.log_normalizer_stderr())
    assert abs(float(post.log_normalizer()) - float(exact)) < 4 * se + 1e-3
