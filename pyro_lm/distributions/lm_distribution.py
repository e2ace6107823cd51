r"""A causal language model as a Pyro distribution over completions.

The value is the completion only, a LongTensor ``(*batch_shape, T)`` with
``T = max_new_tokens``. A completion ends at its first EOS, the first token of the
set :math:`E` = :attr:`~pyro_lm.CausalLM.eos_token_ids` (every later position holds
``pad_token_id``), or is truncated at ``T`` tokens, so the support is finite: every
sequence of at most ``T`` tokens.

.. math::

    p_0(x \mid c) = \prod_{t=1}^{\tau(x)} p_0(x_t \mid c, x_{<t}),
    \qquad \tau(x) = \min(\{t : x_t \in E\} \cup \{T\}).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import weakref
from collections.abc import Mapping

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from pyro_lm._validation import check_positive_int
from pyro_lm.distributions.prefix import is_eos
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.lm.decoding import sample_tokens

__all__ = ["LMDistribution", "SequenceConstraint", "after_first_eos", "prompt_cache", "unwrap_lm"]

#: Logit elements one chunk of :meth:`LMDistribution.log_prob` may hold (float32: 256 MiB);
#: the default ``memory_budget`` of :class:`LMDistribution` is these many float32 values.
LOG_PROB_BUDGET = 2**26

#: Bytes autograd saves per scored row, by LM and shape (see :func:`_saved_bytes_per_row`).
_SAVED_PER_ROW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the attribute prompt_with sets on the ids it built (valid by construction): their mask,
# both version counters and the vocabulary size the ids were checked against
_BUILT = "_pyro_lm_built_prompt"


_PROMPT_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pyro_lm_prompt_cache", default=None)


@contextlib.contextmanager
def prompt_cache():
    """Within this context, :class:`LMDistribution` reuses the prepared (tokenised and
    checked) prompts of arguments it has already seen: the same tensor objects, unmodified
    since, or equal strings, with the same LM; and :meth:`LMDistribution.prompt_with`
    returns the prompts it built last for the same distribution and completion objects,
    none of them changed since. Inference that re-runs a model many times on the same
    arguments (token-level SMC evaluates it once per token) uses it. Without gradients,
    :meth:`LMDistribution.token_log_probs` (and :meth:`~LMDistribution.log_prob`) score
    each distinct row (prompt and completion, compared by content) once, while the LM
    is unchanged (its training mode, autocast state and parameter versions): SMC scores
    an observed text once per run rather than after every token and on every copy of a
    resampled particle. It holds at most :data:`PROMPT_CACHE_SIZE` entries, the least
    recently used dropped first, and at most :data:`ROW_SCORES_LIMIT` scored rows each."""
    token = _PROMPT_CACHE.set({})
    try:
        yield
    finally:
        _PROMPT_CACHE.reset(token)


#: The most entries a :func:`prompt_cache` keeps (the oldest go first): a program whose
#: prompts change at every token (built from the prefix being decoded) does not pile up.
PROMPT_CACHE_SIZE = 64


def _store(cache: dict, key, entry) -> None:
    cache.pop(key, None)
    cache[key] = entry
    if len(cache) > PROMPT_CACHE_SIZE:
        del cache[next(iter(cache))]


def _prompt_key(lm, prompts, attention_mask):
    """A cache key that identifies the prompts' content, or ``None`` (do not cache)."""
    if isinstance(prompts, str):
        key = prompts
    elif isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        key = tuple(prompts)
    elif isinstance(prompts, (list, tuple)):  # chats: their content, if it is JSON
        try:
            key = ("chat", json.dumps(prompts, sort_keys=True))
        except (TypeError, ValueError):
            return None
    elif isinstance(prompts, torch.Tensor) and not prompts.is_inference():
        key = (id(prompts), prompts._version)  # inference tensors have no version counter
    else:
        return None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_inference():
            return None
        key = (key, id(attention_mask), attention_mask._version)
    return id(lm), key


#: The most scored rows a :func:`prompt_cache` keeps per LM and shape (then it starts over;
#: 0: it keeps none, and every row is scored at every call).
ROW_SCORES_LIMIT = 1 << 14


def _lm_state(lm) -> tuple:
    """What the LM's scores depend on besides its inputs: its training mode (dropout), the
    version counters of its parameters (an optimiser step bumps them) and autocast."""
    device = lm.device.type
    return (lm.model.training, torch.is_autocast_enabled(device),
            tuple(p._version for p in lm.model.parameters()))


