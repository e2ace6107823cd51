r"""An autoguide that runs a model's LM sites with a trainable LM.

Given a model whose latent variables are completions drawn from
:class:`~pyro_lm.LMDistribution` sites under a prior LM :math:`p_0`,
:class:`AutoLMGuide` is the program with the same LM sites (same prompts,
plates and lengths) drawn from a guide LM :math:`q` instead, and with the
factors left out: :math:`q(x \mid c)`.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_lm.exact import unwrap
from pyro_lm.lm.causal_lm import CausalLM

__all__ = ["AutoLMGuide", "trace_lm_sites", "placeholder_trace", "is_lm_placeholder",
           "max_plate_nesting"]


class _SkipLMSampling(Messenger):
    """Gives every unobserved LM site a placeholder value instead of sampling,
    so a model's structure can be read without decoding anything."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        dist = unwrap(msg["fn"])
        if dist is None:
            return
        shape = tuple(msg["fn"].batch_shape) + tuple(dist.event_shape)
        msg["value"] = torch.full(shape, dist.lm.pad_token_id, dtype=torch.long,
                                  device=dist.prompt_ids.device)
        msg["done"] = True
        msg["infer"] = dict(msg["infer"], _pyro_lm_placeholder=True)


def placeholder_trace(model, *args, **kwargs):
    """A trace of ``model(*args, **kwargs)`` in which every unobserved LM site holds a
    placeholder value (nothing is decoded), hidden from handlers outside."""
    with poutine.block():
        return poutine.trace(_SkipLMSampling()(model)).get_trace(*args, **kwargs)


def is_lm_placeholder(site) -> bool:
    """Whether ``site`` of a :func:`placeholder_trace` is an LM site."""
    return site["type"] == "sample" and bool(site["infer"].get("_pyro_lm_placeholder"))


def max_plate_nesting(trace) -> int:
    """The deepest vectorised plate dimension of ``trace``'s sample sites (0 if none)."""
    return max([0] + [-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
                      for frame in site["cond_indep_stack"]
                      if frame.vectorized and frame.dim is not None])


def trace_lm_sites(model, *args, **kwargs):
    """The LM sites of ``model(*args, **kwargs)``, found without sampling them.

    :returns: a list of ``(name, site)`` in execution order; ``site["fn"]`` is the
        (plate-expanded) distribution and ``site["cond_indep_stack"]`` its plates.
        Plates outside the model (e.g. vectorised particles) are not included.
    """
    trace = placeholder_trace(model, *args, **kwargs)
    return [(name, site) for name, site in trace.nodes.items() if is_lm_placeholder(site)]


class AutoLMGuide(nn.Module):
    r"""Guide :math:`q(x \mid c)` for every LM site of ``model``, drawn from ``lm``.

    :param model: a Pyro model with one or more :class:`~pyro_lm.LMDistribution`
        sites (inside any plates) and factors.
    :param lm: the trainable :class:`~pyro_lm.CausalLM` (e.g. ``prior.trainable_copy()``);
        its parameters are registered with ``pyro.module`` under ``name``.
    :param str name: the module's name in Pyro's param store.

    Calling the guide traces the model's structure (no decoding, no reward),
    then samples each LM site with the same prompts and plates from ``lm``.
    Returns a dict ``site -> completion``.

    :raises ValueError: if ``lm`` does not share the prior's tokenizer.
    """

    def __init__(self, model, lm: CausalLM, name: str = "guide_lm"):
        super().__init__()
        if not isinstance(lm, CausalLM):
            raise TypeError(f"lm: expected a pyro_lm.CausalLM, got {type(lm).__name__}")
        self.model = model
        self.lm = lm
        self.name = name
        self._checked = set()

    def _guide_dist(self, site):
        fn = site["fn"]
        dist = unwrap(fn)
        if id(dist.lm) not in self._checked:
            dist.lm.check_compatible(self.lm, "lm")
            self._checked.add(id(dist.lm))
        return dist.with_lm(self.lm).expand(fn.batch_shape)

    def get_lm_sites(self, *args, **kwargs):
        """``(name, guide distribution, plate frames)`` for each LM site of the model."""
        return [(name, self._guide_dist(site), site["cond_indep_stack"])
                for name, site in trace_lm_sites(self.model, *args, **kwargs)]

    def forward(self, *args, **kwargs):
        pyro.module(self.name, self.lm)
        values, plates = {}, {}
        for name, dist, frames in self.get_lm_sites(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for frame in frames:
                    if frame.vectorized:
                        # one plate object per plate, re-entered by every site inside it (a
                        # second pyro.plate of the same name would be a duplicate site)
                        key = (frame.name, frame.size, frame.dim)
                        if key not in plates:
                            plates[key] = pyro.plate(frame.name, frame.size, dim=frame.dim)
                        stack.enter_context(plates[key])
                values[name] = pyro.sample(name, dist)
        return values
