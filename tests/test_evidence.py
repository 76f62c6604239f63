"""Evidence estimators against closed forms: polynomial regression and conjugate models."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

import pyro_structsel as ps
from pyro_structsel.infer.svi import fit

ALPHA, BETA, DEGREES = 0.5, 25.0, 10


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def polynomial_data(n=25, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1
    y = torch.sin(math.pi * x) + BETA**-0.5 * torch.randn(n, generator=generator,
                                                           dtype=torch.float64)
    return x, y


def polynomial_family(x, y=None):
    """One edge, ten candidates: polynomials of degree 0..9, each with its own weights."""
    gamma = ps.structure("degree", [str(k) for k in range(DEGREES)])
    mean = 0.0
    for k in range(DEGREES):
        w = pyro.sample(f"w{k}", dist.Normal(torch.zeros(k + 1), ALPHA**-0.5).to_event(1))
        mean = mean + gamma[..., [k]] * (ps.polynomial_features(x, k) * w).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mean, BETA**-0.5), obs=y)


def exact_evidence(x, y, degree):
    return ps.blr_log_evidence(ps.polynomial_features(x, degree), y, prior_precision=ALPHA,
                               noise_precision=BETA).value


def test_laplace_reproduces_closed_form_for_every_degree(float64):
    x, y = polynomial_data()
    # the GGN of an affine model is its Hessian: exact to 1e-8 nats at every degree
    table = ps.compare_structures(polynomial_family, x, y, method="laplace", num_steps=100,
                                  progress=False)
    assert len(table) == DEGREES
    for _, row in table.iterrows():
        degree = int(row["structure"]["degree"])
        assert abs(row["log_evidence"] - exact_evidence(x, y, degree)) < 1e-8, degree
        assert not row["flagged"]


def test_iwae_with_its_default_proposal_is_exact_or_flagged(float64):
    # the Laplace proposal of an affine model is its posterior: within 3 se + 0.05 nats of
    # the closed form at every degree (in fact to 1e-6), never a flagged row
    x, y = polynomial_data()
    table = ps.compare_structures(polynomial_family, x, y, method="iwae", num_steps=100,
                                  num_samples=200, progress=False,
                                  structures=[{"degree": str(k)} for k in (0, 3, 5, 9)])
    for label, row in table.iterrows():
        error = abs(row["log_evidence"] - exact_evidence(x, y, int(row["structure"]["degree"])))
        assert error < 1e-6 and error <= 3 * row["se"] + 0.05, label
        assert not row["flagged"] and row["ess"] == pytest.approx(200)


@pytest.mark.slow
def test_iwae_with_defaults_on_bishops_polynomials_is_exact_or_flagged(float64):
    # the case: Bishop's sin(2 pi x) data, N = 25, alpha = 5e-3, beta = 11.1; IWAE
    # with every default reported -46.1 +- 0.5 at degree 3 (exact -24.6), unflagged
    alpha, beta = 5e-3, 11.1
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(25, generator=generator, dtype=torch.float64)
    y = torch.sin(2 * math.pi * x) + beta**-0.5 * torch.randn(25, generator=generator,
                                                               dtype=torch.float64)

    def bishop(x, y=None):
        gamma = ps.structure("degree", [str(k) for k in range(DEGREES)])
        mean = 0.0
        for k in range(DEGREES):
            w = pyro.sample(f"w{k}", dist.Normal(torch.zeros(k + 1), alpha**-0.5).to_event(1))
            mean = mean + gamma[..., [k]] * (ps.polynomial_features(x, k) * w).sum(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(mean, beta**-0.5), obs=y)

    table = ps.compare_structures(bishop, x, y, method="iwae", progress=False)
    assert len(table) == DEGREES
    for label, row in table.iterrows():
        exact = ps.blr_log_evidence(ps.polynomial_features(x, int(row["structure"]["degree"])),
                                    y, prior_precision=alpha, noise_precision=beta).value
        assert row["flagged"] or abs(row["log_evidence"] - exact) <= 3 * row["se"] + 0.05, label


def _check_bounds(table, x, y):
    for method in ("elbo", "iwae"):
        for _, row in table[method].iterrows():
            exact = exact_evidence(x, y, int(row["structure"]["degree"]))
            assert row["log_evidence"] <= exact + 2 * row["se"] + 1e-6, (method, row.name)
            if method == "iwae":
                assert abs(row["log_evidence"] - exact) < 0.3, row.name
    for label in table["elbo"].index:
        elbo, iwae = table["elbo"].loc[label], table["iwae"].loc[label]
        assert elbo["log_evidence"] <= iwae["log_evidence"] + 2 * iwae["se"], label


def _elbo_iwae_tables(x, y, degrees, num_steps):
    # q must reach the posterior of ill-conditioned monomial bases (degree 9): 8 particles
    # and a learning rate decaying 20-fold over the fit
    structures = [{"degree": str(k)} for k in degrees]

    def optim():
        return pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.05 ** (1 / num_steps)})

    return {method: ps.compare_structures(
        polynomial_family, x, y, method=method, structures=structures,
        guide=AutoMultivariateNormal, num_steps=num_steps, optim=optim, num_particles=8,
        num_samples=2000, seed=0, progress=False, proposal="guide")
        for method in ("elbo", "iwae")}


def test_iwae_close_to_and_elbo_below_closed_form(float64):
    # Tolerance: IWAE with K = 2000 within 0.3 nats of the exact evidence and not above it
    # beyond 2 standard errors; the ELBO below both.
    x, y = polynomial_data()
    _check_bounds(_elbo_iwae_tables(x, y, (0, 1, 3), num_steps=1000), x, y)


@pytest.mark.slow
def test_iwae_close_to_and_elbo_below_closed_form_every_degree(float64):
    x, y = polynomial_data()
    _check_bounds(_elbo_iwae_tables(x, y, range(DEGREES), num_steps=3000), x, y)


def test_inert_sites_are_the_candidates_left_out(float64):
    x, y = polynomial_data()
    fixed = ps.fix_structure(polynomial_family, {"degree": "3"})
    assert ps.inert_sites(fixed, x, y) == [f"w{k}" for k in range(DEGREES) if k != 3]
    assert ps.inert_sites(polynomial_family, x, y) == []


# --- conjugate models (as in Pyro's own inference tests) -------------------------------

def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.5), 2.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, 1.5), obs=data)


def normal_normal_evidence(data):
    n = len(data)
    cov = 1.5**2 * torch.eye(n) + 2.0**2 * torch.ones(n, n)
    return float(dist.MultivariateNormal(torch.full((n,), 0.5), cov).log_prob(data))


def beta_bernoulli(data):
    p = pyro.sample("p", dist.Beta(torch.tensor(2.0), 3.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Bernoulli(p), obs=data)


def beta_bernoulli_evidence(data):
    s, n = float(data.sum()), len(data)

    def log_beta(a, b):
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    return log_beta(2.0 + s, 3.0 + n - s) - log_beta(2.0, 3.0)


def gamma_poisson(data):
    rate = pyro.sample("rate", dist.Gamma(torch.tensor(3.0), 2.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Poisson(rate), obs=data)


def gamma_poisson_evidence(data):
    a, b, s, n = 3.0, 2.0, float(data.sum()), len(data)
    return (a * math.log(b) - math.lgamma(a) + math.lgamma(a + s) - (a + s) * math.log(b + n)
            - float(torch.lgamma(data + 1).sum()))


def _data(name):
    generator = torch.Generator().manual_seed(1)
    if name == "normal_normal":
        return 1.0 + 1.5 * torch.randn(40, generator=generator, dtype=torch.float64)
    if name == "beta_bernoulli":
        return (torch.rand(60, generator=generator, dtype=torch.float64) < 0.3).double()
    return torch.poisson(torch.full((50,), 2.5, dtype=torch.float64), generator=generator)


CONJUGATE = {
    "normal_normal": (normal_normal, normal_normal_evidence, 1e-6),
    "beta_bernoulli": (beta_bernoulli, beta_bernoulli_evidence, 0.02),
    "gamma_poisson": (gamma_poisson, gamma_poisson_evidence, 0.02),
}


# k-hat is unstable when q is close to the posterior (near-constant weights: the Pareto fit
# to a tail of tiny range swings, 0.2-1.0 across fits here); the ESS is the check kept.
@pytest.mark.filterwarnings("ignore::pyro_structsel.ParetoKWarning")
@pytest.mark.parametrize("name", sorted(CONJUGATE))
def test_estimators_on_conjugate_models(float64, name):
    # Tolerances: Laplace exact for Normal-Normal (1e-6), O(1/n) otherwise (0.02 nats at
    # n = 50-60); IWAE (K = 4000) within 0.05 nats; ELBO below the evidence, within 0.5.
    model, closed_form, laplace_tol = CONJUGATE[name]
    data = _data(name)
    exact = closed_form(data)
    assert abs(ps.laplace(model, None, data).value - exact) < laplace_tol
    guide = AutoNormal(model)
    fit(model, guide, (data,), num_steps=800, optim=pyro.optim.Adam({"lr": 0.02}),
        progress=False)
    iwae = ps.iwae(model, guide, data, num_samples=4000)
    elbo = ps.elbo(model, guide, data, num_particles=4000)
    assert abs(iwae.value - exact) < 0.05
    assert iwae.value <= exact + 2 * iwae.se + 1e-9
    assert elbo.value <= exact + 2 * elbo.se and elbo.value > exact - 0.5
    assert iwae.diagnostics["ess"] > 1000


def _exact_posterior_guide(features, targets):
    posterior = ps.blr_posterior(features, targets, prior_precision=ALPHA, noise_precision=BETA)
    mean, cov = posterior.mean, posterior.covariance

    def guide(x, y=None):
        pyro.sample("w", dist.MultivariateNormal(mean, cov))

    return guide


def unsafe_blr(x, y=None):
    """BLR written as a user would: ``x @ w`` breaks under vectorised particles."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), ALPHA**-0.5).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w, BETA**-0.5), obs=y)


