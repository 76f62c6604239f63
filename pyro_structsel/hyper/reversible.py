r"""Hypergradients by exact reversal of SGD with momentum (RMAD).

The inner optimiser is stochastic gradient descent with momentum in the form of
Maclaurin, Duvenaud & Adams (2015): with :math:`v_0 = 0` and for
:math:`t = 0, \dots, \eta - 1`,

.. math::

    g_t = \nabla_\theta L(\theta_t, h, t), \qquad
    v_{t+1} = \gamma_t v_t - (1 - \gamma_t)\, g_t, \qquad
    \theta_{t+1} = \theta_t + \alpha_t v_{t+1},

with a learning-rate schedule :math:`\alpha` and a momentum schedule
:math:`\gamma \in (0, 1)^\eta`. The hypergradient of :math:`Q(\theta_\eta, h)` with
respect to the hyperparameters :math:`h`, the schedules and :math:`\theta_0` is
reverse-mode differentiation through these :math:`\eta` steps. Plain reverse mode
stores the trajectory (memory :math:`O(\eta|\theta|)`); RMAD instead *runs the
dynamics backwards* (Algorithm 2 of the paper),

.. math::

    \theta_t = \theta_{t+1} - \alpha_t v_{t+1}, \qquad
    v_t = \bigl(v_{t+1} + (1 - \gamma_t)\, g_t\bigr) / \gamma_t,

and accumulates, from :math:`d\theta = \partial Q/\partial\theta_\eta`,
:math:`dh = \partial Q/\partial h`, :math:`dv = 0`,

.. math::

    d\alpha_t &= d\theta \cdot v_{t+1}, \qquad dv \mathrel{+}= \alpha_t\, d\theta, \qquad
    d\gamma_t = dv \cdot (v_t + g_t), \\
    d\theta &\mathrel{-}= (1 - \gamma_t)\, \nabla^2_\theta L\; dv, \qquad
    dh \mathrel{-}= (1 - \gamma_t)\, \nabla_h \nabla_\theta L\; dv, \qquad
    dv \mathrel{*}= \gamma_t,

with both second-derivative products from one vector-Jacobian product through
the gradient :math:`g_t`. Memory is :math:`O(|\theta|)` plus the information
buffer below; the trajectory is never stored.

**Why exact arithmetic.** The division by :math:`\gamma_t` amplifies every
rounding error by :math:`1/\gamma_t` per step, so reversing the float
dynamics loses :math:`\theta_0` after a few dozen steps (at :math:`\gamma = 0.5`
float32 gains a factor 2 per step). Following §2.3 of the paper, :math:`\theta`
and :math:`v` are held as integers in fixed point, value :math:`= z\,2^{-F}`
(``fraction_bits`` :math:`F`, 44 by default: resolution :math:`2^{-44} \approx
5.7\times10^{-14}`, representable range :math:`|x| < 2^{62-F} = 262\,144`; an
``OverflowError`` names the step and the fix when a value would leave it).

- Adding :math:`\alpha_t v_{t+1}` to :math:`\theta` and :math:`(1-\gamma_t) g_t` to
  :math:`v` adds the increment rounded to the grid; the reverse pass recomputes
  the same increment from the same state, bit for bit, and subtracts it.
- Multiplying by :math:`\gamma_t` discards information. The momentum is
  replaced by the rational :math:`\gamma_t = n_t/d`, :math:`d = 2^D`
  (``momentum_bits`` :math:`D`, 30 by default; :func:`quantize_momentum`), and the
  product :math:`z \mapsto \lfloor (z\,n + r)/d \rfloor` is made a bijection by an
  *information buffer* :math:`B` per parameter, an arbitrary-precision integer
  used as a stack in mixed radix (arithmetic coding): pop
  :math:`r = B \bmod n`, :math:`B \leftarrow \lfloor B/n \rfloor` (radix :math:`n`),
  then push the remainder :math:`(z\,n + r) \bmod d` with
  :math:`B \leftarrow B\,d + \text{remainder}` (radix :math:`d`). The reverse pass pops
  the remainder, rebuilds :math:`z\,n + r`, and pushes :math:`r` back. The buffer
  grows by :math:`\log_2(d/n) = \log_2(1/\gamma_t)` bits per parameter per step
  (plus a constant :math:`\le D + \log_2\frac{1}{1-\gamma} + 1` bits), the
  information the momentum decay destroys. It is a NumPy object array of
  Python integers; the fixed-point state is vectorised in ``int64``.

The computed hypergradient is the exact derivative of the float dynamics,
evaluated along the fixed-point trajectory (which differs from the float64
trajectory by about :math:`\eta\, 2^{-F}`), with :math:`\gamma_t` the quantised
momentum (within :math:`2^{-D-1}` of the one given).

References
----------
D. Maclaurin, D. Duvenaud, R. Adams. Gradient-based hyperparameter optimization
through reversible learning. ICML 2015 (Algorithm 2; §2.3, exact representation).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from ..util.stacklevel import find_stack_level

#: ``loss(theta, hyper, step) -> scalar``: the inner training loss at inner step ``step``.
LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
#: ``gradient(theta, hyper, step)``: the gradient of a ``LossFn`` in theta, computed another way.
GradientFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
#: ``objective(theta, hyper) -> scalar``: the quality :math:`Q` the hyperparameters minimise.
ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A schedule: one value per inner step.
Schedule = Union[torch.Tensor, Sequence[float]]

#: Default fractional bits :math:`F` of the fixed-point weights and velocities.
FRACTION_BITS = 44
#: Default :math:`D`: the momentum is the rational :math:`n / 2^D`.
MOMENTUM_BITS = 30
#: Fixed-point integers stay below this in magnitude (headroom for one addition in int64).
_INT_LIMIT = 2**62


class ReconstructionWarning(UserWarning):
    """The reverse pass of :func:`rmad` did not end exactly on the initial state.

    The loss gave a different gradient when evaluated again at the same
    weights and step (it is not deterministic: seed its noise from ``step``),
    so the reconstructed trajectory and the hypergradient are off.
    """


@dataclass
class Hypergradient:
    r"""Gradient of :math:`Q(\theta_\eta, h)` through :math:`\eta` inner steps of SGD with momentum.

    Attributes
    ----------
    objective : float
        :math:`Q(\theta_\eta, h)`.
    theta : torch.Tensor
        :math:`\theta_\eta`, the final weights.
    hyper : torch.Tensor
        :math:`dQ/dh`, same shape as ``h``.
    lr : torch.Tensor
        :math:`dQ/d\alpha_t`, shape ``(η,)``.
    momentum : torch.Tensor
        :math:`dQ/d\gamma_t`, shape ``(η,)``.
    theta0 : torch.Tensor
        :math:`dQ/d\theta_0`.
    diagnostics : dict
        Method-specific figures (for :func:`rmad`: buffer size, reconstruction,
        timings).
    """

    objective: float
    theta: torch.Tensor
    hyper: torch.Tensor
    lr: torch.Tensor
    momentum: torch.Tensor
    theta0: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- validation

def _as_schedule(value: Schedule, name: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(
        value, dtype=torch.float64)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(
            f"{name} must be a 1-D tensor with one value per inner step (length η ≥ 1); got "
            f"shape {tuple(tensor.shape)}. For a constant schedule pass "
            f"torch.full((num_steps,), value).")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor; got {tensor.dtype}. "
                         f"Convert it with {name}.double().")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} has non-finite entries; every step needs a finite value.")
    return tensor


def check_schedules(lr: Schedule, momentum: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Check the learning-rate and momentum schedules of :func:`sgd_momentum`.

    Parameters
    ----------
    lr : tensor of shape ``(η,)``
        :math:`\alpha_t > 0`.
    momentum : tensor of shape ``(η,)``
        :math:`\gamma_t \in (0, 1)`.

    Returns
    -------
    (lr, momentum) : tuple of tensors
        As given (sequences become float64 tensors; graphs are kept).

    Raises
    ------
    ValueError
        Naming the argument, for a wrong shape or dtype, a length mismatch, a
        non-finite value, :math:`\alpha_t \le 0` or :math:`\gamma_t \notin (0, 1)`.
    """
    lr = _as_schedule(lr, "lr")
    momentum = _as_schedule(momentum, "momentum")
    if momentum.shape != lr.shape:
        raise ValueError(
            f"momentum has {momentum.numel()} entries but lr has {lr.numel()}: both schedules "
            "need one value per inner step (the same length η).")
    if bool((lr <= 0).any()):
        raise ValueError(f"lr must be > 0 at every step; step {int((lr <= 0).nonzero()[0])} "
                         f"has {float(lr[(lr <= 0)][0])}.")
    _check_momentum(momentum)
    return lr, momentum


