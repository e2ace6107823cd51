import pytest
import torch

import pyro_lm
from pyro_lm import CausalLM, LMDistribution
from pyro_lm.lm import toy_lm, toy_tokenizer
from pyro_lm.lm.causal_lm import eval_mode, submodules


def test_save_and_from_pretrained_local_directory(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    lm = CausalLM.from_pretrained(tmp_path)
    assert lm.vocab_size == 4 and lm.eos_token_id == 0 and lm.pad_token_id == 0
    assert not any(p.requires_grad for p in lm.parameters())  # a prior is frozen
    x = LMDistribution(tiny_lm, "t1", 3).enumerate_support()
    a = LMDistribution(tiny_lm, "t1", 3).log_prob(x)
    b = LMDistribution(lm, "t1", 3).log_prob(x)
    assert torch.allclose(a, b, atol=1e-6)


def test_from_pretrained_dtype_and_device(tmp_path, tiny_lm, device):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    lm = CausalLM.from_pretrained(str(tmp_path), device=device, dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16 and lm.device.type == device.type
    d = LMDistribution(lm, "", 3)
    lp = d.log_prob(d.sample((4,)))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()


def test_from_pretrained_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_name"):
        CausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="path_or_name"):
        CausalLM.from_pretrained("./models/does-not-exist")


def test_encode_left_pads_as_the_tokenizer_does(tiny_lm):
    # the toy tokenizer writes its BOS (<eos>, id 0) itself, like a Llama tokenizer
    ids, mask = tiny_lm.encode(["t1 t2", "t3"])
    assert ids.tolist() == [[0, 1, 2], [0, 0, 3]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    for text in ("t1 t2", "t3", "", "<eos> t1"):
        row, _ = tiny_lm.encode(text)
        assert row[0].tolist() == tiny_lm.tokenizer(text)["input_ids"]


def test_add_bos_prepends_a_bos_the_tokenizer_does_not_add(tiny_lm):
    plain = CausalLM(tiny_lm.model, toy_tokenizer(4, adds_bos=False))
    assert plain.encode(["t1 t2", "t3"])[0].tolist() == [[1, 2], [0, 3]]  # 0 pads here
    assert plain.encode(["t1 t2", "t3"])[1].tolist() == [[1, 1], [0, 1]]
    with_bos = CausalLM(tiny_lm.model, toy_tokenizer(4, adds_bos=False), add_bos=True)
    assert with_bos.encode(["t1 t2", "<eos> t3"])[0].tolist() == [[0, 1, 2], [0, 0, 3]]
    # a tokenizer that adds the BOS itself gets no second one
    assert CausalLM(tiny_lm.model, tiny_lm.tokenizer, add_bos=True).encode("t1")[0].tolist() \
        == [[0, 1]]
    with pytest.raises(TypeError, match="add_bos: expected True, False or None"):
        CausalLM(tiny_lm.model, tiny_lm.tokenizer, add_bos="yes")


def test_from_pretrained_passes_causal_lm_options_to_causal_lm(tmp_path, tiny_lm):
    tokenizer = toy_tokenizer(4, adds_bos=False)
    tiny_lm.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert CausalLM.from_pretrained(tmp_path).encode("t1")[0].tolist() == [[1]]
    assert CausalLM.from_pretrained(tmp_path, add_bos=False).encode("t1")[0].tolist() == [[1]]
    lm = CausalLM.from_pretrained(tmp_path, add_bos=True)
    assert lm.add_bos and lm.encode("t1")[0].tolist() == [[0, 1]]
    guide = CausalLM.from_pretrained(tmp_path, trainable=True)
    assert all(p.requires_grad for p in guide.parameters())


def test_empty_prompt_is_a_clear_error(tiny_lm):
    # with a tokenizer that adds a BOS the empty text is the BOS alone: unconditional
    assert tiny_lm.encode(["t1", ""])[0].tolist() == [[0, 1], [0, 0]]
    plain = CausalLM(tiny_lm.model, toy_tokenizer(4, adds_bos=False))
    with pytest.raises(ValueError, match=r"prompts\[1\] is the empty string.*add_bos=True"):
        plain.encode(["t1", ""])
    with pytest.raises(ValueError, match="prompts: got an empty list"):
        LMDistribution(tiny_lm, [], 3)
    with pytest.raises(ValueError, match="prompts: empty prompt tensor"):
        LMDistribution(tiny_lm, torch.zeros(2, 0, dtype=torch.long), 3)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}t3{% endif %}")


def chat_lm(tiny_lm):
    tokenizer = toy_tokenizer(4)
    tokenizer.chat_template = CHAT_TEMPLATE
    return CausalLM(tiny_lm.model, tokenizer)


def test_chat_prompt_applies_the_template_with_one_bos(tiny_lm):
    lm = chat_lm(tiny_lm)
    # roles and contents are words of the toy vocabulary: "t1" says "t2", then the prompt t3
    chat = [{"role": "t1", "content": "t2"}]
    ids, mask = lm.encode(chat)
    # the template writes the BOS and the tokenizer would add another: one BOS
    assert ids.tolist() == [[0, 1, 2, 3]] and mask.tolist() == [[1, 1, 1, 1]]
    assert ids[0].tolist() == lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                               return_dict=True)["input_ids"]
    ids, mask = lm.encode([chat, [{"role": "t2", "content": "t1 t1"}, *chat], "t2"])
    assert ids.tolist() == [[0, 0, 0, 0, 1, 2, 3], [0, 2, 1, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 2]]
    assert mask.sum(-1).tolist() == [4, 7, 2]
    d = LMDistribution(lm, chat, 3)
    assert d.batch_shape == () and d.prompt_ids.tolist() == [[0, 1, 2, 3]]
    assert LMDistribution(lm, [chat, chat], 3).batch_shape == (2,)


