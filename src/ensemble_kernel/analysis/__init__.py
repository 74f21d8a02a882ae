"""What the kernel tells: evaluation, sweeps and ablations, label issues, and the views.

Imports `core`, `storage` and the base modules, never `report`, `demo` or `cli`
(tests/test_layers.py).

- `_evaluation`: the model card's table, leave-one-out selection of k and the power;
- `_sweep`, `_ablations`: accuracy against the number of runs, and the ablations;
- `_label_issues`: examples whose labels their neighbours disagree with;
- `_explain`, `_within`: pairs, near-duplicates, failures, comparisons (their views,
  which draw, are `report`'s);
- `_classifier`: `KernelKNN`, the scikit-learn-style estimator.
"""

from ._classifier import KernelKNN
from ._evaluation import Evaluation, Selection, evaluate, select_by_leave_one_out
from ._label_issues import LabelIssues, knn_graph, label_issues
from ._sweep import Significance, SweepResult, SweepRow, sweep

__all__ = ["KernelKNN", "evaluate", "Evaluation", "select_by_leave_one_out", "Selection",
           "label_issues", "LabelIssues", "knn_graph", "sweep", "SweepResult", "SweepRow",
           "Significance"]
