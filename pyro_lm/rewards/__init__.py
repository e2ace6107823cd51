"""Rewards: callables ``x -> (*batch,)`` that enter a model as ``pyro.factor(..., r(x) / beta)``."""

from pyro_lm.rewards.base import Callable, Reward
from pyro_lm.rewards.bayesian import BayesianClassifier
from pyro_lm.rewards.classifier import Classifier
from pyro_lm.rewards.lexicon import Lexicon
from pyro_lm.rewards.regex import Regex

__all__ = ["Reward", "Callable", "Lexicon", "Regex", "Classifier", "BayesianClassifier"]
