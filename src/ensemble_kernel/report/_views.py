"""The views from Python: pairs, near-duplicates, failures and the feature comparison.

Each function takes the test -> train neighbours (from `top_k_neighbors`) and, optionally,
the `Runs` they came from (labels, class names, and a store's inputs and features); it
returns a result that prints as a table and shows in a notebook as an image grid of the
inputs when they are known (drawn by `report/grids.py`, as in the report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..analysis import _explain as explain
from ..errors import InputError
from ..analysis._explain import Comparison, Duplicates, Failure, Pair
from ..core._neighbors import Neighbors
from ..results import Shown

__all__ = ["PairsView", "DuplicatesView", "FailuresView", "ComparisonView",
           "pairs", "duplicates", "failures", "compare"]


def _name(label: int | None, class_names: Sequence[str] | None):
    if label is None:
        return None
    return class_names[label] if class_names else label


def _pair_record(p: Pair, names) -> dict:
    return {"rank": p.rank, "test index": p.test_index, "train index": p.train_index,
            "K": p.value, "test label": _name(p.test_label, names),
            "train label": _name(p.train_label, names)}


@dataclass(frozen=True, repr=False, kw_only=True)
class _View(Shown):
    inputs_train: np.ndarray | None
    inputs_test: np.ndarray | None
    class_names: tuple[str, ...] | None

    def _renderer(self):
        from .grids import InputRenderer

        renderer = InputRenderer(self.inputs_train, self.inputs_test)
        return renderer if renderer.has_inputs else None


@dataclass(frozen=True, repr=False, kw_only=True)
class PairsView(_View):
    """Test examples ranked by the kernel value of their best match, and that match.

    Attributes
    ----------
    pairs : tuple of Pair, shape (ranks.stop - ranks.start,)
    ranks : slice (0-based, half-open)
    """

    pairs: tuple[Pair, ...]
    ranks: slice

    def _title(self) -> str:
        return f"Most similar pairs, ranks {self.ranks.start}:{self.ranks.stop}"

    def _records(self) -> list[dict]:
        return [_pair_record(p, self.class_names) for p in self.pairs]

    def _figure(self):
        renderer = self._renderer()
        if renderer is None or not self.pairs:
            return None
        from .grids import render_pairs

        return render_pairs(self.pairs, renderer, self.class_names)


@dataclass(frozen=True, repr=False, kw_only=True)
class DuplicatesView(_View):
    """Near-duplicate (test, train) pairs: top-1 kernel value at least `threshold`.

    Attributes
    ----------
    duplicates : Duplicates
        The pairs, the threshold, how it was set, and the top-1 values of shape (n_test,).
    """

    duplicates: Duplicates

    def _title(self) -> str:
        d = self.duplicates
        return f"{len(d.pairs)} near-duplicates at K >= {d.threshold:.6g} ({d.method})"

    def _records(self) -> list[dict]:
        return [_pair_record(p, self.class_names) for p in self.duplicates.pairs]

    def to_dict(self) -> dict:
        """Threshold, method and pairs, as plain Python."""
        return {"title": self._title(), "threshold": self.duplicates.threshold,
                "method": self.duplicates.method, "rows": self._records()}

    def _figure(self):
        renderer = self._renderer()
        if renderer is None or not self.duplicates.pairs:
            return None
        from .grids import render_pairs

        return render_pairs(self.duplicates.pairs[:48], renderer, self.class_names)


@dataclass(frozen=True, repr=False, kw_only=True)
class FailuresView(_View):
    """The most similar pairs whose labels differ, each with its nearest training examples.

    Attributes
    ----------
    failures : tuple of Failure, shape (at most `top`,)
        Each with its `n_neighbors` nearest training examples.
    """

    failures: tuple[Failure, ...]

    def _title(self) -> str:
        return f"{len(self.failures)} failures (best match of another label)"

    def _records(self) -> list[dict]:
        names = self.class_names
        return [{**_pair_record(f.pair, names), "nearest (index:label)": " ".join(
            f"{i}:{_name(lab, names)}" for i, lab in zip(f.neighbor_indices, f.neighbor_labels))}
            for f in self.failures]

    def _figure(self):
        renderer = self._renderer()
        if renderer is None or not self.failures:
            return None
        from .grids import render_failures

        return render_failures(self.failures, renderer, self.class_names)


@dataclass(frozen=True, repr=False, kw_only=True)
class ComparisonView(_View):
    """Kernel neighbours beside feature-space (cosine) neighbours of some test examples.

    Attributes
    ----------
    comparisons : tuple of Comparison, shape (n_examples,)
    labels_train : Tensor of shape (n_train,), or None
    """

    comparisons: tuple[Comparison, ...]
    labels_train: torch.Tensor | None = None

    def _title(self) -> str:
        return "Kernel neighbours beside penultimate-feature neighbours"

    def _records(self) -> list[dict]:
        return [{"test index": c.test_index, "test label": _name(c.test_label, self.class_names),
                 "kernel (index:K)": " ".join(f"{i}:{v:.4f}" for i, v in c.kernel),
                 "features (index:cosine)": " ".join(f"{i}:{v:.4f}" for i, v in c.features)}
                for c in self.comparisons]

    def _figure(self):
        renderer = self._renderer()
        if renderer is None or not self.comparisons:
            return None
        from .grids import render_comparison

        return render_comparison(self.comparisons, renderer, self.labels_train, self.class_names)


def _context(neighbors: Neighbors, runs, labels_train, labels_test, inputs_train,
             inputs_test, class_names) -> dict:
    """Labels, inputs and class names: given ones first, then those of `runs`."""
    if not isinstance(neighbors, Neighbors):
        raise InputError(f"the views take the Neighbors from top_k_neighbors, got "
                         f"{type(neighbors).__name__}")
    def pick(given, name):
        return given if given is not None or runs is None else getattr(runs, name)
    out = {name: pick(value, name) for name, value in (
        ("labels_train", labels_train), ("labels_test", labels_test),
        ("inputs_train", inputs_train), ("inputs_test", inputs_test),
        ("class_names", class_names))}
    n_test = neighbors.indices.shape[0]
    for name in ("labels_test", "inputs_test"):
        if out[name] is not None and len(out[name]) != n_test:
            raise InputError(f"{name} has {len(out[name])} rows but the neighbours have "
                             f"{n_test} test examples")
    for name in ("labels_train", "labels_test"):
        if out[name] is not None:
            out[name] = torch.as_tensor(np.asarray(out[name]), dtype=torch.int64)
    if out["class_names"] is not None:
        out["class_names"] = tuple(out["class_names"])
    return out


def _shown(context: dict) -> dict:
    return {name: context[name] for name in ("inputs_train", "inputs_test", "class_names")}


def pairs(neighbors: Neighbors, runs=None, *, ranks: slice | str = slice(0, 48),
          labels_train=None, labels_test=None, inputs_train=None, inputs_test=None,
          class_names: Sequence[str] | None = None) -> PairsView:
    """Test examples at `ranks` of the ranking by top-1 kernel value, with their best match.

    Parameters
    ----------
    neighbors : Neighbors with Tensors of shape (n_test, k)
        From `top_k_neighbors(train, test, k)`.
    runs : Runs, optional
        Supplies labels, class names and (from a store) inputs not given below.
    ranks : slice or 'A:B'
        0-based, half-open: the model card's 601st to 648th is '600:648'. Default 0:48
        (cut to the test examples there are).
    labels_train, labels_test : array of shape (n_train,) and (n_test,), optional
    inputs_train, inputs_test : array of shape (n, L), (n, H, W) or (n, H, W, C), optional
        Drawn in the notebook view.
    class_names : sequence of str, length n_classes, optional

    Returns
    -------
    PairsView
    """
    c = _context(neighbors, runs, labels_train, labels_test, inputs_train, inputs_test,
                 class_names)
    n_test = neighbors.indices.shape[0]
    if isinstance(ranks, slice) and ranks == slice(0, 48):
        ranks = slice(0, min(48, n_test))
    text = ranks if isinstance(ranks, str) else f"{ranks.start or 0}:{ranks.stop}"
    chosen = explain.parse_ranks(text, n_test)
    found = explain.similar_pairs(neighbors, chosen, c["labels_train"], c["labels_test"])
    return PairsView(pairs=tuple(found), ranks=chosen, **_shown(c))


def duplicates(neighbors: Neighbors, runs=None, *, threshold: float | None = None,
               top: int | None = None, n_models: int | None = None, labels_train=None,
               labels_test=None, inputs_train=None, inputs_test=None,
               class_names: Sequence[str] | None = None) -> DuplicatesView:
    """Near-duplicates: test examples whose best match has K >= `threshold`.

    Parameters
    ----------
    neighbors : Neighbors with Tensors of shape (n_test, k)
    runs : Runs, optional
        As for `pairs`; also gives `n_models` (the largest possible K is (n-1)/n).
    threshold : float, optional
        Default: set from the distribution of top-1 values (README, "Seeing what the
        kernel sees"); the result says how.
    top : int, optional
        Keep at most this many.
    n_models, labels_train, labels_test, inputs_train, inputs_test, class_names
        As for `pairs`.

    Returns
    -------
    DuplicatesView
    """
    c = _context(neighbors, runs, labels_train, labels_test, inputs_train, inputs_test,
                 class_names)
    if n_models is None and runs is not None:
        n_models = runs.n_models
    found = explain.near_duplicates(neighbors, threshold=threshold, top=top,
                                    labels_train=c["labels_train"],
                                    labels_test=c["labels_test"], n_models=n_models)
    return DuplicatesView(duplicates=found, **_shown(c))


def failures(neighbors: Neighbors, runs=None, *, top: int = 8, n_neighbors: int = 9,
             labels_train=None, labels_test=None, inputs_train=None, inputs_test=None,
             class_names: Sequence[str] | None = None) -> FailuresView:
    """The most similar pairs whose labels differ, with each test example's neighbours.

    Parameters
    ----------
    neighbors : Neighbors with Tensors of shape (n_test, k), k >= n_neighbors
    runs : Runs, optional
        As for `pairs`; train and test labels are needed, from here or below.
    top : int
        How many failures.
    n_neighbors : int
        Nearest training examples shown for each.
    labels_train, labels_test, inputs_train, inputs_test, class_names
        As for `pairs`.

    Returns
    -------
    FailuresView
    """
    c = _context(neighbors, runs, labels_train, labels_test, inputs_train, inputs_test,
                 class_names)
    if c["labels_train"] is None or c["labels_test"] is None:
        raise InputError("failures needs train and test labels: pass labels_train and "
                         "labels_test, or runs that carry them")
    found = explain.failures(neighbors, c["labels_train"], c["labels_test"], top=top,
                             n_neighbors=n_neighbors)
    return FailuresView(failures=tuple(found), **_shown(c))


def compare(neighbors: Neighbors, runs=None, *, features_train=None, features_test=None,
            n_examples: int = 10, k: int = 2, seed: int = 0, labels_train=None,
            labels_test=None, inputs_train=None, inputs_test=None,
            class_names: Sequence[str] | None = None) -> ComparisonView:
    """Kernel neighbours beside penultimate-feature (cosine) neighbours.

    Parameters
    ----------
    neighbors : Neighbors with Tensors of shape (n_test, k')
    runs : Runs, optional
        As for `pairs`; a store's features are used when none are given.
    features_train, features_test : array of shape (n_train, D) and (n_test, D)
    n_examples : int
        Random test examples shown (seeded by `seed`).
    k : int
        Neighbours of each kind shown.
    seed, labels_train, labels_test, inputs_train, inputs_test, class_names
        As for `pairs`.

    Returns
    -------
    ComparisonView
    """
    c = _context(neighbors, runs, labels_train, labels_test, inputs_train, inputs_test,
                 class_names)
    if features_train is None and runs is not None:
        features_train, features_test = runs.features_train, runs.features_test
    if features_train is None or features_test is None:
        raise InputError("compare needs features: pass features_train and features_test "
                         "(n, D), or runs from a store made with ingest --features")
    found = explain.compare_neighbors(neighbors, torch.as_tensor(np.asarray(features_train)),
                                      torch.as_tensor(np.asarray(features_test)),
                                      n_examples=n_examples, k=k, seed=seed,
                                      labels_test=c["labels_test"])
    return ComparisonView(comparisons=tuple(found), labels_train=c["labels_train"], **_shown(c))
