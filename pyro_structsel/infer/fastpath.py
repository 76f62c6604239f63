r"""A fast ELBO for :class:`~pyro_structsel.NetworkModel` with the default guide.

Pyro's ``TraceMeanField_ELBO`` runs the guide and the model through the effect
handlers at every step: about forty ``pyro.sample`` / ``pyro.param`` messages,
trace bookkeeping and distribution objects for a two-hidden-layer network.
For a small network this fixed Python cost is several times the arithmetic.
:class:`NetworkELBO` computes the *same* objective directly in torch from the
guide's parameters in the param store:

.. math::

    \mathcal L(q) = \frac{N}{B}\sum_{i \in \mathcal B} \log p(y_i \mid f_{w,\Gamma}(x_i))
    - \sum_l \mathrm{KL}\bigl(\mathcal N(\mu_l, \sigma_l^2) \,\|\, \mathcal N(0, h_l^2)\bigr)
    - \sum_{e} \mathrm{KL}\bigl(q(\gamma^e) \,\|\, p(\gamma^e)\bigr),

with :math:`w = \mu + \sigma \odot \varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`,
:math:`\gamma \sim q(\gamma)` reparameterised (Dirichlet: implicit
reparameterisation; Concrete: Gumbel-softmax in log space), the Gaussian KL
in closed form,

.. math::

    \mathrm{KL}(\mathcal N(\mu, \sigma^2) \| \mathcal N(0, h^2))
    = \log\frac{h}{\sigma} + \frac{\sigma^2 + \mu^2}{2h^2} - \frac12,

the Dirichlet KL in closed form and the Concrete KL by its one-sample Monte
Carlo estimate :math:`\log q(\gamma) - \log p(\gamma)`, exactly as
``TraceMeanField_ELBO`` does for these sites. The minibatch :math:`\mathcal B`
of size :math:`B` is drawn without replacement, as ``pyro.plate(...,
subsample_size=B)`` draws it; in a data-parallel fit it comes from this
rank's shard, weighted as :func:`~pyro_structsel.data_plate` weights it
(:func:`~pyro_structsel.data_rows`).

Pyro semantics are kept: the model is still the Pyro model and the guide
still the guide; the parameters are read from Pyro's param store (directly,
not through ``pyro.param``'s effect handlers: the fast path applies only when
no handler is active), so gradients land in the ``.grad`` of the very tensors
that the stock ELBO would update (:meth:`NetworkELBO.parameters_read` names
them, as a ``poutine.trace(param_only=True)`` would), and checkpoints,
resume, scoring and export work unchanged.

Optionally (``local_reparam=True``) the weights of every ``nn.Linear`` are
integrated into the pre-activations (local reparameterisation trick, Kingma,
Salimans & Welling 2015): :math:`a W^\top + b` is drawn as
:math:`\mathcal N(a\mu_W^\top + \mu_b,\; a^2 (\sigma_W^2)^\top + \sigma_b^2)`
with independent noise per row. This changes the variance of the estimator
(lower, for minibatches) but not its expectation. It is off by default.

References
----------
D. Kingma, T. Salimans, M. Welling. Variational dropout and the local
reparameterization trick. NeurIPS 2015.
M. Figurnov, S. Mohamed, A. Mnih. Implicit reparameterization gradients. NeurIPS 2018.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoGuideList
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn
from torch.distributions import kl_divergence
from torch.func import functional_call

from ..model.bayesian import batched_call
from ..model.network import NetworkModel
from ..model.plate import data_rows
from ..model.sites import ExpRelaxedCategorical, is_log_simplex, structural_prior
from ..util.options import Likelihood
from .guides import AutoMeanFieldNormal, AutoStructure

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class _WeightSite:
    key: str  # parameter path in the network
    loc: str  # param store names
    scale: str
    group: int  # index into the prior scales


@dataclass(frozen=True)
class _GammaSite:
    name: str
    key: str  # buffer path of the MixedOp's gamma
    param: str  # concentration or logits in the store
    part: AutoStructure
    prior: Any
    log_space: bool


def fast_path_support(model: Any, guide: Any) -> str | None:
    """Why :class:`NetworkELBO` cannot run ``(model, guide)``, or ``None`` if it can.

    Covered: a :class:`~pyro_structsel.NetworkModel` (exactly that class, no
    subclass that may override ``forward``) with the default guide, an
    ``AutoGuideList`` of :class:`~pyro_structsel.AutoStructure` for the
    structural sites and :class:`~pyro_structsel.AutoMeanFieldNormal` for the
    weights, both already set up (called once), with their parameters in the
    active param store, and no Pyro effect handler active around the fit.
    """
    if type(model) is not NetworkModel:
        return f"the model is a {type(model).__name__}, not a NetworkModel"
    if type(guide) is not AutoGuideList:
        return f"the guide is a {type(guide).__name__}, not the default AutoGuideList"
    parts = list(guide)
    kinds = [type(part) for part in parts]
    if kinds not in ([AutoStructure, AutoMeanFieldNormal], [AutoMeanFieldNormal, AutoStructure]):
        return (f"the guide's parts are {[k.__name__ for k in kinds]}, not AutoStructure + "
                "AutoMeanFieldNormal")
    if any(part.prototype_trace is None for part in parts):
        return "the guide has not been set up (call it once first)"
    if any(part.create_plates is not None for part in parts):
        return "the guide has a create_plates function"
    if _PYRO_STACK:
        return "Pyro effect handlers are active around the fit"
    try:
        _describe(model, guide)
    except _Unsupported as why:
        return str(why)
    return None


class _Unsupported(Exception):
    pass


def _describe(model: NetworkModel, guide: AutoGuideList
              ) -> tuple[list[_WeightSite], list[_GammaSite], str | None]:
    net = model._modules["net"]
    structure_part = next(p for p in guide if isinstance(p, AutoStructure))
    weight_part = next(p for p in guide if isinstance(p, AutoMeanFieldNormal))
    store = pyro.get_param_store()
    weight_sites = {name for name, _ in weight_part.prototype_trace.iter_stochastic_nodes()}
    expected = {net.site_name(name) for name in net.shapes}
    if weight_sites != expected:
        raise _Unsupported(f"the weight guide covers sites {sorted(weight_sites)}, not the "
                           f"network's weights {sorted(expected)}")
    weights = []
    for name in net.shapes:
        site = net.site_name(name)
        loc = f"{weight_part._pyro_name}.locs.{site}"
        scale = f"{weight_part._pyro_name}.scales.{site}"
        if loc not in store or scale not in store:
            raise _Unsupported(f"the parameters of weight site {site!r} are not in the store")
        if type(weight_part.scale_constraint) is not type(dist.constraints.softplus_positive):
            raise _Unsupported("the weight guide's scale constraint is not softplus_positive")
        weights.append(_WeightSite(name, loc, scale, net.groups.index(net.group_of[name])))
    gammas = []
    prototype = structure_part.prototype_trace
    names = {name for name, _ in prototype.iter_stochastic_nodes()}
    if names != set(net.mixed_ops):
        raise _Unsupported(f"the structure guide covers sites {sorted(names)}, not the mixed "
                           f"operations {sorted(net.mixed_ops)}")
    for site, (path, op) in net.mixed_ops.items():
        prior = structural_prior(site, op.labels, **net.structural_prior)[0]
        log_space = is_log_simplex(prior)
        kind = "concentrations" if isinstance(prior, dist.Dirichlet) else "logits"
        if log_space != is_log_simplex(prototype.nodes[site]["fn"]):
            raise _Unsupported(f"the prior of site {site!r} changed since the guide was built")
        param = f"{structure_part._pyro_name}.{kind}.{site}"
        if param not in store:
            raise _Unsupported(f"the guide's parameter {param!r} is not in the store")
        gammas.append(_GammaSite(site, f"{path}.gamma" if path else "gamma", param,
                                 structure_part, prior, log_space))
    if getattr(net, "_learned", None):  # the prior of gamma above is built once, fixed
        raise _Unsupported(f"the structural prior's {net._learned} are learnable parameters")
    scale_name = None
    if "prior_scale" in net._pyro_params:
        scale_name = net._pyro_get_fullname("prior_scale")
        if scale_name not in store:
            raise _Unsupported(f"the learnable prior scale {scale_name!r} is not in the store")
    return weights, gammas, scale_name


class _LocalReparamLinear(nn.Module):
    """``nn.Linear`` whose weight is Gaussian, sampled through its outputs (local reparam)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.register_buffer("weight_scale", torch.ones_like(linear.weight))
        self.register_buffer("bias_scale", None if linear.bias is None
                             else torch.ones_like(linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.weight, self.bias)
        var = F.linear(x * x, self.weight_scale * self.weight_scale,
                       None if self.bias_scale is None else self.bias_scale * self.bias_scale)
        # clamped: a bias-free layer on an all-zero row has var = 0, where sqrt' is infinite
        return mean + var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() * torch.randn_like(mean)


def _local_reparam_network(network: nn.Module, keys: list[str]) -> nn.Module | None:
    """A copy of ``network`` with every ``nn.Linear`` made local-reparameterised, or ``None``.

    ``None`` when some parameter is not owned by an ``nn.Linear`` or a Linear
    appears at two places (it would be sampled twice, independently).
    """
    counts: dict[int, int] = {}
    for _, module in network.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    owners = {name.rpartition(".")[0] for name in keys}
    for owner in owners:
        module = network.get_submodule(owner)
        if type(module) is not nn.Linear or counts[id(module)] > 1:
            return None
    copied = copy.deepcopy(network)
    for owner in owners:
        parent_path, _, attr = owner.rpartition(".")
        parent = copied.get_submodule(parent_path)
        parent._modules[attr] = _LocalReparamLinear(parent._modules[attr])
    return copied


class NetworkELBO(pyro.infer.ELBO):
    r"""The ELBO of a :class:`~pyro_structsel.NetworkModel` under the default guide, in torch.

    Same objective and the same parameters as :class:`~pyro_structsel.infer.svi.FactorisedELBO`
    (``TraceMeanField_ELBO``) on this model and guide, without Pyro's per-site
    tracing (see the module docstring for the formula). It has Pyro's ELBO
    interface, ``loss(model, guide, *args, **kwargs)`` and
    ``loss_and_grads(model, guide, *args, **kwargs)``, for the one
    ``(model, guide)`` pair it was built for; :func:`~pyro_structsel.infer.svi.fit`
    uses it automatically when it applies (``fast=False`` switches it off).

    Parameters
    ----------
    model : NetworkModel
        The model.
    guide : AutoGuideList
        The default guide (:func:`~pyro_structsel.default_guide`), already set up.
    num_particles : int
        Particles per estimate; the loss is their mean. Several particles run
        batched (``torch.func.vmap``) when ``vectorize_particles``.
    vectorize_particles : bool
        Batch the particles instead of looping over them.
    local_reparam : bool
        Sample the pre-activations of ``nn.Linear`` layers instead of their
        weights (lower variance, same expectation); ``ValueError`` if a
        parameter is not owned by an ``nn.Linear``.

    Raises
    ------
    ValueError
        If the pair is not covered (the message says why; use the stock ELBO).
    """

    def __init__(self, model: NetworkModel, guide: AutoGuideList, *, num_particles: int = 1,
                 vectorize_particles: bool = True, local_reparam: bool = False) -> None:
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) \
                or num_particles < 1:
            raise ValueError(f"Expected num_particles to be an int >= 1, got {num_particles!r}.")
        why = fast_path_support(model, guide)
        if why is not None:
            raise ValueError(f"NetworkELBO does not cover this model and guide: {why}; use "
                             "FactorisedELBO or Trace_ELBO instead.")
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.model = model
        self.guide = guide
        self.local_reparam = bool(local_reparam)
        self._net = model._modules["net"]
        self._network = self._net._modules["network"]
        self._weights, self._gammas, self._scale_name = _describe(model, guide)
        self._lrt_network = None
        if self.local_reparam:
            self._lrt_network = _local_reparam_network(self._network,
                                                       [w.key for w in self._weights])
            if self._lrt_network is None:
                raise ValueError("local_reparam=True needs every weight of the network to "
                                 "belong to an nn.Linear used once; pass local_reparam=False.")
        self._checked: tuple[Any, ...] | None = None
        self._sizes = [math.prod(self._net.shapes[w.key]) for w in self._weights]
        self._num_weights = sum(self._sizes)
        self._site_group = torch.tensor([w.group for w in self._weights], dtype=torch.long)
        self._read: dict[str, torch.Tensor] = {}
        first = pyro.get_param_store()[self._weights[0].loc].detach()
        self._like = {"device": first.device, "dtype": first.dtype}  # of the noise

    def _param(self, name: str) -> torch.Tensor:
        """The constrained value of a parameter, read from the store (no effect handlers)."""
        value = pyro.get_param_store()[name]
        self._read[name] = value.unconstrained()
        return value

    def parameters_read(self) -> dict[str, torch.Tensor]:
        """Name → unconstrained tensor of every parameter the last loss read.

        What ``poutine.trace(param_only=True)`` would capture around a stock
        ELBO: :func:`~pyro_structsel.infer.svi.fit` steps these tensors.
        """
        return dict(self._read)

    # -- Pyro's ELBO interface -------------------------------------------------------------
    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
             **kwargs: Any) -> float:
        """The −ELBO estimate (a float), without gradients."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> float:
        """The −ELBO estimate; its gradient is accumulated into the parameters' ``.grad``."""
        surrogate = self.differentiable_loss(model, guide, *args, **kwargs)
        surrogate.backward()
        return float(surrogate.detach())

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """The −ELBO estimate as a differentiable tensor (mean over the particles)."""
        if model is not self.model or guide is not self.guide:
            raise ValueError("This NetworkELBO was built for another model or guide; build one "
                             "for this pair (or use FactorisedELBO).")
        x, y, batch_size = self._data(*args, **kwargs)
        idx, scale = data_rows(x.shape[0], batch_size)
        noise = self.draw_noise()
        return self.loss_given(x, y, idx, noise, scale=scale)

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> Any:
        """Pyro's trace-based ELBO machinery does not apply: there are no traces here."""
        raise TypeError("NetworkELBO computes the ELBO without Pyro traces; use "
                        "pyro_structsel.infer.svi.FactorisedELBO for trace-based methods.")

    # -- the computation --------------------------------------------------------------------
    def draw_noise(self) -> torch.Tensor:
        r"""Standard normal :math:`\varepsilon` for all weights, flattened in site order.

        Shape ``(D,)``, or ``(num_particles, D)`` with several particles, where
        ``D`` is the number of weights; empty with local reparameterisation
        (the layers draw their own noise).
        """
        if self.local_reparam:
            return torch.zeros(0)
        lead = (self.num_particles,) if self.num_particles > 1 else ()
        return torch.randn(lead + (self._num_weights,), **self._like)

    def flat_noise(self, noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Flatten per-parameter noise (parameter path → tensor) as :meth:`draw_noise` does."""
        lead = (self.num_particles,) if self.num_particles > 1 else ()
        return torch.cat([noise[w.key].reshape(lead + (-1,)) for w in self._weights], -1)

    def loss_given(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None,
                   noise: torch.Tensor | Mapping[str, torch.Tensor],
                   gammas: Mapping[str, torch.Tensor] | None = None,
                   scale: float | None = None) -> torch.Tensor:
        r"""−ELBO with the minibatch ``idx`` and the weight noise given.

        ``noise`` is a tensor from :meth:`draw_noise` or a dict parameter path →
        :math:`\varepsilon` (see :meth:`flat_noise`). ``gammas`` (site → value of
        the structural site, log space for a log-space Concrete) replaces the
        draw of :math:`\gamma` from :math:`q` when given (the value must be a
        reparameterised sample to carry its gradient). ``scale`` multiplies the
        minibatch log-likelihood (default :math:`N / |B|`; see
        :func:`~pyro_structsel.data_rows`).
        """
        self._read.clear()
        scales = (self._param(self._scale_name) if self._scale_name is not None
                  else self._net._buffers["prior_scale"])
        particles = self.num_particles
        lead = (particles,) if particles > 1 else ()
        values: dict[str, torch.Tensor] = {}
        elbo = torch.zeros(lead, **self._like)
        # one flat vector for all weights: a handful of kernels instead of a few per tensor
        locs = [self._param(w.loc) for w in self._weights]
        sigmas = [self._param(w.scale) for w in self._weights]
        loc = torch.cat([t.reshape(-1) for t in locs])
        sigma = torch.cat([t.reshape(-1) for t in sigmas])
        # KL per site with its layer's scale h (sums over the flat vector, no per-weight h):
        # n log h - sum(log sigma) + sum(sigma^2 + mu^2) / (2 h^2) - n / 2
        h = scales[self._site_group]
        sizes = h.new_tensor(self._sizes)
        squares = torch.stack([part.sum() for part in
                               (sigma * sigma + loc * loc).split(self._sizes)])
        log_sigmas = torch.stack([part.sum() for part in sigma.log().split(self._sizes)])
        kl = (sizes * h.log() - log_sigmas + squares / (2 * h * h)).sum() \
            - 0.5 * self._num_weights
        shapes = self._net.shapes
        if self.local_reparam:
            for w, loc_w, sigma_w in zip(self._weights, locs, sigmas):
                owner, _, attr = w.key.rpartition(".")
                values[w.key] = loc_w
                values[f"{owner}.{attr}_scale"] = sigma_w
        else:
            eps = noise if torch.is_tensor(noise) else self.flat_noise(noise)
            flat = loc + sigma * eps
            for w, part in zip(self._weights, flat.split(self._sizes, -1)):
                values[w.key] = part.reshape(lead + shapes[w.key])
        for g in self._gammas:
            param = self._param(g.param)
            if g.log_space:
                temperature = torch.tensor(g.part.temperature
                                           or g.part._prior_temperature[g.name],
                                           dtype=param.dtype)
                q = ExpRelaxedCategorical(temperature, logits=param, validate_args=False)
            else:
                q = dist.Dirichlet(param, validate_args=False)
            value = gammas[g.name] if gammas is not None else q.rsample(lead)
            if g.log_space:  # no closed form: one-sample estimate, as TraceMeanField_ELBO
                elbo = elbo + g.prior.log_prob(value) - q.log_prob(value)
                value = value.exp()
            else:
                kl = kl + kl_divergence(q, g.prior).sum()
            values[g.key] = value
        xb = x if idx is None else x[idx]
        yb = y if idx is None else y[idx]
        network = self._lrt_network if self.local_reparam else self._network
        if particles > 1 and self.vectorize_particles:
            out = batched_call(network, values, xb)
        elif particles > 1:  # loop; with local reparameterisation only the gammas are batched
            batched = {g.key for g in self._gammas}
            if not self.local_reparam:
                batched.update(w.key for w in self._weights)
            out = torch.stack([functional_call(
                network, {k: v[i] if k in batched else v for k, v in values.items()}, (xb,))
                for i in range(particles)])
        else:
            out = functional_call(network, values, (xb,))
        if scale is None:
            scale = x.shape[0] / xb.shape[0]
        elbo = elbo + self._log_likelihood(out, yb) * scale - kl
        return -elbo.mean()

    def _log_likelihood(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over the minibatch of :math:`\\log p(y_i \\mid f(x_i))`, per particle."""
        lead = out.shape[:-2]
        if self.model.likelihood is Likelihood.CATEGORICAL:
            if not lead:
                return -F.cross_entropy(out, y, reduction="sum")
            logp = torch.log_softmax(out, -1).gather(
                -1, y.expand(lead + y.shape).unsqueeze(-1)).squeeze(-1)
            return logp.sum(-1)
        if out.shape[-1] == 1 and y.dim() == 1:
            out = out.squeeze(-1)
        sigma = self.model.noise_scale
        z = (y - out) / sigma
        logp = -0.5 * z * z - math.log(sigma) - _HALF_LOG_2PI
        return logp.reshape(lead + (-1,)).sum(-1)

    def _data(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
              batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        key = (id(x), id(y), batch_size, x.shape, None if y is None else y.shape)
        if key != self._checked:  # validate once per data set, as the model would each step
            self.model.check_data(x, y, batch_size)
            if y is None:
                raise ValueError("NetworkELBO needs observed targets y; pass y to fit.")
            self._checked = key
        return x, y, batch_size  # type: ignore[return-value]


def network_elbo(model: Any, guide: Any, *, num_particles: int = 1,
                 vectorize_particles: bool = True, local_reparam: bool = False
                 ) -> NetworkELBO | None:
    """A :class:`NetworkELBO` for ``(model, guide)``, or ``None`` where it does not apply."""
    if fast_path_support(model, guide) is not None:
        return None
    return NetworkELBO(model, guide, num_particles=num_particles,
                       vectorize_particles=vectorize_particles, local_reparam=local_reparam)


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
