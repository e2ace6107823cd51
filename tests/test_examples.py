"""Every example runs in its --tiny mode, and every example is listed here.

Each script in ``examples/`` has ``parse_args(argv)`` and ``main(args)``; the
checks below assert what each tiny run must show, not only that it runs.
"""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

import pyro_lm

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, *extra):
    module = load(name)
    return module, module.main(module.parse_args(["--tiny", "--device", "cpu", *extra]))


def check_demo(module, out, printed, tmp_path):
    assert set(out) == {"SequenceELBO", "DPG", "reward max", "Importance", "SMC"}
    for row in out.values():
        assert math.isfinite(row["reward"]) and 0 <= row["distinct2"] <= 1
    assert math.isfinite(out["SMC"]["log_Z"]) and math.isfinite(out["Importance"]["log_Z"])
    assert "KL(q‖p0)" in printed and "k̂" in printed
    for plot in ("training_SequenceELBO.png", "weights_importance.png", "smc_ess.png"):
        assert (tmp_path / plot).stat().st_size > 0


def check_detoxify(module, out, printed, tmp_path):
    assert out["smc"] == 0.0  # the hard constraint holds on every resampled SMC sample
    assert 0.0 <= out["prior"] <= 1.0 and 0.0 <= out["rl"] <= 1.0
    assert "SMC" in printed and "KL-RL" in printed


def check_sentiment(module, out, printed, tmp_path):
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["after"] <= 1.0
    assert "positive share" in printed


def check_bring_your_own_model(module, out, printed, tmp_path):
    # importance resampling towards a reward that counts words cannot lower the mean reward
    # by more than Monte Carlo noise (32 samples, reward in [0, 6])
    assert out["posterior_reward"] >= out["prior_reward"] - 4 * 6 / math.sqrt(32)
    assert out["model_type"] == "llama"  # --tiny saves a random Llama with the BPE tokenizer
    assert "CausalLM(" in printed


def check_kl_rl(module, out, printed, tmp_path):
    eq = out["equivalence"]
    assert abs(eq["loss"] - eq["exact_loss"]) < 4 * eq["loss_se"]
    for g, se, exact in zip(eq["grad"], eq["grad_se"], eq["exact_grad"], strict=True):
        assert abs(g - exact) < 4 * se
    col = out["collapse"]
    assert col["reward_only"]["end"]["entropy"] < 0.1 * col["reward_only"]["start"]["entropy"]
    assert col["elbo"]["end"]["kl"] < 0.1 * col["elbo"]["start"]["kl"]
    assert col["reward_only"]["end"]["kl"] > col["elbo"]["end"]["kl"]
    assert "equivalence" in printed and "collapse" in printed


def check_gdc_biographies(module, out, printed, tmp_path):
    assert abs(out["fitted_share"] - module.TARGET) < 1e-4  # solved on the samples
    prior_share, prior_se = out["prior_share"]
    imh_share, imh_se = out["imh_share"]
    assert 0 < out["imh_acceptance"] <= 1
    # IMH samples of p0 exp(lambda phi) are within 4 standard errors of the target, plus the
    # fit's own sampling error (its ESS); the prior is far from it
    assert out["fit_ess"] >= 100
    assert abs(imh_share - module.TARGET) < 4 * imh_se + 4 * 0.5 / out["fit_ess"] ** 0.5
    assert abs(prior_share - module.TARGET) > 4 * prior_se + 0.05
    assert 0 <= out["dpg_share"][0] <= 1
    assert "female share" in printed and "lambda" in printed


def check_infilling_smc(module, post, printed, tmp_path):
    from pyro_lm.data import POSITIVE_WORDS

    _check_infilling(post, POSITIVE_WORDS)
    assert "final ESS" in printed and "log Z" in printed


def _check_infilling(post, words):
    alive = torch.isfinite(post.log_weights)
    assert alive.any(0).all()
    for i, row in enumerate(post.text()):
        for b, text in enumerate(row):
            if alive[i, b]:  # a whole word, in any case (subword LMs write prose)
                found = re.findall(r"\w+", text.lower())
                assert any(w in found for w in words), text
    assert torch.isfinite(post.log_normalizer()).all()
    assert (post.log_normalizer() <= 1e-4).all()  # log P(constraints) under the prior


def check_bayesian_reward(module, out, printed, tmp_path):
    assert "max R-hat" in printed and "positive share" in printed
    assert math.isfinite(out["rhat_max"]) and out["fit_seconds"] > 0
    assert out["train_accuracy"] > out["majority"]  # better than the base rate
    assert 0.0 <= out["share_before"] <= 1.0 and 0.0 <= out["share_after"] <= 1.0
    assert 1.0 <= out["ess"] <= out["num_particles"] + 1e-6
    assert math.isfinite(out["log_Z"])


