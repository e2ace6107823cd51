"""pyro_lm: fine-tuning language models as Bayesian inference in Pyro.

The pretrained LM is a prior :math:`p_0(x)`, a reward enters as the log-factor
:math:`r(x)/\\beta`, and the target is :math:`p^*(x) \\propto p_0(x)\\exp(r(x)/\\beta)`.
"""

from pathlib import Path

from pyro_lm import data, diagnostics, distributions, exact, infer, lm, programs, rewards
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


__all__ = ["CausalLM", "LMDistribution", "bundled_model_path", "data", "diagnostics",
           "distributions", "exact", "infer", "lm", "programs", "rewards", "__version__"]
