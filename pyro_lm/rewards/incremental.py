r"""Incremental rewards: a reward's value on a growing prefix, updated token by token.

Token-level SMC evaluates a model's factors on the prefixes :math:`x_{\le 1}, x_{\le 2},
\ldots` of the same rows, and a reward that reads the whole prefix (decoding it, matching
its words) then costs :math:`O(t)` at step :math:`t`, :math:`O(T^2)` per run. A reward
with an *incremental form* keeps a per-row state instead,

.. math::

    s_0 = \mathrm{init}(N), \qquad s_{t+1} = \mathrm{advance}(s_t, x_{t+1}), \qquad
    \phi(x_{\le t}) = \mathrm{value}(s_t, x_{\le t}),

with :math:`\phi` exactly the value :meth:`~pyro_lm.rewards.Reward.forward` returns on the
prefix (a reward's contract, :mod:`pyro_lm.rewards.base`, is unchanged: an incremental
form is only a cheaper way to compute the same numbers). A reward declares it by
implementing :meth:`~pyro_lm.rewards.Reward.initial_state`,
:meth:`~pyro_lm.rewards.Reward.advance` and :meth:`~pyro_lm.rewards.Reward.state_value`;
:func:`~pyro_lm.rewards.check_prefix_contract` checks the two forms agree.

:class:`RewardStates` holds the states while an algorithm evaluates prefixes (SMC opens
one per run; :func:`~pyro_lm.infer.prefix_elbo.prefix_factors` one per call). Inside it,
a reward called on a prefix looks up its state (keyed by the reward and by its place
among the reward calls of one evaluation of the model), checks that the rows' tokens
before the state's length are the ones the state was built from, advances it over the
new columns and returns its value. Whenever that check fails (other rows, tokens that
changed) the reward's :meth:`~pyro_lm.rewards.Reward.forward` is used and the state is left
as it was; on a prefix shorter than the state's, or of one token (the next LM site of a
program, read at the same place), the state starts over from the new rows. Either way the
result is exact whatever the model does with its values. With :attr:`RewardStates.rows`
set, a call on ``C`` times as many rows is read as ``C`` candidate next tokens of each row
(block ``c`` of the rows holding candidate ``c``), as SMC's lookahead proposal scores them:
the rows' state is copied ``C`` times and advanced by the candidates; a call on other rows
(a subset, at step ends) reads its prefixes whole. On resampling, the algorithm calls
:meth:`RewardStates.reorder` so that the states follow their rows. Outside a prefix context
(complete rows: an earlier LM site's completion, scored again in every evaluation while a
later site is decoded) a call whose rows equal those of the last call at the same place of
an evaluation returns its values (:meth:`RewardStates.complete`: a reward is a function of
its rows). The same object defers the rewards' NaN / ``+inf`` checks to
:meth:`RewardStates.check` (one per reward and run, rather than a host sync
per call); the error still names the reward.

A state is a dict of tensors whose first dim is the row.
"""

from __future__ import annotations

import contextvars

import torch

__all__ = ["RewardStates", "active_states"]

_ACTIVE: contextvars.ContextVar[RewardStates | None] = contextvars.ContextVar(
    "pyro_lm_reward_states", default=None)


def active_states() -> RewardStates | None:
    """The :class:`RewardStates` in effect, or ``None``."""
    return _ACTIVE.get()


#: The complete calls whose rows and values :meth:`RewardStates.complete` keeps (the least
#: recently used go first: a reward made anew in every evaluation does not pile up).
COMPLETE_CALLS_KEPT = 64
#: The reward call sites whose states a :class:`RewardStates` keeps (the oldest made go
#: first; a call whose state went reads its prefix whole, or starts a state over).
CALL_SITES_KEPT = 64


class _Entry:
    """One reward call site's state: ``state`` (tensors with a leading row dim), the
    ``tokens`` ``(R, T)`` it was built from, valid in columns ``< length``; it holds its
    ``reward``, so that the reward's id, in the key, names no other reward meanwhile."""

    __slots__ = ("reward", "state", "tokens", "length")

    def __init__(self, reward, state, tokens):
        self.reward, self.state, self.tokens, self.length = reward, state, tokens, 0


