"""Where logits come from: a small read-only view the engine streams through.

A `LogitSource` is one split's logits, logically of shape (n_models, n_examples,
n_classes), that can hand out blocks of models and examples. Arrays in memory,
memory-mapped run files and (later) stores all present this one interface, so the
engine never knows where its data lives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "LogitSource", "ArraySource", "ConcatSource", "RunSubset",
    "as_source", "parse_runs", "select_runs", "check_pair", "sequence_of",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@runtime_checkable
class LogitSource(Protocol):
    """One split's logits, logically a (n_models, n_examples, n_classes) array."""

    n_models: int
    n_examples: int
    n_classes: int

    def read(self, models: slice, examples: slice) -> torch.Tensor:
        """Tensor of shape (models, examples, n_classes) on the CPU, in the stored dtype."""
        ...

    def describe_run(self, model: int) -> str:
        """Where run `model` came from, for error messages: 'run 3 (file a.pt, run 0 in file)'."""
        ...


def _to_tensor(array: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.is_nested or tensor.layout != torch.strided or tensor.device.type == "meta":
            what = ("a nested" if tensor.is_nested else "a meta" if tensor.device.type == "meta"
                    else f"a {str(tensor.layout).replace('torch.', '')}")
            raise InputError(f"{name} must be a dense tensor of logits, got {what} tensor")
    elif isinstance(array, np.ndarray):
        if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
            raise InputError(f"{name} must hold floating-point logits (float16, float32 or "
                             f"float64), got dtype {array.dtype}")
        if not array.dtype.isnative:  # (big-endian data on a little-endian machine)
            array = array.astype(array.dtype.newbyteorder("="))
        tensor = torch.from_numpy(array)
    else:
        raise InputError(
            f"{name} must be a NumPy array or a torch tensor, got {type(array).__name__}"
        )
    if tensor.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"{name} must hold float16, bfloat16, float32 or float64 logits, got {tensor.dtype}"
        )
    return tensor


@dataclass(frozen=True, eq=False)
class ArraySource:
    """Logits held in one array (in memory or memory-mapped).

    Parameters
    ----------
    logits : Tensor of shape (n_models, n_examples, n_classes), or (n_examples, n_classes)
        for a single run.
    origin : str
        What to call it in error messages (a file name, 'test logits').
    """

    logits: torch.Tensor
    origin: str = "array"

    @classmethod
    def from_array(cls, array: np.ndarray | torch.Tensor, origin: str = "array") -> "ArraySource":
        tensor = _to_tensor(array, origin)
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3:
            raise InputError(
                f"{origin}: logits must have shape (n_models, n_examples, n_classes) or "
                f"(n_examples, n_classes), got {tuple(tensor.shape)}"
            )
        return cls(tensor, origin)

    @property
    def n_models(self) -> int:
        return self.logits.shape[0]

    @property
    def n_examples(self) -> int:
        return self.logits.shape[1]

    @property
    def n_classes(self) -> int:
        return self.logits.shape[2]

    def read(self, models: slice, examples: slice) -> torch.Tensor:
        return self.logits[models, examples]

    def describe_run(self, model: int) -> str:
        if self.n_models == 1:
            return f"run 0 ({self.origin})"
        return f"run {model} ({self.origin}, run {model} in it)"


@dataclass(frozen=True, eq=False)
class ConcatSource:
    """Several sources of the same examples joined along the model axis, in order.

    `parts` have shapes (n_models_i, n_examples, n_classes); the whole has shape
    (sum of n_models_i, n_examples, n_classes).
    """

    parts: tuple[LogitSource, ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise InputError("no runs: at least one source of logits is needed")
        first = self.parts[0]
        for part in self.parts[1:]:
            if (part.n_examples, part.n_classes) != (first.n_examples, first.n_classes):
                raise InputError(
                    f"{part.describe_run(0)} has {part.n_examples} examples x "
                    f"{part.n_classes} classes, but {first.describe_run(0)} has "
                    f"{first.n_examples} x {first.n_classes}: all runs must share one shape"
                )

    @property
    def n_models(self) -> int:
        return sum(p.n_models for p in self.parts)

    @property
    def n_examples(self) -> int:
        return self.parts[0].n_examples

    @property
    def n_classes(self) -> int:
        return self.parts[0].n_classes

    def _locate(self, model: int) -> tuple[int, int]:
        for i, part in enumerate(self.parts):
            if model < part.n_models:
                return i, model
            model -= part.n_models
        raise IndexError(model)

    def read(self, models: slice, examples: slice) -> torch.Tensor:
        start, stop, _ = models.indices(self.n_models)
        blocks, offset = [], 0
        for part in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.n_models)
            if lo < hi:
                blocks.append(part.read(slice(lo, hi), examples))
            offset += part.n_models
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:  # no runs asked for: an empty block of the right shape and dtype
            return self.parts[0].read(slice(0, 0), examples)
        dtype = functools.reduce(torch.promote_types, (b.dtype for b in blocks))
        return torch.cat([b.to(dtype) for b in blocks])

    def describe_run(self, model: int) -> str:
        i, local = self._locate(model)
        inner = self.parts[i].describe_run(local)
        return f"run {model}: {inner}"


@dataclass(frozen=True, eq=False)
class RunSubset:
    """A contiguous range of another source's runs (what `--runs A:B` selects)."""

    base: LogitSource
    start: int
    stop: int

    @property
    def n_models(self) -> int:
        return self.stop - self.start

    @property
    def n_examples(self) -> int:
        return self.base.n_examples

    @property
    def n_classes(self) -> int:
        return self.base.n_classes

    def read(self, models: slice, examples: slice) -> torch.Tensor:
        lo, hi, _ = models.indices(self.n_models)
        return self.base.read(slice(self.start + lo, self.start + hi), examples)

    def describe_run(self, model: int) -> str:
        return self.base.describe_run(self.start + model)


