r"""The reward interface, and the contract a reward keeps on prefixes.

A reward maps completions ``x`` of shape ``(*batch, T)`` (LongTensor; every
position after the first EOS holds the pad id) to float tensors of shape
``(*batch,)`` on the same device. In a model it enters as a log-factor,
``pyro.factor("reward", reward(x) / beta)``, so that the target is

.. math:: p^*(x) \propto p_0(x)\, \exp\big(r(x) / \beta\big).

``-inf`` is a legal value (a hard constraint: :math:`p^*(x) = 0`); NaN and
``+inf`` are errors naming the reward.

**Prefixes.** Token-level SMC also evaluates the reward on prefixes: inside
:func:`~pyro_lm.distributions.prefix_context` ``(t)`` the value holds the first
``t`` generated tokens, padded; :func:`~pyro_lm.distributions.prefix.counted_mask`
gives the content positions and :func:`~pyro_lm.distributions.prefix.is_complete`
the rows that are final (they emitted EOS, or ``t == T``). Write
:math:`\phi(x_{\le t})` for the value there and :math:`y \sqsupseteq x_{\le t}` for
the completions that extend the prefix. The incremental weights
:math:`\exp\{(\phi(x_{\le t}) - \phi(x_{\le t-1}))/\beta\}` telescope to
:math:`\exp\{r(x)/\beta\}`, so the final weights target :math:`p^*` whatever the
prefix values, provided that

1. :math:`\phi(x_{\le t})` is a real number, or :math:`-\infty` **only if**
   :math:`r(y) = -\infty` for every completion :math:`y \sqsupseteq x_{\le t}`
   (a particle of weight 0 is dropped for good: were one of its completions
   allowed, its posterior mass would be lost, and :math:`\hat Z` biased low);
2. on a complete row, :math:`\phi` is the reward of the completion itself.

Any finite prefix value keeps the estimates unbiased; the closer it is to
:math:`\beta \log \mathbb{E}_{p_0}[\exp(r(Y)/\beta) \mid Y \sqsupseteq x_{\le t}]`
(the optimal twist), the lower their variance. A ``-inf`` on a prefix is
therefore a promise that the prefix can no longer be completed into an allowed
text: a forbidden word counts once it is known to be that word (" the" is a
prefix of " they"), a required pattern is not required of a prefix.
:func:`~pyro_lm.rewards.check_prefix_contract` tests a reward against this on
sampled completions.
"""

from __future__ import annotations

import torch
from pyro.ops.provenance import get_provenance, track_provenance

from pyro_lm._validation import as_real_tensor
from pyro_lm.distributions.prefix import counted_mask, prefix_length
from pyro_lm.rewards.incremental import active_states

__all__ = ["Reward", "Callable", "as_values", "decode_counted", "special_ids"]


def special_ids(tokenizer_or_lm, name: str = "tokenizer"):
    """``(tokenizer, eos, pad)`` from a tokenizer or a :class:`~pyro_lm.CausalLM`; ``eos``
    is the tuple of every id that ends a completion (the first is ``eos_token_id``)."""
    if hasattr(tokenizer_or_lm, "tokenizer") and hasattr(tokenizer_or_lm, "eos_token_id"):
        lm = tokenizer_or_lm
        eos = tuple(getattr(lm, "eos_token_ids", None) or (lm.eos_token_id,))
        return lm.tokenizer, eos, lm.pad_token_id
    tok = tokenizer_or_lm
    if not (hasattr(tok, "eos_token_id") and hasattr(tok, "pad_token_id")
            and callable(getattr(tok, "decode", None))):
        raise TypeError(f"{name}: expected a transformers tokenizer or a pyro_lm.CausalLM "
                        f"(whose tokenizer and EOS ids the reward reads), got "
                        f"{type(tok).__name__}")
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None:
        raise ValueError("tokenizer: it defines neither an EOS nor a pad token; set "
                         "tokenizer.eos_token, or pass the CausalLM instead")
    return tok, (eos,), pad


def decode_counted(tokenizer, x: torch.Tensor, eos, **decode_kwargs) -> list[str]:
    """Decode the generated content of each row of ``x`` (``(N, T)``), up to the first EOS.

    :param eos: an EOS id or a sequence of them.
    :param decode_kwargs: passed to ``tokenizer.decode`` (``skip_special_tokens`` is
        ``True`` unless given).
    """
    decode_kwargs.setdefault("skip_special_tokens", True)
    keep = counted_mask(x, eos)
    rows = x.tolist()
    masks = keep.tolist()
    return [tokenizer.decode([t for t, k in zip(r, m, strict=True) if k], **decode_kwargs)
            for r, m in zip(rows, masks, strict=True)]


