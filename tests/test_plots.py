"""Plots of a fit: posterior over Γ, simplex, ELBO trace, evidence comparison."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from pyro_structsel.report.inference_data import to_inference_data  # noqa: E402
from pyro_structsel.report.plots import (  # noqa: E402
    plot_elbo,
    plot_evidence_comparison,
    plot_simplex,
    plot_structure_posterior,
)

from common import assert_close  # noqa: E402

BASES = ["linear", "square", "cubic"]


def model(x, y=None):
    gamma = ps.structure("basis", BASES)
    noise = ps.structure("noise", ["small", "large"])
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    mean = 2 * (torch.stack([x, x ** 2, x ** 3], -1) * gamma).sum(-1) + b
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, (noise * torch.tensor([0.3, 1.0])).sum(-1)), obs=y)


@pytest.fixture(scope="module")
def fit():
    x = torch.linspace(-1, 1, 40)
    y = 2 * x ** 2 + 0.3 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    return ps.select_structure(model, x, y, num_steps=300, lr=0.05, seed=0, progress=False,
                               num_evidence_samples=200)


@pytest.fixture(scope="module")
def idata(fit):
    # the plots do not judge q: this 300-step fit's k-hat is near the 0.7 line (0.22-0.70 over
    # seeds 0-5 and random streams), and test_arviz tests the k-hat warning itself
    return to_inference_data(fit, num_samples=300, seed=0, warn=False)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _saved(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_structure_posterior_from_a_result(fit, tmp_path):
    axes = plot_structure_posterior(fit, num_samples=300, path=tmp_path / "gamma.png")
    assert _saved(tmp_path / "gamma.png")
    assert [ax.get_title() for ax in axes] == ["basis", "noise"]
    basis = axes[0]
    assert [t.get_text() for t in basis.get_xticklabels()] == BASES
    probability_bars = basis.patches[:3]
    assert_close([bar.get_height() for bar in probability_bars], fit.probabilities["basis"])
    mean_bars = basis.patches[3:6]
    assert_close([bar.get_height() for bar in mean_bars], fit.posterior_mean["basis"], atol=0.05)
    star = [line for line in basis.lines if line.get_marker() == "*"][0]
    assert star.get_xdata()[0] == pytest.approx(BASES.index("square") - 0.2)


def test_structure_posterior_from_inference_data(idata):
    fig, ax = plt.subplots()
    returned = plot_structure_posterior(idata, sites=["basis"], ax=ax, interval=0.5)
    assert returned is ax
    gamma = idata.posterior["basis"].values.reshape(-1, 3)
    probabilities = np.bincount(gamma.argmax(-1), minlength=3) / gamma.shape[0]
    assert_close([bar.get_height() for bar in ax.patches[:3]], probabilities)
    with pytest.raises(ValueError, match="Expected 2 Axes"):
        plot_structure_posterior(idata, ax=ax)
    with pytest.raises(ValueError, match="No structural site 'nope'"):
        plot_structure_posterior(idata, sites=["nope"])
    with pytest.raises(ValueError, match="interval"):
        plot_structure_posterior(idata, interval=1.0)


def test_simplex_of_a_three_option_site(fit, idata, tmp_path):
    ax = plot_simplex(idata, path=tmp_path / "simplex.png")
    assert isinstance(ax, Axes) and _saved(tmp_path / "simplex.png")
    prior, posterior = ax.collections[0], ax.collections[1]
    assert len(posterior.get_offsets()) == 300 and len(prior.get_offsets()) == 300
    points = np.asarray(posterior.get_offsets())
    assert (points[:, 1] >= -1e-6).all() and (points[:, 1] <= np.sqrt(3) / 2 + 1e-6).all()
    assert [t.get_text() for t in ax.texts] == BASES
    ax = plot_simplex(fit, "basis", num_samples=100, prior=False)
    assert len(ax.collections[0].get_offsets()) == 100
    with pytest.raises(ValueError, match="three options"):
        plot_simplex(idata, "noise")


def test_elbo_trace(fit, idata, tmp_path):
    ax = plot_elbo(fit, path=tmp_path / "elbo.png")
    assert _saved(tmp_path / "elbo.png")
    assert_close(ax.lines[0].get_ydata(), fit.losses)
    assert any("converged" in t.get_text() for t in ax.get_legend().get_texts())
    assert_close(plot_elbo(idata).lines[0].get_ydata(), fit.losses)
    falling = plot_elbo(list(range(100, 0, -1)), smooth=1)
    assert any("not converged" in t.get_text() for t in falling.get_legend().get_texts())


def test_evidence_comparison_table(tmp_path):
    table = pd.DataFrame({"log_evidence": [-20.1, -35.3, -22.4], "se": [0.3, 1.2, 0.8]},
                         index=pd.Index(["square", "linear", "cubic"], name="structure"))
    ax = plot_evidence_comparison(table, path=tmp_path / "evidence.png")
    assert _saved(tmp_path / "evidence.png")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["linear", "cubic", "square"]
    with pytest.raises(ValueError, match="no column"):
        plot_evidence_comparison(table.rename(columns={"se": "stderr"}))
