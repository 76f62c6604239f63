r"""K-fold cross-validation: held-out log predictive density, the classical rival of the evidence.

The data are split into K folds :math:`D_1, \dots, D_K`; for each fold the
posterior is computed (or fitted by SVI) on the other folds
:math:`D_{-k}`, and the held-out data are scored by the posterior predictive
density. Two scores are offered:

- joint (default): :math:`\mathrm{CV} = \sum_k \ln p(D_k \mid D_{-k})`, the
  density of each held-out fold as a whole. It is on the scale of a log
  evidence, which by the chain rule is :math:`\ln p(D) = \sum_k \ln p(D_k \mid D_{<k})`:
  the evidence scores each fold given the *previous* folds, cross-validation
  given *all the others*.
- pointwise: :math:`\sum_k \sum_{i \in D_k} \ln p(y_i \mid D_{-k})`, the
  expected log pointwise predictive density (elpd) that ``arviz.loo``
  estimates for K = N.

The standard error is the spread of the per-fold scores: with fold sizes
:math:`n_k` and per-observation fold scores :math:`v_k / n_k`,

.. math::

    \mathrm{se} = N \, \mathrm{sd}_k(v_k / n_k) / \sqrt K

(:math:`\sqrt K\,\mathrm{sd}_k(v_k)` for equal folds), which treats the folds
as independent; it ignores the correlation between folds that share training
data, so it is an approximation (no unbiased estimator of the variance of
K-fold CV exists: Bengio & Grandvalet, JMLR 2004).

:func:`blr_cross_validation` is the closed form for Bayesian linear
regression; :func:`cross_validation` does the same for any Pyro model whose
data tensors share dimension 0, fitting :math:`q` by SVI on each training
part and estimating :math:`\ln p(D_k \mid D_{-k}) \approx
\ln \frac1S \sum_s p(D_k \mid z_s)`, :math:`z_s \sim q_{-k}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.optim
import torch
from torch import nn

from ..infer.distributed import map_over_ranks
from ..infer.guides import build_guide
from ..infer.optim import as_pyro_optimizer
from ..infer.scope import clone_param_state, module_params_kept
from ..infer.svi import fit
from ..model.sites import structural_sites
from ..util.ranks import resolve_distributed
from ..util.sampling import draw, trace_model
from ..util.minibatch import scoring_kwargs
from ..util.validation import check_inputs, check_seed, own_parameters
from .estimate import Estimate
from .exact import as_feature_matrix, as_precisions, as_targets, posterior_from_tensors

#: ``Estimate.method`` of cross-validation.
CROSS_VALIDATION = "cross_validation"


def kfold_indices(num_data: int, folds: int | Sequence[Any] = 5, *, seed: int | None = None
                  ) -> list[torch.Tensor]:
    """Indices of the held-out observations of each fold.

    Parameters
    ----------
    num_data : int
        Number of observations N.
    folds : int or sequence of index arrays
        An int K (2 ≤ K ≤ N): a random permutation of ``range(N)`` cut into K
        folds whose sizes differ by at most one (K = N is leave-one-out). A
        sequence: the held-out indices of each fold, used as given (disjoint,
        non-empty, within ``range(N)``; observations in no fold are always
        training data).
    seed : int, optional
        Seed of the permutation; ``None`` draws it from torch's global RNG.

    Returns
    -------
    list of LongTensor
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 2:
        raise ValueError(f"Cross-validation needs at least 2 observations, but got {num_data!r}.")
    if isinstance(folds, bool):
        raise ValueError(f"Expected folds to be an int or a sequence of index arrays, but got "
                         f"{folds!r}.")
    if isinstance(folds, int):
        if not 2 <= folds <= num_data:
            raise ValueError(f"Expected 2 <= folds <= {num_data} (the number of observations), "
                             f"but got folds={folds}.")
        generator = torch.Generator()
        if seed is None:
            generator.manual_seed(int(torch.randint(0, 2 ** 62, ())))
        else:
            generator.manual_seed(int(seed))
        order = torch.randperm(num_data, generator=generator)
        return [part.sort().values for part in torch.tensor_split(order, folds)]
    parts = []
    seen = torch.zeros(num_data, dtype=torch.bool)
    for k, part in enumerate(folds):
        index = torch.as_tensor(part).reshape(-1)
        if index.numel() == 0:
            raise ValueError(f"Fold {k} is empty.")
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise ValueError(f"Expected fold {k} to hold integer indices, but got dtype "
                             f"{index.dtype}.")
        index = index.long()
        if bool(((index < 0) | (index >= num_data)).any()):
            raise ValueError(f"Fold {k} has indices outside range({num_data}).")
        if bool(seen[index].any()) or index.unique().numel() != index.numel():
            raise ValueError(f"Fold {k} repeats indices of itself or of an earlier fold; folds "
                             "must be disjoint.")
        seen[index] = True
        parts.append(index)
    if len(parts) < 2:
        raise ValueError(f"Expected at least 2 folds, but got {len(parts)}.")
    return parts


