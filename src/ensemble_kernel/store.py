"""The chunked on-disk store: create, append (crash-safe), read (DESIGN §3).

Layout (format version 1), a zarr v3 group:

    STORE/zarr.json            root group; attributes["ensemble_kernel"] marks a store
    STORE/logits/              (n_runs, n_train + n_test, n_classes), dims (run, example, class);
                               train examples first, then test; one run per chunk
    STORE/labels_train/ ...    optional (n,) int64 arrays: labels_*, and inputs_*, features_*
    STORE/records/000000012/   one zarr group per committed source file, named by its first
                               run; its attributes["record"] holds source, sha256, runs, seeds
    STORE/code/<sha256>/       training-code strings, once per distinct content, in
                               attributes["code"]

Records and code are zarr groups (a zarr.json each) so that the whole directory is a
valid zarr hierarchy: zarr, xarray and Dask list it without complaint and can read them.

**The commit point** is the growing write of `logits/zarr.json` (zarr's local store
writes it to a temporary file and renames it): its shape publishes the new run count.
Chunks, records and code of an append are written before it; anything beyond the
published count is ignored by readers and overwritten by the next append. Other tools
(zarr, xarray, Dask) read the array's shape, so they also see only whole runs.
Because every chunk holds exactly one run, an append never rewrites a committed chunk.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import zarr

from .atomic import atomic_write_text
from .errors import InputError, StoreError
from .formats import check_labels, file_hash, read_run_file

__all__ = ["FORMAT_VERSION", "RunStore", "StoreSource", "is_store", "IngestReport"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MARK = "ensemble_kernel"
_EXAMPLE_CHUNK = 16384  # examples per chunk: 16384 x 10 classes x 2 bytes = 320 KiB
_WRITE_BLOCK = 32  # runs converted and written at a time
_TEST_DELAY = float(os.environ.get("ENSEMBLE_KERNEL_TEST_WRITE_DELAY", "0"))  # seconds


def is_store(path: str | Path) -> bool:
    """Whether `path` is a directory whose root metadata marks an ensemble-kernel store."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return _MARK in json.loads(meta.read_text()).get("attributes", {})
    except (ValueError, OSError):
        return False


@dataclass(frozen=True)
class IngestReport:
    """What one `append_file` did: 'added' runs, or 'skipped' (already in the store)."""

    source: str
    status: str
    runs: tuple[int, int]


class StoreSource:
    """One split of a store as a LogitSource (the runs committed when it was opened)."""

    def __init__(self, store: "RunStore", split: str):
        self.store, self.split = store, split
        self._start, self._stop = store.split_range(split)
        self.n_models = store.n_models
        self.n_examples = self._stop - self._start
        self.n_classes = store.n_classes

    def read(self, models: slice, examples: slice) -> torch.Tensor:
        m0, m1, _ = models.indices(self.n_models)
        e0, e1, _ = examples.indices(self.n_examples)
        return torch.from_numpy(self.store.read_logits(slice(m0, m1),
                                                       slice(self._start + e0, self._start + e1)))

    def describe_run(self, model: int) -> str:
        return f"run {model} ({self.store.path}: {self.store.run_source(model)})"


