r"""The discrete check of a relaxed fit: score the leading vertices of :math:`q(\Gamma)` by evidence.

A relaxed fit (Γ on the simplex, shared weights) finds candidate structures;
it is not the verdict. Relaxed selection is known to drift towards
parameter-free or linear operations (the "skip-connection collapse" of
DARTS, Zela et al. 2020), and a mean-field :math:`q` over weights that every
candidate shares puts its mass on one vertex with a confidence the data do
not carry. The optimal structure is the one of highest evidence
:math:`p(D \mid s)` (Bakhteev & Strijov 2018), so the check scores discrete
structures :math:`s` (each site pinned at a vertex, see
:func:`~pyro_structsel.fix_structure`) as
:func:`~pyro_structsel.compare_structures` does, warm-started from the
relaxed fit's weights:

1. the *leading vertices* of :math:`q(\Gamma) = \prod_j q(\gamma^j)`, in
   decreasing mass :math:`\prod_j q(\arg\max \gamma^j = s_j)` until they
   cover ``coverage`` of it, and every structure that differs from the
   relaxed pick at one site (each option of each site is scored against the
   pick);
2. then, while the best structure so far has an unscored one-site
   neighbour, those neighbours (a local search over the vertices that ends
   at a structure no single change improves), up to ``max_fits`` fits.

The structure of highest evidence is chosen; the structure probabilities are
:math:`\mathrm{softmax}(\log p(D \mid s))` over the structures scored (a
uniform prior over them), and a site's option probability is the sum over
the structures that take it.

References
----------
A. Zela, T. Elsken, T. Saikia, Y. Marrakchi, T. Brox, F. Hutter.
Understanding and robustifying differentiable architecture search. ICLR 2020.
X. Chu, X. Wang, B. Zhang, S. Lu, X. Wei, J. Yan. DARTS-: robustly stepping
out of performance collapse without indicators. ICLR 2021.
O. Bakhteev, V. Strijov. Deep learning model selection of suboptimal
complexity. Automation and Remote Control, 2018.
"""

from __future__ import annotations

import heapq
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyro
import pyro.optim
import torch

from ..evidence.comparison import StructureFit, evidence_table, score_structure, structure_label
from ..evidence.laplace import LaplaceWarning
from ..evidence.methods import EvidenceMethod
from ..infer.convergence import DiagnosticWarning, elbo_convergence
from ..model.network import NetworkModel
from ..model.sites import StructuralSite
from ..util.progress import progress_bar

#: Probability of q(Γ) on one option at or above which q is called confident.
CONFIDENT = 0.99


class OverconfidenceWarning(DiagnosticWarning):
    r"""The relaxed :math:`q(\Gamma)` is confident in a structure the discrete evidence ranks lower."""


