"""Small measurements quoted in the README and the notes, each reproducible here.

    python benchmarks/micro.py stats      # the statistics pass at CIFAR shape, n = 500
    python benchmarks/micro.py reduce     # float32 vs float64-accumulating reductions
    python benchmarks/micro.py storeread  # reading blocks of runs from the benchmark stores
    python benchmarks/micro.py storeread --store STORE   # plain-file reads against zarr's
    python benchmarks/micro.py vmlrace --processes 40   # oneMKL's first-call race, guarded or not
    python benchmarks/micro.py compare A.npz B.npz      # two neighbors files: same neighbours?
    python benchmarks/micro.py recipe --epochs 6 --seed 1 --models 128   # a demo recipe
    python benchmarks/micro.py stages --precision fast   # time per engine stage, CIFAR shape
    python benchmarks/micro.py stages --precision exact --n-test 2000 --threads 1   # CPU time
    python benchmarks/micro.py stages --precision exact --k 20 --runs 2   # a 2-run kernel: ties
    python benchmarks/micro.py stages --store benchmarks/_data/bench20k-r500-tr50000-te10000-c10-s0/store \
        --n-test 1000 --k 20 --memory-budget 4GiB   # the 20,000-run store of bench_20k.py --keep
    python benchmarks/micro.py pairs --threads 1  # the re-score's products, gathered vs sampled
    python benchmarks/micro.py layout   # fast mode's tile product: strided transpose vs a copy
    python benchmarks/micro.py squares  # the statistics' sum of squares over few and many runs
    python benchmarks/micro.py logsoftmax  # the log-softmax's one reduction (max) against two
    python benchmarks/micro.py perclass  # the ablations' per-class product, by runs per block
    python benchmarks/micro.py ablations --store benchmarks/_data/m500_tr50000_te10000_c10_s0_store \
        --memory-budget 2GiB   # the report's ablation pass, its blocks of runs now and before
    python benchmarks/micro.py faults --store benchmarks/_data/m500_tr50000_te10000_c10_s0_store \
        --memory-budget 2GiB   # page faults of evaluate with glibc's trim threshold now and before
    python benchmarks/micro.py scipyimport   # what importing scipy.stats costs a report
    python benchmarks/micro.py classmajor   # the ablations' per-class product: its copy of the features
    python benchmarks/micro.py nologsoftmax --store benchmarks/_data/m500_tr50000_te10000_c10_s0_store \
        --memory-budget 1.7GiB   # the report's no-log-softmax kernel: auto, exact and fast
    python benchmarks/micro.py sweepkernels --store benchmarks/_data/m500_tr50000_te10000_c10_s0_store \
        --memory-budget 1.5GiB   # the sweep's subset kernels, exact against fast, and as predicted
    python benchmarks/micro.py sweepstats --store benchmarks/_data/m500_tr50000_te10000_c10_s0_store \
        --memory-budget 2GiB   # the sweep's subsets' statistics: one shared pass against one each
    python benchmarks/micro.py pilot --store STORE --k 20 --memory-budget 4GiB  # auto's pilot
    python benchmarks/micro.py candidates  # how many queries fast mode's bound settles, by list length
    python benchmarks/micro.py candidates --store demo-output/store --k 20
    python benchmarks/micro.py int8 --k 20   # why fast mode has no int8 candidate pass
    python benchmarks/micro.py int8 --store demo-output/store --k 20

`stats`, `stages` and `candidates` need the logits `benchmarks/run.py` generates; `storeread` the stores of
`benchmarks/store_bench.py`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
sys.path.insert(0, str(HERE))

from machine import describe, header  # noqa: E402


def stats() -> None:
    from ensemble_kernel.core._engine import _prepare_engine

    train, test = _cifar_logits()
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


def storeread(store_path: str | None = None, repeats: int = 3) -> None:
    """Reading blocks of runs: the plain-file read (`read_logits`) against zarr's, alternated
    in one process, page cache warm (as the engine's passes read), `repeats` times each."""
    from ensemble_kernel.storage._store import RunStore

    cases = ([("store", Path(store_path), None, None)] if store_path else
             [(case, DATA / f"store_{case}" / "store", models, examples)
              for case, models, examples in (("cifar2000", slice(0, 100), slice(0, 60000)),
                                             ("runs20000", slice(0, 2000), slice(0, 6000)))])
    for case, path, models, examples in cases:
        if not path.exists():
            print(f"{case}: no store at {path} (run benchmarks/store_bench.py first, or pass "
                  "--store)")
            continue
        store = RunStore(path)
        n = store.n_models
        blocks = ([(models, examples)] if models is not None else
                  [(slice(0, min(n, 32)), slice(0, store.spec.n_train + store.spec.n_test)),
                   (slice(0, min(n, 100)), slice(0, 4096))])
        print(f"{case}: {path}, plain layout: {store._plain is not None}")
        for models, examples in blocks:
            store.read_logits(models, examples)  # warm the page cache
            walls = {"plain": [], "zarr": []}
            for _ in range(repeats):
                for name, read in (("plain", store.read_logits), ("zarr", store._read_zarr)):
                    t0 = time.perf_counter()
                    x = read(models, examples)
                    walls[name].append(time.perf_counter() - t0)
            mb = x.nbytes / 1e6
            print(f"  runs {models.start}:{models.stop} x examples {examples.start}:"
                  f"{examples.stop} ({mb:.0f} MB): " + ", ".join(
                      f"{name} " + " ".join(f"{t:.3f}" for t in ts) + " s" for name, ts in
                      walls.items()) + "; zarr / plain (medians) "
                  f"{np.median(walls['zarr']) / np.median(walls['plain']):.1f}x", flush=True)


# The guard's own cost: vector_math.py loaded alone into a fresh process, then timed.
_VML_COST = """
import importlib.util, time, torch
spec = importlib.util.find_spec("ensemble_kernel")
path = spec.submodule_search_locations[0] + "/vector_math.py"
module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("vm", path))
module.__spec__.loader.exec_module(module)
t0 = time.perf_counter()
module.resolve_dispatch()
print(time.perf_counter() - t0)
"""


def vmlrace(processes: int) -> None:
    """oneMKL's first-call race (pytorch#188792): how often a fresh process's first
    two-thread exp is inaccurate, without the guard and with it, alternated."""
    import subprocess

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_vector_math import _CHILD  # the test's child, with or without the guard

    bad = {"torch alone": [], "after import ensemble_kernel": []}
    for _ in range(processes):
        for name, guard in (("torch alone", "pass"),
                            ("after import ensemble_kernel", "import ensemble_kernel")):
            out = subprocess.run([sys.executable, "-c", _CHILD.format(guard=guard)],
                                 capture_output=True, text=True, check=True).stdout
            bad[name].append(float(out))
    for name, errors in bad.items():
        wrong = [e for e in errors if e > 2.4e-7]  # beyond 2 ulp of the rounded float64 exp
        print(f"{name}: {len(wrong)} of {len(errors)} processes inaccurate (largest relative "
              f"error {max(errors):.1e}; accurate ones at most "
              f"{max([e for e in errors if e <= 2.4e-7], default=float('nan')):.1e})")
    costs = [float(subprocess.run([sys.executable, "-c", _VML_COST], capture_output=True,
                                  text=True, check=True).stdout) for _ in range(3)]
    print("the guard's calls in a fresh process: " + ", ".join(f"{1e3 * c:.1f}" for c in costs)
          + " ms")


def compare(first: str, second: str) -> None:
    """Two `neighbors` files of the same test examples: rows with the same indices, and the
    largest difference of their values."""
    with np.load(first) as a, np.load(second) as b:
        same = (a["indices"] == b["indices"]).all(axis=1)
        diff = np.abs(a["values"].astype(np.float64) - b["values"]).max()
        print(f"{int(same.sum())} of {len(same)} rows with the same indices; largest value "
              f"difference {diff:.2e}")


def recipe(epochs: int, seed: int, models: int) -> None:
    from ensemble_kernel.core._engine import _top_k_neighbors
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
    found = _top_k_neighbors(test_l.half(), train_l.half(), 3)  # float16, as the store keeps them
    knn = float((y[found.indices].mode(1).values == yt).double().mean())
    ens = float((test_l.mean(0).argmax(-1) == yt).double().mean())
    single = float((test_l.argmax(-1) == yt).double().mean())
    print(f"{epochs} epochs, seed {seed}, {models} networks ({time.perf_counter() - t0:.0f} s): "
          f"single {100 * single:.1f}, average {100 * ens:.1f}, kernel 3-NN {100 * knn:.1f}, "
          f"gain {100 * (knn - ens):+.1f}")


def _cifar_logits(n_test: int | None = None):
    from ensemble_kernel.errors import InputError

    tag = DATA / "m500_tr50000_te10000_c10_s0_"
    for split in ("train", "test"):
        if not Path(f"{tag}{split}.npy").is_file():
            raise InputError(f"{tag}{split}.npy: not found; benchmarks/run.py writes the "
                             "CIFAR-shaped logits there (or pass --store)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory map
        train = torch.from_numpy(np.load(f"{tag}train.npy", mmap_mode="r"))
        test = torch.from_numpy(np.load(f"{tag}test.npy", mmap_mode="r"))
    return train, test if n_test is None else test[:, :n_test]


def _store_logits(store: str, n_test: int | None = None):
    """A store's train split, and its first `n_test` test examples (all: None)."""
    from ensemble_kernel.core._pilot import Spans as _Spans
    from ensemble_kernel.storage._store import RunStore

    runs = RunStore(store)
    train, test = runs.source("train"), runs.source("test")
    return train, test if n_test is None else _Spans(test, [(0, min(n_test, test.n_examples))])


def pilot(store: str, k: int, budget: int) -> None:
    """auto's pilot on a store: the share of test examples whose fast-mode candidates are
    crowded (`_pilot.crowded_share`), with the bound fast mode's plan would use, and its time."""
    from ensemble_kernel.core._engine import guessed_bound
    from ensemble_kernel.core._pilot import crowded_share as _crowded_share
    from ensemble_kernel.core._precision import fast_plan

    train, test = _store_logits(store)
    shape = dict(n_queries=test.n_examples, n_references=train.n_examples,
                 n_models=train.n_models, n_classes=train.n_classes, k=k,
                 memory_budget=budget, raw_bytes=2)
    plan = fast_plan(**shape)
    logging.basicConfig(format="%(message)s")  # the pilot's line: its median G
    logging.getLogger("ensemble_kernel.core._engine").setLevel(logging.INFO)
    logging.getLogger("ensemble_kernel.core._pilot").setLevel(logging.INFO)
    t0 = time.perf_counter()
    share = _crowded_share(test, train, k, plan, n_candidates=None, log_softmax=True,
                           classes=None, memory_budget=budget, device="cpu")
    print(f"{_machine()}\npilot on {store} ({train.n_models} runs), k = {k}, budget "
          f"{budget / 2**30:.1f} GiB ({plan.chunk_models} runs per block): "
          f"worst-case G = {guessed_bound(plan, train.n_models, train.n_classes):.4g}, "
          f"{100 * share:.0f}% of the sampled test "
          f"examples crowded, {time.perf_counter() - t0:.1f} s")


def stages(precision: str, k: int, n_test: int | None = None, budget: int = 1 << 30,
           store: str | None = None, runs: int | None = None) -> None:
    """Wall and CPU seconds spent in each stage the engine reports (statistics, kernel,
    rescore, fallback). CPU time (all threads) is the steadier figure on a shared machine.
    With `store`, that store's logits (e.g. bench_20k.py's, kept with --keep)."""
    from ensemble_kernel.core._engine import _top_k_neighbors

    train, test = _store_logits(store, n_test) if store else _cifar_logits(n_test)
    if runs is not None:  # the first `runs` runs (few runs: kernel values on few levels)
        train, test = train[:runs], test[:runs]
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    current = [None, time.perf_counter(), time.process_time()]

    def close(now_wall: float, now_cpu: float) -> None:
        if current[0] is not None:
            wall[current[0]] = wall.get(current[0], 0.0) + now_wall - current[1]
            cpu[current[0]] = cpu.get(current[0], 0.0) + now_cpu - current[2]

    def note(p):
        if p.stage != current[0]:
            now_wall, now_cpu = time.perf_counter(), time.process_time()
            close(now_wall, now_cpu)
            current[:] = [p.stage, now_wall, now_cpu]

    t0, c0 = time.perf_counter(), time.process_time()
    _top_k_neighbors(test, train, k, precision=precision, memory_budget=budget, progress=note)
    t1, c1 = time.perf_counter(), time.process_time()
    close(t1, c1)
    n_queries = test.n_examples if store else test.shape[1]
    print(f"{_machine()}\n{precision}, k = {k}, {n_queries} queries, budget "
          f"{budget / 2**30:.1f} GiB: {t1 - t0:.1f} s wall, "
          f"{c1 - c0:.1f} s CPU; per stage (wall / CPU, s): "
          + ", ".join(f"{s} {wall[s]:.1f} / {cpu[s]:.1f}" for s in wall))


def pairs(n_queries: int = 1000, n_candidates: int = 131, width: int = 1360,
          n_references: int = 50000) -> None:
    """Fast mode's re-score products for one block of runs: the gathered batched product
    it used against the sampled product it uses (CPU seconds, best of 3)."""
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(n_queries, width, generator=g), torch.randn(n_references, width, generator=g)
    cand = torch.randint(0, n_references, (n_queries, n_candidates), generator=g)
    crow = torch.arange(0, n_queries * n_candidates + 1, n_candidates)
    col, order = cand.sort(dim=1)

    def gathered():
        out = torch.empty(n_queries, n_candidates)
        for q0 in range(0, n_queries, 100):
            q = slice(q0, q0 + 100)
            out[q] = torch.bmm(fb[cand[q]], fa[q].unsqueeze(2)).squeeze(2)
        return out

    def sampled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = torch.sparse_csr_tensor(crow, col.flatten(), torch.zeros(crow[-1]),
                                        (n_queries, n_references))
        v = torch.sparse.sampled_addmm(s, fa, fb.T).values().reshape(n_queries, n_candidates)
        return torch.empty_like(v).scatter_(1, order, v)

    def best(f):
        times = []
        for _ in range(3):
            c0 = time.process_time()
            f()
            times.append(time.process_time() - c0)
        return min(times)

    diff = float((gathered() - sampled()).abs().max())
    print(f"{_machine()}\n{n_queries} queries x {n_candidates} candidates, d = {width}, "
          f"{n_references} references: gather + bmm {best(gathered):.2f} CPU s, "
          f"sampled_addmm {best(sampled):.2f} CPU s (largest difference {diff:.1e})")


def layout(repeats: int = 5) -> None:
    """fast mode's product for one CIFAR-shaped tile (10,000 queries x 25,000 references,
    5,000 features, bfloat16): with the references' transpose as a strided view, against
    copying it contiguous first (what the engine did before), alternated."""
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(10_000, 5_000, generator=g).bfloat16()
    fb = torch.randn(25_000, 5_000, generator=g).bfloat16()
    out = torch.empty(10_000, 25_000, dtype=torch.bfloat16)
    copy = torch.empty(5_000, 25_000, dtype=torch.bfloat16)
    times: dict[str, list[float]] = {"strided view": [], "contiguous copy, then product": []}
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(fa, fb.T, out=out)
        times["strided view"].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(fa, copy.copy_(fb.T), out=out)
        times["contiguous copy, then product"].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: " + ", ".join(f"{x:.2f}" for x in sorted(ts)) + " s")


def squares(repeats: int = 20) -> None:
    """The statistics pass's sum of squares over the runs of a block (the leading axis of
    (runs, rows, classes)), as `vector_norm(dim=0)` squared and as a product summed, for
    blocks of few and many runs (the sweep's small subsets have blocks of 1 to 16 runs)."""
    g = torch.Generator().manual_seed(0)
    for n_b, rows in ((1, 26_000), (2, 26_000), (4, 26_000), (16, 13_000), (128, 1_600),
                      (500, 400)):
        d = torch.randn(n_b, rows, 10, generator=g)
        ways = {"vector_norm(dim=0) squared":
                lambda: torch.linalg.vector_norm(d, dim=0).square_(),
                "mul, sum(dim=0)": lambda: torch.mul(d, d).sum(dim=0)}
        out = []
        for name, f in ways.items():
            f()
            t = time.perf_counter()
            for _ in range(repeats):
                f()
            out.append(f"{name} {(time.perf_counter() - t) / repeats / d.numel() * 1e9:.2f}")
        print(f"{n_b:4d} runs x {rows} rows x 10 classes, ns per value: " + ", ".join(out))


def logsoftmax(repeats: int = 20) -> None:
    """The engine's log-softmax (`kernel._log_softmax_`) against its former first step,
    `amax` then `argmax` over the class axis (two reductions where `max` is one), on
    blocks of the shapes the passes read: (runs, rows, classes) and (rows, runs, classes)."""
    from ensemble_kernel.core._kernel import _log_softmax_

    def former(x):
        x -= x.amax(dim=-1, keepdim=True)
        others = x.exp()
        others.scatter_(-1, x.argmax(dim=-1, keepdim=True), 0.0)
        mass = others.sum(dim=-1, keepdim=True)
        x.sub_(mass.log1p())
        return mass

    g = torch.Generator().manual_seed(0)
    for shape in ((23, 50_000, 10), (2_000, 23, 10), (1, 26_000, 10), (160_000, 10, 10)):
        x0 = torch.randn(*shape, generator=g) * 5
        times: dict[str, list[float]] = {"amax, argmax (former)": [], "max (now)": []}
        for _ in range(repeats):
            for name, f in (("amax, argmax (former)", former), ("max (now)", _log_softmax_)):
                x = x0.clone()
                t = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - t)
        same = torch.equal(former(x0.clone()), _log_softmax_(x0.clone()))
        print(f"{str(shape):>18}: " + ", ".join(
            f"{name} {np.median(ts) / x0.numel() * 1e9:.2f} ns/value" for name, ts in times.items())
            + f" (median of {repeats}; same masses: {same})")


def perclass(repeats: int = 3) -> None:
    """The ablation pass's batched product, (10, 2,000, runs) @ (10, runs, tile) added into
    its accumulator, by runs per block: with few runs it is bound by the accumulator's
    memory traffic, not by arithmetic. Against one float32 product of the same FLOP."""
    g = torch.Generator().manual_seed(0)
    n_q, n_classes = 2_000, 10
    for runs, tile in ((25, 12_500), (50, 12_500), (100, 6_250), (250, 5_000), (500, 5_000)):
        a = torch.randn(n_classes, n_q, runs, generator=g)
        b = torch.randn(n_classes, runs, tile, generator=g)
        acc = torch.zeros(n_classes, n_q, tile)
        acc.baddbmm_(a, b)
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            acc.baddbmm_(a, b)
            rates.append(2 * a.numel() * tile / (time.perf_counter() - t) / 1e9)
        print(f"{runs:4d} runs per block, tile {tile}: " + ", ".join(f"{r:.0f}" for r in rates)
              + " GFLOP/s")
    a = torch.randn(n_q, 5_000, generator=g)
    b = torch.randn(5_000, 5_000, generator=g)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * a.numel() * 5_000 / (time.perf_counter() - t) / 1e9)
    print("one float32 product (2,000 x 5,000) @ (5,000 x 5,000): "
          + ", ".join(f"{r:.0f}" for r in rates) + " GFLOP/s")


