"""Nothing silent in the store: checksums on every chunk and document, verify, repair,
upgrade, and no silent precision loss (docs/store.md)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kernel.storage._checkpoint import content_fingerprint
from ensemble_kernel.errors import InputError
from ensemble_kernel.storage._store import RunStore
from ensemble_kernel.storage._meta import SEAL, seal
from ensemble_kernel.storage._precision import rounding_warning
from ensemble_kernel.storage._verify import upgrade_store, verify_store

from conftest import make_ensemble, run_cli, save_labels, save_pt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import store_fuzz  # noqa: E402


@pytest.fixture
def made(tmp_path):
    """A store of two files (2 runs each) with labels, inputs and features."""
    ens = make_ensemble(n_models=4, n_train=30, n_test=12, n_classes=4)
    files = [save_pt(tmp_path / f"r{i}.pt", ens.train[i:i + 2], ens.test[i:i + 2])
             for i in (0, 2)]
    labels = save_labels(tmp_path / "labels.npz", ens)
    g = torch.Generator().manual_seed(3)
    np.savez(tmp_path / "features.npz", features_train=torch.randn(30, 5, generator=g).numpy(),
             features_test=torch.randn(12, 5, generator=g).numpy())
    code, _, err = run_cli("ingest", *files, "--store", tmp_path / "st", "--labels", labels,
                           "--features", tmp_path / "features.npz", "-q")
    assert code == 0, err
    return tmp_path / "st", files, ens


def _evaluate(store) -> tuple[int, str, str]:
    """evaluate --json, less its timings."""
    code, out, err = run_cli("evaluate", store, "--json")
    if code == 0:
        doc = json.loads(out)
        doc.pop("elapsed_s", None)
        out = json.dumps(doc, sort_keys=True)
    return code, out, err


def _one_line_error(result, *needles):
    code, _, err = result
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def _flip(path: Path, at: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


# ---- chunks: checksums on every array, and missing chunks never read as fill values -------

def test_two_bytes_written_into_a_logits_chunk_are_an_error_naming_it(made):
    store, files, _ = made
    chunk = store / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10:12] = b"\x12\x34"  # other finite float16 values
    chunk.write_bytes(bytes(data))
    _one_line_error(_evaluate(store), "chunk logits/c/1/0/0 (run 1)",
                    "checksum does not match", f"ingest {files[0]} --store {store} --repair")


@pytest.mark.parametrize("array, command", [
    ("labels_test", ["evaluate", "{store}"]),
    ("labels_train", ["label-issues", "{store}", "--split", "train"]),
    ("features_train", ["compare", "{store}", "--out", "{out}"]),
])
@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_damaged_chunk_of_any_array_is_an_error_naming_it(made, tmp_path, array, command,
                                                            damage):
    store, _, _ = made
    chunk = next(p for p in (store / array / "c").rglob("*") if p.is_file())
    if damage == "delete":
        chunk.unlink()
    else:
        _flip(chunk, 3, 0x01)
    key = str(chunk.relative_to(store))
    args = [a.format(store=store, out=tmp_path / "views") for a in command]
    _one_line_error(run_cli(*args), f"chunk {key} (examples 0..")


def test_a_truncated_zstd_chunk_is_an_error_not_a_traceback(made):
    store, _, _ = made
    chunk = store / "labels_test" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    _one_line_error(_evaluate(store), "chunk labels_test/c/0")


# ---- metadata: sealed documents --------------------------------------------------------

@pytest.mark.parametrize("file", ["records/000000002/zarr.json", "logits/zarr.json",
                                  "labels_train/zarr.json", "zarr.json"])
@pytest.mark.parametrize("damage", ["garbage", "value"])
def test_damaged_metadata_is_a_one_line_error_naming_the_file(made, file, damage):
    store, _, _ = made
    path = store / file
    if damage == "garbage":
        path.write_text('{"zarr_format": 3, "node_type": [')
    else:  # valid JSON, another value: only the seal can tell
        doc = json.loads(path.read_text())
        doc["attributes"]["tampered"] = 1
        path.write_text(json.dumps(doc))
    command = (["info", store, "--runs"] if file.startswith("records") else
               ["evaluate", store])
    _one_line_error(run_cli(*command), file, "is damaged")


def test_a_smaller_run_count_in_the_commit_is_an_error(made):
    store, _, _ = made
    meta = store / "logits" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"][0] = 3
    meta.write_text(json.dumps(doc))
    _one_line_error(_evaluate(store), "logits/zarr.json is damaged", "checksum")
    meta.write_text(json.dumps(seal(doc)))  # resealed: the records still cover 4 runs
    _one_line_error(run_cli("info", store, "--runs"), "the records cover runs 0..1, but "
                    "logits/zarr.json commits 3 runs")


@pytest.mark.parametrize("removed", ["logits/zarr.json", "labels_train", "zarr.json"])
def test_a_deleted_part_is_named(made, removed):
    store, _, _ = made
    path = store / removed
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    _one_line_error(_evaluate(store), "is damaged")


@pytest.mark.parametrize("folder", ["index", "records"])
def test_a_deleted_index_or_records_is_refused_by_a_reingest(made, folder):
    store, files, _ = made
    shutil.rmtree(store / folder)
    code, _, err = run_cli("ingest", *files, "--store", store, "-q")
    _one_line_error((code, "", err), f"{folder}/zarr.json is damaged")
    assert RunStore.__new__(RunStore) is not None
    doc = json.loads((store / "logits" / "zarr.json").read_text())
    assert doc["shape"][0] == 4  # nothing was added


# ---- verify and repair -----------------------------------------------------------------

def test_verify_passes_a_whole_store_and_its_files(made):
    store, files, _ = made
    code, _, err = run_cli("verify", store, *files)
    assert code == 0 and "4 runs, 4 logits chunks, 4 other arrays, 2 records, 2 run files " \
        "checked: all agree" in err, err


def test_verify_lists_every_problem_and_exits_2(made, tmp_path):
    store, files, ens = made
    _flip(store / "logits" / "c" / "3" / "0" / "0", 5)
    (store / "labels_test" / "c" / "0").unlink()
    changed = save_pt(tmp_path / "changed.pt", ens.train[:2] + 1, ens.test[:2])
    code, _, err = run_cli("verify", store, files[0], changed)
    assert code == 2, err
    problems = [line for line in err.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 3, err
    assert "chunk logits/c/3/0/0 (run 3)" in problems[0]
    assert "chunk labels_test/c/0" in problems[1]
    assert "changed.pt: its SHA-256" in problems[2] and "matches no record" in problems[2]
    assert err.splitlines()[-1].endswith("checked: 3 problems")


def test_the_damage_message_names_a_repair_that_works(made):
    store, files, _ = made
    code, want, _ = _evaluate(store)
    assert code == 0
    _flip(store / "logits" / "c" / "2" / "0" / "0", 9)
    (store / "logits" / "c" / "3" / "0" / "0").unlink()
    code, _, err = _evaluate(store)
    fix = err.split("repair it with `")[1].split("`")[0]
    assert fix == f"ensemble-kernel ingest {files[1]} --store {store} --repair"
    code, _, err = run_cli(*fix.split()[1:])
    assert code == 0 and "runs 2..3 rewrote 2 files" in err, err
    assert _evaluate(store) == (0, want, "")
    assert verify_store(store, files).ok
    code, _, err = run_cli(*fix.split()[1:])  # a second repair finds nothing to do
    assert code == 0 and "runs 2..3 intact" in err


@pytest.mark.parametrize("lost", ["record", "index entry"])
def test_repair_restores_a_lost_record_or_index_entry(made, lost):
    store, files, _ = made
    want = RunStore(store).records()
    key = want[1]["sha256"]
    shutil.rmtree(store / "records" / "000000002" if lost == "record" else
                  store / "index" / key)
    assert not verify_store(store).ok
    code, _, err = run_cli("ingest", files[1], "--store", store, "--repair")
    assert code == 0, err
    records = RunStore(store).records()
    assert [r["runs"] for r in records] == [[0, 2], [2, 4]]
    assert records[1]["sha256"] == key and RunStore(store).committed_runs(key) == (2, 4)


def test_repair_refuses_a_file_the_store_does_not_hold(made, tmp_path):
    store, _, ens = made
    other = save_pt(tmp_path / "other.pt", ens.train[:2] * 2, ens.test[:2])
    code, _, err = run_cli("ingest", other, "--store", store, "--repair")
    _one_line_error((code, "", err), "no record of", "ingest it without --repair")
    code, _, err = run_cli("ingest", other, "--store", store, "--repair", "--labels", "x.npz")
    _one_line_error((code, "", err), "--repair takes run files and --test-key only")


# ---- the test key is part of a file's content --------------------------------------------

def test_a_store_rebuilt_with_another_test_key_is_not_resumed(tmp_path):
    ens = make_ensemble(n_models=3, n_train=40, n_test=10)
    path = tmp_path / "runs.pt"
    torch.save({"logits": ens.test, "logits_tta": ens.test.flip(0) * 1.5,
                "logits_train": ens.train}, path)
    assert run_cli("ingest", path, "--store", tmp_path / "st", "-q")[0] == 0
    before = content_fingerprint([str(tmp_path / "st")], slice(0, 3))
    shutil.rmtree(tmp_path / "st")
    assert run_cli("ingest", path, "--store", tmp_path / "st", "--test-key", "logits_tta",
                   "-q")[0] == 0
    records = RunStore(tmp_path / "st").records()
    assert records[0]["test_key"] == "logits_tta"
    # What binds a checkpoint to the store's content: it differs, so no tile is resumed.
    assert content_fingerprint([str(tmp_path / "st")], slice(0, 3)) != before
    # The same file under another test key is other content: ingested, not skipped.
    code, _, err = run_cli("ingest", path, "--store", tmp_path / "st", "-q")
    assert code == 0 and RunStore(tmp_path / "st").n_models == 6, err


# ---- precision: float16 must not round away the spread -----------------------------------

def _near_2000(n_models=4, n=60, seed=0):
    """Logits near 2,000 that vary by 0.3 between runs: float16 steps there are 1.0."""
    g = torch.Generator().manual_seed(seed)
    base = 2000 + 3 * torch.randn(1, n, 5, generator=g)
    return base + 0.3 * torch.randn(n_models, n, 5, generator=g)


def test_float16_that_would_round_away_the_spread_is_refused(tmp_path):
    runs = _near_2000()
    save_pt(tmp_path / "big.pt", runs[:, :40], runs[:, 40:])
    code, _, err = run_cli("ingest", tmp_path / "big.pt", "--store", tmp_path / "st")
    _one_line_error((code, "", err), "keeps logits as float16", "--dtype float32",
                    "nothing was written")
    assert not (tmp_path / "st").exists()
    code, _, err = run_cli("ingest", tmp_path / "big.pt", "--store", tmp_path / "st32",
                           "--dtype", "float32", "-q")
    assert code == 0, err


def test_one_run_files_are_checked_against_the_runs_before_them(tmp_path):
    runs = _near_2000()
    files = [save_pt(tmp_path / f"f{i}.pt", runs[i:i + 1, :40], runs[i:i + 1, 40:])
             for i in range(3)]
    code, _, err = run_cli("ingest", *files, "--store", tmp_path / "st")
    _one_line_error((code, "", err), "f1.pt", "keeps logits as float16")
    assert not (tmp_path / "st").exists()  # refused while checking: nothing written
    assert run_cli("ingest", files[0], "--store", tmp_path / "st", "-q")[0] == 0
    code, _, err = run_cli("ingest", files[1], "--store", tmp_path / "st")
    _one_line_error((code, "", err), "f1.pt", "keeps logits as float16")
    with pytest.raises(InputError, match="keeps logits as float16"):
        RunStore(tmp_path / "st").append_file(files[2])
    assert RunStore(tmp_path / "st").n_models == 1


def test_a_lossy_store_warns_when_it_is_read(tmp_path):
    runs = _near_2000()
    store = RunStore.create(tmp_path / "st", n_train=40, n_test=20, n_classes=5)
    store.append_arrays(runs[:, :40], runs[:, 40:], source="api", check_precision=False)
    assert "standardised outputs" in rounding_warning(RunStore(tmp_path / "st"))
    code, _, err = run_cli("neighbors", tmp_path / "st", "--out", tmp_path / "n.npz", "-q")
    assert code == 0 and "warning: " in err and "--dtype float32" in err, err


def test_ordinary_logits_pass_the_float16_check(tmp_path):
    ens = make_ensemble(n_models=6)
    store = RunStore.create(tmp_path / "st", n_train=120, n_test=40, n_classes=5)
    store.append_arrays(ens.train, ens.test, source="api")  # no refusal
    assert rounding_warning(RunStore(tmp_path / "st")) is None


# ---- older formats: read with a warning, upgraded on request -----------------------------

def _as_format_2(store: Path) -> None:
    """Rewrite a format-3 store as format 2 wrote it: no checksums, no seals."""
    for chunk in (store / "logits" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(chunk.read_bytes()[:-4])
    for meta in store.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        doc["attributes"].pop(SEAL, None)
        if meta.parent.name == "logits":
            doc["codecs"] = doc["codecs"][:1]
            doc["attributes"]["format_version"] = 2
        if meta.parent == store:
            doc["attributes"]["ensemble_kernel"]["format_version"] = 2
        for record in [doc["attributes"].get("record")]:
            if record is not None:
                record.pop("test_key", None)
        meta.write_text(json.dumps(doc))


def test_a_format_2_store_is_read_with_a_warning_and_upgraded(made):
    store, files, _ = made
    code, want, _ = _evaluate(store)
    _as_format_2(store)
    with pytest.warns(UserWarning, match="format 2: its chunks carry no checksums"):
        assert not RunStore(store).checked
    code, got, err = _evaluate(store)
    assert code == 0 and got == want and "ensemble-kernel upgrade" in err
    assert "carries no checksums" in verify_store(store).problems[-1]
    code, _, err = run_cli("upgrade", store)
    assert code == 0 and "upgraded from format 2 to 3" in err, err
    assert RunStore(store).checked and verify_store(store, files).ok
    assert _evaluate(store) == (0, want, "")
    assert not list(store.parent.glob(".st.*"))  # nothing left beside it
    assert upgrade_store(store) == 3  # already upgraded: nothing to do


# ---- the fuzz harness: every file, every mutation (a seeded sample here) -------------------

def test_every_reading_command_survives_a_sample_of_store_damage():
    n, failures = store_fuzz.fuzz(sample=40, flips=3, seed=2)
    assert n == 40 and failures == [], "\n".join(failures)


def test_the_fuzz_harness_fails_other_numbers_and_tracebacks():
    case = store_fuzz.Case("logits/c/0/0/0", "flip-3")
    baseline = {"evaluate": (0, "a", "")}
    assert store_fuzz.judge(case, {"evaluate": (0, "b", "")}, baseline)
    assert store_fuzz.judge(case, {"evaluate": (1, "traceback: KeyError", "")}, baseline)
    assert store_fuzz.judge(case, {"evaluate": (2, "", "error: something else\n")}, baseline)
    assert not store_fuzz.judge(case, {"evaluate": (2, "", "error: S: chunk logits/c/0/0/0 "
                                                           "(run 0) is missing\n")}, baseline)
    assert not store_fuzz.judge(case, {"evaluate": (0, "a", "")}, baseline)


def test_two_chunks_swapped_are_told_apart_by_their_records(made):
    """Each chunk's own checksum holds after a swap; its record's does not."""
    store, files, _ = made
    a, b = (store / "logits" / "c" / str(m) / "0" / "0" for m in (0, 2))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    _one_line_error(_evaluate(store), "chunk logits/c/0/0/0 (run 0)", "moved or swapped")
    assert run_cli("ingest", *files, "--store", store, "--repair")[0] == 0
    assert verify_store(store, files).ok


def test_a_labels_chunk_copied_from_another_store_is_refused(made, tmp_path):
    """A valid chunk of its own, but not the one this store committed."""
    store, files, ens = made
    other = tmp_path / "other.npz"
    np.savez(other, labels_train=(ens.labels_train + 1) % 4, labels_test=(ens.labels_test + 1) % 4)
    assert run_cli("ingest", files[0], "--store", tmp_path / "so", "--labels", other,
                   "-q")[0] == 0
    shutil.copy(tmp_path / "so" / "labels_test" / "c" / "0", store / "labels_test" / "c" / "0")
    _one_line_error(_evaluate(store), "chunk labels_test/c/0", "copied from elsewhere")
    assert not verify_store(store).ok


def test_upgrade_given_the_run_files_refuses_damage_it_would_seal(made):
    store, files, _ = made
    _as_format_2(store)
    _flip(store / "logits" / "c" / "1" / "0" / "0", 20, 0x7B)
    code, _, err = run_cli("upgrade", store, *files)
    _one_line_error((code, "", err), "runs 0..1 differ from", "not upgraded")
    assert not RunStore(store).checked
