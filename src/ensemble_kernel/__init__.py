"""ensemble-kernel: a similarity kernel from the saved outputs of many training runs.

The kernel of DESIGN §1 (per-class standardised log-softmax outputs, correlated across
runs), its k-nearest-neighbour predictions, and the engine that computes them under a
memory budget.
"""

from .engine import Plan, Progress, compute_kernel, plan_memory, top_k_neighbors
from .errors import (
    BudgetError,
    EnsembleKernelError,
    InputError,
    NonFiniteError,
    RunFileError,
    StoreError,
)
from .kernel import dense_kernel
from .labelissues import LabelIssues, knn_graph, label_issues
from .neighbors import Neighbors
from .sources import ArraySource, ConcatSource, LogitSource

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "top_k_neighbors",
    "compute_kernel",
    "dense_kernel",
    "label_issues",
    "LabelIssues",
    "knn_graph",
    "plan_memory",
    "Plan",
    "Progress",
    "Neighbors",
    "LogitSource",
    "ArraySource",
    "ConcatSource",
    "EnsembleKernelError",
    "InputError",
    "NonFiniteError",
    "BudgetError",
    "RunFileError",
    "StoreError",
]
