r"""Data parallelism on :mod:`torch.distributed`: ranks, prompt shards, gathered results, seeds.

A program written for one process runs unchanged under ``torchrun --nproc_per_node=N``
or ``accelerate launch``: :func:`init` joins the process group the launcher describes,
:func:`~pyro_lm.infer.fit` and the samplers (:class:`~pyro_lm.infer.Importance`,
:class:`~pyro_lm.infer.SMC`, :class:`~pyro_lm.infer.QRS`, :class:`~pyro_lm.infer.IMH`)
split their prompts across the ranks with :func:`shard_args`, and the samplers return
the same gathered :class:`~pyro_lm.infer.WeightedPosterior` on every rank.

**The shard rule.** The *first positional argument* of the model is sharded when it is a
batch of prompts (a list of strings or chats, a ``(B, L)`` LongTensor of token ids, or a
``BatchEncoding``) with at least one prompt per rank: rank :math:`r` of :math:`W` gets the
contiguous block :math:`[\lfloor rB/W \rfloor, \lfloor (r+1)B/W \rfloor)`, and every other
argument goes to every rank whole. All ``K`` particles of a prompt are then drawn on its
rank, so whatever is computed across particles of one prompt (the leave-one-out baseline
of :class:`~pyro_lm.infer.SequenceELBO`, the self-normalised weights and running
:math:`\hat Z` of :class:`~pyro_lm.infer.DPG`, SMC's resampling, a QRS bound) stays local
and exact. Because a program's plate *sums* over its prompts,

.. math::

    \nabla_\theta \mathcal L(\text{prompts}) = \sum_{r=0}^{W-1}
        \nabla_\theta \mathcal L(\text{shard}_r),

so the data-parallel gradient is the all-reduced **sum** of the ranks' gradients
(:func:`all_reduce_grads`), equal to the one-process gradient on the same samples.

**Not shardable** (a single prompt, fewer prompts than ranks, a program whose prompt is a
latent or that takes no prompts): :func:`~pyro_lm.infer.fit` runs the whole batch on every
rank with the rank's own random stream and *averages* the gradients (``W`` independent
groups of ``K`` particles: an unbiased estimate from :math:`WK` draws); a sampler runs on
every rank and every rank returns rank 0's posterior (broadcast), which is then exactly a
one-process run (nothing is gained: pass a list of prompts to share the work).

**Seeds.** :func:`set_rng_seed` seeds rank :math:`r` with :func:`rank_seed` ``(seed, r)``,
independent streams derived from one user seed by :class:`numpy.random.SeedSequence`, so
prompts on different ranks never share draws.

**Sharded weights.** A guide LM sharded with FSDP2 (``fully_shard``) keeps a shard of its
weights per rank; decoding needs them whole at every token, so :func:`gathered` gathers them
once and keeps them through every forward (``fit`` does so for each step). Sample from a
sharded LM inside it: ``with gathered(policy.model): SMC(model, guide).run(prompts)``.

References

[1] S. Li et al., *PyTorch Distributed: Experiences on Accelerating Data Parallel Training*,
    VLDB 2020.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Mapping

import numpy as np
import pyro
import torch
import torch.distributed as dist

from pyro_lm.lm.causal_lm import CausalLM

__all__ = ["init", "is_distributed", "rank", "world_size", "is_main_process", "barrier",
           "rank_seed", "set_rng_seed", "is_prompt_batch", "shard_bounds", "shard_prompts",
           "shard_args", "Shard", "local", "all_reduce_grads", "broadcast_tensors",
           "all_gather_objects", "broadcast_object", "gather_posterior", "sharded_run",
           "sharded", "fsdp_roots", "gathered"]

_STATE = {"local": 0}  # > 0 while a shard runs (nested runs then stay on their rank)


# ---------------------------------------------------------------- ranks and the group
def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe (the
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` environment variables), if
    there is one and it is not joined yet; on CUDA, select the device ``LOCAL_RANK``.

    :param str backend: ``"nccl"`` or ``"gloo"`` (default: ``nccl`` when CUDA is available,
        else ``gloo``).
    :returns: ``(rank, world_size)``; ``(0, 1)`` outside a launcher.
    """
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return rank(), world_size()


