"""No command deletes or damages what it did not create (issue 8, item 5).

Each command that writes is run against a pre-existing user file or folder at its output
path; a refused or failed command must leave it byte for byte as it was, with a one-line
error and exit status 2.
"""

import hashlib
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from ensemble_kernel.cli import app
from ensemble_kernel.demo import DemoOptions
from ensemble_kernel.demo.output import MARKER, check_output_folder
from ensemble_kernel.errors import InputError
from ensemble_kernel.storage._store import RunStore

from conftest import make_ensemble, save_labels, save_pt

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def tree(path):
    """A digest of every file and folder under `path` (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest(), sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def one_line_error(code, stderr, match):
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert re.search(match, stderr), stderr


@pytest.fixture
def ens():
    return make_ensemble(n_models=6, n_train=150, n_test=50)


@pytest.fixture
def user_store(tmp_path, ens):
    """A store of the user's, made by ingest, at OUT/store."""
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test, labels_train=ens.labels_train,
                  labels_test=ens.labels_test)
    store = tmp_path / "out" / "store"
    assert run("ingest", src, "--store", store, "-q")[0] == 0
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return store


# ---- demo ------------------------------------------------------------------------------

def test_demo_with_a_misspelt_dataset_leaves_the_users_store(tmp_path, user_store):
    before = tree(tmp_path / "out")
    code, _, stderr = run("demo", "--out", tmp_path / "out", "--dataset", "mnist-1d")
    one_line_error(code, stderr, "--dataset takes mnist1d or digits, got 'mnist-1d'")
    assert tree(tmp_path / "out") == before
    assert RunStore(user_store).n_models == 6


@pytest.mark.parametrize("args", [["--models", "1"], ["--models", "0"]])
def test_demo_with_a_bad_option_leaves_the_users_store(tmp_path, user_store, args):
    before = tree(tmp_path / "out")
    code, _, stderr = run("demo", "--out", tmp_path / "out", *args)
    one_line_error(code, stderr, r"--models.*(must be at least|greater than or equal to) 2")
    assert tree(tmp_path / "out") == before


def test_demo_refuses_a_folder_it_did_not_make_before_training(tmp_path, user_store):
    before = tree(tmp_path / "out")
    code, _, stderr = run("demo", "--out", tmp_path / "out", "--dataset", "digits")
    one_line_error(code, stderr, r"holds files the demo did not write .* --force")
    assert tree(tmp_path / "out") == before


def test_demo_refuses_a_file_even_with_force(tmp_path):
    target = tmp_path / "results"
    target.write_text("keep me")
    code, _, stderr = run("demo", "--out", target, "--force")
    one_line_error(code, stderr, "is a file, not a folder")
    assert target.read_text() == "keep me"


def test_a_store_swapped_in_under_the_demos_marker_is_refused(tmp_path, user_store):
    """The marker alone is not enough: the store must be the one the demo wrote."""
    out = tmp_path / "out"
    (out / MARKER).write_text(json.dumps({"made_by": "ensemble-kernel demo",
                                          "store_records": [{"source": "demo:digits"}]}))
    with pytest.raises(InputError, match="store was not made by the demo"):
        check_output_folder(out, force=False)
    check_output_folder(out, force=True)  # --force would replace it
    check_output_folder(tmp_path / "new", force=False)  # a new folder is fine
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", force=False)


@pytest.mark.slow
def test_demo_replaces_only_its_own_store(tmp_path, user_store):
    out = tmp_path / "out"
    args = ["demo", "--dataset", "digits", "--models", "2", "--out", out, "-q"]
    # --force takes over the folder: the user's store is replaced, other files stay.
    assert run(*args, "--force")[0] == 0
    store = RunStore(out / "store")
    assert store.records()[0]["source"] == "demo:digits"
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".store-")]
    # A second demo replaces its own store without --force ...
    code, _, stderr = run(*args, "--seed", "1")
    assert code == 0, stderr
    assert RunStore(out / "store").records()[0]["seeds"][0] == 1_000_003
    # ... but not once the user has added runs to it.
    src = save_pt(tmp_path / "more.pt", torch.zeros(1, 1257, 10), torch.zeros(1, 540, 10))
    assert run("ingest", src, "--store", out / "store", "-q")[0] == 0
    before = tree(out)
    code, _, stderr = run(*args)
    one_line_error(code, stderr, "store was not made by the demo, or runs were added")
    assert tree(out) == before


# ---- neighbors' checkpoint folder ----------------------------------------------------

def test_neighbors_never_removes_a_partial_folder_it_did_not_make(tmp_path, ens):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    out = tmp_path / "nn.npz"
    mine = tmp_path / "nn.npz.partial"
    mine.mkdir()
    (mine / "data.txt").write_text("mine")
    before = tree(mine)
    code, _, stderr = run("neighbors", src, "--out", out, "-q")
    one_line_error(code, stderr, "nn.npz.partial exists and was not made by neighbors")
    assert tree(mine) == before and not out.exists()
    # Without resuming, the command succeeds and still leaves the folder alone.
    assert run("neighbors", src, "--out", out, "--no-resume", "-q")[0] == 0
    assert out.exists() and tree(mine) == before


