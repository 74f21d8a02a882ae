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
from .analysis._classifier import KernelKNN
from .core._engine import Plan, Progress, compute_kernel, plan_memory, top_k_neighbors
from .errors import (
    BudgetError,
    EnsembleKernelError,
    InputError,
    NonFiniteError,
    RunFileError,
    StoreError,
)
from .analysis._evaluation import Evaluation, Selection, evaluate, select_by_leave_one_out
from .core._kernel import dense_kernel
from .analysis._label_issues import LabelIssues, knn_graph, label_issues
from .core._neighbors import Neighbors
from .core._precision import PrecisionChoice, choose_precision
from .storage._runs import Runs, open_runs
from .core._sources import ArraySource, ConcatSource, LogitSource
from .storage._store import RunStore
from .analysis._sweep import Significance, SweepResult, SweepRow, sweep
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
    "choose_precision",
    "PrecisionChoice",
    "dense_kernel",
    "label_issues",
    "LabelIssues",
    "knn_graph",
    "plan_memory",
    "Plan",
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
