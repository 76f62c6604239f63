"""Laplace with GGN curvature on user-written Pyro models, against exact answers."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_structsel as ps
from pyro_structsel.evidence.curvature import Curvature, HessianStructure, LogJoint
from pyro_structsel.evidence.fisher import FisherError
from pyro_structsel.evidence.laplace import find_mode
from pyro_structsel.model.full_data import num_blocks

ALPHA, BETA = 2.0, 1 / 0.75**2


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def blr_data(n=40, d=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    w = torch.linspace(-1, 1, d, dtype=torch.float64)
    return x, x @ w + BETA**-0.5 * torch.randn(n, generator=generator, dtype=torch.float64)


def user_blr(x, y=None, subsample_size=None):
    """Bayesian linear regression as a user writes it: ``x @ w`` inside a data plate."""
    w = pyro.sample("w", dist.Normal(0.0, ALPHA**-0.5).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as rows:
        pyro.sample("y", dist.Normal(x[rows] @ w, BETA**-0.5),
                    obs=None if y is None else y[rows])


def user_net(x, y=None, width=5, classes=3):
    """A one-hidden-layer tanh classifier with raw ``x @ W`` weights."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([x.shape[1], width]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([width]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([width, classes]).to_event(2))
    logits = torch.tanh(x @ w1 + b1) @ w2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=logits), obs=y)


def classifier_data(n=30, d=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


@pytest.mark.parametrize("subsample_size", [None, 7])
@pytest.mark.parametrize("structure", ["auto", "full", "kron"])
def test_ggn_laplace_is_the_closed_form_on_user_blr(float64, subsample_size, structure):
    # affine mean, Gaussian noise: the GGN is the Hessian, the Laplace exact (1e-8 nats);
    # K-FAC is exact for a single linear layer under a Gaussian likelihood
    x, y = blr_data()
    exact = ps.blr_log_evidence(x, y, prior_precision=ALPHA, noise_precision=BETA).value
    estimate = ps.laplace(user_blr, None, x, y, subsample_size=subsample_size,
                          hessian_structure=structure)
    assert abs(estimate.value - exact) < 1e-8
    assert estimate.diagnostics["num_data_blocks"] == (1 if subsample_size is None else 6)
    expected = "full" if structure == "auto" else structure
    assert estimate.diagnostics["hessian_structure"] == expected
    diag = ps.laplace(user_blr, None, x, y, hessian_structure="diag")
    assert diag.value < exact  # Hadamard: det(diag) >= det(full)


def test_full_data_counts_every_row_once(float64):
    x, y = blr_data(n=40)
    w = {"w": torch.tensor([0.3, -0.2, 0.1, 0.5])}
    whole = poutine.trace(poutine.condition(user_blr, data=w)).get_trace(x, y)
    blocks = num_blocks(user_blr, (x, y), {"subsample_size": 7})
    total = 0.0
    for block in range(blocks):
        trace = poutine.trace(ps.full_data(poutine.condition(user_blr, data=w), block)).get_trace(
            x, y, subsample_size=7)
        total += float(trace.log_prob_sum(lambda name, site: name == "y"))
    assert blocks == 6
    assert total == pytest.approx(float(whole.log_prob_sum(lambda n, s: n == "y")), abs=1e-10)


def brute_force_ggn(log_joint, mode):
    """Σ_n J_nᵀ F_n J_n with J from autograd and F = diag(p) - p pᵀ."""
    def logits(flat):
        return next(log_joint.traces(flat))[0].nodes["y"]["fn"].logits

    jac = torch.autograd.functional.jacobian(logits, mode)  # (n, C, d)
    p = torch.softmax(logits(mode), -1)
    fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("ncd,nce,nef->df", jac, fisher, jac)


def test_ggn_of_a_user_network_matches_autograd(float64):
    x, y = classifier_data()
    log_joint = LogJoint(user_net, (x, y), {})
    pyro.set_rng_seed(3)
    mode, _ = find_mode(log_joint.log_density, log_joint.prior_draw(0.5))
    curvature = Curvature(log_joint, mode, chunk_size=16)
    expected = brute_force_ggn(log_joint, mode)
    torch.testing.assert_close(curvature.ggn(), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(curvature.ggn_diagonal(), torch.diagonal(expected),
                               atol=1e-9, rtol=1e-9)
    # x @ w1 and h @ w2 are found; their exact diagonals need no JVP per coordinate
    factors = curvature.matrix_factors()
    assert sorted(factors) == ["w1", "w2"]
    for name, factor in factors.items():
        site = log_joint.site[name]
        torch.testing.assert_close(factor.diagonal.reshape(-1),
                                   torch.diagonal(expected)[site.start:site.stop],
                                   atol=1e-9, rtol=1e-9)
    prior = torch.autograd.functional.hessian(log_joint.log_prior, mode)
    torch.testing.assert_close(curvature.prior_precision(diagonal=False), -prior)
    torch.testing.assert_close(curvature.prior_precision(diagonal=True), -torch.diagonal(prior))


def test_network_structures_are_finite_and_ordered(float64):
    # Hadamard: diag <= full; every curvature finite on a nonlinear user network
    x, y = classifier_data()
    values = {s: ps.laplace(user_net, None, x, y, hessian_structure=s, seed=1).value
              for s in ("full", "diag", "kron")}
    assert all(math.isfinite(v) for v in values.values())
    assert values["diag"] <= values["full"] + 1e-9
    auto = ps.laplace(user_net, None, x, y, seed=1)
    assert auto.diagnostics["hessian_structure"] == "diag"  # nonlinear: diag by default
    assert auto.value == pytest.approx(values["diag"], abs=1e-9)


@pytest.mark.parametrize("likelihood", ["bernoulli", "poisson", "categorical"])
def test_ggn_is_the_hessian_for_canonical_links(float64, likelihood):
    x, y = classifier_data(n=40)

    def glm(x, y=None):
        classes = 3 if likelihood == "categorical" else 1
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], classes]).to_event(2))
        f = x @ w
        with pyro.plate("data", x.shape[0]):
            if likelihood == "bernoulli":
                pyro.sample("y", dist.Bernoulli(logits=f.squeeze(-1)), obs=y)
            elif likelihood == "poisson":
                pyro.sample("y", dist.Poisson(f.squeeze(-1).exp()), obs=y)
            else:
                pyro.sample("y", dist.Categorical(logits=f), obs=y)

    target = {"bernoulli": (y > 0).double(), "poisson": y.double(), "categorical": y}[likelihood]
    ggn = ps.laplace(glm, None, x, target)
    hessian = ps.laplace(glm, None, x, target, curvature="hessian")
    assert ggn.diagnostics["hessian_structure"] == "full"
    assert ggn.value == pytest.approx(hessian.value, abs=1e-8)


