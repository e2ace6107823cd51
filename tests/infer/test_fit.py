"""fit: metric history, progress bar, atomic checkpoints and bit-exact resumption."""

import importlib.util
import os
import subprocess
import sys

import pyro
import pytest
import torch

from pyro_lm.infer import AutoLMGuide, SequenceELBO, fit

fit_module = importlib.import_module("pyro_lm.infer.fit")  # the module, not the function

# A small training script: the test imports it, and runs it in a new process to resume.
SCRIPT = '''
import sys

import pyro
import torch

from pyro_lm import LMDistribution
from pyro_lm.infer import AutoLMGuide, SequenceELBO, fit
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import Lexicon

PROMPTS = torch.tensor([[0], [2]])


def build():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.2)
    reward = Lexicon(prior.tokenizer, {"t1": 1.0})

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", LMDistribution(prior, prompts, 3))
            pyro.factor("reward", reward(x) / 0.5)

    policy = prior.trainable_copy()
    guide = AutoLMGuide(model, policy)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         SequenceELBO(num_particles=4))
    return svi, policy


def run(num_steps, checkpoint=None, every=None, progress=False):
    svi, policy = build()
    history = fit(svi, PROMPTS, num_steps=num_steps, checkpoint=checkpoint, every=every,
                  progress=progress)
    return history, {k: v.detach().clone() for k, v in policy.state_dict().items()}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[4]))
    history, params = run(int(sys.argv[1]), sys.argv[2])
    torch.save({"history": history, "params": params}, sys.argv[3])
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


def losses(history):
    return [(h["step"], h["loss"], h["kl"], h["reward"]) for h in history]


def test_history_has_one_record_per_step_with_the_loss_metrics(script):
    history, _ = script.run(3)
    assert [h["step"] for h in history] == [0, 1, 2]
    for h in history:
        assert {"step", "loss", "time", "elbo", "reward", "kl", "ess", "log_factor"} <= set(h)
        assert h["loss"] == pytest.approx(-h["elbo"])
    times = [h["time"] for h in history]
    assert times == sorted(times) and times[0] > 0


def test_progress_bar_shows_reward_and_kl(script, capsys):
    script.run(2, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "reward=" in err and "kl=" in err


def test_resume_in_a_new_process_is_bitwise_exact(script, tmp_path):
    threads = torch.get_num_threads()
    straight_history, straight = script.run(6)
    checkpoint = tmp_path / "run.ckpt"
    half_history, half = script.run(3, checkpoint=checkpoint)
    assert checkpoint.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left
    out = tmp_path / "resumed.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script.path), "6", str(checkpoint), str(out),
                    str(threads)], check=True, timeout=300, env=env)
    resumed = torch.load(out, weights_only=False)
    assert losses(resumed["history"]) == losses(straight_history)
    assert losses(resumed["history"][:3]) == losses(half_history)
    assert straight.keys() == resumed["params"].keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed["params"][name]), name
    # the last three steps did train: the parameters moved after the checkpoint
    assert any(not torch.equal(half[k], straight[k]) for k in straight)


def test_checkpoint_every_and_at_the_end(script, tmp_path, monkeypatch):
    saved = []
    real = fit_module.save_checkpoint

    def spy(path, svi, step, history, *rest, **kw):
        saved.append((step, len(history)))
        real(path, svi, step, history, *rest, **kw)

    monkeypatch.setattr(fit_module, "save_checkpoint", spy)
    script.run(5, checkpoint=tmp_path / "c.ckpt", every=2)
    assert saved == [(2, 2), (4, 4), (5, 5)]
    # a finished run resumed with the same num_steps does nothing and returns the history
    saved.clear()
    history, _ = script.run(5, checkpoint=tmp_path / "c.ckpt", every=2)
    assert len(history) == 5 and saved == []


def test_interrupted_save_leaves_the_previous_checkpoint_intact(script, tmp_path, monkeypatch):
    checkpoint = tmp_path / "c.ckpt"
    script.run(2, checkpoint=checkpoint)
    before = checkpoint.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        script.run(4, checkpoint=checkpoint)
    assert checkpoint.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_bad_num_steps_and_every_are_clear_errors(script):
    svi, _ = script.build()
    with pytest.raises(ValueError, match="num_steps"):
        fit(svi, script.PROMPTS, num_steps=-1)
    with pytest.raises(ValueError, match="num_steps"):
        fit(svi, script.PROMPTS, num_steps=2.5)
    with pytest.raises(ValueError, match="every"):
        fit(svi, script.PROMPTS, num_steps=2, every=0)
    assert fit(svi, script.PROMPTS, num_steps=0, progress=False) == []


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "pickle"])
def test_corrupt_checkpoint_is_a_clear_error(script, tmp_path, content):
    checkpoint = tmp_path / "bad.ckpt"
    if content == "pickle":  # a readable file of the wrong kind
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    else:
        checkpoint.write_bytes(content)
    svi, _ = script.build()
    with pytest.raises(ValueError, match="checkpoint"):
        fit(svi, script.PROMPTS, num_steps=2, checkpoint=checkpoint, progress=False)


def test_checkpoint_of_another_guide_is_a_clear_error(script, tmp_path):
    checkpoint = tmp_path / "c.ckpt"
    script.run(1, checkpoint=checkpoint)
    state = fit_module.load_checkpoint(checkpoint)
    name = next(iter(state["params"]["params"]))
    state["params"]["params"][name] = torch.zeros(7)
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="another guide"):
        script.run(2, checkpoint=checkpoint)
    pyro.clear_param_store()


class CountingELBO(SequenceELBO):
    """A loss with its own state (as DPG's running Z-hat), exposed by state_dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def loss_and_grads(self, *args, **kwargs):
        self.calls += 1
        return super().loss_and_grads(*args, **kwargs)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_checkpoint_keeps_the_loss_state(script, tmp_path):
    def run(num_steps):
        svi, _ = script.build()
        loss = CountingELBO(num_particles=4)
        svi = pyro.infer.SVI(svi.model, svi.guide, pyro.optim.Adam({"lr": 1e-2}), loss)
        fit(svi, script.PROMPTS, num_steps=num_steps, checkpoint=tmp_path / "c.ckpt",
            progress=False)
        return loss.calls

    assert run(3) == 3
    assert run(5) == 5  # restored at 3, then two more steps
    assert fit_module.load_checkpoint(tmp_path / "c.ckpt")["loss"] == [{"calls": 5}]


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_dpg_resumes_exactly(script, tmp_path, divergence):
    """DPG's running Z-hat goes into the checkpoint: 2 steps, a checkpoint, 2 more steps give
    the losses and weights of 4 uninterrupted steps (with a reset Z-hat they did not)."""
    from pyro_lm.infer import DPG

    def run(num_steps, checkpoint=None):
        svi, policy = script.build()
        svi = pyro.infer.SVI(svi.model, svi.guide, pyro.optim.Adam({"lr": 1e-2}),
                             DPG(num_particles=4, divergence=divergence))
        history = fit(svi, script.PROMPTS, num_steps=num_steps, checkpoint=checkpoint,
                      seed=0, progress=False)
        return [h["loss"] for h in history], [p.detach().clone() for p in policy.parameters()]

    straight, weights = run(4)
    run(2, tmp_path / "c.ckpt")
    resumed, resumed_weights = run(4, tmp_path / "c.ckpt")
    assert resumed == straight
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed_weights, strict=True))
    pyro.clear_param_store()


def test_checkpoint_of_a_guide_of_another_name_is_a_clear_error(script, tmp_path):
    """A checkpoint holding none of this guide's parameters would resume from fresh weights."""
    from pyro_lm.infer import AutoLMGuide

    checkpoint = tmp_path / "c.ckpt"
    script.run(1, checkpoint=checkpoint)
    svi, _ = script.build()
    guide = AutoLMGuide(svi.model, svi.guide.lm, name="policy_b")
    svi = pyro.infer.SVI(svi.model, guide, pyro.optim.Adam({"lr": 1e-2}),
                         SequenceELBO(num_particles=4))
    with pytest.raises(ValueError, match="checkpoint: .* holds no parameter 'policy_b"):
        fit(svi, script.PROMPTS, num_steps=2, checkpoint=checkpoint, progress=False)
    pyro.clear_param_store()


def test_checkpoint_folder_and_type_are_checked_before_training(script, tmp_path):
    svi, policy = script.build()
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(ValueError, match="checkpoint: the folder .* does not exist"):
        fit(svi, script.PROMPTS, num_steps=2, checkpoint=tmp_path / "runs" / "c.ckpt",
            progress=False)
    with pytest.raises(TypeError, match="checkpoint: expected a file path or None"):
        fit(svi, script.PROMPTS, num_steps=2, checkpoint=123, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    pyro.clear_param_store()


@pytest.mark.parametrize("optim, message", [
    (lambda: pyro.optim.Adam({"lr": 0.5}), r"other optimiser settings \(lr=0.01 -> 0.5\)"),
    (lambda: pyro.optim.SGD({"lr": 0.01}), "another optimiser than SGD"),
])
def test_resuming_with_another_optimiser_is_a_clear_error(script, tmp_path, optim, message):
    """The saved optimiser state would override the new settings (Adam's lr stayed 0.01) or
    fail deep in torch (KeyError 'momentum'): refused, naming the checkpoint."""
    checkpoint = tmp_path / "c.ckpt"
    script.run(1, checkpoint=checkpoint)
    svi, _ = script.build()
    svi = pyro.infer.SVI(svi.model, svi.guide, optim(), SequenceELBO(num_particles=4))
    with pytest.raises(ValueError, match=f"checkpoint: .*{message}"):
        fit(svi, script.PROMPTS, num_steps=2, checkpoint=checkpoint, progress=False)
    pyro.clear_param_store()


def test_a_guide_with_nothing_to_train_is_refused(script):
    """An AutoLMGuide over a frozen LM (the prior itself, not its trainable copy) registers
    no parameter: every step trained nothing, silently. fit refuses after the first step,
    and a loss module whose optimiser holds only frozen parameters before any step."""
    svi, _ = script.build()
    frozen = pyro.infer.SVI(svi.model, AutoLMGuide(svi.model, script.toy_lm(
        vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.2)), pyro.optim.Adam({"lr": 0.1}),
        SequenceELBO(num_particles=4))
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="svi: the step reached no trainable parameter"):
        fit(frozen, script.PROMPTS, num_steps=3, progress=False)
    pyro.clear_param_store()
    lm = script.toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1)
    module = SequenceELBO(num_particles=4)(svi.model, AutoLMGuide(svi.model, lm))
    with pytest.raises(ValueError, match="optimizer: none of its parameters requires"):
        fit(module, script.PROMPTS, num_steps=1, progress=False,
            optimizer=torch.optim.SGD(lm.parameters(), lr=0.1))
    assert len(fit(svi, script.PROMPTS, num_steps=2, progress=False)) == 2  # trainable: runs
    pyro.clear_param_store()


@pytest.mark.parametrize("change, message", [
    ("num_particles", r"other loss settings \(num_particles=4 -> 8\)"),
    ("loss", "was written by loss pyro_lm.infer.elbo.SequenceELBO, this run has "
             "pyro.infer.trace_elbo.Trace_ELBO"),
    ("prompts", r"other arguments \(prompts\)"),
])
def test_resuming_with_another_loss_or_other_prompts_is_a_clear_error(script, tmp_path, change,
                                                                      message):
    """A checkpoint continues one run: with another num_particles, another loss or other
    prompts the resumed steps ran on silently, mixing two runs in one history. Refused
    before anything is loaded; the same run still resumes (the tests above)."""
    checkpoint = tmp_path / "c.ckpt"
    script.run(1, checkpoint=checkpoint)
    svi, policy = script.build()
    before = [p.detach().clone() for p in policy.parameters()]
    loss = {"num_particles": SequenceELBO(num_particles=8), "loss": pyro.infer.Trace_ELBO(),
            "prompts": SequenceELBO(num_particles=4)}[change]
    svi = pyro.infer.SVI(svi.model, svi.guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    prompts = script.PROMPTS.flip(0) if change == "prompts" else script.PROMPTS
    with pytest.raises(ValueError, match=f"checkpoint: .*{message}"):
        fit(svi, prompts, num_steps=2, checkpoint=checkpoint, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    pyro.clear_param_store()
