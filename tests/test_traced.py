"""The traced SVI step (infer/traced.py) against Pyro's own ELBO.

Exactness: from the same generator state the traced step makes Pyro's draws,
so its loss and every parameter gradient equal those of Pyro's
``TraceMeanField_ELBO`` / ``Trace_ELBO`` to float32 rounding (1e-5
relative); a whole fit with it equals the fit with Pyro's ELBO to rounding,
and a resumed fit equals an uninterrupted one bit for bit. A model whose
structure is not static is fitted with Pyro's ELBO, with one warning naming
the reason.
"""

from __future__ import annotations

import random

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import nn

import pyro_structsel as ps
from pyro_structsel.infer.checkpoint import load_checkpoint
from pyro_structsel.infer.optim import FlatAdam
from pyro_structsel.infer.guides import build_guide, default_guide, structure_guides
from pyro_structsel.infer.scope import model_sites_and_params
from pyro_structsel.infer import svi
from pyro_structsel.infer.svi import FactorisedELBO, TracingWarning, fit
from pyro_structsel.infer.traced import NotTraceableError, TracedELBO, should_compile

from common import assert_close

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")


def _digits(num: int = 120):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num, 8, generator=g)
    y = torch.randint(0, 3, (num,), generator=g)
    return x, y


def user_supernet(prior: str = "dirichlet", width: int = 6, batch: int | None = 32):
    """The issue's user-written supernet, small: one structural site, W1, b1, W2, b2."""

    def model(x, y=None):
        gamma = ps.structure("activation", ACTIVATIONS, prior=prior)
        w1 = pyro.sample("W1", dist.Normal(torch.zeros(x.shape[1], width), 1.0).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(torch.zeros(width), 1.0).to_event(1))
        w2 = pyro.sample("W2", dist.Normal(torch.zeros(width, 3), 1.0).to_event(2))
        b2 = pyro.sample("b2", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
            z = x[idx] @ w1 + b1
            h = (gamma[0] * torch.relu(z) + gamma[1] * torch.tanh(z)
                 + gamma[2] * torch.sigmoid(z) + gamma[3] * z)
            pyro.sample("y", dist.Categorical(logits=h @ w2 + b2),
                        obs=None if y is None else y[idx])

    return model


def user_guide(x, y=None):
    """A guide written by hand (Trace_ELBO): Dirichlet for Γ, Normal for the weights."""
    conc = pyro.param("conc", torch.full((4,), 2.0), constraint=constraints.positive)
    pyro.sample("activation", dist.Dirichlet(conc))
    for name, shape in (("W1", (8, 6)), ("b1", (6,)), ("W2", (6, 3)), ("b2", (3,))):
        loc = pyro.param(f"{name}_loc", 0.1 * torch.ones(shape))
        scale = pyro.param(f"{name}_scale", torch.full(shape, 0.1),
                           constraint=constraints.positive)
        pyro.sample(name, dist.Normal(loc, scale).to_event(len(shape)))


def _case(name: str):
    """(model, guide, args, kwargs, stock ELBO) of a named case; the guide is initialised."""
    x, y = _digits()
    kwargs: dict = {}
    if name in ("user", "user_concrete", "user_particles"):
        model = user_supernet("concrete" if name == "user_concrete" else "dirichlet")
        guide = default_guide(model, ["activation"],
                              temperature=0.7 if name == "user_concrete" else None)
        elbo = FactorisedELBO(max_plate_nesting=1,
                              num_particles=2 if name == "user_particles" else 1)
    elif name == "user_guide":
        model, guide, elbo = user_supernet(), user_guide, Trace_ELBO(max_plate_nesting=1)
    elif name == "autonormal":  # Pyro's AutoNormal: Delta sites and auxiliary Normals
        model = user_supernet()
        guide = AutoGuideList(model)
        guide.append(ps.AutoStructure(pyro.poutine.block(model, expose=["activation"])))
        guide.append(AutoNormal(pyro.poutine.block(model, hide=["activation"])))
        elbo = Trace_ELBO(max_plate_nesting=1)
    else:  # NetworkModel, Dirichlet or Concrete, vectorised particles
        prior = "concrete" if name == "network_concrete" else "dirichlet"
        model = ps.NetworkModel(ps.two_hidden_layer(8, 3, hidden=(5, 4)), prior=prior,
                                learn_prior_scale=prior == "concrete")
        kwargs = {"batch_size": 32}
        sites, _ = model_sites_and_params(model, (x, y), kwargs)
        guide = build_guide(model, None, sites, (x, y), kwargs, None)
        elbo = FactorisedELBO(max_plate_nesting=1, num_particles=3 if name == "network_particles"
                              else 1, vectorize_particles=True)
    with torch.no_grad():
        guide(x, y, **kwargs)
        model(x, y, **kwargs)
        for _, value in pyro.get_param_store().named_parameters():  # away from the init
            value.add_(0.2 * torch.randn(value.shape))
    return model, guide, (x, y), kwargs, elbo


CASES = ["user", "user_concrete", "user_particles", "user_guide", "autonormal", "network",
         "network_concrete", "network_particles"]


@pytest.mark.parametrize("name", CASES)
def test_traced_loss_and_gradients_equal_pyro_on_the_same_draws(name):
    model, guide, args, kwargs, elbo = _case(name)
    traced = TracedELBO(model, guide, args, kwargs, elbo=elbo,
                        temperatures=structure_guides(guide))
    store = pyro.get_param_store()
    for seed in (3, 4):
        pyro.set_rng_seed(seed)
        expected_loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
        expected = {n: p.grad.clone() for n, p in store.named_parameters() if p.grad is not None}
        for _, p in store.named_parameters():
            p.grad = None
        pyro.set_rng_seed(seed)
        loss = traced.loss_and_grads(model, guide, *args, **kwargs)
        actual = {n: p.grad.clone() for n, p in store.named_parameters() if p.grad is not None}
        for _, p in store.named_parameters():
            p.grad = None
        assert_close(loss, expected_loss, atol=1e-3, rtol=1e-5, msg="loss")
        assert set(actual) == set(expected) and set(expected) <= set(traced.parameters_read())
        assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg="grad")
    assert traced.num_nodes > 0 and traced.trace_seconds > 0


