"""Token-level SMC against exact enumeration (vocab 4, T 3).

Unbiasedness of :math:`\\hat Z` is checked on many independent SMC runs at once:
a plate of ``R`` identical prompts is ``R`` independent particle systems
(resampling is per prompt).
"""

import math

import pyro
import pytest
import torch
from checks import exact_chi2_pvalue

import pyro_lm
from pyro_lm.distributions.prefix import counted_mask, is_complete
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import SMC, AutoLMGuide
from pyro_lm.infer.resampling import multinomial_resample, systematic_resample
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import Callable, Lexicon, TokenCounts

pytestmark = pytest.mark.filterwarnings("ignore:.*not registered in the param store")

T = 3
BETA = 1.0


def make_model(lm, batched=True):
    reward = Lexicon(lm.tokenizer, {"t1": 1.0, "t3": -1.0})

    def model(prompts):
        if not batched:
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.factor("reward", reward(x) / BETA)
            return x
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.factor("reward", reward(x) / BETA)
        return x

    return model


def constrained_model(lm, reward):
    """A batch of prompts, each completion weighed by the (possibly -inf) ``reward``."""
    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            pyro.factor("constraint", reward(x))

    return model


def assert_unbiased_per_prompt(post, exact_log_z):
    """Replicates of ``len(exact_log_z)`` prompts, cycled: for each prompt the mean of
    Z_hat / Z over its replicates is within 4 standard errors of 1."""
    k = exact_log_z.numel()
    log_z = post.log_normalizer().reshape(-1, k)
    for j in range(k):
        ratio = (log_z[:, j] - exact_log_z[j].to(log_z.device)).exp()
        se = ratio.std() / math.sqrt(ratio.numel())
        assert abs(ratio.mean() - 1) < 4 * se, (j, ratio.mean(), se)


def assert_unbiased(post, exact_log_z):
    """Mean of Z_hat / Z over independent replicates (the batch) within 4 SE of 1."""
    ratio = (post.log_normalizer() - exact_log_z.to(post.log_weights.device)).exp().reshape(-1)
    se = ratio.std() / math.sqrt(ratio.numel())
    assert abs(ratio.mean() - 1) < 4 * se, (ratio.mean(), se)


def optimal_twist(exact):
    """psi_t(x_{<=t}) = log E_{p0}[exp(f(x)) | x_{<=t}], from the enumerated support."""
    support, log_joint, log_prior = exact.support, exact.log_joint, exact.log_prior

    def twist(x, t):
        # x: (N, *batch, T); support: (n, *batch, T)
        match = (x[:, None, ..., :t] == support[None, ..., :t]).all(-1)  # (N, n, *batch)
        minus_inf = torch.tensor(-math.inf, device=x.device)
        joint = torch.where(match, log_joint, minus_inf).logsumexp(1)
        prefix = torch.where(match, log_prior, minus_inf).logsumexp(1)
        return joint - prefix

    return twist


@pytest.mark.parametrize("use_guide", [False, True])
def test_z_unbiased(prior, guide_lm, use_guide):
    model = make_model(prior)
    prompts = ["t1", "t2 t3"] * 150  # 300 independent SMC runs, prompts of two lengths
    exact = enumerate_model(model, prompts[:2])
    guide = AutoLMGuide(model, guide_lm) if use_guide else None
    post = SMC(model, guide, num_particles=16).run(prompts)
    assert post.log_weights.shape == (16, 300)
    assert post.samples["x"].shape == (16, 300, T)
    assert post.history["resampled"].any(), "the test should exercise resampling"
    assert_unbiased_per_prompt(post, exact.log_Z)


@pytest.mark.parametrize("resampling", ["systematic", "multinomial"])
def test_always_resampling_unbiased(tiny_lm, resampling):
    model = make_model(tiny_lm)
    prompts = torch.zeros(300, 1, dtype=torch.long)
    exact = enumerate_model(model, prompts[:1])
    post = SMC(model, num_particles=16, ess_threshold=1.0, resampling=resampling).run(prompts)
    assert post.history["resampled"][:-1].float().mean() > 0.5
    assert not post.history["resampled"][-1].any()  # never after the last token
    assert_unbiased(post, exact.log_Z)


