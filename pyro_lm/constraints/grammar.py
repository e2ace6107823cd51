r"""A context-free grammar, in Lark's syntax, on the whole text of a completion."""

from __future__ import annotations

from pyro_lm.constraints.base import Constraint

__all__ = ["Grammar"]


class Grammar(Constraint):
    r"""The completion's text is a sentence of a context-free grammar:
    :math:`c(x) = 0` if :math:`\text{text}(x) \in L(G)`, else :math:`-\infty` (see
    :mod:`pyro_lm.constraints.base`).

    The grammar is written in Lark's syntax as llguidance reads it [1]: rules in lower
    case, terminals in upper case or as quoted strings and ``/regex/`` literals, the
    start rule ``start``; ``%ignore`` is honoured.

    >>> g = pyro_lm.constraints.Grammar(lm, '''  # doctest: +SKIP
    ... start: "Rating: " DIGIT "/5"
    ... DIGIT: /[1-5]/
    ... ''')

    :param lm: the :class:`~pyro_lm.CausalLM` whose tokenizer the completions use.
    :param str lark_text: the grammar.
    :param str name: used in errors (default ``"Grammar"``).
    :raises ValueError: naming ``lark_text`` if llguidance refuses the grammar.

    References:

    [1] llguidance grammar syntax,
    https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md
    """

    def __init__(self, lm, lark_text: str, name: str | None = None):
        if not isinstance(lark_text, str):
            raise TypeError(f"lark_text: expected a str, got {type(lark_text).__name__}")
        self.lark_text = lark_text
        super().__init__(lm, lark_text, name or "Grammar", arg="lark_text")
