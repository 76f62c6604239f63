"""Cheap checks of the data a user passes, run before any long computation."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``value`` holds NaN or infinity."""
    if torch.is_tensor(value) and value.is_floating_point():
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"Argument {name!r} contains {int(bad.sum())} NaN or infinite values (first at "
                f"index {first}); remove or impute them before fitting."
            )


def argument_names(model: Callable[..., Any], num: int) -> list[str]:
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


def check_inputs(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Check that every tensor argument of ``model(*args, **kwargs)`` is finite, by its name."""
    for name, value in zip(argument_names(model, len(args)), args):
        check_finite(name, value)
    for key, value in kwargs.items():
        check_finite(key, value)
