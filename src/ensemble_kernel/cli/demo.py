"""demo and sweep."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..demo.data import DATASETS
from ..errors import LABELS_HINT, InputError
from .common import (BudgetOpt, CodeOpt, DeviceOpt, FullSweepOpt, LabelsOpt, MaxSubsetsOpt,
                     PrecisionOpt, QuietOpt, SrcArg, TestKeyOpt, VerboseOpt, _check_precision,
                     _open, _progress_bar, _stage_bar, _user_errors, app, check_sweep_size,
                     choice, err, format_card, parse_run_counts, parse_size, require_train,
                     resolve_precision, sweep_examples, sweep_subsets, SweepExamplesOpt)
from .outputs import check_output_folder, check_outputs_apart, inputs_of


@app.command("sweep")
def sweep_cmd(
    src: List[Path] = SrcArg,
    labels: Optional[Path] = LabelsOpt,
    runs_list: Optional[str] = typer.Option(None, "--runs", help="Run counts, e.g. 1,2,4,8.",
                                            show_default="powers of 2 up to all runs"),
    out: Path = typer.Option(Path("sweep-output"), "--out", help="Folder for sweep.png, "
                             "sweep.csv and sweep.json."),
    max_subsets: Optional[int] = MaxSubsetsOpt,
    full_sweep: bool = FullSweepOpt,
    examples: Optional[str] = SweepExamplesOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the sweep as JSON (with the "
                                 "precision chosen and the probe's figures)."),
    code: Optional[str] = CodeOpt,
    test_key: Optional[str] = TestKeyOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Accuracy against the number of runs (disjoint subsets), with ablations and a paired test.

    Single model, ensemble average, kernel k-NN (k = 1, 3, 5, 9) and the weighted vote;
    at the largest count: no log-softmax, each per-class kernel alone, McNemar's exact test
    and a bootstrap interval of kernel 3-NN minus the ensemble average. The precision is
    chosen once, for the largest run count, and used for every kernel.
    At most 3 disjoint subsets per run count (--max-subsets N, or --full-sweep for all),
    on at most 2,000 test examples spread evenly (--sweep-examples N or all); the
    ablations come from one pass over the runs.
    """
    from ..report.files import sweep_json, write_sweep
    from ..analysis._sweep import sweep

    with _user_errors():
        _check_precision(precision)
        subsets = sweep_subsets(max_subsets, full_sweep)
        test_examples = sweep_examples(examples)
        budget = parse_size(memory_budget) if memory_budget else None
        check_output_folder(out)
        check_outputs_apart([], inputs_of(src, labels=labels), folders=[("--out", out)])
        runset, _ = _open(src, labels, None)
        require_train(runset, "sweep")
        if runset.labels_train is None or runset.labels_test is None:
            raise InputError("sweep needs train and test labels: pass --labels FILE.npz "
                             f"({LABELS_HINT})")
        counts = parse_run_counts(runs_list, runset.n_models)
        check_sweep_size("sweep", runset.train.n_examples)
        picked = resolve_precision(precision, runset, 20, device=device, memory_budget=budget,
                                   verbose=verbose)
        with _progress_bar(quiet or as_json) as report:
            result = sweep(runset.train, runset.test, runset.labels_train, runset.labels_test,
                           runs=counts, max_subsets=subsets, test_examples=test_examples,
                           precision=picked.precision,
                           memory_budget=budget, device=device, progress=report)
        paths = write_sweep(result, out)
    if as_json:
        typer.echo(json.dumps({**sweep_json(result), "precision": picked.as_dict()}, indent=2))
        return
    typer.echo(format_sweep(result))
    if not quiet:
        err.print("wrote " + ", ".join(map(str, paths)))


def format_sweep(result) -> str:
    """A short text table: accuracy (%) per run count, one column per metric."""
    metrics = list(dict.fromkeys(r.metric for r in result.rows))
    counts = sorted({r.n_models for r in result.rows})
    cell = {(r.n_models, r.metric): r for r in result.rows}
    lines = [f"accuracy (%) {result.sample_note()}"] if result.sampled else []
    lines.append("runs  " + "".join(f"{m:>10}" for m in metrics))
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
    dataset: str = typer.Option("mnist1d", "--dataset", callback=choice("--dataset", DATASETS),
                                help="mnist1d (generated locally) or "
                                "digits (scikit-learn's 8x8 images)."),
    models: int = typer.Option(192, "--models", min=2, help="Networks in the ensemble."),
    out: Path = typer.Option(Path("demo-output"), "--out", help="Output folder."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seeds every network's "
                             "initialisation and data order."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json instead."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if the demo did "
                               "not make it, replacing OUT/store."),
    max_subsets: Optional[int] = MaxSubsetsOpt,
    full_sweep: bool = FullSweepOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train an ensemble of small 1-D CNNs on the CPU and show the kernel beating the average.

    Writes OUT/store (a store every command accepts as SRC), summary.json, sweep.png,
    sweep.csv, sweep.json, record.json and report.html. Needs no download.

    OUT is the demo's own folder (it leaves a marker file in it): a later demo replaces
    OUT/store only if the demo made it and no runs were added since. Any other OUT that
    is not empty is refused before training starts, unless --force.
    """
    from ..demo import DemoOptions, run_demo

    started = time.perf_counter()
    with _user_errors():
        options = DemoOptions(dataset=dataset, models=models, seed=seed, out=out, force=force,
                              max_subsets=sweep_subsets(max_subsets, full_sweep))
        with _stage_bar(quiet or as_json) as report:
            result = run_demo(options, report)
    if as_json:
        typer.echo((result.paths["summary"]).read_text())
        return
    e = result.evaluation
    typer.echo(f"{dataset}: {e.n_models} runs trained in {result.timings['training_s']:.0f} s, "
               f"{time.perf_counter() - started:.0f} s in all")
    typer.echo(format_card(e))
    typer.echo("")
    typer.echo(format_sweep(result.sweep))
    typer.echo("")
    for name, path in result.paths.items():
        typer.echo(f"{name:<11} {path}")
