"""Token-level SMC: time against plain sampling and a hand-written torch SMC loop, and
final ESS against importance sampling at equal particles, for the bootstrap proposal and
the lookahead (locally optimal) proposal.

    python bench/smc.py [--quick] [--device cuda]

The peers' task: a random GPT-2 (vocab 64, 2 layers, 64 wide), one BOS prompt, 20 new
tokens, reward = count of token 7 in the completion (prefix-decomposable), beta 0.1,
64 particles. Calls alternate between contenders; medians are reported.

Targets: bootstrap SMC costs at most 1.3x plain sampling of the same number of sequences;
lookahead SMC's final ESS is at least 2x importance sampling's.

In the same run, SMC on a two-site program (issue #12, deliverable 6): ``x1`` from the
prompt, a factor on it, ``x2`` continuing ``prompt + x1`` (``prompt_with``), a factor on
it, decoded by SMC over the program (``pyro_lm/infer/smc_program.py``) against plain
sampling of both sites for the same number of sequences, with one-site SMC on ``x1`` alone
(the fast path) against plain sampling of ``x1`` for the per-site cost; on the bundled LM
(64 and 256 particles; 64 only with --quick) and on the peers' task model (64). Target:
two-site SMC costs at most 1.3x plain sampling of both sites on the bundled LM.

Step-level SMC (``steps=``, issue #14): k-token and word steps on the peers' task (its
word-level tokenizer makes every token after the first a word start) and word, k-token
and sentence steps on the byte-level BPE bundled LM (``models/tinylm-bpe``, the
positive-reviews Lexicon, beta 0.5), against plain sampling and token-level SMC. Target:
with ``steps="word"`` (or k = 4) SMC costs at most 1.15x plain sampling on the peers'
task.

Lengths (``--lengths``, default 25 100 400 in a full run, none with --quick): SMC's
own cost per decoded token over plain sampling at each T on the peers' architecture
(2 layers, 64 wide, vocab 64, 512 positions), resampling at most tokens
(``ess_threshold=1``), token-level and with k = 4 steps.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import base_parser, interleaved, machine, table, write_section  # noqa: E402
from floors import smc_floor  # noqa: E402
from task import BETA, TOKEN, make_lm  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.distributions.prefix import counted_mask  # noqa: E402
from pyro_lm.infer import SMC, Importance  # noqa: E402
from pyro_lm.lm.decoding import make_decoder  # noqa: E402
from pyro_lm.rewards import Callable  # noqa: E402


def count_token(x):
    """Occurrences of TOKEN among the generated content tokens (prefix-aware)."""
    return ((x == TOKEN) & counted_mask(x, 0)).sum(-1).float()


def main(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pyro.set_rng_seed(0)
    lm = make_lm(device)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    t, n = args.max_new_tokens, args.num_particles
    reward = Callable(count_token, name="count7")

    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompt, t))
        pyro.factor("reward", reward(x) / BETA)

    dist = pyro_lm.LMDistribution(lm, prompt[0], t)
    smc = SMC(model, num_particles=n)
    lookahead = SMC(model, num_particles=n, lookahead="full")
    importance = Importance(model, num_samples=n)
    load = [os.getloadavg()[0]]
    def sample_inference_mode():
        with torch.inference_mode():
            return dist.sample((n,))

    def increment(token, alive):  # the reward's change when a token is appended
        return (token == TOKEN) & alive

    def torch_smc():  # the floor: transformers' forward, DynamicCache
        return smc_floor(lm.model, prompt, n, t, BETA, increment, lm.eos_token_id,
                         pad=lm.pad_token_id)

    ids, mask = dist.prompts_for((n,))

    def loop_floor():  # the same loop on pyro_lm's decoder, in inference mode like SMC's
        with torch.inference_mode():
            return smc_floor(lm.model, prompt, n, t, BETA, increment, lm.eos_token_id,
                             pad=lm.pad_token_id, decoder=make_decoder(lm, ids, mask, t))

    med = interleaved({"sample": lambda: dist.sample((n,)),
                       "sample_im": sample_inference_mode,
                       "smc": lambda: smc.run(prompt[0]),
                       "torch_smc": torch_smc,
                       "loop_floor": loop_floor,
                       "importance": lambda: importance.run(prompt[0]),
                       "lookahead": lambda: lookahead.run(prompt[0])},
                      repeats=args.repeats, device=device)
    load.append(os.getloadavg()[0])
    print({k: f"{v * 1e3:.1f} ms" for k, v in med.items()}, flush=True)

    stats = {name: ([], []) for name in ("smc", "importance", "lookahead")}
    for _ in range(args.ess_runs):  # interleaved too
        for name, algo in (("smc", smc), ("importance", importance), ("lookahead", lookahead)):
            post = algo.run(prompt[0])
            stats[name][0].append(float(post.ess()))
            stats[name][1].append(float(post.log_normalizer()))
    load.append(os.getloadavg()[0])
    ess = {k: statistics.median(v[0]) for k, v in stats.items()}
    log_z = {k: statistics.median(v[1]) for k, v in stats.items()}

    def row(label, key, with_ess=True):
        cells = [label, f"{med[key] * 1e3:.1f}", f"{med[key] / med['sample']:.2f}"]
        if with_ess and key in ess:
            return cells + [f"{ess[key]:.1f}", f"{ess[key] / ess['importance']:.1f}",
                            f"{log_z[key]:.2f}"]
        return cells + ["", "", ""]

    bundled = bundled_lm_ratios(args, device)
    two_site = two_site_ratios(args, device, lm)
    step_rows = steps_ratios(args, device, model, prompt[0], dist, n)
    length_rows = length_overheads(args, device)
    incremental_rows = incremental_ratios(args, device, lm, prompt[0], dist, n)
    scores_rows = scores_ratios(args, device)
    rows = [row("plain sampling (LMDistribution.sample)", "sample"),
            row("plain sampling inside torch.inference_mode()", "sample_im"),
            row("pyro_lm SMC, bootstrap proposal", "smc"),
            row('pyro_lm SMC, lookahead="full"', "lookahead"),
            row("hand-written torch SMC (floor)", "torch_smc"),
            row("the same hand-written loop on pyro_lm's decoder", "loop_floor"),
            row("pyro_lm Importance (prior)", "importance")]
    body = (f"## Token-level SMC ({n} particles, {t} new tokens, {device.type})\n\n"
            f"Machine: {machine()}.\n"
            "Load average (1 min) before / after timing / after ESS runs: "
            + " / ".join(f"{v:.1f}" for v in load) + " (machine shared with other work).\n"
            f"Command: `python bench/smc.py --device {args.device} --threads {args.threads}`\n\n"
            "Task: toy GPT-2 (vocab 64, 2 layers, 64 wide, init_std 0.02), BOS prompt, "
            f"reward = count of token {TOKEN}, beta {BETA}. Times are medians of "
            f"{args.repeats} interleaved calls; ESS and log Z are medians over "
            f"{args.ess_runs} interleaved runs (final weights).\n\n"
            + table(["method", "ms / run", "÷ plain sampling", "final ESS", "ESS ÷ IS",
                     "log Z"], rows)
            + f"\n\nT1 (bootstrap SMC ÷ plain sampling ≤ 1.3): "
            f"{med['smc'] / med['sample']:.2f}; ÷ plain sampling in inference mode (SMC's loop "
            f"runs in it): {med['smc'] / med['sample_im']:.2f}. SMC ÷ torch floor: "
            f"{med['smc'] / med['torch_smc']:.2f}. The hand-written loop on pyro_lm's "
            f"decoder, whose reward is one tensor operation per token, costs "
            f"{med['loop_floor'] / med['sample']:.2f}× plain sampling: what the SMC loop itself "
            "(weights, ESS, resampling, KV reorder) adds to sampling with this decoder; most of "
            "the rest of pyro_lm's cost is running the Pyro model on every prefix.\n"
            f"T2 (lookahead SMC final ESS ÷ importance sampling ≥ 2): "
            f"{ess['lookahead'] / ess['importance']:.1f}× "
            f"(bootstrap SMC: {ess['smc'] / ess['importance']:.1f}×).\n\n"
            "The same comparison on the bundled LM (`models/tinylm`: 4 layers, 128 wide, "
            "vocab 262), the demo's program (review prompt in a plate, the positive-reviews "
            f"Lexicon, beta 0.5, {t} new tokens), medians of {args.repeats} interleaved calls:\n\n"
            + table(["particles", "plain sampling, ms", "bootstrap SMC, ms", "÷ plain sampling"],
                    [[str(k), f"{a * 1e3:.1f}", f"{c * 1e3:.1f}", f"{c / a:.2f}"]
                     for k, a, c in bundled])
            + "\n\nSMC's own cost per token is roughly fixed (one run of the Pyro model on the "
            "prefixes, the weights, and on resampling a reorder of the KV cache), so its ratio to "
            "plain sampling falls as the decoder's step gets dearer: the peers' 2-layer, 64-wide "
            "model decodes a step of 64 rows in about 0.4 ms here.\n\n"
            + two_site_section(args, two_site)
            + "\n\n" + steps_section(args, step_rows)
            + ("\n\n" + lengths_section(args, length_rows) if length_rows else "")
            + "\n\n" + incremental_section(args, incremental_rows)
            + "\n\n" + scores_section(args, scores_rows))
    if not args.quick:
        # a GPU run gets its own section: the CPU figures stay
        write_section("smc" if device.type == "cpu" else f"smc-{device.type}", body)
    print(body)
    return med, ess


def steps_ratios(args, device, peers_model, peers_prompt, peers_dist, n):
    """``[(task, contender, s / run, median final ESS, median log Z, s of plain sampling)]``:
    step-level SMC against plain sampling and token-level SMC, interleaved, on the peers'
    task and on the BPE bundled LM."""
    from pyro_lm.programs import positive_reviews_reward, reward_model, task_prompt

    t = args.max_new_tokens
    bpe = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"),
                                           device=device)
    bpe_model = reward_model(bpe, positive_reviews_reward(bpe.tokenizer), beta=0.5,
                             max_new_tokens=t)
    bpe_prompt = [task_prompt(bpe)]
    tasks = [("peers' task", peers_model, peers_prompt, peers_dist,
              ["token", 4] if args.quick else ["token", 4, 2, "word"]),
             ("BPE bundled LM", bpe_model, bpe_prompt,
              pyro_lm.LMDistribution(bpe, bpe_prompt, t),
              ["word"] if args.quick else ["token", "word", 4, r"[.!?]\s"])]
    out = []
    for task, model, prompt, dist, kinds in tasks:
        smcs = {k: SMC(model, num_particles=n, steps=k) for k in kinds}
        fns = {"sample": lambda dist=dist: dist.sample((n,))}
        fns.update({k: (lambda smc=smc, prompt=prompt: smc.run(prompt))
                    for k, smc in smcs.items()})
        med = interleaved(fns, repeats=args.repeats, device=device)
        for k, smc in smcs.items():
            runs = [smc.run(prompt) for _ in range(args.ess_runs)]
            out.append((task, k, med[k], statistics.median(float(r.ess()) for r in runs),
                        statistics.median(float(r.log_normalizer()) for r in runs),
                        med["sample"]))
        print(task, {str(k): f"{v * 1e3:.1f} ms" for k, v in med.items()}, flush=True)
    return out


def steps_section(args, rows):
    """The "Step-level SMC" part of the section."""
    cells = [[task, repr(k) if isinstance(k, str) else str(k), f"{sample * 1e3:.1f}",
              f"{sec * 1e3:.1f}", f"{sec / sample:.2f}", f"{ess:.1f}", f"{log_z:.2f}"]
             for task, k, sec, ess, log_z, sample in rows]
    peers = {k: sec / sample for task, k, sec, _, _, sample in rows if task == "peers' task"}
    return ("### Step-level SMC (`steps=`)\n\n"
            f"{args.num_particles} particles, {args.max_new_tokens} new tokens, bootstrap "
            "proposal; potentials applied and resampling decided only at step ends "
            "(`pyro_lm/infer/smc_steps.py`; every row is exact). Peers' task as above (its "
            "word-level tokenizer: every token after the first starts a word, so word steps "
            "are token steps there); BPE bundled LM: `models/tinylm-bpe`, prompt `Review:`, "
            "the positive-reviews Lexicon, beta 0.5. Medians of "
            f"{args.repeats} interleaved calls; final ESS and log Z: medians over "
            f"{args.ess_runs} runs.\n\n"
            + table(["task", "steps", "plain sampling, ms", "SMC, ms", "÷ plain sampling",
                     "final ESS", "log Z"], cells)
            + f"\n\nTarget (word steps or k = 4 ≤ 1.15× plain sampling on the peers' task): "
            f"k = 4: {peers.get(4, float('nan')):.2f}, word: "
            f"{peers.get('word', float('nan')):.2f} (token steps: "
            f"{peers.get('token', float('nan')):.2f}). With k-token steps the model's factors "
            "run once per k tokens and resampling is decided once per k tokens; with word or "
            "sentence steps the factors run at tokens where some particle reaches a step end, "
            "on those particles alone (one prompt, on the host).")


class without_states:
    """Within this context, the given reward classes have no incremental form (every prefix
    read whole by ``forward``): the "before" of the incremental-rewards table."""

    def __init__(self, *classes):
        self.classes, self.saved = classes, None

    def __enter__(self):
        self.saved = [c.__dict__.get("initial_state") for c in self.classes]
        for c in self.classes:
            c.initial_state = lambda self, rows, device: None

    def __exit__(self, *exc):
        for c, saved in zip(self.classes, self.saved, strict=True):
            if saved is None:
                del c.initial_state
            else:
                c.initial_state = saved


def incremental_ratios(args, device, peers_lm, peers_prompt, peers_dist, n):
    """``[(task, contender, s incremental, s forward, s plain sampling)]``: SMC with the
    rewards' incremental form (:mod:`pyro_lm.rewards.incremental`) against the same run
    reading every prefix whole, interleaved."""
    from pyro_lm.programs import positive_reviews_reward, reward_model, task_prompt
    from pyro_lm.rewards import Lexicon, TokenCounts

    bpe = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"),
                                           device=device)
    lexicon = positive_reviews_reward(bpe.tokenizer)
    bpe_prompt = [task_prompt(bpe)]
    counts = TokenCounts(peers_lm, {TOKEN: 1.0})

    def peers_model(prompt, t=args.max_new_tokens):
        x = pyro.sample("x", pyro_lm.LMDistribution(peers_lm, prompt, t))
        pyro.factor("reward", counts(x) / BETA)

    cases = [("peers' task, TokenCounts", peers_model, peers_prompt, peers_dist, {})]
    for t in ([args.max_new_tokens] if args.quick else [args.max_new_tokens, 100]):
        model = reward_model(bpe, lexicon, beta=0.5, max_new_tokens=t)
        dist = pyro_lm.LMDistribution(bpe, bpe_prompt, t)
        cases.append((f"BPE bundled LM, Lexicon, T = {t}", model, bpe_prompt, dist, {}))
        if t == args.max_new_tokens:
            cases.append((f"BPE bundled LM, Lexicon, T = {t}", model, bpe_prompt, dist,
                          {"lookahead": 8 if args.quick else 32}))
    out = []
    for task, model, prompt, dist, options in cases:
        smc = SMC(model, num_particles=n, **options)
        off = without_states(Lexicon, TokenCounts)

        def forward(smc=smc, prompt=prompt, off=off):
            with off:
                return smc.run(prompt)

        med = interleaved({"sample": lambda dist=dist: dist.sample((n,)),
                           "incremental": lambda smc=smc, prompt=prompt: smc.run(prompt),
                           "forward": forward}, repeats=args.repeats, device=device)
        label = "token SMC" + "".join(f", {k}={v!r}" for k, v in options.items())
        out.append((task, label, med["incremental"], med["forward"], med["sample"]))
        print(task, label, {k: f"{v * 1e3:.1f} ms" for k, v in med.items()}, flush=True)
    return out


def incremental_section(args, rows):
    """The "Incremental rewards" part of the section."""
    cells = [[task, label, f"{sample * 1e3:.1f}", f"{fwd * 1e3:.1f}", f"{inc * 1e3:.1f}",
              f"{fwd / inc:.2f}", f"{fwd / sample:.2f}", f"{inc / sample:.2f}"]
             for task, label, inc, fwd, sample in rows]
    return ("### Incremental rewards\n\n"
            f"SMC ({args.num_particles} particles, bootstrap proposal unless said) with the "
            "rewards' incremental form (`pyro_lm/rewards/incremental.py`: per-row states "
            "advanced by each token and reordered with the particles; the Lexicon reads its "
            "words token by token, `pyro_lm/rewards/word_stream.py`) against the same runs "
            "with the states switched off (every prefix read whole by the reward's `forward`, "
            "as before). Both give bitwise the same particles and weights for a seed. "
            "Peers' task: count of token 7 as `TokenCounts`; BPE bundled LM: prompt "
            f"`Review:`, the positive-reviews Lexicon, beta 0.5. Medians of {args.repeats} "
            "interleaved calls.\n\n"
            + table(["task", "contender", "plain sampling, ms", "SMC, whole prefixes, ms",
                     "SMC, incremental, ms", "speed-up", "÷ plain before", "÷ plain after"],
                    cells))


def length_overheads(args, device):
    """``[(T, decoded tokens, plain s, token-SMC s, 4-step SMC s)]`` on the peers'
    architecture with 512 positions, resampling at most tokens."""
    from pyro_lm.lm import toy_lm

    lengths = args.lengths if args.lengths is not None else ([] if args.quick else
                                                              [25, 100, 400])
    if not lengths:
        return []
    lm = toy_lm(vocab_size=64, n_layer=2, n_embd=64, n_head=2, init_std=0.02,
                n_positions=max(lengths) + 8, device=device)
    from pyro_lm.rewards import TokenCounts

    prompt = torch.zeros(1, dtype=torch.long, device=device)
    n, out = args.num_particles, []
    # the same reward read whole on every prefix (a Callable) and token by token
    rewards = {"whole": Callable(count_token, name="count7"),
               "incremental": TokenCounts(lm, {TOKEN: 1.0})}
    for t in lengths:
        def model(prompt, t=t, kind="whole"):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompt, t))
            pyro.factor("reward", rewards[kind](x) / BETA)

        dist = pyro_lm.LMDistribution(lm, prompt, t)
        token = SMC(model, num_particles=n, ess_threshold=1.0)
        four = SMC(model, num_particles=n, ess_threshold=1.0, steps=4)
        med = interleaved({"sample": lambda dist=dist: dist.sample((n,)),
                           "token": lambda smc=token: smc.run(prompt),
                           "counts": lambda smc=token: smc.run(prompt, kind="incremental"),
                           "four": lambda smc=four: smc.run(prompt)},
                          repeats=max(3, args.repeats // 3), device=device)
        post = token.run(prompt)
        steps = statistics.median([token.run(prompt).history["ess"].shape[0]
                                   for _ in range(3)] + [post.history["ess"].shape[0]])
        share = float(post.history["resampled"].float().mean())
        out.append((t, steps, med["sample"], med["token"], med["four"], share, med["counts"]))
        print("T", t, {k: f"{v * 1e3:.1f} ms" for k, v in med.items()}, flush=True)
    return out


def lengths_section(args, rows):
    """The "per-token overhead against the length" part of the section."""
    cells = [[str(t), f"{steps:.0f}", f"{share:.2f}", f"{sample * 1e3:.1f}",
              f"{token * 1e3:.1f}", f"{(token - sample) * 1e3 / steps:.3f}",
              f"{counts * 1e3:.1f}", f"{(counts - sample) * 1e3 / steps:.3f}",
              f"{four * 1e3:.1f}", f"{(four - sample) * 1e3 / steps:.3f}"]
             for t, steps, sample, token, four, share, counts in rows]
    first, last = rows[0], rows[-1]

    def excess(row, column):
        return (row[column] - row[2]) / row[1]

    ratio, ratio_counts = (excess(last, c) / excess(first, c) for c in (3, 6))
    return ("### SMC's own cost per token against the length\n\n"
            f"The peers' architecture (2 layers, 64 wide, vocab 64) with room for the longest "
            f"T, BOS prompt, count of token {TOKEN}, beta {BETA}, {args.num_particles} "
            "particles, `ess_threshold=1` (resampling whenever the weights differ); SMC and "
            "plain sampling stop when every sequence has ended, so the excess is divided by the "
            "tokens SMC decoded (median of 4 runs). Each resampling reorders the KV cache "
            "(`Decoder.reorder`): only the positions after those every particle shares "
            "(`pyro_lm/lm/gpt2_decoder.py`), and the reward is read whole on every prefix "
            "(a `Callable`: O(T) per token) or token by token (`TokenCounts`, incremental).\n\n"
            + table(["T", "tokens decoded", "share of tokens resampled", "plain sampling, ms",
                     "token SMC, Callable, ms", "excess per token, ms",
                     "token SMC, TokenCounts, ms", "excess per token, ms",
                     "4-token-step SMC, Callable, ms", "excess per token, ms"], cells)
            + f"\n\nToken SMC's excess per token at T = {last[0]} ÷ at T = {first[0]}: "
            f"{ratio_counts:.2f} with the incremental reward, {ratio:.2f} with the Callable "
            "(target ≤ 1.3).")


def bundled_lm_ratios(args, device):
    """``[(particles, plain sampling s, SMC s)]`` on the bundled LM and the demo's program."""
    from pyro_lm.programs import REVIEW_PROMPT, positive_reviews_reward, reward_model

    lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(), device=device)
    t = args.max_new_tokens
    model = reward_model(lm, positive_reviews_reward(lm.tokenizer), beta=0.5, max_new_tokens=t)
    dist = pyro_lm.LMDistribution(lm, [REVIEW_PROMPT], t)
    out = []
    for k in (args.num_particles, 4 * args.num_particles):
        smc = SMC(model, num_particles=k)
        med = interleaved({"sample": lambda k=k: dist.sample((k,)),
                           "smc": lambda smc=smc: smc.run([REVIEW_PROMPT])},
                          repeats=args.repeats, device=device)
        out.append((k, med["sample"], med["smc"]))
    return out


