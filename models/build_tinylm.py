"""Build the bundled tiny language models ``models/tinylm`` and ``models/tinylm-bpe``.

Both are 4-layer GPT-2s trained from scratch on the synthetic corpus of
:mod:`pyro_lm.data.grammar`, small enough to be committed (a few MB) and
trained on a 2-core CPU in a few minutes. They are the priors that the
examples and tests fine-tune towards targets such as "no offensive words" or
"half the biographies are about women". They differ in their text and
tokenizer:

* ``--tokenizer word`` (``models/tinylm``): the space-tokenised lower-case
  corpus (``review : this heater is sturdy .``) read one word per token;
* ``--tokenizer bpe`` (``models/tinylm-bpe``): the corpus written as prose by
  :func:`pyro_lm.data.prose` (``Review: This heater is sturdy.``) read by a
  byte-level BPE trained on it, so that words take one or several tokens and
  most tokens carry their leading space, as with GPT-2, Llama 3 or Qwen.

Both tokenizers prepend their BOS token themselves (``tokenizer(prompt)``
is the context the model was trained to continue), as Llama 3's does.

Run from the repository root (no installation needed, nothing is
downloaded)::

    python models/build_tinylm.py --out models/tinylm
    python models/build_tinylm.py --tokenizer bpe --out models/tinylm-bpe

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run without installing

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pyro_lm.data import (
    FEMALE_NAMES,
    FEMALE_RATE,
    MALE_NAMES,
    OFFENSIVE_RATES,
    OFFENSIVE_WORDS,
    SENTIMENT_RATES,
    generate_corpus,
    prose,
    unprose,
    vocabulary,
)

#: Special tokens of the word-level tokenizer, in the order that gives them ids 0, 1, 2, 3.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Special tokens of the byte-level BPE (pad, BOS, EOS), ids 0, 1, 2, in GPT-2's spelling.
BPE_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|endoftext|>")
#: Ids of pad, BOS and EOS, the same in both tokenizers; ``UNK_ID`` is the word level's only.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
#: Default vocabulary size of the byte-level BPE (see :func:`build_bpe_tokenizer`).
BPE_VOCAB_SIZE = 512
#: Words whose pieces the model card shows (as the byte-level pre-tokenizer cuts them).
CARD_WORDS = ("Ġdisappointing", "Ġsturdy", "ĠChicago")
#: Number of held-out documents the held-out loss is measured on.
NUM_HELDOUT = 2000
#: Seed offset of the held-out corpus (disjoint from the training seed).
HELDOUT_SEED_OFFSET = 1_000_003
#: Maximum sequence length of the model.
N_POSITIONS = 128


@dataclass(frozen=True)
class Flavour:
    """What distinguishes the two bundled models.

    :param name: the directory name under ``models/``.
    :param write: maps a corpus document's text to the text the model reads.
    :param prompts: the review and biography prompts the samples continue.
    :param max_new_tokens: length limit of a sampled continuation.
    :param steps: default number of optimizer steps.
    """

    name: str
    write: Callable[[str], str]
    prompts: tuple[str, str]
    max_new_tokens: int
    steps: int


def _identity(text: str) -> str:
    return text


#: The two tokenizers, keyed by the value of ``--tokenizer``. The BPE reads a document in
#: about 1.7 times as many tokens (28 against 17.5 with BOS and EOS), so 1500 steps train it on
#: about as many tokens (1.3 million) as tinylm's 2500.
FLAVOURS = {
    "word": Flavour("tinylm", _identity, ("review :", "bio :"), 40, 2500),
    "bpe": Flavour("tinylm-bpe", prose, ("Review:", "Bio:"), 64, 1500),
}


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


def build_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int = BPE_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``, as GPT-2's and Llama 3's tokenizers are made.

    Ids 0-2 are ``<|pad|>``, ``<|bos|>``, ``<|endoftext|>`` (the EOS), then the
    256 byte symbols, then the merges in the order they were learnt. Text is
    split GPT-2's way (``ByteLevel`` pre-tokenizer without an added prefix
    space), so a word inside a sentence is read with its leading space
    (``" sturdy"``), and a word is one token or several depending on how often
    the training text has it. Training is deterministic: the merges depend on
    the texts only. Encoding prepends ``<|bos|>`` (Llama 3's post-processor);
    decoding is exact, so ``decode(encode(text), skip_special_tokens=True)``
    gives back any text.

    :param texts: the training text, one document per item.
    :param int vocab_size: the size of the vocabulary, special tokens and the
        256 bytes included.
    :return: the tokenizer.
    :raises ValueError: if ``vocab_size`` leaves no room for merges.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(BPE_SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(
            f"vocab_size: {vocab_size} leaves no room for merges after the "
            f"{len(BPE_SPECIAL_TOKENS)} special tokens and {len(alphabet)} bytes; "
            f"pass more than {len(BPE_SPECIAL_TOKENS) + len(alphabet)}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    pad, bos, eos = BPE_SPECIAL_TOKENS
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, BOS_ID)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
        model_max_length=N_POSITIONS,
    )


def check_tokenizer(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> None:
    """Check that the tokenizer reads the corpus as the model card says.

    :param tokenizer: a tokenizer of :func:`build_tokenizer` or :func:`build_bpe_tokenizer`.
    :param texts: documents as the model reads them.
    :raises RuntimeError: if a text does not round-trip, uses ``<unk>``, or if
        the special tokens do not have ids 0, 1, 2.
    """
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids != (PAD_ID, BOS_ID, EOS_ID):
        raise RuntimeError(f"pad, BOS and EOS have ids {ids}, not {(PAD_ID, BOS_ID, EOS_ID)}")
    for text in texts:
        encoded = tokenizer(text)["input_ids"]
        if encoded[0] != BOS_ID or BOS_ID in encoded[1:]:
            raise RuntimeError(f"the tokenizer does not start {text!r} with one BOS: {encoded}")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in encoded:
            raise RuntimeError(f"{text!r} contains words outside the vocabulary")
        if tokenizer.decode(encoded, skip_special_tokens=True) != text:
            raise RuntimeError(f"the tokenizer does not round-trip corpus text {text!r}")


def tokenizer_stats(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> dict[str, object]:
    """How the tokenizer splits text into tokens.

    A *word* here is what the tokenizer's pre-tokenizer cuts the text into
    before its model reads it, letters only (``" sturdy"`` with its leading
    space for the BPE, ``"sturdy"`` for the word level; punctuation apart).

    :param tokenizer: the tokenizer.
    :param texts: documents as the model reads them.
    :return: ``tokens_per_word`` (tokens over whitespace-separated words,
        punctuation included), ``tokens_per_doc``, ``split_share`` (share of
        the distinct words that take several tokens), ``leading_space``
        (tokens of the vocabulary that start with a space) and ``examples``
        (the pieces of the words of :data:`CARD_WORDS` that the texts have).
    """
    backend = tokenizer.backend_tokenizer
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    words = sorted(
        {w for text in texts for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)
         if any(c.isalpha() for c in w)}
    )
    pieces = {
        w: [tokenizer.convert_tokens_to_string([t.value]) for t in backend.model.tokenize(w)]
        for w in words
    }
    vocab = tokenizer.get_vocab()
    leading = [t for t in vocab if tokenizer.convert_tokens_to_string([t]).startswith(" ")]
    several = [w for w in words if len(pieces[w]) > 1]
    return {
        "tokens_per_word": sum(map(len, rows)) / sum(len(t.split()) for t in texts),
        "tokens_per_doc": sum(map(len, rows)) / len(rows),
        "split_share": len(several) / len(words),
        "num_words": len(words),
        "leading_space": len(leading),
        "examples": {w: pieces[w] for w in CARD_WORDS if w in pieces},
    }


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
    """Draw ``n`` ancestral samples continuing ``tokenizer(prompt)`` (``<bos>`` first).

    :param model: the language model.
    :param tokenizer: its tokenizer.
    :param prompt: the text after ``<bos>``, e.g. ``"bio :"``.
    :param n: number of samples.
    :param generator: the random generator used for sampling.
    :param max_new_tokens: length limit of each continuation.
    :return: the decoded documents (prompt included, ``<bos>`` and ``<eos>`` excluded).
    """
    model.eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]] * n)
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

    :param bios: sampled biography texts (space-tokenised or prose).
    :return: female / (female + male) among texts naming someone, or NaN.
    """
    female = male = 0
    for text in bios:
        words = unprose(text).split()
        name = next((w for w in words if w in FEMALE_NAMES or w in MALE_NAMES), None)
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


