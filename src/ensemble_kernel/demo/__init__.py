"""The embedded default (docs/architecture.md §6): train an ensemble on the CPU, store it, show the kernel.

`run_demo` generates the data, trains the networks in one batched computation, writes a
store (logits of every run, labels, inputs, one run's penultimate features), evaluates,
sweeps over the number of runs, and writes summary.json, sweep.{png,csv,json} and
record.json into the output folder.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._atomic import atomic_write_text
from ..errors import InputError
from ..core._engine import KeptStatistics, _top_k_neighbors
from ..analysis._evaluation import Evaluation, evaluate
from ..storage._store import RunStore
from ..analysis._sweep import DEFAULT_MAX_SUBSETS, SweepResult, sweep
from .data import DATASETS, load_dataset
from .output import check_output_folder, claim_output_folder, new_store_path, publish_store
from .train import TrainConfig, init_ensemble, predict, train_ensemble

__all__ = ["DemoOptions", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "mnist1d"  # 'mnist1d' or 'digits'
    models: int = 192  # networks in the ensemble
    seed: int = 0  # every network's initialisation and data order derive from it
    out: Path = Path("demo-output")
    train: TrainConfig = field(default_factory=TrainConfig)
    batch_models: int = 32  # networks per batched computation
    force: bool = False  # replace OUT/store even if the demo did not make it
    max_subsets: int | None = DEFAULT_MAX_SUBSETS  # sweep's subsets per run count; None: all


@dataclass(frozen=True)
class DemoResult:
    evaluation: Evaluation
    sweep: SweepResult
    paths: dict[str, Path]
    timings: dict[str, float]


def _seeds(seed: int, n: int) -> list[int]:
    # Spread seeds apart so that runs of different --seed values do not overlap.
    return [seed * 1_000_003 + i for i in range(n)]


def _train(options: DemoOptions, data, progress) -> tuple[torch.Tensor, ...]:
    x_train = torch.from_numpy(data.signals("train"))
    x_test = torch.from_numpy(data.signals("test"))
    y_train = torch.from_numpy(data.y_train)
    seeds = _seeds(options.seed, options.models)
    logits_train, logits_test = [], []
    features = None
    for b in range(0, options.models, options.batch_models):
        group = seeds[b:b + options.batch_models]
        ensemble = init_ensemble(group, x_train.shape[1], len(data.class_names),
                                 options.train.channels)

        def report(step: int, total: int, first=b, n=len(group)) -> None:
            if progress is not None:
                progress("training", first + n * step / total, options.models)

        ensemble = train_ensemble(ensemble, x_train, y_train, options.train, report)
        lo_train, fe_train = predict(ensemble, x_train)
        lo_test, fe_test = predict(ensemble, x_test)
        logits_train.append(lo_train)
        logits_test.append(lo_test)
        if features is None:  # the first run's penultimate layer, for the comparison view
            features = (fe_train[0].clone(), fe_test[0].clone())
    return torch.cat(logits_train), torch.cat(logits_test), features[0], features[1]


def run_demo(options: DemoOptions,
             progress: Callable[[str, float, float], None] | None = None) -> DemoResult:
    """Train, store, evaluate and sweep; write the files; return what was measured.

    Every option and the output folder are checked before anything is computed or
    written; `OUT/store` is replaced only if the demo made it (see `demo.output`).
    """
    check_options(options)
    out = options.out
    check_output_folder(out, force=options.force)
    timings = {}
    t0 = time.perf_counter()
    data = load_dataset(options.dataset)
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logits_train, logits_test, feat_train, feat_test = _train(options, data, progress)
    timings["training_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    check_output_folder(out, force=options.force)  # again: training takes minutes
    marker = claim_output_folder(out)
    building = new_store_path(out, marker)
    try:
        _write_store(building, data, options, logits_train, logits_test, feat_train, feat_test)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    store_path = publish_store(out, building, marker)
    store = RunStore(store_path)
    timings["store_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train, test = store.source("train"), store.source("test")
    labels_train, labels_test = store.labels("train"), store.labels("test")
    kernel_progress = None if progress is None else (
        lambda p: progress(p.stage, p.done, p.total))
    kept = KeptStatistics(train)  # the train statistics, again for the sweep's ablations
    found = _top_k_neighbors(test, train, 20, progress=kernel_progress, kept_statistics=kept)
    evaluation = evaluate(train, test, labels_train, labels_test, k=3, weighted_k=20, power=4,
                          neighbors=found)
    timings["evaluate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = sweep(train, test, labels_train, labels_test, neighbors=found,
                   max_subsets=options.max_subsets, progress=kernel_progress, kept_statistics=kept)
    timings["sweep_s"] = time.perf_counter() - t0

    from ..report.files import sweep_json, write_sweep  # matplotlib only when writing

    paths = {"store": store_path}
    png, csv_path, json_path = write_sweep(
        result, out, title=f"{options.dataset}: {options.models} runs, seed {options.seed}")
    paths.update(sweep_png=png, sweep_csv=csv_path, sweep_json=json_path)
    # The significance and ablations come from the sweep: on result.n_test test examples.
    summary = {**summary_of(evaluation), "significance": sweep_json(result)["significance"],
               "ablations": result.ablations, "sweep_n_test": result.n_test}
    paths["summary"] = out / "summary.json"
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2))
    t0 = time.perf_counter()
    from ..report.build import build_report
    from ..report.grids import InputRenderer

    paths["report"] = out / "report.html"
    build_report(train, test, labels_train, labels_test, found=found, out=paths["report"],
                 source=str(store_path), renderer=InputRenderer(data.x_train, data.x_test),
                 class_names=data.class_names, features_train=feat_train.numpy(),
                 features_test=feat_test.numpy(), evaluation=evaluation, sweep_result=result)
    timings["report_s"] = time.perf_counter() - t0
    record = {"options": {**asdict(options), "out": str(options.out)},
              "versions": _versions(), "seed": options.seed,
              "timings": {k: round(v, 3) for k, v in timings.items()},
              "n_train": len(data.y_train), "n_test": len(data.y_test)}
    paths["record"] = out / "record.json"
    atomic_write_text(paths["record"], json.dumps(record, indent=2, default=str))
    return DemoResult(evaluation, result, paths, timings)


def check_options(options: DemoOptions) -> None:
    """Raise InputError for an option the demo cannot run with (before any work)."""
    if options.dataset not in DATASETS:
        raise InputError(f"--dataset takes {' or '.join(DATASETS)}, got {options.dataset!r}")
    if options.models < 2:
        raise InputError(f"--models must be at least 2 (the kernel needs 2 runs), got "
                         f"{options.models}")
    if options.max_subsets is not None and options.max_subsets < 1:
        raise InputError(f"--max-subsets must be at least 1, got {options.max_subsets}")
    if options.batch_models < 1:
        raise InputError(f"batch_models must be at least 1, got {options.batch_models}")


def _write_store(path: Path, data, options: DemoOptions, logits_train, logits_test,
                 feat_train, feat_test) -> None:
    arrays = {"labels_train": data.y_train, "labels_test": data.y_test,
              "inputs_train": data.x_train, "inputs_test": data.x_test,
              "features_train": feat_train.numpy(), "features_test": feat_test.numpy()}
    store = RunStore.create(path, n_train=len(data.y_train), n_test=len(data.y_test),
                            n_classes=len(data.class_names), class_names=data.class_names,
                            arrays=arrays)  # one commit, not one per array
    store.append_arrays(logits_train, logits_test, source=f"demo:{options.dataset}",
                        seeds=_seeds(options.seed, options.models))


def summary_of(evaluation: Evaluation) -> dict:
    """The keys of `evaluate --json`."""
    return {"n_models": evaluation.n_models, "k": evaluation.k,
            "single_model_accuracy": evaluation.single_model_accuracy,
            "ensemble_accuracy": evaluation.ensemble_accuracy,
            "knn_accuracy": evaluation.knn_accuracy,
            "weighted_accuracy": evaluation.weighted_accuracy,
            "weighted_k": evaluation.weighted_k, "power": evaluation.power}


def _versions() -> dict:
    from .. import __version__

    import zarr

    return {"ensemble_kernel": __version__, "torch": torch.__version__,
            "numpy": np.__version__, "zarr": zarr.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
