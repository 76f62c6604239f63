r"""Empirical Bayes: a model's hyperparameters by its own Laplace evidence.

The second level of inference (MacKay 1992): the hyperparameters :math:`h`
of one model (a structure) are chosen by its evidence,
:math:`h^* = \arg\max_h p(D \mid h)`, with the Laplace approximation

.. math::

    \log p(D \mid h) \approx \log p(D \mid u^*, h) + \log p(u^* \mid h)
    + \tfrac d2 \log 2\pi - \tfrac12 \log\det\bigl(c(h)\,\mathrm{GGN}(u^*)
    - \nabla^2_u \log p(u^* \mid h)\bigr).

:math:`h` is any of the model's ``pyro.param`` s (a prior precision, a
noise scale) and, with ``prior_scales``, a factor on the scale of every
latent site with a Gaussian prior of fixed scale (:class:`PriorScaleMessenger`,
one per site: per-layer prior scales of a network).

It alternates, as MacKay's fixed point does (and as Immer et al. 2021 do
with gradients): find the mode :math:`u^*` at the current :math:`h`, then
maximise the evidence above over :math:`h` with :math:`u^*` and the GGN held
(by L-BFGS on the unconstrained :math:`h`; the prior Hessian, the
log-likelihood and the Fisher's scale :math:`c(h)` are differentiated
exactly), until :math:`h` moves less than ``tol``. A step whose re-found
mode gives a lower evidence is halved (up to three times), so the evidence
never decreases from round to round. For a prior hyperparameter the fixed
point is exactly MacKay's (:math:`\alpha = \gamma / \|w^*\|^2` for a
Gaussian prior of precision :math:`\alpha`, :math:`\gamma` the effective
number of parameters); a likelihood hyperparameter enters the GGN through a
common factor :math:`c(h)` of its Fisher information (exact for a Normal,
Student-t, Laplace or Cauchy scale; the GGN is re-computed each round).

References
----------
D. MacKay. Bayesian interpolation. Neural Computation, 1992.
A. Immer, M. Bauer, V. Fortuin, G. Rätsch, M. E. Khan. Scalable marginal
likelihood estimation for model selection in deep learning. ICML 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.params import user_param_name
from pyro.poutine.messenger import Messenger
from torch.distributions import transform_to

from ..util.options import parse_option
from .curvature import Curvature, HessianStructure, LogJoint, Precision
from .estimate import Estimate
from .fisher import unwrap
from .laplace import laplace_at, start_point

__all__ = ["PriorScaleMessenger", "empirical_bayes", "gaussian_prior_sites"]

#: Name of the prior-scale hyperparameter of latent site ``s``.
PRIOR_SCALE = "{}.prior_scale"


class PriorScaleMessenger(Messenger):
    """Multiplies the scale of the Gaussian prior of named latent sites by a factor each."""

    def __init__(self, factors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.factors = dict(factors)

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        factor = self.factors.get(msg["name"])
        if factor is not None and not msg["is_observed"]:
            msg["fn"] = _rescaled(msg["fn"], factor, msg["name"])


def _rescaled(fn: Any, factor: torch.Tensor, name: str) -> Any:
    if isinstance(fn, dist.Independent):
        return _rescaled(fn.base_dist, factor, name).to_event(fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return _rescaled(fn.base_dist, factor, name).expand(fn.batch_shape)
    if type(fn) in (dist.Normal, dist.LogNormal):
        return type(fn)(fn.loc, fn.scale * factor)
    raise ValueError(f"Latent site {name!r} has a {type(fn).__name__} prior; prior scales are "
                     "for Gaussian (Normal) priors.")


def gaussian_prior_sites(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
                         ) -> list[str]:
    """Latent sites with a Normal prior whose scale is a constant (not a latent, not a param)."""
    log_joint = LogJoint(model, args, kwargs)
    out = []
    for site in log_joint.sites:
        base = unwrap(log_joint.prototype.nodes[site.name]["fn"])
        if type(base) in (dist.Normal, dist.LogNormal) and not base.scale.requires_grad:
            out.append(site.name)
    return out


class _Hyperparameters:
    """The unconstrained vector of hyperparameters and the model they make."""

    def __init__(self, model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
                 names: Sequence[str], prior_scales: Sequence[str]) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        store = pyro.get_param_store()
        constraints = store.get_state()["constraints"]
        self.params = list(names)
        self.scales = list(prior_scales)
        self.transforms = [transform_to(constraints[n]) for n in self.params]
        values = [self.transforms[i].inv(store[n].detach()).reshape(-1)
                  for i, n in enumerate(self.params)]
        self.shapes = [store[n].shape for n in self.params]
        dtype = store[self.params[0]].dtype if self.params else torch.get_default_dtype()
        self.initial = torch.cat(values + [torch.zeros(len(self.scales), dtype=dtype)])

    def values(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained values by name (``"<site>.prior_scale"`` for the scale factors)."""
        out, start = {}, 0
        for name, shape, transform in zip(self.params, self.shapes, self.transforms):
            size = int(torch.Size(shape).numel())
            out[name] = transform(vector[start:start + size].reshape(shape))
            start += size
        for name in self.scales:
            out[PRIOR_SCALE.format(name)] = vector[start].exp()
            start += 1
        return out

    def model_at(self, vector: torch.Tensor) -> Callable[..., Any]:
        values = self.values(vector)
        model = poutine.substitute(self.model, data={user_param_name(n): values[n]
                                                      for n in self.params})
        if self.scales:
            model = PriorScaleMessenger({n: values[PRIOR_SCALE.format(n)]
                                         for n in self.scales})(model)
        return model

    def report(self, vector: torch.Tensor) -> dict[str, Any]:
        return {name: float(v) if v.numel() == 1 else v.detach().clone()
                for name, v in self.values(vector.detach()).items()}


