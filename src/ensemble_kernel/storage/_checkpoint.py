"""Finished tiles on disk, so that a killed `neighbors` resumes instead of starting over.

Next to the output `OUT` lives `OUT.partial/`: `manifest.json` and one `tile-NNNNN.npz`
per finished tile, each written atomically. The manifest binds the tiles to everything
the result depends on:

- the *content* of the logits: the SHA-256 of every run file, in order, or, for a store,
  the records (source, SHA-256, runs) of the committed files that hold the runs used; a
  file rewritten in place, or a store rebuilt at the same path with as many runs, does not
  match;
- the runs used, the options that change the neighbours (k, precision, log-softmax,
  device), the library version;
- the tile plan (tile size, runs per block), kept so that every restart and every rank
  cuts the same tiles. The memory budget only matters through it: `neighbors` starts over
  when the kept plan does not fit this run's budget (`plan_memory` checks a kept plan).

A restart with a matching manifest reuses every tile that reads back whole, of the right
shape and cut by the manifest's plan (each tile carries it; a damaged one is computed
again); with any other manifest it starts over (`differs` says what differed).
Labels play no part in the neighbours, but a --labels file is bound all the same (its
SHA-256, in the manifest's inputs).

The folder is this command's own: its manifest says it was made by `neighbors`. A folder
at that path without such a manifest is the user's, and is never touched: the command
refuses. Starting over and finishing remove only the checkpoint's own files: its
manifest, its lock and the tiles its manifest's plan cuts (a `tile-99999.npz` beyond
them is someone else's, and stays).

One job at a time: a job holds an exclusive lock (flock) on `OUT.partial/.lock` from
before it reads the checkpoint until it has written OUT and removed the folder; a second
job on the same OUT is refused while the first runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .._atomic import atomic_write, atomic_write_text
from ..errors import InputError
from ._formats import file_hash
from ..core._neighbors import Neighbors

__all__ = ["TileCheckpoint", "content_fingerprint"]

logger = logging.getLogger(__name__)
MADE_BY = "ensemble-kernel neighbors"
_TILE = re.compile(r"tile-(\d{5})\.npz")
_TILE_TEMP = re.compile(r"\.tile-(\d{5})\.npz\..*\.partial")  # (`atomic_write`'s, killed)
_MANIFEST = re.compile(r"manifest\.json|\.manifest\.json\..*\.partial")
LOCK = ".lock"
_HELD: dict[Path, int] = {}  # folder (resolved) -> the open .lock this process holds


def content_fingerprint(sources: Sequence[str], runs: slice) -> list[dict]:
    """What the logits of `sources` are, by content: one entry per source.

    A store gives the records of its committed files that hold runs in `runs` (their
    SHA-256 and run ranges); a run file gives its SHA-256 and size.
    """
    from ._store import RunStore, is_store  # the store imports formats; keep this light

    out = []
    for source in sources:
        if is_store(source):
            records = [r for r in RunStore(source).records()
                       if r["runs"][0] < runs.stop and r["runs"][1] > runs.start]
            out.append({"store": str(source), "records": records})
        else:
            out.append({"file": Path(source).name, "size": Path(source).stat().st_size,
                        "sha256": file_hash(source)})
    return out


class TileCheckpoint:
    """The `OUT.partial/` folder of one computation.

    Parameters
    ----------
    out : the result file; the folder is `OUT.partial/` beside it.
    inputs : everything the result depends on except the plan (JSON-serialisable).
    """

    def __init__(self, out: Path, inputs: dict):
        self.folder = out.with_name(out.name + ".partial")
        self.inputs = inputs
        # After `load` found a checkpoint it cannot resume: what differs ('content',
        # 'options.k', 'plan', ...); empty otherwise.
        self.differs: list[str] = []
        self.plan: dict | None = None  # the plan its tiles are cut by (`load`, `start`)

    def _manifest(self) -> dict | None:
        """The folder's manifest if this command made the folder; None if there is none."""
        if not self.folder.exists():
            return None
        path = self.folder / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            manifest = None
        if manifest is None and self.folder.is_dir() and _only_setup_files(self.folder):
            return None  # a job's lock, taken before its first manifest (or killed then)
        if not self.folder.is_dir() or not isinstance(manifest, dict) or \
                manifest.get("made_by") != MADE_BY:
            raise InputError(
                f"{self.folder} exists and was not made by neighbors (no checkpoint manifest "
                "in it); it is left alone: move it away or choose another --out")
        return manifest

    def check_owner(self) -> None:
        """Raise InputError if `OUT.partial` exists and is not this command's folder."""
        self._manifest()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the folder's lock for the block (making the folder if need be): a second
        job on the same OUT is refused (InputError) while this one runs. A user's folder
        is refused before anything is written in it. On leaving, the lock file goes (and
        the folder with it, if that left it empty)."""
        self._manifest()
        fd = _take_lock(self.folder)
        key = self.folder.resolve()
        _HELD[key] = fd
        try:
            self._manifest()  # again, now that no other job can change it
            yield
        finally:
            del _HELD[key]
            _release_lock(self.folder, fd)

    def load(self, n_rows: int, k_keep: int, n_references: int) -> tuple[dict | None,
                                                                          dict[int, Neighbors]]:
        """The plan and the tiles of an earlier run with the same inputs, read-only.

        Returns (None, {}) when there is nothing to resume. Tiles that do not read back
        whole, with shape (n_rows, k_keep) and indices in range, are left out (computed
        again).
        """
        manifest = self._manifest()
        self.differs = []
        if manifest is None:
            return None, {}
        if manifest.get("inputs") != self.inputs:
            self.differs = _differences(manifest.get("inputs"), self.inputs)
            return None, {}
        plan = manifest.get("plan")
        if not isinstance(plan, dict) or any(type(plan.get(key)) is not int or plan[key] < 1
                                             for key in ("tile_size", "chunk_models")):
            self.differs = ["plan"]
            return None, {}
        size = plan["tile_size"]
        self.plan = plan
        tiles, other_plan = {}, 0
        for f in sorted(self.folder.glob("tile-*.npz")):
            named = _TILE.fullmatch(f.name)
            if named is None:  # not a name this command writes (a copy, a stray file)
                logger.warning("ignoring %s: not a tile file of neighbors", f)
                continue
            index = int(named.group(1))
            references = range(index * size, min((index + 1) * size, n_references))
            found = _read_tile(f, n_rows, k_keep, references, plan) if references else None
            if found is _OTHER_PLAN:
                other_plan += 1
            elif found is None:
                logger.warning("ignoring %s: not a whole tile of this computation", f)
            else:
                tiles[index] = found
        if other_plan:
            logger.warning("computing %d tiles in %s again: cut by another plan, or written "
                           "by an earlier version", other_plan, self.folder)
        logger.info("resuming: %d finished tiles in %s", len(tiles), self.folder)
        return plan, tiles

    def start(self, plan: dict) -> None:
        """Begin afresh: clear this command's earlier files, write the manifest and plan."""
        self._manifest()  # refuses a folder that is not ours
        # The manifest is replaced in place, never removed first: a kill at any point
        # leaves a folder this command still recognises as its own.
        self._clear(keep_folder=True)
        self.plan = plan
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "manifest.json", json.dumps(
            {"made_by": MADE_BY, "inputs": self.inputs, "plan": plan}))

    def save(self, index: int, found: Neighbors) -> None:
        """Write one finished tile (atomically)."""
        atomic_write(self.folder / f"tile-{index:05d}.npz", lambda f: np.savez(
            f, indices=found.indices.cpu().numpy(), values=found.values.cpu().numpy(),
            plan=_plan_array(self.plan)))

    def remove(self) -> None:
        """Remove the folder if this command made it: only its own files, then the folder
        if that left it empty. A folder that is not ours is not touched."""
        try:
            if self._manifest() is None:
                return
        except InputError:
            return
        if self.folder.resolve() in _HELD:
            self._clear()
            return
        try:  # (neighbors --no-resume: only if no job is using the folder)
            with self.hold():
                self._clear()
        except InputError as e:
            logger.warning("left %s: %s", self.folder, e)

    def _clear(self, keep_folder: bool = False) -> None:
        """Remove this command's files, the manifest last (so that a kill part-way leaves
        a folder still marked as ours); then, unless `keep_folder`, the lock and the
        folder. Its files are the manifest and the tiles of the manifest's plan (indices
        below its tile count): any other file, even one named like a tile, stays."""
        if not self.folder.is_dir():
            return
        n_tiles = _tile_count(self._manifest())

        def own(name: str) -> bool:
            tile = _TILE.fullmatch(name) or _TILE_TEMP.fullmatch(name)
            if tile is not None:
                return n_tiles is not None and int(tile.group(1)) < n_tiles
            return _MANIFEST.fullmatch(name) is not None or name == LOCK and not keep_folder

        files = [f for f in self.folder.iterdir() if f.is_file() and own(f.name)]
        manifest = self.folder / "manifest.json"
        for f in sorted(files, key=lambda f: f == manifest):
            if not (keep_folder and f == manifest):
                f.unlink(missing_ok=True)
        if keep_folder:
            return
        try:
            self.folder.rmdir()
        except OSError:  # something else is in it: not ours to delete
            logger.warning("left %s: it holds files neighbors did not write", self.folder)


