"""A lean token-by-token decoder for GPT-2 models, with a static KV cache.

For small models the per-token cost of a transformers forward pass is mostly
Python overhead (cache objects, mask construction, module dispatch): on the
peers' 2-layer GPT-2 at batch 64 one step costs about 1 ms through
``GPT2LMHeadModel.forward`` and 0.45 ms as the dozen tensor operations it
computes. :class:`GPT2Decoder` runs those operations directly on the model's
own weights. The prompt is still encoded by transformers (so left padding is
handled by the library), and its KV cache is copied into preallocated buffers
that later tokens fill in place; resampling reorders the buffers. After resampling the
particles often descend from one ancestor over most of their history: on CPU the positions
that every row shares are then kept once and read from that one copy (a prefix-sharing
cache), so that a reorder copies only what the rows do not share, and its cost stops
growing with the length.

The decoder is a :class:`~pyro_lm.lm.decoder.Decoder`, like
:class:`~pyro_lm.lm.decoding.IncrementalDecoder`, and computes the same logits
(tests compare them with transformers'); :func:`pyro_lm.lm.decoding.make_decoder`
picks it where it applies and the generic decoder elsewhere.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from pyro_lm.lm.causal_lm import submodules
from pyro_lm.lm.decoder import changed_rows, copy_rows, filler_token

__all__ = ["GPT2Decoder", "supports_fast_decoding", "SHARE_AT"]

#: Positions that every row shares (after resampling) join the decoder's one shared copy of
#: them once there are this many more: reorders then copy only the positions after them.
SHARE_AT = 32


def _gpt2_inside(model):
    """The ``GPT2LMHeadModel`` that ``model`` is, or that a peft LoRA model wraps, else ``None``."""
    from transformers import GPT2LMHeadModel

    if type(model) is GPT2LMHeadModel:
        return model
    try:
        import peft
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    if not isinstance(model, peft.PeftModel):
        return None
    if any(c.peft_type != peft.PeftType.LORA for c in model.peft_config.values()):
        return None  # prompt tuning and other tuners change the forward pass itself
    base = model.get_base_model()
    return base if type(base) is GPT2LMHeadModel else None


@functools.cache
def _tuner_layer():
    """peft's ``BaseTunerLayer`` (``()``, which no module is an instance of, without peft):
    looked up once, since :func:`supports_fast_decoding` asks for every module of a model."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - depends on the environment
        return ()
    return BaseTunerLayer


def _is_lora_layer(module) -> bool:
    return isinstance(module, _tuner_layer())


def _foldable(module) -> bool:
    """A module whose weights :func:`_folded` reproduces: a plain projection, or a peft LoRA
    ``Linear`` over one, with vanilla adapters (no DoRA or other variant, no bias on B)."""
    from transformers.pytorch_utils import Conv1D

    projections = (torch.nn.Linear, Conv1D)
    if not _is_lora_layer(module):
        return isinstance(module, projections)
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or not isinstance(module.get_base_layer(), projections):
        return False
    if module.disable_adapters and module.merged:  # its forward would unmerge first
        return False
    active = [a for a in module.active_adapters if a in module.lora_A]
    return not any(a in module.lora_variant or module.lora_B[a].bias is not None
                   for a in active)


def _folded(module):
    r"""``(weight, bias)`` of a projection in its own layout, with the active LoRA adapters
    of a peft layer added, :math:`W + s\,BA`: what its forward computes without dropout."""
    if not _is_lora_layer(module):
        return module.weight, module.bias
    base = module.get_base_layer()
    weight = base.weight
    if not (module.disable_adapters or module.merged):
        for a in module.active_adapters:
            if a in module.lora_A:
                weight = weight + module.get_delta_weight(a).to(weight.dtype)
    return weight, base.bias


