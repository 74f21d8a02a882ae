"""The sweep's shared statistics pass (`engine.shared_statistics`): each subset's
statistics are its own engine's (bit for bit where both cut the rows into the same pieces,
as here; within float32 rounding elsewhere, as two plans of the engine), and whatever that
pass cannot do in float32 alone is left to the engine, which names a bad value or redoes
an example in float64.

The inputs are built to break it: subsets of every run count overlapping as the sweep's
do, float16 logits with ties and outputs no run of a subset changes, an outlier run,
an example that needs float64, a logit margin beyond float32, a NaN in one run, and
pieces and blocks of examples a few rows wide.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ensemble_kernel.core import _engine as engine

from ensemble_kernel.analysis import _sweep as sweeps
from ensemble_kernel.core._engine import _prepare_engine, shared_statistics
from ensemble_kernel.errors import BudgetError, NonFiniteError
from ensemble_kernel.core._sources import ArraySource, select_runs
from ensemble_kernel.analysis._sweep import default_run_counts, disjoint_subsets, sweep

from conftest import make_ensemble

CPU = torch.device("cpu")


def _parts(n_models: int, max_subsets: int | None = 3) -> list[slice]:
    return [p for n in default_run_counts(n_models) if n >= 2
            for p in disjoint_subsets(n_models, n, max_subsets)]


def _engine_statistics(source, part):
    """The statistics the subset's own engine computes (one block of all its runs), and
    whether it took any of them in float64 (a piece redone, or an example kept precise)."""
    sub = select_runs(source, part)
    redone = []
    real, real_prepare = engine._Engine._update_precisely, engine.prepare

    def prepare(*a, **k):  # a piece with a row float32 cannot hold comes back float64
        x = real_prepare(*a, **k)  # (not the float64 check of a constant output, which
        # keeps float32 statistics where float64 finds it constant too: `precise` says)
        redone.extend([1] if x.dtype != torch.float32 and k.get("precise") is None else [])
        return x
    engine._Engine._update_precisely = lambda *a: redone.append(1) or real(*a)
    engine.prepare = prepare
    try:
        with warnings.catch_warnings():  # (outputs no run changes: warned of elsewhere)
            warnings.simplefilter("ignore", RuntimeWarning)
            eng = _prepare_engine(sub, sub, 1, log_softmax=True, classes=None,
                                  exclude_self=False, precision="exact",
                                  memory_budget=1 << 30, device="cpu", chunk_models=None,
                                  tile_size=None, progress=None, k_keep=1)
    finally:
        engine._Engine._update_precisely, engine.prepare = real, real_prepare
    assert eng.plan.chunk_models >= part.stop - part.start
    return eng.stats_r, bool(redone) or eng.stats_r.precise is not None


def _hard_logits(n_models=16, n=57, n_classes=5, seed=0) -> torch.Tensor:
    """float16 logits: ties, outputs no run of a subset changes, an outlier run, and
    values next to exactly representable ones."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n_models, n, n_classes, generator=g) * 2).half()
    x[:, 0] = 1.0  # identical in every run: constant for every subset
    x[:2, 1] = x[0, 1]  # constant in the first subset of 2 runs only
    x[:4, 2] = x[0, 2]
    x[1:4:2, 2, 0] = torch.nextafter(x[0, 2, 0], torch.tensor(9.0, dtype=torch.float16))
    # (runs 0-3: example 2 one ulp apart in class 0, so float32 cannot standardise it)
    x[:, 3] = x[:, 4]  # two examples tied in every run
    x[5] = x[5] * 4 + 1000  # an outlier run (its margins still within float32's reach)
    return x


