r"""Regular-expression rewards on the decoded text."""

from __future__ import annotations

import math
import re

import torch

from pyro_lm.distributions.prefix import is_complete
from pyro_lm.rewards.base import Reward, special_ids
from pyro_lm.rewards.words import TokenText, decode_rows, settled_text

__all__ = ["Regex"]


class Regex(Reward):
    r"""A reward that depends on whether the decoded completion matches a pattern:

    .. math:: r(x) = \begin{cases} \text{match} & \text{if re.search(pattern, text}(x))
              \\ \text{no\_match} & \text{otherwise.} \end{cases}

    **Prefixes.** Inside :func:`~pyro_lm.distributions.prefix_context` an incomplete
    prefix usually cannot be decided yet, and scores ``prefix_value`` (finite: a required
    pattern is not required of a prefix, so ``no_match=-inf`` is safe). With
    ``monotone=True`` the caller promises that a match found in the *settled text* of a
    prefix is found in every completion of it, and such a prefix scores ``match`` at
    once (so ``match=-inf`` prunes it, which is what :mod:`pyro_lm.rewards.base` allows:
    no completion can avoid the match). The settled text is the decoded prefix without
    what the next tokens may still change: a trailing character cut in the middle
    (U+FFFD), and a trailing run of word characters unless the tokenizer cannot continue
    a word (word-level tokenizers). So ``r"\bidiot\b"`` is monotone with any tokenizer:
    on " idiot", a prefix of " idiotic", it does not fire yet. Patterns that look at the
    end of the text (``$``, ``\Z``) or far ahead are not monotone; leave them
    ``monotone=False``.

    Its incremental form (:mod:`pyro_lm.rewards.incremental`) keeps a decided row's value
    and reads an undecided one only where it can be decided (complete, or ``monotone``),
    so SMC decodes no incomplete prefix of a pattern that is not monotone.

    :param tokenizer: the LM's tokenizer (or a :class:`~pyro_lm.CausalLM`).
    :param str pattern: a Python regular expression, searched in the text.
    :param float match: reward when the pattern is found (``-inf`` forbids it).
    :param float no_match: reward otherwise (``-inf`` requires a match).
    :param bool monotone: a match in the settled text of a prefix is a match in every
        completion of it (true of "contains this word" patterns).
    :param float prefix_value: the (finite) value of an incomplete prefix whose outcome
        is not known yet.
    :param int flags: ``re`` flags.
    :param str name: name used in errors.
    """

    def __init__(self, tokenizer, pattern: str, match: float = 1.0, no_match: float = 0.0,
                 monotone: bool = False, prefix_value: float = 0.0, flags: int = 0,
                 name: str | None = None):
        super().__init__(name or f"Regex({pattern!r})")
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError(f"pattern: expected a regular expression (a str), got "
                            f"{type(pattern).__name__}")
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise TypeError(f"flags: expected re flags (an int such as re.IGNORECASE), got "
                            f"{flags!r}")
        try:
            self.pattern = re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"pattern: {pattern!r} is not a valid regular expression: {e}") from e
        values = {}
        for arg, value in (("match", match), ("no_match", no_match),
                           ("prefix_value", prefix_value)):
            try:
                value = values[arg] = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{arg}: expected a number, got {type(value).__name__}") from None
            if value != value or value == math.inf:
                raise ValueError(f"{arg}: must be a real number or -inf, got {value}")
        if math.isinf(values["prefix_value"]):
            raise ValueError("prefix_value: must be finite: -inf on every undecided prefix would "
                             "drop completions that are allowed (use monotone=True with "
                             "match=-inf to prune prefixes that already match)")
        self.tokenizer, self.eos, self.pad = special_ids(tokenizer)
        self.match, self.no_match = values["match"], values["no_match"]
        self.monotone, self.prefix_value = bool(monotone), values["prefix_value"]
        self._table, self._can_extend = None, True
        if self.monotone:
            try:
                table = TokenText(self.tokenizer, check=False)
            except ValueError:  # no table: assume that every word may grow
                table = None
            if table is not None and table.mismatch is None:
                self._table, self._can_extend = table, table.can_extend

    # -- the incremental form: decided rows keep their value -----------------------------

    def initial_state(self, rows: int, device) -> dict:
        """Per row: whether its value is decided (a complete row; with ``monotone``, a
        match in the settled text), and that value."""
        return {"decided": torch.zeros(rows, dtype=torch.bool, device=device),
                "value": torch.zeros(rows, device=device)}

    def advance(self, state: dict, token: torch.Tensor, t: int) -> dict:
        return state  # what a token changes is read in state_value, on undecided rows only

    def state_value(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        """Decided rows keep their value; an undecided row is read (decoded and searched)
        only where it can be decided: it is complete, or ``monotone``. Otherwise it scores
        ``prefix_value`` without being decoded."""
        decided, value = state["decided"], state["value"]
        read = ~decided & (is_complete(x, self.eos) | self.monotone)
        rows = read.nonzero().squeeze(-1)
        if rows.numel():
            found, done = self._read(x.index_select(0, rows))
            fresh = self._value(found, done)
            now = done | found  # read only if complete or monotone: a match stays one
            value = value.index_put((rows,), fresh)
            decided = decided.index_put((rows,), now)
            state["value"], state["decided"] = value, decided
        return torch.where(decided, value, self.prefix_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._value(*self._read(x))

    def _read(self, x: torch.Tensor):
        """``(found, done)``, bool ``(N,)``: a match in the (settled) text, complete rows."""
        texts, complete = decode_rows(self.tokenizer, x, self.eos, self._table)
        found = torch.tensor([self.pattern.search(settled_text(t, d, self._can_extend))
                              is not None for t, d in zip(texts, complete, strict=True)],
                             dtype=torch.bool, device=x.device)
        return found, torch.tensor(complete, dtype=torch.bool, device=x.device)

    def _value(self, found: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        value = torch.where(found, self.match, self.no_match)
        if self.monotone:
            undecided = torch.where(found, self.match, self.prefix_value)
        else:
            undecided = torch.full_like(value, self.prefix_value)
        return torch.where(done, value, undecided)
