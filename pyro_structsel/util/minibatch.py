"""Minibatches are for fitting; evidence is scored on the full data.

An SVI step may read a random minibatch of the data plate (its likelihood
scaled up by :math:`N/|B|`): an unbiased, noisy estimate of the full-data
ELBO, which is what a gradient step needs. A *reported* evidence estimate
must not depend on which rows a call happened to draw, so every estimator
scores the full data: inside :func:`full_data`,
:func:`~pyro_structsel.data_plate` does not subsample. A model whose
observations sit in a plain ``pyro.plate(..., subsample_size=...)`` still
subsamples there, and :func:`check_full_data` refuses it with the fix.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pyro.poutine.trace_struct import Trace

#: Model keyword arguments that choose a minibatch; scoring drops them to see the full data.
MINIBATCH_KWARGS = ("batch_size",)

_state = threading.local()


def scoring_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments without the minibatch ones (:data:`MINIBATCH_KWARGS`)."""
    return {key: value for key, value in kwargs.items() if key not in MINIBATCH_KWARGS}


@contextmanager
def full_data() -> Iterator[None]:
    """Within this context :func:`~pyro_structsel.data_plate` takes every row (no minibatch)."""
    previous = getattr(_state, "full", False)
    _state.full = True
    try:
        yield
    finally:
        _state.full = previous


def subsampling_allowed() -> bool:
    """Whether data plates may subsample now (``False`` inside :func:`full_data`)."""
    return not getattr(_state, "full", False)


def subsampled_observations(trace: Trace) -> list[tuple[str, str, int, int]]:
    """Observed sites of ``trace`` in a subsampled plate: (site, plate, minibatch, full size)."""
    found = []
    for name in trace.observation_nodes:
        site = trace.nodes[name]
        if site["infer"].get("structsel_fixed"):
            continue  # a structural site pinned by fix_structure, not data
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                found.append((name, frame.name, int(frame.size), int(frame.full_size)))
    return found


def check_full_data(trace: Trace, what: str) -> None:
    """Refuse to compute ``what`` from a trace whose observations are a minibatch.

    Raises
    ------
    ValueError
        Naming the site and the plate, and how to let the estimator see every row.
    """
    found = subsampled_observations(trace)
    if not found:
        return
    site, plate, size, full = found[0]
    raise ValueError(
        f"{what} needs every observation, but observed site {site!r} sits in plate {plate!r} "
        f"subsampled to {size} of {full} rows, so it would score a random minibatch (a "
        "different value on every call). Write the plate as ps.data_plate(name, size, "
        "subsample_size=...), which takes every row while evidence is scored, or make the "
        "minibatch size a model argument named batch_size (set to None for the full data).")