def test_temperature_is_an_input_not_a_constant():
    model, guide, args, kwargs, elbo = _case("user_concrete")
    part = structure_guides(guide)[0]
    traced = TracedELBO(model, guide, args, kwargs, elbo=elbo, temperatures=[part])
    for temperature in (0.7, 0.2):
        part.temperature = temperature
        pyro.set_rng_seed(0)
        expected = elbo.loss(model, guide, *args, **kwargs)
        pyro.set_rng_seed(0)
        assert_close(traced.loss_and_grads(model, guide, *args, **kwargs), expected,
                     atol=1e-3, rtol=1e-5)
        for _, p in pyro.get_param_store().named_parameters():
            p.grad = None


def _fit(model, x, y, *, fast, steps=25, checkpoint=None, temperature=None,
         prior="dirichlet"):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = default_guide(model, ["activation"], temperature=0.8 if prior == "concrete" else None)
    losses = fit(model, guide, (x, y), num_steps=steps, optim=FlatAdam({"lr": 0.05}),
                 progress=False, fast=fast, checkpoint=checkpoint, checkpoint_every=10,
                 temperature=temperature)
    state = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return losses, state


@pytest.mark.parametrize("prior", ["dirichlet", "concrete"])
def test_fit_with_the_traced_step_equals_the_fit_with_pyro(prior):
    x, y = _digits()
    model = user_supernet(prior)
    schedule = (lambda step: 0.8 * 0.95 ** step) if prior == "concrete" else None
    traced, traced_state = _fit(model, x, y, fast=True, temperature=schedule, prior=prior)
    stock, stock_state = _fit(model, x, y, fast=False, temperature=schedule, prior=prior)
    assert_close(traced, stock, atol=1e-3, rtol=1e-4)
    assert_close(traced_state, stock_state, atol=1e-4, rtol=1e-4)


def test_resumed_traced_fit_equals_uninterrupted_bit_for_bit(tmp_path):
    x, y = _digits()
    model = user_supernet()
    whole, whole_state = _fit(model, x, y, fast=True, steps=30, checkpoint=tmp_path / "a.pt")
    _fit(model, x, y, fast=True, steps=20, checkpoint=tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 20
    resumed, resumed_state = _fit(model, x, y, fast=True, steps=30, checkpoint=tmp_path / "b.pt")
    assert resumed == whole
    assert all(torch.equal(resumed_state[n], whole_state[n]) for n in whole_state)


def _branch_on_a_draw(x, y=None):
    gamma = ps.structure("activation", ("relu", "tanh"))
    w = pyro.sample("w", dist.Normal(torch.zeros(8, 3), 1.0).to_event(2))
    h = x @ w
    if gamma[0] > 0.5:  # the value of a draw decides the structure
        h = torch.relu(h)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=h), obs=y)


