r"""``select_structure``: fit :math:`q(w, \Gamma)` by SVI, check its leading vertices by evidence.

The relaxed fit proposes, at each structural site, the vertex of the simplex
with the highest posterior probability,
:math:`\arg\max_k q(\arg\max_j \gamma_j = k)`. With more than one site
(or when asked), the discrete check then scores the leading vertices of
:math:`q(\Gamma)` as discrete structures by their evidence and chooses the
best (see :mod:`~pyro_structsel.selection.discrete_check`). The result carries
both, the evidence estimates, the complexities and the loss trace.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.optim
import torch

from ..evidence.bounds import elbo
from ..evidence.complexity import (
    classical_complexity,
    description_length,
    parametric_complexity,
    structural_complexity,
)
from ..evidence.estimate import Estimate
from ..evidence.ggn import HessianStructure
from ..evidence.methods import EvidenceMethod, check_estimator_names, estimate_evidence
from ..infer.checkpoint import check_checkpoint_path
from ..infer.convergence import ConvergenceWarning, elbo_convergence
from ..infer.distributed import shared_seed
from ..infer.guides import build_guide
from ..infer.optim import FlatAdam, as_pyro_optimizer
from ..infer.scope import clone_param_state, model_sites_and_params, module_params_kept
from ..infer.svi import fit
from ..model.fix_messenger import pinned_sites
from ..model.network import NetworkModel
from ..util.minibatch import check_full_data, full_data, scoring_kwargs
from ..util.options import Resume, parse_option
from ..util.ranks import resolve_distributed, use_distributed
from ..util.sampling import draw_guide, max_plate_nesting, trace_model
from ..util.stacklevel import find_stack_level
from ..util.validation import (
    check_callable,
    check_flag,
    check_inputs,
    check_int,
    check_positive,
    check_seed,
    own_parameters,
)
from .discrete_check import OverconfidenceWarning, default_check_method, run_discrete_check
from .result import SelectionResult


def _temperature_schedule(temperature: float | tuple[float, float] | None, num_steps: int
                          ) -> tuple[float | None, Callable[[int], float] | None]:
    if temperature is None:
        return None, None
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"Expected temperature > 0, but got {temperature!r}.")
        return float(temperature), None
    if isinstance(temperature, (str, bytes)) or not isinstance(temperature, Sequence) or len(
            temperature) != 2 or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                         and t > 0 and math.isfinite(t) for t in temperature):
        raise ValueError(f"Expected temperature to be a number T > 0 or a pair (T0, T1) of "
                         f"temperatures > 0 (annealed from T0 to T1), but got {temperature!r}.")
    start, end = temperature

    def schedule(step: int) -> float:  # geometric annealing from start to end
        return float(start * (end / start) ** (step / max(num_steps - 1, 1)))

    return float(start), schedule


def _restart_path(checkpoint: str | os.PathLike[str] | None, restart: int, num_restarts: int
                  ) -> str | None:
    if checkpoint is None:
        return None
    path = os.fspath(checkpoint)
    if num_restarts == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.restart{restart}{ext}"


def select_structure(
    model: Callable[..., Any],
    *args: Any,
    guide: Any = None,
    num_steps: int = 1000,
    optim: pyro.optim.PyroOptim | None = None,
    lr: float = 0.01,
    num_particles: int = 1,
    vectorize_particles: bool | None = None,
    num_restarts: int = 1,
    temperature: float | tuple[float, float] | None = None,
    evidence: Sequence[str] | str = ("elbo",),
    num_evidence_samples: int = 1000,
    seed: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    resume: str = "strict",
    callback: Callable[[int, float], Any] | None = None,
    fast: bool | None = None,
    compile: bool | None = None,
    distributed: bool | None = None,
    discrete_check: bool | None = None,
    check_method: str | None = None,
    check_hessian: str | None = None,
    check_steps: int | None = None,
    check_coverage: float = 0.9,
    check_max_fits: int = 20,
    **kwargs: Any,
) -> SelectionResult:
    r"""Select the structure of a Pyro model: a relaxed SVI fit, checked by discrete evidence.

    Fits :math:`q(w, \Gamma)` to ``model(*args, **kwargs)`` by maximising the
    ELBO (the *relaxed* fit: Γ on the simplex), and reads off at each
    structural site the option most probably the largest weight under
    :math:`q`. Then, by default when the model has more than one structural
    site, the *discrete check* scores the leading vertices of
    :math:`q(\Gamma)` and their one-site neighbours as discrete structures
    by their evidence (each fitted from the relaxed fit's weights, as
    :func:`~pyro_structsel.compare_structures` does) and chooses the
    structure of highest evidence: the relaxed posterior finds candidates, the
    evidence decides (relaxed selection collapses towards linear or
    parameter-free operations and a mean-field :math:`q` over shared weights
    is overconfident; see :mod:`~pyro_structsel.selection.discrete_check`).
    The fit is scored too: evidence estimates, parametric and structural
    complexity, description length. A :class:`ConvergenceWarning` says when
    the relaxed fit's ELBO has not levelled off.

    Parameters
    ----------
    model : callable
        A Pyro model with at least one structural site (a latent on the
        simplex, e.g. from :func:`~pyro_structsel.structure`).
    *args, **kwargs
        Passed to the model (and the guide).
    guide : callable, AutoGuide class or None
        ``None``: :class:`~pyro_structsel.AutoStructure` for Γ plus
        ``AutoNormal`` for the rest; an AutoGuide class replaces ``AutoNormal``;
        any other callable is used as the guide as is.
    num_steps : int
        SVI steps (≥ 1).
    optim : pyro.optim.PyroOptim or torch.optim class, optional
        Optimiser; default ``pyro.optim.Adam({"lr": lr})``, computed as one fused
        step over all parameters (:class:`~pyro_structsel.infer.optim.FlatAdam`)
        unless ``fast=False``. A ``torch.optim`` class (``torch.optim.SGD``) is
        built with ``lr`` for every parameter.
    lr : float
        Learning rate of the default optimiser (or of a ``torch.optim`` class).
    num_particles : int
        Particles per ELBO gradient estimate.
    vectorize_particles : bool, optional
        Vectorise the particles (``None``: when the model allows it).
    num_restarts : int
        Independent fits from different initialisations; the one with the
        best final ELBO (estimated from ``num_evidence_samples`` draws of its
        :math:`q`) is kept (guards against a local optimum).
    temperature : float or (float, float), optional
        Temperature of Concrete guides, fixed or annealed geometrically from
        the first value to the second over the steps.
    evidence : sequence of str
        Evidence estimators to run on the fitted :math:`q`
        (see :class:`~pyro_structsel.evidence.EvidenceMethod`).
    num_evidence_samples : int
        Draws from :math:`q` per evidence estimate.
    seed : int, optional
        Seed of every random number generator; equal seeds give equal results.
    progress : bool
        Show a progress bar with the running ELBO.
    checkpoint : path, optional
        Checkpoint file, written atomically every ``checkpoint_every`` steps
        and resumed from when it exists (one file per restart). A checkpoint
        is data (loading it runs no code) and carries a fingerprint of its
        run: one written by another model, guide, data set or optimiser
        setting is refused with what differs.
    resume : {"strict", "relaxed"}
        ``"relaxed"`` resumes a checkpoint written with other data values or
        optimiser settings (same model, guide and data shapes), with this
        call's data and settings (e.g. a new ``lr``) from the next step, and a
        :class:`~pyro_structsel.infer.checkpoint.CheckpointWarning`.
    callback : callable, optional
        Called as ``callback(step, loss)`` after every step.
    fast : bool, optional
        Trace the ELBO step once and replay it
        (:class:`~pyro_structsel.infer.traced.TracedELBO`): the same loss,
        gradients and draws as Pyro's ELBO, several times faster, for any
        model whose structure is static (others are fitted by Pyro's ELBO,
        with a :class:`~pyro_structsel.TracingWarning` saying why). ``None``:
        when the fit is long enough for tracing to pay (see
        :func:`~pyro_structsel.infer.svi.fit`); ``True``: always; ``False``:
        Pyro's stock ELBO and per-tensor ``pyro.optim.Adam``.
    compile : bool, optional
        Compile the traced step with ``torch.compile``: ``True`` at once,
        ``False`` never, ``None`` when the time it saves over the steps pays
        for the time it takes (see :func:`~pyro_structsel.infer.svi.fit`);
        the seconds spent are in ``result.losses.compile_seconds`` and the
        progress bar.
    distributed : bool, optional
        Data-parallel SVI on ``torch.distributed`` (see
        :mod:`pyro_structsel.infer.distributed`; launch with ``torchrun``). ``None``:
        when a process group is initialised; ``True``: also create the group
        from ``torchrun``'s environment if there is none; ``False``: fit on
        this process alone. Each rank fits on its shard of the data plate
        (:func:`~pyro_structsel.data_plate`), the gradients are averaged,
        every rank ends with the same :math:`q` and scores it on the full
        data with the same random draws, so every rank returns the same
        result. Only rank 0 shows progress and writes the checkpoint;
        ``callback`` runs on every rank (with the loss averaged over them).
    discrete_check : bool, optional
        Score the leading vertices of :math:`q(\Gamma)` as discrete
        structures and choose by their evidence (``None``: when the model has
        more than one structural site). Then ``result.structure`` and
        ``result.probabilities`` are the discrete evidence's, the relaxed
        ones are ``result.relaxed_structure`` and
        ``result.relaxed_probabilities``, and ``result.discrete_check`` holds
        the table of the structures scored and the cost (fits, seconds).
        An :class:`~pyro_structsel.selection.discrete_check.OverconfidenceWarning`
        says when :math:`q(\Gamma)` put ≥ 0.99 on an option the evidence
        does not choose.
    check_method : str, optional
        Evidence estimator of the discrete check (``"elbo"``, ``"iwae"``,
        ``"laplace"``, ``"gradient_descent"``). ``None``: ``"laplace"`` for a
        :class:`~pyro_structsel.NetworkModel` of at most 2000 weights (or
        with ``check_hessian``): the full-GGN Laplace evidence of each pruned
        network at its MAP, :func:`~pyro_structsel.ggn_laplace`, no SVI fit,
        seconds per structure; it recovers two-layer teachers that
        warm-started ELBO fits miss, see ``benchmarks/README.md``.
        ``"elbo"`` otherwise: the Kronecker-factored Laplace evidence of
        larger networks favoured identity layers where it was measured (see
        :func:`~pyro_structsel.selection.discrete_check.default_check_method`).
    check_hessian : str, optional
        The GGN approximation of a network's Laplace check (``"full"``,
        ``"kron"``, ``"diag"``). ``None``: ``"full"`` (the exact GGN, a
        :math:`d \times d` matrix) for supernets of at most 2000 weights,
        ``"kron"`` for larger ones (with ``check_method="laplace"``).
    check_steps : int, optional
        SVI steps of each discrete fit (default ``num_steps``). Each fit
        starts from the relaxed fit's :math:`q(w)` (means, and scales with the
        default guide) and runs Adam from ``lr`` decayed tenfold over its
        steps (a copy of ``optim`` where one is given).
    check_coverage : float
        The leading vertices scored cover this much of :math:`q(\Gamma)`'s
        mass (in (0, 1]).
    check_max_fits : int
        At most this many structures are scored.

    Returns
    -------
    SelectionResult

    Raises
    ------
    ValueError
        On a bad argument, naming it.

    Warns
    -----
    ConvergenceWarning
        The relaxed fit's ELBO has not levelled off (see
        :func:`~pyro_structsel.elbo_convergence`).
    OverconfidenceWarning
        :math:`q(\Gamma)` put ≥ 0.99 on an option the discrete evidence does not choose.


    Example
    -------
    >>> model = ps.NetworkModel(ps.two_hidden_layer(64, 10))
    >>> result = ps.select_structure(model, x, y, num_steps=2000, seed=0)
    >>> result.structure
    {'layer1': 'relu', 'layer2': 'tanh'}

    References
    ----------
    O. Bakhteev, V. Strijov. Deep learning model selection of suboptimal
    complexity. Automation and Remote Control, 2018.
    A. Zela, T. Elsken, T. Saikia, Y. Marrakchi, T. Brox, F. Hutter.
    Understanding and robustifying differentiable architecture search. ICLR 2020.
    """
    for argument, value in (("num_steps", num_steps), ("num_particles", num_particles),
                            ("num_restarts", num_restarts),
                            ("num_evidence_samples", num_evidence_samples),
                            ("checkpoint_every", checkpoint_every),
                            ("check_steps", num_steps if check_steps is None else check_steps),
                            ("check_max_fits", check_max_fits)):
        check_int(value, argument)
    check_flag(discrete_check, "discrete_check", allow_none=True)
    if isinstance(check_coverage, bool) or not isinstance(check_coverage, (int, float)) or \
            not 0 < check_coverage <= 1:
        raise ValueError(f"Expected 0 < check_coverage <= 1, but got {check_coverage!r}.")
    check_estimator = None if check_method is None else \
        parse_option(EvidenceMethod, check_method, "check_method")
    check_curvature = None if check_hessian is None else \
        parse_option(HessianStructure, check_hessian, "check_hessian").value
    check_positive(lr, "lr")
    check_seed(seed)
    check_callable(callback, "callback")
    check_flag(vectorize_particles, "vectorize_particles", allow_none=True)
    check_flag(distributed, "distributed", allow_none=True)
    _temperature_schedule(temperature, num_steps)
    if optim is not None:
        as_pyro_optimizer(optim, lr=lr)  # refuse a string or a torch optimiser object now
    parse_option(Resume, resume, "resume")
    if checkpoint is not None:
        check_checkpoint_path(checkpoint)
    estimators = check_estimator_names(evidence)
    if not callable(model):
        raise ValueError(f"Expected model to be a callable Pyro model, but got {model!r}.")
    check_inputs(model, args, kwargs, caller="select_structure",
                 caller_params=own_parameters(select_structure))
    sharded = resolve_distributed(distributed)
    with module_params_kept(model), use_distributed(sharded):  # a fit never changes the
        # model's own parameters; in a distributed fit each rank sees its shard of the data
        sites, model_params = model_sites_and_params(model, args, kwargs)
        with full_data(), use_distributed(False), pyro.get_param_store().scope():
            check_full_data(trace_model(model, args, scoring_kwargs(kwargs)),  # say so now
                            "select_structure scores the fit on the full data and")
        initial_temperature, schedule = _temperature_schedule(temperature, num_steps)

        runs = []
        for restart in range(num_restarts):
            if seed is not None:
                pyro.set_rng_seed(seed + restart)
            optimizer = as_pyro_optimizer(optim, lr=lr) if optim is not None else (
                FlatAdam({"lr": lr}) if fast is not False else pyro.optim.Adam({"lr": lr}))
            # each restart starts from its own copy of the model's parameters (learnable
            # prior scales), so no two fits share a tensor through Pyro's global param store
            with pyro.get_param_store().scope(clone_param_state(model_params)) as state:
                fitted_guide = build_guide(model, guide, sites, args, kwargs, initial_temperature)
                losses = fit(model, fitted_guide, args, kwargs, num_steps=num_steps,
                             optim=optimizer, num_particles=num_particles,
                             vectorize_particles=vectorize_particles, progress=progress,
                             checkpoint=_restart_path(checkpoint, restart, num_restarts),
                             checkpoint_every=checkpoint_every, resume=resume,
                             temperature=schedule,
                             callback=callback, fast=fast, compile=compile,
                             description=f"select_structure[{restart + 1}/{num_restarts}]"
                             if num_restarts > 1 else "select_structure")
            runs.append((state, fitted_guide, losses))
        if sharded:  # the same q on every rank: score it with the same draws everywhere
            pyro.set_rng_seed(shared_seed())
        with use_distributed(False):  # on the full data
            # restarts are compared by the final ELBO of their q, estimated afresh
            final = [_final_loss(model, guide_, state_, args, kwargs, num_evidence_samples)
                     for state_, guide_, _ in runs] if num_restarts > 1 else \
                [sum(runs[0][2][-10:]) / len(runs[0][2][-10:])]
            best = min(range(num_restarts), key=lambda i: final[i])
            state, fitted_guide, losses = runs[best]
            elbo_convergence(losses)  # warns when the kept fit has not levelled off
            result = SelectionResult(model=model, guide=fitted_guide, args=args,
                                     kwargs=dict(kwargs), param_state=state, sites=sites,
                                     losses=losses, restart_losses=final)
            _score(result, estimators, num_evidence_samples)
            if discrete_check is None:
                discrete_check = len(sites) > 1
            if discrete_check and sites:
                if check_estimator is None:
                    check_estimator = default_check_method(model, check_curvature)
                _check(result, model_params, check_estimator, guide=guide, lr=lr,
                       optim=optim, num_steps=check_steps or num_steps,
                       num_particles=num_particles, num_samples=num_evidence_samples,
                       seed=seed if seed is not None else (shared_seed() if sharded else None),
                       coverage=float(check_coverage), max_fits=check_max_fits,
                       hessian_structure=check_curvature, progress=progress)
    return result


def _final_loss(model: Callable[..., Any], guide: Any, state: dict[str, Any], args: tuple,
                kwargs: dict[str, Any], num_samples: int) -> float:
    """−ELBO of a fitted q from ``num_samples`` fresh draws (on the full data)."""
    with module_params_kept(model), pyro.get_param_store().scope(state), full_data():
        return -elbo(model, guide, *args, num_particles=num_samples,
                     **scoring_kwargs(kwargs)).value


def _check(result: SelectionResult, model_params: dict[str, Any], method: EvidenceMethod, *,
           guide: Any, lr: float, optim: pyro.optim.PyroOptim | None, num_steps: int,
           num_particles: int, num_samples: int, seed: int | None, coverage: float,
           max_fits: int, hessian_structure: str | None, progress: bool) -> None:
    """Run the discrete check on the relaxed fit; its pick and probabilities become the result's."""
    weight_guide = guide if isinstance(guide, type) else None  # a user's guide fits Γ too
    # a warm start: each structure's q(w) starts at the relaxed fit's (means and, for the
    # default guide, scales); a user's own guide fits Γ too, so the default one is used
    warm = result.weight_means() if guide is None or isinstance(guide, type) else None
    scales = result.weight_scales() if guide is None else None

    def make_optim() -> pyro.optim.PyroOptim:  # a fresh optimiser (no state) per fit
        if optim is None:  # from the warm start, Adam's step decays tenfold over the fit
            return pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1.0 / num_steps),
                                           "clip_norm": 1e3})
        given = as_pyro_optimizer(optim, lr=lr)
        if isinstance(given, FlatAdam):
            return FlatAdam(given.pt_optim_args)
        return pyro.optim.PyroOptim(given.pt_optim_constructor, given.pt_optim_args,
                                    given.pt_clip_args)

    check = run_discrete_check(
        result.model, result.args, result.kwargs, sites=result.sites,
        relaxed_probabilities=result.relaxed_probabilities, model_params=model_params,
        method=method, guide=weight_guide, num_steps=num_steps, optim=make_optim,
        num_particles=num_particles, num_samples=num_samples, seed=seed, coverage=coverage,
        max_fits=max_fits, init_values=warm, init_scales=scales,
        hessian_structure=hessian_structure, progress=progress)
    result.discrete_check = check
    result.structure.update(check.structure)
    result.probabilities.update(check.probabilities)
    if check.overconfident_sites():
        warnings.warn(check.message(), OverconfidenceWarning, stacklevel=find_stack_level())
    unsettled = check.unconverged()
    if unsettled and method is EvidenceMethod.LAPLACE:
        warnings.warn(f"The discrete check's search for the mode of {unsettled} stopped short "
                      "of it (see ps.ggn_laplace's LaplaceWarning), so their order by evidence "
                      "is not settled; score them with ps.ggn_laplace and a larger max_iter "
                      "or adam_steps, or use check_method='elbo'.",
                      ConvergenceWarning, stacklevel=find_stack_level())
    elif unsettled:
        warnings.warn(f"The discrete check's fits of {unsettled} have not converged in "
                      f"{num_steps} steps, so their order by evidence is not settled; raise "
                      "check_steps.", ConvergenceWarning, stacklevel=find_stack_level())


