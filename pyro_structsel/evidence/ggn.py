r"""Laplace evidence of a network with the generalised Gauss–Newton curvature.

For a :class:`~pyro_structsel.NetworkModel` at a fixed structure, the weights
:math:`w \in \mathbb R^d` (prior :math:`\mathcal N(0, \operatorname{diag}(\delta)^{-1})`,
:math:`\delta = 1/h_l^2` per layer) are integrated by a Gaussian at the mode:

.. math::

    \log p(D) \approx \log p(D, w^*) + \tfrac d2 \log 2\pi
    - \tfrac12 \log\det\bigl(\mathrm{GGN}(w^*) + \operatorname{diag}(\delta)\bigr),
    \qquad \mathrm{GGN} = \sum_n J_n^\top \Lambda_n J_n,

with :math:`J_n = \partial f(x_n; w) / \partial w` the Jacobian of the network
output (logits or mean) and :math:`\Lambda_n` the Hessian of the negative log
likelihood in the output: :math:`\operatorname{diag}(p_n) - p_n p_n^\top` for
the categorical likelihood (softmax of the logits), :math:`I/\sigma^2` for the
normal one. The GGN is the Hessian without the second-derivative-of-the-network
term; it is positive semi-definite, and equals the Hessian when the output is
linear in the weights (so this Laplace is exact for linear-Gaussian models).

``hessian_structure`` selects the approximation of the GGN:

* ``"full"``: the exact :math:`d \times d` matrix (small networks);
* ``"diag"``: its exact diagonal (per-sample Jacobians by ``vmap(jacrev)``);
  by Hadamard's inequality the resulting evidence is never above ``"full"``'s;
* ``"kron"``: K-FAC for every ``nn.Linear`` layer (Martens & Grosse 2015;
  Ritter et al. 2018): with the layer input :math:`a_n` (a 1 appended for the
  bias) and :math:`B_n = \partial f_n / \partial s_n` (:math:`s_n` the layer
  output), the block :math:`\sum_n a_n a_n^\top \otimes B_n^\top \Lambda_n B_n`
  is approximated by :math:`\frac1N A \otimes G` with :math:`A = \sum_n a_n
  a_n^\top`, :math:`G = \sum_n B_n^\top \Lambda_n B_n`, and
  :math:`\log\det(\frac1N A \otimes G + \delta I) = \sum_{ij} \log(\lambda^A_i
  \lambda^G_j / N + \delta)` from the eigenvalues of the factors. It is exact
  when :math:`B_n^\top \Lambda_n B_n` does not depend on :math:`n` (a last
  linear layer under the normal likelihood). Parameters outside ``nn.Linear``
  layers (or of a layer called more than once) fall back to the diagonal.

Everything is written on :mod:`torch.func` (``functional_call``, ``vmap``,
``jacrev``, ``vjp``); no curvature library is needed.

References
----------
D. MacKay. A practical Bayesian framework for backpropagation networks. Neural
Computation, 1992.
J. Martens, R. Grosse. Optimizing neural networks with Kronecker-factored
approximate curvature. ICML 2015.
H. Ritter, A. Botev, D. Barber. A scalable Laplace approximation for neural
networks. ICLR 2018.
A. Immer et al. Scalable marginal likelihood estimation for model selection
in deep learning. ICML 2021.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vjp, vmap

from ..model.family import derive_network
from ..model.network import NetworkModel
from ..model.sites import StructuralSite, check_structure
from ..util.options import Likelihood, parse_option
from ..util.stacklevel import find_stack_level
from .estimate import Estimate
from .laplace import LaplaceWarning, find_mode

__all__ = ["HessianStructure", "ggn_laplace"]


class HessianStructure(str, Enum):
    """Approximations of the GGN in :func:`ggn_laplace`."""

    DIAG = "diag"
    KRON = "kron"
    FULL = "full"


# ----------------------------------------------------------------------------- structure


def _derived_names(model: Any, structure: Mapping[str, str | int]) -> dict[str, str]:
    """Map each parameter name of the derived network to its name in the full network.

    A parameter under the :class:`MixedOp` at path ``P``, in candidate ``k``, is
    ``P.candidates.k.rest``; once derived it is ``P.rest`` (``rest`` when the
    mixed operation is the network itself). Parameters of the candidates not
    chosen are dropped (they are inert and integrate out exactly).
    """
    chosen = {}
    for site, (path, op) in model.net.mixed_ops.items():
        option = structure[site]
        chosen[path] = op.labels.index(option) if isinstance(option, str) else int(option)
    mapping = {}
    for name in model.net.shapes:
        new = name
        dropped = False
        for path, index in chosen.items():  # outermost first
            prefix = f"{path}.candidates." if path else "candidates."
            if not new.startswith(prefix):
                continue
            k, _, rest = new[len(prefix):].partition(".")
            if int(k) != index:
                dropped = True
                break
            new = f"{path}.{rest}" if path else rest
        if not dropped:
            mapping[new] = name
    return mapping


def _check_structure(model: Any, structure: Mapping[str, str | int] | None
                     ) -> dict[str, str | int]:
    sites = {name: StructuralSite(name, len(op.labels), op.labels, False)
             for name, (_, op) in model.net.mixed_ops.items()}
    return check_structure(structure or {}, sites)


# ----------------------------------------------------------------------------- curvature


def _sandwich(jac: torch.Tensor, probs: torch.Tensor | None, noise_precision: float,
              diagonal: bool) -> torch.Tensor:
    r""":math:`\sum_n J_n^\top \Lambda_n J_n` (or its diagonal) for ``jac`` of shape (n, C, d)."""
    if probs is None:
        if diagonal:
            return noise_precision * jac.square().sum((0, 1))
        flat = jac.reshape(-1, jac.shape[-1])
        return noise_precision * flat.T @ flat
    mean = torch.einsum("nc,ncd->nd", probs, jac)
    if diagonal:
        return (probs.unsqueeze(-1) * jac.square()).sum((0, 1)) - mean.square().sum(0)
    root = (probs.sqrt().unsqueeze(-1) * jac).reshape(-1, jac.shape[-1])
    return root.T @ root - mean.T @ mean


class _Problem:
    """The derived network, its data and likelihood, as functions of a flat weight vector."""

    def __init__(self, network: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 likelihood: Likelihood, noise_scale: float,
                 prior_precision: Mapping[str, float], chunk_size: int) -> None:
        self.network = network
        self.x, self.y = x, y
        self.likelihood = likelihood
        self.noise_precision = 1.0 / noise_scale**2
        self.noise_scale = noise_scale
        self.chunk_size = chunk_size
        params = dict(network.named_parameters())
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.delta = dict(prior_precision)
        self.prior_precision = torch.cat([
            torch.full((s,), float(prior_precision[n]), dtype=x.dtype)
            for n, s in zip(self.names, self.sizes)])

    @property
    def categorical(self) -> bool:
        return self.likelihood is Likelihood.CATEGORICAL

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def output(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.network, dict(params), (x,))
        return out

    def log_likelihood(self, out: torch.Tensor) -> torch.Tensor:
        if self.categorical:
            return -nn.functional.cross_entropy(out, self.y, reduction="sum")
        target = self.y
        if out.shape[-1] == 1 and target.dim() == 1:
            out = out.squeeze(-1)
        return torch.distributions.Normal(out, self.noise_scale).log_prob(target).sum()

    def log_prior(self, flat: torch.Tensor) -> torch.Tensor:
        delta = self.prior_precision
        return 0.5 * (delta.log() - math.log(2 * math.pi) - delta * flat.square()).sum()

    def log_joint(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lik = self.log_likelihood(self.output(self.unpack(flat), self.x))
        return lik, self.log_prior(flat)

    def probs(self, out: torch.Tensor) -> torch.Tensor | None:
        return torch.softmax(out, -1) if self.categorical else None

    def chunks(self) -> list[slice]:
        n = self.x.shape[0]
        return [slice(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)]

    def ggn(self, params: dict[str, torch.Tensor], names: list[str], diagonal: bool
            ) -> torch.Tensor:
        """Exact GGN (or its diagonal) of the parameters ``names``, in that order."""
        fixed = {n: v for n, v in params.items() if n not in names}
        free = {n: params[n] for n in names}

        def single(p: dict[str, torch.Tensor], xn: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.network, {**fixed, **p}, (xn.unsqueeze(0),))
            return out.reshape(-1)

        total = None
        for part in self.chunks():
            x = self.x[part]
            with torch.no_grad():
                probs = self.probs(self.output(params, x))
            jac = vmap(jacrev(single), in_dims=(None, 0))(free, x)
            jac = torch.cat([jac[n].reshape(x.shape[0], -1, free[n].numel()) for n in names], -1)
            term = _sandwich(jac.detach(), probs, self.noise_precision, diagonal)
            total = term if total is None else total + term
        assert total is not None
        return total

    def kron_layers(self, params: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, tuple[list[str], nn.Linear]], list[str]]:
        """Linear layers eligible for K-FAC (called once, on 2-D input), and the other params."""
        linear = {path: m for path, m in self.network.named_modules()
                  if isinstance(m, nn.Linear)}
        calls: dict[str, list[int]] = {path: [] for path in linear}
        handles = [m.register_forward_hook(
            lambda mod, inp, out, path=path: calls[path].append(inp[0].dim()))
            for path, m in linear.items()]
        try:
            with torch.no_grad():
                self.output(params, self.x[:2])
        finally:
            for h in handles:
                h.remove()
        layers = {}
        for path, module in linear.items():
            own = [f"{path}.{p}" if path else p for p, _ in module.named_parameters()]
            if calls[path] != [2] or not all(n in params for n in own):
                continue
            if len({self.delta[n] for n in own}) != 1:
                continue
            layers[path] = (own, module)
        in_kron = {n for own, _ in layers.values() for n in own}
        return layers, [n for n in self.names if n not in in_kron]

    def kron_factors(self, params: dict[str, torch.Tensor],
                     layers: Mapping[str, tuple[list[str], nn.Linear]],
                     separate_bias: bool = False
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """K-FAC factors ``(A, G)`` of each layer, summed over the data.

        ``A`` is of the input with a 1 appended where the layer has a bias,
        unless ``separate_bias`` (the bias block is then ``N ⊗ G / N``).
        """
        state: dict[str, Any] = {"eps": None, "inputs": None}

        def hook(module: nn.Module, inp: tuple, out: torch.Tensor, path: str) -> Any:
            if state["inputs"] is not None:
                state["inputs"][path] = inp[0].detach()
            if state["eps"] is not None:
                return out + state["eps"][path]
            return None

        handles = [module.register_forward_hook(
            lambda mod, inp, out, path=path: hook(mod, inp, out, path))
            for path, (_, module) in layers.items()]
        factors: dict[str, list[torch.Tensor]] = {}
        try:
            for part in self.chunks():
                x = self.x[part]
                state["inputs"] = {}
                with torch.no_grad():
                    out = self.output(params, x)
                inputs, state["inputs"] = state["inputs"], None
                probs = self.probs(out)
                eps = {path: torch.zeros(x.shape[0], module.out_features, dtype=x.dtype)
                       for path, (_, module) in layers.items()}

                def perturbed(e: dict[str, torch.Tensor]) -> torch.Tensor:
                    state["eps"] = e
                    try:
                        return self.output(params, x).reshape(x.shape[0], -1)
                    finally:
                        state["eps"] = None

                out, pullback = vjp(perturbed, eps)
                c = out.shape[-1]
                basis = torch.eye(c, dtype=x.dtype).unsqueeze(1).expand(c, x.shape[0], c)
                (grads,) = vmap(pullback)(basis)  # path -> (C, n, out_features)
                for path, (_, module) in layers.items():
                    a = inputs[path]
                    if module.bias is not None and not separate_bias:
                        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                    b = grads[path].detach().transpose(0, 1)  # (n, C, out_features)
                    pair = [a.T @ a, _sandwich(b, probs, self.noise_precision, diagonal=False)]
                    if path in factors:
                        factors[path] = [f + p for f, p in zip(factors[path], pair)]
                    else:
                        factors[path] = pair
        finally:
            for h in handles:
                h.remove()
        return {path: (f[0], f[1]) for path, f in factors.items()}


def _kron_log_det(a: torch.Tensor, g: torch.Tensor, num_data: int, delta: float
                  ) -> torch.Tensor:
    eig_a = torch.linalg.eigvalsh(0.5 * (a + a.T).double()).clamp(min=0)
    eig_g = torch.linalg.eigvalsh(0.5 * (g + g.T).double()).clamp(min=0)
    return torch.log(torch.outer(eig_a, eig_g) / num_data + delta).sum()


# ----------------------------------------------------------------------------- estimator


def ggn_laplace(model: Any, *args: Any, structure: Mapping[str, str | int] | None = None,
                hessian_structure: str = "diag", max_iter: int = 500,
                tolerance: float = 1e-9, adam_steps: int = 0, lr: float = 1e-2,
                mode_tolerance: float = 0.01, separate_bias: bool = False,
                chunk_size: int = 256, **kwargs: Any) -> Estimate:
    r"""Laplace evidence :math:`\log p(D \mid \text{structure})` of a network with the GGN.

    Parameters
    ----------
    model : NetworkModel
        The Bayesian network and its likelihood; its prior scales
        :math:`h_l` (current values, learnt or fixed) give the prior precision
        :math:`1/h_l^2` of each layer's weights.
    *args, **kwargs
        The data, as passed to the model: ``x, y`` (``y`` may be a keyword);
        ``batch_size`` is ignored (the mode and the curvature are of the full data).
    structure : dict site → option, optional
        The structure to score, required when the network has
        :class:`~pyro_structsel.MixedOp` s: the network is replaced by the
        plain network :func:`~pyro_structsel.derive_network` makes, and the
        weights of the candidates left out integrate out exactly.
    hessian_structure : {"diag", "kron", "full"}
        Approximation of the GGN (see the module documentation).
    max_iter, tolerance : int, float
        L-BFGS iterations and gradient tolerance of the search for the mode.
    adam_steps, lr : int, float
        Adam steps (learning rate ``lr``) before L-BFGS, for networks where
        L-BFGS from the initialisation is unstable.
    mode_tolerance : float
        Warn (:class:`~pyro_structsel.LaplaceWarning`) when the search may have
        stopped more than this many nats below the mode, by the bound
        :math:`\|\nabla\|^2 / (2 \min\delta)`.
    separate_bias : bool
        For ``"kron"``: give each bias its own factor (exact bias block, no
        weight–bias cross terms), as laplace-torch does, instead of appending
        a 1 to the layer input (one factor pair for ``[W | b]``, the default).
    chunk_size : int
        Observations per vectorised Jacobian pass.

    Returns
    -------
    Estimate
        ``method="laplace"``, ``se=0``; ``diagnostics``: ``hessian_structure``,
        ``log_joint`` (:math:`\log p(D, w^*)`), ``log_likelihood``,
        ``log_prior``, ``log_det_precision``, ``num_params``, ``num_data``,
        ``grad_norm`` at the mode, ``mode_gap`` (its bound on the nats
        missed), ``mode`` (weights by the derived network's parameter names),
        ``network`` (the derived network at the mode),
        ``structure``, ``seconds_mode`` and ``seconds_curvature`` (wall-clock
        time of the search for the mode and of the log determinant), and for
        ``"kron"`` the ``kron_layers`` (paths of the K-FAC layers).

    Example
    -------
    >>> model = NetworkModel(two_hidden_layer(64, 10, hidden=(32, 32)))
    >>> ggn_laplace(model, x, y, structure={"layer1": "relu", "layer2": "tanh"},
    ...             hessian_structure="kron").value
    """
    kind = parse_option(HessianStructure, hessian_structure, "hessian_structure")
    if not isinstance(model, NetworkModel):
        raise ValueError(f"ggn_laplace needs a NetworkModel, but got {type(model).__name__}; "
                         "use ps.laplace for other models.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size to be a positive int, but got {chunk_size!r}.")
    kwargs = dict(kwargs)
    kwargs.pop("batch_size", None)
    if len(args) > 2 or (len(args) == 2 and "y" in kwargs):
        raise ValueError("Expected the data as (x, y).")
    if not args:
        raise ValueError("Expected the data x (and y) as positional arguments.")
    x = args[0]
    y = args[1] if len(args) == 2 else kwargs.pop("y", None)
    if kwargs:
        raise ValueError(f"Unexpected keyword argument(s) {sorted(kwargs)}.")
    if y is None:
        raise ValueError("ggn_laplace needs the observations y.")
    model.check_data(x, y, None)
    if not x.is_floating_point():
        raise ValueError("Expected floating-point inputs x.")

    structure = _check_structure(model, structure)
    if structure:
        network = derive_network(model.network, structure)
        origin = _derived_names(model, structure)
    else:
        network = derive_network(model.network, {})  # a copy
        origin = {n: n for n in model.net.shapes}
    network = network.to(x.dtype)
    names = [n for n, _ in network.named_parameters()]
    if set(names) != set(origin):
        raise ValueError("Could not match the derived network's parameters to the model's "
                         f"prior groups ({sorted(set(names) ^ set(origin))}).")
    scales = model.net.prior_scales()
    delta = {n: 1.0 / scales[model.net.group_of[origin[n]]] ** 2 for n in names}
    problem = _Problem(network, x, y, model.likelihood, model.noise_scale, delta, chunk_size)

    # ---- mode
    start = torch.cat([p.detach().reshape(-1) for p in network.parameters()]).to(x.dtype)
    started = time.perf_counter()
    mode, grad = find_mode(problem.log_joint, start, adam_steps=adam_steps, lr=lr,
                           max_iter=max_iter, tolerance=tolerance)
    with torch.no_grad():
        lik, prior = (float(t) for t in problem.log_joint(mode))
    params = problem.unpack(mode)
    d = mode.numel()
    seconds_mode = time.perf_counter() - started
    started = time.perf_counter()

    # ---- curvature
    prior_precision = problem.prior_precision.double()
    if kind is HessianStructure.FULL:
        precision = problem.ggn(params, names, diagonal=False).double()
        precision = 0.5 * (precision + precision.T) + torch.diag(prior_precision)
        eigenvalues = torch.linalg.eigvalsh(precision)
        if float(eigenvalues[0]) <= 0:  # cannot happen in exact arithmetic (GGN ⪰ 0, δ > 0)
            warnings.warn("The GGN posterior precision is not positive definite (smallest "
                          f"eigenvalue {float(eigenvalues[0]):.3g}).", LaplaceWarning,
                          stacklevel=find_stack_level())
        log_det = eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).log().sum()
    else:
        if kind is HessianStructure.KRON:
            layers, rest = problem.kron_layers(params)
        else:
            layers, rest = {}, list(names)
        log_det = torch.zeros((), dtype=torch.float64)
        if layers:
            factors = problem.kron_factors(params, layers, separate_bias)
            for path, (own, module) in layers.items():
                a, g = factors[path]
                n = x.shape[0]
                log_det = log_det + _kron_log_det(a, g, n, delta[own[0]])
                if separate_bias and module.bias is not None:  # A = [N]: the exact bias block
                    log_det = log_det + _kron_log_det(a.new_full((1, 1), n), g, n,
                                                      delta[own[0]])
        if rest:
            index = {n: i for i, n in enumerate(names)}
            offsets = [0]
            for s in problem.sizes:
                offsets.append(offsets[-1] + s)
            keep = torch.cat([torch.arange(offsets[index[n]], offsets[index[n] + 1])
                              for n in rest])
            diag = problem.ggn(params, rest, diagonal=True).double().clamp(min=0)
            diag = diag + prior_precision[keep]
            log_det = log_det + diag.log().sum()
        diagnostics_layers = sorted(layers)
    log_det = float(log_det)
    seconds_curvature = time.perf_counter() - started

    grad_norm = float(grad.norm())
    # The joint is (GGN-approximately) strongly concave with modulus >= min δ, so the
    # log joint at the mode exceeds the one reached by at most |g|² / (2 min δ).
    mode_gap = 0.5 * grad_norm**2 / float(problem.prior_precision.min())
    if not math.isfinite(mode_gap) or mode_gap > mode_tolerance:
        warnings.warn(f"L-BFGS did not reach the mode (gradient norm {grad_norm:.3g}, up to "
                      f"{mode_gap:.3g} nats below it); the Laplace evidence may be off. Raise "
                      "max_iter or adam_steps.", LaplaceWarning, stacklevel=find_stack_level())
    log_joint = lik + prior
    value = log_joint + 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
    with torch.no_grad():
        for p, v in zip(network.parameters(), params.values()):
            p.copy_(v)
    diagnostics: dict[str, Any] = {
        "hessian_structure": kind.value, "log_joint": log_joint, "log_likelihood": lik,
        "log_prior": prior, "log_det_precision": log_det, "num_params": d,
        "num_data": int(x.shape[0]), "grad_norm": grad_norm, "mode_gap": mode_gap,
        "mode": {n: v.clone() for n, v in params.items()}, "network": network,
        "structure": dict(structure), "seconds_mode": seconds_mode,
        "seconds_curvature": seconds_curvature,
    }
    if kind is HessianStructure.KRON:
        diagnostics["kron_layers"] = diagnostics_layers
    return Estimate(value, 0.0, 0, "laplace", diagnostics)
