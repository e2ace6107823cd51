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
from pyro.distributions import Unit
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.lm_distribution import prompt_cache
from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.exact import unwrap
from pyro_lm.infer.importance import model_structure, reduce_to_batch

__all__ = ["FixedLMFactors", "prefix_factors", "single_lm_site"]


class FixedLMFactors(Messenger):
    """Gives the LM site ``site`` a fixed :attr:`value` and sums every observed site's
    log-density into :attr:`total`, reduced to ``(N, *batch_shape)``, without recording
    a trace. Messages stop here: nothing outside sees the evaluation. Any other latent
    site is an error (its value would be arbitrary). One instance serves many
    evaluations (SMC runs it once per token): call :meth:`evaluate` for each.

    :param model: the Pyro model.
    :param str site: the LM site's name.
    :param torch.Size batch_shape: the value's shape less its leading particle dim and
        its last (token) dim; dims of size 1 sum the factors over plates the LM site
        is not in.
    :param str owner: who asks, for error messages.
    """

    def __init__(self, model, site: str, batch_shape: torch.Size, owner: str = "model"):
        super().__init__()
        self.site, self.batch_shape, self.owner = site, batch_shape, owner
        self.value, self.total = None, 0.0
        self._run = self(model)

    def evaluate(self, value: torch.Tensor, args=(), kwargs=None):
        """Run the model with its LM site at ``value`` ``(N, *batch_shape, T)`` and return
        the sum of its observed sites' log-densities, ``(N, *batch_shape)`` (the float 0.0
        if it has none). Inside :func:`~pyro_lm.distributions.prefix_context` the factors
        see ``value`` as prefixes."""
        self.value, self.total = value, 0.0
        try:
            self._run(*args, **(kwargs or {}))
            return self.total
        finally:
            self.value = self.total = None

    def _pyro_sample(self, msg):
        msg["stop"] = True
        if site_is_subsample(msg):
            return
        if msg["name"] == self.site:
            msg["value"], msg["is_observed"], msg["done"] = self.value, True, True
        elif msg["is_observed"]:
            fn, value = msg["fn"], msg["value"]
            if type(fn) is Unit and value.shape[:-1] == fn.log_factor.shape:  # pyro.factor
                log_prob = fn.log_factor  # what Unit.log_prob returns, read directly
            else:
                log_prob = fn.log_prob(value)
            scale = msg["scale"]
            if isinstance(scale, torch.Tensor) or scale != 1.0 or msg["mask"] is not None:
                log_prob = scale_and_mask(log_prob, scale, msg["mask"])
            term = reduce_to_batch(log_prob, self.batch_shape, msg["name"])
            first = isinstance(self.total, float) and self.total == 0.0
            self.total = term if first else self.total + term
        else:
            raise ValueError(f"{self.owner}: latent site {msg['name']!r} besides the LM site "
                             f"{self.site!r}; {self.owner} infers one LM site, condition the "
                             "others (pyro.condition)")

    def _pyro_param(self, msg):
        msg["stop"] = True


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
    factors = FixedLMFactors(model, site, batch, owner)
    positions = torch.arange(value.shape[-1], device=value.device)
    with prompt_cache():  # the model builds its LMDistribution once per length
        for i, t in enumerate(lengths):
            with prefix_context(t):
                total = factors.evaluate(value.masked_fill(positions >= t, pad), args, kwargs)
            out[i] = torch.as_tensor(total, dtype=torch.float32, device=value.device)
    return out


def single_lm_site(model, args=(), kwargs=None, owner: str = "model"):
    """The one :class:`~pyro_lm.LMDistribution` site of ``model(*args, **kwargs)``, read
    without decoding.

    :returns: ``(name, dist, batch_shape)``: the site's (plate-expanded) distribution and
        the shape, less the particle and token dims, of the values :class:`FixedLMFactors`
        takes (1 for the plates the site is not in).
    :raises ValueError: naming ``owner``, unless the model has exactly one LM site, no
        other latent site, and the site's distribution is a plain LMDistribution.
    """
    trace, names, nesting = model_structure(model, *args, **(kwargs or {}))
    if len(names) != 1:
        raise ValueError(f"model: {owner} drives exactly one LM site, the model has {names}; "
                         "condition the others (pyro.condition) or use Importance")
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and not site_is_subsample(s) and n != names[0]]
    if latent:
        raise ValueError(f"model: latent sites {latent} besides the LM site {names[0]!r}; "
                         f"{owner} infers one LM site (condition the others)")
    fn = trace.nodes[names[0]]["fn"]
    if unwrap(fn) is not fn:
        raise ValueError(f"model: site {names[0]!r} wraps its LMDistribution (mask, "
                         f"to_event, ...); {owner} needs the plain distribution")
    batch = torch.Size((1,) * (nesting - len(fn.batch_shape)) + tuple(fn.batch_shape))
    return names[0], fn, batch