def test_weights_telescope_exactly(prior, guide_lm):
    """Without resampling, any twist cancels: log w = log p0(x) + f(x) - log q(x) exactly."""
    model = make_model(prior)
    prompts = ["t1", "t2 t3"]

    def twist(x, t):
        return 0.7 * ((x == 1) & counted_mask(x, 0)).sum(-1).float() - 0.3 * t

    guide = AutoLMGuide(model, guide_lm)
    post = SMC(model, guide, num_particles=64, ess_threshold=0.0, twist=twist).run(prompts)
    x = post.samples["x"]
    dist = pyro_lm.LMDistribution(prior, prompts, T)
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})
    expected = dist.log_prob(x) + reward(x) / BETA - dist.with_lm(guide_lm).log_prob(x)
    torch.testing.assert_close(post.log_weights, expected, atol=1e-4, rtol=1e-4)
    assert not post.history["resampled"].any()


def test_observed_scaled_and_masked_sites_enter_the_weights(prior):
    """Every observed site counts, with its poutine.scale and mask: with the prior as the
    proposal and no resampling, log w is exactly the sum of the (scaled, masked) factors."""
    import pyro.distributions as dist
    import pyro.poutine as poutine

    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})
    keep = torch.tensor([True, False])

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, T))
            r = reward(x)
            with poutine.scale(scale=0.5):
                pyro.factor("half", r)
            with poutine.mask(mask=keep):
                pyro.factor("masked", 2.0 * r)
            pyro.sample("y", dist.Normal(r, 1.0), obs=torch.tensor([0.3, -0.2]))

    prompts = ["t1", "t2 t3"]
    post = SMC(model, num_particles=32, ess_threshold=0.0).run(prompts)
    r = reward(post.samples["x"])
    expected = (0.5 * r + torch.where(keep, 2.0 * r, 0.0)
                + dist.Normal(r, 1.0).log_prob(torch.tensor([0.3, -0.2])))
    torch.testing.assert_close(post.log_weights, expected, atol=1e-5, rtol=1e-5)


def test_optimal_twist_unbiased(prior):
    """The optimal twist psi_t = log E[exp f | x_<=t] (from enumeration): Z_hat unbiased."""
    model = make_model(prior)
    prompts = torch.zeros(300, 1, dtype=torch.long, device=prior.device)
    exact = enumerate_model(model, prompts)
    post = SMC(model, num_particles=16, twist=optimal_twist(exact)).run(prompts)
    assert_unbiased(post, exact.log_Z)
    # at t = 0 the optimal potential is log Z itself
    torch.testing.assert_close(optimal_twist(exact)(post.samples["x"], 0), exact.log_Z.expand(
        16, 300), atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_guide", [False, True])
def test_crude_twist_unbiased(tiny_lm, use_guide):
    """Any twist (here a noisy guess) leaves the final weights exact."""
    model = make_model(tiny_lm)
    prompts = torch.zeros(300, 1, dtype=torch.long)
    exact = enumerate_model(model, prompts[:1])

    def twist(x, t):
        return 0.7 * ((x == 1) & counted_mask(x, 0)).sum(-1).float() - 0.3 * t

    guide = AutoLMGuide(model, toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=2,
                                      init_std=0.1)) if use_guide else None
    post = SMC(model, guide, num_particles=16, twist=twist).run(prompts)
    assert_unbiased(post, exact.log_Z)


def test_resampled_population_matches_posterior(tiny_lm):
    """Chi-square goodness of fit of post.resample draws to the exact p* (p = 1e-3)."""
    model = make_model(tiny_lm, batched=False)
    exact = enumerate_model(model, "t2")
    post = SMC(model, num_particles=20000).run("t2")
    draws = post.resample(2000)["x"]
    assert exact_chi2_pvalue(exact, draws) > 1e-3


def test_hard_constraint_at_end(tiny_lm):
    """-inf on completed sequences without token t1: weights target the constrained p*."""
    def has_t1(x):
        ok = ((x == 1) & counted_mask(x, 0)).any(-1) | ~is_complete(x, 0)
        return torch.where(ok, 0.0, -math.inf)

    reward = Callable(has_t1)

    model = constrained_model(tiny_lm, reward)
    prompts = torch.zeros(300, 1, dtype=torch.long)  # 300 independent replicates
    exact = enumerate_model(model, prompts[:1])
    post = SMC(model, num_particles=16).run(prompts)
    x = post.samples["x"]
    alive = torch.isfinite(post.log_weights)
    assert ((x == 1).any(-1) | ~alive).all()
    assert_unbiased(post, exact.log_Z)


