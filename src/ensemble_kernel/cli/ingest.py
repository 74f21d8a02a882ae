"""ingest and info: the store's commands."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer

from ..storage._configs import NO_CODE, SHOWN, code_groups, describe_groups, resolve_code, warn_if_mixed
from ..core._engine import Progress
from ..errors import EnsembleKernelError, InputError, StoreError
from ..storage._formats import (file_hash, find_run_files, open_runs, read_extras, read_labels,
                       read_run_file)
from ..storage._store import RunStore, StoreSpec, _is_url, check_array, check_runs, content_key, is_store
from ..storage._precision import SAMPLE_RUNS, RoundingCheck
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
    code: Optional[str] = typer.Option(None, "--code", metavar="HASH-PREFIX",
                                       help="Ingest only the files of one training "
                                            "configuration: the first hex digits of its code "
                                            "sha256. Without it, files whose code differs are "
                                            "ingested together, with a warning."),
    test_key: Optional[str] = typer.Option(None, "--test-key", metavar="KEY",
                                           help="The array of each file that holds the test "
                                                "split, e.g. logits_tta; default logits."),
    repair: bool = typer.Option(False, "--repair", help="Mend a damaged store instead: "
                                "rewrite the runs, record and index of each file whose "
                                "SHA-256 a record keeps, where they differ from the file."),
    quiet: bool = QuietOpt,
) -> None:
    """Create a store or append runs to it, one source file per atomic commit.

    First every file (except those already stored, found by content hash) and every
    --labels, --inputs, --features and --class-names is checked against the store and
    against each other; if any is refused, nothing is written. Then the store is created
    (with those arrays) or they are committed to it, and each file is committed in turn.
    A killed ingest leaves exactly what it committed before; an error after a commit (a
    file changed since it was checked, a full disk) says what was kept. Running the same
    command again skips the files stored (by content hash) and adds the rest. Several
    ingests may append to one store at once.
    """
    with _user_errors():
        files = [f for s in src for f in find_run_files(s)]
        if repair:
            _repair(store, files, test_key, quiet,
                    other=[flag for flag, given in (("--labels", labels), ("--inputs", inputs),
                                                    ("--features", features), ("--code", code),
                                                    ("--dtype", dtype),
                                                    ("--class-names", class_names),
                                                    ("--allow-duplicates", allow_duplicates))
                           if given])
            return
        files = _by_code(files, code, test_key, ", ".join(map(str, src)))
        names = tuple(class_names.split(",")) if class_names else None
        # ---- 1. check everything; nothing is written here --------------------------------
        if is_store(store):
            target = RunStore(store)
            target.check_options(dtype=dtype, class_names=names)
            spec, where = target.spec, f"the store {store}"
        else:
            target, first = None, read_run_file(files[0], test_key=test_key)
            spec = StoreSpec(first.train.shape[1], first.test.shape[1], first.train.shape[2],
                             dtype or "float16", names)
            del first
            where = f"the new store {store}"
        extras = _extras(spec, labels, inputs, features)
        if target is not None:
            target.check_arrays(extras, "given")
        with _progress_bar(quiet) as report:
            codes = _check_files(spec, target, files, extras, where, allow_duplicates, report,
                                 test_key)
            if code is None:
                _warn_mixed(codes, target, ", ".join(map(str, src)))
            # ---- 2. write: the store (or the given arrays), then one commit per file -----
            done = _Done(store)
            try:
                if target is None:
                    target = RunStore.open_or_create(store, spec, arrays=extras)
                    done.store = True
                else:
                    done.arrays = target.set_arrays(extras)
                added = skipped = 0
                for i, f in enumerate(files):
                    result = target.append_file(f, allow_duplicates=allow_duplicates,
                                                test_key=test_key, check_precision=False)
                    if result.status == "skipped":
                        skipped += 1
                        err.print(f"skipped {f}: its content is already in the store "
                                  "(--allow-duplicates adds it anyway)", markup=False,
                                  soft_wrap=True)
                    else:
                        added += result.runs[1] - result.runs[0]
                        done.files += 1
                    if report is not None:
                        report(Progress("ingest", i + 1, len(files), 0, 1, 0.0))
            except (EnsembleKernelError, OSError) as e:
                done.fail(e)
    if not quiet:
        err.print(f"{store}: {target.n_models} runs ({added} added, {skipped} files skipped)")


def _repair(store: Path, files: List[Path], test_key: Optional[str], quiet: bool,
            other: List[str]) -> None:
    """ingest --repair: each file mends what its record names (`store_verify.repair_file`)."""
    from ..storage._verify import repair_file

    if other:
        raise InputError(f"--repair takes run files and --test-key only, not {other[0]}")
    if not is_store(store):
        raise InputError(f"{store}: no store to repair (--repair mends a store made by ingest)")
    target = RunStore(store)
    missing = []
    for f in files:
        result = repair_file(target, f, test_key=test_key)
        if result.status == "not in the store":
            missing.append(str(f))
        elif not quiet:
            a, b = result.runs
            what = (f"rewrote {len(result.rewritten)} file"
                    f"{'s' if len(result.rewritten) != 1 else ''}" if result.rewritten
                    else "intact")
            err.print(f"{f}: runs {a}..{b - 1} {what}", markup=False, soft_wrap=True)
    if missing:
        raise InputError(f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
                         f": no record of {store} keeps its SHA-256, so it cannot repair it "
                         "(ingest it without --repair to add it)")


def _by_code(files: List[Path], code: Optional[str], test_key: Optional[str],
             where: str) -> List[Path]:
    """The files of the training configuration `code` selects (all files without it)."""
    if code is None:
        return files
    hashes = [read_run_file(f, test_key=test_key).code_sha256 for f in files]
    chosen = resolve_code(code, code_groups([(h, 1) for h in hashes]), where)
    return [f for f, h in zip(files, hashes) if h == chosen]


def _warn_mixed(new: set, store: Optional[RunStore], where: str) -> None:
    """One warning when the new files, with the store's code (one folder per distinct
    code, so no record is read), mix training configurations."""
    folder = store.path / "code" if store is not None and not _is_url(store.path) else None
    stored = {p.name for p in folder.iterdir() if p.is_dir()} if folder and folder.is_dir() \
        else set()
    mixed = sorted(new | stored, key=lambda h: (h is None, h or ""))
    if len(mixed) > 1:
        warnings.warn(f"{where}{' with the store' if stored - new else ''} mixes "
                      f"{len(mixed)} training configurations (code sha256 "
                      f"{', '.join(_short(h) for h in mixed)}); pass --code PREFIX to ingest "
                      "one")


def _short(sha: Optional[str]) -> str:
    return NO_CODE if sha is None else sha[:SHOWN]


def _check_files(spec: StoreSpec, target: Optional[RunStore], files: List[Path], extras: dict,
                 where: str, allow_duplicates: bool, report, test_key: Optional[str] = None
                 ) -> set:
    """Every file as its append would check it, writing nothing: shapes, finite values,
    the dtype's range, its labels against the store's, --labels and the files before it.

    One file at a time (memory-mapped where the format allows), dropped once checked.
    A file already stored is skipped by its content hash without reading its runs.
    Returns the code hashes (None: no code) of the files read.
    """
    codes = set()
    known = {}  # split -> (labels, where they come from)
    for split in ("train", "test"):
        name = f"labels_{split}"
        stored = target.optional(name) if target is not None else None
        if stored is not None:
            known[split] = (stored, f"the store {target.path}")
        elif name in extras:
            known[split] = (extras[name], "--labels")
    rounding = (target.rounding_check() if target is not None else
                RoundingCheck(spec.dtype, where.removeprefix("the new store ")))
    for i, f in enumerate(files):
        if target is None or allow_duplicates or target.committed_runs(
                content_key({"sha256": file_hash(f), "test_key": test_key})) is None:
            run = read_run_file(f, test_key=test_key)
            codes.add(run.code_sha256)
            train, test = check_runs(spec, run.train, run.test, str(f), where)
            rounding.check(torch.cat([train[:SAMPLE_RUNS], test[:SAMPLE_RUNS]], dim=1), str(f))
            for split in ("train", "test"):
                mine = getattr(run, f"labels_{split}")
                if mine is None:
                    continue
                mine = check_array(spec, f"labels_{split}", mine, str(f))
                if split not in known:
                    known[split] = (mine, str(f))
                elif not np.array_equal(mine, known[split][0]):
                    raise InputError(f"{f}: its {split} labels differ from those of "
                                     f"{known[split][1]}; nothing was written")
            del run
        if report is not None:
            report(Progress("check", i + 1, len(files), 0, 1, 0.0))
    return codes


class _Done:
    """What this ingest has committed so far, for an error that comes after it."""

    def __init__(self, store: Path):
        self.path, self.store, self.arrays, self.files = store, False, [], 0

    def fail(self, e: BaseException) -> None:
        if isinstance(e, OSError) and not isinstance(e, EnsembleKernelError):
            text = f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": ")
        else:
            text = str(e)
        if not (self.store or self.arrays or self.files):
            raise e
        parts = (["the new store"] if self.store else []) + \
            ([", ".join(self.arrays)] if self.arrays else []) + \
            ([f"{self.files} file{'s' if self.files != 1 else ''}"] if self.files else [])
        text = text.replace("; nothing was written", "")
        raise StoreError(f"{text}; {self.path} keeps what this ingest committed before it "
                         f"({', '.join(parts)}); fix the cause and run the same command "
                         "again to add the rest") from e


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


@app.command("info")
def info_cmd(
    src: List[Path] = typer.Argument(..., help="A store made by ingest, or run files: .pt or "
                                     ".npz files, or directories searched for .pt files.",
                                     show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    runs: bool = typer.Option(False, "--runs", help="List the run records (files) too."),
    test_key: Optional[str] = typer.Option(None, "--test-key", metavar="KEY",
                                           help="Run files: the array that holds the test "
                                                "split, e.g. logits_tta; default logits."),
) -> None:
    """What a store or run files hold: runs, splits, dtype, labels, training configurations.

    The training configurations are the distinct `code` strings of the runs, by SHA-256
    and run count; pass the first digits to any command's --code to use one. A store
    also shows its shapes, size, inputs and features.

    Example: ensemble-kernel info logs_saveoutputs_main/
    """
    with _user_errors():
        if len(src) == 1 and is_store(src[0]):
            if test_key is not None:
                raise InputError(f"--test-key {test_key} applies to run files, but {src[0]} is a "
                                 "store (it keeps the test split ingested)")
            out = _store_info(src[0], runs)
        else:
            out = _files_info(src, runs, test_key)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    splits, codes = out["splits"], {c["code_sha256"]: c["n_runs"] for c in out["codes"]}
    store = "format_version" in out
    size = f", {out['size_bytes'] / 2**20:.1f} MiB" if store else ""
    typer.echo(f"{out['path']}: {out['n_models']} runs from {out['n_sources']} files, "
               f"{out['n_classes']} classes, logits {out['dtype']}{size}")
    present = {k: out[f"has_{k}"] for k in ("labels", "inputs", "features") if f"has_{k}" in out}
    typer.echo(f"  train {splits['train']} examples, test {splits['test']} examples; "
               + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in present.items()))
    if store:
        typer.echo("  shapes: " + ", ".join(f"{name} {tuple(shape)}"
                                             for name, shape in out["shapes"].items()))
    if splits["train"] == 0:
        typer.echo("  one split only (no train split): evaluate, neighbors and duplicates "
                   "work within the test split")
    typer.echo(f"  training code (sha256, select with --code PREFIX): {describe_groups(codes)}")
    for r in out.get("records", []):
        seeds = r.get("seeds")
        seed_text = ("-" if not seeds else str(seeds[0]) if len(seeds) == 1
                     else f"{seeds[0]}..{seeds[-1]}")
        code = r.get("code_sha256")
        typer.echo(f"  runs {r['runs'][0]}..{r['runs'][1] - 1}: {r['source']}"
                   + (f" sha256 {r['sha256'][:12]} seeds {seed_text}" if "sha256" in r else "")
                   + f" code {_short(code)}")


def _store_info(store: Path, runs: bool) -> dict:
    target = RunStore(store)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    splits = {s: target.source(s).n_examples for s in ("train", "test")}
    shapes = target.shapes()  # the committed arrays, without reading them
    present = {name: f"{name}_train" in shapes for name in ("labels", "inputs", "features")}
    records = target.records()
    codes = code_groups([(r.get("code_sha256"), r["runs"][1] - r["runs"][0]) for r in records])
    warn_if_mixed(codes, str(store))
    out = {"path": str(store), "format_version": target.attrs["format_version"],
           "n_models": target.n_models, "n_classes": target.n_classes,
           "class_names": target.class_names, "splits": splits,
           "dtype": target.dtype,
           "size_bytes": size, **{f"has_{k}": v for k, v in present.items()},
           "n_sources": len(records), "shapes": shapes,
           "codes": [{"code_sha256": sha, "n_runs": n} for sha, n in codes.items()]}
    if runs:
        out["records"] = records
    return out


def _files_info(src: List[Path], runs: bool, test_key: Optional[str]) -> dict:
    """info on run files: read as every command reads them (memory-mapped, no logits
    loaded), one warning if their training code differs."""
    files = [f for s in src for f in find_run_files(s)]
    read = [read_run_file(f, test_key=test_key) for f in files]
    runset = open_runs(src, test_key=test_key)  # the checks every command makes; warns
    out = {"path": ", ".join(map(str, src)), "n_models": runset.n_models,
           "n_classes": runset.n_classes,
           "splits": {"train": runset.train.n_examples, "test": runset.test.n_examples},
           "dtype": str(read[0].test.dtype).replace("torch.", ""),
           "has_labels": runset.labels_test is not None, "n_sources": len(files),
           "codes": [{"code_sha256": sha, "n_runs": n} for sha, n in runset.codes.items()]}
    if runs:
        starts = np.cumsum([0] + [r.n_runs for r in read])
        out["records"] = [{"source": str(r.path), "runs": [int(a), int(a) + r.n_runs],
                           "code_sha256": r.code_sha256} for r, a in zip(read, starts)]
    return out


@app.command("verify")
def verify_cmd(
    store: Path = typer.Argument(..., help="The store to check.", show_default=False),
    sources: Optional[List[Path]] = typer.Argument(
        None, help="Run files (or directories of .pt files) to compare with what the store "
                   "holds: each file's SHA-256 against its record, and its runs' values.",
        show_default=False),
    quiet: bool = QuietOpt,
) -> None:
    """Check a whole store: every chunk, checksum, record and index entry.

    Reads every chunk of every array once and checks its CRC-32C, every metadata file
    against its seal, the records against the committed runs, and the index and the
    training code against the records. Given run files, checks each one's SHA-256
    against the records and its runs against the stored values.

    Exit status 0 when everything agrees; otherwise each problem is printed, one line
    each, with its fix, and the exit status is 2. Damaged runs are mended with
    `ensemble-kernel ingest FILE --store STORE --repair`.
    """
    from ..storage._verify import verify_store

    with _user_errors():
        _require_store(store, "verify checks a store made by ingest")
        files = [f for s in (sources or []) for f in find_run_files(s)]
        with _progress_bar(quiet) as report:
            def progress(done: int, total: int) -> None:
                if report is not None:
                    report(Progress("verify", done, total, 0, 1, 0.0))
            result = verify_store(store, files, progress=progress)
    for problem in result.problems:
        err.print(f"problem: {problem}", markup=False, soft_wrap=True, highlight=False)
    summary = (f"{store}: {result.n_runs} runs, {result.chunks} logits chunks, "
               f"{len(result.arrays)} other arrays, {result.records} records"
               + (f", {result.sources} run files" if result.sources else "") + " checked: ")
    if result.ok:
        if not quiet:
            err.print(summary + "all agree", markup=False, soft_wrap=True, highlight=False)
        return
    err.print(summary + f"{len(result.problems)} problem"
              f"{'s' if len(result.problems) != 1 else ''}", markup=False, soft_wrap=True,
              highlight=False)
    raise typer.Exit(2)


@app.command("upgrade")
def upgrade_cmd(
    store: Path = typer.Argument(..., help="A store of an earlier format.", show_default=False),
    sources: Optional[List[Path]] = typer.Argument(
        None, help="Its run files: compared with the stored values first (recommended: a "
                   "store without checksums may hold damage the upgrade would seal).",
        show_default=False),
    quiet: bool = QuietOpt,
) -> None:
    """Rewrite a store of format 1 or 2 as format 3, whose chunks carry checksums.

    Builds a whole copy beside the store (it needs as much free disk as the store
    takes), then swaps it in with one atomic rename: a kill at any point leaves the old
    store or the new one. Takes about as long as reading and writing the store once.

    An old store carries no checksums, so damage already in it would be sealed into
    the new one: given the run files, their SHA-256 and values are compared with the
    store first (as `verify STORE FILE...` does), and any difference refuses the upgrade.
    """
    from ..storage._verify import upgrade_store, verify_store

    with _user_errors():
        _require_store(store, "upgrade rewrites a store made by ingest")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 'no checksums' warning: we are upgrading
            before = RunStore(store)
        if before.checked:
            if not quiet:
                err.print(f"{store}: already format {before.attrs['format_version']}; nothing "
                          "to do", markup=False)
            return
        files = [f for s in (sources or []) for f in find_run_files(s)]
        if files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = [p for p in verify_store(store, files).problems
                         if "carries no checksums" not in p]
            if found:
                raise InputError(f"{found[0]}; not upgraded ({len(found)} problem"
                                 f"{'s' if len(found) != 1 else ''}: see `ensemble-kernel "
                                 f"verify {store}` with the run files)")
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        free = os.statvfs(store.parent).f_bavail * os.statvfs(store.parent).f_frsize
        if free < size * 1.05:
            raise InputError(f"{store}: the upgrade copies the store ({size / 2**30:.2f} GiB) "
                             f"beside it, but {store.parent} has {free / 2**30:.2f} GiB free")
        with _progress_bar(quiet) as report, warnings.catch_warnings():
            warnings.simplefilter("ignore")

            def progress(done: int, total: int) -> None:
                if report is not None:
                    report(Progress("upgrade", done, total, 0, 1, 0.0))
            version = upgrade_store(store, progress=progress)
    if not quiet:
        checked = (f"its values checked against {len(files)} run files" if files else
                   "its values were not compared with its run files: `ensemble-kernel "
                   f"verify {store} FILE...` does")
        err.print(f"{store}: upgraded from format {version} to 3 ({size / 2**20:.1f} MiB "
                  f"rewritten; {checked})", markup=False, soft_wrap=True)


def _require_store(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such store ({what})")
    if not is_store(path):
        raise InputError(f"{path}: not an ensemble-kernel store ({what})")
