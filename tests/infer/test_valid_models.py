"""Every program shape through every algorithm (after Pyro's tests/infer/test_valid_models.py).

Each cell either agrees with exact enumeration (:mod:`pyro_lm.exact`) within a tolerance
derived from its sample size, or raises a ValueError whose message says how to fix the
program. A new algorithm or shape is a new row or column here. The constrained rows run
the same shapes on a tiny byte-level BPE LM under a Regex constraint (as a sampler's or a
guide's mask, and as a factor in the model) against the exact constrained posterior.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from checks import pooled_chi2_pvalue
from constraints.constraint_lms import tiny_bpe_lm
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from scipy.stats import norm
from scipy.stats import t as student_t

from pyro_lm import LMDistribution
from pyro_lm.constraints import Regex
from pyro_lm.distributions.lm_distribution import unwrap_lm
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
from pyro_lm.infer.program import plate_nesting, structure_trace
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


@pytest.fixture(scope="module")
def trainable(other):
    """The guide LM with gradients (a copy), for the rows that check a loss's gradient."""
    return other.trainable_copy()


def reward(x):
    return (x == 1).sum(-1).float() / BETA


# ------------------------------------------------------------------------------ shapes
# Each builder returns (model, args, kinds): kinds names what the program has, which decides
# the cells that must refuse it: "latent" (a non-LM latent site), "chain" (two LM sites),
# "coupled" (a site outside a plate), "scaled", "subsample", "scalar", "shape" (bad shape).
# ``valid``: a constraint c, put in the model as a factor on each LM site it samples
# (``pyro.factor("valid_<site>", c(x))``, 0 or -inf: the constrained rows' factor form).
def constrain(valid, name, x):
    if valid is not None:
        pyro.factor(f"valid_{name}", valid(x))


def one_site(lm, factor=True, valid=None):
    def model():
        x = pyro.sample("x", LMDistribution(lm, "t1", T))
        constrain(valid, "x", x)
        if factor:
            pyro.factor("reward", reward(x))
    return model, (), set()


def plate(lm, factor=True, valid=None):
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            constrain(valid, "x", x)
            if factor:
                pyro.factor("reward", reward(x))
        return x
    return model, (prompts,), set()


def nested_plates(lm, factor=True, valid=None):
    prompts = torch.tensor([[[0], [2]], [[3], [1]]])  # (2, 2, 1)

    def model(prompts):
        with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 2, dim=-1):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            constrain(valid, "x", x)
            if factor:
                pyro.factor("reward", reward(x))
    return model, (prompts,), set()


def factor_outside(lm, factor=True, valid=None):
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", 2):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            constrain(valid, "x", x)
        if factor:  # one factor over the whole batch: the prompts share one weight
            pyro.factor("reward", reward(x).sum(-1, keepdim=True))
    return model, (prompts,), {"coupled"} if factor else set()


def factor_outside_no_keepdim(lm, factor=True, valid=None):
    prompts = torch.tensor([[0], [2]])

    def model(prompts):
        with pyro.plate("prompts", 2):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            constrain(valid, "x", x)
        pyro.factor("reward", reward(x).sum(-1) if factor else torch.zeros(x.shape[:-2] + (1,)))
    return model, (prompts,), {"shape"} if factor else {"coupled"}


def latent_prompt(lm, factor=True, valid=None):
    prompts = torch.tensor([[1], [2], [3]])

    def model(prompts):
        z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
        x = pyro.sample("x", LMDistribution(lm, prompts[z], T))
        constrain(valid, "x", x)
        if factor:
            pyro.factor("reward", reward(x))
    return model, (prompts,), {"latent"}


def chained(lm, factor=True, valid=None):
    def model():
        first = LMDistribution(lm, "t1", T)
        x1 = pyro.sample("x1", first)
        constrain(valid, "x1", x1)
        ids, mask = first.prompt_with(x1)
        x2 = pyro.sample("x2", LMDistribution(lm, ids, T, attention_mask=mask))
        constrain(valid, "x2", x2)
        if factor:
            pyro.factor("reward", reward(x2) - reward(x1))
    return model, (), {"chain"}


