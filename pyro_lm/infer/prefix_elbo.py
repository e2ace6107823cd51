r"""Per-token credit assignment for the sequence ELBO.

:class:`PrefixSequenceELBO` is :class:`~pyro_lm.infer.SequenceELBO` with
``baseline="prefix"`` (which is how it is usually made): the same objective and the
same unbiased score-function gradient, with the credit assigned per token, as
:class:`pyro.infer.TraceGraph_ELBO` is :class:`pyro.infer.Trace_ELBO` with
dependency-aware baselines.

Write :math:`\log q(x) = \sum_t \ell^q_t`, :math:`\ell^q_t = \log q(x_t \mid x_{<t})`
(likewise :math:`\ell^p_t` for :math:`p_0`), :math:`F` the summed factors and
:math:`\Phi_s(x_{\le s})` the factors evaluated on the prefix of length :math:`s` (as
token-level SMC does; see :mod:`pyro_lm.distributions.prefix`):

.. math:: \Phi_t(x_{\le t}) = \sum_k f_k(x_{1:t}),

each factor evaluated inside :func:`~pyro_lm.distributions.prefix_context` ``(t)`` on
the value with positions ``>= t`` set to ``pad_token_id`` (how rewards see a
partially generated completion). Since :math:`E_q[\nabla \ell^q_t \, b(x_{<t})] = 0`
for *any* function :math:`b` of the prefix,

.. math::

    g_{k,t} = F(x_k) - \Phi_{t-1}(x_{k,<t})
        + w \sum_{s \ge t} \big(\ell^p_s - \ell^q_s\big)(x_k), \qquad
    A_{k,t} = g_{k,t} - \operatorname{mean}_{j \ne k,\ j \text{ generating } t}\, g_{j,t},

    \nabla_\theta \mathrm{ELBO} \approx \frac1K \sum_{k=1}^K \sum_{t=1}^T A_{k,t}\,
        \nabla_\theta \ell^q_t(x_k)

is still unbiased: the KL terms of earlier tokens are dropped (reward-to-go [1]), the
prefix potential :math:`\Phi_{t-1}` is a state-dependent baseline [2, 3], and the
leave-one-out mean per position is a baseline built from the other particles [4]. For
a reward that is a sum over tokens (e.g. :class:`~pyro_lm.rewards.Lexicon`),
:math:`F - \Phi_{t-1}` is the reward collected from token :math:`t` on.

References

[1] R. J. Williams, *Simple statistical gradient-following algorithms for
    connectionist reinforcement learning*, Machine Learning 8, 1992.
[2] L. Weaver, N. Tao, *The optimal reward baseline for gradient-based reinforcement
    learning*, UAI 2001.
[3] E. Greensmith, P. L. Bartlett, J. Baxter, *Variance reduction techniques for
    gradient estimates in reinforcement learning*, JMLR 5, 2004.
[4] W. Kool, H. van Hoof, M. Welling, *Buy 4 REINFORCE Samples, Get a Baseline for
    Free!*, ICLR 2019 DeepRLStructPred workshop.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from pyro_lm.distributions.lm_distribution import after_first_eos, prompt_cache, unwrap_lm
from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.infer.elbo import SequenceELBO
from pyro_lm.infer.program import lm_site_names
from pyro_lm.poutine import LogFactorsMessenger
from pyro_lm.rewards.incremental import RewardStates

__all__ = ["PrefixSequenceELBO", "prefix_factors"]


class PrefixSequenceELBO(SequenceELBO):
    r"""The sequence ELBO with per-token credit: ``SequenceELBO(baseline="prefix")``.

    Token :math:`t` of particle :math:`k` gets (see the module docstring)

    .. math::

        A_{k,t} = g_{k,t} - \operatorname{mean}_{j \ne k} g_{j,t}, \qquad
        g_{k,t} = F(x_k) - \Phi_{t-1}(x_{k,<t})
                  + w \textstyle\sum_{s \ge t} \log \frac{p_0}{q}(x_{k,s} \mid x_{k,<s}),

    and the surrogate is :math:`\frac1K \sum_{k,t} A_{k,t} \log q(x_{k,t} \mid x_{k,<t})`
    instead of :math:`\frac1K \sum_k A_k \log q(x_k)`. Here :math:`F` is the sum of
    the model's factors and :math:`\Phi_{t-1}` the same factors evaluated on the
    prefix :math:`x_{<t}` (inside :func:`~pyro_lm.distributions.prefix_context`, as
    token-level SMC sees them; :math:`\Phi_0 := 0`); the mean runs over the other
    particles of the same prompt that are still generating at :math:`t` (not ended
    by EOS). Every baseline term is a function of the prefix or of other particles,
    so the gradient stays unbiased for any reward; it removes the most where the
    reward is a sum over tokens (:class:`~pyro_lm.rewards.Lexicon`), where
    :math:`F - \Phi_{t-1}` is the reward-to-go. On the peers' task (bench/svi.py:
    vocab 64, 20 tokens, a sparse count reward) its gradient variance at the prior
    is about 0.4× Trace_ELBO's, against 0.75× with ``"loo"``, and lower than
    ``"loo"``'s along training too. Cost: one run of the model (its factors only, no
    trace, no gradient) per prefix length up to the longest completion, ``T - 1``
    per step (per particle when ``vectorize=False``): cheap for vectorised rewards,
    ``T`` times the reward's cost in general (e.g. a classifier). Scope: the model's
    only latent site is one plain :class:`~pyro_lm.LMDistribution` site (inside any
    plates), and the guide samples only it; other models are a ``ValueError``.

    The parameters, :attr:`metrics` and methods are those of
    :class:`~pyro_lm.infer.SequenceELBO`; ``baseline`` can only be ``"prefix"``.

    :param int num_particles: completions per prompt ``K`` (at least 2).
    """

    def __init__(self, num_particles: int = 8, baseline: str = "prefix", vectorize: bool = True,
                 kl_weight: float = 1.0, max_plate_nesting: float = float("inf"),
                 retain_graph: bool | None = None):
        if baseline != "prefix":
            raise ValueError(f"baseline: PrefixSequenceELBO credits tokens with the prefix "
                             f"baseline, so it takes only baseline='prefix', got {baseline!r}; "
                             "use SequenceELBO for the others")
        super().__init__(num_particles, baseline, vectorize, kl_weight, max_plate_nesting,
                         retain_graph)

    def _get_trace(self, model, guide, args, kwargs):
        """As :func:`pyro.infer.enum.get_importance_trace`, but the LM site is scored per
        token: its ``token_log_prob`` ``(..., T)`` (unscaled) is kept in the site of both
        traces, and its ``log_prob`` / ``score_parts`` are their sums (one forward each)."""
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        name = _token_site(model_trace, guide_trace)
        for trace in (model_trace, guide_trace):
            site = trace.nodes[name]
            tokens = site["fn"].token_log_probs(site["value"])
            site["token_log_prob"] = tokens
            site["unscaled_log_prob"] = tokens.sum(-1)
            parts = ScoreParts(site["unscaled_log_prob"], site["unscaled_log_prob"], 0)
            parts = parts.scale_and_mask(site["scale"], site["mask"])
            if trace is guide_trace:
                site["score_parts"] = parts
            site["log_prob"] = parts.log_prob
            site["log_prob_sum"] = parts.log_prob.sum()
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _learning_signal(self, model_trace, guide_site, score, log_f, log_l, model, args,
                         kwargs, need_signals):
        # the guide samples only the LM site (_token_site), which _get_trace scored per token
        return self._token_signal(model_trace.nodes[guide_site["name"]], guide_site, log_f,
                                  model, args, kwargs, need_signals)

    def _token_signal(self, model_site, guide_site, log_f, model, args, kwargs,
                      with_prefix: bool):
        r"""Per-token score, signal and activity of the LM site.

        :returns: ``(score, signal, active)``, each ``(k, *batch, T)``: the guide's
            unscaled token log-probs :math:`\log q(x_t \mid x_{<t})` (differentiable),
            :math:`g_t = F - \Phi_{t-1}(x_{<t}) + w \sum_{s \ge t} (\log p_0 - \log q)_s`
            (detached; :math:`\Phi` is taken to be 0 where ``with_prefix`` is false), and
            whether token ``t`` is generated (not after the first EOS).
        """
        value, dist = guide_site["value"], guide_site["fn"]  # value: (k, *batch, T)
        score = guide_site["token_log_prob"]
        log_p = _tokens_scaled(model_site["token_log_prob"].detach(), model_site)
        log_q = _tokens_scaled(score.detach(), guide_site)
        to_go = (log_p - log_q).flip(-1).cumsum(-1).flip(-1)  # sum over s >= t
        signal = torch.as_tensor(log_f, dtype=to_go.dtype, device=to_go.device)[..., None]
        signal = signal + self.kl_weight * to_go
        active = ~after_first_eos(value, dist.lm.eos_token_ids)
        if with_prefix:
            # Phi_0 (the empty prefix) is the same for every particle of a prompt: the
            # leave-one-out mean removes it, so it is taken to be 0 rather than evaluated.
            # Tokens that no particle generates (all ended before) have a zero score, so
            # prefixes are evaluated only up to the longest completion (one host sync).
            big_t = value.shape[-1]
            live = int(active.reshape(-1, big_t).any(0).sum())
            try:
                phi = prefix_factors(model, guide_site["name"], value, range(1, live),
                                     dist.lm.pad_token_id, args, kwargs,
                                     owner="baseline='prefix'")  # (live - 1, k, *batch)
            except ValueError as e:
                raise ValueError(f"baseline='prefix': evaluating the model's factors on "
                                 f"prefixes failed: {e}. Fix the model, or use "
                                 "baseline='loo'") from e
            phi = torch.nn.functional.pad(phi.movedim(0, -1), (1, big_t - live))
            signal = signal - phi
        return score, torch.broadcast_to(signal, score.shape), active

    def _advantage(self, signal, active, pdim):
        """Per token: the signal minus the mean of the other particles generating token t."""
        signal_in = torch.where(active, signal, torch.zeros_like(signal))
        count = active.sum(pdim, keepdim=True) - active.long()
        others = (signal_in.sum(pdim, keepdim=True) - signal_in) / count.clamp(min=1)
        return signal - others


@torch.no_grad()
def prefix_factors(model, site: str, value: torch.Tensor, lengths, pad: int, args=(),
                   kwargs=None, owner: str = "model") -> torch.Tensor:
    r"""The potentials :math:`\Phi_t` of ``value``'s prefixes, one model run per length
    (rewards with an incremental form, :mod:`pyro_lm.rewards.incremental`, advance their
    state from one length to the next rather than reading each prefix whole).

    The model runs with the LM site's value fixed and nothing recorded: no trace, no
    gradient.

    :param model: the Pyro model (not wrapped in a particle plate: ``value`` carries
        the particle dim on the left and the model's plates broadcast around it).
    :param str site: the name of its one LM site.
    :param torch.Tensor value: LongTensor ``(N, *batch, T)``, full completions.
    :param lengths: the prefix lengths ``t`` (ints in ``[0, T]``).
    :param int pad: ``pad_token_id``, written at positions ``>= t``.
    :param str owner: the caller, for error messages.
    :returns: float32 ``(len(lengths), N, *batch)``.
    """
    kwargs = kwargs or {}
    lengths = list(lengths)
    batch = torch.Size(value.shape[1:-1])
    out = torch.zeros((len(lengths),) + tuple(value.shape[:-1]), dtype=torch.float32,
                      device=value.device)
    if not lengths:
        return out
    factors = LogFactorsMessenger(model, site, batch, owner)
    positions = torch.arange(value.shape[-1], device=value.device)
    # the model builds its LMDistribution once per length; incremental rewards read the
    # growing prefixes token by token (and check NaN once, at the end)
    with prompt_cache(), RewardStates() as states:
        try:
            for i, t in enumerate(lengths):
                with prefix_context(t):
                    total = factors.evaluate(value.masked_fill(positions >= t, pad), args,
                                             kwargs)
                out[i] = torch.as_tensor(total, dtype=torch.float32, device=value.device)
        finally:
            states.check()
    return out


def _tokens_scaled(tokens: torch.Tensor, site) -> torch.Tensor:
    """Token log-probs ``(..., T)`` scaled and masked like the site's ``log_prob`` ``(...)``."""
    scale, mask = site["scale"], site["mask"]
    if isinstance(scale, torch.Tensor) and scale.dim():
        scale = scale[..., None]
    if isinstance(mask, torch.Tensor) and mask.dim():
        mask = mask[..., None]
    return scale_and_mask(tokens, scale, mask)


def _token_site(model_trace, guide_trace) -> str:
    """The name of the one LM site that ``baseline="prefix"`` scores per token.

    :raises ValueError: unless the model's only latent site is one plain
        :class:`~pyro_lm.LMDistribution` site and the guide samples exactly it.
    """
    names = lm_site_names(model_trace)
    if len(names) != 1:
        raise ValueError(f"baseline='prefix' credits the tokens of exactly one LM site; the "
                         f"model has {len(names)} ({names}). Use baseline='loo' for this model")
    name = names[0]
    latent = [n for n, s in model_trace.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and not site_is_subsample(s) and n != name]
    if latent:
        raise ValueError(f"baseline='prefix': the model has latent sites {latent} besides the "
                         f"LM site {name!r}; condition them (pyro.condition), or use "
                         "baseline='loo'")
    guided = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and not site_is_subsample(s)]
    if guided != [name]:
        raise ValueError(f"baseline='prefix': the guide must sample only the LM site {name!r}, "
                         f"it samples {guided}; use baseline='loo'")
    for trace, who in ((model_trace, "model"), (guide_trace, "guide")):
        fn = trace.nodes[name]["fn"]
        if unwrap_lm(fn) is not fn:
            raise ValueError(f"baseline='prefix': the {who}'s site {name!r} wraps its "
                             f"LMDistribution in {type(fn).__name__}; token log-probs need the "
                             "plain distribution: mask or scale it with poutine.mask / "
                             "poutine.scale instead, or use baseline='loo'")
    return name


SequenceELBO.VARIANTS["prefix"] = PrefixSequenceELBO
