r"""Closed forms of Bayesian linear regression: the exact answers estimators are checked against.

The model (Bishop, *PRML* §3.3–3.5), with features :math:`\Phi \in \mathbb R^{N \times M}`,
targets :math:`t \in \mathbb R^N`, prior precisions :math:`\alpha` (one per
weight, or one for all) and noise precision :math:`\beta`:

.. math::

    w \sim \mathcal N(0, \operatorname{diag}(\alpha)^{-1}), \qquad
    t \mid w \sim \mathcal N(\Phi w, \beta^{-1} I_N).

Everything about it is Gaussian, so the posterior, the predictive density and
the evidence have closed forms:

.. math::

    A = \operatorname{diag}(\alpha) + \beta \Phi^\top \Phi, \quad
    m_N = \beta A^{-1} \Phi^\top t, \quad
    p(w \mid t) = \mathcal N(m_N, A^{-1}),

    \ln p(t \mid \alpha, \beta) = \tfrac12 \textstyle\sum_i \ln \alpha_i
    + \tfrac N2 \ln \beta - E(m_N) - \tfrac12 \ln |A| - \tfrac N2 \ln 2\pi,
    \quad E(m_N) = \tfrac\beta2 \|t - \Phi m_N\|^2 + \tfrac12 m_N^\top
    \operatorname{diag}(\alpha) m_N

(PRML eq. 3.86; with one :math:`\alpha` the first term is
:math:`\frac M2 \ln \alpha`). :func:`blr_model` is the same model written in
Pyro, so that any estimator of :mod:`pyro_structsel.evidence` can be run on
it and compared with :func:`blr_log_evidence`. All closed forms compute in
float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from .estimate import Estimate

#: ``Estimate.method`` of the closed-form evidence.
EXACT = "exact"


def as_feature_matrix(features: Any) -> torch.Tensor:
    """The design matrix Φ as float64, checked: real, 2-D, at least one column, finite."""
    phi = torch.as_tensor(features)
    if phi.dtype == torch.bool or phi.is_complex():
        raise ValueError(f"Expected features to be a real matrix, but got dtype {phi.dtype}.")
    if phi.dim() != 2:
        raise ValueError(f"Expected features to be a matrix of shape (num_data, num_features), "
                         f"but got shape {tuple(phi.shape)}.")
    if phi.shape[1] < 1:
        raise ValueError("Expected at least one feature (column of features), but got none.")
    phi = phi.to(torch.float64)
    if not bool(torch.isfinite(phi).all()):
        raise ValueError("features contains NaN or infinite values.")
    return phi


def as_targets(targets: Any, num_data: int) -> torch.Tensor:
    """The targets t as a float64 vector of ``num_data`` finite reals, checked."""
    t = torch.as_tensor(targets)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"Expected targets to be real numbers, but got dtype {t.dtype}.")
    if t.dim() != 1:
        raise ValueError(f"Expected targets to be a vector of shape (num_data,), but got shape "
                         f"{tuple(t.shape)}.")
    if t.shape[0] != num_data:
        raise ValueError(f"features has {num_data} rows but targets has {t.shape[0]} entries; "
                         "pass one target per row.")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("targets contains NaN or infinite values.")
    return t


def as_precisions(prior_precision: Any, noise_precision: Any, num_features: int
                   ) -> tuple[torch.Tensor, float]:
    """The prior precisions as a vector of length ``num_features``, and β as a float."""
    try:
        alpha = torch.as_tensor(prior_precision, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"Expected prior_precision to be a positive number or a vector of "
                         f"{num_features}, but got {prior_precision!r}.") from error
    if alpha.dim() == 0:
        alpha = alpha.expand(num_features)
    elif alpha.shape != (num_features,):
        raise ValueError(f"Expected prior_precision to be a number or a vector of length "
                         f"{num_features} (one per feature), but got shape {tuple(alpha.shape)}.")
    if not bool((torch.isfinite(alpha) & (alpha > 0)).all()):
        raise ValueError(f"Expected prior_precision > 0 and finite, but got {prior_precision!r}.")
    if isinstance(noise_precision, torch.Tensor):
        if noise_precision.numel() != 1:
            raise ValueError(f"Expected noise_precision to be one number, but got shape "
                             f"{tuple(noise_precision.shape)}.")
        noise_precision = float(noise_precision)
    if isinstance(noise_precision, bool) or not isinstance(noise_precision, (int, float)) \
            or not (math.isfinite(noise_precision) and noise_precision > 0):
        raise ValueError(f"Expected noise_precision > 0 and finite, but got {noise_precision!r}.")
    return alpha.clone(), float(noise_precision)


@dataclass(frozen=True)
class BLRPosterior:
    r"""Posterior :math:`\mathcal N(m_N, A^{-1})` of Bayesian linear regression (float64).

    Attributes
    ----------
    mean : Tensor
        :math:`m_N`, shape ``(M,)``.
    covariance : Tensor
        :math:`S_N = A^{-1}`, shape ``(M, M)``.
    precision_cholesky : Tensor
        Lower Cholesky factor of :math:`A`.
    prior_precision : Tensor
        :math:`\alpha`, shape ``(M,)``.
    noise_precision : float
        :math:`\beta`.
    """

    mean: torch.Tensor
    covariance: torch.Tensor
    precision_cholesky: torch.Tensor
    prior_precision: torch.Tensor
    noise_precision: float

    def log_predictive(self, features: Any, targets: Any, *, pointwise: bool = False
                       ) -> torch.Tensor:
        r"""Log posterior predictive density of new data.

        ``pointwise=False``: the joint density
        :math:`\ln \mathcal N(t \mid \Phi m_N, \beta^{-1} I + \Phi S_N \Phi^\top)` (a scalar);
        ``pointwise=True``: the marginal density of each target,
        :math:`\ln \mathcal N(t_i \mid \phi_i^\top m_N, \beta^{-1} + \phi_i^\top S_N \phi_i)`
        (shape ``(n,)``).
        """
        phi = as_feature_matrix(features)
        if phi.shape[1] != self.mean.shape[0]:
            raise ValueError(f"Expected {self.mean.shape[0]} features, but got {phi.shape[1]}.")
        t = as_targets(targets, phi.shape[0])
        loc = phi @ self.mean
        if pointwise:
            var = 1.0 / self.noise_precision + ((phi @ self.covariance) * phi).sum(-1)
            return -0.5 * ((t - loc) ** 2 / var + var.log() + math.log(2 * math.pi))
        cov = phi @ self.covariance @ phi.T
        cov = 0.5 * (cov + cov.T) + torch.eye(phi.shape[0], dtype=cov.dtype) / self.noise_precision
        return torch.distributions.MultivariateNormal(loc, covariance_matrix=cov).log_prob(t)


def blr_posterior(features: Any, targets: Any, *, prior_precision: Any,
                  noise_precision: float) -> BLRPosterior:
    r"""The exact posterior :math:`p(w \mid t) = \mathcal N(m_N, A^{-1})` (PRML eqs. 3.53–3.54).

    Parameters are those of :func:`blr_log_evidence`.
    """
    phi = as_feature_matrix(features)
    t = as_targets(targets, phi.shape[0])
    alpha, beta = as_precisions(prior_precision, noise_precision, phi.shape[1])
    return posterior_from_tensors(phi, t, alpha, beta)


def posterior_from_tensors(phi: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor,
                           beta: float) -> BLRPosterior:
    r""":func:`blr_posterior` of already checked float64 tensors (PRML eqs. 3.53-3.54).

    :math:`A = \mathrm{diag}(\alpha) + \beta \Phi^\top\Phi`, :math:`m_N = \beta A^{-1}\Phi^\top t`.
    """
    precision = torch.diag(alpha) + beta * (phi.T @ phi)
    chol, info = torch.linalg.cholesky_ex(precision)
    if int(info) != 0:
        raise ValueError("The posterior precision diag(α) + βΦᵀΦ is not numerically positive "
                         "definite; rescale the features or raise prior_precision.")
    mean = beta * torch.cholesky_solve((phi.T @ t).unsqueeze(-1), chol).squeeze(-1)
    covariance = torch.cholesky_inverse(chol)
    return BLRPosterior(mean, covariance, chol, alpha, beta)


def blr_log_evidence(features: Any, targets: Any, *, prior_precision: Any,
                     noise_precision: float) -> Estimate:
    r"""Closed-form log evidence :math:`\ln p(t \mid \alpha, \beta)` of Bayesian linear regression.

    PRML eq. 3.86, generalised to one prior precision per weight:

    .. math::

        \ln p(t \mid \alpha, \beta) = \tfrac12 \textstyle\sum_{i=1}^M \ln \alpha_i
        + \tfrac N2 \ln \beta - E(m_N) - \tfrac12 \ln |A| - \tfrac N2 \ln 2\pi,

    with :math:`A = \operatorname{diag}(\alpha) + \beta \Phi^\top \Phi`,
    :math:`m_N = \beta A^{-1} \Phi^\top t` and
    :math:`E(m_N) = \frac\beta2 \|t - \Phi m_N\|^2 + \frac12 m_N^\top
    \operatorname{diag}(\alpha) m_N`. Computed in float64 through the
    Cholesky factor of :math:`A`.

    Parameters
    ----------
    features : Tensor or array, shape ``(N, M)``
        Design matrix :math:`\Phi` (one row :math:`\phi(x_n)^\top` per observation).
    targets : Tensor or array, shape ``(N,)``
        Targets :math:`t`.
    prior_precision : float or Tensor of shape ``(M,)``
        :math:`\alpha`: precision of the Gaussian prior of every weight, or
        one precision per weight (per basis function).
    noise_precision : float
        :math:`\beta`: precision of the Gaussian noise.

    Returns
    -------
    Estimate
        ``method="exact"``, ``se=0``, ``num_samples=0``; ``diagnostics`` holds
        ``posterior_mean`` (:math:`m_N`), ``posterior_covariance``
        (:math:`A^{-1}`), ``effective_num_parameters``
        (:math:`\gamma = M - \operatorname{tr}(\operatorname{diag}(\alpha) A^{-1})`,
        PRML eq. 3.91 for one α), ``data_fit`` (:math:`\frac\beta2 \|t - \Phi m_N\|^2`),
        ``weight_penalty`` (:math:`\frac12 m_N^\top \operatorname{diag}(\alpha) m_N`),
        ``log_det_precision`` (:math:`\ln |A|`), ``num_data``, ``num_features``.

    Raises
    ------
    ValueError
        On shapes that do not match, non-finite values or non-positive precisions.

    Example
    -------
    >>> x = torch.rand(20)
    >>> phi = torch.stack([x ** k for k in range(4)], -1)
    >>> ps.blr_log_evidence(phi, torch.sin(6.28 * x), prior_precision=5e-3,
    ...                     noise_precision=11.1).value
    """
    phi = as_feature_matrix(features)
    t = as_targets(targets, phi.shape[0])
    alpha, beta = as_precisions(prior_precision, noise_precision, phi.shape[1])
    num_data, num_features = phi.shape
    post = posterior_from_tensors(phi, t, alpha, beta)
    residual = t - phi @ post.mean
    data_fit = 0.5 * beta * float(residual @ residual)
    weight_penalty = 0.5 * float((alpha * post.mean ** 2).sum())
    log_det = 2.0 * float(post.precision_cholesky.diagonal().log().sum())
    value = (0.5 * float(alpha.log().sum()) + 0.5 * num_data * math.log(beta)
             - data_fit - weight_penalty - 0.5 * log_det - 0.5 * num_data * math.log(2 * math.pi))
    gamma = num_features - float((alpha * post.covariance.diagonal()).sum())
    return Estimate(value, 0.0, 0, EXACT, {
        "posterior_mean": post.mean, "posterior_covariance": post.covariance,
        "effective_num_parameters": gamma, "data_fit": data_fit,
        "weight_penalty": weight_penalty, "log_det_precision": log_det,
        "num_data": num_data, "num_features": num_features,
    })


def polynomial_features(x: Any, degree: int) -> torch.Tensor:
    r"""The design matrix :math:`[1, x, x^2, \dots, x^{\text{degree}}]` of a vector ``x``.

    Shape ``(len(x), degree + 1)``, in the dtype of ``x`` (float64 for
    non-float input).
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"Expected degree to be an int >= 0, but got {degree!r}.")
    x = torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"Expected x to be a vector, but got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    return x.unsqueeze(-1) ** torch.arange(degree + 1, dtype=x.dtype)