@dataclass
class DiscreteCheck:
    r"""What the discrete check found: the evidence of the structures scored, and its cost.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per structure scored, best first (as
        :func:`~pyro_structsel.compare_structures` returns it), with two more
        columns: ``q_probability`` (the mass the relaxed :math:`q(\Gamma)`
        puts on the vertex) and ``converged`` (whether the structure's fit
        levelled off, see :func:`~pyro_structsel.elbo_convergence`; for the
        Laplace evidence, whether the search for the mode reached it, i.e.
        raised no :class:`~pyro_structsel.LaplaceWarning`).
    method : str
        The evidence estimator.
    structure : dict
        Site → option of the structure of highest evidence.
    probabilities : dict
        Site → tensor over options: the evidence probability of the
        structures scored that take each option.
    relaxed_structure : dict
        Site → option with the largest :math:`q(\arg\max\gamma = k)`.
    relaxed_probabilities : dict
        Site → :math:`q(\arg\max\gamma = k)` over options.
    num_fits : int
        Structures fitted and scored.
    num_steps : int
        SVI steps per fit.
    seconds : float
        Wall time of the check.
    warm_start : bool
        Whether the fits started from the relaxed fit's weight means.
    chosen_fit : StructureFit or None
        The fit of the chosen structure (its guide and parameters).
    """

    table: pd.DataFrame
    method: str
    structure: dict[str, str | int]
    probabilities: dict[str, torch.Tensor]
    relaxed_structure: dict[str, str | int]
    relaxed_probabilities: dict[str, torch.Tensor]
    num_fits: int
    num_steps: int
    seconds: float
    warm_start: bool
    chosen_fit: StructureFit | None = field(default=None, repr=False)

    @property
    def agrees(self) -> bool:
        """Whether the relaxed pick is the structure of highest evidence."""
        return self.relaxed_structure == self.structure

    @property
    def relaxed_rank(self) -> int:
        """Rank (1 = best) of the relaxed pick among the structures scored by evidence."""
        return list(self.table.index).index(structure_label(self.relaxed_structure)) + 1

    def overconfident_sites(self) -> list[str]:
        r"""Sites where :math:`q(\Gamma)` puts ≥ 0.99 on an option the chosen structure does not take."""
        sites = []
        for name, probs in self.relaxed_probabilities.items():
            if float(probs.max()) >= CONFIDENT and \
                    self.relaxed_structure[name] != self.structure[name]:
                sites.append(name)
        return sites

    def unconverged(self, top: int = 2) -> list[str]:
        """Labels among the ``top`` best structures whose fit has not levelled off.

        Their evidence is the ELBO of a fit still improving, or a Laplace
        evidence away from the mode: the ranking between them is not settled.
        """
        head = self.table.head(top)
        return [str(label) for label, ok in zip(head.index, head["converged"]) if not ok]

    def message(self) -> str:
        """One paragraph: whether the relaxed and discrete picks agree, and why it matters."""
        relaxed, chosen = structure_label(self.relaxed_structure), structure_label(self.structure)
        scored = f"{self.num_fits} structures scored by {self.method}"
        if self.agrees:
            return f"The relaxed q(Γ) and the discrete evidence agree on {chosen} ({scored})."
        gap = float(self.table.loc[structure_label(self.relaxed_structure), "log_bayes_factor"])
        text = (f"The relaxed q(Γ) picks {relaxed}, but the discrete evidence ranks it "
                f"{self.relaxed_rank} of {self.num_fits} (log Bayes factor {gap:.1f} to the "
                f"best, {chosen}; {scored}). The structure chosen is {chosen}.")
        confident = self.overconfident_sites()
        if confident:
            text += (f" q(Γ) is overconfident at {confident} (probability ≥ {CONFIDENT}): quote "
                     "the discrete evidence probabilities (result.probabilities), not q(Γ).")
        return text

    def __repr__(self) -> str:
        return (f"DiscreteCheck({self.method}: {structure_label(self.structure)}, "
                f"{'agrees' if self.agrees else 'disagrees'} with the relaxed pick "
                f"{structure_label(self.relaxed_structure)}; {self.num_fits} fits of "
                f"{self.num_steps} steps, {self.seconds:.1f} s)")


#: Supernets of at most this many weights get the exact (full) GGN in the Laplace check.
FULL_GGN_MAX_WEIGHTS = 2000


def default_hessian_structure(model: NetworkModel) -> str:
    r"""The GGN of a network's Laplace check: ``"full"`` up to 2000 weights, else ``"kron"``.

    The full GGN is exact (a :math:`d \times d` matrix, 32 MB at
    :math:`d = 2000`); on the two-layer teachers of
    ``benchmarks/recovery_sweep.py`` (105 weights) it recovered 8 of 10
    teachers where the Kronecker factors recovered 7.
    """
    num_weights = sum(p.numel() for p in model.network.parameters())
    return "full" if num_weights <= FULL_GGN_MAX_WEIGHTS else "kron"


