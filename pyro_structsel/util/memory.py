"""Memory budgets: how many draws fit in one vectorised pass.

A vectorised pass over :math:`n` draws allocates about :math:`n` times what
one draw needs; a model that broadcasts wrongly (``x @ W1 + b1`` with a
batch of weights) needs :math:`n^2` times. Before a pass over many draws the
callers run two draws under :class:`AllocationCounter` (which adds up the
bytes of every tensor torch creates, an upper bound on the peak), check
their shapes, and size the chunks so that one pass stays within the memory
budget: by default a quarter of the memory this process can still get
(:func:`available_memory`: the system's available memory, the cgroup's limit
and the address-space limit, whichever is smallest).
"""

from __future__ import annotations

import numbers
import os
import resource
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Fraction of the available memory one vectorised pass may use by default.
DEFAULT_FRACTION = 0.25
#: Assumed available memory where the system does not say.
FALLBACK_AVAILABLE = 4 * 2 ** 30


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft in (resource.RLIM_INFINITY, -1):
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        size = 0
    return max(soft - size, 0)


def available_memory() -> int:
    """Bytes this process can still allocate: the least of what the system, cgroup and rlimit allow."""
    limits = [_meminfo("MemAvailable")]
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int(
        "/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        limits.append(max(limit - used, 0))
    limits.append(_address_space_left())
    known = [value for value in limits if value is not None]
    if not known and hasattr(os, "sysconf"):
        try:
            known.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(known) if known else FALLBACK_AVAILABLE


def memory_budget(budget: Any = None, argument: str = "memory_budget") -> int:
    """Bytes one vectorised pass may allocate: ``budget`` (bytes), or by default
    :data:`DEFAULT_FRACTION` of :func:`available_memory`."""
    if budget is None:
        return max(int(DEFAULT_FRACTION * available_memory()), 16 * 2 ** 20)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget >= 1:
        raise ValueError(f"Expected {argument} to be a number of bytes >= 1 (e.g. 2 * 2**30 "
                         f"for 2 GiB) or None (a quarter of the available memory), but got "
                         f"{budget!r}.")
    return int(budget)


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return f"{num:.1f} GiB"


class AllocationCounter(TorchDispatchMode):
    """Adds up the bytes of every new tensor torch creates inside it (views not counted).

    The sum over a computation is an upper bound on its peak memory (freed
    intermediates count as if they were all alive at once).
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocated = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor):
                try:
                    inputs.add(value.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):
                    pass
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                try:
                    storage = value.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                if storage.data_ptr() not in inputs:
                    self.allocated += storage.nbytes()
        return out


def chunk_size_for(per_draw: float, kept_per_draw: float, num: int, budget: int,
                   what: str) -> int:
    """Draws per pass so that a pass (``per_draw`` bytes a draw) plus everything kept fits.

    Raises
    ------
    MemoryError
        If even the values kept from all ``num`` draws, or one draw's pass,
        exceed ``budget``, saying by how much and what to change.
    """
    kept = kept_per_draw * num
    room = budget - kept
    if room < per_draw:
        raise MemoryError(
            f"{what}: {num} draws need {format_bytes(kept)} for the values kept and "
            f"{format_bytes(per_draw)} for one draw's pass, more than the memory budget of "
            f"{format_bytes(budget)}. Use fewer draws (num_samples), keep fewer sites, or pass "
            "a larger memory_budget (in bytes).")
    return max(1, min(num, int(room // max(per_draw, 1.0))))