def _tile_count(manifest: dict | None) -> int | None:
    """How many tiles the manifest's plan cuts; None if it does not say."""
    try:
        size, n_references = manifest["plan"]["tile_size"], manifest["inputs"]["n_examples"][1]
    except (KeyError, IndexError, TypeError):
        return None
    if type(size) is not int or type(n_references) is not int or size < 1:
        return None
    return -(-n_references // size)


def _only_setup_files(folder: Path) -> bool:
    """`folder` holds a lock and nothing else of note (a manifest's temporary file)."""
    names = [p.name for p in folder.iterdir()]
    return LOCK in names and all(n == LOCK or _MANIFEST.fullmatch(n) for n in names)


def _take_lock(folder: Path) -> int:
    """An open file holding an exclusive flock on `folder`/.lock, which names this process;
    InputError if another job holds it. (Retried where the lock file went between opening
    and locking it: its holder finished and removed it.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (no flock here: no lock)
        return -1
    path = folder / LOCK
    for _ in range(100):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the folder went just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise InputError(f"{folder} is in use by another neighbors job ({pid}); wait for "
                             "it or choose another --out") from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino,
                                                                       mine.st_dev):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # locked a file that is no longer there: again
    raise InputError(f"{folder}: could not take its lock (it keeps changing); is another "
                     "neighbors job starting on the same --out?")


def _release_lock(folder: Path, fd: int) -> None:
    """Remove the lock file if it is still the one `fd` holds, then let go of it; and the
    folder, if nothing else is left in it."""
    if fd < 0:
        return
    path = folder / LOCK
    try:
        current, mine = os.stat(path), os.fstat(fd)
        if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    try:
        folder.rmdir()
    except OSError:  # not empty (a checkpoint to resume, or the user's files), or gone
        pass


def _differences(kept, inputs: dict) -> list[str]:
    """The keys of `inputs` (and of its options) whose values `kept` does not share."""
    if not isinstance(kept, dict):
        return ["inputs"]
    out = []
    for key in sorted(set(kept) | set(inputs)):
        a, b = kept.get(key), inputs.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"options.{o}" for o in sorted(set(a) | set(b)) if a.get(o) != b.get(o)]
        elif a != b:
            out.append(key)
    return out


def _plan_array(plan: dict) -> np.ndarray:
    """The plan a tile was cut by, written into the tile: a tile of another plan (a manifest
    edited, or written over by hand) is not taken for one of this plan."""
    return np.array([plan["tile_size"], plan["chunk_models"]], dtype=np.int64)


_OTHER_PLAN = object()  # `_read_tile`: a tile cut by another plan (or without its plan)


def _read_tile(path: Path, n_rows: int, k_keep: int, references: range, plan: dict):
    """Tile `path` (Neighbors) if it reads back whole: top-k of every row among
    `references`, cut by `plan`; `_OTHER_PLAN` if cut by another; None if damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "plan" not in data.files or not np.array_equal(data["plan"], _plan_array(plan)):
                return _OTHER_PLAN
            indices, values = data["indices"], data["values"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged
        logger.warning("%s: %s", path, e)
        return None
    shape = (n_rows, min(k_keep, len(references)))
    if indices.shape != shape or values.shape != shape or indices.dtype != np.int64 or \
            values.dtype != np.float32:
        return None
    if indices.size and (indices.min() < references.start or indices.max() >= references.stop):
        return None
    return Neighbors(torch.from_numpy(indices), torch.from_numpy(values))
