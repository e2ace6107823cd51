"""Adapter over a transformers causal LM and its tokenizer.

:class:`CausalLM` is the one object the rest of pyro_lm talks to: it owns the
network, the tokenizer and the device, encodes prompts (text, chats or token ids)
with left padding exactly as transformers would, knows every token that ends a
completion, decodes completions to text, and runs forward passes *as a
distribution* (dropout off, float32 log-probs), so that sampling and scoring
always describe the same law.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import hashlib
import inspect
import os
from collections.abc import Mapping

import torch
from torch import nn

from pyro_lm.lm.token_bytes import byte_kind, token_bytes

__all__ = ["CausalLM"]

#: Distinct texts whose token ids a :class:`CausalLM` keeps (the cache empties when full).
_TEXT_CACHE = 1024


def submodules(module: nn.Module) -> list[nn.Module]:
    """Every module in ``module``'s tree, itself included: those of ``module.modules()``, in
    another order and listed without its recursive generators and memo, about twice as fast
    (sampling reads them on every call, to check the dropout and decoder state). A module
    registered in several places is listed once per place."""
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        if m is not None:
            found.append(m)
            stack.extend(m._modules.values())
    return found


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Temporarily switch ``module`` to eval mode (no dropout), restoring each
    submodule's ``training`` flag afterwards."""
    training = [m for m in submodules(module) if m.training]  # usually none: nothing to do
    if training:
        module.eval()
    try:
        yield module
    finally:
        for m in training:
            m.training = True


