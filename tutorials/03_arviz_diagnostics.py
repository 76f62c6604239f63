"""Tutorial 03: diagnosing a structure-selection fit in ArviZ.

We select the convolutions of a small convolutional network on
scikit-learn's 8×8 digits (per block: Conv 3×3, or Conv 1×1 then Conv 3×3),
export the fit to ArviZ with ``ps.to_inference_data``, and ask the usual
questions of a Bayesian fit:

1. what is the posterior over the structure Γ (``az.summary``, plots)?
2. has the ELBO converged, and does q cover the posterior (PSIS k̂)?
3. how well does it predict, compared with the best fixed structure
   (``az.loo``, ``az.compare``)?

Run ``python tutorials/03_arviz_diagnostics.py [--quick] [--out DIR]`` (or set
``STRUCTSEL_TUTORIAL_OUT``) to choose where figures and ``idata.nc`` go; the
quick mode (also when ``CI`` is set) uses a subsample and few steps, so its
numbers are rough and its diagnostics (rightly) warn.
"""

from __future__ import annotations

import warnings

from tutorial_setup import tutorial_settings  # first: figures go to files

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from pyro_structsel.datasets import load_digits  # noqa: E402

settings = tutorial_settings(__doc__)
QUICK, OUT = settings.quick, settings.out
STEPS = 20 if QUICK else 1500
SAMPLES = 60 if QUICK else 500
BATCH = 50 if QUICK else 128


def show_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print the warnings a step raised, by category."""
    for w in caught:
        print(f"  [{w.category.__name__}] {str(w.message)[:160]}")


# %% Data: 8x8 images as (N, 1, 8, 8); labels 0..9.
data = load_digits(subsample=200 if QUICK else None, seed=0)
images = data.x_train.reshape(-1, 1, 8, 8)
print(f"{len(images)} training images of {data.num_classes} digits")

# %% 1. Select the structure. batch_size subsamples the data plate during the
# fit; the export below drops it and scores every image.
conv = ps.NetworkModel(ps.conv_family(channels=(4, 8)), likelihood="categorical")
result = ps.select_structure(conv, images, data.y_train, num_steps=STEPS, lr=0.02,
                             batch_size=BATCH, seed=0, progress=not QUICK,
                             num_evidence_samples=SAMPLES)
print(result)

# %% 2. Export to ArviZ: posterior and prior of Γ (option labels as coordinates),
# pointwise log-likelihood, sample stats (log p, log q, log weights), the ELBO
# trace, and the evidence, complexities and diagnostics in attrs.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    idata = ps.to_inference_data(result, num_samples=SAMPLES, chunk_size=100, seed=0)
print(idata)
print("diagnostics of the fit:")
show_warnings(caught)
idata.to_netcdf(str(OUT / "idata.nc"))

# %% 3. The posterior over Γ in ArviZ's terms. The draws are independent draws
# from q in one chain, so r_hat is undefined; "stats" leaves it out.
sites = list(result.sites)
print(az.summary(idata, var_names=sites, kind="stats"))
ps.plot_structure_posterior(idata, path=OUT / "structure_posterior.png")
ps.plot_elbo(idata, path=OUT / "elbo.png")
az.plot_posterior(idata, var_names=sites)
plt.gcf().savefig(OUT / "az_plot_posterior.png", dpi=100)

# %% 4. Does q cover the posterior? Pareto k̂ of the importance weights
# log p(D, z) - log q(z) (Yao et al. 2018): below 0.5 good, 0.5..0.7 usable,
# above 0.7 the ELBO and anything importance-weighted from q are unreliable.
# Mean-field q over a few hundred weights usually lands above 0.7: the structure
# probabilities are then a statement about q, and should be checked by
# comparing fixed structures (ps.compare_structures) and held-out accuracy.
print(result.diagnostics)
print(f"k-hat = {idata.attrs['khat']:.2f}, ESS of the importance weights = "
      f"{idata.attrs['importance_ess']:.1f} of {idata.attrs['importance_num_samples']}")

# %% 5. Predictive comparison with the best fixed structure: the same network
# with Γ pinned at the chosen vertex (ps.fix_structure) and only its weights
# fitted. Same observations, so az.loo and az.compare apply. If the selection
# fit predicts about as well, the mixture over structures costs nothing; if the
# fixed network is far ahead, q over Γ and w had not yet settled.
best = result.structure
fixed = ps.select_structure(ps.fix_structure(conv, best), images, data.y_train,
                            num_steps=STEPS, lr=0.02, batch_size=BATCH, seed=0,
                            progress=not QUICK, num_evidence_samples=SAMPLES)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fixed_idata = ps.to_inference_data(fixed, num_samples=SAMPLES, chunk_size=100, seed=0)
    comparison = az.compare({"selection": idata,
                             f"fixed {ps.structure_label(best)}": fixed_idata})
print(comparison[["rank", "elpd_loo", "p_loo", "elpd_diff", "dse", "warning"]])
show_warnings(caught)
print("log evidence (ELBO): " + ", ".join(
    f"{name} {r.evidence['elbo'].value:.1f} ± {r.evidence['elbo'].se:.1f}"
    for name, r in (("selection", result), ("fixed", fixed))))
print(f"figures and idata.nc in {OUT}")
