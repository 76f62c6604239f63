"""Regret of select_structure's pick on user-written families, against held-out truth (JSON).

Each family is a two-hidden-layer classifier written as a user writes Pyro
(``pyro.sample`` weights with N(0, 1) priors, ``x @ W`` inside, one
``ps.structure`` site per layer over relu, tanh, identity). The truth of a
structure is the held-out log-likelihood per test point of networks of that
structure trained independently (MAP under the same prior from 0.1 x a
seeded prior draw: 300 Adam steps, then L-BFGS; several seeds). For each family and seed, ``select_structure`` runs
with its defaults (plus ``--steps``); the JSON gives the relaxed pick (the
argmax of q(Γ)) and the final pick (after the discrete check) side by side,
each with its regret (truth of the best structure minus truth of the pick,
nats per test point), the share of seeds within ``--tolerance`` of the best,
and the cost of the check.

Families (``--families``):

* ``digits16``: digits, 600 train / 1000 test rows, widths 16, full batch;
* ``digits32``: the same data, widths 32, minibatches of 128 rows
  (``ps.data_plate(..., subsample_size=128)``: a ``pyro.plate`` that the
  library's scoring can read in full);
* ``cancer16``, ``cancer32``: breast cancer (30 features, Bernoulli), 300 train
  rows, the rest for testing; the same two sizes.

Example::

    python benchmarks/selection_regret.py --families digits16 --seeds 0,1,2 \\
        --truth-dir /tmp/truth --out /tmp/regret.json

The truth is computed once per family (9 structures x ``--truth-seeds`` MAP
fits) and cached in ``--truth-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from structure_truth import log_joint, map_fit_model  # noqa: E402 (benchmarks/)

LABELS = ("relu", "tanh", "identity")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z}


def user_classifier(width: int, num_features: int, num_classes: int, *,
                    subsample_size: int | None = None, concentration: float = 1.0,
                    separate_weights: bool = False, prior: str = "dirichlet"
                    ) -> Callable[..., None]:
    """A two-hidden-layer classifier written in plain Pyro, as a user would."""
    out_dim = num_classes if num_classes > 2 else 1
    k = len(LABELS)

    def layer(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              gamma: torch.Tensor) -> torch.Tensor:
        out: Any = 0.0
        for i, label in enumerate(LABELS):
            if separate_weights:  # each candidate its own weights
                z = h @ w[..., i, :, :] + b[..., i, :].unsqueeze(-2)
            elif i == 0:
                z = h @ w + b.unsqueeze(-2)
            out = out + gamma[..., i, None, None] * ACTIVATIONS[label](z)
        return out

    def weights(name: str, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [k, fan_in, width] if separate_weights else [fan_in, width]
        w = pyro.sample(f"w{name}", dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
        b = pyro.sample(f"b{name}", dist.Normal(0.0, 1.0).expand(shape[:-2] + [width])
                        .to_event(len(shape) - 1))
        return w, b

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        options = {"concentration": concentration} if prior == "dirichlet" else {}
        g1 = ps.structure("layer1", LABELS, prior=prior, **options)
        g2 = ps.structure("layer2", LABELS, prior=prior, **options)
        w1, b1 = weights("1", num_features)
        w2, b2 = weights("2", width)
        w3 = pyro.sample("w3", dist.Normal(0.0, 1.0).expand([width, out_dim]).to_event(2))
        b3 = pyro.sample("b3", dist.Normal(0.0, 1.0).expand([out_dim]).to_event(1))
        with ps.data_plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            h = layer(x[idx], w1, b1, g1)
            h = layer(h, w2, b2, g2)
            f = h @ w3 + b3.unsqueeze(-2)
            obs = None if y is None else y[idx]
            if out_dim == 1:
                pyro.sample("y", dist.Bernoulli(logits=f.squeeze(-1)), obs=obs)
            else:
                pyro.sample("y", dist.Categorical(logits=f), obs=obs)

    return model


def load(name: str) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) of ``"digits"`` or ``"cancer"``."""
    if name == "digits":
        data = ps.load_digits(subsample=1600, test_size=1000 / 1600, seed=0)
        return data.x_train, data.y_train, data.x_test, data.y_test
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    bunch = load_breast_cancer()  # 569 rows: 300 to train (stratified), the rest to test
    x_tr, x_te, y_tr, y_te = train_test_split(bunch.data, bunch.target, train_size=300,
                                              stratify=bunch.target, random_state=0)
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


# ----------------------------------------------------------------------------- truth


def truth(model: Callable[..., Any], data: tuple[torch.Tensor, ...], seeds: range
          ) -> dict[str, list[float]]:
    """Held-out log-likelihood per test point, per structure label, one value per seed."""
    x, y, x_test, y_test = data
    out: dict[str, list[float]] = {}
    for structure in structures():
        fixed = ps.fix_structure(model, structure)
        out[ps.structure_label(structure)] = values = []
        for seed in seeds:
            weights = map_fit_model(fixed, x, y, seed)
            with torch.no_grad():
                values.append(float(log_joint(fixed, weights, x_test, y_test)[0]) / len(y_test))
    return out


FAMILIES: dict[str, dict[str, Any]] = {
    "digits16": {"data": "digits", "width": 16, "subsample_size": None},
    "digits32": {"data": "digits", "width": 32, "subsample_size": 128},
    "cancer16": {"data": "cancer", "width": 16, "subsample_size": None},
    "cancer32": {"data": "cancer", "width": 32, "subsample_size": 128},
}


def structures() -> list[dict[str, str]]:
    return [{"layer1": a, "layer2": b} for a, b in itertools.product(LABELS, LABELS)]


