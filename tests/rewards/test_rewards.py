import math

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm.distributions import prefix_context
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import Callable, Classifier, Lexicon, Regex, TokenCounts


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_lexicon_counts_content_up_to_eos(tiny_lm, device, mode):
    r = Lexicon(tiny_lm.tokenizer, {"t1": 1.0, "t2": -0.5}, mode=mode)
    x = torch.tensor([[1, 1, 2, 0, 0], [2, 0, 0, 0, 0], [3, 3, 3, 3, 1]], device=device)
    out = r(x)
    assert out.device.type == device.type and out.dtype == torch.float32
    assert out.tolist() == [1.5, -0.5, 1.0]
    assert r(x.expand(2, 3, 5)).shape == (2, 3)


def test_lexicon_on_prefixes_counts_only_generated_positions(tiny_lm):
    r = Lexicon(tiny_lm.tokenizer, {"t1": 1.0})
    x = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])  # positions >= t are pad (= EOS here)
    with prefix_context(1):
        assert r(x).tolist() == [1.0, 1.0]
    with prefix_context(2):
        assert r(x).tolist() == [2.0, 1.0]
    assert r(x).tolist() == [2.0, 1.0]


def test_lexicon_multi_token_words_and_forbidden_words():
    lm = toy_lm(vocab_size=5, seed=0)
    r = Lexicon(lm.tokenizer, {"t1": -math.inf, "t2": 2.0})
    x = torch.tensor([[2, 3, 0], [1, 2, 0], [0, 1, 1]])
    assert r(x).tolist() == [2.0, -math.inf, 0.0]


def test_lexicon_rejects_unknown_words(tiny_lm):
    with pytest.raises(ValueError, match="weights: words .*cannot be written"):
        Lexicon(tiny_lm.tokenizer, {"zzz": 1.0})
    with pytest.raises(ValueError, match="weights: the lexicon is empty"):
        Lexicon(tiny_lm.tokenizer, {})


def test_regex_on_full_completions_and_prefixes(tiny_lm):
    r = Regex(tiny_lm.tokenizer, r"t1 t2", match=1.0, no_match=-math.inf)
    x = torch.tensor([[1, 2, 0], [2, 1, 0], [3, 3, 3]])
    assert r(x).tolist() == [1.0, -math.inf, -math.inf]
    with prefix_context(1):  # incomplete: no information yet
        assert r(x).tolist() == [0.0, 0.0, 0.0]
    monotone = Regex(tiny_lm.tokenizer, r"t1", monotone=True)
    with prefix_context(1):
        assert monotone(x).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="pattern: .* is not a valid regular expression"):
        Regex(tiny_lm.tokenizer, "(")


@pytest.mark.parametrize("make", [lambda t: Regex(t, "t1"), lambda t: Lexicon(t, {"t1": 1.0}),
                                  lambda t: TokenCounts(t, {1: 1.0})],
                         ids=["Regex", "Lexicon", "TokenCounts"])
@pytest.mark.parametrize("bad", [None, "gpt2"])
def test_rewards_name_a_bad_tokenizer(make, bad):
    with pytest.raises(TypeError, match="tokenizer: expected a transformers tokenizer or a "
                                        f"pyro_lm.CausalLM .*got {type(bad).__name__}"):
        make(bad)


@pytest.mark.parametrize("out, message", [
    (None, "returned NoneType"), ("abc", "returned str"),
    (torch.ones(2, dtype=torch.complex64), "returned a complex tensor"),
])
def test_callable_of_the_wrong_type_is_named(out, message):
    r = Callable(lambda x: out, name="mine")
    with pytest.raises(TypeError, match=f"reward 'mine': {message}"):
        r(torch.tensor([[1, 0], [2, 0]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern=None), "pattern: expected a regular expression"),
    (dict(flags="i"), "flags: expected re flags"),
    (dict(match=None), "match: expected a number, got NoneType"),
    (dict(no_match=torch.tensor([1.0, 2.0])), "no_match: expected a number, got Tensor"),
])
def test_regex_names_bad_arguments(tiny_lm, kwargs, message):
    args = dict(pattern="t1")
    args.update(kwargs)
    with pytest.raises(TypeError, match=message):
        Regex(tiny_lm.tokenizer, **args)


