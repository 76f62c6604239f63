"""Draws from a guide scored under the model: the one pass every estimator builds on.

Draws are vectorised with a ``pyro.plate`` left of the model's own plates
(Pyro's vectorised particles). A model that is not safe for that (a weight
with extra batch dimensions breaking ``x @ W + b``, a Python branch on a
value, ...) falls back to drawing one at a time, with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from .memory import AllocationCounter, chunk_size_for
from .memory import memory_budget as resolve_budget
from .minibatch import check_full_data, full_data
from .stacklevel import find_stack_level
from .validation import check_observations

T = TypeVar("T")

_DRAWS_PLATE = "_structsel_draws"

logger = logging.getLogger(__name__)


class VectorizationWarning(UserWarning):
    """The model could not be vectorised over draws; they were drawn one at a time."""


def trace_model(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> Trace:
    """One trace of ``model`` (hidden from outer handlers), without plate subsample sites."""
    with poutine.block():
        return prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))


def max_plate_nesting(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> int:
    """Deepest plate nesting of ``model`` (number of batch dimensions its plates use)."""
    trace = trace_model(model, args, kwargs)
    dims = [-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return max(dims, default=0)


@dataclass
class Draws:
    """Per-draw log densities (shape ``(n,)``) and the kept site values (leading ``n``)."""

    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    pointwise: dict[str, torch.Tensor] = field(default_factory=dict)
    vectorized: bool = True

    @property
    def log_weights(self) -> torch.Tensor:
        r""":math:`\log p(D, z_i) - \log q(z_i)`."""
        return self.log_likelihood + self.log_prior - self.log_q

    @property
    def num_samples(self) -> int:
        return int(self.log_q.shape[0])


def _sum_per_draw(log_prob: torch.Tensor, num: int, draw_dim: int | None) -> torch.Tensor:
    # draw_dim counts batch dims from the right (-2 under one model plate); None: no draw dim
    if draw_dim is None or log_prob.dim() < -draw_dim:
        return log_prob.sum().expand(num)
    left = log_prob.dim() + draw_dim
    total = log_prob.sum(dim=tuple(d for d in range(log_prob.dim()) if d != left))
    return total.expand(num)


def _score(model_trace: Trace, guide_trace: Trace, num: int, draw_dim: int | None,
           keep: Iterable[str], pointwise: bool) -> Draws:
    model_trace = prune_subsample_sites(model_trace)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_lik = torch.zeros(num)
    log_prior = torch.zeros(num)
    log_q = torch.zeros(num)
    pointwise_lik: dict[str, torch.Tensor] = {}
    for name in model_trace.observation_nodes:
        log_prob = model_trace.nodes[name]["log_prob"]
        log_lik = log_lik + _sum_per_draw(log_prob, num, draw_dim)
        if pointwise:
            pointwise_lik[name] = log_prob
    for name in model_trace.stochastic_nodes:
        log_prior = log_prior + _sum_per_draw(model_trace.nodes[name]["log_prob"], num, draw_dim)
    for name in guide_trace.stochastic_nodes:
        log_q = log_q + _sum_per_draw(guide_trace.nodes[name]["log_prob"], num, draw_dim)
    values = {}
    for name in keep:
        site = guide_trace.nodes.get(name) or model_trace.nodes.get(name)
        if site is None:
            raise ValueError(f"No site {name!r} in the guide or model trace.")
        values[name] = site["value"]
    return Draws(log_lik, log_prior, log_q, values, pointwise_lik)


def _vectorized(model: Callable[..., Any], guide: Callable[..., Any], args: tuple,
                kwargs: Mapping[str, Any], num: int, nesting: int, keep: Iterable[str],
                pointwise: bool) -> Draws:
    draw_dim = -(nesting + 1)

    def plated(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            with pyro.plate(_DRAWS_PLATE, num, dim=draw_dim):
                return fn(*a, **k)
        return wrapped

    guide_trace = poutine.trace(plated(guide)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(plated(model), trace=guide_trace)).get_trace(
        *args, **kwargs)
    for trace in (guide_trace, model_trace):  # a mis-broadcast (x @ W + b) adds dims left of it
        for name, site in trace.nodes.items():
            batch = getattr(site["fn"], "batch_shape", ()) if site["type"] == "sample" else ()
            if len(batch) > -draw_dim and any(s != 1 for s in batch[: len(batch) + draw_dim]):
                raise ValueError(f"site {name!r} has batch shape {tuple(batch)}, with "
                                 f"dimensions left of the draws plate (dim {draw_dim})")
    draws = _score(model_trace, guide_trace, num, draw_dim, keep, pointwise)
    for name, value in draws.values.items():
        site = guide_trace.nodes.get(name) or model_trace.nodes[name]
        event_dim = site["fn"].event_dim
        batch = value.shape[: value.dim() - event_dim]
        if batch.numel() != num:
            raise ValueError(f"site {name!r} has batch shape {tuple(batch)} under {num} "
                             "vectorised draws")
        draws.values[name] = value.reshape((num,) + value.shape[value.dim() - event_dim:])
    for name, lp in draws.pointwise.items():
        if lp.dim() < -draw_dim or lp.shape[lp.dim() + draw_dim] != num:
            raise ValueError(f"log-likelihood of {name!r} has shape {tuple(lp.shape)}, "
                             f"no draw dimension of size {num}")
        draws.pointwise[name] = lp.reshape(num, -1)
    for tensor in (draws.log_likelihood, draws.log_prior, draws.log_q):
        if tensor.shape != (num,):
            raise ValueError(f"per-draw log density has shape {tuple(tensor.shape)}")
    return draws


def _one_at_a_time(model: Callable[..., Any], guide: Callable[..., Any], args: tuple,
                   kwargs: Mapping[str, Any], num: int, keep: Iterable[str],
                   pointwise: bool, budget: int | None = None,
                   what: str = "The evidence estimate") -> Draws:
    parts = []
    keep = list(keep)
    for i in range(num):
        counter = AllocationCounter()
        with counter if i == 0 and budget is not None else nullcontext():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
            parts.append(_score(model_trace, guide_trace, 1, None, keep, pointwise))
        if i == 0 and budget is not None:  # what is kept of every draw must fit too
            chunk_size_for(counter.allocated, _nbytes(parts[0]), num, budget, what)
    return Draws(
        torch.cat([p.log_likelihood for p in parts]),
        torch.cat([p.log_prior for p in parts]),
        torch.cat([p.log_q for p in parts]),
        {name: torch.stack([p.values[name] for p in parts]) for name in keep},
        {name: torch.stack([p.pointwise[name].reshape(-1) for p in parts])
         for name in (parts[0].pointwise if parts else {})},
        vectorized=False,
    )


def _nbytes(draws: Draws) -> int:
    """Bytes of what a :class:`Draws` keeps (values and pointwise log-likelihoods)."""
    tensors = list(draws.values.values()) + list(draws.pointwise.values())
    return sum(t.numel() * t.element_size() for t in tensors) + 3 * 8 * draws.num_samples


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (Pyro appends whole trace-shape tables)."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _mapping_nbytes(values: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in values.values())


def draw_in_chunks(batch: Callable[[int], T], num: int, *, budget: int, what: str,
                   chunk_size: int | None = None,
                   size_of: Callable[[T], int] = _mapping_nbytes) -> list[T]:
    """``batch(n)`` over chunks whose sizes ``n`` add up to ``num``, each within ``budget`` bytes.

    A probe of ``min(2, num)`` draws measures the bytes allocated per draw
    (:class:`~pyro_structsel.util.memory.AllocationCounter`) and the bytes
    kept per draw (``size_of`` of its result; default: the tensors of a
    mapping) and leaves the random streams as they were, so the chunks make
    the draws one call would; :func:`~pyro_structsel.util.memory.chunk_size_for`
    sizes the chunks (at most ``chunk_size``) or raises, naming ``what``.
    """
    probe_size = min(2, num)
    counter = AllocationCounter()
    rng = pyro.util.get_rng_state()
    try:  # the probe leaves the random streams as they were
        with counter:
            probe = batch(probe_size)
    finally:
        pyro.util.set_rng_state(rng)
    chunk = chunk_size_for(counter.allocated / probe_size, size_of(probe) / probe_size, num,
                           budget, what)
    chunk = min(chunk, chunk_size or chunk)
    parts, done = [], 0
    while done < num:
        size = min(chunk, num - done)
        parts.append(batch(size))
        done += size
    return parts


@torch.no_grad()
def draw(model: Callable[..., Any], guide: Callable[..., Any], args: tuple = (),
         kwargs: Mapping[str, Any] | None = None, *, num_samples: int = 100,
         chunk_size: int | None = None, vectorize: bool | None = None,
         keep: Iterable[str] = (), pointwise: bool = False,
         memory_budget: int | None = None, what: str = "The evidence estimate",
         num_argument: str = "num_samples") -> Draws:
    """Draw ``z ~ q`` ``num_samples`` times and score each under the model, on the full data.

    Two probe draws go first, vectorised, under an allocation counter (and
    with the random state restored after them): their shapes are checked (a
    model that broadcasts a batch of weights wrongly, ``x @ W1 + b1``, falls
    back to one draw at a time before it allocates :math:`n^2` times the
    memory) and their bytes size the chunks so that one pass stays within
    ``memory_budget`` (see :mod:`pyro_structsel.util.memory`). When every
    draw fits one pass, the draws are those of a single pass. :func:`~pyro_structsel.data_plate`
    takes every row here (:func:`~pyro_structsel.util.minibatch.full_data`),
    and a model whose observations are still subsampled is refused.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide, called with ``*args, **kwargs``.
    num_samples : int
        Number of draws.
    chunk_size : int, optional
        At most this many draws per vectorised pass (the memory budget may
        choose fewer).
    vectorize : bool, optional
        ``False`` draws one at a time; ``None`` (default) tries vectorised
        draws and falls back with a :class:`VectorizationWarning`.
    keep : iterable of str
        Site values to keep, returned with a leading draw dimension.
    pointwise : bool
        Also keep the log-likelihood of each observation, per observed site.
    memory_budget : int, optional
        Bytes one pass (plus everything kept) may use; default a quarter of
        the available memory (:func:`~pyro_structsel.util.memory.memory_budget`).
    what, num_argument : str
        How errors name the caller's estimate and its number of draws.
    """
    kwargs = dict(kwargs or {})
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"Expected {num_argument} to be a positive int, but got "
                         f"{num_samples!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool)
                                   or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected chunk_size to be a positive int or None, but got "
                         f"{chunk_size!r}.")
    budget = resolve_budget(memory_budget)
    keep = list(keep)
    with full_data():
        trace = trace_model(model, args, kwargs)
        check_full_data(trace, what)
        check_observations(trace, model, args, kwargs)
        if vectorize is not False:
            nesting = max_plate_nesting(model, args, kwargs)
            try:
                parts = draw_in_chunks(
                    lambda size: _vectorized(model, guide, args, kwargs, size, nesting, keep,
                                             pointwise),
                    num_samples, budget=budget, what=what, chunk_size=chunk_size,
                    size_of=_nbytes)
            except MemoryError:
                raise
            except Exception as error:  # noqa: BLE001 -- any failure means "not vectorisable"
                if vectorize:
                    raise
                logger.debug("Vectorised draws failed:\n%s", error)
                warnings.warn(
                    f"The model is not safe for vectorised draws ({first_line(error)}); drawing "
                    "one at a time, which is slower but gives the same results. Let latent "
                    "values with extra leading batch dimensions broadcast (or use "
                    "ps.BayesianModule) to vectorise.",
                    VectorizationWarning, stacklevel=find_stack_level())
            else:
                return _concat(parts)
        return _one_at_a_time(model, guide, args, kwargs, num_samples, keep, pointwise, budget,
                              what)


def _concat(parts: list[Draws]) -> Draws:
    if len(parts) == 1:
        return parts[0]
    return Draws(
        torch.cat([p.log_likelihood for p in parts]),
        torch.cat([p.log_prior for p in parts]),
        torch.cat([p.log_q for p in parts]),
        {name: torch.cat([p.values[name] for p in parts]) for name in parts[0].values},
        {name: torch.cat([p.pointwise[name] for p in parts]) for name in parts[0].pointwise},
        vectorized=parts[0].vectorized,
    )


@torch.no_grad()
def draw_guide(guide: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any],
               names: Iterable[str], *, num_samples: int, nesting: int = 0,
               memory_budget: int | None = None) -> dict[str, torch.Tensor]:
    """Values of sites ``names`` in ``num_samples`` draws from the guide alone (leading ``n``).

    ``nesting`` is the model's plate nesting (:func:`max_plate_nesting`).
    Vectorised in chunks that fit the memory budget (as :func:`draw`); falls
    back to one draw at a time if the guide cannot be vectorised.
    """
    names = list(names)

    def vectorised(num: int) -> dict[str, torch.Tensor]:
        def plated(*a: Any, **k: Any) -> Any:
            with pyro.plate(_DRAWS_PLATE, num, dim=-(nesting + 1)):
                return guide(*a, **k)

        trace = poutine.trace(plated).get_trace(*args, **kwargs)
        out = {}
        for name in names:
            site = trace.nodes[name]
            value, event_dim = site["value"], site["fn"].event_dim
            if value.shape[: value.dim() - event_dim].numel() != num:
                raise ValueError(f"site {name!r} is not batched over draws")
            out[name] = value.reshape((num,) + value.shape[value.dim() - event_dim:])
        return out

    try:
        parts = draw_in_chunks(vectorised, num_samples, budget=resolve_budget(memory_budget),
                               what="Drawing from the guide")
        return {name: torch.cat([part[name] for part in parts]) for name in names}
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 -- not vectorisable: draw one at a time
        traces = [poutine.trace(guide).get_trace(*args, **kwargs) for _ in range(num_samples)]
        return {name: torch.stack([t.nodes[name]["value"] for t in traces]) for name in names}
