r"""Proposals weighed against a model: the machinery shared by DPG, QRS, IMH and
moment fitting.

A model's LM sites and plates are read without decoding (:func:`lm_structure`);
completions are drawn from a proposal :math:`\pi` in one batched decode per site
(:func:`sample_lm_sites`); the model then runs once, vectorised over the samples
inside an outer particle plate (:func:`vectorized_log_joint`), giving for each
sample and prompt

.. math:: \log w(x) = \log p_0(x) + \sum_k f_k(x) - \log \pi(x)

(:func:`propose`). With the prior as proposal, :math:`\log w` is the total log-factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyro_lm.exact import unwrap
from pyro_lm.infer.autoguide import (
    AutoLMGuide,
    is_lm_placeholder,
    max_plate_nesting,
    placeholder_trace,
)
from pyro_lm.lm.causal_lm import CausalLM

__all__ = ["LMStructure", "lm_structure", "site_dist", "sample_lm_sites", "align_particles",
           "sum_unshared_plates", "vectorized_log_joint", "proposal_lm", "Proposal", "propose"]

_PARTICLES = "_pyro_lm_particles"


# --------------------------------------------------------------------------- model structure
@dataclass
class LMStructure:
    """What a model looks like, read without decoding anything.

    :ivar list sites: ``(name, site)`` of each LM site (``site["fn"]`` plate-expanded).
    :ivar int max_plate_nesting: the model's deepest plate dimension.
    """

    sites: list
    max_plate_nesting: int

    @property
    def batch_shape(self) -> torch.Size:
        """The batch shape shared by the LM sites (an error if they differ)."""
        shapes = {tuple(site["fn"].batch_shape) for _, site in self.sites}
        if len(shapes) != 1:
            raise ValueError(f"model: LM sites have different batch shapes {sorted(shapes)}; "
                             "this sampler needs them to share one")
        return torch.Size(shapes.pop())


def lm_structure(model, *args, **kwargs) -> LMStructure:
    """Trace ``model`` with placeholder LM values (no decoding) and read its LM sites and plates.

    :raises ValueError: if the model has no LM site, or latent sites that are not LM sites.
    """
    trace = placeholder_trace(model, *args, **kwargs)
    sites, others = [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if is_lm_placeholder(site):
            sites.append((name, site))
        elif not site["is_observed"]:
            others.append(name)
    if not sites:
        raise ValueError("model: it has no LM sample site (a pyro.sample of an LMDistribution)")
    if others:
        raise ValueError(f"model: latent sites {others} are not LM sites; condition them "
                         "(pyro.condition) or marginalise them before fitting the LM sites")
    return LMStructure(sites, max_plate_nesting(trace))


def site_dist(site, lm: CausalLM | None):
    """The site's (plate-expanded) LM distribution, under ``lm`` if given."""
    fn = site["fn"]
    dist = unwrap(fn)
    if lm is not None:
        dist = dist.with_lm(lm)
    return dist.expand(fn.batch_shape)


def sample_lm_sites(structure: LMStructure, lm: CausalLM | None, num_samples: int):
    """Draw ``num_samples`` completions of every LM site (no gradient).

    :param lm: the proposal LM, or ``None`` for each site's prior.
    :returns: ``(values, log_probs)``: dicts site → ``(num_samples, *batch, T)`` and
        site → ``(num_samples, *batch)`` (log-probs computed while decoding).
    """
    values, log_probs = {}, {}
    with torch.no_grad():
        for name, site in structure.sites:
            values[name], log_probs[name] = site_dist(site, lm).sample_with_log_prob(
                torch.Size((num_samples,)))
    return values, log_probs


def align_particles(t: torch.Tensor, num: int, n: int) -> torch.Tensor:
    """``t`` right-aligned to ``(num, d_{-n}, ..., d_{-1})``, broadcast along the particle dim."""
    t = t.reshape((1,) * (n + 1 - t.dim()) + tuple(t.shape))
    return t.expand((num,) + tuple(t.shape[1:]))