def test_token_counts_name_a_weight_that_is_not_a_number(tiny_lm):
    with pytest.raises(TypeError, match=r"weights\[1\]: expected a number, got str"):
        TokenCounts(tiny_lm.tokenizer, {1: "abc"})
    assert TokenCounts(tiny_lm.tokenizer, {1: torch.tensor(2.0)})(
        torch.tensor([[1, 1, 0]])).tolist() == [4.0]


def test_callable_nan_is_an_error_naming_the_reward(tiny_lm):
    r = Callable(lambda x: torch.full(x.shape[:-1], float("nan")), name="my_reward")
    with pytest.raises(ValueError, match="reward 'my_reward' returned NaN"):
        r(torch.zeros(2, 3, dtype=torch.long))
    inf = Callable(lambda x: torch.full(x.shape[:-1], -math.inf))
    assert torch.isneginf(inf(torch.zeros(2, 3, dtype=torch.long))).all()
    bad = Callable(lambda x: torch.zeros(5))
    with pytest.raises(ValueError, match="returned shape"):
        bad(torch.zeros(2, 3, dtype=torch.long))


def test_classifier_reward_is_log_prob_of_label(tiny_lm, device):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        num_labels=2, pad_token_id=0, id2label={0: "neg", 1: "pos"},
                        label2id={"neg": 0, "pos": 1})
    clf = GPT2ForSequenceClassification(config).to(device).eval()
    tok = pyro_lm.lm.toy_tokenizer(4)
    r = Classifier(clf, tok, "pos", tiny_lm.tokenizer)
    x = torch.tensor([[1, 2, 0], [3, 0, 0]], device=device)
    out = r(x)
    assert out.shape == (2,) and (out <= 0).all() and torch.isfinite(out).all()
    enc = tok(["t1 t2"], return_tensors="pt")
    with torch.no_grad():
        ref = clf(**{k: v.to(device) for k, v in enc.items()}).logits.log_softmax(-1)[0, 1]
    assert torch.allclose(out[0], ref, atol=1e-5)
    empty = r(torch.zeros(2, 3, dtype=torch.long, device=device))  # EOS first: empty texts
    assert empty.shape == (2,) and torch.isfinite(empty).all()
    other = Classifier(clf, tok, 0, tiny_lm.tokenizer)
    assert torch.allclose(out.exp() + other(x).exp(), torch.ones(2, device=device), atol=1e-5)
    with pytest.raises(ValueError, match="label: 'meh' is not one of"):
        Classifier(clf, tok, "meh", tiny_lm.tokenizer)


