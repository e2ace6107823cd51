"""Data parallelism on torch.distributed: 2 CPU processes on gloo against one process.

Every 2-process check runs in ONE spawn of two ranks (``two_ranks``, session-scoped: process
start-up with torch imports costs seconds); each rank saves what it computed and the tests
below compare it with one-process runs in the test process and with exact enumeration.
"""

import importlib.util
import math
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import get_plates

from pyro_lm import LMDistribution, distributed
from pyro_lm.exact import posterior as exact_posterior
from pyro_lm.infer import DPG, IMH, QRS, SMC, AutoLMGuide, Importance, SequenceELBO, fit
from pyro_lm.lm import toy_lm
from pyro_lm.rewards import Lexicon

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
BETA, T, K = 0.5, 3, 4
# the samplers' task is flatter (log-weights within +-1.5), so that the delta-method standard
# error of log Z-hat is a fair yardstick
SAMPLER_BETA = 2.0
# 5 distinct prompts: rank 0 gets 2, rank 1 gets 3 (uneven shards on purpose)
PROMPTS = torch.tensor([[1, 1], [1, 2], [2, 3], [3, 1], [2, 2]])
HAS_DPG_MODULE = hasattr(DPG, "differentiable_loss")


def problem(beta=BETA):
    """The enumerable task (vocab 4, T = 3), a trainable policy and K fixed completions per
    prompt drawn from the prior with a fixed seed (the same in every process)."""
    prior = toy_lm(vocab_size=4, n_layer=1, n_embd=16, seed=1, init_std=0.5)
    reward = Lexicon(prior.tokenizer, {"t1": 1.0, "t3": -1.0})

    def model(prompts):
        with pyro.plate("prompts", prompts.shape[0]):
            x = pyro.sample("x", LMDistribution(prior, prompts, T))
            pyro.factor("reward", reward(x) / beta)

    with torch.random.fork_rng():
        torch.manual_seed(123)
        fixed = LMDistribution(prior, PROMPTS, T).sample((K,))  # (K, B, T)
    table = {tuple(row): fixed[:, i] for i, row in enumerate(PROMPTS.tolist())}
    return prior, reward, model, table


class FixValues(Messenger):
    """Gives the LM site ``x`` the fixed completions of its prompts when it is drawn inside a
    particle plate (K particles); placeholder runs without one are left alone. It sets the
    value without finishing the message, so the outer plates still broadcast the site."""

    def __init__(self, table, prompts):
        super().__init__()
        self.table, self.prompts = table, prompts

    def _pyro_sample(self, msg):
        if msg["name"] == "x" and any(f.size == K and f.name != "prompts"
                                      for f in get_plates()):  # the enclosing plates
            msg["value"] = torch.stack([self.table[tuple(r)] for r in self.prompts.tolist()], 1)


class FixedGuide(AutoLMGuide):
    """AutoLMGuide whose completions are the fixed ones of each prompt (so the gradient is
    a deterministic function of the parameters)."""

    def __init__(self, model, lm, table):
        super().__init__(model, lm)
        self.__dict__["table"] = table

    def propose(self, prompts):
        with FixValues(self.table, prompts):
            return super().propose(prompts)


def _full(p):
    """A parameter's whole value (an FSDP2 parameter is a DTensor shard)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def one_sgd_step(kind: str, prompts=PROMPTS, checkpoint=None):
    """One fit step with SGD(lr=1) on the fixed completions: ``(delta, record)`` where
    ``delta`` is the gradient (parameters before minus after) and ``record`` the step's
    reduced metrics. ``fsdp_*`` shards the guide LM with FSDP2 when distributed."""
    pyro.clear_param_store()
    prior, _, model, table = problem()
    policy = prior.trainable_copy()
    if kind.startswith("fsdp") and distributed.is_distributed():  # else: the reference
        from torch.distributed.fsdp import fully_shard

        for block in policy.model.transformer.h:
            fully_shard(block)
        fully_shard(policy.model)
    guide = FixedGuide(model, policy, table)
    before = [_full(p).clone() for p in policy.parameters()]
    if kind in ("svi_elbo", "svi_dpg"):
        loss = SequenceELBO(num_particles=K) if kind == "svi_elbo" else DPG(num_particles=K)
        svi = pyro.infer.SVI(model, guide, pyro.optim.SGD({"lr": 1.0}), loss)
        history = fit(svi, prompts, num_steps=1, progress=False)
    else:
        elbo = DPG(num_particles=K) if kind.endswith("dpg") else SequenceELBO(num_particles=K)
        module = elbo(model, guide)
        if kind.startswith("ddp") and distributed.is_distributed():  # else: the reference
            module = torch.nn.parallel.DistributedDataParallel(module)
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        history = fit(module, prompts, num_steps=1, progress=False, optimizer=optimizer,
                      checkpoint=checkpoint)
    delta = torch.cat([(b - _full(p)).reshape(-1) for b, p in zip(before, policy.parameters(),
                                                                   strict=True)])
    return delta, history[0]


def fsdp_smc():
    """SMC proposing from the guide LM, whole and FSDP2-sharded (inside ``gathered``), with
    the same per-rank seed: the two gathered posteriors' summaries."""
    from torch.distributed.fsdp import fully_shard

    prior, _, model, _ = problem(SAMPLER_BETA)
    whole, sharded = prior.trainable_copy(), prior.trainable_copy()
    for block in sharded.model.transformer.h:
        fully_shard(block)
    fully_shard(sharded.model)
    out = []
    for policy in (whole, sharded):
        distributed.set_rng_seed(11)
        with distributed.gathered(policy.model):
            out.append(_summary(SMC(model, AutoLMGuide(model, policy), num_particles=32)
                                .run(PROMPTS)))
    return out


