r"""Token-level SMC over a whole program: several LM sites, other latent sites, observed text.

The particles run the program in order. Each unobserved LM site is a *stage*, decoded
token by token (a step is a token of the current site) with the prompts of each
particle's own execution (a prompt built from an earlier choice or completion is
built from that particle's value); other latent sites are drawn from their prior when
the program reaches them (their density cancels from the weight). After every token
the potential is the program's log-factors evaluated on the *partial program*: the
finished sites and latents (complete), the current site's prefix (the program runs inside
:func:`~pyro_lm.distributions.prefix_context` from that site's sample statement on), and
nothing past the next undrawn latent site,

.. math::

    \Phi_{k,t} = \sum_{f \text{ reached}} f\big(z, x_{<k}, x_{k, \le t}\big), \qquad
    \log w \mathrel{+}= \log \frac{p_0(x_{k,t} \mid \cdot)}{q(x_{k,t} \mid \cdot)}
        + \Phi_{k,t} - \Phi_{\text{before}} .

The potentials telescope to the program's full log-factor, so the final weights target
the posterior exactly and :math:`\log \hat Z` is unbiased for :math:`Z`. Since the
intermediate potentials only steer, a partial run ends at the observed site after which
the last one with the same held sites found nothing else before its end
(``LogFactorsMessenger.evaluate_values(stop_early=True)``): the code that follows, such
as the next site's prompt built from the current prefix, is not run; the final weights
come from one complete run. Resampling
reorders every particle's earlier values with its KV cache. With ``steps`` (step-level
SMC, :mod:`pyro_lm.infer.smc_steps`) a stage's potential is applied only at the step
ends of its site's completion, and the last token of each stage is a step end of
every particle.

References:

[1] A. K. Lew, T. Zhi-Xuan, G. Grand, V. K. Mansinghka, "Sequential Monte Carlo
steering of large language models using probabilistic programs", 2023.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.lm_distribution import unwrap_lm
from pyro_lm.infer.program import (
    Execution,
    check_whole_plates,
    is_scaled,
    raise_vectorized,
    structure_trace,
    trace_nesting,
    vectorize,
)
from pyro_lm.infer.smc_population import Populations, decode
from pyro_lm.infer.smc_proposals import BootstrapProposal
from pyro_lm.infer.smc_steps import StepEnds, gated_potential
from pyro_lm.lm.decoding import make_decoder
from pyro_lm.poutine import LogFactorsMessenger
from pyro_lm.rewards.incremental import active_states

__all__ = ["run_program"]


class _Reached(Exception):
    """The advancing run reached the next LM site."""


class _Advance(Messenger):
    """Runs the vectorised program with the drawn sites held at their values, draws each
    new non-LM latent site from its prior, and stops at the next unobserved LM site,
    keeping ``(name, fn)`` in :attr:`lm_site`."""

    def __init__(self, values: dict):
        super().__init__()
        self.values, self.lm_site = values, None

    def _pyro_sample(self, msg):
        if site_is_subsample(msg) or msg["is_observed"]:
            return
        name = msg["name"]
        if name in self.values:
            msg["value"], msg["done"] = self.values[name], True
            return
        if is_scaled(msg):
            raise ValueError(f"model: site {name!r} is scaled or masked (poutine.scale / mask); "
                             "SMC over a program draws latent sites from their own "
                             "distribution: scale the factors instead, or use Importance")
        fn = msg["fn"]
        if unwrap_lm(fn) is not None:
            if unwrap_lm(fn) is not fn:
                raise ValueError(f"model: site {name!r} wraps its LMDistribution (.mask, "
                                 ".to_event); SMC needs the plain distribution")
            self.lm_site = (name, fn)
            raise _Reached
        msg["value"], msg["done"] = fn(), True  # from its prior: the proposal, so it cancels
        self.values[name] = msg["value"]


def _rows(value: torch.Tensor, shape: torch.Size, event: int) -> torch.Tensor:
    """``value`` ``(N, ...)`` expanded to ``shape`` ``(N, *batch)`` plus its event dims and
    flattened to one row per particle and batch element."""
    tail = value.shape[value.dim() - event:] if event else ()
    lead = value.reshape((1,) * (len(shape) + event - value.dim()) + tuple(value.shape))
    return lead.expand(tuple(shape) + tuple(tail)).reshape((shape.numel(),) + tuple(tail))


def run_program(smc, args, kwargs, trace=None):
    """Run SMC ``smc`` (its particles, threshold, resampling, guide) over a whole program.

    :param trace: the program's :func:`~pyro_lm.infer.program.structure_trace` if the
        caller has it (else it is run).

    :returns: ``(values, log_w, history, lms, batch)``: every latent site's values with the
        leading particle dim, the final log-weights ``(N, *batch)``, the concatenated
        per-step history, the LM sites' prior LMs and the weights' batch shape.
    """
    model, n = smc.model, smc.num_particles
    if trace is None:
        trace, _ = structure_trace(model, None, args, kwargs)
    nesting = trace_nesting(trace)
    check_whole_plates("SMC", trace)
    batch = Execution(trace, None, 1, nesting).batch_shape
    shape = torch.Size((n,)) + batch
    factors = LogFactorsMessenger(model, None, batch, owner="SMC", partial=True)
    values, lms, history = {}, {}, []
    log_w = phi = None
    vectorized = vectorize(model, n, -(nesting + 1))
    states = active_states()
    while True:
        advance = _Advance(values)
        if states is not None:  # a new evaluation: its reward calls are numbered anew
            states.begin()
        with poutine.block():
            try:
                advance(vectorized)(*args, **kwargs)
            except _Reached:
                pass
            except (RuntimeError, TypeError, ValueError) as e:
                raise_vectorized(e, n, -(nesting + 1))
        if advance.lm_site is None:
            break  # every latent site is drawn
        name, prior = advance.lm_site
        if tuple(prior.batch_shape) != tuple(shape):
            raise ValueError(f"model: LM site {name!r} has batch shape "
                             f"{tuple(prior.batch_shape[1:])}, not the weights' {tuple(batch)}; "
                             "SMC over a program needs every LM site in every plate the "
                             "weights keep (a site outside a plate couples its elements)")
        proposal = prior if smc.guide is None else prior.with_lm(smc.guide.lm)
        pop = _decode(smc, name, prior, proposal, shape, values, factors, args, kwargs,
                      log_w, phi)
        values[name] = pop.values
        lms[name] = prior.lm
        log_w, phi = pop.log_w, pop.phi
        history.append(pop.history())
    final = torch.as_tensor(factors.evaluate_values(values, args, kwargs),
                            dtype=torch.float32)
    final = final.expand(shape).reshape(-1)
    if log_w is None:  # no LM site to decode: importance sampling from the prior
        log_w, phi = torch.zeros_like(final), torch.zeros_like(final)
    log_w = (log_w + final - phi).masked_fill(torch.isneginf(phi), -float("inf"))
    return values, log_w.view(shape), history, lms, batch


def _decode(smc, name, prior, proposal, shape, values, factors, args, kwargs, log_w, phi):
    """Decode LM site ``name`` token by token for every particle; the Populations after it."""
    big_t = prior.max_new_tokens
    ids, mask = prior.prompts_for()  # one row per particle and batch element
    sync_every = smc.sync_every or (1 if ids.device.type == "cpu" else 8)
    decoder_q = make_decoder(proposal.lm, ids, mask, big_t)
    decoder_p = make_decoder(prior.lm, ids, mask, big_t) if proposal.lm is not prior.lm \
        else None
    decoders = (decoder_q,) if decoder_p is None else (decoder_q, decoder_p)
    pop = Populations(shape, big_t, prior.lm.eos_token_ids, prior.lm.pad_token_id,
                      smc.ess_threshold, smc.resampling, decoders, ids.device)
    if log_w is not None:  # the weights and potentials of the earlier stages
        pop.log_w, pop.phi = log_w.clone(), phi.clone()

    def potential(x, t, final):
        held = dict(values)
        held[name] = x
        # a prefix from this site's sample statement on: the earlier sites' factors see
        # their whole completions
        total = factors.evaluate_values(held, args, kwargs, None if final else (name, t),
                                        stop_early=True)
        return torch.as_tensor(total, dtype=torch.float32).expand(shape).reshape(-1)

    def follow(index):  # the earlier sites and latents follow their particles
        for key, value in values.items():
            event = max(value.dim() - len(shape), 0)
            values[key] = _rows(value, shape, event).index_select(0, index).reshape(
                tuple(shape) + tuple(value.shape[len(shape):]) if event else shape)

    steps = None
    if smc.steps != "token":  # a stage's text is its own site's completion
        steps = StepEnds(smc.steps, prior.lm.tokenizer, decoder_q.logits.shape[-1],
                         shape.numel(), ids.device)
        potential = gated_potential(potential, pop)
    return decode(pop, BootstrapProposal(potential, decoder_q, decoder_p), sync_every, follow,
                  steps)
