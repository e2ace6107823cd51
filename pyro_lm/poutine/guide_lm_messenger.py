"""Run a model as its own guide, its LM sites drawn from another LM."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.lm_distribution import unwrap_lm

__all__ = ["GuideLMMessenger", "subsample_scale"]


def subsample_scale(frames) -> float:
    """The scale that subsampling plates give a site: the product of ``size / subsample_size``."""
    scale = 1.0
    for frame in frames:
        if frame.full_size is not None and frame.full_size != frame.size:
            scale = scale * frame.full_size / frame.size
    return scale


class GuideLMMessenger(Messenger):
    r"""Turns a model into a guide :math:`q`: its execution, with every unobserved
    :class:`~pyro_lm.LMDistribution` site drawn from ``lm`` instead of the model's LM.

    Each LM site keeps the prompts, length and plates *of this execution* (a prompt
    that depends on an earlier choice is the one that choice produced). Sites already
    drawn in ``trace`` (e.g. by a guide for the model's other latent sites) are
    replayed and hidden; other latent sites are drawn from the model's own
    distributions (their guide is their prior); observed sites (factors, data) are
    hidden. Guide sites carry only their plates' subsampling scale: a
    ``poutine.scale`` or ``poutine.mask`` around the model weighs the model's
    densities, not the guide's. Subsample sites are recorded, so a guide draws a
    fresh subsample and the model replays it.

    :param lm: the guide's :class:`~pyro_lm.CausalLM` (sharing the model's tokenizer).
    :param trace: a trace whose sample sites are replayed and hidden, or ``None``.
    :param bool training: the guide is being trained (an AutoLMGuide once a loss has
        called its ``register_params``): refuse an LM site whose model LM *is* ``lm`` with
        trainable parameters, since each step would move the prior with the guide (samplers
        may propose from the prior itself).

    >>> import pyro, pyro.poutine as poutine
    >>> from pyro_lm import LMDistribution
    >>> from pyro_lm.lm import toy_lm
    >>> prior, guide_lm = toy_lm(vocab_size=4, seed=0), toy_lm(vocab_size=4, seed=1)
    >>> def model():
    ...     x = pyro.sample("x", LMDistribution(prior, "t1", 3))
    ...     pyro.factor("reward", (x == 2).sum(-1).float())
    >>> trace = poutine.trace(GuideLMMessenger(guide_lm)(model)).get_trace()
    >>> [name for name in trace.nodes if name not in ("_INPUT", "_RETURN")]
    ['x']
    >>> trace.nodes["x"]["fn"].lm is guide_lm
    True
    """

    def __init__(self, lm, trace=None, training: bool = False):
        super().__init__()
        self.lm = lm
        self.trace = trace
        self.training = training
        self._checked = set()

    def _pyro_sample(self, msg):
        node = None if self.trace is None else self.trace.nodes.get(msg["name"])
        if node is not None and node["type"] == "sample":
            msg["value"], msg["done"], msg["stop"] = node["value"], True, True
            return
        if site_is_subsample(msg):
            return
        if msg["is_observed"]:
            msg["done"], msg["stop"] = True, True
            return
        msg["scale"], msg["mask"] = subsample_scale(msg["cond_indep_stack"]), None
        fn = msg["fn"]
        dist = unwrap_lm(fn)
        if dist is not None:
            if id(dist.lm) not in self._checked:
                dist.lm.check_compatible(self.lm, "lm")
                if self.training and dist.lm is self.lm \
                        and any(p.requires_grad for p in self.lm.parameters()):
                    raise ValueError(
                        f"lm: the guide's LM is the model's own LM at site {msg['name']!r}, "
                        "and it is trainable, so every step would move the prior with the "
                        "guide (their KL stays 0); build the guide on a copy, "
                        "AutoLMGuide(model, prior_lm.trainable_copy())")
                self._checked.add(id(dist.lm))
            msg["fn"] = dist.with_lm(self.lm).expand(fn.batch_shape)
