"""The fast ELBO (fastpath.NetworkELBO) against Pyro's stock TraceMeanField_ELBO, and FlatAdam.

Exactness: with the same draw (the guide's sample replayed through the stock
ELBO, the same standard-normal noise and minibatch fed to the fast one) the
two losses and all parameter gradients agree to float32 rounding (1e-5
relative). Local reparameterisation changes the noise, not the expectation:
its mean loss over many draws agrees with the weight-noise estimator within
4 standard errors.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuideList, AutoNormal

import pyro_structsel as ps
from pyro_structsel.infer.fastpath import FlatAdam, NetworkELBO, fast_path_support, network_elbo
from pyro_structsel.infer.guides import build_guide
from pyro_structsel.infer.scope import model_sites_and_params
from pyro_structsel.infer.svi import FactorisedELBO, fit

from common import assert_close
from test_recovery import Teacher


def _setup(prior: str = "dirichlet", likelihood: str = "categorical", learn: bool = False,
           num: int = 40, batch: int | None = 16):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(num, 5, generator=g)
    if likelihood == "categorical":
        y = torch.randint(0, 3, (num,), generator=g)
        model = ps.NetworkModel(ps.two_hidden_layer(5, 3, hidden=(6, 7)), prior=prior,
                                learn_prior_scale=learn)
    else:
        y = torch.randn(num, generator=g)
        model = ps.NetworkModel(ps.one_hidden_layer(5, 1, hidden=6), likelihood="normal",
                                noise_scale=0.5, prior=prior, learn_prior_scale=learn)
    kwargs = {} if batch is None else {"batch_size": batch}
    sites, model_params = model_sites_and_params(model, (x, y), kwargs)
    return model, x, y, kwargs, sites, model_params


def _guide(model, x, y, kwargs, sites):
    guide = build_guide(model, None, sites, (x, y), kwargs, None)
    guide(x, y, **kwargs)
    model(x, y, **kwargs)  # the model's own parameters (learnable prior scales)
    with torch.no_grad():  # move away from the initialisation: unequal scales, concentrations
        for name, value in pyro.get_param_store().named_parameters():
            value.add_(0.3 * torch.randn(value.shape))
    return guide


def _grads(params):
    out = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return out


@pytest.mark.parametrize("prior, likelihood, learn", [
    ("dirichlet", "categorical", False), ("concrete", "normal", True),
    ("concrete", "categorical", False)])
def test_fast_loss_and_gradients_equal_stock_on_the_same_draw(prior, likelihood, learn):
    model, x, y, kwargs, sites, _ = _setup(prior, likelihood, learn)
    with pyro.get_param_store().scope():
        guide = _guide(model, x, y, kwargs, sites)
        store = pyro.get_param_store()
        params = dict(store.named_parameters())
        fast = NetworkELBO(model, guide)
        for seed in range(3):
            pyro.set_rng_seed(seed)
            guide_trace = poutine.trace(guide).get_trace(x, y, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                x, y, **kwargs)
            stock = FactorisedELBO().differentiable_loss(
                poutine.replay(model, trace=model_trace), poutine.replay(guide, trace=guide_trace),
                x, y, **kwargs)
            stock.backward(retain_graph=True)
            expected = _grads(params)
            idx = model_trace.nodes["data"]["value"]
            assert idx.shape == (16,)
            net = model.net
            noise = {}
            with torch.no_grad():
                for name in net.shapes:
                    site = net.site_name(name)
                    loc, scale = guide[1]._get_loc_and_scale(site)
                    noise[name] = (guide_trace.nodes[site]["value"] - loc) / scale
            gammas = {name: guide_trace.nodes[name]["value"] for name in sites}
            loss = fast.loss_given(x, y, idx, noise, gammas)
            loss.backward()
            actual = _grads(params)
            assert_close(loss, stock, atol=1e-4, rtol=1e-5, msg="loss")
            assert set(actual) == set(expected)
            assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg="grad")
            if learn:
                assert "net.prior_scale" in actual


def test_fast_path_with_particles_vectorised_equals_looped_and_mean_of_singles():
    model, x, y, kwargs, sites, _ = _setup()
    with pyro.get_param_store().scope():
        guide = _guide(model, x, y, kwargs, sites)
        vec = NetworkELBO(model, guide, num_particles=3, vectorize_particles=True)
        loop = NetworkELBO(model, guide, num_particles=3, vectorize_particles=False)
        single = NetworkELBO(model, guide)
        noise = vec.draw_noise()
        assert noise.shape == (3, vec._num_weights)
        gammas = {name: torch.distributions.Dirichlet(torch.ones(3, 4)).sample()
                  for name in sites}
        idx = torch.arange(16)
        a = vec.loss_given(x, y, idx, noise, gammas)
        b = loop.loss_given(x, y, idx, noise, gammas)
        c = torch.stack([single.loss_given(x, y, idx, noise[i], {k: v[i] for k, v in
                                                                 gammas.items()})
                         for i in range(3)]).mean()
        assert_close(a, b, atol=1e-4, rtol=1e-5)
        assert_close(a, c, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("prior", ["dirichlet", "concrete"])
def test_fast_loss_mean_matches_stock_and_local_reparam_within_standard_errors(prior):
    model, x, y, kwargs, sites, _ = _setup(prior, num=40, batch=None)
    draws = 400
    with pyro.get_param_store().scope(), torch.no_grad():
        guide = _guide(model, x, y, kwargs, sites)
        stock = FactorisedELBO(num_particles=draws, vectorize_particles=True,
                               max_plate_nesting=1)
        fast = NetworkELBO(model, guide, num_particles=draws)
        local = NetworkELBO(model, guide, num_particles=draws, local_reparam=True)

        def per_draw(elbo):  # one loss per particle: the mean and its standard error
            losses = torch.stack([elbo.differentiable_loss(model, guide, x, y)
                                  for _ in range(5)])
            return losses.mean(), losses.std() / 5 ** 0.5

        stock_losses = torch.tensor([stock.loss(model, guide, x, y) for _ in range(5)])
        means = {"stock": (stock_losses.mean(), stock_losses.std() / 5 ** 0.5),
                 "fast": per_draw(fast), "local": per_draw(local)}
    for name in ("fast", "local"):
        diff = abs(float(means[name][0] - means["stock"][0]))
        se = float((means[name][1] ** 2 + means["stock"][1] ** 2) ** 0.5)
        assert diff < 4 * se + 1e-3 * abs(float(means["stock"][0])), (name, means)


@pytest.mark.slow  # two 300-step fits and their scoring: ~30 s on 2 shared cores
def test_fit_uses_the_fast_path_and_picks_the_teachers_structure_like_stock(monkeypatch):
    calls = {"n": 0}
    original = NetworkELBO.loss_and_grads

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NetworkELBO, "loss_and_grads", counted)
    teacher = Teacher()
    for seed, label in ((0, "relu"),):
        x, y = teacher.data(seed, label)
        chosen = {}
        for fast in (True, False):
            pyro.set_rng_seed(seed)
            model = teacher.model("dirichlet")
            with pyro.validation_enabled(False):
                result = ps.select_structure(model, x, y, num_steps=300, lr=0.05, seed=seed,
                                             progress=False, num_evidence_samples=20,
                                             fast=fast)
            chosen[fast] = result.structure["activation"]
        assert chosen[True] == chosen[False] == label, chosen
    assert calls["n"] == 300  # the fast fit only
    assert len(list(pyro.get_param_store().keys())) == 0  # the user's store stays untouched


def test_checkpoint_resume_with_fast_path_equals_uninterrupted(tmp_path):
    model, x, y, kwargs, _, _ = _setup(batch=16)
    settings = dict(lr=0.02, seed=3, progress=False, num_evidence_samples=10,
                    checkpoint_every=10, batch_size=16)
    whole = ps.select_structure(model, x, y, num_steps=40, **settings,
                                checkpoint=tmp_path / "whole.pt")
    ps.select_structure(model, x, y, num_steps=20, **settings, checkpoint=tmp_path / "part.pt")
    state = ps.load_checkpoint(tmp_path / "part.pt")
    assert state["step"] == 20 and state["optim"]  # FlatAdam state in Pyro's format
    name = next(iter(state["optim"]))
    assert set(state["optim"][name]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed = ps.select_structure(model, x, y, num_steps=40, **settings,
                                  checkpoint=tmp_path / "part.pt")
    assert_close(resumed.losses, whole.losses, atol=1e-6, rtol=1e-6)
    assert_close(resumed.param_state["params"], whole.param_state["params"], atol=1e-6)
    assert resumed.structure == whole.structure
    assert len(list(pyro.get_param_store().keys())) == 0


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


def test_falls_back_to_stock_elbo_where_not_covered(monkeypatch):
    model, x, y, kwargs, sites, _ = _setup()
    with pyro.get_param_store().scope():
        default = _guide(model, x, y, kwargs, sites)
        assert fast_path_support(model, default) is None
        assert isinstance(network_elbo(model, default), NetworkELBO)
        assert "not a NetworkModel" in fast_path_support(lambda *a, **k: None, default)
        plain = AutoGuideList(model)
        plain.append(AutoNormal(poutine.block(model, hide=list(sites))))
        assert "parts" in fast_path_support(model, plain)
        assert network_elbo(model, plain) is None
        with pytest.raises(ValueError, match="does not cover"):
            NetworkELBO(model, plain)
        with poutine.scale(scale=2.0):
            assert "handlers" in fast_path_support(model, default)

        class Subclass(ps.NetworkModel):
            pass

        assert "not a NetworkModel" in fast_path_support(
            Subclass(ps.two_hidden_layer(5, 3)), default)
        for prior, learned in (("dirichlet", "learn_concentration"),
                               ("concrete", "learn_temperature")):
            # a learnable structural prior is read by the stock ELBO only: fall back
            hyper = ps.NetworkModel(ps.two_hidden_layer(5, 3, hidden=(6, 7)), prior=prior,
                                    **{learned: True})
            with pyro.get_param_store().scope():
                hyper_sites, _ = model_sites_and_params(hyper, (x, y), kwargs)
                hyper_guide = _guide(hyper, x, y, kwargs, hyper_sites)
                assert "learnable" in fast_path_support(hyper, hyper_guide), learned
        with pytest.raises(ValueError, match="num_particles"):
            NetworkELBO(model, default, num_particles=0)
        with pytest.raises(ValueError, match="another model"):
            NetworkELBO(model, default).loss(Subclass(ps.two_hidden_layer(5, 3)), default, x, y)

    calls = {"n": 0}
    original = NetworkELBO.loss_and_grads
    monkeypatch.setattr(NetworkELBO, "loss_and_grads",
                        lambda self, *a, **k: (calls.__setitem__("n", calls["n"] + 1),
                                               original(self, *a, **k))[1])
    for options in ({"guide": AutoNormal}, {"fast": False}):
        result = ps.select_structure(model, x, y, num_steps=5, progress=False,
                                     num_evidence_samples=5, seed=0, **options, **kwargs)
        assert len(result.losses) == 5
    assert calls["n"] == 0
    fixed = ps.fix_structure(model, {"layer1": "relu"})  # a wrapped model: stock path
    with pyro.get_param_store().scope():
        guide = build_guide(fixed, None, {"layer2": sites["layer2"]}, (x, y), kwargs, None)
        losses = fit(fixed, guide, (x, y), kwargs, num_steps=3, optim=FlatAdam({"lr": 0.01}),
                     progress=False)
    assert len(losses) == 3 and calls["n"] == 0
    ps.select_structure(model, x, y, num_steps=2, progress=False, num_evidence_samples=5,
                        **kwargs)
    assert calls["n"] == 2


def test_local_reparam_needs_linear_weights():
    model = ps.NetworkModel(ps.conv_family(1, 3, image_size=8, channels=(2,),
                                           names=("conv1",)))
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 3, (6,))
    sites, _ = model_sites_and_params(model, (x, y), {})
    with pyro.get_param_store().scope():
        guide = _guide(model, x, y, {}, sites)
        assert isinstance(NetworkELBO(model, guide).loss(model, guide, x, y), float)
        with pytest.raises(ValueError, match="local_reparam=False"):
            NetworkELBO(model, guide, local_reparam=True)
