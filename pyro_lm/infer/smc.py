r"""Token-level sequential Monte Carlo over a model's LM site.

SMC drives the LM site one token at a time with ``N`` particles per prompt.
With proposal :math:`q` (a guide's LM, or the prior itself), potentials
:math:`\Phi_t(x_{\le t})` (the model's log-factors evaluated on the prefix, or
a learned ``twist``) and the true log-factor :math:`\Phi_T = \sum_k f_k(x)` at
the end, the log-weights evolve as

.. math::

    \log w_0 = \Phi_0 = 0, \qquad
    \log w_t = \log w_{t-1}
      + \log \frac{p_0(x_t \mid x_{<t})}{q(x_t \mid x_{<t})}
      + \Phi_t(x_{\le t}) - \Phi_{t-1}(x_{<t}).

(The potential of the empty prefix is the same for every particle of a prompt,
so it is taken to be 0 rather than evaluated.) The potentials telescope, so
whatever :math:`\Phi_t` is for ``0 < t < T`` the final weights are
:math:`p_0(x)\, e^{\Phi_T(x)} / q(x)` and target
:math:`p^*(x) \propto p_0(x) \exp(\sum_k f_k(x))` exactly; good intermediate
potentials only lower the variance, and so does a better proposal (the
``lookahead`` option: the locally optimal proposal [2]). When a prompt's effective sample size
falls below ``ess_threshold * N`` its particles are resampled (systematic by
default), their KV caches reordered in place, and every weight is set to the
population's mean, so that at any time

.. math:: \log \hat Z = \log \frac1N \sum_i w_i

is the standard SMC estimator, unbiased for :math:`Z` [1].

References:

[1] P. Del Moral, *Feynman-Kac Formulae: Genealogical and Interacting Particle
Systems*, Springer, 2004.
[2] A. Doucet, A. M. Johansen, "A tutorial on particle filtering and smoothing:
fifteen years later", 2009.
[3] A. K. Lew, T. Zhi-Xuan, G. Grand, V. K. Mansinghka, "Sequential Monte Carlo
steering of large language models using probabilistic programs", 2023.
[4] S. Zhao, R. Brekelmans, A. Makhzani, R. Grosse, "Probabilistic inference in
language models via twisted sequential Monte Carlo", ICML 2024.
"""

from __future__ import annotations

import math

import torch

from pyro_lm._validation import check_positive_int
from pyro_lm.distributions.lm_distribution import prompt_cache
from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.infer.posterior import WeightedPosterior, check_log_weights
from pyro_lm.infer.program import single_lm_site
from pyro_lm.infer.resampling import RESAMPLERS
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.lm.decoding import make_decoder
from pyro_lm.poutine import LogFactorsMessenger

__all__ = ["SMC"]


