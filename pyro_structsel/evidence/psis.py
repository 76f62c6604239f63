r"""Pareto :math:`\hat k` of importance weights: how well :math:`q` covers the posterior.

Below 0.5 :math:`q` is close to the posterior, between 0.5 and 0.7 usable,
above 0.7 importance sampling from :math:`q` (and any estimate that relies on
:math:`q` covering the posterior) is unreliable.

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

import torch
from pyro.ops.stats import fit_generalized_pareto

from ..infer.convergence import DiagnosticWarning
from ..util.stacklevel import find_stack_level
from .estimate import Estimate

#: :math:`\hat k` above which importance sampling from :math:`q` is unreliable.
KHAT_THRESHOLD = 0.7


class ParetoKWarning(DiagnosticWarning):
    r"""The Pareto :math:`\hat k` of the importance weights is above 0.7."""


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
