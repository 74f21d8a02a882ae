"""`ingest` checks every file and every extra before its first byte; killed creates are swept.

A refused `ingest` must leave the store byte for byte as it was (every file and folder,
and everything a reader sees), or leave no store and no hidden folder when it would have
created one. An error after something was committed never says "nothing was written".
"""

import os
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ensemble_kernel.cli.ingest as ingest_module
import ensemble_kernel.storage._store as store_module
import ensemble_kernel.storage._layout as layout_module
from ensemble_kernel.cli import app
from ensemble_kernel.storage._store import RunStore

from conftest import make_ensemble, save_labels, save_pt
from test_store_faults import view

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def tree(path):
    """Every file (with its bytes) and every folder below `path`."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def refused(code, err, match):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


@pytest.fixture
def files(tmp_path):
    """ok0..ok3 (two runs each), nan.pt (NaN at train run 1, example 3, class 2), labels
    and inputs files, all for 120 train and 40 test examples of 5 classes."""
    ens = make_ensemble(n_models=12)
    out = {f"ok{i}": save_pt(tmp_path / f"ok{i}.pt", ens.train[2 * i:2 * i + 2],
                             ens.test[2 * i:2 * i + 2]) for i in range(4)}
    bad = ens.train[8:10].clone()
    bad[1, 3, 2] = float("nan")
    out["nan"] = save_pt(tmp_path / "nan.pt", bad, ens.test[8:10])
    out["labels"] = save_labels(tmp_path / "labels.npz", ens)
    rng = np.random.default_rng(0)
    out["inputs"] = tmp_path / "inputs_ok.npz"
    np.savez(out["inputs"], inputs_train=rng.random((120, 4, 4, 3)),
             inputs_test=rng.random((40, 4, 4, 3)))
    return tmp_path, ens, out


def test_a_refused_file_writes_no_labels_and_no_inputs(files):
    """The reproduction: --labels and --inputs were committed before nan.pt was read."""
    tmp_path, ens, f = files
    st = tmp_path / "st"
    assert run("ingest", f["ok0"], "--store", st, "-q")[0] == 0
    before, seen = tree(st), view(st)
    code, _, err = run("ingest", f["nan"], "--store", st, "-q", "--labels", f["labels"],
                       "--inputs", f["inputs"])
    refused(code, err, r"nan.pt: train logits of run 1, example 3, class 2 are not finite; "
                       r"nothing was written")
    assert tree(st) == before and view(st) == seen
    assert "labels no, inputs no" in run("info", st)[1]


def test_a_refused_second_file_leaves_no_new_store(files):
    """The reproduction: ok2.pt was committed into a new store before nan.pt was read."""
    tmp_path, ens, f = files
    code, _, err = run("ingest", f["ok2"], f["nan"], "--store", tmp_path / "new1", "-q")
    refused(code, err, r"nan.pt: .* not finite; nothing was written")
    assert not (tmp_path / "new1").exists()
    assert hidden(tmp_path) == []
    # With --labels and --inputs too, and then the same command without the bad file.
    code, _, err = run("ingest", f["ok2"], f["ok3"], f["nan"], "--store", tmp_path / "new1",
                       "--labels", f["labels"], "--inputs", f["inputs"])
    refused(code, err, "nothing was written")
    assert not (tmp_path / "new1").exists() and hidden(tmp_path) == []
    assert run("ingest", f["ok2"], f["ok3"], "--store", tmp_path / "new1", "-q",
               "--labels", f["labels"], "--inputs", f["inputs"])[0] == 0
    store = RunStore(tmp_path / "new1")
    assert store.n_models == 4 and torch.equal(store.labels("train"), ens.labels_train)


@pytest.mark.parametrize("new_store", [False, True])
def test_bad_inputs_with_good_files_write_nothing(files, new_store):
    tmp_path, ens, f = files
    st = tmp_path / "st"
    if not new_store:
        assert run("ingest", f["ok0"], "--store", st, "-q", "--inputs", f["inputs"])[0] == 0
        before, seen = tree(st), view(st)
    wrong_rank = tmp_path / "rank5.npz"
    np.savez(wrong_rank, inputs_train=np.zeros((120, 2, 2, 2, 1)),
             inputs_test=np.zeros((40, 2, 2, 2, 1)))
    other = tmp_path / "other.npz"  # valid, but not the inputs already stored
    np.savez(other, inputs_train=np.ones((120, 4, 4, 3)), inputs_test=np.ones((40, 4, 4, 3)))
    cases = [(wrong_rank, r"rank5.npz 'inputs_train': inputs must be .*rank 5")]
    if not new_store:
        cases.append((other, "inputs_train given differs from the inputs_train already in "
                             "the store"))
    for bad, match in cases:
        code, _, err = run("ingest", f["ok1"], f["ok2"], "--store", st, "--labels",
                           f["labels"], "--inputs", bad, "-q")
        refused(code, err, match)
        if new_store:
            assert not st.exists() and hidden(tmp_path) == []
        else:
            assert tree(st) == before and view(st) == seen


def _middle(tmp_path, ens, kind):
    """A file that one of the checks refuses, and what its error says."""
    path = tmp_path / f"bad-{kind}.pt"
    train, test = ens.train[8:10].clone(), ens.test[8:10]
    extra = {}
    if kind == "nan":
        train[0, 5, 1] = float("inf")
        match = r"train logits of run 0, example 5, class 1 are not finite"
    elif kind == "float16 range":
        train[1, 2, 0] = 1e6
        match = r"beyond the largest float16 .*--dtype float32"
    elif kind == "classes":
        train, test = train[..., :4], test[..., :4]
        match = r"train logits have 4 classes but the (new )?store .* has 5"
    elif kind == "labels":  # valid labels, but not those of ok1.pt before it
        extra["labels_test"] = (ens.labels_test + 1) % 5
        match = r"its test labels differ from those of .*ok1.pt"
    else:  # a damaged file
        path.write_bytes(b"PK\x03\x04 not a zip")
        return path, r"not a readable PyTorch file"
    save_pt(path, train, test, **extra)
    return path, match


@pytest.mark.parametrize("new_store", [False, True])
@pytest.mark.parametrize("kind", ["nan", "float16 range", "classes", "labels", "damaged"])
def test_a_bad_file_among_good_ones_writes_nothing(files, kind, new_store):
    tmp_path, ens, f = files
    save_pt(f["ok1"], ens.train[2:4], ens.test[2:4], labels_test=ens.labels_test)
    st = tmp_path / "st"
    if not new_store:
        assert run("ingest", f["ok0"], "--store", st, "-q")[0] == 0
        before, seen = tree(st), view(st)
    bad, match = _middle(tmp_path, ens, kind)
    labels = [] if kind == "labels" else ["--labels", f["labels"]]
    code, _, err = run("ingest", f["ok1"], f["ok2"], bad, f["ok3"], "--store", st, "-q",
                       *labels)
    refused(code, err, f"bad-{kind}.pt: .*{match}")
    if new_store:
        assert not st.exists() and hidden(tmp_path) == []
    else:
        assert tree(st) == before and view(st) == seen
    # Without it, the same command commits all the others.
    assert run("ingest", f["ok1"], f["ok2"], f["ok3"], "--store", st, "-q", *labels)[0] == 0
    assert RunStore(st).n_models == (8 if not new_store else 6)


def test_files_already_stored_are_skipped_by_hash_without_reading_their_runs(files, monkeypatch):
    tmp_path, ens, f = files
    st = tmp_path / "st"
    assert run("ingest", f["ok0"], f["ok1"], "--store", st, "-q")[0] == 0
    read = []
    real = ingest_module.read_run_file
    monkeypatch.setattr(ingest_module, "read_run_file",
                        lambda p, **kw: read.append(p) or real(p, **kw))
    monkeypatch.setattr(store_module, "read_run_file",
                        lambda p, **kw: read.append(p) or real(p, **kw))
    assert run("ingest", f["ok0"], f["ok1"], f["ok2"], "--store", st, "-q")[0] == 0
    assert f["ok0"] not in read and f["ok1"] not in read and f["ok2"] in read


def test_an_error_after_a_commit_never_says_nothing_was_written(files, monkeypatch):
    """A file replaced by a bad one between the checks and its commit (or a full disk):
    the files committed before it stay, and the message says so."""
    tmp_path, ens, f = files
    st = tmp_path / "st"
    assert run("ingest", f["ok0"], "--store", st, "-q")[0] == 0
    real, good = RunStore.append_file, f["ok2"].read_bytes()

    def replace_then_append(self, path, **kwargs):  # ok2.pt changes after its checks
        if path == f["ok2"]:
            save_pt(f["ok2"], torch.full((2, 120, 5), float("nan")), ens.test[:2])
        return real(self, path, **kwargs)

    monkeypatch.setattr(RunStore, "append_file", replace_then_append)
    code, _, err = run("ingest", f["ok1"], f["ok2"], f["ok3"], "--store", st, "--labels",
                       f["labels"], "-q")
    assert code == 2 and "nothing was written" not in err, err
    assert re.search(r"ok2.pt: train logits of run 0, example 0, class 0 are not finite; "
                     r".*st keeps what this ingest committed before it \(labels_test, "
                     r"labels_train, 1 file\); .*run the same command again", err), err
    store = RunStore(st)
    assert store.n_models == 4 and [r["source"] for r in store.records()] == \
        [str(f["ok0"]), str(f["ok1"])]
    # A new store: "the new store" is named among what was kept.
    f["ok2"].write_bytes(good)
    code, _, err = run("ingest", f["ok1"], f["ok2"], "--store", tmp_path / "new", "-q")
    assert code == 2 and "nothing was written" not in err, err
    assert "keeps what this ingest committed before it (the new store, 1 file)" in err, err


# ---- killed creates ----------------------------------------------------------------------

def _killed_create(path) -> None:
    """A forked child that dies (no cleanup runs) after building a new store at `path` in
    its hidden folder and before renaming it into place."""
    pid = os.fork()
    if pid == 0:
        real = store_module._build

        def build_then_die(*args):
            real(*args)
            os._exit(77)

        store_module._build = build_then_die
        try:
            RunStore.create(path, n_train=120, n_test=40, n_classes=5)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 77


def test_a_killed_create_leaves_a_folder_that_the_next_ingest_sweeps(files):
    tmp_path, ens, f = files
    st = tmp_path / "st"
    _killed_create(st)
    first = hidden(tmp_path)
    assert not st.exists() and len(first) == 1 and first[0].startswith(".st.creating-")
    _killed_create(st)  # the next create sweeps the first one's folder
    second = hidden(tmp_path)
    assert len(second) == 1 and second != first
    assert run("ingest", f["ok0"], "--store", st, "-q")[0] == 0
    assert hidden(tmp_path) == [] and RunStore(st).n_models == 2
    # Killed while another process created the store there: the next append sweeps it.
    st.rename(tmp_path / "aside")
    _killed_create(st)
    (tmp_path / "aside").rename(st)
    assert len(hidden(tmp_path)) == 1
    assert run("ingest", f["ok1"], "--store", st, "-q")[0] == 0
    assert hidden(tmp_path) == [] and RunStore(st).n_models == 4


def test_the_sweep_keeps_live_creators_and_other_hosts_folders(tmp_path):
    st = tmp_path / "st"
    host = layout_module.host()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no process has now (barring reuse)
    dead = tmp_path / f".st.creating-{host}-{pid}-abc"
    live = tmp_path / f".st.creating-{host}-{os.getpid()}-def"
    other_host = tmp_path / f".st.creating-otherhost{host}-{pid}-ghi"
    other_store = tmp_path / f".st2.creating-{host}-{pid}-jkl"
    for folder in (dead, live, other_host, other_store):
        (folder / "logits").mkdir(parents=True)
    assert store_module.sweep_stale_creations(st) == [dead]
    assert sorted(hidden(tmp_path)) == sorted(p.name for p in (live, other_host, other_store))
    # A create names its folder after its host and pid, and a failed one removes it.
    seen = []
    real = store_module._build
    store_module._build = lambda folder, *a: seen.append(folder.name) or 1 / 0
    try:
        with pytest.raises(ZeroDivisionError):
            RunStore.create(st, n_train=4, n_test=2, n_classes=3)
    finally:
        store_module._build = real
    assert seen[0].startswith(f".st.creating-{host}-{os.getpid()}-")
    assert not (tmp_path / seen[0]).exists()
