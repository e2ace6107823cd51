r"""Weighted samples from a posterior: the common result of Importance, SMC and QRS.

With samples :math:`x_i` and log-weights :math:`\log w_i` (per prompt),

.. math::

    \hat Z = \frac1N \sum_i w_i, \qquad
    \bar w_i = w_i / \sum_j w_j, \qquad
    \mathrm{ESS} = \Big(\sum_i w_i\Big)^2 \Big/ \sum_i w_i^2 .
"""

from __future__ import annotations

import torch

from pyro_lm.ops.stats import check_log_weights, ess, log_normalizer, log_normalizer_stderr

__all__ = ["WeightedPosterior", "check_log_weights", "take", "align_to"]


def align_to(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``t`` ``(N, *batch)`` with size-1 dims added on the right to match ``value``'s dims
    (its event dims), for ``torch.where`` between samples."""
    return t.reshape(t.shape + (1,) * (value.dim() - t.dim()))


def take(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``value`` ``(N, *vbatch, *event)`` at sample indices ``index`` ``(m, *batch)``, per
    batch element (``vbatch`` and ``batch`` broadcast: a weight joint over a plate has
    size 1 there): ``(m, *broadcast(vbatch, batch), *event)``."""
    batch = index.shape[1:]
    event = value.shape[1 + len(batch):]
    shape = torch.broadcast_shapes(value.shape[1:1 + len(batch)], batch)
    value = value.expand(value.shape[:1] + shape + event)
    return value.gather(0, index.reshape(index.shape + (1,) * len(event)).expand(
        index.shape[:1] + shape + event))


class WeightedPosterior:
    """Weighted samples over a model's latent sites.

    :param dict samples: site → tensor with a leading sample dimension ``N``.
    :param torch.Tensor log_weights: ``(N, *batch)`` log importance weights.
    :param dict lms: site → :class:`~pyro_lm.CausalLM`, to decode LM sites.
    :param torch.Tensor log_normalizer: an estimate of :math:`\\log Z` to report
        instead of the importance-sampling one (SMC's product of averages).
    :param dict history: per-step records (SMC: ``ess``, ``resampled``, ``log_Z``;
        IMH: ``accepted``, ``log_weight``).
    :param dict extras: the algorithm's other outputs (QRS: acceptance rate, bound, ...).
    :param str algorithm: the algorithm that produced it (``"Importance"``, ``"SMC"``,
        ``"QRS"``, ``"IMH"``, ...), which diagnostics read.

    ``log_weights`` has one dim per plate dim of the model (size 1 where the weight is
    joint over a plate); sample values broadcast against it.
    """

    def __init__(self, samples: dict, log_weights: torch.Tensor, lms: dict | None = None,
                 log_normalizer: torch.Tensor | None = None, history: dict | None = None,
                 extras: dict | None = None, algorithm: str | None = None):
        check_log_weights(log_weights)
        n = log_weights.shape[0]
        for site, value in samples.items():
            if value.shape[0] != n:
                raise ValueError(f"samples[{site!r}]: leading dimension {value.shape[0]} != "
                                 f"number of weights {n}")
        self.samples = samples
        self.log_weights = log_weights
        self.lms = lms or {}
        self._log_normalizer = log_normalizer
        self.history = history or {}
        self.extras = extras or {}
        self.algorithm = algorithm

    @property
    def num_samples(self) -> int:
        return self.log_weights.shape[0]

    def normalized_weights(self) -> torch.Tensor:
        """Self-normalised weights ``(N, *batch)``, summing to 1 over dim 0."""
        return torch.softmax(self.log_weights, dim=0)

    def log_normalizer(self) -> torch.Tensor:
        r"""Estimate of :math:`\log Z`, shape ``batch``."""
        if self._log_normalizer is not None:
            return self._log_normalizer
        return log_normalizer(self.log_weights)

    def log_normalizer_stderr(self) -> torch.Tensor:
        r"""Delta-method standard error of the importance-sampling :math:`\log \hat Z`:
        :math:`\mathrm{sd}(w) / (\sqrt N\, \bar w)`."""
        return log_normalizer_stderr(self.log_weights)

    def ess(self) -> torch.Tensor:
        """Kish effective sample size, shape ``batch``."""
        return ess(self.log_weights)

    def resample(self, num_samples: int | None = None, generator=None) -> dict:
        """Draw ``num_samples`` (default ``N``) samples by multinomial resampling.

        :returns: site → tensor with leading dimension ``num_samples``; batch
            elements are resampled independently.
        """
        m = num_samples or self.num_samples
        w = self.normalized_weights()
        flat = w.reshape(self.num_samples, -1).T  # (B, N)
        idx = torch.multinomial(flat, m, replacement=True, generator=generator).T  # (m, B)
        batch = self.log_weights.shape[1:]
        idx = idx.reshape((m,) + batch)
        out = {site: take(value, idx) for site, value in self.samples.items()}
        return out

    def text(self, site: str | None = None):
        """Decoded completions of an LM site (default: the only one)."""
        if site is None:
            if len(self.lms) != 1:
                raise ValueError(f"site: name one of the LM sites {sorted(self.lms)}")
            site = next(iter(self.lms))
        return self.lms[site].decode(self.samples[site])

    def __repr__(self) -> str:
        return (f"WeightedPosterior(num_samples={self.num_samples}, sites={list(self.samples)}, "
                f"batch_shape={tuple(self.log_weights.shape[1:])})")