def default_check_method(model: Any, hessian_structure: str | None = None) -> EvidenceMethod:
    """The evidence of the discrete check when none is asked for.

    ``"laplace"`` for a :class:`~pyro_structsel.NetworkModel` whose GGN is
    taken in full (at most 2000 weights, or ``hessian_structure`` given),
    ``"elbo"`` otherwise. The Kronecker-factored Laplace evidence favoured
    identity layers where it was measured: it read two of the two-layer
    teachers as relu/identity and tanh/identity, and on the digits network
    of ``python -m pyro_structsel --quick`` (3466 weights) it ranked
    identity/identity first by 25 nats.
    """
    if isinstance(model, NetworkModel) and (
            hessian_structure is not None or default_hessian_structure(model) == "full"):
        return EvidenceMethod.LAPLACE
    return EvidenceMethod.ELBO


def vertex_probability(structure: Mapping[str, str | int],
                       probabilities: Mapping[str, torch.Tensor],
                       sites: Mapping[str, StructuralSite]) -> float:
    r""":math:`\prod_j q(\arg\max\gamma^j = s_j)`: the mass of the factorised :math:`q(\Gamma)` on a vertex."""
    mass = 1.0
    for name, site in sites.items():
        mass *= float(probabilities[name][site.index(structure[name])])
    return mass


def leading_vertices(sites: Mapping[str, StructuralSite],
                     probabilities: Mapping[str, torch.Tensor]) -> Iterator[dict[str, str | int]]:
    r"""The vertices in decreasing mass under the factorised :math:`q(\Gamma)`, lazily.

    A best-first walk over the product of the per-site orders (a heap), so
    the first few of a space of :math:`\prod_j K_j` vertices come without
    enumerating it.
    """
    names = list(sites)
    orders = [sorted(range(sites[n].num_options), key=lambda k, n=n: -float(probabilities[n][k]))
              for n in names]
    log_probs = [[math.log(max(float(probabilities[n][k]), 1e-300)) for k in order]
                 for n, order in zip(names, orders)]

    def mass(ranks: tuple[int, ...]) -> float:
        return sum(lp[r] for lp, r in zip(log_probs, ranks))

    start = (0,) * len(names)
    heap, seen = [(-mass(start), start)], {start}
    while heap:
        _, ranks = heapq.heappop(heap)
        yield {n: sites[n].label(order[r]) for n, order, r in zip(names, orders, ranks)}
        for j in range(len(names)):
            if ranks[j] + 1 < len(orders[j]):
                step = ranks[:j] + (ranks[j] + 1,) + ranks[j + 1:]
                if step not in seen:
                    seen.add(step)
                    heapq.heappush(heap, (-mass(step), step))


def neighbours(structure: Mapping[str, str | int], sites: Mapping[str, StructuralSite]
               ) -> list[dict[str, str | int]]:
    """The structures that differ from ``structure`` at exactly one site."""
    found = []
    for name, site in sites.items():
        for k in range(site.num_options):
            option = site.label(k)
            if option != structure[name]:
                found.append({**structure, name: option})
    return found


def first_candidates(sites: Mapping[str, StructuralSite],
                     probabilities: Mapping[str, torch.Tensor],
                     relaxed_structure: Mapping[str, str | int], *, coverage: float
                     ) -> list[dict[str, str | int]]:
    """The leading vertices covering ``coverage`` of q's mass, then the relaxed pick's neighbours."""
    found: dict[str, dict[str, str | int]] = {}
    covered = 0.0
    for vertex in leading_vertices(sites, probabilities):
        found[structure_label(vertex)] = vertex
        covered += vertex_probability(vertex, probabilities, sites)
        if covered >= coverage:
            break
    for vertex in [dict(relaxed_structure), *neighbours(relaxed_structure, sites)]:
        found.setdefault(structure_label(vertex), vertex)
    return list(found.values())


