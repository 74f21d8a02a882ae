"""Fast mode returns exact mode's neighbours on inputs built to fool a bfloat16 pass.

The candidate pass rounds features to bfloat16 and each block's product to bfloat16. A
reference whose features sit just below a rounding midpoint loses up to 2**-8 of its
value, while references with features in {-1, 0, 1} lose nothing: the old rule, which
judged the error from the candidates alone, accepted rows that had missed a neighbour.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.core._engine import _top_k_neighbors
from ensemble_kernel.core._bounds import (
    BFLOAT16_ROUNDOFF,
    RECOMPUTED_ROUNDOFF,
    gamma,
    low_precision_error,
    product_error_coefficient,
)
from ensemble_kernel.core import _engine as engine_module

from conftest import adversarial_pass, assert_same_neighbors, make_ensemble

MiB = 1 << 20


@pytest.fixture(autouse=True, params=["kept", "recomputed"])
def _features_for_the_rescore(request, monkeypatch):
    """Every test here twice: the re-score reading the candidate pass's kept float32
    features (`Plan.keep_features`, where they fit), and normalising them again."""
    if request.param == "recomputed":
        original = engine_module.plan_memory

        def plan(*args, **kwargs):
            return original(*args, **{**kwargs, "keep_features": False})
        monkeypatch.setattr(engine_module, "plan_memory", plan)
    return request.param


def test_the_rescore_reads_the_kept_features(_features_for_the_rescore, monkeypatch):
    # With room, fast mode normalises every logit once for its candidate pass and never
    # again; without, the re-score normalises them again. Same neighbours either way.
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(9, 300, 5, generator=g), torch.randn(9, 40, 5, generator=g)
    calls = []
    original = engine_module._Engine._features

    def counted(self, source, stats, models, examples, dtype, **kw):
        calls.append((source is self.queries, examples.stop - examples.start))
        return original(self, source, stats, models, examples, dtype, **kw)
    monkeypatch.setattr(engine_module._Engine, "_features", counted)
    stages = []
    got = _top_k_neighbors(test, train, 3, precision="fast", memory_budget=64 * MiB,
                          progress=lambda p: stages.append(p.stage))
    normalised = sum(n for _, n in calls)
    kept = _features_for_the_rescore == "kept"
    assert normalised == (340 if kept else 680)  # every query and reference, once or twice
    assert "rescore" in stages
    exact = _top_k_neighbors(test, train, 3, precision="exact", memory_budget=64 * MiB)
    assert torch.equal(got.indices, exact.indices)


def sign_pattern(n_models: int, n_classes: int) -> torch.Tensor:
    """Per class, half the runs +1, half -1, one 0: mean 0 and unbiased std exactly 1.

    Returns
    -------
    Tensor of shape (n_models, n_classes), float32; n_models must be odd.
    """
    half = (n_models - 1) // 2
    column = torch.tensor([1.0] * half + [-1.0] * half + [0.0])
    g = torch.Generator().manual_seed(n_models * 31 + n_classes)
    return torch.stack([column[torch.randperm(n_models, generator=g)] for _ in range(n_classes)],
                       dim=1)


def move_zero(pattern: torch.Tensor, cls: int, to: int) -> torch.Tensor:
    """The pattern with class `cls`'s 0 moved to run `to` (still mean 0, std 1, in {-1,0,1})."""
    out = pattern.clone()
    zero = int((out[:, cls] == 0).nonzero()[0])
    out[zero, cls], out[to, cls] = out[to, cls], 0.0
    return out


def blurred_copy(pattern: torch.Tensor) -> torch.Tensor:
    """Nearly the query itself, with features bfloat16 rounds down in magnitude.

    Half the nonzero entries of each class become +-1.00389 (just below the midpoint
    1 + 2**-8, so they round to +-1), the other half +-0.99610 (rounding to 0.99609375),
    balanced between signs so that the mean stays 0 and the std 1. Its exact kernel value
    with the query is within 1e-5 of the maximum; its bfloat16 value is about 2**-9 lower.
    """
    up = 1.00389
    down = math.sqrt(2.0 - up * up)
    out = pattern.clone()
    for c in range(pattern.shape[1]):
        for sign in (1.0, -1.0):
            runs = (pattern[:, c] == sign).nonzero().flatten()
            half = len(runs) // 2
            out[runs[:half], c] = sign * up
            out[runs[half:], c] = sign * down
    return out


