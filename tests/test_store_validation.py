"""Validate everything before writing anything; publish optional arrays whole; fsync; O(1).

Every case compares everything a reader sees before and after a refused command, not
one file.
"""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from ensemble_kernel.cli import app
from ensemble_kernel.errors import StoreError
from ensemble_kernel.storage._store import RunStore, is_store

from conftest import make_ensemble, save_labels, save_pt
from test_store_faults import view

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code, err, match):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


@pytest.fixture
def made(tmp_path):
    ens = make_ensemble(n_models=4)
    save_pt(tmp_path / "good.pt", ens.train[:2], ens.test[:2])
    assert run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "-q")[0] == 0
    return tmp_path, ens


def test_nan_file_with_labels_writes_no_labels(made):
    tmp_path, ens = made
    bad = ens.train[2:4].clone()
    bad[1, 7, 2] = float("nan")
    wrong = (ens.labels_train + 1) % 5
    save_pt(tmp_path / "nan.pt", bad, ens.test[2:4], labels_train=wrong)
    before = view(tmp_path / "st")
    one_line_error(*run("ingest", tmp_path / "nan.pt", "--store", tmp_path / "st")[::2],
                   r"nan.pt: train logits of run 1, example 7, class 2 are not finite")
    assert view(tmp_path / "st") == before
    # The right labels are then accepted: nothing of the refused file was kept.
    save_pt(tmp_path / "fixed.pt", ens.train[2:4], ens.test[2:4], labels_train=ens.labels_train)
    assert run("ingest", tmp_path / "fixed.pt", "--store", tmp_path / "st", "-q")[0] == 0
    assert torch.equal(RunStore(tmp_path / "st").labels("train"), ens.labels_train)


def test_logit_beyond_float16_is_refused_and_float32_takes_it(made):
    tmp_path, ens = made
    big = ens.train[2:4].clone()
    big[1, 3, 4] = 1e5
    save_pt(tmp_path / "big.pt", big, ens.test[2:4])
    before = view(tmp_path / "st")
    code, _, err = run("ingest", tmp_path / "big.pt", "--store", tmp_path / "st")
    one_line_error(code, err, r"big.pt: train logits of run 1, example 3, class 4 are 100000, "
                              r"beyond the largest float16 \(65504\).*--dtype float32")
    assert view(tmp_path / "st") == before
    # The same file creates a new store (nothing left behind), then float32 takes it.
    code, _, err = run("ingest", tmp_path / "big.pt", "--store", tmp_path / "new16")
    one_line_error(code, err, "--dtype float32")
    assert not (tmp_path / "new16").exists()
    assert run("ingest", tmp_path / "big.pt", "--store", tmp_path / "st32", "--dtype",
               "float32", "-q")[0] == 0
    assert RunStore(tmp_path / "st32").read_logits(slice(1, 2), slice(3, 4))[0, 0, 4] == 1e5


@pytest.mark.parametrize("shape,match", [
    ((120,), r"inputs must be \(n, L\) signals.*got shape \(120,\) \(rank 1\)"),
    ((120, 2, 3, 3, 1), r"got shape \(120, 2, 3, 3, 1\) \(rank 5\)"),
    ((120, 4, 4, 2), r"colour images must have 1 or 3 channels.*with 2; convert"),
    ((120, 4, 4, 4), r"with 4; drop the alpha channel with x\[\.\.\., :3\]"),
])
def test_inputs_of_a_wrong_rank_or_channels_leave_no_store(tmp_path, shape, match):
    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "good.pt", ens.train, ens.test)
    np.savez(tmp_path / "in.npz", inputs_train=np.zeros(shape),
             inputs_test=np.zeros((40, *shape[1:])))
    code, _, err = run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st",
                       "--inputs", tmp_path / "in.npz")
    one_line_error(code, err, r"in.npz 'inputs_train': .*" + match)
    assert not (tmp_path / "st").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".st")]
    # Into an existing store: refused, the store unchanged.
    assert run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "-q")[0] == 0
    before = view(tmp_path / "st")
    one_line_error(*run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st",
                        "--inputs", tmp_path / "in.npz")[::2], match)
    assert view(tmp_path / "st") == before
    # The views read --inputs files with the same checks.
    one_line_error(*run("pairs", tmp_path / "good.pt", "--inputs", tmp_path / "in.npz",
                        "--out", tmp_path / "views", "-q")[::2], match)


