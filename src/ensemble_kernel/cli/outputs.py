"""Checks on output paths, made before any work so that a refused command writes nothing.

What the commands promise about what they write:

- a file named by `--out` (neighbors, predict, report) is written whole, atomically, once
  everything is computed; a refused or failed command leaves it as it was;
- a folder named by `--out` (sweep and the views) receives the command's own files (fixed
  names, listed in each command's help), written the same way; nothing else in it is
  touched and no folder is ever removed;
- `neighbors` keeps its checkpoint in `OUT.partial/` and removes only a folder it made
  (see `checkpoint`); `demo` replaces `OUT/store` only if it made it (see `demo.output`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

__all__ = ["check_output_file", "check_output_folder"]


def _check_writable_parent(path: Path, option: str) -> None:
    ancestor = next(p for p in (path.parent, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise InputError(f"{option} {path}: {ancestor} is a file, so no folder can be made "
                         "there; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {ancestor} is not writable; choose another path")


def check_output_file(path: Path, option: str = "--out") -> None:
    """Raise InputError unless `path` can be written as a file (an existing file is fine:
    it is replaced once the result is complete)."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; name a file (it is left alone)")
    _check_writable_parent(path, option)


def check_output_folder(path: Path, option: str = "--out") -> None:
    """Raise InputError unless `path` is a folder, or can be made one."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; choose another --out "
                         "(the file is left alone)")
    if not path.exists():
        _check_writable_parent(path, option)
    elif not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path} is not writable; choose another folder")
