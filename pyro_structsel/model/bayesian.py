r"""Bayesian weights: an ``nn.Module`` whose parameters are Gaussian latent sites.

Each parameter :math:`w` of layer :math:`l` (the module that owns it) gets the
prior :math:`w \sim \mathcal N(0, h_l^2 I)`; the per-layer scales :math:`h` are
the prior hyperparameters, fixed or learnable (empirical Bayes: maximised
jointly with the ELBO). Each :class:`~pyro_structsel.MixedOp` inside the
module becomes a structural site.

The module runs through :func:`torch.func.functional_call`, vectorised by
:func:`torch.func.vmap` over the leading particle dimensions that Pyro adds
under ``vectorize_particles=True``, so any layer (``nn.Linear``, ``nn.Conv2d``,
...) stays correct with batched weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.func import functional_call, vmap

from .family import mixed_ops
from .sites import structural_prior, structure

#: Key in a weight site's ``infer`` dict that names its layer (prior group).
GROUP_KEY = "structsel_group"


def batched_call(module: nn.Module, tensors: Mapping[str, torch.Tensor], *args: Any,
                 **kwargs: Any) -> Any:
    """Call ``module(*args, **kwargs)`` with its parameters/buffers replaced by ``tensors``.

    Each replacement may carry leading batch dimensions (Pyro's particle
    plates) in front of the shape of the tensor it replaces; the call is then
    vectorised over them with :func:`torch.func.vmap` and the output gets the
    same leading dimensions. Trailing singleton batch dimensions (plates the
    global weights do not vary over) are dropped, so the output lines up with
    the data plate.
    """
    own = dict(module.named_parameters())
    own.update(module.named_buffers())
    batch_shapes = []
    for name, value in tensors.items():
        if name not in own:
            raise ValueError(f"Module has no parameter or buffer {name!r} to replace.")
        event = own[name].shape
        if value.shape[value.dim() - len(event):] != event:
            raise ValueError(f"Replacement for {name!r} has shape {tuple(value.shape)}, which "
                             f"does not end in the parameter's shape {tuple(event)}.")
        batch_shapes.append(value.shape[: value.dim() - len(event)])
    full_batch = torch.broadcast_shapes(*batch_shapes) if batch_shapes else torch.Size()
    batch = list(full_batch)
    while batch and batch[-1] == 1:
        batch.pop()
    if not batch:
        flat = {name: value.reshape(own[name].shape) for name, value in tensors.items()}
        return functional_call(module, flat, args, kwargs)
    size = math.prod(batch)
    flat = {name: value.expand(full_batch + own[name].shape).reshape((size,) + own[name].shape)
            for name, value in tensors.items()}

    def call(params: dict[str, torch.Tensor]) -> Any:
        return functional_call(module, params, args, kwargs)

    out = vmap(call, randomness="different")(flat)
    return out.reshape(tuple(batch) + out.shape[1:])


class BayesianModule(PyroModule):
    r"""Make a plain ``nn.Module`` Bayesian: Gaussian weights and structural mixed operations.

    Calling it samples every parameter of ``module`` from
    :math:`\mathcal N(0, h_l^2)` (site name: the parameter's path, prefixed by
    ``prefix``), samples :math:`\gamma` of every :class:`MixedOp` with
    :func:`~pyro_structsel.structure`, and evaluates the module with them.

    Parameters
    ----------
    module : torch.nn.Module
        The network; its own parameter values serve only to initialise guides.
    prior_scale : float or dict layer → float
        Prior standard deviation :math:`h_l` of the weights of each layer (the
        path of the module that owns them), default 1.
    learn_prior_scale : bool
        Make the scales learnable Pyro parameters (empirical Bayes).
    prior, concentration, temperature :
        Prior of the structural sites, see :func:`~pyro_structsel.structure`.
    learn_concentration, learn_temperature : bool
        Make the Dirichlet concentration :math:`\alpha` (scalar, shared by all
        structural sites) or the Concrete temperature :math:`T` a learnable
        positive Pyro parameter (``"concentration"`` / ``"temperature"`` under
        the module's name), e.g. a hyperparameter of
        :func:`~pyro_structsel.optimize_hyperparameters`.
    prefix : str
        Prefix of the weight site names.

    Example
    -------
    >>> net = BayesianModule(nn.Sequential(nn.Linear(3, 8), MixedOp(...), nn.Linear(8, 1)))
    >>> def model(x, y=None):
    ...     mean = net(x).squeeze(-1)
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("y", dist.Normal(mean, 0.1), obs=y)
    """

    def __init__(self, module: nn.Module, *, prior_scale: float | Mapping[str, float] = 1.0,
                 learn_prior_scale: bool = False, prior: str = "dirichlet",
                 concentration: float = 1.0, temperature: float = 0.5,
                 learn_concentration: bool = False, learn_temperature: bool = False,
                 prefix: str = "") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"Expected module to be a torch.nn.Module (the network), but got "
                             f"{type(module).__name__}.")
        self.network = module
        self.prefix = prefix
        self.structural_prior = dict(prior=prior, concentration=concentration,
                                     temperature=temperature)
        self.mixed_ops = {site: (path, op) for site, (path, op) in _paths(module).items()}
        for site, (_, op) in self.mixed_ops.items():  # fail now on bad prior arguments
            structural_prior(site, op.labels, **self.structural_prior)
        self.shapes = {name: p.shape for name, p in module.named_parameters()}
        if not self.shapes:
            raise ValueError("The module has no parameters to make Bayesian.")
        self.group_of = {name: name.rpartition(".")[0] or "network" for name in self.shapes}
        self.groups = list(dict.fromkeys(self.group_of.values()))
        scales = _scale_vector(prior_scale, self.groups)
        if learn_prior_scale:
            self.prior_scale = PyroParam(scales, constraint=constraints.positive)
        else:
            self.register_buffer("prior_scale", scales)
        # learnable structural hyperparameters: read by sample() in place of the fixed values
        self._learned = [key for key, flag in (("concentration", learn_concentration),
                                               ("temperature", learn_temperature)) if flag]
        for key in self._learned:
            setattr(self, key, PyroParam(torch.tensor(float(self.structural_prior[key])),
                                         constraint=constraints.positive))

    def site_name(self, parameter: str) -> str:
        """Pyro site name of a parameter of the wrapped module."""
        return self.prefix + parameter

    def prior_scales(self) -> dict[str, float]:
        """Current prior scale :math:`h_l` of each layer."""
        scales = self.prior_scale.detach()
        return {group: float(scales[i]) for i, group in enumerate(self.groups)}

    def initial_values(self) -> dict[str, torch.Tensor]:
        """The module's own parameter values by site name (for guide initialisation)."""
        return {self.site_name(n): p.detach().clone() for n, p in self.network.named_parameters()}

    def sample(self) -> dict[str, torch.Tensor]:
        """Sample weights and structural weights; keys are parameter/buffer paths."""
        scales = self.prior_scale
        values: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            scale = scales[self.groups.index(self.group_of[name])]
            prior = dist.Normal(torch.zeros((), dtype=scale.dtype), scale).expand(shape)
            values[name] = pyro.sample(self.site_name(name), prior.to_event(len(shape)),
                                       infer={GROUP_KEY: self.group_of[name]})
        prior_args = {**self.structural_prior, **{k: getattr(self, k) for k in self._learned}}
        for site, (path, op) in self.mixed_ops.items():
            key = f"{path}.gamma" if path else "gamma"
            values[key] = structure(site, op.labels, **prior_args)
        return values

    def apply(self, values: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Evaluate the network with sampled ``values`` (see :meth:`sample`)."""
        return batched_call(self.network, values, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply(self.sample(), *args, **kwargs)


def _paths(module: nn.Module) -> dict[str, tuple[str, Any]]:
    ops = mixed_ops(module)
    paths = {id(op): path for path, op in module.named_modules()}
    return {site: (paths[id(op)], op) for site, op in ops.items()}


def _scale_vector(prior_scale: float | Mapping[str, float], groups: list[str]) -> torch.Tensor:
    if isinstance(prior_scale, Mapping):
        unknown = set(prior_scale) - set(groups)
        if unknown:
            raise ValueError(f"prior_scale names unknown layers {sorted(unknown)}; the layers "
                             f"are {groups}.")
        values = [prior_scale.get(g, 1.0) for g in groups]
    else:
        values = [prior_scale] * len(groups)
    tensor = torch.tensor([float(v) for v in values])
    if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
        raise ValueError(f"Expected prior_scale > 0, but got {prior_scale!r}.")
    return tensor
