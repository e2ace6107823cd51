"""Bad input gets a clear error that names the argument."""

import pytest
import torch

from pyro_lm import LMDistribution


@pytest.mark.parametrize("value, message", [
    (torch.tensor([[1, 2], [1, 2]]), "value: last dimension must be max_new_tokens=3"),
    (torch.tensor([[1, 7, 2], [1, 1, 1]]), r"value: token ids \[7\] out of range \[0, 4\)"),
    (torch.tensor([[1, -1, 2], [1, 1, 1]]), r"value: token ids \[-1\] out of range"),
    (torch.tensor([[1, 0, 2], [1, 1, 1]]), "value: every position after the first EOS"),
    (torch.ones(2, 3), "value: expected a LongTensor"),
    (torch.zeros(3, 3, dtype=torch.long), "value: batch shape"),
])
def test_log_prob_validates_values(tiny_lm, value, message):
    d = LMDistribution(tiny_lm, ["", "t1"], 3, validate_args=True)
    with pytest.raises((ValueError, TypeError), match=message):
        d.log_prob(value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens: expected a positive int"),
    (dict(max_new_tokens=2.5), "max_new_tokens: expected a positive int"),
    (dict(max_new_tokens=1000), "max_new_tokens: prompt length"),
    (dict(prompts=torch.tensor([[0, 9]])), r"prompts: token ids \[9\] are out of range"),
    (dict(prompts=torch.tensor([[0.0]])), "prompts: token ids must be an integer tensor"),
    (dict(prompts=torch.tensor([[0, 1]]), attention_mask=torch.tensor([[1, 0]])),
     "attention_mask: prompts must be left-padded"),
    (dict(prompts=torch.tensor([[0, 1]]), attention_mask=torch.tensor([[1, 1, 1]])),
     "attention_mask: shape"),
    (dict(prompts=torch.tensor([[0, 1]]), attention_mask=torch.tensor([[0, 0]])),
     r"prompts: rows \[0\] are empty"),
    (dict(prompts=[torch.tensor([0])]), r"prompts\[0\]: expected a string or a chat"),
    (dict(prompts=42), "prompts: expected a string, a chat"),
    (dict(chunk_size=0), "chunk_size: expected a positive int"),
])
def test_constructor_validates_arguments(tiny_lm, kwargs, message):
    args = dict(prompts="", max_new_tokens=3)
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises((ValueError, TypeError), match=message):
        LMDistribution(tiny_lm, prompts, **args)


def test_lm_must_be_a_causal_lm(tiny_lm):
    with pytest.raises(TypeError, match="lm: expected a pyro_lm.CausalLM"):
        LMDistribution(tiny_lm.model, "", 3)


def test_support_check_and_canonicalize(tiny_lm):
    d = LMDistribution(tiny_lm, "", 4)
    x = torch.tensor([[1, 0, 2, 3], [1, 2, 3, 1], [0, 0, 0, 0]])
    assert d.support.check(x).tolist() == [False, True, True]
    assert d.support.check(d.canonicalize(x)).all()
