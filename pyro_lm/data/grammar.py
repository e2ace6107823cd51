"""A deterministic, labelled synthetic corpus drawn from a small grammar.

The corpus is what the bundled tiny language model (``models/tinylm``) was
trained on, and it is what the examples and tests use to pose fine-tuning
*targets* whose answer is known exactly, because every document carries the
labels of the grammar choices that produced it:

* ``"no offensive words"`` -- about 15% of the reviews contain a (mild,
  synthetic) insult from :data:`OFFENSIVE_WORDS`, mostly the negative ones;
  a pointwise constraint can remove them.
* ``"positive sentiment"`` -- reviews are about 40% positive, 40% negative
  and 20% neutral; a reward or filter on the ``sentiment`` label shifts the
  mix.
* ``"half the biographies are about women"`` -- only :data:`FEMALE_RATE`
  (25%) of the biographies are about women, so the moment constraint
  ``E[female] = 0.5`` is a real change of distribution, and professions are
  mildly correlated with gender (a bias the constraint should correct).

Two kinds of document are generated, each written as ``"{kind} : {text}"``,
all lowercase, with punctuation as separate space-separated tokens:

* reviews, e.g. ``"review : the blender is great and the price is fair ."``
* biographies, e.g. ``"bio : mary is a nurse from paris . she likes music ."``

Generation only uses the :class:`random.Random` instance seeded by the
caller, never the global random state, so :func:`generate_corpus` is
reproducible across runs and platforms.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: Probability that a biography is about a woman (the prior the moment
#: constraint "half the biographies are about women" moves to 0.5).
FEMALE_RATE = 0.25

#: Probability of each review sentiment.
SENTIMENT_RATES: Mapping[str, float] = {"positive": 0.4, "negative": 0.4, "neutral": 0.2}

#: Probability that a review of the given sentiment contains an offensive
#: word; overall about 0.4 * 0.025 + 0.4 * 0.3 + 0.2 * 0.1 = 15%.
OFFENSIVE_RATES: Mapping[str, float] = {"positive": 0.025, "negative": 0.3, "neutral": 0.1}

#: The document kinds :func:`generate_corpus` knows.
KINDS = ("review", "bio")

POSITIVE_WORDS = (
    "great", "excellent", "lovely", "wonderful", "fantastic", "perfect",
    "amazing", "superb", "brilliant", "reliable", "sturdy", "comfortable",
)  # fmt: skip
NEGATIVE_WORDS = (
    "awful", "terrible", "broken", "horrible", "poor", "flimsy",
    "useless", "faulty", "noisy", "disappointing", "bad", "fragile",
)  # fmt: skip
NEUTRAL_WORDS = (
    "okay", "fine", "average", "ordinary", "acceptable", "decent",
    "standard", "basic", "adequate", "fair",
)  # fmt: skip
_OFFENSIVE_ADJECTIVES = ("stupid", "idiotic", "dumb")
_OFFENSIVE_NOUNS = ("trash", "garbage", "junk")
_OFFENSIVE_PEOPLE = ("moron", "idiot", "loser")
OFFENSIVE_WORDS = _OFFENSIVE_ADJECTIVES + _OFFENSIVE_NOUNS + _OFFENSIVE_PEOPLE
PRODUCTS = (
    "blender", "toaster", "kettle", "lamp", "chair", "phone", "laptop",
    "camera", "jacket", "backpack", "speaker", "watch", "mixer", "vacuum",
    "printer", "keyboard", "mug", "bottle", "tent", "heater",
)  # fmt: skip
ASPECTS = (
    "price", "battery", "design", "quality", "sound", "screen", "color",
    "size", "handle", "material", "packaging", "delivery", "service",
)  # fmt: skip
INTENSIFIERS = ("really", "very", "quite", "truly", "so")

FEMALE_NAMES = (
    "mary", "anna", "emma", "sarah", "laura", "julia", "alice", "lucy",
    "sophie", "clara", "helen", "grace", "olivia", "rose", "nora",
)  # fmt: skip
MALE_NAMES = (
    "john", "james", "peter", "david", "paul", "mark", "thomas", "daniel",
    "george", "henry", "jack", "samuel", "oliver", "lucas", "adam",
)  # fmt: skip
_FEMALE_LEANING = ("nurse", "teacher", "librarian", "secretary", "dancer")
_MALE_LEANING = ("engineer", "pilot", "mechanic", "carpenter", "programmer")
_UNBIASED = (
    "doctor", "lawyer", "chef", "writer", "baker", "farmer", "scientist",
    "journalist", "architect", "accountant",
)  # fmt: skip
PROFESSIONS = _FEMALE_LEANING + _MALE_LEANING + _UNBIASED
CITIES = (
    "paris", "london", "berlin", "rome", "madrid", "vienna", "dublin",
    "lisbon", "prague", "oslo", "tokyo", "boston", "chicago", "toronto",
    "sydney",
)  # fmt: skip
HOBBIES = (
    "music", "painting", "hiking", "cooking", "reading", "chess",
    "gardening", "swimming", "cycling", "photography", "dancing",
    "running", "fishing", "tennis", "football",
)  # fmt: skip
_PETS = ("dog", "cat", "parrot", "horse")
_RELATIVES = ("brother", "sister", "mother", "father", "friend")
_COUNTS = ("two", "three", "four")
_AGES = ("twenty", "thirty", "forty", "fifty", "sixty")

#: Subject and possessive pronoun for each gender.
PRONOUNS: Mapping[str, tuple[str, str]] = {"female": ("she", "her"), "male": ("he", "his")}

# Relative weight of a profession for a person of the given gender: the
# leaning professions are four times likelier for one gender than the other.
_PROFESSION_WEIGHTS = {
    gender: [4.0 if p in leaning else 1.0 if p in other else 2.0 for p in PROFESSIONS]
    for gender, leaning, other in (
        ("female", _FEMALE_LEANING, _MALE_LEANING),
        ("male", _MALE_LEANING, _FEMALE_LEANING),
    )
}

_SENTIMENT_WORDS = {
    "positive": POSITIVE_WORDS,
    "negative": NEGATIVE_WORDS,
    "neutral": NEUTRAL_WORDS,
}
_VERBS = {
    "positive": ("love", "like", "adore", "recommend"),
    "negative": ("hate", "dislike", "regret", "returned"),
    "neutral": ("use", "tried", "bought", "kept"),
}

# Templates: ``{name}`` placeholders are filled by the generators; every
# other token is a literal word of the vocabulary.
_OPENINGS = (
    "the {product} is {adj}",
    "the {product} is {intens} {adj}",
    "this {product} is {adj}",
    "my new {product} is {adj}",
    "my new {product} is {intens} {adj}",
)
_CLAUSES = (
    "the {aspect} is {adj}",
    "the {aspect} is {intens} {adj}",
    "it is {intens} {adj}",
    "i {verb} it",
)
_OFFENSIVE_CLAUSES = {
    "positive": (
        "only {a} {person} would not buy it",
        "my old {other} was {noun}",
    ),
    "negative": (
        "it is total {noun}",
        "the {product} is {offadj}",
        "only {a} {person} would buy it",
        "the seller is {a} {person}",
    ),
    "neutral": (
        "the manual is {noun}",
        "the {aspect} is {offadj}",
    ),
}
_CLOSERS = {
    "positive": (
        "would buy again",
        "highly recommended",
        "five stars",
        "worth every penny",
        "i am very happy",
    ),
    "negative": (
        "do not buy it",
        "would not buy again",
        "avoid it",
        "one star",
        "what a waste of money",
    ),
    "neutral": ("it does the job", "nothing special", "three stars", "it works as expected"),
}
_BIO_INTROS = (
    "{name} is {a} {profession} from {city}",
    "{name} works as {a} {profession} in {city}",
    "{name} is {a} {profession} who lives in {city}",
    "born in {city} , {name} is {a} {profession}",
)
_BIO_FACTS = (
    "{subj} likes {hobby}",
    "{subj} enjoys {hobby} and {hobby2}",
    "{poss} favorite hobby is {hobby}",
    "{subj} has {count} children",
    "{subj} has a {pet}",
    "{subj} is {age} years old",
    "{subj} studied at the university of {city2}",
    "{poss} {relative} is {a2} {profession2}",
)


@dataclass(frozen=True)
class Document:
    """One generated document with the labels of the choices that made it.

    :param text: the full document, ``"{kind} : {body}"``, space-tokenised.
    :param kind: ``"review"`` or ``"bio"``.
    :param labels: for reviews ``sentiment`` (``"positive"``, ``"negative"``
        or ``"neutral"``), ``offensive`` (bool) and ``product``; for
        biographies ``gender`` (``"female"`` or ``"male"``), ``name``,
        ``profession`` and ``city``.
    """

    text: str
    kind: str
    labels: dict[str, object]

    @property
    def body(self) -> str:
        """The text without its ``"{kind} : "`` prefix.

        :return: the document body.
        """
        return self.text.split(" : ", 1)[1]

    @property
    def words(self) -> list[str]:
        """The whitespace-separated tokens of :attr:`text`.

        :return: the list of words, punctuation included.
        """
        return self.text.split()


def _article(word: str) -> str:
    """The indefinite article that goes before ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def _join_sentences(kind: str, sentences: Sequence[str]) -> str:
    """Write ``sentences`` as one document of the given kind."""
    return f"{kind} : " + " ".join(f"{s} ." for s in sentences)


