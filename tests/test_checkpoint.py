"""Checkpoints: resume after a hard kill equals a run never killed; non-finite losses.

The kill test runs the fit in a subprocess (a script written to ``tmp_path``)
that sends itself SIGKILL from ``select_structure``'s callback between two
checkpoints, then reruns the same script, which resumes from the checkpoint,
and compares everything it ends with to an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch

import pyro_structsel as ps
from pyro_structsel.infer import optim as optimizers
from pyro_structsel.infer.checkpoint import CHECKPOINT_FORMAT

from common import assert_close

NUM_STEPS = 100
CHECKPOINT_EVERY = 10
KILL_AT = 37  # callback(step, loss) of step 37: the last checkpoint is at step 30

FIT_SCRIPT = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import torch

    import pyro_structsel as ps

    checkpoint, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(64, 2, generator=g)
    y = torch.tanh(x @ torch.tensor([1.5, -1.0])) + 0.1 * torch.randn(64, generator=g)
    torch.manual_seed(0)  # the network's own initialisation seeds the default guide
    model = ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=4), likelihood="normal",
                            noise_scale=0.1)
    steps = []


    def callback(step, loss):
        steps.append(step)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


    result = ps.select_structure(
        model, x, y, num_steps={num_steps}, lr=0.02, seed=3, progress=False,
        checkpoint=checkpoint or None, checkpoint_every={checkpoint_every},
        callback=callback, num_evidence_samples=20)
    params = {{name: value.detach().clone()
              for name, value in result.param_state["params"].items()}}
    torch.save({{
        "steps": steps,
        "losses": result.losses,
        "probabilities": {{k: v.clone() for k, v in result.probabilities.items()}},
        "structure": result.structure,
        "elbo": result.evidence["elbo"].value,
        "params": params,
    }}, out)
    """
).format(num_steps=NUM_STEPS, checkpoint_every=CHECKPOINT_EVERY)


def _run(script: Path, checkpoint: Path | None, out: Path, kill_at: int = -1
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(script), str(checkpoint or ""), str(out), str(kill_at)],
        capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    folder = tmp_path / "ckpt"
    checkpoint = folder / "fit.pt"

    killed = _run(script, checkpoint, tmp_path / "killed.pt", kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed.pt").exists()
    assert checkpoint.exists()
    assert [p.name for p in folder.iterdir()] == ["fit.pt"], "a temporary file was left behind"
    state = ps.load_checkpoint(checkpoint)
    last = (KILL_AT // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    assert state["step"] == last
    assert len(state["losses"]) == last
    assert all(math.isfinite(v) for v in state["losses"])

    resumed = _run(script, checkpoint, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    fresh = _run(script, None, tmp_path / "fresh.pt")
    assert fresh.returncode == 0, fresh.stderr

    resumed_out = torch.load(tmp_path / "resumed.pt", weights_only=False)
    fresh_out = torch.load(tmp_path / "fresh.pt", weights_only=False)
    # the resumed run did only the steps after the checkpoint
    assert resumed_out["steps"] == list(range(last, NUM_STEPS))
    assert fresh_out["steps"] == list(range(NUM_STEPS))
    assert len(resumed_out["losses"]) == NUM_STEPS
    assert resumed_out["structure"] == fresh_out["structure"]
    assert resumed_out["losses"] == fresh_out["losses"]  # bit for bit
    assert all(torch.equal(resumed_out["params"][k], v) for k, v in fresh_out["params"].items())
    assert_close(resumed_out["losses"], fresh_out["losses"], msg="losses")
    assert_close(resumed_out["probabilities"], fresh_out["probabilities"], msg="probabilities")
    assert_close(resumed_out["params"], fresh_out["params"], msg="params")
    assert_close(resumed_out["elbo"], fresh_out["elbo"], msg="elbo")
    # the finished checkpoint is at the last step
    assert ps.load_checkpoint(checkpoint)["step"] == NUM_STEPS


# ----------------------------------------------------------------------------- in process


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g)
    return x, torch.tanh(x.sum(-1)) + 0.1 * torch.randn(n, generator=g)


def _network_model() -> ps.NetworkModel:
    return ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=3), likelihood="normal",
                           noise_scale=0.1)


