r"""Vectorised importance sampling over a whole program.

Draw every latent site from a proposal :math:`q` (a guide, or the model's own sites:
the prior) and weight each execution by

.. math::

    \log w_i = \sum_s \sigma_s \log p(s_i) - \sum_{s \text{ proposed}} \log q(s_i),
    \qquad \hat Z = \frac1N \sum_i w_i,

(:class:`~pyro_lm.infer.program.Execution`: the one scorer, with its plate rule).
With the prior as proposal only the factors and observed sites are evaluated; with
a guide, :math:`\log q` of an LM site is the log-probability computed while
decoding, so only :math:`\log p_0` costs one extra (chunked) forward pass.

All ``N`` samples of a chunk are drawn by one batched decode per LM site: the
program runs once inside an outer particle plate of size ``N``, left of the model's
own plates (like Pyro's ``vectorize_particles``).

With ``constraints`` (LM site name → :class:`~pyro_lm.constraints.Constraint`) each
constrained site is drawn by masked decoding from its proposal LM :math:`q` (the
prior's, or the guide's), :math:`r` of :mod:`pyro_lm.constraints.masked`, and the
target is the model conditioned on every constraint :math:`c_s`:

.. math::

    \log w_i = \log \tilde p(z_i, x_i) + \sum_s c_s(x_{s,i})
              - \log \pi(z_i) - \sum_s \log r_s(x_{s,i}),

where on a valid completion :math:`\log p_0(x) - \log r(x)` is the allowed mass
:math:`\sum_t \log Q_t` plus :math:`\log p_0(x) / q(x)`.
"""

from __future__ import annotations

import torch

from pyro_lm._validation import check_positive_int
from pyro_lm.constraints.base import TRUNCATION_HINT, check_constraints, check_sites
from pyro_lm.constraints.messenger import constrained_proposal
from pyro_lm.distributed import sharded
from pyro_lm.distributions.lm_distribution import unwrap_lm
from pyro_lm.infer.posterior import WeightedPosterior, check_log_weights
from pyro_lm.infer.program import execute, lm_site_names, plate_nesting, structure_trace
from pyro_lm.infer.proposal import as_guide

__all__ = ["Importance"]


class Importance:
    r"""Importance sampling with the prior or a guide as proposal, vectorised.

    :param model: a Pyro model: LM sites (sampled or observed), other latent sites,
        plates, factors.
    :param guide: ``None`` to propose from the model's own sites (the prior),
        or a guide program, e.g. :class:`~pyro_lm.infer.AutoLMGuide` (a
        :class:`~pyro_lm.CausalLM` stands for ``AutoLMGuide(model, lm)``).
    :param int num_samples: ``N``, samples per independent problem (prompt).
    :param int batch_size: samples per batched decode (default: all ``N`` at
        once); bounds memory.
    :param dict constraints: LM site name → :class:`~pyro_lm.constraints.Constraint`:
        the site is drawn by masked decoding and the target conditioned on the
        constraint (see above).

    ``run(*args, **kwargs)`` returns a :class:`~pyro_lm.infer.WeightedPosterior`
    with ``log_weights`` of shape ``(N, *batch)``: one column per element of the
    plates that every site shares (e.g. prompts), one joint weight where a site
    lies outside a plate. Latent sites that the guide does not sample are drawn
    from the model and cancel from the weight.

    References:

    [1] A. Doucet, N. de Freitas, N. Gordon (eds.), *Sequential Monte Carlo Methods
    in Practice*, Springer, 2001 (ch. 1, importance sampling).
    [2] A. Kong, J. S. Liu, W. H. Wong, "Sequential imputations and Bayesian missing
    data problems", JASA, 1994 (effective sample size).
    """

    def __init__(self, model, guide=None, num_samples: int = 100, batch_size: int | None = None,
                 constraints=None):
        if not callable(model):
            raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide: expected None, a CausalLM or a callable guide, got "
                            f"{type(guide).__name__}")
        self.model = model
        self.guide = guide
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.batch_size = (None if batch_size is None
                           else check_positive_int(batch_size, "batch_size"))
        self.constraints = check_constraints(constraints, "Importance")

    @sharded  # torch.distributed: prompts sharded across ranks, posterior gathered
    @torch.no_grad()
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Draw ``num_samples`` weighted samples for the model's arguments."""
        guide = as_guide(self.model, self.guide, "guide", "Importance", self.constraints)
        if self.constraints:
            trace, _ = structure_trace(self.model, None, args, kwargs)
            check_sites(self.constraints, {name: unwrap_lm(trace.nodes[name]["fn"]).lm
                                           for name in lm_site_names(trace)}, "Importance")
            guide = constrained_proposal(self.model, guide, self.constraints)
        nesting = plate_nesting(self.model, guide, args, kwargs)
        size = self.batch_size or self.num_samples
        weights, parts, lms = [], [], {}
        for start in range(0, self.num_samples, size):
            run = execute(self.model, guide, min(size, self.num_samples - start), args,
                          kwargs, nesting, owner="Importance")
            log_w = run.log_weights()
            for name, constraint in self.constraints.items():
                log_w = log_w + run.to_batch(constraint(run.model_trace.nodes[name]["value"]),
                                             name)
            weights.append(log_w)
            parts.append(run.samples())
            lms = run.lms()
        samples = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        log_w = torch.cat(weights)
        check_log_weights(log_w, "Importance", fix=(TRUNCATION_HINT if self.constraints else "")
                          + "Draw more samples, use a guide closer to the posterior (or SMC), "
                            "or relax the -inf factors")
        return WeightedPosterior(samples, log_w, lms=lms, algorithm="Importance")
