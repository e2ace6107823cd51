r"""KL-regularised RL as stochastic variational inference.

With a prior LM :math:`p_0`, a log-factor :math:`r(x)/\beta` and a guide LM
:math:`q_\theta`, the evidence lower bound of the posterior
:math:`p^*(x) \propto p_0(x)\, e^{r(x)/\beta}` is

.. math::

    \mathrm{ELBO}(\theta)
      = E_{q_\theta}\big[\log p_0(x) + r(x)/\beta - \log q_\theta(x)\big]
      = \frac{1}{\beta} E_{q_\theta}[r(x)] - \mathrm{KL}(q_\theta \,\|\, p_0)
      = \log Z - \mathrm{KL}(q_\theta \,\|\, p^*),

so maximising it is KL-regularised reinforcement learning (scaled by :math:`1/\beta`)
and also minimises :math:`\mathrm{KL}(q_\theta \| p^*)` [1]. Completions are
discrete, so the gradient is a score-function (REINFORCE) estimate [4] from
:math:`K` completions per prompt with a leave-one-out baseline (RLOO) [2, 3]:

.. math::

    f_k = \log p_0(x_k) + \textstyle\sum \mathrm{factors}(x_k) - \log q_\theta(x_k),
    \qquad A_k = f_k - \frac{1}{K-1}\sum_{j \ne k} f_j,

    \nabla_\theta \mathrm{ELBO} \approx \frac1K \sum_{k=1}^K A_k\,
        \nabla_\theta \log q_\theta(x_k),

which is unbiased because the baseline of particle :math:`k` does not depend on
:math:`x_k`. The :math:`-\log q` inside :math:`f_k` is the k1 estimate of the KL
penalty folded into the reward, as in RLOO / PPO-style RLHF.

With ``baseline="prefix"`` the credit is assigned per token instead, by
:class:`~pyro_lm.infer.prefix_elbo.PrefixSequenceELBO` (:mod:`pyro_lm.infer.prefix_elbo`).

References

[1] T. Korbak, E. Perez, C. Buckley, *RL with KL penalties is better viewed as
    Bayesian inference*, Findings of EMNLP 2022.
[2] A. Ahmadian et al., *Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs*, ACL 2024.
[3] W. Kool, H. van Hoof, M. Welling, *Buy 4 REINFORCE Samples, Get a Baseline for
    Free!*, ICLR 2019 DeepRLStructPred workshop.
[4] R. J. Williams, *Simple statistical gradient-following algorithms for
    connectionist reinforcement learning*, Machine Learning 8, 1992.
"""

from __future__ import annotations

import math
import warnings

import pyro
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import (
    MultiFrameTensor,
    get_plate_stacks,
    is_identically_zero,
    is_validation_enabled,
)
from pyro.util import check_if_enumerated

from pyro_lm._validation import check_max_plate_nesting, check_positive_int
from pyro_lm.distributions.lm_distribution import unwrap_lm
from pyro_lm.infer.program import check_vectorized_sites, plate_nesting, raise_vectorized

__all__ = ["SequenceELBO"]

_PARTICLE_PLATE = "num_particles_vectorized"
#: Names of the scalars in :attr:`SequenceELBO.metrics`, in the order computed.
METRICS = ("loss", "elbo", "log_factor", "reward", "kl", "ess")
#: Values of ``SequenceELBO(baseline=...)``.
BASELINES = ("loo", "prefix", "none")


