r"""Vectorised importance sampling over a model's LM sites.

Draw :math:`x_i \sim q` (a guide's LM sites, or the model's own LM sites: the
prior :math:`p_0`) and weight each draw, per prompt, by

.. math::

    \log w_i = \log p_0(x_i) + \sum_k f_k(x_i) - \log q(x_i),
    \qquad \hat Z = \frac1N \sum_i w_i,

where :math:`f_k` are the model's log-factors. With the prior as proposal
:math:`\log p_0` and :math:`\log q` cancel and only the factors are evaluated;
with a guide, :math:`\log q` is the log-probability computed while decoding, so
only :math:`\log p_0` costs one extra (chunked) forward pass.

All ``N`` samples of a chunk are drawn by one batched decode: the program runs
once inside an outer particle plate of size ``N``, at a dim left of the model's
own plates (like Pyro's ``vectorize_particles``).
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm._validation import check_positive_int
from pyro_lm.distributions.lm_distribution import LMDistribution
from pyro_lm.exact import unwrap
from pyro_lm.infer.autoguide import is_lm_placeholder, max_plate_nesting, placeholder_trace
from pyro_lm.infer.posterior import WeightedPosterior

__all__ = ["Importance", "model_structure", "reduce_to_batch", "vectorize"]

PARTICLE_PLATE = "_pyro_lm_particles"


class _SampleLM(Messenger):
    """Samples unobserved LM sites with :meth:`LMDistribution.sample_with_log_prob`
    and keeps the decoding log-probabilities in ``self.log_probs`` (site → tensor),
    so that :math:`\\log q(x)` needs no second forward pass."""

    def __init__(self):
        super().__init__()
        self.log_probs = {}

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        if not isinstance(msg["fn"], LMDistribution):
            return  # wrapped (e.g. Independent): sample it the ordinary way
        x, log_prob = msg["fn"].sample_with_log_prob()
        msg["value"] = x
        msg["done"] = True
        self.log_probs[msg["name"]] = log_prob


def vectorize(fn, num: int, dim: int):
    """Run ``fn`` inside a particle plate of size ``num`` at ``dim``."""

    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def model_structure(fn, *args, **kwargs):
    """Trace ``fn`` with placeholder LM values (no decoding).

    :returns: ``(trace, lm_names, max_plate_nesting)``.
    """
    try:
        trace = placeholder_trace(fn, *args, **kwargs)
    except ZeroDivisionError as e:  # pyro.plate of size 0
        raise ValueError(f"prompts: the model built an empty plate ({e}); pass at least one "
                         "prompt (was the list of prompts empty?)") from e
    lm_names = [name for name, site in trace.nodes.items() if is_lm_placeholder(site)]
    nesting = max_plate_nesting(trace)
    return trace, lm_names, nesting


def site_log_prob(site, log_probs=None) -> torch.Tensor:
    """Scaled and masked log-density of a traced sample site (the decoding
    log-probability where :class:`_SampleLM` recorded one in ``log_probs``)."""
    log_prob = (log_probs or {}).get(site["name"])
    if log_prob is None:
        log_prob = site["fn"].log_prob(site["value"])
    return scale_and_mask(log_prob, site["scale"], site["mask"])


def reduce_to_batch(log_prob, batch_shape: torch.Size, name: str) -> torch.Tensor:
    """Sum a site's log-density ``(N, ...)`` down to the weights' shape ``(N, *batch_shape)``.

    Dims where ``batch_shape`` is 1 (plates the LM site is not in) are summed;
    a site that lies outside a plate of the LM site cannot be split among its
    batch elements and is an error.
    """
    n = len(batch_shape) + 1
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() == 0:
        log_prob = torch.as_tensor(log_prob).reshape((1,) * n)
    if log_prob.dim() > n:
        raise ValueError(f"site {name!r}: log-density of shape {tuple(log_prob.shape)} has more "
                         f"dims than the particle and plate dims ({n}); declare every batch dim "
                         "of this site with a pyro.plate")
    if log_prob.dim() < n:
        log_prob = log_prob.reshape((1,) * (n - log_prob.dim()) + tuple(log_prob.shape))
    for d, size in enumerate(batch_shape, start=1):
        if size == 1 and log_prob.shape[d] > 1:
            log_prob = log_prob.sum(d, keepdim=True)
        elif size > 1 and log_prob.shape[d] == 1:
            raise ValueError(
                f"site {name!r}: its log-density is shared by the {size} batch elements of the "
                "LM site (it lies outside their plate), so it cannot be split into per-prompt "
                "weights; compute it inside the LM site's plate")
    return log_prob


class Importance:
    r"""Importance sampling with the prior or a guide as proposal, vectorised.

    :param model: a Pyro model with :class:`~pyro_lm.LMDistribution` sites and factors.
    :param guide: ``None`` to propose from the model's own sites (the prior),
        or a guide program, e.g. :class:`~pyro_lm.infer.AutoLMGuide`.
    :param int num_samples: ``N``, samples per prompt.
    :param int batch_size: samples per batched decode (default: all ``N`` at
        once); bounds memory.

    ``run(*args, **kwargs)`` returns a :class:`~pyro_lm.infer.WeightedPosterior`
    with ``log_weights`` of shape ``(N, *batch)``, one column per prompt.
    Latent sites that the guide does not sample are drawn from the model and
    cancel from the weight.

    References:

    [1] A. Doucet, N. de Freitas, N. Gordon (eds.), *Sequential Monte Carlo Methods
    in Practice*, Springer, 2001 (ch. 1, importance sampling).
    [2] A. Kong, J. S. Liu, W. H. Wong, "Sequential imputations and Bayesian missing
    data problems", JASA, 1994 (effective sample size).
    """

    def __init__(self, model, guide=None, num_samples: int = 100, batch_size: int | None = None):
        if not callable(model):
            raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide: expected None or a callable guide, got {type(guide).__name__}")
        self.model = model
        self.guide = guide
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.batch_size = (None if batch_size is None
                           else check_positive_int(batch_size, "batch_size"))

    def _nesting(self, *args, **kwargs) -> int:
        _, lm_names, nesting = model_structure(self.model, *args, **kwargs)
        if not lm_names:
            raise ValueError("model: it has no unobserved LMDistribution sample site to infer")
        if self.guide is not None and not hasattr(self.guide, "get_lm_sites"):
            nesting = max(nesting, model_structure(self.guide, *args, **kwargs)[2])
        return nesting

    def _chunk(self, num: int, dim: int, args, kwargs):
        """Weights ``(num, *batch)`` and latent values of one batched draw."""
        model = vectorize(self.model, num, dim)
        sampler = _SampleLM()
        if self.guide is None:
            model_trace = poutine.trace(sampler(model)).get_trace(*args, **kwargs)
            guide_trace = None
        else:
            guide = vectorize(self.guide, num, dim)
            guide_trace = poutine.trace(sampler(guide)).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
        sites = [(name, site) for name, site in model_trace.nodes.items()
                 if site["type"] == "sample" and not site_is_subsample(site)]
        lm_sites = {name: site for name, site in sites
                    if not site["is_observed"] and unwrap(site["fn"]) is not None}
        batch = torch.broadcast_shapes(*(s["fn"].batch_shape for s in lm_sites.values()))[1:]
        proposed = set() if guide_trace is None else {
            name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]}
        log_w = 0.0
        for name, site in sites:
            if site["is_observed"] or name in proposed:
                log_w = log_w + reduce_to_batch(site_log_prob(site), batch, name)
        if guide_trace is not None:
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not site["is_observed"] \
                        and not site_is_subsample(site):
                    log_q = site_log_prob(site, sampler.log_probs)
                    log_w = log_w - reduce_to_batch(log_q, batch, name)
        device = next(iter(lm_sites.values()))["value"].device
        log_w = torch.as_tensor(log_w, dtype=torch.float32, device=device)
        log_w = log_w.expand((num,) + tuple(batch))
        samples = {name: site["value"] for name, site in sites if not site["is_observed"]}
        lms = {name: unwrap(site["fn"]).lm for name, site in lm_sites.items()}
        return log_w, samples, lms

    @torch.no_grad()
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Draw ``num_samples`` weighted samples for the model's arguments."""
        dim = -(self._nesting(*args, **kwargs) + 1)
        size = self.batch_size or self.num_samples
        weights, parts, lms = [], [], {}
        for start in range(0, self.num_samples, size):
            num = min(size, self.num_samples - start)
            log_w, samples, lms = self._chunk(num, dim, args, kwargs)
            weights.append(log_w)
            parts.append(samples)
        samples = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return WeightedPosterior(samples, torch.cat(weights), lms=lms)