def ablations(store: str, n_test: int, budget: int, repeats: int = 2) -> None:
    """The report's ablation pass (`ablations.ablation_neighbors`: ten per-class kernels
    and the one without log-softmax, k = 3) on `n_test` test examples of a store, with
    the plan's blocks of runs chosen for the per-class products (now) and by the
    contraction width of all its features (former), alternated; same neighbours?"""
    from ensemble_kernel.analysis import _ablations as ab
    from ensemble_kernel.core._plan import plan_memory

    train, test = _store_logits(store, n_test)

    def former_plan(*args, block_runs=None, **kwargs):
        return plan_memory(*args, **kwargs)

    print(f"{_machine()}\nablations on {store}: {test.n_examples} queries, "
          f"{train.n_models} runs, budget {budget / 2**30:.2f} GiB")
    found = {}
    for r in range(repeats):
        for name in ("former", "now"):
            ab.plan_memory = former_plan if name == "former" else plan_memory
            t = time.perf_counter()
            try:
                found[name] = ab.ablation_neighbors(test, train, 3, memory_budget=budget)
            finally:
                ab.plan_memory = plan_memory
            print(f"  {name:>6}, repeat {r}: {time.perf_counter() - t:.1f} s", flush=True)
    same = all(torch.equal(a.indices, b.indices) for a, b in
               zip(found["former"].per_class + (found["former"].no_log_softmax,),
                   found["now"].per_class + (found["now"].no_log_softmax,)))
    print(f"  same neighbours in every kernel: {same}")


