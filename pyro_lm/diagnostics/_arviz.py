r"""The one place that knows which ArviZ is installed.

Two APIs are supported, named by :data:`BACKEND`:

* ``"0.x"``: the ``arviz`` package up to 0.23 (the last release for Python
  3.10-3.11); groups live in an :class:`arviz.InferenceData`.
* ``"1.x"``: ArviZ 1.x (Python >= 3.12), which is split into ``arviz_base``
  (conversion, :class:`xarray.DataTree` as the container) and ``arviz_stats``
  (diagnostics). It is chosen when ``arviz >= 1`` is installed, or when
  ``arviz`` is missing but ``arviz_base`` and ``arviz_stats`` are importable
  (the modular install).

Everything in :mod:`pyro_lm.diagnostics` goes through the functions below,
so supporting another version means editing this file only.
(:class:`pyro_lm.rewards.BayesianClassifier` does not import diagnostics: it
calls ArviZ's top-level ``from_numpyro``, ``rhat`` and ``ess`` itself, which
both versions export; its tests check that it agrees with :func:`rhat` and
:func:`ess` here under both backends.)

**Tested versions.** The test suite runs every test that goes through this
module under both backends (the ``arviz_backend`` fixture of
``tests/conftest.py`` sets :data:`BACKEND`): ``"0.x"`` with arviz 0.23.4 and
``"1.x"`` with arviz-base 0.8.2 and arviz-stats 0.8.0 (the libraries ArviZ
1.x is built from, which install on Python 3.11 next to arviz 0.23; both are
in the ``dev`` extra and ``constraints.txt``). The ``arviz >= 1`` meta-package
itself is not installed by the tests; it re-exports those two libraries.

**PSIS.** Both versions fit a generalised Pareto distribution to the right tail
of the importance ratios, with the same fit (Zhang and Stephens' empirical
Bayes estimate with Vehtari et al.'s prior on :math:`k`), but their public
``psislw`` differ in three ways:

* *Sign.* ArviZ 0.23 ``az.psislw(log_weights)`` smooths the right tail of the
  array it is given: the input *is* the log importance ratio
  :math:`\log w_i = \log \tilde p(x_i) - \log q(x_i)` (for PSIS-LOO the caller
  passes ``-log_likelihood``). arviz-stats ``array_stats.psislw(ary)`` negates
  its input before smoothing (``_psislw`` calls ``_ps_tail(-ary, ...)``): it
  expects a *log-likelihood*, i.e. :math:`-\log w_i`.
* *Tail length.* ArviZ 0.23 uses
  :math:`M = \lceil \min(N/5,\ 3\sqrt{N/r_\mathrm{eff}}) \rceil` draws (as in
  Vehtari et al. 2024 and R's ``loo``); arviz-stats 0.8 rounds down
  (:math:`\lfloor\cdot\rfloor`), so at e.g. :math:`N = 1000` the tails have 95
  and 94 draws and :math:`\hat k` differs by about 0.01.
* *Ties.* ArviZ 0.23 fits the draws strictly above the cutoff (the
  :math:`(M+1)`-th largest) and returns :math:`\hat k = \infty` when fewer than
  5 are; arviz-stats fits exactly :math:`M` draws, ties with the cutoff
  included (as zero exceedances), and raises when they are all equal. Tied
  log-weights are common here: an LM proposal draws the same sequence often.

So that :func:`psis_khat_array` gives one :math:`\hat k` whatever is installed,
the ``"0.x"`` backend calls ``az.psislw(lw)`` and the ``"1.x"`` backend selects
the tail as ArviZ 0.23 does and passes the exceedances to arviz-stats' GPD fit
(``array_stats._gpdfit``); the two agree to rounding (the tests check 1e-6).
Should a later arviz-stats drop ``_gpdfit``, the ``"1.x"`` backend falls back
on its public ``array_stats.psislw(-lw)`` (the floor tail length; tied tails
give :math:`\infty`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import warnings

import numpy as np

__all__ = ["BACKEND", "BACKENDS", "detect_backend", "available_backends", "arviz",
           "make_inference_data", "get_group", "group_names", "psis_tail_length",
           "psis_khat_array", "from_numpyro", "rhat", "ess"]

#: The ArviZ APIs this module can call.
BACKENDS = ("0.x", "1.x")

# log of the smallest positive float: ArviZ 0.23 never puts a cutoff below it
_LOG_TINY = float(np.log(np.finfo(float).tiny))


def _arviz_version() -> str | None:
    try:
        return importlib.metadata.version("arviz")
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_modular() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("arviz_base", "arviz_stats"))


def _backend_for(arviz_version: str | None, has_modular: bool) -> str | None:
    if arviz_version is not None:
        return "0.x" if int(arviz_version.split(".")[0]) < 1 else "1.x"
    return "1.x" if has_modular else None


def detect_backend() -> str | None:
    """The backend for what is installed: ``"0.x"`` for ``arviz < 1``; ``"1.x"`` for
    ``arviz >= 1`` or, without ``arviz``, for ``arviz_base`` with ``arviz_stats``;
    ``None`` when none of these is installed."""
    return _backend_for(_arviz_version(), _has_modular())


def available_backends() -> list[str]:
    """The backends whose libraries are installed (both, here: arviz 0.23 and the
    arviz-base / arviz-stats of the ``dev`` extra)."""
    version = _arviz_version()
    out = ["0.x"] if version is not None and _backend_for(version, False) == "0.x" else []
    return out + (["1.x"] if _has_modular() else [])


#: Which ArviZ API the functions below call: ``"0.x"``, ``"1.x"``, or ``None``
#: when no ArviZ is installed (they then raise :class:`ImportError`). Set at
#: import by :func:`detect_backend`; tests assign it to run both APIs.
BACKEND = detect_backend()


def _backend() -> str:
    if BACKEND is None:
        raise ImportError("pyro_lm.diagnostics needs ArviZ: pip install arviz (or, for the "
                          "ArviZ 1.x libraries alone, arviz-base and arviz-stats)")
    if BACKEND not in BACKENDS:
        raise ValueError(f"BACKEND: expected one of {BACKENDS}, got {BACKEND!r}")
    return BACKEND


@functools.cache
def arviz():
    """The ``arviz`` module, imported on first use (it is slow to import)."""
    with warnings.catch_warnings():
        # ArviZ 0.23 announces its 1.0 refactor with a FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def make_inference_data(groups: dict, attrs: dict | None = None):
    """An ``InferenceData`` (``"0.x"``) or a ``DataTree`` (``"1.x"``) from datasets.

    :param dict groups: group name → :class:`xarray.Dataset`; custom group names
        (e.g. ``"training"``) are allowed in both versions.
    :param dict attrs: global attributes.
    """
    if _backend() == "1.x":
        import xarray as xr

        tree = xr.DataTree.from_dict(dict(groups))
        tree.attrs.update(attrs or {})
        return tree
    return arviz().InferenceData(attrs=attrs, warn_on_custom_groups=False, **groups)


def group_names(idata) -> list[str]:
    """Names of the groups of an ``InferenceData`` or ``DataTree``."""
    import xarray as xr

    if isinstance(idata, xr.DataTree):
        return list(idata.children)
    return list(idata.groups())


def get_group(idata, name: str):
    """The :class:`xarray.Dataset` of group ``name`` of an ``InferenceData`` or ``DataTree``."""
    import xarray as xr

    if name not in group_names(idata):
        raise KeyError(f"name: no group {name!r}; groups are {group_names(idata)}")
    if isinstance(idata, xr.DataTree):
        return idata[name].to_dataset()
    return getattr(idata, name)


def psis_tail_length(num_draws: int, r_eff: float = 1.0) -> int:
    r"""Draws in the Pareto tail, :math:`M = \lceil \min(N/5,\ 3\sqrt{N/r_\mathrm{eff}}) \rceil`
    (ArviZ 0.23, Vehtari et al. 2024)."""
    return math.ceil(min(num_draws / 5.0, 3 * math.sqrt(num_draws / r_eff)))


def _arviz_stats_gpdfit():
    """arviz-stats' GPD fit ``(sorted exceedances) -> (k, sigma)``, or ``None`` if it has none."""
    from arviz_stats.base import array_stats

    return getattr(array_stats, "_gpdfit", None)


