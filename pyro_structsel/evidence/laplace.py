r"""Laplace evidence of any Pyro model: a Gaussian at the mode of the joint density.

.. math::

    \log p(D) \approx \log p(D, u^*) + \tfrac d2 \log 2\pi - \tfrac12 \log\det P(u^*),
    \qquad u^* = \arg\max_u \log p(D, u),

in the unconstrained space of the latents (with the log-Jacobians of the
transforms), on the full data whatever the model's plates subsample. The
precision :math:`P` is, by default, the generalised Gauss–Newton matrix of the
likelihood plus the exact Hessian of the negative log prior, built from the
model's trace (:mod:`~pyro_structsel.evidence.curvature`): positive definite
wherever the prior is log-concave, and equal to the Hessian when the
likelihood's parameters are affine in the latents, so the evidence is exact
for linear-Gaussian models. ``curvature="hessian"`` takes the exact autograd
Hessian instead; where it is not positive definite (a network away from a
strict local mode) the estimate falls back to the GGN, with a
:class:`LaplaceWarning`, rather than returning NaN.

The mode is searched by L-BFGS from a seeded start: the median of a fitted
guide when one is given (the fitted posterior), otherwise a seeded prior draw
shrunk towards the origin, warmed up by Adam.

References
----------
D. MacKay. Bayesian interpolation. Neural Computation, 1992.
C. Bishop. Pattern Recognition and Machine Learning, §4.4, 2006.
A. Immer et al. Scalable marginal likelihood estimation for model selection
in deep learning. ICML 2021.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from torch.func import jvp

from ..util.options import parse_option
from ..util.stacklevel import find_stack_level
from .curvature import (
    Curvature,
    HessianStructure,
    LogJoint,
    Precision,
    forward_mode,
    precision,
)
from .estimate import Estimate

#: Affine models up to this many latents get the full GGN by default.
FULL_LIMIT = 5000
#: Default bound (nats) on how far below the mode the search may stop and still count as there.
MODE_TOLERANCE = 1.0


class LaplaceWarning(UserWarning):
    """The Laplace approximation is not trustworthy (no mode found, Hessian not definite)."""


class CurvatureKind(str, Enum):
    """The curvature of :func:`laplace`."""

    GGN = "ggn"
    HESSIAN = "hessian"


def start_point(log_joint: LogJoint, guide: Any, args: tuple, kwargs: Mapping[str, Any],
           seed: int | None, init_scale: float) -> tuple[torch.Tensor, str]:
    """Where the search for the mode starts, and which start it is."""
    if isinstance(guide, Mapping):
        return log_joint.pack(guide).detach(), "values"
    if isinstance(guide, AutoGuide):
        with torch.no_grad(), poutine.block():
            median = guide.median(*args, **kwargs)
        if all(s.name in median for s in log_joint.sites):
            return log_joint.pack({s.name: median[s.name] for s in log_joint.sites}), "guide"
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        return log_joint.prior_draw(init_scale), "prior_draw"


def find_mode(log_density: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              start: torch.Tensor, *, adam_steps: int = 0, lr: float = 0.01,
              max_iter: int = 1000, tolerance: float = 1e-9
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise a log joint from ``start`` (Adam, then L-BFGS); the mode and its gradient.

    ``log_density(flat)`` returns the log likelihood and the log prior at the
    flat vector ``flat`` (:meth:`LogJoint.log_density`, or the GGN Laplace's
    network problem).
    """
    flat = start.detach().clone().requires_grad_()

    def energy() -> torch.Tensor:
        likelihood, prior = log_density(flat)
        return -(likelihood + prior)

    with torch.enable_grad():
        if adam_steps:
            adam = torch.optim.Adam([flat], lr=lr)
            for _ in range(adam_steps):
                adam.zero_grad()
                energy().backward()
                adam.step()
        lbfgs = torch.optim.LBFGS([flat], max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=0.0, history_size=50,
                                  line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            value = energy()
            value.backward()
            return value

        lbfgs.step(closure)
        grad = torch.autograd.grad(energy(), flat)[0]
    return flat.detach(), grad.detach()


def is_affine(curvature: Curvature, *, num_checks: int = 2) -> bool:
    r"""Whether the likelihood's natural parameters are affine in the latents (at the mode).

    Then the GGN is the Hessian of the negative log-likelihood (exponential
    families at their natural parameters: Normal loc with a fixed scale,
    Bernoulli and Categorical logits, Poisson log rate). Checks numerically that
    the second directional derivative :math:`\partial^2_t \eta(u + t v)` vanishes
    along ``num_checks`` random directions :math:`v` (by polarisation, all second
    derivatives then vanish); Categorical logits up to a shift per row.
    """
    log_joint, observed = curvature.log_joint, curvature.observed
    if not observed:
        return True
    mode = curvature.flat

    def natural(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        thetas = log_joint.thetas(flat, observed)
        return tuple(t.log() if obs.log_natural else t for obs, t in zip(observed, thetas))

    generator = torch.Generator().manual_seed(0)
    for _ in range(num_checks):
        v = torch.randn(mode.shape, generator=generator, dtype=mode.dtype)
        try:
            with forward_mode():
                first, second = jvp(lambda x: jvp(natural, (x,), (v,))[1], (mode,), (v,))
        except RuntimeError:
            return False
        for obs, a, b in zip(observed, first, second):
            if obs.shift_invariant:
                b = b - b.mean(-1, keepdim=True)
            if float(b.abs().max()) > 1e-6 * (float(a.abs().max()) + 1e-30):
                return False
    return True


class LaplaceGaussian:
    r"""The Laplace approximation :math:`\mathcal N(u^*, P^{-1})` over the unconstrained latents.

    Attributes
    ----------
    log_joint : LogJoint
        The model as a function of the flat latents.
    mode : Tensor
        :math:`u^*`.
    precision : Precision
        :math:`P`, in the structure the estimate used.
    """

    def __init__(self, log_joint: LogJoint, mode: torch.Tensor, precision: Precision) -> None:
        self.log_joint = log_joint
        self.mode = mode.detach()
        self.precision = precision

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` draws, shape ``(num, d)``, in the model's dtype."""
        offsets = self.precision.sample_offsets(num, generator)
        return (self.mode.double() + offsets).to(self.mode.dtype)

    def log_prob(self, flat: torch.Tensor) -> torch.Tensor:
        """Log density of draws ``flat`` ``(num, d)`` (float64)."""
        offsets = flat.double() - self.mode.double()
        d = self.mode.numel()
        return 0.5 * (self.precision.log_det().detach() - d * math.log(2 * math.pi)
                      - self.precision.quadratic(offsets))


def laplace(model: Callable[..., Any], guide: Any = None, *args: Any, curvature: str = "ggn",
            hessian_structure: str = "auto", seed: int | None = 0, init_scale: float = 0.1,
            adam_steps: int = 0, lr: float = 0.01, max_iter: int = 1000,
            tolerance: float = 1e-9, mode_tolerance: float = MODE_TOLERANCE, fisher_samples: int = 64,
            chunk_size: int = 64, **kwargs: Any) -> Estimate:
    r"""Laplace approximation of the log evidence of ``model(*args, **kwargs)``.

    Parameters
    ----------
    model : callable
        Pyro model; every latent site is integrated (fix structural sites with
        :func:`~pyro_structsel.fix_structure` first to score one structure).
        A subsampled data plate is run on all its rows.
    guide : AutoGuide or dict, optional
        Where the search for the mode starts: a fitted guide's median, or
        constrained values by site; default a prior draw times ``init_scale``
        (seeded by ``seed``).
    curvature : {"ggn", "hessian"}
        The generalised Gauss–Newton matrix (plus the exact prior Hessian), or
        the exact Hessian of the log joint (falls back to the GGN, with a
        :class:`LaplaceWarning`, where it is not positive definite).
    hessian_structure : {"auto", "full", "diag", "kron"}
        Structure of the GGN (:class:`~pyro_structsel.evidence.curvature.HessianStructure`).
        ``"auto"``: ``"full"`` when the likelihood's parameters are affine in
        the latents (then the Laplace is exact for Gaussian likelihoods) and
        there are at most 5000 latents, ``"diag"`` otherwise (networks: the
        diagonal ordered the structures of the digits benchmark best, see
        ``benchmarks/README.md``).
    seed : int, optional
        Seed of the start when it is drawn.
    init_scale : float
        Shrinks the drawn start towards 0 (a network's weights start small).
    adam_steps : int
        Adam steps before L-BFGS (none by default: on the digits networks
        L-BFGS alone reached modes that order the structures as well).
    lr, max_iter, tolerance : float, int, float
        Adam's learning rate, L-BFGS iterations and gradient tolerance.
    mode_tolerance : float
        Warn when the search may have stopped more than this many nats below
        the mode, by the bound :math:`\|\nabla\|^2 / (2\lambda_{\min}(P))`.
    fisher_samples : int
        Sampled targets per observation for a likelihood without a
        closed-form Fisher information.
    chunk_size : int
        Coordinates per vectorised Jacobian-vector pass.

    Returns
    -------
    Estimate
        ``method="laplace"``, ``se=0`` (deterministic); ``diagnostics``:
        ``curvature`` and ``hessian_structure`` used, ``log_joint``,
        ``log_likelihood``, ``log_prior``, ``log_det_precision``,
        ``num_latent``, ``num_data_blocks``, ``grad_norm``, ``mode_gap``,
        ``converged`` (mode reached within ``mode_tolerance``),
        ``min_eigenvalue``, ``start`` (``"guide"``, ``"values"`` or
        ``"prior_draw"``), ``mode`` (constrained values by site),
        ``flat_mode`` (the unconstrained vector), ``posterior`` (the
        :class:`LaplaceGaussian`), ``kron_sites``,
        ``seconds_mode``, ``seconds_curvature``; with
        ``curvature="hessian"`` also ``hessian_min_eigenvalue`` and
        ``fallback`` (whether the GGN replaced it).

    Raises
    ------
    ValueError
        Naming the site: a discrete latent, a support a Gaussian cannot
        cover, a likelihood whose Fisher information cannot be formed.

    Example
    -------
    >>> laplace(ps.fix_structure(model, {"degree": 3}), None, x, y).value
    """
    kind = parse_option(CurvatureKind, curvature, "curvature")
    structure = None if hessian_structure == "auto" else parse_option(
        HessianStructure, hessian_structure, "hessian_structure (or 'auto')")
    for argument, value, low in (("max_iter", max_iter, 1), ("fisher_samples", fisher_samples, 1),
                                 ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected {argument} to be an int >= {low}, but got {value!r}.")
    if not (isinstance(init_scale, (int, float)) and init_scale > 0):
        raise ValueError(f"Expected init_scale > 0, but got {init_scale!r}.")
    log_joint = LogJoint(model, args, kwargs, fisher_samples=fisher_samples)
    start, start_kind = start_point(log_joint, guide, args, kwargs, seed, init_scale)
    estimate = laplace_at(log_joint, start, curvature=kind, hessian_structure=structure,
                          adam_steps=adam_steps, lr=lr, max_iter=max_iter, tolerance=tolerance,
                          mode_tolerance=mode_tolerance, chunk_size=chunk_size)
    estimate.diagnostics["start"] = start_kind
    _warn_if_unreliable(estimate)
    return estimate


def laplace_at(log_joint: LogJoint, start: torch.Tensor, *,
               curvature: CurvatureKind = CurvatureKind.GGN,
               hessian_structure: HessianStructure | None = None, adam_steps: int = 0,
               lr: float = 0.01, max_iter: int = 1000, tolerance: float = 1e-9,
               mode_tolerance: float = MODE_TOLERANCE, chunk_size: int = 64) -> Estimate:
    """The Laplace evidence of ``log_joint`` from the flat start ``start`` (see :func:`laplace`).

    Warns only where the exact Hessian falls back to the GGN; the caller
    decides how to report an unconverged or undefined estimate
    (``diagnostics["converged"]``, a NaN value).
    """
    kind, structure = curvature, hessian_structure
    started = time.perf_counter()
    mode, grad = find_mode(log_joint.log_density, start, adam_steps=adam_steps, lr=lr, max_iter=max_iter,
                           tolerance=tolerance)
    with torch.no_grad():
        likelihood, prior = (float(v) for v in log_joint.log_density(mode))
    seconds_mode = time.perf_counter() - started
    started = time.perf_counter()
    d = mode.numel()
    diagnostics: dict[str, Any] = {"curvature": kind.value, "num_latent": d,
                                   "num_data_blocks": log_joint.num_blocks}
    log_det = math.nan
    if kind is CurvatureKind.HESSIAN:
        hessian = _negative_hessian(log_joint, mode)
        eigenvalues = torch.linalg.eigvalsh(hessian)
        diagnostics["hessian_min_eigenvalue"] = float(eigenvalues[0])
        diagnostics["fallback"] = bool(eigenvalues[0] <= 0)
        if float(eigenvalues[0]) > 0:
            log_det = float(eigenvalues.log().sum())
            diagnostics["min_eigenvalue"] = float(eigenvalues[0])
            structure = HessianStructure.FULL
            diagnostics["posterior"] = LaplaceGaussian(log_joint, mode, Precision(
                structure, hessian, torch.zeros_like(hessian), []))
        else:
            warnings.warn(
                f"The Hessian of the log joint at the mode is not positive definite (smallest "
                f"eigenvalue {float(eigenvalues[0]):.3g}); the Laplace evidence uses the "
                "generalised Gauss-Newton curvature instead.",
                LaplaceWarning, stacklevel=find_stack_level())
    if math.isnan(log_det):
        curvature_at_mode = Curvature(log_joint, mode, chunk_size=chunk_size)
        if structure is None:
            structure = (HessianStructure.FULL if d <= FULL_LIMIT and is_affine(curvature_at_mode)
                         else HessianStructure.DIAG)
        posterior = precision(curvature_at_mode, structure)
        log_det = float(posterior.log_det())
        diagnostics["min_eigenvalue"] = float(posterior.eigen().min())
        diagnostics["kron_sites"] = [block.name for block in posterior.blocks]
        diagnostics["posterior"] = LaplaceGaussian(log_joint, mode, posterior)
    diagnostics["hessian_structure"] = structure.value if structure is not None else None
    seconds_curvature = time.perf_counter() - started
    grad_norm = float(grad.norm())
    smallest = diagnostics.get("min_eigenvalue", math.nan)
    mode_gap = 0.5 * grad_norm**2 / smallest if smallest > 0 else math.inf
    converged = math.isfinite(mode_gap) and mode_gap <= mode_tolerance
    log_joint_value = likelihood + prior
    value = log_joint_value + 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
    diagnostics.update({
        "log_joint": log_joint_value, "log_likelihood": likelihood, "log_prior": prior,
        "log_det_precision": log_det, "grad_norm": grad_norm, "mode_gap": mode_gap,
        "converged": converged, "flat_mode": mode,
        "mode": {n: v.detach().clone() for n, v in log_joint.constrained(mode).items()},
        "seconds_mode": seconds_mode, "seconds_curvature": seconds_curvature})
    return Estimate(value, 0.0, 0, "laplace", diagnostics)


def _warn_if_unreliable(estimate: Estimate) -> None:
    diagnostics = estimate.diagnostics
    if math.isnan(estimate.value):
        warnings.warn(f"The Laplace precision is not positive definite (smallest eigenvalue "
                      f"{diagnostics.get('min_eigenvalue', math.nan):.3g}; the log prior is not "
                      "concave there); the Laplace evidence is undefined.", LaplaceWarning,
                      stacklevel=find_stack_level())
    elif not diagnostics["converged"]:
        warnings.warn(f"L-BFGS did not reach the mode (gradient norm "
                      f"{diagnostics['grad_norm']:.3g}, up to {diagnostics['mode_gap']:.3g} nats "
                      "below it); the Laplace evidence may be off. Raise max_iter, or start "
                      "from a fitted guide.", LaplaceWarning, stacklevel=find_stack_level())


def _negative_hessian(log_joint: LogJoint, mode: torch.Tensor) -> torch.Tensor:
    """The exact :math:`-\\nabla^2 \\log p(D, u)` at ``mode`` (dense, float64)."""
    def energy(flat: torch.Tensor) -> torch.Tensor:
        likelihood, prior = log_joint.log_density(flat)
        return -(likelihood + prior)

    with torch.enable_grad():
        hessian = torch.autograd.functional.hessian(energy, mode).double()
    return 0.5 * (hessian + hessian.T)
