"""Deprecated: this module moved to `ensemble_kernel.analysis._within`.

Import the names from `ensemble_kernel` or `ensemble_kernel.analysis` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .analysis import _within as _moved

warnings.warn("ensemble_kernel.within moved to ensemble_kernel.analysis._within: import from "
              "ensemble_kernel.analysis instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
