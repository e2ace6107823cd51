r"""Token counts: a weight per token id, summed over the completion's content tokens."""

from __future__ import annotations

import math

import torch

from pyro_lm.distributions.prefix import counted_mask, is_eos
from pyro_lm.rewards.base import Reward, special_ids

__all__ = ["TokenCounts"]


class TokenCounts(Reward):
    r"""A weight per token, summed over the content tokens of the completion:

    .. math:: r(x) = \sum_{t \le |x|} \mathrm{weight}(x_t),

    where :math:`|x|` counts the tokens before the first EOS. On a prefix it is the sum
    over the prefix's tokens, which every completion of the prefix extends: a ``-inf``
    weight forbids a token and prunes exactly the prefixes that hold it
    (:mod:`pyro_lm.rewards.base`). It has an incremental form (one gather per token;
    :mod:`pyro_lm.rewards.incremental`).

    >>> import torch
    >>> from pyro_lm.lm import toy_lm
    >>> lm = toy_lm(vocab_size=4)
    >>> TokenCounts(lm, {2: 1.0, 3: -0.5})(torch.tensor([[2, 3, 2], [3, 0, 2]])).tolist()
    [1.5, -0.5]

    :param tokenizer: the LM's tokenizer (or a :class:`~pyro_lm.CausalLM`, which also
        brings all its EOS ids).
    :param dict weights: token id (int) or token string (one token of the tokenizer,
        e.g. ``"Ġgood"``) → weight, a real number or ``-inf``.
    :param str name: used in errors.
    """

    def __init__(self, tokenizer, weights: dict, name: str | None = None):
        super().__init__(name)
        self.tokenizer, self.eos, self.pad = special_ids(tokenizer)
        if not isinstance(weights, dict) or not weights:
            raise ValueError("weights: expected a non-empty dict token → weight")
        size = len(self.tokenizer)
        table = torch.zeros(size + 1)  # the last entry: ids outside the tokenizer
        for key, w in weights.items():
            ids = key if isinstance(key, int) and not isinstance(key, bool) else \
                self.tokenizer.convert_tokens_to_ids(key) if isinstance(key, str) else None
            if not isinstance(ids, int) or not 0 <= ids < size or (
                    isinstance(key, str) and self.tokenizer.convert_ids_to_tokens(ids) != key):
                raise ValueError(f"weights: key {key!r} is not a token of the tokenizer (an id "
                                 f"in [0, {size}) or a token string such as "
                                 f"{self.tokenizer.convert_ids_to_tokens(min(1, size - 1))!r})")
            try:
                w = float(w)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"weights[{key!r}]: expected a number, got "
                                f"{type(w).__name__}") from None
            if w != w or w == math.inf:
                raise ValueError(f"weights[{key!r}]: expected a real number or -inf, got {w}")
            table[ids] = w
        self._host, self._tables = table, {}

    def _table(self, device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self._host.to(device)
        return self._tables[device]

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        table = self._table(x.device)
        return table[torch.where((x >= 0) & (x < table.numel() - 1), x, table.numel() - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # select rather than multiply: 0 * -inf is NaN
        return torch.where(counted_mask(x, self.eos), self._weights(x), 0.0).sum(-1)

    def initial_state(self, rows: int, device) -> dict:
        return {"total": torch.zeros(rows, device=device),
                "ended": torch.zeros(rows, dtype=torch.bool, device=device)}

    def advance(self, state: dict, token: torch.Tensor, t: int) -> dict:
        counted = ~state["ended"] & ~is_eos(token, self.eos)
        state["total"] = state["total"] + torch.where(counted, self._weights(token), 0.0)
        state["ended"] = ~counted
        return state

    def state_value(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        return state["total"]

    def __repr__(self) -> str:
        return f"TokenCounts(name={self.name!r}, {int((self._host != 0).sum())} tokens)"
