"""One rank of the data-parallel checks of ``test_distributed.py`` (run as a script).

``python distributed_worker.py JOB RANK WORLD_SIZE INIT_FILE OUT_DIR`` joins a
gloo process group through ``file://INIT_FILE`` (no network port) and runs
job ``fit`` (the exactness fit and the stopped checkpointed select_structure),
or ``resume`` (the resumed one), writing ``OUT_DIR/<job>-<rank>.pt``.
The same functions run in one process, without a group, for the references.
"""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
import torch.distributed as tdist
from pyro.infer.autoguide import AutoDelta

import pyro_structsel as ps
from pyro_structsel.infer import distributed
from pyro_structsel.model import plate as plates
from pyro_structsel.util import ranks
from pyro_structsel.util.ranks import use_distributed
from pyro_structsel.infer.svi import FactorisedELBO, fit
from pyro_structsel.infer.traced import TracedELBO

NUM_ROWS = 7  # shards of 4 and 3 rows on two ranks: the unequal case
FIT_STEPS = 40
SELECT_STEPS = 200
CHECKPOINT_EVERY = 10
STOP_AT = 37  # the callback of step 37 raises: the last checkpoint is at step 30


class Stop(Exception):
    """Raised by the callback to stop a fit between two checkpoints (on every rank)."""


def linear_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_ROWS, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) \
        + 0.3 * torch.randn(NUM_ROWS, generator=g, dtype=torch.float64)
    return x, y


def linear_model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
    noise = pyro.param("noise", torch.tensor(1.0, dtype=x.dtype),
                       constraint=dist.constraints.positive)
    with ps.data_plate("data", len(x)) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, noise), obs=y[idx])


def exact_fit(sharded: bool) -> dict[str, Any]:
    """A fit whose loss has no noise (MAP by AutoDelta), full batch: 2 ranks = 1 process."""
    pyro.set_rng_seed(0)
    x, y = linear_data()
    guide = AutoDelta(linear_model)
    with pyro.get_param_store().scope() as state, use_distributed(sharded):
        losses = fit(linear_model, guide, (x, y), num_steps=FIT_STEPS,
                     optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
    return {"losses": losses, "params": _detached(state["params"])}


def teacher() -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A tanh teacher, y = tanh(1.5 x1 - x2) + 0.1 noise, 256 rows; relu or tanh student."""
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(256, 2, generator=g)
    y = torch.tanh(x @ torch.tensor([1.5, -1.0])) + 0.1 * torch.randn(256, generator=g)
    torch.manual_seed(0)  # the network's own initialisation seeds the default guide
    model = ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=1, activations=("relu", "tanh")),
                            likelihood="normal", noise_scale=0.1)
    return model, x, y


def select(checkpoint: str | None, stop_at: int = -1, **options: Any) -> dict[str, Any]:
    """select_structure on the tanh teacher; ``stop_at`` raises Stop from that step's callback."""
    model, x, y = teacher()
    steps = []

    def callback(step: int, loss: float) -> None:
        steps.append(step)
        if step == stop_at:
            raise Stop

    result = ps.select_structure(model, x, y, num_steps=SELECT_STEPS, lr=0.05, seed=3,
                                 progress=False, checkpoint=checkpoint,
                                 checkpoint_every=CHECKPOINT_EVERY, callback=callback,
                                 num_evidence_samples=50, **options)
    with torch.no_grad():
        predictions = result.derive()(x).squeeze(-1)
    return {"structure": result.structure, "predictions": predictions, "y": y,
            "probabilities": {k: v.clone() for k, v in result.probabilities.items()},
            "elbo": result.evidence["elbo"].value, "losses": result.losses, "steps": steps,
            "params": _detached(result.param_state["params"]),
            "store_untouched": len(pyro.get_param_store()) == 0}


def _detached(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in params.items()}


def traced_loss(sharded: bool) -> tuple[float, float]:
    """The traced step's −ELBO on 255 rows (shards of 128 and 127) from one generator state:
    ``sharded`` (averaged over the ranks) and on the full data in this process, at the same
    parameters and with the same draws.
    """
    model, x, y = teacher()
    x, y = x[:255], y[:255]
    with warnings.catch_warnings():  # one step only builds the guide: it cannot converge
        warnings.simplefilter("ignore", ps.ConvergenceWarning)
        result = ps.select_structure(model, x, y, num_steps=1, seed=0, progress=False,
                                     num_evidence_samples=5)
    losses = []
    for split in (sharded, False):
        with result.param_scope(), use_distributed(split):
            traced = TracedELBO(model, result.guide, (x, y),
                                elbo=FactorisedELBO(max_plate_nesting=1))
            torch.manual_seed(5)
            loss = traced.loss_and_grads(model, result.guide, x, y)
            losses.append(distributed.all_reduce_mean(loss))  # the mean over the ranks
    return losses[0], losses[1]


def minibatch_rows() -> dict[str, Any]:
    """This rank's minibatch of 16 of 255 rows and its weight, inside a data-parallel fit."""
    with use_distributed(True):
        shard, _ = plates.data_rows(255)
        rows, scale = plates.data_rows(255, 16)
    return {"shard": shard, "rows": rows, "scale": scale}


def failing_callback() -> str:
    """select_structure whose callback raises on rank 1 only, at step 3: how each rank ends."""
    model, x, y = teacher()

    def callback(step: int, loss: float) -> None:
        if step == 3 and tdist.get_rank() == 1:
            raise KeyError("boom on rank 1")

    try:
        ps.select_structure(model, x, y, num_steps=20, seed=3, progress=False,
                            callback=callback)
    except Exception as error:  # noqa: BLE001 -- the test reads what each rank raised
        return f"{type(error).__name__}: {error}"
    return "no error"


def basis_model(x: torch.Tensor, y: torch.Tensor) -> None:
    """A user-written model: one structural site over three bases of a linear score."""
    gamma = ps.structure("basis", ["sin", "tanh", "linear"])
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    score = (x * w).sum(-1)  # (N,), or (S, N) under a plate of draws: w is then (S, 1, 2)
    mean = gamma[..., 0] * torch.sin(score) + gamma[..., 1] * torch.tanh(score) \
        + gamma[..., 2] * score
    with ps.data_plate("data", len(x)):
        pyro.sample("y", dist.Normal(mean, 0.3), obs=y)


def basis_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 2, generator=g)
    return x, torch.tanh(x @ torch.tensor([1.5, -1.0])) + 0.3 * torch.randn(30, generator=g)


