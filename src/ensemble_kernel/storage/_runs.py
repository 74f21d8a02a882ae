"""SRC -> Runs: run files, directories of them, or a store, opened as one object.

`open_runs` is what every command does with its SRC arguments (the CLI calls it), and
what a notebook calls first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._configs import code_groups, resolve_code, warn_if_mixed
from ..errors import InputError
from ._formats import RunSet, check_labels, open_runs as _open_run_files, read_labels
from ..results import Shown
from ..core._sources import RunSubset, parse_runs, select_runs, sequence_of
from ._store import RunStore, is_store

__all__ = ["Runs", "open_runs"]


@dataclass(frozen=True, repr=False)
class Runs(RunSet, Shown):
    """The runs of one or more sources: train (references) and test (queries) logits.

    Attributes
    ----------
    train : LogitSource of shape (n_models, n_train, n_classes)
    test : LogitSource of shape (n_models, n_test, n_classes)
    labels_train : Tensor of shape (n_train,), int64, or None when unknown
    labels_test : Tensor of shape (n_test,), int64, or None when unknown
    sources : tuple of str
        The files (or the store), in the order their runs were concatenated.
    class_names : tuple of str, length n_classes, or None
    runs : slice
        Which of the sources' runs these are.
    store : RunStore or None
        The store they were read from; its inputs and features are read on demand.
    """

    class_names: tuple[str, ...] | None = None
    runs: slice | None = None
    store: RunStore | None = field(default=None, compare=False)

    __repr__ = Shown.__repr__  # not RunSet's dataclass repr

    def _optional(self, name: str) -> np.ndarray | None:
        return None if self.store is None else self.store.optional(name)

    @property
    def inputs_train(self) -> np.ndarray | None:
        """The training inputs, shape (n_train, ...), from the store; None when absent."""
        return self._optional("inputs_train")

    @property
    def inputs_test(self) -> np.ndarray | None:
        """The test inputs, shape (n_test, ...), from the store; None when absent."""
        return self._optional("inputs_test")

    @property
    def features_train(self) -> np.ndarray | None:
        """One run's penultimate features, shape (n_train, D), from the store; or None."""
        return self._optional("features_train")

    @property
    def features_test(self) -> np.ndarray | None:
        """One run's penultimate features, shape (n_test, D), from the store; or None."""
        return self._optional("features_test")

    def _title(self) -> str:
        labels = ", ".join(s for s, lab in (("train", self.labels_train),
                                            ("test", self.labels_test)) if lab is not None)
        names = f"; classes {', '.join(self.class_names)}" if self.class_names else ""
        return (f"Runs: {self.n_models} runs, {self.train.n_examples} train / "
                f"{self.test.n_examples} test examples, {self.n_classes} classes; labels: "
                f"{labels or 'none'}{names}")

    def _records(self) -> list[dict]:
        return [{"source": s} for s in self.sources[:_SHOWN_SOURCES]] + (
            [{"source": f"... and {len(self.sources) - _SHOWN_SOURCES} more"}]
            if len(self.sources) > _SHOWN_SOURCES else [])


_SHOWN_SOURCES = 10


def _as_paths(src) -> list[str | Path]:
    """SRC as a list; strings stay strings (a store may be an fsspec URL, memory://...)."""
    if isinstance(src, (str, Path)):
        return [src]
    if isinstance(src, Sequence) and src and all(isinstance(s, (str, Path)) for s in src):
        return list(src)
    raise InputError(f"open_runs takes a path or a list of paths (run files, directories or "
                     f"a store), got {type(src).__name__}")


def _as_run_range(runs, n_models: int) -> slice:
    if runs is None or isinstance(runs, str):
        return parse_runs(runs, n_models)
    if isinstance(runs, slice) and runs.step in (None, 1):
        start, stop, _ = runs.indices(n_models)
        return parse_runs(f"{start}:{stop}", n_models)
    if isinstance(runs, (int, np.integer)) and not isinstance(runs, bool):
        return parse_runs(str(int(runs)), n_models)
    raise InputError(f"runs takes 'A:B' (0-based, half-open), a slice or a count, "
                     f"got {runs!r}")


