"""What every layer uses: string options, stack levels, draws, ranks, checks, progress bars."""

from __future__ import annotations

from .options import Aggregation, Likelihood, Prior, parse_option
from .ranks import DistributedWarning, init_distributed, is_main_process, use_distributed
from .sampling import Draws, VectorizationWarning, draw, draw_guide, trace_model
from .stacklevel import find_stack_level
from .validation import check_finite, check_inputs

__all__ = [
    "Aggregation",
    "DistributedWarning",
    "Draws",
    "Likelihood",
    "Prior",
    "VectorizationWarning",
    "check_finite",
    "check_inputs",
    "draw",
    "draw_guide",
    "find_stack_level",
    "init_distributed",
    "is_main_process",
    "parse_option",
    "trace_model",
    "use_distributed",
]
