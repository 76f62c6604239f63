"""Held-out "truth" for comparing structures of user-written Pyro networks.

A family is a user-written Pyro model (weights as ``pyro.sample`` sites,
``x @ W`` inside, ``ps.structure(...)`` sites choosing an activation per
layer) with a train/test split. The truth for a structure is the held-out
log-likelihood per test point of networks of that structure trained
independently (MAP under the same prior, several seeds). An estimator is
scored by how it orders the pairs of structures the truth can resolve.

Run ``python benchmarks/structure_truth.py --family digits`` for the truth
alone (JSON); :mod:`evidence_vs_truth` scores every estimator against it.
Functions (importable, e.g. ``sys.path.insert(0, "benchmarks")``):

* :func:`digits_family`, :func:`breast_cancer_family`: the families.
* :func:`map_fit`: MAP weights of a structure from a seeded start.
* :func:`held_out`: mean test log-likelihood per point at given weights.
* :func:`truth`: per structure and seed, the held-out log-likelihood.
* :func:`score_ordering`: resolved-pair share, Kendall tau, regret.
* :func:`seed_to_seed_tau`: the truth's own ceiling.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

import pyro_structsel as ps

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z}


@dataclass
class Family:
    """A user-written model family with its data."""

    name: str
    model: Callable[..., Any]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    structures: list[dict[str, str]] = field(default_factory=list)
    init_scale: float = 0.1


def mixed(gamma: torch.Tensor, h: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """sum_k gamma_k act_k(h) (``gamma`` may carry leading batch dimensions)."""
    out = 0.0
    for k, label in enumerate(labels):
        out = out + gamma[..., k, None, None] * ACTIVATIONS[label](h)
    return out


def make_classifier(width: int, num_features: int, num_classes: int,
                    labels: Sequence[str] = ("relu", "tanh", "identity"),
                    prior_scale: float = 1.0) -> Callable[..., Any]:
    """A two-hidden-layer classifier written as a user would (no NetworkModel)."""
    labels = list(labels)
    out_dim = num_classes if num_classes > 2 else 1

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        s = prior_scale
        w1 = pyro.sample("w1", dist.Normal(0.0, s).expand([num_features, width]).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(0.0, s).expand([width]).to_event(1))
        w2 = pyro.sample("w2", dist.Normal(0.0, s).expand([width, width]).to_event(2))
        b2 = pyro.sample("b2", dist.Normal(0.0, s).expand([width]).to_event(1))
        w3 = pyro.sample("w3", dist.Normal(0.0, s).expand([width, out_dim]).to_event(2))
        b3 = pyro.sample("b3", dist.Normal(0.0, s).expand([out_dim]).to_event(1))
        g1 = ps.structure("layer1", labels)
        g2 = ps.structure("layer2", labels)
        h = mixed(g1, x @ w1 + b1.unsqueeze(-2), labels)
        h = mixed(g2, h @ w2 + b2.unsqueeze(-2), labels)
        f = h @ w3 + b3.unsqueeze(-2)
        with pyro.plate("data", x.shape[0]):
            if out_dim == 1:
                pyro.sample("y", dist.Bernoulli(logits=f.squeeze(-1)), obs=y)
            else:
                pyro.sample("y", dist.Categorical(logits=f), obs=y)

    return model


def all_structures(labels: Sequence[str] = ("relu", "tanh", "identity")) -> list[dict[str, str]]:
    return [{"layer1": a, "layer2": b} for a, b in itertools.product(labels, labels)]


def digits_family(*, width: int = 16, num_train: int = 600, num_test: int = 1000,
                  seed: int = 0, prior_scale: float = 1.0) -> Family:
    """Digits, 64 features, 10 classes, ``num_train`` / ``num_test`` rows."""
    total = num_train + num_test
    data = ps.load_digits(subsample=total, test_size=num_test / total, seed=seed)
    assert len(data.y_train) == num_train, len(data.y_train)
    model = make_classifier(width, 64, 10, prior_scale=prior_scale)
    return Family("digits", model, data.x_train, data.y_train, data.x_test, data.y_test,
                  all_structures())


def breast_cancer_family(*, width: int = 16, num_train: int = 300, seed: int = 0,
                         prior_scale: float = 1.0) -> Family:
    """Breast cancer (30 features, benign/malignant), Bernoulli likelihood."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    bunch = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(bunch.data, bunch.target, train_size=num_train,
                                              stratify=bunch.target, random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    model = make_classifier(width, 30, 2, prior_scale=prior_scale)
    return Family("breast_cancer", model, as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te),
                  all_structures())