def test_indefinite_hessian_falls_back_to_the_ggn(float64):
    # At the saddle w1 = w2 = 0 of y ~ N(w1 w2, 0.1) the Hessian is indefinite
    def product(y=None):
        w1 = pyro.sample("w1", dist.Normal(0.0, 3.0))
        w2 = pyro.sample("w2", dist.Normal(0.0, 3.0))
        pyro.sample("y", dist.Normal(w1 * w2, 0.1), obs=y)

    y = torch.tensor(2.0)
    start = {"w1": torch.tensor(0.0), "w2": torch.tensor(0.0)}
    with pytest.warns(ps.LaplaceWarning, match="not positive definite.*Gauss-Newton"):
        estimate = ps.laplace(product, start, y, curvature="hessian", mode_tolerance=math.inf)
    assert estimate.diagnostics["fallback"] and estimate.diagnostics["hessian_min_eigenvalue"] < 0
    assert math.isfinite(estimate.value)
    # the GGN there is the prior precision alone: log p(D, 0) + log(2π) - ½ log det(I/9)
    expected = float(dist.Normal(0.0, 0.1).log_prob(y) + 2 * dist.Normal(0.0, 3.0).log_prob(
        torch.tensor(0.0))) + math.log(2 * math.pi) + math.log(9.0)
    assert estimate.value == pytest.approx(expected, abs=1e-10)


def test_monte_carlo_fisher_for_a_likelihood_without_a_closed_form(float64):
    # Gumbel(loc, β): Fisher information of loc is 1/β²
    x, _ = blr_data(n=200)

    def gumbel(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Gumbel(x @ w, 2.0), obs=y)

    y = dist.Gumbel(x @ torch.ones(4), 2.0).sample()
    log_joint = LogJoint(gumbel, (x, y), {}, fisher_samples=400)
    (observed,) = Curvature(log_joint, torch.zeros(4)).observed
    fisher = (observed.sqrt_fisher.square().sum(-1)).mean()
    assert fisher == pytest.approx(0.25, rel=0.05)


