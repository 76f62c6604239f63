r"""Estimators of the log evidence :math:`\log p(D \mid h)`, selectable by name.

Each estimator is a function ``(model, guide, *args, **kwargs) -> Estimate``
that works on any Pyro model and guide (vectorised over draws where the
model allows, one draw at a time otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch

from ..util.options import parse_option
from ..util.sampling import draw
from .curvature import LogJoint, log_joint_batched
from .estimate import Estimate
from .laplace import FULL_LIMIT, laplace
from .psis import psis_khat


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.double().mean())
    se = float(values.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return mean, se


def _check_model_and_guide(model: Any, guide: Any, caller: str) -> None:
    if not callable(model):
        raise TypeError(f"Expected model to be a callable Pyro model, but got {model!r}.")
    if not callable(guide):
        raise TypeError(f"{caller} scores draws from a fitted guide: expected guide to be a "
                        f"callable Pyro guide (e.g. result.guide inside result.param_scope()), "
                        f"but got {guide!r}.")


def elbo(model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
         num_particles: int = 1000, chunk_size: int | None = 100,
         vectorize: bool | None = None, **kwargs: Any) -> Estimate:
    r"""Monte Carlo evidence lower bound with its standard error.

    .. math::

        \mathrm{ELBO} = \mathbb E_{q(z)}[\log p(D, z) - \log q(z)]
        = \mathbb E_q \log p(D \mid z) - \mathrm{KL}(q(z) \,\|\, p(z))
        \le \log p(D)

    estimated by the mean over ``num_particles`` draws :math:`z_i \sim q`,
    with standard error :math:`\mathrm{sd}/\sqrt n`. Both terms are
    reported in ``diagnostics`` (``expected_log_likelihood``, ``kl``), which
    give the description length :math:`-\mathrm{ELBO}/\ln 2` bits split into
    :math:`L(D \mid w, f)` and :math:`L(w \mid f)`. The KL is estimated by Monte
    Carlo for every guide (autoguides put Delta sites in the guide, which
    hides the analytic KL from ``TraceMeanField_ELBO``).

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide; ``*args, **kwargs`` are passed to both.
    num_particles : int
        Number of draws from the guide.
    chunk_size : int, optional
        Draws per vectorised pass.
    vectorize : bool, optional
        See :func:`pyro_structsel.util.sampling.draw`.

    Returns
    -------
    Estimate
        ``method="elbo"``.

    References
    ----------
    D. Blei, A. Kucukelbir, J. McAuliffe. Variational inference: a review for
    statisticians. JASA, 2017.
    """
    _check_model_and_guide(model, guide, "elbo")
    draws = draw(model, guide, args, kwargs, num_samples=num_particles, chunk_size=chunk_size,
                 vectorize=vectorize, what="The ELBO", num_argument="num_particles")
    value, se = _mean_se(draws.log_weights)
    lik, lik_se = _mean_se(draws.log_likelihood)
    kl, kl_se = _mean_se(draws.log_q - draws.log_prior)
    khat = psis_khat(draws.log_weights.double(), warn=False)
    return Estimate(value, se, draws.num_samples, "elbo", {
        "expected_log_likelihood": lik, "expected_log_likelihood_se": lik_se,
        "kl": kl, "kl_se": kl_se, "vectorized": draws.vectorized,
        "khat": khat.value, "ess": khat.diagnostics["ess"],
    })


class Proposal(str, Enum):
    """Importance proposals of :func:`iwae`."""

    GUIDE = "guide"
    LAPLACE = "laplace"


def iwae(model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
         num_samples: int = 1000, chunk_size: int | None = 100,
         vectorize: bool | None = None, proposal: str = "guide",
         laplace_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Estimate:
    r"""Importance-weighted bound (Burda et al. 2016) with ESS and the PSIS :math:`\hat k`.

    .. math::

        \mathcal L_K = \log \frac1K \sum_{k=1}^K \frac{p(D, z_k)}{q(z_k)},
        \quad z_k \sim q, \qquad \mathrm{ELBO} \le \mathbb E\,\mathcal L_K \le \log p(D),

    tighter as K grows. The draws are vectorised in chunks of ``chunk_size``
    so K = 10^4 fits in memory. The standard error is the delta-method one,
    :math:`\mathrm{sd}(\tilde w) / (\sqrt K\, \bar{\tilde w})`. Diagnostics: the
    effective sample size :math:`(\sum w)^2/\sum w^2` and the Pareto
    :math:`\hat k` of the log weights (Yao et al. 2018), with a warning when
    :math:`\hat k > 0.7`: then the estimate (and its se) cannot be trusted.

    ``proposal="laplace"`` draws from the Laplace Gaussian
    :math:`\mathcal N(u^*, P^{-1})` in the unconstrained space of the latents
    instead of from ``guide`` (which then only starts the search for the mode,
    see :func:`~pyro_structsel.laplace`), with the full GGN precision up to
    5000 latents (it holds the posterior's correlations) and K-FAC above. The
    weights are :math:`p(D, T(u_k))\,|J_T(u_k)| / \mathcal N(u_k)`, computed on
    the full data; on a linear-Gaussian model the proposal is the posterior,
    every weight is :math:`p(D)` and the estimate is exact with zero variance;
    on a network it is an unbiased correction of the Laplace evidence, whose
    :math:`\hat k` says how far the posterior is from Gaussian.

    Parameters
    ----------
    laplace_options : dict, optional
        Keyword arguments of :func:`~pyro_structsel.laplace` for the proposal
        (e.g. ``{"hessian_structure": "diag"}``).

    References
    ----------
    Y. Burda, R. Grosse, R. Salakhutdinov. Importance weighted autoencoders. ICLR 2016.
    Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?: evaluating
    variational inference. ICML 2018.
    """
    kind = parse_option(Proposal, proposal, "proposal")
    extra: dict[str, Any] = {"proposal": kind.value}
    if kind is Proposal.LAPLACE:
        if not callable(model):
            raise TypeError(f"Expected model to be a callable Pyro model, but got {model!r}.")
        log_w, extra_laplace = _laplace_log_weights(model, guide, args, kwargs, num_samples,
                                                    chunk_size, dict(laplace_options or {}))
        extra.update(extra_laplace)
    else:
        _check_model_and_guide(model, guide, "iwae")
        draws = draw(model, guide, args, kwargs, num_samples=num_samples,
                     chunk_size=chunk_size, vectorize=vectorize,
                     what="The importance-weighted bound")
        log_w = draws.log_weights.double()
        extra["vectorized"] = draws.vectorized
    k = log_w.numel()
    value = float(torch.logsumexp(log_w, 0) - math.log(k))
    w = (log_w - log_w.max()).exp()
    se = float(w.std() / (math.sqrt(k) * w.mean())) if k > 1 else math.nan
    ess = float(w.sum() ** 2 / (w**2).sum())
    khat = psis_khat(log_w)
    return Estimate(value, se, k, "iwae", {"ess": ess, "khat": khat.value, **extra})


def _laplace_log_weights(model: Callable[..., Any], guide: Any, args: tuple,
                         kwargs: Mapping[str, Any], num_samples: int, chunk_size: int | None,
                         options: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Log importance weights of draws from the Laplace Gaussian, and what it was."""
    if "hessian_structure" not in options:
        size = LogJoint(model, args, kwargs).dim
        options["hessian_structure"] = "full" if size <= FULL_LIMIT else "kron"
    estimate = laplace(model, guide, *args, **options, **kwargs)
    gaussian = estimate.diagnostics.get("posterior")
    if gaussian is None or not math.isfinite(estimate.value):
        return torch.full((num_samples,), math.nan, dtype=torch.float64), {
            "laplace": estimate.value}
    draws = gaussian.sample(num_samples)
    log_q = gaussian.log_prob(draws)
    log_p = log_joint_batched(gaussian.log_joint, draws, chunk_size or num_samples)
    return log_p.double() - log_q, {
        "laplace": estimate.value, "hessian_structure": estimate.diagnostics["hessian_structure"],
        "laplace_converged": estimate.diagnostics["converged"]}