def observed_text(lm, factor=True, valid=None):
    """Observed text tells which latent prompt produced it; nothing else is latent (so
    nothing for ``valid`` to constrain)."""
    prompts = torch.tensor([[1], [2], [3]])
    text = torch.tensor([3, 1])

    def model(prompts):
        z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
        pyro.sample("review", LMDistribution(lm, prompts[z], T), obs=text)
        if factor:
            pyro.factor("prior_on_z", (z == 2).float())
    return model, (prompts,), {"latent", "no_lm"}


def observed_text_then_completion(lm, factor=True, valid=None):
    """A latent prompt, observed text that tells which one produced it, then a completion
    from the same prompt (SMC over the program scores the text once per distinct prompt,
    not after every token)."""
    prompts = torch.tensor([[1], [2], [3]])
    text = torch.tensor([3, 1])

    def model(prompts):
        z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
        pyro.sample("review", LMDistribution(lm, prompts[z], T), obs=text)
        x = pyro.sample("x", LMDistribution(lm, prompts[z], T))
        constrain(valid, "x", x)
        if factor:
            pyro.factor("reward", reward(x))
    return model, (prompts,), {"latent", "observed"}


def latent_and_chain_in_plate(lm, factor=True, valid=None):
    """Per prompt: a latent choosing the first prompt, then a completion continuing it."""
    prompts = torch.tensor([[1], [2], [3]])

    def model(prompts):
        with pyro.plate("items", 2):
            z = pyro.sample("z", dist.Categorical(logits=torch.tensor([0.0, 1.0, -1.0])))
            first = LMDistribution(lm, prompts[z], T)
            x1 = pyro.sample("x1", first)
            constrain(valid, "x1", x1)
            ids, mask = first.prompt_with(x1)
            x2 = pyro.sample("x2", LMDistribution(lm, ids, T, attention_mask=mask))
            constrain(valid, "x2", x2)
            if factor:
                pyro.factor("reward", reward(x2) + (z == 1).float())
    return model, (prompts,), {"latent", "chain"}


def subsample(lm, factor=True, valid=None):
    prompts = torch.tensor([[0], [2], [3]])

    def model(prompts):
        with pyro.plate("prompts", 3, subsample_size=2) as idx:
            x = pyro.sample("x", LMDistribution(lm, prompts[idx], T))
            constrain(valid, "x", x)
            if factor:
                pyro.factor("reward", reward(x))
    return model, (prompts,), {"subsample"}


def scaled(lm, factor=True, valid=None):
    model, args, _ = one_site(lm, factor, valid)
    return poutine.scale(model, 2.0), args, {"scaled"}


def masked(lm, factor=True, valid=None):
    model, args, _ = plate(lm, factor)
    model = poutine.mask(model, mask=torch.tensor([True, False]))
    if valid is None:
        return model, args, {"scaled"}

    def constrained(prompts):  # the constraint outside the mask, as a sampler's constraints=
        x = model(prompts)
        with pyro.plate("valid_prompts", prompts.shape[0]):  # the prompts' dim
            constrain(valid, "x", x)
    return constrained, args, {"scaled"}


def conditioned(lm, factor=True, valid=None):
    model, args, _ = latent_prompt(lm, factor, valid)
    return poutine.condition(model, data={"z": torch.tensor(1)}), args, set()


def blocked(lm, factor=True, valid=None):
    model, args, _ = plate(lm, factor, valid)
    return poutine.block(model, hide=["reward"]), args, set()


def scalar_style(lm, factor=True, valid=None):
    prompts = ["t1", "t2", "t3"]

    def model():
        z = pyro.sample("z", dist.Categorical(logits=torch.zeros(3)))
        x = pyro.sample("x", LMDistribution(lm, prompts[int(z)], T))
        constrain(valid, "x", x)
        if factor:
            pyro.factor("reward", reward(x))
    return model, (), {"latent", "scalar"}


