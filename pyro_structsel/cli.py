r"""The command line: ``python -m pyro_structsel`` (or ``pyro-structsel``).

Selects the activation of each hidden layer of a two-hidden-layer network on
scikit-learn's bundled handwritten digits (no download), by stochastic
variational inference over the weights and the structural parameters
:math:`\Gamma` (:func:`~pyro_structsel.select_structure`). It prints a report
(chosen structure, posterior probability of every option, ELBO, parametric
and structural complexity, description length, size of the derived network
and its accuracy on the held-out split) and writes to the output directory:

``results.json``
    Configuration, data, structure, probabilities, scores and accuracies.
``summary.csv``
    :meth:`SelectionResult.summary` (one row per site and option).
``losses.csv``
    The loss (−ELBO, nats) at every SVI step.
``losses.png``
    The ELBO trace, with the convergence check.
``posterior.png``
    Posterior over Γ per site: probability of each option, γ with 90% intervals.
``idata.nc``
    The fit as ArviZ ``InferenceData`` (see :func:`~pyro_structsel.to_inference_data`).

Example
-------
.. code-block:: console

    $ python -m pyro_structsel --quick --out /tmp/structsel
    $ pyro-structsel --steps 4000 --hidden 64 64 --prior concrete
    $ torchrun --standalone --nproc_per_node=2 -m pyro_structsel --quick

Under ``torchrun`` the fit is data-parallel (each rank its shard of the
digits, see :mod:`pyro_structsel.infer.distributed`); rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports wait until a run needs them
    from .datasets import Dataset
    from .selection.result import SelectionResult

PROG = "pyro-structsel"

#: Defaults of the full run (a few minutes on 2 CPU cores).
FULL_DEFAULTS: dict[str, Any] = {"steps": 5000, "subsample": None, "evidence_samples": 500}
#: Default SVI steps of each discrete-check fit at most (they start from the relaxed fit).
MAX_CHECK_STEPS = 1000
#: Defaults of ``--quick`` (the relaxed fit about 7 s on 2 idle CPU cores; the discrete
#: check's 11 fits of 500 steps about 47 s more, 130 s on a loaded machine).
QUICK_DEFAULTS: dict[str, Any] = {"steps": 500, "subsample": None, "evidence_samples": 100}


def _number(convert: Callable[[str], float], low: float, strict: bool,
            what: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` finite and > ``low`` (>= ``low`` if not strict)."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 1, False, "a positive integer")
_non_negative_int = _number(int, 0, False, "a non-negative integer")
_positive_float = _number(float, 0.0, True, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pyro_structsel``."""
    from .model.family import ACTIVATIONS, DEFAULT_ACTIVATIONS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Bayesian structure selection on scikit-learn's digits (bundled, no "
                    "download): chooses the activation of each hidden layer of a "
                    "two-hidden-layer network by variational inference, prints a report and "
                    "writes results.json, summary.csv, losses.csv, losses.png, posterior.png "
                    "and idata.nc (ArviZ).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("structsel-out"),
                        help="output directory (created if missing)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run (under a minute on 2 CPU cores): "
                             f"{QUICK_DEFAULTS['steps']} steps and "
                             f"{QUICK_DEFAULTS['evidence_samples']} evidence draws unless set "
                             "explicitly")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"SVI steps (default {FULL_DEFAULTS['steps']}, "
                             f"{QUICK_DEFAULTS['steps']} with --quick)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed of the fit (initialisation, minibatches, Monte Carlo)")
    parser.add_argument("--data-seed", type=_non_negative_int, default=0,
                        help="seed of the subsample and the stratified train/test split")
    parser.add_argument("--subsample", type=_positive_int, default=None,
                        help="use only this many digits, stratified (default all 1797)")
    parser.add_argument("--test-size", type=float, default=0.25,
                        help="fraction of the digits held out for the test accuracy")
    parser.add_argument("--hidden", type=_positive_int, nargs="+", default=[32],
                        metavar="WIDTH", help="hidden widths: one for both layers, or two")
    parser.add_argument("--activations", nargs="+", default=list(DEFAULT_ACTIVATIONS),
                        choices=sorted(ACTIVATIONS), metavar="NAME",
                        help=f"candidate activations of each layer (from "
                             f"{', '.join(sorted(ACTIVATIONS))})")
    parser.add_argument("--prior", choices=["dirichlet", "concrete"], default="dirichlet",
                        help="prior (and guide family) of the structural parameters")
    parser.add_argument("--temperature", type=_positive_float, nargs="+", default=None,
                        metavar="T", help="temperature of the Concrete guide: fixed T, or "
                                          "annealed geometrically from T0 to T1 "
                                          "(default: the prior's, 0.5)")
    parser.add_argument("--prior-scale", type=_positive_float, default=1.0,
                        help="initial prior standard deviation of the weights of each layer")
    parser.add_argument("--learn-prior-scale", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="learn the per-layer prior scales jointly with the ELBO "
                             "(empirical Bayes)")
    parser.add_argument("--lr", type=_positive_float, default=0.01,
                        help="learning rate of Adam")
    parser.add_argument("--batch-size", type=_non_negative_int, default=256,
                        help="minibatch size of the data plate (0: full batch)")
    parser.add_argument("--particles", type=_positive_int, default=1,
                        help="ELBO particles per gradient step")
    parser.add_argument("--restarts", type=_positive_int, default=1,
                        help="independent fits; the one with the best final ELBO is kept")
    parser.add_argument("--discrete-check", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="score the leading structures of the relaxed fit by their "
                             "evidence and choose by it (default: on, the network has two "
                             "structural sites)")
    parser.add_argument("--check-steps", type=_positive_int, default=None,
                        help="SVI steps of each structure's fit in the discrete check, "
                             "warm-started from the relaxed fit (default: --steps, at most "
                             f"{MAX_CHECK_STEPS})")
    parser.add_argument("--evidence-samples", type=_positive_int, default=None,
                        help="draws from q for the final ELBO estimate (default "
                             f"{FULL_DEFAULTS['evidence_samples']}, "
                             f"{QUICK_DEFAULTS['evidence_samples']} with --quick)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads; a network this small runs fastest on one "
                             "(more threads only add overhead, badly so on a busy machine)")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                        help="checkpoint file, written atomically every 100 steps and resumed "
                             "from when it exists")
    parser.add_argument("--no-progress", action="store_true",
                        help="do not show the progress bar")
    return parser


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run's configuration: explicit options over the (quick or full) defaults."""
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    config = {key: value for key, value in vars(args).items() if key != "out"}
    for key, value in defaults.items():
        if config[key] is None:
            config[key] = value
    if len(args.hidden) > 2:
        parser.error(f"argument --hidden: expected one or two widths, got {len(args.hidden)}")
    config["hidden"] = list(args.hidden) * 2 if len(args.hidden) == 1 else list(args.hidden)
    if len(set(args.activations)) != len(args.activations) or len(args.activations) < 2:
        parser.error("argument --activations: expected at least two distinct activations, got "
                     f"{' '.join(args.activations)}")
    if not 0.0 < args.test_size < 1.0:
        parser.error(f"argument --test-size: expected a fraction in (0, 1), got {args.test_size}")
    if args.temperature is not None:
        if len(args.temperature) > 2:
            parser.error("argument --temperature: expected T or T0 T1")
        if args.prior != "concrete":
            parser.error("argument --temperature: only used with --prior concrete")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} is a file, not a folder; pass a folder "
                     "for the outputs (created if missing)")
    if config["check_steps"] is None:
        config["check_steps"] = min(config["steps"], MAX_CHECK_STEPS)
    config["batch_size"] = args.batch_size or None
    config["checkpoint"] = None if args.checkpoint is None else str(args.checkpoint)
    return config


