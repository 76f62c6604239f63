"""Reporting a fit: diagnostics, the ArviZ export, plots."""

from __future__ import annotations

from .diagnostics import FitDiagnostics, diagnose
from .inference_data import to_inference_data
from .plots import plot_elbo, plot_evidence_comparison, plot_simplex, plot_structure_posterior

__all__ = [
    "FitDiagnostics",
    "diagnose",
    "plot_elbo",
    "plot_evidence_comparison",
    "plot_simplex",
    "plot_structure_posterior",
    "to_inference_data",
]
