"""Lexicon on subword tokenizers: both modes equal a whole-word count of the decoded text.

Byte-level BPE (GPT-2 convention) and SentencePiece-style pieces with byte fallback
(Mistral convention), trained on the corpus as prose (``tests/realistic.py``); canonical
and random non-canonical tokenizations; every prefix inside ``prefix_context``.
"""

import math
import random
import re

import pytest
import torch
from realistic import UNICODE_LINES, train_tokenizer

from pyro_lm.data import generate_corpus, prose, vocabulary
from pyro_lm.distributions import prefix_context
from pyro_lm.lm import toy_tokenizer
from pyro_lm.rewards import Lexicon
from pyro_lm.rewards.incremental import RewardStates

ARCHS = ["gpt2", "mistral"]
MODES = ["tokens", "text"]
PHRASES = {"one star": -3.0, "worth every penny": 2.0, "is a": 0.5, "she likes": 1.5}


@pytest.fixture(scope="module")
def sentences():
    return [prose(d.text) for d in generate_corpus(300, seed=123)] + list(UNICODE_LINES)


@pytest.fixture(scope="module")
def weights():
    rng = random.Random(0)
    words = [w for w in vocabulary() if re.fullmatch(r"\w+", w)]
    out = {w: rng.choice([1.0, -1.0, 2.0, -0.5, 0.25]) for w in words}
    out.update(PHRASES)
    out.update({"café": 4.0, "zürich": -4.0, "東京": 8.0})
    return out


def occurrences(text, weights):
    """``(end, weight)`` of each key's occurrence in ``text``: words by ``\\w+`` on the
    lower-cased text, a phrase by a window of words; ``end`` is where its last word ends."""
    keys = {tuple(re.findall(r"\w+", k.lower())): w for k, w in weights.items()}
    spans = [(m.group().lower(), m.end()) for m in re.finditer(r"\w+", text)]
    words = [w for w, _ in spans]
    return [(spans[i + len(k) - 1][1], w) for k, w in keys.items()
            for i in range(len(words) - len(k) + 1) if tuple(words[i:i + len(k)]) == k]


def reference(text, weights):
    """The whole-word count of ``text``."""
    return sum(w for _, w in occurrences(text, weights))


def reference_on_prefix(found, decided):
    """The count on a prefix whose decided text is ``decided``, given the ``occurrences``
    in the final text: the keys whose last word ends before ``decided`` does (a later
    character shows that the word ended)."""
    return sum(w for end, w in found if end < len(decided))


def pieces(tok, text):
    """``text`` as the tokenizer's vocabulary spells it, and whether a piece is a byte."""
    if tok.convert_ids_to_tokens(tok("a b", add_special_tokens=False)["input_ids"])[-1][0] == "▁":
        return "▁" + text.replace(" ", "▁")
    from pyro_lm.lm.token_bytes import byte_decoder

    to_char = {b: c for c, b in byte_decoder().items()}
    return "".join(to_char[b] for b in text.encode("utf-8"))


def random_tokenization(tok, text, rng):
    """Random (mostly non-canonical) ids whose decoding is ``text``: at each position a
    random vocabulary piece that matches there, or (SentencePiece) the character's bytes."""
    vocab = tok.get_vocab()
    s, out, i = pieces(tok, text), [], 0
    longest = max(map(len, vocab))
    while i < len(s):
        options = [s[i:j] for j in range(i + 1, min(len(s), i + longest) + 1) if s[i:j] in vocab]
        if not options or ("<0x41>" in vocab and rng.random() < 0.1):
            char = s[i].replace("▁", " ")
            out += [vocab[f"<0x{b:02X}>"] for b in char.encode("utf-8")]
            i += 1
            continue
        piece = rng.choice(options)
        out.append(vocab[piece])
        i += len(piece)
    return out


def batch(rows, fill):
    big_t = max(map(len, rows)) + 1
    return torch.tensor([r + [fill] * (big_t - len(r)) for r in rows])


