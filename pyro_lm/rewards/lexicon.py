r"""Lexicon rewards: a weight per word or phrase, summed over the decoded completion."""

from __future__ import annotations

import functools
import math

import torch

from pyro_lm.distributions.prefix import counted_mask, is_complete
from pyro_lm.rewards.base import Reward, special_ids
from pyro_lm.rewards.word_stream import WordStream
from pyro_lm.rewards.words import (
    OTHER_CHAR,
    WORD,
    WORD_CHAR,
    TokenText,
    compact,
    decode_rows,
    settled_words,
)

__all__ = ["Lexicon"]

# two polynomial hashes of a word's (case-folded) code points, modulo two primes < 2**31
_PRIMES = (2147483647, 2147483629)
_BASES = (911382323, 972663749)
_NUM_CODE_POINTS = 0x110000


def _hash(code_points, which: int) -> int:
    p, b = _PRIMES[which], _BASES[which]
    return sum(c * pow(b, k, p) for k, c in enumerate(code_points)) % p


def _word_key(word: str) -> int:
    """The key the batched reader computes for ``word`` (already case-folded if need be)."""
    cps = [ord(c) for c in word]
    return _hash(cps, 0) * _PRIMES[1] + _hash(cps, 1)


@functools.cache
def _casefold_table() -> torch.Tensor:
    """``(3, 0x110000)`` int64: for each code point, the two hashes of its case folding
    and its length (``"ß"`` folds to ``"ss"``)."""
    table = torch.arange(_NUM_CODE_POINTS, dtype=torch.int64).repeat(3, 1)
    table[2] = 1
    changed = [(c, f) for c in range(_NUM_CODE_POINTS) if (f := chr(c).casefold()) != chr(c)]
    index = torch.tensor([c for c, _ in changed])
    for row, value in enumerate((lambda f: _hash(map(ord, f), 0), lambda f: _hash(map(ord, f), 1),
                                 len)):
        table[row, index] = torch.tensor([value(f) for _, f in changed])
    return table


@functools.cache
def _powers(n: int, device: torch.device) -> torch.Tensor:
    """``(2, n)`` int64 on ``device``: ``base ** k mod p`` for both hashes, ``k < n``."""
    out = []
    for p, b in zip(_PRIMES, _BASES, strict=True):
        row, v = [], 1
        for _ in range(n):
            row.append(v)
            v = v * b % p
        out.append(row)
    return torch.tensor(out, dtype=torch.int64, device=device)