def test_single_prompt_shapes_and_history(tiny_lm):
    model = make_model(tiny_lm, batched=False)
    post = SMC(model, num_particles=8, ess_threshold=0.9).run("t1")
    assert post.log_weights.shape == (8,)
    assert post.samples["x"].shape == (8, T)
    steps = post.history["ess"].shape[0]
    assert 1 <= steps <= T
    assert post.history["resampled"].dtype == torch.bool
    assert post.history["resampled"].shape == (steps,)
    torch.testing.assert_close(post.history["log_Z"][-1], post.log_normalizer())
    assert isinstance(post.text()[0], str)


def test_resamplers_keep_expected_counts():
    torch.manual_seed(0)
    log_w = torch.tensor([[0.0, -math.inf], [math.log(3.0), 0.0], [-math.inf, 0.0],
                          [0.0, -math.inf]])  # (N=4, B=2)
    for fn in (systematic_resample, multinomial_resample):
        idx = fn(log_w)
        assert idx.shape == (4, 2)
        assert not (idx[:, 0] == 2).any() and not (idx[:, 1] == 0).any()
        assert not (idx[:, 1] == 3).any()
    # systematic: counts within one of N * w
    idx = systematic_resample(log_w)
    assert (idx[:, 0] == 1).sum() in (2, 3) and (idx[:, 1] == 1).sum() in (2, 3)


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"num_particles": 0}, ValueError, "num_particles"),
    ({"ess_threshold": 1.5}, ValueError, "ess_threshold"),
    ({"ess_threshold": -0.1}, ValueError, "ess_threshold"),
    ({"resampling": "stratified-ish"}, ValueError, "resampling"),
    ({"resampling": ["systematic"]}, ValueError, "resampling: expected one of"),
    ({"twist": 3.0}, TypeError, "twist"),
    ({"guide": lambda p: None}, TypeError, "guide"),
])
def test_bad_arguments(tiny_lm, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SMC(make_model(tiny_lm), **kwargs)


def test_bad_models(tiny_lm):
    with pytest.raises(ValueError, match="prompts"):
        SMC(make_model(tiny_lm), num_particles=4).run([])

    def two_sites(prompt):
        pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompt, T))
        pyro.sample("y", pyro_lm.LMDistribution(tiny_lm, prompt, T))

    # a program of two LM sites is SMC over a program: no factor, so every weight is 0
    post = SMC(two_sites, num_particles=4).run("t1")
    assert sorted(post.samples) == ["x", "y"] and bool((post.log_weights == 0).all())
    with pytest.raises(ValueError, match="twist=None and lookahead=None"):
        SMC(two_sites, num_particles=4, lookahead="full").run("t1")

    def bad_twist(x, t):
        return torch.zeros(3)

    with pytest.raises(ValueError, match="twist"):
        SMC(make_model(tiny_lm, batched=False), num_particles=4, twist=bad_twist).run("t1")
    for out, message in ((None, "returned NoneType"), ("s", "returned str"),
                         (torch.zeros(4, dtype=torch.complex64), "returned a complex tensor")):
        with pytest.raises(TypeError, match=f"twist: {message}"):
            SMC(make_model(tiny_lm, batched=False), num_particles=4,
                twist=lambda x, t, out=out: out).run("t1")


# ----------------------------------------------------------------------------- lookahead
@pytest.mark.parametrize("lookahead", ["full", 2])
@pytest.mark.parametrize("use_guide", [False, True])
def test_lookahead_z_unbiased(prior, guide_lm, lookahead, use_guide):
    """The lookahead proposal (exact weights for any k): Z_hat unbiased, with resampling."""
    model = make_model(prior)
    prompts = ["t1", "t2 t3"] * 150
    exact = enumerate_model(model, prompts[:2])
    guide = AutoLMGuide(model, guide_lm) if use_guide else None
    # lookahead weights vary less: resample whenever the ESS is below 0.9 N
    post = SMC(model, guide, num_particles=16, ess_threshold=0.9,
               lookahead=lookahead).run(prompts)
    assert post.history["resampled"].any(), "the test should exercise resampling"
    assert_unbiased_per_prompt(post, exact.log_Z)


@pytest.mark.parametrize("lookahead", ["full", 2])
def test_lookahead_resampled_population_matches_posterior(tiny_lm, lookahead):
    """Chi-square goodness of fit of resampled lookahead-SMC draws to p* (p = 1e-3)."""
    model = make_model(tiny_lm, batched=False)
    exact = enumerate_model(model, "t2")
    post = SMC(model, num_particles=20000, lookahead=lookahead).run("t2")
    draws = post.resample(2000)["x"]
    assert exact_chi2_pvalue(exact, draws) > 1e-3


