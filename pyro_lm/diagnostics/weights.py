r"""Estimators over importance weights: pure functions of tensors or arrays.

Every function takes log-values with the draws on dimension 0, shape
``(N, *batch)``, as a :class:`torch.Tensor` (any device) or anything
:func:`numpy.asarray` accepts, and returns one value per batch element, shape
``batch``, of the same kind (a tensor on the input's device, or a NumPy array).
Computation is in float64. The estimators themselves (Kish ESS, :math:`\log \hat Z`
and its error, the dead-weight check) are those of :mod:`pyro_lm.ops.stats`, which
the samplers in :mod:`pyro_lm.infer` use too; this module adds the conversions,
the checks on the inputs, :math:`\hat k`, the KL estimates and the bounds.

For draws :math:`x_i \sim q` and an unnormalised target :math:`\tilde p` with
:math:`Z = \sum_x \tilde p(x)`, the log-weights are
:math:`\log w_i = \log \tilde p(x_i) - \log q(x_i)`.

References:

* Kish, L. (1965). *Survey Sampling*. Wiley.
* Vehtari, A., Simpson, D., Gelman, A., Yao, Y. and Gabry, J. (2024). Pareto
  smoothed importance sampling. *JMLR* 25(72):1-58.
* Grosse, R. B., Ghahramani, Z. and Adams, R. P. (2015). Sandwiching the
  marginal likelihood using bidirectional Monte Carlo. arXiv:1511.02543.
* Grosse, R. B., Ancha, S. and Roy, D. M. (2016). Measuring the reliability of
  MCMC inference with bidirectional Monte Carlo. *NeurIPS*.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from pyro_lm.diagnostics import _arviz
from pyro_lm.ops import stats

__all__ = ["KHAT_THRESHOLD", "psis_khat", "ess", "log_normalizer", "kl_q_p_estimate",
           "kl_p_q_estimate", "LogZBounds", "log_z_bounds"]

#: Above this Pareto :math:`\hat k` importance-sampling estimates are unreliable
#: (Vehtari et al. 2024, for sample sizes below about :math:`10^{2/(1-0.7)}`).
KHAT_THRESHOLD = 0.7


def _as_tensor(value, name: str, allow_neg_inf: bool = True) -> tuple[torch.Tensor, bool]:
    """``(float64 tensor, was_tensor)``; checks for NaN, +inf and a missing sample dim."""
    was_tensor = isinstance(value, torch.Tensor)
    t = value.detach() if was_tensor else torch.as_tensor(np.asarray(value, dtype=np.float64),
                                                          device="cpu")
    t = t.to(torch.float64)
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (N, *batch) with N >= 1 draws, got "
                         f"{tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name}: contains NaN; a reward or log-probability returned NaN")
    if torch.isposinf(t).any():
        raise ValueError(f"{name}: contains +inf; log-densities must be finite or -inf")
    if not allow_neg_inf and torch.isneginf(t).any():
        raise ValueError(f"{name}: contains -inf; this estimator needs finite values (draws of "
                         "zero target density have no finite log-ratio)")
    return t, was_tensor


def _check_alive(log_weights: torch.Tensor, name: str) -> None:
    """:func:`pyro_lm.ops.stats.check_log_weights`, worded for estimates from given draws."""
    stats.check_log_weights(log_weights, name, fix="Nothing can be estimated from these "
                            "draws; draw more, or from a proposal closer to the posterior")


def _out(value: torch.Tensor, like, was_tensor: bool):
    if was_tensor:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return value.to(device=like.device, dtype=dtype)
    return value.cpu().numpy()


def psis_khat(log_weights, r_eff: float = 1.0, warn: bool = True,
              threshold: float = KHAT_THRESHOLD):
    r"""Pareto :math:`\hat k` of the importance weights, per batch element, by ArviZ's PSIS.

    PSIS fits a generalised Pareto distribution to the largest
    :math:`M = \lceil \min(N/5,\ 3\sqrt{N/r_\mathrm{eff}}) \rceil` weights; its
    shape :math:`\hat k` estimates how many moments the weights have
    (:math:`E[w^{1/k}] < \infty`). Below 0.5 the variance is finite; above
    :data:`KHAT_THRESHOLD` (0.7) self-normalised estimates are unreliable at any
    practical sample size. The fit itself is ArviZ's, and so is the tail (see
    :mod:`pyro_lm.diagnostics._arviz` for how ArviZ 0.x and 1.x are called so
    that both give the same :math:`\hat k`).

    Degenerate cases, the same for every ArviZ version: when every finite
    log-weight is equal (exact or rejection sampling) there is no tail and
    :math:`\hat k = -\infty`; when the tail has fewer than 5 draws
    (:math:`N < 25`) or fewer than 5 weights above the cutoff (heavily tied
    weights), :math:`\hat k = +\infty` (not estimable).

    :param log_weights: log importance ratios ``(N, *batch)``.
    :param float r_eff: relative efficiency ESS/N of correlated (MCMC) draws.
    :param bool warn: emit a :class:`UserWarning` naming the batch elements whose
        :math:`\hat k` exceeds ``threshold``.
    :param float threshold: the warning threshold.
    :returns: :math:`\hat k`, shape ``batch``.

    References: Vehtari et al. (2024), Pareto smoothed importance sampling.
    """
    if not r_eff > 0:
        raise ValueError(f"r_eff: must be > 0, got {r_eff}")
    lw, was_tensor = _as_tensor(log_weights, "log_weights")
    _check_alive(lw, "log_weights")
    batch = lw.shape[1:]
    n = lw.shape[0]
    flat = lw.reshape(n, -1).T.cpu().numpy()  # (B, N): ArviZ wants draws last
    khat = np.full(flat.shape[0], np.inf)
    finite = np.where(np.isfinite(flat), flat, np.nan)
    constant = np.nanmax(finite, -1) == np.nanmin(finite, -1)
    khat[constant] = -np.inf
    tail = _arviz.psis_tail_length(n, r_eff)
    todo = ~constant
    if tail >= 5 and todo.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow in the GPD fit
            khat[todo] = _arviz.psis_khat_array(flat[todo], r_eff=r_eff)
    if warn and (khat > threshold).any():
        bad = np.nonzero(khat > threshold)[0]
        shown = ", ".join(f"{int(i)}: {khat[i]:.2f}" for i in bad[:8])
        reason = (f" (k-hat = inf: fewer than 5 tail draws; N = {n} < 25 or tied weights)"
                  if np.isinf(khat[bad]).all() else "")
        warnings.warn(f"Pareto k-hat above {threshold} for {len(bad)} of {len(khat)} batch "
                      f"element(s) {{{shown}}}{reason}: the importance weights are heavy-tailed "
                      "and estimates from them are unreliable; use a proposal closer to the "
                      "posterior (a trained guide, SMC) or more draws", UserWarning, stacklevel=2)
    out = torch.as_tensor(khat, dtype=torch.float64).reshape(batch)
    return _out(out, log_weights if was_tensor else None, was_tensor)


def ess(log_weights):
    r"""Kish's effective sample size of importance weights, per batch element:

    .. math:: \mathrm{ESS} = \frac{\big(\sum_i w_i\big)^2}{\sum_i w_i^2}
              = \exp\big(2\,\mathrm{lse}(\log w) - \mathrm{lse}(2 \log w)\big),

    between 1 (one weight dominates) and :math:`N` (equal weights). This is the
    importance-sampling ESS (Kish 1965), not the autocorrelation ESS of MCMC.

    :param log_weights: ``(N, *batch)``.
    :returns: ESS, shape ``batch``.
    """
    lw, was_tensor = _as_tensor(log_weights, "log_weights")
    _check_alive(lw, "log_weights")
    return _out(stats.ess(lw), log_weights if was_tensor else None, was_tensor)


def _log_normalizer(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log Z, se)`` of checked log-weights; the error is ``inf`` for a single draw."""
    log_z = stats.log_normalizer(lw)
    if lw.shape[0] < 2:
        return log_z, torch.full_like(log_z, math.inf)
    return log_z, stats.log_normalizer_stderr(lw)


