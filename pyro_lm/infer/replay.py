r"""Off-policy samples: a replay buffer, and the scorer of samples that came from elsewhere.

A loss that learns from samples it did not draw itself (trajectory balance, DPG with a
sampler as proposal) needs, for each sample :math:`x`, the unnormalised target

.. math:: \log \tilde p(x) = \sum_{s \in \text{latent}} \log p(s) + \sum_k f_k(x),

which :func:`held_execution` gives by running the program through the one reader and
scorer (:func:`~pyro_lm.infer.program.execute`) with every latent site *held* at the
given value (nothing is decoded or drawn; every latent site is scored).

:class:`ReplayBuffer` keeps such samples for one batch of prompts: completions drawn
by any sampler (SMC, QRS, Importance: their posteriors are resampled by weight, so the
buffer holds target-like draws), by the guide, or read from a dataset, and hands back
uniform draws of them.

References

[1] N. Malkin, M. Jain, E. Bengio, C. Sun, Y. Bengio, *Trajectory balance: Improved
    credit assignment in GFlowNets*, NeurIPS 2022 (off-policy training from a replay
    buffer).
[2] E. J. Hu, M. Jain, E. Elmoznino, Y. Kaddar, G. Lajoie, Y. Bengio, N. Malkin,
    *Amortizing intractable inference in large language models*, ICLR 2024.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_lm._validation import check_positive_int
from pyro_lm.infer.posterior import WeightedPosterior
from pyro_lm.infer.program import Execution, execute

__all__ = ["ReplayBuffer", "HoldMessenger", "held_execution"]


class HoldMessenger(Messenger):
    """Holds every latent sample site at a given value (nothing is drawn or decoded).

    :param dict values: site → value with the leading sample dim ``N``, broadcastable to
        the site's ``batch_shape + event_shape`` inside the particle plate.
    :raises ValueError: for a latent site that ``values`` does not name.
    """

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or msg["value"] is not None:
            return
        name = msg["name"]
        if name not in self.values:
            raise ValueError(f"samples: no value for the latent site {name!r}; off-policy "
                             f"samples must hold every latent site (they hold "
                             f"{sorted(self.values)})")
        fn = msg["fn"]
        value = self.values[name]
        try:
            msg["value"] = value.expand(fn.batch_shape + fn.event_shape)
        except RuntimeError:
            raise ValueError(f"samples: the value of {name!r} has shape {tuple(value.shape)}, "
                             f"which does not fit the site's shape "
                             f"{tuple(fn.batch_shape + fn.event_shape)} (the leading dim is the "
                             "sample dim; samples are for the same prompts)") from None
        msg["done"] = True


def held_execution(model, values: dict, args=(), kwargs=None, nesting: int | None = None,
                   owner: str = "model") -> Execution:
    r"""``N`` executions of ``model`` with its latent sites held at ``values``, scored: the
    result's :meth:`~pyro_lm.infer.program.Execution.log_joint` is :math:`\log\tilde p`.

    :param dict values: site → ``(N, ...)``; every latent site of the model.
    :param str owner: the algorithm, for error messages.
    """
    num = _num(values, "values")
    return execute(model, None, num, args, kwargs, nesting, owner,
                   assign=lambda fn: HoldMessenger(values)(fn))


def _num(values: dict, name: str) -> int:
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{name}: expected a non-empty dict site -> tensor (n, ...)")
    sizes = {v.shape[0] for v in values.values()}
    if len(sizes) != 1:
        raise ValueError(f"{name}: every site needs the same number of samples (leading dim), "
                         f"got {sorted(sizes)}")
    return sizes.pop()


class ReplayBuffer:
    r"""A first-in first-out store of completions for one batch of prompts.

    :param int capacity: the most samples kept (the oldest go first).
    :param str site: the LM site a bare tensor added with :meth:`add` belongs to.

    :meth:`add` takes a :class:`~pyro_lm.infer.WeightedPosterior` (from SMC, QRS,
    Importance, IMH: resampled by its weights, so equally weighted draws of the target
    it approximates enter), a dict ``site -> (n, *batch, ...)`` (e.g. completions of a
    dataset, encoded with ``LMDistribution.encode_value``), or a tensor for ``site``.
    :meth:`sample` returns ``n`` of the stored samples drawn uniformly with replacement.
    A trajectory-balance loss is minimised by :math:`q = p^*` whatever distribution its
    samples come from (as long as it covers the target), so any of these sources is
    valid off-policy data.
    """

    def __init__(self, capacity: int = 1024, site: str = "x"):
        self.capacity = check_positive_int(capacity, "capacity")
        self.site = site
        self.values: dict | None = None

    def __len__(self) -> int:
        return 0 if self.values is None else next(iter(self.values.values())).shape[0]

    def add(self, samples, num_samples: int | None = None) -> None:
        """Add samples (see the class docstring).

        :param num_samples: for a posterior, how many draws to resample (default: its
            number of samples).
        """
        if isinstance(samples, WeightedPosterior):
            samples = samples.resample(num_samples)
        elif isinstance(samples, torch.Tensor):
            samples = {self.site: samples}
        _num(samples, "samples")
        samples = {k: v.detach() for k, v in samples.items()}
        if self.values is None:
            self.values = samples
        else:
            if set(samples) != set(self.values):
                raise ValueError(f"samples: sites {sorted(samples)} differ from the buffer's "
                                 f"{sorted(self.values)}")
            for k, v in samples.items():
                old = self.values[k]
                if v.shape[1:] != old.shape[1:]:
                    raise ValueError(f"samples: {k!r} has shape {tuple(v.shape[1:])} per sample, "
                                     f"the buffer holds {tuple(old.shape[1:])} (one buffer per "
                                     "batch of prompts)")
            self.values = {k: torch.cat([self.values[k], v.to(self.values[k].device)])
                           for k, v in samples.items()}
        size = len(self)
        if size > self.capacity:
            self.values = {k: v[size - self.capacity:] for k, v in self.values.items()}

    def sample(self, n: int, generator=None) -> dict:
        """``n`` stored samples drawn uniformly with replacement: site → ``(n, ...)``."""
        check_positive_int(n, "n")
        if not len(self):
            raise ValueError("replay: the buffer is empty; add samples (a posterior, a dict "
                             "or a tensor) before training from it")
        device = next(iter(self.values.values())).device
        index = torch.randint(len(self), (n,), device=device, generator=generator)
        return {k: v.index_select(0, index) for k, v in self.values.items()}
