"""What every command shares: the app, options, error handling, progress, opening SRC.

A user error (an `EnsembleKernelError`, a bad option) prints one line on stderr and exits
with status 2; no traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import __version__
from ..engine import Progress
from ..errors import EnsembleKernelError, InputError
from ..formats import RunSet, check_labels, open_runs, read_labels
from ..sources import parse_runs, select_runs
from ..store import RunStore, is_store

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build a similarity kernel from the saved outputs of many training runs, and use it "
         "to predict (k-NN beats averaging the ensemble) and to explain.",
)
err = Console(stderr=True, highlight=False)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise InputError(f"--memory-budget takes a size such as 2GB, 512MiB or 1500000000 "
                         f"(bytes), got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InputError(f"--memory-budget must be positive, got {text!r}")
    return size


# ---- shared options -------------------------------------------------------------------

SrcArg = typer.Argument(..., help="A store made by ingest, or run files: a .pt or .npz file, "
                                  "or a directory searched recursively for .pt files "
                                  "(lexicographic order). Several are concatenated along the "
                                  "runs.", show_default=False)
LabelsOpt = typer.Option(None, "--labels", help="An .npz with arrays labels_train and "
                                                "labels_test, when the run files carry none.")
RunsOpt = typer.Option(None, "--runs", help="Which runs: N for the first N, A:B for a slice.")
NoLogSoftmaxOpt = typer.Option(False, "--no-log-softmax",
                               help="Standardise raw logits instead of log-softmax outputs.")
PrecisionOpt = typer.Option("exact", "--precision",
                            help="exact: float32 products. fast: bfloat16 products to find "
                                 "candidates, then an exact float32 re-score (same neighbours).")
BudgetOpt = typer.Option(None, "--memory-budget",
                         help="Working memory for the engine, e.g. 2GB or 512MiB "
                              "[default: a quarter of the available memory].")
DeviceOpt = typer.Option("cpu", "--device", help="cpu or cuda.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def _fail(message: str) -> None:
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn user errors into one line and exit 2; show warnings as one line each."""
    def show(message, category, filename, lineno, file=None, line=None):
        err.print(f"warning: {message}", markup=False, soft_wrap=True)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except EnsembleKernelError as e:
        _fail(str(e))
    except OSError as e:  # an output path that cannot be written, a full disk
        _fail(f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": "))
    finally:
        warnings.showwarning = previous


@contextlib.contextmanager
def _stage_bar(quiet: bool) -> Iterator:
    """`update(stage, done, total, info="")` driving one rich bar per stage on stderr.

    Yields None (no bar) when quiet or when stderr is not a terminal, unless
    ENSEMBLE_KERNEL_PROGRESS=1.
    """
    if quiet or not err.is_terminal and os.environ.get("ENSEMBLE_KERNEL_PROGRESS") != "1":
        yield None
        return
    bar = Bar(TextColumn("{task.description:<11}"), BarColumn(), TextColumn("{task.fields[info]}"),
              TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def update(stage: str, done: float, total: float, info: str = "") -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, info="")
        bar.update(tasks[stage], completed=done, total=total, info=info)

    with bar:
        yield update


@contextlib.contextmanager
def _progress_bar(quiet: bool) -> Iterator:
    """A progress callback for the engine (or None), drawn by `_stage_bar`."""
    with _stage_bar(quiet) as update:
        if update is None:
            yield None
            return

        def report(p: Progress) -> None:
            tiles = (f", tile {p.tiles_done}/{p.n_tiles}"
                     if p.stage in ("kernel", "fallback") else "")
            update(p.stage, p.done, p.total, f"{p.done}/{p.total} runs{tiles}")

        yield report


def _open(src: List[Path], labels: Optional[Path], runs: Optional[str]) -> tuple[RunSet, slice]:
    if len(src) == 1 and is_store(src[0]):
        store = RunStore(src[0])
        labels_train, labels_test = (read_labels(labels) if labels is not None
                                     else (store.labels("train"), store.labels("test")))
        check_labels(labels_train, store.source("train").n_examples, store.n_classes, "train")
        check_labels(labels_test, store.source("test").n_examples, store.n_classes, "test")
        runset = RunSet(store.source("train"), store.source("test"), labels_train, labels_test,
                        (str(src[0]),))
    else:
        runset = open_runs(src, labels=labels)
    chosen = parse_runs(runs, runset.n_models)
    if chosen.stop - chosen.start < 2:
        raise InputError(f"the kernel needs at least 2 runs, got {chosen.stop - chosen.start} "
                         f"(from {', '.join(map(str, src))})")
    return RunSet(select_runs(runset.train, chosen), select_runs(runset.test, chosen),
                  runset.labels_train, runset.labels_test, runset.sources), chosen


def _check_precision(precision: str) -> None:
    if precision not in ("exact", "fast"):
        raise InputError(f"--precision takes exact or fast, got {precision!r}")


def _meta(options: dict, runset: RunSet, runs: slice, started: float) -> dict:
    return {
        "ensemble_kernel_version": __version__,
        "torch_version": torch.__version__,
        "options": options,
        "n_models": runset.n_models,
        "runs": [runs.start, runs.stop],
        "sources": list(runset.sources),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }


def format_card(result) -> str:
    """The model card's four lines, in percent, for an `Evaluation`."""
    lines = [
        ("average single-model accuracy", result.single_model_accuracy),
        (f"ensemble accuracy ({result.n_models} models)", result.ensemble_accuracy),
        (f"kernel accuracy (k-NN w/ k={result.k})", result.knn_accuracy),
        (f"weighted k-NN accuracy (k={result.weighted_k}, K**{result.power})",
         result.weighted_accuracy),
    ]
    width = max(len(name) for name, _ in lines) + 1
    return "\n".join(f"{name:<{width}}: {100 * value:.2f}" for name, value in lines)
