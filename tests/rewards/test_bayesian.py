"""Tests for BayesianClassifier: posterior recovery on synthetic data, NUTS convergence
(diagnosed by ArviZ 0.x and 1.x), and the reward's values, shapes, dtype and device.

The reward reads ArviZ itself (it does not import pyro_lm.diagnostics); these tests use
pyro_lm.diagnostics._arviz only as the reference, under both of its backends."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

from pyro_lm.diagnostics import _arviz
from pyro_lm.diagnostics._arviz import arviz, get_group, group_names
from pyro_lm.distributions.prefix import prefix_context
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import BayesianClassifier, Reward, bayesian
from pyro_lm.rewards.bayesian import _mcmc_convergence, encode_completions

V, T, N_TRAIN = 6, 8, 400
W_TRUE = np.array([1.0, -1.0, 0.5, 0.0, -0.5])  # on standardised counts of tokens 1..5
B_TRUE = 0.3


def _completions(n, seed, device="cpu"):
    """Random completions over tokens 1..5 of random length, EOS (= pad = 0) after."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, T), generator=g)
    length = torch.randint(1, T + 1, (n,), generator=g)
    x[torch.arange(T) >= length[:, None]] = 0
    return x.to(device)


@pytest.fixture(scope="module")
def fit_and_run(device):
    """One NUTS fit per device on labels drawn from a known logistic model:
    ``(classifier, device, the numpyro MCMC run it was diagnosed from)``."""
    lm = toy_lm(vocab_size=V, n_layer=1, n_embd=16, seed=0, device=device)
    x = _completions(N_TRAIN, seed=0, device=device)
    clf = BayesianClassifier(lm, features="tokens", prior_scale=2.0)
    counts = clf.featurize(x).double().cpu().numpy()[:, 1:]  # column 0 (EOS) is always 0
    z = (counts - counts.mean(0)) / counts.std(0)
    rng = np.random.default_rng(0)
    y = rng.random(N_TRAIN) < 1 / (1 + np.exp(-(z @ W_TRUE + B_TRUE)))
    runs = []
    with pytest.MonkeyPatch.context() as mp:  # keep the run, to diagnose it again
        mp.setattr(bayesian, "_mcmc_convergence",
                   lambda mcmc: _mcmc_convergence(runs.append(mcmc) or mcmc))
        clf.fit(x, torch.as_tensor(y), num_warmup=200, num_samples=300, num_chains=2, seed=0,
                chain_method="vectorized")
    return clf, device, runs[0]


@pytest.fixture(scope="module")
def fitted(fit_and_run):
    return fit_and_run[:2]


def test_fit_recovers_known_weights(fitted):
    clf, _ = fitted
    post = get_group(clf.inference_data, "posterior")
    w = post["w"].values.reshape(-1, len(W_TRUE))  # dropped the constant EOS column
    draws = np.concatenate([w, post["b"].values.reshape(-1, 1)], 1)
    truth = np.append(W_TRUE, B_TRUE)
    lo, hi = np.quantile(draws, 0.05, axis=0), np.quantile(draws, 0.95, axis=0)
    covered = (lo <= truth) & (truth <= hi)
    # each 90% interval covers with probability 0.9: >= 4 of 6 has probability 0.98
    assert covered.sum() >= 4, (lo, hi)
    # and no coordinate is off by more than 3.5 posterior sd (probability 5e-4 each)
    z = (draws.mean(0) - truth) / draws.std(0)
    assert (np.abs(z) < 3.5).all(), z


def test_fit_converges(fitted):
    clf, _ = fitted
    assert clf.rhat_max <= 1.01
    assert clf.ess_bulk_min > 100
    assert clf.num_draws == 600
    assert clf.fit_seconds > 0


def _arviz_1x_namespace():
    """What the ``arviz >= 1`` meta-package exports at its top level (it re-exports
    arviz-base's conversions and arviz-stats' diagnostics), from those two libraries."""
    import types

    import arviz_base
    import arviz_stats

    return types.SimpleNamespace(from_numpyro=arviz_base.from_numpyro, rhat=arviz_stats.rhat,
                                 ess=arviz_stats.ess)


def test_reward_does_not_import_diagnostics():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(bayesian))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m and m.startswith("pyro_lm.diagnostics")], names


def test_fit_diagnostics_agree_across_arviz(fit_and_run, arviz_backend, monkeypatch):
    """The reward's R-hat and ESS, read from ArviZ's top-level API (0.x, or the 1.x
    meta-package's names), against pyro_lm.diagnostics._arviz under each of its backends
    and ArviZ 0.x's own functions on the same draws."""
    if "0.x" not in _arviz.available_backends():
        pytest.skip("the reference, ArviZ 0.x, is not installed")
    clf, _, mcmc = fit_and_run
    if arviz_backend == "1.x":
        monkeypatch.setattr(bayesian, "_arviz", _arviz_1x_namespace)
    idata, rhat_max, ess_bulk_min = _mcmc_convergence(mcmc)
    ref_idata = _arviz.from_numpyro(mcmc)
    assert type(ref_idata) is type(idata)
    assert isinstance(idata, xr.DataTree if arviz_backend == "1.x" else arviz().InferenceData)
    assert {"posterior", "sample_stats"} <= set(group_names(idata))
    post, ref = get_group(idata, "posterior"), get_group(clf.inference_data, "posterior")
    assert post["w"].dims == ref["w"].dims and post["w"].shape == (2, 300, len(W_TRUE))
    for name in ("w", "b"):
        np.testing.assert_array_equal(post[name].values, ref[name].values)
    np.testing.assert_array_equal(get_group(idata, "sample_stats")["diverging"].values,
                                  get_group(clf.inference_data, "sample_stats")["diverging"])
    assert math.isfinite(rhat_max) and rhat_max <= 1.01 and ess_bulk_min > 100
    assert rhat_max == pytest.approx(clf.rhat_max, rel=1e-12)
    assert ess_bulk_min == pytest.approx(clf.ess_bulk_min, rel=1e-12)
    az = arviz()
    ref_post = get_group(ref_idata, "posterior")
    assert rhat_max == pytest.approx(float(_arviz.rhat(ref_post).to_array().max()), rel=1e-12)
    assert ess_bulk_min == pytest.approx(
        float(_arviz.ess(ref_post, method="bulk").to_array().min()), rel=1e-12)
    pairs = [(_arviz.rhat(post), az.rhat(ref))] + [
        (_arviz.ess(post, method=m), az.ess(ref, method=m))
        for m in ("bulk", "tail", "mean", "sd", "median", "mad")]
    for mine, theirs in pairs:
        for name in ("w", "b"):
            np.testing.assert_allclose(mine[name].values, theirs[name].values, rtol=1e-10)


