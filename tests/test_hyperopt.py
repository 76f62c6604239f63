"""Hypergradient methods (unrolled, greedy, implicit, joint), the Pyro bridge and the front end.

Every hypergradient is checked against an exact answer in float64: central
finite differences of the forward map, a dense linear solve, or a closed form.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import pyro_structsel as ps
from pyro_structsel.hyper import hypergradients, hyperopt
from pyro_structsel.infer.guides import build_guide
from pyro_structsel.hyper.reversible import rmad, sgd_momentum
from pyro_structsel.infer.traced import TracedELBO

from common import assert_close


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _central_difference(function, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = eps
        out[i] = (function(x + step) - function(x - step)) / (2 * eps)
    return out


def _ridge(num_data: int = 30, num_features: int = 4, seed: int = 0):
    """Ridge regression: L = ½‖Φθ − t‖²/n + ½ e^h ‖θ‖²/N on a step-dependent half; Q = val MSE."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(num_data, num_features, generator=g, dtype=torch.float64)
    w = torch.randn(num_features, generator=g, dtype=torch.float64)
    t = phi @ w + 0.3 * torch.randn(num_data, generator=g, dtype=torch.float64)
    phi_v = torch.randn(20, num_features, generator=g, dtype=torch.float64)
    t_v = phi_v @ w + 0.3 * torch.randn(20, generator=g, dtype=torch.float64)

    def loss(theta, hyper, step):
        rows = slice(0, 20) if step % 2 == 0 else slice(10, 30)
        fit = 0.5 * ((phi[rows] @ theta - t[rows]) ** 2).mean()
        return fit + 0.5 * (hyper.exp() * theta ** 2).sum() / num_data

    def objective(theta, hyper):
        return 0.5 * ((phi_v @ theta - t_v) ** 2).mean() + 1e-3 * hyper.sum() ** 2

    return loss, objective, phi, t, phi_v, t_v


# ------------------------------------------------------------------------ unrolled

def test_unrolled_matches_finite_differences():
    loss, objective, *_ = _ridge()
    steps = 15
    theta0 = torch.linspace(-0.5, 0.5, 4, dtype=torch.float64)
    hyper = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)  # log prior precisions
    lr = torch.linspace(0.2, 0.1, steps, dtype=torch.float64)
    momentum = torch.linspace(0.5, 0.8, steps, dtype=torch.float64)
    result = hypergradients.unrolled(loss, objective, theta0, hyper, lr, momentum)

    def q(theta0=theta0, hyper=hyper, lr=lr, momentum=momentum):
        return objective(sgd_momentum(loss, theta0, hyper, lr, momentum), hyper)

    assert result.objective == pytest.approx(float(q()), rel=1e-12)
    for name, value, fd in (
            ("hyper", result.hyper, _central_difference(lambda h: q(hyper=h), hyper)),
            ("lr", result.lr, _central_difference(lambda a: q(lr=a), lr)),
            ("momentum", result.momentum, _central_difference(lambda m: q(momentum=m), momentum)),
            ("theta0", result.theta0, _central_difference(lambda x: q(theta0=x), theta0))):
        assert _relative_error(value, fd) < 1e-4, name
    with pytest.raises(ValueError, match="lr"):
        hypergradients.unrolled(loss, objective, theta0, hyper, lr[:0], momentum[:0])
    with pytest.raises(ValueError, match="momentum"):
        hypergradients.unrolled(loss, objective, theta0, hyper, lr, momentum + 1)
    with pytest.raises(ValueError, match="theta0"):
        hypergradients.unrolled(loss, objective, theta0.reshape(2, 2), hyper, lr, momentum)


# ------------------------------------------------------------------------ greedy