def classmajor(repeats: int = 6) -> None:
    """The ablations' batched per-class product for one block of runs at CIFAR shape (2,000
    queries, a tile of 12,500 references, 250 runs, 10 classes), with the references'
    features made class-major by a 3-D transposing copy (before) or as a strided view of
    one 2-D transpose (now), alternated; the same values?"""
    g = torch.Generator().manual_seed(0)
    n_t, n_r, n_c, n_q = 12_500, 250, 10, 2000
    fb, fa = torch.randn(n_t, n_r * n_c, generator=g), torch.randn(n_q, n_r * n_c, generator=g)
    a = fa.view(n_q, n_r, n_c).permute(2, 0, 1).contiguous()
    ways = {"before": lambda: torch.bmm(a, fb.view(n_t, n_r, n_c).permute(2, 1, 0).contiguous()),
            "now": lambda: torch.bmm(a, fb.T.contiguous().view(n_r, n_c, n_t).permute(1, 0, 2))}
    times: dict[str, list[float]] = {name: [] for name in ways}
    out = {}
    for _ in range(repeats):
        for name, way in ways.items():
            t = time.perf_counter()
            out[name] = way()
            times[name].append(time.perf_counter() - t)
    print(f"{_machine()}\nper-class product, {n_q} x {n_t}, {n_r} runs x {n_c} classes, "
          f"{repeats} repeats (s): " + "; ".join(
              f"{name} median {np.median(v):.3f} ({min(v):.3f} to {max(v):.3f})"
              for name, v in times.items())
          + f"; same values: {torch.equal(out['before'], out['now'])}")


