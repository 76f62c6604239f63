"""Benchmark of the evidence estimators on the digits two-hidden-layer family.

Scores a few structures of ``two_hidden_layer(64, 10, hidden=...)`` on the
training split of scikit-learn's digits with every estimator, in one process
(so the timings are comparable), and prints one JSON object to stdout:

* ``ggn_diag``, ``ggn_kron``: :func:`pyro_structsel.evidence.ggn.ggn_laplace` (time of
  the mode search and of the curvature given separately);
* ``svi_fit``: the mean-field SVI fit (timed on its own), then ``elbo`` and
  ``iwae`` on the fitted guide;
* ``laplace_torch_kron``: where ``import laplace`` works (laplace-torch, an
  optional dependency of this benchmark only),
  ``Laplace(net, "classification", hessian_structure="kron")
  .log_marginal_likelihood()`` on the same MAP network with the same prior
  precision, next to ``ggn_kron_separate_bias`` (our K-FAC with laplace-torch's
  bias convention), and whether the rankings of the structures agree.

Run: ``python benchmarks/evidence.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import pyro
import pyro.optim
import torch

import pyro_structsel as ps
from pyro_structsel.evidence.comparison import inert_sites, structure_label
from pyro_structsel.evidence.ggn import ggn_laplace
from pyro_structsel.infer.guides import build_guide
from pyro_structsel.infer.svi import fit

STRUCTURES = [
    {"layer1": "tanh", "layer2": "tanh"},
    {"layer1": "relu", "layer2": "relu"},
    {"layer1": "sigmoid", "layer2": "sigmoid"},
    {"layer1": "identity", "layer2": "identity"},
]


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def laplace_torch_kron(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       prior_precision: float) -> float:
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    la = Laplace(network, "classification", subset_of_weights="all",
                 hessian_structure="kron", prior_precision=prior_precision)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return float(la.log_marginal_likelihood())


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--num-particles", type=int, default=100)
    parser.add_argument("--iwae-samples", type=int, default=1000)
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few SVI steps and draws")
    opts = parser.parse_args()
    if opts.quick:
        opts.svi_steps, opts.num_particles, opts.iwae_samples = 100, 20, 100
    torch.set_num_threads(1)
    warnings.simplefilter("default")

    try:
        import laplace  # noqa: F401
        have_laplace_torch = True
    except Exception:  # not installed, or broken by its torchvision dependency
        have_laplace_torch = False

    data = ps.load_digits(seed=opts.seed)
    x, y = data.x_train, data.y_train
    torch.manual_seed(opts.seed)
    pyro.set_rng_seed(opts.seed)
    family = ps.two_hidden_layer(64, 10, hidden=tuple(opts.hidden))
    model = ps.NetworkModel(family, likelihood="categorical", prior_scale=opts.prior_scale)
    prior_precision = 1.0 / opts.prior_scale**2

    # warm-up of torch.func's transforms so the first structure is not charged for it
    ggn_laplace(model, x[:64], y[:64], structure=STRUCTURES[0], hessian_structure="kron",
                max_iter=5, mode_tolerance=float("inf"))
    ggn_laplace(model, x[:64], y[:64], structure=STRUCTURES[0], hessian_structure="diag",
                max_iter=5, mode_tolerance=float("inf"))

    rows = {}
    for structure in STRUCTURES:
        label = structure_label(structure)
        row: dict[str, dict[str, float]] = {}
        network = None
        for key, kind, separate in [("ggn_diag", "diag", False), ("ggn_kron", "kron", False),
                                    ("ggn_kron_separate_bias", "kron", True)]:
            est, seconds = timed(ggn_laplace, model, x, y, structure=structure,
                                 hessian_structure=kind, separate_bias=separate)
            d = est.diagnostics
            row[key] = {"log_evidence": est.value, "seconds": seconds,
                        "seconds_mode": d["seconds_mode"],
                        "seconds_curvature": d["seconds_curvature"],
                        "log_joint": d["log_joint"], "mode_gap": d["mode_gap"]}
            network = d["network"]
        if have_laplace_torch:
            value, seconds = timed(laplace_torch_kron, network, x, y, prior_precision)
            row["laplace_torch_kron"] = {"log_evidence": value, "seconds": seconds}

        fixed = ps.fix_structure(model, structure)
        inert = inert_sites(fixed, x, y)
        if inert:
            fixed = pyro.poutine.block(fixed, hide=inert)
        pyro.set_rng_seed(opts.seed)
        with pyro.get_param_store().scope():
            guide = build_guide(fixed, None, {}, (x, y), {}, None)
            losses, seconds = timed(fit, fixed, guide, (x, y), {}, num_steps=opts.svi_steps,
                                    optim=pyro.optim.Adam({"lr": opts.lr}), progress=False)
            row["svi_fit"] = {"seconds": seconds, "final_loss": float(losses[-1]),
                              "num_steps": opts.svi_steps}
            est, seconds = timed(ps.elbo, fixed, guide, x, y, num_particles=opts.num_particles)
            row["elbo"] = {"log_evidence": est.value, "se": est.se, "seconds": seconds}
            est, seconds = timed(ps.iwae, fixed, guide, x, y, num_samples=opts.iwae_samples)
            row["iwae"] = {"log_evidence": est.value, "se": est.se, "seconds": seconds,
                           "khat": est.diagnostics["khat"]}
        rows[label] = row
        print(f"done {label}", flush=True, file=__import__("sys").stderr)

    labels = list(rows)
    estimators = [k for k in rows[labels[0]] if "log_evidence" in rows[labels[0]][k]]
    values = {k: [rows[label][k]["log_evidence"] for label in labels] for k in estimators}
    rankings = {k: [labels[i] for i in sorted(range(len(labels)), key=lambda i: -v[i])]
                for k, v in values.items()}
    reference = "laplace_torch_kron" if have_laplace_torch else "ggn_kron"
    agreement = {k: {"spearman": spearman(values[k], values[reference]),
                     "same_order": rankings[k] == rankings[reference]} for k in estimators}
    result = {
        "config": {"hidden": list(opts.hidden), "num_data": int(x.shape[0]),
                   "num_params": None, "svi_steps": opts.svi_steps,
                   "elbo_particles": opts.num_particles, "iwae_samples": opts.iwae_samples,
                   "prior_precision": prior_precision, "torch": torch.__version__,
                   "threads": torch.get_num_threads(),
                   "laplace_torch": have_laplace_torch},
        "structures": rows,
        "rankings": rankings,
        "agreement_with": reference,
        "agreement": agreement,
    }
    if have_laplace_torch:
        result["ggn_kron_separate_bias_minus_laplace_torch"] = {
            label: rows[label]["ggn_kron_separate_bias"]["log_evidence"]
            - rows[label]["laplace_torch_kron"]["log_evidence"] for label in labels}
    result["config"]["num_params"] = sum(p.numel() for p in
                                         ps.derive_network(family, STRUCTURES[0]).parameters())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
