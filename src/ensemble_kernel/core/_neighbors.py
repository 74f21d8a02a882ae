"""Pure: kernel blocks -> running top-k; majority and weighted votes.

Order rule (docs/architecture.md §1): larger kernel value first; exactly equal values, smaller
reference index first. `torch.topk` alone does not promise that, so every selection
here goes through `_order`, a lexicographic sort on (value descending, index ascending),
and a block whose k-th value is tied with a value left out is re-selected stably.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..results import Shown, require_pandas

__all__ = [
    "Neighbors",
    "topk_block",
    "merge_topk",
    "empty_topk",
    "knn_scores",
    "weighted_scores",
    "predict_from_scores",
]

_NO_INDEX = torch.iinfo(torch.int64).max  # padding: sorts after every real index


@dataclass(frozen=True, repr=False)
class Neighbors(Shown):
    """The top-k references (training examples) of every query (test example), best first.

    Attributes
    ----------
    indices : Tensor of shape (n_queries, k), int64: reference indices.
    values : Tensor of shape (n_queries, k), float32: their kernel values.
    """

    indices: torch.Tensor
    values: torch.Tensor

    def _title(self) -> str:
        return f"Neighbors ({self.indices.shape[0]} queries x k={self.k}, best first)"

    def _records(self) -> list[dict]:
        # One row per query: its best matches as index:value, then the best value alone.
        return [{"query": q, "top1 index": int(i[0]) if len(i) else None,
                 "top1 value": float(v[0]) if len(v) else None,
                 "neighbours (index:K)": " ".join(f"{a}:{b:.4f}" for a, b in zip(
                     i[:5].tolist(), v[:5].tolist())) + (" ..." if len(i) > 5 else "")}
                for q, (i, v) in enumerate(zip(self.indices.cpu(), self.values.cpu()))]

    def to_dict(self) -> dict:
        """{'indices': list of lists (n_queries, k), 'values': list of lists (n_queries, k)}."""
        return {"indices": self.indices.cpu().tolist(), "values": self.values.cpu().tolist()}

    def to_pandas(self):
        """One row per (query, rank): columns query, rank, index, value.

        Returns
        -------
        pandas.DataFrame of shape (n_queries * k, 4)
        """
        pd = require_pandas()
        n, k = self.indices.shape
        return pd.DataFrame({"query": torch.arange(n).repeat_interleave(k).numpy(),
                             "rank": torch.arange(k).repeat(n).numpy(),
                             "index": self.indices.cpu().reshape(-1).numpy(),
                             "value": self.values.cpu().reshape(-1).numpy()})

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def first(self, k: int) -> "Neighbors":
        """The best `k` of each row (a prefix: the order is already final)."""
        if not 1 <= k <= self.k:
            raise InputError(f"k must be between 1 and {self.k}, got {k}")
        return Neighbors(self.indices[:, :k], self.values[:, :k])


def _order(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of each row by (value desc, index asc); rows are small."""
    by_index = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), indices.gather(1, by_value)


def empty_topk(n_queries: int, k: int, device: torch.device | str = "cpu") -> Neighbors:
    """A running top-k with nothing in it yet (-inf values, padding indices)."""
    return Neighbors(
        torch.full((n_queries, k), _NO_INDEX, dtype=torch.int64, device=device),
        torch.full((n_queries, k), float("-inf"), dtype=torch.float32, device=device),
    )


def topk_block(block: torch.Tensor, k: int, offset: int = 0, *, exact_ties: bool = True,
               row_chunk: int = 32) -> Neighbors:
    """Top-k of each row of a kernel block, under the order rule.

    Parameters
    ----------
    block : Tensor of shape (n_queries, n_block_references), float32.
    k : how many to keep; at most the block's width.
    offset : the global index of the block's first reference.
    exact_ties : enforce the tie rule at the k-th place. A value equal to the k-th can
        only have been left out if the (k+1)-th value equals the k-th, so one extra
        column of `topk` finds the rows to repair (`_repair_ties`). Approximate
        passes (fast mode's candidates) skip it.
    row_chunk : tied rows repaired at a time. The repair holds at most 64 bytes per
        element of the rows it works on, so 32 rows stay within the 4096 bytes per tile
        column that `plan_memory` sets aside beside the accumulator.

    Returns
    -------
    Neighbors with Tensors of shape (n_queries, min(k, n_block_references)).
    """
    k = min(k, block.shape[1])
    extra = 1 if exact_ties and k < block.shape[1] else 0
    values, local = block.topk(k + extra, dim=1)  # sorted, descending
    if extra:
        tied = (values[:, k] == values[:, k - 1]).nonzero().flatten()
        values, local = values[:, :k].clone(), local[:, :k].clone()
        for r in range(0, len(tied), row_chunk):
            rows = tied[r : r + row_chunk]
            values[rows], local[rows] = _repair_ties(block[rows], values[rows], local[rows])
    values, indices = _order(values, local + offset, k)
    return Neighbors(indices, values)


