"""Tutorial 05 (gradient-descent evidence along training) runs in quick mode."""

from __future__ import annotations

import re
from pathlib import Path

from common import PNG_SIGNATURE, run_tutorial

SCRIPT = Path(__file__).resolve().parent.parent / "tutorials" / "05_gradient_descent_evidence.py"


def test_tutorial_05_quick_mode(tmp_path: Path) -> None:
    run, out = run_tutorial(SCRIPT, tmp_path, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stderr.strip() == "", run.stderr  # no warnings (StepSizeWarning included)
    png = out / "05_gradient_descent_evidence.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    peak = re.search(r"peak of the evidence estimate: step (\d+), ([-\d.]+) ± [\d.]+ nats "
                     r"\(step 0: ([-\d.]+), last step: ([-\d.]+)\)", run.stdout)
    held = re.search(r"best held-out log-likelihood:\s+step (\d+), ([-\d.]+)", run.stdout)
    assert peak and held, run.stdout
    best, at_peak, first, last = int(peak[1]), float(peak[2]), float(peak[3]), float(peak[4])
    # the estimate rises, peaks inside the run, and falls again
    assert 0 < best < 200 and at_peak > first and at_peak > last
    assert 0 < int(held[1]) <= 200
