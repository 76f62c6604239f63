r"""Tutorial 06 — which evidence estimate orders a user-written network family like held-out data?

Users write their networks in plain Pyro: weights as ``pyro.sample`` sites,
``x @ W`` inside, ``ps.structure(...)`` for the choice of activation. Here the
family is a two-hidden-layer classifier, widths 16, N(0, 1) weights, with
two structural sites (one per hidden layer) choosing relu, tanh or identity:
nine structures. Which structure is best? :func:`pyro_structsel.compare_structures`
answers with an estimate of the evidence :math:`\ln p(D \mid s)` of each;
this tutorial checks those answers against what a structure is worth on data
it has never seen:

* the **truth** of a structure is the held-out log-likelihood per test
  point of networks of that structure trained independently (MAP under the
  same prior, several seeds);
* only some pairs of structures can be told apart by that truth at all
  (their mean difference exceeds 2 standard errors over the seeds), so an
  estimator is scored by the **share of those truth-resolved pairs it orders
  the same way**, with Kendall's :math:`\tau` over all nine beside it, and
  the **regret** of its pick (held-out nats per point below the best);
* the truth's own seed-to-seed :math:`\tau` (two disjoint halves of the
  seeds) is the ceiling of any ordering.

Two data sets from scikit-learn (bundled, no download): digits (600 training
rows, 1000 test digits, 10 classes) and breast cancer (300 training rows,
benign vs malignant, a Bernoulli likelihood). The families, the truth and
the pair scoring live in ``benchmarks/structure_truth.py``; the full
comparison of every estimator is ``benchmarks/evidence_vs_truth.py``, and
its figures are in ``benchmarks/README.md``.

Run it as a script::

    python tutorials/06_user_network_evidence.py          # ~20 min CPU
    python tutorials/06_user_network_evidence.py --quick  # 4 structures, short fits (also: CI=1)
"""

from __future__ import annotations

import os
import sys
import warnings

from tutorial_setup import tutorial_settings  # first: figures go to files

import matplotlib.pyplot as plt  # noqa: E402

import pyro_structsel as ps  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import structure_truth as st  # noqa: E402

# %% [markdown]
# ## 0. Settings
#
# The quick mode (``CI`` set, or ``--quick``) keeps four structures, two
# seeds and short fits: the same code, for the test-suite.

settings = tutorial_settings(__doc__, quick_help="4 structures, short fits (also when CI is set)")
quick, out_dir = settings.quick, settings.out
seeds = range(2 if quick else 6)
num_steps = 30 if quick else 1000  # SVI steps per structure inside compare_structures

# %% [markdown]
# ## 1. The model, as a user writes it
#
# ``st.make_classifier`` returns this function (shown here in full)::
#
#     def model(x, y=None):
#         w1 = pyro.sample("w1", dist.Normal(0., 1.).expand([64, 16]).to_event(2))
#         b1 = pyro.sample("b1", dist.Normal(0., 1.).expand([16]).to_event(1))
#         ...                                    # w2, b2, w3, b3 alike
#         g1 = ps.structure("layer1", ["relu", "tanh", "identity"])
#         g2 = ps.structure("layer2", ["relu", "tanh", "identity"])
#         h = mixed(g1, x @ w1 + b1)             # sum_k g1[k] * act_k(x @ w1 + b1)
#         h = mixed(g2, h @ w2 + b2)
#         with pyro.plate("data", x.shape[0]):
#             pyro.sample("y", dist.Categorical(logits=h @ w3 + b3), obs=y)
#
# No ``NetworkModel``: every estimator works on the model's trace.