@pytest.mark.parametrize("piece_bytes, budget", [(4 << 20, 1 << 30), (512, 3000), (1, 1)])
def test_each_subset_gets_its_own_engines_statistics_bit_for_bit(monkeypatch, piece_bytes,
                                                                  budget):
    # Tiny pieces and blocks of examples: rows cut at every boundary.
    monkeypatch.setattr(engine, "_PIECE_CACHE_BYTES", piece_bytes)
    source = ArraySource(_hard_logits())
    parts = _parts(16, None)
    found = shared_statistics(source, parts, device=CPU, budget=budget)
    left = 0
    for part, got in zip(parts, found):
        want, in_float64 = _engine_statistics(source, part)
        # Left to the engine exactly where it takes some of them in float64 (here no
        # piece of the shared pass has a row float32 cannot hold: see the next test).
        assert (got is None) == in_float64, part
        if got is None:
            left += 1
            continue
        assert torch.equal(got[0], want.mean) and torch.equal(got[1], want.scale), part
    # float16 values of 2 runs are often near-equal, so every 2-run subset has an example
    # float32 cannot standardise; runs 0-3 one ulp apart do the same for [0, 4).
    assert left == 9


def _none(source, parts) -> set[tuple[int, int]]:
    found = shared_statistics(source, parts, device=CPU, budget=1 << 30)
    return {(p.start, p.stop) for p, f in zip(parts, found) if f is None}


def _in_float64(source, parts) -> set[tuple[int, int]]:
    """The parts whose own engine takes some statistics in float64."""
    return {(p.start, p.stop) for p in parts if _engine_statistics(source, p)[1]}


def test_parts_that_need_float64_are_left_to_the_engine():
    x = make_ensemble(n_models=8, n_train=30).train.double()
    parts = _parts(8)  # [0, 2), [2, 4), [4, 6), [0, 4), [4, 8), [0, 8)
    before = _in_float64(ArraySource(x), parts)  # (2 runs: some near-equal by chance)
    assert _none(ArraySource(x), parts) == before and (4, 8) not in before
    x[5, 7] = x[4, 7] + 1e-4  # runs 4-5: example 7 varies too little for float32
    assert _in_float64(ArraySource(x), parts) == before | {(4, 6)}
    assert _none(ArraySource(x), parts) == before | {(4, 6)}
    # A margin beyond float32's log-softmax in run 6: its piece is float64, and the pass
    # leaves every part to the engines (which take that row in float64 only where their
    # runs hold it).
    x[6, 9, 0] = 200.0
    assert (4, 8) in _in_float64(ArraySource(x), parts)
    assert _none(ArraySource(x), parts) == {(p.start, p.stop) for p in parts}


def test_a_nan_leaves_its_subsets_to_the_engine_which_names_it():
    ens = make_ensemble(n_models=8, n_train=30, n_test=12)
    parts = _parts(8)
    before = _in_float64(ArraySource(ens.train), parts)
    assert _none(ArraySource(ens.train), parts) == before
    train = ens.train.clone()
    train[5, 11, 2] = float("nan")
    assert _none(ArraySource(train), parts) == before | {(p.start, p.stop) for p in parts
                                                         if p.start <= 5 < p.stop}
    with pytest.raises(NonFiniteError, match="run 5.*example 11, class 2"):
        sweep(ArraySource(train), ArraySource(ens.test), ens.labels_train, ens.labels_test)


def _without_sharing(monkeypatch):
    monkeypatch.setattr(sweeps, "_shared_statistics", lambda *a, **k: ({}, 0))