def test_greedy_one_step_is_unrolled_and_updates_online():
    loss, objective, *_ = _ridge()
    hyper = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    lr, momentum = torch.full((7,), 0.15, dtype=torch.float64), torch.full((7,), 0.6,
                                                                           dtype=torch.float64)
    theta_t = sgd_momentum(loss, torch.zeros(4, dtype=torch.float64), hyper, lr, momentum)
    for start in (torch.zeros(4, dtype=torch.float64), theta_t):
        one = hypergradients.greedy(loss, objective, start, hyper, lr[:1], momentum[:1])
        ref = hypergradients.unrolled(loss, objective, start, hyper, lr[:1], momentum[:1])
        for field in ("hyper", "lr", "momentum", "theta0", "theta"):
            assert torch.equal(getattr(one, field), getattr(ref, field)), field
        assert one.objective == ref.objective

    # online: h_{t+1} = h_t - hyper_lr * g_t, and g_t is the one-step look-ahead gradient at h_t
    seen = []

    def update(step, h, g):
        seen.append((step, h.clone(), g.clone()))
        return h - 0.5 * g

    run = hypergradients.greedy(loss, objective, torch.zeros(4, dtype=torch.float64), hyper, lr,
                          momentum, update=update)
    trajectory = run.diagnostics["hyper_trajectory"]
    assert [s for s, _, _ in seen] == list(range(7))
    for step, h, g in seen:
        assert torch.equal(trajectory[step], h)
        assert torch.equal(trajectory[step + 1], h - 0.5 * g)
    assert not torch.equal(trajectory[0], trajectory[-1])
    plain = hypergradients.greedy(loss, objective, torch.zeros(4, dtype=torch.float64), hyper, lr,
                            momentum, hyper_lr=0.5)
    assert torch.equal(plain.diagnostics["hyper"], run.diagnostics["hyper"])


# ------------------------------------------------------------------------ implicit

def _quadratic(seed: int = 1):
    """Strongly convex L(θ, h) = ½ θᵀAθ − bᵀθ + ½ Σ e^{h_i} θ_i² + sin(h)·θ, quadratic Q."""
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = root @ root.T / 5 + 0.5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    target = torch.randn(5, generator=g, dtype=torch.float64)

    def loss(theta, hyper, step):
        return (0.5 * theta @ a @ theta - b @ theta + 0.5 * (hyper.exp() * theta ** 2).sum()
                + torch.sin(hyper) @ theta)

    def objective(theta, hyper):
        return 0.5 * ((theta - target) ** 2).sum() + 0.1 * (hyper ** 2).sum()

    def theta_star(hyper):
        return torch.linalg.solve(a + torch.diag(hyper.exp()), b - torch.sin(hyper))

    return loss, objective, theta_star, a


def test_implicit_cg_and_neumann_equal_dense_solve():
    loss, objective, _, _ = _quadratic()
    hyper = torch.tensor([0.1, -0.3, 0.2, 0.0, 0.4], dtype=torch.float64)
    steps = 400
    lr = torch.full((steps,), 0.3, dtype=torch.float64)
    momentum = torch.full((steps,), 0.5, dtype=torch.float64)
    cg = hypergradients.implicit(loss, objective, torch.zeros(5, dtype=torch.float64), hyper, lr,
                           momentum)
    theta = cg.theta
    # dense: dQ/dh = ∂hQ − (∂²L/∂h∂θ) H⁻¹ ∂θQ with autograd Jacobians and a dense solve
    hessian = torch.autograd.functional.hessian(lambda x: loss(x, hyper, steps), theta)
    mixed = torch.autograd.functional.jacobian(
        lambda h: torch.autograd.functional.jacobian(lambda x: loss(x, h, steps), theta,
                                                     create_graph=True), hyper)
    dq_theta = torch.autograd.functional.jacobian(lambda x: objective(x, hyper), theta)
    dq_hyper = torch.autograd.functional.jacobian(lambda h: objective(theta, h), hyper)
    dense = dq_hyper - mixed.T @ torch.linalg.solve(hessian, dq_theta)
    assert _relative_error(cg.hyper, dense) < 1e-6
    assert cg.diagnostics["converged"] and cg.diagnostics["grad_norm"] < 1e-10
    top = float(torch.linalg.eigvalsh(hessian).max())
    neumann = hypergradients.implicit(loss, objective, torch.zeros(5, dtype=torch.float64), hyper, lr,
                                momentum, solver="neumann", neumann_step_size=1 / top,
                                neumann_terms=600)
    assert _relative_error(neumann.hyper, dense) < 1e-6
    short = hypergradients.implicit(loss, objective, torch.zeros(5, dtype=torch.float64), hyper, lr,
                              momentum, solver="neumann", neumann_step_size=1 / top,
                              neumann_terms=2)
    assert _relative_error(short.hyper, dense) > 1e-3  # truncation shows at low order
    with pytest.raises(ValueError, match="solver"):
        hypergradients.implicit(loss, objective, torch.zeros(5, dtype=torch.float64), hyper, lr,
                          momentum, solver="lu")
    with pytest.warns(hypergradients.HypergradientWarning, match="gradient norm"):
        hypergradients.implicit(loss, objective, torch.zeros(5, dtype=torch.float64), hyper, lr[:3],
                          momentum[:3])


