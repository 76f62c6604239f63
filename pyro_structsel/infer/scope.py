"""Fits in parameter-store scopes: no fit changes Pyro's global store or the model's own parameters.

Each fit runs inside ``pyro.get_param_store().scope(...)`` on its own copy
of the model's parameters (learnable prior scales, noise), and a
``PyroModule`` model gets its own ``PyroParam`` tensors back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

from ..model.fix_messenger import pinned_sites
from ..model.sites import StructuralSite, structural_sites
from ..util.sampling import trace_model


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


def model_sites_and_params(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
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
