"""Draw a program's constrained LM sites by masked decoding."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.constraints.masked import MaskedLMDistribution
from pyro_lm.distributions.lm_distribution import unwrap_lm

__all__ = ["MaskLMMessenger", "constrained_proposal"]


class MaskLMMessenger(Messenger):
    r"""Replaces the distribution of every unobserved LM site named in ``constraints``
    by its :class:`~pyro_lm.constraints.MaskedLMDistribution`, so that the site is drawn
    (and scored) under the constraint's mask. Place it outside a guide's own handlers
    (e.g. around :class:`~pyro_lm.infer.AutoLMGuide`'s run): it masks whatever LM the
    site has by then.

    :param dict constraints: LM site name → :class:`~pyro_lm.constraints.Constraint`.
    :raises ValueError: naming the site if it is not a plain LM site, or the constraint
        was built for another tokenizer.
    """

    def __init__(self, constraints: dict):
        super().__init__()
        self.constraints = constraints

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name not in self.constraints or msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        if isinstance(fn, MaskedLMDistribution):
            return  # masked already (an inner MaskLMMessenger)
        dist = unwrap_lm(fn)
        if dist is None or dist is not fn:
            what = "is not an LMDistribution site" if dist is None else (
                "wraps its LMDistribution (.mask, .to_event)")
            raise ValueError(f"constraints: site {name!r} {what}; a constraint masks the "
                             "tokens of a plain LMDistribution site")
        msg["fn"] = MaskedLMDistribution(fn, self.constraints[name])


class _HideObserved(Messenger):
    """The model as its own guide: observed sites (factors, data) are left out."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] and not site_is_subsample(msg):
            msg["done"], msg["stop"] = True, True


def constrained_proposal(model, guide, constraints: dict):
    """The guide program that proposes ``model``'s latent sites as ``guide`` does (``None``:
    the model's own prior), its constrained LM sites by masked decoding."""
    run = _HideObserved()(model) if guide is None else guide
    return MaskLMMessenger(constraints)(run)
