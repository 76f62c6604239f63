"""Adversarial inputs against the public API: does each bad input give a clear error?

Runs a fixed list of bad or unusual inputs (wrong shapes, dtypes, options,
checkpoints, structures, models) against ``import pyro_structsel as ps`` and
classifies what happens:

* ``clear``: the expected error (``ValueError``/``TypeError``, or the named
  error class) with a message that names the cause (every keyword of the case);
* ``handled``: an unusual input that should work, and the result passes the
  case's check;
* ``silent``: a result (or no error, or code run from a file) although the
  input was wrong, or a result that fails its check;
* ``unclear``: an error that does not name the cause, of the wrong type, or
  raised only after the long computation it should have prevented.

The memory cases run in a child process whose address space is capped
(``RLIMIT_AS``, 4 GiB), so a call that tries to allocate tens of gigabytes
fails there instead of taking the machine down; every allocation the cap
refuses is recorded (torch's error, which the vectorised draws' fallback
repeats in its warning, gives the size), and a case is handled only if there
was none (without the cap, such an allocation is what gets a process killed
or swapping) and the peak RSS stayed under the cap.

Run: ``python benchmarks/adversarial.py [--group G] [--no-memory] [--verbose]``;
prints one line per case and then one JSON object with the counts by group.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.optim
import torch

import pyro_structsel as ps

torch.set_num_threads(1)
QUICK = dict(progress=False, num_evidence_samples=10)
TMP = Path(tempfile.mkdtemp(prefix="structsel-adversarial-"))


class Late(Exception):
    """The error came only after the computation it should have prevented."""


@dataclass
class Case:
    group: str
    name: str
    run: Callable[[], Any]
    expect: str = "error"  # "error", "ok", "either", "warn", "error_or_warn"
    keywords: tuple = ()  # each entry: a substring, or a tuple of alternatives
    check: Callable[[Any], bool] | None = None
    errors: tuple = (ValueError, TypeError)
    note: str = ""
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


#: Ways a message names the argument ``x`` or ``y``.
X = ("'x'", " x ", "argument x", "x has")
Y = ("'y'", " y ", "argument y", "y has")


def _named(message: str, keywords: tuple) -> bool:
    message = message.lower()
    for word in keywords:
        options = word if isinstance(word, tuple) else (word,)
        if not any(option.lower() in message for option in options):
            return False
    return True


CASES: list[Case] = []


def case(group: str, name: str, **options: Any) -> Callable[[Callable[[], Any]], Callable]:
    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        CASES.append(Case(group, name, fn, **options))
        return fn
    return register


# ----------------------------------------------------------------------------- fixtures


def toy_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, n)
    return x, torch.sin(1.3 * x) + 0.1 * torch.randn(n, generator=g)


def toy_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("basis", ["sin", "linear"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def toy_model_swapped(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("basis", ["linear", "sin"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([w * x, torch.sin(w * x)], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def other_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("shape", ["sin", "cos", "linear"])
    v = pyro.sample("v", dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([torch.sin(v * x), torch.cos(v * x), v * x], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def cls_data(n: int = 60, d: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y.clamp(max=classes - 1)


def net_model(likelihood: str = "categorical", out: int = 3, **kwargs: Any) -> ps.NetworkModel:
    torch.manual_seed(0)
    return ps.NetworkModel(ps.one_hidden_layer(4, out, hidden=4), likelihood=likelihood,
                           **kwargs)


def reg_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g)
    return x, torch.tanh(x.sum(-1)) + 0.1 * torch.randn(n, generator=g)


@functools.lru_cache(maxsize=None)
def toy_result() -> ps.SelectionResult:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=20, seed=0, **QUICK)


def fresh(name: str) -> Path:
    path = TMP / name
    if path.exists():
        path.unlink()
    return path


# ----------------------------------------------------------------------------- checkpoint

class _Payload:
    """Unpickling it creates a file (a harmless stand-in for a command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


MARKER = TMP / "payload-ran"


def _planted_run() -> Any:
    path = fresh("planted.pt")
    if MARKER.exists():
        MARKER.unlink()
    torch.save({"format": "pyro_structsel.checkpoint/1", "step": 1, "x": _Payload(MARKER)},
               path)
    x, y = toy_data()
    try:
        return ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=path, **QUICK)
    finally:
        if MARKER.exists():
            raise AssertionError("SECURITY: the checkpoint ran code (payload file created)")


@case("checkpoint", "planted pickle payload in the checkpoint path", keywords=("checkpoint",))
def _c_planted() -> Any:
    return _planted_run()


@case("checkpoint", "load_checkpoint of a planted payload", keywords=("checkpoint",))
def _c_planted_load() -> Any:
    path = fresh("planted2.pt")
    if MARKER.exists():
        MARKER.unlink()
    torch.save({"format": "pyro_structsel.checkpoint/2", "x": _Payload(MARKER)}, path)
    try:
        return ps.load_checkpoint(path)
    finally:
        if MARKER.exists():
            raise AssertionError("SECURITY: the checkpoint ran code (payload file created)")


def _resume(first: Callable[[Path], Any], second: Callable[[Path], Any], name: str) -> Any:
    path = fresh(name)
    first(path)
    return second(path)


@case("checkpoint", "checkpoint of another model (other sites)", keywords=("checkpoint", "shape"))
def _c_other_model() -> Any:
    x, y = toy_data()
    return _resume(
        lambda p: ps.select_structure(toy_model, x, y, num_steps=10, checkpoint=p, **QUICK),
        lambda p: ps.select_structure(other_model, x, y, num_steps=20, checkpoint=p, **QUICK),
        "other.pt")


@case("checkpoint", "checkpoint with the options of a site in another order",
      keywords=("checkpoint", "basis"))
def _c_swapped() -> Any:
    x, y = toy_data()
    return _resume(
        lambda p: ps.select_structure(toy_model, x, y, num_steps=10, checkpoint=p, **QUICK),
        lambda p: ps.select_structure(toy_model_swapped, x, y, num_steps=20, checkpoint=p,
                                      **QUICK),
        "swapped.pt")


@case("checkpoint", "checkpoint of other data (same shape)", keywords=("checkpoint", "'y'"))
def _c_other_data() -> Any:
    x, y = toy_data()
    return _resume(
        lambda p: ps.select_structure(toy_model, x, y, num_steps=10, checkpoint=p, **QUICK),
        lambda p: ps.select_structure(toy_model, x, -y, num_steps=20, checkpoint=p, **QUICK),
        "data.pt")


@case("checkpoint", "checkpoint of other data (other rows)", keywords=("checkpoint",))
def _c_other_rows() -> Any:
    x, y = toy_data()
    return _resume(
        lambda p: ps.select_structure(toy_model, x, y, num_steps=10, checkpoint=p, **QUICK),
        lambda p: ps.select_structure(toy_model, x[:30], y[:30], num_steps=20, checkpoint=p,
                                      **QUICK),
        "rows.pt")


@case("checkpoint", "resume with a new lr (fast=False)", keywords=("checkpoint", "lr"))
def _c_lr_stock() -> Any:
    x, y = reg_data()
    return _resume(
        lambda p: ps.select_structure(net_model("normal", 1), x, y, num_steps=10, lr=0.01,
                                      fast=False, checkpoint=p, **QUICK),
        lambda p: ps.select_structure(net_model("normal", 1), x, y, num_steps=20, lr=0.1,
                                      fast=False, checkpoint=p, **QUICK),
        "lr_stock.pt")


