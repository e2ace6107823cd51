r"""A training loop for :class:`pyro.infer.SVI` (or a loss module and a torch optimiser):
progress bar, metric history and atomic checkpoints that resume exactly, in one process or
data-parallel under ``torchrun`` / ``accelerate launch``.

The history is a list with one dict per step, the contract consumed by
:func:`pyro_lm.diagnostics.to_inference_data`::

    {"step": int,       # 0, 1, 2, ... (continues across resumes)
     "loss": float,     # what svi.step returned (all ranks: reduced, see below)
     "time": float,     # wall-clock seconds of training so far, at the end of this step
     **metrics}         # the ELBO object's .metrics, e.g. SequenceELBO's elbo, log_factor,
                        # reward, kl, ess

A checkpoint is one file written atomically (temporary file in the same folder,
``fsync``, :func:`os.replace`), so a crash never leaves a half-written one. It
holds the param store (or the loss module's ``state_dict``), the optimiser state, the
Python / NumPy / torch RNG states of every rank, the loss object's ``state_dict()`` of
every rank if it has one, the step and the history; resuming from
it continues the run bit for bit (on the same device, software and number of ranks).
It also records the loss's class and scalar settings (e.g. ``num_particles``) and a
digest of the arguments the steps are called with (the prompts): a resume with another
loss, other settings or other prompts is refused, since it would not continue that run.

**Data parallel.** When :mod:`torch.distributed` is initialised
(:func:`pyro_lm.distributed.init`), the first argument, a batch of prompts, is split
across the ranks (:func:`pyro_lm.distributed.shard_args`: each prompt and all its
particles on one rank). The plate sums the loss over prompts, so the gradient of the
whole batch is the *sum* of the ranks' gradients,

.. math:: \nabla \mathcal L = \textstyle\sum_r \nabla \mathcal L_r ,

which ``fit`` all-reduces (:func:`pyro_lm.distributed.all_reduce_grads`, one flat buffer
per dtype) between the backward pass and the optimiser step, so every rank takes the same
step as one process on the same samples. This is exact for Pyro's param-store parameters
(which :class:`~torch.nn.parallel.DistributedDataParallel` cannot see) and needs no
wrapper; a loss module already wrapped in DDP (e.g. by ``accelerate``'s ``prepare``) is
used as it is, with the loss scaled by the number of ranks so that DDP's *mean* is the
sum. Parameters are broadcast from rank 0 at the start. Metrics are all-reduced: sums
over prompts add up, per-prompt means (``ess``; DPG's ``reward``) are averaged weighted by
the ranks' prompt counts. A call whose first argument cannot be sharded runs whole on
every rank with the rank's own random stream, and gradients and metrics are averaged.

**Sharded weights (FSDP2).** A loss module whose guide LM was sharded with
:func:`torch.distributed.fsdp.fully_shard` (each transformer block, then the model) keeps
only its shard of the weights, gradients and optimiser state on each rank. Decoding needs
the whole weights at every token, so ``fit`` gathers them once per step (``unshard`` before
the loss, ``reshard`` after the backward pass: :func:`pyro_lm.distributed.gathered`),
rather than once per token; generation and the log-probabilities then run on whole
weights, and the backward pass reduce-scatters the gradients (FSDP averages, so the loss is
scaled by the number of ranks as for DDP). Checkpoints hold whole tensors
(:func:`torch.distributed.checkpoint.state_dict.get_model_state_dict` with
``full_state_dict=True``), which do not depend on how many ranks wrote them. This needs the loss
module path (Pyro's param store cannot hold sharded parameters). Gloo cannot scale inside
the reduce-scatter (no ``PREMUL_SUM``), hence the scaled loss rather than
``set_gradient_divide_factor``.

Only rank 0 shows the progress bar and writes the checkpoint (the other ranks send it
their RNG states); every rank reads the checkpoint through rank 0, so it resumes on any
number of ranks: bit for bit on the number that wrote it, and on another number with the
same parameters, optimiser state, step and history and a fresh random stream derived from
the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
import zlib

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import zero_grads
from torch.nn.parallel import DistributedDataParallel

from pyro_lm import distributed
from pyro_lm.poutine import SkipLMMessenger

__all__ = ["fit", "save_checkpoint", "load_checkpoint"]

_FORMAT = "pyro_lm.fit/1"
_KEYS = ("format", "step", "history", "params", "optim", "rng")


def fit(svi, *args, num_steps: int, checkpoint=None, every: int | None = None,
        progress: bool = True, optimizer=None, seed: int | None = None,
        **kwargs) -> list[dict]:
    """Run ``svi.step(*args, **kwargs)`` until ``num_steps`` steps are done.

    :param svi: a :class:`pyro.infer.SVI` (any loss; with
        :class:`~pyro_lm.infer.SequenceELBO` its :attr:`metrics` are recorded), or a loss
        module whose ``forward(*args, **kwargs)`` returns a differentiable loss (Pyro's
        ``ELBOModule``: ``elbo(model, guide)`` with
        ``pyro.settings.set(module_local_params=True)``; optionally wrapped in
        :class:`~torch.nn.parallel.DistributedDataParallel`), with ``optimizer``.
    :param int num_steps: the total number of steps of the run. A run resumed from a
        checkpoint at step ``s`` does the remaining ``num_steps - s``.
    :param checkpoint: a file path, or ``None``. If the file exists, training resumes
        from it; it is (re)written every ``every`` steps and at the end.
    :param int every: checkpoint period in steps (default: only at the end).
    :param bool progress: show a tqdm progress bar with the live loss, reward and KL
        (on rank 0 only).
    :param optimizer: a :class:`torch.optim.Optimizer` over the loss module's
        parameters; only with a loss module (an SVI has its own).
    :param int seed: if given, seed this rank with
        :func:`pyro_lm.distributed.set_rng_seed` first (independent streams per rank
        from one seed); ``None`` leaves the RNGs as they are.
    :returns: the history, one dict per step (see the module docstring).
    :raises ValueError: for a negative ``num_steps`` or ``every < 1``, a checkpoint whose
        folder does not exist, or a checkpoint that cannot be read, does not fit the guide
        (another shape, or none of its parameters) or was written with another optimiser or
        other optimiser settings; and when there is nothing to train (a first step that
        reached no trainable parameter, e.g. a guide over a frozen LM, or an ``optimizer``
        none of whose parameters requires a gradient).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps: expected an int >= 0, got {num_steps!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or every < 1):
        raise ValueError(f"every: expected a positive int (steps between checkpoints) or "
                         f"None, got {every!r}")
    trainer = _trainer(svi, optimizer)
    if seed is not None:
        distributed.set_rng_seed(seed)
    inputs = (args, kwargs)  # whole, before this rank takes its shard
    shard = distributed.shard_args(args)
    args, world = shard.args, distributed.world_size()
    start, history = 0, []
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint: expected a file path or None, got "
                            f"{type(checkpoint).__name__}")
        checkpoint = os.fspath(checkpoint)
        folder = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(folder):  # found now, not when the first checkpoint is written
            raise ValueError(f"checkpoint: the folder {folder!r} of {checkpoint!r} does not "
                             "exist; create it first (os.makedirs) or pass another path")
        exists = os.path.exists(checkpoint)
        if world > 1:
            exists = distributed.broadcast_object(exists)
        if exists:
            trainer.register(args, kwargs)
            state = load_checkpoint(checkpoint) if distributed.is_main_process() else None
            if world > 1:
                state = distributed.broadcast_object(state)
            _check_config(state, trainer.elbo, inputs, checkpoint)
            trainer.restore(state, checkpoint)
            _restore_rng(state)
            _restore_loss(trainer.elbo, state)
            start, history = state["step"], list(state["history"])
    if world > 1:
        if start == 0:
            trainer.register(args, kwargs)
        distributed.broadcast_tensors(trainer.parameters())
    elapsed = history[-1]["time"] if history else 0.0
    bar = None
    if progress and distributed.is_main_process():
        from tqdm.auto import tqdm
        bar = tqdm(total=num_steps, initial=min(start, num_steps), desc="fit", unit="step",
                   dynamic_ncols=True)
    try:
        for step in range(start, num_steps):
            tic = time.perf_counter()
            with distributed.local():
                loss = trainer.step(args, kwargs, shard)
            elapsed += time.perf_counter() - tic
            record = {"step": step, "loss": float(loss), "time": elapsed}
            record.update(getattr(trainer.elbo, "metrics", None) or {})
            if world > 1:
                record = _reduce_metrics(record, shard, trainer.elbo)
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(record), refresh=False)
            if checkpoint is not None and every is not None and (step + 1) % every == 0 \
                    and step + 1 < num_steps:
                save_checkpoint(checkpoint, svi, step + 1, history, optimizer, inputs)
        if checkpoint is not None and (start < num_steps or not _exists(checkpoint)):
            save_checkpoint(checkpoint, svi, max(start, num_steps), history, optimizer,
                            inputs)
    finally:
        if bar is not None:
            bar.close()
    return history


