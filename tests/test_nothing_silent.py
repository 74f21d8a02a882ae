"""Nothing silent: no output replaces an input, an output that cannot be written is refused
before any work (and a failed write names the output), one neighbors job per checkpoint,
the checkpoint bound to everything given, Ctrl-C says so, and an error line is clean.
"""

import errno
import fcntl
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ensemble_kernel._atomic import atomic_write
from ensemble_kernel.storage._checkpoint import TileCheckpoint
from ensemble_kernel.cli import app
from ensemble_kernel.storage._configs import code_hash

from conftest import (CODE_A, CODE_B, make_ensemble, make_published_tree, save_labels, save_pt,
                      seam_env)
from test_resume import ARGS, _partial_run, _save_npz

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code, stderr, match):
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert re.search(match, stderr), stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _process(args, env=None, **kwargs):
    """The program in a real process (Popen), with `env` added to the environment."""
    return subprocess.Popen([sys.executable, "-m", "ensemble_kernel", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)


@pytest.fixture
def ens():
    return make_ensemble(n_models=4, n_train=60, n_test=20)


@pytest.fixture
def big():
    """Enough references for several tiles under ARGS' budget (see test_resume)."""
    return make_ensemble(seed=1, n_models=6, n_train=2000, n_test=200)


# ---- 1. no output replaces an input ----------------------------------------------------

def _cases(tmp_path, ens):
    npz = tmp_path / "a.npz"
    np.savez(npz, logits_train=ens.train.numpy(), logits_test=ens.test.numpy())
    pt = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "lab.npz", ens)
    store = tmp_path / "store"
    assert run("ingest", pt, "--labels", labels, "--store", store, "-q")[0] == 0
    link = tmp_path / "link.npz"
    os.link(npz, link)
    symlink = tmp_path / "sym.npz"
    symlink.symlink_to(npz)
    inside = tmp_path / "nn.npz.partial" / "runs.npz"  # SRC inside OUT.partial
    inside.parent.mkdir()
    np.savez(inside, logits_train=ens.train.numpy(), logits_test=ens.test.numpy())
    return {
        "neighbors SRC": (["neighbors", npz, "--out", npz], r"--out .*a\.npz is also an input "
                          r"\(SRC\); choose another output path"),
        "neighbors --labels": (["neighbors", pt, "--labels", labels, "--out", labels],
                               r"lab\.npz is also an input \(--labels\)"),
        "neighbors hard link": (["neighbors", npz, "--out", link], r"is also an input \(SRC\)"),
        "neighbors symlink": (["neighbors", npz, "--out", symlink], r"is also an input \(SRC\)"),
        "neighbors in store": (["neighbors", store, "--out", store / "nn.npz"],
                               r"is inside the store .*store \(SRC\)"),
        "neighbors OUT.partial": (["neighbors", inside, "--out", tmp_path / "nn.npz"],
                                  r"checkpoint folder .*nn\.npz\.partial holds .*runs\.npz, "
                                  r"an input \(SRC\)"),
        "predict SRC": (["predict", npz, "--labels", labels, "--out", npz],
                        r"is also an input \(SRC\)"),
        "predict --labels": (["predict", pt, "--labels", labels, "--out", labels],
                             r"is also an input \(--labels\)"),
        "label-issues --knn-graph": (["label-issues", pt, "--labels", labels, "--knn-graph",
                                      labels], r"--knn-graph .*lab\.npz is also an input"),
        "report in store": (["report", store, "--out", store / "r.html"],
                            r"is inside the store"),
        "pairs in store": (["pairs", store, "--out", store / "views"], r"is inside the store"),
        "sweep the store": (["sweep", store, "--out", store], r"is inside the store"),
        "duplicates in store": (["duplicates", store, "--out", store / "d"],
                                r"is inside the store"),
    }


CASES = ["neighbors SRC", "neighbors --labels", "neighbors hard link", "neighbors symlink",
         "neighbors in store", "neighbors OUT.partial", "predict SRC", "predict --labels",
         "label-issues --knn-graph", "report in store", "pairs in store", "sweep the store",
         "duplicates in store"]


