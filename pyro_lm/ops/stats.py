r"""Estimators over importance log-weights, written once.

For log-weights :math:`\log w_i`, :math:`i = 1..N`, along dim 0 (independent
problems, e.g. prompts, on the other dims):

.. math::

    \log \hat Z = \log \frac1N \sum_i w_i, \qquad
    \mathrm{ESS} = \frac{(\sum_i w_i)^2}{\sum_i w_i^2}, \qquad
    \mathrm{se}(\log \hat Z) \approx \frac{\mathrm{sd}(w)}{\sqrt N\, \bar w}
    \quad \text{(delta method)}.

Every function is pure: tensors in, tensors out, on the input's device.

References

[1] A. Kong, J. S. Liu, W. H. Wong, "Sequential imputations and Bayesian missing data
    problems", JASA, 1994 (effective sample size).
[2] A. B. Owen, *Monte Carlo theory, methods and examples*, 2013, ch. 9 (importance
    sampling, the delta-method error of a ratio estimator).
"""

from __future__ import annotations

import math

import torch

__all__ = ["log_mean_exp", "log_normalizer", "log_normalizer_stderr", "ess",
           "check_log_weights", "mean_stderr"]


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r""":math:`\log \frac1N \sum_i e^{x_i}` along ``dim``, stable for ``-inf`` entries.

    >>> float(log_mean_exp(torch.tensor([0.0, 0.0])))
    0.0
    """
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


def log_normalizer(log_weights: torch.Tensor) -> torch.Tensor:
    r"""The importance-sampling estimate :math:`\log \hat Z`, shape ``log_weights.shape[1:]``."""
    return log_mean_exp(log_weights, 0)


def log_normalizer_stderr(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Delta-method standard error of :func:`log_normalizer`: :math:`\mathrm{sd}(w) /
    (\sqrt N\, \bar w)`, computed from weights scaled by their maximum."""
    w = (log_weights - log_weights.max(0).values).exp()
    return w.std(0, unbiased=True) / (math.sqrt(log_weights.shape[0]) * w.mean(0))


def mean_stderr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Sample mean along dim 0 and its standard error :math:`\mathrm{sd}(x) / \sqrt N`
    (unbiased sd; ``inf`` for a single draw, whose error cannot be estimated).

    >>> [float(v) for v in mean_stderr(torch.tensor([1.0, 3.0]))]
    [2.0, 1.0]
    """
    n = x.shape[0]
    if n < 2:
        return x.mean(0), torch.full_like(x[0], math.inf)
    return x.mean(0), x.std(0, unbiased=True) / math.sqrt(n)


def ess(log_weights: torch.Tensor) -> torch.Tensor:
    """Kish effective sample size along dim 0, between 1 and ``N`` (NaN if every weight
    is zero).

    >>> float(ess(torch.zeros(8)))
    8.0
    """
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


def check_log_weights(log_weights: torch.Tensor, name: str = "log_weights",
                      nan_cause: str = "a reward or log-probability returned NaN",
                      fix: str = "Draw more samples, use a guide closer to the posterior (or "
                                 "SMC), or relax the -inf factors") -> None:
    """Raise a clear error if any weight is NaN or ``+inf``, or every weight of a problem
    is ``-inf``.

    :param str name: what the error names (the argument or the algorithm).
    :param str nan_cause: the likely cause of a NaN, for the message.
    :param str fix: how to fix all-``-inf`` weights, for the message.
    :raises ValueError: naming ``name``.
    """
    if torch.isnan(log_weights).any():
        raise ValueError(f"{name}: NaN log-weights; {nan_cause}")
    if torch.isposinf(log_weights).any():
        raise ValueError(f"{name}: +inf log-weights: a factor returned +inf (or a sample "
                         "was drawn where its proposal has probability zero); a log-factor "
                         "must be finite, or -inf where the model rules a value out")
    dead = torch.isneginf(log_weights).all(0)
    if dead.any():
        which = dead.reshape(-1).nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"{name}: all {log_weights.shape[0]} samples have weight zero (log-weight -inf) "
            f"for batch element(s) {which}: none satisfied the model's hard constraints. {fix}")
