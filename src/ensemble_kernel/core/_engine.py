"""The only place that streams models and tiles under a memory budget (docs/architecture.md §2).

Two passes over the logits:

1. **Statistics.** Every split is read once, in blocks of runs and examples, for the
   per-example, per-class mean and std (float64 accumulation).
2. **Tiles, then models.** The reference axis is cut into as few tiles as the budget
   allows. For each tile, blocks of runs are normalised and their product accumulated
   into a float32 (n_queries, tile) block; when the tile has seen every run its top-k
   is merged into the running top-k of each query.

Fast mode does pass 2 with bfloat16 products to find `n_candidates` per query, then
re-scores those candidates exactly in float32 and keeps the top-k. A query is final only
when a rigorous bound on the bfloat16 error (`bounds.py`, from the unit roundoffs, the
feature norms and the rounding the candidate pass measures) proves that no reference
outside its candidates can reach its exact k-th value; any other query is recomputed in
exact mode. So fast mode returns exact mode's neighbours, whatever the data (up to ties
within float32 rounding: the re-score sums in other blocks than exact mode, so
near-equal values may trade places).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from ..errors import BudgetError, InputError
from ._bounds import (FLOAT32_ROUNDOFF, NORM_SLACK, RECOMPUTED_ROUNDOFF,
                     RECOMPUTED_SLACK, low_precision_error, norm_unit, squared_norm_upper)
from ._kernel import (
    ClassStats,
    StatsAccumulator,
    check_classes,
    check_finite,
    check_fits_float32,
    needs_float64,
    bfloat16_matmul,
    exact_float32_matmul,
    normalized_features,
    prepare,
)
from ._neighbors import Neighbors, empty_topk, merge_topk, topk_block
from ._plan import Plan, default_memory_budget, format_bytes, plan_memory, resolve_device
from ._precision import Precision
from ._sources import LogitSource, as_source, check_pair, item_size

__all__ = [
    "Progress",
    "Plan",
    "plan_memory",
    "default_memory_budget",
    "top_k_neighbors",
    "compute_kernel",
]

# Argument order of the public functions (README, "From Python"): the training split
# (the references) first, then the test split (the queries); results have one row per
# test example. The private `_top_k_neighbors` / `_compute_kernel` keep the engine's
# queries-first order and the resume and distribution hooks.

logger = logging.getLogger(__name__)

# Working set of one piece of rows normalised at a time: small enough to stay in a core's
# L2 cache (the passes over it are memory-bound otherwise), large enough that the dozen
# torch calls per piece cost little beside the arithmetic.
_PIECE_CACHE_BYTES = 4 << 20


def _scratch_rows(piece_bytes: int, n_block_models: int, n_classes: int,
                  per_value: int = 16) -> int:
    """Rows of a block of runs normalised together within `piece_bytes` of scratch,
    `per_value` bytes a value (`_Engine._piece_rows`)."""
    return max(1, piece_bytes // (per_value * n_block_models * n_classes))


# On a GPU, bytes a value of a piece: its value and temporaries (16 in float32) computed in
# float64, which a confident row or a precise example makes of the whole piece (twice
# that), and the value as read, copied there first (`kernel.prepare`, at most 8).
_GPU_BYTES_PER_VALUE = 2 * 16 + 8


def _cache_sized_pieces(device: torch.device) -> bool:
    """Whether an engine on `device` normalises in pieces sized for a core's cache."""
    return device.type == "cpu"


def _piece_rows(device: torch.device, scratch_bytes: int, n_block: int, n_classes: int,
                cache_bytes: int, per_value: int) -> int:
    """Rows of a block of `n_block` runs x `n_classes` (as read) normalised together.

    On the CPU, within `cache_bytes` at `per_value` bytes a value: a piece that stays in
    a core's cache. On a GPU, which has no such cache to fit and pays for every launch
    and every copy from the host, within the whole `scratch_bytes` at
    `_GPU_BYTES_PER_VALUE`.
    """
    if _cache_sized_pieces(device):
        return _scratch_rows(cache_bytes, n_block, n_classes, per_value)
    return _scratch_rows(scratch_bytes, n_block, n_classes, _GPU_BYTES_PER_VALUE)


@dataclass(frozen=True)
class Progress:
    """One progress report from the engine.

    Attributes
    ----------
    stage : 'statistics', 'kernel', 'rescore' (fast mode) or 'fallback' (fast mode); the
        sweep adds 'sweep statistics' (`shared_statistics`), 'ablations' and 'sweep'.
    done, total : runs processed so far in this stage, out of `total` (summed over tiles).
    tiles_done, n_tiles : finished tiles of the reference axis.
    elapsed_s : seconds since the engine started.
    """

    stage: str
    done: int
    total: int
    tiles_done: int
    n_tiles: int
    elapsed_s: float


ProgressCallback = Callable[[Progress], None]
TileCallback = Callable[[int, Neighbors], None]


class KeptStatistics:
    """The statistics pass's result for some sources, kept for later engine runs.

    The report's test -> train pass and its ablations' pass read the same train runs and
    normalise them the same way (log-softmax, every class): the second takes the first's
    statistics instead of passing over every run again. Only the sources named here are
    kept, each under its normalisation (log-softmax or not, the classes) and device, and
    only for that very source object. Whoever holds this counts `nbytes` in its memory
    budget.

    Statistics are per (example, class) over the runs, so another plan's blocks of runs
    change them only within float32 rounding, which the engine's bounds allow for.
    """

    def __init__(self, *sources: LogitSource):
        self._sources = sources  # held, so no other object can take one's place
        self._kept: dict[tuple, ClassStats] = {}

    def _key(self, source: LogitSource, log_softmax: bool, classes, device) -> tuple | None:
        at = next((i for i, s in enumerate(self._sources) if s is source), None)
        return None if at is None else (at, bool(log_softmax), classes,
                                        str(torch.device(device)))

    def get(self, source, log_softmax, classes, device) -> ClassStats | None:
        key = self._key(source, log_softmax, classes, device)
        return None if key is None else self._kept.get(key)

    def put(self, source, log_softmax, classes, device, stats: ClassStats) -> None:
        key = self._key(source, log_softmax, classes, device)
        if key is not None:
            self._kept[key] = stats

    def clear(self) -> None:
        """Drop every statistic kept (their memory goes when no engine holds them)."""
        self._kept.clear()

    @property
    def nbytes(self) -> int:
        return sum(stats.nbytes for stats in self._kept.values())


