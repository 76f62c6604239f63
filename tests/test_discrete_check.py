"""The discrete check of select_structure: candidates, exact evidence, flags, cost, starts.

The exact case is Bayesian linear regression whose two structural sites
choose the basis functions: at every vertex the model is linear-Gaussian, so
the Laplace evidence of each discrete structure is exact (PRML eq. 3.86) and
the check's choice and probabilities can be compared with closed forms.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_structsel as ps
from pyro_structsel.evidence.methods import EvidenceMethod
from pyro_structsel.infer.convergence import ConvergenceWarning
from pyro_structsel.infer.guides import build_guide, prior_draw_values
from pyro_structsel.selection.discrete_check import (
    DiscreteCheck,
    OverconfidenceWarning,
    default_check_method,
    default_hessian_structure,
    first_candidates,
    leading_vertices,
    neighbours,
    vertex_probability,
)
from pyro_structsel.util.sampling import trace_model

from common import assert_close

FIRST = {"x": lambda x: x, "square": lambda x: x ** 2 - 1.0}
SECOND = {"sin": torch.sin, "cos": torch.cos}
NOISE = 0.3


def _blr_data(n=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.rand(n, generator=generator) - 1.0
    y = 1.5 * x ** 2 - 1.5 + 1.0 * torch.cos(x) + NOISE * torch.randn(n, generator=generator)
    return x, y


def _blr_model(x, y=None):
    g1 = ps.structure("first", list(FIRST))
    g2 = ps.structure("second", list(SECOND))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    # g[..., k] and w[..., i] broadcast against x: vectorised draws work
    phi1 = sum(g1[..., k] * f(x) for k, f in enumerate(FIRST.values()))
    phi2 = sum(g2[..., k] * f(x) for k, f in enumerate(SECOND.values()))
    mean = w[..., 0] * phi1 + w[..., 1] * phi2
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, NOISE), obs=y)


def _exact_log_evidence(x, y):
    out = {}
    for a, b in itertools.product(FIRST, SECOND):
        features = torch.stack([FIRST[a](x), SECOND[b](x)], -1)
        out[(a, b)] = ps.blr_log_evidence(features, y, prior_precision=1.0,
                                          noise_precision=NOISE ** -2).value
    return out


# --------------------------------------------------------------------------- candidates


SITES = {"a": ps.StructuralSite("a", 3, ("p", "q", "r"), False),
         "b": ps.StructuralSite("b", 2, ("s", "t"), False)}
PROBS = {"a": torch.tensor([0.1, 0.7, 0.2]), "b": torch.tensor([0.6, 0.4])}


def test_leading_vertices_come_in_decreasing_mass_and_cover_all():
    vertices = list(leading_vertices(SITES, PROBS))
    masses = [vertex_probability(v, PROBS, SITES) for v in vertices]
    assert len(vertices) == 6
    assert {tuple(v.values()) for v in vertices} == set(itertools.product("pqr", "st"))
    assert masses == sorted(masses, reverse=True)
    assert_close(sum(masses), 1.0, atol=1e-6)
    assert vertices[0] == {"a": "q", "b": "s"}


def test_neighbours_change_one_site_at_a_time():
    found = neighbours({"a": "q", "b": "s"}, SITES)
    assert found == [{"a": "p", "b": "s"}, {"a": "r", "b": "s"}, {"a": "q", "b": "t"}]


def test_first_candidates_cover_the_mass_and_the_pick_neighbours():
    pick = {"a": "q", "b": "s"}
    found = first_candidates(SITES, PROBS, pick, coverage=0.6)
    labels = [ps.structure_label(s) for s in found]
    # q,s (0.42) and q,t (0.28) cover 0.6; then the pick's neighbours p,s and r,s
    assert labels == ["a=q, b=s", "a=q, b=t", "a=p, b=s", "a=r, b=s"]
    assert len(first_candidates(SITES, PROBS, pick, coverage=1.0)) == 6


# --------------------------------------------------------------------------- exact evidence


def test_check_with_exact_evidence_picks_the_best_and_gives_its_probabilities():
    x, y = _blr_data()
    exact = _exact_log_evidence(x, y)
    result = ps.select_structure(_blr_model, x, y, num_steps=100, lr=0.05, seed=0,
                                 progress=False, num_evidence_samples=20,
                                 check_method="laplace", check_coverage=1.0)
    check = result.discrete_check
    assert isinstance(check, DiscreteCheck) and check.num_fits == 4 and check.method == "laplace"
    best = max(exact, key=exact.get)
    assert (result.structure["first"], result.structure["second"]) == best == ("square", "cos")
    log_z = torch.logsumexp(torch.tensor(list(exact.values()), dtype=torch.float64), 0)
    for (a, b), value in exact.items():
        row = check.table.loc[f"first={a}, second={b}"]
        assert_close(row["log_evidence"], value, atol=1e-3)
        assert_close(row["probability"], math.exp(value - float(log_z)), atol=1e-4)
    marginal = sum(math.exp(v - float(log_z)) for (a, _), v in exact.items() if a == "square")
    assert_close(float(result.probabilities["first"][0]), 1.0 - marginal, atol=1e-4)
    # the relaxed posterior is kept alongside, and the cost is stated
    assert set(result.relaxed_probabilities) == {"first", "second"}
    assert_close(result.relaxed_probabilities["first"].sum(), 1.0, atol=1e-5)
    assert check.seconds > 0 and check.num_steps == 100
    assert list(check.table.columns[-2:]) == ["q_probability", "converged"]
    assert "discrete check: 4 fits" in repr(result)
    summary = result.summary()
    assert "relaxed_probability" in summary.columns
    assert_close(float(summary.loc[("first", "square"), "probability"]), marginal, atol=1e-4)


# --------------------------------------------------------------------------- defaults and flags


def _one_site_model(x, y=None):
    g = ps.structure("g", ["relu", "tanh"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    h = (x * w).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(g[..., 0] * torch.relu(h) + g[..., 1] * torch.tanh(h),
                                       0.2), obs=y)


def test_check_is_on_for_several_sites_and_off_for_one_or_when_asked():
    x2 = torch.randn(20, 2)
    one = ps.select_structure(_one_site_model, x2, torch.tanh(x2[:, 0]), num_steps=10,
                              progress=False, num_evidence_samples=5, seed=0)
    assert one.discrete_check is None and one.structure == one.relaxed_structure
    x, y = _blr_data(n=20)
    off = ps.select_structure(_blr_model, x, y, num_steps=10, progress=False,
                              num_evidence_samples=5, seed=0, discrete_check=False)
    assert off.discrete_check is None and off.structure == off.relaxed_structure
    assert all(torch.equal(off.probabilities[n], off.relaxed_probabilities[n]) for n in off.sites)
    on = ps.select_structure(_blr_model, x, y, num_steps=10, progress=False,
                             num_evidence_samples=5, seed=0, check_steps=5, check_max_fits=2)
    assert on.discrete_check is not None and on.discrete_check.num_fits == 2
    assert on.discrete_check.num_steps == 5


def test_a_network_is_checked_by_its_ggn_laplace_evidence_and_a_user_model_by_elbo():
    """NetworkModel: GGN Laplace at each pruned network's MAP (full GGN while small), no SVI
    fit; a user model: warm-started ELBO fits. Each estimate is the one its method gives."""
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tanh(x @ torch.tensor([1.5, -1.0]))
    model = ps.NetworkModel(ps.two_hidden_layer(2, 1, hidden=(3, 3),
                                                activations=("tanh", "identity")),
                            likelihood="normal", noise_scale=0.3)
    result = ps.select_structure(model, x, y, num_steps=20, progress=False,
                                 num_evidence_samples=5, seed=0, check_max_fits=3)
    check = result.discrete_check
    assert check.method == "laplace" and check.num_fits == 3
    assert check_estimates_equal(check, lambda s: ps.ggn_laplace(
        model, x, y, structure=s, hessian_structure="full").value)
    kron = ps.select_structure(model, x, y, num_steps=20, progress=False,
                               num_evidence_samples=5, seed=0, check_max_fits=3,
                               check_hessian="kron").discrete_check
    assert check_estimates_equal(kron, lambda s: ps.ggn_laplace(
        model, x, y, structure=s, hessian_structure="kron").value)
    xb, yb = _blr_data(n=20)
    user = ps.select_structure(_blr_model, xb, yb, num_steps=10, progress=False,
                               num_evidence_samples=5, seed=0, check_steps=5, check_max_fits=2)
    assert user.discrete_check.method == "elbo"


def test_only_a_network_small_enough_for_the_full_ggn_is_checked_by_laplace_unasked():
    small = ps.NetworkModel(ps.two_hidden_layer(2, 1, hidden=(3, 3)))
    large = ps.NetworkModel(ps.two_hidden_layer(64, 10, hidden=(32, 32)))  # 3466 weights
    assert default_hessian_structure(small) == "full"
    assert default_hessian_structure(large) == "kron"
    assert default_check_method(small) is EvidenceMethod.LAPLACE
    assert default_check_method(large) is EvidenceMethod.ELBO  # kron favoured identity layers
    assert default_check_method(large, "kron") is EvidenceMethod.LAPLACE  # asked for
    assert default_check_method(_blr_model) is EvidenceMethod.ELBO


def check_estimates_equal(check, evidence) -> bool:
    return all(abs(float(row["log_evidence"]) - evidence(row["structure"])) < 1e-3
               for _, row in check.table.iterrows())


def _check(relaxed, chosen, q):
    import pandas as pd

    labels = [ps.structure_label(chosen), ps.structure_label(relaxed)]
    table = pd.DataFrame({"log_evidence": [0.0, -5.0], "log_bayes_factor": [0.0, -5.0],
                          "converged": [True, False]}, index=labels)
    return DiscreteCheck(table=table, method="elbo", structure=chosen, probabilities={},
                         relaxed_structure=relaxed, relaxed_probabilities=q, num_fits=2,
                         num_steps=10, seconds=1.0, warm_start=True)


def test_overconfidence_is_said_where_q_is_sure_of_an_option_the_evidence_drops():
    relaxed, chosen = {"a": "q", "b": "s"}, {"a": "p", "b": "s"}
    sure = _check(relaxed, chosen, {"a": torch.tensor([0.0, 1.0, 0.0]),
                                    "b": torch.tensor([1.0, 0.0])})
    assert not sure.agrees and sure.relaxed_rank == 2
    assert sure.unconverged() == [ps.structure_label(relaxed)] and sure.unconverged(top=1) == []
    assert sure.overconfident_sites() == ["a"]  # b is sure too, but of the option chosen
    assert "overconfident at ['a']" in sure.message() and "ranks it 2 of 2" in sure.message()
    unsure = _check(relaxed, chosen, {"a": torch.tensor([0.3, 0.6, 0.1]),
                                      "b": torch.tensor([1.0, 0.0])})
    assert unsure.overconfident_sites() == [] and "overconfident" not in unsure.message()
    agree = _check(chosen, chosen, {"a": torch.tensor([1.0, 0.0, 0.0]),
                                    "b": torch.tensor([1.0, 0.0])})
    assert agree.agrees and "agree" in agree.message()


def test_select_structure_warns_when_q_is_overconfident(monkeypatch):
    import pyro_structsel.selection.select as select

    real = select.run_discrete_check

    def against_the_relaxed_pick(*args, **kwargs):  # the evidence prefers another structure
        check = real(*args, **kwargs)
        other = {"first": "x" if check.relaxed_structure["first"] == "square" else "square",
                 "second": check.relaxed_structure["second"]}
        check.structure = other
        check.relaxed_probabilities = {
            "first": torch.nn.functional.one_hot(torch.tensor(
                list(FIRST).index(check.relaxed_structure["first"])), 2).float(),
            "second": torch.tensor([0.5, 0.5])}
        return check

    monkeypatch.setattr(select, "run_discrete_check", against_the_relaxed_pick)
    x, y = _blr_data(n=20)
    with pytest.warns(OverconfidenceWarning, match="overconfident at \\['first'\\]"):
        ps.select_structure(_blr_model, x, y, num_steps=10, progress=False,
                            num_evidence_samples=5, seed=0, check_steps=5, check_coverage=1.0)


def test_select_structure_warns_when_the_elbo_has_not_converged():
    x, y = _blr_data(n=20)
    with pytest.warns(ConvergenceWarning, match="has not converged"):
        ps.select_structure(_blr_model, x, y, num_steps=12, lr=0.05, progress=False,
                            num_evidence_samples=5, seed=0, discrete_check=False)


def test_restarts_are_compared_by_their_final_elbo():
    x, y = _blr_data(n=20)
    result = ps.select_structure(_blr_model, x, y, num_steps=30, lr=0.05, progress=False,
                                 num_evidence_samples=200, seed=0, num_restarts=3,
                                 discrete_check=False)
    assert len(result.restart_losses) == 3
    with result.param_scope():
        kept = -ps.elbo(_blr_model, result.guide, x, y, num_particles=2000).value
    # the kept restart's fresh ELBO is the best of the three (within Monte Carlo error)
    assert min(result.restart_losses) == pytest.approx(kept, abs=3.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"check_method": "aic"}, r"check_method 'aic'.*'elbo'"),
    ({"check_coverage": 0.0}, "check_coverage"),
    ({"check_steps": 0}, "check_steps"),
    ({"check_max_fits": 0}, "check_max_fits"),
    ({"discrete_check": "yes"}, "discrete_check"),
    ({"check_hessian": "block"}, r"check_hessian 'block'.*'kron'"),
])
def test_bad_check_arguments(kwargs, match):
    x, y = _blr_data(n=10)
    with pytest.raises(ValueError, match=match):
        ps.select_structure(_blr_model, x, y, num_steps=1, progress=False, **kwargs)


# --------------------------------------------------------------------------- starts


def _user_network(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([64, 16]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([16]).to_event(1))
    g = ps.structure("layer", ["relu", "tanh"])
    h = x @ w1 + b1
    h = g[..., 0] * torch.relu(h) + g[..., 1] * torch.tanh(h)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(h.sum(-1), 1.0), obs=y)


def test_user_weights_start_at_shrunk_prior_draws_not_at_zero():
    x = torch.randn(30, 64)
    trace = trace_model(_user_network, (x,), {})
    values = prior_draw_values(trace, ["w1", "b1"])
    glorot = math.sqrt(2.0 / (64 + 16))
    assert_close(values["w1"], glorot * trace.nodes["w1"]["value"], atol=1e-6)
    assert_close(values["b1"], torch.zeros(16))
    sites = ps.find_structural_sites(_user_network, x)
    with pyro.get_param_store().scope():
        guide = build_guide(_user_network, None, sites, (x,), {}, None)
        guide(x)
        loc, _ = guide[1]._get_loc_and_scale("w1")
        assert float(loc.detach().std()) == pytest.approx(glorot, rel=0.1)  # not all zero
    with pyro.get_param_store().scope():  # a warm start: the means given
        warm = build_guide(_user_network, None, sites, (x,), {}, None,
                           init_values={"w1": torch.ones(64, 16)})
        warm(x)
        assert_close(warm[1]._get_loc_and_scale("w1")[0], torch.ones(64, 16))


def test_warm_started_fits_start_from_the_values_given_and_leave_them_alone():
    from pyro_structsel.evidence.comparison import score_structure
    from pyro_structsel.evidence.methods import EvidenceMethod
    from pyro_structsel.infer.optim import FlatAdam
    from pyro_structsel.infer.scope import model_sites_and_params

    x, y = _blr_data(n=20)
    _, params = model_sites_and_params(_blr_model, (x, y), {})
    warm = {"w": torch.tensor([1.0, -1.0])}
    scales = {"w": torch.tensor([0.2, 0.3])}
    runs = [score_structure(_blr_model, {"first": "x", "second": "sin"}, (x, y), {},
                            EvidenceMethod.ELBO, guide=None, model_params=params, num_steps=5,
                            optim=lambda: FlatAdam({"lr": 0.1}), num_samples=5, seed=0,
                            init_values=warm, init_scales=scales) for _ in range(2)]
    assert runs[0].losses == runs[1].losses  # the first fit did not move the second's start
    assert_close(warm["w"], torch.tensor([1.0, -1.0]))
    assert_close(scales["w"], torch.tensor([0.2, 0.3]))
