"""A lean token-by-token decoder for GPT-2 models, with a static KV cache.

For small models the per-token cost of a transformers forward pass is mostly
Python overhead (cache objects, mask construction, module dispatch): on the
peers' 2-layer GPT-2 at batch 64 one step costs about 1 ms through
``GPT2LMHeadModel.forward`` and 0.45 ms as the dozen tensor operations it
computes. :class:`GPT2Decoder` runs those operations directly on the model's
own weights. The prompt is still encoded by transformers (so left padding is
handled by the library), and its KV cache is copied into preallocated buffers
that later tokens fill in place; resampling reorders the buffers.

The decoder is a :class:`~pyro_lm.lm.decoder.Decoder`, like
:class:`~pyro_lm.lm.decoding.IncrementalDecoder`, and computes the same logits
(tests compare them with transformers'); :func:`pyro_lm.lm.decoding.make_decoder`
picks it where it applies and the generic decoder elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyro_lm.lm.decoder import filler_token

__all__ = ["GPT2Decoder", "supports_fast_decoding"]


def supports_fast_decoding(model) -> bool:
    """Whether ``model`` is a plain ``GPT2LMHeadModel`` this decoder reproduces exactly."""
    from transformers import GPT2LMHeadModel

    if type(model) is not GPT2LMHeadModel:  # subclasses and peft wrappers: generic path
        return False
    cfg = model.config
    if not isinstance(model.lm_head, torch.nn.Linear):
        return False
    return (cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
            and cfg.scale_attn_weights and not cfg.scale_attn_by_inverse_layer_idx
            and not cfg.reorder_and_upcast_attn and not cfg.add_cross_attention
            and not any(h.attn.is_cross_attention for h in model.transformer.h))


class GPT2Decoder:
    """Decoding state for ``N`` left-padded prompts of a GPT-2 model (static KV cache), a
    :class:`~pyro_lm.lm.decoder.Decoder`.

    :param lm: a :class:`~pyro_lm.CausalLM` wrapping a ``GPT2LMHeadModel``.
    :param torch.Tensor input_ids: ``(N, L)`` prompt ids, left-padded.
    :param torch.Tensor attention_mask: ``(N, L)``, 1 on real tokens.
    :param int max_new_tokens: the most tokens that will be fed after the prompt.
    """

    def __init__(self, lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int):
        model = lm.model
        self.transformer, self.head = model.transformer, model.lm_head
        cfg = model.config
        self.width, self.heads = cfg.n_embd, cfg.n_head
        self.head_dim, self.eps = cfg.n_embd // cfg.n_head, cfg.layer_norm_epsilon
        self.filler_token = filler_token(model)
        n, length = input_ids.shape
        self.padded = bool((attention_mask == 0).any())
        prompt_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = lm(input_ids, attention_mask, prompt_positions, use_cache=True,
                           logits_to_keep=1)
        self.logits = logits[:, -1].float()  # (N, V)
        tr = self.transformer
        # the weights each step reads, looked up once
        self._embed = (tr.wte.weight, tr.wpe.weight)
        self._blocks = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                         b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                         b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight,
                         b.mlp.c_proj.bias) for b in tr.h]
        self._final = (tr.ln_f.weight, tr.ln_f.bias, self.head.weight, self.head.bias)
        total = length + max_new_tokens
        layers = len(self.transformer.h)
        like = cache.layers[0].keys
        # keys and values in one buffer (2, layers, N, heads, positions, head_dim), so that a
        # reorder is one copy; its spare (for out-of-place reorders) is made on first use
        self._kv = torch.empty((2, layers, n, self.heads, total, self.head_dim),
                                 dtype=like.dtype, device=like.device)
        self._spare = None
        self.keys, self.values = self._kv.unbind(0)
        for i, layer in enumerate(cache.layers):
            self.keys[i, :, :, :length] = layer.keys
            self.values[i, :, :, :length] = layer.values
        self.length = length
        self.next_position = prompt_positions[:, -1] + 1  # (N,)
        # padded prompts: a boolean mask over cache positions (True = attend)
        self.mask = None
        if self.padded:
            self.mask = torch.ones((n, 1, 1, total), dtype=torch.bool, device=like.device)
            self.mask[:, 0, 0, :length] = attention_mask.bool()

    def log_probs(self) -> torch.Tensor:
        """Next-token log-probabilities ``(N, V)`` in float32."""
        return self.logits.log_softmax(-1)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per sequence, ``tokens`` of shape ``(N,)``."""
        t, n, width, eps = self.length, tokens.shape[0], self.width, self.eps
        wte, wpe = self._embed
        with torch.no_grad():
            x = F.embedding(tokens, wte) + F.embedding(self.next_position, wpe)
            mask = None if self.mask is None else self.mask[..., : t + 1]
            for i, (g1, b1, w_qkv, b_qkv, w_o, b_o, g2, b2, w_fc, b_fc, w_pr, b_pr) in \
                    enumerate(self._blocks):
                h = F.layer_norm(x, (width,), g1, b1, eps)
                q, k, v = torch.addmm(b_qkv, h, w_qkv).view(n, 3, self.heads,
                                                             self.head_dim).unbind(1)
                keys, values = self.keys[i], self.values[i]
                keys[:, :, t] = k
                values[:, :, t] = v
                a = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, : t + 1],
                                                   values[:, :, : t + 1], attn_mask=mask)
                x = x + torch.addmm(b_o, a.reshape(n, width), w_o)
                h = F.gelu(torch.addmm(b_fc, F.layer_norm(x, (width,), g2, b2, eps), w_fc),
                           approximate="tanh")
                x = x + torch.addmm(b_pr, h, w_pr)
            g, b, head, head_bias = self._final
            self.logits = F.linear(F.layer_norm(x, (width,), g, b, eps), head, head_bias).float()
        self.length = t + 1
        self.next_position = self.next_position + 1

    def reorder(self, index: torch.Tensor, logits: bool = True) -> None:
        """Keep sequence ``index[i]`` in row ``i`` (after resampling).

        :param bool logits: also reorder :attr:`logits`; pass ``False`` when
            :meth:`advance` comes next and replaces them.
        """
        # gather the filled positions of every row into the spare buffer and swap (faster
        # than gathering in place, for twice the cache's memory); positions past
        # self.length are written by advance before attention reads them
        if self._spare is None:
            self._spare = torch.empty_like(self._kv)
        filled = self.length
        torch.index_select(self._kv[..., :filled, :], 2, index,
                           out=self._spare[..., :filled, :])
        self._kv, self._spare = self._spare, self._kv
        self.keys, self.values = self._kv.unbind(0)
        if self.padded:
            self.mask = self.mask.index_select(0, index)
            self.next_position = self.next_position.index_select(0, index)
        if logits:
            self.logits = self.logits.index_select(0, index)
