"""Every tutorial runs to the end in its quick mode (``CI=1``) and writes its figures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from common import PNG_SIGNATURE, run_tutorial

TESTS = Path(__file__).resolve().parent
TUTORIALS = sorted((TESTS.parent / "tutorials").glob("[0-9][0-9]_*.py"))  # not the shared setup
# tutorials with a test file of their own (tests/test_tutorial_NN.py) are run there only
GENERIC = [p for p in TUTORIALS if not (TESTS / f"test_tutorial_{p.name[:2]}.py").exists()]


@pytest.fixture(scope="module")
def tutorial_runs(tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Each tutorial run once per test session, on demand."""
    class Runs(dict):
        def __missing__(self, stem: str) -> tuple[subprocess.CompletedProcess[str], Path]:
            path = next(p for p in TUTORIALS if p.stem == stem)
            self[stem] = run_tutorial(path, tmp_path_factory.mktemp(stem))
            return self[stem]
    return Runs()


def test_there_are_tutorials() -> None:
    assert TUTORIALS, "no tutorials/*.py found"


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: p.stem)
def test_tutorial_runs_in_quick_mode(path: Path, tutorial_runs: dict) -> None:
    run, out = tutorial_runs[path.stem]
    assert run.returncode == 0, f"{path.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{path.name} wrote no PNG into {out}"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png


def test_tutorial_01_reads_the_teachers_structure_off_the_vertex(tutorial_runs: dict) -> None:
    run, out = tutorial_runs["01_one_hidden_layer"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "structure read off the vertex: activation = tanh" in run.stdout
    assert {p.name for p in out.glob("*.png")} == {"01_simplex.png", "01_fit.png"}
