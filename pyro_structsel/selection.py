r"""``select_structure``: fit :math:`q(w, \Gamma)` by SVI and read off the structure.

The chosen structure is the vertex of the simplex with the highest posterior
probability at each structural site, :math:`\arg\max_k q(\arg\max_j \gamma_j = k)`;
the result carries the evidence estimates, the complexities and the loss trace.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import pyro
import pyro.optim
import torch
from pyro.infer.autoguide import AutoGuide, AutoGuideList, AutoNormal
from pyro.nn import PyroModule
from torch import nn

from ._sampling import draw_guide, max_plate_nesting, trace_model
from .complexity import (
    DescriptionLength,
    classical_complexity,
    description_length,
    parametric_complexity,
    structural_complexity,
)
from .distributed import resolve_distributed, shared_seed, use_distributed
from .estimate import Estimate
from .evidence import EvidenceMethod, check_estimator_names, elbo, estimate_evidence
from .fastpath import FlatAdam
from .guides import default_guide
from .network import NetworkModel, check_finite
from .structure import StructuralSite, fix_structure, pinned_sites, structural_sites
from .training import fit


class SelectionResult:
    """What :func:`select_structure` found. Read its attributes; call its methods.

    Attributes
    ----------
    structure : dict
        Site name → chosen option label (index where the site has no labels).
    probabilities : dict
        Site name → tensor over options: :math:`q(\\arg\\max_j \\gamma_j = k)`.
    posterior_mean : dict
        Site name → :math:`\\mathbb E_q[\\gamma]`.
    evidence : dict
        Estimator name → :class:`~pyro_structsel.Estimate` of the log evidence.
    parametric_complexity : Estimate or None
        :math:`\\min_h \\mathrm{KL}(q(w) \\| p(w \\mid h))` (``None`` for a non-Gaussian guide).
    structural_complexity : Estimate
        Entropy of :math:`q(\\Gamma)` (see :func:`~pyro_structsel.structural_complexity`).
    description_length : DescriptionLength
        :math:`-\\mathrm{ELBO}/\\ln 2` bits, split into model and data bits.
    classical_complexity : dict or None
        Number of parameters and of superpositions of the derived network
        (for a :class:`~pyro_structsel.NetworkModel`).
    losses : list of float
        The loss (−ELBO) at every SVI step of the kept restart.
    diagnostics : FitDiagnostics or None
        PSIS k-hat of q and ELBO convergence, once :meth:`diagnose` or
        :meth:`to_inference_data` has run.
    restart_losses : list of float
        Mean loss over the last tenth of the steps of every restart.
    sites : dict
        Site name → :class:`~pyro_structsel.StructuralSite`, for the sites fitted.
    pinned : dict
        Site name → (site, option) for structural sites the model pins with
        :func:`~pyro_structsel.fix_structure` (in ``structure`` with probability 1).
    model, guide, args, kwargs :
        What was fitted; the guide's parameters live in :meth:`param_scope`.
    """

    def __init__(self, *, model: Callable[..., Any], guide: Callable[..., Any], args: tuple,
                 kwargs: dict[str, Any], param_state: dict[str, Any],
                 sites: dict[str, StructuralSite], losses: list[float],
                 restart_losses: list[float]) -> None:
        self.model = model
        self.guide = guide
        self.args = args
        self.kwargs = kwargs
        self.param_state = param_state
        self.sites = sites
        self.losses = losses
        self.restart_losses = restart_losses
        self.pinned: dict[str, tuple[StructuralSite, str | int]] = {}
        self.structure: dict[str, str | int] = {}
        self.probabilities: dict[str, torch.Tensor] = {}
        self.posterior_mean: dict[str, torch.Tensor] = {}
        self.evidence: dict[str, Estimate] = {}
        self.parametric_complexity: Estimate | None = None
        self.structural_complexity: Estimate | None = None
        self.description_length: DescriptionLength | None = None
        self.classical_complexity: dict[str, int] | None = None
        self.diagnostics: Any = None  # FitDiagnostics, set by diagnose() / to_inference_data()

    @contextmanager
    def param_scope(self) -> Iterator[dict[str, Any]]:
        """Context in which Pyro's parameter store holds this fit's parameters (only)."""
        # a PyroModule model syncs its PyroParams from the store: undo that on exit
        with module_params_kept(self.model), \
                pyro.get_param_store().scope(self.param_state) as state:
            yield state

    def fixed_model(self) -> Callable[..., Any]:
        """The model with every structural site fixed at the chosen vertex."""
        return fix_structure(self.model, self.structure)

    def weight_means(self, num_samples: int = 1000) -> dict[str, torch.Tensor]:
        """Posterior means of the non-structural latent sites.

        Exact for ``AutoNormal`` factors (the location); a Monte Carlo mean of
        ``num_samples`` guide draws otherwise.
        """
        means: dict[str, torch.Tensor] = {}
        with self.param_scope(), torch.no_grad():
            parts = list(self.guide) if isinstance(self.guide, AutoGuideList) else [self.guide]
            for part in parts:
                if isinstance(part, AutoNormal):
                    for name, site in part.prototype_trace.iter_stochastic_nodes():
                        loc, _ = part._get_loc_and_scale(name)
                        means[name] = loc.detach().clone()
            trace = trace_model(self.model, self.args, self.kwargs)
            rest = [n for n in trace.stochastic_nodes if n not in self.sites and n not in means]
            if rest:
                nesting = max_plate_nesting(self.model, self.args, self.kwargs)
                drawn = draw_guide(self.guide, self.args, self.kwargs, rest,
                                   num_samples=num_samples, nesting=nesting)
                means.update({n: v.mean(0) for n, v in drawn.items()})
        return means

    def derive(self) -> nn.Module:
        """The chosen network as a plain ``torch.nn.Module`` with posterior-mean weights.

        Only for a :class:`~pyro_structsel.NetworkModel` (or a model with a
        ``derive(structure, weights)`` method).
        """
        if not hasattr(self.model, "derive"):
            raise TypeError(f"derive() needs a model with a derive(structure, weights) method, "
                            f"such as ps.NetworkModel; {type(self.model).__name__} has none. "
                            "Use fixed_model() for a Pyro model at the chosen structure.")
        return self.model.derive(self.structure, self.weight_means())

    def summary(self) -> pd.DataFrame:
        """Per site and option: posterior probability, posterior mean of γ, chosen or not."""
        rows = []
        every = {**self.sites, **{name: site for name, (site, _) in self.pinned.items()}}
        for name, site in every.items():
            probs = self.probabilities[name]
            mean = self.posterior_mean[name]
            for k, option in enumerate(site.option_names()):
                rows.append({"site": name, "option": option,
                             "probability": float(probs[k]),
                             "posterior_mean": float(mean[k]),
                             "chosen": site.label(k) == self.structure[name]})
        return pd.DataFrame(rows).set_index(["site", "option"])

    def scores(self) -> pd.Series:
        """The fit's headline numbers (nats unless named in bits) as a pandas Series."""
        out: dict[str, float] = {}
        for name, est in self.evidence.items():
            out[f"log_evidence[{name}]"] = est.value
            out[f"log_evidence_se[{name}]"] = est.se
        if self.parametric_complexity is not None:
            out["parametric_complexity"] = self.parametric_complexity.value
        if self.structural_complexity is not None:
            out["structural_complexity"] = self.structural_complexity.value
            out["vertex_entropy"] = self.structural_complexity.diagnostics["vertex_entropy"]
        if self.description_length is not None:
            out["description_length_bits"] = self.description_length.total_bits
            out["model_bits"] = self.description_length.model_bits
            out["data_bits"] = self.description_length.data_bits
        for key, value in (self.classical_complexity or {}).items():
            out[key] = value
        return pd.Series(out, dtype=float)

    def diagnose(self, **kwargs: Any) -> Any:
        """PSIS k-hat of q and ELBO convergence (see :func:`pyro_structsel.diagnose`)."""
        from .diagnostics import diagnose

        return diagnose(self, **kwargs)

    def to_inference_data(self, **kwargs: Any) -> Any:
        """Export to ArviZ ``InferenceData`` (see :func:`pyro_structsel.to_inference_data`)."""
        from .arviz import to_inference_data

        return to_inference_data(self, **kwargs)

    def __repr__(self) -> str:
        chosen = ", ".join(f"{k}={v}" for k, v in self.structure.items())
        lines = [f"SelectionResult({chosen})"]
        for name in self.structure:
            site = self.sites[name] if name in self.sites else self.pinned[name][0]
            probs = ", ".join(f"{o}: {p:.3f}" for o, p in
                              zip(site.option_names(), self.probabilities[name]))
            lines.append(f"  {name}: {probs}")
        for name, est in self.evidence.items():
            lines.append(f"  evidence[{name}] = {est.value:.4f} ± {est.se:.4f}")
        return "\n".join(lines)