def sum_unshared_plates(t: torch.Tensor, n: int, common: frozenset) -> torch.Tensor:
    """Sum the plate dims of an aligned tensor that are not shared by every site."""
    dims = [d for d in range(-n, 0) if d not in common and t.shape[d] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def vectorized_log_joint(model, structure: LMStructure, values: dict, *args, **kwargs):
    r"""Run ``model`` once on ``values`` (leading particle dim ``K``), vectorised.

    The model runs under ``poutine.condition`` inside an outer plate of size ``K``
    (one dimension left of its own plates), without gradients.

    :returns: ``(log_prior, log_factors, common)``: :math:`\sum \log p_0` over the LM
        sites and the sum of every other site's log-density (the factors), both
        ``(K, d_{-n}, ..., d_{-1})`` with ``n = max_plate_nesting``. Dimensions of
        plates that every site shares (``common``, a set of negative dims) index
        independent problems (e.g. prompts); the others are summed and kept as size 1.
    """
    n = structure.max_plate_nesting
    num = next(iter(values.values())).shape[0]
    data = {}
    for name, site in structure.sites:
        x = values[name]
        batch = tuple(site["fn"].batch_shape)
        data[name] = x.reshape((num,) + (1,) * (n - len(batch)) + batch + x.shape[-1:])
    with torch.no_grad(), poutine.block():
        with pyro.plate(_PARTICLES, num, dim=-(n + 1)):
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
    nodes = [(name, site) for name, site in trace.nodes.items()
             if site["type"] == "sample" and not site_is_subsample(site)]
    common = frozenset.intersection(*[
        frozenset(f.dim for f in site["cond_indep_stack"] if f.vectorized and f.name != _PARTICLES)
        for _, site in nodes])
    log_prior = log_factors = None
    for name, site in nodes:
        lp = sum_unshared_plates(align_particles(site["log_prob"], num, n), n, common)
        if name in values:
            log_prior = lp if log_prior is None else log_prior + lp
        else:
            log_factors = lp if log_factors is None else log_factors + lp
    if log_factors is None:
        log_factors = torch.zeros_like(log_prior)
    shape = torch.broadcast_shapes(log_prior.shape, log_factors.shape)
    return log_prior.expand(shape), log_factors.expand(shape), common


def proposal_lm(proposal, name: str = "proposal") -> CausalLM | None:
    if proposal is None or isinstance(proposal, CausalLM):
        return proposal
    if isinstance(proposal, AutoLMGuide):
        return proposal.lm
    raise TypeError(f"{name}: expected an AutoLMGuide, a CausalLM or None (the prior), got "
                    f"{type(proposal).__name__}")


@dataclass
class Proposal:
    r"""Completions drawn from a proposal :math:`\pi` and weighed against a model.

    Shapes: ``N`` samples, ``batch`` the LM sites' batch shape.

    :ivar dict values: site → ``(N, *batch, T)``.
    :ivar torch.Tensor log_weights: :math:`\log \tilde p(x) - \log \pi(x)`, ``(N, *batch)``.
    :ivar torch.Tensor log_prior: :math:`\log p_0(x)`, ``(N, *batch)``.
    :ivar torch.Tensor log_factors: the model's total log-factor, ``(N, *batch)``.
    :ivar torch.Tensor log_proposal: :math:`\log \pi(x)`, ``(N, *batch)``.
    :ivar dict lms: site → prior LM (to decode).
    """

    values: dict
    log_weights: torch.Tensor
    log_prior: torch.Tensor
    log_factors: torch.Tensor
    log_proposal: torch.Tensor
    lms: dict


def propose(model, proposal, num_samples: int, *args, structure: LMStructure | None = None,
            **kwargs) -> Proposal:
    r"""Draw ``num_samples`` completions from ``proposal`` and weigh them by :math:`\tilde p/\pi`.

    :param model: a model with one or more LM sites sharing one batch shape.
    :param proposal: an :class:`~pyro_lm.infer.AutoLMGuide`, a :class:`~pyro_lm.CausalLM`,
        or ``None`` to propose from the prior (then :math:`\log w` is the total log-factor).
    :param int num_samples: samples per prompt, drawn in one batched decode.
    """
    structure = structure or lm_structure(model, *args, **kwargs)
    batch = structure.batch_shape
    lm = proposal_lm(proposal)
    values, log_probs = sample_lm_sites(structure, lm, num_samples)
    log_prior, log_factors, _ = vectorized_log_joint(model, structure, values, *args, **kwargs)
    n = structure.max_plate_nesting
    aligned = (num_samples,) + (1,) * (n - len(batch)) + tuple(batch)
    shape = (num_samples,) + tuple(batch)
    log_prior = log_prior.expand(aligned).reshape(shape)
    log_factors = log_factors.expand(aligned).reshape(shape)
    log_proposal = log_prior if lm is None else sum(log_probs.values())
    log_weights = log_prior + log_factors - log_proposal
    lms = {name: unwrap(site["fn"]).lm for name, site in structure.sites}
    return Proposal(values, log_weights, log_prior, log_factors, log_proposal, lms)
