"""20,000 runs at CIFAR shape, measured end to end: write, ingest, neighbours (`make bench-20k`).

    python benchmarks/bench_20k.py                         # 40 files x 500 runs: ~24 GB of files
    python benchmarks/bench_20k.py --files 2 --keep        # 1,000 runs, to project from
    python benchmarks/bench_20k.py --files 2 --runs-per-file 3 --n-train 40 --n-test 10

Three stages, each in its own process, each timed (wall) with its own peak RSS:
  generate   --files run files of --runs-per-file runs in the published layout: `.pt`
             dicts with `logits` (runs, n_test, classes) and `logits_train` (runs,
             n_train, classes), float16, saved without pickled code; synthetic logits
             with class structure (benchmarks/synthetic.py), each file from its own seed.
             A file is written whole under a temporary name and renamed, so a file under
             its final name is complete: a second run skips it (resumable).
  ingest     `ensemble-kernel ingest FILES --store STORE --labels LABELS` (files already
             stored are skipped by content hash, so this resumes too).
  neighbors  `ensemble-kernel neighbors STORE --k 20 --memory-budget 4GiB --precision P
             --no-resume` (a fresh computation, timed whole).

Free disk space under --dir is checked first: the files not yet written plus the store
not yet written. Too little is refused with one line saying how much is needed and where,
before anything is written. The data goes under --dir (default benchmarks/_data/, which
git ignores), in a folder named by the shape and seed, and is removed at the end unless
--keep. Results (with the machine's description and its float32 product rate, from which
the neighbours stage's float32 floor follows) go to OUT_DIR/bench_20k_results.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import capped_float32_rate, describe, header  # noqa: E402

PROG = "bench_20k"
MARGIN = 64 << 20  # bytes of slack in the disk check: zip and zarr metadata, the results
STORE_FACTOR = 1.1  # store bytes per byte of logits: zarr keeps whole chunks (1.09x at CIFAR shape)


class UsageError(Exception):
    """A wrong option or a machine that cannot run the benchmark: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="bench_20k.py", description=__doc__, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=40, help="run files to write (default 40)")
    p.add_argument("--runs-per-file", type=int, default=500, help="runs in each file (default 500)")
    p.add_argument("--n-train", type=int, default=50_000, help="train examples (default 50,000)")
    p.add_argument("--n-test", type=int, default=10_000, help="test examples (default 10,000)")
    p.add_argument("--n-classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--k", type=int, default=20, help="neighbours per test example (default 20)")
    p.add_argument("--memory-budget", default="4GiB",
                   help="neighbours' --memory-budget, e.g. 4GiB (default) or 512MiB")
    p.add_argument("--precision", default="auto",
                   help="neighbours' --precision: auto (the CLI's default), exact or fast")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic logits")
    p.add_argument("--dir", type=Path, default=HERE / "_data",
                   help="where the files and the store go (default benchmarks/_data)")
    p.add_argument("--out-dir", type=Path, default=HERE,
                   help="where bench_20k_results.json and .md go (default benchmarks/)")
    p.add_argument("--keep", action="store_true",
                   help="keep the files and the store (a later run reuses them)")
    p.add_argument("--probe-seconds", type=float, default=3.0,
                   help="time cap of the float32 product-rate probe (s)")
    p.add_argument("--generate-child", nargs=2, metavar=("FOLDER", "INDICES"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> int:
    """Refuse bad options in one line before any work; returns the budget in bytes."""
    from ensemble_kernel.cli.common import PRECISIONS, parse_size
    from ensemble_kernel.errors import InputError

    for name, least in (("files", 1), ("runs_per_file", 1), ("n_train", 1), ("n_test", 1),
                        ("n_classes", 2), ("k", 1), ("seed", 0)):
        if getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, "
                             f"got {getattr(args, name)}")
    if args.files * args.runs_per_file < 2:
        raise UsageError(f"--files x --runs-per-file must give at least 2 runs, got "
                         f"{args.files * args.runs_per_file}: raise --runs-per-file")
    if args.k > args.n_train:
        raise UsageError(f"--k must be at most --n-train ({args.n_train}), got {args.k}")
    if args.precision not in PRECISIONS:
        raise UsageError(f"--precision takes {' or '.join(PRECISIONS)}, got {args.precision!r}")
    for name in ("dir", "out_dir"):
        path = getattr(args, name)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--{name.replace('_', '-')} must be a folder, and {path} is a "
                             "file: pass another path")
    if not args.probe_seconds > 0:
        raise UsageError(f"--probe-seconds must be positive, got {args.probe_seconds}")
    try:
        return parse_size(args.memory_budget)
    except InputError as e:
        raise UsageError(str(e)) from e


# ---- the data ------------------------------------------------------------------------

def data_folder(args: argparse.Namespace) -> Path:
    """One folder per shape and seed: files of another shape are never mistaken for these."""
    return args.dir / (f"bench20k-r{args.runs_per_file}-tr{args.n_train}-te{args.n_test}"
                       f"-c{args.n_classes}-s{args.seed}")


