r"""Distributional policy gradients: fit a guide by forward-KL (or f-divergence) matching.

The target of a model is :math:`p^*(x) = \tilde p(x) / Z` with
:math:`\tilde p(x) = p_0(x) \exp(\sum_k f_k(x))` (prior LM times factors).
Instead of maximising the ELBO (reverse KL, i.e. KL-regularised RL), DPG
minimises the *forward* KL from the target to the guide :math:`q_\theta`,

.. math::

    \mathrm{KL}(p^* \| q_\theta) = E_{p^*}[\log p^*(x) - \log q_\theta(x)], \qquad
    \nabla_\theta \mathrm{KL}(p^* \| q_\theta) = -E_{p^*}[\nabla_\theta \log q_\theta(x)],

which is mass-covering: it cannot collapse onto the reward's mode. The
expectation under :math:`p^*` is estimated by self-normalised importance
sampling from a proposal :math:`\pi` (by default the guide itself, detached:
*on-policy* DPG): with :math:`x_k \sim \pi`, :math:`w_k = \tilde p(x_k)/\pi(x_k)`,
:math:`\bar w_k = w_k / \sum_j w_j` and :math:`\bar\rho_k` the self-normalised
weights of :math:`q_\theta/\pi` (:math:`1/K` on-policy),

.. math::

    \widehat{\nabla} = -\sum_k (\bar w_k - \bar\rho_k)\, \nabla_\theta \log q_\theta(x_k),

where subtracting :math:`\bar\rho_k` is the baseline of Korbak et al. (2022)
(:math:`E_q[\nabla \log q] = 0`). All ``K`` particles of all prompts are drawn
in one batched decode; the guide is run once with gradients, the model once,
vectorised, under ``poutine.condition``.

**f-divergences** (Go et al., 2023). Write :math:`D_f(p^*\|q) = E_q[f(u)]`
with :math:`u = p^*(x)/q(x)` and :math:`f` convex, :math:`f(1) = 0`. Then

.. math::

    \nabla_\theta D_f = \sum_x \nabla q\,[f(u) - u f'(u)]
    = E_q\big[g(u)\, \nabla_\theta \log q_\theta(x)\big], \qquad g(u) = f(u) - u f'(u).

* ``"kl"``: :math:`f(u) = u \log u` (forward :math:`\mathrm{KL}(p^*\|q)`),
  :math:`g(u) = -u`;
* ``"rkl"``: :math:`f(u) = -\log u` (reverse :math:`\mathrm{KL}(q\|p^*)`, the ELBO's),
  :math:`g(u) = 1 - \log u`;
* ``"js"``: :math:`f(u) = \tfrac12[u \log\tfrac{2u}{1+u} + \log\tfrac{2}{1+u}]`
  (Jensen-Shannon), :math:`g(u) = \tfrac12 \log\tfrac{2}{1+u}`;
* ``"tv"``: :math:`f(u) = \tfrac12 |u - 1|` (total variation),
  :math:`g(u) = -\tfrac12\, \mathrm{sign}(u - 1)`.

Constants in :math:`g` drop out (:math:`E_q[\nabla \log q] = 0`).
For ``"kl"`` the gradient is the self-normalised estimator above. For the
others :math:`u_k = \tilde p(x_k) / (\hat Z q(x_k))` uses the running
estimate :math:`\hat Z` below, and the gradient
:math:`\sum_k \bar\rho_k (g(u_k) - b_k) \nabla \log q(x_k)` uses a
leave-one-out baseline :math:`b_k` on-policy (an unbiased estimator up to
the error of :math:`\hat Z`), the :math:`\bar\rho`-weighted mean off-policy.

**Partition function.** :math:`\hat Z` is the *cumulative mean* of every
importance weight seen so far (unbiased for :math:`Z` whatever the proposal
was at each step), or an exponential moving average with ``z_decay``; it is
kept per prompt and reset when the batch shape changes or by
:meth:`DPG.reset`. It enters the loss value
:math:`\widehat{\mathrm{KL}} = \sum_k \bar w_k \log(\tilde p(x_k)/q(x_k)) - \log \hat Z`
and the f-divergence gradients, not the forward-KL gradient.

**Jeffreys** (``divergence="jeffreys"``, as in BOND [5]). With the mixing weight
:math:`\alpha` (``forward_weight``),

.. math::

    J_\alpha(p^*, q) = \alpha\, \mathrm{KL}(p^* \| q) + (1 - \alpha)\, \mathrm{KL}(q \| p^*),

mode-covering and mode-seeking at once; its gradient is :math:`\alpha` times the
forward-KL estimator above plus :math:`1 - \alpha` times the ``"rkl"`` one (both on
the same particles), and its value the same mix of the two estimates.

**A sampler as proposal** (``proposal="smc"`` or a sampler object, e.g. an
:class:`~pyro_lm.infer.SMC`, :class:`~pyro_lm.infer.QRS` or
:class:`~pyro_lm.infer.Importance` of the same model). A sampler returns particles
:math:`x_i` with weights :math:`w_i` whose weighted empirical measure
:math:`\sum_i \bar w_i \delta_{x_i}` approximates :math:`p^*` (consistently in the
number of particles :math:`N`) and an unbiased estimate :math:`\hat Z_\text{batch}`
of :math:`Z` [6]. For SMC the weights are the final ones: after a resampling step
every particle carries the population's mean weight, and later increments reweight
them, so duplicated particles count once per copy. Since
:math:`\nabla_\theta \mathrm{KL}(p^*\|q_\theta) = -E_{p^*}[\nabla_\theta \log q_\theta(x)]`
is an expectation under the target, which does not depend on :math:`\theta`,

.. math::

    \widehat{\nabla} = -\sum_i \bar w_i\, \nabla_\theta \log q_\theta(x_i),

however the particles were proposed: SMC may propose from the guide itself
(``SMC(model, guide=guide, ...)``, which ``proposal="smc"`` builds with
``num_particles`` particles), with a ``lookahead`` proposal or a learned ``twist``;
the proposal's dependence on :math:`\theta` changes the variance only, not what is
estimated (as in SMC-Wake [7]). There is no :math:`\bar\rho` baseline here
(:math:`E_q[\nabla \log q] = 0` needs samples of :math:`q`, and the particles'
marginal law is not tractable), so only ``divergence="kl"`` takes a sampler.
:math:`\log\tilde p(x_i)` (for the loss value) is scored by running the program with
its latent sites held at the particles, and :math:`\hat Z` is the running mean of the
sampler's :math:`\hat Z_\text{batch}` (weighted by :math:`N`), unbiased as above.

Samples are drawn and weighed by the one reader and scorer
(:func:`~pyro_lm.infer.program.execute`): the proposal runs the whole program (other
latent sites from the guide's ``latent_guide`` or the prior, chained LM sites with the
prompts of each execution), and :math:`q_\theta` is scored on the same LM sites.

References

[1] Tetiana Parshakova, Jean-Marc Andreoli, Marc Dymetman (2019),
    "Distributional Reinforcement Learning for Energy-Based Sequential Models".
[2] Muhammad Khalifa, Hady Elsahar, Marc Dymetman (2021),
    "A Distributional Approach to Controlled Text Generation", ICLR.
[3] Tomasz Korbak, Hady Elsahar, German Kruszewski, Marc Dymetman (2022),
    "On Reinforcement Learning and Distribution Matching for Fine-Tuning
    Language Models with no Catastrophic Forgetting", NeurIPS.
[4] Dongyoung Go, Tomasz Korbak, German Kruszewski, Jos Rozen, Nahyeon Ryu,
    Marc Dymetman (2023), "Aligning Language Models with Preferences through
    f-divergence Minimization", ICML.
[5] Pier Giuseppe Sessa et al. (2025), "BOND: Aligning LLMs with Best-of-N
    Distillation", ICLR (Jeffreys divergence matching).
[6] P. Del Moral (2004), *Feynman-Kac Formulae*, Springer (unbiased SMC estimates of
    :math:`Z`).
[7] Declan McNamara, Jackson Loper, Jeffrey Regier (2024), "Sequential Monte Carlo for Inclusive
    KL Minimization in Amortized Variational Inference", AISTATS (SMC-Wake).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.infer import ELBO

from pyro_lm._validation import check_max_plate_nesting
from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.posterior import WeightedPosterior
from pyro_lm.infer.program import execute, latent_site_names, lm_site_names, plate_nesting
from pyro_lm.infer.replay import held_execution
from pyro_lm.infer.smc import SMC
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.ops.stats import check_log_weights, ess, log_normalizer

__all__ = ["DPG", "DIVERGENCES"]

#: Divergences :class:`DPG` minimises, see the module docstring.
DIVERGENCES = ("kl", "rkl", "js", "tv", "jeffreys")
#: Names of the floats in :attr:`DPG.metrics`, in the order computed.
METRICS = ("loss", "kl_pq", "log_Z", "log_Z_batch", "ess", "reward", "kl_q_prior")


# --------------------------------------------------------------------------- the loss
def _g(divergence: str, log_u: torch.Tensor) -> torch.Tensor:
    """:math:`g(u) = f(u) - u f'(u)` up to an additive constant (see the module docstring)."""
    if divergence == "rkl":
        return -log_u
    if divergence == "js":
        return -0.5 * F.softplus(log_u)
    return -0.5 * torch.sign(log_u)  # tv


def _f(divergence: str, log_u: torch.Tensor) -> torch.Tensor:
    """:math:`f(u)` of each divergence, computed from :math:`\\log u`."""
    if divergence == "rkl":
        return -log_u
    if divergence == "js":
        log1pu = F.softplus(log_u)
        return 0.5 * (log_u.exp() * (math.log(2) + log_u - log1pu) + math.log(2) - log1pu)
    if divergence == "tv":
        return 0.5 * (log_u.exp() - 1).abs()
    return log_u.exp() * log_u  # kl


def _is_sampler(proposal) -> bool:
    return not isinstance(proposal, (str, CausalLM)) and callable(getattr(proposal, "run", None))


class DPG(ELBO):
    r"""Distributional policy gradient loss: forward-KL or f-divergence distribution matching.

    Use as ``loss=`` of :class:`pyro.infer.SVI` with guide
    ``AutoLMGuide(model, policy)``; only the guide LM is trained. See the
    module docstring for the estimators.

    :param int num_particles: ``K >= 2`` samples per prompt per step, drawn in one
        batched decode (with ``proposal="smc"``: SMC's particles per prompt; a sampler
        object uses its own number).
    :param str divergence: ``"kl"`` (forward :math:`\mathrm{KL}(p^*\|q)`, default),
        ``"rkl"`` (:math:`\mathrm{KL}(q\|p^*)`), ``"js"`` (Jensen-Shannon), ``"tv"``
        (total variation) or ``"jeffreys"`` (:math:`\alpha\,\mathrm{KL}(p^*\|q) +
        (1-\alpha)\,\mathrm{KL}(q\|p^*)`).
    :param proposal: ``"guide"`` (on-policy, default), ``"prior"`` (the model's prior
        LM), a fixed :class:`~pyro_lm.CausalLM` (off-policy DPG), ``"smc"``
        (``SMC(model, guide=guide, num_particles=num_particles)`` run at each step, the
        guide proposing), or a sampler object of the same model whose
        ``run(*args, **kwargs)`` returns a :class:`~pyro_lm.infer.WeightedPosterior`
        (an :class:`~pyro_lm.infer.SMC` with its own ``lookahead``, ``twist`` and
        particle count, a :class:`~pyro_lm.infer.QRS`, an
        :class:`~pyro_lm.infer.Importance`); samplers take ``divergence="kl"`` only.
    :param float forward_weight: :math:`\alpha \in [0, 1]`, the weight of the forward KL
        in ``divergence="jeffreys"`` (default 0.5).
    :param float z_decay: ``None`` (default) tracks :math:`\hat Z` by the cumulative mean
        of all weights; a float in ``(0, 1)`` by an exponential moving average
        :math:`\hat Z \leftarrow \gamma \hat Z + (1 - \gamma) \hat Z_\text{batch}`.
    :param int max_plate_nesting: the model's plate depth (default: read from the model and
        guide on the first call, without decoding, and kept, as Pyro's ELBOs do).

    After each call :attr:`metrics` holds floats: ``loss`` (the divergence estimate),
    ``kl_pq`` (:math:`\widehat{\mathrm{KL}}(p^*\|q)`), ``log_Z`` (running
    :math:`\log\hat Z`) and ``log_Z_batch`` (this batch's), both summed over
    prompts, ``ess`` (Kish ESS of the self-normalised weights, mean over prompts),
    ``reward`` (mean total log-factor :math:`\sum_k f_k(x)`, i.e. :math:`r/\beta`,
    of the proposal's samples, mean over prompts) and ``kl_q_prior``
    (:math:`\widehat{\mathrm{KL}}(q\|p_0)`, summed over prompts; NaN with a sampler
    proposal, whose particles are no samples of :math:`q`).

    :meth:`differentiable_loss` returns the estimate as a tensor whose gradient is the
    estimator's, so ``DPG(...)(model, guide)`` is a :class:`torch.nn.Module` (Pyro's
    ``ELBOModule``, e.g. under ``pyro.settings.set(module_local_params=True)``).
    """

    def __init__(self, num_particles: int = 8, divergence: str = "kl", proposal="guide",
                 forward_weight: float = 0.5, z_decay: float | None = None,
                 max_plate_nesting: float = float("inf")):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) \
                or num_particles < 2:
            raise ValueError(f"num_particles: DPG needs an int >= 2 (self-normalised weights "
                             f"of a single particle are all 1), got {num_particles!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
        sampler = _is_sampler(proposal)
        if not (sampler or isinstance(proposal, CausalLM)
                or proposal in ("guide", "prior", "smc")):
            raise ValueError(f"proposal: expected 'guide', 'prior', 'smc', a pyro_lm.CausalLM "
                             f"or a sampler with .run(*args) (e.g. SMC, QRS), got {proposal!r}")
        if (sampler or proposal == "smc") and divergence != "kl":
            raise ValueError(f"divergence: {divergence!r} is an expectation under the guide q, "
                             "and a sampler's particles are no samples of q (their law is not "
                             "tractable); a sampler proposal takes divergence='kl' only, or use "
                             "proposal='guide'")
        if isinstance(forward_weight, bool) or not isinstance(forward_weight, (int, float)) \
                or not 0.0 <= forward_weight <= 1.0:
            raise ValueError(f"forward_weight: expected a number in [0, 1] (the weight of "
                             f"KL(p*||q) in the Jeffreys mix), got {forward_weight!r}")
        if z_decay is not None and not 0 < z_decay < 1:
            raise ValueError(f"z_decay: expected None (cumulative mean) or a float in (0, 1), "
                             f"got {z_decay!r}")
        check_max_plate_nesting(max_plate_nesting)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.divergence = divergence
        self.proposal = proposal
        self.forward_weight = float(forward_weight)
        self.z_decay = z_decay
        self.metrics = {}
        self.reset()

    def reset(self) -> None:
        """Forget the running estimate of :math:`Z` (e.g. when the prompts change)."""
        self._log_z = None  # running log Z-hat, per prompt
        self._batch_log_z = None  # the last batch's
        self._count = 0

    def state_dict(self) -> dict:
        """The running estimate of :math:`Z`: what :func:`~pyro_lm.infer.fit` checkpoints with
        the parameters, so that a resumed run goes on exactly as an uninterrupted one."""
        return {"log_z": self._log_z, "batch_log_z": self._batch_log_z, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        """Take back the running estimate of :math:`Z` that :meth:`state_dict` gave."""
        self._log_z, self._batch_log_z = state["log_z"], state["batch_log_z"]
        self._count = int(state["count"])

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("DPG draws all particles in one batched decode; call "
                                  "loss, loss_and_grads or differentiable_loss")

    def _update_log_z(self, batch_log_z: torch.Tensor, num: int) -> None:
        """Fold one batch's :math:`\\log\\hat Z` (from ``num`` samples) into the running one."""
        batch_log_z = self._batch_log_z = batch_log_z.detach()
        if self._log_z is not None:  # a checkpoint's is read back on the CPU
            self._log_z = self._log_z.to(batch_log_z.device)
        if self._log_z is None or self._log_z.shape != batch_log_z.shape:
            self._log_z, self._count = batch_log_z, num
        elif self.z_decay is None:
            total = self._count + num
            self._log_z = torch.logaddexp(self._log_z + math.log(self._count / total),
                                          batch_log_z + math.log(num / total))
            self._count = total
        else:
            self._log_z = torch.logaddexp(self._log_z + math.log(self.z_decay),
                                          batch_log_z + math.log1p(-self.z_decay))
            self._count += num

    def _proposal(self, model, guide):
        if isinstance(self.proposal, CausalLM):
            return AutoLMGuide(model, self.proposal, latent_guide=guide.latent_guide).propose
        return guide.propose if self.proposal == "guide" else None

    def _sampler(self, model, guide):
        if isinstance(self.proposal, str):  # "smc"
            return SMC(model, guide=guide, num_particles=self.num_particles)
        if getattr(self.proposal, "model", model) is not model:
            raise ValueError("proposal: the sampler targets another model than the one SVI "
                             "trains on; build it on the same model (e.g. SMC(model, "
                             "guide=guide, ...))")
        return self.proposal

    def _draw(self, model, guide, args, kwargs):
        """``(run, log_w, log_pi_lm, ess)``: an execution whose LM sites hold the particles,
        their log-weights, the proposal's log-density of the LM sites (``None`` for a
        sampler) and the ESS; also folds this batch's :math:`\\hat Z` into the running one."""
        if self.proposal == "smc" or _is_sampler(self.proposal):
            post = self._sampler(model, guide).run(*args, **kwargs)
            if not isinstance(post, WeightedPosterior):
                raise TypeError(f"proposal: its run(...) returned {type(post).__name__}, "
                                "expected a pyro_lm.infer.WeightedPosterior")
            if self.max_plate_nesting == float("inf"):
                self.max_plate_nesting = plate_nesting(model, None, args, kwargs)
            run = held_execution(model, post.samples, args, kwargs,
                                 int(self.max_plate_nesting), owner="DPG")
            log_w = post.log_weights
            shape = (post.num_samples,) + tuple(run.batch_shape)
            if log_w.shape != shape:
                try:
                    log_w = log_w.reshape(shape)
                except RuntimeError:
                    raise ValueError(f"proposal: the sampler's log_weights have shape "
                                     f"{tuple(log_w.shape)}, the program's weights "
                                     f"{shape}") from None
            check_log_weights(log_w, "log_weights")
            self._update_log_z(post.log_normalizer().reshape(shape[1:]), post.num_samples)
            return run, log_w, None
        if self.proposal == "prior" and guide.latent_guide is not None:
            raise ValueError("proposal: 'prior' draws every latent site from the prior, but the "
                             "guide has a latent_guide for some; use proposal='guide' or a "
                             "CausalLM (both draw those sites from the latent_guide)")
        proposal = self._proposal(model, guide)
        if self.max_plate_nesting == float("inf"):  # read once, as Pyro's ELBOs do
            self.max_plate_nesting = plate_nesting(model, proposal, args, kwargs)
        run = execute(model, proposal, self.num_particles, args, kwargs,
                      int(self.max_plate_nesting), owner="DPG")
        which = "model" if proposal is None else "guide"
        log_pi = 0.0
        for name in lm_site_names(run.model_trace):
            log_pi = log_pi + run.site_log_prob(name, which, scaled=False)
        log_w = run.log_weights()
        check_log_weights(log_w, "log_weights")
        self._update_log_z(log_normalizer(log_w), self.num_particles)
        return run, log_w, log_pi

    def _estimate(self, model, guide, args, kwargs, grad: bool):
        """``(loss, surrogate)``: the divergence estimate summed over prompts (detached) and a
        scalar whose gradient is the estimator's (``None`` without ``grad``); sets
        :attr:`metrics`."""
        if not isinstance(guide, AutoLMGuide):
            raise TypeError(f"guide: DPG trains an AutoLMGuide(model, lm), got "
                            f"{type(guide).__name__}")
        guide.register_params()  # so SVI sees (and steps) the guide's parameters
        run, log_w, log_pi = self._draw(model, guide, args, kwargs)
        names = lm_site_names(run.model_trace)
        if not names:
            raise ValueError("model: DPG fits the guide's LM to the model's LM sites, and the "
                             "model has no unobserved LM site (observed text is evidence, not a "
                             "site to fit); infer its other latents with Importance or "
                             "SequenceELBO")
        log_q, log_prior = 0.0, 0.0
        with torch.set_grad_enabled(grad):
            for name in names:
                site = run.model_trace.nodes[name]
                fn = site["fn"]
                dist = guide.site_law(name, fn)  # masked where the guide is
                log_q = log_q + run.to_batch(dist.log_prob(site["value"]), name)
                log_prior = log_prior + run.site_log_prob(name, "model", scaled=False)
        log_q_d = log_q.detach()
        sampler = log_pi is None
        if sampler:  # log p~ less the prior of the non-LM latent sites (q draws them so)
            log_p = run.log_joint()
            for name in set(latent_site_names(run.model_trace)) - set(names):
                log_p = log_p - run.site_log_prob(name, "model", scaled=False)
        else:
            log_p = log_w + log_pi  # log p~ less what q and pi share (non-LM proposals)
        log_z = self._log_z
        w_bar = torch.softmax(log_w, 0)
        log_r = log_p - log_q_d  # log p~/q
        finite = torch.where(w_bar > 0, log_r, torch.zeros_like(log_r))
        kl_pq = (w_bar * finite).sum(0) - log_z
        if sampler:
            loss, coef = kl_pq, -w_bar
            kl_q_prior = torch.full_like(kl_pq, math.nan)
        else:
            rho_bar = torch.softmax(log_q_d - log_pi, 0)
            loss, coef = self._divergence(kl_pq, w_bar, rho_bar, log_r - log_z)
            kl_q_prior = (rho_bar * (log_q_d - log_prior)).sum(0)
        surrogate = (coef.detach() * log_q).sum() if grad and log_q.requires_grad else None
        stats = torch.stack([loss.sum(), kl_pq.sum(), log_z.sum(),
                             self._batch_log_z.sum(),
                             ess(log_w).mean(), run.log_factors().mean(),
                             kl_q_prior.sum()]).tolist()  # the step's one host sync
        self.metrics = dict(zip(METRICS, stats, strict=True))
        return loss.sum().detach(), surrogate

    def _divergence(self, kl_pq, w_bar, rho_bar, log_u):
        """``(estimate, coef)`` per prompt of the chosen divergence from guide or fixed
        proposal samples: the gradient is :math:`\\sum_k \\mathrm{coef}_k \\nabla \\log q(x_k)`."""
        kl_coef = -(w_bar - rho_bar)
        if self.divergence == "kl":
            return kl_pq, kl_coef
        divergence = "rkl" if self.divergence == "jeffreys" else self.divergence
        estimate = (rho_bar * _f(divergence, log_u)).sum(0)
        g = _g(divergence, log_u)
        if isinstance(self.proposal, str) and self.proposal == "guide":  # leave-one-out
            coef = (g - g.mean(0, keepdim=True)) / (self.num_particles - 1)
        else:
            coef = rho_bar * (g - (rho_bar * g).sum(0, keepdim=True))
        coef = torch.nan_to_num(coef, nan=0.0, posinf=0.0, neginf=0.0)
        if self.divergence == "jeffreys":
            a = self.forward_weight
            return a * kl_pq + (1 - a) * estimate, a * kl_coef + (1 - a) * coef
        return estimate, coef

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the chosen divergence (no gradient; updates :math:`\\hat Z`)."""
        self._estimate(model, guide, args, kwargs, grad=False)
        return self.metrics["loss"]

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The divergence estimate; accumulates its gradient in the guide's parameters."""
        _, surrogate = self._estimate(model, guide, args, kwargs, grad=True)
        if surrogate is not None:
            surrogate.backward()
        return self.metrics["loss"]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """A scalar tensor whose value is :meth:`loss` and whose gradient is the
        estimator's (for ``ELBOModule`` / ``module_local_params``, or a custom loop)."""
        loss, surrogate = self._estimate(model, guide, args, kwargs, grad=True)
        if surrogate is None:
            return loss
        return loss + (surrogate - surrogate.detach())
