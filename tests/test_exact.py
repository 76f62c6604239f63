"""Closed-form evidence of Bayesian linear regression (PRML eq. 3.86), checked independently."""

from __future__ import annotations

import functools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_structsel.evidence.estimate import Estimate
from pyro_structsel.evidence import elbo
from pyro_structsel.evidence.exact import (
    blr_log_evidence,
    blr_model,
    blr_posterior,
    polynomial_features,
)

from common import assert_close


def _data(num_data: int, num_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(num_data, num_features, generator=gen, dtype=torch.float64)
    w = torch.randn(num_features, generator=gen, dtype=torch.float64)
    t = phi @ w + 0.5 * torch.randn(num_data, generator=gen, dtype=torch.float64)
    return phi, t


def _marginal_log_density(phi: torch.Tensor, t: torch.Tensor,
                          alpha: torch.Tensor | float, beta: float) -> float:
    """ln N(t | 0, β⁻¹I + Φ diag(α)⁻¹ Φᵀ): the evidence with w integrated out directly."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(phi.shape[1])
    cov = torch.eye(phi.shape[0], dtype=torch.float64) / beta + (phi / alpha) @ phi.T
    mvn = torch.distributions.MultivariateNormal(torch.zeros(phi.shape[0], dtype=torch.float64),
                                                 covariance_matrix=cov)
    return float(mvn.log_prob(t))


@pytest.mark.parametrize("num_data,num_features", [(1, 1), (20, 3), (50, 8), (5, 12)])
@pytest.mark.parametrize("per_weight", [False, True])
def test_evidence_equals_marginal_gaussian(num_data, num_features, per_weight):
    phi, t = _data(num_data, num_features)
    alpha = (torch.linspace(0.1, 10.0, num_features, dtype=torch.float64) if per_weight
             else 0.7)
    beta = 3.0
    est = blr_log_evidence(phi, t, prior_precision=alpha, noise_precision=beta)
    assert isinstance(est, Estimate)
    assert est.method == "exact" and est.se == 0.0 and est.num_samples == 0
    assert isinstance(est.value, float)
    assert abs(est.value - _marginal_log_density(phi, t, alpha, beta)) < 1e-8


def test_polynomial_evidence_equals_marginal_gaussian():
    """Bishop's setting: ill-conditioned polynomial features up to degree 9."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(10, generator=gen, dtype=torch.float64)
    t = torch.sin(2 * math.pi * x) + 0.3 * torch.randn(10, generator=gen, dtype=torch.float64)
    for degree in range(10):
        phi = polynomial_features(x, degree)
        est = blr_log_evidence(phi, t, prior_precision=5e-3, noise_precision=11.1)
        assert abs(est.value - _marginal_log_density(phi, t, 5e-3, 11.1)) < 1e-8, degree


def test_diagnostics_posterior_and_effective_parameters():
    phi, t = _data(30, 4)
    alpha, beta = 2.0, 5.0
    est = blr_log_evidence(phi, t, prior_precision=alpha, noise_precision=beta)
    precision = alpha * torch.eye(4, dtype=torch.float64) + beta * phi.T @ phi
    mean = beta * torch.linalg.solve(precision, phi.T @ t)
    d = est.diagnostics
    assert_close(d["posterior_mean"], mean, atol=1e-10, rtol=1e-10)
    assert_close(d["posterior_covariance"], torch.linalg.inv(precision), atol=1e-10, rtol=1e-10)
    # PRML eq. 3.91: γ = Σ λ_i / (α + λ_i), λ_i the eigenvalues of βΦᵀΦ
    lam = torch.linalg.eigvalsh(beta * phi.T @ phi)
    assert abs(d["effective_num_parameters"] - float((lam / (alpha + lam)).sum())) < 1e-10
    assert 0 < d["effective_num_parameters"] < 4
    assert abs(d["data_fit"] - 0.5 * beta * float((t - phi @ mean).pow(2).sum())) < 1e-10
    assert abs(d["weight_penalty"] - 0.5 * alpha * float(mean @ mean)) < 1e-10
    assert abs(d["log_det_precision"] - float(torch.logdet(precision))) < 1e-10
    assert d["num_data"] == 30 and d["num_features"] == 4
    # eq. 3.86 reassembled from its terms
    value = (2 * math.log(alpha) + 15 * math.log(beta) - d["data_fit"] - d["weight_penalty"]
             - 0.5 * d["log_det_precision"] - 15 * math.log(2 * math.pi))
    assert abs(est.value - value) < 1e-10


def test_chain_rule_of_predictive_densities():
    """ln p(t) = Σ_n ln p(t_n | t_<n): the posterior predictive agrees with the evidence."""
    phi, t = _data(12, 3, seed=2)
    alpha = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    total = 0.0
    for n in range(12):
        post = blr_posterior(phi[:n], t[:n], prior_precision=alpha, noise_precision=2.0)
        total += float(post.log_predictive(phi[n:n + 1], t[n:n + 1]))
    est = blr_log_evidence(phi, t, prior_precision=alpha, noise_precision=2.0)
    assert abs(total - est.value) < 1e-8
    prior = blr_posterior(phi[:0], t[:0], prior_precision=alpha, noise_precision=2.0)
    assert abs(float(prior.log_predictive(phi, t)) - est.value) < 1e-8
    # marginal (pointwise) predictive of one point equals the joint one
    one = prior.log_predictive(phi[:1], t[:1], pointwise=True)
    assert one.shape == (1,) and abs(float(one[0]) - float(prior.log_predictive(phi[:1], t[:1]))
                                      ) < 1e-10


def test_float32_and_numpy_inputs_computed_in_float64():
    phi, t = _data(20, 3)
    ref = blr_log_evidence(phi, t, prior_precision=1.0, noise_precision=2.0).value
    from_f32 = blr_log_evidence(phi.float(), t.float(), prior_precision=1.0, noise_precision=2.0)
    from_np = blr_log_evidence(phi.numpy(), t.numpy(), prior_precision=np.ones(3),
                               noise_precision=2)
    assert abs(from_f32.value - ref) < 1e-4
    assert from_f32.diagnostics["posterior_mean"].dtype == torch.float64
    assert abs(from_np.value - ref) < 1e-12


def test_evidence_of_the_pyro_model_under_the_exact_posterior():
    """blr_model is the closed form's model: with q = p(w | t) every log weight is ln p(t)."""
    phi, t = _data(25, 3, seed=3)
    alpha = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)
    beta = 4.0
    exact = blr_log_evidence(phi, t, prior_precision=alpha, noise_precision=beta)
    model = functools.partial(blr_model, prior_precision=alpha, noise_precision=beta)
    mean = exact.diagnostics["posterior_mean"]
    cov = exact.diagnostics["posterior_covariance"]

    def posterior_guide(features, targets=None):
        pyro.sample("w", dist.MultivariateNormal(mean, covariance_matrix=cov))

    est = elbo(model, posterior_guide, phi, t, num_particles=64)
    assert abs(est.value - exact.value) < 1e-8
    assert est.se < 1e-8
    with pyro.plate("draws", 5, dim=-2):  # vectorised draws broadcast against the data plate
        trace = pyro.poutine.trace(model).get_trace(phi, t)
    assert trace.nodes["y"]["fn"].batch_shape == (5, 25)


