r"""Resampling schemes for particle populations, batched over independent populations.

Given log-weights of shape ``(N, *batch)`` (``N`` particles for each batch
element), a scheme returns ancestor indices of the same shape: particle ``i``
of batch element ``b`` is replaced by particle ``index[i, b]`` of that element.

*Systematic* resampling uses one uniform per population,

.. math::

    U_i = \frac{i + U}{N},\quad U \sim \mathcal U[0, 1), \qquad
    a_i = \min\{j : \textstyle\sum_{k \le j} \bar w_k > U_i\},

which keeps :math:`E[\#\{i: a_i = j\}] = N \bar w_j` with lower variance than
*multinomial* resampling.

The particles of a population are exchangeable, so any permutation of its ancestor
indices is the same resampling. :func:`stay_in_place` picks the one that leaves every
surviving particle in its own row (:math:`a_j = j` whenever :math:`j` is an ancestor),
so that a reorder of per-row state (a KV cache) need only copy the
:math:`N - \#\{\text{distinct ancestors}\}` rows whose particle died.

References:

[1] G. Kitagawa, "Monte Carlo filter and smoother for non-Gaussian nonlinear state
space models", JCGS, 1996.
[2] R. Douc, O. Cappé, E. Moulines, "Comparison of resampling schemes for particle
filtering", ISPA, 2005.
"""

from __future__ import annotations

import torch

__all__ = ["RESAMPLERS", "multinomial_resample", "resample", "stay_in_place",
           "systematic_resample"]


def _normalized(log_weights: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` normalised weights; a population whose weights are all zero is uniform
    (the caller reports it: resampling cannot revive it)."""
    n = log_weights.shape[0]
    w = torch.softmax(log_weights.reshape(n, -1).T.float(), dim=-1)
    return w.nan_to_num_(nan=1.0 / n)  # all -inf: softmax is NaN


def systematic_resample(log_weights: torch.Tensor, generator=None) -> torch.Tensor:
    """Systematic resampling of each population; see the module docstring.

    :param torch.Tensor log_weights: ``(N, *batch)``.
    :returns: LongTensor ``(N, *batch)`` of ancestor indices in ``[0, N)``; a particle of
        weight zero is never an ancestor unless its whole population has weight zero.
    """
    n = log_weights.shape[0]
    w = _normalized(log_weights)  # (B, N)
    cdf = w.cumsum(-1)
    total = cdf[:, -1:].contiguous()  # 1 up to rounding
    u = torch.rand((w.shape[0], 1), device=w.device, dtype=w.dtype, generator=generator)
    u = (torch.arange(n, device=w.device, dtype=w.dtype) + u).mul_(total / n)
    # ancestor i has cdf[i-1] <= U_i < cdf[i], a bin of positive weight; rounding may put U_i
    # at or past the total: then the last particle of positive weight closes the range
    index = torch.searchsorted(cdf, u, right=True)
    return torch.minimum(index, torch.searchsorted(cdf, total)).T.reshape(log_weights.shape)


def multinomial_resample(log_weights: torch.Tensor, generator=None) -> torch.Tensor:
    """Multinomial resampling: ``N`` independent draws per population.

    :param torch.Tensor log_weights: ``(N, *batch)``.
    :returns: LongTensor ``(N, *batch)`` of ancestor indices in ``[0, N)``.
    """
    n = log_weights.shape[0]
    index = torch.multinomial(_normalized(log_weights), n, replacement=True, generator=generator)
    return index.T.reshape(log_weights.shape)


def stay_in_place(ancestors: torch.Tensor) -> torch.Tensor:
    """The ancestors of each population permuted so that every surviving particle keeps its
    own row, batched (no host sync).

    :param torch.Tensor ancestors: LongTensor ``(N, *batch)`` in ``[0, N)``.
    :returns: LongTensor ``(N, *batch)``, per population a permutation of ``ancestors``
        with ``out[j] = j`` for every ``j`` that occurs in it; the extra copies fill the
        rows of the particles that died, in order.
    """
    n = ancestors.shape[0]
    a = ancestors.reshape(n, -1).T.sort(-1).values  # (B, N), sorted
    rows = torch.arange(n, device=a.device).expand_as(a)
    counts = torch.zeros_like(a).scatter_add_(-1, a, torch.ones_like(a))
    first = torch.ones_like(a, dtype=torch.bool)
    first[:, 1:] = a[:, 1:] != a[:, :-1]
    # the extra copies (not the first of their value), and the rows of dead particles,
    # each in order and first: pair them up; the rest of both lists are survivors
    extras = a.gather(-1, torch.sort(first.to(torch.uint8), dim=-1, stable=True).indices)
    dead = torch.sort((counts > 0).to(torch.uint8), dim=-1, stable=True).indices
    fill = (counts == 0).sum(-1, keepdim=True) > rows  # pair m is one of the dead rows
    out = torch.empty_like(a).scatter_(-1, dead, torch.where(fill, extras, dead))
    return out.T.reshape(ancestors.shape)


RESAMPLERS = {"systematic": systematic_resample, "multinomial": multinomial_resample}


def resample(log_weights: torch.Tensor, scheme: str = "systematic", generator=None):
    """Ancestor indices ``(N, *batch)`` by the named ``scheme``."""
    if scheme not in RESAMPLERS:
        raise ValueError(f"resampling: expected one of {sorted(RESAMPLERS)}, got {scheme!r}")
    return RESAMPLERS[scheme](log_weights, generator=generator)
