"""Batched incremental decoding with a KV cache.

:class:`IncrementalDecoder` holds the decoding state of ``N`` sequences (KV
cache, attention mask, position ids, next-token logits); it is a
:class:`~pyro_lm.lm.decoder.Decoder` for any transformers causal LM, and
:func:`make_decoder` picks it or the faster
:class:`~pyro_lm.lm.gpt2_decoder.GPT2Decoder`. Sampling
(:meth:`pyro_lm.LMDistribution.sample`) and token-level SMC both drive it one
token at a time; SMC reorders it in place after resampling instead of
recomputing prefixes. :func:`draw_tokens` is the one token draw they all use.
"""

from __future__ import annotations

import math

import torch

from pyro_lm.lm.causal_lm import eval_mode
from pyro_lm.lm.decoder import Decoder, changed_rows, copy_rows, filler_token
from pyro_lm.lm.gpt2_decoder import GPT2Decoder, supports_fast_decoding

__all__ = ["IncrementalDecoder", "draw_restricted_tokens", "draw_tokens", "filler_token",
           "make_decoder", "sample_tokens", "FAST_DECODING"]

#: Use :class:`~pyro_lm.lm.gpt2_decoder.GPT2Decoder` for the models it supports;
#: set to ``False`` to always decode through the transformers forward pass.
FAST_DECODING = True