def run_discrete_check(model: Callable[..., Any], args: tuple, kwargs: dict[str, Any], *,
                       sites: Mapping[str, StructuralSite],
                       relaxed_probabilities: Mapping[str, torch.Tensor],
                       model_params: dict[str, Any], method: EvidenceMethod,
                       guide: Any, num_steps: int,
                       optim: Callable[[], pyro.optim.PyroOptim], num_particles: int,
                       num_samples: int, seed: int | None, coverage: float, max_fits: int,
                       init_values: Mapping[str, torch.Tensor] | None,
                       init_scales: Mapping[str, torch.Tensor] | None,
                       hessian_structure: str | None = None,
                       progress: bool) -> DiscreteCheck:
    """Score the leading vertices of the relaxed fit and their neighbours; see the module doc."""
    started = time.perf_counter()
    relaxed_structure = {name: site.label(int(relaxed_probabilities[name].argmax()))
                         for name, site in sites.items()}
    fits: dict[str, StructureFit] = {}
    mode_missed: dict[str, bool] = {}  # Laplace: the search stopped short of the mode
    # a network's Laplace evidence: Gauss-Newton on the pruned network at its MAP
    curvature = None
    if isinstance(model, NetworkModel) and method is EvidenceMethod.LAPLACE:
        curvature = hessian_structure or default_hessian_structure(model)
    bar = progress_bar(desc="discrete check", enabled=progress, unit="structures")

    def score(structure: dict[str, str | int]) -> None:
        label = structure_label(structure)
        if label in fits or len(fits) >= max_fits:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fits[label] = score_structure(
                model, structure, args, kwargs, method, guide=guide,
                model_params=model_params, num_steps=num_steps, optim=optim,
                num_particles=num_particles, curvature=curvature, num_samples=num_samples,
                seed=seed, init_values=init_values, init_scales=init_scales)
        # a missed mode is one column of the table (and one warning of select_structure
        # when it unsettles the top two), not a warning per structure
        mode_missed[label] = any(issubclass(w.category, LaplaceWarning) for w in caught)
        for w in caught:
            if not issubclass(w.category, LaplaceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        bar.update(1)

    def best() -> str:
        finite = [label for label, f in fits.items() if math.isfinite(f.estimate.value)]
        return max(finite or list(fits), key=lambda label: (
            fits[label].estimate.value if math.isfinite(fits[label].estimate.value)
            else -math.inf))

    try:
        for structure in first_candidates(sites, relaxed_probabilities, relaxed_structure,
                                          coverage=coverage):
            score(structure)
        while len(fits) < max_fits:  # climb: score the best one's unscored neighbours
            new = [s for s in neighbours(fits[best()].structure, sites)
                   if structure_label(s) not in fits]
            if not new:
                break
            for structure in new:
                score(structure)
    finally:
        bar.close()
    table = evidence_table({label: f.estimate for label, f in fits.items()},
                           {label: f.structure for label, f in fits.items()})
    table["q_probability"] = [vertex_probability(fits[label].structure, relaxed_probabilities,
                                                 sites) for label in table.index]
    # the estimate's own verdict where it gives one (fit, mode search), else the fit's ELBO
    table.pop("converged")
    table["converged"] = [bool(fits[label].estimate.diagnostics.get(
        "converged", elbo_convergence(fits[label].losses, warn=False).converged
        if fits[label].losses else not mode_missed[label])) for label in table.index]
    table["flagged"] = table["flagged"].astype(bool) | ~table["converged"]
    chosen = fits[best()]
    probabilities = {}
    for name, site in sites.items():
        per_option = torch.zeros(site.num_options, dtype=torch.float64)
        for _, row in table.iterrows():
            if math.isfinite(float(row["probability"])):  # a NaN evidence has none
                per_option[site.index(row["structure"][name])] += float(row["probability"])
        probabilities[name] = per_option.to(torch.get_default_dtype())
    for fit in fits.values():  # keep the chosen fit's parameters only
        if fit is not chosen:
            fit.guide, fit.param_state = None, None
    return DiscreteCheck(
        table=table, method=method.value, structure=dict(chosen.structure),
        probabilities=probabilities, relaxed_structure=relaxed_structure,
        relaxed_probabilities={n: p.clone() for n, p in relaxed_probabilities.items()},
        num_fits=len(fits), num_steps=num_steps, seconds=time.perf_counter() - started,
        warm_start=init_values is not None, chosen_fit=chosen)
