"""ingest and info: the store's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from ..engine import Progress
from ..errors import InputError
from ..formats import find_run_files, read_extras, read_labels, read_run_file
from ..store import RunStore, StoreSpec, check_array, check_runs, is_store
from .common import LabelsOpt, QuietOpt, _progress_bar, _user_errors, app, choice, err


_DTYPE = choice("--dtype", ("float16", "float32"))


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
    dtype: Optional[str] = typer.Option(
        None, "--dtype", callback=lambda v: v if v is None else _DTYPE(v),
        help="How a new store keeps logits: float16 (default) or float32 (bfloat16 sources "
             "are widened to float32 first)."),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates",
                                          help="Add files whose content is already stored."),
    quiet: bool = QuietOpt,
) -> None:
    """Create a store or append runs to it, one source file per atomic commit.

    Everything given is checked before the first byte is written. A killed ingest leaves
    exactly the files committed before it; running the same command again skips those
    (by content hash) and adds the rest. Several ingests may append to one store at once.
    """
    with _user_errors():
        files = [f for s in src for f in find_run_files(s)]
        names = tuple(class_names.split(",")) if class_names else None
        if is_store(store):
            target = RunStore(store)
            target.check_options(dtype=dtype, class_names=names)
            spec = target.spec
        else:
            target, first = None, read_run_file(files[0])
            spec = StoreSpec(first.train.shape[1], first.test.shape[1], first.train.shape[2],
                             dtype or "float16", names)
            check_runs(spec, first.train, first.test, str(files[0]), f"the new store {store}")
        extras = _extras(spec, labels, inputs, features)
        if target is None:
            _check_first_labels(spec, first, extras)
            target = RunStore.open_or_create(store, spec, arrays=extras)
        else:
            target.set_arrays(extras)
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


def _extras(spec: StoreSpec, labels: Optional[Path], inputs: Optional[Path],
            features: Optional[Path]) -> dict:
    """--labels, --inputs and --features as optional arrays, each checked against `spec`."""
    out = {}
    if labels is not None:
        out["labels_train"], out["labels_test"] = read_labels(labels)
        for name in ("labels_train", "labels_test"):
            out[name] = check_array(spec, name, out[name], str(labels))
    sizes = {"train": spec.n_train, "test": spec.n_test}
    for kind, path in (("inputs", inputs), ("features", features)):
        if path is not None:
            out.update(read_extras(path, kind, sizes))
    return out


def _check_first_labels(spec: StoreSpec, first, extras: dict) -> None:
    """A new store: the first file's labels must be valid and agree with --labels."""
    for split in ("train", "test"):
        mine = getattr(first, f"labels_{split}")
        if mine is None:
            continue
        name = f"labels_{split}"
        mine = check_array(spec, name, mine, str(first.path))
        if name in extras and not np.array_equal(mine, extras[name]):
            raise InputError(f"{first.path}: its {split} labels differ from those of --labels; "
                             "nothing was written")


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
               "n_sources": len(records), "shapes": target.shapes()}
        if runs:
            out["records"] = records
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{store}: {out['n_models']} runs from {out['n_sources']} files, "
               f"{out['n_classes']} classes, logits {out['dtype']}, {size / 2**20:.1f} MiB")
    typer.echo(f"  train {splits['train']} examples, test {splits['test']} examples; "
               + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in present.items()))
    typer.echo("  shapes: " + ", ".join(f"{name} {tuple(shape)}"
                                         for name, shape in out["shapes"].items()))
    for r in out.get("records", []):
        seeds = r.get("seeds")
        seed_text = ("-" if not seeds else str(seeds[0]) if len(seeds) == 1
                     else f"{seeds[0]}..{seeds[-1]}")
        typer.echo(f"  runs {r['runs'][0]}..{r['runs'][1] - 1}: {r['source']} "
                   f"sha256 {r['sha256'][:12]} seeds {seed_text}")
