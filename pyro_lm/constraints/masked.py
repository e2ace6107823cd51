r"""The law of masked decoding: an LM restricted, token by token, to a constraint's
allowed tokens.

Given an LM :math:`q` and a constraint with allowed sets :math:`A_t(x_{<t})`
(:class:`~pyro_lm.constraints.ConstraintState`), masked decoding draws

.. math::

    r(x_t \mid x_{<t}) = \frac{q(x_t \mid x_{<t})\, \mathbb 1[x_t \in A_t]}{Q_t},
    \qquad Q_t = \sum_{v \in A_t} q(v \mid x_{<t}),

and from :math:`q` itself at a *dead end*, a step whose allowed set is empty (the
completion can no longer be valid; such a step is taken only by a completion the
constraint rejects). :class:`MaskedLMDistribution` is this law as a distribution: its
``sample`` decodes with the mask, its ``log_prob`` is :math:`\log r(x)`, exact and
differentiable in the LM's parameters, so it serves as a guide (SVI, DPG) or a
proposal (:class:`~pyro_lm.infer.Importance`). Since
:math:`p_0(x) / r(x) = \prod_t Q_t \cdot p_0(x) / q(x)` on valid completions, the
importance weight gains the log allowed mass :math:`\sum_t \log Q_t`.

The allowed sets do not look past the next token, so a completion can still end
invalid: at a dead end, or truncated at ``T`` tokens with a text that is not in the
language. The constraint (a factor in the model, or ``constraints=`` of a sampler) gives
those weight 0.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints as tdc

from pyro_lm.distributions.lm_distribution import LMDistribution, after_first_eos
from pyro_lm.distributions.prefix import is_eos
from pyro_lm.lm.causal_lm import eval_mode
from pyro_lm.lm.decoding import make_decoder

__all__ = ["MaskedLMDistribution", "masked_logits"]

#: Mask and logit elements one chunk of :meth:`MaskedLMDistribution.log_prob` may hold.
LOG_PROB_BUDGET = 2**24


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor):
    r"""What masked decoding draws from: ``logits`` ``(..., V)`` with the tokens outside
    ``allowed`` at ``-inf``, or left whole where nothing is allowed (a dead end).

    :returns: ``(source, dead)``: the logits to draw from or score, and the bool
        ``(...)`` dead ends."""
    dead = ~allowed.any(-1)
    source = logits.masked_fill(~allowed, -math.inf)
    return torch.where(dead[..., None], logits, source), dead


def masked_decode(lm, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  constraint, sync_every: int | None = None):
    """One completion per prompt row, drawn by masked decoding (see the module docstring).

    :returns: ``(x, log_r)``: ``x`` ``(N, T)`` with ``pad_token_id`` after the first EOS,
        ``log_r`` ``(N,)`` float32, :math:`\\log r(x)`."""
    from pyro_lm.infer.smc_proposals import draw  # the one token draw (no import cycle)

    n, device = ids.shape[0], ids.device
    eos, pad = lm.eos_token_ids, lm.pad_token_id
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 8
    x = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    log_r = torch.zeros(n, dtype=torch.float32, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    state = constraint.state(n, device)
    with torch.inference_mode(), eval_mode(lm.model):
        decoder = make_decoder(lm, ids, mask, max_new_tokens)
        for t in range(max_new_tokens):
            source, _ = masked_logits(decoder.logits, state.allowed())
            token = draw(source)
            step = source.gather(-1, token[:, None]).squeeze(-1) - source.logsumexp(-1)
            log_r += step.masked_fill(done, 0.0)
            token = token.masked_fill(done, pad)
            x[:, t] = token
            state.advance(token, done)
            done = done | is_eos(token, eos)
            if t + 1 == max_new_tokens or ((t + 1) % sync_every == 0 and bool(done.all())):
                break
            decoder.advance(token.masked_fill(done, decoder.filler_token))
    return x.clone(), log_r.clone()


class MaskedLMDistribution(TorchDistribution):
    r"""An :class:`~pyro_lm.LMDistribution` decoded under a constraint's mask: the law
    :math:`r` of the module docstring, over the same support (every sequence of at most
    ``T`` tokens; those the mask never produces have log-probability ``-inf``).

    :param base: the :class:`~pyro_lm.LMDistribution` (its LM, prompts, length, batch).
    :param constraint: a :class:`~pyro_lm.constraints.Constraint` built for the same
        tokenizer.

    ``log_prob`` runs one (chunked) forward pass of the LM for the next-token logits
    at every position and replays the constraint's matchers along each completion for
    the allowed sets; it is pure and differentiable in the LM's parameters.
    """

    arg_constraints = {}
    has_enumerate_support = True
    has_rsample = False

    def __init__(self, base: LMDistribution, constraint, validate_args=None):
        from pyro_lm.constraints.base import Constraint

        if type(base) is not LMDistribution:
            raise TypeError(f"base: expected a plain pyro_lm.LMDistribution, got "
                            f"{type(base).__name__}")
        if not isinstance(constraint, Constraint):
            raise TypeError(f"constraint: expected a pyro_lm.constraints.Constraint, got "
                            f"{type(constraint).__name__}")
        constraint.check_lm(base.lm, "constraint")
        self.base_dist, self.constraint = base, constraint
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def lm(self):
        return self.base_dist.lm

    @property
    def max_new_tokens(self) -> int:
        return self.base_dist.max_new_tokens

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MaskedLMDistribution, _instance)
        new.base_dist = self.base_dist.expand(batch_shape)
        new.constraint = self.constraint
        super(MaskedLMDistribution, new).__init__(new.base_dist.batch_shape, self.event_shape,
                                                  validate_args=False)
        new._validate_args = self._validate_args
        return new

    @tdc.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return self.base_dist.support

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self.base_dist.enumerate_support(expand)

    # --------------------------------------------------------------- sampling
    def sample_with_log_prob(self, sample_shape=()):
        """Sample by masked decoding; ``(x, log_prob)`` as
        :meth:`pyro_lm.LMDistribution.sample_with_log_prob` (no gradient)."""
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]
        ids, mask = self.base_dist.prompts_for(torch.Size(sample_shape))
        x, log_r = masked_decode(self.lm, ids, mask, self.max_new_tokens, self.constraint)
        return x.reshape(shape + self.event_shape), log_r.reshape(shape)

    def sample(self, sample_shape=()):
        return self.sample_with_log_prob(sample_shape)[0]

    # ------------------------------------------------------------- log density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log r(x)` ``(*shape)``, float32: the sum over the tokens up to and
        including the first EOS of :math:`\log q(x_t) - \log Q_t` (``-inf`` for a token
        outside a non-empty allowed set; :math:`\log q(x_t)` at a dead end)."""
        base = self.base_dist
        if self._validate_args:
            base._validate_sample(value)
        big_t = self.max_new_tokens
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        lead = shape[: len(shape) - len(self.batch_shape)]
        ids, mask = base.prompts_for(lead)
        length = ids.shape[-1]
        ids = ids.reshape(lead + self.batch_shape + (length,)).expand(shape + (length,))
        mask = mask.reshape(ids.shape[:-1] + (length,)).expand(ids.shape)
        ids, mask = ids.reshape(-1, length), mask.reshape(-1, length)
        x = value.to(ids.device).expand(shape + (big_t,)).reshape(-1, big_t)
        if x.shape[0] == 0:
            return torch.zeros(shape, dtype=torch.float32, device=value.device)
        chunk = max(1, LOG_PROB_BUDGET // ((length + big_t) * self.lm.vocab_size))
        parts = [self._log_prob_rows(x[i:i + chunk], ids[i:i + chunk], mask[i:i + chunk])
                 for i in range(0, x.shape[0], chunk)]
        return torch.cat(parts).reshape(shape)

    def _allowed_along(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, V)`` bool: the allowed sets at every position of the rows ``x``."""
        rows, big_t = x.shape
        state = self.constraint.state(rows, x.device)
        eos = self.lm.eos_token_ids
        done = torch.zeros(rows, dtype=torch.bool, device=x.device)
        out = []
        with torch.no_grad():
            for t in range(big_t):
                out.append(state.allowed())
                state.advance(x[:, t], done)
                done = done | is_eos(x[:, t], eos)
        return torch.stack(out, 1)

    def _log_prob_rows(self, x, ids, mask) -> torch.Tensor:
        big_t = self.max_new_tokens
        inputs = torch.cat([ids, x[:, :-1]], dim=-1)
        full_mask = torch.cat([mask, torch.ones_like(x[:, :-1])], dim=-1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits, _ = self.lm(inputs, full_mask, positions, logits_to_keep=big_t)
        source, _ = masked_logits(logits[:, -big_t:].float(), self._allowed_along(x))
        log_r = source.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)
        # select, not multiply: a -inf after the first EOS must give 0, not NaN
        return log_r.masked_fill(after_first_eos(x, self.lm.eos_token_ids), 0.0).sum(-1)

    def __repr__(self) -> str:
        return f"MaskedLMDistribution({self.base_dist!r}, {self.constraint!r})"
