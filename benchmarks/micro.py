"""Small measurements quoted in the README and the notes, each reproducible here.

    python benchmarks/micro.py stats      # the statistics pass at CIFAR shape, n = 500
    python benchmarks/micro.py reduce     # float32 vs float64-accumulating reductions
    python benchmarks/micro.py storeread  # reading blocks of runs from the benchmark stores
    python benchmarks/micro.py recipe --epochs 6 --seed 1 --models 128   # a demo recipe

`stats` needs the logits `benchmarks/run.py` generates; `storeread` the stores of
`benchmarks/store_bench.py`.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"


def stats() -> None:
    from ensemble_kernel.engine import _prepare_engine

    tag = DATA / "m500_tr50000_te10000_c10_s0_"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory map
        train = torch.from_numpy(np.load(f"{tag}train.npy", mmap_mode="r"))
        test = torch.from_numpy(np.load(f"{tag}test.npy", mmap_mode="r"))
    t0 = time.perf_counter()
    _prepare_engine(test, train, 3, log_softmax=True, classes=None, exclude_self=False,
                    precision="exact", memory_budget=1 << 30, device="cpu", chunk_models=None,
                    tile_size=None, progress=None, k_keep=3)
    print(f"statistics pass, 500 runs x 60,000 examples x 10 classes: "
          f"{time.perf_counter() - t0:.1f} s")


def reduce() -> None:
    x = torch.randn(94, 20000, 10)

    def timed(f, reps=5):
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t0) / reps

    f32 = timed(lambda: x.sum(0))
    f64 = timed(lambda: x.sum(0, dtype=torch.float64))
    print(f"sum over runs of a (94, 20000, 10) block: float32 {1e3 * f32:.1f} ms, "
          f"float64-accumulating {1e3 * f64:.1f} ms ({f64 / f32:.0f}x)")


def storeread() -> None:
    from ensemble_kernel.store import RunStore

    for case, models, examples in (("cifar2000", slice(0, 100), slice(0, 60000)),
                                   ("runs20000", slice(0, 2000), slice(0, 6000))):
        path = DATA / f"store_{case}" / "store"
        if not path.exists():
            print(f"{case}: no store at {path} (run benchmarks/store_bench.py first)")
            continue
        store = RunStore(path)
        store.read_logits(models, examples)  # warm the page cache, as the engine's passes do
        t0 = time.perf_counter()
        x = store.read_logits(models, examples)
        dt = time.perf_counter() - t0
        print(f"{case}: read {x.shape} float16 in {dt:.2f} s = {x.nbytes / dt / 1e9:.2f} GB/s")


def recipe(epochs: int, seed: int, models: int) -> None:
    from ensemble_kernel import top_k_neighbors
    from ensemble_kernel.demo import _seeds
    from ensemble_kernel.demo.data import load_dataset
    from ensemble_kernel.demo.train import TrainConfig, init_ensemble, predict, train_ensemble

    data = load_dataset("mnist1d")
    x, y = torch.from_numpy(data.signals("train")), torch.from_numpy(data.y_train)
    xt, yt = torch.from_numpy(data.signals("test")), torch.from_numpy(data.y_test)
    seeds = _seeds(seed, models)
    test_logits, train_logits = [], []
    t0 = time.perf_counter()
    for b in range(0, models, 32):
        net = train_ensemble(init_ensemble(seeds[b:b + 32], 40, 10), x, y,
                             TrainConfig(epochs=epochs))
        test_logits.append(predict(net, xt)[0])
        train_logits.append(predict(net, x)[0])
    test_l, train_l = torch.cat(test_logits), torch.cat(train_logits)
    found = top_k_neighbors(test_l.half(), train_l.half(), 3)  # float16, as the store keeps them
    knn = float((y[found.indices].mode(1).values == yt).double().mean())
    ens = float((test_l.mean(0).argmax(-1) == yt).double().mean())
    single = float((test_l.argmax(-1) == yt).double().mean())
    print(f"{epochs} epochs, seed {seed}, {models} networks ({time.perf_counter() - t0:.0f} s): "
          f"single {100 * single:.1f}, average {100 * ens:.1f}, kernel 3-NN {100 * knn:.1f}, "
          f"gain {100 * (knn - ens):+.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["stats", "reduce", "storeread", "recipe"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--models", type=int, default=128)
    args = p.parse_args()
    if args.what == "recipe":
        recipe(args.epochs, args.seed, args.models)
    else:
        {"stats": stats, "reduce": reduce, "storeread": storeread}[args.what]()


if __name__ == "__main__":
    main()
