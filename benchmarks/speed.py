"""Speed of a fit: the traced and compiled SVI step against a plain PyTorch supernet (JSON).

Usage::

    python benchmarks/speed.py            # full: 2 models x widths 64, 256 x batches 64,
                                          # 256, 1024 x threads 1, 2; scaling; teacher
    python benchmarks/speed.py --quick    # one size per model, one thread (a few minutes)

(i) ``steps``: time per SVI step of two models against a plain eager PyTorch
DARTS supernet of the same architecture (softmax(α)-mixed activations,
point estimates, ``torch.optim.Adam``, the same minibatch size), in the same
process, interleaved in rounds; the ratio of each round is taken and the
median and the minimum over rounds reported. The models: ``user``, the
supernet a user writes in Pyro (digits, one ``ps.structure`` site over
relu/tanh/sigmoid/identity, ``W1``, ``b1``, ``W2``, ``b2`` as ``pyro.sample``
Normal sites, ``pyro.plate(..., subsample_size=batch)``; its supernet has
one hidden layer), and ``network``, ``ps.NetworkModel`` of the
two-hidden-layer family (two sites; its supernet has two hidden layers),
each with the default guide. Variants, all stepped by ``FlatAdam``: ``pyro``
(Pyro's ``TraceMeanField_ELBO``), ``traced`` (``TracedELBO``) and
``compiled`` (``TracedELBO.compile()``). A step here is ``loss_and_grads``,
the Adam update and dropping the gradients; ``fit`` adds its non-finite
checks (the ``fit`` rows time ``fit`` itself). ``trace_s`` and
``compile_s`` are the seconds spent building (cold: a fresh inductor cache
for the run); ``break_even_trace`` = trace_s / (pyro - traced) and
``break_even_compile`` = compile_s / (traced - compiled), in steps.

(ii) ``inner_run``: an inner run of ``optimize_hyperparameters`` (SGD with
momentum on θ, ``NetworkModel`` width 64, minibatch 256) with autograd through
Pyro's ELBO against the traced step (``HyperparameterProblem.gradient``).
``direct_compile``: what ``torch._dynamo.explain`` makes of Pyro's own
``differentiable_loss`` (the alternative to tracing with make_fx).

(iii) ``scaling``: seconds per epoch (N / 256 steps) and peak resident memory
of a fit on N synthetic points, each N in a fresh subprocess reading
``ru_maxrss``; the data alone take N × 65 × 4 bytes.

(iv) ``teacher``: steps and seconds until the structure read off q (argmax
of the Dirichlet concentration) equals the teacher's activation and stays so
to the end, on the synthetic teacher of ``tests/test_recovery.py``.

No GPU row: no GPU machine was lent to this work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# compile seconds are reported cold: a fresh inductor cache for this run
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="speed-inductor-"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from pyro_structsel.infer.guides import build_guide  # noqa: E402
from pyro_structsel.infer.optim import FlatAdam  # noqa: E402
from pyro_structsel.infer.scope import model_sites_and_params  # noqa: E402
from pyro_structsel.infer.svi import FactorisedELBO, fit  # noqa: E402
from pyro_structsel.infer.traced import TracedELBO  # noqa: E402

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
FUNCTIONS = [torch.relu, torch.tanh, torch.sigmoid, lambda z: z]
BATCH = 256
LR = 0.01


class Supernet(nn.Module):
    """DARTS-style supernet: softmax(α)-mixed activations after each hidden Linear layer."""

    def __init__(self, d_in: int, widths: tuple[int, ...], d_out: int) -> None:
        super().__init__()
        sizes = (d_in, *widths, d_out)
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
        self.alphas = nn.ParameterList([nn.Parameter(torch.zeros(len(ACTIVATIONS)))
                                        for _ in widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, alpha in zip(self.layers, self.alphas):
            z = layer(x)
            weights = torch.softmax(alpha, 0)
            x = sum(weights[k] * f(z) for k, f in enumerate(FUNCTIONS))
        return self.layers[-1](x)


def user_model(width: int, batch: int) -> Any:
    """The supernet a user writes in Pyro: one structural site, Normal weights, a minibatch."""

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        gamma = ps.structure("activation", ACTIVATIONS)
        w1 = pyro.sample("W1", dist.Normal(torch.zeros(x.shape[1], width), 1.0).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(torch.zeros(width), 1.0).to_event(1))
        w2 = pyro.sample("W2", dist.Normal(torch.zeros(width, 10), 1.0).to_event(2))
        b2 = pyro.sample("b2", dist.Normal(torch.zeros(10), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
            z = x[idx] @ w1 + b1
            h = sum(gamma[k] * f(z) for k, f in enumerate(FUNCTIONS))
            pyro.sample("y", dist.Categorical(logits=h @ w2 + b2),
                        obs=None if y is None else y[idx])

    return model


def _per_step(stamps: list[float], skip: int = 10) -> float:
    return statistics.median([b - a for a, b in zip(stamps, stamps[1:])][skip:])


def darts_steps(net: Supernet, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int
                ) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    stamps = []
    for _ in range(steps):
        idx = torch.randperm(len(x))[:batch]
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return _per_step(stamps)


def svi_steps(elbo: Any, model: Any, guide: Any, args: tuple, kwargs: dict, steps: int
              ) -> float:
    """Seconds per step: loss_and_grads, one FlatAdam update, gradients dropped."""
    optim = FlatAdam({"lr": LR})
    stamps = []
    for _ in range(steps):
        if isinstance(elbo, TracedELBO):
            elbo.loss_and_grads(model, guide, *args, **kwargs)
            params = list(elbo.parameters_read().values())
        else:
            with pyro.poutine.trace(param_only=True) as capture:
                elbo.loss_and_grads(model, guide, *args, **kwargs)
            params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
        optim(params)
        for param in params:
            param.grad = None
        stamps.append(time.perf_counter())
    return _per_step(stamps)


def _setup(kind: str, width: int, batch: int, x: torch.Tensor, y: torch.Tensor
           ) -> tuple[Any, Any, tuple, dict, Supernet]:
    torch.manual_seed(0)
    if kind == "user":
        model, kwargs, widths = user_model(width, batch), {}, (width,)
    else:
        model = ps.NetworkModel(ps.two_hidden_layer(x.shape[1], 10, hidden=(width, width),
                                                    activations=ACTIVATIONS))
        kwargs, widths = {"batch_size": batch}, (width, width)
    sites, _ = model_sites_and_params(model, (x, y), kwargs)
    guide = build_guide(model, None, sites, (x, y), kwargs, None)
    with torch.no_grad():
        guide(x, y, **kwargs)
    return model, guide, (x, y), kwargs, Supernet(x.shape[1], widths, 10)


def steps_rows(kinds: list[str], widths: list[int], batches: list[int], threads: list[int],
               rounds: int, steps: int) -> list[dict[str, Any]]:
    data = ps.load_digits()
    x, y = data.x_train, data.y_train
    rows = []
    for kind in kinds:
        for width in widths:
            for batch in batches:
                with pyro.get_param_store().scope():
                    rows += _config_rows(kind, width, batch, threads, rounds, steps, x, y)
    return rows


def _config_rows(kind: str, width: int, batch: int, threads: list[int], rounds: int,
                 steps: int, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    model, guide, args, kwargs, net = _setup(kind, width, batch, x, y)
    stock = FactorisedELBO(max_plate_nesting=1)
    traced = TracedELBO(model, guide, args, kwargs, elbo=stock)
    compiled = TracedELBO(model, guide, args, kwargs, elbo=stock)
    compile_s = compiled.compile()
    out = []
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        times: dict[str, list[float]] = {"darts": [], "pyro": [], "traced": [], "compiled": []}
        for _ in range(rounds):  # interleaved: each round runs every variant once
            times["darts"].append(darts_steps(net, x, y, batch, steps))
            times["pyro"].append(svi_steps(stock, model, guide, args, kwargs, steps))
            times["traced"].append(svi_steps(traced, model, guide, args, kwargs, steps))
            times["compiled"].append(svi_steps(compiled, model, guide, args, kwargs, steps))
        row: dict[str, Any] = {"model": kind, "width": width, "batch": batch,
                               "threads": num_threads, "nodes": traced.num_nodes,
                               "trace_s": round(traced.trace_seconds, 2),
                               "compile_s": round(compile_s, 1)}
        for name, samples in times.items():
            row[f"{name}_ms"] = round(1e3 * statistics.median(samples), 3)
            if name != "darts":
                ratios = [t / d for t, d in zip(samples, times["darts"])]
                row[f"{name}_ratio"] = round(statistics.median(ratios), 2)
                row[f"{name}_ratio_min"] = round(min(ratios), 2)
        saved_trace = (row["pyro_ms"] - row["traced_ms"]) / 1e3
        saved_compile = (row["traced_ms"] - row["compiled_ms"]) / 1e3
        row["break_even_trace"] = round(traced.trace_seconds / saved_trace) \
            if saved_trace > 0 else None
        row["break_even_compile"] = round(compile_s / saved_compile) \
            if saved_compile > 0 else None
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    return out


def fit_rows(steps: int, rounds: int) -> list[dict[str, Any]]:
    """``fit`` itself (traced, with its checks) against the supernet: width 64, batch 256."""
    data = ps.load_digits()
    x, y = data.x_train, data.y_train
    torch.set_num_threads(1)
    rows = []
    for kind in ("user", "network"):
        ratios, darts, ours = [], [], []
        for _ in range(rounds):
            with pyro.get_param_store().scope():
                model, guide, args, kwargs, net = _setup(kind, 64, BATCH, x, y)
                stamps: list[float] = []
                fit(model, guide, args, kwargs, num_steps=steps, optim=FlatAdam({"lr": LR}),
                    progress=False, fast=True, compile=False,
                    callback=lambda step, loss: stamps.append(time.perf_counter()))
            ours.append(_per_step(stamps))
            darts.append(darts_steps(net, x, y, BATCH, steps))
            ratios.append(ours[-1] / darts[-1])
        rows.append({"model": kind, "width": 64, "batch": BATCH, "threads": 1,
                     "fit_traced_ms": round(1e3 * statistics.median(ours), 3),
                     "darts_ms": round(1e3 * statistics.median(darts), 3),
                     "fit_traced_ratio": round(statistics.median(ratios), 2),
                     "fit_traced_ratio_min": round(min(ratios), 2)})
    return rows


def inner_run(steps: int) -> dict[str, Any]:
    """An inner run of optimize_hyperparameters (SGD with momentum on θ), autograd vs traced.

    NetworkModel of the two-hidden-layer family (width 64, minibatch 256, learnable prior
    scales as the hyperparameters), ``steps`` steps; the traced run's first call traces.
    """
    from pyro_structsel.hyper import hyperopt
    from pyro_structsel.hyper.reversible import sgd_momentum

    torch.set_num_threads(1)
    data = ps.load_digits()
    model = ps.NetworkModel(ps.two_hidden_layer(64, 10, hidden=(64, 64),
                                                activations=ACTIVATIONS),
                            learn_prior_scale=True)
    (problem,) = hyperopt.hyperparameter_problem(
        model, data.x_train, data.y_train, hyperparameters=["net.prior_scale"], seed=0,
        batch_size=BATCH)
    lr, momentum = torch.full((steps,), 0.01), torch.full((steps,), 0.9)
    start = time.perf_counter()
    eager = sgd_momentum(problem.loss, problem.theta0, problem.hyper0, lr, momentum)
    middle = time.perf_counter()
    traced = sgd_momentum(problem.loss, problem.theta0, problem.hyper0, lr, momentum,
                          gradient=problem.gradient)
    end = time.perf_counter()
    trace_s = problem._traced_elbo().trace_seconds
    return {"steps": steps, "autograd_ms_per_step": round(1e3 * (middle - start) / steps, 3),
            "traced_ms_per_step": round(1e3 * (end - middle - trace_s) / steps, 3),
            "trace_s": round(trace_s, 2),
            "max_abs_difference": float((traced - eager).abs().max())}


def direct_compile() -> dict[str, Any]:
    """Graph breaks of ``torch._dynamo`` on Pyro's own loss (the user model, width 64)."""
    import torch._dynamo

    data = ps.load_digits()
    x, y = data.x_train, data.y_train
    with pyro.get_param_store().scope():
        model, guide, args, kwargs, _ = _setup("user", 64, BATCH, x, y)
        elbo = FactorisedELBO(max_plate_nesting=1)
        explained = torch._dynamo.explain(
            lambda: elbo.differentiable_loss(model, guide, *args, **kwargs))()
    reasons = sorted({str(r.reason).splitlines()[0][:80] for r in explained.break_reasons})
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "reasons": reasons[:5]}


