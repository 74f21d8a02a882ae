"""The report's ablation kernels in one streamed pass beside the full kernel (docs/architecture.md §1, §2).

The per-class kernel of class c is the full kernel's sum restricted to c:

    K_c[a, b] = 1 / n_models * sum_m zA[m, a, c] * zB[m, b, c]

with the same per-(example, class) statistics as the full kernel (mean and std over the
runs of that one output), so it is the product of the feature columns of class c. The
columns of all classes partition the contraction axis: the `n_classes` products of one
block of runs, taken side by side as one batched product, cost together one full product,
and they share the normalised features (and the statistics pass) with the full kernel.

The full kernel is still computed as exact mode computes it (`_Engine.accumulate_tile`'s
float32 product of the whole block, not the sum of the per-class products), so its
neighbours are exactly exact mode's. Each per-class kernel is a float32 product of the
same float32 features as a one-class run of the engine (`top_k_neighbors(classes=[c])`):
the two agree to float32 rounding of a sum of `n_models` terms, so their neighbours are
the same in docs/architecture.md §1's sense (the same indices, except where kernel values agree within
float32 rounding). Two deviations from bit-identity, both within that rounding: the blocks
of runs (a different plan), and an example whose statistics the one-class run keeps in
float32 while the all-class run takes it in float64 (another of its classes needs it).

The no-log-softmax kernel needs statistics and features of its own; it joins the pass
when its features and accumulator fit the budget without more tiles than the pass
without it, and is otherwise computed by a separate `top_k_neighbors` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core._engine import (KeptStatistics, Progress, ProgressCallback, _Engine, _resources,
                     _top_k_neighbors)
from ..errors import InputError
from ..core._kernel import exact_float32_matmul
from ..core._neighbors import Neighbors, empty_topk, merge_topk, topk_block
from ..core._plan import _MAX_CONTRACTION, _MIN_CONTRACTION, plan_if_fits
from ..core._sources import as_source, check_pair

__all__ = ["AblationNeighbors", "ablation_neighbors"]

# Runs per block that the per-class products want: each contracts over the runs of its
# class alone, so it wants as many runs as any exact product wants contraction width
# (`plan._MIN_CONTRACTION`), not that width over the classes; with fewer, adding each
# product into the accumulators is bound by their memory traffic (`python
# benchmarks/micro.py perclass`, on the development VM: 113-128 GFLOP/s at 25-50 runs,
# 170 at 100, 287-317 at 250-500, where one float32 product ran at 317-331).
_PER_CLASS_RUNS = _MIN_CONTRACTION["exact"]


@dataclass(frozen=True)
class AblationNeighbors:
    """Neighbours of the full kernel and of its ablations, from one pass.

    Attributes
    ----------
    per_class : one Neighbors per class c (the kernel of class c alone), indices and
        values of shape (n_queries, k).
    full : the full kernel's Neighbors, shape (n_queries, k_full); None when not asked for.
    no_log_softmax : the kernel without log-softmax, shape (n_queries, k); None when not
        asked for.
    fused_no_log_softmax : whether `no_log_softmax` came from the same pass (False: its
        own pass, because the budget did not hold both without more tiles).
    one_pass : whether the per-class kernels came from one pass (False: a budget too
        small for them side by side, so one engine run each, as `top_k_neighbors` does).
    """

    per_class: tuple[Neighbors, ...]
    full: Neighbors | None
    no_log_softmax: Neighbors | None
    fused_no_log_softmax: bool
    one_pass: bool = True


def ablation_neighbors(
    queries,
    references,
    k: int = 3,
    *,
    k_full: int | None = None,
    no_log_softmax: bool = True,
    memory_budget: int | None = None,
    device: torch.device | str = "cpu",
    chunk_models: int | None = None,
    tile_size: int | None = None,
    progress: ProgressCallback | None = None,
    kept_statistics: KeptStatistics | None = None,
    precision: str = "auto",
) -> AblationNeighbors:
    """Top-k neighbours of every per-class kernel (and optionally the full kernel and the
    kernel without log-softmax) in one exact streamed pass.

    Parameters
    ----------
    queries : array or LogitSource of shape (n_models, n_queries, n_classes).
    references : array or LogitSource of shape (n_models, n_references, n_classes).
    k : neighbours per query of each ablation kernel, 1 <= k <= n_references.
    k_full : neighbours per query of the full kernel, computed in the same pass; None:
        not computed.
    no_log_softmax : also the kernel without log-softmax (in the pass when it fits).
    memory_budget : bytes of working memory for the pass; default a quarter of what is
        available. Every kernel's accumulator and top-k, and the batched product's copies
        of the features, are planned within it.
    device : 'cpu' or 'cuda'.
    chunk_models, tile_size : override the plan (tests and benchmarks).
    progress : called with a `Progress` (stages 'statistics' and 'ablations').
    kept_statistics : statistics kept from an earlier engine run (`engine.KeptStatistics`), taken
        for the log-softmax kernels where it has those of these sources.
    precision : the command's ('auto', 'exact' or 'fast'), for the kernels computed on
        their own, outside the pass (the one without log-softmax where the pass cannot hold
        it; every kernel under a budget too small for the pass): 'exact' runs them exact;
        otherwise each resolves 'auto' for its own shape and budget, which may not hold
        fast mode (the choice was made for another kernel). The pass itself is exact.

    Returns
    -------
    AblationNeighbors; every list best first, equal values by smaller reference index.
    """
    queries = as_source(queries, "query logits")
    references = as_source(references, "reference logits")
    check_pair(queries, references)
    n_refs = references.n_examples
    for name, value in (("k", k), ("k_full", k_full)):
        if value is not None and (not isinstance(value, (int, np.integer))
                                  or not 1 <= value <= n_refs):
            raise InputError(f"{name} must be between 1 and {n_refs} (the number of "
                             f"references), got {value}")
    device, budget, raw_bytes = _resources(queries, references, memory_budget, device)

    def staged(p: Progress) -> None:
        if progress is not None:
            progress(Progress("ablations" if p.stage == "kernel" else p.stage, p.done,
                              p.total, p.tiles_done, p.n_tiles, p.elapsed_s))

    if precision not in ("auto", "exact", "fast"):
        raise InputError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    own = "exact" if precision == "exact" else "auto"  # (see `precision` above)
    choice = _choose_plan(queries, references, k, k_full, no_log_softmax, budget, raw_bytes,
                          chunk_models, tile_size, device)
    if choice is None:  # too small a budget for the kernels side by side: one at a time
        return _one_at_a_time(queries, references, k, k_full, no_log_softmax,
                              dict(memory_budget=budget, device=device, progress=staged,
                                   chunk_models=chunk_models, tile_size=tile_size,
                                   precision=own))
    plan, fused = choice
    common = dict(classes=None, device=device, plan=plan, exclude_self=False, progress=staged)
    main = _Engine(queries, references, log_softmax=True, kept_statistics=kept_statistics,
                   **common)
    raw = _Engine(queries, references, log_softmax=False, **common) if fused else None
    with exact_float32_matmul(device):
        per_class, full, alone = _search(main, raw, k, k_full)
    if no_log_softmax and not fused:
        alone = _top_k_neighbors(queries, references, k, log_softmax=False,
                                memory_budget=budget, device=device, progress=staged,
                                chunk_models=chunk_models, tile_size=tile_size,
                                precision=own)
    return AblationNeighbors(per_class, full, alone, fused)


def _choose_plan(queries, references, k, k_full, no_log_softmax, budget, raw_bytes,
                 chunk_models, tile_size, device):
    """The pass's plan, and whether the no-log-softmax kernel joins it (when that takes no
    more tiles); None when the kernels side by side do not fit the budget at all."""
    n_classes = queries.n_classes

    def plan_for(with_raw: bool):
        # Features of the full kernel plus their per-class copy for the batched product
        # (2 x n_classes columns), twice that with the no-log-softmax features beside them.
        # The running top-k lists: k per ablation kernel, k_full for the full one.
        n_kernels = n_classes + (k_full is not None) + with_raw
        k_total = k * (n_classes + with_raw) + (k_full or 0)
        return plan_if_fits(
            queries.n_examples, references.n_examples, queries.n_models,
            n_classes * (4 if with_raw else 2), k_keep=-(-k_total // n_kernels),
            budget=budget, precision="exact", chunk_models=chunk_models,
            tile_size=tile_size, raw_bytes=raw_bytes, n_kernels=n_kernels,
            block_runs=(_PER_CLASS_RUNS, _MAX_CONTRACTION["exact"] // n_classes),
            device=device)

    plan = plan_for(False)
    if plan is None:
        return None
    both = plan_for(True) if no_log_softmax else None
    if both is not None and both.n_tiles <= plan.n_tiles:
        return both, True
    return plan, False


def _one_at_a_time(queries, references, k, k_full, no_log_softmax, common) -> AblationNeighbors:
    """The plain twin, and the way under a budget too small for the pass: one engine run
    per kernel (each within the whole budget)."""
    per_class = tuple(_top_k_neighbors(queries, references, k, classes=[c], **common)
                      for c in range(queries.n_classes))
    full = None if k_full is None else _top_k_neighbors(queries, references, k_full, **common)
    alone = (_top_k_neighbors(queries, references, k, log_softmax=False, **common)
             if no_log_softmax else None)
    return AblationNeighbors(per_class, full, alone, False, one_pass=False)


def _search(main: _Engine, raw: _Engine | None, k: int, k_full: int | None):
    """The tiles: per tile, every kernel accumulated over every block of runs, then merged
    into its running top-k."""
    n_q, n_classes = main.queries.n_examples, main.queries.n_classes
    classes = empty_topk(n_classes * n_q, k, main.device)  # (n_classes * n_queries, k)
    full = None if k_full is None else empty_topk(n_q, k_full, main.device)
    alone = None if raw is None else empty_topk(n_q, k, main.device)
    tiles = main.tiles()
    total = len(tiles) * main.n_models
    for i, tile in enumerate(tiles):
        blocks = _accumulate(main, raw, tile, want_full=full is not None,
                             report=lambda done, i=i: main._report(
                                 "kernel", i * main.n_models + done, total, i))
        per_class, whole, plain = blocks
        found = topk_block(per_class.view(n_classes * n_q, -1), k, offset=tile.start)
        classes = merge_topk(classes, found, k)
        if whole is not None:
            full = merge_topk(full, topk_block(whole, k_full, offset=tile.start), k_full)
        if plain is not None:
            alone = merge_topk(alone, topk_block(plain, k, offset=tile.start), k)
        del per_class, whole, plain, blocks
        main._report("kernel", (i + 1) * main.n_models, total, i + 1)
    main._query_cache.clear()
    if raw is not None:
        raw._query_cache.clear()
    split = tuple(Neighbors(classes.indices[c * n_q:(c + 1) * n_q],
                            classes.values[c * n_q:(c + 1) * n_q]) for c in range(n_classes))
    return split, full, alone


def _accumulate(main: _Engine, raw: _Engine | None, tile: slice, *, want_full: bool,
                report: Callable[[int], None]):
    """One tile of every kernel.

    Returns
    -------
    per_class : Tensor of shape (n_classes, n_queries, tile width), float32, each class's
        kernel (scaled by 1 / n_models).
    full : Tensor of shape (n_queries, tile width), the full kernel exactly as
        `_Engine.accumulate_tile` computes it, or None.
    no_log_softmax : Tensor of shape (n_queries, tile width), or None.
    """
    n_classes = main.queries.n_classes
    per_class = full = plain = None
    for models in main._model_blocks():
        fa = main._query_features(models, None, torch.float32)
        fb = main._features(main.references, main.stats_r, models, tile, torch.float32)
        if want_full:  # (n_queries, tile) += (n_queries, d) @ (d, tile), as exact mode does
            full = fa @ fb.T if full is None else full.addmm_(fa, fb.T)
        # (n_classes, n_queries, block runs) @ (n_classes, block runs, tile): the columns
        # of each class, one batched product for all classes together.
        a = fa.view(fa.shape[0], -1, n_classes).permute(2, 0, 1).contiguous()
        del fa
        # (n_classes, block runs, tile): a strided view of one 2-D transpose of fb, whose
        # classes' (runs, tile) matrices are row-major (row stride n_classes x tile), as the
        # batched product takes them. The 3-D transposing copy it replaces cost 0.2 s more
        # per block at CIFAR shape (`python benchmarks/micro.py classmajor`).
        b = fb.T.contiguous().view(-1, n_classes, fb.shape[0]).permute(1, 0, 2)
        del fb
        per_class = torch.bmm(a, b) if per_class is None else per_class.baddbmm_(a, b)
        del a, b
        if raw is not None:
            ra = raw._query_features(models, None, torch.float32)
            rb = raw._features(raw.references, raw.stats_r, models, tile, torch.float32)
            plain = ra @ rb.T if plain is None else plain.addmm_(ra, rb.T)
            del ra, rb
        report(models.stop)
    per_class *= 1.0 / main.n_models
    if full is not None:
        full *= 1.0 / (main.n_models * n_classes)
    if plain is not None:
        plain *= 1.0 / (main.n_models * n_classes)
    return per_class, full, plain
