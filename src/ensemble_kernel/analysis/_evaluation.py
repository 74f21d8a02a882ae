"""Accuracy tables: single models, the ensemble average, kernel k-NN and the weighted vote.

`evaluate` computes the top-max(k, weighted_k) neighbours once and reads both votes off
them; `select_by_leave_one_out` chooses k and the power on the references alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core._engine import ProgressCallback, _top_k_neighbors
from ..errors import LABELS_HINT, InputError
from ..storage._formats import _as_labels, check_labels
from ..core._neighbors import Neighbors, knn_scores, predict_from_scores, weighted_scores
from ..results import Shown
from ..core._sources import LogitSource, as_source

__all__ = [
    "Evaluation",
    "Selection",
    "singles_and_ensemble",
    "accuracy",
    "evaluate",
    "select_by_leave_one_out",
    "knn_predict",
    "weighted_predict",
]

DEFAULT_KS = (1, 3, 5, 7, 9, 15, 20)
DEFAULT_WEIGHTED = ((10, 1), (10, 2), (10, 4), (20, 1), (20, 2), (20, 4), (20, 8), (50, 4))


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to labels (both Tensors of shape (n,), n >= 1).

    Raises InputError for no examples: an accuracy of nothing is not a number to print."""
    if labels.numel() == 0:
        raise InputError("there are no examples to score: an accuracy needs at least one "
                         "labelled example", param="labels_test")
    return float((predictions.cpu() == labels.cpu()).double().mean())


# Bytes per (run, example, class) of a block read for the single-model and ensemble
# accuracies: the raw read (at most float64), a float32 copy for argmax and a float64 copy.
_BLOCK_BYTES = 8 + 4 + 8
_MAX_BLOCK = 64  # runs per block: more buys nothing


def _model_blocks(source: LogitSource, block: int):
    for m0 in range(0, source.n_models, block):
        yield m0, source.read(slice(m0, min(m0 + block, source.n_models)),
                              slice(0, source.n_examples))


def singles_and_ensemble(source: LogitSource, labels: torch.Tensor, *,
                         memory_budget: int | None = None):
    """Each run's accuracy and the ensemble's mean logits, in one pass over the runs.

    `memory_budget` (bytes) bounds the blocks of runs read at a time (and the float64
    sum kept across them); None: blocks of 64 runs.

    Returns
    -------
    (Tensor of shape (n_models,), float64; Tensor of shape (n_examples, n_classes), float64)
    """
    per_run = source.n_examples * source.n_classes
    block = _MAX_BLOCK
    if memory_budget is not None:
        block = int(min(_MAX_BLOCK, max(1, (memory_budget - 8 * per_run) //
                                        (_BLOCK_BYTES * per_run))))
    total = torch.zeros(source.n_examples, source.n_classes, dtype=torch.float64)
    singles = []
    for _, raw in _model_blocks(source, block):
        singles.append((raw.float().argmax(dim=-1) == labels).double().mean(dim=1))
        total += raw.to(torch.float64).sum(dim=0)
    return torch.cat(singles), total / source.n_models


def knn_predict(neighbors: Neighbors, reference_labels: torch.Tensor, n_classes: int, k: int):
    """Majority vote of the first k neighbours; ties: the smallest label. On the CPU."""
    scores = knn_scores(neighbors.first(k), reference_labels, n_classes)
    return predict_from_scores(scores)[0].cpu()


def weighted_predict(neighbors: Neighbors, reference_labels: torch.Tensor, n_classes: int,
                     k: int, power: int):
    """Weighted vote (K ** power) of the first k neighbours; ties: the smallest label. On the CPU."""
    scores = weighted_scores(neighbors.first(k), reference_labels, n_classes, power)
    return predict_from_scores(scores)[0].cpu()


@dataclass(frozen=True, repr=False)
class Evaluation(Shown):
    """The model card's table, as fractions in [0, 1].

    Attributes
    ----------
    n_models : int
        Runs used.
    k, weighted_k, power : int
        The k-NN vote's k; the weighted vote's k and power (weights K ** power).
    single_model_accuracy, ensemble_accuracy, knn_accuracy, weighted_accuracy : float
        Mean accuracy of one run; of the averaged logits; of kernel k-NN; of the weighted
        vote, on the test split.
    single_model_accuracies : tuple of float, shape (n_models,)
        Each run's own accuracy.
    """

    n_models: int
    k: int
    weighted_k: int
    power: int
    single_model_accuracy: float
    ensemble_accuracy: float
    knn_accuracy: float
    weighted_accuracy: float
    single_model_accuracies: tuple[float, ...] = field(repr=False, default=())

    def _title(self) -> str:
        return f"Evaluation ({self.n_models} runs)"

    def _records(self) -> list[dict]:
        return [
            {"method": "single model (mean)", "accuracy": self.single_model_accuracy},
            {"method": f"ensemble average ({self.n_models} runs)",
             "accuracy": self.ensemble_accuracy},
            {"method": f"kernel k-NN (k={self.k})", "accuracy": self.knn_accuracy},
            {"method": f"weighted vote (k={self.weighted_k}, K**{self.power})",
             "accuracy": self.weighted_accuracy},
        ]


