"""Run a program without decoding its LM sites."""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger

from pyro_lm.distributions.lm_distribution import unwrap_lm

__all__ = ["SkipLMMessenger", "is_lm_placeholder"]


class SkipLMMessenger(Messenger):
    """Gives every unobserved LM site a placeholder value (all ``pad_token_id``) instead
    of decoding it, so that a program's plates can be read cheaply.

    The placeholder is no draw from anything: read a program's *structure* (plates,
    names) from such a run, never its prompts or factors. Sites it filled are marked
    (:func:`is_lm_placeholder`).

    >>> import pyro, pyro.poutine as poutine, torch
    >>> from pyro_lm import LMDistribution
    >>> from pyro_lm.lm import toy_lm
    >>> lm = toy_lm(vocab_size=4)
    >>> def model():
    ...     with pyro.plate("prompts", 2):
    ...         pyro.sample("x", LMDistribution(lm, ["t1", "t2"], 3))
    >>> trace = poutine.trace(SkipLMMessenger()(model)).get_trace()
    >>> trace.nodes["x"]["value"].tolist(), is_lm_placeholder(trace.nodes["x"])
    ([[0, 0, 0], [0, 0, 0]], True)
    """

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        dist = unwrap_lm(msg["fn"])
        if dist is None:
            return
        shape = tuple(msg["fn"].batch_shape) + tuple(dist.event_shape)
        msg["value"] = torch.full(shape, dist.lm.pad_token_id, dtype=torch.long,
                                  device=dist.prompt_ids.device)
        msg["done"] = True
        msg["infer"] = dict(msg["infer"], lm_placeholder=True)


def is_lm_placeholder(site) -> bool:
    """Whether ``site`` is an LM site that :class:`SkipLMMessenger` filled."""
    return site["type"] == "sample" and bool(site["infer"].get("lm_placeholder"))