def _describe(kind: str, facts: dict[str, object]) -> tuple[str, str, str]:
    """The kind-specific parts of the model card: title, corpus and tokenizer.

    :param kind: ``"word"`` or ``"bpe"``.
    :param facts: measured numbers (see :func:`write_model_card`).
    :return: the title line, the corpus sentence and the tokenizer section.
    """
    if kind == "word":
        return (
            "tinylm: the bundled tiny language model of pyro_lm",
            "of `pyro_lm.data.grammar`: product reviews (`review : ...`) and short\n"
            "biographies (`bio : ...`)",
            f"""Word level (`tokenizers` `WordLevel` model, `WhitespaceSplit`
pre-tokenizer), {facts["vocab_size"]} tokens: `<pad>`=0, `<bos>`=1,
`<eos>`=2, `<unk>`=3, then every word of `pyro_lm.data.vocabulary()` in
sorted order. Encoding prepends `<bos>` (a `TemplateProcessing`
post-processor), so `tokenizer(prompt)["input_ids"]` is the context the model
was trained on; decoding joins tokens with spaces.""",
        )
    stats = facts["tokenizer_stats"]
    why = (
        "It is the smallest size tried (512, 768, 1024) and already splits words as a\n"
        "real BPE does: the frequent words are single tokens, the rarer ones several; at\n"
        "1024 the vocabulary saturates (1017 tokens, every word of the corpus one token)\n"
        "and nothing is split any more."
        if facts["vocab_size"] == BPE_VOCAB_SIZE
        else f"(The default size is {BPE_VOCAB_SIZE}.)"
    )
    examples = ", ".join(
        f"`{''.join(parts)!r}` → {' + '.join(f'`{p!r}`' for p in parts)}"
        for parts in stats["examples"].values()
    )
    return (
        "tinylm-bpe: the bundled tiny language model of pyro_lm with a byte-level BPE",
        "of `pyro_lm.data.grammar` written as prose by `pyro_lm.data.prose`:\n"
        "product reviews (`Review: ...`) and short biographies (`Bio: ...`), with\n"
        "capitals and attached punctuation",
        f"""Byte-level BPE as GPT-2's and Llama 3's (`tokenizers` `BPE` model,
`ByteLevel(add_prefix_space=False)` pre-tokenizer and decoder, `BpeTrainer`
over the 256 bytes), trained on the {facts["num_docs"]} training documents:
{facts["vocab_size"]} tokens, `<|pad|>`=0, `<|bos|>`=1, `<|endoftext|>`=2
(the EOS), then the bytes and {facts["vocab_size"] - len(BPE_SPECIAL_TOKENS) - 256} merges.
{why} On the {NUM_HELDOUT} held-out documents:
{stats["tokens_per_word"]:.2f} tokens per word (punctuation included),
{stats["tokens_per_doc"]:.1f} tokens per document;
{stats["split_share"]:.0%} of the {stats["num_words"]} distinct words take several
tokens ({examples}); {stats["leading_space"]} tokens start with a space. Encoding
prepends `<|bos|>` (Llama 3's post-processor), so
`tokenizer(prompt)["input_ids"]` is the context the model was trained on;
decoding gives back the text exactly.""",
    )


