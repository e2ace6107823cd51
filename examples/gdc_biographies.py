r"""A distributional constraint: "half of the biographies are about women" (GDC).

The bundled tiny LMs were trained on a synthetic corpus in which only 25% of the
biographies (prompt ``"Bio:"`` for the byte-level BPE ``models/tinylm-bpe``, the default;
``"bio :"`` for the word-level ``models/tinylm``, ``--model tinylm``) are about women.
No pointwise reward says "half of them": rewarding female biographies and maximising the
reward makes *all* of them female. A moment constraint does say it: with the feature

.. math:: \phi(x) = 1[x \text{ mentions a female name, "she" or "her"}]

(whole words of the decoded text, :func:`pyro_lm.programs.female_bio_feature`),

the target is the distribution closest to the prior in KL whose mean of :math:`\phi`
is :math:`\mu = 0.5`, the exponential family :math:`p_\lambda(x) \propto p_0(x)
e^{\lambda\phi(x)}` (Khalifa et al., 2021). The script

1. estimates the prior's female share from samples;
2. fits :math:`\lambda` by importance-sampled moment matching
   (:func:`pyro_lm.infer.fit_moments`);
3. samples the target :math:`p_\lambda` with independent Metropolis-Hastings
   (:class:`pyro_lm.infer.IMH`), the constraint entering the model as
   ``pyro.factor("moments", constraint(x))``;
4. fine-tunes a copy of the LM towards :math:`p_\lambda` with forward-KL distribution
   matching (:class:`pyro_lm.infer.DPG`) and measures the share of its own samples.

    python examples/gdc_biographies.py [--tiny] [--device cuda]

With ``--tiny`` everything is small (seconds). If the bundled LM is absent the script
falls back to a random toy LM, with "mentions token t1" standing in for the feature.

References: M. Khalifa, H. Elsahar, M. Dymetman, *A Distributional Approach to
Controlled Text Generation*, ICLR 2021; T. Korbak et al., *On Reinforcement Learning
and Distribution Matching for Fine-Tuning Language Models with no Catastrophic
Forgetting*, NeurIPS 2022.
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
from pyro_lm.infer import DPG, IMH, AutoLMGuide, fit_moments  # noqa: E402
from pyro_lm.programs import female_bio_feature, task_prompt  # noqa: E402
from pyro_lm.rewards import Callable, Lexicon  # noqa: E402

TARGET = 0.5


def load_task(device, model="tinylm-bpe"):
    """The bundled LM, its bio prompt and the feature phi; a toy LM and "mentions t1"
    if the bundled LM is absent."""
    try:
        prior = load_prior(device, model)
        return prior, task_prompt(prior, "bio"), female_bio_feature(prior)
    except FileNotFoundError:
        from pyro_lm.lm import toy_lm

        print(f"models/{model} is absent: using a random toy LM, feature = mentions 't1'")
        prior = toy_lm(vocab_size=8, n_layer=1, n_embd=16, seed=1, init_std=0.5, device=device)
        t1 = Lexicon(prior.tokenizer, {"t1": 1.0})
        return prior, "t2", Callable(lambda x: (t1(x) > 0).float(), name="mentions t1")


def share(feature, x: torch.Tensor) -> tuple[float, float]:
    """Mean of the feature over samples and its binomial standard error."""
    p = feature(x).double().mean().item()
    return p, math.sqrt(max(p * (1 - p), 1e-12) / x.shape[0])


def main(args):
    pyro.set_rng_seed(args.seed)
    device = torch.device(args.device)
    prior, prompt, feature = load_task(device, args.model)
    dist = pyro_lm.LMDistribution(prior, prompt, args.max_new_tokens)
    out = {}

    out["prior_share"] = share(feature, dist.sample((args.num_samples,)))
    print(f"1. prior: female share {out['prior_share'][0]:.3f} ± {out['prior_share'][1]:.3f} "
          f"({args.num_samples} samples)")

    fit = fit_moments(dist, feature, TARGET, num_samples=args.num_samples)
    constraint = fit.constraint
    out["lambda"] = fit.coefficients.item()
    out["fitted_share"] = fit.moments.item()
    out["fit_ess"] = fit.ess.min().item()
    print(f"2. fit: lambda = {out['lambda']:.3f}, importance-sampled share "
          f"{out['fitted_share']:.3f}, ESS {fit.ess.min().item():.0f} of {fit.num_samples}")

    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompt, args.max_new_tokens))
        pyro.factor("moments", constraint(x))
        return x

    post = IMH(model, num_steps=args.imh_steps, num_chains=args.imh_chains,
               burn_in=args.imh_steps - 1).run(prompt)
    out["imh_share"] = share(feature, post.samples["x"])
    out["imh_acceptance"] = post.extras["acceptance_rate"].item()
    print(f"3. IMH ({args.imh_chains} chains x {args.imh_steps} steps, last state kept): "
          f"female share {out['imh_share'][0]:.3f} ± {out['imh_share'][1]:.3f}, acceptance "
          f"{out['imh_acceptance']:.2f}")
    for text in post.text()[:3]:
        print(f"     {prompt}{text if text[:1].isspace() else ' ' + text}")

    pyro.clear_param_store()
    policy = prior.trainable_copy()
    guide = AutoLMGuide(model, policy)
    loss = DPG(num_particles=args.particles)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=loss)
    for step in range(args.dpg_steps):
        svi.step(prompt)
        if not args.tiny and (step + 1) % max(1, args.dpg_steps // 5) == 0:
            print(f"     DPG step {step + 1}: KL(p*||q) estimate {loss.metrics['kl_pq']:.3f}, "
                  f"ESS {loss.metrics['ess']:.1f}/{args.particles}")
    tuned = pyro_lm.LMDistribution(policy, prompt, args.max_new_tokens)
    out["dpg_share"] = share(feature, tuned.sample((args.num_samples,)))
    print(f"4. DPG fine-tuned LM ({args.dpg_steps} steps x {args.particles} particles): female "
          f"share {out['dpg_share'][0]:.3f} ± {out['dpg_share'][1]:.3f} (target {TARGET})")
    pyro.clear_param_store()
    return out


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=4096)
    p.add_argument("--imh-steps", type=int, default=20)
    p.add_argument("--imh-chains", type=int, default=1024)
    p.add_argument("--dpg-steps", type=int, default=200)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.tiny:
        args.max_new_tokens, args.num_samples = 12, 512
        args.imh_steps, args.imh_chains, args.dpg_steps, args.particles = 6, 128, 3, 8
    return args


if __name__ == "__main__":
    main(parse_args())