def two_site_program(prior, prompt, reward, beta, t):
    """``(model, plain)``: the two-site program (``x1``, a factor, ``x2`` continuing
    ``prompt + x1``, a factor) and ``plain(n)``, the same two LMDistribution samples drawn
    directly for ``n`` sequences (no Pyro, no factors)."""

    def model(prompt):
        first = pyro_lm.LMDistribution(prior, prompt, t)
        x1 = pyro.sample("x1", first)
        pyro.factor("r1", reward(x1) / beta)
        ids, mask = first.prompt_with(x1)  # prompt + x1, left-padded again
        x2 = pyro.sample("x2", pyro_lm.LMDistribution(prior, ids, t, attention_mask=mask))
        pyro.factor("r2", reward(x2) / beta)

    def plain(n):
        first = pyro_lm.LMDistribution(prior, prompt, t)
        x1 = first.sample((n,))
        ids, mask = first.prompt_with(x1)
        return x1, pyro_lm.LMDistribution(prior, ids, t, attention_mask=mask).sample()

    return model, plain


def one_site_program(prior, reward, beta, t):
    """The first site of :func:`two_site_program` alone (SMC's one-site fast path)."""

    def model(prompt):
        x1 = pyro.sample("x1", pyro_lm.LMDistribution(prior, prompt, t))
        pyro.factor("r1", reward(x1) / beta)

    return model


