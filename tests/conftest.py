"""Small seeded ensembles and a 'same neighbours' check, shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # small tensors: one thread is faster and steadier on 2 cores


@pytest.fixture(autouse=True)
def _precision_probe_cache(tmp_path_factory, monkeypatch):
    """precision='auto' never reads or writes the user's cache during the tests (each test
    gets an empty cache folder, inherited by its subprocesses). The tests' jobs are below
    `precision.SMALL_JOB_FLOP`, so none probes; tests that need a probe inject one."""
    monkeypatch.setenv("ENSEMBLE_KERNEL_CACHE_DIR", str(tmp_path_factory.mktemp("ek-cache")))


@dataclass
class Ensemble:
    train: torch.Tensor  # (n_models, n_train, n_classes) float32
    test: torch.Tensor  # (n_models, n_test, n_classes)
    labels_train: torch.Tensor
    labels_test: torch.Tensor


def make_ensemble(seed: int = 0, n_models: int = 6, n_train: int = 120, n_test: int = 40,
                  n_classes: int = 5, noise: float = 1.0) -> Ensemble:
    """Logits with class structure: a per-example signal shared by every run, plus run noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(n_classes, n_classes, generator=g) * 3

    def split(n):
        labels = torch.randint(0, n_classes, (n,), generator=g)
        example = prototypes[labels] + torch.randn(n, n_classes, generator=g)
        runs = example[None] + noise * torch.randn(n_models, n, n_classes, generator=g)
        return runs, labels

    train, ytr = split(n_train)
    test, yte = split(n_test)
    return Ensemble(train, test, ytr, yte)


@pytest.fixture
def ensemble() -> Ensemble:
    return make_ensemble()


def assert_same_neighbors(indices, values, kernel, k, rtol=1e-5, atol=1e-6):
    """DESIGN §1: the same indices, except where kernel values agree within float32 rounding.

    `kernel` is the exact (float64) kernel of these queries and references; masked
    entries (leave-one-out) are -inf.
    """
    indices, values = torch.as_tensor(indices), torch.as_tensor(values)
    kernel = torch.as_tensor(kernel, dtype=torch.float64)
    want = kernel.topk(k, dim=1)
    assert indices.shape == (kernel.shape[0], k)
    got_true = kernel.gather(1, indices)
    # The values reported are the kernel values of the indices reported ...
    torch.testing.assert_close(values.double(), got_true, rtol=rtol, atol=atol)
    # ... and they are the k largest, up to float32 rounding.
    torch.testing.assert_close(got_true, want.values, rtol=rtol, atol=atol)
    # Order rule: descending; exactly equal kernel values in ascending index order.
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    equal = values[:, :-1] == values[:, 1:]
    assert bool((indices[:, :-1][equal] < indices[:, 1:][equal]).all())


def save_pt(path: Path, train, test, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": test, "logits_train": train, **extra}, path)
    return path


def save_labels(path: Path, ens: Ensemble) -> Path:
    np.savez(path, labels_train=ens.labels_train.numpy(), labels_test=ens.labels_test.numpy())
    return path


def run_cli(*args) -> tuple[int, str, str]:
    """Run the program in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from ensemble_kernel.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _keep_the_real_probe():
    from ensemble_kernel import precision

    return precision.measure_rates


REAL_MEASURE_RATES = _keep_the_real_probe()  # before any test replaces it