def encodings(tok, sentences, canonical):
    rng = random.Random(1)
    if canonical:
        return [tok(s, add_special_tokens=False)["input_ids"] for s in sentences]
    return [random_tokenization(tok, s, rng) for s in sentences]


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical", "non-canonical"])
@pytest.mark.parametrize("arch", ARCHS)
def test_both_modes_count_whole_words_of_the_text(arch, canonical, sentences, weights):
    tok = train_tokenizer(arch)
    rows = encodings(tok, sentences, canonical)
    if not canonical:
        assert sum(r != c for r, c in zip(rows, encodings(tok, sentences, True), strict=True)) > 250
    want = torch.tensor([reference(tok.decode(r, skip_special_tokens=True), weights)
                         for r in rows])
    x = batch(rows, tok.eos_token_id)
    for mode in MODES:
        got = Lexicon(tok, weights, mode=mode)(x)
        bad = (got != want).nonzero()[:, 0].tolist()
        assert not bad, (mode, len(bad), [tok.decode(rows[i]) for i in bad[:3]],
                         got[bad[:3]], want[bad[:3]])


@pytest.mark.parametrize("arch", ARCHS)
def test_on_prefixes_a_word_counts_once_it_has_ended(arch, sentences, weights):
    tok = train_tokenizer(arch)
    rows = encodings(tok, sentences[::5], canonical=False)
    rows[0] = tok(" café 東京 naïve", add_special_tokens=False)["input_ids"]  # multi-byte chars
    x = batch(rows, tok.eos_token_id)
    lexicons = [Lexicon(tok, weights, mode=mode) for mode in MODES]
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    finals = [tok.decode(r) for r in rows]
    found = [occurrences(f, weights) for f in finals]
    states = RewardStates()  # the incremental form, token by token, must say the same
    for t in range(1, x.shape[1]):
        prefix = x.clone()
        prefix[:, t:] = tok.eos_token_id
        want = []
        for r, final, occ in zip(rows, finals, found, strict=True):
            if t > len(r):  # EOS emitted: complete
                want.append(sum(w for _, w in occ))
                continue
            k = t  # a trailing run of byte pieces is not decided yet
            while k > 0 and re.fullmatch(r"<0x..>", vocab[r[k - 1]]):
                k -= 1
            decided = tok.decode(r[:k]).rstrip("\ufffd")
            assert final.startswith(decided)
            want.append(reference_on_prefix(occ, decided))
        with prefix_context(t):
            for lex in lexicons:
                got = lex(prefix)
                assert got.tolist() == want, (t, lex.mode)
            with states:
                states.begin()
                assert lexicons[0](prefix).tolist() == want, (t, "incremental")
    assert states.hits == x.shape[1] - 1  # every prefix was read from the state


@pytest.mark.parametrize("arch", ARCHS)
def test_random_token_sequences_score_alike_in_both_modes(arch):
    """Arbitrary ids: characters cut between tokens, invalid UTF-8, byte-fallback runs."""
    tok = train_tokenizer(arch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(len(tok), (400, 8), generator=gen)
    words = {"the": 1.0, "a": -1.0, "e": 0.5, "is": 2.0, "st": -2.0, "on e": 3.0, "東": 4.0}
    tokens, text = (Lexicon(tok, words, mode=m) for m in MODES)
    assert torch.equal(tokens(x), text(x))
    states = RewardStates()
    for t in range(8):
        with prefix_context(t):
            assert torch.equal(tokens(x), text(x)), t
            with states:
                states.begin()
                assert torch.equal(tokens(x.masked_fill(torch.arange(8) >= t, 0)),
                                   text(x.masked_fill(torch.arange(8) >= t, 0))), t
    assert states.hits == 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_the_words_the_old_token_patterns_got_wrong(arch, mode):
    tok = train_tokenizer(arch)
    lex = Lexicon(tok, {"great": 1.0, "is": 10.0, "sturdy": 100.0, "one star": -1000.0},
                  mode=mode)
    texts = [" greatest", " disappointing", " This", " Great", "Great!", "This heater is sturdy.",
             " GREAT great", " One star.", " one  star", " one, star", " stars one"]
    x = batch([tok(s, add_special_tokens=False)["input_ids"] for s in texts], tok.eos_token_id)
    assert lex(x).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 110.0, 2.0, -1000.0, -1000.0, -1000.0,
                               0.0]
    exact = Lexicon(tok, {"Great": 1.0}, mode=mode, case_sensitive=True)
    assert exact(x[3:7]).tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_forbidden_word_does_not_fire_on_a_longer_word_s_prefix(arch, mode):
    tok = train_tokenizer(arch)
    lex = Lexicon(tok, {"the": -math.inf}, mode=mode)
    the, y, dot = (tok.convert_tokens_to_ids(tok.tokenize(s)[-1]) for s in (" the", "they", "."))
    eos = tok.eos_token_id
    x = torch.tensor([[the, y, eos], [the, dot, eos], [the, eos, eos]])
    with prefix_context(1):  # " the": may become " they"
        assert lex(x).tolist() == [0.0, 0.0, 0.0]
    with prefix_context(2):  # " they" (open), " the." (ended), " the" + EOS (complete)
        assert lex(x).tolist() == [0.0, -math.inf, -math.inf]
    assert lex(x).tolist() == [0.0, -math.inf, -math.inf]


