r"""One traced SVI step for any Pyro model and guide whose structure is static.

Pyro computes an ELBO step in Python: it runs the guide and the model under
effect handlers, builds their traces, sums the log densities and
backpropagates, several milliseconds of interpreter work per step even for a
small network. When the model's *structure* is static (the same sites,
shapes and tensor operations at every call; only the random draws and the
parameter values change), that work can be recorded once as a graph of
tensor operations and replayed at every step.

:class:`TracedELBO` records one evaluation of the −ELBO and its gradients
with ``torch.fx.experimental.proxy_tensor.make_fx``:

- **Parameters** are the graph's inputs. Every ``pyro.param`` statement
  (autoguides and ``PyroModule`` parameters included) reads
  :math:`\mathrm{transform\_to}(c)(u)` of the unconstrained tensor :math:`u`,
  as Pyro's param store does, and the graph returns
  :math:`\partial(-\mathrm{ELBO}) / \partial u`.
- **Random draws** (the guide's noise, the minibatch of a subsampled
  ``pyro.plate``, Dirichlet and Concrete draws) are operations of the graph
  that read torch's global generator at every replay: fresh noise at every
  step, the very draws Pyro's own step makes from the same generator state,
  reproducible from the seed and through a checkpoint (which holds the
  generator state).
- **Constants**: whatever depends on neither a parameter nor a draw (the
  data and their checks, prior hyperparameters, plate scales
  :math:`N / |B|`) is computed once, while tracing.
- **The ELBO is Pyro's**: ``Trace_ELBO`` (model minus guide log densities)
  or ``TraceMeanField_ELBO`` (analytic KL where torch has it), summed over
  the traces that Pyro's own ``ELBO._get_traces`` builds, vectorised
  particles included.

The recorded graph must give Pyro's loss on the same draws (checked once,
from one generator state). It is then simplified (constant folding, common
subexpressions, no-op arithmetic, direct torch calls), and the simplified
graph must give bit for bit the outputs of the recorded one, or the recorded
one is used. :meth:`TracedELBO.compile` compiles it with ``torch.compile``
(inductor, with eager random number generation so that the draws stay
Pyro's).

A model whose structure is not static is detected, and
:class:`NotTraceableError` says why; :func:`~pyro_structsel.infer.svi.fit`
then fits it with Pyro's own ELBO:

- Python control flow on the value of a draw or a parameter (``if gamma[0] >
  0.5``, ``int(n)``): tracing fails on it;
- sites, shapes or plates that differ between calls: three calls are compared;
- draws from Python's ``random`` or NumPy, which the graph cannot replay:
  their generator states are compared before and after two calls;
- a guide site that is not reparameterised (it needs a score-function term).

What the graph freezes and Pyro's step would re-read: Python values and
tensors that are neither parameters nor draws, if they change during the fit
(a model attribute changed by a callback, a tensor updated in place). The
temperature of the structure guides, which a fit may anneal, is an input of
the graph.
"""

from __future__ import annotations

import random
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributions import kl_divergence, transform_to
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

_aten = torch.ops.aten

#: Seconds ``torch.compile`` takes per node of the simplified graph, cold (no inductor cache),
#: measured on the project's shared 2-core VM: 283 nodes in 27 s (benchmarks/speed.py).
COMPILE_SECONDS_PER_NODE = 0.1
#: Time of a compiled step over a traced one, measured there: 0.43-0.54 (benchmarks/speed.py).
COMPILED_STEP_FRACTION = 0.5
#: Traced steps a fit times before it decides whether compiling pays (``compile=None``).
AUTO_COMPILE_TIMED_STEPS = 20
#: Fewest remaining steps for which ``fit(fast=None)`` traces: tracing (with its checks)
#: takes as long as 70-300 of Pyro's steps and saves 60-80 % of each (benchmarks/speed.py).
TRACE_MIN_STEPS = 200


class NotTraceableError(RuntimeError):
    """The model and guide cannot be replayed from one traced graph (the message says why)."""


# ----------------------------------------------------------------------------- tracing