class RewardStates:
    """The incremental rewards' states of one run over growing prefixes of the same rows.

    Used as a context manager by the algorithm that evaluates prefixes; every reward
    called inside it on a prefix (:func:`~pyro_lm.distributions.prefix_context`) with an
    incremental form uses its state. :meth:`begin` marks the start of each evaluation of
    the model (reward calls are numbered within one), :meth:`reorder` makes the states
    follow resampled rows, :meth:`check` raises the NaN / ``+inf`` errors deferred during
    the run.

    >>> import torch
    >>> from pyro_lm.distributions import prefix_context
    >>> from pyro_lm.lm import toy_lm
    >>> from pyro_lm.rewards import Lexicon
    >>> lm = toy_lm(vocab_size=4)
    >>> reward = Lexicon(lm, {lm.tokenizer.decode([2]).strip(): 1.0})
    >>> x = torch.tensor([[2, 2, 1], [1, 2, 0]])
    >>> with RewardStates() as states:
    ...     for t in (1, 2, 3):
    ...         states.begin()
    ...         with prefix_context(t):
    ...             value = reward(x.masked_fill(torch.arange(3) >= t, lm.pad_token_id))
    >>> value.tolist(), states.hits
    ([2.0, 1.0], 3)
    """

    def __init__(self):
        self._entries: dict = {}
        self._calls: dict = {}
        self._complete: dict = {}  # call site -> (rows, values) of its last complete call
        self._complete_calls: dict = {}
        self._flags: dict = {}
        self._token = None
        #: reward calls answered from a state (a count, for tests and benchmarks)
        self.hits = 0
        #: calls on complete rows answered by the values of an earlier call (a count)
        self.recalled = 0
        #: the number of rows whose prefixes grow (set by the algorithm, e.g. SMC's
        #: particles x prompts): a call on a multiple of them is read as candidate
        #: extensions of those rows by one token (the lookahead proposal's)
        self.rows = None

    def __enter__(self):
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc_info):
        _ACTIVE.reset(self._token)
        self._token = None

    def begin(self) -> None:
        """A new evaluation of the model starts: number its reward calls from 0."""
        self._calls.clear()
        self._complete_calls.clear()

    def complete(self, reward, x: torch.Tensor, compute) -> torch.Tensor:
        """``reward``'s values ``(R,)`` on the complete rows ``x`` ``(R, T)``: those of the
        last complete call at the same place of an evaluation if its rows were equal (the
        rows follow :meth:`reorder`), else ``compute(x)``. A program with several LM sites
        scores an earlier site's completion in every evaluation while a later site is
        decoded: a reward is a function of its rows, so it is computed once."""
        occurrence = self._complete_calls.get(id(reward), 0)
        self._complete_calls[id(reward)] = occurrence + 1
        key = (id(reward), occurrence)
        seen = self._complete.pop(key, None)
        if seen is not None and seen[0].shape == x.shape and seen[0].device == x.device \
                and torch.equal(seen[0], x):
            self.recalled += 1
            values = seen[1].clone()
        else:
            values = compute(x)
            seen = (x.clone(), values.clone(), reward)  # (holding the reward keeps its id)
        self._complete[key] = seen  # the most recently used goes last
        if len(self._complete) > COMPLETE_CALLS_KEPT:
            del self._complete[next(iter(self._complete))]
        return values

    def evaluate(self, reward, x: torch.Tensor, t: int):
        """``reward``'s value ``(R,)`` on the prefixes ``x`` ``(R, T)`` of length ``t``
        from its state, or ``None`` where the state does not apply (the caller then uses
        :meth:`~pyro_lm.rewards.Reward.forward`)."""
        occurrence = self._calls.get(id(reward), 0)
        self._calls[id(reward)] = occurrence + 1
        key = (id(reward), occurrence, x.shape[0])
        rows = self.rows
        if rows and x.shape[0] != rows:
            if t > 0 and x.shape[0] % rows == 0:
                return self._candidates(reward, key, x, t)  # a lookahead's candidates
            return None  # a subset of the rows (step ends): read whole, no state to build
        entry = self._entry(reward, key, x)
        if entry is None:
            return None
        tokens, start = entry.tokens, entry.length
        if t > x.shape[-1]:  # another site's prefix length: this value is complete
            return None
        if tokens.shape != x.shape or tokens.device != x.device or t < start \
                or not torch.equal(tokens[:, :start], x[:, :start]):
            if t >= start and t > 1:
                return None
            # a shorter prefix of other rows (the next LM site of a program, read at the
            # same place): the state starts over from them
            del self._entries[key]
            entry = self._entry(reward, key, x)
            tokens, start = entry.tokens, 0
        for column in range(start, t):
            entry.state = reward.advance(entry.state, x[:, column], column)
        tokens[:, start:t] = x[:, start:t]
        entry.length = t
        self.hits += 1
        return reward.state_value(entry.state, x)

    def _candidates(self, reward, key, x: torch.Tensor, t: int):
        """Values on ``C`` candidate extensions of the rows of a state (``x`` ``(C R, T)``,
        block ``c`` holding the ``R`` rows with candidate token ``c`` at ``t - 1``), as the
        lookahead proposal asks for them; the state itself is advanced to ``t - 1`` (by the
        rows' own tokens) but not past it. ``None`` if no state's rows fit."""
        rows = self.rows
        if t > x.shape[-1]:
            return None
        c = x.shape[0] // rows
        blocks = x.view(c, rows, x.shape[-1])
        own = blocks[0]
        entry = self._entry(reward, key[:2] + (rows,), own)
        if entry is None:
            return None
        start = entry.length
        if entry.tokens.shape != own.shape or t - 1 < start \
                or not torch.equal(entry.tokens[:, :start], own[:, :start]) \
                or not torch.equal(blocks[:, :, : t - 1],
                                   own[None, :, : t - 1].expand(c, rows, t - 1)):
            return None
        for column in range(start, t - 1):
            entry.state = reward.advance(entry.state, own[:, column], column)
        entry.tokens[:, start:t - 1] = own[:, start:t - 1]
        entry.length = t - 1
        state = {k: v.repeat((c,) + (1,) * (v.dim() - 1)) for k, v in entry.state.items()}
        state = reward.advance(state, x[:, t - 1], t - 1)
        self.hits += 1
        return reward.state_value(state, x)

    def _entry(self, reward, key, x):
        """The state of call site ``key`` over rows like ``x``, made if missing (``None``
        if the reward has no incremental form)."""
        entry = self._entries.get(key)
        if entry is None:
            state = reward.initial_state(x.shape[0], x.device)
            if state is None:
                return None
            entry = self._entries[key] = _Entry(reward, state, torch.empty_like(x))
            if len(self._entries) > CALL_SITES_KEPT:  # the oldest state goes
                del self._entries[next(iter(self._entries))]
        return entry

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow their ancestors ``index`` ``(R,)`` (after resampling), and so do the
        rows and values that :meth:`complete` keeps; those of another number of rows (a
        subset, candidates) are dropped."""
        for key, entry in list(self._entries.items()):
            if entry.tokens.shape[0] != index.numel():
                del self._entries[key]
                continue
            entry.tokens = entry.tokens.index_select(0, index)
            entry.state = {k: v.index_select(0, index) for k, v in entry.state.items()}
        for key, (rows, values, reward) in list(self._complete.items()):
            if rows.shape[0] != index.numel():
                del self._complete[key]
                continue
            self._complete[key] = (rows.index_select(0, index), values.index_select(0, index),
                                   reward)

    def flag(self, name: str, values: torch.Tensor) -> None:
        """Record, without a host sync, whether ``values`` hold NaN or ``+inf`` (their
        running maximum is NaN if any is, else ``+inf`` if any is)."""
        if not values.numel():
            return
        top = values.amax()
        seen = self._flags.get(name)
        self._flags[name] = top if seen is None else torch.maximum(seen, top)

    def check(self) -> None:
        """Raise the first deferred NaN / ``+inf`` error, naming the reward."""
        for name, top in ((k, float(v)) for k, v in self._flags.items()):
            nan, posinf = top != top, top == float("inf")
            if nan:
                raise ValueError(f"reward {name!r} returned NaN on some prefix; a reward must "
                                 "be a real number or -inf (hard constraint). Check the reward "
                                 "function on prefixes (pyro_lm.rewards.check_prefix_contract)")
            if posinf:
                raise ValueError(f"reward {name!r} returned +inf on some prefix; a reward must "
                                 "be a real number or -inf (hard constraint)")
