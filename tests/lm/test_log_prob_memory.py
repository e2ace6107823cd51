"""log_prob under gradients: past the memory budget the head's logits are recomputed in
backward, so autograd keeps O(B T H), not O(B T V), and (activation checkpointing) each
chunk's forward pass is recomputed there, so the body's activations are not kept either;
values and gradients are unchanged."""

import pytest
import torch

import pyro_lm
from pyro_lm.distributions import lm_distribution
from pyro_lm.distributions.lm_distribution import _LinearLogProb
from pyro_lm.lm import toy_lm, toy_tokenizer
from pyro_lm.lm.causal_lm import eval_mode

B, T, V = 6, 8, 512


def llama_lm(vocab_size=V):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0, initializer_range=0.3)
    torch.manual_seed(0)
    return pyro_lm.CausalLM(LlamaForCausalLM(config), toy_tokenizer(vocab_size))


def prior_and_guide(name):
    if name == "llama":
        prior = llama_lm()
        return prior, prior.trainable_copy()
    prior = toy_lm(vocab_size=V, n_layer=1, n_embd=16, init_std=0.3)
    if name == "gpt2":
        return prior, prior.trainable_copy()
    lora = prior.trainable_copy(lora=dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():  # switch the adapters on
        for key, p in lora.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, 0.5)
    return prior, lora


def reference_token_log_probs(lm, ids, mask, x, eos=0):
    """One full forward, float32 log-softmax, gather, zero after the first EOS."""
    inputs = torch.cat([ids, x[:, :-1]], -1)
    full = torch.cat([mask, torch.ones_like(x[:, :-1])], -1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    logits, _ = lm(inputs, full, positions)
    logp = logits[:, -x.shape[1]:].float().log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)
    return logp.masked_fill(lm_distribution.after_first_eos(x, eos), 0.0)


