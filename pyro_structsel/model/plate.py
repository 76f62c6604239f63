r"""The data plate: ``pyro.plate`` over the observations, sharded across ranks in a distributed fit.

Rank :math:`r` of :math:`R` owns the rows :math:`S_r = \{r, r + R, \dots\}`
of the :math:`N` rows of the plate; its plate keeps the global size and
scales the rows by :math:`(N / |B_r|)(R |S_r| / N)`, so the mean over ranks
of their losses is the full-data loss (see :mod:`pyro_structsel.infer.distributed`).
Outside a data-parallel fit :func:`data_plate` is ``pyro.plate``.
"""

from __future__ import annotations

from typing import Any

import pyro
import torch

from ..util.minibatch import subsampling_allowed
from ..util.ranks import is_distributed, rank, world_size


def shard_indices(size: int, rank: int, world_size: int,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """The rows of a plate of ``size`` that rank ``rank`` of ``world_size`` owns: ``rank::R``.

    Shards differ in length by at most one row; together they are
    ``range(size)``, each row once.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Expected world_size to be an int >= 1, but got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"Expected rank to be an int in [0, {world_size}), but got {rank!r}.")
    if isinstance(size, bool) or not isinstance(size, int) or size < world_size:
        raise ValueError(
            f"Expected the plate size to be an int >= world_size={world_size} (every rank "
            f"needs at least one row), but got {size!r}; use fewer processes.")
    return torch.arange(rank, size, world_size, device=device)


class _ShardPlate(pyro.plate):
    """``pyro.plate`` over a shard that also multiplies the scale by ``R |S_r| / N``."""

    def __init__(self, name: str, size: int, subsample: torch.Tensor, correction: float,
                 dim: int | None, device: str | torch.device | None) -> None:
        super().__init__(name, size, subsample=subsample, dim=dim, device=device)
        self.correction = correction

    def _process_message(self, msg: Any) -> None:
        super()._process_message(msg)
        if self.correction != 1.0:
            msg["scale"] = msg["scale"] * self.correction


def shard_plate(name: str, size: int, *, rank: int, world_size: int,
                subsample_size: int | None = None, dim: int | None = None,
                device: str | torch.device | None = None) -> pyro.plate:
    r"""The data plate of rank ``rank`` of ``world_size``, whatever the process group.

    :func:`data_plate` calls it with this process's rank; call it yourself to
    emulate a rank (or to check the scaling). The plate has the global size
    ``size``, its subsample is the shard :func:`shard_indices` (or, with
    ``subsample_size``, a uniformly random minibatch of that many rows of the
    shard, drawn with ``torch.randperm``), and the rows are scaled by
    :math:`(N / |B_r|)(R |S_r| / N)` so the ranks' mean loss is the full-data
    loss (see the module notes).

    Parameters
    ----------
    name, size, dim, device
        As for ``pyro.plate``.
    rank, world_size : int
        The rank to build the plate for, and the number of ranks.
    subsample_size : int, optional
        Minibatch size **per rank** (the global minibatch is ``world_size``
        times larger); ``None``: the whole shard.

    Returns
    -------
    pyro.plate
        Usable as a context manager yielding the global row indices, or iterated.
    """
    rows, correction = _shard_rows(size, rank, world_size, subsample_size, device)
    return _ShardPlate(name, size, rows, correction, dim, device)


def _shard_rows(size: int, rank: int, world_size: int, subsample_size: int | None,
                device: str | torch.device | None = None) -> tuple[torch.Tensor, float]:
    """The rows of :func:`shard_plate` and its correction :math:`R |S_r| / N` of the scale."""
    shard = shard_indices(size, rank, world_size, device=device)
    if subsample_size is not None:
        if isinstance(subsample_size, bool) or not isinstance(subsample_size, int) \
                or subsample_size < 1:
            raise ValueError(f"Expected subsample_size to be a positive int or None, but got "
                             f"{subsample_size!r}.")
        if subsample_size < len(shard):
            shard = shard[torch.randperm(len(shard), device=shard.device)[:subsample_size]]
    return shard, world_size * len(range(rank, size, world_size)) / size


def data_rows(size: int, subsample_size: int | None = None) -> tuple[torch.Tensor | None, float]:
    r"""The rows this process's loss reads, and the factor on their log-likelihood sum.

    The same rows and scale as :func:`data_plate` for a loss written without
    a plate:
    ``(None, 1.0)`` for the whole data; a random minibatch ``B`` and
    :math:`N / |B|`; in a data-parallel fit, this rank's shard (or a
    minibatch ``B_r`` of it) and :math:`R |S_r| / |B_r|`, so the ranks' mean
    is the full-data sum.
    """
    if not is_distributed():
        if subsample_size is None or subsample_size >= size:
            return None, 1.0
        return torch.randperm(size)[:subsample_size], size / subsample_size
    rows, correction = _shard_rows(size, rank(), world_size(), subsample_size)
    return rows, correction * size / len(rows)


def data_plate(name: str, size: int, subsample_size: int | None = None,
               dim: int | None = None, device: str | torch.device | None = None) -> pyro.plate:
    r"""``pyro.plate`` for the data: sharded across ranks in a distributed fit.

    Use it in place of ``pyro.plate`` for the plate over the observations (in
    the model, and in the guide if the guide has that plate). Outside a
    data-parallel fit it **is** ``pyro.plate(name, size, subsample_size,
    dim=dim, device=device)``, except that a ``subsample_size`` of ``size``
    or more means the whole plate (``pyro.plate`` raises for more). In a
    data-parallel fit it is :func:`shard_plate` for this
    rank: the plate keeps the global size ``size`` (a plate sized to the
    local shard would weight the likelihood by :math:`1/R`), its indices are
    the global rows of this rank's shard ``rank::R`` (index the full data
    with them), and ``subsample_size`` is the minibatch size per rank.
    While evidence is scored (:func:`~pyro_structsel.util.minibatch.full_data`)
    it takes every row whatever ``subsample_size`` says.

    Example
    -------
    >>> def model(x, y):
    ...     w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    ...     with ps.data_plate("data", len(x)) as idx:
    ...         pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])
    """
    if subsample_size is not None and (isinstance(subsample_size, bool)
                                       or not isinstance(subsample_size, int)
                                       or subsample_size < 1):
        raise ValueError(f"Expected subsample_size of plate {name!r} to be a positive int or "
                         f"None, but got {subsample_size!r}.")
    if not subsampling_allowed():  # evidence is being scored: every row (see util.minibatch)
        subsample_size = None
    if not is_distributed():  # a minibatch of the whole plate or more is the whole plate
        whole = subsample_size is not None and isinstance(size, int) and subsample_size >= size
        return pyro.plate(name, size, None if whole else subsample_size, dim=dim,
                          device=device)
    return shard_plate(name, size, rank=rank(), world_size=world_size(),
                       subsample_size=subsample_size, dim=dim, device=device)