def warn_constant(n_constant: int, split: str, stacklevel: int = 2) -> None:
    """The statistics pass's warning: outputs no run changes contribute 0."""
    warnings.warn(
        f"{n_constant} (example, class) outputs of the {split} split are identical in "
        "every run (std 0, or a spread below 1e-154, beyond float64's squares); they "
        "contribute 0 to the kernel",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def shared_statistics(source: LogitSource, parts: Sequence[slice], *,
                      device: torch.device | str, budget: int,
                      progress: ProgressCallback | None = None,
                      ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The statistics pass of several subsets of runs of `source` at once (log-softmax,
    every class): each run is read and prepared once, however many subsets hold it.

    For each of `parts` (contiguous runs, at least 2), the mean and 1 / std per (example,
    class), float64, as `_Engine._statistics` computes them for `select_runs(source,
    part)` with a block of all its runs: the same float32 values (log-softmax is per run
    and example), summed over the same runs by the same `StatsAccumulator`, in pieces of
    rows sized by the same rule. The same bits where the pieces fall alike; elsewhere, and
    where that engine's plan takes the runs in several blocks (over 4096 / n_classes runs
    in exact mode), within float32 rounding of the sums (torch sums a piece's last values
    in another order), as between any two of the engine's plans (`KeptStatistics`): kernel
    values that tie within that rounding may then break the other way. `python
    benchmarks/micro.py sweepstats` prints how far apart they are.

    None for a part that this pass leaves to the engine: where a float32 sum cannot be
    trusted (a bad value, which the engine names; squares that underflow), where a row
    needs float64 (a piece that `prepare` returns in float64, an example that
    `needs_float64`, or one with an output constant in float32 that float64 finds varying:
    the engine passes those again in float64). So every part this pass
    returns is one the engine would have computed in float32 alone. A part is dropped at
    the first block of examples that shows it, and the pass stops when none is left.

    `budget` bounds the runs read for a block of examples and their float32 outputs (a
    quarter of it, down to a block of one example); a piece's temporaries come on top
    (normalising it, and the accumulator's float64 sums, about 90 bytes a (row, class)),
    in pieces of a core's cache on the CPU and of a quarter of `budget` on a GPU. The
    results, 16 bytes a (part, example, class), are the caller's to count. `progress`
    hears of each block of examples done, as stage 'sweep statistics', in runs' worth of
    examples.
    """
    device = torch.device(device)
    lo, hi = min(p.start for p in parts), max(p.stop for p in parts)
    n_runs, n, n_classes = hi - lo, source.n_examples, source.n_classes

    def piece_rows(n_block: int) -> int:  # as the engine's statistics pass cuts them
        return _piece_rows(device, max(1, budget // 4), n_block, n_classes,
                           _PIECE_CACHE_BYTES, per_value=8)

    def varies_in_float64(raw: torch.Tensor, part: slice, constant: torch.Tensor) -> bool:
        """Whether outputs of `part` constant in float32 (`constant`, per row and class of
        the block `raw`) vary in float64: the engine takes those examples in float64
        (`_Engine._statistics`); truly constant ones it keeps in float32."""
        rows = constant.any(dim=1).nonzero().flatten()
        if len(rows) == 0:
            return False
        y = prepare(raw[part.start - lo:part.stop - lo, rows.to(raw.device)], log_softmax=True,
                    classes=None, device=device, runs_first=True,
                    precise=torch.ones(len(rows), dtype=torch.bool))
        return bool(((y != y[:1]).any(dim=0) & constant[rows]).any())

    # A block of examples: every run's raw values and their float32 outputs (a quarter of
    # the budget), prepared in pieces sized for the whole block of runs; then each part's
    # runs summed in pieces sized for its own (a few calls for a part of 2 runs, not one
    # per piece of 400 rows).
    rows = max(1, budget // 4 // (n_runs * n_classes * (item_size(source) + 4)))
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [
        (torch.empty(n, n_classes, dtype=torch.float64, device=device),
         torch.empty(n, n_classes, dtype=torch.float64, device=device)) for _ in parts]
    start, n_blocks = time.perf_counter(), math.ceil(n / rows)
    for b, e0 in enumerate(range(0, n, rows)):
        raw = source.read(slice(lo, hi), slice(e0, min(e0 + rows, n)))
        x = torch.empty(raw.shape, dtype=torch.float32, device=device)
        step = min(piece_rows(n_runs), rows)
        for r0 in range(0, raw.shape[1], step):
            piece = prepare(raw[:, r0:r0 + step], log_softmax=True, classes=None,
                            device=device, runs_first=True)
            if piece.dtype != torch.float32:  # a row needs float64: the engines' work
                return [None] * len(parts)
            x[:, r0:r0 + step] = piece
        del piece
        block = slice(e0, e0 + x.shape[1])
        for i, part in enumerate(parts):
            if out[i] is None:
                continue
            runs = x[part.start - lo:part.stop - lo]
            step = min(piece_rows(part.stop - part.start), rows)
            for r0 in range(0, x.shape[1], step):
                chunk = runs[:, r0:r0 + step]
                acc = StatsAccumulator(chunk.shape[1], n_classes, device)
                if not acc.update(chunk.clone()):  # (update overwrites what it is given)
                    break  # the engine's own pass handles it
                at = slice(e0 + r0, e0 + r0 + acc.mean.shape[0])
                out[i][0][at], out[i][1][at] = acc.finalize()
            else:
                mean, scale = out[i][0][block], out[i][1][block]
                if not bool(needs_float64(mean, scale, part.stop - part.start).any()) \
                        and not varies_in_float64(raw, part, scale == 0):
                    continue
            out[i] = None  # (its memory goes now)
        del raw
        finished = all(o is None for o in out)  # (then nothing is left to do)
        if progress is not None:
            done = n_blocks if finished else b + 1
            progress(Progress("sweep statistics", done * n_runs, n_blocks * n_runs, 0, 0,
                              time.perf_counter() - start))
        if finished:
            break
    return out


class _Engine:
    """One computation: the sources, the options, the statistics and the plan."""

    def __init__(
        self,
        queries: LogitSource,
        references: LogitSource,
        *,
        log_softmax: bool,
        classes: tuple[int, ...] | None,
        device: torch.device,
        plan: Plan,
        exclude_self: bool,
        progress: ProgressCallback | None,
        kept_statistics: KeptStatistics | None = None,
    ):
        self.queries, self.references = queries, references
        self.log_softmax, self.classes = log_softmax, classes
        self.device, self.plan = device, plan
        self.exclude_self = exclude_self
        self.progress = progress
        self.n_models = queries.n_models
        self.n_used = len(classes) if classes is not None else queries.n_classes
        self.start = time.perf_counter()
        self._query_cache: dict[tuple, torch.Tensor] = {}
        # Fast mode's float32 features from its candidate pass (`Plan.keep_features`):
        # (queries, references) while that pass fills them, and `_kept_whole` once every
        # tile has, so that the re-score reads them instead of normalising again.
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kept_whole = False
        # Fast mode's candidate pass measures how far its bfloat16 features lie from the
        # float32 ones (`_Rounding`), for a bound tighter than u ||a|| per side.
        self._rounding: _Rounding | None = None
        # Working blocks reused from tile to tile while `search` runs (`_Buffers`).
        self._buffers: _Buffers | None = None
        self.stats_q = self._kept_statistics(queries, "query", kept_statistics)
        self.stats_r = self.stats_q if references is queries else \
            self._kept_statistics(references, "reference", kept_statistics)

    def _kept_statistics(self, source: LogitSource, split: str,
                         kept: KeptStatistics | None) -> ClassStats:
        """`kept`'s statistics of `source` if it has them, else the statistics pass's
        (given to `kept` when it keeps that source)."""
        if kept is None:
            return self._statistics(source, split)
        where = (source, self.log_softmax, self.classes, self.device)
        stats = kept.get(*where)
        if stats is None:
            stats = self._statistics(source, split)
            kept.put(*where, stats)
        return stats

    def _report(self, stage: str, done: int, total: int, tiles_done: int = 0) -> None:
        if self.progress is not None:
            self.progress(
                Progress(stage, done, total, tiles_done, self.plan.n_tiles,
                         time.perf_counter() - self.start)
            )

    def _statistics(self, source: LogitSource, split: str) -> ClassStats:
        """Pass 1: mean and std per (example, class), checking every value is finite.

        Examples that float32 cannot standardise (`needs_float64`) are passed again in
        float64, and marked so that their features are computed in float64 too. So is an
        example with an output that float32 finds constant where it may not be
        (log-softmax's float32 outputs of its runs rounded to one value, a spread below one
        ulp that the float64 twin standardises to a whole feature; logits are taken at
        float32 either way, `kernel.prepare`). It stays float32, and constant, if float64
        finds it constant too.
        """
        n, block = source.n_examples, self.plan.example_block
        collapses = self.log_softmax
        mean = torch.empty(n, self.n_used, dtype=torch.float64, device=self.device)
        scale = torch.empty(n, self.n_used, dtype=torch.float64, device=self.device)
        precise = torch.zeros(n, dtype=torch.bool, device=self.device)
        n_constant = 0
        n_blocks = math.ceil(n / block)
        for b, e0 in enumerate(range(0, n, block)):
            rows = slice(e0, min(e0 + block, n))
            mean[rows], scale[rows] = self._block_statistics(source, rows, None, b, n_blocks)
            shaky = needs_float64(mean[rows], scale[rows], self.n_models)
            constant = (scale[rows] == 0) if collapses else None
            redo = shaky | constant.any(dim=1) if collapses else shaky
            if bool(redo.any()):  # those examples again, in float64
                at = redo.nonzero().flatten()
                mean64, scale64 = self._block_statistics(source, rows, at, b, n_blocks)
                if collapses:  # a constant one only if float64 finds it varies
                    keep = shaky[at] | ((scale64 > 0) & constant[at]).any(dim=1)
                    at, mean64, scale64 = at[keep], mean64[keep], scale64[keep]
                mean[rows][at], scale[rows][at] = mean64, scale64
                precise[rows][at] = True
            n_constant += int((scale[rows] == 0).sum())  # scale is 0 exactly where constant
        if n_constant:
            warn_constant(n_constant, split, stacklevel=5)
        # None: no example needs float64, and the hot path need not look.
        return ClassStats.from_float64(mean, scale, precise if bool(precise.any()) else None)

    def _block_statistics(self, source: LogitSource, rows: slice, only: torch.Tensor | None,
                          b: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1 / std of the examples `rows`, or, in float64, of the positions `only`
        in it (see `StatsAccumulator.finalize`).

        Each block of runs is read whole (stores read best in large blocks), then prepared
        and summed in pieces of rows small enough to stay in a core's cache: the dozen
        passes of log-softmax and sums over a piece then run at cache speed rather than
        memory speed, which is what limits them on most CPUs; on a GPU, in pieces of the
        plan's scratch (`_piece_rows`, as `_features`).
        """
        n_rows = rows.stop - rows.start if only is None else len(only)
        precise = None if only is None else torch.ones(n_rows, dtype=torch.bool)
        step = self._piece_rows(min(self.plan.chunk_models, self.n_models), source.n_classes,
                                _PIECE_CACHE_BYTES, per_value=8)  # float32 values: half
        pieces = [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]
        accs = [StatsAccumulator(p.stop - p.start, self.n_used, self.device) for p in pieces]
        for m0 in range(0, self.n_models, self.plan.chunk_models):
            models = slice(m0, min(m0 + self.plan.chunk_models, self.n_models))
            raw = source.read(models, rows)
            if only is not None:
                raw = raw[:, only.to(raw.device)]
            for piece, acc in zip(pieces, accs):
                part = raw[:, piece]
                x = prepare(part, log_softmax=self.log_softmax, classes=self.classes,
                            device=self.device, runs_first=True,
                            precise=None if precise is None else precise[piece])
                if not acc.update(x):
                    first = rows.start + piece.start if only is None else rows.start
                    self._update_precisely(acc, part, m0, first, source,
                                           None if precise is None else precise[piece])
            if only is None:
                self._report("statistics", b * self.n_models + models.stop,
                             n_blocks * self.n_models)
        mean, scale = zip(*(acc.finalize() for acc in accs))
        return torch.cat(mean), torch.cat(scale)

    def _piece_rows(self, n_block: int, n_classes: int, cache_bytes: int,
                    per_value: int) -> int:
        """`_piece_rows` within the plan's scratch (`plan.piece_bytes`) on a GPU."""
        return _piece_rows(self.device, self.plan.piece_bytes, n_block, n_classes,
                           cache_bytes, per_value)

    def _update_precisely(self, acc: StatsAccumulator, raw: torch.Tensor, m0: int, e0: int,
                          source: LogitSource, precise: torch.Tensor | None) -> None:
        """A block whose float32 sums were not finite: name a bad input, or redo it in float64."""
        where = dict(first_model=m0, first_example=e0, describe=source.describe_run)
        check_finite(raw, **where)  # NaN or Inf in the logits themselves
        check_fits_float32(raw, **where)  # a float64 logit beyond float32
        x = prepare(raw, log_softmax=self.log_softmax, classes=self.classes,
                    device=self.device, runs_first=True, precise=precise)
        if not acc.update(x.double()):  # finite float32 values always fit float64's sums
            raise RuntimeError("float64 statistics of finite float32 values overflowed")

    def _features(self, source: LogitSource, stats: ClassStats, models: slice,
                  examples: slice, dtype: torch.dtype, out: torch.Tensor | None = None,
                  rounding: torch.Tensor | None = None,
                  kept: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised features of a block, built piece by piece of rows into one buffer
        (`out`, a view of that shape and dtype, when given). With `rounding` (float64, one
        per row), each row's squared distance from its float32 features (`_Rounding`) is
        added to it; with `kept` (a float32 view of the same shape), the float32 features
        are written there too, from the same piece (fast mode's kept features).

        Returns
        -------
        Tensor of shape (n_examples, n_block_models * n_used), `dtype`.
        """
        raw = source.read(models, examples)  # (n_block_models, n_examples, n_classes)
        n_block, n_rows = raw.shape[0], raw.shape[1]
        if out is None:
            out = torch.empty(n_rows, n_block * self.n_used, dtype=dtype, device=self.device)
        piece = self._piece_rows(n_block, raw.shape[2],
                                 min(self.plan.piece_bytes, _PIECE_CACHE_BYTES), per_value=16)
        for r0 in range(0, n_rows, piece):
            r1 = min(r0 + piece, n_rows)
            part = stats.rows(slice(examples.start + r0, examples.start + r1))
            x = prepare(raw[:, r0:r1], log_softmax=self.log_softmax, classes=self.classes,
                        device=self.device, precise=part.precise)
            features = normalized_features(x, part)
            if kept is not None:
                kept[r0:r1] = features
            out[r0:r1] = features  # cast to `dtype` here
            if rounding is not None:
                self._measure_rounding(out[r0:r1], features, rounding[r0:r1])
        return out

    def _measure_rounding(self, low: torch.Tensor, high: torch.Tensor,
                          into: torch.Tensor) -> None:
        """Add the squared norms of the rows of `low - high` to `into` (float64), measured
        as `_Rounding` assumes. The callers pass a cache-sized piece (`_features`) or a few
        rows (`rounding_ratio`).

        low : the bfloat16 features; high : the same features before the cast (float32,
        or float64 for the rows `kernel.prepare` computes so). The difference is exact:
        a value and its rounding to bfloat16 lie within a factor 2 (Sterbenz).
        """
        difference = low.to(high.dtype, copy=True).sub_(high)
        into += _block_norms(difference, norm_unit(self.plan.chunk_models * self.n_used))

    def accumulate_tile(self, tile: slice, *, rows: torch.Tensor | None, dtype: torch.dtype,
                        stage: str, tiles_done: int, total: int, done_before: int) -> torch.Tensor:
        """The kernel block (queries or `rows` of them) x references in `tile`.

        Returns
        -------
        Tensor of shape (n_rows, tile width), float32, scaled by 1 / (n_models * n_used);
        or, for a low-precision pass with one block of runs, that block's product as it
        came (`dtype`, not scaled: `search` scales the values it selects, in float32 as
        here, which gives the same values; widening the whole block to float32 first
        would cost a pass over it).
        """
        acc = None
        measured = None  # the rounding of a low-precision pass (`_Rounding`)
        if self._rounding is not None and dtype != torch.float32:
            measured = self._rounding.references[tile]
        width = tile.stop - tile.start
        shape = (self.queries.n_examples if rows is None else len(rows), width)
        for models in self._model_blocks():
            fa = self._query_features(models, rows, dtype)
            kept = None if self._kept is None else self._kept[1][tile, self._columns(models)]
            fb = self._features(self.references, self.stats_r, models, tile, dtype,
                                rounding=measured, kept=kept,
                                out=self._buffer("references", (width, fa.shape[1]), dtype))
            if dtype == torch.float32:
                # (n_rows, tile) += (n_rows, d) @ (d, tile); the first block writes it.
                if acc is None:
                    acc = torch.mm(fa, fb.T, out=self._buffer("acc", shape, torch.float32))
                else:
                    acc.addmm_(fa, fb.T)
            else:  # low-precision product, float32 accumulation
                # fb.T as a strided view: copying it contiguous first costs more than it
                # saves (`python benchmarks/micro.py layout`)
                product = torch.mm(fa, fb.T, out=self._buffer("product", shape, dtype))
                if models.stop - models.start == self.n_models:  # one block: as it came
                    if self.exclude_self:
                        self._mask_self(product, tile, rows)
                    return product
                if acc is None:
                    acc = self._buffer("acc", shape, torch.float32).copy_(product)
                else:
                    acc.add_(product)
                del product
            del fa, fb
            self._report(stage, done_before + models.stop, total, tiles_done)
        acc *= 1.0 / (self.n_models * self.n_used)
        if self.exclude_self:
            self._mask_self(acc, tile, rows)
        return acc

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A working block (values undefined): reused while `search` runs (`_Buffers`),
        a new one otherwise."""
        if self._buffers is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._buffers.get(name, shape, dtype)

    def _columns(self, models: slice) -> slice:
        """The feature columns of a block of runs."""
        return slice(models.start * self.n_used, models.stop * self.n_used)

    def _model_blocks(self) -> list[slice]:
        step = self.plan.chunk_models
        return [slice(m, min(m + step, self.n_models)) for m in range(0, self.n_models, step)]

    def _query_features(self, models: slice, rows: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
        """Normalised query features of a block of runs, from the cache when the plan has one."""
        key = (models.start, models.stop, dtype)
        if key in self._query_cache:
            return self._query_cache[key]
        everything = slice(0, self.queries.n_examples)
        # The queries' rounding is measured the first time their features are made (a
        # later tile makes the same features again when the plan cannot cache them).
        measured = None
        if self._rounding is not None and not self._rounding.queries_done \
                and dtype != torch.float32:
            measured = self._rounding.queries
        kept = None  # float32 into the kept features too
        if self._kept is not None and rows is None:
            kept = self._kept[0][:, self._columns(models)]
        fa = self._features(self.queries, self.stats_q, models, everything, dtype,
                            rounding=measured, kept=kept)
        if rows is not None:
            fa = fa[rows]
        if self.plan.cache_queries and self.plan.n_tiles > 1:
            self._query_cache[key] = fa
        return fa

    def _mask_self(self, acc: torch.Tensor, tile: slice, rows: torch.Tensor | None) -> None:
        query_index = (torch.arange(acc.shape[0], device=self.device) if rows is None
                       else rows.to(self.device))
        inside = (query_index >= tile.start) & (query_index < tile.stop)
        acc[inside.nonzero().flatten(), query_index[inside] - tile.start] = float("-inf")

    def tiles(self) -> list[slice]:
        t, n = self.plan.tile_size, self.references.n_examples
        return [slice(s, min(s + t, n)) for s in range(0, n, t)]

    def search(self, k_keep: int, *, dtype: torch.dtype, rows: torch.Tensor | None = None,
               stage: str = "kernel", finished: Mapping[int, Neighbors] | None = None,
               on_tile: TileCallback | None = None,
               only: Collection[int] | None = None) -> Neighbors:
        """Pass 2: the running top-`k_keep` over every tile.

        `finished` holds tiles computed before (resume); `on_tile(i, top_k)` is called as
        each new tile completes, so that a caller can save it.
        """
        n_rows = self.queries.n_examples if rows is None else len(rows)
        best = empty_topk(n_rows, k_keep, self.device)
        tiles = self.tiles()
        total = len(tiles) * self.n_models
        self._report(stage, 0, total, 0)  # the stage starts (its first report is a block away)
        # Keep the float32 features only where this pass computes every one of them.
        keep = (self.plan.keep_features and dtype != torch.float32 and rows is None
                and only is None and not finished)
        if keep:
            d = self.n_models * self.n_used
            self._kept = (torch.empty(self.queries.n_examples, d, device=self.device),
                          torch.empty(self.references.n_examples, d, device=self.device))
        # Measure the bfloat16 rounding only where this pass makes every feature (a resumed
        # or distributed pass bounds it by u instead).
        self._rounding = None
        if dtype != torch.float32 and rows is None and only is None and not finished:
            self._rounding = _Rounding.zeros(self.queries.n_examples,
                                             self.references.n_examples, self.device)
        self._buffers = _Buffers(self.device)
        for i, tile in enumerate(tiles):
            if only is not None and i not in only:  # another rank's tile
                continue
            if finished is not None and i in finished:
                found = Neighbors(finished[i].indices.to(self.device),
                                  finished[i].values.to(self.device))
            else:
                block = self.accumulate_tile(tile, rows=rows, dtype=dtype, stage=stage,
                                             tiles_done=i, total=total,
                                             done_before=i * self.n_models)
                found = topk_block(block, k_keep, offset=tile.start,
                                   exact_ties=dtype == torch.float32)
                if block.dtype != torch.float32:  # a product not yet scaled
                    values = found.values.float()
                    values *= 1.0 / (self.n_models * self.n_used)
                    found = Neighbors(found.indices, values)
                del block
                if self._rounding is not None:
                    self._rounding.queries_done = True
                if on_tile is not None:
                    on_tile(i, found)
            best = merge_topk(best, found, k_keep)
            self._report(stage, (i + 1) * self.n_models, total, i + 1)
        self._query_cache.clear()
        self._buffers = None
        self._kept_whole = keep
        if self._rounding is not None:
            self._rounding.complete = True
        return best

    def rescore(self, candidates: torch.Tensor, lengths: torch.Tensor | None = None, *,
                whole: torch.Tensor | None = None, k: int = 1) -> Rescored:
        """Exact float32 kernel values of (query, candidate) pairs, and the feature norms.

        Parameters
        ----------
        candidates : Tensor of shape (n_queries, n_candidates), int64 reference indices.
        lengths : Tensor of shape (n_queries,), int64, or None: re-score only the first
            `lengths[q]` candidates of query q (a window; see `_fast_search`); None: all.
        whole : Tensor of shape (n_whole,), int64 query indices, or None: queries whose
            whole row of exact values is accumulated in the same pass (from the same
            float32 features), and their top-`k` taken under the order rule.

        Returns
        -------
        Rescored: values of shape (n_queries, n_candidates), float32 (-inf past each
        query's window), upper bounds on the squared norms of the feature rows of every
        query and every reference (float64, `bounds.squared_norm_upper`), and the `whole`
        rows' top-k (None without `whole`).
        """
        n_q, n_c = candidates.shape
        if lengths is None:
            lengths = torch.full((n_q,), n_c, dtype=torch.int64, device=self.device)
        query_norms = torch.zeros(n_q, dtype=torch.float64, device=self.device)
        reference_norms = torch.zeros(self.references.n_examples, dtype=torch.float64,
                                      device=self.device)
        step = self.plan.rescore_chunk_models  # (the kept features are read in blocks as wide)
        unit = norm_unit(step * self.n_used)  # every block's norms in the bound's unit
        everything_q = slice(0, self.queries.n_examples)
        everything_r = slice(0, self.references.n_examples)
        # The pairs to re-score as a sparse (n_queries, n_references) pattern, columns
        # sorted within each row as CSR wants (the window's references first: the others
        # sort last as n_references); `order` maps sorted slots back to candidate slots.
        inside = torch.arange(n_c, device=self.device)[None, :] < lengths[:, None]
        keys = torch.where(inside, candidates, self.references.n_examples)
        sorted_keys, order = keys.sort(dim=1)
        crow = torch.zeros(n_q + 1, dtype=torch.int64, device=self.device)
        crow[1:] = lengths.cumsum(0)
        pattern = _csr(crow, sorted_keys[inside], torch.zeros(int(crow[-1]), device=self.device),
                       (n_q, self.references.n_examples))
        self._report("rescore", 0, self.n_models, self.plan.n_tiles)
        rows = None
        if whole is not None and len(whole):
            rows = torch.zeros(len(whole), self.references.n_examples, device=self.device)
        for m0 in range(0, self.n_models, step):
            models = slice(m0, min(m0 + step, self.n_models))
            if self._kept_whole:  # the features as the candidate pass made them
                fa, fb = (kept[:, self._columns(models)] for kept in self._kept)
            else:
                fa = self._features(self.queries, self.stats_q, models, everything_q,
                                    torch.float32)
                fb = self._features(self.references, self.stats_r, models, everything_r,
                                    torch.float32)
            query_norms += _block_norms(fa, unit)
            reference_norms += _block_norms(fb, unit)
            # values += <fa[q], fb[r]> for every pair: one float32 dot product each, read
            # straight from the feature rows (no gathered copy), added to the running sum.
            pattern = torch.sparse.sampled_addmm(pattern, fa, fb.T)
            if rows is not None:
                rows.addmm_(fa[whole.to(self.device)], fb.T)
            del fa, fb
            self._report("rescore", models.stop, self.n_models, self.plan.n_tiles)
        self._kept = None  # read once
        scale = 1.0 / (self.n_models * self.n_used)
        values = torch.full((n_q, n_c), float("-inf"), device=self.device)  # never re-scored
        values[inside] = pattern.values() * scale  # (n_queries, n_c), in sorted slots
        out = torch.empty_like(values).scatter_(1, order, values)
        bound = dict(width=step * self.n_used, n_blocks=math.ceil(self.n_models / step),
                     n_terms=self.n_models * self.n_used)
        query_norms = squared_norm_upper(query_norms, **bound)
        reference_norms = squared_norm_upper(reference_norms, **bound)
        found = None
        if rows is not None:
            rows *= scale
            if self.exclude_self:
                self._mask_self(rows, slice(0, self.references.n_examples), whole)
            # the repair of tied rows holds at most 64 bytes per element of its rows
            chunk = max(1, self.plan.rescore_rows_bytes // (2 * 64 * rows.shape[1]))
            found = topk_block(rows, k, row_chunk=chunk)
        return Rescored(out, query_norms, reference_norms, found)

    def rounding_norms(self) -> tuple[torch.Tensor, float] | None:
        """Upper bounds on ||a_hat - a|| per query and on max_b ||b_hat - b|| over the
        references (the candidate pass's bfloat16 features against its float32 ones), or
        None where that pass did not measure every row (`search`)."""
        if self._rounding is None or not self._rounding.complete:
            return None
        blocks = self._model_blocks()
        bound = dict(width=self.plan.chunk_models * self.n_used, n_blocks=len(blocks),
                     n_terms=self.n_models * self.n_used)
        queries = squared_norm_upper(self._rounding.queries, **bound).sqrt()
        references = squared_norm_upper(self._rounding.references, **bound).max().sqrt()
        return queries, float(references)

    def error_bound(self, query_norm, reference_norm, largest=None):
        """A bound on |bfloat16 kernel value - re-scored value| (`bounds.low_precision_error`)
        for feature norms at most `query_norm` and `reference_norm`, with the rounding this
        engine's candidate pass measured (u per side where it measured none)."""
        measured = self.rounding_norms()
        if measured is None:
            query_rounding = RECOMPUTED_ROUNDOFF * query_norm
            reference_rounding = RECOMPUTED_ROUNDOFF * reference_norm
        else:  # plus the difference a re-score's own float32 features may have
            query_rounding = measured[0] + RECOMPUTED_SLACK * query_norm
            reference_rounding = measured[1] + RECOMPUTED_SLACK * reference_norm
        return _error_bound(self.plan, self.n_models, self.n_used, query_norm=query_norm,
                            reference_norm=reference_norm, query_rounding=query_rounding,
                            reference_rounding=reference_rounding, largest=largest)

    def low_precision_bound(self, rescored: Rescored, largest=None) -> torch.Tensor:
        """Per query, a bound on |bfloat16 kernel value - exact value|: for every reference
        without `largest`; with it, for the references whose |bfloat16 value| is at most
        `largest` (the query's candidates). A reference whose value lies below them has an
        exact value below the last candidate's value plus this bound (the bound grows with
        the value; see `bounds.low_precision_error`), which is all `_fast_search` needs of it.

        `error_bound` at the norms' upper bounds from the re-score (raised by NORM_SLACK):
        ||a|| and max_b ||b||.

        Returns
        -------
        Tensor of shape (n_rows,), float64.
        """
        slack = 1 + NORM_SLACK
        query = rescored.query_norms.sqrt() * slack
        reference = float(rescored.reference_norms.max().sqrt()) * slack
        return self.error_bound(query, reference, largest)

    def guessed_bound(self, largest=None):
        """G per query (`guessed_bound`), with the rounding measured where there is one."""
        norm = _expected_norm(self.n_models, self.n_used)
        return self.error_bound(norm, norm, largest)

    def rounding_ratio(self, n_rows: int = 256) -> float:
        """The largest ||bf16(a) - a|| / ||a|| over some reference rows' features of the
        first block of runs: what the candidate pass would measure, as an estimate."""
        rows = slice(0, min(n_rows, self.references.n_examples))
        features = self._features(self.references, self.stats_r, self._model_blocks()[0],
                                  rows, torch.float32)
        delta = torch.zeros(features.shape[0], dtype=torch.float64, device=self.device)
        self._measure_rounding(features.to(torch.bfloat16), features, delta)
        norms = _block_norms(features, FLOAT32_ROUNDOFF)
        ratio = (delta / norms.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
        return float(ratio.max()) if len(ratio) else RECOMPUTED_ROUNDOFF


class _Buffers:
    """Working blocks kept from one tile to the next, by name.

    A fresh block of this size is newly mapped memory (`cli/malloc.py`), and the first
    write to each of its pages costs the kernel a fault: at CIFAR shape about 870,000 of
    them in an exact search, 2.8 s of system time. The plan counts every such block at
    its peak anyway, so keeping them costs no memory beyond it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous block of `shape` and `dtype` (its values undefined)."""
        n = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.dtype != dtype or flat.numel() < n:
            self._flat.pop(name, None)  # freed before its successor is allocated
            flat = self._flat[name] = torch.empty(n, dtype=dtype, device=self.device)
        return flat[:n].view(shape)


@dataclass
class _Rounding:
    """How far fast mode's bfloat16 features lie from the float32 ones they were cast
    from: per row, the squared norms of the difference, measured block by block of runs
    (float32 or float64, `_block_norms`) and summed in float64, as
    `bounds.squared_norm_upper` assumes."""

    queries: torch.Tensor  # (n_queries,) float64
    references: torch.Tensor  # (n_references,) float64
    queries_done: bool = False  # the queries' features were made (and measured) once
    complete: bool = False  # every row measured: the pass made every feature

    @classmethod
    def zeros(cls, n_queries: int, n_references: int, device: torch.device) -> "_Rounding":
        return cls(torch.zeros(n_queries, dtype=torch.float64, device=device),
                   torch.zeros(n_references, dtype=torch.float64, device=device))


# Fast mode computes whole in its re-score the queries whose window holds every candidate and
# whose bfloat16 k-th and last values lie within this many guessed bounds G (see
# `_fast_search`): where the proof after the re-score is expected to fail. A guess only: a
# query it misses is recomputed, one it takes needlessly costs a row of products.
INLINE_GAP = 1 + 1 / 16

def _error_bound(plan: Plan, n_models: int, n_used: int, **norms):
    """`bounds.low_precision_error` with the blocks of `plan` (candidate pass and re-score)."""
    step = plan.rescore_chunk_models
    return low_precision_error(
        **norms, width=plan.chunk_models * n_used,
        n_blocks=math.ceil(n_models / plan.chunk_models), n_terms=n_models * n_used,
        rescore_width=step * n_used, rescore_blocks=math.ceil(n_models / step))


def _expected_norm(n_models: int, n_used: int) -> float:
    """What a feature row's norm should be: sqrt((n_models - 1) * n_used), raised by
    WINDOW_NORM_SLACK.

    Standardising with the unbiased std makes each class's column of a row sum to
    n_models - 1 in squares (0 for an output no run changes), so the norm is at most this
    up to rounding. Only a guess for sizing the re-score's window: the bound that decides
    a query uses the norms the re-score measures (`_Engine.low_precision_bound`).
    """
    return math.sqrt((n_models - 1) * n_used) * (1 + WINDOW_NORM_SLACK)


def guessed_bound(plan: Plan, n_models: int, n_used: int, *, rounding: float | None = None,
                  largest=None):
    """G, the bound fast mode sizes its windows with (`_fast_search`), for a fast plan
    before it runs: at the expected feature norms, with the inputs' rounding `rounding`
    times the norm (None: u, the most it can be) and the values at most `largest` (None:
    any; see `bounds.low_precision_error`)."""
    norm = _expected_norm(n_models, n_used)
    ratio = RECOMPUTED_ROUNDOFF if rounding is None else rounding + RECOMPUTED_SLACK
    return _error_bound(plan, n_models, n_used, query_norm=norm, reference_norm=norm,
                        query_rounding=ratio * norm, reference_rounding=ratio * norm,
                        largest=largest)


# How far above sqrt((n_models - 1) * n_used) a feature norm may come before the re-score's
# window, sized from that guess, no longer proves anything (such queries are recomputed).
WINDOW_NORM_SLACK = 2.0**-10


def _block_norms(features: torch.Tensor, unit: float) -> torch.Tensor:
    """Squared norms of a block's feature rows, float64, measured in `unit` (the one
    `bounds.norm_unit` gives the re-score's nominal block width, which its bound assumes,
    also for a narrower last block)."""
    if unit == FLOAT32_ROUNDOFF:
        return torch.linalg.vector_norm(features, dim=1).double().square_()
    return torch.linalg.vector_norm(features, dim=1, dtype=torch.float64).square_()


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
         size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR tensor, its invariants checked, without torch's notice that CSR support
    is in beta, nor torch 2.11's that the checks are "implicitly disabled", which it gave
    (seen on a GPU machine) despite `check_invariants=True` (pytorch#178274). Switching
    the process-wide check on around it instead would leak to other threads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message=".*invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=True)


@dataclass(frozen=True)
class Rescored:
    """Exact values of candidate pairs and the squared norms of the feature rows."""

    values: torch.Tensor  # (n_rows, n_candidates) float32; -inf where not re-scored
    query_norms: torch.Tensor  # (n_rows,) float64: each query's squared feature norm, or above
    reference_norms: torch.Tensor  # (n_references,) float64: the same for references
    whole: Neighbors | None = None  # top-k of the rows computed whole, in `whole`'s order


def _resources(queries: LogitSource, references: LogitSource, memory_budget: int | None,
               device) -> tuple[torch.device, int, int]:
    """(device, budget in bytes, bytes per stored logit) of a job, the budget checked."""
    device = resolve_device(device)
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise InputError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    raw_bytes = max(item_size(queries), item_size(references))
    return device, budget, raw_bytes


def _prepare_engine(queries, references, k, *, log_softmax, classes, exclude_self, precision,
                    memory_budget, device, chunk_models, tile_size, progress, k_keep,
                    cache_queries=None, kept_statistics=None):
    if precision not in ("exact", "fast"):  # 'auto' is resolved before (`_pilot.resolve_auto`)
        raise InputError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    queries = as_source(queries, "query logits")
    references = queries if (exclude_self and references is None) else as_source(
        references, "reference logits")
    check_pair(queries, references)
    if exclude_self and queries.n_examples != references.n_examples:
        raise InputError("exclude_self (leave-one-out) needs the queries to be the references")
    n_refs = references.n_examples - (1 if exclude_self else 0)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n_refs:
        other = " other than the query itself" if exclude_self else ""
        if n_refs < 1:  # (not "between 1 and 0")
            raise InputError(f"k={k}: there are no references{other} to take neighbours from "
                             f"({references.n_examples} example"
                             f"{'' if references.n_examples == 1 else 's'} in all)")
        raise InputError(f"k must be between 1 and {n_refs} (the number of references"
                         f"{other}), got {k}")
    used = check_classes(classes, queries.n_classes)
    n_used = len(used) if used is not None else queries.n_classes
    device, budget, raw_bytes = _resources(queries, references, memory_budget, device)
    plan = plan_memory(queries.n_examples, references.n_examples, queries.n_models, n_used,
                       k_keep=k_keep, budget=budget, precision=precision,
                       chunk_models=chunk_models, tile_size=tile_size, raw_bytes=raw_bytes,
                       cache_queries=cache_queries, device=device)
    logger.info("plan: %s", plan)
    return _Engine(queries, references, log_softmax=log_softmax, classes=used, device=device,
                   plan=plan, exclude_self=exclude_self, progress=progress,
                   kept_statistics=kept_statistics)


def _top_k_neighbors(
    queries,
    references=None,
    k: int = 20,
    *,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
    exclude_self: bool = False,
    precision: Precision = "auto",
    n_candidates: int | None = None,
    memory_budget: int | None = None,
    device: torch.device | str = "cpu",
    chunk_models: int | None = None,
    tile_size: int | None = None,
    progress: ProgressCallback | None = None,
    finished_tiles: Mapping[int, Neighbors] | None = None,
    on_tile: TileCallback | None = None,
    tiles: Collection[int] | None = None,
    combine: Callable[[Neighbors], Neighbors] | None = None,
    cache_queries: bool | None = None,
    kept_statistics: KeptStatistics | None = None,
) -> Neighbors:
    """The top-k references of every query, with the engine's internal hooks.

    The CLI, the checkpoint and torchrun code call this; users call `top_k_neighbors`
    (train first, user options only). Queries come first here, as in the engine.

    Parameters
    ----------
    queries : array or LogitSource of shape (n_models, n_queries, n_classes).
    references : array or LogitSource of shape (n_models, n_references, n_classes), from
        the same runs in the same order. With `exclude_self`, leave it None: the queries
        are the references (leave-one-out) and each is excluded from its own neighbours.
    k : neighbours per query, 1 <= k <= n_references.
    log_softmax : normalise logits with log-softmax first (the reference does).
    classes : restrict the kernel to these classes (a per-class kernel); None: all.
    precision : 'exact' (float32 products), 'fast' (bfloat16 products to find
        candidates, then an exact float32 re-score: the same neighbours as 'exact'), or
        'auto': fast where a probe of this machine (cached; `precision.choose_precision`)
        predicts it faster than exact by a safety margin, else exact. Every choice
        returns the same neighbours.
    n_candidates : fast mode's candidates per query; default max(2k, k + 128).
    memory_budget : bytes of working memory; default a quarter of what is available.
    device : 'cpu' or 'cuda'.
    chunk_models, tile_size : override the plan (tests and benchmarks).
    progress : called with a `Progress` as the work advances.
    finished_tiles, on_tile : resumption. `on_tile(i, top_k)` receives each finished
        tile's top-`candidates_per_query(k, precision)`; passing those back as
        `finished_tiles` (with the same `tile_size`, `chunk_models` and a precision of
        'exact' or 'fast', not 'auto') skips them.
    tiles, combine : distribution. Compute only the reference tiles `tiles` (indices into
        the plan's tiles), then pass the partial top-k through `combine` (for example an
        all-gather and merge across ranks) before fast mode's re-score.
    cache_queries : keep normalised query features between tiles; None: when they fit
        in 30% of the budget. False measures the engine as it runs when they do not.
    kept_statistics : statistics kept between engine runs (`KeptStatistics`): taken from it, or
        given to it, for the sources it keeps.

    Returns
    -------
    Neighbors with indices and values of shape (n_queries, k), best first; equal values
    are ordered by smaller reference index.
    """
    if precision != "exact" and n_candidates is not None and n_candidates < k:
        raise InputError(f"n_candidates must be at least k={k}, got {n_candidates}")
    if precision == "auto":
        from . import _pilot  # (it runs the engine on a sample: imported when asked)

        precision = _pilot.resolve_auto(queries, references, k, exclude_self=exclude_self,
                                  classes=classes, n_candidates=n_candidates,
                                  memory_budget=memory_budget, device=device,
                                  log_softmax=log_softmax)
    n_candidates = k_keep = candidates_per_query(k, precision, n_candidates)
    engine = _prepare_engine(queries, references, k, log_softmax=log_softmax, classes=classes,
                             exclude_self=exclude_self, precision=precision,
                             memory_budget=memory_budget, device=device,
                             chunk_models=chunk_models, tile_size=tile_size, progress=progress,
                             k_keep=k_keep, cache_queries=cache_queries,
                             kept_statistics=kept_statistics)
    resume = dict(finished=finished_tiles, on_tile=on_tile, only=tiles)
    combine = combine or (lambda found: found)
    if precision == "exact":
        with exact_float32_matmul(engine.device):
            return combine(engine.search(k, dtype=torch.float32, **resume))
    return _fast_search(engine, k, n_candidates, resume, combine)


def candidates_per_query(k: int, precision: Precision, n_candidates: int | None = None) -> int:
    """How many neighbours each tile keeps: k, or fast mode's candidates (max(2k, k + 128))."""
    if precision == "exact":
        return k
    return n_candidates or max(2 * k, k + 128)


def _fast_search(engine: _Engine, k: int, n_candidates: int, resume: dict,
                 combine: Callable[[Neighbors], Neighbors]) -> Neighbors:
    """bfloat16 candidates, an exact re-score, and a proof per query that nothing was missed.

    Every pair's exact value lies within the query's error bound B of its bfloat16 value
    (`_Engine.low_precision_bound`). The k best bfloat16 candidates therefore have exact
    values of at least v_k - B (v_k: the k-th bfloat16 value), so any reference whose
    bfloat16 value is below v_k - 2B cannot reach the exact top-k. Only the window of
    candidates at or above v_k - 2G is re-scored, G being the bound computed from the
    expected feature norms; once the re-score has measured the norms, a query is final if

    - B <= G and its window stopped before the end of its candidates (everything after
      it, and every reference outside the candidates, lies below v_k - 2B), or
    - its window holds every candidate and even the last candidate's bfloat16 value plus B
      cannot reach the exact k-th value.

    The second test needs the re-score's values. It fails about where the bfloat16 k-th
    and last values lie within G of each other (the exact k-th value is then seldom B above
    the last), so those queries (up to `INLINE_GAP` G) get their whole row of exact values
    in the re-score's own pass, from the same float32 features, as far as
    `Plan.rescore_rows_bytes` allows, rather than a second pass over every reference. Any
    other unsettled query is recomputed in exact mode.
    """
    n_refs = engine.references.n_examples
    n_c = min(n_candidates, n_refs)
    with bfloat16_matmul(engine.device):
        approx = combine(engine.search(n_c, dtype=torch.bfloat16, **resume))
    low = approx.values.double()  # (n_queries, n_c), best first
    largest = _largest_magnitude(low)
    guess = engine.guessed_bound(largest)  # (n_queries,)
    lengths = (low >= (low[:, k - 1] - 2 * guess)[:, None]).sum(dim=1)  # a prefix of each row
    every_reference = n_c >= n_refs - engine.exclude_self
    whole = lengths >= n_c
    crowded = whole & (low[:, k - 1] - low[:, -1] <= INLINE_GAP * guess)
    # float32 accumulator and the top-k's repair (at most as large again), per row
    room = engine.plan.rescore_rows_bytes // (8 * n_refs)
    inline = torch.zeros(0, dtype=torch.int64) if every_reference else \
        crowded.nonzero().flatten()[:room]
    with exact_float32_matmul(engine.device):
        rescored = engine.rescore(approx.indices, lengths, whole=inline, k=k)
        exact = rescored.values
        exact[approx.values == float("-inf")] = float("-inf")  # self (leave-one-out)
        best = merge_topk(empty_topk(exact.shape[0], k, engine.device),
                          Neighbors(approx.indices, exact), k)
        bound = engine.low_precision_bound(rescored, largest)
        proven_tail = every_reference | (best.values[:, -1].double() > low[:, -1] + bound)
        settled = torch.where(whole, proven_tail, bound <= guess)
        if len(inline):
            inline = inline.to(engine.device)
            settled[inline] = True
            best.indices[inline], best.values[inline] = rescored.whole.indices, \
                rescored.whole.values
        rows = (~settled).nonzero().flatten()
        logger.info("fast mode: %d pairs re-scored, %d queries computed whole in the same "
                    "pass; %d of %d queries recomputed exactly", int(lengths.sum()),
                    len(inline), len(rows), exact.shape[0])
        if len(rows):
            redo = engine.search(k, dtype=torch.float32, rows=rows, stage="fallback")
            best.indices[rows], best.values[rows] = redo.indices, redo.values
    return best


def _largest_magnitude(values: torch.Tensor) -> torch.Tensor:
    """Per row, the largest |value| among the finite ones (0 for none): every candidate's
    bfloat16 value lies within it, and every other reference's below the row's last."""
    return values.abs().nan_to_num(posinf=0.0).amax(dim=1) if values.shape[1] else \
        torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)


def _compute_kernel(
    queries,
    references,
    *,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
    memory_budget: int | None = None,
    device: torch.device | str = "cpu",
    chunk_models: int | None = None,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """The full kernel, when it fits the memory budget.

    Parameters
    ----------
    queries : array or LogitSource of shape (n_models, n_queries, n_classes).
    references : array or LogitSource of shape (n_models, n_references, n_classes).

    Returns
    -------
    Tensor of shape (n_queries, n_references), float32.

    Raises
    ------
    BudgetError
        If the kernel does not fit in one tile of the budget: use `top_k_neighbors`.
    """
    queries = as_source(queries, "query logits")
    references = as_source(references, "reference logits")
    engine = _prepare_engine(queries, references, 1, log_softmax=log_softmax, classes=classes,
                             exclude_self=False, precision="exact", memory_budget=memory_budget,
                             device=device, chunk_models=chunk_models, tile_size=None,
                             progress=progress, k_keep=1)
    if engine.plan.n_tiles > 1:
        size = queries.n_examples * references.n_examples * 4
        raise BudgetError(
            f"the full kernel ({queries.n_examples} x {references.n_examples} float32, "
            f"{format_bytes(size)}) does not fit the memory budget of "
            f"{format_bytes(engine.plan.budget)}: raise it, or use top_k_neighbors"
        )
    with exact_float32_matmul(engine.device):
        return engine.accumulate_tile(slice(0, references.n_examples), rows=None,
                                      dtype=torch.float32, stage="kernel", tiles_done=0,
                                      total=engine.n_models, done_before=0)


def top_k_neighbors(
    train,
    test=None,
    k: int = 20,
    *,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
    precision: Precision = "auto",
    n_candidates: int | None = None,
    memory_budget: int | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
) -> Neighbors:
    """The k most similar training examples of every test example under the ensemble kernel.

    Parameters
    ----------
    train : array, Tensor or LogitSource of shape (n_models, n_train, n_classes)
        The references: the training split's logits of every run.
    test : array, Tensor or LogitSource of shape (n_models, n_test, n_classes), or None
        The queries, from the same runs in the same order. None: leave-one-out within
        `train` (each training example's neighbours among the others; n_test = n_train).
    k : int
        Neighbours per test example, 1 <= k <= n_train (n_train - 1 for leave-one-out).
    log_softmax : bool
        Normalise the logits with log-softmax first (the reference does).
    classes : sequence of int, optional
        Restrict the kernel to these classes (a per-class kernel); None: all.
    precision : {'auto', 'exact', 'fast'}, default 'auto'
        'exact': float32 products. 'fast': bfloat16 products find candidates, an exact
        float32 re-score and an error bound make the result equal to 'exact'. 'auto':
        whichever a short probe of this machine (cached) predicts faster; see
        `choose_precision`.
    n_candidates : int, optional
        Fast mode's candidates per test example; default max(2k, k + 128).
    memory_budget : int, optional
        Bytes of working memory; default a quarter of what is available.
    device : str or torch.device
        'cpu' or 'cuda'.
    progress : callable, optional
        Called with a `Progress` as the work advances.

    Returns
    -------
    Neighbors
        `indices` (int64, into train) and `values` (float32 kernel values), Tensors of
        shape (n_test, k), best first; equal values are ordered by smaller train index.

    Examples
    --------
    >>> found = top_k_neighbors(train_logits, test_logits, k=20)  # doctest: +SKIP
    >>> found.indices.shape  # doctest: +SKIP
    torch.Size([n_test, 20])
    """
    return _top_k_neighbors(test if test is not None else train,
                            train if test is not None else None, k,
                            exclude_self=test is None, log_softmax=log_softmax,
                            classes=classes, precision=precision, n_candidates=n_candidates,
                            memory_budget=memory_budget, device=device, progress=progress)


def compute_kernel(
    train,
    test,
    *,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
    memory_budget: int | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """The full test x train kernel, when it fits the memory budget.

    Parameters
    ----------
    train : array, Tensor or LogitSource of shape (n_models, n_train, n_classes)
    test : array, Tensor or LogitSource of shape (n_models, n_test, n_classes)
        From the same runs in the same order.
    log_softmax, classes, memory_budget, device, progress
        As for `top_k_neighbors`.

    Returns
    -------
    Tensor of shape (n_test, n_train), float32
        K[i, j] between test example i and training example j.

    Raises
    ------
    BudgetError
        If the kernel does not fit in one tile of the budget: use `top_k_neighbors`.
    """
    return _compute_kernel(test, train, log_softmax=log_softmax, classes=classes,
                           memory_budget=memory_budget, device=device, progress=progress)
