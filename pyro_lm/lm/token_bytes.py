"""A tokenizer's tokens as bytes: what each token adds to the decoded text.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2) spell bytes with GPT-2's
printable alphabet (``"Ġ"`` is a space); SentencePiece-style ones (Llama 2, Mistral)
spell text with ``"▁"`` for a space and, with byte fallback, a byte ``0xNN`` as the
piece ``<0xNN>``. In both, one character such as "東" may take several tokens, so
the text of a sequence of tokens is the concatenation of their bytes, read as UTF-8.
:func:`byte_kind` says which way a tokenizer spells its tokens and
:func:`token_bytes` gives each token's bytes; special tokens add nothing when they are
skipped, as in ``tokenizer.decode(ids, skip_special_tokens=True)``.

The bytes are what a token adds *inside* a text, after another token: decoders that
strip the first token's leading space (SentencePiece's) do not strip it here.
"""

from __future__ import annotations

import functools
import json
import re
import weakref

__all__ = ["byte_decoder", "byte_fallback_ids", "byte_kind", "decoder_types",
           "special_token_ids", "token_bytes"]

#: A byte-fallback piece: ``<0xNN>`` stands for the byte ``0xNN``.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _per_tokenizer(fn):
    """Cache ``fn(tokenizer)`` while the tokenizer lives (uncached where it cannot be a
    weak dictionary key)."""
    cache = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def cached(tokenizer):
        try:
            return cache[tokenizer]
        except KeyError:
            value = cache[tokenizer] = fn(tokenizer)
            return value
        except TypeError:
            return fn(tokenizer)

    return cached


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each printable stand-in character → its byte.

    >>> byte_decoder()["Ġ"], byte_decoder()["a"]
    (32, 97)
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@_per_tokenizer
def decoder_types(tokenizer) -> frozenset[str]:
    """The types of the decoders of a fast tokenizer's backend, those inside a
    ``Sequence`` included (empty for slow tokenizers); cached per tokenizer.

    :param tokenizer: a ``transformers`` tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return frozenset()
    types, stack = set(), [json.loads(backend.to_str()).get("decoder")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            types.add(node.get("type"))
            stack.extend(node.get("decoders") or ())
    return frozenset(types)


@_per_tokenizer
def byte_kind(tokenizer) -> str | None:
    """How the tokenizer's tokens spell the text; cached per tokenizer.

    * ``"byte_level"``: in GPT-2's byte-level alphabet (a ``ByteLevel`` decoder, or a
      slow tokenizer with a ``byte_decoder``); a token may hold part of a character.
    * ``"byte_fallback"``: SentencePiece pieces (``"▁"`` a space) and ``<0xNN>`` byte
      pieces (a ``ByteFallback`` decoder, or a slow SentencePiece tokenizer); a
      character may take several byte pieces.
    * ``"metaspace"``: SentencePiece pieces without byte fallback (a ``Metaspace`` or
      ``Replace`` decoder): tokens are text.
    * ``None``: anything else (word-level tokenizers, ...): tokens are text, joined as the
      tokenizer's decoder does, and :func:`token_bytes` does not say what they add.

    :param tokenizer: a ``transformers`` tokenizer.
    """
    types = decoder_types(tokenizer)
    if "ByteLevel" in types or hasattr(tokenizer, "byte_decoder"):
        return "byte_level"
    if "ByteFallback" in types or hasattr(tokenizer, "sp_model"):
        return "byte_fallback"
    if types & {"Metaspace", "Replace"}:
        return "metaspace"
    return None


def special_token_ids(tokenizer) -> set[int]:
    """The ids that ``tokenizer.decode(..., skip_special_tokens=True)`` drops: the
    tokenizer's special tokens and its added tokens marked special.

    :param tokenizer: a ``transformers`` tokenizer.
    """
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def token_bytes(tokenizer, ids=None, skip_special_tokens: bool = True) -> list[bytes] | None:
    """The bytes each token adds to the decoded text, inside a text (after another token).

    * Special tokens (:func:`special_token_ids`) add nothing when skipped, else their
      text; ids without a piece add nothing.
    * Byte-level: each piece read through :func:`byte_decoder` (a piece with characters
      outside the alphabet is its UTF-8); an added token is its content.
    * SentencePiece-style (``"byte_fallback"``, ``"metaspace"``), added tokens included
      (a fast tokenizer's decoder reads them as any other piece): ``<0xNN>`` is the byte
      ``0xNN``, any other piece its UTF-8 with ``"▁"`` a space.

    :param tokenizer: a ``transformers`` tokenizer.
    :param ids: token ids (an iterable of ints); ``None`` for every id,
        ``0 .. len(tokenizer) - 1``.
    :param bool skip_special_tokens: special tokens add nothing (as in
        ``tokenizer.decode``).
    :returns: one ``bytes`` per id, or ``None`` where :func:`byte_kind` is ``None``
        (tokens are text joined by the tokenizer's decoder).
    """
    kind = byte_kind(tokenizer)
    if kind is None:
        return None
    ids = list(range(len(tokenizer))) if ids is None else [int(i) for i in ids]
    special = special_token_ids(tokenizer)
    added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None)
                                            or {}).items()}
    table = byte_decoder()
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if i in special:
            out.append(b"" if skip_special_tokens else (piece or "").encode("utf-8"))
        elif piece is None:
            out.append(b"")
        elif kind == "byte_level":
            if i in added:
                out.append(added[i].encode("utf-8"))
            elif all(c in table for c in piece):
                out.append(bytes(table[c] for c in piece))
            else:
                out.append(piece.encode("utf-8"))
        elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def byte_fallback_ids(tokenizer) -> set[int]:
    """The ids of the ``<0xNN>`` pieces that a fast tokenizer's ``ByteFallback`` decoder
    reads as bytes: it decodes a run of them that is not UTF-8 as a whole to one U+FFFD
    per piece. Empty for other tokenizers (slow SentencePiece ones included).

    :param tokenizer: a ``transformers`` tokenizer.
    """
    if byte_kind(tokenizer) != "byte_fallback" or "ByteFallback" not in decoder_types(tokenizer):
        return set()
    special = special_token_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {i for i, piece in enumerate(pieces) if i not in special and piece is not None
            and _BYTE_PIECE.fullmatch(piece) is not None}
