"""Masked decoding against exact enumeration: the masked law, SMC and Importance with
``constraints=``, and a masked guide in SVI (a tiny byte-level BPE with two EOS ids and
an embedding row beyond its tokenizer)."""

import math

import pyro
import pytest
import torch
from checks import pooled_chi2_pvalue
from constraint_lms import TEXT_PIECES, tiny_bpe_lm

import pyro_lm
from pyro_lm.constraints import MaskedLMDistribution, Regex
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import SMC, AutoLMGuide, Importance, SequenceELBO

pytestmark = pytest.mark.filterwarnings("ignore:.*not registered in the param store")

T = 3
REGEX = "(a|b)+( a)?é?"
REPLICATES = 300


@pytest.fixture(scope="module")
def lm():
    return tiny_bpe_lm(TEXT_PIECES, extra_rows=1, eos_ids=[0, 1], specials=("<eos>", "<end>"))


def make_model(lm, c):
    def model(prompts, factor=True):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            if factor:
                pyro.factor("valid", c(x))
            pyro.factor("reward", 0.7 * (x == 3).sum(-1).float())  # "b" tokens

    return model


def chi2_pvalue(samples, support, probs):
    """Goodness of fit of ``samples`` ``(m, T)`` to ``probs`` over ``support``; cells
    expecting fewer than 5 are pooled."""
    match = (samples[:, None, :] == support[None]).all(-1)
    assert match.any(-1).all()
    return pooled_chi2_pvalue(match.sum(0), probs)


def test_masked_law_is_normalised_and_sampled(lm):
    c = Regex(lm, REGEX)
    dist = MaskedLMDistribution(pyro_lm.LMDistribution(lm, torch.tensor([[0], [3]]), T), c)
    support = dist.enumerate_support()  # (M, 2, T)
    log_r = dist.log_prob(support)
    assert torch.allclose(log_r.exp().sum(0), torch.ones(2), atol=1e-5)
    # no completion the mask cannot produce: a first token outside the language
    assert torch.isneginf(log_r[support[:, 0, 0] == 5]).all()
    x, decoded = dist.sample_with_log_prob((3000,))
    assert torch.allclose(decoded, dist.log_prob(x), atol=1e-4)
    for j in range(2):
        assert chi2_pvalue(x[:, j], support[:, j], log_r[:, j].exp()) > 1e-3


def test_masked_log_prob_has_gradients(lm):
    guide_lm = lm.trainable_copy()
    c = Regex(lm, REGEX)
    dist = MaskedLMDistribution(pyro_lm.LMDistribution(guide_lm, torch.tensor([[0]]), T), c)
    x = dist.sample((8,))
    loss = -dist.log_prob(x).sum()
    loss.backward()
    grads = [p.grad for p in guide_lm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("lookahead", [None, "full"])
@pytest.mark.parametrize("factor", [False, True])
def test_smc_with_mask_is_exact(lm, lookahead, factor):
    """Every sample valid, Z unbiased, and the weighted cell frequencies unbiased for the
    exact constrained posterior (E[(1/N) sum_i w_i 1[x_i = v]] = p~(v))."""
    c = Regex(lm, REGEX)
    model = make_model(lm, c)
    prompts = torch.zeros(REPLICATES, 1, dtype=torch.long)
    exact = enumerate_model(model, prompts[:1])
    post = SMC(model, num_particles=8, lookahead=lookahead, constraints={"x": c}).run(
        prompts, factor=factor)
    x, log_w = post.samples["x"], post.log_weights  # (N, R, T), (N, R)
    alive = torch.isfinite(log_w)
    assert (c(x)[alive] == 0).all()
    assert post.history["resampled"].any() or lookahead is not None
    ratio = (post.log_normalizer() - exact.log_Z).exp()
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / math.sqrt(REPLICATES)
    support, p_tilde = exact.support[:, 0], exact.log_joint[:, 0].exp()
    w = log_w.exp()
    for v in p_tilde.argsort(descending=True)[:6]:
        hit = (x == support[v]).all(-1)  # (N, R)
        est = (w * hit).mean(0)  # (R,), unbiased for p~(v)
        se = est.std() / math.sqrt(REPLICATES)
        assert abs(est.mean() - p_tilde[v]) < 4 * se + 1e-6, (v, est.mean(), p_tilde[v], se)


def test_importance_with_mask_weights_are_exact(lm):
    """Each weight is exactly p~(x) / r(x); log Z within 4 standard errors; the SIR law
    matches the exact posterior."""
    c = Regex(lm, REGEX)
    model = make_model(lm, c)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    exact = enumerate_model(model, prompt)
    post = Importance(model, num_samples=4000, constraints={"x": c}).run(prompt, factor=False)
    x, log_w = post.samples["x"][:, 0], post.log_weights[:, 0]
    dist = MaskedLMDistribution(pyro_lm.LMDistribution(lm, prompt, T), c)
    match = (x[:, None] == exact.support[None, :, 0]).all(-1).float().argmax(-1)
    expected = exact.log_joint[match, 0] - dist.log_prob(x[:, None])[:, 0]
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(log_w))
    assert torch.allclose(log_w[finite], expected[finite], atol=1e-4)
    assert (c(x[finite]) == 0).all()
    ratio = (log_w - exact.log_Z).exp()
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / math.sqrt(ratio.numel())
    draws = post.resample(500)["x"][:, 0]
    assert chi2_pvalue(draws, exact.support[:, 0], exact.probs[:, 0]) > 1e-3


