"""The bundled digits: split, scaling, subsampling, determinism and bad arguments."""

from __future__ import annotations

import pytest
import torch

import pyro_structsel as ps
from pyro_structsel.datasets import Dataset, load_digits


def test_digits_split_shapes_and_dtypes() -> None:
    data = load_digits()
    assert isinstance(data, Dataset)
    assert data.x_train.shape == (1348, 64) and data.x_test.shape == (449, 64)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_features == 64 and data.num_classes == 10
    assert "1348 train / 449 test" in repr(data)


def test_scaler_is_fitted_on_the_train_split_only() -> None:
    data = load_digits()
    mean, std = data.x_train.double().mean(0), data.x_train.double().std(0, unbiased=False)
    constant = std == 0  # pixels that are always blank in the training split
    torch.testing.assert_close(mean, torch.zeros(64, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(std[~constant], torch.ones(int((~constant).sum()),
                                                          dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert abs(float(data.x_test.mean())) > 1e-4  # the test split is not re-centred
    raw = load_digits(standardize=False)
    assert float(raw.x_train.max()) == 16.0 and float(raw.x_train.min()) == 0.0


def test_split_is_stratified_and_seeded() -> None:
    data = load_digits(seed=3)
    train, test = torch.bincount(data.y_train), torch.bincount(data.y_test)
    assert int(train.min()) >= 125 and int(test.min()) >= 40 and int(test.max()) <= 47
    again = load_digits(seed=3)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    other = load_digits(seed=4)
    assert not torch.equal(data.y_train, other.y_train)


@pytest.mark.parametrize("size", [20, 300, 1790])
def test_subsample_keeps_every_class(size: int) -> None:
    data = load_digits(subsample=size, seed=1)
    assert len(data.y_train) + len(data.y_test) == size
    assert torch.bincount(data.y_train, minlength=10).min() >= 1
    assert torch.bincount(data.y_test, minlength=10).min() >= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"test_size": 0.0}, r"Expected 0 < test_size < 1"),
    ({"test_size": 1.0}, r"Expected 0 < test_size < 1"),
    ({"subsample": 5}, r"Expected 20 <= subsample <= 1797"),
    ({"subsample": 5000}, r"Expected 20 <= subsample <= 1797"),
    ({"subsample": 2.5}, r"Expected subsample to be an int"),
    ({"seed": "zero"}, r"Expected seed to be an int"),
    ({"subsample": 30, "test_size": 0.9}, r"leaves fewer training rows than classes"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


def test_teacher_network_is_seeded_and_sized():
    teacher = ps.datasets.TeacherNetwork(num_data=50, in_features=3)
    x, y = teacher.sample("tanh", seed=4)
    assert x.shape == (50, 3) and y.shape == (50,)
    again = teacher.sample("tanh", seed=4)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(y, teacher.sample("relu", seed=4)[1])
    x2, y2 = teacher.sample(("relu", "tanh"), seed=4)
    assert x2.shape == (50, 3) and y2.shape == (50,)


@pytest.mark.parametrize("activations, match", [
    (("relu", "tanh", "identity"), "one activation or two"),
    ((), "one activation or two"),
])
def test_teacher_network_refuses_bad_activations(activations, match):
    with pytest.raises(ValueError, match=match):
        ps.datasets.TeacherNetwork().sample(activations, seed=0)
