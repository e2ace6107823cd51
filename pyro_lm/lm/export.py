"""Export a fine-tuned guide as a model directory that plain transformers or peft loads.

A guide made by :meth:`~pyro_lm.CausalLM.trainable_copy` is written with its tokenizer
and generation config:

* a full guide (``trainable_copy()``) as a plain transformers model;
* a LoRA guide (``trainable_copy(lora=...)``) either merged (``merge=True``, the
  default): the adapters are added to a *copy* of the weights they modify and a plain
  model is written, or as the adapter itself (``merge=False``): ``adapter_config.json``
  and the adapter weights, for ``peft.PeftModel.from_pretrained(base, directory)`` or
  ``peft.AutoPeftModelForCausalLM``.

The directory is written atomically: into a temporary sibling, renamed into place once
complete, so that a crash never leaves a half-written export under ``directory``.

.. warning:: **peft's in-place merges change the prior.** A LoRA guide shares its base
   weight tensors with the prior it was copied from (one copy in memory). peft's
   ``guide.model.merge_and_unload()`` and ``guide.model.merge_adapter()`` add the
   adapters *in place* into those tensors, and so change the prior too (by up to 13 nats
   per completion on a tiny Llama). Export with :func:`save_pretrained`, or take a
   standalone merged model with :func:`merged_model`; :func:`guard_shared_base` makes
   peft's two methods safe on a guide, and :func:`check_unmerged` detects after the fact
   that they were called.

Example::

    policy = prior.trainable_copy(lora=dict(r=8, target_modules=["q_proj", "v_proj"]))
    ...  # train
    save_pretrained(policy, "out/merged")                 # AutoModelForCausalLM loads it
    save_pretrained(policy, "out/adapter", merge=False)   # PeftModel loads it
"""

from __future__ import annotations

import copy
import itertools
import os
import secrets
import shutil

from torch import nn

# No import of pyro_lm.lm.causal_lm: CausalLM.save_pretrained delegates here.

__all__ = ["save_pretrained", "merged_model", "guard_shared_base", "check_unmerged"]

#: peft methods that merge adapters in place into the (shared) base weights
_IN_PLACE_MERGES = ("merge_and_unload", "merge_adapter")


