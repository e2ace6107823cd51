r"""Proposals weighed against a model: what QRS, IMH and moment fitting draw from.

A proposal :math:`\pi` is the model's prior (``None``), a guide LM
(a :class:`~pyro_lm.CausalLM`, run as :class:`~pyro_lm.infer.AutoLMGuide`), or any
guide program. :func:`propose` runs the program ``N`` times under it through the one
reader and scorer (:func:`~pyro_lm.infer.program.execute`), giving for each sample

.. math:: \log w(x) = \log \tilde p(x) - \log \pi(x)

(with the prior as proposal, the total log-factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.program import Execution, execute, plate_nesting
from pyro_lm.lm.causal_lm import CausalLM

__all__ = ["Proposal", "as_guide", "check_guide_constraints", "propose"]


def as_guide(model, proposal, name: str = "proposal", owner: str = "the sampler",
             conditioned=None):
    """The guide program of ``proposal``: ``None`` (the prior), an
    :class:`~pyro_lm.infer.AutoLMGuide` or another guide as is, a
    :class:`~pyro_lm.CausalLM` as ``AutoLMGuide(model, proposal)``.

    :param conditioned: the LM sites whose constraint the sampler's target is conditioned
        on (its ``constraints``), or ``None`` for a sampler that takes no constraints; see
        :func:`check_guide_constraints`."""
    if isinstance(proposal, CausalLM):
        return AutoLMGuide(model, proposal).propose
    if isinstance(proposal, AutoLMGuide):
        check_guide_constraints(proposal, conditioned, name, owner)
        return proposal.propose
    if proposal is None or callable(proposal):
        return proposal
    raise TypeError(f"{name}: expected an AutoLMGuide (or another guide), a CausalLM or None "
                    f"(the prior), got {type(proposal).__name__}")


def check_guide_constraints(guide, conditioned, name: str, owner: str) -> None:
    """Refuse a guide whose constraints mask an LM site that the sampler's target is not
    conditioned on: such a guide never proposes text outside the constraint, where the
    posterior has mass, so weighing its samples would estimate the posterior conditioned on
    the constraint instead, silently.

    :param conditioned: the sites the sampler's ``constraints`` condition its target on, or
        ``None`` if it takes no constraints.
    :raises ValueError: naming ``name``, the sites and the fix."""
    masked = sorted(set(getattr(guide, "constraints", None) or ()) - set(conditioned or ()))
    if masked:
        sites = ", ".join(repr(s) for s in masked)
        if conditioned is not None:
            fix = (f"pass the same constraints to {owner} too (constraints={{{masked[0]!r}: "
                   "c}): its target is then conditioned on them, with exact weights")
        else:
            fix = (f"{owner} takes no constraints: use SMC or Importance with constraints=, "
                   "or put pyro.factor('valid', c(x)) in the model and propose from a "
                   "guide without constraints")
        raise ValueError(
            f"{name}: the guide's constraints mask the LM site(s) {sites}, so it never "
            f"proposes text outside them, where the model's posterior has mass; {owner} "
            f"would silently estimate the posterior conditioned on them. To sample that "
            f"conditioned posterior, {fix} (a guide's constraints are for training it)")


@dataclass
class Proposal:
    r"""Samples drawn from a proposal :math:`\pi` and weighed against a model.

    :ivar dict values: latent site → ``(N, ...)``.
    :ivar torch.Tensor log_weights: :math:`\log \tilde p - \log \pi`, ``(N, *batch)``.
    :ivar dict lms: LM site → prior LM (to decode).
    :ivar Execution execution: the scored run.
    """

    values: dict
    log_weights: torch.Tensor
    lms: dict
    execution: Execution


def propose(model, guide, num_samples: int, args=(), kwargs=None, nesting: int | None = None,
            owner: str = "model") -> Proposal:
    """Draw ``num_samples`` executions of ``model`` from the guide program ``guide`` (see
    :func:`as_guide`) and weigh them by :math:`\\tilde p/\\pi`."""
    if nesting is None:
        nesting = plate_nesting(model, guide, args, kwargs)
    run = execute(model, guide, num_samples, args, kwargs, nesting, owner=owner)
    return Proposal(run.samples(), run.log_weights(), run.lms(), run)
