"""Decode LM sites and keep the log-probabilities computed while decoding."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger

from pyro_lm.distributions.lm_distribution import LMDistribution

__all__ = ["DecodeLMMessenger", "decoded_log_prob"]


class DecodeLMMessenger(Messenger):
    r"""Samples every unobserved plain :class:`~pyro_lm.LMDistribution` site with
    :meth:`~pyro_lm.LMDistribution.sample_with_log_prob` and keeps the decoding
    log-probability :math:`\log \pi(x)` in the site's ``infer["decoded_log_prob"]``
    (:func:`decoded_log_prob`), so that scoring the draw under the distribution it came
    from needs no second forward pass. Other sites are sampled as usual.

    >>> import pyro, pyro.poutine as poutine, torch
    >>> from pyro_lm import LMDistribution
    >>> from pyro_lm.lm import toy_lm
    >>> d = LMDistribution(toy_lm(vocab_size=4), "t1", 3)
    >>> site = poutine.trace(DecodeLMMessenger()(lambda: pyro.sample("x", d))).get_trace(
    ...     ).nodes["x"]
    >>> bool(torch.allclose(decoded_log_prob(site), d.log_prob(site["value"]), atol=1e-5))
    True
    """

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or type(msg["fn"]) is not \
                LMDistribution:
            return
        msg["value"], log_prob = msg["fn"].sample_with_log_prob()
        msg["done"] = True
        msg["infer"] = dict(msg["infer"], decoded_log_prob=log_prob)


def decoded_log_prob(site):
    """The decoding log-probability :class:`DecodeLMMessenger` kept for ``site``, or ``None``."""
    return site["infer"].get("decoded_log_prob")