def training_index(num_data: int, test: torch.Tensor) -> torch.Tensor:
    """The rows of ``range(num_data)`` that are not in ``test``, in order."""
    mask = torch.ones(num_data, dtype=torch.bool)
    mask[test] = False
    return mask.nonzero().squeeze(-1)


def _summarise(fold_values: list[float], fold_sizes: list[int], pointwise: bool,
               num_samples: int, diagnostics: dict[str, Any]) -> Estimate:
    values = torch.tensor(fold_values, dtype=torch.float64)
    sizes = torch.tensor(fold_sizes, dtype=torch.float64)
    total, num = float(values.sum()), int(sizes.sum())
    k = values.numel()
    se = float(num * (values / sizes).std(unbiased=True) / math.sqrt(k)) if k > 1 else math.nan
    out = {"fold_values": fold_values, "fold_sizes": fold_sizes, "num_folds": k,
           "num_held_out": num, "per_observation": total / num,
           "score": "pointwise" if pointwise else "joint"}
    out.update(diagnostics)
    return Estimate(total, se, num_samples, CROSS_VALIDATION, out)


def blr_cross_validation(features: Any, targets: Any, *, folds: int | Sequence[Any] = 5,
                         prior_precision: Any, noise_precision: float,
                         seed: int | None = None, pointwise: bool = False) -> Estimate:
    r"""K-fold cross-validation of Bayesian linear regression, in closed form.

    For each fold k the exact posterior :math:`\mathcal N(m_{-k}, S_{-k})` is
    computed from the other folds (see :func:`~pyro_structsel.evidence.exact.blr_posterior`)
    and the held-out targets are scored by the exact posterior predictive

    .. math::

        \ln p(t_k \mid D_{-k}) = \ln \mathcal N\big(t_k \,\big|\, \Phi_k m_{-k},\;
        \beta^{-1} I + \Phi_k S_{-k} \Phi_k^\top\big)

    (``pointwise=True``: the sum of the marginal log densities of the held-out
    targets instead).

    Parameters
    ----------
    features, targets, prior_precision, noise_precision
        As in :func:`~pyro_structsel.evidence.exact.blr_log_evidence`.
    folds : int or sequence of index arrays
        See :func:`kfold_indices`.
    seed : int, optional
        Seed of the split into folds.
    pointwise : bool
        Score each held-out target alone (elpd) instead of each fold jointly.

    Returns
    -------
    Estimate
        ``method="cross_validation"``; ``value`` = total held-out log
        predictive density over all folds (nats, on the scale of a log
        evidence); ``se`` = :math:`N\,\mathrm{sd}_k(v_k/n_k)/\sqrt K` from the
        per-fold scores :math:`v_k` (see the module docstring);
        ``num_samples=0`` (closed form). ``diagnostics``: ``fold_values``,
        ``fold_sizes``, ``folds`` (held-out indices), ``num_folds``,
        ``num_held_out``, ``per_observation`` (value / number held out),
        ``score`` (``"joint"`` or ``"pointwise"``).
    """
    phi = as_feature_matrix(features)
    t = as_targets(targets, phi.shape[0])
    alpha, beta = as_precisions(prior_precision, noise_precision, phi.shape[1])
    parts = kfold_indices(phi.shape[0], folds, seed=seed)
    fold_values, fold_sizes = [], []
    for test in parts:
        train = training_index(phi.shape[0], test)
        post = posterior_from_tensors(phi[train], t[train], alpha, beta)
        score = post.log_predictive(phi[test], t[test], pointwise=pointwise)
        fold_values.append(float(score.sum()))
        fold_sizes.append(int(test.numel()))
    return _summarise(fold_values, fold_sizes, pointwise, 0, {"folds": parts})