def test_reward_batched_float32_on_device(fitted):
    clf, device = fitted
    assert isinstance(clf, Reward)
    x = _completions(24, seed=1, device=device)
    r = clf(x)
    assert r.shape == (24,) and r.dtype == torch.float32 and r.device.type == device.type
    assert torch.isfinite(r).all() and (r <= 0).all()
    r_kb = clf(x.reshape(4, 6, T))
    assert r_kb.shape == (4, 6)
    torch.testing.assert_close(r_kb.reshape(-1), r)


def test_reward_is_log_mean_posterior_probability(fitted):
    clf, device = fitted
    x = _completions(16, seed=2, device=device)
    post = get_group(clf.inference_data, "posterior")
    w = torch.tensor(np.array(post["w"].values).reshape(-1, len(W_TRUE)), dtype=torch.float64)
    b = torch.tensor(np.array(post["b"].values).reshape(-1), dtype=torch.float64)
    counts = clf.featurize(x).double().cpu()[:, 1:]
    z = (counts - clf._mean.double().cpu()) / clf._scale.double().cpu()
    p = torch.sigmoid(z @ w.T + b).mean(-1)  # averaged in probability space
    torch.testing.assert_close(clf(x).double().cpu(), p.log(), atol=1e-5, rtol=1e-5)
    # label=0 gives log(1 - p) with the same posterior
    clf.label = 0
    try:
        torch.testing.assert_close(clf(x).double().cpu(), (1 - p).log(), atol=1e-5, rtol=1e-5)
    finally:
        clf.label = 1


def test_reward_follows_true_weights(fitted):
    clf, device = fitted
    ones = torch.tensor([[1] * 6 + [0] * 2], device=device)  # token 1: weight +1
    twos = torch.tensor([[2] * 6 + [0] * 2], device=device)  # token 2: weight -1
    assert float(clf(ones)) > math.log(0.9) and float(clf(twos)) < math.log(0.1)


def test_reward_on_prefixes(fitted):
    clf, device = fitted
    x = _completions(10, seed=3, device=device)
    x[:, :4] = torch.randint(1, V, (10, 4), device=device)  # no EOS in the first 4
    cut = x.clone()
    cut[:, 3:] = 0
    with prefix_context(3):
        r_prefix = clf(x)
    torch.testing.assert_close(r_prefix, clf(cut))  # only generated positions count
    clf.on_prefix = "zero"
    try:
        with prefix_context(3):
            assert (clf(x) == 0).all()
        torch.testing.assert_close(clf(x), BayesianClassifier.forward(clf, x))
    finally:
        clf.on_prefix = "evaluate"


def test_hidden_features_use_content_only(device):
    lm = toy_lm(vocab_size=V, n_layer=1, n_embd=16, seed=0, device=device)
    clf = BayesianClassifier(lm, features="hidden", prefix="t1 t2")
    x = _completions(8, seed=4, device=device)
    f = clf.featurize(x)
    assert f.shape == (8, 16) and f.dtype == torch.float32 and f.device.type == device.type
    junk = x.clone()
    after = torch.arange(T, device=device) > (x == 0).int().argmax(-1, keepdim=True)
    junk[after & (x == 0).any(-1, keepdim=True)] = 3  # tokens after the first EOS
    torch.testing.assert_close(clf.featurize(junk), f)
    empty = torch.zeros(1, T, dtype=torch.long, device=device)  # EOS first
    assert torch.isfinite(clf.featurize(empty)).all()


def test_errors_name_the_argument(tiny_lm):
    with pytest.raises(ValueError, match="features"):
        BayesianClassifier(tiny_lm, features="bag")
    with pytest.raises(ValueError, match="prior_scale"):
        BayesianClassifier(tiny_lm, prior_scale=0.0)
    clf = BayesianClassifier(tiny_lm, features="tokens")
    with pytest.raises(RuntimeError, match="fit"):
        clf(torch.zeros(2, 3, dtype=torch.long))
    x = torch.tensor([[1, 2, 0], [2, 0, 0], [3, 3, 3]])
    with pytest.raises(ValueError, match="labels"):
        clf.fit(x, [1, 0])
    with pytest.raises(ValueError, match="labels"):
        clf.fit(x, [1, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        clf.fit(x, [0, 2, 1])


def test_encode_completions(tiny_lm):
    x = encode_completions(tiny_lm, ["t1 t2", "t3"])
    assert x.tolist() == [[1, 2, 0], [3, 0, 0]]  # content, EOS (0), pad (0)
    assert encode_completions(tiny_lm, ["t1 t2 t3"], max_new_tokens=2).tolist() == [[1, 2]]