def open_runs(src, runs=None, *, labels: str | Path | None = None, code: str | None = None,
              test_key: str | None = None) -> Runs:
    """Open run files, directories of `.pt` files, or a store, as one `Runs`.

    Parameters
    ----------
    src : str or Path, or a list of them
        A store made by `ingest`; a `.pt` or `.npz` run file; a directory searched for
        `.pt` files (lexicographic order of relative paths). Several: their runs are
        concatenated in the order given (a store must come alone).
    runs : str, slice or int, optional
        Which runs: 'A:B' or slice(A, B) (0-based, half-open), or N for the first N.
        Default: all.
    labels : str or Path, optional
        An `.npz` with `labels_train` and `labels_test`; overrides the sources' labels.
    code : str, optional
        The first hex digits of a training configuration's code sha256 (`info` lists
        them): only that configuration's runs, and `runs` counts within them. Without it,
        runs whose code differs are used together, with a warning.
    test_key : str, optional
        The array of each run file that holds the test split, e.g. 'logits_tta'; default
        'logits'. Run files only: a store keeps the test split it was given.

    Returns
    -------
    Runs
        With `train` and `test` LogitSources of shape (n_models, n_examples, n_classes),
        the labels when known, `n_models`, `class_names` (from a store).

    Raises
    ------
    InputError
        A missing or unreadable source, mismatched shapes or labels, fewer than 2 runs.
    """
    paths = _as_paths(src)
    store = class_names = None
    if any(is_store(p) for p in paths):
        if len(paths) > 1:
            raise InputError(f"a store must be the only SRC, got {len(paths)}: "
                             f"{', '.join(map(str, paths))}")
        if test_key is not None:
            raise InputError(f"--test-key {test_key} applies to run files, but {paths[0]} is a "
                             "store (it keeps the test split ingested): ingest the files with "
                             f"--test-key {test_key} into another store")
        store = RunStore(paths[0])
        found = _store_runs(store, str(paths[0]), labels, code)
        class_names = tuple(store.class_names) if store.class_names else None
    else:
        found = _open_run_files(paths, labels=labels, test_key=test_key, code=code)
    chosen = _as_run_range(runs, found.n_models)
    if chosen.stop - chosen.start < 2:
        raise InputError(f"the kernel needs at least 2 runs, got {chosen.stop - chosen.start} "
                         f"(from {', '.join(map(str, paths))})")
    return Runs(select_runs(found.train, chosen), select_runs(found.test, chosen),
                found.labels_train, found.labels_test, found.sources, found.codes,
                class_names=class_names,
                runs=chosen, store=store)


def _store_runs(store: RunStore, where: str, labels, code: str | None) -> RunSet:
    """A store as a RunSet; with `code`, only the runs of that configuration's records."""
    labels_train, labels_test = (read_labels(labels) if labels is not None
                                 else (store.labels("train"), store.labels("test")))
    train, test = store.source("train"), store.source("test")
    if train.n_examples == 0 and labels is not None:
        labels_train = None  # a single-split store: train labels have no use
    check_labels(labels_train, train.n_examples, store.n_classes, "train")
    check_labels(labels_test, test.n_examples, store.n_classes, "test")
    records = store.records()
    groups = code_groups([(r.get("code_sha256"), r["runs"][1] - r["runs"][0]) for r in records])
    if code is not None:
        chosen = resolve_code(code, groups, where)
        ranges = merge_ranges([tuple(r["runs"]) for r in records
                               if r.get("code_sha256") == chosen])
        train = sequence_of([RunSubset(train, a, b) for a, b in ranges])
        test = sequence_of([RunSubset(test, a, b) for a, b in ranges])
        groups = {chosen: groups[chosen]}
    else:
        warn_if_mixed(groups, where)
    return RunSet(train, test, labels_train, labels_test, (where,), groups)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, adjacent run ranges joined: [(0, 2), (2, 5), (7, 8)] -> [(0, 5), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def as_labels(labels, n: int, n_classes: int, split: str) -> torch.Tensor:
    """Labels given as a list, array or Tensor of shape (n,), checked: int64 Tensor."""
    from ._formats import _as_labels

    if labels is None:
        raise InputError(f"no {split} labels given: pass an array of shape ({n},)")
    tensor = _as_labels(labels, f"{split} labels")
    check_labels(tensor, n, n_classes, split)
    return tensor