def log_normalizer(log_weights):
    r"""Importance-sampling estimate of :math:`\log Z` and its standard error:

    .. math:: \log \hat Z = \log \frac1N \sum_i w_i, \qquad
              \mathrm{se}(\log \hat Z) \approx \frac{\mathrm{sd}(w)}{\sqrt N\, \bar w}

    (delta method). :math:`\hat Z` is unbiased for :math:`Z`, so by Jensen
    :math:`E[\log \hat Z] \le \log Z`: a stochastic lower bound, biased by about
    :math:`-\mathrm{se}^2/2`.

    :param log_weights: ``(N, *batch)``.
    :returns: ``(log_Z, se)``, each of shape ``batch``.
    """
    lw, was_tensor = _as_tensor(log_weights, "log_weights")
    _check_alive(lw, "log_weights")
    log_z, se = _log_normalizer(lw)
    like = log_weights if was_tensor else None
    return _out(log_z, like, was_tensor), _out(se, like, was_tensor)


def _log_ratios(log_p_tilde, log_q, names=("log_p_tilde", "log_q")):
    lp, was_tensor = _as_tensor(log_p_tilde, names[0])
    lq, _ = _as_tensor(log_q, names[1], allow_neg_inf=False)
    if lp.shape != lq.shape:
        raise ValueError(f"{names[1]}: shape {tuple(lq.shape)} differs from {names[0]}'s "
                         f"{tuple(lp.shape)}; pass both evaluated on the same draws")
    return lp, lq.to(lp.device), was_tensor


