"""Bad input gets a clear error (or a warning) before any long computation, never a silent answer.

One parametrised test per group of inputs: data, options, structures and
sites, models, builders and reports. Each case must raise the named error
class with a message that names the argument or the site (``match``); the
fits are a few steps long and most cases stop before the first one.
``benchmarks/adversarial.py`` runs a wider set of cases and tabulates them.
"""

from __future__ import annotations

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_structsel as ps
from pyro_structsel.util.memory import AllocationCounter, chunk_size_for
from pyro_structsel.util.sampling import draw
from pyro_structsel.util.validation import close_match, edit_distance

QUICK = dict(progress=False, num_evidence_samples=5)


def toy_data(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-2, 2, n)
    return x, torch.sin(1.3 * x)


def toy_model(x, y=None):
    gamma = ps.structure("basis", ["sin", "linear"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def cls_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def net(out: int = 3) -> ps.NetworkModel:
    return ps.NetworkModel(ps.one_hidden_layer(4, out, hidden=3))


def no_fit(step, loss):
    raise AssertionError("the fit started although the input was bad")


def select(model, *args, **options):
    return ps.select_structure(model, *args, num_steps=3, callback=no_fit, **QUICK, **options)


# ----------------------------------------------------------------------------- data


def _data_case(case: str):
    x, y = cls_data()
    tx, ty = toy_data()
    cases = {
        "y (N, 1), categorical, stock": lambda: select(net(), x, y[:, None], fast=False),
        "y (N, 1), categorical, fast": lambda: select(net(), x, y[:, None]),
        "y (N, 1), user normal": lambda: select(toy_model, tx, ty[:, None]),
        "x float64": lambda: select(net(), x.double(), y),
        "x int64": lambda: select(net(), x.long(), y),
        "empty": lambda: select(net(), x[:0], y[:0]),
        "label out of range": lambda: select(net(), x, torch.where(y == 2, 7, y)),
        "negative label": lambda: select(net(), x, y - 1),
        "x 1-D": lambda: select(net(), x[:, 0], y),
        "x too few features": lambda: select(net(), x[:, :3], y),
        "x 3-D": lambda: select(net(), x[:, None].expand(-1, 2, -1), y),
        "one class": lambda: select(net(out=1), x, torch.zeros_like(y)),
        "y missing": lambda: select(net(), x),
        "y nan": lambda: select(toy_model, tx, torch.full_like(ty, math.nan)),
    }
    return cases[case]


@pytest.mark.parametrize("case, error, match", [
    ("y (N, 1), categorical, stock", ValueError,
     r"'obs' \(argument 'y'\) has shape \(40, 1\).*broadcast to shape \(40, 40\).*squeeze"),
    ("y (N, 1), categorical, fast", ValueError, r"count each observation 40 times"),
    ("y (N, 1), user normal", ValueError, r"'obs' \(argument 'y'\) has shape \(30, 1\)"),
    ("x float64", TypeError, r"x has dtype torch.float64.*weights are torch.float32"),
    ("x int64", TypeError, r"x has dtype torch.int64.*x.to\(torch.float32\)"),
    ("empty", ValueError, r"Argument 'x' is empty \(shape \(0, 4\)"),
    ("label out of range", ValueError, r"'obs' \(argument 'y'\).*labels must be integers 0 \.\. 2"
                                       r".*range from 0 to 7"),
    ("negative label", ValueError, r"labels must be integers 0 \.\. 2.*from -1"),
    ("x 1-D", ValueError, r"x has shape \(40,\).*4 features.*x\[:, None\]"),
    ("x too few features", ValueError, r"cannot run on x of shape \(40, 3\).*4 features"),
    ("x 3-D", ValueError, r"maps x of shape \(40, 2, 4\) to an output of shape \(40, 2, 3\)"),
    ("one class", ValueError, r"categorical likelihood over 1 class"),
    ("y missing", ValueError, r"observes no data"),
    ("y nan", ValueError, r"Argument 'y' contains 30 NaN"),
])
def test_bad_data_is_refused_before_the_fit(case, error, match):
    with pytest.raises(error, match=match):
        _data_case(case)()


def test_adam_state_overflow_stops_the_fit():
    # x at 1e30: finite loss and gradients, but Adam's g**2 is inf, so the parameters would
    # never move and the fit would report its initial q
    def logistic(x, y):
        gamma = ps.structure("basis", ["sin", "linear"])
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        logits = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)

    x, _ = toy_data()
    # labels alternate, so a draw of w of either sign has a huge loss (with y = (x > 0) a
    # positive w fits every label, its gradient vanishes, and whether the fit overflowed depended on the draws)
    y = (torch.arange(len(x)) % 2).float()
    with pytest.raises(ps.NonFiniteLossError,
                       match=r"step \d+ .*optimiser state .* of the parameters \[.*'AutoGuideList"
                             r"\.1\.locs\.w'.*never move.*rescale the data"):
        ps.select_structure(logistic, 1e30 * x, y, num_steps=5, **QUICK)


# ----------------------------------------------------------------------------- options


def _kwargs_model(x, y=None, **options):
    toy_model(x, y)


@pytest.mark.parametrize("options, error, match", [
    ({"optim": "adam"}, TypeError, r"Expected optim to be a Pyro optimiser .* got 'adam'"),
    ({"optim": torch.optim.Adam([torch.zeros(1, requires_grad=True)])}, TypeError,
     r"object of class Adam, which holds parameters of its own"),
    ({"seed": "0"}, TypeError, r"Expected seed to be an int or None, but got '0'"),
    ({"seed": 0.5}, TypeError, r"Expected seed to be an int"),
    ({"seed": -1}, ValueError, r"0 <= seed < 2\*\*32"),
    ({"temperature": (1.0, 0.5, 0.1)}, ValueError, r"temperature to be a number T > 0 or a pair"),
    ({"temperature": "hot"}, ValueError, r"temperature to be a number T > 0 or a pair"),
    ({"callback": "print"}, TypeError, r"Expected callback to be a callable"),
    ({"vectorize_particles": "yes"}, ValueError, r"vectorize_particles to be True, False or None"),
    ({"lr": float("nan")}, ValueError, r"Expected lr > 0"),
    ({"resume": "loose"}, ValueError, r"Unknown resume 'loose'; expected one of 'strict'"),
    ({"positional": 100}, TypeError, r"too many positional arguments.*num_steps=100"),
    ({"batchsize": 10}, TypeError, r"takes no argument 'batchsize'; did you mean 'batch_size'"),
])
def test_bad_options_are_refused_before_the_fit(options, error, match):
    x, y = cls_data()
    args = (x, y, options.pop("positional")) if "positional" in options else (x, y)
    callback = options.pop("callback", no_fit)
    with pytest.raises(error, match=match):
        ps.select_structure(net(), *args, num_steps=3, callback=callback, **QUICK, **options)


def test_misspelled_option_swallowed_by_model_kwargs_warns():
    x, y = toy_data()
    with pytest.warns(UserWarning, match=r"passes the keyword num_evidence_sample= to the model, "
                                         r"whose \*\*options takes it; did you mean "
                                         r"select_structure's own num_evidence_samples="):
        ps.select_structure(_kwargs_model, x, y, num_steps=2, progress=False,
                            num_evidence_sample=5)
    assert edit_distance("batchsize", "batch_size") == 1
    assert close_match("num_step", ["num_steps", "lr"]) == "num_steps"
    assert close_match("x", ["lr", "y"]) is None  # one-letter names are not "close"


def test_torch_optimizer_class_trains():
    x, y = toy_data()
    result = ps.select_structure(toy_model, x, y, num_steps=30, optim=torch.optim.Adam,
                                 lr=0.05, seed=0, **QUICK)
    concentration = result.param_state["params"]["AutoGuideList.0.concentrations.basis"]
    assert not torch.allclose(concentration.detach(), torch.tensor(math.log(5.0)))  # it moved
    assert result.losses[-1] < result.losses[0]


# ----------------------------------------------------------------------------- sites


def _int_labels(x, y=None):
    gamma = ps.structure("g", [1, 0])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal((gamma * torch.stack([w * x, 0 * x], -1)).sum(-1), 0.5),
                    obs=y)


