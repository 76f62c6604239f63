r"""Hypergradient methods on flat closures: unrolled, greedy, implicit and joint.

The inner problem (DESIGN.md §5): :math:`\eta` steps of SGD with momentum in
the form of Maclaurin, Duvenaud & Adams (2015), :math:`v_0 = 0` and for
:math:`t = 0, \dots, \eta - 1`

.. math::

    g_t = \nabla_\theta L(\theta_t, h, t), \quad
    v_{t+1} = \gamma_t v_t - (1 - \gamma_t) g_t, \quad
    \theta_{t+1} = \theta_t + \alpha_t v_{t+1},

on closures over flat vectors: ``loss(theta, hyper, step)`` (deterministic
in its arguments; stochastic losses seed their noise from ``step``) and
``objective(theta, hyper)``, with ``theta`` and ``hyper`` one flat 1-D tensor
each (``hyper`` unconstrained). Each method returns a
:class:`~pyro_structsel.hyper.reversible.Hypergradient` of
:math:`Q(\theta_\eta, h)`:

- :func:`unrolled`: reverse-mode differentiation through the :math:`\eta`
  steps (autograd, memory :math:`O(\eta |\theta|)`);
  :func:`~pyro_structsel.hyper.reversible.rmad` computes the same hypergradient by
  exact reversal of the run (memory :math:`O(|\theta|)`);
- :func:`greedy`: the one-step look-ahead hypergradient at every inner step,
  used to update :math:`h` online (Luketina et al. 2016);
- :func:`implicit`: the implicit-function-theorem hypergradient at the inner
  optimum (Lorraine et al. 2020), with a conjugate-gradient
  (:func:`conjugate_gradient`) or Neumann-series (:func:`neumann_series`)
  inverse-Hessian-vector product;
- :func:`joint`: :math:`\theta` and :math:`h` descended together on the same
  loss (empirical Bayes, :math:`L = Q`).

:func:`~pyro_structsel.optimize_hyperparameters` builds the closures from a
Pyro model and runs them.

References
----------
D. Maclaurin, D. Duvenaud, R. Adams. Gradient-based hyperparameter
optimization through reversible learning. ICML 2015.
J. Lorraine, P. Vicol, D. Duvenaud. Optimizing millions of hyperparameters by
implicit differentiation. AISTATS 2020.
J. Luketina, M. Berglund, K. Greff, T. Raiko. Scalable gradient-based tuning
of continuous regularization hyperparameters. ICML 2016.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .reversible import GradientFn, Hypergradient, check_schedules, check_vector, sgd_momentum

Loss = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Update = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class HypergradientWarning(UserWarning):
    """A hypergradient may be inaccurate (inner run not converged, CG stopped early, ...)."""


def _check_problem(theta0: Any, hyper: Any, lr: Any, momentum: Any
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the shared inputs (:func:`~pyro_structsel.hyper.reversible.check_schedules`).

    The schedules are cast to the dtype of ``theta0``.
    """
    theta0 = check_vector(theta0, "theta0").detach()
    hyper = check_vector(hyper, "hyper").detach()
    lr, momentum = check_schedules(lr, momentum)
    return theta0, hyper, lr.detach().to(theta0), momentum.detach().to(theta0)


def _scalar(value: Any, what: str, step: int | None = None) -> torch.Tensor:
    where = "" if step is None else f" at step {step}"
    if not torch.is_tensor(value) or value.numel() != 1:
        raise ValueError(f"Expected {what} to return a scalar tensor, but got "
                         f"{tuple(value.shape) if torch.is_tensor(value) else value!r}{where}.")
    if not bool(torch.isfinite(value.detach()).all()):
        raise FloatingPointError(f"{what} is not finite{where} ({float(value.detach())}); "
                                 "lower the learning rate or narrow the hyperparameters.")
    return value.reshape(())


