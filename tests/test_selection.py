"""select_structure: its result, determinism, locality of parameters, guides, bad input."""

from __future__ import annotations

import math

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList, AutoNormal
from torch import nn

import pyro_structsel as ps

from common import assert_close

FAST = dict(progress=False, num_evidence_samples=50)


def _data(n=40, seed=0, teacher=torch.tanh):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator)
    y = teacher(2.0 * x[:, 0] - x[:, 1]) + 0.1 * torch.randn(n, generator=generator)
    return x, y


def _network_model(**kwargs):
    torch.manual_seed(0)
    family = ps.one_hidden_layer(2, 1, hidden=4, activations=("relu", "tanh"))
    return ps.NetworkModel(family, likelihood="normal", noise_scale=0.2, **kwargs)


def _user_model(x, y):
    gamma = ps.structure("g", ["relu", "tanh"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    h = (x * w).sum(-1)  # (N,), or (P, N) under a particle plate: w is then (P, 1, 2)
    mean = gamma[..., 0] * torch.relu(h) + gamma[..., 1] * torch.tanh(h)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.2), obs=y)


# --------------------------------------------------------------------------- the result


@pytest.fixture(scope="module")
def fitted():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    x, y = _data()
    model = _network_model()
    result = ps.select_structure(model, x, y, num_steps=60, seed=0, **FAST)
    assert len(pyro.get_param_store()) == 0
    return model, x, y, result


def test_result_structure_and_probabilities(fitted):
    model, x, y, result = fitted
    assert set(result.structure) == set(result.probabilities) == {"activation"}
    probs = result.probabilities["activation"]
    assert probs.shape == (2,)
    assert_close(probs.sum(), 1.0, atol=1e-6)
    assert bool((probs >= 0).all())
    assert result.structure["activation"] == ("relu", "tanh")[int(probs.argmax())]
    assert result.sites["activation"] == ps.StructuralSite("activation", 2, ("relu", "tanh"),
                                                           False)
    mean = result.posterior_mean["activation"]
    assert_close(mean.sum(), 1.0, atol=1e-5)
    assert "activation=" in repr(result)


def test_result_losses_and_evidence(fitted):
    _, _, _, result = fitted
    assert len(result.losses) == 60
    assert all(math.isfinite(loss) for loss in result.losses)
    est = result.evidence["elbo"]
    assert isinstance(est, ps.Estimate)
    assert est.method == "elbo" and est.num_samples == 50
    assert math.isfinite(est.value) and 0 < est.se < math.inf
    dl = result.description_length
    assert_close(dl.total_bits, -est.value / math.log(2.0), atol=1e-9)
    assert_close(dl.model_bits + dl.data_bits, dl.total_bits, atol=1e-6)
    scores = result.scores()
    assert isinstance(scores, pd.Series)
    assert_close(scores["log_evidence[elbo]"], est.value)


def test_result_complexities_by_hand(fitted):
    model, x, y, result = fitted
    structure_guide, weight_guide = result.guide
    assert isinstance(result.guide, AutoGuideList)
    assert isinstance(structure_guide, ps.AutoStructure)
    assert isinstance(weight_guide, AutoNormal)
    with result.param_scope():
        alpha = structure_guide.posterior("activation").concentration.detach().double()
        energy, count, log_var = {}, {}, {}
        for name in model.initial_values():
            loc, scale = (t.detach().double() for t in weight_guide._get_loc_and_scale(name))
            group = name.rpartition(".")[0]
            energy[group] = energy.get(group, 0.0) + float((scale**2 + loc**2).sum())
            count[group] = count.get(group, 0) + loc.numel()
            log_var[group] = log_var.get(group, 0.0) + float((scale**2).log().sum())
    assert set(energy) == set(model.net.groups)
    # min_h KL(N(mu, s^2) || N(0, h^2)) = 1/2 sum_l [n_l log h_l*^2 - sum log s^2], h*^2 = e_l/n_l
    expected = sum(0.5 * (count[g] * math.log(energy[g] / count[g]) - log_var[g])
                   for g in energy)
    pc = result.parametric_complexity
    assert pc.method == "closed_form"
    assert_close(pc.value, expected, atol=1e-4, rtol=1e-5)
    assert_close(pc.diagnostics["optimal_prior_scale"],
                 {g: math.sqrt(energy[g] / count[g]) for g in energy}, rtol=1e-5)
    # Dirichlet entropy of the fitted q(gamma)
    a0 = alpha.sum()
    entropy = float(torch.lgamma(alpha).sum() - torch.lgamma(a0) + (a0 - 2) * torch.digamma(a0)
                    - ((alpha - 1) * torch.digamma(alpha)).sum())
    sc = result.structural_complexity
    assert_close(sc.value, entropy, atol=1e-5, rtol=1e-5)
    assert_close(sc.diagnostics["sites"]["activation"]["probabilities"],
                 result.probabilities["activation"], atol=1e-6)
    assert result.classical_complexity == {"num_parameters": 2 * 4 + 4 + 4 + 1,
                                           "num_superpositions": 2}


