"""Bring your own transformers causal LM from a local directory.

Any directory written by ``save_pretrained`` (config, weights, tokenizer) works;
``CausalLM.from_pretrained`` reads it with ``local_files_only=True``, so nothing
is fetched. ``--model-dir`` defaults to the bundled byte-level BPE LM; ``--tiny`` saves a
random tiny Llama with that LM's tokenizer to a temporary directory first and loads that
(another architecture, the generic decoder).

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


def save_random_llama(directory, tokenizer_dir, seed: int = 0) -> None:
    """Save a random 2-layer Llama with the tokenizer of ``tokenizer_dir`` to ``directory``,
    as ``save_pretrained`` writes any model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main(args):
    pyro.set_rng_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if args.tiny:
            save_random_llama(tmp, tokenizer_dir=model_dir, seed=args.seed)
            model_dir = tmp
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
            print(f"    {args.prompt}{text[0] if text[0][:1].isspace() else ' ' + text[0]}")
        return {"prior_reward": before, "posterior_reward": after,
                "model_type": prior.model.config.model_type}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(pyro_lm.bundled_model_path("tinylm-bpe")))
    p.add_argument("--prompt", default="Review:")
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
