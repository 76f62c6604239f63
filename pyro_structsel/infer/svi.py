"""The SVI fit loop: progress bar, checkpoints with resume, and non-finite loss checks.

A run restarted with the same arguments resumes from its checkpoint (see
:mod:`pyro_structsel.infer.checkpoint`) and ends with the same result as a
run never killed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ..util.options import Resume, parse_option
from ..util.progress import progress_bar
from ..util.ranks import is_distributed, rank
from ..util.sampling import VectorizationWarning, first_line, max_plate_nesting
from ..util.stacklevel import find_stack_level
from . import distributed
from .checkpoint import (
    CHECKPOINT_FORMAT,
    check_checkpoint_path,
    check_resume,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
    with_optimizer_settings,
)
from .guides import is_factorised, structure_guides
from .optim import non_finite_state
from .traced import (
    AUTO_COMPILE_TIMED_STEPS,
    TRACE_MIN_STEPS,
    NotTraceableError,
    TracedELBO,
    should_compile,
)

logger = logging.getLogger(__name__)

#: Constraints whose transform maps finite values to finite values (identity, softplus).
_FINITE_WITH_UNCONSTRAINED = (type(constraints.real), type(constraints.softplus_positive))


class FactorisedELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` for fully factorised guides: analytic KL wherever it exists.

    Pyro checks the mean-field condition by asking that model and guide
    sample their sites in the same order, and warns otherwise. A guide whose
    sites are all independent (the default guide) meets the condition in any
    order, so the check is skipped.
    """

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> Any:
        return Trace_ELBO._get_trace(self, model, guide, args, kwargs)


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient became NaN or infinite during a fit."""


class TracingWarning(UserWarning):
    """A fit could not use a traced step and runs Pyro's own ELBO (the message says why)."""


class FitLosses(list):
    """The loss (−ELBO) of every step of a fit, a list of floats, and how the steps ran.

    Attributes
    ----------
    step : str
        How the last step was computed: ``"compiled"`` (the traced graph,
        compiled), ``"traced"`` (the traced graph,
        :class:`~pyro_structsel.infer.traced.TracedELBO`) or ``"pyro"``
        (Pyro's own ELBO).
    reason : str or None
        Why the steps are Pyro's when tracing was asked for.
    trace_seconds, compile_seconds : float or None
        Seconds spent tracing (with its checks) and compiling.
    """

    def __init__(self, losses: Iterable[float] = (), *, step: str = "pyro",
                 reason: str | None = None, trace_seconds: float | None = None,
                 compile_seconds: float | None = None) -> None:
        super().__init__(losses)
        self.step = step
        self.reason = reason
        self.trace_seconds = trace_seconds
        self.compile_seconds = compile_seconds


def _describe_non_finite(model: Callable[..., Any], guide: Callable[..., Any], args: tuple,
                         kwargs: Mapping[str, Any]) -> str:
    parts = []
    bad_params = [name for name, value in pyro.get_param_store().items()
                  if not bool(torch.isfinite(value).all())]
    if bad_params:
        parts.append(f"parameters with non-finite values: {bad_params}")
    try:
        with torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
        bad_values, bad_densities = [], []
        for trace in (guide_trace, model_trace):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if not bool(torch.isfinite(site["value"]).all()) and name not in bad_values:
                    bad_values.append(name)
                log_prob = site["fn"].log_prob(site["value"])
                if not bool(torch.isfinite(log_prob).all()) and name not in bad_densities:
                    bad_densities.append(name)
        if bad_values:
            parts.append(f"sites with non-finite values: {bad_values}")
        if bad_densities:
            parts.append(f"sites with non-finite log densities: {bad_densities}")
    except Exception as error:  # noqa: BLE001 -- diagnosis is best effort
        parts.append(f"re-running the model failed too ({type(error).__name__}: {error})")
    return "; ".join(parts) or "no site is non-finite on a fresh draw (the gradient overflowed)"


