"""Pairs, near-duplicates, failures and the feature-space comparison (docs/architecture.md §5).

Pure functions over the test -> train neighbours (and labels, features): they return small
frozen dataclasses; drawing and writing live in `report/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..core._neighbors import Neighbors, merge_topk

__all__ = [
    "Pair", "Duplicates", "Failure", "Comparison",
    "parse_ranks", "rank_by_top1", "similar_pairs", "near_duplicates", "choose_threshold",
    "failures", "feature_neighbors", "compare_neighbors",
]


@dataclass(frozen=True)
class Pair:
    """A test example and its most similar training example."""

    rank: int  # 0-based rank among test examples by top-1 kernel value
    test_index: int
    train_index: int
    value: float  # kernel value
    test_label: int | None
    train_label: int | None


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate (test, train) pairs and how their threshold was set."""

    threshold: float
    method: str  # how the threshold was chosen, in words
    pairs: tuple[Pair, ...]  # best first, value >= threshold
    top1_values: torch.Tensor  # (n_test,): the distribution the threshold was set on


@dataclass(frozen=True)
class Failure:
    """A test example whose most similar training example carries another label."""

    pair: Pair
    neighbor_indices: tuple[int, ...]  # its nearest training examples, best first
    neighbor_values: tuple[float, ...]
    neighbor_labels: tuple[int, ...]


@dataclass(frozen=True)
class Comparison:
    """Kernel neighbours beside feature-space (cosine) neighbours of one test example."""

    test_index: int
    test_label: int | None
    kernel: tuple[tuple[int, float], ...]  # (train index, kernel value)
    features: tuple[tuple[int, float], ...]  # (train index, cosine similarity)


def parse_ranks(text: str, n_test: int) -> slice:
    """'600:648' -> slice(600, 648): 0-based, half-open, like a Python slice."""
    try:
        start_text, stop_text = text.split(":")
        start = int(start_text) if start_text.strip() else 0
        stop = int(stop_text) if stop_text.strip() else n_test
    except ValueError as e:
        raise InputError(f"`ranks` takes A:B (0-based, half-open, e.g. 600:648), got "
                         f"{text!r}", param="ranks") from e
    if not 0 <= start < stop <= n_test:
        raise InputError(f"`ranks`={text} is outside the {n_test} test examples: use A:B "
                         f"with 0 <= A < B <= {n_test}", param="ranks")
    return slice(start, stop)


def rank_by_top1(neighbors: Neighbors) -> torch.Tensor:
    """Test indices ordered by the kernel value of their best match, largest first.

    Equal values keep the smaller test index first. Returns Tensor of shape (n_test,).
    """
    return neighbors.values[:, 0].cpu().argsort(descending=True, stable=True)


def _label(labels: torch.Tensor | None, i: int) -> int | None:
    return None if labels is None else int(labels[i])


def _pair(rank: int, test: int, neighbors: Neighbors, labels_train, labels_test) -> Pair:
    train = int(neighbors.indices[test, 0])
    return Pair(rank, test, train, float(neighbors.values[test, 0]),
                _label(labels_test, test), _label(labels_train, train))


def similar_pairs(neighbors: Neighbors, ranks: slice, labels_train=None,
                  labels_test=None) -> list[Pair]:
    """The test examples at `ranks` of the top-1 ranking, with their best match."""
    order = rank_by_top1(neighbors)
    return [_pair(r, int(order[r]), neighbors, labels_train, labels_test)
            for r in range(ranks.start, ranks.stop)]


def choose_threshold(top1: torch.Tensor, n_models: int | None = None,
                     n_sigmas: float = 5.0) -> tuple[float, str]:
    """A near-duplicate threshold from the distribution of top-1 kernel values.

    Near-duplicates are the outliers whose kernel value is unusually close to its maximum,
    (n_models - 1) / n_models (an example's kernel with itself; 1 when n_models is not
    given). On the scale d = log(maximum - K), where closeness to the maximum spreads out,
    the threshold is the median minus `n_sigmas` robust standard deviations (1.4826 x the
    median absolute deviation), which a few hundred outliers do not move; mapped back,
    K >= maximum - exp(that), always below the maximum.
    """
    ceiling = 1.0 if n_models is None else (n_models - 1) / n_models
    d = torch.log((ceiling - top1.double()).clamp(min=1e-9))
    median = d.median()
    sigma = 1.4826 * (d - median).abs().median()
    threshold = float(ceiling - torch.exp(median - n_sigmas * sigma))
    method = (f"on d = log({ceiling:.4f} - K) of the top-1 kernel values "
              f"({ceiling:.4f}: the largest possible K): median {float(median):.3f} - "
              f"{n_sigmas:g} x robust std {float(sigma):.3f} (1.4826 x MAD), i.e. K >= "
              f"{threshold:.4f}")
    return threshold, method