def test_result_summary(fitted):
    _, _, _, result = fitted
    table = result.summary()
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == [("activation", "relu"), ("activation", "tanh")]
    assert_close(table["probability"].tolist(), result.probabilities["activation"], atol=1e-7)
    assert_close(table["posterior_mean"].tolist(), result.posterior_mean["activation"],
                 atol=1e-7)
    chosen = table.index[table["chosen"]].tolist()
    assert chosen == [("activation", result.structure["activation"])]


def test_result_fixed_model(fitted):
    _, x, y, result = fitted
    trace = poutine.trace(result.fixed_model()).get_trace(x, y)
    trace.compute_log_prob()
    site = trace.nodes["activation"]
    index = ("relu", "tanh").index(result.structure["activation"])
    assert_close(site["value"], torch.eye(2)[index])
    assert site["is_observed"] and float(site["log_prob_sum"]) == 0.0


def test_result_derive_is_the_posterior_mean_network_at_the_vertex(fitted):
    model, x, y, result = fitted
    derived = result.derive()
    assert isinstance(derived, nn.Module) and not isinstance(derived, pyro.nn.PyroModule)
    assert not any(isinstance(m, ps.MixedOp) for m in derived.modules())
    index = ("relu", "tanh").index(result.structure["activation"])
    with result.param_scope():
        locs = {name: result.guide[1]._get_loc_and_scale(name)[0].detach()
                for name in model.initial_values()}
    expected = ps.batched_call(model.network, {**locs, "edges.e0_1.gamma": torch.eye(2)[index]},
                               x)
    with torch.no_grad():
        assert_close(derived(x), expected, atol=1e-5)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_runs():
    x, y = _data()
    model = _network_model()
    first = ps.select_structure(model, x, y, num_steps=30, seed=3, **FAST)
    second = ps.select_structure(model, x, y, num_steps=30, seed=3, **FAST)
    assert first.losses == second.losses
    assert torch.equal(first.probabilities["activation"], second.probabilities["activation"])
    assert first.evidence["elbo"].value == second.evidence["elbo"].value
    other = ps.select_structure(model, x, y, num_steps=30, seed=4, **FAST)
    assert other.losses != first.losses


def test_same_seed_identical_with_a_learned_prior_scale():
    # the learnable scale lives in the model object: a second fit must not start from the first
    x, y = _data()
    model = _network_model(learn_prior_scale=True)
    first = ps.select_structure(model, x, y, num_steps=30, seed=0, **FAST)
    assert any(name.endswith("prior_scale") for name in first.param_state["params"])
    learned = {k: v.detach().clone() for k, v in first.param_state["params"].items()}
    first.derive()  # runs the model in the first fit's param scope
    second = ps.select_structure(model, x, y, num_steps=30, seed=0, **FAST)
    assert first.losses == second.losses
    assert_close(dict(first.param_state["params"]), learned, atol=0, rtol=0)  # untouched
    assert model.net.prior_scales() == {g: 1.0 for g in model.net.groups}


