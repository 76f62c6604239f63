r"""Tutorial 01 — one hidden layer, K candidate basis functions, the posterior over γ.

The simplest structure-selection problem: a network with one hidden layer
whose activation is unknown. Instead of fitting one network per activation
and comparing them, we put all K candidates in one *family*

.. math::

    f_1(x) = V \sum_{k=1}^{K} \gamma_k\, \sigma_k(W_k x), \qquad
    \gamma = (\gamma_1, \dots, \gamma_K) \in \Delta^{K-1},

where each candidate :math:`\sigma_k` has its own weights :math:`W_k` and
the *structural parameter* :math:`\gamma` lies on the probability simplex.
Every :math:`\gamma` in the simplex is a model; a **structure** is a vertex
of the simplex (exactly one :math:`\gamma_k = 1`).

We make :math:`\gamma` a latent variable with a Dirichlet prior, the weights
Gaussian latent variables, and fit :math:`q(w, \gamma)` by variational
inference (:func:`pyro_structsel.select_structure`). The posterior
:math:`q(\gamma)` then tells us which vertex (structure) the data support,
and how sure we may be. With K = 3 the simplex is a triangle, so we can
*see* it.

Run it as a script::

    python tutorials/01_one_hidden_layer.py            # about a minute on one core
    python tutorials/01_one_hidden_layer.py --quick    # a few seconds (also: CI=1)
    python tutorials/01_one_hidden_layer.py --out figs # where the PNGs go

The figures go to ``--out``, else ``$STRUCTSEL_TUTORIAL_OUT``, else
``./tutorial-out``.
"""

from __future__ import annotations

import math

from tutorial_setup import tutorial_settings  # first: figures go to files

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import pyro_structsel as ps  # noqa: E402

# %% [markdown]
# ## 0. Settings
#
# `smoke_test` is the quick mode the test-suite runs (Pyro's convention:
# the `CI` environment variable, or `--quick`): fewer SVI steps, same code.

settings = tutorial_settings(__doc__)
smoke_test, out_dir = settings.quick, settings.out
num_steps = 400 if smoke_test else 2500

# %% [markdown]
# ## 1. Data from a teacher whose answer we know
#
# The teacher is itself a one-hidden-layer network with a **tanh** hidden
# layer (three units). Its regression function saturates on both sides, which
# a ReLU network can only imitate with many kinks and a linear model not at
# all, so the right vertex is clear. The noise level is known (σ = 0.1).

torch.manual_seed(0)
num_points = 200
noise = 0.1
x = torch.linspace(-3.0, 3.0, num_points).unsqueeze(-1)


def teacher(x: torch.Tensor) -> torch.Tensor:
    """Ground truth: 1.5 tanh(2x) − tanh(x − 1) + 0.5 tanh(3x + 4)."""
    return (1.5 * torch.tanh(2.0 * x) - torch.tanh(x - 1.0)
            + 0.5 * torch.tanh(3.0 * x + 4.0)).squeeze(-1)


y = teacher(x) + noise * torch.randn(num_points)

# %% [markdown]
# ## 2. The family: K = 3 candidate activations, each with its own weights
#
# `shared_weights=False` gives every candidate its own :math:`W_k` (the
# family of the lecture, :math:`\sum_k \gamma_k \sigma_k(W_k x)`); with
# `True` they would share one :math:`W`. `NetworkModel` makes all weights
# Gaussian latent sites with prior N(0, 1), adds the Dirichlet(1, 1, 1)
# structural site "activation", and a Gaussian likelihood with the noise
# level above, in a `pyro.plate` over the data.

candidates = ("relu", "tanh", "identity")
family = ps.one_hidden_layer(1, 1, hidden=8, activations=candidates, shared_weights=False)
model = ps.NetworkModel(family, likelihood="normal", noise_scale=noise)
print(family)

# %% [markdown]
# ## 3. Fit q(w, γ) and select the structure
#
# `select_structure` runs SVI on the ELBO. The guide is chosen for us: a
# Dirichlet q(γ) with learnable concentration (the family of the prior) and a
# mean-field Gaussian (AutoNormal) for the weights. `seed` makes the run
# reproducible.

result = ps.select_structure(model, x, y, num_steps=num_steps, lr=0.02, seed=0,
                             num_evidence_samples=200, progress=not smoke_test)
print(result)
print(result.summary())

# %% [markdown]
# ## 4. The posterior over γ, on the simplex
#
# `result.guide` holds the fitted guide; its parameters live in this fit's own
# parameter store, entered with `result.param_scope()`. The structural part
# of the guide (`AutoStructure`) gives q(γ) as a distribution we can sample.

site = result.sites["activation"]
num_draws = 2000
with result.param_scope(), torch.no_grad():
    q_gamma = ps.infer.guides.structure_guides(result.guide)[0].posterior("activation")
    gamma = site.to_simplex(q_gamma.sample((num_draws,))).reshape(num_draws, -1)
prior_gamma = torch.distributions.Dirichlet(torch.ones(len(candidates))).sample((num_draws,))

# Barycentric → Cartesian: option k sits at corner k of an equilateral triangle.
corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])


def to_xy(points: torch.Tensor) -> torch.Tensor:
    """Points on the 2-simplex (rows summing to 1) as (x, y) in the triangle."""
    return points @ corners


chosen = result.structure["activation"]
vertex = corners[candidates.index(chosen)]
mean_xy = to_xy(result.posterior_mean["activation"].unsqueeze(0))[0]


