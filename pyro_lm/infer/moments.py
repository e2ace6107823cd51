r"""Moment (distributional) constraints: the maximum-entropy target of GDC.

A *pointwise* reward says which sequences are good; a *distributional*
constraint says what the population of samples should look like, e.g. "half
of the biographies are about women": :math:`E_{p}[\phi(x)] = \mu` for
features :math:`\phi : x \mapsto \mathbb R^k`. No reward-maximisation
objective expresses it. Among all distributions that meet it, the one closest
to the base :math:`a(x)` (the prior LM :math:`p_0`, or a model's unnormalised
target :math:`\tilde p = p_0 \exp(\sum_k f_k)`) in :math:`\mathrm{KL}(\cdot\|a)`
is the exponential family (Csiszár's I-projection; Khalifa et al., 2021)

.. math::

    p_\lambda(x) = a(x) \exp(\lambda \cdot \phi(x)) / Z(\lambda), \qquad
    E_{p_\lambda}[\phi(x)] = \mu .

:math:`\lambda` minimises the convex dual
:math:`L(\lambda) = \log Z(\lambda) - \lambda\cdot\mu`, with gradient
:math:`E_{p_\lambda}[\phi] - \mu` and Hessian :math:`\mathrm{Cov}_{p_\lambda}[\phi]`.
:func:`fit_moments` estimates both by self-normalised importance sampling
from ``N`` samples :math:`x_i \sim \pi` (the prior by default) with weights
:math:`\bar w_i \propto a(x_i)/\pi(x_i)\, \exp(\lambda\cdot\phi(x_i))`, and solves
:math:`\nabla L = 0` by damped Newton steps with a backtracking line search. When
the Kish ESS of the final weights is below ``min_ess``, another ``N`` samples are
drawn, pooled with the first, and the fit is refined, up to ``max_rounds`` times.
With ``B`` prompts one :math:`\lambda` is shared and the constraint holds on
average over the prompts: :math:`\frac1B \sum_b E_{p_{\lambda,b}}[\phi] = \mu`.

The fitted :class:`MomentConstraint` is a reward, ``x -> lambda . phi(x)``: put
it in a model as ``pyro.factor("moments", constraint(x))`` and any algorithm
(:class:`~pyro_lm.infer.Importance`, :class:`~pyro_lm.infer.SMC`,
:class:`~pyro_lm.infer.DPG`, :class:`~pyro_lm.infer.SequenceELBO`, :class:`QRS`,
:class:`IMH`) samples or fine-tunes towards :math:`p_\lambda`.

References

[1] Muhammad Khalifa, Hady Elsahar, Marc Dymetman (2021), "A Distributional
    Approach to Controlled Text Generation", ICLR.
[2] Imre Csiszár (1975), "I-divergence Geometry of Probability Distributions
    and Minimization Problems", Annals of Probability.
[3] Stephen Della Pietra, Vincent Della Pietra, John Lafferty (1997), "Inducing
    Features of Random Fields", IEEE TPAMI.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import pyro
import torch

from pyro_lm._validation import check_positive_int, check_positive_number
from pyro_lm.distributions.lm_distribution import LMDistribution
from pyro_lm.infer.posterior import check_log_weights
from pyro_lm.infer.proposal import as_guide, propose
from pyro_lm.rewards.base import Reward

__all__ = ["MomentConstraint", "MomentFit", "fit_moments"]


class MomentConstraint(Reward):
    r"""The log-factor :math:`\lambda \cdot \phi(x)` of a moment constraint :math:`E[\phi] = \mu`.

    :param features: a callable ``x -> phi(x)`` on completions ``(N, T)``, returning
        ``(N, k)`` or ``(N,)`` (``k = 1``) real or bool values.
    :param target_moments: :math:`\mu`, a float or a sequence/tensor of ``k`` floats.
    :param coefficients: :math:`\lambda` (default zeros; set by :meth:`fit`).
    :param str name: used in error messages.

    Calling it on ``(*batch, T)`` returns :math:`\lambda\cdot\phi(x)`, ``(*batch)``.
    """

    def __init__(self, features, target_moments, coefficients=None, name: str = "moments"):
        super().__init__(name)
        if not callable(features):
            raise TypeError(f"features: expected a callable x -> (N, k), got "
                            f"{type(features).__name__}")
        cpu = torch.device("cpu")
        mu = torch.as_tensor(target_moments, dtype=torch.float64, device=cpu).reshape(-1)
        if mu.numel() == 0 or not torch.isfinite(mu).all():
            raise ValueError(f"target_moments: expected finite floats, got {target_moments!r}")
        self.features = features
        self.target_moments = mu
        if coefficients is None:
            coefficients = torch.zeros_like(mu)
        lam = torch.as_tensor(coefficients, dtype=torch.float64, device=cpu).reshape(-1)
        if lam.shape != mu.shape or not torch.isfinite(lam).all():
            raise ValueError(f"coefficients: expected {mu.numel()} finite floats, got "
                             f"{coefficients!r}")
        self.coefficients = lam

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """The features ``(*batch, k)`` of completions ``(*batch, T)``, checked."""
        flat = x.reshape(-1, x.shape[-1])
        phi = torch.as_tensor(self.features(flat), device=x.device)
        phi = phi.to(torch.float64) if phi.dtype == torch.float64 else phi.float()
        if phi.dim() == 1:
            phi = phi[:, None]
        k = self.target_moments.numel()
        if phi.shape != (flat.shape[0], k):
            raise ValueError(f"features: returned shape {tuple(phi.shape)} for {flat.shape[0]} "
                             f"sequences, expected ({flat.shape[0]}, {k}) to match "
                             f"target_moments of length {k}")
        if not torch.isfinite(phi).all():
            bad = int((~torch.isfinite(phi)).sum())
            raise ValueError(f"features: returned NaN or inf for {bad} values; features must "
                             "be finite reals")
        return phi.reshape(x.shape[:-1] + (k,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.phi(x)
        return phi @ self.coefficients.to(device=phi.device, dtype=phi.dtype)

    def log_factor(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda\cdot\phi(x)`, ``(*batch)`` (the same as calling the constraint)."""
        return self(x)

    def fit(self, prior_or_model, *args, **kwargs) -> MomentFit:
        """Fit :attr:`coefficients` in place; see :func:`fit_moments` for the arguments."""
        result = fit_moments(prior_or_model, self, None, *args, **kwargs)
        self.coefficients = result.coefficients.cpu()
        return result

    def __repr__(self) -> str:
        return (f"MomentConstraint(target_moments={self.target_moments.tolist()}, "
                f"coefficients={self.coefficients.tolist()})")