def as_values(r, x: torch.Tensor, name: str, where: str = "", error=ValueError) -> torch.Tensor:
    """A reward function's output ``r`` on rows ``x`` ``(N, T)`` as a float tensor ``(N,)``
    on ``x``'s device (NaN and infinities left for the caller to judge).

    :param str name: the reward's name, for the error.
    :param str where: what ``x`` is, for the error (e.g. ``" on prefixes of length 3"``).
    :param error: the exception class raised when the shape is not ``(N,)``.
    """
    r = as_real_tensor(r, x.device, f"reward {name!r}",
                       f"real values, one per sequence ({x.shape[0]},)", where)
    if r.shape != x.shape[:1]:
        raise error(f"reward {name!r}: returned shape {tuple(r.shape)}{where}, expected one "
                    f"value per sequence ({x.shape[0]},)")
    return r


class Reward:
    r"""Base class of rewards: subclasses implement :meth:`forward` on ``(N, T)`` rows.

    Calling a reward flattens the batch dimensions, calls :meth:`forward`, and checks
    its result: one float per row, on the input's device, never NaN or ``+inf``; the
    result carries the input's provenance (:mod:`pyro.ops.provenance`), as a function
    of it, even where :meth:`forward` decodes to text.
    :meth:`forward` keeps the prefix contract of :mod:`pyro_lm.rewards.base`: inside
    :func:`~pyro_lm.distributions.prefix_context` it returns, for each row, a real
    number, or ``-inf`` only when no completion of that prefix has a reward above
    ``-inf``; on complete rows, the reward of the completion.

    A reward may also have an *incremental form* (:meth:`initial_state`,
    :meth:`advance`, :meth:`state_value`; :mod:`pyro_lm.rewards.incremental`): the same
    prefix values, updated per token from a state instead of recomputed from the whole
    prefix. Inside a :class:`~pyro_lm.rewards.incremental.RewardStates` (SMC opens one
    per run) prefixes are scored that way where the state applies, complete rows equal to
    those of the last call at the same place are not scored again (a reward is a function
    of its rows: :meth:`~pyro_lm.rewards.incremental.RewardStates.complete`), and the NaN /
    ``+inf`` check is deferred to the end of the run.

    :param str name: used in error messages (default: the class name).
    """

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the incremental form (:mod:`pyro_lm.rewards.incremental`); optional -------------

    def initial_state(self, rows: int, device: torch.device) -> dict | None:
        """The state of ``rows`` empty prefixes on ``device`` (a dict of tensors whose
        first dim is the row), or ``None`` if the reward has no incremental form (the
        default: every prefix is scored by :meth:`forward`)."""
        return None

    def advance(self, state: dict, token: torch.Tensor, t: int) -> dict:  # pragma: no cover
        """The state after appending ``token`` ``(R,)`` at position ``t`` (it may be
        updated in place). ``token`` is padding on rows that ended before ``t``."""
        raise NotImplementedError

    def state_value(self, state: dict, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``(R,)``: :meth:`forward`'s value on the prefixes ``x`` ``(R, T)`` (inside
        :func:`~pyro_lm.distributions.prefix_context`), from their ``state``."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() < 1:
            raise TypeError(f"reward {self.name!r}: x must be a LongTensor (*batch, T), got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        states, t = active_states(), prefix_length()
        r = None
        if states is not None and t is not None:
            r = states.evaluate(self, flat, t)
        if r is None and states is not None and t is None:  # complete rows, maybe seen
            r = states.complete(self, flat, self._checked_forward)
        if r is None:
            r = self._checked_forward(flat)
        if states is not None:  # checked once per run, on the weights' way out
            states.flag(self.name, r)
        else:
            if r.isnan().any():
                raise ValueError(
                    f"reward {self.name!r} returned NaN for {int(r.isnan().sum())} of "
                    f"{r.numel()} sequences; a reward must be a real number or -inf (hard "
                    "constraint). Check the reward function on these inputs")
            if r.isposinf().any():
                raise ValueError(
                    f"reward {self.name!r} returned +inf for {int(r.isposinf().sum())} of "
                    f"{r.numel()} sequences; a reward must be a real number or -inf (hard "
                    "constraint)")
        r = r if x.dim() == 2 else r.reshape(x.shape[:-1])
        # a reward is a function of x, also where forward leaves torch (decoding to text):
        # keep x's provenance, by which TraceGraph_ELBO finds the costs downstream of x
        provenance = get_provenance(x)
        return track_provenance(r, provenance) if provenance else r

    def _checked_forward(self, rows: torch.Tensor) -> torch.Tensor:
        return as_values(self.forward(rows), rows, self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Callable(Reward):
    """Wrap any function ``x -> (*batch,)`` as a reward (adds the NaN and shape checks).

    The function sees prefixes too (see :mod:`pyro_lm.rewards.base`); one that returns
    ``-inf`` must do so only for prefixes that no completion can redeem.

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
