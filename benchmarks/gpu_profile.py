"""Where the engine's time goes on a GPU: each precision run warm, timed, then profiled.

    python benchmarks/gpu_profile.py --out-dir gpu-out        # CIFAR shape, 500 runs

Uses the logits benchmarks/run.py generates (the same --data-dir, --runs, --n-train,
--n-test), generating them if missing. For each of --precisions: one warm-up run (CUDA's
context, cuBLAS's handles and auto's probe are made there, as a user's second job finds
them), --repeats timed runs (wall seconds), and one run under torch.profiler whose
operators, by GPU time and by CPU time, go to OUT/profile-PRECISION.txt. auto's choice
(its rates and predicted times) is printed as the engine logs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe, header  # noqa: E402
from run import _bytes, add_shape_options, generate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(p, n_classes=False)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--budget", type=_bytes, help="GPU memory for the engine, e.g. 16GiB "
                   "(default: the engine's, half the GPU's free memory)")
    p.add_argument("--precisions", default="exact,fast,auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    p.add_argument("--out-dir", type=Path, default=Path("gpu-out"))
    args = p.parse_args()
    from ensemble_kernel.core._engine import _top_k_neighbors
    from ensemble_kernel.core._plan import default_memory_budget
    from ensemble_kernel.core._precision import PRECISIONS

    unknown = [x for x in args.precisions.split(",") if x not in PRECISIONS]
    if unknown:
        p.error(f"--precisions {args.precisions}: {', '.join(map(repr, unknown))} is not a "
                f"precision; name {', '.join(PRECISIONS)}, comma-separated")
    if min(args.runs - 1, args.n_train, args.n_test, args.k, args.repeats) < 1:
        p.error("--runs must be at least 2; --n-train, --n-test, --k and --repeats positive")
    if not torch.cuda.is_available():
        p.error(f"needs a CUDA device (this torch {torch.__version__} sees none)")

    print(header(describe()), flush=True)
    data = generate(args.data_dir, args.runs, args.n_train, args.n_test, 10)
    train = torch.from_numpy(np.load(data["train"], mmap_mode="r"))
    test = torch.from_numpy(np.load(data["test"], mmap_mode="r"))
    budget = args.budget or default_memory_budget("cuda")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  log: %(message)s"))
    for name in ("ensemble_kernel.core._precision", "ensemble_kernel.core._engine",
                 "ensemble_kernel.core._pilot"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def once(precision):
        found = _top_k_neighbors(test, train, args.k, precision=precision,
                                 memory_budget=budget, device="cuda")
        torch.cuda.synchronize()
        return found

    for precision in args.precisions.split(","):
        print(f"== {precision}", flush=True)
        once(precision)  # warm-up (and auto's probe, cached after)
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            once(precision)
            walls.append(time.perf_counter() - t0)
        print(f"  wall (s): {', '.join(f'{w:.3f}' for w in walls)}", flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            once(precision)
        table = prof.key_averages()
        by_gpu = table.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
        by_cpu = table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        (args.out_dir / f"profile-{precision}.txt").write_text(
            f"by GPU time\n{by_gpu}\n\nby CPU time\n{by_cpu}\n")
        # The device's own events (kernels, copies) alone: an operator's self device time
        # repeats that of the kernels it launched.
        on_gpu = [e for e in table if e.device_type != torch.autograd.DeviceType.CPU]
        gpu_total = sum(e.self_device_time_total for e in on_gpu) / 1e6
        print(f"  profiled: GPU busy {gpu_total:.3f} s (kernels and copies); top by GPU time "
              "(operators and their kernels both listed):", flush=True)
        for e in sorted(table, key=lambda e: -e.self_device_time_total)[:6]:
            print(f"    {e.key[:50]:<50} GPU {e.self_device_time_total / 1e3:8.1f} ms  "
                  f"CPU {e.self_cpu_time_total / 1e3:8.1f} ms  x{e.count}", flush=True)
        print("  top by CPU time:", flush=True)
        for e in sorted(table, key=lambda e: -e.self_cpu_time_total)[:6]:
            print(f"    {e.key[:50]:<50} GPU {e.self_device_time_total / 1e3:8.1f} ms  "
                  f"CPU {e.self_cpu_time_total / 1e3:8.1f} ms  x{e.count}", flush=True)


if __name__ == "__main__":
    main()
