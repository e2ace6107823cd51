"""Build the bundled tiny language model ``models/tinylm`` from scratch.

The model is a 4-layer GPT-2 trained on the synthetic corpus of
:mod:`pyro_lm.data.grammar` with a word-level tokenizer, small enough to be
committed (a few MB) and trained on a 2-core CPU in a few minutes. It is the
prior that the examples and tests fine-tune towards targets such as "no
offensive words" or "half the biographies are about women".

Run from the repository root (no installation needed, nothing is
downloaded)::

    python models/build_tinylm.py --out models/tinylm

The build is deterministic: the same arguments on the same software stack
give a bitwise identical ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run without installing

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pyro_lm.data import (
    FEMALE_NAMES,
    FEMALE_RATE,
    MALE_NAMES,
    OFFENSIVE_RATES,
    OFFENSIVE_WORDS,
    SENTIMENT_RATES,
    generate_corpus,
    vocabulary,
)

#: Special tokens, in the order that gives them ids 0, 1, 2, 3.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
#: Number of held-out documents the held-out loss is measured on.
NUM_HELDOUT = 2000
#: Seed offset of the held-out corpus (disjoint from the training seed).
HELDOUT_SEED_OFFSET = 1_000_003
#: Maximum sequence length of the model.
N_POSITIONS = 128


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer over the grammar's vocabulary.

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the grammar's
    words follow in sorted order. Encoding prepends ``<bos>`` (a
    ``TemplateProcessing`` post-processor, as Llama 3's tokenizer does), so
    ``tokenizer(prompt)["input_ids"]`` is the context the model was trained
    to continue; ``add_special_tokens=False`` gives the words alone. Decoding
    joins tokens with single spaces (special tokens skipped on request), so
    ``decode(encode(text), skip_special_tokens=True)`` gives back any
    space-tokenised corpus text.

    :return: the tokenizer.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=N_POSITIONS,
    )


def encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Encode texts as ``[<bos>] + tokens + [<eos>]``, each special token once.

    :param tokenizer: the tokenizer (its own special tokens are not added:
        ``<bos>`` and ``<eos>`` are written here).
    :param texts: the documents.
    :return: one list of token ids per text.
    """
    return [
        [BOS_ID, *tokenizer.encode(text, add_special_tokens=False), EOS_ID] for text in texts
    ]


def collate(seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Right-pad sequences into a batch whose labels ignore the padding.

    :param seqs: token id sequences.
    :return: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on
        padding) tensors of shape ``(len(seqs), max_len)``.
    """
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def mean_nll(model: GPT2LMHeadModel, seqs: Sequence[Sequence[int]], batch_size: int = 256) -> float:
    """Mean negative log-likelihood per predicted token (nats).

    :param model: the language model.
    :param seqs: ``<bos>``-prefixed token id sequences.
    :param batch_size: evaluation batch size.
    :return: total NLL divided by the number of predicted tokens.
    """
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = collate(seqs[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((targets != -100).sum())
    return total / count


@torch.no_grad()
def sample(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    n: int,
    generator: torch.Generator,
    max_new_tokens: int = 40,
) -> list[str]:
    """Draw ``n`` ancestral samples continuing ``<bos> prompt``.

    :param model: the language model.
    :param tokenizer: its tokenizer.
    :param prompt: the text after ``<bos>``, e.g. ``"bio :"``.
    :param n: number of samples.
    :param generator: the random generator used for sampling.
    :param max_new_tokens: length limit of each continuation.
    :return: the decoded documents (prompt included, ``<eos>`` excluded).
    """
    model.eval()
    ids = torch.tensor([[BOS_ID, *tokenizer.encode(prompt, add_special_tokens=False)]] * n)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
        nxt = nxt.masked_fill(done, PAD_ID)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == EOS_ID
        if done.all():
            break
    texts = []
    for row in ids.tolist():
        row = row[1:]
        if EOS_ID in row:
            row = row[: row.index(EOS_ID)]
        texts.append(tokenizer.decode(row))
    return texts


def female_share(bios: Sequence[str]) -> float:
    """Share of biographies whose first name is a female one.

    :param bios: sampled biography texts.
    :return: female / (female + male) among texts naming someone, or NaN.
    """
    female = male = 0
    for text in bios:
        name = next((w for w in text.split() if w in FEMALE_NAMES or w in MALE_NAMES), None)
        female += name in FEMALE_NAMES
        male += name in MALE_NAMES
    return female / (female + male) if female + male else math.nan


def train(
    model: GPT2LMHeadModel,
    seqs: Sequence[Sequence[int]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Train with AdamW, linear warm-up then cosine decay to 10% of ``lr``.

    Batches are drawn by reshuffling the training set every epoch with a
    private :class:`random.Random`.

    :param model: the model to train in place.
    :param seqs: training sequences.
    :param steps: number of optimizer steps.
    :param batch_size: sequences per step.
    :param lr: peak learning rate.
    :param seed: seed of the batch order.
    :return: the training loss of every step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(seqs)))
            rng.shuffle(order)
        batch = collate([seqs[i] for i in order[:batch_size]])
        del order[:batch_size]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return losses


def write_model_card(
    out: Path, command: str, facts: dict[str, object], samples: dict[str, list[str]]
) -> None:
    """Write ``README.md`` describing the model and how it was built.

    :param out: the model directory.
    :param command: the exact command that built it.
    :param facts: measured numbers, keyed by name (see the template below).
    :param samples: a few sampled documents per prompt.
    """
    timing = (
        f"{facts['train_seconds']:.0f} s wall-clock ({facts['train_cpu_seconds']:.0f} s CPU)"
        f" on a 2-core CPU, torch {torch.__version__}"
    )
    offensive_rate = round(sum(SENTIMENT_RATES[s] * OFFENSIVE_RATES[s] for s in SENTIMENT_RATES), 3)
    shown = "\n".join(f"    {text}" for texts in samples.values() for text in texts)
    card = f"""# tinylm: the bundled tiny language model of pyro_lm

