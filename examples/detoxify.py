"""Detoxify: condition the bundled LM's reviews on "no offensive words".

The posterior is p*(x) ∝ p0(x) · 1[x has no offensive word]: a hard constraint
(the lexicon reward is -inf per offensive word). Two solvers on one program:

* token-level SMC samples it exactly in the limit, with no training;
* KL-regularised RL (SequenceELBO) fine-tunes a guide towards the same target
  with a finite penalty (score-function gradients need finite rewards).

    python examples/detoxify.py [--tiny] [--device cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.programs import detox_reward, reward_model, task_prompt  # noqa: E402


def offensive_rate(prior, x: torch.Tensor) -> float:
    bad = detox_reward(prior.tokenizer, penalty=-1.0)(x)
    return float((bad < 0).float().mean())


def main(args):
    pyro.set_rng_seed(args.seed)
    prior = load_prior(args.device, args.model)
    t = args.max_new_tokens
    prompt = task_prompt(prior)
    prompts = [prompt]
    n = args.num_samples

    x0 = pyro_lm.LMDistribution(prior, prompts, t).sample((n,))
    print(f"prior: offensive share {offensive_rate(prior, x0):.3f} of {n} reviews")

    hard = reward_model(prior, detox_reward(prior.tokenizer), beta=1.0, max_new_tokens=t)
    post = pyro_lm.infer.SMC(hard, num_particles=n).run(prompts)
    x_smc = post.resample(n)["x"]
    print(f"SMC:   offensive share {offensive_rate(prior, x_smc):.3f}, final ESS "
          f"{float(post.ess().mean()):.1f}/{n}, log Z {float(post.log_normalizer().mean()):.3f}"
          " (log P(no offensive word) under the prior)")

    soft = reward_model(prior, detox_reward(prior.tokenizer, penalty=-1.0), beta=args.beta,
                        max_new_tokens=t)
    policy = prior.trainable_copy()
    guide = pyro_lm.infer.AutoLMGuide(soft, policy)
    svi = pyro.infer.SVI(soft, guide, pyro.optim.Adam({"lr": args.lr}),
                         loss=pyro_lm.infer.SequenceELBO(num_particles=args.num_particles))
    pyro_lm.infer.fit(svi, prompts, num_steps=args.steps, progress=not args.tiny)
    x_rl = pyro_lm.LMDistribution(policy, prompts, t).sample((n,))
    print(f"KL-RL: offensive share {offensive_rate(prior, x_rl):.3f} after {args.steps} steps")
    for text in prior.decode(x_rl[:3, 0]):
        print(f"    {prompt}{text if text[:1].isspace() else ' ' + text}")
    return {"prior": offensive_rate(prior, x0), "smc": offensive_rate(prior, x_smc),
            "rl": offensive_rate(prior, x_rl)}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--num-particles", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_samples, args.num_particles, args.steps, args.max_new_tokens = 32, 4, 2, 8
    return args


if __name__ == "__main__":
    main(parse_args())
