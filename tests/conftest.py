"""Shared test set-up: fixed seeds, validation on, device parametrisation, small LMs."""

import os

import pyro
import pytest
import torch

from pyro_lm.lm import toy_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one thread beats two (thread start-up dominates, and a shared machine hurts more)
torch.set_num_threads(1)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))]


@pytest.fixture(autouse=True)
def _seed_and_validate():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session", params=DEVICES)
def device(request):
    """Every device this machine has; CUDA cases skip when absent."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_lm():
    """An enumerable prior: vocab 4 (EOS = 0), 1 layer, peaky random weights, CPU."""
    return toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
