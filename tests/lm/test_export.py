"""Export: a guide written by save_pretrained loads in plain transformers / peft and scores
completions as the guide does; the prior is never touched; the write is atomic."""

import json
import os

import pytest
import torch

from pyro_lm import CausalLM, LMDistribution
from pyro_lm.lm import toy_lm
from pyro_lm.lm.export import check_unmerged, save_pretrained

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARCHS = ["toy", "gpt2", "llama"]
#: LoRA on the attention input projections (GPT-2's are Conv1D, stored transposed)
LORA = {"toy": dict(target_modules=["c_attn"], fan_in_fan_out=True),
        "gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True),
        "llama": dict(target_modules=["q_proj", "v_proj"])}
PROMPTS = {"toy": ["t1 t2", "t3"], "gpt2": ["Review: The phone", "Bio: She"],
           "llama": ["Review: The phone", "Bio: She"]}
T = 6
ATOL = 1e-5
#: a merged weight W + BA rounds differently from W x + B (A x): a few float32 ulps of a
#: summed log-prob (ulp 4e-6 at 50 nats; measured up to 1.9e-5 at 50 nats on Mistral)
RTOL_MERGED = 1e-6

pytestmark = pytest.mark.filterwarnings(  # peft asks transformers a deprecated attribute
    "ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture
def prior(request, real_model_dir, tmp_path):
    """``(prior, base_dir)`` for ``request.param``: a saved tiny model (the toy LM saved by
    save_pretrained itself) and the frozen CausalLM loaded from it."""
    arch = request.param
    if arch == "toy":
        base_dir = save_pretrained(toy_lm(vocab_size=8, n_layer=1, n_embd=16, seed=1),
                                   tmp_path / "base")
    else:
        base_dir = real_model_dir(arch)
    return CausalLM.from_pretrained(base_dir), base_dir


def lora_guide(prior, arch, scale=0.3):
    """A LoRA guide whose adapters differ from the prior (``lora_B`` starts at zero)."""
    guide = prior.trainable_copy(lora=dict(r=4, lora_alpha=8, lora_dropout=0.1, **LORA[arch]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in guide.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
    return guide


def trained_guide(prior, arch, steps=3):
    """A full guide after a few SGD steps towards the prior's own samples."""
    guide = prior.trainable_copy()
    x = LMDistribution(prior, PROMPTS[arch], T).sample((4,))
    optim = torch.optim.SGD(guide.parameters(), lr=0.5)
    for _ in range(steps):
        optim.zero_grad()
        (-LMDistribution(guide, PROMPTS[arch], T).log_prob(x).mean()).backward()
        optim.step()
    guide.requires_grad_(False)
    return guide


def log_prob(lm, arch, x):
    with torch.no_grad():
        return LMDistribution(lm, PROMPTS[arch], T).log_prob(x)


def snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_unchanged(lm, weights, arch, x, expected):
    state = lm.model.state_dict()
    assert state.keys() == weights.keys()
    for k, v in state.items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(log_prob(lm, arch, x), expected)


def load_plain(directory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def assert_same_tokenizer(guide, tokenizer, model, arch):
    for prompt in PROMPTS[arch]:
        assert tokenizer(prompt)["input_ids"] == guide.tokenizer(prompt)["input_ids"]
    assert tokenizer.get_vocab() == guide.tokenizer.get_vocab()
    assert tokenizer.chat_template == guide.tokenizer.chat_template
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(tokenizer, name) == getattr(guide.tokenizer, name), name
    original = guide.model.generation_config.eos_token_id
    assert model.generation_config.eos_token_id == original


def check_round_trip(guide, arch, model, tokenizer):
    """``model`` (loaded back) scores the guide's samples as the guide does, and the
    export changed neither the guide nor the prior."""
    assert_same_tokenizer(guide, tokenizer, model, arch)
    loaded = CausalLM(model, tokenizer)
    ids, mask = loaded.encode(PROMPTS[arch])
    ids0, mask0 = guide.encode(PROMPTS[arch])
    assert torch.equal(ids, ids0) and torch.equal(mask, mask0)
    return loaded


@pytest.mark.parametrize("prior", ARCHS, indirect=True)
def test_full_guide_round_trip(prior, tmp_path, request):
    prior, _ = prior
    arch = request.node.callspec.params["prior"]
    guide = trained_guide(prior, arch)
    x = LMDistribution(guide, PROMPTS[arch], T).sample((8,))
    expected, prior_lp = log_prob(guide, arch, x), log_prob(prior, arch, x)
    assert (expected - prior_lp).abs().max() > 1e-2  # the guide did move
    weights = snapshot(prior)

    out = save_pretrained(guide, tmp_path / "export")
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    model, tokenizer = load_plain(out)
    loaded = check_round_trip(guide, arch, model, tokenizer)
    torch.testing.assert_close(log_prob(loaded, arch, x), expected, atol=ATOL, rtol=0)
    assert_unchanged(prior, weights, arch, x, prior_lp)


@pytest.mark.parametrize("prior", ARCHS, indirect=True)
def test_lora_guide_merged_round_trip(prior, tmp_path, request):
    prior, _ = prior
    arch = request.node.callspec.params["prior"]
    guide = lora_guide(prior, arch)
    x = LMDistribution(guide, PROMPTS[arch], T).sample((8,))
    expected, prior_lp = log_prob(guide, arch, x), log_prob(prior, arch, x)
    assert (expected - prior_lp).abs().max() > 1e-2
    weights, guide_weights = snapshot(prior), snapshot(guide)

    out = save_pretrained(guide, tmp_path / "merged")
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    model, tokenizer = load_plain(out)
    assert not any("lora" in k for k in model.state_dict())
    loaded = check_round_trip(guide, arch, model, tokenizer)
    torch.testing.assert_close(log_prob(loaded, arch, x), expected, atol=ATOL,
                               rtol=RTOL_MERGED)
    # the prior, whose weights the guide shares, and the guide itself are bitwise as before
    assert_unchanged(prior, weights, arch, x, prior_lp)
    assert_unchanged(guide, guide_weights, arch, x, expected)
    check_unmerged(guide)


@pytest.mark.parametrize("prior", ARCHS, indirect=True)
def test_lora_guide_adapter_round_trip(prior, tmp_path, request):
    prior, base_dir = prior
    arch = request.node.callspec.params["prior"]
    guide = lora_guide(prior, arch)
    x = LMDistribution(guide, PROMPTS[arch], T).sample((8,))
    expected, prior_lp = log_prob(guide, arch, x), log_prob(prior, arch, x)
    weights = snapshot(prior)

    # the toy prior was built in memory, then saved: name its directory for AutoPeftModel
    name = str(base_dir) if arch == "toy" else None
    out = save_pretrained(guide, tmp_path / "adapter", merge=False, base_model_name_or_path=name)
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert os.path.samefile(json.load(f)["base_model_name_or_path"], base_dir)
    assert guide.model.peft_config["default"].base_model_name_or_path == (
        prior.model.config._name_or_path or None)  # the guide's own config is as it was

    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    for model in (peft.PeftModel.from_pretrained(base, out),
                  peft.AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True)):
        loaded = check_round_trip(guide, arch, model, tokenizer)
        torch.testing.assert_close(log_prob(loaded, arch, x), expected, atol=ATOL, rtol=0)
    assert_unchanged(prior, weights, arch, x, prior_lp)


def test_existing_directory_needs_overwrite(tmp_path):
    guide = toy_lm(vocab_size=5, seed=2).trainable_copy()
    target = tmp_path / "export"
    target.mkdir()
    save_pretrained(guide, target)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(guide, target)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(guide, tmp_path / "notes")
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]
    with pytest.raises(TypeError, match="overwrite: expected True or False, got 'no'"):
        save_pretrained(guide, tmp_path / "notes", overwrite="no")
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]
    save_pretrained(guide, tmp_path / "notes", overwrite=True)
    assert "keep.txt" not in os.listdir(tmp_path / "notes")
    assert "config.json" in os.listdir(tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pretrained(guide, tmp_path / "file", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export", "file", "notes"]  # no temporaries


def test_crash_leaves_no_partial_export(tmp_path, monkeypatch):
    guide = toy_lm(vocab_size=5, seed=2).trainable_copy()
    previous = save_pretrained(toy_lm(vocab_size=5, seed=3), tmp_path / "old")
    before = {f: open(os.path.join(previous, f), "rb").read() for f in os.listdir(previous)}

    def crash(*args, **kwargs):  # after the weights were written
        raise KeyboardInterrupt

    monkeypatch.setattr(guide.tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(guide, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(guide, tmp_path / "old", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    after = {f: open(os.path.join(previous, f), "rb").read() for f in os.listdir(previous)}
    assert after == before


def test_errors_name_the_argument(tmp_path):
    prior = toy_lm(vocab_size=5, seed=2)
    with pytest.raises(ValueError, match="merge=False .* drop merge=False"):
        save_pretrained(prior.trainable_copy(), tmp_path / "a", merge=False)
    with pytest.raises(TypeError, match="^lm: .*CausalLM"):
        save_pretrained(prior.model, tmp_path / "a")
    with pytest.raises(TypeError, match="^merge: "):
        save_pretrained(prior, tmp_path / "a", merge="yes")
    with pytest.raises(ValueError, match="^base_model_name_or_path: .*merge=False"):
        save_pretrained(prior, tmp_path / "a", base_model_name_or_path="gpt2")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_in_place_merge_is_detected(how, tmp_path):
    """peft's own in-place merges change the prior through the shared weights; the
    export refuses such a guide instead of writing it."""
    prior = toy_lm(vocab_size=6, n_layer=1, n_embd=16, seed=1)
    guide = lora_guide(prior, "toy")
    x = LMDistribution(guide, PROMPTS["toy"], T).sample((8,))
    prior_lp = log_prob(prior, "toy", x)
    tuner = guide.model.base_model
    getattr(type(tuner), how)(tuner)  # the class's method: bypasses any guard on the guide
    assert (log_prob(prior, "toy", x) - prior_lp).abs().max() > 1e-2  # the pitfall
    with pytest.raises(RuntimeError, match=how):
        save_pretrained(guide, tmp_path / "export")
    assert os.listdir(tmp_path) == []


def test_export_has_the_usual_permissions(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    out = save_pretrained(toy_lm(vocab_size=5, seed=2), tmp_path / "export")
    assert os.stat(out).st_mode == os.stat(probe).st_mode


def test_causal_lm_save_pretrained_and_guarded_lora_guides(tmp_path):
    """The method delegates to the export; a LoRA guide from trainable_copy is guarded, so
    peft's own merge_and_unload leaves the prior's log-probs bitwise equal."""
    prior = toy_lm(vocab_size=8, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    guide = lora_guide(prior, "toy")
    x = LMDistribution(prior, PROMPTS["toy"], T).sample((8,))
    with torch.no_grad():
        before = LMDistribution(prior, PROMPTS["toy"], T).log_prob(x)
        expected = LMDistribution(guide, PROMPTS["toy"], T).log_prob(x)
    out = guide.save_pretrained(tmp_path / "export")
    loaded = CausalLM.from_pretrained(out)
    guide.model.merge_and_unload()  # peft's standard export, on the guide itself
    with torch.no_grad():
        assert torch.equal(LMDistribution(prior, PROMPTS["toy"], T).log_prob(x), before)
        torch.testing.assert_close(LMDistribution(loaded, PROMPTS["toy"], T).log_prob(x),
                                   expected, atol=ATOL, rtol=RTOL_MERGED)
