r"""Exact inference by enumeration, for tiny vocabularies and lengths.

Every latent site of a program (LM sites, whose support is every sequence of at
most ``T`` tokens, and discrete latent sites) is enumerated jointly: the program
runs once, vectorised, over the ``M`` joint values (a mixed-radix count over the
sites, in execution order, so a prompt built from another choice is built from
that choice's value), and the one scorer (:mod:`pyro_lm.infer.program`) gives

.. math::

    \log \tilde p(v) = \sum_s \sigma_s \log p(s), \qquad
    \log Z = \log \sum_v \tilde p(v), \qquad p^*(v) = \tilde p(v) / Z,

per independent problem (the plates every site shares). A program whose sites
couple the elements of a plate is enumerated jointly over those elements too. Tests
and benchmarks measure every approximate algorithm against it. Everything here is
differentiable in a guide's log-probabilities, so exact gradients of the ELBO or of
either KL come from autograd.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.lm_distribution import LMDistribution, unwrap_lm
from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.program import (
    PARTICLES,
    execute,
    latent_site_names,
    lm_site_names,
    plate_nesting,
    vectorize,
)
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.ops.plates import sum_to_batch

__all__ = ["ExactPosterior", "enumerate_model", "posterior", "MAX_JOINT"]

#: The largest number of joint values :func:`enumerate_model` builds by default.
MAX_JOINT = 200_000
_PROBES = 8


class _Enumerate(Messenger):
    """Gives latent site ``k`` (in execution order) the values
    ``support_k[(m // stride_k) % size_k]`` over the ``M`` executions ``m``: one digit per
    site, or per batch element of each site when ``joint``; with ``probe``, every
    execution gets the first value of every site."""

    def __init__(self, num: int, joint: bool, probe: bool = False):
        super().__init__()
        self.num, self.joint, self.probe, self.stride, self.sizes = num, joint, probe, 1, []

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or msg["value"] is not None:
            return
        fn = msg["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise ValueError(f"model: latent site {msg['name']!r} ({type(fn).__name__}) has no "
                             "finite support; exact enumeration takes LM sites and discrete "
                             "latent sites only: condition it (pyro.condition)")
        support = fn.enumerate_support(expand=False)
        size = support.shape[0]
        flat = support.reshape((size,) + tuple(fn.event_shape))
        batch = fn.batch_shape
        device = flat.device
        m = torch.arange(self.num, device=device).reshape((-1,) + (1,) * (len(batch) - 1))
        if self.probe:
            index = torch.zeros_like(m)
        elif self.joint:
            elements = torch.arange(batch[1:].numel(), device=device).reshape(batch[1:])
            index = (m // (self.stride * size ** elements)) % size
            self.stride *= size ** batch[1:].numel()
        else:
            index = (m // self.stride) % size
            self.stride *= size
        self.sizes.append((msg["name"], size))
        msg["value"] = flat[index].expand(batch + fn.event_shape)
        msg["done"] = True


class ExactPosterior:
    r"""The exact posterior over the joint support of a program's latent sites.

    Shapes: ``M`` joint values, ``batch`` the weights' batch shape (one entry per
    independent problem, e.g. prompt).

    :ivar dict values: latent site → ``(M, ...)``, the enumerated values.
    :ivar torch.Tensor log_prior: ``(M, *batch)``, :math:`\sum` of the latent sites'
        (scaled) :math:`\log p`.
    :ivar torch.Tensor log_joint: ``(M, *batch)``, :math:`\log \tilde p` (factors included).
    :ivar LMDistribution dist: the LM site's distribution when the program has one latent
        site, an LM site (to score another LM fast), else ``None``.
    """

    def __init__(self, values, log_prior, log_joint, dist: LMDistribution | None = None,
                 program=None):
        if isinstance(values, torch.Tensor):
            values = {"x": values}
        self.values = values
        self.log_prior = log_prior
        self.log_joint = log_joint
        self.dist = dist
        self._program = program  # (model, args, kwargs, nesting), to score guides
        self.log_normalizer = torch.logsumexp(log_joint, dim=0)
        if torch.isneginf(self.log_normalizer).any():
            raise ValueError("model: every value has probability zero under the posterior "
                             "(all log-factors -inf); the hard constraints cannot be met")
        self.log_posterior = log_joint - self.log_normalizer

    @property
    def support(self) -> torch.Tensor:
        """The values of the one latent site, ``(M, *batch, T)``."""
        if len(self.values) != 1:
            raise ValueError(f"support: the program has latent sites {sorted(self.values)}; "
                             "read .values[site]")
        return next(iter(self.values.values()))

    @property
    def log_Z(self) -> torch.Tensor:
        """Exact :math:`\\log Z`, shape ``batch``."""
        return self.log_normalizer

    @property
    def probs(self) -> torch.Tensor:
        """:math:`p^*(v)` over the joint support, ``(M, *batch)``."""
        return self.log_posterior.exp()

    def marginal(self, site: str):
        r"""The exact posterior marginal of one latent site.

        :returns: ``(values, probs)``: the site's distinct values ``(K, ...)`` and their
            posterior probabilities ``(K, *batch)``.
        """
        x = self.values[site]
        batch = self.log_joint.shape[1:]
        if batch.numel() == 1 and x.shape[1:1 + len(batch)].numel() > 1:
            raise ValueError(f"site: {site!r} has one value per element of a plate whose "
                             "elements share one weight; read .values and .probs jointly")
        # enumerated per problem: every batch element holds the same value at row m
        first = x[(slice(None),) + (0,) * len(batch)]  # (M, *event)
        unique, inverse = torch.unique(first.reshape(first.shape[0], -1), dim=0,
                                       return_inverse=True)
        probs = torch.zeros((unique.shape[0],) + tuple(batch), dtype=self.probs.dtype,
                            device=self.probs.device)
        probs.index_add_(0, inverse, self.probs)
        return unique.reshape((unique.shape[0],) + tuple(first.shape[1:])), probs

    def log_prob_of(self, q) -> torch.Tensor:
        """:math:`\\log q(v)` over the support for a guide ``q`` (differentiable): another
        :class:`~pyro_lm.CausalLM` (as ``AutoLMGuide(model, q)``) or a guide program."""
        if isinstance(q, CausalLM) and self.dist is not None:
            return self.dist.with_lm(q).log_prob(self.support)
        if self._program is None:
            raise ValueError("q: this ExactPosterior has no program to score a guide on")
        model, args, kwargs, nesting = self._program
        guide = AutoLMGuide(model, q) if isinstance(q, CausalLM) else q
        num = self.log_joint.shape[0]
        data = dict(self.values)
        with poutine.block():
            trace = poutine.trace(poutine.condition(vectorize(guide, num, -(nesting + 1)),
                                                    data=data)).get_trace(*args, **kwargs)
        total = torch.zeros_like(self.log_joint)
        batch = self.log_joint.shape[1:]
        for name in self.values:
            site = trace.nodes.get(name)
            if site is None:
                raise ValueError(f"q: the guide does not draw the latent site {name!r}")
            total = total + sum_to_batch(site["fn"].log_prob(site["value"]), batch, name)
        return total

    def _log_q(self, q) -> torch.Tensor:
        return q if isinstance(q, torch.Tensor) else self.log_prob_of(q)

    def expectation(self, values: torch.Tensor) -> torch.Tensor:
        """:math:`E_{p^*}[f(v)]` for ``values = f(support)`` of shape ``(M, *batch)``."""
        return (self.probs * values).sum(0)

    def kl_q_p(self, q) -> torch.Tensor:
        r""":math:`\mathrm{KL}(q \| p^*) = \sum_v q(v) (\log q(v) - \log p^*(v))`.

        :param q: a guide (:class:`~pyro_lm.CausalLM` or program) or its log-probs
            ``(M, *batch)``.
        """
        log_q = self._log_q(q)
        diff = torch.where(log_q.exp() > 0, log_q - self.log_posterior, torch.zeros_like(log_q))
        return (log_q.exp() * diff).sum(0)

    def kl_p_q(self, q) -> torch.Tensor:
        r""":math:`\mathrm{KL}(p^* \| q) = \sum_v p^*(v) (\log p^*(v) - \log q(v))`."""
        log_q = self._log_q(q)
        p = self.probs
        diff = torch.where(p > 0, self.log_posterior - log_q, torch.zeros_like(log_q))
        return (p * diff).sum(0)

    def tv(self, q) -> torch.Tensor:
        """Total variation distance :math:`\\frac12 \\sum_v |p^*(v) - q(v)|`."""
        return 0.5 * (self.probs - self._log_q(q).exp()).abs().sum(0)

    def elbo(self, q) -> torch.Tensor:
        r"""Exact ELBO :math:`E_q[\log \tilde p(v) - \log q(v)] = \log Z - \mathrm{KL}(q\|p^*)`."""
        log_q = self._log_q(q)
        diff = torch.where(log_q.exp() > 0, self.log_joint - log_q, torch.zeros_like(log_q))
        return (log_q.exp() * diff).sum(0)

    def kl_q_prior(self, q) -> torch.Tensor:
        r""":math:`\mathrm{KL}(q \| p_0)`."""
        log_q = self._log_q(q)
        diff = torch.where(log_q.exp() > 0, log_q - self.log_prior, torch.zeros_like(log_q))
        return (log_q.exp() * diff).sum(0)

    def entropy(self, q) -> torch.Tensor:
        """Entropy of ``q`` in nats."""
        log_q = self._log_q(q)
        return -(log_q.exp() * torch.where(log_q.exp() > 0, log_q, torch.zeros_like(log_q))).sum(0)

    def sample_counts(self, samples: torch.Tensor) -> torch.Tensor:
        """Histogram of ``samples`` ``(m, T)`` over the support of a single prompt, ``(M,)``."""
        support = self.support
        if support.dim() != 2:
            raise ValueError("samples: sample_counts needs a single-prompt posterior (batch ())")
        match = (samples[:, None, :] == support[None, :, :]).all(-1)  # (m, M)
        if not bool(match.any(-1).all()):
            raise ValueError("samples: some samples are not in the support (not canonical?)")
        return match.sum(0)


def _coupled(run) -> bool:
    """Whether some scored site has a plate dim of size > 1 that the weights sum over."""
    batch = run.batch_shape
    for site in run.model_trace.nodes.values():
        for f in site.get("cond_indep_stack", ()):
            if f.vectorized and f.name != PARTICLES and f.size > 1 and batch[f.dim] == 1:
                return True
    return False


def enumerate_model(model, *args, max_joint: int = MAX_JOINT, **kwargs) -> ExactPosterior:
    """Enumerate every latent site of ``model(*args, **kwargs)`` jointly and score it.

    :param int max_joint: the largest number of joint values to build.
    :raises ValueError: for a latent site without finite support, a joint support above
        ``max_joint``, or a program that draws randomness the enumeration does not see
        (e.g. a site hidden by ``poutine.block``).
    """
    nesting = plate_nesting(model, None, args, kwargs)
    # _PROBES runs with every site at its first value: their densities must agree (a site
    # hidden from the handlers is also hidden from the particle plate: one draw per run)
    runs = []
    for _ in range(_PROBES):
        probe = _Enumerate(1, joint=False, probe=True)
        runs.append(execute(model, None, 1, args, kwargs, nesting, "exact", assign=probe))
    first = runs[0]
    if any(not torch.equal(run.log_joint(), first.log_joint()) for run in runs[1:]):
        raise ValueError("model: with every latent site fixed, its log-density still varies "
                         "between runs: it draws randomness that the enumeration does not see "
                         "(a site hidden by poutine.block, or torch's RNG); exact needs every "
                         "random choice to be a visible sample site")
    joint = _coupled(first)
    elements = {name: site["fn"].batch_shape[1:].numel()
                for name, site in first.model_trace.nodes.items() if name in dict(probe.sizes)}
    total = 1
    for name, size in probe.sizes:
        total *= size ** (elements[name] if joint else 1)
    if total > max_joint:
        raise ValueError(f"max_joint: the joint support of {dict(probe.sizes)} has {total} "
                         f"values{' (per plate element: the plate is coupled)' if joint else ''}"
                         f", above max_joint={max_joint}; enumerate smaller vocabularies, "
                         "lengths or plates, or raise max_joint")
    run = execute(model, None, total, args, kwargs, nesting, "exact",
                  assign=_Enumerate(total, joint))
    values = run.samples()
    names = latent_site_names(run.model_trace)
    log_prior = run.to_batch(0.0)
    for name in names:
        log_prior = log_prior + run.site_log_prob(name)
    log_prior = log_prior.expand(run.log_joint().shape)
    log_joint = run.log_joint()
    if torch.isnan(log_joint).any():
        raise ValueError("model: a factor is NaN on some value of the support")
    lms = lm_site_names(run.model_trace)
    dist = None
    if len(names) == 1 and lms == names:
        fn = run.model_trace.nodes[names[0]]["fn"]
        dist = unwrap_lm(fn).expand(fn.batch_shape)
        values = {names[0]: values[names[0]].expand(tuple(log_joint.shape[:1])
                                                    + tuple(fn.batch_shape[1:])
                                                    + tuple(fn.event_shape))}
    return ExactPosterior(values, log_prior, log_joint, dist, (model, args, kwargs, nesting))


def posterior(prior, reward, beta: float, prompts, max_new_tokens: int) -> ExactPosterior:
    r"""Exact :math:`p^*(x) \propto p_0(x) \exp(r(x)/\beta)` for a prior LM and a reward.

    :param prior: a :class:`~pyro_lm.CausalLM`.
    :param reward: a callable ``x -> (*batch,)``.
    :param float beta: the temperature, > 0.
    """
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    dist = LMDistribution(prior, prompts, max_new_tokens)
    support = dist.enumerate_support()
    with torch.no_grad():
        log_prior = dist.log_prob(support)
        log_joint = log_prior + reward(support) / beta
    return ExactPosterior(support, log_prior, log_joint, dist)
