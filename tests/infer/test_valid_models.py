"""Every program shape through every algorithm (after Pyro's tests/infer/test_valid_models.py).

Each cell either agrees with exact enumeration (:mod:`pyro_lm.exact`) within a tolerance
derived from its sample size, or raises a ValueError whose message says how to fix the
program. A new algorithm or shape is a new row or column here.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO

from pyro_lm import LMDistribution
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import (
    DPG,
    IMH,
    QRS,
    SMC,
    AutoLMGuide,
    Importance,
    SequenceELBO,
    TrajectoryBalance,
    fit_moments,
)
from pyro_lm.lm import toy_lm

pytestmark = pytest.mark.filterwarnings(  # the TraceEnum_ELBO column enumerates nothing here
    "ignore:TraceEnum_ELBO found no sample sites configured for enumeration")

T = 2  # 13 completions per LM site with vocab 4: small enough to enumerate pairs of sites
BETA = 0.5


@pytest.fixture(scope="module")
def prior():
    return toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)


@pytest.fixture(scope="module")
def other():
    """A different LM with the prior's tokenizer, broad enough to cover it (the guide)."""
    return toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=2, init_std=0.1)


def reward(x):
    return (x == 1).sum(-1).float() / BETA


# ------------------------------------------------------------------------------ shapes
# Each builder returns (model, args, kinds): kinds names what the program has, which decides
# the cells that must refuse it: "latent" (a non-LM latent site), "chain" (two LM sites),
# "coupled" (a site outside a plate), "scaled", "subsample", "scalar", "shape" (bad shape).
def one_site(lm, factor=True):
    def model():
        x = pyro.sample("x", LMDistribution(lm, "t1", T))
        if factor:
            pyro.factor("reward", reward(x))
    return model, (), set()


def plate(lm, factor=True):
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            if factor:
                pyro.factor("reward", reward(x))
    return model, (prompts,), set()


def nested_plates(lm, factor=True):
    prompts = torch.tensor([[[0], [2]], [[3], [1]]])  # (2, 2, 1)

    def model(prompts):
        with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 2, dim=-1):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            if factor:
                pyro.factor("reward", reward(x))
    return model, (prompts,), set()


def factor_outside(lm, factor=True):
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", 2):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
        if factor:  # one factor over the whole batch: the prompts share one weight
            pyro.factor("reward", reward(x).sum(-1, keepdim=True))
    return model, (prompts,), {"coupled"} if factor else set()


def factor_outside_no_keepdim(lm, factor=True):
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", 2):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
        pyro.factor("reward", reward(x).sum(-1) if factor else torch.zeros(x.shape[:-2] + (1,)))
    return model, (prompts,), {"shape"} if factor else {"coupled"}


def latent_prompt(lm, factor=True):
    prompts = torch.tensor([[1], [2], [3]])

    def model(prompts):
        z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
        x = pyro.sample("x", LMDistribution(lm, prompts[z], T))
        if factor:
            pyro.factor("reward", reward(x))
    return model, (prompts,), {"latent"}


def chained(lm, factor=True):
    def model():
        first = LMDistribution(lm, "t1", T)
        x1 = pyro.sample("x1", first)
        ids, mask = first.prompt_with(x1)
        x2 = pyro.sample("x2", LMDistribution(lm, ids, T, attention_mask=mask))
        if factor:
            pyro.factor("reward", reward(x2) - reward(x1))
    return model, (), {"chain"}


def observed_text(lm, factor=True):
    """Observed text tells which latent prompt produced it; nothing else is latent."""
    prompts = torch.tensor([[1], [2], [3]])
    text = torch.tensor([3, 1])

    def model(prompts):
        z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
        pyro.sample("review", LMDistribution(lm, prompts[z], T), obs=text)
        if factor:
            pyro.factor("prior_on_z", (z == 2).float())
    return model, (prompts,), {"latent", "no_lm"}