def _python_random(x, y=None):
    gamma = ps.structure("activation", ("relu", "tanh"))
    w = pyro.sample("w", dist.Normal(torch.zeros(8, 3), 1.0).to_event(2))
    keep = random.random() < 2.0  # always true, but the graph could not replay the draw
    h = gamma[0] * torch.relu(x @ w) + gamma[1] * (x @ w) if keep else x @ w
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=h), obs=y)


_calls = {"n": 0}


def _varying_plate(x, y=None):
    _calls["n"] += 1
    size = 20 + _calls["n"] % 2  # a site's shape alternates between calls
    gamma = ps.structure("activation", ("relu", "tanh"))
    w = pyro.sample("w", dist.Normal(torch.zeros(8, 3), 1.0).to_event(2))
    h = gamma[0] * torch.relu(x[:size] @ w) + gamma[1] * (x[:size] @ w)
    with pyro.plate("data", size):
        pyro.sample("y", dist.Categorical(logits=h), obs=y[:size])


@pytest.mark.parametrize("model, reason", [
    (_branch_on_a_draw, r"control flow reads the value .*test_traced.py:\d+ \(if gamma\[0\]"),
    (_python_random, "Python's random"),
    (_varying_plate, "site 'y' has shape"),
])
def test_a_model_whose_structure_changes_is_fitted_by_pyro_with_one_warning(model, reason):
    x, y = _digits(40)
    guide = default_guide(model, ["activation"])
    with pytest.warns(TracingWarning, match=reason) as caught:
        losses = fit(model, guide, (x, y), num_steps=3, optim=FlatAdam({"lr": 0.01}),
                     progress=False, fast=True)
    assert len(caught) == 1 and len(losses) == 3
    assert losses.step == "pyro" and caught[0].message.args[0].find(losses.reason) > 0
    assert "test_traced.py" in caught[0].filename  # points at the caller's line


def test_a_value_changed_during_the_fit_is_caught_by_a_spot_check():
    x, y = _digits(40)

    class Tempered:
        def __init__(self):
            self.beta = 1.0

        def __call__(self, x, y=None):
            gamma = ps.structure("activation", ("relu", "tanh"))
            w = pyro.sample("w", dist.Normal(torch.zeros(8, 3), 1.0).to_event(2))
            h = gamma[0] * torch.relu(x @ w) + gamma[1] * (x @ w)
            with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=self.beta):
                pyro.sample("y", dist.Categorical(logits=h), obs=y)

    model = Tempered()

    def callback(step, loss):
        if step == 4:
            model.beta = 0.5  # a traced step would keep 1.0

    guide = default_guide(model, ["activation"])
    with pytest.warns(TracingWarning, match=r"from step 9: at its step 10 the traced") as caught:
        losses = fit(model, guide, (x, y), num_steps=12, optim=FlatAdam({"lr": 0.01}),
                     progress=False, callback=callback, fast=True)
    assert len(caught) == 1 and len(losses) == 12 and losses.step == "pyro"


def test_a_score_function_guide_is_fitted_by_pyro():
    x, y = _digits(40)

    def model(x, y=None):
        k = pyro.sample("k", dist.Categorical(torch.ones(2) / 2))
        w = pyro.sample("w", dist.Normal(torch.zeros(8, 3), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=(x @ w) * (1.0 + k)), obs=y)

    def guide(x, y=None):
        pyro.sample("k", dist.Categorical(logits=pyro.param("k_logits", torch.zeros(2))))
        pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.zeros(8, 3)), 1.0).to_event(2))

    with pytest.raises(NotTraceableError, match="'k' is not reparameterised"):
        TracedELBO(model, guide, (x, y), elbo=Trace_ELBO(max_plate_nesting=1))


