"""The ready-made programs' prompts for each bundled LM."""

import pytest

from pyro_lm.lm import toy_tokenizer
from pyro_lm.programs import task_prompt


def test_task_prompt_follows_the_tokenizer(tiny_lm):
    from realistic import train_tokenizer

    word_level = toy_tokenizer(4)  # a WordLevel backend, like models/tinylm's
    assert type(word_level.backend_tokenizer.model).__name__ == "WordLevel"
    assert task_prompt(word_level) == "review :" and task_prompt(tiny_lm, "bio") == "bio :"
    subword = train_tokenizer("gpt2")
    assert task_prompt(subword) == "Review:" and task_prompt(subword, "bio") == "Bio:"
    with pytest.raises(ValueError, match="kind: expected 'review' or 'bio'"):
        task_prompt(subword, "poem")


def test_corpus_text_is_prose_for_a_subword_lm():
    from realistic import train_tokenizer

    from pyro_lm.programs import corpus_text

    text = "review : the blender is great and i like it ."
    assert corpus_text(toy_tokenizer(4), text) == text
    want = "Review: The blender is great and I like it."
    assert corpus_text(train_tokenizer("gpt2"), text) == want
    with pytest.raises(TypeError, match="text: expected a string"):
        corpus_text(toy_tokenizer(4), ["review :"])