class _RowScores:
    """The token log-probs of the distinct rows (prompt and completion) that
    :meth:`LMDistribution.token_log_probs` scored without gradients inside one
    :func:`prompt_cache`, for one LM, length and chunking; valid while the LM's
    :func:`_lm_state` is the one they were computed in."""

    def __init__(self, lm):
        self.lm = lm  # held: its id, in the cache key, names no other LM meanwhile
        self._forget(_lm_state(lm))

    def _forget(self, state: tuple) -> None:
        """Keep no scores: the LM is now in ``state``."""
        self.state = state
        self.positions: dict = {}  # (prompt row, completion row) -> row of table
        self.table = None  # (K, T) float32

    def lookup(self, dist, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(R, T)``: the scores of the rows ``x`` ``(R, T)`` after prompt rows ``index``;
        only the rows not seen before are scored (each distinct one once)."""
        state = _lm_state(dist.lm)
        if state != self.state or len(self.positions) + x.shape[0] > ROW_SCORES_LIMIT:
            self._forget(state)
        prompts = torch.cat([dist.prompt_ids, dist.prompt_mask], -1).tolist()
        keys = [(tuple(prompts[j]), tuple(row))
                for j, row in zip(index.tolist(), x.tolist(), strict=True)]
        positions, fresh = self.positions, {}
        known = 0 if self.table is None else self.table.shape[0]
        for i, key in enumerate(keys):
            if key not in positions and key not in fresh:
                fresh[key] = i
        if fresh:
            rows = torch.tensor(list(fresh.values()), device=x.device)
            new = dist._score_rows(x.index_select(0, rows), index.index_select(0, rows.to(
                index.device)))
            for k, key in enumerate(fresh):
                positions[key] = known + k
            self.table = new if self.table is None else torch.cat([self.table, new])
        at = torch.tensor([positions[key] for key in keys], device=self.table.device)
        return self.table.index_select(0, at)


def _snapshot(t: torch.Tensor):
    """What :func:`_unchanged` compares ``t`` against later: its version counter, or for an
    inference tensor (which has none) a copy of its content."""
    return t, (t.clone() if t.is_inference() else t._version)


def _unchanged(snapshot) -> bool:
    t, seen = snapshot
    return torch.equal(t, seen) if isinstance(seen, torch.Tensor) else t._version == seen


def unwrap_lm(fn):
    """The :class:`LMDistribution` inside Pyro's wrappers (masks, ``to_event``), or ``None``."""
    while fn is not None and not isinstance(fn, LMDistribution):
        fn = getattr(fn, "base_dist", None)
    return fn


def after_first_eos(x: torch.Tensor, eos) -> torch.Tensor:
    """Bool mask ``(..., T)``: positions strictly after the first EOS.

    :param eos: an EOS id or a sequence of them (see :func:`~pyro_lm.distributions.prefix.is_eos`).
    """
    ended = is_eos(x, eos).long()
    return (ended.cumsum(-1) - ended) > 0


class SequenceConstraint(constraints.Constraint):
    """Support of :class:`LMDistribution`: token ids in ``[0, vocab_size)``,
    shape ``(..., T)``, ``pad_token_id`` at every position after the first EOS.

    :param eos: the EOS id, or the tuple of every id that ends a completion.
    """

    is_discrete = True
    event_dim = 1

    def __init__(self, vocab_size: int, max_new_tokens: int, eos, pad: int):
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.pad = pad
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape[-1:] != (self.max_new_tokens,):
            return torch.zeros(value.shape[:-1], dtype=torch.bool, device=value.device)
        in_range = ((value >= 0) & (value < self.vocab_size)).all(-1)
        tail = after_first_eos(value, self.eos)
        padded = ((value == self.pad) | ~tail).all(-1)
        return in_range & padded

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"max_new_tokens={self.max_new_tokens}, eos={self.eos}, pad={self.pad})")


