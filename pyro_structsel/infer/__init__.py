"""Fitting q(w, Γ): guides, the SVI loop with checkpoints, the traced step, data-parallel fits."""

from __future__ import annotations

from .checkpoint import CheckpointWarning, load_checkpoint, save_checkpoint
from .convergence import Convergence, ConvergenceWarning, DiagnosticWarning, elbo_convergence
from .guides import AutoMeanFieldNormal, AutoStructure, default_guide
from .optim import FlatAdam
from .svi import FactorisedELBO, FitLosses, NonFiniteLossError, TracingWarning, fit
from .traced import NotTraceableError, TracedELBO

__all__ = [
    "AutoMeanFieldNormal",
    "AutoStructure",
    "CheckpointWarning",
    "Convergence",
    "ConvergenceWarning",
    "DiagnosticWarning",
    "FactorisedELBO",
    "FitLosses",
    "FlatAdam",
    "NonFiniteLossError",
    "NotTraceableError",
    "TracedELBO",
    "TracingWarning",
    "default_guide",
    "elbo_convergence",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
]