def test_implicit_agrees_with_closed_form_and_unrolled_limit():
    loss, objective, theta_star, _ = _quadratic()
    hyper = torch.tensor([0.1, -0.3, 0.2, 0.0, 0.4], dtype=torch.float64)
    steps = 300
    lr = torch.full((steps,), 0.3, dtype=torch.float64)
    momentum = torch.full((steps,), 0.5, dtype=torch.float64)
    theta0 = torch.zeros(5, dtype=torch.float64)
    result = hypergradients.implicit(loss, objective, theta0, hyper, lr, momentum)
    closed = _central_difference(lambda h: objective(theta_star(h), h), hyper)
    assert _relative_error(result.hyper, closed) < 1e-6
    long_run = hypergradients.unrolled(loss, objective, theta0, hyper, lr, momentum)
    assert _relative_error(long_run.hyper, result.hyper) < 1e-6  # η = 300: converged
    short_run = hypergradients.unrolled(loss, objective, theta0, hyper, lr[:5], momentum[:5])
    assert _relative_error(short_run.hyper, result.hyper) > 1e-2  # η = 5: far from it


# ------------------------------------------------------------------------ joint (empirical Bayes)

def test_joint_blr_reaches_the_evidence_maximiser():
    g = torch.Generator().manual_seed(3)
    num_data, num_features, beta = 25, 3, 4.0
    phi = torch.randn(num_data, num_features, generator=g, dtype=torch.float64) / 3
    t = phi @ torch.tensor([1.6, -1.0, 0.6], dtype=torch.float64) \
        + beta ** -0.5 * torch.randn(num_data, generator=g, dtype=torch.float64)
    lower = torch.ones(num_features, num_features, dtype=torch.float64).tril(-1)
    eye = torch.eye(num_features, dtype=torch.float64)
    gram = phi.T @ phi

    def negative_elbo(theta, hyper, step):  # exact Gaussian guide q = N(m, LLᵀ), analytic ELBO
        m = theta[:num_features]
        raw = theta[num_features:].reshape(num_features, num_features)
        chol = raw * lower + eye * raw.diagonal().exp()
        cov = chol @ chol.T
        alpha = hyper.exp()[0]
        expected_fit = 0.5 * beta * (((t - phi @ m) ** 2).sum() + (gram * cov).sum())
        fit = expected_fit - 0.5 * num_data * math.log(beta / (2 * math.pi))
        kl = 0.5 * (alpha * (cov.trace() + m @ m) - num_features
                    - 2 * raw.diagonal().sum() - num_features * alpha.log())
        return fit + kl

    steps = 400
    theta0 = torch.zeros(num_features + num_features ** 2, dtype=torch.float64)
    result = hypergradients.joint(negative_elbo, theta0, torch.zeros(1, dtype=torch.float64),
                            torch.full((steps,), 0.1, dtype=torch.float64),
                            torch.full((steps,), 0.8, dtype=torch.float64), hyper_lr=0.05)
    alpha_joint = float(result.diagnostics["hyper"].exp())
    alpha = 1.0  # PRML eq. 3.92 fixed point: α = γ / m_Nᵀm_N maximises the evidence
    for _ in range(200):
        est = ps.blr_log_evidence(phi, t, prior_precision=alpha, noise_precision=beta)
        mean = est.diagnostics["posterior_mean"]
        alpha = est.diagnostics["effective_num_parameters"] / float(mean @ mean)
    best = ps.blr_log_evidence(phi, t, prior_precision=alpha, noise_precision=beta).value
    assert alpha_joint == pytest.approx(alpha, rel=1e-6)  # measured: 4e-10
    assert -result.objective == pytest.approx(best, abs=1e-6)  # ELBO = evidence at the optimum
    assert abs(float(result.hyper[0])) < 1e-5


# ------------------------------------------------------------------------ the Pyro bridge

def _blr_data(num_data: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_data, 3, generator=g)
    y = x @ torch.tensor([1.0, -0.5, 0.25]) + 0.5 * torch.randn(num_data, generator=g)
    return x, y


