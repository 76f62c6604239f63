r"""Plots of a structure-selection fit (matplotlib): posterior over Γ, simplex, ELBO, evidence.

Every function takes a :class:`~pyro_structsel.SelectionResult` or the
``InferenceData`` of :func:`~pyro_structsel.to_inference_data` (the
comparison chart takes a table), draws on ``ax`` (a new figure when
``None``), saves the figure when ``path`` is given, and returns the Axes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..infer.convergence import elbo_convergence
from ..util.sampling import draw_guide, max_plate_nesting
from .fitted import FittedSelection
from .inference_data import prior_draws

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes


_POSTERIOR = "C0"
_PRIOR = "0.6"


def _pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _is_inference_data(data: Any) -> bool:
    return hasattr(data, "groups") and hasattr(data, "posterior")


def _save(ax: Axes, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        ax.figure.savefig(os.fspath(path), dpi=120, bbox_inches="tight")


def _site_draws(data: Any, sites: Sequence[str] | None, num_samples: int
                ) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Site → (draws of γ with shape (n, ..., K), option labels)."""
    if _is_inference_data(data):
        posterior = data.posterior
        names = list(sites) if sites is not None else [
            name for name in posterior.data_vars
            if posterior[name].dims and posterior[name].dims[-1] == f"{name}_option"]
        out = {}
        for name in names:
            if name not in posterior:
                raise ValueError(f"No structural site {name!r} in the posterior; it has "
                                 f"{sorted(posterior.data_vars)}.")
            array = posterior[name]
            values = array.values.reshape((-1,) + array.shape[2:])
            out[name] = (values, [str(v) for v in array[array.dims[-1]].values])
        return out
    result = data
    names = list(sites) if sites is not None else list(result.sites)
    unknown = [name for name in names if name not in result.sites]
    if unknown:
        raise ValueError(f"Unknown structural sites {unknown}; the fit has {list(result.sites)}.")
    with result.param_scope(), torch.no_grad():
        nesting = max_plate_nesting(result.model, result.args, result.kwargs)
        drawn = draw_guide(result.guide, result.args, result.kwargs, names,
                           num_samples=num_samples, nesting=nesting)
    return {name: (result.sites[name].to_simplex(drawn[name]).detach().cpu().numpy(),
                   result.sites[name].option_names()) for name in names}


def _chosen(data: Any, name: str, labels: list[str], probs: np.ndarray) -> int:
    if not _is_inference_data(data):
        chosen = data.structure.get(name)
        if chosen is not None:
            return data.sites[name].index(chosen)
    return int(np.argmax(probs))


