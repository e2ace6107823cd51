r"""The evidence model of the Bayesian view: a Bayesian logistic regression over features of x.

Given labelled sequences :math:`(x_j, y_j)`, the classifier

.. math::

    w \sim \mathcal N(0, s^2 I), \quad b \sim \mathcal N(0, s^2), \quad
    y_j \mid x_j \sim \mathrm{Bernoulli}\big(\sigma(w^\top f(x_j) + b)\big)

is fitted with NUTS (NumPyro, JAX on CPU) on standardised features
:math:`f(x)`, and the reward is the posterior predictive log-probability of the
label, averaged over the :math:`S` posterior draws in probability space:

.. math::

    r(x) = \log p(y = 1 \mid x, \mathcal D)
         = \log \frac1S \sum_{s=1}^S \sigma\big(w_s^\top f(x) + b_s\big),

computed in torch on the LM's device. Its uncertainty about :math:`w` makes
the reward less extreme than a point estimate far from the training data.

References:

* Hoffman, M. D. and Gelman, A. (2014). The No-U-Turn sampler. *JMLR* 15:1593-1623.
* Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. and Bürkner, P.-C. (2021).
  Rank-normalization, folding, and localization: an improved R-hat for
  assessing convergence of MCMC. *Bayesian Analysis* 16(2):667-718.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np
import torch

from pyro_lm.distributions.prefix import counted_mask, is_complete
from pyro_lm.lm.causal_lm import CausalLM, eval_mode
from pyro_lm.rewards.base import Reward

__all__ = ["BayesianClassifier", "encode_completions"]

#: R-hat above this value triggers a warning (Vehtari et al. 2021).
RHAT_THRESHOLD = 1.01


def encode_completions(lm: CausalLM, texts, max_new_tokens: int | None = None) -> torch.Tensor:
    """Token ids of texts written as completions: content, then EOS, then padding.

    :param lm: the :class:`~pyro_lm.CausalLM` whose tokenizer to use.
    :param texts: a list of strings (the completion text, without the prompt).
    :param int max_new_tokens: ``T`` (default: the longest encoding + 1);
        longer texts are truncated and then carry no EOS.
    :returns: LongTensor ``(n, T)`` on ``lm.device``.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts: expected a non-empty list of strings")
    rows = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] + [lm.eos_token_id]
            for t in texts]
    width = max_new_tokens or max(len(r) for r in rows)
    out = torch.full((len(rows), width), lm.pad_token_id, dtype=torch.long, device=lm.device)
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=lm.device)
    return out