def _log_z_or_estimate(log_Z, lw: torch.Tensor) -> torch.Tensor:
    """The given ``log_Z`` (checked, shape ``batch``) or the draws' own importance estimate."""
    if log_Z is None:
        return stats.log_normalizer(lw)
    log_z, _ = _as_tensor(torch.as_tensor(log_Z).reshape(1, *lw.shape[1:]), "log_Z")
    return log_z[0].to(lw.device)


def kl_q_p_estimate(log_p_tilde, log_q, log_Z=None):
    r"""Reverse KL :math:`\mathrm{KL}(q \,\|\, p^*)` from draws of :math:`q`:

    .. math:: \widehat{\mathrm{KL}}(q\|p^*) = \log \hat Z
              - \frac1N \sum_i \big(\log \tilde p(x_i) - \log q(x_i)\big),
              \qquad x_i \sim q,

    the gap between :math:`\log Z` and the ELBO. With the importance estimate
    :math:`\log \hat Z` from the same draws (default) it is non-negative and
    biased low by about :math:`\mathrm{se}(\log\hat Z)^2/2`; pass a better
    ``log_Z`` (SMC's, or the exact one) to remove that bias.

    :param log_p_tilde: :math:`\log \tilde p(x_i)` ``(N, *batch)`` (may be ``-inf``).
    :param log_q: :math:`\log q(x_i)` ``(N, *batch)``, finite.
    :param log_Z: an estimate of :math:`\log Z`, shape ``batch``.
    :returns: shape ``batch``.
    """
    lp, lq, was_tensor = _log_ratios(log_p_tilde, log_q)
    lw = lp - lq
    _check_alive(lw, "log_p_tilde")
    if torch.isneginf(lw).any():
        out = torch.full(lw.shape[1:], math.inf, dtype=torch.float64, device=lw.device)
        return _out(out, log_p_tilde if was_tensor else None, was_tensor)
    log_z = _log_z_or_estimate(log_Z, lw)
    out = log_z - lw.mean(0)
    return _out(out, log_p_tilde if was_tensor else None, was_tensor)


