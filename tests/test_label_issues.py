"""Issue 11: label issues from the runs (`labelissues`, `label-issues`).

The plain twin is the definition written out on the dense float64 kernel: a Python loop
over each row's k largest values. The engine's neighbours agree with it up to float32
rounding (DESIGN §1), and the vote is a sum of non-negative weights, so the scores agree
to float32's relative accuracy times k (a bound, not an observation); ties in K are
avoided in the data so that the same neighbours means the same indices.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.errors import InputError
from ensemble_kernel.analysis._label_issues import (ensemble_probabilities, knn_graph, label_issues,
                                         vote_probabilities)
from ensemble_kernel.core._neighbors import Neighbors

from conftest import Ensemble, make_ensemble, run_cli, save_labels, save_pt


def _flip(labels: torch.Tensor, fraction: float, n_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    flipped = labels.clone()
    shift = torch.randint(1, n_classes, (len(chosen),), generator=g)
    flipped[chosen] = (labels[chosen] + shift) % n_classes
    return flipped, flipped != labels


def _clustered(seed: int, n_models: int, n_train: int, n_test: int, n_classes: int,
               noise: float = 1.0):
    """Logits whose variation across runs is shared within a class (each run treats
    each class its own way), as trained networks' are: the kernel sees classes. (Run noise
    alone, as `make_ensemble` draws it, leaves the kernel nothing to see.)"""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(n_classes, n_classes, generator=g) * 3
    run_effect = torch.randn(n_models, n_classes, n_classes, generator=g)  # (run, class, out)

    def split(n):
        labels = torch.randint(0, n_classes, (n,), generator=g)
        runs = (prototypes[labels][None] + run_effect[:, labels]
                + noise * torch.randn(n_models, n, n_classes, generator=g))
        return runs, labels

    (train, ytr), (test, yte) = split(n_train), split(n_test)
    return Ensemble(train, test, ytr, yte)


def _average_precision(order: torch.Tensor, positive: torch.Tensor) -> float:
    hits = positive[order].double()
    precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


# ---- the vote, by hand --------------------------------------------------------------------

def test_vote_probabilities_by_hand():
    # Row 0: K = 0.75 (label 1), 0.5 (label 0), -0.5 (label 0, clipped to weight 0),
    # power 2 (values exact in float32). Row 1: every K <= 0: each neighbour counts the same.
    found = Neighbors(torch.tensor([[0, 1, 2], [2, 1, 0]]),
                      torch.tensor([[0.75, 0.5, -0.5], [0.0, -0.25, -0.5]]))
    p = vote_probabilities(found, torch.tensor([1, 0, 0]), 3, power=2)
    want = torch.tensor([[0.25 / 0.8125, 0.5625 / 0.8125, 0.0], [2 / 3, 1 / 3, 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("power", [0, -1, 1.5, True])
def test_power_must_be_a_positive_integer(power):
    found = Neighbors(torch.tensor([[0]]), torch.tensor([[0.5]]))
    with pytest.raises(InputError, match="power must be a positive integer"):
        vote_probabilities(found, torch.tensor([0]), 2, power=power)


def test_equal_scores_rank_by_smaller_index_and_the_threshold_needs_a_majority():
    # Four train examples: two of class 0, two of class 1, at exactly equal distances.
    # Test examples 0 and 2 are identical (equal scores); example 1 is a half-half tie.
    train = torch.zeros(3, 4, 2)
    train[:, :, 0] = torch.tensor([[1., 1, -1, -1], [2, 2, -2, -2], [0, 0, 0.5, 0.5]])
    test = torch.stack([train[:, 0], train[:, 0] * 0 + train[:, 2], train[:, 0]], dim=1)
    labels_train = torch.tensor([0, 0, 1, 1])
    found = label_issues(train, test, labels_train, torch.tensor([1, 1, 1]), k=2, power=1)
    assert found.scores[0] == found.scores[2]
    assert found.order.tolist().index(0) < found.order.tolist().index(2)
    assert bool(found.flagged[0]) and not bool(found.flagged[1])  # 1: its own label wins


# ---- the plain twin -----------------------------------------------------------------------

def _plain_scores(kernel: torch.Tensor, labels_train, given, n_classes, k, power):
    """The definition, one row at a time, on the dense float64 kernel."""
    scores = []
    for row, g in zip(kernel, given.tolist()):
        best = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k]
        weights = [max(float(row[j]), 0.0) ** power for j in best]
        if sum(weights) == 0:
            weights = [1.0] * k
        share = sum(w for w, j in zip(weights, best) if int(labels_train[j]) == g)
        scores.append(1 - share / sum(weights))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("split,k,power", [("test", 1, 1), ("test", 7, 4), ("train", 5, 2),
                                           ("train", 29, 3)])
def test_scores_equal_the_definition(split, k, power):
    ens = make_ensemble(seed=3, n_models=5, n_train=30, n_test=12, n_classes=4)
    found = label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, split=split,
                         k=k, power=power, score="kernel")
    queries = ens.test if split == "test" else ens.train
    kernel = dense_kernel(queries, ens.train)
    if split == "train":
        kernel.fill_diagonal_(float("-inf"))
    given = ens.labels_test if split == "test" else ens.labels_train
    want = _plain_scores(kernel, ens.labels_train, given, 4, k, power)
    torch.testing.assert_close(found.scores, want, rtol=0, atol=1e-5 * k)
    assert (found.neighbors.indices != torch.arange(len(given))[:, None]).all() or split == "test"


def test_combined_score_averages_with_the_ensembles_probability():
    ens = make_ensemble(seed=4, n_models=5, n_train=30, n_test=12, n_classes=4)
    kernel = label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, k=5,
                          score="kernel")
    combined = label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, k=5,
                            score="combined")
    q = ens.test.double().softmax(dim=2).mean(dim=0)  # the plain mean of the runs' softmax
    torch.testing.assert_close(ensemble_probabilities(ens.test), q)
    want = 1 - ((1 - kernel.scores) + q[torch.arange(12), ens.labels_test]) / 2
    torch.testing.assert_close(combined.scores, want)


# ---- planted flips: the ranking must find them ----------------------------------------------

@pytest.mark.parametrize("score", ["kernel", "combined"])
@pytest.mark.parametrize("split", ["test", "train"])
def test_planted_flips_rank_above_clean_examples(split, score):
    """10% of one split's labels flipped; a random ranking's expected AP is 0.1, so a
    score that does not use the neighbours' labels fails the AP bound by far."""
    ens = _clustered(seed=7, n_models=8, n_train=200, n_test=200, n_classes=5)
    clean = ens.labels_test if split == "test" else ens.labels_train
    given, is_flipped = _flip(clean, 0.1, 5, seed=11)
    labels_train = given if split == "train" else ens.labels_train
    labels_test = given if split == "test" else ens.labels_test
    found = label_issues(ens.train, ens.test, labels_train, labels_test, split=split, k=10,
                         score=score)
    ap = _average_precision(found.order, is_flipped)
    assert ap > 0.8, ap  # random: 0.1 expected
    # every flipped example is among the flagged ones, and most flagged ones are flips
    assert bool(found.flagged[is_flipped].all())
    assert int((found.flagged & is_flipped).sum()) >= 0.7 * found.n_flagged