@pytest.mark.parametrize("name", ["gpt2", "gpt2 LoRA", "llama"])
def test_recomputed_log_prob_has_exact_values_and_gradients(monkeypatch, name):
    if name == "gpt2 LoRA":
        pytest.importorskip("peft")
    prior, guide = prior_and_guide(name)
    assert guide.linear_head is not None
    ids = torch.tensor([[0, 0, 5], [0, 7, 8], [3, 4, 9]]).repeat(2, 1)
    mask = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 1]]).repeat(2, 1)
    x = pyro_lm.LMDistribution(prior, ids, T, attention_mask=mask).sample()
    monkeypatch.setattr(lm_distribution, "LOG_PROB_BUDGET", 3 * (3 + T) * V)  # 3 rows a chunk
    # the head's recomputation alone (activation checkpointing: its own test below)
    dist = pyro_lm.LMDistribution(guide, ids, T, attention_mask=mask,
                                  activation_checkpointing=False)
    weights = torch.randn(B, T)
    calls = []
    apply = _LinearLogProb.apply
    monkeypatch.setattr(_LinearLogProb, "apply", lambda *a: calls.append(1) or apply(*a))
    got = dist.token_log_probs(x)
    assert len(calls) == 2  # the recomputing path, one call per chunk of 3 rows
    params = [p for p in guide.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    expected = reference_token_log_probs(guide, ids, mask, x)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    assert torch.allclose(got, expected, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-5)


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn`` runs (each storage once: a weight
    saved by every chunk is one tensor in memory), and the largest saved tensor's element
    count."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values()), max(sizes.values())


def test_saved_tensors_are_hidden_states_not_logits(monkeypatch):
    """Deterministic: under gradients the plain path saves every chunk's (rows, T, V)
    log-softmax; past the budget nothing of size B T V is kept."""
    guide = toy_lm(vocab_size=4096, n_layer=1, n_embd=16, init_std=0.3).trainable_copy()
    ids = torch.zeros(16, 1, dtype=torch.long)
    x = torch.randint(1, 4096, (16, 12))
    dist = pyro_lm.LMDistribution(guide, ids, 12)
    logits_bytes = 16 * 12 * 4096 * 4
    plain, _ = saved_bytes(lambda: dist.log_prob(x))  # B T V fits the default budget
    monkeypatch.setattr(lm_distribution, "LOG_PROB_BUDGET", 4 * 13 * 4096)  # 4 rows a chunk
    bounded, largest = saved_bytes(lambda: dist.log_prob(x))
    assert plain >= logits_bytes
    # the hidden states, the body's activations and the (V, H) weights: far below B T V
    assert bounded < logits_bytes / 4 and largest < logits_bytes / 4  # < one chunk's logits
    assert torch.allclose(dist.log_prob(x), pyro_lm.LMDistribution(guide, ids, 12).log_prob(x),
                          atol=1e-5)


def test_the_recomputing_function_passes_gradcheck():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randint(0, 7, (2, 3), generator=generator)

    def fn(h, w, b):  # the function computes its log-softmax in float32: compare in float64
        logits = torch.nn.functional.linear(h, w, b)
        return logits.gather(-1, target[..., None]).squeeze(-1) - logits.logsumexp(-1)

    def double(h, w, b):
        out = _LinearLogProb.apply(h, w, b, target)
        return out.double()

    for arg in range(3):
        grads = torch.autograd.grad(double(hidden, weight, bias).sum(),
                                    (hidden, weight, bias))[arg]
        exact = torch.autograd.grad(fn(hidden, weight, bias).sum(), (hidden, weight, bias))[arg]
        assert torch.allclose(grads, exact, atol=1e-5), arg


def test_models_without_a_plain_head_keep_the_plain_path(monkeypatch):
    lm = toy_lm(vocab_size=64, n_layer=1, n_embd=16)
    subclass = type("ScaledGPT2", (type(lm.model),), {})(lm.model.config)
    other = pyro_lm.CausalLM(subclass, lm.tokenizer, trainable=True)
    assert other.linear_head is None
    with pytest.raises(ValueError, match="hidden_states"):
        other.hidden_states(torch.zeros(1, 1, dtype=torch.long))
    monkeypatch.setattr(lm_distribution, "LOG_PROB_BUDGET", 64)
    x = torch.randint(1, 64, (4, 3))
    lp = pyro_lm.LMDistribution(other, torch.zeros(4, 1, dtype=torch.long), 3).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all()


# ---------------------------------------------------------------- activation checkpointing
def count_recomputed(monkeypatch):
    """The rows of every chunk whose forward pass :class:`_Recomputed` wraps."""
    rows = []
    apply = lm_distribution._Recomputed.apply
    monkeypatch.setattr(lm_distribution._Recomputed, "apply",
                        lambda fn, n, *a: rows.append(a[0].shape[0]) or apply(fn, n, *a))
    return rows


def checkpoint_case(name, real_model_dir):
    """A prior, a guide and padded prompts: tiny GPT-2 (full or LoRA guide) or the tiny
    random Llama of tests/realistic.py (a generic transformers model)."""
    if name == "llama (realistic)":
        prior = pyro_lm.CausalLM.from_pretrained(real_model_dir("llama"))
        guide = prior.trainable_copy()
        pad = prior.pad_token_id
        ids = torch.tensor([[pad, pad, 5], [pad, 7, 8], [3, 4, 9]]).repeat(2, 1)
    else:
        prior, guide = prior_and_guide(name)
        ids = torch.tensor([[0, 0, 5], [0, 7, 8], [3, 4, 9]]).repeat(2, 1)
    mask = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 1]]).repeat(2, 1)
    return prior, guide, ids, mask


