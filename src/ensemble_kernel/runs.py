"""Deprecated: this module moved to `ensemble_kernel.storage._runs`.

Import the names from `ensemble_kernel` or `ensemble_kernel.storage` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .storage import _runs as _moved

warnings.warn("ensemble_kernel.runs moved to ensemble_kernel.storage._runs: import from "
              "ensemble_kernel.storage instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
