r"""Conversion of pyro_lm results to ArviZ ``InferenceData`` (ArviZ 0.x) or ``DataTree`` (1.x).

Layout for a :class:`~pyro_lm.infer.WeightedPosterior` with ``N`` draws,
batch shape ``batch`` (one dim is called ``prompt``) and LM sites of length
``T``:

* ``posterior``: ``site`` token ids (int64), dims ``(chain, draw, *batch, position)``;
  ``site_text`` the decoded completions (str objects), ``(chain, draw, *batch)``;
  other sites with their own event dims ``site_dim_k``.
* ``sample_stats``: ``log_weight`` :math:`\log w_i` and ``weight``
  :math:`\bar w_i` (summing to 1 over all draws), ``(chain, draw, *batch)``;
  ``log_normalizer`` and ``log_normalizer_se`` (:math:`\log \hat Z` and its
  importance-sampling error), ``(*batch)``; every per-step ``history`` entry
  (SMC: ``ess``, ``resampled``, ``log_Z``) with dims ``(step, *batch)``, except
  IMH's ``accepted`` which becomes ``(chain, draw, *batch)``; numeric
  ``extras`` (``acceptance_rate``, ``bound``) with dims ``(*batch)`` or ``()``.
* ``log_likelihood``: ``log_weight`` again, ``(chain, draw, *batch)``.

The algorithm is the result's :attr:`~pyro_lm.infer.WeightedPosterior.algorithm`
(see :func:`algorithm_of` for results built by hand without one), stored in lower
case as the ``algorithm`` attribute of every group.
Importance, SMC and QRS results have one chain (``chain = 1``, ``draw = N``).
An IMH result (``extras["num_chains"] = C``) is reshaped into ``C`` chains of
``N / C`` draws; its draws are stored chain-major (``.reshape(C, N / C, ...)``,
as :class:`~pyro_lm.infer.IMH` does) unless ``extras["sample_layout"] ==
"draw_major"``. Its per-step history ``(num_steps, C, *batch)`` (``accepted``,
``log_weight``) keeps the last ``N / C`` steps, those of the kept draws, as
``(chain, draw, *batch)``.

A ``fit`` history (a list of per-step dicts) becomes a custom ``training``
group with dim ``step``: one variable per metric (``loss``, ``time``,
``elbo``, ``reward``, ``kl``, ``ess``, ...), NaN where a step lacks it.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from pyro_lm.diagnostics import _arviz
from pyro_lm.infer.posterior import WeightedPosterior

__all__ = ["to_inference_data", "history_to_inference_data", "to_numpy"]

_CREATED_BY = "pyro_lm.diagnostics.to_inference_data"


def to_numpy(value) -> np.ndarray:
    """``value`` as a NumPy array on the host: a tensor detached, half-precision floats
    widened to float32; anything else through :func:`numpy.asarray`."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def _default_batch_dims(ndim: int) -> list[str]:
    return ["prompt"] if ndim == 1 else [f"batch_{i}" for i in range(ndim)]


def algorithm_of(post: WeightedPosterior) -> str:
    """The algorithm that produced ``post``, in lower case (``"importance"``, ``"smc"``,
    ``"qrs"``, ``"imh"``, ...): its documented field :attr:`WeightedPosterior.algorithm`
    (``"IMH"`` is read as ``"imh"``).

    Only a result built by hand with ``algorithm=None`` is guessed from what it records,
    in this order: ``extras["algorithm"]``; IMH if ``extras`` has ``num_chains`` or
    ``history`` has ``accepted``; QRS if ``extras`` has ``log_bound`` or ``bound``; SMC
    if ``history`` has ``resampled`` or ``ess``; otherwise importance sampling. Pass
    ``algorithm=`` when building one to make the guess unnecessary.
    """
    if post.algorithm is not None:
        return str(post.algorithm).lower()
    if "algorithm" in post.extras:
        return str(post.extras["algorithm"]).lower()
    if "num_chains" in post.extras or "accepted" in post.history:
        return "imh"
    if "log_bound" in post.extras or "bound" in post.extras:
        return "qrs"
    if "resampled" in post.history or "ess" in post.history:
        return "smc"
    return "importance"


