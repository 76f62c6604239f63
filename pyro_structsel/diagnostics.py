r"""Can the fit be trusted? PSIS :math:`\hat k` of :math:`q` and convergence of the ELBO.

Two checks of a variational fit, each with a warning when it fails:

- the Pareto :math:`\hat k` of the importance weights
  :math:`\log w_i = \log p(D, z_i) - \log q(z_i)`, :math:`z_i \sim q`
  (Yao et al. 2018): below 0.5 :math:`q` is close to the posterior, between
  0.5 and 0.7 usable, above 0.7 importance sampling from :math:`q` (and any
  estimate that relies on :math:`q` covering the posterior) is unreliable;
- the relative change of the mean loss between the two halves of the last
  part of the ELBO trace: the fit has converged when it is below ``tol``
  or within the step-to-step noise of the loss.

References
----------
Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?: Evaluating
variational inference. ICML 2018.
A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry. Pareto smoothed
importance sampling. JMLR, 2024.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pyro.ops.stats import fit_generalized_pareto

from ._sampling import draw
from ._warnings import find_stack_level
from .estimate import Estimate

if TYPE_CHECKING:
    from .selection import SelectionResult

#: :math:`\hat k` above which importance sampling from :math:`q` is unreliable.
KHAT_THRESHOLD = 0.7


class DiagnosticWarning(UserWarning):
    """A diagnostic says an estimate of the fit cannot be trusted."""


class ParetoKWarning(DiagnosticWarning):
    r"""The Pareto :math:`\hat k` of the importance weights is above 0.7."""


class ConvergenceWarning(DiagnosticWarning):
    """The ELBO trace has not levelled off."""


def psis_khat(log_weights: torch.Tensor | Sequence[float], *, warn: bool = True) -> Estimate:
    r"""Pareto :math:`\hat k` of importance weights: how well :math:`q` covers the posterior.

    Fits a generalised Pareto distribution to the largest
    :math:`M = \lceil\min(0.2\,n, 3\sqrt n)\rceil` weights
    :math:`w_i = p(D, z_i)/q(z_i)` (Zhang & Stephens' estimator, as
    :func:`pyro.infer.importance.psis_diagnostic` does); its shape is
    :math:`\hat k`. Also reports the importance-sampling effective sample size
    :math:`(\sum w_i)^2 / \sum w_i^2`.

    Parameters
    ----------
    log_weights : tensor of shape (n,)
        :math:`\log p(D, z_i) - \log q(z_i)` for draws :math:`z_i \sim q`.
    warn : bool
        Warn (:class:`ParetoKWarning`) when :math:`\hat k > 0.7`.

    Returns
    -------
    Estimate
        ``value`` :math:`\hat k` (``nan`` with fewer than 50 draws, ``inf``
        when all but a few weights underflow next to the largest),
        ``method="psis"``, ``diagnostics`` with ``ess``, ``ess_fraction``,
        ``num_tail`` and ``sigma`` (the Pareto scale).

    References
    ----------
    Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?:
    Evaluating variational inference. ICML 2018.

    Example
    -------
    >>> psis_khat(torch.randn(1000)).value < 0.5
    True
    """
    lw = torch.as_tensor(log_weights, dtype=torch.float64).detach().reshape(-1)
    n = lw.numel()
    if n == 0 or not bool(torch.isfinite(lw).all()):
        raise ValueError(f"Expected finite log weights, but got {n} values with "
                         f"{int((~torch.isfinite(lw)).sum())} NaN or infinite.")
    lw = lw - lw.max()
    weights = lw.exp()
    ess = float(weights.sum() ** 2 / (weights ** 2).sum())
    num_tail = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))
    khat, sigma = math.nan, math.nan
    if num_tail >= 10 and n > num_tail:
        ordered = torch.sort(lw).values
        # as arviz's psislw: floor the cutoff where exp underflows, not at 1e-15 as pyro does
        cutoff = max(math.log(torch.finfo(torch.float64).tiny), float(ordered[-num_tail - 1]))
        tail = ordered[ordered > cutoff]
        if float(ordered[-1] - ordered[0]) < 1e-9:  # equal weights: q is the posterior
            khat = -math.inf
        elif tail.numel() >= 10:
            k, s = fit_generalized_pareto(tail.exp() - math.exp(cutoff))
            khat, sigma = float(k), float(s)
        else:  # the weights span more than 300 orders of magnitude: q is useless here
            khat = math.inf
    estimate = Estimate(khat, math.nan, n, "psis", {
        "ess": ess, "ess_fraction": ess / n, "num_tail": num_tail, "sigma": sigma})
    if warn and math.isnan(khat):
        warnings.warn(
            f"Too few draws ({n}) to estimate the Pareto k-hat of the importance weights "
            "(it needs at least 50); use a few hundred draws.",
            DiagnosticWarning, stacklevel=find_stack_level())
    if warn and khat > KHAT_THRESHOLD:
        warnings.warn(
            f"Pareto k-hat of the importance weights is {khat:.2f} > {KHAT_THRESHOLD}: q covers "
            "the posterior poorly, so importance-weighted estimates (and the ELBO as an "
            "estimate of the evidence) are unreliable. Fit longer, use a richer guide (e.g. "
            "AutoLowRankMultivariateNormal) or compare models with care.",
            ParetoKWarning, stacklevel=find_stack_level())
    return estimate


@dataclass(frozen=True)
class Convergence:
    """Whether the ELBO trace has levelled off.

    Attributes
    ----------
    converged : bool
        ``relative_change < tol``, or the change is within ``z`` standard
        errors of the noise (``False`` for a trace too short to tell).
    relative_change : float
        :math:`|\\bar L_1 - \\bar L_2| / \\max(|\\bar L_1|, |\\bar L_2|, 1)`, the means of
        the loss over the first and second halves of the last ``window`` steps.
    noise : float
        Standard error of :math:`\\bar L_1 - \\bar L_2`, relative like ``relative_change``.
    window : int
        Number of steps compared.
    tol : float
        Threshold on the relative change.
    """

    converged: bool
    relative_change: float
    noise: float
    window: int
    tol: float

    def __repr__(self) -> str:
        state = "converged" if self.converged else "not converged"
        return (f"Convergence({state}: relative change {self.relative_change:.3g} "
                f"(noise {self.noise:.3g}) over the last {self.window} steps, tol {self.tol:g})")


def elbo_convergence(losses: Sequence[float] | torch.Tensor, *, window: float = 0.2,
                     tol: float = 0.01, z: float = 2.0, warn: bool = True) -> Convergence:
    r"""Check that the loss (−ELBO) trace has levelled off.

    Compares the mean loss over the first and second halves of the last
    ``window`` fraction of the steps (at least 10 steps):

    .. math::

        r = \frac{|\bar L_1 - \bar L_2|}{\max(|\bar L_1|, |\bar L_2|, 1)},

    and calls the fit converged when :math:`r <` ``tol`` or when the change
    is within ``z`` standard errors of the step-to-step noise,
    :math:`|\bar L_1 - \bar L_2| < z\,\sqrt{s_1^2/m_1 + s_2^2/m_2}` (no
    trend the trace can show: the loss fluctuates around a plateau, as
    single-particle or minibatch ELBO steps do). The floor of 1 nat keeps
    losses near zero from inflating :math:`r`.

    Parameters
    ----------
    losses : sequence of float
        The loss at every step (``SelectionResult.losses``).
    window : float
        Fraction of the trace to look at, in (0, 1].
    tol : float
        Threshold on the relative change (> 0).
    z : float
        Number of standard errors of noise within which a change is no trend.
    warn : bool
        Warn (:class:`ConvergenceWarning`) when not converged.

    Returns
    -------
    Convergence

    Example
    -------
    >>> elbo_convergence([100.0 / (t + 1) + 5 for t in range(1000)]).converged
    True
    """
    if not 0 < window <= 1:
        raise ValueError(f"Expected 0 < window <= 1, but got {window!r}.")
    if not tol > 0:
        raise ValueError(f"Expected tol > 0, but got {tol!r}.")
    trace = torch.as_tensor(list(losses) if not torch.is_tensor(losses) else losses,
                            dtype=torch.float64).reshape(-1)
    size = max(10, int(math.ceil(window * trace.numel())))
    if trace.numel() < size:
        result = Convergence(False, math.nan, math.nan, int(trace.numel()), float(tol))
        reason = f"the trace has only {trace.numel()} steps, too few to tell"
    else:
        tail = trace[-size:]
        halves = tail[: size // 2], tail[size // 2:]
        first, second = float(halves[0].mean()), float(halves[1].mean())
        scale = max(abs(first), abs(second), 1.0)
        change = abs(first - second) / scale
        noise = math.sqrt(sum(float(h.var()) / h.numel() for h in halves)) / scale
        result = Convergence(change < tol or change < z * noise, change, noise, size,
                             float(tol))
        reason = (f"the mean loss changed by {100 * change:.2g}% (from {first:.4g} to "
                  f"{second:.4g}) over the last {size} steps, more than tol={tol:g} and "
                  f"than {z:g} standard errors of the noise")
    if warn and not result.converged:
        warnings.warn(f"The ELBO has not converged: {reason}. Fit for more steps (num_steps) "
                      "or lower the learning rate before trusting the result.",
                      ConvergenceWarning, stacklevel=find_stack_level())
    return result


@dataclass(frozen=True)
class FitDiagnostics:
    r"""The diagnostics of one fit: :math:`\hat k` of :math:`q` and ELBO convergence.

    Attributes
    ----------
    khat : Estimate
        Pareto :math:`\hat k` (see :func:`psis_khat`).
    convergence : Convergence
        ELBO convergence (see :func:`elbo_convergence`).
    """

    khat: Estimate
    convergence: Convergence

    @property
    def ok(self) -> bool:
        r"""Whether both checks pass (:math:`\hat k \le 0.7` and converged)."""
        return bool(self.khat.value <= KHAT_THRESHOLD and self.convergence.converged)

    def to_dict(self) -> dict[str, float | int]:
        """NetCDF-safe flat dict (floats and ints; booleans as 0/1)."""
        return {
            "khat": float(self.khat.value),
            "khat_threshold": KHAT_THRESHOLD,
            "importance_ess": float(self.khat.diagnostics["ess"]),
            "importance_num_samples": int(self.khat.num_samples),
            "elbo_converged": int(self.convergence.converged),
            "elbo_relative_change": float(self.convergence.relative_change),
            "elbo_noise": float(self.convergence.noise),
            "elbo_window": int(self.convergence.window),
            "elbo_tol": float(self.convergence.tol),
        }

    def __repr__(self) -> str:
        ess = self.khat.diagnostics["ess"]
        return (f"FitDiagnostics(khat={self.khat.value:.3f}, ess={ess:.1f}/"
                f"{self.khat.num_samples}, {self.convergence!r})")


def diagnose_draws(log_weights: torch.Tensor, losses: Sequence[float], *, warn: bool = True,
                   **convergence: Any) -> FitDiagnostics:
    """:class:`FitDiagnostics` from log importance weights and a loss trace."""
    return FitDiagnostics(psis_khat(log_weights, warn=warn),
                          elbo_convergence(losses, warn=warn, **convergence))


def diagnose(result: SelectionResult, *, num_samples: int = 1000, warn: bool = True,
             window: float = 0.2, tol: float = 0.01, chunk_size: int | None = None,
             vectorize: bool | None = None) -> FitDiagnostics:
    r"""Diagnose a fit: PSIS :math:`\hat k` of :math:`q` and convergence of the ELBO.

    Draws ``num_samples`` times from the fitted guide, scores each draw
    under the model (one vectorised pass where the model allows), and checks
    the loss trace. The diagnostics are also stored as ``result.diagnostics``.

    Parameters
    ----------
    result : SelectionResult
        A fit from :func:`~pyro_structsel.select_structure`.
    num_samples : int
        Draws from :math:`q` (:math:`\hat k` needs a few hundred at least).
    warn : bool
        Warn (:class:`ParetoKWarning`, :class:`ConvergenceWarning`) when a check fails.
    window, tol :
        See :func:`elbo_convergence`.
    chunk_size, vectorize :
        See :func:`pyro_structsel.evidence.elbo`.

    Returns
    -------
    FitDiagnostics

    References
    ----------
    Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?:
    Evaluating variational inference. ICML 2018.

    Example
    -------
    >>> result = ps.select_structure(model, x, y, num_steps=2000)
    >>> ps.diagnose(result).khat.value
    0.41
    """
    with result.param_scope():
        draws = draw(result.model, result.guide, result.args, result.kwargs,
                     num_samples=num_samples, chunk_size=chunk_size, vectorize=vectorize)
    diagnostics = diagnose_draws(draws.log_weights, result.losses, warn=warn, window=window,
                                 tol=tol)
    result.diagnostics = diagnostics
    return diagnostics
