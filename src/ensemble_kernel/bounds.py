"""Deprecated: this module moved to `ensemble_kernel.core._bounds`.

Import the names from `ensemble_kernel` or `ensemble_kernel.core` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .core import _bounds as _moved

warnings.warn("ensemble_kernel.bounds moved to ensemble_kernel.core._bounds: import from "
              "ensemble_kernel.core instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