def test_full_lookahead_one_token_weights_are_log_z(prior):
    """T = 1, prior proposal, "full": r = p* exactly, so every log-weight is log Z."""
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, 1))
            pyro.factor("reward", reward(x) / BETA)

    prompts = ["t1", "t2 t3"]
    exact = enumerate_model(model, prompts)
    post = SMC(model, num_particles=32, lookahead="full").run(prompts)
    expected = exact.log_Z.to(post.log_weights.device).expand(32, 2)
    torch.testing.assert_close(post.log_weights, expected, atol=1e-5, rtol=0)


def test_full_lookahead_with_optimal_twist_is_perfect(prior):
    """With the optimal twist psi_t = log E[exp f | x_<=t] the lookahead proposal is
    p*(x_t | x_<t): every increment after the first is 0 and every log-weight is log Z."""
    model = make_model(prior)
    prompts = torch.zeros(4, 1, dtype=torch.long, device=prior.device)
    exact = enumerate_model(model, prompts)
    post = SMC(model, num_particles=64, twist=optimal_twist(exact), lookahead="full").run(prompts)
    expected = exact.log_Z.to(post.log_weights.device).expand(64, 4)
    torch.testing.assert_close(post.log_weights, expected, atol=1e-4, rtol=0)
    assert not post.history["resampled"].any()  # equal weights: ESS = N
    # the samples follow p* (4 identical prompts: 256 draws of one posterior)
    one = enumerate_model(make_model(prior, batched=False), prompts[0])
    assert exact_chi2_pvalue(one, post.samples["x"].reshape(-1, T)) > 1e-3


@pytest.mark.parametrize("lookahead", ["full", 2])
def test_lookahead_hard_constraint(tiny_lm, lookahead):
    """A forbidden word (weight -inf, monotone in the prefix): "full" never proposes it;
    with k = 2 a forbidden token outside the top-k may be drawn and kills its particle
    (weight -inf, never NaN). Z_hat stays unbiased for the constrained Z."""
    reward = Lexicon(tiny_lm.tokenizer, {"t3": -math.inf, "t1": 1.0})

    model = constrained_model(tiny_lm, reward)
    prompts = torch.zeros(300, 1, dtype=torch.long)  # 300 independent replicates
    exact = enumerate_model(model, prompts[:1])
    post = SMC(model, num_particles=16, lookahead=lookahead).run(prompts)
    x, log_w = post.samples["x"], post.log_weights
    assert not torch.isnan(log_w).any()
    has_t3 = ((x == 3) & counted_mask(x, 0)).any(-1)
    assert torch.isneginf(log_w[has_t3]).all()
    if lookahead == 2:
        assert has_t3.any(), "the test should exercise a forbidden token outside the top-k"
    else:
        assert not has_t3.any() and torch.isfinite(log_w).all()
    assert_unbiased(post, exact.log_Z)


@pytest.mark.parametrize("lookahead", [None, "full", 2])
def test_minus_inf_everywhere_raises_with_lookahead(tiny_lm, lookahead):
    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompt, T))
        pyro.factor("impossible", torch.full(x.shape[:-1], -math.inf))

    with pytest.raises(ValueError, match="weight zero") as info:
        SMC(model, num_particles=8, lookahead=lookahead).run("t1")
    assert "nan" not in str(info.value).lower()


@pytest.mark.parametrize("bad", [0, -1, True, "partial", 1.5])
def test_bad_lookahead(tiny_lm, bad):
    with pytest.raises(ValueError, match="lookahead"):
        SMC(make_model(tiny_lm), lookahead=bad)


@pytest.mark.parametrize("lookahead", ["full", 3])
def test_lookahead_budget_refuses_large_runs(tiny_lm, lookahead):
    """The candidate buffer (8 C N B T bytes: C = V = 4 or k = 3, N = 8, B = 1, T = 3) is
    checked against lookahead_budget before the run; the message names lookahead=k."""
    model = make_model(tiny_lm, batched=False)
    need = 8 * (4 if lookahead == "full" else 3) * 8 * T
    with pytest.raises(ValueError, match=r"lookahead=.*lookahead_budget=.*use lookahead=k"):
        SMC(model, num_particles=8, lookahead=lookahead, lookahead_budget=need - 1).run("t1")
    post = SMC(model, num_particles=8, lookahead=lookahead, lookahead_budget=need).run("t1")
    assert torch.isfinite(post.log_weights).all()
    with pytest.raises(ValueError, match="lookahead_budget"):
        SMC(model, lookahead="full", lookahead_budget=0)