def nologsoftmax(store: str, budget: int, n_test: int = 2000, repeats: int = 2) -> None:
    """The report's kernel without log-softmax (its ablation when the pass cannot hold it:
    2,000 test examples spread evenly, k = 3) in auto, exact and fast mode, alternated;
    auto's choice as it logs it (the first auto also pays the probe, if not cached)."""
    from ensemble_kernel.core._engine import _top_k_neighbors
    from ensemble_kernel.core._sources import read_sample, sample_positions

    train, test = _store_logits(store)
    n_test = min(n_test, test.n_examples)
    test = read_sample(test, sample_positions(test.n_examples, n_test), budget // 4)
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("ensemble_kernel.core._precision").setLevel(logging.INFO)
    print(f"{_machine()}\nno-log-softmax kernel on {store}: {n_test} test examples, k = 3, "
          f"budget {budget / 2**30:.2f} GiB")
    for r in range(repeats):
        for precision in ("auto", "exact", "fast"):
            t = time.perf_counter()
            _top_k_neighbors(test, train, 3, log_softmax=False, precision=precision,
                             memory_budget=budget)
            print(f"  {precision:>5}, repeat {r}: {time.perf_counter() - t:.2f} s", flush=True)


def sweepkernels(store: str, budget: int, k: int = 20, n_test: int = 2000) -> None:
    """The sweep's subset kernels (`sweeps.sweep` at its defaults: 2,000 test examples
    spread evenly, k = 20, the first subset of each run count), each timed in exact and
    in fast mode, alternated, beside the times the probe's cached rates predict for its
    shape (`precision.predict_times`, with the assumed crowded share); same neighbours?"""
    from ensemble_kernel.core._engine import _top_k_neighbors
    from ensemble_kernel.core._precision import FALLBACK_SHARE, predict_times, probe
    from ensemble_kernel.core._sources import read_sample, sample_positions, select_runs
    from ensemble_kernel.analysis._sweep import default_run_counts

    train, test = _store_logits(store)
    n_test = min(n_test, test.n_examples)
    test = read_sample(test, sample_positions(test.n_examples, n_test), budget // 4)
    rates, _ = probe(torch.device("cpu"))
    print(f"{_machine()}\nsweep kernels on {store}: {n_test} test examples, k = {k}, budget "
          f"{budget / 2**30:.2f} GiB")
    print("| runs | exact (s) | fast (s) | predicted exact / fast (s) | same neighbours |\n"
          "| ---: | ---: | ---: | ---: | --- |")
    for n in default_run_counts(train.n_models)[1:]:
        sub_train, sub_test = select_runs(train, slice(0, n)), select_runs(test, slice(0, n))
        walls, found = {}, {}
        for precision in ("exact", "fast"):
            t = time.perf_counter()
            found[precision] = _top_k_neighbors(sub_test, sub_train, k, precision=precision,
                                                memory_budget=budget)
            walls[precision] = time.perf_counter() - t
        exact_s, fast_s = predict_times(rates, n_queries=n_test, n_references=train.n_examples,
                                        n_models=n, n_classes=train.n_classes, k=k,
                                        memory_budget=budget, whole_share=FALLBACK_SHARE)
        same = bool((found["exact"].indices == found["fast"].indices).all())
        print(f"| {n} | {walls['exact']:.2f} | {walls['fast']:.2f} | {exact_s:.2f} / "
              f"{fast_s:.2f} | {same} |", flush=True)


def sweepstats(store: str, budget: int, n_test: int = 2000, repeats: int = 3) -> None:
    """The statistics of the subsets the sweep computes (its defaults: 3 subsets a run
    count, 2,000 test examples), both splits: one shared pass (`engine.shared_statistics`,
    as the sweep runs it now) against each subset's own engine pass (as before, exact
    mode's plan for k = 20), alternated. How far apart are the train statistics? (The
    same float32 values, summed by the same accumulator; the last bits of a sum differ
    where the two cut the rows into pieces differently, as two plans of the engine do.)"""
    from ensemble_kernel.core._engine import _prepare_engine, shared_statistics
    from ensemble_kernel.core._sources import read_sample, sample_positions, select_runs
    from ensemble_kernel.analysis._sweep import DEFAULT_MAX_SUBSETS, default_run_counts, disjoint_subsets

    train, test = _store_logits(store)
    n_test = min(n_test, test.n_examples)
    test = read_sample(test, sample_positions(test.n_examples, n_test), budget // 4)
    parts = [p for n in default_run_counts(train.n_models) if 2 <= n < train.n_models
             for p in disjoint_subsets(train.n_models, n, DEFAULT_MAX_SUBSETS)]
    print(f"{_machine()}\nsweep statistics on {store}: {len(parts)} subsets, "
          f"{sum(p.stop - p.start for p in parts)} runs in all, "
          f"{max(p.stop for p in parts)} in their union; {n_test} test examples")
    device = torch.device("cpu")

    def shared():
        return [shared_statistics(source, parts, device=device, budget=budget // 4)
                for source in (train, test)]

    def alone():
        out = []
        for part in parts:
            sub_train, sub_test = select_runs(train, part), select_runs(test, part)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                eng = _prepare_engine(sub_test, sub_train, 20, log_softmax=True,
                                      classes=None, exclude_self=False, precision="exact",
                                      memory_budget=budget, device=device, chunk_models=None,
                                      tile_size=None, progress=None, k_keep=20)
            out.append((eng.stats_r, eng.stats_q))
        return out

    walls = {"shared": [], "alone": []}
    for _ in range(repeats):
        for name, f in (("shared", shared), ("alone", alone)):
            t = time.perf_counter()
            found = f()
            walls[name].append(time.perf_counter() - t)
            if name == "shared":
                of_train = found[0]
            else:
                pairs = [(got, want[0]) for got, want in zip(of_train, found) if got is not None]
                same = sum(torch.equal(g[0], w.mean) and torch.equal(g[1], w.scale)
                           for g, w in pairs)
                apart = max((float(((g[i] - v).abs() / v.abs().clamp(min=1e-300)).max())
                             for g, w in pairs for i, v in ((0, w.mean), (1, w.scale))),
                            default=0.0)
                left = len(parts) - len(pairs)
    for name, w in walls.items():
        print(f"{name}: {', '.join(f'{x:.2f}' for x in w)} s")
    print(f"train statistics: {same} of {len(pairs)} shared subsets the same bits, the "
          f"largest relative difference {apart:.2g}; {left} of {len(parts)} subsets left to "
          "their engines (float64)")


_FAULTS_CHILD = r"""
import atexit, functools, resource, sys, time
trim = int(sys.argv.pop(1))
import ensemble_kernel.cli as cli
cli.return_large_blocks = functools.partial(cli.return_large_blocks, trim=trim)
start = time.perf_counter()
def report():
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"FAULTS {r.ru_minflt} {r.ru_stime:.2f} {r.ru_utime:.2f} "
          f"{time.perf_counter() - start:.2f} {r.ru_maxrss}", file=sys.stderr)
atexit.register(report)
sys.argv[0] = "ensemble-kernel"
cli.main()
"""


def faults(store: str, budget: str, repeats: int = 2) -> None:
    """Page faults, system and user time, wall and peak RSS of `evaluate STORE` with the
    program's glibc trim threshold (`cli/malloc.py`, 64 MiB) and with the 128 KiB it was
    frozen at before (the mmap threshold set alone), alternated in fresh processes."""
    import subprocess

    from ensemble_kernel.cli.common import parse_size
    from ensemble_kernel.cli.malloc import TRIM_THRESHOLD
    from ensemble_kernel.storage._store import RunStore

    parse_size(budget), RunStore(store)  # a bad budget or store: refused here, in one line
    print(f"{_machine()}\nevaluate {store} --memory-budget {budget}")
    for r in range(repeats):
        for name, trim in (("trim 128 KiB (before)", 128 << 10),
                           (f"trim {TRIM_THRESHOLD >> 20} MiB (now)", TRIM_THRESHOLD)):
            done = subprocess.run([sys.executable, "-c", _FAULTS_CHILD, str(trim), "evaluate",
                                   store, "--memory-budget", budget, "-q"],
                                  capture_output=True, text=True, check=True)
            line = [x for x in done.stderr.splitlines() if x.startswith("FAULTS ")][-1]
            minflt, stime, utime, wall, maxrss = line.split()[1:]
            print(f"  {name:>22}, repeat {r}: {int(minflt):,} page faults, system "
                  f"{stime} s, user {utime} s, wall {wall} s, peak RSS "
                  f"{int(maxrss) / 1024:.0f} MiB", flush=True)


def scipyimport(repeats: int = 3) -> None:
    """Seconds to import scipy.stats in a fresh process (the report's significance
    needed it before; `sweeps.py` computes McNemar and the bootstrap without it now),
    and the time of both on 2,000 examples once imported."""
    import subprocess

    code = ("import time; t = time.perf_counter(); import scipy.stats; "
            "print(time.perf_counter() - t)")
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(repeats)]
    print(f"{_machine()}\nimport scipy.stats in a fresh process: "
          + ", ".join(f"{x:.2f}" for x in runs) + " s")
    from ensemble_kernel.analysis._sweep import bootstrap_difference, mcnemar_exact

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2000, generator=g) < 0.95, torch.rand(2000, generator=g) < 0.93
    t = time.perf_counter()
    mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))
    bootstrap_difference(a, b)
    print(f"McNemar and the bootstrap on 2,000 examples: {time.perf_counter() - t:.3f} s")


