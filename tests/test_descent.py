"""Gradient-descent evidence, checked where everything is known: a quadratic loss.

Bayesian linear regression with known noise has the constant Hessian
``H = alpha I + X'X / sigma^2`` of ``L(w) = -log p(D, w)``, so every step's entropy
change ``log det(I - beta H)`` and, from a Gaussian q0, the whole distribution of
the iterates (Gaussian, covariance ``A^t S0 A^t`` with ``A = I - beta H``) are known
in closed form.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_mean, init_to_value

import pyro_structsel as ps
from pyro_structsel.util.sampling import VectorizationWarning
from pyro_structsel.evidence.descent import StepSizeWarning, gradient_descent_evidence

D = 5
ALPHA = 2.0      # prior precision of the weights
SIGMA = 0.5      # noise standard deviation
F64 = torch.float64


def blr(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=X.dtype), ALPHA ** -0.5).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, SIGMA), obs=y)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, D, generator=g, dtype=F64)
    y = X @ torch.randn(D, generator=g, dtype=F64) + SIGMA * torch.randn(30, generator=g,
                                                                           dtype=F64)
    return X, y


def exact_quantities(X, y):
    """Hessian, posterior mean and log evidence (Bishop PRML eq. 3.86) of the BLR."""
    H = ALPHA * torch.eye(D, dtype=F64) + X.T @ X / SIGMA ** 2
    w_star = torch.linalg.solve(H, X.T @ y / SIGMA ** 2)
    cov = SIGMA ** 2 * torch.eye(len(y), dtype=F64) + X @ X.T / ALPHA
    log_z = dist.MultivariateNormal(torch.zeros(len(y), dtype=F64), cov).log_prob(y)
    return H, w_star, float(log_z)


def series_errors(H, beta):
    """Second-order Taylor value, exact log det, truncation bound, Rademacher probe variance."""
    eye = torch.eye(D, dtype=F64)
    exact = float(torch.linalg.slogdet(eye - beta * H)[1])
    taylor = float(-beta * torch.trace(H) - beta ** 2 / 2 * torch.trace(H @ H))
    a = torch.linalg.eigvalsh(beta * H).abs()
    bound = float((a ** 3 / (3 * (1 - a))).sum())          # |sum_{j>=3} tr A^j / j|
    M = -beta * H - beta ** 2 / 2 * H @ H                    # v'Mv is the per-probe estimate
    probe_var = float(2 * (M ** 2).sum() - 2 * (torch.diagonal(M) ** 2).sum())
    return taylor, exact, bound, probe_var


def test_hutchinson_log_det_matches_exact_on_quadratic(data):
    X, y = data
    H, _, _ = exact_quantities(X, y)
    lam_max = float(torch.linalg.eigvalsh(H).max())
    beta = 0.2 / lam_max
    taylor, exact, bound, probe_var = series_errors(H, beta)
    restarts, probes, steps = 4, 500, 3
    est = gradient_descent_evidence(blr, None, X, y, num_restarts=restarts, num_steps=steps,
                                    step_size=beta, num_probes=probes, seed=0)
    got = est.diagnostics["log_det"]
    se = math.sqrt(probe_var / (restarts * probes * steps))   # of the mean over the steps
    assert got.shape == (steps,)
    # Hutchinson estimates the truncated series without bias ...
    assert abs(got.mean() - taylor) < 4 * se, (got.mean(), taylor, se)
    # ... whose distance to the exact log det is within the truncation bound
    assert abs(taylor - exact) <= bound
    assert abs(got.mean() - exact) < bound + 4 * se
    # the reported probe standard error is the true one
    reported = float(est.diagnostics["log_det_probe_se"].mean()) / math.sqrt(steps)
    assert 0.6 < reported / se < 1.5
    assert est.diagnostics["beta_lambda_max"] == pytest.approx(0.2, rel=1e-3)


def test_bound_variant_and_exact_option(data):
    X, y = data
    H, _, _ = exact_quantities(X, y)
    beta = 0.3 / float(torch.linalg.eigvalsh(H).max())
    _, exact, _, _ = series_errors(H, beta)
    bound_value = float(-beta * torch.trace(H) - beta ** 2 * torch.trace(H @ H))
    est = gradient_descent_evidence(blr, None, X, y, num_restarts=4, num_steps=2,
                                    step_size=beta, num_probes=500, log_det="bound", seed=1)
    se = float(est.diagnostics["log_det_probe_se"].max())
    assert abs(est.diagnostics["log_det"].mean() - bound_value) < 4 * se * 2
    assert bound_value < exact                       # the paper's form is a lower bound
    ex = gradient_descent_evidence(blr, None, X, y, num_restarts=3, num_steps=4,
                                   step_size=beta, log_det="exact", seed=1)
    torch.testing.assert_close(torch.as_tensor(ex.diagnostics["log_det"]),
                               torch.full((4,), exact, dtype=F64), atol=1e-10, rtol=0)
    assert ex.diagnostics["lambda_max"][0] == pytest.approx(
        float(torch.linalg.eigvalsh(H).max()), rel=1e-10)


def _gaussian_q0(X, y, loc, scale):
    guide = AutoNormal(blr, init_loc_fn=init_to_value(values={"w": loc}), init_scale=scale)
    guide(X, y)
    return guide


def test_entropy_of_gaussian_q0_under_linear_descent(data):
    """q_t is Gaussian with covariance A^t S0 A^t; its entropy and ELBO are known exactly."""
    X, y = data
    H, w_star, log_z = exact_quantities(X, y)
    beta = 0.25 / float(torch.linalg.eigvalsh(H).max())
    loc = torch.linspace(-1.0, 1.0, D, dtype=F64)
    scale = 0.7
    guide = _gaussian_q0(X, y, loc, scale)
    steps = 40
    est = gradient_descent_evidence(blr, guide, X, y, num_restarts=200, num_steps=steps,
                                    step_size=beta, log_det="exact", seed=2)
    diag = est.diagnostics
    assert diag["initial_entropy_method"] == "analytic"
    A = torch.eye(D, dtype=F64) - beta * H
    cov = scale ** 2 * torch.eye(D, dtype=F64)
    mean = loc.clone()
    two_pi_e = 2 * math.pi * math.e
    for t in range(steps + 1):
        entropy = 0.5 * float(torch.linalg.slogdet(two_pi_e * cov)[1])
        assert diag["entropy"][t] == pytest.approx(entropy, abs=1e-8)
        delta = mean - w_star        # ELBO_t = log Z - KL(q_t || posterior)
        kl = 0.5 * float(torch.trace(H @ cov) + delta @ H @ delta - D
                         - torch.linalg.slogdet(H)[1] - torch.linalg.slogdet(cov)[1])
        assert abs(diag["evidence"][t] - (log_z - kl)) < 4.5 * diag["evidence_se"][t] + 1e-9
        cov, mean = A @ cov @ A, w_star + A @ (mean - w_star)
    assert est.value <= log_z + 3 * est.se
    assert 0 < diag["best_step"] < steps     # rises, then falls: the entropy keeps shrinking
    # the Hutchinson estimate of the same entropy, within truncation + probe noise
    est2 = gradient_descent_evidence(blr, guide, X, y, num_restarts=8, num_steps=10,
                                     step_size=beta, num_probes=200, seed=3)
    taylor, exact, bound, probe_var = series_errors(H, beta)
    t = 10
    exact_t = diag["entropy"][t]
    noise = math.sqrt(t * probe_var / (8 * 200))
    assert abs(est2.diagnostics["entropy"][t] - (diag["entropy"][0] + t * taylor)) < 4 * noise
    assert abs(est2.diagnostics["entropy"][t] - exact_t) < t * bound + 4 * noise


def test_sampled_initial_entropy_agrees_with_analytic(data):
    X, y = data
    guide = _gaussian_q0(X, y, torch.zeros(D, dtype=F64), 0.3)
    kw = dict(num_restarts=300, num_steps=1, step_size=1e-4, num_probes=1, seed=4)
    sampled = gradient_descent_evidence(blr, guide, X, y, initial_entropy="sample", **kw)
    analytic = gradient_descent_evidence(blr, guide, X, y, **kw)
    assert sampled.diagnostics["initial_entropy_method"] == "sample"
    closed = analytic.diagnostics["initial_entropy"]
    assert closed == pytest.approx(D * (math.log(0.3) + 0.5 * math.log(2 * math.pi * math.e)))
    # -log q0(w0) has variance D/2 per draw
    assert abs(sampled.diagnostics["initial_entropy"] - closed) < 4 * math.sqrt(D / 2 / 300)


def constrained(x, y=None):
    """Positive, simplex and real latent sites: the change of variables must be right."""
    precision = pyro.sample("precision", dist.Gamma(3.0, 2.0))
    gamma = pyro.sample("gamma", dist.Dirichlet(torch.ones(3)))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    mean = (torch.stack([x, x ** 2, torch.sin(x)], -1) * gamma * w).sum(-1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, precision ** -0.5), obs=y)


def test_constrained_sites_prior_q0_gives_expected_log_likelihood():
    x = torch.linspace(-1, 1, 20)
    y = torch.sin(x) + 0.3 * torch.randn(20)
    est = gradient_descent_evidence(constrained, None, x, y, num_restarts=6, num_steps=20,
                                    num_probes=4, initial_entropy="sample", seed=5)
    diag = est.diagnostics
    # from the prior, log p_u(D, u0) - log q0_u(u0) = log p(D | z0): Jacobians cancel exactly
    per_restart_lik = diag["evidence_per_restart"][:, 0]
    assert diag["evidence"][0] == pytest.approx(diag["log_likelihood"][0], abs=1e-4)
    assert per_restart_lik.shape == (6,)
    assert diag["vectorized"] is True
    assert diag["step_size"] > 0 and diag["beta_lambda_max"] < 0.5


def test_step_size_warnings(data):
    X, y = data
    H, _, _ = exact_quantities(X, y)
    lam = float(torch.linalg.eigvalsh(H).max())
    kw = dict(num_restarts=2, num_steps=2, num_probes=2, seed=6)
    with pytest.warns(StepSizeWarning, match="second-order expansion") as record:
        gradient_descent_evidence(blr, None, X, y, step_size=0.7 / lam, **kw)
    assert record[0].filename == __file__               # points at the user's call
    with pytest.warns(StepSizeWarning, match="not positive definite"):
        gradient_descent_evidence(blr, None, X, y, step_size=1.5 / lam, **kw)
    with pytest.warns(StepSizeWarning, match="diverges"):
        gradient_descent_evidence(blr, None, X, y, step_size=3.0 / lam, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # exact log det: 0.7 is fine
        gradient_descent_evidence(blr, None, X, y, step_size=0.7 / lam, log_det="exact", **kw)


def test_auto_step_size_and_loop_equals_vmap(data):
    X, y = data
    H, _, _ = exact_quantities(X, y)
    kw = dict(num_restarts=3, num_steps=5, num_probes=3, seed=7)
    fast = gradient_descent_evidence(blr, None, X, y, **kw)
    assert fast.diagnostics["step_size"] == pytest.approx(
        0.25 / float(torch.linalg.eigvalsh(H).max()), rel=0.05)
    slow = gradient_descent_evidence(blr, None, X, y, vectorize=False, **kw)
    assert fast.diagnostics["vectorized"] and not slow.diagnostics["vectorized"]
    for key in ("evidence", "entropy", "log_joint"):
        torch.testing.assert_close(torch.as_tensor(fast.diagnostics[key]),
                                   torch.as_tensor(slow.diagnostics[key]), atol=1e-8, rtol=1e-8)


def test_plain_model_not_vmappable_falls_back():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        if float(w.detach()) > 1e6:  # a Python branch on a value: no vmap
            w = w * 0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)

    x = torch.linspace(-1, 1, 10)
    with pytest.warns(VectorizationWarning):
        est = gradient_descent_evidence(model, None, x, 0.5 * x, num_restarts=2, num_steps=3,
                                        num_probes=2, seed=8)
    assert not est.diagnostics["vectorized"]
    assert math.isfinite(est.value)


def test_network_model_with_heldout_and_callback():
    torch.manual_seed(0)
    x, xt = torch.randn(20, 2), torch.randn(50, 2)
    y, yt = torch.tanh(x[:, 0]) + 0.1 * torch.randn(20), torch.tanh(xt[:, 0])
    family = ps.one_hidden_layer(2, 1, hidden=4, activations=("tanh", "relu"),
                                 shared_weights=True)
    model = ps.NetworkModel(family, likelihood="normal", noise_scale=0.3)
    fixed = ps.fix_structure(model, {"activation": "tanh"})
    guide = AutoNormal(fixed, init_loc_fn=init_to_mean, init_scale=0.3)
    seen = []
    est = gradient_descent_evidence(
        fixed, guide, x, y, num_restarts=3, num_steps=12, num_probes=2,
        heldout_args=(xt, yt), callback=lambda t, values: seen.append((t, values)), seed=9)
    diag = est.diagnostics
    assert est.method == "gradient_descent" and est.num_samples == 3
    for key in ("evidence", "evidence_se", "entropy", "log_joint", "log_likelihood",
                "heldout_log_likelihood", "lambda_max"):
        assert diag[key].shape == (13,) and all(map(math.isfinite, diag[key])), key
    assert diag["log_det"].shape == (12,)
    assert est.value == diag["evidence"][diag["best_step"]]
    assert 0 <= diag["best_heldout_step"] <= 12
    assert diag["vectorized"] and diag["initial_entropy_method"] == "analytic"
    assert [t for t, _ in seen] == list(range(13))
    assert seen[0][1]["edges.e0_1.weight"].shape[0] == 3
    assert diag["log_likelihood"][-1] > diag["log_likelihood"][0]     # descent fits
    # the structural site itself may be descended on too (Dirichlet, stick-breaking)
    free = gradient_descent_evidence(model, None, x, y, num_restarts=2, num_steps=3,
                                     num_probes=2, seed=10)
    assert math.isfinite(free.value)


def test_argument_errors(data):
    X, y = data
    with pytest.raises(ValueError, match="step_size"):
        gradient_descent_evidence(blr, None, X, y, step_size=-1.0)
    with pytest.raises(ValueError, match="log_det"):
        gradient_descent_evidence(blr, None, X, y, log_det="cubic")
    with pytest.raises(ValueError, match="num_restarts"):
        gradient_descent_evidence(blr, None, X, y, num_restarts=0)

    def partial_guide(X, y=None):
        pass

    with pytest.raises(ValueError, match="does not sample"):
        gradient_descent_evidence(blr, partial_guide, X, y)

    def subsampled(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0], subsample_size=10) as idx:
            pyro.sample("y", dist.Normal(X[idx] @ w, SIGMA), obs=y[idx])

    with pytest.raises(ValueError, match="subsampl"):
        gradient_descent_evidence(subsampled, None, X, y)
