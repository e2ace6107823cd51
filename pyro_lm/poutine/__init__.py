"""Effect handlers for programs with LM sites, one idea each (Pyro's ``poutine`` style).

* :class:`SkipLMMessenger` (:func:`skip_lm`): LM sites get a placeholder, nothing is
  decoded (read a program's plates cheaply).
* :class:`DecodeLMMessenger` (:func:`decode_lm`): LM sites are decoded and keep their
  decoding log-probability.
* :class:`GuideLMMessenger` (:func:`guide_lm`): the program run as its own guide, its LM
  sites drawn from another LM with the prompts of that very execution.
* :class:`LogFactorsMessenger`: the program's log-factors with its LM site held at a value.
"""

from pyro_lm.poutine.decode_lm_messenger import DecodeLMMessenger, decoded_log_prob
from pyro_lm.poutine.guide_lm_messenger import GuideLMMessenger, subsample_scale
from pyro_lm.poutine.log_factors_messenger import LogFactorsMessenger
from pyro_lm.poutine.skip_lm_messenger import SkipLMMessenger, is_lm_placeholder


def skip_lm(fn=None):
    """:class:`SkipLMMessenger` as a handler: ``skip_lm(model)`` or ``with skip_lm():``."""
    return SkipLMMessenger()(fn) if fn is not None else SkipLMMessenger()


def decode_lm(fn=None):
    """:class:`DecodeLMMessenger` as a handler."""
    return DecodeLMMessenger()(fn) if fn is not None else DecodeLMMessenger()


def guide_lm(fn, lm, trace=None):
    """``fn`` run as its own guide with LM sites from ``lm`` (:class:`GuideLMMessenger`)."""
    return GuideLMMessenger(lm, trace)(fn)


__all__ = ["SkipLMMessenger", "DecodeLMMessenger", "GuideLMMessenger", "LogFactorsMessenger",
           "skip_lm", "decode_lm", "guide_lm", "decoded_log_prob", "is_lm_placeholder",
           "subsample_scale"]
