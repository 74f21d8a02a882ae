"""The report's ablations in one pass (`ablations.py`) against their plain twins: the
one-at-a-time engine runs (`top_k_neighbors(classes=[c])`, `log_softmax=False`) and the
float64 definition (`dense_kernel`), on adversarial data."""

from __future__ import annotations

import pytest
import torch

from ensemble_kernel.core._engine import _top_k_neighbors as top_k_neighbors  # queries first, with hooks
from ensemble_kernel.analysis._ablations import ablation_neighbors
from ensemble_kernel.errors import InputError
from ensemble_kernel.analysis._evaluation import accuracy, knn_predict
from ensemble_kernel.core._kernel import dense_kernel
from ensemble_kernel.core._plan import plan_memory
from ensemble_kernel.core._sources import ArraySource
from ensemble_kernel.analysis._sweep import sweep

from conftest import assert_same_neighbors, make_ensemble


def adversarial(seed: int = 0, n_models: int = 7, n_train: int = 90, n_test: int = 30,
                n_classes: int = 4):
    """Ties, constant outputs, near-equal values and an outlier run, all in one ensemble."""
    ens = make_ensemble(seed=seed, n_models=n_models, n_train=n_train, n_test=n_test,
                        n_classes=n_classes)
    train, test = ens.train.clone(), ens.test.clone()
    train[2] *= 100.0  # an outlier run
    test[2] *= 100.0
    train[:, 5] = train[:, 3]  # exact duplicates: exact ties in every kernel
    train[:, 11] = train[:, 3]
    train[:, 7] = train[:1, 7]  # identical in every run: std 0 in every class
    test[:, 2] = test[:1, 2]
    train[:, :, 1] = 1.5  # a class whose logit is the same everywhere
    test[:, :, 1] = 1.5
    train[:, 20, 0] = 0.5  # exactly representable, next to a nearly equal one
    train[:, 21, 0] = 0.5 + 2.0 ** -20
    return ens, train, test


def _old_path(test, train, labels_train, labels_test, n_classes, k=3):
    """The ablations as the sweep computed them before: one engine run per kernel."""
    out = {"no_log_softmax": accuracy(knn_predict(
        top_k_neighbors(test, train, k, log_softmax=False), labels_train, n_classes, k),
        labels_test)}
    for c in range(n_classes):
        alone = top_k_neighbors(test, train, k, classes=[c])
        out[f"class_{c}_only"] = accuracy(knn_predict(alone, labels_train, n_classes, k),
                                          labels_test)
    return out


@pytest.mark.parametrize("chunk_models, tile_size", [(None, None), (3, 17), (1, 90), (7, 1)])
def test_every_kernel_of_the_pass_matches_the_definition(chunk_models, tile_size):
    ens, train, test = adversarial()
    with pytest.warns(RuntimeWarning, match="identical in every run"):
        found = ablation_neighbors(test, train, 3, k_full=5, chunk_models=chunk_models,
                                   tile_size=tile_size, memory_budget=1 << 26)
    for c, alone in enumerate(found.per_class):
        assert_same_neighbors(alone.indices, alone.values,
                              dense_kernel(test, train, classes=[c]), 3)
    assert_same_neighbors(found.full.indices, found.full.values, dense_kernel(test, train), 5)
    assert_same_neighbors(found.no_log_softmax.indices, found.no_log_softmax.values,
                          dense_kernel(test, train, log_softmax=False), 3)


