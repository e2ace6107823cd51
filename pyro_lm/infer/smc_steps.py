r"""Step-level SMC: where the steps end, and the potential held between step ends.

With ``steps`` other than ``"token"``, SMC still draws one token per particle per
iteration, batched, but each particle's potential is updated only at the end of one of
its *steps*; between step ends it keeps the value it had at its last one. Writing
:math:`s_t(x_{\le t})` for the last step end of the prefix :math:`x_{\le t}` and
:math:`\Phi` for the model's factors on prefixes (or the twist), the intermediate
potentials are

.. math::

    \Phi_t(x_{\le t}) = \Phi\big(x_{\le s_t(x_{\le t})}\big),

a function of the prefix like any other, so the weights still telescope to
:math:`p_0(x)\, e^{\Phi_T(x)} / q(x)` exactly (the last token, and the stage end of a
site on the program path, is a step end of every particle) and
:math:`\log \hat Z` stays unbiased [1]. The particles of one population may reach their
step ends at different tokens: a per-row mask says which rows are at a step end at the
current token; the potential is evaluated only at tokens where some particle that has
not ended reaches a step end, and only the masked rows take the new value (on the host,
with one prompt, the potential is evaluated on those rows alone when they are at most
half of them). A particle that has ended (EOS) is at its final step end: it takes its complete
potential at the next evaluation (or at the last token).

Resampling is decided (per prompt, by its ESS) only at the tokens where the potential
was evaluated, even if only some of a prompt's particles are at a step end: resampling
at any time chosen from the past is valid SMC for any intermediate potentials, so this
is exact; it is the cheapest exact rule (with the prior as the proposal the weights do
not change at other tokens, so there is nothing new to decide) and it resamples
particles whose weights carry their latest step.

Where a step ends (the prefix :math:`x_{\le t}` just got token :math:`x_t`):

* ``"token"``: at every token (token-level SMC).
* an int ``k``: every ``k`` tokens, :math:`(t + 1) \bmod k = 0`.
* ``"word"``: before a token that starts a new word, one whose text (its bytes, from
  :mod:`pyro_lm.lm.token_bytes`, or what a word-level tokenizer adds after another
  token) starts with ASCII whitespace. The step :math:`x_{<t}` is complete when
  :math:`x_t` is drawn; its potential is read on :math:`x_{\le t}`, the first prefix on
  which a prefix-aware reward sees the last word settled (the new word's first piece
  settles nothing yet). The first token ends no step (the step before it is empty).
* a delimiter regex (a ``str`` other than the two names, or a compiled ``re.Pattern``;
  ``"tokens"``, ``"Word"`` and the like are refused as mistyped names):
  when the decoded text of the particle's completion ends with a match of the delimiter
  at one of the characters that :math:`x_t` added, e.g. ``r"[.!?]\s"`` at the token
  ``" The"`` of ``"good. The"``, whose leading space completes the match, or ``"\n"`` at a
  token holding a newline. The text is decoded as ``tokenizer.decode`` does (an incomplete
  character is U+FFFD until a later token completes it). The delimiter must have a bounded
  length and match no empty string; it is matched within the last characters of the
  text (its length plus 16 characters of context for lookbehinds and ``\b``). Each
  particle's recent text is kept on the host, so this mode reads the tokens once per
  token (a host sync on accelerators); a memo over (recent text, token), kept per
  tokenizer and delimiter across runs, makes a repeated check one dictionary look-up.

References:

[1] P. Del Moral, *Feynman-Kac Formulae: Genealogical and Interacting Particle
Systems*, Springer, 2004 (any intermediate potentials, adaptive resampling).
[2] A. K. Lew, T. Zhi-Xuan, G. Grand, V. K. Mansinghka, "Sequential Monte Carlo
steering of large language models using probabilistic programs", 2023 (word steps).
[3] I. Puri, S. Sudalairaj, G. Xu, K. Xu, A. Srivastava, "A probabilistic inference
approach to inference-time scaling of LLMs using particle-based Monte Carlo
methods", 2025 (steps of a reasoning chain).
"""

from __future__ import annotations

import re
import weakref

import torch

__all__ = ["StepEnds", "check_steps", "gated_potential", "word_start_table"]

#: Characters around a delimiter match kept in a particle's recent text (lookbehinds, ``\b``).
_CONTEXT = 16
_MAX_DELIMITER = 256
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_TOKEN_BYTES = weakref.WeakKeyDictionary()  # tokenizer -> list of each id's bytes
_MEMOS = weakref.WeakKeyDictionary()  # tokenizer -> {(pattern, flags): delimiter memo}
_MEMO_SIZE = 1 << 20  # entries of one memo before it is cleared