class _SubstituteParams(Messenger):
    """``pyro.param`` reads ``transform_to(constraint)(u)`` of the given unconstrained ``u``."""

    def __init__(self, unconstrained: Mapping[str, torch.Tensor],
                 constraints: Mapping[str, Any]) -> None:
        super().__init__()
        self.unconstrained = unconstrained
        self.constraints = constraints

    def _pyro_param(self, msg: Any) -> None:
        name = msg["name"]
        if name not in self.unconstrained:
            raise NotTraceableError(f"the parameter {name!r} is read while tracing but not "
                                    "by the calls before")
        unconstrained = self.unconstrained[name]
        value = transform_to(self.constraints[name])(unconstrained)
        value.unconstrained = weakref.ref(unconstrained)  # as the param store's values have
        msg["value"] = value
        msg["done"] = True


class _ComputeConstantsNow(TorchDispatchMode):
    """Run every operation that reads no input and draws nothing at once, outside the graph.

    Its result becomes a constant of the graph, and Python may read its
    value (a check of the data, a size): only a value that depends on a
    parameter or on a draw makes tracing fail.
    """

    def __init__(self, inputs: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.variable = WeakIdKeyDictionary({tensor: True for tensor in inputs})

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if (torch.Tag.nondeterministic_seeded in func.tags
                or any(tensor in self.variable for tensor in tensors)):
            out = func(*args, **kwargs)
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.variable[tensor] = True
            for arg, info in zip(args, func._schema.arguments):  # written in place
                if isinstance(arg, torch.Tensor) and info.alias_info is not None \
                        and info.alias_info.is_write:
                    self.variable[arg] = True
            return out
        with disable_proxy_modes_tracing():
            return func(*args, **kwargs)


def particle_elbo(model_trace: Any, guide_trace: Any, *, analytic_kl: bool) -> Any:
    """The ELBO of one (possibly vectorised) particle, as Pyro's ELBOs sum it.

    ``analytic_kl``: ``TraceMeanField_ELBO``'s estimator (closed-form
    :math:`\\mathrm{KL}(q \\| p)` per latent site where torch has it, Monte
    Carlo otherwise); else ``Trace_ELBO``'s. The traces must come from
    ``get_importance_trace`` (log densities and score parts computed) and the
    guide must be reparameterised. Unlike Pyro's, no ``.item()`` is called.
    """
    elbo: Any = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"] or not analytic_kl:
            elbo = elbo + site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        try:
            kl = kl_divergence(guide_site["fn"], site["fn"])
        except NotImplementedError:
            elbo = elbo + site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
            continue
        kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
        elbo = elbo - (kl.sum() if torch.is_tensor(kl)
                       else kl * torch.Size(guide_site["fn"].batch_shape).numel())
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and (not analytic_kl or name not in model_trace.nodes):
            elbo = elbo - site["score_parts"].entropy_term.sum()
    return elbo


def _signature(model_trace: Any, guide_trace: Any) -> list[tuple[Any, ...]]:
    """What must not change between calls: every site's name, kind, family, shape and plates."""
    out = []
    for which, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] not in ("sample", "param"):
                continue
            plates = tuple((frame.name, frame.size, frame.dim)
                           for frame in site.get("cond_indep_stack", ()))
            out.append((which, name, site["type"], type(site.get("fn")).__name__,
                        tuple(site["value"].shape), bool(site.get("is_observed")), plates))
    return out


def _first_difference(first: list[tuple[Any, ...]], second: list[tuple[Any, ...]]) -> str:
    fields = ("kind", "distribution", "shape", "observed", "plates")
    for a, b in zip(first, second):
        if a[:2] != b[:2]:
            return (f"the {a[0]} has site {a[1]!r} in one call and {b[0]} site {b[1]!r} in "
                    "its place in another")
        for field, x, y in zip(fields, a[2:], b[2:]):
            if x != y:
                return f"the {a[0]} site {a[1]!r} has {field} {x} in one call and {y} in another"
    longer = first if len(first) > len(second) else second
    extra = longer[min(len(first), len(second))]
    return f"the {extra[0]} site {extra[1]!r} appears in one call and not in another"


