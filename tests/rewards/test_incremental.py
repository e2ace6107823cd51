"""Incremental rewards: the same prefix values as ``forward``, from states that follow their
rows; SMC with them is exact against enumeration, and bitwise the run without them."""

import math

import pyro
import pytest
import torch

import pyro_lm
from pyro_lm.distributions import prefix_context
from pyro_lm.exact import enumerate_model
from pyro_lm.infer import SMC
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import (
    Callable,
    Lexicon,
    PrefixContractError,
    Regex,
    Reward,
    RewardStates,
    TokenCounts,
    check_prefix_contract,
)


@pytest.fixture(scope="module")
def bpe():
    return pyro_lm.CausalLM.from_pretrained(pyro_lm.bundled_model_path("tinylm-bpe"))


REWARDS = ["lexicon", "counts", "regex monotone", "regex monotone, match = prefix value",
           "regex at the end"]


def rewards_of(lm):
    """One of each incremental reward, in the order of :data:`REWARDS`."""
    return [Lexicon(lm, {"the": -0.5, "good": 1.0, "very good": 2.0, "is": -3.0}),
            TokenCounts(lm, {1: 1.0, 5: -2.0}),
            Regex(lm, r"\bgood\b", match=-2.0, monotone=True),
            Regex(lm, r"\bthe\b", match=0.0, no_match=-2.0, monotone=True, prefix_value=0.0),
            Regex(lm, r"\.\Z", match=1.0, no_match=-1.0, prefix_value=0.5)]


@pytest.mark.parametrize("which", REWARDS)
def test_states_follow_resampled_rows_and_fall_back_when_rows_change(bpe, which):
    reward = rewards_of(bpe)[REWARDS.index(which)]
    x = pyro_lm.LMDistribution(bpe, "Review:", 24).sample((32,))
    gen = torch.Generator().manual_seed(0)
    with RewardStates() as states:
        for t in range(25):
            prefix = x.masked_fill(torch.arange(24) >= t, bpe.pad_token_id)
            states.begin()
            with prefix_context(t):
                assert torch.equal(reward(prefix), reward.forward(prefix)), t
            if t % 5 == 4:  # resampling: the rows, and their states, follow ancestors
                index = torch.randint(32, (32,), generator=gen)
                x = x.index_select(0, index)
                states.reorder(index)
        assert states.hits == 25
        # another prefix of other tokens: forward, the state untouched
        changed = x.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 500
        states.begin()
        with prefix_context(24):
            assert torch.equal(reward(changed), reward.forward(changed))
        assert states.hits == 25
        # a shorter prefix (the next site of a program, at the same place): the state
        # starts over from its rows, and follows them on
        other = pyro_lm.LMDistribution(bpe, "The", 24).sample((32,))
        for t in (3, 4, 5):
            prefix = other.masked_fill(torch.arange(24) >= t, bpe.pad_token_id)
            states.begin()
            with prefix_context(t):
                assert torch.equal(reward(prefix), reward.forward(prefix)), t
        assert states.hits == 28


def test_reward_calls_are_numbered_within_an_evaluation(bpe):
    """One reward on two sites' values keeps one state per call."""
    reward = rewards_of(bpe)[0]
    a, b = (pyro_lm.LMDistribution(bpe, p, 16).sample((8,)) for p in ("Review:", "The"))
    with RewardStates() as states:
        for t in range(17):
            pa, pb = (v.masked_fill(torch.arange(16) >= t, 0) for v in (a, b))
            states.begin()
            with prefix_context(t):
                assert torch.equal(reward(pa), reward.forward(pa))
                assert torch.equal(reward(pb), reward.forward(pb))
    assert states.hits == 2 * 17


def test_check_prefix_contract_compares_the_two_forms(bpe):
    for reward in rewards_of(bpe):
        assert check_prefix_contract(reward, lm=bpe, prompts="Review:", max_new_tokens=12,
                                     num_samples=16) == 16 * 12

    class Drifting(TokenCounts):  # its incremental form forgets the first token
        def advance(self, state, token, t):
            return state if t == 0 else super().advance(state, token, t)

    with pytest.raises(PrefixContractError, match="incremental form.*must agree"):
        check_prefix_contract(Drifting(bpe, {i: 1.0 for i in range(3, 400)}), lm=bpe,
                              prompts="Review:", max_new_tokens=6, num_samples=16)