@dataclass
class MomentFit:
    r"""The result of :func:`fit_moments`.

    :ivar MomentConstraint constraint: the fitted constraint (a reward / log-factor).
    :ivar torch.Tensor coefficients: :math:`\lambda`, ``(k,)`` float64.
    :ivar torch.Tensor moments: the importance-sampling estimate of
        :math:`E_{p_\lambda}[\phi]` (mean over prompts), ``(k,)``.
    :ivar torch.Tensor ess: Kish ESS of the final weights, per prompt.
    :ivar torch.Tensor log_Z: :math:`\log E_\pi[(a/\pi) e^{\lambda\cdot\phi}]`, per prompt.
    :ivar int num_samples: samples used (per prompt).
    :ivar bool converged: whether :math:`\|\nabla L\|_\infty` fell below ``tol``.
    """

    constraint: MomentConstraint
    coefficients: torch.Tensor
    moments: torch.Tensor
    ess: torch.Tensor
    log_Z: torch.Tensor
    num_samples: int
    converged: bool


def _as_model(dist: LMDistribution):
    """A model with one LM site ``"x"`` drawn from ``dist``, one plate per batch dim."""
    def model():
        with contextlib.ExitStack() as stack:
            for i, size in enumerate(dist.batch_shape):
                dim = i - len(dist.batch_shape)
                stack.enter_context(pyro.plate(f"_moments_batch{-dim}", size, dim=dim))
            pyro.sample("x", dist)
    return model


def _draw(prior_or_model, constraint, proposal, num, args, kwargs):
    """``N`` samples: flattened log base weights ``(N, B)`` and features ``(N, B, k)``."""
    if isinstance(prior_or_model, LMDistribution):
        model, args, kwargs = _as_model(prior_or_model), (), {}
    elif callable(prior_or_model):
        model = prior_or_model
    else:
        raise TypeError(f"prior_or_model: expected an LMDistribution or a Pyro model, got "
                        f"{type(prior_or_model).__name__}")
    guide = as_guide(model, proposal, owner="fit_moments")
    prop = propose(model, guide, num, args, kwargs, owner="fit_moments")
    if len(prop.lms) != 1 or len(prop.values) != 1:
        raise ValueError(f"prior_or_model: moment constraints are features of one LM site's "
                         f"completions, the model has latent sites {sorted(prop.values)}; "
                         "condition the others (pyro.condition)")
    x = next(iter(prop.values.values()))
    if prop.log_weights.shape[1:].numel() != x.shape[1:-1].numel():
        raise ValueError("prior_or_model: a factor couples the model's prompts (it lies "
                         "outside their plate), so their samples share one weight; moment "
                         "constraints fit per-prompt tilts: compute it inside the plate")
    phi = constraint.phi(x).to(torch.float64).reshape(num, -1, constraint.target_moments.numel())
    return prop.log_weights.to(torch.float64).reshape(num, -1), phi


def _dual(lam, log_a, phi, mu):
    r"""``L(lambda)``, its gradient and Hessian from samples (all float64)."""
    logits = log_a + phi @ lam  # (N, B)
    log_norm = torch.logsumexp(logits, 0)  # (B,)
    w = (logits - log_norm).exp()  # (N, B)
    mean = torch.einsum("nb,nbk->bk", w, phi)  # (B, k)
    centred = phi - mean
    cov = torch.einsum("nb,nbj,nbk->bjk", w, centred, centred)
    value = log_norm.mean() - lam @ mu
    return value, mean.mean(0) - mu, cov.mean(0), w, log_norm


