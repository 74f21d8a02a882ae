"""Store-backed benchmark: ingest, then neighbours out of core under a memory budget.

    python benchmarks/store_bench.py                      # both cases below
    python benchmarks/store_bench.py --cases cifar2000    # one of them

Cases:
  cifar2000   CIFAR shape (10,000 test x 50,000 train x 10 classes) with 2,000 runs
              (2.4 GB of float16 logits): measured.
  runs20000   20,000 runs at reduced example counts (1,000 test x 5,000 train): measured.
Then the full 20,000 x 60,000 case (24 GB) is projected from the measured rates.

Each case writes float16 run files of 100 runs (`.pt`, the published layout), ingests them
into a store (timed), and runs `_top_k_neighbors` (k = 20) from the store in a fresh process
per precision under --budget, reporting wall time and peak RSS. Writes
benchmarks/store_results.md and store_results.json. Data lives under benchmarks/_data/.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe, header  # noqa: E402
from synthetic import class_signal, noisy_runs  # noqa: E402

CASES = {
    "cifar2000": dict(n_models=2000, n_train=50_000, n_test=10_000),
    "runs20000": dict(n_models=20_000, n_train=5_000, n_test=1_000),
}
N_CLASSES = 10
FILE_RUNS = 100


def make_store(folder: Path, n_models: int, n_train: int, n_test: int) -> dict:
    """Run files, then a store ingested from them; returns timings (cached on disk)."""
    import torch

    from ensemble_kernel.storage._store import RunStore, is_store

    store = folder / "store"
    done = folder / "ingest.json"
    if is_store(store) and done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    files = folder / "files"
    files.mkdir(parents=True)
    rng = np.random.default_rng(0)
    signal = {}
    for split, n in (("train", n_train), ("test", n_test)):
        signal[split] = class_signal(rng, n, N_CLASSES)[1]
    t0 = time.perf_counter()
    for i, m0 in enumerate(range(0, n_models, FILE_RUNS)):
        m = min(FILE_RUNS, n_models - m0)
        runs = {split: torch.from_numpy(noisy_runs(rng, signal[split], m))
                for split in ("train", "test")}
        torch.save({"logits": runs["test"], "logits_train": runs["train"]},
                   files / f"batch{i:04d}.pt")
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    target = RunStore.create(store, n_train=n_train, n_test=n_test, n_classes=N_CLASSES)
    for f in sorted(files.glob("*.pt")):
        target.append_file(f)
    t_ingest = time.perf_counter() - t0
    shutil.rmtree(files)  # keep only the store
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    info = {"generate_s": t_gen, "ingest_s": t_ingest, "store_bytes": size,
            "ingest_gb_per_s": size / t_ingest / 1e9}
    done.write_text(json.dumps(info))
    return info


def child(store: str, precision: str, budget: int, k: int, cache: bool) -> None:
    from ensemble_kernel.core._engine import _top_k_neighbors
    from ensemble_kernel.storage._store import RunStore

    target = RunStore(store)
    t0 = time.perf_counter()
    found = _top_k_neighbors(target.source("test"), target.source("train"), k,
                            precision=precision, memory_budget=budget,
                            cache_queries=None if cache else False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"wall_s": wall, "peak_rss": peak,
                                  "head": found.indices[:50].tolist()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="cifar2000,runs20000")
    p.add_argument("--precisions", default="exact,fast")
    p.add_argument("--budget", type=int, default=3 << 30, help="engine memory budget, bytes")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.budget, args.k, args.child[2] == "cache")
    machine = describe()
    print(header(machine), flush=True)
    rows = []
    for case in args.cases.split(","):
        shape = CASES[case]
        print(f"{case}: {shape}", flush=True)
        info = make_store(args.data_dir / f"store_{case}", **shape)
        flop = 2.0 * shape["n_test"] * shape["n_train"] * shape["n_models"] * N_CLASSES
        heads = {}
        # The 2,000-run case also runs without the query cache: at 20,000 runs the cache
        # (4 GB in bfloat16) does not fit the budget, so that is the rate to project from.
        variants = [(p_, "cache") for p_ in args.precisions.split(",")]
        if case == "cifar2000":
            variants += [(p_, "nocache") for p_ in args.precisions.split(",")]
        for precision, cache in variants:
            print(f"  {precision} ({cache}) ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child",
                                   str(args.data_dir / f"store_{case}" / "store"), precision,
                                   cache, "--budget", str(args.budget), "--k", str(args.k)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(next(line for line in proc.stdout.splitlines()
                                if line.startswith("RESULT "))[7:])
            heads[precision] = r.pop("head")
            rows.append({"case": case, **shape, "precision": precision, "cache": cache, **r,
                         "gflops": flop / r["wall_s"] / 1e9, **info})
    full_flop = 2.0 * 10_000 * 50_000 * 20_000 * N_CLASSES
    lines = ["# Store-backed benchmark", "",
             f"Command: `python benchmarks/store_bench.py --cases {args.cases} --budget "
             f"{args.budget}` (k = {args.k}).", "", "```", header(machine), "```", "",
             "| case | runs | test x train | precision | query cache | ingest | store | wall | peak RSS | GFLOP/s |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['n_models']} | {r['n_test']} x {r['n_train']} | "
            f"{r['precision']} | {r['cache']} | {r['ingest_s']:.0f} s ({r['ingest_gb_per_s']:.2f} GB/s) | "
            f"{r['store_bytes'] / 1e9:.1f} GB | {r['wall_s']:.1f} s | "
            f"{r['peak_rss'] / 2**30:.2f} GiB | {r['gflops']:.0f} |")
    lines += ["", "Projection for 20,000 runs at CIFAR shape (10,000 x 50,000, 2e14 FLOP, 24 GB "
              "of logits), from each precision's measured rate at CIFAR shape without the query "
              "cache (which does not fit at 20,000 runs):"]
    for r in rows:
        if r["case"] == "cifar2000" and r["cache"] == "nocache":
            minutes = full_flop / (r["gflops"] * 1e9) / 60
            lines.append(f"- {r['precision']}: {minutes:.0f} min "
                         f"(= 10 x the measured 2,000-run time), peak RSS as measured: "
                         f"{r['peak_rss'] / 2**30:.2f} GiB")
    report = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "store_results.md").write_text(report)
    (args.out_dir / "store_results.json").write_text(json.dumps(rows, indent=2))
    print(report)


if __name__ == "__main__":
    main()
