r"""Gradient-descent evidence: early stopping as nonparametric variational inference.

Start ``r`` runs of gradient descent from draws :math:`w_0 \sim q_0` and follow
each for ``T`` steps of

.. math::

    w_{t+1} = T(w_t) = w_t - \beta \nabla L(w_t), \qquad L(w) = -\log p(D, w),

in the unconstrained space of the model's latent sites (``L`` is the
potential energy Pyro's HMC uses). The draws :math:`w_t` are samples of an
implicit distribution :math:`q_t`, the push-forward of :math:`q_0` by ``t``
steps. Its entropy changes at each step by the log-Jacobian of the map,

.. math::

    H[q_{t+1}] = H[q_t] + \mathbb E_{q_t} \log\lvert\det(I - \beta H(w_t))\rvert,
    \qquad H(w) = \nabla^2 L(w),

so :math:`\mathcal L_t = \mathbb E_{q_t}[\log p(D, w_t)] + H[q_t] \le \log p(D)`
is a variational lower bound (an ELBO) of the evidence at every step, estimated
by the mean over the restarts. It rises while descent moves the draws to where
the data are likely, peaks, and falls once the draws crowd into the mode and
the entropy keeps shrinking without the fit getting better: overfitting made
visible, and the peak is the early-stopping point.

The log-determinant is expanded in the powers of :math:`A = \beta H`,

.. math::

    \log\det(I - A) = \operatorname{tr}\log(I - A)
    = -\operatorname{tr}A - \tfrac12\operatorname{tr}A^2 - \tfrac13\operatorname{tr}A^3 - \dots,

convergent for :math:`\rho = \beta\,|\lambda|_{\max} < 1`, and truncated after the
second order; both traces come from Hutchinson's estimator with Rademacher
probes :math:`v`, :math:`\operatorname{tr}H \approx v^\top H v` and
:math:`\operatorname{tr}H^2 \approx \lVert Hv\rVert^2`, one Hessian-vector
product per probe (reverse-over-reverse through :mod:`torch.func`). Three
variants (``log_det=``):

``"taylor"`` (default)
    :math:`-\beta\operatorname{tr}H - \tfrac{\beta^2}{2}\operatorname{tr}H^2`, the
    second-order Taylor polynomial; its error per eigenvalue :math:`a` of ``A``
    is at most :math:`|a|^3 / (3(1-|a|))`.
``"bound"``
    :math:`-\beta\operatorname{tr}H - \beta^2\operatorname{tr}H^2`, the form in
    DESIGN.md §4 and in the authors' code (HIPS, ``approx_log_det``): since
    :math:`\log(1-a) \ge -a - a^2` for :math:`a \le 0.68`, it under-estimates the
    entropy, so the evidence estimate stays a lower bound in expectation.
``"exact"``
    the full Hessian (``d`` Hessian-vector products) and
    :func:`torch.linalg.slogdet`; for small models and for checking the others.

All three need :math:`\rho < 1`: beyond it :math:`I - \beta H` is no longer
positive definite, the step is not an invertible map and the change of
variables fails (at :math:`\rho > 2` descent diverges along that direction);
the series variants are inaccurate from :math:`\rho \approx 0.5`.
:class:`StepSizeWarning` says so, with :math:`|\lambda|_{\max}` tracked by power
iteration on the same Hessian-vector products.

References
----------
D. Duvenaud, D. Maclaurin, R. Adams. Early stopping as nonparametric
variational inference. AISTATS 2016.
M. Hutchinson. A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines. Communications in Statistics, 1990.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from torch.distributions import biject_to
from torch.func import grad_and_value, vjp, vmap

from ..util.options import parse_option
from ..util.progress import progress_bar
from ..util.sampling import VectorizationWarning, draw, trace_model
from ..util.stacklevel import find_stack_level
from .estimate import Estimate

METHOD = "gradient_descent"

#: Above this :math:`\beta|\lambda|_{\max}` the second-order series is warned about.
SERIES_LIMIT = 0.5

#: ``step_size="auto"``: :math:`\beta` = this / :math:`|\lambda|_{\max}` at the initial draws.
AUTO_RHO = 0.25


class StepSizeWarning(UserWarning):
    r"""The step size is outside the range where the entropy update holds.

    The update needs :math:`\rho = \beta|\lambda|_{\max} < 1` (the descent step is
    then an invertible map); its second-order series is accurate for
    :math:`\rho \lesssim 0.5`.
    """


class LogDet(str, Enum):
    """How :math:`\\log\\det(I - \\beta H)` is computed."""

    TAYLOR = "taylor"
    BOUND = "bound"
    EXACT = "exact"


class InitialEntropy(str, Enum):
    """How the entropy of :math:`q_0` is obtained."""

    AUTO = "auto"
    SAMPLE = "sample"


class _Latents:
    """The model's latent sites, flattened into one unconstrained vector."""

    def __init__(self, model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> None:
        trace = trace_model(model, args, kwargs)
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []                 # of the site values
        self.unconstrained_shapes: list[torch.Size] = []   # (a simplex loses a coordinate)
        self.transforms: dict[str, Any] = {}
        dtypes = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.size != frame.full_size:
                    raise ValueError(
                        f"Site {name!r} sits in plate {frame.name!r} subsampled to {frame.size} "
                        f"of {frame.full_size}; gradient-descent evidence needs the full-data "
                        "log joint: call it without subsampling (e.g. without batch_size).")
            if site["is_observed"]:
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"Latent site {name!r} is discrete ({type(fn).__name__}); gradient descent "
                    "needs continuous latent sites. Enumerate or marginalise it out first.")
            self.names.append(name)
            self.transforms[name] = biject_to(fn.support).inv  # constrained -> unconstrained
            self.shapes.append(site["value"].shape)
            self.unconstrained_shapes.append(
                torch.Size(self.transforms[name].forward_shape(site["value"].shape)))
            dtypes.append(site["value"].dtype)
        if not self.names:
            raise ValueError("The model has no latent sample sites to descend on.")
        self.sizes = [math.prod(shape) for shape in self.unconstrained_shapes]
        self.dim = sum(self.sizes)
        self.dtypes = dtypes
        self.dtype = dtypes[0]
        for dtype in dtypes[1:]:
            self.dtype = torch.promote_types(self.dtype, dtype)

    def unflatten(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained values by site from ``u`` of shape ``(..., d)``."""
        lead = u.shape[:-1]
        parts = torch.split(u, self.sizes, dim=-1)
        return {name: part.reshape(lead + shape).to(dtype) for name, part, shape, dtype
                in zip(self.names, parts, self.unconstrained_shapes, self.dtypes)}

    def constrain(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Site values (in the support) from ``u`` of shape ``(..., d)``."""
        return {name: self.transforms[name].inv(value)
                for name, value in self.unflatten(u).items()}

    def unconstrain(self, values: Mapping[str, torch.Tensor], num: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(u, log|dz/du|)`` of ``num`` draws of site values (leading dimension ``num``)."""
        parts, log_jac = [], torch.zeros(num, dtype=torch.float64)
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            z = values[name]
            if z.numel() != num * math.prod(shape):
                raise ValueError(f"Draws of site {name!r} have shape {tuple(z.shape)}, expected "
                                 f"{num} draws of shape {tuple(shape)}.")
            z = z.reshape((num,) + shape)
            u = self.transforms[name](z)
            jac = self.transforms[name].inv.log_abs_det_jacobian(u, z)
            log_jac = log_jac + jac.reshape(num, -1).sum(-1).double()
            parts.append(u.reshape(num, size).to(self.dtype))
        return torch.cat(parts, -1), log_jac

    def log_densities(self, model: Callable[..., Any], u: torch.Tensor, args: tuple,
                      kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Potential :math:`L(u) = -\log p(D, z(u)) - \log|dz/du|` and :math:`\log p(D|z(u))`."""
        unconstrained = self.unflatten(u)
        constrained = {name: self.transforms[name].inv(value)
                       for name, value in unconstrained.items()}
        with poutine.block():
            trace = poutine.trace(poutine.condition(model, constrained)).get_trace(
                *args, **kwargs)
        log_joint = trace.log_prob_sum()
        log_lik = trace.log_prob_sum(
            lambda name, site: site["is_observed"] and name not in constrained)
        for name, value in unconstrained.items():
            log_joint = log_joint + self.transforms[name].inv.log_abs_det_jacobian(
                value, constrained[name]).sum()
        return -torch.as_tensor(log_joint), torch.as_tensor(log_lik)


def _check_int(argument: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected {argument} to be an int >= {low}, but got {value!r}.")


def _prior_draws(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
                 latents: _Latents, num: int, analytic: bool
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """``num`` draws of the latent sites from the prior, and the entropy term of each."""
    values: dict[str, list[torch.Tensor]] = {name: [] for name in latents.names}
    entropy = torch.zeros(num, dtype=torch.float64)
    used_analytic = analytic
    with torch.no_grad():
        for i in range(num):
            trace = trace_model(model, args, kwargs)
            for name in latents.names:
                site = trace.nodes[name]
                values[name].append(site["value"])
                term = None
                if analytic:  # conditional entropy at the drawn parents: unbiased, less noisy
                    try:
                        term = site["fn"].entropy().sum()
                    except NotImplementedError:
                        used_analytic = False
                if term is None:
                    term = -site["fn"].log_prob(site["value"]).sum()
                entropy[i] += float(term)
    return {name: torch.stack(v) for name, v in values.items()}, entropy, used_analytic


def _analytic_guide_entropy(guide: Callable[..., Any], args: tuple,
                            kwargs: Mapping[str, Any], latents: _Latents) -> float | None:
    """Entropy of a Gaussian autoguide in unconstrained space, or ``None`` if not one."""
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            if set(guide._event_dims) != set(latents.names):
                return None
            total = 0.0
            for name in latents.names:
                _, scale = guide._get_loc_and_scale(name)
                total += float(scale.log().sum()) + 0.5 * scale.numel() * math.log(
                    2 * math.pi * math.e)
            return total
        if isinstance(guide, AutoContinuous):
            if set(guide._unconstrained_shapes) != set(latents.names):
                return None
            try:
                return float(guide.get_posterior(*args, **kwargs).entropy().sum())
            except (NotImplementedError, AttributeError):
                return None
    return None


def _hutchinson(probes: torch.Tensor, products: torch.Tensor, beta: float, method: LogDet
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-restart log det estimate and its probe variance, from ``v`` and ``Hv`` (r, P, d)."""
    quad = (probes * products).sum(-1).double()           # v' H v   -> tr H
    square = (products * products).sum(-1).double()      # |H v|^2  -> tr H^2
    second = 0.5 if method is LogDet.TAYLOR else 1.0
    per_probe = -beta * quad - second * beta ** 2 * square
    num = per_probe.shape[-1]
    var = per_probe.var(-1, unbiased=True) / num if num > 1 else torch.full_like(
        per_probe[..., 0], math.nan)
    return per_probe.mean(-1), var


def gradient_descent_evidence(
    model: Callable[..., Any],
    guide: Callable[..., Any] | None = None,
    *args: Any,
    num_restarts: int = 10,
    num_steps: int = 200,
    step_size: float | str = "auto",
    num_probes: int = 10,
    log_det: str = "taylor",
    initial_entropy: str = "auto",
    num_power_iterations: int = 20,
    heldout_args: tuple | None = None,
    heldout_kwargs: Mapping[str, Any] | None = None,
    callback: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    seed: int | None = None,
    vectorize: bool | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> Estimate:
    r"""Log evidence along gradient descent from :math:`q_0` (Duvenaud, Maclaurin & Adams 2016).

    Runs ``num_restarts`` descents :math:`w \leftarrow w - \beta\nabla L(w)` on the
    potential :math:`L(w) = -\log p(D, w)` of ``model(*args, **kwargs)`` in
    unconstrained space, each from a draw of :math:`q_0` (the ``guide``, or the
    prior if ``guide`` is ``None``), tracking the entropy of the implicit
    distribution of the iterates (see the module documentation). At every step
    :math:`t = 0..T` the evidence lower bound

    .. math::

        \mathcal L_t = \frac1r\sum_{i=1}^r \Big[\log p(D, w_t^{(i)})
        + H_0^{(i)} + \sum_{s<t} \log\lvert\det(I - \beta H(w_s^{(i)}))\rvert\Big]

    is recorded with its standard error over the restarts. The estimate is the
    peak over the trajectory (the early-stopping point); the whole trajectory
    is in ``diagnostics``. The peak of a noisy curve is biased upwards by about
    its standard error; use the value at a step fixed in advance where that
    matters.

    Parameters
    ----------
    model : callable
        A Pyro model with continuous latent sites; ``*args, **kwargs`` are passed
        to it (and to the guide). Call it on the full data (no subsampling).
    guide : callable, optional
        The initial distribution :math:`q_0`; it must sample every latent site.
        ``None``: the prior.
    num_restarts : int
        Number of descents ``r`` (draws from :math:`q_0`); the standard error is
        over them.
    num_steps : int
        Number of descent steps ``T``.
    step_size : float or "auto"
        The learning rate :math:`\beta`. Keep :math:`\beta|\lambda|_{\max}` of the
        Hessian of ``L`` below 0.5 (a :class:`StepSizeWarning` is issued otherwise).
        ``"auto"``: :math:`0.25 / |\lambda|_{\max}`, the largest eigenvalue (in
        magnitude) over the initial draws, by power iteration; curvature often
        grows along the descent, hence the margin.
    num_probes : int
        Hutchinson probes per restart and step (series variants).
    log_det : {"taylor", "bound", "exact"}
        The entropy update; see the module documentation.
    initial_entropy : {"auto", "sample"}
        ``"auto"``: the analytic entropy of :math:`q_0` where known (a Gaussian
        ``AutoNormal`` / ``AutoContinuous`` guide; for the prior, each site's
        conditional entropy at the drawn parents), else :math:`-\log q_0(w_0)`;
        ``"sample"``: always :math:`-\log q_0(w_0)` at the draw. Both are in
        unconstrained space (Jacobian of the support transform included).
    num_power_iterations : int
        Power iterations of Hessian-vector products at :math:`w_0` estimating
        :math:`|\lambda|_{\max}`; one warm-started iteration per step follows it.
    heldout_args, heldout_kwargs : optional
        Held-out data: the model's arguments for it. The held-out
        log-likelihood :math:`\log p(D_{\text{test}} \mid w_t)` (sum over its
        observed sites, mean over restarts) is recorded along the trajectory.
    callback : callable, optional
        Called as ``callback(step, values)`` at every step ``0..T`` with the site
        values (constrained) of all restarts, leading dimension ``r``.
    seed : int, optional
        Seed of Pyro's random state (draws from :math:`q_0` and probes).
    vectorize : bool, optional
        Descend all restarts at once with :func:`torch.func.vmap` (Pyro's
        validation off inside). ``None`` tries and falls back to one restart at
        a time with a :class:`~pyro_structsel.util.sampling.VectorizationWarning`.
    progress : bool
        Show a progress bar over the steps.

    Returns
    -------
    Estimate
        ``method="gradient_descent"``; ``value``/``se`` at the peak step. Its
        ``diagnostics`` hold NumPy arrays over steps ``0..T``: ``evidence``,
        ``evidence_se``, ``entropy``, ``log_joint`` (:math:`\log p(D, w_t)` in
        unconstrained space), ``log_likelihood`` (:math:`\log p(D \mid w_t)`),
        ``lambda_max`` (max over restarts of :math:`|\lambda|_{\max}`),
        ``heldout_log_likelihood`` (if held-out data were given) and
        ``evidence_per_restart`` (r × (T+1)); over steps ``0..T-1``:
        ``log_det`` (mean entropy change) and ``log_det_probe_se`` (its
        Hutchinson standard error); and ``best_step``, ``best_heldout_step``,
        ``beta_lambda_max``, ``initial_entropy``, ``initial_entropy_method``,
        ``vectorized`` and the settings.

    Example
    -------
    >>> est = gradient_descent_evidence(model, None, x, y, num_steps=500)
    >>> est.diagnostics["best_step"], est.value
    """
    _check_int("num_restarts", num_restarts, 1)
    _check_int("num_steps", num_steps, 1)
    _check_int("num_probes", num_probes, 1)
    _check_int("num_power_iterations", num_power_iterations, 1)
    auto_step = isinstance(step_size, str) and step_size == "auto"
    if not auto_step and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                          or not (step_size > 0 and math.isfinite(step_size))):
        raise ValueError(f"Expected step_size > 0 or 'auto', but got {step_size!r}.")
    method = parse_option(LogDet, log_det, "log_det")
    entropy_mode = parse_option(InitialEntropy, initial_entropy, "initial_entropy")
    if heldout_kwargs is not None and heldout_args is None:
        heldout_args = ()
    if heldout_args is not None and not isinstance(heldout_args, tuple):
        raise ValueError(f"Expected heldout_args to be a tuple, but got "
                         f"{type(heldout_args).__name__}.")
    beta = math.nan if auto_step else float(step_size)
    num = num_restarts
    if seed is not None:
        pyro.set_rng_seed(seed)

    latents = _Latents(model, args, kwargs)
    dim = latents.dim

    # --- draws from q0 and their entropy (unconstrained space) ---------------------------
    analytic = entropy_mode is InitialEntropy.AUTO
    if guide is None:
        values, entropy0, used_analytic = _prior_draws(model, args, kwargs, latents, num,
                                                       analytic)
        u0, log_jac = latents.unconstrain(values, num)
        entropy0 = entropy0 - log_jac           # -log q_u(u) = -log q(z) - log|dz/du|
        source = "prior"
    else:
        with pyro.poutine.block():
            guide_trace = trace_model(guide, args, kwargs)
        missing = [n for n in latents.names if n not in guide_trace.nodes]
        if missing:
            raise ValueError(f"The guide does not sample the latent sites {missing}; q0 must "
                             "cover every latent site of the model.")
        try:  # all at once if the model allows; one at a time otherwise (r is small)
            draws = draw(model, guide, args, kwargs, num_samples=num, vectorize=True,
                         keep=latents.names)
        except Exception:  # noqa: BLE001 -- not vectorisable
            draws = draw(model, guide, args, kwargs, num_samples=num, vectorize=False,
                         keep=latents.names)
        u0, log_jac = latents.unconstrain(draws.values, num)
        closed = _analytic_guide_entropy(guide, args, kwargs, latents) if analytic else None
        used_analytic = closed is not None
        if used_analytic:
            entropy0 = torch.full((num,), closed, dtype=torch.float64)
        else:
            entropy0 = -draws.log_q.double() - log_jac
        source = "guide"
    if not bool(torch.isfinite(u0).all()):
        raise ValueError("A draw from q0 is not finite in unconstrained space (a value on the "
                         "boundary of its support?).")

    # --- the per-restart computations ------------------------------------------------------
    def potential(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, log_lik = latents.log_densities(model, u, args, kwargs)
        return value, log_lik.detach()

    def heldout(u: torch.Tensor) -> torch.Tensor:
        return latents.log_densities(model, u, heldout_args, heldout_kwargs or {})[1]

    def curvature(u: torch.Tensor, vectors: torch.Tensor, inner: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradient, potential, log-likelihood and ``H @ vectors[k]`` at ``u``."""
        # grad_and_value gives (grad, (L, log-lik)); vjp of grad is the Hessian-vector product
        grad, hvp, (value, log_lik) = vjp(grad_and_value(potential, has_aux=True), u,
                                          has_aux=True)
        if inner:
            products = vmap(lambda v: hvp(v)[0])(vectors)
        else:
            products = torch.stack([hvp(v)[0] for v in vectors])
        return grad, value, log_lik, products

    def power(u: torch.Tensor, vector: torch.Tensor, inner: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Power iteration: top eigenvector (in magnitude) and ``|H v|`` -> |lambda|max."""
        for _ in range(num_power_iterations):
            product = curvature(u, vector.unsqueeze(0), inner)[3][0]
            norm = product.norm()
            vector = product / norm.clamp_min(1e-30)
        return vector, norm

    def batched(fn: Callable[..., Any], vectorized: bool, *tensors: torch.Tensor) -> Any:
        if vectorized:
            with pyro.validation_enabled(False):
                return vmap(lambda *t: fn(*t, True), randomness="different")(*tensors)
        outs = [fn(*(t[i] for t in tensors), False) for i in range(num)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outs))
        return torch.stack(outs)

    def run_step(u: torch.Tensor, vector: torch.Tensor, vectorized: bool) -> tuple:
        if method is LogDet.EXACT:
            eye = torch.eye(dim, dtype=u.dtype).expand(num, dim, dim)
            grad, value, log_lik, hess = batched(curvature, vectorized, u, eye)
            hess = 0.5 * (hess + hess.transpose(-1, -2)).double()
            ldet = torch.linalg.slogdet(torch.eye(dim, dtype=torch.float64) - beta * hess)[1]
            lam = torch.linalg.eigvalsh(hess).abs().amax(-1)
            return grad, value, log_lik, ldet, torch.full_like(ldet, math.nan), lam, vector
        signs = torch.randint(0, 2, (num, num_probes, dim)).to(u.dtype) * 2 - 1
        vectors = torch.cat([signs, vector.unsqueeze(1)], 1)
        grad, value, log_lik, products = batched(curvature, vectorized, u, vectors)
        ldet, var = _hutchinson(signs, products[:, :num_probes], beta, method)
        product = products[:, -1]
        lam = product.norm(dim=-1).double()   # |H v| with |v| = 1: tends to |lambda|_max
        vector = product / product.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        return grad, value, log_lik, ldet, var, lam, vector

    # --- descend ---------------------------------------------------------------------------
    vectorized = vectorize is not False
    u = u0.detach().clone()
    vector = torch.randn(num, dim, dtype=u.dtype)
    vector = vector / vector.norm(dim=-1, keepdim=True)
    with torch.enable_grad():
        try:
            vector, lam0 = batched(power, vectorized, u, vector)
        except Exception as error:  # noqa: BLE001 -- any failure means "not vmappable"
            if vectorize or not vectorized:
                raise
            warnings.warn(
                f"The model is not safe for torch.func.vmap over restarts "
                f"({type(error).__name__}: {error}); descending one restart at a time, "
                "which is slower but gives the same results.",
                VectorizationWarning, stacklevel=find_stack_level())
            vectorized = False
            vector, lam0 = batched(power, vectorized, u, vector)
    if auto_step:
        top = float(lam0.detach().double().max())
        if not (math.isfinite(top) and top > 0):
            raise ValueError(f"step_size='auto' found |λ|max = {top} at the initial draws; "
                             "give step_size explicitly.")
        beta = AUTO_RHO / top

    steps = range(num_steps + 1)
    steps = progress_bar(steps, desc="gradient_descent_evidence", enabled=progress)
    log_joint = torch.empty(num, num_steps + 1, dtype=torch.float64)
    log_lik = torch.empty(num, num_steps + 1, dtype=torch.float64)
    lam_max = torch.empty(num, num_steps + 1, dtype=torch.float64)
    log_dets = torch.empty(num, num_steps, dtype=torch.float64)
    probe_var = torch.empty(num, num_steps, dtype=torch.float64)
    held = torch.empty(num, num_steps + 1, dtype=torch.float64) if heldout_args is not None \
        else None
    for t in steps:
        with torch.enable_grad():
            grad, value, lik, ldet, var, lam, vector = run_step(u, vector, vectorized)
        with torch.no_grad():
            log_joint[:, t] = -value.double()
            log_lik[:, t] = lik.double()
            lam_max[:, t] = lam
            if held is not None:
                held[:, t] = batched(lambda w, _inner: heldout(w), vectorized, u).double()
            if callback is not None:
                callback(t, {k: v.detach() for k, v in latents.constrain(u).items()})
            if t < num_steps:
                log_dets[:, t] = ldet
                probe_var[:, t] = var
                u = (u - beta * grad).detach()

    # --- the estimate along the trajectory -------------------------------------------------
    entropy = entropy0.unsqueeze(1) + torch.cat(
        [torch.zeros(num, 1, dtype=torch.float64), log_dets.cumsum(1)], 1)
    per_restart = log_joint + entropy
    evidence = per_restart.mean(0)
    evidence_se = per_restart.std(0, unbiased=True) / math.sqrt(num) if num > 1 else \
        torch.full_like(evidence, math.nan)
    finite = torch.isfinite(evidence)
    best = int(torch.where(finite, evidence, -math.inf).argmax()) if bool(finite.any()) else 0
    rho = beta * float(lam_max[torch.isfinite(lam_max)].max()) if bool(
        torch.isfinite(lam_max).any()) else math.inf
    diagnostics: dict[str, Any] = {
        "steps": np.arange(num_steps + 1),
        "evidence": evidence.numpy(),
        "evidence_se": evidence_se.numpy(),
        "entropy": entropy.mean(0).numpy(),
        "log_joint": log_joint.mean(0).numpy(),
        "log_likelihood": log_lik.mean(0).numpy(),
        "log_det": log_dets.mean(0).numpy(),
        "log_det_probe_se": (probe_var.mean(0) / num).sqrt().numpy(),
        "lambda_max": lam_max.amax(0).numpy(),
        "evidence_per_restart": per_restart.numpy(),
        "best_step": best,
        "beta_lambda_max": rho,
        "initial_entropy": float(entropy0.mean()),
        "initial_entropy_method": "analytic" if used_analytic else "sample",
        "initial_distribution": source,
        "step_size": beta,
        "num_steps": num_steps,
        "num_probes": num_probes if method is not LogDet.EXACT else 0,
        "log_det_method": method.value,
        "vectorized": vectorized,
    }
    if held is not None:
        diagnostics["heldout_log_likelihood"] = held.mean(0).numpy()
        diagnostics["heldout_log_likelihood_per_restart"] = held.numpy()
        finite_held = torch.isfinite(held.mean(0))
        diagnostics["best_heldout_step"] = int(torch.where(
            finite_held, held.mean(0), -math.inf).argmax())
    _warn_step_size(rho, beta, method, lam_max)
    return Estimate(float(evidence[best]), float(evidence_se[best]), num, METHOD, diagnostics)


def _warn_step_size(rho: float, beta: float, method: LogDet, lam_max: torch.Tensor) -> None:
    per_step = beta * lam_max.amax(0).nan_to_num(math.inf)
    if not math.isfinite(rho) or rho >= 1.0:
        where = int((per_step >= 1.0).nonzero()[0, 0])
        advice = (f" Use step_size < {0.5 * beta / rho:.3g} (β|λ|max ≤ 0.5)."
                  if math.isfinite(rho) else " Use a much smaller step_size.")
        warnings.warn(
            f"step_size × |λ|max = {rho:.3g} ≥ 1 (from step {where}): I − βH is not "
            "positive definite, so a descent step is not an invertible map and the entropy "
            "update (hence the evidence estimate) is invalid"
            + ("" if math.isfinite(rho) and rho <= 2 else "; descent diverges") + "." + advice,
            StepSizeWarning, stacklevel=find_stack_level())
    elif rho > SERIES_LIMIT and method is not LogDet.EXACT:
        warnings.warn(
            f"step_size × |λ|max = {rho:.3g} > {SERIES_LIMIT}: the second-order expansion of "
            f"log det(I − βH) errs by up to {rho ** 3 / (3 * (1 - rho)):.3g} nats per "
            "eigenvalue per step. Use a smaller step_size or log_det='exact'.",
            StepSizeWarning, stacklevel=find_stack_level())