def test_word_level_tokenizers_count_a_word_at_once_on_prefixes(tiny_lm):
    """Tokens that each start a word (joined by spaces): no token continues a word."""
    r = Lexicon(tiny_lm.tokenizer, {"t1": 1.0, "t1 t2": 5.0}, mode="text")
    x = torch.tensor([[1, 2, 0, 0]])
    with prefix_context(1):
        assert r(x).tolist() == [1.0]
    with prefix_context(2):
        assert r(x).tolist() == [6.0]
    words = toy_tokenizer(12)
    r = Lexicon(words, {"t1": 1.0, "t10": 2.0})  # "t1" is not part of "t10"
    assert r(torch.tensor([[10, 1, 11, 0]])).tolist() == [3.0]


def test_bundled_word_level_tokenizer_counts_as_before():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("models/tinylm")
    weights = {"great": 1.0, "awful": -1.0, "is": 0.5}
    texts = ["review : the blender is great .", "the kettle is awful , awful", "great"]
    x = batch([tok(s, add_special_tokens=False)["input_ids"] for s in texts], tok.eos_token_id)
    for mode in MODES:
        assert Lexicon(tok, weights, mode=mode)(x).tolist() == [1.5, -1.5, 1.0]


@pytest.mark.parametrize("weights", [{"great": 1.0, "awful": -math.inf, "is": 0.5},
                                     {"great": 1.0, "is great": 3.0, "one star": -2.0}],
                         ids=["words", "phrases"])
def test_word_level_fast_path_agrees_with_text_mode(weights):
    """On a word-level tokenizer token mode reads a weight (or word id) per token; it must
    give text mode's values on corpus documents, whole and on every prefix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("models/tinylm")
    fast, text = (Lexicon(tok, weights, mode=m) for m in ("tokens", "text"))
    assert fast._tables(torch.device("cpu"))[-1] is not None  # the per-token path is taken
    docs = [d.text for d in generate_corpus(100, seed=3)] + ["it is great one star"]
    x = batch([tok(s, add_special_tokens=False)["input_ids"] for s in docs], tok.eos_token_id)
    assert torch.equal(fast(x), text(x))
    for t in (1, 3, 7, 12):
        with prefix_context(t):
            assert torch.equal(fast(x), text(x))


@pytest.mark.parametrize("mode", MODES)
def test_device_and_batch_shape(device, mode):
    tok = train_tokenizer("gpt2")
    lex = Lexicon(tok, {"sturdy": 1.0, "one star": 2.0}, mode=mode)
    ids = tok(" sturdy. One star", add_special_tokens=False)["input_ids"]
    x = torch.tensor(ids + [tok.eos_token_id], device=device)
    out = lex(x.expand(2, 3, -1))
    assert out.shape == (2, 3) and out.device.type == device.type
    assert out.dtype == torch.float32 and (out == 3.0).all()


def test_errors_name_the_argument():
    tok = train_tokenizer("gpt2")
    with pytest.raises(ValueError, match=r"weights\['great'\] is \+inf"):
        Lexicon(tok, {"great": math.inf})
    with pytest.raises(ValueError, match="keys 'Great' and 'great' are the same words "
                                         "ignoring case"):
        Lexicon(tok, {"Great": 1.0, "great": 2.0})
    Lexicon(tok, {"Great": 1.0, "great": 2.0}, case_sensitive=True)
    with pytest.raises(ValueError, match="keys must be words or phrases of words, got '!!'"):
        Lexicon(tok, {"!!": 1.0})
    with pytest.raises(TypeError, match=r"weights\['great'\]: expected a number"):
        Lexicon(tok, {"great": "high"})
    with pytest.raises(ValueError, match="mode: expected 'tokens' or 'text'"):
        Lexicon(tok, {"great": 1.0}, mode="words")
