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