def test_train_audit_leaves_the_example_out():
    """An example's own entry is its nearest neighbour (K[a, a] is the largest): if it
    voted, a flipped training example would vote for its own wrong label."""
    ens = _clustered(seed=8, n_models=8, n_train=60, n_test=5, n_classes=3, noise=0.3)
    given = ens.labels_train.clone()
    given[0] = (given[0] + 1) % 3
    found = label_issues(ens.train, None, given, split="train", k=1, score="kernel")
    assert (found.neighbors.indices[:, 0] != torch.arange(60)).all()
    assert int(found.order[0]) == 0 and bool(found.flagged[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="valid"), "`split` takes test or train, got 'valid'"),
    (dict(split="train", k=30), r"`k` must be between 1 and 29 .*got 30: pass `k`=29"),
    (dict(split="test", k=31), r"`k` must be between 1 and 30 .*got 31"),
    (dict(split="test", labels_test=None), "auditing the test split needs test labels"),
    (dict(split="train", labels_train=None), "auditing the train split needs train labels"),
    (dict(score="vote"), "score takes kernel or combined, got 'vote'"),
])
def test_bad_input_is_one_clear_error(kwargs, match):
    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    args = {"labels_train": ens.labels_train, "labels_test": ens.labels_test, **kwargs}
    with pytest.raises(InputError, match=match) as caught:
        label_issues(ens.train, ens.test, **args)
    assert "--" not in str(caught.value)  # the library speaks of parameters, not options