def test_data_checks_and_module_parameters_are_traced():
    x, y = _digits(40)
    linear = nn.Linear(8, 3)

    def check(y):
        if bool((y < 0).any()):  # reads the data's values: computed once, while tracing
            raise ValueError("y must be non-negative")

    def model(x, y=None):  # a checked input and an nn.Module registered with pyro.module
        check(y)
        net = pyro.module("net", linear)
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("z", dist.Normal(net(x).sum(-1), scale), obs=y.float())

    def guide(x, y=None):
        check(y)
        loc = pyro.param("loc", torch.tensor(0.1))
        pyro.sample("scale", dist.LogNormal(loc, 0.1))

    guide(x, y)
    elbo = Trace_ELBO(max_plate_nesting=1)
    traced = TracedELBO(model, guide, (x, y), elbo=elbo)
    pyro.set_rng_seed(1)
    expected = elbo.loss_and_grads(model, guide, x, y)
    store = pyro.get_param_store()
    grads = {n: p.grad.clone() for n, p in store.named_parameters()}
    for _, p in store.named_parameters():
        p.grad = None
    pyro.set_rng_seed(1)
    assert_close(traced.loss_and_grads(model, guide, x, y), expected, rtol=1e-5)
    assert {"net$$$weight", "net$$$bias", "loc"} <= set(traced.parameters_read())
    assert set(grads) >= {"net$$$weight", "net$$$bias", "loc"}
    assert_close({n: p.grad for n, p in store.named_parameters()}, grads, rtol=1e-5)


def test_fit_traces_when_enough_steps_remain_and_reports_how_it_ran(monkeypatch):
    x, y = _digits(40)
    model = user_supernet()
    monkeypatch.setattr(svi, "TRACE_MIN_STEPS", 6)
    for steps, step in ((5, "pyro"), (6, "traced")):
        pyro.clear_param_store()
        guide = default_guide(model, ["activation"])
        losses = fit(model, guide, (x, y), num_steps=steps, optim=FlatAdam({"lr": 0.01}),
                     progress=False)
        assert isinstance(losses, list) and len(losses) == steps
        assert losses.step == step and losses.reason is None and losses.compile_seconds is None
        assert (losses.trace_seconds is None) == (step == "pyro")


def test_compile_pays_only_when_enough_steps_remain(monkeypatch):
    assert not should_compile(300, 2e-3, 1000)
    assert should_compile(300, 2e-3, 100_000)
    assert not should_compile(300, 2e-3, 0)
    asked = []
    monkeypatch.setattr(svi, "should_compile", lambda *a: asked.append(a) or False)
    x, y = _digits(40)
    model = user_supernet()
    losses = fit(model, default_guide(model, ["activation"]), (x, y), num_steps=30,
                 optim=FlatAdam({"lr": 0.01}), progress=False, fast=True)
    # timed: steps 2-9 and 11-22 (steps 1 and 10 are spot checks); decided after step 22
    (num_nodes, seconds, remaining), = asked
    assert remaining == 30 - 22 and seconds > 0 and num_nodes > 10
    assert losses.step == "traced"


def test_compiled_step_makes_the_traced_steps_draws():
    # the one compiled test of the default suite (a small graph: ~20-45 s to compile)
    x, y = _digits(40)
    model = user_supernet(width=3, batch=8)
    traced, _ = _fit(model, x, y, fast=True, steps=6)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = default_guide(model, ["activation"])
    compiled = fit(model, guide, (x, y), num_steps=6, optim=FlatAdam({"lr": 0.05}),
                   progress=False, fast=True, compile=True)
    assert compiled.step == "compiled" and compiled.compile_seconds > 0
    assert_close(compiled, traced, atol=1e-3, rtol=1e-5)


@pytest.mark.slow  # two 300-step fits and their scoring: ~30 s on 2 shared cores
def test_select_structure_traces_its_fit_and_picks_the_teachers_structure_like_pyro(
        monkeypatch):
    from test_recovery import Teacher

    calls = {"n": 0}
    original = TracedELBO.loss_and_grads

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TracedELBO, "loss_and_grads", counted)
    teacher = Teacher()
    x, y = teacher.data(0, "relu")
    chosen = {}
    for fast in (True, False):
        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False):
            result = ps.select_structure(teacher.model("dirichlet"), x, y, num_steps=300,
                                         lr=0.05, seed=0, progress=False,
                                         num_evidence_samples=20, fast=fast)
        chosen[fast] = result.structure["activation"]
    assert chosen[True] == chosen[False] == "relu", chosen
    assert calls["n"] == 300  # the traced fit only
    assert len(list(pyro.get_param_store().keys())) == 0  # the user's store stays untouched
