"""How a store is laid out on disk: its format version, its arrays' codecs, building a new
one, the names of the folders a create builds in, and the keys records are found by.

Serves `_store` and `_verify` (docs/store.md).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from ._checks import StoreSpec, array_dims
from ._io import fsync_tree
from ._meta import seal_file

__all__ = ["FORMAT_VERSION", "MARK", "OPTIONAL_CODECS", "content_key", "is_record",
           "sweep_stale_creations", "build", "creating_prefix", "host", "array_chunk_crcs",
           "sha256_arrays", "sha256_text"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
MARK = "ensemble_kernel"  # the root attribute that makes a zarr group a store
# Optional arrays (labels, inputs, features): compressed, then checksummed.
OPTIONAL_CODECS = (ZstdCodec(level=0), Crc32cCodec())
_EXAMPLE_CHUNK = 16384  # examples per chunk: 16384 x 10 classes x 2 bytes = 320 KiB


def array_chunk_crcs(folder: Path) -> dict[str, str]:
    """The CRC-32C each chunk file of the array at `folder` ends with, by chunk key."""
    out = {}
    for chunk in sorted((folder / "c").rglob("*")) if (folder / "c").is_dir() else ():
        if chunk.is_file():
            out[str(chunk.relative_to(folder))] = chunk.read_bytes()[-4:].hex()
    return out


def content_key(record: dict) -> str:
    """What de-duplicates a source: its file's SHA-256, and the key its test split was read
    from where that was not the default (the same file read another way is other data)."""
    key = record.get("test_key")
    return record["sha256"] if key in (None, "logits") else sha256_text(
        f"{record['sha256']}\ntest_key={key}")


def is_record(record: object) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("sha256"), str)
            and isinstance(record.get("source"), str) and isinstance(record.get("runs"), list)
            and len(record["runs"]) == 2 and all(type(r) is int for r in record["runs"])
            and 0 <= record["runs"][0] < record["runs"][1])


def host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def creating_prefix(path: Path) -> str:
    """`.NAME.creating-HOST-PID-`: the folder a create builds in names its owner."""
    return f".{path.name}.creating-{host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_creations(path: str | Path) -> list[Path]:
    """Remove the folders `.NAME.creating-HOST-PID-*` beside `path` that killed creates
    left: those of this host whose process no longer runs. A live creator's folder (its
    pid alive, or a reused pid) and other hosts' folders are kept. Returns those removed.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.creating-{host()}-") + r"(\d+)-")
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.creating-*"))
    except OSError:
        return removed
    for folder in candidates:
        match = pattern.match(folder.name)
        if match is None or _alive(int(match.group(1))) or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)  # another sweeper may remove it too
        if not folder.exists():
            removed.append(folder)
            logger.info("removed %s, left by a killed create", folder)
    return removed


def build(folder: Path, spec: StoreSpec, arrays: dict[str, np.ndarray]) -> None:
    """A whole new store in `folder` (private to its creator), fsynced."""
    splits = {"train": [0, spec.n_train], "test": [spec.n_train, spec.n_train + spec.n_test]}
    group = zarr.open_group(folder, mode="w")
    n_examples = spec.n_train + spec.n_test
    group.create_array(
        "logits", shape=(0, n_examples, spec.n_classes), dtype=spec.dtype,
        chunks=(1, max(1, min(_EXAMPLE_CHUNK, n_examples)), spec.n_classes),
        dimension_names=("run", "example", "class"), serializer=BytesCodec(endian="little"),
        compressors=(Crc32cCodec(),), fill_value=0,
        attributes={"splits": splits, "format_version": FORMAT_VERSION,
                    "arrays": sorted(arrays)},
    )
    for name, values in arrays.items():
        group.create_array(name, shape=values.shape, dtype=values.dtype,
                           compressors=OPTIONAL_CODECS,
                           dimension_names=array_dims(name, values), fill_value=0)[...] = values
    if arrays:
        group["logits"].attrs["array_crc32c"] = {name: array_chunk_crcs(folder / name)
                                                 for name in sorted(arrays)}
    for sub in ("records", "index", "code"):
        group.create_group(sub)
    (folder / "logits" / ".lock").touch()
    # The root mark comes last: a half-made directory is not a store.
    group.attrs[MARK] = {"format_version": FORMAT_VERSION, "n_classes": spec.n_classes,
                          "class_names": list(spec.class_names) if spec.class_names else None,
                          "splits": splits, "logits_dtype": spec.dtype}
    for meta in folder.rglob("zarr.json"):
        seal_file(meta)
    fsync_tree(folder)


def sha256_arrays(*arrays: torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        h.update(a.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
