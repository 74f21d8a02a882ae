"""The store's low-level I/O: the writers' lock, durable writes, and zarr's private API.

Everything here serves `store.py`; nothing else imports it.

- `writer_lock`: one exclusive `flock` on a file inside the store, held for a whole append.
- `fsync_files`, `fsync_tree`: what must reach the disk before a commit (and after it).
- `grown_writer`, `chunks_exist`: the only two places that touch zarr's private API
  (`Array._async_array`, `zarr.core.sync.sync`). Both check the zarr version first, so a
  zarr release that changes them fails with a message instead of writing a bad store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import zarr

from .._atomic import fsync_path as _fsync
from ..errors import StoreError

__all__ = ["ZARR_SUPPORTED", "check_zarr_version", "grown_writer", "chunks_exist",
           "writer_lock", "fsync_dir", "fsync_files", "fsync_tree", "NO_LOCK_ENV"]

ZARR_SUPPORTED = ((3, 0), (3, 2))  # [from, to): the zarr releases whose internals we use
NO_LOCK_ENV = "ENSEMBLE_KERNEL_NO_LOCK"  # "1": the user guarantees a single writer
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def check_zarr_version(version: str | None = None) -> None:
    """Raise StoreError unless zarr's version is one whose private API we were tested with."""
    version = zarr.__version__ if version is None else version
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    low, high = ZARR_SUPPORTED
    if not low <= major_minor < high:
        raise StoreError(f"zarr {version} is not supported for writing stores (tested with "
                         f"zarr {low[0]}.{low[1]} to {high[0]}.{high[1] - 1}); install "
                         f"'zarr>={low[0]}.{low[1]},<{high[0]}.{high[1]}'")


def grown_writer(array: zarr.Array, shape: tuple[int, ...]) -> zarr.Array:
    """A handle on `array` whose metadata says `shape`, to write chunks past its published shape.

    Writes no metadata: the stored shape (what readers see) is unchanged until the caller
    commits. Chunks are always written, even when they equal the fill value.
    """
    check_zarr_version()
    inner = array._async_array
    return zarr.Array(type(inner)(metadata=array.metadata.update_shape(shape),
                                  store_path=inner.store_path,
                                  config={"write_empty_chunks": True}))


def chunks_exist(array: zarr.Array, coords: Iterable[tuple[int, ...]]) -> list[bool]:
    """Whether each chunk is present, asked of the array's own store (local, fsspec, ...)."""
    check_zarr_version()
    from zarr.core.sync import sync

    prefix = f"{array.path}/" if array.path else ""
    keys = [prefix + array.metadata.encode_chunk_key(tuple(c)) for c in coords]

    async def exist() -> list[bool]:
        return list(await asyncio.gather(*(array.store.exists(k) for k in keys)))

    return sync(exist())


@contextlib.contextmanager
def writer_lock(lock_file: Path, store: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (created if absent) until the block exits."""
    import fcntl

    if os.environ.get(NO_LOCK_ENV) == "1":
        yield
        return
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            raise StoreError(
                f"{store}: cannot lock the store for writing ({os.strerror(e.errno)}): this "
                f"filesystem has no flock; ingest into a store on a local disk and copy it "
                f"here, or set {NO_LOCK_ENV}=1 if only one ingest ever runs at a time") from e
        try:  # the file locked is still the one at that path (an upgrade swaps the folder)
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def fsync_files(files: Iterable[Path], up_to: Path) -> None:
    """fsync each file and every folder from its parent up to `up_to` (their new entries).

    All at once, from a few threads: the filesystem then batches them into one or two
    journal commits instead of one per call (3-5x faster than one after another here).
    """
    paths: dict[Path, None] = {}
    for f in files:
        paths[f] = None
        parent = f.parent
        while parent not in paths:
            paths[parent] = None
            if parent == up_to or up_to not in parent.parents:
                break
            parent = parent.parent
    if len(paths) <= 1:
        for p in paths:
            _fsync(p)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        list(pool.map(_fsync, paths))  # re-raises the first error


def fsync_dir(folder: Path) -> None:
    """fsync a folder: makes the entries created or renamed in it durable."""
    _fsync(folder)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root`, and `root` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
