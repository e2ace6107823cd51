"""Structured reviews: the bundled LM's completions conditioned on a format.

The posterior is p*(x) ∝ p0(x) · 1[text(x) ∈ C] for a language C given as a regular
expression or a JSON schema (pyro_lm.constraints, through llguidance). Three samplers
on one program, ``pyro.factor("valid", c(x))``:

* rejection: prior samples, kept when valid (acceptance = P(valid) under the prior);
* SMC with the constraint as a factor: particles die as soon as their prefix can no
  longer be completed into a valid text;
* SMC with the constraint as a mask (``constraints={"x": c}``): tokens are drawn from the
  LM restricted to those that keep the text valid, the weights gain the allowed mass,
  and every particle that survives is valid.

Each prints its acceptance (the share of valid samples), the final ESS and log Z (the
log-probability of the format under the prior).

    python examples/structured.py [--tiny] [--device cuda]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, load_prior  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.constraints import JSONSchema, Regex  # noqa: E402
from pyro_lm.programs import task_prompt  # noqa: E402

#: A sentence the LM writes now and then: rejection works, slowly.
SENTENCE = r" (My new|The) [a-z]+ is [a-z ,]+\."
#: "Rating: N/5 — text": the LM never starts so by itself.
RATING = r" Rating: [1-5]/5 — (My new|The) [a-z]+ is [a-z ]+\."
#: A small JSON record.
SCHEMA = {"type": "object",
          "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "review": {"type": "string", "maxLength": 24}},
          "required": ["stars", "review"], "additionalProperties": False}


def constrained_model(prior, c, max_new_tokens: int):
    def model(prompts):
        with pyro.plate("prompts", len(prompts)):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, max_new_tokens))
            pyro.factor("valid", c(x))

    return model


def summary(post, c, n):
    """Acceptance, final ESS and log Z of an SMC run (``None`` if every particle died)."""
    if post is None:
        return {"valid": 0.0, "ess": 0.0, "log_Z": -math.inf}
    x = post.resample(n)["x"]
    return {"valid": float((c(x) == 0).float().mean()), "ess": float(post.ess().mean()),
            "log_Z": float(post.log_normalizer().mean())}


def run_task(name, prior, c, prompt, args):
    t, n = args.max_new_tokens, args.num_particles
    model = constrained_model(prior, c, t)
    x0 = pyro_lm.LMDistribution(prior, [prompt], t).sample((args.num_samples,))
    acceptance = float((c(x0) == 0).float().mean())
    print(f"[{name}] rejection: acceptance {acceptance:.4f} of {args.num_samples} prior "
          f"samples (log {math.log(acceptance) if acceptance else -math.inf:.3f})")
    try:
        factor = pyro_lm.infer.SMC(model, num_particles=n).run([prompt])
    except ValueError as e:  # every particle's prefix became invalid
        print(f"[{name}] SMC, factor: every particle died ({str(e).splitlines()[0][:60]}...)")
        factor = None
    masked = pyro_lm.infer.SMC(model, num_particles=n, constraints={"x": c}).run([prompt])
    rows = {"rejection": {"valid": acceptance}, "factor": summary(factor, c, n),
            "mask": summary(masked, c, n)}
    for key in ("factor", "mask"):
        r = rows[key]
        print(f"[{name}] SMC, {key:6s}: valid {r['valid']:.3f}, ESS {r['ess']:.1f}/{n}, "
              f"log Z {r['log_Z']:.3f}")
    for text in prior.decode(masked.resample(3)["x"][:, 0]):
        print(f"    {prompt}{text}")
    return rows


def main(args):
    pyro.set_rng_seed(args.seed)
    torch.manual_seed(args.seed)
    prior = load_prior(args.device, args.model)
    prompt = task_prompt(prior)
    out = {"sentence": run_task("sentence", prior, Regex(prior, SENTENCE), prompt, args),
           "rating": run_task("rating", prior, Regex(prior, RATING), prompt, args)}
    out["json"] = run_task("json", prior, JSONSchema(prior, SCHEMA), " ", args)
    return out


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], model="tinylm-bpe")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--num-particles", type=int, default=256)
    args = p.parse_args(argv)
    if args.model != "tinylm-bpe":
        p.error("--model: constraints read the tokens' bytes, which the word-level tinylm "
                "does not have; use tinylm-bpe")
    if args.tiny:
        args.num_samples, args.num_particles = 64, 16
    return args


if __name__ == "__main__":
    main(parse_args())