def _blr_model(x, y=None):
    precision = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(torch.zeros(3), precision.rsqrt()).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def _bridged_fd_check(problem, hyper, lr, momentum, method=hypergradients.unrolled, tol=1e-4):
    result = method(problem.loss, problem.objective, problem.theta0, hyper, lr, momentum)

    def q(h=hyper, a=lr):
        return float(problem.objective(sgd_momentum(problem.loss, problem.theta0, h, a,
                                                    momentum), h))

    assert result.objective == pytest.approx(q(), rel=1e-10)
    assert _relative_error(result.hyper, _central_difference(lambda h: q(h=h), hyper)) < tol
    assert _relative_error(result.lr, _central_difference(lambda a: q(a=a), lr)) < tol
    return result


def test_bridge_blr_unrolled_matches_finite_differences_and_store_untouched(float64):
    pyro.param("user_param", torch.tensor(3.0))
    x, y = _blr_data()
    x_val, y_val = _blr_data(10, seed=1)
    for criterion, validation in (("evidence", None), ("validation", (x_val, y_val))):
        (problem,) = hyperopt.hyperparameter_problem(
            _blr_model, x, y, hyperparameters=["prior_precision"], criterion=criterion,
            validation=validation, num_particles=2, num_objective_samples=4, seed=7)
        assert problem.hyper_names == ["prior_precision"]
        assert problem.theta0.dtype == torch.float64 and problem.theta0.numel() == 6
        hyper = problem.hyper0 + 0.4
        steps = 8
        lr = torch.full((steps,), 0.02)
        momentum = torch.full((steps,), 0.7)
        _bridged_fd_check(problem, hyper, lr, momentum)
        # deterministic in (theta, hyper, step); different steps draw different noise
        assert float(problem.loss(problem.theta0, hyper, 3)) == \
            float(problem.loss(problem.theta0, hyper, 3))
        assert float(problem.loss(problem.theta0, hyper, 3)) != \
            float(problem.loss(problem.theta0, hyper, 4))
    assert set(pyro.get_param_store().keys()) == {"user_param"}
    assert float(pyro.param("user_param").detach()) == 3.0


def test_inner_runs_replay_a_traced_step_with_autograds_draws(float64):
    # the first-order runs (implicit's, joint, the final ones) take the traced step's gradient:
    # the same draws per step, equal to autograd through problem.loss to float64 rounding
    x, y = _blr_data()
    (problem,) = hyperopt.hyperparameter_problem(
        _blr_model, x, y, hyperparameters=["prior_precision"], num_particles=2, seed=7)
    hyper = problem.hyper0 + 0.4
    for step in (0, 3):
        point = problem.theta0.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(problem.loss(point, hyper, step), point)
        assert_close(problem.gradient(problem.theta0, hyper, step), expected, atol=1e-12,
                     rtol=1e-10)
    assert isinstance(problem._traced_elbo(), TracedELBO)
    lr, momentum = torch.full((12,), 0.02), torch.full((12,), 0.7)
    eager = sgd_momentum(problem.loss, problem.theta0, hyper, lr, momentum)
    traced = sgd_momentum(problem.loss, problem.theta0, hyper, lr, momentum,
                          gradient=problem.gradient)
    assert_close(traced, eager, atol=1e-12, rtol=1e-10)
    # joint descent (empirical Bayes) takes the hyperparameter's gradient from it too
    eager = hypergradients.joint(problem.loss, problem.theta0, hyper, lr, momentum)
    traced = hypergradients.joint(problem.loss, problem.theta0, hyper, lr, momentum,
                                  gradients=problem.value_and_gradients)
    for key in ("hyper_trajectory", "losses"):
        assert_close(traced.diagnostics[key], eager.diagnostics[key], atol=1e-12, rtol=1e-10)
    assert_close(traced.theta, eager.theta, atol=1e-12, rtol=1e-10)
    assert not list(pyro.get_param_store().keys())


