"""The corpus as written prose: capitalised sentences, attached punctuation.

The grammar of :mod:`pyro_lm.data.grammar` writes space-tokenised lower-case text
(``"review : this heater is sturdy ."``), which a word-level tokenizer reads one
word per token. Subword tokenizers are trained and tested on what real text looks
like instead: ``"Review: This heater is sturdy."``. :func:`prose` maps one to the
other; it is a bijection on the grammar's documents (:func:`unprose` inverts it), so
the labels and word counts of a document carry over.
"""

from __future__ import annotations

import re

from pyro_lm.data.grammar import CITIES, FEMALE_NAMES, MALE_NAMES

__all__ = ["prose", "unprose"]

_PUNCT = re.compile(r" ([.,:])")
_SENTENCE_START = re.compile(r"(^|[.:] )([a-z])")
#: Words written with a capital inside a sentence too: names, cities and "I".
_CAPITALISED = frozenset({"i", *FEMALE_NAMES, *MALE_NAMES, *CITIES})


def _proper(word: str) -> str:
    return word.capitalize() if word in _CAPITALISED else word


def prose(text: str) -> str:
    """Write a space-tokenised corpus document as prose.

    Punctuation attaches to the word before it, each sentence (and the kind before
    the colon) starts with a capital, as do names, cities and ``I``.

    >>> prose("review : this heater is sturdy and i like it .")
    'Review: This heater is sturdy and I like it.'

    :param str text: a document of :func:`~pyro_lm.data.generate_corpus`.
    :returns: the same document as prose.
    """
    words = " ".join(_proper(w) for w in text.split())
    words = _PUNCT.sub(r"\1", words)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), words)


def unprose(text: str) -> str:
    """Invert :func:`prose`: lower-case, punctuation split off by spaces.

    >>> unprose("Review: This heater is sturdy and I like it.")
    'review : this heater is sturdy and i like it .'
    """
    return " ".join(re.sub(r"([.,:])", r" \1 ", text.lower()).split())
