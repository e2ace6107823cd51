import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from checks import pooled_chi2_pvalue
from pyro import poutine

import pyro_lm
from pyro_lm import LMDistribution
from pyro_lm.distributions.lm_distribution import after_first_eos
from pyro_lm.lm import toy_lm


def _canonical(x, eos, pad):
    from pyro_lm.distributions.lm_distribution import after_first_eos
    return x.masked_fill(after_first_eos(x, eos), pad)


@pytest.mark.parametrize("pad", [None, 3])
def test_log_prob_matches_hand_computation(pad):
    lm = toy_lm(vocab_size=4, seed=3, init_std=0.5, pad_token_id=pad)
    prompt = torch.tensor([0, 2])
    d = LMDistribution(lm, prompt, max_new_tokens=4)
    x = torch.tensor([1, 2, 0, lm.pad_token_id])  # two tokens, then EOS, then pad
    expected = 0.0
    context = prompt.tolist()
    for token in x[:3].tolist():  # up to and including the first EOS
        logits = lm.model(torch.tensor([context])).logits[0, -1].double()
        expected += float(logits.log_softmax(-1)[token])
        context.append(token)
    assert d.log_prob(x).dtype == torch.float32
    assert math.isclose(float(d.log_prob(x)), expected, abs_tol=1e-5)


@pytest.mark.parametrize("max_new_tokens", [1, 3])
@pytest.mark.parametrize("pad", [None, 3])
def test_probabilities_sum_to_one_over_support(tiny_lm, max_new_tokens, pad):
    lm = tiny_lm if pad is None else toy_lm(vocab_size=4, seed=1, init_std=0.5, pad_token_id=pad)
    d = LMDistribution(lm, torch.tensor([[0], [0]]), max_new_tokens)
    support = d.enumerate_support()
    assert support.shape == (d.support_size(), 2, max_new_tokens)
    assert bool(d.support.check(support).all())
    assert torch.unique(support[:, 0], dim=0).shape[0] == support.shape[0]
    total = d.log_prob(support).exp().sum(0)
    assert torch.allclose(total, torch.ones(2), atol=1e-5)


def test_sample_frequencies_match_log_prob_chi_square(tiny_lm):
    torch.manual_seed(0)
    d = LMDistribution(tiny_lm, torch.tensor([0]), 2)
    support = d.enumerate_support()
    probs = d.log_prob(support).exp().double()
    n = 20000
    x = d.sample((n,))
    counts = (x[:, None, :] == support[None]).all(-1).sum(0).double()
    assert counts.sum() == n  # every sample is in the support, in canonical form
    assert pooled_chi2_pvalue(counts, probs) > 1e-3


def test_sample_with_log_prob_agrees_with_log_prob(tiny_lm, device):
    lm = toy_lm(vocab_size=4, seed=1, init_std=0.5, device=device)
    d = LMDistribution(lm, ["", "t1 t2"], 5)
    x, log_prob = d.sample_with_log_prob((7,))
    assert x.shape == (7, 2, 5) and log_prob.shape == (7, 2)
    assert x.device.type == device.type and log_prob.device.type == device.type
    assert torch.allclose(log_prob, d.log_prob(x), atol=1e-4)


def test_sample_skips_the_log_prob_it_does_not_return(tiny_lm, monkeypatch):
    from pyro_lm.lm import decoding

    asked = []
    draw = decoding.draw_tokens
    monkeypatch.setattr(decoding, "draw_tokens",
                        lambda logits, **kw: asked.append(kw.get("return_log_prob")) or
                        draw(logits, **kw))
    d = LMDistribution(tiny_lm, ["", "t1"], 4)
    x = d.sample((3,))
    assert x.shape == (3, 2, 4) and asked and not any(asked)
    asked.clear()
    d.sample_with_log_prob((3,))
    assert asked and all(asked)


