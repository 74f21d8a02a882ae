"""The views: planted near-duplicates rank first, failures only differ in label, rank errors."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ensemble_kernel.core._engine import _top_k_neighbors
from ensemble_kernel.cli import app
from ensemble_kernel.errors import InputError
from ensemble_kernel.analysis._explain import (compare_neighbors, failures, near_duplicates, parse_ranks,
                                     similar_pairs)

from conftest import make_ensemble, save_labels, save_pt

PLANTED = [(3, 17), (11, 64), (25, 5), (30, 99)]  # (test index, train index)


def planted_ensemble(seed=0):
    ens = make_ensemble(seed=seed, n_models=16, n_train=200, n_test=60, noise=1.0)
    g = torch.Generator().manual_seed(seed + 1)
    for t, r in PLANTED:  # the same input seen twice: every run's outputs nearly equal
        ens.test[:, t] = ens.train[:, r] + 0.01 * torch.randn(16, 5, generator=g)
        ens.labels_test[t] = ens.labels_train[r]
    return ens


def test_planted_near_duplicates_rank_at_the_top():
    ens = planted_ensemble()
    found = _top_k_neighbors(ens.test, ens.train, 9, memory_budget=1 << 26)
    dups = near_duplicates(found, labels_train=ens.labels_train, labels_test=ens.labels_test,
                           n_models=16)
    top = {(p.test_index, p.train_index) for p in dups.pairs[:len(PLANTED)]}
    assert top == set(PLANTED)
    assert len(dups.pairs) >= len(PLANTED)  # the automatic threshold keeps them all
    assert "median" in dups.method and dups.top1_values.shape == (60,)
    assert dups.threshold < 15 / 16  # never above the largest possible kernel value
    given = near_duplicates(found, threshold=0.9, top=2)
    assert len(given.pairs) == 2 and given.method == "given: 0.9"


def test_failures_only_show_pairs_whose_labels_differ():
    ens = planted_ensemble(seed=2)
    ens.labels_test[:20] = (ens.labels_test[:20] + 1) % 5  # plenty of disagreements
    found = _top_k_neighbors(ens.test, ens.train, 9, memory_budget=1 << 26)
    got = failures(found, ens.labels_train, ens.labels_test, top=8, n_neighbors=9)
    assert len(got) == 8
    for f in got:
        assert f.pair.test_label != f.pair.train_label
        assert len(f.neighbor_indices) == 9 and f.neighbor_indices[0] == f.pair.train_index
    values = [f.pair.value for f in got]
    assert values == sorted(values, reverse=True)
    with pytest.raises(InputError, match="`n_neighbors`=12 needs neighbours computed with k >= 12"):
        failures(found, ens.labels_train, ens.labels_test, n_neighbors=12)


def test_ranks_are_half_open_and_checked():
    assert parse_ranks("600:648", 10_000) == slice(600, 648)
    assert parse_ranks(":5", 10) == slice(0, 5)
    for bad in ("5:3", "0:11", "-1:4", "x"):
        with pytest.raises(InputError, match="`ranks`"):
            parse_ranks(bad, 10)
    ens = make_ensemble(n_models=4)
    found = _top_k_neighbors(ens.test, ens.train, 1, memory_budget=1 << 26)
    pairs = similar_pairs(found, slice(2, 5))
    assert [p.rank for p in pairs] == [2, 3, 4]
    assert pairs[0].value >= pairs[1].value >= pairs[2].value


def test_compare_uses_cosine_on_features():
    ens = make_ensemble(n_models=4)
    found = _top_k_neighbors(ens.test, ens.train, 2, memory_budget=1 << 26)
    features_train = torch.eye(120)[:, :120]  # each train example its own direction
    features_test = features_train[:40] * 3  # test i points at train i
    comps = compare_neighbors(found, features_train, features_test, n_examples=5)
    for c in comps:
        assert c.features[0][0] == c.test_index and c.features[0][1] == pytest.approx(1.0)


def test_view_commands_write_files_and_refuse_bad_ranks(tmp_path):
    ens = planted_ensemble()
    src = save_pt(tmp_path / "r.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    np.savez(tmp_path / "inputs.npz", inputs_train=np.random.rand(200, 8, 8),
             inputs_test=np.random.rand(60, 8, 8))
    np.savez(tmp_path / "features.npz", features_train=np.random.rand(200, 6),
             features_test=np.random.rand(60, 6))
    runner = CliRunner()
    out = tmp_path / "views"
    common = [str(src), "--labels", str(labels), "--out", str(out), "-q"]
    assert runner.invoke(app, ["pairs", *common, "--ranks", "0:8", "--inputs",
                               str(tmp_path / "inputs.npz")]).exit_code == 0
    assert (out / "pairs.png").is_file() and len((out / "pairs.csv").read_text().splitlines()) == 9
    r = runner.invoke(app, ["duplicates", *common, "--json"])
    assert r.exit_code == 0
    assert {(p["test_index"], p["train_index"]) for p in json.loads(r.stdout)["pairs"][:4]} == set(PLANTED)
    assert (out / "duplicates_threshold.png").is_file() and (out / "duplicates.csv").is_file()
    assert runner.invoke(app, ["failures", *common]).exit_code == 0
    assert (out / "failures.csv").is_file()
    assert runner.invoke(app, ["compare", *common, "--features", str(tmp_path / "features.npz"),
                               "--inputs", str(tmp_path / "inputs.npz")]).exit_code == 0
    assert (out / "compare.png").is_file()
    bad = runner.invoke(app, ["pairs", *common, "--ranks", "50:70"])
    assert bad.exit_code == 2 and "--ranks 50:70 is outside the 60 test examples" in bad.stderr
    nofeat = runner.invoke(app, ["compare", *common])
    assert nofeat.exit_code == 2 and "compare needs features" in nofeat.stderr


@pytest.mark.parametrize("shape", [(4, 40), (4, 8, 8), (4, 8, 8, 1), (4, 32, 32, 3)])
def test_inputs_of_every_kind_are_drawn_at_a_visible_size(shape):
    from ensemble_kernel.report.grids import InputRenderer

    x = np.random.default_rng(0).random(shape).astype(np.float32)
    image = InputRenderer(x, x).draw("test", 2)
    assert image.size == (96, 96) and image.mode == "RGB"
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 2  # not a blank cell
    blank = InputRenderer(None, None)
    assert not blank.has_inputs and blank.draw("train", 5).size == (96, 96)


def test_feature_neighbors_do_not_depend_on_the_block_size():
    # Blocks of training rows bound the float64 copies; ties still go to the smaller index.
    from ensemble_kernel.analysis._explain import feature_neighbors

    g = torch.Generator().manual_seed(0)
    train = torch.randn(1000, 16, generator=g)
    test = torch.randn(50, 16, generator=g)
    train[500] = train[10]  # an exact tie
    test[3] = train[10]
    rows = torch.arange(50)
    whole = feature_neighbors(test, train, rows, 5)
    for block_bytes in (8 * 16 * 37, 8 * 16 * 999, 1):
        blocked = feature_neighbors(test, train, rows, 5, block_bytes=block_bytes)
        assert torch.equal(whole.indices, blocked.indices)
        assert torch.equal(whole.values, blocked.values)
    assert whole.indices[3, :2].tolist() == [10, 500]
