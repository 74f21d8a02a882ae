"""The top-level API: names, argument order, KernelKNN, open_runs, and agreement with the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ensemble_kernel as ek
from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.engine import _top_k_neighbors
from ensemble_kernel.errors import InputError

from conftest import make_ensemble, run_cli, save_labels

SUBMODULES = ["engine", "evaluation", "sweeps", "explain", "views", "runs", "classifier",
              "results", "formats", "sources", "store", "neighbors", "kernel", "plan",
              "report", "report.build", "report.grids", "report.html", "cli", "checkpoint"]


def test_no_top_level_name_is_shadowed_by_a_module_in_a_fresh_process():
    """Importing every submodule (the report first, as the issue found) rebinds nothing:
    ek.evaluate and ek.sweep stay functions, and `import ensemble_kernel.X as m` gives
    the module."""
    code = f"""
import importlib, types
import ensemble_kernel.report.build
import ensemble_kernel as ek
for name in {SUBMODULES!r}:
    module = importlib.import_module("ensemble_kernel." + name)
    assert isinstance(module, types.ModuleType), name
for name in ek.__all__:
    assert not isinstance(getattr(ek, name), types.ModuleType), name
import ensemble_kernel.sweeps as s, ensemble_kernel.evaluation as e
assert isinstance(s, types.ModuleType) and isinstance(e, types.ModuleType)
assert callable(ek.evaluate) and callable(ek.sweep) and callable(ek.pairs)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_all_is_complete_and_every_public_object_is_documented_with_shapes():
    public = {n for n in dir(ek) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(ek, n), type(ek))}
    assert set(ek.__all__) - {"__version__"} == public - modules
    errors = {"EnsembleKernelError", "InputError", "NonFiniteError", "BudgetError",
              "RunFileError", "StoreError"}
    for name in set(ek.__all__) - {"__version__"}:
        doc = getattr(ek, name).__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        if name not in errors | {"Progress", "Plan", "plan_memory", "LogitSource"}:
            assert "shape" in doc or "Scalars only" in doc, f"{name}: no shape in its docstring"


def test_top_k_neighbors_takes_train_first_and_has_no_hooks():
    ens = make_ensemble(n_train=50, n_test=17)
    found = ek.top_k_neighbors(ens.train, ens.test, k=4)
    assert found.indices.shape == (17, 4) and int(found.indices.max()) < 50
    twin = dense_kernel(ens.test, ens.train)  # (n_test, n_train), float64
    assert torch.equal(found.indices, twin.topk(4, dim=1).indices)
    engine = _top_k_neighbors(ens.test, ens.train, 4)
    assert torch.equal(found.indices, engine.indices) and torch.equal(found.values, engine.values)
    import inspect
    params = set(inspect.signature(ek.top_k_neighbors).parameters)
    assert not params & {"finished_tiles", "on_tile", "tiles", "combine", "cache_queries",
                         "chunk_models", "tile_size", "exclude_self"}
    kernel = ek.compute_kernel(ens.train, ens.test)
    assert kernel.shape == (17, 50)
    torch.testing.assert_close(kernel.double(), twin, rtol=1e-5, atol=1e-6)


def test_leave_one_out_when_no_test_split_is_given():
    ens = make_ensemble(n_train=30)
    found = ek.top_k_neighbors(ens.train, k=29)
    assert found.indices.shape == (30, 29)
    assert not bool((found.indices == torch.arange(30)[:, None]).any())
    with pytest.raises(InputError, match=r"k must be between 1 and 29"):
        ek.top_k_neighbors(ens.train, k=30)


def _store_like(tmp_path, ens):
    """An .npz run file with both splits and labels, as the CLI and open_runs read it."""
    path = tmp_path / "runs.npz"
    np.savez(path, logits_train=ens.train.numpy(), logits_test=ens.test.numpy(),
             labels_train=ens.labels_train.numpy(), labels_test=ens.labels_test.numpy())
    return path


