"""Fuzz a store: damage every file of a small valid store, one mutation at a time, and check
that every reading command gives exactly the undamaged results or a one-line error.

For every file of the store (chunks, metadata, records, index, code, the lock), each
mutation: delete it, truncate it (to half, and to nothing), flip one byte (at seeded
positions), and, for a zarr.json, replace it with garbage JSON. After each, `info`,
`evaluate`, `neighbors`, `label-issues` and `compare` run in-process; each must either
exit 0 with the same output as on the undamaged store, or exit 2 with one line on stderr
that names the damaged file. A traceback, another number or a silent success on damage
that changed a result fails the case.

    python benchmarks/store_fuzz.py              # every file, every mutation
    python benchmarks/store_fuzz.py --sample 40  # a seeded sample (what make test runs)

Prints one line per failing case and a summary; exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"

COMMANDS = {  # name -> arguments after SRC; '{out}' is a fresh output path
    "info": ["info", "{store}", "--json"],
    "evaluate": ["evaluate", "{store}", "--json", "--k", "3"],
    "neighbors": ["neighbors", "{store}", "--out", "{out}.npz", "--k", "4", "-q",
                  "--no-resume"],
    "label-issues": ["label-issues", "{store}", "--split", "train", "--out", "{out}.csv", "-q"],
    "compare": ["compare", "{store}", "--out", "{out}_cmp", "--examples", "4", "-q"],
}


@dataclass(frozen=True)
class Case:
    file: str  # relative to the store
    mutation: str  # delete, truncate-half, truncate-empty, flip-N, garbage-json


def build_store(folder: Path) -> Path:
    """A small store with two records, code, labels, inputs and features."""
    sys.path.insert(0, str(TESTS))
    from conftest import make_ensemble, save_pt

    from ensemble_kernel.storage._store import RunStore

    ens = make_ensemble(n_models=4, n_train=30, n_test=12, n_classes=4)
    g = torch.Generator().manual_seed(1)
    store = RunStore.create(folder / "store", n_train=30, n_test=12, n_classes=4, arrays={
        "labels_train": ens.labels_train.numpy(), "labels_test": ens.labels_test.numpy(),
        "inputs_train": torch.rand(30, 6, 6, generator=g).numpy(),
        "inputs_test": torch.rand(12, 6, 6, generator=g).numpy(),
        "features_train": torch.randn(30, 5, generator=g).numpy(),
        "features_test": torch.randn(12, 5, generator=g).numpy()})
    for i in (0, 2):
        path = save_pt(folder / f"runs{i}.pt", ens.train[i:i + 2], ens.test[i:i + 2],
                       code=f"train(seed={i})")
        store.append_file(path)
    return folder / "store"


def cases_of(store: Path, flips: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for f in sorted(p for p in store.rglob("*") if p.is_file()):
        rel = str(f.relative_to(store))
        out += [Case(rel, "delete"), Case(rel, "truncate-half"), Case(rel, "truncate-empty")]
        size = f.stat().st_size
        out += [Case(rel, f"flip-{rng.randrange(size)}") for _ in range(flips) if size]
        if f.name == "zarr.json":
            out.append(Case(rel, "garbage-json"))
    return out


def mutate(store: Path, case: Case) -> None:
    path = store / case.file
    data = path.read_bytes()
    if case.mutation == "delete":
        path.unlink()
    elif case.mutation == "truncate-half":
        path.write_bytes(data[:len(data) // 2])
    elif case.mutation == "truncate-empty":
        path.write_bytes(b"")
    elif case.mutation == "garbage-json":
        path.write_text('{"zarr_format": 3, "node_type": [1, 2')
    else:
        at = int(case.mutation.split("-")[1])
        data = bytearray(data)
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))


def run_commands(store: Path, out_dir: Path) -> dict:
    """Each command's (exit code, normalised output, stderr) on `store`."""
    from typer.testing import CliRunner

    from ensemble_kernel.cli import app

    runner, results = CliRunner(), {}
    for name, template in COMMANDS.items():
        out = out_dir / name
        args = [a.format(store=store, out=out) for a in template]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = runner.invoke(app, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            results[name] = (1, "traceback: " + repr(result.exception), "")
            continue
        results[name] = (result.exit_code, _normalised(name, result.stdout, out, store),
                         result.stderr)
    return results


def _normalised(name: str, stdout: str, out: Path, store: Path) -> str:
    """What a command's result says, without timings, paths or versions."""
    if name == "neighbors":
        path = out.with_suffix(".npz")
        if not path.exists():
            return ""
        with np.load(path) as f:
            return json.dumps([f["indices"].tolist(), f["values"].round(6).tolist()])
    if name == "label-issues":
        path = out.with_suffix(".csv")
        return path.read_text() if path.exists() else ""
    if name == "compare":
        folder = Path(f"{out}_cmp")
        return "".join(p.read_text() for p in sorted(folder.glob("*.csv"))) \
            if folder.exists() else ""
    text = stdout.replace(str(store), "STORE")
    if name == "info":
        try:
            doc = json.loads(text)
            doc.pop("size_bytes", None)
            return json.dumps(doc, sort_keys=True)
        except ValueError:
            return text
    if name == "evaluate":
        try:
            doc = json.loads(text)
            return json.dumps({k: v for k, v in doc.items()
                               if k not in ("elapsed_s", "timings", "record", "meta")},
                              sort_keys=True)
        except ValueError:
            return text
    return text


def judge(case: Case, got: dict, baseline: dict) -> list[str]:
    """Why `got` breaks the promise for `case` (empty: it keeps it)."""
    bad = []
    for name, (code, result, err) in got.items():
        if code == 0 and result == baseline[name][1]:
            continue
        if code == 2:
            lines = err.strip().splitlines()
            named = _names(case.file, err)
            if len(lines) == 1 and lines[0].startswith("error: ") and named:
                continue
            why = ("more than one line" if len(lines) != 1 else
                   "does not name the damaged file" if not named else "not an error line")
            bad.append(f"{case.file} {case.mutation}: {name}: exit 2, {why}: {err.strip()[:300]}")
            continue
        what = "a traceback" if code == 1 else f"exit {code} with other results"
        bad.append(f"{case.file} {case.mutation}: {name}: {what}: {result[:200]} {err[:300]}")
    return bad


def _names(file: str, err: str) -> bool:
    """Whether the error names the file (or, for a chunk, its array and chunk; for a
    folder's own metadata, the folder)."""
    parts = Path(file).parts
    candidates = {file, str(Path(file).parent) + "/", str(Path(file).parent)}
    if parts[-1] != "zarr.json":
        candidates.add(f"{parts[0]}/{'/'.join(parts[1:])}")  # chunk logits/c/1/0/0
    if parts[0] in ("records", "index", "code"):
        candidates.add(f"{parts[0]}/")
    if file == "zarr.json":
        candidates.add("zarr.json")
    return any(re.search(re.escape(c) + r"(\b|\s|$|\))", err) or c in err for c in candidates)


def fuzz(sample: int | None = None, flips: int = 3, seed: int = 0, verbose: bool = False
         ) -> tuple[int, list[str]]:
    """Run the cases (all, or a seeded `sample` of them); (cases run, failures)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pristine = build_store(tmp / "made")
        baseline = run_commands(pristine, tmp / "base")
        broken = [n for n, (code, _, err) in baseline.items() if code != 0]
        if broken:
            raise SystemExit(f"the undamaged store fails: {broken}: {baseline}")
        cases = cases_of(pristine, flips, seed)
        if sample is not None and sample < len(cases):
            cases = random.Random(seed).sample(cases, sample)
        failures = []
        for i, case in enumerate(cases):
            work = tmp / f"case{i}"
            shutil.copytree(pristine, work / "store")
            mutate(work / "store", case)
            found = judge(case, run_commands(work / "store", work), baseline)
            failures += found
            if verbose:
                print(f"{case.file} {case.mutation}: {'FAIL' if found else 'ok'}", flush=True)
            shutil.rmtree(work)
        return len(cases), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=None,
                        help="run a seeded sample of this many cases (default: all)")
    parser.add_argument("--flips", type=int, default=3, help="byte flips per file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be at least 1, got {args.sample}")
    n, failures = fuzz(args.sample, args.flips, args.seed, args.verbose)
    for line in failures:
        print(line)
    print(f"{n} mutations, {len(failures)} failing command results")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