def check_steps(steps):
    """``steps`` validated: ``"token"``, an int ``k >= 2`` (1 is ``"token"``), ``"word"``
    or a compiled delimiter pattern; a ``ValueError`` naming ``steps`` otherwise."""
    if steps == "token" or steps == 1 and not isinstance(steps, bool):
        return "token"
    if steps == "word":
        return steps
    if isinstance(steps, bool) or isinstance(steps, float):
        raise ValueError(f"steps: expected 'token', 'word', a positive int k or a delimiter "
                         f"regex, got {steps!r}")
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"steps: k must be a positive int (a step every k tokens), "
                             f"got {steps}")
        return steps
    if isinstance(steps, str):
        if not steps:
            raise ValueError("steps: the empty delimiter matches everywhere; pass "
                             "steps='token' for a step at every token")
        if steps.lower().rstrip("s") in ("token", "word"):  # a mode's name, mistyped
            mode = steps.lower().rstrip("s")
            raise ValueError(f"steps: {steps!r} is not a mode; did you mean {mode!r}? (A "
                             f"string other than 'token' and 'word' is a delimiter regex; to "
                             f"end steps at the text {steps!r}, pass re.compile({steps!r}))")
        try:
            steps = re.compile(steps)
        except re.error as e:
            raise ValueError(f"steps: {steps!r} is neither 'token' nor 'word' nor a valid "
                             f"delimiter regex ({e})") from None
    if not isinstance(steps, re.Pattern) or not isinstance(steps.pattern, str):
        raise ValueError(f"steps: expected 'token', 'word', a positive int k or a delimiter "
                         f"regex (str or re.Pattern of str), got {steps!r}")
    low, high = re._parser.parse(steps.pattern, steps.flags).getwidth()
    if low == 0:
        raise ValueError(f"steps: the delimiter {steps.pattern!r} can match the empty string, "
                         "so it would end a step everywhere; make it match at least one "
                         "character (or pass steps='token')")
    if high > _MAX_DELIMITER:
        raise ValueError(f"steps: the delimiter {steps.pattern!r} has no bounded length (a *, "
                         f"+ or {{n,}}) or one above {_MAX_DELIMITER} characters; a step ends "
                         "where the text ends with a match, so write its shortest ending, "
                         "e.g. '\\n' for '\\n+'")
    return steps


def _token_bytes(tokenizer) -> list[bytes]:
    """What each token id adds to the decoded text (cached per tokenizer)."""
    from pyro_lm.rewards.words import TokenText

    try:
        return _TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    value = TokenText(tokenizer, check=False).token_bytes
    try:
        _TOKEN_BYTES[tokenizer] = value
    except TypeError:
        pass
    return value


def _memo(tokenizer, pattern: re.Pattern) -> dict:
    """The (recent text, token) -> (new recent text, step end) memo of a delimiter, shared by
    the runs on one tokenizer."""
    key = (pattern.pattern, pattern.flags)
    try:
        return _MEMOS.setdefault(tokenizer, {}).setdefault(key, {})
    except TypeError:  # not weakly referenceable: a memo per run
        return {}


def word_start_table(tokenizer, size: int, device) -> torch.Tensor:
    """Bool ``(size,)``: the ids whose text starts with ASCII whitespace (they start a new
    word); ids past the tokenizer's and tokens with no text are ``False``.

    :param tokenizer: a ``transformers`` tokenizer.
    :param int size: the table's length (the LM's vocabulary, at least).
    :param device: where the table lives.
    """
    pieces = _token_bytes(tokenizer)
    starts = [bool(b) and b[0] in _WHITESPACE for b in pieces[:size]]
    table = torch.zeros(size, dtype=torch.bool, device=device)
    if starts:
        table[: len(starts)] = torch.tensor(starts, dtype=torch.bool, device=device)
    return table


