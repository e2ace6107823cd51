"""Lexicon rewards: a weight per word, summed over the completion."""

from __future__ import annotations

import re

import torch

from pyro_lm.distributions.prefix import counted_mask
from pyro_lm.rewards.base import Reward, _special_ids, decode_counted

__all__ = ["Lexicon"]

_WORD = re.compile(r"\w+")


class Lexicon(Reward):
    r"""Sum of per-word weights over the completion's content (up to EOS):

    .. math:: r(x) = \sum_{w \in \mathrm{words}(x)} \mathrm{weight}(w).

    :param tokenizer: the LM's tokenizer (or a :class:`~pyro_lm.CausalLM`).
    :param dict weights: word → weight, e.g. ``{"awful": -1.0, "great": 1.0}``.
        Weights may be ``-inf`` (forbidden words).
    :param str mode: ``"tokens"`` (default) matches the token-id sequences of
        each word (with and without a leading space), batched on the device;
        ``"text"`` decodes and matches whole lower-cased words.
    :param str name: name used in errors.

    Works on prefixes: only generated positions count (see
    :mod:`pyro_lm.distributions.prefix`), so summing over a growing prefix
    gives potentials that telescope to the final reward.
    """

    def __init__(self, tokenizer, weights: dict, mode: str = "tokens", name: str | None = None):
        super().__init__(name)
        if not weights:
            raise ValueError("weights: the lexicon is empty; pass at least one word → weight")
        if mode not in ("tokens", "text"):
            raise ValueError(f"mode: expected 'tokens' or 'text', got {mode!r}")
        for word, w in weights.items():
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"weights: keys must be non-empty words, got {word!r}")
            if w != w:
                raise ValueError(f"weights[{word!r}] is NaN")
        self.tokenizer, self.eos, self.pad = _special_ids(tokenizer)
        self.mode = mode
        self.weights = {w.lower(): float(v) for w, v in weights.items()}
        self._patterns = self._token_patterns() if mode == "tokens" else None
        self._size = len(self.tokenizer)
        self._cache = {}

    def _token_patterns(self):
        patterns = {}
        for word, weight in self.weights.items():
            for variant in (word, " " + word):
                ids = tuple(self.tokenizer.encode(variant, add_special_tokens=False))
                if ids and self.tokenizer.decode(list(ids)).strip().lower() == word:
                    patterns[ids] = weight
        missing = sorted(set(self.weights) - {self.tokenizer.decode(list(p)).strip().lower()
                                              for p in patterns})
        if missing:
            raise ValueError(f"weights: words {missing} cannot be written with this tokenizer "
                             "(unknown words?); use mode='text' or check the spelling")
        return patterns

    def _tables(self, device):
        """``(unigram, longer)`` on ``device``: ``unigram`` holds one weight per token id of
        the tokenizer plus a last 0 for every id past it (models may pad their vocabulary
        past the tokenizer's); ``longer`` the multi-token patterns as id tensors."""
        if device not in self._cache:
            unigram = torch.zeros(self._size + 1, dtype=torch.float32, device=device)
            longer = []
            for ids, weight in self._patterns.items():
                if len(ids) == 1:
                    unigram[ids[0]] = weight
                else:
                    longer.append((torch.tensor(ids, device=device), weight))
            self._cache[device] = unigram, longer
        return self._cache[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "text":
            texts = decode_counted(self.tokenizer, x, self.eos)
            return torch.tensor([sum(self.weights.get(w, 0.0) for w in _WORD.findall(t.lower()))
                                 for t in texts], dtype=torch.float32, device=x.device)
        keep = counted_mask(x, self.eos)
        unigram, longer = self._tables(x.device)
        per_token = unigram[x.clamp(max=self._size)]
        # 0 * -inf is NaN: select rather than multiply
        total = torch.where(keep, per_token, 0.0).sum(-1)
        for ids, weight in longer:
            m = ids.numel()
            if x.shape[-1] < m:
                continue
            windows = x.unfold(-1, m, 1)  # (N, T-m+1, m)
            hit = (windows == ids).all(-1) & keep.unfold(-1, m, 1).all(-1)
            count = hit.sum(-1).float()
            total = total + torch.where(count > 0, count * weight, torch.zeros_like(count))
        return total
