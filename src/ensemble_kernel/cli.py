"""The `ensemble-kernel` command: argument parsing and printing; no maths here.

A user error (an `EnsembleKernelError`, a bad option) prints one line on stderr and exits
with status 2; no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .atomic import atomic_write, atomic_write_text
from .checkpoint import TileCheckpoint
from .engine import (Progress, candidates_per_query, default_memory_budget, plan_memory,
                     top_k_neighbors)
from .errors import EnsembleKernelError, InputError
from .evaluate import evaluate, select_by_leave_one_out
from .formats import (RunSet, check_labels, find_run_files, open_runs, read_labels,
                      read_run_file)
from .store import RunStore, is_store
from .neighbors import knn_scores, predict_from_scores, weighted_scores
from .sources import parse_runs, select_runs

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
def _progress_bar(quiet: bool) -> Iterator:
    """A callback for the engine that drives a rich progress bar on stderr."""
    if quiet or not err.is_terminal and os.environ.get("ENSEMBLE_KERNEL_PROGRESS") != "1":
        yield None
        return
    bar = Bar(TextColumn("{task.description:<11}"), BarColumn(), TextColumn("{task.fields[info]}"),
              TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def report(p: Progress) -> None:
        if p.stage not in tasks:
            tasks[p.stage] = bar.add_task(p.stage, total=p.total, info="")
        info = f"{p.done}/{p.total} runs" + (f", tile {p.tiles_done}/{p.n_tiles}"
                                            if p.stage in ("kernel", "fallback") else "")
        bar.update(tasks[p.stage], completed=p.done, total=p.total, info=info)

    with bar:
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


# ---- commands ------------------------------------------------------------------------

@app.command("evaluate")
def evaluate_cmd(
    src: List[Path] = SrcArg,
    labels: Optional[Path] = LabelsOpt,
    k: int = typer.Option(3, "--k", help="Neighbours in the majority vote (the card: 3)."),
    weighted_k: int = typer.Option(20, "--weighted-k", help="Neighbours in the weighted vote."),
    power: int = typer.Option(4, "--power", help="Weight of a neighbour: K ** power."),
    runs: Optional[str] = RunsOpt,
    no_log_softmax: bool = NoLogSoftmaxOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    select: bool = typer.Option(False, "--select", help="Choose the vote, k and power by "
                                "leave-one-out on the training set (no test labels used)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
    quiet: bool = QuietOpt,
) -> None:
    """The model card's table: single models, their average, kernel k-NN, weighted vote.

    Example: ensemble-kernel evaluate runs/ --labels labels.npz --runs 500
    """
    started = time.perf_counter()
    with _user_errors():
        _check_precision(precision)
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, labels, runs)
        common = dict(log_softmax=not no_log_softmax, precision=precision,
                      memory_budget=budget, device=device)
        selection = None
        with _progress_bar(quiet or as_json) as report:
            if select:
                if runset.labels_train is None:
                    raise InputError("--select needs train labels: pass --labels FILE.npz")
                selection = select_by_leave_one_out(runset.train, runset.labels_train,
                                                    progress=report, **common)
                if selection.vote == "knn":
                    k = selection.k
                else:
                    weighted_k, power = selection.k, selection.power
            result = evaluate(runset.train, runset.test, runset.labels_train, runset.labels_test,
                              k=k, weighted_k=weighted_k, power=power, progress=report, **common)
    options = {"k": k, "weighted_k": weighted_k, "power": power, "log_softmax": not no_log_softmax,
               "precision": precision, "memory_budget": budget, "device": device,
               "runs": [chosen.start, chosen.stop], "select": select,
               "labels": str(labels) if labels else None}
    if as_json:
        out = {"n_models": result.n_models, "k": result.k,
               "single_model_accuracy": result.single_model_accuracy,
               "ensemble_accuracy": result.ensemble_accuracy,
               "knn_accuracy": result.knn_accuracy,
               "weighted_accuracy": result.weighted_accuracy,
               "weighted_k": result.weighted_k, "power": result.power,
               "options": options, "version": __version__,
               "elapsed_s": round(time.perf_counter() - started, 3)}
        if selection is not None:
            out["selection"] = {"vote": selection.vote, "k": selection.k, "power": selection.power,
                                "leave_one_out_accuracy": selection.accuracy,
                                "table": [dict(zip(("vote", "k", "power", "accuracy"), row))
                                          for row in selection.table]}
        typer.echo(json.dumps(out, indent=2))
        return
    if selection is not None:
        what = (f"k-NN w/ k={selection.k}" if selection.vote == "knn"
                else f"weighted, k={selection.k}, power {selection.power}")
        typer.echo(f"leave-one-out on train chose {what} (accuracy {100 * selection.accuracy:.2f})")
    lines = [
        ("average single-model accuracy", result.single_model_accuracy),
        (f"ensemble accuracy ({result.n_models} models)", result.ensemble_accuracy),
        (f"kernel accuracy (k-NN w/ k={result.k})", result.knn_accuracy),
        (f"weighted k-NN accuracy (k={result.weighted_k}, K**{result.power})",
         result.weighted_accuracy),
    ]
    width = max(len(name) for name, _ in lines) + 1
    for name, value in lines:
        typer.echo(f"{name:<{width}}: {100 * value:.2f}")


@app.command("neighbors")
def neighbors_cmd(
    src: List[Path] = SrcArg,
    out: Path = typer.Option(..., "--out", help="Where to write the .npz (indices, values, meta)."),
    k: int = typer.Option(20, "--k", help="Neighbours per test example."),
    labels: Optional[Path] = LabelsOpt,
    runs: Optional[str] = RunsOpt,
    no_log_softmax: bool = NoLogSoftmaxOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Save finished tiles in "
                                "OUT.partial/ and reuse them after a kill."),
    quiet: bool = QuietOpt,
) -> None:
    """Top-k training neighbours of every test example, best first, into an .npz.

    Finished tiles are saved in OUT.partial/ as they complete: after a kill, the same
    command resumes where it stopped and writes the same result.

    The file holds `indices` (int64, n_test x k), `values` (float32 kernel values) and
    `meta` (a JSON string: options, runs, version).
    """
    started = time.perf_counter()
    with _user_errors():
        _check_precision(precision)
        if out.suffix.lower() != ".npz":
            raise InputError(f"--out must name an .npz file, got {out}")
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, labels, runs)
        options = {"k": k, "log_softmax": not no_log_softmax, "precision": precision,
                   "memory_budget": budget, "device": device}
        group = _distributed_group(device)
        try:
            result = _neighbors_job(runset, chosen, options, out, resume, quiet, group)
            if group is None or group.is_main:
                meta = json.dumps(_meta({**options, "processes": group.world_size if group
                                         else 1}, runset, chosen, started))
                atomic_write(out, lambda f: np.savez(f, indices=result.indices.cpu().numpy(),
                                                     values=result.values.cpu().numpy(),
                                                     meta=np.array(meta)))
                TileCheckpoint(out, {}).remove()
            if group is not None:
                group.barrier()  # the others wait until the file is written
        finally:
            if group is not None:
                group.close()
    if group is not None and not group.is_main:
        return
    if not quiet:
        err.print(f"wrote {out} ({result.indices.shape[0]} test examples x {k} neighbours)")


@app.command("predict")
def predict_cmd(
    src: List[Path] = SrcArg,
    out: Path = typer.Option(..., "--out", help="Where to write: .csv or .npz, by suffix."),
    k: int = typer.Option(3, "--k", help="Neighbours in the majority vote."),
    weighted: bool = typer.Option(False, "--weighted", help="Weighted vote instead: each "
                                  "neighbour counts K ** power."),
    weighted_k: int = typer.Option(20, "--weighted-k", help="Neighbours in the weighted vote."),
    power: int = typer.Option(4, "--power", help="Weight of a neighbour: K ** power."),
    labels: Optional[Path] = LabelsOpt,
    runs: Optional[str] = RunsOpt,
    no_log_softmax: bool = NoLogSoftmaxOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Labels for the test examples from their training neighbours (train labels needed).

    Writes per example the prediction, the per-class scores (vote fractions, or summed
    weights / k) and the margin between the best two scores.
    """
    started = time.perf_counter()
    with _user_errors():
        _check_precision(precision)
        if out.suffix.lower() not in (".csv", ".npz"):
            raise InputError(f"--out must end in .csv or .npz, got {out}")
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, labels, runs)
        if runset.labels_train is None:
            raise InputError("predict needs train labels: the run files carry none; pass "
                             "--labels FILE.npz with labels_train (labels_test may be empty)")
        n_classes = runset.n_classes
        k_used = weighted_k if weighted else k
        with _progress_bar(quiet) as report:
            found = top_k_neighbors(runset.test, runset.train, k_used,
                                    log_softmax=not no_log_softmax, precision=precision,
                                    memory_budget=budget, device=device, progress=report)
        scores = (weighted_scores(found, runset.labels_train, n_classes, power) if weighted
                  else knn_scores(found, runset.labels_train, n_classes))
        prediction, margin = predict_from_scores(scores)
        options = {"vote": "weighted" if weighted else "knn", "k": k_used,
                   "power": power if weighted else None, "log_softmax": not no_log_softmax,
                   "precision": precision, "memory_budget": budget, "device": device}
        meta = json.dumps(_meta(options, runset, chosen, started))
        atomic_write(out, lambda f: _write_predictions(f, out.suffix.lower(), prediction,
                                                       scores, margin, meta))
    if not quiet:
        err.print(f"wrote {out} ({len(prediction)} predictions)")