def latent_and_chain_in_plate(lm, factor=True):
    """Per prompt: a latent choosing the first prompt, then a completion continuing it."""
    prompts = torch.tensor([[1], [2], [3]])

    def model(prompts):
        with pyro.plate("items", 2):
            z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
            first = LMDistribution(lm, prompts[z], T)
            x1 = pyro.sample("x1", first)
            ids, mask = first.prompt_with(x1)
            x2 = pyro.sample("x2", LMDistribution(lm, ids, T, attention_mask=mask))
            if factor:
                pyro.factor("reward", reward(x2) + (z == 1).float())
    return model, (prompts,), {"latent", "chain"}


def subsample(lm, factor=True):
    prompts = torch.tensor([[0], [2], [3]])

    def model(prompts):
        with pyro.plate("prompts", 3, subsample_size=2) as idx:
            x = pyro.sample("x", LMDistribution(lm, prompts[idx], T))
            if factor:
                pyro.factor("reward", reward(x))
    return model, (prompts,), {"subsample"}


def scaled(lm, factor=True):
    model, args, _ = one_site(lm, factor)
    return poutine.scale(model, 2.0), args, {"scaled"}


def masked(lm, factor=True):
    model, args, _ = plate(lm, factor)
    return poutine.mask(model, mask=torch.tensor([True, False])), args, {"scaled"}


def conditioned(lm, factor=True):
    model, args, _ = latent_prompt(lm, factor)
    return poutine.condition(model, data={"z": torch.tensor(1)}), args, set()


def blocked(lm, factor=True):
    model, args, _ = plate(lm, factor)
    return poutine.block(model, hide=["reward"]), args, set()


def scalar_style(lm, factor=True):
    prompts = ["t1", "t2", "t3"]

    def model():
        z = pyro.sample("z", dist.Categorical(logits=torch.zeros(3)))
        x = pyro.sample("x", LMDistribution(lm, prompts[int(z)], T))
        if factor:
            pyro.factor("reward", reward(x))
    return model, (), {"latent", "scalar"}


SHAPES = [one_site, plate, nested_plates, factor_outside, factor_outside_no_keepdim,
          latent_prompt, chained, observed_text, latent_and_chain_in_plate, subsample, scaled,
          masked, conditioned, blocked, scalar_style]
ERRORS = {  # what an algorithm that cannot take a program must say
    "scalar": "run vectorised",
    "shape": "keepdim",
    "subsample": "subsample",
    "latent": "latent site",
    "chain": "one LM site",
    "coupled": "outside (a|their) plate",
    "scaled": "scaled",
    "no_lm": "one LM site|no unobserved LM",
}


def refused(kinds, unsupported):
    """A pattern for the messages a program with ``kinds`` may get from an algorithm that
    refuses ``unsupported`` (every algorithm refuses "scalar" and "shape"): the program is
    refused for any of its kinds that the algorithm cannot take. ``None``: accepted."""
    reasons = [ERRORS[k] for k in ("scalar", "shape", *sorted(unsupported)) if k in kinds]
    return "|".join(f"({r})" for r in reasons) or None


def assert_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def within(estimate, exact, stderr, name):
    estimate, exact = torch.as_tensor(estimate).double(), torch.as_tensor(exact).double()
    tol = 4 * torch.as_tensor(stderr).double() + 1e-3
    assert ((estimate - exact).abs() <= tol).all(), (name, estimate, exact, tol)


def indicator(values):
    """Does the completion start with token 1."""
    return (values[..., 0] == 1).double()


def statistic(values: dict):
    """The statistic every posterior is checked on: the last LM site's :func:`indicator`,
    or whether the latent ``z`` is 2 where no LM site is latent."""
    for name in ("x2", "x"):
        if name in values:
            return indicator(values[name])
    return (values["z"] == 2).double()


# ----------------------------------------------------------------------------- the matrix
@pytest.fixture(scope="module")
def exacts(prior):
    cache = {}

    def get(shape):
        if shape not in cache:
            model, args, kinds = shape(prior)
            cache[shape] = enumerate_model(model, *args) if refused(kinds, ()) is None \
                and "subsample" not in kinds else None
        return cache[shape]
    return get


