"""ArviZ export (ps.to_inference_data) and the diagnostics of a fit (k-hat, ELBO convergence)."""

from __future__ import annotations

import json
import math
import warnings

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pyro.distributions import constraints  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from pyro_structsel.util.sampling import VectorizationWarning  # noqa: E402
from pyro_structsel.report.inference_data import to_inference_data  # noqa: E402
from pyro_structsel import (  # noqa: E402
    ConvergenceWarning,
    ParetoKWarning,
    diagnose,
    elbo_convergence,
    psis_khat,
)

from common import assert_close  # noqa: E402

# az.loo / az.compare flag pointwise k-hat above 1 - 1/log10(S) (0.57 for 200 draws)
LOO_KHAT = "ignore:Estimated shape parameter of Pareto:UserWarning"
NUM_SAMPLES = 200
BASES = ("linear", "square", "cubic")


def _features(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x, x ** 2, x ** 3], -1)


def basis_model(x, y=None, batch_size=None):
    """y = 2 <gamma, (x, x^2, x^3)> + b, noise scale chosen by a second site; vectorisable."""
    gamma = ps.structure("basis", BASES)
    noise = ps.structure("noise", ["small", "large"])
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    mean = 2 * (_features(x) * gamma).sum(-1) + b
    scale = (noise * torch.tensor([0.3, 1.0])).sum(-1)
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        pyro.sample("y", dist.Normal(mean[..., idx], scale), obs=None if y is None else y[idx])


def odd_model(x, y=None):
    """A worse model of the same data: odd bases only, Concrete prior (sampled in log space)."""
    gamma = ps.structure("odd", ["linear", "cubic"], prior="concrete", temperature=0.5)
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    mean = 2 * (_features(x)[..., [0, 2]] * gamma).sum(-1) + b
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, 0.3), obs=y)


def matmul_model(x, y=None):
    """A user model written as x @ W + b: it breaks under a batch of draws."""
    gamma = ps.structure("basis", BASES)
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    mean = (_features(x) * gamma) @ w + b
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, 0.3), obs=y)


def misbroadcast_model(x, y=None):
    """Runs under a batch of draws but silently broadcasts them against each other."""
    gamma = ps.structure("basis", BASES)
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    mean = 2 * (_features(x) * gamma.unsqueeze(-2)).sum(-1) + b.unsqueeze(-1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, 0.3), obs=y)


def misplaced_guide(x, y=None, batch_size=None):
    """A deliberately bad q: fixed on the wrong basis, and far too narrow on the offset."""
    pyro.sample("basis", dist.Dirichlet(torch.tensor([20.0, 1.0, 1.0])))
    concentration = pyro.param("noise_concentration", torch.full((2,), 5.0),
                               constraint=constraints.positive)
    pyro.sample("noise", dist.Dirichlet(concentration))
    pyro.sample("b", dist.Normal(pyro.param("b_loc", torch.tensor(0.0)), 1e-2))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 40)
    return x, 2 * x ** 2 + 0.3 * torch.randn(40, generator=generator)


def _fit(model, **kwargs) -> ps.SelectionResult:
    x, y = _data()
    options = dict(num_steps=300, lr=0.05, seed=0, progress=False, num_evidence_samples=200)
    return ps.select_structure(model, x, y, **{**options, **kwargs})


@pytest.fixture(scope="module")
def fit():
    return _fit(basis_model)


@pytest.fixture(scope="module")
def idata(fit):
    return to_inference_data(fit, num_samples=NUM_SAMPLES, seed=1)


