"""Reading a store's logits chunk by chunk, each checked: present, whole, its own CRC-32C
and the one its run's record keeps (docs/store.md). A part of `RunStore`.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np

from ..errors import InputError, StoreError
from ._io import chunks_exist
from ._meta import chunk_crc

__all__ = ["LogitChunks"]

# What zarr raises for a chunk it cannot decode: a checksum mismatch (ValueError), a
# truncated zstd frame (RuntimeError), a chunk of the wrong size, a read error.
_DECODE_ERRORS = (ValueError, RuntimeError, TypeError, OSError, EOFError)


class LogitChunks:
    """`RunStore`'s reads of its logits. Expects of the store: `path`, `_logits` (the zarr
    array), `_plain` (`_plain_layout()` or None), `_verified` and `_expected` (reset when
    it is opened), `records()` and `run_source(model)`."""

    def _chunks_of(self, models: slice, examples: slice) -> list[tuple[int, int, int]]:
        chunk_e = self._logits.chunks[1]
        return [(m, c, 0) for m in range(models.start, models.stop)
                for c in range(examples.start // chunk_e, (examples.stop - 1) // chunk_e + 1)]

    def _plain_layout(self) -> tuple[np.dtype, int, bool] | None:
        """(dtype, examples per chunk, whether each ends with its CRC-32C) when every
        logits chunk is a plain file of raw little-endian values, row-major, and perhaps
        its checksum (what `create` writes); None for any other layout, which zarr reads."""
        raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
        try:
            meta = json.loads((self.path / "logits" / "zarr.json").read_text())
            grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
            plain = (meta["chunk_grid"]["name"] == "regular"
                     and meta["chunk_key_encoding"] == {"name": "default",
                                                        "configuration": {"separator": "/"}}
                     and meta["codecs"] in (raw, raw + [{"name": "crc32c"}])
                     and not meta.get("storage_transformers")
                     and meta["data_type"] in ("float16", "float32")
                     and len(grid) == 3 and grid[0] == 1 and grid[2] == meta["shape"][2])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not plain or not hasattr(os, "preadv"):  # (no preadv on Windows: zarr reads)
            return None
        return (np.dtype(meta["data_type"]).newbyteorder("<"), int(grid[1]),
                len(meta["codecs"]) == 2)

    def read_logits(self, models: slice, examples: slice) -> np.ndarray:
        """Committed logits, checking that every chunk read is present and whole.

        `models` and `examples` are contiguous slices, taken as Python takes them (negative
        or open ends, ends past the array, empty); a step is refused."""
        (m0, m1, m_step), (e0, e1, e_step) = (models.indices(self._logits.shape[0]),
                                              examples.indices(self._logits.shape[1]))
        if m_step != 1 or e_step != 1:
            raise InputError(f"{self.path}: the store reads contiguous ranges of runs and "
                             f"examples, got steps {m_step} and {e_step}")
        models, examples = slice(m0, max(m0, m1)), slice(e0, max(e0, e1))
        if models.stop == models.start or examples.stop == examples.start:
            return np.empty((models.stop - models.start, examples.stop - examples.start,
                             self._logits.shape[2]), np.dtype(self._logits.dtype))
        if self._plain is not None:
            return self._read_plain(models, examples, *self._plain)
        return self._read_zarr(models, examples)

    def _read_plain(self, models: slice, examples: slice, dtype: np.dtype,
                    chunk_e: int, crc: bool) -> np.ndarray:
        """`read_logits` by reading the bytes wanted from each chunk's file straight into
        the result: a store's usual layout, 7-14x faster than through zarr here (its twin,
        `_read_zarr`, reads the same values; tests/test_store_read.py). `models` and
        `examples` are plain ranges within the array.

        With `crc` (format 3), a chunk's checksum is checked the first time this store
        object reads it, and again whenever its file changes (inode, size, mtime): that
        read takes the whole chunk; later reads take only the bytes wanted."""
        n_c = self._logits.shape[2]
        out = np.empty((models.stop - models.start, max(examples.stop - examples.start, 0), n_c),
                       dtype)
        if out.size == 0:
            return out
        row, whole = n_c * dtype.itemsize, chunk_e * n_c * dtype.itemsize
        for m, c, z in self._chunks_of(models, examples):
            lo, hi = max(examples.start, c * chunk_e), min(examples.stop, (c + 1) * chunk_e)
            key = self._logits.metadata.encode_chunk_key((m, c, z))
            view = memoryview(out[m - models.start, lo - examples.start:hi - examples.start]
                              ).cast("B")
            try:
                # Non-blocking: a FIFO put in a chunk's place is refused below, not waited on.
                fd = os.open(self.path / "logits" / key, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                raise self._bad_chunk(key, m, "missing") from None
            except OSError as e:  # a directory, a symlink loop, no permission, ...
                raise self._bad_chunk(key, m, f"could not be read ({e.strerror or e})") from e
            try:
                info = os.fstat(fd)
                size = whole + 4 * crc
                identity = (info.st_ino, info.st_size, info.st_mtime_ns)
                problem = ("not a file" if not stat.S_ISREG(info.st_mode) else
                           f"{info.st_size} bytes, not {size}" if info.st_size != size else None)
                if problem is None and crc and self._verified.get((m, c)) != identity:
                    problem = self._read_checked(fd, size, view, (lo - c * chunk_e) * row,
                                                 self._expected_crc(m, c))
                    if problem is None:
                        self._verified[(m, c)] = identity
                elif problem is None:
                    try:
                        if os.preadv(fd, [view], (lo - c * chunk_e) * row) != len(view):
                            problem = "shorter than its size"
                    except OSError as e:
                        problem = e.strerror or str(e)
                if problem is not None:
                    raise self._bad_chunk(key, m, f"could not be read ({problem})")
            finally:
                os.close(fd)
        return out

    def _expected_crc(self, model: int, chunk: int) -> bytes | None:
        """The CRC-32C run `model`'s record keeps for its chunk `chunk`, or None (no record
        keeps one, or the records cannot be read: that is reported where they are)."""
        if self._expected is None:
            self._expected = {}
            try:
                records = self.records()
            except StoreError:
                records = []
            for record in records:
                kept = record.get("chunk_crc32c")
                if isinstance(kept, list) and len(kept) == record["runs"][1] - record["runs"][0]:
                    for m, text in zip(range(*record["runs"]), kept):
                        self._expected[m] = text
        text = self._expected.get(model)
        if not isinstance(text, str) or len(text) < 8 * (chunk + 1):
            return None
        try:
            return bytes.fromhex(text[8 * chunk:8 * chunk + 8])[::-1]
        except ValueError:
            return None

    @staticmethod
    def _read_checked(fd: int, size: int, view: memoryview, offset: int,
                      expected: bytes | None = None) -> str | None:
        """Read a whole chunk file of `size` bytes, check its CRC-32C (and that it is the
        `expected` one, where its record keeps it) and copy the bytes at `offset` into
        `view`; what is wrong, or None."""
        if offset == 0 and len(view) == size - 4:  # the whole chunk: read it in place
            stored = bytearray(4)
            try:
                got = os.preadv(fd, [view, stored], 0)
            except OSError as e:
                return e.strerror or str(e)
            data = np.frombuffer(view, np.uint8)
        else:
            buffer = bytearray(size)
            try:
                got = os.preadv(fd, [buffer], 0)
            except OSError as e:
                return e.strerror or str(e)
            data, stored = np.frombuffer(buffer, np.uint8)[:-4], buffer[-4:]
            view[:] = buffer[offset:offset + len(view)]
        if got != size:
            return "shorter than its size"
        if chunk_crc(data) != bytes(stored):
            return "its checksum does not match its content"
        if expected is not None and bytes(stored) != expected:
            return "it holds other values than its record says: moved or swapped with another"
        return None

    def _bad_chunk(self, key: str, model: int, problem: str) -> StoreError:
        """The error for a missing or damaged logits chunk: which, whose, and the fix."""
        problem = problem if problem.startswith("could") else f"is {problem}"
        return StoreError(f"{self.path}: chunk logits/{key} (run {model}) {problem}; the "
                          f"store is damaged: {self._repair_hint(model)}")

    def _repair_hint(self, model: int | None = None) -> str:
        """How to mend damage to run `model` (or to anything): the command that does it."""
        source = None
        if model is not None:
            try:
                source = next((r["source"] for r in self.records()
                               if r["runs"][0] <= model < r["runs"][1]), None)
            except StoreError:
                source = None
        file = source if source and "://" not in source else "FILE"
        return (f"repair it with `ensemble-kernel ingest {file} --store {self.path} --repair` "
                "(the run file whose SHA-256 its record keeps); `ensemble-kernel verify "
                f"{self.path}` checks the whole store")

    def _read_zarr(self, models: slice, examples: slice) -> np.ndarray:
        """`read_logits` through zarr: any layout, any filesystem."""
        coords = self._chunks_of(models, examples)
        for (m, c, z), present in zip(coords, chunks_exist(self._logits, coords)):
            if not present:
                raise self._bad_chunk(self._logits.metadata.encode_chunk_key((m, c, z)), m,
                                      "missing")
        try:
            return self._logits[models, examples]
        except _DECODE_ERRORS as e:
            chunk_e = self._logits.chunks[1]
            for m, c, z in coords:  # name the first chunk that does not decode
                try:
                    self._logits[m, c * chunk_e:min((c + 1) * chunk_e, self._logits.shape[1])]
                except _DECODE_ERRORS as bad:
                    raise self._bad_chunk(self._logits.metadata.encode_chunk_key((m, c, z)),
                                          m, f"could not be read ({bad})") from e
            raise StoreError(f"{self.path}: runs {models.start}..{models.stop - 1} could not "
                             f"be read ({e}); {self._repair_hint()}") from e

