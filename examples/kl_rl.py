r"""KL-regularised RL *is* variational inference: two demonstrations on an exact problem.

The prior is a tiny random GPT-2 over 4 tokens, completions have 3 tokens, so every
quantity can be computed exactly by enumeration (:mod:`pyro_lm.exact`). The reward is
a lexicon (+1 per ``t1``, -1 per ``t3``) entering as ``pyro.factor("reward", r(x)/beta)``.

1. **Equivalence.** The ELBO of the posterior :math:`p^* \propto p_0 e^{r/\beta}` is
   :math:`E_q[r]/\beta - \mathrm{KL}(q\|p_0)`, the KL-regularised RL objective. The
   RLOO estimator (:class:`pyro_lm.infer.SequenceELBO`) is an unbiased estimate of it
   and of its gradient: over many replicates its mean loss equals the exact
   :math:`-\mathrm{ELBO}` and its mean gradient the exact gradient (autograd through
   the enumerated ELBO), within standard errors.
2. **Collapse.** Maximising :math:`E_q[r]` alone (``kl_weight=0``) drives the guide's
   entropy to zero: it puts all its mass on the reward's mode. The ELBO instead
   converges to the posterior: :math:`\mathrm{KL}(q\|p^*) \to 0`.

    python examples/kl_rl.py [--tiny] [--device cuda]

References: T. Korbak, E. Perez, C. Buckley, *RL with KL penalties is better viewed as
Bayesian inference*, 2022; A. Ahmadian et al., *Back to Basics* (RLOO), 2024.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.exact import enumerate_model  # noqa: E402
from pyro_lm.infer import AutoLMGuide, SequenceELBO, fit  # noqa: E402
from pyro_lm.lm import toy_lm  # noqa: E402
from pyro_lm.rewards import Lexicon  # noqa: E402


def make_problem(device, beta: float, max_new_tokens: int = 3):
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.2, device=device)
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, max_new_tokens))
            pyro.factor("reward", reward(x) / beta)
            return x

    return prior, model


def equivalence(args, device) -> dict:
    """Mean and standard error of SequenceELBO's loss and gradient (on 3 random
    directions) over ``args.replicates`` calls, against the exact values."""
    prior, model = make_problem(device, args.beta)
    # a guide that differs from the prior, so that both ELBO terms matter
    policy = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=3, init_std=0.2,
                    device=device).trainable_copy()
    prompts = torch.tensor([[0], [2]], device=device).repeat(4, 1)  # 8 replicates per call
    guide = AutoLMGuide(model, policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    directions = torch.randn(sum(p.numel() for p in params), 3, generator=gen).to(device)

    def flat_grad():
        return torch.cat([p.grad.reshape(-1) for p in params])

    exact = enumerate_model(model, prompts)
    exact_loss = -exact.elbo(policy).sum()
    exact_loss.backward()
    exact_proj = flat_grad() @ directions
    elbo = SequenceELBO(num_particles=args.num_particles)
    losses, projs = [], []
    for _ in range(args.replicates):
        for p in params:
            p.grad = None
        losses.append(elbo.loss_and_grads(model, guide, prompts))
        projs.append(flat_grad() @ directions)
    losses, projs = torch.tensor(losses), torch.stack(projs)
    n = args.replicates
    result = dict(loss=losses.mean().item(), loss_se=(losses.std() / math.sqrt(n)).item(),
                  exact_loss=exact_loss.item(), grad=projs.mean(0).tolist(),
                  grad_se=(projs.std(0) / math.sqrt(n)).tolist(), exact_grad=exact_proj.tolist())
    print(f"1. equivalence over {n} replicates of SequenceELBO(num_particles="
          f"{args.num_particles}), 8 prompts each")
    print(f"   loss  {result['loss']:9.4f} ± {result['loss_se']:.4f} (SE)   exact -ELBO "
          f"{result['exact_loss']:9.4f}")
    for i in range(3):
        print(f"   grad·v{i} {result['grad'][i]:9.4f} ± {result['grad_se'][i]:.4f} (SE)   exact "
              f"{result['exact_grad'][i]:9.4f}")
    return result


def collapse(args, device) -> dict:
    """Train with the ELBO and with the reward alone; exact KL(q || p*) and entropy."""
    prior, model = make_problem(device, args.beta)
    prompts = torch.tensor([[0]], device=device)
    exact = enumerate_model(model, prompts)
    out = {"posterior_entropy": exact.entropy(exact.log_posterior).item()}
    print(f"2. collapse: {args.steps} steps each, Adam lr {args.lr}, K = 32")
    for name, kl_weight in [("elbo", 1.0), ("reward_only", 0.0)]:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        policy = prior.trainable_copy()
        guide = AutoLMGuide(model, policy)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
                             SequenceELBO(num_particles=32, kl_weight=kl_weight))
        with torch.no_grad():
            start = dict(kl=exact.kl_q_p(policy).item(), entropy=exact.entropy(policy).item())
        history = fit(svi, prompts, num_steps=args.steps, progress=not args.tiny)
        with torch.no_grad():
            end = dict(kl=exact.kl_q_p(policy).item(), entropy=exact.entropy(policy).item())
        out[name] = dict(start=start, end=end, reward=history[-1]["reward"])
        print(f"   {name:12s} KL(q||p*) {start['kl']:.3f} -> {end['kl']:.3f}   entropy "
              f"{start['entropy']:.3f} -> {end['entropy']:.3f} (posterior "
              f"{out['posterior_entropy']:.3f})   E_q[r]/beta {history[-1]['reward']:.2f}")
    pyro.clear_param_store()
    return out


def main(args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    device = torch.device(args.device)
    return {"equivalence": equivalence(args, device), "collapse": collapse(args, device)}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--num-particles", type=int, default=8)
    p.add_argument("--replicates", type=int, default=200)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args(argv)
    if args.tiny:
        args.replicates, args.steps = 15, 40
    return args


if __name__ == "__main__":
    main(parse_args())
