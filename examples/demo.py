"""The main job: one posterior over the bundled LM's reviews, solved five ways.

The target is p*(x) ∝ p0(x) exp(r(x)/beta): reviews that are positive and not
offensive, where r counts +1 per positive word, −1 per negative word and −3 per
offensive word (``pyro_lm.programs.positive_reviews_reward``). One Pyro program,
five inference algorithms:

* ``SequenceELBO`` — SVI with a trainable LM guide: KL-regularised RL (RLOO);
* ``DPG`` — forward-KL distribution matching: fine-tuning that is not RL;
* ``reward max`` — the same SVI without the KL term: the guide collapses;
* ``Importance`` — no training: the prior proposes, the reward weighs;
* ``SMC`` — no training: token-level SMC with a lookahead proposal (the top 32
  next tokens scored exactly, the rest from the prior).

It runs on the bundled byte-level BPE LM (``models/tinylm-bpe``: words split into
pieces, prompt ``"Review:"``); ``--model tinylm`` runs it on the word-level one.
It prints a table (mean reward, KL(q‖p0), estimated KL(q‖p*), ESS and PSIS k̂,
log Z, distinct-2, wall time), a few completions from each, and writes plots to
``out/``.

    python examples/demo.py [--beta 0.5] [--steps 120] [--model tinylm-bpe] [--device cuda] [--tiny]
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm import diagnostics  # noqa: E402
from pyro_lm.programs import positive_reviews_reward, reward_model, task_prompt  # noqa: E402


def distinct_n(x: torch.Tensor, eos: int, n: int = 2) -> float:
    """Distinct n-grams over all n-grams of the completions' content (diversity)."""
    grams, total = set(), 0
    for row in x.tolist():
        row = row[: row.index(eos)] if eos in row else row
        for i in range(len(row) - n + 1):
            grams.add(tuple(row[i:i + n]))
            total += 1
    return len(grams) / max(total, 1)


def train(name, model, prior, loss, args, prompts):
    """Fit a guide LM with SVI; return it and the metric history."""
    pyro.clear_param_store()
    policy = prior.trainable_copy()
    guide = pyro_lm.infer.AutoLMGuide(model, policy, name=f"{name}_guide")
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=loss)
    history = pyro_lm.infer.fit(svi, prompts, num_steps=args.steps, progress=not args.tiny)
    return policy, history


def evaluate_guide(policy, prior, reward, beta, prompts, args):
    """Sample the guide; score it against the prior and the unnormalised posterior."""
    dist = pyro_lm.LMDistribution(policy, prompts, args.max_new_tokens)
    with torch.no_grad():
        x, log_q = dist.sample_with_log_prob((args.num_eval,))
        log_p0 = dist.with_lm(prior).log_prob(x)
        r = reward(x)
    log_w = (log_p0 + r / beta - log_q)[:, 0]
    return x[:, 0], {
        "reward": float(r.mean()),
        "kl_q_p0": float((log_q - log_p0).mean()),
        "log_w": log_w,
    }