def two_site_ratios(args, device, peers_lm):
    """``[(label, particles, {contender: s}, median final ESS)]``: SMC on the two-site
    program against plain sampling of both sites, and one-site SMC on ``x1`` against plain
    sampling of ``x1``, interleaved; on the bundled LM and on the peers' task model."""
    from pyro_lm.programs import REVIEW_PROMPT, positive_reviews_reward

    t, n = args.max_new_tokens, args.num_particles
    bundled = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(), device=device)
    setups = [("bundled LM", bundled, REVIEW_PROMPT, positive_reviews_reward(bundled.tokenizer),
               0.5, (n,) if args.quick else (n, 4 * n)),
              ("peers' task model", peers_lm, torch.zeros(1, dtype=torch.long, device=device),
               Callable(count_token, name="count7"), BETA, (n,))]
    out = []
    for label, prior, prompt, reward, beta, sizes in setups:
        model, plain = two_site_program(prior, prompt, reward, beta, t)
        first = pyro_lm.LMDistribution(prior, prompt, t)
        for k in sizes:
            smc2 = SMC(model, num_particles=k)
            smc1 = SMC(one_site_program(prior, reward, beta, t), num_particles=k)
            load = os.getloadavg()[0]
            # (the calls run now, inside interleaved: binding the loop's values is for ruff)
            med = interleaved({"plain2": lambda k=k, plain=plain: plain(k),
                               "smc2": lambda smc2=smc2, prompt=prompt: smc2.run(prompt),
                               "plain1": lambda k=k, first=first: first.sample((k,)),
                               "smc1": lambda smc1=smc1, prompt=prompt: smc1.run(prompt)},
                              repeats=args.repeats, device=device)
            ess = statistics.median(float(smc2.run(prompt).ess())
                                    for _ in range(max(1, args.ess_runs // 2)))
            out.append((label, k, med, ess, (load, os.getloadavg()[0])))
            print(label, k, {c: f"{v * 1e3:.1f} ms" for c, v in med.items()},
                  f"ESS {ess:.1f}", flush=True)
    return out


def two_site_section(args, rows):
    """The "SMC on a two-site program" part of the section."""
    t = args.max_new_tokens
    cells = []
    for label, k, med, ess, load in rows:
        cells.append([label, str(k), f"{med['plain2'] * 1e3:.1f}", f"{med['smc2'] * 1e3:.1f}",
                      f"{med['smc2'] / med['plain2']:.2f}", f"{ess:.1f}",
                      f"{med['plain1'] * 1e3:.1f}", f"{med['smc1'] * 1e3:.1f}",
                      f"{med['smc1'] / med['plain1']:.2f}",
                      f"{(med['smc2'] - med['plain2']) * 1e3 / (2 * t):.2f}",
                      f"{(med['smc1'] - med['plain1']) * 1e3 / t:.2f}",
                      f"{load[0]:.1f} / {load[1]:.1f}"])
    head = [r for r in rows if r[0] == "bundled LM" and r[1] == args.num_particles]
    target = (f"{head[0][2]['smc2'] / head[0][2]['plain2']:.2f}" if head else "not measured")
    return ("### SMC on a two-site program\n\n"
            f"`x1` ({t} new tokens) from the prompt, a factor `r(x1) / beta`, `x2` ({t} new "
            "tokens) continuing `prompt + x1` (`first.prompt_with(x1)`), a factor `r(x2) / beta`: "
            "SMC over the program (`pyro_lm/infer/smc_program.py`, both sites decoded token by "
            "token, the potential re-evaluated on the partial program after every token) against "
            "plain sampling of both sites for the same number of sequences (`first.sample((N,))`, "
            "`prompt_with`, then the second `LMDistribution(...).sample()`, no Pyro). The per-site "
            "columns time one-site SMC on `x1` alone (SMC's single-site fast path) against "
            "`first.sample((N,))`. Bundled LM: the review prompt, the positive-reviews Lexicon, "
            f"beta 0.5; peers' task model: BOS prompt, count of token {TOKEN}, beta {BETA}. "
            f"Medians of {args.repeats} interleaved calls (the four contenders of a row "
            f"alternate); final ESS: median over {max(1, args.ess_runs // 2)} runs.\n\n"
            + table(["model", "particles N", "plain, both sites, ms", "two-site SMC, ms",
                     "÷ plain", "final ESS", "plain x1, ms", "one-site SMC on x1, ms",
                     "÷ plain x1", "SMC's excess per token, two-site, ms",
                     "SMC's excess per token, one-site, ms", "load before / after"], cells)
            + f"\n\nTarget (two-site SMC ÷ plain sampling of both sites ≤ 1.3, bundled LM, "
            f"{args.num_particles} particles): {target}. The last two columns are SMC's time over "
            f"plain sampling per decoded token ({2 * t} tokens on the program, {t} on `x1`): "
            "what the program path adds per token, against what the one-site fast path adds "
            "(nominal: both paths and plain sampling stop when every sequence has ended).\n\n"
            "Where the program path's excess goes (cProfile, bundled LM and peers' model, 64 "
            "particles): the decoder's work (prefill and steps) is about plain sampling's; the "
            "excess is mostly the potential, which re-runs the whole program after every token "
            "under `LogFactorsMessenger(partial=True)`. While `x1` is decoded the run ends after "
            "`r(x1)` (`stop_early`: it does not build `x2`'s prompt from `x1`'s prefix and "
            "its `LMDistribution`, the next site being undrawn); while `x2` is decoded it "
            "rebuilds `x1`'s `LMDistribution`, takes "
            "`first.prompt_with(x1)` from `prompt_cache` (built again after each resampling, "
            "which replaces `x1`) and `r(x1)` from `RewardStates.complete`, before building "
            "`x2`'s distribution and scoring its prefix; then resampling (the KV reorder), as "
            "on the one-site path.")


class rescoring:
    """Within this context SMC scores an observed text and a finished site's completion
    again in every evaluation of the program, every row (``prompt_cache`` keeps no row
    scores, and ``RewardStates`` recalls no complete rows): the "before" of the scores
    table."""

    def __enter__(self):
        from pyro_lm.distributions import lm_distribution
        from pyro_lm.rewards.incremental import RewardStates

        self.saved = lm_distribution.ROW_SCORES_LIMIT, RewardStates.__dict__["complete"]
        lm_distribution.ROW_SCORES_LIMIT = 0
        RewardStates.complete = lambda self, reward, x, compute: compute(x)

    def __exit__(self, *exc):
        from pyro_lm.distributions import lm_distribution
        from pyro_lm.rewards.incremental import RewardStates

        lm_distribution.ROW_SCORES_LIMIT, RewardStates.complete = self.saved


def scores_ratios(args, device):
    """``[(label, {contender: s})]``: SMC over two programs whose potential scores
    something fixed in every evaluation, against their plain sampling, with the scores kept
    (``prompt_cache``'s row scores, ``RewardStates.complete``) and recomputed."""
    import pyro.distributions as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from sentiment import train_classifier

    from pyro_lm.programs import REVIEW_PROMPT, positive_reviews_reward
    from pyro_lm.rewards import Classifier

    t, n = args.max_new_tokens, args.num_particles
    lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path(), device=device)
    lexicon = positive_reviews_reward(lm.tokenizer)
    ids, mask = lm.encode(["Review:", "A review of a film:", "Rating:"])
    text = lm.encode("the film was good and I liked it a lot")[0][0]

    def observed(prompts=ids):
        z = pyro.sample("z", dist.Categorical(logits=torch.zeros(3, device=device)))
        pyro.sample("obs", pyro_lm.LMDistribution(lm, prompts[z], text.shape[-1],
                                                  attention_mask=mask[z]), obs=text)
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts[z], t, attention_mask=mask[z]))
        pyro.factor("r", lexicon(x) / 0.5)

    def observed_plain():  # z and x drawn, the text scored once: importance sampling's work
        z = torch.randint(3, (n,), device=device)
        obs = pyro_lm.LMDistribution(lm, ids[z], text.shape[-1], attention_mask=mask[z])
        x = pyro_lm.LMDistribution(lm, ids[z], t, attention_mask=mask[z]).sample()
        return x, lexicon(x), obs.log_prob(text)

    clf, _ = train_classifier(lm.tokenizer, 200, 5, lm.device)
    judge = Classifier(clf, lm.tokenizer, 1, lm.tokenizer, on_prefix="zero")
    two_sites, plain = two_site_program(lm, REVIEW_PROMPT, judge, 0.5, t)

    def two_sites_plain():  # both sites drawn, each completion scored once
        x1, x2 = plain(n)
        return judge(x1), judge(x2)

    out = []
    for label, model, base, arg in (
            ("latent prompt, observed text, one LM site, Lexicon", observed, observed_plain,
             ()),
            ("two LM sites, a classifier on each", two_sites, two_sites_plain,
             (REVIEW_PROMPT,))):
        smc = SMC(model, num_particles=n)

        def before(smc=smc, arg=arg):
            with rescoring():
                return smc.run(*arg)

        med = interleaved({"plain": base, "smc": lambda smc=smc, arg=arg: smc.run(*arg),
                           "before": before}, repeats=args.repeats, device=device)
        out.append((label, med))
        print(label, {c: f"{v * 1e3:.1f} ms" for c, v in med.items()}, flush=True)
    return out