def test_the_api_gives_the_command_lines_numbers(tmp_path):
    ens = make_ensemble(seed=3, n_models=8, n_train=90, n_test=31, noise=2.0)
    path = _store_like(tmp_path, ens)
    code, out, err = run_cli("evaluate", path, "--json", "--weighted-k", "10", "--quiet")
    assert code == 0, err
    cli = json.loads(out)
    runs = ek.open_runs(path)
    assert runs.n_models == 8 and runs.labels_test is not None
    result = ek.evaluate(runs.train, runs.test, runs.labels_train, runs.labels_test,
                         weighted_k=10)
    for key in ("single_model_accuracy", "ensemble_accuracy", "knn_accuracy",
                "weighted_accuracy"):
        assert getattr(result, key) == cli[key], key
    assert ek.KernelKNN(k=3).fit(runs.train, runs.labels_train).score(
        runs.test, runs.labels_test) == cli["knn_accuracy"]
    weighted = ek.KernelKNN(k=10, weighted=True, power=4).fit(ens.train.numpy(), ens.labels_train)
    assert weighted.score(ens.test, ens.labels_test.numpy()) == cli["weighted_accuracy"]

    code, _, err = run_cli("neighbors", path, "--out", tmp_path / "nn.npz", "--k", "7",
                           "--quiet", "--no-resume")
    assert code == 0, err
    saved = np.load(tmp_path / "nn.npz")
    values, indices = ek.KernelKNN(k=7).fit(runs.train, runs.labels_train).kneighbors(runs.test)
    assert np.array_equal(indices.numpy(), saved["indices"])
    assert np.array_equal(values.numpy(), saved["values"])


def _vote_twin(kernel: torch.Tensor, labels_train: torch.Tensor, n_classes: int, k: int):
    """Plain majority vote from the float64 kernel: sort by (value desc, index asc)."""
    out = []
    for row in kernel:
        order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k]
        counts = torch.zeros(n_classes)
        for j in order:
            counts[labels_train[j]] += 1
        out.append(counts / k)
    return torch.stack(out)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_predict_and_proba_match_a_plain_twin_with_ties_to_the_smallest_label(k):
    ens = make_ensemble(seed=5, n_train=40, n_test=25, n_classes=4, noise=3.0)
    kernel = dense_kernel(ens.test, ens.train)
    top = kernel.topk(k + 1, dim=1).values
    # The twin is comparable only where the k-th and (k+1)-th values are apart by far
    # more than float32 rounding; this data is chosen so (checked, not assumed).
    assert bool(((top[:, k - 1] - top[:, k]) > 1e-4).all())
    model = ek.KernelKNN(k=k).fit(ens.train, ens.labels_train)
    proba = model.predict_proba(ens.test)
    want = _vote_twin(kernel, ens.labels_train, 4, k)
    assert torch.equal(proba, want)
    # argmax takes the first maximum: the smallest label among tied votes.
    assert torch.equal(model.predict(ens.test), want.argmax(dim=1))
    if k == 2:
        assert bool((want.max(dim=1).values == 0.5).any()), "no tied vote was tested"