def _python_generators() -> tuple[Any, bytes]:
    return random.getstate(), np.random.get_state()[1].tobytes()


def _user_line(error: BaseException) -> str:
    """The innermost frame of ``error``'s traceback outside torch, pyro and this module."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/pyro/" not in path and not path.endswith(
                "infer/traced.py"):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "a line inside torch or pyro"


# ----------------------------------------------------------------------------- simplification


def _written(graph: torch.fx.Graph) -> set[Node]:
    """The nodes that some operation of ``graph`` writes in place."""
    out = set()
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            for arg, info in zip(node.args, node.target._schema.arguments):
                if isinstance(arg, Node) and info.alias_info is not None \
                        and info.alias_info.is_write:
                    out.add(arg)
    return out


#: Operations that read only the shape and dtype of their tensor argument.
_SHAPE_ONLY = {_aten.ones_like.default, _aten.zeros_like.default, _aten.new_zeros.default,
               _aten.new_ones.default, _aten.full_like.default}


def _is_pure(node: Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def _fold_constants(gm: GraphModule) -> None:
    """Evaluate once every pure operation whose inputs are constants (or only their shapes)."""
    graph = gm.graph
    written = _written(graph)
    constants: dict[Node, torch.Tensor] = {}
    count = sum(1 for name, _ in gm.named_buffers() if name.startswith("_folded"))
    for node in list(graph.nodes):
        if node.op == "get_attr":
            constants[node] = getattr(gm, node.target)  # type: ignore[arg-type]
            continue
        if not _is_pure(node) or node in written:
            continue
        shape_only = node.target in _SHAPE_ONLY
        if not all(arg in constants or (shape_only and "tensor_meta" in arg.meta)
                   for arg in node.all_input_nodes):
            continue

        def value_of(arg: Node) -> torch.Tensor:
            if arg in constants:
                return constants[arg]
            meta = arg.meta["tensor_meta"]  # a shape-only operation reads no value
            return torch.empty(meta.shape, dtype=meta.dtype)

        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value_of)
        with torch.no_grad():
            value = node.target(*args, **kwargs)  # type: ignore[operator]
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded{count}"
        count += 1
        gm.register_buffer(name, value, persistent=False)
        with graph.inserting_before(node):
            folded = graph.get_attr(name)
        folded.meta = dict(node.meta)
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
        constants[folded] = value
    graph.eliminate_dead_code()


def _is_number(arg: Any, value: float) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool) and arg == value


def _same_value(node: Node) -> Node | None:
    """The node whose value ``node`` repeats (x·1, x/1, x±0, x¹, −(−x), ...), if any."""
    target, args = node.target, node.args
    source = args[0] if args and isinstance(args[0], Node) else None
    if source is None:
        return None
    meta = source.meta.get("tensor_meta")
    if target is _aten.detach.default:
        return source
    if target in (_aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor, _aten.div.Scalar,
                  _aten.pow.Tensor_Scalar) and _is_number(args[1], 1):
        return source
    if target in (_aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor, _aten.sub.Scalar) \
            and _is_number(args[1], 0) and not node.kwargs:
        return source
    if target is _aten.neg.default and source.target is _aten.neg.default \
            and isinstance(source.args[0], Node):
        return source.args[0]
    if target is _aten.expand.default and meta is not None and list(meta.shape) == list(args[1]):
        return source
    if target is _aten.sum.default and not node.kwargs and meta is not None and meta.shape == ():
        return source
    return None


def _drop_no_ops(gm: GraphModule) -> int:
    """Remove operations that repeat a value; ``0 - x`` becomes ``-x``. Returns how many."""
    graph = gm.graph
    written = _written(graph)
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.rsub.Scalar and len(node.args) == 2 \
                and _is_number(node.args[1], 0) and not node.kwargs:
            with graph.inserting_before(node):
                negated = graph.call_function(_aten.neg.default, (node.args[0],))
            negated.meta = dict(node.meta)
            node.replace_all_uses_with(negated)
            graph.erase_node(node)
            changed += 1
            continue
        same = _same_value(node)
        if same is None or node in written or same in written:
            continue
        before, after = same.meta.get("tensor_meta"), node.meta.get("tensor_meta")
        if before is None or after is None or before.shape != after.shape \
                or before.dtype != after.dtype:
            continue
        node.replace_all_uses_with(same)
        graph.erase_node(node)
        changed += 1
    graph.eliminate_dead_code()
    return changed


def _propagate_shapes(gm: GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    with torch.random.fork_rng(devices=[]):
        ShapeProp(gm).propagate(*inputs)


def simplify_graph(gm: GraphModule, inputs: Sequence[torch.Tensor]) -> GraphModule:
    """A simplified copy of the aten graph ``gm``: constants folded, no-ops and repeats removed.

    ``inputs`` are example inputs (shapes are propagated with them, without
    touching the random generator's state).
    """
    gm = GraphModule(gm, gm.graph.__deepcopy__())
    gm.graph.eliminate_dead_code()
    for _ in range(2):  # a second round catches what the first one uncovered
        _propagate_shapes(gm, inputs)
        _fold_constants(gm)
        _propagate_shapes(gm, inputs)
        changed = _drop_no_ops(gm)
        gm.recompile()
        gm = CSEPass()(gm).graph_module
        if not changed:
            break
    return gm


def direct_calls(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` calling ``torch.f(...)`` or ``x.f(...)`` for ``aten.f.overload(...)``.

    The same kernels through torch's Python bindings, about 1 µs faster per
    call than through the operator overload objects.
    """
    gm = GraphModule(gm, gm.graph.__deepcopy__())
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        name = target.overloadpacket.__name__
        if name in ("index", "slice"):  # differ from their aten operators
            continue
        function = getattr(torch, name, None)
        if callable(function) and not isinstance(function, type):
            node.target = function
        elif hasattr(torch.Tensor, name):
            node.op, node.target = "call_method", name
    gm.recompile()
    return gm


def same_outputs(first: Callable[..., Any], second: Callable[..., Any],
                 inputs: Sequence[torch.Tensor]) -> bool:
    """Whether ``first(*inputs)`` and ``second(*inputs)`` are bit for bit equal on one draw."""
    with torch.random.fork_rng(devices=[]):
        state = torch.get_rng_state()
        try:
            a = tree_flatten(first(*inputs))[0]
            torch.set_rng_state(state)
            b = tree_flatten(second(*inputs))[0]
        except Exception:  # noqa: BLE001 -- a rewrite that fails to run is not equal
            return False
    return len(a) == len(b) and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the ELBO


def _unconstrained(names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The param store's unconstrained tensors of ``names`` (as they are now)."""
    store = dict(pyro.get_param_store().named_parameters())
    return {name: store[name] for name in names}


def _check_elbo(elbo: Any) -> None:
    particle = getattr(type(elbo), "_differentiable_loss_particle", None)
    if not isinstance(elbo, Trace_ELBO) or particle not in (
            Trace_ELBO._differentiable_loss_particle,
            TraceMeanField_ELBO._differentiable_loss_particle) \
            or type(elbo).differentiable_loss is not Trace_ELBO.differentiable_loss:
        raise NotTraceableError(f"{type(elbo).__name__} is not traced (Trace_ELBO and "
                                "TraceMeanField_ELBO are)")


class TracedELBO:
    r"""Pyro's −ELBO and its gradients, replayed from one traced graph.

    It has the part of Pyro's ELBO interface that
    :func:`~pyro_structsel.infer.svi.fit` uses: :meth:`loss_and_grads`
    accumulates :math:`\partial(-\mathrm{ELBO})/\partial u` into the
    ``.grad`` of the param store's unconstrained tensors :math:`u` and
    returns the loss; :meth:`parameters_read` names those tensors.

    Parameters
    ----------
    model, guide : callable
        The model and the guide (its parameters must exist: call it once first).
    args, kwargs
        Their arguments, the same at every step.
    elbo : Trace_ELBO or TraceMeanField_ELBO
        The stock ELBO replaced: its estimator (analytic KL for
        ``TraceMeanField_ELBO``), particles, vectorisation and plate nesting.
    temperatures : sequence, optional
        Objects whose ``temperature`` attribute the guide reads and a fit
        may change between steps (:class:`~pyro_structsel.AutoStructure`
        parts): the graph takes them as inputs instead of freezing them.

    The 1st, 10th, 100th, ... step is a spot check: Pyro's ELBO recomputes
    the loss from the same generator state. If the two differ (the model
    reads something that changed since tracing), that step leaves no
    gradient, restores the generator and sets :attr:`changed` to the reason,
    so that the caller redoes the step with Pyro's ELBO.

    Attributes
    ----------
    changed : str or None
        Why the last spot check failed, or ``None``.
    spot_checked : bool
        Whether the last step was a spot check (and so took longer).
    trace_seconds, compile_seconds : float
        Seconds spent tracing (with the checks and simplification) and
        compiling (``None`` until :meth:`compile`).
    num_nodes : int
        Operations in the graph replayed.

    Raises
    ------
    NotTraceableError
        If the model and guide cannot be replayed from one graph (see the
        module docstring); the message says why.

    Example
    -------
    >>> traced = TracedELBO(model, guide, (x, y), elbo=pyro.infer.Trace_ELBO())
    >>> loss = traced.loss_and_grads(model, guide, x, y)
    """

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple = (),
                 kwargs: Mapping[str, Any] | None = None, *, elbo: Trace_ELBO,
                 temperatures: Sequence[Any] = ()) -> None:
        _check_elbo(elbo)
        self.model, self.guide, self.elbo = model, guide, elbo
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.analytic_kl = isinstance(elbo, TraceMeanField_ELBO)
        self.temperatures = [part for part in temperatures
                             if getattr(part, "temperature", None) is not None]
        self.compile_seconds: float | None = None
        self.calls = 0
        self.spot_checked = False
        self.changed: str | None = None
        self._read: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            self._build()
        self.trace_seconds = time.perf_counter() - start

    # -- building ---------------------------------------------------------------------------
    def _traces(self) -> Iterable[tuple[Any, Any]]:
        return self.elbo._get_traces(self.model, self.guide, self.args, self.kwargs)

    def _probe(self) -> tuple[list[str], list[tuple[Any, ...]]]:
        """One call of Pyro's ELBO: the parameters it reads, in order, and the site signature."""
        signature: list[tuple[Any, ...]] = []
        with poutine.block(), torch.no_grad(), poutine.trace(param_only=True) as params:
            for model_trace, guide_trace in self._traces():
                signature += _signature(model_trace, guide_trace)
                for name, site in guide_trace.nodes.items():
                    if site["type"] == "sample" and not site["is_observed"] \
                            and not is_identically_zero(site["score_parts"].score_function):
                        raise NotTraceableError(
                            f"the guide site {name!r} is not reparameterised (its gradient "
                            "needs a score-function term)")
        return list(params.trace.nodes), signature

    def _build(self) -> None:
        generators = _python_generators()
        names, signature = self._probe()
        names_again, signature_again = self._probe()
        if _python_generators() != generators:
            raise NotTraceableError("the model or guide draws from Python's random or NumPy's "
                                    "generator, which a traced graph cannot replay (draw with "
                                    "torch instead)")
        if signature_again != signature:
            raise NotTraceableError(_first_difference(signature, signature_again))
        if names_again != names:
            raise NotTraceableError("the parameters read differ between calls")
        constraints = pyro.get_param_store().get_state()["constraints"]
        traced_signature: list[tuple[Any, ...]] = []
        used: list[int] = []  # the parameters with a gradient
        num_params = len(names)

        def loss_and_grads(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params, temperatures = flat[:num_params], flat[num_params:]
            saved = [part.temperature for part in self.temperatures]
            try:
                for part, value in zip(self.temperatures, temperatures):
                    part.temperature = value
                with _SubstituteParams(dict(zip(names, params)), constraints), \
                        pyro.validation_enabled(False), _ComputeConstantsNow(flat):
                    surrogate: Any = 0.0
                    for model_trace, guide_trace in self._traces():
                        traced_signature.extend(_signature(model_trace, guide_trace))
                        surrogate = surrogate - particle_elbo(
                            model_trace, guide_trace,
                            analytic_kl=self.analytic_kl) / self.elbo.num_particles
            finally:
                for part, value in zip(self.temperatures, saved):
                    part.temperature = value
            if not isinstance(surrogate, torch.Tensor) or not surrogate.requires_grad:
                raise NotTraceableError("the −ELBO depends on no parameter")
            grads = torch.autograd.grad(surrogate, params, allow_unused=True)
            used[:] = [i for i, grad in enumerate(grads) if grad is not None]
            return (surrogate.detach(), *(grads[i] for i in used))

        # the store's own tensors: a module that uses its nn.Parameter directly (AutoDiagonalNormal,
        # pyro.module) reads the very tensor traced as the input
        current = _unconstrained(names)
        inputs = [*(current[name] for name in names), *self._temperature_inputs()]
        try:
            # one fake-tensor mode for the whole trace (make_fx makes one per operation otherwise)
            with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
                recorded = make_fx(loss_and_grads)(*inputs)
        except NotTraceableError:
            raise
        except Exception as error:  # noqa: BLE001 -- whatever fails, Pyro's ELBO remains
            message = str(error)
            if "_local_scalar_dense" in message or "data-dependent" in message:
                raise NotTraceableError(
                    "Python control flow reads the value of a random draw or of a parameter "
                    f"(a branch, .item(), int(), bool()) at {_user_line(error)}") from error
            first = message.splitlines()[0][:200] if message else ""
            raise NotTraceableError(f"tracing failed ({type(error).__name__}: {first})"
                                    ) from error
        if traced_signature != signature:
            raise NotTraceableError(_first_difference(signature, traced_signature))
        inputs = [tensor.detach() for tensor in inputs]
        self._check_against_pyro(recorded, inputs, names, used)
        simple = simplify_graph(recorded, inputs)
        self._aten_graph = simple if same_outputs(recorded, simple, inputs) else recorded
        direct = direct_calls(self._aten_graph)
        self._graph = direct if same_outputs(recorded, direct, inputs) else self._aten_graph
        self._step: Callable[..., Any] = self._graph
        self.names, self._used = names, list(used)
        self.num_nodes = len(self._graph.graph.nodes)

    def _check_against_pyro(self, graph: GraphModule, inputs: list[torch.Tensor],
                            names: list[str], used: list[int]) -> None:
        """The traced −ELBO and gradients must be Pyro's on the same draws (one generator state).

        Gradients agree to 1e-4 of each tensor's largest entry (bit for bit,
        in practice, except for the order of sums over particles).
        """
        params = _unconstrained(names)
        with torch.random.fork_rng(devices=[]):
            state = torch.get_rng_state()
            with poutine.block():
                surrogate = self.elbo.differentiable_loss(self.model, self.guide, *self.args,
                                                          **self.kwargs)
            expected = torch.autograd.grad(surrogate, list(params.values()), allow_unused=True)
            surrogate = surrogate.detach()
            torch.set_rng_state(state)
            with torch.no_grad():
                loss, *grads = graph(*inputs)
        if not _agree(loss, surrogate, 1e-5):
            raise NotTraceableError(f"the traced −ELBO ({float(loss)}) differs from Pyro's on "
                                    f"the same draws ({float(surrogate)})")
        got: list[torch.Tensor | None] = [None] * len(names)
        for index, grad in zip(used, grads):
            got[index] = grad
        for name, mine, theirs in zip(names, got, expected):
            if (mine is None) != (theirs is None) or (
                    mine is not None and theirs is not None and not _agree(mine, theirs, 1e-4)):
                raise NotTraceableError(f"the traced gradient of the parameter {name!r} "
                                        "differs from Pyro's on the same draws")

    def _temperature_inputs(self) -> list[torch.Tensor]:
        return [torch.tensor(float(part.temperature)) for part in self.temperatures]

    # -- running ----------------------------------------------------------------------------
    def compile(self) -> float:
        """Compile the graph with ``torch.compile`` (inductor); returns the seconds it took.

        Random numbers are drawn as in eager mode (inductor's
        ``fallback_random``, at every compilation of this graph), so the
        compiled step makes the same draws as the traced one and as Pyro's.
        The first call, which compiles, runs as the steps do (without
        autograd) on a copy of the generator state: the fit's stream is
        untouched.
        """
        start = time.perf_counter()
        compiled = torch.compile(GraphModule(self._aten_graph,
                                             self._aten_graph.graph.__deepcopy__()),
                                 fullgraph=True, dynamic=False,
                                 options={"fallback_random": True})
        current = _unconstrained(self.names)
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), torch.no_grad():
            # torch's own deprecations inside inductor are not the caller's business
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category, module=r"torch(\.|$)")
            compiled(*(current[name].detach() for name in self.names),
                     *self._temperature_inputs())
        self._step = compiled
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    @property
    def compiled(self) -> bool:
        """Whether the steps run the compiled graph."""
        return self.compile_seconds is not None

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> float:
        """The −ELBO estimate; its gradients are accumulated into the parameters' ``.grad``.

        ``model``, ``guide`` and the arguments are those it was traced with
        (they are not read again).
        """
        params = _unconstrained(self.names)
        tensors = list(params.values())
        self.calls += 1
        self.spot_checked = _is_power_of_ten(self.calls)
        before = torch.get_rng_state() if self.spot_checked else None
        with torch.no_grad():
            loss, *grads = self._step(*(p.detach() for p in tensors),
                                      *self._temperature_inputs())
        self._read = params
        if before is not None:
            self.changed = self._spot_check(float(loss), before)
            if self.changed is not None:  # no gradient, and the draws are left to Pyro's step
                torch.set_rng_state(before)
                return float(loss)
        for index, grad in zip(self._used, grads):
            param = tensors[index]
            if param.grad is None:
                param.grad = grad
            else:
                param.grad += grad
        return float(loss)

    def _spot_check(self, loss: float, before: torch.Tensor) -> str | None:
        """Why the traced loss is not Pyro's on the same draws (``None`` if it is)."""
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        try:
            with poutine.block(), torch.no_grad():
                expected = self.elbo.loss(self.model, self.guide, *self.args, **self.kwargs)
        finally:
            torch.set_rng_state(after)
        if _agree(torch.tensor(loss), torch.tensor(expected), 1e-4):
            return None
        return (f"at its step {self.calls} the traced −ELBO ({loss:.6g}) differs from Pyro's on "
                f"the same draws ({expected:.6g}): the model or guide reads a value that changed "
                "since it was traced (an attribute, a tensor changed in place)")

    def parameters_read(self) -> dict[str, torch.Tensor]:
        """Name → unconstrained tensor of every parameter the last step read."""
        return dict(self._read)


