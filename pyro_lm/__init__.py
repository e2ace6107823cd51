"""pyro_lm: fine-tuning language models as Bayesian inference in Pyro.

The pretrained LM is a prior :math:`p_0(x)`, a reward enters as the log-factor
:math:`r(x)/\\beta`, and the target is :math:`p^*(x) \\propto p_0(x)\\exp(r(x)/\\beta)`.
"""

import importlib
from pathlib import Path

from pyro_lm import data, diagnostics, distributions, infer, lm, ops, poutine, programs, rewards
from pyro_lm.distributions import LMDistribution
from pyro_lm.lm import CausalLM

__version__ = "0.1.0"


def bundled_model_path(name: str = "tinylm") -> Path:
    """Path of a tiny LM bundled in the repository's ``models/`` folder."""
    path = Path(__file__).resolve().parent.parent / "models" / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"name: no bundled model {name!r} at {path}; rebuild it with "
                                "`make models` (python models/build_tinylm.py)")
    return path


def __getattr__(name):
    # the exact oracle is for tests and benchmarks: nothing in the library imports it
    if name == "exact":
        return importlib.import_module("pyro_lm.exact")
    raise AttributeError(f"module 'pyro_lm' has no attribute {name!r}")


__all__ = ["CausalLM", "LMDistribution", "bundled_model_path", "data", "diagnostics",
           "distributions", "exact", "infer", "lm", "ops", "poutine", "programs", "rewards",
           "__version__"]