def near_duplicates(neighbors: Neighbors, *, threshold: float | None = None,
                    top: int | None = None, labels_train=None, labels_test=None,
                    n_models: int | None = None) -> Duplicates:
    """(test, train) pairs whose kernel value is at least `threshold`, best first."""
    top1 = neighbors.values[:, 0].cpu()
    if threshold is None:
        threshold, method = choose_threshold(top1, n_models)
    else:
        method = f"given: {threshold:g}"
    order = rank_by_top1(neighbors)
    pairs = []
    for rank, test in enumerate(order.tolist()):
        if float(top1[test]) < threshold or (top is not None and len(pairs) >= top):
            break
        pairs.append(_pair(rank, test, neighbors, labels_train, labels_test))
    return Duplicates(threshold, method, tuple(pairs), top1)


def failures(neighbors: Neighbors, labels_train: torch.Tensor, labels_test: torch.Tensor, *,
             top: int = 8, n_neighbors: int = 9) -> list[Failure]:
    """The most similar pairs whose labels differ, with each test example's nearest examples."""
    if n_neighbors > neighbors.k:
        raise InputError(f"`n_neighbors`={n_neighbors} needs neighbours computed with k >= "
                         f"{n_neighbors}, got k={neighbors.k}", param="n_neighbors")
    out = []
    for rank, test in enumerate(rank_by_top1(neighbors).tolist()):
        pair = _pair(rank, test, neighbors, labels_train, labels_test)
        if pair.test_label == pair.train_label:
            continue
        idx = neighbors.indices[test, :n_neighbors].tolist()
        out.append(Failure(pair, tuple(idx),
                           tuple(float(v) for v in neighbors.values[test, :n_neighbors]),
                           tuple(int(labels_train[i]) for i in idx)))
        if len(out) == top:
            break
    return out


def feature_neighbors(features_test: torch.Tensor, features_train: torch.Tensor,
                      rows: torch.Tensor, k: int, *, block_bytes: int = 16 << 20) -> Neighbors:
    """Top-k training examples by cosine similarity of features, for the test `rows`.

    The training features are normalised in float64 a block of rows at a time (at most
    `block_bytes` each), so no float64 copy of them all is ever held; ties go to the
    smaller index, as everywhere.
    """
    a = torch.nn.functional.normalize(torch.as_tensor(features_test)[rows].double(), dim=1)
    train = torch.as_tensor(features_train)
    step = max(1, block_bytes // (8 * max(1, train.shape[1])))
    best = Neighbors(torch.empty(len(rows), 0, dtype=torch.int64),
                     torch.empty(len(rows), 0, dtype=torch.float64))
    for s0 in range(0, train.shape[0], step):
        b = torch.nn.functional.normalize(train[s0:s0 + step].double(), dim=1)
        found = torch.arange(s0, s0 + b.shape[0]).expand(len(rows), -1)
        best = merge_topk(best, Neighbors(found, a @ b.T), k)  # sims (len(rows), block)
    return Neighbors(best.indices, best.values.float())


def compare_neighbors(neighbors: Neighbors, features_train, features_test, *,
                      n_examples: int = 10, k: int = 2, seed: int = 0,
                      labels_test=None) -> list[Comparison]:
    """Kernel neighbours beside feature-space neighbours for random test examples."""
    n_test = neighbors.indices.shape[0]
    if features_test.shape[0] != n_test:
        raise InputError(f"features_test has {features_test.shape[0]} rows but there are "
                         f"{n_test} test examples")
    rows = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:n_examples]
    rows = rows.sort().values
    feat = feature_neighbors(features_test, features_train, rows, k)
    return [Comparison(int(r), _label(labels_test, int(r)),
                       tuple(zip(neighbors.indices[r, :k].tolist(),
                                 neighbors.values[r, :k].tolist())),
                       tuple(zip(feat.indices[i].tolist(), feat.values[i].tolist())))
            for i, r in enumerate(rows.tolist())]