def _jax_cpu_device():
    """JAX's CPU device, keeping JAX off accelerators that torch may be using.

    If JAX has not started a backend yet and ``JAX_PLATFORMS`` is unset, JAX is
    restricted to the CPU (``jax_platforms = "cpu"``), so that a CUDA build of
    jaxlib never pre-allocates GPU memory under torch's feet; otherwise the
    user's choice stands and the fit is only placed on the CPU device.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # pragma: no cover - JAX internals moved
        started = True
    if not started and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    return jax.devices("cpu")[0]


class BayesianClassifier(Reward):
    r"""Bayesian logistic regression on features of completions, fitted by NUTS; the reward
    is the posterior predictive :math:`\log p(y = \text{label} \mid x)`.

    Features are computed from the completion's *content* tokens only (before
    the first EOS, and only generated positions during SMC; see
    :func:`~pyro_lm.distributions.prefix.counted_mask`):

    * ``"hidden"``: the mean over content positions of the LM's hidden states
      at ``layer`` (run on ``prefix + x``; an empty completion uses the state
      at the last prefix token);
    * ``"tokens"``: bag-of-tokens counts over the vocabulary.

    Features are standardised with the training set's mean and standard
    deviation; constant features are dropped. With ``whiten=True`` they are
    then projected on their principal components and rescaled to unit
    variance (at most ``max_features`` of them): pooled hidden states are
    strongly correlated, and decorrelated features make NUTS mix much faster.
    The prior :math:`\mathcal N(0, s^2)` then applies to the weights of the
    whitened features.

    :param lm: a :class:`~pyro_lm.CausalLM` (its tokenizer defines ``x``; its
        network gives the ``"hidden"`` features and the device of the reward).
    :param str features: ``"hidden"`` or ``"tokens"``.
    :param float prior_scale: :math:`s`, the prior standard deviation of the
        weights and bias (on standardised features).
    :param int layer: which hidden-state layer to pool (``-1``: the last).
    :param prefix: text (or token ids) the LM reads before the completion for
        ``"hidden"`` features, e.g. the prompt; default: the BOS token.
    :param int label: the class whose log-probability is the reward (1 or 0).
    :param str on_prefix: ``"evaluate"`` scores incomplete SMC prefixes as they
        are (a heuristic twist), ``"zero"`` gives them 0.
    :param int batch_size: sequences per LM forward pass.
    :param bool whiten: decorrelate the standardised features (PCA whitening).
    :param int max_features: keep at most this many principal components
        (with ``whiten``; default: all with non-negligible variance).
    :param str name: used in error messages.
    """

    def __init__(self, lm: CausalLM, features: str = "hidden", prior_scale: float = 1.0,
                 layer: int = -1, prefix=None, label: int = 1, on_prefix: str = "evaluate",
                 batch_size: int = 64, whiten: bool = False, max_features: int | None = None,
                 name: str | None = None):
        super().__init__(name or "BayesianClassifier")
        if not isinstance(lm, CausalLM):
            raise TypeError(f"lm: expected a pyro_lm.CausalLM, got {type(lm).__name__}")
        if features not in ("hidden", "tokens"):
            raise ValueError(f"features: expected 'hidden' or 'tokens', got {features!r}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale: must be > 0, got {prior_scale}")
        if label not in (0, 1):
            raise ValueError(f"label: expected 0 or 1, got {label!r}")
        if on_prefix not in ("evaluate", "zero"):
            raise ValueError(f"on_prefix: expected 'evaluate' or 'zero', got {on_prefix!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.lm = lm
        self.features = features
        self.prior_scale = float(prior_scale)
        self.layer = layer
        self.label = label
        self.on_prefix = on_prefix
        if max_features is not None and max_features < 1:
            raise ValueError(f"max_features: expected a positive int or None, got "
                             f"{max_features}")
        self.batch_size = batch_size
        self.whiten = whiten
        self.max_features = max_features
        self.prefix_ids = self._prefix_ids(prefix)
        self.inference_data = None
        self.rhat_max = math.nan
        self.ess_bulk_min = math.nan
        self.fit_seconds = math.nan
        self._projection = None
        self._fitted = False

    def _prefix_ids(self, prefix) -> torch.Tensor:
        lm = self.lm
        if prefix is None:
            first = lm.bos_token_id if lm.bos_token_id is not None else lm.eos_token_id
            ids = [first]
        elif isinstance(prefix, str):
            ids, mask = lm.encode(prefix)
            ids = ids[0][mask[0].bool()].tolist()
        else:
            ids = torch.as_tensor(prefix).reshape(-1).tolist()
        if not ids:
            raise ValueError("prefix: encodes to no tokens; pass None (the BOS token) or text")
        return torch.tensor(ids, dtype=torch.long, device=lm.device)

    # ------------------------------------------------------------------ features
    def featurize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unstandardised) features ``(N, D)``, float32 on the LM's device.

        :param x: LongTensor ``(N, T)`` of completions.
        """
        x = x.to(self.lm.device)
        keep = counted_mask(x, self.lm.eos_token_id)
        if self.features == "tokens":
            vocab = self.lm.vocab_size
            counts = torch.zeros(x.shape[0], vocab, dtype=torch.float32, device=x.device)
            return counts.scatter_add_(1, x.clamp(0, vocab - 1), keep.float())
        chunks = [self._hidden(x[i:i + self.batch_size], keep[i:i + self.batch_size])
                  for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self._hidden_size(),
                                                            device=x.device)

    def _hidden_size(self) -> int:
        cfg = self.lm.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    def _hidden(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.prefix_ids.shape[0]
        ids = torch.cat([self.prefix_ids.expand(n, p), x.masked_fill(~keep,
                                                                     self.lm.pad_token_id)], 1)
        mask = torch.cat([torch.ones(n, p, dtype=torch.long, device=x.device), keep.long()], 1)
        with torch.no_grad(), eval_mode(self.lm.model):
            out = self.lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                use_cache=False)
        h = out.hidden_states[self.layer].float()  # (n, p + T, H)
        content = keep.float().unsqueeze(-1)
        count = content.sum(1)
        pooled = (h[:, p:] * content).sum(1) / count.clamp(min=1.0)
        return torch.where(count > 0, pooled, h[:, p - 1])

    def _standardise(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats[:, self._keep] - self._mean) / self._scale
        return z if self._projection is None else z @ self._projection

    # ----------------------------------------------------------------------- fit
    def fit(self, x, labels, num_warmup: int = 500, num_samples: int = 500,
            num_chains: int = 2, seed: int = 0, chain_method: str = "sequential",
            target_accept_prob: float = 0.8, progress_bar: bool = False) -> BayesianClassifier:
        r"""Fit the posterior over :math:`(w, b)` with NUTS; diagnose it with ArviZ.

        :param x: LongTensor ``(n, T)`` of completions (content, EOS, padding) or
            a list of completion texts (encoded with :func:`encode_completions`).
        :param labels: ``(n,)`` 0/1 labels (bool, int or float; tensor, array or list).
        :param int num_warmup: NUTS warm-up (adaptation) iterations per chain.
        :param int num_samples: posterior draws kept per chain.
        :param int num_chains: chains (at least 2 for R-hat).
        :param int seed: the JAX PRNG seed.
        :param str chain_method: NumPyro's ``"sequential"``, ``"vectorized"`` or
            ``"parallel"`` (the latter needs ``numpyro.set_host_device_count``).
        :returns: ``self``, with :attr:`inference_data` (ArviZ's ``from_numpyro``:
            an ``InferenceData``, a ``DataTree`` under ArviZ 1.x), :attr:`rhat_max`,
            :attr:`ess_bulk_min` and :attr:`fit_seconds` set; a :class:`UserWarning`
            is emitted when any R-hat exceeds 1.01.
        """
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import MCMC, NUTS

        if not isinstance(x, torch.Tensor):
            x = encode_completions(self.lm, list(x))
        if x.dtype != torch.long or x.dim() != 2:
            raise TypeError(f"x: expected a LongTensor (n, T) or a list of texts, got "
                            f"{x.dtype} of shape {tuple(x.shape)}")
        y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels,
                       dtype=np.float64).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"labels: {y.shape[0]} labels for {x.shape[0]} sequences")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("labels: every label must be 0 or 1 (or False/True)")
        if y.min() == y.max():
            raise ValueError(f"labels: all labels are {int(y[0])}; a classifier needs both "
                             "classes in the training data")
        if num_chains < 1 or num_samples < 1 or num_warmup < 0:
            raise ValueError("num_chains, num_samples: must be >= 1 (num_warmup >= 0)")

        feats = self.featurize(x).double()
        mean, scale = feats.mean(0), feats.std(0, unbiased=False)
        keep = scale > 1e-8 * (1.0 + mean.abs())
        if not keep.any():
            raise ValueError("x: every feature is constant across the training sequences")
        self._keep = keep.nonzero().flatten()
        self._mean = mean[self._keep].float()
        self._scale = scale[self._keep].float()
        self._projection = None
        if self.whiten:
            z = (feats[:, self._keep] - mean[self._keep]) / scale[self._keep]
            _, sv, vt = torch.linalg.svd(z, full_matrices=False)
            sd = sv / math.sqrt(z.shape[0])  # standard deviation along each component
            k = int((sd > 1e-6 * sd[0]).sum())
            k = min(k, self.max_features or k)
            self._projection = (vt[:k].T / sd[:k]).float()  # (D, k): unit-variance scores
        z = self._standardise(feats.float()).cpu().numpy()
        s = self.prior_scale

        def model(z, y=None):
            w = numpyro.sample("w", ndist.Normal(0.0, s).expand([z.shape[1]]).to_event(1))
            b = numpyro.sample("b", ndist.Normal(0.0, s))
            numpyro.sample("y", ndist.Bernoulli(logits=z @ w + b), obs=y)

        start = time.perf_counter()
        cpu = _jax_cpu_device()
        with jax.default_device(cpu):
            mcmc = MCMC(NUTS(model, target_accept_prob=target_accept_prob),
                        num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                        chain_method=chain_method, progress_bar=progress_bar)
            with warnings.catch_warnings():
                # "not enough devices for parallel chains" when chain_method is sequential
                warnings.simplefilter("ignore", UserWarning)
                mcmc.run(jax.random.PRNGKey(seed), jnp.asarray(z), jnp.asarray(y))
            draws = mcmc.get_samples()
            w = np.array(draws["w"])  # copies: JAX buffers are read-only
            b = np.array(draws["b"])
        self.fit_seconds = time.perf_counter() - start
        device = self.lm.device
        self._w = torch.as_tensor(w, dtype=torch.float32, device=device)  # (S, D)
        self._b = torch.as_tensor(b, dtype=torch.float32, device=device)  # (S,)
        self.inference_data, self.rhat_max, self.ess_bulk_min = _mcmc_convergence(mcmc)
        self._fitted = True
        if self.rhat_max > RHAT_THRESHOLD:
            warnings.warn(f"{self.name}: NUTS has not converged, max R-hat = {self.rhat_max:.3f} "
                          f"> {RHAT_THRESHOLD}; run longer (num_warmup, num_samples) or more "
                          "chains, or increase prior regularisation (smaller prior_scale)",
                          UserWarning, stacklevel=2)
        return self

    @property
    def num_draws(self) -> int:
        """Number of posterior draws :math:`S` the reward averages over."""
        self._check_fitted()
        return self._w.shape[0]

    def _check_fitted(self):
        if not self._fitted:
            raise RuntimeError(f"{self.name}: not fitted; call .fit(x, labels) before using it "
                               "as a reward")

    # -------------------------------------------------------------------- reward
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-draw logits :math:`w_s^\\top f(x) + b_s`, ``(N, S)`` on the LM's device."""
        self._check_fitted()
        z = self._standardise(self.featurize(x))
        return z @ self._w.T + self._b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        signed = logits if self.label == 1 else -logits
        r = torch.logsumexp(torch.nn.functional.logsigmoid(signed), -1) - math.log(
            signed.shape[-1])
        r = r.to(x.device)
        if self.on_prefix == "zero":
            r = torch.where(is_complete(x, self.lm.eos_token_id), r, torch.zeros_like(r))
        return r

    def __repr__(self) -> str:
        state = (f"S={self.num_draws}, rhat_max={self.rhat_max:.3f}" if self._fitted
                 else "not fitted")
        return f"BayesianClassifier(features={self.features!r}, {state})"


