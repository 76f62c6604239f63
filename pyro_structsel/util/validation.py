"""Cheap checks of what a user passes, run before any long computation.

Each check raises ``ValueError`` or ``TypeError`` naming the argument, what
was expected, what came and how to fix it. :func:`check_inputs` checks the
data and the call of a user's model (the arguments bind to its signature,
the tensors are finite and not empty, and a keyword that a model's
``**kwargs`` would swallow but that is one or two letters away from an
option of the calling function gets a warning).
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .stacklevel import find_stack_level


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


def check_int(value: Any, argument: str, low: int = 1) -> int:
    """``value`` as an int ≥ ``low``; ``ValueError`` naming ``argument`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Expected {argument} to be an int >= {low}, but got {value!r}.")
    return int(value)


def check_positive(value: Any, argument: str) -> float:
    """``value`` as a finite float > 0; ``ValueError`` naming ``argument`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"Expected {argument} > 0 (a finite number), but got {value!r}.")
    return float(value)


def check_seed(seed: Any, argument: str = "seed") -> None:
    """``None`` or an int in ``[0, 2**32)`` (what torch, NumPy and ``random`` all accept)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"Expected {argument} to be an int or None, but got {seed!r} "
                        f"({type(seed).__name__}).")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"Expected 0 <= {argument} < 2**32, but got {seed}.")


def check_flag(value: Any, argument: str, *, allow_none: bool = False) -> None:
    """``True`` or ``False`` (or ``None`` when allowed); ``ValueError`` otherwise."""
    if isinstance(value, bool) or (allow_none and value is None):
        return
    expected = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"Expected {argument} to be {expected}, but got {value!r}.")


def check_callable(value: Any, argument: str, *, allow_none: bool = True) -> None:
    """A callable (or ``None`` when allowed); ``TypeError`` otherwise."""
    if callable(value) or (allow_none and value is None):
        return
    raise TypeError(f"Expected {argument} to be a callable{' or None' if allow_none else ''}, "
                    f"but got {value!r}.")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions turning ``a`` into ``b``."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def close_match(word: str, candidates: Iterable[str], max_distance: int = 2) -> str | None:
    """The candidate nearest to ``word`` within ``max_distance`` edits (never ``word`` itself)."""
    best, best_distance = None, max_distance + 1
    for candidate in candidates:
        if candidate == word:
            continue
        distance = edit_distance(word, candidate)
        if distance < best_distance and distance < len(word):  # some letters in common
            best, best_distance = candidate, distance
    return best


def own_parameters(function: Callable[..., Any]) -> list[str]:
    """The named parameters of ``function`` (not ``*args``/``**kwargs``)."""
    return [name for name, param in inspect.signature(function).parameters.items()
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]


def _model_target(model: Callable[..., Any]) -> Callable[..., Any]:
    return model.forward if isinstance(model, nn.Module) else model


def _model_signature(model: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(_model_target(model))
    except (TypeError, ValueError):
        return None


def model_name(model: Callable[..., Any]) -> str:
    target = _model_target(model)
    return getattr(target, "__qualname__", None) or type(model).__name__


def argument_names(model: Callable[..., Any], num: int) -> list[str]:
    """Names of the first ``num`` positional parameters of ``model`` (``args[i]`` if unknown)."""
    names = [f"args[{i}]" for i in range(num)]
    signature = _model_signature(model)
    if signature is None:
        return names
    for i, param in enumerate(list(signature.parameters.values())[:num]):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        names[i] = param.name
    return names


def _check_call(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
                caller: str, caller_params: list[str]) -> None:
    """Refuse arguments that do not bind to the model's signature, saying what to change."""
    signature = _model_signature(model)
    if signature is None:
        return
    name = f"{model_name(model)}{signature}"
    params = signature.parameters
    swallows = [p.name for p in params.values() if p.kind is p.VAR_KEYWORD]
    for key in kwargs:
        declared = key in params and params[key].kind not in (
            inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        near = close_match(key, caller_params)
        if swallows and not declared and near is not None:
            warnings.warn(
                f"{caller} passes the keyword {key}= to the model, whose **{swallows[0]} takes "
                f"it; did you mean {caller}'s own {near}=? ({caller} passes every keyword it "
                "does not know to the model.)", UserWarning, stacklevel=find_stack_level())
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        message = str(error)
        hint = ""
        if "unexpected keyword" in message:
            key = message.rsplit("'", 2)[-2] if message.count("'") >= 2 else ""
            near_model = close_match(key, [p for p in params if p not in ("self",)])
            near_caller = close_match(key, caller_params)
            hint = (f" The model takes no argument {key!r}"
                    + (f"; did you mean {near_model!r}?" if near_model else ".")
                    + (f" Or {caller}'s own {near_caller}=?" if near_caller else "")
                    + f" ({caller} passes every keyword it does not know to the model.)")
        elif "too many positional" in message:
            numbers_given = [a for a in args if isinstance(a, (int, float))
                             and not isinstance(a, bool)]
            option = "num_steps" if "num_steps" in caller_params else next(
                (p for p in caller_params if p != "model"), None)
            hint = (f" {caller} passes its positional arguments after the model to the model;"
                    f" its own options are keywords"
                    + (f" (e.g. {option}={numbers_given[-1]!r}, not {numbers_given[-1]!r})"
                       if numbers_given and option else "")
                    + ".")
        elif "missing" in message:
            hint = (f" Pass it after the model, in the order of the model's signature: "
                    f"{caller}(model, {', '.join(p for p in params if p != 'self')}, ...).")
        raise TypeError(f"{caller} cannot call the model {name} with the arguments given: "
                        f"{message}.{hint}") from None


def check_inputs(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], *,
                 caller: str | None = None,
                 caller_params: Iterable[str] = ()) -> None:
    """Check the call ``model(*args, **kwargs)`` that ``caller`` is about to make, before fitting.

    The arguments must bind to the model's signature (``TypeError`` saying
    what to change otherwise); every tensor argument must be finite and,
    with at least one dimension, hold at least one row; a keyword the model
    swallows in ``**kwargs`` but which is within two edits of one of
    ``caller_params`` gets a ``UserWarning`` (a misspelled option).
    """
    if caller is not None:
        _check_call(model, args, kwargs, caller, list(caller_params))
    named = list(zip(argument_names(model, len(args)), args)) + list(kwargs.items())
    for name, value in named:
        check_finite(name, value)
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == 0:
            raise ValueError(f"Argument {name!r} is empty (shape {tuple(value.shape)}, 0 rows): "
                             "there is no data to fit; pass at least one observation.")


