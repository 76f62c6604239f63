r"""Data-parallel SVI on ``torch.distributed``: sharded data plates and gradient all-reduce.

Launch the same script once per process, e.g. ``torchrun --nproc_per_node=R
script.py`` (gloo on CPU, NCCL on GPU). Every rank holds the same model,
guide and data; rank :math:`r` of :math:`R` evaluates the likelihood only on
its shard :math:`S_r = \{r, r + R, r + 2R, \dots\}` of the :math:`N` rows of
the data plate (strided, so data sorted by class or time is spread evenly),
and the ranks average their gradients before every optimiser step.

The estimator. Let :math:`\ell_i` be the log-likelihood of row :math:`i`
and :math:`K` the rest of the ELBO (prior and entropy terms, computed on
every rank). :func:`data_plate` is a ``pyro.plate`` of the **global** size
:math:`N` whose subsample is the shard (or a random minibatch :math:`B_r`
of the shard), so Pyro scales the rows by :math:`N / |B_r|`; the plate
multiplies that by :math:`c_r = R\,|S_r| / N`, which is exactly 1 when
:math:`R` divides :math:`N`. Rank :math:`r` computes

.. math::

    L_r = K + c_r \frac{N}{|B_r|} \sum_{i \in B_r} \ell_i
        = K + \frac{R\,|S_r|}{|B_r|} \sum_{i \in B_r} \ell_i ,
    \qquad \mathbb E_{B_r} L_r = K + R \sum_{i \in S_r} \ell_i ,

and the mean over ranks is :math:`\frac1R \sum_r \mathbb E L_r = K + \sum_{i=1}^N
\ell_i`: the full-data ELBO, exactly (not only in expectation) in full
batch, for unequal shards too. Its gradient is the mean of the ranks'
gradients, which :func:`all_reduce_gradients` computes (one flat buffer,
parameters sorted by name, since Pyro hands the optimiser a ``set`` whose
order differs between processes). Particle noise is independent across
ranks (:func:`seed_ranks`): the likelihood of each shard sees one particle,
so the gradient's variance lies between that of one process with :math:`R`
particles on the full data and :math:`R` times it, at :math:`1/R` of the
likelihood cost per rank.

Only a data-parallel fit shards: :func:`~pyro_structsel.select_structure`
(``distributed=None`` or ``True`` under a process group) runs its fit
inside :func:`use_distributed`, and scores the result on the full data on
every rank. Outside such a fit (no group, ``distributed=False``, the
evidence estimators, ArviZ export) every function here is a no-op and
:func:`data_plate` is ``pyro.plate``.

References
----------
S. Li et al. PyTorch Distributed: experiences on accelerating data parallel
training. VLDB 2020.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import pyro
import pyro.util
import torch
import torch.distributed as tdist

from ..util.progress import progress_bar
from ..util.ranks import (
    DistributedWarning,
    group_initialized,
    is_distributed,
    rank,
    use_distributed,
    world_size,
)
from ..util.stacklevel import find_stack_level

#: Whether the code runs inside :func:`map_over_ranks` (whose items run on one rank each).
_SHARING_OUT: ContextVar[bool] = ContextVar("pyro_structsel_sharing_out", default=False)

# ----------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flat_groups(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(i)
    return groups


def broadcast_parameters(names: Iterable[str] | None = None, src: int = 0) -> None:
    """Copy the parameter store entries ``names`` (default all) from rank ``src`` to all ranks.

    The unconstrained values are sent, sorted by name, one flat buffer per
    dtype. Every rank must hold the same names with the same shapes; a
    mismatch raises ``ValueError`` on every rank (no rank is left waiting).
    """
    if not is_distributed():
        return
    store = pyro.get_param_store()
    params = dict(store.named_parameters())
    names = sorted(params if names is None else names)
    missing = [name for name in names if name not in params]
    layout = [(name, tuple(params[name].shape)) if name in params else (name, None)
              for name in names]
    layouts: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(layouts, layout)
    if missing or any(other != layouts[src] for other in layouts):
        raise ValueError(
            "The ranks hold different Pyro parameters (names or shapes), so they cannot share "
            f"one q; rank {rank()} has {layout}, rank {src} has {layouts[src]}. Build the same "
            "model and guide on every rank (same data sizes, same code path).")
    tensors = [params[name] for name in names]
    device = _comm_device()
    with torch.no_grad():
        for dtype, idx in _flat_groups(tensors).items():
            buffer = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to(device)
            tdist.broadcast(buffer, src=src)
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                tensors[i].copy_(buffer[offset:offset + n].view_as(tensors[i]))
                offset += n


def all_reduce_gradients(named_params: Mapping[str, torch.Tensor],
                         loss: float | None = None) -> float | None:
    """Average the gradients of ``named_params`` (and ``loss``) over the ranks, in place.

    The parameters are taken in the order of their names; the gradients go
    in one flat buffer per dtype, the loss and a has-gradient flag per
    parameter in one float64 buffer. A parameter whose gradient is ``None``
    on every rank keeps ``None`` (so the optimiser skips it, as it would in
    one process); one that has a gradient on some rank gets the mean with
    zeros elsewhere. A non-finite loss or gradient on any rank makes the
    result non-finite on all, so every rank takes the same branch.

    Returns
    -------
    float or None
        The mean of ``loss`` over the ranks (``loss`` itself when not distributed).
    """
    if not is_distributed():
        return loss
    names = sorted(named_params)
    params = [named_params[name] for name in names]
    world = tdist.get_world_size()
    device = _comm_device()
    header = torch.tensor([0.0 if loss is None else float(loss)]
                          + [float(p.grad is not None) for p in params],
                          dtype=torch.float64, device=device)
    tdist.all_reduce(header)
    summed = header.tolist()
    for dtype, idx in _flat_groups(params).items():
        buffer = torch.cat([(params[i].grad if params[i].grad is not None
                             else torch.zeros_like(params[i])).detach().reshape(-1)
                            for i in idx]).to(device)
        tdist.all_reduce(buffer)
        buffer /= world
        offset = 0
        for i in idx:
            p = params[i]
            n = p.numel()
            if summed[1 + i] > 0:
                mean = buffer[offset:offset + n].view_as(p).to(p.device)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
            offset += n
    return None if loss is None else summed[0] / world


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over the ranks (in float64); ``value`` when not distributed."""
    if not is_distributed():
        return float(value)
    buffer = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(buffer)
    return float(buffer[0]) / tdist.get_world_size()