def test_chat_prompt_errors_name_the_fix(tiny_lm):
    with pytest.raises(ValueError, match="prompts: a chat prompt needs the tokenizer's chat "
                                         "template.*set tokenizer.chat_template"):
        tiny_lm.encode([{"role": "user", "content": "t1"}])
    lm = chat_lm(tiny_lm)
    with pytest.raises(ValueError, match=r"prompts\[1\]: a chat message needs a 'role'"):
        lm.encode([{"role": "t1", "content": "t2"}, {"text": "t1"}])
    with pytest.raises(ValueError, match=r"prompts\[0\]: an empty chat"):
        lm.encode([[], "t1"])
    with pytest.raises(TypeError, match=r"prompts\[1\]: expected a string or a chat"):
        lm.encode(["t1", 3])


def test_batch_encoding_is_a_prompt_repadded_on_the_left(tiny_lm):
    tok = tiny_lm.tokenizer
    tok.padding_side = "right"
    try:
        enc = tok(["t1 t2", "t3"], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    assert enc["input_ids"].tolist() == [[0, 1, 2], [0, 3, 0]]  # right-padded
    ids, mask = tiny_lm.encode(enc)
    assert ids.tolist() == [[0, 1, 2], [0, 0, 3]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    d = LMDistribution(tiny_lm, enc, 3)
    assert d.batch_shape == (2,)
    x = d.enumerate_support()
    expected = LMDistribution(tiny_lm, ["t1 t2", "t3"], 3).log_prob(x)
    torch.testing.assert_close(d.log_prob(x), expected)
    single = LMDistribution(tiny_lm, tok("t1 t2"), 3)  # unbatched input_ids: one prompt
    assert single.batch_shape == () and single.prompt_ids.tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="prompts: a mapping prompt must be a BatchEncoding"):
        tiny_lm.encode({"ids": [1]})
    with pytest.raises(ValueError, match=r"prompts: input_ids\[0\] has no unmasked token"):
        tiny_lm.encode({"input_ids": [[1, 2]], "attention_mask": [[0, 0]]})
    with pytest.raises(ValueError, match="attention_mask: only meaningful with tensor"):
        LMDistribution(tiny_lm, enc, 3, attention_mask=enc["attention_mask"])


def test_decode_drops_everything_after_eos(tiny_lm):
    x = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 3]])
    assert tiny_lm.decode(x) == ["t1 t2", "t3 t3 t3 t3"]
    assert tiny_lm.decode(x[0]) == "t1 t2"
    assert tiny_lm.decode(x[None].expand(2, 2, 4)) == [["t1 t2", "t3 t3 t3 t3"]] * 2
    with pytest.raises(ValueError, match="errors: expected one of"):
        tiny_lm.decode(x, errors="ignore")