def test_the_full_kernel_is_exact_modes_bit_for_bit_under_the_same_blocks():
    ens, train, test = adversarial(seed=1)
    with pytest.warns(RuntimeWarning):
        found = ablation_neighbors(test, train, 3, k_full=20, chunk_models=2, tile_size=25,
                                   memory_budget=1 << 26)
        plain = top_k_neighbors(test, train, 20, chunk_models=2, tile_size=25,
                                memory_budget=1 << 26)
    assert torch.equal(found.full.indices, plain.indices)
    assert torch.equal(found.full.values, plain.values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ablation_accuracies_equal_the_one_at_a_time_path(seed):
    ens, train, test = adversarial(seed=seed)
    n_classes = train.shape[2]
    with pytest.warns(RuntimeWarning):
        old = _old_path(test, train, ens.labels_train, ens.labels_test, n_classes)
        found = ablation_neighbors(test, train, 3, memory_budget=1 << 26)
    assert found.full is None
    new = {"no_log_softmax": accuracy(knn_predict(found.no_log_softmax, ens.labels_train,
                                                  n_classes, 3), ens.labels_test)}
    for c, alone in enumerate(found.per_class):
        new[f"class_{c}_only"] = accuracy(knn_predict(alone, ens.labels_train, n_classes, 3),
                                          ens.labels_test)
    assert new == old
    # The constant example ties with everything at 0 in every per-class kernel: its
    # neighbours are the smallest indices, whichever path.
    for alone in found.per_class:
        assert alone.indices[2].tolist() == [0, 1, 2] and bool((alone.values[2] == 0).all())


def test_the_sweeps_ablations_are_the_one_at_a_time_ones():
    ens, train, test = adversarial(seed=3)
    with pytest.warns(RuntimeWarning):
        old = _old_path(test, train, ens.labels_train, ens.labels_test, train.shape[2])
        result = sweep(ArraySource(train), ArraySource(test), ens.labels_train,
                       ens.labels_test, runs=[2, 7])
    assert result.ablations == old


def _budget_where_no_log_softmax_needs_more_tiles(n_q, n_r, n_models, n_classes, k):
    """A budget under which the pass with the no-log-softmax kernel needs more tiles than
    without it (computed from the plan, not guessed)."""
    for budget in range(8 << 20, 64 << 20, 1 << 18):
        kw = dict(k_keep=k, budget=budget, raw_bytes=4)
        try:
            alone = plan_memory(n_q, n_r, n_models, 2 * n_classes, n_kernels=n_classes, **kw)
            both = plan_memory(n_q, n_r, n_models, 4 * n_classes, n_kernels=n_classes + 1, **kw)
        except Exception:
            continue
        if both.n_tiles > alone.n_tiles:
            return budget
    raise AssertionError("no such budget in the range tried")


def test_no_log_softmax_joins_the_pass_only_where_the_budget_allows():
    ens = make_ensemble(n_models=6, n_train=3000, n_test=400, n_classes=4)
    budget = _budget_where_no_log_softmax_needs_more_tiles(400, 3000, 6, 4, 3)
    tight = ablation_neighbors(ens.test, ens.train, 3, memory_budget=budget)
    roomy = ablation_neighbors(ens.test, ens.train, 3, memory_budget=1 << 30)
    assert not tight.fused_no_log_softmax and roomy.fused_no_log_softmax
    want = dense_kernel(ens.test, ens.train, log_softmax=False)
    for found in (tight, roomy):
        assert_same_neighbors(found.no_log_softmax.indices, found.no_log_softmax.values, want, 3)
    assert ablation_neighbors(ens.test, ens.train, 3, no_log_softmax=False,
                              memory_budget=1 << 26).no_log_softmax is None


def test_a_budget_too_small_for_the_pass_computes_one_kernel_at_a_time():
    ens = make_ensemble(n_models=6, n_train=3000, n_test=2000, n_classes=6)
    kw = dict(k_keep=3, raw_bytes=4)
    budget = next(b for b in range(4 << 20, 256 << 20, 1 << 18)
                  if _fits(2000, 3000, 6, 6, b, **kw) and not _fits(2000, 3000, 6, 12, b,
                                                                     n_kernels=6, **kw))
    found = ablation_neighbors(ens.test, ens.train, 3, memory_budget=budget)
    assert not found.one_pass and not found.fused_no_log_softmax
    assert ablation_neighbors(ens.test, ens.train, 3, memory_budget=1 << 30).one_pass
    for c, alone in enumerate(found.per_class):
        assert_same_neighbors(alone.indices, alone.values,
                              dense_kernel(ens.test, ens.train, classes=[c]), 3)
    assert_same_neighbors(found.no_log_softmax.indices, found.no_log_softmax.values,
                          dense_kernel(ens.test, ens.train, log_softmax=False), 3)


def _fits(n_q, n_r, n_models, n_used, budget, **kw) -> bool:
    from ensemble_kernel.errors import BudgetError

    try:
        plan_memory(n_q, n_r, n_models, n_used, budget=budget, **kw)
        return True
    except BudgetError:
        return False


@pytest.mark.parametrize("bad", [0, 91, 2.5])
def test_a_bad_k_is_refused(bad):
    ens, train, test = adversarial()
    with pytest.raises(InputError, match=r"k must be between 1 and 90 \(the number of "
                                         r"references\), got"):
        ablation_neighbors(test, train, bad)
    with pytest.raises(InputError, match=r"k_full must be between 1 and 90"):
        ablation_neighbors(test, train, 3, k_full=bad)


def test_kept_train_statistics_are_taken_only_for_the_source_and_normalisation_kept():
    """`KeptStatistics`: the first engine run over the kept source passes over its runs and
    keeps what it found; a later run with the same normalisation takes that instead; the
    queries, another source object with the same values, or another normalisation (no
    log-softmax, one class) pass over their runs again."""
    from ensemble_kernel.core import _engine as engine

    ens, train, test = adversarial(seed=4)
    train_src, test_src = ArraySource(train), ArraySource(test)
    passes = []
    real = engine._Engine._statistics

    def counted(self, source, split):
        passes.append((source, self.log_softmax, self.classes))
        return real(self, source, split)

    kept = engine.KeptStatistics(train_src)
    with pytest.MonkeyPatch.context() as mp, pytest.warns(RuntimeWarning):
        mp.setattr(engine._Engine, "_statistics", counted)
        first = top_k_neighbors(test_src, train_src, 5, kept_statistics=kept)
        assert [p[0] for p in passes] == [test_src, train_src]
        assert kept.nbytes == train.shape[1] * train.shape[2] * 28  # no precise rows here
        passes.clear()
        again = top_k_neighbors(test_src, train_src, 5, kept_statistics=kept)
        assert [p[0] for p in passes] == [test_src]  # the train split's were kept
        assert torch.equal(again.indices, first.indices)  # same plan, same statistics
        assert torch.equal(again.values, first.values)
        passes.clear()
        top_k_neighbors(test_src, ArraySource(train.clone()), 5, kept_statistics=kept)
        top_k_neighbors(test_src, train_src, 5, kept_statistics=kept, log_softmax=False)
        top_k_neighbors(test_src, train_src, 5, kept_statistics=kept, classes=[2])
        assert sum(p[0] is not test_src for p in passes) == 3
        assert {(p[1], p[2]) for p in passes if p[0] is train_src} == {(False, None),
                                                                         (True, (2,))}


def test_the_sweep_with_kept_statistics_gives_the_same_ablations():
    """The report's path: the test -> train pass keeps the train statistics and the sweep's
    ablations take them; the ablations equal the one-at-a-time ones, computed afresh,
    and the ablation pass passed over the train runs once (no log-softmax) not twice."""
    from ensemble_kernel.core import _engine as engine

    ens, train, test = adversarial(seed=3)
    train_src, test_src = ArraySource(train), ArraySource(test)
    kept = engine.KeptStatistics(train_src)
    with pytest.warns(RuntimeWarning):
        old = _old_path(test, train, ens.labels_train, ens.labels_test, train.shape[2])
        found = top_k_neighbors(test_src, train_src, 20, kept_statistics=kept)
        passes = []
        real = engine._Engine._statistics

        def counted(self, source, split):
            passes.append((source, self.log_softmax))
            return real(self, source, split)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine._Engine, "_statistics", counted)
            result = sweep(train_src, test_src, ens.labels_train, ens.labels_test,
                           runs=[2, 7], neighbors=found, kept_statistics=kept)
    assert result.ablations == old
    assert (train_src, True) not in passes and (train_src, False) in passes


