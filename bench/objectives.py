"""Fine-tuning objectives at equal LM calls on a sparse reward, and their cost per SVI step.

(a) **Exact divergences at equal sampled tokens.** Toy LM (vocab 4, EOS 0, 4 new tokens,
    seed 1, init_std 0.5; 121 completions), factor 6 when a completion holds at least three
    token-1's (prior probability 0.0096, posterior 0.80: on-policy DPG's importance weights
    start with an ESS of K / (1 + chi^2) < 1 of K = 32). Guides trained from the prior with
    SequenceELBO, DPG (on-policy), DPG(proposal="smc"), DPG(divergence="jeffreys"),
    TrajectoryBalance and SubTrajectoryBalance (lamda 2; each on-policy plus a replay buffer
    refreshed each step by SMC with the guide proposing), each until the same budget of
    *sampled tokens* (K x T per decode of K completions: TB's and SubTB's steps decode
    twice, so they take half the steps); the exact KL(p*||q),
    KL(q||p*) and TV(p*, q) by enumeration along the way, medians over seeds; a plot of the
    curves (bench/objectives.png). The bundled LMs' constraint tasks are not enumerable
    (vocab 512-2k, 20 tokens), so only the toy problem is measured exactly.
(b) **Time per SVI step** on the peers' task (bench/task.py, 64 particles) against the
    hand-written RLOO step of bench/floors.py, interleaved medians: DPG(jeffreys), TB and
    SubTB (on-policy), and DPG(smc) less SMC's own sampling (the median of SMC.run alone, same
    particles, subtracted). Target: <= 1.15x the floor.

    python bench/objectives.py [--quick] [--threads 1] [--seeds 3]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import task  # noqa: E402
from common import base_parser, interleaved, machine, table, write_section  # noqa: E402
from task import bos_prompt, make_lm, make_model  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm.exact import enumerate_model  # noqa: E402
from pyro_lm.infer import (  # noqa: E402
    DPG,
    SMC,
    AutoLMGuide,
    ReplayBuffer,
    SequenceELBO,
    SubTrajectoryBalance,
    TrajectoryBalance,
)
from pyro_lm.lm import toy_lm  # noqa: E402

T = 4
METHODS = ("SequenceELBO", "DPG(guide)", "DPG(smc)", "DPG(jeffreys)", "TB(+SMC replay)",
           "SubTB(+SMC replay)")
#: SubTrajectoryBalance's lamda here (lamda**(j - i) favours long sub-trajectories; 1 weighs
#: every pair alike, which trained worse on this problem: tests/infer/test_subtrajectory_balance)
LAMDA = 2.0


def sparse_problem():
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    prompts = torch.tensor([[0]])

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(prior, prompts, T))
            pyro.factor("reward", 6.0 * ((x == 1).sum(-1) >= 3).float())

    return prior, model, prompts


def measure(exact, policy):
    with torch.no_grad():
        return [exact.kl_p_q(policy).sum().item(), exact.kl_q_p(policy).sum().item(),
                exact.tv(policy).sum().item()]


def curve(name, seed, args, prior, model, prompts, exact):
    """``[(tokens, [kl_pq, kl_qp, tv]), ...]`` for one method and seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    k = args.particles
    policy = prior.trainable_copy()
    guide = AutoLMGuide(model, policy)
    optim, refresh, per_step = pyro.optim.Adam({"lr": args.lr}), None, k * T
    if name == "SequenceELBO":
        loss = SequenceELBO(num_particles=k)
    elif name == "DPG(guide)":
        loss = DPG(num_particles=k)
    elif name == "DPG(smc)":
        loss = DPG(num_particles=k, proposal="smc")
    elif name == "DPG(jeffreys)":
        loss = DPG(num_particles=k, divergence="jeffreys")
    else:
        replay = ReplayBuffer(capacity=8 * k)
        smc = SMC(model, guide=guide, num_particles=k)
        loss = (TrajectoryBalance(num_particles=k, replay=replay) if name.startswith("TB")
                else SubTrajectoryBalance(num_particles=k, replay=replay, lamda=LAMDA))
        optim = pyro.optim.Adam(lambda p, _: {"lr": 0.1 if p == "tb_log_Z" else 4 * args.lr})
        refresh, per_step = (lambda: replay.add(smc.run(prompts))), 2 * k * T
    svi = pyro.infer.SVI(model, guide, optim, loss=loss)
    points, tokens = [(0, measure(exact, policy))], 0
    while tokens < args.budget:
        if refresh is not None:
            refresh()
        svi.step(prompts)
        tokens += per_step
        if tokens % args.every < per_step or tokens >= args.budget:
            points.append((tokens, measure(exact, policy)))
    return points


def accuracy(args):
    prior, model, prompts = sparse_problem()
    exact = enumerate_model(model, prompts)
    curves = {name: [curve(name, s, args, prior, model, prompts, exact)
                     for s in range(args.seeds)] for name in METHODS}
    return curves


def final(curves):
    """Median over seeds of the last point's [kl_pq, kl_qp, tv]."""
    return {name: [statistics.median(c[-1][1][i] for c in runs) for i in range(3)]
            for name, runs in curves.items()}


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, runs in curves.items():
        for i, label in enumerate(("exact KL(p*‖q)", "exact KL(q‖p*)", "TV(p*, q)")):
            xs = [t for t, _ in runs[0]]
            ys = [statistics.median(r[j][1][i] for r in runs if j < len(r))
                  for j in range(len(xs))]
            axes[i].plot(xs, ys, label=name)
            axes[i].set_title(label)
            axes[i].set_xlabel("sampled tokens")
            axes[i].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ (b) time per step
