r"""Optimisers over Pyro's param store: :class:`FlatAdam`, one fused Adam step per SVI step.

Also what a user may pass as the optimiser of a fit: a Pyro optimiser, or a
``torch.optim`` class, which :func:`as_pyro_optimizer` wraps with the fit's
learning rate (anything else, a string or a torch optimiser *object*, which
holds its own parameters, is refused before the fit starts);
:func:`optimizer_settings` describes an optimiser for the checkpoint
fingerprint, and :func:`non_finite_state` finds the parameters whose
optimiser state overflowed (Adam's second moment :math:`v = g^2` is ``inf``
for :math:`|g| > 1.8 \cdot 10^{19}` in float32, after which the parameter
never moves again).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.optim
import torch


class FlatAdam(pyro.optim.PyroOptim):
    r"""Adam over all Pyro parameters at once: one ``torch.optim.Adam`` step per SVI step.

    ``pyro.optim.Adam`` keeps one torch optimiser per parameter tensor and
    steps each in turn, a fixed Python cost per tensor and per step. Adam is
    elementwise, so one optimiser over all tensors with the same
    hyperparameters (Kingma & Ba 2015: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
    :math:`\theta \leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)`)
    computes the same updates (to float rounding); its fused kernel (default;
    ``foreach=...`` selects the multi-tensor one) runs them in one call. A tensor
    without a gradient
    is skipped, as by ``pyro.optim.Adam``.

    Checkpoints keep Pyro's format (parameter name → a one-parameter torch
    optimiser ``state_dict``), so :func:`~pyro_structsel.infer.svi.fit`
    resumes a checkpoint of either optimiser with either optimiser; the
    hyperparameters are the ones this object was built with.

    Parameters
    ----------
    optim_args : dict
        Keyword arguments of ``torch.optim.Adam`` (``lr``, ``betas``, ``eps``,
        ``weight_decay``, ``amsgrad``, ``foreach``, ``fused``), the same for
        every tensor; ``fused=True`` unless ``foreach`` is given.
    """

    def __init__(self, optim_args: Mapping[str, Any]) -> None:
        if not isinstance(optim_args, Mapping):
            raise ValueError(f"Expected optim_args to be a dict of torch.optim.Adam arguments, "
                             f"got {optim_args!r}; per-parameter arguments need "
                             "pyro.optim.Adam.")
        args = dict(optim_args) if "foreach" in optim_args else {"fused": True, **optim_args}
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], **args)  # fail now on bad args
        super().__init__(torch.optim.Adam, dict(args))
        self._optimizer: torch.optim.Adam | None = None
        self._seen: set[int] = set()

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """One Adam step on every tensor of ``params`` that has a gradient."""
        new = [p for p in params if id(p) not in self._seen]
        if new:
            if self._optimizer is None:
                self._optimizer = torch.optim.Adam(new, **self.pt_optim_args)
            else:
                self._optimizer.param_groups[0]["params"].extend(new)
            store = pyro.get_param_store()
            for p in new:
                self._seen.add(id(p))
                saved = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
                if saved is not None and 0 in saved.get("state", {}):
                    self._optimizer.state[p] = {
                        key: value.detach().clone() if torch.is_tensor(value) else value
                        for key, value in saved["state"][0].items()}
        if self._optimizer is not None:
            self._optimizer.step(*args, **kwargs)

    def torch_optimizers(self) -> list[torch.optim.Adam]:
        """The one torch optimiser over every tensor stepped so far (none before a step)."""
        return [] if self._optimizer is None else [self._optimizer]

    def get_state(self) -> dict[str, Any]:
        """Pyro's format: parameter name → one-parameter Adam ``state_dict``."""
        if self._optimizer is None:
            return dict(self._state_waiting_to_be_consumed)
        group = self._optimizer.param_groups[0]
        hyper = {key: value for key, value in group.items() if key != "params"}
        store = pyro.get_param_store()
        state = dict(self._state_waiting_to_be_consumed)
        for p in group["params"]:
            name = store.param_name(p)
            if name is None:
                continue
            own = self._optimizer.state.get(p)
            state[name] = {"state": {0: dict(own)} if own else {},
                           "param_groups": [{**hyper, "params": [0]}]}
        return state

    def set_state(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`get_state` or ``pyro.optim.Adam.get_state``.

        Applied to each tensor when it is first stepped (after the param
        store has been loaded), as ``pyro.optim.PyroOptim`` does.
        """
        self._optimizer = None
        self._seen = set()
        self._state_waiting_to_be_consumed = dict(state_dict)


#: Keyword arguments of torch optimisers that choose a kernel, not the optimisation.
_KERNEL_ARGS = frozenset({"fused", "foreach", "capturable", "differentiable"})


def as_pyro_optimizer(optim: Any, *, lr: float, argument: str = "optim") -> pyro.optim.PyroOptim:
    """``optim`` as a Pyro optimiser: itself, or a ``torch.optim`` class built with ``lr``.

    Raises
    ------
    TypeError
        For anything else, naming ``argument`` and what it accepts.
    """
    if isinstance(optim, pyro.optim.PyroOptim):
        return optim
    if isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer):
        return pyro.optim.PyroOptim(optim, {"lr": lr})
    if isinstance(optim, torch.optim.Optimizer):
        raise TypeError(
            f"Expected {argument} to be a Pyro optimiser (e.g. pyro.optim.Adam({{'lr': {lr}}})) "
            f"or a torch.optim class, but got an object of class {type(optim).__name__}, which holds "
            f"parameters of its own and would train nothing here; pass "
            f"torch.optim.{type(optim).__name__} (the class) or a pyro.optim optimiser.")
    raise TypeError(
        f"Expected {argument} to be a Pyro optimiser (e.g. pyro.optim.Adam({{'lr': {lr}}})) or "
        f"a torch.optim class (e.g. torch.optim.Adam), but got {optim!r}.")


def check_optimizer_factory(optim: Any, argument: str = "optim") -> None:
    """Refuse an ``optim`` that should make a fresh optimiser per fit but cannot."""
    if optim is None or (isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer)):
        return
    if isinstance(optim, (pyro.optim.PyroOptim, torch.optim.Optimizer)) or not callable(optim):
        raise TypeError(
            f"Expected {argument} to make a fresh optimiser for every fit: a function such as "
            f"lambda: pyro.optim.Adam({{'lr': 0.01}}) or a torch.optim class, but got {optim!r}.")


def optimizer_settings(optim: Any) -> dict[str, Any]:
    """The optimiser's algorithm and hyperparameters, as plain data (defaults filled in).

    ``pyro.optim.Adam`` and :class:`~pyro_structsel.infer.optim.FlatAdam` with
    the same arguments describe the same optimisation and get the same settings.
    """
    constructor = getattr(optim, "pt_optim_constructor", None)
    if constructor is None:
        return {"class": type(optim).__name__, "args": "unknown"}
    args = getattr(optim, "pt_optim_args", None)
    if not isinstance(args, Mapping):
        return {"class": constructor.__name__, "args": "per-parameter function"}
    settings: dict[str, Any] = {}
    try:
        for name, param in inspect.signature(constructor).parameters.items():
            if param.default is not inspect.Parameter.empty and name not in ("params",):
                settings[name] = param.default
    except (TypeError, ValueError):
        pass
    settings.update(args)
    settings = {key: value for key, value in settings.items() if key not in _KERNEL_ARGS}
    return {"class": constructor.__name__, "args": json.loads(json.dumps(settings, default=str))}


def torch_optimizers(optim: Any) -> list[torch.optim.Optimizer]:
    """The torch optimisers inside a Pyro optimiser (one per tensor, or one for all)."""
    own = getattr(optim, "torch_optimizers", None)
    if callable(own):
        return list(own())
    return list(getattr(optim, "optim_objs", {}).values())


def non_finite_state(optim: Any, params: Mapping[str, torch.Tensor]) -> list[str]:
    """The names among ``params`` (name → tensor stepped) whose optimiser state is not finite.

    One fused norm over every state tensor first; tensor by tensor only if
    it alarms (the norm of huge but finite values can overflow too).
    """
    state_of: dict[torch.Tensor, Mapping[str, Any]] = {}
    for optimizer in torch_optimizers(optim):
        state_of.update(optimizer.state)
    owned: list[tuple[str, torch.Tensor]] = []
    for name, param in params.items():
        for value in state_of.get(param, {}).values():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel():
                owned.append((name, value))
    if not owned or bool(torch.isfinite(torch.nn.utils.get_total_norm(
            [value for _, value in owned]))):
        return []
    bad = {name for name, value in owned if not bool(torch.isfinite(value).all())}
    return [name for name in params if name in bad]


def optimizer_factory(optim: Any, lr: float) -> Callable[[], pyro.optim.PyroOptim]:
    """A function making a fresh Pyro optimiser per fit from ``optim`` (see ``compare_structures``)."""
    check_optimizer_factory(optim)
    if optim is None:
        return lambda: pyro.optim.Adam({"lr": lr})
    if isinstance(optim, type):
        return lambda: as_pyro_optimizer(optim, lr=lr)

    def make() -> pyro.optim.PyroOptim:
        return as_pyro_optimizer(optim(), lr=lr, argument="the optimiser that optim() returned")

    return make
