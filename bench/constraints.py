"""Constrained SMC on a structured-output task: time against plain sampling and against
transformers' ``generate`` with the same llguidance mask, and validity of the samples.

    python bench/constraints.py [--quick] [--device cuda]

The task: the bundled byte-level BPE LM (``models/tinylm-bpe``), the prompt "Review:",
24 new tokens, 64 particles, and a regular expression on the completion,
``" (My new|The) [a-z]+ is [a-z ,]+\\."`` (pyro_lm.constraints.Regex). Contenders:

* plain sampling of N sequences (``LMDistribution.sample``), unconstrained: the floor;
* ``SMC(model, num_particles=N, constraints={"x": c})``: masked proposal, exact weights;
* transformers ``generate(do_sample=True)`` with a logits processor applying the same
  llguidance mask (:class:`~pyro_lm.constraints.ConstraintState`): the unweighted
  baseline (every token valid, but the law is the locally renormalised one, not the
  posterior, and a completion truncated at T may be invalid);
* genlm-control 0.4.1's constrained SMC on the same weights, prompt ids, particles and
  token budget: ``AWRS(PromptedLLM, BoolFSA.from_regex(pattern).coerce(llm, f=b"".join))``
  as the proposal (exact sampling from the LM restricted to viable tokens, as the mask),
  ``smc(N, 0.5, max_tokens=T + 1, terminate_when=len >= T)`` and a terminal-only critic
  that is the FSA's ``complete``: the same law as pyro_lm's (a completion truncated at T
  is judged on its text). It runs in the peers' venv (``.venv-peers``, ``make
  bench-peers``) as a subprocess of this script (``--genlm-worker``), timed there (warm-up,
  then the same number of calls) while this process waits; its samples come back as token
  ids and are judged here by the same ``Regex``. Without the peers' venv the row is
  skipped with a message.

Calls alternate between the in-process contenders; medians are reported. Targets:
constrained SMC costs at most 1.3x plain sampling of N sequences, and is at least 4x
faster than genlm-control's. ``--quick``: 8 particles, 12 tokens, 1 repeat, RESULTS.md
left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import base_parser, interleaved, machine, table, write_section  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.constraints import Regex  # noqa: E402
from pyro_lm.infer import SMC  # noqa: E402

PATTERN = r" (My new|The) [a-z]+ is [a-z ,]+\."
PROMPT = "Review:"
PEERS = Path(__file__).resolve().parent.parent / ".venv-peers"
PEERS_PYTHON = PEERS / "bin" / "python"


class MaskProcessor:
    """A transformers logits processor: the constraint's allowed tokens, per row."""

    def __init__(self, constraint, rows: int, prompt_length: int):
        self.state = constraint.state(rows, torch.device("cpu"))
        self.start = prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.start:
            self.state.advance(input_ids[:, -1].cpu())
        allowed = self.state.allowed()[:, : scores.shape[1]].to(scores.device)
        allowed[~allowed.any(-1)] = True  # ended rows: generate pads them itself
        return scores.masked_fill(~allowed, -math.inf)


def masked_generate(lm, c, n: int, t: int):
    from transformers import LogitsProcessorList

    ids, mask = lm.encode(PROMPT)
    ids, mask = ids.expand(n, -1).to(lm.device), mask.expand(n, -1).to(lm.device)
    proc = MaskProcessor(c, n, ids.shape[1])
    out = lm.model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=t,
                            max_length=None,
                            min_new_tokens=0, top_k=0, top_p=1.0, temperature=1.0,
                            logits_processor=LogitsProcessorList([proc]),
                            eos_token_id=list(lm.eos_token_ids),
                            pad_token_id=lm.pad_token_id)
    x = out[:, ids.shape[1]:]
    pad = torch.full((n, t - x.shape[1]), lm.pad_token_id, dtype=torch.long, device=x.device)
    return torch.cat([x, pad], -1)


# ------------------------------------------------------------------ genlm-control
def genlm_worker(args):
    """Under ``.venv-peers``: time genlm-control's constrained SMC on the task and print
    one JSON line: seconds per call, and the last call's particles (token ids, EOS as
    ``None``), log-weights and log marginal likelihood estimate."""
    import asyncio
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    from genlm.backend.llm import AsyncTransformer
    from genlm.control import AWRS, EOS, BoolFSA, Potential, PromptedLLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, t = args.num_particles, args.max_new_tokens
    lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"))
    ids, _ = lm.encode(PROMPT)
    backend = AsyncTransformer(lm.model, lm.tokenizer, batch_size=n, timeout=0.0)
    llm = PromptedLLM(backend, prompt_ids=ids[0].tolist())
    fsa = BoolFSA.from_regex(PATTERN).coerce(llm, f=b"".join)

    class Accepts(Potential):
        """The FSA at termination only (AWRS already keeps every prefix viable)."""

        def __init__(self):
            super().__init__(fsa.vocab)

        async def prefix(self, context):
            return 0.0

        async def complete(self, context):
            return await fsa.complete(context)

        def is_terminal_only(self):
            return True

    sampler, critic = AWRS(llm, fsa), Accepts()

    def run():
        backend.clear_cache()
        return asyncio.run(sampler.smc(n_particles=n, ess_threshold=0.5, max_tokens=t + 1,
                                       critic=critic,
                                       terminate_when=lambda context: len(context) >= t))

    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        seqs = run()
        times.append(time.perf_counter() - start)
    contexts = [[None if tok is EOS else int(tok.token_id) for tok in c] for c in seqs.contexts]
    print(json.dumps({"times": times, "contexts": contexts,
                      "log_weights": [float(w) for w in seqs.log_weights],
                      "log_ml": float(seqs.log_ml)}))


