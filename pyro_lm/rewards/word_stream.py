r"""Words read token by token: the incremental form of :class:`~pyro_lm.rewards.Lexicon`.

The batched reader of :mod:`pyro_lm.rewards.words` decodes a whole prefix per call. This
module reads the same words one token at a time, from a per-row state on the device:

- the weights of the phrases settled so far (``total``),
- the last :math:`n_{\max} - 1` settled words' ids (``history``; phrases of up to
  :math:`n_{\max}` words end at the word being settled),
- the word that may still grow (``pending``): its two polynomial hashes :math:`h_k` and
  :math:`b_k^{\ell}` for its (case-folded) length :math:`\ell`, so that appending a run
  :math:`u` of word characters gives :math:`h_k \leftarrow h_k + b_k^{\ell} h_k(u)
  \bmod p_k` (the hash of :mod:`pyro_lm.rewards.lexicon`, which is additive this way).

Each token's text is classified once per tokenizer: no text (special tokens), only word
characters (it *extends* the pending word), or a leading run of word characters, other
characters with at most one whole word among them, and a trailing run (it *settles* the
pending word extended by the leading run, then the inner word, and the trailing run
becomes the pending word). Tokens whose text is not valid UTF-8 on its own, byte-fallback
pieces, U+FFFD and tokens with several inner words make their row *slow*: from there on
the row is scored by the batched reader (:meth:`~pyro_lm.rewards.Lexicon.forward`), which
is exact for them. On a complete row the pending word counts too. (For tokenizers whose
tokens cannot continue a word, word-level ones, the batched reader is a table lookup per
token already, and the Lexicon has no stream.)
"""

from __future__ import annotations

import torch

from pyro_lm.distributions.prefix import is_eos
from pyro_lm.rewards.words import WORD

__all__ = ["WordStream"]

_NOOP, _EXTEND, _SETTLE, _SLOW = 0, 1, 2, 3


