"""Inference: guides, losses and samplers that target the posterior
:math:`p^*(x) \\propto p_0(x) \\exp(r(x)/\\beta)`."""

from pyro_lm.infer.autoguide import AutoLMGuide, trace_lm_sites
from pyro_lm.infer.posterior import WeightedPosterior, check_log_weights

__all__ = ["AutoLMGuide", "trace_lm_sites", "WeightedPosterior", "check_log_weights"]
