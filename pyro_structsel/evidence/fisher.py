r"""Fisher information of a likelihood in its distribution's parameters.

The generalised Gauss–Newton matrix of a model (:mod:`~pyro_structsel.evidence.curvature`)
is :math:`\sum_n J_n^\top F_n J_n`, with :math:`J_n` the Jacobian of the
parameters :math:`\theta_n` of the distribution of observation :math:`n` in the
latents and :math:`F_n = \mathbb E_{y \sim p(\cdot \mid \theta_n)}
[\nabla_\theta \log p(y \mid \theta_n) \nabla_\theta \log p(y \mid \theta_n)^\top]`
its Fisher information. This module gives, for an observed Pyro site, the
parameters that depend on the latents, stacked per observation
(:math:`\theta` of shape ``(M, P)``), and a square root
:math:`L_n` (``(M, P, R)``, :math:`L_n L_n^\top = F_n`) scaled by the site's
``scale`` and ``mask``.

Closed forms (in the parameters as the distribution stores them):

=================  ==================  ===============================================
family             parameters          Fisher
=================  ==================  ===============================================
Normal, LogNormal  loc, scale          :math:`1/\sigma^2`, :math:`2/\sigma^2`
StudentT (ν fixed) loc, scale          :math:`\frac{\nu+1}{(\nu+3)\sigma^2}`, :math:`\frac{2\nu}{(\nu+3)\sigma^2}`
Laplace            loc, scale          :math:`1/b^2`, :math:`1/b^2`
Cauchy             loc, scale          :math:`1/(2\sigma^2)`, :math:`1/(2\sigma^2)`
Bernoulli          logits              :math:`p(1-p)`
Binomial (n fixed) logits              :math:`n\,p(1-p)`
Categorical        logits              :math:`\operatorname{diag}(p) - p p^\top`
Poisson            rate                :math:`1/\lambda`
Exponential        rate                :math:`1/\lambda^2`
Gamma              concentration, rate :math:`\begin{pmatrix}\psi'(\alpha) & -1/\beta\\ -1/\beta & \alpha/\beta^2\end{pmatrix}`
=================  ==================  ===============================================

Any other distribution that can be sampled gets a Monte Carlo Fisher,
:math:`\hat F_n = \frac1S \sum_s g_s g_s^\top` with
:math:`g_s = \nabla_\theta \log p(\tilde y_s \mid \theta_n)`,
:math:`\tilde y_s \sim p(\cdot \mid \theta_n)` (the "sampled targets" of
Martens 2014), so :math:`L_n = [g_1 \dots g_S]/\sqrt S`.

References
----------
J. Martens. New insights and perspectives on the natural gradient method. JMLR, 2020.
A. Immer et al. Scalable marginal likelihood estimation for model selection
in deep learning. ICML 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import Unit

__all__ = ["FisherError", "ObservedSite", "observed_site", "site_weights"]


class FisherError(ValueError):
    """The Fisher information of an observed site's distribution cannot be formed."""


