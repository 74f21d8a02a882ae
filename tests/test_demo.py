"""Batched training, the demo's data, and the demo end to end at a small size."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ensemble_kernel.cli import app
from ensemble_kernel.demo.data import load_dataset
from ensemble_kernel.demo.train import TrainConfig, init_ensemble, predict, train_ensemble
from ensemble_kernel.errors import InputError
from ensemble_kernel.storage._store import RunStore

SMALL = TrainConfig(epochs=1, batch_size=32, channels=8)


def _data(n=256, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_batched_training_equals_one_network_at_a_time():
    x, y = _data()
    seeds = [11, 12, 13]
    together = train_ensemble(init_ensemble(seeds, 40, 10, 8), x, y, SMALL)
    logits_together, _ = predict(together, x)
    for i, seed in enumerate(seeds):
        alone = train_ensemble(init_ensemble([seed], 40, 10, 8), x, y, SMALL)
        logits_alone, _ = predict(alone, x)
        torch.testing.assert_close(logits_together[i], logits_alone[0], rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_and_seeds_matter():
    x, y = _data()
    a = predict(train_ensemble(init_ensemble([1, 2], 40, 10, 8), x, y, SMALL), x)[0]
    b = predict(train_ensemble(init_ensemble([1, 2], 40, 10, 8), x, y, SMALL), x)[0]
    c = predict(train_ensemble(init_ensemble([3, 4], 40, 10, 8), x, y, SMALL), x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_datasets_are_made_locally_and_leave_global_rng_alone():
    state = np.random.get_state()[1].copy()
    data = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], state)
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    digits = load_dataset("digits")
    assert digits.x_train.shape[1:] == (8, 8) and len(digits.y_test) == 540
    assert np.bincount(digits.y_test).min() >= 50  # stratified
    with pytest.raises(InputError, match="--dataset takes mnist1d or digits, got 'cifar'"):
        load_dataset("cifar")


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--dataset", "digits", "--models", "6",
                                 "--out", str(tmp_path / "out"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("summary.json", "sweep.png", "sweep.csv", "sweep.json", "record.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert {"n_models", "k", "single_model_accuracy", "ensemble_accuracy", "knn_accuracy",
            "weighted_accuracy"} <= set(summary)
    assert summary["n_models"] == 6
    record = json.loads((out / "record.json").read_text())
    assert summary["sweep_n_test"] == record["n_test"]  # the demo's sweep takes every example
    store = RunStore(out / "store")
    assert store.n_models == 6 and store.optional("features_test").shape[0] == 540
    assert store.records()[0]["seeds"] == [3 * 1_000_003 + i for i in range(6)]
    # Every command accepts the demo's store.
    ev = runner.invoke(app, ["evaluate", str(out / "store"), "--json"])
    assert ev.exit_code == 0
    assert json.loads(ev.stdout)["knn_accuracy"] == pytest.approx(summary["knn_accuracy"])
    record = json.loads((out / "record.json").read_text())
    assert record["seed"] == 3 and {"training_s", "sweep_s", "report_s"} <= set(record["timings"])
    assert (out / "report.html").is_file()
