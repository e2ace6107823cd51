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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.infer import ELBO

from pyro_lm.distributions.lm_distribution import unwrap_lm
from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.program import execute, lm_site_names, plate_nesting
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.ops.stats import check_log_weights, log_normalizer

__all__ = ["DPG", "DIVERGENCES"]

#: Divergences :class:`DPG` minimises, see the module docstring.
DIVERGENCES = ("kl", "rkl", "js", "tv")

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


class DPG(ELBO):
    r"""Distributional policy gradient loss: forward-KL or f-divergence distribution matching.

    Use as ``loss=`` of :class:`pyro.infer.SVI` with guide
    ``AutoLMGuide(model, policy)``; only the guide LM is trained. See the
    module docstring for the estimators.

    :param int num_particles: ``K >= 2`` samples per prompt per step, drawn in one
        batched decode.
    :param str divergence: ``"kl"`` (forward :math:`\mathrm{KL}(p^*\|q)`, default),
        ``"rkl"`` (:math:`\mathrm{KL}(q\|p^*)`), ``"js"`` (Jensen-Shannon) or ``"tv"``
        (total variation).
    :param proposal: ``"guide"`` (on-policy, default), ``"prior"`` (the model's prior
        LM), or a fixed :class:`~pyro_lm.CausalLM` (off-policy DPG).
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
    (:math:`\widehat{\mathrm{KL}}(q\|p_0)`, summed over prompts).
    """

    def __init__(self, num_particles: int = 8, divergence: str = "kl", proposal="guide",
                 z_decay: float | None = None, max_plate_nesting: float = float("inf")):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) \
                or num_particles < 2:
            raise ValueError(f"num_particles: DPG needs an int >= 2 (self-normalised weights "
                             f"of a single particle are all 1), got {num_particles!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
        if not (isinstance(proposal, CausalLM) or proposal in ("guide", "prior")):
            raise ValueError(f"proposal: expected 'guide', 'prior' or a pyro_lm.CausalLM, got "
                             f"{proposal!r}")
        if z_decay is not None and not 0 < z_decay < 1:
            raise ValueError(f"z_decay: expected None (cumulative mean) or a float in (0, 1), "
                             f"got {z_decay!r}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.divergence = divergence
        self.proposal = proposal
        self.z_decay = z_decay
        self.metrics = {}
        self.reset()

    def reset(self) -> None:
        """Forget the running estimate of :math:`Z` (e.g. when the prompts change)."""
        self._log_z = None  # running log Z-hat, per prompt
        self._count = 0

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("DPG draws all particles in one batched decode; call "
                                  "loss or loss_and_grads")

    def _update_log_z(self, log_w: torch.Tensor) -> torch.Tensor:
        num = log_w.shape[0]
        batch_log_z = log_normalizer(log_w)
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
        return batch_log_z

    def _proposal(self, model, guide):
        if isinstance(self.proposal, CausalLM):
            return AutoLMGuide(model, self.proposal, latent_guide=guide.latent_guide).propose
        return guide.propose if self.proposal == "guide" else None

    def _loss(self, model, guide, args, kwargs, backward: bool) -> float:
        if not isinstance(guide, AutoLMGuide):
            raise TypeError(f"guide: DPG trains an AutoLMGuide(model, lm), got "
                            f"{type(guide).__name__}")
        if self.proposal == "prior" and guide.latent_guide is not None:
            raise ValueError("proposal: 'prior' draws every latent site from the prior, but the "
                             "guide has a latent_guide for some; use proposal='guide' or a "
                             "CausalLM (both draw those sites from the latent_guide)")
        guide.register_params()  # so SVI sees (and steps) the guide's parameters
        proposal, num = self._proposal(model, guide), self.num_particles
        if self.max_plate_nesting == float("inf"):  # read once, as Pyro's ELBOs do
            self.max_plate_nesting = plate_nesting(model, proposal, args, kwargs)
        run = execute(model, proposal, num, args, kwargs, int(self.max_plate_nesting),
                      owner="DPG")
        which = "model" if proposal is None else "guide"
        log_q, log_pi, log_prior = 0.0, 0.0, 0.0
        with torch.set_grad_enabled(backward):
            for name in lm_site_names(run.model_trace):
                site = run.model_trace.nodes[name]
                fn = site["fn"]
                dist = unwrap_lm(fn).with_lm(guide.lm).expand(fn.batch_shape)
                log_q = log_q + run.to_batch(dist.log_prob(site["value"]), name)
                log_pi = log_pi + run.site_log_prob(name, which, scaled=False)
                log_prior = log_prior + run.site_log_prob(name, "model", scaled=False)
        if not isinstance(log_q, torch.Tensor):
            raise ValueError("model: DPG fits the guide's LM to the model's LM sites, and the "
                             "model has no unobserved LM site (observed text is evidence, not a "
                             "site to fit); infer its other latents with Importance or "
                             "SequenceELBO")
        log_q_d = log_q.detach()
        log_w = run.log_weights()
        log_p = log_w + log_pi  # log p~ less what q and pi share (non-LM proposals)
        check_log_weights(log_w, "log_weights")
        batch_log_z = self._update_log_z(log_w)
        log_z = self._log_z
        w_bar = torch.softmax(log_w, 0)
        rho_bar = torch.softmax(log_q_d - log_pi, 0)
        log_r = log_p - log_q_d  # log p~/q
        finite = torch.where(w_bar > 0, log_r, torch.zeros_like(log_r))
        kl_pq = (w_bar * finite).sum(0) - log_z
        log_u = log_r - log_z
        if self.divergence == "kl":
            loss = kl_pq
            coef = -(w_bar - rho_bar)
        else:
            loss = (rho_bar * _f(self.divergence, log_u)).sum(0)
            g = _g(self.divergence, log_u)
            if isinstance(self.proposal, str) and self.proposal == "guide":  # leave-one-out
                coef = (g - g.mean(0, keepdim=True)) / (num - 1)
            else:
                coef = rho_bar * (g - (rho_bar * g).sum(0, keepdim=True))
            coef = torch.nan_to_num(coef, nan=0.0, posinf=0.0, neginf=0.0)
        if backward and log_q.requires_grad:
            (coef.detach() * log_q).sum().backward()
        ess = 1.0 / (w_bar**2).sum(0)
        kl_q_prior = (rho_bar * (log_q_d - log_prior)).sum(0)
        stats = torch.stack([loss.sum(), kl_pq.sum(), log_z.sum(), batch_log_z.sum(),
                             ess.mean(), run.log_factors().mean(),
                             kl_q_prior.sum()]).tolist()
        self.metrics = dict(zip(("loss", "kl_pq", "log_Z", "log_Z_batch", "ess", "reward",
                                 "kl_q_prior"), stats, strict=True))
        return self.metrics["loss"]

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the chosen divergence (no gradient; updates :math:`\\hat Z`)."""
        return self._loss(model, guide, args, kwargs, backward=False)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The divergence estimate; accumulates its gradient in the guide's parameters."""
        return self._loss(model, guide, args, kwargs, backward=True)
