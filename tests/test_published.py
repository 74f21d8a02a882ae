"""The published CIFAR-10 runs end to end, on a miniature of their tree.

`make_published_tree` writes `<uuid>/log.pt` files with the five published keys
(`logits`, `logits_train`, `logits_tta`, `code`, `accs` as a tensor) and two training
configurations; `write_fake_cifar` writes a miniature of the CIFAR-10 python batches.
The labels command, --code, --test-key and the warnings are checked, and the numbers the
command line prints are compared with the library functions on the same runs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys

import numpy as np
import pytest
import torch

from ensemble_kernel.storage._cifar import read_cifar10_labels, safe_unpickle
from ensemble_kernel.storage._configs import code_hash
from ensemble_kernel.errors import InputError, RunFileError
from ensemble_kernel.analysis._evaluation import evaluate
from ensemble_kernel.storage._formats import open_runs, read_run_file

from conftest import CODE_A, CODE_B, make_published_tree, run_cli, write_fake_cifar

N_PER_BATCH = 6  # 30 train, 6 test examples


@pytest.fixture
def published(tmp_path):
    """A fake CIFAR tree, labels.npz made from it by the command, and a published tree
    of 6 runs whose logits follow those labels; codes alternate A, B."""
    labels_train, labels_test = write_fake_cifar(tmp_path / "data", n_per_batch=N_PER_BATCH)
    code, _, err = run_cli("labels", "cifar10", "--root", tmp_path / "data", "--out",
                           tmp_path / "labels.npz", "--reader", "pickle")
    assert code == 0, err
    files = make_published_tree(tmp_path / "logs", labels_train, labels_test, n_files=6)
    return tmp_path, files, labels_train, labels_test


# ---- labels cifar10 ---------------------------------------------------------------------

@pytest.mark.parametrize("py2", [True, False])
@pytest.mark.parametrize("at_batches", [False, True])
def test_labels_in_torchvision_order(tmp_path, py2, at_batches):
    """Train labels are data_batch_1..5 concatenated, test labels test_batch; ROOT may be
    torchvision's root or the batches folder itself; Python 2 pickles (as published) or
    a copy re-pickled by Python 3."""
    want_train, want_test = write_fake_cifar(tmp_path, n_per_batch=5, seed=3, py2=py2)
    root = tmp_path / "cifar-10-batches-py" if at_batches else tmp_path
    with pytest.warns(UserWarning, match=r"MD5 of data_batch_1, .*, test_batch is not that "
                      "of the published file"):
        found = read_cifar10_labels(root, reader="pickle")
    assert found.labels_train.dtype == np.int64 and found.labels_train.shape == (25,)
    np.testing.assert_array_equal(found.labels_train, want_train)
    np.testing.assert_array_equal(found.labels_test, want_test)
    assert found.class_names[0] == "airplane" and len(found.class_names) == 10


def test_labels_command_writes_npz_that_evaluate_reads(published):
    tmp, files, labels_train, labels_test = published
    with np.load(tmp / "labels.npz") as npz:
        np.testing.assert_array_equal(npz["labels_train"], labels_train)
        np.testing.assert_array_equal(npz["labels_test"], labels_test)
        assert list(npz["class_names"])[:2] == ["airplane", "automobile"]
        meta = json.loads(str(npz["meta"]))
        assert meta["reader"] == "pickle" and meta["root"] == str(tmp / "data")
    code, out, err = run_cli("evaluate", tmp / "logs", "--labels", tmp / "labels.npz",
                             "--code", code_hash(CODE_A)[:6], "--k", "1", "--weighted-k", "5")
    assert code == 0, err
    assert "ensemble accuracy (3 models)" in out


def test_the_unpickler_resolves_no_global(tmp_path):
    """A batch that would call os.system is refused before anything runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps({"labels": [1, 2], "x": Evil()}, protocol=2)
    with pytest.raises(InputError, match=r"evil: refusing to read it, .*global 'posix.system'"
                       if sys.platform != "win32" else "refusing"):
        safe_unpickle(data, "evil")
    assert not marker.exists()
    # builtins too: eval, getattr, anything; only the names of a NumPy array are known,
    # and they become inert placeholders (NumPy's own code is never called).
    with pytest.raises(InputError, match="global 'builtins.eval'"):
        safe_unpickle(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "evil")
    placeholder = safe_unpickle(pickle.dumps(np.arange(3), protocol=2), "array")
    assert not isinstance(placeholder, np.ndarray)


