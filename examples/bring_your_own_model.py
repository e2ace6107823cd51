"""Bring your own transformers causal LM from a local directory.

Any directory written by ``save_pretrained`` (config, weights, tokenizer) works;
``CausalLM.from_pretrained`` reads it with ``local_files_only=True``, so nothing
is fetched. ``--model-dir`` defaults to the bundled tiny LM; ``--tiny`` saves a
random GPT-2 to a temporary directory first and loads that.

    python examples/bring_your_own_model.py --model-dir /path/to/model --prompt "Once"
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.programs import reward_model  # noqa: E402


def main(args):
    pyro.set_rng_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if args.tiny:
            toy = pyro_lm.lm.toy_lm(vocab_size=16, n_layer=1, n_embd=32, init_std=0.1)
            toy.model.save_pretrained(tmp)
            toy.tokenizer.save_pretrained(tmp)
            model_dir, args.prompt, args.words = tmp, "t1", ["t2", "t3"]
        prior = pyro_lm.CausalLM.from_pretrained(model_dir, device=args.device,
                                                 dtype=getattr(torch, args.dtype))
        print(prior)
        reward = pyro_lm.rewards.Lexicon(prior.tokenizer, {w: 1.0 for w in args.words})
        model = reward_model(prior, reward, beta=args.beta, max_new_tokens=args.max_new_tokens)
        post = pyro_lm.infer.Importance(model, num_samples=args.num_samples).run([args.prompt])
        before = float(reward(post.samples["x"]).float().mean())
        after = float(reward(post.resample(args.num_samples)["x"]).float().mean())
        print(f"mean reward: prior {before:.3f} -> posterior {after:.3f}; "
              f"ESS {float(post.ess()[0]):.1f}/{args.num_samples}")
        for text in post.text()[:3]:
            print("   ", args.prompt, text[0])
        return {"prior_reward": before, "posterior_reward": after}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(pyro_lm.bundled_model_path()))
    p.add_argument("--prompt", default="review :")
    p.add_argument("--words", nargs="+", default=["great", "excellent", "lovely"])
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--dtype", default="float32", help="e.g. bfloat16 on a GPU")
    args = p.parse_args(argv)
    if args.tiny:
        args.num_samples, args.max_new_tokens = 32, 6
    return args


if __name__ == "__main__":
    main(parse_args())