def kl_p_q_estimate(log_p_tilde, log_q, log_Z=None):
    r"""Forward KL :math:`\mathrm{KL}(p^* \,\|\, q)` from draws of :math:`q`, self-normalised:

    .. math:: \widehat{\mathrm{KL}}(p^*\|q) = \sum_i \bar w_i \log w_i - \log \hat Z,
              \qquad \bar w_i = \frac{w_i}{\sum_j w_j},\quad x_i \sim q,

    since :math:`\mathrm{KL}(p^*\|q) = E_{p^*}[\log \tilde p - \log q] - \log Z`.
    Consistent with an :math:`O(1/N)` bias; it is only as good as the weights
    (check :func:`psis_khat`). Draws with zero target weight contribute nothing.

    :param log_p_tilde: :math:`\log \tilde p(x_i)` ``(N, *batch)``.
    :param log_q: :math:`\log q(x_i)` ``(N, *batch)``, finite.
    :param log_Z: an estimate of :math:`\log Z` to use instead of the draws' own.
    :returns: shape ``batch``.
    """
    lp, lq, was_tensor = _log_ratios(log_p_tilde, log_q)
    lw = lp - lq
    _check_alive(lw, "log_p_tilde")
    w_bar = torch.softmax(lw, 0)
    cross = torch.where(w_bar > 0, w_bar * lw, torch.zeros_like(lw)).sum(0)
    log_z = _log_z_or_estimate(log_Z, lw)
    out = cross - log_z
    return _out(out, log_p_tilde if was_tensor else None, was_tensor)


class LogZBounds(NamedTuple):
    """Bounds on :math:`\\log Z` and their standard errors (``None`` where not computed)."""

    lower: object
    lower_se: object
    upper: object
    upper_se: object


def log_z_bounds(lower_from=None, upper_from=None, importance: bool = False) -> LogZBounds:
    r"""Bidirectional bounds on :math:`\log Z` (BDMC with a single importance step).

    From draws of the guide :math:`x_i \sim q` (``lower_from``) and exact draws
    of the posterior :math:`y_j \sim p^*` (``upper_from``, available on
    enumerable problems or simulated data), with
    :math:`\log w = \log \tilde p - \log q`:

    .. math::

        \mathrm{ELBO} = E_q[\log w] = \log Z - \mathrm{KL}(q\|p^*) \le \log Z
        \le \log Z + \mathrm{KL}(p^*\|q) = E_{p^*}[\log w] = \mathrm{EUBO}.

    The gap EUBO − ELBO is the symmetrised KL between guide and posterior. The
    estimates are sample means with standard errors :math:`\mathrm{sd}/\sqrt N`.
    With ``importance=True`` the tighter multi-sample forms are used,
    :math:`\log \frac1N\sum_i w(x_i)` (lower) and
    :math:`-\log \frac1M \sum_j w(y_j)^{-1}` (upper, harmonic mean); these bound
    :math:`\log Z` in expectation (Jensen), and their errors are delta-method ones.

    :param lower_from: ``(log_p_tilde, log_q)`` on draws of :math:`q`, each ``(N, *batch)``.
    :param upper_from: ``(log_p_tilde, log_q)`` on draws of :math:`p^*`, each ``(M, *batch)``.
    :param bool importance: use the multi-sample (importance-weighted) bounds.
    :returns: a :class:`LogZBounds` ``(lower, lower_se, upper, upper_se)``.

    References: Grosse, Ghahramani and Adams (2015), Sandwiching the marginal
    likelihood using bidirectional Monte Carlo; Grosse, Ancha and Roy (2016),
    Measuring the reliability of MCMC inference with bidirectional Monte Carlo.
    """
    if lower_from is None and upper_from is None:
        raise ValueError("lower_from, upper_from: pass at least one (log_p_tilde, log_q) pair")
    result = [None, None, None, None]
    for k, (pair, name) in enumerate(((lower_from, "lower_from"), (upper_from, "upper_from"))):
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name}: expected a pair (log_p_tilde, log_q)")
        lp, lq, was_tensor = _log_ratios(*pair, names=(f"{name}[0]", f"{name}[1]"))
        lw = lp - lq
        _check_alive(lw, f"{name}[0]")
        if k == 1 and torch.isneginf(lw).any():
            raise ValueError(f"{name}[0]: -inf on a posterior draw; these are not draws of p*")
        if importance:
            est, se = _log_normalizer(lw if k == 0 else -lw)
            est = est if k == 0 else -est
        else:
            est, se = stats.mean_stderr(lw)
            se = torch.where(torch.isneginf(est), torch.full_like(se, math.inf), se)
        like = pair[0] if was_tensor else None
        result[2 * k] = _out(est, like, was_tensor)
        result[2 * k + 1] = _out(se, like, was_tensor)
    return LogZBounds(*result)
