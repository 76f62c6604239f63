r"""Gradient-based hyperparameter optimisation through the training run.

The problem (DESIGN.md §5): with :math:`\theta` the parameters trained on the
loss :math:`L` and :math:`h` the hyperparameters chosen by the quality
:math:`Q`,

.. math::

    h^* = \arg\min_h Q\bigl(T^\eta(L, \theta_0, h), h\bigr),

where :math:`T^\eta` is :math:`\eta` steps of SGD with momentum in the form of
Maclaurin, Duvenaud & Adams (2015), :math:`v_0 = 0` and for
:math:`t = 0, \dots, \eta - 1`

.. math::

    g_t = \nabla_\theta L(\theta_t, h, t), \quad
    v_{t+1} = \gamma_t v_t - (1 - \gamma_t) g_t, \quad
    \theta_{t+1} = \theta_t + \alpha_t v_{t+1}.

The hypergradient methods (:mod:`~pyro_structsel.hyper.hypergradients`:
``unrolled``, ``greedy``, ``implicit``, ``joint``; :mod:`~pyro_structsel.hyper.reversible`:
``rmad``) work on closures over flat vectors, ``loss(theta, hyper, step)``
and ``objective(theta, hyper)``.

:func:`optimize_hyperparameters` is the Pyro front end: it builds the closures
from a model and guide (:func:`hyperparameter_problem`), with
:math:`L = -\mathrm{ELBO}` and :math:`Q` the negative ELBO ("evidence") or the
held-out negative log predictive density ("validation"), and runs Adam on
:math:`h` over outer steps.

References
----------
D. Maclaurin, D. Duvenaud, R. Adams. Gradient-based hyperparameter
optimization through reversible learning. ICML 2015.
J. Lorraine, P. Vicol, D. Duvenaud. Optimizing millions of hyperparameters by
implicit differentiation. AISTATS 2020.
J. Luketina, M. Berglund, K. Greff, T. Raiko. Scalable gradient-based tuning
of continuous regularization hyperparameters. ICML 2016 (the greedy method).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule, PyroParam
from pyro.params import user_param_name
from pyro.poutine.util import site_is_subsample
from torch.distributions import transform_to

from ..evidence.crossval import (
    kfold_indices,
    num_data_rows,
    subset_rows,
    training_index,
)
from ..infer.guides import build_guide, is_factorised
from ..infer.scope import clone_param_state, module_params_kept
from ..infer.svi import FactorisedELBO
from ..infer.traced import NotTraceableError, TracedELBO
from ..model.network import NetworkModel
from ..model.sites import base_distribution, structural_sites
from ..util.progress import progress_bar
from ..util.sampling import max_plate_nesting, trace_model
from ..util.validation import check_inputs
from .hypergradients import greedy, implicit, joint, unrolled
from .reversible import check_schedules, rmad, sgd_momentum

METHODS = ("unrolled", "rmad", "greedy", "implicit", "joint")
CRITERIA = ("evidence", "validation")
#: Names of the optimiser's own hyperparameters in ``optimize_hyperparameters``.
OPTIMISER_HYPERPARAMETERS = ("lr", "momentum")


# --------------------------------------------------------------------------- the Pyro bridge

@dataclass(frozen=True)
class _Block:
    """One parameter in a flat vector: its name, shape, constraint and slice."""

    name: str
    shape: torch.Size
    constraint: Any
    start: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def constrained(self, flat: torch.Tensor) -> torch.Tensor:
        raw = flat[self.start:self.start + self.size].reshape(self.shape)
        return transform_to(self.constraint)(raw)


def _layout(names: Sequence[str], unconstrained: Mapping[str, torch.Tensor],
            constraints_: Mapping[str, Any]) -> list[_Block]:
    blocks, start = [], 0
    for name in names:
        shape = unconstrained[name].shape
        blocks.append(_Block(name, shape, constraints_[name], start))
        start += math.prod(shape)
    return blocks


def _stream_seed(seed: int, *stream: int) -> int:
    """A torch seed for ``stream`` (loss at step t, objective, ...) of the run seeded ``seed``.

    Hashed (``numpy.random.SeedSequence``), so runs with nearby seeds share no noise
    (``seed + step`` would give run ``s`` at step ``t`` the noise of run ``s + 1`` at ``t - 1``).
    """
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0] >> 1)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's RNG seeded at ``seed``, restoring the caller's RNG state after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # the generators fork_rng restores: torch.manual_seed would also seed every CUDA
        # device, lazily, at the cost of a stack trace per call (~10 ms on CPU alone)
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


#: Distributions whose reparameterised samples torch differentiates only once (their
#: backward is ``once_differentiable``): a second derivative through them is silently dropped.
_ONCE_DIFFERENTIABLE = (dist.Dirichlet, dist.Gamma, dist.Beta)


class HyperparameterProblem:
    r"""The closures of :func:`optimize_hyperparameters` for one (training, validation) split.

    Attributes
    ----------
    loss : callable
        ``loss(theta, hyper, step)`` :math:`= -\mathrm{ELBO}` on the training
        data, its Monte Carlo noise seeded from ``(seed, step)``.
    objective : callable
        ``objective(theta, hyper)`` :math:`= Q` (see :func:`hyperparameter_problem`).
    theta0 : Tensor
        Initial :math:`\theta`: the unconstrained guide parameters (and model
        parameters that are not hyperparameters), flattened.
    hyper0 : Tensor
        Initial unconstrained model hyperparameters, flattened.
    theta_names, hyper_names : list of str
        Param-store names in the order of the flat vectors.
    second_order : bool
        Whether second derivatives of the loss are exact (``False`` when the
        guide samples a Dirichlet, Gamma or Beta site, whose reparameterised
        samples torch differentiates only once).

    Every call runs inside this problem's own param-store scope, so Pyro's
    global param store is never touched.
    """

    def __init__(self, *, model: Callable[..., Any], guide: Callable[..., Any],
                 state: dict[str, Any], theta_blocks: list[_Block],
                 hyper_blocks: list[_Block], train: tuple[tuple, dict[str, Any]],
                 validation: tuple[tuple, dict[str, Any]] | None, num_particles: int,
                 num_objective_samples: int, vectorize_particles: bool, seed: int,
                 second_order: bool, readers: tuple[frozenset[str], frozenset[str]]
                 ) -> None:
        self.model, self.guide, self._state = model, guide, state
        self._readers = readers
        self.theta_blocks, self.hyper_blocks = theta_blocks, hyper_blocks
        self.theta_names = [b.name for b in theta_blocks]
        self.hyper_names = [b.name for b in hyper_blocks]
        self.args, self.kwargs = train
        self.validation = validation
        self.seed = seed
        self.second_order = second_order
        self._depth = 0
        params = state["params"]
        self.theta0 = torch.cat([params[n].detach().reshape(-1) for n in self.theta_names]) \
            if self.theta_names else torch.zeros(0)
        self.hyper0 = torch.cat([params[n].detach().reshape(-1) for n in self.hyper_names]) \
            if self.hyper_names else torch.zeros(0, dtype=self.theta0.dtype)
        with self.scope():
            nesting = max_plate_nesting(model, self.args, self.kwargs)
        elbo_class = FactorisedELBO if is_factorised(guide) else Trace_ELBO
        self._elbo = elbo_class(num_particles=num_particles, max_plate_nesting=nesting,
                                vectorize_particles=vectorize_particles and num_particles > 1)
        self._objective_elbo = elbo_class(num_particles=num_objective_samples,
                                          max_plate_nesting=nesting,
                                          vectorize_particles=vectorize_particles)
        self.num_objective_samples = num_objective_samples
        self._traced: TracedELBO | bool | None = None  # the inner runs' traced step

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Pyro's param store holds this problem's parameters (re-entrant)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with module_params_kept(self.model), pyro.get_param_store().scope(self._state):
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0

    def values(self, theta: torch.Tensor, hyper: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained value of every parameter, by param-store name."""
        out = {b.name: b.constrained(theta) for b in self.theta_blocks}
        out.update({b.name: b.constrained(hyper) for b in self.hyper_blocks})
        return out

    def _handlers(self, theta: torch.Tensor, hyper: torch.Tensor
                  ) -> tuple[Callable[..., Any], Callable[..., Any]]:
        values = self.values(theta, hyper)
        return (poutine.substitute(self.model, data=_only(values, self._readers[0])),
                poutine.substitute(self.guide, data=_only(values, self._readers[1])))

    def negative_elbo(self, theta: torch.Tensor, hyper: torch.Tensor, seed: int, *,
                      objective: bool = False) -> torch.Tensor:
        """:math:`-\\mathrm{ELBO}` on the training data with noise seeded at ``seed``."""
        model, guide = self._handlers(theta, hyper)
        elbo = self._objective_elbo if objective else self._elbo
        with self.scope(), _seeded(seed, theta.device):
            return elbo.differentiable_loss(model, guide, *self.args, **self.kwargs)

    def loss(self, theta: torch.Tensor, hyper: torch.Tensor, step: int) -> torch.Tensor:
        """:math:`L(\\theta, h, t) = -\\mathrm{ELBO}`, noise seeded from ``(seed, step)``."""
        return self.negative_elbo(theta, hyper, _stream_seed(self.seed, 0, int(step)))

    def gradient(self, theta: torch.Tensor, hyper: torch.Tensor, step: int) -> torch.Tensor:
        r""":math:`\nabla_\theta L(\theta, h, t)` (see :meth:`value_and_gradients`)."""
        return self.value_and_gradients(theta, hyper, step)[1]

    def value_and_gradients(self, theta: torch.Tensor, hyper: torch.Tensor, step: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r""":math:`L(\theta, h, t)`, :math:`\nabla_\theta L` and :math:`\nabla_h L`, traced.

        The same draws, value and gradients as autograd through :meth:`loss`
        (to float rounding), several times faster: the ELBO step is traced
        once (:class:`~pyro_structsel.infer.traced.TracedELBO`, on the
        problem's param store, whose ``theta`` and ``hyper`` tensors are set to
        the point asked for) and replayed with the noise seeded from
        ``(seed, step)``. A model it cannot trace, or a failed spot check,
        falls back to autograd through :meth:`loss` for the rest of the run.
        First derivatives only: methods that differentiate through the step
        (unrolled, rmad, greedy) keep autograd.
        """
        traced = self._traced_elbo()
        if traced is not None:
            with self.scope(), torch.no_grad():
                store = dict(pyro.get_param_store().named_parameters())
                for blocks, flat in ((self.theta_blocks, theta), (self.hyper_blocks, hyper)):
                    for block in blocks:
                        store[block.name].copy_(
                            flat[block.start:block.start + block.size].reshape(block.shape))
                with _seeded(_stream_seed(self.seed, 0, int(step)), theta.device):
                    value = traced.loss_and_grads(self.model, self.guide, *self.args,
                                                  **self.kwargs)
                grads = [[store[block.name].grad for block in blocks]
                         for blocks in (self.theta_blocks, self.hyper_blocks)]
                for tensor in store.values():
                    tensor.grad = None
            if traced.changed is None:
                flat_grads = [torch.cat([torch.zeros(block.size, dtype=like.dtype)
                                         if grad is None else grad.reshape(-1)
                                         for block, grad in zip(blocks, parts)])
                              if blocks else torch.zeros_like(like)
                              for blocks, parts, like in ((self.theta_blocks, grads[0], theta),
                                                          (self.hyper_blocks, grads[1], hyper))]
                return torch.tensor(value, dtype=theta.dtype), flat_grads[0], flat_grads[1]
            self._traced = False
        with torch.enable_grad():
            point, h = theta.detach().requires_grad_(True), hyper.detach().requires_grad_(True)
            value = self.loss(point, h, step)
            d_theta, d_hyper = torch.autograd.grad(value, [point, h], allow_unused=True,
                                                   materialize_grads=True)
        return value.detach(), d_theta.detach(), d_hyper.detach()

    def _traced_elbo(self) -> TracedELBO | None:
        """The traced ELBO step of the inner runs, built on first use (``None``: cannot be)."""
        if self._traced is None:
            with self.scope():
                try:
                    self._traced = TracedELBO(self.model, self.guide, self.args, self.kwargs,
                                              elbo=self._elbo)
                except NotTraceableError:
                    self._traced = False
        return self._traced or None

    def objective(self, theta: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """:math:`Q(\\theta, h)`: negative ELBO or held-out negative log predictive density."""
        if self.validation is None:
            return self.negative_elbo(theta, hyper, _stream_seed(self.seed, 1), objective=True)
        return self.negative_log_predictive(theta, hyper)

    def negative_log_predictive(self, theta: torch.Tensor, hyper: torch.Tensor
                                ) -> torch.Tensor:
        r"""Validation loss :math:`-\sum_i \log \frac1S \sum_s p(y_i \mid x_i, w_s, \Gamma_s)`.

        :math:`S` = ``num_objective_samples`` reparameterised draws
        :math:`(w_s, \Gamma_s) \sim q` (fixed seed, so differentiable in
        :math:`\theta`); :math:`i` runs over the elements of every observed
        site's log density on the validation data.
        """
        assert self.validation is not None
        val_args, val_kwargs = self.validation
        model, guide = self._handlers(theta, hyper)
        per_draw = []
        with self.scope(), _seeded(_stream_seed(self.seed, 2), theta.device):
            for _ in range(self.num_objective_samples):
                guide_trace = poutine.trace(guide).get_trace(*self.args, **self.kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                    *val_args, **val_kwargs)
                parts = [site["fn"].log_prob(site["value"]).reshape(-1)
                         for site in model_trace.nodes.values()
                         if site["type"] == "sample" and site["is_observed"]]
                if not parts:
                    raise ValueError("The model has no observed site on the validation data; "
                                     "pass the targets among the validation arguments.")
                per_draw.append(torch.cat(parts))
        log_lik = torch.stack(per_draw)
        return -(torch.logsumexp(log_lik, 0) - math.log(log_lik.shape[0])).sum()

    def state(self, theta: torch.Tensor, hyper: torch.Tensor) -> dict[str, Any]:
        """A param-store state (``{"params", "constraints"}``) holding ``theta`` and ``hyper``."""
        params = {name: value.detach().clone() for name, value in self._state["params"].items()}
        for block in self.theta_blocks:
            params[block.name] = theta[block.start:block.start + block.size].reshape(block.shape)
        for block in self.hyper_blocks:
            params[block.name] = hyper[block.start:block.start + block.size].reshape(block.shape)
        return clone_param_state({"params": params, "constraints": self._state["constraints"]})


def _only(values: Mapping[str, torch.Tensor], names: frozenset[str]
          ) -> dict[str, torch.Tensor]:
    """The values of ``names``, keyed as ``poutine.substitute`` looks them up.

    (A ``pyro.module`` parameter ``"module$$$weight"`` is looked up as ``"weight"``.)
    """
    return {user_param_name(name): value for name, value in values.items() if name in names}


def _parameters_as_pyro_params(module: Any) -> None:
    """Turn the plain ``nn.Parameter`` s of a PyroModule guide into unconstrained PyroParams.

    A PyroModule issues ``pyro.param`` for a plain parameter but returns its own
    tensor, so ``poutine.substitute`` cannot plug :math:`\theta` in: the
    ``loc`` of ``AutoDiagonalNormal``, ``AutoMultivariateNormal`` and
    ``AutoLowRankMultivariateNormal`` (and the ``cov_factor`` of the last)
    would never train. As PyroParams (real constraint, same name and tensor in
    the store) they are substituted like every other parameter.
    """
    if not isinstance(module, PyroModule):
        return
    for sub in module.modules():
        if not isinstance(sub, PyroModule):
            continue
        for name, value in list(sub._parameters.items()):
            if value is None or name.endswith("_unconstrained"):
                continue
            delattr(sub, name)
            setattr(sub, name, PyroParam(value.detach(), constraints.real))


def _parameters_in_graph(model: Callable[..., Any], guide: Callable[..., Any], args: tuple,
                         kwargs: Mapping[str, Any], state: Mapping[str, Any],
                         readers: tuple[frozenset[str], frozenset[str]]) -> set[str]:
    """Names of the parameters the ELBO is a function of (call inside the problem's scope).

    A parameter that model or guide reads but that never reaches the ELBO's
    graph (e.g. the own weights of a network whose weights are replaced by
    samples) is no part of :math:`\\theta`.
    """
    leaves = {name: state["params"][name].detach().clone().requires_grad_(True)
              for name in readers[0] | readers[1]}
    values = {name: transform_to(state["constraints"][name])(leaf)
              for name, leaf in leaves.items()}
    with poutine.block():
        elbo = Trace_ELBO(max_plate_nesting=max_plate_nesting(model, args, kwargs))
        value = elbo.differentiable_loss(poutine.substitute(model, data=_only(values, readers[0])),
                                         poutine.substitute(guide, data=_only(values, readers[1])),
                                         *args, **kwargs)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return {name for name, grad in zip(leaves, grads) if grad is not None}


#: Hyperparameters of a BayesianModule that are learnable only with a flag, and the flag.
LEARNABLE_FLAGS = {"prior_scale": "learn_prior_scale", "concentration": "learn_concentration",
                   "temperature": "learn_temperature"}


def _check_int(value: Any, argument: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected {argument} to be an int >= {low}, but got {value!r}.")
    return value


def _check_method_criterion(method: str, criterion: str) -> None:
    if method not in METHODS and method != "auto":
        raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)} or "
                         "'auto'.")
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; expected one of {list(CRITERIA)}.")