@pytest.fixture(scope="module")
def odd_idata():
    return to_inference_data(_fit(odd_model), num_samples=NUM_SAMPLES, seed=1)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_groups_dims_and_coords(fit, idata):
    assert set(idata.groups()) == {"posterior", "prior", "log_likelihood", "observed_data",
                                   "constant_data", "sample_stats", "elbo_trace"}
    basis = idata.posterior["basis"]
    assert basis.dims == ("chain", "draw", "basis_option")
    assert basis.shape == (1, NUM_SAMPLES, 3)
    assert list(basis["basis_option"].values) == list(BASES)
    assert list(idata.posterior["noise"]["noise_option"].values) == ["small", "large"]
    assert set(idata.posterior.data_vars) == {"basis", "noise"}  # weights only when asked
    assert idata.prior["basis"].dims == basis.dims
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "y_dim_0")
    assert idata.log_likelihood["y"].shape == (1, NUM_SAMPLES, 40)
    x, y = _data()
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    np.testing.assert_array_equal(idata.constant_data["x"].values, x.numpy())
    assert set(idata.constant_data.data_vars) == {"x"}  # y is the observation, not an input
    assert set(idata.sample_stats.data_vars) == {"lp", "log_prior", "log_q", "log_weight"}
    np.testing.assert_allclose(idata.elbo_trace["loss"].values, fit.losses)
    assert idata.elbo_trace["loss"].dims == ("step",)
    np.testing.assert_allclose(idata.elbo_trace["elbo"].values, -np.asarray(fit.losses))


def test_draws_scores_and_weights_come_from_the_same_traces(fit, idata):
    gamma = idata.posterior["basis"].values[0]
    assert_close(gamma.sum(-1), np.ones(NUM_SAMPLES), atol=1e-5)
    assert_close(gamma.mean(0), fit.posterior_mean["basis"], atol=0.05)
    assert_close(idata.prior["basis"].values[0].mean(0), np.full(3, 1 / 3), atol=0.07)
    stats = idata.sample_stats
    log_lik = idata.log_likelihood["y"].values.sum(-1)
    assert_close(stats["lp"].values - stats["log_prior"].values, log_lik, atol=1e-3)
    assert_close(stats["log_weight"].values, stats["lp"].values - stats["log_q"].values,
                 atol=1e-3)
    # the mean log weight is the ELBO: agrees with the fit's estimate within Monte Carlo error
    elbo = fit.evidence["elbo"]
    weights = stats["log_weight"].values.ravel()
    se = math.hypot(elbo.se, weights.std() / math.sqrt(weights.size))
    assert abs(weights.mean() - elbo.value) < 4 * se


def test_attrs_are_netcdf_safe_and_complete(fit, idata):
    attrs = idata.attrs
    assert all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
               for v in attrs.values()), {k: type(v) for k, v in attrs.items()}
    assert json.loads(attrs["structure"]) == fit.structure == {"basis": "square", "noise": "small"}
    assert json.loads(attrs["options"])["basis"] == list(BASES)
    assert_close(json.loads(attrs["probabilities"])["basis"], fit.probabilities["basis"])
    assert attrs["log_evidence_elbo"] == fit.evidence["elbo"].value
    assert json.loads(attrs["evidence"])["elbo"]["se"] == fit.evidence["elbo"].se
    assert attrs["structural_complexity"] == fit.structural_complexity.value
    assert attrs["parametric_complexity"] == fit.parametric_complexity.value
    assert attrs["description_length_bits"] == fit.description_length.total_bits
    assert attrs["num_samples"] == NUM_SAMPLES and attrs["vectorized"] == 1
    assert 0 <= attrs["khat"] <= 0.7 and attrs["elbo_converged"] == 1
    assert fit.diagnostics.khat.value == attrs["khat"]  # reported on the result too


def test_summary_on_structural_sites(idata):
    summary = az.summary(idata, var_names=["basis", "noise"])
    assert list(summary.index) == ["basis[linear]", "basis[square]", "basis[cubic]",
                                   "noise[small]", "noise[large]"]
    assert summary.loc["basis[square]", "mean"] > 0.8
    assert (summary["ess_bulk"] > 50).all()


def test_plot_posterior_runs(idata):
    axes = az.plot_posterior(idata, var_names=["basis"])
    assert np.size(axes) == 3


@pytest.mark.filterwarnings(LOO_KHAT)
def test_loo_waic_and_compare(idata, odd_idata):
    loo = az.loo(idata, pointwise=True)
    assert loo.n_data_points == 40 and loo.n_samples == NUM_SAMPLES
    assert math.isfinite(loo.elpd_loo) and loo.loo_i.shape == (40,)
    assert math.isfinite(az.waic(idata).elpd_waic)
    table = az.compare({"basis": idata, "odd": odd_idata})
    assert list(table.index) == ["basis", "odd"]  # x^2 data: the even basis wins
    assert table.loc["odd", "elpd_diff"] > 2 * table.loc["odd", "dse"]