def _argument_names(model: Callable[..., Any], num: int) -> list[str]:
    """Names of the first ``num`` positional parameters of ``model`` (``args[i]`` if unknown)."""
    names = [f"args[{i}]" for i in range(num)]
    try:
        params = list(inspect.signature(
            model.forward if isinstance(model, nn.Module) else model).parameters.values())
    except (TypeError, ValueError):
        return names
    for i, param in enumerate(params[:num]):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        names[i] = param.name
    return names


def _check_inputs(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> None:
    for name, value in zip(_argument_names(model, len(args)), args):
        check_finite(name, value)
    for key, value in kwargs.items():
        check_finite(key, value)


def _cached_module_params(model: Any) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The unconstrained tensors that a PyroModule model keeps for its PyroParams.

    A PyroModule re-points them at the param store's tensors whenever it runs
    inside a scope, so they are saved and restored around every fit and
    :meth:`SelectionResult.param_scope`: the model keeps its own values and a
    later fit of it starts from them, not from a previous fit's.
    """
    if not isinstance(model, PyroModule):
        return []
    return [(module, f"{name}_unconstrained", module._parameters[f"{name}_unconstrained"])
            for module in model.modules() if isinstance(module, PyroModule)
            for name in module._pyro_params
            if f"{name}_unconstrained" in module._parameters]


def _restore_module_params(cached: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    for module, key, value in cached:
        module._parameters[key] = value


@contextmanager
def module_params_kept(model: Any) -> Iterator[None]:
    """Put back the model's own PyroParam tensors on exit (see ``_cached_module_params``)."""
    cached = _cached_module_params(model)
    try:
        yield
    finally:
        _restore_module_params(cached)


def _clone_state(state: Mapping[str, Any]) -> dict[str, Any]:
    params = {name: nn.Parameter(value.detach().clone()) for name, value in state["params"].items()}
    return {"params": params, "constraints": dict(state["constraints"])}


def _trace_for_sites(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
                     ) -> tuple[dict[str, StructuralSite], dict[str, Any]]:
    """Check the model runs on the data; return its structural sites and its own parameters."""
    try:
        with pyro.get_param_store().scope() as model_params:
            trace = trace_model(model, args, kwargs)
            trace.compute_log_prob()
    except ValueError:
        raise
    except Exception as error:  # a shape clash inside torch or Pyro: say where to look
        raise ValueError(f"Running the model on the given data failed ({type(error).__name__}: "
                         f"{error}). Check that the data sizes match the plates and the "
                         "network's input size.") from error
    for name in trace.observation_nodes:
        site = trace.nodes[name]
        for frame in site["cond_indep_stack"]:
            if not frame.vectorized:
                continue
            dim = site["value"].dim() - site["fn"].event_dim + frame.dim
            if dim < 0 or site["value"].shape[dim] not in (1, frame.size):
                raise ValueError(
                    f"Observed site {name!r} has shape {tuple(site['value'].shape)} but sits in "
                    f"plate {frame.name!r} of size {frame.size} (dim {frame.dim}); pass data "
                    "whose size matches the plate."
                )
    sites = structural_sites(trace)
    if not sites and not pinned_sites(trace):
        raise ValueError("The model has no structural site: sample a latent on the simplex, "
                         "e.g. gamma = ps.structure('layer', ['relu', 'tanh']) or a Dirichlet / "
                         "RelaxedOneHotCategorical site, to select among options.")
    return sites, model_params


def _build_guide(model: Callable[..., Any], guide: Any, sites: Mapping[str, StructuralSite],
                 args: tuple, kwargs: Mapping[str, Any], temperature: float | None
                 ) -> Callable[..., Any]:
    if guide is not None and not (isinstance(guide, type) and issubclass(guide, AutoGuide)):
        if not callable(guide):
            raise ValueError(f"Expected guide to be a callable, an AutoGuide class or None, but "
                             f"got {guide!r}.")
        return guide
    trace = trace_model(model, args, kwargs)
    has_weights = any(name not in sites for name in trace.stochastic_nodes)
    init_values = model.initial_values() if hasattr(model, "initial_values") else None
    return default_guide(model, sites, weight_guide=guide, has_weights=has_weights,
                         init_values=init_values, temperature=temperature)


def _temperature_schedule(temperature: float | tuple[float, float] | None, num_steps: int
                          ) -> tuple[float | None, Callable[[int], float] | None]:
    if temperature is None:
        return None, None
    if isinstance(temperature, (int, float)):
        if not temperature > 0:
            raise ValueError(f"Expected temperature > 0, but got {temperature!r}.")
        return float(temperature), None
    start, end = temperature
    if not (start > 0 and end > 0):
        raise ValueError(f"Expected temperatures > 0, but got {temperature!r}.")

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
    callback: Callable[[int, float], Any] | None = None,
    fast: bool = True,
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
    optim : pyro.optim.PyroOptim, optional
        Optimiser; default ``pyro.optim.Adam({"lr": lr})``, computed as one fused
        step over all parameters (:class:`~pyro_structsel.fastpath.FlatAdam`)
        when ``fast``.
    lr : float
        Learning rate of the default optimiser.
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
        and resumed from when it exists (one file per restart).
    callback : callable, optional
        Called as ``callback(step, loss)`` after every step.
    fast : bool
        For a :class:`~pyro_structsel.NetworkModel` with the default guide, fit
        with :class:`~pyro_structsel.fastpath.NetworkELBO`: the same ELBO and
        the same Pyro parameters, computed directly in torch (several times
        faster per step); ``False`` runs Pyro's stock ``TraceMeanField_ELBO``
        and per-tensor ``pyro.optim.Adam``. Other models and guides always use
        the stock ELBO.
    distributed : bool, optional
        Data-parallel SVI on ``torch.distributed`` (see
        :mod:`pyro_structsel.distributed`; launch with ``torchrun``). ``None``:
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
    for argument, value, low in (("num_steps", num_steps, 1), ("num_particles", num_particles, 1),
                                 ("num_restarts", num_restarts, 1),
                                 ("num_evidence_samples", num_evidence_samples, 1),
                                 ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected {argument} to be an int >= {low}, but got {value!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Expected lr > 0, but got {lr!r}.")
    estimators = check_estimator_names(evidence)
    if not callable(model):
        raise ValueError(f"Expected model to be a callable Pyro model, but got {model!r}.")
    _check_inputs(model, args, kwargs)
    sharded = resolve_distributed(distributed)
    with module_params_kept(model), use_distributed(sharded):  # a fit never changes the
        # model's own parameters; in a distributed fit each rank sees its shard of the data
        sites, model_params = _trace_for_sites(model, args, kwargs)
        initial_temperature, schedule = _temperature_schedule(temperature, num_steps)

        runs = []
        for restart in range(num_restarts):
            if seed is not None:
                pyro.set_rng_seed(seed + restart)
            optimizer = optim if optim is not None else (
                FlatAdam({"lr": lr}) if fast else pyro.optim.Adam({"lr": lr}))
            # each restart starts from its own copy of the model's parameters (learnable
            # prior scales), so no two fits share a tensor through Pyro's global param store
            with pyro.get_param_store().scope(_clone_state(model_params)) as state:
                fitted_guide = _build_guide(model, guide, sites, args, kwargs, initial_temperature)
                losses = fit(model, fitted_guide, args, kwargs, num_steps=num_steps,
                             optim=optimizer, num_particles=num_particles,
                             vectorize_particles=vectorize_particles, progress=progress,
                             checkpoint=_restart_path(checkpoint, restart, num_restarts),
                             checkpoint_every=checkpoint_every, temperature=schedule,
                             callback=callback, fast=fast,
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
    model, guide, args, kwargs = result.model, result.guide, result.args, result.kwargs
    if isinstance(model, NetworkModel):  # score on the full data, not on a minibatch
        kwargs = {key: value for key, value in kwargs.items() if key != "batch_size"}
    with result.param_scope():
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
