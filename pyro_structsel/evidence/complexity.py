r"""Complexities of a fitted model: parametric, structural, description length, classical.

- Parametric complexity :math:`C_\text{param} = \min_h \mathrm{KL}(q(w)\,\|\,p(w \mid h))`,
  in closed form for a Gaussian :math:`q` and a Gaussian prior with one scale
  :math:`h_l` per layer.
- Structural complexity :math:`C_\text{struct} = H(q(\Gamma))`: differential
  entropy of :math:`q(\gamma)` on the simplex and the discrete entropy of the
  induced distribution over vertices, per site and in total.
- Description length :math:`-\mathrm{ELBO}/\ln 2` bits
  :math:`= L(w \mid f) + L(D \mid w, f)`.
- Classical complexity: number of parameters and of superpositions (depth).

References
----------
O. Bakhteev, V. Strijov. Deep learning model selection of suboptimal
complexity. Automation and Remote Control, 2018.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous, AutoGuideList, AutoNormal
from torch import nn

from ..infer.guides import structure_guides
from ..model.bayesian import GROUP_KEY
from ..model.family import GraphFamily, num_parameterised_layers
from ..model.sites import ExpRelaxedCategorical, base_distribution, structural_sites
from ..util.sampling import draw, trace_model
from .estimate import Estimate

LN2 = math.log(2.0)


def _gaussian_prior(name: str, site: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    base = base_distribution(site["fn"])
    if not isinstance(base, dist.Normal):
        raise ValueError(
            f"The parametric complexity has a closed form for Gaussian priors only, but site "
            f"{name!r} has prior {type(base).__name__}."
        )
    shape = site["value"].shape
    return (base.loc.detach().expand(shape).reshape(-1),
            base.scale.detach().expand(shape).reshape(-1))


def _gaussian_parts(guide: Any) -> list[tuple[dict[str, slice], torch.Tensor, torch.Tensor]]:
    """(site slices, mean, covariance or variance vector) of each Gaussian part of ``guide``."""
    if isinstance(guide, AutoGuideList):
        return [part for sub in guide for part in _gaussian_parts(sub)]
    if structure_guides(guide):
        return []
    if isinstance(guide, AutoNormal):
        slices, locs, variances, start = {}, [], [], 0
        for name, _ in guide.prototype_trace.iter_stochastic_nodes():
            loc, scale = guide._get_loc_and_scale(name)
            slices[name] = slice(start, start + loc.numel())
            start += loc.numel()
            locs.append(loc.detach().reshape(-1))
            variances.append(scale.detach().reshape(-1) ** 2)
        return [(slices, torch.cat(locs), torch.cat(variances))]
    if isinstance(guide, AutoContinuous):
        posterior = guide.get_posterior()
        slices, start = {}, 0
        for name, _ in guide.prototype_trace.iter_stochastic_nodes():
            size = guide._unconstrained_shapes[name].numel()
            slices[name] = slice(start, start + size)
            start += size
        if isinstance(posterior, dist.MultivariateNormal):
            return [(slices, posterior.loc.detach(), posterior.covariance_matrix.detach())]
        base = base_distribution(posterior)
        if isinstance(base, dist.Normal):
            return [(slices, base.loc.detach(), base.scale.detach() ** 2)]
    raise ValueError(
        f"The parametric complexity needs a Gaussian guide for the weights (AutoNormal, "
        f"AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal), but "
        f"got {type(guide).__name__}."
    )


def parametric_complexity(model: Callable[..., Any], guide: Any, *args: Any,
                          **kwargs: Any) -> Estimate:
    r"""Closed-form :math:`\min_h \mathrm{KL}(q(w)\,\|\,p(w \mid h))` over per-layer prior scales.

    For :math:`q = \mathcal N(\mu, \Sigma)` and prior
    :math:`\mathcal N(\mu_0, h_l^2 I)` on the :math:`n_l` weights of layer
    :math:`l`,

    .. math::

        \mathrm{KL} = \tfrac12 \Bigl[\sum_l \frac{e_l}{h_l^2} + n_l \log h_l^2
        - \log\det\Sigma - d\Bigr], \quad
        e_l = \mathrm{tr}\,\Sigma_{ll} + \lVert \mu_l - \mu_{0,l} \rVert^2,

    minimised at :math:`h_l^{*2} = e_l / n_l`, where
    :math:`\mathrm{KL}^* = \tfrac12[\sum_l n_l \log h_l^{*2} - \log\det\Sigma]`.
    A layer is the ``structsel_group`` of a site (set by
    :class:`~pyro_structsel.BayesianModule`), or the site itself.

    Returns
    -------
    Estimate
        ``value`` is :math:`\mathrm{KL}^*` in nats; ``diagnostics`` holds
        ``optimal_prior_scale`` and ``current_prior_scale`` per layer,
        ``kl_at_current_prior``, ``kl_per_layer`` (diagonal :math:`q`) and
        ``num_weights``.
    """
    trace = trace_model(model, args, kwargs)
    structural = structural_sites(trace)
    weights = {name: trace.nodes[name] for name in trace.stochastic_nodes
               if name not in structural}
    if not weights:
        raise ValueError("The model has no non-structural latent sites (weights).")
    kl_min = kl_current = 0.0
    energy: dict[str, float] = {}
    count: dict[str, int] = {}
    log_var_sum: dict[str, float] = {}
    current: dict[str, list[float]] = {}
    diagonal = True
    covered: set[str] = set()
    log_det_total = 0.0
    for slices, mean, cov in _gaussian_parts(guide):
        mean = mean.double()
        cov = cov.double()
        var = cov if cov.dim() == 1 else torch.diagonal(cov)
        if cov.dim() == 1:
            log_det = float(var.log().sum())
        else:
            diagonal = False
            log_det = float(torch.linalg.slogdet(cov)[1])
        log_det_total += log_det
        for name, part in slices.items():
            if name not in weights:
                continue
            covered.add(name)
            loc0, scale0 = (t.double() for t in _gaussian_prior(name, weights[name]))
            e = var[part] + (mean[part] - loc0) ** 2
            group = weights[name]["infer"].get(GROUP_KEY, name)
            energy[group] = energy.get(group, 0.0) + float(e.sum())
            count[group] = count.get(group, 0) + e.numel()
            log_var_sum[group] = log_var_sum.get(group, 0.0) + float(var[part].log().sum())
            current.setdefault(group, []).extend(scale0.tolist())
            kl_current += 0.5 * float((e / scale0**2).sum() + (scale0**2).log().sum()
                                      - e.numel())
        kl_current -= 0.5 * log_det
    missing = sorted(set(weights) - covered)
    if missing:
        raise ValueError(f"The guide has no Gaussian factor for weight sites {missing}.")
    optimal = {g: math.sqrt(energy[g] / count[g]) for g in energy}
    kl_min = 0.5 * (sum(count[g] * math.log(energy[g] / count[g]) for g in energy)
                    - log_det_total)
    per_layer = ({g: 0.5 * (count[g] * math.log(energy[g] / count[g]) - log_var_sum[g])
                  for g in energy} if diagonal else {})
    return Estimate(kl_min, 0.0, 0, "closed_form", {
        "optimal_prior_scale": optimal,
        "current_prior_scale": {g: sum(v) / len(v) for g, v in current.items()},
        "kl_at_current_prior": kl_current,
        "kl_per_layer": per_layer,
        "num_weights": sum(count.values()),
    })


def _entropy(probs: torch.Tensor) -> float:
    p = probs[probs > 0].double()
    return float(-(p * p.log()).sum())


def structural_complexity(model: Callable[..., Any], guide: Any, *args: Any,
                          num_samples: int = 10000, **kwargs: Any) -> Estimate:
    r"""Entropy of :math:`q(\Gamma)`: differential, and discrete over vertices, per site.

    For a Dirichlet guide the differential entropy is analytic; for a
    Concrete guide in log space it is the Monte Carlo estimate
    :math:`H(\gamma) = -\mathbb E[\log q(y)] + \mathbb E[\textstyle\sum_k y_k]`
    with :math:`y = \log\gamma` (the second term is the Jacobian of
    :math:`\gamma = e^y`), finite at any temperature. The induced distribution
    over vertices is :math:`P(\arg\max_k \gamma_k = k)`: exactly
    :math:`\mathrm{softmax}(\ell)` for the Concrete (Gumbel-max), Monte Carlo
    otherwise. Totals sum over sites (exact for a factorised :math:`q(\Gamma)`,
    an upper bound otherwise). Differential entropy needs
    :class:`~pyro_structsel.AutoStructure` (or a guide built on it); for other
    guides it is reported as NaN and only the vertex distribution is given.

    Returns
    -------
    Estimate
        ``value``: total differential entropy (nats); ``diagnostics``:
        ``vertex_entropy`` (total, nats) and ``sites``: per site
        ``differential_entropy``, ``differential_entropy_se``,
        ``vertex_entropy`` and ``probabilities``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"Expected num_samples to be an int >= 2, but got {num_samples!r}.")
    trace = trace_model(model, args, kwargs)
    sites = structural_sites(trace)
    if not sites:
        raise ValueError("The model has no structural site (a latent site on the simplex).")
    analytic = {}
    for part in structure_guides(guide):
        for name, _ in part.prototype_trace.iter_stochastic_nodes():
            analytic[name] = part.posterior(name)
    others = [name for name in sites if name not in analytic]
    sampled = (draw(model, guide, args, kwargs, num_samples=min(num_samples, 2000),
                    keep=others).values if others else {})
    per_site: dict[str, dict[str, Any]] = {}
    total_h, total_var, total_vertex = 0.0, 0.0, 0.0
    with torch.no_grad():
        for name, site in sites.items():
            fn = analytic.get(name)
            h, h_se = math.nan, math.nan
            if fn is None:
                gamma = site.to_simplex(sampled[name]).reshape(-1, site.num_options)
                probs = torch.bincount(gamma.argmax(-1), minlength=site.num_options) / len(gamma)
            elif isinstance(fn, dist.Dirichlet):
                h, h_se = float(fn.entropy().sum()), 0.0
                counts = fn.sample((num_samples,)).argmax(-1).reshape(-1)
                probs = torch.bincount(counts, minlength=site.num_options) / counts.numel()
            else:
                y = fn.sample((num_samples,))
                terms = -fn.log_prob(y)
                if isinstance(fn, ExpRelaxedCategorical):
                    terms = terms + y.sum(-1)
                terms = terms.reshape(num_samples, -1).sum(-1).double()
                h, h_se = float(terms.mean()), float(terms.std() / math.sqrt(num_samples))
                probs = torch.softmax(fn.logits, -1).reshape(-1, site.num_options).mean(0)
            vertex = _entropy(probs)
            per_site[name] = {"differential_entropy": h, "differential_entropy_se": h_se,
                              "vertex_entropy": vertex, "probabilities": probs.tolist()}
            total_h += h
            total_var += h_se**2
            total_vertex += vertex
    return Estimate(total_h, math.sqrt(total_var), num_samples, "entropy",
                    {"vertex_entropy": total_vertex, "sites": per_site})


