"""The chunked on-disk store: create, append (crash-safe, one writer at a time), read (docs/architecture.md §3).

Layout (format version 3), a zarr v3 group:

    STORE/zarr.json            root group; attributes["ensemble_kernel"] marks a store
    STORE/logits/              (n_runs, n_train + n_test, n_classes), dims (run, example, class);
                               train examples first, then test; one run per chunk.
                               attributes: splits, format_version, and "arrays": the
                               optional arrays committed so far
    STORE/logits/.lock         the writers' lock (flock); zarr never lists inside an array
    STORE/logits/.staging/     optional arrays being written, before their rename into place
    STORE/labels_train/ ...    optional arrays: labels_*, inputs_*, features_*
    STORE/records/000000012/   one zarr group per committed source file, named by its first
                               run; attributes["record"]: source, sha256, runs, seeds, ...
    STORE/index/<sha256>/      the first committed record of each content hash: {"runs"}
    STORE/code/<sha256>/       training-code strings, once per distinct content

**One writer at a time.** Every write (append, optional array) holds an exclusive flock
on `logits/.lock` from before it reads the committed state to after its commit. Readers
never lock.

**The commit point** is one atomic, durable write of `logits/zarr.json` (temporary file,
fsync, rename, fsync of the folder): its shape publishes the run count and its "arrays"
attribute the optional arrays. Everything an append writes comes before it and is
fsynced first: chunks of the new runs, optional arrays (written under `.staging/`, then
renamed into place), code, record and index entry. Readers ignore runs beyond the
published count, records that start there, index entries that do not match a committed
record, and optional arrays not listed. The next append overwrites such leftovers.

**Nothing silent (format 3).** Every chunk of every array ends with its CRC-32C (zarr
v3's `crc32c` codec), checked whenever it is read; a missing chunk is an error, never fill
values. Every zarr.json the store writes is sealed with a CRC-32C of its content
(`store_meta`). Records tile the committed runs exactly. Any disagreement is a StoreError
that names the file, and the runs or examples it holds.

Versions 1 and 2 (no checksums) are read as they are, with a warning; `upgrade` rewrites
one as format 3 (a whole copy, swapped in atomically). Version 1 stores (no index, no
"arrays" list: every optional array present counts) are upgraded to version 2 in place by
their first append.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import zarr

from .._atomic import atomic_write_text
from ..errors import InputError, StoreError
from ._formats import check_extra, file_hash, read_run_file
from ._checks import StoreSpec, array_dims, check_array, check_runs
from ._io import chunks_exist, fsync_dir, fsync_files, fsync_tree, grown_writer, writer_lock
from ._meta import damaged, read_doc, run_chunk_crcs, seal, seal_file
from ._chunks import _DECODE_ERRORS, LogitChunks
from ._layout import FORMAT_VERSION, MARK, OPTIONAL_CODECS, content_key, sweep_stale_creations
from ._layout import array_chunk_crcs as _array_chunk_crcs
from ._layout import build as _build  # (a name the crash tests replace)
from ._layout import creating_prefix as _creating_prefix
from ._layout import is_record as _is_record
from ._layout import sha256_arrays as _sha256_arrays
from ._layout import sha256_text as _sha256_text
from ._precision import SAMPLE_RUNS, RoundingCheck, rounding_warning

__all__ = ["FORMAT_VERSION", "RunStore", "StoreSource", "StoreSpec", "is_store", "IngestReport",
           "check_runs", "check_array", "sweep_stale_creations"]

logger = logging.getLogger(__name__)

_READS = (1, 2, 3)  # format versions this code reads
_CHECKED = 3  # the first format whose chunks and metadata carry checksums
_MARK, _OPTIONAL_CODECS = MARK, OPTIONAL_CODECS
_WRITE_BLOCK = 32  # runs converted and written at a time

def _wrote(step: str) -> None:
    """Called after each write step of an append, with the step's name; does nothing.

    The step names are the store's crash points: the tests wrap this function to kill or
    pause a writer right after each one (tests/test_store_faults.py, tests/seams/)."""


def _is_url(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def is_store(path: str | Path) -> bool:
    """Whether `path` (a folder, or an fsspec URL) holds an ensemble-kernel store."""
    if _is_url(path):
        try:
            return _MARK in zarr.open_group(str(path), mode="r").attrs
        except (FileNotFoundError, KeyError, ValueError, OSError):
            return False
    meta = Path(path) / "zarr.json"
    damaged = (Path(path) / "logits" / "zarr.json").is_file()  # a store, if its root is gone
    if not meta.is_file():
        return damaged
    try:
        return _MARK in json.loads(meta.read_text()).get("attributes", {})
    except (ValueError, OSError, AttributeError, UnicodeDecodeError):
        return damaged


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


class RunStore(LogitChunks):
    """An ensemble-kernel store: a local folder, or (read-only) an fsspec URL.

    Open an existing one with `RunStore(path)`, make one with `RunStore.create(...)` or
    `RunStore.open_or_create(...)`. `n_models` is the committed run count when it was
    opened (or last written to).

    `source("train")` and `source("test")` are LogitSources of shape
    (n_models, n_train | n_test, n_classes); `labels(split)` a Tensor of shape
    (n_examples,) or None; `optional(name)` an inputs or features array of shape
    (n_examples, ...) or None.
    """

    def __init__(self, path: str | Path):
        self._local = not _is_url(path)
        self._swept = False  # stale creation folders beside it: swept at the first write
        self.path = Path(path) if self._local else str(path)
        if self._local and not self.path.exists():
            raise StoreError(f"{self.path}: no such store (create one with ingest)")
        if not is_store(self.path):
            raise StoreError(f"{self.path}: not an ensemble-kernel store (no store metadata "
                             "in its zarr.json); pass run files or a store made by ingest")
        self._open()

    def _open(self) -> None:
        writable = self._local and os.access(self.path, os.W_OK)
        if self._local:
            root = self._read_meta("zarr.json")
            version = (root["attributes"].get(_MARK) or {}).get("format_version")
            if version in _READS and version >= _CHECKED:
                self._read_meta("zarr.json", sealed=True)
                self._read_meta("logits/zarr.json", sealed=True)
        try:
            self._group = zarr.open_group(self.path if self._local else str(self.path),
                                          mode="r+" if writable else "r")
            attrs = dict(self._group.attrs)[_MARK]
            version = attrs.get("format_version")
            if version not in _READS:
                raise StoreError(f"{self.path}: store format version {version}, but this "
                                 "ensemble-kernel reads versions "
                                 f"{', '.join(map(str, _READS))}; re-ingest the run files "
                                 "with this version, or upgrade ensemble-kernel")
            self.attrs = attrs
            self._logits = self._group["logits"]
            listed = self._logits.attrs.get("arrays")
            self._arrays = (set(listed) if listed is not None else
                            {k for k in self._group.array_keys() if k != "logits"})
            (a, b), (c, d) = attrs["splits"]["train"], attrs["splits"]["test"]
            if not (0 == a <= b == c <= d == self._logits.shape[1]) \
                    or len(self._logits.shape) != 3:
                raise StoreError(f"{self.path}: the split ranges {attrs['splits']} do not "
                                 f"match the logits' shape {list(self._logits.shape)}")
            self.spec = StoreSpec(b - a, d - c, self._logits.shape[2], self.dtype,
                                  tuple(attrs["class_names"]) if attrs.get("class_names")
                                  else None)
        except StoreError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, OSError) as e:
            raise damaged(self.path, "its metadata", f"{type(e).__name__}: {e}") from e
        self.checked = version >= _CHECKED  # chunks and metadata carry checksums
        self._plain = self._plain_layout() if self._local else None
        self._verified: dict[tuple[int, int], tuple] = {}  # chunk -> file identity checked
        self._expected: dict[int, str] | None = None  # run -> its record's chunk checksums
        self._pending_crcs: dict[str, dict[str, str]] = {}  # arrays published, not committed
        self._committed_meta = None  # logits/zarr.json as last read under the lock
        if not self.checked and not getattr(self, "_warned_unchecked", False):
            self._warned_unchecked = True
            warnings.warn(f"{self.path} is a store of format {version}: its chunks carry no "
                          "checksums, so damage to them can go unnoticed; `ensemble-kernel "
                          f"upgrade {self.path}` rewrites it as format {FORMAT_VERSION}",
                          stacklevel=3)

    def _read_meta(self, key: str, *, sealed: bool = False, missing_ok: bool = False
                   ) -> dict | None:
        """A local store's zarr.json at `key`, checked (`store_meta.read_doc`)."""
        return read_doc(self.path / key, self.path, sealed=sealed, missing_ok=missing_ok)

    # ---- creation ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, n_train: int, n_test: int, n_classes: int,
               dtype: str = "float16", class_names: Sequence[str] | None = None,
               arrays: dict[str, object] | None = None) -> "RunStore":
        """A new, empty store, with optional arrays (e.g. labels_train): all or nothing.

        Built in a hidden folder beside `path`, `.NAME.creating-HOST-PID-XXXX`, and renamed
        into place, so a failed or killed create leaves no store behind. A failed create
        removes its folder; one killed leaves it until the next create at `path`, or the
        next write to the store there, sweeps it (`sweep_stale_creations`: this host's
        folders whose process is gone). If another process creates a store at `path`
        first, raises StoreError (see `open_or_create`).
        """
        spec = StoreSpec(n_train, n_test, n_classes, dtype,
                         tuple(class_names) if class_names else None)
        arrays = {name: check_array(spec, name, v, "given") for name, v in (arrays or {}).items()}
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{path}: exists and is not an empty directory or a store")
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_creations(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_creating_prefix(path)))
        try:
            _build(tmp, spec, arrays)
            _wrote("create: built")
            try:
                os.rename(tmp, path)
            except OSError as e:
                raise StoreError(f"{path}: was created by another process meanwhile") from e
            fsync_dir(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path)

    @classmethod
    def open_or_create(cls, path: str | Path, spec: StoreSpec,
                       arrays: dict[str, object] | None = None) -> "RunStore":
        """The store at `path`, created to `spec` if absent; refuse one that does not fit."""
        if not is_store(path):
            try:
                return cls.create(path, n_train=spec.n_train, n_test=spec.n_test,
                                  n_classes=spec.n_classes, dtype=spec.dtype,
                                  class_names=spec.class_names, arrays=arrays)
            except StoreError:
                if not is_store(path):  # not a lost race: a real error
                    raise
        store = cls(path)
        store._check_fits(spec)
        store.set_arrays(arrays or {})
        return store

    def check_options(self, *, dtype: str | None = None,
                      class_names: Sequence[str] | None = None) -> None:
        """Refuse creation options that contradict this store (they apply when creating)."""
        if dtype is not None and dtype != self.dtype:
            raise InputError(f"{self.path} keeps logits as {self.dtype}, not {dtype}: --dtype "
                             "applies when a store is created; ingest into a new store")
        if class_names is not None and tuple(class_names) != self.spec.class_names:
            have = ",".join(self.spec.class_names) if self.spec.class_names else "none"
            raise InputError(f"{self.path} has class names {have}, not "
                             f"{','.join(class_names)}; drop --class-names or use a new store")

    def _check_fits(self, spec: StoreSpec) -> None:
        if (spec.n_train, spec.n_test, spec.n_classes) != (self.spec.n_train, self.spec.n_test,
                                                           self.spec.n_classes):
            raise InputError(f"{self.path} holds {self.spec.n_train} train and "
                             f"{self.spec.n_test} test examples of {self.spec.n_classes} classes,"
                             f" not {spec.n_train}, {spec.n_test} and {spec.n_classes}")
        self.check_options(dtype=spec.dtype, class_names=spec.class_names)

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
        """One split as a LogitSource; the first call warns where the store's dtype has
        rounded its first runs past their spread (`store_precision.rounding_warning`)."""
        if not getattr(self, "_rounding_checked", False):
            self._rounding_checked = True
            if (text := rounding_warning(self)) is not None:
                warnings.warn(text, stacklevel=2)
        return StoreSource(self, split)

    def optional(self, name: str) -> np.ndarray | None:
        """A committed optional array (labels_train, inputs_test, ...), or None.

        StoreError naming the array, the chunk and the examples it holds where a chunk is
        missing or damaged, or (format 3) where its metadata's seal does not match."""
        if name not in self._arrays:
            return None
        values = self._read_optional(name)
        kind, _, split = name.rpartition("_")
        if kind in ("inputs", "features"):  # stores of version 1 were not checked
            check_extra(kind, values, self.spec.size(split), f"{self.path} '{name}'")
        return values

    def _read_optional(self, name: str) -> np.ndarray:
        """A committed optional array, every chunk checked present and whole."""
        if self._local:
            self._read_meta(f"{name}/zarr.json", sealed=self.checked)
        try:
            array = self._group[name]
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise damaged(self.path, f"array {name}", f"it cannot be opened: {e}") from e
        if array.size == 0:
            return array[...]
        grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks)]
        coords = [tuple(c) for c in np.ndindex(*[len(g) for g in grid])]

        def where(coord: tuple[int, ...]) -> str:
            key = array.metadata.encode_chunk_key(coord)
            c0 = array.chunks[0]
            first, last = coord[0] * c0, min((coord[0] + 1) * c0, array.shape[0]) - 1
            return f"chunk {name}/{key} (examples {first}..{last})"

        for coord, present in zip(coords, chunks_exist(array, coords)):
            if not present:
                raise damaged(self.path, where(coord), "the chunk is missing")
        expected = (self._logits.attrs.get("array_crc32c") or {}).get(name) \
            if self._local and self.checked else None
        for coord in coords if isinstance(expected, dict) else ():
            key = array.metadata.encode_chunk_key(coord)
            try:
                with open(self.path / name / key, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    tail = f.read(4).hex()
            except OSError:
                tail = None  # too short, or unreadable: the read below names it
            if tail is not None and expected.get(key) != tail:
                raise damaged(self.path, where(coord), "it holds other values than the commit "
                              "recorded: moved, or copied from elsewhere")
        try:
            return array[...]
        except _DECODE_ERRORS as e:
            for coord in coords:
                box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coord, array.chunks))
                try:
                    array[box]
                except _DECODE_ERRORS as bad:
                    raise damaged(self.path, where(coord), str(bad)) from e
            raise damaged(self.path, f"array {name}", str(e)) from e

    def sample_runs(self, n: int) -> torch.Tensor | None:
        """The first `n` committed runs (fewer if the store has fewer), both splits, as a
        float32 Tensor of shape (n_runs, n_train + n_test, n_classes); None if it has none.
        Kept for later calls (committed runs never change)."""
        have = min(n, self.n_models)
        if have == 0:
            return None
        kept = getattr(self, "_sample", None)
        if kept is None or kept.shape[0] < have:
            # Each chunk's own checksum is checked, not its record's: that would read every
            # record, at every append. Later reads check those chunks in full again.
            expected, self._expected = self._expected, {}
            try:
                kept = self._sample = torch.from_numpy(
                    self.read_logits(slice(0, have), slice(0, None)).astype(np.float32))
            finally:
                self._expected = expected
                self._verified = {k: v for k, v in self._verified.items() if k[0] >= have}
        return kept[:have]

    def rounding_check(self) -> RoundingCheck:
        """The check of appends against this store's spread (`store_precision`), kept."""
        if getattr(self, "_rounding", None) is None:
            self._rounding = RoundingCheck(self.dtype, self.path,
                                           lambda: self.sample_runs(SAMPLE_RUNS))
        return self._rounding

    def shapes(self) -> dict[str, list[int]]:
        """Shape of every array: logits (committed runs) and the committed optional ones."""
        out = {"logits": [self.n_models, *self._logits.shape[1:]]}
        for name in sorted(self._arrays):
            if self._local:  # checked, and no chunk read
                shape = self._read_meta(f"{name}/zarr.json", sealed=self.checked).get("shape")
                if not isinstance(shape, list):
                    raise damaged(self.path, f"{name}/zarr.json", "no shape")
                out[name] = shape
            else:
                out[name] = list(self._group[name].shape)
        return out

    def labels(self, split: str) -> torch.Tensor | None:
        labels = self.optional(f"labels_{split}")
        return None if labels is None else torch.from_numpy(labels.astype(np.int64))

    def _doc(self, key: str) -> dict | None:
        """The attributes of the group at `key`, or None (local: one file read)."""
        if self._local:
            doc = self._read_meta(f"{key}/zarr.json", sealed=self.checked, missing_ok=True)
            return None if doc is None else doc["attributes"]
        try:
            return dict(self._group[key].attrs)
        except KeyError:
            return None

    def records(self) -> list[dict]:
        """Run records of committed source files, in run order.

        In a store of format 3 they must cover the committed runs exactly, one after
        another: a missing, damaged or contradicting record is a StoreError."""
        if self._local:
            if self.checked:
                self._read_meta("records/zarr.json", sealed=True)  # the folder itself
            docs = [(m.parent.name, self._read_meta(f"records/{m.parent.name}/zarr.json",
                                                   sealed=self.checked)["attributes"])
                    for m in (self.path / "records").glob("*/zarr.json")]
        else:
            docs = [(name, dict(g.attrs)) for name, g in self._group["records"].groups()]
        out = []
        for name, doc in docs:
            record = doc.get("record")
            if not _is_record(record) or f"{record['runs'][0]:09d}" != name:
                raise damaged(self.path, f"records/{name}/zarr.json", "not a run record")
            if record["runs"][1] <= self.n_models:
                out.append(record)
        out.sort(key=lambda r: r["runs"][0])
        if self.checked:
            ends = [0] + [r["runs"][1] for r in out]
            if any(r["runs"][0] != end for r, end in zip(out, ends)) or ends[-1] != self.n_models:
                covered = ", ".join(f"{a}..{b - 1}" for a, b in (r["runs"] for r in out))
                raise damaged(self.path, "records/", f"the records cover runs "
                              f"{covered or 'none'}, but logits/zarr.json commits "
                              f"{self.n_models} runs")
        return out

    def code(self, sha256: str) -> str | None:
        """The training code stored under its content hash, or None."""
        doc = self._doc(f"code/{sha256}")
        return None if doc is None else doc["code"]

    def run_source(self, model: int) -> str:
        for record in self.records():
            if record["runs"][0] <= model < record["runs"][1]:
                return f"{record['source']}, run {model - record['runs'][0]} in it"
        return "source unknown"

    def committed_runs(self, sha256: str) -> tuple[int, int] | None:
        """The runs of the first committed file with this content key (`content_key`), or
        None. O(1)."""
        if self.attrs.get("format_version") == 1:  # no index yet
            found = next((r for r in self.records() if content_key(r) == sha256), None)
            return None if found is None else tuple(found["runs"])
        if self._local and self.checked:  # a deleted index would re-add every file
            self._read_meta("index/zarr.json", sealed=True)
            self._read_meta("records/zarr.json", sealed=True)
        return self._indexed_runs(sha256)

    def _indexed_runs(self, sha256: str) -> tuple[int, int] | None:
        entry = self._doc(f"index/{sha256}")
        if entry is None or entry["runs"][1] > self.n_models:
            return None
        first = self._doc(f"records/{entry['runs'][0]:09d}")
        if first is None or not _is_record(first.get("record")) \
                or content_key(first["record"]) != sha256 \
                or first["record"]["runs"] != entry["runs"]:
            return None  # left by an append that never committed
        return tuple(entry["runs"])

    # ---- writing: one writer at a time ---------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writers' lock; re-read the committed state under it."""
        self._require_local()
        if not self._swept:  # once per instance: it lists the store's parent folder
            sweep_stale_creations(self.path)
            self._swept = True
        with writer_lock(self.path / "logits" / ".lock", str(self.path)):
            self._refresh()
            if self.attrs["format_version"] == 1:
                self._upgrade_v1()
            yield

    def _require_local(self) -> None:
        if not self._local:
            raise StoreError(f"{self.path}: appending needs a store on a local or mounted "
                             "filesystem; ingest into one and copy it")

    def _refresh(self) -> None:
        """Re-read the committed state (under the lock): reopen only if another writer
        committed since (one small file read when nothing changed)."""
        meta = json.loads((self.path / "logits" / "zarr.json").read_text())
        if meta != self._committed_meta:
            self._open()
            self._committed_meta = meta

    def set_array(self, name: str, values: np.ndarray | torch.Tensor) -> None:
        """Write an optional array (labels, inputs, features) as one commit; refuse to
        contradict one stored. Its dimension names follow its kind."""
        self.set_arrays({name: values})

    def set_arrays(self, arrays: dict[str, object], source: str = "given") -> list[str]:
        """Write optional arrays, all checked first, as one commit; returns the names
        written (those not already committed)."""
        checked = {name: check_array(self.spec, name, v, source) for name, v in arrays.items()}
        if not checked:
            return []
        with self._writing():
            new = self._new_arrays(checked)
            if new:
                self._publish(new)
                self._commit(self.n_models, self._arrays | set(new))
        return sorted(new)

    def check_arrays(self, arrays: dict[str, object], source: str = "given") -> list[str]:
        """Check optional arrays as `set_arrays` would, writing nothing: InputError for one
        that does not fit or differs from the committed one; returns the names that
        `set_arrays` would write now."""
        checked = {name: check_array(self.spec, name, v, source) for name, v in arrays.items()}
        return sorted(self._new_arrays(checked))

    def set_labels(self, split: str, labels: torch.Tensor | None) -> None:
        if labels is not None:
            self.set_array(f"labels_{split}", labels.to(torch.int64))

    def _new_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Those not yet committed; InputError for one that differs from the stored one."""
        new = {}
        for name, values in arrays.items():
            if name not in self._arrays:
                new[name] = values
                continue
            stored = self._read_optional(name)
            if stored.shape != values.shape or not np.array_equal(stored, values):
                raise InputError(f"{name} given differs from the {name} already in the store "
                                 f"{self.path}; the store keeps one set per split")
        return new

    def append_file(self, path: str | Path, *, allow_duplicates: bool = False,
                    on_runs: Callable[[int], None] | None = None,
                    test_key: str | None = None, check_precision: bool = True
                    ) -> IngestReport:
        """Append the runs of one run file, as one commit; skip it if its content is stored.

        Labels the file carries are checked against the store's and committed with its runs.
        `test_key` names the file's array for the test split (default ``logits``).
        """
        path = Path(path)
        digest = file_hash(path)
        key = content_key({"sha256": digest, "test_key": test_key})
        if not allow_duplicates and (runs := self.committed_runs(key)) is not None:
            return IngestReport(str(path), "skipped", runs)  # committed is forever: no lock
        run = read_run_file(path, test_key=test_key)
        arrays = {f"labels_{split}": labels for split, labels in
                  (("train", run.labels_train), ("test", run.labels_test)) if labels is not None}
        return self.append_arrays(run.train, run.test, source=str(path), sha256=digest,
                                  code=run.code, on_runs=on_runs, arrays=arrays,
                                  skip_committed=not allow_duplicates, test_key=test_key,
                                  check_precision=check_precision)

    def append_arrays(self, train, test, *, source: str, sha256: str | None = None,
                      code: str | None = None, seeds: Sequence[int] | None = None,
                      on_runs: Callable[[int], None] | None = None,
                      arrays: dict[str, object] | None = None,
                      skip_committed: bool = False, test_key: str | None = None,
                      check_precision: bool = True) -> IngestReport:
        """Append runs held in memory, as one commit.

        Parameters
        ----------
        train, test : arrays of shape (n_runs, n_train | n_test, n_classes).
        source : what to record as their origin.
        sha256 : their content hash for de-duplication; default: a hash of the arrays.
        seeds : one per run, recorded.
        arrays : optional arrays (labels_train, ...) committed with these runs.
        skip_committed : return 'skipped' if a file of this sha256 is already committed.
        test_key : the source's key for the test split, recorded (None: the default).
        check_precision : refuse runs the store's dtype rounds past their spread (False:
            the caller has checked them with `rounding_check`).

        Raises
        ------
        InputError where the store's dtype would round away the run-to-run spread of these
        runs (`store_precision.RoundingCheck`), before anything is written.
        """
        self._require_local()
        train, test = check_runs(self.spec, train, test, source, f"the store {self.path}")
        r = train.shape[0]
        if seeds is not None and len(seeds) != r:
            raise InputError(f"{source}: {len(seeds)} seeds for {r} runs")
        checked = {name: check_array(self.spec, name, v, source)
                   for name, v in (arrays or {}).items()}
        sha256 = sha256 or _sha256_arrays(train, test)
        test_key = None if test_key == "logits" else test_key
        key = content_key({"sha256": sha256, "test_key": test_key})
        if check_precision:
            self.rounding_check().check(torch.cat([train[:SAMPLE_RUNS], test[:SAMPLE_RUNS]],
                                                  dim=1), source)
        with self._writing():
            n = self.n_models
            runs = self.committed_runs(key)  # the writes below cannot change it
            if skip_committed and runs is not None:
                return IngestReport(source, "skipped", runs)
            try:
                new = self._new_arrays(checked)
            except InputError as e:
                raise InputError(f"{source}: {e}; nothing was written") from e
            # ---- every check passed: the first byte is written below -----------------
            self._publish(new)
            written, crcs = self._write_runs(n, train, test, on_runs)
            code_hash = _sha256_text(code) if code is not None else None
            if code is not None and self.code(code_hash) is None:
                written.append(self._write_group(f"code/{code_hash}", {"code": code}, "code"))
            record = {"source": source, "sha256": sha256, "runs": [n, n + r],
                      "stored_dtype": self.dtype,
                      "source_dtype": str(train.dtype).replace("torch.", ""),
                      "code_sha256": code_hash, "test_key": test_key,
                      "seeds": list(map(int, seeds)) if seeds is not None else None}
            if crcs:
                record["chunk_crc32c"] = crcs
            written.append(self._write_group(f"records/{n:09d}", {"record": record}, "record"))
            if runs is None:
                written.append(self._write_group(f"index/{key}", {"runs": [n, n + r]},
                                                 "index"))
            fsync_files(written, up_to=self.path)  # one journal commit for all of them
            _wrote("fsync")
            self._commit(n + r, self._arrays | set(new))
        return IngestReport(source, "added", (n, n + r))

    def _write_runs(self, n: int, train: torch.Tensor, test: torch.Tensor,
                    on_runs: Callable[[int], None] | None) -> tuple[list[Path], list[str]]:
        """Chunks of runs n.. (not yet fsynced); returns their files and, in a checked
        store, each run's chunk checksums (`run_chunk_crcs`, kept in its record)."""
        r = train.shape[0]
        writer = grown_writer(self._logits, (n + r,) + self._logits.shape[1:])
        dtype = np.dtype(self.dtype).newbyteorder("<")
        crcs: list[str] = []
        for b in range(0, r, _WRITE_BLOCK):
            block = slice(b, min(b + _WRITE_BLOCK, r))
            both = torch.cat([train[block], test[block]], dim=1)  # (runs, n_train + n_test, C)
            values = both.float().numpy().astype(dtype)
            writer[n + block.start:n + block.stop] = values
            if self._plain is not None and self._plain[2]:
                crcs += run_chunk_crcs(values, self._plain[1])
            if on_runs is not None:
                on_runs(block.stop - block.start)
            _wrote(f"runs {n + block.start}..{n + block.stop - 1}")
        return [self.path / "logits" / self._logits.metadata.encode_chunk_key(c)
                for c in self._chunks_of(slice(n, n + r), slice(0, self._logits.shape[1]))], crcs

    def _write_group(self, key: str, attributes: dict, step: str) -> Path:
        """A zarr v3 group's metadata, one atomic file (the unit of a record); not fsynced."""
        meta = self.path / key / "zarr.json"
        atomic_write_text(meta, json.dumps(
            seal({"zarr_format": 3, "node_type": "group", "attributes": attributes})))
        _wrote(step)
        return meta

    def _publish(self, arrays: dict[str, np.ndarray]) -> None:
        """Write each array under logits/.staging/, fsync it, rename it into place.

        A folder of that name that is not committed (left by a killed writer) is removed
        first. Readers see an array only once a commit lists it.
        """
        if not arrays:
            return
        staging = self.path / "logits" / ".staging"
        if staging.exists():
            shutil.rmtree(staging)  # leftovers of killed writers; we hold the lock
        for name, values in sorted(arrays.items()):
            tmp = staging / f"{name}-{uuid.uuid4().hex}"
            array = zarr.create_array(zarr.storage.LocalStore(tmp), shape=values.shape,
                                      dtype=values.dtype, fill_value=0,
                                      compressors=_OPTIONAL_CODECS,
                                      dimension_names=array_dims(name, values))
            array[...] = values
            seal_file(tmp / "zarr.json")
            self._pending_crcs[name] = _array_chunk_crcs(tmp)
            fsync_tree(tmp)
            target = self.path / name
            if target.exists():  # not committed (checked by the caller): a leftover
                os.rename(target, staging / f"old-{uuid.uuid4().hex}")
            os.rename(tmp, target)
            fsync_dir(self.path)
            _wrote(f"array {name}")
        shutil.rmtree(staging)

    def _commit(self, n_runs: int, arrays: set[str]) -> None:
        """The commit point: one durable atomic write of logits/zarr.json."""
        meta_path = self.path / "logits" / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"][0] = n_runs
        meta["attributes"].update(format_version=max(2, self.attrs["format_version"]),
                                  arrays=sorted(arrays))
        kept = {**meta["attributes"].get("array_crc32c", {}), **self._pending_crcs}
        self._pending_crcs = {}
        if kept:  # each optional array's chunk checksums, bound to the commit
            meta["attributes"]["array_crc32c"] = {n: kept[n] for n in sorted(arrays) if n in kept}
        meta = seal(meta)
        atomic_write_text(meta_path, json.dumps(meta, indent=2), durable=True)
        _wrote("commit")
        self._logits = grown_writer(self._logits, (n_runs,) + self._logits.shape[1:])
        self._arrays = set(arrays)
        self._committed_meta = meta

    def _upgrade_v1(self) -> None:
        """Format 1 -> 2, under the lock: index the records, list the arrays, then mark.
        (Format 3 adds checksums to every chunk: `upgrade` rewrites the whole store.)"""
        written = [self._write_group("index", {}, "upgrade index")]  # a valid hierarchy
        for record in self.records():
            if self._indexed_runs(record["sha256"]) is None:
                written.append(self._write_group(f"index/{record['sha256']}",
                                                 {"runs": record["runs"]}, "upgrade index"))
        fsync_files(written, up_to=self.path)
        self._commit(self.n_models, self._arrays)
        root = json.loads((self.path / "zarr.json").read_text())
        root["attributes"][_MARK]["format_version"] = 2
        atomic_write_text(self.path / "zarr.json", json.dumps(root, indent=2), durable=True)
        _wrote("upgrade")
        self._open()
        logger.info("%s: upgraded from format version 1 to 2", self.path)
