"""Warnings that point at the user's line, not at the library's."""

from __future__ import annotations

import inspect
import os

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pyro_structsel/


def find_stack_level() -> int:
    """The ``stacklevel`` of the first frame outside this package and ``torch`` decorators.

    Pass it to :func:`warnings.warn` from anywhere inside the package: the
    warning then names the line of user code that called into the library.
    """
    frame = inspect.currentframe()
    level = 0
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not (filename.startswith(_PACKAGE_DIR + os.sep) or _is_torch_wrapper(filename)):
            break
        frame = frame.f_back
        level += 1
    return level


def _is_torch_wrapper(filename: str) -> bool:
    # torch.no_grad() and friends wrap functions in a frame of torch/utils/_contextlib.py
    return filename.endswith(os.path.join("torch", "utils", "_contextlib.py"))