def test_bad_models_name_the_site(float64):
    x, y = blr_data(n=10)

    def factor_likelihood(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        pyro.factor("fit", -((x @ w - y) ** 2).sum())

    with pytest.raises(FisherError, match="'fit' is a pyro.factor.*curvature='hessian'"):
        ps.laplace(factor_likelihood, None, x, y)
    assert math.isfinite(ps.laplace(factor_likelihood, None, x, y, curvature="hessian").value)

    def discrete_latent(x, y):
        k = pyro.sample("k", dist.Categorical(torch.ones(3)))
        pyro.sample("y", dist.Normal(k.double(), 1.0).expand([len(y)]).to_event(1), obs=y)

    with pytest.raises(ValueError, match="'k' is discrete"):
        ps.laplace(discrete_latent, None, x, y)

    def local_latent(x, y):
        with pyro.plate("data", len(y), subsample_size=5) as rows:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[rows])

    with pytest.raises(ValueError, match="'z' sits in the subsampled plate 'data'"):
        ps.laplace(local_latent, None, x, y)
    with pytest.raises(ValueError, match="hessian_structure .* 'kron'"):
        ps.laplace(user_blr, None, x, y, hessian_structure="lowrank")
    with pytest.raises(ValueError, match="curvature 'exact'"):
        ps.laplace(user_blr, None, x, y, curvature="exact")


def test_hessian_structures_are_an_enum():
    assert [s.value for s in HessianStructure] == ["full", "diag", "kron"]


def test_laplace_proposal_makes_iwae_exact_on_user_blr(float64):
    # the proposal is the posterior: every weight is p(D), the estimate exact with no variance
    x, y = blr_data()
    exact = ps.blr_log_evidence(x, y, prior_precision=ALPHA, noise_precision=BETA).value
    estimate = ps.iwae(user_blr, None, x, y, subsample_size=7, proposal="laplace",
                       num_samples=300)
    assert abs(estimate.value - exact) < 1e-8 and estimate.se < 1e-8
    assert estimate.diagnostics["ess"] == pytest.approx(300)
    assert estimate.diagnostics["hessian_structure"] == "full"


def test_laplace_proposal_on_a_network_reports_its_khat(float64):
    x, y = classifier_data()
    laplace = ps.laplace(user_net, None, x, y, hessian_structure="full", seed=1)
    pyro.set_rng_seed(0)
    with pytest.warns(ps.ParetoKWarning):  # a network's posterior is far from Gaussian
        estimate = ps.iwae(user_net, None, x, y, proposal="laplace", num_samples=400,
                           laplace_options={"seed": 1})
    assert estimate.diagnostics["khat"] > 0.7
    assert estimate.diagnostics["laplace"] == pytest.approx(laplace.value)
    assert math.isfinite(estimate.value) and math.isfinite(estimate.diagnostics["khat"])
    assert 1 <= estimate.diagnostics["ess"] <= 400


def test_empirical_bayes_prior_scale_is_mackays_optimum(float64):
    # one factor on the Gaussian prior scale of w: its optimum is the alpha maximising the
    # closed-form evidence (MacKay's fixed point alpha = gamma / |w*|^2)
    from pyro_structsel.evidence.empirical_bayes import empirical_bayes

    x, y = blr_data()
    estimate = empirical_bayes(user_blr, None, x, y, prior_scales=True)
    factor = estimate.diagnostics["hyperparameters"]["w.prior_scale"]
    alpha = ALPHA / factor**2
    grid = torch.linspace(math.log(alpha) - 0.01, math.log(alpha) + 0.01, 201).exp()
    values = [ps.blr_log_evidence(x, y, prior_precision=float(a), noise_precision=BETA).value
              for a in grid]
    assert estimate.value == pytest.approx(max(values), abs=1e-7)
    assert max(values) == pytest.approx(values[100], abs=1e-7)  # the optimum is at alpha
    assert estimate.diagnostics["empirical_bayes"]["converged"]
    with pytest.raises(ValueError, match=r"Unknown hyperparameter\(s\) \['beta'\].*reads \[\]"):
        empirical_bayes(user_blr, None, x, y, hyperparameters=["beta"])
    with pytest.raises(ValueError, match="Nothing to optimise"):
        empirical_bayes(user_blr, None, x, y)