def genlm_row(args, lm, c, n: int, t: int, smc_time: float):
    """genlm-control's row, run in the peers' venv: ``(row, note)``, or ``(None, reason)``."""
    name = "genlm-control 0.4.1 SMC, AWRS + BoolFSA"
    if not PEERS_PYTHON.exists():
        return None, ("genlm-control: skipped, no peers' venv at .venv-peers (make "
                      "bench-peers builds it)")
    cmd = [str(PEERS_PYTHON), str(Path(__file__).resolve()), "--genlm-worker",
           "--num-particles", str(n), "--max-new-tokens", str(t),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "genlm-control: not run, its worker ran past 900 s"
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"genlm-control: not run, its worker failed: {tail}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    eos, pad = lm.eos_token_ids[0], lm.pad_token_id
    x = torch.full((len(out["contexts"]), t), pad, dtype=torch.long)
    for i, ctx in enumerate(out["contexts"]):
        row = [eos if tok is None else tok for tok in ctx][:t]  # EOS at T: truncated
        x[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    log_w = torch.tensor(out["log_weights"], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    if torch.isfinite(log_w).any():
        pick = torch.multinomial(log_w.softmax(0), n, replacement=True, generator=gen)
        valid = f"{float((c(x[pick]) == 0).float().mean()):.3f}"
        ess = float(1 / (log_w.softmax(0) ** 2).sum())
    else:
        valid, ess = "- (every weight 0)", 0.0
    med = statistics.median(out["times"])
    row = [name, f"{1e3 * med:.1f}", "", valid,
           f"ESS {ess:.1f}/{n}, log Z {out['log_ml']:.3f}; own process, after the others"]
    note = (f"pyro_lm constrained SMC is {med / smc_time:.1f}x faster than genlm-control's "
            f"on the same task (target >= 4x: {'met' if med / smc_time >= 4 else 'NOT met'})")
    return (row, med), note


def main(args):
    if args.genlm_worker:
        return genlm_worker(args)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    device = torch.device(args.device)
    lm = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"),
                                          device=device)
    n, t = (8, 12) if args.quick else (args.num_particles, args.max_new_tokens)
    c = Regex(lm, PATTERN)

    def model(prompt):
        pyro.sample("x", pyro_lm.LMDistribution(lm, prompt, t))

    dist = pyro_lm.LMDistribution(lm, PROMPT, t)
    smc = SMC(model, num_particles=n, constraints={"x": c})
    last = {}

    def plain():
        last["plain"] = dist.sample((n,))

    def constrained():
        last["smc"] = smc.run(PROMPT)

    def generate():
        last["generate"] = masked_generate(lm, c, n, t)

    times = interleaved({"plain": plain, "smc": constrained, "generate": generate},
                        repeats=args.repeats, warmup=1, device=device)
    post = last["smc"]
    valid = {"plain": float((c(last["plain"]) == 0).float().mean()),
             "smc": float((c(post.resample(n)["x"]) == 0).float().mean()),
             "generate": float((c(last["generate"]) == 0).float().mean())}
    rows = [["plain sampling (unconstrained)", f"{1e3 * times['plain']:.1f}", "1.00",
             f"{valid['plain']:.3f}", "-"],
            ["SMC, constraints={'x': Regex}", f"{1e3 * times['smc']:.1f}",
             f"{times['smc'] / times['plain']:.2f}", f"{valid['smc']:.3f}",
             f"ESS {float(post.ess()):.1f}/{n}, log Z {float(post.log_normalizer()):.3f}"],
            ["transformers generate + llguidance mask", f"{1e3 * times['generate']:.1f}",
             f"{times['generate'] / times['plain']:.2f}", f"{valid['generate']:.3f}",
             "unweighted (not the posterior)"]]
    genlm, note = genlm_row(args, lm, c, n, t, times["smc"])
    if genlm is not None:
        row, med = genlm
        row[2] = f"{med / times['plain']:.2f}"
        rows.append(row)
        times["genlm-control"] = med
    print(note)
    body = "\n".join([
        "## Constrained SMC (bench/constraints.py)",
        "",
        f"tinylm-bpe, prompt {PROMPT!r}, {t} new tokens, {n} particles, "
        f"Regex({PATTERN!r}); {machine()}. Medians of {args.repeats} alternating calls.",
        "",
        table(["contender", "ms per call", "x plain", "valid share", "notes"], rows),
        "",
        f"Constrained SMC / plain sampling: {times['smc'] / times['plain']:.2f}x "
        "(target <= 1.3x). " + note + ".",
    ])
    print(body)
    if not args.quick:
        write_section("constraints", body)
    return {"times": times, "valid": valid}


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-particles", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--genlm-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.genlm_worker:
        args.repeats = 1
    return args


if __name__ == "__main__":
    main(parse_args())