class SequenceELBO(ELBO):
    r"""Vectorised score-function ELBO for LM sites, with a leave-one-out baseline.

    Use it as ``loss=`` of :class:`pyro.infer.SVI` with any guide whose LM sites
    are :class:`~pyro_lm.LMDistribution` (e.g. :class:`~pyro_lm.infer.AutoLMGuide`).
    The ``K`` particles run inside one outer :class:`pyro.plate` (as Pyro's
    ``vectorize_particles``), so each LM site is sampled by one batched decode of
    ``K × batch`` rows and scored by one batched forward of the guide (with
    gradient) and one of the prior (without).

    The learning signal of a non-reparameterised guide site is the sum of every
    :math:`\log p - \log q` and factor term, summed down to the site's plates
    (conditional independence across prompts is used, as in
    :class:`pyro.infer.Trace_ELBO`), then centred by the mean of the other
    particles of the same prompt. With ``kl_weight`` :math:`= w` the objective is

    .. math:: E_q\big[\textstyle\sum \mathrm{factors}\big] - w\,\mathrm{KL}(q \,\|\, p_0),

    where the KL term collects every latent site (``w = 0`` is pure reward
    maximisation, which collapses the guide onto the reward's modes).

    The leave-one-out baseline removes the mean of :math:`f`, which near the
    posterior is almost all of it (:math:`f \approx \log Z`), so there the variance
    falls far below that of :class:`pyro.infer.Trace_ELBO`. It is not the
    variance-optimal constant :math:`E[f\,|\nabla\log q|^2]/E[|\nabla\log q|^2]`,
    though: for guides far from :math:`p^*` whose :math:`f` correlates with
    :math:`|\nabla \log q|^2` it can do worse than no baseline (``baseline="none"``).
    At the prior, a sparse reward leaves the mean little to remove.

    ``baseline="prefix"`` assigns credit per token: ``SequenceELBO(baseline="prefix")``
    makes a :class:`~pyro_lm.infer.prefix_elbo.PrefixSequenceELBO`, which documents it.

    :param int num_particles: completions per prompt ``K`` (at least 2 with the
        leave-one-out and prefix baselines).
    :param str baseline: ``"loo"`` (leave-one-out, RLOO; the default), ``"prefix"``
        (per-token credit with prefix and leave-one-out baselines) or ``"none"``
        (plain REINFORCE).
    :param bool vectorize: run the particles in one batched call (default) or one
        after another (same estimator, less peak memory per call).
    :param float kl_weight: weight :math:`w \ge 0` of the KL term.
    :param int max_plate_nesting: the model's plate nesting (default: found by
        tracing the model and guide once without decoding).
    :param bool retain_graph: passed to ``backward``.

    After each :meth:`loss` / :meth:`loss_and_grads`, :attr:`metrics` holds the
    step's estimates as floats, each the mean over particles of a per-particle
    total over prompts and sites (so ``elbo == log_factor - kl``):

    * ``loss``: the value returned, :math:`-E_q[\sum\mathrm{factors}] + w\,\mathrm{KL}`.
    * ``elbo``: :math:`E_q[\log p_0 + \sum \mathrm{factors} - \log q]` (always with
      ``w = 1``).
    * ``log_factor``: :math:`E_q[\sum \mathrm{factors}]`, e.g. :math:`E_q[r]/\beta`.
    * ``reward``: the mean of the factor named ``"reward"`` if the model has one,
      else ``log_factor``.
    * ``kl``: :math:`E_q[\log q - \log p_0]`, the k1 estimate of
      :math:`\mathrm{KL}(q \| p_0)`.
    * ``ess``: effective sample size of the importance weights
      :math:`\tilde p / q` of the first LM site, per prompt, averaged over prompts
      (between 1 and ``K``; ``K`` when :math:`q = p^*`).
    """

    #: ``baseline`` → the subclass that implements it, filled in by that subclass's module
    #: (``"prefix"``: :class:`~pyro_lm.infer.PrefixSequenceELBO`); ``SequenceELBO(baseline=...)``
    #: makes one.
    VARIANTS: dict = {}

    def __new__(cls, *args, **kwargs):
        baseline = args[1] if len(args) > 1 else kwargs.get("baseline", "loo")
        variant = SequenceELBO.VARIANTS.get(baseline)
        if variant is not None:
            if cls is SequenceELBO:
                cls = variant
            elif not issubclass(cls, variant):
                raise ValueError(f"baseline: {baseline!r} is the estimator {variant.__name__}; "
                                 f"{cls.__name__} subclasses SequenceELBO, so subclass "
                                 f"{variant.__name__} instead")
        return super().__new__(cls)

    def __init__(self, num_particles: int = 8, baseline: str = "loo", vectorize: bool = True,
                 kl_weight: float = 1.0, max_plate_nesting: float = float("inf"),
                 retain_graph: bool | None = None):
        check_positive_int(num_particles, "num_particles")
        if baseline not in BASELINES:
            raise ValueError(f"baseline: expected one of {', '.join(map(repr, BASELINES))}, "
                             f"got {baseline!r}")
        if baseline != "none" and num_particles < 2:
            raise ValueError(f"num_particles: baseline={baseline!r} takes a leave-one-out mean "
                             "over the particles, so it needs at least 2; pass "
                             "num_particles >= 2 or baseline='none'")
        try:
            kl_weight = float(kl_weight)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"kl_weight: expected a number >= 0, got {kl_weight!r}") from None
        if not (math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight: expected a finite number >= 0, got {kl_weight!r}")
        check_max_plate_nesting(max_plate_nesting)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=False, retain_graph=retain_graph)
        if max_plate_nesting != float("inf"):
            self.max_plate_nesting = max_plate_nesting + 1  # the particle plate
        self.baseline = baseline
        self.vectorize = bool(vectorize)
        self.kl_weight = kl_weight
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ traces
    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        """Read the plate nesting from one run of model and guide in which every
        LM site gets a placeholder value (nothing is decoded)."""
        self.max_plate_nesting = plate_nesting(model, guide, args, kwargs) + 1

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        """One pair of traces for all particles, or one per particle when not
        vectorised; either way every site sits inside the outer particle plate."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        sizes = [self.num_particles] if self.vectorize else [1] * self.num_particles
        for size in sizes:
            plate = pyro.plate(_PARTICLE_PLATE, size, dim=-self.max_plate_nesting)
            try:
                traces = self._get_trace(plate(model), plate(guide), args, kwargs)
            except (RuntimeError, TypeError, ValueError) as e:
                raise_vectorized(e, size, -self.max_plate_nesting)
            for trace in traces:
                check_vectorized_sites(trace, self.max_plate_nesting - 1)
            yield traces

    # -------------------------------------------------------------- estimator
    def _particle_terms(self, model_trace, guide_trace, model, args, kwargs,
                        need_signals: bool = True):
        """Per-particle totals, learning signals and the pathwise surrogate of one
        pair of traces whose particle dim has ``k`` entries; ``model`` (without the
        particle plate), ``args``, ``kwargs`` and ``need_signals`` are passed on to
        :meth:`_learning_signal`."""
        n, w = self.max_plate_nesting, self.kl_weight
        model_stacks = get_plate_stacks(model_trace)
        guide_stacks = get_plate_stacks(guide_trace)
        factors, latent = MultiFrameTensor(), MultiFrameTensor()
        totals = {"log_factor": 0.0, "log_p": 0.0, "log_q": 0.0, "reward": None}
        pathwise = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            log_p = site["log_prob"]
            if site["is_observed"]:
                factors.add((model_stacks[name], log_p.detach()))
                totals["log_factor"] = totals["log_factor"] + _per_particle(log_p, n)
                if name == "reward":
                    totals["reward"] = _per_particle(log_p, n)
            else:
                latent.add((model_stacks[name], log_p.detach()))
                totals["log_p"] = totals["log_p"] + _per_particle(log_p, n)
            if log_p.requires_grad:  # model parameters or reparameterised paths
                weight = 1.0 if site["is_observed"] else w
                pathwise = pathwise + weight * log_p.sum()
        scores = []
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            log_q, score_function, entropy_term = site["score_parts"]
            latent.add((guide_stacks[name], -log_q.detach()))
            totals["log_q"] = totals["log_q"] + _per_particle(log_q, n)
            if isinstance(entropy_term, torch.Tensor) and entropy_term.requires_grad:
                pathwise = pathwise - w * entropy_term.sum()
            if not is_identically_zero(score_function):  # score-function (e.g. LM) sites
                scores.append((site, score_function))
        signals = []
        for site, score in scores:
            frames = site["cond_indep_stack"]
            log_f, log_l = factors.sum_to(frames), latent.sum_to(frames)
            log_w = torch.broadcast_to(log_f + log_l, score.shape)
            is_lm = unwrap_lm(site["fn"]) is not None
            score, signal, extra = self._learning_signal(model_trace, site, score, log_f, log_l,
                                                         model, args, kwargs, need_signals)
            signals.append((score, signal, log_w, is_lm, extra))
        return totals, signals, pathwise

    def _learning_signal(self, model_trace, guide_site, score, log_f, log_l, model, args,
                         kwargs, need_signals):
        r"""The score and learning signal of one score-function site of the guide.

        :param score: the site's score function, :math:`\log q` of its value.
        :param log_f: the model's factors summed down to the site's plates.
        :param log_l: :math:`\sum (\log p - \log q)` of the latent sites, likewise.
        :param bool need_signals: false where only the loss is wanted (a subclass may
            then skip the dear part of its signal).
        :returns: ``(score, signal, extra)``: ``signal`` shaped like ``score``, and
            ``extra`` (``None`` here) what a subclass's :meth:`_advantage` needs, a
            tensor with the particle dim where the score has it.
        """
        return score, torch.broadcast_to(log_f + self.kl_weight * log_l, score.shape), None

    def _advantage(self, signal, extra, pdim: int):
        """The centred learning signal: minus the mean of the other particles (leave-one-out)
        along the particle dim ``pdim``, or as it is with ``baseline="none"``."""
        if self.baseline == "none":
            return signal
        others = (signal.sum(pdim, keepdim=True) - signal) / (self.num_particles - 1)
        return signal - others

    def _estimate(self, model, guide, args, kwargs, need_signals: bool = True):
        """``(loss, surrogate_loss, metrics)``: the first and last detached. Without
        ``need_signals`` the surrogate may use a cheaper (still valid) baseline."""
        blocks = [self._particle_terms(m, g, model, args, kwargs, need_signals)
                  for m, g in self._get_traces(model, guide, args, kwargs)]
        n, k = self.max_plate_nesting, self.num_particles
        totals = {key: _cat([b[0][key] for b in blocks], 0) for key in blocks[0][0]}
        pathwise = sum(b[2] for b in blocks) / k
        zero = torch.zeros((), device=_device_of(totals))
        log_factor = totals["log_factor"] + zero
        log_ratio = totals["log_p"] - totals["log_q"] + zero  # log p0 - log q, (K,)
        objective = log_factor + self.kl_weight * log_ratio
        surrogate = -pathwise
        finite = torch.ones((), dtype=torch.bool, device=zero.device)
        ess = None
        for i in range(len(blocks[0][1])):
            score, signal, log_w, is_lm, extra = _cat_site(blocks, i, n)
            pdim = log_w.dim() - n
            advantage = self._advantage(signal, extra, pdim)
            finite = finite & torch.isfinite(advantage).all()
            surrogate = surrogate - (advantage.detach() * score).sum() / k
            if ess is None and is_lm:
                ess = _ess(log_w, pdim)
        if ess is None:
            ess = _ess(log_factor + log_ratio, 0)
        reward = totals["reward"] if totals["reward"] is not None else log_factor
        loss = -objective.mean()
        metrics = torch.stack([loss, (log_factor + log_ratio).mean(), log_factor.mean(),
                               (reward + zero).mean(), -log_ratio.mean(), ess,
                               finite.to(zero.dtype)]).detach()
        return loss.detach(), surrogate, metrics

    def _record(self, metrics: torch.Tensor, training: bool) -> float:
        values = metrics.tolist()  # the step's one host sync
        self.metrics = dict(zip(METRICS, values[:-1], strict=True))
        if training and not values[-1]:
            raise ValueError(
                "SequenceELBO: a particle has a non-finite learning signal (a factor of -inf, "
                "e.g. a hard constraint, or a NaN). The ELBO of a guide that can violate a hard "
                "constraint is -inf and has no gradient; replace the -inf factor by a finite "
                "penalty, or use Importance / SMC, which handle hard constraints")
        if math.isnan(values[0]):
            warnings.warn("SequenceELBO: loss is NaN", stacklevel=3)
        return values[0]

    # ------------------------------------------------------------------ ELBO API
    def loss(self, model, guide, *args, **kwargs) -> float:
        r"""An unbiased estimate of :math:`-\mathrm{ELBO}` (with ``kl_weight``), no gradient.

        :rtype: float
        """
        with torch.no_grad():
            loss, _, metrics = self._estimate(model, guide, args, kwargs, need_signals=False)
        return self._record(metrics, training=False)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """A tensor whose value is :meth:`loss` and whose gradient is the
        score-function estimate (with the chosen ``baseline``) of :math:`-\\nabla\\mathrm{ELBO}`."""
        loss, surrogate, metrics = self._estimate(model, guide, args, kwargs)
        self._record(metrics, training=True)
        return loss + (surrogate - surrogate.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the loss and accumulate its gradient into the parameters' ``.grad``.

        :rtype: float
        """
        loss, surrogate, metrics = self._estimate(model, guide, args, kwargs)
        value = self._record(metrics, training=True)
        if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return value


