"""What the memory plan promises (DESIGN §2), as properties over any sizes and budgets.

Not the planner's own arithmetic: what the engine must hold at once for the sizes the plan
chose, that its tiles cover the references, that more memory never makes a feasible
problem infeasible, one tile when everything fits at once, and that a budget too small
says so with a number that is enough.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import example, given, settings, strategies as st

from ensemble_kernel.errors import BudgetError
from ensemble_kernel.core._plan import _GPU_PIECE_BYTES, _PIECE_BYTES, _smallest_budget, plan_memory

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}

problems = st.fixed_dictionaries({
    "n_queries": st.integers(1, 20_000),
    "n_references": st.integers(1, 60_000),
    "n_models": st.integers(2, 600),
    "n_used_classes": st.integers(1, 100),
    "k_keep": st.integers(1, 64),
    "precision": st.sampled_from(["exact", "fast"]),
    "raw_bytes": st.sampled_from([2, 4]),  # float16 or float32 sources
})
budgets = st.integers(1 << 16, 1 << 35)


def plan(p: dict, budget: int, **kw):
    q, r, m, c = p["n_queries"], p["n_references"], p["n_models"], p["n_used_classes"]
    return plan_memory(q, r, m, c, k_keep=p["k_keep"], budget=budget,
                       precision=p["precision"], raw_bytes=p["raw_bytes"], **kw)


def must_hold(p: dict, chosen) -> int:
    """Bytes the engine cannot do without at once, for the sizes the plan chose: one tile's
    float32 kernel block, one block of runs of raw logits and normalised features for the
    queries and the tile, per-example statistics, the running top-k (int64 index + float32
    value), and the cached query features if the plan keeps them."""
    feature = 2 if p["precision"] == "fast" else 4
    q, r, c = p["n_queries"], p["n_references"], p["n_used_classes"]
    return (q * chosen.tile_size * 4
            + (q + chosen.tile_size) * chosen.chunk_models * c * (p["raw_bytes"] + feature)
            + (q + r) * c * 8
            + q * p["k_keep"] * 12
            + (q * p["n_models"] * c * feature if chosen.cache_queries else 0))


CIFAR = {"n_queries": 10_000, "n_references": 50_000, "n_models": 600, "n_used_classes": 10,
         "k_keep": 20, "precision": "exact", "raw_bytes": 2}


@settings(max_examples=400, deadline=None)
@given(problems, budgets)
@example(CIFAR, 1 << 30)  # the query cache on, and most of the budget spent
@example({**CIFAR, "precision": "fast"}, 1 << 30)
def test_a_plan_fits_its_budget_and_covers_the_references(p, budget):
    try:
        chosen = plan(p, budget)
    except BudgetError:
        return
    assert chosen.budget == budget
    assert must_hold(p, chosen) <= budget
    # Tiles cut the reference axis into n_tiles pieces that cover it, none empty.
    assert 1 <= chosen.tile_size <= p["n_references"]
    assert chosen.n_tiles == math.ceil(p["n_references"] / chosen.tile_size)
    assert (chosen.n_tiles - 1) * chosen.tile_size < p["n_references"]
    assert 1 <= chosen.chunk_models <= p["n_models"]
    assert 1 <= chosen.rescore_chunk_models <= p["n_models"]
    assert 1 <= chosen.example_block <= p["n_queries"] + p["n_references"]


@settings(max_examples=400, deadline=None)
@given(problems, budgets, st.floats(1.0, 16.0))
def test_more_memory_never_makes_a_problem_infeasible(p, budget, factor):
    try:
        plan(p, budget)
    except BudgetError:
        return
    bigger = plan(p, int(budget * factor))
    assert must_hold(p, bigger) <= int(budget * factor)


@settings(max_examples=300, deadline=None)
@given(problems, st.integers(1024, 20_000))
def test_one_tile_when_everything_fits_at_once(p, n_queries):
    """DESIGN §2: as few tiles as the budget allows; one when the whole kernel fits. Here
    the budget holds the kernel and every run's features of both splits twice over.

    (From 1,024 queries: the plan counts 4 KiB of bookkeeping per reference column, which
    outweighs the kernel itself for a handful of queries.)
    """
    p = {**p, "n_queries": n_queries}
    feature = 2 if p["precision"] == "fast" else 4
    q, r, m, c = p["n_queries"], p["n_references"], p["n_models"], p["n_used_classes"]
    everything = (q * r * 8 + (q + r) * m * c * (p["raw_bytes"] + 2 * feature)
                  + (q + r) * c * 8 + q * p["k_keep"] * 96)
    assert plan(p, 2 * everything + (80 << 20)).n_tiles == 1


@settings(max_examples=400, deadline=None)
@given(problems, st.integers(1 << 10, 1 << 28), st.one_of(st.none(), st.integers(1, 5000)),
       st.sampled_from(["cpu", "cuda"]))
def test_a_budget_too_small_says_how_much_is_enough(p, budget, tile_size, device):
    tile_size = dict(tile_size=tile_size, device=device)  # (the GPU's larger piece cap)
    try:
        plan(p, budget, **tile_size)
    except BudgetError as e:
        message = str(e)
    else:
        return
    assert f"too small for {p['n_queries']} queries" in message
    assert "raise --memory-budget" in message
    shown = re.search(r"at least ([0-9.]+) (B|KiB|MiB|GiB|TiB) is needed", message)
    assert shown, message
    enough = int(float(shown.group(1)) * UNITS[shown.group(2)])  # as --memory-budget reads it
    assert enough > budget
    plan(p, enough, **tile_size)  # the number suggested is enough ...
    with pytest.raises(BudgetError):  # ... and not far above what is needed
        plan(p, int(0.9 * enough), **tile_size)


@settings(max_examples=400, deadline=None)
@given(problems, budgets, budgets, st.sampled_from(["both", "blocks"]),
       st.sampled_from(["cpu", "cuda"]))
def test_a_kept_plan_fits_any_budget_it_is_taken_under_and_a_larger_one_always(
        p, first, then, kept, device):
    """A plan kept from an earlier run (a checkpoint's tiles and blocks; or the blocks
    alone) taken under another budget: at least as large, it is taken as it was (the
    caches take only the room it leaves); smaller, it fits what the engine must hold, or
    is refused with a number that is enough and not far above what is needed."""
    try:
        chosen = plan(p, first, device=device)
    except BudgetError:
        return
    forced = dict(chunk_models=chosen.chunk_models, device=device)
    if kept == "both":
        forced["tile_size"] = chosen.tile_size
    try:
        again = plan(p, then, **forced)
    except BudgetError as e:
        assert then < first, "a larger budget refused the plan made under a smaller one"
        message = str(e)
        assert "raise --memory-budget" in message
        shown = re.search(r"at least ([0-9.]+) (B|KiB|MiB|GiB|TiB) is needed", message)
        enough = int(float(shown.group(1)) * UNITS[shown.group(2)])
        assert enough > then
        plan(p, enough, **forced)
        with pytest.raises(BudgetError):
            plan(p, int(0.9 * enough), **forced)
        return
    assert again.chunk_models == chosen.chunk_models
    if kept == "both":
        assert again.tile_size == chosen.tile_size
    assert must_hold(p, again) <= then


@given(st.integers(0, 1 << 36), st.sampled_from([_PIECE_BYTES, _GPU_PIECE_BYTES]))
@example(7 * _PIECE_BYTES, _PIECE_BYTES)  # the budget at which the cap starts to bind
@example(7 * _GPU_PIECE_BYTES - 1, _GPU_PIECE_BYTES)
def test_the_smallest_budget_is_the_least_that_leaves_the_rest(rest, cap):
    """What the error suggests: the least budget B with B - min(cap, B // 8) >= rest, for
    both caps (budgets near 8 x the GPU's cap are beyond the property test above)."""
    b = _smallest_budget(rest, cap)
    assert b - min(cap, b // 8) >= rest
    assert b == 0 or (b - 1) - min(cap, (b - 1) // 8) < rest


@pytest.mark.parametrize("device, cap", [("cpu", _PIECE_BYTES), ("cuda", _GPU_PIECE_BYTES)])
@pytest.mark.parametrize("budget", [1 << 26, 1 << 30, 1 << 32, 1 << 34])
def test_the_piece_scratch_is_an_eighth_of_the_budget_up_to_the_devices_cap(device, cap,
                                                                           budget):
    # (a GPU's larger pieces: far fewer launches and copies; no GPU is needed to plan one)
    chosen = plan(CIFAR, budget, device=device)
    assert chosen.piece_bytes == min(cap, budget // 8)


def test_the_budget_error_for_the_cifar_sizes():
    with pytest.raises(BudgetError, match=r"a memory budget of 1\.0 MiB is too small for 10000 "
                       r"queries and 10 classes; at least [0-9.]+ MiB is needed: raise "
                       r"--memory-budget"):
        plan_memory(10_000, 50_000, 500, 10, k_keep=20, budget=1 << 20)


def test_fast_mode_takes_one_block_of_every_run_where_it_costs_few_tiles():
    # One block bounds the bfloat16 rounding by the value (bounds.low_precision_error):
    # at CIFAR shape with 500 runs and 1 GiB, one block of 500 runs in at most four times
    # the tiles of the widest plan; with 20,000 runs one block cannot fit, nor without the
    # query cache, and exact mode keeps its blocks.
    fast = {**CIFAR, "n_models": 500, "precision": "fast", "k_keep": 148}
    widest = plan(fast, 1 << 30, chunk_models=232)
    chosen = plan(fast, 1 << 30)
    assert chosen.chunk_models == 500 and chosen.cache_queries
    assert widest.n_tiles < chosen.n_tiles <= 4 * widest.n_tiles
    assert must_hold(fast, chosen) <= 1 << 30
    assert plan({**fast, "n_models": 20_000}, 1 << 30).chunk_models < 20_000
    assert plan({**fast, "precision": "exact", "k_keep": 20}, 1 << 30).chunk_models < 500
    assert plan(fast, 1 << 30, chunk_models=100).chunk_models == 100  # as asked
    # wider than the widest block (runs x classes > 16,384): gamma(width) would outgrow the
    # gain, and at 2**24 features no float32 bound remains
    wide = {**fast, "n_queries": 10, "n_references": 100, "n_models": 2000,
            "n_used_classes": 100}
    assert plan(wide, 16 << 30).chunk_models == 16384 // 100


@settings(max_examples=300, deadline=None)
@given(problems, budgets, st.integers(1, 600), st.integers(1, 1000))
@example({**CIFAR, "n_models": 500, "n_used_classes": 40, "k_keep": 3}, 1 << 31, 256, 409)
def test_blocks_of_runs_asked_for_fit_the_budget_and_are_even(p, budget, fewest, most):
    """`block_runs` (the ablations' per-class products): the plan still fits, its blocks
    are as wide as asked where that fits, never wider than `most`, and even."""
    try:
        chosen = plan(p, budget, block_runs=(fewest, most))
    except BudgetError:
        return
    m = p["n_models"]
    assert must_hold(p, chosen) <= budget
    assert 1 <= chosen.chunk_models <= min(max(most, 1), m)
    n_blocks = math.ceil(m / chosen.chunk_models)
    assert chosen.chunk_models == math.ceil(m / n_blocks)  # no short last block
    # where a tile of one reference beside `fewest` runs fits, the blocks are that wide
    roomy = plan(p, budget, block_runs=(fewest, most), tile_size=1)
    if roomy.chunk_models >= min(fewest, most, m):
        assert chosen.chunk_models >= min(fewest, most, m) or \
            chosen.chunk_models == math.ceil(m / math.ceil(m / min(fewest, most, m)))


def test_the_ablations_plan_at_cifar_shape_takes_two_even_blocks_of_runs():
    # 2,000 queries, 500 runs, 10 classes with their copies and the no-log-softmax ones
    # (40 columns), 11 kernels side by side, 2 GiB: blocks of 250 runs, not 102 or fewer.
    ablations = {**CIFAR, "n_queries": 2_000, "n_models": 500, "n_used_classes": 40,
                 "k_keep": 3}
    assert plan(ablations, 1 << 31, n_kernels=11).chunk_models <= 102
    from ensemble_kernel.analysis._ablations import _PER_CLASS_RUNS

    chosen = plan(ablations, 1 << 31, n_kernels=11, block_runs=(_PER_CLASS_RUNS, 409))
    assert chosen.chunk_models == 250
    assert must_hold(ablations, chosen) <= 1 << 31


def test_blocks_asked_wider_than_allowed_size_the_tiles_for_the_blocks_taken():
    # 100 classes: the ablations ask for 256 runs per block but allow 4096 // 100 = 40;
    # the tiles are those of 40-run blocks, not narrower ones sized for 256 runs.
    c100 = {**CIFAR, "n_queries": 1000, "n_models": 200, "n_used_classes": 400, "k_keep": 3}
    asked = plan(c100, 4 << 30, n_kernels=101, block_runs=(256, 40))
    assert asked == plan(c100, 4 << 30, n_kernels=101, block_runs=(40, 40))
    assert asked.chunk_models == 40
