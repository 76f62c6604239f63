r"""``compare_structures``: score discrete structures by their evidence.

For each structure (a vertex of the simplex at every structural site) the
structural sites are pinned with :func:`~pyro_structsel.fix_structure`, the
remaining latents are integrated by the chosen estimator (fitting
:math:`q` by SVI where the estimator needs one), and the structures are
ranked by :math:`\log p(D \mid \text{structure})`. Under a uniform prior over
the structures compared, their posterior probabilities are
:math:`\mathrm{softmax}(\log p(D \mid s))`.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pandas as pd
import pyro
import pyro.optim
import torch
from pyro import poutine

from ..infer.convergence import DiagnosticWarning, elbo_convergence
from ..infer.distributed import map_over_ranks
from ..infer.guides import build_guide
from ..infer.optim import check_optimizer_factory, optimizer_factory
from ..infer.scope import clone_param_state, model_sites_and_params, module_params_kept
from ..infer.svi import fit
from ..model.fix_messenger import fix_structure
from ..model.network import NetworkModel
from ..model.sites import StructuralSite, check_structure
from ..util.options import parse_option
from ..util.ranks import resolve_distributed
from ..util.sampling import trace_model
from ..util.stacklevel import find_stack_level
from ..util.minibatch import check_full_data, full_data, scoring_kwargs
from ..util.validation import check_inputs, check_int, check_positive, check_seed, own_parameters
from .bounds import Proposal
from .crossval import CROSS_VALIDATION, cross_validation
from .empirical_bayes import PriorScaleMessenger, empirical_bayes
from .curvature import HessianStructure
from .estimate import Estimate
from .ggn import ggn_laplace
from .laplace import MODE_TOLERANCE, LaplaceWarning
from .methods import EvidenceMethod, estimate_evidence


def structure_label(structure: Mapping[str, str | int]) -> str:
    """A readable label such as ``"layer1=tanh, layer2=relu"``."""
    return ", ".join(f"{site}={option}" for site, option in structure.items())


def all_structures(sites: Mapping[str, StructuralSite]) -> list[dict[str, str | int]]:
    """Every vertex: the product of the options of all sites."""
    names = list(sites)
    options = [[sites[n].label(k) for k in range(sites[n].num_options)] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*options)]


def inert_sites(model: Callable[..., Any], *args: Any, num_checks: int = 3,
                **kwargs: Any) -> list[str]:
    r"""Latent sites that no other term of the model's log density depends on.

    A site :math:`w` is inert when the gradient of every other log-density
    term with respect to :math:`w` is exactly zero and its own log prior has
    exactly zero gradient with respect to every other latent, at
    ``num_checks`` independent draws from the prior. Then
    :math:`p(D, z) = p(D, z_{-w})\,p(w)` and :math:`w` integrates out
    exactly. With a structure fixed at a vertex, the weights of the candidates
    it leaves out are inert: they enter the model multiplied by
    :math:`\gamma_k = 0`.

    The check is numerical: a weight whose every path to the data is cut at
    all ``num_checks`` draws (e.g. a ReLU unit dead on every input each time)
    would be taken for inert. Raise ``num_checks`` or pass
    ``marginalize_inert=False`` to :func:`compare_structures` where that
    can happen.
    """
    candidates: set[str] | None = None
    for _ in range(num_checks):
        trace = trace_model(model, args, kwargs)
        values = {name: site["value"].detach().requires_grad_()
                  for name, site in trace.iter_stochastic_nodes()
                  if site["value"].is_floating_point()}
        with torch.enable_grad():
            conditioned = trace_model(poutine.condition(model, data=values), args, kwargs)
            terms = {name: site["fn"].log_prob(site["value"]).sum()
                     for name, site in conditioned.nodes.items() if site["type"] == "sample"}
            found = set()
            for name, value in values.items():
                others = [t for other, t in terms.items() if other != name and t.requires_grad]
                rest = [values[other] for other in values if other != name]
                own = terms[name]
                if _all_zero(others, [value]) and (
                        not own.requires_grad or _all_zero([own], rest)):
                    found.add(name)
        candidates = found if candidates is None else candidates & found
    return [name for name in values if name in (candidates or set())]


def _all_zero(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> bool:
    if not outputs or not inputs:
        return True
    grads = torch.autograd.grad(outputs, inputs, allow_unused=True, retain_graph=True)
    return all(g is None or bool((g == 0).all()) for g in grads)


class HyperparameterRule(str, Enum):
    """How :func:`compare_structures` sets the model's own parameters (its hyperparameters)."""

    FIT = "fit"
    FIXED = "fixed"
    EVIDENCE = "evidence"


