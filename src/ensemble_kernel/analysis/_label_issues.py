"""Label issues from the runs: rank one split's examples by how strongly their kernel
neighbours disagree with their given labels.

The references are always the train split, whose labels vote. Auditing the test split,
each test example's neighbours are training examples; auditing the train split, each
training example's neighbours are the other training examples (its own entry is left
out, `exclude_self`).

The vote (docs/architecture.md §1's weighted vote, normalised): among the top-k neighbours, neighbour j
weighs ``w_j = max(K_j, 0) ** power`` and class c gets ``p[c] = sum_{j: y_j = c} w_j /
sum_j w_j`` (equal weights when every ``w_j`` is 0). K is clipped at 0 because an even
power would otherwise turn an anti-correlated neighbour into a strong vote.

Scores (higher: more suspicious):
- ``combined`` (the default): ``1 - (p[given] + q[given]) / 2``, with q the ensemble's
  own averaged probabilities (the mean over runs of the softmax); on the train split q
  is in-sample;
- ``kernel``: ``1 - p[given]``, the vote share of the given label alone.
The vote share is coarse (ties at 0 and 1); q orders examples within its ties.
benchmarks/label_noise.py measures both against cleanlab.

Threshold, chosen without the truth: an example is flagged when the vote goes to another
label with a majority of the weight, ``voted != given and p[voted] > 1/2``.

Ranking: score descending; equal scores by smaller index (a stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..core._engine import _top_k_neighbors
from ..errors import InputError
from ..storage._formats import check_labels
from ..core._neighbors import Neighbors
from ..results import Shown
from ..core._sources import LogitSource, as_source

__all__ = ["LabelIssues", "label_issues", "vote_probabilities", "ensemble_probabilities",
           "knn_graph", "SPLITS", "SCORES"]

SPLITS = ("test", "train")
SCORES = ("kernel", "combined")
Score = Literal["kernel", "combined"]


@dataclass(frozen=True, repr=False)
class LabelIssues(Shown):
    """One split's examples ranked by how suspicious their given labels are.

    Attributes
    ----------
    split : 'test' or 'train', the audited split.
    order : Tensor of shape (n_examples,), int64: example indices, most suspicious first.
    scores : Tensor of shape (n_examples,), float64: per example (by index), higher is
        more suspicious, in [0, 1].
    given : Tensor of shape (n_examples,), int64: the given labels.
    voted : Tensor of shape (n_examples,), int64: the label the neighbours vote for
        (ties: the smallest label).
    vote_probabilities : Tensor of shape (n_examples, n_classes), float64: the kernel
        vote's class probabilities (rows sum to 1).
    flagged : Tensor of shape (n_examples,), bool: ``voted != given`` and the voted
        label holds more than half of the vote.
    neighbors : Neighbors of shape (n_examples, k): training examples, best first.
    score : 'kernel' or 'combined'. k, power : the vote's parameters.
    """

    split: str
    order: torch.Tensor
    scores: torch.Tensor
    given: torch.Tensor
    voted: torch.Tensor
    vote_probabilities: torch.Tensor
    flagged: torch.Tensor
    neighbors: Neighbors
    score: str
    k: int
    power: int

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())

    def _title(self) -> str:
        return (f"LabelIssues: {self.n_flagged} of {len(self.order)} {self.split} examples "
                f"flagged (score {self.score}, k={self.k}, power {self.power}), most "
                f"suspicious first")

    def rows(self, n_neighbors: int = 5) -> list[dict]:
        """One dict per example, most suspicious first: index, score, given_label,
        voted_label, vote_share_given, vote_share_voted, flagged, and neighbors (the
        nearest `n_neighbors` reference indices, a list): the columns of
        `label-issues --out` and `--json`."""
        p = self.vote_probabilities
        shown = self.neighbors.indices[:, :n_neighbors].cpu()
        rows = []
        for i in self.order.tolist():
            g, v = int(self.given[i]), int(self.voted[i])
            rows.append({"index": i, "score": float(self.scores[i]), "given_label": g,
                         "voted_label": v, "vote_share_given": float(p[i, g]),
                         "vote_share_voted": float(p[i, v]), "flagged": bool(self.flagged[i]),
                         "neighbors": shown[i].tolist()})
        return rows

    def _records(self) -> list[dict]:
        return [{**row, "neighbors": " ".join(map(str, row["neighbors"]))}
                for row in self.rows()]


def vote_probabilities(neighbors: Neighbors, reference_labels: torch.Tensor, n_classes: int,
                       power: int) -> torch.Tensor:
    """The weighted vote as class probabilities (see the module's docstring).

    Parameters
    ----------
    neighbors : Neighbors of shape (n_queries, k).
    reference_labels : Tensor of shape (n_references,), int64.
    power : a positive integer; each neighbour weighs max(K, 0) ** power.

    Returns
    -------
    Tensor of shape (n_queries, n_classes), float64; rows sum to 1.
    """
    if not isinstance(power, int) or isinstance(power, bool) or power < 1:
        raise InputError(f"power must be a positive integer, got {power!r}")
    labels = reference_labels.to(neighbors.indices.device)[neighbors.indices]  # (n_queries, k)
    weights = neighbors.values.double().clamp(min=0).pow(power)
    empty = weights.sum(dim=1) == 0
    weights[empty] = 1.0  # no positive neighbour: every neighbour counts the same
    sums = torch.zeros(labels.shape[0], n_classes, dtype=torch.float64, device=labels.device)
    sums.scatter_add_(1, labels, weights)
    return sums / sums.sum(dim=1, keepdim=True)


def ensemble_probabilities(source: LogitSource, *, block: int = 32) -> torch.Tensor:
    """The ensemble's averaged probabilities: the mean over runs of softmax(logits).

    Parameters
    ----------
    source : LogitSource or array of shape (n_models, n_examples, n_classes).

    Returns
    -------
    Tensor of shape (n_examples, n_classes), float64.
    """
    source = as_source(source, "logits")
    total = torch.zeros(source.n_examples, source.n_classes, dtype=torch.float64)
    for m0 in range(0, source.n_models, block):
        logits = source.read(slice(m0, min(m0 + block, source.n_models)),
                             slice(0, source.n_examples))  # (block, n_examples, n_classes)
        total += logits.double().softmax(dim=2).sum(dim=0)
    return total / source.n_models


def check_k_for_split(k: int, split: str, n_train: int) -> None:
    """k must leave the vote enough references: n_train, or n_train - 1 on the train split
    (the example itself is left out)."""
    limit = n_train - 1 if split == "train" else n_train
    if not 1 <= k <= limit:
        what = ("the training examples minus the example itself" if split == "train"
                else "the number of training examples")
        if limit < 1:  # (not "between 1 and 0")
            raise InputError(f"`k`={k}: there are no training examples to vote on "
                             f"{'another' if split == 'train' else 'a test'} example (the "
                             f"train split has {n_train})", param="k")
        raise InputError(f"`k` must be between 1 and {limit} ({what}), got {k}: pass "
                         f"`k`={max(1, limit)} or less", param="k")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"`split` takes test or train, got {split!r}", param="split")


def label_issues(train: LogitSource, test: LogitSource | None, labels_train, labels_test=None,
                 *, split: str = "test", k: int = 20, power: int = 4,
                 score: Score = "combined", precision: str = "auto",
                 memory_budget: int | None = None, device: str = "cpu",
                 progress=None, neighbors: Neighbors | None = None) -> LabelIssues:
    """Rank one split's examples by how strongly their kernel neighbours disagree with
    their given labels.

    Parameters
    ----------
    train : LogitSource or array of shape (n_models, n_train, n_classes): the references.
    test : LogitSource or array of shape (n_models, n_test, n_classes), or None when
        auditing the train split.
    labels_train : Tensor of shape (n_train,): they vote, and are audited on 'train'.
    labels_test : Tensor of shape (n_test,): the labels audited on 'test'.
    split : 'test' (neighbours among the training examples) or 'train' (among the other
        training examples: leave-one-out).
    k : neighbours that vote, 1 <= k <= n_train (n_train - 1 on 'train').
    power : each neighbour weighs max(K, 0) ** power.
    score : 'combined' (1 - the mean of the vote share of the given label and the
        ensemble's own probability of it; ranks best in benchmarks/label_noise.py) or
        'kernel' (1 - the vote share alone).
    precision, memory_budget, device, progress : as for `top_k_neighbors`.
    neighbors : the split's neighbours, already computed (test -> train on 'test',
        leave-one-out train -> train on 'train'), with at least k per row; None: computed.

    Returns
    -------
    LabelIssues
    """
    _check_split(split)
    if score not in SCORES:
        raise InputError(f"score takes kernel or combined, got {score!r}")
    train = as_source(train, "train logits")
    audited = train if split == "train" else (as_source(test, "test logits")
                                              if test is not None else None)
    if audited is None:
        raise InputError("auditing the test split needs test logits")
    given = labels_train if split == "train" else labels_test
    if labels_train is None or given is None:
        which = "train" if labels_train is None else "test"
        raise InputError(f"auditing the {split} split needs {which} labels: pass "
                         f"`labels_{which}`", param=f"labels_{which}")
    labels_train = torch.as_tensor(labels_train, dtype=torch.int64)
    given = torch.as_tensor(given, dtype=torch.int64)
    n_classes = train.n_classes
    check_labels(labels_train, train.n_examples, n_classes, "train")
    check_labels(given, audited.n_examples, n_classes, split)
    check_k_for_split(k, split, train.n_examples)
    if neighbors is not None:
        if neighbors.indices.shape[0] != audited.n_examples or neighbors.k < k:
            raise InputError(f"neighbors must have {audited.n_examples} rows and at least "
                             f"k={k} columns, got shape {tuple(neighbors.indices.shape)}")
        found = neighbors.first(k)
    else:
        found = _top_k_neighbors(audited if split == "test" else train,
                                 None if split == "train" else train, k,
                                 exclude_self=split == "train", precision=precision,
                                 memory_budget=memory_budget, device=device, progress=progress)
    found = Neighbors(found.indices.cpu(), found.values.cpu())
    p = vote_probabilities(found, labels_train, n_classes, power)
    p_given = p.gather(1, given[:, None])[:, 0]
    if score == "combined":
        q = ensemble_probabilities(audited)
        p_given = (p_given + q.gather(1, given[:, None])[:, 0]) / 2
    scores = (1 - p_given).clamp(min=0)
    voted = p.argmax(dim=1)  # the first maximum: the smallest label among ties
    flagged = (voted != given) & (p.max(dim=1).values > 0.5)
    order = torch.from_numpy(np.argsort(-scores.numpy(), kind="stable"))
    return LabelIssues(split, order, scores, given, voted, p, flagged, found, score, k, power)


def knn_graph(source, k: int = 10, *, precision: str = "auto",
              memory_budget: int | None = None, device: str = "cpu"):
    """The kernel's k-nearest-neighbour graph of one split, as cleanlab's `Datalab`
    accepts it (``find_issues(knn_graph=...)``).

    Each example's k nearest other examples of the same split (itself left out), with the
    distance ``d = sqrt(max(0, 2 (n_models - 1) / n_models - 2 K))``: the Euclidean
    distance between the two examples' normalised feature vectors (docs/architecture.md §1 gives each a
    squared norm of (n_models - 1) / n_models, times 1 / n_classes summed over classes,
    when no output is constant across runs). It orders neighbours as K does, is 0 for
    identical outputs, and lives on the scale cleanlab's distance-based checks (outliers,
    near-duplicates) expect from a Euclidean k-NN graph, which ``1 - K`` does not.

    Parameters
    ----------
    source : LogitSource or array of shape (n_models, n_examples, n_classes).
    k : neighbours per example, 1 <= k <= n_examples - 1.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (n_examples, n_examples), float64: row i holds k
    entries, sorted by increasing distance (equal distances: smaller index first), none
    on the diagonal.
    """
    from scipy.sparse import csr_matrix

    source = as_source(source, "logits")
    n = source.n_examples
    if not 1 <= k <= n - 1:
        if n < 2:  # (not "between 1 and 0")
            raise InputError(f"k={k}: a graph of {n} example{'s' if n != 1 else ''} has no "
                             "neighbours to link (it needs at least 2)")
        raise InputError(f"k must be between 1 and {n - 1} (the examples minus the example "
                         f"itself), got {k}")
    found = _top_k_neighbors(source, None, k, exclude_self=True, precision=precision,
                             memory_budget=memory_budget, device=device)
    m = source.n_models
    sq = (2 * (m - 1) / m - 2 * found.values.double().cpu()).clamp(min=0)  # (n, k)
    distances = sq.sqrt().numpy()
    indptr = np.arange(0, n * k + 1, k)
    return csr_matrix((distances.ravel(), found.indices.cpu().numpy().ravel(), indptr),
                      shape=(n, n))
