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
* genlm-control's constrained SMC, when the peers' venv (``.venv-peers``, ``make
  bench-peers``) exists; otherwise that row is skipped with a message.

Calls alternate between contenders; medians are reported. Target: constrained SMC costs
at most 1.3x plain sampling of N sequences. ``--quick``: 8 particles, 12 tokens, 1 repeat,
RESULTS.md left alone.
"""

from __future__ import annotations

import math
import sys
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


def main(args):
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
    if PEERS.exists():
        note = ("the peers' venv exists, but this script does not drive genlm-control yet: "
                "run bench/peers_smc.py for the SMC peers")
    else:
        note = ("genlm-control: skipped, no peers' venv at .venv-peers (make bench-peers "
                "builds it)")
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
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


if __name__ == "__main__":
    main(parse_args())
