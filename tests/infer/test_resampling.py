"""Resampling keeps survivors in place, so KV reorders copy only the rows that changed."""

import math

import pytest
import torch

from pyro_lm.infer.resampling import multinomial_resample, stay_in_place, systematic_resample
from pyro_lm.infer.smc_population import Populations


@pytest.mark.parametrize("scheme", [systematic_resample, multinomial_resample])
def test_stay_in_place_is_a_permutation_keeping_survivors(scheme):
    n, b = 16, 50
    log_w = 3 * torch.randn(n, b)
    log_w[5:, :10] = -math.inf  # some populations with few survivors
    ancestors = scheme(log_w)
    out = stay_in_place(ancestors)
    assert out.shape == ancestors.shape
    # per population the same multiset of ancestors
    torch.testing.assert_close(out.sort(0).values, ancestors.sort(0).values, rtol=0, atol=0)
    # every ancestor j sits in row j
    rows = torch.arange(n)[:, None].expand(n, b)
    survives = torch.zeros(n, b, dtype=torch.bool).scatter_(0, ancestors, True)
    assert (out[survives] == rows[survives]).all()
    # so the changed rows are exactly those of particles that died
    assert ((out != rows) == ~survives).all()


class _Recorder:
    """A stand-in decoder that records the ancestor index of each reorder."""

    filler_token = 1

    def __init__(self):
        self.indices = []

    def reorder(self, index, logits=True):
        self.indices.append(index.clone())


def test_only_populations_that_need_it_change_rows():
    """Three prompts of eight particles: only the middle one has a low ESS. Its survivors
    keep their rows; the other two prompts get an identity index."""
    n, b = 8, 3
    decoder = _Recorder()
    pop = Populations(torch.Size((n, b)), 4, 0, 0, 0.5, "systematic", (decoder,),
                      torch.device("cpu"))
    increment = torch.zeros(n, b)
    increment[:, 1] = torch.tensor([0.0, 5.0, -20.0, -20.0, 4.0, -20.0, -20.0, -20.0])
    pop.reweight(torch.zeros(n * b), increment.reshape(-1))
    index = pop.resample()
    assert index is not None and len(decoder.indices) == 1
    index = index.view(n, b)
    rows = torch.arange(n)[:, None] * b + torch.arange(b)
    assert (index[:, 0] == rows[:, 0]).all() and (index[:, 2] == rows[:, 2]).all()
    ancestors = (index[:, 1] - 1) // b  # particle ids within the middle prompt
    assert set(ancestors.tolist()) <= {1, 4}
    for j in set(ancestors.tolist()):
        assert index[j, 1] == rows[j, 1]
    assert pop.history()["resampled"].tolist() == [[False, True, False]]


@pytest.mark.parametrize("resampling", ["systematic", "multinomial"])
def test_one_population_keeps_survivors_in_place(resampling):
    """One prompt on the host (its own code path): the same permutation rule."""
    n = 32
    decoder = _Recorder()
    pop = Populations(torch.Size((n,)), 4, 0, 0, 0.5, resampling, (decoder,),
                      torch.device("cpu"))
    increment = torch.full((n,), -30.0)
    increment[torch.tensor([3, 7, 8, 20])] = torch.tensor([0.0, 1.0, 0.5, 2.0])
    pop.reweight(torch.zeros(n), increment)
    index = pop.resample()
    ancestors = set(index.tolist())
    assert ancestors <= {3, 7, 8, 20} and len(index) == n
    assert all(index[j] == j for j in ancestors)
    assert torch.allclose(pop.log_w, pop.log_w[0].expand(n))  # every weight the mean