@case("checkpoint", "resume with a new lr (fast=True)", keywords=("checkpoint", "lr"))
def _c_lr_fast() -> Any:
    x, y = reg_data()
    return _resume(
        lambda p: ps.select_structure(net_model("normal", 1), x, y, num_steps=10, lr=0.01,
                                      checkpoint=p, **QUICK),
        lambda p: ps.select_structure(net_model("normal", 1), x, y, num_steps=20, lr=0.1,
                                      checkpoint=p, **QUICK),
        "lr_fast.pt")


@case("checkpoint", "resume with another optimiser class", keywords=("checkpoint", "optim"))
def _c_optim_class() -> Any:
    x, y = toy_data()
    return _resume(
        lambda p: ps.select_structure(toy_model, x, y, num_steps=10, checkpoint=p, **QUICK),
        lambda p: ps.select_structure(toy_model, x, y, num_steps=20, checkpoint=p,
                                      optim=pyro.optim.ClippedAdam({"lr": 0.01}), **QUICK),
        "optim.pt")


@case("checkpoint", "resume with the same settings (fast and stock optimiser)", expect="ok",
      check=lambda r: len(r.losses) == 20)
def _c_same() -> Any:
    x, y = reg_data()
    return _resume(
        lambda p: ps.select_structure(net_model("normal", 1), x, y, num_steps=10, seed=0,
                                      checkpoint=p, checkpoint_every=5, **QUICK),
        lambda p: ps.select_structure(net_model("normal", 1), x, y, num_steps=20, seed=0,
                                      fast=False, checkpoint=p, checkpoint_every=5, **QUICK),
        "same.pt")


@case("checkpoint", "checkpoint path is a folder", keywords=("checkpoint",))
def _c_folder() -> Any:
    x, y = toy_data()
    folder = TMP / "a-folder"
    folder.mkdir(exist_ok=True)
    return ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=folder, **QUICK)


@case("checkpoint", "checkpoint folder is a file", keywords=("checkpoint",))
def _c_parent_file() -> Any:
    x, y = toy_data()
    parent = TMP / "plain-file"
    parent.write_text("x")
    return ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=parent / "c.pt",
                               **QUICK)


@case("checkpoint", "truncated checkpoint file", keywords=("checkpoint",))
def _c_truncated() -> Any:
    x, y = toy_data()
    path = fresh("trunc.pt")
    ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=path, **QUICK)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return ps.select_structure(toy_model, x, y, num_steps=10, checkpoint=path, **QUICK)


@case("checkpoint", "checkpoint_every=0", keywords=("checkpoint_every",))
def _c_every() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=fresh("e.pt"),
                               checkpoint_every=0, **QUICK)


@case("checkpoint", "checkpoint=123 (not a path)", keywords=("checkpoint",))
def _c_int_path() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=123, **QUICK)


@case("checkpoint", "text file at the checkpoint path", keywords=("checkpoint",))
def _c_text() -> Any:
    path = fresh("text.pt")
    path.write_text("hello")
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, checkpoint=path, **QUICK)


# ----------------------------------------------------------------------------- data


@case("data", "y of shape (N, 1), categorical, stock path", keywords=(Y + ("'obs'",), "shape"))
def _d_y_column_stock() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y[:, None], num_steps=5, fast=False, **QUICK)


@case("data", "y of shape (N, 1), categorical, fast path", keywords=(Y + ("'obs'",), "shape"))
def _d_y_column_fast() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y[:, None], num_steps=5, **QUICK)


@case("data", "y of shape (N, 1) in a user model's Normal likelihood",
      keywords=(Y + ("'obs'",), "shape"))
def _d_y_column_user() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y[:, None], num_steps=5, **QUICK)


@case("data", "x float64 for a float32 network", expect="either", keywords=(X, "float64"),
      check=lambda r: math.isfinite(r.evidence["elbo"].value))
def _d_x_double() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x.double(), y, num_steps=5, **QUICK)


@case("data", "x int64 for a network", keywords=(X, "int64"))
def _d_x_int() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), (x * 3).long(), y, num_steps=5, **QUICK)


@case("data", "x bool for a network", keywords=(X, "bool"))
def _d_x_bool() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x > 0, y, num_steps=5, **QUICK)


@case("data", "x float64 in a user model with float32 weights", expect="either",
      keywords=(X, "float64"), check=lambda r: math.isfinite(r.evidence["elbo"].value))
def _d_x_double_user() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x.double(), y.double(), num_steps=5, **QUICK)


@case("data", "empty data (0 rows), network", keywords=(X, ("empty", "0 rows", "no rows")))
def _d_empty_net() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x[:0], y[:0], num_steps=5, **QUICK)


@case("data", "empty data (0 rows), user model",
      keywords=(X + Y + ("'obs'",), ("empty", "0 rows", "no rows", "no observ")))
def _d_empty_user() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x[:0], y[:0], num_steps=5, **QUICK)


@case("data", "x with NaN", keywords=(X, "nan"))
def _d_x_nan() -> Any:
    x, y = cls_data()
    x[3, 1] = math.nan
    return ps.select_structure(net_model(), x, y, num_steps=5, **QUICK)


@case("data", "y with inf (user model)", keywords=(Y, "infinite"))
def _d_y_inf() -> Any:
    x, y = toy_data()
    y[2] = math.inf
    return ps.select_structure(toy_model, x, y, num_steps=5, **QUICK)


@case("data", "x scaled to 1e30 (network): Adam state overflows",
      errors=(ps.NonFiniteLossError,), keywords=("non-finite", "adam"))
def _d_x_huge_net() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x * 1e30, y, num_steps=30, seed=0, **QUICK)


def _logistic_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("basis", ["sin", "linear"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    logits = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


@case("data", "x scaled to 1e30 (user model): Adam state overflows",
      errors=(ps.NonFiniteLossError,), keywords=("non-finite", "adam"))
def _d_x_huge_user() -> Any:
    x, y = toy_data()
    return ps.select_structure(_logistic_model, x * 1e30, (y > 0).float(), num_steps=30, seed=0,
                               **QUICK)


@case("data", "class labels out of range", keywords=(Y, ("class", "label")))
def _d_label_range() -> Any:
    x, y = cls_data()
    y[0] = 5
    return ps.select_structure(net_model(), x, y, num_steps=5, **QUICK)


@case("data", "negative class labels", keywords=(Y, ("class", "label")))
def _d_label_negative() -> Any:
    x, y = cls_data()
    y[0] = -1
    return ps.select_structure(net_model(), x, y, num_steps=5, **QUICK)


@case("data", "x 1-D for a network of 4 inputs", keywords=(X, "features"))
def _d_x_1d() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x[:, 0], y, num_steps=5, **QUICK)


@case("data", "x with the wrong number of features", keywords=(X, "features"))
def _d_x_features() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x[:, :3], y, num_steps=5, **QUICK)


@case("data", "x 3-D for a network of 4 inputs", keywords=(X,))
def _d_x_3d() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x[:, None, :].expand(-1, 2, -1), y, num_steps=5,
                               **QUICK)


@case("data", "x a numpy array", expect="either", keywords=(X, "tensor"),
      check=lambda r: math.isfinite(r.evidence["elbo"].value))
def _d_x_numpy() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x.numpy(), y, num_steps=5, **QUICK)


