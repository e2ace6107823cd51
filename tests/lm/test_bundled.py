"""Model-level tests of the bundled tiny LMs, through ``pyro_lm.CausalLM``.

Every test runs on both bundled models (:data:`pyro_lm.BUNDLED_MODELS`): ``tinylm`` reads
the space-tokenised corpus one word per token, ``tinylm-bpe`` reads the corpus as prose
(:func:`pyro_lm.data.prose`) with a byte-level BPE, so words take one or several tokens.
What a test checks is what a user of the model relies on: the tokenizer gives back the
corpus text, a prompt starts with exactly one BOS, the model prefers the corpus's grammar
and its samples read like corpus documents.
"""

from __future__ import annotations

import random

import pytest
import torch

import pyro_lm
from pyro_lm.data import generate_corpus, prose, unprose, vocabulary

#: Per bundled model: how it writes a corpus document ("review : ..." or "Review: ...").
WRITE = {"tinylm": lambda text: text, "tinylm-bpe": prose}
#: Completion lengths that hold most documents (tokens: words for tinylm, pieces for BPE).
MAX_NEW_TOKENS = {"tinylm": 30, "tinylm-bpe": 48}
#: Seed of held-out documents (the models were trained on ``generate_corpus(20000, seed=0)``).
HELDOUT_SEED = 12345

pytestmark = pytest.mark.parametrize("name", pyro_lm.BUNDLED_MODELS)


@pytest.fixture(scope="module")
def bundled():
    """``bundled(name)``: the bundled model ``name`` as a ``CausalLM``, loaded once."""
    loaded = {}

    def load(name: str) -> pyro_lm.CausalLM:
        if name not in loaded:
            loaded[name] = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(name))
        return loaded[name]

    return load


def _texts(name: str, n: int, seed: int = HELDOUT_SEED) -> list[str]:
    return [WRITE[name](d.text) for d in generate_corpus(n, seed=seed)]


def _doc_log_probs(lm: pyro_lm.CausalLM, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(document, EOS | BOS) of each text and its number of predicted tokens."""
    rows = [lm.tokenizer(t)["input_ids"] + [lm.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
    token_lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    return token_lp.masked_fill(~keep, 0.0).sum(-1), keep.sum(-1)


def test_bundled_model_path_lists_the_names(name):
    path = pyro_lm.bundled_model_path(name)
    assert path.name == name and (path / "model.safetensors").is_file()
    assert (path / "model.safetensors").stat().st_size <= 5 * 1024 * 1024  # small enough to commit
    with pytest.raises(FileNotFoundError, match="make models") as info:
        pyro_lm.bundled_model_path(name + "-missing")
    assert all(repr(n) in str(info.value) for n in pyro_lm.BUNDLED_MODELS)


def test_special_tokens_agree_with_generation_config(name, bundled):
    lm = bundled(name)
    tok, gen = lm.tokenizer, lm.model.generation_config
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (0, 1, 2)
    assert lm.eos_token_id == 2 and lm.pad_token_id == 0
    assert lm.vocab_size == len(tok) == lm.model.config.vocab_size


def test_tokenizer_round_trips_corpus_text(name, bundled):
    tok = bundled(name).tokenizer
    texts = _texts(name, 300)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    if name == "tinylm":  # one token per word, none of them <unk>
        for text in texts[:50]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text.split()) and tok.unk_token_id not in ids


def test_prompt_starts_with_exactly_one_bos(name, bundled):
    lm = bundled(name)
    review, bio = WRITE[name]("review :"), WRITE[name]("bio :")
    ids, mask = lm.encode(review)
    assert ids.tolist() == [lm.tokenizer(review)["input_ids"]]
    assert ids[0, 0] == lm.tokenizer.bos_token_id
    assert (ids == lm.tokenizer.bos_token_id).sum() == 1
    ids, mask = lm.encode([WRITE[name]("review : the"), bio])  # left-padded batch
    for row, keep in zip(ids.tolist(), mask.bool().tolist(), strict=True):
        tokens = [t for t, k in zip(row, keep, strict=True) if k]
        assert tokens[0] == lm.tokenizer.bos_token_id
        assert tokens.count(lm.tokenizer.bos_token_id) == 1


def test_bpe_splits_words_and_reads_leading_spaces(name, bundled):
    tok = bundled(name).tokenizer
    texts = _texts(name, 200)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    words = sum(len(t.split()) for t in texts)
    leading = [t for t in tok.get_vocab() if tok.convert_tokens_to_string([t]).startswith(" ")]
    if name == "tinylm":
        assert tokens == words and not leading
        return
    assert tokens / words > 1.3  # several tokens per word on average
    pieces = tok.tokenize(" disappointing")
    assert len(pieces) > 1 and tok.convert_tokens_to_string(pieces) == " disappointing"
    assert len(tok.tokenize(" the")) == 1 and len(tok.tokenize(" they")) > 1
    assert len(leading) > 50
    # a word reads differently with its leading space and at the start of the text
    assert tok.tokenize(" Review") != tok.tokenize("Review")


def test_model_prefers_grammatical_text(name, bundled):
    lm = bundled(name)
    texts = _texts(name, 50)
    rng = random.Random(0)
    shuffled = []
    for text in texts:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    lp, n = _doc_log_probs(lm, texts)
    lp_shuffled, n_shuffled = _doc_log_probs(lm, shuffled)
    # per token, as a shuffled prose document can take more tokens than the original
    assert (lp / n > lp_shuffled / n_shuffled).float().mean() >= 0.95
    assert lp.sum() / n.sum() > lp_shuffled.sum() / n_shuffled.sum() + 1.0
    # and it has learnt the corpus: NLL per document near the model cards' (17.4 and 17.5 nats)
    assert -lp.sum() / len(texts) < 20.0


def test_samples_read_like_corpus_documents(name, bundled):
    lm = bundled(name)
    known = set(vocabulary())
    starts = {}  # the words that begin the body of a review, of a bio, in the corpus
    for doc in generate_corpus(2000, seed=0):
        starts.setdefault(doc.kind, set()).add(doc.body.split()[0])
    for kind in ("review", "bio"):
        prompt = WRITE[name](f"{kind} :")
        x = pyro_lm.LMDistribution(lm, prompt, MAX_NEW_TOKENS[name]).sample((64,))
        ended = (x == lm.eos_token_id).any(-1).tolist()
        ids, _ = lm.encode(prompt)  # the document is the prompt's tokens and the completion's
        texts = lm.decode(torch.cat([ids.expand(len(x), -1), x], dim=-1))
        assert all(t.startswith(prompt) for t in texts)
        words = [unprose(t).split() for t in texts]
        assert all(w[:2] == [kind, ":"] for w in words)
        starts_well = [len(w) > 2 and w[2] in starts[kind] for w in words]
        # a whole document: the corpus's words, written its way, ending with a full stop
        whole = [done and set(w) <= known and w[-1] == "." and t == WRITE[name](unprose(t))
                 for t, w, done in zip(texts, words, ended, strict=True)]
        assert sum(ended) >= 0.9 * len(x)
        assert sum(starts_well) >= 0.9 * len(x), texts
        assert sum(whole) >= 0.8 * len(x), texts
