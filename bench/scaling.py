"""Sampling, KV reorders and log_prob memory at real model shapes, each against its floor.

    python bench/scaling.py [--quick] [--threads 2] [--repeats 5]

Three tables, every ratio measured in one run with the contenders' calls interleaved:

* **sampling**: ``LMDistribution.sample`` against the lean hand-written loop on the same
  decoder (``floors.sample_completions`` driving pyro_lm's decoder: the least bookkeeping
  a sampler can do), against a plain transformers loop with a ``DynamicCache``
  (``floors.sample_completions``), transformers ``generate`` (T = 20) and, for the Llama
  model (the generic decoder), a transformers loop with a ``StaticCache``. Models: GPT-2
  2 layers x 64 wide with vocab 64 (the peers' task), GPT-2 4 x 256 with vocab 8192,
  Llama 4 x 256 with vocab 8192 and GPT-2 12 x 768 with vocab 50257 (GPT-2 small's shape,
  124M parameters; batch 1, 8, 64 at T = 20), all random. Every call starts from the same
  seed, so all contenders draw the same tokens and stop at the same step (same work). Ratios are
  speed ratios: above 1, pyro_lm is faster.
* **reorder**: one KV-cache reorder of ``GPT2Decoder`` (N = 64) at t = 25, 100, 400
  filled positions: the full gather of every row (what every resample did before) against
  a resample that changes 10% or 50% of the rows (only those are copied).
* **log_prob memory**: peak resident memory of ``LMDistribution.log_prob`` at B = 64,
  T = 100 and 400, V = 50257 (GPT-2 2 x 64 body), without gradients and forward +
  backward, with the body's activations kept for backward (``activation_checkpointing=
  False``) and recomputed there (``True``), the bytes autograd saves for backward (in
  the forward pass) and the time of one forward + backward, the two calls interleaved;
  the plain path (every chunk's log-softmax kept for backward, as before) at T = 100.
  *default* marks the case ``activation_checkpointing=None`` takes: checkpointed when
  the activations kept exceed the default ``memory_budget`` (``4 * LOG_PROB_BUDGET``
  bytes). Peak memory is the process's high-water RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each case) above the RSS before it (freed heap
  memory returned to the system first, with glibc's ``malloc_trim``).

``--quick`` shrinks every table to a smoke run (without the 124M model) and leaves
RESULTS.md alone; ``--only memory`` (or ``sampling``, ``sampling-124m``, ``reorder``) runs
that part alone, also leaving RESULTS.md alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import base_parser, interleaved, machine, table, write_section  # noqa: E402
from floors import _draw, sample_completions  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.distributions.lm_distribution import LOG_PROB_BUDGET  # noqa: E402
from pyro_lm.lm import toy_lm, toy_tokenizer  # noqa: E402
from pyro_lm.lm.decoding import make_decoder  # noqa: E402


def gpt2(n_layer, n_embd, vocab, positions=512):
    return toy_lm(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=max(2, n_embd // 64),
                  n_positions=positions, init_std=0.02)


def llama(n_layer, hidden, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_layer, num_attention_heads=max(2, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return pyro_lm.CausalLM(LlamaForCausalLM(config), toy_tokenizer(vocab))


def static_cache_completions(lm, prompt, n, t, eos, pad):
    """A transformers loop with a ``StaticCache`` (the same draw and stopping rule as the
    other floors)."""
    from transformers import StaticCache

    model = lm.model
    key = "cache" if lm._cache_arg == "cache" else "past_key_values"
    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + t)
    ids = prompt.expand(n, -1)
    out = model(ids, **{key: cache}, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    x = torch.full((n, t), pad, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    position = torch.tensor([length])
    for step in range(t):
        token = _draw(logits).masked_fill_(done, pad)
        x[:, step] = token
        done |= token == eos
        if step + 1 == t or bool(done.all()):
            break
        out = model(token[:, None], **{key: cache}, use_cache=True, cache_position=position)
        logits = out.logits[:, -1].float()
        position = position + 1
    return x


def seeded(fn):
    """``fn`` run from seed 0 on every call: every contender draws the same tokens."""
    def call():
        torch.manual_seed(0)
        return fn()
    return call


def sampling_rows(name, lm, batches, lengths, repeats, generate):
    rows = []
    prompt = torch.tensor([[1, 2, 3]])
    eos, pad = lm.eos_token_id, lm.pad_token_id
    is_llama = "Llama" in type(lm.model).__name__
    for t in lengths:
        for b in batches:
            ids = prompt.expand(b, -1)
            mask = torch.ones_like(ids)
            dist = pyro_lm.LMDistribution(lm, ids, t)

            def lean(b=b, t=t, ids=ids, mask=mask):
                with torch.inference_mode():
                    return sample_completions(lm.model, prompt, b, t, eos, pad,
                                              decoder=make_decoder(lm, ids, mask, t))

            fns = {"pyro_lm": dist.sample, "lean": lean,
                   "hf loop": lambda b=b, t=t: sample_completions(lm.model, prompt, b, t, eos,
                                                                  pad)}
            if is_llama:
                fns["static"] = lambda b=b, t=t: torch.inference_mode()(
                    static_cache_completions)(lm, prompt, b, t, eos, pad)
            if generate and t == 20:
                def hf_generate(ids=ids, mask=mask, t=t):
                    with torch.no_grad():
                        return lm.model.generate(ids, attention_mask=mask, do_sample=True,
                                                 top_k=0, top_p=1.0, temperature=1.0,
                                                 max_new_tokens=t, pad_token_id=pad,
                                                 eos_token_id=eos)
                fns["generate"] = hf_generate
            heavy = b * t >= 6400
            med = interleaved({k: seeded(f) for k, f in fns.items()},
                              repeats=max(3, repeats // 2) if heavy else repeats, warmup=1)
            ours = med["pyro_lm"]
            ratios = [f"{med[k] / ours:.2f}" if k in med else ""
                      for k in ("lean", "hf loop", "generate", "static")]
            rows.append([name, b, t, f"{ours / t * 1e3:.2f}", *ratios])
            print(rows[-1], flush=True)
    return rows


def _time_reorders(lm, n, t, repeats, generator):
    """Median seconds of the old full gather and of reorders changing 10% / 50% of rows."""
    prompt = torch.tensor([[1, 2, 3]]).expand(n, -1)
    decoder = make_decoder(lm, prompt, torch.ones_like(prompt), t)
    decoder.length = prompt.shape[1] + t - 1  # as if t - 1 tokens were fed
    full = torch.randint(0, n, (n,), generator=generator).sort().values

    def partial(share):
        index = torch.arange(n)
        rows = torch.randperm(n, generator=generator)[: int(share * n)]
        index[rows] = (rows + torch.randint(1, n, rows.shape, generator=generator)) % n
        return index

    ten, half = partial(0.1), partial(0.5)
    spare = torch.empty_like(decoder._kv)

    def old():  # every filled row gathered into a spare buffer, as before
        filled = decoder.length
        torch.index_select(decoder._kv[..., :filled, :], 2, full, out=spare[..., :filled, :])

    return interleaved({"full": old, "10%": lambda: decoder.reorder(ten, logits=False),
                        "50%": lambda: decoder.reorder(half, logits=False)},
                       repeats=repeats * 4, warmup=2)


def reorder_rows(name, lm, lengths, repeats, n=64):
    rows = []
    generator = torch.Generator().manual_seed(0)
    for t in lengths:
        with torch.inference_mode():
            med = _time_reorders(lm, n, t, repeats, generator)
        rows.append([name, n, t, f"{med['full'] * 1e3:.3f}", f"{med['10%'] * 1e3:.3f}",
                     f"{med['full'] / med['10%']:.1f}", f"{med['50%'] * 1e3:.3f}",
                     f"{med['full'] / med['50%']:.1f}"])
        print(rows[-1], flush=True)
    return rows


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_mb(fn) -> float:
    """High-water RSS above the current RSS while ``fn`` runs (MiB). Memory freed earlier
    is first returned to the system (glibc ``malloc_trim``), so that ``fn``'s allocations
    cannot hide in it."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


