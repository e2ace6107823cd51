"""Pure tensor estimators and plate arithmetic, below both :mod:`pyro_lm.infer` and
:mod:`pyro_lm.diagnostics` (no Pyro state, no model)."""

from pyro_lm.ops.plates import aligned, check_plated, sum_to_batch
from pyro_lm.ops.stats import (
    check_log_weights,
    ess,
    log_mean_exp,
    log_normalizer,
    log_normalizer_stderr,
    mean_stderr,
)

__all__ = ["aligned", "check_plated", "sum_to_batch", "check_log_weights", "ess", "log_mean_exp",
           "log_normalizer", "log_normalizer_stderr", "mean_stderr"]
