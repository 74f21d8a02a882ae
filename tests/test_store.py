"""The store: layout other tools can read, commits, de-duplication, crash safety, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import pytest
import zarr
from ensemble_kernel.storage._meta import SEAL, check_seal
from typer.testing import CliRunner

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.core._engine import _top_k_neighbors
from ensemble_kernel.cli import app
from ensemble_kernel.errors import StoreError
from ensemble_kernel.storage._store import RunStore, is_store

from conftest import assert_same_neighbors, make_ensemble, save_labels, save_pt, seam_env

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def files_of(tmp_path, ens, per_file=2):
    for i in range(0, ens.train.shape[0], per_file):
        save_pt(tmp_path / "runs" / f"f{i:03d}.pt", ens.train[i:i + per_file],
                ens.test[i:i + per_file])
    return tmp_path / "runs"


def test_ingest_then_every_command_reads_the_store(tmp_path):
    ens = make_ensemble(n_models=6)
    runs = files_of(tmp_path, ens)
    labels = save_labels(tmp_path / "labels.npz", ens)
    code, _, _ = run("ingest", runs, "--store", tmp_path / "st", "--labels", labels,
                     "--class-names", "a,b,c,d,e", "-q")
    assert code == 0 and is_store(tmp_path / "st")
    code, from_store, _ = run("evaluate", tmp_path / "st", "--json")
    code2, from_files, _ = run("evaluate", runs, "--labels", labels, "--json")
    assert code == code2 == 0
    a, b = json.loads(from_store), json.loads(from_files)
    for key in ("n_models", "knn_accuracy", "weighted_accuracy", "ensemble_accuracy"):
        assert a[key] == pytest.approx(b[key])  # float16 storage of float32 logits
    code, out, _ = run("info", tmp_path / "st", "--json", "--runs")
    info = json.loads(out)
    assert info["n_models"] == 6 and info["has_labels"] and info["class_names"][0] == "a"
    assert info["shapes"] == {"logits": [6, 160, 5], "labels_test": [40], "labels_train": [120]}
    assert [r["runs"] for r in info["records"]] == [[0, 2], [2, 4], [4, 6]]


def test_plain_zarr_sees_committed_runs_with_named_dimensions(tmp_path):
    ens = make_ensemble(n_models=4)
    runs = files_of(tmp_path, ens)
    assert run("ingest", runs, "--store", tmp_path / "st", "-q")[0] == 0
    group = zarr.open_group(tmp_path / "st", mode="r")
    logits = group["logits"]
    assert logits.shape == (4, 160, 5)
    assert tuple(logits.metadata.dimension_names) == ("run", "example", "class")
    assert logits.attrs["splits"] == {"train": [0, 120], "test": [120, 160]}
    np.testing.assert_array_equal(logits[:, :120], ens.train.half().numpy())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid hierarchy: listing it warns about nothing
        members = dict(group.members(max_depth=None))
    assert {"logits", "records", "records/000000000", "records/000000002", "code"} <= set(members)


def test_training_code_is_stored_once_per_content(tmp_path):
    ens = make_ensemble(n_models=4)
    for i in range(2):
        save_pt(tmp_path / "runs" / f"f{i}.pt", ens.train[2 * i:2 * i + 2],
                ens.test[2 * i:2 * i + 2], code="train(seed)")
    assert run("ingest", tmp_path / "runs", "--store", tmp_path / "st", "-q")[0] == 0
    store = RunStore(tmp_path / "st")
    hashes = {r["code_sha256"] for r in store.records()}
    assert len(hashes) == 1 and store.code(hashes.pop()) == "train(seed)"
    assert len(list((tmp_path / "st" / "code").glob("*/zarr.json"))) == 1


def test_reingest_skips_by_content_and_allow_duplicates_adds(tmp_path):
    ens = make_ensemble(n_models=4)
    runs = files_of(tmp_path, ens)
    run("ingest", runs, "--store", tmp_path / "st", "-q")
    code, _, err = run("ingest", runs, "--store", tmp_path / "st")
    n_skipped = sum(line.startswith("skipped ") for line in err.splitlines())
    assert code == 0 and n_skipped == 2 and RunStore(tmp_path / "st").n_models == 4
    run("ingest", runs / "f000.pt", "--store", tmp_path / "st", "--allow-duplicates", "-q")
    assert RunStore(tmp_path / "st").n_models == 6


def store_bytes(path):
    """Every file of a store, by relative path, with its bytes: all that a reader can see."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file()}


