"""The views as tables and images, the self-contained HTML report, and their files.

`build_views` computes everything from the neighbours; `render_report` returns the HTML
(images embedded as base64, no network, text from data escaped by jinja2); `write_*`
functions write PNG and CSV/JSON files atomically.
"""

from __future__ import annotations

import base64
import csv
import datetime
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jinja2
from PIL import Image

from .. import __version__
from .._atomic import atomic_write, atomic_write_text
from ..analysis._explain import (Comparison, Duplicates, Failure, Pair, compare_neighbors, failures,
                       near_duplicates, similar_pairs)
from ..core._neighbors import Neighbors
from .grids import InputRenderer, render_comparison, render_failures, render_pairs
from .plots import plot_threshold

__all__ = ["Table", "Views", "build_views", "render_report", "write_views", "png_bytes"]


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A header and rows as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple, ...]

    def to_csv(self) -> str:
        return csv_text(self.header, self.rows)


@dataclass(frozen=True)
class Views:
    """Everything the report shows besides accuracy: data, images and tables."""

    pairs: tuple[Pair, ...]
    pair_ranks: str
    duplicates: Duplicates
    failures: tuple[Failure, ...]
    comparisons: tuple[Comparison, ...] | None
    images: dict  # name -> PIL.Image or matplotlib Figure
    tables: dict  # name -> Table


def _name(label, class_names) -> str:
    if label is None:
        return ""
    return class_names[label] if class_names else str(label)


def build_views(neighbors: Neighbors, *, labels_train, labels_test, renderer: InputRenderer,
                class_names: Sequence[str] | None = None, ranks: slice = slice(0, 48),
                threshold: float | None = None, top_duplicates: int | None = None,
                top_failures: int = 8, n_failure_neighbors: int = 9, features_train=None,
                features_test=None, n_compare: int = 10, seed: int = 0,
                n_models: int | None = None) -> Views:
    """Compute pairs, near-duplicates, failures and (with features) the comparison."""
    names = class_names
    pairs = similar_pairs(neighbors, ranks, labels_train, labels_test)
    dups = near_duplicates(neighbors, threshold=threshold, top=top_duplicates,
                           labels_train=labels_train, labels_test=labels_test,
                           n_models=n_models)
    fails = (failures(neighbors, labels_train, labels_test, top=top_failures,
                      n_neighbors=n_failure_neighbors)
             if labels_train is not None and labels_test is not None and top_failures > 0
             else [])
    comps = (compare_neighbors(neighbors, features_train, features_test, n_examples=n_compare,
                               seed=seed, labels_test=labels_test)
             if features_train is not None and features_test is not None else None)
    pair_rows = tuple((p.rank, p.test_index, p.train_index, f"{p.value:.6f}",
                       _name(p.test_label, names), _name(p.train_label, names)) for p in pairs)
    tables = {
        "pairs": Table(("rank", "test index", "train index", "K", "test label", "train label"),
                       pair_rows),
        "duplicates": Table(("rank", "test index", "train index", "K", "test label",
                             "train label"),
                            tuple((p.rank, p.test_index, p.train_index, f"{p.value:.6f}",
                                   _name(p.test_label, names), _name(p.train_label, names))
                                  for p in dups.pairs)),
        "failures": Table(("test index", "test label", "K of best match", "nearest (index:label)"),
                          tuple((f.pair.test_index, _name(f.pair.test_label, names),
                                 f"{f.pair.value:.6f}",
                                 " ".join(f"{i}:{_name(lab, names)}" for i, lab in
                                          zip(f.neighbor_indices, f.neighbor_labels)))
                                for f in fails)),
    }
    images = {"duplicates_threshold": plot_threshold(dups.top1_values, dups.threshold,
                                                     dups.method)}
    if renderer.has_inputs:
        images["pairs"] = render_pairs(pairs, renderer, names)
        if fails:
            images["failures"] = render_failures(fails, renderer, names)
        if comps:
            images["compare"] = render_comparison(comps, renderer, labels_train, names)
    if comps:
        tables["compare"] = Table(
            ("test index", "kernel neighbours (index:K)", "feature neighbours (index:cosine)"),
            tuple((c.test_index, " ".join(f"{i}:{v:.3f}" for i, v in c.kernel),
                   " ".join(f"{i}:{v:.3f}" for i, v in c.features)) for c in comps))
    return Views(tuple(pairs), f"{ranks.start}:{ranks.stop}", dups, tuple(fails),
                 tuple(comps) if comps else None, images, tables)


def png_bytes(image) -> bytes:
    """PNG bytes of a PIL image or a matplotlib Figure."""
    buffer = io.BytesIO()
    if isinstance(image, Image.Image):
        image.save(buffer, format="PNG")
    else:
        image.savefig(buffer, format="png")
    return buffer.getvalue()


def _b64(image) -> str | None:
    return None if image is None else base64.b64encode(png_bytes(image)).decode("ascii")


def render_report(*, views: Views, accuracy: Sequence[tuple[str, float]], source: str,
                  n_models: int, n_train: int, n_test: int, sweep_figure=None,
                  significance=None, ablations: dict | None = None, sweep_note: str = "",
                  sweep_error: float = 0.0,
                  has_inputs: bool = True, title: str = "ensemble-kernel report",
                  sections: Sequence[str] = ()) -> str:
    """The whole report as one self-contained HTML string; `sections` are HTML blocks
    (already escaped, e.g. `report.labels.render_label_section`) placed after the views."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("ensemble_kernel", "report"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.get_template("template.html")
    return template.render(
        title=title, source=source, n_models=n_models, n_train=n_train, n_test=n_test,
        version=__version__, when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        accuracy=list(accuracy), sweep_png=_b64(sweep_figure), significance=significance,
        ablations=sorted((ablations or {}).items()), sweep_note=sweep_note,
        sweep_error=sweep_error, pair_ranks=views.pair_ranks,
        pairs_png=_b64(views.images.get("pairs")), pairs_table=views.tables["pairs"],
        dup_method=views.duplicates.method, dup_count=len(views.duplicates.pairs),
        dup_png=_b64(views.images["duplicates_threshold"]), dup_table=views.tables["duplicates"],
        failures_png=_b64(views.images.get("failures")), failures_table=views.tables["failures"],
        compare_png=_b64(views.images.get("compare")), has_inputs=has_inputs,
        sections=list(sections),
    )


def write_views(views: Views, folder: Path, names: Sequence[str] | None = None) -> list[Path]:
    """Each figure as NAME.png and each table as NAME.csv (duplicates also as JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in views.images.items():
        if names is None or name in names or name.split("_")[0] in names:
            path = folder / f"{name}.png"
            atomic_write(path, lambda f, image=image: f.write(png_bytes(image)))
            written.append(path)
    for name, table in views.tables.items():
        if names is None or name in names:
            path = folder / f"{name}.csv"
            atomic_write_text(path, table.to_csv())
            written.append(path)
    if names is None or "duplicates" in names:
        path = folder / "duplicates.json"
        d = views.duplicates
        atomic_write_text(path, json.dumps({
            "threshold": d.threshold, "method": d.method,
            "pairs": [p.__dict__ for p in d.pairs]}, indent=2))
        written.append(path)
    return written