def draw_simplex(ax: plt.Axes, draws: torch.Tensor, title: str, colour: str, *,
                 corner_labels: bool = True) -> None:
    """The triangle with a light grid (lines γ_k = 0.25, 0.5, 0.75), labelled corners, draws."""
    ax.fill(*corners.T, facecolor="none", edgecolor="black", linewidth=1.0)
    for level in (0.25, 0.5, 0.75):
        for k in range(3):
            a, b = corners[(k + 1) % 3], corners[(k + 2) % 3]
            p, r = level * corners[k] + (1 - level) * a, level * corners[k] + (1 - level) * b
            ax.plot([p[0], r[0]], [p[1], r[1]], color="0.85", linewidth=0.6, zorder=0)
    xy = to_xy(draws)
    ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.35, color=colour, linewidths=0, zorder=2)
    for k, label in enumerate(candidates if corner_labels else ()):
        dx, dy = (-0.06, -0.06) if k == 0 else (0.06, -0.06) if k == 1 else (0.0, 0.05)
        ax.text(corners[k, 0] + dx, corners[k, 1] + dy, label, ha="center", va="center",
                fontsize=11, fontweight="bold" if label == chosen else "normal")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


# Left: the prior, uniform on the triangle. Middle: the posterior. Right: the
# posterior magnified around its draws (it is often too tight to see at full scale).
fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.8))
draw_simplex(axes[0], prior_gamma, "prior p(γ) = Dirichlet(1, 1, 1)", "tab:gray")
draw_simplex(axes[1], gamma, "posterior q(γ) after SVI", "tab:blue")
draw_simplex(axes[2], gamma, "posterior q(γ), magnified (red box)", "tab:blue",
             corner_labels=False)
for ax in axes[:2]:
    ax.set_xlim(-0.15, 1.15)
    ax.set_ylim(-0.15, 1.0)
    ax.axis("off")
gamma_xy = to_xy(gamma)
low = torch.minimum(gamma_xy.quantile(0.005, dim=0), vertex)
high = torch.maximum(gamma_xy.quantile(0.995, dim=0), vertex)
half = float((high - low).max()) / 2 * 1.3 + 1e-3  # a square window around draws and vertex
centre = (low + high) / 2
axes[2].set_xlim(float(centre[0]) - half, float(centre[0]) + half)
axes[2].set_ylim(float(centre[1]) - half, float(centre[1]) + half)
for ax in axes[1:]:
    ax.scatter(*mean_xy, marker="x", s=70, color="tab:red", label="posterior mean E[γ]",
               zorder=4)
    ax.scatter(*vertex, marker="*", s=260, facecolor="none", edgecolor="tab:orange",
               linewidths=1.8, label=f"chosen vertex: {chosen}", zorder=3)
axes[1].indicate_inset([float(centre[0]) - half, float(centre[1]) - half, 2 * half, 2 * half],
                       edgecolor="tab:red")
axes[2].legend(loc="best", fontsize=8, framealpha=0.8)
fig.suptitle(r"Structural parameter $\gamma$ of $f_1(x) = \sum_k \gamma_k \sigma_k(W_k x)$"
             f" on the simplex; structure = vertex {chosen}")
fig.tight_layout()
simplex_png = out_dir / "01_simplex.png"
fig.savefig(simplex_png, dpi=120)
plt.close(fig)

# %% [markdown]
# ## 5. Read the structure off the vertex
#
# A structure is a vertex. The probability of vertex k under q is the share
# of draws whose largest coordinate is γ_k; the chosen structure is the most
# probable vertex (the library computes the same from many more draws). This
# probability can be 1 while E[γ] is still inside the triangle: every draw
# lies in the region nearest to the same vertex. As training goes on, the
# draws move into the vertex itself (compare the quick and the full run).

share = torch.bincount(gamma.argmax(-1), minlength=len(candidates)) / num_draws
for label, p_vertex, p_lib in zip(candidates, share, result.probabilities["activation"]):
    print(f"  q(vertex = {label:<8}) = {float(p_vertex):.3f}   (library: {float(p_lib):.3f})")
print(f"structure read off the vertex: activation = {chosen}")
print(f"ELBO = {result.evidence['elbo'].value:.2f} ± {result.evidence['elbo'].se:.2f} nats; "
      f"structural complexity H(q(γ)) = {result.structural_complexity.value:.2f} nats")

# %% [markdown]
# ## 6. The network at that vertex
#
# `result.derive()` returns the plain `torch.nn.Module` with the chosen
# activation and the posterior-mean weights, usable without Pyro. γ is only
# meaningful if the family fits the data, so check the fit: it should follow
# the teacher to within the noise.

network = result.derive()
with torch.no_grad():
    fitted = network(x).squeeze(-1)
rmse = float((fitted - teacher(x)).pow(2).mean().sqrt())
print(f"derived network: {sum(p.numel() for p in network.parameters())} parameters, "
      f"RMSE to the teacher {rmse:.3f} (noise σ = {noise})")

fig, ax = plt.subplots(figsize=(6.4, 4.0))
ax.scatter(x.squeeze(-1), y, s=8, color="0.6", label="data")
ax.plot(x.squeeze(-1), teacher(x), color="black", linewidth=1.5, label="teacher (tanh)")
ax.plot(x.squeeze(-1), fitted, color="tab:orange", linewidth=2.0, linestyle="--",
        label=f"derived network ({chosen})")
ax.set_xlabel("x")
ax.set_ylabel("y")
ax.set_title(f"Fit at the chosen vertex (RMSE to teacher {rmse:.3f})")
ax.legend(frameon=False)
fig.tight_layout()
fit_png = out_dir / "01_fit.png"
fig.savefig(fit_png, dpi=120)
plt.close(fig)
print(f"figures: {simplex_png}, {fit_png}")