def file_path(folder: Path, index: int) -> Path:
    return folder / "files" / f"runs-{index:05d}.pt"


def file_bytes(runs: int, n_train: int, n_test: int, n_classes: int) -> int:
    """Size of one run file: its float16 logits (the zip's headers are in MARGIN)."""
    return 2 * runs * (n_train + n_test) * n_classes


def missing_files(folder: Path, n_files: int) -> list[int]:
    """Indices of the files not yet written whole (a whole file has its final name)."""
    return [i for i in range(n_files) if not file_path(folder, i).is_file()]


def write_files(folder: Path, indices: list[int], runs: int, n_train: int, n_test: int,
                n_classes: int, seed: int) -> None:
    """Write the run files `indices` (and the labels, once), each atomically."""
    import numpy as np
    import torch

    from ensemble_kernel._atomic import atomic_write
    from synthetic import class_signal, noisy_runs

    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    for stale in files.glob(".runs-*.partial"):  # our own temporaries, left by a kill
        stale.unlink()
    rng = np.random.default_rng([seed, 0])
    labels_train, signal_train = class_signal(rng, n_train, n_classes)
    labels_test, signal_test = class_signal(rng, n_test, n_classes)
    labels = folder / "labels.npz"
    if not labels.is_file():
        atomic_write(labels, lambda f: np.savez(f, labels_train=labels_train,
                                                labels_test=labels_test))
    for done, i in enumerate(indices, 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, 1, i])  # file i is the same whichever run writes it
        payload = {"logits": torch.from_numpy(noisy_runs(rng, signal_test, runs)),
                   "logits_train": torch.from_numpy(noisy_runs(rng, signal_train, runs))}
        atomic_write(file_path(folder, i), lambda f: torch.save(payload, f))  # noqa: F821
        del payload
        print(f"  file {i} written ({done}/{len(indices)}, {time.perf_counter() - t0:.1f} s)",
              flush=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_space(args: argparse.Namespace, folder: Path) -> dict:
    """Refuse in one line if the files still to write and the store do not fit on the disk."""
    one = file_bytes(args.runs_per_file, args.n_train, args.n_test, args.n_classes)
    files_needed = one * len(missing_files(folder, args.files))
    store_needed = max(0, int(STORE_FACTOR * one * args.files) - folder_bytes(folder / "store"))
    needed = files_needed + store_needed + MARGIN
    free = free_bytes(args.dir)
    if free < needed:
        raise UsageError(
            f"needs {needed / 1e9:.1f} GB free under {args.dir} ({files_needed / 1e9:.1f} GB "
            f"of run files still to write, {store_needed / 1e9:.1f} GB of store), has "
            f"{free / 1e9:.1f} GB: free space there, pass --dir on a larger disk, or lower --files")
    return {"needed_bytes": needed, "free_bytes": free}


# ---- the stages ------------------------------------------------------------------------

def measured(stage: str, cmd: list[str]) -> dict:
    """Run `cmd` (output passes through); its wall time and its own peak RSS (wait4),
    printed as soon as it ends (a long benchmark shows each stage's figure as it goes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[2:5]))} ... exited with {proc.returncode}")
    print(f"{stage}: {wall:.1f} s wall, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def run_stages(args: argparse.Namespace, folder: Path, budget: int) -> dict:
    cli = [sys.executable, "-m", "ensemble_kernel"]
    stages = {}
    todo = missing_files(folder, args.files)
    print(f"generate: {len(todo)} of {args.files} files to write "
          f"({args.files - len(todo)} already whole)", flush=True)
    stages["generate"] = {**measured("generate", [
        sys.executable, __file__, "--generate-child", str(folder), ",".join(map(str, todo)),
        "--runs-per-file", str(args.runs_per_file), "--n-train", str(args.n_train),
        "--n-test", str(args.n_test), "--n-classes", str(args.n_classes),
        "--seed", str(args.seed)]), "files_written": len(todo)}
    store = folder / "store"
    resumed = store.exists()
    print(f"ingest into {store}{' (resumed: stored files are skipped)' if resumed else ''}",
          flush=True)
    stages["ingest"] = {**measured("ingest", [
        *cli, "ingest", str(folder / "files"), "--store", str(store),
        "--labels", str(folder / "labels.npz"), "--quiet"]), "store_existed": resumed}
    out = folder / f"neighbors-{args.precision}-k{args.k}.npz"
    print(f"neighbors: k = {args.k}, --memory-budget {args.memory_budget}, "
          f"--precision {args.precision}", flush=True)
    stages["neighbors"] = measured("neighbors", [
        *cli, "neighbors", str(store), "--out", str(out), "--k", str(args.k),
        "--memory-budget", str(budget), "--precision", args.precision, "--no-resume", "--quiet"])
    stages["neighbors"]["out"] = str(out)
    stages["neighbors"]["precision"] = chosen_precision(out)
    return stages


def chosen_precision(out: Path) -> dict:
    """What the neighbours ran (`auto` resolves per machine and data): the file's record."""
    import numpy as np

    with np.load(out) as f:
        meta = json.loads(str(f["meta"]))
    return meta.get("precision") or {"chosen": meta["options"]["precision"]}


def precision_text(neighbors: dict) -> str:
    p = neighbors.get("precision") or {}
    chosen = p.get("chosen", "?")
    return f"{chosen}: {p['reason']}" if p.get("reason") else chosen


def render(result: dict) -> str:
    o, d, s = result["options"], result["data"], result["stages"]
    gib = 2**30
    lines = [
        "# 20,000 runs, measured (bench-20k)", "",
        f"Command: `python benchmarks/bench_20k.py {' '.join(result['argv'])}`", "",
        "```", header(result["machine"]), "```", "",
        f"{d['runs']} runs ({o['files']} files of {o['runs_per_file']}), {o['n_test']} test x "
        f"{o['n_train']} train x {o['n_classes']} classes, float16: {d['file_bytes'] / 1e9:.2f} "
        f"GB of run files, {d['store_bytes'] / 1e9:.2f} GB of store. Neighbours: k = {o['k']}, "
        f"--memory-budget {o['memory_budget']}, --precision {o['precision']}.", "",
        "| stage | wall (s) | peak RSS (GiB) | rate |",
        "| --- | ---: | ---: | --- |",
        f"| generate | {s['generate']['wall_s']:.1f} | {s['generate']['peak_rss_bytes'] / gib:.2f} "
        f"| {s['generate']['files_written']} files written |",
        f"| ingest | {s['ingest']['wall_s']:.1f} | {s['ingest']['peak_rss_bytes'] / gib:.2f} | "
        f"{d['store_bytes'] / s['ingest']['wall_s'] / 1e6:.0f} MB/s of store"
        f"{' (resumed)' if s['ingest']['store_existed'] else ''} |",
        f"| neighbors ({precision_text(s['neighbors'])}) | {s['neighbors']['wall_s']:.1f} | "
        f"{s['neighbors']['peak_rss_bytes'] / gib:.2f} | {result['neighbors_gflops']:.1f} GFLOP/s, "
        f"{100 * result['of_float32_rate']:.0f}% of the float32 product rate |",
        "",
        f"The neighbours' product is {result['flop']:.2e} FLOP. The float32 product rate "
        f"measured here ({result['float32_gflops']:.1f} GFLOP/s, (n x 770) @ (770 x n), "
        f"median over blocks, {result['float32_rate']['low']:.1f} to "
        f"{result['float32_rate']['high']:.1f}) puts its floor at "
        f"{result['float32_floor_s']:.0f} s ({result['float32_floor_s'] / 60:.1f} min).",
    ]
    return "\n".join(lines) + "\n"


def summarise(args: argparse.Namespace, argv: list[str], machine: dict, space: dict,
              stages: dict, f32, folder: Path) -> dict:
    """The JSON record: options, machine, disk, each stage, and the neighbours' rate and floor."""
    runs = args.files * args.runs_per_file
    flop = 2.0 * args.n_test * args.n_train * runs * args.n_classes
    rate = flop / stages["neighbors"]["wall_s"] / 1e9
    return {
        "argv": argv, "options": {k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items() if k != "generate_child"},
        "machine": machine, "disk": space, "stages": stages,
        "data": {"runs": runs, "file_bytes": folder_bytes(folder / "files"),
                 "store_bytes": folder_bytes(folder / "store")},
        "flop": flop, "neighbors_gflops": rate,
        "float32_rate": {"gflops": f32.gflops, "low": f32.low, "high": f32.high},
        "float32_gflops": f32.gflops, "of_float32_rate": rate / f32.gflops,
        "float32_floor_s": flop / (f32.gflops * 1e9),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        if args.generate_child:
            folder, indices = args.generate_child
            write_files(Path(folder), [int(i) for i in indices.split(",") if i],
                        args.runs_per_file, args.n_train, args.n_test, args.n_classes, args.seed)
            return 0
        budget = check_options(args)
        folder = data_folder(args)
        space = check_space(args, folder)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    from ensemble_kernel._atomic import atomic_write_text

    machine = describe()
    print(header(machine), flush=True)
    n_probe_q, n_probe_r = min(args.n_test, 10_000), min(args.n_train, 10_000)
    f32 = capped_float32_rate(n_probe_q, n_probe_r, 770, seconds=args.probe_seconds)
    print(f32.line(), flush=True)
    try:
        stages = run_stages(args, folder, budget)
    except RuntimeError as e:
        print(f"{PROG}: {e}; the data is kept in {folder}: run the same command again to "
              "resume", file=sys.stderr)
        return 1
    result = summarise(args, argv, machine, space, stages, f32, folder)
    report = render(result)
    atomic_write_text(args.out_dir / "bench_20k_results.json", json.dumps(result, indent=2))
    atomic_write_text(args.out_dir / "bench_20k_results.md", report)
    if not args.keep:
        shutil.rmtree(folder)
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
