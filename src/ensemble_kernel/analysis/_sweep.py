"""Accuracy against the number of runs, ablations, and whether the gain is real.

For each n, the runs are cut into disjoint contiguous subsets of n runs (at most
`max_subsets`, 3 by default; None: every disjoint subset), and every metric is computed on
each subset, over at most `test_examples` test examples (2,000 by default, spread evenly
over the test split; None: all): the mean single-model accuracy, the ensemble average,
kernel k-NN for several k, and the weighted vote. The sweep reports the mean and spread over subsets. At the
largest n it adds the ablations (no log-softmax; each per-class kernel alone), computed in
one streamed pass beside that subset's full kernel (`ablations.py`), and a paired
comparison of kernel k-NN with the ensemble average on the same test examples: McNemar's
exact test and a bootstrap confidence interval of the accuracy difference. The subsets'
statistics come from one pass over their runs (`engine.shared_statistics`): the subsets
of different run counts overlap, and each run is read and normalised once for them all.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ._ablations import ablation_neighbors
from ..core._engine import (KeptStatistics, Progress, ProgressCallback, _top_k_neighbors,
                     candidates_per_query, shared_statistics, warn_constant)
from ..core._kernel import ClassStats
from ..errors import InputError
from ._evaluation import accuracy, knn_predict, singles_and_ensemble, weighted_predict
from ..core._neighbors import Neighbors
from ..results import Shown
from ..core._plan import budget_beside, default_memory_budget, plan_if_fits, resolve_device
from ..storage._formats import check_labels
from ..core._sources import (LogitSource, as_source, item_size, read_sample, sample_bytes,
                      sample_positions, select_runs)

__all__ = ["SweepRow", "Significance", "SweepResult", "disjoint_subsets", "sweep",
           "mcnemar_exact", "bootstrap_difference", "default_run_counts", "DEFAULT_MAX_SUBSETS",
           "DEFAULT_TEST_EXAMPLES"]

# Disjoint subsets per run count unless asked otherwise: enough for a spread, and the
# sweep's kernels then cost about two full kernels at any run count (the full sweep, up
# to n_models // n subsets per count, costs about log2(n_models)).
DEFAULT_MAX_SUBSETS = 3

# Test examples the sweep and its ablations use unless asked otherwise. Their kernels'
# products scale with it: at CIFAR shape (10,000 test examples, 500 runs) the sweep and
# the ablations on every example cost about four kernels of all runs, on 2,000 about
# one. The binomial standard error of an accuracy near 95% is then 0.5 points; the
# counts are compared on the same examples, which narrows their differences' error.
DEFAULT_TEST_EXAMPLES = 2000


@dataclass(frozen=True)
class SweepRow:
    """One metric at one run count: mean and spread over the disjoint subsets.

    Scalars only: accuracies in [0, 1] over `n_subsets` disjoint subsets of `n_models` runs.
    """

    n_models: int
    metric: str  # 'single', 'ensemble', 'knn_k3', ..., 'weighted'
    mean: float
    std: float
    min: float
    max: float
    n_subsets: int


@dataclass(frozen=True)
class Significance:
    """Kernel k-NN against the ensemble average on the same test examples.

    Scalars only: accuracies and their difference in [0, 1] units, McNemar's discordant
    counts and exact p-value, the bootstrap's 95% interval of the difference.
    """

    n_models: int
    k: int
    knn_accuracy: float
    ensemble_accuracy: float
    only_knn_correct: int  # McNemar's b
    only_ensemble_correct: int  # McNemar's c
    mcnemar_p: float  # exact two-sided
    difference: float  # knn - ensemble
    ci_low: float  # bootstrap 95% interval of the difference
    ci_high: float


@dataclass(frozen=True, repr=False)
class SweepResult(Shown):
    """Accuracy against the number of runs, the ablations and the paired comparison.

    Attributes
    ----------
    rows : tuple of SweepRow, shape (n_run_counts * n_metrics,)
        One per (run count, metric): mean, std, min and max over disjoint subsets.
    ablations : dict of str to float
        At the largest run count: kernel k-NN accuracy without log-softmax
        ('no_log_softmax') and with each class's kernel alone ('class_C_only').
    significance : Significance or None
        Kernel k-NN against the ensemble average: McNemar's exact test and a bootstrap
        interval of the difference (None with a single run).
    n_test, n_test_all : int
        Test examples every figure here is computed on, and in the test split: fewer when
        the sweep took a sample (`sweep(test_examples=...)`, spread evenly).
    """

    rows: tuple[SweepRow, ...]
    ablations: dict[str, float] = field(default_factory=dict)  # name -> accuracy
    significance: Significance | None = None
    n_test: int = 0
    n_test_all: int = 0

    @property
    def sampled(self) -> bool:
        """True when the figures come from a sample of the test split."""
        return self.n_test < self.n_test_all

    def sample_note(self) -> str:
        """'on 2,000 of 10,000 test examples (spread evenly)', or '' when on all of them."""
        return (f"on {self.n_test:,} of {self.n_test_all:,} test examples (spread evenly)"
                if self.sampled else "")

    def standard_error(self, accuracy: float = 0.95) -> float:
        """The binomial standard error of an accuracy near `accuracy` on `n_test` examples."""
        return math.sqrt(accuracy * (1 - accuracy) / max(self.n_test, 1))

    def table(self) -> list[dict]:
        """The rows as dicts (n_models, metric, mean, std, min, max, n_subsets, and n_test:
        the test examples behind every figure, so that sweep.csv and `to_pandas` say it)."""
        return [dict(row.__dict__, n_test=self.n_test) for row in self.rows]

    def _title(self) -> str:
        s, where = self.significance, f" {self.sample_note()}" if self.sampled else ""
        if s is None:
            return f"Sweep over the number of runs{where}"
        return (f"Sweep over the number of runs{where}; at {s.n_models} runs kernel {s.k}-NN "
                f"minus ensemble average {100 * s.difference:+.2f} points (95% CI "
                f"{100 * s.ci_low:+.2f} to {100 * s.ci_high:+.2f}), McNemar p = "
                f"{s.mcnemar_p:.3g}")

    def _records(self) -> list[dict]:
        return self.table()

    def to_dict(self) -> dict:
        """The rows, the ablations and the significance, as plain Python."""
        return {"title": self._title(), "rows": self.table(), "ablations": dict(self.ablations),
                "significance": (None if self.significance is None
                                 else dict(self.significance.__dict__)),
                "n_test": self.n_test, "n_test_all": self.n_test_all}


def default_run_counts(n_models: int) -> list[int]:
    """1, 2, 4, ... up to n_models (and n_models itself)."""
    counts = [2 ** i for i in range(int(math.log2(n_models)) + 1)]
    return counts if counts[-1] == n_models else counts + [n_models]


def disjoint_subsets(n_models: int, n: int, max_subsets: int | None) -> list[slice]:
    """Disjoint contiguous slices of n runs: [0, n), [n, 2n), ... (at most max_subsets;
    None: all n_models // n of them)."""
    if not 1 <= n <= n_models:
        raise InputError(f"a run count must be between 1 and {n_models}, got {n}")
    count = n_models // n if max_subsets is None else min(n_models // n, max_subsets)
    return [slice(i * n, (i + 1) * n) for i in range(count)]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of b against b + c at 1/2.

    Parameters
    ----------
    b, c : int
        The discordant counts (only the first method right; only the second right).

    Returns
    -------
    float
        The two-sided binomial p-value, as `scipy.stats.binomtest(b, b + c, 0.5).pvalue`;
        1.0 when b + c = 0 (no discordant pair, no evidence either way; binomtest refuses
        n = 0). Up to `_EXACT_MCNEMAR_PAIRS` discordant pairs it is computed here,
        exactly: at 1/2 the outcomes no likelier than b are the two tails beyond min(b,
        c), so p = min(1, 2 sum_{i <= min(b, c)} C(n, i) / 2**n), summed in integers and
        divided once (correctly rounded, down to float64's subnormals, where binomtest's
        float sums give 0). Beyond, binomtest's. Importing scipy.stats alone takes 0.6 s
        (`python benchmarks/micro.py scipyimport`), which the report no longer pays.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise InputError(f"McNemar's counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    if n > _EXACT_MCNEMAR_PAIRS:
        from scipy.stats import binomtest

        return float(binomtest(b, n, 0.5).pvalue)
    term = tail = 1  # C(n, 0)
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exactly
        tail += term
    return min(1.0, 2 * tail / (1 << n))


# Discordant pairs up to which `mcnemar_exact` sums the binomial tail in integers (a few
# milliseconds at 20,000); beyond, scipy's binomtest.
_EXACT_MCNEMAR_PAIRS = 20_000


def bootstrap_difference(correct_a: torch.Tensor, correct_b: torch.Tensor, *,
                         n_resamples: int = 2000, seed: int = 0,
                         max_bytes: int = 64 << 20) -> tuple[float, float]:
    """95% percentile interval of mean(correct_a) - mean(correct_b), resampling examples.

    Paired: each resample draws examples with replacement and takes the mean of their
    differences (percentile method, a NumPy generator seeded with `seed`). Where every
    difference is -1, 0 or +1 (whether each method was right), a resample's mean depends
    only on how many +1 and -1 it drew, and n draws with replacement draw those counts
    from Multinomial(n, their shares): the counts are drawn directly, the same bootstrap
    distribution without scipy (whose import takes 0.6 s). Other
    differences go through `scipy.stats.bootstrap`, in batches whose temporaries
    (indices and gathered differences, 16 bytes per example per resample) stay within
    `max_bytes`.

    Parameters
    ----------
    correct_a, correct_b : Tensor of shape (n_examples,), bool or 0/1
        Whether each method got each example right.

    Returns
    -------
    (float, float)
        The 2.5% and 97.5% percentiles of the resampled differences.
    """
    diff = (correct_a.cpu().double() - correct_b.cpu().double()).numpy()
    n = len(diff)
    if n == 0:
        raise InputError("the bootstrap needs at least one example, got none")
    if n == 1:  # every resample is that example (scipy wants two or more)
        return float(diff[0]), float(diff[0])
    rng = np.random.default_rng(seed)
    wins, losses = int((diff == 1).sum()), int((diff == -1).sum())
    if wins + losses + int((diff == 0).sum()) == n:
        counts = rng.multinomial(n, [wins / n, losses / n, 1 - (wins + losses) / n],
                                 size=n_resamples)
        means = (counts[:, 0] - counts[:, 1]) / n
        low, high = np.quantile(means, [0.025, 0.975])  # linear, as scipy's percentile
        return float(low), float(high)
    from scipy.stats import bootstrap

    batch = max(1, min(n_resamples, max_bytes // (16 * n)))
    with np.errstate(invalid="ignore"):  # constant data: every resample has the same mean
        found = bootstrap((diff,), np.mean, n_resamples=n_resamples, batch=batch,
                          vectorized=True, method="percentile", confidence_level=0.95,
                          rng=rng)
    interval = found.confidence_interval
    return float(interval.low), float(interval.high)


def _subset_metrics(train, test, labels_train, labels_test, ks, weighted, common, known=None,
                    progress=None, kept=None):
    """Metrics of one subset; also its neighbours and ensemble predictions (for the tests).

    `known`: neighbours of this very subset computed before (k >= what is needed), reused.
    `kept`: its statistics, from the sweep's shared pass (`KeptStatistics`).
    """
    n_classes = train.n_classes
    singles, mean_logits = singles_and_ensemble(test, labels_test,
                                                memory_budget=common["memory_budget"])
    ensemble = mean_logits.argmax(1)
    out = {"single": float(singles.mean()), "ensemble": accuracy(ensemble, labels_test)}
    if train.n_models < 2:
        return out, None, ensemble
    k_max = max(list(ks) + [weighted[0]])
    found = (known.first(k_max) if known is not None and known.k >= k_max
             else _top_k_neighbors(test, train, k_max, progress=progress,
                                   kept_statistics=kept, **common))
    for k in ks:
        out[f"knn_k{k}"] = accuracy(knn_predict(found, labels_train, n_classes, k), labels_test)
    out["weighted"] = accuracy(weighted_predict(found, labels_train, n_classes, *weighted),
                               labels_test)
    return out, found, ensemble


def sweep(
    train: LogitSource,
    test: LogitSource,
    labels_train: torch.Tensor,
    labels_test: torch.Tensor,
    *,
    runs: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 3, 5, 9),
    weighted: tuple[int, int] = (20, 4),
    max_subsets: int | None = DEFAULT_MAX_SUBSETS,
    test_examples: int | None = DEFAULT_TEST_EXAMPLES,
    significance_k: int = 3,
    precision: str = "auto",
    memory_budget: int | None = None,
    device: str = "cpu",
    neighbors: Neighbors | None = None,
    progress: ProgressCallback | None = None,
    kept_statistics: KeptStatistics | None = None,
) -> SweepResult:
    """Accuracy against the number of runs over disjoint subsets, plus ablations.

    Parameters
    ----------
    train, test : array, Tensor or LogitSource of shape (n_models, n_train | n_test, n_classes)
        Train first, as everywhere.
    labels_train, labels_test : array or Tensor of shape (n_train,) and (n_test,), integers.
    runs : run counts to evaluate; default 1, 2, 4, ..., n_models.
    max_subsets : disjoint subsets per run count, at most (default 3); None: all
        n_models // n of them (the full sweep, about log2(n_models) kernels' work).
    test_examples : test examples every figure is computed on, at most (default 2,000):
        example (i * n_test) // test_examples for each i, so spread evenly over the split
        (a split sorted by class keeps every class); None: every test example. Their
        kernel values and neighbours are exactly those of the whole split: only the
        accuracies are estimates, from fewer examples. `n_test` of the result says how
        many.
    memory_budget : bytes for the whole sweep (default: a quarter of what is available).
        What the sweep keeps between kernels (the neighbours and predictions of the
        subsets, see `_held_bytes`) is taken off it; the rest goes to each kernel, to the
        blocks of runs read for the accuracies, and to the bootstrap, one at a time.
    device : where the kernels are computed.
    neighbors : test -> train neighbours over all runs, of every test example, if already
        computed (k >= 20): reused for the subset of all runs instead of computing that
        kernel again (the caller holds them, and counts them in its own budget).
    progress : called with a `Progress` per stage: 'statistics' and 'ablations' of the
        ablations' pass (first), 'sweep statistics' for the subsets' shared pass, then
        'sweep' (runs' worth of kernel work done over the subsets, so the time left is
        that of the rest of the sweep).
    kept_statistics : statistics of the train split over all runs, kept from the pass
        that computed `neighbors` (`engine.KeptStatistics`): the ablations' pass, which
        comes first, takes them instead of passing over every run again; then the sweep
        empties them. Where `memory_budget` is given, the caller took their `nbytes` off
        it, and the sweep gives them back to its kernels as it drops them.

    Returns
    -------
    SweepResult
    """
    from ._evaluation import _require_labels, _require_train_split

    if max_subsets is not None and (not isinstance(max_subsets, int) or max_subsets < 1):
        raise InputError(f"max_subsets must be a positive integer or None (every disjoint "
                         f"subset), got {max_subsets!r}")
    if test_examples is not None:
        if isinstance(test_examples, bool) or not isinstance(test_examples, numbers.Integral) \
                or test_examples < 1:
            raise InputError(f"test_examples must be a positive integer or None (every test "
                             f"example), got {test_examples!r}")
        test_examples = int(test_examples)
    train, test = as_source(train, "train logits"), as_source(test, "test logits")
    _require_train_split(train, "sweep")
    labels_train = _require_labels(labels_train, "train")
    labels_test = _require_labels(labels_test, "test")
    check_labels(labels_train, train.n_examples, train.n_classes, "train")
    check_labels(labels_test, test.n_examples, test.n_classes, "test")
    if neighbors is not None and neighbors.indices.shape[0] != test.n_examples:
        raise InputError(f"neighbors has {neighbors.indices.shape[0]} rows but the test split "
                         f"has {test.n_examples} examples: pass the neighbours of every one")
    pick = None
    if test_examples is not None and test_examples < test.n_examples:
        pick = sample_positions(test.n_examples, test_examples)
        labels_test = labels_test[pick]
        if neighbors is not None:
            neighbors = Neighbors(neighbors.indices[pick.to(neighbors.indices.device)],
                                  neighbors.values[pick.to(neighbors.values.device)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = _sweep(train, test, labels_train, labels_test, runs=runs, ks=ks,
                        weighted=weighted, max_subsets=max_subsets,
                        significance_k=significance_k, precision=precision,
                        memory_budget=memory_budget, device=device, neighbors=neighbors,
                        sample=pick, progress=progress,
                        kept=kept_statistics)
    constant = [w for w in caught if "identical in every run" in str(w.message)]
    for w in caught:
        if w not in constant:
            warnings.warn(w.message, w.category, stacklevel=2)
    if constant:
        warnings.warn(f"{len(constant)} of the sweep's kernels met outputs identical in every "
                      "run of their subset (std 0: common with few runs and float16 storage); "
                      "those contribute 0", RuntimeWarning, stacklevel=2)
    return result


def _held_bytes(n_test: int, n_classes: int, k: int) -> int:
    """What the sweep keeps alive while a kernel is computed: the neighbours of the
    largest subset and of the one before (indices and values, 16 bytes each), ensemble
    predictions and correctness flags, and one float64 mean of the logits."""
    return n_test * (3 * 16 * k + 8 * n_classes + 64)


def _sweep(train, test, labels_train, labels_test, *, runs, ks, weighted, max_subsets,
           significance_k, precision, memory_budget, device, neighbors, sample,
           progress, kept=None) -> SweepResult:
    """The sweep; on the test examples `sample` (positions, or None: all), which are
    read once into memory (and counted in the budget) when given."""
    n_models, n_classes = train.n_models, train.n_classes
    runs = sorted(set(runs or default_run_counts(n_models)))
    ks = sorted(set(ks))
    k_max = max(ks + [weighted[0]])
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    n_test_all = test.n_examples
    n_test = n_test_all if sample is None else len(sample)
    held = _held_bytes(n_test, n_classes, k_max)
    if sample is not None:
        held += sample_bytes(test, n_test)
    left = budget_beside(budget, held, "the sweep's neighbours and predictions" if sample is None
                         else "the sweep's neighbours, predictions and test sample")
    if sample is not None:  # read once, its transient read within a quarter of the rest
        test = read_sample(test, sample, left // 4)
    plan = [(n, disjoint_subsets(n_models, n, max_subsets)) for n in runs]
    # The caller took the kept statistics off `memory_budget`: they are given back to the
    # ablations' pass, whose plan counts its statistics (these among them), and to every
    # kernel after it, once they are dropped.
    given_back = kept.nbytes if kept is not None and memory_budget is not None else 0
    last, last_parts = plan[-1]
    largest_known, ablations = None, {}
    if last >= 2:  # the ablations in one pass, first, beside the first largest subset's
        part = last_parts[0]  # full kernel if not known
        known = neighbors if (part.start, part.stop) == (0, n_models) else None
        found = ablation_neighbors(
            select_runs(test, part), select_runs(train, part), significance_k,
            k_full=None if known is not None else k_max, memory_budget=left + given_back,
            device=device, progress=progress, kept_statistics=kept, precision=precision)
        ablations = _ablation_accuracies(found, labels_train, labels_test, significance_k)
        largest_known = known if known is not None else found.full
        del found
    if kept is not None:
        kept.clear()
        left += given_back

    def known_for(n: int, part: slice) -> Neighbors | None:
        """Neighbours of this subset computed before, with enough of them to reuse."""
        known = neighbors if (part.start, part.stop) == (0, n_models) else None
        if n == last and part is last_parts[0] and largest_known is not None:
            known = largest_known
        return known if known is not None and known.k >= k_max else None

    on = resolve_device(device)
    computed = [part for n, parts in plan if n >= 2 for part in parts
                if known_for(n, part) is None]
    shared, held = _shared_statistics(train, test, computed, on, left, k_max, precision,
                                      progress)
    common = dict(precision=precision, memory_budget=left - held, device=device)
    clock = _SweepClock(progress, plan)
    rows: list[SweepRow] = []
    largest = None
    for n, parts in plan:
        values: dict[str, list[float]] = {}
        for part in parts:
            sub_train, sub_test = select_runs(train, part), select_runs(test, part)
            metrics, found, ensemble = _subset_metrics(
                sub_train, sub_test, labels_train, labels_test, ks, weighted, common,
                known=known_for(n, part), progress=clock.engine(n),
                kept=_kept_for(shared.pop((part.start, part.stop), None), sub_test, sub_train,
                               on))
            clock.subset_done(n)
            for name, v in metrics.items():
                values.setdefault(name, []).append(v)
            if n == runs[-1] and largest is None:
                largest = (part, found, ensemble)
        for name, vs in values.items():
            t = torch.tensor(vs, dtype=torch.float64)
            rows.append(SweepRow(n, name, float(t.mean()),
                                 float(t.std()) if len(vs) > 1 else 0.0,
                                 float(t.min()), float(t.max()), len(vs)))
    significance = None
    if largest is not None and largest[1] is not None:
        significance = _significance(largest, labels_train, labels_test, n_classes,
                                     significance_k, left)
    return SweepResult(tuple(rows), ablations, significance, n_test=n_test,
                       n_test_all=n_test_all)


def _shared_statistics(train, test, parts: list[slice], device: torch.device, left: int,
                       k: int, precision: str, progress: ProgressCallback | None
                       ) -> tuple[dict, int]:
    """The statistics of the subsets `parts` (those whose kernels the sweep computes), in
    one pass over their runs per split (`engine.shared_statistics`) rather than one per
    subset: the subsets of different run counts overlap (runs 0..n-1 are in the first
    subset of every count), so each run is read and prepared once instead of up to
    log2(n_models) times.

    Returns {(start, stop): ((mean, scale) of the test split, of the train split)} for
    the subsets the pass could do (the others' engines do their own), and the bytes they
    hold: 16 a (subset, example, class). Done only where the subsets overlap at all, where
    that is at most a quarter of `left`, and where every mode the kernels could take
    without it still fits beside it (else the sweep would refuse a budget it takes without
    the pass, or auto lose fast mode). Smaller room can still cut the kernels' tiles
    otherwise, so where their values tie within float32 rounding (a kernel of 2 runs is
    nearly all ties) the neighbours, and the accuracies, may differ from those without
    the pass, as between any two plans.
    """
    if not parts or sum(p.stop - p.start for p in parts) <= \
            max(p.stop for p in parts) - min(p.start for p in parts):
        return {}, 0
    per_part = 16 * (train.n_examples + test.n_examples) * train.n_classes
    most = per_part * len(parts)
    if most > left // 4:
        return {}, 0
    # The kernels' smallest plan does not depend on their runs (one run a block, one
    # reference a tile): one check of each mode the kernels may take. The mode asked for
    # must fit beside the results; under auto, exact mode (its fallback), and fast mode
    # wherever it fits without them, so that the pass never takes fast mode from auto.
    raw_bytes = max(item_size(train), item_size(test))  # (each reads a logit)

    def fits(mode: str, budget: int) -> bool:
        return plan_if_fits(test.n_examples, train.n_examples,
                            max(p.stop - p.start for p in parts), train.n_classes,
                            k_keep=candidates_per_query(k, mode), budget=budget,
                            precision=mode, raw_bytes=raw_bytes, device=device) is not None

    if precision in ("exact", "fast"):
        room = fits(precision, left - most)
    else:
        room = fits("exact", left - most) and (fits("fast", left - most)
                                               or not fits("fast", left))
    if not room:
        return {}, 0
    budget = (left - most) // 4  # the pass's reads and pieces
    of_train = shared_statistics(train, parts, device=device, budget=budget, progress=progress)
    kept = [(p, r) for p, r in zip(parts, of_train) if r is not None]
    of_test = shared_statistics(test, [p for p, _ in kept], device=device,
                                budget=budget) if kept else []
    found = {(p.start, p.stop): (q, r) for (p, r), q in zip(kept, of_test) if q is not None}
    return found, per_part * len(found)


def _kept_for(stats, sub_test, sub_train, device) -> KeptStatistics | None:
    """The shared pass's statistics of one subset, as its engine takes them (warning, as
    its own pass would, of outputs no run of the subset changes)."""
    if stats is None:
        return None
    kept = KeptStatistics(sub_test, sub_train)
    for source, split, (mean, scale) in zip((sub_test, sub_train), ("query", "reference"),
                                            stats):
        n_constant = int((scale == 0).sum())
        if n_constant:
            warn_constant(n_constant, split)
        kept.put(source, True, None, device, ClassStats.from_float64(mean, scale, None))
    return kept


def _ablation_accuracies(found, labels_train, labels_test, k: int) -> dict[str, float]:
    """k-NN accuracy of each ablation kernel: 'no_log_softmax', 'class_{c}_only'."""
    n_classes = len(found.per_class)
    out = {}
    if found.no_log_softmax is not None:
        out["no_log_softmax"] = accuracy(
            knn_predict(found.no_log_softmax, labels_train, n_classes, k), labels_test)
    for c, alone in enumerate(found.per_class):
        out[f"class_{c}_only"] = accuracy(knn_predict(alone, labels_train, n_classes, k),
                                          labels_test)
    return out


def _significance(largest, labels_train, labels_test, n_classes, k3, left) -> Significance:
    part, found, ensemble = largest
    knn_ok = knn_predict(found, labels_train, n_classes, k3) == labels_test
    ens_ok = ensemble == labels_test
    b, c = int((knn_ok & ~ens_ok).sum()), int((~knn_ok & ens_ok).sum())
    low, high = bootstrap_difference(knn_ok, ens_ok, max_bytes=left)
    return Significance(
        n_models=part.stop - part.start, k=k3, knn_accuracy=float(knn_ok.double().mean()),
        ensemble_accuracy=float(ens_ok.double().mean()), only_knn_correct=b,
        only_ensemble_correct=c, mcnemar_p=mcnemar_exact(b, c),
        difference=float(knn_ok.double().mean() - ens_ok.double().mean()),
        ci_low=low, ci_high=high)


class _SweepClock:
    """The 'sweep' stage's progress: kernel work in runs (a subset of n runs weighs n),
    advanced within a subset by its engine's progress, so that the bar's time left is
    the whole sweep's."""

    def __init__(self, progress: ProgressCallback | None, plan):
        self.progress = progress
        self.total = sum(max(n, 1) * len(parts) for n, parts in plan)
        self.n_subsets = sum(len(parts) for _, parts in plan)
        self.done = self.subsets = 0
        self.start = time.perf_counter()

    def _emit(self, done: float) -> None:
        if self.progress is not None:
            self.progress(Progress("sweep", int(done), self.total, self.subsets,
                                   self.n_subsets, time.perf_counter() - self.start))

    def engine(self, n: int) -> ProgressCallback | None:
        if self.progress is None:
            return None

        def report(p: Progress) -> None:
            if p.stage == "kernel" and p.total:
                self._emit(self.done + max(n, 1) * p.done / p.total)
        return report

    def subset_done(self, n: int) -> None:
        self.done += max(n, 1)
        self.subsets += 1
        self._emit(self.done)