@app.command("ingest")
def ingest_cmd(
    src: List[Path] = typer.Argument(..., help="Run files (.pt, .npz) or directories of .pt "
                                     "files; each file is one commit.", show_default=False),
    store: Path = typer.Option(..., "--store", help="The store directory (created if absent)."),
    labels: Optional[Path] = LabelsOpt,
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="An .npz with inputs_train and "
                                          "inputs_test ((n, L) signals or (n, H, W[, C]) images)."),
    features: Optional[Path] = typer.Option(None, "--features", help="An .npz with "
                                            "features_train and features_test, (n, D)."),
    class_names: Optional[str] = typer.Option(None, "--class-names",
                                              help="Comma-separated names, one per class."),
    dtype: str = typer.Option("float16", "--dtype", help="How logits are kept: float16 or "
                              "float32 (bfloat16 sources are widened to float32 first)."),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates",
                                          help="Add files whose content is already stored."),
    quiet: bool = QuietOpt,
) -> None:
    """Create a store or append runs to it, one source file per atomic commit.

    A killed ingest leaves exactly the files committed before it; running the same
    command again skips those (by content hash) and adds the rest.
    """
    with _user_errors():
        files = [f for s in src for f in find_run_files(s)]
        if is_store(store):
            target = RunStore(store)
        else:
            first = read_run_file(files[0])
            names = class_names.split(",") if class_names else None
            target = RunStore.create(store, n_train=first.train.shape[1],
                                     n_test=first.test.shape[1], n_classes=first.train.shape[2],
                                     dtype=dtype, class_names=names)
        if labels is not None:
            labels_train, labels_test = read_labels(labels)
            target.set_labels("train", labels_train)
            target.set_labels("test", labels_test)
        for name, path in (("inputs", inputs), ("features", features)):
            if path is not None:
                _store_extra(target, name, path)
        added = skipped = 0
        with _progress_bar(quiet) as report:
            for i, f in enumerate(files):
                result = target.append_file(f, allow_duplicates=allow_duplicates)
                if result.status == "skipped":
                    skipped += 1
                    err.print(f"skipped {f}: its content is already in the store "
                              "(--allow-duplicates adds it anyway)", markup=False, soft_wrap=True)
                else:
                    added += result.runs[1] - result.runs[0]
                if report is not None:
                    report(Progress("ingest", i + 1, len(files), 0, 1, 0.0))
    if not quiet:
        err.print(f"{store}: {target.n_models} runs ({added} added, {skipped} files skipped)")