STEP_KINDS = ["svi_elbo", "svi_dpg", "module_elbo", "ddp_elbo", "fsdp_elbo"] + (
    ["module_dpg"] if HAS_DPG_MODULE else [])


def train(num_steps, checkpoint=None, seed=1, lr=5e-2, particles=8):
    """A seeded SequenceELBO run of the real guide: ``(history, policy state)``."""
    pyro.clear_param_store()
    prior, _, model, _ = problem()
    policy = prior.trainable_copy()
    svi = pyro.infer.SVI(model, AutoLMGuide(model, policy), pyro.optim.Adam({"lr": lr}),
                         SequenceELBO(num_particles=particles))
    history = fit(svi, PROMPTS, num_steps=num_steps, checkpoint=checkpoint, seed=seed,
                  progress=False)
    return history, {k: v.detach().clone() for k, v in policy.state_dict().items()}


def samplers():
    """The four samplers on the task, each seeded the same way."""
    prior, _, model, _ = problem(SAMPLER_BETA)
    return {"smc": lambda: SMC(model, num_particles=256, ess_threshold=0.0).run(PROMPTS),
            "smc_resampling": lambda: SMC(model, num_particles=64).run(PROMPTS),
            "importance": lambda: Importance(model, num_samples=256).run(PROMPTS),
            "qrs": lambda: QRS(model, num_samples=16).run(PROMPTS),
            "imh": lambda: IMH(model, num_steps=20, num_chains=2).run(PROMPTS)}


def _summary(post):
    return {"samples": {k: v.clone() for k, v in post.samples.items()},
            "log_weights": post.log_weights.clone(), "log_Z": post.log_normalizer().clone(),
            "stderr": post.log_normalizer_stderr().clone(), "history": dict(post.history),
            "extras": dict(post.extras)}


