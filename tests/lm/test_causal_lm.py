import pytest
import torch

import pyro_lm
from pyro_lm import CausalLM, LMDistribution
from pyro_lm.lm import toy_lm, toy_tokenizer


def test_save_and_from_pretrained_local_directory(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    lm = CausalLM.from_pretrained(tmp_path)
    assert lm.vocab_size == 4 and lm.eos_token_id == 0 and lm.pad_token_id == 0
    assert not any(p.requires_grad for p in lm.parameters())  # a prior is frozen
    x = LMDistribution(tiny_lm, "<eos> t1", 3).enumerate_support()
    a = LMDistribution(tiny_lm, "<eos> t1", 3).log_prob(x)
    b = LMDistribution(lm, "<eos> t1", 3).log_prob(x)
    assert torch.allclose(a, b, atol=1e-6)


def test_from_pretrained_dtype_and_device(tmp_path, tiny_lm, device):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    lm = CausalLM.from_pretrained(str(tmp_path), device=device, dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16 and lm.device.type == device.type
    d = LMDistribution(lm, "<eos>", 3)
    lp = d.log_prob(d.sample((4,)))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()


def test_from_pretrained_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_name"):
        CausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="path_or_name"):
        CausalLM.from_pretrained("./models/does-not-exist")


def test_encode_left_pads_and_adds_bos(tiny_lm):
    ids, mask = tiny_lm.encode(["t1 t2", "t3"])
    assert ids.tolist() == [[0, 1, 2], [0, 0, 3]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_decode_drops_everything_after_eos(tiny_lm):
    x = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 3]])
    assert tiny_lm.decode(x) == ["t1 t2", "t3 t3 t3 t3"]
    assert tiny_lm.decode(x[0]) == "t1 t2"


def test_empty_prompt_is_a_clear_error(tiny_lm):
    with pytest.raises(ValueError, match=r"prompts\[1\] is the empty string"):
        tiny_lm.encode(["t1", ""])
    with pytest.raises(ValueError, match="prompts: got an empty list"):
        LMDistribution(tiny_lm, [], 3)
    with pytest.raises(ValueError, match="prompts: empty prompt tensor"):
        LMDistribution(tiny_lm, torch.zeros(2, 0, dtype=torch.long), 3)


def test_tokenizer_without_eos_or_pad_is_a_clear_error(tiny_lm):
    tok = toy_tokenizer(4)
    tok.eos_token = None
    tok.pad_token = None
    with pytest.raises(ValueError, match="tokenizer: it defines neither an EOS nor a pad"):
        CausalLM(tiny_lm.model, tok)


def test_trainable_copy_is_independent(tiny_lm):
    guide = tiny_lm.trainable_copy()
    assert all(p.requires_grad for p in guide.parameters())
    before = [p.clone() for p in tiny_lm.parameters()]
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_lm.parameters(), strict=True))


def test_tokenizer_mismatch_is_detected(tiny_lm):
    other = toy_lm(vocab_size=5, seed=0)
    with pytest.raises(ValueError, match="lm: tokenizer mismatch with the prior"):
        tiny_lm.check_compatible(other, "lm")
    d = LMDistribution(tiny_lm, "<eos>", 2)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        d.with_lm(other)
    tiny_lm.check_compatible(tiny_lm.trainable_copy())  # same tokenizer: fine


def test_bundled_model_path_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        pyro_lm.bundled_model_path("no-such-model")
