"""Structural sites: ps.structure, find_structural_sites, fix_structure and their bad input."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_structsel as ps
from pyro_structsel.model.sites import OPTIONS_KEY, is_log_simplex

from common import assert_close


def _trace(fn, *args, **kwargs):
    trace = poutine.trace(fn).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    return trace


# --------------------------------------------------------------------------- ps.structure


def test_dirichlet_site_carries_labels_and_prior():
    def model():
        return ps.structure("act", ["relu", "tanh", "sigmoid"], concentration=[0.5, 1.0, 2.0])

    trace = _trace(model)
    site = trace.nodes["act"]
    assert isinstance(site["fn"], dist.Dirichlet)
    assert_close(site["fn"].concentration, [0.5, 1.0, 2.0])
    assert site["infer"][OPTIONS_KEY] == ("relu", "tanh", "sigmoid")
    gamma = trace.nodes["_RETURN"]["value"]
    assert gamma.shape == (3,)
    assert_close(gamma.sum(), 1.0, atol=1e-6)
    assert bool((gamma >= 0).all())
    expected = dist.Dirichlet(torch.tensor([0.5, 1.0, 2.0])).log_prob(gamma)
    assert_close(site["log_prob_sum"], expected)


def test_scalar_concentration_is_broadcast_over_options():
    fn, labels = ps.structural_prior("s", 4, concentration=0.3)
    assert labels is None
    assert_close(fn.concentration, [0.3] * 4)


@pytest.mark.parametrize("temperature", [0.5, 0.05])
def test_concrete_site_is_sampled_in_log_space(temperature):
    num = 2000

    def model():
        with pyro.plate("draws", num):
            return ps.structure("act", ["a", "b", "c"], prior="concrete",
                                temperature=temperature, logits=[0.0, 1.0, -1.0])

    # validation is on (conftest): the trace and its log densities must pass Pyro's checks
    trace = _trace(model)
    site = trace.nodes["act"]
    assert is_log_simplex(site["fn"])
    assert site["infer"][OPTIONS_KEY] == ("a", "b", "c")
    log_gamma = site["value"]
    assert log_gamma.dtype == torch.float32
    assert log_gamma.shape == (num, 3)
    assert bool(torch.isfinite(log_gamma).all())
    assert bool(torch.isfinite(site["log_prob"]).all())
    # every draw lies on the log-simplex: logsumexp = 0
    assert_close(torch.logsumexp(log_gamma, -1), torch.zeros(num), atol=1e-5)
    gamma = trace.nodes["_RETURN"]["value"]
    assert bool(torch.isfinite(gamma).all())
    assert_close(gamma, log_gamma.exp())
    assert_close(gamma.sum(-1), torch.ones(num), atol=1e-5)
    assert bool((gamma >= 0).all())
    # the argmax follows softmax(logits) (Gumbel-max), within 4 standard errors
    freq = torch.bincount(gamma.argmax(-1), minlength=3).double() / num
    probs = torch.softmax(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), -1)
    assert_close(freq, probs, atol=4 * math.sqrt(0.25 / num), rtol=0)


def test_concrete_log_density_matches_torch_relaxed_categorical():
    # log q(y) of the log-space site + Jacobian = log density of the Concrete on the simplex
    fn, _ = ps.structural_prior("s", 3, prior="concrete", temperature=0.7, logits=[0.2, -0.3, 1.])
    y = fn.sample((5,))
    relaxed = torch.distributions.RelaxedOneHotCategorical(torch.tensor(0.7),
                                                           logits=torch.tensor([0.2, -0.3, 1.]))
    assert_close(fn.log_prob(y) - y.sum(-1), relaxed.log_prob(y.exp()), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, match", [
    (dict(concentration=0.0), r"concentration > 0 for structural site 'act'"),
    (dict(concentration=-1.0), r"concentration > 0 for structural site 'act'"),
    (dict(concentration=[1.0, float("nan")]), r"concentration > 0 for structural site 'act'"),
    (dict(concentration=[1.0, 1.0, 1.0]), r"concentration of structural site 'act'.*length 2"),
    (dict(prior="concrete", temperature=0.0), r"temperature > 0 for structural site 'act'"),
    (dict(prior="concrete", temperature=-0.5), r"temperature > 0 for structural site 'act'"),
    (dict(prior="gamma"), r"Unknown prior 'gamma'; expected one of 'dirichlet', 'concrete'"),
    (dict(prior="concrete", logits=[0.0]), r"logits of structural site 'act'"),
])
def test_structure_rejects_bad_prior_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ps.structure("act", ["relu", "tanh"], **kwargs)


@pytest.mark.parametrize("options, match", [
    (["relu"], r"'act' needs at least two options"),
    (1, r"'act' needs at least two options"),
    ([], r"'act' needs at least two options"),
    (["relu", "tanh", "relu"], r"'act' has duplicate option labels \['relu'\]"),
    ("relu", r"options of structural site 'act'"),
    (2.5, r"options of structural site 'act'"),
])
def test_structure_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ps.structure("act", options)


def test_labels_count_must_match_last_dimension():
    def model():
        pyro.sample("g", dist.Dirichlet(torch.ones(3)), infer={OPTIONS_KEY: ("a", "b")})

    with pytest.raises(ValueError, match=r"'g' has 2 option labels but its value has 3 options"):
        ps.find_structural_sites(model)


def test_single_option_user_site_is_rejected():
    def model():
        pyro.sample("g", dist.Dirichlet(torch.ones(1)))

    with pytest.raises(ValueError, match=r"'g' has 1 option"):
        ps.find_structural_sites(model)


# --------------------------------------------------------------------------- find_structural_sites


def _user_model(x=None):
    a = pyro.sample("a", dist.Dirichlet(torch.ones(3)))
    b = pyro.sample("b", dist.RelaxedOneHotCategorical(torch.tensor(0.5), probs=torch.ones(4) / 4))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("c", dist.Categorical(probs=torch.ones(3) / 3))  # discrete, not structural
    return a, b, w


def test_find_structural_sites_finds_user_sites_without_labels():
    sites = ps.find_structural_sites(_user_model)
    assert list(sites) == ["a", "b"]
    assert sites["a"] == ps.StructuralSite("a", 3, None, False)
    assert sites["b"] == ps.StructuralSite("b", 4, None, False)
    assert sites["a"].option_names() == ["0", "1", "2"]
    assert sites["a"].label(2) == 2
    assert sites["b"].index(3) == 3
    with pytest.raises(ValueError, match=r"Unknown option 4 for structural site 'b'"):
        sites["b"].index(4)
    with pytest.raises(ValueError, match=r"Unknown option 'x' for structural site 'a'"):
        sites["a"].index("x")


def test_find_structural_sites_reads_labels_and_log_space():
    def model():
        ps.structure("d", ["x", "y"])
        ps.structure("c", ["p", "q", "r"], prior="concrete", temperature=0.1)
        pyro.sample("z", dist.Normal(0.0, 1.0))

    sites = ps.find_structural_sites(model)
    assert sites == {"d": ps.StructuralSite("d", 2, ("x", "y"), False),
                     "c": ps.StructuralSite("c", 3, ("p", "q", "r"), True)}
    assert sites["c"].index("r") == 2
    assert sites["c"].label(1) == "q"
    log_gamma = torch.tensor([-0.1, -3.0, -2.5])
    assert_close(sites["c"].to_simplex(log_gamma), log_gamma.exp())
    assert_close(sites["d"].to_simplex(torch.tensor([0.3, 0.7])), [0.3, 0.7])


def test_find_structural_sites_on_model_without_any():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    assert ps.find_structural_sites(model) == {}


# --------------------------------------------------------------------------- fix_structure


def _pinnable_model(x, y):
    gamma = ps.structure("act", ["relu", "tanh", "identity"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    h = x @ w
    mean = gamma[0] * torch.relu(h) + gamma[1] * torch.tanh(h) + gamma[2] * h
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)
    return gamma


_X = torch.tensor([[0.5, -1.0], [1.5, 0.3], [-0.7, 2.0]])
_Y = torch.tensor([0.2, -0.4, 1.1])
_W = torch.tensor([0.8, -1.2])


@pytest.mark.parametrize("option, index", [("tanh", 1), (2, 2)])
def test_fix_structure_pins_site_and_adds_zero_log_density(option, index):
    fixed = ps.fix_structure(poutine.condition(_pinnable_model, {"w": _W}), {"act": option})
    trace = _trace(fixed, _X, _Y)
    site = trace.nodes["act"]
    onehot = torch.nn.functional.one_hot(torch.tensor(index), 3).float()
    assert_close(site["value"], onehot)
    assert_close(trace.nodes["_RETURN"]["value"], onehot)
    assert site["is_observed"]
    assert float(site["log_prob_sum"]) == 0.0
    assert "act" not in ps.find_structural_sites(fixed, _X, _Y)

    # the same model without the pin, conditioned on the vertex: only the prior term differs
    free = _trace(poutine.condition(_pinnable_model, {"w": _W, "act": onehot}), _X, _Y)
    prior_term = free.nodes["act"]["log_prob_sum"]
    assert_close(prior_term, math.log(2.0))  # log Gamma(3): flat Dirichlet density
    assert_close(trace.log_prob_sum(), free.log_prob_sum() - prior_term, atol=1e-5)

    # and by hand: log N(w | 0, 1) + log N(y | g_index(x w), 0.5)
    h = _X @ _W
    activation = [torch.relu(h), torch.tanh(h), h][index]
    expected = (dist.Normal(0.0, 1.0).log_prob(_W).sum()
                + dist.Normal(activation, 0.5).log_prob(_Y).sum())
    assert_close(trace.log_prob_sum(), expected, atol=1e-5)


def test_fix_structure_concrete_site_in_log_space():
    def model():
        return ps.structure("c", ["a", "b", "c"], prior="concrete", temperature=0.05)

    trace = _trace(ps.fix_structure(model, {"c": "b"}))
    assert_close(trace.nodes["c"]["value"].exp(), [0.0, 1.0, 0.0])
    assert_close(trace.nodes["_RETURN"]["value"], [0.0, 1.0, 0.0])
    assert float(trace.log_prob_sum()) == 0.0


def test_fix_structure_as_context_manager_and_decorator():
    with ps.fix_structure(structure={"act": "identity"}):
        trace = _trace(_pinnable_model, _X, _Y)
    assert_close(trace.nodes["act"]["value"], [0.0, 0.0, 1.0])
    assert trace.nodes["act"]["is_observed"]
    # the handler leaves the stack on exit
    trace = _trace(_pinnable_model, _X, _Y)
    assert not trace.nodes["act"]["is_observed"]

    @ps.fix_structure(structure={"act": 0})
    def decorated(x, y):
        return _pinnable_model(x, y)

    assert_close(decorated(_X, _Y), [1.0, 0.0, 0.0])


def test_fix_structure_bad_input():
    with pytest.raises(ValueError, match=r"Unknown option 'gelu' for structural site 'act'"):
        ps.fix_structure(_pinnable_model, {"act": "gelu"})(_X, _Y)
    with pytest.raises(ValueError, match=r"Unknown option 3 for structural site 'act'"):
        ps.fix_structure(_pinnable_model, {"act": 3})(_X, _Y)
    with pytest.raises(ValueError, match=r"Site 'w' in the structure is not a latent structural"):
        ps.fix_structure(_pinnable_model, {"w": 0})(_X, _Y)
    with pytest.raises(ValueError, match=r"Expected structure to be a dict"):
        ps.fix_structure(_pinnable_model, ["act"])