@case("data", "x a list of lists", expect="either", keywords=(X, "tensor"),
      check=lambda r: math.isfinite(r.evidence["elbo"].value))
def _d_x_list() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x.tolist(), y, num_steps=5, **QUICK)


@case("data", "y with other rows than x", keywords=("rows",))
def _d_rows() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y[:-1], num_steps=5, **QUICK)


@case("data", "y float for a categorical likelihood", keywords=(Y, "long"))
def _d_y_float() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y.float(), num_steps=5, **QUICK)


@case("data", "y missing (None) for a network", keywords=(Y + ("observ",),))
def _d_y_none() -> Any:
    x, _ = cls_data()
    return ps.select_structure(net_model(), x, num_steps=5, **QUICK)


@case("data", "batch_size=0", keywords=("batch_size",))
def _d_batch_zero() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y, num_steps=5, batch_size=0, **QUICK)


@case("data", "batch_size=2.5", keywords=("batch_size",))
def _d_batch_float() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y, num_steps=5, batch_size=2.5, **QUICK)


@case("data", "batch_size larger than the data", expect="ok",
      check=lambda r: math.isfinite(r.evidence["elbo"].value))
def _d_batch_big() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y, num_steps=5, batch_size=1000, **QUICK)


@case("data", "x requiring grad", expect="ok",
      check=lambda r: math.isfinite(r.evidence["elbo"].value))
def _d_requires_grad() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x.requires_grad_(), y, num_steps=5, **QUICK)


@case("data", "categorical network with one class", keywords=(("class", "out_features"),))
def _d_one_class() -> Any:
    x, _ = cls_data()
    return ps.select_structure(net_model(out=1), x, torch.zeros(len(x), dtype=torch.long),
                               num_steps=5, **QUICK)


# ----------------------------------------------------------------------------- options


def _params_moved(result: ps.SelectionResult) -> bool:
    params = result.param_state["params"]
    return any("concentration" in name and not bool(torch.allclose(v.detach(), torch.tensor(5.)))
               for name, v in params.items())


@case("options", "optim=torch.optim.Adam (a torch class)", expect="either", keywords=("optim",),
      check=_params_moved)
def _o_torch_class() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=20, optim=torch.optim.Adam, **QUICK)


@case("options", "optim='adam' (a string)", keywords=("optim",))
def _o_optim_str() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, optim="adam", **QUICK)


@case("options", "optim=a torch optimiser object", keywords=("optim",))
def _o_optim_obj() -> Any:
    x, y = toy_data()
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return ps.select_structure(toy_model, x, y, num_steps=5, optim=opt, **QUICK)


@case("options", "lr=0", keywords=("lr",))
def _o_lr_zero() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, lr=0, **QUICK)


@case("options", "lr=nan", keywords=("lr",))
def _o_lr_nan() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, lr=math.nan, **QUICK)


@case("options", "lr='0.01'", keywords=("lr",))
def _o_lr_str() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, lr="0.01", **QUICK)


@case("options", "lr=1e3 on a network", errors=(ps.NonFiniteLossError,),
      keywords=("non-finite", "learning rate"))
def _o_lr_huge() -> Any:
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(64, 2, generator=g)
    y = 10.0 * torch.randn(64, generator=g)
    torch.manual_seed(0)
    model = ps.NetworkModel(ps.one_hidden_layer(2, 1, hidden=4), likelihood="normal",
                            noise_scale=1e-3)
    return ps.select_structure(model, x, y, num_steps=300, lr=1e3, seed=0, **QUICK)


@case("options", "seed='0'", keywords=("seed",))
def _o_seed_str() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, seed="0", **QUICK)


@case("options", "seed=0.5", keywords=("seed",))
def _o_seed_float() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, seed=0.5, **QUICK)


@case("options", "seed=-1", keywords=("seed",))
def _o_seed_negative() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, seed=-1, **QUICK)


@case("options", "num_steps=0", keywords=("num_steps",))
def _o_steps_zero() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=0, **QUICK)


@case("options", "num_steps=2.5", keywords=("num_steps",))
def _o_steps_float() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=2.5, **QUICK)


@case("options", "num_steps passed positionally", keywords=("num_steps",))
def _o_steps_positional() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, 100, **QUICK)


@case("options", "temperature with three values", keywords=("temperature",))
def _o_temp_three() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, temperature=(1.0, 0.5, 0.1),
                               **QUICK)


@case("options", "temperature='hot'", keywords=("temperature",))
def _o_temp_str() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, temperature="hot", **QUICK)


@case("options", "temperature=-1", keywords=("temperature",))
def _o_temp_negative() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, temperature=-1.0, **QUICK)


@case("options", "evidence=('bogus',)", keywords=("bogus",))
def _o_evidence_bogus() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, evidence=("bogus",), **QUICK)


@case("options", "evidence='iwae' (one string)", expect="ok",
      check=lambda r: "iwae" in r.evidence)
def _o_evidence_str() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, evidence="iwae", **QUICK)


def _fails_before_fit(call: Callable[[Callable[[int, float], None]], Any]) -> Any:
    steps = []
    try:
        return call(lambda step, loss: steps.append(step))
    except Exception as error:
        if steps:
            raise Late(f"after {len(steps)} steps: {type(error).__name__}: {error}") from error
        raise


@case("options", "evidence=('laplace',) on a user model with a subsampled plate",
      keywords=(("subsample", "minibatch"),))
def _o_laplace_subsampled() -> Any:
    x, y = toy_data()
    return _fails_before_fit(lambda cb: ps.select_structure(
        _subsampled_model, x, y, num_steps=20, evidence=("laplace",), callback=cb, **QUICK))


@case("options", "compare_structures(method='laplace') on a network with batch_size",
      expect="ok", check=lambda t: bool(t["log_evidence"].notna().all()))
def _o_laplace_batch_size() -> Any:
    x, y = cls_data()
    return ps.compare_structures(net_model(), x, y, method="laplace", batch_size=10,
                                 progress=False)


def _kwargs_model(x: torch.Tensor, y: torch.Tensor | None = None, **options: Any) -> None:
    toy_model(x, y)


@case("options", "misspelled num_evidence_sample swallowed by a model's **kwargs",
      expect="warn", keywords=("num_evidence_sample", "num_evidence_samples"))
def _o_misspelled() -> Any:
    x, y = toy_data()
    return ps.select_structure(_kwargs_model, x, y, num_steps=5, progress=False,
                               num_evidence_sample=5)


@case("options", "misspelled batchsize for a network", keywords=("batchsize", "batch_size"))
def _o_misspelled_net() -> Any:
    x, y = cls_data()
    return ps.select_structure(net_model(), x, y, num_steps=5, batchsize=10, **QUICK)


@case("options", "guide='AutoNormal' (a string)", keywords=("guide",))
def _o_guide_str() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, guide="AutoNormal", **QUICK)


@case("options", "num_particles=0", keywords=("num_particles",))
def _o_particles() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, num_particles=0, **QUICK)


@case("options", "callback='print' (not callable)", keywords=("callback",))
def _o_callback() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, callback="print", **QUICK)


@case("options", "num_restarts=0", keywords=("num_restarts",))
def _o_restarts() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, num_restarts=0, **QUICK)


@case("options", "vectorize_particles='yes'", keywords=("vectorize_particles",))
def _o_vectorize() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, vectorize_particles="yes",
                               **QUICK)