def test_concrete_site_is_exported_on_the_simplex(odd_idata):
    odd = odd_idata.posterior["odd"]
    assert list(odd["odd_option"].values) == ["linear", "cubic"]
    assert (odd.values >= 0).all() and (odd.values <= 1).all()
    assert_close(odd.values.sum(-1), np.ones((1, NUM_SAMPLES)), atol=1e-5)
    assert_close(odd_idata.prior["odd"].values.sum(-1), np.ones((1, NUM_SAMPLES)), atol=1e-5)


def test_netcdf_round_trip_keeps_every_group_and_attr(idata, tmp_path):
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert set(loaded.groups()) == set(idata.groups())
    assert loaded.attrs == idata.attrs
    for group in idata.groups():
        original, back = idata[group], loaded[group]
        assert set(back.data_vars) == set(original.data_vars), group
        for name in original.data_vars:
            np.testing.assert_array_equal(back[name].values, original[name].values)
            assert back[name].dims == original[name].dims
    assert list(loaded.posterior["basis_option"].values) == list(BASES)


def test_include_weights_and_result_method(fit):
    idata = fit.to_inference_data(num_samples=20, include_weights=True, seed=0, warn=False)
    assert set(idata.posterior.data_vars) == {"basis", "noise", "b"}
    assert idata.posterior["b"].shape == (1, 20) and idata.prior["b"].shape == (1, 20)