@pytest.mark.parametrize("content,match", [
    (pickle.dumps({"labels": [1, "2"]}, protocol=2), r"a list of integer 'labels'"),
    (pickle.dumps({"data": [1]}, protocol=2), r"got dict with keys \['data'\]"),
    (pickle.dumps([1, 2], protocol=2), "got list"),
    (pickle.dumps({"labels": [1, 10]}, protocol=2), "labels must lie in 0..9, .* 1 to 10"),
    (b"\x80\x02}q\x00(X", "truncated or damaged"),
])
def test_a_bad_batch_is_one_line_naming_it(tmp_path, content, match):
    write_fake_cifar(tmp_path, n_per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(content)
    code, _, err = run_cli("labels", "cifar10", "--root", tmp_path, "--out", tmp_path / "l.npz",
                           "--reader", "pickle")
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1, err
    assert "data_batch_3" in lines[0] and __import__("re").search(match, lines[0]), err
    assert not (tmp_path / "l.npz").exists()


def test_a_missing_batch_names_it_and_where_to_get_the_files(tmp_path):
    write_fake_cifar(tmp_path, n_per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(InputError, match=r"lacks test_batch\); download cifar-10-python.tar.gz"):
        read_cifar10_labels(tmp_path, reader="pickle")
    with pytest.raises(InputError, match=r"--root .*nowhere: no such directory"):
        read_cifar10_labels(tmp_path / "nowhere", reader="pickle")


def test_torchvision_reader_names_the_extra_when_missing(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, n_per_batch=2)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    code, _, err = run_cli("labels", "cifar10", "--root", tmp_path, "--out", tmp_path / "l.npz",
                           "--reader", "torchvision")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "pip install 'ensemble-kernel[cifar]'" in err and "--reader pickle" in err
    # auto falls back to the built-in reader
    code, _, err = run_cli("labels", "cifar10", "--root", tmp_path, "--out", tmp_path / "l.npz")
    assert code == 0 and "pickle reader" in err, err


# ---- the published run files --------------------------------------------------------------

def test_published_files_load_safely_with_all_five_keys(published):
    _, files, _, _ = published
    run = read_run_file(files[0])
    assert run.code == CODE_A and run.code_sha256 == hashlib.sha256(CODE_A.encode()).hexdigest()
    assert run.train.dtype == torch.float16 and run.train.shape == (1, 30, 10)
    tta = read_run_file(files[0], test_key="logits_tta")
    assert torch.equal(tta.test[0], torch.load(files[0], weights_only=True)["logits_tta"])
    assert not torch.equal(tta.test, run.test)


def test_mixed_codes_warn_once_and_code_selects_one(published):
    tmp, files, _, _ = published
    with pytest.warns(UserWarning) as caught:
        runset = open_runs([tmp / "logs"])
    mixed = [w for w in caught if "training configurations" in str(w.message)]
    assert len(mixed) == 1
    a, b = code_hash(CODE_A)[:12], code_hash(CODE_B)[:12]
    assert f"{a} (3 runs)" in str(mixed[0].message) and f"{b} (3 runs)" in str(mixed[0].message)
    assert runset.n_models == 6
    only_b = open_runs([tmp / "logs"], code=b[:4].upper())  # any case
    assert only_b.n_models == 3 and set(only_b.codes) == {code_hash(CODE_B)}
    # the runs of B, in lexicographic order of their paths
    want = [f for f in sorted(files, key=lambda p: p.parent.name)
            if read_run_file(f).code == CODE_B]
    assert list(only_b.sources) == [str(f) for f in want]
    stacked = torch.stack([torch.load(f, weights_only=True)["logits"] for f in want])
    assert torch.equal(only_b.test.read(slice(0, 3), slice(0, 6)), stacked)


def _codes_sharing_a_prefix():
    """Two code strings whose sha256 start with the same hex digit (found, not assumed)."""
    first = {}
    for i in range(100):
        text = f"# config {i}\n"
        digit = code_hash(text)[0]
        if digit in first:
            return first[digit], text, digit
        first[digit] = text
    raise AssertionError("17 strings always share a first digit")


def test_ambiguous_and_unknown_prefixes_list_the_choices(tmp_path):
    one, two, digit = _codes_sharing_a_prefix()
    labels_train, labels_test = np.arange(8) % 10, np.arange(4) % 10
    make_published_tree(tmp_path / "logs", labels_train, labels_test, n_files=4,
                        codes=(one, two))
    with pytest.raises(InputError, match=rf"--code {digit} is ambiguous .*: it matches "
                       rf"{code_hash(one)[:12]} \(2 runs\), {code_hash(two)[:12]} \(2 runs\); "
                       "pass more digits"):
        open_runs([tmp_path / "logs"], code=digit)
    unknown = next(d for d in "0123456789abcdef" if not code_hash(one).startswith(d)
                   and not code_hash(two).startswith(d))
    with pytest.raises(InputError, match=rf"--code {unknown} matches none .*"
                       rf"{code_hash(one)[:12]} \(2 runs\).*pass one of these"):
        open_runs([tmp_path / "logs"], code=unknown)
    with pytest.raises(InputError, match=r"--code takes the first hex digits .*got 'g1'"):
        open_runs([tmp_path / "logs"], code="g1")
    # One full hash is never ambiguous.
    assert open_runs([tmp_path / "logs"], code=code_hash(two)).n_models == 2


def test_a_file_lacking_the_test_key_names_the_file_and_its_keys(published):
    tmp, files, _, _ = published
    obj = torch.load(files[2], weights_only=True)
    del obj["logits_tta"]
    torch.save(obj, files[2])
    with pytest.raises(RunFileError, match=rf"{files[2]}: --test-key logits_tta: no such array "
                       r"in this file; keys found: \['accs', 'code', 'logits', 'logits_train'\]"):
        open_runs([tmp / "logs"], test_key="logits_tta")
    code, _, err = run_cli("evaluate", tmp / "logs", "--labels", tmp / "labels.npz",
                           "--test-key", "logits_tta", "--k", "1", "--weighted-k", "5")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "--test-key logits_tta: no such array" in lines[0]


@pytest.mark.parametrize("test_key", [None, "logits_tta"])
def test_cli_gives_the_library_numbers_on_the_published_tree(published, test_key):
    """evaluate and neighbors through the command line == the library on the same runs."""
    tmp, _, labels_train, labels_test = published
    prefix = code_hash(CODE_A)[:5]
    key = ["--test-key", test_key] if test_key else []
    code, out, err = run_cli("evaluate", tmp / "logs", "--labels", tmp / "labels.npz",
                             "--code", prefix, "--k", "3", "--weighted-k", "7", "--json", *key)
    assert code == 0, err
    assert "training configurations" not in err  # one configuration chosen: no warning
    got = json.loads(out)
    runset = open_runs([tmp / "logs"], labels=tmp / "labels.npz", code=prefix,
                       test_key=test_key)
    want = evaluate(runset.train, runset.test, runset.labels_train, runset.labels_test, k=3,
                    weighted_k=7)
    assert runset.n_models == 3 and got["n_models"] == 3
    for name in ("single_model_accuracy", "ensemble_accuracy", "knn_accuracy",
                 "weighted_accuracy"):
        assert got[name] == getattr(want, name), name
    # the single-model accuracies are those of the chosen split
    key_name = test_key or "logits"
    chosen = [torch.load(f, weights_only=True) for f in runset.sources]
    singles = [float((c[key_name].float().argmax(-1) == torch.as_tensor(labels_test))
                     .double().mean()) for c in chosen]
    assert got["single_model_accuracy"] == pytest.approx(np.mean(singles), abs=1e-12)

    code, _, err = run_cli("neighbors", tmp / "logs", "--code", prefix, "--k", "4",
                           "--out", tmp / "n.npz", "-q", *key)
    assert code == 0, err
    from ensemble_kernel import top_k_neighbors
    found = top_k_neighbors(runset.train, runset.test, 4, precision="exact")
    with np.load(tmp / "n.npz") as f:
        np.testing.assert_array_equal(f["indices"], found.indices.numpy())
        np.testing.assert_array_equal(f["values"], found.values.numpy())


def test_info_lists_codes_and_warns_on_a_mixed_store(published):
    tmp, _, _, _ = published
    code, _, err = run_cli("ingest", tmp / "logs", "--store", tmp / "st", "--labels",
                           tmp / "labels.npz", "-q")
    assert code == 0, err
    warnings_ = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "mixes 2 training configurations" in warnings_[0], err
    code, out, err = run_cli("info", tmp / "st", "--json")
    assert code == 0, err
    assert json.loads(out)["codes"] == [{"code_sha256": code_hash(c), "n_runs": 3}
                                        for c in sorted((CODE_A, CODE_B),
                                                        key=lambda c: _first_run(tmp, c))]
    assert "warning: " in err and "mixes 2 training configurations" in err
    code, out, _ = run_cli("info", tmp / "st")
    assert f"{code_hash(CODE_A)[:12]} (3 runs)" in out and "--code PREFIX" in out
    # --code on the store takes the runs of that configuration's records (not contiguous)
    code, out, err = run_cli("evaluate", tmp / "st", "--code", code_hash(CODE_B)[:3],
                             "--k", "1", "--weighted-k", "5", "--json")
    assert code == 0, err
    files = open_runs([tmp / "logs"], labels=tmp / "labels.npz", code=code_hash(CODE_B)[:3])
    want = evaluate(files.train, files.test, files.labels_train, files.labels_test, k=1,
                    weighted_k=5)
    got = json.loads(out)
    assert got["n_models"] == 3 and got["knn_accuracy"] == want.knn_accuracy
    # float16 in the files and the store: the same logits, the same numbers
    assert got["weighted_accuracy"] == want.weighted_accuracy


def _first_run(tmp, code_text):
    files = sorted((tmp / "logs").rglob("log.pt"), key=lambda p: p.parent.name)
    return next(i for i, f in enumerate(files) if read_run_file(f).code == code_text)


def test_ingest_code_takes_one_configuration(published):
    tmp, _, _, _ = published
    code, _, err = run_cli("ingest", tmp / "logs", "--store", tmp / "st", "--code",
                           code_hash(CODE_A)[:8], "--test-key", "logits_tta", "-q")
    assert code == 0, err
    assert "training configurations" not in err
    code, out, _ = run_cli("info", tmp / "st", "--json")
    assert json.loads(out)["codes"] == [{"code_sha256": code_hash(CODE_A), "n_runs": 3}]
    # appending the other configuration warns (the store's code folder is read, no record)
    code, _, err = run_cli("ingest", tmp / "logs", "--store", tmp / "st", "-q",
                           "--test-key", "logits_tta")
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warned) == 1, err
    assert "logs with the store mixes 2 training configurations" in warned[0]


def test_a_refused_labels_command_leaves_the_users_file(tmp_path):
    """Checked before any work, written atomically: a user's file survives byte for byte."""
    write_fake_cifar(tmp_path, n_per_batch=2)
    mine = tmp_path / "labels.npz"
    mine.write_bytes(b"the user's own file")
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(b"\x80\x02}q\x00(X")
    code, _, err = run_cli("labels", "cifar10", "--root", tmp_path, "--out", mine,
                           "--reader", "pickle")
    assert code == 2 and "data_batch_5" in err
    assert mine.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "labels.npz"]
    (tmp_path / "folder.npz").mkdir()
    code, _, err = run_cli("labels", "cifar10", "--root", tmp_path, "--out",
                           tmp_path / "folder.npz", "--reader", "pickle")
    assert code == 2 and "is a folder; name a file" in err


