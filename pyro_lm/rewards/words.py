r"""Words of decoded completions, read from token ids on the device.

The decoded text of a completion is the concatenation of the bytes each of its
content tokens adds to it (special tokens add none), read as UTF-8. Its *words*
are what ``re.findall(r"\w+", text)`` finds. :class:`TokenText` holds, once per
tokenizer, a table of every token's bytes, and decodes a batch of completions
``(N, T)`` into code points on the device, without a Python loop over rows:
bytes that do not form a valid character (a character cut by the end of a prefix,
or a stray continuation byte) decode to U+FFFD as in ``bytes.decode("utf-8",
"replace")``, which is what byte-level and byte-fallback tokenizers do.

On a prefix of a completion (see :mod:`pyro_lm.distributions.prefix`) the last word
may still grow: " the" is a prefix of " they". A word is *settled* when a later
character shows that it ended, when the completion is complete, or when no token
can continue a word (word-level tokenizers, whose tokens each start a new word);
U+FFFD does not settle it (the next token may complete the character into a
letter). :func:`settled_words` reads the settled words of a decoded text;
:meth:`TokenText.chars` gives what the batched readers need to do the same.
"""

from __future__ import annotations

import functools
import random
import re

import torch

from pyro_lm.distributions.prefix import counted_mask, is_complete
from pyro_lm.lm.token_bytes import byte_fallback_ids, special_token_ids, token_bytes

__all__ = ["WORD", "TokenText", "can_extend", "decode_rows", "settled_words", "settled_text"]

#: A word: a maximal run of word characters (letters, digits, underscore).
WORD = re.compile(r"\w+")

_REPLACEMENT = "\ufffd"
_NUM_CODE_POINTS = 0x110000

#: Character kinds returned by :meth:`TokenText.chars`.
PAD, WORD_CHAR, OTHER_CHAR, UNDECIDED_CHAR = 0, 1, 2, 3


def settled_words(text: str, complete: bool, can_extend: bool = True) -> list[str]:
    """The words of ``text`` (in order), without a last word that may still grow.

    :param str text: the decoded completion or prefix.
    :param bool complete: the completion is final (every word is settled).
    :param bool can_extend: some token can continue a word (``False`` for word-level
        tokenizers); see :attr:`TokenText.can_extend`.
    """
    found = [(m.group(), m.end()) for m in WORD.finditer(text)]
    if found and not complete and can_extend and not text[found[-1][1]:].strip(_REPLACEMENT):
        found.pop()
    return [w for w, _ in found]


def settled_text(text: str, complete: bool, can_extend: bool = True) -> str:
    """The part of ``text`` that no continuation changes: all of it when ``complete``;
    otherwise without trailing U+FFFD (a character the next token may complete) and,
    if ``can_extend``, without the trailing run of word characters (a word that may grow).

    :param str text: the decoded completion or prefix.
    :param bool complete: the completion is final.
    :param bool can_extend: some token can continue a word (see :attr:`TokenText.can_extend`).
    """
    if complete:
        return text
    text = text.rstrip(_REPLACEMENT)
    if can_extend:
        m = _TRAILING_WORD.search(text)
        if m is not None:
            text = text[:m.start()]
    return text


_TRAILING_WORD = re.compile(r"\w+\Z")


