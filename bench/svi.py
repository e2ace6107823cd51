"""SequenceELBO: time per SVI step against a hand-written RLOO step, and gradient variance
against stock Pyro ``Trace_ELBO`` at equal samples.

    python bench/svi.py [--quick] [--no-timing] [--threads 1] [--repeats 15] [--device cuda]
                        [--profile]

Task (``/work/shared/PEERS.md``): a random tiny GPT-2 (``toy_lm(vocab_size=64,
n_layer=2, n_embd=64, n_head=2, init_std=0.02)``, BOS/EOS id 0), one BOS prompt,
20 new tokens, reward = count of token 7, beta = 0.1, K = 64 particles, Adam lr 1e-4.

* **time**: ``SVI(model, AutoLMGuide(model, policy), Adam, SequenceELBO(64)).step``
  against :class:`floors.RLOOFloor` (plain torch + transformers: sample with the KV
  cache, policy forward + backward, reference forward, leave-one-out advantage with
  the k1 KL folded in, Adam), and the same SVI step with ``baseline="prefix"`` (per-token
  credit: one extra run of the model's factors per prefix length). Each has its own copy
  of the same initial weights; calls alternate after a warm-up and medians are reported.
  Target: ≤ 1.15×.
* **variance**: ``R`` independent gradients of SequenceELBO (``baseline="loo"`` and
  ``"prefix"``) and of ``Trace_ELBO(num_particles=64, vectorize_particles=True)`` at the
  initial guide (the prior) and along a training run; the total variance is the trace of
  their covariance, estimated unbiasedly over the replicates. All three estimators are
  unbiased for the same gradient. Target: ≤ 0.5× Trace_ELBO's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyro  # noqa: E402
import task  # noqa: E402
from common import base_parser, interleaved, machine, table, write_section  # noqa: E402
from task import TOKEN, bos_prompt, make_lm, make_model  # noqa: E402

from pyro_lm.infer import AutoLMGuide, SequenceELBO  # noqa: E402


def make_program(args, device, name="svi_bench_policy"):
    prior = make_lm(device)
    prompts = bos_prompt(device)
    model = make_model(prior, args.beta, args.max_new_tokens)
    policy = prior.trainable_copy()
    return model, AutoLMGuide(model, policy, name=name), policy, prompts


def floor_step(args, device):
    return task.floor_step(args.k, args.max_new_tokens, args.beta, args.lr, device)


def sequence_elbo_step(args, device, baseline="loo"):
    # one name per guide: guides timed side by side must not share param-store entries
    model, guide, _, prompts = make_program(args, device, f"svi_bench_policy_{baseline}")
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
                         loss=SequenceELBO(num_particles=args.k, baseline=baseline))
    return lambda: svi.step(prompts)


def gradient_variance(program, loss, replicates: int) -> float:
    """Trace of the covariance of ``loss``'s gradient estimates at the guide's current state."""
    model, guide, policy, prompts = program
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = []
    for _ in range(replicates):
        for p in params:
            p.grad = None
        loss.loss_and_grads(model, guide, prompts)
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    for p in params:
        p.grad = None
    return torch.stack(grads).var(0).sum().item()


def variance_ratios(args, device) -> list[tuple[int, dict, dict]]:
    """``(steps trained, metrics, {estimator: gradient variance})`` for SequenceELBO with
    ``baseline="loo"`` and ``"prefix"`` and for Trace_ELBO, at the initial guide and along a
    SequenceELBO training run (Adam lr 1e-2), at ``args.train_steps``."""
    pyro.clear_param_store()  # the timed guide registered the same parameter names
    pyro.set_rng_seed(0)
    program = make_program(args, device)
    model, guide, _, prompts = program
    ours = SequenceELBO(num_particles=args.k)
    estimators = {
        "loo": ours,
        "prefix": SequenceELBO(num_particles=args.k, baseline="prefix"),
        "Trace_ELBO": pyro.infer.Trace_ELBO(num_particles=args.k, vectorize_particles=True,
                                            max_plate_nesting=1),
    }
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         SequenceELBO(num_particles=args.k))
    out, done = [], 0
    for steps in [0] + args.train_steps:
        while done < steps:
            svi.step(prompts)
            done += 1
        ours.loss(model, guide, prompts)  # where the guide is: E_q[r]/beta and KL(q || p0)
        state = dict(ours.metrics)
        out.append((steps, state, {name: gradient_variance(program, loss, args.replicates)
                                   for name, loss in estimators.items()}))
    return out


def variance_table(variances) -> str:
    """The Markdown table of :func:`variance_ratios`' output."""
    def ratio(var, stock):
        return f"{var / stock:.3g}" if stock > 0 else "— (q deterministic)"

    rows = [[steps, f"{m['log_factor']:.1f}", f"{m['kl']:.1f}", f"{v['loo']:.4g}",
             f"{v['prefix']:.4g}", f"{v['Trace_ELBO']:.4g}", ratio(v["loo"], v["Trace_ELBO"]),
             ratio(v["prefix"], v["Trace_ELBO"])]
            for steps, m, v in variances]
    return table(["steps trained", "E_q[r]/beta", "KL(q‖p0)", "loo", "prefix", "Trace_ELBO",
                  "loo ÷ Trace_ELBO", "prefix ÷ Trace_ELBO"], rows)


