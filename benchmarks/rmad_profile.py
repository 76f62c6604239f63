"""Profile of exact-arithmetic RMAD (:func:`pyro_structsel.hyper.reversible.rmad`) on digits.

A tanh network 64-256-10 (19 210 parameters, float32) trained full batch on 500
digits with a log weight decay ``h``, Q = cross-entropy on 400 held-out digits.
For each momentum it runs, in one process (so the ratios are comparable on a
shared machine), plain :func:`~pyro_structsel.hyper.reversible.sgd_momentum` and
:func:`~pyro_structsel.hyper.reversible.rmad`, and reports their times, the ratio,
the time spent in the information buffer, its size in bits per parameter per
step against :math:`\\log_2(1/\\gamma)`, its bytes against the bytes of the
trajectory plain reverse mode would store (:math:`\\eta|\\theta|` floats for
:math:`\\theta` alone), and whether the reverse pass rebuilt :math:`\\theta_0`
exactly. ``--buffer`` also times the buffer alone, pairs of steps against one
step at a time.

Run: ``python benchmarks/rmad_profile.py [--steps 1000] [--buffer]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from pyro_structsel.datasets import load_digits
from pyro_structsel.hyper.reversible import InformationBuffer, rmad, sgd_momentum

HIDDEN = 256


def digits_problem(dtype: torch.dtype = torch.float32):
    data = load_digits()                     # standardised, stratified split
    x_train, y_train = data.x_train[:500].to(dtype), data.y_train[:500]
    x_valid, y_valid = data.x_test[:400].to(dtype), data.y_test[:400]
    dim, classes = data.num_features, data.num_classes
    sizes = [dim * HIDDEN, HIDDEN, HIDDEN * classes, classes]

    def forward(theta, inputs):
        w1, b1, w2, b2 = torch.split(theta, sizes)
        hidden = torch.tanh(inputs @ w1.view(dim, HIDDEN) + b1)
        return hidden @ w2.view(HIDDEN, classes) + b2

    def loss(theta, hyper, step):
        return F.cross_entropy(forward(theta, x_train), y_train) \
            + 0.5 * hyper.exp()[0] * (theta**2).sum()

    def objective(theta, hyper):
        return F.cross_entropy(forward(theta, x_valid), y_valid)

    generator = torch.Generator().manual_seed(0)
    theta0 = (0.1 * torch.randn(sum(sizes), generator=generator, dtype=torch.float64)).to(dtype)
    return loss, objective, theta0, torch.tensor([-6.0], dtype=dtype)


def profile(num_steps: int, momentum: float) -> dict:
    loss, objective, theta0, hyper = digits_problem()
    lr = torch.full((num_steps,), 0.5, dtype=torch.float64)
    gammas = torch.full((num_steps,), momentum, dtype=torch.float64)
    start = time.perf_counter()
    sgd_momentum(loss, theta0, hyper, lr, gammas)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    result = rmad(loss, objective, theta0, hyper, lr, gammas)
    total = time.perf_counter() - start
    d = result.diagnostics
    trajectory_bytes = num_steps * theta0.numel() * theta0.element_size()
    return {
        "parameters": theta0.numel(), "steps": num_steps, "momentum": momentum,
        "sgd_momentum_s": plain, "rmad_s": total, "rmad_over_sgd": total / plain,
        "forward_s": d["forward_seconds"], "reverse_s": d["reverse_seconds"],
        "buffer_s": d["buffer_seconds"], "buffer_share": d["buffer_seconds"] / total,
        "reconstruction_exact": d["reconstruction_exact"],
        "bits_per_parameter_step": d["bits_per_parameter_step"],
        "log2_inverse_momentum": d["ideal_bits_per_parameter_step"],
        "buffer_bytes": d["buffer_bytes"], "trajectory_bytes": trajectory_bytes,
        "buffer_over_trajectory": d["buffer_bytes"] / trajectory_bytes,
        "objective": result.objective,
    }


def buffer_only(size: int, num_steps: int, momentum: float) -> dict:
    numerator = int(round(momentum * 2**30))
    z0 = np.random.default_rng(0).integers(-2**50, 2**50, size, dtype=np.int64)
    out: dict = {"elements": size, "steps": num_steps, "momentum": momentum}
    for paired in (True, False, True, False):
        buffer = InformationBuffer(size, [numerator] * num_steps, 30)
        buffer._paired = paired
        z, start = z0, time.perf_counter()
        for step in range(num_steps):
            z = buffer.multiply(z, step)
        middle = time.perf_counter()
        for step in reversed(range(num_steps)):
            z = buffer.divide(z, step)
        end = time.perf_counter()
        assert np.array_equal(z, z0) and buffer.is_empty()
        key = "paired" if paired else "one_step"
        out.setdefault(key + "_forward_s", []).append(middle - start)
        out.setdefault(key + "_reverse_s", []).append(end - middle)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.9, 0.5])
    parser.add_argument("--buffer", action="store_true", help="also time the buffer alone")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"threads": args.threads, "rmad": [profile(args.steps, m) for m in args.momenta]}
    if args.buffer:
        report["buffer"] = [buffer_only(20_000, args.steps, m) for m in args.momenta]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
