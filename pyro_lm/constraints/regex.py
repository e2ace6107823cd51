r"""A regular expression on the whole text of a completion."""

from __future__ import annotations

from pyro_lm.constraints.base import Constraint, import_llguidance

__all__ = ["Regex"]


class Regex(Constraint):
    r"""The completion's text matches ``pattern`` in full:
    :math:`c(x) = 0` if :math:`\text{text}(x) \in L(\text{pattern})`, else :math:`-\infty`
    (see :mod:`pyro_lm.constraints.base`).

    The pattern is in the syntax of Rust's ``regex`` crate (as llguidance reads it: like
    Python's ``re`` without look-around or back-references) and is anchored at both ends.

    >>> import pyro_lm  # doctest: +SKIP
    >>> lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"))
    >>> rating = pyro_lm.constraints.Regex(lm, r"Rating: [1-5]/5 — [a-z ,]+\.")

    :param lm: the :class:`~pyro_lm.CausalLM` whose tokenizer the completions use.
    :param str pattern: the regular expression.
    :param str name: used in errors (default ``"Regex(<pattern>)"``).
    :raises ValueError: naming ``pattern`` if it is not a regular expression llguidance reads.
    """

    def __init__(self, lm, pattern: str, name: str | None = None):
        if not isinstance(pattern, str):
            raise TypeError(f"pattern: expected a str, got {type(pattern).__name__}")
        self.pattern = pattern
        lark = f"start: /{import_llguidance().regex_to_lark(pattern)}/"
        super().__init__(lm, lark, name or f"Regex({pattern!r})", arg="pattern")