def to_inference_data(result, decode: bool = True, batch_dims=None):
    """Convert a sampling result or a training history for ArviZ.

    :param result: a :class:`~pyro_lm.infer.WeightedPosterior` (Importance,
        SMC, QRS, IMH), or a ``fit`` history: a list of dicts with keys
        ``step``, ``loss``, ``time`` and optional metrics (or an object with
        such a list as ``.history``).
    :param bool decode: add the decoded text of each LM site.
    :param batch_dims: names for the batch dimensions (default ``["prompt"]``
        for one, ``batch_0, batch_1, ...`` for more).
    :returns: an ``arviz.InferenceData`` (ArviZ 0.x) or an ``xarray.DataTree``
        (ArviZ 1.x) with the groups described in :mod:`pyro_lm.diagnostics.inference_data`.
    """
    if isinstance(result, WeightedPosterior):
        return _from_posterior(result, decode, batch_dims)
    history = result if isinstance(result, (list, tuple)) else getattr(result, "history", None)
    if isinstance(history, (list, tuple)):
        return history_to_inference_data(list(history))
    raise TypeError(f"result: expected a WeightedPosterior or a fit history (list of dicts), got "
                    f"{type(result).__name__}")


def _chain_shape(post: WeightedPosterior) -> tuple[int, int, str]:
    n = post.num_samples
    chains = int(post.extras.get("num_chains", 1))
    if chains < 1 or n % chains:
        raise ValueError(f"result: extras['num_chains'] = {chains} does not divide the "
                         f"{n} draws")
    layout = post.extras.get("sample_layout", "chain_major")
    if layout not in ("draw_major", "chain_major"):
        raise ValueError(f"result: extras['sample_layout'] must be 'draw_major' or "
                         f"'chain_major', got {layout!r}")
    return chains, n // chains, layout


