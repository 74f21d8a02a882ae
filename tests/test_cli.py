"""The commands end to end, in a subprocess-free runner, on every file layout."""

import json

import numpy as np
import pytest
import torch

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.cli import parse_size
from ensemble_kernel.errors import InputError

from conftest import assert_same_neighbors, make_ensemble, run_cli, save_labels, save_pt

run = run_cli


@pytest.fixture
def ens():
    return make_ensemble(n_models=6, n_train=150, n_test=50)


def layouts(tmp_path, ens):
    """The same six runs as: a batched .pt, a directory of single runs, an .npz."""
    batch = save_pt(tmp_path / "batch.pt", ens.train, ens.test)
    for i in range(6):
        save_pt(tmp_path / "dir" / f"run{i:02d}" / "log.pt", ens.train[i], ens.test[i])
    np.savez(tmp_path / "runs.npz", logits_train=ens.train.numpy(), logits_test=ens.test.numpy())
    return [batch, tmp_path / "dir", tmp_path / "runs.npz"]


def test_evaluate_json_on_every_layout(tmp_path, ens):
    labels = save_labels(tmp_path / "labels.npz", ens)
    outputs = []
    for src in layouts(tmp_path, ens):
        code, out, _ = run("evaluate", src, "--labels", labels, "--json", "--k", 3)
        assert code == 0
        outputs.append(json.loads(out))
    keys = {"n_models", "k", "single_model_accuracy", "ensemble_accuracy", "knn_accuracy",
            "weighted_accuracy", "options"}
    assert keys <= set(outputs[0])
    for o in outputs[1:]:
        assert {k: o[k] for k in keys - {"options"}} == {k: outputs[0][k] for k in keys - {"options"}}
    o = outputs[0]
    assert o["n_models"] == 6 and 0 <= o["knn_accuracy"] <= 1
    # The numbers are the definition's: recompute kernel k-NN by hand from the dense twin.
    kernel = dense_kernel(ens.test, ens.train)
    top = kernel.topk(3, dim=1).indices
    votes = torch.nn.functional.one_hot(ens.labels_train[top], 5).sum(1)
    assert o["knn_accuracy"] == pytest.approx(float((votes.argmax(1) == ens.labels_test).double().mean()))
    ensemble = ens.test.double().mean(0).argmax(1)
    assert o["ensemble_accuracy"] == pytest.approx(float((ensemble == ens.labels_test).double().mean()))


def test_evaluate_text_runs_and_select(tmp_path, ens):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test, labels_train=ens.labels_train,
                  labels_test=ens.labels_test)
    code, out, _ = run("evaluate", src, "--runs", "2:6", "--precision", "fast")
    assert code == 0
    assert "ensemble accuracy (4 models)" in out and "kernel accuracy (k-NN w/ k=3)" in out
    code, out, _ = run("evaluate", src, "--select", "--json", "--memory-budget", "64MiB")
    assert code == 0
    selection = json.loads(out)["selection"]
    assert selection["vote"] in ("knn", "weighted") and 0 <= selection["leave_one_out_accuracy"] <= 1


def test_neighbors_file(tmp_path, ens):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    out = tmp_path / "out" / "n.npz"
    code, _, _ = run("neighbors", src, "--out", out, "--k", 7, "--memory-budget", "32MiB", "-q")
    assert code == 0
    with np.load(out) as f:
        assert f["indices"].dtype == np.int64 and f["values"].dtype == np.float32
        assert_same_neighbors(f["indices"], f["values"], dense_kernel(ens.test, ens.train), 7)
        meta = json.loads(str(f["meta"]))
    assert meta["n_models"] == 6 and meta["options"]["k"] == 7 and "ensemble_kernel_version" in meta


def test_predict_csv_and_npz(tmp_path, ens):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    code, _, _ = run("predict", src, "--labels", labels, "--out", tmp_path / "p.csv", "-q")
    assert code == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "index,prediction,margin,score_0,score_1,score_2,score_3,score_4"
    assert len(lines) == 51
    code, _, _ = run("predict", src, "--labels", labels, "--weighted", "--out", tmp_path / "p.npz", "-q")
    assert code == 0
    with np.load(tmp_path / "p.npz") as f:
        assert f["scores"].shape == (50, 5)
        assert (f["prediction"] == f["scores"].argmax(1)).all()
        top2 = np.sort(f["scores"], axis=1)[:, -2:]
        np.testing.assert_allclose(f["margin"], top2[:, 1] - top2[:, 0], rtol=1e-6)


@pytest.mark.parametrize("args,match", [
    (["evaluate", "{src}"], "no train labels: .* pass --labels"),
    (["evaluate", "{src}", "--labels", "{labels}", "--k", "151"], "k must be between 1 and 150"),
    (["evaluate", "{src}", "--labels", "{labels}", "--runs", "1"], "at least 2 runs, got 1"),
    (["evaluate", "{src}", "--labels", "{labels}", "--runs", "3:99"], "--runs 3:99 selects no valid range"),
    (["evaluate", "{src}", "--labels", "{labels}", "--runs", "x"], "--runs takes N"),
    (["evaluate", "{src}", "--memory-budget", "2 lots"], "--memory-budget takes a size"),
    (["evaluate", "{src}", "--precision", "half"], "--precision takes auto, exact or fast"),
    (["neighbors", "{src}", "--out", "{tmp}/n.csv"], "--out must name an .npz file"),
    (["predict", "{src}", "--out", "{tmp}/p.txt"], r"--out must end in .csv or .npz"),
    (["evaluate", "{tmp}/nothing"], "nothing: no such file or directory"),
])
def test_user_errors_are_one_line_with_exit_2(tmp_path, ens, args, match):
    src = save_pt(tmp_path / "b.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    args = [a.format(src=src, labels=labels, tmp=tmp_path) for a in args]
    code, out, stderr = run(*args)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    import re
    assert re.search(match, stderr), stderr
    assert "Traceback" not in stderr


def test_nan_in_a_run_file_names_the_file_run_and_example(tmp_path, ens):
    test = ens.test.clone()
    test[4, 9, 2] = float("nan")
    save_pt(tmp_path / "d" / "a.pt", ens.train[:3], ens.test[:3])
    save_pt(tmp_path / "d" / "b.pt", ens.train[3:], test[3:])
    code, _, stderr = run("neighbors", tmp_path / "d", "--out", tmp_path / "n.npz", "-q")
    assert code == 2
    assert re_search(r"run 4: run 1 \(.*b.pt, run 1 in it\): example 9, class 2 is nan", stderr)
    assert not (tmp_path / "n.npz").exists()


def re_search(pattern, text):
    import re
    return re.search(pattern, text) is not None


def test_bad_usage_exits_2():
    code, _, _ = run("evaluate")
    assert code == 2
    code, _, _ = run("evaluate", "x", "--k", "three")
    assert code == 2


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(InputError):
        parse_size("-1GB")
