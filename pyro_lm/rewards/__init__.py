"""Rewards: callables ``x -> (*batch,)`` that enter a model as ``pyro.factor(..., r(x) / beta)``.

What a reward may return on a prefix (inside
:func:`~pyro_lm.distributions.prefix_context`) is set out in :mod:`pyro_lm.rewards.base`;
:func:`check_prefix_contract` tests a reward against it. A reward may also update its
prefix value token by token (:mod:`pyro_lm.rewards.incremental`).
"""

from pyro_lm.rewards.base import Callable, Reward
from pyro_lm.rewards.bayesian import BayesianClassifier
from pyro_lm.rewards.classifier import Classifier
from pyro_lm.rewards.counts import TokenCounts
from pyro_lm.rewards.incremental import RewardStates
from pyro_lm.rewards.lexicon import Lexicon
from pyro_lm.rewards.regex import Regex
from pyro_lm.rewards.testing import PrefixContractError, check_prefix_contract

__all__ = ["Reward", "Callable", "Lexicon", "Regex", "TokenCounts", "Classifier",
           "BayesianClassifier", "RewardStates", "check_prefix_contract", "PrefixContractError"]
