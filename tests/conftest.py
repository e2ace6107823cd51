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


@pytest.fixture(params=["0.x", "1.x"])
def arviz_backend(request, monkeypatch):
    """Each ArviZ API that ``pyro_lm.diagnostics._arviz`` can call: ``"0.x"`` (arviz 0.23)
    and ``"1.x"`` (arviz-base and arviz-stats, the ``dev`` extra); skips one not installed."""
    from pyro_lm.diagnostics import _arviz

    if request.param not in _arviz.available_backends():
        pytest.skip(f"the ArviZ {request.param} libraries are not installed")
    monkeypatch.setattr(_arviz, "BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory):
    """``real_model_dir(arch)``: a saved tiny random ``arch`` model (one of
    ``realistic.ARCHITECTURES``) with a tokenizer trained in this session, made once."""
    from realistic import tiny_model_dir

    root = tmp_path_factory.mktemp("real_models")
    made = {}

    def make(arch: str) -> str:
        if arch not in made:
            made[arch] = tiny_model_dir(arch, root)
        return made[arch]

    return make