def _store_extra(target: RunStore, name: str, path: Path) -> None:
    from .formats import _load_npz

    arrays = _load_npz(path)
    for split in ("train", "test"):
        key = f"{name}_{split}"
        if key not in arrays:
            raise InputError(f"{path}: missing {key}; keys found: {sorted(arrays)}")
        start, stop = target.split_range(split)
        if arrays[key].shape[0] != stop - start:
            raise InputError(f"{path}: {key} has {arrays[key].shape[0]} rows but the {split} "
                             f"split has {stop - start} examples")
        dims = ("example", "feature") if name == "features" else (
            ("example", "position") if arrays[key].ndim == 2 else
            ("example", "height", "width") if arrays[key].ndim == 3 else
            ("example", "height", "width", "channel"))
        target.set_array(key, arrays[key], dims)


@app.command("info")
def info_cmd(
    store: Path = typer.Argument(..., help="A store made by ingest.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    runs: bool = typer.Option(False, "--runs", help="List the run records too."),
) -> None:
    """What a store holds: runs, splits, shapes, dtype, size, labels, inputs, features."""
    with _user_errors():
        target = RunStore(store)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        splits = {s: target.source(s).n_examples for s in ("train", "test")}
        present = {name: target.optional(f"{name}_train") is not None
                   for name in ("labels", "inputs", "features")}
        records = target.records()
        out = {"path": str(store), "format_version": target.attrs["format_version"],
               "n_models": target.n_models, "n_classes": target.n_classes,
               "class_names": target.class_names, "splits": splits,
               "dtype": target.dtype,
               "size_bytes": size, **{f"has_{k}": v for k, v in present.items()},
               "n_sources": len(records)}
        if runs:
            out["records"] = records
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{store}: {out['n_models']} runs from {out['n_sources']} files, "
               f"{out['n_classes']} classes, logits {out['dtype']}, {size / 2**20:.1f} MiB")
    typer.echo(f"  train {splits['train']} examples, test {splits['test']} examples; "
               + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in present.items()))
    for r in out.get("records", []):
        seeds = r.get("seeds")
        seed_text = ("-" if not seeds else str(seeds[0]) if len(seeds) == 1
                     else f"{seeds[0]}..{seeds[-1]}")
        typer.echo(f"  runs {r['runs'][0]}..{r['runs'][1] - 1}: {r['source']} "
                   f"sha256 {r['sha256'][:12]} seeds {seed_text}")