def write_model_card(
    out: Path, kind: str, command: str, facts: dict[str, object], samples: dict[str, list[str]]
) -> None:
    """Write ``README.md`` describing the model and how it was built.

    :param out: the model directory.
    :param kind: the tokenizer, ``"word"`` or ``"bpe"``.
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
    title, corpus, tokenizer = _describe(kind, facts)
    bos, eos = facts["bos_token"], facts["eos_token"]
    card = f"""# {title}

A 4-layer GPT-2 (`GPT2LMHeadModel`: 4 layers, 4 heads, width 128, context
{N_POSITIONS} tokens, no dropout) trained from scratch on the synthetic corpus
{corpus}. It is the prior that the examples and tests
fine-tune towards known targets ("no offensive words", "positive sentiment",
"half the biographies are about women"); it is not useful for anything else.

## Built with

    {command}

(`make models` runs it with the default arguments). The build is deterministic: it
generates {facts["num_docs"]} training documents with
`pyro_lm.data.generate_corpus(seed={facts["seed"]})`, trains for
{facts["steps"]} AdamW steps of {facts["batch_size"]} sequences
`{bos} document {eos}` (peak learning rate {facts["lr"]}, warm-up then cosine
decay, loss masked on padding), with a fixed seed,
`torch.use_deterministic_algorithms(True)` and {facts["threads"]} threads.
Rebuilding with the same command and software gives the same
`model.safetensors` (sha256 `{facts["sha256"]}`).

## Tokenizer

{tokenizer}

## Numbers

| | |
|---|---|
| parameters | {facts["num_params"]:,} (input and output embeddings tied) |
| `model.safetensors` | {facts["size_bytes"]:,} bytes, float32 |
| final train loss (mean NLL per token over the training set) | {facts["train_loss"]:.4f} nats |
| held-out loss ({NUM_HELDOUT} fresh documents) | {facts["heldout_loss"]:.4f} nats |
| held-out NLL per document (comparable across tokenizers) | {facts["heldout_doc_nll"]:.2f} nats |
| training time | {timing} |
| female share, 200 sampled bios | {facts["female_share"]:.3f} (corpus {FEMALE_RATE}) |
| offensive share, 200 sampled reviews | {facts["offensive_share"]:.3f} (corpus {offensive_rate}) |

Wall-clock time depends on other load on the machine; CPU time is the steadier figure.

## Samples