def test_eos_token_ids_read_the_generation_config(tiny_lm):
    lm = toy_lm(vocab_size=5, seed=0)
    assert lm.eos_token_ids == (0,) and lm.eos_token_id == 0
    lm.model.generation_config.eos_token_id = [3, 0, 3, 99]  # repeats and an id out of range
    assert lm.eos_token_ids == (0, 3) and lm.eos_token_id == 0 and lm.pad_token_id == 0
    lm.model.generation_config.eos_token_id = 4
    assert lm.eos_token_ids == (0, 4)
    assert lm.trainable_copy().eos_token_ids == (0, 4)
    assert lm.decode(torch.tensor([[1, 4, 2, 2], [2, 0, 4, 4]])) == ["t1", "t2"]
    other = toy_lm(vocab_size=5, seed=0)
    with pytest.raises(ValueError, match="eos_token_ids"):
        lm.check_compatible(other)


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
    d = LMDistribution(tiny_lm, "", 2)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        d.with_lm(other)
    tiny_lm.check_compatible(tiny_lm.trainable_copy())  # same tokenizer: fine


def test_bundled_model_path_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        pyro_lm.bundled_model_path("no-such-model")


def byte_level_lm(tiny_lm):
    """A byte-level vocabulary whose token "Ġæ" holds a space and the first byte of "東"
    (e6 9d b1 = "æĿ±" in GPT-2's byte alphabet), so that a cut can fall inside a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "Ġæ": 1, "Ŀ±": 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    return CausalLM(tiny_lm.model, tok)


def test_decode_a_character_cut_inside_a_token(tiny_lm):
    lm = byte_level_lm(tiny_lm)
    assert lm.decode(torch.tensor([3, 1, 2, 0])) == "a 東"
    x = torch.tensor([[3, 1, 0, 0], [3, 3, 1, 2]])
    assert lm.decode(x) == ["a \ufffd", "aa 東"]
    assert lm.decode(x, errors="drop") == ["a ", "aa 東"]  # the space before the cut stays
    with pytest.raises(ValueError, match=r"x\[0\]: the completion ends inside a multi-byte "
                                         r"character \(its first bytes e6\)"):
        lm.decode(x, errors="strict")
    assert lm.decode(x[1:], errors="strict") == ["aa 東"]
    # a stray continuation byte is invalid wherever it is: replaced in "drop", an error in
    # "strict"
    stray = torch.tensor([2, 3, 0, 0])
    assert lm.decode(stray, errors="drop") == "\ufffd\ufffda"
    with pytest.raises(ValueError, match="x: the completion's bytes are not UTF-8"):
        lm.decode(stray, errors="strict")


def test_repeated_text_encodings_are_fresh_and_follow_added_tokens():
    """Text prompts are encoded once (programs re-run per token encode the same text), but
    each call returns its own tensors and a token added to the tokenizer is seen."""
    lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"))
    a, _ = lm.encode("Review: zqxjv")
    a[0, -1] = -7  # the caller's copy
    b, _ = lm.encode("Review: zqxjv")
    assert b[0, -1] != -7 and torch.equal(b, lm.encode("Review: zqxjv")[0])
    lm.tokenizer.add_tokens(["zqxjv"])
    c, _ = lm.encode("Review: zqxjv")
    assert c[0, -1].item() == lm.tokenizer.convert_tokens_to_ids("zqxjv")
    assert c.shape[1] < b.shape[1]


def test_submodules_lists_the_modules_of_the_tree(tiny_lm):
    model = tiny_lm.model
    listed = submodules(model)
    assert len(listed) == len(list(model.modules()))
    assert {id(m) for m in listed} == {id(m) for m in model.modules()}
    holder = torch.nn.Module()
    holder.a, holder.b = model.transformer.h[0], model.transformer.h[0]  # one module, twice
    holder.register_module("empty", None)
    assert [m is holder for m in submodules(holder)].count(True) == 1
    assert sum(m is model.transformer.h[0] for m in submodules(holder)) == 2


def test_eval_mode_restores_every_training_flag(tiny_lm):
    model = tiny_lm.trainable_copy().model
    model.eval()
    block = model.transformer.h[0]
    block.train()  # a submodule in training mode under a root in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    assert before[""] is False and any(before.values())
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == before