class LMDistribution(TorchDistribution):
    r"""The completions of a causal LM given prompts, as a distribution.

    :param lm: a :class:`~pyro_lm.CausalLM`.
    :param prompts: a string or a chat (a list of ``{"role", "content"}`` messages;
        ``batch_shape == ()``), a list of ``B`` strings or chats (``batch_shape ==
        (B,)``), a ``BatchEncoding`` (one row per row of its ``input_ids``), or token
        ids: a LongTensor ``(*batch, L)`` (``batch_shape == batch``), left-padded with
        ``attention_mask``. Text and chats are encoded as transformers would (see
        :meth:`pyro_lm.CausalLM.encode`: exactly ``tokenizer(prompt)["input_ids"]``, or
        the chat template with the generation prompt). Prompts of different lengths may
        share a batch; a prompt chosen by another random choice (``prompt_ids[z]``) or
        built from an earlier completion (:meth:`prompt_with`) has the batch shape of
        that choice.
    :param int max_new_tokens: ``T``, the completion length.
    :param torch.Tensor attention_mask: ``(*batch, L)`` for tensor prompts (default:
        all ones).
    :param int chunk_size: sequences per forward pass in :meth:`log_prob`
        (default: as many as fit ``memory_budget``).
    :param int memory_budget: bytes :meth:`log_prob` may hold at a time, per chunk of
        sequences and, under gradients, for what autograd keeps of all chunks until
        backward (default: :data:`LOG_PROB_BUDGET` float32 logits, 256 MiB). See
        :meth:`token_log_probs`.
    :param bool activation_checkpointing: under gradients, recompute each chunk's
        forward pass in backward instead of keeping its activations [1]: ``None``
        (default) when the activations of all sequences would exceed ``memory_budget``,
        ``True`` always, ``False`` never. Values and gradients are the same either way.
    :param int max_enumerate: largest support :meth:`enumerate_support` builds.

    ``log_prob`` sums float32 token log-probs up to and including the first
    EOS (any of the LM's :attr:`~pyro_lm.CausalLM.eos_token_ids`); it is pure and
    differentiable in the LM's parameters. ``sample`` draws
    all sequences in one batched incremental decode with a KV cache and no
    gradient; ``has_rsample`` is ``False`` (use score-function estimators).
    The LM is always evaluated with dropout off.

    References

    [1] T. Chen, B. Xu, C. Zhang, C. Guestrin, *Training Deep Nets with Sublinear Memory
        Cost*, arXiv:1604.06174, 2016.
    """

    arg_constraints = {}
    has_enumerate_support = True
    has_rsample = False

    def __init__(self, lm: CausalLM, prompts, max_new_tokens: int, attention_mask=None,
                 chunk_size: int | None = None, max_enumerate: int = 100_000,
                 validate_args=None, memory_budget: int | None = None,
                 activation_checkpointing: bool | None = None):
        if not isinstance(lm, CausalLM):
            raise TypeError(
                f"lm: expected a pyro_lm.CausalLM, got {type(lm).__name__}; wrap a transformers "
                "model with pyro_lm.CausalLM(model, tokenizer) or CausalLM.from_pretrained(path)")
        check_positive_int(max_new_tokens, "max_new_tokens")
        if chunk_size is not None:
            check_positive_int(chunk_size, "chunk_size")
        check_positive_int(max_enumerate, "max_enumerate")
        if memory_budget is not None:
            check_positive_int(memory_budget, "memory_budget")
        if activation_checkpointing not in (None, True, False):
            raise TypeError(f"activation_checkpointing: expected None (by memory_budget), True "
                            f"or False, got {activation_checkpointing!r}")
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.activation_checkpointing = activation_checkpointing
        self.max_enumerate = max_enumerate
        cache, key = _PROMPT_CACHE.get(), None
        if cache is not None:
            key = _prompt_key(lm, prompts, attention_mask)
        if key is not None and key in cache:
            entry = cache[key]
            _store(cache, key, entry)  # the most recently used goes last
            ids, mask, prompt_batch = entry[-1]
        else:
            ids, mask, prompt_batch = self._prepare_prompts(lm, prompts, attention_mask)
            if key is not None:  # holding the objects keeps their ids unique
                _store(cache, key, (lm, prompts, attention_mask, (ids, mask, prompt_batch)))
        limit = lm.max_length
        if limit is not None and ids.shape[-1] + max_new_tokens > limit:
            raise ValueError(
                f"max_new_tokens: prompt length {ids.shape[-1]} + max_new_tokens "
                f"{max_new_tokens} exceeds the model's context of {limit} positions; "
                "shorten the prompts or lower max_new_tokens")
        self.prompt_ids, self.prompt_mask = ids, mask
        self._prompt_batch_shape = prompt_batch
        super().__init__(prompt_batch, torch.Size((max_new_tokens,)), validate_args=validate_args)

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def _prepare_prompts(lm: CausalLM, prompts, attention_mask):
        if isinstance(prompts, (str, list, tuple, Mapping)):
            if attention_mask is not None:
                raise ValueError("attention_mask: only meaningful with tensor prompts (a "
                                 "BatchEncoding carries its own)")
            ids, mask = lm.encode(prompts)
            batch = torch.Size() if lm.is_single_prompt(prompts) else torch.Size(ids.shape[:1])
            return ids, mask, batch
        if not isinstance(prompts, torch.Tensor):
            raise TypeError(f"prompts: expected a string, a chat, a list of them, a "
                            f"BatchEncoding or a LongTensor, got {type(prompts).__name__}")
        if prompts.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise TypeError(f"prompts: token ids must be an integer tensor, got {prompts.dtype}")
        if prompts.dim() < 1:
            raise ValueError(f"prompts: expected shape (L,) or (*batch, L), got "
                             f"{tuple(prompts.shape)}")
        batch = torch.Size(prompts.shape[:-1])
        if prompts.numel() == 0:
            raise ValueError(
                f"prompts: empty prompt tensor of shape {tuple(prompts.shape)}; each prompt needs "
                "at least one token, e.g. [[lm.bos_token_id]] for unconditional generation")
        ids = prompts.long().reshape(-1, prompts.shape[-1]).to(lm.device)
        built = getattr(prompts, _BUILT, None)
        if (built is not None and built[0] is attention_mask
                and built[1:] == (prompts._version, attention_mask._version, lm.vocab_size)):
            # made by prompt_with and unchanged since: its checks below hold already
            return ids, attention_mask.long().reshape(ids.shape).to(lm.device), batch
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask: expected a tensor of 0 and 1 of the prompts' "
                                f"shape, got {type(attention_mask).__name__}")
            if attention_mask.shape != prompts.shape:
                raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not "
                                 f"match prompts {tuple(prompts.shape)}")
            if ((attention_mask != 0) & (attention_mask != 1)).any():  # before any cast
                raise ValueError("attention_mask: values must be 0 or 1")
            mask = attention_mask.long().reshape(-1, attention_mask.shape[-1]).to(lm.device)
            if (mask[:, 1:] < mask[:, :-1]).any():
                raise ValueError("attention_mask: prompts must be left-padded (zeros, then ones "
                                 "in each row); re-pad them on the left")
            if (mask.sum(-1) == 0).any():
                rows = (mask.sum(-1) == 0).nonzero().flatten().tolist()
                raise ValueError(f"prompts: rows {rows} are empty (attention_mask all zero); "
                                 "each prompt needs at least one token")
        real = ids if attention_mask is None else ids.masked_select(mask.bool())
        vocab_size = lm.vocab_size
        if ((real < 0) | (real >= vocab_size)).any():
            bad = real[(real < 0) | (real >= vocab_size)][:5].tolist()
            raise ValueError(f"prompts: token ids {bad} are out of range [0, {lm.vocab_size}) "
                             "for this LM; were they made by another tokenizer?")
        return ids, mask, batch

    @property
    def prompt_batch_shape(self) -> torch.Size:
        """The batch shape of the prompts themselves (``batch_shape`` before any
        :meth:`expand`): ``prompt_ids`` holds one row per element of it."""
        return self._prompt_batch_shape

    def prompt_index(self, shape) -> torch.Tensor:
        """The row of ``prompt_ids`` / ``prompt_mask`` for every element of ``shape``,
        flattened, ``(shape.numel(),)``.

        :param shape: a shape that :attr:`prompt_batch_shape` broadcasts to (e.g. a
            value's ``shape[:-1]``).
        :raises RuntimeError: if it does not broadcast."""
        base = torch.arange(self.prompt_ids.shape[0], device=self.prompt_ids.device)
        base = base.reshape(self._prompt_batch_shape)
        return base.expand(shape).reshape(-1)

    def prompts_for(self, shape=()):
        """Prompt ids and mask, one row per element of ``shape + batch_shape``.

        :returns: ``(input_ids, attention_mask)``, each ``(N, L)``.
        """
        index = self.prompt_index(torch.Size(shape) + self.batch_shape)
        return self.prompt_ids.index_select(0, index), self.prompt_mask.index_select(0, index)

    def _sampled_prompts(self, shape: torch.Size):
        """:meth:`prompts_for` for callers that only read them (the samplers, prompt_with):
        the distribution's own tensors when every row is used once (no index or copy)."""
        if shape + self.batch_shape == self._prompt_batch_shape:
            return self.prompt_ids, self.prompt_mask
        return self.prompts_for(shape)

    def encode_value(self, texts) -> torch.Tensor:
        """Observed text as a value of this distribution: its tokens (no BOS), then EOS, then
        padding to ``T`` tokens (a text of exactly ``T`` tokens is a truncated completion, with
        no EOS), for ``pyro.sample(name, dist, obs=dist.encode_value(text))``.

        :param texts: a string (value ``(T,)``) or a list of strings (``(len, T)``).
        :raises ValueError: naming the text whose tokens (with EOS) do not fit in ``T``, or
            that holds an end-of-sequence token.
        :raises TypeError: naming ``texts`` (or the item) that is not a string.

        >>> from pyro_lm.lm import toy_lm
        >>> d = LMDistribution(toy_lm(vocab_size=4), "t1", 3)
        >>> d.encode_value(["t2 t3", "t1"]).tolist()
        [[2, 3, 0], [1, 0, 0]]
        """
        single = isinstance(texts, str)
        if not single and not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts: expected a string or a list of strings, got "
                            f"{type(texts).__name__}")
        rows, eos = [], set(self.lm.eos_token_ids)
        for i, text in enumerate([texts] if single else list(texts)):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            ended = next((k for k, tok in enumerate(ids) if tok in eos), None)
            if ended is not None:
                raise ValueError(f"texts[{i}]: {text!r} holds an end-of-sequence token (id "
                                 f"{ids[ended]}, at token {ended}), where a completion ends; "
                                 "remove it from the text (its EOS is added after the text)")
            if len(ids) > self.max_new_tokens:
                raise ValueError(f"texts[{i}]: {text!r} has {len(ids)} tokens, more than "
                                 f"max_new_tokens={self.max_new_tokens}; raise max_new_tokens")
            tail = [self.lm.eos_token_id] if len(ids) < self.max_new_tokens else []
            pad = [self.lm.pad_token_id] * (self.max_new_tokens - len(ids) - len(tail))
            rows.append(ids + tail + pad)
        value = torch.tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return value[0] if single else value

    def prompt_with(self, value: torch.Tensor, keep_eos: bool = False):
        """The prompts followed by the completions ``value``, left-padded again: the
        prompt of a later LM call that continues this one.

        :param torch.Tensor value: completions ``(*shape, T)`` of this distribution
            (``shape`` broadcasts with ``batch_shape``).
        :param bool keep_eos: keep each completion's EOS token, whichever of the LM's
            :attr:`~pyro_lm.CausalLM.eos_token_ids` it is (default: drop it).
        :returns: ``(input_ids, attention_mask)``, each ``(*shape, L + T)``, for
            ``LMDistribution(lm, input_ids, T2, attention_mask=attention_mask)``, which
            takes them without checking them again while both are unchanged.
        :raises ValueError: naming ``value`` if a token it keeps is not an id of the LM, or
            its shape is not ``(*shape, T)``.
        :raises TypeError: naming ``value`` if it is not an integer tensor.

        >>> from pyro_lm.lm import toy_lm
        >>> lm = toy_lm(vocab_size=4)
        >>> d = LMDistribution(lm, torch.tensor([[0, 2]]), 3)
        >>> ids, mask = d.prompt_with(torch.tensor([[3, 0, 0]]))
        >>> ids.tolist(), mask.tolist()
        ([[0, 0, 0, 2, 3]], [[0, 0, 1, 1, 1]])
        """
        cache = _PROMPT_CACHE.get()
        if cache is None or not isinstance(value, torch.Tensor):
            return self._prompt_with(value, keep_eos)
        # SMC re-runs the program after every token with the earlier sites' values held:
        # the same objects, unchanged (checked), give the same prompts, the same objects,
        # whose preparation the cache then skips too
        # (one entry per distribution: a new value replaces the last one's)
        key = ("prompt_with", id(self.lm), id(self.prompt_ids), id(self.prompt_mask),
               tuple(self.batch_shape), keep_eos)
        eos, pad = self.lm.eos_token_ids, self.lm.pad_token_id
        hit = cache.get(key)
        if (hit is not None and hit[1][2][0] is value and hit[0] == (eos, pad)
                and all(map(_unchanged, hit[1]))):
            _store(cache, key, hit)  # the most recently used goes last
            return hit[1][-2][0], hit[1][-1][0]
        out = self._prompt_with(value, keep_eos, eos)
        _store(cache, key, ((eos, pad), tuple(map(_snapshot, (self.prompt_ids, self.prompt_mask,
                                                               value) + out))))
        return out

    def _prompt_with(self, value: torch.Tensor, keep_eos: bool, eos=None):
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point \
                or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"value: expected a LongTensor of completions (*shape, "
                            f"{self.max_new_tokens}), got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        if value.dim() == 0 or value.shape[-1] != self.max_new_tokens:
            raise ValueError(f"value: completions of this distribution have "
                             f"{self.max_new_tokens} tokens (shape (*shape, "
                             f"{self.max_new_tokens})), got shape {tuple(value.shape)}")
        try:
            shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"value: batch shape {tuple(value.shape[:-1])} does not broadcast "
                             f"with the distribution's {tuple(self.batch_shape)}") from None
        ids, mask = self._sampled_prompts(torch.Size())  # read only: concatenated below
        ids = ids.reshape(self.batch_shape + ids.shape[-1:]).expand(shape + ids.shape[-1:])
        mask = mask.reshape(self.batch_shape + mask.shape[-1:]).expand(ids.shape)
        value = value.to(ids.device).expand(shape + value.shape[-1:])
        eos = self.lm.eos_token_ids if eos is None else eos
        kept = ~after_first_eos(value, eos)
        if not keep_eos:
            kept &= ~is_eos(value, eos)
        vocab = self.lm.vocab_size
        bad = kept & ((value < 0) | (value >= vocab))
        if bad.any():
            raise ValueError(f"value: token ids {value[bad][:5].tolist()} are out of range "
                             f"[0, {vocab}) for this LM; prompt_with takes completions of "
                             "this distribution (its samples, or encode_value of a text)")
        ids = torch.cat([ids, value.masked_fill(~kept, self.lm.pad_token_id)], -1)
        mask = torch.cat([mask, kept.long()], -1)
        order = mask.argsort(dim=-1, stable=True)  # padding to the left, tokens kept in order
        ids, mask = ids.gather(-1, order), mask.gather(-1, order)
        if not ids.is_inference():  # (an inference tensor has no version to check later)
            setattr(ids, _BUILT, (mask, ids._version, mask._version, vocab))
        return ids, mask

    def with_lm(self, lm: CausalLM) -> LMDistribution:
        """The same prompts, length and batch shape under another LM (e.g. a guide).

        :raises ValueError: if ``lm`` does not share this LM's tokenizer.
        """
        self.lm.check_compatible(lm, "lm")
        new = self._get_checked_instance(LMDistribution, None)
        new.__dict__.update(self.__dict__)
        new.lm = lm
        return new

    # ------------------------------------------------------------------ pyro API
    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LMDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        prompts = self._prompt_batch_shape
        offset = len(batch_shape) - len(prompts)
        if offset < 0 or any(p != 1 and p != batch_shape[offset + i]
                             for i, p in enumerate(prompts)):
            raise ValueError(f"batch_shape: cannot expand the prompts' batch shape "
                             f"{tuple(prompts)} to {tuple(batch_shape)}; each prompt dim must be "
                             "1 or equal the new size (plates broadcast on the left)")
        # (Pyro's plates call this for every sample site: copy the attributes directly)
        new.__dict__.update(lm=self.lm, max_new_tokens=self.max_new_tokens,
                            chunk_size=self.chunk_size, max_enumerate=self.max_enumerate,
                            memory_budget=self.memory_budget,
                            activation_checkpointing=self.activation_checkpointing,
                            prompt_ids=self.prompt_ids, prompt_mask=self.prompt_mask,
                            _prompt_batch_shape=prompts, _batch_shape=batch_shape,
                            _event_shape=self._event_shape, _validate_args=self._validate_args)
        return new

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return SequenceConstraint(self.lm.vocab_size, self.max_new_tokens,
                                  self.lm.eos_token_ids, self.lm.pad_token_id)

    def _validate_sample(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.long:
            raise TypeError(f"value: expected a LongTensor of token ids, got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        if value.shape[-1:] != self.event_shape:
            raise ValueError(f"value: last dimension must be max_new_tokens="
                             f"{self.max_new_tokens}, got shape {tuple(value.shape)}")
        try:
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"value: batch shape {tuple(value.shape[:-1])} does not broadcast "
                             f"with the distribution's batch_shape {tuple(self.batch_shape)}"
                             ) from None
        vocab = self.lm.vocab_size
        if ((value < 0) | (value >= vocab)).any():
            bad = value[(value < 0) | (value >= vocab)][:5].tolist()
            raise ValueError(f"value: token ids {bad} out of range [0, {vocab})")
        eos = self.lm.eos_token_ids
        tail = after_first_eos(value, eos)
        if (tail & (value != self.lm.pad_token_id)).any():
            ids = eos[0] if len(eos) == 1 else list(eos)
            raise ValueError(f"value: every position after the first EOS ({ids}) must hold "
                             f"pad_token_id ({self.lm.pad_token_id}); use "
                             "LMDistribution.canonicalize(value)")

    def canonicalize(self, value: torch.Tensor) -> torch.Tensor:
        """Replace every token after the first EOS (any EOS id) by ``pad_token_id``."""
        tail = after_first_eos(value, self.lm.eos_token_ids)
        return value.masked_fill(tail, self.lm.pad_token_id)

    # --------------------------------------------------------------- sampling
    def sample_with_log_prob(self, sample_shape=()):
        """Sample and return the log-probabilities computed while decoding.

        :returns: ``(x, log_prob)`` with ``x`` of shape
            ``sample_shape + batch_shape + (T,)`` and ``log_prob`` of shape
            ``sample_shape + batch_shape`` (float32, no gradient).
        """
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]
        ids, mask = self._sampled_prompts(torch.Size(sample_shape))
        x, log_prob = sample_tokens(self.lm, ids, mask, self.max_new_tokens)
        return x.reshape(shape + self.event_shape), log_prob.reshape(shape)

    def sample(self, sample_shape=()):
        """Completions ``sample_shape + batch_shape + (T,)``, decoded without the per-step
        log-probabilities (see :meth:`sample_with_log_prob` for those)."""
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]
        ids, mask = self._sampled_prompts(torch.Size(sample_shape))
        x, _ = sample_tokens(self.lm, ids, mask, self.max_new_tokens, with_log_prob=False)
        return x.reshape(shape + self.event_shape)

    # ------------------------------------------------------------- log density
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of :meth:`token_log_probs`: ``(*shape)``, float32."""
        return self.token_log_probs(value).sum(-1)

    def token_log_probs(self, value: torch.Tensor) -> torch.Tensor:
        r"""Per-token log-probabilities of completions,

        .. math::

            \ell_t(x) = \begin{cases} \log p(x_t \mid c, x_{<t}) & t \le \tau(x) \\
                                       0 & t > \tau(x), \end{cases}
            \qquad \log p(x \mid c) = \sum_{t=1}^{T} \ell_t(x),

        from one (chunked) forward pass of the LM; :meth:`log_prob` is their sum.
        Pure and differentiable in the LM's parameters, like :meth:`log_prob`.

        Memory is bounded by ``memory_budget`` (:math:`M` bytes): the rows are scored in
        chunks of at most :math:`M` bytes of float32 logits. Under gradients autograd
        would also keep, for every chunk until backward, its ``(rows, T, V)``
        log-softmax and the activations of the LM's body; past the budget

        * the logits are recomputed in backward from the last hidden states (for an LM
          with a :attr:`~pyro_lm.CausalLM.linear_head`), when the ``(N, T, V)`` logits of
          all ``N`` rows exceed :math:`M`;
        * each chunk's forward pass is run without a graph and run again in backward
          from its inputs, under the same RNG and autocast state (activation
          checkpointing [1], :class:`_Recomputed`), unless ``activation_checkpointing``
          says otherwise, when the bytes autograd saves for all rows, :math:`N s` with
          :math:`s` measured on one row (once per LM and shape), exceed :math:`M`;
          the chunks then hold at most :math:`\lfloor M / s \rfloor` rows, so that one
          chunk's recomputed activations fit the budget too.

        Either costs recomputation (about one more forward pass of what it recomputes),
        never exactness: values and gradients are those of the plain forward pass.

        :param torch.Tensor value: LongTensor ``(*sample_shape, *batch_shape, T)``
            (any shape whose batch part broadcasts with ``batch_shape``).
        :returns: float32 ``(*shape, T)``, where ``shape`` is the broadcast of
            ``value.shape[:-1]`` and ``batch_shape``; zero at every position after
            the first EOS.
        """
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        x = value.expand(shape + self.event_shape).reshape(-1, self.max_new_tokens)
        index = self.prompt_index(shape)
        if x.shape[0] == 0:
            return torch.zeros(shape + self.event_shape, dtype=torch.float32, device=value.device)
        cache = _PROMPT_CACHE.get()
        if cache is not None and not torch.is_grad_enabled() and ROW_SCORES_LIMIT > 0:
            # SMC re-runs a program after every token and scores its observed text again
            # each time, on rows that resampling copies: score each distinct row once
            key = ("scores", id(self.lm), self.max_new_tokens, self.chunk_size,
                   self.memory_budget, self.prompt_ids.shape[-1], x.device)
            scores = cache.get(key)
            if scores is None:
                scores = _RowScores(self.lm)
            _store(cache, key, scores)  # the most recently used goes last
            out = scores.lookup(self, x, index)
        else:
            out = self._score_rows(x, index)
        return out.reshape(shape + self.event_shape)

    def _score_rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``(R, T)`` token log-probs of the rows ``x`` ``(R, T)`` after the prompt rows
        ``index`` ``(R,)``, in chunks within the memory budget."""
        rows, t = x.shape[0], self.max_new_tokens
        lengths = self.prompt_ids.shape[-1] + t
        vocab = self.lm.vocab_size
        budget = self.memory_budget or 4 * LOG_PROB_BUDGET
        chunk = self.chunk_size or max(1, budget // (4 * lengths * vocab))
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.lm.parameters())
        # under gradients autograd would keep every chunk's (rows, T, V) log-softmax until
        # backward: past the budget, keep the hidden states and recompute the head there
        recompute = grad and 4 * rows * t * vocab > budget and self.lm.linear_head is not None
        checkpoint = False
        if grad and self.activation_checkpointing is not False:
            # and every chunk's activations: past the budget, keep each chunk's inputs and
            # recompute its forward pass there, in chunks whose activations fit the budget
            per_row = _saved_bytes_per_row(self, recompute)
            checkpoint = bool(self.activation_checkpointing) or rows * per_row > budget
            if checkpoint and self.chunk_size is None:
                chunk = min(chunk, max(1, budget // max(per_row, 1)))
        parts = [self._token_log_probs_rows(x[i:i + chunk], index[i:i + chunk], recompute,
                                            checkpoint)
                 for i in range(0, rows, chunk)]
        return torch.cat(parts)

    def _token_log_probs_rows(self, x: torch.Tensor, index: torch.Tensor,
                              recompute: bool = False, checkpoint: bool = False
                              ) -> torch.Tensor:
        """``(N, T)`` token log-probs of the rows ``x`` ``(N, T)`` given prompt rows ``index``.

        :param bool recompute: keep only the hidden states for backward and recompute the
            head's logits there (:class:`_LinearLogProb`), so that memory stays bounded by
            the chunk also under gradients.
        :param bool checkpoint: keep only the inputs for backward and recompute the forward
            pass there (``torch.utils.checkpoint``).
        """
        ids = self.prompt_ids.index_select(0, index)
        mask = self.prompt_mask.index_select(0, index)
        x = x.to(ids.device)
        token_logp = self._score(*_model_inputs(ids, mask, x), x, recompute, checkpoint)
        # select rather than multiply: a -inf log-prob after EOS must give 0, not NaN
        return token_logp.masked_fill(after_first_eos(x, self.lm.eos_token_ids), 0.0)

    def _score(self, inputs, mask, positions, x, recompute: bool, checkpoint: bool):
        """``(N, T)`` log-probs of the tokens ``x`` after the model inputs (no EOS masking)."""
        t = self.max_new_tokens
        params = [p for p in self.lm.parameters() if p.requires_grad] if checkpoint else []
        if recompute:
            head = self.lm.linear_head
            body = functools.partial(self.lm.hidden_states, keep=t)
            hidden = (_Recomputed.apply(body, 3, inputs, mask, positions, *params)
                      if checkpoint else body(inputs, mask, positions))
            return _LinearLogProb.apply(hidden, head.weight, head.bias, x)
        if checkpoint:
            return _Recomputed.apply(self._plain_score, 4, inputs, mask, positions, x, *params)
        return self._plain_score(inputs, mask, positions, x)

    def _plain_score(self, inputs, mask, positions, x):
        t = self.max_new_tokens
        logits, _ = self.lm(inputs, mask, positions, logits_to_keep=t)
        logits = logits[:, -t:].float()
        return logits.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)

    # ------------------------------------------------------------- enumeration
    def support_size(self) -> int:
        r"""Number of sequences of at most ``T`` tokens, with :math:`|E|` EOS ids:
        :math:`|E| \sum_{k<T} (V-|E|)^k + (V-|E|)^T`."""
        e = len(self.lm.eos_token_ids)
        v, t = self.lm.vocab_size - e, self.max_new_tokens
        return e * sum(v**k for k in range(t)) + v**t

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """Every completion, in canonical form.

        :returns: ``(n, *batch_shape, T)`` if ``expand`` else ``(n, 1, ..., 1, T)``.
        :raises ValueError: if ``n`` exceeds ``max_enumerate``.
        """
        n = self.support_size()
        if n > self.max_enumerate:
            raise ValueError(
                f"enumerate_support: the support has {n} sequences (vocab_size="
                f"{self.lm.vocab_size}, max_new_tokens={self.max_new_tokens}), above "
                f"max_enumerate={self.max_enumerate}; enumerate only tiny vocabularies and "
                "lengths, or pass a larger max_enumerate to LMDistribution")
        eos, pad, t = self.lm.eos_token_ids, self.lm.pad_token_id, self.max_new_tokens
        device = self.prompt_ids.device
        tokens = torch.tensor([v for v in range(self.lm.vocab_size) if v not in eos],
                              dtype=torch.long, device=device)
        rows = []
        for k in range(t + 1):
            if tokens.numel() == 0 and k > 0:
                break
            body = _cartesian(tokens, k, device)  # (m, k)
            m = body.shape[0]
            if k < t:
                for end in eos:  # ended at token k + 1 by each EOS id
                    tail = torch.full((m, t - k), pad, dtype=torch.long, device=device)
                    tail[:, 0] = end
                    rows.append(torch.cat([body, tail], dim=-1))
            else:
                rows.append(body)
        support = torch.cat(rows)
        assert support.shape[0] == n, (support.shape, n)
        support = support.reshape((n,) + (1,) * len(self.batch_shape) + (t,))
        if expand:
            support = support.expand((n,) + self.batch_shape + (t,))
        return support

    def __repr__(self) -> str:
        return (f"LMDistribution(lm={self.lm!r}, batch_shape={tuple(self.batch_shape)}, "
                f"max_new_tokens={self.max_new_tokens})")


class _LinearLogProb(torch.autograd.Function):
    r"""Token log-probabilities through a linear head, recomputing the logits in backward.

    .. math::

        \ell_{nt} = z_{nt, x_{nt}} - \log \sum_v e^{z_{ntv}}, \qquad z = h W^\top + b,
        \qquad \frac{\partial \ell}{\partial z_{ntv}} = \mathbb 1[v = x_{nt}]
        - \mathrm{softmax}(z_{nt})_v.

    Forward saves the hidden states ``h`` ``(N, T, H)`` (not the ``(N, T, V)`` logits);
    backward recomputes ``z`` and applies the gradient above, so memory under gradients
    is that of one chunk of logits, as without them (activation recomputation [1]). The
    logits are computed in the head's dtype and the log-softmax in float32, as in the
    plain path.

    References

    [1] T. Chen, B. Xu, C. Zhang, C. Guestrin, *Training Deep Nets with Sublinear Memory
        Cost*, arXiv:1604.06174, 2016.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target):
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        out = logits.gather(-1, target[..., None]).squeeze(-1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, target)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, target = ctx.saved_tensors
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        d = logits.softmax(-1).mul_(-grad[..., None])
        del logits  # at most two (N, T, V) arrays at a time, as in forward
        d = d.scatter_add_(-1, target[..., None], grad[..., None]).to(hidden.dtype)
        need_h, need_w, need_b, _ = ctx.needs_input_grad
        grad_h = d @ weight if need_h else None
        grad_w = d.flatten(0, -2).T @ hidden.flatten(0, -2) if need_w else None
        grad_b = d.flatten(0, -2).sum(0) if need_b and bias is not None else None
        return grad_h, grad_w, grad_b, None


class _Recomputed(torch.autograd.Function):
    r"""``fn(*inputs)``, differentiable in the parameters ``params`` it reads, with nothing
    but ``inputs`` kept from forward to backward (activation checkpointing [1]).

    Forward runs ``fn`` without recording a graph; backward runs it again with gradients,
    under the forward's RNG and autocast state (so that the recomputed values are the
    same), and back-propagates the output's gradient through that run:

    .. math::

        \frac{\partial L}{\partial \theta} = \Big(\frac{\partial f(u; \theta)}
        {\partial \theta}\Big)^{\!\top} \frac{\partial L}{\partial f}.

    ``torch.utils.checkpoint`` does not fit here: its non-reentrant mode still records the
    forward's graph (only the saved tensors are dropped), whose many small nodes, made
    between the forward's large temporaries and kept until backward, fragment the heap
    of a CPU process by about one chunk's activations per chunk; its reentrant mode does
    not support ``torch.autograd.grad`` and needs an input that requires a gradient.

    Use: ``_Recomputed.apply(fn, len(inputs), *inputs, *params)``.

    References

    [1] T. Chen, B. Xu, C. Zhang, C. Guestrin, *Training Deep Nets with Sublinear Memory
        Cost*, arXiv:1604.06174, 2016.
    """

    @staticmethod
    def forward(ctx, fn, count, *args):
        inputs = args[:count]
        device = inputs[0].device
        ctx.fn, ctx.count, ctx.device = fn, count, device
        ctx.rng = torch.get_rng_state()
        ctx.device_rng = (None if device.type == "cpu" else
                          torch.get_device_module(device.type).get_rng_state(device))
        ctx.autocast = dict(device_type=device.type,
                            enabled=torch.is_autocast_enabled(device.type),
                            dtype=torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(*args)  # the parameters too: an in-place change is an error
        return fn(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs, params = saved[:ctx.count], saved[ctx.count:]
        needs = ctx.needs_input_grad[2 + ctx.count:]
        wanted = [p for p, need in zip(params, needs, strict=True) if need]
        device = ctx.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device],
                                   device_type=device.type):
            torch.set_rng_state(ctx.rng)
            if ctx.device_rng is not None:
                torch.get_device_module(device.type).set_rng_state(ctx.device_rng, device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True)
                     if wanted and out.requires_grad else [None] * len(wanted))
        return (None, None, *[None] * ctx.count,
                *[next(grads) if need else None for need in needs])


def _model_inputs(ids: torch.Tensor, mask: torch.Tensor, x: torch.Tensor):
    """The LM's inputs that score completions ``x`` ``(N, T)`` after left-padded prompts
    ``ids``, ``mask`` ``(N, L)``: ``(input_ids, attention_mask, position_ids)``, each
    ``(N, L + T - 1)``."""
    inputs = torch.cat([ids, x[:, :-1]], dim=-1)
    full_mask = torch.cat([mask, torch.ones_like(x[:, :-1])], dim=-1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    return inputs, full_mask, positions


def _saved_bytes_per_row(dist: LMDistribution, recompute: bool) -> int:
    """Bytes autograd saves for backward when ``dist`` scores one row under gradients
    (each storage once; the LM's own weights and buffers left out, they are in memory
    anyway), through the head path ``recompute``.

    Measured on a row of pad tokens whose first position is padding (so that the
    attention mask is built as for padded prompts), once per LM, prompt length, ``T``,
    head path, set of trainable parameters, dtype, attention implementation and autocast
    state; the measuring run's graph is dropped.
    """
    lm = dist.lm
    tensors = [*lm.parameters(), *lm.buffers()]
    device = dist.prompt_ids.device
    length, t = dist.prompt_ids.shape[-1], dist.max_new_tokens
    key = (length, t, recompute, tuple(p.requires_grad for p in tensors), lm.dtype,
           getattr(lm.model.config, "_attn_implementation", None),
           torch.is_autocast_enabled(device.type))
    cache = _SAVED_PER_ROW.setdefault(lm, {})
    if key not in cache:
        own = {_storage(p)[0] for p in tensors}
        sizes = {}

        def pack(tensor):
            ptr, nbytes = _storage(tensor)
            if ptr not in own:
                sizes[ptr] = nbytes
            return tensor

        ids = torch.full((1, length), lm.pad_token_id, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        mask[:, 0] = 0 if length > 1 else 1
        x = torch.full((1, t), lm.pad_token_id, dtype=torch.long, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            dist._score(*_model_inputs(ids, mask, x), x, recompute, checkpoint=False)
        cache[key] = sum(sizes.values())
    return cache[key]


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """``(data pointer, bytes)`` of ``tensor``'s storage; for a distributed tensor (FSDP2
    shards its parameters as DTensors, which have no storage of their own) its local
    shard's."""
    local = getattr(tensor, "to_local", None)
    storage = (local() if callable(local) else tensor).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _cartesian(tokens: torch.Tensor, k: int, device) -> torch.Tensor:
    """All ``len(tokens)**k`` sequences of length ``k`` over ``tokens``, ``(m, k)``."""
    if k == 0:
        return torch.zeros((1, 0), dtype=torch.long, device=device)
    grids = torch.meshgrid(*([tokens] * k), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)

