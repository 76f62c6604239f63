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
from .distributed import DistributedWarning, data_plate, init_distributed
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
from .hypergradients import HypergradientWarning
from .hyperopt import HyperparameterResult, optimize_hyperparameters
from .laplace import LaplaceWarning, laplace
from .network import NetworkModel
from .plots import (
    plot_elbo,
    plot_evidence_comparison,
    plot_simplex,
    plot_structure_posterior,
)
from .reversible import Hypergradient, ReconstructionWarning, rmad, sgd_momentum
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
    "DistributedWarning",
    "Estimate",
    "EvidenceMethod",
    "FitDiagnostics",
    "GraphFamily",
    "Hypergradient",
    "HypergradientWarning",
    "HyperparameterResult",
    "LaplaceWarning",
    "MixedOp",
    "NetworkModel",
    "NonFiniteLossError",
    "ParetoKWarning",
    "ReconstructionWarning",
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
    "data_plate",
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
    "init_distributed",
    "iwae",
    "kfold_indices",
    "laplace",
    "load_checkpoint",
    "load_digits",
    "one_hidden_layer",
    "optimize_hyperparameters",
    "parametric_complexity",
    "plot_elbo",
    "plot_evidence_comparison",
    "plot_simplex",
    "plot_structure_posterior",
    "polynomial_features",
    "psis_khat",
    "rmad",
    "save_checkpoint",
    "select_structure",
    "sgd_momentum",
    "structural_complexity",
    "structural_prior",
    "structure",
    "structure_label",
    "to_inference_data",
    "two_hidden_layer",
]