def test_a_python_caller_reads_the_parameter_and_the_cli_its_option():
    from ensemble_kernel.cli.common import in_cli_words

    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    with pytest.raises(InputError) as caught:
        label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, k=0)
    assert caught.value.param == "k"
    assert str(caught.value).startswith("`k` must be between 1 and 30")
    assert in_cli_words(caught.value).startswith("--k must be between 1 and 30")
    assert in_cli_words(caught.value).endswith("pass --k 30 or less")


# ---- the k-NN graph for cleanlab ------------------------------------------------------------

def test_knn_graph_is_what_datalab_reads():
    ens = make_ensemble(seed=5, n_models=6, n_train=40, n_test=5, n_classes=4)
    graph = knn_graph(ens.train, k=6)
    assert graph.shape == (40, 40) and graph.format == "csr"
    assert (np.diff(graph.indptr) == 6).all()
    rows = np.repeat(np.arange(40), 6)
    assert (graph.indices != rows).all()  # no self entries
    d = graph.data.reshape(40, 6)
    assert (np.diff(d, axis=1) >= 0).all()  # sorted by distance, nearest first
    kernel = dense_kernel(ens.train, ens.train).numpy()
    want = np.sqrt(np.maximum(0, 2 * 5 / 6 - 2 * kernel[rows, graph.indices]))
    np.testing.assert_allclose(graph.data, want, atol=1e-5)
    # the documented meaning: Euclidean distance between normalised feature vectors
    x = ens.train.double().log_softmax(dim=2)
    z = (x - x.mean(0)) / x.std(0)
    features = z.permute(1, 0, 2).reshape(40, -1) / np.sqrt(6 * 4)  # (n, n_models * n_classes)
    euclid = (features[rows] - features[graph.indices]).norm(dim=1).numpy()
    np.testing.assert_allclose(graph.data, euclid, atol=1e-5)


def test_knn_graph_k_must_leave_the_example_out():
    ens = make_ensemble(n_models=4, n_train=10, n_test=3)
    with pytest.raises(InputError, match="k must be between 1 and 9 .*got 10"):
        knn_graph(ens.train, k=10)


def test_datalab_reads_the_exported_graph_and_probabilities():
    datalab = pytest.importorskip("cleanlab.datalab.datalab")
    ens = make_ensemble(seed=6, n_models=6, n_train=80, n_test=5, n_classes=4)
    given, is_flipped = _flip(ens.labels_train, 0.1, 4, seed=2)
    found = label_issues(ens.train, None, given, split="train", k=10)
    lab = datalab.Datalab(data={"label": given.numpy()}, label_name="label", verbosity=0)
    lab.find_issues(knn_graph=knn_graph(ens.train, k=10),
                    pred_probs=found.vote_probabilities.numpy(),
                    issue_types={"label": {}, "outlier": {}, "near_duplicate": {}})
    summary = lab.get_issue_summary()
    assert set(summary["issue_type"]) >= {"label", "outlier", "near_duplicate"}
    label = lab.get_issues("label")
    assert len(label) == 80
    # cleanlab, fed the kernel's probabilities, finds most of the planted flips
    assert label["is_label_issue"].to_numpy()[is_flipped.numpy()].mean() >= 0.5


# ---- the command --------------------------------------------------------------------------

@pytest.fixture
def planted(tmp_path):
    ens = make_ensemble(seed=9, n_models=6, n_train=60, n_test=30, n_classes=4)
    given, is_flipped = _flip(ens.labels_test, 0.2, 4, seed=3)
    ens.labels_test = given
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    return src, save_labels(tmp_path / "labels.npz", ens), ens, is_flipped


def test_command_writes_every_example_most_suspicious_first(tmp_path, planted):
    src, labels, ens, _ = planted
    out = tmp_path / "issues.csv"
    code, stdout, stderr = run_cli("label-issues", src, "--labels", labels, "--k", "5",
                                   "--out", out, "--top", "3", "-q")
    assert code == 0, stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    want = label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, k=5)
    assert [int(r["index"]) for r in rows] == want.order.tolist()
    assert [int(r["given_label"]) for r in rows] == want.given[want.order].tolist()
    assert [int(r["voted_label"]) for r in rows] == want.voted[want.order].tolist()
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert len(rows[0]["neighbors"].split()) == 5
    assert len(stdout.splitlines()) == 2 + 3  # summary, header, --top rows


