r"""Laplace evidence: a Gaussian at the mode of the joint density.

.. math::

    \log p(D) \approx \log p(D, w^*) + \tfrac d2 \log 2\pi - \tfrac12 \log\det H(w^*),
    \qquad w^* = \arg\max_w \log p(D, w), \quad H = -\nabla^2 \log p(D, w),

in the unconstrained space of the latents (with the log-Jacobian of the
transforms), so it is exact for linear-Gaussian models. The density and the
transforms come from Pyro's ``initialize_model`` (the potential energy used
by HMC); the mode is found by L-BFGS and the Hessian is the full autograd
Hessian, which is affordable up to a few thousand latent dimensions.

References
----------
D. MacKay. Bayesian interpolation. Neural Computation, 1992.
C. Bishop. Pattern Recognition and Machine Learning, §4.4, 2006.
A. Immer et al. Scalable marginal likelihood estimation for model selection
in deep learning. ICML 2021.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.mcmc.util import initialize_model

from ..util.minibatch import check_full_data, full_data
from ..util.sampling import trace_model
from ..util.stacklevel import find_stack_level
from ..util.validation import check_observations
from .estimate import Estimate


class LaplaceWarning(UserWarning):
    """The Laplace approximation is not trustworthy (no mode found, Hessian not definite)."""


def _initial_params(guide: Any, args: tuple, kwargs: Mapping[str, Any],
                    transforms: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    if not isinstance(guide, AutoGuide):
        return None
    with torch.no_grad(), poutine.block():
        median = guide.median(*args, **kwargs)
    if not set(transforms) <= set(median):
        return None
    return {name: transforms[name](median[name]).detach() for name in transforms}


def laplace(model: Callable[..., Any], guide: Any = None, *args: Any, max_iter: int = 500,
            tolerance: float = 1e-9, **kwargs: Any) -> Estimate:
    r"""Laplace approximation of the log evidence of ``model(*args, **kwargs)``.

    Parameters
    ----------
    model : callable
        Pyro model; every latent site is integrated (fix structural sites with
        :func:`~pyro_structsel.fix_structure` first to score one structure).
        Plates must not subsample: the mode is of the full-data density.
    guide : AutoGuide, optional
        Its median starts the search for the mode; otherwise Pyro's default
        initialisation is used.
    max_iter : int
        L-BFGS iterations.
    tolerance : float
        Gradient tolerance of L-BFGS.

    Returns
    -------
    Estimate
        ``method="laplace"``, ``se=0`` (deterministic); ``diagnostics`` holds
        ``log_joint`` at the mode, ``log_det_hessian``, ``num_latent``,
        ``grad_norm`` at the mode and ``min_eigenvalue`` of the Hessian.

    Example
    -------
    >>> laplace(fix_structure(model, {"degree": 3}), None, x, y).value
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Expected max_iter to be an int >= 1, but got {max_iter!r}.")
    with full_data():  # the mode of the full-data density: no minibatch
        trace = trace_model(model, args, kwargs)
        check_full_data(trace, "The Laplace evidence")
        check_observations(trace, model, args, kwargs)
        init, potential_fn, transforms, _ = initialize_model(model, model_args=args,
                                                             model_kwargs=dict(kwargs))
    names = sorted(init)
    if not names:
        raise ValueError("The model has no latent site to integrate; its log evidence is its "
                         "log likelihood.")
    start = _initial_params(guide, args, kwargs, transforms) or init
    shapes = [start[n].shape for n in names]
    sizes = [s.numel() for s in shapes]
    dtype = start[names[0]].dtype

    def unpack(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, sizes)
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}

    def energy(flat: torch.Tensor) -> torch.Tensor:
        return potential_fn(unpack(flat))

    flat = torch.cat([start[n].detach().reshape(-1) for n in names]).to(dtype).requires_grad_()
    optimizer = torch.optim.LBFGS([flat], max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=0.0, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = energy(flat)
        value.backward()
        return value

    optimizer.step(closure)
    mode = flat.detach()
    with torch.enable_grad():
        point = mode.clone().requires_grad_()
        grad = torch.autograd.grad(energy(point), point)[0]
    hessian = torch.autograd.functional.hessian(energy, mode)
    hessian = 0.5 * (hessian + hessian.T)
    log_joint = -float(energy(mode))
    eigenvalues = torch.linalg.eigvalsh(hessian)
    d = mode.numel()
    diagnostics = {"log_joint": log_joint, "num_latent": d, "grad_norm": float(grad.norm()),
                   "min_eigenvalue": float(eigenvalues[0]), "mode": unpack(mode)}
    scale = max(1.0, float(eigenvalues.abs().max()))
    if float(grad.norm()) > 1e-3 * scale:
        warnings.warn(f"L-BFGS did not reach the mode (gradient norm {float(grad.norm()):.3g}); "
                      "the Laplace evidence may be off. Raise max_iter.",
                      LaplaceWarning, stacklevel=find_stack_level())
    if float(eigenvalues[0]) <= 0:
        warnings.warn(f"The Hessian at the mode is not positive definite (smallest eigenvalue "
                      f"{float(eigenvalues[0]):.3g}); the Laplace evidence is undefined.",
                      LaplaceWarning, stacklevel=find_stack_level())
        return Estimate(math.nan, math.nan, 0, "laplace", diagnostics)
    log_det = float(eigenvalues.log().sum())
    value = log_joint + 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
    diagnostics["log_det_hessian"] = log_det
    return Estimate(value, 0.0, 0, "laplace", diagnostics)
