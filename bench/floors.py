r"""Hand-written PyTorch floors for the benchmarks: plain torch + transformers, no pyro_lm.

Each floor is the least work the algorithm needs on one device, written directly
against a transformers causal LM (``GPT2LMHeadModel``-like) so that a library's
overhead can be read as a ratio to it:

* :class:`RLOOFloor`: one RLOO step [1, 2] of KL-regularised RL: sample ``K``
  completions with the KV cache, one policy forward + backward, one reference
  forward without gradient, the leave-one-out advantage of the reward with the k1
  KL estimate folded in,

  .. math:: s_k = r(x_k) - \beta\,[\log q(x_k) - \log p_0(x_k)], \qquad
            A_k = s_k - \frac{1}{K-1}\sum_{j\ne k} s_j, \qquad
            L = -\frac1K \sum_k A_k \log q(x_k),

  and one Adam update.
* :func:`smc_floor`: batched token-level SMC [3] from the prior with the
  prefix reward as potential: each step samples one token for all ``N``
  particles from the KV cache, adds :math:`(r(x_{\le t}) - r(x_{<t}))/\beta`
  to the log-weights and, when :math:`\mathrm{ESS} < \tau N`, resamples
  systematically and reorders the KV cache in place.

Completions end at the first EOS: later positions hold the pad id and are masked
out of log-probabilities and rewards, as in :class:`pyro_lm.LMDistribution`.

References

[1] W. Kool, H. van Hoof, M. Welling, *Buy 4 REINFORCE Samples, Get a Baseline for
    Free!*, ICLR 2019 DeepRLStructPred workshop.
[2] A. Ahmadian et al., *Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs*, ACL 2024.
[3] A. K. Lew et al., *Sequential Monte Carlo Steering of Large Language Models
    using Probabilistic Programs*, arXiv:2306.03081, 2023.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import DynamicCache

__all__ = ["RLOOFloor", "completion_mask", "sample_completions", "sequence_log_prob",
           "smc_floor", "systematic_resample"]


def _cache_kwarg(model) -> str:
    """transformers 5 calls the KV cache argument ``cache``; older versions
    ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def completion_mask(x: torch.Tensor, eos: int) -> torch.Tensor:
    """``(N, T)`` bool, True up to and including the first EOS of each row."""
    is_eos = (x == eos).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


class _Decoder:
    """KV-cache decoding of ``n`` copies of one prompt (no padding, so default
    positions and the causal mask are right)."""

    def __init__(self, model, prompt: torch.Tensor, n: int):
        self.model = model
        self.key = _cache_kwarg(model)
        self.cache = DynamicCache()
        out = model(prompt.expand(n, -1), **{self.key: self.cache}, use_cache=True,
                    logits_to_keep=1)
        self.logits = out.logits[:, -1].float()

    def advance(self, token: torch.Tensor) -> None:
        out = self.model(token[:, None], **{self.key: self.cache}, use_cache=True)
        self.logits = out.logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.logits = self.logits.index_select(0, index)


def _draw(logits: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits), by inverting the CDF with one uniform per
    row (cheaper than Gumbel-max, which needs a uniform and two logs per element)."""
    cdf = (logits - logits.amax(-1, keepdim=True)).exp_().cumsum_(-1)
    u = torch.rand_like(cdf[:, -1:]).mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_completions(model, prompt: torch.Tensor, n: int, max_new_tokens: int,
                       eos: int, pad: int, decoder=None) -> torch.Tensor:
    """``n`` ancestral samples of ``max_new_tokens`` tokens after ``prompt`` (``(1, L)``),
    ``(n, T)`` with ``pad`` after the first EOS; stops once every row has ended (checked
    every token on CPU, every 8 on accelerators).

    :param decoder: the decoding state of ``n`` copies of ``prompt`` (``.logits``,
        ``.advance(token)``); default: ``model``'s transformers forward with a
        ``DynamicCache``. ``bench/scaling.py`` also passes pyro_lm's decoder, to time this
        loop without the transformers forward (the lean loop on the same decoder).
    """
    decoder = _Decoder(model, prompt, n) if decoder is None else decoder
    x = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=prompt.device)
    done = torch.zeros(n, dtype=torch.bool, device=prompt.device)
    every = 1 if prompt.device.type == "cpu" else 8
    for t in range(max_new_tokens):
        token = _draw(decoder.logits).masked_fill_(done, pad)
        x[:, t] = token
        done |= token == eos
        if t + 1 == max_new_tokens or ((t + 1) % every == 0 and bool(done.all())):
            break
        decoder.advance(token)
    return x


def sequence_log_prob(model, prompt: torch.Tensor, x: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` log-probability of completions ``x`` (``(N, T)``) after ``prompt``
    (``(1, L)``), summed over the positions where ``mask`` is True. One forward;
    differentiable if the model's parameters require grad."""
    n, t = x.shape
    length = prompt.shape[1]
    ids = torch.cat([prompt.expand(n, -1), x[:, :-1]], dim=1)
    logits = model(ids, use_cache=False).logits[:, length - 1:].float()
    token_logp = logits.log_softmax(-1).gather(-1, x[..., None]).squeeze(-1)
    return (token_logp * mask).sum(-1)


