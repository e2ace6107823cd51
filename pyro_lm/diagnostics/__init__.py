r"""Diagnostics for weighted samples and training runs, through ArviZ.

* :func:`to_inference_data`: results and histories as ArviZ ``InferenceData``
  (ArviZ 0.x) or ``DataTree`` (ArviZ 1.x).
* Estimators over log-weights (NumPyro-diagnostics style, pure functions):
  :func:`psis_khat`, :func:`ess`, :func:`log_normalizer`,
  :func:`kl_q_p_estimate`, :func:`kl_p_q_estimate`, :func:`log_z_bounds`.
* :func:`summary` (a :class:`pandas.DataFrame`) and the plots
  :func:`plot_weights`, :func:`plot_ess`, :func:`plot_training`.
"""

from pyro_lm.diagnostics.inference_data import to_inference_data
from pyro_lm.diagnostics.plots import plot_ess, plot_training, plot_weights
from pyro_lm.diagnostics.summary import summary
from pyro_lm.diagnostics.weights import (
    KHAT_THRESHOLD,
    LogZBounds,
    ess,
    kl_p_q_estimate,
    kl_q_p_estimate,
    log_normalizer,
    log_z_bounds,
    psis_khat,
)

__all__ = ["to_inference_data", "summary", "plot_weights", "plot_ess", "plot_training",
           "KHAT_THRESHOLD", "LogZBounds", "psis_khat", "ess", "log_normalizer",
           "kl_q_p_estimate", "kl_p_q_estimate", "log_z_bounds"]