def generate_review(rng: random.Random) -> Document:
    """Generate one product review.

    The first clause names the product; up to two more clauses about its
    aspects follow, joined by ``and`` or a comma. Offensive reviews have one
    of their clauses replaced by (or extended with) an insulting clause, and
    short reviews get a second, closing sentence.

    :param rng: the random number generator to draw from.
    :return: a document of kind ``"review"`` labelled with ``sentiment``,
        ``offensive`` and ``product``.
    """
    sentiment = rng.choices(list(SENTIMENT_RATES), weights=list(SENTIMENT_RATES.values()))[0]
    offensive = rng.random() < OFFENSIVE_RATES[sentiment]
    adjectives = _SENTIMENT_WORDS[sentiment]
    product = rng.choice(PRODUCTS)

    def fill(template: str) -> str:
        person = rng.choice(_OFFENSIVE_PEOPLE)
        return template.format(
            product=product,
            other=rng.choice([p for p in PRODUCTS if p != product]),
            aspect=rng.choice(ASPECTS),
            adj=rng.choice(adjectives),
            intens=rng.choice(INTENSIFIERS),
            verb=rng.choice(_VERBS[sentiment]),
            person=person,
            a=_article(person),
            noun=rng.choice(_OFFENSIVE_NOUNS),
            offadj=rng.choice(_OFFENSIVE_ADJECTIVES),
        )

    n_clauses = rng.choices((1, 2, 3), weights=(0.35, 0.45, 0.2))[0]
    clauses = [fill(rng.choice(_OPENINGS))]
    clauses += [fill(rng.choice(_CLAUSES)) for _ in range(n_clauses - 1)]
    if offensive:
        insult = fill(rng.choice(_OFFENSIVE_CLAUSES[sentiment]))
        if n_clauses == 1:
            clauses.append(insult)
        else:
            clauses[rng.randrange(1, n_clauses)] = insult
    sentence = clauses[0]
    for clause in clauses[1:]:
        sentence += rng.choices((" and ", " , "), weights=(0.7, 0.3))[0] + clause
    sentences = [sentence]
    if len(clauses) == 1 or (len(clauses) == 2 and rng.random() < 0.4):
        sentences.append(rng.choice(_CLOSERS[sentiment]))
    labels = {"sentiment": sentiment, "offensive": offensive, "product": product}
    return Document(_join_sentences("review", sentences), "review", labels)