def supports_fast_decoding(model) -> bool:
    """Whether ``model`` is a plain ``GPT2LMHeadModel``, or one wrapped by peft with LoRA
    adapters on its projections, that this decoder reproduces exactly."""
    gpt2 = _gpt2_inside(model)
    if gpt2 is None:
        return False
    cfg = gpt2.config
    if not (cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
            and cfg.scale_attn_weights and not cfg.scale_attn_by_inverse_layer_idx
            and not cfg.reorder_and_upcast_attn and not cfg.add_cross_attention
            and not any(h.attn.is_cross_attention for h in gpt2.transformer.h)):
        return False
    read = [gpt2.lm_head] + [m for b in gpt2.transformer.h
                             for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    head = gpt2.lm_head.get_base_layer() if _is_lora_layer(gpt2.lm_head) else gpt2.lm_head
    if not isinstance(head, torch.nn.Linear) or not all(_foldable(m) for m in read):
        return False
    # a tuner layer anywhere else (embeddings, layer norms) is not read by this decoder
    modules = submodules(gpt2)
    tuners = {kind for kind in set(map(type, modules)) if issubclass(kind, _tuner_layer())}
    return sum(type(m) in tuners for m in modules) == sum(map(_is_lora_layer, read))


class GPT2Decoder:
    """Decoding state for ``N`` left-padded prompts of a GPT-2 model (static KV cache), a
    :class:`~pyro_lm.lm.decoder.Decoder`.

    :param lm: a :class:`~pyro_lm.CausalLM` wrapping a ``GPT2LMHeadModel``.
    :param torch.Tensor input_ids: ``(N, L)`` prompt ids, left-padded.
    :param torch.Tensor attention_mask: ``(N, L)``, 1 on real tokens.
    :param int max_new_tokens: the most tokens that will be fed after the prompt.
    """

    @torch.no_grad()
    def __init__(self, lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int):
        model = _gpt2_inside(lm.model)
        self.transformer = model.transformer
        cfg = model.config
        self.width, self.heads = cfg.n_embd, cfg.n_head
        self.head_dim, self.eps = cfg.n_embd // cfg.n_head, cfg.layer_norm_epsilon
        # this decoder never reads an id as padding, so ended rows may be fed the pad id
        # itself (samplers then skip the fill) when it is a row of the embedding
        pad = lm.pad_token_id
        self.filler_token = (pad if pad is not None and 0 <= pad < cfg.vocab_size
                             else filler_token(model))
        n, length = input_ids.shape
        self.padded = bool((attention_mask == 0).any())
        prompt_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = lm(input_ids, attention_mask, prompt_positions, use_cache=True,
                           logits_to_keep=1)
        self.logits = logits[:, -1].float()  # (N, V)
        tr = self.transformer
        # the weights each step reads, looked up once (LoRA adapters folded in)
        self._embed = (tr.wte.weight, tr.wpe.weight)
        self._blocks = [(b.ln_1.weight, b.ln_1.bias, *_folded(b.attn.c_attn),
                         *_folded(b.attn.c_proj), b.ln_2.weight, b.ln_2.bias,
                         *_folded(b.mlp.c_fc), *_folded(b.mlp.c_proj)) for b in tr.h]
        self._final = (tr.ln_f.weight, tr.ln_f.bias, *_folded(model.lm_head))
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
        # the positions every row shares (after resampling, all particles descend from one
        # ancestor there): once at least SHARE_AT of them, they are kept once, in
        # self._shared, and attention reads them from there, so a reorder copies only the
        # positions after them. On CPU, where which lineage wrote each position is tracked
        # (self._origin, int32 numpy (N, positions)) and counting the shared ones is free,
        # for runs long enough to gain from it (the bookkeeping costs a little per reorder)
        self.shared_length, self._shared, self._origin = 0, None, None
        if like.device.type == "cpu" and n > 1 and max_new_tokens > 2 * SHARE_AT:
            same = bool((input_ids == input_ids[:1]).all()) \
                and bool((attention_mask == attention_mask[:1]).all())
            # host bookkeeping in numpy: a few microseconds a reorder, not a few dispatches
            self._row_ids = np.arange(n, dtype=np.int32)
            self._origin = np.empty((n, total), dtype=np.int32)
            self._origin[:, :length] = 0 if same else self._row_ids[:, None]
            self._labelled = length  # positions of self._origin written so far

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
                if self.shared_length:
                    a = self._split_attention(i, q, keys, values, t, mask)
                else:
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

    def _split_attention(self, i: int, q, keys, values, t: int, mask):
        r"""Attention of ``q`` ``(N, heads, head_dim)`` over the shared positions (one copy,
        in :attr:`_shared`) and the row's own ones, with one softmax over both:
        :math:`\mathrm{softmax}([q K_s^\top, q K_r^\top] / \sqrt{d})\,[V_s; V_r]`, what
        ``scaled_dot_product_attention`` computes on the whole cache. ``(N, heads, head_dim)``."""
        p = self.shared_length
        shared_k, shared_v = self._shared[0, i, 0, :, :p], self._shared[1, i, 0, :, :p]
        by_head = q.transpose(0, 1)  # (heads, N, head_dim): the shared part is one bmm
        scores = torch.cat([torch.bmm(by_head, shared_k.transpose(1, 2)).transpose(0, 1),
                            torch.matmul(q[:, :, None], keys[:, :, p:t + 1].transpose(-1, -2))
                            .squeeze(2)], -1)  # (N, heads, t + 1)
        scores = scores.float() * self.head_dim ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], -math.inf)
        w = scores.softmax(-1).to(q.dtype)
        out = torch.bmm(w[..., :p].transpose(0, 1), shared_v).transpose(0, 1)
        return out + torch.matmul(w[:, :, None, p:], values[:, :, p:t + 1]).squeeze(2)

    def reorder(self, index: torch.Tensor, logits: bool = True) -> None:
        """Keep sequence ``index[i]`` in row ``i`` (after resampling).

        Only the rows whose ancestor changed (``index[i] != i``) are copied, and only their
        positions after the shared ones. On CPU they are found first (the count is free to
        read there) and copied in place when they are at most half the rows; otherwise, and
        on accelerators (where reading the count would cost a host sync), every filled row
        is gathered into a spare buffer. On CPU the positions that every row now shares
        join the shared copy once there are :data:`SHARE_AT` more of them.

        :param bool logits: also reorder :attr:`logits`; pass ``False`` when
            :meth:`advance` comes next and replaces them.
        """
        filled, n, p = self.length, index.shape[0], self.shared_length
        # positions past self.length are written by advance before attention reads them,
        # and those before self.shared_length are read from the shared copy
        kv = self._kv[..., p:filled, :]
        rows = changed_rows(index)
        if rows is not None:
            if rows.numel() == 0:
                return
            if 2 * rows.numel() <= n:
                copy_rows(kv, 2, rows.tolist(), index.index_select(0, rows).tolist())
                self._reorder_rows(index, logits)
                self._share(index)
                return
        # gather into the spare buffer and swap (faster than gathering in place, for twice
        # the cache's memory)
        if self._spare is None:
            self._spare = torch.empty_like(self._kv)
        torch.index_select(kv, 2, index, out=self._spare[..., p:filled, :])
        self._kv, self._spare = self._spare, self._kv
        self.keys, self.values = self._kv.unbind(0)
        self._reorder_rows(index, logits)
        self._share(index)

    def _share(self, index: torch.Tensor) -> None:
        """Follow the rows' lineages through ``index`` and move the positions that every row
        now shares (at least :data:`SHARE_AT` more) into the shared copy."""
        origin, filled, p = self._origin, self.length, self.shared_length
        if origin is None:
            return
        origin[:, self._labelled:filled] = self._row_ids[:, None]  # written since: their own
        self._labelled = filled
        block = origin[:, p:filled].take(index.numpy(), axis=0)
        origin[:, p:filled] = block
        # the shared positions are a prefix (rows that share a position's writer share its
        # history): if the SHARE_AT-th position from p is not shared, fewer than SHARE_AT are
        if filled - p < SHARE_AT or (block[:, SHARE_AT - 1] != block[0, SHARE_AT - 1]).any():
            return
        run = int((block == block[:1]).all(0).cumprod().sum())
        if self._shared is None:
            self._shared = torch.empty_like(self._kv[:, :, :1])
        self._shared[..., p:p + run, :] = self._kv[:, :, :1, :, p:p + run, :]
        self.shared_length = p + run

    def _reorder_rows(self, index: torch.Tensor, logits: bool) -> None:
        """Reorder the per-row state other than the cache (small: masks, positions)."""
        if self.padded:
            self.mask = self.mask.index_select(0, index)
            self.next_position = self.next_position.index_select(0, index)
        if logits:  # a new tensor: callers may hold the old one
            self.logits = self.logits.index_select(0, index)
