r"""The proposals of token-level SMC: bootstrap and lookahead.

At step ``t`` a proposal draws every particle's next token (:meth:`draw`), then
weighs it (:meth:`weigh`): the particle's new potential :math:`\Phi_{t+1}` and the
increment of its log-weight,

.. math::

    \log \frac{p_0(x_t \mid x_{<t})\, e^{\Phi_{t+1}(x_{\le t}) - \Phi_t(x_{<t})}}
              {r(x_t \mid x_{<t})},

where :math:`r` is what the token was drawn from: :math:`q` itself for
:class:`BootstrapProposal`, :math:`q` tilted by the candidates' potentials for
:class:`LookaheadProposal` (see :class:`~pyro_lm.infer.SMC` for the maths).
Both read the particles from a :class:`~pyro_lm.infer.smc_population.Populations`
and evaluate potentials through ``potential(values, t, final) -> (rows,)``, the
potential of prefixes ``values`` ``(M, *batch, T)`` of length ``t`` (the model's
full factors where ``final``). A proposal object serves one run.

**Masks.** With a constraint's ``mask`` (a
:class:`~pyro_lm.constraints.ConstraintState` over the rows), the token is drawn from
:math:`r` restricted to the allowed set :math:`A_t` and renormalised, and the
increment gains the log of the mass that :math:`r` gave the allowed set,

.. math::

    \log \frac{p_0(x_t \mid x_{<t})\, \mathbb 1[x_t \in A_t]\, e^{\Delta\Phi}}
              {r(x_t \mid x_{<t})\, \mathbb 1[x_t \in A_t] / R_t}
    = (\text{the increment above}) + \log R_t, \qquad R_t = \sum_{v \in A_t} r(v),

the locally optimal proposal for the constraint's 0 / :math:`-\infty` potential [1]; a
row whose allowed set is empty dies, and so does, at the end, a row truncated at ``T``
tokens whose text is not in the constraint's language. The target is the model's
posterior conditioned on the constraint.

References:

[1] A. Doucet, A. M. Johansen, "A tutorial on particle filtering and smoothing:
fifteen years later", 2009 (the locally optimal proposal).
"""

from __future__ import annotations

import math

import torch

from pyro_lm.lm.decoding import draw_restricted_tokens, draw_tokens

__all__ = ["BootstrapProposal", "LookaheadProposal", "draw"]


def draw(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(logits)``, by :func:`pyro_lm.lm.decoding.draw_tokens`.
    A ``-inf`` logit is never drawn unless its whole row is ``-inf``."""
    return draw_tokens(logits)


def _masked(log_r: torch.Tensor, mask):
    """``log_r`` ``(R, V)`` restricted to the mask's allowed tokens (unchanged without a
    mask), and the rows whose allowed set is empty (``None`` without a mask)."""
    if mask is None:
        return log_r, None
    allowed = mask.allowed()
    return log_r.masked_fill(~allowed, -math.inf), ~allowed.any(-1)


def _check_truncated(mask, pop, final: bool, inc: torch.Tensor) -> torch.Tensor:
    """``inc`` with, at the end (``final``), ``-inf`` for the rows that did not end by EOS
    and whose text the mask's constraint does not accept (truncated at ``T`` tokens)."""
    if final:
        inc.masked_fill_(~pop.done & ~mask.valid(), -math.inf)
    return inc