def _from_posterior(post: WeightedPosterior, decode: bool, batch_dims):
    chains, draws, layout = _chain_shape(post)
    algorithm = algorithm_of(post)
    batch = tuple(post.log_weights.shape[1:])
    bdims = list(batch_dims) if batch_dims is not None else _default_batch_dims(len(batch))
    if len(bdims) != len(batch):
        raise ValueError(f"batch_dims: {len(bdims)} names for a batch of {len(batch)} dims")

    def split(a: np.ndarray) -> np.ndarray:
        if layout == "chain_major":
            return a.reshape((chains, draws) + a.shape[1:])
        return np.swapaxes(a.reshape((draws, chains) + a.shape[1:]), 0, 1)

    def dims_of(name: str, shape: tuple, lead: list[str], event_name=None) -> list[str]:
        rest = shape[len(lead):]
        dims = list(lead)
        if rest[:len(batch)] == batch:
            dims += bdims
            rest = rest[len(batch):]
        if event_name is not None and len(rest) == 1:
            return dims + [event_name]
        return dims + [f"{name}_dim_{k}" for k in range(len(rest))]

    sample_dims = ["chain", "draw"]
    lengths = {post.samples[s].shape[-1] for s in post.lms if s in post.samples}
    posterior = {}
    for site, value in post.samples.items():
        a = split(to_numpy(value))
        if site in post.lms:
            position = "position" if len(lengths) == 1 else f"{site}_position"
            posterior[site] = (dims_of(site, a.shape, sample_dims, position), a)
            if decode:
                text = np.array(post.lms[site].decode(value), dtype=object)
                text = split(text.reshape(value.shape[:-1]))
                posterior[f"{site}_text"] = (sample_dims + bdims, text)
        else:
            posterior[site] = (dims_of(site, a.shape, sample_dims), a)

    lw = to_numpy(post.log_weights).astype(np.float64)
    weight = np.exp(lw - np.logaddexp.reduce(lw, axis=0))
    stats = {"log_weight": (sample_dims + bdims, split(lw)),
             "weight": (sample_dims + bdims, split(weight)),
             "log_normalizer": (bdims, to_numpy(post.log_normalizer()).astype(np.float64)
                                .reshape(batch)),
             "log_normalizer_se": (bdims, to_numpy(post.log_normalizer_stderr())
                                   .astype(np.float64).reshape(batch))}
    for key, value in post.history.items():
        a = to_numpy(value)
        name = key if key not in stats else f"history_{key}"
        if (algorithm == "imh" and chains > 1 and a.ndim >= 2 and a.shape[1] == chains
                and a.shape[0] >= draws):
            a = np.swapaxes(a[-draws:], 0, 1)  # kept steps: (draws, C, ...) -> (chain, draw, ...)
            stats[name] = (dims_of(key, a.shape, sample_dims), a)
        elif a.ndim >= 1:
            stats[name] = (dims_of(key, a.shape, ["step"]), a)
        else:
            stats[name] = ([], a)
    attrs = {"created_by": _CREATED_BY, "inference_library": "pyro_lm",
             "algorithm": algorithm, "num_chains": chains}
    for key, value in post.extras.items():
        if isinstance(value, (torch.Tensor, np.ndarray, float)):
            a = to_numpy(value)
            stats[key if key not in stats else f"extra_{key}"] = (dims_of(key, a.shape, []), a)
        elif isinstance(value, (str, numbers.Number)) and not isinstance(value, bool):
            attrs[key] = value  # ints: num_chains, burn_in, num_proposals, ...

    coords = {"chain": np.arange(chains), "draw": np.arange(draws)}
    coords.update({d: np.arange(s) for d, s in zip(bdims, batch, strict=True)})
    for group in (posterior, stats):
        for dims, a in group.values():
            for d, s in zip(dims, a.shape, strict=True):
                if d not in coords:
                    coords[d] = np.arange(s)

    import xarray as xr

    def dataset(variables: dict):
        used = {d for dims, _ in variables.values() for d in dims}
        return xr.Dataset({k: (dims, a) for k, (dims, a) in variables.items()},
                          coords={d: c for d, c in coords.items() if d in used},
                          attrs=dict(attrs))

    groups = {"posterior": dataset(posterior), "sample_stats": dataset(stats),
              "log_likelihood": dataset({"log_weight": stats["log_weight"]})}
    return _arviz.make_inference_data(groups, attrs=dict(attrs))


def history_to_inference_data(history: list) -> object:
    """A training history (``fit``'s list of per-step metric dicts) as an ArviZ object
    with one ``training`` group indexed by ``step``; the conversion
    :func:`to_inference_data` makes of a history."""
    if not history:
        raise ValueError("result: the history is empty; run at least one step")
    for i, row in enumerate(history):
        if not isinstance(row, dict):
            raise TypeError(f"result[{i}]: expected a dict of metrics, got {type(row).__name__}")
    steps = np.array([row.get("step", i) for i, row in enumerate(history)])
    keys = []
    for row in history:
        keys += [k for k in row if k != "step" and k not in keys]
    variables = {}
    for key in keys:
        values = [row.get(key) for row in history]
        arrays = [None if v is None else to_numpy(v) for v in values]
        first = next((a for a in arrays if a is not None), None)
        if first is None or not np.issubdtype(first.dtype, np.number) and first.dtype != bool:
            continue  # non-numeric metadata has no place on a numeric axis
        filled = [a.astype(np.float64) if a is not None and a.shape == first.shape
                  else np.full(first.shape, np.nan) for a in arrays]
        a = np.stack(filled)
        variables[key] = (["step"] + [f"{key}_dim_{k}" for k in range(first.ndim)], a)
    import xarray as xr

    attrs = {"created_by": _CREATED_BY, "inference_library": "pyro_lm"}
    ds = xr.Dataset(variables, coords={"step": steps}, attrs=attrs)
    return _arviz.make_inference_data({"training": ds}, attrs=dict(attrs))
