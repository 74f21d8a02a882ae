"""label-issues: rank one split's examples by how strongly their kernel neighbours
disagree with their given labels (issue 11)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from .._atomic import atomic_write, atomic_write_text
from ..errors import LABELS_HINT, InputError
from ..analysis._label_issues import LabelIssues, SCORES, SPLITS, check_k_for_split, knn_graph, label_issues
from .common import (BudgetOpt, CodeOpt, DeviceOpt, LabelsOpt, PrecisionOpt, QuietOpt,
                     RunsOpt, SrcArg, TestKeyOpt, _check_precision, _meta, _open,
                     _progress_bar, _user_errors, app, choice, err, parse_size,
                     require_train)
from .outputs import check_output_file, check_outputs_apart, inputs_of

SHOWN_NEIGHBORS = 5  # nearest neighbours written per row


@app.command("label-issues")
def label_issues_cmd(
    src: List[Path] = SrcArg,
    split: str = typer.Option("test", "--split", callback=choice("--split", SPLITS),
                              help="Which split to audit. test: each test example's "
                              "neighbours are training examples. train: each training "
                              "example's neighbours are the other training examples (its "
                              "own entry left out). The train labels vote in both."),
    k: int = typer.Option(20, "--k", min=1, help="Neighbours that vote."),
    power: int = typer.Option(4, "--power", min=1,
                              help="Weight of a neighbour: max(K, 0) ** power."),
    score: str = typer.Option("combined", "--score", callback=choice("--score", SCORES),
                              help="combined: 1 - the mean of the vote share of the given "
                              "label and the ensemble's own (averaged) probability of it; "
                              "ranks best in benchmarks/label_noise.py. kernel: 1 - the "
                              "vote share alone."),
    top: int = typer.Option(20, "--top", min=1, help="Rows printed (the file has them all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="A .csv with one row per example, "
                                       "most suspicious first."),
    graph: Optional[Path] = typer.Option(None, "--knn-graph", help="Also write the split's "
                                         "kernel k-NN graph (k = --k) as a scipy sparse .npz "
                                         "for cleanlab's Datalab(knn_graph=...)."),
    probabilities: Optional[Path] = typer.Option(None, "--probabilities", help="Also write "
                                                 "the kernel vote's class probabilities, "
                                                 "(n, n_classes) by example index, as .npy "
                                                 "(cleanlab's pred_probs)."),
    labels: Optional[Path] = LabelsOpt,
    runs: Optional[str] = RunsOpt,
    code: Optional[str] = CodeOpt,
    test_key: Optional[str] = TestKeyOpt,
    precision: str = PrecisionOpt,
    memory_budget: Optional[str] = BudgetOpt,
    device: str = DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
    quiet: bool = QuietOpt,
) -> None:
    """Examples whose given label their kernel neighbours disagree with, most suspicious first.

    Each row gives the score (higher is more suspicious; see --score), the label the
    neighbours vote for, the given label and the nearest training examples. An example is flagged when the vote goes to another label with
    more than half of the weight. --labels audits a labelling other than the stored one.

    Example: ensemble-kernel label-issues demo-output/store --split train --out issues.csv
    """
    started = time.perf_counter()
    with _user_errors():
        _check_precision(precision)
        for path, option, suffix in ((out, "--out", ".csv"), (graph, "--knn-graph", ".npz"),
                                     (probabilities, "--probabilities", ".npy")):
            if path is not None:
                if path.suffix.lower() != suffix:
                    raise InputError(f"{option} must name a {suffix} file, got {path}")
                check_output_file(path, option)
        check_outputs_apart([("--out", out), ("--knn-graph", graph),
                             ("--probabilities", probabilities)], inputs_of(src, labels=labels))
        budget = parse_size(memory_budget) if memory_budget else None
        runset, chosen = _open(src, labels, runs, needs_test=split == "test")
        require_train(runset, "label-issues")
        given = runset.labels_train if split == "train" else runset.labels_test
        for which, have in (("train", runset.labels_train), (split, given)):
            if have is None:
                raise InputError(f"label-issues --split {split} needs {which} labels, and "
                                 f"{', '.join(map(str, src))} carries none: pass --labels "
                                 f"FILE.npz with labels_train and labels_test "
                                 f"({LABELS_HINT})")
        check_k_for_split(k, split, runset.train.n_examples)
        audited = runset.train if split == "train" else runset.test
        if graph is not None and k > audited.n_examples - 1:
            raise InputError(f"--knn-graph needs --k at most {audited.n_examples - 1} (the "
                             f"{split} examples minus one), got {k}")
        with _progress_bar(quiet or as_json) as report:
            found = label_issues(runset.train, runset.test, runset.labels_train,
                                 runset.labels_test, split=split, k=k, power=power,
                                 score=score, precision=precision, memory_budget=budget,
                                 device=device, progress=report)
            matrix = (knn_graph(audited, k, precision=precision, memory_budget=budget,
                                device=device) if graph is not None else None)
        options = {"split": split, "k": k, "power": power, "score": score,
                   "precision": precision, "memory_budget": budget, "device": device,
                   "labels": str(labels) if labels else None, "code": code,
                   "test_key": test_key}
        meta = _meta(options, runset, chosen, started)
        if out is not None:
            atomic_write_text(out, issues_csv(found))
        if matrix is not None:
            from scipy.sparse import save_npz

            atomic_write(graph, lambda f: save_npz(f, matrix, compressed=False))
        if probabilities is not None:
            atomic_write(probabilities, lambda f: np.save(f, found.vote_probabilities.numpy()))
    if as_json:
        typer.echo(json.dumps({**issues_json(found), "meta": meta}, indent=2))
        return
    typer.echo(f"{found.n_flagged} of {len(found.order)} {split} examples flagged "
               f"(the vote goes to another label with more than half of the weight)")
    typer.echo(f"{'rank':>5} {'index':>7} {'score':>7} {'given':>6} {'voted':>6}  neighbours")
    for rank, row in enumerate(issue_rows(found)[:top]):
        typer.echo(f"{rank:>5} {row['index']:>7} {row['score']:>7.4f} {row['given_label']:>6} "
                   f"{row['voted_label']:>6}  {' '.join(map(str, row['neighbors']))}")
    if not quiet:
        written = [str(p) for p in (out, graph, probabilities) if p is not None]
        if written:
            err.print("wrote " + ", ".join(written))


def issue_rows(found: LabelIssues) -> list[dict]:
    """One dict per example, most suspicious first (`LabelIssues.rows`)."""
    return found.rows(SHOWN_NEIGHBORS)


def issues_json(found: LabelIssues) -> dict:
    """What --json prints: the parameters, the threshold rule and every row."""
    return {"split": found.split, "score": found.score, "k": found.k, "power": found.power,
            "n_examples": len(found.order), "n_flagged": found.n_flagged,
            "threshold": "flagged: voted_label != given_label and vote_share_voted > 0.5",
            "rows": issue_rows(found)}


def issues_csv(found: LabelIssues) -> str:
    """The --out file: a header and one row per example, most suspicious first."""
    buffer = io.StringIO()
    buffer.write("rank,index,score,given_label,voted_label,vote_share_given,vote_share_voted,"
                 "flagged,neighbors\n")
    for rank, r in enumerate(issue_rows(found)):
        buffer.write(f"{rank},{r['index']},{r['score']:.9g},{r['given_label']},"
                     f"{r['voted_label']},{r['vote_share_given']:.9g},"
                     f"{r['vote_share_voted']:.9g},{int(r['flagged'])},"
                     f"{' '.join(map(str, r['neighbors']))}\n")
    return buffer.getvalue()