def save_pretrained(lm: nn.Module, directory: str | os.PathLike, merge: bool = True,
                    overwrite: bool = False, base_model_name_or_path: str | None = None,
                    **save_kwargs) -> str:
    """Write ``lm`` (a guide, or any :class:`~pyro_lm.CausalLM`) with its tokenizer and
    generation config, loadable without pyro_lm.

    The prior a guide was copied from is never modified: a merge adds the adapters into
    copies of the weights it changes, and only reads the others.

    :param lm: the LM to write.
    :param directory: the export directory. It must not exist, or be empty, unless
        ``overwrite=True``; its parent is created if needed.
    :param bool merge: for a LoRA guide, write a plain transformers model with the
        adapters merged in (``True``, the default) or the peft adapter alone
        (``False``). Only ``True`` applies to a model without adapters.
    :param bool overwrite: replace an existing non-empty ``directory``.
    :param str base_model_name_or_path: with ``merge=False``, the base model that
        ``adapter_config.json`` names for ``AutoPeftModelForCausalLM`` (default: the
        directory or hub name the prior was loaded from, if any).
    :param save_kwargs: passed to the ``save_pretrained`` of the transformers or peft
        model, e.g. ``max_shard_size="2GB"``.
    :returns: the export directory, as a string.
    """
    if _is_peft(lm) or not (hasattr(lm, "tokenizer") and isinstance(
            getattr(lm, "model", None), nn.Module)):
        raise TypeError(f"lm: expected a pyro_lm.CausalLM, got {type(lm).__name__}; wrap a "
                        "transformers model as CausalLM(model, tokenizer) first")
    if not isinstance(merge, bool):
        raise TypeError(f"merge: expected True or False, got {merge!r}")
    if not isinstance(overwrite, bool):  # a truthy string would replace an export
        raise TypeError(f"overwrite: expected True or False, got {overwrite!r}")
    adapters = _is_peft(lm.model)
    if adapters:
        check_unmerged(lm)
    elif not merge:
        raise ValueError(
            "merge=False writes a peft adapter, but this LM has none (it is a full model, "
            "e.g. from trainable_copy() without lora); drop merge=False to write the whole "
            "model, or export a guide made by trainable_copy(lora=...)")
    if base_model_name_or_path is not None and merge:
        raise ValueError("base_model_name_or_path: only an adapter export (merge=False) "
                         "names a base model; drop the argument")
    target = os.path.abspath(os.fspath(directory))
    _check_target(target, overwrite)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _sibling(target, "partial")
    os.mkdir(tmp)  # not tempfile.mkdtemp: its mode 0o700 would become the export's
    try:
        if not adapters:
            lm.model.save_pretrained(tmp, **save_kwargs)
        elif merge:
            _merge_into_copy(lm.model, copy_all=False).save_pretrained(tmp, **save_kwargs)
        else:
            _save_adapter(lm.model, tmp, base_model_name_or_path, save_kwargs)
        generation_config = getattr(_base(lm.model), "generation_config", None)
        if generation_config is not None and not os.path.exists(
                os.path.join(tmp, "generation_config.json")):
            generation_config.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def merged_model(lm: nn.Module, **merge_kwargs) -> nn.Module:
    """A standalone transformers model with ``lm``'s LoRA adapters merged in.

    Unlike peft's ``merge_and_unload()``, nothing is merged in place: the result owns
    all of its weights (a full copy), so training it further cannot change the prior
    the guide shares weights with, and the guide itself keeps working.

    :param lm: a LoRA guide (a :class:`~pyro_lm.CausalLM` or its peft model).
    :param merge_kwargs: passed to peft's ``merge_and_unload`` on the copy, e.g.
        ``adapter_names=[...]`` or ``safe_merge=True``.
    """
    model = _network(lm)
    if not _is_peft(model):
        raise ValueError("lm: it has no peft adapters to merge; a full model is already "
                         "standalone (copy.deepcopy(lm.model) for an independent copy)")
    check_unmerged(model)
    return _merge_into_copy(model, copy_all=True, **merge_kwargs)


def guard_shared_base(model: nn.Module) -> nn.Module:
    """Make peft's in-place merges safe on a model whose base weights are shared.

    On the returned (same) peft model, ``merge_and_unload()`` returns
    :func:`merged_model` (a merged copy; the guide and the prior are left as they were)
    and ``merge_adapter()`` raises, since merging into shared weights would change the
    prior. The guard is a pair of instance attributes (on the peft model and on its
    tuner, ``model.base_model``): it costs nothing at run time, survives pickling and
    deep copies, and is idempotent.

    :param model: a peft model, e.g. ``guide.model`` of a LoRA guide.
    """
    if not _is_peft(model):
        raise ValueError(f"model: expected a peft model, got {type(model).__name__}")
    for obj in (model, model.base_model):
        for name in _IN_PLACE_MERGES:
            object.__setattr__(obj, name, _SharedBaseGuard(model, name))
    return model


class _SharedBaseGuard:
    """Stands in for peft's in-place merge ``method`` on a guarded ``model``."""

    def __init__(self, model: nn.Module, method: str):
        self.model, self.method = model, method

    def __call__(self, *args, **kwargs):
        if self.method == "merge_and_unload":
            names = ("progressbar", "safe_merge", "adapter_names")
            return merged_model(self.model, **dict(zip(names[:len(args)], args, strict=True)),
                                **kwargs)
        raise RuntimeError(
            f"{self.method}: this LoRA guide shares its base weights with the prior, so an "
            "in-place merge would change the prior too; use "
            "pyro_lm.lm.export.merged_model(guide) for a merged copy, or "
            "pyro_lm.lm.export.save_pretrained(guide, directory) to export it")


