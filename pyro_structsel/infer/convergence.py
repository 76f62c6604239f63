r"""Has the fit converged? The relative change of the ELBO trace over its last steps.

The fit has converged when the mean loss of the two halves of the last part
of the trace differ by less than ``tol`` (relative), or by less than the
step-to-step noise of the loss can tell apart.

References
----------
Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?: Evaluating
variational inference. ICML 2018.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..util.stacklevel import find_stack_level


class DiagnosticWarning(UserWarning):
    """A diagnostic says an estimate of the fit cannot be trusted."""


class ConvergenceWarning(DiagnosticWarning):
    """The ELBO trace has not levelled off."""


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