def compared(distributed: bool | None = None) -> dict[str, Any]:
    """compare_structures (3 structures) and cross_validation (3 folds), seeded: under a
    process group the structures and the folds are shared out over the ranks."""
    x, y = basis_data()
    with warnings.catch_warnings():  # 40 steps: rows flagged (k-hat), not what is tested here
        warnings.simplefilter("ignore", ps.FlaggedEstimateWarning)
        table = ps.compare_structures(basis_model, x, y, method="elbo", num_steps=40,
                                      num_samples=100, seed=0, progress=False,
                                      distributed=distributed)
    folds = ps.cross_validation(basis_model, x, y, folds=3, num_steps=40, num_samples=50,
                                seed=0, distributed=distributed)
    return {"labels": list(table.index), "log_evidence": table["log_evidence"].tolist(),
            "se": table["se"].tolist(), "probability": table["probability"].tolist(),
            "cv": [folds.value, folds.se, *folds.diagnostics["fold_values"],
                   *folds.diagnostics["final_losses"]]}


def main(job: str, rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results: dict[str, Any] = {}
        if job == "fit":
            results["exact"] = exact_fit(True)
            results["traced_loss"] = traced_loss(True)
            results["compared"] = compared()
            results["minibatch"] = minibatch_rows()
            results["failure"] = failing_callback()
            results["select"] = select(str(Path(out) / "full.ckpt"))
            try:
                select(str(Path(out) / "stopped.ckpt"), stop_at=STOP_AT)
            except Stop:
                results["stopped"] = True
        else:
            results["resumed"] = select(str(Path(out) / "stopped.ckpt"))
        torch.save(results, Path(out) / f"{job}-{rank}.pt")
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
