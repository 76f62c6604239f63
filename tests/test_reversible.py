"""RMAD (exact reversal of SGD with momentum) against exact answers.

Exact answers: the true initial state (bit for bit), the float64 forward dynamics,
central finite differences of the forward map and plain reverse mode through
the unrolled steps (``sgd_momentum(..., create_graph=True)``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyro_structsel.hyper.reversible import (
    MOMENTUM_BITS,
    InformationBuffer,
    ReconstructionWarning,
    quantize_momentum,
    rmad,
    sgd_momentum,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one torch thread is as fast, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def classification_data(n=60, dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    w = torch.randn(dim, generator=generator, dtype=torch.float64)
    y = (x @ w + 0.7 * torch.randn(n, generator=generator, dtype=torch.float64) > 0).double()
    half = n // 2
    return x[:half], y[:half], x[half:], y[half:]


def logistic_problem(seed=0):
    """Training loss with per-feature log weight decay ``h``; Q = validation NLL."""
    x_train, y_train, x_valid, y_valid = classification_data(seed=seed)

    def loss(theta, hyper, step):
        penalty = 0.5 * (hyper.exp() * theta**2).sum()
        return F.binary_cross_entropy_with_logits(x_train @ theta, y_train) + penalty

    def objective(theta, hyper):
        return F.binary_cross_entropy_with_logits(x_valid @ theta, y_valid)

    return loss, objective


def tanh_net_problem(dtype=torch.float64, hidden=4):
    """A tiny tanh network on two-class data, with a minibatch chosen by ``step``."""
    x_train, y_train, x_valid, y_valid = (t.to(dtype) for t in classification_data(n=80))
    dim = x_train.shape[1]
    sizes = [dim * hidden, hidden, hidden, 1]

    def forward(theta, x):
        w1, b1, w2, b2 = torch.split(theta, sizes)
        return torch.tanh(x @ w1.view(dim, hidden) + b1) @ w2 + b2

    def loss(theta, hyper, step):
        batch = torch.arange(10, dtype=torch.long) + 10 * (step % 4)   # deterministic in step
        nll = F.binary_cross_entropy_with_logits(forward(theta, x_train[batch]), y_train[batch])
        return nll + 0.5 * hyper.exp()[0] * (theta**2).sum()

    def objective(theta, hyper):
        return F.binary_cross_entropy_with_logits(forward(theta, x_valid), y_valid)

    return loss, objective, sum(sizes)


def schedules(num_steps, lr=0.3, momentum=0.9):
    steps = torch.arange(num_steps, dtype=torch.float64)
    lr_schedule = lr * (1.0 + 0.3 * torch.cos(steps / 7.0))
    momentum_schedule = momentum + 0.05 * torch.sin(steps / 5.0) * min(momentum, 1 - momentum)
    return lr_schedule, momentum_schedule


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_reverse_pass_rebuilds_initial_state_bit_for_bit(float64, momentum):
    loss, objective, size = tanh_net_problem()
    theta0 = 0.5 * torch.randn(size)
    hyper = torch.tensor([math.log(1e-3)])
    lr = torch.full((200,), 0.2)
    result = rmad(loss, objective, theta0, hyper, lr, torch.full((200,), momentum))
    diagnostics = result.diagnostics
    assert diagnostics["reconstruction_exact"]      # fixed point θ₀, v₀ = 0, empty buffer
    assert torch.equal(diagnostics["theta0_reconstructed"], theta0)
    assert torch.equal(diagnostics["v0_reconstructed"], torch.zeros(size))
    assert diagnostics["theta0_rounding"] <= 2.0**-45       # half the grid step 2^-44
    assert not torch.allclose(result.theta, theta0)         # it did move


def test_fixed_point_forward_matches_float64_dynamics(float64):
    loss, objective, size = tanh_net_problem()
    theta0 = 0.5 * torch.randn(size)
    hyper = torch.tensor([math.log(1e-3)])
    lr, momentum = schedules(200, lr=0.2, momentum=0.8)
    result = rmad(loss, objective, theta0, hyper, lr, momentum)
    reference = sgd_momentum(loss, theta0, hyper, lr, momentum, momentum_bits=MOMENTUM_BITS)
    # 200 roundings to the grid 2^-44 ≈ 5.7e-14 each: far below 1e-10
    assert (result.theta - reference).abs().max() < 1e-10
    assert abs(result.objective - float(objective(reference, hyper))) < 1e-10
    assert (reference - theta0).abs().max() > 0.1


def _central(function, point, direction, eps):
    return (function(point + eps * direction) - function(point - eps * direction)) / (2 * eps)


def _relative(a, b):
    return abs(a - b) / abs(b)


def test_hypergradients_match_central_finite_differences(float64):
    loss, objective = logistic_problem()
    num_steps = 40
    theta0 = 0.1 * torch.randn(5)
    hyper = torch.linspace(-3.0, -1.0, 5)                  # log weight decay per feature
    lr, momentum = schedules(num_steps, lr=0.1, momentum=0.7)
    momentum = quantize_momentum(momentum)       # what rmad runs with, so FD steps stay exact
    result = rmad(loss, objective, theta0, hyper, lr, momentum)

    def q(theta0=theta0, hyper=hyper, lr=lr, momentum=momentum):
        final = sgd_momentum(loss, theta0, hyper, lr, momentum)
        return float(objective(final, hyper))

    eps, tolerance = 1e-5, 1e-4
    for i in range(hyper.numel()):                          # dQ/dh, every entry
        e = torch.zeros(5)
        e[i] = 1.0
        fd = _central(lambda h: q(hyper=h), hyper, e, eps)
        assert _relative(float(result.hyper[i]), fd) < tolerance, (i, float(result.hyper[i]), fd)
    for t in (0, 7, 20, num_steps - 1):                     # dQ/dα_t, dQ/dγ_t: a few entries
        e = torch.zeros(num_steps)
        e[t] = 1.0
        fd_lr = _central(lambda a: q(lr=a), lr, e, 1e-6)
        assert _relative(float(result.lr[t]), fd_lr) < tolerance, (t, float(result.lr[t]), fd_lr)
        fd_momentum = _central(lambda g: q(momentum=g), momentum, e, 1e-6)
        assert _relative(float(result.momentum[t]), fd_momentum) < tolerance, t
    generator = torch.Generator().manual_seed(1)           # whole vectors: random directions
    for name, point, gradient in (("lr", lr, result.lr), ("momentum", momentum, result.momentum),
                                  ("theta0", theta0, result.theta0)):
        direction = torch.randn(point.shape, generator=generator)
        fd = _central(lambda p: q(**{name: p}), point, direction, 1e-6)
        assert _relative(float(gradient @ direction), fd) < tolerance, name


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_hypergradients_match_unrolled_reverse_mode(float64, momentum):
    loss, objective, size = tanh_net_problem()
    theta0 = 0.5 * torch.randn(size)
    hyper = torch.tensor([math.log(1e-2)])
    lr, gammas = schedules(60, lr=0.2, momentum=momentum)
    result = rmad(loss, objective, theta0, hyper, lr, gammas)
    leaves = [x.clone().requires_grad_(True) for x in (theta0, hyper, lr, gammas)]
    final = sgd_momentum(loss, *leaves, create_graph=True, momentum_bits=MOMENTUM_BITS)
    exact = torch.autograd.grad(objective(final, leaves[1]), leaves)
    # the trajectories differ by ~60 roundings of 2^-44, so do the gradients
    for got, want in zip((result.theta0, result.hyper, result.lr, result.momentum), exact):
        assert (got - want).norm() <= 1e-8 * want.norm()


def naive_float_reversal(loss, theta0, hyper, lr, momentum):
    """Run the float dynamics forward, then back by θ ← θ − αv, v ← (v + (1−γ)g)/γ."""
    theta, velocity = theta0.clone(), torch.zeros_like(theta0)

    def gradient(theta, step):
        point = theta.detach().requires_grad_(True)
        return torch.autograd.grad(loss(point, hyper, step), point)[0]

    for step in range(len(lr)):
        velocity = momentum[step] * velocity - (1 - momentum[step]) * gradient(theta, step)
        theta = theta + lr[step] * velocity
    for step in reversed(range(len(lr))):
        theta = theta - lr[step] * velocity
        velocity = (velocity + (1 - momentum[step]) * gradient(theta, step)) / momentum[step]
    return theta


def test_naive_float32_reversal_fails_where_exact_reversal_succeeds():
    loss, objective, size = tanh_net_problem(dtype=torch.float32)
    theta0 = 0.5 * torch.randn(size)
    hyper = torch.tensor([math.log(1e-3)])
    lr, momentum = torch.full((200,), 0.2), torch.full((200,), 0.5)
    naive = naive_float_reversal(loss, theta0, hyper, lr, momentum)
    error = (naive - theta0).abs().max()
    # float32 rounding (~1e-7) doubles at every reversed step: it is lost long before 200
    assert not torch.isfinite(error) or error > 1.0, float(error)
    result = rmad(loss, objective, theta0, hyper, lr, momentum)
    assert result.diagnostics["reconstruction_exact"]
    assert torch.equal(result.diagnostics["theta0_reconstructed"], theta0)


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_buffer_grows_by_log2_inverse_momentum_bits_per_parameter_step(float64, momentum):
    loss, objective = logistic_problem()
    theta0, hyper = 0.1 * torch.randn(5), torch.full((5,), -2.0)
    bits = {}
    for num_steps in (100, 400):
        result = rmad(loss, objective, theta0, hyper, torch.full((num_steps,), 0.1),
                      torch.full((num_steps,), momentum))
        bits[num_steps] = result.diagnostics["buffer_bits"] / 5          # per parameter
        ideal = num_steps * math.log2(1 / momentum)
        # bounds: at most D + log2(1/(1-γ)) + 1 bits above η log2(1/γ), not below it
        assert ideal <= bits[num_steps] <= ideal + MOMENTUM_BITS + math.log2(
            1 / (1 - momentum)) + 1
    rate = (bits[400] - bits[100]) / 300                                   # bits / param / step
    assert abs(rate - math.log2(1 / momentum)) <= 0.02 * math.log2(1 / momentum), rate


@pytest.mark.parametrize("num_steps", [50, 51])        # even, and odd with an unpaired step
def test_information_buffer_inverts_multiplication_exactly(num_steps):
    generator = np.random.default_rng(0)
    z0 = generator.integers(-2**61, 2**61, size=1000, dtype=np.int64)
    numerators = generator.integers(1, 2**30, size=num_steps)
    buffer = InformationBuffer(z0.size, numerators, bits=30)
    z = z0
    for step, n in enumerate(numerators):
        expected = (z.astype(object) * int(n)) >> 30              # floor(z n / d), exact
        z = buffer.multiply(z, step)
        assert np.all(np.abs(z.astype(object) - expected) <= 1)  # off by < 1 unit
    bits = buffer.bit_lengths().mean()
    ideal = np.log2(2.0**30 / numerators).sum()
    assert ideal <= bits <= ideal + 30 + 1 + 30                   # + D, + z's own 30 low bits
    for step in reversed(range(num_steps)):
        z = buffer.divide(z, step)
    assert np.array_equal(z, z0) and buffer.is_empty()
    with pytest.raises(RuntimeError, match="divide expects step -1"):
        buffer.divide(z, 0)


def test_momentum_is_quantised_to_the_stated_precision(float64):
    momentum = torch.tensor([0.5, 0.9, 0.123456789, 0.999])
    exact = quantize_momentum(momentum, 30)
    assert torch.equal(exact * 2**30, torch.round(exact * 2**30))
    assert (exact - momentum).abs().max() <= 2.0**-31


def test_bad_schedules_and_inputs_raise_clear_errors(float64):
    loss, objective = logistic_problem()
    theta0, hyper = torch.zeros(5), torch.zeros(5)
    lr, momentum = torch.full((10,), 0.1), torch.full((10,), 0.9)
    cases = [
        (dict(lr=torch.tensor(0.1)), "lr must be a 1-D"),
        (dict(lr=torch.full((10, 2), 0.1)), "lr must be a 1-D"),
        (dict(lr=torch.full((10,), -0.1)), "lr must be > 0"),
        (dict(lr=torch.full((10,), math.nan)), "lr has non-finite"),
        (dict(momentum=torch.full((9,), 0.9)), "same length"),
        (dict(momentum=torch.full((10,), 1.0)), "momentum must lie in the open interval"),
        (dict(momentum=torch.zeros(10)), "momentum must lie in the open interval"),
        (dict(momentum=torch.full((10,), 1 - 1e-12)), "raise momentum_bits"),
        (dict(theta0=torch.zeros(5, 1)), "theta0 must be a flat 1-D"),
        (dict(hyper=torch.zeros((), dtype=torch.float64)), "hyper must be a flat 1-D"),
        (dict(fraction_bits=60), "fraction_bits must be an integer"),
        (dict(momentum_bits=31), "momentum_bits must be an integer"),
    ]
    for change, message in cases:
        arguments = dict(theta0=theta0, hyper=hyper, lr=lr, momentum=momentum)
        options = {k: change.pop(k) for k in ("fraction_bits", "momentum_bits") if k in change}
        arguments.update(change)
        with pytest.raises(ValueError, match=message):
            rmad(loss, objective, **arguments, **options)
    with pytest.raises(ValueError, match="loss must return a scalar"):
        rmad(lambda t, h, s: t**2, objective, theta0, hyper, lr, momentum)
    with pytest.raises(ValueError, match="lr must be > 0"):
        sgd_momentum(loss, theta0, hyper, torch.zeros(10), momentum)


def test_diverging_dynamics_raise_overflow_naming_the_fix(float64):
    def loss(theta, hyper, step):
        return 0.5 * (theta**2).sum()

    with pytest.raises(OverflowError, match="lower fraction_bits"):
        rmad(loss, loss, torch.ones(3), torch.zeros(1), torch.full((300,), 50.0),
             torch.full((300,), 0.5))


def test_nondeterministic_loss_is_detected(float64):
    loss, objective = logistic_problem()
    generator = torch.Generator().manual_seed(5)

    def noisy(theta, hyper, step):       # noise not seeded from step: differs in the reverse pass
        return loss(theta + 1e-9 * torch.randn(5, generator=generator), hyper, step)

    with pytest.warns(ReconstructionWarning, match="deterministic"):
        result = rmad(noisy, objective, torch.zeros(5), torch.zeros(5), torch.full((30,), 0.1),
                      torch.full((30,), 0.5))
    assert not result.diagnostics["reconstruction_exact"]
