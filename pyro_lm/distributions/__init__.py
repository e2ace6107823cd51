"""Distributions over token sequences."""

from pyro_lm.distributions.lm_distribution import LMDistribution, SequenceConstraint, unwrap_lm
from pyro_lm.distributions.prefix import (
                                          counted_mask,
                                          generated_mask,
                                          is_complete,
                                          prefix_context,
                                          prefix_length,
)

__all__ = ["LMDistribution", "SequenceConstraint", "unwrap_lm", "prefix_context", "prefix_length",
           "generated_mask", "counted_mask", "is_complete"]
