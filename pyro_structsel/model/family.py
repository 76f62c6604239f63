r"""The graph family of networks and its mixed operations (plain ``torch.nn``).

A parametric family is a directed acyclic graph :math:`(V, E)`. Edge
:math:`(j, k)` carries K candidate basis functions :math:`g^{j,k}` mixed by
structural weights :math:`\gamma^{j,k}` on the simplex, and each node
aggregates its incoming edges:

.. math::

    f_0(x) = x, \qquad
    f_k(x) = \mathrm{agg}_k\bigl(\{\langle \gamma^{j,k}, g^{j,k}\rangle(f_j(x))
    : j \in \mathrm{Adj}(k)\}\bigr).

Everything here is an ordinary ``torch.nn.Module`` that runs without Pyro;
:class:`~pyro_structsel.BayesianModule` makes its parameters Gaussian latent
sites and each :class:`MixedOp` a structural site.

References
----------
O. Bakhteev, V. Strijov. Deep learning model selection of suboptimal
complexity. Automation and Remote Control, 2018.
H. Liu, K. Simonyan, Y. Yang. DARTS: differentiable architecture search. ICLR 2019.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..util.options import Aggregation, parse_option

#: Candidate activations by label.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}


def activation(label: str) -> nn.Module:
    """A fresh activation module by label; ``ValueError`` listing the known ones."""
    if label not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {label!r}; expected one of {', '.join(sorted(ACTIVATIONS))}."
        )
    return ACTIVATIONS[label]()


class MixedOp(nn.Module):
    r"""A convex mixture :math:`\sum_k \gamma_k g_k(x)` of candidate modules.

    :math:`\gamma` is the buffer ``gamma`` (uniform at construction);
    :class:`~pyro_structsel.BayesianModule` substitutes a sample of the
    structural site for it.

    Parameters
    ----------
    candidates : dict label → module, or sequence of modules
        K ≥ 2 candidates whose outputs have the same shape.
    name : str, optional
        Name of the structural site (default: the module's path).
    """

    def __init__(self, candidates: Mapping[str, nn.Module] | Sequence[nn.Module], *,
                 name: str | None = None) -> None:
        super().__init__()
        if isinstance(candidates, Mapping):
            labels = [str(label) for label in candidates]
            modules = list(candidates.values())
        else:
            modules = list(candidates)
            labels = [str(i) for i in range(len(modules))]
        if len(modules) < 2:
            raise ValueError(
                f"MixedOp {name or ''} needs at least two candidates, but got {len(modules)}."
            )
        if not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("Expected every candidate of a MixedOp to be a torch.nn.Module.")
        self.labels: tuple[str, ...] = tuple(labels)
        self.name = name
        self.candidates = nn.ModuleList(modules)
        self.register_buffer("gamma", torch.full((len(modules),), 1.0 / len(modules)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gamma[0] * self.candidates[0](x)
        for k in range(1, len(self.candidates)):
            out = out + self.gamma[k] * self.candidates[k](x)
        return out

    def chosen(self, option: str | int) -> nn.Module:
        """The candidate of ``option`` (label or index)."""
        index = self.labels.index(option) if isinstance(option, str) else int(option)
        return self.candidates[index]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, labels={self.labels}"


class GraphFamily(nn.Module):
    r"""A network on a DAG: a module (often a :class:`MixedOp`) on each edge.

    Nodes are integers; node 0 is the input and the largest node the output.
    Node :math:`k` aggregates :math:`\{e_{j,k}(f_j)\}` by ``"sum"``,
    ``"mean"`` or ``"concat"`` (along dimension 1: features or channels).

    Parameters
    ----------
    edges : dict (j, k) → module
        The edges and the function each computes.
    aggregation : str or dict node → str
        Aggregation at every node, or per node (default ``"sum"``).

    Example
    -------
    >>> family = GraphFamily({(0, 1): nn.Linear(4, 8),
    ...                       (1, 2): MixedOp({"relu": nn.ReLU(), "tanh": nn.Tanh()}),
    ...                       (2, 3): nn.Linear(8, 1)})
    """

    def __init__(self, edges: Mapping[tuple[int, int], nn.Module], *,
                 aggregation: str | Mapping[int, str] = "sum") -> None:
        super().__init__()
        if not edges:
            raise ValueError("A GraphFamily needs at least one edge.")
        for (j, k), module in edges.items():
            if not isinstance(module, nn.Module):
                raise ValueError(f"Edge ({j}, {k}) must carry a torch.nn.Module, got {module!r}.")
        self.edge_list: list[tuple[int, int]] = [(int(j), int(k)) for j, k in edges]
        self.edges = nn.ModuleDict({f"e{j}_{k}": m for (j, k), m in edges.items()})
        self.order = _topological_order(self.edge_list)
        self.output_node = self.order[-1]
        nodes = self.order[1:]
        if isinstance(aggregation, Mapping):
            unknown = set(aggregation) - set(nodes)
            if unknown:
                raise ValueError(f"aggregation names nodes {sorted(unknown)} that have no inputs.")
            agg = {k: parse_option(Aggregation, aggregation.get(k, "sum"), "aggregation")
                   for k in nodes}
        else:
            agg = {k: parse_option(Aggregation, aggregation, "aggregation") for k in nodes}
        self.aggregation = agg
        self.predecessors = {k: [j for j, kk in self.edge_list if kk == k] for k in nodes}

    def edge(self, j: int, k: int) -> nn.Module:
        """The module on edge ``(j, k)``."""
        return self.edges[f"e{j}_{k}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {0: x}
        for k in self.order[1:]:
            inputs = [self.edge(j, k)(values[j]) for j in self.predecessors[k]]
            rule = self.aggregation[k]
            if len(inputs) == 1 and rule is not Aggregation.CONCAT:
                values[k] = inputs[0]
            elif rule is Aggregation.SUM:
                values[k] = torch.stack(inputs).sum(0)
            elif rule is Aggregation.MEAN:
                values[k] = torch.stack(inputs).mean(0)
            else:
                values[k] = torch.cat(inputs, dim=1)
        return values[self.output_node]

    def depth(self) -> int:
        """Longest input-to-output path, counting the parameterised layers on each edge."""
        longest = {0: 0}
        for k in self.order[1:]:
            longest[k] = max(longest[j] + num_parameterised_layers(self.edge(j, k))
                             for j in self.predecessors[k])
        return longest[self.output_node]


def num_parameterised_layers(module: nn.Module) -> int:
    """Number of leaf modules that own parameters (layers composed, for a chain).

    The candidates of a :class:`MixedOp` are alternatives side by side, not a
    composition: it counts as its deepest candidate; a nested
    :class:`GraphFamily` counts as its :meth:`~GraphFamily.depth`.
    """
    if isinstance(module, MixedOp):
        return max(num_parameterised_layers(c) for c in module.candidates)
    if isinstance(module, GraphFamily):
        return module.depth()
    children = list(module.children())
    if not children:
        return int(any(True for _ in module.parameters(recurse=False)))
    return sum(num_parameterised_layers(child) for child in children)


def _topological_order(edges: list[tuple[int, int]]) -> list[int]:
    nodes = sorted({n for e in edges for n in e})
    if nodes[0] != 0:
        raise ValueError(f"The input node must be 0, but the smallest node is {nodes[0]}.")
    indegree = {n: 0 for n in nodes}
    for _, k in edges:
        indegree[k] += 1
    if indegree[0]:
        raise ValueError("The input node 0 must have no incoming edges.")
    ready = [n for n in nodes if indegree[n] == 0]
    if ready != [0]:
        raise ValueError(f"Nodes {ready[1:]} have no incoming edges; every node but 0 needs one.")
    order: list[int] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for j, k in edges:
            if j == n:
                indegree[k] -= 1
                if indegree[k] == 0:
                    ready.append(k)
    if len(order) != len(nodes):
        cyclic = sorted(set(nodes) - set(order))
        raise ValueError(f"The edges form a cycle through nodes {cyclic}; a family must be a DAG.")
    sinks = [n for n in nodes if not any(j == n for j, _ in edges)]
    if len(sinks) != 1:
        raise ValueError(f"A family needs exactly one output node, but nodes {sinks} have no "
                         "outgoing edges.")
    order.remove(sinks[0])
    order.append(sinks[0])
    return order


def derive_network(network: nn.Module, structure: Mapping[str, str | int]) -> nn.Module:
    """A copy of ``network`` with each :class:`MixedOp` replaced by its chosen candidate.

    Parameters
    ----------
    network : torch.nn.Module
        A network holding mixed operations.
    structure : dict
        Structural site name → option (label or index) for every mixed operation.
    """
    derived = copy.deepcopy(network)
    for path, op in list(_mixed_ops(derived).items()):
        site = op.name or path
        if site not in structure:
            raise ValueError(f"The structure has no option for mixed operation {site!r}.")
        replacement = op.chosen(structure[site])
        if path == "":
            return replacement
        parent_path, _, attr = path.rpartition(".")
        parent = derived.get_submodule(parent_path)
        if isinstance(parent, (nn.ModuleDict, nn.ModuleList, nn.Sequential)):
            parent._modules[attr] = replacement
        else:
            setattr(parent, attr, replacement)
    return derived


def _mixed_ops(network: nn.Module) -> dict[str, MixedOp]:
    return {path: m for path, m in network.named_modules() if isinstance(m, MixedOp)}


def mixed_ops(network: nn.Module) -> dict[str, MixedOp]:
    """Mixed operations of ``network`` by structural site name (outermost first)."""
    ops: dict[str, MixedOp] = {}
    for path, op in _mixed_ops(network).items():
        site = op.name or path
        if site in ops:
            raise ValueError(f"Two mixed operations share the site name {site!r}; name them "
                             "apart with MixedOp(..., name=...).")
        ops[site] = op
    return ops


def _linear_block(in_features: int, out_features: int, label: str) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, out_features), activation(label))


def _check_activations(activations: Sequence[str]) -> None:
    if isinstance(activations, str) or not isinstance(activations, Sequence):
        raise ValueError(f"Expected activations to be a list of activation names, e.g. "
                         f"['relu', 'tanh'], but got {activations!r}"
                         + (f" (a string would be read letter by letter; write [{activations!r}"
                            ", ...])." if isinstance(activations, str) else "."))


def _hidden_layer(in_features: int, width: int, activations: Sequence[str], name: str,
                  shared_weights: bool) -> dict[str, nn.Module]:
    _check_activations(activations)
    duplicates = sorted({a for a in activations if list(activations).count(a) > 1})
    if duplicates:  # a dict of candidates would silently drop them
        raise ValueError(f"Structural site {name!r} has duplicate activations {duplicates}; "
                         "list each candidate once.")
    if shared_weights:
        return {"linear": nn.Linear(in_features, width),
                "mixed": MixedOp({a: activation(a) for a in activations}, name=name)}
    return {"mixed": MixedOp({a: _linear_block(in_features, width, a) for a in activations},
                             name=name)}


def _chain(blocks: list[nn.Module]) -> GraphFamily:
    return GraphFamily({(i, i + 1): block for i, block in enumerate(blocks)})


DEFAULT_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")


def one_hidden_layer(in_features: int, out_features: int, *, hidden: int = 32,
                     activations: Sequence[str] = DEFAULT_ACTIVATIONS,
                     shared_weights: bool = False, name: str = "activation") -> GraphFamily:
    r"""One hidden layer of K candidate activations, :math:`V\sum_k\gamma_k\sigma_k(W_k x)`.

    Parameters
    ----------
    in_features, out_features : int
        Input and output sizes.
    hidden : int
        Width of the hidden layer.
    activations : sequence of str
        Candidate activations (keys of :data:`ACTIVATIONS`).
    shared_weights : bool
        Whether all candidates share one ``W`` (:math:`\sum_k\gamma_k\sigma_k(Wx)`)
        instead of each having its own :math:`W_k` (the default, as in the lecture).
    name : str
        Name of the structural site.
    """
    _check_sizes(in_features=in_features, out_features=out_features, hidden=hidden)
    blocks = list(_hidden_layer(in_features, hidden, activations, name, shared_weights).values())
    return _chain(blocks + [nn.Linear(hidden, out_features)])


def two_hidden_layer(in_features: int, out_features: int, *, hidden: Sequence[int] = (64, 64),
                     activations: Sequence[str] = DEFAULT_ACTIVATIONS,
                     shared_weights: bool = True,
                     names: Sequence[str] = ("layer1", "layer2")) -> GraphFamily:
    """Two hidden layers, one structural site (the activation) per layer.

    Parameters are as in :func:`one_hidden_layer`; ``hidden`` gives both widths
    and ``names`` both site names. Weights are shared across candidates by default.
    """
    for argument, value in (("hidden", hidden), ("names", names)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(f"Expected {argument} to be a pair (one per hidden layer), e.g. "
                             + ("hidden=(64, 64)" if argument == "hidden" else
                                "names=('layer1', 'layer2')")
                             + f", but got {argument}={value!r}.")
    _check_sizes(in_features=in_features, out_features=out_features, hidden=min(hidden))
    blocks: list[nn.Module] = []
    width_in = in_features
    for width, name in zip(hidden, names):
        blocks += list(_hidden_layer(width_in, width, activations, name, shared_weights).values())
        width_in = width
    return _chain(blocks + [nn.Linear(width_in, out_features)])


def conv_family(in_channels: int = 1, num_classes: int = 10, *, image_size: int = 8,
                channels: Sequence[int] = (8, 16), kernel_size: int = 3,
                names: Sequence[str] = ("conv1", "conv2")) -> GraphFamily:
    r"""A small convolutional family: per block, Conv k×k vs Conv 1×1 ∘ Conv k×k.

    Each block is a :class:`MixedOp` of the two candidates (each followed by
    ReLU) and a 2×2 average pooling; a linear layer maps to ``num_classes``.
    Input shape: ``(N, in_channels, image_size, image_size)``.
    """
    if len(channels) != len(names) or not channels:
        raise ValueError(f"Expected one name per conv block, got channels={channels!r}, "
                         f"names={names!r}.")
    _check_sizes(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                 kernel_size=kernel_size, channels=min(channels))
    if image_size % (2 ** len(channels)):
        raise ValueError(f"image_size={image_size} must be divisible by 2**{len(channels)} "
                         "(one 2×2 pooling per block).")
    pad = kernel_size // 2
    k = kernel_size
    blocks: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for c_out, name in zip(channels, names):
        candidates = {
            f"conv{k}x{k}": nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=pad), nn.ReLU()),
            f"conv1x1+conv{k}x{k}": nn.Sequential(nn.Conv2d(c_in, c_out, 1),
                                                  nn.Conv2d(c_out, c_out, k, padding=pad),
                                                  nn.ReLU()),
        }
        blocks += [MixedOp(candidates, name=name), nn.AvgPool2d(2)]
        c_in, size = c_out, size // 2
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(c_in * size * size, num_classes)))
    return _chain(blocks)


def _check_sizes(**sizes: int) -> None:
    for argument, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected {argument} to be a positive int, but got {value!r}.")
