"""The store's plain-file read (`RunStore._read_plain`) against its twin through zarr."""

import json
import shutil

import numpy as np
import pytest
import torch

import ensemble_kernel.storage._layout as layout_module
from ensemble_kernel.errors import StoreError
from ensemble_kernel.storage._store import RunStore
from ensemble_kernel.storage._meta import seal


def _store(tmp_path, monkeypatch, dtype, chunk=7, n_models=5, n_train=23, n_test=12):
    monkeypatch.setattr(layout_module, "_EXAMPLE_CHUNK", chunk)  # 35 examples: 5 chunks
    g = torch.Generator().manual_seed(1)
    train = torch.randn(n_models, n_train, 3, generator=g) * 100
    test = torch.randn(n_models, n_test, 3, generator=g) * 100
    train[1, 4] = torch.tensor([65504.0, -0.0, 6e-8])  # float16's largest, -0, subnormal
    store = RunStore.create(tmp_path / "st", n_train=n_train, n_test=n_test, n_classes=3,
                            dtype=dtype)
    store.append_arrays(train[:2], test[:2], source="a")
    store.append_arrays(train[2:], test[2:], source="b")
    return RunStore(tmp_path / "st")


def _slices(n):
    out = [(0, n), (0, 1), (n - 1, n), (6, 8), (7, 14), (5, 29), (3, 3), (13, 14), (0, 7)]
    return [(a, b) for a, b in out if 0 <= a <= b <= n]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_plain_reads_equal_zarr_reads_bit_for_bit(tmp_path, monkeypatch, dtype):
    store = _store(tmp_path, monkeypatch, dtype)
    assert store._plain is not None and store._plain[1] == 7
    for models in [slice(0, 5), slice(1, 2), slice(2, 4), slice(4, 5)]:
        for a, b in _slices(35):
            plain = store.read_logits(models, slice(a, b))
            twin = store._read_zarr(models, slice(a, b)) if b > a else plain
            assert plain.dtype == np.dtype(dtype) and plain.shape == (
                models.stop - models.start, b - a, 3)
            assert plain.tobytes() == np.asarray(twin).tobytes(), (models, a, b)
    # Through the sources, as the engine reads them.
    for split, n in [("train", 23), ("test", 12)]:
        source = store.source(split)
        got = source.read(slice(0, 5), slice(0, n))
        want = torch.from_numpy(np.asarray(store._read_zarr(
            slice(0, 5), slice(*store.split_range(split)))))
        assert torch.equal(got, want)


def test_one_chunk_per_run_is_read_plainly_too(tmp_path, monkeypatch):
    store = _store(tmp_path, monkeypatch, "float16", chunk=16384)
    assert store._plain[1] == 35  # the chunk is the whole example axis
    assert store.read_logits(slice(0, 5), slice(3, 30)).tobytes() == \
        store._read_zarr(slice(0, 5), slice(3, 30)).tobytes()


@pytest.mark.parametrize("damage, message", [
    ("delete", "chunk logits/c/3/2/0 \\(run 3\\) is missing; the store is damaged: "
               "repair it with"),
    ("truncate", "chunk logits/c/3/2/0 \\(run 3\\) could not be read \\(20 bytes, not 46\\); "
                 "the store is damaged: repair it with"),
    ("extend", "chunk logits/c/3/2/0 \\(run 3\\) could not be read \\(47 bytes, not 46\\)"),
    ("empty", "chunk logits/c/3/2/0 \\(run 3\\) could not be read \\(0 bytes, not 46\\)"),
])
def test_a_damaged_chunk_is_named_and_nothing_is_returned(tmp_path, monkeypatch, damage, message):
    store = _store(tmp_path, monkeypatch, "float16")
    chunk = tmp_path / "st" / "logits" / "c" / "3" / "2" / "0"
    data = chunk.read_bytes()
    assert len(data) == 7 * 3 * 2 + 4  # and its CRC-32C
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes({"truncate": data[:20], "extend": data + b"\0",
                           "empty": b""}[damage])
    with pytest.raises(StoreError, match=message):
        store.read_logits(slice(0, 5), slice(0, 35))
    with pytest.raises(StoreError, match=message):
        store.read_logits(slice(3, 4), slice(15, 16))  # one example of that chunk
    with pytest.raises(StoreError, match="chunk logits/c/3/2/0 \\(run 3\\) (is missing|could "
                                          "not be read).*repair it with"):
        store._read_zarr(slice(0, 5), slice(0, 35))  # the twin refuses it too
    # Reads that do not touch it still work.
    assert store.read_logits(slice(0, 3), slice(0, 35)).shape == (3, 35, 3)
    assert store.read_logits(slice(3, 4), slice(0, 14)).shape == (1, 14, 3)


