"""Fitting q(w, Γ): guides, the SVI loop with checkpoints, the fast step, data-parallel fits."""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .convergence import Convergence, ConvergenceWarning, DiagnosticWarning, elbo_convergence
from .fastpath import FlatAdam, NetworkELBO
from .guides import AutoMeanFieldNormal, AutoStructure, default_guide
from .svi import FactorisedELBO, NonFiniteLossError, fit

__all__ = [
    "AutoMeanFieldNormal",
    "AutoStructure",
    "Convergence",
    "ConvergenceWarning",
    "DiagnosticWarning",
    "FactorisedELBO",
    "FlatAdam",
    "NetworkELBO",
    "NonFiniteLossError",
    "default_guide",
    "elbo_convergence",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
]