@dataclass(frozen=True, eq=False)
class ExampleSample(ArraySource):
    """Some examples of another source, held in memory (`read_sample` reads them once).

    Runs are described as `base` describes them; an example index in a message is its
    position in the sample (`sample_positions` maps it back).
    """

    base: LogitSource | None = None

    def describe_run(self, model: int) -> str:
        return super().describe_run(model) if self.base is None else self.base.describe_run(model)


def sample_positions(n_examples: int, size: int) -> torch.Tensor:
    """`size` examples spread evenly over `n_examples`: (i * n_examples) // size for i < size,
    int64, increasing. A split sorted by class keeps every class in proportion."""
    if not 1 <= size <= n_examples:
        raise InputError(f"a sample of {size} examples from {n_examples} is not possible")
    return torch.arange(size, dtype=torch.int64) * n_examples // size


def item_size(source: LogitSource) -> int:
    """Bytes per logit as `source` reads them (2 for float16 stores)."""
    return source.read(slice(0, 1), slice(0, 1)).element_size()


def sample_bytes(source: LogitSource, size: int) -> int:
    """What `read_sample` holds for `size` examples of `source`."""
    return source.n_models * size * source.n_classes * item_size(source)


def read_sample(source: LogitSource, positions: torch.Tensor, max_read_bytes: int) -> ExampleSample:
    """The examples `positions` of every run of `source`, read once into memory.

    The source is read whole, a block of runs at a time (a store reads best in whole
    chunks), each block's read within `max_read_bytes` (one run at least). Every value
    read is checked as the engine checks its inputs, so a NaN, an Inf or a float64 logit
    beyond float32 is an error naming its run and its example in `source`, whether or
    not the sample keeps that example.
    """
    from ._kernel import check_finite, check_fits_float32

    first = source.read(slice(0, 1), slice(0, 1))
    run_bytes = source.n_examples * source.n_classes * first.element_size()
    step = max(1, int(max_read_bytes) // max(run_bytes, 1))
    out = torch.empty(source.n_models, len(positions), source.n_classes, dtype=first.dtype)
    for m0 in range(0, source.n_models, step):
        models = slice(m0, min(m0 + step, source.n_models))
        block = source.read(models, slice(0, source.n_examples))
        where = dict(first_model=m0, first_example=0, describe=source.describe_run)
        check_finite(block, **where)
        if block.dtype == torch.float64:
            check_fits_float32(block, **where)
        out[models] = block[:, positions]
    return ExampleSample(out, "a sample of examples", source)


def as_source(logits: "np.ndarray | torch.Tensor | LogitSource", name: str = "logits") -> LogitSource:
    """Wrap an array as a source; pass a source through unchanged."""
    if isinstance(logits, (np.ndarray, torch.Tensor)):
        return ArraySource.from_array(logits, name)
    if isinstance(logits, LogitSource):
        return logits
    raise InputError(f"{name} must be a NumPy array, a torch tensor or a LogitSource, "
                     f"got {type(logits).__name__}")


def parse_runs(spec: str | None, n_models: int) -> slice:
    """Turn `--runs` into a slice of runs: 'N' (the first N) or 'A:B' (runs A to B-1,
    counted from 0; a missing A is 0, a missing B the last run). None means every run;
    an empty text and negative numbers are refused.

    >>> parse_runs("2:5", 10)
    slice(2, 5, None)
    """
    if spec is None:
        return slice(0, n_models)
    usage = (f"use N with 2 <= N <= {n_models}, or A:B with 0 <= A < B <= {n_models} "
             "(runs A to B-1)")
    text = spec.strip()
    if not text:
        raise InputError(f"--runs is empty: {usage}; leave --runs out for every run")
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else n_models
        else:
            start, stop = 0, int(text)
    except ValueError as e:
        raise InputError(f"--runs takes N (the first N runs) or A:B (a slice), got {spec!r}") from e
    if start < 0 or stop < 0:
        raise InputError(f"--runs {spec}: run numbers count from 0 and cannot be negative; "
                         f"{usage}")
    if not 0 <= start < stop <= n_models:
        raise InputError(f"--runs {spec} selects no valid range of the {n_models} runs "
                         f"available; {usage}")
    return slice(start, stop)


def select_runs(source: LogitSource, runs: slice) -> LogitSource:
    """The runs `runs` of `source` (a contiguous slice)."""
    start, stop, step = runs.indices(source.n_models)
    if step != 1:
        raise InputError("runs must be a contiguous range")
    if (start, stop) == (0, source.n_models):
        return source
    return RunSubset(source, start, stop)


def check_pair(queries: LogitSource, references: LogitSource) -> None:
    """Raise InputError unless the two splits come from the same runs and classes."""
    if queries.n_models != references.n_models:
        raise InputError(
            f"the query split has {queries.n_models} runs but the reference split has "
            f"{references.n_models}: both must hold the same runs, in the same order"
        )
    if queries.n_classes != references.n_classes:
        raise InputError(
            f"the query split has {queries.n_classes} classes but the reference split has "
            f"{references.n_classes}: both must come from the same models"
        )
    if queries.n_models < 2:
        raise InputError(
            f"the kernel needs at least 2 runs (it standardises across runs), got "
            f"{queries.n_models}"
        )
    if queries.n_classes < 2:
        raise InputError(f"the kernel needs at least 2 classes, got {queries.n_classes}")


def sequence_of(sources: Sequence[LogitSource]) -> LogitSource:
    """One source from several along the model axis (a single one is returned as is)."""
    return sources[0] if len(sources) == 1 else ConcatSource(tuple(sources))