def test_the_sweep_gives_the_kept_statistics_bytes_back_to_every_kernel(monkeypatch):
    """The caller takes the kept statistics off the sweep's budget; the ablations' pass
    (whose plan counts its statistics) and then every subset's kernel (once the sweep has
    dropped them) get exactly the budget they get without kept statistics."""
    from ensemble_kernel.core import _engine as engine
    from ensemble_kernel.analysis import _sweep as sweeps

    ens, train, test = adversarial(seed=5)
    train_src, test_src = ArraySource(train), ArraySource(test)
    budget = 64 << 20
    seen = []
    real_top_k, real_ablations = sweeps._top_k_neighbors, sweeps.ablation_neighbors

    def top_k(*args, **kwargs):
        seen.append(("kernel", kwargs["memory_budget"]))
        return real_top_k(*args, **kwargs)

    def ablations(*args, **kwargs):
        seen.append(("ablations", kwargs["memory_budget"]))
        return real_ablations(*args, **kwargs)

    monkeypatch.setattr(sweeps, "_top_k_neighbors", top_k)
    monkeypatch.setattr(sweeps, "ablation_neighbors", ablations)
    with pytest.warns(RuntimeWarning):
        kept = engine.KeptStatistics(train_src)
        found = top_k_neighbors(test_src, train_src, 20, kept_statistics=kept)
        held = kept.nbytes
        assert held > 0
        with_kept = sweep(train_src, test_src, ens.labels_train, ens.labels_test,
                          runs=[2, 4, 7], neighbors=found, kept_statistics=kept,
                          memory_budget=budget - held)
        budgets_with_kept, seen[:] = list(seen), []
        without = sweep(train_src, test_src, ens.labels_train, ens.labels_test,
                        runs=[2, 4, 7], neighbors=found, memory_budget=budget)
    assert kept.nbytes == 0  # dropped after the ablations' pass
    assert budgets_with_kept == seen and seen[0][0] == "ablations" and len(seen) > 2
    assert with_kept.ablations == without.ablations