def test_weighted_proba_is_normalised_and_agrees_with_predict():
    ens = make_ensemble(seed=2, n_train=60, n_test=20)
    model = ek.KernelKNN(k=7, weighted=True, power=4).fit(ens.train, ens.labels_train)
    proba = model.predict_proba(ens.test)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(20))
    assert torch.equal(proba.argmax(dim=1), model.predict(ens.test))
    values, indices = model.kneighbors(ens.test)
    weights = values.double() ** 4
    want = torch.zeros(20, 5, dtype=torch.float64).scatter_add_(
        1, ens.labels_train[indices], weights)
    torch.testing.assert_close(proba.double(), want / want.sum(1, keepdim=True), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("call, message", [
    (lambda m, e: m.predict(e.test), r"not fitted: call fit\(train_logits, y_train\) first"),
    (lambda m, e: m.fit(e.train, e.labels_train[:-1]),
     r"train labels have length 59 but the train split has 60 examples"),
    (lambda m, e: m.fit(e.train, e.labels_train.float()), r"1-D integer array"),
    (lambda m, e: m.fit(e.train, e.labels_train + 5), r"must lie in 0\.\.4"),
    (lambda m, e: m.fit(e.train, e.labels_train).score(e.test, e.labels_test[:3]),
     r"test labels have length 3 but the test split has 20"),
    (lambda m, e: m.fit(e.train, e.labels_train).predict(e.test[:4]),
     r"4 runs but the reference split has 6"),
    (lambda m, e: m.fit(e.train, e.labels_train).predict(e.test[..., :3]),
     r"3 classes but the reference split has 5"),
    (lambda m, e: m.fit(e.train, e.labels_train).kneighbors(e.test, k=61),
     r"k must be between 1 and 60"),
    (lambda m, e: m.fit(e.train[:, :2], e.labels_train[:2]), r"k must be between 1 and 2 .*got 3"),
    (lambda m, e: m.fit("runs/", e.labels_train), r"train logits must be a NumPy array"),
])
def test_bad_inputs_are_one_line_input_errors(call, message):
    ens = make_ensemble(n_train=60, n_test=20)
    with pytest.raises(InputError, match=message) as caught:
        call(ek.KernelKNN(k=3), ens)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("options, message", [
    ({"k": 0}, r"k must be a positive integer, got 0"),
    ({"k": True}, r"k must be a positive integer, got True"),
    ({"k": 2.5}, r"k must be a positive integer, got 2\.5"),
    ({"power": -1}, r"power must be a positive integer"),
    ({"precision": "exakt"}, r"precision must be 'auto', 'exact' or 'fast', got 'exakt'"),
])
def test_bad_options_are_refused_when_the_model_is_made(options, message):
    with pytest.raises(InputError, match=message):
        ek.KernelKNN(**options)


def test_a_typo_in_an_option_name_is_refused():
    with pytest.raises(TypeError, match="weigthed"):
        ek.KernelKNN(k=3, weigthed=True)


def test_open_runs_reads_files_directories_and_stores(tmp_path):
    ens = make_ensemble(n_models=4)
    path = _store_like(tmp_path, ens)
    runs = ek.open_runs(str(path), runs="1:3")
    assert runs.n_models == 2 and runs.runs == slice(1, 3)
    assert torch.equal(runs.train.read(slice(0, 2), slice(0, 5)), ens.train[1:3, :5])
    assert "2 runs, 120 train / 40 test examples, 5 classes; labels: train, test" in repr(runs)
    store = tmp_path / "store"
    code, _, err = run_cli("ingest", path, "--store", store, "--class-names", "a,b,c,<d>,e")
    assert code == 0, err
    from_store = ek.open_runs(store, runs=slice(0, 4))
    assert from_store.class_names == ("a", "b", "c", "<d>", "e")
    assert torch.equal(from_store.labels_test, ens.labels_test)
    assert "&lt;d&gt;" in from_store._repr_html_() and "<d>" not in from_store._repr_html_()
    labels = save_labels(tmp_path / "labels.npz", ens)
    assert ek.open_runs([path], labels=labels).n_models == 4
    for bad, message in [([1, 2], r"open_runs takes a path or a list of paths"),
                         (42, r"open_runs takes a path"),
                         ([store, path], r"a store must be the only SRC, got 2")]:
        with pytest.raises(InputError, match=message):
            ek.open_runs(bad)
    with pytest.raises(InputError, match=r"--runs 1:x|runs takes"):
        ek.open_runs(path, runs="1:x")
    with pytest.raises(InputError, match=r"at least 2 runs, got 1"):
        ek.open_runs(path, runs=slice(2, 3))


def test_open_runs_reads_a_store_through_an_fsspec_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    ens = make_ensemble(n_models=3, n_train=30, n_test=10)
    code, _, err = run_cli("ingest", _store_like(tmp_path, ens), "--store", tmp_path / "st")
    assert code == 0, err
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "st").rglob("*"):
        if f.is_file():
            fs.pipe(f"/api-remote/{f.relative_to(tmp_path / 'st').as_posix()}", f.read_bytes())
    runs = ek.open_runs("memory://api-remote")
    assert runs.sources == ("memory://api-remote",) and runs.n_models == 3
    assert torch.equal(runs.labels_train, ens.labels_train)
    local = ek.open_runs(tmp_path / "st")
    assert torch.equal(ek.top_k_neighbors(runs.train, runs.test, k=3).indices,
                       ek.top_k_neighbors(local.train, local.test, k=3).indices)