@case("options", "num_evidence_samples=0", keywords=("num_evidence_samples",))
def _o_evidence_samples() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, progress=False,
                               num_evidence_samples=0)


@case("options", "distributed=True outside torchrun", keywords=(("torchrun", "distributed"),),
      errors=(ValueError, TypeError, RuntimeError))
def _o_distributed() -> Any:
    x, y = toy_data()
    return ps.select_structure(toy_model, x, y, num_steps=5, distributed=True, **QUICK)


# ----------------------------------------------------------------------------- structure


def _int_labels_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("g", [1, 0])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([w * x, torch.zeros_like(x)], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def _pinned(model: Callable, structure: dict) -> Any:
    x, y = toy_data()
    trace = pyro.poutine.trace(ps.fix_structure(model, structure)).get_trace(x, y)
    return trace


@case("structure", "int labels [1, 0] and fix_structure({'g': 1})", keywords=("'g'",))
def _s_int_labels() -> Any:
    return _pinned(_int_labels_model, {"g": 1})


@case("structure", "fix_structure with an unknown site", keywords=("typo",))
def _s_unknown_site() -> Any:
    return _pinned(toy_model, {"typo": "sin"})


@case("structure", "fix_structure with an unknown option", keywords=("basis", "cos"))
def _s_unknown_option() -> Any:
    return _pinned(toy_model, {"basis": "cos"})


@case("structure", "fix_structure with an index out of range", keywords=("basis",))
def _s_index_range() -> Any:
    return _pinned(toy_model, {"basis": 5})


@case("structure", "fix_structure with a list", keywords=("structure",))
def _s_list() -> Any:
    return _pinned(toy_model, ["sin"])


@case("structure", "fix_structure with NaN as the option", keywords=("basis",))
def _s_nan_option() -> Any:
    return _pinned(toy_model, {"basis": math.nan})


@case("structure", "fix_structure with True as the option", keywords=("basis",))
def _s_bool_option() -> Any:
    return _pinned(toy_model, {"basis": True})


@case("structure", "fix_structure of a non-structural site", keywords=("'w'",))
def _s_weight_site() -> Any:
    return _pinned(toy_model, {"w": 0})


def _local_structure_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        gamma = ps.structure("basis", ["sin", "linear"])
        mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


@case("structure", "structural site inside the data plate", keywords=("basis", "data"))
def _s_local() -> Any:
    x, y = toy_data()
    return ps.select_structure(_local_structure_model, x, y, num_steps=5, **QUICK)


@case("structure", "ps.structure with options='relu' (a string)", keywords=("options",))
def _s_options_str() -> Any:
    return ps.structure("g", "relu")


@case("structure", "ps.structure with one option", keywords=("g", "two"))
def _s_one_option() -> Any:
    return ps.structure("g", ["a"])


@case("structure", "ps.structure with duplicate labels", keywords=("duplicate",))
def _s_duplicates() -> Any:
    return ps.structure("g", ["a", "a"])


@case("structure", "ps.structure with concentration=-1", keywords=("concentration",))
def _s_concentration() -> Any:
    return ps.structure("g", 3, concentration=-1.0)


@case("structure", "ps.structure with prior='gumbel'", keywords=("prior", "dirichlet"))
def _s_prior() -> Any:
    return ps.structure("g", 3, prior="gumbel")


@case("structure", "ps.structure concrete with three temperatures", keywords=("temperature",))
def _s_temperature() -> Any:
    return ps.structure("g", 3, prior="concrete", temperature=[1.0, 2.0, 3.0])


@case("structure", "ps.structure with a non-string name", keywords=("name",))
def _s_name() -> Any:
    return ps.structure(5, 3)


@case("structure", "ps.structure with two logits for three options", keywords=("logits",))
def _s_logits() -> Any:
    return ps.structure("g", 3, prior="concrete", logits=[0.0, 0.0])


@case("structure", "compare_structures(structures=a dict)", keywords=("structures",))
def _s_compare_dict() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, structures={"basis": "sin"}, method="elbo",
                                 num_steps=5, num_samples=10, progress=False)


@case("structure", "compare_structures with an unknown site", keywords=("typo",))
def _s_compare_unknown() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, structures=[{"typo": "sin"}], method="elbo",
                                 num_steps=5, num_samples=10, progress=False)


@case("structure", "compare_structures with an option out of range", keywords=("basis",))
def _s_compare_range() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, structures=[{"basis": 7}], method="elbo",
                                 num_steps=5, num_samples=10, progress=False)


@case("structure", "compare_structures(structures=[])", keywords=("structure",))
def _s_compare_empty() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, structures=[], method="elbo", num_steps=5,
                                 progress=False)


@case("structure", "compare_structures(method='bogus')", keywords=("bogus",))
def _s_compare_method() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, method="bogus", progress=False)


def _nan_for_linear(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("basis", ["sin", "linear", "cube"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([torch.sin(w * x), w * x, (w * x) ** 3], -1)).sum(-1)
    # the 'linear' structure cannot be scored: its likelihood scale is NaN
    scale = torch.tensor(0.5)
    if not torch.is_grad_enabled() and bool(gamma[..., 1].min() > 0.999):
        scale = torch.tensor(math.nan)  # scored without gradients (the evidence draws)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, scale, validate_args=False), obs=y)


def _nan_row_check(table: Any) -> bool:
    bad = [label for label in table.index if not math.isfinite(table.loc[label, "log_evidence"])]
    if not bad:
        return False  # the case did not produce a NaN row: inconclusive, count as not handled
    probs = table["probability"]
    finite = [label for label in table.index if label not in bad]
    return (all(math.isnan(probs[label]) for label in bad)
            and abs(sum(probs[label] for label in finite) - 1) < 1e-9)


@case("structure", "compare_structures with a structure whose evidence is NaN", expect="ok",
      check=_nan_row_check)
def _s_compare_nan() -> Any:
    x, y = toy_data()
    return ps.compare_structures(_nan_for_linear, x, y, method="elbo", num_steps=5,
                                 num_samples=10, progress=False)


@case("structure", "compare_structures cross_validation with folds=1", keywords=("folds",))
def _s_compare_folds() -> Any:
    x, y = toy_data()
    return _fails_before_fit(lambda cb: ps.compare_structures(
        toy_model, x, y, method="cross_validation", folds=1, num_steps=5, progress=False))


@case("structure", "compare_structures(hessian_structure=...) on a user model",
      keywords=("hessian_structure",))
def _s_compare_hessian() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, hessian_structure="kron", progress=False)


@case("structure", "compare_structures num_samples=0", keywords=("num_samples",))
def _s_compare_samples() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, method="elbo", num_samples=0, num_steps=5,
                                 progress=False)


@case("structure", "compare_structures lr=-1", keywords=("lr",))
def _s_compare_lr() -> Any:
    x, y = toy_data()
    return ps.compare_structures(toy_model, x, y, method="elbo", lr=-1.0, num_steps=5,
                                 progress=False)


# ----------------------------------------------------------------------------- model