def _check_momentum(momentum: torch.Tensor) -> torch.Tensor:
    bad = (momentum <= 0) | (momentum >= 1)
    if bool(bad.any()):
        step = int(bad.nonzero()[0])
        raise ValueError(
            f"momentum must lie in the open interval (0, 1) at every step; step {step} has "
            f"{float(momentum[step])}. (γ = 0 cannot be reversed; γ = 1 never forgets.)")
    return momentum


def check_vector(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` if a finite, floating, flat 1-D tensor; else a ValueError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (one flat 1-D vector); got "
                         f"{type(value).__name__}.")
    if value.dim() != 1 or not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a flat 1-D floating-point tensor; got shape "
                         f"{tuple(value.shape)} and dtype {value.dtype}. Flatten it with "
                         f"torch.cat([p.reshape(-1) for p in ...]).")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} has non-finite entries.")
    return value


def _check_bits(value: int, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}.")
    return int(value)


def quantize_momentum(momentum: Schedule, bits: int = MOMENTUM_BITS) -> torch.Tensor:
    r"""The momentum schedule as the exact rationals :math:`n_t / 2^D` that :func:`rmad` uses.

    Parameters
    ----------
    momentum : tensor of shape ``(η,)``
        :math:`\gamma_t \in (0, 1)`.
    bits : int
        :math:`D`, 1 to 30; :math:`n_t = \operatorname{round}(\gamma_t 2^D)`.

    Returns
    -------
    torch.Tensor
        float64 tensor of :math:`n_t / 2^D` (exact in float64), within :math:`2^{-D-1}`
        of ``momentum``.

    Raises
    ------
    ValueError
        When some :math:`\gamma_t` rounds to 0 or 1 at this precision.
    """
    bits = _check_bits(bits, "momentum_bits", 1, 30)
    momentum = _check_momentum(_as_schedule(momentum, "momentum"))
    numerators = _numerators(momentum, bits)
    return torch.as_tensor(numerators, dtype=torch.float64) / 2.0**bits


def _numerators(momentum: torch.Tensor, bits: int) -> np.ndarray:
    scaled = momentum.detach().double().cpu().numpy() * 2.0**bits
    numerators = np.rint(scaled).astype(np.int64)
    bad = (numerators <= 0) | (numerators >= 2**bits)
    if bad.any():
        step = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"momentum[{step}] = {float(momentum[step])} rounds to 0 or 1 with momentum_bits="
            f"{bits}; raise momentum_bits (at most 30) or keep γ within (2^-{bits}, "
            f"1 - 2^-{bits}).")
    return numerators


# ----------------------------------------------------------------------------- float dynamics

def sgd_momentum(loss: LossFn, theta0: torch.Tensor, hyper: torch.Tensor, lr: Schedule,
                 momentum: Schedule, *, create_graph: bool = False,
                 momentum_bits: int | None = None,
                 gradient: GradientFn | None = None) -> torch.Tensor:
    r""":math:`\theta_\eta` after :math:`\eta` steps of SGD with momentum, in plain float.

    .. math::

        v_{t+1} = \gamma_t v_t - (1-\gamma_t)\nabla_\theta L(\theta_t, h, t), \qquad
        \theta_{t+1} = \theta_t + \alpha_t v_{t+1}, \qquad v_0 = 0

    (Maclaurin, Duvenaud & Adams 2015).

    Parameters
    ----------
    loss : callable
        ``loss(theta, hyper, step) -> scalar tensor``, deterministic.
    theta0 : torch.Tensor
        Flat 1-D initial weights.
    hyper : torch.Tensor
        Flat 1-D hyperparameters passed to ``loss``.
    lr, momentum : tensors of shape ``(η,)``
        :math:`\alpha_t > 0` and :math:`\gamma_t \in (0, 1)`.
    create_graph : bool
        Keep the autograd graph through all the steps, so that the result is
        differentiable with respect to ``theta0``, ``hyper``, ``lr`` and
        ``momentum`` (plain reverse mode, memory :math:`O(\eta|\theta|)`).
        Otherwise the result is detached.
    momentum_bits : int, optional
        Use :func:`quantize_momentum` ``(momentum, momentum_bits)``, the momentum
        :func:`rmad` runs with (its derivative passes straight through).
    gradient : callable, optional
        ``gradient(theta, hyper, step)`` :math:`= \nabla_\theta L(\theta, h, t)`
        computed another way (a traced step, see
        :meth:`~pyro_structsel.hyper.hyperopt.HyperparameterProblem.gradient`),
        used instead of autograd through ``loss`` when ``create_graph`` is off.

    Returns
    -------
    torch.Tensor
        :math:`\theta_\eta`.
    """
    theta0 = check_vector(theta0, "theta0")
    hyper = check_vector(hyper, "hyper")
    lr, momentum = check_schedules(lr, momentum)
    if momentum_bits is not None:
        exact = quantize_momentum(momentum, momentum_bits).to(momentum)
        momentum = momentum + (exact - momentum).detach()
    if not create_graph:
        theta0, hyper = theta0.detach(), hyper.detach()
        lr, momentum = lr.detach(), momentum.detach()
    theta = theta0
    velocity = torch.zeros_like(theta0)
    for step in range(lr.numel()):
        if gradient is not None and not create_graph:
            grad = gradient(theta, hyper, step)
        else:
            with torch.enable_grad():
                point = theta if create_graph and theta.requires_grad \
                    else theta.detach().requires_grad_(True)
                value = _scalar(loss(point, hyper, step), "loss", step)
                (grad,) = torch.autograd.grad(value, point, create_graph=create_graph)
        if not create_graph:
            grad = grad.detach()
        velocity = momentum[step] * velocity - (1 - momentum[step]) * grad
        theta = theta + lr[step] * velocity
    return theta if create_graph else theta.detach()


def _scalar(value: Any, name: str, step: int | None = None) -> torch.Tensor:
    where = "" if step is None else f" at step {step}"
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor{where}; got "
                         f"{getattr(value, 'shape', type(value).__name__)}.")
    if not value.requires_grad:
        raise ValueError(f"{name} returned a value that does not depend on theta{where}; it "
                         "must be computed from its theta argument with torch operations.")
    return value.reshape(())


# ----------------------------------------------------------------------------- exact arithmetic

class InformationBuffer:
    r"""Per-parameter arbitrary-precision integers used as stacks in mixed radix.

    Step ``t`` of the forward pass, :meth:`multiply`, maps fixed-point integers
    :math:`z` to :math:`\lfloor (z\,n_t + r)/2^D \rfloor \approx z\,n_t/2^D`, popping
    :math:`r \in [0, n_t)` from the buffer (:math:`r = B \bmod n_t`,
    :math:`B \leftarrow \lfloor B/n_t \rfloor`) and pushing the remainder
    :math:`(z\,n_t + r) \bmod 2^D` (:math:`B \leftarrow 2^D B + \text{remainder}`);
    :meth:`divide` is its exact inverse, called for the steps in reverse order.
    Each step grows the buffer by :math:`\log_2(2^D/n_t)` bits per element.

    The buffer is a NumPy object array of Python integers; all else is int64.
    The arbitrary-precision operations, the slow part, are batched over *pairs*
    of steps :math:`(t, t+1)`: both pops come first (:math:`r_t = B \bmod n_t`
    and :math:`R = \lfloor B/n_t\rfloor \bmod n_{t+1}`, from which
    :math:`r_{t+1} = (R\,2^D + \text{remainder}_t) \bmod n_{t+1}` follows in int64),
    then one shift by :math:`2D` pushes both remainders; the reverse pass mirrors
    it with one multiplication by :math:`n_t n_{t+1}`: 6 instead of 8 passes over
    the object array per pair forward, 4 instead of 8 in reverse.

    Parameters
    ----------
    size : int
        Number of elements (parameters).
    numerators : sequence of int
        :math:`n_t \in [1, 2^D)`, one per step (see :func:`quantize_momentum`).
    bits : int
        :math:`D \le 30`, so that every intermediate fits in int64.
    """

    def __init__(self, size: int, numerators: Sequence[int], bits: int = MOMENTUM_BITS) -> None:
        self.bits = _check_bits(bits, "bits", 1, 30)
        self.mask = (1 << self.bits) - 1
        self.numerators = [int(n) for n in numerators]
        if any(not 0 < n < 2**self.bits for n in self.numerators):
            raise ValueError(f"numerators must lie in [1, 2^{self.bits}); see quantize_momentum.")
        self.store = np.zeros(size, dtype=object)
        self.store[:] = 0
        self.seconds = 0.0
        self._next = 0                 # the step multiply expects next (divide: _next - 1)
        self._pending: tuple[np.ndarray, np.ndarray] | None = None
        self._paired = True            # False: one step at a time (for measuring the gain)

    def _pairs_with_next(self, step: int) -> bool:
        return self._paired and step % 2 == 0 and step + 1 < len(self.numerators)

    def _mul(self, z: np.ndarray, n: int, popped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # z n + r = (z >> D) n 2^D + c, with c = (z & mask) n + r < 2^60
        carry = (z & self.mask) * n + popped
        return (z >> self.bits) * n + (carry >> self.bits), carry & self.mask

    def _div(self, z: np.ndarray, n: int, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # w = z 2^D + low = q n 2^D + e, with z = q n + s and e = s 2^D + low < 2^60
        quotient, rest = np.divmod(z, n)
        extra = (rest << self.bits) + low
        return (quotient << self.bits) + extra // n, extra % n

    def multiply(self, z: np.ndarray, step: int) -> np.ndarray:
        r"""Step ``step`` forward: :math:`z \mapsto \lfloor (z\,n + r)/2^D \rfloor`."""
        if step != self._next or step >= len(self.numerators):
            raise RuntimeError(f"multiply expects step {self._next}, got {step}.")
        start, n, bits = time.perf_counter(), self.numerators[step], self.bits
        if self._pending is not None:                      # second step of a pair
            residue, low = self._pending
            extra = (residue << bits) + low                # < n 2^D
            z, low = self._mul(z, n, extra % n)
            pushed = ((extra // n) << bits) | low           # < 2^(2D)
            self.store = (self.store << (2 * bits)) | pushed.astype(object)
            self._pending = None
        elif self._pairs_with_next(step):                  # first step of a pair
            # two single-digit divisions are faster in CPython than one by n n' >= 2^30
            popped = (self.store % n).astype(np.int64)
            self.store //= n
            residue = (self.store % self.numerators[step + 1]).astype(np.int64)
            self.store //= self.numerators[step + 1]
            z, low = self._mul(z, n, popped)
            self._pending = (residue, low)
        else:                                              # a last, unpaired step
            popped = (self.store % n).astype(np.int64)
            self.store //= n
            z, low = self._mul(z, n, popped)
            self.store = (self.store << bits) | low.astype(object)
        self._next += 1
        self.seconds += time.perf_counter() - start
        return z

    def divide(self, z: np.ndarray, step: int) -> np.ndarray:
        """Exact inverse of :meth:`multiply` at ``step``; steps go in reverse order."""
        if step != self._next - 1:
            raise RuntimeError(f"divide expects step {self._next - 1}, got {step}.")
        start, n, bits = time.perf_counter(), self.numerators[step], self.bits
        if self._paired and step % 2 == 1:                 # second step of a pair
            pushed = (self.store & ((1 << 2 * bits) - 1)).astype(np.int64)
            self.store >>= 2 * bits
            z, popped = self._div(z, n, pushed & self.mask)
            extra = (pushed >> bits) * n + popped
            self._pending = (extra >> bits, extra & self.mask)
        elif self._pending is not None:                    # first step of a pair
            residue, low = self._pending
            z, popped = self._div(z, n, low)
            modulus = n * self.numerators[step + 1]
            self.store = self.store * modulus + (residue * n + popped).astype(object)
            self._pending = None
        else:                                              # the unpaired last step
            low = (self.store & self.mask).astype(np.int64)
            self.store >>= bits
            z, popped = self._div(z, n, low)
            self.store = self.store * n + popped.astype(object)
        self._next -= 1
        self.seconds += time.perf_counter() - start
        return z

    def bit_lengths(self) -> np.ndarray:
        """Bits held per element."""
        return np.fromiter((int(b).bit_length() for b in self.store), dtype=np.int64,
                           count=self.store.size)

    def is_empty(self) -> bool:
        """Whether every element is back to zero."""
        return not bool(np.any(self.store != 0))


def _to_fixed(x: np.ndarray, factor: float, what: str, step: int, unit: float
              ) -> np.ndarray:
    """``round(x * factor)`` as int64, checked to stay in the fixed-point range."""
    scaled = x * factor
    if not np.all(np.isfinite(scaled)):
        raise ValueError(f"{what} is not finite at step {step}; lower lr or check the loss.")
    if scaled.size and float(np.max(np.abs(scaled))) >= _INT_LIMIT:
        _overflow(what, step, unit)
    return np.rint(scaled).astype(np.int64)


def _check_range(z: np.ndarray, what: str, step: int, unit: float) -> None:
    if z.size and int(np.max(np.abs(z))) >= _INT_LIMIT:
        _overflow(what, step, unit)


def _overflow(what: str, step: int, unit: float) -> None:
    raise OverflowError(
        f"{what} at step {step} leaves the fixed-point range |x| < 2^(62 - fraction_bits) = "
        f"{_INT_LIMIT * unit:.6g}; lower fraction_bits (a wider range, a coarser grid) or lr.")


class _Gradient:
    """``g_t`` at a fixed-point ``theta``, computed the same way in both passes (bit for bit)."""

    def __init__(self, loss: LossFn, hyper: torch.Tensor, like: torch.Tensor, unit: float
                 ) -> None:
        self.loss, self.hyper, self.unit = loss, hyper.detach(), unit
        self.dtype, self.device = like.dtype, like.device

    def tensor(self, z: np.ndarray) -> torch.Tensor:
        r"""The float tensor :math:`z\,2^{-F}` (in the dtype and on the device of theta0)."""
        return torch.from_numpy(z.astype(np.float64) * self.unit).to(self.device, self.dtype)

    def __call__(self, z: np.ndarray, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = self.tensor(z).requires_grad_(True)
        hyper = self.hyper.clone().requires_grad_(True)
        with torch.enable_grad():
            value = _scalar(self.loss(theta, hyper, step), "loss", step)
            (grad,) = torch.autograd.grad(value, theta, create_graph=True, allow_unused=True)
        if grad is None:                           # the loss does not depend on theta
            grad = torch.zeros_like(theta)
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(f"loss has a non-finite gradient at step {step}; lower lr.")
        return theta, hyper, grad


# ----------------------------------------------------------------------------- RMAD

def rmad(loss: LossFn, objective: ObjectiveFn, theta0: torch.Tensor, hyper: torch.Tensor,
         lr: Schedule, momentum: Schedule, *, fraction_bits: int = FRACTION_BITS,
         momentum_bits: int = MOMENTUM_BITS) -> Hypergradient:
    r"""Hypergradient of :math:`Q(\theta_\eta, h)` by exact reversal of SGD with momentum.

    Runs :math:`\eta` steps of :func:`sgd_momentum` forward in exact fixed-point
    arithmetic, then reverses them step by step (Maclaurin, Duvenaud & Adams
    2015, Algorithm 2), recomputing :math:`\theta_t` and :math:`v_t` bit for bit
    and accumulating :math:`dQ/dh`, :math:`dQ/d\alpha`, :math:`dQ/d\gamma` and
    :math:`dQ/d\theta_0` (see the module docstring for the maths). Memory is
    :math:`O(|\theta|)` plus about :math:`\log_2(1/\gamma_t)` bits per parameter
    per step in the information buffer.

    Parameters
    ----------
    loss : callable
        ``loss(theta, hyper, step) -> scalar tensor``, the inner loss :math:`L`.
        Must be a deterministic function of its arguments (seed any noise from
        ``step``): it is evaluated again in the reverse pass.
    objective : callable
        ``objective(theta, hyper) -> scalar tensor``, :math:`Q`.
    theta0 : torch.Tensor
        Flat 1-D initial weights :math:`\theta_0`.
    hyper : torch.Tensor
        Flat 1-D (unconstrained) hyperparameters :math:`h`.
    lr : tensor of shape ``(η,)``
        Learning rates :math:`\alpha_t > 0`.
    momentum : tensor of shape ``(η,)``
        Momenta :math:`\gamma_t \in (0, 1)`; used as :func:`quantize_momentum`
        ``(momentum, momentum_bits)``.
    fraction_bits : int
        :math:`F` (8 to 52): weights and velocities are integers times
        :math:`2^{-F}`, in the range :math:`|x| < 2^{62-F}`.
    momentum_bits : int
        :math:`D` (1 to 30): :math:`\gamma_t = n_t/2^D`.

    Returns
    -------
    Hypergradient
        ``diagnostics`` holds ``reconstruction_exact`` (the reverse pass ended on
        the fixed-point :math:`\theta_0`, :math:`v_0 = 0` and an empty buffer),
        ``theta0_reconstructed`` and ``v0_reconstructed`` (tensors rebuilt by the
        reverse pass), ``buffer_bits`` (total, after the forward pass),
        ``bits_per_parameter_step`` and ``ideal_bits_per_parameter_step``
        (:math:`\frac1\eta\sum_t \log_2(1/\gamma_t)`), ``buffer_bytes``,
        ``momentum_used``, ``theta0_rounding`` (largest
        :math:`|\theta_0 - \text{grid}(\theta_0)|`), ``forward_seconds``,
        ``reverse_seconds``, ``buffer_seconds``.

    Raises
    ------
    ValueError
        For malformed inputs (the message names the argument) or a non-finite loss
        gradient.
    OverflowError
        When a weight or velocity leaves the fixed-point range.
    """
    theta0 = check_vector(theta0, "theta0")
    hyper = check_vector(hyper, "hyper")
    lr, momentum = check_schedules(lr, momentum)
    fraction_bits = _check_bits(fraction_bits, "fraction_bits", 8, 52)
    momentum_bits = _check_bits(momentum_bits, "momentum_bits", 1, 30)
    numerators = _numerators(momentum, momentum_bits)
    gammas = numerators.astype(np.float64) / 2.0**momentum_bits   # exact
    alphas = lr.detach().double().cpu().numpy()
    scale, unit = 2.0**fraction_bits, 2.0**-fraction_bits
    dtype, num_steps = theta0.dtype, int(lr.numel())
    gradient = _Gradient(loss, hyper, theta0, unit)

    # ---- forward: exact fixed-point dynamics
    start = time.perf_counter()
    theta0_64 = theta0.detach().double().cpu().numpy()
    z_theta = _to_fixed(theta0_64, scale, "theta0", 0, unit)
    z_theta0 = z_theta.copy()
    residual = theta0_64 - z_theta.astype(np.float64) * unit       # exact: below the grid
    z_velocity = np.zeros_like(z_theta)
    buffer = InformationBuffer(z_theta.size, numerators, momentum_bits)
    for step in range(num_steps):
        _, _, grad = gradient(z_theta, step)
        grad64 = grad.detach().double().cpu().numpy()
        z_velocity = buffer.multiply(z_velocity, step)
        z_velocity = z_velocity - _to_fixed(grad64, (1.0 - gammas[step]) * scale,
                                            "(1 - momentum) * gradient", step, unit)
        _check_range(z_velocity, "velocity", step, unit)
        z_theta = z_theta + _to_fixed(z_velocity.astype(np.float64), alphas[step],
                                      "lr * velocity", step, unit)
        _check_range(z_theta, "theta", step, unit)
    bits = buffer.bit_lengths()
    forward_seconds = time.perf_counter() - start

    # ---- objective at theta_eta
    theta_final = gradient.tensor(z_theta)
    with torch.enable_grad():
        point = theta_final.clone().requires_grad_(True)
        h = hyper.detach().clone().requires_grad_(True)
        value = objective(point, h)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("objective must return a scalar tensor; got "
                             f"{getattr(value, 'shape', type(value).__name__)}.")
        d_theta, d_hyper = _grads(value.reshape(()), (point, h))

    # ---- reverse: Algorithm 2 on the exactly reconstructed trajectory
    start = time.perf_counter()
    d_velocity = torch.zeros_like(d_theta)
    d_lr = torch.zeros(num_steps, dtype=torch.float64, device=theta0.device)
    d_momentum = torch.zeros(num_steps, dtype=torch.float64, device=theta0.device)
    for step in reversed(range(num_steps)):
        v_next = gradient.tensor(z_velocity)
        d_lr[step] = torch.dot(d_theta.double(), v_next.double())
        z_theta = z_theta - _to_fixed(z_velocity.astype(np.float64), alphas[step],
                                      "lr * velocity", step, unit)
        point, h, grad = gradient(z_theta, step)
        grad64 = grad.detach().double().cpu().numpy()
        z_velocity = z_velocity + _to_fixed(grad64, (1.0 - gammas[step]) * scale,
                                            "(1 - momentum) * gradient", step, unit)
        z_velocity = buffer.divide(z_velocity, step)
        v_prev = gradient.tensor(z_velocity)
        d_velocity = d_velocity + alphas[step] * d_theta
        d_momentum[step] = torch.dot(d_velocity.double(), (v_prev + grad.detach()).double())
        if grad.requires_grad:
            hvp, mixed = _grads(grad, (point, h), d_velocity)
        else:                                      # loss linear in theta
            hvp, mixed = torch.zeros_like(d_theta), torch.zeros_like(d_hyper)
        d_theta = d_theta - (1.0 - gammas[step]) * hvp
        d_hyper = d_hyper - (1.0 - gammas[step]) * mixed
        d_velocity = gammas[step] * d_velocity
    reverse_seconds = time.perf_counter() - start

    exact = bool(np.array_equal(z_theta, z_theta0) and not np.any(z_velocity)
                 and buffer.is_empty())
    if not exact:
        warnings.warn(
            "rmad: the reverse pass did not rebuild the initial weights, velocity and buffer "
            "exactly, so the loss gave different gradients at the same weights and step. Make "
            "loss(theta, hyper, step) deterministic (seed its noise from step, e.g. "
            "torch.random.fork_rng() and torch.manual_seed(base + step)).",
            ReconstructionWarning, stacklevel=find_stack_level())
    total_bits = int(bits.sum())
    per_step = total_bits / max(z_theta.size, 1) / num_steps
    diagnostics = {
        "method": "rmad",
        "reconstruction_exact": exact,
        "theta0_reconstructed": torch.from_numpy(
            z_theta.astype(np.float64) * unit + residual).to(theta0.device, dtype),
        "v0_reconstructed": gradient.tensor(z_velocity),
        "buffer_bits": total_bits,
        "bits_per_parameter_step": per_step,
        "ideal_bits_per_parameter_step": float(np.mean(-np.log2(gammas))),
        "buffer_bytes": int((bits + 7).sum() // 8),
        "momentum_used": torch.from_numpy(gammas.copy()),
        "theta0_rounding": float(np.max(np.abs(residual))) if residual.size else 0.0,
        "fraction_bits": fraction_bits,
        "momentum_bits": momentum_bits,
        "forward_seconds": forward_seconds,
        "reverse_seconds": reverse_seconds,
        "buffer_seconds": buffer.seconds,
    }
    return Hypergradient(
        objective=float(value.detach()),
        theta=theta_final,
        hyper=d_hyper.detach().to(hyper.dtype),
        lr=d_lr.to(lr.dtype),
        momentum=d_momentum.to(momentum.dtype),
        theta0=d_theta.detach(),
        diagnostics=diagnostics,
    )


def _grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...],
           grad_output: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``autograd.grad`` with zeros for inputs the output does not depend on."""
    grads = torch.autograd.grad(output, inputs, grad_outputs=grad_output, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g.detach()
                 for g, x in zip(grads, inputs))


__all__ = [
    "FRACTION_BITS",
    "Hypergradient",
    "InformationBuffer",
    "MOMENTUM_BITS",
    "ReconstructionWarning",
    "check_schedules",
    "quantize_momentum",
    "rmad",
    "sgd_momentum",
]