def on_every_rank(function: Callable[[], Any], where: str) -> Any:
    """``function()``, raising on every rank if it raised on any (see :func:`raise_if_any_failed`).

    Outside a data-parallel fit it is just ``function()``.
    """
    if not is_distributed():
        return function()
    result, error = None, None
    try:
        result = function()
    except Exception as caught:  # noqa: BLE001 -- raised on every rank just below
        error = caught
    raise_if_any_failed(error, where)
    return result


def raise_if_any_failed(error: BaseException | None, where: str) -> None:
    """Collective: raise on every rank if ``error`` is set on any rank.

    Each rank passes the exception it caught (or ``None``); the failing rank
    re-raises its own, the others a ``RuntimeError`` naming it, so no rank is
    left waiting in a collective for one that stopped. Outside a
    data-parallel fit it just re-raises ``error``.
    """
    if is_distributed():
        flag = torch.tensor([0.0 if error is None else float(tdist.get_rank() + 1)],
                            device=_comm_device())
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        failed = int(flag.item()) - 1
    else:
        failed = -1 if error is None else 0
    if error is not None:
        raise error
    if failed >= 0:
        raise RuntimeError(f"Rank {failed} failed {where}; this rank stops too (the error is "
                           f"in rank {failed}'s output).")


def shared_seed() -> int:
    """A seed in ``[0, 2**31)`` drawn from rank 0's torch RNG and sent to every rank.

    Every rank draws one (so the RNG streams advance alike) and keeps rank 0's.
    Not distributed: the draw of this process.
    """
    seed = int(torch.randint(0, 2 ** 31, ()))
    if not is_distributed():
        return seed
    buffer = torch.tensor([seed], dtype=torch.int64, device=_comm_device())
    tdist.broadcast(buffer, src=0)
    return int(buffer[0])


def seed_ranks() -> None:
    """Seed every RNG of rank ``r`` with ``shared_seed() + r``: equal parameters, own noise."""
    if is_distributed():
        pyro.set_rng_seed(shared_seed() + rank())


# ----------------------------------------------------------------------------- checkpoints


