r"""The particles of token-level SMC and their resampling.

:class:`Populations` holds ``B`` populations (one per prompt) of ``N`` particles
each, in ``R = N B`` rows flattened particle-major (row ``i B + j`` is particle
``i`` of prompt ``j``, like the decoding rows): the tokens so far, which rows have
ended, their potentials and log-weights, and the decoders whose KV caches follow
the rows. After each token it records every population's

.. math::

    \mathrm{ESS} = \frac{(\sum_i w_i)^2}{\sum_i w_i^2}, \qquad
    \log \hat Z_t = \log \frac1N \sum_i w_i,

and resamples the populations whose ESS is below ``ess_threshold * N``: their rows
are replaced by ancestors drawn from the weights, every weight set to the
population's mean (so :math:`\hat Z` is unchanged), and the decoders' caches
reordered in place instead of recomputed. A surviving particle keeps its own row
(:func:`~pyro_lm.infer.resampling.stay_in_place`) and a population that is not
resampled keeps all of them, so the ancestor index passed to ``Decoder.reorder`` is the
identity except on the rows of particles that died.
"""

from __future__ import annotations

import math

import torch

from pyro_lm.distributions.prefix import is_eos
from pyro_lm.infer.resampling import RESAMPLERS, stay_in_place
from pyro_lm.rewards.incremental import active_states

__all__ = ["Populations", "decode"]


class Populations:
    r"""The particle populations of one SMC run.

    :param torch.Size shape: ``(N, *batch)``: particles per prompt, then the batch.
    :param int max_new_tokens: ``T``, the columns of the token buffer.
    :param eos: the LM's ``eos_token_ids`` (or one id); a row ends at its first EOS.
    :param int pad: ``pad_token_id``, the token of ended rows.
    :param float ess_threshold: resample a population when
        :math:`\mathrm{ESS} < \text{ess\_threshold} \cdot N` (0: never).
    :param str resampling: a key of :data:`~pyro_lm.infer.resampling.RESAMPLERS`.
    :param decoders: the :class:`~pyro_lm.lm.decoder.Decoder` s over the ``R`` rows,
        fed each row's token and reordered with the rows.
    :param torch.device device: where the rows live.

    On accelerators the resampling step runs at every step where it is decided, for
    every population, with no host sync: the populations whose ESS is high keep their
    own particles (an identity ancestor index on their rows), the others keep their
    survivors in place, so a decoder whose ``reorder`` skips unchanged rows copies only
    the rows of particles that died. On the host only the populations that need it are
    resampled, and one prompt is decided with one scalar read.
    """

    def __init__(self, shape: torch.Size, max_new_tokens: int, eos, pad: int,
                 ess_threshold: float, resampling: str, decoders, device: torch.device):
        n, b = shape[0], shape[1:].numel()
        rows = n * b
        self.shape, self.num_particles, self.num_populations = shape, n, b
        self.eos, self.decoders = eos, decoders
        self.x = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        self.values = self.x.view(tuple(shape) + (max_new_tokens,))  # (N, *batch, T)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        # Phi_0 is a constant per prompt: it cancels from the weights, so it is taken to be 0
        self.phi = torch.zeros(rows, device=device)
        self.log_w = torch.zeros(rows, device=device)
        self._pad = pad
        self._on_cpu = device.type == "cpu"
        self._single = b == 1 and self._on_cpu  # one population on the host: scalar control
        self._resample = RESAMPLERS[resampling]
        self._offsets = torch.arange(b, device=device)
        self._keep = torch.arange(n, device=device)[:, None].expand(n, b)
        # ESS = exp(2 lse - lse2) < threshold * N, i.e. lse2 - 2 lse > -log(threshold * N)
        self._log_bound = -math.log(ess_threshold * n) if ess_threshold > 0 else math.inf
        self._lse, self._lse2, self._resampled = [], [], []
        #: rows at a step end at the current token (step-level SMC,
        #: :mod:`pyro_lm.infer.smc_steps`): ``None`` every row, ``False`` none, or a mask
        self.at_end = None

    def append(self, t: int, token: torch.Tensor) -> None:
        """Write ``token`` ``(R,)`` at column ``t`` (padding, in place, on rows that had
        ended) and mark the rows that emit EOS as ended."""
        token.masked_fill_(self.done, self._pad)
        self.x[:, t] = token
        self.done = self.done | is_eos(token, self.eos)

    def reweight(self, phi: torch.Tensor, increment: torch.Tensor) -> None:
        """Add ``increment`` ``(R,)`` to the log-weights, keep the new potentials ``phi``
        and record every population's :math:`\\log \\sum w` and :math:`\\log \\sum w^2`."""
        self.log_w += increment
        self.phi = phi
        self._record()

    def unchanged(self) -> None:
        """Record a token after which every weight and potential is what it was."""
        if not self._lse:
            self._record()
        else:
            self._lse.append(self._lse[-1])
            self._lse2.append(self._lse2[-1])

    def _record(self) -> None:
        r"""Every population's :math:`\log \sum w` and :math:`\log \sum w^2`, ``(B,)``."""
        weights = self.log_w.view(self.num_particles, self.num_populations)
        self._lse.append(weights.logsumexp(0))
        self._lse2.append((2 * weights).logsumexp(0))

    def resample(self):
        """Resample the populations whose ESS is below the threshold: rows, potentials,
        weights and the decoders' caches (their logits are left to the next ``advance``).

        :returns: the rows' ancestor index ``(R,)``, or ``None`` if nothing was resampled
            (for state kept outside, e.g. the earlier sites of a program)."""
        n, b = self.num_particles, self.num_populations
        lse, lse2 = self._lse[-1], self._lse2[-1]
        if self._single:
            need = torch.sub(lse2, lse, alpha=2).item() > self._log_bound
            act = need
        else:
            need = torch.sub(lse2, lse, alpha=2) > self._log_bound  # (B,)
            act = not self._on_cpu or bool(need.any())
        self._resampled.append(need)
        if not act:
            return None
        weights = self.log_w.view(n, b)
        # (N, B); surviving particles keep their rows, so a decoder need only copy the rows
        # of the particles that died (and none for the populations that keep theirs)
        ancestors = self._resample(weights)
        ancestors = _stay_in_place_one(ancestors) if self._single else stay_in_place(ancestors)
        log_mean = lse - math.log(n)
        if self._single:
            index = ancestors.reshape(-1)
            self.log_w.copy_(log_mean.expand(n))
        else:  # the populations that do not need it keep their particles
            index = (torch.where(need, ancestors, self._keep) * b + self._offsets).reshape(-1)
            self.log_w = torch.where(need, log_mean, weights).reshape(-1)
        self.x = self.x.index_select(0, index)
        self.values = self.x.view(self.values.shape)
        self.done = self.done.index_select(0, index)
        self.phi = self.phi.index_select(0, index)
        for decoder in self.decoders:
            decoder.reorder(index, logits=False)  # advance replaces them
        return index

    def advance(self, t: int) -> None:
        """Feed every decoder the rows' tokens at column ``t``. Ended rows are fed a
        non-pad filler (their outputs are unused), so that transformers does not take
        them for unmasked padding."""
        token = self.x[:, t].masked_fill(self.done, self.decoders[0].filler_token)
        for decoder in self.decoders:
            decoder.advance(token)

    def stop(self) -> None:
        """Record a step after which nothing is resampled (the last one, or one where no
        particle reached a step end)."""
        self._resampled.append(False if self._single else
                               torch.zeros(self.num_populations, dtype=torch.bool,
                                           device=self.x.device))

    def history(self) -> dict:
        """Per step ``(T',)`` + ``B``: ``"lse"`` and ``"lse2"`` (:math:`\\log \\sum w`,
        :math:`\\log \\sum w^2`) and ``"resampled"``."""
        resampled = (torch.tensor(self._resampled, dtype=torch.bool, device=self.x.device)[:, None]
                     if self._single else torch.stack(self._resampled))
        return {"lse": torch.stack(self._lse), "lse2": torch.stack(self._lse2),
                "resampled": resampled}