def psis_khat_array(log_ratios: np.ndarray, r_eff: float = 1.0) -> np.ndarray:
    r"""Pareto :math:`\hat k` of log importance ratios ``(..., N)`` (draws on the last axis).

    Needs :math:`N \ge 25` (a tail of at least 5 draws). Returns shape ``(...)``;
    :math:`\infty` where fewer than 5 draws lie strictly above the cutoff.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if _backend() == "0.x":
        return np.asarray(arviz().psislw(log_ratios, reff=r_eff)[1], dtype=np.float64)
    gpdfit = _arviz_stats_gpdfit()
    if gpdfit is None:
        return _khat_arviz_stats_psislw(log_ratios, r_eff)
    tail_len = psis_tail_length(log_ratios.shape[-1], r_eff)
    khat = np.full(log_ratios.shape[:-1], np.inf)
    for idx in np.ndindex(*khat.shape):
        x = np.sort(log_ratios[idx])
        x = x - x[-1]  # as ArviZ 0.23: relative to the largest
        cutoff = max(x[-tail_len - 1], _LOG_TINY)
        tail = x[x > cutoff]  # sorted
        if tail.size >= 5:
            khat[idx] = gpdfit(np.exp(tail) - np.exp(cutoff))[0]
    return khat


def _khat_arviz_stats_psislw(log_ratios: np.ndarray, r_eff: float) -> np.ndarray:
    """The fallback: arviz-stats' public ``psislw``, which takes *minus* the log ratios."""
    from arviz_stats.base import array_stats

    khat = np.full(log_ratios.shape[:-1], np.inf)
    for idx in np.ndindex(*khat.shape):
        try:
            khat[idx] = array_stats.psislw(-log_ratios[idx], r_eff=r_eff, axis=-1)[1]
        except ValueError:  # "All tail values are the same"
            pass
    return khat


