r"""Structural constraints on an LM site's completion, through llguidance.

A constraint :math:`C` is a formal language over text (a regular expression, a Lark
context-free grammar, a JSON schema) read by llguidance [1], an Earley parser that
gives, after any sequence of tokens, the set of next tokens that can still lead to
a string of the language. For a completion :math:`x` (its tokens up to, not
including, its first EOS) the constraint is the log-factor

.. math::

    c(x) = \begin{cases} 0 & \text{text}(x) \in C \\ -\infty & \text{otherwise,}
    \end{cases}

where :math:`\text{text}(x)` is the concatenation of the tokens' bytes (as llguidance
reads them: a SentencePiece token keeps its leading space). A completion ended by EOS
and one truncated at ``T`` tokens are judged alike, on their text. It is used three
ways on the same program:

* as a factor, ``pyro.factor("valid", c(x))``. On a prefix (inside
  :func:`~pyro_lm.distributions.prefix_context`) it is :math:`-\infty` exactly when
  no string of :math:`C` extends the prefix's text, which is the prefix contract of
  :mod:`pyro_lm.rewards.base`, so token-level SMC stays exact;
* as a proposal mask (``SMC(model, ..., constraints={"x": c})``, and
  :class:`~pyro_lm.infer.Importance`): a :class:`ConstraintState` holds one llguidance
  matcher per particle and gives the allowed next tokens :math:`A_t` (EOS only where
  the text so far is in :math:`C`);
* in a guide (:class:`~pyro_lm.constraints.MaskedLMDistribution`, e.g. through
  ``AutoLMGuide(model, lm, constraints={"x": c})``).

References:

[1] Guidance AI, *llguidance: super-fast structured outputs*,
https://github.com/guidance-ai/llguidance (2024-2025).
[2] J. Loula, B. LeBrun, L. Du, et al., "Syntactic and semantic control of large
language models via sequential Monte Carlo", ICLR 2025.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from pyro_lm.distributions.prefix import prefix_length
from pyro_lm.lm.causal_lm import CausalLM
from pyro_lm.lm.token_bytes import byte_kind, special_token_ids, token_bytes
from pyro_lm.rewards.base import Reward

__all__ = ["Constraint", "ConstraintState", "TRUNCATION_HINT", "check_constraints",
           "check_sites", "import_llguidance", "llguidance_tokenizer"]

#: What a sampler's all-zero-weights error says first when constraints mask its proposal.
TRUNCATION_HINT = ("With constraints, a completion still outside the language when it reaches "
                   "max_new_tokens has weight zero: check that a text of the language fits "
                   "in max_new_tokens tokens, and raise max_new_tokens if not. ")

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NO_FORCING = '%llguidance {"no_forcing": true}\n'


def import_llguidance():
    """The ``llguidance`` module with its ``hf`` and ``torch`` submodules imported (a
    clear ImportError if it is missing)."""
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("pyro_lm.constraints needs llguidance: pip install llguidance") from e
    return llguidance


class _BytesTokenizer:
    """A tokenizer as llguidance's ``TokenizerWrapper`` reads it: each token's bytes."""

    def __init__(self, tokenizer, eos: tuple[int, ...]):
        self.tokens = token_bytes(tokenizer, skip_special_tokens=False)
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special_token_ids(tokenizer))
        self._tokenizer = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]


def llguidance_tokenizer(lm: CausalLM):
    """The llguidance ``LLTokenizer`` of ``lm``'s tokenizer, with every id of
    :attr:`~pyro_lm.CausalLM.eos_token_ids` as EOS; built once per tokenizer and EOS set.

    A fast tokenizer is read by ``llguidance.hf.from_tokenizer``; another one whose
    tokens are bytes (:func:`~pyro_lm.lm.token_bytes.byte_kind`) through its
    :func:`~pyro_lm.lm.token_bytes.token_bytes`.

    :raises ValueError: naming ``lm`` for a tokenizer whose tokens are not bytes (a
        word-level tokenizer joins words with its decoder, so no token has a fixed text).
    """
    llg = import_llguidance()
    tokenizer, eos = lm.tokenizer, tuple(lm.eos_token_ids)
    try:
        cache = _TOKENIZERS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build it each time
        cache = {}
    if eos in cache:
        return cache[eos]
    try:
        llt = llg.hf.from_tokenizer(tokenizer, eos_token=list(eos))
    except (ValueError, TypeError, RuntimeError) as first:
        if byte_kind(tokenizer) is None:
            raise ValueError(
                f"lm: llguidance cannot read this tokenizer ({type(tokenizer).__name__}: "
                f"{first}); constraints need a tokenizer whose tokens are bytes (byte-level "
                "BPE such as GPT-2's, Llama 3's or Qwen2's, or SentencePiece such as Llama 2's); "
                "a word-level tokenizer joins its words with its decoder, so a token has no "
                "fixed text. Use a rewards.Regex factor on the decoded text instead") from None
        llt = llg.LLTokenizer(llg.TokenizerWrapper(_BytesTokenizer(tokenizer, eos)),
                              eos_token=list(eos))
    cache[eos] = llt
    return llt


class Constraint(Reward):
    r"""A formal language on the text of an LM site's completion (base class of
    :class:`~pyro_lm.constraints.Regex`, :class:`~pyro_lm.constraints.Grammar` and
    :class:`~pyro_lm.constraints.JSONSchema`); see :mod:`pyro_lm.constraints.base`.

    Calling it on completions ``x`` ``(*batch, T)`` gives :math:`c(x)` ``(*batch,)``,
    0 or ``-inf`` (float32, on ``x``'s device). Inside
    :func:`~pyro_lm.distributions.prefix_context` ``(t)`` a row that has not ended
    (no EOS in its first ``t`` tokens, ``t < T``) is a prefix, and is ``-inf`` exactly
    when no string of the language extends its text.

    :param lm: the :class:`~pyro_lm.CausalLM` whose tokenizer the constraint reads (any LM
        with the same tokenizer may use it).
    :param str lark: the language as an llguidance Lark grammar (regular expressions as
        ``start: /.../``, JSON schemas as ``start: %json {...}``). It is compiled with
        llguidance's ``no_forcing`` option: without it, where the grammar forces some
        bytes, llguidance's mask allows only the tokens *after* those bytes in its own
        tokenization, which is not the set of viable next tokens.
    :param str name: used in errors.
    :param str arg: the argument that holds the language, for errors.
    :raises ValueError: naming ``arg`` if llguidance refuses the grammar, or ``lm`` if it
        cannot read the tokenizer.
    """

    def __init__(self, lm: CausalLM, lark: str, name: str | None = None,
                 arg: str = "grammar"):
        if not isinstance(lm, CausalLM):
            raise TypeError(f"lm: expected a pyro_lm.CausalLM, got {type(lm).__name__}")
        super().__init__(name)
        llg = import_llguidance()
        self.lm = lm
        self._fingerprint = lm.tokenizer_fingerprint()
        self.eos = tuple(lm.eos_token_ids)
        self.tokenizer = llguidance_tokenizer(lm)
        self.grammar = llg.grammar_from("lark", _NO_FORCING + lark)
        self._root = llg.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if self._root.is_error():
            raise ValueError(f"{arg}: llguidance refuses it: {self._root.get_error()}")
        #: token ids llguidance knows (ids of the LM beyond them are never allowed)
        self.num_tokens = int(self.tokenizer.vocab_size)
        self._walker = self._root.deep_copy()  # the factor's matcher, walked along a trie
        self._path: list[int] = []

    # ----------------------------------------------------------------- binding
    def check_lm(self, lm: CausalLM, name: str = "constraints") -> None:
        """Raise a :class:`ValueError` naming ``name`` unless ``lm`` shares the tokenizer
        (and EOS ids) this constraint was built for."""
        if lm is self.lm or lm.tokenizer_fingerprint() == self._fingerprint:
            return
        raise ValueError(
            f"{name}: {self.name} was built for another tokenizer (or other EOS ids) than "
            f"the LM site's ({lm!r}); build it with that site's LM, e.g. "
            f"{type(self).__name__}(prior, ...)")

    def state(self, rows: int, device=None) -> ConstraintState:
        """The matcher state of ``rows`` sequences at their start, for masked decoding."""
        return ConstraintState(self, rows, self.lm.device if device is None else device)

    # ------------------------------------------------------------------ factor
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = prefix_length()
        big_t = x.shape[-1]
        t = big_t if t is None else min(t, big_t)
        eos = set(self.eos)
        # each distinct row once (SMC's particles share prefixes, a plate repeats prompts'
        # completions), in sorted order, which walks the trie of _judge prefix by prefix
        if t == 0:
            distinct, inverse = [[]], torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        else:
            distinct, inverse = torch.unique(x[:, :t], dim=0, return_inverse=True)
            distinct = distinct.tolist()
        out = []
        for row in distinct:
            end = next((k for k, tok in enumerate(row) if tok in eos), None)
            complete = end is not None or t == big_t
            out.append(self._judge(tuple(row if end is None else row[:end]), complete))
        return torch.tensor(out, dtype=torch.float32, device=x.device)[inverse]

    def _judge(self, tokens: tuple, complete: bool) -> float:
        """0.0 or -inf: ``tokens`` (content, no EOS) viable, and accepted if ``complete``.

        One matcher walks the rows as a trie: it rolls back to the common prefix with the
        path it holds and validates (without consuming) the rest."""
        m, path = self._walker, self._path
        common = 0
        for a, b in zip(path, tokens, strict=False):
            if a != b:
                break
            common += 1
        if common < len(path):
            m.rollback(len(path) - common)
            del path[common:]
        rest = list(tokens[common:])
        bad = next((k for k, tok in enumerate(rest) if not 0 <= tok < self.num_tokens), None)
        ok_len = m.validate_tokens(rest if bad is None else rest[:bad])
        if ok_len:
            m.consume_tokens(rest[:ok_len])
            path.extend(rest[:ok_len])
        if ok_len < len(rest):
            return -math.inf
        if complete and not m.is_accepting():
            return -math.inf
        return 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ConstraintState:
    r"""The llguidance matchers of ``R`` sequences decoded under one constraint: the
    batched mask of masked decoding.

    After the tokens so far, :meth:`allowed` is the ``(R, V)`` bool tensor of the next
    tokens :math:`A_t` that keep the text extendable to a string of the language (ids the
    tokenizer lacks never; EOS where the text is in the language), :meth:`advance`
    consumes one token per row, and :meth:`reorder` follows resampling.

    Rows with the same tokens share one matcher (copied when their tokens diverge), so
    that after resampling a mask is computed once per distinct particle, and reordering
    copies nothing: each row holds a slot in a pool of distinct matchers (``-1`` once
    it ended or died), and each step calls llguidance once per distinct matcher (its
    mask, written into one preallocated bitmask and unpacked by numpy) and once
    per distinct (matcher, token) pair.

    A row *ends* when it consumes EOS; a row *dies* when it consumes a token outside
    its allowed set (possible only where that set was empty). Ended and dead rows allow
    nothing.

    :param Constraint constraint: the constraint.
    :param int rows: ``R``.
    :param torch.device device: where :meth:`allowed` and :meth:`valid` live.
    """

    def __init__(self, constraint: Constraint, rows: int, device):
        self.constraint = constraint
        self.device = torch.device(device)
        self.vocab_size = constraint.lm.vocab_size
        self._pool = [constraint._root.deep_copy()]  # the distinct matchers
        self._slot = [0] * rows  # each row's index into the pool; -1: ended or dead
        self._ended = [False] * rows  # consumed EOS where the text was accepted
        self._filled = False  # whether the bitmask holds the pool's masks
        self._known = min(constraint.num_tokens, self.vocab_size)
        self._words = (constraint.num_tokens + 31) // 32
        self._bitmask = torch.zeros((rows + 1, self._words), dtype=torch.int32)
        self._eos_ids = sorted(set(constraint.eos))
        self._eos_set = set(constraint.eos)

    @property
    def rows(self) -> int:
        return len(self._slot)

    def _compact(self) -> None:
        """Drop the matchers that no live row holds (after resampling or deaths)."""
        used = set(self._slot)
        used.discard(-1)
        if len(used) == len(self._pool):
            return
        order = sorted(used)
        new = {s: k for k, s in enumerate(order)}
        new[-1] = -1
        self._pool = [self._pool[s] for s in order]
        self._slot = [new[s] for s in self._slot]
        if self._filled:
            self._bitmask[: len(order)] = self._bitmask[torch.tensor(order, dtype=torch.long)]

    def _fill(self) -> None:
        """Write the mask of every matcher of the pool into its row of the bitmask."""
        stride = self._words * 4
        ptr = self._bitmask.data_ptr()
        for k, m in enumerate(self._pool):  # one by one: llguidance's pool costs more here
            m.unsafe_compute_mask_ptr(ptr + k * stride, stride)
        self._filled = True

    def allowed(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``(R, V)`` on :attr:`device`: the allowed next tokens of every row, as bool or
        (``dtype`` a float dtype) as 1 and 0, the factor a masked draw multiplies by."""
        self._compact()
        if not self._filled:
            self._fill()
        pool = self._pool
        d = len(pool)
        words = self._bitmask.numpy()[: d + 1]
        words[d] = 0  # row d, all zeros, is the mask of the ended and dead rows (slot -1)
        # bit j of word k is token 32 k + j (llguidance's layout; little-endian bytes)
        table = np.unpackbits(words.view(np.uint8), axis=-1, count=self.vocab_size,
                              bitorder="little")
        if self._known < self.vocab_size:
            table[:, self._known:] = 0
        accepting = np.array([m.is_accepting() for m in pool] + [False], dtype=np.uint8)
        table[:, self._eos_ids] = accepting[:, None]
        rows = table[self._slot]  # slot -1: row d
        rows = (torch.from_numpy(rows).view(torch.bool) if dtype == torch.bool
                else torch.from_numpy(rows.astype(np.float32)).to(dtype))
        return rows if self.device.type == "cpu" else rows.to(self.device)

    def advance(self, tokens: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """Consume ``tokens`` ``(R,)``, one per row; rows where ``skip`` ``(R,)`` is true,
        and rows that ended or died, consume nothing."""
        toks = tokens.tolist()
        skips = skip.tolist() if skip is not None else None
        pool, slot, ended, eos, n = (self._pool, self._slot, self._ended, self._eos_set,
                                     self.constraint.num_tokens)
        width = n + 1  # key = slot * width + token, token n: no token (a skipped row)
        keys = {}  # key -> new slot
        new_slot = [-1] * len(slot)
        for i, (s, tok) in enumerate(zip(slot, toks, strict=True)):
            if s < 0:
                continue
            if skips is not None and skips[i]:
                key = s * width + n  # keeps its matcher unchanged
            elif tok in eos:
                ended[i] = pool[s].is_accepting()
                continue
            elif 0 <= tok < n:
                key = s * width + tok
            else:  # an id llguidance lacks: the row dies
                continue
            new_slot[i] = keys.setdefault(key, len(keys))
        # the copies first: the first key of a matcher then moves the matcher itself
        owners, seen = [], set()
        for key in keys:
            s = key // width
            owners.append(pool[s].deep_copy() if s in seen else pool[s])
            seen.add(s)
        # then each token, and at once the next mask (the matcher is fresh in the cache)
        stride = self._words * 4
        ptr = self._bitmask.data_ptr()
        dead = []
        for k, (key, owner) in enumerate(zip(keys, owners, strict=True)):
            tok = key % width
            if tok < n and not owner.consume_token(tok):
                dead.append(k)
            else:
                owner.unsafe_compute_mask_ptr(ptr + k * stride, stride)
        if dead:
            dead = set(dead)
            new_slot = [-1 if j in dead else j for j in new_slot]
        self._pool, self._slot, self._filled = owners, new_slot, True

    def valid(self) -> torch.Tensor:
        """``(R,)`` bool: rows whose text is in the language (they ended by an allowed
        EOS, or their text so far is accepted)."""
        accepting = [m.is_accepting() for m in self._pool]
        out = [e or (s >= 0 and accepting[s]) for s, e in zip(self._slot, self._ended,
                                                              strict=True)]
        return torch.tensor(out, dtype=torch.bool, device=self.device)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep row ``index[i]`` in row ``i`` (after resampling); the rows of one ancestor
        share its matcher."""
        idx = index.tolist()
        self._slot = [self._slot[j] for j in idx]
        self._ended = [self._ended[j] for j in idx]


def check_constraints(constraints, owner: str) -> dict:
    """``constraints`` as a dict LM site name → :class:`Constraint` (``None``: empty).

    :raises TypeError: naming ``constraints`` and ``owner`` for anything else."""
    if constraints is None:
        return {}
    if not isinstance(constraints, dict):
        raise TypeError(f"constraints: {owner} expects a dict LM site name -> "
                        "pyro_lm.constraints.Constraint (Regex, Grammar, JSONSchema), e.g. "
                        "{'x': Regex(prior, r'...')}; got "
                        f"{type(constraints).__name__}")
    for key, value in constraints.items():
        if not isinstance(key, str):
            raise TypeError(f"constraints: {owner} expects LM site names (str) as keys, got "
                            f"{key!r}")
        if not isinstance(value, Constraint):
            hint = (f"; wrap the pattern as pyro_lm.constraints.Regex(prior, {value!r})"
                    if isinstance(value, str) else
                    "; a reward (pyro_lm.rewards) is a factor: put it in the model with "
                    "pyro.factor" if isinstance(value, Reward) else "")
            raise TypeError(f"constraints[{key!r}]: expected a pyro_lm.constraints.Constraint "
                            f"(Regex, Grammar, JSONSchema), got {type(value).__name__}{hint}")
    return dict(constraints)


def check_sites(constraints: dict, sites: dict, owner: str) -> None:
    """Check that every key of ``constraints`` names one of the LM sites ``sites``
    (name → the site's :class:`~pyro_lm.CausalLM`) and shares its tokenizer.

    :raises ValueError: naming ``constraints`` and the unknown site or the mismatch."""
    for name, constraint in constraints.items():
        if name not in sites:
            raise ValueError(f"constraints: {owner}'s model has no LM sample site {name!r} "
                             f"(its LM sites: {sorted(sites)}); key each constraint by the "
                             "name of the LM site it constrains")
        constraint.check_lm(sites[name], f"constraints[{name!r}]")