def is_distributed() -> bool:
    """Whether a process group of more than one rank is joined."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is rank 0 (the one that shows progress and writes files)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------- seeds
def rank_seed(seed: int, index: int) -> int:
    """The seed of rank ``index`` derived from one user ``seed``: the first 32-bit word of
    ``SeedSequence(seed, spawn_key=(index,))`` (what NumPy's legacy seeding takes), so the
    ranks' streams are independent and a run with the same seed and world size is
    reproducible."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    return int(np.random.SeedSequence(seed, spawn_key=(int(index),)).generate_state(1)[0])


def set_rng_seed(seed: int) -> int:
    """Seed Python, NumPy and torch on this rank with :func:`rank_seed` ``(seed, rank())``
    (:func:`pyro.set_rng_seed`); returns the rank's seed."""
    value = rank_seed(seed, rank())
    pyro.set_rng_seed(value)
    return value


# -------------------------------------------------------------------------- shards
def is_prompt_batch(prompts) -> bool:
    """Whether ``prompts`` is a batch of prompts that can be split along its first dim: a
    list or tuple of strings or chats, a ``(B, L)`` tensor of token ids, or a mapping
    (``BatchEncoding``) whose ``input_ids`` has rows."""
    if isinstance(prompts, torch.Tensor):
        return prompts.dim() == 2
    if isinstance(prompts, Mapping):
        ids = prompts.get("input_ids")
        return ids is not None and not CausalLM.is_single_prompt(prompts)
    if isinstance(prompts, (list, tuple)):
        return len(prompts) > 0 and not CausalLM.is_single_prompt(prompts) and all(
            isinstance(p, str) or CausalLM.is_single_prompt(p) for p in prompts)
    return False


def _num_prompts(prompts) -> int:
    if isinstance(prompts, Mapping):
        return len(prompts["input_ids"])
    return len(prompts)


def shard_bounds(num: int, world: int, index: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``index``'s contiguous block of ``num`` items over ``world``
    ranks (sizes differ by at most one)."""
    return num * index // world, num * (index + 1) // world


def shard_prompts(prompts, index: int | None = None, world: int | None = None):
    """Rank ``index``'s block (default: this rank's) of a batch of prompts, of the type of
    ``prompts``.

    :raises ValueError: if ``prompts`` is not a batch (:func:`is_prompt_batch`) or has
        fewer prompts than ranks.
    """
    index = rank() if index is None else index
    world = world_size() if world is None else world
    if not is_prompt_batch(prompts):
        raise ValueError(f"prompts: expected a batch of prompts (a list of strings or chats, a "
                         f"(B, L) LongTensor or a BatchEncoding), got {type(prompts).__name__}")
    num = _num_prompts(prompts)
    if num < world:
        raise ValueError(f"prompts: {num} prompt(s) cannot be split over {world} ranks; pass "
                         f"at least {world} prompts, or run on fewer ranks")
    start, stop = shard_bounds(num, world, index)
    if isinstance(prompts, Mapping):
        parts = {k: (v[start:stop] if hasattr(v, "__getitem__") and len(v) == num else v)
                 for k, v in prompts.items()}
        try:
            return type(prompts)(parts)
        except TypeError:  # a mapping type that cannot be built from a dict
            return parts
    return prompts[start:stop]


class Shard:
    """How a call's arguments were split: ``args`` (this rank's) and ``counts`` (prompts per
    rank; ``None`` when the call is replicated on every rank)."""

    def __init__(self, args: tuple, counts: list[int] | None):
        self.args, self.counts = args, counts

    @property
    def sharded(self) -> bool:
        return self.counts is not None

    @property
    def local_count(self) -> int:
        return self.counts[rank()] if self.counts is not None else 0


def shard_args(args: tuple) -> Shard:
    """This rank's share of a call's positional arguments (see the module docstring): the
    first one split when it is a batch of at least :func:`world_size` prompts, otherwise
    every argument whole on every rank (``counts=None``)."""
    world = world_size()
    if world > 1 and args and is_prompt_batch(args[0]) and _num_prompts(args[0]) >= world:
        num = _num_prompts(args[0])
        counts = [b - a for a, b in (shard_bounds(num, world, r) for r in range(world))]
        return Shard((shard_prompts(args[0]),) + tuple(args[1:]), counts)
    return Shard(tuple(args), None)


@contextlib.contextmanager
def local():
    """Inside, samplers run on this rank's arguments as they are (no further sharding):
    :func:`~pyro_lm.infer.fit`'s steps and a shard's own run are inside it."""
    _STATE["local"] += 1
    try:
        yield
    finally:
        _STATE["local"] -= 1


# ------------------------------------------------------------------ sharded weights
def fsdp_roots(module) -> list:
    """The outermost FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) modules in
    ``module`` (``[module]`` if it is one; ``[]`` if none)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    if isinstance(module, FSDPModule):
        return [module]
    return [root for child in module.children() for root in fsdp_roots(child)]