class FlaggedEstimateWarning(DiagnosticWarning):
    """Some rows of a comparison table cannot be trusted (k-hat > 0.7, unconverged, NaN)."""


#: Pareto k-hat above which an importance-sampling estimate is flagged.
KHAT_FLAG = 0.7


def compare_structures(
    model: Callable[..., Any],
    *args: Any,
    structures: Sequence[Mapping[str, str | int]] | None = None,
    method: str = "laplace",
    guide: Any = None,
    num_steps: int = 1000,
    lr: float = 0.01,
    optim: Callable[[], pyro.optim.PyroOptim] | None = None,
    num_particles: int = 1,
    num_samples: int = 1000,
    seed: int | None = 0,
    progress: bool = True,
    marginalize_inert: bool = True,
    folds: int = 5,
    hessian_structure: str | None = None,
    hyperparameters: str = "fit",
    prior_scales: bool = False,
    proposal: str = "laplace",
    distributed: bool | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    r"""Rank discrete structures by log evidence :math:`\log p(D \mid s)`.

    Every structure is scored the same way: its structural sites pinned, a
    guide fitted by SVI (``num_steps`` steps of Adam from ``lr`` decayed
    tenfold, seeded with ``seed``, the ELBO trace checked for convergence),
    then the estimator run on the full data. The model's own ``pyro.param``
    s (its hyperparameters :math:`h`: a prior precision, a noise scale) follow
    one rule for every estimator, ``hyperparameters``: ``"fit"`` (default)
    learns them with :math:`q` by SVI, each structure its own (variational
    empirical Bayes), ``"fixed"`` keeps their initial values; the table's
    ``hyperparameters`` column gives the values each row was scored at.
    ``"laplace"`` searches the mode from the fitted posterior (the guide's
    median).

    Parameters
    ----------
    model : callable
        A Pyro model with structural sites.
    *args, **kwargs
        Passed to the model.
    structures : sequence of dict, optional
        Structures to compare (site → option label or index); default every vertex.
    method : str
        Evidence estimator (``"laplace"``, ``"elbo"``, ``"iwae"``,
        ``"gradient_descent"``), or ``"cross_validation"``: the k-fold held-out
        log-likelihood, the classical competitor (``folds`` folds, refitted per fold).
    guide : AutoGuide class or callable, optional
        Guide for the remaining latents (default
        :class:`~pyro_structsel.AutoMeanFieldNormal`); a class is built per structure.
    num_steps, lr : int, float
        SVI steps and initial Adam learning rate of each fit (decayed to
        ``lr / 10`` over the steps).
    optim : callable, optional
        Makes a fresh Pyro optimiser per fit (e.g. ``lambda: pyro.optim.ClippedAdam(
        {"lr": 0.05, "lrd": 0.999})``); default the decayed Adam above.
    num_particles : int
        Particles per ELBO gradient in each fit.
    num_samples : int
        Draws per Monte Carlo estimate.
    seed : int, optional
        Seed of every structure's fit and estimate (same seed, comparable
        fits); ``None`` leaves the random state alone.
    progress : bool
        Progress bar over the structures.
    marginalize_inert : bool
        Integrate out exactly the latents a structure leaves out (see
        :func:`inert_sites`) instead of fitting :math:`q` to them.
    hessian_structure : {"auto", "full", "diag", "kron"}, optional
        Curvature of ``"laplace"``: the generalised Gauss-Newton matrix
        (:func:`~pyro_structsel.laplace`; for a
        :class:`~pyro_structsel.NetworkModel` its fast path
        :func:`~pyro_structsel.ggn_laplace`). Default ``"auto"``: full for
        models affine in their latents (exact for linear-Gaussian ones),
        diagonal for networks (the curvature that ordered the structures of
        the digits benchmark best; ``benchmarks/README.md``).
    hyperparameters : {"fit", "fixed", "evidence"}
        The rule for the model's own parameters, above; ``"evidence"``:
        empirical Bayes, each structure's parameters (and, with
        ``prior_scales``, a factor on the scale of every Gaussian prior) set to
        the maximiser of its own Laplace evidence
        (:func:`~pyro_structsel.evidence.empirical_bayes.empirical_bayes`,
        from the SVI fit's values); estimators other than ``"laplace"`` then
        refit :math:`q` with them held there. ``"fit"`` stays the default: it
        costs one fit, and on the digits benchmark the per-layer scales found
        by the evidence ordered the structures no better
        (``benchmarks/README.md``).
    prior_scales : bool
        With ``hyperparameters="evidence"``, also choose one prior scale per
        latent site with a Gaussian prior of fixed scale (per-layer scales of a
        network), reported as ``"<site>.prior_scale"``.
    proposal : {"laplace", "guide"}
        Importance proposal of ``"iwae"``: the Laplace Gaussian at the mode
        (full GGN up to 5000 latents: it holds the posterior's correlations;
        exact on linear-Gaussian models) or the fitted guide
        (:func:`~pyro_structsel.iwae`).
    distributed : bool, optional
        Share the structures out over the ranks of a ``torchrun`` job: rank
        :math:`r` of :math:`R` scores structures :math:`r, r + R, \dots` on its
        own, and every rank returns the whole table (with a ``seed``, the
        table of one process). ``None``: when a process group is initialised;
        ``True``: also create it from ``torchrun``'s environment; ``False``:
        every structure in this process.

    Returns
    -------
    pandas.DataFrame
        Sorted best first, indexed by a label like ``"layer1=tanh, layer2=relu"``,
        with columns ``log_evidence``, ``se``, ``log_bayes_factor`` (vs the best,
        ≤ 0), ``probability`` (posterior under a uniform prior over the
        structures with a finite evidence, normalised among themselves; NaN for the
        others), ``khat`` and ``ess`` (Pareto :math:`\hat k` and effective sample
        size of the estimator's importance weights; NaN for deterministic
        estimators), ``converged`` (the fit's ELBO levelled off and, for
        ``"laplace"``, the mode was reached), ``flagged`` (:math:`\hat k > 0.7`,
        not converged or not finite: do not trust the row; one
        :class:`FlaggedEstimateWarning` names them), ``hyperparameters`` (the
        model parameters the row was scored at), ``structure`` (the dict) and
        ``note`` (why a row has no probability). ``df.attrs["estimates"]`` maps
        labels to the :class:`Estimate` objects, ``df.attrs["excluded"]`` lists
        the structures without a finite evidence, ``df.attrs["hyperparameter_rule"]``
        is the rule.

    Example
    -------
    >>> table = compare_structures(model, x, y, method="laplace")
    >>> table.iloc[0]["structure"]
    {'degree': '3'}
    """
    method_enum = None if method == CROSS_VALIDATION else parse_option(
        EvidenceMethod, method, "method (or 'cross_validation')")
    rule = parse_option(HyperparameterRule, hyperparameters, "hyperparameters")
    if prior_scales and rule is not HyperparameterRule.EVIDENCE:
        raise ValueError("prior_scales=True chooses the prior scales by the evidence; pass "
                         "hyperparameters='evidence' with it.")
    for argument, value in (("num_steps", num_steps), ("num_particles", num_particles),
                            ("num_samples", num_samples)):
        check_int(value, argument)
    check_positive(lr, "lr")
    check_seed(seed)
    check_optimizer_factory(optim)
    if not callable(model):
        raise ValueError(f"Expected model to be a callable Pyro model, but got {model!r}.")
    check_inputs(model, args, kwargs, caller="compare_structures",
                 caller_params=own_parameters(compare_structures))
    if structures is not None and (isinstance(structures, (Mapping, str))
                                   or not isinstance(structures, Sequence)):
        raise ValueError(f"Expected structures to be a list of dicts (site -> option), e.g. "
                         f"[{{'layer': 'relu'}}, {{'layer': 'tanh'}}], but got {structures!r}.")
    sites, model_params = model_sites_and_params(model, args, kwargs)
    chosen = [check_structure(s, sites) for s in structures] if structures is not None \
        else all_structures(sites)
    if not chosen:
        raise ValueError("No structure to compare: structures=[] is empty; pass at least one "
                         "structure, or None for every vertex.")
    eval_kwargs = scoring_kwargs(kwargs)  # score on the full data, not on a minibatch
    proposal = parse_option(Proposal, proposal, "proposal").value
    # Laplace (and its proposal) run a subsampled plate block by block; draws from a guide
    # cannot, so a model whose plain pyro.plate subsamples is refused for them
    if method_enum is not None and method_enum is not EvidenceMethod.LAPLACE and not (
            method_enum is EvidenceMethod.IWAE and proposal == Proposal.LAPLACE.value):
        with full_data(), pyro.get_param_store().scope():
            check_full_data(trace_model(model, args, eval_kwargs),
                            f"compare_structures(method={method!r})")
    network = isinstance(model, NetworkModel)
    if hessian_structure is not None and hessian_structure != "auto":
        parse_option(HessianStructure, hessian_structure, "hessian_structure (or 'auto')")
    curvature = None
    if method_enum is EvidenceMethod.LAPLACE:
        curvature = hessian_structure or "auto"
        if network and curvature == "auto":
            curvature = HessianStructure.DIAG.value
    sharing = resolve_distributed(distributed)

    def score(structure: Mapping[str, str | int]) -> Estimate:
        estimate = score_structure(
            model, structure, args, kwargs, method_enum, guide=guide,
            model_params=model_params, num_steps=num_steps,
            optim=optimizer_factory(optim, lr) if optim is not None
            else _decayed_adam(lr, num_steps), lr=lr,
            num_particles=num_particles, num_samples=num_samples, seed=seed, folds=folds,
            marginalize_inert=marginalize_inert, curvature=curvature, rule=rule,
            proposal=proposal, hessian_structure=hessian_structure,
            prior_scales=prior_scales).estimate
        if sharing:  # results cross ranks by pickle; the Laplace Gaussian holds the model
            estimate.diagnostics.pop("posterior", None)
        return estimate

    with module_params_kept(model):  # the structures shared out over the ranks of a torchrun job
        scored = map_over_ranks(score, chosen, enabled=sharing,
                                where="scoring its structures", desc="compare_structures",
                                progress=progress, unit="structures")
    estimates = {structure_label(s): estimate for s, estimate in zip(chosen, scored)}
    table = evidence_table(estimates, {structure_label(s): s for s in chosen})
    table.attrs["hyperparameter_rule"] = rule.value
    _warn_flagged(table)
    return table


def _decayed_adam(lr: float, num_steps: int) -> Callable[[], pyro.optim.PyroOptim]:
    """Adam from ``lr`` decayed geometrically to ``lr / 10`` over ``num_steps`` steps."""
    decay = 0.1 ** (1.0 / max(num_steps, 1))
    return lambda: pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": 1e3})


def _model_parameter_values(names: Sequence[str]) -> dict[str, Any]:
    """Constrained values of the param-store parameters ``names`` (floats for scalars)."""
    store = pyro.get_param_store()
    out: dict[str, Any] = {}
    for name in names:
        if name in store:
            value = store[name].detach()
            out[name] = float(value) if value.numel() == 1 else value.clone()
    return out


@dataclass
class StructureFit:
    """One discrete structure scored by :func:`score_structure`: its evidence and its fit.

    Attributes
    ----------
    structure : dict
        Site → option.
    estimate : Estimate
        Log evidence of the structure.
    model : callable
        The model with the structure pinned (and inert sites hidden).
    guide : callable or None
        The fitted guide (``None`` for estimators that fit none).
    param_state : dict or None
        The fit's Pyro parameters (a param-store state, see ``pyro.get_param_store().scope``).
    losses : list of float
        Loss (−ELBO) at every SVI step of the fit.
    seconds : float
        Wall time of the fit and the estimate.
    """

    structure: dict[str, str | int]
    estimate: Estimate
    model: Callable[..., Any]
    guide: Any = None
    param_state: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def score_structure(model: Callable[..., Any], structure: Mapping[str, str | int],
                    args: tuple, kwargs: dict[str, Any], method: EvidenceMethod | None, *,
                    guide: Any, model_params: dict[str, Any], num_steps: int,
                    optim: Callable[[], pyro.optim.PyroOptim], lr: float = 0.01,
                    num_particles: int = 1, num_samples: int = 1000, seed: int | None = None,
                    folds: int = 5, marginalize_inert: bool = True,
                    curvature: str | None = None,
                    init_values: Mapping[str, torch.Tensor] | None = None,
                    init_scales: Mapping[str, torch.Tensor] | None = None,
                    rule: HyperparameterRule = HyperparameterRule.FIT,
                    proposal: str = "laplace",
                    hessian_structure: str | None = None,
                    prior_scales: bool = False) -> StructureFit:
    """Log evidence of one structure (``method=None``: cross-validation), with its fit.

    The structure is pinned with :func:`fix_structure`, the latents it leaves
    out are integrated exactly (``marginalize_inert``), and the rest is fitted
    by SVI from ``init_values`` and ``init_scales`` (the weights' means and
    scales by site, e.g. a relaxed fit's: a warm start) or the model's own
    starting point, then scored by ``method`` on the full data (a Laplace
    searches its mode from the fitted guide). ``model_params`` is the model's
    own parameter state (see
    :func:`~pyro_structsel.infer.scope.model_sites_and_params`), fitted or
    held by ``rule`` (``"evidence"``: set to the maximiser of this
    structure's Laplace evidence, with ``prior_scales`` a factor on each
    Gaussian prior's scale too, and :math:`q` refitted there); the fit runs in a scope of its own and never touches the
    global store. ``curvature`` (a :class:`~pyro_structsel.NetworkModel`'s
    Laplace) scores the network by :func:`~pyro_structsel.ggn_laplace`
    without a fit. The estimate's diagnostics say whether the fit and the
    mode search converged (``"converged"``), the estimators' diagnostic
    warnings (``"warnings"``, not re-raised) and the model's parameter values
    it used (``"hyperparameters"``).
    """
    started = time.perf_counter()
    eval_kwargs = scoring_kwargs(kwargs)  # score on the full data, not on a minibatch
    network = isinstance(model, NetworkModel)
    # Gauss-Newton Laplace on the pruned network (empirical Bayes takes the general route)
    if curvature is not None and network and rule is not HyperparameterRule.EVIDENCE:
        if seed is not None:
            pyro.set_rng_seed(seed)
        with _diagnostic_warnings() as caught:
            estimate = ggn_laplace(model, *args, structure=structure,
                                   hessian_structure=curvature, **eval_kwargs)
        estimate.diagnostics.setdefault("converged",
                                        estimate.diagnostics["mode_gap"] <= MODE_TOLERANCE)
        estimate.diagnostics["warnings"] = caught
        estimate.diagnostics["hyperparameters"] = _model_parameter_values(
            list(model_params["params"]))
        return StructureFit(dict(structure), estimate, fix_structure(model, structure),
                            seconds=time.perf_counter() - started)
    # everything runs in a scope of its own: tracing a PyroModule registers its parameters
    with pyro.get_param_store().scope(clone_param_state(model_params)) as state:
        fixed = fix_structure(model, structure)
        inert = inert_sites(fixed, *args, **eval_kwargs) if marginalize_inert else []
        if inert:  # integrate them out exactly: hide them from inference
            fixed = poutine.block(fixed, hide=inert)
        # "fixed": SVI sees no model parameter, so they keep their initial values
        fitted_model = poutine.block(fixed, hide_types=["param"]) \
            if rule is HyperparameterRule.FIXED else fixed
        if seed is not None:
            pyro.set_rng_seed(seed)
        if method is None:
            estimate = cross_validation(fitted_model, *args, folds=folds, num_steps=num_steps,
                                        guide=guide, lr=lr, num_samples=num_samples,
                                        seed=seed, **kwargs)
            return StructureFit(dict(structure), estimate, fixed,
                                seconds=time.perf_counter() - started)
        fitted = build_guide(fitted_model, guide, {}, args, kwargs, None,
                             init_values=init_values, init_scales=init_scales)
        losses = fit(fitted_model, fitted, args, kwargs, num_steps=num_steps, optim=optim(),
                     num_particles=num_particles, progress=False)
        convergence = elbo_convergence(losses, warn=False)
        hyper: dict[str, Any] | None = None
        if rule is HyperparameterRule.EVIDENCE and method is not None and (
                model_params["params"] or prior_scales):
            with _diagnostic_warnings() as caught_eb:
                chosen = empirical_bayes(
                    fixed, fitted, *args, hyperparameters=list(model_params["params"]),
                    prior_scales=prior_scales, seed=seed,
                    hessian_structure=curvature or hessian_structure or "auto", **eval_kwargs)
            hyper = chosen.diagnostics["hyperparameters"]
            if method is EvidenceMethod.LAPLACE:
                chosen.diagnostics.update({
                    "fit_converged": convergence.converged, "warnings": caught_eb,
                    "hyperparameters": hyper, "converged": chosen.diagnostics["converged"]
                    and chosen.diagnostics["empirical_bayes"]["converged"]})
                return StructureFit(dict(structure), chosen, fixed, fitted, state, losses,
                                    time.perf_counter() - started)
            fixed, fitted, losses = _refit_at(fixed, hyper, guide, args, kwargs, num_steps,
                                              optim, num_particles, seed)
            convergence = elbo_convergence(losses, warn=False)
        options: dict[str, Any] = {}
        if method is EvidenceMethod.LAPLACE:
            options = {"hessian_structure": curvature or "auto", "seed": seed}
        elif method is EvidenceMethod.IWAE:
            laplace_options: dict[str, Any] = {"seed": seed}
            if hessian_structure not in (None, "auto"):
                laplace_options["hessian_structure"] = hessian_structure
            options = {"proposal": proposal, "laplace_options": laplace_options}
        laplace_based = method is EvidenceMethod.LAPLACE or (
            method is EvidenceMethod.IWAE and proposal == Proposal.LAPLACE.value)
        with _diagnostic_warnings() as caught, full_data():
            estimate = estimate_evidence(method, fixed, fitted, *args, num_samples=num_samples,
                                         **options, **eval_kwargs)
        estimate.diagnostics.update({
            "fit_converged": convergence.converged,
            "fit_relative_change": convergence.relative_change,
            # a Laplace (or its proposal) needs the fit only for the model's own parameters
            "converged": estimate.diagnostics.get("converged", True)
            and estimate.diagnostics.get("laplace_converged", True) and (
                convergence.converged or (laplace_based and (
                    rule is HyperparameterRule.FIXED or not model_params["params"]))),
            "warnings": caught,
            "hyperparameters": hyper if hyper is not None else _model_parameter_values(
                list(model_params["params"])),
        })
    return StructureFit(dict(structure), estimate, fixed, fitted, state, losses,
                        time.perf_counter() - started)


def _refit_at(model: Callable[..., Any], hyperparameters: Mapping[str, Any], guide: Any,
              args: tuple, kwargs: Mapping[str, Any], num_steps: int,
              optim: Callable[[], pyro.optim.PyroOptim], num_particles: int,
              seed: int | None) -> tuple[Callable[..., Any], Any, list[float]]:
    """The model at the hyperparameters empirical Bayes chose, :math:`q` refitted there, and
    the refit's losses."""
    store = pyro.get_param_store()
    scales = {}
    for name, value in hyperparameters.items():
        if name in store:
            store[name] = torch.as_tensor(value, dtype=store[name].dtype)
        else:  # "<site>.prior_scale"
            scales[name.rsplit(".", 1)[0]] = torch.as_tensor(value)
    if scales:
        model = PriorScaleMessenger(scales)(model)
    held = poutine.block(model, hide_types=["param"])
    if seed is not None:
        pyro.set_rng_seed(seed)
    fitted = build_guide(held, guide, {}, args, kwargs, None)
    losses = fit(held, fitted, args, kwargs, num_steps=num_steps, optim=optim(),
                 num_particles=num_particles, progress=False)
    return model, fitted, losses


@contextmanager
def _diagnostic_warnings() -> Iterator[list[str]]:
    """Collect the estimators' diagnostic warnings (the table flags them); pass others on."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    for warning in caught:
        if issubclass(warning.category, (DiagnosticWarning, LaplaceWarning)):
            messages.append(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)


def evidence_table(estimates: Mapping[str, Estimate], structures: Mapping[str, dict[str, Any]]
                   ) -> pd.DataFrame:
    """The ranked table of :func:`compare_structures` from estimates by structure label."""
    labels = list(estimates)
    log_ev = torch.tensor([estimates[label].value for label in labels], dtype=torch.float64)
    finite = torch.isfinite(log_ev)
    best = float(log_ev[finite].max()) if bool(finite.any()) else math.nan
    # a structure whose evidence could not be computed has no probability: NaN, and the
    # others are normalised among themselves
    probs = torch.full_like(log_ev, math.nan)
    if bool(finite.any()):
        probs[finite] = torch.softmax(log_ev[finite], 0)
    factors = torch.where(finite, log_ev - best, torch.full_like(log_ev, math.nan))
    excluded = [label for label, ok in zip(labels, finite.tolist()) if not ok]
    diagnostics = [estimates[label].diagnostics for label in labels]
    khat = [float(d.get("khat", math.nan)) for d in diagnostics]
    converged = [bool(d.get("converged", True)) for d in diagnostics]
    flagged = [not bool(f) or k > KHAT_FLAG or not c
               for f, k, c in zip(finite.tolist(), khat, converged)]
    table = pd.DataFrame({
        "log_evidence": log_ev.numpy(),
        "se": [estimates[label].se for label in labels],
        "log_bayes_factor": factors.numpy(),
        "probability": probs.numpy(),
        "khat": khat,
        "ess": [float(d.get("ess", math.nan)) for d in diagnostics],
        "converged": converged,
        "flagged": flagged,
        "hyperparameters": [d.get("hyperparameters", {}) for d in diagnostics],
        "structure": [structures[label] for label in labels],
        "note": ["" if ok else f"log evidence {value} is not finite: no probability, excluded "
                 "from the normalisation" for ok, value in zip(finite.tolist(), log_ev.tolist())],
    }, index=pd.Index(labels, name="structure_label"))
    table = table.sort_values("log_evidence", ascending=False, na_position="last")
    table.attrs["estimates"] = dict(estimates)
    table.attrs["excluded"] = excluded
    return table


def _warn_flagged(table: pd.DataFrame) -> None:
    """One warning naming the structures whose row cannot be trusted, and why."""
    reasons = []
    excluded = table.attrs.get("excluded", [])
    if excluded:
        reasons.append(f"could not compute the log evidence of {excluded} (not finite): their "
                       "probability is NaN and the other structures' probabilities are "
                       "normalised without them (see the table's note column)")
    for what, rows in (
            (f"Pareto k-hat > {KHAT_FLAG}", table["khat"] > KHAT_FLAG),
            ("fit or mode search not converged", ~table["converged"].astype(bool))):
        names = [str(label) for label in table.index[rows.to_numpy()] if label not in excluded]
        if names:
            reasons.append(f"{what}: " + "; ".join(repr(n) for n in names))
    if reasons:
        warnings.warn(
            "compare_structures: some rows cannot be trusted (" + " | ".join(reasons) + "). "
            "They are flagged in the table's 'flagged' column; their per-estimate warnings "
            "are in table.attrs['estimates'][label].diagnostics['warnings']. Fit longer "
            "(num_steps), draw more samples, or use another estimator.",
            FlaggedEstimateWarning, stacklevel=find_stack_level())