A 4-layer GPT-2 (`GPT2LMHeadModel`: 4 layers, 4 heads, width 128, context
{N_POSITIONS} tokens, no dropout) trained from scratch on the synthetic corpus
of `pyro_lm.data.grammar`: product reviews (`review : ...`) and short
biographies (`bio : ...`). It is the prior that the examples and tests
fine-tune towards known targets ("no offensive words", "positive sentiment",
"half the biographies are about women"); it is not useful for anything else.

## Built with

    {command}

(`make models` runs it with the default arguments). The build is deterministic: it
generates {facts["num_docs"]} training documents with
`pyro_lm.data.generate_corpus(seed={facts["seed"]})`, trains for
{facts["steps"]} AdamW steps of {facts["batch_size"]} sequences
`<bos> document <eos>` (peak learning rate {facts["lr"]}, warm-up then cosine
decay, loss masked on padding), with a fixed seed,
`torch.use_deterministic_algorithms(True)` and {facts["threads"]} threads.
Rebuilding with the same command and software gives the same
`model.safetensors` (sha256 `{facts["sha256"]}`).

## Tokenizer

Word level (`tokenizers` `WordLevel` model, `WhitespaceSplit`
pre-tokenizer), {facts["vocab_size"]} tokens: `<pad>`=0, `<bos>`=1,
`<eos>`=2, `<unk>`=3, then every word of `pyro_lm.data.vocabulary()` in
sorted order. Encoding prepends `<bos>` (a `TemplateProcessing`
post-processor), so `tokenizer(prompt)["input_ids"]` is the context the model
was trained on; decoding joins tokens with spaces.

## Numbers

| | |
|---|---|
| parameters | {facts["num_params"]:,} (input and output embeddings tied) |
| `model.safetensors` | {facts["size_bytes"]:,} bytes, float32 |
| final train loss (mean NLL per token over the training set) | {facts["train_loss"]:.4f} nats |
| held-out loss ({NUM_HELDOUT} fresh documents) | {facts["heldout_loss"]:.4f} nats |
| training time | {timing} |
| female share, 200 sampled bios | {facts["female_share"]:.3f} (corpus {FEMALE_RATE}) |
| offensive share, 200 sampled reviews | {facts["offensive_share"]:.3f} (corpus {offensive_rate}) |

Wall-clock time depends on other load on the machine; CPU time is the steadier figure.

## Samples

{shown}
"""
    (out / "README.md").write_text(card)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    :param argv: arguments (defaults to ``sys.argv[1:]``).
    :return: the parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/tinylm", help="output directory")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    parser.add_argument("--num-docs", type=int, default=20000, help="training documents")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Build the tokenizer and model, train, evaluate, save and describe them.

    :param args: the parsed command line (see :func:`parse_args`).
    """
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    probe = "review : the blender is great ."
    if tokenizer.decode(tokenizer.encode(probe), skip_special_tokens=True) != probe:
        raise RuntimeError("the tokenizer does not round-trip corpus text")
    train_docs = generate_corpus(args.num_docs, seed=args.seed)
    heldout_docs = generate_corpus(NUM_HELDOUT, seed=args.seed + HELDOUT_SEED_OFFSET)
    train_seqs = encode(tokenizer, [d.text for d in train_docs])
    heldout_seqs = encode(tokenizer, [d.text for d in heldout_docs])
    if any(UNK_ID in s for s in train_seqs + heldout_seqs):
        raise RuntimeError("the corpus contains words outside the vocabulary")

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    model = GPT2LMHeadModel(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"vocabulary {len(tokenizer)} tokens, {num_params:,} parameters", flush=True)

    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, train_seqs, args.steps, args.batch_size, args.lr, args.seed)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start
    print(f"training took {train_seconds:.1f} s ({train_cpu_seconds:.1f} s CPU)", flush=True)

    train_loss = mean_nll(model, train_seqs)
    heldout_loss = mean_nll(model, heldout_seqs)
    print(f"train loss {train_loss:.4f}, held-out loss {heldout_loss:.4f}")

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_length=N_POSITIONS
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    print(f"{weights}: {weights.stat().st_size:,} bytes, sha256 {sha256}")

    generator = torch.Generator().manual_seed(args.seed)
    reviews = sample(model, tokenizer, "review :", 200, generator)
    bios = sample(model, tokenizer, "bio :", 200, generator)
    for text in reviews[:20] + bios[:20]:
        print("  ", text)
    offensive = set(OFFENSIVE_WORDS)
    offensive_share = sum(bool(offensive & set(t.split())) for t in reviews) / len(reviews)
    share = female_share(bios)
    print(f"female share of 200 sampled bios: {share:.3f}")
    print(f"sampled reviews with an offensive word: {offensive_share:.3f}")

    command = (
        f"python models/build_tinylm.py --out {args.out} --steps {args.steps} --seed {args.seed}"
        f" --num-docs {args.num_docs} --batch-size {args.batch_size} --lr {args.lr}"
        f" --threads {args.threads}"
    )
    facts = {
        **vars(args),
        "sha256": sha256,
        "vocab_size": len(tokenizer),
        "num_params": num_params,
        "size_bytes": weights.stat().st_size,
        "train_loss": train_loss,
        "heldout_loss": heldout_loss,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "female_share": share,
        "offensive_share": offensive_share,
    }
    write_model_card(out, command, facts, {"review": reviews[:5], "bio": bios[:5]})


if __name__ == "__main__":
    main(parse_args())
