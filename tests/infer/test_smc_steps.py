"""Step-level SMC (``SMC(..., steps=...)``) against exact enumeration.

The LM is a random GPT-2 over a byte-level vocabulary of five tokens, ``<eos>``, ``"a"``,
``" a"``, ``"."`` and ``"\\n"``, so that words span several tokens and delimiters fall
inside or across tokens. Unbiasedness of :math:`\\hat Z` is checked on a plate of ``R``
identical prompts: ``R`` independent particle systems (resampling is per prompt).
"""

import importlib.util
import math
import re
from pathlib import Path

import pyro
import pytest
import torch
from checks import exact_chi2_pvalue

import pyro_lm
from pyro_lm.distributions.prefix import counted_mask, prefix_context, prefix_length
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import SMC, AutoLMGuide
from pyro_lm.infer.smc_steps import StepEnds, check_steps, word_start_table
from pyro_lm.lm import toy_lm
from pyro_lm.lm.causal_lm import CausalLM

pytestmark = pytest.mark.filterwarnings("ignore:.*not registered in the param store")

T = 4
PIECES = ["a", "Ġa", ".", "Ċ"]  # ids 1..4: "a", " a", ".", "\n" (GPT-2's byte alphabet)
WEIGHTS = torch.tensor([0.0, 0.3, -0.7, 1.2, 0.5])  # per token id, EOS 0
STEPS = [2, 3, "word", r"[.!?]\s", "\n", r"\.a"]


def byte_level_lm(seed: int = 0, init_std: float = 0.5) -> CausalLM:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{p: i + 1 for i, p in enumerate(PIECES)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>",
                                 pad_token="<eos>", unk_token="<eos>")
    base = toy_lm(vocab_size=len(vocab), n_layer=1, n_embd=16, seed=seed, init_std=init_std)
    return CausalLM(base.model, hf)


@pytest.fixture(scope="module")
def lm():
    return byte_level_lm()


def reward(x):
    """A prefix-aware sum of per-token weights over the content tokens."""
    return (WEIGHTS.to(x.device)[x] * counted_mask(x, 0)).sum(-1)


def one_prompt_model(lm):
    def model(prompt):
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompt, T))
        pyro.factor("r", reward(x))

    return model


def plate_model(lm, seen=None):
    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, prompts, T))
            if seen is not None:
                seen.append(prefix_length())
            pyro.factor("r", reward(x))

    return model


def assert_unbiased(log_z_hat, exact_log_z):
    """Mean of Z_hat / Z over the replicates within 4 SE of 1, and the log of the mean
    within 4 (delta-method) SE of log Z."""
    ratio = (log_z_hat - exact_log_z).exp().reshape(-1).double()
    mean, se = ratio.mean(), ratio.std() / math.sqrt(ratio.numel())
    assert abs(mean - 1) < 4 * se, (mean, se)
    assert abs(mean.log()) < 4 * se / mean, (mean.log(), se / mean)


@pytest.mark.parametrize("steps", STEPS, ids=str)
def test_z_unbiased(lm, steps):
    model = plate_model(lm)
    prompts = torch.zeros(400, 1, dtype=torch.long)
    exact = enumerate_model(model, prompts[:1])
    post = SMC(model, num_particles=16, steps=steps).run(prompts)
    assert post.history["resampled"].any(), "the test should exercise resampling"
    assert_unbiased(post.log_normalizer(), exact.log_Z)


@pytest.mark.parametrize("steps", [2, "word", r"[.!?]\s"], ids=str)
def test_population_matches_posterior(lm, steps):
    """Chi-square goodness of fit of the resampled population to the exact p* (p > 1e-3)."""
    model = one_prompt_model(lm)
    prompt = torch.zeros(1, dtype=torch.long)
    exact = enumerate_model(model, prompt)
    post = SMC(model, num_particles=20000, steps=steps).run(prompt)
    draws = post.resample(2000)["x"]
    assert exact_chi2_pvalue(exact, draws) > 1e-3


