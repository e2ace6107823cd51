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

The particles and their resampling are
:class:`~pyro_lm.infer.smc_population.Populations`; the two proposals are in
:mod:`pyro_lm.infer.smc_proposals`. Everything a run needs is made by that run, so
an :class:`SMC` object may be run again from inside one of its runs (from a twist or
a reward).

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

from pyro_lm._validation import as_real_tensor, check_positive_int
from pyro_lm.constraints.base import TRUNCATION_HINT, check_constraints, check_sites
from pyro_lm.distributed import sharded
from pyro_lm.distributions.lm_distribution import prompt_cache
from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.infer.posterior import WeightedPosterior, check_log_weights
from pyro_lm.infer.program import (
    latent_site_names,
    lm_site_names,
    single_lm_site,
    structure_trace,
)
from pyro_lm.infer.proposal import check_guide_constraints
from pyro_lm.infer.resampling import RESAMPLERS
from pyro_lm.infer.smc_population import Populations, decode
from pyro_lm.infer.smc_program import run_program
from pyro_lm.infer.smc_proposals import BootstrapProposal, LookaheadProposal
from pyro_lm.infer.smc_steps import StepEnds, check_steps, gated_potential
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.lm.decoding import make_decoder
from pyro_lm.ops.stats import log_normalizer
from pyro_lm.poutine import LogFactorsMessenger
from pyro_lm.rewards.incremental import RewardStates

__all__ = ["SMC"]


def _check_lookahead(lookahead):
    if lookahead is None or lookahead == "full":
        return lookahead
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead: expected None, 'full' or a positive int k (the top-k "
                         f"tokens of the proposal), got {lookahead!r}")
    return lookahead


