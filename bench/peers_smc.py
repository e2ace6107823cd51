"""Time per SMC run: pyro_lm SMC against hfppl (LLaMPPL), genlm-control and a hand-written
batched SMC loop.

    .venv-peers/bin/python bench/peers_smc.py [--quick] [--threads 2] [--repeats 9]

The shared task of ``/work/shared/PEERS.md``: a random tiny GPT-2
(``toy_lm(vocab_size=64, n_layer=2, n_embd=64, n_head=2, init_std=0.02)``, BOS/EOS
id 0), one BOS prompt, N = 64 particles, 20 new tokens proposed from the prior, the
prefix reward ``count of token 7 / beta`` (beta = 0.1) as potential, resampling when
ESS < N/2. Each contender gets its own copy of the same weights; calls alternate
(warm-up first) and medians are reported.

* ``floor``: :func:`floors.smc_floor` (KV cache reordered in place, systematic).
* ``pyro_lm``: ``SMC(model, num_particles=N).run(prompts)`` on the Pyro model
  ``x ~ LMDistribution(prior, prompts, 20); factor(Lexicon({"t7": 1}) (x) / beta)``.
* ``hfppl`` 0.1.2: ``smc_standard(model, N)`` on an ``hfppl.Model`` whose ``step``
  samples ``context.next_token()`` and scores ``[token == 7] / beta``, over its
  HF backend (genlm_backend 0.0.2 ``AsyncTransformer``).
* ``genlm-control`` 0.4.1: ``direct_token_sampler(PromptedLLM).smc(N, 0.5,
  max_tokens=21, critic=Count7, terminate_when=len >= 20)``: 20 tokens, then EOS
  appended with no weight correction (truncation, as the others), over genlm-backend
  0.3.1 ``AsyncTransformer``.

Both peers batch concurrent LM calls, waiting up to a timeout for a full batch:
each is run with ``batch_size=N, timeout=0`` and with its defaults
(``batch_size=20, timeout=0.02`` s). Their prefix caches are cleared before every
run, so no run reuses another's forward passes. Offline, their byte-vocabulary
builders (which reload the tokenizer by name from the hub) are replaced by one
reading the in-memory tokenizer's tokens.

In the same run, the two-site program of issue #12 (``bench/smc.py``'s
``two_site_program``): ``x1`` (20 tokens) from the BOS prompt, the count potential on it,
``x2`` (20 tokens) continuing BOS + ``x1`` (its EOS dropped), the count potential on it.

* ``plain``: both sites sampled directly, no SMC (the cost SMC is measured against).
* ``pyro_lm``: ``SMC(model, num_particles=N).run(prompt)``, SMC over the program.
* ``hfppl``: one ``hfppl.Model`` whose ``step`` decodes ``x1`` in one ``LMContext``, then
  opens a second ``LMContext`` on BOS + ``x1`` and decodes ``x2`` in it.
* ``genlm-control``: its SMC samples one token sequence from one prompted LM, so a second
  call whose prompt holds the first completion has no counterpart; the nearest it runs is
  one 40-token sequence with the count potential over it (the same law when ``x1`` ends
  without EOS), timed as the cost of the same amount of decoding.

The peers live in their own virtual environment (their dependencies must not leak
into ``.venv``); see bench/README.md. Under an interpreter without them, their rows
say so and the rest still runs.
"""

from __future__ import annotations

import asyncio
import math
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import base_parser, interleaved, machine, table, write_section  # noqa: E402
from floors import smc_floor  # noqa: E402
from task import TOKEN, bos_prompt, make_lm, make_model  # noqa: E402

INSTALL = ("python3 -m venv .venv-peers && .venv-peers/bin/pip install -c constraints.txt "
           "torch==2.13.0 && .venv-peers/bin/pip install -c constraints.txt -e . "
           "genlm-control==0.4.1 && .venv-peers/bin/pip install --no-deps hfppl==0.1.2 && "
           ".venv-peers/bin/pip install --no-deps --target .venv-peers/hfppl-backend "
           "genlm-backend==0.0.2 && echo $PWD/.venv-peers/hfppl-backend > "
           ".venv-peers/lib/python3.11/site-packages/hfppl-backend.pth")