def _run(train, test, ens, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sweep(ArraySource(train), ArraySource(test), ens.labels_train,
                       ens.labels_test, **kw)
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_the_sweep_is_the_same_with_and_without_the_shared_pass(monkeypatch, precision):
    ens = make_ensemble(n_models=16, n_train=57, n_test=23)
    train, test = _hard_logits(16, 57), _hard_logits(16, 23, seed=1)
    passes = []
    real = engine._Engine._statistics
    monkeypatch.setattr(engine._Engine, "_statistics",
                        lambda self, s, split: passes.append(split) or real(self, s, split))
    shared, warned = _run(train, test, ens, precision=precision, max_subsets=None)
    n_shared = len(passes)
    _without_sharing(monkeypatch)
    passes.clear()
    alone, warned_alone = _run(train, test, ens, precision=precision, max_subsets=None)
    assert shared.table() == alone.table()
    assert shared.ablations == alone.ablations and shared.significance == alone.significance
    # The outputs no run changes are warned of as the engines' own passes warn of them.
    assert warned == warned_alone and any("identical in every run" in w for w in warned)
    # Only the ablations' pass passes over runs itself (its full kernel, its raw one).
    assert n_shared < len(passes)


def test_the_shared_pass_is_skipped_where_its_results_would_crowd_the_budget():
    ens = make_ensemble(n_models=16, n_train=20_000, n_test=20)  # (results of some MiB)
    parts = [p for p in _parts(16) if p.stop - p.start >= 8]  # (few runs may need float64)
    train, test = ArraySource(ens.train), ArraySource(ens.test)
    held = 16 * 20_020 * 5 * len(parts)
    found, bytes_held = sweeps._shared_statistics(train, test, parts, CPU, 4 * held, 20,
                                                  "exact", None)
    assert bytes_held == held and set(found) == {(p.start, p.stop) for p in parts}
    assert sweeps._shared_statistics(train, test, parts, CPU, 4 * held - 4, 20, "exact",
                                     None) == ({}, 0)
    # Subsets of one run count do not overlap: nothing to share.
    assert sweeps._shared_statistics(train, test, disjoint_subsets(16, 2, None), CPU,
                                     1 << 30, 20, "exact", None) == ({}, 0)
    # Only what is kept is held: with 2-run subsets that need float64, less.
    found, bytes_held = sweeps._shared_statistics(train, test, _parts(16), CPU, 1 << 30, 20,
                                                  "exact", None)
    assert bytes_held == 16 * 20_020 * 5 * len(found) and len(found) < len(_parts(16))


@pytest.mark.parametrize("precision, budgets", [("exact", (5.6, 5.8, 6.2, 6.6, 7.0)),
                                                 ("fast", (8.0, 8.4, 8.8, 9.6))])
def test_a_budget_the_sweep_takes_without_the_shared_pass_it_takes_with_it(monkeypatch,
                                                                            precision, budgets):
    # A reviewer's case: the results held beside the kernels (under a quarter of the
    # budget) left them too little, and the sweep refused a budget it took before.
    ens = make_ensemble(n_models=16, n_train=2400, n_test=200, noise=3.0)
    kept, real = [], sweeps._shared_statistics

    def spy(*a):
        found, held = real(*a)
        kept.append(len(found))
        return found, held
    monkeypatch.setattr(sweeps, "_shared_statistics", spy)
    outcomes = {}
    for share in (True, False):
        if not share:
            _without_sharing(monkeypatch)
        for mib in budgets:
            try:
                _run(ens.train, ens.test, ens, runs=[4, 8, 16], max_subsets=None,
                     precision=precision, memory_budget=int(mib * 2**20))
                outcomes[share, mib] = "ok"
            except BudgetError as e:
                outcomes[share, mib] = str(e)
    assert {m: o for (s, m), o in outcomes.items() if s} == \
        {m: o for (s, m), o in outcomes.items() if not s}
    assert len(set(outcomes.values())) > 1  # the budgets span the edge ...
    assert 0 in kept and max(kept) == 5  # ... and the pass shares above it, not below


def test_the_kernels_get_the_budget_less_the_shared_results(monkeypatch):
    ens = make_ensemble(n_models=16, n_train=300, n_test=40, noise=3.0)
    shared, seen = [], []
    real, real_top = sweeps._shared_statistics, sweeps._top_k_neighbors
    def spy(*a):
        found, held = real(*a)
        shared.append((len(found), held))  # (the sweep empties the dict as it goes)
        return found, held
    monkeypatch.setattr(sweeps, "_shared_statistics", spy)
    monkeypatch.setattr(sweeps, "_top_k_neighbors",
                        lambda *a, **k: seen.append(k["memory_budget"]) or real_top(*a, **k))
    budget = 64 << 20
    _run(ens.train, ens.test, ens, runs=[4, 8, 16], max_subsets=None, memory_budget=budget)
    (n_found, held), = shared
    assert n_found == 6 and held == 16 * 340 * 5 * 6  # (4 and 8 runs; 16 is the ablations')
    assert seen and set(seen) == {budget - sweeps._held_bytes(40, 5, 20) - held}


def test_the_pass_never_takes_fast_mode_from_auto():
    """Under auto, where fast mode's plan fits the budget but not beside the results, the
    pass is skipped (a reviewer saw every subset kernel fall back to exact mode); with
    exact asked for, the same budget shares."""
    from ensemble_kernel.core._engine import candidates_per_query
    from ensemble_kernel.core._plan import plan_memory

    ens = make_ensemble(n_models=16, n_train=3000, n_test=60, noise=3.0)
    train, test = ArraySource(ens.train), ArraySource(ens.test)
    parts = [p for p in _parts(16) if p.stop - p.start >= 8]
    most = 16 * 3060 * 5 * len(parts)

    def fits(mode, budget):
        try:
            plan_memory(60, 3000, 8, 5, k_keep=candidates_per_query(20, mode), budget=budget,
                        precision=mode, raw_bytes=4)
        except BudgetError:
            return False
        return True

    lo, hi = 1, 1 << 30  # the least budget fast mode's plan fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits("fast", mid) else (mid + 1, hi)
    left = hi + most // 2
    assert fits("fast", left) and not fits("fast", left - most) and fits("exact", left - most)
    assert most <= left // 4
    assert sweeps._shared_statistics(train, test, parts, CPU, left, 20, "auto", None) == ({}, 0)
    found, held = sweeps._shared_statistics(train, test, parts, CPU, left, 20, "exact", None)
    assert len(found) == len(parts) and held == most


def test_constant_outputs_are_checked_in_float64_as_the_engine_does():
    """A constant float32 output may be runs whose log-softmax rounds to one float32 value
    (the engine then takes the example in float64: the pass leaves the part to it), or
    truly constant (both keep float32: the pass's statistics are the engine's)."""
    x = make_ensemble(n_models=8, n_train=30).train.double()
    parts = _parts(8)
    before = _none(ArraySource(x), parts)
    x[4:8, 3] = x[4, 3]  # runs 4-7 the same for example 3: truly constant in [4, 8)
    assert _none(ArraySource(x), parts) == before and (4, 8) not in before
    found = dict(zip([(p.start, p.stop) for p in parts],
                     shared_statistics(ArraySource(x), parts, device=CPU, budget=1 << 30)))
    want, in_float64 = _engine_statistics(ArraySource(x), slice(4, 8))
    assert not in_float64 and bool((want.scale[3] == 0).all())
    assert torch.equal(found[(4, 8)][0], want.mean) and torch.equal(found[(4, 8)][1], want.scale)
    # Example 1: classes 1 and 2 swap between runs (their log-softmax varies widely), one
    # logit of run 1 one ulp up: class 0's log-softmax moves by a fraction of a float32 ulp,
    # one float32 value in every run, four in float64 (test_statistics has the kernel).
    x = make_ensemble(n_models=4, n_train=30, n_classes=3).train
    x[:, 1] = torch.tensor([[0.0, 0.5, -0.7], [0.0, -0.7, 0.5]]).repeat(2, 1)
    x[1, 1, 1] = torch.nextafter(x[1, 1, 1], torch.tensor(9.0))
    assert _none(ArraySource(x), [slice(0, 4)]) == {(0, 4)}
    stats, in_float64 = _engine_statistics(ArraySource(x), slice(0, 4))
    assert in_float64 and stats.precise.nonzero().flatten().tolist() == [1]
