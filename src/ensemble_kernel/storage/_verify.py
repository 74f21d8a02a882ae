"""Check a whole store, mend the runs a damaged one can get back, upgrade an old one.

- `verify_store`: every chunk of every array read once and checked against its CRC-32C,
  every metadata document against its seal, the records against the committed runs, the
  index and the code against the records and, given the run files, each file's SHA-256
  and its runs' values against what the store holds. A report lists what disagrees.
- `repair_file`: rewrites, in place and under the writers' lock, the chunks of the runs a
  file's record names (where they differ from the file), and that record, its index
  entry and its code, from a file whose SHA-256 the store's record keeps.
- `upgrade_store`: a store of format 1 or 2 (no checksums) rewritten as format 3: a whole
  copy built beside it, then swapped in with one atomic exchange of the two folders.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import EnsembleKernelError, InputError, StoreError
from ._formats import file_hash, read_run_file
from ._layout import FORMAT_VERSION, build, content_key, creating_prefix, sweep_stale_creations
from ._store import RunStore
from ._checks import check_runs
from ._io import fsync_dir, fsync_files
from ._meta import check_seal, chunk_crc, run_chunk_crcs

__all__ = ["VerifyReport", "RepairReport", "verify_store", "repair_file", "upgrade_store"]

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class VerifyReport:
    """What `verify_store` checked, and every problem it found (empty: all agree)."""

    path: str
    format_version: int | None
    n_runs: int
    chunks: int  # logits chunks read
    arrays: tuple[str, ...]  # optional arrays read
    records: int
    sources: int  # run files compared
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: str | Path, sources: Sequence[Path] = (), *,
                 progress: Progress | None = None) -> VerifyReport:
    """Check every chunk, document, record and index entry of the store at `path`, and
    each of `sources` (run files) against the records and runs it holds."""
    path = Path(path)
    problems: list[str] = []
    try:
        store = RunStore(path)
    except StoreError as e:
        return VerifyReport(str(path), None, 0, 0, (), 0, 0, (str(e),))
    n, chunks = store.n_models, 0
    total = n + len(sources)
    for m in range(n):  # every run, each chunk once: a fresh store object checks them all
        try:
            store.read_logits(slice(m, m + 1), slice(0, None))
        except StoreError as e:
            problems.append(str(e))
        chunks += len(store._chunks_of(slice(m, m + 1), slice(0, store._logits.shape[1])))
        if progress is not None:
            progress(m + 1, total)
    for name in sorted(store._arrays):
        try:
            store.optional(name)
        except EnsembleKernelError as e:
            problems.append(str(e))
    records: list[dict] = []
    try:
        records = store.records()
    except StoreError as e:
        problems.append(str(e))
    problems += _check_index_and_code(store, records)
    for i, source in enumerate(sources):
        problems += _check_source(store, records, Path(source))
        if progress is not None:
            progress(n + i + 1, total)
    if not store.checked:
        problems.append(f"{path}: format {store.attrs['format_version']} carries no checksums,"
                        " so damage can go unnoticed: `ensemble-kernel upgrade "
                        f"{path}` rewrites it as format {FORMAT_VERSION}")
    return VerifyReport(str(path), store.attrs["format_version"], n, chunks,
                        tuple(sorted(store._arrays)), len(records), len(sources),
                        tuple(problems))


def _check_index_and_code(store: RunStore, records: list[dict]) -> list[str]:
    problems, first = [], {}
    for record in records:
        first.setdefault(content_key(record), record)
    for key, record in first.items():
        try:
            runs = store.committed_runs(key)
        except StoreError as e:
            return problems + [str(e)]
        if runs is None or list(runs) != record["runs"]:
            problems.append(f"{store.path}: index/{key} is missing or damaged (it should "
                            f"name runs {record['runs'][0]}..{record['runs'][1] - 1}): a "
                            f"re-ingest would add {record['source']} again; repair it with "
                            f"`ensemble-kernel ingest {record['source']} --store {store.path} "
                            "--repair`")
    for sha in {r.get("code_sha256") for r in records} - {None}:
        try:
            code = store.code(sha)
        except StoreError as e:
            problems.append(str(e))
            continue
        import hashlib

        if code is None or hashlib.sha256(code.encode()).hexdigest() != sha:
            problems.append(f"{store.path}: code/{sha} is missing or does not hash to its "
                            "name; repair it with `ensemble-kernel ingest FILE --store "
                            f"{store.path} --repair` from a run file of that code")
    return problems


def _check_source(store: RunStore, records: list[dict], source: Path) -> list[str]:
    try:
        digest = file_hash(source)
    except OSError as e:
        return [f"{source}: cannot be read ({e.strerror or e})"]
    mine = [r for r in records if r["sha256"] == digest]
    if not mine:
        return [f"{source}: its SHA-256 ({digest[:12]}...) matches no record of {store.path} "
                "(changed since it was ingested, or never ingested)"]
    problems = []
    for record in mine:
        try:
            run = read_run_file(source, test_key=record.get("test_key"))
            train, test = check_runs(store.spec, run.train, run.test, str(source))
        except EnsembleKernelError as e:
            problems.append(str(e))
            continue
        a, b = record["runs"]
        want = _as_stored(store, train, test)
        try:
            have = store.read_logits(slice(a, b), slice(0, None))
        except StoreError:
            continue  # the chunk problem is reported already
        if have.shape != want.shape or not np.array_equal(have.view(np.uint8),
                                                          want.view(np.uint8)):
            problems.append(f"{store.path}: runs {a}..{b - 1} differ from {source}, whose "
                            "SHA-256 their record keeps; repair them with `ensemble-kernel "
                            f"ingest {source} --store {store.path} --repair`")
    return problems


def _as_stored(store: RunStore, train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """Runs as the store keeps them: both splits, in its dtype, little-endian."""
    both = torch.cat([train, test], dim=1).float().numpy()
    return both.astype(np.dtype(store.dtype).newbyteorder("<"))


# ---- repair -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepairReport:
    """What `repair_file` did for one file: 'repaired', 'intact' or 'not in the store'."""

    source: str
    status: str
    runs: tuple[int, int] | None
    rewritten: tuple[str, ...] = ()  # the store's files rewritten


def repair_file(store: RunStore, source: Path, *, test_key: str | None = None
                ) -> RepairReport:
    """Rewrite what `source` can give back to `store`: the chunks of the runs its record
    names (where they differ), that record, its index entry and its code."""
    store._require_local()
    if store._plain is None:
        raise StoreError(f"{store.path}: its logits are not in the layout ingest writes; "
                         "repair rewrites only that layout: re-ingest into a new store")
    source = Path(source)
    digest = file_hash(source)
    test_key = None if test_key == "logits" else test_key
    key = content_key({"sha256": digest, "test_key": test_key})
    with store._writing():
        runs = _runs_of(store, key, digest, test_key)
        if runs is None:
            return RepairReport(str(source), "not in the store", None)
        run = read_run_file(source, test_key=test_key)
        train, test = check_runs(store.spec, run.train, run.test, str(source))
        a, b = runs
        if train.shape[0] != b - a:
            raise InputError(f"{source}: {train.shape[0]} runs, but its record in "
                             f"{store.path} holds {b - a}; nothing was written")
        want = _as_stored(store, train, test)
        rewritten = _rewrite_chunks(store, a, want)
        code_hash = None
        if run.code is not None:
            import hashlib

            code_hash = hashlib.sha256(run.code.encode()).hexdigest()
            if _doc_is_bad(store, f"code/{code_hash}"):
                rewritten.append(store._write_group(f"code/{code_hash}", {"code": run.code},
                                                    "code"))
        if _doc_is_bad(store, f"records/{a:09d}"):
            record = {"source": str(source), "sha256": digest, "runs": [a, b],
                      "stored_dtype": store.dtype,
                      "source_dtype": str(run.train.dtype).replace("torch.", ""),
                      "code_sha256": code_hash, "test_key": test_key, "seeds": None,
                      "chunk_crc32c": run_chunk_crcs(want, store._plain[1])}
            rewritten.append(store._write_group(f"records/{a:09d}", {"record": record},
                                                "record"))
        if store.committed_runs(key) != (a, b):
            rewritten.append(store._write_group(f"index/{key}", {"runs": [a, b]}, "index"))
        fsync_files(rewritten, up_to=store.path)
    store._verified.clear()
    store._expected = None
    return RepairReport(str(source), "repaired" if rewritten else "intact", (a, b),
                        tuple(str(p.relative_to(store.path)) for p in rewritten))


def _runs_of(store: RunStore, key: str, digest: str, test_key: str | None
             ) -> tuple[int, int] | None:
    """The committed runs of the record for `key`: through the index, else by reading
    every record document that can be read (the index or a record may be what is
    damaged)."""
    try:
        runs = store.committed_runs(key)
        if runs is not None:
            return runs
    except StoreError:
        pass
    for meta in sorted((store.path / "records").glob("*/zarr.json")):
        try:
            record = json.loads(meta.read_text())["attributes"]["record"]
            if content_key(record) == key and record["runs"][1] <= store.n_models:
                return tuple(record["runs"])
        except (ValueError, KeyError, TypeError, OSError):
            continue
    # The record itself lost: its index entry still names the runs.
    try:
        runs = json.loads((store.path / "index" / key / "zarr.json").read_text()
                          )["attributes"]["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (isinstance(runs, list) and len(runs) == 2 and 0 <= runs[0] < runs[1] <= store.n_models
            and _doc_is_bad(store, f"records/{runs[0]:09d}")):
        return tuple(runs)
    return None


def _doc_is_bad(store: RunStore, key: str) -> bool:
    try:
        doc = json.loads((store.path / key / "zarr.json").read_text())
    except (OSError, ValueError):
        return True
    return store.checked and check_seal(doc) is not None


def _rewrite_chunks(store: RunStore, first: int, want: np.ndarray) -> list[Path]:
    """Each chunk of runs first.. that differs from `want` (runs, examples, classes),
    rewritten atomically; returns their files (not yet fsynced)."""
    dtype, chunk_e, crc = store._plain
    out = []
    for r in range(want.shape[0]):
        m = first + r
        for c in range(-(-want.shape[1] // chunk_e)):
            data = np.ascontiguousarray(want[r, c * chunk_e:(c + 1) * chunk_e]).view(np.uint8)
            blob = data.tobytes() + (chunk_crc(data) if crc else b"")
            path = store.path / "logits" / store._logits.metadata.encode_chunk_key((m, c, 0))
            try:
                if path.is_file() and path.read_bytes() == blob:
                    continue
            except OSError:
                pass
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.is_symlink() or path.exists():
                path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.repair")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            out.append(path)
    return out


# ---- upgrade ------------------------------------------------------------------------------

def upgrade_store(path: str | Path, *, progress: Progress | None = None) -> int:
    """Rewrite the store at `path` as format 3, in a copy beside it swapped in atomically;
    returns the format it had. Holds the writers' lock throughout; needs as much free
    disk as the store takes."""
    store = RunStore(path)
    version = store.attrs["format_version"]
    if store.checked:
        return version
    store._require_local()
    path = store.path
    sweep_stale_creations(path)
    with store._writing():
        version = store.attrs["format_version"]
        arrays = {name: store._read_optional(name) for name in sorted(store._arrays)}
        records = store.records()
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=creating_prefix(path)))
        try:
            build(tmp, store.spec, arrays)
            new = RunStore(tmp)
            for i, record in enumerate(records):
                a, b = record["runs"]
                train = torch.from_numpy(store.read_logits(slice(a, b),
                                                           slice(0, store.spec.n_train)))
                test = torch.from_numpy(store.read_logits(slice(a, b),
                                                          slice(store.spec.n_train, None)))
                code = store.code(record["code_sha256"]) if record.get("code_sha256") else None
                new.append_arrays(train, test, source=record["source"],
                                  sha256=record["sha256"], code=code, seeds=record.get("seeds"),
                                  test_key=record.get("test_key"), check_precision=False)
                if progress is not None:
                    progress(i + 1, len(records))
            _exchange(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the old store, once exchanged
    return version


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere, two
    renames, with the old folder named in the error if the second one fails."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
            fsync_dir(b.parent)
            return
    old = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.rename(b, old)
    try:
        os.rename(a, b)
    except OSError as e:
        raise StoreError(f"{b}: the upgrade could not move the new store into place "
                         f"({e.strerror}); the old store is at {old}: rename it back") from e
    os.rename(old, a)  # removed by the caller
    fsync_dir(b.parent)

