r"""Exact inference by enumeration, for tiny vocabularies and lengths.

For a model with one :class:`~pyro_lm.LMDistribution` site ``x`` and any
number of factors, enumerating the support gives the unnormalised posterior

.. math::

    \log \tilde p(x) = \log p_0(x) + \sum_k f_k(x), \qquad
    \log Z = \log \sum_x \tilde p(x), \qquad p^*(x) = \tilde p(x) / Z,

per prompt. Tests and benchmarks measure every approximate algorithm against
it. Everything here is differentiable in a guide's log-probabilities, so exact
gradients of the ELBO or of either KL come from autograd.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.lm_distribution import LMDistribution

__all__ = ["ExactPosterior", "enumerate_model", "posterior", "find_lm_sites", "unwrap"]


def unwrap(fn):
    """The :class:`LMDistribution` inside Pyro's wrappers (masks, independence), or ``None``."""
    while fn is not None and not isinstance(fn, LMDistribution):
        fn = getattr(fn, "base_dist", None)
    return fn


def find_lm_sites(trace) -> list[str]:
    """Names of the unobserved sample sites of ``trace`` drawn from an :class:`LMDistribution`."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and unwrap(site["fn"]) is not None]


class ExactPosterior:
    r"""The exact posterior over the support of one LM site.

    Shapes: ``n`` sequences in the support, ``batch`` the site's batch shape.

    :ivar torch.Tensor support: ``(n, *batch, T)``.
    :ivar torch.Tensor log_prior: ``(n, *batch)``, :math:`\log p_0(x)`.
    :ivar torch.Tensor log_joint: ``(n, *batch)``, :math:`\log \tilde p(x)`.
    :ivar LMDistribution dist: the site's distribution (to score guides on the support).
    """

    def __init__(self, support, log_prior, log_joint, dist: LMDistribution | None = None):
        self.support = support
        self.log_prior = log_prior
        self.log_joint = log_joint
        self.dist = dist
        self.log_normalizer = torch.logsumexp(log_joint, dim=0)
        if torch.isneginf(self.log_normalizer).any():
            raise ValueError("model: every sequence has probability zero under the posterior "
                             "(all log-factors -inf); the hard constraints cannot be met")
        self.log_posterior = log_joint - self.log_normalizer

    @property
    def log_Z(self) -> torch.Tensor:
        """Exact :math:`\\log Z`, shape ``batch``."""
        return self.log_normalizer

    @property
    def probs(self) -> torch.Tensor:
        """:math:`p^*(x)` over the support, ``(n, *batch)``."""
        return self.log_posterior.exp()

    def log_prob_of(self, lm) -> torch.Tensor:
        """:math:`\\log q(x)` over the support for another LM ``lm`` (differentiable)."""
        if self.dist is None:
            raise ValueError("lm: this ExactPosterior has no LM site to rescore")
        return self.dist.with_lm(lm).log_prob(self.support)

    def _log_q(self, q) -> torch.Tensor:
        return q if isinstance(q, torch.Tensor) else self.log_prob_of(q)

    def expectation(self, values: torch.Tensor) -> torch.Tensor:
        """:math:`E_{p^*}[f(x)]` for ``values = f(support)`` of shape ``(n, *batch)``."""
        return (self.probs * values).sum(0)

    def kl_q_p(self, q) -> torch.Tensor:
        r""":math:`\mathrm{KL}(q \| p^*) = \sum_x q(x) (\log q(x) - \log p^*(x))`.

        :param q: a guide :class:`~pyro_lm.CausalLM` or its log-probs ``(n, *batch)``.
        """
        log_q = self._log_q(q)
        diff = torch.where(log_q.exp() > 0, log_q - self.log_posterior, torch.zeros_like(log_q))
        return (log_q.exp() * diff).sum(0)

    def kl_p_q(self, q) -> torch.Tensor:
        r""":math:`\mathrm{KL}(p^* \| q) = \sum_x p^*(x) (\log p^*(x) - \log q(x))`."""
        log_q = self._log_q(q)
        p = self.probs
        diff = torch.where(p > 0, self.log_posterior - log_q, torch.zeros_like(log_q))
        return (p * diff).sum(0)

    def tv(self, q) -> torch.Tensor:
        """Total variation distance :math:`\\frac12 \\sum_x |p^*(x) - q(x)|`."""
        return 0.5 * (self.probs - self._log_q(q).exp()).abs().sum(0)

    def elbo(self, q) -> torch.Tensor:
        r"""Exact ELBO :math:`E_q[\log \tilde p(x) - \log q(x)] = \log Z - \mathrm{KL}(q\|p^*)`."""
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
        """Histogram of ``samples`` ``(m, T)`` over the support of a single prompt, ``(n,)``."""
        if self.support.dim() != 2:
            raise ValueError("samples: sample_counts needs a single-prompt posterior (batch ())")
        match = (samples[:, None, :] == self.support[None, :, :]).all(-1)  # (m, n)
        if not bool(match.any(-1).all()):
            raise ValueError("samples: some samples are not in the support (not canonical?)")
        return match.sum(0)


def enumerate_model(model, *args, site: str | None = None, **kwargs) -> ExactPosterior:
    """Enumerate the LM site of ``model(*args, **kwargs)`` and evaluate every factor.

    The model may use plates (the enumeration dimension is added on the left);
    it must have exactly one unobserved sample site, an LM site (or name it
    with ``site``).
    """
    with poutine.block():
        proto = poutine.trace(model).get_trace(*args, **kwargs)
    latent = [n for n, s in proto.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and not site_is_subsample(s)]
    lm_sites = find_lm_sites(proto)
    if site is None:
        if len(lm_sites) != 1:
            raise ValueError(f"site: the model has LM sites {lm_sites}; enumerate_model needs "
                             "exactly one (pass site=...)")
        site = lm_sites[0]
    elif site not in lm_sites:
        raise ValueError(f"site: {site!r} is not an LM sample site of the model ({lm_sites})")
    others = [n for n in latent if n != site]
    if others:
        raise ValueError(f"model: latent sites {others} besides {site!r} cannot be enumerated "
                         "here; condition them with pyro.condition first")
    fn = proto.nodes[site]["fn"]
    dist = unwrap(fn)
    value = dist.enumerate_support(expand=False)
    n = value.shape[0]
    value = value.expand((n,) + tuple(fn.batch_shape) + dist.event_shape)
    conditioned = poutine.condition(model, data={site: value})
    with poutine.block():
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    log_prior = trace.nodes[site]["log_prob"]
    log_joint = torch.zeros_like(log_prior)
    for node in trace.nodes.values():
        if node["type"] == "sample" and not site_is_subsample(node):
            log_joint = log_joint + node["log_prob"]
    if torch.isnan(log_joint).any():
        raise ValueError("model: a factor is NaN on some sequence of the support")
    fn_dist = dist.expand(fn.batch_shape) if tuple(fn.batch_shape) != tuple(dist.batch_shape) \
        else dist
    return ExactPosterior(value, log_prior, log_joint, fn_dist)


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
