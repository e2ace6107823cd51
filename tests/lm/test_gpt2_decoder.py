"""The lean GPT-2 decoder computes exactly what transformers computes."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro_lm
from pyro_lm.lm import decoder as decoder_module
from pyro_lm.lm import decoding, gpt2_decoder, toy_lm
from pyro_lm.lm.decoder import Decoder
from pyro_lm.lm.decoding import IncrementalDecoder, make_decoder
from pyro_lm.lm.gpt2_decoder import GPT2Decoder, supports_fast_decoding


def reference_logits(lm, ids, mask, fed):
    """Next-token logits after the prompt and the fed tokens, by one full forward pass."""
    full_ids = torch.cat([ids, fed], dim=-1)
    full_mask = torch.cat([mask, torch.ones_like(fed)], dim=-1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = lm(full_ids, full_mask, positions)
    return logits[:, -1].float()


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers_step_by_step(device, padded):
    lm = toy_lm(vocab_size=16, n_layer=2, n_embd=32, n_head=4, init_std=0.2, device=device)
    if padded:
        ids = torch.tensor([[0, 0, 3], [0, 5, 6], [0, 0, 0]], device=device)
        mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]], device=device)
    else:
        ids = torch.tensor([[0, 3], [5, 6], [1, 2]], device=device)
        mask = torch.ones_like(ids)
    decoder = make_decoder(lm, ids, mask, 5)
    assert isinstance(decoder, GPT2Decoder)
    generator = torch.Generator().manual_seed(0)
    fed = torch.zeros(3, 0, dtype=torch.long, device=device)
    for _ in range(5):
        expected = reference_logits(lm, ids, mask, fed)
        assert torch.allclose(decoder.logits, expected, atol=1e-4), (decoder.logits - expected)
        token = torch.randint(1, 16, (3,), generator=generator).to(device)
        decoder.advance(token)
        fed = torch.cat([fed, token[:, None]], dim=-1)


def test_a_replaced_head_with_a_bias_is_honoured():
    lm = toy_lm(vocab_size=16, n_layer=1, n_embd=32, n_head=4, init_std=0.2)
    lm.model.lm_head = torch.nn.Linear(32, 16, bias=True)
    torch.nn.init.normal_(lm.model.lm_head.bias)
    ids = torch.tensor([[0, 3]])
    decoder = make_decoder(lm, ids, torch.ones_like(ids), 2)
    decoder.advance(torch.tensor([4]))
    expected = reference_logits(lm, ids, torch.ones_like(ids), torch.tensor([[4]]))
    assert torch.allclose(decoder.logits, expected, atol=1e-4)


def test_reorder_moves_the_whole_state(device):
    lm = toy_lm(vocab_size=16, n_layer=2, n_embd=32, n_head=4, init_std=0.2, device=device)
    ids = torch.tensor([[0, 0, 3], [0, 5, 6], [1, 2, 4]], device=device)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], device=device)
    decoder = make_decoder(lm, ids, mask, 4)
    first = torch.tensor([7, 8, 9], device=device)
    decoder.advance(first)
    index = torch.tensor([2, 2, 0], device=device)
    decoder.reorder(index)
    second = torch.tensor([1, 2, 3], device=device)
    decoder.advance(second)
    fed = torch.stack([first[index], second], dim=-1)
    expected = reference_logits(lm, ids[index], mask[index], fed)
    assert torch.allclose(decoder.logits, expected, atol=1e-4)


def test_repeated_reorders_never_read_unfilled_positions(device):
    """Reorders copy only the filled cache positions and swap buffers: positions past the
    current length hold stale data (here NaN) until advance writes them."""
    lm = toy_lm(vocab_size=16, n_layer=2, n_embd=32, n_head=4, init_std=0.2, device=device)
    ids = torch.tensor([[0, 0, 3], [0, 5, 6], [1, 2, 4]], device=device)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], device=device)
    decoder = make_decoder(lm, ids, mask, 5)
    decoder._kv[..., 3:, :] = float("nan")  # nothing written yet past the prompt
    rows = torch.arange(3, device=device)
    fed = torch.zeros(3, 0, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        token = torch.randint(1, 16, (3,), generator=generator).to(device)
        decoder.advance(token)
        fed = torch.cat([fed, token[:, None]], dim=-1)
        index = torch.randint(0, 3, (3,), generator=generator).to(device)
        decoder.reorder(index)
        decoder._spare.fill_(float("nan"))  # the buffer the next reorder writes into
        rows, fed = rows[index], fed[index]
        expected = reference_logits(lm, ids[rows], mask[rows], fed)
        assert torch.allclose(decoder.logits, expected, atol=1e-4), step
    decoder.advance(torch.ones(3, dtype=torch.long, device=device))
    assert torch.isfinite(decoder.logits).all()


def test_bfloat16_weights_give_float32_logits(device):
    lm = toy_lm(vocab_size=16, n_layer=1, n_embd=32, n_head=4, init_std=0.2, device=device,
                dtype=torch.bfloat16)
    ids = torch.tensor([[0, 3]], device=device)
    decoder = make_decoder(lm, ids, torch.ones_like(ids), 2)
    decoder.advance(torch.tensor([4], device=device))
    expected = reference_logits(lm, ids, torch.ones_like(ids), torch.tensor([[4]], device=device))
    assert decoder.logits.dtype == torch.float32
    assert torch.allclose(decoder.logits, expected, atol=0.1)  # bf16 rounding


def lora_guide(prior, seed=0, **options):
    """A LoRA guide of ``prior`` whose adapters are switched on (random B, not peft's zeros)."""
    config = dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                  fan_in_fan_out=True, lora_dropout=0.1)
    config.update(options)
    guide = prior.trainable_copy(lora=config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in guide.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.device) * 0.5)
    return guide


