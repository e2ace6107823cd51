r"""Ready-made posterior programs for standard tasks.

The canonical program is the KL-regularised posterior

.. math:: p^*(x \mid c) \propto p_0(x \mid c)\, \exp(r(x) / \beta)

written as a Pyro model over a plate of prompts (:func:`reward_model`). The
task helpers build rewards for the bundled tiny LM's corpus
(:mod:`pyro_lm.data.grammar`): positive, non-offensive reviews and
biographies about women.

Example::

    prior = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path())
    model = reward_model(prior, positive_reviews_reward(prior.tokenizer), beta=0.5,
                         max_new_tokens=16)
    guide = pyro_lm.infer.AutoLMGuide(model, prior.trainable_copy())
"""

from __future__ import annotations

import math

import pyro
import torch

from pyro_lm.distributions.lm_distribution import LMDistribution
from pyro_lm.rewards import Callable, Lexicon

__all__ = ["reward_model", "positive_reviews_reward", "detox_reward", "female_bio_feature",
           "task_prompt", "corpus_text", "REVIEW_PROMPT", "BIO_PROMPT"]

#: The prompts of the word-level bundled LM (``models/tinylm``); see :func:`task_prompt`.
REVIEW_PROMPT = "review :"
BIO_PROMPT = "bio :"


def _word_level(lm) -> bool:
    tokenizer = getattr(lm, "tokenizer", lm)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def corpus_text(lm, text: str) -> str:
    """Corpus text (as the grammar writes it, ``"review : the blender is"``) as the bundled
    LM ``lm`` was trained on it.

    The word-level ``models/tinylm`` reads the corpus as written by the grammar; a subword
    LM such as ``models/tinylm-bpe`` was trained on it as prose (:func:`pyro_lm.data.prose`:
    ``"Review: The blender is"``).

    >>> corpus_text(pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe")),
    ...             "review : the blender is")  # doctest: +SKIP
    'Review: The blender is'

    :param lm: a :class:`~pyro_lm.CausalLM` (or its tokenizer).
    :param str text: space-tokenised, lower-case corpus text.
    """
    from pyro_lm.data.prose import prose

    if not isinstance(text, str):
        raise TypeError(f"text: expected a string of corpus text, got {type(text).__name__}")
    return text if _word_level(lm) else prose(text)


def task_prompt(lm, kind: str = "review") -> str:
    """The prompt that starts a corpus document of ``kind`` for a bundled LM:
    ``"review :"`` for the word-level LM, ``"Review:"`` for a subword one
    (:func:`corpus_text`).

    :param lm: a :class:`~pyro_lm.CausalLM` (or its tokenizer).
    :param str kind: ``"review"`` or ``"bio"``.
    """
    if kind not in ("review", "bio"):
        raise ValueError(f"kind: expected 'review' or 'bio', got {kind!r}")
    return corpus_text(lm, f"{kind} :")


def reward_model(prior, reward, beta: float, max_new_tokens: int, site: str = "x",
                 factor: str = "reward"):
    r"""The posterior program ``model(prompts)`` for a prior LM, a reward and a temperature.

    :param prior: the prior :class:`~pyro_lm.CausalLM`.
    :param reward: a callable ``x -> (*batch,)`` (see :mod:`pyro_lm.rewards`).
    :param float beta: temperature :math:`\beta > 0`; smaller trusts the reward more.
    :param int max_new_tokens: completion length ``T``.
    :returns: a function of a list of prompt strings (or a LongTensor of ids).
    """
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta: must be a finite number > 0, got {beta!r}; the posterior is "
                         "p0(x) exp(r(x)/beta), so beta -> 0 maximises the reward and "
                         "beta -> inf returns the prior")

    def model(prompts):
        n = 1 if isinstance(prompts, str) else len(prompts)
        with pyro.plate("prompts", n):
            x = pyro.sample(site, LMDistribution(prior, prompts if not isinstance(prompts, str)
                                                 else [prompts], max_new_tokens))
            pyro.factor(factor, reward(x) / beta)
            return x

    model.prior, model.reward, model.beta = prior, reward, beta
    return model


def positive_reviews_reward(tokenizer, offensive: float = -3.0) -> Lexicon:
    """+1 per positive word, −1 per negative word, ``offensive`` per offensive word
    (``-inf`` makes "no offensive words" a hard constraint; keep it finite for
    score-function training such as :class:`~pyro_lm.infer.SequenceELBO`)."""
    from pyro_lm.data import NEGATIVE_WORDS, OFFENSIVE_WORDS, POSITIVE_WORDS

    weights = {w: 1.0 for w in POSITIVE_WORDS}
    weights.update({w: -1.0 for w in NEGATIVE_WORDS})
    weights.update({w: offensive for w in OFFENSIVE_WORDS})
    return Lexicon(tokenizer, weights, name="positive_reviews")


def detox_reward(tokenizer, penalty: float = -math.inf) -> Lexicon:
    """``penalty`` per offensive word of the bundled corpus (default: forbidden)."""
    from pyro_lm.data import OFFENSIVE_WORDS

    return Lexicon(tokenizer, {w: penalty for w in OFFENSIVE_WORDS}, name="detox")


def female_bio_feature(lm) -> Callable:
    """Indicator ``phi(x)`` that a biography is about a woman (a female name, "she"
    or "her" among its content tokens): a moment-constraint feature, values in {0, 1}."""
    from pyro_lm.data import FEMALE_NAMES

    words = set(FEMALE_NAMES) | {"she", "her"}
    lexicon = Lexicon(lm.tokenizer, {w: 1.0 for w in words}, name="female_words")

    def is_female(x: torch.Tensor) -> torch.Tensor:
        return (lexicon(x) > 0).float()

    return Callable(is_female, name="female_bio")