def plot_structure_posterior(data: FittedSelection | Any, *, sites: Sequence[str] | None = None,
                             interval: float = 0.9, num_samples: int = 1000,
                             ax: Axes | Sequence[Axes] | None = None,
                             path: str | os.PathLike[str] | None = None) -> Any:
    r"""Posterior over Γ: per site and option, :math:`q(\text{option chosen})` and :math:`\gamma`.

    For each option :math:`k` of a structural site, one bar is the posterior
    probability that :math:`k` is the chosen vertex,
    :math:`q(\arg\max_j\gamma_j = k)`, and the other the posterior mean of
    :math:`\gamma_k` with an equal-tailed ``interval`` (90% by default). The
    chosen option is marked with a star.

    Parameters
    ----------
    data : SelectionResult or arviz.InferenceData
        A fit, or its export (draws are read from its ``posterior``).
    sites : sequence of str, optional
        Structural sites to plot (default: all).
    interval : float
        Probability mass of the interval on :math:`\gamma_k`, in (0, 1).
    num_samples : int
        Draws from :math:`q` (for a ``SelectionResult``).
    ax : Axes or sequence of Axes, optional
        One Axes per site; a new figure when ``None``.
    path : path, optional
        Save the figure there (PNG by the extension).

    Returns
    -------
    matplotlib.axes.Axes, or a numpy array of them for several sites

    Example
    -------
    >>> ps.plot_structure_posterior(result, path="gamma.png")
    """
    if not 0 < interval < 1:
        raise ValueError(f"Expected 0 < interval < 1, but got {interval!r}.")
    draws = _site_draws(data, sites, num_samples)
    if not draws:
        raise ValueError("No structural site to plot.")
    plt = _pyplot()
    created = ax is None
    if ax is None:
        widths = [max(3.0, 0.9 * len(labels) + 1.5) for _, labels in draws.values()]
        fig, axes = plt.subplots(1, len(draws), figsize=(sum(widths), 3.6), squeeze=False,
                                 gridspec_kw={"width_ratios": widths})
        axes = axes[0]
    else:
        axes = np.atleast_1d(np.asarray(ax, dtype=object))
        if len(axes) != len(draws):
            raise ValueError(f"Expected {len(draws)} Axes (one per site), but got {len(axes)}.")
    low, high = (1 - interval) / 2, (1 + interval) / 2
    for axis, (name, (values, labels)) in zip(axes, draws.items()):
        gamma = values.reshape(-1, values.shape[-1])
        k = gamma.shape[-1]
        probs = np.bincount(gamma.argmax(-1), minlength=k) / gamma.shape[0]
        if not _is_inference_data(data) and values.ndim == 2:
            probs = data.probabilities[name].detach().cpu().numpy()
        mean = gamma.mean(0)
        lo, hi = np.quantile(gamma, low, axis=0), np.quantile(gamma, high, axis=0)
        x = np.arange(k)
        axis.bar(x - 0.2, probs, width=0.4, color=_POSTERIOR,
                 label=r"$q(\mathrm{argmax}\,\gamma = k)$: option chosen")
        axis.bar(x + 0.2, mean, width=0.4, color="C1", alpha=0.8,
                 label=rf"$\mathbb{{E}}_q\,\gamma_k$, {100 * interval:g}% interval")
        axis.errorbar(x + 0.2, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="k",
                      capsize=3, lw=1)
        chosen = _chosen(data, name, labels, probs)
        axis.plot([chosen - 0.2], [min(probs[chosen] + 0.06, 1.07)], marker="*", color="k",
                  markersize=10, linestyle="none", label="chosen")
        axis.set_xticks(x)
        if max(map(len, labels)) > 8:
            axis.set_xticklabels(labels, rotation=20, ha="right", rotation_mode="anchor")
        else:
            axis.set_xticklabels(labels)
        axis.set_ylim(0, 1.12)
        axis.set_title(f"{name}")
        if axis is axes[0]:
            axis.set_ylabel("posterior")
        axis.grid(axis="y", alpha=0.3)
    if created:  # above the panels, clear of the bars and of the option labels
        handles, names = axes[0].get_legend_handles_labels()
        axes[0].figure.legend(handles, names, loc="lower center", ncol=3, fontsize="small",
                              bbox_to_anchor=(0.5, 0.98), frameon=False)
    else:
        axes[0].legend(loc="best", fontsize="small", framealpha=0.9)
    _save(axes[0], path)
    return axes[0] if len(axes) == 1 else axes


