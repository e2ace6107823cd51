"""The interface of a token-by-token decoder, shared by every implementation.

A decoder holds the decoding state of ``N`` sequences (KV cache, attention
mask, positions) and their next-token logits. Sampling
(:func:`~pyro_lm.lm.decoding.sample_tokens`) and token-level SMC
(:class:`~pyro_lm.infer.SMC`) drive one through this interface only, so that
:class:`~pyro_lm.lm.decoding.IncrementalDecoder` (any transformers causal LM) and
:class:`~pyro_lm.lm.gpt2_decoder.GPT2Decoder` (a lean path for GPT-2) are
interchangeable; :func:`~pyro_lm.lm.decoding.make_decoder` picks one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Decoder", "changed_rows", "copy_rows", "filler_token"]


@runtime_checkable
class Decoder(Protocol):
    """Decoding state of ``N`` sequences, advanced one token at a time.

    :ivar torch.Tensor logits: ``(N, V)`` float32 next-token logits of every row.
    :ivar int filler_token: the id to feed rows that have ended (see :func:`filler_token`).
    """

    logits: torch.Tensor
    filler_token: int

    def log_probs(self) -> torch.Tensor:
        """Next-token log-probabilities ``(N, V)`` in float32."""
        ...

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per sequence, ``tokens`` of shape ``(N,)``, and replace :attr:`logits`."""
        ...

    def reorder(self, index: torch.Tensor, logits: bool = True) -> None:
        """Keep sequence ``index[i]`` in row ``i`` (after resampling), in place.

        :param torch.Tensor index: ``(N,)`` LongTensor of source rows.
        :param bool logits: also reorder :attr:`logits`; pass ``False`` when
            :meth:`advance` comes next and replaces them.
        """
        ...


def filler_token(model) -> int:
    """The token fed to rows that have ended: any id but the model config's pad id, so that
    transformers does not take them for unmasked padding (their outputs are unused)."""
    config_pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return 1 if config_pad == 0 else 0


def changed_rows(index: torch.Tensor) -> torch.Tensor | None:
    """The rows ``i`` with ``index[i] != i`` (a LongTensor), for a reorder that copies only
    those; ``None`` off the CPU, where counting them would cost a host sync."""
    if index.device.type != "cpu":
        return None
    return (index != torch.arange(index.shape[0], device=index.device)).nonzero().squeeze(-1)


def copy_rows(tensor: torch.Tensor, dim: int, rows: list[int], sources: list[int]) -> None:
    """In place, ``tensor``'s row ``rows[k]`` (along ``dim``) becomes its former row
    ``sources[k]``: a source that is itself overwritten is saved first. One copy per row,
    which on CPU beats ``index_copy_`` (and, for a few rows, a full ``index_select``)."""
    overwritten = set(rows)
    saved = {s: tensor.select(dim, s).clone() for s in set(sources) if s in overwritten}
    for r, s in zip(rows, sources, strict=True):
        tensor.select(dim, r).copy_(saved[s] if s in saved else tensor.select(dim, s))
