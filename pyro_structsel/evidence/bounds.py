r"""Estimators of the log evidence :math:`\log p(D \mid h)`, selectable by name.

Each estimator is a function ``(model, guide, *args, **kwargs) -> Estimate``
that works on any Pyro model and guide (vectorised over draws where the
model allows, one draw at a time otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..util.sampling import draw
from .estimate import Estimate
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
    return Estimate(value, se, draws.num_samples, "elbo", {
        "expected_log_likelihood": lik, "expected_log_likelihood_se": lik_se,
        "kl": kl, "kl_se": kl_se, "vectorized": draws.vectorized,
    })


def iwae(model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
         num_samples: int = 1000, chunk_size: int | None = 100,
         vectorize: bool | None = None, **kwargs: Any) -> Estimate:
    r"""Importance-weighted bound (Burda et al. 2016) with ESS and the PSIS :math:`\hat k`.

    .. math::

        \mathcal L_K = \log \frac1K \sum_{k=1}^K \frac{p(D, z_k)}{q(z_k)},
        \quad z_k \sim q, \qquad \mathrm{ELBO} \le \mathbb E\,\mathcal L_K \le \log p(D),

    tighter as K grows. The draws are vectorised in chunks of ``chunk_size``
    so K = 10^4 fits in memory. The standard error is the delta-method one,
    :math:`\mathrm{sd}(\tilde w) / (\sqrt K\, \bar{\tilde w})`. Diagnostics: the
    effective sample size :math:`(\sum w)^2/\sum w^2` and the Pareto
    :math:`\hat k` of the log weights (Yao et al. 2018), with a warning when
    :math:`\hat k > 0.7`. Use it to evaluate :math:`q`, not to train it.

    References
    ----------
    Y. Burda, R. Grosse, R. Salakhutdinov. Importance weighted autoencoders. ICLR 2016.
    Y. Yao, A. Vehtari, D. Simpson, A. Gelman. Yes, but did it work?: evaluating
    variational inference. ICML 2018.
    """
    _check_model_and_guide(model, guide, "iwae")
    draws = draw(model, guide, args, kwargs, num_samples=num_samples, chunk_size=chunk_size,
                 vectorize=vectorize, what="The importance-weighted bound")
    log_w = draws.log_weights.double()
    k = log_w.numel()
    value = float(torch.logsumexp(log_w, 0) - math.log(k))
    w = (log_w - log_w.max()).exp()
    se = float(w.std() / (math.sqrt(k) * w.mean())) if k > 1 else math.nan
    ess = float(w.sum() ** 2 / (w**2).sum())
    khat = psis_khat(log_w)
    return Estimate(value, se, k, "iwae", {
        "ess": ess, "khat": khat.value, "vectorized": draws.vectorized})


