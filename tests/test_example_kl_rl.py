"""The KL-RL example runs in --tiny mode and shows both of its claims."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "examples" / "kl_rl.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny LMs: one intra-op thread avoids OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example():
    spec = importlib.util.spec_from_file_location("kl_rl", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run(capsys):
    example = load_example()
    out = example.main(example.parse_args(["--tiny", "--device", "cpu"]))
    eq = out["equivalence"]
    assert abs(eq["loss"] - eq["exact_loss"]) < 4 * eq["loss_se"]
    for g, se, exact in zip(eq["grad"], eq["grad_se"], eq["exact_grad"], strict=True):
        assert abs(g - exact) < 4 * se
    col = out["collapse"]
    assert col["reward_only"]["end"]["entropy"] < 0.1 * col["reward_only"]["start"]["entropy"]
    assert col["elbo"]["end"]["kl"] < 0.1 * col["elbo"]["start"]["kl"]
    assert col["reward_only"]["end"]["kl"] > col["elbo"]["end"]["kl"]
    printed = capsys.readouterr().out
    assert "equivalence" in printed and "collapse" in printed
