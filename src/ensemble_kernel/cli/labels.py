"""labels: write labels.npz for a published data set, from files the user already has."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

from .. import __version__
from .._atomic import atomic_write
from ..storage._cifar import read_cifar10_labels
from ..errors import InputError
from .common import _user_errors, app, choice, err
from .outputs import check_output_file, check_outputs_apart

DATASETS = ("cifar10",)


@app.command("labels")
def labels_cmd(
    dataset: str = typer.Argument(..., help="The data set: cifar10.", show_default=False),
    root: Path = typer.Option(..., "--root", help="The folder holding cifar-10-batches-py/ "
                              "(torchvision's root), or that folder itself."),
    out: Path = typer.Option(..., "--out", help="The .npz to write (labels_train, "
                             "labels_test, class_names, and meta: what made it)."),
    reader: str = typer.Option("auto", "--reader",
                               callback=choice("--reader", ("auto", "torchvision", "pickle")),
                               help="torchvision (the optional extra named cifar), pickle (a "
                                    "built-in reader that runs no code from the files), or "
                                    "auto: torchvision when installed, else pickle."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
) -> None:
    """Write the labels of a published data set in the order of its runs' logits.

    The published CIFAR-10 runs (logs_saveoutputs_main/<uuid>/log.pt) carry no labels;
    their logits_train follow torchvision's CIFAR10(train=True) order and logits /
    logits_tta follow CIFAR10(train=False). This reads them from the python batches you
    already have (nothing is downloaded, ever):

    Example: ensemble-kernel labels cifar10 --root ~/data --out labels.npz

    then: ensemble-kernel info logs_saveoutputs_main/ (its training configurations) and
    ensemble-kernel evaluate logs_saveoutputs_main/ --labels labels.npz --code PREFIX
    """
    with _user_errors():
        if dataset not in DATASETS:
            raise InputError(f"DATASET takes {', '.join(DATASETS)}, got {dataset!r}")
        if out.suffix.lower() != ".npz":
            raise InputError(f"--out must name an .npz file, got {out}")
        check_output_file(out)
        check_outputs_apart([("--out", out)], [("--root", root)])
        started = time.perf_counter()
        found = read_cifar10_labels(root, reader=reader)
        meta = json.dumps({"ensemble_kernel_version": __version__, "dataset": dataset,
                           "root": str(root), "reader": found.reader,
                           "elapsed_s": round(time.perf_counter() - started, 3)})
        atomic_write(out, lambda f: np.savez(f, labels_train=found.labels_train,
                                             labels_test=found.labels_test,
                                             class_names=np.array(found.class_names),
                                             meta=np.array(meta)))
    if not quiet:
        err.print(f"wrote {out}: {len(found.labels_train)} train and {len(found.labels_test)} "
                  f"test labels ({found.reader} reader); classes "
                  f"{','.join(found.class_names)}", markup=False, soft_wrap=True)
