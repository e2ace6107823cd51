"""Prefix evaluation helpers against a plain-Python reference, on every prefix length."""

import pytest
import torch

from pyro_lm.distributions.prefix import (
    counted_mask,
    generated_mask,
    is_complete,
    prefix_context,
    prefix_length,
)


def reference(row, t, eos):
    """``(generated, counted, complete)`` of one row as Python lists, the definitions."""
    big_t = len(row)
    t = big_t if t is None else t
    generated = [i < t for i in range(big_t)]
    first_eos = next((i for i in range(min(t, big_t)) if row[i] == eos), None)
    counted = [generated[i] and (first_eos is None or i < first_eos) for i in range(big_t)]
    complete = t >= big_t or first_eos is not None
    return generated, counted, complete


@pytest.mark.parametrize("pad", [0, 5], ids=["pad-is-eos", "pad-differs"])
def test_masks_match_their_definitions_on_every_prefix(pad):
    eos, big_t = 0, 6
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (40, big_t), generator=g)  # many EOS (0), at every position
    for t in [None, *range(big_t + 1)]:
        value = x.clone()
        if t is not None:
            value[:, t:] = pad  # positions not generated yet hold padding
        ctx = prefix_context(t) if t is not None else torch.no_grad()
        with ctx:
            assert prefix_length() == t
            gen, cnt, done = generated_mask(value), counted_mask(value, eos), is_complete(
                value, eos)
        for i, row in enumerate(value.tolist()):
            ref = reference(row, t, eos)
            assert gen[i].tolist() == ref[0], (t, row)
            assert cnt[i].tolist() == ref[1], (t, row)
            assert bool(done[i]) == ref[2], (t, row)


def test_masks_keep_batch_dims():
    x = torch.tensor([[[1, 0, 2], [3, 3, 3]]])  # (1, 2, 3)
    with prefix_context(2):
        assert counted_mask(x, 0).tolist() == [[[True, False, False], [True, True, False]]]
        assert is_complete(x, 0).tolist() == [[True, False]]
        assert generated_mask(x).shape == x.shape


def test_negative_prefix_length_is_an_error():
    with pytest.raises(ValueError, match="length"):
        with prefix_context(-1):
            pass
