"""examples/quickstart.py runs, on a small generated store, and prints what the CLI prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import make_ensemble, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_the_quickstart_runs_on_a_small_store(tmp_path):
    ens = make_ensemble(seed=7, n_models=6, n_train=80, n_test=30, noise=2.0)
    np.savez(tmp_path / "runs.npz", logits_train=ens.train.numpy(),
             logits_test=ens.test.numpy(), labels_train=ens.labels_train.numpy(),
             labels_test=ens.labels_test.numpy())
    np.savez(tmp_path / "inputs.npz", inputs_train=np.random.rand(80, 8, 8),
             inputs_test=np.random.rand(30, 8, 8))
    store = tmp_path / "store"
    code, _, err = run_cli("ingest", tmp_path / "runs.npz", "--store", store, "--inputs",
                           tmp_path / "inputs.npz")
    assert code == 0, err
    done = subprocess.run([sys.executable, str(EXAMPLE), str(store), "--example", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    code, out, err = run_cli("evaluate", store, "--json", "--quiet")
    assert code == 0, err
    cli = json.loads(out)
    for key in ("ensemble_accuracy", "knn_accuracy", "weighted_accuracy"):
        assert f"{cli[key]:.6g}" in done.stdout, key  # the evaluation table
    assert f"accuracy: {cli['knn_accuracy']}" in done.stdout  # KernelKNN.score
    assert "test example 3 (label" in done.stdout
    assert "Most similar pairs, ranks 0:8" in done.stdout and "near-duplicates" in done.stdout


def test_the_quickstart_refuses_a_missing_source_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such file or directory" in done.stderr


def test_the_quickstart_refuses_user_errors_after_opening_in_one_line(tmp_path):
    """Labels missing, or --example out of range: one line, exit 2, no traceback."""
    ens = make_ensemble(n_train=40, n_test=10)
    np.savez(tmp_path / "runs.npz", logits_train=ens.train.numpy(),
             logits_test=ens.test.numpy())
    for extra in ([], ["--labels", str(tmp_path / "l.npz"), "--example", "10"]):
        np.savez(tmp_path / "l.npz", labels_train=ens.labels_train.numpy(),
                 labels_test=ens.labels_test.numpy())
        done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "runs.npz"),
                               *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0, \
            done.stderr