def _exists(path: str) -> bool:
    exists = os.path.exists(path)
    return distributed.broadcast_object(exists) if distributed.is_distributed() else exists


# ------------------------------------------------------------------ what is trained
class _SVITrainer:
    """Steps a :class:`pyro.infer.SVI`; its parameters are the param store's."""

    def __init__(self, svi):
        self.svi = svi
        # SVI keeps the bound methods of its loss object: svi.loss is elbo.loss
        self.elbo = getattr(svi.loss, "__self__", svi.loss)
        self.registered = []  # the guide's param names, once registered
        self._checked = False  # whether a step has been seen to train something

    def register(self, args, kwargs) -> None:
        """Run the guide once without decoding, so that its parameters (e.g. an LM
        registered with ``pyro.module``) exist in the param store before loading; their
        names are :attr:`registered`."""
        # the trace sees the param sites first; block keeps everything from outer handlers
        with poutine.block(), poutine.trace(param_only=True) as capture, torch.no_grad():
            SkipLMMessenger()(self.svi.guide)(*args, **kwargs)
        self.registered = [name for name, site in capture.trace.nodes.items()
                           if site["type"] == "param"]

    def parameters(self) -> list:
        return [p for _, p in sorted(pyro.get_param_store().named_parameters())]

    def step(self, args, kwargs, shard):
        if not distributed.is_distributed():
            if self._checked:
                return self.svi.step(*args, **kwargs)
            with poutine.trace(param_only=True) as capture:
                loss = self.svi.step(*args, **kwargs)
            self._check_trains(capture.trace)
            return loss
        svi = self.svi  # SVI.step with the gradients all-reduced before the optimiser step
        with poutine.trace(param_only=True) as capture:
            loss = svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs)
        if not self._checked:
            self._check_trains(capture.trace)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        names = {id(p): n for n, p in pyro.get_param_store().named_parameters()}
        ordered = sorted(params, key=lambda p: names.get(id(p), ""))
        distributed.all_reduce_grads(ordered, "sum" if shard.sharded else "mean")
        svi.optim(params)
        zero_grads(params)
        return loss

    def _check_trains(self, trace) -> None:
        """Refuse a step that reached no trainable parameter: every later one would train
        nothing as well."""
        if not any(site["value"].unconstrained().requires_grad
                   for site in trace.nodes.values()):
            raise ValueError(
                "svi: the step reached no trainable parameter, so fit would train nothing; "
                "an AutoLMGuide over a frozen LM (e.g. the prior itself) has none. Build the "
                "guide on a trainable copy, AutoLMGuide(model, prior_lm.trainable_copy()) "
                "(or .trainable_copy(lora=...))")
        self._checked = True

    def state(self) -> tuple:
        return pyro.get_param_store().get_state(), self.svi.optim.get_state()

    def restore(self, state: dict, path: str) -> None:
        store = pyro.get_param_store()
        current = dict(store.named_parameters())
        saved = state["params"]
        absent = sorted(set(self.registered) - set(saved["params"]))
        if absent:
            raise ValueError(f"checkpoint: {path!r} holds no parameter {absent[0]!r} of the "
                             f"guide (it holds {sorted(saved['params'])[:3]}...); it was written "
                             "for another guide. Pass another path, or build the guide as then "
                             "(the same name=)")
        for name, value in saved["params"].items():
            if name in current:
                target = current[name]
                if target.shape != value.shape:
                    raise ValueError(f"checkpoint: {path!r} holds parameter {name!r} of shape "
                                     f"{tuple(value.shape)}, the guide has "
                                     f"{tuple(target.shape)}; it was written for another guide")
                with torch.no_grad():  # in place: modules keep their own Parameter objects
                    target.copy_(value.to(target.device))
        missing = {k: v for k, v in saved["params"].items() if k not in current}
        if missing:
            devices = {t.device for t in current.values()}
            device = devices.pop() if len(devices) == 1 else torch.device("cpu")
            store.set_state({"params": {k: v.to(device) for k, v in missing.items()},
                             "constraints": {k: saved["constraints"][k] for k in missing}})
        _check_optimizer(self.svi.optim, state["optim"], path)
        self.svi.optim.set_state(state["optim"])