@pytest.mark.parametrize("sample_shape", [(), (3,)])
@pytest.mark.parametrize("with_log_prob", [False, True])
def test_sampling_leaves_the_prompts_as_they_were(tiny_lm, sample_shape, with_log_prob):
    """The samplers decode from the distribution's own prompt tensors when every row is
    drawn once: neither they nor the samples may share or change them."""
    d = LMDistribution(tiny_lm, ["", "t1 t2"], 3)
    ids, mask = d.prompt_ids.clone(), d.prompt_mask.clone()
    versions = d.prompt_ids._version, d.prompt_mask._version
    x = d.sample_with_log_prob(sample_shape)[0] if with_log_prob else d.sample(sample_shape)
    assert x.shape == torch.Size(sample_shape) + (2, 3)
    x.fill_(1)
    assert (d.prompt_ids._version, d.prompt_mask._version) == versions
    assert torch.equal(d.prompt_ids, ids) and torch.equal(d.prompt_mask, mask)


def test_value_is_padded_after_first_eos(tiny_lm):
    torch.manual_seed(1)
    d = LMDistribution(tiny_lm, torch.tensor([0]), 6)
    x = d.sample((500,))
    assert torch.equal(x, _canonical(x, tiny_lm.eos_token_id, tiny_lm.pad_token_id))
    ended = (x == 0).any(-1)
    assert ended.any() and (~ended).any()  # both outcomes occur: EOS and truncation


def test_distinct_pad_token_fills_the_tail():
    lm = toy_lm(vocab_size=5, seed=2, init_std=0.5, pad_token_id=4)
    torch.manual_seed(0)
    x = LMDistribution(lm, torch.tensor([0]), 6).sample((300,))
    ended = (x == 0).any(-1)
    first = (x == 0).long().argmax(-1)
    for row, e, f in zip(x, ended, first, strict=True):
        if e:
            assert bool((row[f + 1:] == 4).all())


@pytest.mark.parametrize("sample_shape", [(), (3,), (2, 3)])
def test_shapes_under_nested_plates_and_sample_shape(tiny_lm, sample_shape):
    prompts = ["", "t1", "t2 t3"]

    def model():
        with pyro.plate("outer", 2, dim=-2), pyro.plate("prompts", 3, dim=-1):
            return pyro.sample("x", LMDistribution(tiny_lm, prompts, 4))

    x = model()
    assert x.shape == (2, 3, 4)
    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["x"]["log_prob"].shape == (2, 3)
    d = LMDistribution(tiny_lm, prompts, 4).expand((2, 3))
    assert d.sample(sample_shape).shape == torch.Size(sample_shape) + (2, 3, 4)
    assert d.log_prob(d.sample(sample_shape)).shape == torch.Size(sample_shape) + (2, 3)
    assert d.expand((5, 2, 3)).batch_shape == (5, 2, 3)
    for bad in [(2,), (3, 2), ()]:  # the prompts' dim must stay 3 (or broadcast from 1)
        with pytest.raises(ValueError, match="batch_shape"):
            LMDistribution(tiny_lm, prompts, 4).expand(bad)


def test_batch_of_different_lengths_equals_each_prompt_alone(tiny_lm):
    prompts = ["t1 t2 t3", "", "t3"]
    batched = LMDistribution(tiny_lm, prompts, 3)
    assert batched.prompt_mask[1].tolist() == [0, 0, 0, 1]  # left padding
    support = batched.enumerate_support()
    together = batched.log_prob(support)
    for i, p in enumerate(prompts):
        alone = LMDistribution(tiny_lm, p, 3)
        assert alone.batch_shape == ()
        assert torch.allclose(together[:, i], alone.log_prob(support[:, i]), atol=1e-5)
    # sampling under padding draws from each prompt's own distribution
    torch.manual_seed(0)
    x = batched.sample((4000,))
    p_first = together.exp()[:, 1]
    freq = (x[:, 1][:, None, :] == support[None, :, 1]).all(-1).double().mean(0)
    se = (p_first * (1 - p_first) / 4000).sqrt()
    assert bool(((freq - p_first).abs() <= 4 * se + 1e-3).all())


