"""Synthetic labelled corpora for fine-tuning experiments.

See :mod:`pyro_lm.data.grammar` for the grammar, its labels and the
fine-tuning targets it is designed for.
"""

from pyro_lm.data.grammar import (
    ASPECTS,
    CITIES,
    FEMALE_NAMES,
    FEMALE_RATE,
    HOBBIES,
    INTENSIFIERS,
    KINDS,
    MALE_NAMES,
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    OFFENSIVE_RATES,
    OFFENSIVE_WORDS,
    POSITIVE_WORDS,
    PRODUCTS,
    PROFESSIONS,
    PRONOUNS,
    SENTIMENT_RATES,
    Document,
    generate_bio,
    generate_corpus,
    generate_review,
    vocabulary,
)
from pyro_lm.data.prose import prose, unprose

__all__ = [
    "ASPECTS",
    "CITIES",
    "FEMALE_NAMES",
    "FEMALE_RATE",
    "HOBBIES",
    "INTENSIFIERS",
    "KINDS",
    "MALE_NAMES",
    "NEGATIVE_WORDS",
    "NEUTRAL_WORDS",
    "OFFENSIVE_RATES",
    "OFFENSIVE_WORDS",
    "POSITIVE_WORDS",
    "PRODUCTS",
    "PROFESSIONS",
    "PRONOUNS",
    "SENTIMENT_RATES",
    "Document",
    "generate_bio",
    "generate_corpus",
    "generate_review",
    "prose",
    "unprose",
    "vocabulary",
]