def scores_section(args, rows):
    """The "scores computed once" part of the section."""
    cells = [[label, f"{m['plain'] * 1e3:.1f}", f"{m['smc'] * 1e3:.1f}",
              f"{m['smc'] / m['plain']:.2f}", f"{m['before'] * 1e3:.1f}",
              f"{m['before'] / m['plain']:.2f}", f"{m['before'] / m['smc']:.2f}"]
             for label, m in rows]
    return ("### SMC over programs that score something fixed in every evaluation\n\n"
            "SMC over a program re-runs it after every token. An observed text is scored by "
            "its LM in every run, and a finished site's completion by its reward while the "
            "next site is decoded. Within one SMC run, `prompt_cache` scores each distinct "
            "row (prompt and completion) of `LMDistribution.token_log_probs` once, without "
            "gradients and while the LM is unchanged (`pyro_lm/distributions/lm_distribution.py`"
            ": the observed text once per distinct latent prompt, not once per token and "
            "particle). A reward called on complete rows equal to those of the last call at "
            "the same place returns that call's values (`RewardStates.complete`, rows "
            "reordered with the particles). The \"recomputed\" columns run the same SMC with "
            "both switched off (the classifier's own incremental form, which classifies a row "
            "once it has ended, stays on). Bundled LM, "
            f"{args.num_particles} particles, {args.max_new_tokens} new tokens per site, "
            "beta 0.5. Program 1: `z` uniform over 3 prompts, an 11-token observed review "
            "from `prompts[z]`, `x` from `prompts[z]`, the positive-reviews Lexicon on `x`; "
            "plain = `z` and `x` drawn and the text scored once (importance sampling's work, "
            "no Pyro). Program 2: the two-site program above with a 1-layer GPT-2 sentiment "
            "classifier (`Classifier(..., on_prefix='zero')`, trained as in "
            "`examples/sentiment.py`) as the reward of each site; plain = both sites drawn "
            f"and each completion scored once. Medians of {args.repeats} interleaved calls.\n\n"
            + table(["program", "plain, ms", "SMC, ms", "÷ plain", "SMC, scores recomputed, ms",
                     "÷ plain", "speed-up"], cells))


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-particles", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--ess-runs", type=int, default=20)
    p.add_argument("--lengths", type=int, nargs="*", default=None,
                   help="T values of the per-token overhead table (default: 25 100 400, "
                        "none with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.ess_runs = 2, 3
    return args


if __name__ == "__main__":
    main(parse_args())