def _ternary(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    points = gamma @ corners
    return points[:, 0], points[:, 1]


def plot_simplex(data: FittedSelection | Any, site: str | None = None, *,
                 num_samples: int = 1000, prior: bool = True, ax: Axes | None = None,
                 path: str | os.PathLike[str] | None = None) -> Axes:
    r"""Ternary scatter of the draws of a structural site with three options.

    Each draw :math:`\gamma \in \Delta^2` is the point
    :math:`\sum_k \gamma_k v_k` of the triangle with corners :math:`v_k`
    labelled by the options; a corner is a structure. Prior draws are shown
    in grey beneath the posterior ones, and the posterior mean as a star.

    Parameters
    ----------
    data : SelectionResult or arviz.InferenceData
        A fit, or its export (draws from its ``posterior`` and ``prior``).
    site : str, optional
        The structural site (default: the only one with three options).
    num_samples : int
        Draws (for a ``SelectionResult``).
    prior : bool
        Also plot prior draws.
    ax, path :
        As in :func:`plot_structure_posterior`.

    Returns
    -------
    matplotlib.axes.Axes

    Example
    -------
    >>> ps.plot_simplex(idata, "activation", path="simplex.png")
    """
    draws = _site_draws(data, None if site is None else [site], num_samples)
    if site is None:
        ternary = [name for name, (_, labels) in draws.items() if len(labels) == 3]
        if len(ternary) != 1:
            raise ValueError(f"Pass site=: the fit has {len(ternary)} structural sites with "
                             f"three options ({ternary}).")
        site = ternary[0]
    values, labels = draws[site]
    if len(labels) != 3:
        raise ValueError(f"A ternary plot needs a site with three options; {site!r} has "
                         f"{len(labels)}. Use plot_structure_posterior instead.")
    gamma = values.reshape(-1, 3)
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 4.3))
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 0.0]])
    for level in (0.2, 0.4, 0.6, 0.8):  # grid lines gamma_k = level
        for k in range(3):
            ends = np.zeros((2, 3))
            ends[:, k] = level
            ends[0, (k + 1) % 3] = 1 - level
            ends[1, (k + 2) % 3] = 1 - level
            gx, gy = _ternary(ends)
            ax.plot(gx, gy, color="0.85", lw=0.6, zorder=0)
    ax.plot(corners[:, 0], corners[:, 1], color="k", lw=1, zorder=1)
    if prior:
        prior_gamma = _prior_gamma(data, site, num_samples)
        if prior_gamma is not None:
            px, py = _ternary(prior_gamma.reshape(-1, 3))
            ax.scatter(px, py, s=5, color=_PRIOR, alpha=0.35, label="prior", zorder=2,
                       linewidths=0)
    x, y = _ternary(gamma)
    ax.scatter(x, y, s=7, color=_POSTERIOR, alpha=0.5, label="posterior $q$", zorder=3,
               linewidths=0)
    mx, my = _ternary(gamma.mean(0, keepdims=True))
    ax.scatter(mx, my, s=160, marker="*", color="C3", edgecolors="k", zorder=4,
               label="posterior mean")
    offsets = [(-0.04, -0.05, "right"), (1.04, -0.05, "left"), (0.5, math.sqrt(3) / 2 + 0.04,
                                                                 "center")]
    for (tx, ty, align), label in zip(offsets, labels):
        ax.text(tx, ty, label, ha=align, va="center", fontsize="medium")
    ax.set_xlim(-0.25, 1.25)
    ax.set_ylim(-0.12, math.sqrt(3) / 2 + 0.12)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{site}: draws on the simplex")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9, markerscale=1.5)
    _save(ax, path)
    return ax


def _prior_gamma(data: Any, site: str, num_samples: int) -> np.ndarray | None:
    if _is_inference_data(data):
        if "prior" not in data.groups() or site not in data.prior:
            return None
        array = data.prior[site]
        return array.values.reshape((-1,) + array.shape[2:])
    result = data
    with result.param_scope(), torch.no_grad():
        drawn = prior_draws(result.model, result.args, result.kwargs, [site], num_samples,
                             vectorize=True)
    return result.sites[site].to_simplex(drawn[site]).detach().cpu().numpy()


def _losses(data: Any) -> np.ndarray:
    if _is_inference_data(data):
        if "elbo_trace" not in data.groups():
            raise ValueError("The InferenceData has no elbo_trace group; export it with "
                             "ps.to_inference_data.")
        return np.asarray(data.elbo_trace["loss"].values, dtype=float)
    if hasattr(data, "losses"):
        return np.asarray(data.losses, dtype=float)
    try:
        if isinstance(data, (str, bytes)):
            raise ValueError("a string")
        return np.asarray(data, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"Expected data to be a SelectionResult, an InferenceData with an "
                        f"elbo_trace group or a sequence of losses, but got {data!r}.") from None


