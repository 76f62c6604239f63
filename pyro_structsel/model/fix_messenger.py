"""``fix_structure``: a Pyro handler that pins structural sites at vertices of the simplex.

A *structure* is a vertex of the simplex: one option per structural site.
Under :func:`fix_structure` each named site takes the one-hot value of its
option as an observed point mass, so the model is the network of that
structure and the pinned sites add nothing to its log density.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

from .sites import StructuralSite, base_distribution, describe_site, is_structural

#: Key in the ``infer`` dict of a site pinned by :func:`fix_structure`: its StructuralSite.
PINNED_KEY = "structsel_pinned_site"


def pinned_sites(trace: Trace) -> dict[str, tuple[StructuralSite, str | int]]:
    """Structural sites pinned by :func:`fix_structure` in a trace: site and chosen option."""
    pinned = {}
    for name, site in trace.nodes.items():
        described = site.get("infer", {}).get(PINNED_KEY) if site["type"] == "sample" else None
        if described is not None:
            pinned[name] = (described, described.label(int(site["value"].exp().argmax(-1))
                                                       if described.log_space
                                                       else int(site["value"].argmax(-1))))
    return pinned


def vertex_value(site: StructuralSite, option: str | int, *, dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """The site value at the vertex of ``option``: one-hot (log one-hot in log space)."""
    onehot = torch.zeros(site.num_options, dtype=dtype or torch.get_default_dtype())
    onehot[site.index(option)] = 1.0
    return onehot.log() if site.log_space else onehot


class FixStructureMessenger(Messenger):
    """Pins structural sites at vertices of the simplex; see :func:`fix_structure`."""

    def __init__(self, structure: Mapping[str, str | int]) -> None:
        if not isinstance(structure, Mapping):
            raise ValueError(
                f"Expected structure to be a dict site name -> option, but got {structure!r}."
            )
        bad = [name for name in structure if not isinstance(name, str)]
        if bad:
            raise ValueError(f"Expected the keys of structure to be site names (str), but got "
                             f"{bad}.")
        super().__init__()
        self.structure = dict(structure)
        self._seen: set[str] = set()
        self._structural: list[str] = []

    def __enter__(self) -> FixStructureMessenger:
        self._seen, self._structural = set(), []
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        missing = sorted(set(self.structure) - self._seen)
        if exc_type is None and missing:  # a misspelled site would otherwise stay free
            raise ValueError(
                f"fix_structure names site(s) {missing} that the model never sampled; its "
                f"structural sites are {self._structural}. Check the site names.")

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        name = msg["name"]
        self._seen.add(name)
        if is_structural(msg) or msg["infer"].get(PINNED_KEY) is not None:
            self._structural.append(name)
        if name not in self.structure or msg["is_observed"]:
            return
        if not is_structural(msg):
            raise ValueError(
                f"Site {name!r} in the structure is not a latent structural site (its "
                f"support is {msg['fn'].support}); only simplex-valued sites can be fixed."
            )
        site = describe_site(name, msg["fn"], msg["infer"])
        base = base_distribution(msg["fn"])
        dtype = getattr(base, "concentration", getattr(base, "logits", None))
        value = vertex_value(site, self.structure[name],
                             dtype=None if dtype is None else dtype.dtype)
        msg["value"] = value
        msg["fn"] = dist.Delta(value, event_dim=1).expand(msg["fn"].batch_shape)
        msg["is_observed"] = True
        msg["infer"] = {**msg["infer"], "structsel_fixed": True, PINNED_KEY: site}


def fix_structure(fn: Callable[..., Any] | None = None,
                  structure: Mapping[str, str | int] | None = None) -> Any:
    """Pin structural sites at vertices: each named site takes the one-hot value of its option.

    A pinned site is treated as observed with a point mass, so it adds
    nothing to the log density and needs no guide. Usable as a wrapper,
    decorator or context manager, like any Pyro handler.

    Parameters
    ----------
    fn : callable, optional
        The model to wrap.
    structure : dict
        Site name → option label or index.

    Example
    -------
    >>> fixed = fix_structure(model, {"activation": "tanh"})
    """
    messenger = FixStructureMessenger(structure if structure is not None else {})
    return messenger(fn) if fn is not None else messenger
