"""Checks on output paths, made before any work so that a refused command writes nothing.

What the commands promise about what they write:

- a file named by `--out` (neighbors, predict, report) is written whole, atomically, once
  everything is computed; a refused or failed command leaves it as it was;
- a folder named by `--out` (sweep and the views) receives the command's own files (fixed
  names, listed in each command's help), written the same way; nothing else in it is
  touched and no folder is ever removed;
- no output is one of the command's inputs (`check_outputs_apart`): not SRC, --labels,
  --inputs, --features, nor a file inside a SRC store; neighbors' OUT.partial/ holds no
  input either;
- `neighbors` keeps its checkpoint in `OUT.partial/` and removes only a folder it made
  (see `checkpoint`); `demo` replaces `OUT/store` only if it made it (see `demo.output`).
"""

from __future__ import annotations

import fnmatch
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..errors import InputError

__all__ = ["check_output_file", "check_output_folder", "check_outputs_apart", "inputs_of"]

# What the folder outputs (the views, sweep, report's OUT_files/) write into their folder.
FOLDER_FILES = ("*.png", "*.csv", "*.json")


def _probe(folder: Path) -> Optional[OSError]:
    """Whether a file can be created in `folder`: make one and remove it (as root every
    permission check passes; an immutable folder, a read-only file system do not)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ensemble-kernel-probe-")
    except OSError as e:
        return e
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:  # (made but not removable: still, nothing will stop the write)
        pass
    return None


def _check_writable_parent(path: Path, option: str) -> None:
    ancestor = next(p for p in (path.parent, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise InputError(f"{option} {path}: {ancestor} is a file, so no folder can be made "
                         "there; choose another path")
    failed = _probe(ancestor)
    if failed is not None:
        why = failed.strerror or failed
        raise InputError(f"{option} {path}: {ancestor} is not writable ({why}); choose "
                         "another path")


_FS_IOC_GETFLAGS = 0x80086601  # Linux: the inode flags that lsattr shows
_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20


def _locked_flags(path: Path) -> Optional[str]:
    """'immutable' or 'append-only' when `path` carries that inode flag (chattr +i / +a:
    no rename may replace it, not even root's); None otherwise, or where unknown."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (ImportError, OSError):
        return None
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 8)[:4])[0]
    except OSError:  # a file system without these flags
        return None
    finally:
        os.close(fd)
    if flags & _FS_IMMUTABLE_FL:
        return "immutable"
    if flags & _FS_APPEND_FL:
        return "append-only"
    return None


def check_output_file(path: Path, option: str = "--out") -> None:
    """Raise InputError unless `path` can be written as a file (an existing file is fine:
    it is replaced once the result is complete): its folder takes a new file, and an
    existing `path` is a regular file that a rename can replace."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; name a file (it is left alone)")
    if path.exists() and not path.is_file():
        raise InputError(f"{option} {path} is not a regular file (a device, pipe or socket); "
                         "name a file")
    if path.is_file():
        flag = _locked_flags(path)
        if flag is not None:
            raise InputError(f"{option} {path} is {flag} (chattr), so it cannot be replaced; "
                             "choose another path, or clear the flag with chattr")
    _check_writable_parent(path, option)


def check_output_folder(path: Path, option: str = "--out") -> None:
    """Raise InputError unless `path` is a folder, or can be made one."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; choose another --out "
                         "(the file is left alone)")
    if not path.exists():
        _check_writable_parent(path, option)
        return
    failed = _probe(path)
    if failed is not None:
        raise InputError(f"{option} {path} is not writable ({failed.strerror or failed}); "
                         "choose another folder")


# ---- no output is an input ------------------------------------------------------------

Named = Sequence[tuple[str, Union[Path, str, None]]]


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError):  # a symlink loop: as written
        return Path(os.path.abspath(path))


def _same(a: Path, b: Path) -> bool:
    """`a` and `b` are one file: the same path once resolved, or hard links of one inode."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist)
        return False


def _within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or below it (both resolved)."""
    path, folder = _resolved(path), _resolved(folder)
    return path == folder or folder in path.parents


def _is_store(path: Path) -> bool:
    from ..storage._store import is_store

    try:
        return is_store(path)
    except Exception:  # (a damaged store is refused where it is opened)
        return False


def inputs_of(src: Iterable[Path], **options: Optional[Path]) -> list:
    """The (option, path) inputs of a command: each SRC, then `--NAME` for each option
    (labels=... names --labels)."""
    return [("SRC", p) for p in src] + [(f"--{name.replace('_', '-')}", p)
                                        for name, p in options.items()]


def check_outputs_apart(outputs: Iterable[tuple[str, Optional[Path]]], inputs: Named, *,
                        folders: Iterable[tuple[str, Optional[Path]]] = (),
                        checkpoint: Optional[Path] = None) -> None:
    """Raise InputError when an output would replace, or be read as, an input.

    outputs : (option, file) for each file the command writes (None: not asked for).
    inputs : (option, path) for each input: SRC's run files, directories and stores,
        --labels, --inputs, --features, ... (None: not given; URLs are skipped).
    folders : (option, folder) for each folder the command writes its own files into
        (`FOLDER_FILES`).
    checkpoint : neighbors' OUT.partial/ folder: it must hold no input.

    An output file is refused when it is an input (the same path, resolved, or a hard
    link of it), lies inside a SRC store, or is a .pt file inside a SRC directory (it
    would be read as a run next time); an output folder when it is or lies inside a SRC
    store, or holds an input under a name the command writes.
    """
    given = [(option, Path(p)) for option, p in inputs
             if p is not None and "://" not in str(p)]
    stores = [(option, p) for option, p in given if p.is_dir() and _is_store(p)]
    folders_searched = [(option, p) for option, p in given
                        if p.is_dir() and (option, p) not in stores]
    files = [(option, p) for option, p in given if not p.is_dir()]

    def refuse(option: str, path: Path, why: str, fix: str = "choose another output path"):
        raise InputError(f"{option} {path} {why}; {fix}")

    for option, out in outputs:
        if out is None:
            continue
        for where, f in files:
            if _same(out, f):
                refuse(option, out, f"is also an input ({where})")
        for where, store in stores:
            if _within(out, store):
                refuse(option, out, f"is inside the store {store} ({where}), which it would "
                       "corrupt")
        for where, folder in folders_searched:
            if out.suffix.lower() == ".pt" and _within(out, folder):
                refuse(option, out, f"is inside {folder} ({where}), whose .pt files are read "
                       "as runs")
    for option, folder in folders:
        if folder is None:
            continue
        for where, store in stores:
            if _within(folder, store):
                refuse(option, folder, f"is inside the store {store} ({where}), which it "
                       "would corrupt", "choose another folder")
        for where, f in files:
            if _resolved(f).parent == _resolved(folder) and any(
                    fnmatch.fnmatch(f.name.lower(), pattern) for pattern in FOLDER_FILES):
                refuse(option, folder, f"would replace {f.name}, an input ({where})",
                       "choose another folder")
    if checkpoint is not None:
        for where, p in given:
            if _within(p, checkpoint):
                raise InputError(f"--out: its checkpoint folder {checkpoint} holds {p}, an "
                                 f"input ({where}); choose another --out, or move the input")