def hyperparameter_problem(model: Callable[..., Any], *args: Any,
                           hyperparameters: Sequence[str], criterion: str = "evidence",
                           validation: tuple | int | None = None, guide: Any = None,
                           num_particles: int = 1, num_objective_samples: int = 8,
                           vectorize_particles: bool = False, seed: int = 0,
                           _with_full_data: bool = False, **kwargs: Any
                           ) -> list[HyperparameterProblem]:
    r"""The closures :math:`L`, :math:`Q` and flat :math:`\theta_0`, :math:`h_0` of a Pyro model.

    :math:`\theta` holds every unconstrained parameter of the guide (the
    default guide of :func:`~pyro_structsel.select_structure` when ``guide`` is
    ``None``) and every model parameter not named in ``hyperparameters`` that
    the model reads through ``pyro.param`` (a PyroModule's own weights that
    are only replaced by samples are left out);
    :math:`h` holds the named model parameters, unconstrained. Values are
    plugged into the unchanged model and guide with ``poutine.substitute``.

    :math:`L(\theta, h, t) = -\mathrm{ELBO}` on the training data
    (:class:`~pyro_structsel.infer.svi.FactorisedELBO`, analytic KL, for the
    default guide; ``Trace_ELBO`` otherwise), ``num_particles`` particles
    seeded from ``seed + t``. :math:`Q`: for ``criterion="evidence"`` the
    negative ELBO with ``num_objective_samples`` particles and a fixed seed;
    for ``"validation"`` the negative log predictive density of the validation
    data (:meth:`HyperparameterProblem.negative_log_predictive`).

    ``validation``: a tuple of validation arguments replacing ``args``
    (keyword arguments are reused, without ``batch_size`` for a
    :class:`~pyro_structsel.NetworkModel`), or an int K: K folds over
    dimension 0 of the tensor arguments (:func:`~pyro_structsel.kfold_indices`
    with ``seed``), one problem per fold, all with the same :math:`\theta_0`.

    Returns
    -------
    list of HyperparameterProblem
        One problem (evidence, hold-out) or K (folds).

    Raises
    ------
    ValueError
        On unknown hyperparameter names (the message lists the model's
        parameters), a missing or ill-formed ``validation``, bad counts.
    """
    _check_method_criterion("unrolled", criterion)
    _check_int(num_particles, "num_particles", 1)
    _check_int(num_objective_samples, "num_objective_samples", 1)
    if not callable(model):
        raise ValueError(f"Expected model to be a callable Pyro model, but got {model!r}.")
    if isinstance(hyperparameters, str) or not isinstance(hyperparameters, Sequence):
        raise ValueError(f"Expected hyperparameters to be a list of parameter names, but got "
                         f"{hyperparameters!r}.")
    names = list(hyperparameters)
    if len(set(names)) != len(names):
        raise ValueError(f"hyperparameters repeats names: {names}.")
    check_inputs(model, args, kwargs)
    if criterion == "evidence" and validation is not None:
        raise ValueError("validation data is only used with criterion='validation'; drop "
                         "validation or pass criterion='validation'.")
    if criterion == "validation" and validation is None:
        raise ValueError("criterion='validation' needs validation: a tuple of validation "
                         "arguments (like args) or an int K for K folds.")

    def held_out_kwargs(kw: Mapping[str, Any]) -> dict[str, Any]:
        kw = dict(kw)
        if isinstance(model, NetworkModel):  # score the whole validation set, no minibatch
            kw.pop("batch_size", None)
        return kw

    splits: list[tuple[tuple, dict[str, Any], tuple[tuple, dict[str, Any]] | None]]
    if validation is None:
        splits = [(args, dict(kwargs), None)]
    elif isinstance(validation, tuple):
        if len(validation) != len(args):
            raise ValueError(f"Expected validation to hold {len(args)} arguments like args, but "
                             f"got {len(validation)}.")
        check_inputs(model, validation, {})
        splits = [(args, dict(kwargs), (validation, held_out_kwargs(kwargs)))]
    elif isinstance(validation, int) and not isinstance(validation, bool):
        num_data = num_data_rows(args, kwargs)
        splits = []
        for test in kfold_indices(num_data, validation, seed=seed):
            train_args, train_kwargs = subset_rows(args, kwargs, training_index(num_data, test))
            val_args, val_kwargs = subset_rows(args, kwargs, test)
            splits.append((train_args, train_kwargs, (val_args, held_out_kwargs(val_kwargs))))
    else:
        raise ValueError(f"Expected validation to be a tuple of validation arguments or an int "
                         f"number of folds, but got {type(validation).__name__}.")

    with module_params_kept(model):
        try:
            with pyro.get_param_store().scope() as model_params:
                trace = trace_model(model, args, kwargs)
        except ValueError:
            raise
        except Exception as error:  # a shape clash inside torch or Pyro: say where to look
            raise ValueError(f"Running the model on the given data failed "
                             f"({type(error).__name__}: {error}); check the data.") from error
        unknown = [n for n in names if n not in model_params["params"]]
        if unknown:
            fixed = {n: flag for n in unknown for key, flag in LEARNABLE_FLAGS.items()
                     if n.rsplit(".", 1)[-1] == key}
            hint = "".join(f" {n!r} is a fixed buffer unless the model makes it learnable: "
                           f"build it with {flag}=True (e.g. ps.NetworkModel(..., {flag}=True))."
                           for n, flag in fixed.items())
            raise ValueError(f"Unknown hyperparameter(s) {unknown}; the model's parameters are "
                             f"{sorted(model_params['params'])} (plus 'lr' and 'momentum', the "
                             f"inner optimiser's).{hint}")
        sites = structural_sites(trace)
        with pyro.get_param_store().scope(clone_param_state(model_params)) as state:
            built = build_guide(model, guide, sites, args, kwargs, None)
            # create the guide's parameters; record which parameters guide and model read
            with poutine.block(), torch.no_grad():
                poutine.trace(built).get_trace(*args, **kwargs)
                _parameters_as_pyro_params(built)
                with poutine.trace(param_only=True) as guide_capture:
                    guide_trace = poutine.trace(built).get_trace(*args, **kwargs)
                with poutine.trace(param_only=True) as model_capture:
                    poutine.replay(model, trace=guide_trace)(*args, **kwargs)
            readers = (frozenset(model_capture.trace.nodes), frozenset(guide_capture.trace.nodes))
            used = _parameters_in_graph(model, built, args, kwargs,
                                        pyro.get_param_store().get_state(), readers)
    unused = [n for n in names if n not in used]
    if unused:
        raise ValueError(f"The ELBO does not depend on hyperparameter(s) {unused}; pass model "
                         f"parameters that it depends on (it depends on {sorted(used)}).")
    latents = {name: site for name, site in guide_trace.nodes.items()
               if site["type"] == "sample" and not site["is_observed"]
               and not site_is_subsample(site)}  # a plate's own site is no latent
    not_reparameterised = [name for name, site in latents.items() if not site["fn"].has_rsample]
    if not_reparameterised:
        raise ValueError(f"The guide samples {not_reparameterised} without reparameterisation; "
                         "hypergradients need a fully reparameterised guide.")
    if validation is not None:  # a latent per observation has no value on held-out rows
        data_plates = {frame.name for site in trace.nodes.values()
                       if site["type"] == "sample" and site["is_observed"]
                       for frame in site["cond_indep_stack"]}
        local = [name for name, site in latents.items()
                 if any(frame.name in data_plates for frame in site["cond_indep_stack"])]
        if local:
            raise ValueError(f"criterion='validation' needs global latent variables only, but "
                             f"the guide samples {local} per observation (inside a data "
                             "plate); use criterion='evidence' for this model.")
    second_order = not any(isinstance(base_distribution(site["fn"]), _ONCE_DIFFERENTIABLE)
                           for site in latents.values())
    unconstrained = {name: value.detach() for name, value in state["params"].items()}
    theta_names = [n for n in unconstrained if n not in names and n in used]
    if not theta_names:
        raise ValueError("Nothing to train: the guide and model have no parameters besides the "
                         "hyperparameters.")
    theta_blocks = _layout(theta_names, unconstrained, state["constraints"])
    hyper_blocks = _layout(names, unconstrained, state["constraints"])
    common = dict(model=model, guide=built, state=state, theta_blocks=theta_blocks,
                  hyper_blocks=hyper_blocks, num_particles=num_particles,
                  num_objective_samples=num_objective_samples,
                  vectorize_particles=vectorize_particles, seed=seed, second_order=second_order,
                  readers=readers)
    problems = [HyperparameterProblem(train=(a, k), validation=val, **common)
                for a, k, val in splits]
    if _with_full_data:
        problems.append(HyperparameterProblem(train=(args, dict(kwargs)), validation=None,
                                              **common))
    return problems