def adversarial_case(n_models: int = 513, n_classes: int = 4, n_fillers: int = 200):
    """One query; references: leader, fillers, and the blurred copy (the true best), last.

    Without log-softmax the features are the logits themselves. The leader loses 1 (of
    n_models - 1) in one class, every filler 2 (more fillers than fast mode keeps
    candidates); all are exact in bfloat16, as are their
    products, when each block of runs holds few classes.
    """
    p = sign_pattern(n_models, n_classes)
    leader = move_zero(p, 0, 0)
    fillers = [move_zero(move_zero(p, 1, 1 + i), 2, 2 + i) for i in range(n_fillers)]
    refs = torch.stack([leader, *fillers, blurred_copy(p)], dim=1)  # (n_models, n_refs, C)
    return p[:, None, :], refs


def test_old_rule_would_miss_the_blurred_copy():
    # The construction does what it claims: the blurred copy is the exact best ...
    query, refs = adversarial_case()
    kernel = dense_kernel(query, refs, log_softmax=False)[0]
    assert int(kernel.argmax()) == refs.shape[1] - 1
    # ... and in bfloat16 it falls below every filler.
    q, r = query[:, 0].bfloat16().float(), refs.bfloat16().float()
    approx = torch.einsum("mc,mrc->r", q, r)
    assert float(approx[-1]) < float(approx[1:-1].min())


@pytest.mark.parametrize("chunk_models", [1, 3, None])
@pytest.mark.parametrize("k", [1, 2])
def test_fast_mode_finds_a_neighbour_bfloat16_hides(chunk_models, k, exact_rows):
    query, refs = adversarial_case()
    got = _top_k_neighbors(query, refs, k, log_softmax=False, precision="fast",
                          chunk_models=chunk_models, memory_budget=64 * MiB)
    exact = _top_k_neighbors(query, refs, k, log_softmax=False, precision="exact",
                            memory_budget=64 * MiB)
    assert int(got.indices[0, 0]) == refs.shape[1] - 1
    assert torch.equal(got.indices, exact.indices)
    assert exact_rows.total() == 1  # the bound, not luck: this query's row was computed whole


def test_fast_mode_skips_the_fallback_when_the_bound_proves_the_candidates():
    # Well separated neighbours: every row is settled by the bound, none recomputed.
    g = torch.Generator().manual_seed(0)
    n_models, n_classes = 33, 5
    centres = torch.randn(4, n_classes, generator=g) * 4
    train = centres.repeat_interleave(30, 0)[None] + torch.randn(n_models, 120, n_classes,
                                                                 generator=g)
    test = train[:, ::30] + 0.01 * torch.randn(n_models, 4, n_classes, generator=g)
    stages = []
    got = _top_k_neighbors(test, train, 1, precision="fast", n_candidates=40,
                          memory_budget=64 * MiB, progress=lambda p: stages.append(p.stage))
    assert "fallback" not in stages
    assert got.indices[:, 0].tolist() == [0, 30, 60, 90]


def test_bound_covers_the_worst_rounding_of_one_block():
    # Every term rounds to its worst case: the bound still holds (and is not vacuous).
    d = 512
    a = torch.full((d,), 1.00389)  # rounds down by ~2**-8 relative
    b = torch.full((d,), 1.00389)
    exact = float(a.double() @ b.double())
    approx = float((a.bfloat16() @ b.bfloat16()).float())
    c = product_error_coefficient(width=d, n_blocks=1, unit=BFLOAT16_ROUNDOFF,
                                  output_rounding=True)
    norm = float(a.double().norm() * b.double().norm())
    assert abs(approx - exact) <= c * norm
    assert abs(approx - exact) > 0.2 * c * norm  # the rounding here is of the bound's order


