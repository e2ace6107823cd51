"""Tests for pyro_lm.diagnostics: estimators against ArviZ / closed forms / exact enumeration,
InferenceData layout, summaries and plots. Tests that go through ArviZ take the
``arviz_backend`` fixture (tests/conftest.py) and run under ArviZ 0.x and 1.x."""

import math
import warnings

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
import xarray as xr

from pyro_lm import diagnostics as diag
from pyro_lm import exact, rewards
from pyro_lm.diagnostics import _arviz
from pyro_lm.diagnostics._arviz import arviz, get_group, group_names
from pyro_lm.distributions import LMDistribution
from pyro_lm.infer import WeightedPosterior
from pyro_lm.lm import toy_lm

# ------------------------------------------------------------------ estimators


def _needs(*backends):
    missing = sorted(set(backends) - set(_arviz.available_backends()))
    if missing:
        pytest.skip(f"the ArviZ {', '.join(missing)} libraries are not installed")


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_psis_khat_equals_arviz(batch, arviz_backend):
    # N = 1000: ArviZ 0.23 fits 95 tail draws, arviz-stats' own psislw 94 (see _arviz);
    # the reference is ArviZ 0.23's psislw under both backends
    _needs("0.x")
    g = torch.Generator().manual_seed(0)
    lw = 1.5 * torch.randn((1000,) + batch, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = diag.psis_khat(lw)
    flat = lw.reshape(1000, -1).T.numpy()
    expected = np.asarray(arviz().psislw(flat)[1]).reshape(batch)
    assert isinstance(ours, torch.Tensor) and ours.shape == batch
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0)
    # NumPy in, NumPy out, same values
    np.testing.assert_allclose(diag.psis_khat(lw.numpy(), warn=False), expected, atol=1e-6)


def _log_weights_for_backends():
    """(1000, 6) log-weights: continuous; tied, also at the cutoff; with -inf draws; none
    above the cutoff (k-hat = inf); heavy-tailed; a tail of equal values."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1000, 6, generator=g, dtype=torch.float64)
    lw = z.clone()
    lw[:, 1] = torch.round(2 * z[:, 1]) / 2  # many ties, also at the cutoff
    lw[:, 2] = torch.where(z[:, 2] > 0, z[:, 2], -math.inf)  # rejected draws
    lw[:, 3] = torch.round(z[:, 3]).clamp(max=1.0)  # 31% at the top: none above the cutoff
    lw[:, 4] = 3.0 * z[:, 4]  # heavier tail
    lw[:, 5] = torch.where(torch.arange(1000) < 30, 1.0, 0.0).double()  # a tail of 30 ties
    return lw


def test_psis_khat_backends_agree(monkeypatch):
    """ArviZ 1.x gives ArviZ 0.x's k-hat to rounding, also with ties and -inf draws."""
    _needs("0.x", "1.x")
    lw = _log_weights_for_backends()
    khat = {}
    for backend in ("0.x", "1.x"):
        monkeypatch.setattr(_arviz, "BACKEND", backend)
        khat[backend] = diag.psis_khat(lw, warn=False)
    assert torch.isposinf(khat["0.x"][3]) and torch.isfinite(khat["0.x"][[0, 1, 2, 4, 5]]).all()
    torch.testing.assert_close(khat["1.x"], khat["0.x"], atol=1e-6, rtol=0)
    # the public 1.x psislw (the fallback without arviz-stats' _gpdfit) where the tail lengths
    # coincide (N = 900: 3 sqrt(N) = 90 draws in both) and there are no ties
    lw = lw[:900, [0, 2, 4]]
    monkeypatch.setattr(_arviz, "_arviz_stats_gpdfit", lambda: None)
    fallback = diag.psis_khat(lw, warn=False)
    monkeypatch.setattr(_arviz, "BACKEND", "0.x")
    torch.testing.assert_close(fallback, diag.psis_khat(lw, warn=False), atol=1e-6, rtol=0)