# --------------------------------------------------------------------------- locality


def test_fits_keep_their_parameters_to_themselves():
    keep = pyro.param("keep", torch.tensor([1.0, 2.0]))
    x_a, y_a = _data(seed=1)
    x_b, y_b = _data(seed=2, teacher=torch.relu)
    fit_b = ps.select_structure(_user_model, x_b, y_b, num_steps=30, seed=0, **FAST)
    fit_a = ps.select_structure(_user_model, x_a, y_a, num_steps=30, seed=0, **FAST)
    params_a = {k: v.detach().clone() for k, v in fit_a.param_state["params"].items()}
    fit_b_again = ps.select_structure(_user_model, x_b, y_b, num_steps=30, seed=0, **FAST)
    # same site names, so the same parameter names, but different values
    assert set(fit_a.param_state["params"]) == set(fit_b.param_state["params"])
    assert any(not torch.equal(fit_a.param_state["params"][k], fit_b.param_state["params"][k])
               for k in params_a)
    # the fit of b does not start from a's parameters, nor change them
    assert fit_b_again.losses == fit_b.losses
    assert_close(dict(fit_a.param_state["params"]), params_a, atol=0, rtol=0)
    # the global param store is untouched
    store = pyro.get_param_store()
    assert list(store.keys()) == ["keep"]
    assert store["keep"] is keep and torch.equal(store["keep"], torch.tensor([1.0, 2.0]))


def test_user_written_guide_is_used_as_is():
    x, y = _data()

    def guide(x, y):
        conc = pyro.param("conc", torch.full((2,), 2.0), constraint=constraints.positive)
        pyro.sample("g", dist.Dirichlet(conc))
        loc = pyro.param("w_loc", torch.zeros(2))
        scale = pyro.param("w_scale", torch.full((2,), 0.1), constraint=constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    with pytest.warns(UserWarning, match=r"No parametric complexity"):
        result = ps.select_structure(_user_model, x, y, guide=guide, num_steps=30, seed=0,
                                     **FAST)
    assert result.guide is guide
    assert set(result.param_state["params"]) == {"conc", "w_loc", "w_scale"}
    assert result.parametric_complexity is None
    assert math.isnan(result.structural_complexity.value)  # not an AutoStructure guide
    assert_close(result.probabilities["g"].sum(), 1.0, atol=1e-6)
    assert result.structure["g"] in ("relu", "tanh")
    assert len(pyro.get_param_store()) == 0


def test_autoguide_class_is_used_for_the_weights():
    x, y = _data()
    model = _network_model()
    result = ps.select_structure(model, x, y, guide=AutoDiagonalNormal, num_steps=30, seed=0,
                                 **FAST)
    structure_guide, weight_guide = result.guide
    assert isinstance(structure_guide, ps.AutoStructure)
    assert type(weight_guide) is AutoDiagonalNormal
    with result.param_scope():
        posterior = weight_guide.get_posterior()
        loc, var = posterior.mean.detach().double(), posterior.variance.detach().double()
        energy, count, start = {}, {}, 0
        for name, _ in weight_guide.prototype_trace.iter_stochastic_nodes():
            size = weight_guide._unconstrained_shapes[name].numel()
            group = name.rpartition(".")[0]
            part = slice(start, start + size)
            energy[group] = energy.get(group, 0.0) + float((var[part] + loc[part] ** 2).sum())
            count[group] = count.get(group, 0) + size
            start += size
    assert start == sum(p.numel() for p in model.network.parameters())
    expected = 0.5 * (sum(count[g] * math.log(energy[g] / count[g]) for g in energy)
                      - float(var.log().sum()))
    assert_close(result.parametric_complexity.value, expected, atol=1e-4, rtol=1e-5)
    assert isinstance(result.derive(), nn.Module)


def test_concrete_prior_at_low_temperature():
    x, y = _data()
    model = _network_model(prior="concrete", temperature=0.05)
    result = ps.select_structure(model, x, y, num_steps=30, seed=0, **FAST)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.sites["activation"].log_space
    with result.param_scope():
        logits = result.guide[0].logits.activation.detach()
    assert_close(result.probabilities["activation"], torch.softmax(logits, -1), atol=1e-6)
    assert math.isfinite(result.evidence["elbo"].value)


def test_unlabelled_user_sites_are_reported_by_index():
    x, y = _data()

    def model(x, y):
        gamma = pyro.sample("g", dist.Dirichlet(torch.ones(3)))
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        h = (x * w).sum(-1)
        mean = gamma[..., 0] * torch.relu(h) + gamma[..., 1] * torch.tanh(h) + gamma[..., 2] * h
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mean, 0.2), obs=y)

    result = ps.select_structure(model, x, y, num_steps=20, seed=0, **FAST)
    assert result.sites["g"].labels is None
    chosen = result.structure["g"]
    assert isinstance(chosen, int) and chosen == int(result.probabilities["g"].argmax())
    assert [o for _, o in result.summary().index] == ["0", "1", "2"]
    trace = poutine.trace(result.fixed_model()).get_trace(x, y)
    assert_close(trace.nodes["g"]["value"], torch.eye(3)[chosen])