def test_error_coefficient_is_the_sum_of_its_parts():
    u = BFLOAT16_ROUNDOFF
    c = product_error_coefficient(width=1000, n_blocks=10, unit=u, output_rounding=True)
    assert 3 * u < c < 3 * u + 4 * gamma(1000) + 1e-4
    exact = product_error_coefficient(width=1000, n_blocks=10, unit=0.0, output_rounding=False)
    assert gamma(1000) < exact < 1.01 * (gamma(1000) + gamma(10)) + 3 * 2.0**-24
    assert RECOMPUTED_ROUNDOFF > BFLOAT16_ROUNDOFF


def _blocked_bfloat16(a: torch.Tensor, b: torch.Tensor, n_blocks: int) -> float:
    """The candidate pass's value of one pair, as the engine computes it: bfloat16 inputs,
    each block's product rounded to bfloat16, the blocks summed in float32, scaled by
    1 / len(a) in float32."""
    acc = None
    for pa, pb in zip(a.bfloat16().chunk(n_blocks), b.bfloat16().chunk(n_blocks)):
        block = (pa[None] @ pb[:, None]).float()[0, 0]  # one bfloat16 rounding of the block
        acc = block if acc is None else acc + block
    return float(acc * torch.tensor(1.0 / len(a), dtype=torch.float32))


def _measured_bound(a: torch.Tensor, b: torch.Tensor, n_blocks: int, largest) -> float:
    """`low_precision_error` with the norms and the rounding measured exactly (float64)."""
    d = len(a)
    rounding = [float((x.bfloat16().double() - x.double()).norm()) for x in (a, b)]
    return float(low_precision_error(
        query_norm=float(a.double().norm()), reference_norm=float(b.double().norm()),
        query_rounding=rounding[0], reference_rounding=rounding[1], width=d // n_blocks,
        n_blocks=n_blocks, n_terms=d, rescore_width=d, rescore_blocks=1, largest=largest))


