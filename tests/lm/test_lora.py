"""LoRA guides: adapters train with SequenceELBO, the prior's weights are shared and untouched."""

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_lm import LMDistribution
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import AutoLMGuide, SequenceELBO
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import Lexicon

peft = pytest.importorskip("peft")

# GPT-2 implements its projections as Conv1D (weights stored transposed)
LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.1)


@pytest.mark.parametrize("as_dict", [False, True])
def test_lora_guide_shares_the_base_weights(as_dict):
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.2)
    policy = prior.trainable_copy(lora=LORA if as_dict else peft.LoraConfig(**LORA))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # one copy of the base weights in memory: every frozen guide weight is a prior tensor
    prior_storage = {p.data_ptr() for p in prior.parameters()}
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert len(frozen) == len(list(prior.parameters()))
    assert all(p.data_ptr() in prior_storage for p in frozen)
    # the prior's own modules carry no adapters
    assert not any("lora_" in n for n, _ in prior.named_parameters())


def test_lora_guide_trains_and_leaves_the_prior_untouched(device):
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.2, device=device)
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})
    prompts = torch.tensor([[0], [2]], device=device)

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", LMDistribution(prior, prompts, 3))
            pyro.factor("reward", reward(x) / 0.5)

    exact = enumerate_model(model, prompts)
    weights = {k: v.clone() for k, v in prior.model.state_dict().items()}
    outputs = exact.log_prob_of(prior)
    policy = prior.trainable_copy(lora=LORA)
    guide = AutoLMGuide(model, policy)
    kl_start = exact.kl_q_p(policy).sum().item()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), SequenceELBO(num_particles=16))
    for _ in range(30):
        svi.step(prompts)
    with torch.no_grad():
        kl_end = exact.kl_q_p(policy).sum().item()
    assert kl_end < 0.5 * kl_start, (kl_start, kl_end)
    # only adapters were registered and trained
    names = list(pyro.get_param_store().keys())
    assert names and all("lora_" in n for n in names)
    # the prior is bitwise untouched, and so are its outputs
    for k, v in prior.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(exact.log_prob_of(prior), outputs)
    assert not torch.equal(exact.log_prob_of(policy).detach(), outputs)


def _perturbed_lora_guide(prior):
    guide = prior.trainable_copy(lora=LORA)
    with torch.no_grad():
        for name, p in guide.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    return guide


def _storages(module):
    return {t.data_ptr() for t in module.state_dict().values()}


def test_merged_model_is_a_standalone_copy():
    from pyro_lm.lm.export import merged_model

    prior = toy_lm(vocab_size=5, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    guide = _perturbed_lora_guide(prior)
    prompts = torch.tensor([[0], [2]])
    x = LMDistribution(guide, prompts, 4).sample((16,))
    with torch.no_grad():
        expected = LMDistribution(guide, prompts, 4).log_prob(x)
        prior_lp = LMDistribution(prior, prompts, 4).log_prob(x)
    merged = merged_model(guide)
    assert type(merged) is type(prior.model)
    assert not any("lora_" in n for n in merged.state_dict())
    assert not _storages(merged) & _storages(prior.model)  # owns every weight
    lm = type(prior)(merged, prior.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(LMDistribution(lm, prompts, 4).log_prob(x), expected,
                                   atol=1e-5, rtol=1e-6)
        for p in merged.parameters():  # training the merged model leaves the prior alone
            p.add_(1.0)
        assert torch.equal(LMDistribution(prior, prompts, 4).log_prob(x), prior_lp)
        assert torch.equal(LMDistribution(guide, prompts, 4).log_prob(x), expected)
    with pytest.raises(ValueError, match="^lm: .*no peft adapters"):
        merged_model(prior)


def test_guard_makes_peft_in_place_merges_safe():
    """peft's merge_and_unload / merge_adapter merge into the weights a LoRA guide shares
    with its prior; guard_shared_base turns them into a merged copy and an error."""
    import copy
    import pickle

    from pyro_lm.lm.export import check_unmerged, guard_shared_base

    prior = toy_lm(vocab_size=5, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    guide = _perturbed_lora_guide(prior)
    assert guard_shared_base(guard_shared_base(guide.model)) is guide.model  # idempotent
    prompts = torch.tensor([[0], [2]])
    x = LMDistribution(guide, prompts, 4).sample((16,))
    weights = {k: v.clone() for k, v in prior.model.state_dict().items()}
    with torch.no_grad():
        expected = LMDistribution(guide, prompts, 4).log_prob(x)
        prior_lp = LMDistribution(prior, prompts, 4).log_prob(x)

    for model in (guide.model, guide.model.base_model):
        merged = model.merge_and_unload()
        assert type(merged) is type(prior.model)
        assert not _storages(merged) & _storages(prior.model)
        with torch.no_grad():
            torch.testing.assert_close(
                LMDistribution(type(prior)(merged, prior.tokenizer), prompts, 4).log_prob(x),
                expected, atol=1e-5, rtol=1e-6)
        with pytest.raises(RuntimeError, match="^merge_adapter: .*merged_model"):
            model.merge_adapter()
    check_unmerged(guide)  # the guide keeps its (unmerged) adapters
    with torch.no_grad():
        assert torch.equal(LMDistribution(guide, prompts, 4).log_prob(x), expected)
        assert torch.equal(LMDistribution(prior, prompts, 4).log_prob(x), prior_lp)
    for k, v in prior.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    # the guard travels with copies of the guide
    for clone in (copy.deepcopy(guide.model), pickle.loads(pickle.dumps(guide.model))):
        with pytest.raises(RuntimeError, match="^merge_adapter: "):
            clone.merge_adapter()
        assert clone.merge_and_unload.model is clone


@pytest.mark.parametrize("bad", [True, "r=8"])
def test_lora_of_the_wrong_type_is_named(bad):
    pytest.importorskip("peft")
    with pytest.raises(TypeError, match="lora: expected None, a peft.LoraConfig or a dict"):
        toy_lm(vocab_size=4).trainable_copy(lora=bad)