@dataclass(frozen=True, repr=False)
class Selection(Shown):
    """What leave-one-out on the references chose, and every candidate's accuracy.

    Attributes
    ----------
    vote : {'knn', 'weighted'}
    k : int
    power : int or None
        None for the k-NN vote.
    accuracy : float
        Leave-one-out accuracy of the choice on the training split.
    table : tuple of (vote, k, power, accuracy), shape (n_candidates,)
    """

    vote: str  # 'knn' or 'weighted'
    k: int
    power: int | None
    accuracy: float  # leave-one-out accuracy of the choice
    table: tuple[tuple[str, int, int | None, float], ...]  # (vote, k, power, accuracy)

    def _title(self) -> str:
        power = f", power {self.power}" if self.power is not None else ""
        return (f"Selection: {self.vote} vote, k={self.k}{power} "
                f"(leave-one-out accuracy {self.accuracy:.4f})")

    def _records(self) -> list[dict]:
        return [{"vote": v, "k": k, "power": p, "accuracy": a, "chosen":
                 (v, k, p) == (self.vote, self.k, self.power)} for v, k, p, a in self.table]


def _require_train_split(train: LogitSource, what: str) -> None:
    """One InputError when the train split is empty (a source of test logits only)."""
    if train.n_examples == 0:
        raise InputError(
            f"{what} needs a train split, but it is empty (the source holds test logits "
            "only); within the test split use top_k_neighbors(test) alone, "
            "select_by_leave_one_out(test, labels_test) or ensemble_kernel.within")


def _require_labels(labels, split: str) -> torch.Tensor:
    """Labels as an int64 Tensor (from a list, array or Tensor); none is an InputError."""
    if labels is None:
        raise InputError(
            f"no {split} labels: the run files carry none; pass `labels_{split}` "
            f"({LABELS_HINT})", param=f"labels_{split}")
    return labels if isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 \
        else _as_labels(labels, f"{split} labels")


def evaluate(
    train: LogitSource,
    test: LogitSource,
    labels_train: torch.Tensor | None,
    labels_test: torch.Tensor | None,
    *,
    k: int = 3,
    weighted_k: int = 20,
    power: int = 4,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
    precision: str = "auto",
    memory_budget: int | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    neighbors: Neighbors | None = None,
) -> Evaluation:
    """Single-model mean, ensemble average, kernel k-NN and weighted-vote accuracy on `test`.

    Parameters
    ----------
    train, test : array, Tensor or LogitSource of shape (n_models, n_train | n_test, n_classes)
        Train first, as everywhere.
    labels_train, labels_test : array or Tensor of shape (n_train,) and (n_test,), integers.
    k : the k-NN vote's k.
    weighted_k, power : the weighted vote's k and power (weights K ** power).
    log_softmax, classes, precision, memory_budget, device, progress : as for
        `top_k_neighbors`.
    neighbors : precomputed test -> train neighbours (at least max(k, weighted_k)).

    Returns
    -------
    Evaluation
        The model card's four accuracies (and each run's own).
    """
    train, test = as_source(train, "train logits"), as_source(test, "test logits")
    _require_train_split(train, "evaluate")
    if test.n_examples == 0:
        raise InputError("evaluate needs at least one test example, got none", param="test")
    labels_train = _require_labels(labels_train, "train")
    labels_test = _require_labels(labels_test, "test")
    n_classes = train.n_classes
    check_labels(labels_train, train.n_examples, n_classes, "train")
    check_labels(labels_test, test.n_examples, n_classes, "test")
    k_max = max(k, weighted_k)
    if neighbors is None:
        neighbors = _top_k_neighbors(test, train, k_max, log_softmax=log_softmax, classes=classes,
                                    precision=precision, memory_budget=memory_budget,
                                    device=device, progress=progress)
    singles, mean_logits = singles_and_ensemble(test, labels_test, memory_budget=memory_budget)
    ensemble = mean_logits.argmax(dim=1)
    return Evaluation(
        n_models=test.n_models,
        k=k,
        weighted_k=weighted_k,
        power=power,
        single_model_accuracy=float(singles.mean()),
        ensemble_accuracy=accuracy(ensemble, labels_test),
        knn_accuracy=accuracy(knn_predict(neighbors, labels_train, n_classes, k), labels_test),
        weighted_accuracy=accuracy(
            weighted_predict(neighbors, labels_train, n_classes, weighted_k, power), labels_test),
        single_model_accuracies=tuple(float(a) for a in singles),
    )


def select_by_leave_one_out(
    train: LogitSource,
    labels_train: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    weighted: Sequence[tuple[int, int]] = DEFAULT_WEIGHTED,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
    precision: str = "auto",
    memory_budget: int | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> Selection:
    """Choose the vote, k and power by leave-one-out accuracy on the references.

    Each training example is classified by its neighbours among the other training
    examples; no test label is used. Ties between candidates go to the first listed.

    Parameters
    ----------
    train : array, Tensor or LogitSource of shape (n_models, n_train, n_classes)
    labels_train : array or Tensor of shape (n_train,)
    ks : k-NN candidates.
    weighted : (k, power) candidates of the weighted vote.

    Returns
    -------
    Selection
    """
    train = as_source(train, "train logits")
    labels_train = _require_labels(labels_train, "train")
    n_classes = train.n_classes
    check_labels(labels_train, train.n_examples, n_classes, "train")
    limit = train.n_examples - 1
    ks = [k for k in ks if k <= limit] or [1]
    weighted = [(k, p) for k, p in weighted if k <= limit]
    k_max = max(ks + [k for k, _ in weighted])
    neighbors = _top_k_neighbors(train, None, k_max, exclude_self=True, log_softmax=log_softmax,
                                classes=classes, precision=precision,
                                memory_budget=memory_budget, device=device, progress=progress)
    table = [("knn", k, None, accuracy(knn_predict(neighbors, labels_train, n_classes, k),
                                         labels_train)) for k in ks]
    table += [("weighted", k, p, accuracy(
        weighted_predict(neighbors, labels_train, n_classes, k, p), labels_train))
        for k, p in weighted]
    best = max(table, key=lambda row: row[3])  # max keeps the first of equals
    return Selection(vote=best[0], k=best[1], power=best[2], accuracy=best[3], table=tuple(table))