def saved_mb(fn) -> float:
    """MiB autograd saves for backward while ``fn`` runs (each storage once)."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values()) / 2**20


@contextlib.contextmanager
def plain_head(guide):
    """The head as an ordinary module (every chunk's logits kept for backward, as before
    the head was recomputed)."""
    cls = type(guide)
    prop = cls.linear_head
    cls.linear_head = property(lambda self: None)
    try:
        yield
    finally:
        cls.linear_head = prop


def memory_rows(b, lengths, plain_lengths, repeats, vocab=50257):
    """The memory table: each case's peak measured in a fresh process of its own (a
    high-water mark is only the call's own in a process whose heap has not held the other
    cases' buffers: measured after them, T = 400's no-gradient peak read 715 MiB, 477 alone),
    the saved bytes and times in one more."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    threads = torch.get_num_threads()

    def run(fn, *args):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            return pool.submit(fn, *args).result()

    for t in lengths:
        labels = [label for label, _ in _MEMORY_CASES
                  if t in plain_lengths or label != "forward + backward, plain (before)"]
        peaks = {label: run(_peak_at, b, t, label, vocab, threads) for label in labels}
        rows += run(_memory_rows_at, b, t, labels, peaks, repeats, vocab, threads)
    return rows


#: The memory table's cases: label, and the log_prob path (``None``: no gradient).
_MEMORY_CASES = [("no gradient", None), ("forward + backward", False),
                 ("forward + backward, checkpointed", True),
                 ("forward + backward, plain (before)", "plain")]


