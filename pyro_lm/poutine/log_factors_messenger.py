"""Sum a program's log-factors with its LM site held at a value, recording nothing."""

from __future__ import annotations

import torch
from pyro.distributions import Unit
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.ops.plates import check_plated, sum_to_batch
from pyro_lm.rewards.incremental import active_states

__all__ = ["LogFactorsMessenger"]


class _PartialEnd(Exception):
    """A partial run reached a latent site with no held value."""


class LogFactorsMessenger(Messenger):
    r"""Runs ``model`` with its LM site ``site`` held at a value and sums every observed
    site's scaled, masked log-density (factors and data) into one tensor
    ``(N, *batch_shape)`` (the one plate rule of :mod:`pyro_lm.ops.plates`: dims where
    ``batch_shape`` is 1 are summed). Nothing is traced, no gradient is needed, and
    messages stop here, so nothing outside sees the evaluation. One instance serves many
    evaluations (SMC calls :meth:`evaluate` once per token, inside
    :func:`~pyro_lm.distributions.prefix_context` for prefixes).

    :param model: the Pyro model.
    :param str site: the LM site's name.
    :param torch.Size batch_shape: the value's shape less its leading particle dim and
        its last (token) dim, aligned to the model's plates (1 for a summed plate).
    :param str owner: who asks, for error messages.
    :param bool partial: a latent site with no held value ends the run (the log-densities
        summed so far are the result: a *partial program*, as SMC over a program sees it);
        else it is an error.
    :raises ValueError: naming ``owner`` if the model reaches another latent site (its
        value would be arbitrary) and not ``partial``, or if a factor lies outside a plate
        of ``batch_shape``.

    >>> import pyro
    >>> from pyro_lm import LMDistribution
    >>> from pyro_lm.lm import toy_lm
    >>> lm = toy_lm(vocab_size=4)
    >>> def model():
    ...     x = pyro.sample("x", LMDistribution(lm, "t1", 3))
    ...     pyro.factor("reward", (x == 2).sum(-1).float())
    >>> factors = LogFactorsMessenger(model, "x", torch.Size(()))
    >>> factors.evaluate(torch.tensor([[2, 2, 1], [1, 0, 0]])).tolist()
    [2.0, 0.0]
    """

    def __init__(self, model, site: str | None, batch_shape: torch.Size, owner: str = "model",
                 partial: bool = False):
        super().__init__()
        self.site, self.batch_shape, self.owner, self.partial = site, batch_shape, owner, partial
        self.values, self.total = None, 0.0
        self._prefix = self._context = None
        self._stops: dict = {}  # held sites -> the last observed site before a partial end
        self._early = self._last = None
        self._run = self(model)

    def evaluate(self, value: torch.Tensor, args=(), kwargs=None):
        """Run the model with its LM site at ``value`` ``(N, *batch_shape, T)``; the sum
        of its observed sites' log-densities, ``(N, *batch_shape)`` (the float 0.0 if it
        has none)."""
        return self.evaluate_values({self.site: value}, args, kwargs)

    def evaluate_values(self, values: dict, args=(), kwargs=None, prefix=None,
                        stop_early: bool = False):
        """:meth:`evaluate` with several latent sites held: ``values`` site → value, each
        with the leading particle dim.

        :param prefix: ``None``, or ``(site, t)``: ``values[site]`` is a prefix of ``t``
            tokens, and the model runs inside :func:`~pyro_lm.distributions.prefix_context`
            from that site's sample statement on; before it the held values are complete
            (an earlier site's factor sees its whole completion).
        :param bool stop_early: a partial run may end at the observed site after which the
            last partial run with the same held sites found no other before its end (what
            follows it, e.g. the next site's prompt built from this prefix, is not run);
            for potentials whose value only steers (SMC's intermediate ones), never for a
            run that must see every site."""
        self.values, self.total = values, 0.0
        self._prefix, self._context = prefix, None
        self._early = (frozenset(values), prefix is None) if stop_early and self.partial \
            else None
        self._last = None
        states = active_states()
        if states is not None:  # a new evaluation: its reward calls are numbered anew
            states.begin()
        try:
            self._run(*args, **(kwargs or {}))
        except _PartialEnd:
            pass
        finally:
            if self._context is not None:
                self._context.__exit__(None, None, None)
            total, self.values, self.total = self.total, None, None
            self._prefix = self._context = None
        return total

    def _pyro_sample(self, msg):
        msg["stop"] = True
        if site_is_subsample(msg):
            return
        if msg["name"] in self.values:
            msg["value"], msg["is_observed"], msg["done"] = self.values[msg["name"]], True, True
            if self._prefix is not None and msg["name"] == self._prefix[0]:
                self._context = prefix_context(self._prefix[1]).__enter__()
        elif msg["is_observed"]:
            fn, value = msg["fn"], msg["value"]
            if type(fn) is Unit and value.shape[:-1] == fn.log_factor.shape:  # pyro.factor
                log_prob = fn.log_factor  # what Unit.log_prob returns, read directly
            else:
                log_prob = fn.log_prob(value)
            scale = msg["scale"]
            if isinstance(scale, torch.Tensor) or scale != 1.0 or msg["mask"] is not None:
                log_prob = scale_and_mask(log_prob, scale, msg["mask"])
            n = len(self.batch_shape)
            check_plated(log_prob.shape, {f.dim for f in msg["cond_indep_stack"]
                                          if f.vectorized}, n, msg["name"])
            term = sum_to_batch(log_prob, self.batch_shape, msg["name"])
            for d, size in enumerate(self.batch_shape, start=1):
                if size > 1 and term.shape[d] == 1:
                    raise ValueError(
                        f"{self.owner}: site {msg['name']!r} lies outside a plate of the LM "
                        f"site {self.site!r}, so its log-density couples the {size} batch "
                        f"elements; {self.owner} weighs each batch element on its own. Compute "
                        "it inside the LM site's plate, or use Importance, QRS or IMH (which "
                        "give such programs one joint weight per sample)")
            first = isinstance(self.total, float) and self.total == 0.0
            self.total = term if first else self.total + term
            self._last = msg["name"]
            if self._early is not None and self._stops.get(self._early) == msg["name"]:
                raise _PartialEnd  # nothing observed after it, the last time
        elif self.partial:
            if self._early is not None:
                self._stops[self._early] = self._last
            raise _PartialEnd
        else:
            raise ValueError(f"{self.owner}: latent site {msg['name']!r} besides the LM site "
                             f"{self.site!r}; {self.owner} infers one LM site, condition the "
                             "others (pyro.condition) or use Importance")

    def _pyro_param(self, msg):
        msg["stop"] = True
