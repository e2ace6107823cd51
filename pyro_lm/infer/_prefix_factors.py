r"""A model's log-factors evaluated on prefixes of its one LM site's value.

For a model with one :class:`~pyro_lm.LMDistribution` site ``x`` and factors
:math:`f_k`, the prefix potential of length ``t`` is

.. math:: \Phi_t(x_{\le t}) = \sum_k f_k(x_{1:t}),

each factor evaluated inside :func:`~pyro_lm.distributions.prefix_context` ``(t)``
on the value with positions ``>= t`` set to ``pad_token_id`` (how rewards see a
partially generated completion). The model runs with the LM site's value fixed
and nothing recorded: no trace, no gradient.
"""

from __future__ import annotations

import torch

from pyro_lm.distributions.lm_distribution import prompt_cache
from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.poutine import LogFactorsMessenger

__all__ = ["prefix_factors"]


@torch.no_grad()
def prefix_factors(model, site: str, value: torch.Tensor, lengths, pad: int, args=(),
                   kwargs=None, owner: str = "model") -> torch.Tensor:
    r"""The potentials :math:`\Phi_t` of ``value``'s prefixes, one model run per length.

    :param model: the Pyro model (not wrapped in a particle plate: ``value`` carries
        the particle dim on the left and the model's plates broadcast around it).
    :param str site: the name of its one LM site.
    :param torch.Tensor value: LongTensor ``(N, *batch, T)``, full completions.
    :param lengths: the prefix lengths ``t`` (ints in ``[0, T]``).
    :param int pad: ``pad_token_id``, written at positions ``>= t``.
    :returns: float32 ``(len(lengths), N, *batch)``.
    """
    kwargs = kwargs or {}
    lengths = list(lengths)
    batch = torch.Size(value.shape[1:-1])
    out = torch.zeros((len(lengths),) + tuple(value.shape[:-1]), dtype=torch.float32,
                      device=value.device)
    if not lengths:
        return out
    factors = LogFactorsMessenger(model, site, batch, owner)
    positions = torch.arange(value.shape[-1], device=value.device)
    with prompt_cache():  # the model builds its LMDistribution once per length
        for i, t in enumerate(lengths):
            with prefix_context(t):
                total = factors.evaluate(value.masked_fill(positions >= t, pad), args, kwargs)
            out[i] = torch.as_tensor(total, dtype=torch.float32, device=value.device)
    return out