@pytest.mark.parametrize("head", ["head recomputed", "plain head"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["gpt2", "gpt2 LoRA", "llama (realistic)"])
def test_checkpointed_log_prob_has_exact_values_and_gradients(monkeypatch, real_model_dir,
                                                              name, mode, head):
    """Checkpointed (decided by a small memory_budget) equals one plain forward pass, in
    values and gradients, with the guide in eval or training mode (toy GPT-2s have dropout
    0.1 configured: the LM is always run without it, recomputation included)."""
    if name == "gpt2 LoRA":
        pytest.importorskip("peft")
    prior, guide, ids, mask = checkpoint_case(name, real_model_dir)
    guide.train(mode == "train")
    x = pyro_lm.LMDistribution(prior, ids, T, attention_mask=mask).sample()
    vocab = guide.vocab_size
    if head == "plain head":  # the logits of all rows fit: only the body is checkpointed
        budget = 4 * B * T * vocab
    else:  # 3 rows a chunk of logits, recomputed in backward
        budget = 4 * 3 * (3 + T) * vocab
    dist = pyro_lm.LMDistribution(guide, ids, T, attention_mask=mask, memory_budget=budget)
    per_row = lm_distribution._saved_bytes_per_row(dist, head == "head recomputed")
    budget = min(budget, B * per_row - 1)  # the activations of all rows do not fit
    dist = pyro_lm.LMDistribution(guide, ids, T, attention_mask=mask, memory_budget=budget)
    rows = count_recomputed(monkeypatch)
    weights = torch.randn(B, T)
    state = torch.get_rng_state()
    got = dist.token_log_probs(x)
    params = [p for p in guide.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    assert torch.equal(torch.get_rng_state(), state)  # pure: no random draw, none restored
    assert sum(rows) == B and max(rows) <= max(1, budget // per_row)  # chunks that fit
    with eval_mode(guide):
        expected = reference_token_log_probs(guide, ids, mask, x, eos=guide.eos_token_ids)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    assert torch.allclose(got, expected, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)
    assert guide.training == (mode == "train")


def test_recomputation_replays_the_forward_random_draws():
    """A function that draws (dropout in training mode) gets the same gradient through
    :class:`_Recomputed` as through its own graph, and leaves the RNG where it would."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 6, generator=generator, requires_grad=True)
    index = torch.tensor([[1, 4, 4], [0, 9, 2]])

    def fn(i):
        return torch.nn.functional.dropout(weight[i], 0.5, training=True).sin()

    grad = torch.randn(2, 3, 6, generator=generator)
    torch.manual_seed(1)
    expected = fn(index)
    (expected_grad,) = torch.autograd.grad(expected, weight, grad)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    got = lm_distribution._Recomputed.apply(fn, 1, index, weight)
    torch.manual_seed(2)  # a draw between forward and backward is not replayed
    (got_grad,) = torch.autograd.grad(got, weight, grad)
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(2).get_state())
    assert not torch.equal(after, torch.get_rng_state())


def test_checkpointing_bounds_the_saved_activations(monkeypatch):
    """Deterministic: past the budget autograd keeps only each chunk's inputs and hidden
    states (and the weights, in memory anyway), not the body's activations; within it,
    nothing is recomputed. The one-row measurement matches what autograd saves."""
    guide = toy_lm(vocab_size=64, n_layer=2, n_embd=32, n_positions=128).trainable_copy()
    own = {p.untyped_storage().data_ptr() for p in guide.parameters()}
    ids = torch.zeros(16, 2, dtype=torch.long)
    x = torch.randint(1, 64, (16, 60))

    def saved_activations(dist):
        sizes = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dist.log_prob(x)
        return sum(sizes.values())

    rows = count_recomputed(monkeypatch)
    kept = pyro_lm.LMDistribution(guide, ids, 60)  # default budget: the activations fit
    full = saved_activations(kept)
    assert rows == []
    per_row = lm_distribution._saved_bytes_per_row(kept, False)
    assert 0.9 < 16 * per_row / full < 1.25  # the estimate the decision uses
    budget = 4 * per_row  # 4 rows' activations: 4 chunks
    bounded = pyro_lm.LMDistribution(guide, ids, 60, memory_budget=budget)
    saved = saved_activations(bounded)
    assert rows == [4, 4, 4, 4]
    hidden_and_inputs = 16 * (62 * 32 * 4 + 4 * 62 * 8)  # (N, L, H) float32, 4 (N, L) long
    assert saved < full / 10 and saved <= hidden_and_inputs
    assert torch.allclose(bounded.log_prob(x), kept.log_prob(x), atol=1e-5)
    never = pyro_lm.LMDistribution(guide, ids, 60, memory_budget=budget,
                                   activation_checkpointing=False)
    rows.clear()
    assert saved_activations(never) == full and rows == []
    assert bounded.expand((3, 16)).memory_budget == budget
    assert pyro_lm.LMDistribution(guide, ids, 60, activation_checkpointing=True).expand(
        (16,)).activation_checkpointing is True


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_budget=0), "memory_budget: expected a positive int"),
    (dict(memory_budget=2.5), "memory_budget: expected a positive int"),
    (dict(activation_checkpointing="auto"), "activation_checkpointing: expected None"),
])
def test_bad_memory_arguments_are_refused(kwargs, match):
    lm = toy_lm(vocab_size=8)
    with pytest.raises((TypeError, ValueError), match=match):
        pyro_lm.LMDistribution(lm, torch.zeros(2, 1, dtype=torch.long), 3, **kwargs)
