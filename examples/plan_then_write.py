"""Plan, then write: two chained LM calls, a reward on each, solved by SMC and by SVI.

A first LM call writes a short plan (the review's opening, ``" The kettle is"``), a second
writes the review conditioned on it (its prompt is the first call's prompt followed by
the plan, ``first.prompt_with(plan)``). Each gets a lexicon reward:

    plan   ~ p0( · | "Review:")                       as many tokens as " The kettle is"
    review ~ p0( · | "Review:" + plan)                T tokens
    p*(plan, review) ∝ p0(plan) p0(review | plan) exp(r_plan(plan) + r_review(review))

with ``r_plan`` = +2 for a kitchen product in the plan and ``r_review`` = +1 per positive
and -1 per negative word. SMC decodes both sites token by token (one stage per LM site)
and returns weighted samples and log Z; SVI fits one trainable copy of the LM that is the
guide of both sites (``AutoLMGuide``) with ``SequenceELBO``, and the trained guide is then
used as Importance's proposal. Runs on the byte-level BPE bundled LM (``--model tinylm``
for the word-level one, prompt ``"review :"``, a 3-token plan).

    python examples/plan_then_write.py [--tiny] [--num-particles 256] [--steps 30]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.data.grammar import NEGATIVE_WORDS, POSITIVE_WORDS  # noqa: E402
from pyro_lm.programs import corpus_text, task_prompt  # noqa: E402
from pyro_lm.rewards import Lexicon  # noqa: E402

KITCHEN = ("blender", "toaster", "kettle", "mixer", "mug")


def plan_length(lm) -> int:
    """Tokens of the plan: as many as the LM's tokenizer gives the opening "the kettle is"
    after the prompt (3 on the word-level LM)."""
    prompt = task_prompt(lm)
    full = lm.tokenizer(corpus_text(lm, "review : the kettle is"), add_special_tokens=False)
    return len(full["input_ids"]) - len(lm.tokenizer(prompt, add_special_tokens=False)
                                        ["input_ids"])


def make_model(lm, plan_tokens: int, review_tokens: int):
    plan_reward = Lexicon(lm, {w: 2.0 for w in KITCHEN}, name="kitchen plan")
    review_reward = Lexicon(lm, {**{w: 1.0 for w in POSITIVE_WORDS},
                                 **{w: -1.0 for w in NEGATIVE_WORDS}}, name="positive review")

    prompt = task_prompt(lm)

    def model():
        first = pyro_lm.LMDistribution(lm, prompt, plan_tokens)
        plan = pyro.sample("plan", first)
        ids, mask = first.prompt_with(plan)
        review = pyro.sample("review", pyro_lm.LMDistribution(lm, ids, review_tokens,
                                                              attention_mask=mask))
        pyro.factor("plan_reward", plan_reward(plan))
        pyro.factor("review_reward", review_reward(review))
        return plan, review

    def total_reward(plan, review):
        return plan_reward(plan) + review_reward(review)

    return model, total_reward


def texts(lm, post, idx):
    plans = lm.decode(post.samples["plan"][idx])
    reviews = lm.decode(post.samples["review"][idx])
    return [f"{task_prompt(lm)}{p} |{r}" for p, r in zip(plans, reviews, strict=True)]


def weighted_mean(post, values):
    return float((post.normalized_weights().reshape(-1) * values.reshape(-1)).sum())


def main(args):
    pyro.set_rng_seed(args.seed)
    lm = load_prior(args.device, args.model)
    plan_tokens = args.plan_tokens or plan_length(lm)
    model, total_reward = make_model(lm, plan_tokens, args.max_new_tokens)
    n = args.num_particles
    out = {"prompt": task_prompt(lm), "plan_tokens": plan_tokens}

    # the prior (Importance with the program as its own proposal): the reward to beat
    prior = pyro_lm.infer.Importance(model, num_samples=n).run()
    r_prior = total_reward(prior.samples["plan"], prior.samples["review"]).float()
    out["prior_reward"] = (float(r_prior.mean()), float(r_prior.std() / math.sqrt(n)))

    # --- SMC: both sites decoded token by token -------------------------------------------
    smc = pyro_lm.infer.SMC(model, num_particles=n).run()
    r_smc = total_reward(smc.samples["plan"], smc.samples["review"]).float()
    out["smc"] = dict(ess=float(smc.ess()), log_Z=float(smc.log_normalizer()),
                      reward=weighted_mean(smc, r_smc),
                      resampled=int(smc.history["resampled"].sum())
                      if "resampled" in smc.history else None)
    order = torch.argsort(smc.normalized_weights().reshape(-1), descending=True)[:args.show]
    out["smc_texts"] = texts(lm, smc, order)
    print(f"prior: mean reward {out['prior_reward'][0]:.2f} ± {out['prior_reward'][1]:.2f}")
    print(f"SMC ({n} particles): final ESS {out['smc']['ess']:.1f}, log Z = "
          f"{out['smc']['log_Z']:.3f}, resampled at {out['smc']['resampled']} steps, "
          f"weighted mean reward {out['smc']['reward']:.2f}")
    for w, text in zip(smc.normalized_weights().reshape(-1)[order].tolist(), out["smc_texts"],
                       strict=True):
        print(f"  w={w:.3f}  {text}")

    # --- SVI: one trainable LM is the guide of both sites --------------------------------
    pyro.clear_param_store()
    guide = pyro_lm.infer.AutoLMGuide(model, lm.trainable_copy(), name="plan_write_guide")
    elbo = pyro_lm.infer.SequenceELBO(num_particles=args.svi_particles)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=elbo)
    history = []
    for step in range(args.steps):
        svi.step()
        history.append(dict(elbo.metrics))
        if step == 0 or step == args.steps - 1 or (step + 1) % max(1, args.steps // 5) == 0:
            m = elbo.metrics
            print(f"SVI step {step + 1:>3}: ELBO {m['elbo']:.3f}  reward {m['reward']:.2f}  "
                  f"KL(q‖p0) {m['kl']:.3f}  ESS {m['ess']:.2f}")
    out["svi"] = history
    last = history[-min(5, len(history)):]
    out["svi_elbo_last"] = sum(m["elbo"] for m in last) / len(last)
    print(f"SVI: mean ELBO of the last {len(last)} steps {out['svi_elbo_last']:.3f} "
          f"(a lower bound on log Z; SMC's estimate {out['smc']['log_Z']:.3f})")
    with torch.no_grad():
        fitted = pyro_lm.infer.Importance(model, guide=guide, num_samples=n).run()
    r_fit = total_reward(fitted.samples["plan"], fitted.samples["review"]).float()
    out["guide"] = dict(ess=float(fitted.ess()), log_Z=float(fitted.log_normalizer()),
                        reward=float(r_fit.mean()))
    out["guide_texts"] = texts(lm, fitted, torch.arange(min(args.show, n)))
    print(f"trained guide as Importance proposal: ESS {out['guide']['ess']:.1f} of {n}, "
          f"log Z = {out['guide']['log_Z']:.3f} (SMC: {out['smc']['log_Z']:.3f}), "
          f"mean reward of its samples {out['guide']['reward']:.2f}")
    for text in out["guide_texts"]:
        print(f"  {text}")
    return out


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--num-particles", type=int, default=256)
    p.add_argument("--plan-tokens", type=int, default=None,
                   help="tokens of the plan (default: those of ' The kettle is')")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    # lr 1e-3 with 8 particles overshoots on this LM (KL(q‖p0) 15 nats and ELBO -11 by step
    # 24, below its start); 3e-4 with 16 climbs steadily towards SMC's log Z
    p.add_argument("--svi-particles", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--show", type=int, default=5)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_particles, args.max_new_tokens, args.steps, args.show = 32, 10, 3, 3
        args.svi_particles = 8
    return args


if __name__ == "__main__":
    main(parse_args())