# --------------------------------------------------------------------------- the front end

class HyperparameterResult:
    r"""What :func:`optimize_hyperparameters` found.

    Attributes
    ----------
    method, criterion : str
        As passed.
    names : list of str
        The hyperparameters in the order of the unconstrained vector (the
        columns of ``hypergradients`` and ``unconstrained``): the model's, then
        ``"lr"``, then ``"momentum"``.
    hyperparameters : dict
        Name → final value (constrained: positive scales, the learning rate or
        its schedule, ...).
    trajectory : dict
        Name → tensor of shape ``(num_outer_steps + 1, *shape)``: the value
        before every outer step and the final one.
    objective : Tensor, shape ``(num_outer_steps + 1,)``
        :math:`Q` at the hyperparameters of ``trajectory`` (mean over folds);
        for ``joint``, at the :math:`\theta` reached so far (so the first entry
        is at the untrained :math:`\theta_0`).
    hypergradients : Tensor, shape ``(num_outer_steps, m)``
        :math:`dQ/du` of the unconstrained vector :math:`u` at every outer step
        (``joint``: :math:`\partial_u L` at the end of the step's block).
    unconstrained : Tensor, shape ``(num_outer_steps + 1, m)``
        The unconstrained hyperparameter vector along the run.
    theta : Tensor
        Final flat :math:`\theta` (inner run at the final hyperparameters).
    param_state : dict
        Param-store state with the final guide parameters and model
        hyperparameters; load it with ``pyro.get_param_store().set_state``, or
        use :meth:`param_scope`.
    model, guide, args, kwargs :
        What was optimised; the guide's parameters live in :meth:`param_scope`.
    diagnostics : list of dict
        Per outer step: the methods' diagnostics (seconds, solver iterations, ...).
    """

    def __init__(self, *, method: str, criterion: str, names: list[str],
                 values: list[dict[str, torch.Tensor]], objective: list[float],
                 hypergradients: list[torch.Tensor], unconstrained: list[torch.Tensor],
                 theta: torch.Tensor, param_state: dict[str, Any], model: Callable[..., Any],
                 guide: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                 diagnostics: list[dict[str, Any]]) -> None:
        self.method, self.criterion, self.names = method, criterion, names
        self.trajectory = {name: torch.stack([v[name] for v in values]) for name in names}
        self.hyperparameters = {name: values[-1][name] for name in names}
        self.objective = torch.tensor(objective, dtype=torch.float64)
        self.hypergradients = torch.stack(hypergradients) if hypergradients else torch.zeros(0)
        self.unconstrained = torch.stack(unconstrained)
        self.theta = theta
        self.param_state = param_state
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.diagnostics = diagnostics

    @contextmanager
    def param_scope(self) -> Iterator[dict[str, Any]]:
        """Context in which Pyro's param store holds the final parameters (only)."""
        with module_params_kept(self.model), \
                pyro.get_param_store().scope(self.param_state) as state:
            yield state

    def summary(self) -> pd.DataFrame:
        """One row per outer step (and the final one): :math:`Q` and every hyperparameter value."""
        table: dict[str, Any] = {"objective": self.objective.numpy()}
        for name, values in self.trajectory.items():
            flat = values.reshape(values.shape[0], -1)
            if flat.shape[1] == 1:
                table[name] = flat[:, 0].numpy()
            else:
                for i in range(flat.shape[1]):
                    table[f"{name}[{i}]"] = flat[:, i].numpy()
        frame = pd.DataFrame(table)
        frame.index.name = "outer_step"
        return frame

    def plot(self, ax: Any = None) -> Any:
        """Plot :math:`Q` and the hyperparameters against the outer step; returns the figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, (ax_q, ax_h) = plt.subplots(1, 2, figsize=(9, 3.5))
        else:
            ax_q, ax_h = ax
            fig = ax_q.figure
        ax_q.plot(self.objective.numpy(), marker=".")
        ax_q.set(xlabel="outer step", ylabel="Q", title=f"{self.criterion} ({self.method})")
        frame = self.summary().drop(columns="objective")
        for column in frame.columns[:20]:
            ax_h.plot(frame[column].to_numpy(), label=column)
        ax_h.set(xlabel="outer step", ylabel="value", title="hyperparameters")
        if bool((frame.to_numpy() > 0).all()):
            ax_h.set_yscale("log")
        ax_h.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        parts = []
        for name, value in self.hyperparameters.items():
            flat = value.reshape(-1)
            shown = f"{float(flat[0]):.4g}" if flat.numel() == 1 else \
                "[" + ", ".join(f"{float(x):.4g}" for x in flat[:4]) + \
                (", ...]" if flat.numel() > 4 else "]")
            parts.append(f"{name}={shown}")
        return (f"HyperparameterResult(method={self.method!r}, criterion={self.criterion!r}, "
                f"Q: {float(self.objective[0]):.4g} -> {float(self.objective[-1]):.4g}, "
                + ", ".join(parts) + ")")


def _schedule(value: Any, num_steps: int, argument: str) -> torch.Tensor:
    """A float or a length-``num_steps`` sequence as a float64 schedule."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"Expected {argument} to be a number or a schedule of "
                         f"{num_steps} numbers, but got {value!r}.") from error
    if tensor.dim() == 0:
        return tensor.expand(num_steps).clone()
    if tensor.shape != (num_steps,):
        raise ValueError(f"Expected {argument} to be a number or a schedule of num_inner_steps="
                         f"{num_steps} numbers, but got shape {tuple(tensor.shape)}.")
    return tensor.clone()


