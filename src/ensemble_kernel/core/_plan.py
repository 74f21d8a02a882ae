"""How the engine cuts its work to fit a memory budget (docs/architecture.md §2): tiles and blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import psutil
import torch

from ..errors import BudgetError, InputError

__all__ = ["Plan", "plan_memory", "plan_if_fits", "default_memory_budget", "format_bytes",
           "budget_beside"]

Precision = Literal["exact", "fast"]

# Contraction width (runs x classes) of a block below which products lose efficiency; fast
# mode wants wide blocks so that widening each bfloat16 product into float32 is amortised.
_MIN_CONTRACTION = {"exact": 512, "fast": 2048}
# Contraction width above which a wider block buys nothing but memory (and a larger bound
# on its float32 sum, gamma(width)).
_MAX_CONTRACTION = {"exact": 4096, "fast": 16384}
# Fast mode takes one block of every run where that costs at most this many times the
# tiles of the widest plan (see `plan_memory`).
_ONE_BLOCK_TILES = 4
# Features per block of fast mode's float32 re-score: its rounding bound grows with the
# block's width (gamma(16384) is about 1e-3, against bfloat16's 1.2%), so wider buys nothing.
_RESCORE_WIDTH = 16384
# Temporaries of normalising one piece of rows (float32 copy, log-softmax scratch), at most
# (and at most an eighth of the budget). A CPU normalises in pieces sized for its cache
# within this; a GPU in pieces of the whole scratch, and pays for each piece's launches and
# copies (on an H100, 64 MiB pieces cost exact mode 16,000 launches and a quarter of its time).
_PIECE_BYTES = 64 << 20
_GPU_PIECE_BYTES = 512 << 20
# The statistics pass per (example, run, class): raw read, float32, float64 copy, deviations.
_STATS_BYTES = 40


def _piece_cap(device: torch.device | str) -> int:
    return _GPU_PIECE_BYTES if torch.device(device).type == "cuda" else _PIECE_BYTES


@dataclass(frozen=True)
class Plan:
    """How the engine cuts the work to stay within its memory budget.

    Attributes
    ----------
    tile_size : references per tile.
    n_tiles : tiles on the reference axis.
    chunk_models : runs per block in the kernel pass.
    rescore_chunk_models : runs per block in fast mode's exact re-score.
    keep_features : fast mode keeps the float32 features of every query and reference that
        its candidate pass computes, for the re-score to read (instead of
        normalising every logit again); only where they fit beside a working plan.
    rescore_rows_bytes : the re-score's whole exact rows (float32 accumulators of the queries
        whose candidate window cannot settle them, and their top-k's temporaries).
    example_block : examples per block in the statistics pass.
    cache_queries : keep the normalised query features between tiles (when they fit in
        a third of the budget) instead of normalising the queries again for every tile.
    piece_bytes : scratch for normalising one piece of rows of a block.
    budget : bytes the plan was made for.
    """

    tile_size: int
    n_tiles: int
    chunk_models: int
    rescore_chunk_models: int
    rescore_rows_bytes: int
    keep_features: bool
    example_block: int
    cache_queries: bool
    piece_bytes: int
    budget: int


def resolve_device(device: torch.device | str) -> torch.device:
    """The device, refusing CUDA where there is none."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA device is available; use cpu")
    return device


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """The default memory budget: a quarter of the host RAM available now on the CPU, half
    of the free memory of the device on a CUDA device (the host's RAM is not the limit
    there)."""
    device = resolve_device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return int(psutil.virtual_memory().available // 4)


def budget_beside(budget: int, held: int, what: str) -> int:
    """The part of `budget` left for the engine while `held` bytes are kept beside it.

    Commands that keep arrays alive around engine calls (the sweep's predictions, the
    report's inputs and features) pass the engine only what is left, so that the whole
    process stays within the budget.

    Raises
    ------
    BudgetError
        If `held` leaves less than a quarter of the budget.
    """
    left = budget - held
    if left < budget // 4:
        raise BudgetError(
            f"a memory budget of {format_bytes(budget)} is too small: {what} hold "
            f"{format_bytes(held)} beside the kernel; raise --memory-budget to at least "
            f"{format_bytes(held * 4 / 3)}")
    return left


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan_memory(
    n_queries: int,
    n_references: int,
    n_models: int,
    n_used_classes: int,
    *,
    k_keep: int,
    budget: int,
    precision: Precision = "exact",
    chunk_models: int | None = None,
    tile_size: int | None = None,
    raw_bytes: int = 4,
    cache_queries: bool | None = None,
    n_kernels: int = 1,
    keep_features: bool | None = None,
    block_runs: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> Plan:
    """Choose tile and block sizes so that the engine's working memory fits `budget`.

    What is counted (bytes): per (query, reference) pair of a tile, the float32
    accumulator (and fast mode's bfloat16 product); per (example, run, class) of a block,
    the raw read (`raw_bytes`, the source's item size) and the normalised features (float32,
    or bfloat16 plus a transposed copy); the normalised query features of every run when
    they are cached; statistics, running top-k and a fixed allowance for the temporaries of
    normalising one piece of rows.

    `n_kernels` kernels accumulated side by side in each tile (the report's ablations,
    `ablations.py`) multiply the accumulator and the running top-k; their own feature
    copies are the caller's to count in `n_used_classes`.

    `block_runs` = (fewest, most): runs per block that the caller's products want, the
    fewest for their rate and the most for their rounding bound, where the contraction
    width is not runs x `n_used_classes` (the ablations' per-class products contract over
    the runs alone), in blocks as even as one stride allows; default from
    `_MIN_CONTRACTION` and `_MAX_CONTRACTION`.

    `device`: the piece scratch is at most an eighth of the budget, and at most 64 MiB on
    the CPU or 512 MiB on a GPU (`_piece_cap`).

    Raises
    ------
    BudgetError
        If even one reference per tile and one run per block do not fit.
    """
    fast = precision == "fast"
    feature = 2 if fast else 4
    cap = _piece_cap(device)
    piece_bytes = min(cap, budget // 8)
    per_query = (raw_bytes + feature) * n_used_classes  # per (query, run) in a block
    per_reference = (raw_bytes + feature * (2 if fast else 1)) * n_used_classes
    acc_per_column = (n_queries * (6 if fast else 4) + 4096) * n_kernels
    fixed = (
        # ClassStats, both splits: float64 mean and scale, float32 mean pair and scale
        (n_queries + n_references) * n_used_classes * 28
        + n_queries * k_keep * 16 * 6 * n_kernels  # running top-k and its merge temporaries
        + piece_bytes  # normalising one piece of rows
        + (4 << 20)  # allocator slack, small tensors
    )
    forced_tile = None if tile_size is None else max(1, min(tile_size, n_references))
    forced_models = None if chunk_models is None else max(1, min(chunk_models, n_models))
    t0, m0 = forced_tile or 1, forced_models or 1
    # The smallest plan: one reference and one run per block, or the ones forced (a plan
    # kept from elsewhere: the caches below take only the room it leaves).
    smallest = t0 * acc_per_column + (n_queries * per_query + t0 * per_reference) * m0
    cache_bytes = n_queries * n_models * n_used_classes * feature
    # The cache is worth it only where it leaves room for the smallest plan.
    fits_cache = (cache_bytes <= 0.3 * (budget - fixed)
                  and budget - fixed - cache_bytes >= smallest)
    cache_queries = fits_cache if cache_queries is None else (cache_queries and fits_cache)
    avail = budget - fixed - (cache_bytes if cache_queries else 0)
    # Fast mode's float32 features, kept for the re-score where they take at most 40% of
    # the room and leave the smallest plan (None: where they fit; False: never).
    keep_bytes = (n_queries + n_references) * n_models * n_used_classes * 4
    keep = (fast and keep_features is not False and keep_bytes <= 0.4 * (budget - fixed)
            and avail - keep_bytes >= smallest)
    avail -= keep_bytes if keep else 0
    fewest, most = block_runs or (math.ceil(_MIN_CONTRACTION[precision] / n_used_classes),
                                   _MAX_CONTRACTION[precision] // n_used_classes)
    want_models = min(n_models, max(1, min(fewest, most)))
    if block_runs is not None:  # the even block it will take (below), not a wider one
        want_models = math.ceil(n_models / math.ceil(n_models / want_models))

    def widest_tile(models: int) -> int:  # references per tile beside blocks of `models` runs
        spare = avail - n_queries * per_query * models
        return int(min(n_references, spare // (acc_per_column + per_reference * models)))

    def fits(t: int, models: int) -> bool:
        return t * acc_per_column + (n_queries * per_query + t * per_reference) * models <= avail

    if forced_tile is not None:
        tile = forced_tile
    else:
        if forced_models is None:
            while want_models > 1 and not fits(1, want_models):
                want_models //= 2
        tile = max(1, widest_tile(forced_models or want_models))
        tile = math.ceil(n_references / math.ceil(n_references / tile))  # even tiles
    if not fits(tile, m0):
        need = _round_up_for_display(_smallest_budget(fixed - piece_bytes + smallest, cap))
        what = (f"{n_queries} queries and {n_classes_text(n_used_classes)}"
                if forced_models is None else
                f"tiles of {tile} reference{'s' * (tile != 1)} with blocks of {m0} "
                f"run{'s' * (m0 != 1)} ({n_queries} queries, "
                f"{n_classes_text(n_used_classes)})")
        raise BudgetError(f"a memory budget of {format_bytes(budget)} is too small for {what}; "
                          f"at least {format_bytes(need)} is needed: raise --memory-budget")
    if forced_models is not None:
        models = forced_models
    else:
        room = (avail - tile * acc_per_column) // (n_queries * per_query + tile * per_reference)
        cap = max(1, most)
        models = int(max(1, min(room, cap, n_models)))
        if block_runs is not None:  # blocks as even as one stride allows: the last one
            # at most (blocks - 1) runs short, not a remainder at a poorer rate
            models = math.ceil(n_models / math.ceil(n_models / models))
        if fast and models < n_models and forced_tile is None and n_models <= most:
            # One block of every run bounds its bfloat16 rounding by the value instead of
            # by the norms (`bounds.low_precision_error`): far fewer queries to recompute.
            # Worth up to `_ONE_BLOCK_TILES` times the tiles, where the queries' features
            # are cached (else each tile would normalise them again), and up to the widest
            # block (wider, the float32 sum's own bound, gamma(width), outgrows the gain).
            one = widest_tile(n_models)
            tiles = math.ceil(n_references / max(one, 1))
            if one >= 1 and (cache_queries or tiles == 1) \
                    and tiles <= _ONE_BLOCK_TILES * math.ceil(n_references / tile):
                tile, models = math.ceil(n_references / tiles), n_models
    # Fast mode's re-score holds float32 features of every query and every reference
    # (half the room), and whole exact rows for the queries its window cannot settle (a fifth).
    rescore_room = int(0.5 * (budget - fixed)) // (
        (n_queries + n_references) * (raw_bytes + 4) * n_used_classes)
    rescore_models = int(max(1, min(rescore_room, n_models, _RESCORE_WIDTH // n_used_classes)))
    rows_bytes = int(max(1 << 16, 0.2 * (budget - fixed)))
    example_block = int(max(1, min(n_references + n_queries,
                                   (budget - fixed) // (_STATS_BYTES * n_used_classes * models))))
    return Plan(
        tile_size=tile,
        n_tiles=math.ceil(n_references / tile),
        chunk_models=models,
        rescore_chunk_models=rescore_models,
        rescore_rows_bytes=rows_bytes,
        keep_features=keep,
        example_block=example_block,
        cache_queries=cache_queries,
        piece_bytes=piece_bytes,
        budget=budget,
    )


def plan_if_fits(*args, **kwargs) -> Plan | None:
    """`plan_memory`'s plan, or None where the budget is too small for it (where it raises
    BudgetError): for callers that choose among plans rather than refuse."""
    try:
        return plan_memory(*args, **kwargs)
    except BudgetError:
        return None


def _smallest_budget(rest: int, cap: int = _PIECE_BYTES) -> int:
    """The smallest budget B that leaves `rest` bytes beside the scratch piece of B
    (`piece_bytes = min(cap, B // 8)`), i.e. B - min(cap, B // 8) >= rest.

    B - min(cap, B // 8) never falls as B grows, and is at least `rest` at B = rest + cap:
    the least such B, by bisection between `rest` and `rest + cap`."""
    lo, hi = rest, rest + cap
    while lo < hi:
        mid = (lo + hi) // 2
        if mid - min(cap, mid // 8) >= rest:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _round_up_for_display(n: int) -> int:
    """`n` rounded up to what `format_bytes` shows (one decimal), so the number a message
    suggests is never below the one needed."""
    scale = 1
    while n >= 1024 * scale and scale < 1024**4:
        scale *= 1024
    step = scale / 10 if scale > 1 else 1
    return int(math.ceil(math.ceil(n / step) * step))


def n_classes_text(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"