@pytest.mark.parametrize("case", CASES)
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, ens, case):
    args, match = _cases(tmp_path, ens)[case]
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    code, _, stderr = run(*args, "-q")
    one_line_error(code, stderr, match)
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_beside_its_inputs_is_fine(tmp_path, ens):
    src = save_pt(tmp_path / "runs" / "a.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "lab.npz", ens)
    # In the SRC directory, but not a .pt file: it is not read as a run.
    assert run("neighbors", tmp_path / "runs", "--labels", labels, "--out",
               tmp_path / "runs" / "nn.npz", "-q")[0] == 0
    assert run("predict", src, "--labels", labels, "--out", tmp_path / "p.npz", "-q")[0] == 0


# ---- 2. an output that cannot be written is refused first; a failed write names it ----

def _chattr(flag: str, *paths) -> bool:
    try:
        return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def immutable(tmp_path):
    """chattr +i on the paths given (skips where chattr is not allowed); cleared after."""
    made = []

    def make(*paths):
        if not _chattr("+i", *paths):
            pytest.skip("chattr +i is not allowed here")
        made.extend(paths)

    yield make
    if made:
        _chattr("-i", *made)


@pytest.mark.parametrize("command", ["neighbors", "predict"])
def test_an_immutable_output_file_is_refused_before_any_work(tmp_path, ens, immutable,
                                                             command):
    src = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "lab.npz", ens)
    out = tmp_path / "out.npz"
    out.write_bytes(b"the user's")
    immutable(out)
    code, _, stderr = run(command, src, "--labels", labels, "--out", out, "-q")
    one_line_error(code, stderr, r"--out .*out\.npz is immutable \(chattr\), so it cannot be "
                                 r"replaced; choose another path")
    assert ".partial" not in stderr and out.read_bytes() == b"the user's"
    assert not (tmp_path / "out.npz.partial").exists()


def test_an_immutable_output_folder_is_refused_before_any_work(tmp_path, ens, immutable):
    src = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "lab.npz", ens)
    folder = tmp_path / "locked"
    folder.mkdir()
    immutable(folder)
    code, _, stderr = run("predict", src, "--labels", labels, "--out", folder / "p.csv", "-q")
    one_line_error(code, stderr, r"locked is not writable \(Operation not permitted\); choose "
                                 "another path")
    code, _, stderr = run("pairs", src, "--out", folder, "-q")
    one_line_error(code, stderr, r"--out .*locked is not writable")


def test_a_folder_that_takes_no_new_file_is_refused_even_as_root(tmp_path, ens, monkeypatch):
    """The check tries to make a file there (as root, os.access says yes to everything)."""
    import tempfile

    src = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "lab.npz", ens)
    target = tmp_path / "ro"
    target.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == target:
            raise PermissionError(errno.EROFS, "Read-only file system", str(Path(dir) / "x"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # (what root sees)
    for out in (target / "p.csv", target / "sub" / "p.csv"):
        code, _, stderr = run("predict", src, "--labels", labels, "--out", out, "-q")
        one_line_error(code, stderr, r"ro is not writable \(Read-only file system\)")
    assert list(target.iterdir()) == []


def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, ens):
    src = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    code, _, stderr = run("neighbors", src, "--out", fifo, "-q")
    one_line_error(code, stderr, r"pipe\.npz is not a regular file")
    assert not (tmp_path / "pipe.npz.partial").exists()


def test_a_full_disk_names_the_output_not_its_temporary_file(tmp_path, ens, monkeypatch):
    from ensemble_kernel.cli import compute

    src = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "lab.npz", ens)
    out = tmp_path / "p.csv"
    out.write_text("the user's")

    def full(f, *args):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # (no file named: as os.write)

    monkeypatch.setattr(compute, "_write_predictions", full)
    code, _, stderr = run("predict", src, "--labels", labels, "--out", out, "-q")
    one_line_error(code, stderr, rf"^error: {re.escape(str(out))}: cannot be written \(No space "
                                 r"left on device\); it is left as it was; free some space")
    assert ".partial" not in stderr
    assert out.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "lab.npz", "p.csv"]


def test_atomic_write_names_the_destination_in_its_error(tmp_path):
    def fails(f):
        raise OSError(errno.EIO, "Input/output error", "/somewhere/.x.tmp.partial")

    with pytest.raises(OSError, match=r"cannot be written \(Input/output error\)") as caught:
        atomic_write(tmp_path / "x.npz", fails)
    assert caught.value.filename == str(tmp_path / "x.npz")
    assert caught.value.errno == errno.EIO
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as caught:  # (the same subclass, by errno)
        atomic_write(tmp_path / "file" / "sub" / "x.npz", lambda f: None)
    assert caught.value.filename == str(tmp_path / "file" / "sub" / "x.npz")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


# ---- 3. one neighbors job per OUT.partial; the checkpoint removes only its own files ---

