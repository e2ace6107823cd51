"""Regex, Grammar and JSONSchema constraints on tiny byte-level BPE tokenizers: the factor
against brute-force membership on every completion and prefix, and the batched mask
against the factor."""

import itertools
import json
import math
import re

import pytest
import torch
from constraint_lms import JSON_PIECES, TEXT_PIECES, tiny_bpe_lm

import pyro_lm
from pyro_lm.constraints import Grammar, JSONSchema, Regex
from pyro_lm.distributions import prefix_context
from pyro_lm.lm import toy_lm

T = 3
REGEX = "(a|b)+( a)?é?"
LARK = 'start: "a" start "b" | "é"'  # a^n é b^n: no regular expression
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}


def in_regex(text: str) -> bool:
    return re.fullmatch(REGEX, text) is not None


def in_grammar(text: str) -> bool:
    n = len(text) - len(text.lstrip("a"))
    return text == "a" * n + "é" + "b" * n


def in_schema(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return (isinstance(doc, dict) and set(doc) == {"n"} and isinstance(doc["n"], int)
            and not isinstance(doc["n"], bool) and text == json.dumps(doc, separators=(",", ":")))


@pytest.fixture(scope="module")
def text_lm():
    """Two EOS ids (0 and 1), a model with one embedding row more than the tokenizer."""
    return tiny_bpe_lm(TEXT_PIECES, extra_rows=1, eos_ids=[0, 1], specials=("<eos>", "<end>"))


@pytest.fixture(scope="module")
def json_lm():
    return tiny_bpe_lm(JSON_PIECES, extra_rows=1)


def make(kind, text_lm, json_lm):
    if kind == "regex":
        return text_lm, Regex(text_lm, REGEX), in_regex
    if kind == "grammar":
        return text_lm, Grammar(text_lm, LARK), in_grammar
    return json_lm, JSONSchema(json_lm, SCHEMA), in_schema


def text_of(lm, row):
    """The bytes of a row's content (up to its first EOS), as UTF-8, or ``None`` if it is
    not UTF-8 or holds an id the tokenizer lacks."""
    pieces = []
    for tok in row:
        if tok in lm.eos_token_ids:
            break
        if tok >= len(lm.tokenizer):
            return None
        pieces.append(lm.tokenizer.convert_ids_to_tokens(tok))
    data = bytes(pyro_lm.lm.token_bytes.byte_decoder()[c] for p in pieces for c in p)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def member_texts(lm, member, depth):
    """The byte strings of the members that at most ``depth`` tokens spell."""
    content = [t for t in range(len(lm.tokenizer)) if t not in lm.eos_token_ids]
    found = set()
    for k in range(depth + 1):
        for row in itertools.product(content, repeat=k):
            text = text_of(lm, list(row))
            if text is not None and member(text):
                found.add(text.encode())
    return found


def prefix_bytes(lm, prefix):
    """The bytes of a prefix, or ``None`` if it holds an id the tokenizer lacks."""
    if any(t >= len(lm.tokenizer) for t in prefix):
        return None
    table = pyro_lm.lm.token_bytes.byte_decoder()
    return bytes(table[c] for t in prefix for c in lm.tokenizer.convert_ids_to_tokens(t))


@pytest.mark.parametrize("kind", ["regex", "grammar", "json"])
def test_factor_is_membership_on_completions(kind, text_lm, json_lm):
    lm, c, member = make(kind, text_lm, json_lm)
    support = pyro_lm.LMDistribution(lm, torch.tensor([[0]]), T).enumerate_support()[:, 0]
    values = c(support)
    expected = [member(text) if (text := text_of(lm, row)) is not None else False
                for row in support.tolist()]
    assert values.dtype == torch.float32 and set(values.tolist()) <= {0.0, -math.inf}
    assert (values == 0).tolist() == expected
    assert any(expected), "the test needs valid completions"


@pytest.mark.parametrize("kind", ["regex", "grammar", "json"])
def test_factor_on_prefixes_is_exact(kind, text_lm, json_lm):
    """On a prefix, -inf exactly when no text of the language extends it."""
    lm, c, member = make(kind, text_lm, json_lm)
    ids = range(lm.vocab_size)  # the extra embedding row included
    eos = set(lm.eos_token_ids)
    members = member_texts(lm, member, T + 2)  # a prefix of T - 1 tokens and 3 more
    for t in range(1, T):
        rows = [list(p) + [0] * (T - t) for p in itertools.product(ids, repeat=t)
                if not eos & set(p)]
        with prefix_context(t):
            values = c(torch.tensor(rows))
        for row, value in zip(rows, values.tolist(), strict=True):
            data = prefix_bytes(lm, row[:t])
            viable = data is not None and any(m.startswith(data) for m in members)
            assert (value == 0) == viable, (kind, row[:t], value)


@pytest.mark.parametrize("kind", ["regex", "grammar", "json"])
def test_mask_agrees_with_factor(kind, text_lm, json_lm):
    """After every prefix, the mask allows token v exactly where the factor of the prefix
    extended by v is 0 (for EOS: where the prefix's text is in the language); ids beyond
    the tokenizer are never allowed."""
    lm, c, _ = make(kind, text_lm, json_lm)
    vocab, eos = lm.vocab_size, lm.eos_token_ids
    for t in range(T):
        prefixes = [list(p) for p in itertools.product(range(vocab), repeat=t)
                    if not set(eos) & set(p)]
        state = c.state(len(prefixes), torch.device("cpu"))
        for k in range(t):
            state.advance(torch.tensor([p[k] for p in prefixes]))
        allowed = state.allowed()
        assert allowed.shape == (len(prefixes), vocab)
        assert not allowed[:, len(lm.tokenizer):].any()
        # one padding column more, so that the prefix of length t + 1 is never complete
        rows = torch.tensor([p + [v] + [0] * (T - t) for p in prefixes for v in range(vocab)])
        with prefix_context(t + 1):
            factor = c(rows).view(len(prefixes), vocab)
        assert torch.equal(allowed, factor == 0), (kind, t)


def test_state_follows_reordering(text_lm):
    c = Regex(text_lm, REGEX)
    state = c.state(3, torch.device("cpu"))
    state.advance(torch.tensor([3, 5, 4]))  # "b", " " (no string starts so: dead), "ab"
    before = state.allowed()
    assert not before[1].any() and before[0].any()
    state.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(state.allowed(), before[[2, 2, 0]])
    state.advance(torch.tensor([9, 3, 6]))  # the two copies of "ab" diverge: "abé", "abb"
    allowed = state.allowed()
    assert allowed[0].nonzero().flatten().tolist() == [0, 1]  # only EOS after "é"
    assert allowed[1, 2] and not allowed[0, 2]
    assert state.valid().tolist() == [True, True, True]  # "abé", "abb", "b a"
    state.advance(torch.tensor([0, 7, 1]))  # EOS, a cut "é", the other EOS
    assert state.valid().tolist() == [True, False, True]
    assert not state.allowed()[[0, 2]].any()  # ended rows allow nothing


def test_errors(text_lm, json_lm):
    with pytest.raises(ValueError, match="pattern"):
        Regex(text_lm, "(a")
    with pytest.raises(ValueError, match="lark_text"):
        Grammar(text_lm, "start: undefined_rule")
    with pytest.raises(ValueError, match="schema"):
        JSONSchema(text_lm, "{not json")
    with pytest.raises(ValueError, match=r"schema \(or options\): llguidance refuses"):
        JSONSchema(json_lm, {"type": "string"}, options={"nonsense": 1})
    with pytest.raises(TypeError, match=r"schema\['x-guidance'\]: expected a dict"):
        JSONSchema(json_lm, {"type": "string", "x-guidance": 3})
    with pytest.raises(TypeError, match="lm"):
        Regex(text_lm.tokenizer, "a")
    with pytest.raises(ValueError, match="word-level"):
        Regex(toy_lm(vocab_size=4), "t1")
    with pytest.raises(ValueError, match="another tokenizer"):
        Regex(text_lm, "a").check_lm(json_lm)