def generate_bio(rng: random.Random) -> Document:
    """Generate one short biography.

    The person is a woman with probability :data:`FEMALE_RATE`; the
    profession is drawn with a mild gender bias. An introductory sentence
    (name, profession, city) is followed by zero to two facts that refer to
    the person with gender-consistent pronouns.

    :param rng: the random number generator to draw from.
    :return: a document of kind ``"bio"`` labelled with ``gender``,
        ``name``, ``profession`` and ``city``.
    """
    gender = "female" if rng.random() < FEMALE_RATE else "male"
    name = rng.choice(FEMALE_NAMES if gender == "female" else MALE_NAMES)
    profession = rng.choices(PROFESSIONS, weights=_PROFESSION_WEIGHTS[gender])[0]
    city = rng.choice(CITIES)
    subj, poss = PRONOUNS[gender]
    hobby, hobby2 = rng.sample(HOBBIES, 2)
    profession2 = rng.choice(PROFESSIONS)
    fields = {
        "name": name,
        "profession": profession,
        "a": _article(profession),
        "city": city,
        "subj": subj,
        "poss": poss,
        "hobby": hobby,
        "hobby2": hobby2,
        "count": rng.choice(_COUNTS),
        "pet": rng.choice(_PETS),
        "age": rng.choice(_AGES),
        "city2": rng.choice(CITIES),
        "relative": rng.choice(_RELATIVES),
        "profession2": profession2,
        "a2": _article(profession2),
    }
    n_facts = rng.choices((0, 1, 2), weights=(0.2, 0.5, 0.3))[0]
    templates = [rng.choice(_BIO_INTROS), *rng.sample(_BIO_FACTS, n_facts)]
    sentences = [t.format(**fields) for t in templates]
    labels = {"gender": gender, "name": name, "profession": profession, "city": city}
    return Document(_join_sentences("bio", sentences), "bio", labels)


