"""Diagnostic plots with matplotlib.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas,
without :mod:`matplotlib.pyplot`: nothing is displayed and no global backend
is changed. Each function returns the figure and, given ``path``, saves it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pyro_lm.diagnostics.inference_data import to_numpy
from pyro_lm.diagnostics.weights import ess, psis_khat
from pyro_lm.infer.posterior import WeightedPosterior
from pyro_lm.ops.stats import log_mean_exp

__all__ = ["plot_weights", "plot_ess", "plot_training"]


def _figure(ax, ncols: int = 1, width: float = 5.0):
    if ax is not None:
        return ax.figure, [ax]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig, path):
    if path is not None:
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise ValueError(f"path: the folder {folder!r} does not exist; create it first "
                             "(os.makedirs) or pass another path")
        fig.savefig(path, dpi=100)
    return fig


def plot_weights(result, ax=None, path=None, max_prompts: int = 4, bins: int = 40):
    r"""Histogram of the normalised weights :math:`N \bar w_i` (log scale; 1 is a uniform
    weight), with Pareto :math:`\hat k` and Kish ESS in the title or legend.

    :param result: a :class:`~pyro_lm.infer.WeightedPosterior` or log-weights ``(N, *batch)``.
    :param ax: a matplotlib axes to draw on (default: a new figure).
    :param path: where to save the figure (PNG, PDF, ... by extension).
    :param int max_prompts: batch elements drawn at most.
    :returns: the :class:`~matplotlib.figure.Figure`.
    """
    lw = result.log_weights if isinstance(result, WeightedPosterior) else result
    lw = np.asarray(to_numpy(lw), dtype=np.float64)
    n = lw.shape[0]
    flat = lw.reshape(n, -1)
    khat = np.asarray(to_numpy(psis_khat(flat, warn=False))).reshape(-1)
    e = np.asarray(to_numpy(ess(flat))).reshape(-1)
    t = torch.as_tensor(flat)
    log_nw = (t - log_mean_exp(t, 0)).numpy()  # log(N w_bar): 0 is a uniform weight
    fig, (axis,) = _figure(ax)
    for b in range(min(flat.shape[1], max_prompts)):
        col = log_nw[:, b]
        scaled = col[np.isfinite(col)] / np.log(10)  # log10(N w_bar)
        label = f"prompt {b}: k̂ = {khat[b]:.2f}, ESS = {e[b]:.0f}/{n}"
        axis.hist(scaled, bins=bins, alpha=0.6, label=label)
    axis.axvline(0.0, color="k", lw=0.8, ls="--")
    axis.set_xlabel(r"$\log_{10}(N \bar w_i)$")
    axis.set_ylabel("draws")
    if flat.shape[1] == 1:
        axis.set_title(f"Importance weights: k̂ = {khat[0]:.2f}, ESS = {e[0]:.0f}/{n}")
    else:
        axis.set_title(f"Importance weights: max k̂ = {np.max(khat):.2f}")
        axis.legend(fontsize="small")
    return _finish(fig, path)


def plot_ess(smc_result, ax=None, path=None, max_prompts: int = 4):
    """ESS fraction across SMC steps, one line per batch element, resampling steps marked.

    :param smc_result: a :class:`~pyro_lm.infer.WeightedPosterior` whose
        ``history`` has ``"ess"`` ``(T', *batch)`` (and optionally ``"resampled"``).
    :returns: the :class:`~matplotlib.figure.Figure`.
    """
    from matplotlib.ticker import MaxNLocator

    history = getattr(smc_result, "history", None)
    if not isinstance(history, dict) or "ess" not in history:
        raise ValueError("smc_result: needs a result with history['ess'] (an SMC run)")
    n = smc_result.num_samples
    e = np.asarray(to_numpy(history["ess"]), dtype=np.float64)
    e = e.reshape(e.shape[0], -1) / n
    resampled = history.get("resampled")
    r = (np.asarray(to_numpy(resampled), dtype=bool).reshape(e.shape) if resampled is not None
         else np.zeros(e.shape, dtype=bool))
    fig, (axis,) = _figure(ax)
    steps = np.arange(e.shape[0])
    for b in range(min(e.shape[1], max_prompts)):
        (line,) = axis.plot(steps, e[:, b], marker=".", label=f"prompt {b}")
        axis.scatter(steps[r[:, b]], e[r[:, b], b], marker="v", s=50, color=line.get_color(),
                     zorder=3, label="resampled" if b == 0 else None)
    threshold = getattr(smc_result, "extras", {}).get("ess_threshold")
    if isinstance(threshold, float):
        axis.axhline(threshold, color="k", lw=0.8, ls="--")
    axis.set_ylim(0, 1.05)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("step (token)")
    axis.set_ylabel("ESS / N")
    axis.set_title(f"SMC effective sample size ({int(r.any(1).sum())} resampling steps)")
    axis.legend(fontsize="small")
    return _finish(fig, path)


_CURVES = {"reward": "reward", "kl": "KL(q || p0)", "elbo": "ELBO", "kl_pq": "KL(p* || q)",
           "log_Z": "log Z", "ess": "ESS", "loss": "loss"}


def plot_training(history, path=None, metrics=None):
    """Training curves from a ``fit`` history, one panel per metric.

    :param history: a list of per-step dicts (``step`` and metrics), or an
        object with such a list as ``.history``.
    :param metrics: metric names to draw (a name or a sequence of them), each of which the
        history must hold; default: those of ``reward``, ``kl`` and ``elbo`` it holds
        (``loss`` if none).
    :returns: the :class:`~matplotlib.figure.Figure`.
    :raises ValueError: naming ``metrics`` if the history holds none of a name given.
    """
    rows = history if isinstance(history, (list, tuple)) else getattr(history, "history", None)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("history: expected a non-empty list of per-step dicts from fit")
    given = metrics is not None
    metrics = ("reward", "kl", "elbo") if metrics is None else (
        (metrics,) if isinstance(metrics, str) else tuple(metrics))
    present = [m for m in metrics if any(row.get(m) is not None for row in rows)]
    if given and len(present) < len(metrics):
        missing = [m for m in metrics if m not in present]
        held = sorted({k for row in rows for k in row} - {"step", "time"})
        raise ValueError(f"metrics: the history holds no {missing}; it holds {held}")
    if not present:
        present = ["loss"]
    fig, axes = _figure(None, ncols=len(present), width=4.0)
    for axis, metric in zip(axes, present, strict=True):
        pts = [(row.get("step", i), np.nanmean(to_numpy(row[metric]).astype(np.float64)))
               for i, row in enumerate(rows) if row.get(metric) is not None]
        steps, values = zip(*pts, strict=True) if pts else ((), ())
        axis.plot(steps, values)
        axis.set_xlabel("step")
        axis.set_title(_CURVES.get(metric, metric))
    return _finish(fig, path)
