"""pyro_structsel: Bayesian structure selection for deep-learning models, on Pyro."""

from __future__ import annotations

from .arviz import to_inference_data
from .bayesian import BayesianModule, batched_call
from .complexity import (
    DescriptionLength,
    classical_complexity,
    description_length,
    parametric_complexity,
    structural_complexity,
)
from .diagnostics import (
    Convergence,
    ConvergenceWarning,
    DiagnosticWarning,
    FitDiagnostics,
    ParetoKWarning,
    diagnose,
    elbo_convergence,
    psis_khat,
)
from .estimate import Estimate
from .evidence import EvidenceMethod, elbo
from .family import (
    GraphFamily,
    MixedOp,
    conv_family,
    derive_network,
    one_hidden_layer,
    two_hidden_layer,
)
from .guides import AutoStructure, default_guide
from .network import NetworkModel
from .plots import (
    plot_elbo,
    plot_evidence_comparison,
    plot_simplex,
    plot_structure_posterior,
)
from .selection import SelectionResult, select_structure
from .structure import (
    StructuralSite,
    find_structural_sites,
    fix_structure,
    structural_prior,
    structure,
)
from .training import NonFiniteLossError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "AutoStructure",
    "BayesianModule",
    "Convergence",
    "ConvergenceWarning",
    "DescriptionLength",
    "DiagnosticWarning",
    "Estimate",
    "EvidenceMethod",
    "FitDiagnostics",
    "GraphFamily",
    "MixedOp",
    "NetworkModel",
    "NonFiniteLossError",
    "ParetoKWarning",
    "SelectionResult",
    "StructuralSite",
    "batched_call",
    "classical_complexity",
    "conv_family",
    "default_guide",
    "derive_network",
    "description_length",
    "diagnose",
    "elbo",
    "elbo_convergence",
    "find_structural_sites",
    "fix_structure",
    "load_checkpoint",
    "one_hidden_layer",
    "parametric_complexity",
    "plot_elbo",
    "plot_evidence_comparison",
    "plot_simplex",
    "plot_structure_posterior",
    "psis_khat",
    "save_checkpoint",
    "select_structure",
    "structural_complexity",
    "structural_prior",
    "structure",
    "to_inference_data",
    "two_hidden_layer",
]
