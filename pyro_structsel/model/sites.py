r"""Structural sites: latent simplex weights :math:`\gamma` that choose a structure.

A *structural site* is any latent sample site of a Pyro model whose value lies
on the probability simplex (``Dirichlet``, ``RelaxedOneHotCategorical``) or,
for the Concrete prior sampled in log space, on the log-simplex
(``ExpRelaxedCategorical``). The library finds such sites by tracing the
model; :func:`structure` samples one and attaches option labels to it.

A *structure* is a vertex of the simplex: one option per site. The
:func:`fix_structure` handler pins every structural site at a vertex.

References
----------
C. Maddison, A. Mnih, Y. W. Teh. The Concrete distribution: a continuous
relaxation of discrete random variables. ICLR 2017.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import relaxed_categorical as _torch_relaxed

from ..util.options import Prior, parse_option
from ..util.sampling import trace_model

#: Key in a sample site's ``infer`` dict that holds the option labels.
OPTIONS_KEY = "structsel_options"


class ExpRelaxedCategorical(_torch_relaxed.ExpRelaxedCategorical, TorchDistributionMixin):
    r"""The Concrete in log space (Maddison et al. 2017), as a Pyro distribution.

    Its value :math:`y = \log\gamma` lives on the log-simplex; ``exp`` of it is
    the Concrete (``RelaxedOneHotCategorical``) sample, without underflow.
    """


@dataclass(frozen=True)
class StructuralSite:
    r"""What the library knows of one structural site.

    Attributes
    ----------
    name : str
        The Pyro site name.
    num_options : int
        Number of candidate options K (the size of the last dimension).
    labels : tuple of str, or None
        Option labels, or ``None`` when the site has none (options are then
        referred to by index).
    log_space : bool
        Whether the site's value is :math:`\log\gamma` (Concrete in log space).
    """

    name: str
    num_options: int
    labels: tuple[str, ...] | None
    log_space: bool

    def option_names(self) -> list[str]:
        """Labels, or ``"0" .. "K-1"`` where the site has none."""
        if self.labels is not None:
            return list(self.labels)
        return [str(i) for i in range(self.num_options)]

    def label(self, index: int) -> str | int:
        """The label of option ``index`` (the index itself if unlabelled)."""
        return self.labels[index] if self.labels is not None else int(index)

    def index(self, option: str | int) -> int:
        """The index of ``option`` (a label or an index); ``ValueError`` if unknown or ambiguous.

        An int is an index, except that an int which is also the label of
        another option (labels ``["1", "0"]`` and option ``1``) is ambiguous
        and refused: pass the label as a string.
        """
        if isinstance(option, str) and self.labels is not None and option in self.labels:
            return self.labels.index(option)
        if isinstance(option, numbers.Integral) and not isinstance(option, bool):
            if 0 <= option < self.num_options:
                if self.labels is not None and str(option) in self.labels and \
                        self.labels.index(str(option)) != option:
                    raise ValueError(
                        f"Option {option!r} of structural site {self.name!r} is ambiguous: the "
                        f"site's labels are {list(self.labels)}, so {option!r} could be the "
                        f"label {str(option)!r} (index {self.labels.index(str(option))}) or the "
                        f"index {option} (label {self.labels[option]!r}). Pass the label as a "
                        f"string, e.g. {str(option)!r}.")
                return int(option)
        valid = ", ".join(repr(o) for o in (self.labels or range(self.num_options)))
        raise ValueError(
            f"Unknown option {option!r} for structural site {self.name!r}; "
            f"expected one of {valid} (or an index below {self.num_options})."
        )

    def to_simplex(self, value: torch.Tensor) -> torch.Tensor:
        r"""Map a site value to :math:`\gamma` on the simplex."""
        return value.exp() if self.log_space else value


def _check_labels(name: str, options: int | Sequence[str]) -> tuple[int, tuple[str, ...] | None]:
    if isinstance(options, bool) or not isinstance(options, (int, Sequence)) or isinstance(
        options, str
    ):
        raise ValueError(
            f"Expected options of structural site {name!r} to be an int K or a sequence "
            f"of labels, but got {options!r}."
        )
    if isinstance(options, int):
        num, labels = options, None
    else:
        labels = tuple(str(o) for o in options)
        num = len(labels)
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"Structural site {name!r} has duplicate option labels {duplicates}; "
                "give each option a distinct label."
            )
    if num < 2:
        raise ValueError(
            f"Structural site {name!r} needs at least two options to choose from, but got "
            f"{num}; drop the site or add candidates."
        )
    return num, labels


def _positive_vector(value: float | Sequence[float] | torch.Tensor, num: int, argument: str,
                     name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] != num):
        raise ValueError(
            f"Expected {argument} of structural site {name!r} to be a scalar or a vector of "
            f"length {num} (one per option), but got shape {tuple(tensor.shape)}."
        )
    if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
        raise ValueError(
            f"Expected {argument} > 0 for structural site {name!r}, but got {value!r}."
        )
    return tensor.expand(num).clone()


def structural_prior(
    name: str,
    options: int | Sequence[str],
    *,
    prior: str | Prior = "dirichlet",
    concentration: float | Sequence[float] | torch.Tensor = 1.0,
    temperature: float = 0.5,
    logits: Sequence[float] | torch.Tensor | None = None,
) -> tuple[dist.TorchDistribution, tuple[str, ...] | None]:
    """Validate the arguments of :func:`structure` and build its prior (no sampling).

    Returns
    -------
    (distribution, labels)
        ``Dirichlet`` or ``ExpRelaxedCategorical``, and the labels (or ``None``).
    """
    num, labels = _check_labels(name, options)
    prior = parse_option(Prior, prior, "prior")
    if prior is Prior.DIRICHLET:
        return dist.Dirichlet(_positive_vector(concentration, num, "concentration", name)), labels
    temp = _positive_vector(temperature, 1, "temperature", name)[0]
    if logits is None:
        logit_tensor = torch.zeros(num)
    else:
        logit_tensor = torch.as_tensor(logits, dtype=torch.get_default_dtype())
        if logit_tensor.shape != (num,) or not bool(torch.isfinite(logit_tensor).all()):
            raise ValueError(
                f"Expected logits of structural site {name!r} to be {num} finite numbers, "
                f"but got {logits!r}."
            )
    return ExpRelaxedCategorical(temp, logits=logit_tensor), labels


def structure(
    name: str,
    options: int | Sequence[str],
    *,
    prior: str | Prior = "dirichlet",
    concentration: float | Sequence[float] | torch.Tensor = 1.0,
    temperature: float = 0.5,
    logits: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Sample structural weights :math:`\gamma \in \Delta^{K-1}` over labelled options.

    With ``prior="dirichlet"`` the site is :math:`\gamma \sim
    \mathrm{Dir}(\alpha)`. With ``prior="concrete"`` the site is sampled in
    log space, :math:`\log\gamma \sim \mathrm{ExpConcrete}(T, \text{logits})`
    (Maddison et al. 2017), and :math:`\gamma = \exp(\log\gamma)` is returned:
    temperatures down to 0.05 neither underflow nor fail the simplex check in
    float32. Either way the labels travel with the site (in its ``infer``
    dict) into results, tables and plots.

    Parameters
    ----------
    name : str
        Pyro site name.
    options : int or sequence of str
        Number of options K, or their labels (K of them, distinct, K ≥ 2).
    prior : {"dirichlet", "concrete"}
        Prior family.
    concentration : float or sequence of float
        Dirichlet concentration :math:`\alpha` (> 0), scalar or one per option.
    temperature : float
        Concrete temperature :math:`T` (> 0).
    logits : sequence of float, optional
        Concrete location logits (default uniform).

    Returns
    -------
    torch.Tensor
        :math:`\gamma`, shape ``batch_shape + (K,)``, on the simplex.

    Example
    -------
    >>> gamma = structure("activation", ["relu", "tanh"], concentration=0.5)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"Expected name to be a non-empty str (the Pyro site name), but got "
                        f"{name!r}.")
    fn, labels = structural_prior(name, options, prior=prior, concentration=concentration,
                                  temperature=temperature, logits=logits)
    value = pyro.sample(name, fn, infer={OPTIONS_KEY: labels})
    return value.exp() if is_log_simplex(fn) else value


def base_distribution(fn: Any) -> Any:
    """``fn`` without its ``Independent`` / masked / expanded wrappers."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def is_log_simplex(fn: Any) -> bool:
    """Whether a distribution is the Concrete in log space (``ExpRelaxedCategorical``)."""
    return isinstance(base_distribution(fn), _torch_relaxed.ExpRelaxedCategorical)


