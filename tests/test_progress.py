"""Progress bars: a live bar on a terminal, one line per bar elsewhere, nothing when disabled."""

from __future__ import annotations

import io

import torch

import pyro_structsel as ps
from pyro_structsel.util import progress


def _linear_model(x, y):
    import pyro
    import pyro.distributions as dist

    gamma = ps.structure("basis", ["x", "x2"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = w * (gamma[..., 0] * x + gamma[..., 1] * x**2)
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mean, 0.5), obs=y)


def test_off_a_terminal_a_bar_writes_one_line_when_it_closes():
    out = io.StringIO()
    bar = progress.LineProgress(total=500, desc="select_structure", file=out)
    for _ in range(500):
        bar.update(1)
        bar.set_postfix(elbo="-12.5")
    assert out.getvalue() == ""  # silent while it runs
    bar.close()
    bar.close()  # closing twice writes once
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("select_structure: 500/500 steps in ")
    assert lines[0].endswith("elbo=-12.5")


def test_an_iterated_bar_counts_its_items_and_reports_once():
    out = io.StringIO()
    items = list(progress.LineProgress(range(7), desc="compare_structures", unit="structures",
                                       file=out))
    assert items == list(range(7))
    assert out.getvalue().startswith("compare_structures: 7/7 structures in ")
    assert len(out.getvalue().splitlines()) == 1


def test_fit_prints_one_line_off_a_terminal_and_nothing_without_progress(capfd):
    x = torch.linspace(-1, 1, 30)
    y = 0.7 * x**2
    ps.select_structure(_linear_model, x, y, num_steps=300, seed=0, progress=True)
    err = capfd.readouterr().err
    bar_lines = [line for line in err.splitlines() if line.startswith("select_structure")]
    assert len(bar_lines) == 1, err
    assert "300/300 steps" in bar_lines[0] and "elbo=" in bar_lines[0]
    ps.select_structure(_linear_model, x, y, num_steps=50, seed=0, progress=False)
    assert capfd.readouterr().err == ""


def test_on_a_terminal_the_bar_is_tqdm(monkeypatch):
    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)
    bar = progress.progress_bar(total=3, desc="x")
    try:
        assert type(bar).__module__.startswith("tqdm")
    finally:
        bar.close()
    assert isinstance(progress.progress_bar(total=3, desc="x", enabled=False).disable, bool)
