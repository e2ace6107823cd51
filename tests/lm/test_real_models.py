"""pyro_lm on tiny random models of real architectures, with the tokenizer conventions of
their best-known checkpoints (``realistic.CONVENTIONS``): byte-level BPE without BOS
(GPT-2, GPT-NeoX), with an added BOS, two EOS ids and a chat template that writes the
BOS (Llama 3), without BOS, with ChatML and a pad distinct from EOS (Qwen2), and
SentencePiece-style pieces with byte fallback and an added BOS (Mistral).

What pyro_lm conditions on is what transformers builds, log-probs are those of one full
forward pass of the HF model, decoding never cuts a character silently, and SMC and
Importance agree with an exact computation on a real architecture.
"""

import math

import pyro
import pytest
import torch
from realistic import ARCHITECTURES, CONVENTIONS

from pyro_lm import CausalLM, LMDistribution
from pyro_lm.distributions.prefix import counted_mask, is_eos
from pyro_lm.infer import SMC, Importance
from pyro_lm.rewards import Callable

PROMPTS = ["Review: The phone", "Bio: She is naïve", "café 東京 🙂"]
#: characters that byte-level BPE spells with several byte tokens (and byte fallback too,
#: for those its pieces do not cover: "日", "本", "€")
UNICODE = "Review: café naïve Zürich 東京 🙂 日本 €"
CHAT = [{"role": "user", "content": "Write a review."}]
T = 4