@pytest.mark.parametrize("n_blocks", [1, 4])
@pytest.mark.parametrize("kind", ["down", "mixed", "large value"])
def test_measured_bound_covers_the_worst_rounding(kind, n_blocks):
    # Inputs bfloat16 rounds as far as it can (just below a midpoint), a value as large as
    # the norms allow (every product the same sign: the block rounding at its largest), and
    # a value near 0 from large products: the bound holds each time, and is not vacuous.
    d = 512
    up = torch.full((d,), 1.00389)  # rounds down by almost 2**-8 relative
    if kind == "down":
        a, b = up, up
    elif kind == "mixed":  # products of both signs: the value near 0, the rounding not
        a, b = up * torch.tensor([1.0, -1.0]).repeat(d // 2), up.clone()
        b[: d // 4] = 1.0039  # a different rounding on a quarter
    else:  # 1 + 3 * 2**-9 rounds up by 2**-9: the largest relative block rounding
        a = b = torch.full((d,), 1.0 + 3 * 2.0**-9)
    exact = float(a.double() @ b.double()) / d
    approx = _blocked_bfloat16(a, b, n_blocks)
    err = abs(approx - exact)
    for largest in (abs(approx), None):  # the value term, or the worst case
        bound = _measured_bound(a, b, n_blocks, largest)
        assert err <= bound
        if kind != "mixed":
            assert err > 0.2 * bound  # of the bound's order: the rounding is the worst
    worst = _measured_bound(a, b, n_blocks, None)
    assert _measured_bound(a, b, n_blocks, abs(approx)) <= worst * (1 + 1e-12)  # (its order of sums)


def test_measured_bound_is_the_old_bound_at_the_worst_rounding():
    # With every input rounded by u and no value term, the measured bound is the old
    # worst-case one: c ||a|| ||b|| / n_terms plus the re-score's float32 error.
    u, width, n_blocks, n = BFLOAT16_ROUNDOFF, 64, 8, 512
    c = product_error_coefficient(width=width, n_blocks=n_blocks, unit=u, output_rounding=True)
    c32 = product_error_coefficient(width=n, n_blocks=1, unit=0.0, output_rounding=False)
    got = low_precision_error(query_norm=3.0, reference_norm=5.0, query_rounding=3.0 * u,
                              reference_rounding=5.0 * u, width=width, n_blocks=n_blocks,
                              n_terms=n, rescore_width=n, rescore_blocks=1)
    assert got == pytest.approx((c + c32) * 15.0 / n, rel=1e-6)


@pytest.mark.parametrize("chunk_models", [1, None])
def test_engine_bound_holds_for_every_pair(chunk_models):
    # The engine's own bound (the rounding its candidate pass measured, the norms its
    # re-score measured, each query's largest value) against every pair's re-scored value:
    # exact patterns, blurred copies that bfloat16 rounds down, near copies (values near
    # the largest possible) and Gaussian references.
    n_models, n_classes = 33, 5
    p = sign_pattern(n_models, n_classes)
    g = torch.Generator().manual_seed(11)
    refs = [p, blurred_copy(p), p * 1.0035, move_zero(p, 1, 3)]
    refs += [p + 0.01 * torch.randn(n_models, n_classes, generator=g) for _ in range(8)]
    refs += [torch.randn(n_models, n_classes, generator=g) for _ in range(20)]
    refs = torch.stack(refs, dim=1)
    queries = torch.stack([p, blurred_copy(p), refs[:, 20]], dim=1)
    engine = engine_module._prepare_engine(
        queries, refs, 1, log_softmax=False, classes=None, exclude_self=False,
        precision="fast", memory_budget=64 * MiB, device="cpu", chunk_models=chunk_models,
        tile_size=None, progress=None, k_keep=refs.shape[1])
    assert (engine.plan.chunk_models == n_models) == (chunk_models is None)
    approx = engine.search(refs.shape[1], dtype=torch.bfloat16)  # every pair
    assert engine.rounding_norms() is not None  # measured
    rescored = engine.rescore(approx.indices)
    largest = approx.values.double().abs().amax(dim=1)
    bound = engine.low_precision_bound(rescored, largest)
    err = (approx.values.double() - rescored.values.double()).abs()
    assert bool((err <= bound[:, None]).all())
    engine._rounding = None  # as a resumed pass: u per side, no measurement
    assert bool((engine.low_precision_bound(rescored, largest) >= bound).all())


@pytest.mark.parametrize("chunk_models, tile_size", [(1, 7), (None, None), (2, 10)])
def test_candidate_pass_measures_its_rounding(chunk_models, tile_size):
    # What the candidate pass measured is ||bf16(a) - a|| of every row (an upper bound,
    # tight), over every block of runs and every tile, queries measured once.
    ens = make_ensemble(seed=4, n_models=9, n_train=40, n_test=12, n_classes=4)
    engine = engine_module._prepare_engine(
        ens.test, ens.train, 2, log_softmax=True, classes=None, exclude_self=False,
        precision="fast", memory_budget=64 * MiB, device="cpu", chunk_models=chunk_models,
        tile_size=tile_size, progress=None, k_keep=20)
    engine.search(20, dtype=torch.bfloat16)
    queries, reference = engine.rounding_norms()
    for source, stats, measured in ((engine.queries, engine.stats_q, queries),
                                    (engine.references, engine.stats_r, None)):
        f = _features(engine, source, stats).double()
        truth = (f.float().bfloat16().double() - f).norm(dim=1)
        if measured is None:
            assert truth.max() <= reference <= float(truth.max()) * (1 + 1e-3)
        else:
            assert bool((truth <= measured).all())
            assert bool((measured <= truth * (1 + 1e-3)).all())


def test_fast_mode_is_exact_against_an_adversarial_approximation(monkeypatch, exact_rows):
    """Replace the bfloat16 pass by one that errs by nearly the whole bound.

    Each query's true best neighbour is pushed down by the bound; the other references
    keep their exact values, so the candidates show no error at all. Any rule judged from
    the candidates' errors, or looser than the bound, returns a wrong neighbour here.
    """
    g = torch.Generator().manual_seed(5)
    test = torch.randn(9, 6, 4, generator=g)
    steps = torch.linspace(0.05, 0.3, 30)  # near-copies, each a little further away
    near = test[:, :, None, :] + steps[None, None, :, None] * torch.randn(9, 6, 30, 4, generator=g)
    train = torch.cat([near.reshape(9, 180, 4), torch.randn(9, 60, 4, generator=g)], dim=1)
    truth = dense_kernel(test, train)
    best = truth.argmax(dim=1)
    monkeypatch.setattr(engine_module._Engine, "accumulate_tile", adversarial_pass(best, 0.999))
    got = _top_k_neighbors(test, train, 1, precision="fast", n_candidates=4,
                          memory_budget=64 * MiB)
    assert torch.equal(got.indices[:, 0], best)
    assert exact_rows.total() > 0


def _features(engine, source, stats):
    everything = slice(0, source.n_examples)
    return engine._features(source, stats, slice(0, engine.n_models), everything, torch.float32)


@st.composite
def near_tie_cases(draw):
    """References around a query: exact {-1,0,1} patterns next to bfloat16-unfriendly ones."""
    n_models = draw(st.sampled_from([9, 17, 33, 65]))
    n_classes = draw(st.integers(2, 5))
    p = sign_pattern(n_models, n_classes)
    refs = []
    for _ in range(draw(st.integers(3, 30))):
        kind = draw(st.sampled_from(["moved", "blurred", "scaled", "copy"]))
        if kind == "moved":
            r = p
            for _ in range(draw(st.integers(1, 3))):
                r = move_zero(r, draw(st.integers(0, n_classes - 1)),
                              draw(st.integers(0, n_models - 1)))
        elif kind == "blurred":
            r = blurred_copy(p)
        elif kind == "scaled":  # the same features after standardisation: an exact tie
            r = p * draw(st.sampled_from([1.0, 2.0, 0.5, 1.0035]))
        else:
            r = p.clone()
        refs.append(r)
    refs = torch.stack(refs, dim=1)
    k = draw(st.integers(1, refs.shape[1]))
    chunk = draw(st.sampled_from([1, 2, None]))
    return p[:, None, :], refs, k, chunk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_tie_cases(), st.integers(0, 2))
def test_fast_equals_exact_on_near_ties(case, extra):
    query, refs, k, chunk = case
    n_candidates = min(k + extra, refs.shape[1])
    got = _top_k_neighbors(query, refs, k, log_softmax=False, precision="fast",
                          n_candidates=n_candidates, chunk_models=chunk, memory_budget=64 * MiB)
    kernel = dense_kernel(query, refs, log_softmax=False)
    assert_same_neighbors(got.indices, got.values, kernel, k)


@pytest.mark.filterwarnings("ignore:.*identical in every run")  # class 0 is 0 in every run
@pytest.mark.parametrize("chunk_models", [1, 5, None])
def test_fast_equals_exact_when_one_confident_run_sends_rows_to_float64(chunk_models):
    # One run so confident that its row is computed in float64; the other outputs sit at
    # -50 and differ by 2**-18, far below float32's resolution of a plain mean there. An
    # output's feature must not depend on which block of runs it was read in.
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 300, 3)
    x[..., 1] = -50 + 2.0**-18 * torch.randint(-3, 4, (64, 300), generator=g).float()
    x[0, 0, 1] = x[0, 0, 2] = -1000.0
    kernel = dense_kernel(x, x)
    kernel.fill_diagonal_(float("-inf"))
    for precision in ("exact", "fast"):
        got = _top_k_neighbors(x, None, 3, exclude_self=True, precision=precision,
                              chunk_models=chunk_models, memory_budget=9 * MiB)
        assert_same_neighbors(got.indices, got.values, kernel, 3)


