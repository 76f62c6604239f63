r"""The log joint of any Pyro model and its curvature, from the model's trace.

:class:`LogJoint` turns ``model(*args, **kwargs)`` into a function of one flat
vector :math:`u \in \mathbb R^d` of its latents in unconstrained space
(:math:`z = T(u)`, ``biject_to`` of each site's support):

.. math::

    \log p(D, u) = \underbrace{\sum_o \log p(y_o \mid \theta_o(u))}_{\text{likelihood}}
    + \underbrace{\sum_s \log p(T(u_s)) + \log\lvert\det J_T(u_s)\rvert}_{\text{prior}},

on the full data whatever the model's plates subsample
(:func:`~pyro_structsel.model.full_data.full_data`). Its curvature at a mode
is the posterior precision of the Laplace approximation:

.. math::

    P = \underbrace{\sum_o \sum_n J_{on}^\top F_{on} J_{on}}_{\mathrm{GGN}}
        \;-\; \nabla^2_u \log p(u),
    \qquad J_{on} = \partial \theta_{on} / \partial u,

with :math:`\theta_{on}` the parameters of the distribution of observation
:math:`n` of observed site :math:`o` (Normal loc, Categorical logits, ...),
:math:`F_{on}` its Fisher information (:mod:`~pyro_structsel.evidence.fisher`)
and the exact Hessian of the log prior. The GGN is the Hessian of the
negative log-likelihood without the second derivatives of
:math:`\theta(u)`: positive semi-definite always, and equal to it when
:math:`\theta` is affine in :math:`u` (linear-Gaussian models, GLMs at
their canonical link).

Curvatures (:class:`HessianStructure`):

* ``"full"``: :math:`P` as a :math:`d \times d` matrix; :math:`J` by
  forward-mode Jacobian-vector products (``torch.func.jvp`` under ``vmap``).
* ``"diag"``: the exact diagonal of the GGN and of the prior Hessian. For a
  latent matrix :math:`W` used once as ``a @ W`` on the rows of the data
  (found by a ``TorchFunctionMode``), :math:`\mathrm{GGN}_{(i,o)} =
  \sum_n a_{ni}^2\, (B_n^\top F_n B_n)_{oo}` with :math:`B_n =
  \partial\theta_n/\partial s_n` of the output :math:`s = aW`, from
  :math:`R` vector-Jacobian products; other latents by one JVP per
  coordinate.
* ``"kron"`` (the scalable one): K-FAC for those matrices (Martens &
  Grosse 2015; Ritter et al. 2018), :math:`\sum_n a_n a_n^\top \otimes
  B_n^\top F_n B_n \approx \frac1N A \otimes G` with
  :math:`A = \sum_n a_n a_n^\top`, :math:`G = \sum_n B_n^\top F_n B_n`, and
  :math:`\log\det(\frac1N A \otimes G + \delta I) = \sum_{ij}\log(\lambda^A_i
  \lambda^G_j / N + \delta)`; exact diagonal for every other latent (and for a
  matrix whose prior precision is not one number :math:`\delta`).

The matrix path assumes that the rows of ``a`` are the rows of the data
(each output row depends on its own input row only); it is checked against
exact JVPs on a few coordinates of each matrix and dropped where it fails.

References
----------
J. Martens, R. Grosse. Optimizing neural networks with Kronecker-factored
approximate curvature. ICML 2015.
H. Ritter, A. Botev, D. Barber. A scalable Laplace approximation for neural
networks. ICLR 2018.
A. Immer et al. Scalable marginal likelihood estimation for model selection
in deep learning. ICML 2021.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.func import jvp, vmap
from torch.overrides import TorchFunctionMode

from ..model.full_data import FullDataMessenger, num_blocks
from ..util.minibatch import full_data as every_row
from .fisher import ObservedSite, observed_site, observed_theta, unwrap

__all__ = ["Curvature", "HessianStructure", "KronBlock", "LatentSite", "LogJoint", "Precision",
           "forward_mode", "log_joint_batched", "precision"]


class HessianStructure(str, Enum):
    """Approximations of the posterior precision (see the module documentation)."""

    FULL = "full"
    DIAG = "diag"
    KRON = "kron"


@dataclass(frozen=True)
class LatentSite:
    """A latent sample site: its place in the flat vector and its transform."""

    name: str
    shape: torch.Size  #: constrained value shape
    unconstrained_shape: torch.Size
    transform: Any  #: unconstrained → constrained (``biject_to(support)``)
    start: int

    @property
    def size(self) -> int:
        return int(self.unconstrained_shape.numel())

    @property
    def stop(self) -> int:
        return self.start + self.size


@contextmanager
def forward_mode() -> Iterator[None]:
    """Context for ``torch.func.jvp``: validation off, torch's own jit deprecation silenced.

    (Forward-mode AD in torch 2.13 compiles a helper with ``torch.jit.script``,
    which warns on first use; the warning is torch's, not the user's.)
    """
    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*",
                                category=DeprecationWarning)
        yield


def _is_fixed(site: Mapping[str, Any]) -> bool:
    infer = site.get("infer") or {}
    return bool(infer.get("structsel_fixed") or infer.get("_deterministic"))


class LogJoint:
    """``model(*args, **kwargs)`` as a function of its flat unconstrained latents.

    Parameters
    ----------
    model : callable
        A Pyro model; every latent sample site is integrated.
    args, kwargs
        Its arguments (the data).
    fisher_samples : int
        Sampled targets per observation for a likelihood without a
        closed-form Fisher.

    Raises
    ------
    ValueError
        Naming the site: a discrete latent, a latent whose support has no
        bijection to the reals, a latent inside a subsampled plate.
    """

    def __init__(self, model: Callable[..., Any], args: tuple = (),
                 kwargs: Mapping[str, Any] | None = None, *, fisher_samples: int = 64) -> None:
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.fisher_samples = fisher_samples
        with every_row():
            self.num_blocks = num_blocks(model, self.args, self.kwargs)
        handler = FullDataMessenger(0)
        with poutine.block(), torch.no_grad(), every_row():
            trace = poutine.trace(handler(model)).get_trace(*self.args, **self.kwargs)
        sites: list[LatentSite] = []
        start = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            support = site["fn"].support
            if support.is_discrete:
                raise ValueError(
                    f"Latent site {name!r} is discrete (support {support}); a Laplace "
                    "(Gaussian) approximation cannot cover it. Enumerate it out of the model "
                    "or fix its value (poutine.condition, ps.fix_structure).")
            local = [f.name for f in site["cond_indep_stack"] if f.name in handler.subsampled]
            if local:
                raise ValueError(
                    f"Latent site {name!r} sits in the subsampled plate {local[0]!r}; the "
                    "evidence integrates every latent on the full data, so local latents "
                    "need subsample_size=None.")
            try:
                transform = biject_to(support)
            except NotImplementedError as error:
                raise ValueError(
                    f"Latent site {name!r} has support {support}, which has no bijection to "
                    "the reals, so a Gaussian cannot cover it.") from error
            value = site["value"]
            unconstrained = torch.Size(transform.inv.forward_shape(value.shape))
            sites.append(LatentSite(name, value.shape, unconstrained, transform, start))
            start += int(unconstrained.numel())
        if not sites:
            raise ValueError("The model has no latent site to integrate; its log evidence is "
                             "its log-likelihood.")
        self.sites = sites
        self.site = {s.name: s for s in sites}
        self.dim = start
        self.dtype = trace.nodes[sites[0].name]["value"].dtype
        self.prototype = trace

    # ------------------------------------------------------------------ vectors
    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained value of each latent."""
        return {s.name: flat[s.start:s.stop].reshape(s.unconstrained_shape) for s in self.sites}

    def constrained(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained value of each latent."""
        return {s.name: s.transform(u) for s, u in zip(self.sites, self.unpack(flat).values())}

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Flat unconstrained vector from constrained values (every latent must be given)."""
        missing = [s.name for s in self.sites if s.name not in values]
        if missing:
            raise ValueError(f"No value for the latent site(s) {missing}.")
        parts = []
        for s in self.sites:
            value = torch.as_tensor(values[s.name], dtype=self.dtype)
            if value.shape != s.shape:
                raise ValueError(f"Value of latent site {s.name!r} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(s.shape)}.")
            parts.append(s.transform.inv(value).reshape(-1))
        return torch.cat(parts)

    def prior_draw(self, scale: float = 1.0) -> torch.Tensor:
        """A flat vector from one prior draw, shrunk by ``scale`` in unconstrained space."""
        with poutine.block(), torch.no_grad(), every_row():
            trace = poutine.trace(FullDataMessenger(0)(self.model)).get_trace(
                *self.args, **self.kwargs)
        return scale * self.pack({s.name: trace.nodes[s.name]["value"] for s in self.sites})

    # ------------------------------------------------------------------ traces
    def traces(self, flat: torch.Tensor, *,
               handlers: tuple[Callable[[Any], Any], ...] = ()) -> Iterator[
                   tuple[Trace, dict[str, torch.Tensor], FullDataMessenger]]:
        """The model's trace with the latents at ``flat``, one per full-data block."""
        unconstrained = self.unpack(flat)
        values = {s.name: s.transform(unconstrained[s.name]) for s in self.sites}
        for block in range(self.num_blocks):
            handler = FullDataMessenger(block)
            model = poutine.condition(handler(self.model), data=values)
            for wrap in handlers:
                model = wrap(model)
            with poutine.block(), every_row():  # ps.data_plate takes every row too
                trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
            yield trace, unconstrained, handler

    def observed_sites(self, trace: Trace) -> Iterator[tuple[str, dict[str, Any]]]:
        """The observed sites of a trace of the model (not latents, pinned or plate sites)."""
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"] and name not in self.site \
                    and not site_is_subsample(site) and not _is_fixed(site):
                yield name, site

    def log_density(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_likelihood, log_prior)`` at ``flat``; the prior with the log-Jacobians."""
        likelihood = flat.new_zeros(())
        prior = flat.new_zeros(())
        for block, (trace, unconstrained, _) in enumerate(self.traces(flat)):
            trace.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
            if block == 0:
                for s in self.sites:
                    node = trace.nodes[s.name]
                    prior = prior + node["log_prob_sum"] + s.transform.log_abs_det_jacobian(
                        unconstrained[s.name], node["value"]).sum()
            for _, site in self.observed_sites(trace):
                likelihood = likelihood + site["log_prob_sum"]
        return likelihood, prior

    def log_prior(self, flat: torch.Tensor) -> torch.Tensor:
        """The prior part of :meth:`log_density` alone (one trace)."""
        trace, unconstrained, _ = next(self.traces(flat))
        total = flat.new_zeros(())
        for s in self.sites:
            node = trace.nodes[s.name]
            log_prob = node["fn"].log_prob(node["value"])
            total = total + _scale_and_mask(log_prob, node) + s.transform.log_abs_det_jacobian(
                unconstrained[s.name], node["value"]).sum()
        return total

    # ------------------------------------------------------------------ observations
    def observations(self, flat: torch.Tensor, *, differentiable: bool = False
                     ) -> list[ObservedSite]:
        """Free distribution parameters and Fisher square roots of every observed site.

        ``differentiable`` keeps the Fisher's graph to the model's parameters
        (the latents are held at ``flat``).
        """
        out = []
        with torch.enable_grad():
            leaf = flat.detach().clone().requires_grad_()

            def depends(tensor: torch.Tensor) -> bool:  # on the latents, not on pyro.params
                return tensor.requires_grad and torch.autograd.grad(
                    tensor.sum(), leaf, retain_graph=True, allow_unused=True)[0] is not None

            for trace, _, _ in self.traces(leaf):
                for name, site in self.observed_sites(trace):
                    observed = observed_site(name, site, num_samples=self.fisher_samples,
                                             depends=depends, differentiable=differentiable)
                    if observed is not None:
                        out.append(observed)
        return out

    def thetas(self, flat: torch.Tensor, observations: list[ObservedSite]
               ) -> tuple[torch.Tensor, ...]:
        """The ``theta`` of ``observations`` recomputed at ``flat`` (for Jacobians)."""
        params = {}
        for obs in observations:
            params.setdefault(obs.name, obs.params)
        out = []
        for trace, _, _ in self.traces(flat):
            for name, site in self.observed_sites(trace):
                if name in params:
                    out.append(observed_theta(site, params[name]))
        return tuple(out)


def log_joint_batched(log_joint: LogJoint, flats: torch.Tensor, chunk_size: int
                      ) -> torch.Tensor:
    r""":math:`\log p(D, u_k)` (prior with log-Jacobians) for each row of ``flats`` ``(n, d)``.

    Vectorised with ``torch.func.vmap`` (the model sees unbatched values, so
    ``x @ W`` needs no broadcasting care); one row at a time where the model
    cannot be mapped.
    """
    def one(flat: torch.Tensor) -> torch.Tensor:
        likelihood, prior = log_joint.log_density(flat)
        return likelihood + prior

    with torch.no_grad():
        try:
            with forward_mode():
                return torch.cat([vmap(one, randomness="different")(flats[i:i + chunk_size])
                                  for i in range(0, flats.shape[0], chunk_size)])
        except RuntimeError:
            return torch.stack([one(flat) for flat in flats])


def _scale_and_mask(log_prob: torch.Tensor, site: Mapping[str, Any]) -> torch.Tensor:
    mask = site["mask"]
    if mask is not None and not (isinstance(mask, bool) and mask):
        log_prob = torch.where(torch.as_tensor(mask), log_prob, log_prob.new_zeros(()))
    return (log_prob * site["scale"]).sum()


# ----------------------------------------------------------------------------- matrices

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm}


class _MatmulRecorder(TorchFunctionMode):
    """Records ``a @ W`` (and ``F.linear(a, W)``) for latent values ``W``; perturbs the output."""

    def __init__(self, weights: Mapping[int, str],
                 perturbations: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.weights = weights
        self.perturbations = perturbations
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Size, bool]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        out = func(*args, **kwargs)
        name, transposed = None, False
        if func in _MATMULS and len(args) == 2 and torch.is_tensor(args[1]):
            name = self.weights.get(id(args[1]))
        elif func is F.linear and len(args) >= 2 and torch.is_tensor(args[1]):
            name, transposed = self.weights.get(id(args[1])), True
            if name is not None and (len(args) > 2 and args[2] is not None or
                                     kwargs.get("bias") is not None):
                name = None  # a bias inside: the output is not a @ W^T alone
        if name is None or not torch.is_tensor(args[0]):
            return out
        self.calls.setdefault(name, []).append((args[0].detach(), out.shape, transposed))
        if self.perturbations is not None and name in self.perturbations:
            out = out + self.perturbations[name]
        return out


@dataclass
class _MatrixFactors:
    """Per latent matrix ``W`` (``a @ W``): the factors of its GGN block."""

    inputs: torch.Tensor  #: A = Σ_n a_n a_nᵀ
    outputs: torch.Tensor  #: G = Σ_n B_nᵀ F_n B_n
    diagonal: torch.Tensor  #: exact diagonal of the block, in W's (unconstrained) layout
    rows: int  #: N, number of data rows
    transposed: bool


class Curvature:
    """Posterior precision pieces of a :class:`LogJoint` at a point ``flat``.

    Parameters
    ----------
    log_joint : LogJoint
    flat : Tensor
        The point (the mode).
    chunk_size : int
        Coordinates per vectorised JVP pass.
    """

    def __init__(self, log_joint: LogJoint, flat: torch.Tensor, *, chunk_size: int = 64) -> None:
        self.log_joint = log_joint
        self.flat = flat.detach()
        self.chunk_size = chunk_size
        self._observed: list[ObservedSite] | None = None
        self.matrices_checked: dict[str, bool] = {}

    @property
    def observed(self) -> list[ObservedSite]:
        """The observed sites' free parameters and Fisher square roots at the point."""
        if self._observed is None:
            self._observed = self.log_joint.observations(self.flat)
        return self._observed

    # ------------------------------------------------------------------ Jacobians
    def _sqrt_jacobian_columns(self, columns: torch.Tensor) -> torch.Tensor:
        r""":math:`L^\top J` on the coordinates ``columns``: shape ``(rows, len(columns))``."""
        log_joint, observed = self.log_joint, self.observed
        if not observed:
            return torch.zeros(0, len(columns), dtype=torch.float64)

        def thetas(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return log_joint.thetas(flat, observed)

        basis = torch.zeros(len(columns), self.flat.numel(), dtype=self.flat.dtype)
        basis[torch.arange(len(columns)), columns] = 1
        try:
            with forward_mode():
                _, tangents = vmap(lambda v: jvp(thetas, (self.flat,), (v,)),
                                   randomness="same")(basis)
        except RuntimeError as error:
            raise ValueError(
                "Could not take Jacobian-vector products through the model (it draws "
                "random numbers outside Pyro sample sites, or calls .item() / Python "
                f"control flow on latent values: {error}). Use curvature='hessian'.") from error
        parts = [torch.einsum("mpr,cmp->mrc", obs.sqrt_fisher, tangent).reshape(-1, len(columns))
                 for obs, tangent in zip(observed, tangents)]
        return torch.cat(parts, 0).double()

    def _chunks(self, columns: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(columns), self.chunk_size):
            yield columns[start:start + self.chunk_size]

    def ggn(self) -> torch.Tensor:
        """The full GGN, ``(d, d)``, float64."""
        d = self.flat.numel()
        rows = sum(obs.sqrt_fisher.shape[0] * obs.sqrt_fisher.shape[2] for obs in self.observed)
        if rows * d > 2e8:
            raise ValueError(f"The full GGN needs a {rows} x {d} Jacobian; use "
                             "hessian_structure='diag' or 'kron' for a model this size.")
        columns = [self._sqrt_jacobian_columns(c) for c in self._chunks(torch.arange(d))]
        g = torch.cat(columns, 1)
        return g.T @ g

    def ggn_diagonal(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The exact diagonal of the GGN on ``columns`` (default all), by JVPs."""
        if columns is None:
            columns = torch.arange(self.flat.numel())
        out = torch.zeros(len(columns), dtype=torch.float64)
        done = 0
        for chunk in self._chunks(columns):
            out[done:done + len(chunk)] = self._sqrt_jacobian_columns(chunk).square().sum(0)
            done += len(chunk)
        return out

    # ------------------------------------------------------------------ matrices
    def matrix_factors(self) -> dict[str, _MatrixFactors]:
        """Factors of each latent matrix used once as ``a @ W`` on the data rows."""
        log_joint = self.log_joint
        candidates = {s.name for s in log_joint.sites
                      if len(s.shape) in (1, 2) and s.unconstrained_shape == s.shape}
        if not candidates or not self.observed:
            return {}
        factors: dict[str, dict[str, Any]] = {}
        for block in range(log_joint.num_blocks):
            values = log_joint.constrained(self.flat)
            weights = {id(values[n]): n for n in candidates}
            recorder = _MatmulRecorder(weights)
            handler = FullDataMessenger(block)
            model = poutine.condition(handler(log_joint.model), data=values)
            with torch.no_grad(), recorder, poutine.block(), pyro.validation_enabled(False), \
                    every_row():
                poutine.trace(model).get_trace(*log_joint.args, **log_joint.kwargs)
            eligible = {}
            for name, calls in recorder.calls.items():
                if len(calls) != 1:
                    continue
                a, shape, transposed = calls[0]
                if a.dim() != 2 or len(shape) not in (1, 2) or shape[0] != a.shape[0]:
                    continue
                if transposed and len(values[name].shape) != 2:
                    continue
                eligible[name] = (a, shape, transposed)
            if not eligible:
                return {}
            perturbations = {n: torch.zeros(shape, dtype=self.flat.dtype, requires_grad=True)
                             for n, (_, shape, _) in eligible.items()}
            recorder = _MatmulRecorder(weights, perturbations)
            names = list(perturbations)
            with torch.enable_grad(), recorder, poutine.block(), \
                    pyro.validation_enabled(False), every_row():
                trace = poutine.trace(model).get_trace(*log_joint.args, **log_joint.kwargs)
                params = {obs.name: obs for obs in self.observed}
                thetas = [observed_theta(site, params[name].params)
                          for name, site in log_joint.observed_sites(trace) if name in params]
                block_sqrt = self._block_sqrt(block)
                width = max(s.shape[-1] for s in block_sqrt)
                grads_by_r = []
                for r in range(width):
                    outs = [t for t, s in zip(thetas, block_sqrt) if r < s.shape[-1]]
                    cotangents = [s[..., r].to(t.dtype) for t, s in zip(thetas, block_sqrt)
                                  if r < s.shape[-1]]
                    grads_by_r.append(torch.autograd.grad(
                        outs, [perturbations[n] for n in names], cotangents,
                        retain_graph=r + 1 < width, allow_unused=True))
            for index, name in enumerate(names):
                a, shape, transposed = eligible[name]
                a = a.double()
                u = [g[index] for g in grads_by_r if g[index] is not None]
                u = [x.double().reshape(x.shape[0], -1) for x in u]
                if handler.keep is not None and a.shape[0] == handler.keep.shape[0]:
                    a = a[handler.keep]
                    u = [x[handler.keep] for x in u]
                entry = factors.setdefault(name, {"A": 0.0, "G": 0.0, "D": 0.0, "N": 0,
                                                  "T": transposed})
                entry["A"] = entry["A"] + a.T @ a
                entry["G"] = entry["G"] + sum(x.T @ x for x in u) if u else entry["G"]
                squares = sum(x.square() for x in u) if u else torch.zeros(a.shape[0], 1)
                entry["D"] = entry["D"] + a.square().T @ squares  # (in, out)
                entry["N"] += a.shape[0]
        out = {}
        for name, entry in factors.items():
            diagonal = entry["D"]
            if entry["T"]:
                diagonal = diagonal.T  # W is (out, in) under F.linear
            if not torch.is_tensor(entry["G"]):
                continue
            out[name] = _MatrixFactors(entry["A"], entry["G"],
                                       diagonal.reshape(log_joint.site[name].shape),
                                       entry["N"], entry["T"])
        return self._checked(out)

    def _block_sqrt(self, block: int) -> list[torch.Tensor]:
        """The Fisher square roots of block ``block``'s observations (in trace order)."""
        per_block = len(self.observed) // self.log_joint.num_blocks
        return [obs.sqrt_fisher for obs in self.observed[block * per_block:(block + 1) * per_block]]

    def _checked(self, factors: dict[str, _MatrixFactors], num_checks: int = 3
                 ) -> dict[str, _MatrixFactors]:
        """Keep the matrices whose diagonal matches exact JVPs on a few random coordinates."""
        kept = {}
        generator = torch.Generator().manual_seed(0)
        for name, factor in factors.items():
            site = self.log_joint.site[name]
            picks = torch.randint(0, site.size, (num_checks,), generator=generator)
            exact = self.ggn_diagonal(site.start + picks)
            ours = factor.diagonal.reshape(-1)[picks]
            ok = bool(torch.allclose(ours, exact, rtol=1e-3, atol=1e-6 * float(exact.abs().max())
                                     + 1e-12))
            self.matrices_checked[name] = ok
            if ok:
                kept[name] = factor
        return kept

    # ------------------------------------------------------------------ the prior
    def prior_precision(self, *, diagonal: bool, create_graph: bool = False) -> torch.Tensor:
        r""":math:`-\nabla^2 \log p(u)`: the full matrix, or its exact diagonal.

        ``create_graph`` keeps the graph to whatever the prior depends on
        besides the latents (hyperparameters, for empirical Bayes).
        """
        log_joint = self.log_joint
        d = self.flat.numel()
        with torch.enable_grad():
            leaf = self.flat.clone().requires_grad_()
            grad = torch.autograd.grad(log_joint.log_prior(leaf), leaf, create_graph=True)[0]
            if not grad.requires_grad:  # a flat prior: zero curvature
                return torch.zeros(d if diagonal else (d, d), dtype=torch.float64)
            separable, coupled = self._separable_sites(leaf)

            def hvp(vectors: torch.Tensor) -> torch.Tensor:
                out = torch.autograd.grad(grad, leaf, vectors, retain_graph=True,
                                          create_graph=create_graph, is_grads_batched=True,
                                          allow_unused=True)[0]
                return torch.zeros_like(vectors) if out is None else out

            if not diagonal:
                rows = [hvp(torch.eye(d, dtype=leaf.dtype)[c]) for c in self._chunks(
                    torch.arange(d))]
                hessian = torch.cat(rows, 0).double()
                return -0.5 * (hessian + hessian.T)
            out = torch.zeros(d, dtype=torch.float64)
            if separable:
                v = torch.zeros(1, d, dtype=leaf.dtype)
                for s in separable:
                    v[0, s.start:s.stop] = 1
                h = hvp(v)[0].double()
                for s in separable:
                    out[s.start:s.stop] = -h[s.start:s.stop]
            for s in coupled:
                index = torch.arange(s.start, s.stop)
                for chunk in self._chunks(index):
                    basis = torch.zeros(len(chunk), d, dtype=leaf.dtype)
                    basis[torch.arange(len(chunk)), chunk] = 1
                    out[chunk] = -hvp(basis)[torch.arange(len(chunk)), chunk].double()
            return out

    def _separable_sites(self, leaf: torch.Tensor) -> tuple[list[LatentSite], list[LatentSite]]:
        """Latents whose prior Hessian is diagonal and uncoupled (one HVP gives it), and the rest.

        A site qualifies when its prior is elementwise (scalar base distribution,
        elementwise transform) and no other site's prior depends on it.
        """
        log_joint = self.log_joint
        trace, unconstrained, _ = next(log_joint.traces(leaf))
        depends: dict[str, set[str]] = {}
        for s in log_joint.sites:
            node = trace.nodes[s.name]
            fn = node["fn"]
            parents = set()
            for param in _distribution_tensors(unwrap(fn)):
                if param.requires_grad:
                    grads = torch.autograd.grad(param.sum(), leaf, retain_graph=True,
                                                allow_unused=True)[0]
                    if grads is not None:
                        for other in log_joint.sites:
                            if other.name != s.name and bool(grads[other.start:other.stop]
                                                             .ne(0).any()):
                                parents.add(other.name)
            depends[s.name] = parents
        has_children = {p for parents in depends.values() for p in parents}
        separable, coupled = [], []
        for s in log_joint.sites:
            base = unwrap(trace.nodes[s.name]["fn"])
            transform = s.transform
            elementwise = base.event_shape == () and _elementwise(transform)
            if elementwise and s.name not in has_children:
                separable.append(s)
            else:
                coupled.append(s)
        return separable, coupled


def _distribution_tensors(fn: Any) -> list[torch.Tensor]:
    names = list(getattr(fn, "arg_constraints", {}))
    return [fn.__dict__[n] for n in names if n in fn.__dict__ and torch.is_tensor(fn.__dict__[n])]


def _elementwise(transform: Any) -> bool:
    while hasattr(transform, "base_transform"):  # IndependentTransform
        transform = transform.base_transform
    return getattr(transform, "domain", None) is not None and transform.domain.event_dim == 0 \
        and transform.codomain.event_dim == 0


@dataclass
class KronBlock:
    r"""K-FAC block of a latent matrix: :math:`\frac1N A \otimes G + \delta I` by eigenpairs."""

    name: str
    start: int
    shape: torch.Size  #: the site's (unconstrained) shape, (in, out) or (out, in)
    eig_a: torch.Tensor
    vec_a: torch.Tensor
    eig_g: torch.Tensor
    vec_g: torch.Tensor
    rows: int
    delta: torch.Tensor  #: prior precision (0-dim, may carry a graph to hyperparameters)
    transposed: bool

    def eigenvalues(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Eigenvalues of the block in the (in, out) layout of the factors."""
        return torch.outer(self.eig_a, self.eig_g) / self.rows + (
            self.delta if delta is None else delta)

    def _to_eigenbasis(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates of ``x`` (leading batch, block flattened) in the factors' eigenbasis."""
        matrix = x.reshape(x.shape[:-1] + tuple(self.shape))
        if self.transposed:
            matrix = matrix.transpose(-1, -2)
        return self.vec_a.T @ matrix @ self.vec_g

    def _from_eigenbasis(self, z: torch.Tensor) -> torch.Tensor:
        matrix = self.vec_a @ z @ self.vec_g.T
        if self.transposed:
            matrix = matrix.transpose(-1, -2)
        return matrix.reshape(matrix.shape[:-2] + (-1,))


@dataclass
class Precision:
    r"""The Laplace posterior precision :math:`P`: GGN plus prior, in one structure.

    ``full``: the dense matrices; otherwise a diagonal for every coordinate
    outside a K-FAC block, and the :class:`KronBlock` s. Keeps the GGN and
    the prior apart so that :meth:`with_prior` can swap the prior (empirical Bayes).
    """

    structure: HessianStructure
    ggn: torch.Tensor  #: full: (d, d); otherwise (d,) diagonal (0 on K-FAC blocks)
    prior: torch.Tensor  #: full: (d, d); otherwise (d,) diagonal
    blocks: list[KronBlock]

    @property
    def dim(self) -> int:
        return int(self.ggn.shape[0])

    def _diagonal_mask(self) -> torch.Tensor:
        keep = torch.ones(self.dim, dtype=torch.bool)
        for block in self.blocks:
            keep[block.start:block.start + block.eig_a.numel() * block.eig_g.numel()] = False
        return keep

    def with_prior(self, prior: torch.Tensor) -> Precision:
        """The same GGN with another prior precision (same layout as :attr:`prior`)."""
        blocks = []
        for block in self.blocks:
            size = block.eig_a.numel() * block.eig_g.numel()
            blocks.append(KronBlock(**{**block.__dict__,
                                       "delta": prior[block.start:block.start + size].mean()}))
        return Precision(self.structure, self.ggn, prior, blocks)

    def eigen(self) -> torch.Tensor:
        """All eigenvalues (full: of the matrix; otherwise diagonal and K-FAC blocks)."""
        if self.structure is HessianStructure.FULL:
            matrix = self.ggn + self.prior
            return torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        parts = [(self.ggn + self.prior)[self._diagonal_mask()]]
        parts += [block.eigenvalues().reshape(-1) for block in self.blocks]
        return torch.cat(parts)

    def log_det(self) -> torch.Tensor:
        r""":math:`\log\det P` (NaN when :math:`P` is not positive definite); differentiable."""
        if self.structure is HessianStructure.FULL:
            matrix = self.ggn + self.prior
            sign, value = torch.linalg.slogdet(0.5 * (matrix + matrix.T))
            if float(sign.detach()) <= 0 or float(self.eigen()[0].detach()) <= 0:
                return value.new_tensor(math.nan)
            return value
        eigenvalues = self.eigen()
        if eigenvalues.numel() and float(eigenvalues.min().detach()) <= 0:
            return eigenvalues.new_tensor(math.nan)
        return eigenvalues.log().sum()

    def sample_offsets(self, num: int, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        r"""``num`` draws of :math:`\varepsilon \sim \mathcal N(0, P^{-1})`, shape ``(num, d)``."""
        d = self.dim
        z = torch.randn(num, d, generator=generator, dtype=torch.float64)
        if self.structure is HessianStructure.FULL:
            matrix = (self.ggn + self.prior).detach()
            cholesky = torch.linalg.cholesky(0.5 * (matrix + matrix.T))
            # P = L Lᵀ: ε = L⁻ᵀ z has covariance P⁻¹
            return torch.linalg.solve_triangular(cholesky.T, z.T, upper=True).T
        out = torch.zeros(num, d, dtype=torch.float64)
        keep = self._diagonal_mask()
        out[:, keep] = z[:, keep] / (self.ggn + self.prior).detach()[keep].sqrt()
        for block in self.blocks:
            size = block.eig_a.numel() * block.eig_g.numel()
            scaled = z[:, block.start:block.start + size].reshape(
                num, block.eig_a.numel(), block.eig_g.numel()) / block.eigenvalues().detach().sqrt()
            out[:, block.start:block.start + size] = block._from_eigenbasis(scaled)
        return out

    def quadratic(self, offsets: torch.Tensor) -> torch.Tensor:
        r""":math:`\varepsilon^\top P \varepsilon` for each row of ``offsets`` ``(num, d)``."""
        if self.structure is HessianStructure.FULL:
            matrix = (self.ggn + self.prior).detach()
            return ((offsets @ matrix) * offsets).sum(-1)
        keep = self._diagonal_mask()
        total = (offsets[:, keep].square() * (self.ggn + self.prior).detach()[keep]).sum(-1)
        for block in self.blocks:
            size = block.eig_a.numel() * block.eig_g.numel()
            z = block._to_eigenbasis(offsets[:, block.start:block.start + size])
            total = total + (z.square() * block.eigenvalues().detach()).sum((-1, -2))
        return total


def kron_factors_eigen(inputs: torch.Tensor, outputs: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenpairs of the (symmetrised, clamped at 0) K-FAC factors."""
    eig_a, vec_a = torch.linalg.eigh(0.5 * (inputs + inputs.T))
    eig_g, vec_g = torch.linalg.eigh(0.5 * (outputs + outputs.T))
    return eig_a.clamp(min=0), vec_a, eig_g.clamp(min=0), vec_g


def precision(curvature: Curvature, structure: HessianStructure) -> Precision:
    r"""The posterior precision at the curvature's point, in the structure asked."""
    if structure is HessianStructure.FULL:
        return Precision(structure, curvature.ggn(), curvature.prior_precision(diagonal=False),
                         [])
    prior = curvature.prior_precision(diagonal=True)
    d = prior.numel()
    covered = torch.zeros(d, dtype=torch.bool)
    diagonal = torch.zeros(d, dtype=torch.float64)
    blocks = []
    for name, factor in curvature.matrix_factors().items():
        site = curvature.log_joint.site[name]
        block = slice(site.start, site.stop)
        delta = prior[block]
        if structure is HessianStructure.KRON and bool((delta == delta[0]).all()):
            eig_a, vec_a, eig_g, vec_g = kron_factors_eigen(factor.inputs, factor.outputs)
            blocks.append(KronBlock(name, site.start, site.unconstrained_shape, eig_a, vec_a,
                                    eig_g, vec_g, factor.rows, delta[0], factor.transposed))
        else:
            diagonal[block] = factor.diagonal.reshape(-1)
        covered[block] = True
    rest = (~covered).nonzero().squeeze(-1)
    if rest.numel():
        diagonal[rest] = curvature.ggn_diagonal(rest)
    return Precision(structure, diagonal, prior, blocks)