def _grad(output: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs: Any
          ) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad`` with zeros for inputs the output does not depend on."""
    return torch.autograd.grad(output, list(inputs), materialize_grads=True, **kwargs)


def _leaf(value: torch.Tensor) -> torch.Tensor:
    return value.detach().clone().requires_grad_(True)


def unrolled(loss: Loss, objective: Objective, theta0: torch.Tensor, hyper: torch.Tensor,
             lr: torch.Tensor, momentum: torch.Tensor) -> Hypergradient:
    r"""Hypergradient by reverse-mode differentiation through the whole inner run.

    Builds the graph of :math:`\theta_\eta(\theta_0, h, \alpha, \gamma)` through
    all :math:`\eta` steps (``create_graph=True`` on every inner gradient) and
    back-propagates :math:`Q(\theta_\eta, h)` to :math:`h`, the learning-rate
    schedule :math:`\alpha`, the momentum schedule :math:`\gamma` and
    :math:`\theta_0`. Exact up to floating point; memory :math:`O(\eta |\theta|)`
    (the whole trajectory stays in the graph). See
    :func:`~pyro_structsel.hyper.reversible.rmad` for the :math:`O(|\theta|)` version.

    Parameters
    ----------
    loss : callable
        ``loss(theta, hyper, step)``, the inner loss :math:`L` (deterministic in
        its arguments), twice differentiable.
    objective : callable
        ``objective(theta, hyper)``, the quality :math:`Q`.
    theta0 : Tensor, shape ``(n,)``
        Initial parameters :math:`\theta_0`.
    hyper : Tensor, shape ``(m,)``
        Hyperparameters :math:`h` (unconstrained).
    lr, momentum : Tensor, shape ``(eta,)``
        Schedules :math:`\alpha_t > 0` and :math:`\gamma_t \in (0, 1)`.

    Returns
    -------
    Hypergradient
        ``objective`` :math:`Q(\theta_\eta, h)`, ``theta`` :math:`\theta_\eta`,
        ``hyper``, ``lr``, ``momentum`` and ``theta0``: the derivatives of
        :math:`Q` by each; ``diagnostics``: ``seconds``.
    """
    theta0, hyper, lr, momentum = _check_problem(theta0, hyper, lr, momentum)
    start = time.perf_counter()
    with torch.enable_grad():
        theta0_, hyper_, lr_, momentum_ = (_leaf(v) for v in (theta0, hyper, lr, momentum))
        theta, velocity = theta0_, torch.zeros_like(theta0_)
        for t in range(lr.numel()):
            (g,) = _grad(_scalar(loss(theta, hyper_, t), "loss", t), [theta], create_graph=True)
            velocity = momentum_[t] * velocity - (1 - momentum_[t]) * g
            theta = theta + lr_[t] * velocity
        value = _scalar(objective(theta, hyper_), "objective")
        d_hyper, d_lr, d_momentum, d_theta0 = _grad(value, [hyper_, lr_, momentum_, theta0_])
    return Hypergradient(objective=value.item(), theta=theta.detach(), hyper=d_hyper,
                         lr=d_lr, momentum=d_momentum, theta0=d_theta0,
                         diagnostics={"method": "unrolled",
                                      "seconds": time.perf_counter() - start})


def greedy(loss: Loss, objective: Objective, theta0: torch.Tensor, hyper: torch.Tensor,
           lr: torch.Tensor, momentum: torch.Tensor, *, hyper_lr: float = 0.0,
           update: Update | None = None) -> Hypergradient:
    r"""Greedy (one-step look-ahead) hypergradients, applied online along the inner run.

    At every inner step :math:`t`, with :math:`\theta_t` and :math:`v_t` held
    fixed, the step is seen as a function of the hyperparameters,

    .. math::

        \theta_{t+1}(h) = \theta_t + \alpha_t\bigl(\gamma_t v_t
        - (1 - \gamma_t)\nabla_\theta L(\theta_t, h, t)\bigr),

    and :math:`g_t = \frac{d}{dh} Q(\theta_{t+1}(h), h)` is its hypergradient
    (Luketina et al. 2016). The step is taken with :math:`h_t`, then
    :math:`h_{t+1} = ` ``update(t, h_t, g_t)`` (default plain gradient descent
    :math:`h_t - \text{hyper\_lr}\, g_t`; ``hyper_lr=0`` keeps :math:`h` fixed).
    It costs one Hessian-vector product per step and no memory across steps,
    but sees only one step ahead (short-horizon bias). With :math:`\eta = 1`
    it is :func:`unrolled` exactly.

    Parameters
    ----------
    loss, objective, theta0, hyper, lr, momentum :
        As in :func:`unrolled`.
    hyper_lr : float
        Step size of the default online update.
    update : callable, optional
        ``update(step, hyper, hypergradient) -> new hyper`` (e.g. an Adam step).

    Returns
    -------
    Hypergradient
        Of the last step: ``objective`` :math:`Q(\theta_\eta, h_{\eta-1})`,
        ``hyper`` :math:`g_{\eta-1}`; ``lr[t]`` and ``momentum[t]`` the one-step
        derivatives :math:`\partial Q(\theta_{t+1}) / \partial \alpha_t` (and
        :math:`\gamma_t`) of every step; ``theta0`` the one-step derivative by
        :math:`\theta_0` of step 0. ``diagnostics``: ``hyper`` (the final,
        updated :math:`h_\eta`), ``hyper_trajectory`` (shape ``(eta + 1, m)``),
        ``hypergradients`` (shape ``(eta, m)``), ``objectives`` (shape
        ``(eta,)``: :math:`Q(\theta_{t+1}, h_t)`), ``seconds``.
    """
    theta0, hyper, lr, momentum = _check_problem(theta0, hyper, lr, momentum)
    if update is None:
        if not (isinstance(hyper_lr, (int, float)) and math.isfinite(hyper_lr)
                and hyper_lr >= 0):
            raise ValueError(f"Expected hyper_lr >= 0, but got {hyper_lr!r}.")

        def update(step: int, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return h - hyper_lr * g

    start = time.perf_counter()
    steps = lr.numel()
    theta, velocity, h = theta0.clone(), torch.zeros_like(theta0), hyper.clone()
    trajectory, grads, objectives = [h.clone()], [], []
    d_lr, d_momentum = torch.zeros_like(lr), torch.zeros_like(momentum)
    d_theta0 = torch.zeros_like(theta0)
    value = torch.zeros((), dtype=theta0.dtype)
    for t in range(steps):
        with torch.enable_grad():
            point, h_, a_, m_ = _leaf(theta), _leaf(h), _leaf(lr[t]), _leaf(momentum[t])
            (g,) = _grad(_scalar(loss(point, h_, t), "loss", t), [point], create_graph=True)
            new_velocity = m_ * velocity - (1 - m_) * g
            new_theta = point + a_ * new_velocity
            value = _scalar(objective(new_theta, h_), "objective", t)
            d_h, d_a, d_m, d_point = _grad(value, [h_, a_, m_, point])
        d_lr[t], d_momentum[t] = d_a, d_m
        if t == 0:
            d_theta0 = d_point
        grads.append(d_h)
        objectives.append(float(value.detach()))
        theta, velocity = new_theta.detach(), new_velocity.detach()
        h = check_vector(update(t, h, d_h), "the updated hyper").detach().reshape(hyper.shape)
        trajectory.append(h.clone())
    return Hypergradient(objective=value.item(), theta=theta, hyper=grads[-1], lr=d_lr,
                         momentum=d_momentum, theta0=d_theta0, diagnostics={
                             "method": "greedy", "hyper": h,
                             "hyper_trajectory": torch.stack(trajectory),
                             "hypergradients": torch.stack(grads),
                             "objectives": torch.tensor(objectives, dtype=torch.float64),
                             "seconds": time.perf_counter() - start})


def conjugate_gradient(hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       tol: float = 1e-10, max_iter: int = 100
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""Solve :math:`H x = b` for symmetric positive definite :math:`H` given by products.

    Hestenes–Stiefel conjugate gradients from :math:`x_0 = 0`, until
    :math:`\|r\| \le \text{tol}\,\|b\|` or ``max_iter`` iterations. Returns
    :math:`x` and ``{"iterations", "relative_residual", "converged"}``; warns
    (:class:`HypergradientWarning`) on non-positive curvature
    :math:`p^\top H p \le 0` (then :math:`H` is not positive definite: the inner
    run is not at a minimum) or without convergence.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    norm_b = float(b.norm())
    info: dict[str, Any] = {"iterations": 0, "relative_residual": 0.0, "converged": True}
    if norm_b == 0.0:
        return x, info
    for i in range(max_iter):
        hp = hvp(p)
        curvature = p @ hp
        if not float(curvature) > 0:
            warnings.warn(f"Conjugate gradients met non-positive curvature {float(curvature):.3g}"
                          f" at iteration {i}: the Hessian of the inner loss is not positive "
                          "definite (the inner run has not reached a minimum).",
                          HypergradientWarning, stacklevel=3)
            info.update(iterations=i, converged=False)
            break
        step = rr / curvature
        x = x + step * p
        r = r - step * hp
        new_rr = r @ r
        info["iterations"] = i + 1
        if float(new_rr.sqrt()) <= tol * norm_b:
            break
        p = r + (new_rr / rr) * p
        rr = new_rr
    info["relative_residual"] = float(r.norm()) / norm_b
    if info["relative_residual"] > tol and info["converged"]:
        info["converged"] = False
        warnings.warn(f"Conjugate gradients stopped after {max_iter} iterations at relative "
                      f"residual {info['relative_residual']:.3g} > tol={tol}; raise max_iter.",
                      HypergradientWarning, stacklevel=3)
    return x, info


def neumann_series(hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                   step_size: float, num_terms: int) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""Approximate :math:`H^{-1} b` by the truncated Neumann series (Lorraine et al. 2020).

    .. math::

        H^{-1} b \approx \beta \sum_{j=0}^{J} (I - \beta H)^j b,

    exact as :math:`J \to \infty` when :math:`0 < \beta < 2 / \lambda_{\max}(H)`
    (Lorraine et al., Algorithm 3, with the step size :math:`\beta` kept in
    front so the result is an inverse, not a rescaled one). ``num_terms`` =
    :math:`J`.
    """
    v = b.clone()
    total = b.clone()
    for _ in range(num_terms):
        v = v - step_size * hvp(v)
        total = total + v
    return step_size * total, {"iterations": num_terms, "last_term_norm": float(v.norm())}