def check_observations(trace: Any, model: Callable[..., Any], args: tuple,
                       kwargs: Mapping[str, Any], *, require_data: bool = False) -> None:
    """Observed values must fit their site: no broadcast that repeats them, within the support.

    ``y`` of shape ``(N, 1)`` against ``N`` categorical (or normal) rows would
    be scored ``N × N`` times; class labels outside ``0 .. K-1``, or a
    categorical likelihood over one class, are refused too, naming the site
    and the model argument that holds the values. With ``require_data`` a
    model without observed sites is refused as well.
    """
    inputs = list(zip(argument_names(model, len(args)), args)) + list(kwargs.items())
    observed = [name for name in trace.observation_nodes
                if not trace.nodes[name]["infer"].get("structsel_fixed")]
    if require_data and not observed:
        raise ValueError("The model observes no data: no sample site has obs=... (is the "
                         "target argument, e.g. y, missing?). Pass the data to the model so "
                         "that its likelihood sites are observed.")
    for name in observed:
        site = trace.nodes[name]
        fn, value = site["fn"], site["value"]
        if not torch.is_tensor(value):
            continue
        source = next((arg for arg, tensor in inputs if torch.is_tensor(tensor)
                       and tensor.shape == value.shape and tensor.dtype == value.dtype
                       and torch.equal(tensor, value)), None)
        where = f"Observed site {name!r}" + (f" (argument {source!r})" if source else "")
        batch = value.shape[: value.dim() - fn.event_dim]
        expected = tuple(fn.batch_shape + fn.event_shape)
        try:
            scored = torch.broadcast_shapes(batch, fn.batch_shape)
        except RuntimeError:
            raise ValueError(f"{where} has shape {tuple(value.shape)}, which does not broadcast "
                             f"with the batch shape {tuple(fn.batch_shape)} of its distribution "
                             f"{type(fn).__name__}; pass observations of shape {expected}.") \
                from None
        if value.dim() < fn.event_dim or math.prod(scored) > max(math.prod(batch), 1):
            raise ValueError(
                f"{where} has shape {tuple(value.shape)}, but its distribution "
                f"{type(fn).__name__} has batch shape {tuple(fn.batch_shape)} and event shape "
                f"{tuple(fn.event_shape)}: its log-likelihood would broadcast to shape "
                f"{tuple(scored)} and count each observation "
                f"{math.prod(scored) // max(math.prod(batch), 1)} times. Pass the observations "
                f"with shape {expected}"
                + (" (e.g. y.squeeze(-1))" if value.dim() and value.shape[-1] == 1 else "")
                + ".")
        base = fn
        while hasattr(base, "base_dist"):
            base = base.base_dist
        if isinstance(base, torch.distributions.Categorical) and base.logits.shape[-1] < 2:
            raise ValueError(f"{where} has a categorical likelihood over "
                             f"{base.logits.shape[-1]} class: there is nothing to predict. A "
                             "classifier needs one output per class (at least 2); use a normal "
                             "likelihood for a single real-valued target.")
        try:
            inside = bool(fn.support.check(value).all())
        except (RuntimeError, ValueError, TypeError):
            continue
        if not inside:
            hint = ""
            if isinstance(base, torch.distributions.Categorical):
                hint = (f" Class labels must be integers 0 .. {base.logits.shape[-1] - 1} (one "
                        f"per output of the model), but they range from {value.min().item()} to "
                        f"{value.max().item()}; relabel them (e.g. with "
                        "torch.unique(y, return_inverse=True)) or give the model more outputs.")
            raise ValueError(f"{where} has values outside the support {fn.support} of its "
                             f"distribution {type(fn).__name__}.{hint}")
