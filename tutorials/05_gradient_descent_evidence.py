r"""Tutorial 05 — the evidence along gradient descent: overfitting made visible.

Training a network by gradient descent from a random initialisation is, read
the right way, variational inference (Duvenaud, Maclaurin & Adams, AISTATS
2016). Draw the initial weights from a distribution :math:`q_0`; after ``t``
steps

.. math::

    w_{t+1} = w_t - \beta \nabla L(w_t), \qquad L(w) = -\log p(D, w),

the weights are a draw from the push-forward :math:`q_t` of :math:`q_0`. Its
entropy changes at each step by :math:`\log\lvert\det(I - \beta H)\rvert`
(:math:`H` the Hessian of ``L``), so the evidence lower bound

.. math::

    \mathcal L_t = \mathbb E_{q_t}[\log p(D, w_t)] + H[q_t] \;\le\; \log p(D)

can be tracked along training with Hessian-vector products only. Early on,
descent carries the draws to where the data are likely: the first term grows
much faster than the entropy falls, and the bound **rises**. Later the draws
crowd into the mode; the fit barely improves, but the entropy keeps shrinking
(every step contracts the stiff directions again) and the bound **falls**.
Its peak is the early-stopping point the evidence recommends, found without
held-out data.

We compare it with the classical early-stopping signal, the log-likelihood
of held-out data along the *same* trajectories.

Run it as a script::

    python tutorials/05_gradient_descent_evidence.py            # about 30 s on one core
    python tutorials/05_gradient_descent_evidence.py --quick    # a few seconds (also: CI=1)
    python tutorials/05_gradient_descent_evidence.py --out figs # where the PNG goes

The figure goes to ``--out``, else ``$STRUCTSEL_TUTORIAL_OUT``, else
``./tutorial-out``.
"""

from __future__ import annotations

from tutorial_setup import tutorial_settings  # first: figures go to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_mean  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from pyro_structsel.evidence.descent import gradient_descent_evidence  # noqa: E402

# %% [markdown]
# ## 0. Settings
#
# `smoke_test` is the quick mode the test-suite runs (the `CI` environment
# variable, or `--quick`): fewer steps, restarts and probes, same code.

settings = tutorial_settings(__doc__)
smoke_test, out_dir = settings.quick, settings.out
num_steps = 200 if smoke_test else 600
num_restarts = 12
num_probes = 3 if smoke_test else 10

# %% [markdown]
# ## 1. Few data, many weights
#
# Six inputs, of which the teacher uses three; 30 noisy training points and
# a large held-out set from the same teacher. A network with 16 hidden units
# has 129 weights, enough to fit the noise of 30 points: the setting in which
# training too long overfits.

generator = torch.Generator().manual_seed(1)
num_inputs, num_train, num_test, noise = 6, 30, 1000, 0.3


def teacher(x: torch.Tensor) -> torch.Tensor:
    """tanh(x1 + x2 / 2) + tanh(x3) / 2; inputs 4-6 are irrelevant."""
    return torch.tanh(x[:, 0] + 0.5 * x[:, 1]) + 0.5 * torch.tanh(x[:, 2])


x = torch.randn(num_train, num_inputs, generator=generator)
y = teacher(x) + noise * torch.randn(num_train, generator=generator)
x_test = torch.randn(num_test, num_inputs, generator=generator)
y_test = teacher(x_test) + noise * torch.randn(num_test, generator=generator)

# %% [markdown]
# ## 2. The network: a family with its structure fixed
#
# `one_hidden_layer` builds the family with a structural site "activation";
# `fix_structure` pins it at tanh, so the only latent variables are the
# weights (prior N(0, 3²): weak, so the mode of the posterior overfits), with
# a Gaussian likelihood of known noise. Any Pyro model would do: the
# estimator only needs the model's log joint.

family = ps.one_hidden_layer(num_inputs, 1, hidden=16, activations=("tanh", "relu"),
                             shared_weights=True)
network_model = ps.NetworkModel(family, likelihood="normal", noise_scale=noise,
                                prior_scale=3.0)
model = ps.fix_structure(network_model, {"activation": "tanh"})

# %% [markdown]
# ## 3. The initial distribution q0
#
# Where descent starts from: the usual small random initialisation, here
# N(0, 0.3²) for every weight, written as an (untrained) `AutoNormal` guide.
# Its entropy is known in closed form, which the estimator uses.

q0 = AutoNormal(model, init_loc_fn=init_to_mean, init_scale=0.3)
q0(x, y)  # creates its parameters

# %% [markdown]
# ## 4. Descend and track the evidence
#
# `step_size="auto"` takes β = 0.25 / |λ|max of the Hessian at the initial
# draws (power iteration on Hessian-vector products): the entropy update
# log det(I − βH) ≈ −β tr H − β² tr H² / 2 (second-order series, Hutchinson
# estimates of both traces) needs β|λ|max well below 1, and a
# `StepSizeWarning` says when it is not. `heldout_args` makes the estimator
# also record the held-out log-likelihood of the same trajectories.

