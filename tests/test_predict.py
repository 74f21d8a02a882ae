"""`predict` works on test sets without labels (issue 8, item 8).

The reference result is `predict` with every label available; each way of leaving the
test labels out must give the same predictions, scores and margins.
"""

import re

import numpy as np
import pytest


from conftest import make_ensemble, run_cli, save_labels, save_pt

run = run_cli


@pytest.fixture
def ens():
    return make_ensemble(n_models=6, n_train=150, n_test=50)


def predict(tmp_path, *args, name="p.npz"):
    out = tmp_path / name
    code, _, stderr = run("predict", *args, "--out", out, "-q")
    assert code == 0, stderr
    with np.load(out) as f:
        return f["prediction"], f["scores"], f["margin"]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def reference(tmp_path, ens):
    src = save_pt(tmp_path / "all.pt", ens.train, ens.test)
    return {vote: predict(tmp_path, src, "--labels", save_labels(tmp_path / "all.npz", ens),
                          *vote_args, name=f"ref-{vote}.npz")
            for vote, vote_args in (("knn", []), ("weighted", ["--weighted"]))}


def _train_only(tmp_path, ens, **extra):
    path = tmp_path / "train-labels.npz"
    np.savez(path, labels_train=ens.labels_train.numpy(), **extra)
    return path


@pytest.mark.parametrize("vote", ["knn", "weighted"])
def test_pt_files_without_labels_and_train_labels_only(tmp_path, ens, reference, vote):
    src = save_pt(tmp_path / "runs" / "nolabels.pt", ens.train, ens.test)
    args = ["--weighted"] if vote == "weighted" else []
    assert same(predict(tmp_path, src, "--labels", _train_only(tmp_path, ens), *args),
                reference[vote])
    # An empty labels_test (what the help used to suggest) is not read either.
    empty = _train_only(tmp_path, ens, labels_test=np.zeros(0, np.int64))
    assert same(predict(tmp_path, src, "--labels", empty, *args), reference[vote])
    # A directory of single-run .pt files without labels.
    for i in range(6):
        save_pt(tmp_path / "dir" / f"run{i}" / "log.pt", ens.train[i], ens.test[i])
    assert same(predict(tmp_path, tmp_path / "dir", "--labels", empty, *args), reference[vote])


def test_npz_without_labels_test(tmp_path, ens, reference):
    src = tmp_path / "runs.npz"
    np.savez(src, logits_train=ens.train.numpy(), logits_test=ens.test.numpy(),
             labels_train=ens.labels_train.numpy())
    assert same(predict(tmp_path, src), reference["knn"])


def test_stores_without_test_labels(tmp_path, ens, reference):
    # Train labels in the store, none for test.
    with_train = save_pt(tmp_path / "a.pt", ens.train, ens.test, labels_train=ens.labels_train)
    assert run("ingest", with_train, "--store", tmp_path / "s1", "-q")[0] == 0
    assert same(predict(tmp_path, tmp_path / "s1"), reference["knn"])
    # No labels in the store at all: train labels from --labels.
    bare = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    assert run("ingest", bare, "--store", tmp_path / "s2", "-q")[0] == 0
    assert same(predict(tmp_path, tmp_path / "s2", "--labels", _train_only(tmp_path, ens)),
                reference["knn"])


@pytest.mark.parametrize("labels,match", [
    (None, r"predict needs train labels: .*nolabels.pt carries none; pass --labels "
           r"FILE.npz with an array labels_train"),
    ("only-test", r"only-test.npz: missing labels_train; keys found: \['labels_test'\]"),
    ("short", "train labels have length 149 but the train split has 150 examples"),
    ("float", "'labels_train': labels must be a 1-D integer array, got float64"),
    ("labels.txt", "--labels takes an .npz file with an array labels_train"),
])
def test_missing_or_bad_train_labels_are_one_line_errors(tmp_path, ens, labels, match):
    src = save_pt(tmp_path / "nolabels.pt", ens.train, ens.test)
    files = {
        "only-test": dict(labels_test=ens.labels_test.numpy()),
        "short": dict(labels_train=ens.labels_train.numpy()[:-1]),
        "float": dict(labels_train=ens.labels_train.numpy().astype(float)),
    }
    args = []
    if labels == "labels.txt":
        (tmp_path / labels).write_text("0\n")
        args = ["--labels", tmp_path / labels]
    elif labels is not None:
        np.savez(tmp_path / f"{labels}.npz", **files[labels])
        args = ["--labels", tmp_path / f"{labels}.npz"]
    code, _, stderr = run("predict", src, *args, "--out", tmp_path / "p.csv")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert re.search(match, stderr), stderr
    assert not (tmp_path / "p.csv").exists()