def _memory_setup(b, t, vocab, threads):
    """``(x, dists, guide, call)``: completions, the two log_prob paths and ``call(key)``
    running one case (:data:`_MEMORY_CASES`); the gradients' own memory is allocated."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm = gpt2(2, 64, vocab, positions=512)
    guide = lm.trainable_copy()
    prompt = torch.tensor([[1, 2, 3]]).expand(b, -1)
    x = pyro_lm.LMDistribution(lm, prompt, t).sample()
    dists = {c: pyro_lm.LMDistribution(guide, prompt, t, activation_checkpointing=c)
             for c in (False, True)}

    def call(key):
        if key is None:
            with torch.no_grad():
                dists[False].log_prob(x)
            return
        guide.zero_grad(set_to_none=True)
        with plain_head(guide) if key == "plain" else contextlib.nullcontext():
            dists[key is True].log_prob(x).sum().backward()

    call(True)  # the gradients' own memory, allocated once, is not the log_prob's
    return x, dists, guide, call


def _peak_at(b, t, label, vocab, threads):
    """The peak MiB of one case, in a process that ran nothing else (see :func:`peak_mb`)."""
    _, _, _, call = _memory_setup(b, t, vocab, threads)
    key = dict(_MEMORY_CASES)[label]
    return peak_mb(lambda: call(key))


def _memory_rows_at(b, t, labels, peaks, repeats, vocab, threads):
    """The memory table's rows at length ``t``: the ``peaks`` given, saved bytes and times."""
    x, dists, guide, call = _memory_setup(b, t, vocab, threads)
    budget_mb = 4 * LOG_PROB_BUDGET / 2**20
    times = interleaved({False: lambda: call(False), True: lambda: call(True)},
                        repeats=repeats, warmup=0)
    rows, base, default = [], None, None
    for label in labels:
        key, mb = dict(_MEMORY_CASES)[label], peaks[label]
        base = mb if base is None else base
        saved, ms = "", ""
        if key is not None:
            with plain_head(guide) if key == "plain" else contextlib.nullcontext():
                saved_f = saved_mb(lambda x=x, d=dists[key is True]: d.log_prob(x))
            saved = f"{saved_f:,.0f}"
            if key is False:  # what activation_checkpointing=None decides
                default = key if saved_f <= budget_mb else True
        if key in times:
            ms = f"{times[key] * 1e3:,.0f}"
        mark = "✓" if key is not None and key == default else ""
        rows.append([b, t, vocab, label, mark, f"{mb:,.0f}", f"{mb / max(base, 1.0):.2f}",
                     saved, ms])
        print(rows[-1], flush=True)
    return rows


