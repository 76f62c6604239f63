"""Where this process stands in a ``torch.distributed`` job: rank, world size, data-parallel or not.

The state the data plates (:func:`~pyro_structsel.data_plate`) and the fit
loop read. A fit is data-parallel only inside :func:`use_distributed`; outside
it every query here answers as for one process, whatever group exists. See
:mod:`pyro_structsel.infer.distributed` for the data-parallel estimator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

#: Whether the code runs inside a data-parallel fit (set by :func:`use_distributed`).
_ENABLED: ContextVar[bool] = ContextVar("pyro_structsel_distributed", default=False)


_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedWarning(UserWarning):
    """A distributed run cannot continue exactly as the checkpoint or the setup asks."""


def group_initialized() -> bool:
    """Whether a ``torch.distributed`` default process group exists in this process."""
    return tdist.is_available() and tdist.is_initialized()


def is_distributed() -> bool:
    """Whether the code runs inside a data-parallel fit (:func:`use_distributed`).

    A group of world size 1 counts (the same code path, with trivial collectives).
    """
    return _ENABLED.get() and group_initialized()


def rank() -> int:
    """This process's rank in the data-parallel fit (0 outside one)."""
    return tdist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes of the data-parallel fit (1 outside one)."""
    return tdist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process prints and writes outputs: rank 0 of the group, or no group."""
    return not group_initialized() or tdist.get_rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment names a rank and a rendezvous (``torchrun`` sets them)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def init_distributed(backend: str | None = None, init_method: str | None = None,
                     timeout: timedelta | None = None) -> bool:
    """Initialise the default process group from the environment, unless one exists.

    Parameters
    ----------
    backend : str, optional
        ``"gloo"`` or ``"nccl"``; default NCCL when there is a CUDA device for
        every process of the node (and then the CUDA device ``LOCAL_RANK`` is
        made current), gloo otherwise.
    init_method : str, optional
        Rendezvous URL; default ``"env://"`` (``MASTER_ADDR`` and
        ``MASTER_PORT``, as ``torchrun`` sets them). The rank and the world
        size are read from ``RANK`` and ``WORLD_SIZE`` either way, so a
        ``file://`` URL works for launchers without a port.
    timeout : datetime.timedelta, optional
        Timeout of the collectives (torch's default otherwise).

    Returns
    -------
    bool
        ``True`` if this call created the group (the caller then owns it and
        may ``torch.distributed.destroy_process_group()`` it), ``False`` if
        one existed already.
    """
    if not tdist.is_available():
        raise ValueError("distributed=True needs torch.distributed, which this build of torch "
                         "lacks; install a torch build with distributed support or pass "
                         "distributed=False.")
    if tdist.is_initialized():
        return False
    needed = ("RANK", "WORLD_SIZE") + (("MASTER_ADDR", "MASTER_PORT")
                                       if init_method in (None, "env://") else ())
    missing = [name for name in needed if name not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=True but no process group exists and the environment lacks "
            f"{', '.join(missing)}: launch the script with `torchrun --nproc_per_node=R "
            "script.py`, call torch.distributed.init_process_group() first, or pass "
            "distributed=False.")
    if backend is None:  # NCCL needs a GPU per process on this node
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        backend = ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= per_node
                   else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    tdist.init_process_group(backend, init_method=init_method or "env://",
                             rank=int(os.environ["RANK"]),
                             world_size=int(os.environ["WORLD_SIZE"]), **kwargs)
    return True


def resolve_distributed(distributed: bool | None) -> bool:
    """Whether a fit asked for with ``distributed`` runs data-parallel.

    ``None``: when a process group is initialised; ``True``: always, creating
    the group from the environment when needed (:func:`init_distributed`);
    ``False``: never, a group is ignored.
    """
    if distributed is None:
        return group_initialized()
    if not isinstance(distributed, bool):
        raise ValueError(f"Expected distributed to be True, False or None, but got "
                         f"{distributed!r}.")
    if distributed:
        init_distributed()
    return distributed


@contextmanager
def use_distributed(enabled: bool) -> Iterator[None]:
    """Context of a data-parallel fit (``True``) or of one on this process alone (``False``).

    ``True`` needs an initialised process group. Inside it :func:`data_plate`
    shards and :func:`~pyro_structsel.infer.svi.fit` averages the gradients.
    """
    if enabled and not group_initialized():
        raise ValueError("use_distributed(True) needs an initialised process group: call "
                         "ps.init_distributed() (or launch with torchrun) first.")
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)
