"""Word-step SMC: steer the bundled BPE LM's reviews with a sentence-level reward.

The reward scores whole sentences: +1 for each finished sentence whose words are on
the whole positive, -1 for each negative one (``pyro_lm.data``'s word lists). A
sentence is finished once it ends with ``.``, ``!`` or ``?`` and the text goes on, or
when the completion ends; on a prefix the reward sees the finished sentences only. The
target is ``p*(x) ∝ p0(x) exp(r(x) / beta)``.

Four samplers at equal particles: importance sampling from the prior, token-level SMC
(the potential after every token), word-step SMC (``steps="word"``: potentials and
resampling only before tokens that start a new word; the potential is evaluated on the
particles that reached a word end) and sentence-step SMC (``steps=r"[.!?]\\s"``). All
four are exact (same posterior, unbiased log Z); they differ in variance and cost.

    python examples/steps.py [--tiny] [--device cuda]
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.programs import reward_model, task_prompt  # noqa: E402
from pyro_lm.rewards import Callable  # noqa: E402
from pyro_lm.rewards.words import decode_rows  # noqa: E402

#: a finished sentence: up to its terminator, then more text (or the end of a completion)
SENTENCE = re.compile(r"[^.!?]*[.!?](?=\s)")
WORD = re.compile(r"\w+")


def sentence_reward(lm):
    """The sentence-level reward ``x -> (*batch,)``: a sum over finished sentences of the
    sign of (positive words - negative words)."""
    from pyro_lm.data import NEGATIVE_WORDS, POSITIVE_WORDS

    score = {w: 1 for w in POSITIVE_WORDS} | {w: -1 for w in NEGATIVE_WORDS}

    def sentences(x):
        rows = x.reshape(-1, x.shape[-1])
        texts, complete = decode_rows(lm.tokenizer, rows, lm.eos_token_ids)
        values = []
        for text, done in zip(texts, complete, strict=True):
            found = SENTENCE.findall(text + " " if done else text)
            if done:  # a completed text's last, unterminated sentence is finished too
                found.append(SENTENCE.sub("", text + " "))
            total = 0
            for sentence in found:
                net = sum(score.get(w.lower(), 0) for w in WORD.findall(sentence))
                total += (net > 0) - (net < 0)
            values.append(float(total))
        return torch.tensor(values, device=x.device).reshape(x.shape[:-1])

    return Callable(sentences, name="sentences")


def summary(name, post, reward, seconds):
    x = post.resample(post.log_weights.shape[0])["x"]
    return {"sampler": name, "final ESS": float(post.ess().mean()),
            "log Z": float(post.log_normalizer().mean()),
            "mean reward": float(reward(x).float().mean()), "seconds": seconds}


def main(args):
    pyro.set_rng_seed(args.seed)
    prior = load_prior(args.device, args.model)
    reward = sentence_reward(prior)
    model = reward_model(prior, reward, beta=args.beta, max_new_tokens=args.max_new_tokens)
    prompts = [task_prompt(prior)]
    n = args.num_particles
    samplers = {"importance (prior)": pyro_lm.infer.Importance(model, num_samples=n),
                "SMC, token steps": pyro_lm.infer.SMC(model, num_particles=n),
                "SMC, word steps": pyro_lm.infer.SMC(model, num_particles=n, steps="word"),
                "SMC, sentence steps": pyro_lm.infer.SMC(model, num_particles=n,
                                                         steps=r"[.!?]\s")}
    x0 = pyro_lm.LMDistribution(prior, prompts, args.max_new_tokens).sample((n,))
    print(f"prior: mean reward {float(reward(x0).mean()):.2f} over {n} reviews")
    rows = []
    for name, sampler in samplers.items():
        start = time.perf_counter()
        post = sampler.run(prompts)
        rows.append(summary(name, post, reward, time.perf_counter() - start))
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{v:<20}"
                        for k, v in rows[-1].items()))
    post = samplers["SMC, word steps"].run(prompts)
    for text in prior.decode(post.resample(3)["x"][:, 0]):
        print(f"    {prompts[0]}{text}")
    return rows


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--num-particles", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.5)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_particles, args.max_new_tokens = 16, 12
    return args


if __name__ == "__main__":
    main(parse_args())