@pytest.mark.parametrize("edit", [
    {"codecs": [{"name": "bytes", "configuration": {"endian": "big"}}, {"name": "crc32c"}]},
    {"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}},
])
def test_any_other_layout_is_read_by_zarr(tmp_path, monkeypatch, edit):
    _store(tmp_path, monkeypatch, "float32")
    meta_path = tmp_path / "st" / "logits" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if "chunk_key_encoding" in edit:  # move c/M/C/0 to M.C.0, as that encoding names them
        root = tmp_path / "st" / "logits"
        for f in list((root / "c").rglob("0")):
            if f.is_file():
                m, c = f.parent.parent.name, f.parent.name
                shutil.copy(f, root / f"{m}.{c}.0")
        shutil.rmtree(root / "c")
    meta.update(edit)
    meta_path.write_text(json.dumps(seal(meta)))
    reopened = RunStore(tmp_path / "st")
    assert reopened._plain is None
    assert reopened.read_logits(slice(0, 5), slice(0, 35)).tobytes() == \
        reopened._read_zarr(slice(0, 5), slice(0, 35)).tobytes()


@pytest.mark.parametrize("damage, message", [
    ("directory", "could not be read \\(not a file\\)"),
    ("fifo", "could not be read \\(not a file\\)"),
    ("loop", "could not be read \\(Too many levels of symbolic links\\)"),
])
def test_a_chunk_that_is_not_a_file_is_named_not_waited_on(tmp_path, monkeypatch, damage,
                                                            message):
    import os

    store = _store(tmp_path, monkeypatch, "float16")
    chunk = tmp_path / "st" / "logits" / "c" / "1" / "0" / "0"
    chunk.unlink()
    if damage == "directory":
        chunk.mkdir()
    elif damage == "fifo":
        os.mkfifo(chunk)  # opened non-blocking: refused at once, not waited on
    else:
        chunk.symlink_to(chunk)
    with pytest.raises(StoreError, match="chunk logits/c/1/0/0 \\(run 1\\) " + message +
                       "; the store is damaged: repair it with"):
        store.read_logits(slice(0, 3), slice(0, 10))


@pytest.mark.parametrize("models, examples", [
    (slice(3, 1), slice(0, 35)), (slice(0, 2), slice(30, 40)), (slice(4, 99), slice(34, 35)),
    (slice(-2, None), slice(-8, -1)), (slice(None), slice(None)), (slice(0, 5), slice(20, 10)),
    (slice(0, 2), slice(35, 36)), (slice(5, 6), slice(0, 3)),
])
def test_any_slice_reads_as_python_slices_the_whole(tmp_path, monkeypatch, models, examples):
    store = _store(tmp_path, monkeypatch, "float32")
    whole = np.asarray(store._read_zarr(slice(0, 5), slice(0, 35)))
    got = store.read_logits(models, examples)
    assert got.shape == whole[models, examples].shape and got.dtype == whole.dtype
    assert got.tobytes() == whole[models, examples].tobytes()


@pytest.mark.parametrize("models, examples", [(slice(0, 5, 2), slice(0, 35)),
                                              (slice(0, 5), slice(1, 30, 3))])
def test_a_stepped_read_is_refused(tmp_path, monkeypatch, models, examples):
    from ensemble_kernel.errors import InputError

    store = _store(tmp_path, monkeypatch, "float16")
    with pytest.raises(InputError, match="reads contiguous ranges of runs and examples"):
        store.read_logits(models, examples)