@app.command("sweep")
def sweep_cmd(
    src: List[Path] = SrcArg,
    labels: Optional[Path] = LabelsOpt,
    runs_list: Optional[str] = typer.Option(None, "--runs", help="Run counts, e.g. 1,2,4,8 "
                                            "[default: powers of 2 up to all runs]."),
    out: Path = typer.Option(Path("sweep-output"), "--out", help="Folder for sweep.png, "
                             "sweep.csv and sweep.json."),
    max_subsets: int = typer.Option(8, "--max-subsets", help="Disjoint subsets per run count."),
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the sweep as JSON."),
    quiet: bool = QuietOpt,
) -> None:
    """Accuracy against the number of runs (disjoint subsets), with ablations and a paired test.

    Single model, ensemble average, kernel k-NN (k = 1, 3, 5, 9) and the weighted vote;
    at the largest count: no log-softmax, each per-class kernel alone, McNemar's exact test
    and a bootstrap interval of kernel 3-NN minus the ensemble average.
    """
    from .report.files import sweep_json, write_sweep
    from .sweep import sweep

    with _user_errors():
        _check_precision(precision)
        budget = parse_size(memory_budget) if memory_budget else None
        runset, _ = _open(src, labels, None)
        if runset.labels_train is None or runset.labels_test is None:
            raise InputError("sweep needs train and test labels: pass --labels FILE.npz")
        try:
            counts = [int(c) for c in runs_list.split(",")] if runs_list else None
        except ValueError as e:
            raise InputError(f"--runs takes run counts such as 1,2,4,8, got {runs_list!r}") from e
        result = sweep(runset.train, runset.test, runset.labels_train, runset.labels_test,
                       runs=counts, max_subsets=max_subsets, precision=precision,
                       memory_budget=budget, device=device)
        paths = write_sweep(result, out)
    if as_json:
        typer.echo(json.dumps(sweep_json(result), indent=2))
        return
    typer.echo(format_sweep(result))
    if not quiet:
        err.print("wrote " + ", ".join(map(str, paths)))


