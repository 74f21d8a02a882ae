"""Deprecated: this module moved to `ensemble_kernel.core._distributed`.

Import the names from `ensemble_kernel` or `ensemble_kernel.core` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .core import _distributed as _moved

warnings.warn("ensemble_kernel.distributed moved to ensemble_kernel.core._distributed: import from "
              "ensemble_kernel.core instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