def test_bridge_network_unrolled_rmad_and_structural_hyperparameters(float64):
    x = torch.randn(12, 3)
    y = torch.randint(0, 2, (12,))
    model = ps.NetworkModel(ps.one_hidden_layer(3, 2, hidden=4), likelihood="categorical",
                            learn_prior_scale=True, prior="concrete", learn_temperature=True)
    names = ["net.prior_scale", "net.temperature"]
    (problem,) = hyperopt.hyperparameter_problem(model, x, y, hyperparameters=names, seed=3)
    assert problem.second_order
    steps = 6
    lr = torch.full((steps,), 0.05)
    momentum = torch.full((steps,), 0.6)
    hyper = problem.hyper0.clone()
    result = _bridged_fd_check(problem, hyper, lr, momentum)
    assert bool((result.hyper.abs() > 0).all())  # every hyperparameter (temperature too) matters
    exact = rmad(problem.loss, problem.objective, problem.theta0, hyper, lr, momentum)
    # rmad runs in 44-bit fixed point with the momentum rounded to n / 2^30: agrees to 1e-7
    assert _relative_error(exact.hyper, result.hyper) < 1e-7
    assert _relative_error(exact.lr, result.lr) < 1e-7
    assert not list(pyro.get_param_store().keys())
    assert float(model.net.temperature.detach()) == pytest.approx(0.5)


def test_dirichlet_concentration_gradient_flows_and_second_order_is_refused(float64):
    x = torch.randn(10, 3)
    y = torch.randint(0, 2, (10,))
    model = ps.NetworkModel(ps.one_hidden_layer(3, 2, hidden=4), likelihood="categorical",
                            learn_concentration=True, concentration=0.8)
    (problem,) = hyperopt.hyperparameter_problem(model, x, y, hyperparameters=["net.concentration"],
                                                 seed=0)
    assert not problem.second_order
    hyper = problem.hyper0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.loss(problem.theta0, hyper, 0), hyper)
    fd = _central_difference(lambda h: float(problem.loss(problem.theta0, h, 0)), hyper.detach())
    assert float(grad.abs()) > 0 and _relative_error(grad, fd) < 1e-6
    with pytest.raises(ValueError, match="Dirichlet"):
        ps.optimize_hyperparameters(model, x, y, hyperparameters=["net.concentration"],
                                    method="unrolled", num_outer_steps=1, num_inner_steps=1,
                                    progress=False)
    result = ps.optimize_hyperparameters(model, x, y, hyperparameters=["net.concentration"],
                                         method="greedy", num_outer_steps=2, num_inner_steps=3,
                                         seed=0, progress=False)
    assert result.trajectory["net.concentration"].shape == (3,)
    assert float(result.trajectory["net.concentration"][-1]) != pytest.approx(0.8)


# ------------------------------------------------------------------------ the front end

def test_optimize_hyperparameters_evidence_unrolled_lr_schedule(float64):
    pyro.param("user_param", torch.tensor(1.0))
    x, y = _blr_data()
    steps = 10
    result = ps.optimize_hyperparameters(
        _blr_model, x, y, hyperparameters=["prior_precision", "lr"], method="unrolled",
        num_outer_steps=6, num_inner_steps=steps, lr=[0.02] * steps, momentum=0.7,
        outer_lr=0.1, num_particles=2, seed=0, progress=False)
    assert result.trajectory["prior_precision"].shape == (7,)
    assert result.trajectory["lr"].shape == (7, steps)
    assert result.hypergradients.shape == (6, 1 + steps)
    assert result.objective.shape == (7,)
    assert float(result.objective[-1]) < float(result.objective[0])
    assert torch.equal(result.hyperparameters["lr"], result.trajectory["lr"][-1])
    frame = result.summary()
    assert list(frame.columns[:3]) == ["objective", "prior_precision", "lr[0]"]
    with result.param_scope():
        assert float(pyro.param("prior_precision").detach()) == pytest.approx(
            float(result.hyperparameters["prior_precision"]), rel=1e-12)
    assert set(pyro.get_param_store().keys()) == {"user_param"}
    assert "HyperparameterResult" in repr(result)


@pytest.mark.parametrize("method", ["rmad", "implicit", "greedy", "joint"])
def test_optimize_hyperparameters_methods_run(float64, method):
    x, y = _blr_data()
    options = {"grad_tol": None} if method == "implicit" else None
    result = ps.optimize_hyperparameters(
        _blr_model, x, y, hyperparameters=["prior_precision"], method=method,
        num_outer_steps=3, num_inner_steps=8, lr=0.02, momentum=0.5, seed=0,
        method_options=options, progress=False)
    assert result.trajectory["prior_precision"].shape == (4,)
    assert bool(torch.isfinite(result.objective).all())
    assert not list(pyro.get_param_store().keys())


