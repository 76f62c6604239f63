"""``select_structure`` and its result: fitting and scoring together."""

from __future__ import annotations

from .result import SelectionResult
from .select import select_structure

__all__ = [
    "SelectionResult",
    "select_structure",
]
