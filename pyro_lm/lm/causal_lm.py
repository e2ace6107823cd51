"""Adapter over a transformers causal LM and its tokenizer.

:class:`CausalLM` is the one object the rest of pyro_lm talks to: it owns the
network, the tokenizer and the device, encodes prompts with left padding, and
runs forward passes *as a distribution* (dropout off, float32 log-probs), so
that sampling and scoring always describe the same law.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CausalLM"]


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Temporarily switch ``module`` to eval mode (no dropout), restoring each
    submodule's ``training`` flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


class CausalLM(nn.Module):
    r"""A causal language model seen as a conditional distribution over tokens.

    Wraps a transformers ``*ForCausalLM`` model and its tokenizer. The model is
    a registered submodule, so ``pyro.module("policy", lm)`` and
    ``lm.parameters()`` work as for any :class:`torch.nn.Module`.

    A :class:`CausalLM` made by :meth:`from_pretrained` or by the constructor is
    frozen (``requires_grad=False``): it plays the prior :math:`p_0`. Use
    :meth:`trainable_copy` for a guide :math:`q`.

    :param model: a transformers causal LM (``AutoModelForCausalLM``-like).
    :param tokenizer: its tokenizer; must define an EOS or a pad token.
    :param bool add_bos: prepend the tokenizer's BOS token when encoding text
        prompts (default: when the tokenizer has one and does not add it itself).
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
        bos = tokenizer.bos_token_id
        if add_bos is None:
            add_bos = bos is not None and not self._tokenizer_adds_bos()
        if add_bos and bos is None:
            raise ValueError("add_bos: the tokenizer has no BOS token to prepend")
        self.add_bos = bool(add_bos)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, device=None, dtype=None,
                        trust_remote_code: bool = False, **kwargs) -> CausalLM:
        """Load a causal LM and its tokenizer.

        A local directory is read with ``local_files_only=True``: nothing is
        fetched. A hub name is passed to transformers as given, which may
        download it (only because the caller asked for it by name).

        :param path_or_name: a local directory or a model hub name.
        :param device: where to put the model (default: CPU).
        :param dtype: parameter dtype, e.g. ``torch.bfloat16`` (log-probs are
            always computed in float32).
        :param bool trust_remote_code: forwarded to transformers; off unless asked.
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
        return cls(model, tokenizer)

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
        return int(self._eos)

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
        """A hash of the vocabulary and special tokens, to compare tokenizers."""
        if not hasattr(self, "_fingerprint"):
            vocab = sorted(self.tokenizer.get_vocab().items())
            blob = repr((vocab, self.eos_token_id, self.pad_token_id, self.add_bos,
                         self.bos_token_id, self.vocab_size)).encode()
            self._fingerprint = hashlib.sha1(blob).hexdigest()
        return self._fingerprint

    def check_compatible(self, other: CausalLM, name: str = "lm") -> None:
        """Raise a :class:`ValueError` naming ``name`` unless ``other`` tokenizes
        exactly like this LM (same vocabulary, EOS, pad, BOS and output size)."""
        if not isinstance(other, CausalLM):
            raise TypeError(f"{name}: expected a pyro_lm.CausalLM, got {type(other).__name__}")
        if other is self or other.tokenizer_fingerprint() == self.tokenizer_fingerprint():
            return
        diffs = []
        for attr in ("vocab_size", "eos_token_id", "pad_token_id", "bos_token_id", "add_bos"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                diffs.append(f"{attr} {b} != {a}")
        if not diffs:
            diffs.append("the vocabularies map tokens to different ids")
        raise ValueError(
            f"{name}: tokenizer mismatch with the prior ({'; '.join(diffs)}). Prior and guide "
            "must share one tokenizer; build the guide with prior.trainable_copy()")

    # ----------------------------------------------------------------- encoding
    def _tokenizer_adds_bos(self) -> bool:
        try:
            with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError, KeyError):  # exotic tokenizers: assume they do not
            return False
        return len(with_special) > len(without) and with_special[0] == self.tokenizer.bos_token_id

    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts, left-padded.

        :param texts: a string or a list of strings; none may be empty.
        :returns: ``(input_ids, attention_mask)``, both ``(B, L)`` on :attr:`device`
            (``B = 1`` for a single string).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("prompts: got an empty list; pass at least one prompt")
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompts[{i}]: expected str, got {type(text).__name__}")
            if text == "":
                raise ValueError(
                    f"prompts[{i}] is the empty string; an LM needs at least one token of "
                    "context. For unconditional generation pass the BOS token, e.g. "
                    "prompts=lm.tokenizer.bos_token, or a tensor [[lm.bos_token_id]]")
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if self.add_bos and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + list(ids)
            if not ids:
                raise ValueError(f"prompts[{i}]: {text!r} encodes to no tokens")
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def decode(self, x: torch.Tensor, skip_special_tokens: bool = True):
        """Decode completions, dropping everything from the first EOS on.

        :param x: LongTensor ``(*batch, T)``.
        :returns: a string for ``(T,)``, else nested lists of strings matching ``batch``.
        """
        if x.dim() == 1:
            ids = x.tolist()
            if self.eos_token_id in ids:
                ids = ids[: ids.index(self.eos_token_id)]
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return [self.decode(row, skip_special_tokens) for row in x]

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

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return (f"CausalLM({name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, device={self.device})")
