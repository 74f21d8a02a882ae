"""The exception types. Every user-facing error derives from `EnsembleKernelError`.

The command line turns these into one line on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "EnsembleKernelError",
    "InputError",
    "NonFiniteError",
    "BudgetError",
    "RunFileError",
    "StoreError",
]


class EnsembleKernelError(Exception):
    """Base class: an error the user can act on; its message says what and how."""


class InputError(EnsembleKernelError, ValueError):
    """Arrays or options that do not fit together (shapes, counts, labels, k).

    `param` names the parameter at fault as the Python API calls it (``"k"``); the
    message writes it in backticks (`` `k` must be between 1 and 5, got 0``), and the
    command line shows its own option there instead (``--k must be ...``).
    """

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class NonFiniteError(InputError):
    """NaN or Inf in the logits; the message names the split, the run and the example."""


class BudgetError(EnsembleKernelError):
    """The memory budget is too small for the smallest plan the engine can make."""


class RunFileError(EnsembleKernelError):
    """A run file that cannot be read safely: wrong type, truncated, not a dict of tensors."""


class StoreError(EnsembleKernelError):
    """A store that is missing, of another format version, or damaged."""


# Where labels come from when the run files carry none (the published CIFAR-10 runs).
LABELS_HINT = ("for the published CIFAR-10 runs, make it with: ensemble-kernel labels cifar10 "
               "--root DIR --out labels.npz")