def _machine() -> str:
    """CPU model, the ISA flags that matter here, and torch's threads."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")
    isa = " ".join(f for f in wanted if f in flags) or "flags unknown"
    return (f"{model} ({isa}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")


def candidates(k: int, store: str | None = None, n_test: int = 1000,
               longest: int = 1024) -> None:
    """For candidate lists of growing length, the share of queries the error bound settles.

    On the benchmark's CIFAR-shaped logits, or on a store (`--store demo-output/store`).
    """
    from ensemble_kernel.core._engine import _prepare_engine
    from ensemble_kernel.core._kernel import bfloat16_matmul, exact_float32_matmul

    if store is None:
        train, test = _cifar_logits(n_test)
    else:
        from ensemble_kernel.storage._store import RunStore

        runs = RunStore(store)
        train, test = runs.source("train"), runs.source("test")
        n_test = test.n_examples
        longest = min(longest, train.n_examples)
    engine = _prepare_engine(test, train, k, log_softmax=True, classes=None, exclude_self=False,
                             precision="fast", memory_budget=1 << 30, device="cpu",
                             chunk_models=None, tile_size=None, progress=None, k_keep=longest)
    with bfloat16_matmul("cpu"):
        approx = engine.search(longest, dtype=torch.bfloat16)
    with exact_float32_matmul("cpu"):
        scored = engine.rescore(approx.indices)
    low = approx.values.double()

    def bound(n: int) -> torch.Tensor:  # as fast mode's, for a list of n (its largest value)
        return engine.low_precision_bound(scored, torch.maximum(low[:, 0].abs(),
                                                                low[:, n - 1].abs()))
    top1 = scored.values.max(dim=1).values
    print(f"{n_test} test examples, k = {k}: median bound {float(bound(k + 128).median()):.4f}"
          f" (for k + 128 candidates), median top-1 kernel value {float(top1.median()):.4f}")
    for n in sorted({min(n, longest) for n in (k + 32, 64, 128, k + 128, 256, 512, longest)}):
        kth = scored.values[:, :n].topk(k, dim=1).values[:, -1].double()
        settled = low[:, n - 1] + bound(n) < kth
        print(f"  {n:5d} candidates: {100 * float(settled.double().mean()):.1f}% settled")


def int8_windows(train, test, k: int, n_candidates: int = 128,
                 block: int = 5000) -> tuple[int, dict[str, dict]]:
    """Would an int8 candidate pass pay? Its proof's bound against bfloat16's, on real features.

    Any rigorous bound on |a_hat . b_hat - a . b| over pairs never computed, from norms
    alone, is at least the inputs' term of `bounds.low_precision_error`, summed over the
    blocks of runs that share a scale: sum over blocks of ||a_hat - a|| ||b|| + ||a||
    ||b_hat - b|| + ||a_hat - a|| ||b_hat - b||, over n_terms (Cauchy-Schwarz, tight when
    the vectors are parallel; the int32 sums of an int8 product are exact, so int8 adds
    little else). The engine takes it at the largest reference norms (one bound B per
    query); one bound per pair is the least it could be. The rounding is bfloat16's, and
    int8's with one scale per feature row, or per row and block of runs (its largest
    |value| / 127, the usual symmetric quantisation).

    Fast mode (`engine._fast_search`) re-scores the candidates within 2B of the k-th
    value; where they pass its list of k + `n_candidates`, it re-scores them all and the
    query is settled only if the last one lies B below the exact k-th value: a query with
    more than the list within 1B of it is computed whole. Counted here on exact values.

    Returns
    -------
    (runs, figures): per format, the median rounding relative to ||a||, the largest actual
    error, the pairs whose actual error passes their bound (0: the bound holds), and per
    bound ('query', 'pair') its median and each query's windows within 2B and 1B.
    """
    from ensemble_kernel.core._engine import _prepare_engine

    engine = _prepare_engine(test, train, k, log_softmax=True, classes=None, exclude_self=False,
                             precision="exact", memory_budget=4 << 30, device="cpu",
                             chunk_models=None, tile_size=None, progress=None, k_keep=k)
    runs, n_terms = slice(0, engine.n_models), engine.n_models * engine.n_used
    test, train = engine.queries, engine.references
    d = engine.n_models * engine.n_used

    def int8(x: torch.Tensor, width: int) -> torch.Tensor:  # what an int8 product would see
        out = torch.empty_like(x)
        for c in range(0, d, width):  # one scale per row and block of runs
            part = x[:, c:c + width]
            scale = part.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
            out[:, c:c + width] = (part / scale).round_().clamp_(-127, 127) * scale
        return out

    widths = {"bfloat16": d, "int8, a scale per row": d,  # feature columns per scale
              "int8, a scale per row and 50 runs": 50 * engine.n_used,
              "int8, a scale per row and 5 runs": 5 * engine.n_used}

    def cast(name: str, x: torch.Tensor) -> torch.Tensor:
        return x.bfloat16().float() if name == "bfloat16" else int8(x, widths[name])

    def norms(x: torch.Tensor, width: int) -> torch.Tensor:  # (rows, blocks), float64
        return torch.stack([part.double().norm(dim=1) for part in x.split(width, dim=1)], 1)

    def bound(a_round, a_norm, b_round, b_norm):  # (queries, blocks) @ (blocks, references)
        return (a_round @ b_norm.T + a_norm @ b_round.T + a_round @ b_round.T) / n_terms

    a = engine._features(test, engine.stats_q, runs, slice(0, test.n_examples), torch.float32)
    a_hat = {name: cast(name, a) for name in widths}
    a_norm = {name: norms(a, w) for name, w in widths.items()}
    a_round = {name: norms(a_hat[name] - a, w) for name, w in widths.items()}
    exact = torch.empty(a.shape[0], train.n_examples, dtype=torch.float64)
    b_norm = {name: [] for name in widths}
    b_round = {name: [] for name in widths}  # ||b_hat - b|| per row and block
    figures = {name: dict(error=0.0, violations=0) for name in widths}
    for r0 in range(0, train.n_examples, block):
        rows = slice(r0, min(r0 + block, train.n_examples))
        b = engine._features(train, engine.stats_r, runs, rows, torch.float32)
        exact[:, rows] = a.double() @ b.double().T / n_terms
        for name, width in widths.items():
            b_hat = cast(name, b)
            b_norm[name].append(norms(b, width))
            b_round[name].append(norms(b_hat - b, width))
            error = (a_hat[name].double() @ b_hat.double().T / n_terms - exact[:, rows]).abs()
            pair = bound(a_round[name], a_norm[name], b_round[name][-1], b_norm[name][-1])
            figures[name]["error"] = max(figures[name]["error"], float(error.max()))
            figures[name]["violations"] += int((error > pair).sum())
    kth = exact.topk(k, dim=1).values[:, -1:]
    for name, f in figures.items():
        b_n, b_r = torch.cat(b_norm[name]), torch.cat(b_round[name])
        f["rounding"] = float((a_round[name].norm(dim=1) / a_norm[name].norm(dim=1)).median())
        most = bound(a_round[name], a_norm[name], b_r.amax(0, keepdim=True),
                     b_n.amax(0, keepdim=True))  # (queries, 1)
        pair = bound(a_round[name], a_norm[name], b_r, b_n)
        for kind, b in (("query", most), ("pair", pair)):
            f[kind] = (float(b.median()), (exact >= kth - 2 * b).sum(dim=1),
                       (exact >= kth - b).sum(dim=1))
        f["pair_within_query"] = bool((pair <= most * (1 + 1e-12)).all())
    return engine.n_models, figures


def int8(k: int, store: str | None = None, n_test: int = 400, n_candidates: int = 128) -> None:
    """`int8_windows` for `n_test` test examples against every training example."""
    train, test = _cifar_logits(n_test) if store is None else _store_logits(store, n_test)
    runs, figures = int8_windows(train, test, k, n_candidates)
    n_test = len(figures["bfloat16"]["query"][1])
    n_train = train.shape[1] if isinstance(train, torch.Tensor) else train.n_examples
    print(f"{_machine()}\n{n_test} test examples x {n_train} training examples, {runs} runs, "
          f"k = {k}; a list of k + {n_candidates} candidates. B: the bound's inputs' term. "
          "Windows: the candidates within 2B of the exact k-th value (re-scored) and "
          "within 1B (more than the list: computed whole)")
    for name, f in figures.items():
        print(f"  {name}: rounding / norm {f['rounding']:.2e} (median), largest actual error "
              f"{f['error']:.2e}, pairs past their bound {f['violations']}")
        for kind in ("query", "pair"):
            median, twice, once = f[kind][0], f[kind][1].double(), f[kind][2].double()
            print(f"    one bound per {kind}: B {median:.2e} (median); within 2B median "
                  f"{float(twice.median()):.0f} (90th percentile "
                  f"{float(twice.quantile(0.9)):.0f}); within 1B median "
                  f"{float(once.median()):.0f} (90th percentile "
                  f"{float(once.quantile(0.9)):.0f}), "
                  f"{100 * float((once > k + n_candidates).double().mean()):.1f}% of the "
                  f"queries computed whole")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["stats", "reduce", "storeread", "recipe", "stages",
                                    "candidates", "pairs", "pilot", "vmlrace", "compare", "layout",
                                    "squares", "logsoftmax", "perclass", "ablations", "faults",
                                    "scipyimport", "sweepkernels", "classmajor",
                                    "nologsoftmax", "sweepstats", "int8"])
    p.add_argument("--precision", default="fast")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--store", help="candidates, stages, storeread: a store instead of the "
                   "CIFAR-shaped logits (or the store benchmarks' stores)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--models", type=int, default=128)
    p.add_argument("--n-test", type=int, help="stages: only the first N test examples")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--processes", type=int, default=40,
                   help="vmlrace: fresh processes of each kind (default 40)")
    p.add_argument("--runs", type=int, help="stages: only the first N runs (CIFAR logits)")
    p.add_argument("--memory-budget", default="1GiB",
                   help="stages: the engine's budget, e.g. 1GiB (default) or 5GiB")
    p.add_argument("files", nargs="*", help="compare: two neighbors .npz files")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header(describe()), flush=True)

    from ensemble_kernel.errors import EnsembleKernelError

    try:
        _dispatch(p, args)
    except EnsembleKernelError as e:  # a bad store, k, budget, missing data: one line
        p.error(str(e))


def _dispatch(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Run the measurement `args.what` names."""
    def budget() -> int:
        from ensemble_kernel.cli.common import parse_size

        return parse_size(args.memory_budget)

    on_a_store = {  # report_bench.py's store (or any): these take --store
        "ablations": lambda: ablations(args.store, args.n_test or 2000, budget()),
        "faults": lambda: faults(args.store, args.memory_budget),
        "nologsoftmax": lambda: nologsoftmax(args.store, budget(), args.n_test or 2000),
        "sweepkernels": lambda: sweepkernels(args.store, budget(), n_test=args.n_test or 2000),
        "sweepstats": lambda: sweepstats(args.store, budget(), n_test=args.n_test or 2000),
    }
    if args.what in on_a_store:
        if not args.store:
            p.error(f"{args.what} needs --store STORE (benchmarks/report_bench.py builds one)")
        on_a_store[args.what]()
    elif args.what == "recipe":
        recipe(args.epochs, args.seed, args.models)
    elif args.what == "stages":
        from ensemble_kernel.cli.common import parse_size

        if args.runs is not None and (args.store or args.runs < 1):
            p.error("--runs takes a positive count of the CIFAR-shaped logits' runs (not with "
                    "--store)")
        stages(args.precision, args.k, args.n_test, parse_size(args.memory_budget), args.store,
               args.runs)
    elif args.what == "pilot":
        from ensemble_kernel.cli.common import parse_size

        if not args.store:
            p.error("pilot needs --store STORE (for example bench_20k.py's, kept with --keep)")
        if args.k < 1:
            p.error(f"--k must be at least 1, got {args.k}")
        pilot(args.store, args.k, parse_size(args.memory_budget))
    elif args.what == "pairs":
        pairs()
    elif args.what == "candidates":
        candidates(args.k, args.store)
    elif args.what == "int8":
        int8(args.k, args.store, args.n_test or 400)
    elif args.what == "storeread":
        storeread(args.store)
    elif args.what == "layout":
        layout()
    elif args.what == "squares":
        squares()
    elif args.what == "logsoftmax":
        logsoftmax()
    elif args.what == "perclass":
        perclass()
    elif args.what == "classmajor":
        classmajor()
    elif args.what == "scipyimport":
        scipyimport()
    elif args.what == "vmlrace":
        vmlrace(args.processes)
    elif args.what == "compare":
        if len(args.files) != 2:
            p.error("compare takes two neighbors .npz files")
        for f in args.files:
            if not Path(f).is_file():
                p.error(f"{f}: no such file (compare takes two neighbors .npz files)")
        compare(*args.files)
    else:
        {"stats": stats, "reduce": reduce}[args.what]()


if __name__ == "__main__":
    main()
