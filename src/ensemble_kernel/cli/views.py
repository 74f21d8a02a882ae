"""The views: pairs, duplicates, failures, compare, and the whole report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from ..core._engine import KeptStatistics, _top_k_neighbors
from ..core._plan import budget_beside, default_memory_budget
from ..errors import LABELS_HINT, InputError
from ..storage._formats import RunSet
from ..analysis._within import duplicates_within
from ..storage._store import RunStore, is_store
from .common import (BudgetOpt, CodeOpt, DeviceOpt, FullSweepOpt, LabelsOpt, MaxSubsetsOpt,
                     OptionError, PrecisionOpt, QuietOpt, SrcArg, TestKeyOpt, VerboseOpt,
                     _check_precision, _open, _progress_bar, _user_errors, app, check_k,
                     check_sweep_size, err, parse_size, require_train, resolve_precision, say,
                     sweep_examples, sweep_subsets, within_split_note, SweepExamplesOpt)
from .outputs import (check_output_file, check_output_folder, check_outputs_apart,
                      inputs_of)


# ---- the views ------------------------------------------------------------------------

InputsOpt = typer.Option(None, "--inputs", help="An .npz with inputs_train and inputs_test, "
                         "when SRC is run files (a store carries its own).")
FeaturesOpt = typer.Option(None, "--features", help="An .npz with features_train and "
                           "features_test (n, D), when SRC is run files.")
ViewsOutOpt = typer.Option(Path("views"), "--out", help="Folder for the PNG and CSV files.")
DEFAULT_RANKS = "0:48"


def _ranks(text: str, n_test: int) -> slice:
    """--ranks as a slice; the default 0:48 shrinks to the test examples there are."""
    from ..analysis._explain import parse_ranks

    if text == DEFAULT_RANKS:
        return slice(0, min(48, n_test))
    return parse_ranks(text, n_test)


def _finite(value: Optional[float]) -> Optional[float]:
    if value is not None and not math.isfinite(value):
        raise OptionError(f"--threshold takes a finite kernel value, got {value}")
    return value


def _extras(src: List[Path], inputs: Optional[Path], features: Optional[Path],
            kinds: tuple[str, ...] = ("inputs", "features")) -> dict:
    """Class names and the `kinds` of extra arrays: from the store, or --inputs/--features."""
    from ..storage._formats import check_extra, load_npz

    out = {"inputs_train": None, "inputs_test": None, "features_train": None,
           "features_test": None, "class_names": None}
    if len(src) == 1 and is_store(src[0]):
        store = RunStore(src[0])
        out.update({f"{kind}_{split}": store.optional(f"{kind}_{split}")
                    for kind in kinds for split in ("train", "test")},
                   class_names=store.class_names)
    for name, path in (("inputs", inputs), ("features", features)):
        if path is not None:
            if path.suffix.lower() != ".npz":
                raise InputError(f"{path}: --{name} takes an .npz file with {name}_train and "
                                 f"{name}_test, got a {path.suffix or 'suffix-less'} file")
            arrays = load_npz(path)
            for split in ("train", "test"):
                if f"{name}_{split}" not in arrays:
                    raise InputError(f"{path}: missing {name}_{split}; keys found: "
                                     f"{sorted(arrays)}")
                out[f"{name}_{split}"] = check_extra(name, arrays[f"{name}_{split}"], None,
                                                     f"{path} '{name}_{split}'")
    return out


def _view_inputs(runset: RunSet, extras: dict):
    from ..report.grids import InputRenderer

    for split, n in (("train", runset.train.n_examples), ("test", runset.test.n_examples)):
        for kind in ("inputs", "features"):
            arr = extras[f"{kind}_{split}"]
            if arr is not None and arr.shape[0] != n:
                raise InputError(f"{kind}_{split} has {arr.shape[0]} rows but the {split} split "
                                 f"has {n} examples")
    return InputRenderer(extras["inputs_train"], extras["inputs_test"])


def _note_no_inputs(renderer) -> None:
    """After a view that draws inputs was written without any: say why it holds tables only."""
    if not renderer.has_inputs:
        say("note: no inputs for this source: tables only (a store keeps them with "
            "ingest --inputs; for run files pass --inputs FILE.npz)")


def _views(src, labels, inputs, features, memory_budget, precision, device, quiet, k=20,
           kinds=("inputs", "features"), *, name: str, out: Path, needs_labels: bool = False,
           needs_features: bool = False, ranks: str | None = None, check=None,
           verbose: bool = False, runset: RunSet | None = None, keep_train: bool = False):
    """Check every option, open SRC, compute test -> train neighbours once, gather what
    the views draw. Nothing is computed before the checks (labels, features, `out`).

    Only the `kinds` of extra arrays a view uses are read from a store. `check(runset)`
    validates the other options against SRC before any work. The precision is chosen
    once, here, for the test -> train neighbours (`resolve_precision`); the report's sweep
    uses the same choice.

    With `keep_train`, the train split's statistics are kept (`KeptStatistics`, taken
    off the budget left) for a later pass over the same runs (the report's ablations).

    Returns
    -------
    (runset, extras, renderer, neighbours, budget left, PrecisionChoice, KeptStatistics
    or None)
    """
    _check_precision(precision)
    budget = parse_size(memory_budget) if memory_budget else None
    inputs_given = inputs_of(src, labels=labels, inputs=inputs, features=features)
    if name == "report":
        files = out.with_name(out.stem + "_files")
        check_output_file(out)
        check_output_folder(files)
        check_outputs_apart([("--out", out)], inputs_given, folders=[("--out", files)])
    else:
        check_output_folder(out)
        check_outputs_apart([], inputs_given, folders=[("--out", out)])
    if runset is None:  # (duplicates opens SRC first, to see whether it has a train split)
        runset, _ = _open(src, labels, None)
    require_train(runset, name)
    if needs_labels and (runset.labels_train is None or runset.labels_test is None):
        raise InputError(f"{name} needs train and test labels: pass --labels FILE.npz "
                         f"({LABELS_HINT})")
    if ranks is not None:
        _ranks(ranks, runset.test.n_examples)  # a bad --ranks is refused before work
    if check is not None:
        check(runset)
    extras = _extras(src, inputs, features, kinds)
    if needs_features and extras["features_train"] is None:
        raise InputError(f"{name} needs features: a store made with ingest --features, or "
                         "--features FILE.npz with features_train and features_test")
    renderer = _view_inputs(runset, extras)
    # The inputs and features stay in memory beside the kernel: the kernel gets the rest.
    budget = budget_beside(budget or default_memory_budget(device), _nbytes(extras),
                           "the inputs and features")
    k = min(k, runset.train.n_examples)
    choice = resolve_precision(precision, runset, k, device=device, memory_budget=budget,
                               verbose=verbose)
    kept = KeptStatistics(runset.train) if keep_train else None
    with _progress_bar(quiet) as report:
        found = _top_k_neighbors(runset.test, runset.train, k, precision=choice.precision,
                                 memory_budget=budget, device=device, progress=report,
                                 kept_statistics=kept)
    left = budget - _nbytes(found) - (kept.nbytes if kept is not None else 0)
    return runset, extras, renderer, found, left, choice, kept


def _nbytes(obj) -> int:
    """Bytes of the arrays in `obj` (a dict of arrays or None, or Neighbors)."""
    if isinstance(obj, dict):
        return sum(int(getattr(v, "nbytes", 0)) for v in obj.values())
    return int(obj.indices.nbytes + obj.values.nbytes)


def _write_view(name: str, src, labels, inputs, features, memory_budget, precision, device,
                quiet, out: Path, *, k: int, draws: bool = True, needs_labels: bool = False,
                needs_features: bool = False, check=None, verbose: bool = False,
                runset: RunSet | None = None, **options):
    """Open SRC, build the one view `name` and write its files; return (views, paths,
    the PrecisionChoice).

    `options` go to `build_views`; the other views are switched off (one pair rank, no
    failures) unless `options` ask for them.
    """
    from ..report.html import build_views, write_views

    kinds = (("inputs",) if draws else ()) + (("features",) if needs_features else ())
    runset, extras, renderer, found, _, choice, _ = _views(
        src, labels, inputs, features, memory_budget, precision, device, quiet, k=k,
        kinds=kinds, name=name, out=out, needs_labels=needs_labels,
        needs_features=needs_features, ranks=options.pop("ranks_spec", None), check=check,
        verbose=verbose, runset=runset)
    options = {"ranks": slice(0, 1), "top_failures": 0, **options}
    if callable(options["ranks"]):  # parsed once the number of test examples is known
        options["ranks"] = options["ranks"](runset.test.n_examples)
    features = {f"features_{s}": extras[f"features_{s}"] for s in ("train", "test")}
    views = build_views(found, labels_train=runset.labels_train, labels_test=runset.labels_test,
                        renderer=renderer, class_names=extras["class_names"],
                        n_models=runset.n_models, **(features if needs_features else {}),
                        **options)
    written = write_views(views, out, names=(name,))
    if draws:
        _note_no_inputs(renderer)
    return views, written, choice


@app.command("pairs")
def pairs_cmd(
    src: List[Path] = SrcArg,
    ranks: str = typer.Option(DEFAULT_RANKS, "--ranks", help="Which ranks: "
    "0-based, half-open, like a Python slice (the card's 601st to 648th is 600:648)."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    out: Path = ViewsOutOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
    code: Optional[str] = CodeOpt, test_key: Optional[str] = TestKeyOpt,
) -> None:
    """Test examples ranked by the kernel value of their best training match: grid and CSV."""
    with _user_errors():
        _, written, _ = _write_view("pairs", src, labels, inputs, None, memory_budget,
                                    precision, device, quiet, out, k=1, verbose=verbose,
                                 ranks=lambda n_test: _ranks(ranks, n_test), ranks_spec=ranks)
    if not quiet:
        err.print("wrote " + ", ".join(map(str, written)))


@app.command("duplicates")
def duplicates_cmd(
    src: List[Path] = SrcArg,
    threshold: Optional[float] = typer.Option(None, "--threshold", callback=_finite,
                                              show_default="chosen from the distribution "
                                              "of top-1 values", help="Kernel value above "
                                              "which a pair is a near-duplicate."),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="At most this many pairs."),
    labels: Optional[Path] = LabelsOpt, out: Path = ViewsOutOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the pairs as JSON."),
    precision: str = PrecisionOpt, memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt, quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
    code: Optional[str] = CodeOpt, test_key: Optional[str] = TestKeyOpt,
) -> None:
    """Near-duplicate (test, train) pairs, best first, and how the threshold was set.

    When SRC has no train split (test logits only), the pairs are within the test split:
    each example against the others (a note on stderr says so); a pair found from both
    ends is listed once, and --out receives duplicates.csv and duplicates.json.
    """
    with _user_errors():
        _check_precision(precision)
        check_output_folder(out)
        check_outputs_apart([], inputs_of(src, labels=labels), folders=[("--out", out)])
        runset, _ = _open(src, labels, None)
        within = within_split_note(runset, "duplicates", "the pairs are")
        choice = None  # within the split, the engine resolves 'auto' itself
        if within:
            budget = parse_size(memory_budget) if memory_budget else None
            with _progress_bar(quiet) as report:
                d = duplicates_within(runset.test, threshold=threshold, top=top,
                                      labels=runset.labels_test, precision=precision,
                                      memory_budget=budget, device=device, progress=report)
            written = _write_within_duplicates(d, out)
        else:
            views, written, choice = _write_view(
                "duplicates", src, labels, None, None, memory_budget, precision, device, True,
                out, k=1, draws=False, verbose=verbose, threshold=threshold,
                top_duplicates=top, runset=runset)
            d = views.duplicates
    other = "test" if within else "train"
    if as_json:
        pairs = [p.__dict__ for p in d.pairs]
        if within:
            pairs = [{"rank": p["rank"], "test_index": p["test_index"],
                      "other_test_index": p["train_index"], "value": p["value"],
                      "test_label": p["test_label"], "other_test_label": p["train_label"]}
                     for p in pairs]
        typer.echo(json.dumps({"threshold": d.threshold, "method": d.method,
                               "within_split": within, "pairs": pairs,
                               "precision": choice.as_dict() if choice else
                               {"requested": precision}}, indent=2))
        return
    typer.echo(f"threshold: {d.method}")
    typer.echo(f"{len(d.pairs)} near-duplicate pairs")
    for p in d.pairs[:20]:
        typer.echo(f"  test {p.test_index:>6}  {other} {p.train_index:>6}  K {p.value:.4f}")
    if not quiet:
        err.print("wrote " + ", ".join(map(str, written)))


def _write_within_duplicates(d, out: Path) -> list:
    """duplicates.csv and duplicates.json of a within-split search, each atomically."""
    from .._atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    rows = ["rank,test index,other test index,K,test label,other test label"]
    rows += [f"{p.rank},{p.test_index},{p.train_index},{p.value:.6f},"
             f"{'' if p.test_label is None else p.test_label},"
             f"{'' if p.train_label is None else p.train_label}" for p in d.pairs]
    csv_path, json_path = out / "duplicates.csv", out / "duplicates.json"
    atomic_write_text(csv_path, "\n".join(rows) + "\n")
    atomic_write_text(json_path, json.dumps({
        "threshold": d.threshold, "method": d.method, "within_split": True,
        "pairs": [[p.test_index, p.train_index, p.value] for p in d.pairs]}, indent=2))
    return [csv_path, json_path]


@app.command("failures")
def failures_cmd(
    src: List[Path] = SrcArg,
    top: int = typer.Option(8, "--top", min=1, help="How many failing test examples."),
    n_neighbors: int = typer.Option(9, "--neighbors", min=1,
                                    help="Training neighbours shown per row."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    out: Path = ViewsOutOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
    code: Optional[str] = CodeOpt, test_key: Optional[str] = TestKeyOpt,
) -> None:
    """The most similar pairs whose labels differ: each test example and its nearest examples."""
    with _user_errors():
        views, written, _ = _write_view("failures", src, labels, inputs, None, memory_budget,
                                        precision, device, quiet, out, k=n_neighbors,
                                        verbose=verbose,
                                     check=lambda r: check_k("--neighbors", n_neighbors,
                                                             r.train.n_examples, default=9),
                                     needs_labels=True, top_failures=top,
                                     n_failure_neighbors=n_neighbors)
    if not quiet:
        err.print(f"{len(views.failures)} failures; wrote " + ", ".join(map(str, written)))


@app.command("compare")
def compare_cmd(
    src: List[Path] = SrcArg, features: Optional[Path] = FeaturesOpt,
    examples: int = typer.Option(10, "--examples", min=1, help="Random test examples shown."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1,
                             help="Which random test examples."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    out: Path = ViewsOutOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt, quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
    code: Optional[str] = CodeOpt, test_key: Optional[str] = TestKeyOpt,
) -> None:
    """Kernel neighbours beside feature-space (cosine) neighbours of random test examples."""
    with _user_errors():
        _, written, _ = _write_view("compare", src, labels, inputs, features, memory_budget,
                                    precision, device, quiet, out, k=2, needs_features=True,
                                    verbose=verbose,
                                 n_compare=examples, seed=seed)
    if not quiet:
        err.print("wrote " + ", ".join(map(str, written)))


@app.command("report")
def report_cmd(
    src: List[Path] = SrcArg,
    out: Path = typer.Option(..., "--out", help="The .html file to write; figures and tables "
                             "also go to OUT_files/ beside it."),
    ranks: str = typer.Option(DEFAULT_RANKS, "--ranks", help="Ranks of the similar pairs shown."),
    labels: Optional[Path] = LabelsOpt, inputs: Optional[Path] = InputsOpt,
    features: Optional[Path] = FeaturesOpt, precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt, device: str = DeviceOpt,
    max_subsets: Optional[int] = MaxSubsetsOpt, full_sweep: bool = FullSweepOpt,
    examples: Optional[str] = SweepExamplesOpt,
    quiet: bool = QuietOpt, verbose: bool = VerboseOpt,
    code: Optional[str] = CodeOpt, test_key: Optional[str] = TestKeyOpt,
) -> None:
    """One self-contained HTML file: accuracy, the sweep, pairs, duplicates, failures, comparison.

    Opens in any browser with no server and no network (images are embedded).
    The sweep takes at most 3 disjoint subsets of runs per run count (--max-subsets N,
    or --full-sweep for all), on at most 2,000 test examples spread evenly
    (--sweep-examples N or all); its ablations (each class's kernel alone, no
    log-softmax) come from one pass over the runs. Everything else uses every example.
    """
    from ..report.build import build_report

    with _user_errors():
        if out.suffix.lower() not in (".html", ".htm"):
            raise InputError(f"--out must name an .html file, got {out}")
        subsets = sweep_subsets(max_subsets, full_sweep)
        test_examples = sweep_examples(examples)
        runset, extras, renderer, found, left, choice, kept = _views(
            src, labels, inputs, features, memory_budget, precision, device, quiet,
            name="report", out=out, needs_labels=True, ranks=ranks, verbose=verbose,
            check=lambda r: check_sweep_size("report", r.train.n_examples), keep_train=True)
        with _progress_bar(quiet) as report:
            build_report(runset.train, runset.test, runset.labels_train, runset.labels_test,
                         found=found, out=out, source=str(src[0]), renderer=renderer,
                         class_names=extras["class_names"],
                         features_train=extras["features_train"],
                         features_test=extras["features_test"],
                         ranks=_ranks(ranks, runset.test.n_examples), precision=choice.precision,
                         memory_budget=left, device=device, max_subsets=subsets,
                         test_examples=test_examples, progress=report, kept_statistics=kept)
    if not quiet:
        err.print(f"wrote {out} and {out.with_name(out.stem + '_files')}/")
    _note_no_inputs(renderer)
