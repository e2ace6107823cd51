"""Batched incremental decoding with a KV cache.

:class:`IncrementalDecoder` holds the decoding state of ``N`` sequences (KV
cache, attention mask, position ids, next-token logits); it is a
:class:`~pyro_lm.lm.decoder.Decoder` for any transformers causal LM, and
:func:`make_decoder` picks it or the faster
:class:`~pyro_lm.lm.gpt2_decoder.GPT2Decoder`. Sampling
(:meth:`pyro_lm.LMDistribution.sample`) and token-level SMC both drive it one
token at a time; SMC reorders it in place after resampling instead of
recomputing prefixes.
"""

from __future__ import annotations

import torch

from pyro_lm.lm.causal_lm import eval_mode
from pyro_lm.lm.decoder import Decoder, filler_token
from pyro_lm.lm.gpt2_decoder import GPT2Decoder, supports_fast_decoding

__all__ = ["IncrementalDecoder", "filler_token", "make_decoder", "sample_tokens", "FAST_DECODING"]

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

        :param bool logits: also reorder :attr:`logits`; pass ``False`` when
            :meth:`advance` comes next and replaces them.
        """
        self.cache.reorder_cache(index)
        if self.padded:  # without padding every row has the same mask and positions
            self.mask = self.mask.index_select(0, index)
            self.next_position = self.next_position.index_select(0, index)
        if logits:
            self.logits = self.logits.index_select(0, index)


def make_decoder(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int) -> Decoder:
    """The fastest exact decoder for ``lm``: a :class:`~pyro_lm.lm.gpt2_decoder.GPT2Decoder`
    for plain GPT-2 models (when :data:`FAST_DECODING`), else an :class:`IncrementalDecoder`."""
    if FAST_DECODING and supports_fast_decoding(lm.model):
        return GPT2Decoder(lm, input_ids, attention_mask, max_new_tokens)
    return IncrementalDecoder(lm, input_ids, attention_mask, max_new_tokens)


def sample_tokens(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, sync_every: int | None = None):
    """Draw one completion per prompt row by ancestral sampling.

    Runs without gradients (in inference mode; the outputs are ordinary
    tensors). A sequence ends at its first EOS, any of ``lm.eos_token_ids``.
    Stops early once every sequence has ended; that check costs a host sync,
    made every ``sync_every`` steps (default 1 on CPU, 8 on accelerators).

    :returns: ``(x, log_prob)``: ``x`` is ``(N, T)`` with ``pad_token_id`` after
        the first EOS, ``log_prob`` is ``(N,)`` float32, the log-probability of
        ``x`` under ``lm``.
    """
    n = input_ids.shape[0]
    device = input_ids.device
    eos, pad = lm.eos_token_ids, lm.pad_token_id
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    one_eos = len(eos) == 1
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 8
    x = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    log_prob = torch.zeros(n, dtype=torch.float32, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    pad_t = torch.tensor(pad, dtype=torch.long, device=device)
    # inference mode is cheaper than no_grad; the results are cloned out of it below so that
    # they can be used where autograd saves tensors (e.g. as indices in a log_prob with grad)
    with torch.inference_mode(), eval_mode(lm.model):
        decoder = make_decoder(lm, input_ids, attention_mask, max_new_tokens)
        for t in range(max_new_tokens):
            logits = decoder.logits
            # Gumbel-max: argmax(logits - log E), E = -log U ~ Exp(1), draws from softmax(logits)
            token = (logits - torch.rand_like(logits).log_().neg_().log_()).argmax(-1)
            step_logp = logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(-1)
            log_prob += step_logp.masked_fill(done, 0.0)
            token = torch.where(done, pad_t, token)
            x[:, t] = token
            done = done | ((token == eos[0]) if one_eos else torch.isin(token, eos_t))
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % sync_every == 0 and bool(done.all()):
                break
            decoder.advance(token.masked_fill(done, decoder.filler_token))
    return x.clone(), log_prob.clone()
