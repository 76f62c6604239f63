"""Measure teacher recovery of select_structure under chosen settings (not collected by pytest).

Example::

    python benchmarks/recovery_sweep.py --prior concrete --steps 400
    python benchmarks/recovery_sweep.py --prior concrete --labels relu,tanh,sigmoid,identity \
        --steps 400 --restarts 3 --temperature 2,0.2
    python benchmarks/recovery_sweep.py --two-layer --prior dirichlet --steps 800

Prints one line per seed (teacher, choice, q(argmax γ = k), seconds) and the count.

The two-hidden-layer teacher is measured here, not asserted in the tests:
with relu, tanh, identity per layer it recovered both layers in only 4/10
seeds (Dirichlet, 800 steps; 3/10 Concrete; 4/10 with per-candidate
weights). Two layers add near-nestings: a relu layer whose inputs stay
positive is the identity, an identity layer folds into the next one's
weights, a tanh layer with small weights is nearly linear, so (identity,
relu), (relu, identity), (identity, tanh) teachers are explained as well by
(relu, relu) or (tanh, tanh), and only the weight prior separates them.
On the teachers the data can tell apart (``--distinguishable``: relu/tanh
layers, students over relu/tanh/identity, 800 steps) the default discrete
check (GGN Laplace of each pruned network) recovered 8/10, the relaxed pick
alone 7/10 (``--no-check``); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the teachers and the recovery harness are the tests' (tests/test_recovery.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import torch  # noqa: E402

import pyro_structsel as ps  # noqa: E402
from test_recovery import (  # noqa: E402
    CANDIDATES, TEACHER_LABELS, Teacher, expected_structure, recover)


@dataclass(frozen=True)
class TwoLayerTeacher(Teacher):
    """``y = V σ2(W2 σ1(W1 x + b1)) + ε``; the student is ``ps.two_hidden_layer``."""

    num_data: int = 300
    shared_weights: bool = True
    candidates: tuple[str, ...] = CANDIDATES

    def model(self, prior: str) -> ps.NetworkModel:
        family = ps.two_hidden_layer(self.in_features, 1,
                                     hidden=(self.student_hidden, self.student_hidden),
                                     activations=self.candidates,
                                     shared_weights=self.shared_weights)
        return ps.NetworkModel(family, likelihood="normal", noise_scale=self.noise, prior=prior)


def two_layer_labels(seed: int, labels: tuple[str, ...] = TEACHER_LABELS) -> tuple[str, str]:
    """The seed's pair of teacher activations: the pairs of ``labels`` in turn."""
    k = len(labels)
    return labels[seed % k], labels[(seed // k) % k]


#: Two-layer teachers whose structure the data can tell apart: layers from relu and tanh,
#: students choosing among relu, tanh and identity. An identity layer folds into the next
#: layer's weights (and a relu layer whose inputs stay positive is one), so (identity, ·)
#: and (·, identity) teachers are nested in other structures; and sigmoid(z) =
#: (1 + tanh(z / 2)) / 2 is tanh up to an affine map the next layer absorbs, so a student
#: offered sigmoid cannot tell it from tanh. Only the weight prior separates those.
DISTINGUISHABLE = ("relu", "tanh")
DISTINGUISHABLE_CANDIDATES = ("relu", "tanh", "identity")




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="dirichlet", choices=["dirichlet", "concrete"])
    parser.add_argument("--two-layer", action="store_true",
                        help="two-hidden-layer teacher (the 9 pairs of relu, tanh, identity)")
    parser.add_argument("--separate-weights", action="store_true",
                        help="two-layer student with per-candidate weights")
    parser.add_argument("--labels", default=None,
                        help="teacher activations, cycled over the seeds (two-layer: their "
                             "pairs; default relu,tanh,identity)")
    parser.add_argument("--distinguishable", action="store_true",
                        help="two-layer teachers the data can tell apart: the pairs of relu, "
                             "tanh, students choosing among relu, tanh, identity")
    parser.add_argument("--candidates", default=None,
                        help="two-layer: the student's candidate activations per layer "
                             f"(default {','.join(CANDIDATES)})")
    parser.add_argument("--no-check", action="store_true",
                        help="two-layer: no discrete check (the relaxed pick alone)")
    parser.add_argument("--check-steps", type=int, default=None,
                        help="SVI steps of each structure's fit in the discrete check")
    parser.add_argument("--check-method", default=None,
                        help="evidence estimator of the discrete check (default: select_structure's)")
    parser.add_argument("--evidence-samples", type=int, default=20,
                        help="num_evidence_samples (the relaxed fit's scoring and the check's)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--temperature", default=None, help="T or T0,T1 (annealed)")
    parser.add_argument("--num-data", type=int, default=Teacher.num_data)
    parser.add_argument("--student-hidden", type=int, default=Teacher.student_hidden)
    parser.add_argument("--teacher-hidden", type=int, default=Teacher.hidden)
    parser.add_argument("--w-positive", type=int, default=int(Teacher.w_positive))
    parser.add_argument("--w-scale", type=float, default=Teacher.w_scale)
    parser.add_argument("--output-std", type=float, default=Teacher.output_std)
    parser.add_argument("--x-scale", type=float, default=Teacher.x_scale)
    parser.add_argument("--init-scale", type=float, default=None,
                        help="override default_guide's AutoNormal init_scale")
    parser.add_argument("--init-concentration", type=float, default=None,
                        help="override default_guide's AutoStructure init_concentration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.init_scale is not None or args.init_concentration is not None:
        import pyro_structsel.infer.guides as guides

        original = guides.default_guide

        def patched(*a, **k):
            if args.init_scale is not None:
                k["init_scale"] = args.init_scale
            if args.init_concentration is not None:
                k["init_concentration"] = args.init_concentration
            return original(*a, **k)

        guides.default_guide = patched
    temperature = None
    if args.temperature:
        values = [float(v) for v in args.temperature.split(",")]
        temperature = values[0] if len(values) == 1 else (values[0], values[1])
    one_layer = Teacher(num_data=args.num_data, student_hidden=args.student_hidden,
                        hidden=args.teacher_hidden, w_positive=bool(args.w_positive),
                        w_scale=args.w_scale, output_std=args.output_std, x_scale=args.x_scale)
    teacher = (TwoLayerTeacher(student_hidden=args.student_hidden,
                               shared_weights=not args.separate_weights,
                               candidates=tuple(args.candidates.split(",")) if args.candidates
                               else DISTINGUISHABLE_CANDIDATES if args.distinguishable
                               else CANDIDATES)
               if args.two_layer else one_layer)
    labels = tuple(args.labels.split(",")) if args.labels else (
        DISTINGUISHABLE if args.distinguishable else TEACHER_LABELS)
    options = {}
    if args.two_layer:
        options = {"discrete_check": not args.no_check, "check_steps": args.check_steps}
        if args.check_method:
            options["check_method"] = args.check_method
    options["num_evidence_samples"] = args.evidence_samples
    recovered, relaxed_recovered, start = 0, 0, time.time()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        label = two_layer_labels(seed, labels) if args.two_layer else labels[seed % len(labels)]
        tic = time.time()
        result = recover(args.prior, seed, label, teacher=teacher, num_steps=args.steps,
                         lr=args.lr, num_restarts=args.restarts, temperature=temperature,
                         **options)
        ok = result.structure == expected_structure(label)
        relaxed_ok = result.relaxed_structure == expected_structure(label)
        recovered += ok
        relaxed_recovered += relaxed_ok
        q = "; ".join(" ".join(f"{float(p):.2f}" for p in v)
                      for v in result.relaxed_probabilities.values())
        line = (f"seed {seed}: teacher {label} chose {list(result.structure.values())} "
                f"{'ok ' if ok else 'BAD'} relaxed q=[{q}]")
        if result.discrete_check is not None:
            check = result.discrete_check
            line += (f" relaxed pick {list(check.relaxed_structure.values())} "
                     f"{'ok' if relaxed_ok else 'BAD'}; {check.num_fits} fits, "
                     f"p(chosen)={float(check.table['probability'].iloc[0]):.2f}")
        print(f"{line} {time.time() - tic:.1f}s", flush=True)
    print(f"recovered {recovered}/{len(seeds)} (relaxed pick {relaxed_recovered}/{len(seeds)}) "
          f"in {time.time() - start:.0f}s: {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