def unwrap(fn: Any) -> Any:
    """The base distribution under ``Independent`` / ``Masked`` / ``Expanded`` wrappers."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _wrapper_mask(fn: Any) -> torch.Tensor | None:
    mask = None
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        if isinstance(fn, dist.MaskedDistribution):
            mask = fn._mask if mask is None else mask & fn._mask
        fn = fn.base_dist
    return mask


@dataclass
class ObservedSite:
    """One observed site's free distribution parameters and their Fisher square root.

    Attributes
    ----------
    name : str
        The Pyro site.
    params : list of str
        Names of the distribution parameters that depend on the latents.
    theta : Tensor of shape (M, P)
        Those parameters, one row per observation (element of the base
        distribution's batch), stacked along the last dimension.
    sqrt_fisher : Tensor of shape (M, P, R)
        :math:`L_n` with :math:`L_n L_n^\top = w_n F_n`, ``w`` the site's
        scale times its mask (detached).
    """

    name: str
    params: list[str]
    theta: torch.Tensor
    sqrt_fisher: torch.Tensor
    shift_invariant: bool = False  #: Categorical logits: a shift per row changes nothing
    log_natural: bool = False  #: the natural parameter is log(theta) (Poisson)


# ----------------------------------------------------------------------------- closed forms

def _requires_grad(tensor: Any) -> bool:
    return torch.is_tensor(tensor) and tensor.requires_grad


def _free(base: Any, names: list[str], depends: Callable[[torch.Tensor], bool]) -> list[str]:
    return [n for n in names if torch.is_tensor(getattr(base, n)) and depends(getattr(base, n))]


def _diag(*entries: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(torch.stack(entries, -1))


def _location_scale(loc_info: Callable[[Any], torch.Tensor],
                    scale_info: Callable[[Any], torch.Tensor]
                    ) -> Callable[[Any, list[str]], torch.Tensor]:
    """Square root of a diagonal Fisher in (loc, scale) with the given informations."""
    def sqrt(base: Any, free: list[str]) -> torch.Tensor:
        info = {"loc": loc_info(base), "scale": scale_info(base)}
        return _diag(*[info[n].sqrt() for n in free])
    return sqrt


def _bernoulli(base: Any, free: list[str]) -> torch.Tensor:
    p = torch.sigmoid(base.logits)
    return (p * (1 - p)).sqrt()[..., None, None]


def _binomial(base: Any, free: list[str]) -> torch.Tensor:
    p = torch.sigmoid(base.logits)
    return (base.total_count * p * (1 - p)).sqrt()[..., None, None]


def _categorical(base: Any, free: list[str]) -> torch.Tensor:
    p = torch.softmax(base.logits, -1)
    # (diag(√p) − p √pᵀ)(diag(√p) − √p pᵀ) = diag(p) − p pᵀ since Σ p = 1
    return torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)


def _poisson(base: Any, free: list[str]) -> torch.Tensor:
    return base.rate.clamp(min=torch.finfo(base.rate.dtype).tiny).rsqrt()[..., None, None]


def _exponential(base: Any, free: list[str]) -> torch.Tensor:
    return (1 / base.rate)[..., None, None]


def _gamma(base: Any, free: list[str]) -> torch.Tensor:
    a, b = base.concentration, base.rate
    full = torch.stack([torch.stack([torch.polygamma(1, a), -1 / b], -1),
                        torch.stack([-1 / b, a / b**2], -1)], -2)
    index = [["concentration", "rate"].index(n) for n in free]
    sub = full[..., index, :][..., :, index]
    return torch.linalg.cholesky(sub)


#: type → (parameter names in order, parameters that must be constant, sqrt-Fisher builder)
_CLOSED_FORMS: list[tuple[type, list[str], list[str], Callable[[Any, list[str]], torch.Tensor]]] = [
    (dist.Normal, ["loc", "scale"], [], _location_scale(
        lambda d: d.scale ** -2, lambda d: 2 * d.scale ** -2)),
    (dist.LogNormal, ["loc", "scale"], [], _location_scale(
        lambda d: d.scale ** -2, lambda d: 2 * d.scale ** -2)),
    (dist.StudentT, ["loc", "scale"], ["df"], _location_scale(
        lambda d: (d.df + 1) / ((d.df + 3) * d.scale ** 2),
        lambda d: 2 * d.df / ((d.df + 3) * d.scale ** 2))),
    (dist.Laplace, ["loc", "scale"], [], _location_scale(
        lambda d: d.scale ** -2, lambda d: d.scale ** -2)),
    (dist.Cauchy, ["loc", "scale"], [], _location_scale(
        lambda d: 0.5 * d.scale ** -2, lambda d: 0.5 * d.scale ** -2)),
    (dist.Bernoulli, ["logits"], [], _bernoulli),
    (dist.Binomial, ["logits"], ["total_count"], _binomial),
    (dist.Categorical, ["logits"], [], _categorical),
    (dist.Poisson, ["rate"], [], _poisson),
    (dist.Exponential, ["rate"], [], _exponential),
    (dist.Gamma, ["concentration", "rate"], [], _gamma),
]

def _param_rows(base: Any, name: str, batch: torch.Size) -> torch.Tensor:
    """Parameter ``name`` of ``base`` expanded to ``batch`` and flattened to ``(M, size)``."""
    param = getattr(base, name)
    event = param.shape[len(base.batch_shape):]
    return param.expand(batch + event).reshape(batch.numel(), -1)


def _closed_form(base: Any, depends: Callable[[torch.Tensor], bool]
                 ) -> tuple[list[str], Callable[[Any, list[str]], torch.Tensor]] | None:
    for kind, names, constant, sqrt in _CLOSED_FORMS:
        if type(base) is kind or (kind is dist.Categorical and isinstance(base, dist.Categorical)
                                  and not isinstance(base, dist.OneHotCategorical)):
            if any(torch.is_tensor(getattr(base, c)) and depends(getattr(base, c))
                   for c in constant):
                return None  # e.g. a latent StudentT df: Monte Carlo
            return names, sqrt
    return None


# ----------------------------------------------------------------------------- Monte Carlo

def _monte_carlo(name: str, base: Any, num_samples: int, batch: torch.Size,
                 depends: Callable[[torch.Tensor], bool]) -> tuple[list[str], torch.Tensor]:
    """Free parameters and the sampled-target Fisher square root of ``base``."""
    names = [n for n in base.arg_constraints if n in base.__dict__
             and torch.is_tensor(base.__dict__[n]) and depends(base.__dict__[n])]
    if not names:
        return [], torch.zeros(0)
    if not hasattr(base, "sample") or isinstance(base, Unit):
        raise FisherError(f"observed site {name!r}: {type(base).__name__} cannot be sampled")
    leaves = {n: base.__dict__[n].detach().expand(
        batch + base.__dict__[n].shape[len(base.batch_shape):]).clone().requires_grad_()
        for n in names}
    kept = {n: base.__dict__[n] for n in base.arg_constraints
            if n in base.__dict__ and n not in names and torch.is_tensor(base.__dict__[n])}
    try:
        rebuilt = type(base)(**kept, **leaves, validate_args=False)
    except Exception as error:  # noqa: BLE001 -- any failure: no Fisher
        raise FisherError(f"observed site {name!r}: could not rebuild {type(base).__name__} "
                          f"from its parameters {sorted(names)} ({error})") from error
    with torch.no_grad():
        targets = rebuilt.sample((num_samples,))
    columns = []
    with torch.enable_grad():
        for s in range(num_samples):
            grads = torch.autograd.grad(rebuilt.log_prob(targets[s]).sum(), list(leaves.values()))
            columns.append(torch.cat([g.reshape(batch.numel(), -1) for g in grads], -1))
    return names, torch.stack(columns, -1) / math.sqrt(num_samples)


# ----------------------------------------------------------------------------- the site

def site_weights(site: Mapping[str, Any], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Scale times mask of a trace site, broadcast to ``shape`` (the base batch shape)."""
    weight = torch.ones(shape, dtype=dtype) * torch.as_tensor(site["scale"], dtype=dtype)
    for mask in (site["mask"], _wrapper_mask(site["fn"])):
        if mask is not None and not (isinstance(mask, bool) and mask):
            weight = weight * torch.as_tensor(mask).to(dtype).expand(shape)
    return weight


def observed_site(name: str, site: Mapping[str, Any], *, num_samples: int = 64,
                  differentiable: bool = False,
                  depends: Callable[[torch.Tensor], bool] = _requires_grad
                  ) -> ObservedSite | None:
    """The free parameters and Fisher square root of the observed trace site ``name``.

    Returns ``None`` when no parameter of its distribution depends on the
    latents (the site adds a constant to the log joint and no curvature).
    ``depends(tensor)`` says whether a parameter depends on the latents
    (default: whether it requires grad). ``differentiable`` keeps the square
    root's graph to the distribution's parameters (for hyperparameters of the
    likelihood, in empirical Bayes).

    Raises
    ------
    FisherError
        When the distribution has neither a closed-form Fisher nor samples
        (e.g. ``pyro.factor``), naming the site.
    """
    fn = site["fn"]
    base = unwrap(fn)
    if isinstance(base, Unit):
        log_factor = getattr(base, "log_factor", None)
        if torch.is_tensor(log_factor) and log_factor.requires_grad:
            raise FisherError(
                f"observed site {name!r} is a pyro.factor (a log density with no "
                "distribution), so its Fisher information cannot be formed; write the "
                "likelihood as a distribution, or use curvature='hessian'.")
        return None
    if isinstance(base, dist.Delta):
        if base.v.requires_grad:
            raise FisherError(f"observed site {name!r} has a Delta distribution that depends "
                              "on the latents, which has no Fisher information.")
        return None
    event_shape = base.event_shape
    value = site["value"]
    batch = value.shape[: value.dim() - len(event_shape)]
    closed = _closed_form(base, depends)
    if closed is not None:
        names, builder = closed
        free = _free(base, names, depends)
        if not free:
            return None
        theta = torch.cat([_param_rows(base, n, batch) for n in free], -1)
        with torch.set_grad_enabled(differentiable):
            sqrt = builder(base, free)
        sqrt = sqrt.expand(batch + sqrt.shape[-2:]).reshape(batch.numel(), *sqrt.shape[-2:])
    else:
        try:
            free, sqrt = _monte_carlo(name, base, num_samples, batch, depends)
        except FisherError:
            raise
        except Exception as error:  # noqa: BLE001 -- e.g. a distribution without sample()
            raise FisherError(f"observed site {name!r}: no closed-form Fisher for "
                              f"{type(base).__name__} and no Monte Carlo one ({error}).") from error
        if not free:
            return None
        theta = torch.cat([_param_rows(base, n, batch) for n in free], -1)
    weight = site_weights(site, batch, sqrt.dtype).reshape(-1)
    shift_invariant = isinstance(base, dist.Categorical) and free == ["logits"]
    log_natural = type(base) is dist.Poisson
    sqrt = sqrt if differentiable else sqrt.detach()
    return ObservedSite(name, free, theta, sqrt * weight.sqrt()[:, None, None],
                        shift_invariant, log_natural)


def observed_theta(site: Mapping[str, Any], params: list[str]) -> torch.Tensor:
    """The parameters ``params`` of an observed site, stacked per observation ``(M, P)``.

    The same layout as :attr:`ObservedSite.theta`, recomputed from a fresh
    trace (for Jacobian passes).
    """
    base = unwrap(site["fn"])
    value = site["value"]
    batch = value.shape[: value.dim() - len(base.event_shape)]
    return torch.cat([_param_rows(base, n, batch) for n in params], -1)