@st.composite
def option_cases(draw):
    """Clustered logits under every option fast mode takes, some far from 0."""
    from conftest import make_ensemble

    ens = make_ensemble(seed=draw(st.integers(0, 1000)), n_models=draw(st.integers(2, 12)),
                        n_train=draw(st.integers(20, 120)), n_test=draw(st.integers(1, 15)),
                        n_classes=draw(st.integers(2, 6)), noise=draw(st.sampled_from([0.05, 1.0])))
    train, test = ens.train, ens.test
    if draw(st.booleans()):
        offset = draw(st.sampled_from([-60.0, 40.0, 1e4]))
        train, test = offset + 1e-3 * train, offset + 1e-3 * test
    n_classes = train.shape[2]
    classes = draw(st.one_of(st.none(), st.lists(st.integers(0, n_classes - 1), min_size=1,
                                                 max_size=n_classes, unique=True)))
    exclude_self = draw(st.booleans())
    queries = train if exclude_self else test
    n_refs = train.shape[1] - exclude_self
    k = draw(st.integers(1, min(n_refs, 12)))
    return dict(queries=queries, references=None if exclude_self else train, k=k,
                exclude_self=exclude_self, classes=classes, log_softmax=draw(st.booleans()),
                n_candidates=draw(st.sampled_from([None, k, k + 1, k + 5])),
                chunk_models=draw(st.sampled_from([None, 1, 3])),
                tile_size=draw(st.sampled_from([None, 7, 33])))


