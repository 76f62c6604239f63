"""compare_structures: the ranked table, its invariants and its errors."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_structsel as ps

ALPHA, BETA = 1.0, 25.0


def two_site_model(x, y=None):
    """Two structural sites: the basis (sin or linear) and whether to add a constant."""
    basis = ps.structure("basis", ["linear", "sin"])
    offset = ps.structure("offset", 2)
    w = pyro.sample("w", dist.Normal(torch.zeros(2), ALPHA**-0.5).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, ALPHA**-0.5))
    # integer indices keep a particle dimension (..., 1) that broadcasts against the data
    feature = basis[..., 0] * x + basis[..., 1] * torch.sin(3 * x)
    mean = w[..., 0] * feature + offset[..., 1] * b
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mean, BETA**-0.5), obs=y)


@pytest.fixture
def data():
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 0.8 * torch.sin(3 * x) + 0.5 + BETA**-0.5 * torch.randn(30, generator=generator,
                                                                  dtype=torch.float64)
    yield x, y
    torch.set_default_dtype(torch.float32)


def exact(x, y, basis, offset):
    feature = torch.sin(3 * x) if basis == "sin" else x
    columns = [feature] + ([torch.ones_like(x)] if offset == 1 else [])
    return ps.blr_log_evidence(torch.stack(columns, -1), y, prior_precision=ALPHA,
                               noise_precision=BETA).value


def test_table_ranks_all_vertices_with_exact_laplace(data):
    x, y = data
    table = ps.compare_structures(two_site_model, x, y, progress=False, num_steps=200)
    assert list(table.columns) == ["log_evidence", "se", "log_bayes_factor", "probability",
                                   "khat", "ess", "converged", "flagged", "hyperparameters",
                                   "structure", "note"]
    assert not table["flagged"].any() and table["converged"].all()
    assert len(table) == 4
    assert table.index[0] == "basis=sin, offset=1"
    assert table["log_evidence"].is_monotonic_decreasing
    assert table["log_bayes_factor"].iloc[0] == 0 and (table["log_bayes_factor"] <= 0).all()
    assert math.isclose(table["probability"].sum(), 1.0, rel_tol=1e-12)
    for label, row in table.iterrows():
        s = row["structure"]
        assert label == ps.structure_label(s)
        assert abs(row["log_evidence"] - exact(x, y, s["basis"], s["offset"])) < 1e-6
        # unused weight w[1] and (offset=0) b are integrated out exactly, not fitted
    odds = table["probability"].iloc[0] / table["probability"].iloc[1]
    assert math.isclose(math.log(odds), -table["log_bayes_factor"].iloc[1], rel_tol=1e-9)
    assert set(table.attrs["estimates"]) == set(table.index)


def test_given_structures_by_label_or_index(data):
    x, y = data
    table = ps.compare_structures(two_site_model, x, y, progress=False, num_steps=100,
                                  structures=[{"basis": "linear", "offset": 1},
                                              {"basis": 1, "offset": 0}])
    assert sorted(table.index) == ["basis=linear, offset=1", "basis=sin, offset=0"]


def test_cross_validation_method(data):
    x, y = data
    table = ps.compare_structures(two_site_model, x, y, method="cross_validation", folds=3,
                                  num_steps=300, lr=0.05, num_samples=200, seed=0,
                                  progress=False,
                                  structures=[{"basis": "sin", "offset": 1},
                                              {"basis": "linear", "offset": 0}])
    assert table.index[0] == "basis=sin, offset=1"
    assert all(est.method == "cross_validation" for est in table.attrs["estimates"].values())


@pytest.mark.parametrize("structures, match", [
    ([{"basis": "cubic", "offset": 0}], "Unknown option 'cubic' for structural site 'basis'"),
    ([{"depth": 1, "basis": "sin", "offset": 0}], r"Unknown structural site\(s\) \['depth'\]"),
    ([{"basis": "sin"}], r"gives no option for site\(s\) \['offset'\]"),
    (["basis=sin"], "Expected each structure to be a dict"),
])
def test_bad_structures(data, structures, match):
    x, y = data
    with pytest.raises(ValueError, match=match):
        ps.compare_structures(two_site_model, x, y, structures=structures, progress=False)


def test_unknown_method_lists_valid_ones(data):
    x, y = data
    with pytest.raises(ValueError, match="Unknown method.*'bic'.*'laplace'"):
        ps.compare_structures(two_site_model, x, y, method="bic", progress=False)


def test_network_models_use_gauss_newton_laplace():
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = torch.tanh(x @ torch.randn(3, 1)).squeeze(-1) + 0.1 * torch.randn(40)
    model = ps.NetworkModel(ps.one_hidden_layer(3, 1, hidden=4, activations=("tanh", "sigmoid")),
                            likelihood="normal", noise_scale=0.1)
    table = ps.compare_structures(model, x, y, progress=False, hessian_structure="diag")
    assert len(table) == 2 and math.isclose(table["probability"].sum(), 1.0, rel_tol=1e-9)
    for estimate in table.attrs["estimates"].values():
        assert estimate.method == "laplace"
        assert estimate.diagnostics["hessian_structure"] == "diag"


def test_hessian_structure_is_checked(data):
    x, y = data
    with pytest.raises(ValueError, match="hessian_structure .*'full', 'diag', 'kron'"):
        ps.compare_structures(two_site_model, x, y, hessian_structure="lowrank", progress=False)


@pytest.mark.filterwarnings("ignore::pyro_structsel.evidence.comparison.FlaggedEstimateWarning")
def test_leaves_the_global_param_store_alone():
    import pyro

    torch.manual_seed(0)
    x = torch.randn(30, 2)
    y = torch.tanh(x.sum(-1)) + 0.1 * torch.randn(30)
    pyro.param("user_param", torch.tensor(3.0))
    model = ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=3, activations=("tanh", "identity")),
                            likelihood="normal", noise_scale=0.1)
    for method in ("elbo", "laplace"):
        ps.compare_structures(model, x, y, method=method, num_steps=5, num_samples=10,
                              progress=False)
    ps.cross_validation(model, x, y, folds=2, num_steps=5, num_samples=10)
    assert list(pyro.get_param_store().keys()) == ["user_param"]
    assert float(pyro.param("user_param").detach()) == 3.0


def sine_model(x, y=None):
    """Bishop's sine data, two bases, with the user's own prior precision and noise."""
    alpha = pyro.param("alpha", torch.tensor(1.0), constraint=dist.constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(0.3), constraint=dist.constraints.positive)
    basis = ps.structure("basis", ["poly", "fourier"])
    poly = torch.stack([x**k for k in range(4)], -1)
    fourier = torch.stack([torch.ones_like(x), torch.sin(3 * x), torch.cos(3 * x),
                           torch.sin(6 * x)], -1)
    w = pyro.sample("w", dist.Normal(0.0, alpha**-0.5).expand([4]).to_event(1))
    features = basis[..., :1] * poly + basis[..., 1:] * fourier
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(features @ w, sigma), obs=y)


def sine_features(x, basis):
    if basis == "poly":
        return torch.stack([x**k for k in range(4)], -1)
    return torch.stack([torch.ones_like(x), torch.sin(3 * x), torch.cos(3 * x),
                        torch.sin(6 * x)], -1)


@pytest.mark.parametrize("rule", ["fit", "fixed"])
def test_every_row_is_scored_at_the_hyperparameters_it_reports(data, rule):
    # Laplace is exact here, so each row must equal the closed form at the alpha and sigma
    # in its own 'hyperparameters' cell: the same model the fit (and every estimator) saw
    x, y = data
    table = ps.compare_structures(sine_model, x, y, hyperparameters=rule, num_steps=300,
                                  lr=0.05, progress=False)
    assert table.attrs["hyperparameter_rule"] == rule
    for label, row in table.iterrows():
        h = row["hyperparameters"]
        if rule == "fixed":
            assert h == pytest.approx({"alpha": 1.0, "sigma": 0.3})
        else:
            assert abs(h["alpha"] - 1.0) > 0.05  # learnt with q
        exact = ps.blr_log_evidence(sine_features(x, row["structure"]["basis"]), y,
                                    prior_precision=h["alpha"],
                                    noise_precision=h["sigma"] ** -2).value
        assert row["log_evidence"] == pytest.approx(exact, abs=1e-8), label


def test_unreliable_rows_are_flagged_with_one_warning(data):
    x, y = data
    with pytest.warns(ps.FlaggedEstimateWarning, match="k-hat > 0.7: .*not converged: .*'basis=linear, offset=0'"):
        table = ps.compare_structures(two_site_model, x, y, method="iwae", num_steps=3,
                                      num_samples=200, proposal="guide", progress=False)
    assert table["flagged"].all() and not table["converged"].any()
    assert (table["khat"].notna() & table["ess"].between(1, 200)).all()
    assert len(table.attrs["estimates"]) == 4


def test_a_nan_evidence_gets_no_probability():
    from pyro_structsel.evidence.comparison import evidence_table

    estimates = {"a": ps.Estimate(-3.0, 0.1, 10, "iwae", {"khat": 0.2, "ess": 8.0}),
                 "b": ps.Estimate(float("nan"), float("nan"), 0, "laplace", {}),
                 "c": ps.Estimate(-4.0, 0.0, 0, "laplace", {"converged": False})}
    table = evidence_table(estimates, {k: {"s": k} for k in estimates})
    assert list(table.index) == ["a", "c", "b"]
    assert math.isnan(table.loc["b", "probability"]) and table.loc["b", "flagged"]
    assert table.loc["a", "probability"] + table.loc["c", "probability"] == pytest.approx(1.0)
    assert table.loc["c", "flagged"] and not table.loc["a", "flagged"]


def closed_form_maximum(x, y, basis):
    """max over (alpha, sigma) of the BLR evidence, by L-BFGS on their logs."""
    features = sine_features(x, basis)
    n, d = features.shape
    logs = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)

    def negative():  # Bishop (3.86), differentiable in log alpha, log beta
        alpha, beta = logs.exp()
        a = alpha * torch.eye(d) + beta * features.T @ features
        mean = beta * torch.linalg.solve(a, features.T @ y)
        energy = beta / 2 * (y - features @ mean).square().sum() + alpha / 2 * mean @ mean
        return -(d / 2 * alpha.log() + n / 2 * beta.log() - energy - 0.5 * torch.logdet(a)
                 - n / 2 * math.log(2 * math.pi))

    optimizer = torch.optim.LBFGS([logs], max_iter=200, tolerance_grad=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = negative()
        value.backward()
        return value

    optimizer.step(closure)
    alpha, beta = logs.detach().exp().tolist()
    return -float(negative().detach()), alpha, beta**-0.5


def test_empirical_bayes_rows_are_each_structures_own_evidence_maximum(data):
    # rule "evidence": each row is the Laplace evidence (exact here) at the alpha and sigma
    # maximising it, which is the closed-form maximum of the evidence over both
    x, y = data
    table = ps.compare_structures(sine_model, x, y, hyperparameters="evidence", num_steps=150,
                                  lr=0.05, progress=False)
    for label, row in table.iterrows():
        best, alpha, sigma = closed_form_maximum(x, y, row["structure"]["basis"])
        assert row["log_evidence"] == pytest.approx(best, abs=1e-6), label
        assert row["hyperparameters"]["alpha"] == pytest.approx(alpha, rel=1e-3)
        assert row["hyperparameters"]["sigma"] == pytest.approx(sigma, rel=1e-3)
        assert not row["flagged"]