def test_completed_checkpoint_resumes_without_steps(tmp_path):
    x, y = _data()
    path = tmp_path / "done.pt"
    model = _network_model()
    first = ps.select_structure(model, x, y, num_steps=20, seed=0, progress=False,
                                checkpoint=path, checkpoint_every=10, num_evidence_samples=10)
    assert ps.load_checkpoint(path)["step"] == 20
    calls = []
    second = ps.select_structure(model, x, y, num_steps=20, seed=0, progress=False,
                                 checkpoint=path, checkpoint_every=10, num_evidence_samples=10,
                                 callback=lambda step, loss: calls.append(step))
    assert calls == []
    assert second.losses == first.losses
    assert_close(second.probabilities, first.probabilities)
    assert_close(second.param_state["params"], first.param_state["params"])


def test_checkpoint_past_num_steps_raises(tmp_path):
    x, y = _data()
    path = tmp_path / "long.pt"
    model = _network_model()
    ps.select_structure(model, x, y, num_steps=20, seed=0, progress=False, checkpoint=path,
                        checkpoint_every=10, num_evidence_samples=10)
    with pytest.raises(ValueError, match="past num_steps"):
        ps.select_structure(model, x, y, num_steps=10, seed=0, progress=False, checkpoint=path,
                            num_evidence_samples=10)


@pytest.mark.parametrize("content", ["pickle", "text", "empty"])
def test_foreign_checkpoint_raises_value_error(tmp_path, content):
    path = tmp_path / "foreign.pt"
    if content == "pickle":
        torch.save({"step": 3, "params": {}}, path)
    elif content == "text":
        path.write_text("not a checkpoint\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a pyro_structsel checkpoint"):
        ps.load_checkpoint(path)
    x, y = _data()
    with pytest.raises(ValueError, match="not a pyro_structsel checkpoint"):
        ps.select_structure(_network_model(), x, y, num_steps=5, progress=False,
                            checkpoint=path)


def test_missing_checkpoint_loads_as_none(tmp_path):
    assert ps.load_checkpoint(tmp_path / "nothing-here.pt") is None


def test_save_checkpoint_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ps.save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "step": 1})

    class NotData:
        pass

    # an object that is not data is refused before anything is written
    with pytest.raises(ValueError, match=r"Cannot store NotData at .*\['bad'\].*plain Python"):
        ps.save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "step": 2, "bad": NotData()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]

    def failing_save(obj, f):  # a write that dies half way (disk full, killed)
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ps.save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert ps.load_checkpoint(path)["step"] == 1


def test_checkpoint_per_restart(tmp_path):
    x, y = _data()
    path = tmp_path / "multi.pt"
    ps.select_structure(_network_model(), x, y, num_steps=10, seed=0, progress=False,
                        num_restarts=2, checkpoint=path, checkpoint_every=5,
                        num_evidence_samples=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.restart0.pt",
                                                          "multi.restart1.pt"]
    for restart in (0, 1):
        assert ps.load_checkpoint(tmp_path / f"multi.restart{restart}.pt")["step"] == 10


# ----------------------------------------------------------------------------- non-finite


class _InfScaleModel:
    """A user model whose likelihood scale turns infinite once ``broken`` is set."""

    def __init__(self) -> None:
        self.broken = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        gamma = ps.structure("basis", ["sin", "linear"])
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        bases = torch.stack([torch.sin(w * x), w * x], -1)  # broadcasts over particles
        mean = (gamma * bases).sum(-1)
        scale = torch.tensor(math.inf if self.broken else 0.5)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mean, scale), obs=y)


