"""The store's metadata documents, sealed: every `zarr.json` a store of format 3 writes
carries a CRC-32C of its own content, checked whenever it is read.

zarr v3 checksums chunks (the `crc32c` codec) but not metadata. A flipped byte in a
`zarr.json` either breaks the JSON, which any reader notices, or changes a value (a shape,
a split range, a run count, a record's hash), which nothing would. So each document's
attributes hold `SEAL`: the CRC-32C of the document written canonically (keys sorted, no
spaces) without that entry. Whitespace is not covered: changing it changes no value.

Everything here serves `store.py` and `store_verify.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np

from ..errors import StoreError

__all__ = ["SEAL", "seal", "check_seal", "read_doc", "seal_file", "chunk_crc", "run_chunk_crcs",
           "damaged"]

SEAL = "ensemble_kernel_crc32c"  # the attribute that holds a document's checksum


def _canonical(doc: dict) -> bytes:
    attributes = {k: v for k, v in doc.get("attributes", {}).items() if k != SEAL}
    body = {**doc, "attributes": attributes}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def seal(doc: dict) -> dict:
    """`doc` (a zarr.json document) with its checksum in attributes[SEAL]."""
    attributes = {k: v for k, v in doc.get("attributes", {}).items() if k != SEAL}
    out = {**doc, "attributes": attributes}
    out["attributes"][SEAL] = f"{google_crc32c.value(_canonical(out)):08x}"
    return out


def check_seal(doc: dict) -> str | None:
    """None when `doc`'s seal matches its content, else what is wrong."""
    stored = doc.get("attributes", {}).get(SEAL) if isinstance(doc.get("attributes"),
                                                                dict) else None
    if stored is None:
        return "it carries no checksum"
    if stored != f"{google_crc32c.value(_canonical(doc)):08x}":
        return "its checksum does not match its content"
    return None


def damaged(store: object, what: str, why: str) -> StoreError:
    """The one error for damaged metadata: what, why, and what to do."""
    return StoreError(f"{store}: {what} is damaged ({why}); run `ensemble-kernel verify "
                      f"{store}` for a full check, and restore the store from a copy or "
                      "re-ingest its run files into a new store")


def read_doc(path: Path, store: object, *, sealed: bool, missing_ok: bool = False
             ) -> dict | None:
    """The JSON document at `path` (a store's zarr.json), checked.

    StoreError naming the file where it is missing (unless `missing_ok`: then None),
    unreadable, not a JSON object or, when `sealed`, where its seal does not match.
    """
    what = str(Path(path).relative_to(store)) if isinstance(store, Path) else str(path)
    try:
        text = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return None
        raise damaged(store, what, "the file is missing") from None
    except OSError as e:
        raise damaged(store, what, f"it cannot be read: {e.strerror or e}") from e
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(store, what, f"not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("attributes", {}), dict):
        raise damaged(store, what, "not a zarr.json document")
    if sealed and (problem := check_seal(doc)) is not None:
        raise damaged(store, what, problem)
    return doc


def seal_file(path: Path) -> None:
    """Seal the zarr.json at `path` in place (a folder still private to its writer)."""
    doc = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps(seal(doc), indent=2))


def chunk_crc(data: np.ndarray | bytes) -> bytes:
    """The 4 bytes zarr's crc32c codec appends to a chunk: CRC-32C, little-endian."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def run_chunk_crcs(values: np.ndarray, chunk_examples: int) -> list[str]:
    """Per run of `values` (runs, examples, classes; the store's dtype, little-endian),
    the CRC-32C of each of its chunks as stored (the last one padded with zeros), as one
    string of 8 hex digits a chunk. A record keeps them, so a chunk moved or swapped with
    another (each with a valid checksum of its own) is told apart from its own data."""
    n_runs, n, n_classes = values.shape
    padded = -(-n // chunk_examples) * chunk_examples
    out = []
    for r in range(n_runs):
        run = values[r]
        if padded != n:
            run = np.concatenate([run, np.zeros((padded - n, n_classes), values.dtype)])
        data = np.ascontiguousarray(run).view(np.uint8).reshape(padded // chunk_examples, -1)
        out.append("".join(chunk_crc(row)[::-1].hex() for row in data))
    return out