@pytest.mark.parametrize("steps", [2, "word", "\n"], ids=repr)
def test_weights_telescope_with_a_guide(lm, steps):
    """Without resampling, log w = log p0(x) + f(x) - log q(x) exactly, whatever the steps."""
    model = plate_model(lm)
    prompts = torch.zeros(2, 1, dtype=torch.long)
    guide_lm = byte_level_lm(seed=3, init_std=0.1)
    post = SMC(model, AutoLMGuide(model, guide_lm), num_particles=64, ess_threshold=0.0,
               steps=steps).run(prompts)
    x = post.samples["x"]
    dist = pyro_lm.LMDistribution(lm, prompts, T)
    expected = dist.log_prob(x) + reward(x) - dist.with_lm(guide_lm).log_prob(x)
    torch.testing.assert_close(post.log_weights, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [2, "word", "\n"], ids=repr)
def test_potentials_held_between_step_ends(lm, steps):
    """Without resampling and with the prior proposing, log w_t is the potential at each
    particle's last step end: log Z_hat_t (the history) is rebuilt from the samples, with
    the step ends found independently (an ended particle takes its complete potential at
    the next token where the potential is evaluated)."""
    model = one_prompt_model(lm)
    post = SMC(model, num_particles=64, ess_threshold=0.0, steps=steps).run(
        torch.zeros(1, dtype=torch.long))
    x, history = post.samples["x"], post.history["log_Z"]
    eos = x == 0
    phi, expected = torch.zeros(x.shape[0]), []
    for t in range(history.shape[0]):
        before, after = eos[:, :t].any(-1), eos[:, : t + 1].any(-1)
        if steps == 2:
            hit = torch.full_like(before, (t + 1) % 2 == 0)
        elif steps == "word":  # " a" (2) and "\n" (4) start words
            hit = (x[:, t] == 2) | (x[:, t] == 4) if t > 0 else torch.zeros_like(before)
        else:
            hit = x[:, t] == 4
        hit = hit & ~before
        if t + 1 == history.shape[0]:
            phi = reward(x)
        elif hit.any():
            with prefix_context(t + 1):
                phi = torch.where(hit | after, reward(x), phi)
        expected.append(phi.logsumexp(0) - math.log(x.shape[0]))
    torch.testing.assert_close(history, torch.stack(expected), atol=1e-4, rtol=0)


def test_k_steps_evaluate_and_resample_only_at_step_ends(lm):
    """With k = 2 the factors see prefixes of even length only (and the full value at the
    end), and resampling is decided only after tokens 2 and 4."""
    seen = []
    model = plate_model(lm, seen)
    prompts = torch.zeros(50, 1, dtype=torch.long)
    post = SMC(model, num_particles=16, steps=2, ess_threshold=1.0).run(prompts)
    prefixes = set(seen) - {None}  # None: the structure run and the final evaluation
    assert prefixes == {2}, prefixes
    resampled = post.history["resampled"]  # (T', R), after token t + 1
    assert resampled[1].all() and not resampled[0].any() and not resampled[2:].any()


def test_word_and_delimiter_step_ends(lm):
    """StepEnds on known token rows: a word starts with " a" or "\\n"; a delimiter match may
    span tokens ("." then " a" for r"[.!?]\\s") or sit inside one ("\\n")."""
    table = word_start_table(lm.tokenizer, 6, torch.device("cpu"))
    assert table.tolist() == [False, False, True, False, True, False]
    rows = torch.tensor([[1, 2, 3, 2],   # "a a. a"
                         [3, 1, 4, 1],   # ".a\na"
                         [1, 3, 0, 0]])  # "a." then EOS
    ends = {}
    for steps in ("word", r"[.!?]\s", "\n", r"\.a"):
        step_ends = StepEnds(check_steps(steps), lm.tokenizer, 5, 3, torch.device("cpu"))
        done = torch.zeros(3, dtype=torch.bool)
        marks = []
        for t in range(T):
            ended, done = done, done | (rows[:, t] == 0)
            at = step_ends.ends(rows[:, t], t, ended, done)
            marks.append([False] * 3 if at is False else at.tolist())
        ends[steps] = torch.tensor(marks).T.tolist()
    f, o = False, True
    # an ended row is at a step end at the first evaluation after it ended (then settled)
    assert ends["word"] == [[f, o, f, o], [f, f, o, f], [f, f, o, f]]
    assert ends[r"[.!?]\s"] == [[f, f, f, o], [f, f, f, f], [f, f, f, o]]
    assert ends["\n"] == [[f, f, f, f], [f, f, o, f], [f, f, o, f]]
    assert ends[r"\.a"] == [[f, f, f, f], [f, o, f, f], [f, f, f, f]]
    # resampled rows take their ancestors' recent text
    step_ends = StepEnds(check_steps(r"\.a"), lm.tokenizer, 5, 2, torch.device("cpu"))
    no = torch.zeros(2, dtype=torch.bool)
    step_ends.ends(torch.tensor([3, 1]), 0, no, no)
    step_ends.reorder(torch.tensor([0, 0]))
    assert step_ends.ends(torch.tensor([1, 1]), 1, no, no).tolist() == [True, True]


