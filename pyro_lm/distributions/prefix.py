r"""Prefix evaluation: how rewards see partially generated completions.

Token-level SMC evaluates the model's factors on prefixes ``x[:t]``. The value
keeps its full shape ``(..., T)``; positions ``>= t`` are not generated yet
and hold ``pad_token_id``. Inside :func:`prefix_context` rewards ask
:func:`generated_mask` which positions are real, and :func:`is_complete`
which sequences are final (they emitted EOS, or ``t == T``). Outside it every
value is a full completion.
"""

from __future__ import annotations

import contextvars

import torch

__all__ = ["prefix_context", "prefix_length", "generated_mask", "is_complete", "counted_mask",
           "is_eos"]

_PREFIX_LENGTH: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "pyro_lm_prefix_length", default=None)


class prefix_context:
    """Within this context, LM values are prefixes of ``length`` generated tokens.

    A small class rather than a generator-based context manager: SMC enters it
    once per token.
    """

    __slots__ = ("length", "_token")

    def __init__(self, length: int):
        if length < 0:
            raise ValueError(f"length: expected a non-negative int, got {length}")
        self.length = int(length)
        self._token = None

    def __enter__(self):
        self._token = _PREFIX_LENGTH.set(self.length)
        return self

    def __exit__(self, *exc_info):
        _PREFIX_LENGTH.reset(self._token)
        self._token = None


def prefix_length() -> int | None:
    """The current prefix length, or ``None`` outside :func:`prefix_context`."""
    return _PREFIX_LENGTH.get()


def generated_mask(x: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., T)``: positions already generated (all ``True`` outside a prefix context)."""
    t = _PREFIX_LENGTH.get()
    if t is None:
        return torch.ones_like(x, dtype=torch.bool)
    return (torch.arange(x.shape[-1], device=x.device) < t).expand_as(x)


def is_eos(x: torch.Tensor, eos) -> torch.Tensor:
    """Bool, the shape of ``x``: tokens that end a completion.

    :param eos: one EOS id, or a sequence of them (models that ship several, such as
        instruct models ending a turn with one token and a document with another).
    """
    if isinstance(eos, int):
        return x == eos
    if len(eos) == 1:
        return x == eos[0]
    return torch.isin(x, torch.as_tensor(eos, dtype=x.dtype, device=x.device))


def counted_mask(x: torch.Tensor, eos) -> torch.Tensor:
    """Bool ``(..., T)``: generated positions before the first EOS (content tokens).

    :param eos: an EOS id or a sequence of them (see :func:`is_eos`).
    """
    # an EOS at a position >= t (padding may equal EOS) only moves later prefix sums, and
    # those positions are not generated: counting it changes nothing below t
    before = is_eos(x, eos).cumsum(-1) == 0
    t = _PREFIX_LENGTH.get()
    if t is None or t >= x.shape[-1]:
        return before
    return before & (torch.arange(x.shape[-1], device=x.device) < t)


def is_complete(x: torch.Tensor, eos) -> torch.Tensor:
    """Bool ``(...)``: sequences whose value is final.

    :param eos: an EOS id or a sequence of them (see :func:`is_eos`).
    """
    t = _PREFIX_LENGTH.get()
    if t is None or t >= x.shape[-1]:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    return is_eos(x[..., :t], eos).any(-1)