def _newton(lam, log_a, phi, mu, tol: float, max_iter: int):
    value, grad, hess, w, log_norm = _dual(lam, log_a, phi, mu)
    eye = torch.eye(lam.numel(), dtype=lam.dtype, device=lam.device)
    for _ in range(max_iter):
        if float(grad.abs().max()) < tol:
            return lam, True
        step = torch.linalg.solve(hess + 1e-9 * eye, -grad)
        t = 1.0
        while t > 1e-8:  # backtracking (Armijo) line search
            new = lam + t * step
            new_value = _dual(new, log_a, phi, mu)[0]
            if float(new_value) <= float(value) + 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        lam = new
        value, grad, hess, w, log_norm = _dual(lam, log_a, phi, mu)
    return lam, float(grad.abs().max()) < tol


def fit_moments(prior_or_model, features, target_moments, *args, proposal=None,
                num_samples: int = 4096, min_ess: float = 1000.0, max_rounds: int = 4,
                tol: float = 1e-6, max_iter: int = 100, **kwargs) -> MomentFit:
    r"""Fit :math:`\lambda` so that :math:`a(x) e^{\lambda\cdot\phi(x)}` has moments :math:`\mu`.

    :param prior_or_model: an :class:`~pyro_lm.LMDistribution` (the base is the prior
        :math:`p_0`), or a Pyro model with one LM site (the base is its unnormalised
        target :math:`\tilde p`, factors included); ``*args, **kwargs`` go to the model.
    :param features: a callable ``x -> (N, k)``, or a :class:`MomentConstraint` (then
        ``target_moments`` must be ``None``).
    :param target_moments: :math:`\mu`, ``k`` floats strictly inside the range of
        :math:`\phi` on the samples.
    :param proposal: where samples come from: ``None`` (the prior), an
        :class:`~pyro_lm.infer.AutoLMGuide` or a :class:`~pyro_lm.CausalLM`.
    :param int num_samples: samples per prompt per round (one batched decode).
    :param float min_ess: draw more rounds while the Kish ESS of any prompt is below it.
    :param int max_rounds: at most this many rounds of ``num_samples``.
    :param float tol: stop Newton when :math:`\|E_\lambda[\phi] - \mu\|_\infty < ` ``tol``
        (on the samples).
    :param int max_iter: Newton iterations per round.
    :returns: a :class:`MomentFit`.
    :raises ValueError: for NaN features, a ``target_moments`` outside the observed
        range of the features, or all-zero weights.
    """
    if isinstance(features, MomentConstraint):
        if target_moments is not None:
            raise ValueError("target_moments: already set by the MomentConstraint; pass None")
        constraint = features
    else:
        constraint = MomentConstraint(features, target_moments)
    for name, value in (("num_samples", num_samples), ("max_rounds", max_rounds),
                        ("max_iter", max_iter)):
        check_positive_int(value, name)
    tol = check_positive_number(tol, "tol")
    min_ess = check_positive_number(min_ess, "min_ess", allow_zero=True)
    with torch.no_grad():
        log_a, phi = _draw(prior_or_model, constraint, proposal, num_samples, args, kwargs)
        mu = constraint.target_moments.to(phi.device)
        lam = constraint.coefficients.to(phi.device)
        for rnd in range(max_rounds):
            check_log_weights(log_a, "log_weights")
            live = torch.isfinite(log_a)[..., None].expand_as(phi)
            lo = torch.where(live, phi, torch.full_like(phi, math.inf)).amin((0, 1))
            hi = torch.where(live, phi, torch.full_like(phi, -math.inf)).amax((0, 1))
            outside = (mu <= lo) | (mu >= hi)
            if outside.any():
                j = int(outside.nonzero()[0])
                raise ValueError(
                    f"target_moments[{j}] = {float(mu[j]):g} is not strictly inside the range "
                    f"[{float(lo[j]):g}, {float(hi[j]):g}] of features[{j}] on "
                    f"{log_a.shape[0]} samples; no tilt exp(lambda . phi) of the base can reach "
                    "it. Pick a reachable target, or draw more samples (num_samples) if the "
                    "target is rare")
            lam, converged = _newton(lam, log_a, phi, mu, tol, max_iter)
            _, grad, _, w, log_norm = _dual(lam, log_a, phi, mu)
            ess = 1.0 / (w**2).sum(0)
            if float(ess.min()) >= min_ess or rnd + 1 == max_rounds:
                break
            more_a, more_phi = _draw(prior_or_model, constraint, proposal, num_samples, args,
                                     kwargs)
            log_a, phi = torch.cat([log_a, more_a]), torch.cat([phi, more_phi])
    if not converged:
        warnings.warn(f"fit_moments: Newton did not reach tol={tol} in max_iter={max_iter} "
                      f"iterations (max |E[phi] - mu| = {float(grad.abs().max()):.3g}); the "
                      "target may lie on the edge of what the samples can express",
                      RuntimeWarning, stacklevel=2)
    num = log_a.shape[0]
    fitted = MomentConstraint(constraint.features, constraint.target_moments, lam.cpu(),
                              constraint.name)
    return MomentFit(fitted, lam, grad + mu, ess, log_norm - math.log(num), num, converged)