def _discrete_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("basis", ["sin", "linear"])
    z = pyro.sample("z", dist.Bernoulli(0.5))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    mean = z + (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


@case("model", "a discrete latent site", keywords=("'z'", "discrete"))
def _m_discrete() -> Any:
    x, y = toy_data()
    return ps.select_structure(_discrete_model, x, y, num_steps=5, **QUICK)


_calls = {"n": 0}


def _changing_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    _calls["n"] += 1
    gamma = ps.structure("basis", ["sin", "linear"])
    name = "w" if _calls["n"] % 2 else "v"
    w = pyro.sample(name, dist.Normal(0.0, 1.0))
    mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


@case("model", "a model whose sites change between calls", keywords=("'v'", "'w'"))
def _m_changing() -> Any:
    x, y = toy_data()
    return ps.select_structure(_changing_model, x, y, num_steps=5, **QUICK)


@case("model", "a model with no structural site", keywords=("structural",))
def _m_no_structure() -> Any:
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(w * x, 0.5), obs=y)
    x, y = toy_data()
    return ps.select_structure(model, x, y, num_steps=5, **QUICK)


@case("model", "model not callable", keywords=("model",))
def _m_not_callable() -> Any:
    x, y = toy_data()
    return ps.select_structure("toy_model", x, y, num_steps=5, **QUICK)


@case("model", "a model that raises KeyError itself", keywords=("KeyError", "missing-key"),
      errors=(ValueError, TypeError, KeyError))
def _m_keyerror() -> Any:
    def model(x, y=None):
        ps.structure("basis", 2)
        raise KeyError("missing-key")
    x, y = toy_data()
    return ps.select_structure(model, x, y, num_steps=5, **QUICK)


@case("model", "a model without observations", expect="error_or_warn", keywords=("observ",))
def _m_no_obs() -> Any:
    def model(x):
        gamma = ps.structure("basis", 2)
        pyro.sample("w", dist.Normal(gamma.sum(), 1.0))
    x, _ = toy_data()
    return ps.select_structure(model, x, num_steps=5, **QUICK)


@case("model", "a required model argument missing", keywords=("'y'",))
def _m_missing_arg() -> Any:
    def model(x, y):
        toy_model(x, y)
    x, _ = toy_data()
    return ps.select_structure(model, x, num_steps=5, **QUICK)


@case("model", "a plate of the wrong size", keywords=("plate",))
def _m_plate_size() -> Any:
    def model(x, y=None):
        gamma = ps.structure("basis", 2)
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x) + 1):
            pyro.sample("obs", dist.Normal(w * gamma.sum(), 0.5), obs=y)
    x, y = toy_data()
    return ps.select_structure(model, x, y, num_steps=5, **QUICK)


def _subsampled_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    gamma = ps.structure("basis", ["sin", "linear"])
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=8) as idx:
        mean = (gamma * torch.stack([torch.sin(w * x[idx]), w * x[idx]], -1)).sum(-1)
        pyro.sample("obs", dist.Normal(mean, 0.5), obs=y[idx])


def _subsampled_check(method: str) -> Callable[[Any], bool]:
    def check(values: Any) -> bool:
        first, second, full = values
        return abs(first - second) < 1e-6 and abs(first - full) < 1e-6
    return check


def _subsampled_estimates(method: str) -> Any:
    x, y = toy_data()
    result = ps.select_structure(_subsampled_model, x, y, num_steps=20, seed=0, evidence=(),
                                 progress=False, num_evidence_samples=10)
    fn = ps.elbo if method == "elbo" else ps.iwae
    key = "num_particles" if method == "elbo" else "num_samples"
    with result.param_scope():
        values = []
        for _ in range(2):
            pyro.set_rng_seed(1)
            values.append(fn(_subsampled_model, result.guide, x, y, **{key: 200}).value)

        def full(x, y=None):  # the same model without subsampling
            gamma = ps.structure("basis", ["sin", "linear"])
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("data", len(x)):
                mean = (gamma * torch.stack([torch.sin(w * x), w * x], -1)).sum(-1)
                pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)
        pyro.set_rng_seed(1)
        values.append(fn(full, result.guide, x, y, **{key: 200}).value)
    return values


@case("model", "ELBO on a subsampled data plate", expect="either",
      keywords=(("subsample", "minibatch"),), check=_subsampled_check("elbo"))
def _m_elbo_subsampled() -> Any:
    return _subsampled_estimates("elbo")


@case("model", "IWAE on a subsampled data plate", expect="either",
      keywords=(("subsample", "minibatch"),), check=_subsampled_check("iwae"))
def _m_iwae_subsampled() -> Any:
    return _subsampled_estimates("iwae")


@case("model", "select_structure scoring a subsampled user model", expect="either",
      keywords=(("subsample", "minibatch"),),
      check=lambda r: r.evidence["elbo"].diagnostics.get("full_data", False))
def _m_select_subsampled() -> Any:
    x, y = toy_data()
    return ps.select_structure(_subsampled_model, x, y, num_steps=10, seed=0, **QUICK)


@case("model", "ps.elbo with guide=None", keywords=("guide",))
def _m_elbo_no_guide() -> Any:
    x, y = toy_data()
    return ps.elbo(toy_model, None, x, y, num_particles=10)


@case("model", "ps.elbo(num_particles=0)", keywords=("num_particles",))
def _m_elbo_particles() -> Any:
    result = toy_result()
    x, y = toy_data()
    with result.param_scope():
        return ps.elbo(toy_model, result.guide, x, y, num_particles=0)


@case("model", "ps.iwae(chunk_size=-5)", keywords=("chunk_size",))
def _m_iwae_chunk() -> Any:
    result = toy_result()
    x, y = toy_data()
    with result.param_scope():
        return ps.iwae(toy_model, result.guide, x, y, num_samples=10, chunk_size=-5)


@case("model", "ps.estimate_evidence('bogus')", keywords=("bogus",))
def _m_estimate_bogus() -> Any:
    x, y = toy_data()
    return ps.estimate_evidence("bogus", toy_model, None, x, y)


@case("model", "cross_validation(folds=1)", keywords=("folds",))
def _m_cv_folds() -> Any:
    x, y = toy_data()
    return ps.cross_validation(toy_model, x, y, folds=1, num_steps=5)


@case("model", "cross_validation(folds=[[0, 1], [1, 2]]) overlapping", keywords=("fold",))
def _m_cv_overlap() -> Any:
    x, y = toy_data()
    return ps.cross_validation(toy_model, x, y, folds=[[0, 1], [1, 2]], num_steps=5)


@case("model", "cross_validation with data of different rows", keywords=("sizes",))
def _m_cv_rows() -> Any:
    x, y = toy_data()
    return ps.cross_validation(toy_model, x, y[:-3], num_steps=5)


@case("model", "cross_validation(num_samples=0)", keywords=("num_samples",))
def _m_cv_samples() -> Any:
    x, y = toy_data()
    return ps.cross_validation(toy_model, x, y, num_samples=0, num_steps=5)


@case("model", "psis_khat of NaN log weights", keywords=(("log_weights", "log weights"), "nan"))
def _m_khat_nan() -> Any:
    return ps.psis_khat(torch.tensor([0.0, math.nan] * 50))


@case("model", "laplace of a fixed user model (guide=None)", expect="either", keywords=("guide",),
      check=lambda e: math.isfinite(e.value))
def _m_laplace() -> Any:
    x, y = toy_data()
    fixed = ps.fix_structure(toy_model, {"basis": "sin"})
    return ps.laplace(fixed, None, x, y)


@case("model", "kfold_indices(num_data=1)", keywords=("observations",))
def _m_kfold() -> Any:
    return ps.kfold_indices(1, 2)


def _fitted(fn: Callable[..., Any]) -> Any:
    result = toy_result()
    x, y = toy_data()
    with result.param_scope():
        return fn(result, x, y)