def blr_model(features: torch.Tensor, targets: torch.Tensor | None = None, *,
              prior_precision: Any, noise_precision: float) -> torch.Tensor:
    r"""Bayesian linear regression as a Pyro model (the model of :func:`blr_log_evidence`).

    One latent site ``"w"`` (shape ``(M,)``, prior
    :math:`\mathcal N(0, \operatorname{diag}(\alpha)^{-1})`), a ``pyro.plate``
    ``"data"`` over the rows of ``features`` and an observed site ``"y"``
    :math:`\sim \mathcal N(\phi_n^\top w, \beta^{-1})`. Safe for vectorised
    draws (a leading batch of ``w`` broadcasts). Bind the precisions with
    ``functools.partial`` to get a ``model(features, targets)``.

    Returns the mean :math:`\Phi w`.
    """
    num_features = features.shape[-1]
    alpha = torch.as_tensor(prior_precision, dtype=features.dtype)
    if alpha.dim() == 0:
        alpha = alpha.expand(num_features)
    w = pyro.sample("w", dist.Normal(torch.zeros(num_features, dtype=features.dtype),
                                     alpha.rsqrt()).to_event(1))
    # w has shape (..., 1, M) under an outer plate: (Φ * w).sum(-1) puts its batch
    # against the data dimension, so the mean is (..., N) and broadcasts with the plate
    mean = (features * w).sum(-1)
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Normal(mean, noise_precision ** -0.5), obs=targets)
    return mean
