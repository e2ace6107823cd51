r"""The reward interface.

A reward maps completions ``x`` of shape ``(*batch, T)`` to float tensors of
shape ``(*batch,)`` on the same device. In a model it enters as a log-factor,
``pyro.factor("reward", reward(x) / beta)``. ``-inf`` is a legal value (a hard
constraint); NaN is an error naming the reward.
"""

from __future__ import annotations

import torch

from pyro_lm.distributions.prefix import counted_mask

__all__ = ["Reward", "Callable", "decode_counted"]


def _special_ids(tokenizer_or_lm):
    """``(tokenizer, eos, pad)`` from a tokenizer or a :class:`~pyro_lm.CausalLM`."""
    if hasattr(tokenizer_or_lm, "tokenizer") and hasattr(tokenizer_or_lm, "eos_token_id"):
        lm = tokenizer_or_lm
        return lm.tokenizer, lm.eos_token_id, lm.pad_token_id
    tok = tokenizer_or_lm
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None:
        raise ValueError("tokenizer: it defines neither an EOS nor a pad token")
    return tok, eos, pad


def decode_counted(tokenizer, x: torch.Tensor, eos: int) -> list[str]:
    """Decode the generated content of each row of ``x`` (``(N, T)``), up to the first EOS."""
    keep = counted_mask(x, eos)
    rows = x.tolist()
    masks = keep.tolist()
    return [tokenizer.decode([t for t, k in zip(r, m, strict=True) if k], skip_special_tokens=True)
            for r, m in zip(rows, masks, strict=True)]


class Reward:
    """Base class: subclasses implement :meth:`forward` on ``(N, T)`` rows.

    :param str name: used in error messages (default: the class name).
    """

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() < 1:
            raise TypeError(f"reward {self.name!r}: x must be a LongTensor (*batch, T), got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        r = self.forward(flat)
        if not isinstance(r, torch.Tensor) or r.device != x.device:
            r = torch.as_tensor(r, device=x.device)
        if not r.is_floating_point():
            r = r.float()
        if r.shape != flat.shape[:1]:
            raise ValueError(f"reward {self.name!r}: returned shape {tuple(r.shape)}, expected "
                             f"one value per sequence ({flat.shape[0]},)")
        if r.isnan().any():
            raise ValueError(
                f"reward {self.name!r} returned NaN for {int(r.isnan().sum())} of {r.numel()} "
                "sequences; a reward must be a real number or -inf (hard constraint). "
                "Check the reward function on these inputs")
        return r if x.dim() == 2 else r.reshape(x.shape[:-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Callable(Reward):
    """Wrap any function ``x -> (*batch,)`` as a reward (adds the NaN and shape checks).

    :param fn: a callable taking ``(*batch, T)`` token ids.
    :param str name: the name used in errors (default: the function's name).
    """

    def __init__(self, fn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        super().__init__(name or getattr(fn, "__name__", "Callable"))
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
