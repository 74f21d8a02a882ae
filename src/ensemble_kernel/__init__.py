"""ensemble-kernel: a similarity kernel from the saved outputs of many training runs.

The kernel of docs/architecture.md §1 (per-class standardised log-softmax outputs, correlated across
runs), its k-nearest-neighbour predictions, and the engine that computes them under a
memory budget.

Argument order, everywhere: the training split (the references) first, then the test
split (the queries): ``top_k_neighbors(train, test)``, ``evaluate(train, test,
labels_train, labels_test)``, ``KernelKNN().fit(train, y_train).predict(test)``.

>>> import ensemble_kernel as ek                                  # doctest: +SKIP
>>> runs = ek.open_runs("demo-output/store")                      # doctest: +SKIP
>>> ek.evaluate(runs.train, runs.test, runs.labels_train, runs.labels_test)  # doctest: +SKIP
"""

from .core._vector_math import resolve_dispatch as _resolve_dispatch

_resolve_dispatch()  # before any computation: see vector_math

# The functions `evaluate` and `sweep` live in modules with other names (evaluation,
# sweeps), so importing any submodule never rebinds a top-level name to a module.
from .analysis import (
    Evaluation,
    KernelKNN,
    LabelIssues,
    Selection,
    Significance,
    SweepResult,
    SweepRow,
    evaluate,
    knn_graph,
    label_issues,
    select_by_leave_one_out,
    sweep,
)
from .core import ArraySource, ConcatSource, LogitSource, Neighbors, Progress, compute_kernel
from .core import top_k_neighbors
from .errors import (
    BudgetError,
    EnsembleKernelError,
    InputError,
    NonFiniteError,
    RunFileError,
    StoreError,
)
from .report._views import (
    ComparisonView,
    DuplicatesView,
    FailuresView,
    PairsView,
    compare,
    duplicates,
    failures,
    pairs,
)
from .storage import RunStore, Runs, open_runs

# Names that moved off the top level; each still works, with a DeprecationWarning, for
# one release.
_MOVED = {
    "plan_memory": "ensemble_kernel.core",
    "Plan": "ensemble_kernel.core",
    "choose_precision": "ensemble_kernel.core",
    "PrecisionChoice": "ensemble_kernel.core",
    "dense_kernel": "ensemble_kernel.testing",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"ensemble_kernel.{name} moved to {_MOVED[name]}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'ensemble_kernel' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "__version__",
    # opening runs
    "open_runs",
    "Runs",
    "RunStore",
    "LogitSource",
    "ArraySource",
    "ConcatSource",
    # the kernel and its neighbours
    "top_k_neighbors",
    "compute_kernel",
    "label_issues",
    "LabelIssues",
    "knn_graph",
    "Progress",
    "Neighbors",
    # prediction and evaluation
    "KernelKNN",
    "evaluate",
    "Evaluation",
    "select_by_leave_one_out",
    "Selection",
    "sweep",
    "SweepResult",
    "SweepRow",
    "Significance",
    # the views
    "pairs",
    "duplicates",
    "failures",
    "compare",
    "PairsView",
    "DuplicatesView",
    "FailuresView",
    "ComparisonView",
    # errors
    "EnsembleKernelError",
    "InputError",
    "NonFiniteError",
    "BudgetError",
    "RunFileError",
    "StoreError",
]