def two_site_model(lm):
    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            first = pyro_lm.LMDistribution(lm, prompts, 2)
            x1 = pyro.sample("x1", first)
            pyro.factor("r1", reward(x1))
            ids, mask = first.prompt_with(x1)
            x2 = pyro.sample("x2", pyro_lm.LMDistribution(lm, ids, 2, attention_mask=mask))
            pyro.factor("r2", reward(x2))

    return model


@pytest.mark.parametrize("steps", [2, "word", r"\."], ids=str)
def test_program_path_unbiased(lm, steps):
    model = two_site_model(lm)
    prompts = torch.zeros(300, 1, dtype=torch.long)
    exact = enumerate_model(model, prompts[:1])
    post = SMC(model, num_particles=16, steps=steps).run(prompts)
    assert_unbiased(post.log_normalizer(), exact.log_Z)


@pytest.mark.parametrize("steps, match", [
    (0, "positive int"), (-2, "positive int"), (1.5, "expected 'token'"),
    (True, "expected 'token'"), ("", "empty delimiter"), ("(", "valid delimiter regex"),
    ("a*", "empty string"), (r"\n+", "bounded length"), (object(), "expected 'token'"),
    (re.compile(b"x"), "expected 'token'"),
    ("tokens", "did you mean 'token'"), ("Word", "did you mean 'word'"),
    ("WORDS", "did you mean 'word'"),
])
def test_bad_steps(lm, steps, match):
    with pytest.raises(ValueError, match=f"steps: .*{match}"):
        SMC(plate_model(lm), steps=steps)


def test_a_delimiter_spelled_like_a_mode_is_compiled(lm):
    assert SMC(plate_model(lm), steps=re.compile("tokens")).steps.pattern == "tokens"


def test_steps_refuse_lookahead(lm):
    with pytest.raises(ValueError, match="steps: .*lookahead=None"):
        SMC(plate_model(lm), steps="word", lookahead="full")
    assert SMC(plate_model(lm), steps=1).steps == "token"


# ------------------------------------------------------------------ examples/steps.py
def load_steps_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "steps.py"
    spec = importlib.util.spec_from_file_location("example_steps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_example_runs_tiny(capsys):
    """examples/steps.py --tiny: four exact samplers, finite log Z and ESS, and the
    sentence reward counts finished sentences only (on prefixes too)."""
    module = load_steps_example()
    rows = module.main(module.parse_args(["--tiny", "--device", "cpu"]))
    assert [r["sampler"] for r in rows] == ["importance (prior)", "SMC, token steps",
                                            "SMC, word steps", "SMC, sentence steps"]
    for row in rows:
        assert math.isfinite(row["log Z"]) and 0 < row["final ESS"] <= 16
    assert "word steps" in capsys.readouterr().out
    prior = module.load_prior("cpu", "tinylm-bpe")
    reward = module.sentence_reward(prior)
    x = pyro_lm.LMDistribution(prior, "Review:", 24).encode_value(
        [" The lamp is great. It is awful.", " The lamp is great. It is", " It is great"])
    assert reward(x).tolist() == [0.0, 1.0, 1.0]
    ids = prior.tokenizer(" The lamp is great.", add_special_tokens=False)["input_ids"]
    with prefix_context(len(ids)):  # " The lamp is great." : not finished yet
        assert reward(x[1:2]).tolist() == [0.0]
    with prefix_context(len(ids) + 1):  # the space of " It" follows: finished
        assert reward(x[1:2]).tolist() == [1.0]
