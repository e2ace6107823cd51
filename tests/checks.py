"""Statistical checks the tests share: goodness of fit of draws to exact probabilities."""

from __future__ import annotations

import torch
from scipy.stats import chisquare


def pooled_chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of observed ``counts`` against cell probabilities ``probs`` (both
    ``(C,)``; ``probs`` need not be normalised). Cells expecting fewer than 5 draws are
    pooled into one, so that the chi-square approximation holds (its power is checked in
    ``tests/infer/test_qrs_imh.py``).
    """
    counts = counts.double().cpu()
    expected = probs.double().cpu()
    expected = expected / expected.sum() * counts.sum()
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    if expected[-1] == 0:  # nothing was pooled
        counts, expected = counts[:-1], expected[:-1]
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def exact_chi2_pvalue(exact, samples: torch.Tensor) -> float:
    """:func:`pooled_chi2_pvalue` of ``samples`` against an enumerated posterior ``exact``
    (:func:`pyro_lm.exact.enumerate_model`)."""
    return pooled_chi2_pvalue(exact.sample_counts(samples), exact.probs)