def num_data_rows(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """The common size of dimension 0 of the tensor arguments (those with dim ≥ 1)."""
    sizes = {}
    for i, value in enumerate(args):
        if torch.is_tensor(value) and value.dim() >= 1:
            sizes[f"args[{i}]"] = value.shape[0]
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.dim() >= 1:
            sizes[key] = value.shape[0]
    if not sizes:
        raise ValueError("cross_validation found no data: pass the data as tensor arguments "
                         "(positional or keyword) with one row per observation.")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"cross_validation splits every tensor argument along dimension 0, "
                         f"but their sizes differ: {sizes}. Bind tensors that are not data "
                         "(e.g. with functools.partial) so that only data tensors are passed.")
    return next(iter(sizes.values()))


def subset_rows(args: tuple, kwargs: Mapping[str, Any], index: torch.Tensor
                ) -> tuple[tuple, dict[str, Any]]:
    """The rows ``index`` of every tensor argument with dim ≥ 1 (others pass as they are)."""

    def take(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() >= 1:
            return value.index_select(0, index.to(value.device))
        return value

    return tuple(take(v) for v in args), {key: take(v) for key, v in kwargs.items()}


def _check_global_latents(trace: Any, num_data: int) -> None:
    """Held-out points have no q of their own: reject latents local to the data plate."""
    data_plates = {frame.name for name in trace.observation_nodes
                   for frame in trace.nodes[name]["cond_indep_stack"]
                   if frame.vectorized and (frame.full_size or frame.size) == num_data}
    for name in trace.stochastic_nodes:
        local = [f.name for f in trace.nodes[name]["cond_indep_stack"] if f.name in data_plates]
        if local:
            raise ValueError(f"Latent site {name!r} is local to the data plate {local[0]!r}: "
                             "cross_validation needs a model whose latents are global (a "
                             "held-out observation has no fitted q of its own local latents).")


def _log_mean_exp(log_values: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\ln \\frac1S \\sum_s e^{l_s}` along ``dim`` and its delta-method standard error."""
    log_values = log_values.double()
    num = log_values.shape[dim]
    value = torch.logsumexp(log_values, dim) - math.log(num)
    weights = (log_values - value.unsqueeze(dim)).exp()  # mean 1 along dim
    se = weights.std(dim, unbiased=True) / math.sqrt(num) if num > 1 else torch.full_like(
        value, math.nan)
    return value, se


def cross_validation(model: Callable[..., Any], *args: Any, folds: int | Sequence[Any] = 5,
                     num_steps: int = 1000, guide: Any = None, lr: float = 0.01,
                     optim: pyro.optim.PyroOptim | None = None,
                     num_particles: int = 1, num_samples: int = 1000,
                     chunk_size: int | None = None, pointwise: bool = False,
                     seed: int | None = None, progress: bool = False,
                     memory_budget: int | None = None, distributed: bool | None = None,
                     **kwargs: Any) -> Estimate:
    r"""K-fold cross-validation of any Pyro model, with :math:`q` fitted by SVI on each fold.

    Every tensor argument of ``model(*args, **kwargs)`` with at least one
    dimension (``x``, ``y``, ...) is data and is split along dimension 0;
    other arguments are passed unchanged to every fit. For each fold k:

    1. fit :math:`q_{-k}` by SVI (:func:`pyro_structsel.infer.svi.fit`,
       ``Trace_ELBO``, Adam with learning rate ``lr`` or ``optim``) on the other folds,
       with the guide of :func:`~pyro_structsel.select_structure` (``guide=None``:
       :class:`~pyro_structsel.AutoStructure` for structural sites, which are
       thereby averaged over, plus ``AutoNormal`` for the rest);
    2. draw :math:`z_s \sim q_{-k}`, :math:`s = 1..S`, score the model on the
       held-out fold and estimate

       .. math:: \ln p(D_k \mid D_{-k}) \approx \ln \frac1S \sum_{s=1}^S p(D_k \mid z_s)

       (``pointwise=True``: :math:`\sum_{i \in D_k} \ln \frac1S \sum_s p(y_i \mid z_s)`).

    The estimate has a downward Monte Carlo bias (Jensen) that vanishes as
    S grows; it is small when :math:`p(D_k \mid z)` varies little under
    :math:`q` (its delta-method standard error is in ``diagnostics``). The
    latents must be global (none inside the data plate); each fold starts
    from the model's own parameter values and a fresh guide.

    Parameters
    ----------
    model : callable
        A Pyro model whose data arguments share dimension 0.
    *args, **kwargs
        Passed to the model (split by fold where they are data tensors).
    folds : int or sequence of index arrays
        See :func:`kfold_indices`.
    num_steps : int
        SVI steps per fold.
    guide : AutoGuide class, guide function or None
        As in :func:`~pyro_structsel.select_structure`, built afresh on each
        fold (a guide function's ``pyro.param`` values start afresh too). A
        guide *object* (an AutoGuide instance) is refused: it would carry its
        parameters from one fold to the next.
    lr : float
        Learning rate of the default optimiser, ``pyro.optim.Adam({"lr": lr})``.
    optim : pyro.optim.PyroOptim, optional
        Optimiser instead (its per-parameter state starts afresh on each fold,
        e.g. ``ClippedAdam({"lr": 0.05, "lrd": 0.99})`` decays anew).
    num_particles : int
        ELBO particles per SVI step.
    num_samples : int
        Draws S from each :math:`q_{-k}`.
    chunk_size : int, optional
        At most this many draws per vectorised pass.
    memory_budget : int, optional
        Bytes one vectorised pass of held-out draws may use (default a quarter
        of the available memory; see :func:`~pyro_structsel.util.sampling.draw`).
    pointwise : bool
        Score each held-out observation alone (elpd) instead of each fold jointly.
    seed : int, optional
        Seed of the split and of every fit (fold k is fitted with seed
        ``seed + k``); equal seeds give equal results.
    progress : bool
        Show a progress bar for each fit.
    distributed : bool, optional
        Share the folds out over the ranks of a ``torchrun`` job (each fold
        fitted on one rank, the estimate gathered on every rank; with a
        ``seed``, equal to the estimate of one process). ``None``: when a
        process group is initialised; ``True``: also create it from
        ``torchrun``'s environment; ``False``: every fold in this process.

    Returns
    -------
    Estimate
        ``method="cross_validation"``; ``value`` = total held-out log
        predictive density; ``se`` from the per-fold spread (module docstring);
        ``num_samples`` = S × K draws. ``diagnostics`` as in
        :func:`blr_cross_validation`, plus ``monte_carlo_se`` (of ``value``,
        from the draws), ``fold_monte_carlo_se``, ``final_losses`` (mean loss
        of the last tenth of each fit) and ``vectorized``.

    Example
    -------
    >>> model = functools.partial(ps.blr_model, prior_precision=1.0, noise_precision=4.0)
    >>> ps.cross_validation(model, phi, t, folds=5, num_steps=2000, seed=0)
    """
    for argument, value, low in (("num_steps", num_steps, 1), ("num_particles", num_particles, 1),
                                 ("num_samples", num_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected {argument} to be an int >= {low}, but got {value!r}.")
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0
            and math.isfinite(lr)):
        raise ValueError(f"Expected lr > 0, but got {lr!r}.")
    if not callable(model):
        raise ValueError(f"Expected model to be a callable Pyro model, but got {model!r}.")
    check_seed(seed)
    if optim is not None:
        as_pyro_optimizer(optim, lr=lr)
    check_inputs(model, args, kwargs, caller="cross_validation",
                 caller_params=own_parameters(cross_validation))
    if isinstance(guide, nn.Module):
        raise ValueError("cross_validation fits a fresh guide on each fold, but got a guide "
                         f"object ({type(guide).__name__}) that keeps its parameters in itself "
                         "and would carry them from fold to fold; pass the AutoGuide class "
                         "(e.g. AutoMultivariateNormal), None, or a guide function that uses "
                         "pyro.param.")
    num_data = num_data_rows(args, kwargs)
    parts = kfold_indices(num_data, folds, seed=seed)

    with module_params_kept(model):  # the model keeps its own parameters
        with pyro.get_param_store().scope() as model_params:  # the model's own parameters
            trace = trace_model(model, args, kwargs)
        sites = structural_sites(trace)
        _check_global_latents(trace, num_data)
        def score_fold(k: int) -> tuple[float, float, float, bool]:
            """Held-out log density of fold ``k``, its Monte Carlo se, final loss, vectorised."""
            test = parts[k]
            train_args, train_kwargs = subset_rows(args, kwargs, training_index(num_data, test))
            test_args, test_kwargs = subset_rows(args, kwargs, test)
            test_kwargs = scoring_kwargs(test_kwargs)  # the whole held-out fold, no minibatch
            if seed is not None:
                pyro.set_rng_seed(seed + k)
            with pyro.get_param_store().scope(clone_param_state(model_params)):
                fitted = build_guide(model, guide, sites, train_args, train_kwargs, None)
                losses = fit(model, fitted, train_args, train_kwargs, num_steps=num_steps,
                             optim=as_pyro_optimizer(optim, lr=lr) if optim is not None
                             else pyro.optim.Adam({"lr": lr}),
                             num_particles=num_particles,
                             progress=progress,
                             description=f"cross_validation[{k + 1}/{len(parts)}]")
                tail = losses[-max(1, num_steps // 10):]

                def trained_guide(*_args: Any, _fitted: Any = fitted,
                                  _a: tuple = train_args, _k: dict = train_kwargs,
                                  **_kwargs: Any) -> Any:
                    return _fitted(*_a, **_k)  # q fitted on the training part, whatever the data

                draws = draw(model, trained_guide, test_args, test_kwargs,
                             num_samples=num_samples, chunk_size=chunk_size,
                             pointwise=pointwise, memory_budget=memory_budget,
                             what="cross_validation's held-out score")
            if pointwise:
                value = torch.zeros((), dtype=torch.float64)
                var = torch.zeros((), dtype=torch.float64)
                for log_lik in draws.pointwise.values():
                    point, point_se = _log_mean_exp(log_lik.reshape(num_samples, -1))
                    value, var = value + point.sum(), var + point_se.pow(2).sum()
                mc_se = float(var.sqrt())
            else:
                value, se = _log_mean_exp(draws.log_likelihood)
                mc_se = float(se)
            return float(value), mc_se, sum(tail) / len(tail), draws.vectorized

        # the folds shared out over the ranks of a torchrun job (one process: in turn)
        scored = map_over_ranks(score_fold, range(len(parts)),
                                enabled=resolve_distributed(distributed),
                                where="cross-validating its folds")
        fold_values = [fold[0] for fold in scored]
        fold_mc_se = [fold[1] for fold in scored]
        final_losses = [fold[2] for fold in scored]
        vectorized = all(fold[3] for fold in scored)
    fold_sizes = [int(test.numel()) for test in parts]
    return _summarise(fold_values, fold_sizes, pointwise, num_samples * len(parts), {
        "folds": parts, "monte_carlo_se": math.sqrt(sum(s * s for s in fold_mc_se)),
        "fold_monte_carlo_se": fold_mc_se, "final_losses": final_losses,
        "vectorized": vectorized,
    })
