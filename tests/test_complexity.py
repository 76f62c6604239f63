"""Complexities: structural (entropy of q(Gamma)), parametric (min_h KL), description length."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal

import pyro_structsel as ps
from pyro_structsel.model.bayesian import GROUP_KEY

from common import assert_close


def _dirichlet_entropy(alpha):
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    a0, k = alpha.sum(), alpha.numel()
    log_beta = torch.lgamma(alpha).sum() - torch.lgamma(a0)
    return float(log_beta + (a0 - k) * torch.digamma(a0)
                 - ((alpha - 1) * torch.digamma(alpha)).sum())


def _trapezoid(f, a, b, n=200001):
    t = torch.linspace(a, b, n, dtype=torch.float64)
    return float(torch.trapezoid(f(t), t))


# --------------------------------------------------------------------------- structural


def _dirichlet_model():
    ps.structure("a", 3)
    ps.structure("b", ["x", "y"])


def test_dirichlet_differential_entropy_is_analytic():
    guide = ps.AutoStructure(_dirichlet_model)
    guide()
    alpha_a, alpha_b = [0.7, 2.0, 3.5], [1.5, 4.0]
    guide.concentrations.a = torch.tensor(alpha_a)
    guide.concentrations.b = torch.tensor(alpha_b)
    assert_close(guide.posterior("a").concentration, alpha_a)  # set by hand, as intended
    num = 20000
    est = ps.structural_complexity(_dirichlet_model, guide, num_samples=num)
    sites = est.diagnostics["sites"]
    h_a, h_b = _dirichlet_entropy(alpha_a), _dirichlet_entropy(alpha_b)
    assert_close(sites["a"]["differential_entropy"], h_a, atol=1e-5, rtol=1e-5)
    assert_close(sites["b"]["differential_entropy"], h_b, atol=1e-5, rtol=1e-5)
    assert sites["a"]["differential_entropy_se"] == 0.0
    assert_close(est.value, h_a + h_b, atol=1e-5, rtol=1e-5)
    assert est.se == 0.0
    # the flat Dirichlet on the 2-simplex has entropy -log 2 (its density is 2)
    assert_close(_dirichlet_entropy([1.0, 1.0, 1.0]), -math.log(2.0), atol=1e-12)

    # vertex distribution of b: P(gamma_x > gamma_y) = P(Beta(1.5, 4) > 1/2), by quadrature
    beta = dist.Beta(torch.tensor(1.5, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))
    p_x = _trapezoid(lambda t: beta.log_prob(t).exp(), 0.5, 1.0)
    probs = sites["b"]["probabilities"]
    assert_close(sum(probs), 1.0, atol=1e-6)
    assert_close(probs[0], p_x, atol=4 * math.sqrt(p_x * (1 - p_x) / num), rtol=0)
    # vertex entropies are those of the reported probabilities, and add up
    for name in ("a", "b"):
        p = torch.tensor(sites[name]["probabilities"], dtype=torch.float64)
        assert_close(sites[name]["vertex_entropy"], float(-(p * p.log()).sum()), atol=1e-9)
    assert_close(est.diagnostics["vertex_entropy"],
                 sites["a"]["vertex_entropy"] + sites["b"]["vertex_entropy"], atol=1e-9)


def _concrete_model():
    ps.structure("c", ["a", "b", "c"], prior="concrete", temperature=0.5)
    ps.structure("d", ["p", "q"], prior="concrete", temperature=0.5)


def _binary_concrete_entropy(logit_difference, temperature):
    # gamma_1 = sigmoid(u), u ~ Logistic(logit_difference / T, 1 / T):
    # H(gamma_1) = H(u) + E log sigmoid'(u) = 2 - log T + E[log sigmoid(u) + log sigmoid(-u)]
    m, s = logit_difference / temperature, 1.0 / temperature

    def integrand(u):
        z = (u - m) / s
        density = torch.exp(-z - 2 * torch.nn.functional.softplus(-z)) / s
        return density * (torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u))

    return 2.0 - math.log(temperature) + _trapezoid(integrand, m - 60 * s, m + 60 * s)


@pytest.mark.parametrize("guide_temperature", [None, 0.2])
def test_concrete_vertex_probabilities_and_entropy(guide_temperature):
    guide = ps.AutoStructure(_concrete_model, temperature=guide_temperature)
    guide()
    logits_c, logits_d = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.3, -0.4])
    guide.logits.c = logits_c
    guide.logits.d = logits_d
    num = 20000
    est = ps.structural_complexity(_concrete_model, guide, num_samples=num)
    sites = est.diagnostics["sites"]
    # P(argmax gamma = k) = softmax(logits)_k exactly (Gumbel-max)
    assert_close(sites["c"]["probabilities"], torch.softmax(logits_c, -1), atol=1e-6)
    assert_close(sites["d"]["probabilities"], torch.softmax(logits_d, -1), atol=1e-6)
    p = torch.softmax(logits_c.double(), -1)
    assert_close(sites["c"]["vertex_entropy"], float(-(p * p.log()).sum()), atol=1e-6)
    # Monte Carlo differential entropy of the binary Concrete vs quadrature
    temperature = guide_temperature or 0.5
    expected = _binary_concrete_entropy(0.3 - (-0.4), temperature)
    h, se = sites["d"]["differential_entropy"], sites["d"]["differential_entropy_se"]
    assert 0 < se < 0.05
    assert abs(h - expected) < 4 * se, (h, expected, se)
    assert_close(est.value, sites["c"]["differential_entropy"] + h, atol=1e-9)
    assert_close(est.se, math.hypot(sites["c"]["differential_entropy_se"], se), atol=1e-9)


def test_structural_complexity_without_structural_site():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"no structural site"):
        ps.structural_complexity(model, lambda: None)


# --------------------------------------------------------------------------- parametric


def _weights_model():
    ps.structure("g", ["a", "b"])
    pyro.sample("w1", dist.Normal(0.0, 2.0).expand([3]).to_event(1), infer={GROUP_KEY: "layer1"})
    pyro.sample("b1", dist.Normal(0.0, 2.0).expand([2]).to_event(1), infer={GROUP_KEY: "layer1"})
    pyro.sample("w2", dist.Normal(0.0, 0.5).expand([2, 2]).to_event(2))  # its own group


_MU = {"w1": [0.5, -1.0, 2.0], "b1": [0.1, 0.0], "w2": [[0.3, -0.2], [0.0, 1.5]]}
_S = {"w1": [0.2, 0.4, 0.1], "b1": [1.0, 0.5], "w2": [[0.05, 0.3], [0.2, 0.7]]}


def _kl_to_zero_mean(mu, s, h):
    return float(torch.distributions.kl_divergence(dist.Normal(mu, s), dist.Normal(0.0, h)).sum())


def test_parametric_complexity_by_hand_for_autonormal():
    guide = ps.default_guide(_weights_model, ["g"])
    guide()
    weights = guide[1]
    for name in ("w1", "b1", "w2"):
        setattr(weights.locs, name, torch.tensor(_MU[name]))
        setattr(weights.scales, name, torch.tensor(_S[name]))
        loc, scale = weights._get_loc_and_scale(name)
        assert_close(loc, _MU[name], atol=1e-6)
        assert_close(scale, _S[name], atol=1e-6)

    est = ps.parametric_complexity(_weights_model, guide)

    mu = {"layer1": torch.tensor(_MU["w1"] + _MU["b1"], dtype=torch.float64),
          "w2": torch.tensor(_MU["w2"], dtype=torch.float64).reshape(-1)}
    s = {"layer1": torch.tensor(_S["w1"] + _S["b1"], dtype=torch.float64),
         "w2": torch.tensor(_S["w2"], dtype=torch.float64).reshape(-1)}
    h_star = {g: math.sqrt(float((s[g] ** 2 + mu[g] ** 2).mean())) for g in mu}
    kl_star = {g: _kl_to_zero_mean(mu[g], s[g], h_star[g]) for g in mu}
    assert est.method == "closed_form" and est.se == 0.0
    assert_close(est.value, sum(kl_star.values()), atol=1e-5, rtol=1e-5)
    assert_close(est.diagnostics["optimal_prior_scale"], h_star, atol=1e-6, rtol=1e-5)
    assert_close(est.diagnostics["kl_per_layer"], kl_star, atol=1e-5, rtol=1e-5)
    assert_close(est.diagnostics["current_prior_scale"], {"layer1": 2.0, "w2": 0.5})
    assert_close(est.diagnostics["kl_at_current_prior"],
                 _kl_to_zero_mean(mu["layer1"], s["layer1"], 2.0)
                 + _kl_to_zero_mean(mu["w2"], s["w2"], 0.5), atol=1e-5, rtol=1e-5)
    assert est.diagnostics["num_weights"] == 9
    # h* is the minimiser: any other scale gives a larger KL
    for g in mu:
        for factor in (0.9, 1.1):
            assert _kl_to_zero_mean(mu[g], s[g], factor * h_star[g]) > kl_star[g]


def test_parametric_complexity_by_hand_for_full_covariance():
    guide = ps.default_guide(_weights_model, ["g"], weight_guide=AutoMultivariateNormal)
    guide()
    weights = guide[1]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weights.loc.copy_(torch.randn(9, generator=generator))
    weights.scale = torch.rand(9, generator=generator) + 0.1
    weights.scale_tril = torch.eye(9) + torch.tril(0.3 * torch.randn(9, 9, generator=generator),
                                                  -1)
    posterior = weights.get_posterior()
    loc, cov = posterior.loc.double().detach(), posterior.covariance_matrix.double().detach()
    assert not torch.allclose(cov, torch.diag(torch.diagonal(cov)))  # correlated q
    groups = {"layer1": slice(0, 5), "w2": slice(5, 9)}  # w1, b1 | w2 (model order)
    h2 = {g: float((torch.diagonal(cov)[i] + loc[i] ** 2).mean()) for g, i in groups.items()}
    prior_var = torch.cat([torch.full((5,), h2["layer1"]), torch.full((4,), h2["w2"])])
    expected = torch.distributions.kl_divergence(
        dist.MultivariateNormal(loc, cov),
        dist.MultivariateNormal(torch.zeros(9, dtype=torch.float64), torch.diag(prior_var)))
    est = ps.parametric_complexity(_weights_model, guide)
    assert_close(est.value, float(expected), atol=1e-4, rtol=1e-5)
    assert_close(est.diagnostics["optimal_prior_scale"],
                 {g: math.sqrt(v) for g, v in h2.items()}, atol=1e-6, rtol=1e-5)
    assert est.diagnostics["kl_per_layer"] == {}  # not separable for a correlated q


def test_parametric_complexity_by_hand_for_diagonal_normal():
    guide = ps.default_guide(_weights_model, ["g"], weight_guide=AutoDiagonalNormal)
    guide()
    weights = guide[1]
    with torch.no_grad():
        weights.loc.copy_(torch.linspace(-1.0, 1.0, 9))
    weights.scale = torch.linspace(0.1, 0.9, 9)
    mu, s = torch.linspace(-1.0, 1.0, 9).double(), torch.linspace(0.1, 0.9, 9).double()
    expected = 0.0
    for i in (slice(0, 5), slice(5, 9)):
        expected += _kl_to_zero_mean(mu[i], s[i], math.sqrt(float((s[i] ** 2 + mu[i] ** 2).mean())))
    est = ps.parametric_complexity(_weights_model, guide)
    assert_close(est.value, expected, atol=1e-5, rtol=1e-5)


def test_parametric_complexity_groups_of_a_network_model():
    torch.manual_seed(0)
    model = ps.NetworkModel(ps.one_hidden_layer(3, 2, hidden=4, activations=("tanh", "relu")),
                            prior_scale={"edges.e1_2": 0.5})
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    guide = ps.default_guide(model, ["activation"], init_values=model.initial_values())
    guide(x, y)
    est = ps.parametric_complexity(model, guide, x, y)
    assert set(est.diagnostics["optimal_prior_scale"]) == set(model.net.groups) == {
        "edges.e0_1.candidates.0.0", "edges.e0_1.candidates.1.0", "edges.e1_2"}
    assert est.diagnostics["num_weights"] == 2 * (3 * 4 + 4) + 4 * 2 + 2
    assert_close(est.diagnostics["current_prior_scale"]["edges.e1_2"], 0.5)
    assert_close(est.diagnostics["current_prior_scale"]["edges.e0_1.candidates.0.0"], 1.0)


def test_parametric_complexity_with_a_learned_prior_scale():
    # a learnable h must not break the closed form (nor warn about grad-requiring tensors)
    torch.manual_seed(0)
    model = ps.NetworkModel(ps.one_hidden_layer(3, 2, hidden=4, activations=("tanh", "relu")),
                            learn_prior_scale=True, prior_scale=0.8)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    guide = ps.default_guide(model, ["activation"], init_values=model.initial_values())
    guide(x, y)
    est = ps.parametric_complexity(model, guide, x, y)
    assert_close(est.diagnostics["current_prior_scale"]["edges.e1_2"], 0.8, atol=1e-6)
    assert math.isfinite(est.diagnostics["kl_at_current_prior"])


def test_parametric_complexity_rejects_models_without_weights_and_bad_guides():
    with pytest.raises(ValueError, match=r"no non-structural latent sites"):
        ps.parametric_complexity(_dirichlet_model, ps.AutoStructure(_dirichlet_model))

    def guide():
        pyro.sample("g", dist.Dirichlet(torch.ones(2)))

    with pytest.raises(ValueError, match=r"needs a Gaussian guide for the weights"):
        ps.parametric_complexity(_weights_model, guide)


# --------------------------------------------------------------------------- description length


def test_description_length_from_an_estimate_by_hand():
    est = ps.Estimate(-10.0, 0.5, 100, "elbo", {"kl": 3.0, "expected_log_likelihood": -7.0})
    dl = ps.description_length(est)
    ln2 = math.log(2.0)
    assert_close([dl.total_bits, dl.model_bits, dl.data_bits, dl.se_bits],
                 [10.0 / ln2, 3.0 / ln2, 7.0 / ln2, 0.5 / ln2], atol=1e-12)
    with pytest.raises(ValueError, match=r"from pyro_structsel.elbo"):
        ps.description_length(ps.Estimate(-10.0))


def test_description_length_of_an_elbo_splits_into_model_and_data_bits():
    x = torch.tensor([0.3, -1.2, 0.8, 2.0])

    def model(x):
        gamma = ps.structure("g", ["a", "b"])
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(gamma[..., 0] * w, 1.0), obs=x)

    guide = ps.default_guide(model, ["g"])
    guide(x)
    est = ps.elbo(model, guide, x, num_particles=200)
    dl = ps.description_length(est)
    assert_close(dl.total_bits, -est.value / math.log(2.0), atol=1e-9)
    assert_close(dl.model_bits + dl.data_bits, dl.total_bits, atol=1e-6, rtol=1e-9)
    assert dl.model_bits > 0 and dl.data_bits > 0