def _agree(mine: torch.Tensor, theirs: torch.Tensor, rtol: float) -> bool:
    """Equal to ``rtol`` of the largest finite entry, and non-finite at the same places.

    (Pyro's loss is NaN where the traced one is infinite: both only say that
    the fit is to stop.)
    """
    mine, theirs = mine.detach().double(), theirs.detach().double()
    finite = torch.isfinite(theirs)
    if not torch.equal(finite, torch.isfinite(mine)):
        return False
    if not bool(finite.any()):
        return True
    scale = float(theirs[finite].abs().max())
    return bool((mine[finite] - theirs[finite]).abs().max() <= rtol * max(1.0, scale))


def _is_power_of_ten(number: int) -> bool:
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1


def should_compile(num_nodes: int, traced_step_seconds: float, remaining_steps: int) -> bool:
    r"""Whether compiling pays: the time it saves exceeds the time it takes.

    Compiling is expected to take ``COMPILE_SECONDS_PER_NODE`` × ``num_nodes``
    seconds and to save ``1 − COMPILED_STEP_FRACTION`` of each of the
    ``remaining_steps`` traced steps (both measured on the project's 2-core
    VM, see ``benchmarks/speed.py``):

    .. math:: n_\text{remaining}\,(1 - f)\,t_\text{traced} > c\,n_\text{nodes}.
    """
    saved = remaining_steps * (1.0 - COMPILED_STEP_FRACTION) * traced_step_seconds
    return saved > COMPILE_SECONDS_PER_NODE * num_nodes