def test_outputs_work_with_autograd(tiny_lm):
    """The loop runs in inference mode; what it returns must be ordinary tensors."""
    model = make_model(tiny_lm, batched=False)
    post = SMC(model, num_particles=8).run("t1")
    tensors = [post.samples["x"], post.log_weights, post.log_normalizer(),
               *post.history.values()]
    assert not any(v.is_inference() for v in tensors)
    policy = tiny_lm.trainable_copy()
    loss = -pyro_lm.LMDistribution(policy, "t1", T).log_prob(post.samples["x"]).mean()
    loss.backward()
    assert any(p.grad is not None for p in policy.parameters())


def test_systematic_never_picks_zero_weight_at_the_edge(monkeypatch):
    """Weights whose float32 cumsum ends below 1, the uniform at its largest value: the
    last pointer lies past the total; the dead last particle must not be picked."""
    log_w = torch.tensor([1.0372735, -2.6250439, 0.3839901, 1.0855427, -math.inf])[:, None]
    assert torch.softmax(log_w[:, 0], 0).cumsum(0)[-1] < 1  # the rounding this test needs
    largest = 1.0 - 2.0**-24  # torch.rand's largest float32 value

    def rand(size, **kwargs):
        return torch.full(size, largest, dtype=kwargs.get("dtype"), device=kwargs.get("device"))

    monkeypatch.setattr(torch, "rand", rand)
    index = systematic_resample(log_w)
    assert (index < 4).all(), index.flatten()


def test_prompt_cache_reuses_only_unchanged_prompts(tiny_lm):
    from pyro_lm.distributions.lm_distribution import prompt_cache

    prompts = torch.tensor([[1, 2]])
    with prompt_cache():
        first = pyro_lm.LMDistribution(tiny_lm, prompts, T)
        again = pyro_lm.LMDistribution(tiny_lm, prompts, T)
        assert again.prompt_ids is first.prompt_ids  # prepared once
        prompts[0, 1] = 3  # changed in place: prepared again
        changed = pyro_lm.LMDistribution(tiny_lm, prompts, T)
        assert changed.prompt_ids.tolist() == [[1, 3]]
        text = [pyro_lm.LMDistribution(tiny_lm, ["t1", "t2"], T) for _ in range(2)]
        assert text[1].prompt_ids is text[0].prompt_ids
    outside = pyro_lm.LMDistribution(tiny_lm, ["t1", "t2"], T)
    assert outside.prompt_ids is not text[0].prompt_ids
    torch.testing.assert_close(outside.prompt_ids, text[0].prompt_ids)


@pytest.mark.parametrize("inference", [False, True])
def test_prompt_cache_reuses_prompt_with_only_while_nothing_changed(tiny_lm, inference):
    """Within the cache ``prompt_with`` of the same distribution and value objects returns
    the same prompt objects (whose preparation the next LMDistribution then skips); a
    value or result changed in place since (an inference tensor: by content) is redone."""
    from pyro_lm.distributions.lm_distribution import prompt_cache

    first = pyro_lm.LMDistribution(tiny_lm, torch.tensor([[1, 2]]), T)
    with torch.inference_mode(inference):
        value = torch.tensor([[3, 0, 0]])
    with prompt_cache():
        ids, mask = first.prompt_with(value)
        again = first.prompt_with(value)
        assert again[0] is ids and again[1] is mask
        second = pyro_lm.LMDistribution(tiny_lm, ids, T, attention_mask=mask)
        assert second.prompt_ids is pyro_lm.LMDistribution(tiny_lm, ids, T,
                                                           attention_mask=mask).prompt_ids
        with torch.inference_mode(inference):
            value[0, 1] = 2  # the completion changed in place: redone
        changed, _ = first.prompt_with(value)
        assert changed is not ids and changed.tolist() == [[0, 1, 2, 3, 2]]  # EOS 0 dropped
        changed[0, 1] = 3  # the result changed in place by its user: redone
        assert first.prompt_with(value)[0].tolist() == [[0, 1, 2, 3, 2]]
        assert first.prompt_with(value, keep_eos=True)[0].tolist() == [[1, 2, 3, 2, 0]]
    outside = first.prompt_with(value)
    assert outside[0].tolist() == [[0, 1, 2, 3, 2]]