def test_optimize_hyperparameters_validation_holdout_and_folds(float64):
    x, y = _blr_data(24)
    x_val, y_val = _blr_data(10, seed=1)
    holdout = ps.optimize_hyperparameters(
        _blr_model, x, y, hyperparameters=["prior_precision"], criterion="validation",
        validation=(x_val, y_val), num_outer_steps=2, num_inner_steps=6, lr=0.02, seed=0,
        progress=False)
    (problem,) = hyperopt.hyperparameter_problem(
        _blr_model, x, y, hyperparameters=["prior_precision"], criterion="validation",
        validation=(x_val, y_val), seed=0)
    lr, momentum = torch.full((6,), 0.02), torch.full((6,), 0.9)
    first = problem.objective(sgd_momentum(problem.loss, problem.theta0, problem.hyper0, lr,
                                           momentum), problem.hyper0)
    assert float(holdout.objective[0]) == pytest.approx(float(first), rel=1e-12)
    folds = ps.optimize_hyperparameters(
        _blr_model, x, y, hyperparameters=["prior_precision"], criterion="validation",
        validation=3, num_outer_steps=2, num_inner_steps=6, lr=0.02, seed=0, progress=False)
    problems = hyperopt.hyperparameter_problem(
        _blr_model, x, y, hyperparameters=["prior_precision"], criterion="validation",
        validation=3, seed=0)
    assert len(problems) == 3
    per_fold = [float(p.objective(sgd_momentum(p.loss, p.theta0, p.hyper0, lr, momentum),
                                  p.hyper0)) for p in problems]
    assert float(folds.objective[0]) == pytest.approx(sum(per_fold) / 3, rel=1e-12)


def test_optimize_hyperparameters_bad_input():
    x, y = _blr_data()

    def run(**overrides):
        arguments = dict(hyperparameters=["prior_precision"], num_outer_steps=1,
                         num_inner_steps=2, progress=False)
        arguments.update(overrides)
        return ps.optimize_hyperparameters(_blr_model, x, y, **arguments)

    with pytest.raises(ValueError, match=r"Unknown hyperparameter.*\['prior_precision'\]"):
        run(hyperparameters=["prior_scale"])
    with pytest.raises(ValueError, match="Unknown method 'unroled'"):
        run(method="unroled")
    with pytest.raises(ValueError, match="Unknown criterion"):
        run(criterion="evidense")
    with pytest.raises(ValueError, match="needs validation"):
        run(criterion="validation")
    with pytest.raises(ValueError, match="joint"):
        run(criterion="validation", validation=(x, y), method="joint")
    with pytest.raises(ValueError, match="num_inner_steps"):
        run(num_inner_steps=0)
    with pytest.raises(ValueError, match="cannot tune"):
        run(hyperparameters=["prior_precision", "lr"], method="greedy")
    with pytest.raises(ValueError, match="schedule"):
        run(lr=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="momentum"):
        run(momentum=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        run(hyperparameters=[])
    with pytest.raises(ValueError, match="validation"):
        run(validation=(x, y))
    assert not list(pyro.get_param_store().keys())


def test_result_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    x, y = _blr_data()
    result = ps.optimize_hyperparameters(_blr_model, x, y, hyperparameters=["prior_precision"],
                                         num_outer_steps=2, num_inner_steps=3, lr=0.02,
                                         seed=0, progress=False)
    fig = result.plot()
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------ every AutoGuide

def _blr_vectorised(x, y=None):
    precision = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(torch.zeros(3), precision.rsqrt()).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


@pytest.mark.parametrize("guide", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
                                   AutoLowRankMultivariateNormal])
