r"""Exact structural constraints on LM completions (regular expressions, Lark grammars,
JSON schemas), through llguidance.

A constraint is a 0 / ``-inf`` log-factor on a completion's text, exact on prefixes
(``pyro.factor("valid", c(x))``), a proposal mask for the samplers with the exact
weight correction (``SMC(model, ..., constraints={"x": c})``,
``Importance(model, ..., constraints={"x": c})``), and a masked law for guides
(:class:`MaskedLMDistribution`, ``AutoLMGuide(model, lm, constraints={"x": c})``).
See :mod:`pyro_lm.constraints.base`.
"""

from pyro_lm.constraints.base import Constraint, ConstraintState, llguidance_tokenizer
from pyro_lm.constraints.grammar import Grammar
from pyro_lm.constraints.json_schema import JSONSchema
from pyro_lm.constraints.masked import MaskedLMDistribution
from pyro_lm.constraints.messenger import MaskLMMessenger
from pyro_lm.constraints.regex import Regex

__all__ = ["Constraint", "ConstraintState", "Grammar", "JSONSchema", "MaskLMMessenger",
           "MaskedLMDistribution", "Regex", "llguidance_tokenizer"]