def test_classifier_on_prefix_zero_classifies_complete_rows_only(tiny_lm, monkeypatch):
    """On prefixes, ``on_prefix="zero"`` gives 0 to the rows still being written and the
    label's log-probability to those that ended, classifying only those."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        num_labels=2, pad_token_id=0)
    clf = GPT2ForSequenceClassification(config).eval()
    tok = pyro_lm.lm.toy_tokenizer(4)
    zero = Classifier(clf, tok, 1, tiny_lm.tokenizer, on_prefix="zero")
    full = Classifier(clf, tok, 1, tiny_lm.tokenizer)
    x = torch.tensor([[1, 0, 0], [3, 2, 0], [2, 2, 0]])  # at t = 2 only row 0 has ended
    texts = []
    encode = tok.__call__
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, t, **kw: (texts.append(list(t)), encode(t, **kw))[1])
    with prefix_context(2):
        out = zero(x)
    assert texts == [["t1"]]
    assert out[1:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(out[0], full(x)[0])
    torch.testing.assert_close(zero(x), full(x))  # complete rows: all classified


def test_classifier_on_prefix_zero_classifies_each_ended_row_once_in_smc():
    """Its incremental form agrees with forward on every prefix, and in SMC each row is
    classified once on prefixes (when it ends), not at every later token; the run is
    bitwise the one that reads every prefix whole."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from pyro_lm.infer import SMC
    from pyro_lm.rewards import check_prefix_contract

    lm = toy_lm(vocab_size=4)  # ends often
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=4, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        num_labels=2, pad_token_id=0)
    clf = GPT2ForSequenceClassification(config).eval()
    reward = Classifier(clf, pyro_lm.lm.toy_tokenizer(4), 1, lm.tokenizer,
                        on_prefix="zero")
    assert check_prefix_contract(reward, lm=lm, prompts="t1", max_new_tokens=6) > 0
    classified = []
    forward = clf.forward

    def counting(input_ids=None, **kwargs):  # the rows the classifier reads
        classified.append(input_ids.shape[0])
        return forward(input_ids=input_ids, **kwargs)

    clf.forward = counting

    def model():
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, "t1", 6))
        pyro.factor("r", reward(x))

    runs = []
    for incremental in (True, False):
        if not incremental:
            reward.initial_state = lambda rows, device: None
        classified.clear()
        pyro.set_rng_seed(1)
        post = SMC(model, num_particles=16, ess_threshold=1.0).run()
        runs.append((post.samples["x"], post.log_weights, sum(classified)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2] < runs[1][2]


def test_regex_undecided_prefixes_score_prefix_value(tiny_lm):
    """A required pattern is not required of a prefix; a monotone match is final at once."""
    need = Regex(tiny_lm.tokenizer, r"t2", match=0.0, no_match=-math.inf, monotone=True,
                 prefix_value=-0.5)
    x = torch.tensor([[1, 2, 0], [1, 0, 0], [1, 3, 3]])
    with prefix_context(1):
        assert need(x).tolist() == [-0.5, -0.5, -0.5]
    with prefix_context(2):  # found: match; ended without it: no_match; open: prefix_value
        assert need(x).tolist() == [0.0, -math.inf, -0.5]
    assert need(x).tolist() == [0.0, -math.inf, -math.inf]
    with pytest.raises(ValueError, match="prefix_value: must be finite"):
        Regex(tiny_lm.tokenizer, "t1", prefix_value=-math.inf)
    with pytest.raises(ValueError, match="match: must be a real number or -inf"):
        Regex(tiny_lm.tokenizer, "t1", match=math.inf)


def test_plus_inf_is_an_error_naming_the_reward():
    r = Callable(lambda x: torch.full(x.shape[:-1], math.inf), name="greedy")
    with pytest.raises(ValueError, match=r"reward 'greedy' returned \+inf for 2 of 2"):
        r(torch.zeros(2, 3, dtype=torch.long))


def test_rewards_end_completions_at_every_eos_id_of_the_lm(tiny_lm):
    class TwoEos:  # what CausalLM.eos_token_ids gives for instruct models
        tokenizer, eos_token_id, pad_token_id, eos_token_ids = tiny_lm.tokenizer, 0, 0, (0, 3)

    for mode in ["tokens", "text"]:
        r = Lexicon(TwoEos(), {"t1": 1.0, "t2": 10.0}, mode=mode)
        assert r.eos == (0, 3)
        assert r(torch.tensor([[1, 3, 2], [2, 1, 0]])).tolist() == [1.0, 11.0]
    assert Lexicon(tiny_lm.tokenizer, {"t1": 1.0}).eos == (0,)


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_rewards_keep_the_provenance_of_their_input(tiny_lm, mode):
    """TraceGraph_ELBO finds the costs downstream of a sample site by provenance."""
    from pyro.ops.provenance import ProvenanceTensor, get_provenance

    x = ProvenanceTensor(torch.tensor([[1, 2, 0]]), frozenset({"x"}))
    assert get_provenance(Lexicon(tiny_lm.tokenizer, {"t1": 1.0}, mode=mode)(x)) == {"x"}
    assert get_provenance(Regex(tiny_lm.tokenizer, "t1")(x)) == {"x"}