def main(args):
    pyro.set_rng_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = load_prior(args.device, args.model)
    prompt = task_prompt(prior)
    reward = positive_reviews_reward(prior.tokenizer)
    beta, t = args.beta, args.max_new_tokens
    model = reward_model(prior, reward, beta=beta, max_new_tokens=t)
    prompts = [prompt]
    print(f"prior: {prior}\ntarget: p*(x) ∝ p0(x) exp(r(x)/{beta}), r = positive − negative "
          f"− 3·offensive words, prompt {prompt!r}, {t} new tokens\n")
    results, samples, eos = {}, {}, prior.eos_token_id

    # --- sampling without training ---------------------------------------------------------
    start = time.perf_counter()
    smc = pyro_lm.infer.SMC(model, num_particles=args.num_eval,
                            lookahead=args.lookahead).run(prompts)
    results["SMC"] = dict(time=time.perf_counter() - start, log_w=smc.log_weights[:, 0],
                          log_Z=float(smc.log_normalizer()[0]), post=smc)
    start = time.perf_counter()
    imp = pyro_lm.infer.Importance(model, num_samples=args.num_eval).run(prompts)
    results["Importance"] = dict(time=time.perf_counter() - start, log_w=imp.log_weights[:, 0],
                                 post=imp)
    log_z_ref = results["SMC"]["log_Z"]
    for name in ("SMC", "Importance"):
        post = results[name]["post"]
        x = post.resample(args.num_eval)["x"][:, 0]
        samples[name] = x
        results[name]["reward"] = float(reward(x).mean())
    # --- fine-tuning --------------------------------------------------------------------------
    losses = {
        "SequenceELBO": pyro_lm.infer.SequenceELBO(num_particles=args.num_particles),
        "DPG": pyro_lm.infer.DPG(num_particles=args.num_particles),
        "reward max": pyro_lm.infer.SequenceELBO(num_particles=args.num_particles,
                                                 kl_weight=0.0),
    }
    histories = {}
    for name, loss in losses.items():
        print(f"training {name} ({args.steps} steps × {args.num_particles} particles)")
        start = time.perf_counter()
        policy, histories[name] = train(name.replace(" ", "_"), model, prior, loss, args, prompts)
        elapsed = time.perf_counter() - start
        x, stats = evaluate_guide(policy, prior, reward, beta, prompts, args)
        samples[name] = x
        stats["time"] = elapsed
        stats["kl_q_pstar"] = log_z_ref - float(stats["log_w"].mean())
        results[name] = stats

    # --- table ----------------------------------------------------------------------------------
    header = f"{'method':<13}{'reward':>8}{'KL(q‖p0)':>10}{'KL(q‖p*)':>10}{'ESS':>8}" \
             f"{'k̂':>7}{'log Z':>9}{'dist-2':>8}{'time s':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    rows = {}
    for name in ("SequenceELBO", "DPG", "reward max", "Importance", "SMC"):
        res = results[name]
        log_w = res["log_w"]
        finite = torch.isfinite(log_w)
        ess = float(diagnostics.ess(log_w[finite])) / args.num_eval if finite.any() else 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            khat = float(diagnostics.psis_khat(log_w[finite], warn=False)) \
                if finite.sum() >= 25 else float("nan")
        log_z = res.get("log_Z", float(torch.logsumexp(log_w, 0) - math.log(log_w.numel())))
        rows[name] = dict(reward=res["reward"], kl_q_p0=res.get("kl_q_p0"),
                          kl_q_pstar=res.get("kl_q_pstar"), ess=ess, khat=khat, log_Z=log_z,
                          distinct2=distinct_n(samples[name], eos), time=res["time"])

        def fmt(v, width, spec=".3f"):
            return f"{'—':>{width}}" if v is None else f"{v:>{width}{spec}}"

        r = rows[name]
        print(f"{name:<13}{fmt(r['reward'], 8)}{fmt(r['kl_q_p0'], 10)}{fmt(r['kl_q_pstar'], 10)}"
              f"{fmt(r['ess'], 8, '.2f')}{fmt(r['khat'], 7, '.2f')}{fmt(r['log_Z'], 9)}"
              f"{fmt(r['distinct2'], 8)}{fmt(r['time'], 8, '.1f')}")
    print("\nESS is the fraction of samples (Kish) of the weights p̃/q; for SequenceELBO, DPG and "
          "reward max, q is the trained guide; for Importance, the prior. KL(q‖p*) is estimated "
          "as log Ẑ_SMC − E_q[log p̃ − log q]. Reward max has the highest reward, the lowest "
          "diversity and a large KL to p*: it collapsed.\n")
    for name, x in samples.items():
        print(f"{name}:")
        for text in prior.decode(x[:args.show]):
            print(f"    {prompt}{text if text[:1].isspace() else ' ' + text}")

    # --- plots ----------------------------------------------------------------------------------
    if not args.no_plots:
        import matplotlib

        matplotlib.use("Agg")
        for name, history in histories.items():
            diagnostics.plot_training(history, path=out / f"training_{name.replace(' ', '_')}.png")
        diagnostics.plot_weights(imp, path=out / "weights_importance.png")
        diagnostics.plot_ess(smc, path=out / "smc_ess.png")
        print(f"\nplots written to {out}/")
    return rows


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--num-particles", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-eval", type=int, default=512)
    p.add_argument("--lookahead", default="32", type=lambda v: v if v == "full" else int(v),
                   help="SMC's lookahead proposal: top-k candidates (exact) or 'full'")
    p.add_argument("--show", type=int, default=3, help="completions printed per method")
    p.add_argument("--out", default="out")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.num_particles, args.num_eval, args.max_new_tokens = 2, 4, 32, 8
    return args


if __name__ == "__main__":
    main(parse_args())