def test_non_finite_loss_names_step_and_site_and_keeps_checkpoint(tmp_path):
    x = torch.linspace(-2, 2, 40)
    y = torch.sin(1.3 * x)
    model = _InfScaleModel()
    path = tmp_path / "nan.pt"

    def callback(step, loss):
        if step == 24:
            model.broken = True  # step 25 sees an infinite likelihood scale

    with pytest.raises(ps.NonFiniteLossError, match=r"step 25\b") as info:
        # fast=False: a traced step would not see the attribute the callback changes
        ps.select_structure(model, x, y, num_steps=50, seed=0, progress=False,
                            checkpoint=path, checkpoint_every=10, callback=callback, fast=False)
    message = str(info.value)
    assert "'obs'" in message
    assert "nan.pt" in message
    assert isinstance(info.value, FloatingPointError)
    state = ps.load_checkpoint(path)
    assert state["step"] == 20
    assert len(state["losses"]) == 20
    assert all(math.isfinite(v) for v in state["losses"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]
    # every saved parameter is finite: the failing step applied no update
    assert all(bool(torch.isfinite(v).all()) for v in state["params"]["params"].values())

    # fixing the model and rerunning resumes from the last good checkpoint
    model.broken = False
    calls = []
    result = ps.select_structure(model, x, y, num_steps=50, seed=0, progress=False,
                                 checkpoint=path, checkpoint_every=10, num_evidence_samples=10,
                                 callback=lambda step, loss: calls.append(step))
    assert calls == list(range(20, 50))
    assert len(result.losses) == 50
    assert ps.load_checkpoint(path)["step"] == 50


def test_non_finite_loss_without_checkpoint(tmp_path):
    model = _InfScaleModel()
    model.broken = True
    x = torch.linspace(-2, 2, 40)
    with pytest.raises(ps.NonFiniteLossError, match=r"step 0\b.*'obs'"):
        ps.select_structure(model, x, torch.sin(x), num_steps=5, seed=0, progress=False)


@pytest.mark.parametrize("lr", [1e3, 1e30])
def test_huge_learning_rate_raises_non_finite_loss(tmp_path, lr):
    # a huge step overflows a parameter (exp of the Dirichlet concentration) or the loss
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(64, 2, generator=g)
    y = 10.0 * torch.randn(64, generator=g)
    model = ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=4), likelihood="normal",
                            noise_scale=1e-3)
    path = tmp_path / "lr.pt"
    with pytest.raises(ps.NonFiniteLossError, match=r"step \d+") as info:
        ps.select_structure(model, x, y, num_steps=300, lr=lr, seed=0, progress=False,
                            checkpoint=path, checkpoint_every=3)
    message = str(info.value)
    step = int(re.search(r"step (\d+)", message).group(1))
    assert "Lower the learning rate" in message and "lr.pt" in message
    assert "'obs'" in message or "AutoGuideList" in message  # the offending site or parameter
    state = ps.load_checkpoint(path)
    if step < 3:
        assert state is None
    else:
        assert state["step"] == step // 3 * 3
        assert all(bool(torch.isfinite(v).all()) for v in state["params"]["params"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == (["lr.pt"] if step >= 3 else [])


# ----------------------------------------------------------------------------- safe, fingerprinted


class _Payload:
    """Unpickling it creates a file: a harmless stand-in for a command run by a planted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickle_in_checkpoint_path_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "planted.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "params": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"Refusing to load .*planted\.pt.*io\.open.*runs no code"):
        ps.load_checkpoint(path)
    x, y = _data()
    with pytest.raises(ValueError, match="Refusing to load"):
        ps.select_structure(_network_model(), x, y, num_steps=5, progress=False,
                            checkpoint=path)
    assert not marker.exists()


def test_checkpoint_is_plain_data(tmp_path):
    # parameters with constraints beyond the default ones: stored by name, rebuilt on load
    def model(x, y):
        gamma = ps.structure("basis", ["sin", "linear"])
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        noise = pyro.param("noise", torch.tensor(0.5),
                           constraint=dist.constraints.interval(0.01, 2.0))
        mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mean, noise), obs=y)

    x = torch.linspace(-2, 2, 30)
    path = tmp_path / "plain.pt"
    ps.select_structure(model, x, torch.sin(x), num_steps=3, progress=False, checkpoint=path,
                        num_evidence_samples=5)
    raw = torch.load(path, weights_only=True)  # no object but tensors and plain data
    assert raw["params"]["constraints"]["noise"]["__constraint__"] == "interval"
    state = ps.load_checkpoint(path)
    noise = state["params"]["constraints"]["noise"]
    assert isinstance(noise, type(dist.constraints.interval(0.0, 1.0)))
    assert (noise.lower_bound, noise.upper_bound) == (0.01, 2.0)
    assert state["params"]["constraints"]["AutoGuideList.0.concentrations.basis"] is \
        dist.constraints.positive
    assert isinstance(state["rng"]["numpy"][1], np.ndarray)
    pyro.util.set_rng_state(state["rng"])  # the RNG state round-trips


def _labelled_model(labels):
    def model(x, y):
        gamma = ps.structure("basis", labels)
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        bases = {"sin": torch.sin(w * x), "linear": w * x, "cube": (w * x) ** 3}
        mean = (gamma * torch.stack([bases[label] for label in labels], -1)).sum(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)
    return model


def _fit(model, x, y, path, **options):
    options = {"num_steps": 10, "progress": False, "num_evidence_samples": 5, **options}
    return ps.select_structure(model, x, y, checkpoint=path, checkpoint_every=5, **options)


@pytest.mark.parametrize("change, message", [
    ("other sites", r"site 'basis' .*has options \[\"sin\", \"linear\"\] in the checkpoint and "
                    r"\[\"sin\", \"linear\", \"cube\"\]"),
    ("options reordered", r"site 'basis' has options \[\"sin\", \"linear\"\] in the checkpoint "
                          r"and \[\"linear\", \"sin\"\] in this run"),
    ("other data", r"model argument 'y' has the same shape \[30\] but different values"),
    ("other rows", r"model argument 'x' has shape \[30\] in the checkpoint and \[20\]"),
    ("new lr, fast", r"the optimiser's lr is 0.01 in the checkpoint and 0.1 in this run.*"
                     r"resume='relaxed'"),
    ("new lr, stock", r"the optimiser's lr is 0.01 in the checkpoint and 0.1 in this run"),
    ("other optimiser", r"the optimiser is Adam in the checkpoint and ClippedAdam in this run"),
])
def test_checkpoint_of_another_run_is_refused(tmp_path, change, message):
    x = torch.linspace(-2, 2, 30)
    y = torch.sin(1.3 * x)
    path = tmp_path / "run.pt"
    first = _labelled_model(["sin", "linear"])
    _fit(first, x, y, path)
    before = path.read_bytes()
    second, options = first, {"num_steps": 20}
    if change == "other sites":
        second = _labelled_model(["sin", "linear", "cube"])
    elif change == "options reordered":
        second = _labelled_model(["linear", "sin"])
    elif change == "other data":
        y = -y
    elif change == "other rows":
        x, y = x[:20], y[:20]
    elif change.startswith("new lr"):
        options.update(lr=0.1, fast=change.endswith("fast"))
    else:
        options.update(optim=pyro.optim.ClippedAdam({"lr": 0.01}))
    with pytest.raises(ValueError, match=r"(?s)written by a different run.*" + message):
        _fit(second, x, y, path, **options)
    assert path.read_bytes() == before  # the checkpoint is left as it was


@pytest.mark.parametrize("fast", [True, False])
def test_relaxed_resume_applies_the_new_lr_on_every_path(tmp_path, fast):
    x, y = _data()
    path = tmp_path / "lr.pt"
    model = _network_model()
    _fit(model, x, y, path, lr=0.01, seed=0)
    optim = (ps.infer.FlatAdam if fast else pyro.optim.Adam)({"lr": 0.1})
    with pytest.warns(ps.infer.CheckpointWarning, match="the optimiser's lr is 0.01 in the "
                                                        "checkpoint and 0.1 in this run"):
        result = _fit(model, x, y, path, num_steps=20, optim=optim, fast=fast, seed=0,
                      resume="relaxed")
    assert len(result.losses) == 20
    groups = [group for opt in optimizers.torch_optimizers(optim) for group in opt.param_groups]
    assert groups and all(group["lr"] == 0.1 for group in groups)
    # the model itself must still match
    with pytest.raises(ValueError, match="Remove the file or pass another checkpoint path"):
        _fit(_labelled_model(["sin", "linear"]), x[:, 0], y, path, num_steps=30,
             resume="relaxed")


def test_bad_checkpoint_paths_are_refused_before_the_fit(tmp_path):
    x, y = _data()
    (tmp_path / "a-file").write_text("x")
    for path, message in [(123, "Expected checkpoint to be a file path"),
                          (tmp_path, "is a folder"),
                          (tmp_path / "a-file" / "c.pt", "is a file, not a folder")]:
        with pytest.raises((TypeError, ValueError), match=message):
            ps.select_structure(_network_model(), x, y, num_steps=5, progress=False,
                                checkpoint=path, callback=lambda *a: pytest.fail("fitted"))
    with pytest.raises(ValueError, match="Unknown resume 'loose'"):
        ps.select_structure(_network_model(), x, y, num_steps=5, progress=False,
                            resume="loose")