# %% [markdown]
# ## 2. The estimators
#
# * ``"laplace"`` with its defaults: the mode is searched from the fitted
#   posterior, the curvature is the generalised Gauss–Newton matrix built
#   from the trace (its diagonal on a network), the model's own parameters
#   set by one rule (there are none here);
# * the same with the full GGN, and with Kronecker factors (K-FAC);
# * ``"elbo"``: the fitted mean-field q's lower bound;
# * ``"iwae"``: importance sampling from the Laplace Gaussian (full GGN), an
#   unbiased correction of Laplace whose Pareto k-hat says how far from
#   Gaussian the posterior is; its rows are flagged when k-hat > 0.7.

ESTIMATORS = {
    "laplace (default)": {},
    "laplace, full GGN": {"hessian_structure": "full"},
    "laplace, K-FAC": {"hessian_structure": "kron"},
    "elbo": {"method": "elbo", "num_samples": 200 if quick else 1000},
    "iwae (Laplace proposal)": {"method": "iwae", "num_samples": 300},
}
if quick:
    ESTIMATORS = {k: ESTIMATORS[k] for k in ("laplace (default)", "elbo")}


def score_family(family: st.Family) -> dict[str, dict]:
    """Truth of every structure, and every estimator's ordering of them."""
    truth = st.truth(family, seeds, adam_steps=30 if quick else 300,
                     lbfgs_iter=30 if quick else 500)
    summary = st.truth_summary(truth)
    rows = {}
    for name, options in ESTIMATORS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreliable rows are flagged in the table
            table = ps.compare_structures(family.model, family.x_train, family.y_train,
                                          structures=family.structures, num_steps=num_steps,
                                          seed=0, progress=False, **options)
        scores = dict(table["log_evidence"])
        rows[name] = {"scores": scores, "flagged": int(table["flagged"].sum()),
                      **st.score_ordering(scores, truth)}
    return {"truth": truth, "summary": summary, "rows": rows}


# %% [markdown]
# ## 3. Score both families

families = {"digits": st.digits_family(), "breast_cancer": st.breast_cancer_family()}
if quick:  # four structures of digits only
    families = {"digits": families["digits"]}
    families["digits"].structures = [{"layer1": a, "layer2": b}
                                     for a in ("relu", "identity") for b in ("tanh", "identity")]
results = {name: score_family(family) for name, family in families.items()}

for name, result in results.items():
    summary = result["summary"]
    print(f"\n{name}: {summary['resolved_pairs']} truth-resolved pairs of "
          f"{len(result['truth']) * (len(result['truth']) - 1) // 2}; seed-to-seed tau of the "
          f"truth {summary['seed_to_seed_tau']:.2f}; best {summary['best']}")
    print(f"{'estimator':28s} {'right':>9s} {'share':>6s} {'tau':>6s} {'regret':>8s} "
          f"{'flagged':>7s}  pick")
    for estimator, row in result["rows"].items():
        print(f"{estimator:28s} {row['ordered_right']:>4d}/{row['resolved_pairs']:<4d} "
              f"{row['share']:6.2f} {row['kendall_tau']:6.2f} {row['regret']:8.4f} "
              f"{row['flagged']:7d}  {row['pick']}")

# %% [markdown]
# ## 4. The picture: evidence per training point against held-out truth
#
# Each panel is one estimator; each dot a structure. An estimator that orders
# like the truth draws an increasing cloud.

for name, result in results.items():
    truth_mean = result["summary"]["mean"]
    panels = list(result["rows"])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    num_train = len(families[name].y_train)
    for ax, estimator in zip(axes[0], panels):
        scores = result["rows"][estimator]["scores"]
        labels = [k for k in scores if k in truth_mean]
        ax.scatter([truth_mean[k] for k in labels], [scores[k] / num_train for k in labels])
        ax.set_title(estimator, fontsize=8)
        ax.set_xlabel("held-out log-lik / point")
    axes[0][0].set_ylabel("log evidence / training point")
    fig.tight_layout()
    fig.savefig(out_dir / f"06_{name}_evidence_vs_truth.png", dpi=100)
    plt.close(fig)
print(f"\nfigures in {out_dir}")