def family_truth(name: str, seeds: int, cache_dir: str | None) -> dict[str, list[float]]:
    """Held-out log-likelihood per point, per structure and training seed (cached)."""
    path = os.path.join(cache_dir, f"truth_{name}.json") if cache_dir else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
        if len(next(iter(cached.values()))) >= seeds:
            return {k: v[:seeds] for k, v in cached.items()}
    spec = FAMILIES[name]
    data = load(spec["data"])
    classes = int(data[1].max()) + 1 if spec["data"] == "digits" else 2
    model = user_classifier(spec["width"], data[0].shape[1], classes)  # MAP on all rows
    per_seed = truth(model, data, range(seeds))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(per_seed, handle, indent=1)
    return per_seed


def run_family(name: str, seeds: list[int], per_seed_truth: dict[str, list[float]], *,
               num_steps: int, tolerance: float, options: dict[str, Any]) -> dict[str, Any]:
    spec = FAMILIES[name]
    x, y, _, _ = load(spec["data"])
    classes = int(y.max()) + 1 if spec["data"] == "digits" else 2
    model = user_classifier(spec["width"], x.shape[1], classes,
                            subsample_size=spec["subsample_size"],
                            concentration=options.pop("concentration", 1.0),
                            separate_weights=options.pop("separate_weights", False),
                            prior=options.pop("prior", "dirichlet"))
    mean = {k: sum(v) / len(v) for k, v in per_seed_truth.items()}
    best = max(mean, key=mean.get)
    runs = []
    zero_init = options.pop("zero_init", False)
    for seed in seeds:
        if zero_init:  # the default guide with no starting values: zeros (a fresh one per fit)
            options["guide"] = ps.default_guide(model, ["layer1", "layer2"])
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ps.select_structure(model, x, y, num_steps=num_steps, seed=seed,
                                         progress=False, **options)
        seconds = time.perf_counter() - started
        relaxed = ps.structure_label(result.relaxed_structure)
        final = ps.structure_label(result.structure)
        check = result.discrete_check
        run = {
            "seed": seed, "relaxed_pick": relaxed, "final_pick": final,
            "relaxed_regret": mean[best] - mean[relaxed],
            "final_regret": mean[best] - mean[final],
            "relaxed_q": {n: [round(float(p), 4) for p in v]
                          for n, v in result.relaxed_probabilities.items()},
            "probabilities": {n: [round(float(p), 4) for p in v]
                              for n, v in result.probabilities.items()},
            "max_reported_probability": max(float(v.max()) for v in
                                             result.probabilities.values()),
            "seconds": seconds,
            "warnings": sorted({w.category.__name__ for w in caught}),
        }
        if check is not None:
            order = list(check.table.index)
            run.update({
                "check_fits": check.num_fits, "check_seconds": check.seconds,
                "check_agrees": check.agrees, "relaxed_rank": check.relaxed_rank,
                "evidence": {label: float(check.table.loc[label, "log_evidence"])
                             for label in order},
                "evidence_probability": {label: float(check.table.loc[label, "probability"])
                                         for label in order},
            })
        runs.append(run)
        print(json.dumps({"family": name, **run}), file=sys.stderr, flush=True)
    within = lambda key: sum(r[key] <= tolerance for r in runs) / len(runs)  # noqa: E731
    return {
        "truth_best": best, "truth_mean": mean,
        "truth_within_tolerance": sorted(k for k, v in mean.items()
                                         if mean[best] - v <= tolerance),
        "relaxed_share_within": within("relaxed_regret"),
        "final_share_within": within("final_regret"),
        "mean_relaxed_regret": sum(r["relaxed_regret"] for r in runs) / len(runs),
        "mean_final_regret": sum(r["final_regret"] for r in runs) / len(runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="digits16,digits32",
                        help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--truth-seeds", type=int, default=6)
    parser.add_argument("--truth-dir", default=None, help="cache of the truth per family")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="nats per test point from the best that count as a hit")
    parser.add_argument("--no-check", action="store_true", help="discrete_check=False")
    parser.add_argument("--check-steps", type=int, default=None)
    parser.add_argument("--concentration", type=float, default=1.0,
                        help="Dirichlet concentration of the structural prior")
    parser.add_argument("--separate-weights", action="store_true",
                        help="each candidate activation its own weights")
    parser.add_argument("--prior", default="dirichlet", choices=["dirichlet", "concrete"],
                        help="structural prior (and guide) family")
    parser.add_argument("--temperature", default=None,
                        help="Concrete guide temperature: T, or T0,T1 annealed")
    parser.add_argument("--zero-init", action="store_true",
                        help="weight means start at zero (the default guide before issue 15) "
                             "instead of shrunk prior draws")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict[str, Any] = {"settings": vars(args), "families": {}}
    for name in args.families.split(","):
        started = time.perf_counter()
        per_seed = family_truth(name, args.truth_seeds, args.truth_dir)
        truth_seconds = time.perf_counter() - started
        options: dict[str, Any] = {"concentration": args.concentration,
                                   "separate_weights": args.separate_weights,
                                   "prior": args.prior, "zero_init": args.zero_init}
        if args.temperature:
            values = [float(v) for v in args.temperature.split(",")]
            options["temperature"] = values[0] if len(values) == 1 else tuple(values)
        if args.no_check:
            options["discrete_check"] = False
        if args.check_steps:
            options["check_steps"] = args.check_steps
        with pyro.validation_enabled(False):  # speed only: the inputs are known to be valid
            out["families"][name] = run_family(name, seeds, per_seed, num_steps=args.steps,
                                               tolerance=args.tolerance, options=options)
        out["families"][name]["truth_seconds"] = truth_seconds
    text = json.dumps(out, indent=1, default=lambda v: None if isinstance(v, float)
                      and not math.isfinite(v) else str(v))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
