r"""Sub-trajectory balance: every prefix of a completion balanced against every other.

A completion :math:`x` with :math:`\tau = \tau(x)` tokens (its first EOS at
:math:`\tau`, or :math:`\tau = T`) is a trajectory :math:`s_0 \to s_1 \to \dots \to
s_{\tau-1} \to x` on the tree of prefixes, :math:`s_k = x_{\le k}`, drawn by the guide
:math:`q(x_k \mid s_{k-1})`. Every prefix :math:`s` shorter than :math:`T` can also
*stop* there, ending in EOS (:math:`s\top`, any EOS id in the set :math:`E`), so for a
language model the state flow needs no learned head [2]: at the optimum, where
:math:`q = p^*`, the flow through :math:`s` and out of it by stopping balance,
:math:`F(s)\, q(\top \mid s) = \tilde p(s\top)`, with
:math:`\tilde p(x) = p_0(x) \exp f(x)` (:math:`f` the model's summed factors) and
:math:`\tilde p(s\top) = \sum_{e \in E} \tilde p(s\, e)`. Hence

.. math::

    \log F(s_k) = \log \tilde p(s_k\top) - \log q(\top \mid s_k), \quad 0 < k < \tau,
    \qquad \log F(s_0) = \log Z_\phi, \qquad \log F(x) = \log \tilde p(x),

the root's flow the learned :math:`\log Z_\phi` of
:class:`~pyro_lm.infer.TrajectoryBalance` and the last state's the completion's own
unnormalised target. With :math:`a_k = \log F(s_k) - \log q(s_k)` (:math:`s_\tau := x`),
which for :math:`0 < k < \tau` is the importance log-weight
:math:`\log \tilde p(s_k\top) - \log q(s_k\top)` of the completion that stops at
:math:`s_k`, the sub-trajectory balance residual of :math:`0 \le i < j \le \tau` is

.. math::

    \delta_{ij} = \log F(s_i) + \sum_{i < k \le j} \log q(x_k \mid s_{k-1}) - \log F(s_j)
                = a_i - a_j,

and the loss of one trajectory is the SubTB(:math:`\lambda`) average of Madan et al. [1],

.. math::

    L(x) = \frac{\sum_{0 \le i < j \le \tau} \lambda^{j-i}\, m_{ij}\, \delta_{ij}^2}
                {\sum_{0 \le i < j \le \tau} \lambda^{j-i}\, m_{ij}},

where :math:`m_{ij} = 0` drops the pairs with a prefix that cannot stop
(:math:`\tilde p(s\top) = 0`: :math:`p_0(\top \mid s) = 0` or a ``-inf`` factor on
:math:`s\top`, e.g. a minimum length; or :math:`q(\top \mid s) = 0`), and 1 otherwise.
The pair :math:`(0, \tau)` is trajectory balance's residual, so :math:`L` is zero for
every :math:`x` exactly when :math:`q = p^*` and :math:`Z_\phi = Z`: each residual is
zero there, and, conversely, the pairs :math:`(0, j)` pin every completion's log-weight
to :math:`\log Z_\phi`. As for trajectory balance the samples are held fixed, so they may
come from the guide, from a :class:`~pyro_lm.infer.ReplayBuffer` (SMC, QRS, a dataset),
or both. :math:`\lambda \to 0` weighs the one-step (detailed-balance) pairs,
:math:`\lambda \to \infty` the whole trajectory (trajectory balance).

Each step evaluates, besides the decode: one forward pass of the guide (with gradient)
and one of the prior over the completions, from which the token log-probabilities and
the EOS log-probabilities at every prefix are both read (the EOS columns only, no
``(N, T, V)`` log-softmax is kept), and the model's factors on the completions and on
every stopped prefix :math:`s_k e`, in one batched run of the program with its LM site
held (:class:`~pyro_lm.poutine.LogFactorsMessenger`): :math:`N (1 + |E| (T - 1))` rows.

References

[1] K. Madan, J. Rector-Brooks, M. Korablyov, E. Bengio, M. Jain, A. Nica, T. Bosc,
    Y. Bengio, N. Malkin, *Learning GFlowNets from partial episodes for improved
    convergence and stability*, ICML 2023.
[2] E. J. Hu, M. Jain, E. Elmoznino, Y. Kaddar, G. Lajoie, Y. Bengio, N. Malkin,
    *Amortizing intractable inference in large language models*, ICLR 2024.
[3] N. Malkin, M. Jain, E. Bengio, C. Sun, Y. Bengio, *Trajectory balance: Improved
    credit assignment in GFlowNets*, NeurIPS 2022.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint

from pyro_lm.distributions.lm_distribution import LOG_PROB_BUDGET, after_first_eos, prompt_cache
from pyro_lm.distributions.prefix import is_eos
from pyro_lm.infer.autoguide import AutoLMGuide
from pyro_lm.infer.program import execute, plate_nesting, single_lm_site
from pyro_lm.infer.trajectory_balance import METRICS, TrajectoryBalance
from pyro_lm.ops.stats import ess, log_normalizer
from pyro_lm.poutine import LogFactorsMessenger

__all__ = ["SubTrajectoryBalance"]

_OWNER = "SubTrajectoryBalance"


class SubTrajectoryBalance(TrajectoryBalance):
    r"""The sub-trajectory-balance loss SubTB(:math:`\lambda`) with a learned
    :math:`\log Z` per prompt; a ``loss=`` of :class:`pyro.infer.SVI` with guide
    ``AutoLMGuide(model, policy)`` (see the module docstring). Only the guide LM and
    :math:`\log Z_\phi` are trained.

    The parameters are those of :class:`~pyro_lm.infer.TrajectoryBalance`, and:

    :param float lamda: :math:`\lambda > 0`, the weight :math:`\lambda^{j-i}` of a
        sub-trajectory of :math:`j - i` tokens (the spelling of torchgfn's SubTB).

    :attr:`metrics` holds TB's floats (``residual`` the root weighted mean squared
    :math:`\delta_{ij}`, averaged over trajectories) and ``masked``, the fraction of
    pairs dropped because a prefix cannot stop.

    Scope: the model's only latent site is one plain, unscaled
    :class:`~pyro_lm.LMDistribution` site (in any plates, factors inside its plates), and
    the guide draws it from its LM without constraints. With several EOS ids the factors
    are evaluated on each stopped prefix :math:`s\,e`.

    :raises ValueError: for other programs (naming what to change), for a guide with
        ``constraints`` (its stopping probabilities are not its LM's), and at a step where
        a completion has :math:`\tilde p(x) = 0` (its balance cannot hold).
    """

    def __init__(self, num_particles: int = 8, replay=None, replay_particles: int | None = None,
                 lamda: float = 1.0, log_z=None, init_log_z=None, param_name: str = "tb_log_Z",
                 max_plate_nesting: float = float("inf")):
        if isinstance(lamda, bool) or not isinstance(lamda, (int, float)) \
                or not math.isfinite(lamda) or lamda <= 0:
            raise ValueError(f"lamda: expected a finite float > 0 (the weight lamda**(j - i) of "
                             f"a sub-trajectory of j - i tokens), got {lamda!r}")
        super().__init__(num_particles, replay, replay_particles, log_z, init_log_z,
                         param_name, max_plate_nesting)
        self.lamda = float(lamda)

    # ------------------------------------------------------------------ the flows
    def residuals(self, model, guide, value: torch.Tensor, *args, log_z=None, **kwargs):
        r"""The residuals :math:`\delta_{ij}` of completions ``value`` and which pairs count.

        :param torch.Tensor value: completions ``(N, *batch, T)`` of the model's LM site.
        :param args: the model's arguments (and ``kwargs``, its keyword arguments).
        :param log_z: :math:`\log Z_\phi` (broadcastable to ``batch``; default: the Pyro
            param, or the ``log_z`` callable).
        :returns: ``(delta, mask)``, each ``(N, *batch, T + 1, T + 1)``: ``delta[..., i, j]``
            is :math:`\delta_{ij}` and ``mask[..., i, j]`` is true for the pairs
            :math:`0 \le i < j \le \tau` in the loss.
        """
        name, dist, batch = self._site(model, guide, args, kwargs)
        value = value.expand((value.shape[0],) + tuple(batch) + (dist.max_new_tokens,))
        if log_z is None:
            log_z = self._log_z(batch, torch.zeros(batch, device=value.device), args, kwargs)
        nodes, valid, _ = self._nodes(model, guide, name, dist, batch, value, args, kwargs,
                                      torch.is_grad_enabled())
        nodes = torch.cat([torch.broadcast_to(log_z, nodes.shape[:-1])[..., None],
                           nodes[..., 1:]], -1)
        delta, mask = _pairs(nodes, valid)
        return delta, mask

    def _site(self, model, guide, args, kwargs):
        if not isinstance(guide, AutoLMGuide):
            raise TypeError(f"guide: {_OWNER} trains an AutoLMGuide(model, lm), got "
                            f"{type(guide).__name__}")
        if guide.constraints:
            raise ValueError(f"guide: {_OWNER} reads the stopping probabilities q(EOS | prefix) "
                             "from the guide LM's logits, and a guide with constraints draws "
                             "from masked ones; pass AutoLMGuide(model, lm) without "
                             "constraints (a constraint belongs in the model, as a factor)")
        name, dist, batch = single_lm_site(model, args, kwargs, owner=_OWNER)
        return name, dist, batch

    def _nodes(self, model, guide, name, dist, batch, value, args, kwargs, grad: bool):
        r"""``(a, valid, parts)`` for completions ``value`` ``(N, *batch, T)``: ``a``
        ``(N, *batch, T + 1)`` with :math:`a_k = \log F(s_k) - \log q(s_k)` for
        :math:`0 < k \le \tau` (node 0 is left 0: it is :math:`\log Z_\phi`), ``valid``
        which nodes are on the trajectory and can stop, and ``parts`` (detached):
        :math:`\log q(x)`, :math:`\log p_0(x)`, :math:`f(x)`, each ``(N, *batch)``."""
        eos = dist.lm.eos_token_ids
        n, t = value.shape[0], value.shape[-1]
        with torch.set_grad_enabled(grad):
            q_tok, q_stop = _token_and_stop_log_probs(dist.with_lm(guide.lm), value, n)
        with torch.no_grad():
            p_tok, p_stop = _token_and_stop_log_probs(dist, value, n)
            f_full, f_stop = _stopped_factors(model, name, batch, value, eos,
                                              dist.lm.pad_token_id, args, kwargs)
        length = _lengths(value, eos)  # tau
        log_q = q_tok.sum(-1)
        log_p = p_tok.sum(-1) + f_full
        if torch.isneginf(log_p).any() or torch.isnan(log_p).any():
            raise ValueError(f"{_OWNER}: a completion has log p~(x) = -inf or NaN (a -inf "
                             "factor, e.g. a hard constraint): the balance log Z + log q(x) = "
                             "log p~(x) cannot hold there. Replace the -inf factor by a finite "
                             "penalty, or use DPG or SMC, which handle hard constraints")
        if torch.isnan(f_stop).any() or torch.isposinf(f_stop).any():
            raise ValueError(f"{_OWNER}: the model's factors are NaN or +inf on a completion "
                             "that stops early (a prefix followed by EOS); fix the factors")
        # a_k for 0 < k < T: log p~(s_k stop) - log q(s_k) - log q(stop | s_k)
        cum_q = q_tok.cumsum(-1)[..., :-1]  # log q(s_k), k = 1..T-1
        cum_p = p_tok.cumsum(-1)[..., :-1]
        stop_p = torch.logsumexp(p_stop[..., 1:, :] + f_stop, -1)  # (N, *batch, T-1)
        stop_q = torch.logsumexp(q_stop[..., 1:, :], -1)
        k = torch.arange(1, t, device=value.device)
        inner = k < length[..., None]
        raw = (cum_p + stop_p).detach() - cum_q - stop_q
        inner_valid = inner & torch.isfinite(raw)
        inner_a = torch.where(inner_valid, raw, torch.zeros_like(raw))
        last = log_p - log_q  # a_tau
        zero = torch.zeros_like(last)[..., None]
        a = torch.cat([zero, inner_a, zero], -1)  # (N, *batch, T + 1), node tau set below
        a = a.scatter(-1, length[..., None], last[..., None])
        valid = torch.cat([torch.ones_like(inner[..., :1]), inner_valid,
                           torch.zeros_like(inner[..., :1])], -1)
        valid = valid.scatter(-1, length[..., None], torch.ones_like(valid[..., :1]))
        return a, valid, (log_q.detach(), p_tok.sum(-1), f_full)

    # ------------------------------------------------------------------ estimator
    def _estimate(self, model, guide, args, kwargs, grad: bool) -> torch.Tensor:
        name, dist, batch = self._site(model, guide, args, kwargs)
        guide.register_params()
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = plate_nesting(model, guide.propose, args, kwargs)
        t = dist.max_new_tokens
        values, n_on = [], 0
        if self.num_particles:
            run = execute(model, guide.propose, self.num_particles, args, kwargs,
                          int(self.max_plate_nesting), owner=_OWNER)
            values.append(run.samples()[name])
            n_on = self.num_particles
        if self.replay is not None:
            drawn = self.replay.sample(self.replay_particles)
            if set(drawn) != {name}:
                raise ValueError(f"replay: holds the sites {sorted(drawn)}, the model's only "
                                 f"latent site is {name!r}")
            values.append(drawn[name])
        value = torch.cat([v.expand((v.shape[0],) + tuple(batch) + (t,)) for v in values])
        a, valid, (log_q, log_p0, f_full) = self._nodes(model, guide, name, dist, batch, value,
                                                       args, kwargs, grad)
        log_w = (log_p0 + f_full - log_q)[:n_on] if n_on else None
        init = log_normalizer(log_w) if log_w is not None else torch.zeros(
            batch, device=value.device)
        log_z = self._log_z(batch, init, args, kwargs)
        nodes = torch.cat([torch.broadcast_to(log_z, a.shape[:-1])[..., None], a[..., 1:]], -1)
        delta, mask = _pairs(nodes, valid)
        span = torch.arange(t + 1, device=value.device, dtype=delta.dtype)
        log_weight = (span[None, :] - span[:, None]) * math.log(self.lamda)  # (j - i) log lamda
        log_weight = torch.where(mask, log_weight, torch.full_like(delta, -math.inf))
        # lamda**(j - i) normalised over each trajectory's kept pairs (stable for any lamda)
        weight = log_weight.flatten(-2).softmax(-1).reshape(delta.shape)
        per_row = (weight * delta.pow(2)).sum((-2, -1))
        loss = per_row.mean(0).sum()
        nan = torch.full((), math.nan, device=value.device)
        if log_w is not None:
            log_z_batch, kish = log_normalizer(log_w).sum(), ess(log_w).mean()
            elbo = log_w.mean(0).sum()
            kl = (log_q[:n_on] - log_p0[:n_on]).mean(0).sum()
        else:
            log_z_batch, elbo, kish, kl = nan, nan, nan, nan
        tau = _lengths(value, dist.lm.eos_token_ids).float()
        masked = 1.0 - mask.sum() / (tau * (tau + 1) / 2).sum()  # of the pairs i < j <= tau
        stats = torch.stack([loss.detach(), log_z.detach().sum(), log_z_batch, elbo, kish,
                             f_full.mean(), kl, per_row.detach().mean().sqrt(),
                             masked]).tolist()  # one host sync
        self.metrics = dict(zip(METRICS + ("masked",), stats, strict=True))
        return loss


def _lengths(value: torch.Tensor, eos) -> torch.Tensor:
    """:math:`\\tau(x)`, ``(N, *batch)``: the position of the first EOS (1-based), or T."""
    ended = is_eos(value, eos)
    return torch.where(ended.any(-1), ended.long().argmax(-1) + 1,
                       torch.full_like(ended[..., 0], value.shape[-1], dtype=torch.long))


def _pairs(nodes: torch.Tensor, valid: torch.Tensor):
    """``delta[..., i, j] = nodes_i - nodes_j`` and the mask of valid pairs ``i < j``."""
    delta = nodes[..., :, None] - nodes[..., None, :]
    upper = torch.ones(nodes.shape[-1], nodes.shape[-1], dtype=torch.bool,
                       device=nodes.device).triu(1)
    mask = valid[..., :, None] & valid[..., None, :] & upper
    return torch.where(mask, delta, torch.zeros_like(delta)), mask


def _token_and_stop_log_probs(dist, value: torch.Tensor, n: int):
    r"""Token log-probabilities :math:`\log p(x_k \mid s_{k-1})` ``(N, *batch, T)`` (0 after
    the first EOS) and the EOS log-probabilities :math:`\log p(e \mid s_k)`, ``k = 0..T-1``,
    ``(N, *batch, T, |E|)``, of ``dist``'s LM, from one chunked forward pass. Only the
    gathered columns and the log-normaliser leave a chunk; under gradients a chunk that
    would hold more than :data:`~pyro_lm.distributions.lm_distribution.LOG_PROB_BUDGET`
    logits is recomputed in backward (``torch.utils.checkpoint``)."""
    shape = value.shape[:-1]
    t = value.shape[-1]
    eos = torch.tensor(dist.lm.eos_token_ids, dtype=torch.long, device=value.device)
    ids, mask = dist.expand(shape[1:]).prompts_for((n,))
    x = value.reshape(-1, t).to(ids.device)
    vocab = dist.lm.vocab_size
    chunk = max(1, LOG_PROB_BUDGET // ((ids.shape[-1] + t) * vocab))
    recompute = torch.is_grad_enabled() and x.shape[0] * t * vocab > LOG_PROB_BUDGET
    tok, stop = [], []
    for i in range(0, x.shape[0], chunk):
        args = (dist.lm, ids[i:i + chunk], mask[i:i + chunk], x[i:i + chunk], eos.to(ids.device))
        if recompute:
            out = torch.utils.checkpoint.checkpoint(_rows, *args, use_reentrant=False)
        else:
            out = _rows(*args)
        tok.append(out[0])
        stop.append(out[1])
    tok = torch.cat(tok).masked_fill(after_first_eos(x, dist.lm.eos_token_ids), 0.0)
    return tok.reshape(shape + (t,)), torch.cat(stop).reshape(shape + (t, eos.numel()))


def _rows(lm, ids, mask, x, eos):
    """``(token log-probs (R, T), EOS log-probs (R, T, |E|))`` of rows ``x`` ``(R, T)``."""
    t = x.shape[-1]
    inputs = torch.cat([ids, x[:, :-1]], dim=-1)
    full_mask = torch.cat([mask, torch.ones_like(x[:, :-1])], dim=-1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = lm(inputs, full_mask, positions, logits_to_keep=t)
    logits = logits[:, -t:]
    norm = torch.logsumexp(logits.float(), -1)
    tok = logits.gather(-1, x[..., None]).squeeze(-1).float() - norm
    stop = logits.index_select(-1, eos).float() - norm[..., None]
    return tok, stop


def _stopped_factors(model, name: str, batch, value: torch.Tensor, eos, pad: int, args, kwargs):
    r"""The model's summed factors :math:`f(x)` ``(N, *batch)`` of the completions and
    :math:`f(s_k e)` ``(N, *batch, T - 1, |E|)`` of every prefix ``k = 1..T-1`` stopped by
    each EOS id ``e`` (then padded), from one run of the program with its LM site held at
    all of them (:class:`~pyro_lm.poutine.LogFactorsMessenger`)."""
    n, t = value.shape[0], value.shape[-1]
    rest = value.shape[1:-1]
    positions = torch.arange(t, device=value.device)
    k = torch.arange(1, t, device=value.device)[:, None]  # (T-1, 1)
    kept = (positions < k).reshape((t - 1,) + (1,) * (value.dim() - 1) + (t,))
    ends = torch.tensor(eos, dtype=value.dtype, device=value.device)
    # (T-1, |E|, N, *batch, T): x_{<=k}, then e at position k, then pad
    body = torch.where(kept, value[None], torch.full_like(value[None], pad))[:, None]
    at_k = (positions == k)[:, None]  # (T-1, 1, T)
    at_k = at_k.reshape(at_k.shape[:2] + (1,) * (value.dim() - 1) + (t,))
    kept_e = ends.reshape((1, -1) + (1,) * value.dim())
    stopped = torch.where(at_k, kept_e, body.expand((t - 1, len(eos)) + tuple(value.shape)))
    held = torch.cat([value, stopped.reshape((-1,) + tuple(rest) + (t,))])
    factors = LogFactorsMessenger(model, name, batch, _OWNER)
    with prompt_cache():
        total = factors.evaluate(held, args, kwargs)
    total = torch.as_tensor(total, dtype=torch.float32, device=value.device)
    total = total.expand((held.shape[0],) + tuple(rest))
    f_full = total[:n]
    f_stop = total[n:].reshape((t - 1, len(eos), n) + tuple(rest))
    return f_full, f_stop.movedim(0, -1).movedim(0, -1)  # (N, *batch, T-1, |E|)