def test_lora_guides_take_the_fast_path_and_match_transformers(device):
    pytest.importorskip("peft")
    prior = toy_lm(vocab_size=16, n_layer=2, n_embd=32, n_head=4, init_std=0.2, device=device)
    guide = lora_guide(prior).train()  # training mode: decoding is still without dropout
    ids = torch.tensor([[0, 0, 3], [0, 5, 6], [1, 2, 4]], device=device)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], device=device)
    assert supports_fast_decoding(guide.model)
    decoder = make_decoder(guide, ids, mask, 4)
    assert isinstance(decoder, GPT2Decoder)
    fed = torch.zeros(3, 0, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            expected = reference_logits(guide, ids, mask, fed)
            assert torch.allclose(decoder.logits, expected, atol=1e-4)
            # the adapters matter: the prior's logits differ
            assert not torch.allclose(decoder.logits, reference_logits(prior, ids, mask, fed),
                                      atol=1e-2)
            token = torch.randint(1, 16, (3,), generator=generator).to(device)
            decoder.advance(token)
            fed = torch.cat([fed, token[:, None]], dim=-1)
        guide.model.disable_adapter_layers()  # adapters off: the prior's logits
        decoder = make_decoder(guide, ids, mask, 4)
        assert torch.allclose(decoder.logits, reference_logits(prior, ids, mask, fed[:, :0]),
                              atol=1e-4)


def test_other_models_use_the_generic_decoder(tiny_lm):
    pytest.importorskip("peft")
    ids = torch.zeros(2, 1, dtype=torch.long)
    unsupported = {
        "DoRA": lora_guide(tiny_lm, use_dora=True),
        "LoRA on the embeddings": lora_guide(tiny_lm, target_modules=["wte"],
                                             fan_in_fan_out=False),
    }
    subclass = type("MyGPT2", (type(tiny_lm.model),), {})(tiny_lm.model.config)
    unsupported["a GPT-2 subclass"] = pyro_lm.CausalLM(subclass, tiny_lm.tokenizer)
    for name, lm in unsupported.items():
        assert not supports_fast_decoding(lm.model), name
        assert isinstance(make_decoder(lm, ids, torch.ones_like(ids), 3), IncrementalDecoder)


@pytest.mark.parametrize("index", [[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 4, 5], [0, 0, 1, 3, 4, 5],
                                   [0, 1, 2, 2, 4, 4], [5, 5, 0, 1, 2, 3]])
@pytest.mark.parametrize("fast", [True, False])
def test_reorder_of_changed_rows_equals_the_full_gather(monkeypatch, index, fast):
    """A few changed rows (swaps and chains included) are copied in place, many by a full
    gather:
    either way the state is that of the rows ``index``."""
    monkeypatch.setattr(decoding, "FAST_DECODING", fast)
    lm = toy_lm(vocab_size=16, n_layer=2, n_embd=32, n_head=4, init_std=0.2)
    ids = torch.tensor([[0, 0, 3], [0, 5, 6], [1, 2, 4], [0, 0, 1], [3, 3, 3], [0, 2, 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]])
    index = torch.tensor(index)
    with torch.inference_mode():
        decoder = make_decoder(lm, ids, mask, 4)
        first = torch.tensor([7, 8, 9, 10, 11, 12])
        decoder.advance(first)
        if fast:
            before = decoder._kv[..., :decoder.length, :].clone()
        else:
            before = [(layer.keys.clone(), layer.values.clone()) for layer in decoder.cache.layers]
        logits = decoder.logits.clone()
        decoder.reorder(index)
        if fast:
            assert torch.equal(decoder._kv[..., :decoder.length, :], before[:, :, index])
        else:
            for layer, (k, v) in zip(decoder.cache.layers, before, strict=True):
                assert torch.equal(layer.keys, k[index]) and torch.equal(layer.values, v[index])
        assert torch.equal(decoder.logits, logits[index])
        second = torch.tensor([1, 2, 3, 4, 5, 6])
        decoder.advance(second)
        expected = reference_logits(lm, ids[index], mask[index],
                                    torch.stack([first[index], second], dim=-1))
        assert torch.allclose(decoder.logits, expected, atol=1e-4)


def test_sampling_agrees_with_log_prob_on_both_paths(monkeypatch):
    lm = toy_lm(vocab_size=8, n_layer=2, n_embd=32, n_head=4, init_std=0.3)
    dist = pyro_lm.LMDistribution(lm, ["t1", ""], 6)
    for fast in (True, False):
        monkeypatch.setattr(decoding, "FAST_DECODING", fast)
        x, log_prob = dist.sample_with_log_prob((50,))
        assert torch.allclose(log_prob, dist.log_prob(x), atol=1e-4)


def test_both_decoders_are_decoders(tiny_lm):
    ids = torch.zeros(2, 1, dtype=torch.long)
    guide = tiny_lm.trainable_copy(lora=dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    dora = tiny_lm.trainable_copy(lora=dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                            use_dora=True))
    for lm in (tiny_lm, guide, dora):
        decoder = make_decoder(lm, ids, torch.ones_like(ids), 3)
        assert isinstance(decoder, Decoder)
        decoder.reorder(torch.tensor([1, 1]))
        decoder.advance(torch.full((2,), decoder.filler_token))
        assert decoder.logits.shape == (2, lm.vocab_size)


def test_decoder_modules_import_without_a_cycle():
    # the decoders import the protocol, not decoding.py (which imports them)
    for module in (decoder_module, gpt2_decoder):
        imported = {node.module for node in ast.walk(ast.parse(Path(module.__file__).read_text()))
                    if isinstance(node, ast.ImportFrom)}
        assert "pyro_lm.lm.decoding" not in imported, module.__name__
    for name in ("pyro_lm.lm.gpt2_decoder", "pyro_lm.lm.decoder"):  # fresh interpreters
        subprocess.run([sys.executable, "-c", f"import {name}"], check=True)


@pytest.mark.parametrize("padded", [False, True])
def test_shared_positions_are_read_from_one_copy_exactly(monkeypatch, padded):
    """Resampling that collapses the rows onto few ancestors: the positions every row
    shares move into the one shared copy (here as soon as there is one), reorders copy only
    the rest, and the logits stay those of a full forward pass of each row's history."""
    monkeypatch.setattr(gpt2_decoder, "SHARE_AT", 1)  # runs of more than 2 tokens track lineages
    lm = toy_lm(vocab_size=16, n_layer=2, n_embd=32, n_head=4, init_std=0.2)
    n = 6
    ids = torch.tensor([[0, 3, 4]] * n) if not padded else torch.tensor([[0, 0, 4]] * n)
    mask = torch.ones_like(ids) if not padded else torch.tensor([[0, 1, 1]] * n)
    decoder = make_decoder(lm, ids, mask, 13)
    generator = torch.Generator().manual_seed(2)
    fed = torch.zeros(n, 0, dtype=torch.long)
    shared = []
    for step in range(12):
        token = torch.randint(1, 16, (n,), generator=generator)
        decoder.advance(token)
        fed = torch.cat([fed, token[:, None]], dim=-1)
        if step % 3 == 2:  # all rows from one ancestor, then a few from two
            index = torch.full((n,), int(torch.randint(n, (1,), generator=generator)))
        else:
            index = torch.randint(0, 2, (n,), generator=generator)
        decoder.reorder(index)
        fed = fed[index]
        shared.append(decoder.shared_length)
        expected = reference_logits(lm, ids, mask, fed)
        assert torch.allclose(decoder.logits, expected, atol=1e-4), step
        if decoder.shared_length:  # what is not shared any more is never read: poison it
            decoder._kv[..., : decoder.shared_length, :] = float("nan")
    assert shared[-1] >= 3 + 9 and shared == sorted(shared)  # the prompt and most tokens
    decoder.advance(torch.ones(n, dtype=torch.long))
    fed = torch.cat([fed, torch.ones(n, 1, dtype=torch.long)], dim=-1)
    assert torch.allclose(decoder.logits, reference_logits(lm, ids, mask, fed), atol=1e-4)


def test_rows_of_different_prompts_share_nothing():
    lm = toy_lm(vocab_size=16, n_layer=1, n_embd=32, n_head=4, init_std=0.2)
    ids = torch.tensor([[0, 3], [5, 6]])
    decoder = make_decoder(lm, ids, torch.ones_like(ids), 40)
    for _ in range(40):
        decoder.advance(torch.tensor([1, 2]))
        decoder.reorder(torch.tensor([1, 0]))
    assert decoder.shared_length == 0