def _hold_lock(folder: Path):
    """Take OUT.partial/.lock as a running job does (an open file holding an flock)."""
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def test_a_second_job_on_the_same_out_is_refused_while_the_first_runs(tmp_path, big):
    src = tmp_path / "runs.npz"
    _save_npz(src, big)
    out = tmp_path / "nn.npz"
    first = _process(["neighbors", src, "--out", out, *ARGS],
                     env=seam_env(tile_delay=0.4))
    try:
        partial = tmp_path / "nn.npz.partial"
        for _ in range(600):  # until its first tile is written
            if list(partial.glob("tile-*.npz")) or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()
        second = _process(["neighbors", src, "--out", out, *ARGS])
        _, stderr = second.communicate(timeout=120)
        assert first.poll() is None, "the first job ended before the second was refused"
        assert second.returncode == 2, stderr
        assert stderr == (f"error: {partial} is in use by another neighbors job (pid "
                          f"{first.pid}); wait for it or choose another --out\n")
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert out.exists() and not partial.exists()  # no orphan folder left to refuse later
    assert run("neighbors", src, "--out", out, *ARGS)[0] == 0


def test_a_lock_held_elsewhere_refuses_the_job_and_leaves_the_checkpoint(tmp_path, big,
                                                                         monkeypatch):
    src = tmp_path / "runs.npz"
    _save_npz(src, big)
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out, tiles=2)
    before = sorted(p.name for p in partial.iterdir())
    fd = _hold_lock(partial)
    try:
        done = _process(["neighbors", src, "--out", out, *ARGS])
        _, stderr = done.communicate(timeout=120)
        assert done.returncode == 2 and stderr.count("\n") == 1, stderr
        assert f"is in use by another neighbors job (pid {os.getpid()})" in stderr
        # --no-resume computes on its own, and leaves the other job's checkpoint alone.
        done = _process(["neighbors", src, "--out", out, "--no-resume", *ARGS])
        _, stderr = done.communicate(timeout=120)
        assert done.returncode == 0, stderr
        assert sorted(p.name for p in partial.iterdir()) == sorted(before + [".lock"])
    finally:
        os.close(fd)
    os.unlink(partial / ".lock")
    code, _, stderr = run("neighbors", src, "--out", out, *ARGS)
    assert code == 0 and "resuming: 2 tiles" in stderr, stderr
    assert not partial.exists()


def test_a_refused_job_leaves_no_lock_behind(tmp_path, big, monkeypatch):
    src = tmp_path / "runs.npz"
    _save_npz(src, big)
    out = tmp_path / "nn.npz"
    code, _, _ = run("neighbors", src, "--out", out, "--memory-budget", "1KiB", "-q")
    assert code == 2 and not (tmp_path / "nn.npz.partial").exists()
    partial = _partial_run(monkeypatch, [src], out)
    assert (partial / ".lock").exists() is False


def test_a_users_file_named_like_a_tile_beyond_the_plan_is_kept(tmp_path, big, monkeypatch):
    src = tmp_path / "runs.npz"
    _save_npz(src, big)
    out = tmp_path / "nn.npz"
    partial = _partial_run(monkeypatch, [src], out)
    (partial / "tile-99999.npz").write_bytes(b"mine")
    # Starting over (another option) clears the old tiles, not the user's file ...
    from ensemble_kernel.storage import _checkpoint as checkpoint_module

    original = checkpoint_module.TileCheckpoint.save

    def save_one(self, index, found):
        original(self, index, found)
        raise KeyboardInterrupt  # (a kill after the first tile)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module.TileCheckpoint, "save", save_one)
        code, _, stderr = run("neighbors", src, "--out", out, "--k", "4", *ARGS[2:])
    assert code == 130 and "starting over" in stderr, stderr
    assert sorted(p.name for p in partial.iterdir()) == ["manifest.json", "tile-00000.npz",
                                                          "tile-99999.npz"]
    assert (partial / "tile-99999.npz").read_bytes() == b"mine"
    # ... and so does finishing: the folder stays, with that file only.
    code, _, stderr = run("neighbors", src, "--out", out, "--k", "4", *ARGS[2:])
    assert code == 0, stderr
    assert [p.name for p in partial.iterdir()] == ["tile-99999.npz"]
    assert (partial / "tile-99999.npz").read_bytes() == b"mine"