class SMC:
    r"""Token-level SMC over a program's :class:`~pyro_lm.LMDistribution` sites.

    A program with one LM site and no other latent site runs the token-level loop
    below (with the options ``twist`` and ``lookahead``). Any other program (several
    LM sites, chained or not; latent sites that choose prompts; observed text) runs as
    SMC over a program (:mod:`pyro_lm.infer.smc_program`): the LM sites are decoded one
    after another, token by token, with each particle's own prompts, other latent sites
    are *sampled* from their prior when the program reaches them (not enumerated), and
    the factors are re-evaluated on the partial program; there the proposal is the
    bootstrap one (no ``twist``, no ``lookahead``) and every LM site must lie in every
    plate that the weights keep.

    :param model: a Pyro model: LM sample sites inside any plates, other latent sites,
        factors, observed text.
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
    :param steps: where potentials are applied and resampling decided:
        ``"token"`` (default: every token), an int ``k`` (every ``k`` tokens),
        ``"word"`` (before each token that starts a new word) or a delimiter regex
        (where the completion's text ends with a match, e.g. ``r"[.!?]\s"`` or
        ``"\n"``); exact for any of them (:mod:`pyro_lm.infer.smc_steps`). Other
        than ``"token"`` it takes the bootstrap proposal (``lookahead=None``).
    :param int lookahead_budget: bytes that the lookahead's candidate prefixes may
        take: its ``(C N B, T)`` int64 token buffer, ``8 C N B T`` bytes with
        ``C = V`` for ``"full"`` (``k`` for an int), is checked against it before
        the run, which is refused naming ``lookahead=k`` above it; the potential's
        own memory per candidate prefix comes on top. Default ``2**26`` (64 MiB).
    :param dict constraints: LM site name → :class:`~pyro_lm.constraints.Constraint`
        (``Regex``, ``Grammar``, ``JSONSchema``): the site's tokens are drawn from the
        proposal restricted to the tokens that can still lead to a valid text (EOS only
        where the text is valid), and each weight gains the log of the allowed mass, the
        locally optimal proposal for the constraint's 0 / ``-inf`` potential
        (:mod:`pyro_lm.infer.smc_proposals`); the target is the model's posterior
        conditioned on the constraint (with or without ``pyro.factor("valid", c(x))`` in
        the model, which the mask makes redundant). One-LM-site programs only.

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
                 lookahead=None, steps="token", lookahead_budget: int = 2**26,
                 constraints=None):
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
        if not isinstance(resampling, str) or resampling not in RESAMPLERS:
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
        self.steps = check_steps(steps)
        if self.steps != "token" and self.lookahead is not None:
            raise ValueError(f"steps: the lookahead proposal scores the potential of every "
                             f"next token, so it runs with steps='token'; pass lookahead=None "
                             f"for steps={steps!r}, or steps='token'")
        self.lookahead_budget = check_positive_int(lookahead_budget, "lookahead_budget")
        self.constraints = check_constraints(constraints, "SMC")
        check_guide_constraints(guide, self.constraints, "guide", "SMC")

    # --------------------------------------------------------------------- run
    @sharded  # torch.distributed: prompts sharded across ranks, posterior gathered
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Run SMC on the model's arguments; see the class docstring."""
        # the model runs once per token on the same prompts; incremental rewards keep their
        # states across those runs (and check NaN once, here)
        with torch.no_grad(), prompt_cache(), RewardStates() as states:
            try:
                return self._run_checked(args, kwargs)
            finally:  # a NaN reward may have derailed the run: name it first
                states.check()

    def _run_checked(self, args, kwargs) -> WeightedPosterior:
        # the first run of the model (params, reward caches) is outside inference mode
        trace, _ = structure_trace(self.model, None, args, kwargs)
        if not _one_lm_site(trace):
            return self._run_program(args, kwargs, trace)
        site, prior, batch = single_lm_site(self.model, args, kwargs, owner="SMC", trace=trace)
        check_sites(self.constraints, {site: prior.lm}, "SMC")
        check_twist = getattr(self.twist, "check_site", None)  # e.g. ValueTwist's
        if callable(check_twist):
            check_twist(prior, "SMC")
        proposal = prior if self.guide is None else prior.with_lm(self.guide.lm)
        potential = _Potential(self.model, site, batch, self.twist, args, kwargs)
        with torch.inference_mode():  # the loop: less overhead per tensor operation
            pop = self._run(prior, proposal, batch, potential, self.constraints.get(site))
            x, log_w, hist = pop.values, pop.log_w, pop.history()
        # inference tensors must not escape (autograd refuses them): copy them out
        x, log_w = x.clone(), log_w.clone()
        hist = {k: v.clone() for k, v in hist.items()}
        return self._posterior(site, x, log_w, batch, hist, prior.lm)

    def _run(self, prior, proposal, batch, potential, constraint=None) -> Populations:
        n, big_t = self.num_particles, prior.max_new_tokens
        lead = batch[: len(batch) - len(prior.batch_shape)]  # plate dims the site is not in
        ids, mask = prior.prompts_for(torch.Size((n,)) + lead)
        sync_every = self.sync_every or (1 if ids.device.type == "cpu" else 8)
        decoder_q = make_decoder(proposal.lm, ids, mask, big_t)
        decoder_p = make_decoder(prior.lm, ids, mask, big_t) if proposal is not prior else None
        decoders = (decoder_q,) if decoder_p is None else (decoder_q, decoder_p)
        shape = torch.Size((n,)) + batch
        eos, pad = prior.lm.eos_token_ids, prior.lm.pad_token_id
        pop = Populations(shape, big_t, eos, pad, self.ess_threshold, self.resampling, decoders,
                          ids.device)
        mask = None if constraint is None else constraint.state(shape.numel(), ids.device)
        steps = None if self.steps == "token" else StepEnds(
            self.steps, prior.lm.tokenizer, decoder_q.logits.shape[-1], shape.numel(),
            ids.device)
        if self.lookahead is None:
            if steps is not None:
                potential = gated_potential(potential, pop, subset=True)
            step = BootstrapProposal(potential, decoder_q, decoder_p, mask=mask)
        else:
            top_k = None if self.lookahead == "full" else self.lookahead
            self._check_budget(decoder_q.logits.shape[-1], shape.numel(), big_t)
            step = LookaheadProposal(potential, decoder_q, decoder_p, top_k, shape, pad,
                                     mask=mask)
        return decode(pop, step, sync_every, None if mask is None else mask.reorder, steps=steps)

    def _check_budget(self, vocab: int, rows: int, big_t: int) -> None:
        """Refuse a lookahead whose candidate prefixes exceed ``lookahead_budget`` bytes."""
        c = vocab if self.lookahead == "full" else min(self.lookahead, vocab)
        need = 8 * c * rows * big_t
        if need > self.lookahead_budget:
            raise ValueError(
                f"lookahead={self.lookahead!r}: scoring {c} next tokens for {rows} particles "
                f"x prompts over {big_t} tokens needs a ({c * rows}, {big_t}) buffer of "
                f"candidate prefixes, {need / 2**20:.0f} MiB (and the potential's own memory "
                f"per candidate on top), above lookahead_budget={self.lookahead_budget} bytes; "
                f"use lookahead=k with a small k (e.g. lookahead=32: the proposal's top-k "
                f"next tokens, still exact), fewer particles, or raise lookahead_budget")

    def _run_program(self, args, kwargs, trace) -> WeightedPosterior:
        """SMC over a whole program (:mod:`pyro_lm.infer.smc_program`)."""
        if self.constraints:
            raise ValueError("constraints: SMC masks the tokens of a program with one LM site "
                             "and no other latent site; over a program (several LM sites, or "
                             "other latent sites) put each constraint in the model as a factor, "
                             "pyro.factor('valid', c(x)) (exact on prefixes), or use Importance "
                             "with constraints=")
        if self.twist is not None or self.lookahead is not None:
            raise ValueError("twist: SMC over a program (several LM sites, or other latent "
                             "sites) uses the bootstrap proposal and the model's factors; pass "
                             "twist=None and lookahead=None")
        with torch.inference_mode():
            values, log_w, hists, lms, batch = run_program(self, args, kwargs, trace)
        # inference tensors must not escape (autograd refuses them): copy them out, outside
        # inference mode (a clone inside it is an inference tensor too)
        values = {k: v.clone() for k, v in values.items()}
        log_w = log_w.clone()
        hist = {key: torch.cat([h[key] for h in hists]).clone() for key in
                ("lse", "lse2", "resampled")} if hists else None
        if hist is None:  # nothing decoded: one step, the final weights
            lse = torch.logsumexp(log_w, 0)[None]
            hist = {"lse": lse, "lse2": torch.logsumexp(2 * log_w, 0)[None],
                    "resampled": torch.zeros(lse.shape, dtype=torch.bool, device=lse.device)}
        return self._posterior(values, None, log_w.reshape(-1), batch, hist, lms)

    def _posterior(self, site, view, log_w, batch, hist, lm):
        n = self.num_particles
        log_w = log_w.view((n,) + tuple(batch))
        fix = ("Use more particles, a guide closer to the posterior, the lookahead proposal, "
               "or a twist that steers prefixes away from the -inf region")
        if self.constraints:
            fix = TRUNCATION_HINT + fix
        check_log_weights(
            log_w, "SMC", nan_cause="the twist or a factor returned NaN (or +inf) on some prefix",
            fix=fix)
        shape = (-1,) + tuple(batch)
        lse, lse2 = hist["lse"], hist["lse2"]
        hist = {"ess": torch.exp(2 * lse - lse2).view(shape),
                "resampled": hist["resampled"].view(shape),
                "log_Z": (lse - math.log(n)).view(shape)}
        samples, lms = (site, lm) if isinstance(site, dict) else ({site: view}, {site: lm})
        return WeightedPosterior(samples, log_w, lms=lms,
                                 log_normalizer=log_normalizer(log_w), history=hist,
                                 algorithm="SMC")


