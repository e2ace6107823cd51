"""Regular-expression rewards on decoded text."""

from __future__ import annotations

import re

import torch

from pyro_lm.distributions.prefix import is_complete
from pyro_lm.rewards.base import Reward, _special_ids, decode_counted

__all__ = ["Regex"]


class Regex(Reward):
    r"""A reward that depends on whether the decoded completion matches a pattern.

    .. math:: r(x) = \text{match if } \mathrm{re.search}(\text{pattern}, x)
              \text{ else no\_match}

    :param tokenizer: the LM's tokenizer (or a :class:`~pyro_lm.CausalLM`).
    :param str pattern: a Python regular expression, searched in the text.
    :param float match: reward when the pattern is found (``-inf`` forbids it).
    :param float no_match: reward otherwise (``-inf`` requires a match).
    :param bool monotone: the pattern, once found in a prefix, is found in every
        continuation (true for "contains a word" patterns). Then prefixes are
        scored as they stand; otherwise an incomplete prefix scores
        ``prefix_value``.
    :param float prefix_value: value for incomplete prefixes when not monotone.
    """

    def __init__(self, tokenizer, pattern: str, match: float = 1.0, no_match: float = 0.0,
                 monotone: bool = False, prefix_value: float = 0.0, flags: int = 0,
                 name: str | None = None):
        super().__init__(name or f"Regex({pattern!r})")
        try:
            self.pattern = re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"pattern: {pattern!r} is not a valid regular expression: {e}") from e
        for arg, value in (("match", match), ("no_match", no_match),
                           ("prefix_value", prefix_value)):
            if value != value:
                raise ValueError(f"{arg}: must not be NaN")
        self.tokenizer, self.eos, self.pad = _special_ids(tokenizer)
        self.match, self.no_match = float(match), float(no_match)
        self.monotone, self.prefix_value = monotone, float(prefix_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        texts = decode_counted(self.tokenizer, x, self.eos)
        found = torch.tensor([self.pattern.search(t) is not None for t in texts],
                             device=x.device)
        r = torch.where(found, torch.tensor(self.match, device=x.device),
                        torch.tensor(self.no_match, device=x.device))
        if not self.monotone:
            done = is_complete(x, self.eos)
            r = torch.where(done, r, torch.tensor(self.prefix_value, device=x.device))
        return r