class Lexicon(Reward):
    r"""Sum of per-word (and per-phrase) weights over the words of the decoded completion:

    .. math:: r(x) = \sum_{i} \sum_{n} \mathrm{weight}(w_i w_{i+1} \cdots w_{i+n-1}),

    where :math:`w_1, w_2, \ldots` are the words of the completion's text (its content
    tokens, up to the first EOS, decoded), a word being a maximal run of word characters
    as ``re.findall(r"\w+", text)`` finds them: "sturdy." holds the word "sturdy",
    "greatest" does not hold "great", "this" does not hold "is". A key of several words
    ("one star") weighs each run of those words in the text, whatever non-word
    characters separate them. Matching ignores case unless ``case_sensitive``
    (``str.casefold``: "Great" counts as "great").

    **Prefixes.** Inside :func:`~pyro_lm.distributions.prefix_context` a word counts only
    once it is settled: a later character of the text shows that it ended, the completion
    is complete, or no token of the tokenizer can continue a word. So on the prefix
    " the" of " they", a forbidden word "the" does not fire yet, and a ``-inf`` weight
    marks exactly the prefixes that no completion can redeem, as
    :mod:`pyro_lm.rewards.base` requires; the settled sums grow with the prefix and end
    at the reward of the completion.

    In ``mode="tokens"``, with a subword tokenizer, it has an incremental form
    (:mod:`pyro_lm.rewards.incremental`): inside SMC it reads each new token's words from a
    per-row state (:mod:`pyro_lm.rewards.word_stream`) instead of decoding the prefix
    again. (With a word-level tokenizer every prefix is read by a table lookup per token.)

    :param tokenizer: the LM's tokenizer (or a :class:`~pyro_lm.CausalLM`, which also
        brings all its EOS ids).
    :param dict weights: key → weight, e.g. ``{"awful": -1.0, "great": 1.0,
        "one star": -2.0}``. A key is a word or a phrase of words; weights are real
        numbers or ``-inf`` (forbidden words).
    :param str mode: ``"tokens"`` (default) reads the text from the token ids on the
        device, batched: a table of every token's bytes, decoded as UTF-8 and split into
        words by a table of word characters, words matched by hashing; ``"text"``
        decodes each row with the tokenizer and splits it in Python. Both give the same
        value, also for non-canonical tokenizations (a word spelled by other tokens
        counts as the text shows it).
    :param bool case_sensitive: match keys with their case (default: ignore case).
    :param str name: name used in errors.
    """

    def __init__(self, tokenizer, weights: dict, mode: str = "tokens",
                 case_sensitive: bool = False, name: str | None = None):
        super().__init__(name)
        if not isinstance(weights, dict) or not weights:
            raise ValueError("weights: the lexicon is empty; pass a dict of at least one "
                             "word → weight")
        if mode not in ("tokens", "text"):
            raise ValueError(f"mode: expected 'tokens' or 'text', got {mode!r}")
        self.tokenizer, self.eos, self.pad = special_ids(tokenizer)
        self.mode, self.case_sensitive = mode, bool(case_sensitive)
        self.phrases = self._phrases(weights)
        #: the normalised lexicon: each key's words joined by one space → weight
        self.weights = {" ".join(words): w for words, w in self.phrases.items()}
        try:
            self._text = TokenText(self.tokenizer, check=mode == "tokens")
        except ValueError as e:
            if mode == "tokens":
                raise ValueError(f"mode='tokens': {e}; use mode='text'") from None
            self._text = None
        self._exact_text = self._text if self._text and self._text.mismatch is None else None
        # on a prefix, may the last word still grow? (not with word-level tokenizers)
        self._can_extend = self._exact_text is None or self._exact_text.can_extend
        self._check_writable()
        self._cache = {}
        self._streams = {}

    def _fold(self, word: str) -> str:
        return word if self.case_sensitive else word.casefold()

    def _phrases(self, weights) -> dict:
        phrases, original = {}, {}
        for key, w in weights.items():
            words = tuple(self._fold(v) for v in WORD.findall(key)) if isinstance(key, str) \
                else ()
            if not words:
                raise ValueError(f"weights: keys must be words or phrases of words, got {key!r}")
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise TypeError(f"weights[{key!r}]: expected a number, got "
                                f"{type(w).__name__}") from None
            if w != w:
                raise ValueError(f"weights[{key!r}] is NaN")
            if w == math.inf:
                raise ValueError(f"weights[{key!r}] is +inf; a weight is a real number or "
                                 "-inf (a forbidden word)")
            if words in phrases:
                how = "" if self.case_sensitive else " ignoring case (case_sensitive=False)"
                raise ValueError(f"weights: keys {original[words]!r} and {key!r} are the same "
                                 f"words{how}; merge their weights")
            phrases[words], original[words] = w, key
        return phrases

    def _check_writable(self):
        """Refuse keys that no text of this tokenizer contains (out-of-vocabulary words
        of word-level tokenizers), which would be silently dead."""
        tok = self.tokenizer
        missing = []
        for words in self.phrases:
            text = " ".join(words)
            for candidate in dict.fromkeys((text, text.lower(), text.capitalize(),
                                            text.upper())):
                found = []
                for c in (candidate, " " + candidate):
                    ids = tok.encode(c, add_special_tokens=False)
                    found.append(tuple(self._fold(v) for v in WORD.findall(
                        tok.decode(ids, skip_special_tokens=True))))
                if words in found:
                    break
            else:
                missing.append(text)
        if missing:
            raise ValueError(f"weights: words {sorted(missing)} cannot be written with this "
                             "tokenizer (unknown words?); check the spelling")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "text":
            return self._forward_text(x)
        return self._forward_tokens(x)

    # -- text mode ------------------------------------------------------------------------

    def _forward_text(self, x):
        texts, complete = decode_rows(self.tokenizer, x, self.eos, self._exact_text)
        lengths = sorted({len(p) for p in self.phrases})
        out = []
        for text, done in zip(texts, complete, strict=True):
            words = [self._fold(w) for w in settled_words(text, done, self._can_extend)]
            total = 0.0
            for n in lengths:
                for i in range(len(words) - n + 1):
                    total += self.phrases.get(tuple(words[i:i + n]), 0.0)
            out.append(total)
        return torch.tensor(out, dtype=torch.float32, device=x.device)

    # -- token mode -----------------------------------------------------------------------

    def _tables(self, device):
        """Per device: the sorted keys of the lexicon's words, and per phrase length ``n``
        the sorted codes of its phrases (word ids in base ``len(words) + 1``) and weights."""
        if device not in self._cache:
            vocab = sorted({w for words in self.phrases for w in words}, key=_word_key)
            keys = torch.tensor([_word_key(w) for w in vocab], dtype=torch.int64)
            index = {w: i + 1 for i, w in enumerate(vocab)}
            base = len(vocab) + 1
            by_length = {}
            for words, w in self.phrases.items():
                code = 0
                for v in words:
                    code = code * base + index[v]
                by_length.setdefault(len(words), []).append((code, w))
            longest = max(by_length)
            if base ** longest >= 2 ** 62:
                raise ValueError(f"weights: phrases of {longest} words over {len(vocab)} "
                                 "distinct words are too many to index; use mode='text'")
            phrases = []
            for n, items in sorted(by_length.items()):
                items.sort()
                phrases.append((n, torch.tensor([c for c, _ in items], dtype=torch.int64,
                                                device=device),
                                torch.tensor([w for _, w in items], dtype=torch.float32,
                                             device=device)))
            per_token = self._per_token_words(index)
            if per_token is not None:  # word-level: no character table needed
                if len(phrases) == 1 and phrases[0][0] == 1:  # words only: a weight per token
                    _, codes, weights = phrases[0]
                    at = torch.searchsorted(codes.cpu(), per_token).clamp(max=codes.numel() - 1)
                    hit = (per_token > 0) & (codes.cpu()[at] == per_token)
                    per_token = torch.where(hit, weights.cpu()[at], 0.0)
                per_token = per_token.to(device)
                folds = None
            else:
                folds = None if self.case_sensitive else _casefold_table().to(device)
            self._cache[device] = keys.to(device), base, phrases, folds, per_token
        return self._cache[device]

    def _per_token_words(self, index):
        """For word-level tokenizers (no token continues a word, and each token writes at
        most one word), ``(V + 1,)`` int64: each token id's word id in ``index`` (0 for a
        word outside the lexicon, -1 for a token with no word; the last entry for ids past
        the tokenizer's). Words are then tokens, so the settled words of a row are its
        counted tokens that write one (and a lexicon of single words is a weight per
        token); ``None`` where that does not hold."""
        if self._can_extend or self._exact_text is None:
            return None
        size = len(self.tokenizer)
        table = torch.full((size + 1,), -1, dtype=torch.int64)
        for i in range(size):
            words = WORD.findall(self.tokenizer.decode([i], skip_special_tokens=True))
            if len(words) > 1:
                return None
            if words:
                table[i] = index.get(self._fold(words[0]), 0)
        return table

    def _word_keys(self, cp, word, start, folds):
        """``(N, M)`` int64: at the last character of each word, its key (see
        :func:`_word_key`), from prefix sums of each character's hash term."""
        c = cp.clamp(min=0)
        if folds is None:
            h = (c, c)
            length = torch.ones_like(c)
        else:
            h, length = (folds[0][c], folds[1][c]), folds[2][c]
        length = torch.where(word, length, 0)
        seen = length.cumsum(-1) - length  # folded code points before each character
        offset = seen - torch.cummax(torch.where(start, seen, 0), -1).values
        powers = _powers(_next_power_of_two(3 * cp.shape[-1]), cp.device)
        key = torch.zeros_like(c)
        for which in range(2):
            term = torch.where(word, h[which] * powers[which][offset] % _PRIMES[which], 0)
            total = term.cumsum(-1)
            before = torch.cummax(torch.where(start, total - term, 0), -1).values
            key = key * _PRIMES[1] + (total - before) % _PRIMES[which]
        return key

    def _forward_tokens(self, x):
        keys, base, phrases, folds, per_token = self._tables(x.device)
        if per_token is not None:
            word = per_token[x.clamp(min=0, max=per_token.numel() - 1)]
            if word.is_floating_point():  # each token's weight (select: 0 * -inf is NaN)
                return torch.where(counted_mask(x, self.eos), word, 0.0).sum(-1)
            return self._sum_phrases(compact(word, counted_mask(x, self.eos) & (word >= 0), -1),
                                     base, phrases, x)
        complete = is_complete(x, self.eos)
        cp, kind = self._text.chars(x, counted_mask(x, self.eos), complete)
        word = kind == WORD_CHAR
        pad = torch.nn.functional.pad
        start = word & ~pad(word[:, :-1], (1, 0), value=False)
        end = word & ~pad(word[:, 1:], (0, 1), value=False)
        if self._can_extend:
            # a word is settled by a later word or other character (not by U+FFFD), or
            # by the end of a complete row
            settles = ((kind == WORD_CHAR) | (kind == OTHER_CHAR)).long()
            later = settles.flip(-1).cumsum(-1).flip(-1) - settles > 0
            end = end & (later | complete[:, None])
        key = self._word_keys(cp, word, start, folds)
        at = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
        ids = torch.where(keys[at] == key, at + 1, 0)
        ids = compact(ids, end, -1)  # the settled words' ids in order, -1 past the last
        return self._sum_phrases(ids, base, phrases, x)

    @staticmethod
    def _sum_phrases(ids, base, phrases, x):
        """``(N,)``: the weights of the phrases found in ``ids`` (``(N, M)`` settled word
        ids in order, 0 outside the lexicon, -1 past the last)."""
        total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        for n, codes, weights in phrases:
            if ids.shape[-1] < n:
                continue
            windows = ids.unfold(-1, n, 1)  # (N, M - n + 1, n)
            code = windows[..., 0].contiguous()
            for j in range(1, n):
                code = code * base + windows[..., j]
            at = torch.searchsorted(codes, code).clamp(max=codes.numel() - 1)
            hit = (windows > 0).all(-1) & (codes[at] == code)
            # select rather than multiply: 0 * -inf is NaN
            total = total + torch.where(hit, weights[at], 0.0).sum(-1)
        return total

    # -- the incremental form --------------------------------------------------------------

    def _stream(self, device):
        """``(WordStream, scorer)`` for ``device``, or ``None`` where words are read by
        decoding text (``mode='text'``, or a tokenizer whose table does not match)."""
        if self.mode != "tokens" or self._exact_text is None or not self._can_extend:
            return None  # word-level tokenizers: forward is a table lookup per token already
        if device not in self._streams:
            keys, base, phrases, _, _ = self._tables(device)
            vocab = sorted({w for words in self.phrases for w in words}, key=_word_key)
            index = {w: i + 1 for i, w in enumerate(vocab)}
            stream = self._streams.get("host")
            if stream is None:
                stream = self._streams["host"] = WordStream(
                    self._exact_text, self._fold, lambda cps: (_hash(cps, 0), _hash(cps, 1)),
                    _PRIMES, _BASES, index, max(len(words) for words in self.phrases) - 1)
            self._streams[device] = stream, _Scorer(keys, base, phrases)
        return self._streams[device]

    def initial_state(self, rows: int, device: torch.device) -> dict | None:
        """Streaming words (:mod:`pyro_lm.rewards.word_stream`) in ``mode='tokens'``."""
        found = self._stream(device)
        return None if found is None else found[0].initial(rows, device)

    def advance(self, state: dict, token: torch.Tensor, t: int) -> dict:
        stream, scorer = self._stream(token.device)
        return stream.advance(state, token, self.eos, scorer)

    def state_value(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        stream, scorer = self._stream(x.device)
        value = stream.value(state, is_complete(x, self.eos), scorer)
        slow = state["slow"]
        if bool(slow.any()):  # rows with text the stream does not read: the batched reader
            rows = slow.nonzero().squeeze(-1)
            value = value.index_put((rows,), self._forward_tokens(x.index_select(0, rows)))
        return value

    def __repr__(self) -> str:
        return (f"Lexicon(name={self.name!r}, mode={self.mode!r}, "
                f"case_sensitive={self.case_sensitive}, {len(self.phrases)} keys)")


class _Scorer:
    """What settling a word adds, on one device: its id among the lexicon's words, and
    the weights of the phrases that end with it (see :class:`WordStream`)."""

    def __init__(self, keys, base, phrases):
        self.keys, self.base, self.phrases = keys, base, phrases

    def word_id(self, pending: torch.Tensor) -> torch.Tensor:
        key = pending[:, 0] * _PRIMES[1] + pending[:, 1]
        at = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == key, at + 1, 0)

    def weight(self, history: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(word.shape, dtype=torch.float32, device=word.device)
        for n, codes, weights in self.phrases:
            window = word[:, None] if n == 1 else torch.cat(
                [history[:, history.shape[1] - n + 1:], word[:, None]], -1)
            code = window[:, 0]
            for j in range(1, n):
                code = code * self.base + window[:, j]
            at = torch.searchsorted(codes, code).clamp(max=codes.numel() - 1)
            hit = (window > 0).all(-1) & (codes[at] == code)
            total = total + torch.where(hit, weights[at], 0.0)
        return total


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