def check_unmerged(lm: nn.Module) -> None:
    """Raise a :class:`RuntimeError` if a LoRA guide's adapters were merged in place.

    peft records each merge on the adapter layers (``merged``) and ``merge_and_unload()``
    removes the layers, so the check is exact and reads no weights. Either means the
    base weights the guide shares with its prior, and hence the prior, were changed.

    :param lm: a :class:`~pyro_lm.CausalLM` or a (peft) model; one without adapters passes.
    """
    model = _network(lm)
    if not _is_peft(model):
        return
    layers = _tuner_layers(model)
    if not layers:
        raise RuntimeError(
            "lm: its peft model has no adapter layers left (merge_and_unload() or unload() "
            "was called on it); after merge_and_unload() the base weights, which a LoRA "
            "guide shares with its prior, hold the merged adapters. Reload the prior and "
            "rebuild the guide; export with pyro_lm.lm.export.save_pretrained instead")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"lm: its adapters are merged in place into {len(merged)} base layers (e.g. "
            f"{merged[0]!r}, by merge_adapter()); a LoRA guide shares those weights with its "
            "prior, so the prior is changed too. Call lm.model.unmerge_adapter() (exact only "
            "up to rounding) or reload the prior; export with "
            "pyro_lm.lm.export.save_pretrained, which merges into a copy")


# ------------------------------------------------------------------------------ helpers
def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return isinstance(model, PeftModel)


def _network(lm: nn.Module) -> nn.Module:
    """The network of a :class:`~pyro_lm.CausalLM`; a bare (peft) model as it is."""
    if _is_peft(lm) or not hasattr(lm, "tokenizer"):
        return lm
    return lm.model


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft(model) else model


def _tuner_layers(model: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _merge_into_copy(model: nn.Module, copy_all: bool, **merge_kwargs) -> nn.Module:
    """Merge ``model``'s adapters into a copy and return the plain transformers model.

    With ``copy_all=False`` only the tensors inside adapter layers (the weights a merge
    writes) are copied; every other tensor of the result is the guide's own, to be read
    only (enough to save it, at the memory cost of the adapted layers alone).
    """
    owned = {id(t) for _, layer in _tuner_layers(model)
             for t in itertools.chain(layer.parameters(), layer.buffers())}
    memo = {} if copy_all else {
        id(t): t for t in itertools.chain(model.parameters(), model.buffers())
        if id(t) not in owned}
    clone = copy.deepcopy(model, memo)
    for obj in (clone, clone.base_model):  # a copied guard_shared_base would recurse
        for name in _IN_PLACE_MERGES:
            obj.__dict__.pop(name, None)
    merged = clone.merge_and_unload(**merge_kwargs)
    # the merge wrote only into copies: no tensor of the result is an adapted original
    originals = {p.data_ptr() for _, layer in _tuner_layers(model) for p in layer.parameters()}
    if any(p.data_ptr() in originals for p in merged.parameters()):  # pragma: no cover
        raise RuntimeError("internal error: a merge wrote into weights shared with the prior")
    return merged


def _save_adapter(model, tmp: str, base_model_name_or_path: str | None, save_kwargs) -> None:
    # peft writes the live config (and fills in base_model_name_or_path): set, then restore
    configs = {k: (c, c.base_model_name_or_path) for k, c in model.peft_config.items()}
    try:
        for config, _ in configs.values():
            if base_model_name_or_path is not None:
                config.base_model_name_or_path = base_model_name_or_path
        model.save_pretrained(tmp, **save_kwargs)
    finally:
        for config, value in configs.values():
            config.base_model_name_or_path = value


def _check_target(target: str, overwrite: bool) -> None:
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"directory: {target!r} exists and is not a directory; "
                              "choose another path")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise FileExistsError(f"directory: {target!r} exists and is not empty; pass "
                              "overwrite=True to replace it, or choose a new directory")


def _sibling(target: str, kind: str) -> str:
    """A fresh hidden name next to ``target``, e.g. ``.export.3f9a1c2e.partial``."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.{secrets.token_hex(4)}.{kind}")


def _move_into_place(tmp: str, target: str, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``target``; an existing ``target`` is set aside
    first and removed only once ``tmp`` is in place (restored if the rename fails)."""
    if not os.path.isdir(target):
        os.rename(tmp, target)
        return
    _check_target(target, overwrite)  # it may have been filled while we wrote
    aside = _sibling(target, "old")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
