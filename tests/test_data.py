"""Tests of the synthetic corpus and of the bundled tiny model built from it."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from pyro_lm.data import (
    FEMALE_NAMES,
    FEMALE_RATE,
    MALE_NAMES,
    NEGATIVE_WORDS,
    OFFENSIVE_RATES,
    OFFENSIVE_WORDS,
    POSITIVE_WORDS,
    PRONOUNS,
    SENTIMENT_RATES,
    generate_corpus,
    vocabulary,
)

TINYLM = Path(__file__).resolve().parents[1] / "models" / "tinylm"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _within_binomial(successes: int, n: int, p: float, n_se: float = 4.0) -> bool:
    """Whether ``successes / n`` is within ``n_se`` standard errors of ``p``."""
    return abs(successes / n - p) <= n_se * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(4000, seed=0)


def test_corpus_is_deterministic_given_seed():
    assert generate_corpus(300, seed=7) == generate_corpus(300, seed=7)
    assert generate_corpus(300, seed=7) != generate_corpus(300, seed=8)


def test_global_random_state_is_untouched():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_corpus(100, seed=1)
    assert random.random() == expected


def test_kinds_restrict_and_validate():
    assert {d.kind for d in generate_corpus(100, seed=0, kinds=("bio",))} == {"bio"}
    assert {d.kind for d in generate_corpus(100, seed=0, kinds=("review",))} == {"review"}
    with pytest.raises(ValueError):
        generate_corpus(10, kinds=("poem",))
    with pytest.raises(ValueError):
        generate_corpus(10, kinds=())


def test_document_format(corpus):
    assert {d.kind for d in corpus} == {"review", "bio"}
    for doc in corpus:
        assert doc.text.startswith(f"{doc.kind} : ")
        assert doc.text == doc.text.lower()
        assert doc.text.endswith(" .")
        assert "  " not in doc.text
        assert f"{doc.kind} : {doc.body}" == doc.text
        assert 6 <= len(doc.body.split()) <= 25


def test_review_labels_match_text(corpus):
    reviews = [d for d in corpus if d.kind == "review"]
    offensive = set(OFFENSIVE_WORDS)
    for doc in reviews:
        words = set(doc.words)
        assert doc.labels["offensive"] == bool(words & offensive), doc.text
        assert doc.labels["product"] in words
        if doc.labels["sentiment"] == "positive":
            assert not words & set(NEGATIVE_WORDS), doc.text
        if doc.labels["sentiment"] == "negative":
            assert not words & set(POSITIVE_WORDS), doc.text


def test_review_label_rates(corpus):
    reviews = [d for d in corpus if d.kind == "review"]
    for sentiment, rate in SENTIMENT_RATES.items():
        count = sum(d.labels["sentiment"] == sentiment for d in reviews)
        assert _within_binomial(count, len(reviews), rate)
    offensive_rate = sum(SENTIMENT_RATES[s] * OFFENSIVE_RATES[s] for s in SENTIMENT_RATES)
    assert offensive_rate == pytest.approx(0.15)
    count = sum(d.labels["offensive"] for d in reviews)
    assert _within_binomial(count, len(reviews), offensive_rate)


def test_bio_pronouns_and_names_match_gender(corpus):
    all_pronouns = {p for pair in PRONOUNS.values() for p in pair}
    for doc in (d for d in corpus if d.kind == "bio"):
        gender = doc.labels["gender"]
        used = set(doc.words) & all_pronouns
        assert used <= set(PRONOUNS[gender]), doc.text
        names = set(doc.words) & set(FEMALE_NAMES + MALE_NAMES)
        assert names == {doc.labels["name"]}
        assert doc.labels["name"] in (FEMALE_NAMES if gender == "female" else MALE_NAMES)
        assert doc.labels["profession"] in doc.words


def test_female_rate():
    assert FEMALE_RATE == 0.25
    bios = generate_corpus(2000, seed=0, kinds=("bio",))
    female = sum(d.labels["gender"] == "female" for d in bios)
    assert _within_binomial(female, len(bios), FEMALE_RATE)


def test_vocabulary_covers_corpus(corpus):
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    assert 150 <= len(vocab) <= 300
    assert {w for d in corpus for w in d.words} <= set(vocab)


@pytest.fixture(scope="module")
def tinylm():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINYLM, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINYLM, local_files_only=True)
    model.eval()
    return tokenizer, model


def test_bundled_files_are_small():
    weights = TINYLM / "model.safetensors"
    assert weights.stat().st_size <= 5 * 1024 * 1024
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (TINYLM / name).is_file()


def test_bundled_tokenizer(tinylm):
    tokenizer, model = tinylm
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert ids + [tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS
    assert tokenizer.get_vocab() == {w: i for i, w in enumerate(SPECIAL_TOKENS + vocabulary())}
    assert model.config.vocab_size == len(tokenizer)
    text = "review : the blender is great ."
    words = tokenizer.encode(text, add_special_tokens=False)
    assert len(words) == len(text.split())
    assert tokenizer.decode(words) == text
    # the tokenizer itself starts a prompt with <bos>, as the model was trained
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *words]
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


