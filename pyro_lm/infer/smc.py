r"""Token-level sequential Monte Carlo over a model's LM site.

SMC drives the LM site one token at a time with ``N`` particles per prompt.
With proposal :math:`q` (a guide's LM, or the prior itself), potentials
:math:`\Phi_t(x_{\le t})` (the model's log-factors evaluated on the prefix, or
a learned ``twist``) and the true log-factor :math:`\Phi_T = \sum_k f_k(x)` at
the end, the log-weights evolve as

.. math::

    \log w_0 = \Phi_0, \qquad
    \log w_t = \log w_{t-1}
      + \log \frac{p_0(x_t \mid x_{<t})}{q(x_t \mid x_{<t})}
      + \Phi_t(x_{\le t}) - \Phi_{t-1}(x_{<t}).

The potentials telescope, so whatever :math:`\Phi_t` is for ``t < T`` the
final weights are :math:`p_0(x)\, e^{\Phi_T(x)} / q(x)` and target
:math:`p^*(x) \propto p_0(x) \exp(\sum_k f_k(x))` exactly; good intermediate
potentials only lower the variance. When a prompt's effective sample size
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

import contextlib
import math

import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.exact import unwrap
from pyro_lm.infer.importance import _check_count, model_structure, reduce_to_batch
from pyro_lm.infer.posterior import WeightedPosterior
from pyro_lm.infer.resampling import RESAMPLERS
from pyro_lm.lm.decoding import IncrementalDecoder

__all__ = ["SMC"]


class _Factors(Messenger):
    """Gives the LM site a fixed value and sums every observed site's log-density,
    reduced to ``(N, *batch)``, without recording a trace. Messages stop here:
    nothing outside sees the evaluation."""

    def __init__(self, site: str, value: torch.Tensor, batch_shape: torch.Size):
        super().__init__()
        self.site, self.value, self.batch_shape = site, value, batch_shape
        self.total = 0.0

    def _pyro_sample(self, msg):
        msg["stop"] = True
        if site_is_subsample(msg):
            return
        if msg["name"] == self.site:
            msg["value"], msg["is_observed"], msg["done"] = self.value, True, True
        elif msg["is_observed"]:
            log_prob = scale_and_mask(msg["fn"].log_prob(msg["value"]), msg["scale"], msg["mask"])
            self.total = self.total + reduce_to_batch(log_prob, self.batch_shape, msg["name"])
        else:
            raise ValueError(f"model: latent site {msg['name']!r} besides the LM site "
                             f"{self.site!r}; SMC infers one LM site (condition the others)")

    def _pyro_param(self, msg):
        msg["stop"] = True


class SMC:
    r"""Token-level SMC for a model with one :class:`~pyro_lm.LMDistribution` site.

    :param model: a Pyro model: one LM sample site, inside any plates, and factors.
    :param guide: ``None`` to propose tokens from the prior, or a guide exposing
        ``get_lm_sites`` (:class:`~pyro_lm.infer.AutoLMGuide`) whose LM proposes them.
    :param int num_particles: ``N``, particles per prompt.
    :param float ess_threshold: resample a prompt's particles when
        :math:`\mathrm{ESS} < \text{ess\_threshold} \cdot N`; 0 never resamples
        (sequential importance sampling), 1 resamples at every step.
    :param twist: ``None`` (potentials are the model's factors on prefixes,
        evaluated inside :func:`~pyro_lm.distributions.prefix_context`), or a
        callable ``twist(x, t) -> (N, *batch)`` log-potential of the prefixes of
        length ``t < T`` (``x`` is ``(N, *batch, T)``, padded past ``t``).
    :param str resampling: ``"systematic"`` (default) or ``"multinomial"``.
    :param int sync_every: check every this many tokens whether all particles
        have ended (a host sync); default 1 on CPU, 8 on accelerators.

    ``run(*args, **kwargs)`` returns a :class:`~pyro_lm.infer.WeightedPosterior`
    whose ``log_normalizer()`` is the SMC estimate of :math:`\log Z` per prompt
    and whose ``history`` holds ``"ess"`` (before resampling), ``"resampled"``
    and the running ``"log_Z"``, each ``(T', *batch)``.
    """

    def __init__(self, model, guide=None, num_particles: int = 100, ess_threshold: float = 0.5,
                 twist=None, resampling: str = "systematic", sync_every: int | None = None):
        if not callable(model):
            raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
        if guide is not None and not hasattr(guide, "get_lm_sites"):
            raise TypeError("guide: SMC proposes tokens from a guide's LM, so the guide must "
                            "expose get_lm_sites (use pyro_lm.infer.AutoLMGuide), or pass None "
                            "to propose from the prior")
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
        self.num_particles = _check_count(num_particles, "num_particles")
        self.ess_threshold = float(ess_threshold)
        self.twist = twist
        self.resampling = resampling
        self.sync_every = None if sync_every is None else _check_count(sync_every, "sync_every")

    # ------------------------------------------------------------------ set-up
    def _lm_site(self, args, kwargs):
        trace, names, nesting = model_structure(self.model, *args, **kwargs)
        if len(names) != 1:
            raise ValueError(f"model: SMC drives exactly one LM site, the model has {names}; "
                             "condition the others (pyro.condition) or use Importance")
        latent = [n for n, s in trace.nodes.items() if s["type"] == "sample"
                  and not s["is_observed"] and not site_is_subsample(s) and n != names[0]]
        if latent:
            raise ValueError(f"model: latent sites {latent} besides the LM site {names[0]!r}; "
                             "SMC infers one LM site (condition the others)")
        fn = trace.nodes[names[0]]["fn"]
        prior = unwrap(fn)
        if fn is not prior:
            raise ValueError(f"model: site {names[0]!r} wraps its LMDistribution (mask, "
                             "to_event, ...); SMC needs the plain distribution")
        batch = torch.Size((1,) * (nesting - len(fn.batch_shape)) + tuple(fn.batch_shape))
        proposal = prior
        if self.guide is not None:
            sites = {name: dist for name, dist, _ in self.guide.get_lm_sites(*args, **kwargs)}
            if names[0] not in sites:
                raise ValueError(f"guide: it has no LM site {names[0]!r} (has {sorted(sites)})")
            proposal = sites[names[0]]
        return names[0], prior, proposal, batch, nesting

    def _potential(self, x, t, final, args, kwargs):
        """``(N, B)`` log-potential of the prefixes ``x`` ``(N, *batch, T)`` of length ``t``."""
        n = x.shape[0]
        context = contextlib.nullcontext() if final else prefix_context(t)
        with context:
            if self.twist is not None and not final:
                phi = torch.as_tensor(self.twist(x, t), device=x.device)
                name = "twist"
            else:
                # no particle plate: the values carry the particle dim on the left, and the
                # model's plates broadcast around it (saves re-expanding the LM site per token)
                factors = _Factors(self._site, x, self._batch)
                factors(self.model)(*args, **kwargs)
                phi = torch.as_tensor(factors.total, dtype=torch.float32, device=x.device)
                name = "factors"
        try:
            return phi.float().expand(x.shape[:-1]).reshape(n, -1)
        except RuntimeError:
            raise ValueError(f"{name}: returned shape {tuple(phi.shape)}, expected one value per "
                             f"particle and prompt {tuple(x.shape[:-1])}") from None

    # --------------------------------------------------------------------- run
    @torch.no_grad()
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Run SMC on the model's arguments; see the class docstring."""
        site, prior, proposal, batch, nesting = self._lm_site(args, kwargs)
        self._site, self._batch, self._nesting = site, batch, nesting
        n, big_t = self.num_particles, prior.max_new_tokens
        b = batch.numel()
        lm_q, lm_p = proposal.lm, prior.lm
        eos, pad = lm_p.eos_token_id, lm_p.pad_token_id
        lead = batch[: len(batch) - len(prior.batch_shape)]  # plate dims the site is not in
        ids, mask = prior.prompts_for(torch.Size((n,)) + lead)
        device = ids.device
        sync_every = self.sync_every or (1 if device.type == "cpu" else 8)
        decoder_q = IncrementalDecoder(lm_q, ids, mask, big_t)
        decoder_p = IncrementalDecoder(lm_p, ids, mask, big_t) if proposal is not prior else None
        rows = n * b
        x = torch.full((rows, big_t), pad, dtype=torch.long, device=device)
        view = x.view((n,) + tuple(batch) + (big_t,))
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        pad_t = torch.tensor(pad, dtype=torch.long, device=device)
        phi = self._potential(view, 0, False, args, kwargs)
        log_w = phi.clone()  # (N, B)
        offsets = torch.arange(b, device=device)
        keep = torch.arange(n, device=device)[:, None].expand(n, b)
        never = torch.zeros(b, dtype=torch.bool, device=device)
        ess_hist, resampled_hist, log_z_hist = [], [], []
        for t in range(big_t):
            logits = decoder_q.logits
            # Gumbel-max: argmax(logits - log E), E = -log U ~ Exp(1), draws from softmax(logits)
            token = (logits - torch.rand_like(logits).log_().neg_().log_()).argmax(-1)
            if decoder_p is not None:
                log_q = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
                log_p = decoder_p.logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
                log_w += (log_p - log_q).masked_fill(done, 0.0).view(n, b)
            token = torch.where(done, pad_t, token)
            x[:, t] = token
            done = done | (token == eos)
            final = t + 1 == big_t
            if not final and (t + 1) % sync_every == 0 and bool(done.all()):
                final = True  # every particle has ended: score the complete sequences
            new_phi = self._potential(view, t + 1, final, args, kwargs)
            # a particle whose potential was already -inf stays dead (avoid -inf - -inf)
            log_w += (new_phi - phi).masked_fill_(torch.isneginf(phi), -math.inf)
            phi = new_phi
            lse = torch.logsumexp(log_w, 0)  # (B,)
            log_mean = lse - math.log(n)
            ess = torch.exp(2 * lse - torch.logsumexp(2 * log_w, 0))
            ess_hist.append(ess)
            log_z_hist.append(log_mean)
            if final:
                resampled_hist.append(never)
                break
            need = ess < self.ess_threshold * n
            resampled_hist.append(need)
            if device.type != "cpu" or bool(need.any()):
                ancestors = RESAMPLERS[self.resampling](log_w)
                ancestors = torch.where(need, ancestors, keep)
                index = (ancestors * b + offsets).reshape(-1)
                x.copy_(x.index_select(0, index))
                done = done.index_select(0, index)
                phi = phi.reshape(-1).index_select(0, index).view(n, b)
                log_w = torch.where(need, log_mean.expand(n, b), log_w)
                decoder_q.reorder(index)
                if decoder_p is not None:
                    decoder_p.reorder(index)
            token = x[:, t].contiguous()  # reordered with the particles
            decoder_q.advance(token)
            if decoder_p is not None:
                decoder_p.advance(token)
        return self._posterior(view, log_w, batch, ess_hist, resampled_hist, log_z_hist, lm_p)

    def _posterior(self, view, log_w, batch, ess_hist, resampled_hist, log_z_hist, lm):
        n = self.num_particles
        log_w = log_w.view((n,) + tuple(batch))
        if torch.isnan(log_w).any():
            raise ValueError("SMC: NaN log-weights; the twist or a factor returned NaN "
                             "(or +inf) on some prefix")
        dead = torch.isneginf(log_w).all(0)
        if dead.any():
            which = dead.reshape(-1).nonzero().flatten()[:8].tolist()
            raise ValueError(
                f"SMC: all {n} particles have weight zero (log-weight -inf) for batch "
                f"element(s) {which}: no particle satisfied the model's hard constraints. Use "
                "more particles, a guide closer to the posterior, or a twist that steers "
                "prefixes away from the -inf region")
        hist = {"ess": torch.stack(ess_hist).view((-1,) + tuple(batch)),
                "resampled": torch.stack(resampled_hist).view((-1,) + tuple(batch)),
                "log_Z": torch.stack(log_z_hist).view((-1,) + tuple(batch))}
        log_z = torch.logsumexp(log_w, 0) - math.log(n)
        return WeightedPosterior({self._site: view.clone()}, log_w, lms={self._site: lm},
                                 log_normalizer=log_z, history=hist)
