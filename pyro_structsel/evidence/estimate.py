"""The result object every estimator returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """An estimate of a scalar quantity, with what is needed to trust it.

    Attributes
    ----------
    value : float
        The estimate, in nats unless ``method`` says otherwise.
    se : float
        Monte Carlo standard error; ``0.0`` for a closed form, ``nan`` where
        no error can be given.
    num_samples : int
        Number of Monte Carlo samples behind the estimate (0 for a closed form).
    method : str
        The estimator, e.g. ``"elbo"`` or ``"closed_form"``.
    diagnostics : dict
        Further figures (effective sample size, per-site terms, ...).
    """

    value: float
    se: float = 0.0
    num_samples: int = 0
    method: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        se = "" if self.se == 0.0 or math.isnan(self.se) else f" ± {self.se:.4g}"
        n = f", n={self.num_samples}" if self.num_samples else ""
        return f"Estimate({self.method}: {self.value:.6g}{se}{n})"
