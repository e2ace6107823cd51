"""Inference: guides, losses and samplers that target the posterior
:math:`p^*(x) \\propto p_0(x) \\exp(r(x)/\\beta)`."""

from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.dpg import DPG
from pyro_lm.infer.elbo import SequenceELBO
from pyro_lm.infer.fit import fit
from pyro_lm.infer.imh import IMH
from pyro_lm.infer.importance import Importance
from pyro_lm.infer.moments import MomentConstraint, MomentFit, fit_moments
from pyro_lm.infer.posterior import WeightedPosterior, check_log_weights
from pyro_lm.infer.prefix_elbo import PrefixSequenceELBO
from pyro_lm.infer.qrs import QRS, pick_log_bound
from pyro_lm.infer.replay import ReplayBuffer
from pyro_lm.infer.smc import SMC
from pyro_lm.infer.subtrajectory_balance import SubTrajectoryBalance
from pyro_lm.infer.trajectory_balance import LogPartition, TrajectoryBalance
from pyro_lm.infer.twist import TwistFit, ValueTwist, fit_twist

__all__ = ["AutoLMGuide", "WeightedPosterior", "check_log_weights",
           "SequenceELBO", "PrefixSequenceELBO", "fit", "DPG", "QRS", "pick_log_bound", "IMH",
           "MomentConstraint", "MomentFit", "fit_moments", "Importance", "SMC",
           "ValueTwist", "TwistFit", "fit_twist", "TrajectoryBalance", "LogPartition",
           "ReplayBuffer", "SubTrajectoryBalance"]