# --------------------------------------------------------------------------- bad input


def _nan_at(t, index):
    t = t.clone()
    t[index] = math.nan
    return t


def test_non_finite_data_network_model():
    x, y = _data()
    model = _network_model()
    with pytest.raises(ValueError, match=r"'x' contains 1 NaN or infinite values"):
        ps.select_structure(model, _nan_at(x, (3, 1)), y, num_steps=1, **FAST)
    with pytest.raises(ValueError, match=r"'y' contains 2 NaN or infinite values"):
        y_bad = y.clone()
        y_bad[[0, 5]] = torch.tensor([math.inf, -math.inf])
        ps.select_structure(model, x, y_bad, num_steps=1, **FAST)
    with pytest.raises(ValueError, match=r"'y' contains 1 NaN"):
        ps.select_structure(model, x, y=_nan_at(y, 2), num_steps=1, **FAST)


def test_non_finite_data_user_model():
    x, y = _data()
    with pytest.raises(ValueError, match=r"'x' contains 1 NaN or infinite values"):
        ps.select_structure(_user_model, _nan_at(x, (0, 0)), y, num_steps=1, **FAST)
    with pytest.raises(ValueError, match=r"'y' contains 1 NaN or infinite values"):
        ps.select_structure(_user_model, x, _nan_at(y, 7), num_steps=1, **FAST)


def test_data_size_must_match_the_plate():
    x, y = _data()
    with pytest.raises(ValueError, match=r"y has 39 rows but x has 40"):
        ps.select_structure(_network_model(), x, y[:-1], num_steps=1, **FAST)
    with pytest.raises(ValueError, match=r"site 'obs'"):
        ps.select_structure(_user_model, x, y[:-1], num_steps=1, **FAST)

    def plate_of_given_size(n, y):
        gamma = ps.structure("g", ["a", "b"])
        with pyro.plate("data", n):
            pyro.sample("obs", dist.Normal(gamma[0], 1.0), obs=y)

    with pytest.raises(ValueError, match=r"site 'obs'"):
        ps.select_structure(plate_of_given_size, 5, torch.zeros(4), num_steps=1, **FAST)


def test_model_without_structural_site():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(w * x[:, 0], 1.0), obs=y)

    x, y = _data()
    with pytest.raises(ValueError, match=r"no structural site.*ps.structure"):
        ps.select_structure(model, x, y, num_steps=1, **FAST)


def test_labels_must_match_the_site():
    def model():
        pyro.sample("g", dist.Dirichlet(torch.ones(3)), infer={"structsel_options": ("a", "b")})

    with pytest.raises(ValueError, match=r"'g' has 2 option labels but its value has 3 options"):
        ps.select_structure(model, num_steps=1, **FAST)


