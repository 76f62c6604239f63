"""Fits in parameter-store scopes: no fit changes Pyro's global store or the model's own parameters.

Each fit runs inside ``pyro.get_param_store().scope(...)`` on its own copy
of the model's parameters (learnable prior scales, noise), and a
``PyroModule`` model gets its own ``PyroParam`` tensors back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable

import pyro
import torch
from pyro.nn import PyroModule
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..model.fix_messenger import pinned_sites
from ..model.sites import StructuralSite, structural_sites
from ..util.sampling import trace_model
from ..util.validation import argument_names, check_observations


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


def clone_param_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a param-store state (``get_state()``) that shares no tensor with it."""
    params = {name: nn.Parameter(value.detach().clone()) for name, value in state["params"].items()}
    return {"params": params, "constraints": dict(state["constraints"])}


def _failure_hint(error: Exception, args: tuple, kwargs: Mapping[str, Any],
                  model: Callable[..., Any]) -> str:
    """What to check when the model fails on the data: the inputs' shapes and dtypes."""
    tensors = [(name, value) for name, value in
               list(zip(argument_names(model, len(args)), args)) + list(kwargs.items())
               if torch.is_tensor(value)]
    described = ", ".join(f"{name}: {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
                          for name, value in tensors)
    text = str(error).lower()
    if "dtype" in text or "scalar type" in text:
        return (f"The tensor arguments are {described}, and torch computes in "
                f"{str(torch.get_default_dtype()).replace('torch.', '')} by default: convert the "
                "data to the dtype of the model's weights (e.g. x.float()).")
    return (f"The tensor arguments are {described}: check that their shapes match the model "
            "(plate sizes, the number of input features).")


def _check_structural_shapes(trace: Any, sites: Mapping[str, StructuralSite]) -> None:
    """A structural site is one choice: refuse one with a batch of values (e.g. inside a plate)."""
    for name in sites:
        site = trace.nodes[name]
        batch = tuple(site["fn"].batch_shape)
        if math.prod(batch) > 1:
            plates = [f"{frame.name!r} (size {frame.size})"
                      for frame in site["cond_indep_stack"] if frame.vectorized]
            raise ValueError(
                f"Structural site {name!r} has batch shape {batch}"
                + (f" because it sits inside plate {', '.join(plates)}" if plates else "")
                + f": that is {math.prod(batch)} values of it (one per "
                + ("observation" if plates else "batch element") + "), but a structure is one "
                "option per structural site. Sample it outside the plate (or one site per "
                "choice, e.g. ps.structure('layer1', ...), ps.structure('layer2', ...)).")


def _site_signature(trace: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(site["value"].shape) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
            and not site["is_observed"]}


def model_sites_and_params(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
                     ) -> tuple[dict[str, StructuralSite], dict[str, Any]]:
    """Check the model runs on the data; return its structural sites and its own parameters.

    Besides running it, checks what would otherwise give a silently wrong
    fit: observed values whose shape broadcasts against their site (``y`` of
    shape ``(N, 1)`` against ``N`` categorical rows scores ``N × N`` terms),
    values outside the likelihood's support (class labels), a model without
    observations, structural sites with a batch of values (inside the data
    plate), and latent sites that change from one call to the next.
    """
    rng = pyro.util.get_rng_state()
    try:
        with pyro.get_param_store().scope() as model_params:
            trace = trace_model(model, args, kwargs)
            again = trace_model(model, args, kwargs)
    except (ValueError, TypeError):  # the model's own checks (or its own bug): as they are
        raise
    except Exception as error:  # a shape clash inside torch or Pyro: say where to look
        raise ValueError(f"Running the model on the given data failed ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})"
                         f". {_failure_hint(error, args, kwargs, model)}") from error
    finally:
        pyro.util.set_rng_state(rng)  # checking the model leaves the random streams alone
    first, second = _site_signature(trace), _site_signature(again)
    if first != second:
        changed = sorted(set(first) ^ set(second)) or sorted(
            name for name in first if first[name] != second[name])
        raise ValueError(f"The model samples different latent sites from one call to the next "
                         f"({', '.join(repr(n) for n in changed)} in one call but not the other, "
                         "or with another shape): the guide is built for a fixed set of sites. "
                         "Make the sites the same on every call (no Python branch on a random "
                         "value), or pass a guide written for the model (guide=...).")
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
    check_observations(trace, model, args, kwargs)
    try:
        trace.compute_log_prob()
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Scoring the data under the model failed ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})"
                         f". {_failure_hint(error, args, kwargs, model)}") from error
    sites = structural_sites(trace)
    if not sites and not pinned_sites(trace):
        raise ValueError("The model has no structural site: sample a latent on the simplex, "
                         "e.g. gamma = ps.structure('layer', ['relu', 'tanh']) or a Dirichlet / "
                         "RelaxedOneHotCategorical site, to select among options.")
    _check_structural_shapes(trace, sites)
    check_observations(trace, model, args, kwargs, require_data=True)
    return sites, model_params