def expectation(exact):
    """E_{p*}[statistic], per weight column."""
    stat = statistic(exact.values)
    stat = stat.reshape(stat.shape + (1,) * (exact.probs.dim() - stat.dim()))
    probs = exact.probs.reshape(exact.probs.shape + (1,) * (stat.dim() - exact.probs.dim()))
    return (probs * stat).sum(0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_exact(prior, exacts, shape):
    model, args, kinds = shape(prior)
    match = refused(kinds, {"subsample"})
    if match:
        return assert_error(lambda: enumerate_model(model, *args), match)
    exact = exacts(shape)
    assert torch.allclose(exact.probs.sum(0), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("use_guide", [False, True], ids=["prior", "guide"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_importance(prior, other, exacts, shape, use_guide):
    model, args, kinds = shape(prior)
    guide = AutoLMGuide(model, other) if use_guide else None
    run = Importance(model, guide=guide, num_samples=2000).run
    match = refused(kinds, {"subsample"})
    if match:
        return assert_error(lambda: run(*args), match)
    post, exact = run(*args), exacts(shape)
    within(post.log_normalizer(), exact.log_Z, post.log_normalizer_stderr(), "log Z")
    w = post.normalized_weights().double()
    stat = statistic(post.samples)
    stat = stat.reshape(stat.shape + (1,) * (w.dim() - stat.dim()))
    w = w.reshape(w.shape + (1,) * (stat.dim() - w.dim()))
    mean = (w * stat).sum(0)
    se = ((w**2 * (stat - mean) ** 2).sum(0)).sqrt()  # delta-method error of the SNIS mean
    within(mean, expectation(exact), se, "E[statistic]")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_smc(prior, other, exacts, shape):
    model, args, kinds = shape(prior)
    match = refused(kinds, {"subsample", "coupled", "scaled"})
    smc = SMC(model, guide=AutoLMGuide(model, other), num_particles=64)
    if match:
        return assert_error(lambda: smc.run(*args), match)
    exact = exacts(shape)
    runs = [smc.run(*args) for _ in range(40)]
    z_hat = torch.stack([(r.log_normalizer() - exact.log_Z).exp() for r in runs])  # E = 1
    within(z_hat.mean(0), 1.0, z_hat.std(0) / math.sqrt(40), "Z-hat / Z")
    # the posterior mean of the statistic: each run's weighted mean, the runs weighted by
    # their Z-hat (consistent as the runs grow), with its delta-method error
    means = []
    for r in runs:
        w = r.normalized_weights().double()
        stat = statistic(r.samples)
        stat = stat.reshape(stat.shape + (1,) * (w.dim() - stat.dim()))
        means.append((w.reshape(w.shape + (1,) * (stat.dim() - w.dim())) * stat).sum(0))
    means = torch.stack(means)
    zw = z_hat.double().reshape(z_hat.shape + (1,) * (means.dim() - z_hat.dim()))
    mean = (zw * means).sum(0) / zw.sum(0)
    se = ((zw**2 * (means - mean) ** 2).sum(0)).sqrt() / zw.sum(0)
    within(mean, expectation(exact), se, "E[statistic]")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_smc_steps(prior, other, exacts, shape):
    """Step-level SMC (a delimiter: a step ends at each token "t1"): Z-hat unbiased."""
    model, args, kinds = shape(prior)
    match = refused(kinds, {"subsample", "coupled", "scaled"})
    smc = SMC(model, guide=AutoLMGuide(model, other), num_particles=64, steps="t1")
    if match:
        return assert_error(lambda: smc.run(*args), match)
    exact = exacts(shape)
    z_hat = torch.stack([(smc.run(*args).log_normalizer() - exact.log_Z).exp()
                         for _ in range(20)])  # E = 1
    within(z_hat.mean(0), 1.0, z_hat.std(0) / math.sqrt(20), "Z-hat / Z")


ELBOS = {
    "SequenceELBO": lambda: SequenceELBO(num_particles=8),
    "SequenceELBO-prefix": lambda: SequenceELBO(num_particles=8, baseline="prefix"),
    "Trace_ELBO": lambda: Trace_ELBO(num_particles=8, vectorize_particles=True,
                                     max_plate_nesting=2),
    "TraceGraph_ELBO": lambda: TraceGraph_ELBO(num_particles=8, vectorize_particles=True,
                                               max_plate_nesting=2),
    "TraceEnum_ELBO": lambda: TraceEnum_ELBO(num_particles=8, vectorize_particles=True,
                                             max_plate_nesting=2),
}


@pytest.mark.parametrize("loss", list(ELBOS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_elbo(prior, other, exacts, shape, loss):
    model, args, kinds = shape(prior)
    guide = AutoLMGuide(model, other)
    elbo = ELBOS[loss]()
    unsupported = {"latent", "chain", "no_lm"} if loss == "SequenceELBO-prefix" else set()
    match = refused(kinds - {"shape"} if loss.startswith("Trace") else kinds, unsupported)
    if loss.startswith("Trace") and "scalar" in kinds:
        match = "only one element"  # stock Pyro: its own message
    if match:
        return assert_error(lambda: elbo.loss(model, guide, *args), match)
    exact_guide = guide
    if "subsample" in kinds:  # a fresh subsample each step, scaled: unbiased for the full plate
        full = plate_of_three(prior)
        exact, exact_guide = enumerate_model(full, *args), AutoLMGuide(full, other)
    elif loss.startswith("Trace") and "shape" in kinds:
        return  # stock Pyro's own shape rules; not ours to check
    else:
        exact = exacts(shape)
    draws = torch.tensor([elbo.loss(model, guide, *args) for _ in range(60)])
    within(-draws.mean(), exact.elbo(exact_guide).sum(), draws.std() / math.sqrt(60), "ELBO")


def plate_of_three(lm):
    def model(prompts):
        with pyro.plate("prompts", 3):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            pyro.factor("reward", reward(x))
    return model


def test_subsample_draws_a_fresh_subsample_each_step(prior, other):
    model, args, _ = subsample(prior)
    guide = AutoLMGuide(model, other)
    seen = set()
    for _ in range(20):
        trace = poutine.trace(guide).get_trace(*args)
        seen.update(trace.nodes["prompts"]["value"].tolist())
    assert seen == {0, 1, 2}


#: DPG's proposals and what each refuses beyond DPG itself ("smc": SMC with the guide as
#: its proposal, whose Z-hat DPG then reports)
DPG_PROPOSALS = {"guide": set(), "smc": {"coupled", "scaled"}}


@pytest.mark.parametrize("proposal", sorted(DPG_PROPOSALS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_dpg(prior, other, exacts, shape, proposal):
    model, args, kinds = shape(prior)
    guide = AutoLMGuide(model, other)
    loss = DPG(num_particles=64, proposal=proposal)
    match = refused(kinds, {"subsample", "no_lm"} | DPG_PROPOSALS[proposal])
    if match:
        return assert_error(lambda: loss.loss(model, guide, *args), match)
    exact = exacts(shape)
    z_hat = []
    for _ in range(30):
        loss.loss(model, guide, *args)
        z_hat.append(math.exp(loss.metrics["log_Z_batch"] - exact.log_Z.sum().item()))
    z_hat = torch.tensor(z_hat)  # each unbiased for 1 (a product over independent prompts)
    within(z_hat.mean(), 1.0, z_hat.std() / math.sqrt(30), "Z-hat / Z")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_trajectory_balance(prior, other, exacts, shape):
    model, args, kinds = shape(prior)
    guide = AutoLMGuide(model, other)
    pyro.clear_param_store()
    loss = TrajectoryBalance(num_particles=64, init_log_z=0.0)
    match = refused(kinds, {"subsample", "no_lm"})
    if match:
        return assert_error(lambda: loss.loss(model, guide, *args), match)
    draws = []
    for _ in range(20):
        loss.loss(model, guide, *args)
        draws.append(loss.metrics["elbo"])  # E_q[log p~ - log q], the residual's mean
    draws = torch.tensor(draws)
    within(draws.mean(), exacts(shape).elbo(guide).sum(), draws.std() / math.sqrt(20), "ELBO")


@pytest.mark.parametrize("sampler", ["QRS", "IMH"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_qrs_imh(prior, exacts, shape, sampler):
    model, args, kinds = shape(prior)
    if sampler == "QRS":
        algo = QRS(model, num_samples=400, batch_size=4000)
    else:
        # each chain's last state; it mixes at rate 1 - Z / max w (about 0.95 a step here)
        algo = IMH(model, num_steps=150, num_chains=400, burn_in=149)
    match = refused(kinds, {"subsample"})
    if match:
        return assert_error(lambda: algo.run(*args), match)
    post, exact = algo.run(*args), exacts(shape)
    stat = statistic(post.samples)
    mean = stat.mean(0)
    expected = expectation(exact)
    expected = expected.reshape(mean.shape) if expected.numel() == mean.numel() else expected
    se = (expected * (1 - expected) / stat.shape[0]).sqrt()
    within(mean, expected, se, "E[statistic]")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_fit_moments(prior, exacts, shape):
    model, args, kinds = shape(prior)
    features = lambda x: indicator(x).float()  # noqa: E731
    run = lambda: fit_moments(model, features, 0.5, *args, num_samples=4000)  # noqa: E731
    match = refused(kinds, {"subsample", "latent", "chain", "coupled", "no_lm"})
    if match:
        return assert_error(run, match)
    fit = run()
    lam = float(fit.coefficients)

    exact = exacts(shape)
    stat = indicator(exact.values["x"])
    stat = stat.reshape(stat.shape + (1,) * (exact.log_joint.dim() - stat.dim()))
    logits = exact.log_joint + lam * stat
    moment = (torch.softmax(logits, 0) * stat).sum(0).mean()
    within(moment, 0.5, 1 / fit.ess.min().sqrt(), "tilted moment")


# ------------------------------------------------------------- the prior as its own guide
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_guide_equal_to_prior_gives_zero_weights_and_zero_kl(prior, exacts, shape):
    model, args, kinds = shape(prior, factor=False)
    if "no_lm" in kinds:  # observed text is evidence: each weight is its likelihood
        return
    guide = AutoLMGuide(model, prior)
    if "subsample" in kinds:  # only SVI takes it: a fresh subsample, scaled, each step
        elbo = SequenceELBO(num_particles=8)
        for _ in range(4):
            elbo.loss(model, guide, *args)
            assert abs(elbo.metrics["kl"]) < 1e-4
        return
    if refused(kinds, ()):
        return
    exact = enumerate_model(model, *args)
    if "scaled" in kinds:  # the target p0^s is not p0: the weights are (s - 1) log p0
        return
    assert exact.kl_q_prior(guide).abs().max() < 1e-5
    # no factor: every weight is the evidence of the observed sites (log Z, 0 if none),
    # exactly with the prior as proposal, up to float32 rounding with the guide
    for g, bound in ((None, 0.0), (guide, 1e-4)):
        post = Importance(model, guide=g, num_samples=64).run(*args)
        gap = (post.log_weights - exact.log_Z).abs().max()
        assert gap <= bound + 1e-6, (g, gap)
    for proposal in (None, guide):
        for algo in (QRS(model, proposal, num_samples=8, batch_size=32),
                     IMH(model, proposal, num_steps=4, num_chains=8)):
            gap = (algo.run(*args).extras["log_Z"] - exact.log_Z).abs().max()
            assert gap <= 1e-4, (type(algo).__name__, proposal, gap)
    if not refused(kinds, {"coupled"}):
        for g in (None, guide):
            post = SMC(model, guide=g, num_particles=16).run(*args)
            gap = (post.log_weights - exact.log_Z).abs().max()
            assert gap <= (0.0 if g is None else 1e-4) + 1e-6, ("SMC", g, gap)
    elbo = SequenceELBO(num_particles=8)
    elbo.loss(model, guide, *args)
    assert abs(elbo.metrics["kl"]) < 1e-4
    dpg = DPG(num_particles=8)
    dpg.loss(model, guide, *args)
    assert abs(dpg.metrics["kl_q_prior"]) < 1e-4


def test_trace_enum_elbo_enumerates_the_latent_behind_observed_text(prior):
    """Observed text and a discrete latent that chose its prompt: with z enumerated in the
    model and an empty guide, TraceEnum_ELBO's loss is -log Z exactly (no sampling)."""
    model, args, _ = observed_text(prior)
    exact = enumerate_model(model, *args)
    elbo = TraceEnum_ELBO(max_plate_nesting=0)
    loss = elbo.loss(pyro.infer.config_enumerate(model), lambda *a: None, *args)
    assert abs(loss + exact.log_Z.item()) < 1e-4, (loss, -exact.log_Z)