class _Potential:
    """The log-potential of prefixes in one SMC run: the model's factors (on prefixes inside
    :func:`~pyro_lm.distributions.prefix_context`, in full at the end) or the twist.

    :param model: the Pyro model; ``site``, ``batch``: its LM site and plates' shape.
    :param twist: ``None`` or ``twist(x, t) -> (N, *batch)``.
    :param tuple args: the model's arguments; ``kwargs`` likewise.
    """

    def __init__(self, model, site, batch, twist, args, kwargs):
        self.factors = LogFactorsMessenger(model, site, batch, owner="SMC")
        self.twist, self.args, self.kwargs = twist, args, kwargs

    def __call__(self, x, t, final):
        """``(M * B,)`` log-potential of the prefixes ``x`` ``(M, *batch, T)`` of length ``t``,
        flattened particle-major (row ``i * B + j``, like the decoding rows)."""
        if final or self.twist is None:
            # no particle plate: the values carry the particle dim on the left, and the
            # model's plates broadcast around it (saves re-expanding the LM site per token)
            if final:
                phi = self.factors.evaluate(x, self.args, self.kwargs)
            else:
                with prefix_context(t):
                    phi = self.factors.evaluate(x, self.args, self.kwargs)
            name = "factors"
        else:
            with prefix_context(t):
                phi, name = self.twist(x, t), "twist"
        if isinstance(phi, torch.Tensor) and phi.dtype == torch.float32 \
                and phi.shape == x.shape[:-1]:
            return phi.reshape(-1)
        phi = as_real_tensor(phi, x.device, name, f"real values, one per particle and prompt "
                             f"{tuple(x.shape[:-1])}").float()
        try:
            return phi.expand(x.shape[:-1]).reshape(-1)
        except RuntimeError:
            raise ValueError(f"{name}: returned shape {tuple(phi.shape)}, expected one value per "
                             f"particle and prompt {tuple(x.shape[:-1])}") from None


def _one_lm_site(trace) -> bool:
    """Whether the program's only latent site is one LM site (SMC's token-level fast path)."""
    return len(latent_site_names(trace)) == 1 and len(lm_site_names(trace)) == 1
