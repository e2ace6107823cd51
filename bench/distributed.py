"""Data parallel: step time of fit at 1 and 2 gloo processes on the same global batch.

    python bench/distributed.py [--quick] [--repeats 8] [--threads 1]

Task: the bundled word-level LM (``models/tinylm``), the review program with
:func:`pyro_lm.programs.positive_reviews_reward` (beta 0.5, 16 new tokens), a global batch
of 8 prompts x 16 particles, Adam lr 1e-3. For ``SequenceELBO`` and ``DPG`` it runs
``fit`` on 1 process (all 8 prompts) and on 2 processes (4 prompts each, gradients
all-reduced), each process with ``--threads`` torch threads, and reports the median step
time after a warm-up (from fit's history), the ratios to one process on the whole batch
and on one rank's half of it, and the time of the gradient all-reduce alone (one flat
buffer of the LM's parameters).

On a machine with 2 CPU cores shared with other jobs this mostly measures the overhead of
data parallelism (the all-reduce's share of a step, "2 ÷ half"), not a speed-up: a speed-up
needs a free device or core per rank. ``--quick`` runs 1
warm-up and 2 timed steps on a batch of 4 x 4 and leaves RESULTS.md alone.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyro  # noqa: E402
from common import base_parser, machine, table, write_section  # noqa: E402

import pyro_lm  # noqa: E402
from pyro_lm import distributed  # noqa: E402
from pyro_lm.infer import DPG, AutoLMGuide, SequenceELBO, fit  # noqa: E402
from pyro_lm.programs import positive_reviews_reward, reward_model, task_prompt  # noqa: E402

LOSSES = {"SequenceELBO": SequenceELBO, "DPG": DPG}


def measure(quick: bool = False, repeats: int = 8, loss: str = "SequenceELBO",
            share: int = 1) -> dict:
    """Median fit step time of this process group (or one process) on the global batch, or
    on ``1 / share`` of it (one rank's part, to separate the batch size from the rest)."""
    prompts_n, particles, warmup = (4, 4, 1) if quick else (8, 16, 2)
    prompts_n //= share
    repeats = 2 if quick else repeats
    pyro.clear_param_store()
    prior = pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm"))
    model = reward_model(prior, positive_reviews_reward(prior.tokenizer), beta=0.5,
                         max_new_tokens=16)
    policy = prior.trainable_copy()
    svi = pyro.infer.SVI(model, AutoLMGuide(model, policy), pyro.optim.Adam({"lr": 1e-3}),
                         loss=LOSSES[loss](num_particles=particles))
    prompts = [task_prompt(prior)] * prompts_n
    history = fit(svi, prompts, num_steps=warmup + repeats, seed=0, progress=False)
    times = [b["time"] - a["time"] for a, b in zip(history, history[1:], strict=False)]
    step = statistics.median(times[warmup - 1:]) if len(times) >= warmup else history[0]["time"]
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    reduce_times = []
    for _ in range(3 if quick else 10):
        distributed.barrier()
        tic = time.perf_counter()
        distributed.all_reduce_grads(params)
        reduce_times.append(time.perf_counter() - tic)
    return {"world": distributed.world_size(), "loss": loss, "step_s": step,
            "allreduce_s": statistics.median(reduce_times),
            "num_params": sum(p.numel() for p in params)}


def _rank(rank, port, out, quick, repeats, threads):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    distributed.init("gloo")
    result = {name: measure(quick, repeats, name) for name in LOSSES}
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


def two_ranks(quick: bool, repeats: int, threads: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rank0.pt")
        mp.start_processes(_rank, args=(port, out, quick, repeats, threads), nprocs=2,
                           join=True, start_method="spawn")
        return torch.load(out, weights_only=False)


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=8)
    p.set_defaults(threads=1)  # one thread per process: 1 process on 1 core, 2 on 2
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    one = {name: measure(args.quick, args.repeats, name) for name in LOSSES}
    half = {name: measure(args.quick, args.repeats, name, share=2) for name in LOSSES}
    two = two_ranks(args.quick, args.repeats, args.threads)
    load = os.getloadavg()[0]
    rows = []
    for name in LOSSES:
        a, h, b = one[name], half[name], two[name]
        rows.append([name, f"{1e3 * a['step_s']:.1f}", f"{1e3 * h['step_s']:.1f}",
                     f"{1e3 * b['step_s']:.1f}", f"{b['step_s'] / a['step_s']:.2f}",
                     f"{b['step_s'] / h['step_s']:.2f}", f"{1e3 * b['allreduce_s']:.2f}",
                     f"{b['allreduce_s'] / b['step_s']:.1%}"])
    batch = "4 prompts x 4 particles" if args.quick else "8 prompts x 16 particles"
    body = f"""## Data parallel: fit step at 1 and 2 gloo processes

`python bench/distributed.py` — machine: {machine()}, {args.threads} torch thread(s) per
process. Global batch {batch} on the bundled `tinylm` ({one['SequenceELBO']['num_params']}
trained parameters), 16 new tokens; 2 processes get half the prompts each and all-reduce
the gradient (one flat float32 buffer) before Adam's step. "1 proc, half batch" is one
rank's share run alone: "2 ÷ half" is what running two ranks side by side and
communicating costs over that (all-reduces of the gradient and the metrics, waiting for the
slower rank, two processes sharing memory bandwidth). On this 2-core machine, shared with
other jobs (load average {load:.1f} at the end of the run), the two ranks get a core each
only while it is otherwise idle, so "2 ÷ 1" is a speed-up only then; timings are
indicative.

{table(["loss", "1 proc ms / step", "1 proc, half batch", "2 procs ms / step", "2 ÷ 1",
        "2 ÷ half", "all-reduce ms", "all-reduce share"], rows)}
"""
    print(body)
    if not args.quick:
        write_section("distributed", body)
    return {"one": one, "two": two}


if __name__ == "__main__":
    main()