@dataclass
class Run:
    """Everything one run of the command line produced (what :func:`write_outputs` writes).

    Attributes
    ----------
    config : dict
        The resolved options.
    data : Dataset
        The train/test split.
    result : SelectionResult
        The fit.
    train_accuracy, test_accuracy : float
        Accuracy of the derived network (posterior-mean weights, chosen structure).
    fit_seconds : float
        Wall time of :func:`~pyro_structsel.select_structure` (fit and scoring).
    extras : dict
        Further JSON-safe entries for ``results.json``.
    """

    config: dict[str, Any]
    data: Dataset
    result: SelectionResult
    train_accuracy: float
    test_accuracy: float
    fit_seconds: float
    extras: dict[str, Any] = field(default_factory=dict)


def run_selection(config: Mapping[str, Any]) -> Run:
    """Load the digits, select the structure and evaluate the derived network.

    Parameters
    ----------
    config : dict
        Resolved options (see :func:`build_parser`).

    Returns
    -------
    Run
    """
    import torch

    threads = torch.get_num_threads()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    try:
        return _run_selection(config)
    finally:
        torch.set_num_threads(threads)


def _run_selection(config: Mapping[str, Any]) -> Run:
    import torch

    from .datasets import load_digits
    from .infer.convergence import ConvergenceWarning
    from .model.family import two_hidden_layer
    from .model.network import NetworkModel
    from .selection.discrete_check import OverconfidenceWarning
    from .selection.select import select_structure

    data = load_digits(subsample=config["subsample"], seed=config["data_seed"],
                       test_size=config["test_size"])
    torch.manual_seed(config["seed"])  # the network's own initialisation starts the guide
    family = two_hidden_layer(data.num_features, data.num_classes,
                              hidden=tuple(config["hidden"]),
                              activations=tuple(config["activations"]))
    model = NetworkModel(family, likelihood="categorical", prior=config["prior"],
                         prior_scale=config["prior_scale"],
                         learn_prior_scale=config["learn_prior_scale"])
    temperature = config.get("temperature")
    if temperature is not None:
        temperature = temperature[0] if len(temperature) == 1 else tuple(temperature)
    start = time.perf_counter()
    with warnings.catch_warnings():  # the report states convergence and overconfidence
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", OverconfidenceWarning)
        result = select_structure(
            model, data.x_train, data.y_train, batch_size=config["batch_size"],
            num_steps=config["steps"], lr=config["lr"], num_particles=config["particles"],
            num_restarts=config["restarts"], temperature=temperature,
            num_evidence_samples=config["evidence_samples"], seed=config["seed"],
            progress=not config["no_progress"], checkpoint=config["checkpoint"],
            discrete_check=config.get("discrete_check"), check_steps=config.get("check_steps"))
    fit_seconds = time.perf_counter() - start
    network = result.derive().eval()
    with torch.no_grad():
        train_acc = float((network(data.x_train).argmax(-1) == data.y_train).float().mean())
        test_acc = float((network(data.x_test).argmax(-1) == data.y_test).float().mean())
    return Run(dict(config), data, result, train_acc, test_acc, fit_seconds)


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def format_report(run: Run) -> str:
    """The human-readable report of a run (a few aligned tables)."""
    result, data, config = run.result, run.data, run.config
    lines = [
        f"{PROG}: Bayesian structure selection on digits "
        f"({len(data.y_train)} train / {len(data.y_test)} test, {data.num_features} features, "
        f"{data.num_classes} classes)",
        f"family: two hidden layers {tuple(config['hidden'])}, candidates "
        f"{', '.join(config['activations'])}; prior {config['prior']}, prior scale "
        f"{'learned' if config['learn_prior_scale'] else 'fixed'}",
        f"fit: {len(result.losses)} SVI steps, batch "
        f"{config['batch_size'] or 'full'}, lr {config['lr']}, seed {config['seed']}, "
        f"{run.fit_seconds:.1f} s",
        "",
    ]
    options = list(config["activations"])
    width = max(8, *(len(o) + 2 for o in options))
    header = f"{'site':<10}{'chosen':<12}" + "".join(f"{o:>{width}}" for o in options)
    check = result.discrete_check
    relaxed_title = "Posterior probability that each option has the largest weight, " \
                    "q(argmax γ = k)"
    tables = [(relaxed_title, result.relaxed_probabilities, result.relaxed_structure)]
    if check is not None:  # the evidence's probabilities are the ones to quote
        tables = [(f"Probability of each option from the discrete evidence of the "
                   f"{check.num_fits} structures scored", result.probabilities,
                   result.structure),
                  ("Relaxed fit (finds the candidates, is not the verdict): "
                   "q(argmax γ = k)", result.relaxed_probabilities, result.relaxed_structure)]
    for title, probabilities, structure in tables:
        lines += [title, header, "-" * len(header)]
        for name, site in result.sites.items():
            probs = dict(zip(site.option_names(), probabilities[name].tolist()))
            row = f"{name:<10}{str(structure[name]):<12}"
            row += "".join(f"{probs.get(o, math.nan):>{width}.3f}" for o in options)
            lines.append(row)
        lines.append("")
    if check is not None:
        how = "at their MAP (no SVI fit)" if check.method == "laplace" else \
            f"fitted for {check.num_steps} steps each"
        lines += [f"Discrete check: {check.num_fits} structures scored by {check.method} "
                  f"{how} ({check.seconds:.1f} s)"]
        label_width = max(len(str(label)) for label in check.table.index) + 2
        lines.append(f"{'structure':<{label_width}}{'log evidence':>14}{'± se':>8}"
                     f"{'probability':>13}{'q(vertex)':>11}  fit")
        for label, row in check.table.iterrows():
            lines.append(f"{str(label):<{label_width}}{_fmt(row['log_evidence']):>14}"
                         f"{_fmt(row['se']):>8}{row['probability']:>13.3f}"
                         f"{row['q_probability']:>11.3f}  "
                         f"{'converged' if row['converged'] else 'NOT converged'}")
        lines += [check.message(), ""]
    scores = result.scores()
    rows: list[tuple[str, str]] = []
    for name, est in result.evidence.items():
        label = "ELBO (log evidence bound)" if name == "elbo" else f"log evidence [{name}]"
        rows.append((label, f"{_fmt(est.value)} ± {_fmt(est.se)} nats"))
    if result.parametric_complexity is not None:
        rows.append(("parametric complexity", f"{_fmt(result.parametric_complexity.value)} nats"
                                              " (min_h KL(q(w) || p(w|h)))"))
    if result.structural_complexity is not None:
        rows.append(("structural complexity",
                     f"{_fmt(result.structural_complexity.value, 2)} nats differential, "
                     f"{_fmt(scores.get('vertex_entropy'), 3)} nats over vertices"))
    if result.description_length is not None:
        dl = result.description_length
        rows.append(("description length",
                     f"{_fmt(dl.total_bits)} bits = {_fmt(dl.model_bits)} L(w|f) + "
                     f"{_fmt(dl.data_bits)} L(D|w,f)"))
    classical = result.classical_complexity or {}
    if classical:
        rows.append(("derived network", f"{classical.get('num_parameters', 0):,} parameters, "
                                        f"{classical.get('num_superpositions', 0)} "
                                        "superpositions"))
    rows.append(("train accuracy", f"{run.train_accuracy:.4f}"))
    rows.append(("TEST accuracy", f"{run.test_accuracy:.4f} (derived network, held-out "
                                  f"{len(data.y_test)} digits)"))
    key_width = max(len(k) for k, _ in rows) + 2
    lines += [f"{k:<{key_width}}{v}" for k, v in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- outputs


def _json_safe(value: Any) -> Any:
    """``value`` with tensors, arrays, enums and paths converted; NaN and ±inf as ``None``."""
    if isinstance(value, Enum):
        return _json_safe(value.value)
    if isinstance(value, Mapping):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return _json_safe(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def results_dict(run: Run) -> dict[str, Any]:
    """The content of ``results.json`` (JSON-safe)."""
    from .util.version import VERSION

    result, data = run.result, run.data
    sites = result.sites
    out: dict[str, Any] = {
        "pyro_structsel_version": VERSION,
        "config": run.config,
        "data": {"name": data.name, "num_train": len(data.y_train),
                 "num_test": len(data.y_test), "num_features": data.num_features,
                 "num_classes": data.num_classes},
        "structure": result.structure,
        "probabilities": {name: dict(zip(site.option_names(), result.probabilities[name]))
                          for name, site in sites.items()},
        "posterior_mean": {name: dict(zip(site.option_names(), result.posterior_mean[name]))
                           for name, site in sites.items()},
        "relaxed_structure": result.relaxed_structure,
        "relaxed_probabilities": {
            name: dict(zip(site.option_names(), result.relaxed_probabilities[name]))
            for name, site in sites.items()},
        "discrete_check": None,
        "scores": result.scores().to_dict(),
        "evidence": {name: {"value": est.value, "se": est.se, "num_samples": est.num_samples,
                            "method": est.method} for name, est in result.evidence.items()},
        "parametric_complexity": None,
        "structural_complexity": None,
        "description_length": (None if result.description_length is None
                               else asdict(result.description_length)),
        "classical_complexity": result.classical_complexity,
        "train_accuracy": run.train_accuracy,
        "test_accuracy": run.test_accuracy,
        "num_steps": len(result.losses),
        "final_loss": result.losses[-1] if result.losses else None,
        "fit_seconds": run.fit_seconds,
    }
    if result.parametric_complexity is not None:
        diag = result.parametric_complexity.diagnostics
        out["parametric_complexity"] = {
            "value": result.parametric_complexity.value,
            "optimal_prior_scale": diag.get("optimal_prior_scale"),
            "current_prior_scale": diag.get("current_prior_scale"),
            "num_weights": diag.get("num_weights")}
    check = result.discrete_check
    if check is not None:
        out["discrete_check"] = {
            "method": check.method, "agrees": check.agrees, "num_fits": check.num_fits,
            "num_steps": check.num_steps, "seconds": check.seconds,
            "message": check.message(),
            "structures": [{"structure": row["structure"], "log_evidence": row["log_evidence"],
                            "se": row["se"], "probability": row["probability"],
                            "q_probability": row["q_probability"],
                            "converged": bool(row["converged"])}
                           for _, row in check.table.iterrows()]}
    if result.structural_complexity is not None:
        diag = result.structural_complexity.diagnostics
        out["structural_complexity"] = {
            "differential_entropy": result.structural_complexity.value,
            "differential_entropy_se": result.structural_complexity.se,
            "vertex_entropy": diag.get("vertex_entropy"),
            "sites": {name: {k: v for k, v in per.items() if k != "probabilities"}
                      for name, per in diag.get("sites", {}).items()}}
    out.update(run.extras)
    return _json_safe(out)


def _atomic_write(path: Path, write: Callable[[IO[Any]], None], *, binary: bool = False
                  ) -> Path:
    """Write ``path`` through ``write(handle)``: a temporary file first, renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = {} if binary else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, "wb" if binary else "w", **text) as handle:
            write(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_losses_csv(losses: Sequence[float]) -> Callable[[IO[str]], None]:
    def write(handle: IO[str]) -> None:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "elbo"])
        for step, loss in enumerate(losses):
            writer.writerow([step, repr(float(loss)), repr(-float(loss))])
    return write


def write_outputs(run: Run, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every output file of a run into directory ``out``; each file atomically.

    Parameters
    ----------
    run : Run
        What :func:`run_selection` produced.
    out : path
        Output directory, created if missing.

    Returns
    -------
    dict
        File kind → path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report.inference_data import to_inference_data
    from .report.plots import plot_elbo, plot_structure_posterior

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    results = results_dict(run)
    written["results"] = _atomic_write(
        out / "results.json",
        lambda h: h.write(json.dumps(results, indent=2, allow_nan=False) + "\n"))
    summary = run.result.summary()
    written["summary"] = _atomic_write(out / "summary.csv", lambda h: summary.to_csv(h))
    written["losses"] = _atomic_write(out / "losses.csv", _write_losses_csv(run.result.losses))
    for kind, name, plot in (("losses_plot", "losses.png", plot_elbo),
                             ("posterior_plot", "posterior.png", plot_structure_posterior)):
        axes = plot(run.result)
        figure = (axes.flat[0] if hasattr(axes, "flat") else
                  axes[0] if isinstance(axes, (list, tuple)) else axes).figure
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        written[kind] = _atomic_write(out / name, lambda h, b=buffer: h.write(b.getvalue()),
                                      binary=True)
    # the diagnostics are reported by main(), not raised as warnings from inside the job
    idata = to_inference_data(run.result, seed=0, warn=False)
    written["idata"] = _atomic_netcdf(idata, out / "idata.nc")
    return written


def format_diagnostics(result: SelectionResult) -> str:
    """One line on whether the fit can be trusted: PSIS k-hat of q and ELBO convergence."""
    diagnostics = result.diagnostics
    if diagnostics is None:
        return ""
    khat = diagnostics.khat.value
    verdict = ("q matches the posterior well" if khat <= 0.5 else
               "q is usable" if khat <= 0.7 else
               "q covers the posterior poorly: the ELBO is a loose lower bound and "
               "importance-weighted figures are unreliable")
    converged = "converged" if diagnostics.convergence.converged else "NOT converged (run longer)"
    return f"diagnostics: PSIS k-hat {khat:.2f} ({verdict}); ELBO {converged}"


def _atomic_netcdf(idata: Any, path: Path) -> Path:
    """Write ``idata`` to NetCDF at ``path`` through a temporary file renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        idata.to_netcdf(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 2 on bad arguments).

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        config = _resolve(args, parser)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    from .util.ranks import init_distributed, is_main_process, launched_by_torchrun

    start = time.perf_counter()
    # under torchrun every rank runs the job data-parallel; rank 0 alone prints and writes
    owned = launched_by_torchrun() and init_distributed()
    try:
        try:
            run = run_selection(config)
        except ValueError as error:  # bad data, checkpoint or option combination: say which
            if is_main_process():
                print(f"{PROG}: error: {error}", file=sys.stderr)
            return 1
        if not is_main_process():
            return 0
        print(format_report(run))
        written = write_outputs(run, args.out)
        print(format_diagnostics(run.result))
        print(f"\nwrote {', '.join(p.name for p in written.values())} to {args.out} "
              f"({time.perf_counter() - start:.1f} s in all)")
        return 0
    finally:
        if owned:
            import torch.distributed

            torch.distributed.destroy_process_group()