@contextlib.contextmanager
def gathered(module):
    """Inside, the FSDP2-sharded weights of ``module`` are whole on every rank: gathered
    once on entry and kept through every forward (decoding runs the LM once per token, in
    inference mode), sharded again on exit, when each FSDP module is set back to
    resharding after its forward. A module without FSDP is left alone.

    ``with pyro_lm.distributed.gathered(policy.model): post = SMC(model, guide).run(prompts)``
    """
    from torch.distributed.fsdp import FSDPModule

    roots = fsdp_roots(module)
    members = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
    for m in members:
        m.set_reshard_after_forward(False)
    for root in roots:
        root.unshard()
    try:
        yield module
    finally:
        for root in roots:
            root.reshard()
        for m in members:
            m.set_reshard_after_forward(True)


# --------------------------------------------------------------------- collectives
def all_reduce_grads(params, op: str = "sum") -> None:
    """All-reduce the ``.grad`` of ``params`` in place, in one flat buffer per dtype and
    device (a missing gradient counts as zeros and is then set).

    :param params: the same parameters, in the same order, on every rank.
    :param str op: ``"sum"`` (sharded prompts: the gradient of the whole batch) or
        ``"mean"`` (replicated calls: the average of independent estimates).
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op: expected 'sum' or 'mean', got {op!r}")
    if not is_distributed():
        return
    groups: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    world = world_size()
    for members in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat /= world
        offset = 0
        for p in members:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. parameters at the
    start of training, as :class:`~torch.nn.parallel.DistributedDataParallel` does)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def _object_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (pickled), in rank order."""
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


# ------------------------------------------------------------------- posteriors
def _cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    return tree


def _payload(post) -> dict:
    return _cpu({"samples": post.samples, "log_weights": post.log_weights,
                 "log_normalizer": post.log_normalizer(), "history": post.history,
                 "extras": post.extras})


def _prompt_dim(payloads, counts) -> int:
    """The batch dim of the log-weights that holds the prompts: the leftmost whose size is
    each rank's prompt count, all other dims being equal."""
    shapes = [tuple(p["log_weights"].shape[1:]) for p in payloads]
    for d in range(len(shapes[0])):
        if all(len(s) == len(shapes[0]) and s[d] == c and s[:d] + s[d + 1:] ==
               shapes[0][:d] + shapes[0][d + 1:] for s, c in zip(shapes, counts, strict=True)):
            return d
    raise ValueError(f"prompts: the posteriors' log_weights have batch shapes {shapes} on the "
                     f"ranks, none with a dim of {counts} prompts; under torch.distributed "
                     "the first argument must be the batch of prompts that the model's plate "
                     "runs over (one weight per prompt)")


def _cat_batch(values, dim_from_right: int, counts, name: str):
    """Concatenate per-rank tensors along the prompts dim, counted from the right."""
    dim = values[0].dim() - dim_from_right
    for v, c in zip(values, counts, strict=True):
        if v.dim() != values[0].dim() or v.shape[dim] != c:
            raise ValueError(f"{name}: shape {tuple(v.shape)} has no dim of {c} prompts where "
                             "the weights have theirs; under torch.distributed every latent "
                             "site must lie inside the prompts plate")
    return torch.cat(values, dim)


def _pad_steps(values):
    """Per-rank step histories ``(T_r, ...)`` padded to the longest by repeating the last
    step (``False`` for booleans): a rank whose particles all ended early did no step."""
    longest = max(v.shape[0] for v in values)
    out = []
    for v in values:
        extra = longest - v.shape[0]
        if extra and v.shape[0]:
            fill = torch.zeros_like(v[-1:]) if v.dtype == torch.bool else v[-1:]
            v = torch.cat([v, fill.expand((extra,) + v.shape[1:])])
        out.append(v)
    return out