def steps(args, device):
    prior = make_lm(device)
    prompts = bos_prompt(device)
    model = make_model(prior, args.beta, args.max_new_tokens)
    fns = {"floor": task.floor_step(args.k, args.max_new_tokens, args.beta, args.step_lr,
                                    device)}
    for name, make in (("DPG(jeffreys)", lambda g: DPG(args.k, divergence="jeffreys")),
                       ("TB", lambda g: TrajectoryBalance(args.k)),
                       ("SubTB", lambda g: SubTrajectoryBalance(args.k, lamda=LAMDA)),
                       ("DPG(smc)", lambda g: DPG(args.k, proposal="smc"))):
        guide = AutoLMGuide(model, prior.trainable_copy(), name=f"objectives_{name}")
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.step_lr}),
                             loss=make(guide))
        fns[name] = (lambda s: lambda: s.step(prompts))(svi)
        if name == "DPG(smc)":
            smc = SMC(model, guide=guide, num_particles=args.k)
            fns["SMC.run alone"] = lambda smc=smc: smc.run(prompts)
    return interleaved(fns, repeats=args.repeats, device=device)


def main(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine())
    start = time.perf_counter()
    curves = accuracy(args)
    fin = final(curves)
    header = ["objective", "KL(p*‖q)", "KL(q‖p*)", "TV(p*, q)"]
    rows = [[name] + [f"{v:.4f}" for v in vals] for name, vals in fin.items()]
    start_row = curves[METHODS[0]][0][0][1]
    rows.insert(0, ["prior (start)"] + [f"{v:.4f}" for v in start_row])
    print(table(header, rows))
    out = Path(args.plot)
    plot(curves, out)
    print(f"plot: {out} ({time.perf_counter() - start:.0f} s)")
    pyro.clear_param_store()
    med = steps(args, device)
    floor = med["floor"]
    ratios = {"DPG(jeffreys)": med["DPG(jeffreys)"] / floor, "TB": med["TB"] / floor,
              "SubTB": med["SubTB"] / floor,
              "DPG(smc) less SMC.run": (med["DPG(smc)"] - med["SMC.run alone"]) / floor}
    timing = table(["contender", "ms / step", "÷ floor"],
                   [["hand-written RLOO (bench/floors.py)", f"{1e3 * floor:.1f}", "1.00"]]
                   + [[n, f"{1e3 * med[n]:.1f}", f"{med[n] / floor:.2f}"]
                      for n in ("DPG(jeffreys)", "TB", "SubTB", "DPG(smc)", "SMC.run alone")]
                   + [["DPG(smc) less SMC.run", "", f"{ratios['DPG(smc) less SMC.run']:.2f}"]])
    print(timing)
    smc_win = fin["DPG(smc)"][0] < fin["DPG(guide)"][0]
    tb_win = fin["TB(+SMC replay)"][1] < fin["SequenceELBO"][1]
    sub_win = fin["SubTB(+SMC replay)"][1] < fin["SequenceELBO"][1]
    lines = [
        f"- DPG(smc) exact KL(p*‖q) {fin['DPG(smc)'][0]:.4f} vs on-policy DPG's "
        f"{fin['DPG(guide)'][0]:.4f} at equal sampled tokens (target: lower: "
        f"{'met' if smc_win else 'NOT met'}).",
        f"- TB exact KL(q‖p*) {fin['TB(+SMC replay)'][1]:.4f} vs SequenceELBO's "
        f"{fin['SequenceELBO'][1]:.4f} (target: lower: {'met' if tb_win else 'NOT met'}).",
        f"- SubTB exact KL(q‖p*) {fin['SubTB(+SMC replay)'][1]:.4f} vs SequenceELBO's "
        f"{fin['SequenceELBO'][1]:.4f} (target: lower: {'met' if sub_win else 'NOT met'}).",
    ] + [f"- {n} step is **{r:.2f}×** the hand-written RLOO step (target ≤ 1.15×: "
         f"{'met' if r <= 1.15 else 'NOT met'})." for n, r in ratios.items()]
    print("\n".join(lines))
    if args.quick:
        return fin, med
    body = f"""## Objectives at equal LM calls on a sparse reward, and time per step ({args.device})

Machine: {machine()}.
Command: `python bench/objectives.py --threads {args.threads} --seeds {args.seeds}`

(a) Toy LM (vocab 4, 4 new tokens, seed 1, init_std 0.5), factor 6 when a completion has
≥ 3 token-1's (prior 0.0096, posterior 0.80; on-policy ESS at the start K/(1+χ²) < 1 of
{args.particles}); every objective trained from the prior to {args.budget} sampled tokens
({args.particles} completions × {T} tokens per decode; TB and SubTB (λ = {LAMDA}) decode
twice a step: their own samples and SMC's for the replay buffer), Adam lr {args.lr} (TB and
SubTB: {4 * args.lr}, log Z 0.1);
exact divergences by enumeration, medians over {args.seeds} seeds. Curves:
bench/objectives.png. The bundled LMs' constraint tasks are not enumerable, so not here.

{table(header, rows)}

(b) Peers' task (bench/task.py; {args.k} particles, Adam lr {args.step_lr}); median of
{args.repeats} interleaved calls after 2 warm-up rounds.

{timing}

{chr(10).join(lines)}
"""
    write_section("objectives", body)
    return fin, med


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n")[0], repeats=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--budget", type=int, default=150 * 32 * T)
    p.add_argument("--every", type=int, default=10 * 32 * T)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--step-lr", type=float, default=1e-4)
    p.add_argument("--plot", default=str(Path(__file__).resolve().parent / "objectives.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.every, args.repeats, args.k = 1, 8 * 32 * T, 4 * 32 * T, 2, 16
        if args.plot == p.get_default("plot"):
            args.plot = str(Path("/tmp") / "objectives_quick.png")
    return args


if __name__ == "__main__":
    main(parse_args())
