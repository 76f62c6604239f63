r"""Data with no download: scikit-learn's handwritten digits, and synthetic teacher networks.

The digits data set holds 1797 greyscale images of 8×8 pixels (64 features,
values 0–16) of the digits 0–9. :func:`load_digits` returns a seeded,
stratified train/test split as torch tensors, with the features standardised
by a scaler fitted on the training split only (no information leaks from the
test split).

:class:`TeacherNetwork` draws regression data from a small network whose
activations are known, so a selection can be checked against the truth.

References
----------
E. Alpaydin, C. Kaynak. Optical recognition of handwritten digits data set.
UCI Machine Learning Repository, 1998.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model.family import activation

__all__ = ["Dataset", "TeacherNetwork", "load_digits"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of a classification data set, as torch tensors.

    Attributes
    ----------
    x_train, x_test : torch.Tensor
        Features, ``float32``, shape ``(n, num_features)``.
    y_train, y_test : torch.Tensor
        Class labels, ``int64``, shape ``(n,)``.
    feature_names : tuple of str
        One name per feature column.
    class_names : tuple of str
        One name per class (label ``k`` is ``class_names[k]``).
    name : str
        Name of the data set.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    name: str = ""

    @property
    def num_features(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"{self.num_features} features, {self.num_classes} classes)")


def load_digits(*, test_size: float = 0.25, subsample: int | None = None,
                seed: int = 0, standardize: bool = True) -> Dataset:
    """scikit-learn's bundled handwritten digits (8×8 images, 10 classes), split and scaled.

    Parameters
    ----------
    test_size : float
        Fraction of the (possibly subsampled) rows held out for testing, in (0, 1).
    subsample : int, optional
        Keep only this many rows, drawn stratified by class (for quick runs);
        default: all 1797.
    seed : int
        Seed of the subsample and of the stratified split.
    standardize : bool
        Standardise every feature to mean 0 and standard deviation 1 on the
        training split (constant features are left at 0).

    Returns
    -------
    Dataset
        ``x_*`` as ``float32``, ``y_*`` as ``int64``.

    Example
    -------
    >>> data = load_digits(subsample=500, seed=1)
    >>> data.x_train.shape, data.y_train.dtype
    (torch.Size([375, 64]), torch.int64)
    """
    from sklearn.datasets import load_digits as _sklearn_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if not (isinstance(test_size, (int, float)) and 0.0 < test_size < 1.0):
        raise ValueError(f"Expected 0 < test_size < 1, but got {test_size!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Expected seed to be an int, but got {seed!r}.")
    bunch = _sklearn_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    num_classes = len(bunch.target_names)
    if subsample is not None:
        if isinstance(subsample, bool) or not isinstance(subsample, (int, np.integer)):
            raise ValueError(f"Expected subsample to be an int or None, but got {subsample!r}.")
        minimum = 2 * num_classes
        if not minimum <= subsample <= len(y):
            raise ValueError(f"Expected {minimum} <= subsample <= {len(y)} (the digits data set "
                             f"has {len(y)} rows, {num_classes} classes), but got {subsample}.")
        keep = _stratified_subset(y, int(subsample), np.random.default_rng(int(seed)))
        x, y = x[keep], y[keep]
    n_test = max(num_classes, round(test_size * len(y)))
    if len(y) - n_test < num_classes:
        raise ValueError(f"test_size={test_size} leaves fewer training rows than classes; "
                         "lower test_size or raise subsample.")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=int(seed))
    if standardize:
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    return Dataset(
        x_train=torch.as_tensor(x_train, dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=torch.as_tensor(x_test, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        feature_names=tuple(str(n) for n in bunch.feature_names),
        class_names=tuple(str(n) for n in bunch.target_names),
        name="digits",
    )


def _stratified_subset(y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` rows, shuffled within each class, classes kept in proportion."""
    key = np.empty(len(y))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        # the i-th shuffled row of a class gets key (i + u) / n: every class fills evenly
        key[rng.permutation(rows)] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.sort(np.argsort(key, kind="stable")[:size])