def gather_rng_states() -> dict[str, Any]:
    """The entries a distributed checkpoint adds: every rank's RNG state (collective).

    Returns ``{"world_size": R, "rng_per_rank": [state of rank 0, ...]}``
    (on every rank), or ``{}`` when not distributed, so a checkpoint of one
    process is unchanged.
    """
    if not is_distributed():
        return {}
    states: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(states, pyro.util.get_rng_state())
    return {"world_size": len(states), "rng_per_rank": states}


def restore_rng_state(state: Mapping[str, Any], path: str) -> None:
    """Set this rank's RNG state from a checkpoint ``state`` written at ``path``.

    Same world size as the writer: each rank continues its own stream, so
    the resumed run equals one never stopped. Otherwise a
    :class:`DistributedWarning`, and the RNGs restart from the writer's
    rank-0 state, reseeded per rank (the parameters and the optimiser state
    are still exact).
    """
    written = int(state.get("world_size", 1))
    world = world_size()
    if written == world:
        pyro.util.set_rng_state((state.get("rng_per_rank") or [state["rng"]])[rank()])
        return
    warnings.warn(
        f"The checkpoint {path!r} was written by a run of {written} process(es) and resumes "
        f"in a run of {world}: the parameters and the optimiser state continue exactly, but "
        f"the random streams restart, so the result differs from an uninterrupted run. Resume "
        f"with {written} process(es) for an exact continuation.",
        DistributedWarning, stacklevel=find_stack_level())
    pyro.util.set_rng_state(state["rng"])
    seed_ranks()


def load_shared(load: Callable[[str], dict[str, Any] | None], path: str
                ) -> dict[str, Any] | None:
    """``load(path)`` on rank 0, sent to every rank (no shared file system needed).

    A ``ValueError`` raised by ``load`` (a file that is not a checkpoint) is
    raised on every rank, so no rank waits for one that failed.
    """
    if not is_distributed():
        return load(path)
    box: list[Any] = [None]
    if tdist.get_rank() == 0:
        try:
            box[0] = ("ok", load(path))
        except ValueError as error:
            box[0] = ("error", str(error))
    tdist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "error":
        raise ValueError(payload)
    return payload


# ----------------------------------------------------------------------------- comparisons


def map_over_ranks(function: Callable[[Any], Any], items: Sequence[Any], *, enabled: bool,
                   where: str, desc: str = "", progress: bool = False,
                   unit: str = "items") -> list[Any]:
    r"""``[function(item) for item in items]``, with the items shared out over the ranks.

    With ``enabled`` and a process group of :math:`R` ranks, rank :math:`r`
    computes the items :math:`r, r + R, r + 2R, \dots` on its own (each
    item runs on this process alone, outside any data-parallel fit), and
    every rank receives every result (``all_gather_object``), in the order
    of ``items``: one table on every rank. Equal seeds per item give the
    table of one process. An exception on one rank is raised on every rank
    (the failing rank raises its own, the others a ``RuntimeError`` naming
    it). Without ``enabled``, without a group, with one rank, or inside
    another :func:`map_over_ranks` (its items already run on one rank each),
    it is the plain loop.

    The results must pickle. ``desc``, ``progress`` and ``unit``: a progress
    bar over this rank's items, on rank 0.
    """
    items = list(items)
    if not enabled or not group_initialized() or tdist.get_world_size() == 1 \
            or _SHARING_OUT.get():
        return [function(item)
                for item in progress_bar(items, desc=desc, enabled=progress, unit=unit)]
    me, ranks = tdist.get_rank(), tdist.get_world_size()
    mine: dict[int, Any] = {}
    error: BaseException | None = None
    token = _SHARING_OUT.set(True)
    try:
        with use_distributed(False):
            for index in progress_bar(range(me, len(items), ranks), desc=desc,
                                      enabled=progress and me == 0, unit=unit):
                mine[index] = function(items[index])
    except Exception as caught:  # noqa: BLE001 -- raised on every rank just below
        error = caught
    finally:
        _SHARING_OUT.reset(token)
    gathered: list[Any] = [None] * ranks
    message = None if error is None else f"{type(error).__name__}: {error}"
    tdist.all_gather_object(gathered, (mine if error is None else {}, message))
    if error is not None:
        raise error
    for other, (_, failure) in enumerate(gathered):
        if failure is not None:
            raise RuntimeError(f"Rank {other} failed {where} ({failure}); this rank stops too.")
    results: dict[int, Any] = {}
    for part, _ in gathered:
        results.update(part)
    return [results[index] for index in range(len(items))]
