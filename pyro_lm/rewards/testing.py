r"""Check a reward against the prefix contract of :mod:`pyro_lm.rewards.base`.

For completions :math:`x` (given, or sampled from an LM) and every prefix length
:math:`t < T`, the reward is evaluated on the padded prefix :math:`x_{\le t}` inside
:func:`~pyro_lm.distributions.prefix_context` ``(t)``, as token-level SMC does, and
on :math:`x` itself. Each completion :math:`x` with :math:`r(x) > -\infty` witnesses
that none of its prefixes may score :math:`-\infty`; on the prefixes that are
already complete the value must be :math:`r(x)`. A check on samples can only find
violations, never prove their absence: draw the completions where the reward is
hardest (forbidden words as parts of longer words, patterns cut by the end of a
prefix).

Example::

    from pyro_lm.rewards import Lexicon, check_prefix_contract

    reward = Lexicon(lm, {"the": -math.inf})
    check_prefix_contract(reward, lm=lm, prompts="Review:", max_new_tokens=12)
"""

from __future__ import annotations

import itertools
import math

import torch

from pyro_lm.distributions.prefix import is_complete, prefix_context
from pyro_lm.rewards.base import Reward, as_values
from pyro_lm.rewards.incremental import RewardStates

__all__ = ["PrefixContractError", "check_prefix_contract"]


class PrefixContractError(ValueError):
    """A reward broke the prefix contract; the message names the prefix and completion."""


def _values(reward, x: torch.Tensor, what: str) -> torch.Tensor:
    """The reward's raw values on ``x`` ``(N, T)``, shape-checked, NaN and +inf allowed
    (they are reported per row by the caller)."""
    raw = reward.forward(x) if isinstance(reward, Reward) else reward(x)
    return as_values(raw, x, _name(reward), f" on {what}", PrefixContractError)


def _name(reward) -> str:
    return getattr(reward, "name", None) or getattr(reward, "__name__", type(reward).__name__)