@case("estimators", "gradient_descent_evidence(num_restarts=0)", keywords=("num_restarts",))
def _e_gd_restarts() -> Any:
    x, y = toy_data()
    fixed = ps.fix_structure(toy_model, {"basis": "sin"})
    return ps.gradient_descent_evidence(fixed, None, x, y, num_restarts=0, num_steps=5)


@case("estimators", "gradient_descent_evidence(step_size=-1)", keywords=("step_size",))
def _e_gd_step() -> Any:
    x, y = toy_data()
    fixed = ps.fix_structure(toy_model, {"basis": "sin"})
    return ps.gradient_descent_evidence(fixed, None, x, y, step_size=-1.0, num_steps=5)


@case("estimators", "gradient_descent_evidence(log_det='bogus')", keywords=("bogus",))
def _e_gd_logdet() -> Any:
    x, y = toy_data()
    fixed = ps.fix_structure(toy_model, {"basis": "sin"})
    return ps.gradient_descent_evidence(fixed, None, x, y, log_det="bogus", num_steps=5)


@case("estimators", "gradient_descent_evidence on a subsampled plate",
      keywords=(("subsample", "minibatch"),))
def _e_gd_subsampled() -> Any:
    x, y = toy_data()
    fixed = ps.fix_structure(_subsampled_model, {"basis": "sin"})
    return ps.gradient_descent_evidence(fixed, None, x, y, num_restarts=2, num_steps=5)


@case("estimators", "laplace on a subsampled plate", keywords=(("subsample", "minibatch"),))
def _e_laplace_subsampled() -> Any:
    x, y = toy_data()
    return ps.laplace(ps.fix_structure(_subsampled_model, {"basis": "sin"}), None, x, y)


@case("estimators", "laplace(max_iter=0)", keywords=("max_iter",))
def _e_laplace_iter() -> Any:
    x, y = toy_data()
    return ps.laplace(ps.fix_structure(toy_model, {"basis": "sin"}), None, x, y, max_iter=0)


@case("estimators", "laplace with data of the wrong shape", keywords=(("'obs'", "shape"),))
def _e_laplace_shape() -> Any:
    x, y = toy_data()
    return ps.laplace(ps.fix_structure(toy_model, {"basis": "sin"}), None, x, y[:, None])


@case("estimators", "structural_complexity(num_samples=0)", keywords=("num_samples",))
def _e_struct_samples() -> Any:
    return _fitted(lambda r, x, y: ps.structural_complexity(toy_model, r.guide, x, y,
                                                            num_samples=0))


@case("estimators", "parametric_complexity with guide=None", keywords=("guide",))
def _e_param_guide() -> Any:
    x, y = toy_data()
    return ps.parametric_complexity(toy_model, None, x, y)


@case("estimators", "ggn_laplace on a user model", keywords=("NetworkModel",))
def _e_ggn_user() -> Any:
    x, y = toy_data()
    return ps.ggn_laplace(toy_model, x, y, structure={"basis": "sin"})


@case("estimators", "ggn_laplace(hessian_structure='bogus')", keywords=("bogus",))
def _e_ggn_bogus() -> Any:
    x, y = cls_data()
    return ps.ggn_laplace(net_model(), x, y, structure={"activation": "relu"},
                          hessian_structure="bogus")


@case("estimators", "ggn_laplace with an unknown option", keywords=("activation",))
def _e_ggn_option() -> Any:
    x, y = cls_data()
    return ps.ggn_laplace(net_model(), x, y, structure={"activation": "swish"})


@case("estimators", "diagnose(num_samples=0)", keywords=("num_samples",))
def _e_diagnose() -> Any:
    return ps.diagnose(toy_result(), num_samples=0)


@case("estimators", "diagnose(window=0)", keywords=("window",))
def _e_diagnose_window() -> Any:
    return ps.diagnose(toy_result(), num_samples=20, window=0.0)


@case("estimators", "elbo_convergence of an empty trace", expect="error_or_warn",
      keywords=("steps",))
def _e_convergence() -> Any:
    return ps.elbo_convergence([])


@case("estimators", "blr_log_evidence with a negative prior precision",
      keywords=("prior_precision",))
def _e_blr() -> Any:
    phi = torch.randn(10, 3)
    return ps.blr_log_evidence(phi, torch.randn(10), prior_precision=-1.0, noise_precision=1.0)


@case("estimators", "blr_log_evidence with targets of other rows", keywords=("targets",))
def _e_blr_rows() -> Any:
    phi = torch.randn(10, 3)
    return ps.blr_log_evidence(phi, torch.randn(9), prior_precision=1.0, noise_precision=1.0)


@case("estimators", "polynomial_features(degree=-1)", keywords=("degree",))
def _e_poly() -> Any:
    return ps.polynomial_features(torch.randn(5), -1)


@case("estimators", "load_digits(subsample=3)", keywords=("subsample",))
def _e_digits() -> Any:
    return ps.load_digits(subsample=3)


@case("estimators", "load_digits(test_size=1.5)", keywords=("test_size",))
def _e_digits_test() -> Any:
    return ps.load_digits(test_size=1.5)


@case("report", "plot_structure_posterior(interval=1.5)", keywords=("interval",))
def _r_interval() -> Any:
    return ps.plot_structure_posterior(toy_result(), interval=1.5, num_samples=10)


@case("report", "plot_simplex of a site with two options", keywords=(("three", "3"),))
def _r_simplex_two() -> Any:
    return ps.plot_simplex(toy_result(), site="basis", num_samples=10)


@case("report", "to_inference_data(memory_budget=-1)", keywords=("memory_budget",))
def _r_budget() -> Any:
    return ps.to_inference_data(toy_result(), num_samples=10, memory_budget=-1)


@case("report", "summary() and fixed_model() of a fit", expect="ok",
      check=lambda r: len(r) == 2)
def _r_summary() -> Any:
    result = toy_result()
    x, y = toy_data()
    trace = pyro.poutine.trace(result.fixed_model()).get_trace(x, y)
    assert trace.nodes["basis"]["is_observed"]
    return result.summary()


# ----------------------------------------------------------------------------- network


@case("network", "two_hidden_layer(hidden=8) (an int)", keywords=("hidden",))
def _n_hidden_int() -> Any:
    return ps.two_hidden_layer(4, 3, hidden=8)


@case("network", "one_hidden_layer(activations='relu') (a string)", keywords=("activations",))
def _n_activations_str() -> Any:
    return ps.one_hidden_layer(4, 3, activations="relu")


@case("network", "one_hidden_layer with an unknown activation", keywords=("bogus",))
def _n_activation_bogus() -> Any:
    return ps.one_hidden_layer(4, 3, activations=["relu", "bogus"])


@case("network", "one_hidden_layer with one activation", keywords=(("two", "2"),))
def _n_one_activation() -> Any:
    return ps.one_hidden_layer(4, 3, activations=["relu"])


@case("network", "one_hidden_layer(4.0, 3)", keywords=("in_features",))
def _n_float_features() -> Any:
    return ps.one_hidden_layer(4.0, 3)


@case("network", "one_hidden_layer(hidden=-1)", keywords=("hidden",))
def _n_hidden_negative() -> Any:
    return ps.one_hidden_layer(4, 3, hidden=-1)


@case("network", "two_hidden_layer(names=('a', 'a'))", keywords=("'a'",))
def _n_duplicate_names() -> Any:
    return ps.NetworkModel(ps.two_hidden_layer(4, 3, hidden=(4, 4), names=("a", "a")))