def weighted_count(counts, log_w) -> float:
    """Self-normalised estimate of E[count of token 7] under the target."""
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    log_w = torch.as_tensor(log_w, dtype=torch.float64).reshape(-1)
    return float((log_w.softmax(0) * counts).sum())


def build_contenders(contenders):
    """``(fns, summaries, notes)`` from ``{name: (build, note)}``; a contender whose
    package is missing keeps a note saying so instead of a function."""
    fns, summaries, notes = {}, {}, {}
    for name, (build, note) in contenders.items():
        try:
            fns[name], summaries[name] = build()
            notes[name] = note
        except ImportError as e:
            notes[name] = f"not run: {type(e).__name__}: {e} (interpreter {sys.executable})"
    return fns, summaries, notes


def particles_summary(particles, counts):
    """``(log Ẑ, E[count])`` from hfppl's final particles and their counts of TOKEN."""
    log_w = torch.tensor([p.weight for p in particles], dtype=torch.float64)
    return float(log_w.logsumexp(0)) - math.log(len(particles)), weighted_count(counts, log_w)


# ------------------------------------------------------------------ contenders
def floor_run(args):
    lm = make_lm()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def run():
        return smc_floor(lm.model, prompt, args.particles, args.max_new_tokens, args.beta,
                         lambda token, alive: (token == TOKEN) & alive, eos=lm.eos_token_id)

    def summary(out):
        x, log_w, log_z = out
        return float(log_z), weighted_count((x == TOKEN).sum(-1), log_w)

    return run, summary


def pyro_lm_run(args):
    from pyro_lm.infer import SMC

    prior = make_lm()
    prompts = bos_prompt()
    model = make_model(prior, args.beta, args.max_new_tokens)
    smc = SMC(model, num_particles=args.particles)

    def summary(post):
        x = post.samples["x"]
        return float(post.log_normalizer().sum()), weighted_count((x == TOKEN).sum(-1),
                                                                   post.log_weights)

    return (lambda: smc.run(prompts)), summary


def offline_vocab(token_cls=None):
    """Byte/str vocabularies read from the in-memory tokenizer (the peers' builders
    reload the tokenizer by name from the hub)."""

    def decode_vocab(tokenizer, *args, **kwargs):
        strs = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        raw = [s.encode() for s in strs]
        return ([token_cls(i, b) for i, b in enumerate(raw)] if token_cls else raw), strs

    return decode_vocab


def hfppl_run(args, batch_size, timeout):
    import genlm_backend.llm.base as backend_base

    backend_base.decode_vocab = offline_vocab()
    import hfppl
    from genlm_backend.llm import AsyncTransformer

    lm = make_lm()
    backend = AsyncTransformer(lm.model, lm.tokenizer, batch_size=batch_size, timeout=timeout)
    clm = hfppl.CachedCausalLM(backend)
    t, beta = args.max_new_tokens, args.beta

    class CountModel(hfppl.Model):
        def __init__(self):
            super().__init__()
            self.context = hfppl.LMContext(clm, lm.tokenizer.bos_token)  # BOS prompt
            self.t = 0

        async def step(self):
            token = await self.sample(self.context.next_token())
            self.score(float(token.token_id == TOKEN) / beta)
            self.t += 1
            if self.t == t or token.token_id == lm.eos_token_id:
                self.finish()

    def run():
        clm.clear_cache()
        return asyncio.run(hfppl.smc_standard(CountModel(), args.particles, ess_threshold=0.5))

    def summary(particles):
        return particles_summary(particles, [p.context.tokens[1:].count(TOKEN)
                                             for p in particles])

    return run, summary