def check_prefix_contract(reward, completions: torch.Tensor | None = None, *, lm=None,
                          prompts=None, num_samples: int = 64,
                          max_new_tokens: int | None = None, eos=None, pad: int | None = None,
                          tokenizer=None, atol: float = 1e-5) -> int:
    r"""Raise :class:`PrefixContractError` if ``reward`` breaks the prefix contract on
    the prefixes of some completions.

    Violations, each reported with the reward's name, the prefix and the completion
    (ids and text): a prefix scoring NaN or ``+inf``; a prefix scoring ``-inf`` whose
    completion scores more (a finite value: that completion is allowed, so the prefix
    must not be pruned); a complete prefix (it emitted EOS) scoring other than its
    completion; a completion scoring NaN or ``+inf``; for a reward with an incremental
    form (:mod:`pyro_lm.rewards.incremental`), a prefix on which it and
    :meth:`~pyro_lm.rewards.Reward.forward` disagree.

    :param reward: a :class:`~pyro_lm.rewards.Reward` or any callable
        ``(N, T) -> (N,)``.
    :param torch.Tensor completions: LongTensor ``(*batch, T)``, every position after
        the first EOS holding ``pad``; or ``None`` to sample them from ``lm``.
    :param lm: a :class:`~pyro_lm.CausalLM`: draws ``num_samples`` completions of each
        of ``prompts`` (``max_new_tokens`` long) when ``completions`` is ``None``, and
        gives the EOS ids, the pad id and the tokenizer.
    :param prompts: what :class:`~pyro_lm.LMDistribution` takes as prompts.
    :param int num_samples: completions drawn per prompt.
    :param int max_new_tokens: ``T`` of the sampled completions.
    :param eos: the EOS id(s) (default: the LM's, else the reward's ``eos``).
    :param int pad: the pad id (default: the LM's, else the reward's ``pad``).
    :param tokenizer: to show texts in the error (default: the LM's or the reward's).
    :param float atol: tolerance when comparing a complete prefix with its completion.
    :returns: the number of (completion, prefix) pairs checked.
    """
    if completions is None:
        if lm is None or prompts is None or max_new_tokens is None:
            raise ValueError("completions: pass completions, or lm=, prompts= and "
                             "max_new_tokens= to sample them")
        from pyro_lm.distributions import LMDistribution

        with torch.no_grad():
            completions = LMDistribution(lm, prompts, max_new_tokens).sample((num_samples,))
    if not isinstance(completions, torch.Tensor) or completions.dtype != torch.long \
            or completions.dim() < 1:
        raise TypeError("completions: expected a LongTensor (*batch, T) of token ids, got "
                        f"{getattr(completions, 'dtype', type(completions).__name__)}")
    x = completions.reshape(-1, completions.shape[-1])
    if eos is None:
        eos = (tuple(getattr(lm, "eos_token_ids", None) or (lm.eos_token_id,)) if lm is not None
               else getattr(reward, "eos", None))
    if pad is None:
        pad = lm.pad_token_id if lm is not None else getattr(reward, "pad", None)
    if eos is None or pad is None:
        raise ValueError("eos, pad: pass them (or lm=), the reward does not name its EOS and "
                         "pad ids")
    if tokenizer is None:
        tokenizer = getattr(lm, "tokenizer", None) or getattr(reward, "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a CausalLM given as tokenizer

    stops = {eos} if isinstance(eos, int) else set(eos)

    def show(row: torch.Tensor, t: int | None) -> str:
        ids = row.tolist() if t is None else row[:t].tolist()
        if tokenizer is None:
            return str(ids)
        content = list(itertools.takewhile(lambda i: i not in stops, ids))
        return f"{ids} ({tokenizer.decode(content, skip_special_tokens=True)!r})"

    name = _name(reward)
    final = _values(reward, x, "the completions")
    for bad, what in ((final.isnan(), "NaN"), (final.isposinf(), "+inf")):
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise PrefixContractError(f"reward {name!r} is {what} on the completion "
                                      f"{show(x[i], None)}; a reward is a real number or -inf")
    big_t, checked = x.shape[-1], 0
    incremental = isinstance(reward, Reward) and reward.initial_state(1, x.device) is not None
    states = RewardStates()
    for t in range(big_t):
        prefix = x.clone()
        prefix[:, t:] = pad
        with prefix_context(t):
            value = _values(reward, prefix, f"prefixes of length {t}")
            done = is_complete(prefix, eos)
            if incremental:  # the incremental form, token by token, must agree
                with states:
                    states.begin()
                    hits = states.hits
                    step = states.evaluate(reward, prefix, t)
                if step is None or states.hits != hits + 1:
                    raise PrefixContractError(f"reward {name!r}: its incremental state was not "
                                              f"used on the prefixes of length {t}")
                step = as_values(step, prefix, name, f" (incremental) on prefixes of length {t}",
                                 PrefixContractError)
        checked += x.shape[0]
        problems = [
            (value.isnan(), "NaN on the prefix {p}"),
            (value.isposinf(), "+inf on the prefix {p}"),
            (value.isneginf() & ~final.isneginf(),
             "-inf on the prefix {p}, but {f} on its completion {c}: -inf on a prefix must mean "
             "that no completion of it is allowed (count a forbidden word only once it has "
             "ended; give a prefix whose outcome is open a finite value)"),
            (done & ~(torch.isclose(value, final, atol=atol, rtol=0)
                      | (value.isneginf() & final.isneginf())),
             "{v} on the complete prefix {p}, but {f} on the completion {c}: once EOS is "
             "emitted the prefix is the completion"),
        ]
        if incremental:
            problems.append((~(torch.isclose(step, value, atol=atol, rtol=0)
                               | (step.isneginf() & value.isneginf())),
                             "{s} on the prefix {p} by its incremental form (initial_state, "
                             "advance, state_value), but {v} by forward: the two forms must "
                             "agree"))
        for bad, message in problems:
            if bad.any():
                rows = bad.nonzero()[:, 0]
                i = int(rows[0])
                others = rows.numel() - 1
                more = (f" ({others} more {'row' if others == 1 else 'rows'} at this length)"
                        if others else "")
                raise PrefixContractError(
                    f"reward {name!r} is " + message.format(
                        p=f"{show(x[i], t)} of length {t}", c=show(x[i], None),
                        f=_fmt(final[i]), v=_fmt(value[i]),
                        s=_fmt(step[i]) if incremental else "") + more)
    return checked


def _fmt(v: torch.Tensor) -> str:
    v = float(v)
    return "-inf" if v == -math.inf else f"{v:.6g}"