@case("network", "conv_family(image_size=7)", keywords=("image_size",))
def _n_conv() -> Any:
    return ps.conv_family(image_size=7)


@case("network", "NetworkModel('net') (not a module)", keywords=("network",))
def _n_not_module() -> Any:
    return ps.NetworkModel("net")


@case("network", "NetworkModel(likelihood='gaussian')", keywords=("likelihood", "normal"))
def _n_likelihood() -> Any:
    return ps.NetworkModel(ps.one_hidden_layer(4, 3), likelihood="gaussian")


@case("network", "NetworkModel(prior_scal=1.0) misspelled", keywords=("prior_scal", "prior_scale"))
def _n_misspelled() -> Any:
    return ps.NetworkModel(ps.one_hidden_layer(4, 3), prior_scal=1.0)


@case("network", "NetworkModel(noise_scale=0)", keywords=("noise_scale",))
def _n_noise() -> Any:
    return ps.NetworkModel(ps.one_hidden_layer(4, 3), likelihood="normal", noise_scale=0.0)


@case("network", "NetworkModel(prior_scale={'bogus': 1})", keywords=("bogus",))
def _n_prior_scale_layer() -> Any:
    return ps.NetworkModel(ps.one_hidden_layer(4, 3), prior_scale={"bogus": 1.0})


@case("network", "NetworkModel(concentration=0)", keywords=("concentration",))
def _n_concentration() -> Any:
    return ps.NetworkModel(ps.one_hidden_layer(4, 3), concentration=0.0)


@case("network", "NetworkModel(prior='gumbel')", keywords=("prior",))
def _n_prior() -> Any:
    return ps.NetworkModel(ps.one_hidden_layer(4, 3), prior="gumbel")


@case("network", "GraphFamily with a cycle", keywords=("cycle",))
def _n_cycle() -> Any:
    lin = torch.nn.Linear(2, 2)
    return ps.GraphFamily({(0, 1): lin, (1, 2): torch.nn.Identity(), (2, 1): torch.nn.Identity(),
                           (2, 3): torch.nn.Identity()})


@case("network", "MixedOp with one candidate", keywords=("two",))
def _n_mixedop() -> Any:
    return ps.MixedOp({"relu": torch.nn.ReLU()})


# ----------------------------------------------------------------------------- hyper


def _hyper(**options: Any) -> Any:
    x, y = reg_data()
    model = options.pop("model", None) or net_model("normal", 1)
    base = dict(hyperparameters=["net.prior_scale"], num_outer_steps=2, num_inner_steps=3,
                progress=False, seed=0)
    base.update(options)
    return ps.optimize_hyperparameters(model, x, y, **base)


@case("hyper", "net.prior_scale without learn_prior_scale=True",
      keywords=("net.prior_scale", "learn_prior_scale"))
def _h_not_learnable() -> Any:
    return _hyper()


@case("hyper", "hyperparameters='lr' (a string)", keywords=("hyperparameters",))
def _h_str() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), hyperparameters="lr")


@case("hyper", "hyperparameters=[]", keywords=("hyperparameters",))
def _h_empty() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), hyperparameters=[])


@case("hyper", "method='bogus'", keywords=("bogus",))
def _h_method() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), method="bogus")


@case("hyper", "criterion='validation' without validation data", keywords=("validation",))
def _h_validation() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), criterion="validation")


@case("hyper", "num_outer_steps=0", keywords=("num_outer_steps",))
def _h_outer() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), num_outer_steps=0)


@case("hyper", "lr=-1", keywords=("lr",))
def _h_lr() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), lr=-1.0)


@case("hyper", "momentum=1.5", keywords=("momentum",))
def _h_momentum() -> Any:
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), momentum=1.5)


@case("hyper", "validation=(x,) without y", keywords=("validation",))
def _h_validation_arity() -> Any:
    x, _ = reg_data()
    return _hyper(model=net_model("normal", 1, learn_prior_scale=True), criterion="validation",
                  validation=(x[:10],))


# ----------------------------------------------------------------------------- report


@case("report", "to_inference_data(num_samples=0)", keywords=("num_samples",))
def _r_samples() -> Any:
    return ps.to_inference_data(toy_result(), num_samples=0)


@case("report", "to_inference_data('not a result')", keywords=("result",))
def _r_not_result() -> Any:
    return ps.to_inference_data("not a result")


@case("report", "to_inference_data(model_kwargs=[1])", keywords=("model_kwargs",))
def _r_model_kwargs() -> Any:
    return ps.to_inference_data(toy_result(), model_kwargs=[1])


@case("report", "to_inference_data(chunk_size=-1)", keywords=("chunk_size",))
def _r_chunk() -> Any:
    return ps.to_inference_data(toy_result(), num_samples=10, chunk_size=-1)


@case("report", "to_inference_data(seed='0')", keywords=("seed",))
def _r_seed() -> Any:
    return ps.to_inference_data(toy_result(), num_samples=10, seed="0")


@case("report", "plot_structure_posterior(sites=['typo'])", keywords=("typo",))
def _r_plot_sites() -> Any:
    return ps.plot_structure_posterior(toy_result(), sites=["typo"], num_samples=10)


@case("report", "plot_simplex(site='typo')", keywords=("typo",))
def _r_plot_simplex() -> Any:
    return ps.plot_simplex(toy_result(), site="typo", num_samples=10)


@case("report", "plot_elbo(window=2)", keywords=("window",))
def _r_plot_window() -> Any:
    return ps.plot_elbo(toy_result(), window=2.0)


@case("report", "plot_elbo('a string')", keywords=("data",))
def _r_plot_str() -> Any:
    return ps.plot_elbo("losses")


@case("report", "plot_evidence_comparison of a table without log_evidence",
      keywords=("log_evidence",))
def _r_plot_table() -> Any:
    import pandas as pd
    return ps.plot_evidence_comparison(pd.DataFrame({"value": [1.0]}, index=["a"]))


@case("report", "derive() on a user model", keywords=("derive",))
def _r_derive() -> Any:
    return toy_result().derive()


# ----------------------------------------------------------------------------- cli


def _cli(*argv: str) -> Any:
    import contextlib
    import io

    from pyro_structsel.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    if code != 0:
        raise ValueError(f"exit {code}: {err.getvalue().strip()[-400:]}")
    return code


@case("cli", "--steps -1", keywords=("--steps",))
def _l_steps() -> Any:
    return _cli("--steps", "-1", "--out", str(TMP / "cli"))


@case("cli", "--bogus option", keywords=("--bogus",))
def _l_bogus() -> Any:
    return _cli("--bogus", "--out", str(TMP / "cli"))


@case("cli", "--subsample 3 (fewer digits than classes)", keywords=("subsample",))
def _l_subsample() -> Any:
    return _cli("--subsample", "3", "--steps", "2", "--evidence-samples", "5", "--no-progress",
                "--out", str(TMP / "cli"))


@case("cli", "--out is an existing file (before the fit)", keywords=("--out",))
def _l_out_file() -> Any:
    out = TMP / "cli-out-file"
    out.write_text("x")
    start = time.perf_counter()
    try:
        return _cli("--subsample", "100", "--steps", "30", "--evidence-samples", "5",
                    "--no-progress", "--out", str(out))
    except Exception as error:
        if "select" in traceback.format_exc() or time.perf_counter() - start > 20:
            raise
        raise error