def test_a_folder_holding_only_a_jobs_lock_is_the_checkpoints(tmp_path, ens):
    """A job killed between taking its lock and writing its manifest leaves a folder
    with the lock alone: not refused as the user's."""
    src = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    out = tmp_path / "nn.npz"
    (tmp_path / "nn.npz.partial").mkdir()
    (tmp_path / "nn.npz.partial" / ".lock").write_text("12345\n")
    TileCheckpoint(out, {}).check_owner()
    assert run("neighbors", src, "--out", out, "-q")[0] == 0
    assert not (tmp_path / "nn.npz.partial").exists()


# ---- 4. the checkpoint is bound to everything given --------------------------------------

@pytest.fixture
def published(tmp_path):
    g = np.random.default_rng(0)
    labels_train, labels_test = g.integers(0, 10, 2000), g.integers(0, 10, 200)
    make_published_tree(tmp_path / "logs", labels_train, labels_test, n_files=6)
    np.savez(tmp_path / "lab1.npz", labels_train=labels_train, labels_test=labels_test)
    np.savez(tmp_path / "lab2.npz", labels_train=(labels_train + 1) % 10,
             labels_test=labels_test)
    return tmp_path


@pytest.mark.parametrize("first,then,differs", [
    (["--labels", "{t}/lab1.npz"], ["--labels", "{t}/lab2.npz"], "labels"),
    ([], ["--labels", "{t}/lab1.npz"], "labels"),
    (["--runs", "4"], ["--runs", "1:5"], "runs"),
    (["--code", code_hash(CODE_A)[:8]], ["--code", code_hash(CODE_B)[:8]], "options.code"),
    ([], ["--test-key", "logits_tta"], "options.test_key"),
], ids=["other labels", "labels added", "other runs", "other code", "other test key"])
def test_a_rerun_with_another_selection_or_labels_starts_over_and_says_why(
        published, monkeypatch, first, then, differs):
    t = published
    first, then = ([a.format(t=t) for a in args] for args in (first, then))
    out = t / "nn.npz"
    _partial_run(monkeypatch, [t / "logs", *first], out)
    code, _, stderr = run("neighbors", t / "logs", "--out", out, *then, *ARGS)
    assert code == 0, stderr
    said = " ".join(stderr.split())
    assert "resuming:" not in said
    found = re.search(r"not resuming from \S*nn\.npz\.partial: it differs in ([^;]*); "
                      r"starting over", said)
    assert found and differs in found.group(1).split(", "), said


def test_the_same_labels_resume(published, monkeypatch):
    t = published
    out = t / "nn.npz"
    _partial_run(monkeypatch, [t / "logs", "--labels", t / "lab1.npz"], out, tiles=2)
    code, _, stderr = run("neighbors", t / "logs", "--labels", t / "lab1.npz", "--out", out,
                          *ARGS)
    assert code == 0 and "resuming: 2 tiles" in stderr, stderr


# ---- 5. Ctrl-C ---------------------------------------------------------------------------

def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, big):
    src = tmp_path / "runs.npz"
    _save_npz(src, big)
    out = tmp_path / "nn.npz"
    # 3 s after each tile: time enough to be interrupted on a loaded machine
    # (SIGINT as a shell leaves it: a process started while it is ignored ignores it too)
    job = _process(["neighbors", src, "--out", out, *ARGS],
                   env=seam_env(tile_delay=3),
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = tmp_path / "nn.npz.partial"
    for _ in range(600):
        if list(partial.glob("tile-*.npz")) or job.poll() is not None:
            break
        time.sleep(0.1)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr
    assert stderr == "interrupted\n"
    assert not out.exists() and not (partial / ".lock").exists()
    code, _, stderr = run("neighbors", src, "--out", out, *ARGS)  # resumes its tiles
    assert code == 0 and "resuming: " in stderr, stderr


# ---- 6. a clean error line after a progress bar, colour forced ---------------------------

def test_an_error_after_the_progress_bar_is_a_clean_last_line(tmp_path, ens):
    train = ens.train.clone()
    train[2, 50, 1] = float("nan")  # found by the statistics pass, under its bar
    src = save_pt(tmp_path / "nan.pt", train, ens.test)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(FORCE_COLOR="1", ENSEMBLE_KERNEL_PROGRESS="1", TERM="xterm-256color")
    done = subprocess.run([sys.executable, "-m", "ensemble_kernel", "neighbors", src.name,
                           "--out", "nn.npz"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.split("\n")
    assert lines[-1] == "" and re.fullmatch(
        r"error: run 2 \(nan\.pt, run 2 in it\): example 50, class 1 is nan; [^\x1b\r]*",
        lines[-2]), repr(done.stderr)
    assert "\x1b" not in done.stderr, repr(done.stderr)
    assert "statistics" in done.stderr  # the bar was drawn (as plain text)
