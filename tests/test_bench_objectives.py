"""bench/objectives.py runs in its --quick mode (timings are not checked): it prints its
tables and verdicts against the current API and leaves bench/RESULTS.md alone. The
estimators of its section (c), which has no enumeration to lean on, are checked where
there is one: on section (a)'s toy problem (121 completions) the reference's log Z, the
guide-sample KL(q||p*), the reference-particle KL(p*||q) and q(E) agree with
pyro_lm.exact within 4 standard errors, for the prior and for a perturbed guide."""

import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import AutoLMGuide

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import objectives  # noqa: E402


def test_objectives_quick_run(tmp_path):
    results = (BENCH / "RESULTS.md").read_bytes()
    plot = tmp_path / "objectives.png"
    proc = subprocess.run([sys.executable, str(BENCH / "objectives.py"), "--quick",
                           "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("| TB(+SMC replay) |", "| SubTB(+SMC replay) |", "| SubTB |",
                 "| DPG(smc) less SMC.run |", "DPG(smc) exact KL(p*‖q)", "SubTB exact KL(q‖p*)",
                 "|---|"):
        assert text in proc.stdout, text
    assert plot.stat().st_size > 1000  # a PNG was written
    assert (BENCH / "RESULTS.md").read_bytes() == results


@pytest.mark.parametrize("perturb", [0.0, 0.3])
def test_estimates_match_enumeration(perturb):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    prior, model, prompts = objectives.sparse_problem()
    exact = enumerate_model(model, prompts)
    policy = prior.trainable_copy()
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    guide = AutoLMGuide(model, policy)
    ref = objectives.reference(model, prompts, objectives.toy_event, runs=8, particles=256)
    kl_pq, kl_qp, q_event, kl_pq_se, kl_qp_se, q_event_se = objectives.estimate(
        ref, model, prompts, objectives.toy_event, 2048, guide)
    log_z = exact.log_Z.sum().item()
    assert abs(ref.log_z - log_z) < 4 * ref.log_z_se
    assert abs(kl_qp - exact.kl_q_p(policy).sum().item()) < 4 * math.hypot(kl_qp_se, ref.log_z_se)
    # self-normalised: an O(1/N) bias on top of the run-to-run error
    assert abs(kl_pq - exact.kl_p_q(policy).sum().item()) < 4 * math.hypot(kl_pq_se,
                                                                            ref.log_z_se) + 0.02
    with torch.no_grad():
        support = exact.support
        q_true = (pyro_lm.LMDistribution(policy, prompts, objectives.T).log_prob(support).exp()
                  * objectives.toy_event(support).float()).sum().item()
    assert abs(q_event - q_true) < 4 * q_event_se + 1e-3
