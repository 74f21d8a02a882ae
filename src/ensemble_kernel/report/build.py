"""The whole report: evaluate, sweep and draw every view; write OUT.html and OUT_files/."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .._atomic import atomic_write, atomic_write_text
from ..analysis._evaluation import Evaluation, evaluate
from ..core._neighbors import Neighbors
from ..core._sources import LogitSource
from ..core._engine import KeptStatistics, ProgressCallback
from ..analysis._sweep import DEFAULT_MAX_SUBSETS, DEFAULT_TEST_EXAMPLES, SweepResult, sweep
from .files import write_sweep
from .grids import InputRenderer
from .html import build_views, render_report, write_views
from .labels import LabelSection, build_label_section, render_label_section
from .plots import plot_sweep

__all__ = ["build_report"]


def build_report(train: LogitSource, test: LogitSource, labels_train, labels_test, *,
                 found: Neighbors, out: Path, source: str, renderer: InputRenderer,
                 class_names: Sequence[str] | None = None, features_train=None,
                 features_test=None, ranks: slice = slice(0, 48),
                 evaluation: Evaluation | None = None, sweep_result: SweepResult | None = None,
                 precision: str = "auto", memory_budget: int | None = None,
                 device: str = "cpu", max_subsets: int | None = DEFAULT_MAX_SUBSETS,
                 test_examples: int | None = DEFAULT_TEST_EXAMPLES,
                 progress: ProgressCallback | None = None,
                 kept_statistics: KeptStatistics | None = None) -> list[Path]:
    """Write the self-contained HTML report `out` and its PNG/CSV files; return the paths.

    `found` are the test -> train neighbours (k >= 20 for the weighted vote and the
    failures); `evaluation` and `sweep_result` are computed when not given, within
    `memory_budget` bytes (what the caller holds, `found` and the inputs, is the
    caller's to take off) and on `device`. `max_subsets` caps the sweep's disjoint
    subsets per run count (None: all of them), `test_examples` the test examples it and
    its ablations use (None: all; see `sweeps.sweep`); `progress` receives the sweep's
    stages; `kept_statistics` are the train statistics of the pass that found `found`, if kept
    (`engine.KeptStatistics`, counted in the caller's budget), for the ablations.
    """
    e = evaluation or evaluate(train, test, labels_train, labels_test, neighbors=found,
                               memory_budget=memory_budget, device=device)
    result = sweep_result or sweep(train, test, labels_train, labels_test, precision=precision,
                                   memory_budget=memory_budget, device=device,
                                   neighbors=found, max_subsets=max_subsets,
                                   test_examples=test_examples, progress=progress,
                                   kept_statistics=kept_statistics)
    views = build_views(found, labels_train=labels_train, labels_test=labels_test,
                        renderer=renderer, class_names=class_names, ranks=ranks,
                        features_train=features_train, features_test=features_test,
                        n_models=train.n_models)
    files = out.with_name(out.stem + "_files")
    written = write_views(views, files) + write_sweep(result, files)
    accuracy = [("average single model", e.single_model_accuracy),
                (f"ensemble average ({e.n_models} runs)", e.ensemble_accuracy),
                (f"kernel k-NN (k={e.k})", e.knn_accuracy),
                (f"weighted vote (k={e.weighted_k}, K**{e.power})", e.weighted_accuracy)]
    label_section = _label_section(train, test, labels_train, labels_test, found, renderer,
                                   class_names)
    html = render_report(
        views=views, source=source, n_models=train.n_models, n_train=train.n_examples,
        n_test=test.n_examples, accuracy=accuracy, sweep_figure=plot_sweep(result),
        significance=result.significance, ablations=result.ablations,
        sweep_note=result.sample_note(), sweep_error=100 * result.standard_error(),
        has_inputs=renderer.has_inputs, sections=[render_label_section(label_section)])
    atomic_write_text(out, html)
    written += _write_label_section(label_section, files)
    accuracy_csv = files / "accuracy.csv"
    atomic_write_text(accuracy_csv, "method,accuracy\n" + "".join(
        f"{name},{value}\n" for name, value in accuracy))
    return written + [accuracy_csv, out]


def _label_section(train, test, labels_train, labels_test, found: Neighbors,
                   renderer: InputRenderer, class_names) -> LabelSection:
    """The test split's label issues from the neighbours the report already has (issue 11)."""
    from ..analysis._label_issues import label_issues

    issues = label_issues(train, test, labels_train, labels_test, split="test",
                          k=min(20, found.k), neighbors=found)
    return build_label_section(issues, renderer, labels_train, class_names)


def _write_label_section(section: LabelSection, files: Path) -> list[Path]:
    path = files / "label_issues.csv"
    atomic_write_text(path, section.to_csv())
    written = [path]
    if section.image is not None:
        from .html import png_bytes

        image = files / "label_issues.png"
        atomic_write(image, lambda f: f.write(png_bytes(section.image)))
        written.append(image)
    return written