class CausalLM(nn.Module):
    r"""A causal language model seen as a conditional distribution over tokens.

    Wraps a transformers ``*ForCausalLM`` model and its tokenizer. The model is
    a registered submodule, so ``pyro.module("policy", lm)`` and
    ``lm.parameters()`` work as for any :class:`torch.nn.Module`.

    A :class:`CausalLM` made by :meth:`from_pretrained` or by the constructor is
    frozen (``requires_grad=False``): it plays the prior :math:`p_0`. Use
    :meth:`trainable_copy` for a guide :math:`q`.

    **Prompts** are encoded as transformers would: a text prompt is exactly
    ``tokenizer(prompt)["input_ids"]``, with the special tokens that tokenizer adds
    itself (a Llama or Mistral tokenizer adds its BOS, GPT-2's and Qwen2's add none),
    and a chat (a list of messages) is the tokenizer's chat template with the
    generation prompt (see :meth:`encode`). Models that need a start token their
    tokenizer does not add ask for it with ``add_bos=True``.

    **Completions end** at the first of :attr:`eos_token_ids`: the tokenizer's EOS
    and every id of the model's ``generation_config.eos_token_id`` (instruct models
    end a turn with one token and a document with another).

    :param model: a transformers causal LM (``AutoModelForCausalLM``-like).
    :param tokenizer: its tokenizer; must define an EOS or a pad token.
    :param bool add_bos: ``True``: prepend the tokenizer's BOS token to text and chat
        prompts unless they already start with it. ``None`` or ``False`` (default):
        condition on what the tokenizer (or the chat template) writes, nothing more.
    :param bool trainable: leave ``requires_grad`` as it is instead of freezing.
    """

    def __init__(self, model: nn.Module, tokenizer, add_bos: bool | None = None,
                 trainable: bool = False):
        super().__init__()
        if not hasattr(model, "forward") or not hasattr(model, "config"):
            raise TypeError(
                f"model: expected a transformers causal LM, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self._text_ids: dict = {}  # (text, len(tokenizer)) -> ids, see _encode_one
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if eos is None and pad is None:
            raise ValueError(
                "tokenizer: it defines neither an EOS nor a pad token, so a completion "
                "cannot end; set tokenizer.eos_token (and optionally tokenizer.pad_token) "
                "before wrapping it in CausalLM")
        self._eos = eos if eos is not None else pad
        self._pad = pad if pad is not None else eos
        if add_bos not in (None, False, True):
            raise TypeError(f"add_bos: expected True, False or None, got {add_bos!r}")
        if add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos: the tokenizer has no BOS token to prepend; set "
                             "tokenizer.bos_token, or leave add_bos unset")
        self.add_bos = bool(add_bos)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, device=None, dtype=None,
                        trust_remote_code: bool = False, add_bos: bool | None = None,
                        trainable: bool = False, **kwargs) -> CausalLM:
        """Load a causal LM and its tokenizer.

        A local directory is read with ``local_files_only=True``: nothing is
        fetched. A hub name is passed to transformers as given, which may
        download it (only because the caller asked for it by name).

        :param path_or_name: a local directory or a model hub name.
        :param device: where to put the model (default: CPU).
        :param dtype: parameter dtype, e.g. ``torch.bfloat16`` (log-probs are
            always computed in float32).
        :param bool trust_remote_code: forwarded to transformers; off unless asked.
        :param bool add_bos: :class:`CausalLM`'s option (prepend the BOS to text prompts).
        :param bool trainable: :class:`CausalLM`'s option (do not freeze the weights).
        :param kwargs: further options of transformers' ``from_pretrained`` (e.g.
            ``revision``, ``attn_implementation``), given to the tokenizer and the model.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.fspath(path_or_name)
        local = os.path.isdir(path)
        looks_local = (path.startswith((".", "/", "~")) or path.count("/") > 1
                       or os.path.isdir(path.split("/")[0]))
        if not local and looks_local:
            raise FileNotFoundError(
                f"path_or_name: {path!r} is not a directory; pass an existing local model "
                "directory (config.json, weights, tokenizer files) or a hub name 'org/model'")
        opts = dict(local_files_only=True) if local else {}
        opts.update(kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  **opts)
        model_opts = dict(opts)
        if dtype is not None:
            model_opts["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     **model_opts)
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, add_bos=add_bos, trainable=trainable)

    def trainable_copy(self, lora=None) -> CausalLM:
        """An independent copy with gradients, to serve as a guide :math:`q`.

        :param lora: ``None`` for a full copy, or a ``peft.LoraConfig`` (or a
            dict of its arguments) for a LoRA guide. A LoRA guide shares the base
            weights with this LM (one copy in memory); only the adapters train,
            and this LM is never modified.
        """
        if lora is None:
            model = copy.deepcopy(self.model)
            model.requires_grad_(True)
            return CausalLM(model, self.tokenizer, add_bos=self.add_bos, trainable=True)
        try:
            import peft
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("lora: LoRA guides need peft; pip install 'pyro-lm[lora]'") from e
        if isinstance(lora, dict):
            lora = peft.LoraConfig(**lora)
        if not isinstance(lora, peft.PeftConfig):
            raise TypeError(f"lora: expected None, a peft.LoraConfig or a dict of its fields "
                            f"(e.g. dict(r=8, target_modules=['c_attn'])), got {lora!r}")
        # New module objects, the same parameter tensors: peft injects adapters
        # into the copy's modules and leaves this LM's modules untouched.
        memo = {id(p): p for p in self.model.parameters()}
        memo.update({id(b): b for b in self.model.buffers()})
        shell = copy.deepcopy(self.model, memo)
        for p in shell.parameters():
            p.requires_grad_(False)
        import warnings

        with warnings.catch_warnings():  # peft asks transformers a deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            model = peft.get_peft_model(shell, lora)
        from pyro_lm.lm.export import guard_shared_base

        # peft's merge_and_unload / merge_adapter would write into the prior's shared weights
        guard_shared_base(model)
        # eval mode like the prior it copies (the LM is always run as a distribution, without
        # dropout); in training mode pyro.module would warn about every frozen base weight
        return CausalLM(model, self.tokenizer, add_bos=self.add_bos, trainable=True).eval()

    # --------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Size of the output distribution (the logits' last dimension)."""
        emb = self.model.get_output_embeddings()
        if emb is not None and hasattr(emb, "weight"):
            return int(emb.weight.shape[0])
        return int(self.model.config.vocab_size)

    @property
    def eos_token_id(self) -> int:
        """The tokenizer's EOS (its pad token if it has none): the first of
        :attr:`eos_token_ids`, the token :meth:`~pyro_lm.LMDistribution.encode_value`
        ends observed text with."""
        return int(self._eos)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a completion: :attr:`eos_token_id` first, then the ids of
        the model's ``generation_config.eos_token_id`` (an int or a list), without
        repeats. Read from the model at each access, so that editing its generation
        config takes effect; ids outside the vocabulary are left out (never sampled)."""
        ids = [int(self._eos)]
        extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if extra is not None:
            ids += [int(extra)] if isinstance(extra, int) else [int(i) for i in extra]
        size = self.vocab_size
        return tuple(i for i in dict.fromkeys(ids) if 0 <= i < size)

    @property
    def pad_token_id(self) -> int:
        return int(self._pad)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def max_length(self) -> int | None:
        """Longest context the model accepts (``n_positions`` and the like), if known."""
        cfg = self.model.config
        for name in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                return value
        return None

    def tokenizer_fingerprint(self) -> str:
        """A hash of the vocabulary, special tokens and chat template, to compare
        tokenizers (the vocabulary's hash is computed once; the EOS ids are read anew)."""
        if not hasattr(self, "_vocab_hash"):
            vocab = sorted(self.tokenizer.get_vocab().items())
            self._vocab_hash = hashlib.sha1(repr(vocab).encode()).hexdigest()
        blob = repr((self._vocab_hash, self.eos_token_ids, self.pad_token_id, self.add_bos,
                     self.bos_token_id, self.vocab_size,
                     getattr(self.tokenizer, "chat_template", None))).encode()
        return hashlib.sha1(blob).hexdigest()

    def check_compatible(self, other: CausalLM, name: str = "lm") -> None:
        """Raise a :class:`ValueError` naming ``name`` unless ``other`` tokenizes
        exactly like this LM (same vocabulary, EOS ids, pad, BOS, chat template and output
        size)."""
        if not isinstance(other, CausalLM):
            raise TypeError(f"{name}: expected a pyro_lm.CausalLM, got {type(other).__name__}")
        if other is self or other.tokenizer_fingerprint() == self.tokenizer_fingerprint():
            return
        diffs = []
        for attr in ("vocab_size", "eos_token_ids", "pad_token_id", "bos_token_id", "add_bos"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                diffs.append(f"{attr} {b} != {a}")
        if not diffs:
            diffs.append("the vocabularies map tokens to different ids")
        raise ValueError(
            f"{name}: tokenizer mismatch with the prior ({'; '.join(diffs)}). Prior and guide "
            "must share one tokenizer; build the guide with prior.trainable_copy()")

    # ----------------------------------------------------------------- encoding
    @staticmethod
    def is_single_prompt(prompts) -> bool:
        """Whether ``prompts`` is one prompt (a string, one chat, or an encoding whose
        ``input_ids`` is one row) rather than a batch of them."""
        if isinstance(prompts, str):
            return True
        if isinstance(prompts, Mapping):
            return _is_id_row(_as_list(prompts.get("input_ids")))
        return _is_chat(prompts)

    def encode(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts as transformers would, left-padded.

        A prompt is one of

        * a string: exactly ``tokenizer(prompt)["input_ids"]``, with the special tokens
          the tokenizer adds itself (and nothing else, unless ``add_bos``);
        * a chat, a list of messages ``{"role": ..., "content": ...}``: the tokenizer's
          chat template rendered with ``add_generation_prompt=True`` and tokenized
          without adding special tokens, as ``tokenizer.apply_chat_template`` does (a
          template that writes the BOS gives one BOS);
        * a ``BatchEncoding`` (or a dict) with ``input_ids`` and optionally
          ``attention_mask``, e.g. from ``tokenizer(texts, padding=True)`` or
          ``apply_chat_template(..., return_dict=True)``: its tokens as they are (the
          masked positions are dropped, so right-padded rows are re-padded on the left).

        :param prompts: one prompt, or a list of strings and chats (``B`` rows), or an
            encoding (one row per row of its ``input_ids``).
        :returns: ``(input_ids, attention_mask)``, both ``(B, L)`` on :attr:`device`
            (``B = 1`` for a single prompt).
        :raises ValueError: naming the prompt that encodes to no tokens, a chat for a
            tokenizer without a chat template, or a malformed message.
        """
        if isinstance(prompts, Mapping):
            rows = self._encoding_rows(prompts)
        else:
            single = isinstance(prompts, str) or _is_chat(prompts)
            items = [prompts] if single else prompts
            if not isinstance(items, (list, tuple)):
                raise TypeError(f"prompts: expected a string, a chat (list of messages), a "
                                f"list of them or a BatchEncoding, got {type(prompts).__name__}")
            if not items:
                raise ValueError("prompts: got an empty list; pass at least one prompt")
            rows = [self._encode_one(p, "prompts" if single else f"prompts[{i}]")
                    for i, p in enumerate(items)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _encode_one(self, prompt, name: str) -> list[int]:
        """The token ids of one text or chat prompt (``name`` for errors)."""
        if isinstance(prompt, str):
            # programs re-run per token (SMC's potentials) encode the same text each time
            key = (prompt, len(self.tokenizer))  # tokens added later change the encoding
            cache = self.__dict__.setdefault("_text_ids", {})  # also when unpickled
            ids = cache.get(key)
            if ids is None:
                ids = list(self.tokenizer(prompt)["input_ids"])
                if len(cache) >= _TEXT_CACHE:
                    cache.clear()
                cache[key] = ids
            ids = list(ids)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, Mapping) for m in prompt):
            ids = self._encode_chat(prompt, name)
        else:
            raise TypeError(
                f"{name}: expected a string or a chat (a list of {{'role', 'content'}} "
                f"dicts), got {type(prompt).__name__}; pass token ids as a LongTensor (B, L) "
                "with an attention_mask, or a BatchEncoding")
        bos = self.bos_token_id
        if self.add_bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            what = "is the empty string" if prompt == "" else f"({prompt!r}) encodes to no tokens"
            raise ValueError(
                f"{name} {what}, and the tokenizer adds no special token to it; an LM needs "
                "at least one token of context. For unconditional generation pass the BOS "
                "token, e.g. prompts=lm.tokenizer.bos_token, a tensor [[lm.bos_token_id]], "
                "or build the CausalLM with add_bos=True")
        return ids

    def _encode_chat(self, messages, name: str) -> list[int]:
        if not messages:
            raise ValueError(f"{name}: an empty chat; a chat needs at least one message")
        for j, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or m.get("content") is None:
                raise ValueError(
                    f"{name}[{j}]: a chat message needs a 'role' (a string) and a 'content', "
                    f"got keys {sorted(m)}; write e.g. {{'role': 'user', 'content': 'Hi'}}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"{name}: a chat prompt needs the tokenizer's chat template, and this tokenizer "
                "has none; set tokenizer.chat_template (a Jinja template) or pass the prompt "
                "as text")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                  tokenize=False)
        # the template writes the special tokens it wants (the BOS of Llama-style templates)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _encoding_rows(encoding) -> list[list[int]]:
        """The unmasked token ids of each row of a ``BatchEncoding``-like mapping."""
        if "input_ids" not in encoding:
            raise ValueError("prompts: a mapping prompt must be a BatchEncoding (or dict) with "
                             f"'input_ids', got keys {sorted(encoding)}")
        ids, mask = _as_list(encoding["input_ids"]), _as_list(encoding.get("attention_mask"))
        single = _is_id_row(ids)
        ids = [ids] if single else ids
        if mask is not None and single:
            mask = [mask]
        if not ids or not all(_is_id_row(r) for r in ids):
            raise ValueError("prompts: 'input_ids' must be a row or rows of token ids")
        if mask is None:
            mask = [[1] * len(r) for r in ids]
        if len(mask) != len(ids) or any(len(m) != len(r) for m, r in zip(mask, ids,
                                                                             strict=True)):
            raise ValueError("prompts: 'attention_mask' does not match the shape of "
                             "'input_ids'")
        rows = []
        for i, (r, m) in enumerate(zip(ids, mask, strict=True)):
            if any(v not in (0, 1) for v in m):
                raise ValueError(f"prompts: attention_mask[{i}] holds values other than 0 "
                                 "and 1")
            row = [int(t) for t, keep in zip(r, m, strict=True) if keep]
            if not row:
                raise ValueError(f"prompts: input_ids[{i}] has no unmasked token; each prompt "
                                 "needs at least one token")
            rows.append(row)
        return rows

    # ----------------------------------------------------------------- decoding
    def decode(self, x: torch.Tensor, skip_special_tokens: bool = True,
               errors: str = "replace"):
        """Decode completions, dropping everything from the first EOS (any of
        :attr:`eos_token_ids`) on.

        Byte-level BPE (GPT-2, Llama 3, Qwen2) and byte-fallback (Llama 2, Mistral)
        tokenizers spell a character such as "東" or "🙂" with several byte tokens, so
        a completion can end inside one: truncated at ``T`` tokens, or ended by EOS,
        after its first bytes. ``errors`` says what becomes of such bytes:

        * ``"replace"`` (default): exactly ``tokenizer.decode`` of the completion's
          tokens, with U+FFFD for bytes that are not a character (a byte-fallback
          decoder replaces every byte of a run of byte tokens that holds one, so a
          whole character before the cut one may show as U+FFFD too).
        * ``"drop"``: the incomplete character at the end is left out, the text is the
          longest the bytes spell; invalid bytes elsewhere still give U+FFFD.
        * ``"strict"``: a :class:`ValueError` naming the row, for an incomplete
          character at the end or invalid bytes anywhere.

        Tokenizers whose tokens are text (word-level ones) never cut a character.

        :param x: LongTensor ``(*batch, T)``.
        :param bool skip_special_tokens: leave special tokens out of the text.
        :param str errors: ``"replace"``, ``"drop"`` or ``"strict"``.
        :returns: a string for ``(T,)``, else nested lists of strings matching ``batch``.
        """
        if errors not in _DECODE_ERRORS:
            raise ValueError(f"errors: expected one of {_DECODE_ERRORS}, got {errors!r}")
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError("x: expected a LongTensor (*batch, T) of completions")
        eos = set(self.eos_token_ids)
        batch = tuple(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1]).tolist()
        texts = []
        for k, row in enumerate(flat):
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            name = "x" if not batch else f"x[{', '.join(map(str, _unravel(k, batch)))}]"
            texts.append(self._decode_row(row[:cut], skip_special_tokens, errors, name))
        return texts[0] if not batch else _nest(texts, batch)

    def _decode_row(self, ids: list[int], skip: bool, errors: str, name: str) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip)
        if errors == "replace" or "\ufffd" not in text:
            return text
        if byte_kind(self.tokenizer) not in ("byte_level", "byte_fallback"):
            return text  # tokens are text: the U+FFFD is a character of the vocabulary
        pieces = token_bytes(self.tokenizer, ids, skip)
        data = b"".join(pieces)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(data, final=False)
        tail = decoder.getstate()[0]  # the bytes of an incomplete character at the end
        if errors == "strict":
            if tail:
                raise ValueError(
                    f"{name}: the completion ends inside a multi-byte character (its first "
                    f"bytes {tail.hex(' ')}); decode with errors='drop' to leave it out or "
                    "errors='replace' to show U+FFFD, or allow more max_new_tokens")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{name}: the completion's bytes are not UTF-8 ({e.reason} at byte "
                    f"{e.start}); decode with errors='replace' to show U+FFFD") from None
            return text
        if not tail:
            return text
        # the tokens before the one where the incomplete character starts, then the
        # characters that token completes before it (byte-level merges may straddle)
        start, done, k = len(data) - len(tail), 0, 0
        while done + len(pieces[k]) <= start:
            done += len(pieces[k])
            k += 1
        head = self.tokenizer.decode(ids[:k], skip_special_tokens=skip)
        return head + data[done:start].decode("utf-8", "replace")

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                logits_to_keep: int = 0):
        """One forward pass of the network with dropout off.

        :returns: ``(logits, cache)`` with logits ``(N, L', V)`` in the model's dtype.
        """
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=use_cache)
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if logits_to_keep and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if self.model.training:
            with eval_mode(self.model):
                out = self.model(**kwargs)
        else:
            out = self.model(**kwargs)
        if not use_cache:
            return out.logits, None
        new_cache = out["cache"] if "cache" in out else getattr(out, "past_key_values", None)
        return out.logits, new_cache

    @property
    def linear_head(self) -> nn.Linear | None:
        """The output layer, when the logits are exactly ``linear_head(h)`` of the last
        hidden states ``h`` of :meth:`hidden_states` (a plain ``nn.Linear``, no logit scaling
        or soft-capping: the architectures of :data:`PLAIN_HEAD_ARCHITECTURES`, also under
        peft LoRA adapters that leave the head alone), else ``None``."""
        base = _plain_lora_base(self.model)
        if base is None or type(base).__name__ not in PLAIN_HEAD_ARCHITECTURES:
            return None
        head = base.get_output_embeddings()
        return head if type(head) is nn.Linear else None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, keep: int = 0) -> torch.Tensor:
        """The last hidden states ``(N, keep, H)`` of the last ``keep`` positions (all for 0),
        dropout off, for a model with a :attr:`linear_head`: its logits are
        ``linear_head(hidden_states(...))``.

        :raises ValueError: if the model has no :attr:`linear_head`.
        """
        if self.linear_head is None:
            raise ValueError("hidden_states: this model's logits are not a plain linear head "
                             "of its hidden states; use forward()")
        body = _plain_lora_base(self.model).base_model
        with eval_mode(self.model) if self.model.training else contextlib.nullcontext():
            out = body(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False)
        hidden = out[0]
        return hidden[:, -keep:] if keep else hidden

    # ------------------------------------------------------------------- export
    def save_pretrained(self, directory: str | os.PathLike, merge: bool = True,
                        overwrite: bool = False, **kwargs) -> str:
        """Write this LM with its tokenizer and generation config, loadable by plain
        transformers (or peft, for a LoRA guide with ``merge=False``), atomically; the prior
        a LoRA guide shares its base weights with is never modified.

        See :func:`pyro_lm.lm.export.save_pretrained` for the arguments.

        :returns: the directory written.
        """
        from pyro_lm.lm.export import save_pretrained

        return save_pretrained(self, directory, merge=merge, overwrite=overwrite, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return (f"CausalLM({name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, device={self.device})")


#: Model classes whose logits are ``lm_head(last hidden state)`` exactly, with a plain
#: ``nn.Linear`` head (see :attr:`CausalLM.linear_head`).
PLAIN_HEAD_ARCHITECTURES = frozenset({
    "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "GPTNeoXForCausalLM"})


def _plain_lora_base(model):
    """``model``, or the transformers model a peft model with only LoRA adapters wraps
    (LoRA changes the layers, not the forward pass), else ``None``."""
    if not hasattr(model, "peft_config"):
        return model
    try:
        import peft
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    if not isinstance(model, peft.PeftModel) or any(
            c.peft_type != peft.PeftType.LORA for c in model.peft_config.values()):
        return None
    return model.get_base_model()


#: The ``errors`` modes of :meth:`CausalLM.decode`.
_DECODE_ERRORS = ("replace", "drop", "strict")


def _is_chat(prompt) -> bool:
    """A non-empty list of messages (mappings)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and isinstance(prompt[0], Mapping))


def _as_list(value):
    """Token ids (tensor, array, list) as nested Python lists; ``None`` stays ``None``."""
    return value.tolist() if hasattr(value, "tolist") else value


def _is_id_row(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(t, int) for t in value)


def _unravel(k: int, shape: tuple[int, ...]) -> list[int]:
    index = []
    for size in reversed(shape):
        index.append(k % size)
        k //= size
    return index[::-1]


def _nest(flat: list, shape: tuple[int, ...]) -> list:
    """``flat`` (row-major) as nested lists of ``shape``."""
    for size in reversed(shape[1:]):
        flat = [flat[i:i + size] for i in range(0, len(flat), size)]
    return flat