def scaling_child(num: int, epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num, 64, generator=g)
    y = torch.randint(0, 10, (num,), generator=g)
    model = ps.NetworkModel(ps.two_hidden_layer(64, 10, hidden=(64, 64)))
    steps = max(2, epochs * num // BATCH)
    stamps: list[float] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ps.select_structure(model, x, y, batch_size=BATCH, num_steps=steps, lr=LR, seed=0,
                        progress=False, num_evidence_samples=2, fast=True, compile=False,
                        callback=lambda step, loss: stamps.append(time.perf_counter()))
    per_step = statistics.mean(b - a for a, b in zip(stamps, stamps[1:]))
    return {"N": num, "steps": steps, "seconds_per_epoch": per_step * num / BATCH,
            "ms_per_step": 1e3 * per_step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_fit_mb": rss_before / 1024, "data_mb": num * 65 * 4 / 2 ** 20}


def scaling(sizes: list[int], epochs: int) -> list[dict[str, Any]]:
    rows = []
    for num in sizes:
        done = subprocess.run([sys.executable, __file__, "--scaling-child", str(num),
                               "--epochs", str(epochs)], capture_output=True, text=True,
                              check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        rows.append({k: round(v, 3) if isinstance(v, float) else v
                     for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()})
    return rows


def teacher(seeds: list[int], steps: int) -> list[dict[str, Any]]:
    from test_recovery import TEACHER_LABELS, Teacher

    torch.set_num_threads(1)
    spec = Teacher()
    rows = []
    for seed in seeds:
        label = TEACHER_LABELS[seed % len(TEACHER_LABELS)]
        x, y = spec.data(seed, label)
        for fast in (True, False):  # the traced step and Pyro's ELBO
            pyro.set_rng_seed(seed)
            model = spec.model("dirichlet")
            labels = model.net.mixed_ops["activation"][1].labels
            trail: list[tuple[float, str]] = []

            def record(step: int, loss: float) -> None:
                name = next(n for n in pyro.get_param_store().keys()
                            if n.endswith("concentrations.activation"))
                index = int(pyro.param(name).detach().argmax())
                trail.append((time.perf_counter(), labels[index]))

            start = time.perf_counter()
            result = ps.select_structure(model, x, y, num_steps=steps, lr=0.05, seed=seed,
                                         progress=False, num_evidence_samples=20,
                                         callback=record, fast=fast)
            first = None
            for step in range(len(trail) - 1, -1, -1):  # the last step from which it stays
                if trail[step][1] != label:
                    break
                first = step
            rows.append({"seed": seed, "teacher": label, "fast": fast,
                         "chosen": result.structure["activation"],
                         "steps_to_correct": None if first is None else first + 1,
                         "seconds_to_correct": None if first is None
                         else round(trail[first][0] - start, 3),
                         "ms_per_step": round(1e3 * (trail[-1][0] - trail[0][0])
                                              / (len(trail) - 1), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version")
    parser.add_argument("--scaling-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scaling_child is not None:
        print(json.dumps(scaling_child(args.scaling_child, args.epochs)))
        return
    quick = args.quick
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "torch": torch.__version__,
                    "pyro": pyro.__version__,
                    "gpu": "none: no GPU machine was lent to this work, so no GPU row"},
        "command": "python benchmarks/speed.py" + (" --quick" if quick else ""),
        "steps": steps_rows(["user", "network"], [64] if quick else [64, 256],
                            [256] if quick else [64, 256, 1024], [1] if quick else [1, 2],
                            rounds=3 if quick else 5, steps=100 if quick else 150),
        "fit": fit_rows(steps=150, rounds=3),
        "inner_run": inner_run(steps=100 if quick else 300),
        "direct_compile": direct_compile(),
        "scaling": scaling([1000, 10000] if quick else [1000, 10000, 100000],
                           epochs=1 if quick else 2),
        "teacher": teacher([0] if quick else [0, 1, 2], steps=300),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
