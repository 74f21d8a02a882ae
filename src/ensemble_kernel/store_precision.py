"""Deprecated: this module moved to `ensemble_kernel.storage._precision`.

Import the names from `ensemble_kernel` or `ensemble_kernel.storage` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .storage import _precision as _moved

warnings.warn("ensemble_kernel.store_precision moved to ensemble_kernel.storage._precision: import from "
              "ensemble_kernel.storage instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
