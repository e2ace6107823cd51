"""Time per optimisation step: pyro_lm SequenceELBO and DPG against TRL's RLOO and GRPO
trainers and a hand-written PyTorch RLOO step.

    python bench/peers_rl.py [--quick] [--threads 2] [--repeats 9] [--no-trl]

The shared task of ``/work/shared/PEERS.md``: a random tiny GPT-2
(``toy_lm(vocab_size=64, n_layer=2, n_embd=64, n_head=2, init_std=0.02)``, BOS/EOS
id 0), one BOS prompt, 20 new tokens, reward = count of token 7, beta = 0.1,
K = 64 completions per step, Adam lr 1e-4, float32. Every contender gets its own
copy of the same initial weights; calls alternate between contenders (warm-up
first) and medians are reported.

Contenders, each doing exactly one optimisation step per timed call:

* ``floor``: :class:`floors.RLOOFloor` (sample with the KV cache, policy
  fwd/bwd, reference fwd, LOO advantage with the k1 KL folded into the reward,
  Adam).
* ``SequenceELBO`` / ``DPG``: ``pyro.infer.SVI(model, AutoLMGuide(model, policy),
  Adam, loss=SequenceELBO(num_particles=K) / DPG(num_particles=K)).step(prompts)``.
* ``TRL RLOO`` / ``TRL GRPO`` (trl 1.16.0): the trainer's own ``train()`` loop runs
  in a worker thread; a ``TrainerCallback`` blocks it at ``on_step_end`` until the
  next timed call releases it, so each timed call is one full iteration of TRL's
  loop (batch, generation, reward, old/reference log-probs, loss, backward,
  clipping, Adam, LR schedule, metrics). Only one thread runs at a time. No hub
  access: the policy is built in memory; TRL builds its reference model with
  ``from_pretrained(model.config._name_or_path)``, so the initial weights are
  saved to a temporary directory first. Gradient checkpointing is off (TRL turns
  it on by default; it only trades time for memory), bf16 off, dropout off, no
  logging, reporting or saving; TRL's default linear LR decay, gradient clipping
  (1.0), entropy metric and "old" log-prob forward stay on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import task  # noqa: E402
from common import base_parser, interleaved, machine, table, write_section  # noqa: E402
from task import TOKEN, bos_prompt, make_lm, make_model  # noqa: E402


# ------------------------------------------------------------------ contenders
def floor_step(args, device):
    return task.floor_step(args.k, args.max_new_tokens, args.beta, args.lr, device)


def pyro_lm_step(args, device, loss_name):
    import pyro

    import pyro_lm.infer
    loss_cls = getattr(pyro_lm.infer, loss_name)
    prior = make_lm(device)
    prompts = bos_prompt(device)
    model = make_model(prior, args.beta, args.max_new_tokens)
    guide = pyro_lm.infer.AutoLMGuide(model, prior.trainable_copy(), name=f"{loss_name}_policy")
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}),
                         loss=loss_cls(num_particles=args.k))
    return lambda: svi.step(prompts)


class TRLStepper:
    """Drive a TRL trainer one optimisation step at a time (see the module docstring)."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        stepper = self
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.stop, self.error = False, None

        class Pause(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                stepper.go.acquire()

            def on_step_end(self, args, state, control, **kwargs):
                stepper.done.release()
                stepper.go.acquire()
                if stepper.stop:
                    control.should_training_stop = True

        trainer.add_callback(Pause())
        self.thread = threading.Thread(target=self._train, args=(trainer,), daemon=True)
        self.thread.start()

    def _train(self, trainer):
        try:
            trainer.train()
        except BaseException as e:  # surfaced by step()
            self.error = e
        finally:
            self.done.release()

    def step(self):
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("TRL training loop failed") from self.error

    def close(self):
        self.stop = True
        self.go.release()
        self.thread.join(timeout=60)


def trl_stepper(args, device, kind, workdir):
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback

    lm = make_lm(device)
    model = lm.model.requires_grad_(True).train()
    path = Path(workdir) / kind
    model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    model.config._name_or_path = str(path)  # TRL loads its reference model from here
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"

    def count7(completions, completion_ids, **kwargs):
        return [float(sum(1 for t in ids if t == TOKEN)) for ids in completion_ids]

    config_cls, trainer_cls = {"rloo": (trl.RLOOConfig, trl.RLOOTrainer),
                               "grpo": (trl.GRPOConfig, trl.GRPOTrainer)}[kind]
    config = config_cls(
        output_dir=str(path / "out"), per_device_train_batch_size=args.k,
        num_generations=args.k, max_completion_length=args.max_new_tokens, beta=args.beta,
        learning_rate=args.lr, temperature=1.0, top_k=0, top_p=1.0, disable_dropout=True,
        gradient_checkpointing=False, bf16=False, use_cpu=device.type == "cpu",
        report_to="none", save_strategy="no", logging_steps=10**9, disable_tqdm=True,
        max_steps=10**6, dataloader_num_workers=0, seed=0)
    dataset = Dataset.from_dict({"prompt": [tokenizer.eos_token] * 10**5})  # the BOS prompt
    trainer = trainer_cls(model=model, reward_funcs=count7, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # no per-run summary printed at the end
    return TRLStepper(trainer)


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def trl_in_child(args, kind: str) -> float:
    """Median seconds per TRL step, measured in a child process running only TRL.

    Once a TRL trainer has stepped in a process, every later torch call there (the floor's
    too) runs about twice as slow at 2 threads, through process state we could not pin down;
    a child process keeps that away from the other contenders (and from TRL's own timing).
    """
    cmd = [sys.executable, __file__, "--trl-child", kind, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--k", str(args.k),
           "--max-new-tokens", str(args.max_new_tokens), "--beta", str(args.beta),
           "--lr", str(args.lr), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"TRL {kind} child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median"]


def trl_child(args) -> None:
    """Time one TRL trainer alone and print ``{"median": seconds}``."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        stepper = trl_stepper(args, torch.device(args.device), args.trl_child, workdir)
        try:
            med = interleaved({"trl": stepper.step}, repeats=args.repeats, warmup=args.warmup,
                              device=args.device)
        finally:
            stepper.close()
    print(json.dumps({"median": med["trl"]}))


# ------------------------------------------------------------------------ main
def main(args):
    if args.trl_child:
        return trl_child(args)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    fns, notes = {}, {}
    fns["floor"] = floor_step(args, device)
    notes["floor"] = "hand-written RLOO step (bench/floors.py)"
    for name in ("SequenceELBO", "DPG"):
        try:
            fns[name] = pyro_lm_step(args, device, name)
            notes[name] = f"SVI(model, AutoLMGuide, Adam, {name}(num_particles={args.k})).step"
        except (ImportError, AttributeError) as e:
            notes[name] = f"not run: {type(e).__name__}: {e}"
    med = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
    if not args.no_trl:
        for kind, label in (("rloo", "TRL RLOO"), ("grpo", "TRL GRPO")):
            try:
                med[label] = trl_in_child(args, kind)
            except (ImportError, RuntimeError) as e:
                notes[label] = f"not run: {e}"
                continue
            notes[label] = (f"trl {trl_version()} {kind.upper()}Trainer, one step of its "
                            "train() loop (in a child process, see below)")

    floor = med["floor"]
    rows = []
    for name in ("floor", "SequenceELBO", "DPG", "TRL RLOO", "TRL GRPO"):
        if name in med:
            rows.append([name, f"{1e3 * med[name]:.1f}", f"{med[name] / floor:.2f}", notes[name]])
        elif name in notes:
            rows.append([name, "—", "—", notes[name]])
    lines = []
    if "SequenceELBO" in med and "TRL RLOO" in med:
        speedup = med["TRL RLOO"] / med["SequenceELBO"]
        lines.append(f"- SequenceELBO step is **{speedup:.2f}×** faster than TRL's RLOO step "
                     f"(target ≥ 1.4×: {'met' if speedup >= 1.4 else 'NOT met'}).")
    if "DPG" in med:
        ratio = med["DPG"] / floor
        lines.append(f"- DPG step is **{ratio:.2f}×** the hand-written RLOO step "
                     f"(target ≤ 1.15×: {'met' if ratio <= 1.15 else 'NOT met'}).")
    if "SequenceELBO" in med:
        lines.append(f"- SequenceELBO step is {med['SequenceELBO'] / floor:.2f}× the "
                     "hand-written RLOO step.")
    cmd = (f"python bench/peers_rl.py --threads {args.threads} --repeats {args.repeats}"
           f"{' --device ' + args.device if args.device != 'cpu' else ''}")
    body = (
        f"## RL step against TRL (peers, {device.type})\n\n"
        f"Machine: {machine()}.\n"
        f"Command (every row): `{cmd}`\n\n"
        f"Task: random tiny GPT-2 (2 layers, 64 wide, vocab 64), one BOS prompt, "
        f"{args.max_new_tokens} new tokens, reward = count of token {TOKEN}, beta = {args.beta}, "
        f"K = {args.k} completions per step, Adam lr {args.lr}. Median of {args.repeats} "
        f"calls after {args.warmup} warm-up rounds; floor, SequenceELBO and DPG interleaved in "
        "this process, each TRL trainer alone in a child process (once a TRL trainer has "
        "stepped in a process, every later torch call there, the floor's too, runs about 2× "
        "slower at 2 threads; we did not find which process state it changes).\n\n"
        + table(["contender", "ms / step", "÷ floor", "what is timed"], rows)
        + "\n\n" + "\n".join(lines) + "\n\n"
        "Differences that matter: TRL's RLOO uses the same k1 KL folded into the reward and "
        "the same leave-one-out baseline, but each step also runs one more no-grad policy "
        "forward (\"old\" log-probs for its clipped ratio), computes the entropy, clips "
        "gradients and decays the learning rate (its defaults, kept). GRPO optimises a "
        "different objective (k3 KL added to the loss, group-normalised advantages) and, "
        "on-policy as here, skips the \"old\" forward. "
        "SequenceELBO is the same estimator as the floor (RLOO with the k1 KL in the "
        "signal) run through Pyro's SVI (traces, plates, param store); DPG draws the same "
        "samples and fits the forward KL with self-normalised importance weights.")
    if not args.quick:
        write_section("peers-rl", body)
    print(body)
    return med


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], repeats=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=64, help="completions per step")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-trl", action="store_true", help="skip the TRL trainers")
    p.add_argument("--trl-child", choices=("rloo", "grpo"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.k = 2, 1, 16
    return args


if __name__ == "__main__":
    main(parse_args())
