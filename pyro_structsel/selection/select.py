r"""``select_structure``: fit :math:`q(w, \Gamma)` by SVI and read off the structure.

The chosen structure is the vertex of the simplex with the highest posterior
probability at each structural site, :math:`\arg\max_k q(\arg\max_j \gamma_j = k)`;
the result carries the evidence estimates, the complexities and the loss trace.
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
from ..evidence.methods import EvidenceMethod, check_estimator_names, estimate_evidence
from ..infer.checkpoint import check_checkpoint_path
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
from ..util.validation import (
    check_callable,
    check_flag,
    check_inputs,
    check_int,
    check_positive,
    check_seed,
    own_parameters,
)
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
    **kwargs: Any,
) -> SelectionResult:
    r"""Select the structure of a Pyro model by stochastic variational inference.

    Fits :math:`q(w, \Gamma)` to ``model(*args, **kwargs)`` by maximising the
    ELBO, chooses at each structural site the option most probably the
    largest weight under :math:`q`, and scores the fit: evidence estimates,
    parametric and structural complexity, description length.

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
        best final ELBO is kept (guards against a local optimum).
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

    Returns
    -------
    SelectionResult

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
    """
    for argument, value in (("num_steps", num_steps), ("num_particles", num_particles),
                            ("num_restarts", num_restarts),
                            ("num_evidence_samples", num_evidence_samples),
                            ("checkpoint_every", checkpoint_every)):
        check_int(value, argument)
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
            tail = losses[-max(1, num_steps // 10):]
            runs.append((sum(tail) / len(tail), state, fitted_guide, losses))
        best = min(range(num_restarts), key=lambda i: runs[i][0])
        _, state, fitted_guide, losses = runs[best]
        result = SelectionResult(model=model, guide=fitted_guide, args=args, kwargs=dict(kwargs),
                                 param_state=state, sites=sites, losses=losses,
                                 restart_losses=[r[0] for r in runs])
        if sharded:  # the same q on every rank: score it with the same draws everywhere
            pyro.set_rng_seed(shared_seed())
        with use_distributed(False):  # on the full data
            _score(result, estimators, num_evidence_samples)
    return result


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