def _repair_ties(rows: torch.Tensor, values: torch.Tensor,
                 local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries the order rule keeps in rows whose k-th value is tied with one left out.

    `values`/`local` are `topk`'s best k of each row (descending). Those above the k-th
    value t stay (a prefix of g < k entries); the other k - g places go to the columns
    holding t, smallest column first. One comparison and one `nonzero` over the rows: with
    few runs, kernel values take few distinct levels and most rows tie at the k-th place,
    where sorting each whole row cost ten times the product.

    Parameters
    ----------
    rows : Tensor of shape (n_rows, width), float32, with no NaN.
    values, local : Tensors of shape (n_rows, k), `topk`'s values and columns.

    Returns
    -------
    (values, columns), Tensors of shape (n_rows, k), not yet in the rule's order.
    """
    n, k = values.shape
    kth = values[:, k - 1 :]
    kept = (values > kth).sum(dim=1)  # g: the prefix above t
    where = (rows == kth).nonzero()  # (row, column) of every t, row-major, columns ascending
    row, column = where[:, 0], where[:, 1]
    first = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    first[1:] = torch.bincount(row, minlength=n).cumsum(0)
    rank = torch.arange(len(row), device=rows.device) - first[row]  # 0, 1, ... within a row
    slot = kept[row] + rank  # places g, g + 1, ..., k - 1
    take = slot < k
    row, slot, column = row[take], slot[take], column[take]
    local, values = local.clone(), values.clone()
    local[row, slot] = column
    values[row, slot] = rows[row, column]  # t itself, bit for bit (a -0.0 stays -0.0)
    return values, local


def merge_topk(a: Neighbors, b: Neighbors, k: int) -> Neighbors:
    """The best k of two running top-k lists for the same queries."""
    values = torch.cat([a.values, b.values], dim=1)
    indices = torch.cat([a.indices, b.indices], dim=1)
    values, indices = _order(values, indices, min(k, values.shape[1]))
    return Neighbors(indices, values)


def knn_scores(neighbors: Neighbors, reference_labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Majority-vote scores: the fraction of the k neighbours that carry each class.

    Returns
    -------
    Tensor of shape (n_queries, n_classes), float32; rows sum to 1.
    """
    labels = reference_labels.to(neighbors.indices.device)[neighbors.indices]  # (n_queries, k)
    counts = torch.zeros(labels.shape[0], n_classes, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    return counts / neighbors.k


def weighted_scores(
    neighbors: Neighbors, reference_labels: torch.Tensor, n_classes: int, power: int
) -> torch.Tensor:
    """Weighted-vote scores: per class, the sum of K ** power over the neighbours carrying it, / k.

    Returns
    -------
    Tensor of shape (n_queries, n_classes), float32.
    """
    if not isinstance(power, int) or power < 1:
        raise InputError(f"power must be a positive integer, got {power!r}")
    labels = reference_labels.to(neighbors.indices.device)[neighbors.indices]
    weights = neighbors.values.double().pow(power)
    scores = torch.zeros(labels.shape[0], n_classes, dtype=torch.float64, device=labels.device)
    scores.scatter_add_(1, labels, weights)
    return (scores / neighbors.k).float()


def predict_from_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax (ties: the smallest label) and the margin between the best two scores.

    Returns
    -------
    (Tensor of shape (n_queries,), int64; Tensor of shape (n_queries,), float32)
    """
    # argmax returns the first maximum: the smallest label among ties.
    prediction = scores.argmax(dim=1)
    top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, 1] if top2.shape[1] > 1 else top2[:, 0]
    return prediction, margin.float()