def test_seed_reproduces_and_leaves_global_state(fit):
    state = torch.get_rng_state()
    first = to_inference_data(fit, num_samples=20, seed=3, warn=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = to_inference_data(fit, num_samples=20, seed=3, warn=False)
    np.testing.assert_array_equal(first.posterior["basis"].values,
                                  second.posterior["basis"].values)


def test_minibatch_fit_is_exported_on_the_full_data():
    fit = _fit(basis_model, batch_size=10, num_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ps.DiagnosticWarning)
        idata = to_inference_data(fit, num_samples=30, seed=0)
    assert idata.log_likelihood["y"].shape == (1, 30, 40)  # every observation, not 10
    assert json.loads(idata.attrs["dropped_model_kwargs"]) == ["batch_size"]
    with pytest.raises(ValueError, match="subsampled to 10 of 40.*model_kwargs"):
        to_inference_data(fit, num_samples=30, model_kwargs={"batch_size": 10})


@pytest.mark.parametrize("model", [matmul_model, misbroadcast_model])
def test_models_unsafe_for_vectorised_draws_fall_back(model):
    with pytest.warns(VectorizationWarning):
        fit = _fit(model, num_steps=150)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = to_inference_data(fit, num_samples=50, seed=0, warn=False)
    vectorization = [w for w in caught if issubclass(w.category, VectorizationWarning)]
    assert len(vectorization) == 1, [str(w.message) for w in caught]  # once, at the user's line
    assert vectorization[0].filename == __file__
    assert idata.attrs["vectorized"] == 0
    loop = to_inference_data(fit, num_samples=50, seed=0, vectorize=False, warn=False)
    for group in ("posterior", "prior", "log_likelihood", "sample_stats"):
        for name in loop[group].data_vars:
            assert idata[group][name].shape == loop[group][name].shape, (group, name)
    assert idata.log_likelihood["y"].shape == (1, 50, 40)
    stats = idata.sample_stats
    assert_close(stats["lp"].values - stats["log_prior"].values,
                 idata.log_likelihood["y"].values.sum(-1), atol=1e-3)
    weights = stats["log_weight"].values.ravel()
    elbo = fit.evidence["elbo"]
    assert abs(weights.mean() - elbo.value) < 4 * math.hypot(elbo.se, weights.std() / math.sqrt(50))


@pytest.mark.filterwarnings("ignore:No parametric complexity:UserWarning")  # a non-Gaussian q
def test_khat_warns_for_a_bad_q():
    # the export scores the relaxed q the user's guide fitted; the discrete check (on by
    # default with two sites) would refit each structure with the default guide and warn
    # that this q is overconfident, which test_discrete_check covers
    fit = _fit(basis_model, guide=misplaced_guide, num_steps=200, discrete_check=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = to_inference_data(fit, num_samples=NUM_SAMPLES, seed=0)
    khat = [w for w in caught if issubclass(w.category, ParetoKWarning)]
    assert len(khat) == 1 and "k-hat" in str(khat[0].message)
    assert khat[0].filename == __file__  # stacklevel points at the user's call
    assert idata.attrs["khat"] > 0.7
    with pytest.warns(ParetoKWarning):
        diagnostics = diagnose(fit, num_samples=NUM_SAMPLES, tol=1.0)
    assert diagnostics.khat.value > 0.7 and not diagnostics.ok
    assert fit.diagnostics is diagnostics


def test_diagnose_a_good_fit_without_warnings(fit):
    diagnostics = fit.diagnose(num_samples=NUM_SAMPLES)
    assert diagnostics.khat.value < 0.7 and diagnostics.convergence.converged and diagnostics.ok
    assert 0 < diagnostics.khat.diagnostics["ess"] <= NUM_SAMPLES
    assert set(diagnostics.to_dict()) >= {"khat", "importance_ess", "elbo_converged"}


def test_psis_khat_light_and_heavy_tails():
    generator = torch.Generator().manual_seed(0)
    light = psis_khat(0.1 * torch.randn(1000, generator=generator))
    assert light.value < 0.5 and light.method == "psis" and light.num_samples == 1000
    assert light.diagnostics["ess"] > 900
    heavy_weights = torch.distributions.Pareto(1.0, 0.5).sample((1000,)).log()  # k = 2
    with pytest.warns(ParetoKWarning, match="k-hat"):
        heavy = psis_khat(heavy_weights)
    assert heavy.value > 0.7
    with pytest.warns(ps.DiagnosticWarning, match="Too few draws"):
        assert math.isnan(psis_khat(torch.zeros(20)).value)
    degenerate = torch.cat([torch.zeros(1), torch.full((199,), -1000.0)])
    with pytest.warns(ParetoKWarning, match="inf"):
        assert psis_khat(degenerate).value == math.inf
    with pytest.raises(ValueError, match="finite"):
        psis_khat(torch.tensor([0.0, float("nan")]))


def test_elbo_convergence():
    generator = torch.Generator().manual_seed(0)
    steps = torch.arange(1000.0)
    flat = 100.0 / (steps + 1) + 50 + torch.randn(1000, generator=generator)
    assert elbo_convergence(flat).converged
    with pytest.warns(ConvergenceWarning, match="not converged"):
        falling = elbo_convergence(1000.0 - steps)
    assert not falling.converged and falling.relative_change > 0.01 and falling.window == 200
    with pytest.warns(ConvergenceWarning, match="too few"):
        assert not elbo_convergence([3.0, 2.0, 1.0]).converged
    with pytest.raises(ValueError, match="window"):
        elbo_convergence(flat, window=0.0)


def test_bad_arguments():
    fit = ps.SelectionResult.__new__(ps.SelectionResult)
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(fit, num_samples=0)
    with pytest.raises(ValueError, match="model_kwargs"):
        to_inference_data(fit, model_kwargs=[("batch_size", 1)])


def test_fixed_structure_fit_exports_its_weights():
    x, y = _data()
    fixed = ps.fix_structure(basis_model, {"basis": "square", "noise": "small"})
    guide = pyro.infer.autoguide.AutoNormal(fixed)
    with pyro.get_param_store().scope() as state:
        svi = pyro.infer.SVI(fixed, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
        losses = [svi.step(x, y) for _ in range(100)]
    result = ps.SelectionResult(model=fixed, guide=guide, args=(x, y), kwargs={},
                                param_state=state, sites={}, losses=losses,
                                restart_losses=[losses[-1]])
    idata = to_inference_data(result, num_samples=NUM_SAMPLES, seed=0)
    assert set(idata.posterior.data_vars) == {"b"}  # no Γ: the weights instead
    assert set(idata.observed_data.data_vars) == {"y"}  # pinned sites are not data
    assert idata.log_likelihood["y"].shape == (1, NUM_SAMPLES, 40)
    assert_close(idata.posterior["b"].values.mean(), 0.0, atol=0.2)