SHAPES = [one_site, plate, nested_plates, factor_outside, factor_outside_no_keepdim,
          latent_prompt, chained, observed_text, observed_text_then_completion,
          latent_and_chain_in_plate, subsample, scaled, masked, conditioned, blocked,
          scalar_style]
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
    refused for any of its kinds that the algorithm cannot take. ``None``: accepted.
    ``unsupported`` is a set of kinds, or a dict kind -> the algorithm's own reason
    (``None``: the one in ERRORS)."""
    own = unsupported if isinstance(unsupported, dict) else {}
    reasons = [own.get(k) or ERRORS[k] for k in ("scalar", "shape", *sorted(unsupported))
               if k in kinds]
    return "|".join(f"({r})" for r in reasons) or None


def assert_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def within(estimate, exact, stderr, name):
    estimate, exact = torch.as_tensor(estimate).double(), torch.as_tensor(exact).double()
    tol = 4 * torch.as_tensor(stderr).double() + 1e-3
    assert ((estimate - exact).abs() <= tol).all(), (name, estimate, exact, tol)


def standard_error(draws):
    """The standard error of the mean of ``n`` draws (dim 0), scaled by Student's t
    quantile with ``n - 1`` degrees of freedom over the normal's at the 4-sigma tail, so that
    :func:`within`'s 4 of them bound that tail for a few draws too."""
    n = draws.shape[0]
    return draws.std(0) / math.sqrt(n) * (student_t.ppf(norm.cdf(4), n - 1) / 4)


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


def plate_of_three(lm, valid=None):
    def model(prompts):
        with pyro.plate("prompts", 3):
            x = pyro.sample("x", LMDistribution(lm, prompts, T))
            constrain(valid, "x", x)
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


#: DPG's variants: its options, and what each refuses beyond DPG itself. "smc": SMC with
#: the guide as its proposal, whose Z-hat DPG then reports; "jeffreys": the divergence
#: alpha KL(p*||q) + (1 - alpha) KL(q||p*) on the guide's own samples.
DPG_VARIANTS = {
    "guide": ({}, set()),
    "smc": ({"proposal": "smc"}, {"coupled", "scaled"}),
    "jeffreys": ({"divergence": "jeffreys", "forward_weight": 0.3}, set()),
}


def flat_grad(params):
    """The accumulated gradient of ``params``, one vector (zeros where none), and reset."""
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    for p in params:
        p.grad = None
    return torch.cat(grads)


def exact_grad(value, params):
    """The gradient of ``value`` (computed by enumeration) in ``params``, one vector."""
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for g, p in zip(grads, params, strict=True)])


def within_gradient(draws, exact, name):
    """The mean of the gradient estimates ``draws`` ``(n, P)`` against the exact gradient
    ``(P,)``, along its own direction and along a fixed random one, within 4 s.e. each."""
    generator = torch.Generator(device=exact.device).manual_seed(0)
    other = torch.randn(exact.shape, generator=generator, dtype=exact.dtype,
                        device=exact.device)
    for direction in (exact / exact.norm(), other / other.norm()):
        proj = draws @ direction
        within(proj.mean(), exact @ direction, standard_error(proj), name)


def dpg_cases():
    """(shape, variant) of every DPG cell."""
    for shape in SHAPES:
        for variant in sorted(DPG_VARIANTS):
            yield pytest.param(shape, variant, id=f"{shape.__name__}-{variant}")