def test_khat_recovers_pareto_shape(arviz_backend):
    # w = u^(-k), u ~ U(0, 1): Pareto with tail index 1/k, an exact GPD(k) tail; the ML
    # estimate has sd about (1 + k) / sqrt(M) on M = 3 sqrt(N) = 300 tail draws
    k = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    u = torch.rand(10000, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    khat = diag.psis_khat(-k * u.log(), warn=False)
    assert (khat - k).abs().le(3 * (1 + k) / math.sqrt(300)).all(), khat


def test_ess_matches_kish_formula():
    g = torch.Generator().manual_seed(1)
    lw = 2.0 * torch.randn(500, 4, generator=g, dtype=torch.float64)
    w = lw.exp()
    expected = w.sum(0) ** 2 / (w**2).sum(0)
    torch.testing.assert_close(diag.ess(lw), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(diag.ess(lw.float()), expected.float(), atol=1e-3, rtol=1e-6)
    np.testing.assert_allclose(diag.ess(lw.numpy()), expected.numpy(), rtol=1e-6)
    assert float(diag.ess(torch.zeros(64))) == pytest.approx(64.0)


def test_khat_warns_for_heavy_tailed_weights(arviz_backend):
    # Pareto(alpha = 1) weights: infinite mean, k = 1 / alpha = 1 > 0.7
    u = torch.rand(4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lw = -torch.log(u)  # log of Pareto(1) draws: w = 1/u
    with pytest.warns(UserWarning, match="k-hat above 0.7"):
        k = diag.psis_khat(lw)
    assert float(k) > 0.7


def test_khat_silent_for_light_tailed_and_uniform_weights(arviz_backend):
    u = torch.rand(4000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k_bounded = diag.psis_khat(u.log())  # bounded weights: k < 0
        k_equal = diag.psis_khat(torch.zeros(4000, 2))  # exact sampling
        k_reject = diag.psis_khat(torch.tensor([0.0, -math.inf] * 100))  # rejection sampling
    assert (k_bounded < 0.5).all()
    assert torch.isneginf(k_equal).all() and torch.isneginf(k_reject)


def test_khat_too_few_draws_is_inf_and_warns():
    with pytest.warns(UserWarning, match="fewer than 5 tail draws"):
        k = diag.psis_khat(torch.randn(20))
    assert torch.isposinf(k)


@pytest.mark.parametrize("fn", [diag.psis_khat, diag.ess, diag.log_normalizer])
def test_estimators_reject_bad_weights(fn):
    with pytest.raises(ValueError, match="log_weights.*NaN"):
        fn(torch.tensor([0.0, float("nan")] * 20))
    with pytest.raises(ValueError, match="log_weights.*zero"):
        fn(torch.full((40, 2), -math.inf))
    with pytest.raises(ValueError, match="log_weights.*shape"):
        fn(torch.tensor(1.0))


def test_log_normalizer_and_stderr():
    g = torch.Generator().manual_seed(4)
    lw = torch.randn(300, 2, generator=g, dtype=torch.float64)
    log_z, se = diag.log_normalizer(lw)
    w = lw.exp()
    torch.testing.assert_close(log_z, w.mean(0).log())
    torch.testing.assert_close(se, w.std(0) / (math.sqrt(300) * w.mean(0)))


# ------------------------------------------------- exact checks on an enumerable problem

N_DRAWS = 20000


@pytest.fixture(scope="module")
def enumerable():
    """Exact posterior of a vocab-4, T=3 problem, a guide q != p*, draws of q and of p*."""
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    guide = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=5, init_std=0.1)
    reward = rewards.Callable(lambda x: (x == 1).float().sum(-1) - 0.5 * (x == 3).float().sum(-1))
    post = exact.posterior(prior, reward, beta=1.0, prompts="t1 t2", max_new_tokens=3)
    with torch.no_grad():
        log_q = post.log_prob_of(guide).double()
    log_joint = post.log_joint.double()
    g = torch.Generator().manual_seed(0)
    iq = torch.multinomial(log_q.exp(), N_DRAWS, replacement=True, generator=g)
    ip = torch.multinomial(post.probs.double(), N_DRAWS, replacement=True, generator=g)
    return post, log_q, log_joint, iq, ip


def _moments(post, log_q, log_joint):
    """Exact population quantities of the weights under q, for the tolerances."""
    q = log_q.exp()
    log_z = post.log_Z.double()
    lw = log_joint - log_q
    wn = (lw - log_z).exp()  # w / Z, mean 1 under q
    var_wn = (q * (wn - 1) ** 2).sum()
    elbo = (q * lw).sum()
    var_lw = (q * (lw - elbo) ** 2).sum()
    eubo = (post.probs.double() * lw).sum()
    # delta method: log Z_hat - log Z ~ mean(w/Z - 1), so the reverse-KL estimate
    # log Z_hat - mean(log w) is ~ a mean of (w/Z - log w); the self-normalised forward-KL
    # estimate sum w_bar log w - log Z_hat is ~ a mean of (w/Z) (log w - EUBO) - w/Z
    var_kl_qp = (q * ((wn - lw) - (1 - elbo)) ** 2).sum()
    g = wn * (lw - eubo) - wn
    var_kl_pq = (q * (g - (q * g).sum()) ** 2).sum()
    # leading O(1/N) biases: Jensen on log Z_hat (var/2) and the ratio estimator's
    snis_bias = (q * wn**2 * (lw - eubo).abs()).sum() + var_wn / 2
    return dict(log_z=log_z, lw=lw, var_wn=var_wn, elbo=elbo, var_lw=var_lw, eubo=eubo,
                var_lw_p=(post.probs.double() * (lw - eubo) ** 2).sum(), var_kl_qp=var_kl_qp,
                var_kl_pq=var_kl_pq, snis_bias=snis_bias)


def test_kl_estimates_match_exact(enumerable):
    post, log_q, log_joint, iq, _ = enumerable
    m = _moments(post, log_q, log_joint)
    n = N_DRAWS
    se_elbo = math.sqrt(m["var_lw"] / n)
    kl_qp_exact = float(post.kl_q_p(log_q))
    kl_pq_exact = float(post.kl_p_q(log_q))
    assert kl_qp_exact > 0.05 and kl_pq_exact > 0.05  # q really differs from p*

    est = diag.kl_q_p_estimate(log_joint[iq], log_q[iq])
    # 4 delta-method sd, plus the Jensen bias of log Z_hat, var(w/Z) / (2N)
    tol = 4 * math.sqrt(m["var_kl_qp"] / n) + float(m["var_wn"]) / (2 * n)
    assert abs(float(est) - kl_qp_exact) <= tol
    est_known = diag.kl_q_p_estimate(log_joint[iq], log_q[iq], log_Z=m["log_z"])
    assert abs(float(est_known) - kl_qp_exact) <= 4 * se_elbo  # unbiased given log Z

    est = diag.kl_p_q_estimate(log_joint[iq], log_q[iq])
    # 4 delta-method sd plus the O(1/N) bias
    tol = 4 * math.sqrt(m["var_kl_pq"] / n) + float(m["snis_bias"]) / n
    assert abs(float(est) - kl_pq_exact) <= tol


def test_log_z_bounds_bracket_exact(enumerable):
    post, log_q, log_joint, iq, ip = enumerable
    m = _moments(post, log_q, log_joint)
    n = N_DRAWS
    log_z = float(m["log_z"])
    b = diag.log_z_bounds(lower_from=(log_joint[iq], log_q[iq]),
                          upper_from=(log_joint[ip], log_q[ip]))
    assert isinstance(b, diag.LogZBounds)
    # the exact bounds bracket log Z strictly (q != p*); the estimates sit within 4 sd
    assert float(m["elbo"]) < log_z < float(m["eubo"])
    assert abs(float(b.lower) - float(m["elbo"])) <= 4 * math.sqrt(m["var_lw"] / n)
    assert abs(float(b.upper) - float(m["eubo"])) <= 4 * math.sqrt(m["var_lw_p"] / n)
    assert float(b.lower) - 4 * float(b.lower_se) <= log_z <= float(b.upper) + 4 * float(b.upper_se)
    assert float(b.lower) < log_z < float(b.upper)
    # the importance-weighted forms are tighter and still bracket log Z (in expectation)
    iw = diag.log_z_bounds(lower_from=(log_joint[iq], log_q[iq]),
                           upper_from=(log_joint[ip], log_q[ip]), importance=True)
    assert float(b.lower) < float(iw.lower) and float(iw.upper) < float(b.upper)
    assert float(iw.lower) - 4 * float(iw.lower_se) <= log_z <= float(iw.upper) + 4 * float(
        iw.upper_se)
    only_lower = diag.log_z_bounds(lower_from=(log_joint[iq], log_q[iq]))
    assert only_lower.upper is None and float(only_lower.lower) == float(b.lower)
    with pytest.raises(ValueError, match="lower_from, upper_from"):
        diag.log_z_bounds()


# -------------------------------------------------------- InferenceData conversion

N, B, T = 60, 2, 3


def _posterior(tiny_lm, history=None, extras=None, n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 4, (n, B, T), generator=g)
    x[:, :, -1] = 0  # EOS at the end: canonical completions
    lw = torch.randn(n, B, generator=g)
    return WeightedPosterior({"x": x}, lw, lms={"x": tiny_lm}, history=history, extras=extras)


def _groups(idata):
    return {name: get_group(idata, name) for name in group_names(idata)}


def test_to_inference_data_importance(tiny_lm, arviz_backend):
    post = _posterior(tiny_lm)
    idata = diag.to_inference_data(post)
    assert isinstance(idata, xr.DataTree if arviz_backend == "1.x" else arviz().InferenceData)
    groups = _groups(idata)
    assert set(groups) == {"posterior", "sample_stats", "log_likelihood"}
    p, s = groups["posterior"], groups["sample_stats"]
    assert p["x"].dims == ("chain", "draw", "prompt", "position")
    assert p["x"].shape == (1, N, B, T)
    assert np.array_equal(p["x"].values[0], post.samples["x"].numpy())
    assert p["x_text"].dims == ("chain", "draw", "prompt")
    assert p["x_text"].values[0, 5, 1] == tiny_lm.decode(post.samples["x"][5, 1])
    assert s["log_weight"].dims == ("chain", "draw", "prompt")
    np.testing.assert_allclose(s["weight"].values.sum((0, 1)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s["log_normalizer"].values, post.log_normalizer().numpy(),
                               rtol=1e-6)
    assert s["log_normalizer"].dims == ("prompt",)
    assert groups["log_likelihood"]["log_weight"].shape == (1, N, B)
    assert p.attrs["algorithm"] == "importance"
    assert "x_text" not in _groups(diag.to_inference_data(post, decode=False))["posterior"]


def test_to_inference_data_smc_history(tiny_lm, arviz_backend):
    steps = 3
    hist = {"ess": torch.rand(steps, B) * N, "resampled": torch.tensor([[True, False]] * steps),
            "log_Z": torch.randn(steps, B)}
    s = _groups(diag.to_inference_data(_posterior(tiny_lm, history=hist)))["sample_stats"]
    for key in ("ess", "resampled", "log_Z"):
        assert s[key].dims == ("step", "prompt") and s[key].shape == (steps, B)
    assert s["resampled"].dtype == bool
    assert s.attrs["algorithm"] == "smc"


def test_to_inference_data_qrs_extras(tiny_lm, arviz_backend):
    extras = {"acceptance_rate": torch.tensor([0.3, 0.5]), "bound": torch.tensor([2.0, 3.0]),
              "num_proposals": N}
    s = _groups(diag.to_inference_data(_posterior(tiny_lm, extras=extras)))["sample_stats"]
    assert s["acceptance_rate"].dims == ("prompt",)
    assert s["bound"].values.tolist() == [2.0, 3.0]
    assert s.attrs["algorithm"] == "qrs" and s.attrs["num_proposals"] == N


def test_to_inference_data_imh_chains(tiny_lm, arviz_backend):
    chains, draws, burn_in = 3, 20, 2
    accepted = torch.rand(draws + burn_in, chains, B) < 0.5
    post = _posterior(tiny_lm, n=chains * draws,
                      history={"accepted": accepted},
                      extras={"num_chains": chains, "acceptance_rate": torch.tensor([0.5, 0.4])})
    groups = _groups(diag.to_inference_data(post))
    p, s = groups["posterior"], groups["sample_stats"]
    assert p["x"].shape == (chains, draws, B, T)
    # chain-major storage, as pyro_lm.infer.IMH writes it
    x = post.samples["x"].reshape(chains, draws, B, T).numpy()
    assert np.array_equal(p["x"].values, x)
    assert s["accepted"].dims == ("chain", "draw", "prompt")
    assert np.array_equal(s["accepted"].values, accepted[burn_in:].transpose(0, 1).numpy())
    assert s.attrs["algorithm"] == "imh" and s.attrs["num_chains"] == chains
    with pytest.raises(ValueError, match="num_chains"):
        diag.to_inference_data(_posterior(tiny_lm, n=61, extras={"num_chains": 3}))


def test_hand_built_imh_is_read_as_imh(tiny_lm, arviz_backend):
    """A WeightedPosterior built by hand with algorithm="IMH" and IMH's own extras and
    history (as pyro_lm.infer.IMH writes them) is read as IMH everywhere."""
    chains, draws, burn_in = 2, 15, 3
    accepted = torch.rand(draws + burn_in, chains, B) < 0.5
    log_z = torch.tensor([0.1, -0.2])
    post = WeightedPosterior(
        _posterior(tiny_lm, n=chains * draws).samples, torch.zeros(chains * draws, B),
        lms={"x": tiny_lm}, log_normalizer=log_z,
        history={"accepted": accepted, "log_weight": torch.randn(draws + burn_in, chains, B)},
        extras={"acceptance_rate": accepted.float().mean((0, 1)), "num_chains": chains,
                "num_draws": draws, "burn_in": burn_in, "log_Z": log_z},
        algorithm="IMH")
    assert _algorithm_of(post) == "imh"
    groups = _groups(diag.to_inference_data(post))
    s = groups["sample_stats"]
    assert s.attrs["algorithm"] == "imh" and s.attrs["num_chains"] == chains
    assert groups["posterior"]["x"].shape == (chains, draws, B, T)
    assert s["accepted"].dims == ("chain", "draw", "prompt")
    assert s["history_log_weight"].dims == ("chain", "draw", "prompt")
    df = diag.summary(post, warn=False)
    assert df.attrs["algorithm"] == "imh" and (df["num_chains"] == chains).all()


def _algorithm_of(post):
    from pyro_lm.diagnostics.inference_data import algorithm_of

    return algorithm_of(post)


@pytest.mark.parametrize("algorithm, extras, history, expected", [
    ("Importance", {"bound": torch.tensor([2.0, 3.0])}, None, "importance"),
    ("Importance", {"algorithm": "qrs"}, None, "importance"),
    ("QRS", None, {"ess": torch.full((3, B), 30.0)}, "qrs"),
    ("SMC", {"num_chains": 1}, {"accepted": torch.ones(N, 1, B, dtype=torch.bool)}, "smc"),
    (None, {"log_bound": torch.tensor([0.5, 1.0])}, None, "qrs"),  # the guess, as QRS writes
    (None, {"num_chains": 1}, None, "imh"),
    (None, None, {"resampled": torch.zeros(3, B, dtype=torch.bool)}, "smc"),
    (None, None, None, "importance"),
])
def test_algorithm_field_wins_over_extras(tiny_lm, algorithm, extras, history, expected):
    """post.algorithm decides; keys of extras / history are only a fallback guess for a
    result built by hand with algorithm=None."""
    base = _posterior(tiny_lm, history=history, extras=extras)
    post = WeightedPosterior(base.samples, base.log_weights, lms=base.lms, history=history,
                             extras=extras, algorithm=algorithm)
    assert _algorithm_of(post) == expected
    assert diag.summary(post, warn=False).attrs["algorithm"] == expected


def test_to_inference_data_real_smc_and_imh(tiny_lm, arviz_backend):
    from pyro_lm.infer import IMH
    from pyro_lm.infer.smc import SMC

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", LMDistribution(tiny_lm, prompts, max_new_tokens=3))
            pyro.factor("reward", (x == 1).float().sum(-1))

    prompts = ["t1", "t2 t3"]
    smc = SMC(model, num_particles=32).run(prompts)
    s = _groups(diag.to_inference_data(smc))["sample_stats"]
    assert s["ess"].dims == ("step", "prompt") and s.attrs["algorithm"] == "smc"
    imh = IMH(model, num_steps=10, num_chains=2, burn_in=2).run(prompts)
    groups = _groups(diag.to_inference_data(imh))
    assert groups["posterior"]["x"].shape == (2, 8, 2, 3)
    assert groups["sample_stats"]["accepted"].shape == (2, 8, 2)


def test_backends_give_identical_groups(tiny_lm, monkeypatch):
    """The same datasets in an InferenceData (0.x) and a DataTree (1.x), readable by each."""
    _needs("0.x", "1.x")
    hist = {"ess": torch.rand(3, B) * N, "resampled": torch.tensor([[True, False]] * 3)}
    post = _posterior(tiny_lm, history=hist, extras={"acceptance_rate": torch.tensor([.3, .5])})
    out = {}
    for backend in ("0.x", "1.x"):
        monkeypatch.setattr(_arviz, "BACKEND", backend)
        out[backend] = (diag.to_inference_data(post), diag.to_inference_data(_history()))
    for idata_0, idata_1 in zip(*out.values(), strict=True):
        assert sorted(group_names(idata_0)) == sorted(group_names(idata_1))
        assert idata_1.attrs == idata_0.attrs
        for name in group_names(idata_0):
            xr.testing.assert_identical(get_group(idata_1, name), get_group(idata_0, name))
    # ArviZ 1.x reads the tree: arviz_base.extract stacks (chain, draw) into sample
    import arviz_base

    lw = arviz_base.extract(out["1.x"][0], group="sample_stats", var_names="log_weight")
    assert lw.dims == ("prompt", "sample") and lw.shape == (B, N)
    assert arviz().extract(out["0.x"][0], group="sample_stats")["log_weight"].shape == (B, N)


def test_backend_detection(monkeypatch):
    if "0.x" in _arviz.available_backends():
        assert _arviz.detect_backend() == "0.x"  # arviz 0.23 wins over arviz-base/-stats
    assert _arviz._backend_for("0.23.4", True) == "0.x"
    assert _arviz._backend_for("1.0.0", False) == "1.x"
    assert _arviz._backend_for(None, True) == "1.x"  # arviz-base + arviz-stats alone
    assert _arviz._backend_for(None, False) is None
    monkeypatch.setattr(_arviz, "BACKEND", None)
    with pytest.raises(ImportError, match="pip install arviz"):
        diag.to_inference_data(_history())
    monkeypatch.setattr(_arviz, "BACKEND", "2.x")
    with pytest.raises(ValueError, match="BACKEND"):
        diag.psis_khat(torch.randn(100), warn=False)


def _history(steps=6):
    hist = []
    for i in range(steps):
        row = {"step": i, "loss": 1.0 / (i + 1), "time": 0.1 * i, "reward": 0.2 * i,
               "kl": torch.tensor(0.05 * i), "elbo": -1.0 + 0.1 * i}
        if i % 2:
            row["ess"] = 10.0 + i  # logged on some steps only
        hist.append(row)
    return hist


def test_to_inference_data_history(arviz_backend):
    idata = diag.to_inference_data(_history())
    assert isinstance(idata, xr.DataTree if arviz_backend == "1.x" else arviz().InferenceData)
    groups = _groups(idata)
    assert set(groups) == {"training"}
    t = groups["training"]
    assert t["loss"].dims == ("step",) and t["loss"].shape == (6,)
    assert t["step"].values.tolist() == list(range(6))
    np.testing.assert_allclose(t["kl"].values, 0.05 * np.arange(6))
    assert np.isnan(t["ess"].values[0::2]).all() and t["ess"].values[1] == 11.0
    with pytest.raises(ValueError, match="empty"):
        diag.to_inference_data([])
    with pytest.raises(TypeError, match="result"):
        diag.to_inference_data(42)


# ------------------------------------------------------------------ summary / plots


def test_summary_columns(tiny_lm, arviz_backend):
    hist = {"ess": torch.full((3, B), 30.0), "resampled": torch.tensor([[True, False]] * 3)}
    df = diag.summary(_posterior(tiny_lm, history=hist), warn=False)
    assert isinstance(df, pd.DataFrame) and len(df) == B and df.index.name == "prompt"
    for col in ("num_samples", "ess", "ess_frac", "khat", "log_Z", "log_Z_se", "num_resampled",
                "min_ess_frac"):
        assert col in df.columns
    assert df["num_resampled"].tolist() == [3, 0]
    np.testing.assert_allclose(df["ess_frac"], df["ess"] / N)
    imh = _posterior(tiny_lm, n=40, extras={"num_chains": 2,
                                            "acceptance_rate": torch.tensor([0.5, 0.25])})
    df = diag.summary(imh, warn=False)
    assert df["acceptance_rate"].tolist() == [0.5, 0.25] and (df["num_chains"] == 2).all()
    h = diag.summary(_history())
    assert list(h.columns) == ["num_steps", "num_nan", "first", "last", "mean", "sd", "min",
                               "max"]
    assert h.loc["ess", "num_steps"] == 3 and h.loc["reward", "last"] == pytest.approx(1.0)
    assert (h["num_nan"] == 0).all()


def test_summary_of_a_history_that_diverged_shows_the_nan():
    """A run whose loss became NaN: the summary said last = the last finite loss. Now
    ``last`` is NaN and ``num_nan`` counts the NaN steps; a metric that some steps do not
    record is not counted as NaN there."""
    history = [{"step": 0, "loss": 2.0, "kl": 0.5}, {"step": 1, "loss": 1.0},
               {"step": 2, "loss": float("nan"), "kl": 0.25}]
    h = diag.summary(history)
    assert np.isnan(h.loc["loss", "last"]) and h.loc["loss", "num_nan"] == 1
    assert h.loc["loss", "num_steps"] == 3 and h.loc["loss", "mean"] == pytest.approx(1.5)
    assert h.loc["kl", "num_steps"] == 2 and h.loc["kl", "num_nan"] == 0
    assert h.loc["kl", "last"] == pytest.approx(0.25)


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_return_figures_and_save(tiny_lm, arviz_backend, tmp_path):
    from matplotlib.figure import Figure

    hist = {"ess": torch.rand(4, B) * N, "resampled": torch.tensor([[True, False]] * 4)}
    post = _posterior(tiny_lm, history=hist)
    fig = diag.plot_weights(post, path=tmp_path / "w.png")
    assert isinstance(fig, Figure) and _is_png(tmp_path / "w.png")
    assert "k̂" in fig.axes[0].get_title() or fig.axes[0].get_legend() is not None
    fig = diag.plot_ess(post, path=tmp_path / "e.png")
    assert isinstance(fig, Figure) and _is_png(tmp_path / "e.png")
    fig = diag.plot_training(_history(), path=tmp_path / "t.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 3 and _is_png(tmp_path / "t.png")
    assert len(diag.plot_training(_history(), metrics="kl").axes) == 1
    with pytest.raises(ValueError, match=r"metrics: the history holds no \['rewrad'\]"):
        diag.plot_training(_history(), metrics=("rewrad", "kl"))
    with pytest.raises(ValueError, match="path: the folder .* does not exist"):
        diag.plot_training(_history(), path=tmp_path / "missing" / "t.png")
    single = diag.plot_weights(torch.randn(100))
    assert "k̂ =" in single.axes[0].get_title()
    with pytest.raises(ValueError, match="smc_result"):
        diag.plot_ess(_posterior(tiny_lm))