@pytest.fixture
def scored_rows(monkeypatch):
    """The number of rows each LM forward pass of ``token_log_probs`` scores, in order."""
    from pyro_lm.distributions.lm_distribution import LMDistribution

    seen, score = [], LMDistribution._token_log_probs_rows

    def counting(self, x, *args, **kwargs):
        seen.append(x.shape[0])
        return score(self, x, *args, **kwargs)

    monkeypatch.setattr(LMDistribution, "_token_log_probs_rows", counting)
    return seen


def test_prompt_cache_scores_each_distinct_row_once(tiny_lm, scored_rows):
    """Without gradients, inside the cache, a row (prompt and completion) is scored once:
    duplicates, a permutation of the rows (resampling) and a second call reuse the scores,
    which equal those computed outside the cache; a new row alone is scored."""
    from pyro_lm.distributions.lm_distribution import prompt_cache

    d = pyro_lm.LMDistribution(tiny_lm, torch.tensor([[1], [2]]), T)
    value = torch.tensor([[[1, 2, 0], [3, 0, 0]], [[1, 2, 0], [3, 0, 0]],
                          [[2, 2, 2], [3, 0, 0]]])  # (3, 2, T): 3 distinct rows
    with torch.no_grad():
        expected = d.token_log_probs(value)
        permuted = value.flip(0)
        expected_permuted = d.token_log_probs(permuted)
        del scored_rows[:]
        with prompt_cache():
            torch.testing.assert_close(d.token_log_probs(value), expected)
            assert sum(scored_rows) == 3
            torch.testing.assert_close(d.token_log_probs(permuted), expected_permuted)
            torch.testing.assert_close(d.log_prob(value), expected.sum(-1))
            assert sum(scored_rows) == 3
            again = pyro_lm.LMDistribution(tiny_lm, torch.tensor([[1], [2]]), T)
            fresh = value.clone()
            fresh[0, 0] = torch.tensor([1, 1, 0])  # one new row
            torch.testing.assert_close(again.token_log_probs(fresh), d.token_log_probs(fresh))
            assert sum(scored_rows) == 4
    assert d.token_log_probs(value).requires_grad is False


def test_prompt_cache_scores_again_when_the_lm_changes(scored_rows):
    """The scores follow the LM: a parameter changed in place (an optimiser step), the
    training mode (dropout) and gradients (a graph to keep) each score the rows anew."""
    from pyro_lm.distributions.lm_distribution import prompt_cache

    lm = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    d = pyro_lm.LMDistribution(lm, torch.tensor([[1]]), T)
    value = torch.tensor([[1, 2, 0], [3, 0, 0]])
    with prompt_cache():
        with torch.no_grad():
            before = d.log_prob(value)
            d.log_prob(value)
            assert sum(scored_rows) == 2
            weight = next(lm.model.parameters())
            weight.add_(torch.randn_like(weight))  # in place, as an optimiser step does
            after = d.log_prob(value)
            assert sum(scored_rows) == 4 and not torch.allclose(after, before)
            lm.model.train()
            d.log_prob(value)
            assert sum(scored_rows) == 6
            lm.model.eval()
        lm.requires_grad_(True)
        with_grad = d.log_prob(value)
        assert with_grad.requires_grad and sum(scored_rows) == 8
        torch.testing.assert_close(with_grad.detach(), after)


def test_smc_scores_an_observed_text_once_per_distinct_prompt(tiny_lm, scored_rows):
    """SMC over a program whose observed text tells which latent prompt it came from
    re-runs the program after every token, on resampled particles: the text is scored once
    per distinct prompt, and the run is the one whose scores are all computed afresh
    (the cache emptied at every call)."""
    from pyro_lm.distributions import lm_distribution

    prompts, text = torch.tensor([[1], [2], [3]]), torch.tensor([3, 1, 0])

    def model():
        z = pyro.sample("z", pyro.distributions.Categorical(logits=torch.zeros(3)))
        pyro.sample("obs", pyro_lm.LMDistribution(tiny_lm, prompts[z], T), obs=text)
        x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompts[z], T))
        pyro.factor("r", (x == 2).sum(-1).float())

    smc = SMC(model, num_particles=64, ess_threshold=1.0)
    pyro.set_rng_seed(3)
    post = smc.run()
    assert sum(scored_rows) <= 3
    assert post.history["resampled"].any()  # the particles were copied
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lm_distribution, "ROW_SCORES_LIMIT", 0)  # keep none: score every row
        pyro.set_rng_seed(3)
        fresh = smc.run()
    assert sum(scored_rows) > 64 * T
    torch.testing.assert_close(post.log_normalizer(), fresh.log_normalizer())
    torch.testing.assert_close(post.log_weights, fresh.log_weights)