def format_sweep(result) -> str:
    """A short text table: accuracy (%) per run count, one column per metric."""
    metrics = list(dict.fromkeys(r.metric for r in result.rows))
    counts = sorted({r.n_models for r in result.rows})
    cell = {(r.n_models, r.metric): r for r in result.rows}
    lines = ["runs  " + "".join(f"{m:>10}" for m in metrics)]
    for n in counts:
        lines.append(f"{n:>4}  " + "".join(
            f"{100 * cell[n, m].mean:>10.2f}" if (n, m) in cell else f"{'-':>10}"
            for m in metrics))
    sig = result.significance
    if sig is not None:
        lines.append(f"kernel {sig.k}-NN vs ensemble average at {sig.n_models} runs: "
                     f"{100 * sig.difference:+.2f} points (95% bootstrap CI "
                     f"{100 * sig.ci_low:+.2f} to {100 * sig.ci_high:+.2f}), McNemar exact "
                     f"p = {sig.mcnemar_p:.2g} ({sig.only_knn_correct} vs "
                     f"{sig.only_ensemble_correct} discordant)")
    if result.ablations:
        lines.append("ablations (kernel 3-NN): " + ", ".join(
            f"{name} {100 * v:.2f}" for name, v in result.ablations.items()))
    return "\n".join(lines)


