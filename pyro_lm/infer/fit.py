"""A training loop for :class:`pyro.infer.SVI`: progress bar, metric history and
atomic checkpoints that resume exactly.

The history is a list with one dict per step, the contract consumed by
:func:`pyro_lm.diagnostics.to_inference_data`::

    {"step": int,       # 0, 1, 2, ... (continues across resumes)
     "loss": float,     # what svi.step returned
     "time": float,     # wall-clock seconds of training so far, at the end of this step
     **metrics}         # the ELBO object's .metrics, e.g. SequenceELBO's elbo, log_factor,
                        # reward, kl, ess

A checkpoint is one file written atomically (temporary file in the same folder,
``fsync``, :func:`os.replace`), so a crash never leaves a half-written one. It
holds the param store, the optimiser state, the Python / NumPy / torch RNG
states, the step and the history; resuming from it continues the run bit for
bit (on the same device and software).
"""

from __future__ import annotations

import os
import random
import tempfile
import time

import numpy as np
import pyro
import pyro.poutine as poutine
import torch

from pyro_lm.poutine import SkipLMMessenger

__all__ = ["fit", "save_checkpoint", "load_checkpoint"]

_FORMAT = "pyro_lm.fit/1"
_KEYS = ("format", "step", "history", "params", "optim", "rng")


def fit(svi, *args, num_steps: int, checkpoint=None, every: int | None = None,
        progress: bool = True, **kwargs) -> list[dict]:
    """Run ``svi.step(*args, **kwargs)`` until ``num_steps`` steps are done.

    :param svi: a :class:`pyro.infer.SVI` (any loss; with
        :class:`~pyro_lm.infer.SequenceELBO` its :attr:`metrics` are recorded).
    :param int num_steps: the total number of steps of the run. A run resumed from a
        checkpoint at step ``s`` does the remaining ``num_steps - s``.
    :param checkpoint: a file path, or ``None``. If the file exists, training resumes
        from it; it is (re)written every ``every`` steps and at the end.
    :param int every: checkpoint period in steps (default: only at the end).
    :param bool progress: show a tqdm progress bar with the live loss, reward and KL.
    :returns: the history, one dict per step (see the module docstring).
    :raises ValueError: for a negative ``num_steps`` or ``every < 1``, or a checkpoint
        that cannot be read or does not fit the guide.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps: expected an int >= 0, got {num_steps!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or every < 1):
        raise ValueError(f"every: expected a positive int (steps between checkpoints) or "
                         f"None, got {every!r}")
    if not hasattr(svi, "step") or not hasattr(svi, "optim"):
        raise TypeError(f"svi: expected a pyro.infer.SVI, got {type(svi).__name__}")
    # SVI keeps the bound methods of its loss object: svi.loss is elbo.loss
    elbo = getattr(svi.loss, "__self__", svi.loss)
    start, history = 0, []
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if os.path.exists(checkpoint):
            _register_params(svi, args, kwargs)
            state = load_checkpoint(checkpoint)
            _restore(svi, state, checkpoint)
            start, history = state["step"], list(state["history"])
    elapsed = history[-1]["time"] if history else 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_steps, initial=min(start, num_steps), desc="fit", unit="step",
                   dynamic_ncols=True)
    try:
        for step in range(start, num_steps):
            tic = time.perf_counter()
            loss = svi.step(*args, **kwargs)
            elapsed += time.perf_counter() - tic
            record = {"step": step, "loss": float(loss), "time": elapsed}
            record.update(getattr(elbo, "metrics", None) or {})
            history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(record), refresh=False)
            if checkpoint is not None and every is not None and (step + 1) % every == 0 \
                    and step + 1 < num_steps:
                save_checkpoint(checkpoint, svi, step + 1, history)
        if checkpoint is not None and (start < num_steps or not os.path.exists(checkpoint)):
            save_checkpoint(checkpoint, svi, max(start, num_steps), history)
    finally:
        if bar is not None:
            bar.close()
    return history


def _postfix(record: dict) -> dict:
    keys = [k for k in ("loss", "reward", "kl", "ess") if k in record]
    return {k: f"{record[k]:.4g}" for k in keys}


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path, svi, step: int, history: list[dict]) -> None:
    """Write ``svi``'s full training state to ``path`` atomically."""
    path = os.fspath(path)
    state = {
        "format": _FORMAT,
        "step": int(step),
        "history": history,
        "params": pyro.get_param_store().get_state(),
        "optim": svi.optim.get_state(),
        "rng": _rng_state(),
    }
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


def _register_params(svi, args, kwargs) -> None:
    """Run the guide once without decoding, so that its parameters (e.g. an LM
    registered with ``pyro.module``) exist in the param store before loading."""
    with poutine.block(), torch.no_grad():
        SkipLMMessenger()(svi.guide)(*args, **kwargs)


def _restore(svi, state: dict, path: str) -> None:
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    saved = state["params"]
    for name, value in saved["params"].items():
        if name in current:
            target = current[name]
            if target.shape != value.shape:
                raise ValueError(f"checkpoint: {path!r} holds parameter {name!r} of shape "
                                 f"{tuple(value.shape)}, the guide has {tuple(target.shape)}; "
                                 "it was written for another guide")
            with torch.no_grad():  # in place: modules keep their own Parameter objects
                target.copy_(value.to(target.device))
    missing = {k: v for k, v in saved["params"].items() if k not in current}
    if missing:
        devices = {t.device for t in current.values()}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        store.set_state({"params": {k: v.to(device) for k, v in missing.items()},
                         "constraints": {k: saved["constraints"][k] for k in missing}})
    svi.optim.set_state(state["optim"])
    _set_rng_state(state["rng"])


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
