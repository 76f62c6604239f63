"""Shared helpers for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def assert_close(actual: Any, expected: Any, *, atol: float = 1e-6, rtol: float = 1e-5,
                 msg: str = "") -> None:
    """Compare tensors, numbers, or (nested) dicts and lists of them."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), msg
        assert set(actual) == set(expected), f"{msg}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], atol=atol, rtol=rtol, msg=f"{msg}[{key}]")
        return
    if isinstance(expected, (list, tuple)) and not torch.is_tensor(expected):
        assert len(actual) == len(expected), msg
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, atol=atol, rtol=rtol, msg=f"{msg}[{i}]")
        return
    actual_t = torch.as_tensor(actual, dtype=torch.float64)
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual_t, expected_t, atol=atol, rtol=rtol, msg=msg or None)


#: The first bytes of every PNG file.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tutorial(path: Path, workdir: Path, *, timeout: float = 600
                 ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``path`` in quick mode (``CI=1``) with its figures going to ``workdir/figures``."""
    out = workdir / "figures"
    env = {**os.environ, "CI": "1", "STRUCTSEL_TUTORIAL_OUT": str(out), "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, str(path)], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return run, out