def test_bad_sources_leave_the_store_unchanged(tmp_path):
    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "good.pt", ens.train, ens.test)
    run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "-q")
    before = store_bytes(tmp_path / "st")
    save_pt(tmp_path / "classes.pt", ens.train[..., :4], ens.test[..., :4])
    save_pt(tmp_path / "examples.pt", ens.train[:, :100], ens.test[:, :100])
    cases = [
        (tmp_path / "classes.pt", r"classes.pt: train logits have 4 classes but the store .* has 5"),
        (tmp_path / "examples.pt", r"examples.pt: 100 train examples but the store .* has 120"),
    ]
    for src, match in cases:
        code, _, err = run("ingest", src, "--store", tmp_path / "st")
        assert code == 2 and __import__("re").search(match, err), err
        assert store_bytes(tmp_path / "st") == before
    np.savez(tmp_path / "other.npz", labels_train=(ens.labels_train + 1) % 5,
             labels_test=ens.labels_test)
    run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "--labels",
        save_labels(tmp_path / "l.npz", ens), "--allow-duplicates", "-q")
    before = store_bytes(tmp_path / "st")
    code, _, err = run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "--labels",
                       tmp_path / "other.npz")
    assert code == 2 and "labels_train given differs from the labels_train already in the store" in err
    assert RunStore(tmp_path / "st").n_models == 4
    assert store_bytes(tmp_path / "st") == before


def test_not_a_store_other_version_and_damaged_chunks(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="plain: not an ensemble-kernel store"):
        RunStore(tmp_path / "plain")
    code, _, err = run("info", tmp_path / "plain")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "good.pt", ens.train, ens.test)
    run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "-q")
    meta = json.loads((tmp_path / "st" / "zarr.json").read_text())
    meta["attributes"]["ensemble_kernel"]["format_version"] = 99
    (tmp_path / "st2").mkdir()
    import shutil
    shutil.copytree(tmp_path / "st", tmp_path / "st2", dirs_exist_ok=True)
    (tmp_path / "st2" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="store format version 99, but this ensemble-kernel reads versions 1, 2"):
        RunStore(tmp_path / "st2")
    os.remove(tmp_path / "st" / "logits" / "c" / "1" / "0" / "0")
    code, _, err = run("neighbors", tmp_path / "st", "--out", tmp_path / "n.npz", "-q")
    assert code == 2 and "chunk logits/c/1/0/0 (run 1) is missing" in err
    assert not (tmp_path / "n.npz").exists()


