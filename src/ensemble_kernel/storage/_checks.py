"""The checks a store makes before it writes anything (docs/architecture.md §3: validate, then write).

`StoreSpec` is what every run and optional array of a store must match; `check_runs` and
`check_array` refuse anything that does not, with one line naming the file, the run, the
example and the class, and how to fix it. `store.py` calls them before its first byte,
and `ingest` calls them before it creates a store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ._formats import check_extra, check_labels, extra_dims

__all__ = ["StoreSpec", "check_runs", "check_array", "array_dims"]

KINDS = ("labels", "inputs", "features")
BLOCK = 32  # runs checked at a time (bounds the memory of the checks)


@dataclass(frozen=True)
class StoreSpec:
    """What every run of a store must match; fixed when the store is created."""

    n_train: int
    n_test: int
    n_classes: int
    dtype: str = "float16"  # how logits are kept: float16 or float32
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.dtype not in ("float16", "float32"):
            raise InputError(f"the store keeps logits as float16 or float32, got {self.dtype}")
        if self.class_names is not None and len(self.class_names) != self.n_classes:
            raise InputError(f"{len(self.class_names)} class names given for "
                             f"{self.n_classes} classes")

    def size(self, split: str) -> int:
        return {"train": self.n_train, "test": self.n_test}[split]


def check_runs(spec: StoreSpec, train, test, source: str, where: str = "the store"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that fit `spec`: shapes, finite, and within the range of the store's dtype."""
    train, test = torch.as_tensor(train).cpu(), torch.as_tensor(test).cpu()
    for split, logits in (("train", train), ("test", test)):
        if logits.ndim != 3 or not logits.is_floating_point():
            raise InputError(f"{source}: {split} logits must be floating point of shape "
                             f"(n_runs, n_examples, n_classes), got {logits.dtype} "
                             f"{tuple(logits.shape)}")
        if logits.shape[2] != spec.n_classes:
            raise InputError(f"{source}: {split} logits have {logits.shape[2]} classes "
                             f"but {where} has {spec.n_classes}")
        if logits.shape[1] != spec.size(split):
            raise InputError(f"{source}: {logits.shape[1]} {split} examples but {where} has "
                             f"{spec.size(split)}")
    if train.shape[0] != test.shape[0]:
        raise InputError(f"{source}: {train.shape[0]} runs of train logits but "
                         f"{test.shape[0]} of test logits")
    stored = getattr(torch, spec.dtype)
    for split, logits in (("train", train), ("test", test)):
        for b in range(0, logits.shape[0], BLOCK):
            block = logits[b:b + BLOCK]
            bad = ~torch.isfinite(block)
            if bool(bad.any()):
                m, e, c = (int(i) for i in bad.nonzero()[0])
                raise InputError(f"{source}: {split} logits of run {b + m}, example {e}, "
                                 f"class {c} are not finite; nothing was written")
            bad = ~torch.isfinite(block.to(stored))
            if bool(bad.any()):
                m, e, c = (int(i) for i in bad.nonzero()[0])
                big = float(block[m, e, c])
                raise InputError(
                    f"{source}: {split} logits of run {b + m}, example {e}, class {c} are "
                    f"{big:g}, beyond the largest {spec.dtype} ({float(torch.finfo(stored).max):g})"
                    f" that {where} keeps; create the store with --dtype float32 (or rescale "
                    "the logits); nothing was written")
    return train, test


def check_array(spec: StoreSpec, name: str, values, source: str) -> np.ndarray:
    """An optional array (labels_train, inputs_test, features_train, ...) that fits `spec`."""
    kind, _, split = name.rpartition("_")
    if kind not in KINDS or split not in ("train", "test"):
        raise InputError(f"unknown optional array {name!r}: expected labels, inputs or "
                         "features, then _train or _test")
    values = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if kind == "labels":
        labels = torch.from_numpy(np.ascontiguousarray(values))
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise InputError(f"{source}: {name} must be integers, got {values.dtype}")
        try:
            check_labels(labels, spec.size(split), spec.n_classes, split)
        except InputError as e:
            raise InputError(f"{source}: {e}") from e
        return values.astype(np.int64)
    return check_extra(kind, values, spec.size(split), f"{source} '{name}'")


def array_dims(name: str, values: np.ndarray) -> tuple[str, ...]:
    """Dimension names; a split's first axis is `train_example` or `test_example` (xarray
    needs one length per name, and the logits' `example` axis spans both splits)."""
    kind, _, split = name.rpartition("_")
    dims = ("example",) if kind == "labels" else extra_dims(kind, values.ndim)
    return (f"{split}_example", *dims[1:])