class RunStore:
    """An ensemble-kernel store on local disk.

    Open an existing one with `RunStore(path)`, make one with `RunStore.create(...)`.
    `n_models` is the committed run count when it was opened (or last appended to).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store (create one with ingest)")
        if not is_store(self.path):
            raise StoreError(f"{self.path}: not an ensemble-kernel store (no store metadata "
                             "in its zarr.json); pass run files or a store made by ingest")
        self._group = zarr.open_group(self.path, mode="r+" if os.access(self.path, os.W_OK)
                                      else "r")
        attrs = dict(self._group.attrs)[_MARK]
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format version {version}, but this "
                             f"ensemble-kernel reads version {FORMAT_VERSION}; re-ingest the "
                             "run files with this version")
        self.attrs = attrs
        self._logits = self._group["logits"]

    # ---- creation ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, n_train: int, n_test: int, n_classes: int,
               dtype: str = "float16", class_names: Sequence[str] | None = None) -> "RunStore":
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: exists and is not an empty directory or a store")
        if dtype not in ("float16", "float32"):
            raise InputError(f"the store keeps logits as float16 or float32, got {dtype}")
        if class_names is not None and len(class_names) != n_classes:
            raise InputError(f"{len(class_names)} class names given for {n_classes} classes")
        splits = {"train": [0, n_train], "test": [n_train, n_train + n_test]}
        group = zarr.open_group(path, mode="w")
        group.create_array(
            "logits", shape=(0, n_train + n_test, n_classes), dtype=dtype,
            chunks=(1, min(_EXAMPLE_CHUNK, n_train + n_test), n_classes),
            dimension_names=("run", "example", "class"), compressors=None, fill_value=0,
            attributes={"splits": splits, "format_version": FORMAT_VERSION},
        )
        for folder in ("records", "code"):
            _write_group(path / folder, {})
        # The root mark comes last: a half-made directory is not a store.
        group.attrs[_MARK] = {"format_version": FORMAT_VERSION, "n_classes": n_classes,
                              "class_names": list(class_names) if class_names else None,
                              "splits": splits, "logits_dtype": dtype}
        return cls(path)

    # ---- reading -----------------------------------------------------------------------

    @property
    def n_models(self) -> int:
        return self._logits.shape[0]

    @property
    def n_classes(self) -> int:
        return self._logits.shape[2]

    @property
    def dtype(self) -> str:
        return str(np.dtype(self._logits.dtype))

    @property
    def class_names(self) -> list[str] | None:
        return self.attrs.get("class_names")

    def split_range(self, split: str) -> tuple[int, int]:
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        start, stop = self.attrs["splits"][split]
        return start, stop

    def source(self, split: str) -> StoreSource:
        return StoreSource(self, split)

    def read_logits(self, models: slice, examples: slice) -> np.ndarray:
        """Committed logits, checking that every chunk read is present and whole."""
        chunk_e = self._logits.chunks[1]
        for m in range(models.start, models.stop):
            for c in range(examples.start // chunk_e, (examples.stop - 1) // chunk_e + 1):
                key = self.path / "logits" / "c" / str(m) / str(c) / "0"
                if not key.is_file():
                    raise StoreError(f"{self.path}: chunk logits/c/{m}/{c}/0 (run {m}) is "
                                     "missing; the store is damaged: re-ingest that run's file")
        try:
            return self._logits[models, examples]
        except (ValueError, OSError) as e:
            raise StoreError(f"{self.path}: {self._find_bad_chunk(models, examples)} could not "
                             f"be read ({e}); the store is damaged: re-ingest that run's "
                             "file") from e

    def _find_bad_chunk(self, models: slice, examples: slice) -> str:
        """Name the first chunk of a failed read that does not decode."""
        chunk_e = self._logits.chunks[1]
        for m in range(models.start, models.stop):
            for c in range(examples.start // chunk_e, (examples.stop - 1) // chunk_e + 1):
                try:
                    self._logits[m, c * chunk_e:min((c + 1) * chunk_e, self._logits.shape[1])]
                except (ValueError, OSError):
                    return f"chunk logits/c/{m}/{c}/0 (run {m})"
        return f"a chunk of runs {models.start}..{models.stop - 1}"

    def optional(self, name: str) -> np.ndarray | None:
        """An optional array (labels_train, inputs_test, ...), or None."""
        return self._group[name][...] if name in self._group else None

    def shapes(self) -> dict[str, list[int]]:
        """Shape of every array: logits (committed runs) and the optional ones present."""
        out = {"logits": [self.n_models, *self._logits.shape[1:]]}
        for name in sorted(self._group.array_keys()):
            if name != "logits":
                out[name] = list(self._group[name].shape)
        return out

    def labels(self, split: str) -> torch.Tensor | None:
        labels = self.optional(f"labels_{split}")
        return None if labels is None else torch.from_numpy(labels.astype(np.int64))

    def records(self) -> list[dict]:
        """Run records of committed source files, in run order."""
        out = []
        for meta in sorted((self.path / "records").glob("*/zarr.json")):
            record = json.loads(meta.read_text())["attributes"]["record"]
            if record["runs"][1] <= self.n_models:
                out.append(record)
        return out

    def code(self, sha256: str) -> str | None:
        """The training code stored under its content hash, or None."""
        meta = self.path / "code" / sha256 / "zarr.json"
        return json.loads(meta.read_text())["attributes"]["code"] if meta.is_file() else None

    def run_source(self, model: int) -> str:
        for record in self.records():
            if record["runs"][0] <= model < record["runs"][1]:
                return f"{record['source']}, run {model - record['runs'][0]} in it"
        return "source unknown"

    # ---- appending ---------------------------------------------------------------------

    def _check_arrays(self, train: torch.Tensor, test: torch.Tensor, source: str) -> None:
        n_train = self.split_range("train")[1] - self.split_range("train")[0]
        n_test = self.split_range("test")[1] - self.split_range("test")[0]
        for split, logits, want in (("train", train, n_train), ("test", test, n_test)):
            if logits.ndim != 3 or not logits.is_floating_point():
                raise InputError(f"{source}: {split} logits must be floating point of shape "
                                 f"(n_runs, n_examples, n_classes), got {logits.dtype} "
                                 f"{tuple(logits.shape)}")
            if logits.shape[2] != self.n_classes:
                raise InputError(f"{source}: {split} logits have {logits.shape[2]} classes "
                                 f"but the store {self.path} has {self.n_classes}")
            if logits.shape[1] != want:
                raise InputError(f"{source}: {logits.shape[1]} {split} examples but the "
                                 f"store {self.path} has {want}")
        if train.shape[0] != test.shape[0]:
            raise InputError(f"{source}: {train.shape[0]} runs of train logits but "
                             f"{test.shape[0]} of test logits")
        for split, logits in (("train", train), ("test", test)):
            bad = ~torch.isfinite(logits)
            if bool(bad.any()):
                m, e, c = (int(i) for i in bad.nonzero()[0])
                raise InputError(f"{source}: {split} logits of run {m}, example {e}, class {c} "
                                 "are not finite; nothing was written")

    def set_array(self, name: str, values: np.ndarray | torch.Tensor, dims: Sequence[str]) -> None:
        """Write an optional array (labels, inputs, features); refuse to contradict one stored.

        A split's arrays (NAME_train, NAME_test) name their first axis `train_example` or
        `test_example`: the splits differ in length, and xarray needs one length per
        dimension name (the logits' `example` axis spans both splits).
        """
        values = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        split = name.rsplit("_", 1)[-1]
        if split in ("train", "test") and dims and dims[0] == "example":
            dims = (f"{split}_example", *dims[1:])
        if name in self._group:
            stored = self._group[name][...]
            if stored.shape != values.shape or not np.array_equal(stored, values):
                raise InputError(f"{name} given differs from the {name} already in the store "
                                 f"{self.path}; the store keeps one set per split")
            return
        array = self._group.create_array(name, shape=values.shape, dtype=values.dtype,
                                         dimension_names=tuple(dims))
        array[...] = values

    def set_labels(self, split: str, labels: torch.Tensor | None) -> None:
        if labels is None:
            return
        start, stop = self.split_range(split)
        check_labels(labels, stop - start, self.n_classes, split)
        self.set_array(f"labels_{split}", labels.to(torch.int64), ("example",))

    def committed_hashes(self) -> set[str]:
        return {r["sha256"] for r in self.records()}

    def append_file(self, path: str | Path, *, allow_duplicates: bool = False,
                    on_runs: Callable[[int], None] | None = None) -> IngestReport:
        """Append the runs of one run file, as one commit; skip it if its content is stored."""
        path = Path(path)
        digest = file_hash(path)
        if not allow_duplicates and digest in self.committed_hashes():
            return IngestReport(str(path), "skipped", (self.n_models, self.n_models))
        run = read_run_file(path)
        self.set_labels("train", run.labels_train)
        self.set_labels("test", run.labels_test)
        return self.append_arrays(run.train, run.test, source=str(path), sha256=digest,
                                  code=run.code, on_runs=on_runs)

    def append_arrays(self, train, test, *, source: str, sha256: str | None = None,
                      code: str | None = None, seeds: Sequence[int] | None = None,
                      on_runs: Callable[[int], None] | None = None) -> IngestReport:
        """Append runs held in memory, as one commit.

        Parameters
        ----------
        train, test : arrays of shape (n_runs, n_train | n_test, n_classes).
        source : what to record as their origin.
        sha256 : their content hash for de-duplication; default: a hash of the arrays.
        seeds : one per run, recorded.
        """
        train, test = torch.as_tensor(train).cpu(), torch.as_tensor(test).cpu()
        self._check_arrays(train, test, source)
        r, n = train.shape[0], self.n_models
        if seeds is not None and len(seeds) != r:
            raise InputError(f"{source}: {len(seeds)} seeds for {r} runs")
        if sha256 is None:
            sha256 = _sha256_arrays(train, test)
        writer = zarr.Array(type(self._logits._async_array)(
            metadata=self._logits.metadata.update_shape((n + r,) + self._logits.shape[1:]),
            store_path=self._logits._async_array.store_path,
            config={"write_empty_chunks": True},
        ))
        dtype = np.dtype(self._logits.dtype)
        for b in range(0, r, _WRITE_BLOCK):
            block = slice(b, min(b + _WRITE_BLOCK, r))
            both = torch.cat([train[block], test[block]], dim=1)
            writer[n + block.start:n + block.stop] = both.float().numpy().astype(dtype)
            if on_runs is not None:
                on_runs(block.stop - block.start)
            if _TEST_DELAY:  # crash tests: widen the window in which a kill lands mid-append
                time.sleep(_TEST_DELAY)
        code_hash = None
        if code is not None:
            code_hash = _sha256_text(code)
            if self.code(code_hash) is None:
                _write_group(self.path / "code" / code_hash, {"code": code})
        record = {"source": source, "sha256": sha256, "runs": [n, n + r],
                  "stored_dtype": str(dtype), "source_dtype": str(train.dtype).replace(
                      "torch.", ""), "code_sha256": code_hash,
                  "seeds": list(map(int, seeds)) if seeds is not None else None}
        _write_group(self.path / "records" / f"{n:09d}", {"record": record})
        self._logits.resize((n + r,) + self._logits.shape[1:])  # the commit
        return IngestReport(source, "added", (n, n + r))


def _write_group(folder: Path, attributes: dict) -> None:
    """A zarr v3 group's metadata, written atomically (one file: the unit of a record)."""
    atomic_write_text(folder / "zarr.json", json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": attributes}))


def _sha256_arrays(*arrays: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        h.update(a.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