def is_structural(site: Mapping[str, Any]) -> bool:
    """Whether a trace site is a latent structural site."""
    if site.get("type") != "sample" or site.get("is_observed"):
        return False
    if site.get("infer", {}).get("is_auxiliary") or site_is_subsample(site):
        return False
    fn = site["fn"]
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return isinstance(support, type(constraints.simplex)) or is_log_simplex(fn)


def describe_site(name: str, fn: Any, infer: Mapping[str, Any]) -> StructuralSite:
    """Describe the structural site ``name`` from its distribution and ``infer`` dict.

    Raises
    ------
    ValueError
        If its labels do not match its last dimension, or it has fewer than
        two options.
    """
    num = int(fn.event_shape[-1])
    labels = infer.get(OPTIONS_KEY)
    if labels is not None:
        labels = tuple(str(label) for label in labels)
        if len(labels) != num:
            raise ValueError(
                f"Structural site {name!r} has {len(labels)} option labels but its value "
                f"has {num} options along the last dimension; pass one label per option."
            )
    if num < 2:
        raise ValueError(
            f"Structural site {name!r} has {num} option; a structure needs at least two."
        )
    return StructuralSite(name, num, labels, is_log_simplex(fn))


def structural_sites(trace: Trace) -> dict[str, StructuralSite]:
    """The structural sites of a model trace, in order of appearance."""
    return {
        name: describe_site(name, site["fn"], site["infer"])
        for name, site in trace.nodes.items()
        if is_structural(site)
    }


def check_structure(structure: Any, sites: Mapping[str, StructuralSite]
                    ) -> dict[str, str | int]:
    """Validate a structure (site → option label or index) against ``sites``.

    Returns the structure with every option as its label (index where the
    site has none). Raises ``ValueError`` naming an unknown site or option, or
    a site the structure gives no option for.
    """
    if not isinstance(structure, Mapping):
        raise ValueError(f"Expected each structure to be a dict site -> option, but got "
                         f"{structure!r}.")
    unknown = sorted(set(structure) - set(sites))
    if unknown:
        raise ValueError(f"Unknown structural site(s) {unknown} in structure "
                         f"{dict(structure)!r}; the sites are {list(sites)}.")
    missing = sorted(set(sites) - set(structure))
    if missing:
        raise ValueError(f"Structure {dict(structure)!r} gives no option for site(s) "
                         f"{missing}; give one option per structural site.")
    return {name: site.label(site.index(structure[name])) for name, site in sites.items()}


def find_structural_sites(model: Callable[..., Any], *args: Any, **kwargs: Any
                          ) -> dict[str, StructuralSite]:
    """Trace ``model(*args, **kwargs)`` once and return its structural sites."""
    return structural_sites(trace_model(model, args, kwargs))


