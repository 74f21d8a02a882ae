import math

import pytest
import torch

from ensemble_kernel.errors import InputError
from ensemble_kernel.sources import ArraySource
from ensemble_kernel.sweep import (bootstrap_difference, default_run_counts, disjoint_subsets,
                                   mcnemar_exact, sweep)

from conftest import make_ensemble


def test_subsets_are_disjoint_and_within_range():
    for n_models, n in [(16, 1), (16, 4), (16, 5), (10, 10)]:
        parts = disjoint_subsets(n_models, n, max_subsets=8)
        runs = [r for p in parts for r in range(p.start, p.stop)]
        assert len(runs) == len(set(runs))
        assert all(p.stop - p.start == n and p.stop <= n_models for p in parts)
        assert len(parts) == min(n_models // n, 8)
    with pytest.raises(InputError, match="between 1 and 16, got 17"):
        disjoint_subsets(16, 17, 8)
    assert default_run_counts(12) == [1, 2, 4, 8, 12]


def test_mcnemar_by_hand():
    # b=1, c=6: two-sided exact p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128.
    assert mcnemar_exact(1, 6) == pytest.approx(16 / 128)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def test_bootstrap_interval_contains_the_difference():
    a = torch.tensor([1, 1, 1, 0] * 50, dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0] * 50, dtype=torch.bool)
    low, high = bootstrap_difference(a, b)
    assert low < 0.25 < high and low > 0


def test_sweep_rows_and_ablations():
    ens = make_ensemble(n_models=8, n_train=100, n_test=40)
    result = sweep(ArraySource(ens.train), ArraySource(ens.test), ens.labels_train,
                   ens.labels_test, runs=[1, 2, 8])
    metrics = {(r.n_models, r.metric): r for r in result.rows}
    assert (1, "knn_k3") not in metrics  # one run makes no kernel
    # The default cap: 3 disjoint subsets per count (8 // 2 = 4 exist at n = 2).
    assert metrics[2, "knn_k3"].n_subsets == 3 and metrics[8, "knn_k3"].n_subsets == 1
    single = metrics[1, "single"]
    assert single.n_subsets == 3 and single.min <= single.mean <= single.max
    assert set(result.ablations) == {"no_log_softmax"} | {f"class_{c}_only" for c in range(5)}
    sig = result.significance
    assert sig.n_models == 8 and 0 <= sig.mcnemar_p <= 1
    assert math.isclose(sig.difference, sig.knn_accuracy - sig.ensemble_accuracy)


def test_known_neighbours_are_reused_without_changing_the_result():
    from ensemble_kernel import top_k_neighbors

    ens = make_ensemble(n_models=8, n_train=100, n_test=40)
    train, test = ArraySource(ens.train), ArraySource(ens.test)
    plain = sweep(train, test, ens.labels_train, ens.labels_test, runs=[2, 8])
    known = top_k_neighbors(test, train, 20, memory_budget=1 << 26)
    reused = sweep(train, test, ens.labels_train, ens.labels_test, runs=[2, 8], neighbors=known)
    assert reused.table() == plain.table()
    assert reused.significance == plain.significance and reused.ablations == plain.ablations


@pytest.mark.parametrize("cap, n_subsets", [(None, {1: 8, 2: 4, 8: 1}), (1, {1: 1, 2: 1, 8: 1}),
                                            (5, {1: 5, 2: 4, 8: 1})])
def test_the_subset_cap_and_the_full_sweep(cap, n_subsets):
    ens = make_ensemble(n_models=8, n_train=60, n_test=20)
    result = sweep(ArraySource(ens.train), ArraySource(ens.test), ens.labels_train,
                   ens.labels_test, runs=[1, 2, 8], max_subsets=cap)
    got = {r.n_models: r.n_subsets for r in result.rows if r.metric == "single"}
    assert got == n_subsets


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3"])
def test_a_bad_subset_cap_is_refused(bad):
    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    with pytest.raises(InputError, match="max_subsets must be a positive integer or None"):
        sweep(ArraySource(ens.train), ArraySource(ens.test), ens.labels_train,
              ens.labels_test, max_subsets=bad)


def test_progress_covers_the_sweep_and_the_ablations():
    ens = make_ensemble(n_models=8, n_train=60, n_test=20)
    seen = []
    sweep(ArraySource(ens.train), ArraySource(ens.test), ens.labels_train, ens.labels_test,
          runs=[1, 2, 8], progress=seen.append)
    stages = {p.stage for p in seen}
    assert {"sweep", "statistics", "ablations"} <= stages
    swept = [p for p in seen if p.stage == "sweep"]
    # Kernel work in runs: 3 subsets of 1, 3 of 2, 1 of 8; it only grows, up to all of it.
    assert swept[-1].done == swept[-1].total == 3 * 1 + 3 * 2 + 8
    assert all(a.done <= b.done for a, b in zip(swept, swept[1:]))
    assert swept[-1].tiles_done == swept[-1].n_tiles == 7


@pytest.mark.parametrize("options, n_subsets", [([], {1: 3, 2: 3, 4: 2, 8: 1}),
                                                (["--max-subsets", "1"], {1: 1, 2: 1, 4: 1, 8: 1}),
                                                (["--full-sweep"], {1: 8, 2: 4, 4: 2, 8: 1})])
def test_the_sweep_command_caps_subsets_by_default(tmp_path, options, n_subsets):
    import json

    from conftest import run_cli, save_labels, save_pt

    ens = make_ensemble(n_models=8, n_train=60, n_test=20)
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    code, out, err = run_cli("sweep", str(src), "--labels", str(labels), "--out",
                             str(tmp_path / "sweep"), "--json", *options)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert {r["n_models"]: r["n_subsets"] for r in rows if r["metric"] == "single"} == n_subsets