def _grads_finite(params: set[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    # one fused norm first (a NaN or inf anywhere makes it non-finite); per tensor only if it
    # alarms, since the norm of huge finite gradients can overflow too
    if bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _overflowed(unconstrained: Mapping[str, torch.Tensor], constraints: dict[str, Any]
                ) -> list[str]:
    """The parameters among ``unconstrained`` (name → tensor) whose value is no longer finite.

    A real or softplus-positive parameter is finite exactly when its
    unconstrained tensor is, so those are checked together in one fused norm;
    others (an ``exp`` can overflow a finite value) one by one. ``constraints``
    caches the store's constraints by name (filled here when a name is new).
    """
    store = pyro.get_param_store()
    names = [name for name in unconstrained if name in store]
    if any(name not in constraints for name in names):
        constraints.update(store.get_state()["constraints"])
    direct = [name for name in names if type(constraints[name]) in _FINITE_WITH_UNCONSTRAINED]
    if direct and not bool(torch.isfinite(torch.nn.utils.get_total_norm(
            [unconstrained[name].detach() for name in direct]))):
        direct = []  # something is off: check them one by one
    return [name for name in names
            if name not in direct and not bool(torch.isfinite(store[name]).all())]


def _clear_grads(params: Iterable[torch.Tensor]) -> None:
    """Drop the gradients (``None``, as ``torch.optim`` does: no zero-filled copies)."""
    for param in params:
        param.grad = None


def fit(model: Callable[..., Any], guide: Callable[..., Any], args: tuple = (),
        kwargs: Mapping[str, Any] | None = None, *, num_steps: int,
        optim: pyro.optim.PyroOptim, num_particles: int = 1,
        vectorize_particles: bool | None = None, progress: bool = True,
        checkpoint: str | os.PathLike[str] | None = None, checkpoint_every: int = 100,
        temperature: Callable[[int], float] | None = None,
        callback: Callable[[int, float], Any] | None = None,
        description: str = "select_structure", fast: bool | None = None,
        compile: bool | None = None, resume: str | Resume = "strict") -> FitLosses:
    """Run ``num_steps`` SVI steps; returns the loss (−ELBO) of every step (:class:`FitLosses`).

    The ELBO is :class:`FactorisedELBO` (analytic KL) for a fully factorised
    guide such as the default one, ``Trace_ELBO`` otherwise. With ``fast``
    it is traced once and replayed at every step
    (:class:`~pyro_structsel.infer.traced.TracedELBO`): the same loss,
    gradients and draws, several times faster. ``fast=None`` (default)
    traces when at least :data:`~pyro_structsel.infer.traced.TRACE_MIN_STEPS`
    steps remain (tracing pays for itself after about that many steps),
    ``True`` always, ``False`` never. A model whose structure is not static
    (see :mod:`pyro_structsel.infer.traced`) runs Pyro's ELBO with a
    :class:`TracingWarning` saying why.

    ``compile`` compiles the traced graph with ``torch.compile`` (same
    draws, about half the time per step, tens of seconds to compile):
    ``True`` at once, ``False`` never, ``None`` (default) when it pays: the
    first :data:`~pyro_structsel.infer.traced.AUTO_COMPILE_TIMED_STEPS`
    traced steps are timed, and the graph is compiled if the time it would
    save over the remaining steps exceeds the time compiling is expected to
    take (:func:`~pyro_structsel.infer.traced.should_compile`). The seconds
    spent are in the progress bar and in the :class:`FitLosses` returned.

    Call it inside the parameter store scope of the fit. With ``checkpoint``
    the state is saved every ``checkpoint_every`` steps and at the end, and an
    existing checkpoint is resumed if it was written by the same run (same
    model sites, guide parameters, data and optimiser settings; ``resume="relaxed"``
    also continues one written with other data values or optimiser settings,
    which then apply; see :mod:`pyro_structsel.infer.checkpoint`).
    ``temperature(step)`` anneals Concrete guides. A non-finite loss or gradient raises :class:`NonFiniteLossError`
    naming the step and the sites before the update; parameters (or their
    optimiser state, such as Adam's second moment) that overflow in an update
    raise it after, before any checkpoint. Either way the last
    checkpoint is the last good state.

    Under a ``torch.distributed`` process group (see
    :mod:`pyro_structsel.infer.distributed`) the fit is data-parallel: rank 0's
    initial parameters are broadcast, each rank gets its own particle noise,
    the gradients and the loss are averaged over the ranks before every
    step, and only rank 0 shows the bar and writes the checkpoint (which
    holds every rank's RNG state).
    """
    kwargs = dict(kwargs or {})
    resume = parse_option(Resume, resume, "resume")
    if checkpoint is not None:
        check_checkpoint_path(checkpoint)
    nesting = max_plate_nesting(model, args, kwargs)
    sharded = is_distributed()
    with poutine.block(), torch.no_grad():  # create the guide's parameters
        poutine.trace(guide).get_trace(*args, **kwargs)
        if sharded:  # and the model's, so that rank 0 can send them all
            poutine.trace(model).get_trace(*args, **kwargs)
    fingerprint = (run_fingerprint(model, args, kwargs, optim) if checkpoint is not None
                   else None)
    if sharded:  # one q on every rank, own particle noise per rank
        distributed.broadcast_parameters()
        distributed.seed_ranks()
    vectorize = num_particles > 1 and vectorize_particles is not False
    if vectorize and vectorize_particles is None:
        try:
            with poutine.block(), torch.no_grad():
                Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                           max_plate_nesting=nesting).loss(model, guide, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            vectorize = False
            logger.debug("Vectorised particles failed:\n%s", error)
            warnings.warn(f"The model is not safe for vectorised particles "
                          f"({first_line(error)}); looping over particles.",
                          VectorizationWarning, stacklevel=3)
    reason: str | None = None  # why the steps are not traced
    elbo_class = FactorisedELBO if is_factorised(guide) else Trace_ELBO
    elbo: Any = elbo_class(num_particles=num_particles, vectorize_particles=vectorize,
                           max_plate_nesting=nesting)
    losses: list[float] = []
    start = 0
    state = (distributed.load_shared(load_checkpoint, os.fspath(checkpoint))
             if checkpoint is not None else None)
    if state is not None:
        differences = check_resume(os.fspath(checkpoint), state, fingerprint, resume)
        if state["step"] > num_steps:
            raise ValueError(f"The checkpoint {os.fspath(checkpoint)!r} is at step "
                             f"{state['step']}, past num_steps={num_steps}.")
        pyro.get_param_store().set_state(state["params"])
        # PyroModules (autoguides, learnable priors) re-read the store only when called:
        # call them once, or attributes read outside a call (guide.posterior(), AutoNormal
        # locs) keep the pre-resume values when no step is left to run
        with poutine.block(), torch.no_grad():
            poutine.trace(guide).get_trace(*args, **kwargs)
            poutine.trace(model).get_trace(*args, **kwargs)
        optim.set_state(with_optimizer_settings(state["optim"], optim)
                        if "optimizer" in differences else state["optim"])
        distributed.restore_rng_state(state, os.fspath(checkpoint))  # type: ignore[arg-type]
        losses, start = list(state["losses"]), int(state["step"])

    if fast or (fast is None and num_steps - start >= TRACE_MIN_STEPS):
        # one traced graph per fit, unless the model's structure is not static
        annealed = structure_guides(guide) if temperature is not None else []
        for part in annealed:  # the temperature the first step reads
            part.temperature = float(temperature(start))  # type: ignore[misc]
        try:
            elbo = TracedELBO(model, guide, args, kwargs, elbo=elbo, temperatures=annealed)
        except NotTraceableError as error:
            reason = str(error)
            warnings.warn(f"{description} fits with Pyro's own ELBO, not a traced step: {error}. "
                          "(fast=False chooses Pyro's ELBO without this warning.)",
                          TracingWarning, stacklevel=find_stack_level())
    traced = elbo if isinstance(elbo, TracedELBO) else None

    def compile_graph() -> None:
        assert traced is not None
        try:
            traced.compile()
        except Exception as error:  # noqa: BLE001 -- the traced graph still runs
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            warnings.warn(f"{description} could not compile its traced step ({type(error).__name__}"
                          f": {' '.join(lines[:2])[:300]}); it runs the traced graph.",
                          TracingWarning, stacklevel=find_stack_level())

    if traced is not None and compile:
        compile_graph()
    timed: list[float] = []  # traced steps timed for compile=None

    def save(step: int) -> None:
        ranks = distributed.gather_rng_states()  # every rank's RNG; {} in one process

        def write() -> None:
            if rank() == 0:
                save_checkpoint(checkpoint, {  # type: ignore[arg-type]
                    "format": CHECKPOINT_FORMAT, "step": step, "losses": losses,
                    "fingerprint": json.dumps(fingerprint),
                    "params": pyro.get_param_store().get_state(), "optim": optim.get_state(),
                    "rng": pyro.util.get_rng_state(), **ranks})

        distributed.on_every_rank(write, f"writing the checkpoint of step {step}")

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        """One −ELBO estimate with its gradients; the parameters it read, by name."""
        if isinstance(elbo, TracedELBO):  # reads the store itself and names what it read
            return elbo.loss_and_grads(model, guide, *args, **kwargs), elbo.parameters_read()
        with poutine.trace(param_only=True) as capture:
            value = elbo.loss_and_grads(model, guide, *args, **kwargs)
        return value, {name: site["value"].unconstrained()
                       for name, site in capture.trace.nodes.items()}

    constraints: dict[str, Any] = {}  # of the parameters, by name: fixed during a fit
    bar = progress_bar(total=num_steps, initial=start, desc=description,
                       enabled=progress and rank() == 0)
    try:
        for step in range(start, num_steps):
            if temperature is not None:
                for part in structure_guides(guide):
                    part.temperature = float(temperature(step))
            # an exception on one rank (bad shard, model error) stops every rank
            began = time.perf_counter()
            loss, unconstrained = distributed.on_every_rank(loss_and_grads, f"at step {step}")
            if isinstance(elbo, TracedELBO) and distributed.all_reduce_mean(
                    elbo.changed is not None) > 0:  # a spot check failed (on some rank)
                reason = elbo.changed or "a spot check failed on another rank"
                warnings.warn(f"{description} continues with Pyro's own ELBO from step {step}: "
                              f"{reason}.", TracingWarning, stacklevel=find_stack_level())
                _clear_grads(unconstrained.values())
                elbo = elbo.elbo
                loss, unconstrained = distributed.on_every_rank(loss_and_grads,
                                                                f"at step {step}")
            elif isinstance(elbo, TracedELBO) and compile is None and not elbo.compiled \
                    and len(timed) < AUTO_COMPILE_TIMED_STEPS:
                if elbo.changed is None and not elbo.spot_checked:
                    timed.append(time.perf_counter() - began)
                if len(timed) == AUTO_COMPILE_TIMED_STEPS and should_compile(
                        elbo.num_nodes, distributed.all_reduce_mean(statistics.median(timed)),
                        num_steps - step - 1):  # the same decision on every rank
                    compile_graph()
            if sharded:  # mean over the ranks; a non-finite value on one rank reaches all
                loss = distributed.all_reduce_gradients(unconstrained, loss)
            params = set(unconstrained.values())
            if not math.isfinite(loss) or not _grads_finite(params):
                bad_grads = [name for name, tensor in unconstrained.items()
                             if not _grads_finite({tensor})]
                _clear_grads(params)
                what = "loss" if not math.isfinite(loss) else "gradient"
                raise NonFiniteLossError(
                    f"The {what} became non-finite at step {step} (loss={loss}): "
                    + (f"parameters with non-finite gradients: {bad_grads}; " if bad_grads else "")
                    + f"{_describe_non_finite(model, guide, args, kwargs)}. Lower the learning "
                    "rate, rescale the data or narrow the priors"
                    + (f"; the checkpoint {os.fspath(checkpoint)!r} keeps the last good state."
                       if checkpoint is not None else "."))
            optim(params)
            _clear_grads(params)
            # a finite gradient can still overflow a parameter, or the optimiser's state
            # (Adam's g**2 is inf for |g| > 1.8e19 in float32: the parameter stops moving)
            overflowed = _overflowed(unconstrained, constraints)
            stuck = non_finite_state(optim, unconstrained)
            if overflowed or stuck:
                raise NonFiniteLossError(
                    f"The update of step {step} (loss={loss}) made "
                    + (f"the parameters {overflowed} non-finite" if overflowed else "")
                    + (" and " if overflowed and stuck else "")
                    + (f"the optimiser state (e.g. Adam's running mean of squared gradients) "
                       f"of the parameters {stuck} non-finite, so they would never move again; "
                       "their gradients are too large for float32" if stuck else "")
                    + ". Lower the learning rate, rescale the data (standardise x) or narrow "
                    "the priors"
                    + (f"; the checkpoint {os.fspath(checkpoint)!r} keeps the last good state."
                       if checkpoint is not None else "."))
            losses.append(float(loss))
            if callback is not None:
                distributed.on_every_rank(lambda: callback(step, float(loss)),
                                          f"in the callback of step {step}")
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0
                                           or step + 1 == num_steps):
                save(step + 1)
            bar.update(1)
            if progress and (step % 10 == 0 or step + 1 == num_steps):
                recent = losses[-50:]
                compiled = {"compile": f"{traced.compile_seconds:.0f}s"} \
                    if traced is not None and traced.compiled else {}
                bar.set_postfix(elbo=f"{-sum(recent) / len(recent):.4g}", **compiled)
    finally:
        bar.close()
    step_kind = "pyro" if not isinstance(elbo, TracedELBO) else (
        "compiled" if elbo.compiled else "traced")
    return FitLosses(losses, step=step_kind, reason=reason,
                     trace_seconds=None if traced is None else traced.trace_seconds,
                     compile_seconds=None if traced is None else traced.compile_seconds)