@pytest.mark.filterwarnings("ignore:.*identical in every run")  # offsets quantise some outputs
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option_cases())
def test_fast_equals_exact_under_every_option(case):
    queries, references = case.pop("queries"), case.pop("references")
    got = _top_k_neighbors(queries, references, precision="fast", memory_budget=64 * MiB, **case)
    kernel = dense_kernel(queries, queries if references is None else references,
                          log_softmax=case["log_softmax"], classes=case["classes"])
    if case["exclude_self"]:
        kernel.fill_diagonal_(float("-inf"))
    # Values to float32 accuracy against the float64 twin: a float32 feature errs by up to
    # ~4 roundings times |output| / std (below 64 before an example goes to float64), so
    # small kernel values can be off by a few 1e-6 in absolute terms.
    assert_same_neighbors(got.indices, got.values, kernel, case["k"], atol=2e-5)


def _exact_squares(rows: torch.Tensor) -> list:
    from fractions import Fraction
    return [sum(Fraction(float(v)) ** 2 for v in row) for row in rows]


@pytest.mark.parametrize("float32_norms", [True, False])
def test_squared_norm_upper_bounds_the_measured_norms(float32_norms, monkeypatch):
    """The re-score's norms, measured block by block, bound the exact squared norms from
    above on rows built to round down: squares just below a rounding midpoint, one large
    entry beside many small ones (the small ones' squares lost against it), and entries
    whose squares fall below float32's normal range."""
    from ensemble_kernel.core import _bounds as bounds

    if not float32_norms:
        monkeypatch.setattr(bounds, "_FLOAT32_NORM_WIDTH", 4)
    g = torch.Generator().manual_seed(0)
    width, n_blocks = 600, 3
    rows = torch.empty(5, width * n_blocks)
    rows[0] = 1 + 2.0**-12 - 2.0**-23  # squares just below a midpoint: each rounds down
    rows[1] = 2.0**-20
    rows[1, ::97] = 3.0e3  # big ones first: the small squares vanish in float32 sums
    rows[2] = 2.0**-70  # squares below float32's normal range (subnormal or flushed)
    rows[2, 0] = 1.0
    rows[3] = torch.randn(width * n_blocks, generator=g) * 1e-3
    rows[4] = 0.0
    measured = torch.zeros(len(rows), dtype=torch.float64)
    for b in range(n_blocks):
        measured += engine_module._block_norms(rows[:, b * width:(b + 1) * width],
                                               bounds.norm_unit(width))
    upper = bounds.squared_norm_upper(measured, width=width, n_blocks=n_blocks,
                                      n_terms=width * n_blocks)
    for got, exact in zip(upper.tolist(), _exact_squares(rows)):
        assert got >= exact
        # not vacuous: within twice the worst rounding (and the floor of lost squares)
        slack = 2 * bounds.gamma(width + 8, bounds.norm_unit(width))
        assert got <= float(exact) * (1 + slack) + 2 * width * n_blocks * 2.0**-126