estimate = gradient_descent_evidence(
    model, q0, x, y, num_restarts=num_restarts, num_steps=num_steps, num_probes=num_probes,
    step_size="auto", heldout_args=(x_test, y_test), seed=0, progress=not smoke_test)
diag = estimate.diagnostics
print(estimate)
print(f"step size β = {diag['step_size']:.3g}, max β|λ|max along the run = "
      f"{diag['beta_lambda_max']:.2f}")

steps = diag["steps"]
best, best_heldout = diag["best_step"], diag["best_heldout_step"]
heldout = diag["heldout_log_likelihood"] / num_test      # per test point
train = diag["log_likelihood"] / num_train              # per training point
print(f"peak of the evidence estimate: step {best}, "
      f"{diag['evidence'][best]:.2f} ± {diag['evidence_se'][best]:.2f} nats "
      f"(step 0: {diag['evidence'][0]:.2f}, last step: {diag['evidence'][-1]:.2f})")
print(f"best held-out log-likelihood:  step {best_heldout}, {heldout[best_heldout]:.3f} "
      f"nats per point (at the evidence peak: {heldout[best]:.3f}; last step: "
      f"{heldout[-1]:.3f})")
print(f"training log-likelihood per point: step 0 {train[0]:.3f}, evidence peak "
      f"{train[best]:.3f}, best held-out {train[best_heldout]:.3f}, last {train[-1]:.3f}")

# %% [markdown]
# ## 5. The picture
#
# Left: the evidence estimate (± its standard error over the restarts).
# Middle: held-out and training log-likelihood per point along the same
# trajectories. Right: the two terms of the bound: the expected log joint
# rises quickly, then flattens; the entropy falls at a steady rate. The step
# axis is on a square-root scale, which spreads out the early steps where
# both peaks sit.

fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.4))
ax = axes[0]
ev, se = diag["evidence"], diag["evidence_se"]
ax.plot(steps, ev, color="tab:blue", label="evidence estimate $\\mathcal{L}_t$")
ax.fill_between(steps, ev - 2 * se, ev + 2 * se, color="tab:blue", alpha=0.2,
                label="± 2 standard errors")
window = ev[min(3, len(ev) - 1):]
top, low = float(np.nanmax(window)), float(np.nanmin(window))
ax.set_ylim(low - 0.05 * (top - low), top + 0.1 * (top - low))   # step 0 is far below
ax.set_ylabel("log evidence bound (nats)")
ax.set_title("Evidence along gradient descent")

ax = axes[1]
ax.plot(steps, heldout, color="tab:green", label="held-out (1000 points)")
ax.plot(steps, train, color="tab:gray", linestyle=":", label="training (30 points)")
both = np.concatenate([heldout[3:], train[3:]])
ax.set_ylim(float(np.nanmin(both)) - 0.2, float(np.nanmax(both)) + 0.2)
ax.set_ylabel("log-likelihood per point (nats)")
ax.set_title("Held-out vs training fit")

ax = axes[2]
ax.plot(steps, diag["log_joint"], color="tab:orange",
        label="$\\mathbb{E}\\,\\log p(D, w_t)$ (left axis)")
joint = diag["log_joint"][3:]
ax.set_ylim(float(np.nanmin(joint)) - 10, float(np.nanmax(joint)) + 10)
ax.set_ylabel("expected log joint (nats)", color="tab:orange")
ax.set_title("The two terms of the bound")
right = ax.twinx()  # the entropy falls much further: its own axis
right.plot(steps, diag["entropy"], color="tab:purple")
right.set_ylabel("entropy $H[q_t]$ (nats)", color="tab:purple")
ax.plot([], [], color="tab:purple", label="entropy $H[q_t]$ (right axis)")

for ax in axes:
    ax.axvline(best, color="tab:blue", linestyle="--", linewidth=1.0,
               label=f"evidence peak (step {best})")
    ax.axvline(best_heldout, color="tab:green", linestyle="--", linewidth=1.0,
               label=f"best held-out (step {best_heldout})")
    ax.set_xscale("function", functions=(lambda s: np.sqrt(np.clip(s, 0, None)), np.square))
    ax.set_xlim(0, num_steps)
    ax.set_xticks([s for s in (0, 10, 25, 50, 100, 200, 400, 600) if s <= num_steps])
    ax.set_xlabel("gradient-descent step")
    ax.legend(fontsize=8, frameon=False, loc="lower center" if ax is axes[2] else "best")
fig.suptitle(f"Gradient-descent evidence (Duvenaud et al. 2016): {num_restarts} restarts "
             f"from q0 = N(0, 0.3²), β = {diag['step_size']:.2g}, tanh network with "
             f"{sum(p.numel() for p in family.parameters())} weights, 30 training points")
fig.tight_layout()
figure = out_dir / "05_gradient_descent_evidence.png"
fig.savefig(figure, dpi=110)
plt.close(fig)
print(f"figure: {figure}")