class RLOOFloor:
    """One RLOO step per :meth:`step` on a single prompt (see the module docstring).

    :param policy: trainable transformers causal LM :math:`q`.
    :param reference: frozen transformers causal LM :math:`p_0`.
    :param reward_fn: ``(N, T)`` completions (pad after EOS) → ``(N,)`` rewards.
    :param torch.Tensor prompt: ``(1, L)`` prompt ids.
    :param int num_samples: ``K`` completions per step.
    :param int max_new_tokens: ``T``.
    :param float beta: KL coefficient :math:`\\beta`.
    :param int eos: EOS id (also the pad id after EOS unless ``pad`` is given).
    :param float lr: Adam learning rate.
    """

    def __init__(self, policy, reference, reward_fn, prompt: torch.Tensor, num_samples: int,
                 max_new_tokens: int, beta: float, eos: int, lr: float = 1e-4,
                 pad: int | None = None):
        if num_samples < 2:
            raise ValueError(f"num_samples: the leave-one-out baseline needs >= 2, "
                             f"got {num_samples}")
        if not beta > 0:
            raise ValueError(f"beta: expected > 0, got {beta}")
        self.policy, self.reference = policy.eval(), reference.eval()
        self.reward_fn, self.prompt = reward_fn, prompt
        self.k, self.t, self.beta = num_samples, max_new_tokens, beta
        self.eos, self.pad = eos, eos if pad is None else pad
        self.optim = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)

    def step(self) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss."""
        x = sample_completions(self.policy, self.prompt, self.k, self.t, self.eos, self.pad)
        mask = completion_mask(x, self.eos)
        log_q = sequence_log_prob(self.policy, self.prompt, x, mask)
        with torch.no_grad():
            log_p0 = sequence_log_prob(self.reference, self.prompt, x, mask)
            score = self.reward_fn(x) - self.beta * (log_q.detach() - log_p0)
            advantage = score - (score.sum() - score) / (self.k - 1)
        loss = -(advantage * log_q).mean()
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        return loss.detach()


def systematic_resample(log_w: torch.Tensor) -> torch.Tensor:
    """``N`` ancestor indices from log-weights ``(N,)``, by systematic resampling."""
    n = log_w.shape[0]
    cdf = (log_w - log_w.logsumexp(0)).exp().cumsum(0)
    u = (torch.rand((), device=log_w.device) + torch.arange(n, device=log_w.device)) / n
    return torch.searchsorted(cdf, u * cdf[-1]).clamp(max=n - 1)


@torch.no_grad()
def smc_floor(model, prompt: torch.Tensor, num_particles: int, max_new_tokens: int,
              beta: float, reward_increment, eos: int, ess_threshold: float = 0.5,
              pad: int | None = None, decoder=None):
    """Batched token-level SMC from the prior with an additive prefix reward.

    :param reward_increment: ``(token (N,), alive (N,) bool) -> (N,)`` reward of
        appending ``token`` (e.g. ``(token == 7) & alive``), so the potential
        :math:`r(x_{\\le t})/\\beta` telescopes to the final reward.
    :param decoder: the decoding state of ``N`` copies of ``prompt`` (``.logits``
        ``(N, V)``, ``.advance(token)``, ``.reorder(index)``); default: ``model``'s
        transformers forward with a ``DynamicCache``. ``bench/smc.py`` also passes
        pyro_lm's decoder, to time this loop without the transformers forward.
    :returns: ``(x, log_w, log_z)``: completions ``(N, T)``, final log-weights
        ``(N,)`` and the SMC estimate of :math:`\\log Z` (0-dim).
    """
    n = num_particles
    pad = eos if pad is None else pad
    device = prompt.device
    decoder = _Decoder(model, prompt, n) if decoder is None else decoder
    x = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    log_w = torch.zeros(n, device=device)
    log_z = torch.zeros((), device=device)
    log_threshold = math.log(ess_threshold * n) if ess_threshold > 0 else -math.inf
    for t in range(max_new_tokens):
        token = _draw(decoder.logits).masked_fill(done, pad)
        x[:, t] = token
        log_w = log_w + reward_increment(token, ~done).float() / beta
        done = done | (token == eos)
        if t + 1 == max_new_tokens:
            break
        lse = log_w.logsumexp(0)
        log_ess = 2 * lse - (2 * log_w).logsumexp(0)
        if bool(log_ess < log_threshold):  # one host sync per token, as any SMC needs
            index = systematic_resample(log_w)
            log_z = log_z + lse - math.log(n)
            log_w = torch.zeros_like(log_w)
            x, done = x.index_select(0, index), done.index_select(0, index)
            decoder.reorder(index)
        decoder.advance(x[:, t])  # x was reordered with the cache
    log_z = log_z + log_w.logsumexp(0) - math.log(n)
    return x, log_w, log_z