@dataclass(frozen=True)
class _Part:
    """A slice of the unconstrained hyperparameter vector and its map to the constrained value."""

    name: str
    start: int
    size: int
    kind: str  # "model", "lr" (log) or "momentum" (logit)

    def take(self, u: torch.Tensor) -> torch.Tensor:
        return u[self.start:self.start + self.size]


#: The methods that return one hypergradient per inner run (greedy and joint move h online).
_THROUGH_THE_RUN = {"unrolled": unrolled, "rmad": rmad, "implicit": implicit}


def _method_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``method_options`` against the keyword-only arguments of the method function."""
    options = dict(options or {})
    function = _THROUGH_THE_RUN.get(method)
    allowed = [] if function is None else [
        name for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method_options {unknown} are not options of method={method!r}; it "
                         f"takes {allowed or 'none'}.")
    return options


def optimize_hyperparameters(
    model: Callable[..., Any],
    *args: Any,
    hyperparameters: Sequence[str],
    criterion: str = "evidence",
    validation: tuple | int | None = None,
    method: str = "auto",
    num_outer_steps: int = 20,
    num_inner_steps: int = 50,
    lr: float | Sequence[float] | torch.Tensor = 0.01,
    momentum: float | Sequence[float] | torch.Tensor = 0.9,
    outer_lr: float = 0.05,
    guide: Any = None,
    num_particles: int = 1,
    num_objective_samples: int = 8,
    vectorize_particles: bool = False,
    method_options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> HyperparameterResult:
    r"""Choose hyperparameters by gradient descent on :math:`Q(T^\eta(L, \theta_0, h), h)`.

    Solves :math:`h^* = \arg\min_h Q(T^\eta(L, \theta_0, h), h)` (DESIGN.md §5):
    :math:`T^\eta` is ``num_inner_steps`` steps of SGD with momentum
    (:func:`~pyro_structsel.hyper.reversible.sgd_momentum`) on
    :math:`L = -\mathrm{ELBO}` of ``model(*args, **kwargs)`` over the guide's
    parameters :math:`\theta`, every outer step starting from the same
    :math:`\theta_0` (the guide's initial values); Adam with learning rate
    ``outer_lr`` moves the unconstrained hyperparameters :math:`u` by the
    hypergradient of ``method``:

    - ``"unrolled"`` (:func:`~pyro_structsel.hyper.hypergradients.unrolled`),
      ``"rmad"`` (:func:`~pyro_structsel.hyper.reversible.rmad`, same hypergradient,
      memory :math:`O(|\theta|)`): exact reverse mode through the run; the
      only methods that tune ``"lr"`` and ``"momentum"``;
    - ``"greedy"`` (:func:`~pyro_structsel.hyper.hypergradients.greedy`): one-step
      look-ahead hypergradients, applied online by Adam at every inner step
      (so the trajectory moves ``num_inner_steps`` times per outer step);
    - ``"implicit"`` (:func:`~pyro_structsel.hyper.hypergradients.implicit`):
      implicit-function-theorem hypergradient at the end of the inner run
      (``method_options`` e.g.
      ``{"solver": "neumann", "neumann_terms": 20, "grad_tol": None}``);
    - ``"joint"`` (:func:`~pyro_structsel.hyper.hypergradients.joint`,
      ``criterion="evidence"`` only): empirical Bayes, :math:`\theta` and
      :math:`h` descend together on :math:`L = Q` in one continuous run of
      ``num_outer_steps × num_inner_steps`` steps
      (velocity restarted at each outer step).

    Parameters
    ----------
    model : callable
        A Pyro model, e.g. :class:`~pyro_structsel.NetworkModel`.
    *args, **kwargs
        Training data, passed to the model and guide.
    hyperparameters : list of str
        Model parameter names (param-store names, e.g. ``"net.prior_scale"``
        of ``NetworkModel(..., learn_prior_scale=True)``, ``"net.concentration"``
        or ``"net.temperature"`` with ``learn_concentration`` /
        ``learn_temperature``), and ``"lr"`` (the inner learning rate, scalar or
        the whole schedule when ``lr`` is a schedule; tuned as
        :math:`\log\alpha`) and ``"momentum"`` (tuned as
        :math:`\operatorname{logit}\gamma`).
    criterion : {"evidence", "validation"}
        :math:`Q = L = -\mathrm{ELBO}`, or :math:`Q` = negative log predictive
        density of validation data (see :func:`hyperparameter_problem`).
    validation : tuple or int, optional
        Validation arguments (hold-out), or K for K folds (:math:`Q` = mean over
        folds, one inner run per fold). With ``"greedy"`` the folds run one
        after the other, each moving :math:`h` online, and the recorded
        hypergradient is the last fold's.
    method : {"auto", "unrolled", "rmad", "greedy", "implicit", "joint"}
        Hypergradient method. ``"auto"`` (default): ``"unrolled"``, unless the
        guide samples a Dirichlet (the default structure prior) or another site
        torch differentiates only once; then ``"joint"`` (empirical Bayes) for
        ``criterion="evidence"`` and ``"greedy"`` for ``"validation"``.
    num_outer_steps, num_inner_steps : int
        Adam steps on :math:`h`; inner steps :math:`\eta`.
    lr, momentum : float or schedule of length ``num_inner_steps``
        Inner SGD learning rate :math:`\alpha_t > 0` and momentum
        :math:`\gamma_t \in (0, 1)`.
    outer_lr : float
        Adam learning rate on :math:`u`.
    guide : callable, AutoGuide class or None
        As in :func:`~pyro_structsel.select_structure`; must be fully
        reparameterised.
    num_particles : int
        ELBO particles of :math:`L` per inner step.
    num_objective_samples : int
        ELBO particles (evidence) or predictive draws (validation) of :math:`Q`.
    vectorize_particles : bool
        Vectorise the particles of the ELBOs.
    method_options : dict, optional
        Keyword-only arguments of the method function (``"unrolled"``: none;
        ``"rmad"``: ``fraction_bits``, ``momentum_bits``; ``"implicit"``: ``solver``,
        ``tol``, ``max_iter``, ``neumann_step_size``, ``neumann_terms``,
        ``grad_tol``); ``greedy`` and ``joint`` take none here (Adam with
        ``outer_lr`` updates :math:`h`).
    seed : int, optional
        Base seed of the Monte Carlo noise (and of the folds); ``None`` draws one
        from torch's RNG.
    progress : bool
        Progress bar over outer steps with the current :math:`Q`.

    Returns
    -------
    HyperparameterResult

    Raises
    ------
    ValueError
        Unknown hyperparameter names (listing the model's parameters), method or
        criterion; ``criterion="validation"`` without ``validation``;
        ``"joint"`` with ``"validation"``; ``"lr"``/``"momentum"`` with a method
        that cannot tune them; a second-order method with a Dirichlet guide
        (torch differentiates its samples only once); counts below 1.

    Example
    -------
    >>> model = ps.NetworkModel(ps.one_hidden_layer(4, 3), learn_prior_scale=True)
    >>> result = ps.optimize_hyperparameters(
    ...     model, x, y, hyperparameters=["net.prior_scale", "lr"], method="rmad",
    ...     num_outer_steps=10, num_inner_steps=100, lr=0.05, seed=0)
    >>> result.hyperparameters["net.prior_scale"]

    References
    ----------
    D. Maclaurin, D. Duvenaud, R. Adams. Gradient-based hyperparameter
    optimization through reversible learning. ICML 2015.
    J. Lorraine, P. Vicol, D. Duvenaud. Optimizing millions of hyperparameters
    by implicit differentiation. AISTATS 2020.
    """
    _check_method_criterion(method, criterion)
    auto = method == "auto"
    if auto:  # provisional: second derivatives are known once the guide is built
        method = "unrolled"
    num_outer_steps = _check_int(num_outer_steps, "num_outer_steps", 1)
    num_inner_steps = _check_int(num_inner_steps, "num_inner_steps", 1)
    if not (isinstance(outer_lr, (int, float)) and math.isfinite(outer_lr) and outer_lr > 0):
        raise ValueError(f"Expected outer_lr > 0, but got {outer_lr!r}.")
    if isinstance(hyperparameters, str) or not isinstance(hyperparameters, Sequence) \
            or not hyperparameters:
        raise ValueError(f"Expected hyperparameters to be a non-empty list of names, but got "
                         f"{hyperparameters!r}.")
    if method == "joint" and criterion != "evidence":
        raise ValueError("method='joint' descends theta and h on the same loss (L = Q), which "
                         "only criterion='evidence' gives; use method='unrolled', 'rmad', "
                         "'greedy' or 'implicit' for criterion='validation'.")
    tuned = [n for n in hyperparameters if n in OPTIMISER_HYPERPARAMETERS]
    if tuned and method not in ("unrolled", "rmad"):
        raise ValueError(f"method={method!r} cannot tune {tuned}: the inner optimum does not "
                         "depend on them (implicit, joint) or a one-step look-ahead sees only "
                         "their short-horizon effect (greedy); use method='unrolled' or 'rmad'.")
    options = _method_options(method, method_options)
    alpha = _schedule(lr, num_inner_steps, "lr")
    gamma = _schedule(momentum, num_inner_steps, "momentum")
    check_schedules(alpha, gamma)
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31, ()))
    model_names = [n for n in hyperparameters if n not in OPTIMISER_HYPERPARAMETERS]
    problems = hyperparameter_problem(
        model, *args, hyperparameters=model_names, criterion=criterion, validation=validation,
        guide=guide, num_particles=num_particles, num_objective_samples=num_objective_samples,
        vectorize_particles=vectorize_particles, seed=seed,
        _with_full_data=isinstance(validation, int), **kwargs)
    full = problems.pop() if isinstance(validation, int) else problems[0]
    if auto and not full.second_order:  # a Dirichlet (Gamma, Beta) guide: first-order methods
        if tuned:
            raise ValueError(f"The guide samples a Dirichlet (or Gamma/Beta) site, whose "
                             f"samples torch differentiates only once, so {tuned} cannot be "
                             "tuned (that needs method='unrolled' or 'rmad'); use "
                             "prior='concrete' or drop them.")
        method = "joint" if criterion == "evidence" else "greedy"
        options = _method_options(method, method_options)
    if method in ("unrolled", "rmad", "implicit") and not full.second_order:
        raise ValueError(f"method={method!r} needs second derivatives of the ELBO, but the "
                         "guide samples a Dirichlet (or Gamma/Beta) site, whose reparameterised "
                         "samples torch differentiates only once (the second derivative would "
                         "be silently dropped). Use prior='concrete', a Concrete guide, or "
                         "method='greedy' or 'joint'.")
    dtype = full.theta0.dtype
    alpha, gamma = alpha.to(dtype), gamma.to(dtype)

    # the unconstrained vector u: model hyperparameters, then log lr, then logit momentum
    parts, start = [], 0
    for block in full.hyper_blocks:
        parts.append(_Part(block.name, block.start, block.size, "model"))
        start += block.size
    pieces = [full.hyper0]
    for name, schedule, forward in (("lr", alpha, torch.log), ("momentum", gamma, torch.logit)):
        if name in hyperparameters:
            learn = schedule if torch.as_tensor(lr if name == "lr" else momentum).dim() \
                else schedule[:1]
            parts.append(_Part(name, start, learn.numel(), name))
            pieces.append(forward(learn))
            start += learn.numel()
    u = torch.cat(pieces).detach().clone().requires_grad_(True)
    hyper_size = full.hyper0.numel()

    def unpack(vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, g = alpha, gamma
        for part in parts:
            if part.kind == "lr":
                a = part.take(vector).exp().expand(num_inner_steps).clone()
            elif part.kind == "momentum":
                g = torch.sigmoid(part.take(vector)).expand(num_inner_steps).clone()
        return vector[:hyper_size], a, g

    def constrained(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        h, a, g = unpack(vector.detach())
        values = {b.name: b.constrained(h).detach().clone() for b in full.hyper_blocks}
        for part in parts:
            if part.kind != "model":
                schedule = a if part.kind == "lr" else g
                values[part.name] = schedule[:part.size].clone() if part.size > 1 \
                    else schedule[0].clone()
        return values

    def chain(d_hyper: torch.Tensor, d_alpha: torch.Tensor, d_gamma: torch.Tensor,
              a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """dQ/du from dQ/dh, dQ/dα, dQ/dγ (α = exp, γ = sigmoid of the u slices)."""
        out = [d_hyper.detach()]
        for part in sorted((p for p in parts if p.kind != "model"), key=lambda p: p.start):
            grad = d_alpha * a if part.kind == "lr" else d_gamma * g * (1 - g)
            out.append(grad if part.size > 1 else grad.sum().reshape(1))
        return torch.cat(out)

    adam = torch.optim.Adam([u], lr=outer_lr)

    def adam_step(gradient: torch.Tensor) -> None:
        u.grad = gradient.to(u).clone()
        adam.step()

    values, objective, grads, path, diagnostics = [constrained(u)], [], [], [u.detach().clone()], []
    bar = progress_bar(range(num_outer_steps), desc=f"optimize_hyperparameters[{method}]",
                       enabled=progress, unit="outer steps")
    theta = full.theta0.clone()
    try:
        for outer in bar:
            h, a, g = unpack(u.detach())
            if method == "joint":
                def online(step: int, hh: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
                    adam_step(grad)
                    return u.detach()[:hyper_size].clone()

                with torch.no_grad():  # Q where the block starts: this h and the current theta
                    q = float(full.objective(theta, h))
                def block_loss(th: torch.Tensor, hh: torch.Tensor, step: int,
                               offset: int = outer * num_inner_steps) -> torch.Tensor:
                    return full.loss(th, hh, offset + step)  # fresh noise in every block

                def block_gradients(th: torch.Tensor, hh: torch.Tensor, step: int,
                                    offset: int = outer * num_inner_steps
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                    return full.value_and_gradients(th, hh, offset + step)  # traced

                result = joint(block_loss, theta, h, a, g, update=online,
                               gradients=block_gradients)
                theta = result.theta
                grad_u = result.hyper
                info = [result.diagnostics]
            elif method == "greedy":
                runs = []
                for problem in problems:
                    def online(step: int, hh: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
                        adam_step(grad)
                        return u.detach()[:hyper_size].clone()

                    runs.append(greedy(problem.loss, problem.objective, problem.theta0,
                                       u.detach()[:hyper_size].clone(), a, g, update=online))
                q = sum(r.objective for r in runs) / len(runs)
                grad_u = runs[-1].hyper
                info = [r.diagnostics for r in runs]
            else:
                function = _THROUGH_THE_RUN[method]
                runs = [function(problem.loss, problem.objective, problem.theta0, h, a, g,
                                 **options,  # the implicit inner run: first order, traced
                                 **({"gradient": problem.gradient} if method == "implicit"
                                    else {})) for problem in problems]
                q = sum(r.objective for r in runs) / len(runs)
                count = len(runs)
                grad_u = chain(sum(r.hyper for r in runs) / count,
                               sum(r.lr for r in runs) / count,
                               sum(r.momentum for r in runs) / count, a, g)
                adam_step(grad_u)
                info = [r.diagnostics for r in runs]
            objective.append(q)
            grads.append(grad_u.detach().clone())
            diagnostics.append({"runs": info})
            values.append(constrained(u))
            path.append(u.detach().clone())
            bar.set_postfix(Q=f"{q:.5g}")
    finally:
        bar.close()

    h, a, g = unpack(u.detach())
    with torch.no_grad():
        if method != "joint":
            theta = sgd_momentum(full.loss, full.theta0, h, a, g, gradient=full.gradient)
            finals = [float(problem.objective(sgd_momentum(problem.loss, problem.theta0, h, a,
                                                           g, gradient=problem.gradient), h))
                      for problem in problems]
            objective.append(sum(finals) / len(finals))
        else:
            objective.append(float(full.objective(theta, h)))
    return HyperparameterResult(
        method=method, criterion=criterion, names=[part.name for part in parts], values=values,
        objective=objective, hypergradients=grads, unconstrained=path, theta=theta.detach(),
        param_state=full.state(theta.detach(), h), model=model, guide=full.guide, args=args,
        kwargs=dict(kwargs), diagnostics=diagnostics)