def main(args):
    torch.set_num_threads(args.threads)
    if args.quick:
        models = [("GPT-2 2x64 V64", gpt2(2, 64, 64)), ("Llama 2x64 V512", llama(2, 64, 512))]
        batches, lengths = [4], [20]
        reorder_models = [("GPT-2 2x64 V64", models[0][1])]
        reorder_lengths = [25]
        mem_b, mem_t, mem_plain = 2, [20], [20]
    else:
        models = [("GPT-2 2x64 V64", gpt2(2, 64, 64)), ("GPT-2 4x256 V8k", gpt2(4, 256, 8192)),
                  ("Llama 4x256 V8k", llama(4, 256, 8192))]
        batches, lengths = [1, 8, 64, 256], [20, 100]
        reorder_models = models[:2]
        # GPT-2's real small shape (124M parameters): batch 256 and T = 100 would take
        # minutes per call on a CPU, so fewer cells
        big = ("GPT-2 12x768 V50k (124M)", lambda: gpt2(12, 768, 50257), [1, 8, 64], [20])
        reorder_lengths = [25, 100, 400]
        mem_b, mem_t, mem_plain = 64, [100, 400], [100]
    tables = set(args.only or TABLES)
    samp, reord, mem = [], [], []
    if "sampling" in tables:
        for name, lm in models:
            samp += sampling_rows(name, lm, batches, lengths, args.repeats, generate=True)
    if "sampling-124m" in tables and not args.quick:
        name, make, big_batches, big_lengths = big
        samp += sampling_rows(name, make(), big_batches, big_lengths, args.repeats,
                              generate=True)
    if "reorder" in tables:
        for name, lm in reorder_models:
            reord += reorder_rows(name, lm, reorder_lengths, args.repeats)
    if "memory" in tables:
        mem = memory_rows(mem_b, mem_t, mem_plain, repeats=max(2, args.repeats // 2))
    body = (
        "## Scaling: sampling, KV reorders and log_prob memory at real shapes\n\n"
        f"Machine: {machine()}.\n"
        f"Command: `python bench/scaling.py --threads {args.threads}`\n\n"
        "Sampling: pyro_lm's time per decoded step, and each contender's time ÷ pyro_lm's "
        "(above 1: pyro_lm is faster). *lean*: the hand-written loop of bench/floors.py on "
        "pyro_lm's own decoder; *hf loop*: that loop on transformers with a DynamicCache; "
        "*static*: with a StaticCache (Llama, the generic decoder).\n\n"
        + table(["model", "batch", "T", "pyro_lm ms/step", "lean ÷", "hf loop ÷",
                 "generate ÷", "static ÷"], samp)
        + "\n\nKV reorder of the GPT-2 decoder (ms per reorder): every row gathered (before) "
        "against a resample that changes 10% or 50% of the rows (only those are copied; for "
        "runs of more than 64 new tokens the decoder also follows the rows' lineages, to keep "
        "the positions all rows share in one copy, which these random resamples never make)."
        "\n\n"
        + table(["model", "N", "t", "full ms", "10% ms", "full ÷ 10%", "50% ms",
                 "full ÷ 50%"], reord)
        + "\n\nlog_prob memory (GPT-2 2x64 body): peak RSS above the RSS before the call "
        "(VmHWM reset through /proc/self/clear_refs after malloc_trim), its ratio to the "
        "no-gradient peak, the MiB autograd saves for backward in the forward pass (the "
        "weights, and the body's activations or, checkpointed, each chunk's inputs and the "
        "hidden states the head is recomputed from) and the time of one forward + backward "
        "(median of interleaved calls). *checkpointed*: `activation_checkpointing=True`, "
        "each chunk's forward pass recomputed in backward; *default* (✓): the case "
        "`activation_checkpointing=None` takes, checkpointed when the activations exceed "
        f"the default memory budget ({4 * LOG_PROB_BUDGET / 2**20:.0f} MiB).\n\n"
        + table(["B", "T", "V", "case", "default", "peak MiB", "÷ no-gradient", "saved MiB",
                 "ms"], mem))
    if not args.quick and not args.only:
        write_section("scaling", body)
    print(body)
    return samp, reord, mem


#: The tables, in the order they run.
TABLES = ("sampling", "sampling-124m", "reorder", "memory")


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=5)
    p.add_argument("--only", action="append", choices=TABLES,
                   help="run this table alone (repeatable); RESULTS.md is left alone")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
    return args


if __name__ == "__main__":
    main(parse_args())
