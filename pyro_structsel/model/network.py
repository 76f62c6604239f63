r"""A ready Pyro model: a Bayesian network of a family plus a likelihood.

.. math::

    \Gamma \sim p(\Gamma), \quad w \sim \mathcal N(0, h^2), \quad
    y_i \mid x_i, w, \Gamma \sim p(y \mid f_{w,\Gamma}(x_i)), \ i \in \text{plate}

with a ``pyro.plate`` over the data that subsamples minibatches (and, in a
distributed fit, takes this rank's shard: :func:`~pyro_structsel.data_plate`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..util.options import Likelihood, parse_option
from ..util.validation import check_finite, close_match, own_parameters
from .bayesian import BayesianModule
from .family import derive_network
from .plate import data_plate


class NetworkModel(PyroModule):
    r"""Bayesian network + likelihood, ready for :func:`~pyro_structsel.select_structure`.

    Call it as ``model(x, y=None, *, batch_size=None)``: ``x`` has one row per
    observation, ``y`` one label (``"categorical"``) or target (``"normal"``)
    per row, and ``batch_size`` subsamples the data plate (the likelihood is
    rescaled by Pyro so minibatches estimate the full-data ELBO). In a
    distributed fit each rank takes its shard of the rows and ``batch_size``
    is the minibatch per rank (see :func:`~pyro_structsel.data_plate`).

    Parameters
    ----------
    network : torch.nn.Module
        A family, e.g. :func:`~pyro_structsel.two_hidden_layer`; its output is
        the logits (categorical) or the mean (normal).
    likelihood : {"categorical", "normal"}
        Observation model.
    noise_scale : float
        Standard deviation of the normal likelihood.
    **kwargs
        Passed to :class:`~pyro_structsel.BayesianModule` (``prior_scale``,
        ``learn_prior_scale``, ``prior``, ``concentration``, ``temperature``).

    Example
    -------
    >>> model = NetworkModel(two_hidden_layer(64, 10), likelihood="categorical")
    >>> result = select_structure(model, x, y, num_steps=500)
    """

    def __init__(self, network: nn.Module, *, likelihood: str = "categorical",
                 noise_scale: float = 1.0, **kwargs: Any) -> None:
        if not isinstance(network, nn.Module):
            raise ValueError(f"Expected network to be a torch.nn.Module (e.g. "
                             f"ps.one_hidden_layer(4, 3)), but got {type(network).__name__}.")
        options = own_parameters(BayesianModule.__init__)[2:]  # after self, module
        for key in kwargs:
            if key not in options:
                near = close_match(key, options + ["likelihood", "noise_scale"])
                raise TypeError(f"NetworkModel got an unexpected keyword argument {key!r}"
                                + (f"; did you mean {near!r}?" if near else "")
                                + f" It takes likelihood, noise_scale and {', '.join(options)}.")
        super().__init__()
        self.likelihood = parse_option(Likelihood, likelihood, "likelihood")
        if not noise_scale > 0:
            raise ValueError(f"Expected noise_scale > 0, but got {noise_scale!r}.")
        self.noise_scale = float(noise_scale)
        self.net = BayesianModule(network, **kwargs)

    @property
    def network(self) -> nn.Module:
        """The plain (non-Bayesian) network."""
        return self.net.network

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Initial weight values by site name (the network's own initialisation)."""
        return self.net.initial_values()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
                batch_size: int | None = None) -> torch.Tensor:
        self.check_data(x, y, batch_size)
        values = self.net.sample()
        with data_plate("data", x.shape[0], subsample_size=batch_size) as idx:
            try:
                out = self.net.apply(values, x[idx])
            except RuntimeError as error:  # a shape clash inside the network: name x
                raise ValueError(
                    f"The network cannot run on x of shape {tuple(x.shape)} "
                    f"({str(error).strip().splitlines()[0]}). x needs one row per observation "
                    f"and {self._input_description()}.") from error
            if out.dim() < 2 or out.shape[-2] != len(idx):
                raise ValueError(
                    f"The network maps x of shape {tuple(x.shape)} to an output of shape "
                    f"{tuple(out.shape)}, but the likelihood needs one output row per "
                    f"observation, shape (..., {len(idx)}, outputs). Pass x with one row per "
                    f"observation and {self._input_description()}.")
            obs = None if y is None else y[idx]
            if self.likelihood is Likelihood.CATEGORICAL:
                return pyro.sample("obs", dist.Categorical(logits=out), obs=obs)
            if out.shape[-1] == 1 and (obs is None or obs.dim() == 1):
                return pyro.sample("obs", dist.Normal(out.squeeze(-1), self.noise_scale),
                                   obs=obs)
            return pyro.sample("obs", dist.Normal(out, self.noise_scale).to_event(1), obs=obs)

    def derive(self, structure: Mapping[str, str | int],
               weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The plain network fixed at ``structure``, with ``weights`` loaded (by site name).

        Returns a ``torch.nn.Module`` usable without Pyro.
        """
        network = self.network
        if weights is not None:
            state = {name: weights[self.net.site_name(name)].detach().reshape(shape)
                     for name, shape in self.net.shapes.items()}
            network = _with_parameters(network, state)
        return derive_network(network, structure)

    def _input_description(self) -> str:
        """What the first layer of the network takes, as far as it says."""
        for module in self.network.modules():
            if isinstance(module, nn.Linear):
                return f"{module.in_features} features (shape (N, {module.in_features}))"
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return f"{module.in_channels} channels (shape (N, {module.in_channels}, ...))"
        return "the features the network's first layer takes"

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int | None
                    ) -> None:
        if not torch.is_tensor(x):
            raise ValueError(f"Expected x to be a tensor, but got {type(x).__name__}; convert "
                             "it with torch.as_tensor(x, dtype=torch.float32).")
        weight = next(self.network.parameters())
        if x.dtype != weight.dtype:
            raise TypeError(
                f"x has dtype {x.dtype}, but the network's weights are {weight.dtype}; pass "
                f"x.to({weight.dtype}) (or build the model under torch.set_default_dtype).")
        if x.dim() < 2:
            raise ValueError(f"x has shape {tuple(x.shape)}, but the network needs one row per "
                             f"observation and {self._input_description()}"
                             + (" (x[:, None] for a single feature)." if x.dim() == 1 else "."))
        check_finite("x", x)
        if y is not None:
            if not torch.is_tensor(y):
                raise ValueError(f"Expected y to be a tensor, but got {type(y).__name__}.")
            check_finite("y", y)
            if y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"y has {y.shape[0]} rows but x has {x.shape[0]}; the data plate needs one "
                    "target per row of x."
                )
            if self.likelihood is Likelihood.CATEGORICAL and y.is_floating_point():
                raise ValueError("Expected integer class labels in y for the categorical "
                                 "likelihood; convert with y.long().")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"Expected batch_size to be a positive int or None, got "
                             f"{batch_size!r}.")


def _with_parameters(network: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    network = copy.deepcopy(network)
    with torch.no_grad():
        for name, param in network.named_parameters():
            param.copy_(state[name])
    return network
