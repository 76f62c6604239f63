r"""Optimisers over Pyro's param store: :class:`FlatAdam`, one fused Adam step per SVI step."""

from __future__ import annotations

from collections.abc import Mapping
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