def _check_optimizer(optim, saved: dict, path: str) -> None:
    """Refuse to resume a Pyro optimiser's saved state with another optimiser class or other
    hyperparameters: the saved state would override them silently (or fail deep in torch)."""
    constructor = getattr(optim, "pt_optim_constructor", None)
    args = getattr(optim, "pt_optim_args", None)
    if constructor is None or not isinstance(args, dict) or not saved:
        return  # a scheduler, per-parameter settings (a callable), or nothing stepped yet
    state = next(iter(saved.values()))
    try:
        probe = constructor([torch.zeros(1, requires_grad=True)], **args).param_groups[0]
    except Exception:  # noqa: BLE001 - an optimiser this probe cannot build: not checked
        return
    then = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    now = {k: v for k, v in probe.items() if k != "params"}
    if set(then) != set(now):
        raise ValueError(f"checkpoint: {path!r} was written with another optimiser than "
                         f"{constructor.__name__} (its settings: {sorted(then)}); resume with "
                         "that optimiser, or pass another path to start afresh")
    def same(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        return a == b

    changed = [f"{k}={then[k]!r} -> {now[k]!r}" for k in sorted(now) if not same(then[k], now[k])]
    if changed:
        raise ValueError(f"checkpoint: {path!r} was written with other optimiser settings "
                         f"({', '.join(changed)}), which its saved state would override; "
                         "resume with the same settings, or pass another path to start afresh")


class _ModuleTrainer:
    """Steps a loss module (``forward`` returns a differentiable loss) with a torch
    optimiser; a module wrapped in DDP reduces its own gradients, and so do FSDP2
    (``fully_shard``) submodules, which are gathered once per step (see :func:`fit`)."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer
        self.ddp = isinstance(module, DistributedDataParallel)
        self.inner = module.module if self.ddp else module
        self.elbo = getattr(self.inner, "elbo", None)
        self.fsdp = distributed.fsdp_roots(self.inner)
        managed = {id(p) for root in self.fsdp for p in root.parameters()}
        self.local = [p for p in self.inner.parameters() if id(p) not in managed]

    def register(self, args, kwargs) -> None:
        pass  # a module's parameters exist already

    def parameters(self) -> list:
        return self.local + list(self.inner.buffers())

    def step(self, args, kwargs, shard):
        self.optimizer.zero_grad()
        with distributed.gathered(self.inner):  # once: generation runs on whole weights
            loss = self.module(*args, **kwargs)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"svi: the loss module returned {type(loss).__name__}, "
                                "expected a differentiable tensor (a loss with "
                                "differentiable_loss)")
            averaging = self.ddp or bool(self.fsdp)  # DDP and FSDP reduce by the mean
            if averaging and shard.sharded:
                (loss * distributed.world_size()).backward()  # their mean is then the sum
            else:
                loss.backward()
        if not self.ddp:
            params = [p for p in self.local if p.requires_grad]
            distributed.all_reduce_grads(params, "sum" if shard.sharded else "mean")
        self.optimizer.step()
        return loss.detach()

    def state(self) -> tuple:
        if self.fsdp:  # collective: every rank sends its shards, rank 0 gets whole tensors
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.inner, options=options),
                    get_optimizer_state_dict(self.inner, self.optimizer, options=options))
        return self.inner.state_dict(), self.optimizer.state_dict()

    def restore(self, state: dict, path: str) -> None:
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                options = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.inner, state["params"], options=options)
                if state["optim"].get("state"):
                    set_optimizer_state_dict(self.inner, self.optimizer, state["optim"],
                                             options=options)
                else:  # a stateless optimiser (plain SGD): only its hyperparameters
                    for group, saved in zip(self.optimizer.param_groups,
                                            state["optim"]["param_groups"], strict=True):
                        group.update({k: v for k, v in saved.items() if k != "params"})
                return
            self.inner.load_state_dict(state["params"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint: {path!r} does not fit this loss module ({e}); it "
                             "was written for another guide") from e
        self.optimizer.load_state_dict(state["optim"])


def _trainer(svi, optimizer):
    if hasattr(svi, "step") and hasattr(svi, "optim"):
        if optimizer is not None:
            raise ValueError("optimizer: an SVI steps with its own optim; pass optimizer= "
                             "only with a loss module")
        guide = getattr(svi, "guide", None)
        if isinstance(guide, torch.nn.Module) and distributed.fsdp_roots(guide):
            raise ValueError("svi: the guide's LM is sharded with FSDP (fully_shard), whose "
                             "parameters Pyro's param store and optimisers cannot step; pass "
                             "the loss module instead, fit(elbo(model, guide), prompts, "
                             "optimizer=torch.optim.Adam(policy.parameters()), ...)")
        return _SVITrainer(svi)
    if isinstance(svi, torch.nn.Module):
        if optimizer is None or not hasattr(optimizer, "step") \
                or not hasattr(optimizer, "zero_grad"):
            raise TypeError(f"optimizer: a loss module ({type(svi).__name__}) needs a torch "
                            f"optimiser over its parameters, got {type(optimizer).__name__}")
        if not any(p.requires_grad for group in optimizer.param_groups
                   for p in group["params"]):
            raise ValueError("optimizer: none of its parameters requires a gradient, so fit "
                             "would train nothing; pass the trainable guide's parameters "
                             "(e.g. of prior_lm.trainable_copy())")
        return _ModuleTrainer(svi, optimizer)
    raise TypeError(f"svi: expected a pyro.infer.SVI or a loss module (e.g. "
                    f"SequenceELBO(...)(model, guide)), got {type(svi).__name__}")


def _mean_metrics(elbo) -> set:
    """The metrics that are means over prompts (the others are sums over prompts)."""
    declared = getattr(elbo, "mean_metrics", None)
    if declared is not None:
        return set(declared)
    from pyro_lm.infer.dpg import DPG

    return {"ess", "reward"} if isinstance(elbo, DPG) else {"ess"}


def _reduce_metrics(record: dict, shard, elbo) -> dict:
    """The record's numbers all-reduced over ranks: sums over prompts added, means over
    prompts weighted by prompt counts; the mean over ranks for a replicated call."""
    keys = [k for k, v in record.items() if k not in ("step", "time")
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    means = _mean_metrics(elbo)
    weight = [float(shard.local_count) if shard.sharded and k in means else 1.0 for k in keys]
    values = torch.tensor([record[k] * w for k, w in zip(keys, weight, strict=True)],
                          dtype=torch.float64)
    values = values.to(_collective_device())
    torch.distributed.all_reduce(values)
    total = sum(shard.counts) if shard.sharded else None
    out = dict(record)
    for k, v in zip(keys, values.tolist(), strict=True):
        if not shard.sharded:
            out[k] = v / distributed.world_size()
        else:
            out[k] = v / total if k in means else v
    return out


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _postfix(record: dict) -> dict:
    keys = [k for k in ("loss", "reward", "kl", "ess") if k in record]
    return {k: f"{record[k]:.4g}" for k in keys}


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path, svi, step: int, history: list[dict], optimizer=None,
                    inputs=None) -> None:
    """Write the full training state of ``svi`` (an SVI, or a loss module with its
    ``optimizer``) to ``path`` atomically.

    :param inputs: ``(args, kwargs)`` the steps are called with, recorded as a digest
        (:func:`fit` refuses to resume with others), or ``None`` (not recorded).

    Under :mod:`torch.distributed` every rank calls it (it gathers the ranks' RNG states)
    and rank 0 writes the file; the others wait until it is in place.
    """
    path = os.fspath(path)
    trainer = _trainer(svi, optimizer)
    params, optim = trainer.state()
    local = {"rng": _rng_state(), "loss": _loss_state(trainer.elbo)}
    ranks = [local]
    if distributed.is_distributed():
        ranks = distributed.all_gather_objects(local)
    if distributed.is_main_process():
        _write(path, {"format": _FORMAT, "step": int(step), "history": history,
                      "params": params, "optim": optim, "rng": [r["rng"] for r in ranks],
                      "loss": [r["loss"] for r in ranks],
                      "config": {"loss": loss_settings(trainer.elbo),
                                 "inputs": None if inputs is None else digest(*inputs)}})
    distributed.barrier()


def loss_settings(elbo) -> dict:
    """The loss's class and its public scalar settings (``num_particles``, ``divergence``,
    ...): what a resumed run must share. Left out: ``max_plate_nesting`` (losses infer it
    at their first step) and what the loss's ``state_dict()`` holds (it is restored)."""
    settings = {"class": f"{type(elbo).__module__}.{type(elbo).__qualname__}"}
    state = _loss_state(elbo)
    kept = set(state) if isinstance(state, dict) else set()
    for key, value in sorted(vars(elbo).items()):
        if key.startswith("_") or key in kept or key in ("max_plate_nesting", "training"):
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            settings[key] = value
    return settings


def digest(args, kwargs) -> dict:
    """A digest of a step's arguments: tensors by shape, dtype and a SHA-1 of their bytes,
    strings and numbers as they are, containers element by element, any other object by
    its type only."""
    def one(value):
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
            return ("tensor", tuple(value.shape), str(value.dtype),
                    hashlib.sha1(raw).hexdigest())
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [one(v) for v in value]
        if isinstance(value, dict):
            return {str(k): one(v) for k, v in value.items()}
        return ("object", type(value).__qualname__)

    return {"args": one(list(args)), "kwargs": one(dict(kwargs))}


def _check_config(state: dict, elbo, inputs, path: str) -> None:
    """Refuse to resume a checkpoint written by another loss, with other loss settings or
    for other arguments (checkpoints of an earlier format record none: not checked)."""
    saved = state.get("config")
    if saved is None:
        return
    now = loss_settings(elbo)
    then = saved["loss"]
    if then["class"] != now["class"]:
        raise ValueError(f"checkpoint: {path!r} was written by loss {then['class']}, this run "
                         f"has {now['class']}; resume with the same loss or pass another path")
    changed = [f"{k}={then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(then) | set(now))
               if repr(then.get(k)) != repr(now.get(k))]
    if changed:
        raise ValueError(f"checkpoint: {path!r} was written with other loss settings "
                         f"({', '.join(changed)}); resume with the settings of that run or "
                         "pass another path")
    if saved["inputs"] is not None and saved["inputs"] != digest(*inputs):
        raise ValueError(f"checkpoint: {path!r} was written for other arguments (prompts) "
                         "than this run's; resume with the same arguments or pass another "
                         "path")


def _loss_state(elbo):
    """The loss object's own state (e.g. a running estimate of :math:`Z`), if it has a
    ``state_dict`` method; ``None`` otherwise."""
    state_dict = getattr(elbo, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def _restore_loss(elbo, state: dict) -> None:
    """This rank's saved loss state, when the loss keeps one and the checkpoint was written by
    as many ranks (each rank's state belongs to its prompts); otherwise the loss starts
    afresh."""
    saved = state.get("loss")
    load = getattr(elbo, "load_state_dict", None)
    if saved and callable(load) and len(saved) == distributed.world_size():
        mine = saved[distributed.rank()]
        if mine is not None:
            load(mine)


def _write(path: str, state: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    It is unpickled (it holds Pyro constraints and RNG states): load only files you trust.

    :raises ValueError: if the file is unreadable, corrupt, or not a ``fit`` checkpoint.
    """
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the same thing
        raise ValueError(f"checkpoint: cannot read {path!r} ({type(e).__name__}: {e}); it is "
                         "corrupt or not a pyro_lm.infer.fit checkpoint. Delete it to start "
                         "afresh, or pass another path") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT \
            or any(k not in state for k in _KEYS):
        raise ValueError(f"checkpoint: {path!r} is not a pyro_lm.infer.fit checkpoint "
                         f"(expected format {_FORMAT!r}); delete it or pass another path")
    return state


def _restore_rng(state: dict) -> None:
    """This rank's saved RNG state when the checkpoint was written by as many ranks, else a
    fresh stream per rank seeded from the checkpoint (its step and rank 0's torch state)."""
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    world, rank = distributed.world_size(), distributed.rank()
    if len(rngs) == world:
        _set_rng_state(rngs[rank])
        return
    digest = zlib.crc32(rngs[0]["torch"].numpy().tobytes())
    base = int(np.random.SeedSequence([digest, int(state["step"])]).generate_state(1)[0])
    pyro.set_rng_seed(distributed.rank_seed(base, rank))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
