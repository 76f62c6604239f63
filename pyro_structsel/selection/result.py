r"""``SelectionResult``: what :func:`~pyro_structsel.select_structure` found, and its views.

The chosen structure with its posterior probabilities, the evidence
estimates, the complexities and the loss trace, with methods that export
(ArviZ), diagnose (:math:`\hat k`, convergence) and derive the chosen model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import pyro
import torch
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch import nn

from ..evidence.complexity import DescriptionLength
from ..evidence.estimate import Estimate
from ..infer.scope import module_params_kept
from ..model.fix_messenger import fix_structure
from ..model.sites import StructuralSite
from ..report.diagnostics import diagnose
from ..report.inference_data import to_inference_data
from ..util.sampling import draw_guide, max_plate_nesting, trace_model
from .discrete_check import DiscreteCheck


class SelectionResult:
    """What :func:`select_structure` found. Read its attributes; call its methods.

    Attributes
    ----------
    structure : dict
        Site name → chosen option label (index where the site has no labels):
        the structure of highest evidence when the discrete check ran, else
        the relaxed pick.
    probabilities : dict
        Site name → tensor over options: the probabilities to quote. After
        the discrete check, the evidence probability of the structures scored
        that take each option (see ``discrete_check``); without it,
        :math:`q(\\arg\\max_j \\gamma_j = k)`.
    relaxed_structure : dict
        Site name → the option of largest :math:`q(\\arg\\max_j \\gamma_j = k)`.
    relaxed_probabilities : dict
        Site name → :math:`q(\\arg\\max_j \\gamma_j = k)` under the relaxed fit.
    discrete_check : DiscreteCheck or None
        The evidence table of the discrete structures scored, whether it agrees
        with the relaxed pick, and its cost (fits, seconds); ``None`` when the
        check did not run.
    posterior_mean : dict
        Site name → :math:`\\mathbb E_q[\\gamma]`.
    evidence : dict
        Estimator name → :class:`~pyro_structsel.Estimate` of the log evidence
        of the relaxed model under the relaxed :math:`q` (the discrete
        structures' are in ``discrete_check.table``).
    parametric_complexity : Estimate or None
        :math:`\\min_h \\mathrm{KL}(q(w) \\| p(w \\mid h))` (``None`` for a non-Gaussian guide).
    structural_complexity : Estimate
        Entropy of :math:`q(\\Gamma)` (see :func:`~pyro_structsel.structural_complexity`).
    description_length : DescriptionLength
        :math:`-\\mathrm{ELBO}/\\ln 2` bits, split into model and data bits.
    classical_complexity : dict or None
        Number of parameters and of superpositions of the derived network
        (for a :class:`~pyro_structsel.NetworkModel`).
    losses : FitLosses
        The loss (−ELBO) at every SVI step of the kept restart, a list of
        floats that also says how the steps ran (``losses.step``: traced,
        compiled or Pyro's ELBO; ``losses.trace_seconds``,
        ``losses.compile_seconds``; see :class:`~pyro_structsel.infer.svi.FitLosses`).
    diagnostics : FitDiagnostics or None
        PSIS k-hat of q and ELBO convergence, once :meth:`diagnose` or
        :meth:`to_inference_data` has run.
    restart_losses : list of float
        Final loss (−ELBO) of every restart: estimated from fresh draws of its
        :math:`q` when there are several (the kept one is the lowest), the
        mean of the last steps' losses when there is one.
    sites : dict
        Site name → :class:`~pyro_structsel.StructuralSite`, for the sites fitted.
    pinned : dict
        Site name → (site, option) for structural sites the model pins with
        :func:`~pyro_structsel.fix_structure` (in ``structure`` with probability 1).
    model, guide, args, kwargs :
        What was fitted; the guide's parameters live in :meth:`param_scope`.
    """

    def __init__(self, *, model: Callable[..., Any], guide: Callable[..., Any], args: tuple,
                 kwargs: dict[str, Any], param_state: dict[str, Any],
                 sites: dict[str, StructuralSite], losses: list[float],
                 restart_losses: list[float]) -> None:
        self.model = model
        self.guide = guide
        self.args = args
        self.kwargs = kwargs
        self.param_state = param_state
        self.sites = sites
        self.losses = losses
        self.restart_losses = restart_losses
        self.pinned: dict[str, tuple[StructuralSite, str | int]] = {}
        self.structure: dict[str, str | int] = {}
        self.probabilities: dict[str, torch.Tensor] = {}
        self.relaxed_structure: dict[str, str | int] = {}
        self.relaxed_probabilities: dict[str, torch.Tensor] = {}
        self.discrete_check: DiscreteCheck | None = None
        self.posterior_mean: dict[str, torch.Tensor] = {}
        self.evidence: dict[str, Estimate] = {}
        self.parametric_complexity: Estimate | None = None
        self.structural_complexity: Estimate | None = None
        self.description_length: DescriptionLength | None = None
        self.classical_complexity: dict[str, int] | None = None
        self.diagnostics: Any = None  # FitDiagnostics, set by diagnose() / to_inference_data()

    @contextmanager
    def param_scope(self) -> Iterator[dict[str, Any]]:
        """Context in which Pyro's parameter store holds this fit's parameters (only)."""
        # a PyroModule model syncs its PyroParams from the store: undo that on exit
        with module_params_kept(self.model), \
                pyro.get_param_store().scope(self.param_state) as state:
            yield state

    def fixed_model(self) -> Callable[..., Any]:
        """The model with every structural site fixed at the chosen vertex."""
        return fix_structure(self.model, self.structure)

    def weight_means(self, num_samples: int = 1000, *, relaxed: bool = False
                     ) -> dict[str, torch.Tensor]:
        """Posterior means of the non-structural latent sites.

        Exact for ``AutoNormal`` factors (the location); a Monte Carlo mean of
        ``num_samples`` guide draws otherwise. After a discrete check, the
        chosen structure's own fit gives the means of the sites it fitted
        (``relaxed=True``: the relaxed fit's means only).
        """
        means = _guide_means(self.model, self.guide, self.param_state, self.args, self.kwargs,
                             exclude=set(self.sites), num_samples=num_samples)
        chosen = self.discrete_check.chosen_fit if self.discrete_check is not None else None
        if not relaxed and chosen is not None and chosen.guide is not None:
            means.update(_guide_means(chosen.model, chosen.guide, chosen.param_state,
                                      self.args, self.kwargs, exclude=set(self.sites),
                                      num_samples=num_samples))
        return means

    def weight_scales(self) -> dict[str, torch.Tensor]:
        """Posterior scales of the sites an ``AutoNormal`` factor of the relaxed fit guides.

        In the unconstrained space of each site (the Normal's own scale).
        """
        scales: dict[str, torch.Tensor] = {}
        with self.param_scope(), torch.no_grad():
            parts = list(self.guide) if isinstance(self.guide, AutoGuideList) else [self.guide]
            for part in parts:
                if isinstance(part, AutoNormal):
                    for name, _ in part.prototype_trace.iter_stochastic_nodes():
                        scales[name] = part._get_loc_and_scale(name)[1].detach().clone()
        return scales

    def derive(self) -> nn.Module:
        """The chosen network as a plain ``torch.nn.Module`` with posterior-mean weights.

        Only for a :class:`~pyro_structsel.NetworkModel` (or a model with a
        ``derive(structure, weights)`` method).
        """
        if not hasattr(self.model, "derive"):
            raise TypeError(f"derive() needs a model with a derive(structure, weights) method, "
                            f"such as ps.NetworkModel; {type(self.model).__name__} has none. "
                            "Use fixed_model() for a Pyro model at the chosen structure.")
        return self.model.derive(self.structure, self.weight_means())

    def summary(self) -> pd.DataFrame:
        """Per site and option: probability, relaxed :math:`q` probability, mean of γ, chosen."""
        rows = []
        every = {**self.sites, **{name: site for name, (site, _) in self.pinned.items()}}
        for name, site in every.items():
            probs = self.probabilities[name]
            relaxed = self.relaxed_probabilities.get(name, probs)
            mean = self.posterior_mean[name]
            for k, option in enumerate(site.option_names()):
                rows.append({"site": name, "option": option,
                             "probability": float(probs[k]),
                             "relaxed_probability": float(relaxed[k]),
                             "posterior_mean": float(mean[k]),
                             "chosen": site.label(k) == self.structure[name]})
        return pd.DataFrame(rows).set_index(["site", "option"])

    def scores(self) -> pd.Series:
        """The fit's headline numbers (nats unless named in bits) as a pandas Series."""
        out: dict[str, float] = {}
        for name, est in self.evidence.items():
            out[f"log_evidence[{name}]"] = est.value
            out[f"log_evidence_se[{name}]"] = est.se
        if self.parametric_complexity is not None:
            out["parametric_complexity"] = self.parametric_complexity.value
        if self.structural_complexity is not None:
            out["structural_complexity"] = self.structural_complexity.value
            out["vertex_entropy"] = self.structural_complexity.diagnostics["vertex_entropy"]
        if self.description_length is not None:
            out["description_length_bits"] = self.description_length.total_bits
            out["model_bits"] = self.description_length.model_bits
            out["data_bits"] = self.description_length.data_bits
        for key, value in (self.classical_complexity or {}).items():
            out[key] = value
        return pd.Series(out, dtype=float)

    def diagnose(self, **kwargs: Any) -> Any:
        """PSIS k-hat of q and ELBO convergence (see :func:`pyro_structsel.diagnose`)."""
        return diagnose(self, **kwargs)

    def to_inference_data(self, **kwargs: Any) -> Any:
        """Export to ArviZ ``InferenceData`` (see :func:`pyro_structsel.to_inference_data`)."""
        return to_inference_data(self, **kwargs)

    def __repr__(self) -> str:
        chosen = ", ".join(f"{k}={v}" for k, v in self.structure.items())
        lines = [f"SelectionResult({chosen})"]
        for name in self.structure:
            site = self.sites[name] if name in self.sites else self.pinned[name][0]
            probs = ", ".join(f"{o}: {p:.3f}" for o, p in
                              zip(site.option_names(), self.probabilities[name]))
            lines.append(f"  {name}: {probs}")
        if self.discrete_check is not None:
            lines.append(f"  relaxed q(Γ): {self.discrete_check.message()}")
            for name, site in self.sites.items():
                probs = ", ".join(f"{o}: {p:.3f}" for o, p in
                                  zip(site.option_names(), self.relaxed_probabilities[name]))
                lines.append(f"  {name} (relaxed q): {probs}")
            check = self.discrete_check
            lines.append(f"  discrete check: {check.num_fits} fits of {check.num_steps} steps, "
                         f"{check.seconds:.1f} s")
        for name, est in self.evidence.items():
            lines.append(f"  evidence[{name}] = {est.value:.4f} ± {est.se:.4f}")
        return "\n".join(lines)


def _guide_means(model: Callable[..., Any], guide: Callable[..., Any],
                 param_state: dict[str, Any], args: tuple, kwargs: dict[str, Any], *,
                 exclude: set[str], num_samples: int) -> dict[str, torch.Tensor]:
    """Means of a fitted guide's latent sites (``AutoNormal`` locations; draws otherwise)."""
    means: dict[str, torch.Tensor] = {}
    with module_params_kept(model), pyro.get_param_store().scope(param_state), \
            torch.no_grad():
        parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
        for part in parts:
            if isinstance(part, AutoNormal):
                for name, site in part.prototype_trace.iter_stochastic_nodes():
                    loc, _ = part._get_loc_and_scale(name)
                    means[name] = loc.detach().clone()
        trace = trace_model(model, args, kwargs)
        rest = [n for n in trace.stochastic_nodes if n not in exclude and n not in means]
        if rest:
            nesting = max_plate_nesting(model, args, kwargs)
            drawn = draw_guide(guide, args, kwargs, rest, num_samples=num_samples,
                               nesting=nesting)
            means.update({n: v.mean(0) for n, v in drawn.items()})
    return means
