"""``select_structure`` and its result: fitting and scoring together."""

from __future__ import annotations

from .discrete_check import DiscreteCheck, OverconfidenceWarning
from .result import SelectionResult
from .select import select_structure

__all__ = [
    "DiscreteCheck",
    "OverconfidenceWarning",
    "SelectionResult",
    "select_structure",
]