def test_a_refused_neighbors_keeps_the_earlier_checkpoint(tmp_path, ens, monkeypatch):
    """A typo in an option does not throw away the tiles of an interrupted run."""
    from test_resume import ARGS, _partial_run

    big = make_ensemble(n_models=6, n_train=2000, n_test=200)
    src = save_pt(tmp_path / "b.pt", big.train, big.test)
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2)
    before = tree(partial)
    for bad in (["--k", "0"], ["--k", "2001"], ["--memory-budget", "1KiB"]):
        code, _, stderr = run("neighbors", src, "--out", out, *bad, "-q")
        assert code == 2, stderr
        assert tree(partial) == before, bad
    result = runner.invoke(app, ["neighbors", str(src), "--out", str(out), *ARGS])
    assert result.exit_code == 0 and "resuming: 2 tiles" in result.stderr


def test_neighbors_leaves_user_files_inside_its_own_partial_folder(tmp_path, ens,
                                                                   monkeypatch):
    from test_resume import ARGS, _partial_run

    big = make_ensemble(n_models=6, n_train=2000, n_test=200)
    src = save_pt(tmp_path / "b.pt", big.train, big.test)
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out)
    (partial / "note.txt").write_text("mine")
    assert runner.invoke(app, ["neighbors", str(src), "--out", str(out), *ARGS]).exit_code == 0
    assert [p.name for p in partial.iterdir()] == ["note.txt"]


# ---- every command with an output path -----------------------------------------------

def _commands(tmp_path, src, labels):
    """(command line, what it writes) for every command that writes, but with one
    refused option each, so that nothing may be written."""
    return {
        "neighbors": (["neighbors", src, "--k", "0", "--out", "{out}.npz"], "{out}.npz"),
        "predict": (["predict", src, "--labels", labels, "--k", "0", "--out", "{out}.csv"],
                    "{out}.csv"),
        "report": (["report", src, "--ranks", "x", "--labels", labels, "--out", "{out}.html"],
                   "{out}.html"),
        "sweep": (["sweep", src, "--runs", "x", "--labels", labels, "--out", "{out}"], "{out}"),
        "pairs": (["pairs", src, "--ranks", "x", "--out", "{out}"], "{out}"),
        "failures": (["failures", src, "--out", "{out}"], "{out}"),  # no labels: refused
        "compare": (["compare", src, "--labels", labels, "--out", "{out}"], "{out}"),
        "duplicates": (["duplicates", src, "--memory-budget", "1KiB", "--out", "{out}"],
                       "{out}"),
        "label-issues": (["label-issues", src, "--labels", labels, "--k", "0", "--out",
                          "{out}.csv"], "{out}.csv"),
    }


@pytest.mark.parametrize("command", ["neighbors", "predict", "report", "sweep", "pairs",
                                     "failures", "compare", "duplicates", "label-issues"])
def test_a_refused_command_leaves_an_existing_output_alone(tmp_path, ens, command):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    args, target = _commands(tmp_path, src, labels)[command]
    out = tmp_path / "user" / "result"
    target = type(out)(target.format(out=out))
    args = [str(a).format(out=out) for a in args]
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix:  # a file the user had there
        target.write_bytes(b"the user's own file")
    else:  # a folder of the user's, with files of the same names the command writes
        target.mkdir()
        for name in ("sweep.csv", "pairs.csv", "failures.csv", "compare.png", "notes.txt"):
            (target / name).write_text("mine")
    if command == "report":
        files = out.with_name(out.name + "_files")
        files.mkdir()
        (files / "sweep.csv").write_text("mine")
    before = tree(tmp_path / "user")
    code, _, stderr = run(*args)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert tree(tmp_path / "user") == before


@pytest.mark.parametrize("command,args,match", [
    ("neighbors", ["--out", "{dir}"], "is a folder; name a file"),
    ("predict", ["--out", "{dir}"], "is a folder; name a file"),
    ("label-issues", ["--out", "{dir}"], "is a folder; name a file"),
    ("report", ["--out", "{dir}"], "is a folder; name a file"),
    ("report", ["--out", "{file_html}"], r"x_files is a file, not a folder"),
    ("sweep", ["--out", "{file}"], "is a file, not a folder"),
    ("pairs", ["--out", "{file}"], "is a file, not a folder"),
    ("sweep", ["--out", "{file}/sub"], "is a file, so no folder can be made there"),
])
def test_output_paths_are_checked_before_any_work(tmp_path, ens, command, args, match):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    (tmp_path / "d.npz").mkdir()
    (tmp_path / "d.npz" / "x").write_text("mine")
    for name in ("d.csv", "d.html"):
        (tmp_path / name).mkdir()
    (tmp_path / "f").write_text("mine")
    (tmp_path / "x_files").write_text("mine")
    suffix = {"neighbors": ".npz", "predict": ".csv", "report": ".html",
              "label-issues": ".csv"}.get(command, "")
    fill = dict(dir=tmp_path / f"d{suffix}", file=tmp_path / "f",
                file_html=tmp_path / "x.html")
    before = tree(tmp_path)
    code, _, stderr = run(command, src, "--labels", labels,
                          *[a.format(**fill) for a in args], "-q")
    one_line_error(code, stderr, match)
    assert tree(tmp_path) == before


def test_demo_options_are_a_frozen_record_with_force():
    assert DemoOptions().force is False


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_users_umask_not_0600(tmp_path, umask):
    """A result file is made as open() would make it (0666 less the umask), so a shared
    folder's readers can read it; mkstemp alone would leave it 0600."""
    import os
    import stat

    from ensemble_kernel._atomic import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o666 & ~umask