class WordStream:
    """Per-token word tables of a tokenizer and the token-by-token reader over them.

    :param text: the tokenizer's :class:`~pyro_lm.rewards.words.TokenText` (its table
        must match the tokenizer's decoding).
    :param fold: ``str -> str`` applied to each character before hashing (case folding,
        or the identity).
    :param word_hash: ``list[int] -> (h0, h1)``, the two hashes of code points.
    :param primes: the two moduli; ``bases`` the two bases.
    :param dict index: folded word → its id (``1..``), for the inner words of tokens.
    :param int history: how many settled words' ids a phrase needs (:math:`n_{\\max}-1`).
    """

    def __init__(self, text, fold, word_hash, primes, bases, index, history):
        self.size, self.primes = text.size, primes
        self.history = history
        rows = text.size + 1  # the last row: ids outside the tokenizer (no text)
        kind = torch.full((rows,), _NOOP, dtype=torch.int64)
        # per run (lead, trail): hashes (2), powers b^len (2), non-empty (1)
        lead = torch.zeros((rows, 5), dtype=torch.int64)
        trail = torch.zeros((rows, 5), dtype=torch.int64)
        lead[:, 2:4] = 1
        trail[:, 2:4] = 1
        inner = torch.full((rows,), -1, dtype=torch.int64)

        def run(chars):
            cps = [ord(c) for ch in chars for c in fold(ch)]
            h = word_hash(cps)
            return [h[0], h[1], pow(bases[0], len(cps), primes[0]),
                    pow(bases[1], len(cps), primes[1]), 1 if cps else 0]

        for v, (piece, fallback) in enumerate(zip(text.token_bytes, text.fallback,
                                                  strict=True)):
            if not piece:
                continue
            try:
                s = piece.decode("utf-8")
            except UnicodeDecodeError:
                s = None
            if fallback or s is None or "\ufffd" in s:
                kind[v] = _SLOW
                continue
            words = [(m.start(), m.end()) for m in WORD.finditer(s)]
            if len(words) == 1 and words[0] == (0, len(s)):
                kind[v] = _EXTEND
                lead[v] = torch.tensor(run(s))
                continue
            head = words[0] if words and words[0][0] == 0 else None
            tail = words[-1] if words and words[-1][1] == len(s) and words[-1] != head \
                else None
            middle = [w for w in words if w != head and w != tail]
            if len(middle) > 1:
                kind[v] = _SLOW
                continue
            kind[v] = _SETTLE
            if head is not None:
                lead[v] = torch.tensor(run(s[head[0]:head[1]]))
            if tail is not None:
                trail[v] = torch.tensor(run(s[tail[0]:tail[1]]))
            if middle:
                word = "".join(fold(c) for c in s[middle[0][0]:middle[0][1]])
                inner[v] = index.get(word, 0)
        self._host = (kind, lead, trail, inner)
        self._cache = {}

    def _tables(self, device):
        if device not in self._cache:
            self._cache[device] = tuple(t.to(device) for t in self._host)
        return self._cache[device]

    def initial(self, rows: int, device) -> dict:
        """The state of ``rows`` empty prefixes."""
        def zeros(dtype, *shape):
            return torch.zeros((rows,) + shape, dtype=dtype, device=device)
        pending = zeros(torch.int64, 5)
        pending[:, 2:4] = 1
        return {"total": zeros(torch.float32), "pending": pending,
                "history": torch.full((rows, self.history), -1, dtype=torch.int64,
                                      device=device),
                "ended": zeros(torch.bool), "slow": zeros(torch.bool)}

    def advance(self, state: dict, token: torch.Tensor, eos, scorer) -> dict:
        """Read ``token`` ``(R,)`` (an EOS id or a sequence of them: ``eos``).

        :param scorer: ``scorer.word_id(pending) -> (R,)`` (the id of a pending word,
            ``pending`` ``(R, 5)``: 0 outside the lexicon) and ``scorer.weight(history,
            word) -> (R,)`` (the weights of the phrases that end with ``word`` after
            ``history``)."""
        kind_t, lead_t, trail_t, inner_t = self._tables(token.device)
        ended, slow, pending = state["ended"], state["slow"], state["pending"]
        counted = ~ended & ~is_eos(token, eos)
        state["ended"] = ended | ~counted
        v = torch.where(counted & (token >= 0) & (token < self.size), token, self.size)
        kind = kind_t[v]
        slow = slow | (counted & (kind == _SLOW))
        state["slow"] = slow
        live = counted & ~slow & (kind != _NOOP)
        p = torch.tensor(self.primes, dtype=torch.int64, device=token.device)
        lead = lead_t[v]
        grown = torch.cat([(pending[:, :2] + lead[:, :2] * pending[:, 2:4]) % p,
                           pending[:, 2:4] * lead[:, 2:4] % p,
                           pending[:, 4:] | lead[:, 4:]], -1)
        pending = torch.where(live[:, None], grown, pending)
        settle = live & (kind == _SETTLE)
        total, history = state["total"], state["history"]
        total, history = self._settle(total, history, settle & (pending[:, 4] > 0),
                                      scorer, scorer.word_id(pending))
        inner = inner_t[v]
        total, history = self._settle(total, history, settle & (inner >= 0), scorer,
                                      inner.clamp(min=0))
        pending = torch.where(settle[:, None], trail_t[v], pending)
        state["pending"], state["total"], state["history"] = pending, total, history
        return state

    def value(self, state: dict, complete: torch.Tensor, scorer) -> torch.Tensor:
        """``(R,)``: the settled phrases' weights, and on ``complete`` rows the pending
        word's too (slow rows are the caller's)."""
        pending = state["pending"]
        last = complete & (pending[:, 4] > 0)
        weight = scorer.weight(state["history"], scorer.word_id(pending))
        return state["total"] + torch.where(last, weight, 0.0)

    def _settle(self, total, history, where, scorer, word):
        # select rather than multiply: 0 * -inf is NaN
        total = total + torch.where(where, scorer.weight(history, word), 0.0)
        if self.history:
            shifted = torch.cat([history[:, 1:], word[:, None]], -1)
            history = torch.where(where[:, None], shifted, history)
        return total, history