@pytest.mark.parametrize("algorithm", ["SMC", "Importance", "QRS", "IMH"])
def test_samplers_refuse_a_masked_guide_on_an_unconditioned_target(lm, algorithm):
    """A guide whose constraints mask ``x`` never proposes text outside them: a sampler
    whose target is not conditioned on them (no ``constraints=``) refuses it, rather than
    estimate the conditioned posterior silently."""
    c = Regex(lm, REGEX)
    model = make_model(lm, c)
    guide = AutoLMGuide(model, lm.trainable_copy(), constraints={"x": c})
    prompts = torch.zeros(2, 1, dtype=torch.long)
    make = {"SMC": lambda: SMC(model, guide=guide).run(prompts, factor=False),
            "Importance": lambda: Importance(model, guide=guide).run(prompts, factor=False),
            "QRS": lambda: pyro_lm.infer.QRS(model, proposal=guide).run(prompts, factor=False),
            "IMH": lambda: pyro_lm.infer.IMH(model, proposal=guide).run(prompts, factor=False)}
    arg = "proposal" if algorithm in ("QRS", "IMH") else "guide"
    with pytest.raises(ValueError, match=f"{arg}: the guide's constraints mask .*'x'.*"
                                         f"{algorithm} would silently"):
        make[algorithm]()


def test_importance_with_a_masked_guide_and_the_same_constraints_is_exact(lm):
    """With ``constraints=`` naming the guide's site the target is conditioned: log Z of the
    conditioned model within 4 standard errors, from the masked guide's proposals."""
    c = Regex(lm, REGEX)
    model = make_model(lm, c)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    exact = enumerate_model(model, prompt)
    guide = AutoLMGuide(model, lm.trainable_copy(), constraints={"x": c})
    pyro.set_rng_seed(0)
    post = Importance(model, guide=guide, num_samples=4000, constraints={"x": c}).run(
        prompt, factor=False)
    assert (c(post.samples["x"][:, 0])[torch.isfinite(post.log_weights[:, 0])] == 0).all()
    ratio = (post.log_weights[:, 0] - exact.log_Z).exp()
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / math.sqrt(ratio.numel())


@pytest.mark.parametrize("algorithm", ["SMC", "Importance"])
def test_a_language_that_does_not_fit_names_max_new_tokens(lm, algorithm):
    """No text of "aaaa" fits in T = 3 tokens of single letters' pieces, so every sample is
    truncated outside the language: the error says to raise max_new_tokens."""
    c = Regex(lm, "(a ){4}")
    model = make_model(lm, c)
    prompts = torch.zeros(1, 1, dtype=torch.long)
    run = (SMC(model, num_particles=16, constraints={"x": c}) if algorithm == "SMC"
           else Importance(model, num_samples=16, constraints={"x": c}))
    with pytest.raises(ValueError, match=f"{algorithm}: all 16 samples have weight zero.*"
                                         "raise max_new_tokens"):
        run.run(prompts, factor=False)


def test_guide_with_mask_in_svi(lm):
    """A masked guide: its samples are valid, its loss finite, and SVI steps run."""
    c = Regex(lm, "[ab]*")  # every viable prefix is accepted: no dead end at T
    model = make_model(lm, c)
    guide = AutoLMGuide(model, lm.trainable_copy(), constraints={"x": c})
    prompts = torch.zeros(2, 1, dtype=torch.long)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         loss=SequenceELBO(num_particles=4))
    losses = [svi.step(prompts) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    values = guide(prompts)["x"]
    assert (c(values) == 0).all()


def test_errors(lm):
    c = Regex(lm, REGEX)
    model = make_model(lm, c)
    prompts = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="no LM sample site 'y'"):
        SMC(model, constraints={"y": c}).run(prompts)
    with pytest.raises(ValueError, match="no LM sample site 'y'"):
        Importance(model, constraints={"y": c}).run(prompts)
    with pytest.raises(TypeError, match=r"constraints\['x'\]: .*got str; wrap the pattern"):
        SMC(model, constraints={"x": "(a|b)+"})
    with pytest.raises(TypeError, match=r"constraints\['x'\]: .*got Regex; a reward"):
        Importance(model, constraints={"x": pyro_lm.rewards.Regex(lm, "a")})
    with pytest.raises(TypeError, match="constraints: SMC expects a dict"):
        SMC(model, constraints=[c])
    other = Regex(tiny_bpe_lm(("a", "b")), "a")
    with pytest.raises(ValueError, match="another tokenizer"):
        SMC(model, constraints={"x": other}).run(prompts)

    def two_sites(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.sample("y", pyro_lm.LMDistribution(lm, prompts, T))

    with pytest.raises(ValueError, match="over a program"):
        SMC(two_sites, constraints={"x": c}).run(prompts)