_GENERATORS: Mapping[str, Callable[[random.Random], Document]] = {
    "review": generate_review,
    "bio": generate_bio,
}


def generate_corpus(n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[Document]:
    """Generate ``n`` documents, deterministically given ``seed``.

    Each document's kind is drawn uniformly from ``kinds``.

    :param n: number of documents.
    :param seed: seed of the private :class:`random.Random` used.
    :param kinds: the document kinds to draw from, among ``"review"`` and
        ``"bio"``.
    :return: the list of documents.
    :raises ValueError: if ``n`` is negative, ``kinds`` is empty or names an
        unknown kind.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds must not be empty")
    unknown = sorted(set(kinds) - set(_GENERATORS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; expected some of {list(_GENERATORS)}")
    rng = random.Random(seed)
    return [_GENERATORS[rng.choice(kinds)](rng) for _ in range(n)]


def _template_words(templates: Sequence[str]) -> set[str]:
    """The literal (non-placeholder) words of ``templates``."""
    return {w for t in templates for w in t.split() if not re.fullmatch(r"\{\w+\}", w)}


def vocabulary() -> list[str]:
    """Every word the grammar can emit, punctuation and kind names included.

    :return: the sorted list of distinct words.
    """
    templates = [
        *_OPENINGS,
        *_CLAUSES,
        *(t for ts in _OFFENSIVE_CLAUSES.values() for t in ts),
        *(t for ts in _CLOSERS.values() for t in ts),
        *_BIO_INTROS,
        *_BIO_FACTS,
    ]
    words = _template_words(templates) | {".", ",", ":", "a", "an", *KINDS}
    for group in (
        POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS, OFFENSIVE_WORDS, PRODUCTS,
        ASPECTS, INTENSIFIERS, FEMALE_NAMES, MALE_NAMES, PROFESSIONS, CITIES,
        HOBBIES, _PETS, _RELATIVES, _COUNTS, _AGES,
        *_VERBS.values(), *PRONOUNS.values(),
    ):  # fmt: skip
        words.update(group)
    return sorted(words)
