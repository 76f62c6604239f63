"""Tutorial 06 (estimators against the held-out truth on a user-written network) runs quickly."""

from __future__ import annotations

import re
from pathlib import Path

from common import PNG_SIGNATURE, run_tutorial

SCRIPT = Path(__file__).resolve().parent.parent / "tutorials" / "06_user_network_evidence.py"


def test_tutorial_06_quick_mode(tmp_path: Path) -> None:
    run, out = run_tutorial(SCRIPT, tmp_path, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stderr.strip() == "", run.stderr  # no warnings
    png = out / "06_digits_evidence_vs_truth.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5_000
    rows = re.findall(r"^(laplace \(default\)|elbo)\s+(\d+)/(\d+)\s+([-\d.na]+)\s+([-\d.na]+)"
                      r"\s+([-\d.na]+)\s+(\d+)\s+layer1=", run.stdout, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["laplace (default)", "elbo"], run.stdout
    for _, right, resolved, *_ in rows:
        assert 0 <= int(right) <= int(resolved) <= 6
    assert re.search(r"digits: \d+ truth-resolved pairs of 6; seed-to-seed tau", run.stdout)
