"""The graph family: aggregation, DAG checks, mixed operations, derived networks, complexity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_structsel as ps
from pyro_structsel.model.family import mixed_ops

from common import assert_close


def _x(n=5, d=3):
    return torch.linspace(-2.0, 2.0, n * d).reshape(n, d)


def _diamond(aggregation, out2=2, out3=2):
    torch.manual_seed(1)
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    c, d = nn.Linear(4, out2), nn.Linear(4, out3)
    family = ps.GraphFamily({(0, 1): a, (0, 2): b, (1, 3): c, (2, 3): d},
                            aggregation=aggregation)
    return family, (a, b, c, d)


@pytest.mark.parametrize("rule", ["sum", "mean"])
def test_graph_family_sum_and_mean(rule):
    family, (a, b, c, d) = _diamond(rule)
    x = _x()
    left, right = c(a(x)), d(b(x))
    expected = left + right if rule == "sum" else (left + right) / 2
    assert_close(family(x), expected)
    assert family.output_node == 3


def test_graph_family_concat():
    family, (a, b, c, d) = _diamond("concat", out2=2, out3=3)
    x = _x()
    out = family(x)
    assert out.shape == (5, 5)
    assert_close(out, torch.cat([c(a(x)), d(b(x))], dim=1))


def test_graph_family_per_node_aggregation_and_skip_edge():
    torch.manual_seed(2)
    a, b, c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(3, 4)
    head = nn.Linear(8, 1)
    # node 2 concatenates (1 -> 2) and the skip edge (0 -> 2); node 3 is the output
    family = ps.GraphFamily({(0, 1): a, (1, 2): b, (0, 2): c, (2, 3): head},
                            aggregation={2: "concat"})
    x = _x()
    assert_close(family(x), head(torch.cat([b(a(x)), c(x)], dim=1)))
    assert family.depth() == 3


@pytest.mark.parametrize("edges, match", [
    ({(0, 1): nn.Identity(), (1, 2): nn.Identity(), (2, 1): nn.Identity(), (2, 3): nn.Identity()},
     r"cycle through nodes \[1, 2, 3\]"),
    ({(1, 2): nn.Identity()}, r"input node must be 0"),
    ({(0, 1): nn.Identity(), (1, 0): nn.Identity()}, r"input node 0 must have no incoming"),
    ({(0, 2): nn.Identity(), (1, 2): nn.Identity()}, r"Nodes \[1\] have no incoming edges"),
    ({(0, 1): nn.Identity(), (0, 2): nn.Identity()}, r"exactly one output node.*\[1, 2\]"),
    ({}, r"at least one edge"),
    ({(0, 1): "relu"}, r"Edge \(0, 1\) must carry a torch.nn.Module"),
])
def test_graph_family_rejects_bad_graphs(edges, match):
    with pytest.raises(ValueError, match=match):
        ps.GraphFamily(edges)


def test_graph_family_rejects_bad_aggregation():
    with pytest.raises(ValueError, match=r"Unknown aggregation 'max'; expected one of 'sum'"):
        ps.GraphFamily({(0, 1): nn.Identity()}, aggregation="max")
    with pytest.raises(ValueError, match=r"aggregation names nodes \[5\]"):
        ps.GraphFamily({(0, 1): nn.Identity()}, aggregation={5: "sum"})


def test_mixed_op_is_the_convex_combination():
    torch.manual_seed(3)
    lin = nn.Linear(3, 3)
    op = ps.MixedOp({"lin": lin, "tanh": nn.Tanh(), "relu": nn.ReLU()}, name="edge")
    assert op.labels == ("lin", "tanh", "relu")
    assert_close(op.gamma, torch.full((3,), 1 / 3))
    op.gamma.copy_(torch.tensor([0.2, 0.3, 0.5]))
    x = _x()
    expected = 0.2 * lin(x) + 0.3 * torch.tanh(x) + 0.5 * torch.relu(x)
    assert_close(op(x), expected)
    assert op.chosen("tanh") is op.candidates[1]
    assert op.chosen(2) is op.candidates[2]


def test_mixed_op_unlabelled_and_bad_candidates():
    op = ps.MixedOp([nn.Tanh(), nn.Identity()])
    assert op.labels == ("0", "1")
    with pytest.raises(ValueError, match=r"at least two candidates, but got 1"):
        ps.MixedOp({"relu": nn.ReLU()}, name="act")
    with pytest.raises(ValueError, match=r"every candidate of a MixedOp"):
        ps.MixedOp([nn.ReLU(), torch.tanh])


def _set_one_hot(network, structure):
    for site, op in mixed_ops(network).items():
        gamma = torch.zeros(len(op.labels))
        option = structure[site]
        gamma[op.labels.index(option) if isinstance(option, str) else option] = 1.0
        op.gamma.copy_(gamma)


@pytest.mark.parametrize("build, structure", [
    (lambda: ps.one_hidden_layer(3, 2, hidden=6), {"activation": "tanh"}),
    (lambda: ps.one_hidden_layer(3, 2, hidden=6, shared_weights=True), {"activation": "sigmoid"}),
    (lambda: ps.two_hidden_layer(3, 2, hidden=(5, 4)), {"layer1": "relu", "layer2": "identity"}),
    (lambda: ps.two_hidden_layer(3, 2, hidden=(5, 4), shared_weights=False),
     {"layer1": "sigmoid", "layer2": 1}),
])
def test_derived_network_equals_mixed_network_at_a_vertex(build, structure):
    torch.manual_seed(4)
    network = build()
    derived = ps.derive_network(network, structure)
    assert not any(isinstance(m, ps.MixedOp) for m in derived.modules())
    assert any(isinstance(m, ps.MixedOp) for m in network.modules())  # original untouched
    _set_one_hot(network, structure)
    x = _x()
    assert_close(derived(x), network(x))
    # and not equal to the uniform mixture (the comparison can fail)
    for op in mixed_ops(network).values():
        op.gamma.fill_(1.0 / len(op.labels))
    assert not torch.allclose(derived(x), network(x))


def test_derive_network_picks_the_candidate_module():
    network = ps.one_hidden_layer(3, 2, hidden=6, activations=("relu", "tanh"))
    op = network.edge(0, 1)
    derived = ps.derive_network(network, {"activation": "tanh"})
    chosen = derived.edge(0, 1)
    assert isinstance(chosen, nn.Sequential) and isinstance(chosen[1], nn.Tanh)
    assert_close(chosen[0].weight, op.candidates[1][0].weight)
    assert chosen[0].weight is not op.candidates[1][0].weight  # a copy


def test_derive_network_needs_every_site():
    network = ps.two_hidden_layer(3, 2, hidden=(4, 4))
    with pytest.raises(ValueError, match=r"no option for mixed operation 'layer2'"):
        ps.derive_network(network, {"layer1": "relu"})


def test_mixed_ops_need_distinct_names():
    network = nn.Sequential(ps.MixedOp([nn.ReLU(), nn.Tanh()], name="a"),
                            ps.MixedOp([nn.ReLU(), nn.Tanh()], name="a"))
    with pytest.raises(ValueError, match=r"share the site name 'a'"):
        mixed_ops(network)


def test_conv_family_runs_and_derives():
    torch.manual_seed(5)
    family = ps.conv_family(1, 10, image_size=8, channels=(4, 6))
    x = torch.randn(3, 1, 8, 8)
    assert family(x).shape == (3, 10)
    assert set(mixed_ops(family)) == {"conv1", "conv2"}
    assert mixed_ops(family)["conv1"].labels == ("conv3x3", "conv1x1+conv3x3")
    structure = {"conv1": "conv1x1+conv3x3", "conv2": "conv3x3"}
    derived = ps.derive_network(family, structure)
    _set_one_hot(family, structure)
    assert_close(derived(x), family(x), atol=1e-5)


def test_conv_family_bad_sizes():
    with pytest.raises(ValueError, match=r"image_size=6 must be divisible by 2\*\*2"):
        ps.conv_family(image_size=6)
    with pytest.raises(ValueError, match=r"in_channels to be a positive int"):
        ps.conv_family(in_channels=0)


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"Unknown activation 'swish'; expected one of"):
        ps.one_hidden_layer(3, 2, activations=("relu", "swish"))


def test_classical_complexity_one_hidden_layer():
    d, h, o, k = 3, 5, 2, 4
    family = ps.one_hidden_layer(d, o, hidden=h)  # one W_k per candidate
    assert ps.classical_complexity(family) == {
        "num_parameters": k * (d * h + h) + h * o + o,
        # the candidates are alternatives side by side, not composed: one layer, then the head
        "num_superpositions": 2,
    }
    derived = ps.derive_network(family, {"activation": "relu"})
    assert ps.classical_complexity(derived) == {"num_parameters": d * h + h + h * o + o,
                                                "num_superpositions": 2}
    shared = ps.one_hidden_layer(d, o, hidden=h, shared_weights=True)
    assert ps.classical_complexity(shared) == {"num_parameters": d * h + h + h * o + o,
                                               "num_superpositions": 2}


def test_classical_complexity_two_hidden_layer():
    d, h1, h2, o = 4, 6, 5, 3
    family = ps.two_hidden_layer(d, o, hidden=(h1, h2))
    expected = {"num_parameters": d * h1 + h1 + h1 * h2 + h2 + h2 * o + o,
                "num_superpositions": 3}
    assert ps.classical_complexity(family) == expected
    assert family.depth() == 3
    derived = ps.derive_network(family, {"layer1": "tanh", "layer2": "relu"})
    assert ps.classical_complexity(derived) == expected


def test_classical_complexity_conv_family():
    family = ps.conv_family(1, 10, image_size=8, channels=(8, 16))
    head = 16 * 2 * 2 * 10 + 10
    plain = {"conv1": "conv3x3", "conv2": "conv3x3"}
    deep = {"conv1": "conv1x1+conv3x3", "conv2": "conv1x1+conv3x3"}
    assert ps.classical_complexity(ps.derive_network(family, plain)) == {
        "num_parameters": (1 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + head,
        "num_superpositions": 3}
    assert ps.classical_complexity(ps.derive_network(family, deep)) == {
        "num_parameters": (8 + 8) + (8 * 8 * 9 + 8) + (8 * 16 + 16) + (16 * 16 * 9 + 16) + head,
        "num_superpositions": 5}
    # the family's depth is that of its deepest member
    assert family.depth() == 5