def test_every_autoguide_trains_in_the_inner_run(float64, guide):
    # Q after the inner run (the closures optimize_hyperparameters differentiates) equals Q of
    # a plain SVI fit with the same steps (SGD with momentum in the same form), within Monte
    # Carlo noise and the spread of a random initialisation (the low-rank factor); before
    # the fix the loc of AutoDiagonalNormal / AutoMultivariateNormal /
    # AutoLowRankMultivariateNormal never moved and Q stayed tens of nats above
    x, y = _blr_data()
    steps, lr, momentum = 100, 0.02, 0.9
    (problem,) = hyperopt.hyperparameter_problem(
        _blr_vectorised, x, y, hyperparameters=["prior_precision"], guide=guide,
        num_objective_samples=64, seed=0)
    theta = sgd_momentum(problem.loss, problem.theta0, problem.hyper0,
                         torch.full((steps,), lr), torch.full((steps,), momentum))
    with torch.no_grad():
        q = float(problem.objective(theta, problem.hyper0))
    blocked = poutine.block(_blr_vectorised, hide=["prior_precision"])
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(0)
        plain = build_guide(blocked, guide, {}, (x, y), {}, None)
        svi = SVI(blocked, plain, pyro.optim.SGD({"lr": lr, "momentum": momentum,
                                                  "dampening": momentum}), Trace_ELBO())
        for _ in range(steps):
            svi.step(x, y)
        q_plain = Trace_ELBO(num_particles=2000, vectorize_particles=True,
                             max_plate_nesting=1).loss(blocked, plain, x, y)
    exact = -ps.blr_log_evidence(x, y, prior_precision=1.0, noise_precision=4.0).value
    assert abs(q - q_plain) < 1.5
    assert exact - 0.3 < q < exact + 2.0


def _evidence_maximiser(x, y, noise_precision):
    grid = torch.linspace(-4.0, 6.0, 10001, dtype=torch.float64)
    values = torch.tensor([ps.blr_log_evidence(x, y, prior_precision=float(a.exp()),
                                               noise_precision=noise_precision).value
                           for a in grid])
    return float(grid[values.argmax()])


@pytest.mark.slow
def test_joint_with_a_full_covariance_guide_ends_at_the_evidence_maximiser(float64):
    # the route: ln alpha ran away to 7.5-8 with AutoMultivariateNormal
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = x @ torch.tensor([0.3, -0.4, 0.2, 0.1]) + 0.75 * torch.randn(40, generator=g)

    def model(x, y=None):
        alpha = pyro.param("alpha", torch.tensor(1.0), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([4]).to_event(1))
        with pyro.plate("data", 40):
            pyro.sample("y", dist.Normal(x @ w, 0.75), obs=y)

    best = _evidence_maximiser(x, y, 0.75**-2)
    result = ps.optimize_hyperparameters(
        model, x, y, hyperparameters=["alpha"], guide=AutoMultivariateNormal, method="joint",
        num_outer_steps=20, num_inner_steps=50, lr=0.05, outer_lr=0.05, num_particles=4,
        seed=0, progress=False)
    assert abs(math.log(result.hyperparameters["alpha"]) - best) < 0.1


def _dirichlet_blr(x, y=None):
    alpha = pyro.param("alpha", torch.tensor(1.0), constraint=constraints.positive)
    gamma = ps.structure("basis", ["linear", "cubic"])  # the default Dirichlet prior
    features = gamma[..., :1] * x + gamma[..., 1:] * x**3
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([3]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((features * w).sum(-1), 0.5), obs=y)


def test_defaults_work_with_the_default_dirichlet_structure_prior(float64):
    x, y = _blr_data()
    result = ps.optimize_hyperparameters(_dirichlet_blr, x, y, hyperparameters=["alpha"],
                                         num_outer_steps=2, num_inner_steps=5, seed=0,
                                         progress=False)
    assert result.method == "joint"  # unrolled would need second derivatives of Dirichlet draws
    with pytest.raises(ValueError, match="Dirichlet.*\\['lr'\\] cannot be tuned"):
        ps.optimize_hyperparameters(_dirichlet_blr, x, y, hyperparameters=["alpha", "lr"],
                                    num_outer_steps=1, num_inner_steps=2, progress=False)


@pytest.mark.slow
def test_defaults_with_a_dirichlet_prior_reach_the_evidence_optimum(float64):
    # the issue: the fallback it suggested ("greedy") took alpha from 1 to 380; the joint
    # default must end near the evidence maximiser of the structure q prefers (linear)
    x, y = _blr_data(40)
    result = ps.optimize_hyperparameters(_dirichlet_blr, x, y, hyperparameters=["alpha"],
                                         seed=0, progress=False)
    best = _evidence_maximiser(x, y, 4.0)
    assert abs(math.log(result.hyperparameters["alpha"]) - best) < 0.5