def _local_structure(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        gamma = ps.structure("basis", ["sin", "linear"])
        mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def _subsampled(x, y=None):
    gamma = ps.structure("basis", ["sin", "linear"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=8) as idx:
        mean = (gamma * torch.stack([torch.sin(w * x[idx]), w * x[idx]], -1)).sum(-1)
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y[idx])


_calls = [0]


def _changing(x, y=None):
    _calls[0] += 1
    gamma = ps.structure("basis", ["sin", "linear"])
    w = pyro.sample("w" if _calls[0] % 2 else "v", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal((gamma * torch.stack([w * x, x], -1)).sum(-1), 0.5),
                    obs=y)


def _trace(model, structure):
    x, y = toy_data()
    return pyro.poutine.trace(ps.fix_structure(model, structure)).get_trace(x, y)


def _site_case(case: str):
    x, y = toy_data()
    guide = ps.AutoMeanFieldNormal(pyro.poutine.block(
        ps.fix_structure(toy_model, {"basis": "sin"}), hide=["basis"]))
    cases = {
        "int label vs index": lambda: _trace(_int_labels, {"g": 1}),
        "unknown site": lambda: _trace(toy_model, {"basis": "sin", "bassis": "sin"}),
        "name not a str": lambda: ps.structure(5, 3),
        "inside the data plate": lambda: select(_local_structure, x, y),
        "sites change": lambda: select(_changing, x, y),
        "laplace on a subsampled plate": lambda: select(_subsampled, x, y,
                                                        evidence=("laplace",)),
        "elbo on a subsampled plate": lambda: ps.elbo(_subsampled, guide, x, y,
                                                      num_particles=5),
        "iwae on a subsampled plate": lambda: ps.iwae(_subsampled, guide, x, y, num_samples=5),
        "compare: structures a dict": lambda: ps.compare_structures(
            toy_model, x, y, structures={"basis": "sin"}, progress=False),
        "elbo without a guide": lambda: ps.elbo(toy_model, None, x, y),
        "elbo num_particles=0": lambda: ps.elbo(toy_model, guide, x, y, num_particles=0),
    }
    return cases[case]


@pytest.mark.parametrize("case, error, match", [
    ("int label vs index", ValueError,
     r"Option 1 of structural site 'g' is ambiguous.*label '1' \(index 0\) or the index 1"),
    ("unknown site", ValueError, r"names site\(s\) \['bassis'\] that the model never sampled; "
                                 r"its structural sites are \['basis'\]"),
    ("name not a str", TypeError, r"Expected name to be a non-empty str"),
    ("inside the data plate", ValueError,
     r"Structural site 'basis' has batch shape \(30,\) because it sits inside plate 'data'"),
    ("sites change", ValueError, r"different latent sites from one call to the next \('v', 'w'"),
    ("laplace on a subsampled plate", ValueError,
     r"select_structure scores the fit on the full data and needs every observation.*'obs' "
     r"sits in plate 'data' subsampled to 8 of 30 rows.*ps.data_plate"),
    ("elbo on a subsampled plate", ValueError, r"The ELBO needs every observation"),
    ("iwae on a subsampled plate", ValueError, r"importance-weighted bound needs every"),
    ("compare: structures a dict", ValueError, r"Expected structures to be a list of dicts"),
    ("elbo without a guide", TypeError, r"expected guide to be a callable Pyro guide"),
    ("elbo num_particles=0", ValueError, r"Expected num_particles to be a positive int"),
])
def test_bad_structures_and_sites_are_refused(case, error, match):
    with pytest.raises(error, match=match):
        _site_case(case)()


def test_compare_structures_gives_no_probability_to_a_nan_row(monkeypatch):
    from pyro_structsel.evidence import comparison

    def model(x, y=None):
        gamma = ps.structure("basis", ["sin", "linear", "cube"])
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        mean = (gamma * torch.stack([torch.sin(w * x), w * x, (w * x) ** 3], -1)).sum(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)

    original = comparison.estimate_evidence

    def estimate(method, fixed, guide, *args, **kwargs):  # the 'linear' one cannot be scored
        value = original(method, fixed, guide, *args, **kwargs)
        pinned = pyro.poutine.trace(fixed).get_trace(*args).nodes["basis"]["value"]
        return ps.Estimate(math.nan, math.nan, 0, "laplace") if pinned[1] == 1 else value

    monkeypatch.setattr(comparison, "estimate_evidence", estimate)
    x, y = toy_data()
    with pytest.warns(UserWarning, match=r"could not compute the log evidence of "
                                         r"\['basis=linear'\]"):
        table = ps.compare_structures(model, x, y, method="laplace", progress=False)
    assert table.attrs["excluded"] == ["basis=linear"]
    bad = table.loc["basis=linear"]
    assert math.isnan(bad["probability"]) and math.isnan(bad["log_bayes_factor"])
    assert "excluded from the normalisation" in bad["note"]
    assert table.index[-1] == "basis=linear"
    scored = table.drop(index="basis=linear")
    assert math.isclose(scored["probability"].sum(), 1.0, rel_tol=1e-12)
    assert (scored["note"] == "").all()


# ----------------------------------------------------------------------------- builders, reports


@pytest.mark.parametrize("build, error, match", [
    (lambda: ps.two_hidden_layer(4, 3, hidden=8), ValueError,
     r"Expected hidden to be a pair .* got hidden=8"),
    (lambda: ps.one_hidden_layer(4, 3, activations="relu"), ValueError,
     r"activations to be a list .* letter by letter"),
    (lambda: ps.NetworkModel("net"), ValueError, r"Expected network to be a torch.nn.Module"),
    (lambda: ps.NetworkModel(ps.one_hidden_layer(4, 3), prior_scal=1.0), TypeError,
     r"unexpected keyword argument 'prior_scal'; did you mean 'prior_scale'"),
    (lambda: ps.optimize_hyperparameters(net(), *cls_data(), hyperparameters=["net.prior_scale"],
                                         num_outer_steps=1, num_inner_steps=1, progress=False),
     ValueError, r"'net.prior_scale' is a fixed buffer .* learn_prior_scale=True"),
    (lambda: ps.plot_elbo("losses"), TypeError, r"Expected data to be a SelectionResult"),
    (lambda: ps.to_inference_data("result"), TypeError, r"Expected result to be a Selection"),
    (lambda: ps.structure("g", 3, concentration=-1.0), ValueError, r"concentration > 0"),
])
def test_bad_builder_and_report_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_cli_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    from pyro_structsel.cli import main

    out = tmp_path / "a-file"
    out.write_text("x")
    assert main(["--out", str(out), "--quick"]) == 2
    assert re.search(r"argument --out: .*a-file' is a file, not a folder", capsys.readouterr().err)


# ----------------------------------------------------------------------------- memory


def _digits_mlp(hidden: int = 32):
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data[:400], dtype=torch.float32) / 16.0
    y = torch.tensor(raw.target[:400])

    def model(x, y=None):  # a user's network written as x @ W1 + b1: a batch of weights
        gamma = ps.structure("act", ["relu", "tanh"])  # broadcasts wrongly against b1
        w1 = pyro.sample("W1", dist.Normal(0.0, 1.0).expand([64, hidden]).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        h = x @ w1 + b1
        h = gamma[..., :1] * torch.relu(h) + gamma[..., 1:] * torch.tanh(h)
        w2 = pyro.sample("W2", dist.Normal(0.0, 1.0).expand([hidden, 10]).to_event(2))
        b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([10]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=h @ w2 + b2), obs=y)

    return model, x, y


