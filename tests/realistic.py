"""Tiny random models of real architectures, with tokenizers trained in the session.

What a user meets with a real checkpoint, without downloading one: a byte-level BPE
(GPT-2, Llama 3, Qwen2) or a SentencePiece-style BPE with byte fallback (Llama 2,
Mistral) trained here on the corpus written as prose, each with its model family's
conventions for BOS, EOS, padding and chat templates, and a random model of that
architecture saved with ``save_pretrained``. Everything is deterministic.

:func:`train_tokenizer` makes a tokenizer, :func:`tiny_model_dir` a saved model
directory; ``conftest.py`` wraps them as session fixtures.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pyro_lm.data import generate_corpus, prose

#: Extra lines for the tokenizers' training text: accented and non-Latin characters, so that
#: some characters take several byte tokens.
UNICODE_LINES = ("Review: The café is naïve, très chère.", "Bio: Zoë lives in Zürich — 東京 too.",
                 "Review: Great 🙂 phone.")


@dataclass(frozen=True)
class Convention:
    """A model family's tokenizer conventions.

    :param style: ``"byte_bpe"`` or ``"sentencepiece"``.
    :param bos: the BOS token (``None``: the family has none).
    :param eos: the EOS tokens; the first is the tokenizer's ``eos_token``, all are in
        the generation config's ``eos_token_id``.
    :param pad: the pad token (``None``: the tokenizer has none, as GPT-2's).
    :param adds_bos: the tokenizer's post-processor prepends ``bos``.
    :param chat_template: a Jinja chat template, or ``None``.
    """

    style: str
    bos: str | None
    eos: tuple[str, ...]
    pad: str | None = None
    adds_bos: bool = False
    chat_template: str | None = None
    extra: tuple[str, ...] = field(default=())


_LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

#: The conventions of each architecture's best-known checkpoints.
CONVENTIONS = {
    # GPT-2 and Pythia: one <|endoftext|> for BOS and EOS, never added, no pad token
    "gpt2": Convention("byte_bpe", "<|endoftext|>", ("<|endoftext|>",)),
    "gpt_neox": Convention("byte_bpe", "<|endoftext|>", ("<|endoftext|>",)),
    # Llama 3 instruct: BOS added by the tokenizer, two EOS ids, a chat template with BOS in it
    "llama": Convention("byte_bpe", "<|begin_of_text|>", ("<|eot_id|>", "<|end_of_text|>"),
                        adds_bos=True, chat_template=_LLAMA3_CHAT,
                        extra=("<|start_header_id|>", "<|end_header_id|>")),
    # Qwen2 instruct: no BOS at all, ChatML, pad distinct from EOS
    "qwen2": Convention("byte_bpe", None, ("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
                        chat_template=_CHATML, extra=("<|im_start|>",)),
    # Mistral (and Llama 2): SentencePiece pieces with byte fallback, <s> added
    "mistral": Convention("sentencepiece", "<s>", ("</s>",), adds_bos=True,
                          chat_template=_MISTRAL_CHAT, extra=("<unk>",)),
}

ARCHITECTURES = tuple(CONVENTIONS)


def corpus_text(n: int = 600, seed: int = 0) -> list[str]:
    """``n`` corpus documents as prose, plus :data:`UNICODE_LINES`."""
    return [prose(d.text) for d in generate_corpus(n, seed=seed)] + list(UNICODE_LINES)


def _specials(conv: Convention) -> list[str]:
    names = [t for t in (conv.pad, conv.bos, *conv.eos, *conv.extra) if t is not None]
    return list(dict.fromkeys(names))


def _byte_bpe(texts, vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _sentencepiece_bpe(texts, vocab_size: int, specials: list[str]) -> Tokenizer:
    """A Llama-2-style tokenizer: "▁" for spaces, BPE over characters, and the 256
    ``<0xNN>`` byte tokens for any character the merges do not cover."""
    base = Tokenizer(models.BPE())
    # trained on words split before each "▁", so that no piece spans two words
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                  split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False)
    base.train_from_iterator(texts, trainer)
    vocab = base.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    n_special = len(specials)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    new_order = ordered[:n_special] + byte_tokens + ordered[n_special:]
    new_vocab = {t: i for i, t in enumerate(new_order)}
    merges = base.model.get_merges() if hasattr(base.model, "get_merges") else None
    if merges is None:  # tokenizers without get_merges: read them from the serialisation
        import json

        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in json.loads(base.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=new_vocab, merges=merges, byte_fallback=True,
                               unk_token="<unk>" if "<unk>" in new_vocab else None,
                               fuse_unk=True))
    for t in specials:
        tok.add_special_tokens([t])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


@functools.cache
def train_tokenizer(arch: str, vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast`` trained on the corpus with ``arch``'s conventions.

    :param arch: a key of :data:`CONVENTIONS`.
    :param vocab_size: the BPE vocabulary size (byte-level needs more than 256 + specials).
    """
    from transformers import PreTrainedTokenizerFast

    conv = CONVENTIONS[arch]
    specials = _specials(conv)
    texts = corpus_text()
    if conv.style == "byte_bpe":
        backend = _byte_bpe(texts, vocab_size, specials)
    else:
        backend = _sentencepiece_bpe(texts, max(vocab_size - 256, len(specials) + 64), specials)
    if conv.adds_bos:
        bos_id = backend.token_to_id(conv.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{conv.bos} $A", pair=f"{conv.bos} $A {conv.bos} $B",
            special_tokens=[(conv.bos, bos_id)])
    kwargs = dict(eos_token=conv.eos[0], clean_up_tokenization_spaces=False)
    if conv.bos is not None:
        kwargs["bos_token"] = conv.bos
    if conv.pad is not None:
        kwargs["pad_token"] = conv.pad
    if "<unk>" in specials:
        kwargs["unk_token"] = "<unk>"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if conv.chat_template is not None:
        tok.chat_template = conv.chat_template
    return tok


def _config(arch: str, tok, hidden: int, layers: int):
    import transformers

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    vocab = len(tok)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=hidden,
                                       n_layer=layers, n_head=2, **ids)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden,
                                          num_hidden_layers=layers, num_attention_heads=2,
                                          intermediate_size=2 * hidden,
                                          max_position_embeddings=128, **ids)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=128, tie_word_embeddings=False, **ids)


def tiny_model_dir(arch: str, root: os.PathLike, hidden: int = 32, layers: int = 2,
                   seed: int = 0, init_std: float = 0.2) -> str:
    """Save a random ``arch`` model with its tokenizer and generation config under ``root``.

    ``init_std`` larger than transformers' default makes the next-token distributions
    peaked enough for statistical tests to tell them apart.

    :returns: the directory, loadable by ``CausalLM.from_pretrained``.
    """
    import transformers

    tok = train_tokenizer(arch)
    conv = CONVENTIONS[arch]
    config = _config(arch, tok, hidden, layers)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(t) for t in conv.eos]
        if len(conv.eos) > 1 else tok.eos_token_id)
    path = os.path.join(os.fspath(root), arch)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
