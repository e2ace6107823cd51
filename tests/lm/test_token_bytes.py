"""pyro_lm.lm.token_bytes: each token's bytes spell what ``tokenizer.decode`` gives."""

import random

import pytest
from realistic import train_tokenizer

from pyro_lm.lm import toy_tokenizer
from pyro_lm.lm.token_bytes import (
    byte_decoder,
    byte_fallback_ids,
    byte_kind,
    decoder_types,
    special_token_ids,
    token_bytes,
)

TEXTS = ["Hello, wörld!", "東京 🙂 costs 5 €", "a  b\n\tc"]


@pytest.fixture(scope="module", params=["gpt2", "mistral"])
def tok(request):
    return train_tokenizer(request.param)


def spelled(tok, ids, skip=True):
    """The text the tokens' bytes spell, as the tokenizer writes it: after an anchor
    token, since SentencePiece decoders strip the first piece's leading space."""
    anchor = tok.convert_tokens_to_ids("a")
    head = tok.decode([anchor], skip_special_tokens=skip)
    text = tok.decode([anchor] + ids, skip_special_tokens=skip)
    assert text.startswith(head)
    return b"".join(token_bytes(tok, ids, skip_special_tokens=skip)), text[len(head):]


@pytest.mark.parametrize("arch, kind", [("gpt2", "byte_level"), ("mistral", "byte_fallback")])
def test_byte_kind(arch, kind):
    tok = train_tokenizer(arch)
    assert byte_kind(tok) == kind
    assert decoder_types(tok) is decoder_types(tok)  # read once per tokenizer
    assert byte_kind(toy_tokenizer(5)) is None


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_token_bytes_spell_the_decoded_text(tok, text, skip):
    ids = [tok.bos_token_id or tok.eos_token_id] + tok(text, add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    data, decoded = spelled(tok, ids, skip)
    assert data.decode("utf-8") == decoded
    if skip:
        assert decoded.lstrip(" ") == text


def test_a_cut_character_leaves_its_first_bytes(tok):
    ids = tok("東京ꙮ", add_special_tokens=False)["input_ids"]
    pieces = token_bytes(tok, ids)
    assert b"".join(pieces).decode("utf-8").lstrip(" ") == "東京ꙮ"
    data = b"".join(pieces[:-1])
    head = data.decode("utf-8", "ignore")
    tail = data[len(head.encode()):]
    assert head.lstrip(" ") == "東京" and tail and "ꙮ".encode().startswith(tail)
    assert tok.decode(ids[:-1]).endswith("\ufffd")


def test_every_token_and_random_sequences(tok):
    everything = token_bytes(tok)
    assert len(everything) == len(tok)
    assert all(everything[i] == b"" for i in special_token_ids(tok))
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 6))]
        data, decoded = spelled(tok, ids)
        if byte_kind(tok) == "byte_level":  # invalid bytes: U+FFFD as from_utf8_lossy
            assert data.decode("utf-8", "replace") == decoded
        elif not set(ids) & byte_fallback_ids(tok):
            assert data.decode("utf-8") == decoded


def test_byte_fallback_pieces():
    tok = train_tokenizer("mistral")
    ids = byte_fallback_ids(tok)
    assert len(ids) == 256
    assert sorted(b for i in ids for b in token_bytes(tok, [i])[0]) == list(range(256))
    assert byte_fallback_ids(train_tokenizer("gpt2")) == set()


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_added_tokens(arch):
    tok = train_tokenizer(arch)
    tok.add_tokens(["a\u2581b", "<new>"])
    tok.add_tokens(["<special>"], special_tokens=True)
    ids = tok.convert_tokens_to_ids(["a", "a\u2581b", "<new>", "<special>", "a"])
    for skip in (True, False):
        data, decoded = spelled(tok, ids, skip)
        assert data.decode("utf-8") == decoded


def test_word_level_tokens_are_text():
    tok = toy_tokenizer(5)
    assert token_bytes(tok) is None
    assert tok.decode([1, 2, 3]) == "t1 t2 t3"


def test_byte_decoder_is_gpt2s_alphabet():
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")
