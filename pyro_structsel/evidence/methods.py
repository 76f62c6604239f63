"""Evidence estimators by name: one registry, one entry point (:func:`estimate_evidence`).

Each estimator is a function ``(model, guide, *args, **kwargs) -> Estimate``
that works on any Pyro model and guide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from ..util.options import parse_option
from .bounds import elbo, iwae
from .descent import gradient_descent_evidence
from .estimate import Estimate
from .laplace import laplace


class EvidenceMethod(str, Enum):
    """Names of the evidence estimators."""

    ELBO = "elbo"
    IWAE = "iwae"
    LAPLACE = "laplace"
    GRADIENT_DESCENT = "gradient_descent"




#: Evidence estimators by name, and the keyword that sets their number of samples.
ESTIMATORS: dict[EvidenceMethod, tuple[Callable[..., Estimate], str | None]] = {
    EvidenceMethod.ELBO: (elbo, "num_particles"),
    EvidenceMethod.IWAE: (iwae, "num_samples"),
    EvidenceMethod.LAPLACE: (laplace, None),
    EvidenceMethod.GRADIENT_DESCENT: (gradient_descent_evidence, None),  # its own restarts
}


def get_estimator(name: str | EvidenceMethod) -> Callable[..., Estimate]:
    """The estimator called ``name``; ``ValueError`` listing the valid names."""
    return ESTIMATORS[parse_option(EvidenceMethod, name, "evidence estimator")][0]


def estimate_evidence(name: str | EvidenceMethod, model: Callable[..., Any], guide: Any,
                      *args: Any, num_samples: int | None = None, **kwargs: Any) -> Estimate:
    """Run the estimator ``name`` on ``(model, guide, *args, **kwargs)``.

    ``num_samples`` sets the estimator's number of draws (ignored by
    deterministic ones such as ``"laplace"``).
    """
    fn, sample_keyword = ESTIMATORS[parse_option(EvidenceMethod, name, "evidence estimator")]
    if num_samples is not None and sample_keyword is not None:
        kwargs = {**kwargs, sample_keyword: num_samples}
    return fn(model, guide, *args, **kwargs)


def check_estimator_names(names: Sequence[str] | str) -> list[EvidenceMethod]:
    """Validate a list of estimator names (a single string is one name)."""
    if isinstance(names, (str, EvidenceMethod)):
        names = [names]
    return [parse_option(EvidenceMethod, n, "evidence estimator") for n in names]