def genlm_run(args, batch_size, timeout, max_new_tokens=None):
    import genlm.backend.llm.base as backend_base
    from genlm.backend.tokenization.token import Token

    backend_base.decode_vocab = offline_vocab(Token)
    from genlm.backend.llm import AsyncTransformer
    from genlm.control import Potential, PromptedLLM, direct_token_sampler

    lm = make_lm()
    backend = AsyncTransformer(lm.model, lm.tokenizer, batch_size=batch_size, timeout=timeout)
    llm = PromptedLLM(backend, prompt_ids=[lm.bos_token_id])
    sampler = direct_token_sampler(llm)
    beta, t = args.beta, max_new_tokens or args.max_new_tokens

    def count(context):
        return sum(getattr(tok, "token_id", None) == TOKEN for tok in context)

    class Count7(Potential):
        async def prefix(self, context):
            return count(context) / beta

        async def complete(self, context):
            return count(context) / beta

    critic = Count7(llm.vocab)

    def run():
        backend.clear_cache()
        return asyncio.run(sampler.smc(n_particles=args.particles, ess_threshold=0.5,
                                       max_tokens=t + 1, critic=critic,
                                       terminate_when=lambda context: len(context) >= t))

    def summary(seqs):
        return float(seqs.log_ml), weighted_count([count(c) for c in seqs.contexts],
                                                  seqs.log_weights)

    return run, summary


# --------------------------------------------------------- the two-site program
def prompt_string(tokenizer, ids):
    """A string that ``tokenizer.encode`` turns into exactly ``ids`` (with the BOS written
    out, or added by the tokenizer itself): how an ``hfppl.LMContext`` is given a prompt."""
    for text in (tokenizer.decode(ids), tokenizer.decode(ids[1:])):
        if tokenizer.encode(text) == list(ids):
            return text
    raise ValueError(f"no string encodes to {ids}")


def two_site_plain_run(args):
    from smc import count_token, two_site_program

    from pyro_lm.rewards import Callable

    prior = make_lm()
    _, plain = two_site_program(prior, bos_prompt(), Callable(count_token, name="count7"),
                                args.beta, args.max_new_tokens)
    return (lambda: plain(args.particles)), None


def two_site_pyro_lm_run(args):
    from smc import count_token, two_site_program

    from pyro_lm.infer import SMC
    from pyro_lm.rewards import Callable

    prior = make_lm()
    model, _ = two_site_program(prior, bos_prompt(), Callable(count_token, name="count7"),
                                args.beta, args.max_new_tokens)
    smc = SMC(model, num_particles=args.particles)

    def summary(post):
        counts = sum((post.samples[s] == TOKEN).sum(-1) for s in ("x1", "x2"))
        return float(post.log_normalizer().sum()), weighted_count(counts, post.log_weights)

    return (lambda: smc.run(bos_prompt())), summary


def two_site_hfppl_run(args, batch_size, timeout):
    import genlm_backend.llm.base as backend_base

    backend_base.decode_vocab = offline_vocab()
    import hfppl
    from genlm_backend.llm import AsyncTransformer

    lm = make_lm()
    backend = AsyncTransformer(lm.model, lm.tokenizer, batch_size=batch_size, timeout=timeout)
    clm = hfppl.CachedCausalLM(backend)
    t, beta, eos, bos = args.max_new_tokens, args.beta, lm.eos_token_id, lm.bos_token_id

    class TwoSite(hfppl.Model):
        def __init__(self):
            super().__init__()
            self.context = hfppl.LMContext(clm, prompt_string(lm.tokenizer, [bos]))
            self.site, self.t, self.x1 = 1, 0, []

        async def step(self):
            token = (await self.sample(self.context.next_token())).token_id
            self.score(float(token == TOKEN) / beta)
            self.t += 1
            if self.site == 1:
                if token != eos:
                    self.x1.append(token)
                if self.t == t or token == eos:  # x1 is done: the second call's prompt
                    self.context = await hfppl.LMContext.create(
                        clm, prompt_string(lm.tokenizer, [bos, *self.x1]))
                    self.site, self.t = 2, 0
            elif self.t == t or token == eos:
                self.finish()

    def run():
        clm.clear_cache()
        return asyncio.run(hfppl.smc_standard(TwoSite(), args.particles, ess_threshold=0.5))

    def summary(particles):
        return particles_summary(particles, [
            p.x1.count(TOKEN) + p.context.tokens[p.context.prompt_token_count:].count(TOKEN)
            for p in particles])

    return run, summary


