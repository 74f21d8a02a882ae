"""Benchmark: the whole `report` against one `evaluate`, same store, same process set-up.

    python benchmarks/report_bench.py                      # CIFAR shape, 500 runs
    python benchmarks/report_bench.py --runs 100 --repeats 2
    python benchmarks/report_bench.py --report-args="--full-sweep"
    git worktree add /tmp/before <commit>   # then, alternated in one run:
    python benchmarks/report_bench.py --repeats 2 --compare-src /tmp/before/src

Each command runs as `python -m ensemble_kernel ... -q` in a fresh process on the same
store (float16, ingested once from generated, class-structured logits under
benchmarks/_data/, which git ignores), with the same --memory-budget. Prints the CPU (model,
ISA flags), torch's thread count, the wall time and peak RSS of every run, and the ratio
report / evaluate (the target of issue 9, item 7: at most 3). With --compare-src, every
command also runs with that source tree first on PYTHONPATH (another commit's `src/`),
alternated with this checkout's `src/` (each first in turn), so that the two are compared
on the same machine in the same minutes (this machine's timings drift by 15% or more
between runs). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import add_shape_options, generate  # noqa: E402  (run.py's generated logits)

sys.path.insert(0, str(HERE.parent / "tests"))
# The program run so that it writes its own peak RSS (VmHWM) to a file as it exits.
from test_memory_budget import _LAUNCH  # noqa: E402  (as memory_budget.py shares peak_rss)


def cpu_description() -> dict:
    """CPU model, the ISA flags that decide the products' speed, and torch's threads."""
    import torch

    model, flags = "unknown", set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    except (OSError, AttributeError):
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    return {"cpu": model, "flags": [f for f in wanted if f in flags],
            "cores": os.cpu_count(), "torch_threads": _fresh_threads(),
            "torch": torch.__version__,
            "isa_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                   "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}}


def _fresh_threads() -> int:
    """torch's thread count in a fresh process, as the timed commands get it (this one's is
    set to 1 by the tests' conftest, imported above for _LAUNCH)."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def build_store(args) -> Path:
    """The generated logits ingested into a store once (reused by later runs)."""
    data = generate(args.data_dir, args.runs, args.n_train, args.n_test, args.n_classes)
    tag = Path(data["train"]).name.rsplit("_train", 1)[0]
    store = args.data_dir / f"{tag}_store"
    if store.exists():
        return store
    parts = args.data_dir / f"{tag}_parts"
    parts.mkdir(exist_ok=True)
    train, test = np.load(data["train"], mmap_mode="r"), np.load(data["test"], mmap_mode="r")
    files = []
    for m0 in range(0, args.runs, 50):
        path = parts / f"runs_{m0:05d}.npz"
        if not path.exists():
            np.savez(path.with_suffix(".tmp.npz"), logits_train=train[m0:m0 + 50],
                     logits_test=test[m0:m0 + 50])
            os.replace(path.with_suffix(".tmp.npz"), path)
        files.append(str(path))
    building = store.with_name(store.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "ensemble_kernel", "ingest", *files, "--store",
                    str(building), "--labels", data["labels"], "-q"], check=True)
    os.replace(building, store)
    shutil.rmtree(parts)
    return store


def timed(args_list: list[str], scratch: Path, src: Path | None = None) -> dict:
    """Wall time and peak RSS of `python -m ensemble_kernel ARGS -q` in a fresh process
    (importing the package from `src` when given)."""
    hwm = scratch / "vmhwm.txt"
    env = None
    if src is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(src)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCH, str(hwm), *args_list, "-q"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args_list)} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(hwm.read_text()) / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(p)
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--repeats", type=int, default=1, help="runs of each command (alternating)")
    p.add_argument("--report-args", default="", help="extra options for report, e.g. "
                   "--full-sweep")
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    p.add_argument("--json-out", type=Path, help="also write the figures as JSON here")
    p.add_argument("--compare-src", type=Path, help="also time every command with this "
                   "source tree (another commit's src/) first on PYTHONPATH, alternated")
    args = p.parse_args()
    if args.compare_src is not None and not (args.compare_src / "ensemble_kernel").is_dir():
        p.error(f"--compare-src {args.compare_src}: no ensemble_kernel package there (give "
                "the src/ folder of a checkout, e.g. from git worktree add)")

    machine = cpu_description()
    print(json.dumps(machine), flush=True)
    t0 = time.perf_counter()
    store = build_store(args)
    print(f"store {store} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    budget = ["--memory-budget", args.memory_budget]
    this = HERE.parent / "src"  # this checkout, whatever ensemble_kernel is installed
    trees = {"this": this} if args.compare_src is None else {
        "compared": args.compare_src.resolve(), "this": this}
    results = {tree: {"evaluate": [], "report": []} for tree in trees}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for r in range(args.repeats):
            order = list(trees.items())
            for tree, src in (order if r % 2 == 0 else order[::-1]):  # each first in turn
                for case in ("evaluate", "report"):
                    cmd = (["evaluate", str(store), *budget] if case == "evaluate" else
                           ["report", str(store), "--out", str(scratch / f"r{r}.html"),
                            *budget, *args.report_args.split()])
                    got = timed(cmd, scratch, src)
                    results[tree][case].append(got)
                    label = case if len(trees) == 1 else f"{tree} {case}"
                    print(f"{label:<17} repeat {r}: {got['wall_s']:8.1f} s  peak "
                          f"{got['peak_rss_mib']} MiB", flush=True)
    summary = {
        "shape": {"runs": args.runs, "n_train": args.n_train, "n_test": args.n_test,
                  "n_classes": args.n_classes}, "memory_budget": args.memory_budget,
        "report_args": args.report_args, "machine": machine}
    for tree in trees:
        walls = {c: [x["wall_s"] for x in v] for c, v in results[tree].items()}
        ratios = [rep / ev for ev, rep in zip(walls["evaluate"], walls["report"])]
        figures = {"results": results[tree],
                   "median_wall_s": {c: statistics.median(v) for c, v in walls.items()},
                   "ratio_report_over_evaluate": [round(x, 2) for x in ratios]}
        if tree == "this":
            summary.update(figures)
        else:
            summary["compared"] = {"src": str(trees[tree]), **figures}
        print(f"{'' if len(trees) == 1 else tree + ': '}report / evaluate: "
              f"{', '.join(f'{x:.2f}' for x in ratios)} (median walls: evaluate "
              f"{figures['median_wall_s']['evaluate']:.1f} s, report "
              f"{figures['median_wall_s']['report']:.1f} s; target <= 3)")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
