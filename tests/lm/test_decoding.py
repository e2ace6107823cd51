"""The token draw: inverse-CDF sampling has the law softmax(logits), -inf and bf16 included."""

import math

import pytest
import torch
from scipy.stats import chisquare

from pyro_lm.lm import decoding
from pyro_lm.lm.decoding import draw_restricted_tokens, draw_tokens


def chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the draws ``tokens`` against ``probs`` (float64, the cells of positive
    probability; a draw of a zero-probability cell fails outright)."""
    counts = torch.bincount(tokens, minlength=probs.shape[0]).double()
    zero = probs == 0
    assert counts[zero].sum() == 0, "a token of probability 0 was drawn"
    n = counts.sum()
    return chisquare(counts[~zero].numpy(), (n * probs[~zero]).numpy()).pvalue


ROWS = {
    "plain": [1.0, -0.5, 2.0, 0.0, -3.0, 0.7],
    "with -inf": [0.3, -math.inf, 1.2, -math.inf, -0.4, 0.0],
    "one finite": [-math.inf, -math.inf, 4.0, -math.inf, -math.inf, -math.inf],
    "last finite": [-math.inf] * 5 + [-7.0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row", sorted(ROWS))
def test_draws_follow_softmax(device, row, dtype):
    n = 20000
    logits = torch.tensor(ROWS[row], device=device).to(dtype)
    # the exact law of the logits as given (bf16 values are exact in float64)
    probs = logits.double().softmax(-1).cpu()
    generator = torch.Generator(device).manual_seed(0)
    tokens = draw_tokens(logits.expand(n, -1), generator=generator)
    assert tokens.dtype == torch.long and tokens.shape == (n,) and tokens.device == logits.device
    if (probs > 0).sum() == 1:
        assert (tokens.cpu() == probs.argmax()).all()
    else:
        assert chi_square_p(tokens.cpu(), probs) > 1e-3


def test_draws_follow_softmax_over_a_large_vocabulary():
    """At V = 50257 the running sum is long: cells grouped into 20 bins of the CDF."""
    v = 50257
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(v, generator=generator) * 2
    logits[torch.randperm(v, generator=generator)[:1000]] = -math.inf
    probs = logits.double().softmax(-1)
    tokens = torch.cat([draw_tokens(logits.expand(500, -1), generator=generator)
                        for _ in range(6)])
    assert torch.isfinite(logits[tokens]).all()
    edges = torch.linspace(0, v, 21).long()
    binned = torch.bucketize(tokens, edges[1:-1], right=True)
    cell = torch.stack([probs[a:b].sum() for a, b in zip(edges[:-1], edges[1:], strict=True)])
    assert chi_square_p(binned, cell) > 1e-3


def test_rows_draw_independently_from_their_own_logits():
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, -math.inf, 0.0],
                           [-math.inf, 0.0, -math.inf]])
    tokens = draw_tokens(logits.repeat(50, 1)).reshape(50, 3)
    assert (tokens == torch.tensor([0, 2, 1])).all()
    batched = draw_tokens(logits.expand(4, 3, 3))  # any leading shape
    assert batched.shape == (4, 3) and (batched == torch.tensor([0, 2, 1])).all()


def test_log_prob_is_the_log_softmax_of_the_draw():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 300, generator=generator) * 3
    logits[:, :100] = -math.inf
    tokens, log_prob = draw_tokens(logits, generator=generator, return_log_prob=True)
    expected = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    assert log_prob.dtype == torch.float32
    assert torch.allclose(log_prob, expected, atol=1e-5)
    assert (tokens >= 100).all()


@pytest.mark.parametrize("finite", [1, 2, 3, 5])
def test_the_largest_uniform_never_reaches_a_minus_inf_token(monkeypatch, finite):
    """torch.rand's largest float32, 1 - 2**-24, times the row's total mass rounds below the
    total (also for totals that are powers of two): the draw stays on the last token of
    positive mass, whatever the number of equal finite logits before the -inf ones."""
    real_rand = torch.rand_like
    monkeypatch.setattr(decoding.torch, "rand_like",
                        lambda *a, **k: real_rand(*a, **k).fill_(1 - 2**-24))
    logits = torch.tensor([[0.0] * finite + [-math.inf] * 3])
    assert draw_tokens(logits).tolist() == [finite - 1]
    everywhere = torch.randn(8, 4000) * 5  # many totals
    everywhere[:, -100:] = -math.inf
    assert (draw_tokens(everywhere) < 3900).all()


def test_a_row_of_minus_inf_draws_a_token_in_range():
    assert 0 <= draw_tokens(torch.full((1, 6), -math.inf)).item() < 6


def test_a_generator_makes_draws_reproducible():
    logits = torch.randn(16, 50)
    a = draw_tokens(logits, generator=torch.Generator().manual_seed(3))
    b = draw_tokens(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


MASKS = {"some": [1, 0, 1, 1, 0, 1], "one": [0, 0, 1, 0, 0, 0], "last": [0, 0, 0, 0, 0, 1]}


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("row", sorted(ROWS))
def test_restricted_draws_follow_the_restricted_softmax(device, row, mask, dtype, mask_dtype):
    """The law softmax(logits) on the allowed set, and log R its log-mass, exactly."""
    n = 20000
    logits = torch.tensor(ROWS[row], device=device).to(dtype)
    allowed = torch.tensor(MASKS[mask], device=device).bool()
    probs = logits.double().softmax(-1).cpu()
    kept = probs * allowed.cpu()
    mass = kept.sum()
    generator = torch.Generator(device).manual_seed(0)
    tokens, log_mass, log_r = draw_restricted_tokens(logits.expand(n, -1),
                                                     allowed.to(mask_dtype).expand(n, -1),
                                                     generator=generator, return_log_prob=True)
    assert tokens.shape == log_mass.shape == log_r.shape == (n,)
    assert tokens.device == logits.device
    assert log_mass.dtype == torch.float32
    if mass == 0:  # nothing allowed has positive mass: the row is a dead end
        assert torch.isneginf(log_mass).all() and (tokens >= 0).all() and (tokens < 6).all()
        return
    assert torch.allclose(log_mass.cpu().double(), mass.log().expand(n), atol=1e-5)
    law = kept / mass
    assert torch.allclose(log_r.cpu().double(), law.log()[tokens.cpu()], atol=1e-5)
    if (kept > 0).sum() == 1:
        assert (tokens.cpu() == kept.argmax()).all()
    else:
        assert chi_square_p(tokens.cpu(), law) > 1e-3


def test_a_restricted_set_of_underflowing_mass_is_drawn_exactly():
    """Allowed tokens 120 nats below the row's maximum: exp underflows in float32 when the
    shift is the row's maximum, so those rows are drawn again shifted by the allowed one."""
    n = 20000
    logits = torch.tensor([0.0, 0.0, -120.0, -121.0, 3.0]).expand(n, -1)
    allowed = torch.tensor([0, 0, 1, 1, 0]).bool().expand(n, -1)
    tokens, log_mass, log_r = draw_restricted_tokens(
        logits, allowed, generator=torch.Generator().manual_seed(1), return_log_prob=True)
    exact = logits[0].double().log_softmax(-1)[2:4]
    assert torch.allclose(log_mass.double(), exact.logsumexp(-1).expand(n), atol=1e-4)
    probs = torch.zeros(5, dtype=torch.float64)
    probs[2:4] = exact.softmax(-1)
    assert torch.allclose(log_r.double(), probs.log()[tokens], atol=1e-5)
    assert chi_square_p(tokens, probs) > 1e-3