def _worker(rank, port, out_dir, example_argv, bench_quick):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    distributed.init("gloo")
    out = {"rank": rank}
    tic = time.perf_counter()
    # 1. gradient and metrics of one step on fixed samples, every path
    for kind in STEP_KINDS:
        out[kind] = one_sgd_step(kind)
    out["replicated"] = one_sgd_step("svi_elbo", PROMPTS[:1])  # 1 prompt, 2 ranks: averaged
    # FSDP2 checkpoint: rank 0 writes whole tensors; a fresh sharded module resumes from it
    fsdp_ckpt = Path(out_dir) / "fsdp.ckpt"
    one_sgd_step("fsdp_elbo", checkpoint=fsdp_ckpt)
    out["fsdp_resumed"] = one_sgd_step("fsdp_elbo", checkpoint=fsdp_ckpt)[0]  # no step left
    out["fsdp_smc"] = fsdp_smc()
    # 2. a short fit lowers the loss
    out["train"] = train(30, lr=5e-2)
    # 3. checkpoints: straight vs written at step 3 (by rank 0) and resumed on these 2 ranks
    ckpt = Path(out_dir) / "run.ckpt"
    out["straight"] = train(6)
    out["half"] = train(3, checkpoint=ckpt)
    if rank == 0:
        shutil.copy(ckpt, Path(out_dir) / "half.ckpt")  # for the 1-rank resume in the test
        out["files"] = sorted(os.listdir(out_dir))
    distributed.barrier()
    out["resumed"] = train(6, checkpoint=ckpt)
    # 4. sharded samplers, gathered on every rank
    distributed.set_rng_seed(7)
    out["posts"] = {name: _summary(run()) for name, run in samplers().items()}
    # 5. a call that cannot be sharded (one prompt for two ranks): rank 0's result everywhere
    _, _, model, _ = problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = SMC(model, num_particles=32).run(PROMPTS[:1])
    out["single"] = (_summary(post), [str(w.message) for w in caught])
    out["seed"] = distributed.rank_seed(7, rank)
    out["checks_s"] = time.perf_counter() - tic
    # 6. the example, as a launcher would run it
    sys.path.insert(0, str(ROOT / "examples"))
    import distributed_fit

    out["example"] = distributed_fit.main(distributed_fit.parse_args(example_argv))
    # 7. the benchmark's 2-rank measurement
    if bench_quick:
        spec = importlib.util.spec_from_file_location("bench_distributed",
                                                      ROOT / "bench" / "distributed.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out["bench"] = bench.measure(quick=True)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out_dir, example_argv, bench_quick=False, timeout=240):
    """Run ``_worker`` on 2 ranks; fail (and stop them) after ``timeout`` seconds."""
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir), example_argv,
                                            bench_quick),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank run did not finish in {timeout} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
            for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    tic = time.perf_counter()
    ranks = spawn(out_dir, ["--tiny"], bench_quick=True)
    return {"ranks": ranks, "dir": out_dir, "wall_s": time.perf_counter() - tic}


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_two_rank_gradient_equals_one_process_on_fixed_samples(two_ranks, kind):
    one_delta, one_record = one_sgd_step(kind)
    for rank in two_ranks["ranks"]:
        delta, record = rank[kind]
        assert torch.allclose(delta, one_delta, rtol=1e-4, atol=1e-6), \
            (kind, (delta - one_delta).abs().max())
        # the recorded loss and metrics are the whole batch's (sums and prompt-weighted means)
        assert record.keys() == one_record.keys()
        for key in record:
            if key not in ("time", "step"):
                assert record[key] == pytest.approx(one_record[key], rel=1e-5, abs=1e-5), key
    assert one_delta.abs().max() > 1e-3  # the gradient is not trivially zero


def test_unshardable_fit_averages_the_ranks_gradients(two_ranks):
    # one prompt cannot be split over 2 ranks: each runs it whole (here on the same fixed
    # completions, so their mean is the one-process gradient) and the metrics are averaged
    one_delta, one_record = one_sgd_step("svi_elbo", PROMPTS[:1])
    for rank in two_ranks["ranks"]:
        delta, record = rank["replicated"]
        assert torch.allclose(delta, one_delta, rtol=1e-4, atol=1e-6)
        assert record["loss"] == pytest.approx(one_record["loss"], rel=1e-5)


def test_fsdp2_checkpoint_holds_whole_tensors_and_resumes(two_ranks, tmp_path):
    state = torch.load(two_ranks["dir"] / "fsdp.ckpt", weights_only=False)
    one_delta, _ = one_sgd_step("fsdp_elbo", checkpoint=tmp_path / "one.ckpt")
    one = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert state["params"].keys() == one["params"].keys()
    for name, value in one["params"].items():  # the sharded run's parameters, gathered
        assert not hasattr(state["params"][name], "full_tensor"), name
        assert torch.allclose(state["params"][name], value, rtol=1e-5, atol=1e-6), name
    for rank in two_ranks["ranks"]:  # resumed with no step left: the checkpoint's parameters,
        # i.e. the fresh ones minus the first step's gradient
        assert torch.allclose(rank["fsdp_resumed"], one_delta, rtol=1e-4, atol=1e-6)


def test_smc_with_an_fsdp2_guide_inside_gathered_equals_the_whole_guide(two_ranks):
    for rank in two_ranks["ranks"]:
        whole, sharded = rank["fsdp_smc"]
        assert torch.equal(whole["samples"]["x"], sharded["samples"]["x"])
        assert torch.allclose(whole["log_Z"], sharded["log_Z"], atol=1e-5)
        assert whole["log_Z"].shape == (len(PROMPTS),)