# ----------------------------------------------------------------------------- training


def _latent_names(model: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> list[str]:
    trace = poutine.trace(model).get_trace(x, y)
    return [n for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]


def log_joint(model: Callable[..., Any], values: Mapping[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log likelihood, log prior) of ``values`` (latents not given are drawn)."""
    trace = poutine.trace(poutine.condition(model, data=dict(values))).get_trace(x, y)
    lik = torch.zeros(())
    prior = torch.zeros(())
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["fn"].log_prob(site["value"]).sum()
        if name in values:
            prior = prior + lp
        elif site["is_observed"]:
            lik = lik + lp
    return lik, prior


def map_fit(family: Family, structure: Mapping[str, str], seed: int, *, adam_steps: int = 300,
            lbfgs_iter: int = 500, lr: float = 0.01) -> dict[str, torch.Tensor]:
    """MAP weights of ``structure`` on the family's training data (see :func:`map_fit_model`)."""
    return map_fit_model(ps.fix_structure(family.model, dict(structure)), family.x_train,
                         family.y_train, seed, adam_steps=adam_steps, lbfgs_iter=lbfgs_iter,
                         lr=lr, init_scale=family.init_scale)


def map_fit_model(model: Callable[..., Any], x: torch.Tensor, y: torch.Tensor, seed: int, *,
                  adam_steps: int = 300, lbfgs_iter: int = 500, lr: float = 0.01,
                  init_scale: float = 0.1) -> dict[str, torch.Tensor]:
    """MAP weights of a fixed-structure model (the prior's own density) from a seeded start.

    The start is ``init_scale`` times a prior draw; Adam warms up, L-BFGS finishes.
    """
    names = _latent_names(model, x, y)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(x, y)
    params = {n: (init_scale * trace.nodes[n]["value"]).clone().requires_grad_()
              for n in names}

    def loss() -> torch.Tensor:
        lik, prior = log_joint(model, params, x, y)
        return -(lik + prior)

    adam = torch.optim.Adam(list(params.values()), lr=lr)
    for _ in range(adam_steps):
        adam.zero_grad()
        loss().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(list(params.values()), max_iter=lbfgs_iter, history_size=50,
                              tolerance_grad=1e-6, tolerance_change=0.0,
                              line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        value = loss()
        value.backward()
        return value

    lbfgs.step(closure)
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def held_out(family: Family, structure: Mapping[str, str], values: Mapping[str, torch.Tensor]
             ) -> float:
    """Mean log-likelihood per test point at the weights ``values``."""
    fixed = ps.fix_structure(family.model, dict(structure))
    lik, _ = log_joint(fixed, values, family.x_test, family.y_test)
    return float(lik) / len(family.y_test)


def truth(family: Family, seeds: Sequence[int] = range(6), *,
          structures: Sequence[Mapping[str, str]] | None = None, verbose: bool = False,
          **fit_options: Any) -> dict[str, list[float]]:
    """Held-out log-likelihood per point, per structure label, one value per seed."""
    out: dict[str, list[float]] = {}
    for structure in structures or family.structures:
        label = ps.structure_label(structure)
        out[label] = []
        for seed in seeds:
            started = time.perf_counter()
            values = map_fit(family, structure, seed, **fit_options)
            out[label].append(held_out(family, structure, values))
            if verbose:
                print(f"{label} seed {seed}: {out[label][-1]:.4f} "
                      f"({time.perf_counter() - started:.1f}s)", flush=True)
    return out


# ----------------------------------------------------------------------------- scoring


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(var / n)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a between two scorings of the same items (ties count 0)."""
    concordant = 0.0
    pairs = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        pairs += 1
        s = (a[i] - a[j]) * (b[i] - b[j])
        concordant += 1.0 if s > 0 else (-1.0 if s < 0 else 0.0)
    return concordant / pairs if pairs else math.nan


def resolved_pairs(per_seed: Mapping[str, Sequence[float]], threshold: float = 2.0
                   ) -> list[tuple[str, str]]:
    """Pairs (better, worse) whose mean held-out difference exceeds ``threshold`` se."""
    stats = {k: _mean_se(v) for k, v in per_seed.items()}
    out = []
    for a, b in itertools.combinations(per_seed, 2):
        (ma, sa), (mb, sb) = stats[a], stats[b]
        if abs(ma - mb) > threshold * math.hypot(sa, sb):
            out.append((a, b) if ma > mb else (b, a))
    return out


def score_ordering(scores: Mapping[str, float], per_seed: Mapping[str, Sequence[float]],
                   threshold: float = 2.0) -> dict[str, Any]:
    """How ``scores`` (higher = better) order the structures against the truth.

    Returns the number of truth-resolved pairs ordered right (a NaN score
    orders nothing right), their share, Kendall tau over all structures with
    a finite score, the pick, and its regret in nats per test point.
    """
    truth_mean = {k: _mean_se(v)[0] for k, v in per_seed.items()}
    pairs = resolved_pairs(per_seed, threshold)
    right = sum(1 for better, worse in pairs
                if math.isfinite(scores[better]) and math.isfinite(scores[worse])
                and scores[better] > scores[worse])
    finite = [k for k in per_seed if math.isfinite(scores[k])]
    tau = kendall_tau([scores[k] for k in finite], [truth_mean[k] for k in finite])
    pick = max(finite, key=lambda k: scores[k]) if finite else None
    best = max(truth_mean.values())
    return {"resolved_pairs": len(pairs), "ordered_right": right,
            "share": right / len(pairs) if pairs else math.nan, "kendall_tau": tau,
            "pick": pick, "regret": best - truth_mean[pick] if pick else math.nan,
            "num_finite": len(finite)}


def seed_to_seed_tau(per_seed: Mapping[str, Sequence[float]]) -> float:
    """Mean Kendall tau between the truth averaged over two disjoint halves of the seeds."""
    labels = list(per_seed)
    n = len(next(iter(per_seed.values())))
    taus = []
    for half in itertools.combinations(range(n), n // 2):
        if 0 not in half:  # each split once
            continue
        other = [i for i in range(n) if i not in half]
        a = [sum(per_seed[k][i] for i in half) / len(half) for k in labels]
        b = [sum(per_seed[k][i] for i in other) / len(other) for k in labels]
        taus.append(kendall_tau(a, b))
    return sum(taus) / len(taus)


def truth_summary(per_seed: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    stats = {k: _mean_se(v) for k, v in per_seed.items()}
    best = max(stats, key=lambda k: stats[k][0])
    return {"mean": {k: s[0] for k, s in stats.items()}, "se": {k: s[1] for k, s in stats.items()},
            "best": best, "resolved_pairs": len(resolved_pairs(per_seed)),
            "seed_to_seed_tau": seed_to_seed_tau(per_seed)}


FAMILIES: dict[str, Callable[..., Family]] = {"digits": digits_family,
                                              "breast_cancer": breast_cancer_family}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Held-out truth of a family's structures (JSON).")
    parser.add_argument("--family", default="digits", choices=sorted(FAMILIES))
    parser.add_argument("--seeds", type=int, default=6)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    result = truth(FAMILIES[cli.family](), range(cli.seeds))
    print(json.dumps({"family": cli.family, "per_seed": result, **truth_summary(result)},
                     indent=1))