def _token_bytes(tokenizer) -> tuple[list[bytes], list[bool]]:
    """The bytes each token id adds to the decoded text (inside a text, after another
    token), and which tokens are byte-fallback pieces (``<0xNN>``): the byte-level
    alphabet, SentencePiece pieces (:func:`pyro_lm.lm.token_bytes.token_bytes`), or, for
    other tokenizers, what decoding after an anchor token adds."""
    size = len(tokenizer)
    out = token_bytes(tokenizer)
    if out is not None:
        pieces = byte_fallback_ids(tokenizer)
        return out, [i in pieces for i in range(size)]
    # anything else (word-level tokenizers, joined with spaces): what a token adds after an
    # anchor token
    specials = special_token_ids(tokenizer)
    anchor = next((i for i in range(size) if i not in specials
                   and tokenizer.decode([i], skip_special_tokens=True)), None)
    if anchor is None:
        raise ValueError("tokenizer: every token decodes to nothing")
    head = tokenizer.decode([anchor], skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
    out = []
    for i in range(size):
        if i in specials:
            out.append(b"")
            continue
        both = tokenizer.decode([anchor, i], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)
        out.append(both[len(head):].encode("utf-8") if both.startswith(head) else b"\xff")
    return out, [False] * size


def _utf8_decode(b: torch.Tensor):
    """Code points of UTF-8 bytes ``b`` ``(N, M)`` (``-1`` past each row's end).

    :returns: ``(cp, start, good)``: ``start`` marks the first byte of each character and
        each byte that is not part of a valid character, ``cp`` the code point there
        (U+FFFD for those bytes), ``good`` the bytes of valid characters.
    """
    def ahead(k):
        return torch.nn.functional.pad(b, (0, k), value=-1)[:, k:]

    def behind(v, k):
        return torch.nn.functional.pad(v, (k, 0), value=False)[:, :v.shape[1]]

    def cont(v):
        return (v >= 0x80) & (v < 0xC0)

    b1, b2, b3 = ahead(1), ahead(2), ahead(3)
    n = torch.zeros_like(b)
    n = torch.where((b >= 0) & (b < 0x80), 1, n)
    n = torch.where((b >= 0xC2) & (b <= 0xDF), 2, n)
    n = torch.where((b >= 0xE0) & (b <= 0xEF), 3, n)
    n = torch.where((b >= 0xF0) & (b <= 0xF4), 4, n)
    # the second byte's range excludes overlong forms, surrogates and code points > U+10FFFF
    lo = torch.where(b == 0xE0, 0xA0, torch.where(b == 0xF0, 0x90, 0x80))
    hi = torch.where(b == 0xED, 0x9F, torch.where(b == 0xF4, 0x8F, 0xBF))
    valid = (n == 1) | ((n >= 2) & (b1 >= lo) & (b1 <= hi) & ((n < 3) | cont(b2))
                        & ((n < 4) | cont(b3)))
    m = 0x3F
    cp = torch.where(n == 2, ((b & 0x1F) << 6) | (b1 & m), b)
    cp = torch.where(n == 3, ((b & 0x0F) << 12) | ((b1 & m) << 6) | (b2 & m), cp)
    cp = torch.where(n == 4, ((b & 0x07) << 18) | ((b1 & m) << 12) | ((b2 & m) << 6) | (b3 & m),
                     cp)
    cp = torch.where(valid, cp, ord(_REPLACEMENT))
    inside = (behind(valid & (n >= 2), 1) | behind(valid & (n >= 3), 2)
              | behind(valid & (n >= 4), 3))
    return cp, (b >= 0) & ~inside, valid | inside


def compact(values: torch.Tensor, keep: torch.Tensor, fill) -> torch.Tensor:
    """Move the kept entries of each row of ``values`` ``(N, M)`` to its front, in order;
    the rest holds ``fill``. Batched: one scatter, no loop over rows."""
    width = values.shape[-1]
    target = torch.where(keep, keep.long().cumsum(-1) - 1, width)
    out = torch.full((values.shape[0], width + 1), fill, dtype=values.dtype,
                     device=values.device)
    return out.scatter(1, target, values)[:, :width]


@functools.cache
def _is_word_table() -> torch.Tensor:
    """Bool ``(0x110000,)``: code points that ``\\w`` matches."""
    text = "".join(map(chr, range(_NUM_CODE_POINTS)))
    table = torch.zeros(_NUM_CODE_POINTS, dtype=torch.bool)
    table[torch.tensor([m.start() for m in re.finditer(r"\w", text)])] = True
    return table


def can_extend(tokenizer) -> bool:
    """Whether the next token may continue the last word of a text (``True`` unless the
    tokenizer provably starts every token with a non-word character, as word-level
    tokenizers joined by spaces do)."""
    try:
        text = TokenText(tokenizer, check=False)
    except ValueError:
        return True
    return text.mismatch is not None or text.can_extend


class TokenText:
    """Each token's bytes as a device table, and batched decoding of completions.

    Byte-fallback pieces (``<0xNN>``, SentencePiece-style tokenizers) decode as their
    tokenizer does: a run of them that is not valid UTF-8 as a whole decodes to one
    U+FFFD per piece. On an incomplete prefix the trailing run of such pieces is
    undecided (the next piece may join it and turn it into U+FFFD).

    :param tokenizer: a ``transformers`` tokenizer.
    :param bool check: compare the table's decoding with ``tokenizer.decode`` on random
        token sequences and raise if their words differ.

    Attributes: ``can_extend`` (some token's text can continue a word: it starts with a
    word character or a non-ASCII byte) and ``mismatch`` (``None``, or a token sequence
    on which the table and the tokenizer disagree, when ``check=False``).
    """

    def __init__(self, tokenizer, check: bool = True):
        self.tokenizer = tokenizer
        self.token_bytes, self.fallback = _token_bytes(tokenizer)
        self.size = len(self.token_bytes)
        self.runs = any(self.fallback)
        self.can_extend = any(b and (b[0] >= 0x80 or WORD.match(chr(b[0])))
                              for b in self.token_bytes)
        self.mismatch = self._find_mismatch()
        if check and self.mismatch is not None:
            ids, theirs, ours = self.mismatch
            raise ValueError(f"tokenizer: cannot read its tokens' texts from its vocabulary: "
                             f"decode({ids}) gives {theirs!r}, the token table {ours!r}")
        self._cache = {}

    def _in_vocab(self, i: int) -> bool:
        return 0 <= i < self.size and bool(self.token_bytes[i])

    def text(self, ids) -> str:
        """The decoded text of content ids (a list), from the table."""
        ids = [i for i in ids if self._in_vocab(i)]
        parts, j = [], 0
        while j < len(ids):
            k, fallback = j, self.fallback[ids[j]]
            while k < len(ids) and self.fallback[ids[k]] == fallback:
                k += 1
            chunk = b"".join(self.token_bytes[i] for i in ids[j:k])
            try:
                parts.append(chunk.decode("utf-8"))
            except UnicodeDecodeError:
                parts.append(_REPLACEMENT * (k - j) if fallback
                             else chunk.decode("utf-8", "replace"))
            j = k
        return "".join(parts)

    def settled_ids(self, ids, complete: bool):
        """``(ids, cut)``: the content ids (a list) without an incomplete prefix's
        trailing run of byte-fallback pieces, and whether one was cut."""
        if complete or not self.runs:
            return ids, False
        j = len(ids)
        while j > 0 and not self._in_vocab(ids[j - 1]):
            j -= 1
        k = j
        while k > 0 and self._in_vocab(ids[k - 1]) and self.fallback[ids[k - 1]]:
            k -= 1
        return (ids[:k], True) if k < j else (ids, False)

    def _find_mismatch(self, trials: int = 64):
        rng = random.Random(0)
        for k in range(trials):
            ids = [rng.randrange(self.size) for _ in range(1 + k % 6)]
            theirs = self.tokenizer.decode(ids, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)
            ours = self.text(ids)
            if WORD.findall(theirs) != WORD.findall(ours):
                return ids, theirs, ours
        return None

    def _tables(self, device):
        if device not in self._cache:
            lengths = torch.tensor([len(b) for b in self.token_bytes] + [0])
            width = max(1, int(lengths.max()))
            flat = torch.frombuffer(bytearray(b"".join(self.token_bytes)) or bytearray(1),
                                    dtype=torch.uint8)[:int(lengths.sum())]
            # row i, column j < len(token i) holds byte j of token i; the rest is -1
            column = torch.arange(width)
            inside = column < lengths[:, None]
            table = torch.full((self.size + 1, width), -1, dtype=torch.int64)
            table[inside] = flat.long()
            fallback = torch.tensor(self.fallback + [False])
            self._cache[device] = (table.to(device), lengths.to(device), fallback.to(device),
                                   _is_word_table().to(device))
        return self._cache[device]

    def chars(self, x: torch.Tensor, keep: torch.Tensor, complete: torch.Tensor):
        """Decode the kept tokens of each row of ``x`` ``(N, T)`` into characters.

        :param keep: bool ``(N, T)``: content tokens (e.g. :func:`counted_mask`).
        :param complete: bool ``(N,)``: final rows (e.g. :func:`is_complete`).
        :returns: ``(cp, kind)``, both ``(N, M)``, characters at the front of each row:
            code points (U+FFFD for invalid bytes) and kinds: ``WORD_CHAR``,
            ``OTHER_CHAR`` (settles a word before it), ``UNDECIDED_CHAR`` (U+FFFD, or a
            character that the next token may still change; settles nothing), ``PAD``
            past the row's end.
        """
        table, lengths, fallback, is_word = self._tables(x.device)
        ids = torch.where(keep & (x >= 0) & (x < self.size), x, self.size)
        ids = compact(ids, lengths[ids] > 0, self.size)  # the tokens with text, in order
        n, width = ids.shape[0], table.shape[-1]
        b = table[ids]  # (N, T, width)
        present = b >= 0
        b = compact(b.reshape(n, -1), present.reshape(n, -1), -1)
        # one host read per call: crop the rows to the longest text (T * width bytes may be
        # far more, for vocabularies with a few very long tokens)
        size = max(1, int(present.sum((-2, -1)).max())) if n else 1
        b = b[:, :size]
        cp, start, good = _utf8_decode(b)
        undecided = torch.zeros_like(start)
        if self.runs:
            piece = fallback[ids]
            run = torch.where(piece, (piece & ~torch.nn.functional.pad(
                piece[:, :-1], (1, 0), value=False)).long().cumsum(-1), 0)
            last = (lengths[ids] > 0).long().sum(-1).sub(1).clamp(min=0)
            trailing = torch.where(complete, 0, run.gather(1, last[:, None])[:, 0])
            run = compact(run[:, :, None].expand(-1, -1, width).reshape(n, -1),
                          present.reshape(n, -1), 0)[:, :size]
            bad = torch.zeros(n, ids.shape[1] + 1, dtype=torch.long, device=x.device)
            bad = bad.scatter_reduce(1, run, ((run > 0) & ~good).long(), "amax")
            invalid = (run > 0) & (bad.gather(1, run) > 0)
            cp = torch.where(invalid, ord(_REPLACEMENT), cp)
            start = start | (invalid & (b >= 0))
            undecided = (run > 0) & (run == trailing[:, None])
        cp = compact(cp, start, -1)
        undecided = compact(undecided, start, False)
        kind = torch.where(is_word[cp.clamp(min=0)], WORD_CHAR, OTHER_CHAR)
        kind = torch.where((cp == ord(_REPLACEMENT)) | undecided, UNDECIDED_CHAR, kind)
        return cp, torch.where(cp < 0, PAD, kind)


def decode_rows(tokenizer, x: torch.Tensor, eos, table: TokenText | None = None):
    """``(texts, complete)``: each row's decoded content (``tokenizer.decode``, no special
    tokens, no clean-up of spaces) and whether it is final. With ``table``, an incomplete
    row's trailing run of byte-fallback pieces is replaced by one U+FFFD (undecided)."""
    keep = counted_mask(x, eos).tolist()
    complete = is_complete(x, eos).tolist()
    texts = []
    for row, mask, done in zip(x.tolist(), keep, complete, strict=True):
        ids = [t for t, k in zip(row, mask, strict=True) if k]
        cut = False
        if table is not None:
            ids, cut = table.settled_ids(ids, done)
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        texts.append(text + _REPLACEMENT if cut else text)
    return texts, complete