@pytest.mark.parametrize("precision, runs", [("exact", "exact"), ("fast", "auto"),
                                             ("auto", "auto")])
def test_the_kernels_outside_the_pass_run_exact_where_exact_was_asked(monkeypatch, precision,
                                                                      runs):
    # The kernel without log-softmax, where the pass cannot hold it, and each kernel of the
    # one-at-a-time path once resolved 'auto' of their own even where exact was asked for.
    # Now exact is exact; a choice of fast, made for another kernel, leaves them 'auto'
    # (fast mode where it fits their budget and pays for their shape).
    import ensemble_kernel.analysis._ablations as ab

    if precision == "exact":
        def no_auto(*args, **kwargs):
            raise AssertionError("a kernel resolved 'auto' of its own")

        from ensemble_kernel.core import _pilot

        monkeypatch.setattr(_pilot, "resolve_auto", no_auto)
    asked = []
    real = ab._top_k_neighbors
    monkeypatch.setattr(ab, "_top_k_neighbors",
                        lambda *a, **kw: asked.append(kw["precision"]) or real(*a, **kw))
    ens = make_ensemble(n_models=6, n_train=3000, n_test=400, n_classes=4)
    budget = _budget_where_no_log_softmax_needs_more_tiles(400, 3000, 6, 4, 3)
    separate = ablation_neighbors(ens.test, ens.train, 3, memory_budget=budget,
                                  precision=precision)
    assert not separate.fused_no_log_softmax and asked == [runs]
    assert_same_neighbors(separate.no_log_softmax.indices, separate.no_log_softmax.values,
                          dense_kernel(ens.test, ens.train, log_softmax=False), 3)
    asked.clear()
    small = make_ensemble(n_models=6, n_train=3000, n_test=2000, n_classes=6)
    kw = dict(k_keep=3, raw_bytes=4)
    tight = next(b for b in range(4 << 20, 256 << 20, 1 << 18)
                 if _fits(2000, 3000, 6, 6, b, **kw) and not _fits(2000, 3000, 6, 12, b,
                                                                    n_kernels=6, **kw))
    assert not ablation_neighbors(small.test, small.train, 3, memory_budget=tight,
                                  precision=precision).one_pass
    assert asked and set(asked) == {runs}
    if precision == "exact":  # and through the sweep, which passes its precision on
        sweep(ens.train, ens.test, ens.labels_train, ens.labels_test, precision="exact",
              memory_budget=budget * 4, runs=[2, 6])


def test_ablations_refuse_a_precision_typo():
    ens = make_ensemble(n_models=3, n_train=40, n_test=10)
    with pytest.raises(InputError, match="precision must be 'auto', 'exact' or 'fast'"):
        ablation_neighbors(ens.test, ens.train, 3, precision="bf16")