class StepEnds:
    """Which rows of one decoding are at a step end, token by token.

    :param steps: a value of :func:`check_steps` other than ``"token"``.
    :param tokenizer: the LM site's tokenizer (for ``"word"`` and delimiters).
    :param int vocab_size: the LM's vocabulary size.
    :param int rows: ``R``, the decoding rows.
    :param torch.device device: where the rows live.
    """

    def __init__(self, steps, tokenizer, vocab_size: int, rows: int, device: torch.device):
        self.steps, self._on_cpu = steps, device.type == "cpu"
        # ended rows whose complete potential is applied already (it changes no more)
        self._settled = torch.zeros(rows, dtype=torch.bool, device=device)
        if steps == "word":
            self._word = word_start_table(tokenizer, vocab_size, device)
        elif isinstance(steps, re.Pattern):
            self._bytes = _token_bytes(tokenizer)
            self._ends = re.compile(f"(?:{steps.pattern})\\Z", steps.flags)
            width = re._parser.parse(steps.pattern, steps.flags).getwidth()[1]
            self._keep = 4 * (width + _CONTEXT)  # bytes of recent text kept per row
            self._tails = [b""] * rows
            self._memo = _memo(tokenizer, steps)
            self._device = device

    def ends(self, token: torch.Tensor, t: int, ended: torch.Tensor, done: torch.Tensor):
        """The rows at a step end after token ``t``: ``None`` (every row), ``False`` (none:
        the potential is not evaluated at this token) or a bool mask ``(R,)``, which holds
        the rows that have ended (``done``) and are not settled yet (a row is settled once
        a mask held it after it ended: its complete potential is applied).

        :param token: ``(R,)``, the rows' token ``t``.
        :param ended: bool ``(R,)``, rows that had ended before token ``t``.
        :param done: bool ``(R,)``, rows that have ended now.
        """
        steps = self.steps
        if isinstance(steps, int):
            return None if (t + 1) % steps == 0 else False
        if steps == "word":
            if t == 0:
                return False
            live = self._word[token] & ~ended
            if self._on_cpu and not bool(live.any()):
                return False
            return self._settle(live, done)
        return self._delimiter(token, ended, done)

    def _settle(self, live, done):
        fresh = done & ~self._settled
        self._settled = self._settled | fresh
        return live | fresh

    def _delimiter(self, token, ended, done):
        tails, memo, hit = self._tails, self._memo, []
        if len(memo) > _MEMO_SIZE:
            memo.clear()
        for i, (v, gone) in enumerate(zip(token.tolist(), ended.tolist(), strict=True)):
            if gone:
                hit.append(False)
                continue
            key = (tails[i], v)
            found = memo.get(key)
            if found is None:
                found = memo[key] = self._advance(*key)
            tails[i] = found[0]
            hit.append(found[1])
        if not any(hit):
            return False
        return self._settle(torch.tensor(hit, dtype=torch.bool, device=self._device), done)

    def _advance(self, tail: bytes, v: int):
        """``(new tail, whether a delimiter match ends at a character that token v added)``."""
        piece = self._bytes[v] if 0 <= v < len(self._bytes) else b""
        new = tail + piece
        before, after = tail.decode("utf-8", "replace"), new.decode("utf-8", "replace")
        start = 0  # characters that token v left as they were
        for a, b in zip(before, after, strict=False):
            if a != b:
                break
            start += 1
        start = min(start, len(before))
        hit = any(self._ends.search(after, 0, p) is not None
                  for p in range(start + 1, len(after) + 1))
        return new[-self._keep:], hit

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow their ancestors ``index`` ``(R,)`` after resampling."""
        self._settled = self._settled.index_select(0, index)
        if isinstance(self.steps, re.Pattern):
            self._tails = [self._tails[j] for j in index.tolist()]


def gated_potential(potential, pop, subset: bool = False):
    """``potential(values, t, final)`` evaluated only where ``pop.at_end`` says: every row
    when it is ``None`` (or at the end), no evaluation when ``False`` (every row keeps
    ``pop.phi``), else the masked rows' new value and the others' ``pop.phi``.

    :param bool subset: evaluate the potential on the masked rows alone (``values`` with
        ``M`` rows in the particle dim); only for one population on the host, where the
        rows are the particles, and a potential that scores each row on its own (the
        model's factors of one LM site, or a twist)."""
    subset = subset and pop.num_populations == 1 and pop.x.device.type == "cpu"

    def gated(values, t, final):
        mask = None if final else pop.at_end
        if mask is None:
            return potential(values, t, final)
        if mask is False:
            return pop.phi
        if subset:
            rows = mask.nonzero().squeeze(-1)
            if 2 * rows.numel() <= mask.numel():  # else the whole batch costs about the same
                sub = values.reshape(mask.numel(), -1).index_select(0, rows)
                phi = pop.phi.clone()
                phi[rows] = potential(sub.view((rows.numel(),) + values.shape[1:]), t, final)
                return phi
        return torch.where(mask, potential(values, t, final), pop.phi)

    return gated
