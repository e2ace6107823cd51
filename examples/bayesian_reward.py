"""A Bayesian evidence model as the reward: logistic regression fitted by NUTS.

The bundled byte-level BPE LM (``models/tinylm-bpe``; ``--model tinylm`` for the word-level
one) writes reviews of the synthetic corpus. We label
corpus reviews by the grammar that generated them (``sentiment == "positive"``),
fit :class:`pyro_lm.rewards.BayesianClassifier` (mean-pooled hidden states of the
LM, NumPyro NUTS, R-hat / ESS through ArviZ), and use its posterior predictive
``log p(positive | x)`` as the reward factor of a Pyro model,

    p*(x) ∝ p0(x | "Review:") · p(positive | x)^(1/beta).

Importance sampling from the prior then reweights the LM's reviews; the share of
positive ones (judged by the grammar's lexicon) is printed before and after.

    python examples/bayesian_reward.py [--tiny] [--device cuda]

``--tiny`` runs in seconds (the tests use it); if the bundled model is missing,
it falls back to a random toy LM and synthetic labels.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm import diagnostics  # noqa: E402
from pyro_lm.programs import corpus_text, task_prompt  # noqa: E402
from pyro_lm.rewards import BayesianClassifier  # noqa: E402
from pyro_lm.rewards.bayesian import encode_completions  # noqa: E402

_WORD = re.compile(r"[a-z]+")


def parse_args(argv=None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0], model="tinylm-bpe")
    p.add_argument("--features", choices=("hidden", "tokens"), default="hidden")
    p.add_argument("--num-docs", type=int, default=None, help="labelled reviews to fit on")
    p.add_argument("--num-warmup", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None, help="NUTS draws per chain")
    p.add_argument("--num-chains", type=int, default=2)
    p.add_argument("--prior-scale", type=float, default=0.5)
    p.add_argument("--max-features", type=int, default=None,
                   help="principal components of the whitened features to keep")
    p.add_argument("--num-particles", type=int, default=None, help="importance samples")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.5)
    args = p.parse_args(argv)
    defaults = dict(num_docs=(96, 600), num_warmup=(60, 500), num_samples=(60, 500),
                    num_particles=(32, 512), max_new_tokens=(16, 24), max_features=(8, 32))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if not args.beta > 0:
        p.error(f"--beta: must be > 0, got {args.beta}")
    return args


def bundled_task(args):
    """The bundled LM, corpus reviews labelled positive / not, and a lexicon judge."""
    from pyro_lm.data import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, generate_corpus

    lm = load_prior(args.device, args.model)
    prompt = task_prompt(lm)
    docs = generate_corpus(args.num_docs, seed=args.seed + 1, kinds=("review",))
    # each review as the LM writes it after its prompt (" My new kettle is ...")
    texts = [corpus_text(lm, d.text)[len(prompt):] for d in docs]
    labels = [d.labels["sentiment"] == "positive" for d in docs]
    pos, other = set(POSITIVE_WORDS), set(NEGATIVE_WORDS) | set(NEUTRAL_WORDS)

    def judge(text: str) -> bool:
        words = _WORD.findall(text.lower())
        return sum(w in pos for w in words) > sum(w in other for w in words)

    return lm, prompt, encode_completions(lm, texts, args.max_new_tokens), labels, judge


def toy_task(args):
    """Fallback without the bundled model: a random toy LM; label = more t1 than t2."""
    lm = pyro_lm.lm.toy_lm(vocab_size=8, n_layer=2, n_embd=32, seed=args.seed,
                           device=args.device)
    prompt = "t3"
    dist = pyro_lm.LMDistribution(lm, prompt, max_new_tokens=args.max_new_tokens)
    x = dist.sample((args.num_docs,))

    def judge(text: str) -> bool:
        words = text.split()
        return words.count("t1") > words.count("t2")

    return lm, prompt, x, [judge(t) for t in lm.decode(x)], judge


def main(args) -> dict:
    pyro.set_rng_seed(args.seed)
    try:
        lm, prompt, x_train, labels, judge = bundled_task(args)
        task = f"bundled {args.model}, corpus reviews labelled by their grammar"
    except FileNotFoundError:
        if not args.tiny:
            raise
        lm, prompt, x_train, labels, judge = toy_task(args)
        task = "toy LM (bundled model absent), synthetic labels"
    y = torch.tensor(labels, dtype=torch.float32)
    print(f"task: {task}; {len(labels)} sequences, {int(y.sum())} positive")

    clf = BayesianClassifier(lm, features=args.features, prior_scale=args.prior_scale,
                             prefix=prompt, whiten=True, max_features=args.max_features)
    start = time.perf_counter()
    clf.fit(x_train, y, num_warmup=args.num_warmup, num_samples=args.num_samples,
            num_chains=args.num_chains, seed=args.seed, chain_method="vectorized")
    wall = time.perf_counter() - start
    with torch.no_grad():
        train_acc = float(((clf(x_train).exp() > 0.5).float().cpu() == y).float().mean())
    print(f"NUTS: {args.num_chains} chains x {args.num_samples} draws "
          f"(+{args.num_warmup} warm-up), features={args.features} "
          f"(whitened, {clf._projection.shape[1]} components): NUTS {clf.fit_seconds:.1f} s "
          f"(fit() in all, with "
          f"featurisation and JAX import, {wall:.1f} s), max R-hat {clf.rhat_max:.4f}, "
          f"min bulk ESS {clf.ess_bulk_min:.0f}, "
          f"train accuracy {train_acc:.3f} (majority {max(y.mean(), 1 - y.mean()):.3f})")
    if not args.tiny:
        met = clf.fit_seconds < 60 and clf.rhat_max <= 1.01
        print(f"target (fit < 60 s with R-hat <= 1.01): {'met' if met else 'NOT met'}")

    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts,
                                                        max_new_tokens=args.max_new_tokens))
            pyro.factor("reward", clf(x) / args.beta)
            return x

    post = pyro_lm.infer.Importance(model, num_samples=args.num_particles).run([prompt])
    positive = torch.tensor([[judge(t) for t in row] for row in post.text("x")],
                            dtype=torch.float64)  # (N, 1)
    w = post.normalized_weights().double().cpu()
    before, after = float(positive.mean()), float((w * positive).sum())
    table = diagnostics.summary(post, warn=False)
    print(table.to_string(float_format="%.3f"))
    print(f"positive share: prior {before:.3f} -> posterior (beta={args.beta}) {after:.3f}")
    best = int(w[:, 0].argmax())
    print(f"heaviest sample ({float(w[best, 0]):.3f}): {post.text('x')[best][0]!r}")
    return {"rhat_max": clf.rhat_max, "ess_bulk_min": clf.ess_bulk_min,
            "fit_seconds": clf.fit_seconds, "train_accuracy": train_acc,
            "majority": float(max(y.mean(), 1 - y.mean())), "share_before": before,
            "share_after": after, "ess": float(table["ess"].iloc[0]),
            "khat": float(table["khat"].iloc[0]), "num_particles": args.num_particles,
            "log_Z": float(table["log_Z"].iloc[0]), "task": task}


if __name__ == "__main__":
    main(parse_args())