def test_rescore_norms_bound_a_narrower_last_block_too(monkeypatch):
    """The re-score's blocks of runs: the last may be narrower than the others. Its norms
    must be measured in the unit the bound assumes for the nominal width (a reviewer's
    case: a float32-measured last block bounded as float64 fell short on half the rows).
    The float32/float64 switch is lowered so that small shapes reach it."""
    from fractions import Fraction

    from ensemble_kernel.core import _bounds as bounds

    monkeypatch.setattr(bounds, "_FLOAT32_NORM_WIDTH", 12)  # 4 runs x 5 classes: float64
    original = engine_module.plan_memory

    def plan(*args, **kwargs):  # blocks of 4 runs: 4, 4, then 1 (float32 by its own width)
        return dataclasses.replace(original(*args, **{**kwargs, "keep_features": False}),
                                   rescore_chunk_models=4)
    monkeypatch.setattr(engine_module, "plan_memory", plan)
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(9, 200, 5, generator=g), torch.randn(9, 30, 5, generator=g)
    engine = engine_module._prepare_engine(
        test, train, 3, log_softmax=True, classes=None, exclude_self=False, precision="fast",
        memory_budget=64 * MiB, device="cpu", chunk_models=None, tile_size=None,
        progress=None, k_keep=5)
    rescored = engine.rescore(torch.arange(5).repeat(30, 1))
    for source, stats, upper in ((engine.queries, engine.stats_q, rescored.query_norms),
                                 (engine.references, engine.stats_r, rescored.reference_norms)):
        features = _features(engine, source, stats)
        for row, bound in zip(features.tolist(), upper.tolist()):
            assert Fraction(bound) >= sum(Fraction(v) ** 2 for v in row)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_one_block_pass_selects_from_the_product_as_the_widened_block_would(exclude_self):
    # With one block of runs the candidate pass selects from the bfloat16 product and
    # scales only what it keeps: the same values, bit for bit, as widening the block to
    # float32 and scaling it whole (the plain twin here), self excluded or not.
    ens = make_ensemble(seed=6, n_models=7, n_train=90, n_test=90, n_classes=3)
    queries = ens.train if exclude_self else ens.test
    engine = engine_module._prepare_engine(
        queries, ens.train, 5, log_softmax=True, classes=None, exclude_self=exclude_self,
        precision="fast", memory_budget=64 * MiB, device="cpu", chunk_models=None,
        tile_size=None, progress=None, k_keep=12)
    assert engine.plan.chunk_models == 7 and engine.plan.n_tiles == 1
    got = engine.search(12, dtype=torch.bfloat16)
    fa = _features(engine, engine.queries, engine.stats_q).bfloat16()
    fb = _features(engine, engine.references, engine.stats_r).bfloat16()
    plain = (fa @ fb.T).float()
    plain *= 1.0 / (7 * 3)
    if exclude_self:
        plain.fill_diagonal_(float("-inf"))
    top = plain.topk(12, dim=1).values
    assert torch.equal(got.values, top)
    assert torch.equal(plain.gather(1, got.indices), got.values)  # each value its pair's


def test_a_low_precision_tile_of_several_blocks_outside_a_search():
    # accumulate_tile's bfloat16 path with several blocks of runs also works outside
    # `search` (no reused buffers there): the float32 sum of the blocks' bfloat16 products.
    ens = make_ensemble(seed=8, n_models=6, n_train=9, n_test=5, n_classes=3)
    engine = engine_module._prepare_engine(
        ens.test, ens.train, 1, log_softmax=True, classes=None, exclude_self=False,
        precision="fast", memory_budget=64 * MiB, device="cpu", chunk_models=2,
        tile_size=None, progress=None, k_keep=3)
    block = engine.accumulate_tile(slice(0, 9), rows=None, dtype=torch.bfloat16,
                                   stage="kernel", tiles_done=0, total=6, done_before=0)
    fa = _features(engine, engine.queries, engine.stats_q).bfloat16()
    fb = _features(engine, engine.references, engine.stats_r).bfloat16()
    plain = sum((fa[:, c:c + 6] @ fb[:, c:c + 6].T).float() for c in (0, 6, 12))
    plain *= 1.0 / 18
    assert block.dtype == torch.float32 and torch.equal(block, plain)
