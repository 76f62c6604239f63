"""Checkpoint files of a fit: written atomically, read back as data.

A checkpoint holds the parameters, the optimiser state, the RNG state, the
step and the loss trace, written to a temporary file and renamed over the
old one, so a run killed at any moment leaves either the previous or the
new checkpoint, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "pyro_structsel.checkpoint/1"


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` if there is none."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, weights_only=False)
    except Exception:  # noqa: BLE001 -- not a torch file at all (text, empty, truncated)
        state = None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a pyro_structsel checkpoint; remove it or "
                         "pass another checkpoint path.")
    return state