def test_command_json_and_exports(tmp_path, planted):
    from scipy.sparse import load_npz

    src, labels, ens, _ = planted
    graph, probs = tmp_path / "g.npz", tmp_path / "p.npy"
    code, stdout, stderr = run_cli("label-issues", src, "--labels", labels, "--split", "train",
                                   "--k", "4", "--json", "--knn-graph", graph,
                                   "--probabilities", probs)
    assert code == 0, stderr
    out = json.loads(stdout)
    assert out["split"] == "train" and len(out["rows"]) == 60
    assert {"index", "score", "given_label", "voted_label"} <= set(out["rows"][0])
    assert out["meta"]["options"]["k"] == 4
    assert load_npz(graph).shape == (60, 60) and np.load(probs).shape == (60, 4)


@pytest.mark.parametrize("args,match", [
    (["--split", "valid"], "--split takes test or train, got 'valid'"),
    (["--split", "train", "--k", "60"], r"--k must be between 1 and 59 .*got 60"),
    (["--k", "61"], r"--k must be between 1 and 60 .*got 61"),
    (["--out", "{tmp}/x.txt"], r"--out must name a .csv file"),
    (["--knn-graph", "{tmp}/g.npz", "--k", "30"], r"--knn-graph needs --k at most 29"),
])
def test_command_refuses_bad_input_in_one_line(tmp_path, planted, args, match):
    src, labels, _, _ = planted
    code, _, stderr = run_cli("label-issues", src, "--labels", labels,
                              *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert match.split(" .*")[0].replace("\\", "") in stderr or __import__("re").search(
        match, stderr), stderr


def test_command_without_labels_for_the_split_says_how_to_fix(tmp_path, planted):
    _, _, ens, _ = planted
    src = save_pt(tmp_path / "bare.pt", ens.train, ens.test)
    code, _, stderr = run_cli("label-issues", src, "--split", "train")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "needs train labels" in stderr and "--labels FILE.npz" in stderr


# ---- the report's section -------------------------------------------------------------------

def test_report_section_shows_the_top_suspects_beside_their_neighbours(tmp_path):
    from ensemble_kernel import top_k_neighbors
    from ensemble_kernel.report.build import build_report
    from ensemble_kernel.report.grids import InputRenderer
    from ensemble_kernel.core._sources import ArraySource

    ens = _clustered(seed=12, n_models=6, n_train=60, n_test=30, n_classes=4)
    ens.labels_test, _ = _flip(ens.labels_test, 0.2, 4, seed=5)
    rng = np.random.default_rng(0)
    renderer = InputRenderer(rng.random((60, 40)), rng.random((30, 40)))
    found = top_k_neighbors(ens.train, ens.test, 20)
    out = tmp_path / "r.html"
    build_report(ArraySource(ens.train), ArraySource(ens.test), ens.labels_train,
                 ens.labels_test, found=found, out=out, source="s", renderer=renderer,
                 class_names=["a<b", "c", "d", "e"], ranks=slice(0, 12))
    html = out.read_text()
    assert "Label issues: test examples" in html and 'alt="label issues"' in html
    assert "a&lt;b" in html and "a<b" not in html
    rows = list(csv.reader(io.StringIO((tmp_path / "r_files" / "label_issues.csv").read_text())))
    want = label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, k=20)
    assert [int(r[1]) for r in rows[1:]] == want.order[:8].tolist()
    assert (tmp_path / "r_files" / "label_issues.png").is_file()


def test_label_issues_show_themselves_like_the_other_results():
    """LabelIssues prints as a table, renders HTML and has to_dict/to_pandas with the
    columns of label-issues --out (issue 10's result protocol)."""
    import ensemble_kernel as ek
    from conftest import make_ensemble

    ens = make_ensemble()
    found = ek.label_issues(ens.train, ens.test, ens.labels_train, ens.labels_test, k=5)
    text = repr(found)
    assert "flagged" in text and "given_label" in text and "voted_label" in text
    assert "<table>" in found._repr_html_()
    rows = found.to_dict()["rows"]
    assert [r["index"] for r in rows] == found.order.tolist()
    frame = found.to_pandas()
    assert list(frame.columns)[:4] == ["index", "score", "given_label", "voted_label"]
    assert len(frame) == ens.test.shape[1]
