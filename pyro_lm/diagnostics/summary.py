"""Tabular summaries in ArviZ's style (a :class:`pandas.DataFrame`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pyro_lm.diagnostics import _arviz
from pyro_lm.diagnostics.inference_data import algorithm_of, history_to_inference_data, to_numpy
from pyro_lm.diagnostics.weights import ess, log_normalizer, psis_khat
from pyro_lm.infer.posterior import WeightedPosterior

__all__ = ["summary"]


def summary(result, warn: bool = True) -> pd.DataFrame:
    r"""Summarise a sampling result (one row per batch element) or a training history
    (one row per metric).

    For a :class:`~pyro_lm.infer.WeightedPosterior` the columns are
    ``num_samples``, ``ess`` (Kish), ``ess_frac`` (ESS/N), ``khat`` (PSIS),
    ``log_Z`` and ``log_Z_se`` (the result's :math:`\log \hat Z`; the error is
    the importance-sampling delta-method one), plus where recorded
    ``acceptance_rate`` (QRS, IMH), ``num_chains`` (IMH), ``num_resampled`` and
    ``min_ess_frac`` over the steps (SMC). IMH draws are equally weighted, so
    their ``ess`` is ``N`` and says nothing about autocorrelation.

    For a ``fit`` history the columns are ``num_steps`` (steps that report the
    metric), ``num_nan`` (of them, the NaN ones: a diverged run), ``first``,
    ``last`` (NaN if the last step was), and ``mean``, ``sd``, ``min``, ``max``
    over the finite values; metrics with a batch dimension are averaged over it
    first.

    :param result: a :class:`~pyro_lm.infer.WeightedPosterior` or a history.
    :param bool warn: warn (via :func:`~pyro_lm.diagnostics.psis_khat`) when
        :math:`\hat k > 0.7`.
    """
    if isinstance(result, WeightedPosterior):
        return _summary_posterior(result, warn)
    history = result if isinstance(result, (list, tuple)) else getattr(result, "history", None)
    if isinstance(history, (list, tuple)):
        return _summary_history(list(history))
    raise TypeError(f"result: expected a WeightedPosterior or a fit history (list of dicts), got "
                    f"{type(result).__name__}")


def _flat(value, size: int) -> np.ndarray:
    a = to_numpy(value).astype(np.float64).reshape(-1)
    return np.broadcast_to(a, (size,)) if a.size in (1, size) else np.full(size, np.nan)


def _summary_posterior(post: WeightedPosterior, warn: bool) -> pd.DataFrame:
    lw = post.log_weights
    n = lw.shape[0]
    batch = tuple(lw.shape[1:])
    size = int(np.prod(batch)) if batch else 1
    e = _flat(ess(lw), size)
    _, se = log_normalizer(lw)
    cols = {"num_samples": np.full(size, n), "ess": e, "ess_frac": e / n,
            "khat": _flat(psis_khat(lw, warn=warn), size),
            "log_Z": _flat(post.log_normalizer(), size),
            "log_Z_se": _flat(se, size)}
    if "acceptance_rate" in post.extras:
        cols["acceptance_rate"] = _flat(post.extras["acceptance_rate"], size)
    if "num_chains" in post.extras:
        cols["num_chains"] = np.full(size, int(post.extras["num_chains"]))
    hist = post.history
    if "resampled" in hist:
        r = torch.as_tensor(to_numpy(hist["resampled"])).reshape(-1, size)
        cols["num_resampled"] = r.long().sum(0).numpy()
    if "ess" in hist:
        h = torch.as_tensor(to_numpy(hist["ess"])).double().reshape(-1, size)
        cols["min_ess_frac"] = (h.min(0).values / n).numpy()
    index = (pd.MultiIndex.from_tuples(list(np.ndindex(*batch)), names=[
        f"batch_{i}" for i in range(len(batch))]) if len(batch) > 1
        else pd.Index(range(size), name="prompt"))
    df = pd.DataFrame(cols, index=index)
    df.attrs["algorithm"] = algorithm_of(post)
    return df


def _summary_history(history: list) -> pd.DataFrame:
    ds = _arviz.get_group(history_to_inference_data(history), "training")
    rows = {}
    for name, var in ds.data_vars.items():
        a = var.values.reshape(var.shape[0], -1)
        with np.errstate(all="ignore"):
            a = np.nanmean(a, axis=1) if a.shape[1] > 1 else a[:, 0]
        # steps that recorded the metric (a step without it reads NaN in ``a``)
        present = np.array([row.get(name) is not None for row in history])
        if present.shape != a.shape:  # not a per-step metric (e.g. the step itself)
            present = np.ones(a.shape, dtype=bool)
        seen = a[present]
        ok = seen[~np.isnan(seen)]
        if seen.size == 0:
            continue
        rows[name] = {"num_steps": seen.size, "num_nan": int(seen.size - ok.size),
                      "first": seen[0], "last": seen[-1],
                      "mean": ok.mean() if ok.size else np.nan,
                      "sd": ok.std(ddof=1) if ok.size > 1 else np.nan,
                      "min": ok.min() if ok.size else np.nan,
                      "max": ok.max() if ok.size else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("metric")