def from_numpyro(mcmc):
    """Convert a finished :class:`numpyro.infer.MCMC` run (posterior, sample stats and
    observed data; no log-likelihood) to an ``InferenceData`` or ``DataTree``."""
    if _backend() == "1.x":
        from arviz_base import from_numpyro as convert

        return convert(mcmc, log_likelihood=False)
    return arviz().from_numpyro(mcmc, log_likelihood=False)


def rhat(dataset):
    """Rank-normalised split :math:`\\hat R` of every variable of a posterior
    :class:`xarray.Dataset` with dims ``(chain, draw, ...)``, as a dataset without them."""
    if _backend() == "1.x":
        import arviz_stats

        return arviz_stats.rhat(dataset)
    return arviz().rhat(dataset)


def ess(dataset, method: str = "bulk"):
    """MCMC effective sample size of every variable of a posterior
    :class:`xarray.Dataset` with dims ``(chain, draw, ...)``.

    :param str method: ``"bulk"``, ``"tail"`` (the smaller ESS of the 5% and 95%
        quantiles, Vehtari et al. 2021), ``"mean"``, ``"sd"``, ``"median"`` or ``"mad"``.
    """
    if _backend() == "1.x":
        import arviz_stats

        # arviz-stats' default tail is at the quantiles (1 - p, p) for p = rcParams
        # ["stats.ci_prob"] = 0.89; ArviZ 0.x and the paper use 0.05 and 0.95
        prob = (0.05, 0.95) if method == "tail" else None
        return arviz_stats.ess(dataset, method=method, prob=prob)
    return arviz().ess(dataset, method=method)
