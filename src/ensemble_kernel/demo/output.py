"""The demo's output folder: what it may replace, and how it swaps in a new store.

The demo writes a marker file, `OUT/.ensemble-kernel-demo.json`, into every folder it
writes to. The marker holds the records of the store the demo wrote (`OUT/store`). A
later demo replaces `OUT/store` only when the marker is there and the store's records are
still exactly those: the demo's own store, unchanged. Anything else (a folder of the
user's files, a store made by ingest, the demo's store with runs added since) is refused
before any work starts, unless `force`.

The new store is built under a temporary name inside OUT and renamed into place once
whole, so a killed demo leaves either the old store or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .._atomic import atomic_write_text
from ..errors import InputError
from ..storage._store import RunStore, is_store

__all__ = ["MARKER", "check_output_folder", "claim_output_folder", "publish_store"]

MARKER = ".ensemble-kernel-demo.json"
_MADE_BY = "ensemble-kernel demo"


def _read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("made_by") == _MADE_BY else None


def _store_records(path: Path) -> list[dict] | None:
    if path.is_symlink() or not is_store(path):
        return None
    try:
        return RunStore(path).records()
    except (InputError, OSError, ValueError, KeyError):
        return None


def _is_own_store(store: Path, marker: dict | None) -> bool:
    """Whether `store` is the store this demo folder's marker says the demo wrote."""
    if marker is None or marker.get("store_records") is None:
        return False
    records = _store_records(store)
    return records is not None and json.loads(json.dumps(records)) == marker["store_records"]


def check_output_folder(out: Path, *, force: bool) -> None:
    """Raise InputError unless the demo may write into `out` (nothing is changed).

    Allowed: a folder that does not exist or is empty; a folder the demo wrote before
    (marker present) whose `store` is missing or is still the demo's own; anything else
    only with `force`, which then replaces `out/store`. A file at `out` is always refused.
    """
    if out.is_symlink() and not out.exists():
        raise InputError(f"--out {out} is a broken symbolic link; choose another --out")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another --out")
    ancestor = next(p for p in (out, *out.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot create or write {ancestor}; choose another --out")
    if force or not out.exists() or not any(out.iterdir()):
        return
    marker = _read_marker(out)
    if marker is None:
        raise InputError(f"--out {out} holds files the demo did not write (no {MARKER} in "
                         "it); choose another --out, or pass --force to write into it "
                         "(replacing its store/)")
    store = out / "store"
    if (store.exists() or store.is_symlink()) and not _is_own_store(store, marker):
        raise InputError(f"{store} was not made by the demo, or runs were added to it "
                         "since; choose another --out, or pass --force to replace it")


def claim_output_folder(out: Path) -> dict:
    """Create `out` if needed and mark it as the demo's; return the marker."""
    out.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out) or {"made_by": _MADE_BY, "store_records": None}
    _write_marker(out, marker)
    return marker


def _write_marker(out: Path, marker: dict) -> None:
    atomic_write_text(out / MARKER, json.dumps(marker, indent=2))


def new_store_path(out: Path, marker: dict) -> Path:
    """A fresh, empty folder inside `out` to build the new store in (recorded in the
    marker so that a later demo can clear it if this one is killed)."""
    _remove_leftovers(out, marker)
    building = Path(tempfile.mkdtemp(dir=out, prefix=".store-building-"))
    marker["leftovers"] = [building.name]
    _write_marker(out, marker)
    return building


def _remove_leftovers(out: Path, marker: dict) -> None:
    """Temporary folders an earlier, killed demo made in `out` (named in its marker)."""
    for name in marker.get("leftovers") or []:
        path = out / name
        if name.startswith(".store-") and "/" not in name and path.is_dir() \
                and not path.is_symlink():
            shutil.rmtree(path)
    marker["leftovers"] = []


def publish_store(out: Path, built: Path, marker: dict) -> Path:
    """Move the whole new store `built` to `out/store`, replacing the old one (which
    `check_output_folder` allowed), and record its runs in the marker."""
    store = out / "store"
    old = None
    if store.is_symlink() or store.is_file():
        store.unlink()
    elif store.exists():
        old = out / f".store-old-{os.getpid()}"
        marker["leftovers"] = [built.name, old.name]
        _write_marker(out, marker)
        os.replace(store, old)
    os.replace(built, store)
    marker["store_records"] = json.loads(json.dumps(RunStore(store).records()))
    marker["leftovers"] = [old.name] if old is not None else []
    _write_marker(out, marker)
    if old is not None:
        shutil.rmtree(old)
        marker["leftovers"] = []
        _write_marker(out, marker)
    return store