def check_topic_inference(module, out, printed, tmp_path):
    posteriors = out["posteriors"]
    assert set(posteriors) == {"Importance", "SMC", "exact"}
    for p in posteriors.values():
        assert p.shape == (len(module.SENTIMENTS),) and (p >= 0).all()
        assert abs(float(p.sum()) - 1) < 1e-5
    # each sampler's P(z = k) within 4 SNIS standard errors (sqrt((p(1-p) + 1/N) / ESS))
    for name in ("Importance", "SMC"):
        assert 1 <= out["ess"][name] <= out["num_samples"] + 1e-6
        for got, want, tol in zip(posteriors[name].tolist(), posteriors["exact"].tolist(),
                                  out["tolerance"][name], strict=True):
            assert abs(got - want) < tol, (name, got, want, tol)
    # the default review is neutral: the exact posterior says so, against its 0.2 prior
    assert module.SENTIMENTS[int(posteriors["exact"].argmax())] == "neutral"
    assert all(math.isfinite(v) for v in out["log_Z"].values())
    rec = out["recovery"]
    assert rec["n"] == 4 and 0 <= rec["accuracy"] <= 1 and int(rec["confusion"].sum()) == 4
    assert "held-out reviews" in printed
    assert (tmp_path / "out" / "topic_posterior.png").stat().st_size > 0


def check_plan_then_write(module, out, printed, tmp_path):
    for key in ("smc_texts", "guide_texts"):
        assert out[key] and all(isinstance(t, str) and t.startswith(out["prompt"])
                                for t in out[key])
    assert out["prompt"] == "Review:" and out["plan_tokens"] >= 3  # subword LM by default
    for key in ("smc", "guide"):
        assert math.isfinite(out[key]["log_Z"]) and 1 <= out[key]["ess"] <= 32 + 1e-6
    # tilting by exp(r) cannot lower the mean of r: SMC's weighted mean reward is at least
    # the prior's, up to 4 standard errors of the prior mean and SMC's own noise (ESS)
    prior_mean, prior_se = out["prior_reward"]
    assert out["smc"]["reward"] >= prior_mean - 4 * prior_se - 4 * 4 / out["smc"]["ess"] ** 0.5
    assert len(out["svi"]) == 3
    assert all(math.isfinite(m["elbo"]) and math.isfinite(m["kl"]) for m in out["svi"])
    assert math.isfinite(out["svi_elbo_last"])
    assert "log Z" in printed and "ELBO" in printed


CHECKS = {
    "demo": check_demo,
    "detoxify": check_detoxify,
    "sentiment": check_sentiment,
    "bring_your_own_model": check_bring_your_own_model,
    "kl_rl": check_kl_rl,
    "gdc_biographies": check_gdc_biographies,
    "infilling_smc": check_infilling_smc,
    "bayesian_reward": check_bayesian_reward,
    "topic_inference": check_topic_inference,
    "plan_then_write": check_plan_then_write,
}


#: Examples whose --tiny run needs more than one process or belongs with its feature's
#: tests: each is run by the test file named here.
TESTED_ELSEWHERE = {
    "distributed_fit": "tests/test_distributed.py",
    "structured": "tests/constraints/test_structured_example.py",
    "steps": "tests/infer/test_smc_steps.py",
}


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_")}
    untested = scripts - set(CHECKS) - set(TESTED_ELSEWHERE)
    assert not untested, f"add {sorted(untested)} to CHECKS"
    root = EXAMPLES_DIR.parent
    for name in scripts & set(TESTED_ELSEWHERE):
        test_file = root / TESTED_ELSEWHERE[name]
        ran = re.search(rf"examples/{name}\.py|import {name}\b|\"{name}\.py\"",
                        test_file.read_text()) if test_file.exists() else None
        assert ran, f"{TESTED_ELSEWHERE[name]} must run examples/{name}.py"


# a 60-draw NUTS fit in --tiny mode need not converge: its R-hat warning is expected
@pytest.mark.filterwarnings("ignore:.*R-hat:UserWarning")
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_runs_tiny(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ("--out", str(tmp_path)) if name == "demo" else ()
    module, out = run(name, *extra)
    CHECKS[name](module, out, capsys.readouterr().out, tmp_path)


def test_infilling_smc_falls_back_to_a_toy_lm(monkeypatch, capsys):
    def missing(name="tinylm"):
        raise FileNotFoundError(name)

    monkeypatch.setattr(pyro_lm, "bundled_model_path", missing)
    _, post = run("infilling_smc")
    _check_infilling(post, ["t5", "t6"])
    assert "final ESS" in capsys.readouterr().out
