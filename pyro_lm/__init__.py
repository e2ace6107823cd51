"""pyro_lm: fine-tuning language models as Bayesian inference in Pyro.

The pretrained LM is a prior :math:`p_0(x)`, a reward enters as the log-factor
:math:`r(x)/\\beta`, and the target is :math:`p^*(x) \\propto p_0(x)\\exp(r(x)/\\beta)`.
"""

import importlib
from pathlib import Path

from pyro_lm import (
    constraints,
    data,
    diagnostics,
    distributed,
    distributions,
    infer,
    lm,
    ops,
    poutine,
    programs,
    rewards,
)
from pyro_lm.distributions import LMDistribution
from pyro_lm.lm import CausalLM

__version__ = "0.1.0"


#: The tiny LMs bundled in the repository's ``models/`` folder (``make models`` rebuilds them):
#: ``"tinylm"`` reads the space-tokenised corpus with a word-level tokenizer, ``"tinylm-bpe"``
#: the corpus as prose (:func:`pyro_lm.data.prose`) with a byte-level BPE.
BUNDLED_MODELS = ("tinylm", "tinylm-bpe")


def bundled_model_path(name: str = "tinylm") -> Path:
    """Path of a tiny LM bundled in the repository's ``models/`` folder.

    >>> lm = CausalLM.from_pretrained(bundled_model_path("tinylm-bpe"))  # doctest: +SKIP

    :param str name: one of :data:`BUNDLED_MODELS` (or the name of a model built into
        ``models/`` with ``python models/build_tinylm.py --out models/<name>``).
    :returns: the model directory, loadable by :meth:`CausalLM.from_pretrained`.
    :raises FileNotFoundError: if ``models/<name>`` holds no model; the message lists the
        bundled names and how to rebuild them.
    """
    path = Path(__file__).resolve().parent.parent / "models" / name
    if not (path / "config.json").exists():
        known = ", ".join(map(repr, BUNDLED_MODELS))
        hint = ("" if name in BUNDLED_MODELS
                else f"{name!r} is not one of the bundled models ({known}); ")
        raise FileNotFoundError(
            f"name: no bundled model {name!r} at {path}; {hint}rebuild the bundled models "
            f"with `make models` (python models/build_tinylm.py --tokenizer word|bpe)")
    return path


def __getattr__(name):
    # the exact oracle is for tests and benchmarks: nothing in the library imports it
    if name == "exact":
        return importlib.import_module("pyro_lm.exact")
    raise AttributeError(f"module 'pyro_lm' has no attribute {name!r}")


__all__ = ["BUNDLED_MODELS", "CausalLM", "LMDistribution", "bundled_model_path", "constraints",
           "data", "diagnostics", "distributed", "distributions", "exact", "infer", "lm", "ops",
           "poutine", "programs", "rewards", "__version__"]
