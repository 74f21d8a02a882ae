"""Deprecated: this module moved to `ensemble_kernel.core._precision`.

Import the names from `ensemble_kernel` or `ensemble_kernel.core` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .core import _precision as _moved

warnings.warn("ensemble_kernel.precision moved to ensemble_kernel.core._precision: import from "
              "ensemble_kernel.core instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
