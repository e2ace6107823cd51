r"""An autoguide that runs a model's own program with a trainable LM.

Given a model whose LM sites draw completions from a prior LM :math:`p_0`,
:class:`AutoLMGuide` is the same program (same order, plates and prompts: each
prompt as *this execution* builds it) with every LM site drawn from a guide LM
:math:`q` instead and the factors left out,

.. math:: q(z, x_1, \dots, x_K) = q_\text{latent}(z) \prod_k q(x_k \mid c_k(z, x_{<k})),

where :math:`c_k` is the prompt of site :math:`k`, :math:`z` the model's other latent
sites (drawn from ``latent_guide`` if given, else from the model's own prior).
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
from torch import nn

from pyro_lm.constraints.base import check_constraints
from pyro_lm.constraints.masked import MaskedLMDistribution
from pyro_lm.constraints.messenger import MaskLMMessenger
from pyro_lm.distributions.lm_distribution import unwrap_lm
from pyro_lm.infer.program import lm_site_names
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.poutine import GuideLMMessenger

__all__ = ["AutoLMGuide"]


class AutoLMGuide(nn.Module):
    r"""Guide :math:`q` for every LM site of ``model``, drawn from ``lm``, composed with a
    guide for the model's other latent sites.

    :param model: a Pyro model with :class:`~pyro_lm.LMDistribution` sites (inside any
        plates, chained, or with prompts chosen by other latent sites) and factors.
    :param lm: the trainable :class:`~pyro_lm.CausalLM` (e.g. ``prior.trainable_copy()``);
        its parameters are registered with ``pyro.module`` under ``name``.
    :param str name: the module's name in Pyro's param store.
    :param latent_guide: a guide for some of the model's non-LM latent sites (a Pyro
        autoguide such as ``AutoNormal(poutine.block(model, expose=[...]))``, or a guide
        function); it runs first, and the model replays what it drew. Latent sites it does
        not draw are drawn from the model's prior. ``None``: every one from its prior.
    :param dict constraints: LM site name → :class:`~pyro_lm.constraints.Constraint`: that
        site is drawn from ``lm`` under the constraint's mask, a
        :class:`~pyro_lm.constraints.MaskedLMDistribution` whose ``log_prob`` is the
        masked law's (exact, differentiable), so that SVI or DPG trains the masked guide.
        Such a guide never proposes text outside the constraint, so a sampler (SMC,
        Importance, QRS, IMH) refuses it unless its target is conditioned on the same
        sites (``SMC(..., constraints=)``, ``Importance(..., constraints=)``).

    Each call runs the model under :class:`~pyro_lm.poutine.GuideLMMessenger`: the LM
    sites are drawn from ``lm`` with the prompts of that very execution, observed sites
    are left out, and a subsampled plate draws a fresh subsample (with Pyro's scaling),
    which the model then replays. A ``poutine.scale`` or ``mask`` around the model
    weighs the model's densities only. Returns a dict ``site -> value`` of what it drew.

    :raises ValueError: if ``lm`` does not share the prior's tokenizer.
    """

    def __init__(self, model, lm: CausalLM, name: str = "guide_lm", latent_guide=None,
                 constraints=None):
        super().__init__()
        if not isinstance(lm, CausalLM):
            raise TypeError(f"lm: expected a pyro_lm.CausalLM, got {type(lm).__name__}")
        if latent_guide is not None and not callable(latent_guide):
            raise TypeError(f"latent_guide: expected None or a callable guide, got "
                            f"{type(latent_guide).__name__}")
        if isinstance(latent_guide, nn.Module):
            self.latent_guide = latent_guide  # a submodule: its parameters go with ours
        else:
            self.__dict__["latent_guide"] = latent_guide
        self.model = model
        self.lm = lm
        self.name = name
        self.constraints = check_constraints(constraints, "AutoLMGuide")
        self._training = False  # set by register_params
        for key, constraint in self.constraints.items():
            constraint.check_lm(lm, f"constraints[{key!r}]")

    def register_params(self) -> None:
        """Register the guide LM's trainable parameters with ``pyro.module`` (none for a
        frozen LM, e.g. a fixed proposal). Every loss that trains the guide calls it; from
        then on the guide refuses to draw a site whose model LM is its own trainable LM
        (training would move the prior with the guide)."""
        self._training = True
        first = next(((n, p) for n, p in self.lm.named_parameters() if p.requires_grad), None)
        if first is None:
            return
        key, store = f"{self.name}$$${first[0]}", pyro.get_param_store()
        if key in store and store.get_param(key) is not first[1]:
            # pyro.module would hand the optimiser the stored tensor, which this LM never reads
            raise ValueError(
                f"name: the param store already holds {key!r} for another module (an earlier "
                f"guide named {self.name!r}, or a loaded param store), so this guide's LM "
                "would not be trained; call pyro.clear_param_store() first, or give this "
                "guide another name=")
        pyro.module(self.name, self.lm)

    def site_law(self, name: str, prior):
        """The guide's law of LM site ``name`` whose prior is ``prior`` (the model's
        :class:`~pyro_lm.LMDistribution` there, or a wrapper of it): the prior's prompts,
        length and batch shape with the guide's LM, restricted to the site's constraint if it
        has one (a :class:`~pyro_lm.constraints.MaskedLMDistribution`). What the guide
        samples that site from, so what a loss scoring ``log q`` must use."""
        dist = unwrap_lm(prior).with_lm(self.lm).expand(prior.batch_shape)
        constraint = self.constraints.get(name)
        return dist if constraint is None else MaskedLMDistribution(dist, constraint)

    def forward(self, *args, **kwargs):
        self.register_params()
        return self.propose(*args, **kwargs)

    def propose(self, *args, **kwargs):
        """The guide program without registering parameters: what a sampler runs to
        propose (under ``poutine.block``, where a registration would be hidden anyway)."""
        drawn = None
        if self.latent_guide is not None:
            drawn = poutine.trace(self.latent_guide).get_trace(*args, **kwargs)
        run = GuideLMMessenger(self.lm, drawn, training=self._training)(self.model)
        if self.constraints:
            run = MaskLMMessenger(self.constraints)(run)
        try:
            trace = poutine.trace(run).get_trace(*args, **kwargs)
        except RuntimeError as e:
            if "Multiple sample sites named" not in str(e):
                raise
            raise RuntimeError(
                f"{str(e).splitlines()[0]}: another guide (e.g. an earlier part of an "
                "AutoGuideList) drew that site already, and AutoLMGuide cannot see its value. "
                "Pass that guide as AutoLMGuide(model, lm, latent_guide=...) instead: it runs "
                "first and the model replays what it drew") from None
        values = {} if drawn is None else {
            name: site["value"] for name, site in drawn.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]}
        names = lm_site_names(trace)
        # every LM site the guide drew, also one a handler around it conditions (as exact
        # scoring and poutine.condition do): it is drawn from its masked law all the same
        drawn_lm = [name for name, site in trace.nodes.items() if site["type"] == "sample"
                    and unwrap_lm(site["fn"]) is not None]
        unknown = sorted(set(self.constraints) - set(drawn_lm))
        if unknown:
            raise ValueError(f"constraints: the model has no LM sample site {unknown[0]!r} "
                             f"(its LM sites: {drawn_lm}); key each constraint by the name of "
                             "the LM site it constrains")
        values.update((name, trace.nodes[name]["value"]) for name in names)
        return values
