r"""Weighted samples from a posterior: the common result of Importance, SMC and QRS.

With samples :math:`x_i` and log-weights :math:`\log w_i` (per prompt),

.. math::

    \hat Z = \frac1N \sum_i w_i, \qquad
    \bar w_i = w_i / \sum_j w_j, \qquad
    \mathrm{ESS} = \Big(\sum_i w_i\Big)^2 \Big/ \sum_i w_i^2 .
"""

from __future__ import annotations

import math

import torch

__all__ = ["WeightedPosterior", "check_log_weights"]


def check_log_weights(log_weights: torch.Tensor, name: str = "log_weights",
                      nan_cause: str = "a reward or log-probability returned NaN",
                      fix: str = "Draw more samples, use a guide closer to the posterior (or "
                                 "SMC), or relax the -inf factors") -> None:
    """Raise a clear error if any weight is NaN or every weight of a prompt is ``-inf``.

    :param str name: what the error names (the argument or the algorithm).
    :param str nan_cause: the likely cause of a NaN, for the message.
    :param str fix: how to fix all-``-inf`` weights, for the message.
    """
    if torch.isnan(log_weights).any():
        raise ValueError(f"{name}: NaN log-weights; {nan_cause}")
    dead = torch.isneginf(log_weights).all(0)
    if dead.any():
        which = dead.reshape(-1).nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"{name}: all {log_weights.shape[0]} samples have weight zero (log-weight -inf) "
            f"for batch element(s) {which}: none satisfied the model's hard constraints. {fix}")


class WeightedPosterior:
    """Weighted samples over a model's latent sites.

    :param dict samples: site → tensor with a leading sample dimension ``N``.
    :param torch.Tensor log_weights: ``(N, *batch)`` log importance weights.
    :param dict lms: site → :class:`~pyro_lm.CausalLM`, to decode LM sites.
    :param torch.Tensor log_normalizer: an estimate of :math:`\\log Z` to report
        instead of the importance-sampling one (SMC's product of averages).
    :param dict history: per-step records (SMC: ``ess``, ``resampled``, ``log_Z``).
    :param dict log_likelihood: optional per-sample log-densities for diagnostics.
    """

    def __init__(self, samples: dict, log_weights: torch.Tensor, lms: dict | None = None,
                 log_normalizer: torch.Tensor | None = None, history: dict | None = None,
                 extras: dict | None = None):
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
        return torch.logsumexp(self.log_weights, 0) - math.log(self.num_samples)

    def log_normalizer_stderr(self) -> torch.Tensor:
        r"""Delta-method standard error of the importance-sampling :math:`\log \hat Z`:
        :math:`\mathrm{sd}(w) / (\sqrt N\, \bar w)`."""
        lw = self.log_weights - self.log_weights.max(0).values
        w = lw.exp()
        return w.std(0, unbiased=True) / (math.sqrt(self.num_samples) * w.mean(0))

    def ess(self) -> torch.Tensor:
        """Kish effective sample size, shape ``batch``."""
        lw = self.log_weights
        return torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))

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
        out = {}
        for site, value in self.samples.items():
            event = value.shape[1 + len(batch):]
            gather = idx.reshape(idx.shape + (1,) * len(event)).expand((m,) + batch + event)
            out[site] = value.gather(0, gather) if batch or event else value[idx]
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
