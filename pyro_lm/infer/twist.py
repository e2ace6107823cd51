r"""Learned twists for token-level SMC: a value head trained by contrastive twist learning.

:class:`~pyro_lm.infer.SMC` accepts a ``twist``: log-potentials
:math:`\psi_t(x_{\le t})` of the prefixes that replace the model's factors on
prefixes. Whatever the twist, the final weights target :math:`p^*` exactly (the
potentials telescope); a good twist only lowers the variance. The best one is
the *optimal twist*

.. math:: \psi^*_t(x_{\le t}) = \log E_{p_0}\big[e^{F(x)} \,\big|\, x_{\le t}\big]
    \quad (+\ \text{a constant per } t),

with which the intermediate targets
:math:`\pi_t(x_{\le t}) \propto p_0(x_{\le t})\, e^{\psi_t(x_{\le t})}` are the
marginals :math:`\sigma_t` of :math:`p^*(x) \propto p_0(x) e^{F(x)}` on prefixes [1].
For rewards that say little about a prefix (a classifier of the whole text, a
constraint checked at the end) the model's factors on prefixes are far from it;
a learned twist can do better.

:class:`ValueTwist` is a linear value head on the hidden states of a frozen LM
(by default the prior),
:math:`\psi_\theta(x_{\le t}) = w^\top [h_t;\ \bar h_t] + b`, with :math:`h_t` the
last layer's state after the last token read (for a completion that has ended,
after its EOS) and :math:`\bar h_t` the mean of those states over the tokens read
(what has been said so far, wherever it was said). :func:`fit_twist` trains it by
contrastive twist learning (CTL) [1]: it minimises
:math:`\sum_t \mathrm{KL}(\sigma_t \,\|\, \pi^\theta_t)`, whose gradient is

.. math::

    \nabla_\theta \sum_t \mathrm{KL}(\sigma_t \| \pi^\theta_t)
      = \sum_t \Big( E_{\pi^\theta_t}\big[\nabla_\theta \psi_t\big]
                    - E_{\sigma_t}\big[\nabla_\theta \psi_t\big] \Big),

both expectations estimated from ``S`` completions :math:`x^{(i)} \sim p_0` per
prompt, self-normalised: :math:`\sigma_t` with weights :math:`\propto e^{F(x^{(i)})}`
(the factors of the whole completion), :math:`\pi^\theta_t` with weights
:math:`\propto e^{\psi_t(x^{(i)}_{\le t})}`. The surrogate minimised is

.. math::

    L(\theta) = -\sum_t \Big( \sum_i \bar w_i\, \psi_t(x^{(i)}_{\le t})
        - \log \frac1S \sum_i e^{\psi_t(x^{(i)}_{\le t})} \Big),

an estimate of :math:`\sum_t \mathrm{KL}(\sigma_t \| \pi^\theta_t)` up to a constant.
Drawing from the prior keeps the estimator simple; it needs the posterior's
completions to be reasonably likely under the prior (watch :attr:`TwistFit.ess`).

References:

[1] S. Zhao, R. Brekelmans, A. Makhzani, R. Grosse, "Probabilistic inference in
language models via twisted sequential Monte Carlo", ICML 2024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pyro_lm._validation import check_positive_int
from pyro_lm.distributions.lm_distribution import LMDistribution, prompt_cache
from pyro_lm.distributions.prefix import is_eos
from pyro_lm.infer.program import single_lm_site
from pyro_lm.lm.causal_lm import CausalLM, eval_mode
from pyro_lm.poutine import LogFactorsMessenger

__all__ = ["ValueTwist", "TwistFit", "fit_twist"]


class ValueTwist(nn.Module):
    r"""A twist for :class:`~pyro_lm.infer.SMC`: a linear value head on an LM's hidden
    states, :math:`\psi_\theta(x_{\le t}) = w^\top [h_t;\ \bar h_t] + b` (see the module
    docstring). Train it with :func:`fit_twist`, then pass it as ``SMC(..., twist=...)``.

    :param dist: the model's LM site: an :class:`~pyro_lm.LMDistribution` with the
        same prompts and ``max_new_tokens`` (the twist reads each row's prompt from it).
    :param lm: the frozen :class:`~pyro_lm.CausalLM` whose last hidden states are the
        features (default: ``dist.lm``, the prior). It must share the prior's tokenizer.

    The head starts at zero (:math:`\psi = 0`: every prefix equally promising). A call
    ``twist(x, t)`` runs ``lm`` once on the prompts and the ``t`` generated tokens of
    ``x`` ``(N, *batch, T)`` and returns float32 ``(N, *batch)``; only the head is
    trained (``lm`` runs without gradient). Each call re-reads the whole prefix (no KV
    cache), so an SMC run costs about ``T / 2`` extra forward passes of ``lm`` over the
    prompt and completion: affordable for short completions and small feature LMs.
    """

    def __init__(self, dist: LMDistribution, lm: CausalLM | None = None):
        super().__init__()
        if not isinstance(dist, LMDistribution):
            raise TypeError(f"dist: expected the model's LMDistribution (same prompts and "
                            f"max_new_tokens), got {type(dist).__name__}")
        lm = dist.lm if lm is None else lm
        dist.lm.check_compatible(lm, "lm")
        self.dist = dist
        self.lm = lm  # a CausalLM, not an nn.Module: not registered, so not trained
        width = lm.model.config.hidden_size
        self.head = nn.Linear(2 * width, 1, device=lm.device, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def check_site(self, prior: LMDistribution, owner: str) -> None:
        """Refuse the model's LM site ``prior`` if it is not the one the twist was built
        from: another length, or other prompts (the twist would read each prefix after the
        wrong prompt, and steer or learn with it silently).

        :param str owner: the caller, named in the error.
        """
        if prior.max_new_tokens != self.dist.max_new_tokens:
            raise ValueError(f"twist: built for max_new_tokens={self.dist.max_new_tokens}, "
                             f"the model's site has {prior.max_new_tokens} ({owner}); build it "
                             "from the model's LMDistribution")
        same = (prior.prompt_ids.shape == self.dist.prompt_ids.shape
                and torch.equal(prior.prompt_ids, self.dist.prompt_ids.to(prior.prompt_ids))
                and torch.equal(prior.prompt_mask, self.dist.prompt_mask.to(prior.prompt_mask)))
        if not same:
            raise ValueError(f"twist: built for other prompts than the model's LM site has "
                             f"({tuple(self.dist.prompt_ids.shape)} prompt ids, the site "
                             f"{tuple(prior.prompt_ids.shape)}; {owner}); build the twist from "
                             "the LMDistribution of the prompts it will be run on")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        r"""Features after each generated token, ``(*shape, T', 2 d)`` float32 for ``x``
        ``(*shape, T')``: entry ``s`` is :math:`[h_s;\ \bar h_s]`, the last hidden state
        after reading ``x[..., s]`` (or the first EOS if that comes earlier) and the mean
        of the hidden states of the completion's tokens up to there. No gradient."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() < 2:
            raise TypeError(f"x: expected a LongTensor (N, *batch, T) of token ids, got "
                            f"{getattr(x, 'dtype', type(x).__name__)} of shape "
                            f"{tuple(getattr(x, 'shape', ()))}")
        length = x.shape[-1]
        if length > self.dist.max_new_tokens:
            raise ValueError(f"x: {length} tokens, more than max_new_tokens="
                             f"{self.dist.max_new_tokens} of the twist's dist")
        shape = x.shape[:-1]
        try:
            index = self.dist.prompt_index(shape)
        except RuntimeError:
            raise ValueError(f"x: batch shape {tuple(shape)} does not end with the twist's "
                             f"prompts {tuple(self.dist.prompt_batch_shape)}; build the "
                             "twist from the model's own LMDistribution") from None
        rows = x.reshape(-1, length).to(self.dist.prompt_ids.device)
        ids = self.dist.prompt_ids.index_select(0, index)
        mask = self.dist.prompt_mask.index_select(0, index)
        inputs = torch.cat([ids, rows], dim=-1)
        full_mask = torch.cat([mask, torch.ones_like(rows)], dim=-1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), eval_mode(self.lm.model):
            out = self.lm.model(input_ids=inputs, attention_mask=full_mask,
                                position_ids=positions, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, ids.shape[-1]:].float()  # (R, T', d)
        # after the first EOS the completion is over: keep the state at the EOS
        ended = is_eos(rows, self.lm.eos_token_ids)
        first = torch.where(ended.any(-1), ended.long().argmax(-1), length)  # (R,)
        steps = torch.arange(length, device=rows.device)
        at = torch.minimum(steps, first[:, None])  # (R, T')
        width = hidden.shape[-1]
        last = hidden.gather(1, at[..., None].expand(-1, -1, width))
        # and the mean state over the prefix read so far (a bag of what was said)
        pooled = hidden.cumsum(1).gather(1, at[..., None].expand(-1, -1, width))
        pooled = pooled / (at + 1)[..., None]
        feats = torch.cat([last, pooled], dim=-1)
        return feats.reshape(tuple(shape) + (length, 2 * width))

    def values(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\psi(x_{\le t})` for every prefix length ``t = 1..T'`` of ``x``
        ``(*shape, T')``: ``(*shape, T')`` float32, differentiable in the head."""
        return self.head(self.features(x)).squeeze(-1)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The twist of :class:`~pyro_lm.infer.SMC`: ``(N, *batch)`` log-potentials of the
        prefixes of length ``t`` of ``x`` ``(N, *batch, T)``."""
        if not 0 <= t <= x.shape[-1]:
            raise ValueError(f"t: expected a prefix length in [0, {x.shape[-1]}], got {t}")
        if t == 0:
            return torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        return self.values(x[..., :t])[..., -1]


@dataclass
class TwistFit:
    """What :func:`fit_twist` returns.

    :ivar list losses: the CTL surrogate per step.
    :ivar list ess: per step, the mean over prompts of the effective sample size of the
        weights :math:`e^{F(x^{(i)})}` (out of ``num_samples``): low values mean the
        prior rarely draws what the posterior favours, and the fit sees few positives.
    """

    losses: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)


def fit_twist(twist: ValueTwist, model, *args, num_samples: int = 128, num_steps: int = 100,
              lr: float = 1e-2, **kwargs) -> TwistFit:
    r"""Train ``twist`` by contrastive twist learning for ``model(*args, **kwargs)``.

    :param ValueTwist twist: built from the model's LM site.
    :param model: a Pyro model with one :class:`~pyro_lm.LMDistribution` site (inside
        any plates) and factors, as :class:`~pyro_lm.infer.SMC` takes.
    :param int num_samples: ``S``, prior completions per prompt and step.
    :param int num_steps: Adam steps on the head.
    :param float lr: Adam's learning rate.
    :returns: a :class:`TwistFit` with the loss and ESS of each step.
    """
    if not isinstance(twist, ValueTwist):
        raise TypeError(f"twist: expected a ValueTwist, got {type(twist).__name__}")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(num_steps, "num_steps")
    if num_samples < 2:
        raise ValueError("num_samples: the self-normalised estimates need at least 2")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    site, prior, batch = single_lm_site(model, args, kwargs, owner="fit_twist")
    twist.check_site(prior, "fit_twist")
    if prior.max_new_tokens < 2:
        raise ValueError("model: its LM site has max_new_tokens=1, so there is no prefix "
                         "shorter than the completion to train the twist on (SMC needs no "
                         "twist there: the factor itself is exact on one token)")
    lead = batch[: len(batch) - len(prior.batch_shape)]
    factors = LogFactorsMessenger(model, site, batch, owner="fit_twist")
    big_t = prior.max_new_tokens
    optim = torch.optim.Adam(twist.head.parameters(), lr=lr)
    history = TwistFit()
    log_s = math.log(num_samples)
    with prompt_cache():
        for _ in range(num_steps):
            with torch.no_grad():
                x = prior.sample((num_samples,) + tuple(lead))  # (S, *batch, T)
                log_f = torch.as_tensor(factors.evaluate(x, args, kwargs), dtype=torch.float32,
                                        device=x.device).expand(x.shape[:-1])
                if torch.isnan(log_f).any():
                    raise ValueError("model: a factor is NaN on some completion")
                if torch.isposinf(log_f).any():
                    raise ValueError("model: a factor is +inf on some completion; a factor "
                                     "must be a real number or -inf (hard constraint)")
                if torch.isneginf(log_f).all(0).any():
                    raise ValueError(
                        f"model: every one of the {num_samples} prior completions of some "
                        "prompt has a factor of -inf, so the posterior weights are all zero; "
                        "raise num_samples")
                weights = log_f.softmax(0)  # (S, *batch), sums to 1 per prompt
                ess = 1.0 / (weights**2).sum(0)
            # prefixes of length 1 .. T-1: the last one is the completion, scored by F itself
            psi = twist.values(x[..., : big_t - 1])  # (S, *batch, T-1)
            positive = (weights[..., None] * psi).sum(0)
            negative = psi.logsumexp(0) - log_s
            loss = -(positive - negative).sum()
            optim.zero_grad()
            loss.backward()
            optim.step()
            history.losses.append(loss.item())
            history.ess.append(float(ess.mean()))
    return history
