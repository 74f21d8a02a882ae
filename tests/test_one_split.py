"""One split only: test logits without a train split (the larger published set).

Every command that can works within the test split, each example's own entry left out;
the others say in one line that they need the train split. The plain twin is the dense
float64 kernel of the split with itself, its diagonal masked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ensemble_kernel import top_k_neighbors

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.analysis._evaluation import select_by_leave_one_out
from ensemble_kernel.storage._formats import open_runs
from ensemble_kernel.core._sources import as_source
from ensemble_kernel.analysis._within import duplicates_within, evaluate_within

from conftest import (CODE_A, assert_same_neighbors, make_ensemble, make_published_tree,
                      run_cli, save_pt)


def _test_only(tmp_path, n_models=6, n_test=40, seed=0, **extra):
    ens = make_ensemble(seed=seed, n_models=n_models, n_test=n_test, n_train=1)
    path = tmp_path / "runs" / f"test-only-{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": ens.test, **extra}, path)
    np.savez(tmp_path / "labels.npz", labels_train=np.zeros(50_000, dtype=np.int64),
             labels_test=ens.labels_test.numpy())  # as `labels cifar10` writes them
    return path, ens


def _masked_kernel(test):
    kernel = dense_kernel(test, test).double()
    kernel.fill_diagonal_(float("-inf"))
    return kernel


def _plain_loo_knn(kernel, labels, k, n_classes):
    """The definition: the k largest of each row (ties: smaller index), majority vote
    (ties: smaller label)."""
    n = kernel.shape[0]
    order = sorted(range(n), key=lambda j: j)
    preds = []
    for i in range(n):
        ranked = sorted(order, key=lambda j: (-float(kernel[i, j]), j))[:k]
        votes = np.bincount(labels[ranked], minlength=n_classes)
        preds.append(int(np.argmax(votes)))  # argmax: the first (smallest) of equal counts
    return float(np.mean(np.array(preds) == labels))


def test_a_file_without_logits_train_is_one_split(tmp_path):
    path, ens = _test_only(tmp_path)
    runset = open_runs([path], labels=tmp_path / "labels.npz")
    assert not runset.has_train and runset.train.n_examples == 0
    assert runset.labels_train is None  # 50,000 train labels of labels.npz have no use here
    assert torch.equal(runset.labels_test, ens.labels_test)


def test_evaluate_within_is_leave_one_out_and_matches_its_plain_twin(tmp_path):
    path, ens = _test_only(tmp_path)
    code, out, err = run_cli("evaluate", path, "--labels", tmp_path / "labels.npz", "--k", "3",
                             "--weighted-k", "5", "--json")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line]
    assert notes == ["note: evaluate: SRC has no train split; the votes are leave-one-out "
                     "within its 40 test examples, each example's own entry left out"]
    got = json.loads(out)
    assert got["options"]["within_split"] is True
    lib = evaluate_within(ens.test, ens.labels_test, k=3, weighted_k=5)
    assert got["knn_accuracy"] == lib.knn_accuracy
    assert got["weighted_accuracy"] == lib.weighted_accuracy
    kernel = _masked_kernel(ens.test)
    labels = ens.labels_test.numpy()
    assert lib.knn_accuracy == pytest.approx(_plain_loo_knn(kernel, labels, 3, 5), abs=0)
    singles = (ens.test.argmax(-1) == ens.labels_test).double().mean(1)
    assert got["single_model_accuracy"] == pytest.approx(float(singles.mean()), abs=1e-12)
    code, out, _ = run_cli("evaluate", path, "--labels", tmp_path / "labels.npz",
                           "--weighted-k", "5")
    assert "k-NN and weighted votes are leave-one-out" in out


def test_select_within_the_split(tmp_path):
    path, ens = _test_only(tmp_path)
    code, out, err = run_cli("evaluate", path, "--labels", tmp_path / "labels.npz", "--select",
                             "--json")
    assert code == 0, err
    got = json.loads(out)["selection"]
    want = select_by_leave_one_out(as_source(ens.test), ens.labels_test)
    assert (got["vote"], got["k"], got["power"]) == (want.vote, want.k, want.power)
    assert got["leave_one_out_accuracy"] == want.accuracy


@pytest.mark.parametrize("precision,n_test,k", [
    ("exact", 33, 32),  # every other example
    ("fast", 200, 5),  # more than k + 128 references: the bfloat16 candidates and the bound
])
def test_neighbors_within_leave_each_example_out(tmp_path, precision, n_test, k):
    path, ens = _test_only(tmp_path, n_test=n_test)
    code, _, err = run_cli("neighbors", path, "--k", k, "--out", tmp_path / "n.npz", "-q",
                           "--precision", precision)
    assert code == 0, err
    assert "note: neighbors: SRC has no train split" in err
    with np.load(tmp_path / "n.npz") as f:
        indices, values = f["indices"], f["values"]
        assert json.loads(str(f["meta"]))["options"]["within_split"] is True
    assert not (indices == np.arange(n_test)[:, None]).any()  # never itself
    assert_same_neighbors(indices, values, _masked_kernel(ens.test), k)
    # k = n_examples would need the example itself
    code, _, err = run_cli("neighbors", path, "--k", n_test, "--out", tmp_path / "n.npz")
    assert code == 2 and f"--k must be between 1 and {n_test - 1} (the number of other test " \
        "examples)" in err


def test_two_examples_k1_each_is_the_others_neighbour(tmp_path):
    path, ens = _test_only(tmp_path, n_test=2, n_models=3)
    labels = ens.labels_test.numpy()
    code, out, err = run_cli("evaluate", path, "--labels", tmp_path / "labels.npz", "--k", "1",
                             "--weighted-k", "1", "--json")
    assert code == 0, err
    got = json.loads(out)
    want = float(labels[0] == labels[1])  # each is classified by the other's label
    assert got["knn_accuracy"] == want and got["weighted_accuracy"] == want
    found = top_k_neighbors(ens.test, None, 1)
    assert found.indices.flatten().tolist() == [1, 0]
    code, _, err = run_cli("evaluate", path, "--labels", tmp_path / "labels.npz", "--k", "2",
                           "--weighted-k", "1")
    assert code == 2 and "--k must be between 1 and 1 (the number of other test examples)" in err


def test_duplicates_within_list_a_pair_once(tmp_path):
    ens = make_ensemble(n_models=8, n_test=60, n_train=1, seed=2)
    test = ens.test.clone()
    test[:, 41] = test[:, 7]  # an exact duplicate
    test[:, 23] = test[:, 12] + 1e-3  # a near one: a constant shift leaves log-softmax alone
    test[:, 30] = test[:, 5] + 1e-3 * torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    path = save_pt(tmp_path / "t.pt", torch.empty(8, 0, 5), test)
    found = duplicates_within(test)
    pairs = [frozenset((p.test_index, p.train_index)) for p in found.pairs]
    assert len(pairs) == len(set(pairs))  # each pair once
    assert pairs[:2] == [frozenset((7, 41)), frozenset((12, 23))] or \
        pairs[:2] == [frozenset((12, 23)), frozenset((7, 41))]
    assert frozenset((5, 30)) in pairs
    assert found.top1_values.shape == (60,)
    code, out, err = run_cli("duplicates", path, "--out", tmp_path / "views", "--json")
    assert code == 0, err
    assert "note: duplicates: SRC has no train split" in err
    got = json.loads(out)
    assert got["within_split"] is True
    assert [frozenset((p["test_index"], p["other_test_index"])) for p in got["pairs"]] == pairs
    csv = (tmp_path / "views" / "duplicates.csv").read_text().splitlines()
    assert csv[0] == "rank,test index,other test index,K,test label,other test label"
    assert len(csv) == 1 + len(pairs)
    code, out, _ = run_cli("duplicates", path, "--out", tmp_path / "views", "--top", "1")
    assert "1 near-duplicate pairs" in out and " test " in out.splitlines()[2]


@pytest.mark.parametrize("command,args", [
    ("predict", ["--out", "{tmp}/p.csv"]),
    ("pairs", ["--out", "{tmp}/v"]),
    ("failures", ["--labels", "{tmp}/labels.npz", "--out", "{tmp}/v"]),
    ("sweep", ["--labels", "{tmp}/labels.npz", "--out", "{tmp}/s"]),
    ("report", ["--labels", "{tmp}/labels.npz", "--out", "{tmp}/r.html"]),
])
def test_commands_that_need_the_train_split_say_so(tmp_path, command, args):
    path, _ = _test_only(tmp_path)
    code, _, err = run_cli(command, path, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"error: {command} needs a train split (the references), but SRC holds test logits" \
        " only" in err


def test_mixing_one_split_and_two_split_files_is_one_line(tmp_path):
    path, ens = _test_only(tmp_path)
    save_pt(tmp_path / "runs" / "z-both.pt", ens.test[:, :3], ens.test)
    code, _, err = run_cli("evaluate", tmp_path / "runs", "--labels", tmp_path / "labels.npz")
    assert code == 2 and len(err.splitlines()) == 1
    assert "z-both.pt: train logits are 3 examples x 5 classes but" in err
    assert "(a file without logits_train has no train split)" in err


def test_a_single_split_store_appended_to(tmp_path):
    labels_test = np.arange(12) % 10
    files = make_published_tree(tmp_path / "logs", np.zeros(0, dtype=np.int64), labels_test,
                                n_files=4, codes=(CODE_A,), train=False)
    np.savez(tmp_path / "labels.npz", labels_train=np.zeros(7, dtype=np.int64),
             labels_test=labels_test)
    first, rest = files[:2], files[2:]
    code, _, err = run_cli("ingest", *first, "--store", tmp_path / "st", "-q")
    assert code == 0, err
    code, _, err = run_cli("ingest", *rest, "--store", tmp_path / "st", "-q")
    assert code == 0, err
    code, out, err = run_cli("info", tmp_path / "st", "--json")
    info = json.loads(out)
    assert info["n_models"] == 4 and info["splits"] == {"train": 0, "test": 12}
    code, out, _ = run_cli("info", tmp_path / "st")
    assert "one split only (no train split)" in out
    a = run_cli("evaluate", tmp_path / "st", "--labels", tmp_path / "labels.npz", "--k", "1",
                "--weighted-k", "4", "--json")
    b = run_cli("evaluate", *files, "--labels", tmp_path / "labels.npz", "--k", "1",
                "--weighted-k", "4", "--json")
    assert a[0] == 0 and b[0] == 0, (a[2], b[2])
    got, want = json.loads(a[1]), json.loads(b[1])
    for name in ("single_model_accuracy", "ensemble_accuracy", "knn_accuracy",
                 "weighted_accuracy"):
        assert got[name] == want[name], name
    # a file with a train split does not fit this store
    both = save_pt(tmp_path / "both.pt", torch.zeros(1, 5, 10), torch.zeros(1, 12, 10))
    code, _, err = run_cli("ingest", both, "--store", tmp_path / "st")
    assert code == 2 and "5 train examples but the store" in err and "has 0" in err


def test_label_issues_on_a_test_only_source_says_it_needs_the_train_split(tmp_path):
    """Labels given for the test split: the refusal names the missing split, not the labels."""
    from conftest import make_ensemble, run_cli

    ens = make_ensemble()
    torch.save({"logits": ens.test}, tmp_path / "t.pt")
    np.savez(tmp_path / "l.npz", labels_train=ens.labels_train.numpy(),
             labels_test=ens.labels_test.numpy())
    for split in ("test", "train"):
        code, _, err = run_cli("label-issues", tmp_path / "t.pt", "--labels", tmp_path / "l.npz",
                               "--split", split, "--k", "3")
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "label-issues needs a train split" in lines[0], err


def test_the_library_says_the_train_split_is_empty(tmp_path):
    """A test-only source opened with labels for both splits: evaluate, sweep and
    KernelKNN.fit name the empty train split, not missing labels or 'k between 1 and 0'."""
    import ensemble_kernel as ek

    ens = make_ensemble()
    torch.save({"logits": ens.test}, tmp_path / "t.pt")
    np.savez(tmp_path / "l.npz", labels_train=ens.labels_train.numpy(),
             labels_test=ens.labels_test.numpy())
    runs = ek.open_runs(tmp_path / "t.pt", labels=tmp_path / "l.npz")
    for call in (lambda: ek.evaluate(runs.train, runs.test, runs.labels_train, runs.labels_test),
                 lambda: ek.sweep(runs.train, runs.test, runs.labels_train, runs.labels_test),
                 lambda: ek.KernelKNN(k=3).fit(runs.train, runs.labels_train)):
        with pytest.raises(ek.InputError, match="needs a train split, but it is empty"):
            call()
