"""Tutorial 02 (evidence vs cross-validation for the polynomial degree) runs in quick mode."""

from __future__ import annotations

import re
from pathlib import Path

from common import PNG_SIGNATURE, run_tutorial

SCRIPT = Path(__file__).resolve().parent.parent / "tutorials" / "02_polynomial_evidence.py"


def test_tutorial_02_quick_mode(tmp_path: Path) -> None:
    run, out = run_tutorial(SCRIPT, tmp_path, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stderr.strip() == "", run.stderr  # no warnings
    pngs = {p.name: p for p in out.glob("*.png")}
    assert set(pngs) == {"02_chosen_degree.png", "02_evidence_curve.png"}
    for png in pngs.values():
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    # the table: one row per N and criterion, shares over the 10 degrees summing to 100 %
    rows = re.findall(r"^\s*(10|25|100)\s+(evidence|cross-validation)\s+((?:\d+\s+){10})"
                      r"\s*([\d.]+)\s+([-+\d.]+)$", run.stdout, flags=re.MULTILINE)
    assert len(rows) == 6, run.stdout
    for num, name, shares, mean_degree, test_lpd in rows:
        assert abs(sum(int(s) for s in shares.split()) - 100) <= 5, (num, name, shares)
        assert 0.0 <= float(mean_degree) <= 9.0
    # with 100 points, both criteria find that sin 2πx needs at least a cubic
    for num, name, shares, _, _ in rows:
        if num == "100":
            assert sum(int(s) for s in shares.split()[:3]) == 0, (name, shares)
    assert "same degree picked by both" in run.stdout