def test_a_failed_create_leaves_no_directory(tmp_path):
    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "four.pt", ens.train[..., :4], ens.test[..., :4])
    code, _, err = run("ingest", tmp_path / "four.pt", "--store", tmp_path / "st",
                       "--class-names", "a,b,c")
    one_line_error(code, err, "3 class names given for 4 classes")
    np.savez(tmp_path / "l.npz", labels_train=np.full(120, 9), labels_test=np.zeros(40, int))
    one_line_error(*run("ingest", tmp_path / "four.pt", "--store", tmp_path / "st", "--labels",
                        tmp_path / "l.npz")[::2], r"train labels must lie in 0..3")
    save_pt(tmp_path / "own.pt", ens.train[..., :4], ens.test[..., :4],
            labels_test=np.ones(40, dtype=np.int64))
    np.savez(tmp_path / "l2.npz", labels_train=np.zeros(120, int), labels_test=np.zeros(40, int))
    one_line_error(*run("ingest", tmp_path / "own.pt", "--store", tmp_path / "st", "--labels",
                        tmp_path / "l2.npz")[::2], "own.pt: its test labels differ from those "
                                                   "of --labels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four.pt", "l.npz", "l2.npz", "own.pt"]


def test_creation_options_that_contradict_the_store_are_refused(made):
    tmp_path, ens = made
    before = view(tmp_path / "st")
    one_line_error(*run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st",
                        "--dtype", "float32")[::2], "keeps logits as float16, not float32")
    one_line_error(*run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st",
                        "--class-names", "a,b,c,d,e")[::2],
                   "has class names none, not a,b,c,d,e")
    assert view(tmp_path / "st") == before


def test_an_array_killed_while_filled_is_never_seen(made, monkeypatch):
    """The old store created `labels_train`, then filled it: a kill between left zeros."""
    tmp_path, ens = made
    before = view(tmp_path / "st")

    def killed(self, selection, value):
        raise KeyboardInterrupt  # the process dies mid-fill

    monkeypatch.setattr(zarr.Array, "__setitem__", killed)
    with pytest.raises(KeyboardInterrupt):
        RunStore(tmp_path / "st").set_labels("train", ens.labels_train)
    monkeypatch.undo()
    assert view(tmp_path / "st") == before
    assert RunStore(tmp_path / "st").labels("train") is None
    group = zarr.open_group(tmp_path / "st", mode="r")
    assert "labels_train" not in group  # plain zarr does not see it either
    RunStore(tmp_path / "st").set_labels("train", ens.labels_train)
    assert torch.equal(RunStore(tmp_path / "st").labels("train"), ens.labels_train)


def test_chunks_and_metadata_are_fsynced_before_the_commit_and_the_folder_after(made, monkeypatch):
    tmp_path, ens = made
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_pt(tmp_path / "more.pt", ens.train[2:4], ens.test[2:4], code="x = 1")
    RunStore(tmp_path / "st").append_file(tmp_path / "more.pt")
    st = (tmp_path / "st").resolve()
    commit = events.index(("replace", st / "logits" / "zarr.json"))
    synced = {p for kind, p in events[:commit] if kind == "fsync"}
    chunks = {st / "logits" / "c" / str(m) / "0" / "0" for m in (2, 3)}
    assert chunks <= synced, "chunk files not fsynced before the commit"
    assert {st / "logits" / "c" / "2", st / "logits" / "c"} <= synced  # their new folders
    for group in ("records/000000002", "code", "index"):
        assert any(str(p).startswith(str(st / group)) for p in synced), group
    assert ("fsync", st / "logits") in events[commit + 1:], "folder not fsynced after commit"


