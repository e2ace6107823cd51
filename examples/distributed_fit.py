r"""Data-parallel fine-tuning and sharded SMC: the one-process program, run on N ranks.

The program is the KL-regularised review task on a bundled LM: the prior LM writes a
review, :func:`pyro_lm.programs.positive_reviews_reward` scores it, and the posterior is
:math:`p^*(x) \propto p_0(x) \exp(r(x)/\beta)`. Nothing in it names a rank: under a
launcher, :func:`pyro_lm.distributed.init` joins the process group,
:func:`~pyro_lm.infer.fit` gives each rank its block of the prompts (with all of their
particles), all-reduces the gradient (the sum over ranks: the one-process gradient) and the
metrics, and rank 0 shows the progress and writes the checkpoint; :class:`~pyro_lm.infer.SMC`
runs each rank's prompts and returns the gathered posterior on every rank.

    python examples/distributed_fit.py [--tiny]                     # one process
    torchrun --nproc_per_node=2 examples/distributed_fit.py          # 2 ranks, one machine
    accelerate launch --num_processes 2 examples/distributed_fit.py  # the same, by accelerate
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 examples/distributed_fit.py --device cuda   # 2 nodes x 8 GPUs

On CPU the ranks talk over gloo, on CUDA over NCCL (rank ``r`` on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

from pyro_lm import distributed  # noqa: E402
from pyro_lm.infer import SMC, AutoLMGuide, SequenceELBO, fit  # noqa: E402
from pyro_lm.programs import positive_reviews_reward, reward_model, task_prompt  # noqa: E402


def main(args):
    rank, world = distributed.init()
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    pyro.clear_param_store()
    distributed.set_rng_seed(args.seed)
    prior = load_prior(device, args.model)
    model = reward_model(prior, positive_reviews_reward(prior.tokenizer), beta=args.beta,
                         max_new_tokens=args.max_new_tokens)
    prompts = [task_prompt(prior)] * args.num_prompts  # the global batch, on every rank
    policy = prior.trainable_copy()
    guide = AutoLMGuide(model, policy)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
                         loss=SequenceELBO(num_particles=args.num_particles))
    history = fit(svi, prompts, num_steps=args.steps, checkpoint=args.checkpoint,
                  every=args.every, seed=args.seed, progress=not args.tiny)
    post = SMC(model, guide=guide, num_particles=args.num_particles).run(prompts)
    log_z = post.log_normalizer()
    if distributed.is_main_process():
        first, last = history[0], history[-1]
        print(f"{world} rank(s), {args.num_prompts} prompts x {args.num_particles} particles "
              f"per step ({len(prompts) // world}+ prompts per rank)")
        print(f"fit: loss {first['loss']:.3f} -> {last['loss']:.3f}, E_q[r]/beta "
              f"{first['reward']:.3f} -> {last['reward']:.3f}, KL(q||p0) {last['kl']:.3f}")
        print(f"SMC with the guide: log Z per prompt {[round(v, 3) for v in log_z.tolist()]}")
        for row in post.text()[:2]:
            print(f"    {prompts[0]}{row[0]}")
    return {"rank": rank, "world": world, "history": history, "log_Z": log_z.cpu(),
            "params": {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()},
            "ess": post.ess().cpu()}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=8, help="the global batch of prompts")
    p.add_argument("--num-particles", type=int, default=16, help="completions per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (written by rank 0)")
    p.add_argument("--every", type=int, default=None, help="checkpoint every this many steps")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.num_prompts, args.num_particles, args.max_new_tokens = 3, 4, 4, 10
    return args


if __name__ == "__main__":
    main(parse_args())
