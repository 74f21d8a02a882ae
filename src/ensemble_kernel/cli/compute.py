"""evaluate, neighbors (resumable, torchrun) and predict."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import typer

from .. import __version__
from .._atomic import atomic_write
from ..storage._checkpoint import TileCheckpoint, content_fingerprint
from ..core._engine import _top_k_neighbors, candidates_per_query, default_memory_budget
from ..errors import LABELS_HINT, InputError
from ..analysis._evaluation import evaluate, select_by_leave_one_out
from ..storage._formats import RunSet, _as_labels, check_labels, file_hash, load_npz
from ..core._neighbors import knn_scores, predict_from_scores, weighted_scores
from ..core._plan import format_bytes, plan_if_fits, plan_memory
from ..core._sources import item_size
from ..analysis._within import evaluate_within
from .common import (BudgetOpt, CodeOpt, DeviceOpt, LabelsOpt, NoLogSoftmaxOpt, PrecisionOpt,
                     QuietOpt, RunsOpt, SrcArg, TestKeyOpt, VerboseOpt, _check_precision, _meta,
                     _open, _progress_bar, _user_errors, app, check_k, err, format_card,
                     parse_size, require_train, resolve_precision, within_split_note)
from .outputs import check_output_file, check_outputs_apart, inputs_of


# ---- commands ------------------------------------------------------------------------

@app.command("evaluate")
def evaluate_cmd(
    src: List[Path] = SrcArg,
    labels: Optional[Path] = LabelsOpt,
    k: int = typer.Option(3, "--k", min=1,
                          help="Neighbours in the majority vote (the card: 3)."),
    weighted_k: int = typer.Option(20, "--weighted-k", min=1,
                                   help="Neighbours in the weighted vote."),
    power: int = typer.Option(4, "--power", min=1, help="Weight of a neighbour: K ** power."),
    runs: Optional[str] = RunsOpt,
    no_log_softmax: bool = NoLogSoftmaxOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    select: bool = typer.Option(False, "--select", help="Choose the vote, k and power by "
                                "leave-one-out on the training set (no test labels used)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead (with "
                                 "the precision chosen and the probe's figures)."),
    code: Optional[str] = CodeOpt,
    test_key: Optional[str] = TestKeyOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """The model card's table: single models, their average, kernel k-NN, weighted vote.

    Example: ensemble-kernel evaluate runs/ --labels labels.npz --runs 500

    When SRC has no train split (test logits only), the votes are leave-one-out within
    the test split (each example's neighbours among the others; a note on stderr says
    so), and --select chooses on that split too.
    """
    started = time.perf_counter()
    with _user_errors():
        _check_precision(precision)
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, labels, runs)
        within = within_split_note(runset, "evaluate", "the votes are leave-one-out")
        refs, ref_labels = ((runset.test, runset.labels_test) if within
                            else (runset.train, runset.labels_train))
        n_refs = refs.n_examples - within  # leave-one-out: every example but itself
        what = "other test examples" if within else "training examples"
        choice = resolve_precision(precision, runset, max(k, weighted_k), device=device,
                                   memory_budget=budget, verbose=verbose, within=within,
                                   log_softmax=not no_log_softmax)
        # --select's leave-one-out resolves 'auto' for its own shape.
        common = dict(log_softmax=not no_log_softmax, memory_budget=budget, device=device)
        selection = None
        with _progress_bar(quiet or as_json) as report:
            if select:
                if ref_labels is None:
                    raise InputError(f"--select needs {'test' if within else 'train'} labels: "
                                     f"pass --labels FILE.npz ({LABELS_HINT})")
                if n_refs < 1:
                    raise InputError(f"--select needs at least 2 examples, got {refs.n_examples}")
                selection = select_by_leave_one_out(refs, ref_labels, precision=precision,
                                                    progress=report, **common)
                if selection.vote == "knn":
                    k = selection.k
                else:
                    weighted_k, power = selection.k, selection.power
            check_k("--k", k, n_refs, default=3, what=what)
            check_k("--weighted-k", weighted_k, n_refs, default=20, what=what)
            if within:
                result = evaluate_within(runset.test, runset.labels_test, k=k,
                                         weighted_k=weighted_k, power=power, progress=report,
                                         precision=choice.precision, **common)
            else:
                result = evaluate(runset.train, runset.test, runset.labels_train,
                                  runset.labels_test, k=k, weighted_k=weighted_k, power=power,
                                  progress=report, precision=choice.precision, **common)
    options = {"k": k, "weighted_k": weighted_k, "power": power, "log_softmax": not no_log_softmax,
               "precision": choice.precision, "memory_budget": budget, "device": device,
               "runs": [chosen.start, chosen.stop], "select": select,
               "labels": str(labels) if labels else None, "code": code, "test_key": test_key,
               "within_split": within}
    if as_json:
        out = {"n_models": result.n_models, "k": result.k,
               "single_model_accuracy": result.single_model_accuracy,
               "ensemble_accuracy": result.ensemble_accuracy,
               "knn_accuracy": result.knn_accuracy,
               "weighted_accuracy": result.weighted_accuracy,
               "weighted_k": result.weighted_k, "power": result.power,
               "options": options, "precision": choice.as_dict(), "version": __version__,
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
        typer.echo(f"leave-one-out on {'test' if within else 'train'} chose {what} (accuracy "
                   f"{100 * selection.accuracy:.2f})")
    if within:
        typer.echo(f"within the test split (no train split): k-NN and weighted votes are "
                   f"leave-one-out{', chosen on the same split' if select else ''}")
    typer.echo(format_card(result))


@app.command("neighbors")
def neighbors_cmd(
    src: List[Path] = SrcArg,
    out: Path = typer.Option(..., "--out", help="Where to write the .npz (indices, values, meta)."),
    k: int = typer.Option(20, "--k", min=1, help="Neighbours per test example."),
    labels: Optional[Path] = LabelsOpt,
    runs: Optional[str] = RunsOpt,
    no_log_softmax: bool = NoLogSoftmaxOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Save finished tiles in "
                                "OUT.partial/ and reuse them after a kill."),
    code: Optional[str] = CodeOpt,
    test_key: Optional[str] = TestKeyOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Top-k training neighbours of every test example, best first, into an .npz.

    When SRC has no train split (test logits only), the neighbours are other test
    examples: each example's own entry is left out (a note on stderr says so; the file's
    meta has "within_split": true).

    Finished tiles are saved in OUT.partial/ as they complete: after a kill, the same
    command resumes where it stopped and writes the same result. Rerun with a smaller
    --memory-budget (after running out of memory), it starts over with tiles that fit;
    with other inputs or options, it starts over and says what differs.

    The file holds `indices` (int64, n_test x k), `values` (float32 kernel values) and
    `meta` (a JSON string: options, runs, version, and the precision chosen with the
    probe's figures).
    """
    started = time.perf_counter()
    with _user_errors(), contextlib.ExitStack() as held:
        _check_precision(precision)
        if out.suffix.lower() != ".npz":
            raise InputError(f"--out must name an .npz file, got {out}")
        check_output_file(out)
        check_outputs_apart([("--out", out)], inputs_of(src, labels=labels),
                            checkpoint=TileCheckpoint(out, {}).folder)
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, labels, runs)
        # The default budget follows free memory: read once, for the choice, the plan and
        # the engine alike.
        resolved = budget or default_memory_budget(device)
        within = within_split_note(runset, "neighbors", "the neighbours are other test examples")
        n_refs = runset.test.n_examples - 1 if within else runset.train.n_examples
        check_k("--k", k, n_refs, default=20,
                what="other test examples" if within else "training examples")
        source_options = {"within_split": True} if within else {}
        if code is not None or test_key is not None:  # in the meta and the checkpoint
            source_options["code"] = next(iter(runset.codes)) if code is not None else None
            source_options["test_key"] = test_key
        group = _distributed_group(device)
        try:
            if resume and (group is None or group.is_main):  # one job per OUT.partial/
                held.enter_context(TileCheckpoint(out, {}).hold())
            # Rank 0 chooses (and probes, once); every rank runs its choice.
            choice = (resolve_precision(precision, runset, k, device=device,
                                        memory_budget=resolved, verbose=verbose, within=within,
                                        log_softmax=not no_log_softmax)
                      if group is None or group.is_main else None)
            if group is not None:
                choice = group.broadcast(choice)
            options = {"k": k, "log_softmax": not no_log_softmax,
                       "precision": choice.precision, "memory_budget": budget, "device": device,
                       **source_options}
            result, ran = _neighbors_job(runset, chosen, options, out, resume, quiet, group,
                                         resolved, precision, labels=labels)
            if ran != choice.precision:  # auto took an earlier run's tiles (same neighbours)
                options["precision"] = ran
                choice = dataclasses.replace(choice, precision=ran, reason=(
                    f"auto chose {choice.precision} ({choice.reason}); ran {ran}: resumed the "
                    f"tiles an earlier run computed in {ran} mode"))
            if group is None or group.is_main:
                meta = json.dumps({**_meta({**options, "processes": group.world_size if group
                                            else 1}, runset, chosen, started),
                                   "precision": choice.as_dict()})
                atomic_write(out, lambda f: np.savez(f, indices=result.indices.cpu().numpy(),
                                                     values=result.values.cpu().numpy(),
                                                     meta=np.array(meta)))
                TileCheckpoint(out, {}).remove()  # only if neighbors made it
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
    k: int = typer.Option(3, "--k", min=1, help="Neighbours in the majority vote."),
    weighted: bool = typer.Option(False, "--weighted", help="Weighted vote instead: each "
                                  "neighbour counts K ** power."),
    weighted_k: int = typer.Option(20, "--weighted-k", min=1,
                                   help="Neighbours in the weighted vote."),
    power: int = typer.Option(4, "--power", min=1, help="Weight of a neighbour: K ** power."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="An .npz with labels_train "
                                          "(labels_test is not needed and not read), when "
                                          "SRC carries no train labels."),
    runs: Optional[str] = RunsOpt,
    no_log_softmax: bool = NoLogSoftmaxOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    code: Optional[str] = CodeOpt,
    test_key: Optional[str] = TestKeyOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Labels for the test examples from their training neighbours (train labels needed).

    The test examples need no labels: a store without test labels, an .npz without
    labels_test, .pt files without labels (with --labels holding labels_train only) all
    work. Writes per example the prediction, the per-class scores (vote fractions, or
    summed weights / k) and the margin between the best two scores.
    """
    started = time.perf_counter()
    with _user_errors():
        _check_precision(precision)
        if out.suffix.lower() not in (".csv", ".npz"):
            raise InputError(f"--out must end in .csv or .npz, got {out}")
        check_output_file(out)
        check_outputs_apart([("--out", out)], inputs_of(src, labels=labels))
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, None, runs)
        require_train(runset, "predict")
        labels_train = (runset.labels_train if labels is None else
                        _read_train_labels(labels, runset.train.n_examples, runset.n_classes))
        if labels_train is None:
            raise InputError(f"predict needs train labels: {', '.join(map(str, src))} carries "
                             "none; pass --labels FILE.npz with an array labels_train "
                             f"({LABELS_HINT})")
        n_classes = runset.n_classes
        k_used = weighted_k if weighted else k
        check_k("--weighted-k" if weighted else "--k", k_used, runset.train.n_examples,
                default=20 if weighted else 3)
        choice = resolve_precision(precision, runset, k_used, device=device,
                                   memory_budget=budget, verbose=verbose,
                                   log_softmax=not no_log_softmax)
        with _progress_bar(quiet) as report:
            found = _top_k_neighbors(runset.test, runset.train, k_used,
                                     log_softmax=not no_log_softmax, precision=choice.precision,
                                    memory_budget=budget, device=device, progress=report)
        scores = (weighted_scores(found, labels_train, n_classes, power) if weighted
                  else knn_scores(found, labels_train, n_classes))
        scores = scores.cpu()  # (from a GPU with --device cuda)
        prediction, margin = predict_from_scores(scores)
        options = {"vote": "weighted" if weighted else "knn", "k": k_used,
                   "power": power if weighted else None, "log_softmax": not no_log_softmax,
                   "precision": choice.precision, "memory_budget": budget, "device": device}
        meta = json.dumps({**_meta(options, runset, chosen, started),
                           "precision": choice.as_dict()})
        atomic_write(out, lambda f: _write_predictions(f, out.suffix.lower(), prediction,
                                                       scores, margin, meta))
    if not quiet:
        err.print(f"wrote {out} ({len(prediction)} predictions)")


def _read_train_labels(path: Path, n_train: int, n_classes: int) -> torch.Tensor:
    """`labels_train` from an .npz, checked against the train split; `labels_test`, if
    any, is not read (predicting needs none)."""
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: --labels takes an .npz file with an array labels_train")
    if not path.is_file():
        raise InputError(f"{path}: no such labels file")
    arrays = load_npz(path)
    if "labels_train" not in arrays:
        raise InputError(f"{path}: missing labels_train; keys found: {sorted(arrays)}")
    labels = _as_labels(arrays["labels_train"], f"{path} 'labels_train'")
    check_labels(labels, n_train, n_classes, "train")
    return labels


def _distributed_group(device: str):
    """The torchrun group, when this process is one of several; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from ..core import _distributed as distributed  # lazily: torch.distributed is not needed otherwise

    return distributed.from_env(device)