def _stay_in_place_one(ancestors: torch.Tensor) -> torch.Tensor:
    """:func:`~pyro_lm.infer.resampling.stay_in_place` for one population on the host, in
    Python: a few microseconds where the batched version launches a dozen operations."""
    a = ancestors.reshape(-1).tolist()
    out, extras, previous = list(range(len(a))), [], None
    for j in sorted(a):
        if j == previous:
            extras.append(j)
        previous = j
    alive = set(a)
    for row, j in zip((r for r in out if r not in alive), extras, strict=True):
        out[row] = j
    return torch.tensor(out, dtype=ancestors.dtype, device=ancestors.device).view(ancestors.shape)


def decode(pop: Populations, step, sync_every: int, on_resample=None,
           steps=None) -> Populations:
    """The token loop of SMC: draw, weigh and resample ``pop`` one token at a time until the
    last column or until every row has ended (checked every ``sync_every`` tokens).

    :param step: a proposal (:mod:`pyro_lm.infer.smc_proposals`).
    :param on_resample: ``None`` or a callable of the rows' ancestor index, for state kept
        outside the populations (the earlier sites of a program).
    :param steps: ``None`` (a step per token) or a
        :class:`~pyro_lm.infer.smc_steps.StepEnds`: ``pop.at_end`` is set from it before
        each weighing (the proposal's potential reads it through
        :func:`~pyro_lm.infer.smc_steps.gated_potential`), and resampling is decided only
        at tokens where some particle reached a step end.
    """
    big_t = pop.x.shape[-1]
    states = active_states()  # incremental rewards' states follow their rows
    if states is not None:
        states.rows = pop.x.shape[0]
    for t in range(big_t):
        last = t + 1 == big_t
        ended = pop.done  # rows that had ended before this token
        token = step.draw(pop, t, last)
        pop.append(t, token)
        final = last or ((t + 1) % sync_every == 0 and bool(pop.done.all()))
        if steps is not None:
            pop.at_end = None if final else steps.ends(token, t, ended, pop.done)
        if pop.at_end is False and getattr(step, "between_steps_free", False):
            pop.unchanged()  # no step ends here and nothing else moves a weight
        else:
            pop.reweight(*step.weigh(pop, token, t, ended, final, last))
        if final or pop.at_end is False:
            pop.stop()
            if final:
                break
        else:
            index = pop.resample()
            if index is not None:
                if states is not None:
                    states.reorder(index)
                if steps is not None:
                    steps.reorder(index)
                if on_resample is not None:
                    on_resample(index)
        pop.advance(t)
    return pop
