"""Bayesian weights: batched_call under particle dimensions, BayesianModule, NetworkModel."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_value
from torch import nn
from torch.func import functional_call

import pyro_structsel as ps
from pyro_structsel.util.sampling import draw
from pyro_structsel.model.bayesian import GROUP_KEY

from common import assert_close


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 2))


def _random_weights(net, batch):
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(batch + p.shape, generator=generator)
            for name, p in net.named_parameters()}


def _loop(net, weights, batch, x):
    out = torch.empty(batch + (x.shape[0], 2))
    for index in torch.cartesian_prod(*[torch.arange(n) for n in batch]).reshape(-1, len(batch)):
        index = tuple(int(i) for i in index)
        params = {name: value[index + (0,) * (value.dim() - len(index) - p_dim)]
                  for (name, value), p_dim in zip(weights.items(), _dims(net, weights))}
        out[index] = functional_call(net, params, (x,))
    return out


def _dims(net, weights):
    shapes = dict(net.named_parameters())
    return [shapes[name].dim() for name in weights]


@pytest.mark.parametrize("make_net, x_shape", [(_mlp, (5, 3)), (_convnet, (5, 1, 4, 4))])
@pytest.mark.parametrize("batch, trailing", [((6,), (1,)), ((2, 3), (1,)), ((4,), ())])
def test_batched_call_equals_loop_over_particles(make_net, x_shape, batch, trailing):
    net = make_net()
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2))
    weights = _random_weights(net, batch + trailing)  # e.g. (P, 1) + parameter shape
    out = ps.batched_call(net, weights, x)
    assert out.shape == batch + (5, 2)
    weights_no_trailing = {n: w.reshape(batch + w.shape[len(batch) + len(trailing):])
                           for n, w in weights.items()}
    assert_close(out, _loop(net, weights_no_trailing, batch, x), atol=1e-5)


def test_batched_call_without_batch_is_functional_call():
    net = _mlp()
    x = torch.randn(5, 3)
    weights = _random_weights(net, ())
    assert_close(ps.batched_call(net, weights, x), functional_call(net, weights, (x,)))
    # a (1, 1) batch is dropped too
    ones = {n: w.expand((1, 1) + w.shape) for n, w in weights.items()}
    assert_close(ps.batched_call(net, ones, x), functional_call(net, weights, (x,)))


def test_batched_call_broadcasts_partial_and_buffer_replacements():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), ps.MixedOp({"tanh": nn.Tanh(), "relu": nn.ReLU()}),
                        nn.Linear(4, 2))
    x = torch.randn(5, 3)
    gamma = torch.tensor([[[0.2, 0.8]], [[0.9, 0.1]], [[0.5, 0.5]]])  # (P=3, 1, K)
    weight = torch.randn(3, 1, 4, 3)  # only the first layer's weight varies over particles
    out = ps.batched_call(net, {"1.gamma": gamma, "0.weight": weight}, x)
    assert out.shape == (3, 5, 2)
    for p in range(3):
        h = x @ weight[p, 0].T + net[0].bias
        h = gamma[p, 0, 0] * torch.tanh(h) + gamma[p, 0, 1] * torch.relu(h)
        assert_close(out[p], net[2](h), atol=1e-5)


def test_batched_call_bad_names_and_shapes():
    net = _mlp()
    with pytest.raises(ValueError, match=r"no parameter or buffer '0.kernel'"):
        ps.batched_call(net, {"0.kernel": torch.zeros(4, 3)}, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"'0.weight'.*does not end in the parameter's shape"):
        ps.batched_call(net, {"0.weight": torch.zeros(2, 3, 4)}, torch.zeros(1, 3))


# --------------------------------------------------------------------------- BayesianModule


def _mixed_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), ps.MixedOp({"tanh": nn.Tanh(), "relu": nn.ReLU()},
                                                     name="act"), nn.Linear(4, 1))


def test_bayesian_module_sites_priors_and_output():
    bayes = ps.BayesianModule(_mixed_net(), prior_scale={"0": 0.5, "2": 2.0}, prefix="net.",
                              concentration=0.8)
    x = torch.randn(5, 3)
    trace = poutine.trace(bayes).get_trace(x)
    trace.compute_log_prob()
    names = [n for n in trace.stochastic_nodes]
    assert names == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "act"]
    assert bayes.groups == ["0", "2"]
    assert bayes.prior_scales() == {"0": 0.5, "2": 2.0}
    for name, group, scale in [("net.0.weight", "0", 0.5), ("net.2.bias", "2", 2.0)]:
        site = trace.nodes[name]
        assert site["infer"][GROUP_KEY] == group
        assert_close(site["log_prob_sum"], dist.Normal(0.0, scale).log_prob(site["value"]).sum())
    act = trace.nodes["act"]
    assert act["infer"]["structsel_options"] == ("tanh", "relu")
    assert_close(act["fn"].concentration, [0.8, 0.8])
    # the output is the network evaluated at the sampled weights and gamma, by hand
    v = {n: trace.nodes[n]["value"] for n in names}
    h = x @ v["net.0.weight"].T + v["net.0.bias"]
    h = v["act"][0] * torch.tanh(h) + v["act"][1] * torch.relu(h)
    assert_close(trace.nodes["_RETURN"]["value"], h @ v["net.2.weight"].T + v["net.2.bias"],
                 atol=1e-5)
    initial = bayes.initial_values()
    assert set(initial) == set(names[:-1])
    assert_close(initial["net.0.weight"], bayes.network[0].weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prior_scale=0.0), r"prior_scale > 0"),
    (dict(prior_scale={"0": -1.0}), r"prior_scale > 0"),
    (dict(prior_scale={"9": 1.0}), r"prior_scale names unknown layers \['9'\]"),
    (dict(concentration=0.0), r"concentration > 0 for structural site 'act'"),
    (dict(prior="concrete", temperature=-1.0), r"temperature > 0 for structural site 'act'"),
    (dict(prior="beta"), r"Unknown prior 'beta'"),
])
def test_bayesian_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ps.BayesianModule(_mixed_net(), **kwargs)


def test_bayesian_module_needs_parameters():
    with pytest.raises(ValueError, match=r"no parameters"):
        ps.BayesianModule(nn.Sequential(nn.Tanh()))
    with pytest.raises(ValueError, match=r"Expected module to be a torch.nn.Module"):
        ps.BayesianModule(lambda x: x)


# --------------------------------------------------------------------------- vectorised particles


def _problem(n=12):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator)
    return x, y


def _network_model(**kwargs):
    torch.manual_seed(0)
    out = 1 if kwargs.get("likelihood") == "normal" else 2
    return ps.NetworkModel(ps.one_hidden_layer(3, out, hidden=4, activations=("tanh", "relu")),
                           **kwargs)


def test_vectorised_trace_elbo_is_finite():
    x, y = _problem()
    model = _network_model()
    guide = ps.default_guide(model, ["activation"], init_values=model.initial_values())
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss(model, guide, x, y)
    assert math.isfinite(loss)
    # and gradients flow through the vmapped network
    loss = elbo.differentiable_loss(model, guide, x, y)
    loss.backward()
    grads = [p.grad for p in guide.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("likelihood", ["categorical", "normal"])
def test_vectorised_loss_equals_single_particle_on_identical_draws(likelihood):
    # A point-mass guide makes every particle identical: the vectorised loss over 8 particles
    # must equal the single-particle loss, and both -log p(D, w) computed by hand.
    x, y = _problem()
    if likelihood == "normal":
        y = y.float()
    model = _network_model(likelihood=likelihood, prior_scale=0.7, noise_scale=0.5)
    fixed = ps.fix_structure(model, {"activation": "relu"})
    init = model.initial_values()
    guide = AutoDelta(fixed, init_loc_fn=init_to_value(values=init))
    vectorised = Trace_ELBO(num_particles=8, vectorize_particles=True,
                            max_plate_nesting=1).loss(fixed, guide, x, y)
    single = Trace_ELBO().loss(fixed, guide, x, y)
    net = model.derive({"activation": "relu"}, init)
    with torch.no_grad():
        out = net(x)
    log_lik = (dist.Categorical(logits=out).log_prob(y).sum() if likelihood == "categorical"
               else dist.Normal(out.squeeze(-1), 0.5).log_prob(y).sum())
    log_prior = sum(dist.Normal(0.0, 0.7).log_prob(w).sum() for w in init.values())
    expected = -float(log_lik + log_prior)
    assert_close(single, expected, rtol=1e-5, atol=1e-4)
    assert_close(vectorised, expected, rtol=1e-5, atol=1e-4)


def test_vectorised_log_likelihood_equals_loop_for_given_weights():
    x, y = _problem()
    model = _network_model()
    num = 5
    generator = torch.Generator().manual_seed(4)
    values = {name: init + 0.3 * torch.randn((num, 1) + init.shape, generator=generator)
              for name, init in model.initial_values().items()}
    values["activation"] = dist.Dirichlet(torch.ones(2)).sample((num, 1))

    def plated(x, y):
        with pyro.plate("particles", num, dim=-2):
            return model(x, y)

    trace = poutine.trace(poutine.condition(plated, values)).get_trace(x, y)
    trace.compute_log_prob()
    vectorised = trace.nodes["obs"]["log_prob"]
    assert vectorised.shape == (num, len(x))
    for p in range(num):
        one = {name: value[p, 0] for name, value in values.items()}
        single = poutine.trace(poutine.condition(model, one)).get_trace(x, y)
        single.compute_log_prob()
        assert_close(vectorised[p], single.nodes["obs"]["log_prob"], atol=1e-5)
        # and by hand: the mixed network at these weights
        c = "edges.e0_1.candidates"
        h = (one["activation"][0] * torch.tanh(x @ one[f"{c}.0.0.weight"].T + one[f"{c}.0.0.bias"])
             + one["activation"][1] * torch.relu(x @ one[f"{c}.1.0.weight"].T
                                                 + one[f"{c}.1.0.bias"]))
        logits = h @ one["edges.e1_2.weight"].T + one["edges.e1_2.bias"]
        assert_close(vectorised[p], dist.Categorical(logits=logits).log_prob(y), atol=1e-5)


def test_draw_vectorised_scores_equal_one_at_a_time_scores():
    x, y = _problem()
    model = _network_model()
    guide = ps.default_guide(model, ["activation"], init_values=model.initial_values(),
                             init_scale=0.3)
    latents = ["activation"] + list(model.initial_values())
    draws = draw(model, guide, (x, y), num_samples=6, vectorize=True, keep=latents)
    assert draws.vectorized
    for i in range(6):
        values = {name: draws.values[name][i] for name in latents}
        model_trace = poutine.trace(poutine.condition(model, values)).get_trace(x, y)
        model_trace.compute_log_prob()
        log_lik = model_trace.nodes["obs"]["log_prob_sum"]
        log_prior = sum(model_trace.nodes[n]["log_prob_sum"] for n in latents)
        # q by hand: Dirichlet for gamma, independent normals (AutoNormal) for the weights
        structure_guide, weight_guide = guide
        log_q = structure_guide.posterior("activation").log_prob(values["activation"])
        for name in latents[1:]:
            loc, scale = weight_guide._get_loc_and_scale(name)
            log_q = log_q + dist.Normal(loc, scale).log_prob(values[name]).sum()
        assert_close(draws.log_likelihood[i], log_lik, atol=1e-4, rtol=1e-5)
        assert_close(draws.log_prior[i], log_prior, atol=1e-4, rtol=1e-5)
        assert_close(draws.log_q[i], log_q, atol=1e-4, rtol=1e-5)
    # the same estimator drawn one at a time agrees in distribution: compare the means
    pyro.set_rng_seed(1)
    many_vec = draw(model, guide, (x, y), num_samples=400, vectorize=True)
    many_one = draw(model, guide, (x, y), num_samples=400, vectorize=False)
    assert not many_one.vectorized
    a, b = many_vec.log_weights.double(), many_one.log_weights.double()
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(float(a.mean() - b.mean())) < 5 * se


# --------------------------------------------------------------------------- empirical Bayes


def test_learned_prior_scale_is_a_param_that_svi_updates():
    x, y = _problem()
    model = _network_model(learn_prior_scale=True, prior_scale=3.0)
    guide = ps.default_guide(model, ["activation"], init_values=model.initial_values())
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi.step(x, y)
    store = pyro.get_param_store()
    assert "net.prior_scale" in store
    before = store["net.prior_scale"].detach().clone()
    assert_close(before, torch.full((3,), 3.0), atol=0.2)  # one Adam step from 3.0
    for _ in range(20):
        svi.step(x, y)
    after = store["net.prior_scale"].detach()
    assert bool((after > 0).all())
    assert not torch.allclose(before, after)
    # the weights' prior uses the learned scales, per layer
    trace = poutine.trace(model).get_trace(x, y)
    groups = model.net.groups
    scale = trace.nodes["edges.e1_2.weight"]["fn"].base_dist.scale
    assert_close(scale.reshape(-1)[0], after[groups.index("edges.e1_2")])


def test_fixed_prior_scale_is_not_a_param():
    x, y = _problem()
    model = _network_model(prior_scale=0.5)
    guide = ps.default_guide(model, ["activation"], init_values=model.initial_values())
    SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()).step(x, y)
    assert not any("prior_scale" in name for name in pyro.get_param_store())
    assert model.net.prior_scales() == {g: 0.5 for g in model.net.groups}


# --------------------------------------------------------------------------- NetworkModel data


def test_network_model_rejects_bad_data():
    x, y = _problem()
    model = _network_model()
    with pytest.raises(ValueError, match=r"y has 11 rows but x has 12"):
        model(x, y[:-1])
    with pytest.raises(ValueError, match=r"Argument 'x' contains 1 NaN or infinite"):
        model(torch.where(torch.arange(36).reshape(12, 3) == 4, math.nan, x), y)
    with pytest.raises(ValueError, match=r"Argument 'y' contains 1 NaN or infinite"):
        normal = _network_model(likelihood="normal")
        normal(x, torch.where(torch.arange(12) == 3, math.inf, y.float()))
    with pytest.raises(ValueError, match=r"integer class labels"):
        model(x, y.float())
    with pytest.raises(ValueError, match=r"batch_size to be a positive int"):
        model(x, y, batch_size=0)
    with pytest.raises(ValueError, match=r"noise_scale > 0"):
        _network_model(likelihood="normal", noise_scale=0.0)
    with pytest.raises(ValueError, match=r"Unknown likelihood 'poisson'"):
        _network_model(likelihood="poisson")


def test_network_model_subsamples_the_data_plate():
    x, y = _problem(n=12)
    model = _network_model()
    trace = poutine.trace(model).get_trace(x, y, batch_size=4)
    trace.compute_log_prob()
    assert trace.nodes["obs"]["value"].shape == (4,)
    frame = trace.nodes["obs"]["cond_indep_stack"][0]
    assert (frame.name, frame.size, frame.full_size) == ("data", 4, 12)
    assert_close(trace.nodes["obs"]["scale"], 3.0)
