"""String options as ``str`` enums, with one lookup that names the valid values."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def parse_option(enum_cls: type[E], value: object, argument: str) -> E:
    """Return the member of ``enum_cls`` whose value is ``value``.

    Raises
    ------
    ValueError
        Naming ``argument`` and listing the valid values.
    """
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if member.value == value:
            return member
    valid = ", ".join(repr(m.value) for m in enum_cls)
    raise ValueError(f"Unknown {argument} {value!r}; expected one of {valid}.")


class Prior(str, Enum):
    """Families of priors (and guides) for structural sites."""

    DIRICHLET = "dirichlet"
    CONCRETE = "concrete"


class Aggregation(str, Enum):
    """How a node of a graph family combines its incoming edges."""

    SUM = "sum"
    MEAN = "mean"
    CONCAT = "concat"


class Likelihood(str, Enum):
    """Observation models of :class:`~pyro_structsel.NetworkModel`."""

    CATEGORICAL = "categorical"
    NORMAL = "normal"


class Resume(str, Enum):
    """What a fit does with a checkpoint written by a run that differs from it.

    ``"strict"``: refuse any difference. ``"relaxed"``: continue from it when
    the model, the guide and the data shapes match, with this run's data
    values and optimiser settings (a new learning rate applies from the next
    step), and warn what differs.
    """

    STRICT = "strict"
    RELAXED = "relaxed"