def test_a_partial_run_may_stop_after_its_last_observed_site(tiny_lm):
    """With stop_early, a partial run ends at the observed site after which the last
    partial run with the same held sites found nothing else before its end: the work
    after it (the next site's prompt) is skipped, the sum is the same; without it, or in
    a complete run, the model runs to its end."""
    from pyro_lm.poutine import LogFactorsMessenger

    built = []

    def model():
        first = pyro_lm.LMDistribution(tiny_lm, "t1", T)
        x1 = pyro.sample("x1", first)
        pyro.factor("r1", (x1 == 2).sum(-1).float())
        built.append(1)  # the next site's prompt, built from x1
        ids, mask = first.prompt_with(x1)
        x2 = pyro.sample("x2", pyro_lm.LMDistribution(tiny_lm, ids, T, attention_mask=mask))
        pyro.factor("r2", (x2 == 3).sum(-1).float())

    factors = LogFactorsMessenger(model, None, torch.Size(()), owner="SMC", partial=True)
    x1, x2 = torch.tensor([[2, 2, 0], [1, 0, 0]]), torch.tensor([[3, 0, 0], [3, 3, 3]])
    totals = [factors.evaluate_values({"x1": x1}, stop_early=True) for _ in range(3)]
    assert len(built) == 1 and all(torch.equal(t, totals[0]) for t in totals)
    assert totals[0].tolist() == [2.0, 0.0]
    factors.evaluate_values({"x1": x1})
    assert len(built) == 2
    complete = factors.evaluate_values({"x1": x1, "x2": x2}, stop_early=True)
    assert len(built) == 3 and complete.tolist() == [3.0, 3.0]


def test_prompt_cache_keeps_a_bounded_number_of_entries(tiny_lm):
    """Prompts new at every token (a program's second prompt built from the prefix) do not
    pile up: the least recently used entries go, and a kept one is still reused."""
    from pyro_lm.distributions.lm_distribution import PROMPT_CACHE_SIZE, prompt_cache

    old = torch.tensor([[2, 1]])
    with prompt_cache():
        kept = pyro_lm.LMDistribution(tiny_lm, "t1", T)
        dropped = pyro_lm.LMDistribution(tiny_lm, old, T)
        assert pyro_lm.LMDistribution(tiny_lm, old, T).prompt_ids is dropped.prompt_ids
        for i in range(3 * PROMPT_CACHE_SIZE):
            pyro_lm.LMDistribution(tiny_lm, torch.tensor([[1, 2, 3]]), T)
            if i % 8 == 0:  # used again: stays
                assert pyro_lm.LMDistribution(tiny_lm, "t1", T).prompt_ids is kept.prompt_ids
        again = pyro_lm.LMDistribution(tiny_lm, old, T)
        assert again.prompt_ids is not dropped.prompt_ids  # prepared anew
        assert again.prompt_ids.tolist() == [[2, 1]]


def test_model_building_prompt_tensors_inside(tiny_lm):
    """A model that makes its prompt tensor itself (an inference tensor inside SMC's loop)."""
    def model(n):
        prompts = torch.ones(n, 1, dtype=torch.long)
        with pyro.plate("prompts", n):
            x = pyro.sample("x", pyro_lm.LMDistribution(tiny_lm, prompts, T))
            pyro.factor("reward", (x == 1).sum(-1).float())

    post = SMC(model, num_particles=4, lookahead="full").run(3)
    assert post.log_weights.shape == (4, 3)