def test_tensor_prompts_with_attention_mask(tiny_lm):
    ids = torch.tensor([[0, 0, 1], [0, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    d = LMDistribution(tiny_lm, ids, 2, attention_mask=mask)
    x = d.enumerate_support()
    alone = LMDistribution(tiny_lm, torch.tensor([0, 1]), 2)
    assert torch.allclose(d.log_prob(x)[:, 0], alone.log_prob(x[:, 0]), atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("pad", [None, 3])
def test_token_log_probs_sum_to_log_prob_and_vanish_after_eos(chunk_size, pad):
    lm = toy_lm(vocab_size=4, seed=3, init_std=0.5, pad_token_id=pad).trainable_copy()
    prompts = torch.tensor([[0, 2], [0, 1]])
    d = LMDistribution(lm, prompts, max_new_tokens=4, chunk_size=chunk_size)
    torch.manual_seed(0)
    x = d.sample((5,))
    x[0, 0] = torch.tensor([1, 2, 0, lm.pad_token_id])  # ends early: EOS, then padding
    tokens = d.token_log_probs(x)
    assert tokens.shape == (5, 2, 4) and tokens.dtype == torch.float32
    # the sum is log_prob, to float32 round-off (log_prob is that very sum)
    assert torch.allclose(tokens.sum(-1), d.log_prob(x), atol=1e-6)
    # zero exactly after the first EOS (not before: token log-probs are < 0 here)
    after = after_first_eos(x, lm.eos_token_id)
    assert after.any() and (~after).any()
    assert bool((tokens[after] == 0).all()) and bool((tokens[~after] < 0).all())
    # each token's value by hand: log p(x_t | prompt, x_<t), up to and including the EOS
    context = [0, 2]
    for t, token in enumerate([1, 2, 0]):
        with torch.no_grad():
            logits = lm.model(torch.tensor([context])).logits[0, -1].double()
        assert math.isclose(float(tokens[0, 0, t].detach()), float(logits.log_softmax(-1)[token]),
                            abs_tol=1e-5)
        context.append(token)
    # differentiable, like log_prob
    tokens[0, 0, :3].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())


def test_token_log_probs_of_an_empty_batch(tiny_lm):
    d = LMDistribution(tiny_lm, torch.tensor([0]), 3)
    x = torch.zeros((0, 3), dtype=torch.long)
    assert d.token_log_probs(x).shape == (0, 3) and d.log_prob(x).shape == (0,)


def test_log_prob_chunking_is_exact(tiny_lm):
    d = LMDistribution(tiny_lm, ["", "t1"], 3)
    small = LMDistribution(tiny_lm, ["", "t1"], 3, chunk_size=7)
    x = d.enumerate_support()
    assert torch.allclose(d.log_prob(x), small.log_prob(x), atol=1e-6)


def test_no_dropout_in_training_mode():
    prior = toy_lm(vocab_size=4, seed=1, init_std=0.5)
    guide = prior.trainable_copy()
    guide.train()
    assert guide.model.training
    d = LMDistribution(guide, torch.tensor([0]), 3)
    x = d.enumerate_support()
    a, b = d.log_prob(x), d.log_prob(x)
    assert torch.equal(a, b)
    assert torch.allclose(a, LMDistribution(prior, torch.tensor([0]), 3).log_prob(x), atol=1e-6)
    assert guide.model.training  # the mode is restored


def test_log_prob_is_differentiable_and_pure(tiny_lm):
    guide = tiny_lm.trainable_copy()
    d = LMDistribution(guide, torch.tensor([0]), 3)
    x = d.enumerate_support()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    d.log_prob(x).exp().sum().backward()
    grads = [p.grad for p in guide.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items())


def test_enumerate_support_limit(tiny_lm):
    d = LMDistribution(tiny_lm, torch.tensor([0]), 12, max_enumerate=1000)
    with pytest.raises(ValueError, match="enumerate_support: the support has .* max_enumerate"):
        d.enumerate_support()


def test_early_stop_when_every_sequence_has_ended():
    lm = toy_lm(vocab_size=4, seed=1, init_std=0.5)
    head = torch.nn.Linear(16, 4, bias=True)  # EOS (id 0) is certain at every step
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    lm.model.lm_head = head
    calls = []
    handle = lm.model.register_forward_hook(lambda *args: calls.append(1))
    x = LMDistribution(lm, torch.tensor([[0], [0]]), 10).sample()
    handle.remove()
    assert bool((x[:, 0] == 0).all()) and bool((x[:, 1:] == 0).all())
    assert len(calls) == 1  # only the prompt's forward: decoding stopped at once


def test_stock_pyro_importance_and_trace(tiny_lm):
    reward = pyro_lm.rewards.Lexicon(tiny_lm.tokenizer, {"t1": 1.0})
    beta = 1.0  # light-tailed weights, so the delta-method standard error is trustworthy

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", LMDistribution(tiny_lm, prompts, 3))
            pyro.factor("reward", reward(x) / beta)
            return x

    prompts = ["", "t2"]
    tr = poutine.trace(model).get_trace(prompts)
    assert tr.nodes["x"]["value"].shape == (2, 3)
    assert tr.log_prob_sum().isfinite()
    exact = pyro_lm.exact.enumerate_model(model, prompts)
    torch.manual_seed(0)
    n = 200  # stock Importance runs the program once per sample: keep n small
    imp = pyro.infer.Importance(model, num_samples=n).run(prompts)
    log_w = torch.stack(imp.log_weights)
    # the log-weights are the summed factors of both prompts: check the estimate against exact
    w = (log_w - log_w.max()).exp()
    log_z = torch.log(w.mean()) + log_w.max()
    se = w.std() / (math.sqrt(n) * w.mean())
    assert abs(float(log_z - exact.log_Z.sum())) < 4 * float(se) + 1e-3
    # poutine.condition and replay work on the LM site
    x0 = torch.zeros(2, 3, dtype=torch.long)
    cond = poutine.trace(poutine.condition(model, data={"x": x0})).get_trace(prompts)
    assert torch.equal(cond.nodes["x"]["value"], x0)
    replayed = poutine.trace(poutine.replay(model, trace=tr)).get_trace(prompts)
    assert torch.equal(replayed.nodes["x"]["value"], tr.nodes["x"]["value"])


def test_pyro_infer_discrete_shapes_with_obs_site(tiny_lm):
    # an LMDistribution used as an observed likelihood term
    x = torch.tensor([[1, 0, 0], [2, 3, 0]])

    def model():
        with pyro.plate("data", 2):
            pyro.sample("x", LMDistribution(tiny_lm, "", 3), obs=x)
            pyro.sample("z", dist.Normal(0.0, 1.0))

    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    assert tr.nodes["x"]["log_prob"].shape == (2,)


def test_encode_value_gives_the_observed_completion(tiny_lm):
    d = pyro_lm.LMDistribution(tiny_lm, "t1", 3)
    value = d.encode_value(["t2 t3", "t1 t2 t3", ""])
    assert value.tolist() == [[2, 3, 0], [1, 2, 3], [0, 0, 0]]
    d._validate_sample(value)  # canonical: pad after the first EOS
    assert tiny_lm.decode(value) == ["t2 t3", "t1 t2 t3", ""]
    with pytest.raises(ValueError, match=r"texts\[0\].*more than max_new_tokens=3"):
        d.encode_value("t1 t2 t3 t1")


def test_prompt_index_maps_each_element_to_its_prompt_row(tiny_lm):
    """One row of prompt_ids per element of prompt_batch_shape, whatever the expanded
    batch shape; a shape the prompts do not broadcast to is refused."""
    d = LMDistribution(tiny_lm, torch.tensor([[1], [2], [3]]), 2).expand((4, 3))
    assert d.prompt_batch_shape == torch.Size((3,)) and d.batch_shape == torch.Size((4, 3))
    assert d.prompt_index((2, 4, 3)).tolist() == [0, 1, 2] * 8
    ids, _ = d.prompts_for((2,))
    assert ids[:, 0].tolist() == [1, 2, 3] * 8
    with pytest.raises(RuntimeError):
        d.prompt_index((4, 2))