def test_restricted_empty_and_normal_rows_side_by_side():
    """Empty rows (ended or dead particles) get log R = -inf without disturbing the others."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(4))
    allowed = torch.rand(8, 50, generator=torch.Generator().manual_seed(5)) < 0.3
    allowed[[1, 6]] = False
    tokens, log_mass = draw_restricted_tokens(logits, allowed)
    assert torch.isneginf(log_mass[[1, 6]]).all()
    grid, grid_mass = draw_restricted_tokens(logits.reshape(2, 4, 50), allowed.reshape(2, 4, 50))
    assert grid.shape == grid_mass.shape == (2, 4)  # any leading shape
    assert torch.equal(torch.isneginf(grid_mass).reshape(-1), torch.isneginf(log_mass))
    live = [0, 2, 3, 4, 5, 7]
    assert allowed[live, tokens[live]].all()
    expected = logits.masked_fill(~allowed, -math.inf).logsumexp(-1) - logits.logsumexp(-1)
    assert torch.allclose(log_mass[live], expected[live], atol=1e-5)


def test_the_largest_uniform_stays_in_the_restricted_set(monkeypatch):
    real_rand = torch.rand_like
    monkeypatch.setattr(decoding.torch, "rand_like",
                        lambda *a, **k: real_rand(*a, **k).fill_(1 - 2**-24))
    logits = torch.zeros(3, 6)
    allowed = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]]).bool()
    tokens, _ = draw_restricted_tokens(logits, allowed)
    assert tokens.tolist() == [1, 3, 5]