def test_ddp_and_all_reduce_give_the_same_step(two_ranks):
    rank0 = two_ranks["ranks"][0]
    assert torch.allclose(rank0["ddp_elbo"][0], rank0["module_elbo"][0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(rank0["module_elbo"][0], rank0["svi_elbo"][0], rtol=1e-5, atol=1e-7)


def test_two_rank_fit_lowers_the_exact_kl_and_keeps_ranks_in_sync(two_ranks):
    (history0, params0), (history1, params1) = (r["train"] for r in two_ranks["ranks"])
    assert [h["loss"] for h in history0] == [h["loss"] for h in history1]  # reduced metrics
    for name in params0:
        assert torch.equal(params0[name], params1[name]), name
    prior, reward, _, _ = problem()
    exact = exact_posterior(prior, reward, BETA, PROMPTS, T)
    policy = prior.trainable_copy()
    with torch.no_grad():
        before = exact.kl_q_p(policy).sum().item()
        policy.load_state_dict(params0)
        after = exact.kl_q_p(policy).sum().item()
    assert after < 0.5 * before, (before, after)


def test_checkpoint_by_rank_0_resumes_exactly_on_two_ranks(two_ranks):
    for rank in two_ranks["ranks"]:
        (straight, p_straight), (half, _), (resumed, p_resumed) = \
            rank["straight"], rank["half"], rank["resumed"]
        assert [(h["step"], h["loss"]) for h in resumed] == \
            [(h["step"], h["loss"]) for h in straight]
        assert [h["loss"] for h in half] == [h["loss"] for h in straight[:3]]
        for name in p_straight:
            assert torch.equal(p_straight[name], p_resumed[name]), name
    files = two_ranks["ranks"][0]["files"]
    assert "run.ckpt" in files and not [f for f in files if f.endswith(".tmp")]


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    rank0 = two_ranks["ranks"][0]
    ckpt = tmp_path / "half.ckpt"
    shutil.copy(two_ranks["dir"] / "half.ckpt", ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == WORLD  # every rank's RNG state
    # no step left: the parameters are the checkpoint's (rank 0 wrote the synchronised ones)
    _, at_resume = train(3, checkpoint=ckpt)
    _, at_three = rank0["half"]
    for name in at_three:
        assert torch.equal(at_resume[name], at_three[name]), name
    history, params = train(6, checkpoint=ckpt)
    assert [h["loss"] for h in history[:3]] == [h["loss"] for h in rank0["straight"][0][:3]]
    assert [h["step"] for h in history] == list(range(6))
    assert all(math.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(params[k], at_three[k]) for k in params)  # it did train on


@pytest.mark.parametrize("name", ["smc", "smc_resampling", "importance", "qrs", "imh"])
def test_sharded_samplers_return_the_same_gathered_posterior_on_every_rank(two_ranks, name):
    post0, post1 = (r["posts"][name] for r in two_ranks["ranks"])
    for key in ("log_weights", "log_Z"):
        assert torch.equal(post0[key], post1[key]), key
    assert torch.equal(post0["samples"]["x"], post1["samples"]["x"])
    pyro.set_rng_seed(7)
    one = _summary(samplers()[name]())
    assert post0["samples"]["x"].shape == one["samples"]["x"].shape
    assert post0["log_weights"].shape == one["log_weights"].shape
    assert post0["log_Z"].shape == (len(PROMPTS),)
    for key, value in one["history"].items():  # per-step records, per prompt
        assert post0["history"][key].shape[1:] == value.shape[1:], key
    for key, value in one["extras"].items():
        if isinstance(value, torch.Tensor) and value.dim():
            assert post0["extras"][key].shape == value.shape, key


@pytest.mark.parametrize("name", ["smc", "importance"])
def test_sharded_log_z_matches_one_process_and_exact_within_standard_errors(two_ranks, name):
    post = two_ranks["ranks"][0]["posts"][name]
    pyro.set_rng_seed(7)
    one = _summary(samplers()[name]())
    prior, reward, _, _ = problem()
    exact = exact_posterior(prior, reward, SAMPLER_BETA, PROMPTS, T).log_Z
    se = torch.sqrt(post["stderr"] ** 2 + one["stderr"] ** 2)
    assert ((post["log_Z"] - one["log_Z"]).abs() < 4 * se).all(), (post["log_Z"], one["log_Z"])
    assert ((post["log_Z"] - exact).abs() < 4 * post["stderr"]).all(), (post["log_Z"], exact)
    # the ranks drew independent streams: rank 1's prompts are not rank 0's draws again
    assert not torch.equal(post["samples"]["x"][:, 0], post["samples"]["x"][:, 2])


def test_unshardable_call_returns_rank_0_posterior_everywhere_with_a_warning(two_ranks):
    (post0, msgs0), (post1, _) = (r["single"] for r in two_ranks["ranks"])
    assert post0["log_weights"].shape == (32, 1)
    assert torch.equal(post0["log_weights"], post1["log_weights"])
    assert torch.equal(post0["samples"]["x"], post1["samples"]["x"])
    assert any("cannot be sharded" in m for m in msgs0)
    seeds = [r["seed"] for r in two_ranks["ranks"]]
    assert seeds[0] != seeds[1] and seeds == [distributed.rank_seed(7, r) for r in range(2)]


def test_example_runs_on_two_ranks(two_ranks):
    ex0, ex1 = (r["example"] for r in two_ranks["ranks"])
    assert (ex0["rank"], ex0["world"], ex1["rank"]) == (0, 2, 1)
    assert [h["loss"] for h in ex0["history"]] == [h["loss"] for h in ex1["history"]]
    for name in ex0["params"]:
        assert torch.equal(ex0["params"][name], ex1["params"][name]), name
    assert torch.equal(ex0["log_Z"], ex1["log_Z"]) and ex0["log_Z"].shape == (4,)
    assert torch.isfinite(ex0["log_Z"]).all()


def test_bench_quick_measures_both_world_sizes(two_ranks):
    bench = two_ranks["ranks"][0]["bench"]
    assert bench["world"] == 2 and bench["step_s"] > 0 and bench["allreduce_s"] >= 0


# ------------------------------------------------------------------ one process
def test_outside_a_process_group_nothing_changes():
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert not distributed.is_distributed()
    shard = distributed.shard_args((PROMPTS, 3))
    assert shard.args[0] is PROMPTS and not shard.sharded
    assert distributed.sharded_run(lambda *a: 1 / 0, (PROMPTS,), {}) is None


@pytest.mark.parametrize("prompts,sizes", [
    (["a", "b", "c", "d", "e"], [2, 3]),
    (torch.arange(10).reshape(5, 2), [2, 3]),
    ({"input_ids": torch.ones(4, 3, dtype=torch.long),
      "attention_mask": torch.ones(4, 3, dtype=torch.long)}, [2, 2]),
    ([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]], [1, 1]),
])
def test_shard_prompts_splits_batches_in_contiguous_blocks(prompts, sizes):
    assert distributed.is_prompt_batch(prompts)
    parts = [distributed.shard_prompts(prompts, r, 2) for r in range(2)]
    got = [len(p["input_ids"]) if isinstance(p, dict) else len(p) for p in parts]
    assert got == sizes
    if isinstance(prompts, list):
        assert parts[0] + parts[1] == prompts


@pytest.mark.parametrize("prompts", ["one prompt", [{"role": "user", "content": "hi"}],
                                     torch.tensor([1, 2]), 3])
def test_single_prompts_are_not_batches(prompts):
    assert not distributed.is_prompt_batch(prompts)
    with pytest.raises(ValueError, match="prompts"):
        distributed.shard_prompts(prompts, 0, 2)


def test_too_few_prompts_to_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        distributed.shard_prompts(["a", "b"], 0, 3)


def test_rank_seeds_are_distinct_reproducible_and_checked():
    seeds = [distributed.rank_seed(0, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [distributed.rank_seed(0, r) for r in range(8)]
    assert all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="seed"):
        distributed.rank_seed(-1, 0)


def test_fit_takes_a_loss_module_with_a_torch_optimizer():
    prior, _, model, _ = problem()
    policy = prior.trainable_copy()
    module = SequenceELBO(num_particles=4)(model, AutoLMGuide(model, policy))
    with pytest.raises(TypeError, match="optimizer"):
        fit(module, PROMPTS, num_steps=1, progress=False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    history = fit(module, PROMPTS, num_steps=2, progress=False, optimizer=optimizer)
    assert [h["step"] for h in history] == [0, 1] and "kl" in history[0]
    with pytest.raises(ValueError, match="optimizer"):
        svi = pyro.infer.SVI(model, AutoLMGuide(model, policy), pyro.optim.Adam({"lr": 1e-2}),
                             SequenceELBO(num_particles=4))
        fit(svi, PROMPTS, num_steps=1, optimizer=optimizer)


def _module_run(num_steps, checkpoint=None):
    pyro.clear_param_store()
    prior, _, model, _ = problem()
    policy = prior.trainable_copy()
    module = SequenceELBO(num_particles=4)(model, AutoLMGuide(model, policy))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    history = fit(module, PROMPTS, num_steps=num_steps, checkpoint=checkpoint, seed=3,
                  progress=False, optimizer=optimizer)
    return history, {k: v.detach().clone() for k, v in policy.state_dict().items()}


def test_loss_module_checkpoint_resumes_bitwise(tmp_path):
    straight, p_straight = _module_run(4)
    _module_run(2, tmp_path / "m.ckpt")
    resumed, p_resumed = _module_run(4, tmp_path / "m.ckpt")
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight]
    for name in p_straight:
        assert torch.equal(p_straight[name], p_resumed[name]), name