@pytest.mark.parametrize("shape, variant", list(dpg_cases()))
def test_dpg(prior, trainable, exacts, shape, variant):
    """Each step's Z-hat is unbiased for the exact Z, and the mean of its gradient is the
    exact gradient of the divergence it minimises (forward KL, or the Jeffreys mix): the
    self-normalised weights' O(1/ESS) bias is below the test's error with 1024 particles
    (with 64 it is not, on the chained and coupled shapes)."""
    model, args, kinds = shape(prior)
    guide = AutoLMGuide(model, trainable)
    options, unsupported = DPG_VARIANTS[variant]
    loss = DPG(num_particles=1024, **options)
    match = refused(kinds, {"subsample", "no_lm"} | unsupported)
    if match:
        return assert_error(lambda: loss.loss(model, guide, *args), match)
    exact = exacts(shape)
    params = list(trainable.parameters())
    z_hat, grads = [], []
    for _ in range(10):
        loss.loss_and_grads(model, guide, *args)
        z_hat.append(math.exp(loss.metrics["log_Z_batch"] - exact.log_Z.sum().item()))
        grads.append(flat_grad(params))
    z_hat = torch.tensor(z_hat)  # each unbiased for 1 (a product over independent prompts)
    within(z_hat.mean(), 1.0, standard_error(z_hat), "Z-hat / Z")
    divergence = exact.kl_p_q(guide).sum()
    if options.get("divergence") == "jeffreys":
        alpha = loss.forward_weight
        divergence = alpha * divergence + (1 - alpha) * exact.kl_q_p(guide).sum()
    within_gradient(torch.stack(grads), exact_grad(divergence, params), "gradient")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_trajectory_balance(prior, trainable, exacts, shape):
    """At log Z_phi = 0: the loss, the mean of E_q[(log q - log p~)^2] (summed over
    problems), the elbo metric and the gradient in the guide and in log Z_phi, each against
    enumeration (the samples held fixed, the gradient's mean is 2 E_q[delta grad log q])."""
    model, args, kinds = shape(prior)
    guide = AutoLMGuide(model, trainable)
    pyro.clear_param_store()
    loss = TrajectoryBalance(num_particles=64, init_log_z=0.0)
    match = refused(kinds, {"subsample", "no_lm"})
    if match:
        return assert_error(lambda: loss.loss(model, guide, *args), match)
    exact = exacts(shape)
    params = list(trainable.parameters())
    values, elbos, grads = [], [], []
    for _ in range(20):
        values.append(loss.loss_and_grads(model, guide, *args))
        elbos.append(loss.metrics["elbo"])  # E_q[log p~ - log q], the residual's mean
        log_z = pyro.param("tb_log_Z").unconstrained()
        grads.append(torch.cat([flat_grad(params), flat_grad([log_z])]))
    values, elbos = torch.tensor(values), torch.tensor(elbos)
    log_q = exact.log_prob_of(guide)
    delta = log_q - exact.log_joint  # the residual at log Z_phi = 0
    q = log_q.detach().exp()
    within(values.mean(), (q * delta.detach() ** 2).sum(), standard_error(values), "loss")
    within(elbos.mean(), exact.elbo(guide).sum(), standard_error(elbos), "ELBO")
    surrogate = (q * delta**2).sum()  # its gradient: 2 E_q[delta grad log q]
    expected = torch.cat([exact_grad(surrogate, params), 2 * (q * delta.detach()).sum(0)
                          .reshape(-1).to(log_z.dtype)])
    within_gradient(torch.stack(grads), expected, "gradient")


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


# ------------------------------------------------------------------ constrained programs
# The shapes with a structural constraint on their LM sites (pyro_lm.constraints), on a tiny
# byte-level BPE LM (llguidance reads each token's bytes; the word-level toy LM has none):
# <eos>, "a" (id 1: the token the reward counts and the statistic reads), "b", "ab" (two
# characters in one token, so the text "ab" has two tokenisations), "t" and "1" (the text
# prompt "t1"). The language, texts of a and b without two a's in a row, keeps 11 of the 31
# completions of a site; its mask depends on the text so far (after an "a", neither "a" nor
# "ab"), and it is prefix-closed (every text that can still be completed is in it), so no
# masked draw ends invalid and a guide masked by it has a finite ELBO.
BPE_PIECES = ("a", "b", "ab", "t", "1")
REGEX = "(a?b)*a?"
REPLICATES = 200  # independent runs at once: the program inside a plate of replicates
#: particles (SMC) or samples (Importance) per run: a factor's proposals violate it often
NUM = {"mask": 32, "factor": 64}
MASK_OVER_PROGRAM = "constraints: SMC masks the tokens of a program with one LM site"
NO_SITE = "constraints: .*no LM sample site 'review'"

#: What each constrained cell refuses: kind -> its reason (None: the one in ERRORS).
#: "mask": the constraint given to the algorithm (``constraints={site: c}``), the model
#: without it; "factor": ``pyro.factor("valid_<site>", c(x))`` in the model, no mask;
#: "AutoLMGuide-mask": a masked guide in SVI, the model holding the factor.
CONSTRAINED = {
    "SMC-mask": {"subsample": None, "coupled": None, "scaled": None,
                 "latent": MASK_OVER_PROGRAM, "chain": MASK_OVER_PROGRAM,
                 "no_lm": MASK_OVER_PROGRAM},
    "SMC-factor": {"subsample": None, "coupled": None, "scaled": None},
    "Importance-mask": {"subsample": None, "no_lm": NO_SITE, "observed": NO_SITE},
    "Importance-factor": {"subsample": None},
    "AutoLMGuide-mask": {"no_lm": NO_SITE, "observed": NO_SITE},
}
SAMPLERS = {
    "SMC": lambda model, guide, num, constraints: SMC(model, guide=guide, num_particles=num,
                                                      constraints=constraints),
    "Importance": lambda model, guide, num, constraints: Importance(
        model, guide=guide, num_samples=num, constraints=constraints),
}


