"""check_prefix_contract: good rewards pass, bad ones are named with the prefix at fault."""

import math
import re

import pytest
import torch
from realistic import train_tokenizer

from pyro_lm.distributions import prefix_context
from pyro_lm.distributions.prefix import prefix_length
from pyro_lm.rewards import (
    Callable,
    Lexicon,
    PrefixContractError,
    Regex,
    check_prefix_contract,
)
from pyro_lm.rewards.base import decode_counted

TEXTS = [" they", " the.", " the", " theatre is there", " idiot!", " idiotic", " an idiot",
         " One star.", " one starry night", " Then the end"]


@pytest.fixture(scope="module")
def completions():
    """:data:`TEXTS` on the byte-level BPE, padded with EOS after a first EOS; the last
    row is truncated (no EOS)."""
    tok = train_tokenizer("gpt2")
    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in TEXTS]
    big_t = max(map(len, rows)) + 1
    x = torch.tensor([r + [tok.eos_token_id] * (big_t - len(r)) for r in rows])
    x[-1, -1] = tok.convert_tokens_to_ids("s")
    return tok, x


def naive_forbidden_word(tok, word):
    """Decodes each prefix and forbids ``word`` as soon as it shows: wrong on prefixes."""
    def forward(x):
        texts = decode_counted(tok, x, tok.eos_token_id)
        return torch.tensor([-math.inf if word in re.findall(r"\w+", t.lower()) else 0.0
                             for t in texts])

    return Callable(forward, name=f"naive no {word!r}")


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_lexicon_keeps_the_contract(completions, mode):
    tok, x = completions
    lex = Lexicon(tok, {"the": -math.inf, "one star": -math.inf, "idiot": -math.inf,
                        "there": 1.0}, mode=mode)
    assert check_prefix_contract(lex, x) == x.numel()


def test_regex_keeps_the_contract_in_its_documented_uses(completions, tiny_lm):
    tok, x = completions
    uses = [
        Regex(tok, r"\b(idiot|the)\b", match=-math.inf, monotone=True),  # forbid, pruned early
        Regex(tok, r"\bthe\b", match=0.0, no_match=-math.inf),  # require: only at the end
        Regex(tok, r"star", match=2.0, no_match=-1.0, monotone=True),  # a monotone bonus
        Regex(tok, r"idiot", match=-math.inf, no_match=0.0, monotone=True),
    ]
    for reward in uses:
        check_prefix_contract(reward, x)
    # word-level tokens: every token starts a word, so a match is final at once
    words = Regex(tiny_lm.tokenizer, r"\bt1\b", match=-math.inf, monotone=True)
    y = torch.tensor([[2, 1, 3], [1, 0, 0], [3, 3, 2]])
    check_prefix_contract(words, y)
    with prefix_context(2):
        assert words(y).tolist() == [-math.inf, -math.inf, 0.0]


def test_a_word_forbidden_before_it_has_ended_is_reported(completions):
    tok, x = completions
    with pytest.raises(PrefixContractError) as info:
        check_prefix_contract(naive_forbidden_word(tok, "the"), x, eos=tok.eos_token_id,
                              pad=tok.eos_token_id, tokenizer=tok)
    message = str(info.value)
    assert "reward \"naive no 'the'\" is -inf on the prefix" in message
    assert "' the') of length 1, but 0 on its completion" in message
    assert "' they')" in message and "no completion of it is allowed" in message


def test_a_pattern_that_is_not_monotone_is_reported():
    """A pattern anchored at the end is not monotone: " One star." matches, " One star. the"
    does not."""
    tok = train_tokenizer("gpt2")
    ids = tok(" One star. the", add_special_tokens=False)["input_ids"]
    end = Regex(tok, r"\.\Z", match=-math.inf, monotone=True, name="ends with a period")
    with pytest.raises(PrefixContractError, match=r"'ends with a period' is -inf on the prefix "
                       r".*' One star\.'\) of length \d+, but 0 on its completion"):
        check_prefix_contract(end, torch.tensor([ids + [tok.eos_token_id]]))


def test_nan_and_complete_prefixes_that_change_are_reported(completions):
    tok, x = completions

    def nan_on_prefixes(x):
        value = float("nan") if prefix_length() == 2 else 0.0
        return torch.full(x.shape[:-1], value)

    with pytest.raises(PrefixContractError, match="'nan_on_prefixes' is NaN on the prefix"):
        check_prefix_contract(Callable(nan_on_prefixes), x, eos=tok.eos_token_id,
                              pad=tok.eos_token_id)

    def length(x):
        t = prefix_length()
        return torch.full(x.shape[:-1], float(x.shape[-1] if t is None else t))

    with pytest.raises(PrefixContractError, match="on the complete prefix .* once EOS is "
                                                  "emitted the prefix is the completion"):
        check_prefix_contract(length, x, eos=tok.eos_token_id, pad=tok.eos_token_id)


def test_samples_from_an_lm(subword_lm):
    prompt = torch.tensor([[subword_lm.tokenizer.convert_tokens_to_ids(".")]])
    lex = Lexicon(subword_lm, {"the": -math.inf})
    assert check_prefix_contract(lex, lm=subword_lm, prompts=prompt, num_samples=32,
                                 max_new_tokens=3) == 32 * 3
    with pytest.raises(PrefixContractError, match="naive"):
        check_prefix_contract(naive_forbidden_word(subword_lm.tokenizer, "the"), lm=subword_lm,
                              prompts=prompt, num_samples=200, max_new_tokens=3)
    with pytest.raises(ValueError, match="completions: pass completions, or lm="):
        check_prefix_contract(lex, lm=subword_lm)
    with pytest.raises(ValueError, match="eos, pad: pass them"):
        check_prefix_contract(lambda x: x.sum(-1).float(), torch.zeros(2, 3, dtype=torch.long))
