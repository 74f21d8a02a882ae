"""Results that show themselves: repr, _repr_html_, to_dict, to_pandas, and the views' grids."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ensemble_kernel as ek

from conftest import make_ensemble


@pytest.fixture(scope="module")
def ens():
    return make_ensemble(seed=4, n_models=6, n_train=60, n_test=20, noise=2.0)


@pytest.fixture(scope="module")
def found(ens):
    return ek.top_k_neighbors(ens.train, ens.test, k=10)


def _images(html: str) -> list[Image.Image]:
    out = []
    for chunk in html.split('src="data:image/png;base64,')[1:]:
        out.append(Image.open(io.BytesIO(base64.b64decode(chunk.split('"', 1)[0]))))
    return out


def test_an_evaluation_prints_the_card_and_converts(ens):
    e = ek.evaluate(ens.train, ens.test, ens.labels_train, ens.labels_test, weighted_k=10)
    text = repr(e)
    for value in (e.single_model_accuracy, e.ensemble_accuracy, e.knn_accuracy,
                  e.weighted_accuracy):
        assert f"{value:.6g}" in text
    assert "kernel k-NN (k=3)" in text and "weighted vote (k=10, K**4)" in text
    table = e.to_pandas()
    assert list(table.columns) == ["method", "accuracy"] and len(table) == 4
    assert table["accuracy"].tolist()[2] == e.knn_accuracy
    assert json.loads(json.dumps(e.to_dict()))["rows"][1]["accuracy"] == e.ensemble_accuracy
    assert "<table>" in e._repr_html_()


def test_a_sweep_shows_rows_and_significance(ens):
    result = ek.sweep(ens.train.numpy(), ens.test.numpy(), ens.labels_train.numpy(),
                      ens.labels_test.numpy(), runs=[2, 6], ks=(1, 3), weighted=(10, 4))
    frame = result.to_pandas()
    assert len(frame) == len(result.rows) and set(frame["n_models"]) == {2, 6}
    d = json.loads(json.dumps(result.to_dict()))
    assert d["significance"]["mcnemar_p"] == result.significance.mcnemar_p
    assert "McNemar p" in repr(result) and "<table>" in result._repr_html_()


def test_neighbors_show_the_best_matches_and_convert_one_row_per_rank(found):
    frame = found.to_pandas()
    assert frame.shape == (20 * 10, 4)
    assert frame["index"].tolist() == found.indices.reshape(-1).tolist()
    assert frame["value"].tolist() == found.values.reshape(-1).tolist()
    first = f"{int(found.indices[0, 0])}:{float(found.values[0, 0]):.4f}"
    assert first in repr(found) and "20 queries x k=10" in repr(found)
    assert found.to_dict()["indices"] == found.indices.tolist()
    assert "... 0 more" not in repr(found)  # 20 rows: all shown


def test_long_tables_are_cut_in_repr_but_not_in_to_dict():
    ens = make_ensemble(n_train=40, n_test=33)
    found = ek.top_k_neighbors(ens.train, ens.test, k=3)
    assert "... 13 more rows" in repr(found)
    assert len(found.to_dict()["indices"]) == 33


def test_views_draw_the_inputs_when_known_and_tables_otherwise(ens, found):
    rng = np.random.default_rng(0)
    inputs = {"inputs_train": rng.random((60, 8, 8)), "inputs_test": rng.random((20, 8, 8))}
    names = ["zero", "one", "two", "<b>three</b>", "four"]
    for view in (ek.pairs(found, labels_train=ens.labels_train, labels_test=ens.labels_test,
                          ranks="0:6", class_names=names, **inputs),
                 ek.duplicates(found, threshold=-1.0, top=4, **inputs),
                 ek.failures(found, labels_train=ens.labels_train, labels_test=ens.labels_test,
                             top=3, n_neighbors=5, **inputs),
                 ek.compare(found, features_train=rng.random((60, 4)),
                            features_test=rng.random((20, 4)), n_examples=3, **inputs)):
        html = view._repr_html_()
        images = _images(html)
        assert len(images) == 1 and images[0].size[0] > 96, type(view).__name__
        assert "<b>three</b>" not in html  # data-derived text is escaped
        assert view.to_pandas().shape[0] == len(view.to_dict()["rows"]) > 0
        bare = type(view)(**{**view.__dict__, "inputs_train": None, "inputs_test": None})
        assert _images(bare._repr_html_()) == [] and "<table>" in bare._repr_html_()


def test_view_rows_are_the_explain_functions_results(ens, found):
    from ensemble_kernel.analysis import _explain as explain

    view = ek.pairs(found, labels_train=ens.labels_train, labels_test=ens.labels_test,
                    ranks=slice(3, 9))
    want = explain.similar_pairs(found, slice(3, 9), ens.labels_train, ens.labels_test)
    assert view.pairs == tuple(want)
    assert [r["test index"] for r in view.to_dict()["rows"]] == [p.test_index for p in want]
    dup = ek.duplicates(found, n_models=6)
    assert dup.duplicates.threshold == explain.near_duplicates(found, n_models=6).threshold


def test_views_refuse_what_they_cannot_show(ens, found):
    with pytest.raises(ek.InputError, match="failures needs train and test labels"):
        ek.failures(found)
    with pytest.raises(ek.InputError, match="compare needs features"):
        ek.compare(found)
    with pytest.raises(ek.InputError, match=r"labels_test has 19 rows but the neighbours "
                                            r"have 20 test examples"):
        ek.pairs(found, labels_test=ens.labels_test[:19])
    with pytest.raises(ek.InputError, match=r"outside the 20 test examples"):
        ek.pairs(found, ranks="10:30")
    with pytest.raises(ek.InputError, match="take the Neighbors from top_k_neighbors"):
        ek.pairs(ens.test)


def test_views_take_labels_class_names_and_inputs_from_runs(tmp_path, ens, found):
    np.savez(tmp_path / "runs.npz", logits_train=ens.train.numpy(),
             logits_test=ens.test.numpy(), labels_train=ens.labels_train.numpy(),
             labels_test=ens.labels_test.numpy())
    np.savez(tmp_path / "inputs.npz", inputs_train=np.random.rand(60, 12),
             inputs_test=np.random.rand(20, 12))
    from conftest import run_cli

    code, _, err = run_cli("ingest", tmp_path / "runs.npz", "--store", tmp_path / "s",
                           "--inputs", tmp_path / "inputs.npz", "--class-names", "a,b,c,d,e")
    assert code == 0, err
    runs = ek.open_runs(tmp_path / "s")
    view = ek.failures(found, runs, top=2, n_neighbors=3)
    assert view.class_names == ("a", "b", "c", "d", "e")
    assert view.to_dict()["rows"][0]["test label"] in "abcde"
    assert len(_images(view._repr_html_())) == 1  # 1-D signals, drawn as lines


def test_to_pandas_without_pandas_says_which_extra_to_install():
    code = """
import sys
sys.modules["pandas"] = None
import ensemble_kernel as ek, torch
found = ek.Neighbors(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1))
try:
    found.to_pandas()
except ImportError as e:
    print(str(e))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    line = done.stdout.strip()
    assert done.returncode == 0 and "\n" not in line, done.stderr
    assert "pip install 'ensemble-kernel[pandas]'" in line
