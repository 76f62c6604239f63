r"""Variational families: :math:`q(w, \Gamma) = q(w)\,\prod_{j,k} q(\gamma^{j,k})`.

:class:`AutoStructure` is an autoguide for the structural sites in the
family of their prior: Dirichlet with learnable concentration; Concrete
(log space, or on the simplex) with learnable logits and a temperature that
may be annealed. :func:`default_guide` combines it with an autoguide for the
remaining latents (the weights), :class:`~pyro.infer.autoguide.AutoNormal` by
default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from operator import attrgetter
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide, AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_value
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from ..model.sites import (
    ExpRelaxedCategorical,
    StructuralSite,
    base_distribution,
    is_log_simplex,
    structural_sites,
)
from ..util.sampling import trace_model


class AutoStructure(AutoGuide):
    r"""Autoguide for structural sites, in the family of each site's prior.

    - Dirichlet prior: :math:`q(\gamma) = \mathrm{Dir}(\beta)`, learnable :math:`\beta > 0`.
    - Concrete prior (``ExpRelaxedCategorical``, log space, or
      ``RelaxedOneHotCategorical``): :math:`q = \mathrm{Concrete}(T, \ell)`
      with learnable logits :math:`\ell` and temperature :attr:`temperature`.

    Parameters
    ----------
    model : callable
        A model whose latent sites are all structural (block the others, as
        :func:`default_guide` does).
    init_concentration : float
        Initial :math:`\beta` of Dirichlet guides.
    temperature : float, optional
        Temperature of Concrete guides; default: the prior's. Set the
        attribute between steps to anneal it.
    """

    def __init__(self, model: Callable[..., Any], *, init_concentration: float = 5.0,
                 temperature: float | None = None,
                 create_plates: Callable[..., Any] | None = None) -> None:
        if not init_concentration > 0:
            raise ValueError(f"Expected init_concentration > 0 but got {init_concentration}.")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"Expected temperature > 0 but got {temperature}.")
        self.init_concentration = float(init_concentration)
        self.temperature = temperature
        super().__init__(model, create_plates=create_plates)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        sites = structural_sites(self.prototype_trace)
        others = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()
                  if name not in sites]
        if others:
            raise ValueError(f"AutoStructure guides structural sites only, but the model has "
                             f"other latent sites {others}; block them (poutine.block).")
        self.concentrations = PyroModule()
        self.logits = PyroModule()
        self._prior_temperature: dict[str, float] = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(f"Structural site {name!r} sits in the subsampled plate "
                                     f"{frame.name!r}; structural sites must be global.")
            shape = site["value"].shape
            base = base_distribution(site["fn"])
            if isinstance(base, dist.Dirichlet) or not hasattr(base, "temperature"):
                init = torch.full(shape, self.init_concentration, dtype=site["value"].dtype)
                deep_setattr(self.concentrations, name,
                             PyroParam(init, constraints.positive, event_dim=1))
            else:
                init = torch.zeros(shape, dtype=base.logits.dtype)
                deep_setattr(self.logits, name, PyroParam(init, constraints.real, event_dim=1))
                self._prior_temperature[name] = float(base.temperature.detach())

    def posterior(self, name: str) -> dist.TorchDistribution:
        r""":math:`q(\gamma)` of site ``name`` as a distribution over the site's value."""
        site = self.prototype_trace.nodes[name]
        if name not in self._prior_temperature:
            return dist.Dirichlet(attrgetter(name)(self.concentrations))
        logits = attrgetter(name)(self.logits)
        # as_tensor: a traced step passes the temperature in as a tensor (infer/traced.py)
        temperature = torch.as_tensor(self.temperature if self.temperature is not None
                                      else self._prior_temperature[name], dtype=logits.dtype)
        if is_log_simplex(site["fn"]):
            return ExpRelaxedCategorical(temperature, logits=logits)
        return dist.RelaxedOneHotCategorical(temperature, logits=logits)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return _sample_each_site(self, self.posterior, args, kwargs)

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        r"""Posterior mean of :math:`\gamma` (log mean for log-space sites) by site."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        out = {}
        for name, _ in self.prototype_trace.iter_stochastic_nodes():
            fn = self.posterior(name)
            if isinstance(fn, dist.Dirichlet):
                out[name] = fn.mean
            else:
                probs = torch.softmax(fn.logits, -1)
                out[name] = probs.log() if isinstance(fn, ExpRelaxedCategorical) else probs
        return out


class AutoMeanFieldNormal(AutoNormal):
    r"""``AutoNormal`` whose real-valued sites are plain ``Normal`` sample sites.

    Pyro's ``AutoNormal`` samples every site as an auxiliary ``Normal`` plus a
    ``Delta``, which hides the Gaussian from ``TraceMeanField_ELBO``: it then
    falls back to Monte Carlo for :math:`\mathrm{KL}(q \| p)`. Sampling
    real-valued sites directly from :math:`\mathcal N(\mu, \sigma^2)` (same
    parameters, same distribution) lets the KL to a Gaussian prior be
    computed in closed form: lower-variance gradients, and an exactly zero
    gradient for weights that do not touch the likelihood (the candidates a
    fixed structure leaves out) once :math:`q = p`. If any site has
    constrained support, all are sampled as by ``AutoNormal``.

    ``init_scales`` (site → tensor of the site's unconstrained shape) starts
    those sites' scales where given, e.g. at another fit's (a warm start);
    the others start at ``init_scale``.
    """

    def __init__(self, model: Callable[..., Any], *,
                 init_scales: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        self._init_scales = dict(init_scales or {})
        super().__init__(model, **kwargs)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            scale = self._init_scales.get(name)
            if scale is None:
                continue
            current = attrgetter(name)(self.scales)
            if tuple(scale.shape) != tuple(current.shape):
                raise ValueError(f"Expected the initial scale of site {name!r} to have shape "
                                 f"{tuple(current.shape)}, but got {tuple(scale.shape)}.")
            deep_setattr(self.scales, name, PyroParam(
                scale.detach().clone().to(current.dtype), self.scale_constraint,
                self._event_dims[name]))

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if not all(_is_real(site["fn"].support)
                   for _, site in self.prototype_trace.iter_stochastic_nodes()):
            return super().forward(*args, **kwargs)  # constrained sites: AutoNormal's way
        return _sample_each_site(self, self.posterior, args, kwargs)

    def posterior(self, name: str) -> dist.TorchDistribution:
        r""":math:`q` of site ``name``: :math:`\mathcal N(\mu, \sigma^2)`, independent."""
        loc, scale = self._get_loc_and_scale(name)
        return dist.Normal(loc, scale).to_event(self._event_dims[name])


def _sample_each_site(guide: AutoGuide, posterior: Callable[[str], Any], args: tuple,
                      kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Sample every site of the guide's prototype from ``posterior(name)``, inside its plates."""
    plates = guide._create_plates(*args, **kwargs)
    result = {}
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        with ExitStack() as stack:
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    stack.enter_context(plates[frame.name])
            result[name] = pyro.sample(name, posterior(name))
    return result


def _is_real(support: Any) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def is_factorised(guide: Any) -> bool:
    """Whether ``guide`` is built of fully factorised parts (every site independent)."""
    if isinstance(guide, AutoGuideList):
        return all(is_factorised(part) for part in guide)
    return isinstance(guide, (AutoStructure, AutoNormal))


def default_guide(model: Callable[..., Any], structural: Iterable[str], *,
                  weight_guide: type[AutoGuide] | Callable[[Callable[..., Any]], AutoGuide]
                  | None = None,
                  has_weights: bool = True,
                  init_values: Mapping[str, torch.Tensor] | None = None,
                  init_scale: float = 0.05, init_concentration: float = 5.0,
                  temperature: float | None = None,
                  init_scales: Mapping[str, torch.Tensor] | None = None) -> AutoGuideList:
    """The default guide: :class:`AutoStructure` for Γ and an autoguide for the rest.

    Parameters
    ----------
    model : callable
        The model.
    structural : iterable of str
        Its structural site names.
    weight_guide : AutoGuide class or factory, optional
        Autoguide for the non-structural latents (default
        :class:`AutoMeanFieldNormal`); a
        class is built with ``init_loc_fn``, a factory is called with the
        blocked model.
    has_weights : bool
        Whether the model has non-structural latents at all.
    init_values : dict, optional
        Initial values of weight sites (e.g. the network's own initialisation).
    init_scale : float
        Initial posterior scale of ``AutoNormal``.
    init_scales : dict, optional
        Initial posterior scales by site, over ``init_scale`` (the default
        weight guide only).
    """
    structural = list(structural)
    guide = AutoGuideList(model)
    if structural:
        guide.append(AutoStructure(poutine.block(model, expose=structural),
                                   init_concentration=init_concentration,
                                   temperature=temperature))
    if not has_weights:
        return guide
    blocked = poutine.block(model, hide=structural)
    init_loc_fn = (init_to_value(values=dict(init_values), fallback=init_to_feasible)
                   if init_values else init_to_feasible)
    if weight_guide is None:
        guide.append(AutoMeanFieldNormal(blocked, init_loc_fn=init_loc_fn,
                                         init_scale=init_scale, init_scales=init_scales))
    elif isinstance(weight_guide, type) and issubclass(weight_guide, AutoGuide):
        guide.append(weight_guide(blocked, init_loc_fn=init_loc_fn))
    elif callable(weight_guide):
        part = weight_guide(blocked)
        if not isinstance(part, AutoGuide):
            raise ValueError("Expected weight_guide to return an AutoGuide, but got "
                             f"{type(part).__name__}.")
        guide.append(part)
    else:
        raise ValueError(f"Expected weight_guide to be an AutoGuide class or factory, but got "
                         f"{weight_guide!r}.")
    return guide


def structure_guides(guide: Any) -> list[AutoStructure]:
    """The :class:`AutoStructure` parts of ``guide`` (itself, or inside an AutoGuideList)."""
    if isinstance(guide, AutoStructure):
        return [guide]
    if isinstance(guide, AutoGuideList):
        return [g for part in guide for g in structure_guides(part)]
    return []




def prior_draw_values(trace: Any, names: Iterable[str]) -> dict[str, torch.Tensor]:
    r"""Starting weight means for a model with no initialisation of its own: prior draws.

    A weight mean that starts at zero starts every hidden unit alike and
    every activation in its linear range (near 0, tanh and identity agree),
    which biases a relaxed fit towards linear structures. A draw from the
    prior breaks both; for a matrix (two or more dimensions) it is shrunk,
    where the prior is wider, to Glorot's variance
    :math:`2 / (\mathrm{fan_{in}} + \mathrm{fan_{out}})` (the two
    trailing dimensions, in either order: the scale is symmetric in them), so
    the first pre-activations are of order one, as a network's own
    initialisation makes them. Vectors (biases) and scalars start at zero
    when their prior is centred there, else at the prior mean. Sites whose
    value is not real (constrained support) are left to the guide's default.

    Parameters
    ----------
    trace : pyro.poutine.Trace
        A trace of the model (its values are the prior draws).
    names : iterable of str
        The sites to start.

    References
    ----------
    X. Glorot, Y. Bengio. Understanding the difficulty of training deep
    feedforward neural networks. AISTATS 2010.
    """
    values = {}
    for name in names:
        site = trace.nodes[name]
        fn = site["fn"]
        if not _is_real(fn.support):
            continue
        value = site["value"].detach()
        try:
            mean, std = fn.mean.detach(), fn.stddev.detach()
        except (NotImplementedError, AttributeError):
            continue
        mean, std = mean.expand(value.shape), std.expand(value.shape)
        if value.dim() < 2:
            values[name] = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
            continue
        glorot = math.sqrt(2.0 / (value.shape[-1] + value.shape[-2]))
        shrink = torch.clamp(glorot / std, max=1.0)
        values[name] = mean + shrink * (value - mean)
    return values


def build_guide(model: Callable[..., Any], guide: Any, sites: Mapping[str, StructuralSite],
                args: tuple, kwargs: Mapping[str, Any], temperature: float | None, *,
                init_values: Mapping[str, torch.Tensor] | None = None,
                init_scales: Mapping[str, torch.Tensor] | None = None) -> Callable[..., Any]:
    """The guide a fit uses: ``guide`` as given, or :func:`default_guide` built for ``model``.

    ``guide`` may be ``None`` (the default guide), an AutoGuide class (for the
    weights) or any callable (used as is). The weight means start at
    ``init_values`` (by site; a warm start, with the default weight guide's
    scales at ``init_scales``), else at the model's own
    ``initial_values()`` (a :class:`~pyro_structsel.NetworkModel`: the
    network's initialisation), else at a draw from the prior (see
    :func:`prior_draw_values`).
    """
    if guide is not None and not (isinstance(guide, type) and issubclass(guide, AutoGuide)):
        if not callable(guide):
            raise ValueError(f"Expected guide to be a callable, an AutoGuide class or None, but "
                             f"got {guide!r}.")
        return guide
    trace = trace_model(model, args, kwargs)
    weights = [name for name in trace.stochastic_nodes if name not in sites]
    start = dict(model.initial_values() if hasattr(model, "initial_values") else
                 prior_draw_values(trace, weights))
    start.update(init_values or {})
    # copies: the guide's parameters may share memory with the values they start from, and
    # the optimiser updates them in place
    start = {name: value.detach().clone() for name, value in start.items()}
    return default_guide(model, sites, weight_guide=guide, has_weights=bool(weights),
                         init_values=start, temperature=temperature, init_scales=init_scales)