@app.command("demo")
def demo_cmd(
    dataset: str = typer.Option("mnist1d", "--dataset", help="mnist1d (generated locally) or "
                                "digits (scikit-learn's 8x8 images)."),
    models: int = typer.Option(192, "--models", help="Networks in the ensemble."),
    out: Path = typer.Option(Path("demo-output"), "--out", help="Output folder."),
    seed: int = typer.Option(0, "--seed", help="Seeds every network's initialisation and "
                             "data order."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead."),
    quiet: bool = QuietOpt,
) -> None:
    """Train an ensemble of small 1-D CNNs on the CPU and show the kernel beating the average.

    Writes OUT/store (a store every command accepts as SRC), summary.json, sweep.png,
    sweep.csv, sweep.json and record.json. Needs no download.
    """
    from .demo import DemoOptions, run_demo

    started = time.perf_counter()
    with _user_errors():
        options = DemoOptions(dataset=dataset, models=models, seed=seed, out=out)
        with _demo_progress(quiet or as_json) as report:
            result = run_demo(options, report)
    if as_json:
        typer.echo((result.paths["summary"]).read_text())
        return
    e = result.evaluation
    typer.echo(f"{dataset}: {e.n_models} runs trained in {result.timings['training_s']:.0f} s, "
               f"{time.perf_counter() - started:.0f} s in all")
    lines = [("average single-model accuracy", e.single_model_accuracy),
             (f"ensemble accuracy ({e.n_models} models)", e.ensemble_accuracy),
             (f"kernel accuracy (k-NN w/ k={e.k})", e.knn_accuracy),
             (f"weighted k-NN accuracy (k={e.weighted_k}, K**{e.power})", e.weighted_accuracy)]
    width = max(len(n) for n, _ in lines) + 1
    for name, value in lines:
        typer.echo(f"{name:<{width}}: {100 * value:.2f}")
    typer.echo("")
    typer.echo(format_sweep(result.sweep))
    typer.echo("")
    for name, path in result.paths.items():
        typer.echo(f"{name:<11} {path}")


@contextlib.contextmanager
def _demo_progress(quiet: bool) -> Iterator:
    if quiet or not err.is_terminal and os.environ.get("ENSEMBLE_KERNEL_PROGRESS") != "1":
        yield None
        return
    bar = Bar(TextColumn("{task.description:<11}"), BarColumn(), TimeElapsedColumn(),
              TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def report(stage: str, done: float, total: float) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield report


# ---- the views ------------------------------------------------------------------------

InputsOpt = typer.Option(None, "--inputs", help="An .npz with inputs_train and inputs_test, "
                         "when SRC is run files (a store carries its own).")
FeaturesOpt = typer.Option(None, "--features", help="An .npz with features_train and "
                           "features_test (n, D), when SRC is run files.")
ViewsOutOpt = typer.Option(Path("views"), "--out", help="Folder for the PNG and CSV files.")


def _extras(src: List[Path], inputs: Optional[Path], features: Optional[Path]) -> dict:
    """Inputs, features and class names: from the store, or from --inputs/--features."""
    from .formats import _load_npz

    out = {"inputs_train": None, "inputs_test": None, "features_train": None,
           "features_test": None, "class_names": None}
    if len(src) == 1 and is_store(src[0]):
        store = RunStore(src[0])
        out.update({k: store.optional(k) for k in list(out)[:4]}, class_names=store.class_names)
    for name, path in (("inputs", inputs), ("features", features)):
        if path is not None:
            arrays = _load_npz(path)
            for split in ("train", "test"):
                if f"{name}_{split}" not in arrays:
                    raise InputError(f"{path}: missing {name}_{split}; keys found: "
                                     f"{sorted(arrays)}")
                out[f"{name}_{split}"] = arrays[f"{name}_{split}"]
    return out


def _view_inputs(runset: RunSet, extras: dict, draws: bool = True):
    from .report.grids import InputRenderer

    for split, n in (("train", runset.train.n_examples), ("test", runset.test.n_examples)):
        for kind in ("inputs", "features"):
            arr = extras[f"{kind}_{split}"]
            if arr is not None and arr.shape[0] != n:
                raise InputError(f"{kind}_{split} has {arr.shape[0]} rows but the {split} split "
                                 f"has {n} examples")
    renderer = InputRenderer(extras["inputs_train"], extras["inputs_test"])
    if draws and not renderer.has_inputs:
        err.print("note: no inputs for this source: tables only (a store keeps them with "
                  "ingest --inputs; for run files pass --inputs FILE.npz)", markup=False,
                  soft_wrap=True)
    return renderer


def _views(src, labels, inputs, features, memory_budget, precision, device, quiet, k=20,
           draws=True):
    """Open SRC, compute test -> train neighbours once, gather what the views draw."""
    _check_precision(precision)
    budget = parse_size(memory_budget) if memory_budget else None
    runset, _ = _open(src, labels, None)
    extras = _extras(src, inputs, features)
    renderer = _view_inputs(runset, extras, draws)
    with _progress_bar(quiet) as report:
        found = top_k_neighbors(runset.test, runset.train, min(k, runset.train.n_examples),
                                precision=precision, memory_budget=budget, device=device,
                                progress=report)
    return runset, extras, renderer, found


@app.command("pairs")
def pairs_cmd(
    src: List[Path] = SrcArg, ranks: str = typer.Option("0:48", "--ranks", help="Which ranks: "
    "0-based, half-open, like a Python slice (the card's 601st to 648th is 600:648)."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    out: Path = ViewsOutOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
) -> None:
    """Test examples ranked by the kernel value of their best training match: grid and CSV."""
    from .explain import parse_ranks, similar_pairs
    from .report.grids import render_pairs
    from .report.html import Table, png_bytes

    with _user_errors():
        runset, extras, renderer, found = _views(src, labels, inputs, None, memory_budget,
                                                 precision, device, quiet, k=1)
        chosen = parse_ranks(ranks, runset.test.n_examples)
        pairs = similar_pairs(found, chosen, runset.labels_train, runset.labels_test)
        written = []
        if renderer.has_inputs:
            image = render_pairs(pairs, renderer, extras["class_names"])
            atomic_write(out / "pairs.png", lambda f: f.write(png_bytes(image)))
            written.append(out / "pairs.png")
        table = Table(("rank", "test index", "train index", "K", "test label", "train label"),
                      tuple((p.rank, p.test_index, p.train_index, f"{p.value:.6f}",
                             "" if p.test_label is None else p.test_label,
                             "" if p.train_label is None else p.train_label) for p in pairs))
        atomic_write_text(out / "pairs.csv", table.to_csv())
        written.append(out / "pairs.csv")
    if not quiet:
        err.print("wrote " + ", ".join(map(str, written)))


@app.command("duplicates")
def duplicates_cmd(
    src: List[Path] = SrcArg,
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Kernel value above "
                                              "which a pair is a near-duplicate [default: "
                                              "chosen from the distribution of top-1 values]."),
    top: Optional[int] = typer.Option(None, "--top", help="At most this many pairs."),
    labels: Optional[Path] = LabelsOpt, out: Path = ViewsOutOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the pairs as JSON."),
    precision: str = PrecisionOpt, memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt, quiet: bool = QuietOpt,
) -> None:
    """Near-duplicate (test, train) pairs, best first, and how the threshold was set."""
    from .report.html import build_views, write_views
    from .report.grids import InputRenderer

    with _user_errors():
        runset, extras, _, found = _views(src, labels, None, None, memory_budget, precision,
                                          device, quiet=True, k=1, draws=False)
        views = build_views(found, labels_train=runset.labels_train,
                            labels_test=runset.labels_test, renderer=InputRenderer(None, None),
                            class_names=extras["class_names"], threshold=threshold,
                            top_duplicates=top, ranks=slice(0, 1), top_failures=0)
        written = write_views(views, out, names=("duplicates",))
    d = views.duplicates
    if as_json:
        typer.echo(json.dumps({"threshold": d.threshold, "method": d.method,
                               "pairs": [p.__dict__ for p in d.pairs]}, indent=2))
        return
    typer.echo(f"threshold: {d.method}")
    typer.echo(f"{len(d.pairs)} near-duplicate pairs")
    for p in d.pairs[:20]:
        typer.echo(f"  test {p.test_index:>6}  train {p.train_index:>6}  K {p.value:.4f}")
    if not quiet:
        err.print("wrote " + ", ".join(map(str, written)))


@app.command("failures")
def failures_cmd(
    src: List[Path] = SrcArg,
    top: int = typer.Option(8, "--top", help="How many failing test examples."),
    n_neighbors: int = typer.Option(9, "--neighbors", help="Training neighbours shown per row."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    out: Path = ViewsOutOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
) -> None:
    """The most similar pairs whose labels differ: each test example and its nearest examples."""
    from .report.html import build_views, write_views

    with _user_errors():
        runset, extras, renderer, found = _views(src, labels, inputs, None, memory_budget,
                                                 precision, device, quiet, k=n_neighbors)
        if runset.labels_train is None or runset.labels_test is None:
            raise InputError("failures needs train and test labels: pass --labels FILE.npz")
        views = build_views(found, labels_train=runset.labels_train,
                            labels_test=runset.labels_test, renderer=renderer,
                            class_names=extras["class_names"], top_failures=top,
                            n_failure_neighbors=n_neighbors, ranks=slice(0, 1))
        written = write_views(views, out, names=("failures",))
    if not quiet:
        err.print(f"{len(views.failures)} failures; wrote " + ", ".join(map(str, written)))


@app.command("compare")
def compare_cmd(
    src: List[Path] = SrcArg, features: Optional[Path] = FeaturesOpt,
    examples: int = typer.Option(10, "--examples", help="Random test examples shown."),
    seed: int = typer.Option(0, "--seed", help="Which random test examples."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    out: Path = ViewsOutOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
) -> None:
    """Kernel neighbours beside feature-space (cosine) neighbours of random test examples."""
    from .report.html import build_views, write_views

    with _user_errors():
        runset, extras, renderer, found = _views(src, labels, inputs, features, memory_budget,
                                                 precision, device, quiet, k=2)
        if extras["features_train"] is None:
            raise InputError("compare needs features: a store made with ingest --features, or "
                             "--features FILE.npz with features_train and features_test")
        views = build_views(found, labels_train=runset.labels_train,
                            labels_test=runset.labels_test, renderer=renderer,
                            class_names=extras["class_names"], ranks=slice(0, 1),
                            features_train=extras["features_train"],
                            features_test=extras["features_test"], n_compare=examples,
                            seed=seed, top_failures=0)
        written = write_views(views, out, names=("compare",))
    if not quiet:
        err.print("wrote " + ", ".join(map(str, written)))


@app.command("report")
def report_cmd(
    src: List[Path] = SrcArg,
    out: Path = typer.Option(..., "--out", help="The .html file to write; figures and tables "
                             "also go to OUT_files/ beside it."),
    ranks: str = typer.Option("0:48", "--ranks", help="Ranks of the similar pairs shown."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    features: Optional[Path] = FeaturesOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
) -> None:
    """One self-contained HTML file: accuracy, the sweep, pairs, duplicates, failures, comparison.

    Opens in any browser with no server and no network (images are embedded).
    """
    from .explain import parse_ranks
    from .report.build import build_report

    with _user_errors():
        if out.suffix.lower() not in (".html", ".htm"):
            raise InputError(f"--out must name an .html file, got {out}")
        runset, extras, renderer, found = _views(src, labels, inputs, features, memory_budget,
                                                 precision, device, quiet)
        if runset.labels_train is None or runset.labels_test is None:
            raise InputError("report needs train and test labels: pass --labels FILE.npz")
        build_report(runset.train, runset.test, runset.labels_train, runset.labels_test,
                     found=found, out=out, source=str(src[0]), renderer=renderer,
                     class_names=extras["class_names"], features_train=extras["features_train"],
                     features_test=extras["features_test"],
                     ranks=parse_ranks(ranks, runset.test.n_examples), precision=precision)
    if not quiet:
        err.print(f"wrote {out} and {out.with_name(out.stem + '_files')}/")


def _distributed_group(device: str):
    """The torchrun group, when this process is one of several; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from . import distributed  # lazily: torch.distributed is not needed otherwise

    return distributed.from_env(device)


def _neighbors_job(runset: RunSet, chosen: slice, options: dict, out: Path, resume: bool,
                   quiet: bool, group):
    """Plan, resume from OUT.partial/, split tiles over ranks, compute: the neighbours.

    The tile plan is made once (by rank 0, from the first attempt's budget) and kept in
    the checkpoint, so every rank and every restart cuts the same tiles.
    """
    main = group is None or group.is_main
    k, precision, device = options["k"], options["precision"], options["device"]
    budget = options["memory_budget"]
    manifest = {"sources": list(runset.sources), "runs": [chosen.start, chosen.stop],
                "options": {k_: v for k_, v in options.items() if k_ != "memory_budget"},
                "version": __version__}
    checkpoint = TileCheckpoint(out, manifest)
    previous = checkpoint.load(reset=main) if resume else {}
    plan_file = checkpoint.folder / "plan.json"
    if main:
        if previous and plan_file.is_file():
            tiles = json.loads(plan_file.read_text())
            err.print(f"resuming: {len(previous)} tiles already done in {checkpoint.folder}")
        else:
            plan = plan_memory(runset.test.n_examples, runset.train.n_examples,
                               runset.n_models, runset.n_classes,
                               k_keep=candidates_per_query(k, precision),
                               budget=budget or default_memory_budget(device),
                               precision=precision)
            tiles = {"tile_size": plan.tile_size, "chunk_models": plan.chunk_models}
            if resume:
                atomic_write_text(plan_file, json.dumps(tiles))
    if group is not None:
        tiles = group.broadcast(tiles if main else None)
        if not main and resume:  # rank 0 may have reset the folder: read it after it did
            previous = checkpoint.load(reset=False)
    n_tiles = -(-runset.train.n_examples // tiles["tile_size"])
    with _progress_bar(quiet or not main) as report:
        return top_k_neighbors(
            runset.test, runset.train, k, log_softmax=options["log_softmax"],
            precision=precision, memory_budget=budget, device=device, progress=report,
            tile_size=tiles["tile_size"], chunk_models=tiles["chunk_models"],
            finished_tiles=previous, on_tile=checkpoint.save if resume else None,
            tiles=group.my_tiles(n_tiles) if group is not None else None,
            combine=group.combine if group is not None else None,
        )


def _write_predictions(f, suffix: str, prediction, scores, margin, meta: str) -> None:
    if suffix == ".npz":
        np.savez(f, prediction=prediction.numpy(), scores=scores.numpy(),
                 margin=margin.numpy(), meta=np.array(meta))
        return
    n_classes = scores.shape[1]
    lines = ["index,prediction,margin," + ",".join(f"score_{c}" for c in range(n_classes))]
    for i, (p, m, row) in enumerate(zip(prediction.tolist(), margin.tolist(), scores.tolist())):
        lines.append(f"{i},{p},{m:.6g}," + ",".join(f"{s:.6g}" for s in row))
    f.write(("\n".join(lines) + "\n").encode())


def main() -> None:
    """Entry point of the `ensemble-kernel` program."""
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
