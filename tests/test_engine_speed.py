"""The engine's fast paths against their plain twins (issue 9: engine speed on any CPU).

- Fast mode re-scores only a window of its candidates; the window rests on the error
  bound, and is checked against the norms the re-score measures.
- The statistics pass and the normalisation work in pieces of rows sized for the cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.core._engine import _top_k_neighbors
from ensemble_kernel.core import _engine as engine_module
from ensemble_kernel.core._bounds import product_error_coefficient
from ensemble_kernel.core._engine import _prepare_engine
from ensemble_kernel.errors import NonFiniteError

from conftest import adversarial_pass, assert_same_neighbors, make_ensemble

MiB = 1 << 20


def _engine(test, train, k=3, **kw):
    options = dict(log_softmax=True, classes=None, exclude_self=False, precision="fast",
                   memory_budget=64 * MiB, device="cpu", chunk_models=None, tile_size=None,
                   progress=None, k_keep=k)
    options.update(kw)
    return _prepare_engine(test, train, k, **options)


@pytest.mark.parametrize("chunk_models", [1, 4, None])
def test_windowed_rescore_equals_the_plain_one(chunk_models):
    """Inside each window the values are the full re-score's, within the float32 bound;
    outside they are -inf; the norms are the same."""
    ens = make_ensemble(seed=3, n_models=9, n_train=150, n_test=25, n_classes=4)
    engine = _engine(ens.test, ens.train, chunk_models=chunk_models)
    g = torch.Generator().manual_seed(1)
    candidates = torch.stack([torch.randperm(150, generator=g)[:40] for _ in range(25)])
    lengths = torch.randint(0, 41, (25,), generator=g)
    lengths[:3] = torch.tensor([0, 1, 40])  # empty, one, every candidate
    full = engine.rescore(candidates)
    window = engine.rescore(candidates, lengths)
    inside = torch.arange(40)[None, :] < lengths[:, None]
    assert bool((window.values[~inside] == float("-inf")).all())
    truth = dense_kernel(ens.test, ens.train).gather(1, candidates)
    step = engine.plan.rescore_chunk_models
    c = product_error_coefficient(width=step * engine.n_used,
                                  n_blocks=math.ceil(engine.n_models / step), unit=0.0,
                                  output_rounding=False)
    # |value| <= c ||a|| ||b|| / (n_models n_used), plus float32 features' own error
    allowed = c * window.query_norms.sqrt()[:, None] * window.reference_norms.sqrt()[
        candidates] / (engine.n_models * engine.n_used) + 2e-6
    for got in (window.values, full.values):
        err = (got.double() - truth).abs()
        assert bool((err[inside] <= allowed[inside]).all())
    assert torch.equal(window.query_norms, full.query_norms)
    assert torch.equal(window.reference_norms, full.reference_norms)


def _near_copies():
    g = torch.Generator().manual_seed(5)
    test = torch.randn(9, 6, 4, generator=g)
    steps = torch.linspace(0.05, 0.3, 30)  # near-copies, each a little further away
    near = test[:, :, None, :] + steps[None, None, :, None] * torch.randn(9, 6, 30, 4, generator=g)
    train = torch.cat([near.reshape(9, 180, 4), torch.randn(9, 60, 4, generator=g)], dim=1)
    return test, train


def test_window_keeps_a_neighbour_pushed_down_by_nearly_the_bound(monkeypatch):
    # Many candidates (no full windows): the window alone must hold the true best, pushed
    # down by nearly the bound while the runner-up is pushed up by as much.
    test, train = _near_copies()
    truth = dense_kernel(test, train)
    best, runner_up = truth.topk(2, dim=1).indices.unbind(1)
    monkeypatch.setattr(engine_module._Engine, "accumulate_tile",
                        adversarial_pass(best, 0.999, runner_up))
    stages = []
    got = _top_k_neighbors(test, train, 1, precision="fast", n_candidates=200,
                          memory_budget=64 * MiB, progress=lambda p: stages.append(p.stage))
    assert torch.equal(got.indices[:, 0], best)
    assert_same_neighbors(got.indices, got.values, truth, 1)


def test_a_window_sized_from_a_wrong_guess_is_not_trusted(monkeypatch):
    # If the expected norm were too small, the window would drop the pushed-down best
    # neighbour; the measured bound exceeds the guess, so those queries are recomputed.
    test, train = _near_copies()
    truth = dense_kernel(test, train)
    best = truth.argmax(dim=1)
    monkeypatch.setattr(engine_module._Engine, "accumulate_tile", adversarial_pass(best, 0.999))
    monkeypatch.setattr(engine_module, "_expected_norm", lambda n_models, n_used: 1e-3)
    stages = []
    got = _top_k_neighbors(test, train, 1, precision="fast", n_candidates=200,
                          memory_budget=64 * MiB, progress=lambda p: stages.append(p.stage))
    assert "fallback" in stages
    assert torch.equal(got.indices[:, 0], best)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_fast_equals_exact_with_windows_and_ties(exclude_self, k):
    # Exact copies (ties at the top), copies shifted by a constant (the same log-softmax up
    # to rounding: near ties), and an outlier.
    ens = make_ensemble(seed=11, n_models=7, n_train=90, n_test=12, n_classes=3, noise=0.3)
    train = ens.train.clone()
    train[:, 10:20] = train[:, 0:10]  # exact ties
    train[:, 20:25] = train[:, 0:5] + 7.0  # near ties
    train[:, -1] = 1e3 * torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    queries = train if exclude_self else ens.test
    got = _top_k_neighbors(queries, None if exclude_self else train, k, precision="fast",
                          exclude_self=exclude_self, memory_budget=64 * MiB, tile_size=31)
    exact = _top_k_neighbors(queries, None if exclude_self else train, k, precision="exact",
                            exclude_self=exclude_self, memory_budget=64 * MiB, tile_size=31)
    kernel = dense_kernel(queries, train)
    if exclude_self:
        kernel.fill_diagonal_(float("-inf"))
    assert_same_neighbors(got.indices, got.values, kernel, k)
    assert_same_neighbors(exact.indices, exact.values, kernel, k)


@pytest.mark.parametrize("piece_bytes", [1, 4096, 64 * MiB])
def test_statistics_in_pieces_equal_the_whole_block(monkeypatch, piece_bytes):
    # Pieces of one row, of a few rows, and one piece for the whole block: the same
    # mean and scale to float32 accuracy, the same neighbours.
    ens = make_ensemble(seed=2, n_models=11, n_train=130, n_test=17, n_classes=5)
    monkeypatch.setattr(engine_module, "_PIECE_CACHE_BYTES", piece_bytes)
    engine = _engine(ens.test, ens.train, precision="exact", chunk_models=4)
    x = torch.log_softmax(ens.train.double(), dim=-1)
    torch.testing.assert_close(engine.stats_r.mean, x.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(engine.stats_r.scale, 1 / x.std(0), rtol=1e-5, atol=0)
    got = _top_k_neighbors(ens.test, ens.train, 5, precision="exact", memory_budget=64 * MiB,
                           chunk_models=4)
    assert_same_neighbors(got.indices, got.values, dense_kernel(ens.test, ens.train), 5)


def test_non_finite_in_a_later_piece_names_its_example(monkeypatch):
    monkeypatch.setattr(engine_module, "_PIECE_CACHE_BYTES", 600)  # a few rows per piece
    ens = make_ensemble(n_models=4)
    b = ens.train.clone()
    b[3, 113, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"run 3 .*example 113, class 2 is nan"):
        _top_k_neighbors(ens.test, b, 3, precision="exact", memory_budget=64 * MiB, chunk_models=3)
