"""What `--precision auto` sees on this machine, and whether its prediction holds.

    python benchmarks/precision_probe.py                      # the probe, 3 times; the choice at CIFAR shape
    python benchmarks/precision_probe.py --measure --runs 100 # also time exact, fast and auto end to end

Prints the CPU model, the ISA flags that matter (avx2, avx512f, avx512_bf16, avx512_vnni,
amx), torch's CPU capability and thread count, then each probe's four rates (float32 and
bfloat16 products, normalisation, the re-score's gather) and the predicted time of each
path for the shape given (default CIFAR-10: 10,000 test x 50,000 train x 10 classes, 500
runs, k = 20, 1 GiB budget). With --measure it generates that shape's float16 logits
(`run.generate`, under benchmarks/_data/), times `top_k_neighbors` in exact, fast and auto
mode (--repeats times each, interleaved), and checks that all three return the same
neighbours. To imitate an AVX2-only CPU on a newer one, run it with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`.
The probe is run fresh here (the user's cache is neither read nor written).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def machine() -> str:
    from ensemble_kernel.core._precision import machine_key

    key = machine_key("cpu")
    return (f"{key['cpu']}; flags {' '.join(key['isa']) or '-'}; torch {key['torch']} "
            f"(CPU capability {key['aten_capability']}), {key['threads']} threads"
            + (f"; env {key['env']}" if key["env"] else ""))


def spread(values: list[float], scale: float = 1.0, fmt: str = ".3g") -> str:
    v = [x / scale for x in values]
    return f"median {statistics.median(v):{fmt}} (min {min(v):{fmt}}, max {max(v):{fmt}})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--budget", type=float, default=1.0, help="GiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--measure", action="store_true", help="time exact, fast and auto too")
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    args = p.parse_args()

    import os

    os.environ["ENSEMBLE_KERNEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="ek-probe-")
    from ensemble_kernel import top_k_neighbors
    from ensemble_kernel.core import _precision as precision

    print(f"machine: {machine()}")
    shape = dict(n_queries=args.n_test, n_references=args.n_train, n_models=args.runs,
                 n_classes=args.classes, k=args.k, memory_budget=int(args.budget * 2**30))
    print(f"shape: {args.n_test} test x {args.n_train} train x {args.classes} classes x "
          f"{args.runs} runs, k = {args.k}, budget {args.budget} GiB")
    probes, predictions = [], []
    for i in range(args.repeats):
        rates = precision.measure_rates("cpu")
        exact_s, fast_s = precision.predict_times(rates, **shape)
        probes.append(rates)
        predictions.append((exact_s, fast_s))
        choice = "fast" if fast_s * precision.SAFETY < exact_s else "exact"
        print(f"probe {i + 1}: {precision.describe_rates(rates)} ({rates.probe_s:.2f} s); "
              f"predicted exact {exact_s:.1f} s, fast {fast_s:.1f} s -> auto picks {choice}",
              flush=True)
    for name in ("float32", "bfloat16"):
        print(f"{name} GFLOP/s: {spread([getattr(r, name) for r in probes], 1e9, '.0f')}")
    print("bfloat16 / float32: "
          + spread([r.bfloat16 / r.float32 for r in probes], 1, ".2f"))
    print(f"probe seconds: {spread([r.probe_s for r in probes], 1, '.2f')}")
    if not args.measure:
        return

    from run import generate

    data = generate(args.data_dir, args.runs, args.n_train, args.n_test, args.classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory map
        train = torch.from_numpy(np.load(data["train"], mmap_mode="r"))
        test = torch.from_numpy(np.load(data["test"], mmap_mode="r"))
    times: dict[str, list[float]] = {"exact": [], "fast": [], "auto": []}
    results = {}
    for _ in range(args.repeats):
        for mode in times:
            t = time.perf_counter()
            found = top_k_neighbors(train, test, args.k, precision=mode,
                                    memory_budget=shape["memory_budget"])
            times[mode].append(time.perf_counter() - t)
            results[mode] = found
            print(f"{mode}: {times[mode][-1]:.1f} s", flush=True)
    for mode, ts in times.items():
        print(f"{mode} wall s: {spread(ts, 1, '.1f')}")
    exact = results["exact"]
    for mode in ("fast", "auto"):
        got = results[mode]
        differ = got.indices != exact.indices
        close = torch.isclose(got.values[differ], exact.values[differ], rtol=1e-5, atol=1e-6)
        print(f"{mode} vs exact: {int(differ.sum())} index differences, all within float32 "
              f"rounding of a tie: {bool(close.all())}")


if __name__ == "__main__":
    main()
