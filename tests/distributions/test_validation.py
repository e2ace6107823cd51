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
    (dict(chunk_size=1e3), "chunk_size: expected a positive int"),
    (dict(chunk_size="4"), "chunk_size: expected a positive int"),
    (dict(chunk_size=True), "chunk_size: expected a positive int"),
    (dict(max_enumerate=-1), "max_enumerate: expected a positive int"),
    (dict(max_enumerate="x"), "max_enumerate: expected a positive int"),
    (dict(prompts=torch.tensor([[0, 1]]), attention_mask=[[1, 1]]),
     "attention_mask: expected a tensor"),
    (dict(prompts=torch.tensor([[0, 1, 1]]), attention_mask=torch.tensor([[0.7, 1.0, 1.0]])),
     "attention_mask: values must be 0 or 1"),
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


def test_prompt_with_names_out_of_range_completions(tiny_lm):
    d = LMDistribution(tiny_lm, torch.tensor([[1, 2]]), 3)
    with pytest.raises(ValueError, match=r"value: token ids \[9\] are out of range \[0, 4\)"):
        d.prompt_with(torch.tensor([[3, 9, 0]]))
    d.prompt_with(torch.tensor([[3, 0, 9]]))  # after the first EOS: dropped, not read


@pytest.mark.parametrize("value, error, message", [
    (torch.tensor([[1, 2, 3, 1, 2]]), ValueError, r"value: completions .* have 3 tokens"),
    (torch.tensor(1), ValueError, r"value: completions .* have 3 tokens"),
    (torch.tensor([[1.0, 2.0, 0.0]]), TypeError, "value: expected a LongTensor"),
    ([[1, 2, 0]], TypeError, "value: expected a LongTensor"),
    (torch.ones(3, 3, dtype=torch.long), ValueError, r"value: batch shape \(3,\) does not"),
])
def test_prompt_with_checks_its_value(tiny_lm, value, error, message):
    d = LMDistribution(tiny_lm, torch.tensor([[1, 2], [2, 1]]), 3)
    with pytest.raises(error, match=message):
        d.prompt_with(value)


@pytest.mark.parametrize("texts, error, message", [
    (None, TypeError, "texts: expected a string or a list"),
    (5, TypeError, "texts: expected a string or a list"),
    (["t1", 3], TypeError, r"texts\[1\]: expected a string, got int"),
    (["t1 <eos> t2"], ValueError, r"texts\[0\]: .* holds an end-of-sequence token"),
])
def test_encode_value_checks_its_texts(tiny_lm, texts, error, message):
    with pytest.raises(error, match=message):
        LMDistribution(tiny_lm, "t1", 3).encode_value(texts)


@pytest.mark.parametrize("edit, message", [
    (lambda ids, mask: ids.__setitem__((0, -1), 9), r"prompts: token ids \[9\] are out of range"),
    (lambda ids, mask: mask.__setitem__((0, -1), 0), "attention_mask: prompts must be left-padded"),
    (lambda ids, mask: mask.zero_(), r"prompts: rows \[0\] are empty"),
])
def test_prompts_built_by_prompt_with_are_checked_again_once_changed(tiny_lm, edit, message):
    """prompt_with's prompts are valid by construction (the next LMDistribution skips their
    checks), but not once they are changed in place."""
    d = LMDistribution(tiny_lm, torch.tensor([[1, 2]]), 3)
    ids, mask = d.prompt_with(torch.tensor([[3, 1, 0]]))
    second = LMDistribution(tiny_lm, ids, 3, attention_mask=mask)
    assert second.prompt_ids.tolist() == [[0, 1, 2, 3, 1]]
    assert second.prompt_mask.tolist() == [[0, 1, 1, 1, 1]]
    edit(ids, mask)
    with pytest.raises(ValueError, match=message):
        LMDistribution(tiny_lm, ids, 3, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask: shape"):  # another mask: checked
        LMDistribution(tiny_lm, ids, 3, attention_mask=torch.ones(1, 4, dtype=torch.long))
