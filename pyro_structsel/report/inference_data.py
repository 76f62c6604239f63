r"""Export a structure-selection fit to ArviZ ``InferenceData``.

ArviZ's own ``from_pyro`` converts MCMC runs only; :func:`to_inference_data`
converts a variational fit. Everything ArviZ-version-specific lives in this
module (written for ArviZ 0.23, where ``InferenceData`` is built with
``az.from_dict``), so a converter for ArviZ ≥ 1 can sit beside it.

Groups
------
``posterior``
    ``num_samples`` draws from :math:`q`, one chain. Each structural site
    :math:`\gamma` (on the simplex, also for Concrete sites sampled in log
    space) has an option dimension ``<site>_option`` whose coordinates are
    the option labels; the weights are added with ``include_weights=True``.
``prior``
    Draws of the same sites from the model's prior.
``log_likelihood``
    :math:`\log p(y_i \mid z_s)` for every observed site, one value per
    observation, so ``az.loo``, ``az.waic`` and ``az.compare`` work.
``observed_data``, ``constant_data``
    The observed values and the model's other tensor inputs.
``sample_stats``
    Per draw: ``lp`` :math:`= \log p(D, z)`, ``log_prior``
    :math:`= \log p(z)`, ``log_q`` :math:`= \log q(z)` and ``log_weight``
    :math:`= \log p(D, z) - \log q(z)`.
``elbo_trace``
    The loss (−ELBO) and the ELBO at every SVI step (dimension ``step``),
    and the final loss of every restart (dimension ``restart``).

``attrs`` hold the chosen structure, option labels and probabilities (JSON
strings), the evidence estimates and complexities (floats, and the full
estimates as a JSON string) and the diagnostics (PSIS :math:`\hat k`, ELBO
convergence), all in NetCDF-safe types, so ``idata.to_netcdf`` round-trips.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn

from ..util.memory import memory_budget as resolve_budget
from ..util.minibatch import MINIBATCH_KWARGS, full_data, subsampled_observations
from ..util.sampling import Draws, draw, draw_in_chunks, max_plate_nesting, trace_model
from ..util.validation import check_seed
from ..util.version import VERSION
from .diagnostics import diagnose_draws
from .fitted import FittedSelection

if TYPE_CHECKING:
    import arviz


_PRIOR_PLATE = "_structsel_prior_draws"


def _import_arviz() -> Any:
    # ArviZ 0.23 announces its 1.0 refactor with a FutureWarning on import; it is
    # addressed to ArviZ's own users, not to users of this converter.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor",
                                category=FutureWarning)
        import arviz

    return arviz


class _EnoughSites(Exception):
    """Raised to stop a model once every wanted site has been sampled."""


class _CollectMessenger(Messenger):
    """Records the values of ``names`` and stops the model once all are sampled."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = set(names)
        self.values: dict[str, Any] = {}

    def _pyro_post_sample(self, msg: dict[str, Any]) -> None:
        if msg["name"] in self.names and not msg["is_observed"]:
            self.values[msg["name"]] = (msg["value"].detach(), msg["fn"].event_dim)
            if len(self.values) == len(self.names):
                raise _EnoughSites


def _prior_pass(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
                names: list[str], num: int | None, nesting: int) -> dict[str, Any]:
    collect = _CollectMessenger(names)
    with ExitStack() as stack:
        stack.enter_context(poutine.block())
        stack.enter_context(collect)
        if num is not None:
            stack.enter_context(pyro.plate(_PRIOR_PLATE, num, dim=-(nesting + 1)))
        try:
            model(*args, **kwargs)
        except _EnoughSites:
            pass
    missing = set(names) - set(collect.values)
    if missing:
        raise ValueError(f"the prior pass did not sample {sorted(missing)}")
    return collect.values


def prior_draws(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
                names: list[str], num: int, vectorize: bool,
                memory_budget: int | None = None) -> dict[str, torch.Tensor]:
    """Prior draws of ``names`` (leading dimension ``num``), stopping the model early.

    Vectorised in chunks sized from two probe draws to fit the memory budget
    (see :func:`~pyro_structsel.util.sampling.draw`).
    """
    if not names:
        return {}
    if vectorize:
        try:
            nesting = max_plate_nesting(model, args, kwargs)

            def batch(size: int) -> dict[str, torch.Tensor]:
                out = {}
                for name, (value, event_dim) in _prior_pass(model, args, kwargs, names, size,
                                                            nesting).items():
                    if value.shape[: value.dim() - event_dim].numel() != size:
                        raise ValueError(f"site {name!r} is not batched over prior draws")
                    out[name] = value.reshape((size,) + value.shape[value.dim() - event_dim:])
                return out

            parts = draw_in_chunks(batch, num, budget=resolve_budget(memory_budget),
                                   what="The prior draws")
            return {name: torch.cat([part[name] for part in parts]) for name in names}
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 -- as in sampling.draw: not vectorisable
            pass
    passes = [_prior_pass(model, args, kwargs, names, None, 0) for _ in range(num)]
    return {name: torch.stack([p[name][0] for p in passes]) for name in names}


