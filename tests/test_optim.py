"""FlatAdam (infer/optim.py): Pyro's Adam in one fused step, and Pyro's checkpoint format.

Tolerance: the same updates as ``pyro.optim.Adam`` to float32 rounding (1e-5
relative over 10 steps), in both directions through a checkpoint.
"""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_structsel as ps
from pyro_structsel.infer.optim import FlatAdam

from common import assert_close


def _setup(num: int = 40, batch: int = 16):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(num, 5, generator=g)
    y = torch.randint(0, 3, (num,), generator=g)
    model = ps.NetworkModel(ps.two_hidden_layer(5, 3, hidden=(6, 7)))
    return model, x, y


def test_flat_adam_equals_pyro_adam_and_resumes_from_its_checkpoint():
    def run(optim, steps, state=None, start=0):
        pyro.clear_param_store()
        torch.manual_seed(0)
        a = pyro.param("a", torch.randn(3, 4))
        b = pyro.param("b", torch.rand(5) + 0.5, constraint=pyro.distributions.constraints.positive)
        if state is not None:
            pyro.get_param_store().set_state(state[0])
            optim.set_state(state[1])
        store = pyro.get_param_store()
        for step in range(start, start + steps):
            a, b = pyro.param("a"), pyro.param("b")
            ((a.sin() * (step + 1)).sum() + (b.log() ** 2).sum()).backward()
            params = [store._params["a"], store._params["b"]]
            optim(params)
            for p in params:
                p.grad = None
        return {k: v.detach().clone() for k, v in store.named_parameters()}, \
            (store.get_state(), optim.get_state())

    reference, (_, pyro_state) = run(pyro.optim.Adam({"lr": 0.05}), 10)
    flat, _ = run(FlatAdam({"lr": 0.05}), 10)
    assert_close(flat, reference, atol=1e-6, rtol=1e-5)
    _, state5 = run(pyro.optim.Adam({"lr": 0.05}), 5)
    # Pyro's checkpoint -> FlatAdam
    resumed, _ = run(FlatAdam({"lr": 0.05}), 5, state=state5, start=5)
    assert_close(resumed, reference, atol=1e-6, rtol=1e-5)
    _, flat5 = run(FlatAdam({"lr": 0.05}), 5)
    back, _ = run(pyro.optim.Adam({"lr": 0.05}), 5, state=flat5, start=5)  # and back
    assert_close(back, reference, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="optim_args"):
        FlatAdam(lambda module, name: {"lr": 0.1})


def test_network_model_fit_resumes_its_flat_adam_checkpoint_exactly(tmp_path):
    model, x, y = _setup()
    settings = dict(lr=0.02, seed=3, progress=False, num_evidence_samples=10,
                    checkpoint_every=10, batch_size=16)
    whole = ps.select_structure(model, x, y, num_steps=40, **settings,
                                checkpoint=tmp_path / "whole.pt")
    ps.select_structure(model, x, y, num_steps=20, **settings, checkpoint=tmp_path / "part.pt")
    state = ps.load_checkpoint(tmp_path / "part.pt")
    assert state["step"] == 20 and state["optim"]  # FlatAdam state in Pyro's format
    # Pyro's SVI steps a set of tensors, so the order of names varies from run to run;
    # a module parameter shadowed by a sample site has no gradient, so no Adam state.
    stepped = {name: s["state"] for name, s in state["optim"].items() if "$$$" not in name}
    assert stepped and all(set(s[0]) == {"step", "exp_avg", "exp_avg_sq"}
                           for s in stepped.values())
    resumed = ps.select_structure(model, x, y, num_steps=40, **settings,
                                  checkpoint=tmp_path / "part.pt")
    assert_close(resumed.losses, whole.losses, atol=1e-6, rtol=1e-6)
    assert_close(resumed.param_state["params"], whole.param_state["params"], atol=1e-6)
    assert resumed.structure == whole.structure
    assert len(list(pyro.get_param_store().keys())) == 0
