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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..evidence.estimate import Estimate
from ..evidence.psis import KHAT_THRESHOLD, psis_khat
from ..infer.convergence import Convergence, elbo_convergence
from ..util.sampling import draw
from .fitted import FittedSelection


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


def diagnose(result: FittedSelection, *, num_samples: int = 1000, warn: bool = True,
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