class IncrementalDecoder:
    """Decoding state for ``N`` left-padded prompts, through the transformers forward pass
    (a :class:`~pyro_lm.lm.decoder.Decoder`).

    :param lm: a :class:`~pyro_lm.CausalLM`.
    :param torch.Tensor input_ids: ``(N, L)`` prompt ids, left-padded.
    :param torch.Tensor attention_mask: ``(N, L)``, 1 on real tokens.
    :param int max_new_tokens: the most tokens that will be fed after the prompt.
    """

    def __init__(self, lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int):
        self.lm = lm
        n, length = input_ids.shape
        device = input_ids.device
        # Without left padding the causal mask alone is right: later steps build no mask.
        self.padded = bool((attention_mask == 0).any())
        self.mask = torch.ones((n, length + max_new_tokens), dtype=torch.long, device=device)
        self.mask[:, :length] = attention_mask
        self.length = length
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = positions[:, -1:] + 1  # (N, 1)
        logits, self.cache = lm(input_ids, attention_mask, positions, use_cache=True,
                                logits_to_keep=1)
        self.logits = logits[:, -1].float()  # (N, V)
        self.filler_token = filler_token(lm.model)

    def log_probs(self) -> torch.Tensor:
        """Next-token log-probabilities ``(N, V)`` in float32."""
        return self.logits.log_softmax(-1)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per sequence, ``tokens`` of shape ``(N,)``."""
        self.length += 1
        mask = self.mask[:, : self.length] if self.padded else None
        logits, self.cache = self.lm(tokens[:, None], mask, self.next_position,
                                     cache=self.cache, use_cache=True)
        self.next_position = self.next_position + 1
        self.logits = logits[:, -1].float()

    def reorder(self, index: torch.Tensor, logits: bool = True) -> None:
        """Keep sequence ``index[i]`` in row ``i`` (after resampling).

        On CPU only the rows whose ancestor changed (``index[i] != i``) are copied, in
        place, when they are at most half the rows (and the cache is a ``DynamicCache``);
        otherwise the cache's own ``reorder_cache`` gathers every row (on accelerators
        reading the count of changed rows would cost a host sync).

        :param bool logits: also reorder :attr:`logits`; pass ``False`` when
            :meth:`advance` comes next and replaces them.
        """
        rows = changed_rows(index)
        if rows is not None and rows.numel() == 0:
            return
        if rows is not None and 2 * rows.numel() <= index.shape[0] and self._in_place_ok():
            targets, sources = rows.tolist(), index.index_select(0, rows).tolist()
            for layer in self.cache.layers:
                for kv in (layer.keys, layer.values):
                    copy_rows(kv, 0, targets, sources)
        else:
            self.cache.reorder_cache(index)
        if self.padded:  # without padding every row has the same mask and positions
            self.mask = self.mask.index_select(0, index)
            self.next_position = self.next_position.index_select(0, index)
        if logits:  # a new tensor: callers may hold the old one
            self.logits = self.logits.index_select(0, index)

    def _in_place_ok(self) -> bool:
        """Whether the cache is plain ``DynamicLayer`` tensors this mode may write in place."""
        from transformers.cache_utils import DynamicLayer

        inference = torch.is_inference_mode_enabled()
        return all(type(layer) is DynamicLayer and layer.keys is not None
                   and (inference or not layer.keys.is_inference())
                   for layer in getattr(self.cache, "layers", [None]))


def make_decoder(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int) -> Decoder:
    """The fastest exact decoder for ``lm``: a :class:`~pyro_lm.lm.gpt2_decoder.GPT2Decoder`
    for plain GPT-2 models (when :data:`FAST_DECODING`), else an :class:`IncrementalDecoder`."""
    if FAST_DECODING and supports_fast_decoding(lm.model):
        return GPT2Decoder(lm, input_ids, attention_mask, max_new_tokens)
    return IncrementalDecoder(lm, input_ids, attention_mask, max_new_tokens)


def draw_tokens(logits: torch.Tensor, generator: torch.Generator | None = None,
                return_log_prob: bool = False):
    r"""One draw per row from :math:`\mathrm{softmax}(\ell)`, by inversion of its CDF.

    With :math:`m = \max_j \ell_j`, :math:`c_i = \sum_{j \le i} e^{\ell_j - m}` and one
    uniform :math:`u \sim U[0, 1)` per row,

    .. math::

        x = \min \{ i : c_i > u\, c_V \}, \qquad
        P(x = i) = \frac{c_i - c_{i-1}}{c_V} = \frac{e^{\ell_i}}{\sum_j e^{\ell_j}},

    exact up to float32 rounding. It reads the logits once (one exponential, a running
    sum and a binary search per row) where Gumbel-max [1] draws a uniform and takes two
    logarithms per element. A ``-inf`` logit is never drawn (its interval is empty, and
    ``u c_V`` rounds strictly below ``c_V``); a row whose logits are all ``-inf`` has no
    law and draws an arbitrary token id (in range), with log-probability NaN.

    :param torch.Tensor logits: ``(*rows, V)`` unnormalised log-probabilities, any float
        dtype (computed in float32).
    :param torch.Generator generator: the random stream (default: torch's global one).
    :param bool return_log_prob: also return :math:`\log P(x)`, from the same sums.
    :returns: ``(*rows,)`` LongTensor of token ids on ``logits``' device, and with
        ``return_log_prob`` the ``(*rows,)`` float32 log-probabilities of those tokens.

    References

    [1] E. J. Gumbel, *Statistical Theory of Extreme Values and Some Practical
        Applications*, 1954; C. J. Maddison, D. Tarlow, T. Minka, *A* Sampling*, NeurIPS 2014.
    [2] L. Devroye, *Non-Uniform Random Variate Generation*, Springer 1986, ch. III.2
        (inversion by sequential search).
    """
    logits = logits.float()
    m = logits.amax(-1, keepdim=True)
    token, total = _invert_cdf((logits - m).exp_(), generator)
    if not return_log_prob:
        return token.squeeze(-1)
    log_prob = logits.gather(-1, token) - m - total.log()
    return token.squeeze(-1), log_prob.squeeze(-1)


def draw_restricted_tokens(logits: torch.Tensor, allowed: torch.Tensor,
                           generator: torch.Generator | None = None,
                           return_log_prob: bool = False):
    r"""One draw per row from :math:`\mathrm{softmax}(\ell)` restricted to the ``allowed``
    tokens :math:`A`, and the log-mass of :math:`A`: the locally optimal proposal for a
    0/:math:`-\infty` potential and its importance-weight increment,

    .. math::

        x \sim r(x) = \frac{e^{\ell_x} 1[x \in A]}{\sum_{j \in A} e^{\ell_j}}, \qquad
        \log R = \log \sum_{j \in A} e^{\ell_j} - \log \sum_j e^{\ell_j},

    by the inversion of :func:`draw_tokens`, exact up to float32 rounding. On CPU the
    exponentials :math:`e^{\ell_j - \max \ell}` are computed once and multiplied by the
    mask (filling ``-inf`` and exponentiating it are many times slower there); a row whose
    allowed mass is below :math:`10^{-30}` of its largest term (where that product could
    underflow) is drawn again from the logits filled with ``-inf`` outside :math:`A` and
    shifted by their own maximum, as every row is on accelerators (no host sync). A row
    with no allowed token has :math:`\log R = -\infty` and draws an arbitrary id (in
    range).

    :param torch.Tensor logits: ``(*rows, V)``, any float dtype (computed in float32).
    :param torch.Tensor allowed: ``(*rows, V)``, bool or 0/1 of a float dtype.
    :param torch.Generator generator: the random stream (default: torch's global one).
    :param bool return_log_prob: also return :math:`\log r(x)`, from the same sums.
    :returns: ``(token, log_mass)``, and with ``return_log_prob`` ``log_r``: each
        ``(*rows,)``, a LongTensor and float32.
    """
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    logits = logits.float().reshape(-1, vocab)
    allowed = allowed.expand(shape + (vocab,)).reshape(-1, vocab)
    if logits.device.type != "cpu":
        out = _draw_restricted_filled(logits, allowed, generator)
    else:
        out = _draw_restricted_scaled(logits, allowed, generator)
    return tuple(o.reshape(shape) for o in out[: 3 if return_log_prob else 2])


def _draw_restricted_scaled(logits, allowed, generator):
    """``(token, log_mass, log_r)`` of rows ``(R, V)``: the exponentials shifted by the row
    maximum, times the mask; rows whose allowed mass underflows are drawn again."""
    # clamped: a row of -inf logits (no law) gives zeros, not NaN, to the running sum
    m = logits.amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
    weights = (logits - m).exp_()
    log_all = weights.sum(-1).log_()
    token, total = _invert_cdf(weights.mul_(allowed), generator)
    low = (total < 1e-30).squeeze(-1)
    log_total = total.log_()
    log_r = (logits.gather(-1, token) - m - log_total).squeeze(-1)
    token, log_mass = token.squeeze(-1), log_total.squeeze(-1) - log_all
    if bool(low.any()):  # empty rows (ended, dead) or, rarely, an underflow; CPU: no sync cost
        rows = low.nonzero().squeeze(-1)
        rows = rows[allowed[rows].bool().any(-1)]  # an empty row's mass is -inf already
        if rows.numel():
            token[rows], log_mass[rows], log_r[rows] = _draw_restricted_filled(
                logits[rows], allowed[rows], generator)
    return token, log_mass, log_r


def _draw_restricted_filled(logits, allowed, generator):
    """``(token, log_mass, log_r)`` of rows ``(R, V)``: ``-inf`` outside the allowed set,
    the shift by the allowed maximum (so that no allowed mass underflows)."""
    source = logits.masked_fill(~allowed.bool(), -math.inf)
    # an empty row's max is -inf: clamped, its exponentials are 0 and its mass -inf
    m = source.amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
    token, total = _invert_cdf(source.sub_(m).exp_(), generator)
    log_total = total.log_()
    log_r = (logits.gather(-1, token) - m - log_total).squeeze(-1)
    log_mass = (m + log_total).squeeze(-1) - logits.logsumexp(-1)
    return token.squeeze(-1), log_mass, log_r


def _invert_cdf(weights: torch.Tensor, generator):
    """``(token, total)``, each ``(*rows, 1)``: one inverse-CDF draw per row of the
    nonnegative ``weights`` ``(*rows, V)`` (overwritten by their running sum), and the sum."""
    cdf = weights.cumsum_(-1)
    total = cdf[..., -1:]
    # torch.rand_like is at most 1 - 2**-24 in float32, and then u * total rounds to a float
    # strictly below total: the search always ends on a token of positive mass
    u = torch.rand_like(total, generator=generator).mul_(total)
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[-1] - 1)
    return token, total


def sample_tokens(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, sync_every: int | None = None,
                  with_log_prob: bool = True):
    """Draw one completion per prompt row by ancestral sampling (tokens by :func:`draw_tokens`).

    Runs without gradients (in inference mode; the outputs are ordinary
    tensors). A sequence ends at its first EOS, any of ``lm.eos_token_ids``.
    Stops early once every sequence has ended; that check costs a host sync,
    made every ``sync_every`` steps (default 1 on CPU, 8 on accelerators).

    :param bool with_log_prob: also compute the completions' log-probabilities
        (``False``: skip that per-step work and return ``None`` in their place).
    :returns: ``(x, log_prob)``: ``x`` is ``(N, T)`` with ``pad_token_id`` after
        the first EOS, ``log_prob`` is ``(N,)`` float32, the log-probability of
        ``x`` under ``lm`` (or ``None``).
    """
    n = input_ids.shape[0]
    device = input_ids.device
    eos, pad = lm.eos_token_ids, lm.pad_token_id
    one_eos = len(eos) == 1
    eos_t = None if one_eos else torch.tensor(eos, dtype=torch.long, device=device)
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 8
    x = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    log_prob = torch.zeros(n, dtype=torch.float32, device=device) if with_log_prob else None
    done = torch.zeros(n, dtype=torch.bool, device=device)
    # inference mode is cheaper than no_grad; the results are cloned out of it below so that
    # they can be used where autograd saves tensors (e.g. as indices in a log_prob with grad)
    with torch.inference_mode(), eval_mode(lm.model):
        decoder = make_decoder(lm, input_ids, attention_mask, max_new_tokens)
        filler = decoder.filler_token
        for t in range(max_new_tokens):
            if with_log_prob:
                token, step_logp = draw_tokens(decoder.logits, return_log_prob=True)
                log_prob += step_logp.masked_fill_(done, 0.0)
            else:
                token = draw_tokens(decoder.logits)
            token.masked_fill_(done, pad)
            x[:, t] = token
            done |= (token == eos[0]) if one_eos else torch.isin(token, eos_t)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % sync_every == 0 and bool(done.all()):
                break
            # ended rows hold pad already: a filler that is the pad needs no fill
            decoder.advance(token if filler == pad else token.masked_fill_(done, filler))
    return x.clone(), None if log_prob is None else log_prob.clone()