def _neighbors_job(runset: RunSet, chosen: slice, options: dict, out: Path, resume: bool,
                   quiet: bool, group, budget: int, requested: str,
                   labels: Optional[Path] = None):
    """Plan, resume from OUT.partial/, split tiles over ranks, compute: the neighbours.

    The tile plan is made once (by rank 0, for its `budget`: the --memory-budget, or the
    default read once by the caller) and kept in the checkpoint's manifest, so every rank
    and every restart cuts the same tiles. A restart under a budget the kept plan does not
    fit starts over; under `requested` 'auto', it takes the kept tiles of the other
    precision where auto chose differently this time (every precision gives the same
    neighbours). The manifest binds the tiles to the content of the logits (see
    `checkpoint`), to the runs chosen (--runs, --code, --test-key) and to the content of
    the `labels` file, if one is given (labels do not change the neighbours today; a
    checkpoint is not resumed under other labels all the same). Everything is checked
    before the checkpoint is started afresh, so a refused command leaves an earlier
    checkpoint as it was.

    Returns
    -------
    (Neighbors, the precision run).
    """
    main = group is None or group.is_main
    k, precision, device = options["k"], options["precision"], options["device"]
    within = bool(options.get("within_split"))
    references = None if within else runset.train  # None: the test split, self left out
    n_refs = runset.test.n_examples if within else runset.train.n_examples  # (k checked)

    def plan(precision: str, kept: dict | None = None, refuse: bool = True):
        """The engine's plan (kept: its tiles and blocks); with `refuse` False, None where
        it does not fit the budget."""
        return (plan_memory if refuse else plan_if_fits)(
            runset.test.n_examples, n_refs, runset.n_models, runset.n_classes,
            k_keep=candidates_per_query(k, precision), budget=budget, precision=precision,
            device=device, raw_bytes=max(item_size(s) for s in (runset.test, references)
                                         if s is not None),  # as the engine counts them
            tile_size=None if kept is None else kept["tile_size"],
            chunk_models=None if kept is None else kept["chunk_models"])

    def fits(precision: str, kept: dict) -> bool:  # the kept plan, within this run's budget
        return plan(precision, kept, refuse=False) is not None

    checkpoint = TileCheckpoint(out, {})
    tiles, previous, fresh = None, {}, None
    if main:  # the other ranks touch the checkpoint only once rank 0 has set it up
        if resume:
            checkpoint.check_owner()  # before hashing anything: a user's folder is refused
            inputs = {
                # --code on a store: its runs are not one range of the store's; every
                # record is bound (a later append to the store starts the work afresh).
                "content": content_fingerprint(runset.sources, slice(0, 2**62)
                                               if options.get("code") else chosen),
                "runs": [chosen.start, chosen.stop],
                "n_examples": [runset.test.n_examples, n_refs], "n_classes": runset.n_classes,
                "options": {k_: v for k_, v in options.items() if k_ != "memory_budget"},
                "version": __version__}
            if labels is not None:
                inputs["labels"] = {"sha256": file_hash(labels)}
            tiles, previous, precision, why_not = _resumable(
                checkpoint, inputs, precision, requested, fits,
                (runset.test.n_examples, n_refs, k), budget)
            if why_not:
                fresh = plan(precision)  # a budget too small for any plan is refused first
                err.print(f"not resuming from {checkpoint.folder}: {why_not}; starting over")
            elif tiles is not None and precision != options["precision"]:
                err.print(f"auto chose {options['precision']} mode, but the tiles in "
                          f"{checkpoint.folder} were computed in {precision} mode: resuming "
                          "them in that mode (the same neighbours, up to ties within float32 "
                          "rounding)")
        if tiles is not None:
            err.print(f"resuming: {len(previous)} tiles already done in {checkpoint.folder}")
        else:
            fresh = fresh or plan(precision)
            tiles = {"tile_size": fresh.tile_size, "chunk_models": fresh.chunk_models}
            if resume:
                checkpoint.start(tiles)
    if group is not None:  # every rank works to rank 0's plan, budget and precision
        tiles, checkpoint.inputs, budget, precision = group.broadcast(
            (tiles, checkpoint.inputs, budget, precision) if main else None)
        if not main and resume:
            previous = checkpoint.load(runset.test.n_examples, candidates_per_query(k, precision),
                                       n_refs)[1]
    n_tiles = -(-n_refs // tiles["tile_size"])
    with _progress_bar(quiet or not main) as report:
        return _top_k_neighbors(
            runset.test, references, k, exclude_self=within,
            log_softmax=options["log_softmax"],
            precision=precision, memory_budget=budget, device=device, progress=report,
            tile_size=tiles["tile_size"], chunk_models=tiles["chunk_models"],
            finished_tiles=previous, on_tile=checkpoint.save if resume else None,
            tiles=group.my_tiles(n_tiles) if group is not None else None,
            combine=group.combine if group is not None else None,
        ), precision


def _resumable(checkpoint: TileCheckpoint, inputs: dict, precision: str, requested: str,
               fits: Callable[[str, dict], bool], shape: tuple[int, int, int],
               budget: int) -> tuple[dict | None, dict, str, str | None]:
    """The kept plan and tiles `checkpoint` holds for `inputs` run in `precision` (or, under
    `requested` 'auto', in the other precision, which gives the same neighbours), if that
    plan fits this run's budget (`fits`); `shape` is (queries, references, k).

    Returns
    -------
    (plan or None, tiles, the precision to run, why the checkpoint is not resumed: None
    where it is, or where there is none). `checkpoint.inputs` is left as the run's.
    """
    n_queries, n_refs, k = shape
    precisions = [precision] + ([{"exact": "fast", "fast": "exact"}[precision]]
                                if requested == "auto" else [])
    why_not, differs = None, None
    for p in precisions:
        checkpoint.inputs = {**inputs, "options": {**inputs["options"], "precision": p}}
        kept, tiles = checkpoint.load(n_queries, candidates_per_query(k, p), n_refs)
        if kept is not None and fits(p, kept):
            return kept, tiles, p, None
        if kept is not None:
            why_not = (f"its plan (tiles of {kept['tile_size']} references, blocks of "
                       f"{kept['chunk_models']} runs, {p} mode) does not fit a memory budget "
                       f"of {format_bytes(budget)}")
        elif differs is None:  # against this run's own precision (auto: either serves)
            differs = [d for d in checkpoint.differs
                       if requested != "auto" or d != "options.precision"]
    checkpoint.inputs = {**inputs, "options": {**inputs["options"], "precision": precision}}
    if why_not is None and differs:
        why_not = f"it differs in {', '.join(differs)}"
    return None, {}, precision, why_not


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
