"""Speed of select_structure's fit against a plain PyTorch DARTS supernet (prints JSON).

Usage::

    python benchmarks/speed.py            # full: widths 64 and 256, N up to 1e5, 3 teachers
    python benchmarks/speed.py --quick    # short version (a minute or two)

(i) ``ratio``: time per SVI step of ``select_structure`` on the digits
two-hidden-layer family (4 candidate activations per layer, batch 256, Adam)
over the time per step of a plain PyTorch DARTS supernet of the same
architecture (Linear → softmax(α)-mixed activations → Linear → mixed →
Linear, point estimates, ``torch.optim.Adam``), run in the same process,
interleaved in rounds; the ratio of each round is taken and the median over
rounds reported. Variants: the stock Pyro path (``fast=False``:
TraceMeanField_ELBO + per-tensor ``pyro.optim.Adam``), the fast path
(default: the traced ELBO step + ``FlatAdam``), the traced step with Pyro's Adam
(the optimiser lever alone), at 1 and 2 torch threads. ``elbo_levers``: time
of one ``loss_and_grads`` alone for the stock ELBO, Pyro's
``JitTraceMeanField_ELBO`` and the traced ELBO step.

(ii) ``scaling``: seconds per epoch (N / 256 steps) and peak resident memory
of the fast fit on N synthetic points, each N in a fresh subprocess reading
``ru_maxrss``; the data alone take N × 65 × 4 bytes.

(iii) ``teacher``: steps and seconds until the structure read off q (argmax
of the Dirichlet concentration) equals the teacher's activation and stays so
to the end, on the synthetic teacher of ``tests/test_recovery.py``.
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
import time
import warnings
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from pyro_structsel.infer.traced import TracedELBO  # noqa: E402
from pyro_structsel.infer.guides import build_guide
from pyro_structsel.infer.scope import model_sites_and_params  # noqa: E402
from pyro_structsel.infer.svi import FactorisedELBO  # noqa: E402

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
BATCH = 256
LR = 0.01


class Supernet(nn.Module):
    """DARTS-style supernet: softmax(α)-mixed activations between three Linear layers."""

    def __init__(self, d_in: int, width: int, d_out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_in, width), nn.Linear(width, width),
                                     nn.Linear(width, d_out)])
        self.alphas = nn.ParameterList([nn.Parameter(torch.zeros(len(ACTIVATIONS)))
                                        for _ in range(2)])
        self.acts = [ps.model.family.activation(a) for a in ACTIVATIONS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, alpha in zip(self.layers, self.alphas):
            z = layer(x)
            weights = torch.softmax(alpha, 0)
            x = sum(weights[k] * act(z) for k, act in enumerate(self.acts))
        return self.layers[-1](x)


def _per_step(stamps: list[float], skip: int) -> float:
    diffs = [b - a for a, b in zip(stamps, stamps[1:])][skip:]
    return statistics.median(diffs)


def darts_step(x: torch.Tensor, y: torch.Tensor, width: int, steps: int) -> float:
    torch.manual_seed(0)
    net = Supernet(x.shape[1], width, int(y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    stamps = []
    for _ in range(steps):
        idx = torch.randperm(len(x))[:BATCH]
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return _per_step(stamps, 10)


def ours_step(x: torch.Tensor, y: torch.Tensor, width: int, steps: int, **options: Any
              ) -> float:
    stamps: list[float] = []
    torch.manual_seed(0)
    model = ps.NetworkModel(ps.two_hidden_layer(x.shape[1], int(y.max()) + 1,
                                                hidden=(width, width), activations=ACTIVATIONS))
    ps.select_structure(model, x, y, batch_size=BATCH, num_steps=steps, lr=LR, seed=0,
                        progress=False, num_evidence_samples=5,
                        callback=lambda step, loss: stamps.append(time.perf_counter()),
                        **options)
    return _per_step(stamps, 10)


def ratio(widths: list[int], threads: list[int], rounds: int, steps: int) -> dict[str, Any]:
    data = ps.load_digits()
    x, y = data.x_train, data.y_train
    variants = {"stock": {"fast": False}, "fast": {},
                "fast_elbo_pyro_adam": {"optim": pyro.optim.Adam({"lr": LR})}}
    out: dict[str, Any] = {}
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        for width in widths:
            times: dict[str, list[float]] = {"darts": [], **{k: [] for k in variants}}
            for _ in range(rounds):  # interleaved: each round runs every variant once
                times["darts"].append(darts_step(x, y, width, steps))
                for name, options in variants.items():
                    if "optim" in options:
                        options = {"optim": pyro.optim.Adam({"lr": LR})}
                    times[name].append(ours_step(x, y, width, steps, **options))
            entry: dict[str, Any] = {"darts_ms": 1e3 * statistics.median(times["darts"])}
            for name in variants:
                entry[f"{name}_ms"] = 1e3 * statistics.median(times[name])
                entry[f"{name}_ratio"] = statistics.median(
                    t / d for t, d in zip(times[name], times["darts"]))
            out[f"threads={num_threads},width={width}"] = {k: round(v, 3)
                                                            for k, v in entry.items()}
    return out


def elbo_levers(width: int, repeats: int) -> dict[str, Any]:
    """Time of one loss_and_grads (ms) per ELBO, same model, guide and minibatch size."""
    torch.set_num_threads(1)
    data = ps.load_digits()
    x, y = data.x_train, data.y_train
    model = ps.NetworkModel(ps.two_hidden_layer(64, 10, hidden=(width, width)))
    kwargs = {"batch_size": BATCH}
    sites, _ = model_sites_and_params(model, (x, y), kwargs)
    out: dict[str, Any] = {}
    with pyro.get_param_store().scope():
        guide = build_guide(model, None, sites, (x, y), kwargs, None)
        guide(x, y, **kwargs)
        elbos: dict[str, Any] = {
            "stock_trace_mean_field": FactorisedELBO(max_plate_nesting=1),
            "jit_trace_mean_field": pyro.infer.JitTraceMeanField_ELBO(
                max_plate_nesting=1, ignore_jit_warnings=True),
            "traced": TracedELBO(model, guide, (x, y), kwargs,
                                 elbo=FactorisedELBO(max_plate_nesting=1))}
        params = [p for _, p in pyro.get_param_store().named_parameters()]
        for name, elbo in elbos.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the JIT ELBO's mean-field order warning
                out.update(_time_elbo(name, elbo, model, guide, x, y, kwargs, params, repeats))
    return out


def _time_elbo(name: str, elbo: Any, model: Any, guide: Any, x: torch.Tensor, y: torch.Tensor,
               kwargs: dict[str, Any], params: list[torch.Tensor], repeats: int
               ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        for _ in range(5):
            elbo.loss_and_grads(model, guide, x, y, **kwargs)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            elbo.loss_and_grads(model, guide, x, y, **kwargs)
            samples.append(time.perf_counter() - start)
            for p in params:
                p.grad = None
        out[f"{name}_ms"] = round(1e3 * statistics.median(samples), 3)
    except Exception as error:  # noqa: BLE001 -- report the lever as not applicable
        out[f"{name}_ms"] = f"failed: {type(error).__name__}: {str(error)[:60]}"
    return out


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
                        progress=False, num_evidence_samples=2,
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
        for fast in (True, False):
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
                    "pyro": pyro.__version__, "batch_size": BATCH},
        "command": "python benchmarks/speed.py" + (" --quick" if quick else ""),
        "ratio": ratio([64] if quick else [64, 256], [1] if quick else [1, 2],
                       rounds=3 if quick else 5, steps=60 if quick else 150),
        "elbo_levers": elbo_levers(64, repeats=50 if quick else 200),
        "scaling": scaling([1000, 10000] if quick else [1000, 10000, 100000],
                           epochs=1 if quick else 2),
        "teacher": teacher([0] if quick else [0, 1, 2], steps=300),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
