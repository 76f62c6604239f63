"""Data-parallel SVI on torch.distributed (gloo on CPU): two ranks against one process.

Two real processes (``distributed_worker.py``, a gloo group through a
``file://`` rendezvous under ``tmp_path``, so no network port) run, in one
launch: (a) a fit whose loss has no noise (MAP by ``AutoDelta``) on 7 rows,
so the shards have 4 and 3 rows; (b) ``select_structure`` on a tanh
teacher, checkpointed every 10 steps; (c) the same fit stopped at step 37 by
an exception from the callback on both ranks. A second launch (new
processes) resumes (c) from its step-30 checkpoint. The references run in
this process without a group.

Tolerances. (a) is exact up to summation order: measured 6e-17 in the
parameters and 7e-15 in the losses (float64); asserted 1e-10. (b) has
particle noise that differs between the runs (each rank draws its own), so
it is compared where the fit is identified, against one-process runs with
seeds 3, 4, 5 (measured: predictions of the derived network within 0.105,
output-layer locations within 0.017, q(Γ) concentrations within 0.19, mean
loss of the last 50 steps within 8.3 nats, RMSE 0.108 against noise 0.1);
asserted at about twice those. A likelihood weighted by 1/R (a plate sized
to the shard) would move the mean loss by about 110 nats.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_structsel as ps
from pyro_structsel.infer import distributed
from pyro_structsel.model import plate as plates
from pyro_structsel.util import ranks

from common import assert_close

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORLD_SIZE = 2
LAUNCH_TIMEOUT = 240


def _launch(job: str, out: Path) -> list[dict[str, Any]]:
    """Run ``job`` on WORLD_SIZE worker processes; their results by rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error::UserWarning")
    logs = [out / f"{job}-{rank}.log" for rank in range(WORLD_SIZE)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as handle:  # the child keeps its own copy of the descriptor
                procs.append(subprocess.Popen(
                    [sys.executable, str(Path(worker.__file__)), job, str(rank),
                     str(WORLD_SIZE), str(out / f"init-{job}"), str(out)],
                    stdout=handle, stderr=subprocess.STDOUT, env=env))
        codes = [proc.wait(timeout=LAUNCH_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:  # a rank that failed leaves the others waiting: end them
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == [0] * WORLD_SIZE, "\n".join(log.read_text() for log in logs)
    return [torch.load(out / f"{job}-{rank}.pt", weights_only=False)
            for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed")
    fit_runs = _launch("fit", out)
    stopped = ps.load_checkpoint(out / "stopped.ckpt")["step"]
    resume_runs = _launch("resume", out)
    return {"out": out, "fit": fit_runs, "resume": resume_runs, "stopped_step": stopped}


def test_fit_on_two_ranks_equals_one_process_exactly(runs):
    reference = worker.exact_fit(False)
    for rank, result in enumerate(runs["fit"]):
        assert_close(result["exact"]["losses"], reference["losses"], atol=1e-10, rtol=1e-10,
                     msg=f"losses of rank {rank}")
        assert_close(result["exact"]["params"], reference["params"], atol=1e-10, rtol=1e-10,
                     msg=f"parameters of rank {rank}")


def test_traced_step_on_two_ranks_averages_to_the_full_data_loss(runs):
    for rank, result in enumerate(runs["fit"]):  # float32, summed in another order
        sharded, full = result["traced_loss"]
        assert abs(sharded - full) <= 1e-5 * abs(full), rank


def test_structures_and_folds_shared_out_over_two_ranks_equal_one_process(runs):
    # rank 0 scores structures 0 and 2 and folds 0 and 2, rank 1 the others; every rank
    # gathers the whole table. Same seeds, one thread, the same code: the one-process table
    # (asserted to 1e-6).
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = worker.compared(distributed=False)
    finally:
        torch.set_num_threads(torch_threads)
    for rank, result in enumerate(runs["fit"]):
        assert result["compared"]["labels"] == reference["labels"], rank
        for key in ("log_evidence", "se", "probability", "cv"):
            assert_close(result["compared"][key], reference[key], atol=1e-6, rtol=1e-6,
                         msg=f"{key} of rank {rank}")


def test_minibatch_rows_come_from_the_shard_and_weigh_the_whole_shard(runs):
    for rank, result in enumerate(runs["fit"]):
        batch = result["minibatch"]
        assert len(batch["rows"]) == 16 and set(batch["rows"].tolist()) <= set(
            batch["shard"].tolist()), rank
        assert batch["shard"].tolist() == list(range(rank, 255, WORLD_SIZE))
        # R |S_r| / |B_r| per row: the ranks' mean is an unbiased full-data sum
        assert batch["scale"] * 16 == pytest.approx(WORLD_SIZE * len(batch["shard"]))


def test_an_error_on_one_rank_stops_every_rank(runs):
    failing, other = runs["fit"][1]["failure"], runs["fit"][0]["failure"]
    assert failing == "KeyError: 'boom on rank 1'"
    assert other.startswith("RuntimeError: Rank 1 failed in the callback of step 3")


def test_ranks_end_with_identical_results(runs):
    first, second = (r["select"] for r in runs["fit"])
    assert first["params"].keys() == second["params"].keys()
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name  # bit for bit
    assert first["losses"] == second["losses"]
    assert first["elbo"] == second["elbo"]  # scored with the same draws on every rank
    assert first["structure"] == second["structure"]
    for name, value in first["probabilities"].items():
        assert torch.equal(value, second["probabilities"][name]), name
    assert first["store_untouched"] and second["store_untouched"]


def test_select_structure_on_two_ranks_matches_one_process(runs):
    sharded = runs["fit"][0]["select"]
    single = worker.select(None, fast=False)
    assert sharded["structure"] == single["structure"] == {"activation": "tanh"}
    tail = slice(-50, None)
    mean_loss = sum(sharded["losses"][tail]) / 50
    assert abs(mean_loss - sum(single["losses"][tail]) / 50) < 20.0
    for result in (sharded, single):
        assert float((result["predictions"] - result["y"]).pow(2).mean().sqrt()) < 0.12
    assert float((sharded["predictions"] - single["predictions"]).abs().max()) < 0.25
    for name, value in sharded["params"].items():
        if ".concentrations." in name:
            assert_close(value, single["params"][name], atol=0.4, rtol=0, msg=name)
        if ".locs.edges.e1_2" in name:  # the output layer
            assert_close(value, single["params"][name], atol=0.04, rtol=0, msg=name)


def test_distributed_checkpoint_resumes_in_distributed_run(runs):
    assert all(r.get("stopped") for r in runs["fit"])
    last = (worker.STOP_AT // worker.CHECKPOINT_EVERY) * worker.CHECKPOINT_EVERY
    assert runs["stopped_step"] == last
    fresh = runs["fit"][0]["select"]
    for rank, result in enumerate(runs["resume"]):
        resumed = result["resumed"]
        assert resumed["steps"] == list(range(last, worker.SELECT_STEPS)), rank
        assert resumed["losses"] == fresh["losses"]  # bit for bit
        for name, value in fresh["params"].items():
            assert torch.equal(resumed["params"][name], value), (rank, name)
        assert resumed["elbo"] == fresh["elbo"]
        assert resumed["structure"] == fresh["structure"]
    state = ps.load_checkpoint(runs["out"] / "full.ckpt")
    assert state["world_size"] == WORLD_SIZE and len(state["rng_per_rank"]) == WORLD_SIZE
    assert [p.name for p in runs["out"].iterdir() if p.name.endswith(".tmp")] == []


def test_distributed_checkpoint_in_one_process_warns_and_keeps_parameters(runs, tmp_path):
    checkpoint = tmp_path / "full.ckpt"
    shutil.copy(runs["out"] / "full.ckpt", checkpoint)
    model, x, y = worker.teacher()
    with pytest.warns(ps.DistributedWarning, match="written by a run of 2 process"):
        result = ps.select_structure(model, x, y, num_steps=worker.SELECT_STEPS, lr=0.05,
                                     seed=3, progress=False, checkpoint=checkpoint,
                                     num_evidence_samples=10)
    fresh = runs["fit"][0]["select"]
    assert result.losses == fresh["losses"]
    for name, value in fresh["params"].items():
        assert torch.equal(result.param_state["params"][name].detach(), value), name
    stopped = tmp_path / "stopped.ckpt"  # at step 30: one process runs the other 170 steps
    shutil.copy(runs["out"] / "stopped.ckpt", stopped)
    with pytest.warns(ps.DistributedWarning, match="written by a run of 2 process"):
        resumed = ps.select_structure(model, x, y, num_steps=worker.SELECT_STEPS, lr=0.05,
                                      seed=3, progress=False, checkpoint=stopped,
                                      num_evidence_samples=10)
    last = (worker.STOP_AT // worker.CHECKPOINT_EVERY) * worker.CHECKPOINT_EVERY
    assert resumed.losses[:last] == fresh["losses"][:last]
    assert len(resumed.losses) == worker.SELECT_STEPS
    assert all(math.isfinite(loss) for loss in resumed.losses[last:])
    assert resumed.structure == fresh["structure"]


# ----------------------------------------------------------------------------- one process


def _shard_model(x: torch.Tensor, y: torch.Tensor, rank: int | None, world_size: int,
                 batch: int | None) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    plate = (pyro.plate("data", len(x)) if rank is None else plates.shard_plate(
        "data", len(x), rank=rank, world_size=world_size, subsample_size=batch))
    with plate as idx:
        pyro.sample("y", dist.Normal(w * x[idx], 1.0), obs=y[idx])


@pytest.mark.parametrize("world_size,batch", [(1, 3), (2, None), (2, 2), (3, 1), (3, 2)])
def test_shard_plate_mean_over_ranks_and_minibatches_is_the_full_data_loss(world_size, batch):
    """Enumerate every minibatch of every shard: the mean log joint is the full one exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, generator=g, dtype=torch.float64)
    y = torch.randn(7, generator=g, dtype=torch.float64)
    w = torch.tensor(0.7, dtype=torch.float64)
    full = poutine.trace(poutine.condition(_shard_model, {"w": w})).get_trace(
        x, y, None, 1, None).log_prob_sum()
    per_rank = []
    for rank in range(world_size):
        shard = plates.shard_indices(7, rank, world_size).tolist()
        subsets = [shard] if batch is None else itertools.combinations(shard, batch)
        values = [poutine.trace(poutine.condition(
            _shard_model, {"w": w, "data": torch.tensor(subset)})).get_trace(
                x, y, rank, world_size, batch).log_prob_sum() for subset in subsets]
        per_rank.append(sum(values) / len(values))
    assert_close(sum(per_rank) / world_size, full, atol=1e-12, rtol=1e-12)


def test_shard_plate_draws_a_minibatch_of_the_shard():
    shards = [plates.shard_indices(10, rank, 3) for rank in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with plates.shard_plate("data", 10, rank=1, world_size=3, subsample_size=2) as idx:
        assert len(idx) == 2 and len(set(idx.tolist())) == 2
        assert set(idx.tolist()) <= {1, 4, 7}
    with plates.shard_plate("data", 10, rank=1, world_size=3, subsample_size=5) as idx:
        assert sorted(idx.tolist()) == [1, 4, 7]  # larger than the shard: all of it


def test_data_plate_outside_a_fit_is_pyro_plate():
    plate = ps.data_plate("data", 10, 4)
    assert type(plate) is pyro.plate and plate.subsample_size == 4
    assert not ranks.is_distributed()
    assert (ranks.rank(), ranks.world_size()) == (0, 1)


def test_bad_distributed_arguments_name_the_fix(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model, x, y = worker.teacher()
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        ps.select_structure(model, x, y, num_steps=1, distributed=True)
    with pytest.raises(ValueError, match="distributed to be True, False or None"):
        ps.select_structure(model, x, y, num_steps=1, distributed="yes")
    with pytest.raises(ValueError, match="initialised process group"):
        with ranks.use_distributed(True):
            pass
    with pytest.raises(ValueError, match="every rank needs at least one row"):
        plates.shard_indices(2, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        plates.shard_indices(5, 3, 3)


def test_one_process_group_from_the_environment(monkeypatch, tmp_path):
    """``distributed=True`` creates a group from RANK / WORLD_SIZE (here world size 1)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ps.init_distributed(init_method=f"file://{tmp_path / 'init'}")
    try:
        assert not ps.init_distributed()  # one exists already
        plain = worker.exact_fit(False)
        sharded = worker.exact_fit(True)  # the collectives of a group of one
        assert_close(sharded["params"], plain["params"], atol=1e-12, rtol=1e-12)
        assert ranks.is_main_process()
    finally:
        torch.distributed.destroy_process_group()
    assert not ranks.group_initialized()


@pytest.mark.slow
def test_main_job_under_torchrun_runs_on_two_ranks_and_writes_once(tmp_path):
    """``torchrun --standalone`` (a free port of its own): rank 0 alone reports and writes."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyro_structsel", "--steps", "20", "--subsample", "200",
         "--evidence-samples", "10", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("Posterior probability that each option") == 1, done.stdout
    assert done.stdout.count("wrote results.json") == 1
    assert (out / "results.json").exists() and (out / "idata.nc").exists()
