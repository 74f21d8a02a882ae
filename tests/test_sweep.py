import math

import numpy as np
import pytest
import torch

from ensemble_kernel.errors import InputError
from ensemble_kernel.core._sources import ArraySource
from ensemble_kernel.analysis._sweep import (bootstrap_difference, default_run_counts, disjoint_subsets,
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
    from ensemble_kernel.core._engine import _top_k_neighbors

    ens = make_ensemble(n_models=8, n_train=100, n_test=40)
    train, test = ArraySource(ens.train), ArraySource(ens.test)
    plain = sweep(train, test, ens.labels_train, ens.labels_test, runs=[2, 8])
    known = _top_k_neighbors(test, train, 20, memory_budget=1 << 26)
    reused = sweep(train, test, ens.labels_train, ens.labels_test, runs=[2, 8], neighbors=known)
    assert reused.table() == plain.table()
    assert reused.significance == plain.significance and reused.ablations == plain.ablations


# ---- McNemar and the bootstrap through scipy, against the implementations they replaced --

def _mcnemar_twin(b: int, c: int) -> float:
    """The previous implementation: exact binomial tail by integer sums, doubled."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _bootstrap_twin(a, b, n_resamples=2000, seed=0):
    """The previous implementation: torch draws, percentile interval."""
    g = torch.Generator().manual_seed(seed)
    diff = a.double() - b.double()
    idx = torch.randint(0, len(diff), (n_resamples, len(diff)), generator=g)
    means = diff[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 0), (0, 7), (7, 0), (3, 3), (4, 5),
                                  (1, 6), (6, 1), (10, 30), (500, 440), (3000, 2900),
                                  (1, 1023), (2000, 2000)])
def test_mcnemar_through_binomtest_equals_the_exact_sum(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_mcnemar_twin(b, c), rel=1e-9, abs=1e-300)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)  # two-sided: symmetric


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(InputError, match=r"non-negative, got b=-1, c=3"):
        mcnemar_exact(-1, 3)


@pytest.mark.parametrize("a, b, want", [
    ([1] * 50, [1] * 50, (0.0, 0.0)),  # all correct: no difference, no spread
    ([0] * 50, [0] * 50, (0.0, 0.0)),
    ([1] * 50, [0] * 50, (1.0, 1.0)),
    ([0] * 50, [1] * 50, (-1.0, -1.0)),
    ([1], [0], (1.0, 1.0)),  # one example
])
def test_the_bootstrap_of_constant_differences_is_a_point(a, b, want):
    a, b = torch.tensor(a, dtype=torch.bool), torch.tensor(b, dtype=torch.bool)
    assert bootstrap_difference(a, b) == want == _bootstrap_twin(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_bootstrap_agrees_with_the_torch_twin_to_resampling_noise(seed):
    """Different generators draw different resamples: the intervals agree to Monte Carlo
    error. The standard error of the mean difference is s = sd/sqrt(n); a 2.5% quantile
    of 2000 resamples moves by about 0.1 s between generators, so 0.5 s is far outside
    chance and far inside any real disagreement (a shifted or halved interval)."""
    g = torch.Generator().manual_seed(seed)
    n = 1000
    a, b = torch.rand(n, generator=g) < 0.95, torch.rand(n, generator=g) < 0.9
    low, high = bootstrap_difference(a, b, seed=seed)
    twin_low, twin_high = _bootstrap_twin(a, b, seed=seed)
    s = float((a.double() - b.double()).std()) / math.sqrt(n)
    assert abs(low - twin_low) < 0.5 * s and abs(high - twin_high) < 0.5 * s
    mean = float(a.double().mean() - b.double().mean())
    assert low < mean < high


def test_the_bootstrap_refuses_no_examples():
    with pytest.raises(InputError, match="at least one example"):
        bootstrap_difference(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))


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

    from conftest import run_cli

    src, labels = _saved(tmp_path, n_models=8)
    code, out, err = run_cli("sweep", src, "--labels", labels, "--out",
                             str(tmp_path / "sweep"), "--json", *options)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert {r["n_models"]: r["n_subsets"] for r in rows if r["metric"] == "single"} == n_subsets


# ---- the sweep on a sample of the test split (issue 9: the report within 3 evaluates) ----

class _CountingSource:
    """A source that records every read, to check what read_sample promises."""

    def __init__(self, logits):
        self.base, self.reads = ArraySource(logits), []
        self.n_models, self.n_examples, self.n_classes = logits.shape

    def read(self, models, examples):
        self.reads.append((models, examples))
        return self.base.read(models, examples)

    def describe_run(self, model):
        return f"run {model} of the counted source"


@pytest.mark.parametrize("n, size, max_read", [(10, 1, 1), (10, 3, 10**9), (10, 9, 80),
                                               (10, 10, 100), (97, 13, 97 * 3 * 2 + 5),
                                               (7, 6, 0), (1000, 999, 12_000)])
def test_the_sample_holds_exactly_its_examples_read_in_whole_runs_within_the_limit(
        n, size, max_read):
    from ensemble_kernel.core._sources import read_sample, sample_bytes, sample_positions

    logits = torch.arange(5 * n * 3, dtype=torch.float32).reshape(5, n, 3)
    logits[2, n // 2, 1] = -0.0
    source = _CountingSource(logits)
    pick = sample_positions(n, size)
    assert len(set(pick.tolist())) == size and pick.min() >= 0 and pick.max() < n
    assert bool((pick[1:] > pick[:-1]).all()) and pick[0] == 0
    sample = read_sample(source, pick, max_read)
    torch.testing.assert_close(sample.read(slice(0, 5), slice(0, size)), logits[:, pick],
                               rtol=0, atol=0, equal_nan=True)
    assert sample.logits.dtype == logits.dtype and sample.n_examples == size
    assert sample_bytes(source, size) == sample.logits.numel() * 4
    whole = [(m, e) for m, e in source.reads if e != slice(0, 1)]
    runs = [r for m, _ in whole for r in range(m.start, m.stop)]
    assert sorted(runs) == list(range(5))  # every run read once, whole
    assert all(e == slice(0, n) for _, e in whole)
    assert all((m.stop - m.start) * n * 3 * 4 <= max(max_read, n * 3 * 4) for m, _ in whole)
    assert sample.describe_run(3) == "run 3 of the counted source"


@pytest.mark.parametrize("bad, example", [(float("nan"), 22), (float("inf"), 23), (1e39, 23),
                                          (-float("inf"), 0)])
def test_a_bad_value_is_named_by_its_own_example_in_or_out_of_the_sample(bad, example):
    from ensemble_kernel.errors import NonFiniteError

    ens = make_ensemble(n_models=4, n_train=40, n_test=37)
    test = ens.test.double()
    test[2, example, 1] = bad  # 22 and 0 are in the sample of 10 (its 7th and 1st); 23 is not
    error = NonFiniteError if bad != 1e39 else InputError
    with pytest.raises(error, match=f"run 2 .*example {example}, class 1"):
        sweep(ens.train.double(), test, ens.labels_train, ens.labels_test, runs=[4],
              test_examples=10)


def test_a_very_long_sample_size_is_a_typo_not_a_traceback(tmp_path):
    from conftest import run_cli

    src, labels = _saved(tmp_path)
    code, _, err = run_cli("sweep", src, "--labels", labels, "--out", str(tmp_path / "s"),
                           "--sweep-examples", "1" * 4301)
    assert code == 2 and "--sweep-examples takes a positive number" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("n, size", [(10, 0), (10, 11), (0, 1)])
def test_an_impossible_sample_is_refused(n, size):
    from ensemble_kernel.core._sources import sample_positions

    with pytest.raises(InputError, match=f"a sample of {size} examples from {n}"):
        sample_positions(n, size)


def test_a_split_sorted_by_class_keeps_every_class_in_the_sample():
    from ensemble_kernel.core._sources import sample_positions

    labels = torch.arange(10).repeat_interleave(1000)  # 10,000 sorted by class
    counts = torch.bincount(labels[sample_positions(10_000, 2000)], minlength=10)
    assert counts.tolist() == [200] * 10


def _sample_twin(ens, size):
    """The plain twin: the sweep over the test split cut down by hand, on every example."""
    from ensemble_kernel.core._sources import sample_positions

    pick = sample_positions(ens.test.shape[1], size)
    return sweep(ArraySource(ens.train), ArraySource(ens.test[:, pick].contiguous()),
                 ens.labels_train, ens.labels_test[pick], runs=[1, 2, 8], test_examples=None)


@pytest.mark.parametrize("size", [1, 7, 39])
def test_a_sampled_sweep_is_the_sweep_of_those_examples(size):
    from ensemble_kernel.core._engine import _top_k_neighbors

    ens = make_ensemble(n_models=8, n_train=100, n_test=40)
    train, test = ArraySource(ens.train), ArraySource(ens.test)
    twin = _sample_twin(ens, size)
    sampled = sweep(train, test, ens.labels_train, ens.labels_test, runs=[1, 2, 8],
                    test_examples=size)
    # The same figures to the last bit, with or without the neighbours of every example.
    known = _top_k_neighbors(test, train, 20, memory_budget=1 << 26)
    reused = sweep(train, test, ens.labels_train, ens.labels_test, runs=[1, 2, 8],
                   test_examples=size, neighbors=known)
    for result in (sampled, reused):
        assert result.table() == twin.table()
        assert result.ablations == twin.ablations and result.significance == twin.significance
        assert (result.n_test, result.n_test_all, result.sampled) == (size, 40, True)
        assert f"on {size:,} of 40 test examples" in result.to_dict()["title"]
    whole = sweep(train, test, ens.labels_train, ens.labels_test, runs=[2, 8], test_examples=40)
    assert (whole.n_test, whole.n_test_all, whole.sampled, whole.sample_note()) == (40, 40, False, "")


@pytest.mark.parametrize("spelling, value", [("2000", 2000), ("2,000", 2000), ("2_000", 2000),
                                             (" 7 ", 7), ("07", 7), ("1,234,567", 1234567),
                                             ("all", None), ("ALL", None)])
def test_the_sample_size_is_read_as_written(spelling, value):
    from ensemble_kernel.cli.common import sweep_examples

    assert sweep_examples(spelling) == value
    assert sweep_examples(None) == 2000


def test_a_numpy_sample_size_is_taken():
    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    result = sweep(ens.train, ens.test, ens.labels_train, ens.labels_test, runs=[4],
                   test_examples=np.int64(7))
    assert (result.n_test, result.n_test_all) == (7, 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "100", True, np.float64(7)])
def test_a_bad_sample_size_is_refused(bad):
    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    with pytest.raises(InputError, match="test_examples must be a positive integer or None"):
        sweep(ens.train, ens.test, ens.labels_train, ens.labels_test, test_examples=bad)


def test_known_neighbours_of_other_examples_are_refused():
    from ensemble_kernel.core._engine import _top_k_neighbors

    ens = make_ensemble(n_models=4, n_train=30, n_test=10)
    found = _top_k_neighbors(ens.test[:, :6], ens.train, 5, memory_budget=1 << 26)
    with pytest.raises(InputError, match="neighbors has 6 rows but the test split has 10"):
        sweep(ens.train, ens.test, ens.labels_train, ens.labels_test, neighbors=found)


@pytest.mark.parametrize("option, n_test", [([], 20), (["--sweep-examples", "7"], 7),
                                            (["--sweep-examples", "all"], 20),
                                            (["--sweep-examples", "ALL"], 20),
                                            (["--sweep-examples", "500"], 20)])
def test_the_sweep_command_takes_its_sample_size(tmp_path, monkeypatch, option, n_test):
    import json

    from conftest import run_cli

    src, labels = _saved(tmp_path)
    code, out, err = run_cli("sweep", src, "--labels", labels, "--out",
                             str(tmp_path / "sweep"), "--json", *option)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["n_test"], doc["n_test_all"]) == (n_test, 20)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert (saved["n_test"], saved["n_test_all"]) == (n_test, 20)
    assert {row["n_test"] for row in saved["rows"]} == {n_test}
    csv_lines = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].endswith(",n_test") and csv_lines[1].endswith(f",{n_test}")
    code, out, err = run_cli("sweep", src, "--labels", labels, "--out",
                             str(tmp_path / "sweep2"), *option)
    assert code == 0 and ("on 7 of 20 test examples" in out) == (n_test == 7), out


@pytest.mark.parametrize("typo", ["0", "-5", "al", "2k", "", "1e3", "1,2", "_7_", "2_0",
                                  "\u0667", "\uff17", "7\xa0", "0x7", "-0"])
def test_a_typo_in_the_sample_size_is_one_line(tmp_path, typo):
    from conftest import run_cli

    src, labels = _saved(tmp_path)
    code, out, err = run_cli("sweep", src, "--labels", labels, "--out",
                             str(tmp_path / "sweep"), "--sweep-examples", typo)
    assert code == 2 and "--sweep-examples takes a positive number of test examples or 'all'" \
        in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sweep").exists()


def _saved(tmp_path, n_models=4):
    """Runs (20 test examples, 60 training) and labels saved as the CLI takes them."""
    from conftest import save_labels, save_pt

    ens = make_ensemble(n_models=n_models, n_train=60, n_test=20)
    return (str(save_pt(tmp_path / "runs.pt", ens.train, ens.test)),
            str(save_labels(tmp_path / "labels.npz", ens)))


@pytest.mark.parametrize("b, c", [(0, 1), (7, 0), (3, 3), (4, 5), (1, 6), (10, 30),
                                  (500, 440), (3000, 2900), (1, 1023), (2000, 2000),
                                  (9000, 11000), (10001, 10000), (12000, 9000)])
def test_mcnemar_equals_scipys_binomtest_on_both_sides_of_the_integer_sum(b, c):
    """Up to 20,000 discordant pairs the p-value is an integer sum; beyond, binomtest's."""
    from scipy.stats import binomtest

    assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue,
                                                rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("b, c", [(32, 1101), (20, 1162), (0, 1074), (0, 1075), (3, 1500)])
def test_mcnemar_is_exact_where_binomtest_underflows(b, c):
    """Tails where binomtest's float sums give 0 (2.3e-279 at (32, 1101), subnormals at
    (20, 1162) and (0, 1074)): the integer sum gives the exact fraction correctly
    rounded, 0 only where that rounds to 0 ((0, 1075), (3, 1500))."""
    from fractions import Fraction

    n = b + c
    exact = 2 * Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)
    assert mcnemar_exact(b, c) == float(min(exact, Fraction(1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_bootstraps_counting_shortcut_agrees_with_resampling_examples(seed):
    """0/1 correctness: a resample's mean from multinomial counts (the shortcut) against
    resampling the examples themselves (the torch twin above), and other differences
    (halves, here) through scipy's resampling against the same twin; lopsided data (8
    disagreements in 2,000, one way) where a wrong share or a swapped sign would show."""
    g = torch.Generator().manual_seed(seed)
    n = 2000
    a = torch.rand(n, generator=g) < 0.97
    b = a.clone()
    b[:8] = ~b[:8]
    for x, y in ((a, b), (a.double() / 2, b.double())):
        low, high = bootstrap_difference(x, y, seed=seed)
        twin_low, twin_high = _bootstrap_twin(x, y, seed=seed)
        s = float((x.double() - y.double()).std()) / math.sqrt(n)
        assert abs(low - twin_low) < 0.5 * s and abs(high - twin_high) < 0.5 * s
        assert high - low > 2 * s  # about 4 standard errors wide


def test_the_sweeps_statistics_do_not_import_scipy_stats():
    """The report's significance (McNemar, bootstrap) on 0/1 correctness needs no scipy.stats
    (its import alone takes 0.6 s: `micro.py scipyimport`)."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom ensemble_kernel.analysis._sweep import mcnemar_exact, "
            "bootstrap_difference\nmcnemar_exact(30, 12)\n"
            "a = torch.rand(500) < 0.9\nbootstrap_difference(a, torch.rand(500) < 0.8)\n"
            "print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