def _prior_ratio(decoder_p, log_q: torch.Tensor, token: torch.Tensor,
                 ended: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p_0(x_t \mid x_{<t}) - \log q(x_t \mid x_{<t})` per row, 0 on ended rows."""
    log_ratio = decoder_p.logits.log_softmax(-1) - log_q
    return log_ratio.gather(-1, token[:, None]).squeeze(-1).masked_fill_(ended, 0.0)


class BootstrapProposal:
    r"""Tokens drawn from the proposal LM :math:`q`; the increment is
    :math:`\Delta\Phi + \log p_0 / q`.

    :param potential: ``potential(values, t, final) -> (R,)``.
    :param decoder_q: the proposal's :class:`~pyro_lm.lm.decoder.Decoder`.
    :param decoder_p: the prior's, or ``None`` when the prior proposes.
    :param mask: ``None``, or a :class:`~pyro_lm.constraints.ConstraintState` over the
        rows: tokens are drawn from :math:`q` restricted to its allowed set (see above).
    """

    def __init__(self, potential, decoder_q, decoder_p=None, mask=None):
        self.potential, self.decoder_q, self.decoder_p = potential, decoder_q, decoder_p
        self.mask = mask
        self._log_mass = None  # log R_t of the masked draw, for weigh

    def draw(self, pop, t: int, last: bool) -> torch.Tensor:
        """The next token ``(R,)`` of every row."""
        logits = self.decoder_q.logits
        if self.mask is None:
            return draw(logits)
        token, self._log_mass = draw_restricted_tokens(logits, self.mask.allowed(logits.dtype))
        return token

    @property
    def between_steps_free(self) -> bool:
        """Whether a token that ends no step leaves every weight as it is (no prior ratio,
        no mask), so that :meth:`weigh` may be skipped there (step-level SMC)."""
        return self.decoder_p is None and self.mask is None

    def weigh(self, pop, token, t: int, ended, final: bool, last: bool):
        """``(phi, increment)``, each ``(R,)``; a row whose potential was already
        ``-inf`` stays dead (avoid ``-inf - -inf``)."""
        phi = self.potential(pop.values, t + 1, final)
        inc = phi - pop.phi
        if self.decoder_p is not None:
            inc += _prior_ratio(self.decoder_p, self.decoder_q.logits.log_softmax(-1), token,
                                ended)
        if self.mask is not None:
            inc += self._log_mass.masked_fill_(ended, 0.0)
            self.mask.advance(token, ended)
            inc = _check_truncated(self.mask, pop, final, inc)
        return phi, inc.masked_fill_(torch.isneginf(pop.phi), -math.inf)


class LookaheadProposal:
    r"""Tokens drawn from :math:`q` tilted by the change of potential of candidate next
    tokens (every token, or :math:`q`'s top ``k``), scored in one batched evaluation
    of the potential on the ``C * N`` candidate prefixes.

    :param potential: ``potential(values, t, final) -> (R,)``.
    :param decoder_q: the proposal's :class:`~pyro_lm.lm.decoder.Decoder`.
    :param decoder_p: the prior's, or ``None`` when the prior proposes.
    :param int top_k: the candidates: ``None`` for every token, else :math:`q`'s top ``k``.
    :param torch.Size shape: ``(N, *batch)``, the particles' shape.
    :param int pad: ``pad_token_id``, the candidate of ended rows.
    :param mask: ``None``, or a :class:`~pyro_lm.constraints.ConstraintState` over the
        rows: :math:`r` is restricted to its allowed set (see above).
    """

    def __init__(self, potential, decoder_q, decoder_p, top_k: int | None, shape: torch.Size,
                 pad: int, mask=None):
        self.potential, self.decoder_q, self.decoder_p = potential, decoder_q, decoder_p
        self.mask = mask
        vocab = decoder_q.logits.shape[-1]
        self.full = top_k is None or top_k >= vocab
        self.top_k, self.shape, self._pad_id = top_k, shape, pad
        device, rows = decoder_q.logits.device, shape.numel()
        self._pad = torch.tensor(pad, dtype=torch.long, device=device)
        self._vocab_column = (torch.arange(vocab, device=device)[:, None].expand(vocab, rows)
                              if self.full else None)  # (V, R): candidate c is token c
        self._buffer = None  # (C, R, T) candidate prefixes; columns > t stay padding
        self._step = None  # what draw computed for weigh

    def draw(self, pop, t: int, last: bool) -> torch.Tensor:
        """The next token ``(R,)`` of every row, from :math:`r`; a row all of whose
        candidates are ``-inf`` draws from :math:`q` (it dies in :meth:`weigh`)."""
        log_q = self.decoder_q.logits.log_softmax(-1)
        delta_hat, cand_phi = self._score_candidates(pop, t, log_q, last)
        log_r, _ = _masked(log_q + delta_hat, self.mask)
        log_l = log_r.logsumexp(-1)  # (R,)
        stuck = torch.isneginf(log_l)  # every candidate forbidden: the particle dies
        self._step = log_q, delta_hat, log_l, stuck, cand_phi
        return draw(torch.where(stuck[:, None], log_q, log_r))

    def weigh(self, pop, token, t: int, ended, final: bool, last: bool):
        r"""``(phi, increment)``, each ``(R,)``: :math:`\log L_t` plus the correction
        :math:`\Delta\Phi(x_t) - \hat\Delta(x_t)` (0 with ``"full"``, whose scored
        candidate's potential is reused) and :math:`\log p_0 / q`."""
        log_q, delta_hat, log_l, stuck, cand_phi = self._step
        self._step = None
        if self.full and final == last:
            # the drawn token's potential was scored already, and exactly
            phi = cand_phi.gather(0, token[None]).squeeze(0)
            inc = torch.where(ended, phi - pop.phi, log_l)
        else:
            phi = self.potential(pop.values, t + 1, final)
            inc = phi - pop.phi
            hat = delta_hat.gather(-1, token[:, None]).squeeze(-1)
            inc += (log_l - hat).masked_fill_(ended, 0.0)
        if self.decoder_p is not None:
            inc += _prior_ratio(self.decoder_p, log_q, token, ended)
        if self.mask is not None:
            self.mask.advance(token, ended)
            inc = _check_truncated(self.mask, pop, final, inc)
        # a particle whose potential was already -inf stays dead (avoid -inf - -inf)
        dead = torch.isneginf(pop.phi) | (stuck & ~ended)
        return phi, inc.masked_fill_(dead, -math.inf)

    def _score_candidates(self, pop, t: int, log_q: torch.Tensor, last: bool):
        r""":math:`\hat\Delta` ``(R, V)`` and the candidates' potentials ``(C, R)``."""
        x, done, phi = pop.x, pop.done, pop.phi
        rows, big_t = x.shape
        cand = self._vocab_column if self.full else log_q.topk(self.top_k, -1).indices.T
        c = cand.shape[0]
        buf = self._buffer
        if buf is None or buf.shape != (c, rows, big_t):
            buf = self._buffer = torch.full((c, rows, big_t), self._pad_id, dtype=x.dtype,
                                            device=x.device)
        buf[:, :, : t + 1].copy_(x[None, :, : t + 1].expand(c, rows, t + 1))
        buf[:, :, t] = torch.where(done, self._pad, cand)  # ended rows only append padding
        shape = (c * self.shape[0],) + tuple(self.shape[1:]) + (big_t,)
        cand_phi = self.potential(buf.view(shape), t + 1, last).view(c, rows)
        # a particle already at -inf stays there (avoid -inf - -inf = NaN)
        # (ended rows: their draw is replaced by padding and their increment is the true one)
        delta = (cand_phi - phi).masked_fill_(torch.isneginf(phi), -math.inf).T  # (R, C)
        if self.full:
            return delta, cand_phi
        return torch.zeros_like(log_q).scatter_(-1, cand.T, delta), cand_phi