@case("cli", "--hidden 1 2 3", keywords=("--hidden",))
def _l_hidden() -> Any:
    return _cli("--hidden", "1", "2", "3", "--out", str(TMP / "cli"))


# ----------------------------------------------------------------------------- memory

MEMORY_LIMIT = 4 * 2 ** 30  # bytes of address space of the child process

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, warnings
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch, pyro, pyro.distributions as dist
    import pyro_structsel as ps
    from sklearn import datasets
    torch.set_num_threads(1)
    which = sys.argv[1]
    if which.startswith("diabetes"):
        raw = datasets.load_diabetes()
        x = torch.tensor(raw.data, dtype=torch.float32)
        y = torch.tensor(raw.target, dtype=torch.float32)
        y = (y - y.mean()) / y.std()
        hidden, classes = 16, None
    else:
        raw = datasets.load_digits()
        x = torch.tensor(raw.data, dtype=torch.float32) / 16.0
        y = torch.tensor(raw.target)
        hidden, classes = 32, 10
    d = x.shape[1]

    def model(x, y=None):
        gamma = ps.structure("act", ["relu", "tanh"])
        W1 = pyro.sample("W1", dist.Normal(0.0, 1.0).expand([d, hidden]).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        h = x @ W1 + b1
        h = gamma[..., :1] * torch.relu(h) + gamma[..., 1:] * torch.tanh(h)
        out = classes or 1
        W2 = pyro.sample("W2", dist.Normal(0.0, 1.0).expand([hidden, out]).to_event(2))
        b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([out]).to_event(1))
        f = h @ W2 + b2
        with pyro.plate("data", x.shape[0]):
            if classes:
                pyro.sample("y", dist.Categorical(logits=f), obs=y)
            else:
                pyro.sample("y", dist.Normal(f.squeeze(-1), 0.5), obs=y)

    import re
    kind = which.split(":")[1]
    out = {}
    caught = warnings.catch_warnings(record=True)
    record = caught.__enter__()
    warnings.simplefilter("always")
    if kind == "select":  # select_structure with its default evidence draws
        result = ps.select_structure(model, x, y, num_steps=20, seed=0, progress=False)
        out["elbo"] = result.evidence["elbo"].value
    else:
        result = ps.select_structure(model, x, y, num_steps=20, seed=0, progress=False,
                                     num_evidence_samples=10)
        if kind == "idata":
            idata = result.to_inference_data()
            out["draws"] = int(idata.posterior.sizes["draw"])
        elif kind == "idata300":
            idata = result.to_inference_data(num_samples=300)
            out["draws"] = int(idata.posterior.sizes["draw"])
        elif kind == "iwae":
            with result.param_scope():
                out["iwae"] = ps.iwae(model, result.guide, x, y, num_samples=1000).value
        elif kind == "cv":
            table = ps.compare_structures(model, x[:300], y[:300], method="cross_validation",
                                          folds=2, num_steps=5, num_samples=300, progress=False)
            out["rows"] = len(table)
    caught.__exit__(None, None, None)
    # an allocation the cap refused shows in the fallback's warning (torch's own message)
    attempts = [int(size) for w in record
                for size in re.findall(r"allocate (\\d+) bytes", str(w.message))]
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["refused_allocation_gb"] = round(max(attempts, default=0) / 2 ** 30, 1)
    print("RESULT " + json.dumps(out))
""")


def _memory(which: str) -> Any:
    script = TMP / "memory_case.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), which, str(MEMORY_LIMIT)],
                          capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"child failed (exit {proc.returncode}): {tail[0][:300]}")
    out = json.loads(lines[0][len("RESULT "):])
    if out.get("refused_allocation_gb"):  # without the cap: swapping, or killed by the kernel
        raise MemoryError(f"tried to allocate {out['refused_allocation_gb']} GB (refused by the "
                          f"{MEMORY_LIMIT / 2 ** 30:.0f} GiB cap, then fell back): {out}")
    return out


for _which, _title in [("digits:idata", "to_inference_data() defaults, x @ W1 + b1 on digits"),
                       ("diabetes:idata", "to_inference_data() defaults, x @ W1 + b1 on diabetes"),
                       ("digits:idata300", "to_inference_data(num_samples=300) on digits"),
                       ("digits:select", "select_structure default scoring on digits"),
                       ("digits:iwae", "iwae(num_samples=1000) on digits"),
                       ("digits:cv", "compare_structures(method='cross_validation') on digits")]:
    CASES.append(Case("memory", _title, functools.partial(_memory, _which), expect="ok",
                      check=lambda r: r.get("maxrss_mb", 1e9) < MEMORY_LIMIT / 2 ** 20,
                      errors=()))


# ----------------------------------------------------------------------------- runner


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError("case took longer than its time limit")


def run_case(c: Case, timeout: int) -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = c.run()
        except Late as error:
            c.outcome, c.detail = "unclear", f"late: {error}"
        except AssertionError as error:
            if "SECURITY" in str(error):
                c.outcome, c.detail = "silent", str(error)
            else:
                c.outcome, c.detail = "unclear", f"AssertionError: {error}"
        except BaseException as error:  # noqa: BLE001
            if isinstance(error, KeyboardInterrupt):
                raise
            message = f"{type(error).__name__}: {error}"
            if c.expect in ("error", "either", "error_or_warn") and isinstance(error, c.errors) \
                    and _named(str(error), c.keywords):
                c.outcome = "clear"
            else:
                c.outcome = "unclear"
            c.detail = message
        else:
            warned = [str(w.message) for w in caught]
            if c.expect in ("warn", "error_or_warn") and any(
                    _named(w, c.keywords) for w in warned):
                c.outcome, c.detail = "clear", "warned: " + next(
                    w for w in warned if _named(w, c.keywords))
            elif c.expect in ("ok", "either"):
                try:
                    good = c.check(value) if c.check is not None else True
                except Exception as error:  # noqa: BLE001
                    good, value = False, f"check failed: {type(error).__name__}: {error}"
                c.outcome = "handled" if good else "silent"
                c.detail = f"returned {str(value)[:200]!s}"
            else:
                c.outcome = "silent"
                c.detail = f"returned {type(value).__name__}" + (
                    f"; warnings: {warned[:1]}" if warned else "")
        finally:
            signal.alarm(0)
            c.seconds = time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", help="run only these groups")
    parser.add_argument("--case", help="run only cases whose name contains this")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory cases")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per in-process case")
    parser.add_argument("--verbose", action="store_true", help="print every message in full")
    args = parser.parse_args()
    cases = [c for c in CASES if (not args.group or c.group in args.group)
             and (not args.case or args.case in c.name)
             and not (args.no_memory and c.group == "memory")]
    for c in cases:
        run_case(c, args.timeout if c.group != "memory" else 1000)
        detail = c.detail.replace("\n", " ")
        print(f"{c.outcome:8s} {c.seconds:6.1f}s  [{c.group}] {c.name}  -- "
              f"{detail if args.verbose else detail[:160]}", flush=True)
    by_group: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        by_group[c.group][c.outcome] += 1
    total = Counter(c.outcome for c in cases)
    print(json.dumps({"version": ps.__version__, "cases": len(cases), "total": dict(total),
                      "by_group": {g: dict(v) for g, v in by_group.items()}}))


if __name__ == "__main__":
    main()
