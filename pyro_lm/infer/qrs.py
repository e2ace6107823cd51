r"""Quasi-rejection sampling (QRS): exact-in-the-limit samples from the target by rejection.

Draw :math:`x \sim \pi` (the guide or the prior) and accept it with probability

.. math::

    a(x) = \min\Big(1, \frac{\tilde p(x)}{\beta\, \pi(x)}\Big) = \min(1, w(x)/\beta),
    \qquad w = \tilde p / \pi .

The accepted samples follow :math:`p_\beta(x) \propto \min(\tilde p(x), \beta\,\pi(x))`.
When :math:`\beta \ge \max_x w(x)` every acceptance probability is
:math:`w/\beta` and :math:`p_\beta = p^*` exactly (classic rejection sampling);
a smaller :math:`\beta` accepts more (rate :math:`E_\pi[\min(1, w/\beta)]`) at
the price of a bias that the diagnostics below measure (Eikema et al., 2022).
:math:`\beta` is called ``bound`` here (``log_bound`` = :math:`\log\beta`), so as
not to confuse it with the reward temperature of :math:`r(x)/\beta`.

Diagnostics in ``extras``, from every proposal drawn (importance sampling, per
prompt): the acceptance rate; :math:`\log \hat Z = \log \overline{w}`;
:math:`\hat Z_\beta = \overline{\min(w, \beta)}`; the fraction of proposals with
:math:`w > \beta` (zero means no detectable bias); and the total-variation estimate

.. math::

    \widehat{\mathrm{TV}}(p^*, p_\beta) = \tfrac12\, \overline{\big|\, w/\hat Z -
    \min(w, \beta)/\hat Z_\beta \big|}.

References

[1] Bryan Eikema, Germán Kruszewski, Christopher R. Dance, Hady Elsahar,
    Marc Dymetman (2022), "An Approximate Sampler for Energy-Based Models with
    Divergence Diagnostics", TMLR.
"""

from __future__ import annotations

import torch

from pyro_lm._validation import check_positive_int
from pyro_lm.distributed import sharded
from pyro_lm.infer.posterior import WeightedPosterior, check_log_weights, take
from pyro_lm.infer.program import plate_nesting
from pyro_lm.infer.proposal import as_guide, propose
from pyro_lm.ops.stats import log_mean_exp, log_normalizer

__all__ = ["QRS", "pick_log_bound"]