def _arviz():
    """The ``arviz`` module, imported on first use (it is slow to import).

    ArviZ 0.x and the ArviZ 1.x meta-package both export ``from_numpyro``, ``rhat`` and
    ``ess`` at the top level with the arguments used here, so nothing else is needed to
    support both (1.x returns an :class:`xarray.DataTree` instead of an ``InferenceData``).
    """
    try:
        with warnings.catch_warnings():
            # ArviZ 0.23 announces its 1.0 refactor with a FutureWarning on import
            warnings.simplefilter("ignore", FutureWarning)
            import arviz
    except ImportError as e:  # pragma: no cover - arviz is a dependency
        raise ImportError("BayesianClassifier.fit reports R-hat and ESS through ArviZ: "
                          "pip install arviz") from e
    return arviz


def _mcmc_convergence(mcmc) -> tuple[object, float, float]:
    r"""``(inference_data, max R-hat, min bulk ESS)`` of a finished NumPyro MCMC run, from
    ArviZ's ``from_numpyro``, ``rhat`` (rank-normalised split :math:`\hat R`; NaN for a
    single chain) and ``ess`` (bulk)."""
    import xarray as xr

    az = _arviz()
    idata = az.from_numpyro(mcmc, log_likelihood=False)
    posterior = idata["posterior"]
    if not isinstance(posterior, xr.Dataset):  # ArviZ 1.x: a DataTree node
        posterior = posterior.to_dataset()
    rhat_max = _max_over(az.rhat(posterior)) if posterior.sizes["chain"] > 1 else math.nan
    return idata, rhat_max, _min_over(az.ess(posterior, method="bulk"))


def _max_over(dataset) -> float:
    values = [np.nanmax(np.asarray(v)) for v in dataset.data_vars.values()]
    return float(np.nanmax(values)) if values else math.nan


def _min_over(dataset) -> float:
    values = [np.nanmin(np.asarray(v)) for v in dataset.data_vars.values()]
    return float(np.nanmin(values)) if values else math.nan