def two_site_section(args, med, summaries, fns, notes):
    """The "two-site program" table, ratios to plain sampling of both sites."""
    plain = med["plain"]
    rows = []
    for name in notes:
        if name in med:
            log_z, count = (summaries[name](fns[name]()) if summaries[name] else ("—", "—"))
            rows.append([name, f"{1e3 * med[name]:.1f}", f"{med[name] / plain:.2f}",
                         log_z if isinstance(log_z, str) else f"{log_z:.1f}",
                         count if isinstance(count, str) else f"{count:.1f}", notes[name]])
        else:
            rows.append([name, "—", "—", "—", "—", notes[name]])
    lines = []
    if "pyro_lm" in med and "hfppl, timeout 0" in med:
        speedup = med["hfppl, timeout 0"] / med["pyro_lm"]
        lines.append(f"- pyro_lm SMC over the program is **{speedup:.1f}×** faster than hfppl "
                     f"on the same program (target ≥ 4× the faster peer: "
                     f"{'met' if speedup >= 4 else 'NOT met'}).")
    if "pyro_lm" in med and "genlm-control, 40 tokens" in med:
        lines.append(f"- genlm-control's one-sequence stand-in costs "
                     f"{med['genlm-control, 40 tokens'] / med['pyro_lm']:.1f}× pyro_lm's "
                     "SMC over the program.")
    return ("### The two-site program\n\n"
            f"`x1` ({args.max_new_tokens} tokens) from the BOS prompt, potential count of token "
            f"{TOKEN} / {args.beta}; `x2` ({args.max_new_tokens} tokens) continuing BOS + `x1`, "
            f"the same potential; {args.particles} particles, resampling at ESS < N/2. Medians of "
            f"{args.repeats} interleaved runs; log Ẑ and E[count over both sites] from one more "
            "run (a sanity check, not a timing).\n\n"
            + table(["contender", "ms / run", "÷ plain", "log Ẑ", "E[count]", "what is timed"],
                    rows)
            + "\n\n" + "\n".join(lines))


def two_site(args):
    n, t = args.particles, args.max_new_tokens
    contenders = {
        "plain": (lambda: two_site_plain_run(args),
                  f"both sites sampled directly for {n} sequences (no SMC)"),
        "pyro_lm": (lambda: two_site_pyro_lm_run(args),
                    f"SMC(model, num_particles={n}).run(prompt), SMC over the program"),
        "hfppl, timeout 0": (lambda: two_site_hfppl_run(args, n, 0.0),
                             f"hfppl 0.1.2 smc_standard, two LMContexts, batch_size {n}, "
                             "timeout 0"),
        "genlm-control, 40 tokens": (
            lambda: genlm_run(args, n, 0.0, max_new_tokens=2 * t),
            f"genlm-control 0.4.1 SMC on one {2 * t}-token sequence (it cannot write the "
            f"second call), batch_size {n}, timeout 0"),
    }
    fns, summaries, notes = build_contenders(contenders)
    med = interleaved(fns, repeats=args.repeats, warmup=args.warmup)
    return two_site_section(args, med, summaries, fns, notes)


