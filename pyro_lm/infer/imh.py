r"""Independent Metropolis-Hastings (IMH) with an LM proposal.

A Markov chain on completions whose proposal ignores the current state:
:math:`x' \sim \pi` (the guide or the prior), accepted with probability

.. math::

    \alpha(x \to x') = \min\Big(1, \frac{\tilde p(x')\,\pi(x)}{\tilde p(x)\,\pi(x')}\Big)
    = \min\Big(1, \frac{w(x')}{w(x)}\Big), \qquad w = \tilde p / \pi .

The chain leaves :math:`p^* \propto \tilde p` invariant and, when
:math:`\pi > 0` wherever :math:`p^* > 0`, converges to it; it is uniformly
ergodic when :math:`w` is bounded, with rate :math:`1 - Z/\max_x w(x)` per step
(Mengersen and Tweedie, 1996). Unlike importance sampling it returns
unweighted samples; unlike :class:`~pyro_lm.infer.QRS` it needs no bound.

Because proposals do not depend on the state, all ``(num_steps + 1) x
num_chains`` proposals of every prompt are drawn in batched decodes up front
and weighed in one vectorised model run; the accept/reject loop is then a few
tensor operations per step, batched over chains and prompts. Each chain
starts at its own first proposal (step 0).

References

[1] Luke Tierney (1994), "Markov Chains for Exploring Posterior Distributions",
    Annals of Statistics.
[2] Kerrie Mengersen, Richard Tweedie (1996), "Rates of Convergence of the
    Hastings and Metropolis Algorithms", Annals of Statistics.
[3] Bryan Eikema, Germán Kruszewski, Christopher R. Dance, Hady Elsahar,
    Marc Dymetman (2022), "An Approximate Sampler for Energy-Based Models with
    Divergence Diagnostics", TMLR (IMH as a baseline for QRS).
"""

from __future__ import annotations

import torch

from pyro_lm.distributed import sharded
from pyro_lm.infer.posterior import WeightedPosterior, align_to, check_log_weights
from pyro_lm.infer.program import plate_nesting
from pyro_lm.infer.proposal import as_guide, propose
from pyro_lm.ops.stats import log_normalizer

__all__ = ["IMH"]


class IMH:
    r"""Independent Metropolis-Hastings sampler for a model's target :math:`p^*`.

    :param model: a Pyro model (any program :class:`~pyro_lm.infer.Importance` takes).
    :param proposal: an :class:`~pyro_lm.infer.AutoLMGuide` (or another guide), a
        :class:`~pyro_lm.CausalLM` (as ``AutoLMGuide(model, lm)``), or ``None`` (default)
        for the model's prior.
    :param int num_steps: MH steps per chain (after the initial state).
    :param int num_chains: independent chains per prompt, run in parallel.
    :param int burn_in: leading steps of each chain to drop (``< num_steps``).
    :param int batch_size: proposals per prompt per batched decode (default: all
        ``(num_steps + 1) * num_chains`` at once).

    :meth:`run` returns a :class:`~pyro_lm.infer.WeightedPosterior` whose samples
    have leading dimension ``num_chains * D`` with ``D = num_steps - burn_in`` kept
    draws, chain-major (``.reshape(num_chains, D, ...)`` gives chain x draw), and
    zero log-weights. ``history`` holds ``accepted`` ``(num_steps, num_chains, *batch)``
    (bool) and ``log_weight`` ``(num_steps, num_chains, *batch)`` (the state's
    :math:`\log w` after each step); ``extras`` holds ``acceptance_rate`` (per
    prompt, over all steps and chains), ``num_chains``, ``num_draws`` (``D``),
    ``burn_in`` and ``log_Z`` (the importance-sampling estimate from every proposal).
    """

    def __init__(self, model, proposal=None, num_steps: int = 100, num_chains: int = 4,
                 burn_in: int = 0, batch_size: int | None = None):
        for name, value, low in (("num_steps", num_steps, 1), ("num_chains", num_chains, 1),
                                 ("burn_in", burn_in, 0), ("batch_size", batch_size, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if burn_in >= num_steps:
            raise ValueError(f"burn_in: must be < num_steps={num_steps} so that some draws "
                             f"are kept, got {burn_in}")
        self.model = model
        self.proposal = proposal
        self.num_steps = num_steps
        self.num_chains = num_chains
        self.burn_in = burn_in
        self.batch_size = batch_size

    @sharded  # torch.distributed: prompts sharded across ranks, posterior gathered
    @torch.no_grad()
    def run(self, *args, **kwargs) -> WeightedPosterior:
        """Run every chain for ``num_steps`` steps and keep the draws after ``burn_in``."""
        guide = as_guide(self.model, self.proposal, owner="IMH")
        nesting = plate_nesting(self.model, guide, args, kwargs)
        steps, chains = self.num_steps + 1, self.num_chains
        total = steps * chains
        size = self.batch_size or total
        values, log_w = {}, []
        for start in range(0, total, size):
            prop = propose(self.model, guide, min(size, total - start), args, kwargs, nesting,
                           "IMH")
            log_w.append(prop.log_weights)
            for name, x in prop.values.items():
                values.setdefault(name, []).append(x)
        log_w = torch.cat(log_w)
        batch = tuple(log_w.shape[1:])
        check_log_weights(log_w, "log_weights")
        log_z = log_normalizer(log_w)
        log_w = log_w.reshape((steps, chains) + batch)
        values = {name: torch.cat(parts).reshape((steps, chains) + parts[0].shape[1:])
                  for name, parts in values.items()}
        state = {name: x[0] for name, x in values.items()}
        state_log_w = log_w[0]
        log_u = torch.rand((self.num_steps, chains) + batch, dtype=log_w.dtype,
                           device=log_w.device).log()
        accepted, kept_log_w = [], []
        kept = {name: [] for name in values}
        for t in range(1, steps):
            # min(1, w'/w) with w = 0 (an impossible start) always moving to w' > 0.
            log_ratio = torch.where(torch.isneginf(state_log_w) & ~torch.isneginf(log_w[t]),
                                    torch.zeros_like(state_log_w), log_w[t] - state_log_w)
            accept = log_u[t - 1] < log_ratio
            state_log_w = torch.where(accept, log_w[t], state_log_w)
            for name, x in state.items():
                state[name] = torch.where(align_to(accept, x), values[name][t], x)
                if t > self.burn_in:
                    kept[name].append(state[name])
            accepted.append(accept)
            kept_log_w.append(state_log_w)
        draws = self.num_steps - self.burn_in
        samples = {name: torch.stack(xs, 1).reshape((chains * draws,) + xs[0].shape[1:])
                   for name, xs in kept.items()}
        accepted = torch.stack(accepted)
        return WeightedPosterior(
            samples, torch.zeros((chains * draws,) + batch, dtype=log_w.dtype,
                                 device=log_w.device),
            lms=prop.lms, log_normalizer=log_z,
            history={"accepted": accepted, "log_weight": torch.stack(kept_log_w)},
            extras={"acceptance_rate": accepted.float().mean((0, 1)), "num_chains": chains,
                    "num_draws": draws, "burn_in": self.burn_in, "log_Z": log_z},
            algorithm="IMH")
