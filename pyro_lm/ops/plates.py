r"""Plate arithmetic for per-sample log-densities: the one plate rule.

A vectorised run of a program puts ``N`` samples on a particle dim left of the
model's ``n`` plate dims, so every site's log-density is a tensor whose last
``n + 1`` dims are ``(N, d_{-n}, ..., d_{-1})`` (missing dims have size 1).
The weight of a sample is kept separate along the plate dims that *every*
scored site shares (independent problems, e.g. prompts) and summed along all
others (a site outside a plate couples that plate's elements, so they share one
weight): ``batch`` below holds the size of a kept dim and 1 for a summed one.
"""

from __future__ import annotations

import torch

__all__ = ["aligned", "sum_to_batch", "check_plated"]


def aligned(log_prob, n: int, name: str = "site") -> torch.Tensor:
    """``log_prob`` as a tensor with exactly ``n + 1`` dims (size-1 dims added on the left).

    :raises ValueError: naming ``name`` if it has more dims than the particle and plate dims.
    """
    if not isinstance(log_prob, torch.Tensor):
        log_prob = torch.as_tensor(log_prob)
    if log_prob.dim() > n + 1:
        raise ValueError(f"site {name!r}: log-density of shape {tuple(log_prob.shape)} has more "
                         f"dims than the particle and plate dims ({n + 1}); declare every batch "
                         "dim of this site with a pyro.plate (or move it to the event with "
                         ".to_event)")
    return log_prob.reshape((1,) * (n + 1 - log_prob.dim()) + tuple(log_prob.shape))


def sum_to_batch(log_prob, batch: torch.Size, name: str = "site") -> torch.Tensor:
    """Sum an aligned-or-not log-density down to ``(N or 1, *batch)``: every dim where
    ``batch`` is 1 is summed (kept as size 1).

    >>> sum_to_batch(torch.ones(2, 3, 4), torch.Size((3, 1))).shape
    torch.Size([2, 3, 1])
    """
    t = aligned(log_prob, len(batch), name)
    dims = [d for d, size in enumerate(batch, start=1) if size == 1 and t.shape[d] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def check_plated(shape, plate_dims, n: int, name: str = "site") -> None:
    """Check that a site's batch ``shape`` (aligned to ``n`` plate dims on the right, any
    particle dims on the left) has a size above 1 only in dims that its plates declare.

    :param plate_dims: the negative dims of the site's plates.
    :raises ValueError: naming the site and the dim: a factor outside a plate whose value
        keeps that plate's dim (``reward(x).sum(-1)`` where ``keepdim=True`` was meant)
        would otherwise land on another dim.
    """
    shape = tuple(shape)[-n:] if n else ()
    for d in range(-len(shape), 0):
        if shape[d] > 1 and d not in plate_dims:
            raise ValueError(
                f"site {name!r}: its log-density has a batch dim {d} of size {shape[d]} that no "
                "plate around it declares. The program runs vectorised, with a particle dim "
                "left of its plates, so a site outside a plate must keep that plate's dim "
                "with size 1: pyro.factor('r', reward(x).sum(-1, keepdim=True)), or sit "
                "inside the plate")