@pytest.fixture(scope="module")
def load(real_model_dir):
    """``load(arch)``: the frozen CausalLM of the session's tiny ``arch`` model."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = CausalLM.from_pretrained(real_model_dir(arch))
        return made[arch]

    return get


def unpadded(ids, mask):
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_text_prompts_are_what_the_tokenizer_makes(load, arch):
    lm = load(arch)
    expected = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert CONVENTIONS[arch].adds_bos == (expected[0][0] == lm.bos_token_id)
    for p, e in zip(PROMPTS, expected, strict=True):
        ids, mask = lm.encode(p)
        assert ids.tolist() == [e] and mask.all()
    ids, mask = lm.encode(PROMPTS)
    assert unpadded(ids, mask) == expected
    assert (mask[:, 1:] >= mask[:, :-1]).all()  # left padding
    d = LMDistribution(lm, PROMPTS, T)
    assert unpadded(d.prompt_ids, d.prompt_mask) == expected and d.batch_shape == (3,)
    # a BatchEncoding, ragged or padded (on the right, then re-padded on the left)
    assert unpadded(*lm.encode(lm.tokenizer(PROMPTS))) == expected
    if lm.tokenizer.pad_token is not None:
        lm.tokenizer.padding_side = "right"
        try:
            enc = lm.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        finally:
            lm.tokenizer.padding_side = "left"
        ids, mask = lm.encode(enc)
        assert unpadded(ids, mask) == expected and (mask[:, 1:] >= mask[:, :-1]).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_add_bos_is_asked_for_and_never_doubles(real_model_dir, arch):
    conv = CONVENTIONS[arch]
    if conv.bos is None:
        with pytest.raises(ValueError, match="add_bos: the tokenizer has no BOS"):
            CausalLM.from_pretrained(real_model_dir(arch), add_bos=True)
        return
    lm = CausalLM.from_pretrained(real_model_dir(arch), add_bos=True)
    for p in PROMPTS:
        plain = lm.tokenizer(p)["input_ids"]
        expected = plain if plain[0] == lm.bos_token_id else [lm.bos_token_id] + plain
        assert lm.encode(p)[0].tolist() == [expected]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chat_prompts_use_the_template_with_one_bos(load, arch):
    lm = load(arch)
    if CONVENTIONS[arch].chat_template is None:
        with pytest.raises(ValueError, match="has none; set tokenizer.chat_template"):
            lm.encode(CHAT)
        return
    expected = lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
    ids, mask = lm.encode(CHAT)
    assert ids.tolist() == [expected]
    if lm.bos_token_id is not None:
        assert expected.count(lm.bos_token_id) == 1
    # a batch mixing chats and text, and the template's own BatchEncoding
    chats = [CHAT, [*CHAT, {"role": "assistant", "content": "Great."}, *CHAT], PROMPTS[0]]
    rows = unpadded(*lm.encode(chats))
    assert rows[0] == expected and rows[2] == lm.tokenizer(PROMPTS[0])["input_ids"]
    enc = lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)
    d = LMDistribution(lm, enc, T)
    assert d.batch_shape == () and d.prompt_ids.tolist() == [expected]
    assert LMDistribution(lm, chats, T).batch_shape == (3,)


# ---------------------------------------------------------------------------- log_prob
def hand_log_prob(lm, prompt_ids, x):
    """log p(x | prompt) from one full forward pass of the HF model on prompt + x (up to
    and including its first EOS), in float64."""
    x = x.tolist()
    ends = [i for i, t in enumerate(x) if t in lm.eos_token_ids]
    x = x[: ends[0] + 1] if ends else x
    full = torch.tensor([prompt_ids + x])
    with torch.no_grad():
        logits = lm.model(input_ids=full).logits[0].double()
    logp = logits.log_softmax(-1)
    start = len(prompt_ids)
    return sum(float(logp[start - 1 + i, t]) for i, t in enumerate(x))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_log_prob_is_one_forward_pass_and_padding_changes_nothing(load, arch):
    lm = load(arch)
    torch.manual_seed(0)
    d = LMDistribution(lm, PROMPTS, T)
    x = d.sample((2,))  # (2, 3, T)
    # a completion ended by the last EOS id (the second one for Llama and Qwen2), then
    # anything: only the tokens up to that EOS count
    x[0, 0] = torch.tensor([5, lm.eos_token_ids[-1], lm.pad_token_id, lm.pad_token_id])
    lp = d.log_prob(x)
    for j, p in enumerate(PROMPTS):
        single = LMDistribution(lm, p, T)
        torch.testing.assert_close(single.log_prob(x[:, j]), lp[:, j], atol=1e-5, rtol=0)
        prompt = lm.tokenizer(p)["input_ids"]
        for i in range(2):
            assert math.isclose(float(lp[i, j]), hand_log_prob(lm, prompt, x[i, j]),
                                abs_tol=1e-5), (i, j)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if len(CONVENTIONS[a].eos) > 1])
def test_every_eos_id_of_the_generation_config_ends_a_completion(load, arch):
    lm = load(arch)
    names = CONVENTIONS[arch].eos
    assert lm.eos_token_ids == tuple(lm.tokenizer.convert_tokens_to_ids(t) for t in names)
    assert lm.eos_token_id == lm.tokenizer.eos_token_id
    # a prior whose second EOS is likelier than any token right after the prompt
    prior = lm.trainable_copy().requires_grad_(False)
    d = LMDistribution(prior, PROMPTS[0], T, validate_args=True)
    with torch.no_grad():
        head = prior.model.get_output_embeddings().weight
        top = prior(d.prompt_ids)[0][0, -1].argmax()
        head[lm.eos_token_ids[1]] = 3 * head[top]
    torch.manual_seed(0)
    x, log_prob = d.sample_with_log_prob((200,))
    ended = is_eos(x, lm.eos_token_ids)
    stop = torch.where(ended.any(-1), ended.long().argmax(-1), T)
    assert (x[torch.arange(T) > stop[:, None]] == lm.pad_token_id).all()
    assert (x == lm.eos_token_ids[1]).any(-1).float().mean() > 0.2
    torch.testing.assert_close(d.log_prob(x), log_prob, atol=1e-4, rtol=0)
    text = prior.decode(torch.tensor([[*lm.tokenizer("Great", add_special_tokens=False)[
        "input_ids"], lm.eos_token_ids[1], 7]]))
    assert text == ["Great"]


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_decoding_never_cuts_a_character_silently(load, arch):
    lm = load(arch)
    ids = lm.tokenizer(UNICODE, add_special_tokens=False)["input_ids"]
    full = lm.tokenizer.decode(ids)
    assert full == UNICODE
    eos, cuts = lm.eos_token_id, 0
    for k in range(1, len(ids) + 1):
        x = torch.tensor(ids[:k] + [eos])
        replaced = lm.decode(x)
        assert replaced == lm.tokenizer.decode(ids[:k], skip_special_tokens=True)
        dropped = lm.decode(x, errors="drop")
        assert "\ufffd" not in dropped and full.startswith(dropped)
        if "\ufffd" in replaced:  # cut inside a character
            cuts += 1
            # the text of the tokens before the cut character (these tokenizers' tokens
            # never straddle one); byte fallback replaces every byte of a run of byte
            # tokens that ends mid-character ("日" and a cut "本": four U+FFFD), drop not
            whole = max(j for j in range(k + 1)
                        if "\ufffd" not in lm.tokenizer.decode(ids[:j]))
            assert dropped == lm.tokenizer.decode(ids[:whole])
            with pytest.raises(ValueError, match="x: the completion ends inside a multi-byte"):
                lm.decode(x, errors="strict")
        else:
            assert dropped == replaced == lm.decode(x, errors="strict")
    assert cuts >= 6  # é ï ü 東 京 🙂 (byte-level) or 日 本 € (byte fallback), cut inside
    # in a batch the error names the row; a completion truncated at T is cut the same way
    cut = next(k for k in range(1, len(ids)) if lm.decode(torch.tensor(ids[:k])).endswith(
        "\ufffd"))
    batch = torch.tensor([ids[:cut - 1] + [eos], ids[:cut]])
    with pytest.raises(ValueError, match=r"x\[1\]: the completion ends inside"):
        lm.decode(batch, errors="strict")
    # a prompt cut inside a character (token ids) is scored like any other
    d = LMDistribution(lm, torch.tensor(ids[:cut]), T)
    assert torch.isfinite(d.log_prob(d.sample((3,)))).all()


# ---------------------------------------------------------------------- exact inference
def exact_log_z(lm, prompt_ids, reward):
    r"""log Z for T = 2 by hand from the HF model: one pass over the prompt gives
    :math:`p(x_1)`, one pass over the V prompts + x_1 gives every :math:`p(x_2 | x_1)`;
    the reward is evaluated on all V^2 canonical pairs."""
    eos, pad, v = lm.eos_token_ids, lm.pad_token_id, lm.vocab_size
    with torch.no_grad():
        p1 = lm.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].double().log_softmax(-1)
        rows = torch.cat([torch.tensor(prompt_ids).expand(v, -1), torch.arange(v)[:, None]], -1)
        p2 = lm.model(input_ids=rows).logits[:, -1].double().log_softmax(-1)  # (V, V)
    first, second = torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij")
    x = torch.stack([first, second], -1).reshape(-1, 2)
    ended = is_eos(x[:, 0], eos)
    keep = ~ended | (x[:, 1] == pad)  # after an EOS only padding (one value per EOS)
    x = x[keep]
    log_p = p1[x[:, 0]] + torch.where(is_eos(x[:, 0], eos), 0.0, p2[x[:, 0], x[:, 1]])
    assert math.isclose(float(log_p.exp().sum()), 1.0, rel_tol=1e-9)
    return float((log_p + reward(x).double()).logsumexp(0))


def test_smc_and_importance_match_exact_on_llama_with_two_eos(load):
    """Llama (two EOS ids) with the second EOS made likely at the first token, T = 2:
    finished particles stop at either EOS; log Z of SMC and Importance is unbiased against
    the hand-exact log Z (64 independent replicates each)."""
    lm = load("llama")
    prior = lm.trainable_copy().requires_grad_(False)
    prompt = lm.tokenizer(PROMPTS[0])["input_ids"]
    eos = lm.eos_token_ids
    with torch.no_grad():
        head = prior.model.get_output_embeddings().weight
        top = prior(torch.tensor([prompt]))[0][0, -1].argmax()
        head[eos[1]] = 3 * head[top]
    favoured = torch.arange(0, lm.vocab_size, 7)

    def score(x):  # +1 per favoured token before the first EOS, +1 for ending with eos[1]
        counted = counted_mask(x, eos) & torch.isin(x, favoured)
        return counted.sum(-1).float() + (x == eos[1]).any(-1).float()

    reward = Callable(score, name="favoured")
    log_z = exact_log_z(prior, prompt, reward)

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", LMDistribution(prior, prompts, 2))
            pyro.factor("reward", reward(x))

    prompts = [PROMPTS[0]] * 64
    pyro.set_rng_seed(0)
    for post in (SMC(model, num_particles=32).run(prompts),
                 Importance(model, num_samples=32).run(prompts)):
        x = post.samples["x"]
        assert (x == eos[1]).any() and (x[..., 0] == eos[1]).any()
        assert bool(LMDistribution(prior, prompts, 2).support.check(x).all())
        ratio = (post.log_normalizer() - log_z).exp().double()
        se = ratio.std() / math.sqrt(ratio.numel())
        assert abs(ratio.mean() - 1) < 4 * se, (type(post).__name__, ratio.mean(), se)