def _fisher_roots(log_joint: LogJoint, mode: torch.Tensor, differentiable: bool
                  ) -> list[torch.Tensor]:
    """Square roots of the Fisher of every observed site at ``mode`` (graph to the params)."""
    return [obs.sqrt_fisher for obs in log_joint.observations(mode,
                                                               differentiable=differentiable)]


def _fisher_factor(roots: list[torch.Tensor], base: list[torch.Tensor]) -> torch.Tensor:
    r""":math:`c` with :math:`L(h) \approx \sqrt c\, L(h_0)`, least squares over every entry."""
    if not roots:
        return torch.ones((), dtype=torch.float64)
    num = sum((r.double().square() * b.double().square()).sum() for r, b in zip(roots, base))
    den = sum(b.double().pow(4).sum() for b in base)
    return num / den if float(den) > 0 else torch.ones((), dtype=torch.float64)


def _scaled(posterior: Precision, factor: torch.Tensor, prior: torch.Tensor) -> Precision:
    """The precision with its GGN times ``factor`` and the prior replaced."""
    scaled = Precision(posterior.structure, posterior.ggn * factor, prior, [])
    for block in posterior.blocks:
        size = block.eig_a.numel() * block.eig_g.numel()
        scaled.blocks.append(type(block)(**{**block.__dict__, "eig_g": block.eig_g * factor,
                                            "delta": prior[block.start:block.start + size].mean()}))
    return scaled


