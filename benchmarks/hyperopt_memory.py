"""Peak memory and time of ``unrolled`` vs ``rmad`` hypergradients on digits (prints JSON).

Usage::

    python benchmarks/hyperopt_memory.py            # eta = 100 and 1000
    python benchmarks/hyperopt_memory.py --quick    # eta = 10 and 50 (a minute)

The problem goes through the Pyro bridge
(:func:`pyro_structsel.hyper.hyperopt.hyperparameter_problem`): a
:class:`~pyro_structsel.NetworkModel` of the ``two_hidden_layer`` family on
scikit-learn's digits (Concrete prior on the two activation sites, since
Dirichlet samples cannot be differentiated twice), the default guide
(mean-field normal weights, Concrete Γ), :math:`L = -\\mathrm{ELBO}` on the
training rows, :math:`Q` = held-out negative log predictive density, and
:math:`h` = the per-layer prior scales (``"net.prior_scale"``, one per layer).
The inner run is :math:`\\eta` steps of SGD with momentum 0.9 and learning rate
0.001 (float64). At 0.005 the :math:`\\eta = 1000` run diverged (Q 85-89
against 49 at :math:`\\eta = 100`) and both hypergradients reached ~1e15, the
two trajectories (float64 and RMAD's fixed point) then disagreeing by 130 %.

Each (method, :math:`\\eta`) runs in a fresh subprocess: it builds the problem,
evaluates the loss and its gradient once (so libraries and allocator pools are
loaded), reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the baseline),
computes the hypergradient, and reads it again (the peak). ``extra_mib`` =
peak − baseline is the memory the method itself needed; tracemalloc would not
see torch's CPU allocator. The parent reports the ratio of rmad's extra memory
to unrolled's at each :math:`\\eta`, the relative difference of their
hypergradients, and rmad's information-buffer size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

TRAIN_ROWS = 256   # training rows (stratified subsample of digits), full batch
VALID_ROWS = 128   # held-out rows for Q
HIDDEN = (32, 32)  # widths of the two hidden layers
ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
LR, MOMENTUM = 0.001, 0.9  # at lr = 0.005 the eta = 1000 run diverged (see the docstring)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(method: str, steps: int, learning_rate: float = LR) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    import pyro_structsel as ps
    from pyro_structsel.hyper import hypergradients, hyperopt
    from pyro_structsel.hyper.reversible import rmad

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the network's initial weights (theta0): the same in every process
    data = ps.load_digits(subsample=TRAIN_ROWS + VALID_ROWS,
                          test_size=VALID_ROWS / (TRAIN_ROWS + VALID_ROWS), seed=0)
    x, y = data.x_train.double(), data.y_train
    x_valid, y_valid = data.x_test.double(), data.y_test
    model = ps.NetworkModel(
        ps.two_hidden_layer(data.num_features, data.num_classes, hidden=HIDDEN,
                            activations=ACTIVATIONS).double(),
        likelihood="categorical", prior="concrete", learn_prior_scale=True)
    (problem,) = hyperopt.hyperparameter_problem(
        model, x, y, hyperparameters=["net.prior_scale"], criterion="validation",
        validation=(x_valid, y_valid), num_objective_samples=4, seed=0)
    theta0, hyper = problem.theta0, problem.hyper0
    lr = torch.full((steps,), learning_rate)
    momentum = torch.full((steps,), MOMENTUM)
    point = theta0.clone().requires_grad_(True)            # warm-up: one loss and gradient
    torch.autograd.grad(problem.loss(point, hyper, 0), point)
    baseline = _maxrss_mib()
    start = time.perf_counter()
    function = hypergradients.unrolled if method == "unrolled" else rmad
    result = function(problem.loss, problem.objective, theta0, hyper, lr, momentum)
    seconds = time.perf_counter() - start
    peak = _maxrss_mib()
    out: dict[str, Any] = {
        "method": method, "eta": steps, "seconds": seconds, "baseline_mib": baseline,
        "peak_mib": peak, "extra_mib": peak - baseline, "parameters": theta0.numel(),
        "hyperparameters": hyper.numel(), "objective": result.objective,
        "hypergradient": result.hyper.tolist(), "lr_gradient_sum": float(result.lr.sum())}
    if method == "rmad":
        d = result.diagnostics
        out.update({key: d[key] for key in (
            "reconstruction_exact", "buffer_bits", "buffer_bytes", "bits_per_parameter_step",
            "ideal_bits_per_parameter_step", "forward_seconds", "reverse_seconds",
            "buffer_seconds")})
        out["buffer_mib"] = d["buffer_bytes"] / 2 ** 20
    return out


def run_child(method: str, steps: int, learning_rate: float) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", method, str(steps),
               str(learning_rate)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at eta={steps} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="eta = 10 and 50")
    parser.add_argument("--lr", type=float, default=LR, help=f"inner learning rate ({LR})")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "ETA", "LR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), float(args.child[2]))))
        return
    etas = (10, 50) if args.quick else (100, 1000)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {"data": f"digits, {TRAIN_ROWS} training rows (full batch), {VALID_ROWS} "
                          "held-out rows", "family": f"two_hidden_layer hidden={HIDDEN}, "
                                                    f"{len(ACTIVATIONS)} activations, Concrete "
                                                    "prior", "dtype": "float64",
                  "hyperparameters": "net.prior_scale (one per layer)",
                  "criterion": "validation", "lr": args.lr, "momentum": MOMENTUM,
                  "note": "width and rows chosen small so that unrolled at eta = 1000 fits in "
                          "memory and time on a 2-core, 24 GiB machine"},
        "runs": [], "comparison": []}
    for steps in etas:
        runs = {method: run_child(method, steps, args.lr) for method in ("unrolled", "rmad")}
        report["runs"] += list(runs.values())
        u, r = runs["unrolled"], runs["rmad"]
        gu, gr = u["hypergradient"], r["hypergradient"]
        diff = sum((a - b) ** 2 for a, b in zip(gu, gr)) ** 0.5
        norm = sum(a ** 2 for a in gu) ** 0.5
        report["comparison"].append({
            "eta": steps,
            "rmad_extra_over_unrolled_extra": r["extra_mib"] / max(u["extra_mib"], 1e-9),
            "unrolled_extra_mib": u["extra_mib"], "rmad_extra_mib": r["extra_mib"],
            "rmad_over_unrolled_seconds": r["seconds"] / u["seconds"],
            "hypergradient_relative_difference": diff / max(norm, 1e-300),
            "objective_difference": r["objective"] - u["objective"],
            "rmad_reconstruction_exact": r["reconstruction_exact"],
            "rmad_buffer_mib": r["buffer_mib"],
            "target_met": r["extra_mib"] <= u["extra_mib"] / 10 if steps >= 1000 else None})
        print(json.dumps(report["comparison"][-1]), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