class _LargestAllocation(AllocationCounter):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.allocated
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.largest = max(self.largest, self.allocated - before)
        return out


def test_draws_of_a_user_mlp_check_shapes_on_two_draws_first():
    model, x, y = _digits_mlp(hidden=64)
    with pytest.warns(ps.VectorizationWarning):
        result = ps.select_structure(model, x, y, num_steps=3, seed=0, evidence=(), **QUICK)
    # 40 vectorised draws of this model would broadcast to (40, 40, 400, 64) floats, 160 MB
    # (1000 draws on all of digits: 230 GB); one draw's largest tensor is (400, 64), 100 kB
    watch = _LargestAllocation()
    with pytest.warns(ps.VectorizationWarning) as caught, watch:
        idata = result.to_inference_data(num_samples=40, num_prior_samples=4, warn=False)
    assert idata.posterior.sizes["draw"] == 40
    message = str(caught[0].message)
    assert re.search(r"site 'y' has batch shape \(2, 2, 400\)", message)
    assert "\n" not in message and len(message) < 400  # one line, no trace-shape table
    assert watch.largest < 2 ** 20 * 8  # no tensor near the blown-up size


def test_vectorised_draws_are_chunked_to_the_memory_budget():
    x, y = toy_data(200)
    result = ps.select_structure(toy_model, x, y, num_steps=3, seed=0, evidence=(), **QUICK)
    with result.param_scope():
        pyro.set_rng_seed(0)
        unchunked = _LargestAllocation()
        with unchunked:
            whole = draw(toy_model, result.guide, (x, y), num_samples=400)
        pyro.set_rng_seed(0)
        per_draw = AllocationCounter()
        with per_draw:
            draw(toy_model, result.guide, (x, y), num_samples=1)
        budget = int(40 * per_draw.allocated)
        watch = _LargestAllocation()
        with watch:
            chunked = draw(toy_model, result.guide, (x, y), num_samples=400,
                           memory_budget=budget)
    assert chunked.num_samples == 400 and chunked.vectorized
    assert watch.largest < unchunked.largest / 2  # several passes, not one of 400 draws
    assert abs(chunked.log_weights.mean() - whole.log_weights.mean()) < 5 * float(
        whole.log_weights.std() / 10)
    with pytest.raises(MemoryError, match=r"400 draws need .* more than the memory budget"):
        chunk_size_for(1e6, 1e6, 400, 2 ** 20, "The test")
    with pytest.raises(ValueError, match=r"memory_budget to be a number of bytes"):
        draw(toy_model, result.guide, (x, y), num_samples=4, memory_budget=-1)
