"""The Bayesian-reward example runs end to end in --tiny mode."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bayesian_reward.py"


def _load():
    spec = importlib.util.spec_from_file_location("bayesian_reward_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a 60-draw NUTS fit need not converge: its R-hat warning is expected, not an error
@pytest.mark.filterwarnings("ignore:.*R-hat:UserWarning")
def test_example_runs_tiny(device, capsys):
    out = _load().main(["--tiny", "--device", str(device)])
    printed = capsys.readouterr().out
    assert "max R-hat" in printed and "positive share" in printed
    assert math.isfinite(out["rhat_max"]) and out["fit_seconds"] > 0
    # the posterior predictive separates the training labels better than the base rate
    assert out["train_accuracy"] > out["majority"]
    assert 0.0 <= out["share_before"] <= 1.0 and 0.0 <= out["share_after"] <= 1.0
    assert 1.0 <= out["ess"] <= out["num_particles"] + 1e-6
    assert math.isfinite(out["log_Z"])