{shown}
"""
    (out / "README.md").write_text(card)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; defaults that depend on ``--tokenizer`` are filled in.

    :param argv: arguments (defaults to ``sys.argv[1:]``).
    :return: the parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", choices=sorted(FLAVOURS), default="word",
        help="word level on the space-tokenised corpus (tinylm), or byte-level BPE on the "
        "corpus as prose (tinylm-bpe)",
    )
    parser.add_argument("--out", default=None, help="output directory (default: models/<name>)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: 2500 word, 1500 bpe)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"BPE vocabulary size (bpe only; default {BPE_VOCAB_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    parser.add_argument("--num-docs", type=int, default=20000, help="training documents")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    flavour = FLAVOURS[args.tokenizer]
    if args.vocab_size is not None and args.tokenizer != "bpe":
        parser.error("--vocab-size: only the bpe tokenizer has a size to choose; "
                     "the word level has one token per word of the grammar")
    if args.tokenizer == "bpe" and args.vocab_size is None:
        args.vocab_size = BPE_VOCAB_SIZE
    if args.out is None:
        args.out = f"models/{flavour.name}"
    if args.steps is None:
        args.steps = flavour.steps
    return args


def command_line(args: argparse.Namespace) -> str:
    """The command that rebuilds exactly what ``args`` builds (every default written out).

    :param args: the parsed command line.
    :return: the command.
    """
    kind = "" if args.tokenizer == "word" else f" --tokenizer {args.tokenizer}"
    vocab = "" if args.vocab_size is None else f" --vocab-size {args.vocab_size}"
    return (
        f"python models/build_tinylm.py{kind} --out {args.out} --steps {args.steps}{vocab}"
        f" --seed {args.seed} --num-docs {args.num_docs} --batch-size {args.batch_size}"
        f" --lr {args.lr} --threads {args.threads}"
    )


def main(args: argparse.Namespace) -> None:
    """Build the tokenizer and model, train, evaluate, save and describe them.

    :param args: the parsed command line (see :func:`parse_args`).
    """
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    flavour = FLAVOURS[args.tokenizer]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_texts = [flavour.write(d.text) for d in generate_corpus(args.num_docs, seed=args.seed)]
    heldout_texts = [
        flavour.write(d.text)
        for d in generate_corpus(NUM_HELDOUT, seed=args.seed + HELDOUT_SEED_OFFSET)
    ]
    if args.tokenizer == "word":
        tokenizer = build_tokenizer()
    else:
        tokenizer = build_bpe_tokenizer(train_texts, args.vocab_size)
    check_tokenizer(tokenizer, train_texts[:500] + heldout_texts)
    stats = tokenizer_stats(tokenizer, heldout_texts)
    train_seqs = encode(tokenizer, train_texts)
    heldout_seqs = encode(tokenizer, heldout_texts)
    longest = max(map(len, train_seqs + heldout_seqs))
    if longest > N_POSITIONS:
        raise RuntimeError(
            f"a document takes {longest} tokens, more than the context of {N_POSITIONS}"
        )
    print(f"{stats['tokens_per_word']:.3f} tokens per word, {stats['split_share']:.1%} of words"
          f" split, {stats['leading_space']} leading-space tokens, longest document {longest}")

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
    heldout_doc_nll = heldout_loss * sum(len(s) - 1 for s in heldout_seqs) / len(heldout_seqs)
    print(f"train loss {train_loss:.4f}, held-out loss {heldout_loss:.4f}"
          f" ({heldout_doc_nll:.2f} nats per document)")

    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_length=N_POSITIONS
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    weights = out / "model.safetensors"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    print(f"{weights}: {weights.stat().st_size:,} bytes, sha256 {sha256}")

    generator = torch.Generator().manual_seed(args.seed)
    review_prompt, bio_prompt = flavour.prompts
    reviews = sample(model, tokenizer, review_prompt, 200, generator, flavour.max_new_tokens)
    bios = sample(model, tokenizer, bio_prompt, 200, generator, flavour.max_new_tokens)
    for text in reviews[:20] + bios[:20]:
        print("  ", text)
    offensive = set(OFFENSIVE_WORDS)
    offensive_share = sum(bool(offensive & set(unprose(t).split())) for t in reviews) / len(reviews)
    share = female_share(bios)
    print(f"female share of 200 sampled bios: {share:.3f}")
    print(f"sampled reviews with an offensive word: {offensive_share:.3f}")

    facts = {
        **vars(args),
        "sha256": sha256,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "tokenizer_stats": stats,
        "num_params": num_params,
        "size_bytes": weights.stat().st_size,
        "train_loss": train_loss,
        "heldout_loss": heldout_loss,
        "heldout_doc_nll": heldout_doc_nll,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "female_share": share,
        "offensive_share": offensive_share,
    }
    samples = {"review": reviews[:5], "bio": bios[:5]}
    write_model_card(out, args.tokenizer, command_line(args), facts, samples)


if __name__ == "__main__":
    main(parse_args())