class BPE:
    """The BPE prior, a broader guide LM with its tokenizer (the prior's weights tempered),
    the constraint, and each shape's exact constrained posterior (enumerated once)."""

    def __init__(self):
        self.prior = tiny_bpe_lm(BPE_PIECES, seed=1)
        self.other = tiny_bpe_lm(BPE_PIECES, seed=1, init_std=0.25)
        self.c = Regex(self.prior, REGEX)
        self._exact = {}

    def build(self, shape):
        """``(model, factor_model, args, kinds, constraints)``: the shape as is (the mask
        form's model), with the constraint as factors, and the constraint on each of its LM
        sites (observed ones too: a constraint there is refused)."""
        model, args, kinds = shape(self.prior)
        factor_model = shape(self.prior, valid=self.c)[0]
        trace, _ = structure_trace(model, None, args)
        sites = [name for name, site in trace.nodes.items()
                 if site["type"] == "sample" and unwrap_lm(site["fn"]) is not None]
        return model, factor_model, args, kinds, dict.fromkeys(sites, self.c)

    def exact(self, shape):
        if shape not in self._exact:
            _, factor_model, args, _, _ = self.build(shape)
            self._exact[shape] = enumerate_model(factor_model, *args)
        return self._exact[shape]


@pytest.fixture(scope="module")
def bpe():
    return BPE()


def replicated(model, num, nesting):
    """``model`` inside a plate of ``num`` replicates, left of its own plates: ``num``
    independent copies of the problem, which a sampler runs at once."""
    def run(*args, **kwargs):
        with pyro.plate("replicates", num, dim=-(nesting + 1)):
            return model(*args, **kwargs)
    return run


def assert_valid(samples, constraints, log_weights=None):
    """Every value of a constrained site satisfies its constraint (where its weight is
    positive, if ``log_weights`` are given)."""
    for name, c in constraints.items():
        if name not in samples:
            continue
        ok = c(samples[name]) == 0
        if log_weights is not None:
            alive = torch.isfinite(log_weights)
            ok = ok | ~alive.reshape(alive.shape + (1,) * (ok.dim() - alive.dim()))
        assert ok.all(), (name, samples[name][~ok])


def exact_draws(post, log_z):
    r"""From runs replicated along dim 1 of the weights (``(N, R, *batch)``): one draw by
    weight from each run, kept with probability :math:`\hat Z_r / \max_r \hat Z_r`.
    Importance and SMC both have :math:`E[\hat Z \sum_i \bar w_i \delta_{x_i}] = \tilde p`
    (their unnormalised particle measure is unbiased), so the kept draws are independent
    draws of :math:`p^*` for any number of particles (up to the bound read from the same
    runs), where one draw by weight per run has its law only as that number grows.

    :returns: ``(draws, keep)``: site -> ``(R, ...)``, and ``(R, prod(batch))`` bool."""
    z_hat = (post.log_normalizer() - log_z).exp()  # (R, *batch)
    keep = torch.rand_like(z_hat) < z_hat / z_hat.amax(0)
    draws = {name: value[0] for name, value in post.resample(1).items()}
    return draws, keep.reshape(keep.shape[0], -1)


def joint_keys(values, batch):
    """Each joint value of ``values`` (site -> ``(L, ...)``) as one row of ints per weight
    column, ``(L, prod(batch), K)``; where the weight is joint over a plate (its size is 1
    there) the whole plate is one key."""
    columns = math.prod(batch)
    parts = []
    for name in sorted(values):
        v = values[name]
        event = v.shape[-1:] if name != "z" else ()  # an LM site's event is its T tokens
        if columns == 1:
            parts.append(v.reshape(v.shape[0], 1, -1))
            continue
        site = v.shape[1:v.dim() - len(event)]
        v = v.reshape((v.shape[0],) + (1,) * (len(batch) - len(site)) + site + event)
        parts.append(v.expand((v.shape[0],) + batch + event).reshape(v.shape[0], columns, -1))
    return torch.cat(parts, -1)