@dataclass(frozen=True)
class TeacherNetwork:
    r"""Synthetic regression data from a network whose activations are known.

    With one activation :math:`\sigma`, :math:`y = V\,\sigma(W x + b) + \varepsilon`;
    with two, :math:`y = V\,\sigma_2(z) + \varepsilon` where
    :math:`z = \sigma_1(W_1 x + b_1) W_2`, centred and scaled column by column
    to standard deviation ``preactivation_std`` so that :math:`\sigma_2` works
    in its nonlinear range. The teacher is identifiable by design: inputs of
    standard deviation ``x_scale``, positive input weights of order 1–2
    (``w_positive``), so the pre-activations reach the kink of relu and the
    saturation of tanh and the hidden units do not cancel out; positive output
    weights; small Gaussian noise of known scale ``noise``.

    Each ``(seed, activations)`` draws from its own generator, so the same
    call gives the same data on any machine and in any order.

    Attributes
    ----------
    num_data, in_features, hidden : int
        Rows, inputs and hidden units (per layer).
    x_scale, w_scale, b_scale : float
        Scales of the inputs, the first-layer weights and its biases.
    w_positive : bool
        First-layer weights :math:`|\cdot| + 0.5` (one quadrant), before ``w_scale``.
    output_std : float
        Rescale the noiseless output to this standard deviation (0: off; one layer only).
    preactivation_std : float
        Standard deviation of the second layer's pre-activations (two layers).
    noise : float
        Standard deviation of the Gaussian noise.

    Example
    -------
    >>> x, y = ps.datasets.TeacherNetwork().sample("tanh", seed=0)
    >>> x, y = ps.datasets.TeacherNetwork(num_data=300).sample(("relu", "tanh"), seed=0)
    """

    num_data: int = 200
    in_features: int = 2
    hidden: int = 4
    x_scale: float = 2.0
    w_scale: float = 1.0
    w_positive: bool = True
    b_scale: float = 0.5
    output_std: float = 0.0
    preactivation_std: float = 2.5
    noise: float = 0.1

    def sample(self, activations: str | Sequence[str], seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the teacher with ``activations`` (one name, or two for two layers)."""
        labels = (activations,) if isinstance(activations, str) else tuple(activations)
        if len(labels) not in (1, 2):
            raise ValueError(f"Expected one activation or two (one per hidden layer), but got "
                             f"{activations!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected seed to be an int, but got {seed!r}.")
        if len(labels) == 1:
            return self._one_layer(labels[0], seed)
        return self._two_layers(labels, seed)

    def _one_layer(self, label: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + seed)
        x = self.x_scale * torch.randn(self.num_data, self.in_features, generator=g)
        w = torch.randn(self.in_features, self.hidden, generator=g)
        if self.w_positive:  # directions within a quadrant: the units do not cancel out
            w = w.abs() + 0.5
        w = self.w_scale * w
        b = self.b_scale * torch.randn(self.hidden, generator=g)
        v = torch.randn(self.hidden, generator=g).abs() + 0.5
        f = activation(label)(x @ w + b) @ v
        if self.output_std:
            f = f * (self.output_std / f.std())
        return x, f + self.noise * torch.randn(self.num_data, generator=g)

    def _two_layers(self, labels: tuple[str, ...], seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(2000 + seed)
        x = self.x_scale * torch.randn(self.num_data, self.in_features, generator=g)
        w1 = torch.randn(self.in_features, self.hidden, generator=g)
        if self.w_positive:
            w1 = w1.abs() + 0.5
        w1 = self.w_scale * w1
        b1 = self.b_scale * torch.randn(self.hidden, generator=g)
        h = activation(labels[0])(x @ w1 + b1)
        z = h @ torch.randn(self.hidden, self.hidden, generator=g)
        z = self.preactivation_std * (z - z.mean(0)) / z.std(0)
        v = torch.randn(self.hidden, generator=g).abs() + 0.5
        f = activation(labels[1])(z) @ v
        return x, f + self.noise * torch.randn(self.num_data, generator=g)