def test_info_on_the_run_files_lists_the_configurations(published):
    tmp, files, _, _ = published
    code, out, err = run_cli("info", tmp / "logs", "--json", "--runs")
    assert code == 0, err
    got = json.loads(out)
    assert got["n_models"] == 6 and got["splits"] == {"train": 30, "test": 6}
    assert got["dtype"] == "float16" and got["has_labels"] is False
    order = sorted(files, key=lambda p: p.parent.name)
    first = read_run_file(order[0]).code
    second = CODE_B if first == CODE_A else CODE_A
    assert got["codes"] == [{"code_sha256": code_hash(first), "n_runs": 3},
                            {"code_sha256": code_hash(second), "n_runs": 3}]
    assert [r["source"] for r in got["records"]] == [str(f) for f in order]
    assert [r["runs"] for r in got["records"]] == [[i, i + 1] for i in range(6)]
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "mixes 2 training configurations" in warned[0]
    code, out, err = run_cli("info", tmp / "logs", "--runs")
    assert f"training code (sha256, select with --code PREFIX): {code_hash(first)[:12]} " \
        f"(3 runs), {code_hash(second)[:12]} (3 runs)" in out
    assert f"code {code_hash(first)[:12]}" in out.splitlines()[3]


def test_torchvision_reader_never_downloads(tmp_path, monkeypatch):
    """With torchvision present (a stand-in here), it is called with download=False on the
    folder that holds cifar-10-batches-py/, and its targets are the labels."""
    import types

    calls = []

    class CIFAR10:
        classes = ["c%d" % i for i in range(10)]

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            self.targets = [1, 2, 3] if train else [4]

    fake = types.ModuleType("torchvision")
    fake.datasets = types.ModuleType("torchvision.datasets")
    fake.datasets.CIFAR10 = CIFAR10
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake.datasets)
    write_fake_cifar(tmp_path, n_per_batch=2)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        found = read_cifar10_labels(root)  # auto: torchvision, since it imports
        assert found.reader == "torchvision"
        assert found.labels_train.tolist() == [1, 2, 3] and found.labels_test.tolist() == [4]
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)] * 2
    (tmp_path / "cifar-10-batches-py").rename(tmp_path / "batches")
    with pytest.raises(InputError, match="torchvision reads the batches from a folder named "
                       r"cifar-10-batches-py/, and these are in batches/: .*--reader pickle"):
        read_cifar10_labels(tmp_path / "batches", reader="torchvision")
    with pytest.warns(UserWarning, match="MD5"):
        found = read_cifar10_labels(tmp_path / "batches", reader="pickle")
    assert found.labels_train.shape == (10,)