# ------------------------------------------------------------------------ main
def main(args):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.particles
    contenders = {
        "floor": (lambda: floor_run(args), "hand-written batched SMC (bench/floors.py)"),
        "pyro_lm": (lambda: pyro_lm_run(args), f"SMC(model, num_particles={n}).run(prompts)"),
        "hfppl, timeout 0": (lambda: hfppl_run(args, n, 0.0),
                             f"hfppl 0.1.2 smc_standard, batch_size {n}, timeout 0"),
        "hfppl, default": (lambda: hfppl_run(args, 20, 0.02),
                           "hfppl 0.1.2 smc_standard, defaults: batch_size 20, timeout 20 ms"),
        "genlm-control, timeout 0": (lambda: genlm_run(args, n, 0.0),
                                     f"genlm-control 0.4.1 SMC, batch_size {n}, timeout 0"),
        "genlm-control, default": (lambda: genlm_run(args, 20, 0.02),
                                   "genlm-control 0.4.1 SMC, defaults: batch_size 20, "
                                   "timeout 20 ms"),
    }
    fns, summaries, notes = build_contenders(contenders)
    med = interleaved(fns, repeats=args.repeats, warmup=args.warmup)
    floor = med["floor"]
    rows = []
    for name in contenders:
        if name in med:
            log_z, mean_count = summaries[name](fns[name]())
            rows.append([name, f"{1e3 * med[name]:.1f}", f"{med[name] / floor:.2f}",
                         f"{log_z:.1f}", f"{mean_count:.1f}", notes[name]])
        else:
            rows.append([name, "—", "—", "—", "—", notes[name]])
    lines = []
    peers = [med[k] for k in med if k.startswith(("hfppl", "genlm"))]
    peers0 = [med[k] for k in ("hfppl, timeout 0", "genlm-control, timeout 0") if k in med]
    if "pyro_lm" in med and peers:
        best = min(peers0 or peers)
        speedup = best / med["pyro_lm"]
        lines.append(f"- pyro_lm SMC is **{speedup:.1f}×** faster than the faster peer at its "
                     f"best setting (timeout 0) (target ≥ 4×: "
                     f"{'met' if speedup >= 4 else 'NOT met'}).")
    if "pyro_lm" in med:
        lines.append(f"- pyro_lm SMC is {med['pyro_lm'] / floor:.2f}× the hand-written loop.")
    missing = [k for k in contenders if k not in med]
    if missing:
        lines.append(f"- Not run here: {', '.join(missing)}. Install the peers with `{INSTALL}` "
                     "and run the command with `.venv-peers/bin/python`.")
    cmd = (f"{'.venv-peers/bin/python' if '.venv-peers' in sys.executable else 'python'} "
           f"bench/peers_smc.py --threads {args.threads} --repeats {args.repeats}")
    body = (
        "## SMC against hfppl and genlm-control (peers, cpu)\n\n"
        f"Machine: {machine()}.\n"
        f"Command (every row): `{cmd}`\n\n"
        f"Task: random tiny GPT-2 (2 layers, 64 wide, vocab 64), one BOS prompt, {n} "
        f"particles, {args.max_new_tokens} new tokens from the prior, potential = count of "
        f"token {TOKEN} in the prefix / {args.beta}, resampling at ESS < N/2. Median of "
        f"{args.repeats} interleaved runs after {args.warmup} warm-up rounds. The last two "
        "columns come from one more run of each (a sanity check that all target the same "
        "posterior, not a timing): the log Z estimate and the weighted mean count of "
        f"token {TOKEN}.\n\n"
        + table(["contender", "ms / run", "÷ floor", "log Ẑ", "E[count]", "what is timed"],
                rows)
        + "\n\n" + "\n".join(lines) + "\n\n"
        "Differences that matter: the peers run each particle as a Python coroutine and "
        "batch their LM calls asynchronously; they recompute nothing for resampled "
        "duplicates (prefix cache) but rebuild padded KV batches every step, and they "
        "resample multinomially (pyro_lm and the floor: systematic). With their default "
        "20 ms timeout, short batches wait the full timeout. genlm-control's default "
        "(no `terminate_when`) instead forces EOS at `max_tokens` and weights by p(EOS); "
        "here `terminate_when` truncates at 20 tokens like the others.\n\n"
        + two_site(args))
    if not args.quick:
        write_section("peers-smc", body)
    print(body)
    return med


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=9)
    p.add_argument("--particles", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 2, 1
    return args


if __name__ == "__main__":
    main(parse_args())