def _input_names(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """The model's inputs by argument name (``arg<i>`` where the signature is unknown)."""
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        bound = inspect.signature(target).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        named = {f"arg{i}": value for i, value in enumerate(args)}
        named.update(kwargs)
        return named
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{name}{i}": v for i, v in enumerate(value)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def _json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, (np.generic,)):
            return obj.item()
        return str(obj)

    return json.dumps(value, default=default)


def _safe_key(key: str) -> str:
    return key.replace("[", "_").replace("]", "").replace("/", "_")


class _InferenceDataConverter:
    """Builds the groups of the ``InferenceData`` of one fit; see :func:`to_inference_data`."""

    def __init__(self, result: FittedSelection, *, num_samples: int, include_weights: bool,
                 num_prior_samples: int, model_kwargs: Mapping[str, Any] | None,
                 chunk_size: int | None, vectorize: bool | None, warn: bool,
                 memory_budget: int | None = None) -> None:
        self.result = result
        self.memory_budget = memory_budget
        self.num_samples = num_samples
        self.include_weights = include_weights
        self.num_prior_samples = num_prior_samples
        self.chunk_size = chunk_size
        self.vectorize = vectorize
        self.warn = warn
        kwargs = dict(result.kwargs)
        self.dropped = [key for key in MINIBATCH_KWARGS
                        if key in kwargs and key not in (model_kwargs or {})]
        for key in self.dropped:
            del kwargs[key]
        kwargs.update(model_kwargs or {})
        self.kwargs = kwargs

    def _inspect_model(self) -> None:
        result = self.result
        trace = trace_model(result.model, result.args, self.kwargs)
        trace.compute_log_prob()
        subsampled = subsampled_observations(trace)
        if subsampled:
            name, plate, size, full_size = subsampled[0]
            raise ValueError(
                f"Observed site {name!r} sits in plate {plate!r} subsampled to "
                f"{size} of {full_size}; the pointwise log-likelihood needs "
                "every observation. Pass model_kwargs that evaluate the full data "
                "(e.g. model_kwargs={'batch_size': None}).")
        self.observed: dict[str, Any] = {
            name: trace.nodes[name] for name in trace.observation_nodes
            if not trace.nodes[name]["infer"].get("structsel_fixed")}  # pinned sites are not data
        self.structural = list(result.sites)
        self.weights = [name for name in trace.stochastic_nodes if name not in result.sites]

    def _draw(self) -> Draws:
        result = self.result
        # a fit with no structural site (a fixed structure) exports its weights instead
        include_weights = self.include_weights or not self.structural
        latents = self.structural + (self.weights if include_weights else [])
        draws = draw(result.model, result.guide, result.args, self.kwargs,
                     num_samples=self.num_samples, chunk_size=self.chunk_size,
                     vectorize=self.vectorize, keep=latents, pointwise=True,
                     memory_budget=self.memory_budget, what="to_inference_data")
        self.prior = prior_draws(result.model, result.args, self.kwargs, latents,
                                 self.num_prior_samples,
                                 vectorize=draws.vectorized and self.vectorize is not False,
                                 memory_budget=self.memory_budget)
        return draws

    def _latent_group(self, values: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        group = {}
        for name, value in values.items():
            if name in self.result.sites:
                value = self.result.sites[name].to_simplex(value)
            group[name] = _to_numpy(value)[None]  # one chain
        return group

    def _dims_and_coords(self, draws: Draws) -> tuple[dict[str, list[str]], dict[str, Any]]:
        dims: dict[str, list[str]] = {}
        coords: dict[str, Any] = {}
        for name, site in self.result.sites.items():
            batch = draws.values[name].dim() - 2
            dims[name] = [f"{name}_dim_{i}" for i in range(batch)] + [f"{name}_option"]
            coords[f"{name}_option"] = site.option_names()
        for name, site in self.observed.items():
            shape = tuple(site["log_prob"].shape)
            dims[name] = [f"{name}_dim_{i}" for i in range(len(shape))]
        return dims, coords

    def _log_likelihood(self, draws: Draws) -> dict[str, np.ndarray]:
        group = {}
        for name, site in self.observed.items():
            pointwise = draws.pointwise[name]
            shape = tuple(site["log_prob"].shape)
            if math.prod(shape) == pointwise.shape[1]:
                pointwise = pointwise.reshape((pointwise.shape[0],) + shape)
            group[name] = _to_numpy(pointwise)[None]
        return group

    def _constant_data(self, taken: set[str]) -> dict[str, np.ndarray]:
        result = self.result
        observed = [site["value"] for site in self.observed.values()]
        group = {}
        for name, value in _input_names(result.model, result.args, self.kwargs).items():
            if not torch.is_tensor(value):
                continue
            if any(value.shape == obs.shape and torch.equal(value, obs) for obs in observed):
                continue  # the observations themselves: already in observed_data
            group[f"{name}_input" if name in taken else name] = _to_numpy(value)
        return group

    def _attrs(self, draws: Draws, diagnostics: Any) -> dict[str, Any]:
        result = self.result
        attrs: dict[str, Any] = {
            "inference_library": "pyro",
            "inference_library_version": pyro.__version__,
            "pyro_structsel_version": VERSION,
            "method": "svi",
            "structure": _json(result.structure),
            "options": _json({n: s.option_names() for n, s in result.sites.items()}),
            "probabilities": _json({n: p.tolist() for n, p in result.probabilities.items()}),
            "posterior_mean": _json({n: m.tolist() for n, m in result.posterior_mean.items()}),
            "evidence": _json({name: {"value": est.value, "se": est.se,
                                      "num_samples": est.num_samples, "method": est.method,
                                      "diagnostics": est.diagnostics}
                               for name, est in result.evidence.items()}),
            "num_steps": len(result.losses),
            "final_loss": float(result.losses[-1]) if result.losses else math.nan,
            "num_restarts": len(result.restart_losses),
            "num_samples": draws.num_samples,
            "vectorized": int(draws.vectorized),
            "dropped_model_kwargs": _json(self.dropped),
        }
        attrs.update({_safe_key(k): float(v) for k, v in result.scores().items()})
        for key in ("parametric_complexity", "structural_complexity"):
            est = getattr(result, key)
            if est is not None:
                attrs[f"{key}_se"] = float(est.se)
                attrs[f"{key}_estimate"] = _json({"value": est.value, "se": est.se,
                                                  "method": est.method,
                                                  "diagnostics": est.diagnostics})
        if result.classical_complexity is not None:
            attrs["classical_complexity"] = _json(result.classical_complexity)
        attrs.update(diagnostics.to_dict())
        return attrs

    def convert(self) -> Any:
        az = _import_arviz()
        import xarray as xr

        result = self.result
        with result.param_scope(), torch.no_grad(), full_data():
            self._inspect_model()
            draws = self._draw()
        diagnostics = diagnose_draws(draws.log_weights, result.losses, warn=self.warn)
        result.diagnostics = diagnostics
        dims, coords = self._dims_and_coords(draws)
        posterior = self._latent_group(draws.values)
        prior = self._latent_group(self.prior)
        log_likelihood = self._log_likelihood(draws)
        observed_data = {name: _to_numpy(site["value"]) for name, site in self.observed.items()}
        constant_data = self._constant_data(set(dims) | set(posterior))
        sample_stats = {
            "lp": _to_numpy(draws.log_likelihood + draws.log_prior)[None],
            "log_prior": _to_numpy(draws.log_prior)[None],
            "log_q": _to_numpy(draws.log_q)[None],
            "log_weight": _to_numpy(draws.log_weights)[None],
        }
        group_attrs = {"inference_library": "pyro",
                       "inference_library_version": pyro.__version__,
                       "method": "svi"}
        idata = az.from_dict(
            posterior=posterior, prior=prior or None, log_likelihood=log_likelihood or None,
            observed_data=observed_data or None, constant_data=constant_data or None,
            sample_stats=sample_stats, coords=coords, dims=dims,
            posterior_attrs=dict(group_attrs), prior_attrs=dict(group_attrs),
            sample_stats_attrs=dict(group_attrs), log_likelihood_attrs=dict(group_attrs))
        losses = np.asarray(result.losses, dtype=np.float64)
        elbo_trace = xr.Dataset(
            {"loss": ("step", losses), "elbo": ("step", -losses),
             "restart_loss": ("restart", np.asarray(result.restart_losses, dtype=np.float64))},
            coords={"step": np.arange(len(losses)),
                    "restart": np.arange(len(result.restart_losses))},
            attrs={"description": "loss = -ELBO at every SVI step of the kept restart; "
                                  "restart_loss = mean loss over the last tenth of each restart"})
        idata.add_groups({"elbo_trace": elbo_trace})
        idata.attrs = self._attrs(draws, diagnostics)  # once, not on every data group
        return idata


def to_inference_data(result: FittedSelection, *, num_samples: int = 1000,
                      include_weights: bool = False, num_prior_samples: int | None = None,
                      model_kwargs: Mapping[str, Any] | None = None,
                      chunk_size: int | None = None, vectorize: bool | None = None,
                      seed: int | None = None, warn: bool = True,
                      memory_budget: int | None = None) -> arviz.InferenceData:
    r"""Convert a structure-selection fit to ArviZ ``InferenceData``.

    Draws :math:`z_s \sim q` in one vectorised pass (falling back to one draw
    at a time, with a :class:`~pyro_structsel.util.sampling.VectorizationWarning`,
    for models that do not broadcast over a batch of draws) and scores each
    under the model: the draws, the pointwise log-likelihood and the
    importance weights come from the same traces. Groups: ``posterior``,
    ``prior``, ``log_likelihood``, ``observed_data``, ``constant_data``,
    ``sample_stats`` and ``elbo_trace`` (see :mod:`pyro_structsel.report.inference_data`).
    Also runs the diagnostics of the fit (PSIS :math:`\hat k` of :math:`q`,
    ELBO convergence), warns when they fail, stores them as
    ``result.diagnostics`` and in ``attrs``.

    The export evaluates the model on the **full data**: a minibatch keyword
    argument of the fit (``batch_size``, as taken by
    :class:`~pyro_structsel.NetworkModel`) is dropped, so that the
    log-likelihood has one value per observation (``attrs["dropped_model_kwargs"]``
    lists what was dropped). ``model_kwargs`` overrides the fit's keyword
    arguments. Observed sites still in a subsampled plate raise ``ValueError``.

    The draws come from :math:`q`, not from the exact posterior: ``az.loo``
    treats them as posterior draws, which is as good as :math:`q` (check
    ``attrs["khat"]``); ``sample_stats.log_weight`` holds the importance
    weights to correct for it.

    Parameters
    ----------
    result : SelectionResult
        A fit from :func:`~pyro_structsel.select_structure`.
    num_samples : int
        Draws from :math:`q` (one chain).
    include_weights : bool
        Also export the non-structural latent sites (the weights) in
        ``posterior`` and ``prior``; they can be large. Always on for a fit
        without structural sites (a fixed structure).
    num_prior_samples : int, optional
        Prior draws (default ``num_samples``).
    model_kwargs : dict, optional
        Keyword arguments of the model that replace those of the fit.
    chunk_size : int, optional
        At most this many draws per vectorised pass (default: as many as the
        memory budget allows).
    vectorize : bool, optional
        ``False``: draw one at a time; ``True``: fail rather than fall back;
        ``None`` (default): vectorise, fall back with a warning.
    seed : int, optional
        Seed of the draws; the global random state is left as it was.
    warn : bool
        Warn (:class:`~pyro_structsel.ParetoKWarning`,
        :class:`~pyro_structsel.ConvergenceWarning`) when a
        diagnostic fails.
    memory_budget : int, optional
        Bytes one vectorised pass (plus the draws kept) may use; default a
        quarter of the available memory. Two draws go first to measure what
        a draw needs and to check the model broadcasts over draws (one that
        does not, e.g. ``x @ W1 + b1``, is drawn one at a time); a budget too
        small for the draws kept raises ``MemoryError``.

    Returns
    -------
    arviz.InferenceData

    References
    ----------
    R. Kumar, C. Carroll, A. Hartikainen, O. Martin. ArviZ a unified library
    for exploratory analysis of Bayesian models in Python. JOSS, 2019.
    Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?:
    Evaluating variational inference. ICML 2018.

    Example
    -------
    >>> result = ps.select_structure(model, x, y, num_steps=2000)
    >>> idata = ps.to_inference_data(result, num_samples=1000)
    >>> az.summary(idata, var_names=list(result.sites))
    >>> az.loo(idata)
    """
    for argument, value in (("num_samples", num_samples),
                            ("num_prior_samples", num_prior_samples)):
        if value is None and argument == "num_prior_samples":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {argument} to be a positive int, but got {value!r}.")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise ValueError(f"Expected model_kwargs to be a dict, but got {model_kwargs!r}.")
    if not hasattr(result, "param_scope") or not hasattr(result, "guide"):
        raise TypeError(f"Expected result to be a SelectionResult (from ps.select_structure), "
                        f"but got {type(result).__name__}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"Expected chunk_size to be a positive int or None, but got "
                         f"{chunk_size!r}.")
    check_seed(seed)
    resolve_budget(memory_budget)  # refuse a bad budget before drawing
    converter = _InferenceDataConverter(
        result, num_samples=num_samples, include_weights=include_weights,
        num_prior_samples=num_prior_samples or num_samples, model_kwargs=model_kwargs,
        chunk_size=chunk_size, vectorize=vectorize, warn=warn, memory_budget=memory_budget)
    if seed is None:
        return converter.convert()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return converter.convert()