@pytest.mark.parametrize("make, match", [
    (lambda: _network_model(concentration=0.0), r"concentration > 0 for structural site"),
    (lambda: _network_model(concentration=-2.0), r"concentration > 0 for structural site"),
    (lambda: _network_model(prior="concrete", temperature=0.0), r"temperature > 0"),
    (lambda: _network_model(prior="gamma"), r"Unknown prior 'gamma'; expected one of"),
    (lambda: ps.one_hidden_layer(2, 1, activations=("relu",)), r"at least two candidates"),
    (lambda: ps.one_hidden_layer(2, 1, activations=("relu", "tanh", "relu")),
     r"duplicate.*'relu'"),
    (lambda: ps.two_hidden_layer(2, 1, activations=("tanh", "tanh")), r"duplicate.*'tanh'"),
])
def test_bad_model_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("site, match", [
    (lambda: ps.structure("g", ["a"]), r"'g' needs at least two options"),
    (lambda: ps.structure("g", ["a", "b", "a"]), r"'g' has duplicate option labels \['a'\]"),
    (lambda: pyro.sample("g", dist.Dirichlet(torch.ones(1))), r"'g' has 1 option"),
    (lambda: ps.structure("g", 2, prior="concrete", temperature=-1.0),
     r"temperature > 0 for structural site 'g'"),
    (lambda: ps.structure("g", 2, prior="uniform"), r"Unknown prior 'uniform'"),
])
def test_bad_structural_sites_in_a_user_model(site, match):
    def model():
        site()

    with pytest.raises(ValueError, match=match):
        ps.select_structure(model, num_steps=1, **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=0), r"num_steps to be an int >= 1, but got 0"),
    (dict(num_steps=-5), r"num_steps to be an int >= 1"),
    (dict(num_steps=2.5), r"num_steps to be an int >= 1"),
    (dict(num_steps=True), r"num_steps to be an int >= 1"),
    (dict(num_particles=0), r"num_particles to be an int >= 1"),
    (dict(num_restarts=0), r"num_restarts to be an int >= 1"),
    (dict(lr=0.0), r"lr > 0"),
    (dict(temperature=0.0), r"temperature > 0"),
    (dict(temperature=(1.0, -0.1)), r"temperatures > 0"),
    (dict(guide="AutoNormal"), r"guide to be a callable"),
])
def test_bad_select_structure_arguments(kwargs, match):
    x, y = _data()
    options = {**FAST, "num_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ps.select_structure(_user_model, x, y, **options)


def test_unknown_evidence_estimator_lists_the_valid_ones():
    x, y = _data()
    with pytest.raises(ValueError, match=r"Unknown evidence estimator 'bogus'") as info:
        ps.select_structure(_user_model, x, y, num_steps=1, evidence=("elbo", "bogus"), **FAST)
    message = str(info.value)
    assert all(repr(method.value) in message for method in ps.EvidenceMethod)
    with pytest.raises(ValueError, match=r"Unknown evidence estimator 'nope'; expected one of"):
        ps.select_structure(_user_model, x, y, num_steps=1, evidence="nope", **FAST)


def test_a_model_with_its_structure_pinned_is_fitted_as_that_structure():
    import warnings

    torch.manual_seed(0)
    x = torch.randn(60, 2)
    y = torch.tanh(x @ torch.randn(2, 1)).squeeze(-1) + 0.1 * torch.randn(60)
    model = ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=4, activations=("tanh", "relu")),
                            likelihood="normal", noise_scale=0.1)
    fixed = ps.select_structure(ps.fix_structure(model, {"activation": "relu"}), x, y,
                                num_steps=50, seed=0, progress=False, num_evidence_samples=100)
    assert fixed.structure == {"activation": "relu"} and fixed.sites == {}
    assert fixed.probabilities["activation"].tolist() == [0.0, 1.0]
    assert fixed.structural_complexity.value == 0.0
    assert fixed.summary().loc[("activation", "relu"), "chosen"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-hat / convergence of a 50-step fit
        idata = fixed.to_inference_data(num_samples=100)
    assert "log_likelihood" in idata.groups()