def implicit(loss: Loss, objective: Objective, theta0: torch.Tensor, hyper: torch.Tensor,
             lr: torch.Tensor, momentum: torch.Tensor, *, solver: str = "cg",
             tol: float = 1e-10, max_iter: int = 100, neumann_step_size: float | None = None,
             neumann_terms: int = 50, grad_tol: float | None = 1e-4,
             gradient: GradientFn | None = None) -> Hypergradient:
    r"""Hypergradient at the inner optimum by the implicit function theorem.

    Runs the :math:`\eta` inner steps to :math:`\theta^*` and, treating it as
    the optimum (:math:`\nabla_\theta L(\theta^*, h) = 0`, checked with
    ``grad_tol``), uses :math:`d\theta^*/dh = -H^{-1}\partial^2_{\theta h} L`:

    .. math::

        \frac{dQ}{dh} = \partial_h Q - \partial^2_{h\theta} L \; H^{-1} \partial_\theta Q,
        \qquad H = \partial^2_{\theta\theta} L(\theta^*, h)

    (Lorraine et al. 2020), all evaluated at step index :math:`\eta`. The
    inverse-Hessian-vector product comes from :func:`conjugate_gradient`
    (``solver="cg"``, default) or :func:`neumann_series` (``solver="neumann"``,
    step size ``neumann_step_size``, default
    :math:`\alpha_{\eta-1}(1-\gamma_{\eta-1})/(1+\gamma_{\eta-1})`, below
    :math:`2/\lambda_{\max}` whenever the inner run is stable (Lorraine et
    al. use the learning rate of plain SGD), and ``neumann_terms`` terms; a
    diverging series warns); both need only Hessian-vector products. The memory is
    :math:`O(|\theta|)` whatever :math:`\eta`; the answer is the limit
    :math:`\eta \to \infty` of :func:`unrolled` for a strongly convex :math:`L`.

    Parameters
    ----------
    loss, objective, theta0, hyper, lr, momentum :
        As in :func:`unrolled`.
    solver : {"cg", "neumann"}
        Inverse-Hessian-vector product.
    tol, max_iter :
        Conjugate-gradient relative residual and iteration cap.
    neumann_step_size, neumann_terms :
        Neumann-series step size :math:`\beta` and number of terms :math:`J`.
    grad_tol : float or None
        Warn (:class:`HypergradientWarning`) when
        :math:`\|\nabla_\theta L(\theta^*)\| >` ``grad_tol``: the run is not at
        an optimum and the hypergradient is not what the theorem promises.
        ``None`` skips the check (e.g. for a stochastic loss).
    gradient : callable, optional
        :math:`\nabla_\theta L` computed another way for the inner run (see
        :func:`~pyro_structsel.hyper.reversible.sgd_momentum`); the
        second-order terms at :math:`\theta^*` still come from ``loss``.

    Returns
    -------
    Hypergradient
        ``hyper`` as above; ``lr``, ``momentum`` and ``theta0`` are zero (the
        optimum does not depend on them). ``diagnostics``: ``grad_norm``,
        ``solver`` and its information (iterations, residual), ``seconds``.
    """
    if solver not in ("cg", "neumann"):
        raise ValueError(f"Unknown solver {solver!r}; expected 'cg' or 'neumann'.")
    theta0, hyper, lr, momentum = _check_problem(theta0, hyper, lr, momentum)
    if solver == "neumann":
        if isinstance(neumann_terms, bool) or not isinstance(neumann_terms, int) \
                or neumann_terms < 0:
            raise ValueError(f"Expected neumann_terms to be an int >= 0, but got "
                             f"{neumann_terms!r}.")
        # the inner run is stable for alpha (1 - gamma) lambda < 2 (1 + gamma), so this beta
        # keeps beta lambda < 2, the series' condition, whenever the run converged
        step_size = (float(lr[-1] * (1 - momentum[-1]) / (1 + momentum[-1]))
                     if neumann_step_size is None else neumann_step_size)
        if not (isinstance(step_size, (int, float)) and not isinstance(step_size, bool)
                and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"Expected neumann_step_size > 0, but got {neumann_step_size!r}.")
    start = time.perf_counter()
    steps = lr.numel()
    theta_star = sgd_momentum(loss, theta0, hyper, lr, momentum, gradient=gradient)
    with torch.enable_grad():
        theta_, hyper_ = _leaf(theta_star), _leaf(hyper)
        (g,) = _grad(_scalar(loss(theta_, hyper_, steps), "loss", steps), [theta_],
                     create_graph=True)
        grad_norm = float(g.detach().norm())
        if grad_tol is not None and grad_norm > grad_tol:
            warnings.warn(f"The inner run ended at gradient norm {grad_norm:.3g} > grad_tol="
                          f"{grad_tol}: not at an optimum, so the implicit hypergradient is "
                          "approximate; run more inner steps.", HypergradientWarning,
                          stacklevel=2)
        value = _scalar(objective(theta_, hyper_), "objective")
        dq_theta, dq_hyper = _grad(value, [theta_, hyper_])

        def hvp(vector: torch.Tensor) -> torch.Tensor:
            return _grad(g, [theta_], grad_outputs=vector, retain_graph=True)[0].detach()

        if solver == "cg":
            w, info = conjugate_gradient(hvp, dq_theta, tol=tol, max_iter=max_iter)
        else:
            w, info = neumann_series(hvp, dq_theta, step_size=step_size,
                                     num_terms=neumann_terms)
            if not info["last_term_norm"] <= float(dq_theta.norm()):  # growing: diverges
                warnings.warn(f"The Neumann series diverges (its last term has norm "
                              f"{info['last_term_norm']:.3g} > {float(dq_theta.norm()):.3g}): "
                              "the step size is above 2 / lambda_max of the Hessian; lower "
                              "neumann_step_size or use solver='cg'.", HypergradientWarning,
                              stacklevel=2)
        (mixed,) = _grad(g, [hyper_], grad_outputs=w)
    return Hypergradient(objective=value.item(), theta=theta_star, hyper=dq_hyper - mixed,
                         lr=torch.zeros_like(lr), momentum=torch.zeros_like(momentum),
                         theta0=torch.zeros_like(theta0), diagnostics={
                             "method": "implicit", "solver": solver, "grad_norm": grad_norm,
                             **info, "seconds": time.perf_counter() - start})