def test_ingest_reads_a_constant_number_of_files_per_append(tmp_path, monkeypatch):
    """Item 10: the 40th file costs what the 4th does (no re-reading every record)."""
    ens = make_ensemble(n_models=2, n_train=20, n_test=8)
    # float32: the files' shifted copies of two runs would round past their spread in float16
    RunStore.create(tmp_path / "st", n_train=20, n_test=8, n_classes=5, dtype="float32")
    counts = []
    real_open, real_glob, real_scandir = Path.open, Path.glob, os.scandir
    opened = [0]

    def counting(real):
        def wrapper(*a, **k):
            opened[0] += 1
            return real(*a, **k)
        return wrapper

    for i in range(40):
        path = save_pt(tmp_path / f"f{i}.pt", ens.train + i, ens.test - i)
        store = RunStore(tmp_path / "st")
        opened[0] = 0
        with monkeypatch.context() as m:
            for owner, name, real in ((Path, "open", real_open), (Path, "glob", real_glob),
                                      (os, "scandir", real_scandir)):
                m.setattr(owner, name, counting(real))
            assert store.append_file(path).status == "added"
            assert store.append_file(path).status == "skipped"
        counts.append(opened[0])
    assert counts[3] == counts[39], counts


def test_the_lock_is_exclusive_and_unsupported_locking_is_one_clear_line(made, monkeypatch):
    tmp_path, ens = made
    import fcntl

    NO_LOCK_ENV = "ENSEMBLE_KERNEL_NO_LOCK"

    with open(tmp_path / "st" / "logits" / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            with pytest.raises(BlockingIOError):  # what a second writer would wait on
                with open(tmp_path / "st" / "logits" / ".lock") as other:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Readers never take it.
            assert RunStore(tmp_path / "st").n_models == 2
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)

    def no_flock(fd, op):
        raise OSError(37, os.strerror(37))  # ENOLCK, as on some network filesystems

    monkeypatch.setattr(fcntl, "flock", no_flock)
    save_pt(tmp_path / "more.pt", ens.train[2:4], ens.test[2:4])
    code, _, err = run("ingest", tmp_path / "more.pt", "--store", tmp_path / "st")
    one_line_error(code, err, rf"st: cannot lock the store for writing .* or set {NO_LOCK_ENV}=1")
    monkeypatch.setenv(NO_LOCK_ENV, "1")
    assert run("ingest", tmp_path / "more.pt", "--store", tmp_path / "st", "-q")[0] == 0
    assert RunStore(tmp_path / "st").n_models == 4


# ---- item 11: zarr's private API in one place; reading through zarr only ---------------


def test_zarr_version_check_and_grown_writer(tmp_path):
    from ensemble_kernel.storage._io import check_zarr_version, grown_writer

    check_zarr_version()  # the installed one
    for bad in ("2.18.0", "3.2.0", "4.0.0", "dev"):
        with pytest.raises(StoreError, match=rf"zarr {bad} is not supported .* install"):
            check_zarr_version(bad)
    array = zarr.create_array(tmp_path / "a", shape=(1, 3), chunks=(1, 3), dtype="float32",
                              fill_value=0)
    array[...] = 1
    writer = grown_writer(array, (3, 3))
    writer[1:3] = np.full((2, 3), 2, dtype=np.float32)
    reopened = zarr.open_array(tmp_path / "a", mode="r")
    assert reopened.shape == (1, 3)  # nothing published
    assert (tmp_path / "a" / "c" / "2" / "0").is_file()  # but the chunks are there


def test_a_store_is_read_through_zarr_from_an_fsspec_filesystem(made):
    tmp_path, ens = made
    fsspec = pytest.importorskip("fsspec")
    labels = save_labels(tmp_path / "l.npz", ens)
    assert run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "--labels", labels,
               "-q")[0] == 0
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "st").rglob("*"):
        if f.is_file():
            fs.pipe(f"/remote/{f.relative_to(tmp_path / 'st').as_posix()}", f.read_bytes())
    url = "memory://remote"
    assert is_store(url)
    remote, local = RunStore(url), RunStore(tmp_path / "st")
    assert remote.n_models == 2 and remote.records() == local.records()
    np.testing.assert_array_equal(remote.read_logits(slice(0, 2), slice(0, 160)),
                                  local.read_logits(slice(0, 2), slice(0, 160)))
    assert torch.equal(remote.labels("test"), ens.labels_test)
    fs.rm("/remote/logits/c/1/0/0")
    with pytest.raises(StoreError, match=r"chunk logits/c/1/0/0 \(run 1\) is missing"):
        RunStore(url).read_logits(slice(0, 2), slice(0, 160))
    with pytest.raises(StoreError, match="appending needs a store on a local"):
        RunStore(url).append_file(tmp_path / "good.pt", allow_duplicates=True)
