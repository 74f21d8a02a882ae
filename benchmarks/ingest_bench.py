"""Ingest cost per file, at the first files and at the last (issue 8, item 10).

    python benchmarks/ingest_bench.py                  # 20,000 one-run files
    python benchmarks/ingest_bench.py --files 2000     # fewer, for a quick look

Writes that many one-run `.pt` files (the published layout; not timed), then appends
them to a new store one by one, as `ingest DIR --store STORE` does (each file one
durable commit under the writers' lock), timing each append. Prints the mean and
median time per file over the first and the last `--window` files, the time of a
skipped (already stored) file at the end, and the CPU. Data lives in a temporary
folder under benchmarks/_data/, removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ensemble_kernel.storage._store import RunStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe, header  # noqa: E402


def summary(times: list[float]) -> str:
    return (f"mean {1000 * statistics.fmean(times):6.2f} ms, "
            f"median {1000 * statistics.median(times):6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000, help="one-run files to ingest")
    parser.add_argument("--window", type=int, default=200, help="files averaged at each end")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--n-classes", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the files and the store")
    args = parser.parse_args()
    window = min(args.window, args.files // 2)

    (HERE / "_data").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=HERE / "_data", prefix="ingest-"))
    try:
        files = folder / "runs"
        files.mkdir()
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for i in range(args.files):
            torch.save({"logits_train": torch.randn(args.n_train, args.n_classes, generator=g),
                        "logits": torch.randn(args.n_test, args.n_classes, generator=g)},
                       files / f"{i:06d}.pt")
        print(f"wrote {args.files} one-run files in {time.perf_counter() - t0:.1f} s (untimed)")

        store = RunStore.create(folder / "store", n_train=args.n_train, n_test=args.n_test,
                                n_classes=args.n_classes)
        times = []
        t0 = time.perf_counter()
        for i, path in enumerate(sorted(files.iterdir())):
            start = time.perf_counter()
            result = store.append_file(path)
            times.append(time.perf_counter() - start)
            assert result.status == "added", result
            if (i + 1) % max(1, args.files // 10) == 0:
                print(f"  {i + 1:6d} files, last {window}: {summary(times[-window:])}",
                      flush=True)
        total = time.perf_counter() - t0
        skip = []
        for path in sorted(files.iterdir())[:window]:
            start = time.perf_counter()
            assert store.append_file(path).status == "skipped"
            skip.append(time.perf_counter() - start)
        assert RunStore(folder / "store").n_models == args.files

        print(header(describe()))
        print(f"store: {folder / 'store'} ({args.n_train} train + {args.n_test} test "
              f"examples x {args.n_classes} classes, float16)")
        print(f"ingested {args.files} files in {total:.1f} s")
        print(f"first {window} files: {summary(times[:window])} per file")
        print(f"last  {window} files: {summary(times[-window:])} per file")
        print(f"skipping a stored file at {args.files} files: {summary(skip)}")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
