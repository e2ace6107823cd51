"""Shared bits of the example scripts: the prior they run on and argument parsing."""

from __future__ import annotations

import argparse

import torch

import pyro_lm


def load_prior(device: str = "cpu", name: str = "tinylm"):
    """A bundled tiny LM (``models/<name>``: ``tinylm``, word-level, or ``tinylm-bpe``,
    byte-level BPE). It is committed, so this never downloads."""
    return pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(name), device=device)


def base_parser(description: str, model: str | None = None) -> argparse.ArgumentParser:
    """The examples' common arguments; ``model`` adds ``--model`` (a bundled LM's name)
    with that default."""
    p = argparse.ArgumentParser(description=description)
    if model is not None:
        p.add_argument("--model", default=model, choices=["tinylm", "tinylm-bpe"],
                       help="the bundled prior: word-level tinylm or byte-level BPE tinylm-bpe")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few seconds' run, used by the tests")
    return p
