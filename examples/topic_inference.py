"""Which sentiment wrote this review? A latent chooses the prompt; the review is observed.

The bundled LM has no sentiment token, but it has learned that a review keeps one
sentiment throughout (the grammar of ``pyro_lm.data.grammar`` draws every adjective,
verb and closing phrase of a review from its one sentiment). So a latent sentiment
``z`` can write a review through its prompt: the review's opening words up to ``is``
(``"Review: The blender is"``, which say nothing of the sentiment) followed by one
adjective of sentiment ``z`` (``great`` / ``awful`` / ``okay``); the *rest* of the
review, after its own first adjective, is the observed text:

    z ~ Categorical(sentiment rates)
    rest ~ p0( · | "Review: The blender is " + ADJECTIVE[z])      (observed)

The LM is the byte-level BPE bundled one (``--model tinylm`` for the word-level one,
which reads the corpus as the grammar writes it, ``"review : the blender is"``); the
observed rest is the prose that follows the prompt (``", the price is fine. Nothing
special."``), tokenized as the LM's tokenizer does.

The review's first adjective (and intensifier) is left out of what is observed: it
would give the answer away. The posterior of ``z`` is computed three ways: Importance
(z from its prior, each weight the likelihood of the observed text), SMC over the
program, and exact enumeration (``pyro_lm.exact.enumerate_model``); a bar plot goes to
``out/topic_posterior.png``. Then the exact posterior's argmax is scored against the
true label on held-out corpus reviews (a seed other than the training corpus's 0);
also on the held-out reviews that do not occur verbatim in the training corpus.

    python examples/topic_inference.py [--tiny] [--num-heldout 200] [--num-samples 256]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.data import generate_corpus  # noqa: E402
from pyro_lm.data.grammar import INTENSIFIERS, SENTIMENT_RATES  # noqa: E402
from pyro_lm.programs import corpus_text  # noqa: E402

#: The latent's values, and the adjective each one writes after the review's opening.
SENTIMENTS = ("positive", "negative", "neutral")
ADJECTIVE = {"positive": "great", "negative": "awful", "neutral": "okay"}
#: The corpus the bundled LM was trained on (models/build_tinylm.py: --seed 0 --num-docs 20000).
TRAIN_SEED, TRAIN_DOCS = 0, 20_000
#: Held-out reviews are drawn with this seed (plus --seed): never the training corpus's.
HELDOUT_SEED = 777


def split_review(text: str) -> tuple[str, str]:
    """``"review : the blender is very great and ..."`` → ``("review : the blender is",
    "and ...")``: the opening up to ``is``, and what follows its first adjective."""
    words = text.split()
    i = words.index("is")
    j = i + 2 if words[i + 1] in INTENSIFIERS else i + 1
    return " ".join(words[: i + 1]), " ".join(words[j + 1:])


def prompts_for(lm, head: str):
    """The K prompts, one per sentiment: token ids (K, L) and their mask, left-padded."""
    return lm.encode([corpus_text(lm, f"{head} {ADJECTIVE[s]}") for s in SENTIMENTS])


def make_model(lm):
    prior = torch.tensor([SENTIMENT_RATES[s] for s in SENTIMENTS])

    def model(prompt_ids, mask, text, max_new_tokens):
        z = pyro.sample("z", dist.Categorical(probs=prior.to(prompt_ids.device)))
        d = pyro_lm.LMDistribution(lm, prompt_ids[z], max_new_tokens, attention_mask=mask[z])
        pyro.sample("review", d, obs=d.encode_value(text))
        return z

    return model


def weighted_marginal(post, k: int) -> torch.Tensor:
    """P(z = k) from weighted samples: the normalised weights summed per value of z."""
    z = post.samples["z"].reshape(-1).long()
    w = post.normalized_weights().reshape(-1)
    return torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, z, w).cpu()


def exact_marginal(model, args, k: int):
    """The exact posterior P(z = k), and the exact log P(observed text)."""
    exact = pyro_lm.exact.enumerate_model(model, *args)
    values, probs = exact.marginal("z")
    out = torch.zeros(k, dtype=probs.dtype)
    out[values.reshape(-1).long().cpu()] = probs.reshape(-1).cpu()
    return out, float(exact.log_Z)


def model_args(lm, text: str):
    """The model's arguments for a corpus review: the prompts of every z, and the observed
    rest as the LM writes it after the prompt (its own text, its own token count)."""
    head, rest = split_review(text)
    ids, mask = prompts_for(lm, head)
    words = text.split()
    # the rest as it follows its prompt in the LM's text: prose() of the whole review with
    # the prose of the opening cut off (prose of a prefix is a prefix of the prose)
    opening = " ".join(words[: len(words) - len(rest.split())])
    observed = corpus_text(lm, text)[len(corpus_text(lm, opening)):]
    num_tokens = len(lm.tokenizer(observed, add_special_tokens=False)["input_ids"])
    return head, observed, (ids, mask, observed, num_tokens + 1)


def recovery(lm, model, n: int, seed: int, check_novel: bool = True):
    """Exact-posterior argmax vs the true sentiment on ``n`` held-out reviews (and on those
    of them that are not in the training corpus, when ``check_novel``)."""
    reviews = generate_corpus(n, seed=seed, kinds=("review",))
    train = {d.text for d in generate_corpus(TRAIN_DOCS, seed=TRAIN_SEED)} if check_novel \
        else set()
    hits, novel_hits, novel, confusion = 0, 0, 0, torch.zeros(3, 3, dtype=torch.long)
    for doc in reviews:
        _, _, margs = model_args(lm, doc.text)
        guess = int(exact_marginal(model, margs, len(SENTIMENTS))[0].argmax())
        truth = SENTIMENTS.index(doc.labels["sentiment"])
        confusion[truth, guess] += 1
        hits += guess == truth
        if check_novel and doc.text not in train:
            novel += 1
            novel_hits += guess == truth
    return dict(n=len(reviews), accuracy=hits / len(reviews), novel=novel,
                novel_accuracy=novel_hits / novel if novel else float("nan"),
                confusion=confusion)


def plot(posteriors, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(posteriors)
    for i, (name, p) in enumerate(posteriors.items()):
        xs = [k + (i - (len(posteriors) - 1) / 2) * width for k in range(len(SENTIMENTS))]
        ax.bar(xs, p.tolist(), width=width, label=name)
    ax.set_xticks(range(len(SENTIMENTS)), SENTIMENTS)
    ax.set_ylabel("posterior P(z | observed text)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args):
    pyro.set_rng_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_prior(args.device, args.model)
    model = make_model(lm)
    k = len(SENTIMENTS)

    head, rest, margs = model_args(lm, args.review)
    print(f"review: {corpus_text(lm, args.review)!r}\n"
          f"prompt of z: {corpus_text(lm, head)!r} + one of "
          f"{[ADJECTIVE[s] for s in SENTIMENTS]}; observed: {rest!r}\n")
    imp = pyro_lm.infer.Importance(model, num_samples=args.num_samples).run(*margs)
    smc = pyro_lm.infer.SMC(model, num_particles=args.num_samples).run(*margs)
    exact, exact_log_z = exact_marginal(model, margs, k)
    posteriors = {"Importance": weighted_marginal(imp, k), "SMC": weighted_marginal(smc, k),
                  "exact": exact}
    ess = {"Importance": float(imp.ess()), "SMC": float(smc.ess())}
    # SNIS standard error of P(z = k): sqrt(p (1 - p) / ESS), floored at 1/N; 4 SE each
    tolerance = {name: (4 * torch.sqrt((exact * (1 - exact) + 1 / args.num_samples)
                                       / ess[name])).tolist() for name in ess}
    print(f"{'method':<12}" + "".join(f"{s:>10}" for s in SENTIMENTS) + f"{'ESS':>8}")
    for name, p in posteriors.items():
        e = f"{ess[name]:>8.1f}" if name in ess else f"{'—':>8}"
        print(f"{name:<12}" + "".join(f"{v:>10.4f}" for v in p.tolist()) + e)
    log_z = {"Importance": float(imp.log_normalizer()), "SMC": float(smc.log_normalizer()),
             "exact": exact_log_z}
    print("log P(observed text): " + ", ".join(f"{n} {v:.3f}" for n, v in log_z.items()))
    if not args.no_plots:
        plot(posteriors, out / "topic_posterior.png")
        print(f"plot written to {out / 'topic_posterior.png'}")

    seed = HELDOUT_SEED + args.seed
    rec = recovery(lm, model, args.num_heldout, seed, check_novel=not args.tiny)
    novel = "" if args.tiny else (f"; {rec['novel_accuracy']:.1%} of the {rec['novel']} "
                                  "that are not in the training corpus")
    print(f"\nexact posterior argmax = true sentiment on {rec['accuracy']:.1%} of {rec['n']} "
          f"held-out reviews (generate_corpus({rec['n']}, seed={seed}, kinds=('review',))"
          f"{novel}")
    print("confusion (rows: true, columns: argmax; " + ", ".join(SENTIMENTS) + "):")
    for s, row in zip(SENTIMENTS, rec["confusion"].tolist(), strict=True):
        print(f"  {s:<9} {row}")
    return dict(posteriors=posteriors, ess=ess, tolerance=tolerance, log_Z=log_z,
                recovery=rec, num_samples=args.num_samples)


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--review", default="review : my new kettle is quite decent , the price "
                   "is fine . nothing special .", help="the review whose sentiment is "
                   "inferred, as the corpus grammar writes it (its opening 'the X is ADJ' is "
                   "not observed)")
    p.add_argument("--num-samples", type=int, default=256, help="Importance samples and "
                   "SMC particles")
    p.add_argument("--num-heldout", type=int, default=200)
    p.add_argument("--out", default="out")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.num_samples, args.num_heldout = 64, 4
    return args


if __name__ == "__main__":
    main(parse_args())
