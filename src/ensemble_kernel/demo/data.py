"""The demo's data sets: generated (MNIST-1D) or shipped with a dependency (digits).

Nothing here downloads: MNIST-1D comes from the `mnist1d` package's `make_dataset`
(never its `get_dataset`, which downloads), digits from scikit-learn's bundled copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

__all__ = ["Dataset", "load_dataset", "DATASETS"]

DATASETS = ("mnist1d", "digits")


@dataclass(frozen=True)
class Dataset:
    """Inputs and labels of both splits.

    Attributes
    ----------
    x_train, x_test : float32 arrays of shape (n, L) (signals) or (n, H, W) (images).
    y_train, y_test : int64 arrays of shape (n,).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def signals(self, split: str) -> np.ndarray:
        """The inputs as (n, L) sequences, what the 1-D networks read."""
        x = self.x_train if split == "train" else self.x_test
        return x.reshape(len(x), -1)


def _mnist1d() -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split = 5000, 0.8  # 4,000 train / 1,000 test
    # make_dataset seeds the global `random` and NumPy generators: leave them as found.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return Dataset("mnist1d", data["x"].astype(np.float32), data["y"].astype(np.int64),
                   data["x_test"].astype(np.float32), data["y_test"].astype(np.int64),
                   tuple(str(c) for c in range(10)))


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=0.3, stratify=digits.target,
        random_state=0)
    mean, std = x_train.mean(), x_train.std()
    return Dataset("digits", (x_train - mean) / std, y_train, (x_test - mean) / std, y_test,
                   tuple(str(c) for c in range(10)))


def load_dataset(name: str) -> Dataset:
    """'mnist1d' (4,000 / 1,000 signals of length 40) or 'digits' (1,257 / 540 8x8 images)."""
    if name == "mnist1d":
        return _mnist1d()
    if name == "digits":
        return _digits()
    raise InputError(f"--dataset takes {' or '.join(DATASETS)}, got {name!r}")