@pytest.mark.parametrize("lookahead", [None, 2])
@pytest.mark.parametrize("batched", [False, True])
def test_run_keeps_no_state_and_is_reentrant(tiny_lm, batched, lookahead):
    # a twist that runs SMC on other prompts, once, from inside a run: with the same SMC
    # object (re-entrant) and with a second one, the same draws give the same results
    model = make_model(tiny_lm, batched=batched)
    prompts, others = (["", "t1"], ["t2"]) if batched else ("", "t2")

    def nesting(inner_smc):
        inner = {}

        def twist(x, t):
            if t == 1 and "post" not in inner:
                inner["post"] = None  # the inner run calls this twist too
                inner["post"] = inner_smc().run(others)
            return torch.zeros(x.shape[:-1], device=x.device)

        return twist, inner

    options = dict(num_particles=6, ess_threshold=0.9, lookahead=lookahead)
    twist_a, inner_a = nesting(lambda: smc_a)
    smc_a = SMC(model, twist=twist_a, **options)
    twist_b, inner_b = nesting(lambda: SMC(model, twist=lambda x, t: torch.zeros(x.shape[:-1]),
                                          **options))
    smc_b = SMC(model, twist=twist_b, **options)
    before = dict(vars(smc_a))
    pyro.set_rng_seed(0)
    post_a = smc_a.run(prompts)
    pyro.set_rng_seed(0)
    post_b = smc_b.run(prompts)
    assert vars(smc_a).keys() == before.keys()
    assert all(vars(smc_a)[k] is v for k, v in before.items())
    for a, b in ((post_a, post_b), (inner_a["post"], inner_b["post"])):
        assert a.algorithm == "SMC"
        torch.testing.assert_close(a.samples["x"], b.samples["x"])
        torch.testing.assert_close(a.log_weights, b.log_weights)
        for key in ("ess", "resampled", "log_Z"):
            torch.testing.assert_close(a.history[key], b.history[key])


# ------------------------------------------------------------------- SMC over a program
def test_program_smc_resampling_moves_earlier_sites_with_their_particles(tiny_lm):
    """Two chained LM sites and a reward on both, resampled at every token: log Z-hat stays
    unbiased and the first site's posterior marginal is exact, which fails if its values
    were not reordered with the particles (and their KV caches)."""

    def model():
        first = pyro_lm.LMDistribution(tiny_lm, "t1", 2)  # its first token is 3 w.p. 0.95
        x1 = pyro.sample("x1", first)
        pyro.factor("plan", 3.0 * (x1[..., 0] == 1).float())  # seen while x1 is decoded
        ids, mask = first.prompt_with(x1)
        x2 = pyro.sample("x2", pyro_lm.LMDistribution(tiny_lm, ids, 2, attention_mask=mask))
        pyro.factor("text", (x2[..., 0] == x1[..., 0]).float())

    exact = enumerate_model(model)
    values, probs = exact.marginal("x1")
    expected = (probs * (values[:, 0] == 1).double()).sum()
    smc = SMC(model, num_particles=128, ess_threshold=1.0)
    runs = [smc.run() for _ in range(60)]
    # resampled while x1 is decoded (its first step), so x2 is decoded from moved particles
    assert sum(bool(r.history["resampled"][0].all()) for r in runs) >= 50
    z_hat = torch.stack([(r.log_normalizer() - exact.log_Z).exp() for r in runs]).double()
    assert abs(z_hat.mean() - 1) < 4 * z_hat.std() / math.sqrt(len(runs))
    means = torch.stack([(r.normalized_weights().double() * (r.samples["x1"][:, 0] == 1))
                         .sum() for r in runs])
    mean = (z_hat * means).sum() / z_hat.sum()
    se = ((z_hat**2 * (means - mean) ** 2).sum()).sqrt() / z_hat.sum()
    assert abs(mean - expected) < 4 * se + 1e-3, (mean, expected, se)


def test_program_smc_scores_a_finished_site_as_a_completion(tiny_lm):
    """While x2 is decoded, x1's factor sees the whole of x1 (the program runs in the
    prefix context only from x2's sample statement on): with no resampling and no factor
    on x2, the running log Z-hat keeps x1's final value through x2's tokens instead of
    re-counting x1 as a prefix of x2's length."""
    reward = TokenCounts(tiny_lm, {2: 1.0, 3: 0.5})

    def model():
        first = pyro_lm.LMDistribution(tiny_lm, "t1", 3)
        x1 = pyro.sample("x1", first)
        pyro.factor("r1", reward(x1))
        ids, mask = first.prompt_with(x1)
        pyro.sample("x2", pyro_lm.LMDistribution(tiny_lm, ids, 3, attention_mask=mask))

    post = SMC(model, num_particles=8, ess_threshold=0.0).run()
    log_z = post.history["log_Z"].reshape(-1)
    assert log_z.shape == (6,)
    assert torch.equal(log_z[3:], log_z[2].expand(3)), log_z
    assert torch.allclose(post.log_normalizer(), log_z[2])
