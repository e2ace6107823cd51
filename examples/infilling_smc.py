"""Constrained generation with token-level SMC: reviews that must contain a word.

The target is the prior LM conditioned on hard constraints,

    p*(x) ∝ p0(x | "Review: The <product> is") · 1[x contains a WORD] · 1[x has no insult],

written as a Pyro model with two ``-inf`` factors. SMC drives the completion token
by token: a particle whose prefix contains an insult dies at once (that constraint
is monotone: a prefix that breaks it breaks every continuation), a completed
particle without any WORD dies when it ends, and resampling refills the population
from the survivors. No training, no rejection loop; the weights are exact, and
``log Z`` estimates the log-probability of the constraints under the prior.

Runs on the bundled byte-level BPE LM (``models/tinylm-bpe``; ``--model tinylm`` for the
word-level one) if it exists, else on a random toy LM. Words are matched whole and
case-insensitively in the decoded text, so on the subword LM a word may take several tokens.

    python examples/infilling_smc.py [--tiny] [--device cuda] [--num-particles 256]
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.programs import corpus_text  # noqa: E402
from pyro_lm.rewards import Regex  # noqa: E402


def load_task(device, words=None, model="tinylm-bpe"):
    """The bundled tiny LM, its prompts, the required words (default: any positive word)
    and the banned ones; or a toy LM when the bundled one is not built."""
    try:
        lm = load_prior(device, model)
    except FileNotFoundError:
        lm = pyro_lm.lm.toy_lm(vocab_size=16, n_layer=1, n_embd=32, seed=0, init_std=0.1,
                               device=device)
        return lm, ["t1", "t2 t3"], words or ["t5", "t6"], ["t9"]
    from pyro_lm.data.grammar import OFFENSIVE_WORDS, POSITIVE_WORDS

    prompts = [corpus_text(lm, f"review : the {product} is") for product in ("blender", "kettle")]
    return lm, prompts, words or list(POSITIVE_WORDS), list(OFFENSIVE_WORDS)


def _any_word(words) -> str:
    return r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"


def make_model(prior, words, insults, max_new_tokens: int):
    """Hard constraints as -inf factors on the completion."""
    # not monotone: a prefix without the word scores 0 until it ends (it may still get one)
    must = Regex(prior, _any_word(words), match=0.0, no_match=-math.inf, flags=re.IGNORECASE,
                 name="contains word")
    # monotone: a prefix with an insult keeps it in every continuation
    polite = Regex(prior, _any_word(insults), match=-math.inf, no_match=0.0, monotone=True,
                   flags=re.IGNORECASE, name="no insult")

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, max_new_tokens))
            pyro.factor("contains_word", must(x))
            pyro.factor("polite", polite(x))
        return x

    return model


def main(args):
    pyro.set_rng_seed(args.seed)
    prior, prompts, words, insults = load_task(args.device, args.words, args.model)
    model = make_model(prior, words, insults, args.max_new_tokens)
    smc = pyro_lm.infer.SMC(model, num_particles=args.num_particles,
                            ess_threshold=args.ess_threshold)
    post = smc.run(prompts)
    weights = post.normalized_weights()
    texts = post.text()
    ess, log_z = post.ess(), post.log_normalizer()
    shown = words if len(words) <= 4 else words[:3] + ["..."]
    for b, prompt in enumerate(prompts):
        print(f"prompt {prompt!r}: must contain one of {shown}; final ESS {ess[b]:.1f} of "
              f"{args.num_particles}, log Z = {log_z[b]:.3f} "
              f"(log P(constraints) under the prior), resampled at "
              f"{int(post.history['resampled'][:, b].sum())} of "
              f"{post.history['ess'].shape[0]} steps")
        order = torch.argsort(weights[:, b], descending=True)[: args.show]
        for i in order.tolist():
            if weights[i, b] > 0:
                print(f"  w={weights[i, b]:.3f}  {prompt} | {texts[i][b]}")
    return post


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--num-particles", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--words", nargs="+", default=None, help="every completion must contain "
                   "one of these words (default: a positive word; 't5' or 't6' on the toy LM)")
    p.add_argument("--show", type=int, default=5, help="completions printed per prompt")
    args = p.parse_args(argv)
    if args.tiny:
        args.num_particles, args.max_new_tokens, args.show = 64, 12, 3
    return args


if __name__ == "__main__":
    main(parse_args())
