"""KernelKNN: kernel k-nearest-neighbour classification with a scikit-learn-like interface.

`fit` keeps the training logits and labels; every other method computes the test ->
train neighbours through `top_k_neighbors` and votes with the same functions as
`evaluate` and the `predict` command, so `score` equals `evaluate`'s kernel accuracy on
the same neighbours.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core._engine import top_k_neighbors
from ..errors import InputError
from ._evaluation import _require_train_split, accuracy
from ..core._neighbors import Neighbors, knn_scores, predict_from_scores, weighted_scores
from ..core._precision import PRECISIONS, Precision
from ..storage._runs import as_labels
from ..core._sources import LogitSource, as_source, check_pair

__all__ = ["KernelKNN"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"KernelKNN: {name} must be a positive integer, got {value!r}")
    return int(value)


class KernelKNN:
    """k-nearest-neighbour classifier under the ensemble kernel.

    Parameters
    ----------
    k : int, default 3
        Neighbours that vote. The model card's vote is k=3; its weighted vote k=20.
    weighted : bool, default False
        False: majority vote of the k neighbours. True: each neighbour votes with
        K ** `power` (its kernel value raised to the power).
    power : int, default 4
        The weighted vote's power (ignored by the majority vote).
    precision : {'auto', 'exact', 'fast'}, default 'auto'
        As for `top_k_neighbors`: every choice returns the same neighbours; 'fast' is
        faster only where the hardware has fast bfloat16 products, and 'auto' probes.
    memory_budget : int, optional
        Bytes of working memory for the kernel; default a quarter of what is available.
    device : str, default 'cpu'
        'cpu' or 'cuda'.
    log_softmax : bool, default True
        Normalise the logits with log-softmax first.

    Attributes
    ----------
    train_ : LogitSource of shape (n_models, n_train, n_classes)
        The training logits given to `fit`.
    labels_ : Tensor of shape (n_train,), int64
    n_classes_ : int

    Examples
    --------
    >>> model = KernelKNN(k=3).fit(train_logits, y_train)  # doctest: +SKIP
    >>> model.score(test_logits, y_test)  # doctest: +SKIP
    0.952
    """

    def __init__(self, k: int = 3, *, weighted: bool = False, power: int = 4,
                 precision: Precision = "auto", memory_budget: int | None = None,
                 device: str = "cpu", log_softmax: bool = True):
        self.k = _positive_int("k", k)
        self.weighted = bool(weighted)
        self.power = _positive_int("power", power)
        if precision not in PRECISIONS:
            raise InputError(f"KernelKNN: precision must be 'auto', 'exact' or 'fast', "
                             f"got {precision!r}")
        self.precision = precision
        self.memory_budget = memory_budget
        self.device = device
        self.log_softmax = bool(log_softmax)
        self.train_: LogitSource | None = None

    def __repr__(self) -> str:
        vote = f"weighted=True, power={self.power}" if self.weighted else "weighted=False"
        fitted = ("" if self.train_ is None else
                  f"; fitted on {self.train_.n_models} runs x {self.train_.n_examples} examples")
        return f"KernelKNN(k={self.k}, {vote}, precision={self.precision!r}){fitted}"

    def fit(self, train_logits, y_train) -> "KernelKNN":
        """Keep the training logits and labels (nothing is computed yet).

        Parameters
        ----------
        train_logits : array, Tensor or LogitSource of shape (n_models, n_train, n_classes)
        y_train : array or Tensor of shape (n_train,), integers in 0..n_classes-1

        Returns
        -------
        KernelKNN
            self.
        """
        train = as_source(train_logits, "train logits")
        _require_train_split(train, "KernelKNN.fit")
        if self.k > train.n_examples:
            raise InputError(f"KernelKNN: k must be between 1 and {train.n_examples} (the "
                             f"number of training examples), got {self.k}: pass k <= "
                             f"{train.n_examples}")
        self.labels_ = as_labels(y_train, train.n_examples, train.n_classes, "train")
        self.n_classes_ = train.n_classes
        self.train_ = train
        return self

    def _test(self, test_logits) -> LogitSource:
        if self.train_ is None:
            raise InputError("KernelKNN is not fitted: call fit(train_logits, y_train) first")
        test = as_source(test_logits, "test logits")
        check_pair(test, self.train_)
        return test

    def kneighbors(self, test_logits, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar training examples of each test example.

        Parameters
        ----------
        test_logits : array, Tensor or LogitSource of shape (n_models, n_test, n_classes)
            From the same runs, in the same order, as the training logits.
        k : int, optional
            Default: the model's k.

        Returns
        -------
        values : Tensor of shape (n_test, k), float32
            Kernel values, best first.
        indices : Tensor of shape (n_test, k), int64
            Indices into the training examples; equal values: smaller index first.
        """
        found = self._neighbors(test_logits, self.k if k is None else _positive_int("k", k))
        return found.values, found.indices

    def _neighbors(self, test_logits, k: int) -> Neighbors:
        test = self._test(test_logits)
        if k > self.train_.n_examples:
            raise InputError(f"KernelKNN: k must be between 1 and {self.train_.n_examples} "
                             f"(the number of training examples), got {k}")
        return top_k_neighbors(self.train_, test, k, log_softmax=self.log_softmax,
                               precision=self.precision, memory_budget=self.memory_budget,
                               device=self.device)

    def _scores(self, test_logits) -> torch.Tensor:
        found = self._neighbors(test_logits, self.k)
        if self.weighted:
            return weighted_scores(found, self.labels_, self.n_classes_, self.power).cpu()
        return knn_scores(found, self.labels_, self.n_classes_).cpu()

    def predict(self, test_logits) -> torch.Tensor:
        """The vote's class for each test example (ties: the smallest label).

        Parameters
        ----------
        test_logits : array, Tensor or LogitSource of shape (n_models, n_test, n_classes)

        Returns
        -------
        Tensor of shape (n_test,), int64
        """
        return predict_from_scores(self._scores(test_logits))[0]

    def predict_proba(self, test_logits) -> torch.Tensor:
        """Per-class vote shares.

        The majority vote: the fraction of the k neighbours carrying each class. The
        weighted vote: each class's sum of K ** power, divided by the row's sum over
        classes. A row whose weights sum to zero or less (every neighbour at K = 0, or
        negative values under an odd power) has no share to give: it is uniform.

        Parameters
        ----------
        test_logits : array, Tensor or LogitSource of shape (n_models, n_test, n_classes)

        Returns
        -------
        Tensor of shape (n_test, n_classes), float32; rows sum to 1.
        """
        scores = self._scores(test_logits)
        if not self.weighted:
            return scores
        total = scores.double().sum(dim=1, keepdim=True)
        shares = scores.double() / total.where(total > 0, torch.ones_like(total))
        uniform = torch.full_like(shares, 1.0 / self.n_classes_)
        return shares.where(total > 0, uniform).float()

    def score(self, test_logits, y_test) -> float:
        """Accuracy of `predict` on labelled test examples.

        Parameters
        ----------
        test_logits : array, Tensor or LogitSource of shape (n_models, n_test, n_classes)
        y_test : array or Tensor of shape (n_test,)

        Returns
        -------
        float
            The fraction of test examples predicted right, in [0, 1].
        """
        test = self._test(test_logits)
        if test.n_examples == 0:  # (an accuracy of nothing: NaN, not a number to report)
            raise InputError("KernelKNN.score: the test logits have 0 examples; an accuracy "
                             "needs at least one")
        labels = as_labels(y_test, test.n_examples, test.n_classes, "test")
        return accuracy(self.predict(test), labels)
