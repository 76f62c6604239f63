"""pyro_structsel: Bayesian structure selection for deep-learning models, on Pyro."""

from __future__ import annotations

from .arviz import to_inference_data
from ._sampling import VectorizationWarning
from .bayesian import BayesianModule, batched_call
from .comparison import all_structures, compare_structures, inert_sites, structure_label
from .complexity import (
    DescriptionLength,
    classical_complexity,
    description_length,
    parametric_complexity,
    structural_complexity,
)
from .crossval import blr_cross_validation, cross_validation, kfold_indices
from .datasets import Dataset, load_digits
from .descent import StepSizeWarning, gradient_descent_evidence
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
from .evidence import EvidenceMethod, elbo, estimate_evidence, iwae
from .exact import blr_log_evidence, blr_model, blr_posterior, polynomial_features
from .family import (
    GraphFamily,
    MixedOp,
    conv_family,
    derive_network,
    one_hidden_layer,
    two_hidden_layer,
)
from .ggn import ggn_laplace
from .guides import AutoMeanFieldNormal, AutoStructure, default_guide
from .laplace import LaplaceWarning, laplace
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
    "AutoMeanFieldNormal",
    "AutoStructure",
    "BayesianModule",
    "Convergence",
    "ConvergenceWarning",
    "Dataset",
    "DescriptionLength",
    "DiagnosticWarning",
    "Estimate",
    "EvidenceMethod",
    "FitDiagnostics",
    "GraphFamily",
    "LaplaceWarning",
    "MixedOp",
    "NetworkModel",
    "NonFiniteLossError",
    "ParetoKWarning",
    "SelectionResult",
    "StepSizeWarning",
    "StructuralSite",
    "VectorizationWarning",
    "all_structures",
    "batched_call",
    "blr_cross_validation",
    "blr_log_evidence",
    "blr_model",
    "blr_posterior",
    "classical_complexity",
    "compare_structures",
    "conv_family",
    "cross_validation",
    "default_guide",
    "derive_network",
    "description_length",
    "diagnose",
    "elbo",
    "elbo_convergence",
    "estimate_evidence",
    "find_structural_sites",
    "fix_structure",
    "ggn_laplace",
    "gradient_descent_evidence",
    "inert_sites",
    "iwae",
    "kfold_indices",
    "laplace",
    "load_checkpoint",
    "load_digits",
    "one_hidden_layer",
    "parametric_complexity",
    "plot_elbo",
    "plot_evidence_comparison",
    "plot_simplex",
    "plot_structure_posterior",
    "polynomial_features",
    "psis_khat",
    "save_checkpoint",
    "select_structure",
    "structural_complexity",
    "structural_prior",
    "structure",
    "structure_label",
    "to_inference_data",
    "two_hidden_layer",
]