def test_sigkill_mid_ingest_keeps_whole_files_and_reingest_completes(tmp_path):
    ens = make_ensemble(n_models=40, n_train=300, n_test=60)
    runs = files_of(tmp_path, ens, per_file=4)  # 10 files
    store = tmp_path / "st"
    env = seam_env(write_delay=0.05)
    cmd = [sys.executable, "-m", "ensemble_kernel", "ingest", str(runs), "--store", str(store), "-q"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 60
    # Kill once a few files are in: the append then in flight is cut part-way.
    while time.time() < deadline:
        meta = store / "logits" / "zarr.json"
        if meta.exists() and is_store(store):
            # A reader opening the store during the append sees whole committed files only.
            reader = RunStore(store)
            seen = reader.n_models
            assert seen % 4 == 0
            np.testing.assert_array_equal(reader.read_logits(slice(0, seen), slice(0, 300)),
                                          ens.train[:seen].half().numpy())
            if seen >= 12:
                break
        time.sleep(0.01)
    time.sleep(0.07)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = RunStore(store)
    n = committed.n_models
    assert 12 <= n < 40 and n % 4 == 0  # whole files only
    assert [r["runs"] for r in committed.records()] == [[i, i + 4] for i in range(0, n, 4)]
    # A reader of the store sees exactly those runs, and their neighbours.
    found = _top_k_neighbors(committed.source("test"), committed.source("train"), 5,
                            memory_budget=1 << 26)
    def half(x):
        return x[:n].half().float()
    assert_same_neighbors(found.indices, found.values,
                          dense_kernel(half(ens.test), half(ens.train)), 5)
    # Re-running the same command completes the job, skipping what is in.
    done = subprocess.run(cmd[:-1], capture_output=True, text=True)
    assert done.returncode == 0
    assert sum(line.startswith("skipped ") for line in done.stderr.splitlines()) == n // 4
    final = RunStore(store)
    assert final.n_models == 40
    np.testing.assert_array_equal(final.read_logits(slice(0, 40), slice(0, 300)),
                                  ens.train.half().numpy())


def test_neighbors_resumes_after_sigkill_and_writes_the_same_result(tmp_path):
    ens = make_ensemble(n_models=6, n_train=2000, n_test=200)
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    base = [sys.executable, "-m", "ensemble_kernel", "neighbors", str(src), "--k", "5",
            "--memory-budget", "6MiB", "-q"]
    whole = subprocess.run(base + ["--out", str(tmp_path / "whole.npz"), "--no-resume"])
    assert whole.returncode == 0
    out = tmp_path / "resumed.npz"
    env = seam_env(tile_delay=0.3)
    proc = subprocess.Popen(base + ["--out", str(out)], env=env)
    partial = tmp_path / "resumed.npz.partial"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(partial.glob("tile-*.npz"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(partial.glob("tile-*.npz"))) >= 2
    again = subprocess.run(base + ["--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "resuming: " in again.stderr
    assert not partial.exists()
    # The same neighbours as the uninterrupted run, values to float32 rounding; and both
    # within the contract of the float64 twin (this is the test that showed oneMKL's
    # first-call race, see vector_math: one process in seven was 40x less accurate).
    with np.load(tmp_path / "whole.npz") as a, np.load(out) as b:
        np.testing.assert_allclose(b["values"], a["values"], rtol=1e-5, atol=1e-6)
        kernel = dense_kernel(ens.test, ens.train)
        assert_same_neighbors(a["indices"], a["values"], kernel, 5)
        assert_same_neighbors(b["indices"], b["values"], kernel, 5)


def test_golden_on_disk_metadata(tmp_path):
    # Pins format version 3. If this changes, the format changed: bump FORMAT_VERSION.
    store = RunStore.create(tmp_path / "st", n_train=5, n_test=3, n_classes=4,
                            class_names=["a", "b", "c", "d"])
    root = json.loads((tmp_path / "st" / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    assert check_seal(root) is None and SEAL in root["attributes"]
    assert root["attributes"]["ensemble_kernel"] == {
        "format_version": 3, "n_classes": 4, "class_names": ["a", "b", "c", "d"],
        "splits": {"train": [0, 5], "test": [5, 8]}, "logits_dtype": "float16"}
    logits = json.loads((tmp_path / "st" / "logits" / "zarr.json").read_text())
    assert {k: logits[k] for k in ("shape", "data_type", "dimension_names", "attributes",
                                   "fill_value")} == {
        "shape": [0, 8, 4], "data_type": "float16",
        "dimension_names": ["run", "example", "class"],
        "attributes": {"splits": {"train": [0, 5], "test": [5, 8]}, "format_version": 3,
                       "arrays": [], SEAL: logits["attributes"][SEAL]},
        "fill_value": 0.0}
    assert check_seal(logits) is None
    assert logits["chunk_grid"]["configuration"]["chunk_shape"] == [1, 8, 4]
    assert [c["name"] for c in logits["codecs"]] == ["bytes", "crc32c"]  # uncompressed
    assert (tmp_path / "st" / "logits" / ".lock").is_file()
    store.append_arrays(torch.zeros(2, 5, 4), torch.zeros(2, 3, 4), source="golden",
                        seeds=[7, 8], arrays={"labels_test": np.array([0, 1, 3])})
    group = zarr.open_group(tmp_path / "st", mode="r")
    record = group["records/000000000"].attrs["record"]
    assert set(record) == {"source", "sha256", "runs", "stored_dtype", "source_dtype",
                           "code_sha256", "seeds", "test_key", "chunk_crc32c"}
    assert record["runs"] == [0, 2] and record["seeds"] == [7, 8]
    index = dict(group[f"index/{record['sha256']}"].attrs)
    assert index == {"runs": [0, 2], SEAL: index[SEAL]}
    assert group["logits"].attrs["arrays"] == ["labels_test"] and group["logits"].shape[0] == 2
    assert tuple(group["labels_test"].metadata.dimension_names) == ("test_example",)
    assert [c.to_dict()["name"] for c in group["labels_test"].metadata.codecs] == [
        "bytes", "zstd", "crc32c"]
    for meta in (tmp_path / "st").rglob("zarr.json"):  # every document is sealed
        assert check_seal(json.loads(meta.read_text())) is None, meta
    chunk = (tmp_path / "st" / "logits" / "c" / "1" / "0" / "0").read_bytes()
    assert len(chunk) == 8 * 4 * 2 + 4  # raw float16 values, then their CRC-32C


def test_a_truncated_chunk_is_an_error_naming_it(tmp_path):
    ens = make_ensemble(n_models=3)
    save_pt(tmp_path / "good.pt", ens.train, ens.test)
    run("ingest", tmp_path / "good.pt", "--store", tmp_path / "st", "-q")
    chunk = tmp_path / "st" / "logits" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, _, err = run("evaluate", tmp_path / "st", "--labels",
                       save_labels(tmp_path / "l.npz", ens))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "chunk logits/c/2/0/0 (run 2) could not be read" in err and "--repair" in err
    # The other runs are unaffected.
    assert RunStore(tmp_path / "st").read_logits(slice(0, 2), slice(0, 160)).shape == (2, 160, 5)


def test_xarray_opens_the_store_with_named_axes(tmp_path):
    xr = pytest.importorskip("xarray", reason="xarray is not installed")
    ens = make_ensemble(n_models=4)
    runs = files_of(tmp_path, ens)
    labels = save_labels(tmp_path / "labels.npz", ens)
    np.savez(tmp_path / "inputs.npz", inputs_train=np.zeros((120, 8, 8)),
             inputs_test=np.zeros((40, 8, 8)))
    assert run("ingest", runs, "--store", tmp_path / "st", "--labels", labels,
               "--inputs", tmp_path / "inputs.npz", "-q")[0] == 0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(tmp_path / "st", consolidated=False, zarr_format=3)
    assert ds["logits"].dims == ("run", "example", "class")
    assert ds.sizes["run"] == 4 and ds.sizes["example"] == 160
    assert ds["labels_train"].dims == ("train_example",) and ds.sizes["test_example"] == 40
    assert ds["inputs_test"].dims == ("test_example", "height", "width")
    start, stop = ds["logits"].attrs["splits"]["test"]
    np.testing.assert_array_equal(ds["logits"][:, start:stop].values, ens.test.half().numpy())
