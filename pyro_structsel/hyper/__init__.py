"""Hyperparameters by gradient: the Pyro front end, hypergradient methods, reversible learning."""

from __future__ import annotations

from .hypergradients import HypergradientWarning
from .hyperopt import HyperparameterResult, hyperparameter_problem, optimize_hyperparameters
from .reversible import Hypergradient, ReconstructionWarning, rmad, sgd_momentum

__all__ = [
    "Hypergradient",
    "HypergradientWarning",
    "HyperparameterResult",
    "ReconstructionWarning",
    "hyperparameter_problem",
    "optimize_hyperparameters",
    "rmad",
    "sgd_momentum",
]
