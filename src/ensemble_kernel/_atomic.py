"""One way to write a file: to a temporary file beside it, then rename. Never half a file."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *,
                 durable: bool = False) -> None:
    """Call `write(f)` on a temporary file in `path`'s folder, then rename it to `path`.

    durable: fsync the file before the rename and the folder after it, so that after a
    power loss `path` holds either its old content or the whole new one.

    An OSError on the way (a full disk, a folder that takes no file) names `path`, not
    the temporary file; the temporary file is removed and `path` left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise _naming(e, path) from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _naming(e, path) from e
        raise
    if durable:
        fsync_path(path.parent)  # the rename itself


def _naming(e: OSError, path: Path) -> OSError:
    """`e` as an error about `path`, the file the user asked for (the temporary file, or
    no file at all, as a full disk's error names, means nothing to them); same errno, so
    the same OSError subclass."""
    reason = e.strerror or str(e)
    fix = ("; free some space, or write it elsewhere"
           if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return OSError(e.errno, f"cannot be written ({reason}); it is left as it was{fix}",
                   str(path))


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), durable=durable)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: the entries created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