@dataclass(frozen=True)
class DescriptionLength:
    r"""Minimum description length :math:`-\mathrm{ELBO}/\ln 2` in bits, split in two.

    Attributes
    ----------
    total_bits : float
        :math:`-\mathrm{ELBO} / \ln 2`.
    model_bits : float
        :math:`L(w \mid f) = \mathrm{KL}(q \,\|\, p) / \ln 2`.
    data_bits : float
        :math:`L(D \mid w, f) = -\mathbb E_q \log p(D \mid w, \Gamma) / \ln 2`.
    se_bits : float
        Monte Carlo standard error of ``total_bits``.
    """

    total_bits: float
    model_bits: float
    data_bits: float
    se_bits: float


def description_length(elbo_estimate: Estimate) -> DescriptionLength:
    """Description length from an ``"elbo"`` estimate (see :func:`~pyro_structsel.elbo`)."""
    d = elbo_estimate.diagnostics
    if "kl" not in d or "expected_log_likelihood" not in d:
        raise ValueError("Expected an estimate from pyro_structsel.elbo (with 'kl' and "
                         "'expected_log_likelihood' diagnostics).")
    return DescriptionLength(-elbo_estimate.value / LN2, d["kl"] / LN2,
                             -d["expected_log_likelihood"] / LN2, elbo_estimate.se / LN2)


def classical_complexity(network: nn.Module) -> dict[str, int]:
    """Number of parameters and of superpositions (depth in parameterised layers)."""
    depth = network.depth() if isinstance(network, GraphFamily) else \
        num_parameterised_layers(network)
    return {"num_parameters": sum(p.numel() for p in network.parameters()),
            "num_superpositions": depth}
