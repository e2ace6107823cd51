"""Distributions over token sequences."""

from pyro_lm.distributions.lm_distribution import LMDistribution, SequenceConstraint
from pyro_lm.distributions.prefix import (
                                          counted_mask,
                                          generated_mask,
                                          is_complete,
                                          prefix_context,
                                          prefix_length,
)

__all__ = ["LMDistribution", "SequenceConstraint", "prefix_context", "prefix_length",
           "generated_mask", "counted_mask", "is_complete"]