def test_estimators_fall_back_to_a_loop_on_unsafe_models(float64):
    # With q the exact posterior every log weight equals log p(D): both bounds are exact.
    x, y = polynomial_data(n=20)
    features = ps.polynomial_features(x, 2)
    exact = ps.blr_log_evidence(features, y, prior_precision=ALPHA, noise_precision=BETA).value
    guide = _exact_posterior_guide(features, y)
    with pytest.warns(ps.VectorizationWarning):
        elbo = ps.elbo(unsafe_blr, guide, features, y, num_particles=50)
    with pytest.warns(ps.VectorizationWarning):
        iwae = ps.iwae(unsafe_blr, guide, features, y, num_samples=60)
    assert not elbo.diagnostics["vectorized"] and not iwae.diagnostics["vectorized"]
    assert abs(elbo.value - exact) < 1e-6 and abs(iwae.value - exact) < 1e-6
    assert abs(ps.laplace(unsafe_blr, None, features, y).value - exact) < 1e-6


def test_estimate_evidence_by_name(float64):
    x, y = polynomial_data(n=20)
    features = ps.polynomial_features(x, 2)
    exact = ps.blr_log_evidence(features, y, prior_precision=ALPHA, noise_precision=BETA).value
    guide = _exact_posterior_guide(features, y)
    for name in ("elbo", "iwae", "laplace"):
        estimate = ps.estimate_evidence(name, unsafe_blr, guide, features, y, num_samples=60,
                                        vectorize=False) if name != "laplace" else \
            ps.estimate_evidence(name, unsafe_blr, guide, features, y)
        assert estimate.method == name
        assert abs(estimate.value - exact) < 1e-6
    with pytest.raises(ValueError, match="Unknown evidence estimator 'bic'.*'elbo'.*'iwae'"):
        ps.estimate_evidence("bic", unsafe_blr, guide, features, y)
