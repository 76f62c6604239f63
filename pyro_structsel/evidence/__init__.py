"""Scoring: evidence estimators, exact forms, cross-validation, comparison, complexities."""

from __future__ import annotations

from .bounds import elbo, iwae
from .comparison import (
    FlaggedEstimateWarning,
    all_structures,
    compare_structures,
    inert_sites,
    structure_label,
)
from .complexity import (
    DescriptionLength,
    classical_complexity,
    description_length,
    parametric_complexity,
    structural_complexity,
)
from .crossval import blr_cross_validation, cross_validation, kfold_indices
from .descent import StepSizeWarning, gradient_descent_evidence
from .empirical_bayes import empirical_bayes
from .estimate import Estimate
from .exact import BLRPosterior, blr_log_evidence, blr_model, blr_posterior, polynomial_features
from .ggn import ggn_laplace
from .laplace import LaplaceWarning, laplace
from .methods import EvidenceMethod, estimate_evidence
from .psis import ParetoKWarning, psis_khat

__all__ = [
    "BLRPosterior",
    "DescriptionLength",
    "Estimate",
    "FlaggedEstimateWarning",
    "EvidenceMethod",
    "LaplaceWarning",
    "ParetoKWarning",
    "StepSizeWarning",
    "all_structures",
    "blr_cross_validation",
    "blr_log_evidence",
    "blr_model",
    "blr_posterior",
    "classical_complexity",
    "compare_structures",
    "cross_validation",
    "description_length",
    "elbo",
    "empirical_bayes",
    "estimate_evidence",
    "ggn_laplace",
    "gradient_descent_evidence",
    "inert_sites",
    "iwae",
    "kfold_indices",
    "laplace",
    "parametric_complexity",
    "polynomial_features",
    "psis_khat",
    "structural_complexity",
    "structure_label",
]
