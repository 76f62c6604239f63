r"""``full_data``: run a model on all the rows of its plates, whatever they subsample.

The evidence :math:`\log p(D)` is a full-data quantity, but a model written for
minibatch SVI subsamples its data plate
(``pyro.plate("data", N, subsample_size=B)``) and scales the log-likelihood of
the minibatch by :math:`N/B`. :class:`FullDataMessenger` runs such a model on
one *block* of rows at a time: block :math:`k` takes the rows
:math:`[kB, kB + B)` (the last block the last :math:`B` rows, with the rows an
earlier block counted masked out) and undoes the :math:`N/B` scale, so that
the log densities summed over the :func:`num_blocks` blocks are those of the
full data, each row counted once. A plate without ``subsample_size`` (or
given its rows as ``subsample``) runs on all of them in one block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

__all__ = ["FullDataMessenger", "full_data", "num_blocks"]


class FullDataMessenger(Messenger):
    """Runs every plate on all its rows; a subsampled plate on block ``block`` of them.

    Attributes
    ----------
    subsampled : dict
        Plate name → ``(size, subsample_size)`` of the subsampled plate seen.
    keep : Tensor or None
        For the subsampled plate, which rows of this block are counted here
        (``False`` for rows an earlier block counted).
    """

    def __init__(self, block: int = 0) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ValueError(f"Expected block to be an int >= 0, but got {block!r}.")
        super().__init__()
        self.block = block
        self.subsampled: dict[str, tuple[int, int]] = {}
        self.keep: torch.Tensor | None = None

    def _rows(self, size: int, subsample_size: int) -> tuple[int, int]:
        """First row of this block and first row not counted by an earlier block."""
        return min(self.block * subsample_size, size - subsample_size), self.block * subsample_size

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample):
            size, subsample_size = fn.size, fn.subsample_size
            if subsample_size is None or subsample_size >= size:
                msg["value"] = torch.arange(size, device=fn.device)
                return
            self.subsampled[msg["name"]] = (size, subsample_size)
            if len(self.subsampled) > 1:
                raise ValueError(
                    f"The evidence is of the full data, but the model subsamples the plates "
                    f"{sorted(self.subsampled)}: at most one plate may be subsampled. Pass "
                    "subsample_size=None to the others.")
            start, first_new = self._rows(size, subsample_size)
            msg["value"] = torch.arange(start, start + subsample_size, device=fn.device)
            self.keep = msg["value"] >= first_new
            return
        for frame in msg["cond_indep_stack"]:  # the plates have scaled by size / subsample
            if frame.name not in self.subsampled:
                continue
            if not frame.vectorized:
                raise ValueError(
                    f"Site {msg['name']!r} sits in the sequential plate {frame.name!r}, which "
                    "subsamples; the evidence needs the full data: use a vectorised plate "
                    "(with pyro.plate(...) as idx) or subsample_size=None.")
            size, subsample_size = self.subsampled[frame.name]
            msg["scale"] = msg["scale"] * subsample_size / size
            assert self.keep is not None
            if not bool(self.keep.all()):
                keep = self.keep.reshape((subsample_size,) + (1,) * (-frame.dim - 1))
                msg["mask"] = keep if msg["mask"] is None else msg["mask"] & keep


def full_data(fn: Callable[..., Any] | None = None, block: int = 0) -> Any:
    """Handler running ``fn`` on all rows of its plates (block ``block`` of a subsampled one).

    Usable as wrapper, decorator or context manager, like any Pyro handler.

    Example
    -------
    >>> total = sum(poutine.trace(full_data(model, k)).get_trace(x, y).log_prob_sum()
    ...             for k in range(num_blocks(model, (x, y), {})))
    """
    messenger = FullDataMessenger(block)
    return messenger(fn) if fn is not None else messenger


def num_blocks(model: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> int:
    """How many blocks :func:`full_data` needs to cover every row of ``model``'s data."""
    handler = FullDataMessenger(0)
    with poutine.block(), torch.no_grad():
        poutine.trace(handler(model)).get_trace(*args, **kwargs)
    if not handler.subsampled:
        return 1
    ((size, subsample_size),) = handler.subsampled.values()
    return -(-size // subsample_size)