def joint(loss: Loss, theta0: torch.Tensor, hyper: torch.Tensor, lr: torch.Tensor,
          momentum: torch.Tensor, *, hyper_lr: float = 0.01, update: Update | None = None,
          gradients: Callable[[torch.Tensor, torch.Tensor, int],
                              tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
          ) -> Hypergradient:
    r"""Empirical Bayes: descend :math:`\theta` and :math:`h` together on the same loss.

    For :math:`L = Q` (e.g. the negative ELBO), :math:`\min_h Q(\theta^*(h), h)
    = \min_{\theta, h} L(\theta, h)`, so no hypergradient through the run is
    needed: at every step :math:`t` both gradients of
    :math:`L(\theta_t, h_t, t)` are taken; :math:`\theta` moves by the inner
    SGD with momentum (schedules ``lr``, ``momentum``) and :math:`h` by
    ``update(t, h_t, ∂_h L)`` (default: Adam with learning rate ``hyper_lr``,
    whose state lives for this call). ``gradients(theta, h, t)``, if given,
    returns :math:`(L, \partial_\theta L, \partial_h L)` computed another way
    (a traced step) for the steps of the run.

    Returns
    -------
    Hypergradient
        ``objective`` :math:`L(\theta_\eta, h_\eta, \eta)`, ``theta``
        :math:`\theta_\eta`, ``hyper`` :math:`\partial_h L` there (zero at a
        joint optimum); ``lr``, ``momentum`` and ``theta0`` are NaN (not
        defined for this method). ``diagnostics``: ``hyper`` (final
        :math:`h_\eta`), ``hyper_trajectory`` (shape ``(eta + 1, m)``),
        ``losses`` (shape ``(eta,)``), ``seconds``.
    """
    theta0, hyper, lr, momentum = _check_problem(theta0, hyper, lr, momentum)
    if update is None:
        if not (isinstance(hyper_lr, (int, float)) and math.isfinite(hyper_lr)
                and hyper_lr > 0):
            raise ValueError(f"Expected hyper_lr > 0, but got {hyper_lr!r}.")
        state = _leaf(hyper)
        adam = torch.optim.Adam([state], lr=hyper_lr)

        def update(step: int, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                state.copy_(h)
            state.grad = g.clone()
            adam.step()
            return state.detach().clone()

    start = time.perf_counter()
    steps = lr.numel()
    theta, velocity, h = theta0.clone(), torch.zeros_like(theta0), hyper.clone()
    trajectory, losses = [h.clone()], []
    for t in range(steps):
        if gradients is not None:
            value, d_theta, d_h = gradients(theta, h, t)
        else:
            with torch.enable_grad():
                point, h_ = _leaf(theta), _leaf(h)
                value = _scalar(loss(point, h_, t), "loss", t)
                d_theta, d_h = _grad(value, [point, h_])
        losses.append(float(value.detach()))
        velocity = momentum[t] * velocity - (1 - momentum[t]) * d_theta
        theta = theta + lr[t] * velocity
        h = check_vector(update(t, h, d_h), "the updated hyper").detach().reshape(hyper.shape)
        trajectory.append(h.clone())
    with torch.enable_grad():
        h_ = _leaf(h)
        value = _scalar(loss(theta, h_, steps), "loss", steps)
        (d_h,) = _grad(value, [h_])
    nan = float("nan")
    return Hypergradient(objective=value.item(), theta=theta, hyper=d_h,
                         lr=torch.full_like(lr, nan), momentum=torch.full_like(momentum, nan),
                         theta0=torch.full_like(theta0, nan), diagnostics={
                             "method": "joint", "hyper": h,
                             "hyper_trajectory": torch.stack(trajectory),
                             "losses": torch.tensor(losses, dtype=torch.float64),
                             "seconds": time.perf_counter() - start})