@pytest.mark.parametrize("steps,lookahead", [("token", None), (2, None), ("word", None),
                                             ("token", "full"), ("token", 4)])
def test_smc_with_incremental_rewards_is_exact(monkeypatch, subword_lm, steps, lookahead):
    """" the" + "y" is " they": the pending word, -inf settling late, and token counts."""
    lm = subword_lm
    reward = Lexicon(lm, {"the": -math.inf, "cat": -1.0, "the cat": 2.0})
    counts = TokenCounts(lm, {"Ġthe": 2.0, "y": 1.0, ".": -0.4})  # " the" + "y" matters

    def model():
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, lm.tokenizer.eos_token, 4))
        pyro.factor("r", reward(x) + counts(x))

    exact = enumerate_model(model)
    used = []
    evaluate = RewardStates.evaluate

    def spy(self, *args):
        out = evaluate(self, *args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(RewardStates, "evaluate", spy)
    pyro.set_rng_seed(0)

    def plated():  # 400 independent runs at once: a plate of identical prompts
        with pyro.plate("runs", 400):
            x = pyro.sample("x", pyro_lm.LMDistribution(lm, lm.tokenizer.eos_token, 4))
            pyro.factor("r", reward(x) + counts(x))

    post = SMC(plated, num_particles=16, steps=steps, lookahead=lookahead).run()
    assert sum(used) > 0.5 * len(used)
    ratio = (post.log_normalizer() - exact.log_Z).exp()
    se = ratio.std() / math.sqrt(ratio.numel())
    assert abs(ratio.mean() - 1) < 4 * se, (ratio.mean(), se)
    assert not torch.isneginf(post.log_normalizer()).all()


@pytest.mark.parametrize("lookahead", [None, 8])
def test_smc_is_bitwise_the_run_without_states(bpe, monkeypatch, lookahead):
    """The same seed, with and without the incremental form: the same particles and Z
    (with the lookahead, its candidates are read from the particles' states too)."""
    reward = rewards_of(bpe)[0]

    def model():
        x = pyro.sample("x", pyro_lm.LMDistribution(bpe, "Review:", 16))
        pyro.factor("r", reward(x))

    runs = []
    for incremental in (True, False):
        if not incremental:
            monkeypatch.setattr(Lexicon, "initial_state", lambda self, rows, device: None)
        pyro.set_rng_seed(3)
        post = SMC(model, num_particles=32, ess_threshold=0.9, lookahead=lookahead).run()
        runs.append((post.samples["x"], post.log_weights))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_smc_names_a_reward_that_returns_nan_on_some_prefix(bad):
    lm = toy_lm(vocab_size=4)

    def odd(x):  # NaN / +inf on prefixes of length 2 only
        from pyro_lm.distributions import prefix_length
        return torch.full(x.shape[:-1], bad if prefix_length() == 2 else 0.0)

    reward = Callable(odd, name="odd")

    def model():
        x = pyro.sample("x", pyro_lm.LMDistribution(lm, "t1", 3))
        pyro.factor("r", reward(x))

    what = "NaN" if bad != bad else r"\+inf"
    with pytest.raises(ValueError, match=f"reward 'odd' returned {what} on some prefix"):
        SMC(model, num_particles=8).run()


def test_token_counts_errors_name_the_argument(bpe):
    with pytest.raises(ValueError, match="weights: key 'nope' is not a token"):
        TokenCounts(bpe, {"nope": 1.0})
    with pytest.raises(ValueError, match=r"weights\[3\]: expected a real number"):
        TokenCounts(bpe, {3: math.inf})
    with pytest.raises(ValueError, match="weights: expected a non-empty dict"):
        TokenCounts(bpe, {})
    assert isinstance(TokenCounts(bpe, {3: 1.0}), Reward)


def test_a_value_shorter_than_the_prefix_length_is_read_whole(bpe):
    """Inside another, longer site's prefix context (SMC over a program), a reward on a
    completed shorter value is read by forward."""
    reward = rewards_of(bpe)[0]
    plan = pyro_lm.LMDistribution(bpe, "Review:", 5).sample((8,))
    with RewardStates() as states:
        for t in (4, 5, 6, 9):
            states.begin()
            with prefix_context(t):
                assert torch.equal(reward(plan), reward.forward(plan))
    assert states.hits == 2  # t = 4, 5


class _Counted(Reward):
    """Counts of token 2, recording the rows of each call on complete rows."""

    def __init__(self):
        super().__init__("counted")
        self.complete_rows = []

    def forward(self, x):
        if pyro_lm.distributions.prefix_length() is None:
            self.complete_rows.append(x.shape[0])
        return (x == 2).sum(-1).float()


def test_complete_rows_are_scored_once_and_follow_their_rows():
    """Inside RewardStates a call on complete rows equal to the last call's at the same
    place of an evaluation returns its values (also after the rows were reordered with
    the states); other rows, or another place, are scored."""
    reward = _Counted()
    x = torch.tensor([[2, 2, 1], [1, 2, 0], [3, 3, 3]])
    with RewardStates() as states:
        states.rows = 3
        states.begin()
        first = reward(x)
        states.begin()
        assert torch.equal(reward(x), first) and reward.complete_rows == [3]
        second_place = reward(x)  # the second call of this evaluation: its own place
        assert torch.equal(second_place, first) and reward.complete_rows == [3, 3]
        index = torch.tensor([2, 0, 0])
        states.reorder(index)
        states.begin()
        assert torch.equal(reward(x[index]), first[index])
        assert reward.complete_rows == [3, 3] and states.recalled == 2
        changed = x[index].clone()
        changed[1, 0] = 3
        assert reward(changed).tolist() == [0.0, 1.0, 2.0]  # scored again
        assert reward.complete_rows == [3, 3, 3]
    reward(x)  # outside: always scored
    assert reward.complete_rows == [3, 3, 3, 3]


def test_smc_over_a_program_scores_each_completion_once(monkeypatch):
    """Two LM sites and a factor on each: the first site's completion is scored once (not
    in every evaluation while the second is decoded), and the run is bitwise the one that
    scores every complete call afresh."""
    lm = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    reward = _Counted()

    def model():
        first = pyro_lm.LMDistribution(lm, "t1", 3)
        x1 = pyro.sample("x1", first)
        pyro.factor("r1", reward(x1))
        ids, mask = first.prompt_with(x1)
        x2 = pyro.sample("x2", pyro_lm.LMDistribution(lm, ids, 3, attention_mask=mask))
        pyro.factor("r2", reward(x2))

    runs = []
    for recall in (True, False):
        if not recall:
            monkeypatch.setattr(RewardStates, "complete",
                                lambda self, reward, x, compute: compute(x))
        reward.complete_rows.clear()
        pyro.set_rng_seed(5)
        post = SMC(model, num_particles=32, ess_threshold=1.0).run()
        # (calls on one row read the program's structure, with placeholder values)
        runs.append((post.samples["x1"], post.samples["x2"], post.log_weights,
                     reward.complete_rows.count(32)))
    assert runs[0][3] == 2  # the end of each site
    assert runs[1][3] > 2
    for a, b in zip(runs[0][:3], runs[1][:3], strict=True):
        assert torch.equal(a, b)


def test_a_reward_made_anew_in_every_evaluation_is_scored_anew():
    """A reward object built inside the model at every evaluation is a new reward each
    time, even where Python would give it the id of the last one (freed): its complete
    rows and prefixes are scored by itself."""
    from pyro_lm.rewards.incremental import COMPLETE_CALLS_KEPT

    lm = toy_lm(vocab_size=4)
    x = torch.tensor([[2, 2, 1], [1, 2, 0]])
    with RewardStates() as states:
        for i in range(2 * COMPLETE_CALLS_KEPT):
            states.begin()
            reward = Callable(lambda x, i=i: torch.full(x.shape[:-1], float(i)))
            assert reward(x).tolist() == [i, i]
            counts = TokenCounts(lm, {2: float(i)})
            with prefix_context(2):
                assert counts(x).tolist() == [2.0 * i, i]
            del reward, counts
        assert states.recalled == 0
        assert states.hits > 0  # a new state for each new reward (the oldest dropped)
