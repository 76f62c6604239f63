"""Every evidence estimator against the held-out truth, on user-written networks (JSON).

For each family of :mod:`structure_truth` (digits: 600 training rows, 1000
test digits, 2 structural sites x relu/tanh/identity, widths 16, N(0, 1)
weights, ``x @ W`` inside; breast cancer: the same network, Bernoulli), the
truth is the held-out log-likelihood per test point of MAP networks of each
of the 9 structures (6 seeds). Every estimator scores the 9 structures
through :func:`pyro_structsel.compare_structures` (or, for the exact
Hessian, :func:`pyro_structsel.laplace`), and is judged by

* the share of the truth-resolved pairs (mean difference > 2 se over seeds)
  it orders the same way, beside Kendall's tau over all 9;
* the regret of its pick: held-out nats per point below the best structure;
* the truth's own seed-to-seed tau (two disjoint halves of the seeds), the
  ceiling of any ordering.

Run: ``python benchmarks/evidence_vs_truth.py [--family digits] [--quick]``;
prints one JSON object. ``--quick`` (2 seeds, short fits, 3 estimators) is
for smoke tests. ``--truth FILE`` reads the truth of a family from a JSON
file of :mod:`structure_truth` (``per_seed``) instead of training it again
(the truth is the costly part); ``--out FILE`` writes the JSON after every
estimator, so a run stopped early keeps what it measured; ``--only NAME``
(repeatable) runs the named estimators alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyro_structsel as ps  # noqa: E402
import structure_truth as st  # noqa: E402


def _compare(family: st.Family, num_steps: int, **options: Any) -> dict[str, Any]:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table's 'flagged' column is what we report
        table = ps.compare_structures(family.model, family.x_train, family.y_train,
                                      num_steps=num_steps, progress=False, seed=0, **options)
    scores = {label: float(v) for label, v in table["log_evidence"].items()}
    return {"scores": scores, "flagged": int(table["flagged"].sum()),
            "khat": {label: float(v) for label, v in table["khat"].items()},
            "hyperparameters": {label: h for label, h in table["hyperparameters"].items()},
            "seconds": time.perf_counter() - started}


def _exact_hessian(family: st.Family) -> dict[str, Any]:
    started = time.perf_counter()
    scores, fallbacks = {}, 0
    for structure in family.structures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimate = ps.laplace(ps.fix_structure(family.model, structure), None,
                                  family.x_train, family.y_train, curvature="hessian", seed=0)
        fallbacks += bool(estimate.diagnostics.get("fallback"))
        scores[ps.structure_label(structure)] = estimate.value
    return {"scores": scores, "flagged": 0, "fallbacks_to_ggn": fallbacks,
            "seconds": time.perf_counter() - started}


def estimators(quick: bool) -> dict[str, Callable[[st.Family, int], dict[str, Any]]]:
    """Name → scorer. The first is ``compare_structures``' default."""
    out: dict[str, Callable[[st.Family, int], dict[str, Any]]] = {
        "laplace (default: GGN diag, h fit)": lambda f, n: _compare(f, n),
        "elbo": lambda f, n: _compare(f, n, method="elbo"),
        "iwae (Laplace full-GGN proposal)": lambda f, n: _compare(f, n, method="iwae",
                                                                    num_samples=500),
    }
    if quick:
        return out
    out.update({
        "laplace GGN full": lambda f, n: _compare(f, n, hessian_structure="full"),
        "laplace GGN kron": lambda f, n: _compare(f, n, hessian_structure="kron"),
        "laplace GGN diag, empirical Bayes per-layer prior scales": lambda f, n: _compare(
            f, n, hyperparameters="evidence", prior_scales=True),
        "laplace GGN kron, empirical Bayes per-layer prior scales": lambda f, n: _compare(
            f, n, hessian_structure="kron", hyperparameters="evidence", prior_scales=True),
        "iwae (fitted AutoNormal proposal)": lambda f, n: _compare(f, n, method="iwae",
                                                                     proposal="guide"),
        "laplace exact Hessian (seeded draw start)": lambda f, n: _exact_hessian(f),
    })
    return out


def run(family_name: str, *, quick: bool, truth_file: str | None = None,
        only: list[str] | None = None,
        report: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    family = st.FAMILIES[family_name]()
    seeds = range(2 if quick else 6)
    started = time.perf_counter()
    if truth_file is not None and os.path.exists(truth_file):
        with open(truth_file) as handle:
            per_seed = json.load(handle)["per_seed"]
        source = truth_file
    else:
        per_seed = st.truth(family, seeds, adam_steps=50 if quick else 300,
                            lbfgs_iter=50 if quick else 500)
        source = "trained in this run"
        if truth_file is not None:
            with open(truth_file, "w") as handle:
                json.dump({"family": family_name, "per_seed": per_seed,
                           **st.truth_summary(per_seed)}, handle, indent=1)
    result: dict[str, Any] = {"truth": {**st.truth_summary(per_seed), "per_seed": per_seed,
                                        "source": source,
                                        "seconds": time.perf_counter() - started},
                              "estimators": {}}
    num_steps = 100 if quick else 1000
    chosen = estimators(quick)
    unknown = sorted(set(only or []) - set(chosen))
    if unknown:
        raise ValueError(f"--only {unknown}: not an estimator; valid: {sorted(chosen)}")
    for name, scorer in chosen.items():
        if only and name not in only:
            continue
        scored = scorer(family, num_steps)
        scored["ordering"] = st.score_ordering(scored["scores"], per_seed)
        result["estimators"][name] = scored
        print(f"[{family_name}] {name}: {scored['ordering']}", file=sys.stderr, flush=True)
        report(result)
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(st.FAMILIES),
                        help="family (repeatable; default both)")
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--truth", action="append", default=[], metavar="FAMILY=FILE",
                        help="truth cache of a family (read if it exists, else written)")
    parser.add_argument("--out", help="write the JSON here after every estimator")
    parser.add_argument("--only", action="append", help="run this estimator alone (repeatable)")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    families = cli.family or ["digits", "breast_cancer"]
    truth_files = dict(item.split("=", 1) for item in cli.truth)
    results: dict[str, Any] = {}

    def report(partial: dict[str, Any]) -> None:
        if cli.out:
            with open(cli.out + ".tmp", "w") as handle:
                json.dump(_jsonable(results), handle, indent=1)
            os.replace(cli.out + ".tmp", cli.out)

    for name in families:
        results[name] = {}
        results[name] = run(name, quick=cli.quick, truth_file=truth_files.get(name),
                            only=cli.only,
                            report=lambda partial, name=name: (results.__setitem__(name, partial),
                                                               report(partial)))
    report(results)
    print(json.dumps(_jsonable(results), indent=1))


if __name__ == "__main__":
    main()
