r"""The one place that knows which ArviZ is installed.

ArviZ 0.x (Python 3.10-3.11 here: 0.23) keeps groups in
:class:`arviz.InferenceData`; ArviZ 1.x (Python >= 3.12) is split into
``arviz_base`` (conversion, :class:`xarray.DataTree` as the container) and
``arviz_stats`` (diagnostics). Everything in :mod:`pyro_lm.diagnostics` goes
through the functions below, so supporting another version means editing
this file only.

**PSIS sign conventions.** Both versions take the draws of *one* importance
problem along the last axis, but they disagree on what the array holds:

* ArviZ 0.23 ``az.psislw(log_weights)`` smooths the right tail of the array it
  is given: the input *is* the log importance ratio
  :math:`\log w_i = \log \tilde p(x_i) - \log q(x_i)` (for PSIS-LOO the caller
  passes ``-log_likelihood``, the log ratio of leave-one-out to full posterior).
* ArviZ 1.x ``arviz_stats.base.array_stats.psislw(ary)`` negates its input
  before smoothing (``_psislw`` calls ``_ps_tail(-ary, ...)``): it expects a
  *log-likelihood*, i.e. :math:`-\log w_i`.

:func:`psis_khat` below takes log importance ratios and passes ``lw`` to the
0.x function and ``-lw`` to the 1.x one.

The ArviZ 1.x branch is written from the arviz-base / arviz-stats sources and
is not exercised by this repository's tests (its Python is 3.11, where only
ArviZ 0.x installs).
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings

import numpy as np

__all__ = ["ARVIZ_MAJOR", "arviz", "make_inference_data", "get_group", "group_names",
           "psis_khat_array", "from_numpyro", "rhat", "ess"]

#: The installed ArviZ's major version, read without importing it (imports are lazy).
ARVIZ_MAJOR = int(importlib.metadata.version("arviz").split(".")[0])


@functools.cache
def arviz():
    """The ``arviz`` module, imported on first use (it is slow to import)."""
    with warnings.catch_warnings():
        # ArviZ 0.23 announces its 1.0 refactor with a FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def make_inference_data(groups: dict, attrs: dict | None = None):
    """An ``InferenceData`` (ArviZ 0.x) or a ``DataTree`` (ArviZ 1.x) from datasets.

    :param dict groups: group name → :class:`xarray.Dataset`; custom group names
        (e.g. ``"training"``) are allowed in both versions.
    :param dict attrs: global attributes.
    """
    if ARVIZ_MAJOR >= 1:
        import xarray as xr

        tree = xr.DataTree.from_dict(dict(groups))
        tree.attrs.update(attrs or {})
        return tree
    return arviz().InferenceData(attrs=attrs, warn_on_custom_groups=False, **groups)


def group_names(idata) -> list[str]:
    """Names of the groups of an ``InferenceData`` or ``DataTree``."""
    if ARVIZ_MAJOR >= 1:
        return list(idata.children)
    return list(idata.groups())


def get_group(idata, name: str):
    """The :class:`xarray.Dataset` of group ``name``."""
    if name not in group_names(idata):
        raise KeyError(f"name: no group {name!r}; groups are {group_names(idata)}")
    if ARVIZ_MAJOR >= 1:
        return idata[name].to_dataset()
    return getattr(idata, name)


def psis_khat_array(log_ratios: np.ndarray, r_eff: float = 1.0) -> np.ndarray:
    """Pareto :math:`\\hat k` of log importance ratios ``(..., N)`` (draws on the last axis)."""
    if ARVIZ_MAJOR >= 1:
        from arviz_stats.base import array_stats

        return np.asarray(array_stats.psislw(-log_ratios, r_eff=r_eff, axis=-1)[1])
    return np.asarray(arviz().psislw(log_ratios, reff=r_eff)[1])


def from_numpyro(mcmc):
    """Convert a finished :class:`numpyro.infer.MCMC` run (posterior and sample stats only)."""
    if ARVIZ_MAJOR >= 1:
        from arviz_base import from_numpyro as convert

        return convert(mcmc, log_likelihood=False)
    return arviz().from_numpyro(mcmc, log_likelihood=False)


def rhat(dataset):
    """Rank-normalised split :math:`\\hat R` of every variable of a posterior dataset."""
    if ARVIZ_MAJOR >= 1:
        import arviz_stats

        return arviz_stats.rhat(dataset)
    return arviz().rhat(dataset)


def ess(dataset, method: str = "bulk"):
    """MCMC effective sample size of every variable of a posterior dataset."""
    if ARVIZ_MAJOR >= 1:
        import arviz_stats

        return arviz_stats.ess(dataset, method=method)
    return arviz().ess(dataset, method=method)
