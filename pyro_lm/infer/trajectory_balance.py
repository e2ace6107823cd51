r"""Trajectory balance: fit a guide and :math:`\log Z` by a squared log-ratio, on or off policy.

For a completion :math:`x` (a trajectory of tokens ending in EOS or at :math:`T`) the
guide :math:`q_\theta(x) = \prod_t q_\theta(x_t \mid x_{<t})` is a GFlowNet's forward
policy on the tree of prefixes (every prefix has one parent, so the backward policy is
1), and the *trajectory balance* condition [1] with a learned :math:`\log Z_\phi` is

.. math::

    \log Z_\phi + \log q_\theta(x) = \log \tilde p(x), \qquad
    \tilde p(x) = p_0(x) \exp\Big(\sum_k f_k(x)\Big),

for every :math:`x`, which holds exactly when :math:`q_\theta = p^*` and
:math:`Z_\phi = Z`. The loss is the mean squared residual over samples :math:`x_k`
from *any* distribution :math:`\mu` that covers the target (summed over prompts),

.. math::

    L(\theta, \phi) = \frac1K \sum_{k=1}^K \delta_k^2, \qquad
    \delta_k = \log Z_\phi + \log q_\theta(x_k) - \log \tilde p(x_k),

with :math:`x_k` held fixed (no gradient through the sampling), so the samples may come
from the guide (*on-policy*), from a replay buffer filled by SMC, QRS or a dataset
(*off-policy*), or both: :math:`E_\mu[\delta^2]` is zero, its minimum, only at
:math:`q_\theta = p^*, Z_\phi = Z` whatever :math:`\mu` is [1, 2]. On-policy its expected
gradient in :math:`\theta` is :math:`2\nabla_\theta \mathrm{KL}(q_\theta \| p^*)` (since
:math:`E_q[c\, \nabla \log q] = 0`, :math:`\log Z_\phi` acts as a learned baseline [3]),
and in :math:`\phi` it drives :math:`\log Z_\phi` to :math:`E_\mu[\log \tilde p - \log q]`,
which is :math:`\log Z` once :math:`q = p^*` (on-policy it is the ELBO, a lower bound,
before). Pyro's per-parameter optimiser options give :math:`\log Z_\phi` its own,
usually larger, learning rate, e.g.
``pyro.optim.Adam(lambda name, _: {"lr": 0.1 if name == "tb_log_Z" else 1e-4})``.

Sub-trajectory balance is :class:`~pyro_lm.infer.SubTrajectoryBalance`: the flow of a
prefix is not its potential (the factors evaluated on the prefix, as SMC sees them), which
would fit the guide to another target, but what the prefix earns by stopping there,
:math:`F(s) = \tilde p(s\top) / q(\top \mid s)` [2], so no learned flow is needed.

References

[1] N. Malkin, M. Jain, E. Bengio, C. Sun, Y. Bengio, *Trajectory balance: Improved
    credit assignment in GFlowNets*, NeurIPS 2022.
[2] E. J. Hu, M. Jain, E. Elmoznino, Y. Kaddar, G. Lajoie, Y. Bengio, N. Malkin,
    *Amortizing intractable inference in large language models*, ICLR 2024.
[3] N. Malkin, S. Lahlou, T. Deleu, X. Ji, E. Hu, K. Everett, D. Zhang, Y. Bengio,
    *GFlowNets and variational inference*, ICLR 2023.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.infer import ELBO
from torch import nn

from pyro_lm._validation import as_real_tensor, check_max_plate_nesting
from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.program import execute, latent_site_names, lm_site_names, plate_nesting
from pyro_lm.infer.replay import ReplayBuffer, held_execution
from pyro_lm.ops.stats import ess, log_normalizer

__all__ = ["TrajectoryBalance", "LogPartition"]

#: Names of the floats in :attr:`TrajectoryBalance.metrics`, in the order computed.
METRICS = ("loss", "log_Z", "log_Z_batch", "elbo", "ess", "reward", "kl_q_prior", "residual")


class LogPartition(nn.Module):
    r"""A learned :math:`\log Z` per prompt as a module: ``forward(*args, **kwargs)`` returns
    the parameter (``batch_shape``), whatever the model's arguments.

    Pass it as ``TrajectoryBalance(log_z=LogPartition(shape))`` to train it with the guide
    as one :class:`torch.nn.Module` (``TrajectoryBalance(...)(model, guide)`` under
    ``pyro.settings.set(module_local_params=True)``: add its parameters to the optimiser).

    :param batch_shape: the weights' batch shape (e.g. ``(num_prompts,)``).
    :param float init: the initial value.
    """

    def __init__(self, batch_shape=(), init: float = 0.0, device=None):
        super().__init__()
        self.log_z = nn.Parameter(torch.full(tuple(torch.Size(batch_shape)), float(init),
                                             device=device))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.log_z


class TrajectoryBalance(ELBO):
    r"""The trajectory-balance loss with a learned :math:`\log Z` per prompt; a ``loss=`` of
    :class:`pyro.infer.SVI` with guide ``AutoLMGuide(model, policy)`` (see the module
    docstring). Only the guide LM and :math:`\log Z_\phi` are trained.

    :param int num_particles: on-policy samples per prompt per step, drawn from the guide in
        one batched decode (0: off-policy only, from ``replay``).
    :param ReplayBuffer replay: off-policy samples for the same prompts, or ``None``.
    :param int replay_particles: samples drawn from ``replay`` per step (default
        ``num_particles``, or 8 if that is 0).
    :param log_z: ``None`` (default): a Pyro param ``param_name`` of the weights' batch
        shape (one per prompt); or a callable ``log_z(*args, **kwargs)`` giving it (e.g. a
        :class:`LogPartition`, or a network over prompt features); an
        :class:`torch.nn.Module` is registered with ``pyro.module`` under ``param_name``.
    :param init_log_z: the Pyro param's initial value: ``None`` (default) the first batch's
        importance estimate :math:`\log \frac1K \sum_k \tilde p(x_k)/q(x_k)` (on-policy,
        else 0), or a float.
    :param str param_name: the name of :math:`\log Z_\phi` in Pyro's param store.
    :param int max_plate_nesting: the model's plate depth (default: read on the first call).

    After each call :attr:`metrics` holds floats: ``loss``; ``log_Z`` (the learned
    :math:`\log Z_\phi`, summed over prompts); ``log_Z_batch`` (the importance estimate of
    :math:`\log Z` from the on-policy samples, summed; NaN off-policy only); ``elbo`` (their
    mean :math:`\log\tilde p - \log q`, summed; NaN off-policy only); ``ess`` (their
    Kish ESS, mean over prompts); ``reward`` (mean total log-factor of all samples);
    ``kl_q_prior`` (:math:`\widehat{\mathrm{KL}}(q\|p_0)` on-policy, summed; NaN without
    on-policy samples) and ``residual`` (the root mean squared :math:`\delta`).

    :raises ValueError: at a step where a sample has :math:`\tilde p(x) = 0` (a ``-inf``
        factor: the balance cannot hold there; use a finite penalty, or DPG / SMC).
    """

    def __init__(self, num_particles: int = 8, replay: ReplayBuffer | None = None,
                 replay_particles: int | None = None, log_z=None, init_log_z=None,
                 param_name: str = "tb_log_Z", max_plate_nesting: float = float("inf")):
        check_max_plate_nesting(max_plate_nesting)
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) \
                or num_particles < 0 or (num_particles == 0 and replay is None):
            raise ValueError(f"num_particles: expected an int >= 1 (or 0 with a replay buffer: "
                             f"off-policy only), got {num_particles!r}")
        if replay is not None and not isinstance(replay, ReplayBuffer):
            raise TypeError(f"replay: expected None or a pyro_lm.infer.ReplayBuffer, got "
                            f"{type(replay).__name__}")
        if replay_particles is not None and replay is None:
            raise ValueError("replay_particles: samples drawn from a replay buffer per step, "
                             "but there is no replay=; pass replay=ReplayBuffer(...) or drop "
                             "replay_particles")
        if replay_particles is None:
            replay_particles = num_particles or 8
        if isinstance(replay_particles, bool) or not isinstance(replay_particles, int) \
                or replay_particles < 1:
            raise ValueError(f"replay_particles: expected a positive int, got "
                             f"{replay_particles!r}")
        if log_z is not None and not callable(log_z):
            raise TypeError(f"log_z: expected None (a Pyro param) or a callable "
                            f"log_z(*args, **kwargs), got {type(log_z).__name__}")
        if init_log_z is not None and not (isinstance(init_log_z, (int, float))
                                           and math.isfinite(init_log_z)):
            raise ValueError(f"init_log_z: expected None (the first batch's estimate) or a "
                             f"finite float, got {init_log_z!r}")
        super().__init__(num_particles=max(num_particles, 1),
                         max_plate_nesting=max_plate_nesting)
        self.num_particles = num_particles
        self.replay = replay
        self.replay_particles = replay_particles
        self.log_z = log_z
        self.init_log_z = init_log_z
        self.param_name = param_name
        self.metrics: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("TrajectoryBalance draws all particles in one batched "
                                  "decode; call loss, loss_and_grads or differentiable_loss")

    # ------------------------------------------------------------------ estimator
    def _residual_terms(self, run, guide, held: bool, grad: bool):
        """``(log_q, log_p, log_w)`` of one execution, each ``(N, *batch)``: the guide LM's
        log-density (with gradient if ``grad``), :math:`\\log\\tilde p` less the prior of
        the non-LM latent sites (the guide draws them so), and the importance log-weights
        (``None`` for held samples)."""
        names = lm_site_names(run.model_trace)
        if not names:
            raise ValueError("model: TrajectoryBalance fits the guide's LM to the model's LM "
                             "sites, and the model has no unobserved LM site")
        log_q, log_pi = 0.0, 0.0
        with torch.set_grad_enabled(grad):
            for name in names:
                fn = run.model_trace.nodes[name]["fn"]
                dist = guide.site_law(name, fn)  # masked where the guide is
                log_q = log_q + run.to_batch(dist.log_prob(run.model_trace.nodes[name]["value"]),
                                             name)
                if not held:
                    log_pi = log_pi + run.site_log_prob(name, "guide", scaled=False)
        if held:
            log_p = run.log_joint()
            for name in set(latent_site_names(run.model_trace)) - set(names):
                log_p = log_p - run.site_log_prob(name, "model", scaled=False)
            return log_q, log_p, None
        log_w = run.log_weights()
        return log_q, log_w + log_pi, log_w

    def _log_z(self, batch_shape, init, args, kwargs) -> torch.Tensor:
        if self.log_z is None:
            if self.param_name not in pyro.get_param_store():
                value = init if self.init_log_z is None else torch.full_like(init,
                                                                             self.init_log_z)
                pyro.param(self.param_name, value.detach().clone())
            log_z = pyro.param(self.param_name)
            if log_z.shape != batch_shape:  # broadcasting would share one log Z among prompts
                raise ValueError(f"log_z: has shape {tuple(log_z.shape)}, the weights' batch "
                                 f"shape is {tuple(batch_shape)} (one log Z per prompt); a Pyro "
                                 f"param {self.param_name!r} of another batch of prompts is in "
                                 "the param store: pass another param_name per batch, or a "
                                 "callable log_z")
        else:
            if isinstance(self.log_z, nn.Module):
                pyro.module(self.param_name, self.log_z)
            log_z = as_real_tensor(self.log_z(*args, **kwargs), init.device, "log_z",
                                   "a real tensor of one log Z per prompt")
            if torch.isnan(log_z).any():
                raise ValueError("log_z: returned NaN; it must give a finite log Z per prompt")
        try:
            return torch.broadcast_to(log_z, batch_shape)
        except RuntimeError:
            raise ValueError(f"log_z: returned shape {tuple(log_z.shape)}, the weights' batch "
                             f"shape is {tuple(batch_shape)}: give one log Z per prompt (or "
                             "one for all)") from None

    def _estimate(self, model, guide, args, kwargs, grad: bool) -> torch.Tensor:
        if not isinstance(guide, AutoLMGuide):
            raise TypeError(f"guide: TrajectoryBalance trains an AutoLMGuide(model, lm), got "
                            f"{type(guide).__name__}")
        if self.replay is not None and guide.latent_guide is not None:
            raise ValueError("replay: off-policy samples are scored with the non-LM latent "
                             "sites drawn from the prior, but the guide has a latent_guide; "
                             "pass replay=None")
        guide.register_params()
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = plate_nesting(model, guide.propose, args, kwargs)
        nesting = int(self.max_plate_nesting)
        parts, log_w = [], None
        if self.num_particles:
            run = execute(model, guide.propose, self.num_particles, args, kwargs, nesting,
                          owner="TrajectoryBalance")
            log_q, log_p, log_w = self._residual_terms(run, guide, held=False, grad=grad)
            parts.append((log_q, log_p, run.log_factors()))
            batch = run.batch_shape
        if self.replay is not None:
            run = held_execution(model, self.replay.sample(self.replay_particles), args,
                                 kwargs, nesting, owner="TrajectoryBalance")
            log_q, log_p, _ = self._residual_terms(run, guide, held=True, grad=grad)
            parts.append((log_q, log_p, run.log_factors()))
            batch = run.batch_shape
        log_q = torch.cat([p[0] for p in parts])
        log_p = torch.cat([p[1] for p in parts])
        if torch.isneginf(log_p).any() or torch.isnan(log_p).any():
            raise ValueError("TrajectoryBalance: a sample has log p~(x) = -inf or NaN (a -inf "
                             "factor, e.g. a hard constraint): the balance log Z + log q(x) = "
                             "log p~(x) cannot hold there. Replace the -inf factor by a finite "
                             "penalty, or use DPG or SMC, which handle hard constraints")
        init = log_normalizer(log_w) if log_w is not None else torch.zeros(
            batch, device=log_p.device)
        log_z = self._log_z(batch, init, args, kwargs)
        delta = log_z + log_q - log_p
        loss = (delta**2).mean(0).sum()
        nan = torch.full((), math.nan, device=log_p.device)
        if log_w is not None:
            n = self.num_particles
            log_z_batch, kish = log_normalizer(log_w).sum(), ess(log_w).mean()
            elbo = (log_p[:n] - log_q[:n].detach()).mean(0).sum()
            kl = (log_q[:n].detach() - (log_p[:n] - parts[0][2])).mean(0).sum()
        else:
            log_z_batch, elbo, kish, kl = nan, nan, nan, nan
        stats = torch.stack([loss.detach(), log_z.detach().sum(), log_z_batch, elbo, kish,
                             torch.cat([p[2] for p in parts]).mean(), kl,
                             delta.detach().pow(2).mean().sqrt()]).tolist()  # one host sync
        self.metrics = dict(zip(METRICS, stats, strict=True))
        return loss

    # ------------------------------------------------------------------ ELBO API
    def loss(self, model, guide, *args, **kwargs) -> float:
        """The trajectory-balance loss on fresh samples (no gradient)."""
        with torch.no_grad():
            self._estimate(model, guide, args, kwargs, grad=False)
        return self.metrics["loss"]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss as a tensor with its gradient in the guide LM and :math:`\\log Z_\\phi`."""
        return self._estimate(model, guide, args, kwargs, grad=True)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss; accumulates its gradient in the guide LM and :math:`\\log Z_\\phi`."""
        loss = self._estimate(model, guide, args, kwargs, grad=True)
        if loss.requires_grad:
            loss.backward()
        return self.metrics["loss"]