def gather_posterior(post, counts: list[int]):
    """The :class:`~pyro_lm.infer.WeightedPosterior` of all prompts from every rank's
    posterior of its shard (collective: every rank calls it and gets the same result).

    Samples, log-weights, the per-prompt :math:`\\log \\hat Z`, the history (per-step
    records, padded to the longest rank) and per-prompt extras are concatenated along the
    prompts dim in rank order; scalar extras that differ across ranks become one value per
    prompt. The LMs (``lms``) are this rank's.
    """
    from pyro_lm.infer.posterior import WeightedPosterior

    payloads = all_gather_objects(_payload(post))
    d = _prompt_dim(payloads, counts)
    nb = payloads[0]["log_weights"].dim() - 1
    right = nb - d  # the prompts dim, counted from the right of the batch dims
    device = post.log_weights.device

    def cat(key_values, name, trailing=0):
        return _cat_batch(key_values, right + trailing, counts, name).to(device)

    samples = {}
    for site, first in payloads[0]["samples"].items():
        values = [p["samples"][site] for p in payloads]
        event = first.dim() - 1 - nb
        samples[site] = cat(values, f"samples[{site!r}]", event)
    log_w = cat([p["log_weights"] for p in payloads], "log_weights")
    log_z = cat([p["log_normalizer"] for p in payloads], "log_normalizer")
    history = {}
    for key, first in payloads[0]["history"].items():
        values = [p["history"][key] for p in payloads]
        if isinstance(first, torch.Tensor) and first.dim() >= nb:
            history[key] = cat(_pad_steps(values), f"history[{key!r}]")
        else:
            history[key] = values
    extras = {}
    for key, first in payloads[0]["extras"].items():
        values = [p["extras"][key] for p in payloads]
        local_batch = [tuple(p["log_weights"].shape[1:]) for p in payloads]
        if isinstance(first, torch.Tensor) and first.dim() >= nb and nb > 0 \
                and tuple(first.shape[first.dim() - nb:]) == local_batch[0]:
            extras[key] = cat(values, f"extras[{key!r}]")
        elif all(_same(v, first) for v in values):
            extras[key] = first.to(device) if isinstance(first, torch.Tensor) else first
        elif nb > 0 and all(torch.as_tensor(v).dim() == 0 for v in values):
            extras[key] = cat([torch.full(b, float(v)) for v, b in zip(values, local_batch,
                                                                        strict=True)],
                              f"extras[{key!r}]")
        else:
            extras[key] = values  # one entry per rank
    return WeightedPosterior(samples, log_w, lms=post.lms, log_normalizer=log_z,
                             history=history, extras=extras, algorithm=post.algorithm)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool((a == b).all())
    return a == b


def _broadcast_posterior(post):
    """Rank 0's posterior on every rank (the LMs stay each rank's own)."""
    from pyro_lm.infer.posterior import WeightedPosterior

    p = broadcast_object(_payload(post) if is_main_process() else None)
    device = post.log_weights.device

    def to(tree):
        if isinstance(tree, torch.Tensor):
            return tree.to(device)
        return {k: to(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return WeightedPosterior(to(p["samples"]), to(p["log_weights"]), lms=post.lms,
                             log_normalizer=to(p["log_normalizer"]), history=to(p["history"]),
                             extras=to(p["extras"]), algorithm=post.algorithm)


_WARNED: set = set()


def sharded_run(run, args: tuple, kwargs: dict, owner: str = "run"):
    """``None`` outside a process group (or inside a shard: the caller then runs as usual),
    else the gathered posterior of ``run`` over the shards of ``args`` (:func:`shard_args`),
    the same on every rank.

    A call whose prompts cannot be sharded runs on every rank, and every rank returns rank
    0's posterior (with a warning, once per ``owner``).
    """
    if not is_distributed() or _STATE["local"]:
        return None
    shard = shard_args(args)
    with local():
        post = run(*shard.args, **kwargs)
    if shard.sharded:
        return gather_posterior(post, shard.counts)
    if owner not in _WARNED:
        _WARNED.add(owner)
        warnings.warn(f"{owner}: the first argument is not a batch of at least {world_size()} "
                      "prompts, so it cannot be sharded across ranks; every rank ran the whole "
                      "call and returns rank 0's posterior. Pass a list of prompts to share the "
                      "work", stacklevel=4)
    return _broadcast_posterior(post)


def sharded(run):
    """Decorator of a sampler's ``run(self, *args, **kwargs)``: under :mod:`torch.distributed`
    the prompts are sharded and the posterior gathered (:func:`sharded_run`); otherwise, or
    inside a shard, ``run`` as it is."""

    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        post = sharded_run(functools.partial(run, self), args, kwargs, type(self).__name__)
        return run(self, *args, **kwargs) if post is None else post

    return wrapper