def empirical_bayes(model: Callable[..., Any], guide: Any = None, *args: Any,
                    hyperparameters: Sequence[str] | None = None, prior_scales: bool = False,
                    hessian_structure: str = "auto", max_rounds: int = 10, tol: float = 1e-3,
                    seed: int | None = 0, init_scale: float = 0.1, max_iter: int = 1000,
                    **kwargs: Any) -> Estimate:
    r"""Laplace evidence at the hyperparameters that maximise it (see the module documentation).

    Parameters
    ----------
    model : callable
        A Pyro model (one structure: fix structural sites first). Its
        ``pyro.param`` s are read from Pyro's param store, where the optimum is
        **not** written back.
    guide : AutoGuide or dict, optional
        Starts the first search for the mode (as in :func:`~pyro_structsel.laplace`).
    hyperparameters : list of str, optional
        The model's parameters to optimise (param-store names); default all
        that the model reads.
    prior_scales : bool
        Also optimise one factor on the prior scale of every latent site with a
        Gaussian prior of fixed scale (reported as ``"<site>.prior_scale"``).
    hessian_structure : {"auto", "full", "diag", "kron"}
        Curvature, as in :func:`~pyro_structsel.laplace`.
    max_rounds : int
        Rounds of (mode, hyperparameters).
    tol : float
        Stop when no unconstrained hyperparameter moves more than this.

    Returns
    -------
    Estimate
        The Laplace estimate at :math:`h^*` (``method="laplace"``), with
        ``diagnostics["hyperparameters"]`` (:math:`h^*` by name),
        ``diagnostics["empirical_bayes"]`` (``rounds``, ``converged``, and the
        ``history`` of (evidence, hyperparameters) per round).

    Raises
    ------
    ValueError
        A name that is not a parameter of the model (listing those that are),
        nothing to optimise, a prior scale on a non-Gaussian prior.

    Example
    -------
    >>> estimate = empirical_bayes(ps.fix_structure(model, {"basis": "fourier"}), None, x, y,
    ...                            hyperparameters=["alpha", "sigma"])
    >>> estimate.diagnostics["hyperparameters"]
    """
    structure = None if hessian_structure == "auto" else parse_option(
        HessianStructure, hessian_structure, "hessian_structure (or 'auto')")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"Expected max_rounds to be an int >= 1, but got {max_rounds!r}.")
    with poutine.block(), torch.no_grad(), poutine.trace(param_only=True) as capture:
        model(*args, **kwargs)
    read = [name for name in capture.trace.nodes]
    names = read if hyperparameters is None else list(hyperparameters)
    unknown = [n for n in names if n not in read]
    if unknown:
        raise ValueError(f"Unknown hyperparameter(s) {unknown}: not parameters of the model, "
                         f"which reads {sorted(read)}.")
    scales = gaussian_prior_sites(model, args, kwargs) if prior_scales else []
    if not names and not scales:
        raise ValueError("Nothing to optimise: the model reads no pyro.param; pass "
                         "prior_scales=True to optimise the scales of its Gaussian priors.")
    hyper = _Hyperparameters(model, args, kwargs, names, scales)
    vector = hyper.initial.clone()
    log_joint = LogJoint(hyper.model_at(vector), args, kwargs)
    start = start_point(log_joint, guide, args, kwargs, seed, init_scale)[0]
    best = laplace_at(log_joint, start, hessian_structure=structure, max_iter=max_iter)
    structure = HessianStructure(best.diagnostics["hessian_structure"])
    history = [(best.value, hyper.report(vector))]
    converged = False
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        proposal = _maximise_at_mode(hyper, vector, best, structure)
        step = proposal - vector
        for _ in range(4):  # the new mode must not lower the evidence: halve the step if it does
            candidate = vector + step
            log_joint = LogJoint(hyper.model_at(candidate), args, kwargs)
            estimate = laplace_at(log_joint, best.diagnostics["flat_mode"],
                                  hessian_structure=structure, max_iter=max_iter)
            if math.isfinite(estimate.value) and estimate.value >= best.value - 1e-9:
                break
            step = step / 2
        else:
            converged = True  # no step improves: a (local) maximum at this tolerance
            break
        moved = float(step.abs().max()) if step.numel() else 0.0
        vector, best = candidate, estimate
        history.append((best.value, hyper.report(vector)))
        if moved < tol:
            converged = True
            break
    best.diagnostics["hyperparameters"] = hyper.report(vector)
    best.diagnostics["empirical_bayes"] = {"rounds": rounds, "converged": converged,
                                           "history": history}
    best.diagnostics["start"] = "guide" if guide is not None else "prior_draw"
    return best


def _maximise_at_mode(hyper: _Hyperparameters, vector: torch.Tensor, estimate: Estimate,
                      structure: HessianStructure) -> torch.Tensor:
    """The hyperparameters maximising the Laplace evidence with the mode and GGN held."""
    mode = estimate.diagnostics["flat_mode"]
    posterior: Precision = estimate.diagnostics["posterior"].precision
    d = mode.numel()
    log_joint0 = LogJoint(hyper.model_at(vector), hyper.args, hyper.kwargs)
    base_roots = [r.detach() for r in _fisher_roots(log_joint0, mode, differentiable=False)]
    diagonal = structure is not HessianStructure.FULL
    u = vector.detach().clone().double().requires_grad_()

    def negative_evidence() -> torch.Tensor:
        log_joint = LogJoint(hyper.model_at(u.to(vector.dtype)), hyper.args, hyper.kwargs)
        likelihood, prior = log_joint.log_density(mode)
        prior_precision = Curvature(log_joint, mode).prior_precision(diagonal=diagonal,
                                                                      create_graph=True)
        factor = _fisher_factor(_fisher_roots(log_joint, mode, differentiable=True), base_roots)
        log_det = _scaled(posterior, factor, prior_precision).log_det()
        return -(likelihood.double() + prior.double() + 0.5 * d * math.log(2 * math.pi)
                 - 0.5 * log_det)

    optimizer = torch.optim.LBFGS([u], max_iter=50, tolerance_grad=1e-7, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = negative_evidence()
        if not torch.isfinite(value):
            return value
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    out = u.detach().to(vector.dtype)
    return out if bool(torch.isfinite(out).all()) else vector