def _per_particle(value: torch.Tensor, n: int) -> torch.Tensor:
    """Sum a site's ``(..., K, *plates)`` term over everything but the particle dim → ``(K,)``."""
    pdim = value.dim() - n
    if pdim != 0:
        raise ValueError(f"SequenceELBO: a site's log-probability has shape {tuple(value.shape)}, "
                         f"more batch dims than max_plate_nesting={n - 1} allows; declare every "
                         "batch dim with pyro.plate (or .to_event for event dims)")
    return value.reshape(value.shape[0], -1).sum(-1)


def _cat(parts, dim):
    if any(p is None for p in parts):
        return None
    if not isinstance(parts[0], torch.Tensor):
        return parts[0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _cat_site(blocks, i: int, n: int):
    """The ``i``-th score site's ``(score, signal, log_w, is_lm, extra)``, its tensors
    concatenated over the blocks' particle dims (``log_w`` has the site's batch shape;
    the others may have more dims on the right)."""
    pdim = blocks[0][1][i][2].dim() - n
    parts = [_cat([b[1][i][j] for b in blocks], pdim) for j in (0, 1, 2)]
    extra = blocks[0][1][i][4]
    if extra is not None:
        extra = _cat([b[1][i][4] for b in blocks], pdim)
    return (*parts, blocks[0][1][i][3], extra)


def _device_of(totals) -> torch.device:
    for value in totals.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _ess(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Mean over the other dims of :math:`(\sum w)^2/\sum w^2` along ``dim`` (0 if all
    weights are zero)."""
    ess = (2 * log_w.logsumexp(dim) - (2 * log_w).logsumexp(dim)).exp()
    return torch.nan_to_num(ess, nan=0.0).mean()
