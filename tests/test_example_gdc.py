"""The GDC biographies example runs in --tiny mode and moves the female share towards 0.5."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "examples" / "gdc_biographies.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny LMs: one intra-op thread avoids OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example():
    spec = importlib.util.spec_from_file_location("gdc_biographies", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run(capsys):
    example = load_example()
    out = example.main(example.parse_args(["--tiny", "--device", "cpu"]))
    assert abs(out["fitted_share"] - example.TARGET) < 1e-4  # solved on the samples
    prior_share, prior_se = out["prior_share"]
    imh_share, imh_se = out["imh_share"]
    assert 0 < out["imh_acceptance"] <= 1
    # IMH samples of p0 exp(lambda phi) are much closer to the target than the prior is:
    # within 4 standard errors of 0.5, plus the fit's own sampling error (ESS >= 1000).
    assert abs(imh_share - example.TARGET) < 4 * imh_se + 4 * 0.5 / 1000**0.5
    assert abs(prior_share - example.TARGET) > 4 * prior_se + 0.1  # the prior is far from it
    assert 0 <= out["dpg_share"][0] <= 1
    printed = capsys.readouterr().out
    assert "female share" in printed and "lambda" in printed
