"""The SMC infilling example runs in --tiny mode, on the bundled LM and on the toy fallback."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import pyro_lm

PATH = Path(__file__).resolve().parent.parent / "examples" / "infilling_smc.py"


def load_example():
    spec = importlib.util.spec_from_file_location("infilling_smc", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(post, words):
    texts = post.text()
    alive = torch.isfinite(post.log_weights)
    assert alive.any(0).all()
    for i, row in enumerate(texts):
        for b, text in enumerate(row):
            if alive[i, b]:
                assert any(w in text.split() for w in words), text
    assert torch.isfinite(post.log_normalizer()).all()
    assert (post.log_normalizer() <= 1e-4).all()  # log P(constraints) under the prior


def test_tiny_run_bundled(capsys):
    try:
        pyro_lm.bundled_model_path()
    except FileNotFoundError:
        pytest.skip("bundled model not built")
    example = load_example()
    post = example.main(example.parse_args(["--tiny", "--device", "cpu"]))
    from pyro_lm.data.grammar import POSITIVE_WORDS

    check(post, POSITIVE_WORDS)
    out = capsys.readouterr().out
    assert "final ESS" in out and "log Z" in out


def test_tiny_run_toy_fallback(monkeypatch, capsys):
    def missing(name="tinylm"):
        raise FileNotFoundError(name)

    monkeypatch.setattr(pyro_lm, "bundled_model_path", missing)
    example = load_example()
    post = example.main(example.parse_args(["--tiny", "--device", "cpu"]))
    check(post, ["t5", "t6"])
    assert not math.isnan(float(post.ess()[0]))
    assert "final ESS" in capsys.readouterr().out