HINT = "ensemble-kernel labels cifar10 --root DIR --out labels.npz"


@pytest.mark.parametrize("command,args", [
    ("evaluate", ["--weighted-k", "5"]),
    ("evaluate", ["--select"]),
    ("predict", ["--out", "{tmp}/p.csv"]),
    ("failures", ["--out", "{tmp}/v", "--neighbors", "3"]),
    ("sweep", ["--out", "{tmp}/s"]),
])
def test_the_missing_labels_error_points_to_the_labels_command(published, command, args):
    tmp, _, _, _ = published
    code, _, err = run_cli(command, tmp / "logs", "--code", code_hash(CODE_A)[:4],
                           *[a.format(tmp=tmp) for a in args])
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "labels" in lines[0] and HINT in lines[0], err


@pytest.mark.parametrize("command,args", [
    ("duplicates", ["--out", "{tmp}/v"]),
    ("pairs", ["--out", "{tmp}/v"]),
    ("neighbors", ["--out", "{tmp}/n.npz", "--k", "2"]),
    ("evaluate", ["--labels", "{tmp}/labels.npz", "--weighted-k", "5"]),
])
def test_every_command_warns_once_on_mixed_codes(published, command, args):
    tmp, _, _, _ = published
    code, _, err = run_cli(command, tmp / "logs", *[a.format(tmp=tmp) for a in args])
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "mixes 2 training configurations" in warned[0], err
    assert "pass --code PREFIX to use one" in warned[0]


def test_label_issues_takes_code_and_test_key_like_the_library(published):
    """label-issues reads SRC like the other commands: --code and --test-key reach it, and
    its missing-labels error points to the labels command."""
    from ensemble_kernel import label_issues

    tmp, _, _, _ = published
    prefix = code_hash(CODE_B)[:6]
    code, out, err = run_cli("label-issues", tmp / "logs", "--labels", tmp / "labels.npz",
                             "--code", prefix, "--test-key", "logits_tta", "--k", "5",
                             "--json")
    assert code == 0, err
    assert "training configurations" not in err
    got = json.loads(out)
    runset = open_runs([tmp / "logs"], labels=tmp / "labels.npz", code=prefix,
                       test_key="logits_tta")
    want = label_issues(runset.train, runset.test, runset.labels_train, runset.labels_test,
                        k=5)
    assert [r["index"] for r in got["rows"]] == want.order.tolist()
    assert got["meta"]["options"]["code"] == prefix
    assert got["meta"]["options"]["test_key"] == "logits_tta"
    code, _, err = run_cli("label-issues", tmp / "logs", "--code", prefix)
    assert code == 2 and len(err.splitlines()) == 1 and HINT in err, err