def chi2_pvalues(exact, draws, keep):
    """The pooled chi-square p-value of the kept ``draws`` (site -> ``(L, ...)``, ``keep``
    ``(L, columns)``) against the exact posterior, per weight column (an independent
    problem each)."""
    batch = exact.log_joint.shape[1:]
    support, drawn = joint_keys(exact.values, batch), joint_keys(draws, batch)
    probs = exact.probs.reshape(exact.probs.shape[0], -1)
    pvalues = []
    for j in range(support.shape[1]):
        match = (drawn[keep[:, j], None, j] == support[None, :, j]).all(-1)  # (kept, M)
        assert match.any(-1).all(), "a draw outside the support"
        pvalues.append(pooled_chi2_pvalue(match.sum(0), probs[:, j]))
    return pvalues


@pytest.mark.parametrize("form", ["mask", "factor"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_constrained_sampler(bpe, shape, sampler, form):
    """SMC and Importance, the guide LM proposing, with the constraint as a mask or as a
    factor, against the exact constrained posterior: the program as written gives valid
    samples and one weight per problem; R runs at once (replicated) give R independent
    Z-hat, unbiased for the exact Z, and draws (:func:`exact_draws`) that pass a chi-square
    test, every one valid. The two forms agree as each agrees with the same enumeration."""
    model, factor_model, args, kinds, constraints = bpe.build(shape)
    if form == "factor":
        model = factor_model

    def sampler_of(program):
        return SAMPLERS[sampler](program, AutoLMGuide(program, bpe.other), NUM[form],
                                 constraints if form == "mask" else None)

    match = refused(kinds, CONSTRAINED[f"{sampler}-{form}"])
    if match:
        return assert_error(lambda: sampler_of(model).run(*args), match)
    exact = bpe.exact(shape)
    post = sampler_of(model).run(*args)
    assert post.log_weights.shape[1:] == exact.log_Z.shape
    assert_valid(post.samples, constraints, post.log_weights)
    if form == "mask":  # a prefix-closed language: the mask never draws an invalid text
        assert torch.isfinite(post.log_weights).all()
    reps = sampler_of(replicated(model, REPLICATES, plate_nesting(model, None, args))).run(*args)
    z_hat = (reps.log_normalizer() - exact.log_Z).exp()  # (R, *batch), E = 1
    within(z_hat.mean(0), 1.0, standard_error(z_hat), "Z-hat / Z")
    draws, keep = exact_draws(reps, exact.log_Z)
    assert_valid(draws, constraints)
    assert keep.sum(0).min() >= REPLICATES // 8, keep.sum(0)  # enough to test
    assert min(chi2_pvalues(exact, draws, keep)) > 1e-3


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_constrained_guide(bpe, shape):
    """``AutoLMGuide(constraints=)`` in SVI, the model holding the constraint as factors: the
    guide's draws are valid and SVI's loss (SequenceELBO) is the exact ELBO of the masked law
    (the unmasked guide's is -inf: it draws invalid texts)."""
    _, model, args, kinds, constraints = bpe.build(shape)
    guide = AutoLMGuide(model, bpe.other, constraints=constraints)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         loss=SequenceELBO(num_particles=64))
    match = refused(kinds, CONSTRAINED["AutoLMGuide-mask"])
    if match:
        return assert_error(lambda: svi.evaluate_loss(*args), match)
    if "subsample" in kinds:  # a fresh subsample each step, scaled: unbiased for the full plate
        full = plate_of_three(bpe.prior, bpe.c)
        exact = enumerate_model(full, *args)
        exact_guide = AutoLMGuide(full, bpe.other, constraints=constraints)
    else:
        exact, exact_guide = bpe.exact(shape), guide
    assert_valid(guide(*args), constraints)
    draws = torch.tensor([svi.evaluate_loss(*args) for _ in range(10)])
    within(-draws.mean(), exact.elbo(exact_guide).sum(), standard_error(draws), "ELBO")


# ------------------------------------------------------------- the prior as its own guide
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.__name__)
def test_guide_equal_to_prior_gives_zero_weights_and_zero_kl(prior, exacts, shape):
    model, args, kinds = shape(prior, factor=False)
    if "no_lm" in kinds or "observed" in kinds:  # observed text is evidence: each weight
        return  # is its likelihood
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
