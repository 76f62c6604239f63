"""Generalised Gauss–Newton Laplace (ggn_laplace) against exact answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_structsel as ps
from pyro_structsel.evidence.ggn import _Problem, ggn_laplace

STRUCTURES = ("full", "kron", "diag")


def _regression(n: int = 40, m: int = 3, outputs: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(m, outputs, generator=g, dtype=torch.float64)
    y = x @ w + 0.3 + 0.5 * torch.randn(n, outputs, generator=g, dtype=torch.float64)
    return x, (y.squeeze(-1) if outputs == 1 else y)


def _design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def test_full_is_closed_form_and_laplace_for_linear_gaussian():
    x, y = _regression()
    model = ps.NetworkModel(nn.Linear(3, 1).double(), likelihood="normal", noise_scale=0.5,
                            prior_scale=2.0)
    exact = ps.blr_log_evidence(_design(x), y, prior_precision=0.25, noise_precision=4.0).value
    full = ggn_laplace(model, x, y, hessian_structure="full")
    assert full.method == "laplace"
    assert full.diagnostics["hessian_structure"] == "full"
    assert full.value == pytest.approx(exact, abs=1e-4)
    model.double()  # float64 prior for Pyro's potential energy
    assert full.value == pytest.approx(ps.laplace(model, None, x, y).value, abs=1e-6)


@pytest.mark.parametrize("outputs", [1, 3])
def test_kron_is_exact_on_a_single_linear_layer(outputs):
    # B_n = I and Λ_n = I/σ² do not depend on n: A ⊗ G / N is the exact GGN.
    x, y = _regression(outputs=outputs, seed=outputs)
    model = ps.NetworkModel(nn.Linear(3, outputs).double(), likelihood="normal",
                            noise_scale=0.5, prior_scale=2.0)
    full = ggn_laplace(model, x, y, hessian_structure="full")
    kron = ggn_laplace(model, x, y, hessian_structure="kron")
    assert kron.diagnostics["kron_layers"] == [""]
    assert kron.value == pytest.approx(full.value, abs=1e-8)
    if outputs == 1:
        exact = ps.blr_log_evidence(_design(x), y, prior_precision=0.25, noise_precision=4.0)
        assert kron.value == pytest.approx(exact.value, abs=1e-4)


def test_structure_picks_the_candidate_and_its_prior_scale():
    # A MixedOp of two linear candidates: each structure is a BLR with its own prior.
    x, y = _regression(seed=3)
    family = ps.MixedOp({"a": nn.Linear(3, 1), "b": nn.Sequential(nn.Linear(3, 1))}, name="m")
    model = ps.NetworkModel(family.double(), likelihood="normal", noise_scale=0.5,
                            prior_scale={"candidates.0": 2.0, "candidates.1.0": 0.5})
    for option, alpha in [("a", 0.25), ("b", 4.0)]:
        exact = ps.blr_log_evidence(_design(x), y, prior_precision=alpha, noise_precision=4.0)
        for kind in STRUCTURES[:2]:
            got = ggn_laplace(model, x, y, structure={"m": option}, hessian_structure=kind)
            assert got.diagnostics["num_params"] == 4
            assert got.value == pytest.approx(exact.value, abs=1e-4)


def _classifier():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return ps.NetworkModel(net, likelihood="categorical"), x, y


def test_softmax_regression_full_equals_laplace():
    # Logits linear in the weights: the GGN is the Hessian.
    _, x, y = _classifier()
    model = ps.NetworkModel(nn.Linear(4, 3).double(), likelihood="categorical")
    full = ggn_laplace(model, x, y, hessian_structure="full")
    model.double()
    assert full.value == pytest.approx(ps.laplace(model, None, x, y).value, abs=1e-6)


def test_diag_is_the_diagonal_and_below_full_on_a_classifier():
    model, x, y = _classifier()
    estimates = {kind: ggn_laplace(model, x, y, hessian_structure=kind) for kind in STRUCTURES}
    full, diag = estimates["full"], estimates["diag"]
    # Same mode for all three; Hadamard: det P <= prod P_ii, so diag never exceeds full.
    assert diag.diagnostics["log_joint"] == pytest.approx(full.diagnostics["log_joint"])
    assert diag.value <= full.value + 1e-9
    # Both approximations stay within a few nats of the full GGN on this 43-weight net.
    for kind in ("diag", "kron"):
        assert abs(estimates[kind].value - full.value) < 15.0
    # The "diag" curvature is exactly the diagonal of the "full" GGN matrix.
    problem = _Problem(full.diagnostics["network"], x, y, model.likelihood, 1.0,
                       {n: 1.0 for n in full.diagnostics["mode"]}, chunk_size=7)
    params = full.diagnostics["mode"]
    names = list(params)
    matrix = problem.ggn(params, names, diagonal=False)
    assert torch.allclose(problem.ggn(params, names, diagonal=True), matrix.diagonal(),
                          atol=1e-10)


def test_kron_factors_match_the_exact_layer_block_for_one_datum():
    # With one observation A ⊗ G is the exact GGN block of each Linear layer.
    model, x, y = _classifier()
    network = model.network
    problem = _Problem(network, x[:1], y[:1], model.likelihood, 1.0,
                       {n: 1.0 for n, _ in network.named_parameters()}, chunk_size=4)
    params = {n: p.detach() for n, p in network.named_parameters()}
    layers, rest = problem.kron_layers(params)
    assert sorted(layers) == ["0", "2"] and rest == []
    factors = problem.kron_factors(params, layers)
    for path, (own, _) in layers.items():
        a, g = factors[path]
        block = problem.ggn(params, own, diagonal=False)  # order: vec(W) row-major, then b
        out_f, in_f = params[own[0]].shape
        # Reorder [vec(W), b] into the rows of [W | b] (out × (in+1), row-major) = G ⊗ A.
        index = torch.cat([torch.arange(out_f * in_f).reshape(out_f, in_f),
                           out_f * in_f + torch.arange(out_f).unsqueeze(1)], 1).reshape(-1)
        assert torch.allclose(block[index][:, index], torch.kron(g, a), atol=1e-10)


def test_hessian_structure_and_structure_are_validated():
    model, x, y = _classifier()
    with pytest.raises(ValueError, match="'diag', 'kron', 'full'"):
        ggn_laplace(model, x, y, hessian_structure="block")
    with pytest.raises(ValueError, match="Unknown structural site"):
        ggn_laplace(model, x, y, structure={"nope": "relu"})
    family = ps.one_hidden_layer(4, 3, hidden=3, activations=("relu", "tanh"))
    mixed = ps.NetworkModel(family.double())
    with pytest.raises(ValueError, match="activation"):
        ggn_laplace(mixed, x, y)
    with pytest.raises(ValueError, match="'sigmoid'"):
        ggn_laplace(mixed, x, y, structure={"activation": "sigmoid"})
    with pytest.raises(ValueError, match="NetworkModel"):
        ggn_laplace(lambda x, y: None, x, y)


def test_structured_network_is_pruned():
    _, x, y = _classifier()
    family = ps.one_hidden_layer(4, 3, hidden=3, activations=("tanh", "identity"))
    model = ps.NetworkModel(family.double())
    est = ggn_laplace(model, x, y, structure={"activation": "tanh"}, hessian_structure="kron")
    assert est.diagnostics["num_params"] == 4 * 3 + 3 + 3 * 3 + 3  # one candidate kept
    assert est.diagnostics["kron_layers"] == ["edges.e0_1.0", "edges.e1_2"]
    assert est.value < 0