def plot_elbo(data: FittedSelection | Any, *, window: float = 0.2, smooth: int | None = None,
              ax: Axes | None = None, path: str | os.PathLike[str] | None = None) -> Axes:
    """The loss (−ELBO) at every SVI step, with a running mean and the convergence check.

    The shaded region is the part of the trace :func:`~pyro_structsel.elbo_convergence`
    compares (the last ``window`` fraction); its verdict is in the legend.

    Parameters
    ----------
    data : SelectionResult, arviz.InferenceData or sequence of float
        A fit, its export (``elbo_trace`` group), or a loss trace.
    window : float
        Fraction of the trace checked for convergence.
    smooth : int, optional
        Width of the running mean (default: 2% of the steps, at least 1).
    ax, path :
        As in :func:`plot_structure_posterior`.

    Returns
    -------
    matplotlib.axes.Axes

    Example
    -------
    >>> ps.plot_elbo(result, path="elbo.png")
    """
    losses = _losses(data)
    if losses.size == 0:
        raise ValueError("The loss trace is empty.")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = np.arange(losses.size)
    width = smooth if smooth is not None else max(1, losses.size // 50)
    ax.plot(steps, losses, color=_POSTERIOR, alpha=0.3, lw=0.8, label="loss")
    if width > 1 and losses.size >= width:
        running = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1:], running, color=_POSTERIOR, lw=1.8,
                label=f"running mean ({width} steps)")
    check = elbo_convergence(losses, window=window, warn=False)
    start = losses.size - check.window
    verdict = "converged" if check.converged else "not converged"
    ax.axvspan(max(start, 0), losses.size - 1, color="C2" if check.converged else "C3",
               alpha=0.12, label=f"{verdict} (change {100 * check.relative_change:.2g}%)")
    if losses.min() > 0 and losses.max() / losses.min() > 50:
        ax.set_yscale("log")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("loss = −ELBO (nats)")
    ax.set_title("ELBO trace")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)
    _save(ax, path)
    return ax


def plot_evidence_comparison(table: pd.DataFrame, *, value: str = "log_evidence",
                             se: str = "se", ax: Axes | None = None,
                             path: str | os.PathLike[str] | None = None) -> Axes:
    r"""Log evidence of structures with ±1 and ±2 standard-error bars, best on top.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per structure, indexed by its label, with columns ``value``
        and ``se`` (the table of :func:`~pyro_structsel.compare_structures`).
    value, se : str
        Column names of the log evidence and of its standard error.
    ax, path :
        As in :func:`plot_structure_posterior`.

    Returns
    -------
    matplotlib.axes.Axes

    Example
    -------
    >>> table = ps.compare_structures(model, x, y)
    >>> ps.plot_evidence_comparison(table, path="evidence.png")
    """
    missing = [column for column in (value, se) if column not in table.columns]
    if missing:
        raise ValueError(f"The table has no column {missing}; it has {list(table.columns)}.")
    if len(table) == 0:
        raise ValueError("The table is empty.")
    ordered = table.sort_values(value, ascending=True)
    labels = [_label(index) for index in ordered.index]
    values = ordered[value].to_numpy(dtype=float)
    errors = np.nan_to_num(ordered[se].to_numpy(dtype=float))
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 0.45 * len(labels) + 1.4))
    y = np.arange(len(labels))
    colors = ["C3" if i == len(labels) - 1 else _POSTERIOR for i in range(len(labels))]
    ax.errorbar(values, y, xerr=2 * errors, fmt="none", ecolor="0.6", elinewidth=1,
                capsize=3, label="±2 se")
    ax.errorbar(values, y, xerr=errors, fmt="none", ecolor="k", elinewidth=2.2, capsize=0,
                label="±1 se")
    ax.scatter(values, y, c=colors, zorder=3, s=36)
    ax.axvline(values[-1], color="C3", ls="--", lw=1, alpha=0.7, label="best")
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.set_xlabel(f"{value} (nats)")
    ax.set_title("Evidence by structure")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small", framealpha=0.9)
    _save(ax, path)
    return ax


def _label(index: Any) -> str:
    if isinstance(index, tuple):
        return ", ".join(str(part) for part in index)
    return str(index)