def pick_log_bound(log_weights: torch.Tensor, quantile: float = 1.0) -> torch.Tensor:
    r"""A bound :math:`\log\beta` per prompt: the ``quantile`` of observed :math:`\log w`.

    ``quantile=1.0`` is the largest weight seen (exact if no unseen sequence has a
    larger one); lower quantiles accept more and are biased. Non-finite weights
    (``-inf``) are ignored.

    :param torch.Tensor log_weights: ``(N, *batch)``.
    :returns: ``(*batch)``.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile: expected a float in (0, 1], got {quantile!r}")
    check_log_weights(log_weights, "log_weights")
    finite = torch.where(torch.isfinite(log_weights), log_weights,
                         torch.full_like(log_weights, float("nan")))
    return torch.nanquantile(finite.double(), quantile, dim=0).to(log_weights.dtype)


class QRS:
    r"""Quasi-rejection sampler for a model's target :math:`p^*`.

    :param model: a Pyro model (any program :class:`~pyro_lm.infer.Importance` takes).
    :param proposal: an :class:`~pyro_lm.infer.AutoLMGuide` (or another guide), a
        :class:`~pyro_lm.CausalLM` (as ``AutoLMGuide(model, lm)``), or ``None`` (default)
        for the model's prior.
    :param log_bound: :math:`\log\beta`, a float or a tensor per prompt (``batch``).
        ``None`` (default) picks it from a pilot batch of ``batch_size`` proposals with
        :func:`pick_log_bound` at ``quantile`` (the pilot's samples are used too).
    :param int num_samples: accepted samples to return per prompt.
    :param int batch_size: proposals per prompt per batched decode (default
        ``4 * num_samples``).
    :param int max_proposals: give up (a :class:`RuntimeError`) after this many
        proposals per prompt (default ``1000 * num_samples``).
    :param float quantile: see ``log_bound``.

    :meth:`run` returns a :class:`~pyro_lm.infer.WeightedPosterior` of the first
    ``num_samples`` accepted samples of each prompt with zero log-weights, and
    ``extras`` ``acceptance_rate``, ``log_bound``, ``bound``, ``num_proposals``,
    ``log_Z``, ``frac_above_bound`` and ``tv_estimate`` (see the module docstring).
    """

    def __init__(self, model, proposal=None, log_bound=None, num_samples: int = 100,
                 batch_size: int | None = None, max_proposals: int | None = None,
                 quantile: float = 1.0):
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                            ("max_proposals", max_proposals)):
            if value is not None:
                check_positive_int(value, name)
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile: expected a float in (0, 1], got {quantile!r}")
        if log_bound is not None and torch.isnan(torch.as_tensor(log_bound)).any():
            raise ValueError("log_bound: NaN; pass a float (log of the bound beta) or None")
        self.model = model
        self.proposal = proposal
        self.log_bound = log_bound
        self.num_samples = num_samples
        self.batch_size = batch_size or 4 * num_samples
        self.max_proposals = max_proposals or 1000 * num_samples
        self.quantile = quantile

    @sharded  # torch.distributed: prompts sharded across ranks, posterior gathered
    @torch.no_grad()
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Sample until every prompt has ``num_samples`` accepted completions."""
        guide = as_guide(self.model, self.proposal, owner="QRS")
        nesting = plate_nesting(self.model, guide, args, kwargs)
        values, log_w, accepted, log_bound = {}, [], [], None
        drawn = 0
        while True:
            prop = propose(self.model, guide, self.batch_size, args, kwargs, nesting, "QRS")
            batch = prop.log_weights.shape[1:]
            if log_bound is None:
                if self.log_bound is None:
                    log_bound = pick_log_bound(prop.log_weights, self.quantile)
                else:
                    log_bound = torch.as_tensor(self.log_bound, dtype=prop.log_weights.dtype,
                                                device=prop.log_weights.device).expand(batch)
            accept_prob = (prop.log_weights - log_bound).clamp(max=0).exp()
            accepted.append(torch.rand_like(accept_prob) < accept_prob)
            log_w.append(prop.log_weights)
            for name, x in prop.values.items():
                values.setdefault(name, []).append(x)
            drawn += self.batch_size
            count = torch.cat(accepted).sum(0)
            if bool((count >= self.num_samples).all()):
                break
            if drawn >= self.max_proposals:
                raise RuntimeError(
                    f"max_proposals: only {int(count.min())} of num_samples={self.num_samples} "
                    f"accepted after {drawn} proposals per prompt (acceptance rate "
                    f"{float(count.min()) / drawn:.2g}); raise max_proposals, lower the bound "
                    "(log_bound or quantile) or use a proposal closer to the target")
        accepted = torch.cat(accepted)
        log_w = torch.cat(log_w)
        check_log_weights(log_w, "log_weights")
        # Accepted proposals first, in draw order (a stable sort), per prompt.
        order = torch.sort((~accepted).to(torch.uint8), dim=0, stable=True).indices
        keep = order[: self.num_samples]
        samples = {name: take(torch.cat(parts), keep) for name, parts in values.items()}
        return WeightedPosterior(
            samples, torch.zeros(keep.shape, dtype=log_w.dtype, device=log_w.device),
            lms=prop.lms, log_normalizer=log_normalizer(log_w),
            extras=self._diagnostics(log_w, accepted, log_bound), algorithm="QRS")

    @staticmethod
    def _diagnostics(log_w: torch.Tensor, accepted: torch.Tensor, log_bound: torch.Tensor):
        n = log_w.shape[0]
        log_z = log_normalizer(log_w)
        log_min = torch.minimum(log_w, log_bound.expand_as(log_w))
        log_z_beta = log_mean_exp(log_min, 0)
        tv = 0.5 * ((log_w - log_z).exp() - (log_min - log_z_beta).exp()).abs().mean(0)
        return {"acceptance_rate": accepted.float().mean(0), "log_bound": log_bound,
                "bound": log_bound.exp(), "num_proposals": n, "log_Z": log_z,
                "frac_above_bound": (log_w > log_bound).float().mean(0), "tv_estimate": tv}
