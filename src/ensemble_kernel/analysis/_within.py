"""One split only: the kernel of a split with itself, each example's own entry left out.

The larger published CIFAR-10 set holds test logits only ((61565, 10000, 10) float16):
there are no training examples to vote. Within one split, every example is classified by
the other examples of the split (leave-one-out), which needs that split's labels only.
The numbers are leave-one-out accuracies, comparable with each other (single models and
the ensemble average are the usual ones on the split), not with a train -> test table.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core._engine import ProgressCallback, _top_k_neighbors
from ._evaluation import Evaluation, _require_labels, evaluate
from ._explain import Duplicates, near_duplicates
from ..storage._formats import check_labels
from ..core._sources import LogitSource, as_source

__all__ = ["evaluate_within", "duplicates_within"]


def evaluate_within(
    split: LogitSource,
    labels: torch.Tensor | None,
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
) -> Evaluation:
    """The model card's table within one split, by leave-one-out.

    Single-model and ensemble-average accuracy on the split, and the kernel k-NN and
    weighted votes of each example's neighbours among the *other* examples of the split.

    Parameters
    ----------
    split : array or LogitSource of shape (n_models, n_examples, n_classes).
    labels : Tensor of shape (n_examples,), int64.
    k, weighted_k : neighbours of the votes, 1 <= k <= n_examples - 1.

    Returns
    -------
    Evaluation, whose knn_accuracy and weighted_accuracy are leave-one-out accuracies.
    """
    split = as_source(split, "logits")
    labels = _require_labels(labels, "test")
    check_labels(labels, split.n_examples, split.n_classes, "test")
    neighbors = _top_k_neighbors(split, None, max(k, weighted_k), exclude_self=True,
                                log_softmax=log_softmax, classes=classes, precision=precision,
                                memory_budget=memory_budget, device=device, progress=progress)
    return evaluate(split, split, labels, labels, k=k, weighted_k=weighted_k, power=power,
                    memory_budget=memory_budget, neighbors=neighbors)


def duplicates_within(
    split: LogitSource,
    *,
    threshold: float | None = None,
    top: int | None = None,
    labels: torch.Tensor | None = None,
    precision: str = "auto",
    memory_budget: int | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> Duplicates:
    """Near-duplicate pairs within one split: each example against the *other* examples.

    The threshold is set (unless given) on the distribution of every example's best
    value among the others, as `explain.choose_threshold` does across splits. A pair
    whose two examples are each other's best match is listed once, at the rank of its
    first member; in each `Pair`, `test_index` is the example and `train_index` the other
    example of the same split (not a training example).

    Parameters
    ----------
    split : array or LogitSource of shape (n_models, n_examples, n_classes), n_examples >= 2.
    labels : Tensor of shape (n_examples,), int64, or None: shown beside the pairs.

    Returns
    -------
    Duplicates whose top1_values has shape (n_examples,).
    """
    split = as_source(split, "logits")
    found = _top_k_neighbors(split, None, 1, exclude_self=True, precision=precision,
                            memory_budget=memory_budget, device=device, progress=progress)
    # `top` is applied after the mirrored pairs are dropped: ask for all above threshold.
    every = near_duplicates(found, threshold=threshold, labels_train=labels,
                            labels_test=labels, n_models=split.n_models)
    seen, pairs = set(), []
    for pair in every.pairs:
        key = frozenset((pair.test_index, pair.train_index))
        if key in seen:
            continue
        if top is not None and len(pairs) >= top:
            break
        seen.add(key)
        pairs.append(pair)
    return Duplicates(every.threshold, every.method, tuple(pairs), every.top1_values)
