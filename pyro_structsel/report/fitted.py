"""What the report reads from a fit: the attributes of a :class:`~pyro_structsel.SelectionResult`.

The report sits below the selection layer, so it does not import the result
type; it reads any object with these attributes (a structural ``Protocol``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import pandas as pd
import torch


class FittedSelection(Protocol):
    """A fitted :math:`q(w, \\Gamma)` of a model, with what was read off it."""

    model: Callable[..., Any]
    guide: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]
    sites: dict[str, Any]
    structure: dict[str, str | int]
    probabilities: dict[str, torch.Tensor]
    posterior_mean: dict[str, torch.Tensor]
    evidence: dict[str, Any]
    losses: list[float]
    restart_losses: list[float]
    classical_complexity: dict[str, int] | None
    diagnostics: Any

    def param_scope(self) -> AbstractContextManager[dict[str, Any]]:
        """Context in which Pyro's parameter store holds the fit's parameters."""
        ...

    def scores(self) -> pd.Series:
        """The fit's headline numbers."""
        ...