def _draw(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(logits)`` by Gumbel-max, ``argmax(logits - log E)``,
    ``E ~ Exp(1)``. A ``-inf`` logit is never drawn unless its whole row is ``-inf``."""
    return (logits - torch.rand_like(logits).log_().neg_().log_()).argmax(-1)


def _check_lookahead(lookahead):
    if lookahead is None or lookahead == "full":
        return lookahead
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead: expected None, 'full' or a positive int k (the top-k "
                         f"tokens of the proposal), got {lookahead!r}")
    return lookahead


class SMC:
    r"""Token-level SMC for a model with one :class:`~pyro_lm.LMDistribution` site.

    :param model: a Pyro model: one LM sample site, inside any plates, and factors.
    :param guide: ``None`` to propose tokens from the prior, or a guide exposing
        ``lm`` (:class:`~pyro_lm.infer.AutoLMGuide`) whose LM proposes them.
    :param int num_particles: ``N``, particles per prompt.
    :param float ess_threshold: resample a prompt's particles when
        :math:`\mathrm{ESS} < \text{ess\_threshold} \cdot N`; 0 never resamples
        (sequential importance sampling), 1 resamples at every step.
    :param twist: ``None`` (potentials are the model's factors on prefixes,
        evaluated inside :func:`~pyro_lm.distributions.prefix_context`), or a
        callable ``twist(x, t) -> (N, *batch)`` log-potential of the prefixes of
        length ``t < T`` (``x`` is ``(N, *batch, T)``, padded past ``t``), e.g. a
        :class:`~pyro_lm.infer.ValueTwist` trained by :func:`~pyro_lm.infer.fit_twist`.
    :param str resampling: ``"systematic"`` (default) or ``"multinomial"``.
    :param int sync_every: check every this many tokens whether all particles
        have ended (a host sync); default 1 on CPU, 8 on accelerators. SMC's own
        loop makes no other host sync on accelerators (it resamples every prompt,
        keeping the particles of those whose ESS is high); the model's factors may
        (a reward's NaN check, Pyro's argument validation).
    :param lookahead: ``None`` (default: the *bootstrap* proposal, tokens drawn
        from :math:`q`), ``"full"`` (the locally optimal proposal, every next
        token scored) or an int ``k`` (only the proposal's top-``k`` next tokens
        scored); see below.

    **Lookahead.** With ``lookahead`` set, at step ``t`` each particle scores
    candidate next tokens :math:`v` by the change of potential they would cause,
    :math:`\Delta\Phi(v) = \Phi_{t+1}(x_{<t}, v) - \Phi_t(x_{<t})`, with one
    batched evaluation of the potential on the ``C * N`` candidate prefixes
    (``C = V`` for ``"full"``, the top-``k`` tokens of :math:`q(\cdot \mid x_{<t})`
    for ``k``). With :math:`\hat\Delta(v) = \Delta\Phi(v)` on the candidates and 0
    elsewhere, the token is drawn from

    .. math::

        r(v) = \frac{q(v \mid x_{<t})\, e^{\hat\Delta(v)}}{L_t}, \qquad
        L_t = \sum_u q(u \mid x_{<t})\, e^{\hat\Delta(u)},

    and the weight, :math:`p_0(x_t \mid x_{<t})\, e^{\Delta\Phi(x_t)} / r(x_t)`, is
    incremented by

    .. math::

        \log L_t + \big[\Delta\Phi(x_t) - \hat\Delta(x_t)\big]
          + \log \frac{p_0(x_t \mid x_{<t})}{q(x_t \mid x_{<t})},

    exact for any ``k`` (the true :math:`\Delta\Phi(x_t)` is evaluated as in the
    bootstrap path; with ``"full"`` the bracket is 0 and the scored candidate's
    potential is reused). With the prior as :math:`q` and ``"full"``, :math:`r` is
    the *locally optimal* proposal [2] and the increment :math:`\log L_t` does
    not depend on the drawn token. A candidate with :math:`\hat\Delta = -\infty`
    (a hard constraint) is never proposed: token masking as in LLaMPPL [3] is the
    special case of ``-inf`` potentials; a particle all of whose candidates are
    ``-inf`` dies (weight ``-inf``). With a ``twist`` the candidates' potentials
    are the twist, which makes this the twisted proposal of [4]. Ended sequences
    (after EOS) only append padding and get no lookahead term.

    Cost: ``C * N`` potential evaluations per token (in one batched call, plus a
    ``(C N, T)`` token buffer), so ``"full"`` suits small vocabularies or cheap,
    vectorised rewards such as :class:`~pyro_lm.rewards.Lexicon`; an int ``k``
    bounds the cost for large vocabularies.

    ``run(*args, **kwargs)`` returns a :class:`~pyro_lm.infer.WeightedPosterior`
    whose ``log_normalizer()`` is the SMC estimate of :math:`\log Z` per prompt
    and whose ``history`` holds ``"ess"`` (before resampling), ``"resampled"``
    and the running ``"log_Z"``, each ``(T', *batch)``. The token loop runs under
    :func:`torch.inference_mode` with the prompts prepared once
    (:func:`~pyro_lm.distributions.lm_distribution.prompt_cache`); what ``run``
    returns are ordinary tensors.

    References:

    [1] P. Del Moral, *Feynman-Kac Formulae*, Springer, 2004.
    [2] A. Doucet, A. M. Johansen, "A tutorial on particle filtering and smoothing:
    fifteen years later", 2009 (the locally optimal proposal).
    [3] A. K. Lew, T. Zhi-Xuan, G. Grand, V. K. Mansinghka, "Sequential Monte Carlo
    steering of large language models using probabilistic programs", 2023.
    [4] S. Zhao, R. Brekelmans, A. Makhzani, R. Grosse, "Probabilistic inference in
    language models via twisted sequential Monte Carlo", ICML 2024.
    """

    def __init__(self, model, guide=None, num_particles: int = 100, ess_threshold: float = 0.5,
                 twist=None, resampling: str = "systematic", sync_every: int | None = None,
                 lookahead=None):
        if not callable(model):
            raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
        if guide is not None and not isinstance(getattr(guide, "lm", None), CausalLM):
            raise TypeError("guide: SMC proposes tokens from a guide's LM, so the guide must "
                            "be a pyro_lm.infer.AutoLMGuide (or expose its CausalLM as .lm), or "
                            "pass None to propose from the prior")
        if getattr(guide, "latent_guide", None) is not None:
            raise ValueError("guide: SMC infers one LM site, so a latent_guide for other "
                             "latent sites has nothing to propose; use Importance")
        if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float)) \
                or not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold: expected a number in [0, 1], got {ess_threshold!r}")
        if twist is not None and not callable(twist):
            raise TypeError(f"twist: expected None or a callable twist(x, t), got "
                            f"{type(twist).__name__}")
        if resampling not in RESAMPLERS:
            raise ValueError(f"resampling: expected one of {sorted(RESAMPLERS)}, "
                             f"got {resampling!r}")
        self.model = model
        self.guide = guide
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.ess_threshold = float(ess_threshold)
        self.twist = twist
        self.resampling = resampling
        self.sync_every = (None if sync_every is None
                           else check_positive_int(sync_every, "sync_every"))
        self.lookahead = _check_lookahead(lookahead)

    # ------------------------------------------------------------------ set-up
    def _lm_site(self, args, kwargs):
        site, prior, batch = single_lm_site(self.model, args, kwargs, owner="SMC")
        proposal = prior if self.guide is None else prior.with_lm(self.guide.lm)
        return site, prior, proposal, batch

    def _potential(self, x, t, final, args, kwargs):
        """``(N * B,)`` log-potential of the prefixes ``x`` ``(N, *batch, T)`` of length ``t``,
        flattened particle-major (row ``i * B + j``, like the decoding rows)."""
        if final or self.twist is None:
            # no particle plate: the values carry the particle dim on the left, and the
            # model's plates broadcast around it (saves re-expanding the LM site per token)
            if final:
                phi = self._factors.evaluate(x, args, kwargs)
            else:
                with prefix_context(t):
                    phi = self._factors.evaluate(x, args, kwargs)
            name = "factors"
        else:
            with prefix_context(t):
                phi, name = self.twist(x, t), "twist"
        if isinstance(phi, torch.Tensor) and phi.dtype == torch.float32 \
                and phi.shape == x.shape[:-1]:
            return phi.reshape(-1)
        phi = torch.as_tensor(phi, device=x.device).float()
        try:
            return phi.expand(x.shape[:-1]).reshape(-1)
        except RuntimeError:
            raise ValueError(f"{name}: returned shape {tuple(phi.shape)}, expected one value per "
                             f"particle and prompt {tuple(x.shape[:-1])}") from None

    def _score_candidates(self, x, t, done, phi, log_q, full, last, args, kwargs):
        r"""Lookahead: :math:`\hat\Delta` ``(R, V)`` and the candidates' potentials
        ``(C, R)`` for the ``R`` decoding rows ``x`` ``(R, T)`` at step ``t``."""
        rows, big_t = x.shape
        if full:
            cand = self._vocab_column  # (V, R): candidate c is token c
        else:
            cand = log_q.topk(self.lookahead, -1).indices.T  # (k, R)
        c = cand.shape[0]
        buf = self._cand_buffer
        if buf is None or buf.shape != (c, rows, big_t):
            buf = self._cand_buffer = torch.full((c, rows, big_t), self._pad_id, dtype=x.dtype,
                                                 device=x.device)  # columns > t stay padding
        buf[:, :, : t + 1].copy_(x[None, :, : t + 1].expand(c, rows, t + 1))
        buf[:, :, t] = torch.where(done, self._pad, cand)  # ended rows only append padding
        shape = (c * self.num_particles,) + tuple(self._batch) + (big_t,)
        cand_phi = self._potential(buf.view(shape), t + 1, last, args, kwargs).view(c, rows)
        # a particle already at -inf stays there (avoid -inf - -inf = NaN)
        # (ended rows: their draw is replaced by padding and their increment is the true one)
        delta = (cand_phi - phi).masked_fill_(torch.isneginf(phi), -math.inf).T  # (R, C)
        if full:
            return delta, cand_phi
        return torch.zeros_like(log_q).scatter_(-1, cand.T, delta), cand_phi

    # --------------------------------------------------------------------- run
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Run SMC on the model's arguments; see the class docstring."""
        with torch.no_grad(), prompt_cache():  # the model runs once per token on the same prompts
            try:
                # the first run of the model (params, reward caches) is outside inference mode
                site, prior, proposal, batch = self._lm_site(args, kwargs)
                self._site, self._batch = site, batch
                with torch.inference_mode():  # the loop: less overhead per tensor operation
                    x, log_w, hist = self._run(prior, proposal, args, kwargs)
            finally:
                self._factors = None
                self._cand_buffer = self._vocab_column = None
            # inference tensors must not escape (autograd refuses them): copy them out
            x, log_w = x.clone(), log_w.clone()
            hist = {k: v.clone() for k, v in hist.items()}
            return self._posterior(x, log_w, batch, hist, prior.lm)

    def _run(self, prior, proposal, args, kwargs):
        site, batch = self._site, self._batch
        self._factors = LogFactorsMessenger(self.model, site, batch, owner="SMC")
        n, big_t = self.num_particles, prior.max_new_tokens
        b = batch.numel()
        lm_q, lm_p = proposal.lm, prior.lm
        eos, pad = lm_p.eos_token_id, lm_p.pad_token_id
        lead = batch[: len(batch) - len(prior.batch_shape)]  # plate dims the site is not in
        ids, mask = prior.prompts_for(torch.Size((n,)) + lead)
        device = ids.device
        on_cpu = device.type == "cpu"
        single = b == 1 and on_cpu  # one population on the host: scalar control flow
        sync_every = self.sync_every or (1 if on_cpu else 8)
        decoder_q = make_decoder(lm_q, ids, mask, big_t)
        decoder_p = make_decoder(lm_p, ids, mask, big_t) if proposal is not prior else None
        rows = n * b
        x = torch.full((rows, big_t), pad, dtype=torch.long, device=device)
        view = x.view((n,) + tuple(batch) + (big_t,))
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        self._pad = torch.tensor(pad, dtype=torch.long, device=device)
        self._pad_id = pad
        look = self.lookahead is not None
        full = look and (self.lookahead == "full" or self.lookahead >= decoder_q.logits.shape[-1])
        if full:
            vocab = decoder_q.logits.shape[-1]
            self._vocab_column = torch.arange(vocab, device=device)[:, None].expand(vocab, rows)
        self._cand_buffer = None
        # Phi_0 is a constant per prompt: it cancels from the weights, so it is taken to be 0
        phi = torch.zeros(rows, device=device)  # (R,), particle-major, like the decoding rows
        log_w = torch.zeros(rows, device=device)
        offsets = torch.arange(b, device=device)
        keep = torch.arange(n, device=device)[:, None].expand(n, b)
        # resample when ESS = exp(2 lse - lse2) < threshold * N, i.e. lse2 - 2 lse > -log(...)
        log_bound = -math.log(self.ess_threshold * n) if self.ess_threshold > 0 else math.inf
        lse_hist, lse2_hist, resampled_hist = [], [], []
        for t in range(big_t):
            last = t + 1 == big_t
            logits = decoder_q.logits
            ended = done  # rows that had ended before this token
            if not look:
                token = _draw(logits)
            else:
                log_q = logits.log_softmax(-1)
                delta_hat, cand_phi = self._score_candidates(x, t, done, phi, log_q, full, last,
                                                             args, kwargs)
                log_r = log_q + delta_hat
                log_l = log_r.logsumexp(-1)  # (R,)
                stuck = torch.isneginf(log_l)  # every candidate forbidden: the particle dies
                token = _draw(torch.where(stuck[:, None], log_q, log_r))
            token.masked_fill_(ended, pad)
            x[:, t] = token
            done = ended | (token == eos)
            final = last or ((t + 1) % sync_every == 0 and bool(done.all()))
            if full and final == last:
                # "full": the drawn token's potential was scored already, and exactly
                new_phi = cand_phi.gather(0, token[None]).squeeze(0)
                inc = torch.where(ended, new_phi - phi, log_l)
            else:
                new_phi = self._potential(view, t + 1, final, args, kwargs)
                inc = new_phi - phi
                if look:
                    hat = delta_hat.gather(-1, token[:, None]).squeeze(-1)
                    inc += (log_l - hat).masked_fill_(ended, 0.0)
            if decoder_p is not None:
                log_p = decoder_p.logits.log_softmax(-1)
                log_ratio = log_p - (log_q if look else logits.log_softmax(-1))
                inc += log_ratio.gather(-1, token[:, None]).squeeze(-1).masked_fill_(ended, 0.0)
            # a particle whose potential was already -inf stays dead (avoid -inf - -inf)
            dead = torch.isneginf(phi)
            if look:
                dead |= stuck & ~ended
            log_w += inc.masked_fill_(dead, -math.inf)
            phi = new_phi
            weights = log_w.view(n, b)
            lse = weights.logsumexp(0)  # (B,)
            lse2 = (2 * weights).logsumexp(0)
            lse_hist.append(lse)
            lse2_hist.append(lse2)
            if final:
                resampled_hist.append(False if single else
                                      torch.zeros(b, dtype=torch.bool, device=device))
                break
            if single:  # one prompt on the host: decide with one scalar read
                need = torch.sub(lse2, lse, alpha=2).item() > log_bound
                act = need
            else:
                need = torch.sub(lse2, lse, alpha=2) > log_bound  # (B,)
                act = not on_cpu or bool(need.any())
            resampled_hist.append(need)
            if act:
                ancestors = RESAMPLERS[self.resampling](weights)  # (N, B)
                log_mean = lse - math.log(n)
                if single:
                    index = ancestors.reshape(-1)
                    log_w.copy_(log_mean.expand(rows))
                else:  # the prompts that do not need it keep their particles
                    index = (torch.where(need, ancestors, keep) * b + offsets).reshape(-1)
                    log_w = torch.where(need, log_mean, weights).reshape(-1)
                x = x.index_select(0, index)
                view = x.view(view.shape)
                done = done.index_select(0, index)
                phi = phi.index_select(0, index)
                token = x[:, t]
                decoder_q.reorder(index, logits=False)  # advance replaces them
                if decoder_p is not None:
                    decoder_p.reorder(index, logits=False)
            # ended rows are fed a non-pad filler (their outputs are unused), so transformers
            # does not take them for unmasked padding
            token = token.masked_fill(done, decoder_q.filler_token)
            decoder_q.advance(token)
            if decoder_p is not None:
                decoder_p.advance(token)
        resampled = (torch.tensor(resampled_hist, dtype=torch.bool, device=device)[:, None]
                     if single else torch.stack(resampled_hist))
        hist = {"lse": torch.stack(lse_hist), "lse2": torch.stack(lse2_hist),
                "resampled": resampled}
        return view, log_w, hist

    def _posterior(self, view, log_w, batch, hist, lm):
        n = self.num_particles
        log_w = log_w.view((n,) + tuple(batch))
        check_log_weights(
            log_w, "SMC", nan_cause="the twist or a factor returned NaN (or +inf) on some prefix",
            fix="Use more particles, a guide closer to the posterior, the lookahead proposal, "
                "or a twist that steers prefixes away from the -inf region")
        shape = (-1,) + tuple(batch)
        lse, lse2 = hist["lse"], hist["lse2"]
        hist = {"ess": torch.exp(2 * lse - lse2).view(shape),
                "resampled": hist["resampled"].view(shape),
                "log_Z": (lse - math.log(n)).view(shape)}
        log_z = torch.logsumexp(log_w, 0) - math.log(n)
        return WeightedPosterior({self._site: view}, log_w, lms={self._site: lm},
                                 log_normalizer=log_z, history=hist)