def main(argv=None):
    parser = base_parser(__doc__.split("\n")[0], repeats=15)
    parser.add_argument("--no-timing", action="store_true",
                        help="only the gradient-variance table; RESULTS.md untouched")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--replicates", type=int, default=30,
                        help="gradient draws per estimator for the variance")
    parser.add_argument("--train-steps", type=int, nargs="*", default=[5, 10, 20],
                        help="SequenceELBO steps (lr 1e-2) after which the variance is measured")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of SequenceELBO steps and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.replicates, args.train_steps = 3, 1, 4, [2]
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(False)  # as in production runs; the tests run with validation on
    torch.manual_seed(0)
    device = torch.device(args.device)

    if args.profile:
        import cProfile
        import pstats

        step = sequence_elbo_step(args, device)
        for _ in range(3):
            step()
        cProfile.runctx("for _ in range(10): step()", globals(), {"step": step}, "/tmp/svi.prof")
        pstats.Stats("/tmp/svi.prof").sort_stats("tottime").print_stats(30)
        return None

    if args.no_timing:
        variances = variance_ratios(args, device)
        print(f"Gradient variance (trace of the covariance of {args.replicates} draws, "
              f"K = {args.k}, {device.type}):\n")
        print(variance_table(variances))
        return dict(variances=variances)

    fns = {"floor": floor_step(args, device), "SequenceELBO": sequence_elbo_step(args, device),
           "prefix": sequence_elbo_step(args, device, baseline="prefix")}
    med = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    ratio = med["SequenceELBO"] / med["floor"]

    variances = variance_ratios(args, device)

    rows = [["hand-written RLOO step (bench/floors.py)", f"{1e3 * med['floor']:.1f}", "1.00"],
            [f"SVI + SequenceELBO(num_particles={args.k})",
             f"{1e3 * med['SequenceELBO']:.1f}", f"{ratio:.2f}"],
            [f"SVI + SequenceELBO(num_particles={args.k}, baseline='prefix')",
             f"{1e3 * med['prefix']:.1f}", f"{med['prefix'] / med['floor']:.2f}"]]
    verdict = "met" if ratio <= 1.15 else "NOT met"
    command = "python bench/svi.py" + (f" --threads {args.threads}" if args.threads else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 15 else "")
    body = f"""
## SequenceELBO: SVI step vs hand-written RLOO, gradient variance vs Trace_ELBO ({device.type})

Machine: {machine()}.
Command: `{command}`

Task: random tiny GPT-2 (2 layers, 64 wide, vocab 64), one BOS prompt, {args.max_new_tokens} new
tokens, reward = count of token {TOKEN}, beta = {args.beta}, K = {args.k} particles, Adam lr
{args.lr}. Median of {args.repeats} interleaved calls after {args.warmup} warm-up rounds; Pyro
validation off.

{table(["contender", "ms / step", "÷ floor"], rows)}

- SequenceELBO step is **{ratio:.2f}×** the hand-written RLOO step (target ≤ 1.15×: {verdict}).
- `baseline="prefix"` costs **{med['prefix'] / med['SequenceELBO']:.2f}×** the default step
  (one run of the model's factors per prefix length, without gradient).

Gradient variance at equal samples (K = {args.k}), the trace of the covariance of {args.replicates}
independent gradient draws of each estimator at the same guide, first the initial guide
(q = p0), then along a SequenceELBO training run (Adam lr 1e-2; the posterior here is nearly
deterministic, all 7s, and the guide reaches it within about 20 steps):

{variance_table(variances)}

Both steps do the same work: one batched KV-cache decode of K rows, one policy forward with
gradient, one reference forward without, the leave-one-out advantage with the k1 KL folded into
the signal, backward, Adam. SequenceELBO adds Pyro's machinery (a structure trace of the model,
guide and model traces inside a vectorised particle plate, replay, the param store and one Adam
per parameter in `pyro.optim`). Trace_ELBO's score-function term has no baseline: its signal
f = log p0 + r/beta − log q keeps its mean. At q = p0 that mean is E[r]/beta ≈ 3, small beside
the spread of f (a token 7 is worth 10 nats), so the baseline gains only
Var(f) / (Var(f) + E[f]²) ≈ 0.75; near the posterior f is almost the constant log Z and the
leave-one-out baseline removes nearly all of it. With "loo" the "≤ 0.5" target therefore holds
near the posterior, not at every guide: the mean baseline is not the variance-optimal constant
E[f |∇log q|²] / E[|∇log q|²], and where f correlates with |∇log q|² it can even lose to no
baseline (on the vocab-4 test problem, a random guide far from both p0 and p* gives an exact
leading-order ratio of 2.6 at K = 8; tests/infer/test_elbo.py checks the target near p*).
`baseline="prefix"` credits each token with the reward collected from it on (the factors
minus their value on the prefix before it, the KL of the later tokens) and removes the
per-position mean of the other particles: the rewards of the earlier tokens no longer add
noise, which at q = p0 leaves about Σ_t Var(r_t + … + r_T) / (T · E[f²]) ≈ 0.4 of Trace_ELBO's
variance for a count reward (tests/infer/test_elbo.py checks ≤ 0.5 at the prior on a small
problem).
"""
    print(body)
    if not args.quick:
        write_section("svi", body)
    return dict(ratio=ratio, variances=variances, ms=med)


if __name__ == "__main__":
    main()