@pytest.mark.parametrize("kwargs,match", [
    (dict(features=torch.zeros(3), targets=torch.zeros(3)), "matrix"),
    (dict(features=torch.zeros(3, 0), targets=torch.zeros(3)), "at least one feature"),
    (dict(features=torch.zeros(3, 2), targets=torch.zeros(4)), "one target per row"),
    (dict(features=torch.zeros(3, 2), targets=torch.zeros(3, 1)), "vector"),
    (dict(features=torch.full((3, 2), math.nan), targets=torch.zeros(3)), "NaN"),
    (dict(features=torch.zeros(3, 2), targets=torch.tensor([0.0, math.inf, 0.0])), "NaN"),
    (dict(prior_precision=0.0), "prior_precision > 0"),
    (dict(prior_precision=torch.tensor([1.0, -1.0])), "prior_precision > 0"),
    (dict(prior_precision=torch.ones(3)), "length 2"),
    (dict(prior_precision="a"), "prior_precision"),
    (dict(noise_precision=-1.0), "noise_precision > 0"),
    (dict(noise_precision=math.inf), "noise_precision > 0"),
    (dict(noise_precision=True), "noise_precision > 0"),
    (dict(noise_precision=torch.ones(2)), "one number"),
])
def test_invalid_inputs_raise_value_error(kwargs, match):
    call = dict(features=torch.randn(3, 2), targets=torch.randn(3), prior_precision=1.0,
                noise_precision=1.0)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        blr_log_evidence(call.pop("features"), call.pop("targets"), **call)


def test_polynomial_features():
    x = torch.tensor([0.0, 0.5, 2.0])
    assert_close(polynomial_features(x, 2), [[1, 0, 0], [1, 0.5, 0.25], [1, 2, 4]])
    assert polynomial_features(x, 0).shape == (3, 1)
    assert polynomial_features([1, 2], 1).dtype == torch.float64
    with pytest.raises(ValueError, match="degree"):
        polynomial_features(x, -1)
    with pytest.raises(ValueError, match="vector"):
        polynomial_features(x.unsqueeze(0), 2)
