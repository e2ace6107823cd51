"""Steer the bundled LM towards positive reviews with a classifier reward.

The evidence model is a transformers sequence classifier, trained here in a few
seconds on the synthetic corpus's sentiment labels (nothing is downloaded). Its
log-probability of "positive" is the reward, ``r(x) = log p(positive | x)``,
and the posterior is p*(x) ∝ p0(x) p(positive | x)^(1/beta). The guide is
fine-tuned by forward-KL distribution matching (DPG), which is not RL. Runs on the
byte-level BPE bundled LM (``--model tinylm`` for the word-level one).

    python examples/sentiment.py [--tiny] [--device cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.data import generate_corpus  # noqa: E402
from pyro_lm.programs import corpus_text, reward_model, task_prompt  # noqa: E402


def train_classifier(tokenizer, num_docs: int, steps: int, device, seed: int = 0):
    """A 1-layer GPT-2 sentiment classifier on corpus reviews (positive vs not)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    docs = generate_corpus(num_docs, seed=seed + 1, kinds=("review",))
    prompt = task_prompt(tokenizer)
    # what the LM writes after its prompt, as it decodes it (" My new kettle is ...")
    texts = [corpus_text(tokenizer, d.text)[len(prompt):] for d in docs]
    labels = torch.tensor([d.labels["sentiment"] == "positive" for d in docs],
                          dtype=torch.long, device=device)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=1,
                        n_head=2, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        id2label={0: "other", 1: "positive"},
                        label2id={"other": 0, "positive": 1})
    clf = GPT2ForSequenceClassification(config).to(device)
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    batch = 64
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch,), device=device)
        out = clf(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                  labels=labels[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        pred = clf(**enc).logits.argmax(-1)
    return clf, float((pred == labels).float().mean())


def positive_share(clf, tokenizer, prior, x) -> float:
    texts = prior.decode(x)
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(prior.device)
    with torch.no_grad():
        return float((clf(**enc).logits.argmax(-1) == 1).float().mean())


def main(args):
    pyro.set_rng_seed(args.seed)
    prior = load_prior(args.device, args.model)
    tok = prior.tokenizer
    clf, acc = train_classifier(tok, args.num_docs, args.clf_steps, prior.device, args.seed)
    print(f"classifier accuracy on its training reviews: {acc:.3f}")
    reward = pyro_lm.rewards.Classifier(clf, tok, "positive", prior)
    model = reward_model(prior, reward, beta=args.beta, max_new_tokens=args.max_new_tokens)
    prompt = task_prompt(prior)
    prompts = [prompt]
    dist0 = pyro_lm.LMDistribution(prior, prompts, args.max_new_tokens)
    before = positive_share(clf, tok, prior, dist0.sample((args.num_eval,))[:, 0])
    policy = prior.trainable_copy()
    guide = pyro_lm.infer.AutoLMGuide(model, policy)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
                         loss=pyro_lm.infer.DPG(num_particles=args.num_particles))
    pyro_lm.infer.fit(svi, prompts, num_steps=args.steps, progress=not args.tiny)
    x = pyro_lm.LMDistribution(policy, prompts, args.max_new_tokens).sample((args.num_eval,))
    after = positive_share(clf, tok, prior, x[:, 0])
    print(f"positive share (classifier): prior {before:.3f} -> DPG guide {after:.3f}")
    for text in prior.decode(x[:3, 0]):
        print(f"    {prompt}{text if text[:1].isspace() else ' ' + text}")
    return {"accuracy": acc, "before": before, "after": after}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--num-docs", type=int, default=2000)
    p.add_argument("--clf-steps", type=int, default=150)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-particles", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-eval", type=int, default=256)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_docs, args.clf_steps, args.steps, args.num_particles = 200, 5, 2, 4
        args.num_eval, args.max_new_tokens = 16, 8
    return args


if __name__ == "__main__":
    main(parse_args())