def _score(result: SelectionResult, estimators: list[EvidenceMethod], num_samples: int
           ) -> None:
    model, guide, args = result.model, result.guide, result.args
    kwargs = scoring_kwargs(result.kwargs)  # score on the full data, not on a minibatch
    with result.param_scope(), full_data():
        result.pinned = pinned_sites(trace_model(model, args, kwargs))
        for name, (site, option) in result.pinned.items():  # fixed by fix_structure: certain
            result.structure[name] = option
            result.probabilities[name] = torch.nn.functional.one_hot(
                torch.tensor(site.index(option)), site.num_options).float()
            result.posterior_mean[name] = result.probabilities[name]
        result.structural_complexity = (
            structural_complexity(model, guide, *args, **kwargs) if result.sites else
            Estimate(0.0, 0.0, 0, "entropy", {"vertex_entropy": 0.0, "sites": {}}))
        nesting = max_plate_nesting(model, args, kwargs)
        gammas = draw_guide(guide, args, kwargs, result.sites, num_samples=1000, nesting=nesting)
        for name, site in result.sites.items():
            per_site = result.structural_complexity.diagnostics["sites"][name]
            result.probabilities[name] = torch.tensor(per_site["probabilities"])
            result.posterior_mean[name] = site.to_simplex(gammas[name]).reshape(
                -1, site.num_options).mean(0)
            result.structure[name] = site.label(int(result.probabilities[name].argmax()))
        result.relaxed_structure = dict(result.structure)
        result.relaxed_probabilities = dict(result.probabilities)
        for method in estimators:
            result.evidence[method.value] = estimate_evidence(
                method, model, guide, *args, num_samples=num_samples, **kwargs)
        elbo_estimate = result.evidence.get(EvidenceMethod.ELBO.value) or elbo(
            model, guide, *args, num_particles=num_samples, **kwargs)
        result.description_length = description_length(elbo_estimate)
        try:
            result.parametric_complexity = parametric_complexity(model, guide, *args, **kwargs)
        except ValueError as error:
            warnings.warn(f"No parametric complexity: {error}", stacklevel=3)
    if isinstance(model, NetworkModel):
        result.classical_complexity = classical_complexity(result.derive())
