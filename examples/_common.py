"""Shared bits of the example scripts: the prior they run on and argument parsing."""

from __future__ import annotations

import argparse

import torch

import pyro_lm


def load_prior(device: str = "cpu"):
    """The bundled tiny LM (models/tinylm). It is committed, so this never downloads."""
    return pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(), device=device)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few seconds' run, used by the tests")
    return p
